//! The store as a vhost-user-fs backend: another VMM (QEMU, cloud-hypervisor, crosvm, ...)
//! owns the guest and its virtio-fs device and hands us, over a unix socket, the guest's
//! memory (a shared memfd) and the queues. Requests are answered by the same `StoreFs`
//! and the same queue code as the in-process device, in place in the shared memory.
//!
//! One frontend is served at a time. A session ends when the frontend disconnects (or
//! breaks the protocol); its queue threads are then joined and the next frontend is
//! accepted on the same socket with a fresh file-system state.

use std::fs;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuse_backend_rs::api::server::Server;
use tvix_boot_seccomp::{self as seccomp, ThreadRole};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringMutex, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::device::{QUEUE_SIZE, RequestCounters, serve_available_requests};
use crate::fs::StoreFs;

/// The queues a backend can offer: vhost-user-backend maps queues to threads with a
/// 64-bit mask, one bit per queue, and the high-priority queue takes one.
pub const MAX_REQUEST_QUEUES: u16 = 63;

/// Why the socket could not be bound, or a session not set up or accepted.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum VhostUserFsError {
    /// The request-queue count is 0 or above [`MAX_REQUEST_QUEUES`].
    #[error("vhost-user-fs needs 1 to {MAX_REQUEST_QUEUES} request queues, not {0}")]
    RequestQueues(u16),
    /// Something other than a socket is at the path.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    /// Another live backend serves the path.
    #[error("{path} is already served by another process")]
    SocketInUse { path: PathBuf },
    /// Creating, binding or moving the socket into place failed.
    #[error("cannot create the socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    /// The socket could not be given to the group asked for.
    #[error("cannot give the socket {path} to group {gid}: {source}")]
    Chown {
        path: PathBuf,
        gid: u32,
        source: io::Error,
    },
    /// vhost-user-backend could not set up the session's daemon.
    #[error("cannot set up the vhost-user-fs backend: {0}")]
    Setup(String),
    /// Accepting the next frontend on the socket failed.
    #[error("cannot accept a frontend on {path}: {reason}")]
    Accept { path: PathBuf, reason: String },
}

/// Who connected: the frontend process as the kernel saw it at connect time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Its process id.
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
    /// The process's name (/proc/PID/comm), if it could be read.
    pub command: Option<String>,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ", self.pid)?;
        if let Some(command) = &self.command {
            write!(f, "({command}) ")?;
        }
        write!(f, "uid {} gid {}", self.uid, self.gid)
    }
}

/// How a session ended.
#[derive(Debug)]
pub struct SessionEnd {
    /// Who the frontend was, when that could be found out.
    pub frontend: Option<Frontend>,
    /// `None` for a clean disconnect; otherwise what broke the session (a malformed
    /// message, a request that failed).
    pub error: Option<String>,
    /// Requests answered per queue during the session.
    pub requests: RequestCounters,
}

/// The vhost-user-fs socket: bound once, then one frontend session after another.
pub struct VhostUserFsSocket {
    listener: Listener,
    path: PathBuf,
    /// Held for as long as this process serves `path` (see `claim`).
    _claim: UnixListener,
}

impl VhostUserFsSocket {
    /// Creates the socket at `path`, readable and writable by the owner only (mode 0600),
    /// or by `group` too (mode 0660). A stale socket left at `path` is replaced; one that
    /// another process listens on, or anything that is not a socket, is refused. Nothing
    /// connects to an existing socket to find out: that would start (and end) a session of
    /// the backend behind it.
    pub fn bind(path: &Path, group: Option<u32>) -> Result<Self, VhostUserFsError> {
        let in_use = || VhostUserFsError::SocketInUse {
            path: path.to_owned(),
        };
        let canonical = canonical_path(path)?;
        let claim = claim(&canonical)?.ok_or_else(in_use)?;
        match fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(VhostUserFsError::NotASocket {
                    path: path.to_owned(),
                });
            }
            Ok(_) if listened_on(path) || listened_on(&canonical) => return Err(in_use()),
            _ => {}
        }
        let listener = bind_with_mode(path, group)?;
        Ok(Self {
            listener: Listener::from(listener),
            path: path.to_owned(),
            _claim: claim,
        })
    }

    /// Waits for one frontend and serves it `fs` on `request_queues` request queues (each on
    /// its own thread, the high-priority queue on another) until it disconnects. All threads
    /// and descriptors of the session are gone when this returns. `connected` is called
    /// as soon as a frontend has connected, with who it is when that could be found out.
    pub fn serve_session(
        &mut self,
        fs: StoreFs,
        request_queues: u16,
        connected: impl FnOnce(Option<&Frontend>),
    ) -> Result<SessionEnd, VhostUserFsError> {
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(VhostUserFsBackend::new(fs, request_queues, memory.clone())?);
        let setup_err = |e: vhost_user_backend::Error| VhostUserFsError::Setup(e.to_string());
        let mut daemon = VhostUserDaemon::new("vhost-user-fs".to_owned(), backend.clone(), memory)
            .map_err(setup_err)?;

        let fds_before = open_fds();
        daemon
            .start(&mut self.listener)
            .map_err(|e| VhostUserFsError::Accept {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        let frontend = newly_connected_peer(&fds_before);
        connected(frontend.as_ref());

        let error = match daemon.wait() {
            Ok(()) => None,
            Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => None,
            Err(e) => Some(e.to_string()),
        };
        // Dropping the daemon stops and joins the queue threads.
        drop(daemon);
        backend.close_exit_events();
        Ok(SessionEnd {
            frontend,
            error,
            requests: backend.requests.clone(),
        })
    }
}

impl Drop for VhostUserFsSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn bind_error(path: &Path) -> impl Fn(io::Error) -> VhostUserFsError + Copy + '_ {
    move |source| VhostUserFsError::Bind {
        path: path.to_owned(),
        source,
    }
}

