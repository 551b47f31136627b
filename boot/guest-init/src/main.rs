//! tvix-boot-guest-init: PID 1 of a tvix-boot guest.
//!
//! 1. Mounts proc (/proc), sysfs (/sys) and devtmpfs (/dev), tolerating ones
//!    already mounted; reopens /dev/console as stdio if the kernel could not.
//! 2. Mounts virtio-fs tag `tvix` read-only at /nix/store. A failure is
//!    reported at once but is fatal only for the modes that need the store,
//!    so a shell from the initrd still works for debugging.
//! 3. Reads /proc/cmdline and does the first of (see [`protocol`] for the
//!    exact keys and the `tvix.args` encoding):
//!    `tvix.find` (list /nix/store), `tvix.shell[=PATH]` (shell on the
//!    console, in a session whose controlling terminal is the console),
//!    `tvix.run=PATH` (+ `tvix.args`), `init=PATH` (tmpfs at /fs, store
//!    *moved* to /fs/nix/store, /dev /proc /sys moved along, switch_root into
//!    /fs and exec PATH as PID 1 — the initramfs is not emptied first: it
//!    holds only this binary (and busybox if the host added it), so the few
//!    hundred KiB it keeps are not worth the code), or prints the keys.
//! 4. Reaps every child (orphans re-parent to PID 1) while waiting.
//!
//! # Exit status: guest-to-host channel
//!
//! For `tvix.run`, `tvix.shell` and `tvix.find` the program's status `n`
//! (0..=255; 128 + signal number if killed by a signal; 127 if the program
//! does not exist, 126 if it cannot be executed) goes to the host twice:
//!
//! - console line `tvix-boot: exit-status <n>` (decimal), then the line
//!   `Nothing left to be done, powering off.`;
//! - after the console has drained and the disks synced, one 32-bit `out` of
//!   `n` to I/O port **0x501** ([`protocol::EXIT_STATUS_PORT`]), immediately
//!   followed by the ACPI power-off (reboot(RB_POWER_OFF)). The VMM keeps the
//!   last value written and exits with it once the guest powers off. Port
//!   access from user space needs ioperm(2), i.e. a guest kernel with
//!   CONFIG_X86_IOPL_IOPERM=y; without it the init says so on the console and
//!   the console line is the only channel.
//!
//! If the init itself fails (a mount, the command line, switch_root), it
//! prints `tvix-init: error: <what failed, with which input>` and reports
//! `n` = 256 ([`protocol::STATUS_INIT_FAILED`]) the same two ways. Nothing
//! is reported when no program ran (no key given, or `init=` handed PID 1
//! over). The init never panics on purpose; should it, the panic hook still
//! reports 256 and powers off, because PID 1 exiting would panic the kernel.

mod error;
mod net;
mod stdio_ports;
mod sys;

use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use tvix_boot_guest_init::protocol::{
    self, Cmdline, EXIT_STATUS_PORT, EXIT_STATUS_PORT_LEN, HostRequest, KEY_ARGS, KEY_CONTROL_PORT,
    KEY_FIND, KEY_INIT, KEY_NET, KEY_RUN, KEY_SHELL, KEY_STDIO_PORTS, KEY_WINSIZE_PORT, Mode,
    POWER_OFF_LINE, PROGRAM_ENV_FILE, PROGRAM_WORKDIR_FILE, STATUS_INIT_FAILED, STATUS_STOPPED,
};

use crate::error::InitError;

const STORE_DIR: &str = "/nix/store";
/// virtio-fs tag the VMM gives its store device.
const STORE_TAG: &str = "tvix";
/// Where `init=` builds the new root.
const NEW_ROOT: &str = "/fs";
/// How long power-off waits for the console to drain: a console that never
/// drains must not keep the VM from stopping.
const POWER_OFF_DRAIN_SECS: u32 = 2;
/// How long the keeper waits for a finished program's output to leave the console
/// (more than power-off's wait: a whole terminal buffer may still be queued).
const PROGRAM_DRAIN_SECS: u32 = 10;
/// Environment variables given to programs when the kernel did not set them.
const DEFAULT_ENV: &[(&str, &str)] = &[("PATH", "/bin:/sbin"), ("HOME", "/"), ("TERM", "linux")];

