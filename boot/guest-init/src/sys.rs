//! Thin, safe wrappers over the system calls std does not offer. Every unsafe
//! block in the init lives here.

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstring(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2). `source`/`fstype`/`data` are optional as for the syscall.
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(|s| cstring(s.as_bytes())).transpose()?;
    let target = cstring(target.as_os_str().as_bytes())?;
    let fstype = fstype.map(|s| cstring(s.as_bytes())).transpose()?;
    let data = data.map(|s| cstring(s.as_bytes())).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null (allowed for source, fstype and
    // data) or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    let path = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: `path` is NUL-terminated and outlives the call.
    check(unsafe { libc::chroot(path.as_ptr()) })
}

/// Whether `fd` is an open file descriptor.
pub fn fd_is_open(fd: libc::c_int) -> bool {
    // SAFETY: F_GETFD only reads the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Opens `path` read-write and makes it fds 0, 1 and 2.
pub fn reopen_stdio(path: &Path) -> io::Result<()> {
    let path = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: `path` is NUL-terminated; O_NOCTTY keeps PID 1 from acquiring
    // the console as its controlling terminal.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    check(fd)?;
    for target in 0..=2 {
        if fd != target {
            // SAFETY: both are valid descriptors; dup2 replaces `target`.
            check(unsafe { libc::dup2(fd, target) })?;
        }
    }
    if fd > 2 {
        // SAFETY: `fd` is ours and no longer needed.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Run in a freshly forked child (so: async-signal-safe calls only, no
/// allocation): start a new session and make `tty` its controlling terminal
/// on fds 0-2. A shell needs this for job control and Ctrl-C; /dev/console
/// itself cannot serve, hence the real device (e.g. /dev/ttyS0). Failures are
/// tolerated: the program then runs without a controlling terminal.
pub fn become_session_leader_on(tty: &CStr) {
    // SAFETY: setsid, open, ioctl, dup2 and close are async-signal-safe and
    // get valid arguments; `tty` is NUL-terminated and outlives the calls.
    unsafe {
        libc::setsid();
        let fd = libc::open(tty.as_ptr(), libc::O_RDWR);
        if fd < 0 {
            // Keep the inherited console; still try to make it ours.
            libc::ioctl(0, libc::TIOCSCTTY, 1);
            return;
        }
        libc::ioctl(fd, libc::TIOCSCTTY, 1);
        for target in 0..=2 {
            if fd != target {
                libc::dup2(fd, target);
            }
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
}

/// How a waited-for process ended.
pub struct Reaped {
    pub pid: libc::pid_t,
    /// Exit status the way shells report it: the exit code, or 128 + signal.
    pub status: u32,
}

/// waitpid(-1, …): waits for any child (PID 1 inherits every orphan, so it
/// must reap them all). With `block == false`, `Ok(None)` when none has
/// exited yet; `Err` with ECHILD when there are no children at all.
pub fn wait_any(block: bool) -> io::Result<Option<Reaped>> {
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        let mut raw = 0;
        // SAFETY: `raw` is a valid out-pointer for the duration of the call.
        let pid = unsafe { libc::waitpid(-1, &mut raw, flags) };
        if pid < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if pid == 0 {
            return Ok(None);
        }
        // Stopped/continued are not reported without WUNTRACED/WCONTINUED.
        let Some(status) = shell_status(raw) else {
            continue;
        };
        return Ok(Some(Reaped { pid, status }));
    }
}

/// A wait status the way shells report it: the exit code, or 128 + the signal that
/// killed the process; `None` for a stop or continue.
pub fn shell_status(raw: libc::c_int) -> Option<u32> {
    if libc::WIFEXITED(raw) {
        Some(libc::WEXITSTATUS(raw) as u32)
    } else if libc::WIFSIGNALED(raw) {
        Some(128 + libc::WTERMSIG(raw) as u32)
    } else {
        None
    }
}

/// The terminal's job-control and interrupt signals are ignored from now on (the
/// keeper's: it must outlive the program it holds the console's session for).
pub fn ignore_terminal_signals() {
    for signal in [
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGTSTP,
        libc::SIGTTIN,
        libc::SIGTTOU,
        libc::SIGHUP,
    ] {
        // SAFETY: SIG_IGN is a valid disposition for each of these signals.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
}

/// _exit(2) with `status` (its low 8 bits): no atexit handlers, no stdio flush.
pub fn exit_now(status: u32) -> ! {
    // SAFETY: _exit ends the process at once and takes no pointers.
    unsafe { libc::_exit(status as libc::c_int) }
}

extern "C" fn interrupt_only(_signal: libc::c_int) {}

/// tcdrain(2): blocks until the terminal on `fd` has sent its output, but gives up after
/// `seconds`: a console whose output is stopped (flow control) never drains. For a
/// single-threaded process (PID 1 and the keeper are): it borrows SIGALRM.
pub fn tcdrain_at_most(fd: libc::c_int, seconds: u32) {
    // SAFETY: a zeroed sigaction is valid; the handler does nothing (async-signal-safe)
    // and is installed without SA_RESTART so that it interrupts tcdrain; alarm takes no
    // pointers.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = interrupt_only as *const () as libc::sighandler_t;
        libc::sigaction(libc::SIGALRM, &action, std::ptr::null_mut());
        libc::alarm(seconds);
        libc::tcdrain(fd);
        libc::alarm(0);
    }
}

/// sync(2).
pub fn sync() {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::sync() };
}

/// Proof that this process may write to an I/O port.
pub struct PortAccess {
    port: u16,
}

impl PortAccess {
    /// Grants this process access to `len` ports from `port` (needs
    /// CAP_SYS_RAWIO, which PID 1 has).
    pub fn new(port: u16, len: u16) -> io::Result<Self> {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        check(unsafe { libc::ioperm(port.into(), len.into(), 1) })?;
        Ok(PortAccess { port })
    }

    /// One 32-bit `out` of `value` to the port.
    #[cfg(target_arch = "x86_64")]
    pub fn outl(&self, value: u32) {
        // SAFETY: `self` exists only after ioperm granted the port, so the
        // `out` cannot fault; it touches no memory of this process.
        unsafe {
            std::arch::asm!(
                "out dx, eax",
                in("dx") self.port,
                in("eax") value,
                options(nomem, nostack, preserves_flags)
            );
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn outl(&self, _value: u32) {
        let _ = self.port;
    }
}

/// reboot(RB_POWER_OFF). Returns only on failure.
pub fn power_off() -> io::Error {
    // SAFETY: no memory is passed; on success the call does not return.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// Sleeps until a signal arrives (used when even power-off failed: PID 1
/// must not exit, or the kernel panics).
pub fn pause() {
    // SAFETY: no arguments.
    unsafe { libc::pause() };
}

pub fn getpid() -> libc::pid_t {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::getpid() }
}

/// `signal` to every process but the caller (PID 1) and kernel threads.
pub fn signal_all(signal: libc::c_int) {
    // SAFETY: kill(-1, sig) takes no pointers; failure (nobody to signal) is harmless.
    unsafe { libc::kill(-1, signal) };
}
