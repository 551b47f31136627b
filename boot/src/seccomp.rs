//! System-call filters for the threads of the VMs (and store services) this process
//! runs: the front end's policy over the `tvix-boot-seccomp` crate, which holds the
//! filters themselves (one per thread role, as data) and the spawn helper that installs
//! them.
//!
//! [`enable`] is the one switch, for the CLI and for programs embedding the library
//! alike. It does what filters need beyond the crate: the store's I/O runtime gets its
//! threads' filter (its threads are started lazily, from whichever thread first needs
//! the runtime, and must not inherit that thread's filter), and a forbidden call puts
//! the terminal back before the process dies of it.

use tvix_boot_seccomp::{Options, apply_to_current_thread};
pub use tvix_boot_seccomp::{Policy, SeccompError, SeccompMode, ThreadRole, mode};

/// Why the filters could not be turned on.
#[derive(Debug, thiserror::Error)]
pub enum EnableError {
    /// A filter could not be built, or filters were enabled before.
    #[error(transparent)]
    Filters(#[from] SeccompError),
    /// The thread that starts the store's I/O runtime could not be started.
    #[error("cannot start the thread that starts the store's I/O runtime: {0}")]
    StoreRuntimeStarter(std::io::Error),
    /// The store's I/O runtime already runs, and its threads have no filter.
    #[error(
        "the store's I/O runtime was started before the filters were enabled, so its \
         threads would run unfiltered: enable the filters before using the store"
    )]
    StoreRuntimeRunning,
}

/// Turns the filters on for this process, in `mode`, with `policy`: every VM started
/// afterwards runs each of its threads under its role's filter, as does the store's
/// I/O runtime. Call it before anything uses a store that needs the runtime (remote
/// stores, hashing large blobs): a runtime already running has unfiltered threads, and
/// then this fails ([`EnableError::StoreRuntimeRunning`]) rather than leaving them so. Filters cannot be turned off again; the thread that runs a VM keeps
/// the event loop's filter after the VM ends.
pub fn enable(mode: SeccompMode, policy: Policy) -> Result<(), EnableError> {
    let arranged = tvix_boot_store::start_io_runtime(|| {
        if let Err(e) = apply_to_current_thread(ThreadRole::StoreIo) {
            // A store thread without its filter must not run.
            eprintln!("tvix-boot: {e}");
            std::process::abort();
        }
    })
    .map_err(EnableError::StoreRuntimeStarter)?;
    if !arranged {
        return Err(EnableError::StoreRuntimeRunning);
    }
    tvix_boot_seccomp::enable(Options {
        mode,
        policy,
        before_death: Some(crate::terminal::restore),
    })?;
    Ok(())
}
