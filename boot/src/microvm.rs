//! A microVM as a value: configure it like a [`std::process::Command`], start it, and
//! get a handle like a [`std::process::Child`].

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tvix_boot_devices::GuestExit;
use tvix_boot_devices::exit::ExitNotifier;
use tvix_boot_devices::seccomp::{self, RoleThread, SeccompError, ThreadRole};
use tvix_boot_devices::virtio::VirtioDevice;
use tvix_boot_devices::virtio::console::{ConsoleError, PortEnd, PortSpec, VirtioConsole};
use tvix_boot_guest_init::protocol::{
    CONTROL_PORT, DEFAULT_SHELL, HostRequest, KEY_CONTROL_PORT, KEY_STDIO_PORTS, KEY_WINSIZE_PORT,
    Mode, STATUS_INIT_FAILED, STDERR_PORT, STDIN_PORT, STDOUT_PORT, WINSIZE_PORT,
};
use tvix_boot_store::{Store, StoreAddrs, StoreError};
use tvix_boot_virtiofs::{QueueService, StoreFs, StoreFsOptions, VirtioFs};
use tvix_boot_vmm::{Console, Initrd, Vm, VmConfig, VmError, startup};

use crate::guest_mode::{self, GuestModeError};
use crate::host_signals::{HostSignals, TerminalSizes};
use crate::initrd::{self, HOST_BUSYBOX, InitrdError, ProgramSetup};

/// The virtio-fs tag the guest mounts at /nix/store.
const STORE_TAG: &str = "tvix";

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
    /// A descriptor for the program's streams or the control port could not be made.
    #[error("cannot set up the program's streams: {0}")]
    Stdio(std::io::Error),
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

/// What the guest runs.
#[derive(Clone, Debug)]
enum Guest {
    /// tvix-boot's init, doing this (or what the command line's keys say, for `None`).
    Init(Option<Mode>),
    /// The caller's own initramfs.
    CustomInitrd(PathBuf),
}

/// One of the program's streams (`run` with separate streams), like
/// [`std::process::Stdio`].
#[derive(Debug, Default)]
pub enum Stdio {
    /// This process's own descriptor (0, 1 or 2).
    #[default]
    Inherit,
    /// A pipe; the other end is in [`RunningVm`]'s `stdin`, `stdout` or `stderr`.
    Piped,
    /// Nothing: end of file for stdin, discarded output.
    Null,
    /// This descriptor (a file, a socket, one end of a pipe).
    Fd(OwnedFd),
}

impl From<File> for Stdio {
    fn from(file: File) -> Self {
        Stdio::Fd(file.into())
    }
}

impl From<OwnedFd> for Stdio {
    fn from(fd: OwnedFd) -> Self {
        Stdio::Fd(fd)
    }
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
    console_stdio: bool,
    terminal_sizes: Option<OwnedFd>,
    follow_terminal_size: bool,
    forward_signals: bool,
    virtiofs_queues: QueueService,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    console_log: Option<Box<dyn Write + Send>>,
    timeout: Option<Duration>,
    stop_grace: Duration,
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
            console_stdio: false,
            terminal_sizes: None,
            follow_terminal_size: false,
            forward_signals: false,
            virtiofs_queues: QueueService::Threads,
            env: Vec::new(),
            workdir: None,
            console_log: None,
            timeout: None,
            stop_grace: DEFAULT_STOP_GRACE,
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

    /// The guest's serial console is this process's stdin and stdout, and `run`'s or
    /// `shell`'s program has it as its terminal. While the VM runs, a terminal on stdin
    /// is in raw mode; it is restored on every way out, including fatal signals and
    /// panics (hooks for which this installs, process-wide). Off by default: the console
    /// then goes to [`Self::console_log`].
    pub fn console_stdio(mut self, on: bool) -> Self {
        self.console_stdio = on;
        self
    }

    /// With [`Self::console_stdio`]: `ROWS COLS` lines read from `sizes` (the first at
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

    /// With [`Self::console_stdio`] and stdin a terminal: the guest console follows the
    /// terminal's size, read at start and after each SIGWINCH (from a signalfd in the
    /// VM's event loop). SIGWINCH must be blocked in every thread of the process for the
    /// signalfd to see it: call [`crate::block_signals`] first thing in `main`. Ignored
    /// when [`Self::terminal_sizes`] gives the sizes.
    pub fn follow_terminal_size(mut self, on: bool) -> Self {
        self.follow_terminal_size = on;
        self
    }

