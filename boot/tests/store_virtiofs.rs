//! `tvix-boot store virtiofs`: the vhost-user-fs backend's behaviour towards its socket,
//! its frontends and signals, on the build machine. The frontends are raw vhost-user
//! messages (malformed on purpose) and the real peer, QEMU, under TCG here (the test-host
//! test in tests/tests/e2e/vhost_user_fs.rs runs it with KVM). Fails loudly when QEMU, the
//! guest kernel or busybox is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tvix_boot_tests::nix::{CacheKey, run};
use tvix_boot_tests::tree::{LIST_TREE, MAKE_TREE, TREE_ENTRIES, lines_with};
use tvix_boot_tests::{Initramfs, assets, qemu};

mod common;

use common::tvix_boot;

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `store virtiofs`, its stderr collected; killed when dropped.
struct Backend {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Backend {
    fn start(data_home: &Path, socket: &Path, flags: &[&str]) -> Self {
        Self::spawn(tvix_boot(data_home), socket, flags)
    }

    /// `command` is tvix-boot with its store set up; this adds the subcommand.
    fn spawn(mut command: Command, socket: &Path, flags: &[&str]) -> Self {
        let mut child = command
            .args(["store", "virtiofs", "--socket"])
            .arg(socket)
            .args(flags)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let backend = Backend { child, log };
        backend.wait_for_log("serving the store", 1);
        assert!(
            std::fs::symlink_metadata(socket)
                .unwrap()
                .file_type()
                .is_socket(),
            "the socket exists once the backend says it serves"
        );
        backend
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `needle` has appeared `count` times in the backend's stderr.
    fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        while self.log().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "backend did not log {needle:?} {count} times; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Open descriptors and threads of the backend process, once they have settled (the
    /// next session's queue threads start right after the previous session's end).
    fn resources(&self) -> (usize, usize) {
        let count = |dir: String| std::fs::read_dir(dir).unwrap().count();
        let pid = self.child.id();
        let sample = || {
            (
                count(format!("/proc/{pid}/fd")),
                count(format!("/proc/{pid}/task")),
            )
        };
        let mut last = sample();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = sample();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        let sent = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(sent, 0);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "backend ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `store virtiofs --socket SOCKET FLAGS...`, which must refuse to start: exit status 1.
/// Returns its stderr.
fn refused(data_home: &Path, socket: &Path, flags: &[&str]) -> String {
    let out = tvix_boot(data_home)
        .args(["store", "virtiofs", "--socket"])
        .arg(socket)
        .args(flags)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    stderr
}

#[test]
fn socket_is_private_and_sigterm_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vfs.sock");
    let mut backend = Backend::start(dir.path(), &socket, &["--threads", "1"]);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // SAFETY: getuid takes nothing and cannot fail.
    let uid = unsafe { libc::getuid() };
    assert_eq!(meta.uid(), uid);
    assert!(backend.terminate().success(), "{}", backend.log());
    assert!(!socket.exists(), "SIGTERM leaves no socket behind");
    assert!(
        backend.log().contains("socket removed"),
        "{}",
        backend.log()
    );

    // A group may connect too: mode 0660 and that group. Debian's nogroup is 65534.
    let mut backend = Backend::start(dir.path(), &socket, &["--socket-group", "nogroup"]);
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    assert!(backend.terminate().success());

    let stderr = refused(
        dir.path(),
        &socket,
        &["--socket-group", "no-such-group-here"],
    );
    assert!(
        stderr.contains("\"no-such-group-here\": no such group"),
        "{stderr}"
    );
    assert!(!socket.exists());
}

#[test]
fn refuses_to_replace_a_file_or_a_served_socket() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious");
    std::fs::write(&file, "keep me").unwrap();
    let stderr = refused(dir.path(), &file, &[]);
    assert!(stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    let socket = dir.path().join("vfs.sock");
    let _first = Backend::start(dir.path(), &socket, &[]);
    let stderr = refused(dir.path(), &socket, &[]);
    assert!(
        stderr.contains("already served by another process"),
        "{stderr}"
    );
    assert!(socket.exists(), "the first backend's socket is untouched");

    // Another program's listening socket is refused too, and nothing connects to it (a
    // probe would start a session of the backend behind it).
    let foreign_path = dir.path().join("foreign.sock");
    let foreign = std::os::unix::net::UnixListener::bind(&foreign_path).unwrap();
    let stderr = refused(dir.path(), &foreign_path, &[]);
    assert!(
        stderr.contains("already served by another process"),
        "{stderr}"
    );
    foreign.set_nonblocking(true).unwrap();
    assert_eq!(
        foreign.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "tvix-boot connected to a socket it was refusing"
    );

    // A stale socket (nobody accepts on it) is replaced.
    drop(_first);
    assert!(socket.exists(), "a killed backend leaves its socket");
    let _second = Backend::start(dir.path(), &socket, &[]);
}

/// vhost-user message header flags and requests (the vhost-user specification).
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;
const SET_VRING_NUM: u32 = 8;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;

fn message(request: u32, size: u32, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&VERSION.to_le_bytes());
    msg.extend_from_slice(&size.to_le_bytes());
    msg.extend_from_slice(body);
    msg
}

/// Sends a request without a body and reads its u64 reply.
fn ask_u64(stream: &mut UnixStream, request: u32) -> u64 {
    stream.write_all(&message(request, 0, &[])).unwrap();
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).unwrap();
    let field = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().unwrap());
    assert_eq!(field(0), request, "reply to the request asked");
    assert_eq!(field(4), VERSION | REPLY);
    assert_eq!(field(8), 8);
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

#[test]
fn malformed_messages_end_the_session_not_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vfs.sock");
    let mut backend = Backend::start(dir.path(), &socket, &["--threads", "2"]);
    let mut vring_num = Vec::new();
    vring_num.extend_from_slice(&1000u32.to_le_bytes()); // no such queue
    vring_num.extend_from_slice(&64u32.to_le_bytes());
    let sessions: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", (0..=255u8).cycle().take(300).collect()),
        (
            "a header announcing a 256 MiB body",
            message(GET_FEATURES, 256 << 20, &[0; 64]),
        ),
        ("an unknown request", message(0xdead, 0, &[])),
        ("half a header", message(GET_FEATURES, 0, &[])[..6].to_vec()),
        (
            "a queue index out of range",
            [
                message(SET_OWNER, 0, &[]),
                message(SET_VRING_NUM, 8, &vring_num),
            ]
            .concat(),
        ),
    ];
    let mut resources_after_first = None;
    for (index, (what, bytes)) in sessions.iter().enumerate() {
        let mut stream = UnixStream::connect(&socket).unwrap();
        if index == 0 {
            // An honest start first: the backend answers what it offers.
            let features = ask_u64(&mut stream, GET_FEATURES);
            assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1: {features:#x}");
            assert_ne!(features & (1 << 29), 0, "EVENT_IDX: {features:#x}");
            assert_ne!(features & (1 << 28), 0, "INDIRECT_DESC: {features:#x}");
            let protocol = ask_u64(&mut stream, GET_PROTOCOL_FEATURES);
            assert_ne!(protocol & 1, 0, "MQ: {protocol:#x}");
            let ack = message(SET_PROTOCOL_FEATURES, 8, &protocol.to_le_bytes());
            stream.write_all(&ack).unwrap();
            assert_eq!(ask_u64(&mut stream, GET_QUEUE_NUM), 3, "hiprio + 2");
        }
        let _ = stream.write_all(bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Whatever the backend answers, it must then end the session or wait for more;
        // closing our end must end it.
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let _ = stream.read(&mut [0u8; 64]);
        drop(stream);
        backend.wait_for_log("waiting for the next frontend", index + 1);
        assert!(
            backend.alive(),
            "{what} killed the backend:\n{}",
            backend.log()
        );
        if index == 0 {
            resources_after_first = Some(backend.resources());
        }
    }
    assert_eq!(
        Some(backend.resources()),
        resources_after_first,
        "descriptors and threads stay the same from session to session"
    );
    let log = backend.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("session ended"), "errors are reported: {log}");
    assert!(backend.terminate().success());
}

