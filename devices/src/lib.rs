//! Emulated devices for tvix-boot guests.
//!
//! Every device implements [`bus::BusDevice`] and is registered on a port-I/O or MMIO
//! [`bus::Bus`] by the VMM, which also decides where it lives (all addresses are in the
//! vmm crate's memory layout). Devices that end the VM (reset, power-off, panic) report
//! that through an [`exit::ExitNotifier`].

#![warn(missing_docs)]

pub mod acpi_sleep;
pub mod bus;
pub mod event_loop;
pub mod exit;
pub mod i8042;
pub mod pvpanic;
pub mod serial;
pub mod status_port;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitNotifier, GuestExit, HostStop, VmExit};
