//! How devices (and vCPUs) tell the VMM that the guest wants to stop, and how the host
//! stops it (a deadline, or at once). The VM's event loop watches all of it through an
//! [`ExitWatcher`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

/// Why a VM stopped: the guest's own doing, or the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest stopped itself.
    Guest(GuestExit),
    /// The host stopped the guest.
    Host(HostStop),
}

/// How a guest stopped itself; a device saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register, triple fault).
    Reset,
    /// The guest kernel panicked (pvpanic, or a KVM crash event).
    Panic,
}

/// Why the host stopped a guest that had not stopped itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostStop {
    /// The host's time limit for the guest ran out.
    TimedOut,
    /// The host stopped the guest without waiting for it (or waited for it to stop after
    /// being asked, and it did not within the grace time).
    Killed,
    /// The host process got this signal, passed it to the guest, and the guest did not
    /// stop within the grace time.
    Signal(i32),
}

struct Inner {
    reason: Mutex<Option<VmExit>>,
    /// When the host stops the guest if it has not stopped by then, and with which reason.
    deadline: Mutex<Option<(Instant, HostStop)>>,
    /// Set by every request and wake-up, before `wake` is signalled: the VM is ending.
    woken: AtomicBool,
    /// The host asked to stop without waiting, after the guest's own request too: output
    /// still waiting for its host reader is abandoned.
    forced: AtomicBool,
    wake: EventFd,
    /// Apart from `wake`, so a new deadline never hides a wake-up.
    deadline_changed: EventFd,
}

/// Records the first exit request and wakes the VM's event loop (see [`ExitWatcher`]).
///
/// Cheap to clone; every clone refers to the same request.
#[derive(Clone)]
pub struct ExitNotifier {
    inner: Arc<Inner>,
}

impl ExitNotifier {
    /// A notifier with no request and no deadline. Fails only if eventfds cannot be created.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                reason: Mutex::new(None),
                deadline: Mutex::new(None),
                woken: AtomicBool::new(false),
                forced: AtomicBool::new(false),
                wake: EventFd::new(libc::EFD_NONBLOCK)?,
                deadline_changed: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    /// A device saw the guest stop itself. The first request wins: a panic followed by
    /// the reset the guest's `panic=` setting triggers is still a panic.
    pub fn guest_stopped(&self, how: GuestExit) {
        self.request(VmExit::Guest(how));
    }

    /// The host stops the guest now. [`HostStop::Killed`] and [`HostStop::Signal`] also
    /// abandon output still waiting for its host reader, even after the guest's own stop.
    pub fn host_stop(&self, why: HostStop) {
        self.request(VmExit::Host(why));
    }

    fn request(&self, why: VmExit) {
        let mut reason = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            *reason = Some(why);
        }
        drop(reason);
        if matches!(why, VmExit::Host(HostStop::Killed | HostStop::Signal(_))) {
            self.inner.forced.store(true, Ordering::Release);
        }
        self.wake();
    }

    /// Wakes the event loop without a guest request (e.g. a vCPU failed): the VM ends.
    pub fn wake(&self) {
        self.inner.woken.store(true, Ordering::Release);
        // Cannot fail short of counter overflow, which would still leave it readable.
        let _ = self.inner.wake.write(1);
    }

    /// Whether the VM is ending: a request, a wake-up, or a deadline that passed.
    pub fn woken(&self) -> bool {
        self.inner.woken.load(Ordering::Acquire)
    }

    /// Whether the host asked to stop at once ([`HostStop::Killed`], or a grace time
    /// after a [`HostStop::Signal`] ran out), even after the guest's own request.
    pub fn forced(&self) -> bool {
        self.inner.forced.load(Ordering::Acquire)
    }

    /// The request recorded so far, if any.
    pub fn reason(&self) -> Option<VmExit> {
        *self.inner.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the guest with `why` at `at` unless it stops before; an earlier deadline
    /// set before stays.
    pub fn set_deadline(&self, at: Instant, why: HostStop) {
        let mut deadline = self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if deadline.is_none_or(|(earlier, _)| at < earlier) {
            *deadline = Some((at, why));
        }
        drop(deadline);
        // The watcher re-arms its timer. Cannot fail short of overflow.
        let _ = self.inner.deadline_changed.write(1);
    }

    /// The event-loop side: drains the wake-ups and turns the deadline into a timerfd.
    pub fn watcher(&self) -> io::Result<ExitWatcher> {
        Ok(ExitWatcher {
            notifier: self.clone(),
            timer: crate::event_loop::nonblocking_timer()?,
        })
    }
}

