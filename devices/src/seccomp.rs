//! System-call filters (seccomp-bpf) for the threads of a running VM, one per thread role.
//!
//! The guest drives the vCPU threads (every MMIO and port access), the virtio-fs workers
//! (every FUSE request) and the console workers (its queues). A bug in any of them that
//! gives the guest control of a thread should not give it the host: each thread is
//! restricted to the system calls its role needs. None of them may start a process
//! (`execve`, `fork`: `clone` is allowed only with `CLONE_THREAD`), trace one, mount,
//! load kernel code or change credentials; vCPU threads may not even open a file.
//!
//! Filters stack in Linux: a thread keeps the filters of the thread that created it and
//! adds its own, and a call must pass all of them. So:
//!
//! - the thread that runs the VM installs the [`ThreadRole::EventLoop`] filter, which
//!   allows everything the other roles allow, before any vCPU starts;
//! - every role thread is started through [`spawn`], and installs its own filter before it
//!   runs anything;
//! - threads that devices start while the guest runs (on the vCPU thread that activates
//!   them) are created by a launcher thread, so they do not inherit the vCPU filter.
//!
//! [`enable`] turns this on for the process (off by default, so a library user or a unit
//! test is not filtered unless it asks). A forbidden call ends the process with SIGSYS,
//! after a message on stderr that names the call and the thread; or, in
//! [`SeccompMode::Log`], is allowed and logged by the kernel (audit type 1326, in
//! `dmesg`), to find what a filter lacks.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why a filter could not be built or installed, or a filtered thread not started.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum SeccompError {
    /// seccompiler rejected the role's rules (a bug in this module).
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
    /// The launcher thread that starts role threads has exited (it panicked).
    #[error("the seccomp thread launcher is gone")]
    LauncherGone,
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
    /// The thread that runs the VM and its event loop (see [`crate::event_loop`]): it
    /// starts the others, moves bytes between the consoles and host descriptors, keeps
    /// the timers, waits for the guest to stop and tears everything down. Its filter
    /// allows what every other role allows, and timers.
    EventLoop,
}

impl ThreadRole {
    const ALL: [ThreadRole; 5] = [
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

struct Enabled {
    mode: SeccompMode,
    policy: Policy,
    /// Each role's program, indexed by the role, compiled on first use.
    filters: [OnceLock<BpfProgram>; ThreadRole::ALL.len()],
    /// Returns ENOSYS for clone3, whose flags a filter cannot see, so that glibc falls
    /// back to clone, whose flags it can.
    clone3_fallback: BpfProgram,
    launcher: Mutex<mpsc::Sender<LaunchRequest>>,
}

static ENABLED: OnceLock<Enabled> = OnceLock::new();

/// The mode filters are enabled in, if they are.
pub fn mode() -> Option<SeccompMode> {
    ENABLED.get().map(|enabled| enabled.mode)
}

/// Turns filters on for this process: from now on [`spawn`] installs each role's filter
/// in the threads it starts, and [`apply_to_current_thread`] in the calling thread.
/// Builds every filter first, so a filter that cannot be built is reported here.
pub fn enable(mode: SeccompMode, policy: Policy) -> Result<(), SeccompError> {
    if let Some(enabled) = ENABLED.get() {
        return Err(SeccompError::AlreadyEnabled(enabled.mode));
    }
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|_| SeccompError::Architecture)?;
    if arch != TargetArch::x86_64 {
        return Err(SeccompError::Architecture);
    }
    // Built now, so that a list that cannot be compiled is reported here; the others are
    // compiled when a thread of their role first starts (off the way to the guest's
    // first instruction).
    let filters = ThreadRole::ALL.map(|_| OnceLock::new());
    filters[ThreadRole::EventLoop as usize]
        .set(build(ThreadRole::EventLoop, policy, mode)?)
        .expect("a fresh cell");
    let clone3_fallback = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|source| SeccompError::Build {
        role: ThreadRole::EventLoop,
        source,
    })?;
    if mode == SeccompMode::Enforce {
        install_sigsys_handler()?;
    }
    let (requests, incoming) = mpsc::channel();
    let enabled = Enabled {
        mode,
        policy,
        filters,
        clone3_fallback,
        launcher: Mutex::new(requests),
    };
    if ENABLED.set(enabled).is_err() {
        return Err(SeccompError::AlreadyEnabled(mode));
    }
    // The launcher gets the event loop's filter: everything it starts narrows it.
    let launcher = std::thread::Builder::new()
        .name("thread-launcher".to_owned())
        .spawn(move || {
            if let Err(e) = apply_to_current_thread(ThreadRole::EventLoop) {
                tracing::error!("{e}");
                return;
            }
            for request in incoming {
                let LaunchRequest { name, body, reply } = request;
                let spawned = std::thread::Builder::new().name(name).spawn(body);
                let _ = reply.send(spawned);
            }
        })
        .map_err(|source| SeccompError::Spawn {
            name: "thread-launcher".to_owned(),
            source,
        })?;
    drop(launcher);
    Ok(())
}

