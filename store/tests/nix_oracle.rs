//! The store must agree with real Nix: the same store path as `nix-store --add` and NAR
//! bytes identical to `nix-store --dump`, for many tree shapes and every backend.
//!
//! Needs Debian's `nix-bin` (root, single-user); without it these tests fail, loudly.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use tvix_boot_store::import::import_path;
use tvix_boot_store::{Store, StoreAddrs};

fn nix(args: &[&str]) -> Vec<u8> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}. These tests compare against real Nix: apt-get install nix-bin",
                args[0]
            )
        });
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Named tree shapes, each built under a fresh directory; returns the path to import.
fn shapes(base: &Path) -> Vec<PathBuf> {
    let mut roots = Vec::new();
    let mut add = |name: &str, build: &dyn Fn(&Path)| {
        let holder = base.join(format!("holder-{}", roots.len()));
        fs::create_dir(&holder).unwrap();
        let root = holder.join(name);
        build(&root);
        roots.push(root);
    };

    add("plain-file", &|p| write(p, b"hello world\n", 0o644));
    add("exec-file", &|p| write(p, b"#!/bin/sh\necho hi\n", 0o755));
    add("owner-exec-only", &|p| write(p, b"x", 0o700));
    add("empty-file", &|p| write(p, b"", 0o644));
    add("dangling-root-link", &|p| {
        symlink("/does/not/exist", p).unwrap()
    });
    add("empty-dir", &|p| fs::create_dir(p).unwrap());
    add("big-file", &|p| {
        // Crosses the blob writer's in-memory limit and is not a multiple of 8.
        let data: Vec<u8> = (0..5 * 1024 * 1024 + 3)
            .map(|i: usize| (i ^ (i >> 9)) as u8)
            .collect();
        write(p, &data, 0o644);
    });
    add("mixed", &|p| {
        fs::create_dir_all(p.join("bin")).unwrap();
        fs::create_dir_all(p.join("share/empty")).unwrap();
        write(&p.join("bin/tool"), b"\x7fELF not really", 0o555);
        write(&p.join("share/data"), &[0u8; 1000], 0o444);
        write(&p.join("share/empty-file"), b"", 0o600);
        symlink("../bin/tool", p.join("share/relative-link")).unwrap();
        symlink(
            "/nix/store/00000000000000000000000000000000-nothing",
            p.join("absolute-link"),
        )
        .unwrap();
        symlink("dangling", p.join("dangling-link")).unwrap();
        symlink("bin", p.join("dir-link")).unwrap();
    });
    add("deep", &|p| {
        let mut dir = p.to_owned();
        for level in 0..60 {
            dir = dir.join(format!("d{level}"));
        }
        fs::create_dir_all(&dir).unwrap();
        write(&dir.join("leaf"), b"bottom", 0o644);
    });
    add("odd-names", &|p| {
        fs::create_dir(p).unwrap();
        for name in [
            "with space",
            "ünïcödé",
            ".hidden",
            "-dash",
            "a",
            "A",
            "a.b",
            "a-b",
            "aa",
            "b",
            "Z",
            "~tilde",
            "new\nline",
            "tab\there",
            "x".repeat(255).as_str(),
            "'quote\"",
            "\u{1F600}",
        ] {
            write(&p.join(name), name.as_bytes(), 0o644);
        }
        fs::create_dir(p.join("dir with space")).unwrap();
        write(&p.join("dir with space/f"), b"f", 0o755);
    });
    add("many-entries", &|p| {
        fs::create_dir(p).unwrap();
        for i in 0..400 {
            write(
                &p.join(format!("file-{i:04}")),
                format!("content {i}\n").as_bytes(),
                0o644,
            );
        }
        for i in 0..50 {
            fs::create_dir(p.join(format!("dir-{i:03}"))).unwrap();
            symlink(
                format!("../file-{i:04}"),
                p.join(format!("dir-{i:03}/link")),
            )
            .unwrap();
        }
    });
    add("name+with=odd?chars_.x", &|p| {
        write(p, b"odd store path name", 0o644)
    });
    roots
}

fn check_backend(addrs: StoreAddrs) {
    let work = tempfile::tempdir().unwrap();
    let store = Store::open(&addrs).unwrap();
    for root in shapes(work.path()) {
        let root_str = root.to_str().unwrap();
        let info = import_path(&store, &root, &mut |_| {}).unwrap();
        let nix_path = String::from_utf8(nix(&["nix-store", "--add", root_str])).unwrap();
        assert_eq!(
            info.store_path.to_string(),
            nix_path.trim(),
            "store path of {root_str}"
        );

        let nix_nar = nix(&["nix-store", "--dump", root_str]);
        let mut our_nar = Vec::new();
        store.write_nar(&info.node, &mut our_nar).unwrap();
        assert!(
            our_nar == nix_nar,
            "NAR of {root_str} differs from nix-store --dump"
        );
        assert_eq!(info.nar_size, nix_nar.len() as u64);

        let nix_hash =
            String::from_utf8(nix(&["nix-store", "--query", "--hash", nix_path.trim()])).unwrap();
        assert_eq!(
            format!(
                "sha256:{}",
                tvix_boot_store::nixbase32::encode(&info.nar_sha256)
            ),
            nix_hash.trim(),
            "NAR hash of {root_str}"
        );

        // Nix's own NAR, ingested, gives the same root node back.
        let ingested = store.ingest_nar(nix_nar.as_slice()).unwrap();
        assert_eq!(
            ingested.node, info.node,
            "ingesting nix's NAR of {root_str}"
        );
        assert_eq!(ingested.nar_sha256, info.nar_sha256);

        // And the store can read its record back.
        assert_eq!(store.path_info(&info.store_path).unwrap(), Some(info));
    }
}

#[test]
fn memory_backend_agrees_with_nix() {
    check_backend(StoreAddrs::memory());
}

#[test]
fn file_backend_agrees_with_nix() {
    let dir = tempfile::tempdir().unwrap();
    check_backend(StoreAddrs::in_directory(dir.path()));
}

#[test]
fn redb_backend_agrees_with_nix() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("store.redb");
    check_backend(StoreAddrs {
        blob: format!("objectstore+file://{}", dir.path().join("blobs").display()),
        directory: format!("redb://{}", db.display()),
        path_info: format!("redb://{}", db.display()),
    });
}

#[test]
fn object_store_in_memory_backend_agrees_with_nix() {
    check_backend(StoreAddrs {
        blob: "objectstore+memory://".into(),
        directory: "objectstore+memory://".into(),
        path_info: "memory://".into(),
    });
}
