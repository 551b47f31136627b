//! The store's gRPC protocol (tvix-store's): the path-info service, as a client that
//! checks what it gets and as a server over a [`Store`], and the daemon that serves a
//! whole store (castore services, path info, health) on a unix socket or TCP.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use prost::Message;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::{Code, Request, Response, Status};
use tvix_boot_castore::grpc::client::{Transport, transport};
use tvix_boot_castore::grpc::server::{
    BlobServer, BlockingPool, DirectoryServer, accept_snix_names,
};
use tvix_boot_castore::grpc::{GrpcAddress, GrpcAddressError};
use tvix_boot_castore::kv::MemoryKv;
use tvix_boot_castore::runtime::block_on;

use crate::castore::Node;
use crate::nar::NarHasher;
use crate::nixbase32;
use crate::pathinfo::{IndexedNar, KvPathInfoService, PathInfo, PathInfoError, PathInfoService};
use crate::proto;
use crate::proto::path_info_service_client::PathInfoServiceClient;
use crate::store::Store;
use crate::store_path::DIGEST_LEN;

/// The method paths of the path-info service, pinned by the golden tests.
pub const METHOD_PATHS: &[&str] = &[
    "/tvix.store.v1.PathInfoService/Get",
    "/tvix.store.v1.PathInfoService/Put",
    "/tvix.store.v1.PathInfoService/CalculateNAR",
    "/tvix.store.v1.PathInfoService/List",
];

/// Path info from a remote store. Every answer is checked as stored path info is: the
/// wire form's every field, and that it describes the path asked for.
///
/// The NAR index (which root a NAR hash unpacks to, kept for the binary-cache server) is
/// not part of the protocol: it lives in this process.
pub struct GrpcPathInfoService {
    client: PathInfoServiceClient<Transport>,
    url: String,
    nar_index: KvPathInfoService,
}

fn remote(url: &str, what: &str, status: Status) -> PathInfoError {
    PathInfoError::Remote {
        url: url.to_owned(),
        what: what.to_owned(),
        reason: format!("{} ({:?})", status.message(), status.code()),
    }
}

impl GrpcPathInfoService {
    /// Path info at `address` (`url` names it in errors). Connects on first use.
    pub fn new(address: &GrpcAddress, url: &str) -> Result<Self, GrpcAddressError> {
        Ok(Self {
            client: PathInfoServiceClient::new(transport(address)?),
            url: url.to_owned(),
            nar_index: KvPathInfoService::new(Arc::new(MemoryKv::default())),
        })
    }

    fn check(&self, proto: proto::PathInfo, what: &str) -> Result<PathInfo, PathInfoError> {
        PathInfo::try_from(proto).map_err(|e| PathInfoError::Remote {
            url: self.url.clone(),
            what: what.to_owned(),
            reason: format!("invalid path info: {e}"),
        })
    }

    /// The NAR size and SHA-256 the server computes for `node`.
    pub fn calculate_nar(&self, node: &Node) -> Result<(u64, [u8; 32]), PathInfoError> {
        let mut client = self.client.clone();
        let request = node.to_proto(Bytes::new());
        let answer = block_on(async move { client.calculate_nar(request).await })
            .map_err(|s| remote(&self.url, "CalculateNAR", s))?
            .into_inner();
        let sha256 =
            <[u8; 32]>::try_from(&answer.nar_sha256[..]).map_err(|_| PathInfoError::Remote {
                url: self.url.clone(),
                what: "CalculateNAR".into(),
                reason: format!("a NAR sha256 of {} bytes", answer.nar_sha256.len()),
            })?;
        Ok((answer.nar_size, sha256))
    }
}

impl PathInfoService for GrpcPathInfoService {
    fn get(&self, digest: &[u8; DIGEST_LEN]) -> Result<Option<PathInfo>, PathInfoError> {
        let mut client = self.client.clone();
        let request = proto::GetPathInfoRequest {
            by_what: Some(proto::get_path_info_request::ByWhat::ByOutputHash(
                Bytes::copy_from_slice(digest),
            )),
        };
        let what = format!("Get {}", nixbase32::encode(digest));
        let answer = match block_on(async move { client.get(request).await }) {
            Ok(answer) => answer.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(remote(&self.url, &what, status)),
        };
        let info = self.check(answer, &what)?;
        if info.store_path.digest() != digest {
            return Err(PathInfoError::WrongKey {
                key: nixbase32::encode(digest),
                found: info.store_path,
            });
        }
        Ok(Some(info))
    }

