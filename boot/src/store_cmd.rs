//! `tvix-boot store ...`: import, list, inspect and export store paths.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct StoreArgs {}

pub fn run(_args: StoreArgs) -> ExitCode {
    ExitCode::FAILURE
}
