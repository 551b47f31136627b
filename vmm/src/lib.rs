//! tvix-boot's virtual machine monitor: a KVM microVM that boots a Linux kernel.
//!
//! ```no_run
//! use tvix_boot_vmm::{ConsoleIo, Initrd, VmBuilder, VmConfig};
//! let config = VmConfig {
//!     initrd: Some(Initrd::File("initrd.cpio".into())),
//!     cmdline: "console=ttyS0 reboot=k panic=-1".into(),
//!     vcpus: 2,
//!     mem_size: 512 << 20,
//!     ..VmConfig::new("vmlinux")
//! };
//! let vm = VmBuilder::new(config, ConsoleIo::output_only(std::io::stdout()))?;
//! // ... add devices and event-loop subscribers here ...
//! let exit = vm.build()?.run()?;
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
pub use tvix_boot_devices::bus::{BusDevice, SharedDevice};
pub use tvix_boot_devices::status_port::GuestStatus;
pub use tvix_boot_devices::{GuestExit, HostStop, VmExit};
pub use vcpu::VcpuError;
pub use vm::{ConsoleIo, MAX_VCPUS, MmioSlot, Vm, VmBuilder, VmConfig, VmError};
