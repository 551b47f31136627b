//! System-call filters (seccomp-bpf) for tvix-boot's threads, one per thread role.
//!
//! The guest drives the vCPU threads (every MMIO and port access), the virtio-fs workers
//! (every FUSE request) and the event loop (its console queues). A bug in any of them
//! that gives the guest control of a thread should not give it the host: each thread is
//! restricted to the system calls its role needs (`filters.rs` lists them, as data). None
//! of them may start a process (`execve`, `fork`: `clone` is allowed only with
//! `CLONE_THREAD`), trace one, mount, load kernel code or change credentials; vCPU
//! threads may not even open a file.
//!
//! Filters stack in Linux: a thread keeps the filters of the thread that created it and
//! adds its own, and a call must pass all of them. So a VM's threads form a tree whose
//! root is the thread that runs the VM: it installs the [`ThreadRole::EventLoop`]
//! filter, which allows everything the other roles allow, and starts every other thread
//! of the VM (its vCPUs, and the device threads it starts when it activates a device)
//! through [`spawn`], which installs the new thread's own filter before it runs
//! anything.
//!
//! Whether filters are on is the front end's decision: [`enable`] turns them on for the
//! process (off by default, so a library user or a unit test is not filtered unless it
//! asks). A forbidden call ends the process with SIGSYS, after a message on stderr that
//! names the call and the thread; or, in [`SeccompMode::Log`], is allowed and logged by
//! the kernel (audit type 1326, in `dmesg`), to find what a filter lacks.

use std::sync::OnceLock;
use std::sync::mpsc;
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

mod filters;

/// Why a filter could not be built or installed, or a filtered thread not started.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum SeccompError {
    /// seccompiler rejected the role's rules (a bug in this crate's table).
    #[error("cannot build the seccomp filter for {role:?} threads: {source}")]
    Build {
        role: ThreadRole,
        source: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter for {role:?} threads: {source}")]
    Install {
        role: ThreadRole,
        source: seccompiler::Error,
    },
    /// Filters exist only for x86_64 system-call numbers.
    #[error("seccomp filters are only written for x86_64")]
    Architecture,
    /// `sigaction` for SIGSYS failed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// [`enable`] was called before, in this mode.
    #[error("seccomp is already enabled in {0:?} mode")]
    AlreadyEnabled(SeccompMode),
    /// The operating system could not start the thread.
    #[error("cannot start thread {name:?}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
}

/// What a filter does with a call its role does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeccompMode {
    /// End the process with SIGSYS (after a message on stderr).
    Enforce,
    /// Allow the call and have the kernel log it (audit type 1326).
    Log,
}

/// What a thread does, and so which system calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadRole {
    /// Runs KVM_RUN and emulates the devices on MMIO and port exits.
    Vcpu,
    /// Serves FUSE requests from the store: one virtio-fs queue (in-process or
    /// vhost-user), or a /dev/fuse channel of the host mount. The store may have to fetch
    /// (substitute) a path and write it, so it reads and writes store files, and when
    /// [`Policy::network`] is set, talks to binary caches.
    VirtioFs,
    /// The store's I/O runtime (tokio workers and their blocking pool).
    StoreIo,
    /// Serves a vhost-user frontend (another VMM) on its socket: accepts it, takes the
    /// guest memory and eventfds it sends, starts the queue threads (which then take
    /// [`ThreadRole::VirtioFs`]).
    VhostUserFrontend,
    /// The thread that runs a VM and its event loop: it starts the VM's other threads,
    /// activates devices, moves bytes between the consoles and host descriptors, keeps
    /// the timers, waits for the guest to stop and tears everything down. Its filter
    /// allows what every other role allows, and timers.
    EventLoop,
}

impl ThreadRole {
    /// Every role, in the order of their discriminants.
    pub const ALL: [ThreadRole; 5] = [
        ThreadRole::Vcpu,
        ThreadRole::VirtioFs,
        ThreadRole::StoreIo,
        ThreadRole::VhostUserFrontend,
        ThreadRole::EventLoop,
    ];
}

/// What the filters allow beyond each role's fixed set.
#[derive(Clone, Copy, Debug, Default)]
pub struct Policy {
    /// Sockets for the store's substituters (binary caches over HTTP).
    pub network: bool,
}