thread_local! {
    /// The role whose filter this thread runs under, last installed or inherited.
    static CURRENT_ROLE: std::cell::Cell<Option<ThreadRole>> = const { std::cell::Cell::new(None) };
}

/// Installs `role`'s filter in the calling thread; nothing when filters are not enabled,
/// or when the thread already runs under exactly that filter (it was started by
/// [`spawn`] for that role). It cannot be taken back.
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
            let built = build(role, enabled.policy, enabled.mode)?;
            enabled.filters[role as usize].get_or_init(|| built)
        }
    };
    if with_clone3_fallback {
        install(&enabled.clone3_fallback)?;
    }
    install(program)
}

/// `role`'s program.
fn build(role: ThreadRole, policy: Policy, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let arch = TargetArch::x86_64;
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = syscalls::rules(role, policy);
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|source| SeccompError::Build { role, source })?;
    BpfProgram::try_from(filter).map_err(|source| SeccompError::Build { role, source })
}

struct LaunchRequest {
    name: String,
    body: Box<dyn FnOnce() + Send>,
    reply: mpsc::Sender<std::io::Result<JoinHandle<()>>>,
}

/// Starts a thread named `name` that installs `role`'s filter, then runs `body`.
///
/// With filters enabled the thread is created by the launcher thread, so it does not
/// inherit the filter of the caller (a vCPU activating a device). If the filter cannot
/// be installed, the thread logs why and ends without running `body`; the returned
/// handle's `join` then gives `None`.
pub fn spawn<F, T>(role: ThreadRole, name: String, body: F) -> Result<RoleThread<T>, SeccompError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    start(role, name, body, true)
}

/// Like [`spawn`], but the thread is started by the calling thread, so it keeps the
/// caller's filter under its own. For a caller whose filter allows all its role does
/// (the thread that runs the VM, starting its vCPUs): no round trip to the launcher.
pub fn spawn_from_here<F, T>(
    role: ThreadRole,
    name: String,
    body: F,
) -> Result<RoleThread<T>, SeccompError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    start(role, name, body, false)
}

/// With `through_launcher`, the launcher starts the thread when filters are on.
fn start<F, T>(
    role: ThreadRole,
    name: String,
    body: F,
    through_launcher: bool,
) -> Result<RoleThread<T>, SeccompError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (result_tx, result_rx) = mpsc::sync_channel(1);
    let thread_name = name.clone();
    let launcher = ENABLED.get().filter(|_| through_launcher);
    // The filter the new thread starts with: the launcher's, or the caller's.
    let inherited = match launcher {
        Some(_) => Some(ThreadRole::EventLoop),
        None => CURRENT_ROLE.get(),
    };
    let wrapped = move || {
        CURRENT_ROLE.set(inherited);
        if let Err(e) = apply_to_current_thread(role) {
            tracing::error!(thread = %thread_name, "{e}; the thread does not run");
            return;
        }
        let _ = result_tx.send(body());
    };
    let handle = match launcher {
        None => std::thread::Builder::new()
            .name(name.clone())
            .spawn(wrapped)
            .map_err(|source| SeccompError::Spawn { name, source })?,
        Some(enabled) => {
            let (reply, replied) = mpsc::channel();
            let request = LaunchRequest {
                name: name.clone(),
                body: Box::new(wrapped),
                reply,
            };
            enabled
                .launcher
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .send(request)
                .map_err(|_| SeccompError::LauncherGone)?;
            replied
                .recv()
                .map_err(|_| SeccompError::LauncherGone)?
                .map_err(|source| SeccompError::Spawn { name, source })?
        }
    };
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

