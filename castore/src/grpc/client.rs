//! Blob and directory services of a remote store, over gRPC, trusting nothing it sends.
//!
//! - A blob's bytes are checked against its BLAKE3 digest before any of them is
//!   returned. A large blob whose server lists chunks and sends an outboard (tvix-boot's
//!   daemon does) is read chunk by chunk, each chunk checked against the outboard and so
//!   against the blob's digest: the first byte of a GiB arrives after one chunk. Any other
//!   blob is downloaded whole (into memory, or an unlinked temporary file when large),
//!   hashed, and only then read.
//! - A directory is checked against the digest asked for; a recursive Get's stream must
//!   hold exactly the closure below it (each directory one that an earlier one refers to,
//!   none missing when it ends).
//! - What was checked is kept (bounded); nothing unchecked is.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use lru::LruCache;
use tonic::Code;
use tonic::transport::Channel;

use crate::blobservice::{BlobError, BlobReader, BlobService, BlobWriter};
use crate::digest::B3Digest;
use crate::directory::Directory;
use crate::directoryservice::{DirectoryError, DirectoryService};
use crate::grpc::{GrpcAddress, GrpcAddressError, Package, rename_request};
use crate::outboard::{MemOutboard, OUTBOARD_MIN_BLOB};
use crate::proto::blob_service_client::BlobServiceClient;
use crate::proto::directory_service_client::DirectoryServiceClient;
use crate::proto::{self, get_directory_request::ByWhat};
use crate::runtime::{self, block_on};

