//! What each thread role may do, as data: the system calls every thread makes
//! ([`BASE`]), named groups of further calls, and a table ([`GRANTS`]) of the groups each
//! role is granted. Add a call where a role needs it, with the reason when it is not
//! obvious; nothing below the table is policy.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::{Policy, SeccompError, SeccompMode, ThreadRole};

/// Every thread: memory, its own life cycle, time, signals, locks, and reading and
/// writing descriptors it already has (logs go to stderr).
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
    // raise() and pthread_kill, for SIGSYS below and for stopping vCPUs
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

/// Every thread: the terminal ioctls, so that the SIGSYS handler can put the terminal
/// back whichever thread trips it, and the thread that runs a VM can set raw mode.
const TERMINAL_IOCTLS: &[u64] = &[
    libc::TCGETS,
    libc::TCSETS,
    libc::TCSETSW,
    libc::TCSETSF,
    libc::TIOCGWINSZ,
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

/// Waiting in epoll (vhost-user queue threads, /dev/fuse channels).
const EPOLL_WAIT: &[i64] = &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait];

/// An async runtime's reactor and thread pool.
const RUNTIME: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
];

/// A unix socket server that is passed descriptors (vhost-user).
const SOCKET_SERVER: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_getsockopt,
    libc::SYS_shutdown,
];

/// Timers of the event loop's subscribers (the serial console's flush timer, the VM's
/// deadline).
const TIMERS: &[i64] = &[libc::SYS_timerfd_create, libc::SYS_timerfd_settime];

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

/// _IO(KVMIO, 0x80).
const KVM_RUN: u64 = 0xae80;

/// One entry of a role's grants.
#[derive(Clone, Copy, Debug)]
enum Grant {
    /// These system calls, with any arguments.
    Calls(&'static [i64]),
    /// `ioctl` with one of these request numbers.
    Ioctls(&'static [u64]),
    /// Start threads, not processes (`clone` only with `CLONE_THREAD`), which then
    /// install their own filters.
    Threads,
    /// [`NETWORK`] and [`NETWORK_IOCTLS`], when [`Policy::network`] is set.
    NetworkIfAllowed,
    /// What every other role may do.
    EveryOtherRole,
}

/// The policy: what each role may do beyond [`BASE`] and [`TERMINAL_IOCTLS`].
const GRANTS: [(ThreadRole, &[Grant]); ThreadRole::ALL.len()] = [
    // Runs KVM_RUN; emulating a device on an exit reads and writes guest memory and
    // eventfds it was given. Devices are activated on the event loop, not here, so a
    // vCPU makes nothing new: no files, no eventfds, no threads.
    (ThreadRole::Vcpu, &[Grant::Ioctls(&[KVM_RUN])]),
    // A lookup may substitute a path into the store; the store's runtime starts a
    // blocking-pool thread from whichever thread needs one first, and a worker waiting
    // on the store may be that thread.
    (
        ThreadRole::VirtioFs,
        &[
            Grant::Calls(STORE_FILES),
            Grant::Calls(EPOLL_WAIT),
            Grant::Threads,
            Grant::NetworkIfAllowed,
        ],
    ),
    (
        ThreadRole::StoreIo,
        &[
            Grant::Calls(STORE_FILES),
            Grant::Calls(RUNTIME),
            Grant::Threads,
            Grant::NetworkIfAllowed,
        ],
    ),
    (
        ThreadRole::VhostUserFrontend,
        &[
            Grant::Calls(STORE_FILES),
            Grant::Calls(RUNTIME),
            Grant::Calls(SOCKET_SERVER),
            Grant::Threads,
            Grant::NetworkIfAllowed,
        ],
    ),
    // Starts every other thread of a VM (so it keeps this filter under its own) and
    // activates devices, whose set-up is what those threads would do.
    (
        ThreadRole::EventLoop,
        &[Grant::EveryOtherRole, Grant::Threads, Grant::Calls(TIMERS)],
    ),
];

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn grants(role: ThreadRole) -> &'static [Grant] {
    GRANTS
        .iter()
        .find(|(listed, _)| *listed == role)
        .map(|(_, grants)| *grants)
        .expect("every role has a row in GRANTS")
}

/// `role`'s compiled program.
pub(crate) fn build(
    role: ThreadRole,
    policy: Policy,
    mode: SeccompMode,
) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(
        rules(role, policy),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { role, source })?;
    BpfProgram::try_from(filter).map_err(|source| SeccompError::Build { role, source })
}