    /// SIGTERM, SIGHUP, SIGINT and SIGQUIT sent to this process go to the guest's program
    /// (see [`VmStopper::signal`]), read from a signalfd in the VM's event loop; SIGTERM
    /// and SIGHUP also stop the VM after the stop grace time, should the guest not end
    /// by then. For a process that stands for its guest program, like the CLI. The
    /// signals must be blocked in every thread ([`crate::block_signals`] with
    /// [`crate::FORWARDED_SIGNALS`], before any thread starts). Only for guests that run
    /// a program under tvix-boot's init (run, shell, find).
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

    /// Where the serial console's output goes when it is not on stdio (default:
    /// discarded).
    pub fn console_log(mut self, log: impl Write + Send + 'static) -> Self {
        self.console_log = Some(Box::new(log));
        self
    }

    /// Stops the VM if it still runs this long after [`Self::start`]
    /// ([`ExitStatus::TimedOut`]).
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

    /// Checks everything, creates the VM and starts it on a thread of its own. Every
    /// input error (kernel, store, a program not in the store, memory) is reported here,
    /// before anything runs.
    pub fn start(mut self) -> Result<RunningVm, MicroVmError> {
        let started_at = Instant::now();
        let kernel = match self.kernel {
            Some(kernel) => kernel,
            None => match default_kernel() {
                Some(kernel) if kernel.exists() => kernel,
                looked_at => return Err(MicroVmError::NoKernel { looked_at }),
            },
        };
        let mut cmdline = DEFAULT_CMDLINE.to_owned();
        if let Some(extra) = self
            .cmdline
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let mut guest = self.guest;
        if !self.args.is_empty() {
            match &mut guest {
                Guest::Init(Some(Mode::Run { args, .. })) => args.append(&mut self.args),
                _ => return Err(MicroVmError::ArgsWithoutRun),
            }
        }
        // The mode, checked against the command line and the store before anything boots.
        let mut mode = match &guest {
            Guest::Init(requested) => Some(guest_mode::choose(&cmdline, requested.as_ref())?),
            Guest::CustomInitrd(_) => None,
        };
        let program_streams = matches!(mode, Some(Mode::Run { .. })) && !self.console_stdio;
        let streams_given = self.stdin.is_some() || self.stdout.is_some() || self.stderr.is_some();
        if streams_given && !program_streams {
            return Err(MicroVmError::StreamsWithConsole);
        }
        let program = match &mode {
            Some(Mode::Run { .. } | Mode::Shell { .. }) => Some(ProgramSetup {
                env: program_env(&self.env, self.console_stdio),
                workdir: self.workdir.clone(),
            }),
            _ if !self.env.is_empty() || self.workdir.is_some() => {
                return Err(MicroVmError::ProgramSetupWithoutProgram);
            }
            _ => None,
        };
        let store = match self.store {
            StoreSource::Open(store) => store,
            StoreSource::Addrs(addrs) => Arc::new(Store::open(&addrs)?),
            StoreSource::Embedded => Arc::new(Store::open(&StoreAddrs::embedded()?)?),
        };
        startup::mark("store opened");
        if let Some(mode) = &mut mode {
            guest_mode::check_in_store(&store, mode)?;
            guest_mode::append_keys(&mut cmdline, mode)?;
        }

        // Ports of the virtio-console device: the program's streams, the terminal size,
        // and (for tvix-boot's init, while it runs the program) the stop request.
        let mut ports = Vec::new();
        let mut handles = StreamEnds::default();
        if program_streams {
            cmdline.push(' ');
            cmdline.push_str(KEY_STDIO_PORTS);
            let stdin = stream_end(self.stdin.unwrap_or_default(), 0, false)?;
            let stdout = stream_end(self.stdout.unwrap_or_default(), 1, true)?;
            let stderr = stream_end(self.stderr.unwrap_or_default(), 2, true)?;
            handles.stdin = stdin.ours;
            handles.stdout = stdout.ours;
            handles.stderr = stderr.ours;
            ports.push(port(STDIN_PORT, PortEnd::Input(stdin.guests)));
            ports.push(port(STDOUT_PORT, PortEnd::Output(stdout.guests)));
            ports.push(port(STDERR_PORT, PortEnd::Output(stderr.guests)));
        }
        let mut terminal_sizes = None;
        if self.terminal_sizes.is_none()
            && self.follow_terminal_size
            && self.console_stdio
            && program.is_some()
            && let Some((port_end, sizes)) = TerminalSizes::start().map_err(MicroVmError::Stdio)?
        {
            self.terminal_sizes = Some(port_end);
            terminal_sizes = Some(sizes);
        }
        if let Some(sizes) = self
            .terminal_sizes
            .filter(|_| self.console_stdio && program.is_some())
        {
            cmdline.push(' ');
            cmdline.push_str(KEY_WINSIZE_PORT);
            ports.push(port(WINSIZE_PORT, PortEnd::Input(sizes)));
        }
        let control = match mode {
            Some(Mode::Run { .. } | Mode::Shell { .. } | Mode::Find) => {
                let (guests, ours) = nonblocking_pipe().map_err(MicroVmError::Stdio)?;
                cmdline.push(' ');
                cmdline.push_str(KEY_CONTROL_PORT);
                ports.push(port(CONTROL_PORT, PortEnd::Input(guests)));
                Some(ours)
            }
            _ => None,
        };

        let initrd = match (&guest, &mode) {
            (Guest::CustomInitrd(path), _) => Initrd::File(path.clone()),
            (_, Some(mode)) => {
                let bytes =
                    initrd::build_initrd_for(mode, Path::new(HOST_BUSYBOX), program.as_ref())?;
                tracing::info!("initrd built in memory: {} bytes", bytes.len());
                startup::mark("initrd built");
                Initrd::Bytes(bytes)
            }
            (Guest::Init(_), None) => unreachable!("tvix-boot's init always has a mode"),
        };
        let console = if self.console_stdio {
            Console::Stdio
        } else {
            Console::Writer(
                self.console_log
                    .unwrap_or_else(|| Box::new(std::io::sink())),
            )
        };
        let config = VmConfig {
            kernel,
            initrd: Some(initrd),
            cmdline,
            vcpus: self.cpus,
            mem_size: self.memory,
            console,
        };
        let mut vm = Vm::new(config)?;
        vm.add_virtio_device(store_device(
            store,
            u16::from(self.cpus),
            self.virtiofs_queues,
        ))?;
        if !ports.is_empty() {
            let device = VirtioConsole::new(ports).map_err(MicroVmError::Console)?;
            vm.add_virtio_device(Box::new(device))?;
        }
        let exit = vm.exit_notifier();
        if let Some(timeout) = self.timeout {
            exit.set_deadline(started_at + timeout, GuestExit::TimedOut);
        }
        let stopper = VmStopper {
            exit,
            control: control.map(Arc::new),
            grace: self.stop_grace,
        };
        // Signals go to the program only if there is one to take them.
        let forward = (self.forward_signals && stopper.control.is_some()).then(|| stopper.clone());
        if terminal_sizes.is_some() || forward.is_some() {
            let signals = HostSignals::new(terminal_sizes, forward).map_err(MicroVmError::Stdio)?;
            vm.add_subscriber(Box::new(signals));
        }
        let status = vm.guest_status();
        let expects_status = matches!(
            mode,
            Some(Mode::Run { .. } | Mode::Shell { .. } | Mode::Find)
        );
        // The ioctls that create the vCPUs here: the VM's thread starts with the event
        // loop's filter (when filters are on), which does not allow them.
        vm.prepare()?;
        let thread = seccomp::spawn(ThreadRole::EventLoop, "tvix-vm".to_owned(), move || {
            let exit = vm.run()?;
            Ok(ExitStatus::from_guest(exit, status.get(), expects_status))
        })
        .map_err(MicroVmError::Thread)?;
        Ok(RunningVm {
            stdin: handles.stdin,
            stdout: handles.stdout,
            stderr: handles.stderr,
            stopper,
            thread: Some(thread),
            status: None,
        })
    }
}