/// A channel whose requests name the package generation the server speaks.
pub type Transport = tower::util::MapRequest<
    Channel,
    fn(http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body>,
>;

fn to_snix(request: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    rename_request(request, "tvix.", "snix.")
}

fn unchanged(request: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    request
}

/// A channel to `address`, speaking its package generation.
pub fn transport(address: &GrpcAddress) -> Result<Transport, GrpcAddressError> {
    let rename: fn(_) -> _ = match address.package {
        Package::Tvix => unchanged,
        Package::Snix => to_snix,
    };
    Ok(tower::util::MapRequest::new(address.channel()?, rename))
}

/// Blobs up to this size are fetched whole into memory; larger ones that cannot be read
/// by range go to an unlinked temporary file.
const IN_MEMORY_BLOB: u64 = 4 << 20;
/// Chunks fetched ahead of a reader that reads a blob in order.
const READ_AHEAD: usize = 4;
/// Verified chunks a remote blob keeps: the one being read, the previous one and those
/// read ahead. A random reader holds two.
const KEPT_CHUNKS: usize = READ_AHEAD + 2;
/// Most directories one recursive Get takes in; the rest of a bigger tree is fetched when
/// it is looked at.
const MAX_DIRECTORIES_PER_GET: usize = 16_384;
/// Verified directories kept in memory.
const CACHED_DIRECTORIES: usize = 65_536;
/// Largest BlobChunk sent by Put.
const PUT_CHUNK: usize = 256 << 10;

fn remote_err(what: String, status: tonic::Status) -> io::Error {
    io::Error::other(format!(
        "{what}: {} ({:?})",
        status.message(),
        status.code()
    ))
}

fn lying(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The blob service of a remote store.
pub struct GrpcBlobService {
    client: BlobServiceClient<Transport>,
    url: String,
}

impl GrpcBlobService {
    /// Blobs at `address` (`url` names it in errors). Connects on first use.
    pub fn new(address: &GrpcAddress, url: &str) -> Result<Self, GrpcAddressError> {
        Ok(Self {
            client: BlobServiceClient::new(transport(address)?),
            url: url.to_owned(),
        })
    }

    fn io_err(&self, digest: &B3Digest, source: io::Error) -> BlobError {
        BlobError::Io {
            digest: *digest,
            source: io::Error::new(source.kind(), format!("from {}: {source}", self.url)),
        }
    }

    /// Fetches a blob or chunk whole with Read, at most `limit` bytes (more is a lie),
    /// and checks it against `digest`. Small ones come back in memory, large ones in an
    /// unlinked temporary file.
    async fn fetch_whole(
        client: &mut BlobServiceClient<Transport>,
        digest: &B3Digest,
        limit: u64,
        exact: Option<u64>,
    ) -> io::Result<Option<Arc<dyn BlobReader>>> {
        let mut stream = match client
            .read(proto::ReadBlobRequest {
                digest: Bytes::copy_from_slice(digest.as_bytes()),
            })
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if status.code() == Code::NotFound => return Ok(None),
            Err(status) => return Err(remote_err(format!("Read {digest}"), status)),
        };
        let mut hasher = blake3::Hasher::new();
        let mut memory = BytesMut::new();
        let mut spool: Option<File> = None;
        let mut len = 0u64;
        while let Some(message) = stream.next().await {
            let data = message
                .map_err(|status| remote_err(format!("Read {digest}"), status))?
                .data;
            len += data.len() as u64;
            if len > limit {
                return Err(lying(format!(
                    "the server sent more than the {limit} bytes blob {digest} has"
                )));
            }
            hasher.update(&data);
            match &mut spool {
                Some(file) => file.write_all(&data)?,
                None if len > IN_MEMORY_BLOB => {
                    let mut file = tempfile::tempfile()?;
                    file.write_all(&memory)?;
                    file.write_all(&data)?;
                    memory = BytesMut::new();
                    spool = Some(file);
                }
                None => memory.extend_from_slice(&data),
            }
        }
        let actual = B3Digest::from(hasher.finalize());
        if actual != *digest {
            return Err(lying(format!(
                "the server sent {len} bytes for blob {digest} that hash to {actual}"
            )));
        }
        if let Some(exact) = exact.filter(|&e| e != len) {
            return Err(lying(format!(
                "blob {digest} has {len} bytes, the server said {exact}"
            )));
        }
        Ok(Some(match spool {
            Some(file) => Arc::new(VerifiedFile { file, size: len }),
            None => Arc::new(memory.freeze()),
        }))
    }

    fn open_bounded(
        &self,
        digest: &B3Digest,
        expected_size: Option<u64>,
    ) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        let mut client = self.client.clone();
        let digest = *digest;
        let url = self.url.clone();
        block_on(async move {
            if let Some(size) = expected_size.filter(|&s| s <= OUTBOARD_MIN_BLOB) {
                // Small, and its size known from a checked directory: read at once, one
                // round trip instead of two (most files of a store are small).
                return Self::fetch_whole(&mut client, &digest, size, Some(size)).await;
            }
            let stat = match client
                .stat(proto::StatBlobRequest {
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                    send_chunks: true,
                    send_bao: true,
                })
                .await
            {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == Code::NotFound => return Ok(None),
                Err(status) => return Err(remote_err(format!("Stat {digest}"), status)),
            };
            let ranged = RemoteBlob::from_stat(digest, &stat, client.clone(), url)?;
            if let Some(blob) = ranged {
                if expected_size.is_some_and(|s| s != blob.size) {
                    return Err(lying(format!(
                        "blob {digest} has {} bytes, the server said {}",
                        expected_size.unwrap_or_default(),
                        blob.size
                    )));
                }
                // The last chunk's check confirms the size the server stated: the tree's
                // shape depends on it.
                let blob = Arc::new(blob);
                blob.chunk(blob.chunks.len() - 1).await?;
                return Ok(Some(Arc::new(blob) as Arc<dyn BlobReader>));
            }
            let limit = expected_size.unwrap_or(u64::MAX);
            Self::fetch_whole(&mut client, &digest, limit, expected_size).await
        })
        .map_err(|e| self.io_err(&digest, e))
    }
}

impl BlobService for GrpcBlobService {
    fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        let mut client = self.client.clone();
        let request = proto::StatBlobRequest {
            digest: Bytes::copy_from_slice(digest.as_bytes()),
            send_chunks: false,
            send_bao: false,
        };
        match block_on(async move { client.stat(request).await }) {
            Ok(_) => Ok(true),
            Err(status) if status.code() == Code::NotFound => Ok(false),
            Err(status) => Err(self.io_err(digest, remote_err(format!("Stat {digest}"), status))),
        }
    }

    fn open(&self, digest: &B3Digest) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        self.open_bounded(digest, None)
    }

    fn open_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        self.open_bounded(digest, Some(size))
    }

    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
        let mut client = self.client.clone();
        let chunks = tokio_stream::wrappers::ReceiverStream::new(receiver)
            .map(|data| proto::BlobChunk { data });
        let upload = runtime::handle().spawn(async move { client.put(chunks).await });
        Ok(Box::new(GrpcBlobWriter {
            sender: Some(sender),
            upload: Some(upload),
            hasher: blake3::Hasher::new(),
            buffer: Vec::with_capacity(PUT_CHUNK),
            url: self.url.clone(),
        }))
    }
}