/// A guest that mounts tag `tvix`, says so, then reads the large file forever.
const GUEST_READ_FOREVER: &str = r#"
mkdir -p /nix/store
mount -t virtiofs tvix /nix/store || echo guest-mount-failed
P=$(sed 's/.*tree.path=\([^ ]*\).*/\1/' /proc/cmdline)
echo guest-reading
while true; do cat "$P/large" > /dev/null; done
"#;

/// A guest that mounts tag `tvix`, lists the store root and the tree.
const GUEST_LIST: &str = r#"
mkdir -p /nix/store
mount -t virtiofs -o ro tvix /nix/store || echo guest-mount-failed
P=$(sed 's/.*tree.path=\([^ ]*\).*/\1/' /proc/cmdline)
ls /nix/store 2>&1 | sed 's/^/guest-root /'
list_tree "$P" guest-entry stat
reboot -f
"#;

/// QEMU guests on the build machine (TCG): the project's kernel and busybox initrds.
///
/// microvm with `acpi=off`: with its (hardware-reduced) ACPI Linux sees no PIT, and under
/// TCG on a loaded machine the kernel then fails to calibrate the TSC and hangs at boot.
/// Without ACPI there is no power-off either, so guests end with a triple-fault reboot
/// (`reboot=t`), which `-no-reboot` turns into QEMU's exit.
struct Guests {
    bzimage: PathBuf,
    reader: PathBuf,
    lister: PathBuf,
}