/// Prints one line on the console. Errors are ignored: there is nowhere else
/// to report them, and PID 1 must not die of a console hiccup.
fn say(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    let _ = out.write_fmt(args);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

macro_rules! say {
    ($($arg:tt)*) => { say(format_args!($($arg)*)) };
}

fn main() {
    if sys::getpid() != 1 {
        // Running this on a host as root would power the host off.
        eprintln!(
            "tvix-boot-guest-init is the guest's PID 1 and runs only as PID 1 (this is pid {})",
            sys::getpid()
        );
        std::process::exit(2);
    }
    std::panic::set_hook(Box::new(|info| {
        say!("tvix-init: internal error: {info}");
        power_off(Some(STATUS_INIT_FAILED));
    }));

    let status = match run() {
        Ok(status) => status,
        Err(err) => {
            say!("tvix-init: error: {err}");
            Some(STATUS_INIT_FAILED)
        }
    };
    power_off(status);
}

/// Sets up the guest and does what the command line asks. Returns the status
/// to report, `None` if no program ran; `init=` returns only on failure.
fn run() -> Result<Option<u32>, InitError> {
    mount_kernel_filesystems()?;
    say!(
        "tvix-boot init {} (pid 1): store = virtio-fs `{STORE_TAG}` at {STORE_DIR}",
        env!("CARGO_PKG_VERSION")
    );
    let store = mount_store();
    if let Err(cause) = &store {
        say!("tvix-init: error: {cause}");
    }

    let cmdline =
        fs::read_to_string("/proc/cmdline").map_err(|source| InitError::ReadCmdline { source })?;
    let cmdline = Cmdline::parse(&cmdline);
    let mode = Mode::from_cmdline(&cmdline).map_err(InitError::Cmdline)?;
    set_up_network(&cmdline)?;

    if cmdline.has(KEY_CONTROL_PORT) {
        let walking = matches!(mode, Mode::Find);
        let followed = stdio_ports::follow_control_port(move |request| {
            let signal = match request {
                HostRequest::Stop => libc::SIGTERM,
                HostRequest::Signal(signal) => signal,
            };
            if walking {
                // The walk runs in this process: nothing to signal.
                let status = match request {
                    HostRequest::Stop => STATUS_STOPPED,
                    HostRequest::Signal(signal) => 128 + signal as u32,
                };
                power_off(Some(status));
            }
            // The program handles it or ends, and with it the wait below.
            sys::signal_all(signal);
        });
        if let Err(e) = followed {
            say!("tvix-init: {e}; the host cannot ask this guest to stop");
        }
    }

    match mode {
        Mode::Find => {
            if store.is_err() {
                return Err(InitError::NoStore { mode: KEY_FIND });
            }
            Ok(Some(find(Path::new(STORE_DIR))))
        }
        Mode::Shell { path } => {
            run_program(&path, &[], &store, cmdline.has(KEY_WINSIZE_PORT)).map(Some)
        }
        Mode::Run { path, args } if cmdline.has(KEY_STDIO_PORTS) => {
            run_program_on_ports(&path, &args, &store).map(Some)
        }
        Mode::Run { path, args } => {
            run_program(&path, &args, &store, cmdline.has(KEY_WINSIZE_PORT)).map(Some)
        }
        Mode::Init { path } => {
            if store.is_err() {
                return Err(InitError::NoStore { mode: KEY_INIT });
            }
            Err(switch_root_and_exec(&path))
        }
        Mode::Nothing => {
            say!(
                "tvix-init: nothing to do: the kernel command line has none of these keys \
                 (checked in this order):\n  \
                 {KEY_FIND}              print every path under {STORE_DIR}\n  \
                 {KEY_SHELL}[=PATH]      interactive shell on the console (default {})\n  \
                 {KEY_RUN}=PATH          run PATH; arguments in {KEY_ARGS}=<base64url of NUL-terminated args>\n  \
                 {KEY_INIT}=PATH              switch_root into a tmpfs holding {STORE_DIR} and exec PATH",
                protocol::DEFAULT_SHELL
            );
            Ok(None)
        }
    }
}

/// `lo` in every guest (a failure there is reported, not fatal: few programs need it);
/// `eth0` when the host gave the guest a network, and then a failure is fatal: the
/// program was meant to have one.
fn set_up_network(cmdline: &Cmdline) -> Result<(), InitError> {
    if let Err(e) = net::bring_up_loopback() {
        say!("tvix-init: {e}");
    }
    let Some(value) = cmdline.get(KEY_NET) else {
        return Ok(());
    };
    let network =
        protocol::GuestNetwork::parse(value.unwrap_or("")).map_err(|e| InitError::Network {
            detail: e.to_string(),
        })?;
    net::configure(&network).map_err(|e| InitError::Network {
        detail: e.to_string(),
    })
}

fn mkdir(path: &str) -> Result<(), InitError> {
    fs::create_dir_all(path).map_err(|source| InitError::Mkdir {
        path: path.to_owned(),
        source,
    })
}

fn mount_kernel_filesystems() -> Result<(), InitError> {
    for (fstype, target) in [("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev")] {
        mkdir(target)?;
        let flags = libc::MS_NOSUID | libc::MS_NOEXEC;
        match sys::mount(Some(fstype), Path::new(target), Some(fstype), flags, None) {
            // EBUSY: already mounted there (e.g. by DEVTMPFS_MOUNT); fine.
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) => {
                return Err(InitError::Mount {
                    what: fstype.to_owned(),
                    target: target.to_owned(),
                    source: e,
                });
            }
            _ => {}
        }
    }
    // The kernel opens /dev/console for our stdio before we run; if the
    // initrd lacked the node, it could not, and only now can we.
    if !sys::fd_is_open(1) {
        let _ = sys::reopen_stdio(Path::new("/dev/console"));
    }
    Ok(())
}

