//! `tvix-boot store daemon` told to stop (SIGTERM) while a client is in the middle of a
//! large read: `tvix-boot store export-nar` of a path with a 72 MiB file over grpc+unix,
//! its NAR read slowly through a pipe, so that most of the blob's chunks are asked for
//! after the signal.
//!
//! - The client still gets the whole NAR, byte for byte the local one; no new client
//!   gets in meanwhile; the daemon exits 0 when that client has gone, well before the
//!   grace time.
//! - A client that stops reading holds the daemon for the grace time and a few seconds
//!   more at most: then the daemon exits 0 and the client fails, having written only
//!   right bytes.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, tvix_boot};

const FILE_MIB: usize = 72;
/// What a slow reader takes per step, and how long it waits between steps: 72 MiB in
/// about 4 s, so that the client asks for most chunks after the signal.
const SLOW_STEP: usize = 1 << 20;
const SLOW_PAUSE: Duration = Duration::from_millis(50);

/// A path with one 72 MiB file (different bytes in every MiB) in a store of its own, and
/// its NAR as the local store writes it.
fn store_with_a_large_path(work: &Path) -> (std::path::PathBuf, String, Vec<u8>) {
    let tree = work.join("large-tree");
    std::fs::create_dir_all(&tree).unwrap();
    let mut contents = vec![0u8; FILE_MIB << 20];
    for (i, b) in contents.iter_mut().enumerate() {
        *b = (i ^ (i >> 8) ^ (i >> 20).wrapping_mul(77)) as u8;
    }
    std::fs::write(tree.join("large"), &contents).unwrap();
    std::fs::write(tree.join("small"), b"small\n").unwrap();
    let data = work.join("data");
    let import = tvix_boot(&data)
        .args(["store", "import"])
        .arg(&tree)
        .output()
        .unwrap();
    assert!(import.status.success(), "{import:?}");
    let path = String::from_utf8(import.stdout).unwrap().trim().to_owned();
    let local = tvix_boot(&data)
        .args(["store", "export-nar", &path])
        .output()
        .unwrap();
    assert!(local.status.success(), "{local:?}");
    assert!(local.stdout.len() > FILE_MIB << 20);
    (data, path, local.stdout)
}

