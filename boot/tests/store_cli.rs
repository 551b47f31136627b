//! `tvix-boot store ...` as a user runs it: the real binary, a real embedded store on disk.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, tvix_boot};

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("tvix-boot runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn list(data_home: &Path) -> Vec<String> {
    let output = run(tvix_boot(data_home).args(["store", "list"]));
    assert!(
        output.status.success(),
        "store list failed: {}",
        stderr(&output)
    );
    stdout(&output).lines().map(str::to_owned).collect()
}

/// Runs an import that must fail; checks the message names `needle` and nothing was recorded.
fn assert_import_fails(data_home: &Path, path: &Path, needle: &str) -> String {
    let output = run(tvix_boot(data_home).arg("store").arg("import").arg(path));
    let err = stderr(&output);
    assert!(
        !output.status.success(),
        "import of {} succeeded: {}",
        path.display(),
        stdout(&output)
    );
    assert!(
        err.contains(needle),
        "error for {} does not name {needle:?}: {err}",
        path.display()
    );
    assert!(
        list(data_home).is_empty(),
        "a failed import left path info behind"
    );
    err
}

#[test]
fn embedded_store_persists_across_processes() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("tree");
    fs::create_dir_all(tree.join("bin")).unwrap();
    fs::write(tree.join("bin/hello"), b"#!/bin/sh\necho hello\n").unwrap();
    fs::set_permissions(tree.join("bin/hello"), fs::Permissions::from_mode(0o755)).unwrap();

    let output = run(tvix_boot(data.path()).arg("store").arg("import").arg(&tree));
    assert!(output.status.success(), "{}", stderr(&output));
    let path = stdout(&output).trim().to_owned();
    assert!(
        path.starts_with("/nix/store/") && path.ends_with("-tree"),
        "{path}"
    );
    assert!(
        data.path().join("tvix-boot").is_dir(),
        "embedded store not under XDG_DATA_HOME"
    );

    // New processes see it: list, info, export.
    assert_eq!(list(data.path()), vec![path.clone()]);
    let info = run(tvix_boot(data.path()).args(["store", "info", &path]));
    assert!(info.status.success(), "{}", stderr(&info));
    let info = stdout(&info);
    assert!(
        info.contains("nar-hash: sha256:") && info.contains("root: directory b3:"),
        "{info}"
    );
    let nar = run(tvix_boot(data.path()).args(["store", "export-nar", &path]));
    assert!(nar.status.success(), "{}", stderr(&nar));
    assert!(nar.stdout.starts_with(b"\x0d\0\0\0\0\0\0\0nix-archive-1"));

    // Importing again is idempotent.
    let again = run(tvix_boot(data.path()).arg("store").arg("import").arg(&tree));
    assert_eq!(stdout(&again).trim(), path);
    assert_eq!(list(data.path()).len(), 1);
}

#[test]
fn bad_inputs_get_clear_errors_and_write_nothing() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();

    let missing = src.path().join("does-not-exist");
    assert_import_fails(data.path(), &missing, "does-not-exist");

    let with_socket = src.path().join("with-socket");
    fs::create_dir(&with_socket).unwrap();
    fs::write(with_socket.join("a-file"), b"x").unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(with_socket.join("sock")).unwrap();
    let err = assert_import_fails(data.path(), &with_socket, "with-socket/sock");
    assert!(err.contains("socket"), "{err}");

    let with_fifo = src.path().join("with-fifo");
    fs::create_dir(&with_fifo).unwrap();
    let fifo = with_fifo.join("pipe");
    let fifo_c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path and touches no memory of ours.
    assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o644) }, 0);
    assert_import_fails(data.path(), &with_fifo, "named pipe");

    let bad_name = src.path().join("has space");
    fs::write(&bad_name, b"x").unwrap();
    assert_import_fails(data.path(), &bad_name, "has space");

    for bad_path in [
        "/nix/store/not-a-store-path",
        "/tmp/x",
        "0000000000000000000000000000000e-x",
    ] {
        let output = run(tvix_boot(data.path()).args(["store", "info", bad_path]));
        assert!(!output.status.success());
        assert!(stderr(&output).contains(bad_path), "{}", stderr(&output));
    }
    let absent = "/nix/store/00000000000000000000000000000000-absent";
    let output = run(tvix_boot(data.path()).args(["store", "export-nar", absent]));
    assert!(!output.status.success() && output.stdout.is_empty());
    assert!(
        stderr(&output).contains("not in the store"),
        "{}",
        stderr(&output)
    );

    let output = run(tvix_boot(data.path())
        .args(["store", "list"])
        .env("BLOB_SERVICE_ADDR", "bogus:///x"));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("bogus:///x"),
        "{}",
        stderr(&output)
    );
    let output = run(tvix_boot(data.path()).args([
        "store",
        "list",
        "--directory-service-addr",
        "redb://relative",
    ]));
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("redb://relative"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn unreadable_file_is_an_error() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("unreadable");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("secret"), b"x").unwrap();
    fs::set_permissions(tree.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();

    // Root reads any file, so as root run the import as nobody, with a store nobody may write.
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if is_root {
        for dir in [data.path(), src.path()] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
        cmd.env("XDG_DATA_HOME", data.path());
        cmd
    } else {
        tvix_boot(data.path())
    };
    let output = run(cmd.arg("store").arg("import").arg(&tree));
    assert!(!output.status.success(), "unreadable file was imported");
    let err = stderr(&output);
    assert!(
        err.contains("unreadable/secret") && err.contains("ermission denied"),
        "{err}"
    );
    assert!(list(data.path()).is_empty());
}

#[test]
fn kill_during_import_leaves_store_consistent() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let tree = src.path().join("big");
    fs::create_dir(&tree).unwrap();
    // Enough work that the import is still running when it is killed.
    for i in 0..64 {
        let data: Vec<u8> = (0..(2 << 20)).map(|b: u32| (b ^ i) as u8).collect();
        fs::write(tree.join(format!("f{i:02}")), data).unwrap();
    }

    let mut child = tvix_boot(data.path())
        .arg("store")
        .arg("import")
        .arg(&tree)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill once the import has written some blobs.
    let blobs = data.path().join("tvix-boot/blobs");
    let started = Instant::now();
    while count_files(&blobs) < 3 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the import finished before it was killed; make the tree bigger"
    );

    // Consistent: no path info (or a complete one), and the import can simply be redone.
    for path in list(data.path()) {
        let nar = run(tvix_boot(data.path()).args(["store", "export-nar", &path]));
        assert!(
            nar.status.success(),
            "{path} is listed but incomplete: {}",
            stderr(&nar)
        );
    }
    let output = run(tvix_boot(data.path()).arg("store").arg("import").arg(&tree));
    assert!(output.status.success(), "{}", stderr(&output));
    let path = stdout(&output).trim().to_owned();
    let nar = run(tvix_boot(data.path()).args(["store", "export-nar", &path]));
    assert!(nar.status.success());
    assert_eq!(list(data.path()), vec![path]);
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}
