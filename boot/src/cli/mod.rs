//! The `tvix-boot` command line: flags in, exit code out. `run_vm` boots a VM through the
//! library ([`tvix_boot::MicroVm`]); `store_command` works with the store.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tvix_boot_vmm::startup;

mod console_log;
mod mode_flags;
mod run_vm;
mod seccomp_flag;
mod store_command;

#[derive(Parser)]
#[command(
    name = "tvix-boot",
    version,
    about = "Boot a Linux microVM with /nix/store served from a content-addressed store"
)]
struct Cli {
    #[command(flatten)]
    store: store_command::StoreAddrArgs,

    #[command(flatten)]
    vm: run_vm::VmArgs,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Work with the content-addressed store.
    Store(store_command::StoreArgs),
}

/// Parses the flags and runs the command they name.
pub fn main() -> ExitCode {
    let entered = startup::monotonic_ns();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TVIX_BOOT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    startup::mark_at("main entered", entered);
    startup::mark("logging set up");
    let cli = Cli::parse();
    startup::mark("flags parsed");
    // The signals a command reads from a signalfd, blocked before its first thread
    // starts: a signalfd only sees signals that no thread takes.
    let signals: &[i32] = match &cli.command {
        None => &run_vm::SIGNALS,
        Some(Command::Store(args)) if args.waits_for_stop_signals() => &tvix_boot::STOP_SIGNALS,
        Some(Command::Store(_)) => &[],
    };
    if let Err(e) = tvix_boot::block_signals(signals) {
        eprintln!("tvix-boot: cannot take over the signals {signals:?}: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Some(Command::Store(args)) => store_command::run(&cli.store, args),
        None => run_vm::run(cli.vm, &cli.store),
    }
}
