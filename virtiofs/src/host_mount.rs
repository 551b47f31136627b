//! Mounting the store on the host through /dev/fuse, for users and for tests with real tools.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{FuseChannel, FuseSession};
use thiserror::Error;

use crate::fs::StoreFs;

#[derive(Debug, Error)]
pub enum MountError {
    #[error("cannot mount the store at {path}: {reason}")]
    Mount { path: PathBuf, reason: String },
    #[error("cannot unmount {path}: {reason}")]
    Unmount { path: PathBuf, reason: String },
    #[error("serving FUSE requests at {path}: {reason}")]
    Serve { path: PathBuf, reason: String },
}

/// A mounted store. Requests are served on `threads` threads until `unmount`.
pub struct HostMount {
    session: FuseSession,
    path: PathBuf,
    workers: Vec<std::thread::JoinHandle<Result<(), MountError>>>,
    /// Set before unmounting: the channel errors that follow are the expected end.
    stopping: Arc<AtomicBool>,
}

impl HostMount {
    pub fn mount(fs: StoreFs, path: &Path, threads: usize) -> Result<Self, MountError> {
        let mount_err = |reason: String| MountError::Mount {
            path: path.to_owned(),
            reason,
        };
        let mut session = FuseSession::new(path, "tvix-store", "tvix", true)
            .map_err(|e| mount_err(e.to_string()))?;
        session.mount().map_err(|e| mount_err(e.to_string()))?;
        let server = Arc::new(Server::new(fs));
        let stopping = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for index in 0..threads.max(1) {
            let channel = session
                .new_channel()
                .map_err(|e| mount_err(e.to_string()))?;
            let server = server.clone();
            let path = path.to_owned();
            let stopping = stopping.clone();
            let worker = std::thread::Builder::new()
                .name(format!("fuse-{index}"))
                .spawn(move || serve(channel, &server, &path, &stopping))
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
        for worker in self.workers.drain(..) {
            match worker.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "FUSE worker failed"),
                Err(_) => tracing::warn!("FUSE worker panicked"),
            }
        }
        result
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
            // The session was unmounted or woken for exit.
            Ok(None) => return Ok(()),
            Err(_) if stopping.load(Ordering::SeqCst) => return Ok(()),
            Err(e) => {
                return Err(MountError::Serve {
                    path: path.to_owned(),
                    reason: e.to_string(),
                });
            }
        }
    }
}
