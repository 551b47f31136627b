//! `--seccomp`: the system-call filters of devices::seccomp, for the commands that serve a
//! guest (a VM, the vhost-user backend) or a FUSE mount.

use tvix_boot_devices::seccomp::{self, Policy, SeccompError, SeccompMode, ThreadRole};

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
    pub fn enable(self, store_addrs: &StoreAddrArgs) -> Result<(), SeccompError> {
        let mode = match self.seccomp {
            SeccompArg::On => SeccompMode::Enforce,
            SeccompArg::Log => SeccompMode::Log,
            SeccompArg::Off => return Ok(()),
        };
        let started = tvix_boot_store::start_io_runtime(|| {
            if let Err(e) = seccomp::apply_to_current_thread(ThreadRole::StoreIo) {
                // A store thread without its filter must not run.
                eprintln!("tvix-boot: {e}");
                std::process::abort();
            }
        })
        .map_err(|source| SeccompError::Spawn {
            name: "store-io-start".to_owned(),
            source,
        })?;
        if !started {
            tracing::warn!("the store's I/O threads started before their filter was ready");
        }
        seccomp::enable(
            mode,
            Policy {
                network: store_addrs.fetches_over_network(),
            },
        )
    }
}
