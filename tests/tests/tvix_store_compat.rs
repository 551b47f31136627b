//! Wire compatibility with the real tvix-store, both ways. Outside CI (ignored): it
//! needs a tvix-store binary, named by TVIX_STORE_BIN, which this repository does not
//! build (CI pins compatibility with golden encodings instead: store/tests/grpc_golden.rs).
//!
//! - Their client against our daemon, on the build machine: `tvix-store import` of a
//!   tree into `tvix-boot store daemon`, which must then hold the path `nix-store --add`
//!   gives, with the NAR `nix-store --dump` gives; and their reading client (`tvix-store
//!   mount`, when /dev/fuse is there) reads it back through our daemon, large file
//!   included (our Stat lists chunks: their client reads them one by one).
//! - Their daemon as our store, in the test host: `tvix-store daemon` on a unix socket,
//!   filled by `tvix-store import`; then `tvix-boot --run` with only grpc+unix addresses
//!   runs a program from it, reading a 3.5 MB file. (Our client's writes into it are
//!   refused by this tvix: it checks DirectoryNode.size against a count that takes each
//!   entry twice, where castore.proto and tvix-boot take it once.)
//!
//! Run: `TVIX_STORE_BIN=/path/to/tvix-store cargo test -p tvix-boot-tests --test
//! tvix_store_compat -- --ignored --nocapture`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tvix_boot_tests::nix::run;
use tvix_boot_tests::{GUEST_KERNEL, TestHost, assets, qemu};

fn tvix_store() -> PathBuf {
    let bin = std::env::var_os("TVIX_STORE_BIN")
        .map(PathBuf::from)
        .expect("TVIX_STORE_BIN names a tvix-store binary");
    assert!(bin.is_file(), "{}", bin.display());
    bin
}

