//! Signals this process gets, in one way: blocked in every thread ([`block_signals`],
//! before any thread starts; a signalfd only sees signals that no thread takes) and read
//! from a signalfd.
//!
//! For a VM, by a subscriber of its event loop ([`HostSignals`]):
//! - SIGWINCH, when the program has the terminal ([`crate::MicroVm::follow_terminal_size`]):
//!   the terminal's size goes as a `ROWS COLS` line on a virtio-console port, at once and
//!   after every change; the guest init applies each line to the console (see the init's
//!   `follow_window_size`), which signals SIGWINCH to the program.
//! - SIGTERM, SIGHUP, SIGINT and SIGQUIT, with [`crate::MicroVm::forward_signals`]: passed
//!   to the guest's program, so that tvix-boot in a pipeline or under a supervisor is
//!   signalled like the program itself would be. SIGTERM and SIGHUP also stop the VM
//!   after the stop grace time, should the guest not end by then. A guest without such
//!   a program is stopped at once.
//!
//! For the commands that serve until they are told to stop (a host mount, a vhost-user
//! backend, a binary cache): [`StopSignals`], SIGINT and SIGTERM.
//!
//! The other signal handlers in the process are mechanisms, not signals from outside:
//! the vCPU kick (a real-time signal one thread sends another to interrupt KVM_RUN) and
//! the SIGSYS handler of the seccomp filters.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tvix_boot_devices::event_loop::{EventOps, EventSet, Events, MutEventSubscriber};
use tvix_boot_vmm::HostStop;
use vmm_sys_util::eventfd::EventFd;

use crate::microvm::{VmStopper, nonblocking_pipe};

/// The signals [`crate::MicroVm::forward_signals`] passes to the guest's program.
pub const FORWARDED_SIGNALS: [i32; 4] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGQUIT];

/// The signals [`StopSignals`] waits for.
pub const STOP_SIGNALS: [i32; 2] = [libc::SIGINT, libc::SIGTERM];

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

/// Ends the process by `signal`'s default action, so that its parent sees the real cause:
/// for a process that stands for a guest the signal stopped (its VM has ended and the
/// terminal is restored by then). Returns only if that action does not end the process.
pub fn die_of_signal(signal: i32) {
    let Ok(set) = signal_set(&[signal]) else {
        return;
    };
    // SAFETY: plain calls without pointers but the initialised sigset.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
        // Blocked (for the signalfd): unblocking delivers it.
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// A signalfd for `signals`, which must be blocked in every thread.
fn signalfd(signals: &[i32], flags: libc::c_int) -> io::Result<File> {
    let set = signal_set(signals)?;
    // SAFETY: `set` is a valid sigset; -1 asks for a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, flags | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The number of the next signal in `signals`, a signalfd; `None` if none is pending
/// (non-blocking) or the read failed.
fn read_signal(signals: &mut File) -> Option<i32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    match signals.read(&mut info) {
        // ssi_signo is the first field, a u32.
        Ok(n) if n == info.len() => {
            Some(u32::from_ne_bytes(info[..4].try_into().expect("4 bytes")) as i32)
        }
        _ => None,
    }
}

/// SIGINT and SIGTERM for a command that serves until it is told to stop; block
/// [`STOP_SIGNALS`] first thing in `main`. [`Self::wait`] also ends when a
/// [`StopSignals::waker`] is woken (the served thing went away by itself).
pub struct StopSignals {
    signals: File,
    woken: std::sync::Arc<EventFd>,
}

impl StopSignals {
    /// Starts taking [`STOP_SIGNALS`]; one sent before is taken too, if it is still
    /// pending (blocked).
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            signals: signalfd(&STOP_SIGNALS, libc::SFD_NONBLOCK)?,
            woken: std::sync::Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    /// Ends [`Self::wait`] without a signal, from any thread.
    pub fn waker(&self) -> impl Fn() + Send + Sync + 'static {
        let woken = self.woken.clone();
        move || {
            let _ = woken.write(1);
        }
    }

    /// Blocks until a stop signal arrives (`Some(signal)`) or the waker is woken
    /// (`None`).
    pub fn wait(&mut self) -> io::Result<Option<i32>> {
        loop {
            if let Some(signal) = read_signal(&mut self.signals) {
                return Ok(Some(signal));
            }
            if self.woken.read().is_ok() {
                return Ok(None);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.signals.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.woken.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the call's duration.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    /// Resolves when a stop signal arrives, for async code (the binary cache), on a
    /// tokio runtime with I/O enabled. The waker is not looked at.
    pub async fn recv(self) -> io::Result<i32> {
        // SAFETY: the AsyncFd owns the File, whose descriptor stays open and the same
        // signalfd until the AsyncFd drops it.
        let mut signals = unsafe { tokio::io::unix::AsyncFd::register(self.signals) }
            .map_err(|e| e.into_parts().1)?;
        loop {
            let mut ready = signals.readable_mut().await?;
            if let Some(signal) = read_signal(ready.get_inner_mut()) {
                return Ok(signal);
            }
            ready.clear_ready();
        }
    }
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
        Ok(Self {
            signals: signalfd(&wanted, libc::SFD_NONBLOCK)?,
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
        if !vm.takes_requests() {
            tracing::info!(
                signal,
                "stopping the guest: it has no program to pass it to"
            );
            vm.stop_now(HostStop::Signal(signal));
            return;
        }
        tracing::info!(signal, "passing the signal to the guest's program");
        if let Err(e) = vm.signal(signal) {
            tracing::warn!("cannot pass signal {signal} to the guest, stopping it: {e}");
            vm.stop_now(HostStop::Signal(signal));
            return;
        }
        if matches!(signal, libc::SIGTERM | libc::SIGHUP) {
            vm.stop_after_grace(HostStop::Signal(signal));
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
        while let Some(signal) = read_signal(&mut self.signals) {
            self.handle(signal);
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
        assert_eq!(read_signal(&mut subscriber.signals), Some(libc::SIGWINCH));
        assert_eq!(read_signal(&mut subscriber.signals), None);
    }

    #[test]
    fn a_stop_signal_or_the_waker_ends_the_wait() {
        // Blocked in this test's thread only, which is where it is raised.
        block_signals(&STOP_SIGNALS).unwrap();
        let mut signals = StopSignals::new().unwrap();
        let wake = signals.waker();
        let thread = std::thread::spawn(wake);
        assert_eq!(signals.wait().unwrap(), None);
        thread.join().unwrap();
        // SAFETY: raise takes no pointers; the signal is blocked, so it stays pending.
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(signals.wait().unwrap(), Some(libc::SIGTERM));
    }
}
