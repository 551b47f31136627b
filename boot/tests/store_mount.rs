//! `tvix-boot store mount`: real tools on a real /dev/fuse mount see an imported tree exactly
//! as its source. Needs root and /dev/fuse; fails loudly without them.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

mod common;

use common::tvix_boot;

fn sh(script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh runs")
}

fn sh_ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn is_mounted(path: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    mounts.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

/// A running `store mount`, unmounted (by SIGTERM) when dropped.
struct Mount {
    child: Child,
    dir: PathBuf,
}

impl Mount {
    fn start(data_home: &Path, dir: &Path, flags: &[&str]) -> Self {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the mount tests need FUSE"
        );
        fs::create_dir_all(dir).unwrap();
        let child = tvix_boot(data_home)
            .args(["store", "mount"])
            .arg(dir)
            .args(flags)
            .spawn()
            .unwrap();
        let mut mount = Mount {
            child,
            dir: dir.to_owned(),
        };
        let started = Instant::now();
        while !is_mounted(dir) {
            if let Some(status) = mount.child.try_wait().unwrap() {
                panic!(
                    "store mount exited with {status} before mounting (root and /dev/fuse are needed)"
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "mount did not appear"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        mount
    }

    fn stop(mut self) {
        // SAFETY: kill sends a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "store mount exited with {status} on SIGTERM"
        );
        assert!(
            !is_mounted(&self.dir),
            "SIGTERM left {} mounted",
            self.dir.display()
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("share/empty")).unwrap();
    fs::create_dir_all(root.join("many")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("share/empty-file"), b"").unwrap();
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(root.join("share/big"), &big).unwrap();
    symlink("../bin/tool", root.join("share/tool-link")).unwrap();
    symlink("/nowhere/at/all", root.join("dangling")).unwrap();
    for i in 0..350 {
        fs::write(
            root.join(format!("many/entry-with-a-longish-name-{i:04}")),
            format!("{i}\n"),
        )
        .unwrap();
    }
}

#[test]
fn real_tools_see_the_imported_tree() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("tree");
    build_tree(&src);
    let out = tvix_boot(data.path())
        .arg("store")
        .arg("import")
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store_path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let basename = store_path.rsplit('/').next().unwrap().to_owned();

    let mnt = work.path().join("mnt");
    let mount = Mount::start(data.path(), &mnt, &["--list-root", "--show-xattr"]);
    let tree = mnt.join(&basename);
    let (src_s, tree_s) = (src.to_str().unwrap(), tree.to_str().unwrap());

    assert_eq!(sh_ok(&format!("ls {}", mnt.display())).trim(), basename);
    sh_ok(&format!("diff -r --no-dereference {src_s} {tree_s}"));
    // Names and types; file sizes and contents are compared by the checksums below.
    let listing = |dir: &str| sh_ok(&format!("cd {dir} && find . -printf '%p %y\\n' | sort"));
    assert!(
        listing(src_s) == listing(tree_s),
        "find sees a different tree"
    );
    let sums = |dir: &str| {
        sh_ok(&format!(
            "cd {dir} && find . -type f -print0 | sort -z | xargs -0 sha256sum"
        ))
    };
    assert_eq!(sums(src_s), sums(tree_s));
    assert_eq!(
        sh_ok(&format!("readlink {tree_s}/share/tool-link")),
        "../bin/tool\n"
    );
    assert_eq!(
        sh_ok(&format!("readlink {tree_s}/dangling")),
        "/nowhere/at/all\n"
    );
    assert_eq!(sh_ok(&format!("{tree_s}/share/tool-link")), "tool\n");
    assert_eq!(sh_ok(&format!("ls {tree_s}/many | wc -l")).trim(), "350");

    let stat = |path: &str| sh_ok(&format!("stat -c '%A %h %u %g %s %Y' {tree_s}/{path}"));
    assert_eq!(stat("bin/tool"), "-r-xr-xr-x 1 0 0 20 1\n");
    assert_eq!(stat("share/big"), "-r--r--r-- 1 0 0 3145745 1\n");
    assert!(
        stat("share").starts_with("dr-xr-xr-x "),
        "{}",
        stat("share")
    );
    assert!(
        sh_ok(&format!("ls -l {tree_s}/bin"))
            .contains("-r-xr-xr-x 1 root root 20 Jan  1  1970 tool")
    );

    let big = fs::read(src.join("share/big")).unwrap();
    let xattr = sh_ok(&format!(
        "getfattr --only-values -n user.tvix.castore.blob.digest {tree_s}/share/big"
    ));
    assert_eq!(xattr, tvix_boot_store::B3Digest::of(&big).to_string());
    let dir_xattr = sh_ok(&format!(
        "getfattr --only-values -n user.tvix.castore.directory.digest {tree_s}"
    ));
    assert!(dir_xattr.starts_with("b3:"), "{dir_xattr}");

    for write in [
        format!("touch {tree_s}/new"),
        format!("echo x > {tree_s}/share/empty-file"),
        format!("mkdir {tree_s}/d"),
        format!("rm {tree_s}/dangling"),
        format!("chmod 777 {tree_s}/bin/tool"),
        format!("setfattr -n user.x -v y {tree_s}/bin/tool"),
    ] {
        let out = sh(&write);
        assert!(
            !out.status.success(),
            "{write} succeeded on the read-only store"
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
            "{write}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let absent = sh(&format!(
        "stat {}/not-a-store-path {}/00000000000000000000000000000000-x",
        mnt.display(),
        mnt.display()
    ));
    assert!(
        String::from_utf8_lossy(&absent.stderr)
            .matches("No such file or directory")
            .count()
            == 2
    );
    mount.stop();

    // Without --list-root the root cannot be listed, but paths still resolve.
    let mount = Mount::start(data.path(), &mnt, &[]);
    let out = sh(&format!("ls {}", mnt.display()));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
    sh_ok(&format!("test -x {tree_s}/bin/tool"));
    let out = sh(&format!("getfattr -d {tree_s}/share/big"));
    assert!(out.stdout.is_empty(), "xattrs shown without --show-xattr");
    mount.stop();
}

/// Like other FUSE daemons, `store mount` ends when its file system is unmounted from
/// outside, cleanly and by itself.
#[test]
fn exits_when_unmounted_from_outside() {
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mnt = work.path().join("mnt");
    let mut mount = Mount::start(data.path(), &mnt, &["--threads", "3"]);
    sh_ok(&format!("umount {}", mnt.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = mount.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "store mount still runs 10 s after its file system was unmounted"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "store mount exited with {status}");
    assert!(!is_mounted(&mnt));
}