type PutTask =
    tokio::task::JoinHandle<Result<tonic::Response<proto::PutBlobResponse>, tonic::Status>>;

struct GrpcBlobWriter {
    sender: Option<tokio::sync::mpsc::Sender<Bytes>>,
    upload: Option<PutTask>,
    /// The digest the server must answer with.
    hasher: blake3::Hasher,
    buffer: Vec<u8>,
    url: String,
}

impl GrpcBlobWriter {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(PUT_CHUNK),
        ));
        let sender = self.sender.as_ref().expect("sender kept until close");
        if sender.blocking_send(data).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("{} ended the blob upload", self.url),
            ));
        }
        Ok(())
    }
}

impl Write for GrpcBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        let mut rest = buf;
        while !rest.is_empty() {
            let take = rest.len().min(PUT_CHUNK - self.buffer.len());
            self.buffer.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buffer.len() == PUT_CHUNK {
                self.send_buffer()?;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for GrpcBlobWriter {
    fn close(mut self: Box<Self>) -> Result<B3Digest, BlobError> {
        let digest = B3Digest::from(self.hasher.finalize());
        let io_err = |source: io::Error| BlobError::Io { digest, source };
        self.send_buffer().map_err(io_err)?;
        drop(self.sender.take());
        let upload = self.upload.take().expect("upload kept until close");
        let url = self.url.clone();
        let answer = block_on(upload)
            .map_err(|e| io_err(io::Error::other(format!("blob upload to {url}: {e}"))))?
            .map_err(|status| io_err(remote_err(format!("Put to {}", self.url), status)))?
            .into_inner();
        if answer.digest[..] != digest.as_bytes()[..] {
            return Err(io_err(lying(format!(
                "{} stored the blob as {:?}",
                self.url,
                B3Digest::try_from(&answer.digest[..])
                    .map(|d| d.to_string())
                    .unwrap_or_else(|_| format!("{} bytes", answer.digest.len()))
            ))));
        }
        Ok(digest)
    }
}

/// A blob downloaded whole into an unlinked temporary file and checked.
struct VerifiedFile {
    file: File,
    size: u64,
}

impl BlobReader for VerifiedFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.size.saturating_sub(offset)).unwrap_or(usize::MAX));
        let mut done = 0;
        while done < want {
            match self
                .file
                .read_at(&mut buf[done..want], offset + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
    fn local_file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// One chunk of a remote blob, as its Stat listed it.
#[derive(Clone, Copy)]
struct Chunk {
    digest: B3Digest,
    offset: u64,
    size: u64,
}

type ChunkSlot = Arc<tokio::sync::OnceCell<Bytes>>;

/// A large blob read chunk by chunk, each chunk checked against the blob's outboard.
struct RemoteBlob {
    digest: B3Digest,
    size: u64,
    chunks: Vec<Chunk>,
    outboard: Arc<MemOutboard>,
    client: BlobServiceClient<Transport>,
    url: String,
    /// Checked chunks, by index, and chunks being fetched.
    slots: Mutex<HashMap<usize, ChunkSlot>>,
    /// The chunk last read, to tell a reader that reads in order.
    last_read: Mutex<Option<usize>>,
}

impl RemoteBlob {
    /// A blob to read by range, when the Stat answer allows it: an outboard, and chunks
    /// that cover the blob along its chunk groups. `None` when it does not (the blob is
    /// then fetched whole); an error when what it states does not add up.
    fn from_stat(
        digest: B3Digest,
        stat: &proto::StatBlobResponse,
        client: BlobServiceClient<Transport>,
        url: String,
    ) -> io::Result<Option<Self>> {
        if stat.bao.is_empty() || stat.chunks.len() < 2 {
            return Ok(None);
        }
        let outboard = MemOutboard::parse(digest, &stat.bao)
            .map_err(|reason| lying(format!("outboard of blob {digest}: {reason}")))?;
        let size = outboard.size();
        if size <= OUTBOARD_MIN_BLOB {
            return Ok(None);
        }
        let mut chunks = Vec::with_capacity(stat.chunks.len());
        let mut offset = 0u64;
        for meta in &stat.chunks {
            let chunk_digest = B3Digest::try_from(&meta.digest[..])
                .map_err(|e| lying(format!("a chunk of blob {digest}: {e}")))?;
            if meta.size == 0 {
                return Err(lying(format!("blob {digest} has an empty chunk")));
            }
            chunks.push(Chunk {
                digest: chunk_digest,
                offset,
                size: meta.size,
            });
            offset = offset
                .checked_add(meta.size)
                .ok_or_else(|| lying(format!("the chunks of blob {digest} overflow")))?;
        }
        if offset != size {
            return Err(lying(format!(
                "the chunks of blob {digest} add up to {offset} bytes, its outboard says {size}"
            )));
        }
        let group = outboard.group_bytes();
        if chunks.iter().any(|c| c.offset % group != 0) {
            // Chunks not along the outboard's groups cannot be checked one by one.
            return Ok(None);
        }
        Ok(Some(Self {
            digest,
            size,
            chunks,
            outboard: Arc::new(outboard),
            client,
            url,
            slots: Mutex::new(HashMap::new()),
            last_read: Mutex::new(None),
        }))
    }

    fn chunk_at(&self, offset: u64) -> usize {
        self.chunks
            .partition_point(|c| c.offset + c.size <= offset)
            .min(self.chunks.len() - 1)
    }

    /// Chunk `index`, checked: fetched once, shared by concurrent readers.
    async fn chunk(self: &Arc<Self>, index: usize) -> io::Result<Bytes> {
        let slot = self
            .slots
            .lock()
            .expect("chunk slots poisoned")
            .entry(index)
            .or_default()
            .clone();
        let result = slot
            .get_or_try_init(|| self.fetch_chunk(index))
            .await
            .cloned();
        if result.is_err() {
            // Nothing unchecked is kept: the next read asks again.
            let mut slots = self.slots.lock().expect("chunk slots poisoned");
            if slots.get(&index).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.remove(&index);
            }
        }
        result
    }

    async fn fetch_chunk(&self, index: usize) -> io::Result<Bytes> {
        let chunk = self.chunks[index];
        let mut client = self.client.clone();
        let read = |status| remote_err(format!("Read of chunk {}", chunk.digest), status);
        let mut stream = client
            .read(proto::ReadBlobRequest {
                digest: Bytes::copy_from_slice(chunk.digest.as_bytes()),
            })
            .await
            .map_err(read)?
            .into_inner();
        // tvix-boot's daemon sends a chunk as one message: kept as it came, not copied.
        let mut pieces: Vec<Bytes> = Vec::with_capacity(1);
        let mut len = 0u64;
        while let Some(message) = stream.next().await {
            let data = message.map_err(read)?.data;
            len += data.len() as u64;
            if len > chunk.size {
                return Err(lying(format!(
                    "the server sent more than the {} bytes of chunk {} of blob {}",
                    chunk.size, chunk.digest, self.digest
                )));
            }
            pieces.push(data);
        }
        if len != chunk.size {
            return Err(lying(format!(
                "the server sent {len} of the {} bytes of chunk {} of blob {}",
                chunk.size, chunk.digest, self.digest
            )));
        }
        let bytes = match pieces.len() {
            1 => pieces.pop().expect("one piece"),
            _ => {
                let mut joined = BytesMut::with_capacity(chunk.size as usize);
                for piece in pieces {
                    joined.extend_from_slice(&piece);
                }
                joined.freeze()
            }
        };
        // Whether these are the blob's bytes at this offset only the outboard, which the
        // blob's digest roots, can tell; the chunk's own digest adds nothing to that (and
        // is not hashed: each byte is hashed once, here).
        let outboard = self.outboard.clone();
        let checked = bytes.clone();
        tokio::task::spawn_blocking(move || outboard.check(&checked, chunk.offset))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?
            .map_err(|e| lying(e.to_string()))?;
        Ok(bytes)
    }

    /// Drops kept chunks that are neither near `index` nor being fetched ahead of it.
    fn prune(&self, index: usize) {
        let mut slots = self.slots.lock().expect("chunk slots poisoned");
        if slots.len() <= KEPT_CHUNKS {
            return;
        }
        slots.retain(|&i, _| i + 1 >= index && i <= index + READ_AHEAD);
    }
}

impl BlobReader for Arc<RemoteBlob> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let index = self.chunk_at(offset);
        let in_order = {
            let mut last = self.last_read.lock().expect("last read poisoned");
            let in_order = last.is_some_and(|l| l + 1 == index || l == index) || index == 0;
            *last = Some(index);
            in_order
        };
        if in_order {
            for ahead in index + 1..(index + 1 + READ_AHEAD).min(self.chunks.len()) {
                let blob = self.clone();
                runtime::handle().spawn(async move {
                    // A failure shows when the reader gets there.
                    let _ = blob.chunk(ahead).await;
                });
            }
        }
        let blob = self.clone();
        let bytes = block_on(async move { blob.chunk(index).await }).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("blob {} from {}: {e}", self.digest, self.url),
            )
        })?;
        self.prune(index);
        let chunk = self.chunks[index];
        let within = (offset - chunk.offset) as usize;
        let n = buf.len().min(bytes.len() - within);
        buf[..n].copy_from_slice(&bytes[within..within + n]);
        Ok(n)
    }
}