/// How [`enable`] sets filters up.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Trap or log calls outside a role.
    pub mode: SeccompMode,
    /// What the roles may do beyond their fixed sets.
    pub policy: Policy,
    /// Run by the SIGSYS handler before the process dies of a forbidden call (the front
    /// end puts the terminal back). It runs in a signal handler: it must be
    /// async-signal-safe.
    pub before_death: Option<fn()>,
}

struct Enabled {
    mode: SeccompMode,
    policy: Policy,
    before_death: Option<fn()>,
    /// Each role's program, indexed by the role, compiled on first use.
    filters: [OnceLock<BpfProgram>; ThreadRole::ALL.len()],
    clone3_fallback: BpfProgram,
}

static ENABLED: OnceLock<Enabled> = OnceLock::new();

/// The mode filters are enabled in, if they are.
pub fn mode() -> Option<SeccompMode> {
    ENABLED.get().map(|enabled| enabled.mode)
}

/// Turns filters on for this process: from now on [`spawn`] installs each role's filter
/// in the threads it starts, and [`apply_to_current_thread`] in the calling thread.
/// Compiles the event loop's filter, the union of all the others, so a list that cannot
/// be compiled is reported here; each other role's is compiled when its first thread
/// starts (off the way to a guest's first instruction).
pub fn enable(options: Options) -> Result<(), SeccompError> {
    if let Some(enabled) = ENABLED.get() {
        return Err(SeccompError::AlreadyEnabled(enabled.mode));
    }
    if std::env::consts::ARCH != "x86_64" {
        return Err(SeccompError::Architecture);
    }
    let filters = ThreadRole::ALL.map(|_| OnceLock::new());
    filters[ThreadRole::EventLoop as usize]
        .set(filters::build(
            ThreadRole::EventLoop,
            options.policy,
            options.mode,
        )?)
        .expect("a fresh cell");
    if options.mode == SeccompMode::Enforce {
        install_sigsys_handler()?;
    }
    let enabled = Enabled {
        mode: options.mode,
        policy: options.policy,
        before_death: options.before_death,
        filters,
        clone3_fallback: filters::clone3_fallback()?,
    };
    ENABLED
        .set(enabled)
        .map_err(|_| SeccompError::AlreadyEnabled(options.mode))
}

thread_local! {
    /// The role whose filter this thread runs under, last installed or inherited.
    static CURRENT_ROLE: std::cell::Cell<Option<ThreadRole>> = const { std::cell::Cell::new(None) };
}

/// Installs `role`'s filter in the calling thread; nothing when filters are not enabled,
/// or when the thread already runs under exactly that filter. It cannot be taken back.
pub fn apply_to_current_thread(role: ThreadRole) -> Result<(), SeccompError> {
    let Some(enabled) = ENABLED.get() else {
        return Ok(());
    };
    if CURRENT_ROLE.get() == Some(role) {
        return Ok(());
    }
    install_role(enabled, role, CURRENT_ROLE.get().is_none())?;
    CURRENT_ROLE.set(Some(role));
    Ok(())
}

/// Installs `role`'s program, and the clone3 fallback unless the thread has it already
/// (from the thread that started it).
fn install_role(
    enabled: &Enabled,
    role: ThreadRole,
    with_clone3_fallback: bool,
) -> Result<(), SeccompError> {
    let install = |program: &BpfProgram| {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Install { role, source })
    };
    let program = match enabled.filters[role as usize].get() {
        Some(program) => program,
        None => {
            let built = filters::build(role, enabled.policy, enabled.mode)?;
            enabled.filters[role as usize].get_or_init(|| built)
        }
    };
    if with_clone3_fallback {
        install(&enabled.clone3_fallback)?;
    }
    install(program)
}

/// Starts a thread named `name` that installs `role`'s filter, then runs `body`.
///
/// The thread is started by the calling thread, so it keeps the caller's filter under
/// its own: start a role's threads from a thread whose filter allows all the role does
/// (the thread that runs a VM allows everything every role does). If the filter cannot
/// be installed, the thread logs why and ends without running `body`; the returned
/// handle's `join` then gives `None`.
pub fn spawn<F, T>(role: ThreadRole, name: String, body: F) -> Result<RoleThread<T>, SeccompError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (result_tx, result_rx) = mpsc::sync_channel(1);
    let thread_name = name.clone();
    let inherited = CURRENT_ROLE.get();
    let wrapped = move || {
        CURRENT_ROLE.set(inherited);
        if let Err(e) = apply_to_current_thread(role) {
            tracing::error!(thread = %thread_name, "{e}; the thread does not run");
            return;
        }
        let _ = result_tx.send(body());
    };
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(wrapped)
        .map_err(|source| SeccompError::Spawn { name, source })?;
    Ok(RoleThread {
        handle,
        result: result_rx,
    })
}