/// How a microVM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest's program (`run`, `shell`, `find`) ended with this status, as a shell
    /// reports it: 128 + N when signal N ended it, 127 when it could not be found.
    Exited(u8),
    /// The guest powered off, or reset, without reporting a status: a system booted
    /// with `init`, or a custom initrd.
    PoweredOff,
    /// tvix-boot's init expected to report a status and did not (a guest kernel without
    /// CONFIG_X86_IOPL_IOPERM cannot write the status port).
    NoStatus,
    /// tvix-boot's init failed; its error is on the console.
    InitFailed,
    /// The guest reported a status that is not one.
    InvalidStatus(u32),
    /// The guest kernel panicked.
    Panicked,
    /// The VM ran longer than [`MicroVm::timeout`] and was stopped.
    TimedOut,
    /// [`VmStopper::kill`], or a [`VmStopper::stop`] whose grace ran out, stopped the VM.
    Killed,
    /// With [`MicroVm::forward_signals`]: this process got the signal (SIGTERM or
    /// SIGHUP), passed it to the program, and the guest had not ended when the grace
    /// time ran out. A process standing for its program dies of that signal now.
    HostSignal(i32),
}

impl ExitStatus {
    fn from_guest(exit: GuestExit, reported: Option<u32>, expects_status: bool) -> Self {
        match exit {
            GuestExit::Panic => Self::Panicked,
            GuestExit::TimedOut => Self::TimedOut,
            GuestExit::Killed => Self::Killed,
            GuestExit::HostSignal(signal) => Self::HostSignal(signal),
            GuestExit::PowerOff | GuestExit::Reset => match reported {
                Some(STATUS_INIT_FAILED) => Self::InitFailed,
                Some(status) => {
                    u8::try_from(status).map_or(Self::InvalidStatus(status), Self::Exited)
                }
                None if expects_status => Self::NoStatus,
                None => Self::PoweredOff,
            },
        }
    }

