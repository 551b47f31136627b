//! tvix-boot's virtual machine monitor: a KVM microVM that boots a Linux kernel.
//!
//! ```no_run
//! use tvix_boot_vmm::{Console, Initrd, Vm, VmConfig};
//! let config = VmConfig {
//!     initrd: Some(Initrd::File("initrd.cpio".into())),
//!     cmdline: "console=ttyS0 reboot=k panic=-1".into(),
//!     vcpus: 2,
//!     mem_size: 512 << 20,
//!     ..VmConfig::new("vmlinux")
//! };
//! let exit = Vm::new(config)?.run()?;
//! println!("guest stopped: {exit:?}");
//! # Ok::<(), tvix_boot_vmm::VmError>(())
//! ```

#![warn(missing_docs)]

pub mod arch;
pub mod startup;
mod vcpu;
mod vm;

pub use arch::x86_64::acpi::AcpiError;
pub use arch::x86_64::linux::{BootError, Initrd};
pub use arch::x86_64::mptable::MpTableError;
pub use arch::x86_64::regs::RegsError;
pub use tvix_boot_devices::GuestExit as VmExit;
pub use tvix_boot_devices::bus::{BusDevice, SharedDevice};
pub use tvix_boot_devices::status_port::GuestStatus;
pub use vcpu::VcpuError;
pub use vm::{Console, MAX_VCPUS, MmioSlot, Vm, VmConfig, VmError};
