//! Load on `tvix-boot store daemon` (on the build machine, no test host): 16 client
//! processes at once, each `tvix-boot store export-nar` of one store path over
//! grpc+unix, which reads its 64 MiB of blobs and walks its 10,000 directories. One
//! client is slow at first, one is killed mid-stream. Every other client's NAR must be
//! byte for byte the local one, and the daemon's peak resident memory is reported
//! (goal: below 100 MiB; the test fails above 200 MiB).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tvix_boot_tests::assets;

const CLIENTS: usize = 16;
const DIRECTORIES: usize = 10_000;
const BLOB_MIB: usize = 64;
const DEADLINE: Duration = Duration::from_secs(900);

/// A checksum of a byte stream, fed in pieces of any size (SipHash streams): enough to
/// tell whether a client got the local NAR's bytes, without holding 16 copies.
#[derive(Default)]
struct Checksum(std::hash::DefaultHasher, usize);

impl Checksum {
    fn update(&mut self, data: &[u8]) {
        std::hash::Hasher::write(&mut self.0, data);
        self.1 += data.len();
    }
    fn finish(&self) -> (u64, usize) {
        (std::hash::Hasher::finish(&self.0), self.1)
    }
}

/// 10,000 directories (100 groups of 99 and the groups themselves, each with a small
/// file) and 16 files of 4 MiB, all different.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root).unwrap();
    let groups = 100;
    let per_group = DIRECTORIES / groups - 1;
    for g in 0..groups {
        let group = root.join(format!("g{g:03}"));
        std::fs::create_dir(&group).unwrap();
        std::fs::write(group.join("id"), format!("group {g}\n")).unwrap();
        for d in 0..per_group {
            let dir = group.join(format!("d{d:03}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("f"), format!("{g}/{d}\n")).unwrap();
        }
    }
    let blobs = root.join("blobs");
    std::fs::create_dir(&blobs).unwrap();
    let mut block = vec![0u8; 4 << 20];
    for i in 0..BLOB_MIB / 4 {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (i.wrapping_mul(131) ^ j ^ (j >> 9) ^ (j >> 17)) as u8;
        }
        std::fs::write(blobs.join(format!("blob{i:02}")), &block).unwrap();
    }
}

fn tvix_boot(bin: &Path, data_home: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env("XDG_DATA_HOME", data_home)
        .env_remove("BLOB_SERVICE_ADDR")
        .env_remove("DIRECTORY_SERVICE_ADDR")
        .env_remove("PATH_INFO_SERVICE_ADDR");
    cmd
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sixteen_clients_at_once_one_slow_one_killed() {
    let bin: PathBuf = assets::tvix_boot_static_once().unwrap_or_else(|e| panic!("{e}"));
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("load-tree");
    make_tree(&tree);
    let data = work.path().join("data");
    let import = tvix_boot(&bin, &data)
        .args(["store", "import"])
        .arg(&tree)
        .output()
        .unwrap();
    assert!(import.status.success(), "{import:?}");
    let path = String::from_utf8(import.stdout).unwrap().trim().to_owned();
    let local = tvix_boot(&bin, &data)
        .args(["store", "export-nar", &path])
        .output()
        .unwrap();
    assert!(local.status.success());
    let mut checksum = Checksum::default();
    checksum.update(&local.stdout);
    let expected = checksum.finish();
    let nar_len = local.stdout.len();
    assert!(nar_len > BLOB_MIB << 20);

    let socket = work.path().join("daemon.sock");
    let mut daemon = tvix_boot(&bin, &data)
        .args(["store", "daemon", "--listen"])
        .arg(&socket)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut daemon_log = BufReader::new(daemon.stderr.take().unwrap());
    let mut line = String::new();
    daemon_log.read_line(&mut line).unwrap();
    assert!(line.contains("serving the store over gRPC"), "{line}");
    let daemon = Daemon(daemon);
    let daemon_pid = daemon.0.id();
    let log_lines = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in daemon_log.lines().map_while(Result::ok) {
            lines.push(line);
        }
        lines
    });

    let url = format!("grpc+unix://{}", socket.display());
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut child = Command::new(&bin)
            .env("XDG_DATA_HOME", "/nonexistent")
            .env("BLOB_SERVICE_ADDR", &url)
            .env("DIRECTORY_SERVICE_ADDR", &url)
            .env("PATH_INFO_SERVICE_ADDR", &url)
            .args(["store", "export-nar", &path])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let pid = child.id();
        clients.push(std::thread::spawn(move || {
            let mut out = Checksum::default();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                if i == 1 && out.1 < (8 << 20) {
                    // Slow for its first 8 MiB: 1 MiB a second.
                    std::thread::sleep(Duration::from_millis(60));
                }
                if i == 0 && out.1 > nar_len / 3 {
                    // SAFETY: kill(2) on our own child, not reaped yet.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    let _ = child.wait();
                    return (i, None);
                }
                match stdout.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.update(&buf[..n]),
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            let status = child.wait().unwrap();
            assert!(status.success(), "client {i} failed: {err}");
            (i, Some(out.finish()))
        }));
    }
    for client in clients {
        let (i, hash) = client.join().unwrap();
        assert!(started.elapsed() < DEADLINE);
        match hash {
            None => assert_eq!(i, 0),
            Some(hash) => assert_eq!(hash, expected, "client {i} got other bytes"),
        }
    }
    let elapsed = started.elapsed();
    let peak_kib = peak_rss_kib(daemon_pid);
    // SAFETY: kill(2) on our own child, not reaped yet.
    unsafe { libc::kill(daemon_pid as i32, libc::SIGTERM) };
    let mut daemon = daemon;
    let status = daemon.0.wait().unwrap();
    let log = log_lines.join().unwrap();
    eprintln!(
        "grpc-load: {CLIENTS} clients x ({BLOB_MIB} MiB of blobs, {DIRECTORIES} directories, \
         NAR {nar_len} bytes) in {elapsed:.1?}; daemon peak RSS {:.1} MiB",
        peak_kib as f64 / 1024.0
    );
    assert!(
        status.success(),
        "SIGTERM ends the daemon with 0: {status:?}"
    );
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("client connected"))
            .count(),
        CLIENTS,
        "one line per client: {log:?}"
    );
    assert!(
        peak_kib < 200 << 10,
        "the daemon's peak RSS was {peak_kib} KiB"
    );
}