/// The filter every thread gets before its role's: clone3 answers ENOSYS, since a
/// filter cannot see its flags, so glibc falls back to clone, whose flags it can.
pub(crate) fn clone3_fallback() -> Result<BpfProgram, SeccompError> {
    SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|source| SeccompError::Build {
        role: ThreadRole::EventLoop,
        source,
    })
}

/// The rules of `role`: [`BASE`] and [`TERMINAL_IOCTLS`], then its [`GRANTS`].
pub(crate) fn rules(role: ThreadRole, policy: Policy) -> Rules {
    let mut rules = Rules::new();
    allow(&mut rules, BASE);
    allow_ioctls(&mut rules, TERMINAL_IOCTLS);
    // The SIGSYS handler names the thread.
    allow_first_arg(&mut rules, libc::SYS_prctl, &[libc::PR_GET_NAME as u64]);
    // send() and recv(), as write() and read() on a socket already connected: no address.
    for call in [libc::SYS_sendto, libc::SYS_recvfrom] {
        let no_address = condition(4, SeccompCmpOp::Eq, 0);
        rules.insert(
            call,
            vec![SeccompRule::new(vec![no_address]).expect("one condition")],
        );
    }
    for grant in grants(role) {
        match *grant {
            Grant::Calls(calls) => allow(&mut rules, calls),
            Grant::Ioctls(requests) => allow_ioctls(&mut rules, requests),
            Grant::Threads => allow_threads(&mut rules),
            Grant::NetworkIfAllowed => {
                if policy.network {
                    allow(&mut rules, NETWORK);
                    allow_ioctls(&mut rules, NETWORK_IOCTLS);
                }
            }
            Grant::EveryOtherRole => {
                for other in ThreadRole::ALL.into_iter().filter(|&other| other != role) {
                    for (call, conditions) in self::rules(other, policy) {
                        merge(&mut rules, call, conditions);
                    }
                }
            }
        }
    }
    rules
}

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
            SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, value)]).expect("one condition"),
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
    // What a new thread does before its own filter is in place: std names it, then the
    // filter goes in (no_new_privs first, as seccomp requires).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_has_one_row_and_builds() {
        for role in ThreadRole::ALL {
            assert_eq!(
                GRANTS.iter().filter(|(listed, _)| *listed == role).count(),
                1,
                "{role:?}"
            );
            for mode in [SeccompMode::Enforce, SeccompMode::Log] {
                build(role, Policy { network: true }, mode).unwrap();
            }
        }
    }

    #[test]
    fn the_event_loop_filter_allows_what_every_role_allows() {
        let policy = Policy { network: true };
        let event_loop = rules(ThreadRole::EventLoop, policy);
        for role in ThreadRole::ALL {
            for (call, rules) in rules(role, policy) {
                let allowed = &event_loop[&call];
                assert!(
                    allowed.is_empty() || rules.iter().all(|rule| allowed.contains(rule)),
                    "{role:?}: call {call} with {rules:?}; the event loop has {allowed:?}"
                );
            }
        }
    }

    #[test]
    fn network_calls_only_with_the_policy() {
        for role in [ThreadRole::VirtioFs, ThreadRole::StoreIo] {
            assert!(!rules(role, Policy::default()).contains_key(&libc::SYS_socket));
            assert!(rules(role, Policy { network: true }).contains_key(&libc::SYS_socket));
        }
        assert!(!rules(ThreadRole::Vcpu, Policy { network: true }).contains_key(&libc::SYS_socket));
    }
}
