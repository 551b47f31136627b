//! A microVM as a value: configure it like a [`std::process::Command`], start it, and
//! get a handle like a [`std::process::Child`].
//!
//! - this file: [`MicroVm`], the configuration, and its errors;
//! - `start.rs`: [`MicroVm::start`], set-up in the order it happens;
//! - `running.rs`: [`RunningVm`], [`VmStopper`], and the thread that runs the VM;
//! - `ports.rs`: the virtio-console ports between host and guest init;
//! - `exit_status.rs`: [`ExitStatus`].

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tvix_boot_devices::virtio::console::ConsoleError;
use tvix_boot_guest_init::protocol::{DEFAULT_SHELL, Mode};
use tvix_boot_seccomp::SeccompError;
use tvix_boot_store::{Store, StoreAddrs, StoreError};
use tvix_boot_virtiofs::QueueService;
use tvix_boot_vmm::VmError;

use crate::guest_mode::GuestModeError;
use crate::initrd::InitrdError;
use crate::network::{Network, NetworkError};

mod exit_status;
mod ports;
mod running;
mod start;

pub use exit_status::{ExitStatus, GuestEnd};
pub use ports::Stdio;
pub(crate) use ports::nonblocking_pipe;
pub use running::{RunningVm, VmStopper};

/// Arguments every guest gets; [`MicroVm::cmdline`] is appended (later arguments win in
/// Linux, so it can override these: `loglevel=7` brings the boot log back).
///
/// `quiet` because every console byte is an I/O exit: under nested virtualization the
/// kernel's boot log alone more than doubled the time to the guest's init. Panic and
/// halt messages are printed at emergency level and still appear.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// How long [`VmStopper::stop`] gives the guest to end its program and power off before
/// the VM is stopped without it.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

/// What went wrong before or while running a microVM (not how the guest ended: that is
/// [`ExitStatus`]).
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    /// No kernel given and none where `boot/guest-kernel/build.sh` puts it.
    #[error(
        "no guest kernel{}: pass --kernel PATH, set TVIX_BOOT_KERNEL, or build one with \
         boot/guest-kernel/build.sh",
        .looked_at.as_ref().map_or_else(String::new, |p| format!(" (looked for {})", p.display()))
    )]
    NoKernel {
        /// Where the default kernel was looked for, if anywhere.
        looked_at: Option<PathBuf>,
    },
    /// The mode does not agree with the command line, or names a program not in the store.
    #[error(transparent)]
    Mode(#[from] GuestModeError),
    /// The store's addresses could not be opened.
    #[error("cannot open the store: {0}")]
    OpenStore(#[from] StoreError),
    /// The initrd could not be assembled.
    #[error("cannot build the initrd: {0}")]
    Initrd(#[from] InitrdError),
    /// The VM could not be created or run.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A descriptor for the program's streams, the console or the control port could
    /// not be made.
    #[error("cannot set up the program's streams: {0}")]
    Stdio(std::io::Error),
    /// The host terminal could not be put in raw mode.
    #[error("cannot set up the terminal: {0}")]
    Terminal(std::io::Error),
    /// `env` or `workdir` without a program (`run` or `shell`) to give them to.
    #[error("--env and --workdir are for the program of --run or --shell")]
    ProgramSetupWithoutProgram,
    /// The program's streams were configured although its stdio is the console.
    #[error(
        "the program's stdin, stdout and stderr are the console here (console on stdio, or \
         not a --run): they cannot also be piped or redirected"
    )]
    StreamsWithConsole,
    /// The program's streams could not be set up as console ports.
    #[error("{0}")]
    Console(ConsoleError),
    /// The guest's network could not be set up (passt, a tap device).
    #[error("cannot set up the guest's network: {0}")]
    Network(#[from] NetworkError),
    /// The thread that runs the VM could not be started.
    #[error("cannot start the VM's thread: {0}")]
    Thread(SeccompError),
    /// Program arguments without a program (`run`) to give them to.
    #[error("arguments are for the program of run (--run), which is not what this VM does")]
    ArgsWithoutRun,
    /// The thread that runs the VM panicked (or could not install its seccomp filter;
    /// it says why in the log).
    #[error("the VM's thread panicked")]
    Panicked,
    /// An earlier [`RunningVm::wait`] already reported how the VM failed.
    #[error("the VM already ended with an error, which an earlier wait reported")]
    AlreadyReported,
}

/// Where a guest's serial console goes. The console is the kernel's and the init's
/// voice; for `run` it is also what decides the program's streams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Console {
    /// A log ([`MicroVm::console_log`]); `run`'s program has its own stdin, stdout and
    /// stderr, byte-exact (see [`MicroVm::stdin`]).
    #[default]
    Log,
    /// This process's stdin and stdout, and the terminal of `run`'s or `shell`'s
    /// program. While the VM runs, a terminal on stdin is in raw mode; it is restored on
    /// every way out (a panic hook for which this installs, process-wide).
    Stdio,
    /// What a command-line tool wants: [`Console::Stdio`], except for `run` when stdin
    /// or stdout is not a terminal ([`Console::Log`], so that the program's streams stay
    /// byte-exact in a pipeline).
    Auto,
    /// [`Console::Stdio`], except for `run` ([`Console::Log`]: its program has its own
    /// streams even on a terminal).
    StdioExceptRun,
}

