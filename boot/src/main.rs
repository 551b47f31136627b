//! `tvix-boot`: boot a microVM whose /nix/store is served from a content-addressed store.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    cli::main()
}
