//! The one-byte I/O register a hardware-reduced ACPI platform uses for sleep control
//! (power-off = S5), sleep status, and reset; the FADT points the guest at it.

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, GuestExit};

/// Value the FADT's RESET_REG/RESET_VALUE tell the guest to write to reset.
pub const RESET_VALUE: u8 = 1;
/// The sleep type the DSDT's `_S5_` package announces for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// SLP_TYPx field of the sleep control register (ACPI 6.x, 4.8.3.7).
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111;
/// SLP_EN: perform the transition to the sleep type written alongside.
const SLEEP_ENABLE: u8 = 1 << 5;

/// Sleep control / status / reset register.
pub struct AcpiSleepRegister {
    exit: ExitNotifier,
}

impl AcpiSleepRegister {
    /// A register that reports power-off and reset to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiSleepRegister {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS never set; we do not resume from sleep states.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let [value] = data else { return };
        if *value == RESET_VALUE {
            self.exit.guest_stopped(GuestExit::Reset);
        } else if value & SLEEP_ENABLE != 0
            && (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK == S5_SLEEP_TYPE
        {
            self.exit.guest_stopped(GuestExit::PowerOff);
        }
    }
}

/// What the guest writes to enter S5 (for tests and hand-written guests).
pub const fn s5_command() -> u8 {
    (S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::VmExit;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let exit = ExitNotifier::new().unwrap();
        let mut reg = AcpiSleepRegister::new(exit.clone());
        reg.write(0, &[S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT]);
        assert_eq!(exit.reason(), None, "no SLP_EN, no transition");
        reg.write(0, &[s5_command()]);
        assert_eq!(exit.reason(), Some(VmExit::Guest(GuestExit::PowerOff)));

        let exit = ExitNotifier::new().unwrap();
        AcpiSleepRegister::new(exit.clone()).write(0, &[RESET_VALUE]);
        assert_eq!(exit.reason(), Some(VmExit::Guest(GuestExit::Reset)));
    }
}
