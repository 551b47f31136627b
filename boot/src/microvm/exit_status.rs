//! How a microVM ended: what the guest did, or why the host stopped it.

use tvix_boot_guest_init::protocol::STATUS_INIT_FAILED;
use tvix_boot_vmm::{GuestExit, HostStop, VmExit};

/// How a microVM ended: the guest stopped itself ([`ExitStatus::Guest`]), or the host
/// stopped it first ([`ExitStatus::Host`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest stopped itself; this is what it reported.
    Guest(GuestEnd),
    /// The host stopped the guest before it stopped itself.
    Host(HostStop),
}

/// How a guest that stopped itself ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest's program (`run`, `shell`, `find`) ended with this status, as a shell
    /// reports it: 128 + N when signal N ended it, 127 when it could not be found.
    Exited(u8),
    /// The guest powered off, or reset, without reporting a status: a system booted
    /// with `init`, or a custom initrd.
    PoweredOff,
    /// tvix-boot's init expected to report a status and did not (a guest kernel without
    /// CONFIG_X86_IOPL_IOPERM cannot write the status port).
    NoStatus,
    /// tvix-boot's init failed; its error is on the console.
    InitFailed,
    /// The guest reported a status that is not one.
    InvalidStatus(u32),
    /// The guest kernel panicked.
    Panicked,
}

impl ExitStatus {
    /// What `exit` means for a guest that reported `reported` on the exit-status port,
    /// and was (`expects_status`) or was not running a program under tvix-boot's init.
    pub(crate) fn from_vm(exit: VmExit, reported: Option<u32>, expects_status: bool) -> Self {
        let end = match exit {
            VmExit::Host(why) => return Self::Host(why),
            VmExit::Guest(GuestExit::Panic) => GuestEnd::Panicked,
            VmExit::Guest(GuestExit::PowerOff | GuestExit::Reset) => match reported {
                Some(STATUS_INIT_FAILED) => GuestEnd::InitFailed,
                Some(status) => {
                    u8::try_from(status).map_or(GuestEnd::InvalidStatus(status), GuestEnd::Exited)
                }
                None if expects_status => GuestEnd::NoStatus,
                None => GuestEnd::PoweredOff,
            },
        };
        Self::Guest(end)
    }

    /// The program's exit status, if the guest ran one and it exited (like
    /// [`std::process::ExitStatus::code`]).
    pub fn code(&self) -> Option<u8> {
        match self {
            Self::Guest(GuestEnd::Exited(code)) => Some(*code),
            _ => None,
        }
    }

    /// Whether the program ran and exited with 0, or the system powered off.
    pub fn success(&self) -> bool {
        matches!(
            self,
            Self::Guest(GuestEnd::Exited(0) | GuestEnd::PoweredOff)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_come_from_devices_and_the_status_port() {
        use GuestEnd::*;
        let guest = |exit| VmExit::Guest(exit);
        let from = ExitStatus::from_vm;
        assert_eq!(
            from(guest(GuestExit::PowerOff), Some(0), true),
            ExitStatus::Guest(Exited(0))
        );
        assert_eq!(
            from(guest(GuestExit::Reset), Some(143), true),
            ExitStatus::Guest(Exited(143))
        );
        assert_eq!(
            from(guest(GuestExit::PowerOff), None, true),
            ExitStatus::Guest(NoStatus)
        );
        assert_eq!(
            from(guest(GuestExit::PowerOff), None, false),
            ExitStatus::Guest(PoweredOff)
        );
        assert_eq!(
            from(guest(GuestExit::PowerOff), Some(STATUS_INIT_FAILED), true),
            ExitStatus::Guest(InitFailed)
        );
        assert_eq!(
            from(guest(GuestExit::PowerOff), Some(300), true),
            ExitStatus::Guest(InvalidStatus(300))
        );
        assert_eq!(
            from(guest(GuestExit::Panic), Some(0), true),
            ExitStatus::Guest(Panicked)
        );
        for why in [HostStop::TimedOut, HostStop::Killed, HostStop::Signal(15)] {
            assert_eq!(
                from(VmExit::Host(why), Some(0), true),
                ExitStatus::Host(why)
            );
        }
        assert_eq!(ExitStatus::Guest(Exited(3)).code(), Some(3));
        assert_eq!(ExitStatus::Host(HostStop::TimedOut).code(), None);
        assert!(ExitStatus::Guest(PoweredOff).success());
        assert!(!ExitStatus::Guest(Exited(1)).success());
    }
}