/// What the guest runs.
#[derive(Clone, Debug)]
enum Guest {
    /// tvix-boot's init, doing this (or what the command line's keys say, for `None`).
    Init(Option<Mode>),
    /// The caller's own initramfs.
    CustomInitrd(PathBuf),
}

/// Which store the guest sees at /nix/store.
enum StoreSource {
    /// The embedded store under the user's data directory.
    Embedded,
    Addrs(StoreAddrs),
    Open(Arc<Store>),
}

/// A microVM to start: what it runs, with which store, kernel and resources, and where
/// its streams go. Built like a [`std::process::Command`]:
///
/// ```no_run
/// use tvix_boot::{MicroVm, Stdio};
///
/// let mut vm = MicroVm::run("/nix/store/<hash>-hello/bin/hello")
///     .arg("--greeting=hi")
///     .stdout(Stdio::Piped)
///     .start()?;
/// let status = vm.wait()?;
/// # Ok::<(), tvix_boot::MicroVmError>(())
/// ```
pub struct MicroVm {
    guest: Guest,
    /// Arguments for `run`'s program.
    args: Vec<Vec<u8>>,
    store: StoreSource,
    kernel: Option<PathBuf>,
    cpus: u8,
    memory: u64,
    cmdline: Option<String>,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
    console: Console,
    terminal_sizes: Option<OwnedFd>,
    follow_terminal_size: bool,
    forward_signals: bool,
    virtiofs_queues: QueueService,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    console_log: Option<Box<dyn Write + Send>>,
    timeout: Option<Duration>,
    stop_grace: Duration,
    network: Option<Network>,
}

impl MicroVm {
    fn new(guest: Guest) -> Self {
        Self {
            guest,
            args: Vec::new(),
            store: StoreSource::Embedded,
            kernel: None,
            cpus: 1,
            memory: 512 << 20,
            cmdline: None,
            stdin: None,
            stdout: None,
            stderr: None,
            console: Console::Log,
            terminal_sizes: None,
            follow_terminal_size: false,
            forward_signals: false,
            virtiofs_queues: QueueService::Threads,
            env: Vec::new(),
            workdir: None,
            console_log: None,
            timeout: None,
            stop_grace: DEFAULT_STOP_GRACE,
            network: None,
        }
    }

    /// Runs `program` (a path in /nix/store) and powers off; [`RunningVm::wait`] gives
    /// its exit status. Its stdin, stdout and stderr are its own (see [`Self::stdin`]),
    /// unless [`Self::console_stdio`] makes the console its terminal.
    pub fn run(program: impl Into<String>) -> Self {
        Self::new(Guest::Init(Some(Mode::Run {
            path: program.into(),
            args: Vec::new(),
        })))
    }

    /// A shell on the console: the host's static busybox (/bin/busybox) in the initrd.
    pub fn shell() -> Self {
        Self::shell_path(DEFAULT_SHELL)
    }

    /// A shell on the console: a program in /nix/store, or a store path with `bin/sh`.
    pub fn shell_path(path: impl Into<String>) -> Self {
        Self::new(Guest::Init(Some(Mode::Shell { path: path.into() })))
    }

    /// Boots a system: the guest switch_roots into a tmpfs with the store at /nix/store
    /// and runs `path` (in /nix/store) as PID 1.
    pub fn init(path: impl Into<String>) -> Self {
        Self::new(Guest::Init(Some(Mode::Init { path: path.into() })))
    }