    fn put(&self, info: &PathInfo) -> Result<(), PathInfoError> {
        let mut client = self.client.clone();
        let request = info.to_proto();
        let what = format!("Put {}", info.store_path);
        let answer = block_on(async move { client.put(request).await })
            .map_err(|s| remote(&self.url, &what, s))?
            .into_inner();
        // The server may add signatures; anything else changed is a broken server.
        let stored = self.check(answer, &what)?;
        if stored.store_path != info.store_path || stored.node != info.node {
            return Err(PathInfoError::Remote {
                url: self.url.clone(),
                what,
                reason: format!("the server stored {} instead", stored.store_path),
            });
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<PathInfo>, PathInfoError> {
        let mut client = self.client.clone();
        let received = block_on(async move {
            let mut stream = client
                .list(proto::ListPathInfoRequest {})
                .await?
                .into_inner();
            let mut received = Vec::new();
            while let Some(info) = stream.next().await {
                received.push(info?);
            }
            Ok::<_, Status>(received)
        })
        .map_err(|s| remote(&self.url, "List", s))?;
        let mut infos = received
            .into_iter()
            .map(|info| self.check(info, "List"))
            .collect::<Result<Vec<_>, _>>()?;
        infos.sort_by(|a, b| {
            a.store_path
                .name()
                .cmp(b.store_path.name())
                .then(a.store_path.cmp(&b.store_path))
        });
        Ok(infos)
    }

    fn put_nar(&self, nar_sha256: &[u8; 32], nar: &IndexedNar) -> Result<(), PathInfoError> {
        self.nar_index.put_nar(nar_sha256, nar)
    }
    fn get_nar(&self, nar_sha256: &[u8; 32]) -> Result<Option<IndexedNar>, PathInfoError> {
        self.nar_index.get_nar(nar_sha256)
    }
    fn put_nar_file(
        &self,
        file_sha256: &[u8; 32],
        nar_sha256: &[u8; 32],
    ) -> Result<(), PathInfoError> {
        self.nar_index.put_nar_file(file_sha256, nar_sha256)
    }
    fn nar_of_file(&self, file_sha256: &[u8; 32]) -> Result<Option<[u8; 32]>, PathInfoError> {
        self.nar_index.nar_of_file(file_sha256)
    }
}

/// The path-info service, served over a whole store.
pub struct PathInfoServer {
    store: Arc<Store>,
    pool: Arc<BlockingPool>,
}

impl PathInfoServer {
    /// Serves `store`'s path info, calling it on `pool`.
    pub fn new(store: Arc<Store>, pool: Arc<BlockingPool>) -> Self {
        Self { store, pool }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl proto::path_info_service_server::PathInfoService for Arc<PathInfoServer> {
    type ListStream = BoxStream<'static, Result<proto::PathInfo, Status>>;

    async fn get(
        &self,
        request: Request<proto::GetPathInfoRequest>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        let Some(proto::get_path_info_request::ByWhat::ByOutputHash(digest)) =
            request.into_inner().by_what
        else {
            return Err(Status::invalid_argument("no output hash given"));
        };
        let digest: [u8; DIGEST_LEN] = digest[..].try_into().map_err(|_| {
            Status::invalid_argument(format!(
                "an output hash has {DIGEST_LEN} bytes, got {}",
                digest.len()
            ))
        })?;
        let store = self.store.clone();
        let info = self
            .pool
            .run(move || store.path_infos.get(&digest).map_err(internal))
            .await??
            .ok_or_else(|| {
                Status::not_found(format!("no path info for {}", nixbase32::encode(&digest)))
            })?;
        Ok(Response::new(info.to_proto()))
    }

    async fn put(
        &self,
        request: Request<proto::PathInfo>,
    ) -> Result<Response<proto::PathInfo>, Status> {
        let info = PathInfo::try_from(request.into_inner())
            .map_err(|e| Status::invalid_argument(format!("invalid path info: {e}")))?;
        let store = self.store.clone();
        let stored = self
            .pool
            .run(move || {
                store.put_path_info(&info).map_err(|e| match e {
                    crate::StoreError::Incomplete { .. } => {
                        Status::failed_precondition(e.to_string())
                    }
                    e => internal(e),
                })?;
                Ok::<_, Status>(info)
            })
            .await??;
        tracing::info!(path = %stored.store_path, "path added");
        Ok(Response::new(stored.to_proto()))
    }

    async fn calculate_nar(
        &self,
        request: Request<tvix_boot_castore::proto::Node>,
    ) -> Result<Response<proto::CalculateNarResponse>, Status> {
        let (_, node) = Node::from_proto(request.into_inner())
            .map_err(|e| Status::invalid_argument(format!("invalid node: {e}")))?;
        let store = self.store.clone();
        let (sha256, size) = self
            .pool
            .run(move || {
                let mut hasher = NarHasher::default();
                store.write_nar(&node, &mut hasher).map_err(|e| {
                    Status::failed_precondition(format!("cannot render the NAR: {e}"))
                })?;
                Ok::<_, Status>(hasher.finish())
            })
            .await??;
        Ok(Response::new(proto::CalculateNarResponse {
            nar_size: size,
            nar_sha256: Bytes::copy_from_slice(&sha256),
        }))
    }

    async fn list(
        &self,
        _request: Request<proto::ListPathInfoRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let store = self.store.clone();
        let infos = self
            .pool
            .run(move || store.path_infos.list().map_err(internal))
            .await??;
        Ok(Response::new(
            futures::stream::iter(infos.into_iter().map(|info| Ok(info.to_proto()))).boxed(),
        ))
    }
}

/// Where a daemon listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket at this path (mode 0600, or 0660 for a group).
    Unix(PathBuf),
    /// A TCP address, `host:port`.
    Tcp(String),
}

impl ListenAddr {
    /// `host:port` (an IP address or `localhost`, then a port) is TCP; anything else is a
    /// unix socket path. A bare port is TCP on the loopback address.
    pub fn parse(text: &str) -> Self {
        if let Ok(port) = text.parse::<u16>() {
            return Self::Tcp(format!("127.0.0.1:{port}"));
        }
        let tcp = text.parse::<std::net::SocketAddr>().is_ok()
            || text
                .strip_prefix("localhost:")
                .is_some_and(|p| p.parse::<u16>().is_ok());
        if tcp {
            Self::Tcp(text.to_owned())
        } else {
            Self::Unix(PathBuf::from(text))
        }
    }
}

/// Why the daemon could not start or serve.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("{path} is in use: another daemon answers on it")]
    SocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot give {path} to group {gid}: {source}")]
    Chown {
        path: PathBuf,
        gid: u32,
        source: io::Error,
    },
    #[error("cannot start the daemon's threads: {0}")]
    Threads(io::Error),
    #[error("serving gRPC: {0}")]
    Serve(tonic::transport::Error),
}

/// A bound listener, before serving.
pub enum Listener {
    /// A unix socket, removed when the daemon ends.
    Unix(tokio::net::UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Binds `addr`. A unix socket is created with mode 0600 (0660 and group `group` when
    /// given), never with looser permissions (bound in a private directory, then renamed
    /// into place); a stale socket is replaced, a live one (a daemon answers) or a file
    /// that is not a socket is refused. Must be called inside a tokio runtime.
    pub async fn bind(addr: &ListenAddr, group: Option<u32>) -> Result<Self, DaemonError> {
        match addr {
            ListenAddr::Tcp(host_port) => {
                let listener =
                    tokio::net::TcpListener::bind(host_port)
                        .await
                        .map_err(|source| DaemonError::Listen {
                            addr: host_port.clone(),
                            source,
                        })?;
                Ok(Self::Tcp(listener))
            }
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path, group).await?;
                Ok(Self::Unix(listener, path.clone()))
            }
        }
    }

    /// What a client's address for this listener is (`grpc+unix:///…` or
    /// `grpc+http://host:port`).
    pub fn client_url(&self) -> String {
        match self {
            Self::Unix(_, path) => format!("grpc+unix://{}", path.display()),
            Self::Tcp(listener) => match listener.local_addr() {
                Ok(addr) => format!("grpc+http://{addr}"),
                Err(_) => "grpc+http://?".into(),
            },
        }
    }
}

async fn bind_unix(
    path: &Path,
    group: Option<u32>,
) -> Result<tokio::net::UnixListener, DaemonError> {
    let listen_err = |source| DaemonError::Listen {
        addr: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            return Err(DaemonError::NotASocket {
                path: path.to_owned(),
            });
        }
        Ok(_) => {
            // A gRPC client may connect to find out: nothing happens on a connection alone.
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(DaemonError::SocketInUse {
                    path: path.to_owned(),
                });
            }
        }
        Err(_) => {}
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let staging = tempfile::Builder::new()
        .prefix(".tvix-daemon-")
        .tempdir_in(parent)
        .map_err(listen_err)?;
    let staged = staging.path().join("s");
    let listener = tokio::net::UnixListener::bind(&staged).map_err(listen_err)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&staged, None, Some(gid)).map_err(|source| {
            DaemonError::Chown {
                path: path.to_owned(),
                gid,
                source,
            }
        })?;
    }
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).map_err(listen_err)?;
    std::fs::rename(&staged, path).map_err(listen_err)?;
    Ok(listener)
}

