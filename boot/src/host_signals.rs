//! Signals this process gets, for the VM: read from a signalfd by a subscriber of the
//! VM's event loop.
//!
//! - SIGWINCH, when the program has the terminal ([`crate::MicroVm::follow_terminal_size`]):
//!   the terminal's size goes as a `ROWS COLS` line on a virtio-console port, at once and
//!   after every change; the guest init applies each line to the console (see the init's
//!   `follow_window_size`), which signals SIGWINCH to the program.
//! - SIGTERM, SIGHUP, SIGINT and SIGQUIT, with [`crate::MicroVm::forward_signals`]: passed
//!   to the guest's program, so that tvix-boot in a pipeline or under a supervisor is
//!   signalled like the program itself would be. SIGTERM and SIGHUP also stop the VM
//!   after the stop grace time, should the guest not end by then.
//!
//! A signalfd only sees signals that no thread takes: every thread of the process must
//! block them ([`block_signals`], before any thread starts).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

use tvix_boot_devices::GuestExit;
use tvix_boot_devices::event_loop::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::microvm::{VmStopper, nonblocking_pipe};

/// The signals [`crate::MicroVm::forward_signals`] passes to the guest's program.
pub const FORWARDED_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];

/// Blocks `signals` in the calling thread and every thread it starts from now on, so that
/// a VM's signalfd sees them (SIGWINCH for [`crate::MicroVm::follow_terminal_size`],
/// [`FORWARDED_SIGNALS`] for [`crate::MicroVm::forward_signals`]). Call it before any
/// thread starts (first thing in `main`): a thread started before keeps taking them. For
/// programs that own their signals; a library does not change signal handling by itself.
pub fn block_signals(signals: &[i32]) -> io::Result<()> {
    let set = signal_set(signals)?;
    // SAFETY: `set` is a valid, initialised sigset; the old mask is not asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn signal_set(signals: &[i32]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset to initialise.
    unsafe { libc::sigemptyset(&mut set) };
    for &signal in signals {
        // SAFETY: `set` is initialised; an invalid number is reported as an error.
        if unsafe { libc::sigaddset(&mut set, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(set)
}

/// The terminal-size half: the guest's size port.
pub(crate) struct TerminalSizes {
    writer: File,
    last: (u16, u16),
}

impl TerminalSizes {
    /// The read end for the guest's size port (its first line already written), and
    /// what feeds it; `None` when stdin is not a terminal.
    pub(crate) fn start() -> io::Result<Option<(OwnedFd, Self)>> {
        let Some(size) = terminal_size() else {
            return Ok(None);
        };
        let (reader, mut writer) = nonblocking_pipe()?;
        write_size(&mut writer, size)?;
        Ok(Some((reader, Self { writer, last: size })))
    }

    /// Writes the size if it changed; false once the guest no longer takes them.
    fn follow(&mut self) -> bool {
        let Some(size) = terminal_size() else {
            return true;
        };
        if size == self.last {
            return true;
        }
        self.last = size;
        match write_size(&mut self.writer, size) {
            Ok(()) => true,
            // The guest has not taken the earlier sizes yet; it will get a later one.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => true,
            Err(e) => {
                tracing::debug!("terminal size not passed on: {e}");
                false
            }
        }
    }
}

/// The subscriber: one signalfd for the signals the VM takes.
pub(crate) struct HostSignals {
    signals: File,
    sizes: Option<TerminalSizes>,
    /// Where forwarded signals go.
    forward: Option<VmStopper>,
}

impl HostSignals {
    /// Takes SIGWINCH when `sizes` is given, and [`FORWARDED_SIGNALS`] when `forward` is.
    pub(crate) fn new(
        sizes: Option<TerminalSizes>,
        forward: Option<VmStopper>,
    ) -> io::Result<Self> {
        let mut wanted = Vec::new();
        if sizes.is_some() {
            wanted.push(libc::SIGWINCH);
        }
        if forward.is_some() {
            wanted.extend(FORWARDED_SIGNALS);
        }
        let set = signal_set(&wanted)?;
        // SAFETY: `set` is a valid sigset; -1 asks for a new signalfd.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
            signals: unsafe { File::from_raw_fd(fd) },
            sizes,
            forward,
        })
    }

    fn handle(&mut self, signal: i32) {
        if signal == libc::SIGWINCH {
            if let Some(sizes) = &mut self.sizes
                && !sizes.follow()
            {
                self.sizes = None;
            }
            return;
        }
        let Some(vm) = &self.forward else {
            return;
        };
        tracing::info!(signal, "passing the signal to the guest's program");
        if let Err(e) = vm.signal(signal) {
            tracing::warn!("cannot pass signal {signal} to the guest, stopping it: {e}");
            vm.kill();
            return;
        }
        if matches!(signal, libc::SIGTERM | libc::SIGHUP) {
            vm.stop_after_grace(GuestExit::HostSignal(signal));
        }
    }
}

impl MutEventSubscriber for HostSignals {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals, EventSet::IN)) {
            tracing::warn!("signals to this process will not reach the guest: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        while self.signals.read(&mut info).is_ok_and(|n| n == info.len()) {
            // ssi_signo is the first field, a u32.
            let signal = u32::from_ne_bytes(info[..4].try_into().expect("4 bytes"));
            self.handle(signal as i32);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_blocked_here_is_read_from_the_signalfd() {
        // SIGWINCH is ignored by default, so if the test went wrong nothing dies; the
        // test's thread blocks it before raising it at itself.
        block_signals(&[libc::SIGWINCH]).unwrap();
        let mut subscriber = HostSignals::new(
            Some(TerminalSizes {
                writer: tempfile::tempfile().unwrap(),
                last: (0, 0),
            }),
            None,
        )
        .unwrap();
        // SAFETY: raise takes no pointers; the signal is blocked, so it stays pending.
        unsafe { libc::raise(libc::SIGWINCH) };
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        assert_eq!(subscriber.signals.read(&mut info).unwrap(), info.len());
        let signal = u32::from_ne_bytes(info[..4].try_into().unwrap());
        assert_eq!(signal as i32, libc::SIGWINCH);
    }
}
