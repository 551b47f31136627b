//! tvix-boot as a library: boot Linux microVMs whose `/nix/store` is a content-addressed
//! store, from your own program.
//!
//! ```no_run
//! use std::io::Read;
//! use tvix_boot::{MicroVm, Stdio};
//!
//! // A program already in the (embedded) store; the kernel from boot/guest-kernel/build.sh.
//! let mut vm = MicroVm::run("/nix/store/<hash>-hello/bin/hello")
//!     .stdout(Stdio::Piped)
//!     .start()?;
//! let mut out = String::new();
//! vm.stdout.take().unwrap().read_to_string(&mut out).unwrap();
//! assert_eq!(vm.wait()?.code(), Some(0));
//! # Ok::<(), tvix_boot::MicroVmError>(())
//! ```
//!
//! Each VM runs on threads of its own; several run at once in one process, also from one
//! store. Nothing process-wide happens unless asked for: [`MicroVm::console_stdio`] puts
//! the terminal in raw mode (and restores it on the way out), and
//! [`seccomp::enable`] turns on system-call filters for all VMs started after it.

#![warn(missing_docs)]

mod guest_mode;
mod host_signals;
mod initrd;
mod microvm;
mod network;
pub mod seccomp;
mod terminal;

pub use guest_mode::GuestModeError;
pub use host_signals::{
    FORWARDED_SIGNALS, STOP_SIGNALS, StopSignals, block_signals, die_of_signal,
};
pub use initrd::InitrdError;
pub use microvm::{
    Console, DEFAULT_CMDLINE, DEFAULT_STOP_GRACE, ExitStatus, GuestEnd, MicroVm, MicroVmError,
    RunningVm, Stdio, VmStopper, default_kernel,
};
pub use network::{GUEST_NETWORK, Network, NetworkError, PublishedPort, TAP_MTU};
/// The content-addressed store a VM serves at /nix/store.
pub use tvix_boot_store as store;
pub use tvix_boot_store::{Store, StoreAddrs};
pub use tvix_boot_virtiofs::QueueService;
pub use tvix_boot_vmm::HostStop;