    /// Whether the program ran and exited with 0, or the system powered off.
    pub fn success(&self) -> bool {
        matches!(self, Self::Exited(0) | Self::PoweredOff)
    }
}

/// A started microVM, like a [`std::process::Child`].
pub struct RunningVm {
    /// The program's stdin, when [`MicroVm::stdin`] was [`Stdio::Piped`]. Drop it for end
    /// of file.
    pub stdin: Option<File>,
    /// The program's stdout, when [`MicroVm::stdout`] was [`Stdio::Piped`].
    pub stdout: Option<File>,
    /// The program's stderr, when [`MicroVm::stderr`] was [`Stdio::Piped`].
    pub stderr: Option<File>,
    stopper: VmStopper,
    thread: Option<RoleThread<Result<ExitStatus, MicroVmError>>>,
    status: Option<ExitStatus>,
}

impl RunningVm {
    /// Waits for the VM to end; every thread and descriptor of it is gone when this
    /// returns. Later calls return the same status.
    pub fn wait(&mut self) -> Result<ExitStatus, MicroVmError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        // Like Child::wait: the program must not block on a stdin nobody closes.
        drop(self.stdin.take());
        let thread = self.thread.take().ok_or(MicroVmError::AlreadyReported)?;
        let status = thread.join().ok_or(MicroVmError::Panicked)??;
        self.status = Some(status);
        Ok(status)
    }

    /// Asks the guest to end its program and power off; stops the VM without it if it
    /// has not within the grace time. Returns at once; [`Self::wait`] for the end.
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// Stops the VM now; [`Self::wait`] then gives [`ExitStatus::Killed`].
    pub fn kill(&self) {
        self.stopper.kill();
    }

    /// Sends `signal` to the guest's program; see [`VmStopper::signal`].
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        self.stopper.signal(signal)
    }

    /// A handle that stops this VM from elsewhere (another thread, a signal watcher).
    pub fn stopper(&self) -> VmStopper {
        self.stopper.clone()
    }
}

impl Drop for RunningVm {
    /// A VM does not outlive its handle: dropping one that runs kills it and waits.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.kill();
            let _ = self.wait();
        }
    }
}

/// Stops a microVM; cheap to clone and usable from any thread.
#[derive(Clone)]
pub struct VmStopper {
    exit: ExitNotifier,
    /// Our end of the control port, for tvix-boot's init.
    control: Option<Arc<File>>,
    grace: Duration,
}

impl VmStopper {
    /// Asks the guest to stop (tvix-boot's init ends the program with SIGTERM, reports
    /// its status and powers off), and stops the VM without it after the grace time.
    pub fn stop(&self) {
        let _ = self.request(HostRequest::Stop);
        self.stop_after_grace(GuestExit::Killed);
    }