struct Daemon {
    child: Child,
    log: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Daemon {
    /// Starts a daemon on `socket` and waits until it serves.
    fn start(data: &Path, socket: &Path, grace: &str) -> Daemon {
        let mut child = tvix_boot(data)
            .args(["store", "daemon", "--shutdown-grace", grace, "--listen"])
            .arg(socket)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        assert!(first.contains("serving the store over gRPC"), "{first}");
        let log = std::thread::spawn(move || stderr.lines().map_while(Result::ok).collect());
        Daemon {
            child,
            log: Some(log),
        }
    }

    fn terminate(&self) {
        // SAFETY: kill(2) on our own child, not reaped yet.
        let sent = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(sent, 0, "kill(SIGTERM) of the daemon");
    }

    /// Its stderr after the first line, once it has exited.
    fn log(&mut self) -> Vec<String> {
        self.log
            .take()
            .map(|log| log.join().unwrap())
            .unwrap_or_default()
    }

    /// Waits for the daemon to exit, at most `deadline` from now; its status and log.
    fn wait(mut self, deadline: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log());
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the daemon was still running {deadline:?} later; its log: {:?}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn export_over_grpc(socket: &Path, path: &str) -> Child {
    let url = format!("grpc+unix://{}", socket.display());
    Command::new(BIN)
        .env("XDG_DATA_HOME", "/nonexistent")
        .env("BLOB_SERVICE_ADDR", &url)
        .env("DIRECTORY_SERVICE_ADDR", &url)
        .env("PATH_INFO_SERVICE_ADDR", &url)
        .args(["store", "export-nar", path])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn read_some(stdout: &mut ChildStdout, out: &mut Vec<u8>, up_to: usize) {
    let mut buf = vec![0u8; up_to];
    let mut got = 0;
    while got < up_to {
        match stdout.read(&mut buf[got..]).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    out.extend_from_slice(&buf[..got]);
}

#[test]
fn sigterm_lets_a_client_mid_export_finish_then_the_daemon_exits_0() {
    let work = tempfile::tempdir().unwrap();
    let (data, path, local) = store_with_a_large_path(work.path());
    let socket = work.path().join("daemon.sock");
    // A grace far longer than the export: the daemon must leave when its client has
    // gone, not when the grace ends.
    let daemon = Daemon::start(&data, &socket, "120s");

    let mut client = export_over_grpc(&socket, &path);
    let mut stdout = client.stdout.take().unwrap();
    let mut nar = Vec::new();
    read_some(&mut stdout, &mut nar, 4 << 20);
    assert_eq!(nar.len(), 4 << 20, "the export started");

    daemon.terminate();
    let signalled = Instant::now();
    // No new clients: the socket goes away at once.
    while socket.exists() {
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "the socket is still there 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_err());

    let mut daemon = daemon;
    loop {
        let before = nar.len();
        read_some(&mut stdout, &mut nar, SLOW_STEP);
        if nar.len() == before {
            break;
        }
        assert!(
            daemon.child.try_wait().unwrap().is_none() || nar.len() == local.len(),
            "the daemon exited with its client {} bytes into the NAR",
            nar.len()
        );
        std::thread::sleep(SLOW_PAUSE);
    }
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let client_status = client.wait().unwrap();
    let client_done = signalled.elapsed();
    assert!(client_status.success(), "the client failed: {stderr}");
    assert!(
        client_done > Duration::from_secs(1),
        "the client finished {client_done:?} after the signal: too soon to show anything"
    );
    assert_eq!(nar.len(), local.len(), "the whole NAR");
    assert!(nar == local, "the NAR over gRPC differs from the local one");

    let (status, log) = daemon.wait(Duration::from_secs(20));
    assert!(
        status.success(),
        "the daemon's exit: {status:?}; log: {log:?}"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(60),
        "the daemon waited for its grace time, not for its client"
    );
    assert!(
        log.iter().any(|l| l.contains("signal 15")),
        "the daemon says it got the signal: {log:?}"
    );
}

#[test]
fn a_client_that_stops_reading_is_cut_off_after_the_grace_time() {
    let work = tempfile::tempdir().unwrap();
    let (data, path, local) = store_with_a_large_path(work.path());
    let socket = work.path().join("daemon.sock");
    let daemon = Daemon::start(&data, &socket, "2s");

    let mut client = export_over_grpc(&socket, &path);
    let mut stdout = client.stdout.take().unwrap();
    let mut nar = Vec::new();
    read_some(&mut stdout, &mut nar, 1 << 20);
    assert_eq!(nar.len(), 1 << 20, "the export started");
    // The client now blocks writing to its full pipe, its read-ahead streams waiting
    // on the daemon's side.
    std::thread::sleep(Duration::from_millis(500));
    daemon.terminate();
    let signalled = Instant::now();
    let (status, log) = daemon.wait(Duration::from_secs(30));
    let stopped_after = signalled.elapsed();
    assert!(
        status.success(),
        "the daemon's exit: {status:?}; log: {log:?}"
    );
    assert!(
        stopped_after >= Duration::from_secs(2),
        "the daemon left {stopped_after:?} after the signal, before the grace time: {log:?}"
    );
    assert!(
        log.iter().any(|l| l.contains("still connected")),
        "the daemon says it is cutting clients off: {log:?}"
    );

    stdout.read_to_end(&mut nar).unwrap();
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let client_status = client.wait().unwrap();
    assert!(
        !client_status.success(),
        "the client got {} of {} bytes and succeeded",
        nar.len(),
        local.len()
    );
    assert!(
        nar.len() < local.len() && nar[..] == local[..nar.len()],
        "what the client wrote before failing is the NAR's start ({} bytes)",
        nar.len()
    );
    assert!(!stderr.trim().is_empty(), "the client says why it failed");
}
