//! Booting a VM from the command line: flags in, exit code out; the library
//! ([`tvix_boot::MicroVm`]) decides what the flags mean for the guest (its mode, its
//! console, which signals its program takes). What is process-wide is the CLI's: which
//! signals are blocked, seccomp, and how the process ends.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tvix_boot::seccomp::EnableError;
use tvix_boot::{
    Console, DEFAULT_STOP_GRACE, ExitStatus, FORWARDED_SIGNALS, GuestEnd, HostStop, MicroVm,
    MicroVmError, Network, PublishedPort, QueueService,
};
use tvix_boot_guest_init::protocol::Mode;

use super::console_log::{ConsoleLog, ConsoleTail, TAIL_LINES};
use super::mode_flags::{ModeArgs, ModeArgsError};
use super::seccomp_flag::SeccompArgs;
use super::store_command::StoreAddrArgs;

/// Exit status when the guest kernel panicked (VMM errors exit with 1).
const GUEST_PANIC_STATUS: u8 = 2;
/// Exit status when --timeout stopped the guest, as timeout(1) has it.
const TIMED_OUT_STATUS: u8 = 124;

/// The signals a VM takes (blocked before any thread starts, read from a signalfd):
/// those passed to the guest's program, and SIGWINCH for the terminal's size.
pub const SIGNALS: [i32; 5] = [
    FORWARDED_SIGNALS[0],
    FORWARDED_SIGNALS[1],
    FORWARDED_SIGNALS[2],
    FORWARDED_SIGNALS[3],
    libc::SIGWINCH,
];

/// Flags that describe the VM to boot.
#[derive(clap::Args)]
pub struct VmArgs {
    /// Guest kernel, vmlinux (ELF) or bzImage. Default: the kernel built by
    /// boot/guest-kernel/build.sh ($XDG_CACHE_HOME/tvix-boot/guest-kernel/current/vmlinux).
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

    /// Stop the guest if it still runs after DURATION (e.g. 90s, 5m, 1h; a bare number
    /// is seconds); tvix-boot then exits with 124, like timeout(1).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,

    /// Where the store's virtio-fs queues are served: a thread per queue, or the VM's
    /// event loop (for comparing the two; threads serve parallel requests in parallel).
    #[arg(long, value_name = "WHERE", default_value = "threads", value_parser = parse_queue_service)]
    virtiofs_queues: QueueService,