/// Mounts the store; on failure, a message saying what to check.
fn mount_store() -> Result<(), String> {
    fs::create_dir_all(STORE_DIR).map_err(|e| format!("cannot create {STORE_DIR}: {e}"))?;
    sys::mount(
        Some(STORE_TAG),
        Path::new(STORE_DIR),
        Some("virtiofs"),
        libc::MS_RDONLY,
        None,
    )
    .map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::ENODEV) => "the guest kernel has no virtiofs file system (VIRTIO_FS)",
            Some(libc::EINVAL | libc::ENOENT) => {
                "no virtio-fs device with that tag: is the VMM's store device attached?"
            }
            _ => "is the VMM's virtio-fs store device attached?",
        };
        format!("cannot mount virtio-fs tag `{STORE_TAG}` read-only at {STORE_DIR}: {e} ({hint})")
    })
}

/// The device behind /dev/console (e.g. /dev/ttyS0): the last entry of
/// /sys/class/tty/console/active is the one /dev/console writes to.
fn console_tty() -> PathBuf {
    fs::read_to_string("/sys/class/tty/console/active")
        .ok()
        .and_then(|active| {
            active
                .split_whitespace()
                .last()
                .map(|s| format!("/dev/{s}"))
        })
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/dev/ttyS0"))
}

