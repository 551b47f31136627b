//! One tokio runtime for the backends that are async (object_store), driven from the
//! store's synchronous API.
//!
//! The store API is synchronous because its hottest caller, the virtio-fs request path, runs
//! on plain vCPU-queue threads; async callers (the HTTP server) call it via spawn_blocking.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime};

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("store-io")
            .enable_all()
            .build()
            .expect("cannot start the store's I/O runtime")
    })
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