/// A thread started by [`spawn`].
pub struct RoleThread<T> {
    handle: JoinHandle<()>,
    result: mpsc::Receiver<T>,
}

impl<T> RoleThread<T> {
    /// Waits for the thread; `None` if it panicked or never ran its body.
    pub fn join(self) -> Option<T> {
        let _ = self.handle.join();
        self.result.try_recv().ok()
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// The thread, to signal it.
    pub fn thread_handle(&self) -> &JoinHandle<()> {
        &self.handle
    }
}

/// Offset of `si_syscall` in x86_64's siginfo_t for SIGSYS (after signo, errno, code,
/// padding and `si_call_addr`).
const SIGINFO_SYSCALL_OFFSET: usize = 24;

/// Runs on the thread that made a forbidden call: says which call and which thread, runs
/// [`Options::before_death`] (which puts the terminal back), and has the process die of
/// SIGSYS. Async-signal-safe: only write, prctl, the hook, signal and raise, with no
/// allocation.
extern "C" fn on_forbidden_syscall(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS
    // from seccomp, si_syscall is the int at this offset.
    let syscall = unsafe {
        info.cast::<u8>()
            .add(SIGINFO_SYSCALL_OFFSET)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let mut thread = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, thread.as_mut_ptr()) };
    let thread_len = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    let mut message = [0u8; 256];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        let n = bytes.len().min(message.len() - len);
        message[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    // The call's first arguments tell e.g. which ioctl it was.
    // SAFETY: for a SA_SIGINFO handler the kernel passes a valid ucontext_t, whose
    // general registers hold the arguments of the trapped call (rdi, rsi, rdx).
    let arguments = unsafe {
        let registers = &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        [
            registers[libc::REG_RDI as usize] as u64,
            registers[libc::REG_RSI as usize] as u64,
            registers[libc::REG_RDX as usize] as u64,
        ]
    };
    let mut digits = [0u8; 20];
    push(b"tvix-boot: seccomp: thread ");
    push(&thread[..thread_len]);
    push(b" made system call ");
    push(format_number(
        i64::from(syscall).unsigned_abs(),
        10,
        &mut digits,
    ));
    push(b" (");
    for (i, argument) in arguments.into_iter().enumerate() {
        if i > 0 {
            push(b", ");
        }
        push(b"0x");
        push(format_number(argument, 16, &mut digits));
    }
    push(b", ...), which its filter forbids; stopping (--seccomp=log lets it through)\n");
    // SAFETY: writes `len` initialised bytes of `message` to stderr.
    unsafe { libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), len) };
    if let Some(Some(before_death)) = ENABLED.get().map(|enabled| enabled.before_death) {
        before_death();
    }
    // SAFETY: signal and raise are async-signal-safe; SIGSYS is blocked while this handler
    // runs, so it is delivered (with the default action: end the process) on return.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// `value` in `base` (10 or 16), in the end of `digits`, without allocating.