fn tree(dir: &Path) -> PathBuf {
    let root = dir.join("compat-tree");
    std::fs::create_dir_all(root.join("lib/deep/er")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("lib/deep/er/leaf"), b"leaf\n").unwrap();
    std::fs::write(root.join("lib/small"), b"small\n").unwrap();
    let big: Vec<u8> = (0..3_500_000u32)
        .map(|i| (i ^ (i >> 9) ^ (i >> 17)) as u8)
        .collect();
    std::fs::write(root.join("lib/big"), big).unwrap();
    std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    let mut perms = std::fs::metadata(root.join("bin/tool"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(root.join("bin/tool"), perms).unwrap();
    std::os::unix::fs::symlink("bin/tool", root.join("tool")).unwrap();
    root
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn grpc_env(cmd: &mut Command, url: &str) {
    cmd.env("BLOB_SERVICE_ADDR", url)
        .env("DIRECTORY_SERVICE_ADDR", url)
        .env("PATH_INFO_SERVICE_ADDR", url);
}

#[test]
#[ignore = "needs TVIX_STORE_BIN, a tvix-store binary built outside this repository"]
fn their_client_against_our_daemon() {
    let tvix_store = tvix_store();
    let tvix_boot = assets::tvix_boot_static_once().unwrap();
    let work = tempfile::tempdir().unwrap();
    let root = tree(work.path());
    let data = work.path().join("data");
    let socket = work.path().join("ours.sock");
    let mut daemon = Command::new(&tvix_boot)
        .env("XDG_DATA_HOME", &data)
        .args(["store", "daemon", "--listen"])
        .arg(&socket)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(daemon.stderr.take().unwrap());
    let mut line = String::new();
    log.read_line(&mut line).unwrap();
    let _daemon = Killed(daemon);
    let url = format!("grpc+unix://{}", socket.display());

    let mut import = Command::new(&tvix_store);
    grpc_env(&mut import, &url);
    let out = run(import.arg("import").arg(&root));
    let imported = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    eprintln!("tvix-store import (into tvix-boot store daemon): {imported}");
    let expected = String::from_utf8(run(Command::new("nix-store").arg("--add").arg(&root)).stdout)
        .unwrap()
        .trim()
        .to_owned();
    assert!(
        imported.ends_with(&expected),
        "{imported} vs nix-store --add {expected}"
    );

    // Read back by tvix-boot from the store the daemon serves.
    let nar = run(Command::new(&tvix_boot).env("XDG_DATA_HOME", &data).args([
        "store",
        "export-nar",
        &expected,
    ]))
    .stdout;
    let dump = run(Command::new("nix-store").arg("--dump").arg(&root)).stdout;
    assert!(
        nar == dump,
        "the NAR of what tvix-store imported differs from nix-store --dump"
    );
    eprintln!(
        "tvix-boot store export-nar of it == nix-store --dump ({} bytes)",
        nar.len()
    );

    // Their reading client, through our daemon.
    if Path::new("/dev/fuse").exists() {
        let mnt = work.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut mount = Command::new(&tvix_store);
        grpc_env(&mut mount, &url);
        let _mount = Killed(
            mount
                .arg("mount")
                .arg(&mnt)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let base = expected.trim_start_matches("/nix/store/");
        let at = mnt.join(base);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(at.join("lib/big")).is_err() {
            assert!(
                Instant::now() < deadline,
                "tvix-store mount never showed {base}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for file in ["lib/big", "lib/small", "lib/deep/er/leaf", "bin/tool"] {
            assert!(
                std::fs::read(at.join(file)).unwrap() == std::fs::read(root.join(file)).unwrap(),
                "{file} read through tvix-store mount differs"
            );
        }
        eprintln!("tvix-store mount read every file back through tvix-boot store daemon");
        let _ = Command::new("umount").arg(&mnt).status();
    }
}

const SCRIPT: &str = r#"
export TVIX_BOOT_KERNEL={kernel}
mkdir -p /tv /prog/bin /prog/share
S="BLOB_SERVICE_ADDR=objectstore+file:///tv/blobs DIRECTORY_SERVICE_ADDR=redb:///tv/dirs.redb PATH_INFO_SERVICE_ADDR=redb:///tv/pathinfo.redb"
env $S {tvix_store} daemon -l /run/tvix.sock > /run/tvix.log 2>&1 &
while [ ! -S /run/tvix.sock ]; do sleep 0.1; done
cp /bin/busybox /prog/bin/busybox
head -c 3500000 /guest/vmlinux > /prog/share/big
echo "big-sha $(sha256sum /prog/share/big | cut -d' ' -f1)"
A=grpc+unix:///run/tvix.sock
export XDG_DATA_HOME=/nonexistent BLOB_SERVICE_ADDR=$A DIRECTORY_SERVICE_ADDR=$A PATH_INFO_SERVICE_ADDR=$A
# Their own client fills their daemon (see below for ours).
P=$({tvix_store} import /prog 2>/run/import.log)
echo "imported $P"
# Ours, into theirs: this tvix refuses directories whose DirectoryNode.size follows
# castore.proto (entries plus the children's sizes); its own Directory::size counts
# entries twice. Recorded, not asserted.
mkdir -p /prog2/sub && echo x > /prog2/sub/f
echo "our-import $(tvix-boot store import /prog2 2>&1 | tail -1)"
echo run-begin
tvix-boot --run $P/bin/busybox -- sh -c "echo hello-from-tvix-store; $P/bin/busybox sha256sum $P/share/big"
echo "run-status=$?"
echo run-end
sed 's/^/tvix-log /' /run/tvix.log | tail -20
"#;

#[test]
#[ignore = "needs TVIX_STORE_BIN, a tvix-store binary built outside this repository"]
fn their_daemon_as_our_store_in_the_test_host() {
    let tvix_store = tvix_store();
    let tvix_boot = assets::tvix_boot_static_once().unwrap();
    let files = qemu::binary_with_libraries(&tvix_store).unwrap();
    let script = SCRIPT
        .replace("{kernel}", GUEST_KERNEL)
        .replace("{tvix_store}", tvix_store.to_str().unwrap());
    let out = TestHost::builder()
        .tvix_boot(&tvix_boot)
        .memory_mib(2048)
        .run_checked(&script, &files, Duration::from_secs(600));
    let serial = &out.serial;
    let big_sha = serial
        .lines()
        .find_map(|l| l.strip_prefix("big-sha "))
        .unwrap_or_else(|| panic!("{out}"))
        .trim()
        .to_owned();
    let guest = out
        .between("run-begin", "run-end")
        .unwrap_or_else(|| panic!("{out}"));
    eprintln!("guest output:\n{guest}");
    assert!(guest.contains("hello-from-tvix-store"), "{out}");
    assert!(guest.contains(&big_sha), "{out}");
    assert!(serial.contains("run-status=0"), "{out}");
}
