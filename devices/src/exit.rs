//! How devices (and vCPUs) tell the VMM that the guest wants to stop, and how the host
//! stops it (a deadline, or at once).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register, triple fault).
    Reset,
    /// The guest kernel panicked (pvpanic, or a KVM crash event).
    Panic,
    /// The host's time limit for the guest ran out.
    TimedOut,
    /// The host stopped the guest without waiting for it.
    Killed,
}

struct Inner {
    reason: Mutex<Option<GuestExit>>,
    /// When the host stops the guest if it has not stopped by then, and with which reason.
    deadline: Mutex<Option<(Instant, GuestExit)>>,
    wake: EventFd,
    /// Apart from `wake`, so a new deadline never hides a wake-up.
    deadline_changed: EventFd,
}

/// Records the first exit request and wakes whoever waits for it.
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
                wake: EventFd::new(0)?,
                deadline_changed: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
        })
    }

    /// Requests that the VM stop. The first request wins: a panic followed by the
    /// reset the guest's `panic=` setting triggers is still a panic.
    pub fn request(&self, why: GuestExit) {
        let mut reason = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            *reason = Some(why);
        }
        drop(reason);
        self.wake();
    }

    /// Wakes the waiter without a guest request (e.g. a vCPU failed).
    pub fn wake(&self) {
        // Cannot fail short of counter overflow, which would still leave it readable.
        let _ = self.inner.wake.write(1);
    }

    /// The request recorded so far, if any.
    pub fn reason(&self) -> Option<GuestExit> {
        *self.inner.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the guest with `why` at `at` unless it stops before; an earlier deadline
    /// set before stays.
    pub fn set_deadline(&self, at: Instant, why: GuestExit) {
        let mut deadline = self
            .inner
            .deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if deadline.is_none_or(|(earlier, _)| at < earlier) {
            *deadline = Some((at, why));
        }
        drop(deadline);
        // The waiter recomputes how long to sleep. Cannot fail short of overflow.
        let _ = self.inner.deadline_changed.write(1);
    }

    /// Blocks until [`request`](Self::request) or [`wake`](Self::wake) is called, or the
    /// deadline passes (which then is the request).
    pub fn wait(&self) -> io::Result<()> {
        loop {
            let deadline = *self
                .inner
                .deadline
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let timeout_ms = match deadline {
                None => -1,
                Some((at, why)) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.request(why);
                        return self.inner.wake.read().map(drop);
                    }
                    // Rounded up, so the deadline has passed when poll returns.
                    i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
                }
            };
            let mut pollfds =
                [&self.inner.wake, &self.inner.deadline_changed].map(|fd| libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            // SAFETY: a valid array of two pollfds that outlives the call.
            let ready = unsafe { libc::poll(pollfds.as_mut_ptr(), 2, timeout_ms) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if pollfds[0].revents != 0 {
                return self.inner.wake.read().map(drop);
            }
            if pollfds[1].revents != 0 {
                // Nonblocking: another waiter may have taken it.
                let _ = self.inner.deadline_changed.read();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_wakes() {
        let notifier = ExitNotifier::new().unwrap();
        assert_eq!(notifier.reason(), None);
        notifier.request(GuestExit::Panic);
        notifier.request(GuestExit::Reset);
        notifier.wait().unwrap();
        assert_eq!(notifier.reason(), Some(GuestExit::Panic));
    }

    #[test]
    fn a_deadline_that_passes_is_the_request() {
        let notifier = ExitNotifier::new().unwrap();
        let start = Instant::now();
        notifier.set_deadline(
            start + std::time::Duration::from_secs(3600),
            GuestExit::TimedOut,
        );
        notifier.set_deadline(
            start + std::time::Duration::from_millis(50),
            GuestExit::Killed,
        );
        notifier.wait().unwrap();
        assert_eq!(notifier.reason(), Some(GuestExit::Killed));
        assert!(start.elapsed() >= std::time::Duration::from_millis(50));
    }

    #[test]
    fn a_guest_request_before_the_deadline_wins() {
        let notifier = ExitNotifier::new().unwrap();
        notifier.set_deadline(
            Instant::now() + std::time::Duration::from_secs(3600),
            GuestExit::TimedOut,
        );
        let guest = notifier.clone();
        let thread = std::thread::spawn(move || guest.request(GuestExit::PowerOff));
        notifier.wait().unwrap();
        thread.join().unwrap();
        assert_eq!(notifier.reason(), Some(GuestExit::PowerOff));
    }
}