/// The directory service of a remote store.
pub struct GrpcDirectoryService {
    client: DirectoryServiceClient<Transport>,
    url: String,
    /// Directories checked against their digests (received, or sent by this process).
    cache: Mutex<LruCache<B3Digest, Directory>>,
    /// Directories put and not yet sent: tvix-store takes a tree only whole, in one Put
    /// stream from the leaves to the root, so they go at [`DirectoryService::flush`].
    pending: Mutex<PendingPuts>,
}

#[derive(Default)]
struct PendingPuts {
    directories: HashMap<B3Digest, Directory>,
    /// In the order they were put (children first).
    order: Vec<B3Digest>,
}

impl GrpcDirectoryService {
    /// Directories at `address` (`url` names it in errors). Connects on first use.
    pub fn new(address: &GrpcAddress, url: &str) -> Result<Self, GrpcAddressError> {
        Ok(Self {
            client: DirectoryServiceClient::new(transport(address)?),
            url: url.to_owned(),
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(CACHED_DIRECTORIES).expect("not zero"),
            )),
            pending: Mutex::new(PendingPuts::default()),
        })
    }

    fn remote(&self, digest: &B3Digest, source: io::Error) -> DirectoryError {
        DirectoryError::Remote {
            digest: *digest,
            url: self.url.clone(),
            source,
        }
    }

    /// Fetches `digest` (with `recursive`, the closure below it, up to
    /// `MAX_DIRECTORIES_PER_GET`), checking every directory, and keeps what was checked.
    fn fetch(
        &self,
        digest: &B3Digest,
        recursive: bool,
    ) -> Result<Option<Directory>, DirectoryError> {
        let mut client = self.client.clone();
        let root = *digest;
        let received = block_on(async move {
            let request = proto::GetDirectoryRequest {
                by_what: Some(ByWhat::Digest(Bytes::copy_from_slice(root.as_bytes()))),
                recursive,
            };
            let mut stream = match client.get(request).await {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == Code::NotFound => return Ok(None),
                Err(status) => return Err(Err(status)),
            };
            let mut received = Vec::new();
            while received.len() < MAX_DIRECTORIES_PER_GET {
                match stream.next().await {
                    Some(Ok(directory)) => received.push(directory),
                    Some(Err(status)) => return Err(Err(status)),
                    None => return Ok(Some((received, true))),
                }
            }
            Ok(Some((received, false)))
        })
        .map_err(|e: Result<(), tonic::Status>| {
            let status = e.expect_err("only errors");
            self.remote(digest, remote_err("Get".into(), status))
        })?;
        let Some((received, complete)) = received else {
            return Ok(None);
        };
        let checked = check_closure(digest, received, complete && recursive, recursive)?;
        let mut cache = self.cache.lock().expect("directory cache poisoned");
        let root = checked.first().map(|(_, d)| d.clone());
        for (digest, directory) in checked {
            cache.put(digest, directory);
        }
        Ok(root)
    }

    fn cached(&self, digest: &B3Digest) -> Option<Directory> {
        if let Some(directory) = self
            .pending
            .lock()
            .expect("pending puts poisoned")
            .directories
            .get(digest)
        {
            return Some(directory.clone());
        }
        self.cache
            .lock()
            .expect("directory cache poisoned")
            .get(digest)
            .cloned()
    }

    /// The tree below `root` in the order a Put stream takes it (leaves first, each
    /// digest once), from what was put, what is cached, and what the server has.
    fn tree_for_put(&self, root: &B3Digest) -> Result<Vec<Directory>, DirectoryError> {
        let mut seen = HashSet::new();
        let mut breadth_first = Vec::new();
        let mut queue = VecDeque::from([*root]);
        while let Some(digest) = queue.pop_front() {
            if !seen.insert(digest) {
                continue;
            }
            let directory = match self.cached(&digest) {
                Some(directory) => directory,
                None => self
                    .fetch(&digest, true)?
                    .ok_or(DirectoryError::MissingChild {
                        digest: *root,
                        child: digest,
                    })?,
            };
            queue.extend(directory.child_directories().map(|(_, d)| *d));
            breadth_first.push(directory);
        }
        // Reversed breadth-first order has every directory after all it refers to.
        breadth_first.reverse();
        Ok(breadth_first)
    }
}

