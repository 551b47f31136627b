//! Reading a 1 GiB blob through `tvix-boot store daemon` over grpc+unix, against reading
//! it from the local store: `tvix-boot store export-nar` of a store path that is that one
//! file, its NAR (the blob's bytes plus 100-odd bytes of framing) to /dev/null, in a
//! fresh process each time. Both read every byte through the store's checks: local
//! reads against the blob's outboard (and then its whole-blob hash), remote ones chunk by
//! chunk against the outboard the daemon sends. The blob's file is in the page cache for
//! both (one warm-up of each first). Goal: grpc+unix at least 50 % of local.
//!
//! Run: `cargo build --release -p tvix-boot && cargo bench -p tvix-boot-benches --bench
//! grpc_blob_read`. TVIX_BOOT_BIN picks another binary; GRPC_BENCH_ROUNDS the rounds
//! (default 3).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tvix_boot_benches::median;

const BLOB_MIB: usize = 1024;

fn bin() -> PathBuf {
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
    bin
}

fn tvix_boot(data_home: &Path) -> Command {
    let mut cmd = Command::new(bin());
    cmd.env("XDG_DATA_HOME", data_home)
        .env_remove("BLOB_SERVICE_ADDR")
        .env_remove("DIRECTORY_SERVICE_ADDR")
        .env_remove("PATH_INFO_SERVICE_ADDR");
    cmd
}

fn export(mut cmd: Command, path: &str) -> Duration {
    let started = Instant::now();
    let status = cmd
        .args(["store", "export-nar", path])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    started.elapsed()
}

fn main() {
    tvix_boot_benches::bench_mode_only("grpc_blob_read");
    let rounds: usize = std::env::var("GRPC_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("one-gib");
    {
        use std::io::Write;
        let mut out = std::fs::File::create(&file).unwrap();
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
    let data = work.path().join("data");
    let import = tvix_boot(&data)
        .args(["store", "import"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(import.status.success());
    let path = String::from_utf8(import.stdout).unwrap().trim().to_owned();
    std::fs::remove_file(&file).unwrap();

    let socket = work.path().join("daemon.sock");
    let mut daemon = tvix_boot(&data)
        .args(["store", "daemon", "--listen"])
        .arg(&socket)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(daemon.stderr.take().unwrap());
    let mut line = String::new();
    log.read_line(&mut line).unwrap();
    // Drained, so the daemon's lines about clients never meet a closed pipe.
    std::thread::spawn(move || for _ in log.lines() {});
    let url = format!("grpc+unix://{}", socket.display());
    let remote = || {
        let mut cmd = tvix_boot(Path::new("/nonexistent"));
        cmd.env("BLOB_SERVICE_ADDR", &url)
            .env("DIRECTORY_SERVICE_ADDR", &url)
            .env("PATH_INFO_SERVICE_ADDR", &url);
        cmd
    };
    // Warm-up: the page cache, and the daemon's chunk list of the blob.
    export(tvix_boot(&data), &path);
    export(remote(), &path);
    let mut local = Vec::new();
    let mut grpc = Vec::new();
    for _ in 0..rounds {
        local.push(export(tvix_boot(&data), &path).as_secs_f64());
        grpc.push(export(remote(), &path).as_secs_f64());
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    let mbps = |secs: f64| (BLOB_MIB as f64 * 1.048576) / secs;
    let (l, g) = (median(local.clone()), median(grpc.clone()));
    println!("1 GiB blob, export-nar in a fresh process, median of {rounds}:");
    println!(
        "  local store:  {:7.1} MB/s  ({l:.2} s; {local:.2?})",
        mbps(l)
    );
    println!(
        "  grpc+unix:    {:7.1} MB/s  ({g:.2} s; {grpc:.2?})",
        mbps(g)
    );
    println!(
        "  grpc+unix / local: {:.0} % (goal: at least 50 %)",
        100.0 * l / g
    );
}
