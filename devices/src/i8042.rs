//! The bit of the i8042 keyboard controller a guest uses to reset the machine
//! (Linux's `reboot=k`: command 0xfe written to port 0x64).

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, GuestExit};

/// Offset of the command/status port (0x64) from the data port (0x60).
pub const COMMAND_OFFSET: u64 = 4;
/// Ports covered: data (0x60) .. command (0x64).
pub const PORT_RANGE_LEN: u64 = COMMAND_OFFSET + 1;

struct ResetRequest(ExitNotifier);

impl Trigger for ResetRequest {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.guest_stopped(GuestExit::Reset);
        Ok(())
    }
}

/// vm-superio's i8042 model: reads return 0, the reset command resets.
pub struct I8042 {
    device: I8042Device<ResetRequest>,
}

impl I8042 {
    /// A controller that reports a reset command to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self {
            device: I8042Device::new(ResetRequest(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |o| self.device.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            let Ok(()) = self.device.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::VmExit;

    #[test]
    fn reset_command_requests_reset() {
        let exit = ExitNotifier::new().unwrap();
        let mut i8042 = I8042::new(exit.clone());
        i8042.write(0, &[0xfe]);
        assert_eq!(
            exit.reason(),
            None,
            "0xfe on the data port is not a command"
        );
        i8042.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::Guest(GuestExit::Reset)));
    }
}