/// Checks a Get answer for `root`: the first directory is `root`; each further one is a
/// directory an earlier one refers to (one sent again is skipped); with `complete`, the
/// stream ended and every directory referred to was sent. Returns each with its digest.
fn check_closure(
    root: &B3Digest,
    received: Vec<proto::Directory>,
    complete: bool,
    recursive: bool,
) -> Result<Vec<(B3Digest, Directory)>, DirectoryError> {
    let mut wanted: HashMap<B3Digest, B3Digest> = HashMap::from([(*root, *root)]);
    let mut got: HashSet<B3Digest> = HashSet::new();
    let mut checked = Vec::with_capacity(received.len());
    if received.is_empty() {
        return Err(DirectoryError::MissingChild {
            digest: *root,
            child: *root,
        });
    }
    if !recursive && received.len() > 1 {
        return Err(DirectoryError::Unexpected {
            root: *root,
            digest: B3Digest::of(&prost::Message::encode_to_vec(&received[1])),
        });
    }
    for (i, message) in received.into_iter().enumerate() {
        let bytes = prost::Message::encode_to_vec(&message);
        let digest = B3Digest::of(&bytes);
        if i == 0 && digest != *root {
            return Err(DirectoryError::Corrupt {
                digest: *root,
                actual: digest,
            });
        }
        if !wanted.contains_key(&digest) {
            return Err(DirectoryError::Unexpected {
                root: *root,
                digest,
            });
        }
        if !got.insert(digest) {
            // Sent twice: the same bytes (the digest says so), harmless.
            continue;
        }
        // Decoding re-encodes canonically; a message that is not in canonical form (so its
        // bytes as sent differ) or breaks a rule is refused.
        let directory = Directory::try_from(message)
            .map_err(|source| DirectoryError::Invalid { digest, source })?;
        if directory.digest() != digest {
            return Err(DirectoryError::Corrupt {
                digest,
                actual: directory.digest(),
            });
        }
        for (_, child) in directory.child_directories() {
            wanted.entry(*child).or_insert(digest);
        }
        checked.push((digest, directory));
    }
    if complete && let Some((child, parent)) = wanted.iter().find(|(d, _)| !got.contains(*d)) {
        return Err(DirectoryError::MissingChild {
            digest: *parent,
            child: *child,
        });
    }
    Ok(checked)
}