impl Guests {
    fn new(dir: &Path) -> Self {
        let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
        let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
        let initrd = |body: &str, name: &str| {
            let bytes = Initramfs::busybox_init(&busybox, &format!("{LIST_TREE}{body}"))
                .unwrap()
                .finish();
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        Guests {
            bzimage: vmlinux.with_file_name("bzImage"),
            reader: initrd(GUEST_READ_FOREVER, "reader.cpio"),
            lister: initrd(GUEST_LIST, "lister.cpio"),
        }
    }

    fn qemu_args(&self, socket: &Path, initrd: &Path, store_path: &str) -> Vec<String> {
        [
            "-M",
            "microvm,acpi=off,memory-backend=mem",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "256",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-chardev",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            format!("socket,id=vfs,path={}", socket.display()),
            "-device".into(),
            "vhost-user-fs-device,chardev=vfs,tag=tvix,queue-size=1024".into(),
            "-kernel".into(),
            self.bzimage.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            format!("console=ttyS0 reboot=t panic=-1 quiet tree.path={store_path}"),
        ])
        .collect()
    }

    /// Boots a guest on `socket` that lists `store_path`; returns its `list_tree` lines
    /// and what `ls /nix/store` said.
    fn list(&self, socket: &Path, store_path: &str) -> (Vec<String>, Vec<String>) {
        let out = qemu::run_qemu(
            self.qemu_args(socket, &self.lister, store_path),
            Duration::from_secs(300),
        )
        .unwrap();
        assert!(!out.timed_out, "{}", out.serial);
        assert!(!out.serial.contains("guest-mount-failed"), "{}", out.serial);
        let lines = |prefix| {
            lines_with(&out.serial, prefix)
                .into_iter()
                .map(String::from)
                .collect()
        };
        (lines("guest-entry "), lines("guest-root "))
    }
}

