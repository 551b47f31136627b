//! Marks on the way from process start to the guest's first instruction, for the start-up
//! benchmark (benches/benches/vmm_startup.rs). Each is logged at debug level with target
//! `tvix_boot::startup` and the CLOCK_MONOTONIC time in nanoseconds, a clock the
//! benchmark (another process) reads too. Costs one check of the log level when off.

/// The tracing target of the marks.
pub const TARGET: &str = "tvix_boot::startup";

/// Logs that `stage` is done now.
pub fn mark(stage: &str) {
    if tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
        mark_at(stage, monotonic_ns());
    }
}

/// Logs that `stage` was done at `ns` (from [`monotonic_ns`]), for marks taken before
/// logging was set up.
pub fn mark_at(stage: &str, ns: u64) {
    tracing::debug!(target: TARGET, "stage {stage} at {ns}");
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