    /// Prints every path under /nix/store on the console, then powers off.
    pub fn find() -> Self {
        Self::new(Guest::Init(Some(Mode::Find)))
    }

    /// Does what the command line's own keys (`tvix.run=`, `tvix.shell`, `tvix.find`,
    /// `init=`, given with [`Self::cmdline`]) say.
    pub fn from_cmdline_keys() -> Self {
        Self::new(Guest::Init(None))
    }

    /// Boots `initrd` (a cpio archive, optionally compressed) instead of tvix-boot's own.
    pub fn with_initrd(initrd: impl Into<PathBuf>) -> Self {
        Self::new(Guest::CustomInitrd(initrd.into()))
    }

    /// Appends an argument for `run`'s program (any bytes but NUL); with another mode,
    /// [`Self::start`] fails.
    pub fn arg(mut self, arg: impl AsRef<[u8]>) -> Self {
        self.args.push(arg.as_ref().to_vec());
        self
    }

    /// Appends arguments for `run`'s program.
    pub fn args<I: IntoIterator<Item = A>, A: AsRef<[u8]>>(self, args: I) -> Self {
        args.into_iter().fold(self, Self::arg)
    }

    /// Serves this store (default: the embedded store under `$XDG_DATA_HOME/tvix-boot`).
    /// Several VMs may share one.
    pub fn store(mut self, store: Arc<Store>) -> Self {
        self.store = StoreSource::Open(store);
        self
    }

    /// Opens the store at these service addresses when the VM starts.
    pub fn store_addrs(mut self, addrs: StoreAddrs) -> Self {
        self.store = StoreSource::Addrs(addrs);
        self
    }

    /// The guest kernel, vmlinux (ELF) or bzImage. Default: [`default_kernel`].
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Number of vCPUs (default 1); the store gets one request queue per vCPU.
    pub fn cpus(mut self, cpus: u8) -> Self {
        self.cpus = cpus;
        self
    }

    /// Guest RAM in bytes (default 512 MiB).
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }

    /// Extra kernel command-line arguments, after [`DEFAULT_CMDLINE`].
    pub fn cmdline(mut self, extra: impl Into<String>) -> Self {
        self.cmdline = Some(extra.into());
        self
    }

    /// `run`'s program's stdin (default: inherited).
    pub fn stdin(mut self, stdin: impl Into<Stdio>) -> Self {
        self.stdin = Some(stdin.into());
        self
    }

    /// `run`'s program's stdout (default: inherited).
    pub fn stdout(mut self, stdout: impl Into<Stdio>) -> Self {
        self.stdout = Some(stdout.into());
        self
    }

    /// `run`'s program's stderr (default: inherited).
    pub fn stderr(mut self, stderr: impl Into<Stdio>) -> Self {
        self.stderr = Some(stderr.into());
        self
    }

    /// Where the guest's serial console goes, and so whether `run`'s program has its
    /// own streams or the console as its terminal (default [`Console::Log`]).
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// The guest's serial console is this process's stdin and stdout: the same as
    /// `console(Console::Stdio)` for `true` and `console(Console::Log)` for `false`.
    pub fn console_stdio(self, on: bool) -> Self {
        self.console(if on { Console::Stdio } else { Console::Log })
    }

    /// With the console on stdio: `ROWS COLS` lines read from `sizes` (the first at
    /// once) set the guest console's size, so the program follows the host terminal's.
    pub fn terminal_sizes(mut self, sizes: OwnedFd) -> Self {
        self.terminal_sizes = Some(sizes);
        self
    }

    /// Where the store's virtio-fs queues are served: a thread per queue (the default)
    /// or the VM's event loop. See [`QueueService`].
    pub fn virtiofs_queues(mut self, service: QueueService) -> Self {
        self.virtiofs_queues = service;
        self
    }

    /// With the console on stdio and stdin a terminal: the guest console follows the
    /// terminal's size, read at start and after each SIGWINCH (from a signalfd in the
    /// VM's event loop). SIGWINCH must be blocked in every thread of the process for the
    /// signalfd to see it: call [`crate::block_signals`] first thing in `main`. Ignored
    /// when [`Self::terminal_sizes`] gives the sizes.
    pub fn follow_terminal_size(mut self, on: bool) -> Self {
        self.follow_terminal_size = on;
        self
    }

    /// SIGTERM, SIGHUP, SIGINT and SIGQUIT sent to this process are this VM's, read
    /// from a signalfd in its event loop: for a process that stands for its guest, like
    /// the CLI. A guest that runs a program under tvix-boot's init (run, shell, find)
    /// gets them as its program's (see [`VmStopper::signal`]), and SIGTERM and SIGHUP
    /// also stop the VM after the stop grace time, should the guest not end by then;
    /// any other guest (init, a custom initrd) is stopped at once. Either way a stop
    /// for a signal ends as [`HostStop::Signal`](crate::HostStop::Signal), and the process should then die of
    /// that signal. The signals must be blocked in every thread ([`crate::block_signals`]
    /// with [`crate::FORWARDED_SIGNALS`], before any thread starts).
    pub fn forward_signals(mut self, on: bool) -> Self {
        self.forward_signals = on;
        self
    }

    /// Sets `key=value` in the program's environment (`run`, `shell`). It starts with
    /// `PATH=/bin:/sbin` and `HOME=/` (and `TERM` from this process when the console is
    /// its terminal).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// The program's working directory in the guest (default `/`).
    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// Where the serial console's output goes when it is a log, not on stdio (default:
    /// discarded).
    pub fn console_log(mut self, log: impl Write + Send + 'static) -> Self {
        self.console_log = Some(Box::new(log));
        self
    }

    /// Stops the VM if it still runs this long after [`Self::start`]
    /// ([`HostStop::TimedOut`](crate::HostStop::TimedOut)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// How long [`VmStopper::stop`] waits for the guest before stopping it without its
    /// help (default [`DEFAULT_STOP_GRACE`]).
    pub fn stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Gives the guest a network: an `eth0` through passt (user-mode, no root) or a tap
    /// device; see [`Network`]. Without it the guest has only `lo`.
    pub fn network(mut self, network: Network) -> Self {
        self.network = Some(network);
        self
    }

    /// Whether the console will be this process's stdin and stdout, as [`Self::start`]
    /// decides it from [`Self::console`] and what the guest does (for
    /// [`Console::Auto`]: also whether stdin and stdout are terminals). For a front end
    /// that must know before it starts the VM (where to show the console's last lines).
    pub fn console_on_stdio(&self) -> Result<bool, MicroVmError> {
        Ok(start::Plan::new(self)?.console_stdio)
    }
}