/// Who a connection is from, for the log.
fn describe_unix_peer(stream: &tokio::net::UnixStream) -> String {
    match stream.peer_cred() {
        Ok(cred) => {
            let pid = cred.pid().unwrap_or(0);
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_owned())
                .unwrap_or_else(|_| "?".into());
            format!("pid {pid} ({comm}) uid {} gid {}", cred.uid(), cred.gid())
        }
        Err(_) => "a peer whose credentials cannot be read".into(),
    }
}

/// A client connection: the daemon logs one line when a client connects (who it is), and
/// at debug level how it ended (how long it lasted, how many bytes went each way).
pub struct Conn<S> {
    inner: S,
    peer: String,
    started: std::time::Instant,
    read: u64,
    written: u64,
    clients: Clients,
}

impl<S> Conn<S> {
    fn accepted(
        inner: S,
        peer: String,
        on_connect: &Arc<dyn Fn(&str) + Send + Sync>,
        clients: &Clients,
    ) -> Self {
        on_connect(&peer);
        clients.send_modify(|n| *n += 1);
        Conn {
            inner,
            peer,
            started: std::time::Instant::now(),
            read: 0,
            written: 0,
            clients: clients.clone(),
        }
    }
}

impl<S> Drop for Conn<S> {
    fn drop(&mut self) {
        self.clients.send_modify(|n| *n -= 1);
        tracing::debug!(
            "client {} gone: {:.1} s, {} bytes in, {} bytes out",
            self.peer,
            self.started.elapsed().as_secs_f64(),
            self.read,
            self.written
        );
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &result {
            self.written += *n as u64;
        }
        result
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &result {
            self.written += *n as u64;
        }
        result
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for Conn<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Streams a client may have open at once on one connection: with at most one message
/// (1 MiB) waiting per stream, this bounds what one slow client makes the daemon hold.
const MAX_STREAMS_PER_CLIENT: u32 = 16;

/// After the grace time, what the requests still running get to end, their clients told
/// (HTTP/2 GOAWAY) that no new ones are taken; then their connections are closed. A
/// request that a client is still reading takes a step per message, so a client that
/// reads at all finishes in this time; one that stopped reading does not.
const LAST_REQUESTS: Duration = Duration::from_secs(5);

/// The connections a daemon serves: counted as they are accepted and dropped, so that a
/// stopping daemon knows when its last client has gone.
type Clients = Arc<tokio::sync::watch::Sender<usize>>;

/// A daemon's unix socket, removed once: when the daemon stops accepting, so that a
/// new daemon may bind the path while this one still serves its clients (and is not
/// robbed of its socket when this one ends).
struct SocketFile(std::sync::Mutex<Option<PathBuf>>);

impl SocketFile {
    fn remove(&self) {
        let path = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Serves `store` on `listener` until `shutdown` completes, then stops as a daemon under
/// a supervisor should:
///
/// - it takes no new clients: the listener is closed (a unix socket removed) at once;
/// - the clients connected go on as before, new requests included, so that work made of
///   many requests (a NAR export reads blob after blob, a large blob chunk by chunk)
///   finishes; it returns when the last of them has disconnected;
/// - `grace` after `shutdown`, the clients still connected are told to send no new
///   requests; the requests running get 5 s more, and then whatever is still open is
///   closed. A client that stopped reading a stream (stuck, or stopped with SIGSTOP)
///   therefore holds the daemon `grace` plus 5 s at most, and then gets an error (never
///   a short answer passed off as whole).
///
/// `store` is called on `threads` threads.
pub async fn serve(
    store: Arc<Store>,
    listener: Listener,
    threads: usize,
    on_connect: Arc<dyn Fn(&str) + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<(), DaemonError> {
    use tonic_health::ServingStatus;
    let pool = BlockingPool::new(threads, "store-daemon").map_err(DaemonError::Threads)?;
    let blobs = Arc::new(BlobServer::new(store.blobs.clone(), pool.clone()));
    let directories = Arc::new(DirectoryServer::new(
        store.directories.clone(),
        pool.clone(),
    ));
    let path_infos = Arc::new(PathInfoServer::new(store.clone(), pool));
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in [
        "",
        "tvix.castore.v1.BlobService",
        "tvix.castore.v1.DirectoryService",
        "tvix.store.v1.PathInfoService",
        "snix.castore.v1.BlobService",
        "snix.castore.v1.DirectoryService",
        "snix.store.v1.PathInfoService",
    ] {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CLIENT)
        // What a client may send ahead (a blob Put) before the daemon has taken it.
        .initial_stream_window_size(tvix_boot_castore::grpc::STREAM_WINDOW)
        .initial_connection_window_size(tvix_boot_castore::grpc::CONNECTION_WINDOW)
        .max_frame_size(tvix_boot_castore::grpc::MAX_FRAME)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(60)))
        .layer(tower::util::MapRequestLayer::new(accept_snix_names))
        .add_service(health_service)
        .add_service(tvix_boot_castore::proto::blob_service_server::BlobServiceServer::new(blobs))
        .add_service(
            tvix_boot_castore::proto::directory_service_server::DirectoryServiceServer::new(
                directories,
            ),
        )
        .add_service(proto::path_info_service_server::PathInfoServiceServer::new(
            path_infos,
        ));

    let clients: Clients = Arc::new(tokio::sync::watch::Sender::new(0));
    let socket = Arc::new(SocketFile(std::sync::Mutex::new(match &listener {
        Listener::Unix(_, path) => Some(path.clone()),
        Listener::Tcp(_) => None,
    })));
    let (stop_accepting, accepting_stopped) = tokio::sync::oneshot::channel::<()>();
    let (draining, drain_started) = tokio::sync::oneshot::channel::<()>();
    // tonic stops every connection (GOAWAY) as soon as its shutdown future completes,
    // which would fail a client between two requests of one export: so the signal only
    // closes the listener, and tonic's future completes when the clients have gone or
    // the grace time is over.
    let drain = {
        let clients = clients.clone();
        let socket = socket.clone();
        async move {
            shutdown.await;
            socket.remove();
            let _ = stop_accepting.send(());
            let connected = *clients.borrow();
            if connected > 0 {
                tracing::info!(
                    "taking no new clients; waiting for the {connected} connected to \
                     disconnect (at most {} s)",
                    grace.as_secs_f64()
                );
            }
            let mut count = clients.subscribe();
            tokio::select! {
                _ = count.wait_for(|n| *n == 0) => {}
                () = tokio::time::sleep(grace) => tracing::warn!(
                    "{} client(s) still connected {} s after the signal: they may send \
                     no new requests, and their connections close when their running \
                     requests end (at most {} s)",
                    *clients.borrow(),
                    grace.as_secs_f64(),
                    LAST_REQUESTS.as_secs_f64(),
                ),
            }
            let _ = draining.send(());
        }
    };
    let cut_off = async move {
        if drain_started.await.is_err() {
            // The drain was dropped: tonic has returned, and this branch is not polled.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(LAST_REQUESTS).await;
    };
    // After the signal, the listener is dropped (Chain drops a finished stream) and
    // nothing more is accepted; a stream that ended would make tonic stop every
    // connection at once.
    let serving = match listener {
        Listener::Unix(listener, _) => {
            let (on_connect, clients) = (on_connect.clone(), clients.clone());
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
                .map(move |conn| {
                    conn.map(|stream| {
                        let peer = describe_unix_peer(&stream);
                        Conn::accepted(stream, peer, &on_connect, &clients)
                    })
                })
                .take_until(accepting_stopped)
                .chain(futures::stream::pending());
            router.serve_with_incoming_shutdown(incoming, drain).boxed()
        }
        Listener::Tcp(listener) => {
            let (on_connect, clients) = (on_connect.clone(), clients.clone());
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
                .map(move |conn| {
                    conn.map(|stream| {
                        let _ = stream.set_nodelay(true);
                        let peer = stream
                            .peer_addr()
                            .map(|a| a.to_string())
                            .unwrap_or_else(|_| "?".into());
                        Conn::accepted(stream, peer, &on_connect, &clients)
                    })
                })
                .take_until(accepting_stopped)
                .chain(futures::stream::pending());
            router.serve_with_incoming_shutdown(incoming, drain).boxed()
        }
    };
    let result = tokio::select! {
        result = serving => result.map_err(DaemonError::Serve),
        () = cut_off => {
            tracing::warn!(
                "closed {} client connection(s) with requests still running",
                *clients.borrow()
            );
            Ok(())
        }
    };
    socket.remove();
    result
}

/// The encoding of a path info's root node under its store path's name: what the golden
/// tests pin besides the method paths.
pub fn encoded_path_info(info: &PathInfo) -> Vec<u8> {
    info.to_proto().encode_to_vec()
}
