//! Marks on the way from process start to the guest's first instruction, and the time
//! spent in KVM ioctls on that way, for the start-up benchmark
//! (benches/benches/vmm_startup.rs).
//!
//! Enabled when target `tvix_boot::startup` logs at debug level. Marks and ioctl times
//! are then kept in memory and logged together by [`report`] at the vCPU's first exit:
//! a log line per mark as it happened would cost tens of microseconds each (formatting
//! and a write to stderr) and be counted in the very stages it measures. Marks carry the
//! CLOCK_MONOTONIC time in nanoseconds, a clock the benchmark (another process) reads
//! too. Off, each mark and each timed ioctl costs one check of the log level.
//!
//! What is logged, in this order (the benchmark parses it):
//!
//! - `ioctl NAME x COUNT took NS`, per KVM request made before the first KVM_RUN;
//! - `stage NAME at NS`, per mark, the last one `first exit`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The tracing target of the marks.
pub const TARGET: &str = "tvix_boot::startup";

/// Marks so far, in the order taken.
static MARKS: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());
/// Per request: how often it was made and its total time in nanoseconds.
static IOCTLS: Mutex<Vec<(&'static str, u32, u64)>> = Mutex::new(Vec::new());
/// Set by [`report`]: later marks and ioctls are not part of start-up.
static REPORTED: AtomicBool = AtomicBool::new(false);

fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG) && !REPORTED.load(Ordering::Relaxed)
}

/// Notes that `stage` is done now.
pub fn mark(stage: &'static str) {
    if enabled() {
        mark_at(stage, monotonic_ns());
    }
}

/// Notes that `stage` was done at `ns` (from [`monotonic_ns`]), for marks taken before
/// logging was set up.
pub fn mark_at(stage: &'static str, ns: u64) {
    if enabled() {
        lock(&MARKS).push((stage, ns));
    }
}

/// Runs `ioctl`, a KVM request named `request` (a few of them: one call of kvm-ioctls
/// may make several), and adds its time to `request`'s.
pub fn kvm_ioctl<T>(request: &'static str, ioctl: impl FnOnce() -> T) -> T {
    if !enabled() {
        return ioctl();
    }
    let started = monotonic_ns();
    let result = ioctl();
    let took = monotonic_ns().saturating_sub(started);
    let mut ioctls = lock(&IOCTLS);
    match ioctls.iter_mut().find(|(name, _, _)| *name == request) {
        Some((_, count, total)) => {
            *count += 1;
            *total += took;
        }
        None => ioctls.push((request, 1, took)),
    }
    result
}

/// Logs every ioctl time and mark taken so far, and stops taking them: called once, at
/// the first exit of the boot vCPU.
pub fn report() {
    if !enabled() || REPORTED.swap(true, Ordering::Relaxed) {
        return;
    }
    for (request, count, ns) in lock(&IOCTLS).drain(..) {
        tracing::debug!(target: TARGET, "ioctl {request} x {count} took {ns}");
    }
    for (stage, ns) in lock(&MARKS).drain(..) {
        tracing::debug!(target: TARGET, "stage {stage} at {ns}");
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it left plain data, still worth reporting.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
