//! A store that lies, served by the real daemon code (`tvix_boot_store::grpc::serve`), for
//! the tests of what tvix-boot does with a server it must not trust: it flips a byte of
//! the blobs it reads out, or serves directories with an entry that does not match their
//! digest. The lies are told only about the objects below one store path ([`Targets`]),
//! so that everything else the store holds (a guest's programs) is served honestly.
//!
//! Used in-process by the fast tier (`boot/tests/grpc_lying_server.rs`, through a host
//! mount) and, as the static `lying-store` program (tests/src/bin), in the test host,
//! where a guest reads through it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tvix_boot_store::blobservice::{BlobError, BlobReader, BlobService, BlobWriter};
use tvix_boot_store::directoryservice::{DirectoryError, DirectoryService};
use tvix_boot_store::grpc::{self, DaemonError, ListenAddr, Listener};
use tvix_boot_store::store_path::StorePathError;
use tvix_boot_store::{B3Digest, Directory, Node, PathComponent, Store, StoreError, StorePath};

/// Why a lying store could not be set up or served.
#[derive(Debug, Error)]
pub enum LyingStoreError {
    #[error("{path:?} is not a store path: {source}")]
    NotAStorePath {
        path: String,
        source: StorePathError,
    },
    #[error("the store: {0}")]
    Store(#[from] StoreError),
    #[error("{0} is not in the store")]
    Missing(String),
    #[error("directory {digest} below {path} is not in the store")]
    MissingDirectory { path: String, digest: B3Digest },
    #[error("below {path}: {source}")]
    Directory {
        path: String,
        source: Box<DirectoryError>,
    },
    #[error("cannot start the server's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the server: {0}")]
    Daemon(#[from] DaemonError),
}

/// What a lying store lies about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lie {
    /// One byte of each target blob, as it is read out ([`FlippingBlobs`]).
    FlipBlobBytes,
    /// An extra entry in each target directory ([`PlantingDirectories`]).
    PlantDirectoryEntries,
}

/// The objects below one store path: every blob, and every directory but the path's own
/// root, so that the path itself is still found and the lie is met inside it.
#[derive(Clone, Debug, Default)]
pub struct Targets {
    pub blobs: HashSet<B3Digest>,
    pub directories: HashSet<B3Digest>,
}

impl Targets {
    /// The objects below `path` (`/nix/store/<hash>-<name>`) in `store`.
    pub fn below(store: &Store, path: &str) -> Result<Self, LyingStoreError> {
        let (store_path, _) = StorePath::from_absolute_path(path).map_err(|source| {
            LyingStoreError::NotAStorePath {
                path: path.to_owned(),
                source,
            }
        })?;
        let info = store
            .path_info(&store_path)?
            .ok_or_else(|| LyingStoreError::Missing(path.to_owned()))?;
        let mut targets = Targets::default();
        let mut pending = Vec::new();
        match info.node {
            Node::File { digest, .. } => {
                targets.blobs.insert(digest);
            }
            Node::Directory { digest, .. } => pending.push(digest),
            Node::Symlink { .. } => {}
        }
        let mut is_root = true;
        while let Some(digest) = pending.pop() {
            let directory = store
                .directories
                .get(&digest)
                .map_err(|source| LyingStoreError::Directory {
                    path: path.to_owned(),
                    source: Box::new(source),
                })?
                .ok_or_else(|| LyingStoreError::MissingDirectory {
                    path: path.to_owned(),
                    digest,
                })?;
            if !is_root {
                targets.directories.insert(digest);
            }
            is_root = false;
            for (_, node) in directory.entries() {
                match node {
                    Node::File { digest, .. } => {
                        targets.blobs.insert(*digest);
                    }
                    Node::Directory { digest, .. } => pending.push(*digest),
                    Node::Symlink { .. } => {}
                }
            }
        }
        Ok(targets)
    }
}

/// `store`, telling `lie` about `targets` and the truth about everything else.
pub fn lying(store: Store, lie: Lie, targets: Targets) -> Store {
    match lie {
        Lie::FlipBlobBytes => {
            let honest = store.blobs.clone();
            store.with_blobs(Arc::new(FlippingBlobs {
                honest,
                targets: targets.blobs,
            }))
        }
        Lie::PlantDirectoryEntries => {
            let honest = store.directories.clone();
            store.with_directories(Arc::new(PlantingDirectories {
                honest,
                targets: targets.directories,
            }))
        }
    }
}

/// Where [`FlippingBlobs`] flips a byte of a blob of `size` bytes: in the third MiB of a
/// large blob, so that its first two MiB are read right and the lie is met in a chunk of
/// its own; in the middle of a small one; never in one under 16 bytes.
pub fn flip_at(size: u64) -> Option<u64> {
    match size {
        0..16 => None,
        16..=0x30_0000 => Some(size / 2),
        _ => Some((2 << 20) + 4321),
    }
}

/// Blobs whose bytes, for the target blobs, have one bit flipped at [`flip_at`]. Stat
/// (the outboard) stays honest, so the lie is in the bytes only.
pub struct FlippingBlobs {
    honest: Arc<dyn BlobService>,
    targets: HashSet<B3Digest>,
}

struct FlippingReader(Arc<dyn BlobReader>);

impl BlobReader for FlippingReader {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.0.read_at(buf, offset)?;
        if let Some(flip) = flip_at(self.size())
            && (offset..offset + n as u64).contains(&flip)
        {
            buf[(flip - offset) as usize] ^= 1;
        }
        Ok(n)
    }
    // Neither the local file nor the bytes in memory: the server must read through
    // `read_at`, where the lie is.
}

