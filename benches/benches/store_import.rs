//! Store import throughput: a tree of large files and a tree of many small files, imported
//! into the embedded (file-based) store and the in-memory store, beside `nix-store --add`
//! of the same trees when Nix is installed. Then NAR ingest (what `nix copy --to` into
//! serve-nar and substitution from a binary cache do): the trees' NARs ingested into both
//! stores, beside `nix-store --restore` of the same NAR (how Nix unpacks a substituted
//! NAR).
//!
//! Run: `cargo bench -p tvix-boot-benches --bench store_import` (STORE_BENCH_SCALE=N scales
//! the trees; default 1 = 1 GiB of large files and 20,000 small files;
//! STORE_BENCH_TREES=large or small runs one of them).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tvix_boot_store::import::import_path;
use tvix_boot_store::{Store, StoreAddrs};

struct Tree {
    label: &'static str,
    bytes: u64,
    files: u64,
}

fn make_large_files(root: &Path, scale: u64) -> Tree {
    fs::create_dir(root).unwrap();
    let file_size = 256u64 << 20;
    let count = 4 * scale;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..count {
        let mut out = fs::File::create(root.join(format!("large-{i}"))).unwrap();
        for chunk in 0..file_size >> 20 {
            // Distinct content per chunk, so nothing deduplicates.
            block
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = (j as u64 ^ chunk ^ (i << 8)) as u8);
            block[..8].copy_from_slice(&(chunk + (i << 32)).to_le_bytes());
            std::io::Write::write_all(&mut out, &block).unwrap();
        }
    }
    Tree {
        label: "large files",
        bytes: file_size * count,
        files: count,
    }
}

fn make_small_files(root: &Path, scale: u64) -> Tree {
    let count = 20_000 * scale;
    let mut bytes = 0;
    for i in 0..count {
        let dir = root.join(format!("d{:03}", i % 200));
        fs::create_dir_all(&dir).unwrap();
        let size = 512 + (i * 37) % 4096;
        let content: Vec<u8> = (0..size).map(|j| (j ^ i) as u8).collect();
        fs::write(dir.join(format!("f{i}")), &content).unwrap();
        bytes += size;
    }
    Tree {
        label: "small files",
        bytes,
        files: count,
    }
}

fn report(what: &str, tree: &Tree, elapsed: Duration) {
    let secs = elapsed.as_secs_f64();
    println!(
        "{:<12} {:<28} {:>8.1} MB/s {:>10.0} files/s  ({:.2} s, {} files, {:.1} MB)",
        tree.label,
        what,
        tree.bytes as f64 / 1e6 / secs,
        tree.files as f64 / secs,
        secs,
        tree.files,
        tree.bytes as f64 / 1e6
    );
}

/// Writes every dirty page back, so the next measurement starts from a quiet disk.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn main() {
    // `cargo bench` passes --bench. `cargo test` runs this too (`test = true`), with a
    // tiny tree: a check, not a measurement, that every contender's result agrees (the
    // embedded and the memory store import the same tree, its NAR ingests back to it).
    let quick = std::env::args().all(|a| a != "--bench");
    let scale: u64 = std::env::var("STORE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let work = tempfile::tempdir().unwrap();
    let mut trees = Vec::new();
    if quick {
        let root = work.path().join("tiny");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("f"), b"x").unwrap();
        fs::write(root.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(
            root.join("bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("bin/tool", root.join("link")).unwrap();
        trees.push((
            root,
            Tree {
                label: "tiny",
                bytes: 11,
                files: 2,
            },
        ));
    } else {
        let only = std::env::var("STORE_BENCH_TREES").unwrap_or_default();
        if only.is_empty() || only.contains("large") {
            let large = work.path().join("large");
            let tree = make_large_files(&large, scale);
            trees.push((large, tree));
        }
        if only.is_empty() || only.contains("small") {
            let small = work.path().join("small");
            let tree = make_small_files(&small, scale);
            trees.push((small, tree));
        }
    }
    // The trees were just written, so they sit in the page cache for every contender alike.
    // Each contender starts with nothing dirty (`settle`): it pays for writing back its
    // own output (tvix-boot flushes before it acknowledges a path), not for what the one
    // before it left in the page cache.

    let nix_available = !quick
        && Command::new("nix-store")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    for (root, tree) in &trees {
        let embedded_dir = tempfile::tempdir().unwrap();
        let embedded = Store::open(&StoreAddrs::in_directory(embedded_dir.path())).unwrap();
        settle();
        let started = Instant::now();
        let embedded_info = import_path(&embedded, root, &mut |_| {}).unwrap();
        report(
            &"tvix-boot, embedded file store".to_string()[..],
            tree,
            started.elapsed(),
        );

        let memory = Store::memory();
        settle();
        let started = Instant::now();
        let info = import_path(&memory, root, &mut |_| {}).unwrap();
        report("tvix-boot, memory store", tree, started.elapsed());
        assert_eq!(
            embedded_info.node, info.node,
            "the embedded and the memory store import the tree alike"
        );

        let mut nar = Vec::with_capacity(tree.bytes as usize + (1 << 20));
        memory.write_nar(&info.node, &mut nar).unwrap();
        let nar_tree = Tree {
            label: tree.label,
            bytes: nar.len() as u64,
            files: tree.files,
        };
        let ingest_dir = tempfile::tempdir().unwrap();
        let ingest_store = Store::open(&StoreAddrs::in_directory(ingest_dir.path())).unwrap();
        settle();
        let started = Instant::now();
        let ingested = ingest_store.ingest_nar(&nar[..]).unwrap();
        report("NAR ingest, embedded store", &nar_tree, started.elapsed());
        assert_eq!(
            ingested.node, info.node,
            "the NAR ingests to the imported tree"
        );
        settle();
        let started = Instant::now();
        let ingested = Store::memory().ingest_nar(&nar[..]).unwrap();
        report("NAR ingest, memory store", &nar_tree, started.elapsed());
        assert_eq!(
            ingested.node, info.node,
            "the NAR ingests to the imported tree"
        );
        if nix_available {
            let restore_to = tempfile::tempdir().unwrap();
            let target = restore_to.path().join("out");
            settle();
            let started = Instant::now();
            let mut child = Command::new("nix-store")
                .arg("--restore")
                .arg(&target)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut child.stdin.take().unwrap(), &nar).unwrap();
            assert!(
                child.wait().unwrap().success(),
                "nix-store --restore failed"
            );
            report("nix-store --restore (ref.)", &nar_tree, started.elapsed());
        }

        if nix_available {
            settle();
            let started = Instant::now();
            let status = Command::new("nix-store")
                .arg("--add")
                .arg(root)
                .output()
                .unwrap();
            assert!(status.status.success(), "nix-store --add failed");
            report("nix-store --add (reference)", tree, started.elapsed());
        } else if !quick {
            println!(
                "{:<12} nix-store not installed: no reference numbers",
                tree.label
            );
        }
    }
}