fn format_number(mut value: u64, base: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b"0123456789abcdef"[(value % base) as usize];
        value /= base;
        if value == 0 {
            return &digits[start..];
        }
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is an extern "C"
    // fn of the SA_SIGINFO signature and only makes async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_forbidden_syscall;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Each case runs in a child process (this test binary again, running `child` only),
    //! since a filter cannot be taken back and a forbidden call ends the whole process.

    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::Command;

    use super::*;

    const CHILD_ENV: &str = "TVIX_BOOT_SECCOMP_TEST_CHILD";

    fn role_named(name: &str) -> ThreadRole {
        ThreadRole::ALL
            .into_iter()
            .find(|role| format!("{role:?}") == name)
            .unwrap_or_else(|| panic!("no role {name}"))
    }

    /// Calls every role may make, and some of those its role is for.
    fn allowed_work(role: ThreadRole) {
        let block = vec![1u8; 1 << 20];
        eprintln!("{role:?} thread at work ({} bytes)", block.len());
        match role {
            // Emulating a device: time, and writes to descriptors it was given.
            ThreadRole::Vcpu => eprintln!("{:?}", std::time::Instant::now()),
            ThreadRole::VirtioFs | ThreadRole::StoreIo | ThreadRole::VhostUserFrontend => {
                let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
                assert!(!exe.is_empty());
            }
            ThreadRole::EventLoop => {
                std::thread::spawn(|| 1).join().map(drop).unwrap();
                let mut timer = vmm_sys_util::timerfd::TimerFd::new().unwrap();
                timer
                    .reset(std::time::Duration::from_millis(1), None)
                    .unwrap();
                timer.wait().unwrap();
            }
        }
    }

    /// A call outside `role`'s filter.
    fn forbidden_call(role: ThreadRole) {
        match role {
            ThreadRole::Vcpu => {
                let _ = std::fs::File::open("/dev/null");
            }
            ThreadRole::VirtioFs => {
                // No sockets without Policy::network.
                // SAFETY: plain socket(2); the descriptor, if any, is closed below.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                // SAFETY: closes only what socket returned.
                unsafe { libc::close(fd) };
            }
            ThreadRole::StoreIo | ThreadRole::VhostUserFrontend => {
                // Not via Command: posix_spawn blocks every signal around its clone, and
                // a blocked SIGSYS kills without running the handler (so, no message).
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                // SAFETY: a NUL-terminated argv of C strings and an empty environment; if
                // the filter let it through, /bin/true would replace this process.
                unsafe { libc::execve(argv[0], argv.as_ptr(), [std::ptr::null()].as_ptr()) };
            }
            ThreadRole::EventLoop => {
                // A process, not a thread: clone without CLONE_THREAD.
                // SAFETY: raw clone(SIGCHLD), as fork does; a child, if one is made,
                // leaves at once.
                let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
                if pid == 0 {
                    // SAFETY: _exit is always safe to call.
                    unsafe { libc::_exit(0) };
                }
            }
        }
    }

    #[test]
    #[ignore = "runs in a child process of the tests below"]
    fn child() {
        let Ok(case) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (role, forbidden) = match case.split_once(':') {
            Some((role, "forbidden")) => (role_named(role), true),
            _ => (role_named(&case), false),
        };
        enable(Options {
            mode: SeccompMode::Enforce,
            policy: Policy::default(),
            before_death: None,
        })
        .unwrap();
        let thread = spawn(role, "test-role".to_owned(), move || {
            allowed_work(role);
            if forbidden {
                forbidden_call(role);
            }
            7
        })
        .unwrap();
        assert_eq!(thread.join(), Some(7));
    }

    fn run_child(case: &str) -> (std::process::ExitStatus, String) {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", "tests::child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, case);
        // SAFETY: setrlimit is async-signal-safe; the SIGSYS deaths below leave no core.
        unsafe {
            command.pre_exec(|| {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        let output = command.output().unwrap();
        (
            output.status,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    #[test]
    fn each_role_does_its_work_under_its_filter() {
        for role in ThreadRole::ALL {
            let (status, stderr) = run_child(&format!("{role:?}"));
            assert!(status.success(), "{role:?}: {status}\n{stderr}");
            assert!(
                stderr.contains(&format!("{role:?} thread at work")),
                "{stderr}"
            );
        }
    }

    #[test]
    fn a_forbidden_call_ends_the_process_with_sigsys_and_says_what_it_was() {
        let expected = [
            (ThreadRole::Vcpu, libc::SYS_openat),
            (ThreadRole::VirtioFs, libc::SYS_socket),
            (ThreadRole::StoreIo, libc::SYS_execve),
            (ThreadRole::VhostUserFrontend, libc::SYS_execve),
            (ThreadRole::EventLoop, libc::SYS_clone),
        ];
        for (role, call) in expected {
            let (status, stderr) = run_child(&format!("{role:?}:forbidden"));
            assert_eq!(
                status.signal(),
                Some(libc::SIGSYS),
                "{role:?}: {status}\n{stderr}"
            );
            let message = format!("seccomp: thread test-role made system call {call} (");
            assert!(stderr.contains(&message), "{role:?}: {stderr}");
        }
    }

    #[test]
    fn roles_are_indexed_by_their_discriminants() {
        for (index, role) in ThreadRole::ALL.into_iter().enumerate() {
            assert_eq!(role as usize, index, "{role:?}");
        }
    }
}