/// Where boot/guest-kernel/build.sh puts the kernel: `current/vmlinux` under
/// `${TVIX_BOOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-boot}/kernel`, or the path in
/// `TVIX_BOOT_KERNEL`. `None` if none of these variables is set.
pub fn default_kernel() -> Option<PathBuf> {
    // Empty variables count as unset, as in the shell's ${VAR:-default}.
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(kernel) = var("TVIX_BOOT_KERNEL") {
        return Some(kernel);
    }
    let cache_root = match var("TVIX_BOOT_CACHE") {
        Some(root) => root,
        None => var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".cache")))?
            .join("tvix-boot"),
    };
    Some(cache_root.join("kernel/current/vmlinux"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A VM that would boot `kernel` (any existing file: these fail before it is read).
    fn vm(mode: MicroVm, kernel: &Path) -> MicroVm {
        mode.kernel(kernel).store(Arc::new(Store::memory()))
    }

    #[test]
    fn inputs_that_make_no_sense_are_refused_before_anything_boots() {
        let kernel = tempfile::NamedTempFile::new().unwrap();
        let kernel = kernel.path();
        let err = |vm: MicroVm| vm.start().err().expect("refused").to_string();
        assert!(err(vm(MicroVm::find().arg("x"), kernel)).contains("arguments are for"));
        assert!(err(vm(MicroVm::find().stdout(Stdio::Piped), kernel)).contains("are the console"));
        assert!(
            err(vm(
                MicroVm::run("/nix/store/x-p/bin/p").console_stdio(true),
                kernel
            )
            .stdin(Stdio::Null))
            .contains("are the console")
        );
        assert!(err(vm(MicroVm::find().env("A", "b"), kernel)).contains("--env"));
        let missing = err(vm(
            MicroVm::run("/nix/store/00000000000000000000000000000000-p/bin/p"),
            kernel,
        ));
        assert!(missing.contains("is not in the store"), "{missing}");
        let conflict = err(vm(MicroVm::run("/bin/sh").cmdline("tvix.shell"), kernel));
        assert!(
            conflict.contains("conflicts with the command line"),
            "{conflict}"
        );
    }
}
