//! How devices (and vCPUs) tell the VMM that the guest wants to stop.

use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042, ACPI reset register, triple fault).
    Reset,
    /// The guest kernel panicked.
    Panic,
}

struct Inner {
    reason: Mutex<Option<GuestExit>>,
    wake: EventFd,
}

/// Records the first exit request and wakes whoever waits for it.
///
/// Cheap to clone; every clone refers to the same request.
#[derive(Clone)]
pub struct ExitNotifier {
    inner: Arc<Inner>,
}

impl ExitNotifier {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                reason: Mutex::new(None),
                wake: EventFd::new(0)?,
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

    /// Blocks until [`request`](Self::request) or [`wake`](Self::wake) is called.
    pub fn wait(&self) -> io::Result<()> {
        self.inner.wake.read().map(drop)
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
}
