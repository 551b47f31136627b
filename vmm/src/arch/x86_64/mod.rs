//! x86_64: memory layout, boot protocol, firmware tables and vCPU state.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