    /// Sends `signal` (1 to 64) to the guest's program, as a host would to a process:
    /// tvix-boot's init sends it to every process but itself; the program handles it or
    /// dies of it, and [`RunningVm::wait`] reports what it did. Only guests that run a
    /// program under tvix-boot's init (run, shell, find) can be signalled; for others,
    /// and for a number out of range, an `InvalidInput` or `Unsupported` error.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        if !(1..=64).contains(&signal) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{signal} is not a signal number (1 to 64)"),
            ));
        }
        self.request(HostRequest::Signal(signal))
    }

    fn request(&self, request: HostRequest) -> std::io::Result<()> {
        let Some(control) = &self.control else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this guest has no program to pass requests to (init or a custom initrd)",
            ));
        };
        // Non-blocking: a guest that reads nothing cannot hold the caller up.
        (&**control).write_all(format!("{}\n", request.to_line()).as_bytes())
    }

    /// Stops the VM now.
    pub fn kill(&self) {
        self.exit.request(GuestExit::Killed);
    }

    /// Stops the VM after the grace time unless it ends before, with `why`.
    pub(crate) fn stop_after_grace(&self, why: GuestExit) {
        self.exit.set_deadline(Instant::now() + self.grace, why);
    }
}

/// The program's ends of its streams that the caller gets.
#[derive(Default)]
struct StreamEnds {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
}

/// One stream: the guest's descriptor (for the port), and ours when piped.
struct StreamEnd {
    guests: OwnedFd,
    ours: Option<File>,
}

/// The descriptor for a port, from `stdio` (`fd` is this process's 0, 1 or 2).
fn stream_end(stdio: Stdio, fd: i32, output: bool) -> Result<StreamEnd, MicroVmError> {
    let err = MicroVmError::Stdio;
    let guests = match stdio {
        Stdio::Fd(fd) => fd,
        Stdio::Null => null(output).map_err(err)?,
        Stdio::Inherit => {
            // SAFETY: 0, 1 and 2 stay open for the process's life, or are closed; a
            // closed one reads as empty and writes go nowhere.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            match borrowed.try_clone_to_owned() {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => null(output).map_err(err)?,
                Err(e) => return Err(err(e)),
            }
        }
        Stdio::Piped => {
            let (reader, writer) = std::io::pipe().map_err(err)?;
            let (guests, ours): (OwnedFd, OwnedFd) = if output {
                (writer.into(), reader.into())
            } else {
                (reader.into(), writer.into())
            };
            return Ok(StreamEnd {
                guests,
                ours: Some(File::from(ours)),
            });
        }
    };
    Ok(StreamEnd { guests, ours: None })
}

fn null(writable: bool) -> std::io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(!writable)
        .write(writable)
        .open("/dev/null")?
        .into())
}

/// (read end for the guest, non-blocking write end for us), both close-on-exec.
pub(crate) fn nonblocking_pipe() -> std::io::Result<(OwnedFd, File)> {
    let (reader, writer) = std::io::pipe()?;
    let writer = File::from(OwnedFd::from(writer));
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers.
    unsafe {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&writer.as_fd());
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((reader.into(), writer))
}

fn port(name: &str, end: PortEnd) -> PortSpec {
    PortSpec::new(name, end).expect("tvix-boot's port names are valid")
}

/// The program's environment: the defaults, then `extra` (later entries win).
pub(crate) fn program_env(
    extra: &[(String, String)],
    with_terminal: bool,
) -> Vec<(String, String)> {
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

/// The guest's /nix/store: the store as a virtio-fs device with tag `tvix`, one request
/// queue per vCPU. The root is listable, so `tvix.find` and `ls /nix/store` work.
fn store_device(
    store: Arc<Store>,
    request_queues: u16,
    service: QueueService,
) -> Box<dyn VirtioDevice> {
    let fs = StoreFs::new(
        store,
        StoreFsOptions {
            list_root: true,
            show_xattr: false,
        },
    );
    Box::new(
        VirtioFs::new(fs, STORE_TAG, request_queues)
            .expect("the tag and queue count are valid")
            .with_queue_service(service),
    )
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

    #[test]
    fn exit_statuses_come_from_devices_and_the_status_port() {
        use ExitStatus::*;
        assert_eq!(
            ExitStatus::from_guest(GuestExit::PowerOff, Some(0), true),
            Exited(0)
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::Reset, Some(143), true),
            Exited(143)
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::PowerOff, None, true),
            NoStatus
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::PowerOff, None, false),
            PoweredOff
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::PowerOff, Some(STATUS_INIT_FAILED), true),
            InitFailed
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::PowerOff, Some(300), true),
            InvalidStatus(300)
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::Panic, Some(0), true),
            Panicked
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::TimedOut, None, true),
            TimedOut
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::Killed, Some(0), true),
            Killed
        );
        assert_eq!(
            ExitStatus::from_guest(GuestExit::HostSignal(15), Some(0), true),
            HostSignal(15)
        );
    }

    #[test]
    fn the_programs_environment_starts_small() {
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
}
