//! Time to first byte of a 1 GiB blob through the host FUSE mount (`tvix-boot store
//! mount`), and what reading all of it costs: the first read in a fresh process (nothing
//! verified yet) and a second one (the blob known good, read straight from its file).
//!
//! Each round starts a fresh mount, so the process's verified-blob cache is cold, and
//! drops the kernel's caches first (`echo 3 > /proc/sys/vm/drop_caches`), so neither the
//! mount's pages nor the blob file's are cached. Time to first byte is open + a 4 KiB read.
//! The full reads are then repeated with the blob file in the page cache (a fresh mount,
//! then the mount's own pages dropped with fadvise), which leaves out the disk.
//! Also printed: how long `tvix-boot store import` of the 1 GiB file took.
//!
//! Run (as root, /dev/fuse needed): `cargo build --release -p tvix-boot && cargo bench -p
//! tvix-boot-benches --bench blob_first_byte`. TVIX_BOOT_BIN picks another binary (to
//! compare builds side by side); BLOB_BENCH_ROUNDS the number of rounds (default 5).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tvix_boot_benches::median;

const BLOB_MIB: usize = 1024;

/// $TVIX_BOOT_BIN, else the workspace's release build (`cargo build --release -p tvix-boot`).
fn tvix_boot() -> Command {
    let bin = std::env::var_os("TVIX_BOOT_BIN")
        .map(PathBuf::from)
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

/// 1 GiB of bytes that differ from one MiB to the next.
fn write_blob(path: &Path) {
    let mut out = fs::File::create(path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    for i in 0..BLOB_MIB {
        block
            .iter_mut()
            .enumerate()
            .for_each(|(j, b)| *b = (i ^ j ^ (j >> 11)) as u8);
        block[..8].copy_from_slice(&(i as u64).to_le_bytes());
        out.write_all(&block).unwrap();
    }
}

fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3")
        .expect("drop_caches needs root: this benchmark measures cold reads");
}

struct Mount(Child, PathBuf);

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

fn mount(data: &Path, mnt: &Path, file: &Path) -> Mount {
    let child = tvix_boot()
        .env("XDG_DATA_HOME", data)
        .arg("store")
        .arg("mount")
        .arg(mnt)
        .spawn()
        .unwrap();
    let mount = Mount(child, mnt.to_owned());
    let started = Instant::now();
    // A lookup and a getattr: neither opens the blob.
    while !file.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "mount did not appear"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    mount
}

/// Drops the mount's cached pages of `path` (not those of the blob file behind it), so the
/// next read asks the file system again.
fn forget_pages(path: &Path) {
    let file = fs::File::open(path).unwrap();
    // SAFETY: fadvise only reads the descriptor, which `file` keeps open.
    let rc = unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0, "posix_fadvise failed");
}

/// Opens and reads all of `path`; how long that took.
fn read_all(path: &Path, buf: &mut [u8]) -> Duration {
    let started = Instant::now();
    let mut file = fs::File::open(path).unwrap();
    assert_eq!(read_rest(&mut file, buf), BLOB_MIB << 20);
    started.elapsed()
}

/// Reads `file` to its end from where it is; returns the bytes read.
fn read_rest(file: &mut fs::File, buf: &mut [u8]) -> usize {
    let mut total = 0;
    loop {
        let n = file.read(buf).unwrap();
        if n == 0 {
            return total;
        }
        total += n;
    }
}

fn main() {
    tvix_boot_benches::bench_mode_only("blob_first_byte");
    let rounds: usize = std::env::var("BLOB_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("large");
    write_blob(&src);
    let data = work.path().join("data");
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let started = Instant::now();
    let out = tvix_boot()
        .env("XDG_DATA_HOME", &data)
        .arg("store")
        .arg("import")
        .arg(&src)
        .output()
        .unwrap();
    let import = started.elapsed();
    assert!(
        out.status.success(),
        "import failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let size = (BLOB_MIB << 20) as f64;
    println!(
        "import of the 1 GiB file: {:.2} s, {:.0} MB/s (source in the page cache, store flushed)",
        import.as_secs_f64(),
        size / 1e6 / import.as_secs_f64()
    );
    let store_path = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mnt = work.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let file = mnt.join(store_path.trim_start_matches("/nix/store/"));

    let mut buf = vec![0u8; 1 << 20];
    let mut results: [Vec<f64>; 5] = Default::default();
    let mbs = |elapsed: Duration| size / 1e6 / elapsed.as_secs_f64();
    for round in 1..=rounds {
        let mount_cold = mount(&data, &mnt, &file);
        drop_caches();
        let started = Instant::now();
        let mut blob = fs::File::open(&file).unwrap();
        let n = blob.read(&mut buf[..4096]).unwrap();
        let first_byte = started.elapsed();
        assert_eq!(n, 4096);
        assert_eq!(n + read_rest(&mut blob, &mut buf), BLOB_MIB << 20);
        let cold_first = started.elapsed();
        drop(blob);
        // The same process: the blob is known good by now (or while this runs).
        drop_caches();
        let cold_again = read_all(&file, &mut buf);
        drop(mount_cold);

        // The blob file in the page cache, so the disk is out of it: what is left is
        // hashing and copying. A fresh process, then the same one again.
        let mount_hot = mount(&data, &mnt, &file);
        let hot_first = read_all(&file, &mut buf);
        forget_pages(&file);
        let hot_again = read_all(&file, &mut buf);
        drop(mount_hot);

        let sample = [
            first_byte.as_secs_f64() * 1e3,
            mbs(cold_first),
            mbs(cold_again),
            mbs(hot_first),
            mbs(hot_again),
        ];
        println!(
            "round {round}: first byte {:.2} ms; full read, page cache dropped: {:.0} MB/s in a \
             fresh mount, {:.0} MB/s again; blob file cached: {:.0} MB/s in a fresh mount, \
             {:.0} MB/s again",
            sample[0], sample[1], sample[2], sample[3], sample[4]
        );
        for (result, value) in results.iter_mut().zip(sample) {
            result.push(value);
        }
    }
    let [first, cold_first, cold_again, hot_first, hot_again] = results.map(median);
    println!(
        "median of {rounds}: first byte {first:.2} ms; full read, page cache dropped: \
         {cold_first:.0} MB/s in a fresh mount, {cold_again:.0} MB/s again; blob file cached: \
         {hot_first:.0} MB/s in a fresh mount, {hot_again:.0} MB/s again"
    );
}