/// Runs on the thread that made a forbidden call: says which call and which thread, puts
/// the terminal back, and has the process die of SIGSYS. Async-signal-safe: only write,
/// prctl, tcsetattr, signal and raise, with no allocation.
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
    crate::terminal::restore();
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

/// The allowed calls of each role. Lists, not logic: add a call where a role needs it,
/// with the reason when it is not obvious.
mod syscalls {
    use super::*;

    type Rules = BTreeMap<i64, Vec<SeccompRule>>;

    /// Every thread: memory, threads' own life cycle, time, signals, locks, and reading
    /// and writing descriptors it already has (logs go to stderr).
    const BASE: &[i64] = &[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_futex,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettid,
        libc::SYS_getpid,
        // raise() and pthread_kill, for SIGSYS above and for stopping vCPUs
        libc::SYS_tgkill,
        libc::SYS_getrandom,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_fcntl,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
    ];

    /// Reading and writing the store's files (blobs, indexes) and making new ones.
    const STORE_FILES: &[i64] = &[
        libc::SYS_openat,
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_flock,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_getdents64,
        libc::SYS_fstatfs,
        libc::SYS_statfs,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_getcwd,
        libc::SYS_eventfd2,
    ];

    /// HTTP(S) to binary caches: name resolution and TCP.
    const NETWORK: &[i64] = &[
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_shutdown,
        libc::SYS_bind,
        libc::SYS_uname,
    ];
    /// std's connect with a timeout switches the socket to non-blocking and back.
    const NETWORK_IOCTLS: &[u64] = &[libc::FIONBIO];

    /// A unix socket server that is passed descriptors (vhost-user).
    const SOCKET_SERVER: &[i64] = &[
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_getsockopt,
        libc::SYS_shutdown,
    ];

    /// An async runtime's reactor and thread pool.
    const RUNTIME: &[i64] = &[
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
    ];

    /// The vCPU ioctl; the terminal ones let the SIGSYS handler restore the terminal.
    const VCPU_IOCTLS: &[u64] = &[KVM_RUN];
    const TERMINAL_IOCTLS: &[u64] = &[
        libc::TCGETS,
        libc::TCSETS,
        libc::TCSETSW,
        libc::TCSETSF,
        libc::TIOCGWINSZ,
    ];

    /// _IO(KVMIO, 0x80).
    const KVM_RUN: u64 = 0xae80;

    fn allow(rules: &mut Rules, calls: &[i64]) {
        for &call in calls {
            rules.insert(call, Vec::new());
        }
    }

    fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
            .expect("argument indexes here are below 6")
    }

    /// `call` only when its first argument is one of `values`.
    fn allow_first_arg(rules: &mut Rules, call: i64, values: &[u64]) {
        let entry = rules.entry(call).or_default();
        for &value in values {
            entry.push(
                SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, value)])
                    .expect("one condition"),
            );
        }
    }

    fn allow_ioctls(rules: &mut Rules, requests: &[u64]) {
        let entry = rules.entry(libc::SYS_ioctl).or_default();
        for &request in requests {
            // The request number is 32 bits; compare the low half only.
            let rule = SeccompRule::new(vec![
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)
                    .expect("argument 1 exists"),
            ])
            .expect("one condition");
            entry.push(rule);
        }
    }

    /// Threads, not processes: clone must carry CLONE_THREAD.
    fn allow_threads(rules: &mut Rules) {
        let thread = libc::CLONE_THREAD as u64;
        let rule = SeccompRule::new(vec![condition(0, SeccompCmpOp::MaskedEq(thread), thread)])
            .expect("one condition");
        rules.insert(libc::SYS_clone, vec![rule]);
        // Answered with ENOSYS by the clone3 filter (glibc then uses clone).
        rules.insert(libc::SYS_clone3, Vec::new());
        // What a new thread does before its own filter is in place: std names it, then
        // the filter goes in (no_new_privs first, as seccomp requires).
        allow_first_arg(
            rules,
            libc::SYS_prctl,
            &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64],
        );
        allow_first_arg(
            rules,
            libc::SYS_seccomp,
            &[u64::from(libc::SECCOMP_SET_MODE_FILTER)],
        );
    }

    pub(super) fn rules(role: ThreadRole, policy: Policy) -> Rules {
        let mut rules = Rules::new();
        allow(&mut rules, BASE);
        allow_ioctls(&mut rules, TERMINAL_IOCTLS);
        // The SIGSYS handler names the thread.
        allow_first_arg(&mut rules, libc::SYS_prctl, &[libc::PR_GET_NAME as u64]);
        // send() and recv(), as write() and read() on a socket already connected: no
        // address (signal-hook's wake-up socket: the host mount's workers send on it when
        // the mount goes away, the window-size thread receives on it).
        for call in [libc::SYS_sendto, libc::SYS_recvfrom] {
            rules.insert(
                call,
                vec![
                    SeccompRule::new(vec![condition(4, SeccompCmpOp::Eq, 0)])
                        .expect("one condition"),
                ],
            );
        }
        match role {
            ThreadRole::Vcpu => {
                allow_ioctls(&mut rules, VCPU_IOCTLS);
                // Activating a device makes the eventfds that stop its workers.
                allow(&mut rules, &[libc::SYS_eventfd2]);
            }
            ThreadRole::VirtioFs => {
                allow(&mut rules, STORE_FILES);
                // vhost-user queue threads and /dev/fuse channels wait in epoll.
                allow(&mut rules, &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait]);
                // The store's runtime starts a blocking-pool thread from whichever thread
                // needs one first, and a worker waiting on the store may be that thread.
                allow_threads(&mut rules);
                if policy.network {
                    allow(&mut rules, NETWORK);
                    allow_ioctls(&mut rules, NETWORK_IOCTLS);
                }
            }
            ThreadRole::StoreIo => {
                allow(&mut rules, STORE_FILES);
                allow(&mut rules, RUNTIME);
                allow_threads(&mut rules);
                if policy.network {
                    allow(&mut rules, NETWORK);
                    allow_ioctls(&mut rules, NETWORK_IOCTLS);
                }
            }
            ThreadRole::VhostUserFrontend => {
                allow(&mut rules, STORE_FILES);
                allow(&mut rules, RUNTIME);
                allow(&mut rules, SOCKET_SERVER);
                allow_threads(&mut rules);
                if policy.network {
                    allow(&mut rules, NETWORK);
                    allow_ioctls(&mut rules, NETWORK_IOCTLS);
                }
            }
            ThreadRole::EventLoop => {
                for other in ThreadRole::ALL {
                    if other != ThreadRole::EventLoop {
                        for (call, conditions) in self::rules(other, policy) {
                            merge(&mut rules, call, conditions);
                        }
                    }
                }
                allow_threads(&mut rules);
                // Timers of its subscribers (the serial console's flush timer, the VM's
                // deadline), which may also be made on this thread.
                allow(
                    &mut rules,
                    &[libc::SYS_timerfd_create, libc::SYS_timerfd_settime],
                );
            }
        }
        rules
    }

    /// Adds `call`'s rules: no rules means "any arguments", and wins over conditions.
    fn merge(rules: &mut Rules, call: i64, conditions: Vec<SeccompRule>) {
        match rules.get_mut(&call) {
            Some(existing) if existing.is_empty() => {}
            Some(_) if conditions.is_empty() => {
                rules.insert(call, Vec::new());
            }
            Some(existing) => {
                for rule in conditions {
                    if !existing.contains(&rule) {
                        existing.push(rule);
                    }
                }
            }
            None => {
                rules.insert(call, conditions);
            }
        }
    }
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
            ThreadRole::Vcpu => drop(vmm_sys_util::eventfd::EventFd::new(0).unwrap()),
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
        enable(SeccompMode::Enforce, Policy::default()).unwrap();
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
            .args([
                "--exact",
                "seccomp::tests::child",
                "--ignored",
                "--nocapture",
            ])
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
    fn every_role_builds_and_indexes_its_own_program() {
        for (index, role) in ThreadRole::ALL.into_iter().enumerate() {
            assert_eq!(role as usize, index, "{role:?}");
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                build(role, Policy { network: true }, mode).unwrap();
            }
        }
    }

    #[test]
    fn the_event_loop_filter_allows_what_every_role_allows() {
        let policy = Policy { network: true };
        let event_loop = syscalls::rules(ThreadRole::EventLoop, policy);
        for role in ThreadRole::ALL {
            for (call, rules) in syscalls::rules(role, policy) {
                let allowed = &event_loop[&call];
                assert!(
                    allowed.is_empty() || rules.iter().all(|rule| allowed.contains(rule)),
                    "{role:?}: call {call} with {rules:?}; the event loop has {allowed:?}"
                );
            }
        }
    }
}
