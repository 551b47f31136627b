//! x86_64: memory layout, boot protocol, firmware tables and vCPU state.

pub(crate) mod acpi;
pub(crate) mod cpuid;
pub mod layout;
pub(crate) mod linux;
pub(crate) mod mptable;
pub(crate) mod regs;