/// Runs `path` with `args` on the console, waits for it (reaping orphans meanwhile) and
/// returns its status.
///
/// A keeper process stands between us and the program and holds the console's session:
/// when a session leader exits, the kernel hangs its terminal up and throws away output
/// not yet sent, so on a slow console the program's last lines were lost. The keeper
/// waits for the program, lets the console drain, then exits with the program's status.
///
/// With `winsize_port`, the console gets the host terminal's size before the program
/// starts, and every later size (see [`stdio_ports::follow_window_size`]).
fn run_program(
    path: &str,
    args: &[Vec<u8>],
    store: &Result<(), String>,
    winsize_port: bool,
) -> Result<u32, InitError> {
    let tty = CString::new(console_tty().into_os_string().into_vec())
        .unwrap_or_else(|_| c"/dev/console".to_owned());
    // SAFETY: PID 1 runs no other thread before it powers off, so the child may use
    // anything the parent could; it only ever leaves through `_exit`.
    let keeper = unsafe { libc::fork() };
    if keeper < 0 {
        return Err(InitError::Fork {
            source: io::Error::last_os_error(),
        });
    }
    if keeper == 0 {
        sys::become_session_leader_on(&tty);
        if winsize_port && let Err(e) = stdio_ports::follow_window_size(0) {
            say!("tvix-init: error: {e} (the terminal keeps its default size)");
        }
        let status = run_in_session(path, args, store);
        sys::tcdrain_at_most(1, PROGRAM_DRAIN_SECS);
        // `_exit`: no atexit handlers, no second flush of buffers copied from PID 1.
        sys::exit_now(status);
    }
    let keeper = keeper as u32;
    loop {
        match sys::wait_any(true) {
            Ok(Some(reaped)) if reaped.pid as u32 == keeper => {
                reap_orphans();
                return Ok(reaped.status);
            }
            Ok(_) => {} // an orphan, reaped
            Err(source) => {
                return Err(InitError::Wait {
                    pid: keeper,
                    source,
                });
            }
        }
    }
}

/// Runs `path` with `args` with its standard streams on the host's virtio-console ports
/// (see [`stdio_ports`]), waits for it (reaping orphans meanwhile), lets the relays move
/// the rest of its output and returns its status. No controlling terminal: the program is
/// in its own session, as in a pipeline started by a daemon.
fn run_program_on_ports(
    path: &str,
    args: &[Vec<u8>],
    store: &Result<(), String>,
) -> Result<u32, InitError> {
    use std::os::fd::OwnedFd;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let ports = stdio_ports::open_ports()?;
    let pipe = || stdio_ports::pipe().map_err(|source| InitError::Fork { source });
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let (finished_read, finished_write) = pipe()?;
    let finished = Arc::new(AtomicBool::new(false));
    let finished_read = Arc::new(finished_read);
    let relay = |from: OwnedFd, to: fs::File| {
        let finished = finished.clone();
        let wake = finished_read.clone();
        std::thread::spawn(move || stdio_ports::relay(from, to, finished, wake))
    };
    let relays = [
        relay(stdout_read, ports.stdout),
        relay(stderr_read, ports.stderr),
    ];

    // The init's own complaints about the program (it cannot start, a bad working
    // directory) go where a shell's would: to the program's stderr.
    let mut init_stderr = fs::File::from(
        stderr_write
            .try_clone()
            .map_err(|source| InitError::Fork { source })?,
    );
    let status = match program_command(path, args) {
        Err((status, message)) => {
            let _ = writeln!(init_stderr, "{message}");
            status
        }
        Ok(mut cmd) => {
            cmd.stdin(ports.stdin)
                .stdout(stdout_write)
                .stderr(stderr_write);
            // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
            let spawned = cmd.spawn();
            // The parent's copies of the pipes' write ends go with `cmd`, so end of file
            // comes when the program (and what it started) closes them.
            drop(cmd);
            match spawned {
                Ok(child) => {
                    let pid = child.id();
                    loop {
                        match sys::wait_any(true) {
                            Ok(Some(reaped)) if reaped.pid as u32 == pid => break reaped.status,
                            Ok(_) => {}
                            Err(source) => return Err(InitError::Wait { pid, source }),
                        }
                    }
                }
                Err(e) => {
                    let (status, message) = spawn_failure(path, &e, store);
                    let _ = writeln!(init_stderr, "{message}");
                    status
                }
            }
        }
    };
    drop(init_stderr);
    finished.store(true, Ordering::Release);
    drop(finished_write);
    for relay in relays {
        let _ = relay.join();
    }
    reap_orphans();
    Ok(status)
}