/// The directory the socket `path` goes in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `path` with its directory resolved (the socket itself need not exist yet).
fn canonical_path(path: &Path) -> Result<PathBuf, VhostUserFsError> {
    let bind_err = bind_error(path);
    let file_name = path.file_name().ok_or_else(|| {
        bind_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path names no file",
        ))
    })?;
    Ok(fs::canonicalize(parent_dir(path))
        .map_err(bind_err)?
        .join(file_name))
}

/// Claims the socket path `canonical` for this process: binds an abstract unix socket
/// named after it. Another tvix-boot serving the same path holds that name (`None`); the
/// kernel frees it when the holder ends, however it ends, so a killed backend leaves
/// nothing that blocks the next one.
fn claim(canonical: &Path) -> Result<Option<UnixListener>, VhostUserFsError> {
    let bind_err = bind_error(canonical);
    let digest = blake3::hash(canonical.as_os_str().as_bytes());
    let name = format!("tvix-boot/vhost-user-fs/{}", digest.to_hex());
    let address = SocketAddr::from_abstract_name(name.as_bytes()).map_err(bind_err)?;
    match UnixListener::bind_addr(&address) {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(bind_err(e)),
    }
}

/// Whether some process listens on the unix socket bound at `path` (as /proc/net/unix
/// shows it: flags `00010000` mark a listening socket, the bound path ends the line).
fn listened_on(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let Some(path) = path.to_str() else {
        return false;
    };
    let suffix = format!(" {path}");
    table
        .lines()
        .skip(1)
        .any(|line| line.split_whitespace().nth(3) == Some("00010000") && line.ends_with(&suffix))
}

/// Binds in a private directory beside `path`, sets the mode, then renames into place: the
/// socket never exists at `path` with looser permissions, and no process-wide umask is
/// touched.
fn bind_with_mode(path: &Path, group: Option<u32>) -> Result<UnixListener, VhostUserFsError> {
    let bind_err = bind_error(path);
    let staging = tempfile::Builder::new()
        .prefix(".tvix-vu-")
        .tempdir_in(parent_dir(path))
        .map_err(bind_err)?;
    let staged = staging.path().join("s");
    let listener = UnixListener::bind(&staged).map_err(bind_err)?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    if let Some(gid) = group {
        std::os::unix::fs::chown(&staged, None, Some(gid)).map_err(|source| {
            VhostUserFsError::Chown {
                path: path.to_owned(),
                gid,
                source,
            }
        })?;
    }
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    fs::rename(&staged, path).map_err(bind_err)?;
    Ok(listener)
}

/// The backend of one session: the vhost-user-backend crate drives the protocol and calls
/// `handle_event` on the queue's thread when the frontend kicks a queue.
struct VhostUserFsBackend {
    server: Server<StoreFs>,
    request_queues: u16,
    /// The guest memory the daemon maps: the crate swaps the mapping inside this shared
    /// handle when the frontend sends a new memory table.
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The consumer ends of the queue threads' exit events. vhost-user-backend 0.22 takes
    /// them with `into_raw_fd` and never closes them; without this every session would
    /// leak one descriptor per queue.
    exit_consumers: Mutex<Vec<RawFd>>,
    requests: RequestCounters,
}