/// Subscriber for the VM's event loop: consumes wake-ups (whoever runs the loop checks
/// [`ExitNotifier::woken`] after each round) and requests the deadline's exit when its
/// timer fires.
pub struct ExitWatcher {
    notifier: ExitNotifier,
    timer: TimerFd,
}

const WAKE: u32 = 0;
const DEADLINE_CHANGED: u32 = 1;
const DEADLINE_PASSED: u32 = 2;

impl ExitWatcher {
    fn arm(&mut self) {
        let deadline = *self
            .notifier
            .inner
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some((at, why)) = deadline else {
            return;
        };
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            self.notifier.host_stop(why);
            return;
        }
        if let Err(e) = self.timer.reset(left, None) {
            // Without the timer the deadline cannot be kept: stop now rather than never.
            tracing::warn!("cannot arm the VM's deadline timer, stopping now: {e}");
            self.notifier.host_stop(why);
        }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let inner = &self.notifier.inner;
        for (fd, token) in [
            (inner.wake.as_raw_fd(), WAKE),
            (inner.deadline_changed.as_raw_fd(), DEADLINE_CHANGED),
            (self.timer.as_raw_fd(), DEADLINE_PASSED),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::error!("cannot watch the VM's exit events, stopping it: {e}");
                self.notifier.host_stop(HostStop::Killed);
            }
        }
        self.arm();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            WAKE => {
                let _ = self.notifier.inner.wake.read();
            }
            DEADLINE_CHANGED => {
                let _ = self.notifier.inner.deadline_changed.read();
                self.arm();
            }
            _ => {
                // Non-blocking: a re-arm in the same round may have cleared the expiry.
                let _ = self.timer.wait();
                self.arm();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_loop::EventLoop;

    /// Runs an event loop with only the watcher until the VM would end.
    fn wait(notifier: &ExitNotifier) {
        let mut event_loop = EventLoop::new().unwrap();
        event_loop.add(Box::new(notifier.watcher().unwrap()));
        event_loop.run_until(|| notifier.woken()).unwrap();
    }

    #[test]
    fn first_request_wins_and_wakes() {
        let notifier = ExitNotifier::new().unwrap();
        assert_eq!(notifier.reason(), None);
        notifier.guest_stopped(GuestExit::Panic);
        notifier.guest_stopped(GuestExit::Reset);
        wait(&notifier);
        assert_eq!(notifier.reason(), Some(VmExit::Guest(GuestExit::Panic)));
        assert!(!notifier.forced());
    }

    #[test]
    fn a_deadline_that_passes_is_the_request() {
        let notifier = ExitNotifier::new().unwrap();
        let start = Instant::now();
        notifier.set_deadline(
            start + std::time::Duration::from_secs(3600),
            HostStop::TimedOut,
        );
        notifier.set_deadline(
            start + std::time::Duration::from_millis(50),
            HostStop::Killed,
        );
        wait(&notifier);
        assert_eq!(notifier.reason(), Some(VmExit::Host(HostStop::Killed)));
        assert!(notifier.forced());
        assert!(start.elapsed() >= std::time::Duration::from_millis(50));
    }

    #[test]
    fn a_deadline_set_while_the_loop_runs_is_kept() {
        let notifier = ExitNotifier::new().unwrap();
        let start = Instant::now();
        let host = notifier.clone();
        let thread = std::thread::spawn(move || {
            host.set_deadline(
                Instant::now() + std::time::Duration::from_millis(30),
                HostStop::TimedOut,
            )
        });
        wait(&notifier);
        thread.join().unwrap();
        assert_eq!(notifier.reason(), Some(VmExit::Host(HostStop::TimedOut)));
        assert!(start.elapsed() >= std::time::Duration::from_millis(30));
    }

    #[test]
    fn a_guest_request_before_the_deadline_wins() {
        let notifier = ExitNotifier::new().unwrap();
        notifier.set_deadline(
            Instant::now() + std::time::Duration::from_secs(3600),
            HostStop::TimedOut,
        );
        let guest = notifier.clone();
        let thread = std::thread::spawn(move || guest.guest_stopped(GuestExit::PowerOff));
        wait(&notifier);
        thread.join().unwrap();
        assert_eq!(notifier.reason(), Some(VmExit::Guest(GuestExit::PowerOff)));
    }

    #[test]
    fn a_kill_after_the_guest_stopped_is_still_seen() {
        let notifier = ExitNotifier::new().unwrap();
        notifier.guest_stopped(GuestExit::PowerOff);
        notifier.host_stop(HostStop::Killed);
        assert_eq!(notifier.reason(), Some(VmExit::Guest(GuestExit::PowerOff)));
        assert!(notifier.forced());
    }
}
