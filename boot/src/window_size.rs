//! The host terminal's size for the guest's console, when the program has the terminal:
//! written as a `ROWS COLS` line on a virtio-console port at once and after every
//! SIGWINCH; the guest init applies each line to the console (see the init's
//! `follow_window_size`), which signals SIGWINCH to the program.
//!
//! SIGWINCH is read from a signalfd by a subscriber of the VM's event loop. A signalfd
//! only sees signals that no thread takes: every thread of the process must block
//! SIGWINCH ([`block_window_size_signal`], before any thread starts).

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tvix_boot_devices::event_loop::{EventOps, EventSet, Events, MutEventSubscriber};

/// Blocks SIGWINCH in the calling thread and every thread it starts from now on, so that
/// a VM following the terminal's size ([`crate::MicroVm::follow_terminal_size`]) sees it.
/// Call it first thing in `main`: a thread started before keeps taking the signal. For
/// programs that own the terminal; a library does not change signal handling by itself.
pub fn block_window_size_signal() -> io::Result<()> {
    let set = sigwinch_set();
    // SAFETY: `set` is a valid, initialised sigset; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn sigwinch_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use and
    // sigaddset adds a valid signal number.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGWINCH);
        set
    }
}

/// Writes the terminal's size to the guest's size port after each SIGWINCH.
pub(crate) struct WindowSizeFollower {
    signals: File,
    sizes: File,
    last: (u16, u16),
}

impl WindowSizeFollower {
    /// The read end for the guest's size port (its first line already written) and the
    /// subscriber that feeds it; `None` when stdin is not a terminal.
    pub(crate) fn start() -> io::Result<Option<(OwnedFd, Self)>> {
        let Some(size) = terminal_size() else {
            return Ok(None);
        };
        let (reader, mut writer) = pipe()?;
        write_size(&mut writer, size)?;
        let set = sigwinch_set();
        // SAFETY: `set` is a valid sigset; -1 asks for a new signalfd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
        let signals = unsafe { File::from_raw_fd(fd) };
        Ok(Some((
            reader,
            Self {
                signals,
                sizes: writer,
                last: size,
            },
        )))
    }
}

impl MutEventSubscriber for WindowSizeFollower {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, EventSet::IN)) {
            tracing::warn!("the guest console will not follow the terminal's size: {e}");
        }
    }

    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        // Take every queued SIGWINCH; only the size now matters.
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        while io::Read::read(&mut self.signals, &mut info).is_ok_and(|n| n == info.len()) {}
        let Some(size) = terminal_size() else {
            return;
        };
        if size == self.last {
            return;
        }
        self.last = size;
        if let Err(e) = write_size(&mut self.sizes, size) {
            // The guest stopped reading (or its pipe is full of sizes it never took).
            tracing::debug!("terminal size not passed on: {e}");
            if e.kind() != io::ErrorKind::WouldBlock {
                let _ = ops.remove(Events::new(&self.signals, EventSet::IN));
            }
        }
    }
}

/// (read end, non-blocking write end), both close-on-exec.
fn pipe() -> io::Result<(OwnedFd, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: two fresh descriptors that nothing else owns.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers.
    unsafe {
        let fd = writer.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((reader, writer))
}

fn write_size(writer: &mut File, (rows, cols): (u16, u16)) -> io::Result<()> {
    writer.write_all(format!("{rows} {cols}\n").as_bytes())
}

/// Rows and columns of the terminal on stdin.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain old data; all-zero is a valid value to overwrite.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize struct to the valid pointer given.
    let ok = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}
