//! One tokio runtime for the backends that are async (object_store), driven from the
//! store's synchronous API.
//!
//! The store API is synchronous because its hottest caller, the virtio-fs request path, runs
//! on plain vCPU-queue threads; async callers (the HTTP server) call it via spawn_blocking.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};
use tokio::sync::Semaphore;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| build(None))
}

fn build(on_thread_start: Option<Box<dyn Fn() + Send + Sync>>) -> Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(2)
        .thread_name("store-io")
        .enable_all();
    if let Some(hook) = on_thread_start {
        builder.on_thread_start(hook);
    }
    builder
        .build()
        .expect("cannot start the store's I/O runtime")
}

/// Starts the store's I/O runtime now, with `on_thread_start` run first in each of its
/// threads (e.g. to install a seccomp filter), rather than on first use from whatever
/// thread that happens to be. Returns false if it was already running (the hook is then
/// not installed).
pub fn start_with(on_thread_start: impl Fn() + Send + Sync + 'static) -> bool {
    let mut started = false;
    RUNTIME.get_or_init(|| {
        started = true;
        build(Some(Box::new(on_thread_start)))
    });
    started
}

/// Run `future` to completion from synchronous code, even when the caller itself is inside
/// a tokio runtime (where a nested `block_on` would panic).
pub fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if Handle::try_current().is_ok() {
        std::thread::scope(|scope| {
            scope
                .spawn(|| runtime().block_on(future))
                .join()
                .expect("store I/O thread panicked")
        })
    } else {
        runtime().block_on(future)
    }
}

/// Background work (hashing whole blobs) that may run at once: one per core of these
/// machines. More would only share the same cores, with the guest's vCPUs among them;
/// the rest wait their turn.
const BACKGROUND_LIMIT: usize = 2;

/// Run `work` on the runtime's blocking pool, at most `BACKGROUND_LIMIT` at a time: on
/// threads named `store-io` like the runtime's own, so work that must not hold up a caller
/// (hashing a whole blob behind a virtio-fs queue) runs in the same thread role as the
/// store's other I/O. Works from any thread, inside a tokio runtime or not.
pub(crate) fn spawn_background<F>(work: F)
where
    F: FnOnce() + Send + 'static,
{
    static PERMITS: Semaphore = Semaphore::const_new(BACKGROUND_LIMIT);
    // Nothing waits on the task: `work` reports its own result.
    drop(runtime().spawn(async move {
        let _permit = PERMITS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        // A panic in `work` is the blocking task's: it ends here, the permit is returned.
        let _ = tokio::task::spawn_blocking(work).await;
    }));
}
