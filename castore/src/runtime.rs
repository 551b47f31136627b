//! One tokio runtime for the backends that are async (object_store), driven from the
//! store's synchronous API.
//!
//! The store API is synchronous because its hottest caller, the virtio-fs request path, runs
//! on plain vCPU-queue threads; async callers (the HTTP server) call it via spawn_blocking.

use std::future::Future;
use std::sync::{Mutex, OnceLock, mpsc};

use tokio::runtime::{Handle, Runtime};
use tokio::sync::Semaphore;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
/// The thread [`start_with`] left to build the runtime, and where to ask it to.
static STARTER: OnceLock<Mutex<mpsc::Sender<StartRequest>>> = OnceLock::new();

/// Asks the starter to build the runtime; the reply is the runtime.
type StartRequest = mpsc::SyncSender<std::io::Result<Runtime>>;

fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let built = match STARTER.get() {
            Some(starter) => {
                let (reply, replied) = mpsc::sync_channel(1);
                starter
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .send(reply)
                    .expect("the store's I/O runtime starter is gone");
                replied
                    .recv()
                    .expect("the store's I/O runtime starter is gone")
            }
            None => build(None),
        };
        built.expect("cannot start the store's I/O runtime")
    })
}

type Hook = Box<dyn Fn() + Send + Sync>;

fn build(on_thread_start: Option<Hook>) -> std::io::Result<Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(2)
        .thread_name("store-io")
        .enable_all();
    if let Some(hook) = on_thread_start {
        builder.on_thread_start(hook);
    }
    builder.build()
}

/// Has the store's I/O runtime started, when it is first needed, by a thread started
/// now from the calling thread, with `on_thread_start` run first in each of the
/// runtime's threads (e.g. to install a seccomp filter). So the runtime's threads are
/// created as if by the caller (a thread inherits its creator's seccomp filter), not by
/// whatever thread first uses the store, whose filter may not allow what building the
/// runtime takes (tokio's signal driver makes a socketpair, which no role may).
/// Returns false if the runtime was already running or its start already arranged (the
/// hook is then not installed).
///
/// Lazily, because a VM whose store needs no asynchronous I/O (a local store whose
/// blobs need no background hashing) never needs the runtime: its threads would cost
/// start-up time and memory for nothing. The waiting thread costs little: a stack that
/// is barely touched. It ends once it has built the runtime.
pub fn start_with(on_thread_start: impl Fn() + Send + Sync + 'static) -> std::io::Result<bool> {
    if RUNTIME.get().is_some() || STARTER.get().is_some() {
        return Ok(false);
    }
    let (requests, incoming) = mpsc::channel::<StartRequest>();
    std::thread::Builder::new()
        .name("store-io-start".to_owned())
        .spawn(move || {
            // Nothing to do if the runtime is never needed: this waits for good then.
            if let Ok(reply) = incoming.recv() {
                let _ = reply.send(build(Some(Box::new(on_thread_start))));
            }
        })?;
    Ok(STARTER.set(Mutex::new(requests)).is_ok())
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
pub fn spawn_background<F>(work: F)
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

/// The store's runtime, for setting up tasks that live on it (a gRPC channel's
/// connection); started like [`block_on`] starts it.
pub fn handle() -> &'static Handle {
    runtime().handle()
}
