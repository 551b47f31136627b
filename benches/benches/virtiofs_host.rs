//! The store's file system through a host /dev/fuse mount (`tvix-boot store mount`): sequential
//! read throughput of a large file, and lookups+stats per second over a tree of 10,000 files.
//! The same operations on the source directory (ext4, page cache) are printed beside them.
//!
//! Run (as root, /dev/fuse needed): `cargo build --release -p tvix-boot && cargo bench -p
//! tvix-boot-benches --bench virtiofs_host`

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const LARGE_FILE_MIB: usize = 512;
const FILES: usize = 10_000;

/// $TVIX_BOOT_BIN, else the workspace's release build (`cargo build --release -p tvix-boot`).
fn tvix_boot() -> Command {
    let bin = std::env::var_os("TVIX_BOOT_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tvix-boot")
        });
    assert!(
        bin.is_file(),
        "{} is missing: run cargo build --release -p tvix-boot first",
        bin.display()
    );
    Command::new(bin)
}

fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("files")).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut data = Vec::with_capacity(LARGE_FILE_MIB << 20);
    for i in 0..LARGE_FILE_MIB {
        block
            .iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (i ^ j ^ (j >> 11)) as u8);
        data.extend_from_slice(&block);
    }
    fs::write(root.join("large"), &data).unwrap();
    for i in 0..FILES {
        let dir = root.join(format!("files/d{:02}", i % 100));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
}

fn sequential_read(path: &Path) -> f64 {
    let mut file = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    let mut total = 0usize;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, LARGE_FILE_MIB << 20);
    total as f64 / 1e6 / started.elapsed().as_secs_f64()
}

fn lookups_and_stats(root: &Path) -> f64 {
    let started = Instant::now();
    for i in 0..FILES {
        let meta = fs::symlink_metadata(root.join(format!("files/d{:02}/f{i}", i % 100))).unwrap();
        assert!(meta.len() > 0);
    }
    FILES as f64 / started.elapsed().as_secs_f64()
}

fn drop_caches() {
    // The kernel's page and dentry caches would answer repeated runs without asking FUSE.
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

struct Mount(Child, std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: kill sends SIGTERM to our own child process.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
        // tvix-boot unmounts on SIGTERM; this only cleans up after a crash.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.1)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn main() {
    tvix_boot_benches::bench_mode_only("virtiofs_host");
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("tree");
    build_tree(&src);
    let data = work.path().join("data");
    let out = tvix_boot()
        .env("XDG_DATA_HOME", &data)
        .arg("store")
        .arg("import")
        .arg(&src)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store_path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let child = tvix_boot()
        .env("XDG_DATA_HOME", &data)
        .arg("store")
        .arg("mount")
        .arg(&mnt)
        .spawn()
        .unwrap();
    let _mount = Mount(child, mnt.clone());
    let tree = mnt.join(store_path.trim_start_matches("/nix/store/"));
    let started = Instant::now();
    while !tree.join("large").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "mount did not appear"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    for run in 1..=3 {
        drop_caches();
        let fuse_read = sequential_read(&tree.join("large"));
        drop_caches();
        let fuse_stats = lookups_and_stats(&tree);
        drop_caches();
        let src_read = sequential_read(&src.join("large"));
        drop_caches();
        let src_stats = lookups_and_stats(&src);
        println!(
            "run {run}: sequential read {fuse_read:.0} MB/s (source dir {src_read:.0} MB/s); \
             lookup+stat {fuse_stats:.0}/s (source dir {src_stats:.0}/s)"
        );
    }
}
