//! Mounting the store on the host through /dev/fuse, for users and for tests with real tools.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseChannel, FuseSession};
use thiserror::Error;
use tvix_boot_seccomp::{self as seccomp, RoleThread, ThreadRole};

use crate::fs::StoreFs;

/// Why the store could not be mounted, served or unmounted. `reason` is fuse-backend-rs's
/// error, as text.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum MountError {
    /// Opening /dev/fuse, mounting, or starting a serving thread failed.
    #[error("cannot mount the store at {path}: {reason}")]
    Mount { path: PathBuf, reason: String },
    /// The kernel (or fusermount) refused to unmount.
    #[error("cannot unmount {path}: {reason}")]
    Unmount { path: PathBuf, reason: String },
    /// Reading /dev/fuse failed while the mount was not being unmounted.
    #[error("serving FUSE requests at {path}: {reason}")]
    Serve { path: PathBuf, reason: String },
}

/// Called once when every serving thread has ended without `unmount`: the file system
/// was unmounted from outside (`umount DIR`), or no thread can serve it any more.
pub type OnServingEnded = Box<dyn FnOnce() + Send>;

/// A mounted store. Requests are served on `threads` threads until `unmount`, or until
/// the file system is unmounted from outside.
pub struct HostMount {
    session: FuseSession,
    path: PathBuf,
    workers: Vec<RoleThread<Result<(), MountError>>>,
    /// Set before unmounting: the channel errors that follow are the expected end.
    stopping: Arc<AtomicBool>,
}

impl HostMount {
    /// Mounts `fs` read-only at `path` (an existing directory) and serves it on `threads`
    /// threads (at least one), each under the virtio-fs seccomp filter. Needs the right
    /// to mount FUSE file systems (root, or fusermount3 on the PATH).
    pub fn mount(
        fs: StoreFs,
        path: &Path,
        threads: usize,
        on_serving_ended: OnServingEnded,
    ) -> Result<Self, MountError> {
        let mount_err = |reason: String| MountError::Mount {
            path: path.to_owned(),
            reason,
        };
        let mut session = FuseSession::new(path, "tvix-store", "tvix", true)
            .map_err(|e| mount_err(e.to_string()))?;
        session.mount().map_err(|e| mount_err(e.to_string()))?;
        let server = Arc::new(Server::new(fs));
        let stopping = Arc::new(AtomicBool::new(false));
        let threads = threads.max(1);
        let serving = Arc::new(AtomicUsize::new(threads));
        let on_serving_ended = Arc::new(Mutex::new(Some(on_serving_ended)));
        let mut workers = Vec::new();
        for index in 0..threads {
            let channel = session
                .new_channel()
                .map_err(|e| mount_err(e.to_string()))?;
            let server = server.clone();
            let path = path.to_owned();
            let stopping = stopping.clone();
            let serving = serving.clone();
            let on_serving_ended = on_serving_ended.clone();
            // A FUSE worker's job is a virtio-fs worker's, from /dev/fuse.
            let worker = seccomp::spawn(ThreadRole::VirtioFs, format!("fuse-{index}"), move || {
                let result = serve(channel, &server, &path, &stopping);
                let last = serving.fetch_sub(1, Ordering::SeqCst) == 1;
                if last && !stopping.load(Ordering::SeqCst) {
                    let callback = on_serving_ended.lock().ok().and_then(|mut c| c.take());
                    if let Some(callback) = callback {
                        callback();
                    }
                }
                result
            })
            .map_err(|e| mount_err(e.to_string()))?;
            workers.push(worker);
        }
        Ok(Self {
            session,
            path: path.to_owned(),
            workers,
            stopping,
        })
    }

    /// Unmount and wait for the serving threads to stop.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.stopping.store(true, Ordering::SeqCst);
        let result = self.session.umount().map_err(|e| MountError::Unmount {
            path: self.path.clone(),
            reason: e.to_string(),
        });
        self.session.wake().ok();
        self.join_workers();
        result
    }

    /// After `on_serving_ended`: collect the serving threads. The kernel has already let
    /// go of the mount (reading /dev/fuse said so), so nothing is unmounted here.
    pub fn finish(mut self) {
        self.join_workers();
    }

    fn join_workers(&mut self) {
        for worker in self.workers.drain(..) {
            match worker.join() {
                Some(Ok(())) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "FUSE worker failed"),
                None => tracing::warn!("FUSE worker panicked or could not install its filter"),
            }
        }
    }
}

fn serve(
    mut channel: FuseChannel,
    server: &Server<StoreFs>,
    path: &Path,
    stopping: &AtomicBool,
) -> Result<(), MountError> {
    loop {
        match channel.get_request() {
            Ok(Some((reader, writer))) => {
                if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
                    // A request the server could not answer (e.g. malformed) is dropped;
                    // the mount keeps serving.
                    tracing::debug!(error = %e, "FUSE request failed");
                }
            }
            // The file system was unmounted (by us or from outside), or we were woken to exit.
            Ok(None) => return Ok(()),
            Err(_) if stopping.load(Ordering::SeqCst) => return Ok(()),
            // EPOLLERR on /dev/fuse: the kernel closed the connection, which is how the
            // threads that did not read the unmount themselves learn of it. fuse-backend-rs
            // tells it apart from other failures only by this message.
            Err(fuse_backend_rs::transport::Error::SessionFailure(reason))
                if reason == "epoll error" =>
            {
                return Ok(());
            }
            Err(e) => {
                return Err(MountError::Serve {
                    path: path.to_owned(),
                    reason: e.to_string(),
                });
            }
        }
    }
}
