//! Raw mode for the host terminal while a guest console is attached, restored on every
//! way out: normal return, unwinding panic (guard drop and panic hook), a forbidden
//! system call (the seccomp filters' SIGSYS handler calls [`restore`]). Signals from
//! outside do not end the process with the terminal raw: a process that puts it in raw
//! mode blocks them and reads them from a signalfd (see `host_signals`), and ends after
//! the VM, through the guard.

use std::io;
use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

const STDIN_FD: libc::c_int = libc::STDIN_FILENO;

/// The terminal settings from before raw mode. Written once, then only read, which is
/// what lets the signal handler use it.
static ORIGINAL: OnceLock<libc::termios> = OnceLock::new();
/// Whether raw mode is currently on (so restoring twice is harmless).
static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);
static INSTALL_PANIC_HOOK: Once = Once::new();

/// Keeps stdin in raw mode while alive.
pub struct RawTerminal(());

impl RawTerminal {
    /// Puts stdin in raw mode if it is a terminal; returns `None` if it is not.
    pub fn enable_if_tty() -> io::Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(STDIN_FD) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain old data, all-zero is a valid value to overwrite.
        let mut current: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `current` is a valid termios to fill in.
        if unsafe { libc::tcgetattr(STDIN_FD, &mut current) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let original = *ORIGINAL.get_or_init(|| current);
        INSTALL_PANIC_HOOK.call_once(install_panic_hook);

        let mut raw = original;
        // SAFETY: `raw` is a valid termios; cfmakeraw only edits its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing: the host side of the console is a normal
        // terminal and the guest sends "\r\n" anyway.
        raw.c_oflag = original.c_oflag;
        // SAFETY: `raw` is a valid termios.
        if unsafe { libc::tcsetattr(STDIN_FD, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        RAW_ACTIVE.store(true, Ordering::SeqCst);
        Ok(Some(Self(())))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the saved settings if raw mode is on. Async-signal-safe: an atomic swap, a
/// read of initialised static data and tcsetattr.
pub fn restore() {
    if RAW_ACTIVE.swap(false, Ordering::SeqCst)
        && let Some(original) = ORIGINAL.get()
    {
        // SAFETY: `original` is a valid termios saved from this terminal.
        unsafe { libc::tcsetattr(STDIN_FD, libc::TCSANOW, original) };
    }
}

fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}
