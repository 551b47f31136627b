//! QEMU's pvpanic ISA device (ACPI id QEMU0001): one I/O port the guest kernel writes
//! to from its panic notifier, so a panic is told apart from a reboot.

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, GuestExit};

/// The guest kernel panicked.
pub const PANICKED: u8 = 1 << 0;
/// A crash kernel was loaded and is about to run (kdump); not an exit.
pub const CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic port: a write with [`PANICKED`] set is a [`GuestExit::Panic`]; reads
/// announce the events understood.
pub struct PvPanic {
    exit: ExitNotifier,
}

impl PvPanic {
    /// A port that reports a panic to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self { exit }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Reading the port returns the events this device understands.
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PANICKED | CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|events| events & PANICKED != 0) {
            self.exit.guest_stopped(GuestExit::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::VmExit;

    #[test]
    fn panicked_event_requests_panic_exit() {
        let exit = ExitNotifier::new().unwrap();
        let mut dev = PvPanic::new(exit.clone());
        let mut caps = [0];
        dev.read(0, &mut caps);
        assert_eq!(caps[0] & PANICKED, PANICKED);
        dev.write(0, &[CRASH_LOADED]);
        assert_eq!(exit.reason(), None);
        dev.write(0, &[PANICKED]);
        assert_eq!(exit.reason(), Some(VmExit::Guest(GuestExit::Panic)));
    }
}
