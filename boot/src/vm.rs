//! Booting a VM from the command line: a thin layer over the vmm crate.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tvix_boot_devices::seccomp::SeccompError;
use tvix_boot_devices::virtio::VirtioDevice;
use tvix_boot_devices::virtio::console::{PortEnd, PortSpec, VirtioConsole};
use tvix_boot_init::protocol::{
    KEY_STDIO_PORTS, KEY_WINSIZE_PORT, Mode, STATUS_INIT_FAILED, STDERR_PORT, STDIN_PORT,
    STDOUT_PORT,
};
use tvix_boot_store::{Store, StoreError};
use tvix_boot_virtiofs::{StoreFs, StoreFsOptions, VirtioFs};
use tvix_boot_vmm::{Console, Initrd, Vm, VmConfig, VmError, VmExit};

use crate::console_log::{ConsoleLog, ConsoleTail, TAIL_LINES};
use crate::initrd::{self, HOST_BUSYBOX, ProgramSetup};
use crate::mode::{self, ModeArgs};
use crate::sandbox::SeccompArgs;
use crate::store_cmd::StoreAddrArgs;
use crate::window_size::WindowSizeForwarder;

/// The virtio-fs tag the guest mounts at /nix/store.
const STORE_TAG: &str = "tvix";

/// Arguments every guest gets; `--cmdline` / CH_CMDLINE are appended (later arguments
/// win in Linux, so they can override these: `loglevel=7` brings the boot log back).
///
/// `quiet` because every console byte is an I/O exit: under nested virtualization the
/// kernel's boot log alone more than doubled the time to the guest's init. Panic and
/// halt messages are printed at emergency level and still appear.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Exit status when the guest kernel panicked (VMM errors exit with 1).
const GUEST_PANIC_STATUS: u8 = 2;

/// Flags that describe the VM to boot.
#[derive(clap::Args)]
pub struct VmArgs {
    /// Guest kernel, vmlinux (ELF) or bzImage. Default: the kernel built by
    /// boot/kernel/build.sh ($XDG_CACHE_HOME/tvix-boot/kernel/current/vmlinux).
    #[arg(long, env = "TVIX_BOOT_KERNEL", value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Your own initramfs (cpio archive, optionally compressed) instead of the one
    /// tvix-boot builds around its guest init (so none of --run, --shell, --init, --find).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["run", "shell", "shell_path", "init", "find"])]
    initrd: Option<PathBuf>,

    /// Extra kernel command-line arguments, appended to the defaults
    /// ("console=ttyS0 reboot=k panic=-1 quiet"). The guest init reads tvix.find,
    /// tvix.shell[=PATH], tvix.run=PATH and init=PATH from here too.
    #[arg(long, env = "CH_CMDLINE", value_name = "STR")]
    cmdline: Option<String>,

    /// Number of vCPUs.
    #[arg(long, env = "CH_NUM_CPUS", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(tvix_boot_vmm::MAX_VCPUS)))]
    cpus: u8,

    /// Guest memory: bytes, or with a K, M, G or T suffix (e.g. 512M, 1G).
    #[arg(long, env = "CH_MEM_SIZE", value_name = "SIZE", default_value = "512M",
          value_parser = parse_size)]
    memory: u64,

    /// --run: the program gets the console as its terminal (a tty in the guest) even
    /// when stdin or stdout is not a terminal.
    #[arg(short = 't', long, conflicts_with = "no_tty")]
    tty: bool,

    /// --run: separate, byte-exact stdin, stdout and stderr even when stdin and stdout
    /// are both terminals (the default when either is not).
    #[arg(short = 'T', long)]
    no_tty: bool,

    /// --run with separate program streams: write the guest's console (kernel and init
    /// messages) to FILE. It is not shown otherwise; its last lines are printed when the
    /// guest fails.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,

    /// Show the guest's console on stderr (also when TVIX_BOOT_LOG is set).
    #[arg(short, long)]
    verbose: bool,

    /// --run, --shell: KEY=VALUE in the program's environment (repeatable). The program
    /// starts with PATH=/bin:/sbin and HOME=/, and TERM from the host when it has the
    /// terminal; --env adds to or replaces these.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,

    /// --run, --shell: the program's working directory in the guest (default /).
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,

    #[command(flatten)]
    seccomp: SeccompArgs,

    #[command(flatten)]
    mode: ModeArgs,
}