/// A tree made by `make_tree` and its listing as the store must show it.
fn make_tree(dir: &Path, large_mib: u32) -> (PathBuf, Vec<String>) {
    let tree = dir.join("tree");
    sh(&format!(
        "{MAKE_TREE}make_tree {} {large_mib}",
        tree.display()
    ));
    let listing = sh(&format!(
        "{LIST_TREE}list_tree {} entry store",
        tree.display()
    ));
    let expected: Vec<String> = lines_with(&listing, "entry ")
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(expected.len(), TREE_ENTRIES);
    (tree, expected)
}

fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn frontend_killed_mid_read_then_the_next_frontend_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let guests = Guests::new(dir.path());
    let (tree, expected) = make_tree(dir.path(), 16);
    let import = tvix_boot(dir.path())
        .args(["store", "import"])
        .arg(&tree)
        .output()
        .unwrap();
    assert!(import.status.success());
    let store_path = String::from_utf8(import.stdout).unwrap().trim().to_owned();
    let socket = dir.path().join("vfs.sock");
    let mut backend = Backend::start(dir.path(), &socket, &["--threads", "1", "--list-root"]);

    // The first frontend is killed (SIGKILL, no goodbye) while its guest reads.
    let mut first = Command::new(qemu::find_qemu().unwrap())
        .args(["-accel", "tcg"])
        .args(guests.qemu_args(&socket, &guests.reader, &store_path))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Console lines arrive over a channel so a guest that never gets going fails the
    // test at the deadline instead of blocking it.
    let (lines, console) = std::sync::mpsc::channel();
    let stdout = first.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = String::new();
    while !seen.contains("guest-reading") {
        let left = deadline.saturating_duration_since(Instant::now());
        match console.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(_) => {
                let _ = first.kill();
                panic!(
                    "the first guest never started reading; console:\n{seen}\nbackend log:\n{}",
                    backend.log()
                );
            }
        }
        assert!(!seen.contains("guest-mount-failed"), "{seen}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    first.kill().unwrap();
    first.wait().unwrap();

    // Documented: the session ends, the backend stays and waits for the next frontend.
    backend.wait_for_log("waiting for the next frontend", 1);
    assert!(backend.alive(), "{}", backend.log());
    assert!(socket.exists(), "the socket stays for the next frontend");

    let (entries, root) = guests.list(&socket, &store_path);
    assert_eq!(
        entries, expected,
        "the second frontend's guest sees the whole tree as the source"
    );
    assert_eq!(
        root,
        [store_path.trim_start_matches("/nix/store/")],
        "--list-root"
    );
    let log = backend.log();
    assert_eq!(
        log.matches("frontend connected: pid").count(),
        2,
        "both frontends named: {log}"
    );
    assert!(backend.terminate().success());
    assert!(!socket.exists());
}

/// Substitution is the store's business, so it works behind any transport: a backend
/// on an empty store whose path info comes from a signed Nix binary cache serves a path
/// that only the cache has, and the guest reads it whole.
#[test]
fn a_path_substituted_from_a_binary_cache_is_served_to_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let guests = Guests::new(dir.path());
    let (tree, expected) = make_tree(dir.path(), 1);
    let added = run(Command::new("nix-store").arg("--add").arg(&tree));
    let store_path = String::from_utf8(added.stdout).unwrap().trim().to_owned();
    let key = CacheKey::generate(dir.path(), "vhost-user-test-1");
    let cache = dir.path().join("cache");
    key.copy_to(&cache, &[&store_path]);

    let empty = dir.path().join("empty-store");
    let socket = dir.path().join("vfs.sock");
    let mut backend = {
        let mut cmd = tvix_boot(&empty);
        cmd.env("PATH_INFO_SERVICE_ADDR", key.file_cache_address(&cache));
        Backend::spawn(cmd, &socket, &["--threads", "1"])
    };
    let (entries, root) = guests.list(&socket, &store_path);
    assert_eq!(entries, expected);
    assert_eq!(
        root,
        ["ls: can't open '/nix/store': Operation not permitted"],
        "without --list-root the root cannot be listed"
    );
    assert!(backend.terminate().success());
}
