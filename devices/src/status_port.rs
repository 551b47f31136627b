//! The exit-status port: a guest-to-host channel for one 32-bit number.
//!
//! The guest writes a value with a 32-bit `out`; the device keeps the last one, and the
//! VMM reads it after the guest has stopped. tvix-boot's guest init writes the exit
//! status of the program it ran, so `tvix-boot --run` can exit with it. Unlike QEMU's
//! isa-debug-exit, a write does not stop the VM: the guest still shuts down cleanly
//! (console drained, ACPI power-off), and only then does the value matter.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// Width of the port: one 32-bit register, as the guest init's protocol has it.
pub const STATUS_PORT_LEN: u64 = tvix_boot_guest_init::protocol::EXIT_STATUS_PORT_LEN as u64;

/// The last value the guest wrote. Cheap to clone; every clone sees the same value.
#[derive(Clone, Default)]
pub struct GuestStatus(Arc<Mutex<Option<u32>>>);

impl GuestStatus {
    /// The last value written, or `None` if the guest never wrote one.
    pub fn get(&self) -> Option<u32> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, value: u32) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    }
}

/// The port device; the values it receives are read through its [`GuestStatus`].
pub struct StatusPort {
    status: GuestStatus,
}

impl StatusPort {
    /// A port that stores what the guest writes in `status`.
    pub fn new(status: GuestStatus) -> Self {
        Self { status }
    }
}

impl BusDevice for StatusPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a whole register write counts: a stray byte write (a driver probing
        // ports) must not be mistaken for a status.
        match (offset, <[u8; STATUS_PORT_LEN as usize]>::try_from(data)) {
            (0, Ok(bytes)) => self.status.set(u32::from_le_bytes(bytes)),
            _ => tracing::debug!(
                "status port: ignored {}-byte write at offset {offset}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_whole_32_bit_write() {
        let status = GuestStatus::default();
        let mut port = StatusPort::new(status.clone());
        assert_eq!(status.get(), None);
        port.write(0, &7u32.to_le_bytes());
        port.write(0, &256u32.to_le_bytes());
        assert_eq!(status.get(), Some(256));
        // Partial or misplaced writes leave it alone.
        port.write(0, &[1]);
        port.write(0, &[1, 0]);
        port.write(1, &[0, 0, 0]);
        port.write(2, &[9, 0]);
        assert_eq!(status.get(), Some(256));
        let mut read = [0xff; 4];
        port.read(0, &mut read);
        assert_eq!(read, [0; 4]);
    }
}