/// The command for `path` with `args`, with the environment and working directory
/// tvix-boot put in the initrd (else the default environment, in /). `Err` with the
/// status to report and why when the working directory is unusable.
fn program_command(path: &str, args: &[Vec<u8>]) -> Result<Command, (u32, String)> {
    let mut cmd = Command::new(path);
    cmd.args(args.iter().map(|a| OsStr::from_bytes(a)));
    match fs::read(PROGRAM_ENV_FILE) {
        Ok(env) => {
            cmd.env_clear();
            for (key, value) in protocol::decode_env(&env) {
                cmd.env(OsStr::from_bytes(&key), OsStr::from_bytes(&value));
            }
        }
        Err(_) => {
            for (key, value) in DEFAULT_ENV {
                if std::env::var_os(key).is_none() {
                    cmd.env(key, value);
                }
            }
        }
    }
    let workdir = fs::read(PROGRAM_WORKDIR_FILE)
        .map(|dir| PathBuf::from(std::ffi::OsString::from_vec(dir)))
        .unwrap_or_else(|_| PathBuf::from("/"));
    match fs::metadata(&workdir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            let message = format!(
                "tvix-init: working directory {}: not a directory",
                workdir.display()
            );
            return Err((126, message));
        }
        Err(e) => {
            let message = format!("tvix-init: working directory {}: {e}", workdir.display());
            return Err((126, message));
        }
    }
    cmd.current_dir(workdir);
    Ok(cmd)
}

/// Why `path` could not start, and the status a shell would give (127 not found, 126
/// found but not runnable).
fn spawn_failure(path: &str, e: &io::Error, store: &Result<(), String>) -> (u32, String) {
    let hint = match store {
        Err(_) if path.starts_with(STORE_DIR) => " (the store is not mounted)",
        _ => "",
    };
    let status = if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    (status, format!("tvix-init: cannot run {path}: {e}{hint}"))
}

/// The keeper's part: the program runs in the keeper's session and process group (the
/// console's foreground group), so Ctrl-C reaches it; the keeper itself ignores the
/// terminal's signals from then on. Returns the status the way shells report it.
fn run_in_session(path: &str, args: &[Vec<u8>], store: &Result<(), String>) -> u32 {
    let mut cmd = match program_command(path, args) {
        Ok(cmd) => cmd,
        Err((status, message)) => {
            say!("{message}");
            return status;
        }
    };
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let (status, message) = spawn_failure(path, &e, store);
            say!("{message}");
            return status;
        }
    };
    // After the spawn, so the program starts with default dispositions.
    sys::ignore_terminal_signals();
    let raw = child
        .wait()
        .map(std::os::unix::process::ExitStatusExt::into_raw);
    match raw.ok().and_then(sys::shell_status) {
        Some(status) => status,
        None => {
            // The keeper's exit code is all PID 1 hears: 1, with the reason on the console.
            say!("tvix-init: lost track of {path} while waiting for it");
            1
        }
    }
}

/// Reaps children that have already exited, without blocking.
fn reap_orphans() {
    while let Ok(Some(_)) = sys::wait_any(false) {}
}

/// Prints `root` and every path below it, depth first, entries sorted, not
/// following symlinks (like `find`). Returns 0, or 1 if anything could not
/// be read (also like `find`).
fn find(root: &Path) -> u32 {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut status = 0;
    // An explicit stack instead of recursion: depth is the store's to choose.
    let mut stack = vec![(root.to_path_buf(), true)];
    while let Some((path, is_dir)) = stack.pop() {
        let _ = out.write_all(path.as_os_str().as_bytes());
        let _ = out.write_all(b"\n");
        if !is_dir {
            continue;
        }
        let entries = fs::read_dir(&path).and_then(|it| {
            it.map(|e| e.and_then(|e| Ok((e.path(), e.file_type()?.is_dir()))))
                .collect::<io::Result<Vec<_>>>()
        });
        match entries {
            Ok(mut entries) => {
                // Reversed onto the stack, so the first entry is visited next.
                entries.sort_by(|a, b| b.cmp(a));
                stack.extend(entries);
            }
            Err(e) => {
                let _ = out.flush();
                say!("find: {}: {e}", path.display());
                status = 1;
            }
        }
    }
    let _ = out.flush();
    status
}