/// What the guest runs: our init in `mode`, or the user's own initrd.
enum Guest {
    TvixInit(Mode),
    CustomInitrd(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum VmCmdError {
    #[error(
        "no guest kernel{}: pass --kernel PATH, set TVIX_BOOT_KERNEL, or build one with \
         boot/kernel/build.sh",
        .looked_at.as_ref().map_or_else(String::new, |p| format!(" (looked for {})", p.display()))
    )]
    NoKernel { looked_at: Option<PathBuf> },
    #[error(transparent)]
    Mode(#[from] mode::ModeArgsError),
    #[error("cannot open the store: {0}")]
    OpenStore(#[from] StoreError),
    #[error("cannot build the initrd: {0}")]
    Initrd(#[from] initrd::InitrdError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot create the console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot pass the program's stdio to the guest: {0}")]
    Stdio(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("cannot forward the terminal's size to the guest: {0}")]
    WindowSize(std::io::Error),
    #[error("--env and --workdir are for the program of --run or --shell")]
    ProgramSetupWithoutProgram,
    #[error(
        "--console-log is for --run with separate program streams (stdin or stdout not a \
         terminal, or -T); here the console is the terminal"
    )]
    ConsoleLogWithTerminal,
}

/// How a booted guest ended, and what the CLI needs to report it.
struct Outcome {
    guest: Guest,
    exit: VmExit,
    /// What the guest init reported on the exit-status port.
    status: Option<u32>,
    /// The console's last lines, when the console was a log rather than the terminal.
    console: Option<ConsoleTail>,
}

pub fn run(args: VmArgs, store_addrs: &StoreAddrArgs) -> ExitCode {
    match boot(args, store_addrs) {
        Ok(outcome) => {
            let code = match outcome.exit {
                VmExit::PowerOff | VmExit::Reset => exit_code(&outcome.guest, outcome.status),
                VmExit::Panic => {
                    eprintln!("tvix-boot: the guest kernel panicked");
                    ExitCode::from(GUEST_PANIC_STATUS)
                }
            };
            let failed = outcome.exit == VmExit::Panic
                || outcome.status == Some(STATUS_INIT_FAILED)
                || (outcome.status.is_none() && expects_status(&outcome.guest));
            if failed && let Some(console) = &outcome.console {
                eprintln!("tvix-boot: the guest console's last lines:");
                for line in console.last_lines(TAIL_LINES) {
                    eprintln!("  | {line}");
                }
            }
            code
        }
        Err(e) => {
            eprintln!("tvix-boot: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Checks everything, boots, waits for the guest to stop.
fn boot(args: VmArgs, store_addrs: &StoreAddrArgs) -> Result<Outcome, VmCmdError> {
    let kernel = match args.kernel {
        Some(kernel) => kernel,
        None => match default_kernel() {
            Some(kernel) if kernel.exists() => kernel,
            looked_at => return Err(VmCmdError::NoKernel { looked_at }),
        },
    };
    let mut cmdline = DEFAULT_CMDLINE.to_owned();
    if let Some(extra) = args
        .cmdline
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let mut guest = match args.initrd {
        Some(path) => Guest::CustomInitrd(path),
        None => Guest::TvixInit(mode::choose(&cmdline, args.mode.requested()?.as_ref())?),
    };

    args.seccomp.enable(store_addrs)?;
    // The store is opened before anything boots, so a bad address is reported at once,
    // and so is a program that is not in it.
    let store = Arc::new(store_addrs.open()?);
    if let Guest::TvixInit(mode) = &mut guest {
        mode::check_in_store(&store, mode)?;
        mode::append_keys(&mut cmdline, mode)?;
    }
    // A program's own streams, unless it is to have the terminal.
    let stdio_ports = matches!(guest, Guest::TvixInit(Mode::Run { .. }))
        && !args.tty
        && (args.no_tty || !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()));
    let program = match &guest {
        Guest::TvixInit(Mode::Run { .. } | Mode::Shell { .. }) => Some(ProgramSetup {
            env: program_env(&args.env, !stdio_ports),
            workdir: args.workdir.clone(),
        }),
        _ if !args.env.is_empty() || args.workdir.is_some() => {
            return Err(VmCmdError::ProgramSetupWithoutProgram);
        }
        _ => None,
    };
    // With the terminal, the guest's console follows its size.
    let window_size = match &program {
        Some(_) if !stdio_ports => WindowSizeForwarder::start().map_err(VmCmdError::WindowSize)?,
        _ => None,
    };
    if window_size.is_some() {
        cmdline.push(' ');
        cmdline.push_str(KEY_WINSIZE_PORT);
    }
    if args.console_log.is_some() && !stdio_ports {
        return Err(VmCmdError::ConsoleLogWithTerminal);
    }
    let mut console_tail = None;
    let console = if stdio_ports {
        cmdline.push(' ');
        cmdline.push_str(KEY_STDIO_PORTS);
        let file = match &args.console_log {
            Some(path) => Some(File::create(path).map_err(|source| VmCmdError::ConsoleLog {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let verbose = args.verbose || std::env::var_os("TVIX_BOOT_LOG").is_some();
        let (log, tail) = ConsoleLog::new(file, verbose);
        console_tail = Some(tail);
        Console::Writer(Box::new(log))
    } else {
        Console::Stdio
    };
    let initrd = match &guest {
        Guest::CustomInitrd(path) => Initrd::File(path.clone()),
        Guest::TvixInit(mode) => {
            let bytes = initrd::build_initrd_for(mode, Path::new(HOST_BUSYBOX), program.as_ref())?;
            tracing::info!("initrd built in memory: {} bytes", bytes.len());
            Initrd::Bytes(bytes)
        }
    };
    let config = VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline,
        vcpus: args.cpus,
        mem_size: args.memory,
        console,
    };

    let mut vm = Vm::new(config)?;
    vm.add_virtio_device(store_device(store, u16::from(args.cpus)))?;
    if stdio_ports {
        vm.add_virtio_device(stdio_device().map_err(VmCmdError::Stdio)?)?;
    }
    let forwarder = match window_size {
        Some((port, forwarder)) => {
            let device = VirtioConsole::new(vec![port]).expect("one port was given");
            vm.add_virtio_device(Box::new(device))?;
            Some(forwarder)
        }
        None => None,
    };
    let status = vm.guest_status();
    let exit = vm.run()?;
    drop(forwarder);
    Ok(Outcome {
        guest,
        exit,
        status: status.get(),
        console: console_tail,
    })
}

/// The program's stdin, stdout and stderr as virtio-console ports, on copies of this
/// process's descriptors 0, 1 and 2 (a closed one reads as empty, writes go nowhere).
fn stdio_device() -> std::io::Result<Box<dyn VirtioDevice>> {
    fn dup(fd: std::os::fd::BorrowedFd<'_>, writable: bool) -> std::io::Result<OwnedFd> {
        match fd.try_clone_to_owned() {
            Ok(fd) => Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(OwnedFd::from(
                std::fs::OpenOptions::new()
                    .read(!writable)
                    .write(writable)
                    .open("/dev/null")?,
            )),
            Err(e) => Err(e),
        }
    }
    let port = |name: &str, end| PortSpec::new(name, end).expect("the port names are valid");
    let ports = vec![
        port(
            STDIN_PORT,
            PortEnd::Input(dup(std::io::stdin().as_fd(), false)?),
        ),
        port(
            STDOUT_PORT,
            PortEnd::Output(dup(std::io::stdout().as_fd(), true)?),
        ),
        port(
            STDERR_PORT,
            PortEnd::Output(dup(std::io::stderr().as_fd(), true)?),
        ),
    ];
    Ok(Box::new(
        VirtioConsole::new(ports).expect("three ports were given"),
    ))
}

/// The program's environment: the defaults, then `--env` (later entries win).
fn program_env(extra: &[(String, String)], with_terminal: bool) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/bin:/sbin".into()),
        ("HOME".into(), "/".into()),
    ];
    if with_terminal {
        let term = std::env::var("TERM").unwrap_or_else(|_| "linux".into());
        env.push(("TERM".into(), term));
    }
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key.clone(), value.clone()));
    }
    env
}

/// `KEY=VALUE` for `--env`.
fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some(("", _)) => Err(format!("{text:?}: the name is empty")),
        _ if text.contains('\0') => Err(format!("{text:?} contains a NUL byte")),
        Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
        None => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Whether the guest init reports a status in this mode.
fn expects_status(guest: &Guest) -> bool {
    matches!(
        guest,
        Guest::TvixInit(Mode::Run { .. } | Mode::Shell { .. } | Mode::Find)
    )
}

/// tvix-boot's exit code after a clean stop: the status the guest init reported for
/// the program it ran (0..=255, as a shell would give it), else success.
fn exit_code(guest: &Guest, reported: Option<u32>) -> ExitCode {
    match reported {
        Some(status) => match u8::try_from(status) {
            Ok(status) => ExitCode::from(status),
            Err(_) if status == STATUS_INIT_FAILED => {
                eprintln!("tvix-boot: the guest init failed; its error is on the console");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("tvix-boot: the guest reported an invalid exit status {status}");
                ExitCode::FAILURE
            }
        },
        None if expects_status(guest) => {
            eprintln!(
                "tvix-boot: the guest powered off without reporting an exit status (a guest \
                 kernel without CONFIG_X86_IOPL_IOPERM cannot write the status port)"
            );
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

/// The guest's /nix/store: the store as a virtio-fs device with tag `tvix`, one request
/// queue per vCPU. The root is listable, so `tvix.find` and `ls /nix/store` work.
fn store_device(store: Arc<Store>, request_queues: u16) -> Box<dyn VirtioDevice> {
    let fs = StoreFs::new(
        store,
        StoreFsOptions {
            list_root: true,
            show_xattr: false,
        },
    );
    Box::new(
        VirtioFs::new(fs, STORE_TAG, request_queues).expect("the tag and queue count are valid"),
    )
}

/// Where boot/kernel/build.sh puts the kernel: `current/vmlinux` under
/// ${TVIX_BOOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-boot}/kernel.
fn default_kernel() -> Option<PathBuf> {
    // Empty variables count as unset, as in the shell's ${VAR:-default}.
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cache_root = match var("TVIX_BOOT_CACHE") {
        Some(root) => root,
        None => var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".cache")))?
            .join("tvix-boot"),
    };
    Some(cache_root.join("kernel/current/vmlinux"))
}

/// Parses "512M", "1G", "1024K", "1073741824"; an optional "B"/"iB" after the
/// unit is accepted (units are powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let without_b = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match without_b.char_indices().last() {
        Some((i, 'k')) => (&without_b[..i], 10),
        Some((i, 'm')) => (&without_b[..i], 20),
        Some((i, 'g')) => (&without_b[..i], 30),
        Some((i, 't')) => (&without_b[..i], 40),
        _ => (without_b, 0),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512M or 1G"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_vmm_agree_on_the_status_port() {
        use tvix_boot_init::protocol::{EXIT_STATUS_PORT, EXIT_STATUS_PORT_LEN};
        use tvix_boot_vmm::arch::x86_64::layout::STATUS_PORT;
        assert_eq!(EXIT_STATUS_PORT, STATUS_PORT);
        assert_eq!(
            u64::from(EXIT_STATUS_PORT_LEN),
            tvix_boot_devices::status_port::STATUS_PORT_LEN
        );
    }

    #[test]
    fn environment_entries() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
        let env = program_env(
            &[("HOME".into(), "/root".into()), ("X".into(), "1".into())],
            false,
        );
        assert_eq!(
            env,
            vec![
                ("PATH".to_owned(), "/bin:/sbin".to_owned()),
                ("HOME".to_owned(), "/root".to_owned()),
                ("X".to_owned(), "1".to_owned()),
            ]
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