impl BlobService for FlippingBlobs {
    fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        self.honest.has(digest)
    }
    fn open(&self, digest: &B3Digest) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        let reader = self.honest.open(digest)?;
        if !self.targets.contains(digest) {
            return Ok(reader);
        }
        Ok(reader.map(|r| Arc::new(FlippingReader(r)) as Arc<dyn BlobReader>))
    }
    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        self.honest.writer()
    }
    fn outboard(&self, digest: &B3Digest, log: u8) -> Result<Option<Vec<u8>>, BlobError> {
        self.honest.outboard(digest, log)
    }
}

/// The name of the entry [`PlantingDirectories`] adds.
pub const PLANTED: &str = "planted";

/// Directories that, for the target directories, come with an extra entry
/// ([`PLANTED`], a symlink to /etc/shadow) under their unchanged digest.
pub struct PlantingDirectories {
    honest: Arc<dyn DirectoryService>,
    targets: HashSet<B3Digest>,
}

impl DirectoryService for PlantingDirectories {
    fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        let honest = self.honest.get(digest)?;
        if !self.targets.contains(digest) {
            return Ok(honest);
        }
        Ok(honest.map(|mut directory| {
            let name = PathComponent::try_from(PLANTED.as_bytes()).expect("a valid path component");
            // A directory that has the name already is served as it is: still a lie
            // only if something else differs, so no target should have it.
            let _ = directory.add(
                name,
                Node::Symlink {
                    target: "/etc/shadow".into(),
                },
            );
            directory
        }))
    }
    fn has(&self, digest: &B3Digest) -> Result<bool, DirectoryError> {
        self.honest.has(digest)
    }
    fn put(&self, directory: &Directory) -> Result<B3Digest, DirectoryError> {
        self.honest.put(directory)
    }
}

/// Binds the unix socket `socket` for [`serve`]; in a tokio runtime.
pub async fn bind(socket: PathBuf) -> Result<Listener, LyingStoreError> {
    Ok(Listener::bind(&ListenAddr::Unix(socket), None).await?)
}

/// Serves `store` on `listener` with the daemon's code until `shutdown` completes. Its
/// clients are not waited for then: a lying server's clients are tests.
pub async fn serve(
    store: Store,
    listener: Listener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), LyingStoreError> {
    grpc::serve(
        Arc::new(store),
        listener,
        2,
        Arc::new(|_: &str| {}),
        shutdown,
        Duration::ZERO,
    )
    .await?;
    Ok(())
}

/// A lying store served on a thread of its own until dropped.
pub struct Server {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), LyingStoreError>>>,
}

impl Server {
    /// Serves `store` on the unix socket `socket`; returns once it listens.
    pub fn start(store: Store, socket: PathBuf) -> Result<Server, LyingStoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(LyingStoreError::Runtime)?;
        let listener = runtime.block_on(bind(socket.clone()))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            runtime.block_on(serve(store, listener, async move {
                let _ = stopped.await;
            }))
        });
        Ok(Server {
            socket,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The unix socket it serves on.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Its clients' store address, for each of the three services.
    pub fn url(&self) -> String {
        format!("grpc+unix://{}", self.socket.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
