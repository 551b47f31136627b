//! Booting a VM from the command line: flags in, exit code out; the library
//! ([`tvix_boot::MicroVm`]) does the rest. What is process-wide lives here: the terminal
//! (the console on stdio), SIGWINCH, seccomp.

use std::fs::File;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tvix_boot::seccomp::SeccompError;
use tvix_boot::{DEFAULT_STOP_GRACE, ExitStatus, MicroVm, MicroVmError, QueueService};
use tvix_boot_guest_init::protocol::{Cmdline, Mode};

use super::console_log::{ConsoleLog, ConsoleTail, TAIL_LINES};
use super::mode_flags::{ModeArgs, ModeArgsError};
use super::seccomp_flag::SeccompArgs;
use super::store_command::StoreAddrArgs;

/// Exit status when the guest kernel panicked (VMM errors exit with 1).
const GUEST_PANIC_STATUS: u8 = 2;
/// Exit status when --timeout stopped the guest, as timeout(1) has it.
const TIMED_OUT_STATUS: u8 = 124;

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
    Seccomp(#[from] SeccompError),
    #[error("cannot open the store: {0}")]
    Store(#[from] tvix_boot::store::StoreError),
    #[error("cannot create the console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot take over the signals for the guest: {0}")]
    Signals(std::io::Error),
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
        ExitStatus::Exited(status) => ExitCode::from(status),
        ExitStatus::PoweredOff => ExitCode::SUCCESS,
        ExitStatus::NoStatus => {
            eprintln!(
                "tvix-boot: the guest powered off without reporting an exit status (a guest \
                 kernel without CONFIG_X86_IOPL_IOPERM cannot write the status port)"
            );
            ExitCode::FAILURE
        }
        ExitStatus::InitFailed => {
            eprintln!("tvix-boot: the guest init failed; its error is on the console");
            ExitCode::FAILURE
        }
        ExitStatus::InvalidStatus(status) => {
            eprintln!("tvix-boot: the guest reported an invalid exit status {status}");
            ExitCode::FAILURE
        }
        ExitStatus::Panicked => {
            eprintln!("tvix-boot: the guest kernel panicked");
            ExitCode::from(GUEST_PANIC_STATUS)
        }
        ExitStatus::TimedOut => {
            let limit = timeout.map_or_else(String::new, |t| format!(" within {t:?}"));
            eprintln!("tvix-boot: the guest did not stop{limit}; stopped it");
            ExitCode::from(TIMED_OUT_STATUS)
        }
        ExitStatus::Killed => {
            eprintln!("tvix-boot: the VM was stopped");
            ExitCode::FAILURE
        }
        ExitStatus::HostSignal(signal) => {
            eprintln!(
                "tvix-boot: the guest had not ended {:?} after signal {signal}; stopped it",
                DEFAULT_STOP_GRACE
            );
            die_of(signal)
        }
    };
    let failed = matches!(
        status,
        ExitStatus::Panicked | ExitStatus::InitFailed | ExitStatus::NoStatus | ExitStatus::TimedOut
    );
    if failed && let Some(console) = &console {
        eprintln!("tvix-boot: the guest console's last lines:");
        for line in console.last_lines(TAIL_LINES) {
            eprintln!("  | {line}");
        }
    }
    code
}

/// Ends the process by `signal`'s default action, so that the parent sees the real cause
/// (the VM has ended and the terminal is restored by now); FAILURE if that did not end it.
fn die_of(signal: i32) -> ExitCode {
    // SAFETY: plain calls without pointers but the sigset, which is initialised by
    // sigemptyset before sigaddset and pthread_sigmask read it.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::raise(signal);
        // Blocked (every thread blocks forwarded signals): unblocking delivers it.
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    ExitCode::FAILURE
}

/// Boots what the flags say and waits for the guest to stop.
fn boot(
    args: VmArgs,
    store_addrs: &StoreAddrArgs,
) -> Result<(ExitStatus, Option<ConsoleTail>), VmCmdError> {
    let requested = args.mode.requested()?;
    let cmdline = args.cmdline.clone().unwrap_or_default();
    // What the guest will run: the flag's mode, or the command line's own keys (the
    // library refuses the two when they disagree).
    let guest_mode = match &requested {
        Some(mode) => Some(mode.clone()),
        None => Mode::from_cmdline(&Cmdline::parse(&cmdline)).ok(),
    };
    let runs_a_program = matches!(guest_mode, Some(Mode::Run { .. }));
    let has_a_program = runs_a_program || matches!(guest_mode, Some(Mode::Shell { .. }));
    // The program's own streams, unless it is to have the terminal.
    let stdio_ports = args.initrd.is_none()
        && runs_a_program
        && !args.tty
        && (args.no_tty || !(std::io::stdin().is_terminal() && std::io::stdout().is_terminal()));
    if args.console_log.is_some() && !stdio_ports {
        return Err(VmCmdError::ConsoleLogWithTerminal);
    }
    // The guest's program takes this process's SIGTERM, SIGHUP, SIGINT and SIGQUIT, as
    // it would on a host; blocked before the first thread starts (the filters' store
    // runtime), since the VM reads them from a signalfd. Other guests have no program to
    // take them: tvix-boot dies of them as before.
    let find = matches!(guest_mode, Some(Mode::Find));
    let forward_signals = args.initrd.is_none() && (has_a_program || find);
    if forward_signals {
        tvix_boot::block_signals(&tvix_boot::FORWARDED_SIGNALS).map_err(VmCmdError::Signals)?;
    }
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
    vm = vm
        .store_addrs(store_addrs.addrs()?)
        .cpus(args.cpus)
        .memory(args.memory)
        .cmdline(cmdline)
        .console_stdio(!stdio_ports);
    if let Some(kernel) = args.kernel {
        vm = vm.kernel(kernel);
    }
    if let Some(timeout) = args.timeout {
        vm = vm.timeout(timeout);
    }
    vm = vm.virtiofs_queues(args.virtiofs_queues);
    for (key, value) in args.env {
        vm = vm.env(key, value);
    }
    if let Some(dir) = args.workdir {
        vm = vm.workdir(dir);
    }
    let mut console_tail = None;
    if stdio_ports {
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
    // With the terminal, the guest's console follows its size (main blocked SIGWINCH).
    vm = vm
        .follow_terminal_size(has_a_program && !stdio_ports)
        .forward_signals(forward_signals);
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
fn parse_duration(text: &str) -> Result<Duration, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_vmm_agree_on_the_status_port() {
        use tvix_boot_guest_init::protocol::{EXIT_STATUS_PORT, EXIT_STATUS_PORT_LEN};
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
