//! `--seccomp`: the system-call filters (tvix_boot::seccomp), for the commands that serve
//! a guest (a VM, the vhost-user backend) or a FUSE mount.

use tvix_boot::seccomp::{self, EnableError, Policy, SeccompMode};

use super::store_command::StoreAddrArgs;

#[derive(clap::Args, Clone, Copy, Debug)]
pub struct SeccompArgs {
    /// System-call filters on the threads that serve the guest: `on` (a call outside a
    /// thread's role ends tvix-boot with SIGSYS and a message naming it), `log` (such
    /// calls are allowed and logged by the kernel: audit type 1326 in dmesg) or `off`.
    #[arg(long, value_enum, value_name = "on|log|off", default_value_t = SeccompArg::On)]
    seccomp: SeccompArg,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SeccompArg {
    On,
    Log,
    Off,
}

impl SeccompArgs {
    /// Turns the filters on, before any filtered thread (the store's I/O runtime
    /// included) starts, so each starts under its own. Call it before the store is used.
    pub fn enable(self, store_addrs: &StoreAddrArgs) -> Result<(), EnableError> {
        let mode = match self.seccomp {
            SeccompArg::On => SeccompMode::Enforce,
            SeccompArg::Log => SeccompMode::Log,
            SeccompArg::Off => return Ok(()),
        };
        seccomp::enable(
            mode,
            Policy {
                network: store_addrs.fetches_over_network(),
            },
        )
    }
}
