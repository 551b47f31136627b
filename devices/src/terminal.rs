//! Raw mode for the host terminal while a guest console is attached, restored on every
//! way out: normal return, unwinding panic (guard drop and panic hook), and fatal
//! signals (SIGTERM, SIGHUP, SIGINT, SIGQUIT).

use std::io;
use std::sync::Once;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

const STDIN_FD: libc::c_int = libc::STDIN_FILENO;
const RESTORE_ON_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];

/// The terminal settings from before raw mode. Written once, then only read, which is
/// what lets the signal handler use it.
static ORIGINAL: OnceLock<libc::termios> = OnceLock::new();
/// Whether raw mode is currently on (so restoring twice is harmless).
static RAW_ACTIVE: AtomicBool = AtomicBool::new(false);
static INSTALL_HOOKS: Once = Once::new();

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
        INSTALL_HOOKS.call_once(install_restore_hooks);

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
pub(crate) fn restore() {
    if RAW_ACTIVE.swap(false, Ordering::SeqCst)
        && let Some(original) = ORIGINAL.get()
    {
        // SAFETY: `original` is a valid termios saved from this terminal.
        unsafe { libc::tcsetattr(STDIN_FD, libc::TCSANOW, original) };
    }
}

extern "C" fn restore_and_reraise(signal: libc::c_int) {
    restore();
    // SAFETY: resetting to the default disposition and raising again is the standard
    // way to die "of" the signal, so the parent sees the real cause; both calls are
    // async-signal-safe.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

fn install_restore_hooks() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
    for signal in RESTORE_ON_SIGNALS {
        // SAFETY: the handler only calls async-signal-safe functions (see above).
        unsafe {
            libc::signal(
                signal,
                restore_and_reraise as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}