/// `init=`: a tmpfs at /fs becomes the root, with the store (and /dev, /proc,
/// /sys) moved into it, then `path` is exec'd as PID 1. Returns only on
/// failure.
fn switch_root_and_exec(path: &str) -> InitError {
    match prepare_new_root() {
        Ok(()) => {}
        Err(e) => return e,
    }
    say!("tvix-init: switching root to {NEW_ROOT}, exec {path}");
    let _ = io::stdout().flush();
    let mut cmd = Command::new(path);
    for (key, value) in DEFAULT_ENV {
        if std::env::var_os(key).is_none() {
            cmd.env(key, value);
        }
    }
    let source = cmd.exec();
    InitError::Exec {
        path: path.to_owned(),
        source,
    }
}

fn prepare_new_root() -> Result<(), InitError> {
    let step = |step: &'static str, path: &str| {
        let path = path.to_owned();
        move |source| InitError::SwitchRoot { step, path, source }
    };
    mkdir(NEW_ROOT)?;
    sys::mount(
        Some("tmpfs"),
        Path::new(NEW_ROOT),
        Some("tmpfs"),
        0,
        Some("mode=0755"),
    )
    .map_err(|source| InitError::Mount {
        what: "tmpfs".into(),
        target: NEW_ROOT.into(),
        source,
    })?;
    // Moved, not bound a second time: one mount, and it stays read-only.
    for dir in [STORE_DIR, "/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{dir}");
        mkdir(&target)?;
        sys::mount(Some(dir), Path::new(&target), None, libc::MS_MOVE, None)
            .map_err(step("move mount", dir))?;
    }
    // What switch_root(8) does: the initramfs cannot be pivot_root'ed away,
    // so the new root is moved over / and entered with chroot.
    std::env::set_current_dir(NEW_ROOT).map_err(step("chdir", NEW_ROOT))?;
    sys::mount(Some("."), Path::new("/"), None, libc::MS_MOVE, None)
        .map_err(step("move onto /", NEW_ROOT))?;
    sys::chroot(Path::new(".")).map_err(step("chroot", NEW_ROOT))?;
    std::env::set_current_dir("/").map_err(step("chdir", "/"))?;
    Ok(())
}

static POWERING_OFF: AtomicBool = AtomicBool::new(false);

/// Reports `status` (if any), prints the power-off line, syncs and powers
/// the guest off. Never returns.
fn power_off(status: Option<u32>) -> ! {
    if POWERING_OFF.swap(true, Ordering::SeqCst) {
        // A panic while powering off: skip straight to the end.
        halt();
    }
    reap_orphans();
    let port = status.and_then(|status| {
        say!("{}", protocol::exit_status_line(status));
        open_status_port()
    });
    say!("{POWER_OFF_LINE}");
    drain_console();
    sys::sync();
    if let (Some(port), Some(status)) = (port, status) {
        port.outl(status);
    }
    halt();
}

/// reboot(RB_POWER_OFF), and if even that fails, sleep forever: PID 1 must
/// not exit.
fn halt() -> ! {
    let err = sys::power_off();
    say!("tvix-init: power-off failed: {err}");
    loop {
        sys::pause();
    }
}

/// Waits (bounded) until the console has sent everything: the VM stops the
/// moment we power off or write the status port.
fn drain_console() {
    sys::tcdrain_at_most(1, POWER_OFF_DRAIN_SECS);
}

/// Access to the exit-status port, or `None` (with a message) without it.
fn open_status_port() -> Option<sys::PortAccess> {
    match sys::PortAccess::new(EXIT_STATUS_PORT, EXIT_STATUS_PORT_LEN) {
        Ok(port) => Some(port),
        Err(e) => {
            say!("tvix-init: cannot write the exit status to port {EXIT_STATUS_PORT:#x}: {e}");
            None
        }
    }
}
