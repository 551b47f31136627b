//! Booting a VM from the command line: a thin layer over the vmm crate.

use std::process::ExitCode;

/// Flags that describe the VM to boot.
#[derive(clap::Args)]
pub struct VmArgs {}

pub fn run(_args: VmArgs) -> ExitCode {
    eprintln!("tvix-boot: booting a VM is not implemented yet");
    ExitCode::FAILURE
}
