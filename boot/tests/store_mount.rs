//! `tvix-boot store mount`: real tools on a real /dev/fuse mount see an imported tree exactly
//! as its source. Needs root and /dev/fuse; fails loudly without them.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::tvix_boot;
use tvix_boot_tests::nix::{CacheKey, run};

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
        Self::start_with(tvix_boot(data_home), dir, flags)
    }

    /// `command` is tvix-boot with its store set up; this adds the subcommand.
    fn start_with(mut command: Command, dir: &Path, flags: &[&str]) -> Self {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the mount tests need FUSE"
        );
        fs::create_dir_all(dir).unwrap();
        let child = command
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

/// Holds up to 19,000 handles of `file` open in a bash process (its descriptor limit is
/// 20,000 here): prints `held N`, or the error that stopped it first, then waits until
/// its stdin closes.
const HOLD_OPEN: &str = r#"
ulimit -n 20000
held=0
while [ $held -lt 19000 ]; do
  if ! exec {fd}<"$1"; then break; fi
  held=$((held + 1))
done
echo "held $held"
read -r _
"#;

/// The VMM's descriptors and memory must not follow what a guest (here: the host's FUSE
/// client, the same file system) keeps open: one file opened 266,000 times by 14
/// processes (past the handle limit), then 2,000 different files, then the tree walked
/// three times.
#[test]
fn descriptors_and_memory_stay_bounded_however_much_is_opened() {
    use tvix_boot_virtiofs::fs::{MAX_OPEN_FILES, OPEN_BLOBS};
    const HOLDERS: usize = 14;
    const HELD_EACH: usize = 19_000; // HOLD_OPEN's count (a process may hold 20,000 here)
    const {
        assert!(
            HOLDERS * HELD_EACH > MAX_OPEN_FILES,
            "the holders must reach the limit"
        )
    };
    const DISTINCT: usize = 2_000;
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("tree");
    fs::create_dir_all(&src).unwrap();
    for i in 0..DISTINCT {
        fs::write(src.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    let out = tvix_boot(data.path())
        .args(["store", "import"])
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success());
    let basename = String::from_utf8(out.stdout).unwrap().trim()["/nix/store/".len()..].to_owned();
    let mnt = work.path().join("mnt");
    let mount = Mount::start(data.path(), &mnt, &[]);
    let tree = mnt.join(&basename);

    let pid = mount.child.id();
    let fds = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let rss_kib = || -> u64 {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    fs::read(tree.join("f0")).unwrap();
    let (fds_before, rss_before) = (fds(), rss_kib());

    let mut holders: Vec<Child> = (0..HOLDERS)
        .map(|_| {
            Command::new("bash")
                .args(["-c", HOLD_OPEN, "hold-open"])
                .arg(tree.join("f1"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut held = 0;
    for holder in &mut holders {
        let mut line = String::new();
        BufReader::new(holder.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        held += line
            .trim()
            .strip_prefix("held ")
            .unwrap()
            .parse::<usize>()
            .unwrap();
    }
    let (fds_same_file, rss_same_file) = (fds(), rss_kib());
    let mut refusals = String::new();
    for mut holder in holders {
        drop(holder.stdin.take());
        let out = holder.wait_with_output().unwrap();
        refusals.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(
        held, MAX_OPEN_FILES,
        "opens up to the limit succeed: {refusals}"
    );
    assert!(
        refusals.contains("Too many open files in system"),
        "past the limit the guest gets ENFILE: {refusals}"
    );
    assert!(
        fds_same_file <= fds_before + 1,
        "one blob open {MAX_OPEN_FILES} times holds one descriptor: {fds_before} -> {fds_same_file}"
    );

    let mut files: Vec<fs::File> = (0..DISTINCT)
        .map(|i| fs::File::open(tree.join(format!("f{i}"))).unwrap())
        .collect();
    let fds_distinct = fds();
    assert!(
        fds_distinct <= fds_before + OPEN_BLOBS,
        "{DISTINCT} open blobs hold at most {OPEN_BLOBS} descriptors: {fds_before} -> {fds_distinct}"
    );
    // Handles whose blob left the cache read the right bytes all the same.
    for (i, file) in files.iter_mut().enumerate() {
        let mut text = String::new();
        file.read_to_string(&mut text).unwrap();
        assert_eq!(text, format!("file {i}\n"));
    }
    drop(files);
    for _ in 0..3 {
        sh_ok(&format!(
            "find {} -type f -exec cat {{}} + > /dev/null",
            tree.display()
        ));
    }
    let (fds_after, rss_after) = (fds(), rss_kib());
    eprintln!(
        "store mount: fds {fds_before} -> {fds_same_file} ({MAX_OPEN_FILES} handles of one file) \
         -> {fds_distinct} ({DISTINCT} files open) -> {fds_after} (after 3 walks); \
         RSS {rss_before} -> {rss_same_file} -> {rss_after} KiB"
    );
    assert!(fds_after <= fds_before + OPEN_BLOBS);
    assert!(
        rss_same_file < rss_before + 64 * 1024 && rss_after < rss_before + 64 * 1024,
        "RSS grew more than 64 MiB: {rss_before} -> {rss_same_file} -> {rss_after} KiB"
    );
    mount.stop();
}

/// A name that looks like a store path but is in no store is remembered as missing for a
/// while: lookups of it then ask neither the path-info service nor the binary cache.
#[test]
fn missing_paths_are_not_asked_for_again_until_their_time_is_up() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("late");
    fs::write(&src, "arrived late\n").unwrap();
    let added = run(Command::new("nix-store").arg("--add").arg(&src));
    let store_path = String::from_utf8(added.stdout).unwrap().trim().to_owned();
    let basename = store_path.trim_start_matches("/nix/store/").to_owned();
    let key = CacheKey::generate(work.path(), "missing-test-1");
    let cache = work.path().join("cache");
    fs::create_dir_all(&cache).unwrap();
    let mut command = tvix_boot(&work.path().join("data"));
    command.env("PATH_INFO_SERVICE_ADDR", key.file_cache_address(&cache));
    let mnt = work.path().join("mnt");
    let mount = Mount::start_with(command, &mnt, &[]);
    let path = mnt.join(&basename);
    assert!(!path.exists(), "not in the cache yet");
    let looked_up = Instant::now();

    // Now the cache has it; the mount does not look again before the time is up.
    key.copy_to(&cache, &[&store_path]);
    assert!(!path.exists(), "looked up again within the time");
    let ttl = Duration::from_secs(30); // StoreFs's MISSING_PATH_TTL
    assert!(looked_up.elapsed() < ttl, "the test itself took too long");
    std::thread::sleep(ttl.saturating_sub(looked_up.elapsed()) + Duration::from_secs(1));
    assert_eq!(fs::read_to_string(&path).unwrap(), "arrived late\n");
    mount.stop();
}
