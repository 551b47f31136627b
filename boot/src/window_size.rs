//! The host terminal's size for the guest's console, when the program has the terminal:
//! written as a `ROWS COLS` line on a virtio-console port at once and after every
//! SIGWINCH; the guest init applies each line to the console (see the init's
//! `follow_window_size`), which signals SIGWINCH to the program.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use signal_hook::consts::SIGWINCH;
use signal_hook::iterator::{Handle, Signals};
use tvix_boot_devices::seccomp::{self, RoleThread, ThreadRole};

/// Forwards size changes until dropped.
pub struct WindowSizeForwarder {
    signals: Handle,
    thread: Option<RoleThread<()>>,
}

impl WindowSizeForwarder {
    /// The read end for the guest's size port (its first line already written) and the
    /// forwarder that feeds it; `None` when stdin is not a terminal.
    pub fn start() -> io::Result<Option<(OwnedFd, Self)>> {
        let Some(size) = terminal_size() else {
            return Ok(None);
        };
        let (reader, mut writer) = pipe()?;
        write_size(&mut writer, size)?;
        let mut signals = Signals::new([SIGWINCH])?;
        let handle = signals.handle();
        let thread = seccomp::spawn(ThreadRole::DeviceIo, "window-size".to_owned(), move || {
            for _ in signals.forever() {
                let Some(size) = terminal_size() else {
                    continue;
                };
                if write_size(&mut writer, size).is_err() {
                    return;
                }
            }
        })
        .map_err(io::Error::other)?;
        Ok(Some((
            reader,
            Self {
                signals: handle,
                thread: Some(thread),
            },
        )))
    }
}

impl Drop for WindowSizeForwarder {
    fn drop(&mut self) {
        self.signals.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// (read end, write end), both close-on-exec.
fn pipe() -> io::Result<(OwnedFd, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: two fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn write_size(writer: &mut File, (rows, cols): (u16, u16)) -> io::Result<()> {
    writeln!(writer, "{rows} {cols}")
}

/// Rows and columns of the terminal on stdin.
fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain old data; all-zero is a valid value to overwrite.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize struct to the valid pointer given.
    let ok = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_row > 0 && size.ws_col > 0).then_some((size.ws_row, size.ws_col))
}