    /// Give the guest a network (without it, it has only lo): `passt` (the default:
    /// user-mode networking through passt, no root; the guest is 10.0.2.15, the host's
    /// loopback is 10.0.2.2) or `tap=NAME` (an existing tap device).
    #[arg(long, value_name = "passt|tap=NAME", num_args = 0..=1,
          default_missing_value = "passt", value_parser = parse_network)]
    net: Option<Network>,

    /// With --net: the host's TCP port HOST_PORT reaches GUEST_PORT in the guest
    /// (repeatable; one number for both).
    #[arg(long, value_name = "HOST_PORT:GUEST_PORT", requires = "net")]
    publish: Vec<PublishedPort>,

    #[command(flatten)]
    seccomp: SeccompArgs,

    #[command(flatten)]
    mode: ModeArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum VmCmdError {
    #[error(transparent)]
    Mode(#[from] ModeArgsError),
    #[error(transparent)]
    MicroVm(#[from] MicroVmError),
    #[error(transparent)]
    Seccomp(#[from] EnableError),
    #[error("cannot open the store: {0}")]
    Store(#[from] tvix_boot::store::StoreError),
    #[error("cannot create the console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--console-log is for --run with separate program streams (stdin or stdout not a \
         terminal, or -T); here the console is the terminal"
    )]
    ConsoleLogWithTerminal,
}

pub fn run(args: VmArgs, store_addrs: &StoreAddrArgs) -> ExitCode {
    let timeout = args.timeout;
    let (status, console) = match boot(args, store_addrs) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("tvix-boot: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match status {
        ExitStatus::Guest(GuestEnd::Exited(status)) => ExitCode::from(status),
        ExitStatus::Guest(GuestEnd::PoweredOff) => ExitCode::SUCCESS,
        ExitStatus::Guest(GuestEnd::NoStatus) => {
            eprintln!(
                "tvix-boot: the guest powered off without reporting an exit status (a guest \
                 kernel without CONFIG_X86_IOPL_IOPERM cannot write the status port)"
            );
            ExitCode::FAILURE
        }
        ExitStatus::Guest(GuestEnd::InitFailed) => {
            eprintln!("tvix-boot: the guest init failed; its error is on the console");
            ExitCode::FAILURE
        }
        ExitStatus::Guest(GuestEnd::InvalidStatus(status)) => {
            eprintln!("tvix-boot: the guest reported an invalid exit status {status}");
            ExitCode::FAILURE
        }
        ExitStatus::Guest(GuestEnd::Panicked) => {
            eprintln!("tvix-boot: the guest kernel panicked");
            ExitCode::from(GUEST_PANIC_STATUS)
        }
        ExitStatus::Host(HostStop::TimedOut) => {
            let limit = timeout.map_or_else(String::new, |t| format!(" within {t:?}"));
            eprintln!("tvix-boot: the guest did not stop{limit}; stopped it");
            ExitCode::from(TIMED_OUT_STATUS)
        }
        ExitStatus::Host(HostStop::Killed) => {
            eprintln!("tvix-boot: the VM was stopped");
            ExitCode::FAILURE
        }
        ExitStatus::Host(HostStop::Signal(signal)) => {
            eprintln!(
                "tvix-boot: signal {signal}: stopped the guest (a program in it that takes \
                 signals had {DEFAULT_STOP_GRACE:?} to end)"
            );
            tvix_boot::die_of_signal(signal);
            ExitCode::FAILURE
        }
    };
    let failed = matches!(
        status,
        ExitStatus::Guest(GuestEnd::Panicked | GuestEnd::InitFailed | GuestEnd::NoStatus)
            | ExitStatus::Host(HostStop::TimedOut)
    );
    if failed && let Some(console) = &console {
        eprintln!("tvix-boot: the guest console's last lines:");
        for line in console.last_lines(TAIL_LINES) {
            eprintln!("  | {line}");
        }
    }
    code
}

/// Boots what the flags say and waits for the guest to stop.
fn boot(
    args: VmArgs,
    store_addrs: &StoreAddrArgs,
) -> Result<(ExitStatus, Option<ConsoleTail>), VmCmdError> {
    let requested = args.mode.requested()?;
    args.seccomp.enable(store_addrs)?;
    tvix_boot_vmm::startup::mark("seccomp filters built");

    let mut vm = match (args.initrd, requested) {
        (Some(initrd), _) => MicroVm::with_initrd(initrd),
        (None, Some(Mode::Run { path, args })) => MicroVm::run(path).args(args),
        (None, Some(Mode::Shell { path })) => MicroVm::shell_path(path),
        (None, Some(Mode::Init { path })) => MicroVm::init(path),
        (None, Some(Mode::Find)) => MicroVm::find(),
        (None, Some(Mode::Nothing) | None) => MicroVm::from_cmdline_keys(),
    };
    let console = match (args.tty, args.no_tty) {
        (true, _) => Console::Stdio,
        (false, true) => Console::StdioExceptRun,
        (false, false) => Console::Auto,
    };
    vm = vm
        .store_addrs(store_addrs.addrs()?)
        .cpus(args.cpus)
        .memory(args.memory)
        .cmdline(args.cmdline.unwrap_or_default())
        .console(console);
    if let Some(kernel) = args.kernel {
        vm = vm.kernel(kernel);
    }
    if let Some(timeout) = args.timeout {
        vm = vm.timeout(timeout);
    }
    vm = vm.virtiofs_queues(args.virtiofs_queues);
    if let Some(mut network) = args.net {
        for port in args.publish {
            network = network.publish(port);
        }
        vm = vm.network(network);
    }
    for (key, value) in args.env {
        vm = vm.env(key, value);
    }
    if let Some(dir) = args.workdir {
        vm = vm.workdir(dir);
    }
    let mut console_tail = None;
    if vm.console_on_stdio()? {
        if args.console_log.is_some() {
            return Err(VmCmdError::ConsoleLogWithTerminal);
        }
    } else {
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
        vm = vm.console_log(log);
    }
    // main blocked SIGNALS: the VM reads them (see MicroVm::forward_signals).
    vm = vm.follow_terminal_size(true).forward_signals(true);
    let status = vm.start()?.wait()?;
    Ok((status, console_tail))
}

/// `threads` or `event-loop` for `--virtiofs-queues`.
fn parse_queue_service(text: &str) -> Result<QueueService, String> {
    match text {
        "threads" => Ok(QueueService::Threads),
        "event-loop" => Ok(QueueService::EventLoop),
        _ => Err(format!("{text:?}: expected threads or event-loop")),
    }
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

/// A duration like `90s`, `5m`, `1.5h`, `250ms`, `2d`; a bare number is seconds.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("{text:?}: the unit is ms, s, m, h or d")),
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90s or 5m"))?;
    Duration::try_from_secs_f64(number * seconds_per_unit).map_err(|e| format!("{text:?}: {e}"))
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

/// `--net`'s value.
fn parse_network(text: &str) -> Result<Network, String> {
    match text.split_once('=') {
        None if text == "passt" => Ok(Network::passt()),
        Some(("tap", name)) if !name.is_empty() => Ok(Network::tap(name)),
        _ => Err(format!("{text:?}: expected passt or tap=NAME")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_entries() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("EMPTY="), Ok(("EMPTY".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "s", "-1s", "5x", "1e400s", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
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