impl VhostUserFsBackend {
    fn new(
        fs: StoreFs,
        request_queues: u16,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Result<Self, VhostUserFsError> {
        if request_queues == 0 || request_queues > MAX_REQUEST_QUEUES {
            return Err(VhostUserFsError::RequestQueues(request_queues));
        }
        Ok(Self {
            server: Server::new(fs),
            request_queues,
            memory,
            exit_consumers: Mutex::new(Vec::new()),
            requests: RequestCounters::new(1 + usize::from(request_queues)),
        })
    }

    /// Call only after the daemon (and with it every queue thread) is gone.
    fn close_exit_events(&self) {
        let mut consumers = self.exit_consumers.lock().expect("exit list poisoned");
        for fd in consumers.drain(..) {
            // SAFETY: `fd` was created by `exit_event` and handed to the epoll handler, which
            // released ownership (into_raw_fd) and never closes it; that handler's thread
            // has been joined, so nothing uses the descriptor and nothing else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl VhostUserBackend for VhostUserFsBackend {
    type Bitmap = ();
    type Vring = VringMutex;

    fn num_queues(&self) -> usize {
        1 + usize::from(self.request_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    // The queues track EVENT_IDX themselves (the crate sets it on each vring).
    fn set_event_idx(&self, _enabled: bool) {}

    // Called with a clone of the handle given to the daemon, which `memory` already is.
    fn update_memory(&self, _memory: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        Ok(())
    }

    /// One thread per queue: queue `n` is bit `n`.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|queue| 1u64 << queue).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) = match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(error = %e, "vhost-user-fs: cannot create a queue thread's exit event");
                return None;
            }
        };
        // Keep the number to close it after the session (see `exit_consumers`); the
        // handler gets the same descriptor.
        let fd = consumer.into_raw_fd();
        self.exit_consumers
            .lock()
            .expect("exit list poisoned")
            .push(fd);
        // SAFETY: `fd` was just released by `into_raw_fd` above and is owned by nobody else;
        // ownership passes to the handler, and `close_exit_events` closes it afterwards.
        Some((unsafe { EventConsumer::from_raw_fd(fd) }, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringMutex],
        thread_id: usize,
    ) -> io::Result<()> {
        // vhost-user-backend starts the queue threads; each takes the virtio-fs worker's
        // filter before it touches a queue.
        install_worker_filter_once()?;
        if evset != EventSet::IN {
            return Err(io::Error::other(format!(
                "vhost-user-fs: unexpected event {evset:?} on queue thread {thread_id}"
            )));
        }
        let vring = vrings.get(usize::from(device_event)).ok_or_else(|| {
            io::Error::other(format!(
                "vhost-user-fs: event {device_event} names no queue of thread {thread_id}"
            ))
        })?;
        let memory = self.memory.memory();
        let mut state = vring.get_mut();
        let served = serve_available_requests(state.get_queue_mut(), &memory, &self.server)
            .map_err(|e| {
                tracing::warn!(queue = thread_id, error = %e, "vhost-user-fs: queue broken, no longer served");
                io::Error::other(e.to_string())
            })?;
        self.requests
            .add(usize::from(device_event), served.requests);
        if served.notify {
            state.signal_used_queue()?;
        }
        Ok(())
    }
}

fn open_fds() -> Vec<RawFd> {
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let listed: Vec<RawFd> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The listing saw its own directory descriptor, closed by now: keep only open ones.
    listed
        .into_iter()
        // SAFETY: F_GETFD only reads the descriptor's flags; on a closed number it fails.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
        .collect()
}

/// vhost-user-backend 0.22 accepts the connection inside `VhostUserDaemon::start` and does
/// not hand out the stream, so the frontend is found as the one new connected unix socket
/// among our descriptors (the session's other descriptors exist before `start`).
fn newly_connected_peer(fds_before: &[RawFd]) -> Option<Frontend> {
    open_fds()
        .into_iter()
        .filter(|fd| !fds_before.contains(fd))
        .find_map(peer_of)
}

fn peer_of(fd: RawFd) -> Option<Frontend> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; on a descriptor that
    // is not a connected unix socket the call fails and nothing is read.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 || cred.pid == 0 {
        return None;
    }
    let command = fs::read_to_string(format!("/proc/{}/comm", cred.pid))
        .ok()
        .map(|c| c.trim_end().to_owned());
    Some(Frontend {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        command,
    })
}

/// Installs the virtio-fs worker's seccomp filter in the calling queue thread the first
/// time it is called there (nothing when filters are off).
fn install_worker_filter_once() -> io::Result<()> {
    thread_local! {
        static FILTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if FILTERED.get() {
        return Ok(());
    }
    seccomp::apply_to_current_thread(ThreadRole::VirtioFs).map_err(io::Error::other)?;
    FILTERED.set(true);
    Ok(())
}