impl DirectoryService for GrpcDirectoryService {
    fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        if let Some(directory) = self.cached(digest) {
            return Ok(Some(directory));
        }
        match self.fetch(digest, true) {
            Ok(found) => Ok(found),
            // Something below it is wrong (or the stream broke): the directory itself may
            // still be right, and the error then comes from what is wrong, when asked for.
            Err(_) => self.fetch(digest, false),
        }
    }

    fn has(&self, digest: &B3Digest) -> Result<bool, DirectoryError> {
        if self.cached(digest).is_some() {
            return Ok(true);
        }
        Ok(self.fetch(digest, false)?.is_some())
    }

    fn put(&self, directory: &Directory) -> Result<B3Digest, DirectoryError> {
        let digest = directory.digest();
        let mut pending = self.pending.lock().expect("pending puts poisoned");
        if pending
            .directories
            .insert(digest, directory.clone())
            .is_none()
        {
            pending.order.push(digest);
        }
        Ok(digest)
    }

    fn flush(&self) -> Result<(), DirectoryError> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("pending puts poisoned"));
        if pending.order.is_empty() {
            return Ok(());
        }
        // The roots: put directories no other put directory refers to.
        let mut referred = HashSet::new();
        for directory in pending.directories.values() {
            referred.extend(directory.child_directories().map(|(_, d)| *d));
        }
        let roots: Vec<B3Digest> = pending
            .order
            .iter()
            .filter(|d| !referred.contains(*d))
            .copied()
            .collect();
        {
            // While the trees are sent, what was put counts as cached.
            let mut cache = self.cache.lock().expect("directory cache poisoned");
            for (digest, directory) in &pending.directories {
                cache.put(*digest, directory.clone());
            }
        }
        for root in roots {
            let tree = self.tree_for_put(&root)?;
            let mut client = self.client.clone();
            let stream =
                futures::stream::iter(tree.iter().map(Directory::to_proto).collect::<Vec<_>>());
            let answer = block_on(async move { client.put(stream).await })
                .map_err(|status| self.remote(&root, remote_err("Put".into(), status)))?
                .into_inner();
            if answer.root_digest[..] != root.as_bytes()[..] {
                return Err(self.remote(
                    &root,
                    lying(format!(
                        "the server answered the Put of {root} with another root digest"
                    )),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{Node, PathComponent};

    fn tree() -> (Directory, Directory, Directory) {
        let leaf = Directory::new();
        let mut middle = Directory::new();
        middle
            .add(
                PathComponent::try_from(&b"leaf"[..]).unwrap(),
                Node::Directory {
                    digest: leaf.digest(),
                    size: 0,
                },
            )
            .unwrap();
        let mut root = Directory::new();
        root.add(
            PathComponent::try_from(&b"middle"[..]).unwrap(),
            Node::Directory {
                digest: middle.digest(),
                size: middle.size(),
            },
        )
        .unwrap();
        (root, middle, leaf)
    }

    #[test]
    fn closures_are_checked() {
        let (root, middle, leaf) = tree();
        let digest = root.digest();
        let ok = vec![root.to_proto(), middle.to_proto(), leaf.to_proto()];
        assert_eq!(check_closure(&digest, ok, true, true).unwrap().len(), 3);
        // A child missing at the end of the stream.
        assert!(matches!(
            check_closure(&digest, vec![root.to_proto(), middle.to_proto()], true, true),
            Err(DirectoryError::MissingChild { child, .. }) if child == leaf.digest()
        ));
        // ... is fine when the stream was cut short on purpose.
        assert!(
            check_closure(
                &digest,
                vec![root.to_proto(), middle.to_proto()],
                false,
                true
            )
            .is_ok()
        );
        // The wrong root, an unrelated directory, a child before its parent.
        assert!(matches!(
            check_closure(&digest, vec![middle.to_proto()], true, true),
            Err(DirectoryError::Corrupt { .. })
        ));
        let mut other = Directory::new();
        other
            .add(
                PathComponent::try_from(&b"x"[..]).unwrap(),
                Node::Symlink { target: "y".into() },
            )
            .unwrap();
        assert!(matches!(
            check_closure(
                &digest,
                vec![root.to_proto(), other.to_proto()],
                false,
                true
            ),
            Err(DirectoryError::Unexpected { .. })
        ));
        assert!(matches!(
            check_closure(
                &digest,
                vec![root.to_proto(), leaf.to_proto(), middle.to_proto()],
                true,
                true
            ),
            Err(DirectoryError::Unexpected { .. })
        ));
        // Nothing at all.
        assert!(check_closure(&digest, vec![], true, true).is_err());
    }
}
