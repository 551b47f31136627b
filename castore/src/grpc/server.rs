//! The castore's gRPC services over any blob and directory service: what `tvix-boot
//! store daemon` serves.
//!
//! The store API is synchronous (its backends block), so every store call runs on a
//! [`BlockingPool`] thread, one call at a time per request: a stream (a blob's bytes, a
//! tree of directories) is produced a piece at a time, only as fast as the client takes
//! it, and holds no thread while the client is slow. A client that goes away drops its
//! streams, and with them everything they held.
//!
//! Large blobs are offered by range, as tvix-store's protocol allows: Stat lists chunks of
//! 1 MiB (each a blob of its own, which Read serves) and sends an outboard whose chunk
//! groups are those chunks, so a client checks each chunk against the blob's digest.
//! Chunk digests are computed on the first Stat that asks for them and kept (bounded).

use std::collections::{HashMap, HashSet, VecDeque};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use lru::LruCache;
use tonic::{Request, Response, Status, Streaming};

use crate::blobservice::{BlobReader, BlobService};
use crate::digest::B3Digest;
use crate::directory::Directory;
use crate::directoryservice::DirectoryService;
use crate::grpc::rename_request;
use crate::outboard::{OUTBOARD_MIN_BLOB, WIRE_GROUP_LOG};
use crate::proto::{self, get_directory_request::ByWhat, stat_blob_response::ChunkMeta};

/// Bytes per BlobChunk message a Read sends: a chunk Stat lists is one message.
const READ_MESSAGE: usize = 1 << 20;
/// Size of the chunks Stat lists for a large blob: one chunk group of the outboard sent.
pub const CHUNK_SIZE: u64 = 1024 << WIRE_GROUP_LOG;
/// Blobs whose chunk lists are kept.
const CHUNKED_BLOBS: usize = 256;

/// Threads that run the store's blocking calls for the server, each call a job. Plain
/// threads outside any tokio runtime, so the store may drive its own runtime from them.
pub struct BlockingPool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

type Job = Box<dyn FnOnce() + Send>;

impl BlockingPool {
    /// `threads` threads named `name`.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Arc<Self>> {
        let (jobs, incoming) = mpsc::channel::<Job>();
        let incoming = Arc::new(Mutex::new(incoming));
        for _ in 0..threads.max(1) {
            let incoming = incoming.clone();
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    loop {
                        let job = incoming.lock().expect("job queue poisoned").recv();
                        match job {
                            // A panicking job loses its answer (the request fails), not
                            // the thread.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Arc::new(Self {
            jobs: Mutex::new(jobs),
        }))
    }

    /// Runs `job` on a pool thread.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.jobs
            .lock()
            .expect("job queue poisoned")
            .send(Box::new(move || {
                let _ = answer.send(job());
            }))
            .map_err(|_| Status::unavailable("the server is shutting down"))?;
        answered
            .await
            .map_err(|_| Status::internal("the store call failed unexpectedly"))
    }
}

fn digest_arg(bytes: &[u8]) -> Result<B3Digest, Status> {
    B3Digest::try_from(bytes).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// Where a chunk listed by a Stat lives: in blob `blob` at `offset`, `size` bytes long.
#[derive(Clone, Copy)]
struct ChunkPlace {
    blob: B3Digest,
    offset: u64,
    size: u64,
}

#[derive(Default)]
struct ChunkIndex {
    by_chunk: HashMap<B3Digest, ChunkPlace>,
}

/// The blob service, served.
pub struct BlobServer {
    blobs: Arc<dyn BlobService>,
    pool: Arc<BlockingPool>,
    lists: Mutex<LruCache<B3Digest, Arc<[ChunkMeta]>>>,
    index: Arc<Mutex<ChunkIndex>>,
}

impl BlobServer {
    /// Serves `blobs`, calling it on `pool`.
    pub fn new(blobs: Arc<dyn BlobService>, pool: Arc<BlockingPool>) -> Self {
        Self {
            blobs,
            pool,
            lists: Mutex::new(LruCache::new(
                NonZeroUsize::new(CHUNKED_BLOBS).expect("not zero"),
            )),
            index: Arc::new(Mutex::new(ChunkIndex::default())),
        }
    }

    /// The chunk list of a large blob: read (checked) and hashed 1 MiB at a time.
    fn chunk_list(reader: &dyn BlobReader) -> std::io::Result<Vec<ChunkMeta>> {
        let mut list = Vec::new();
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        let mut offset = 0u64;
        while offset < reader.size() {
            let want = (reader.size() - offset).min(CHUNK_SIZE) as usize;
            let mut done = 0;
            while done < want {
                let n = reader.read_at(&mut buf[done..want], offset + done as u64)?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the blob ended early",
                    ));
                }
                done += n;
            }
            list.push(ChunkMeta {
                digest: Bytes::copy_from_slice(blake3::hash(&buf[..want]).as_bytes()),
                size: want as u64,
            });
            offset += want as u64;
        }
        Ok(list)
    }

    fn remember(&self, blob: B3Digest, list: &Arc<[ChunkMeta]>) {
        let mut lists = self.lists.lock().expect("chunk lists poisoned");
        let mut index = self.index.lock().expect("chunk index poisoned");
        if let Some((old, old_list)) = lists.push(blob, list.clone())
            && old != blob
        {
            for meta in old_list.iter() {
                if let Ok(d) = B3Digest::try_from(&meta.digest[..])
                    && index.by_chunk.get(&d).is_some_and(|p| p.blob == old)
                {
                    index.by_chunk.remove(&d);
                }
            }
        }
        let mut offset = 0;
        for meta in list.iter() {
            if let Ok(d) = B3Digest::try_from(&meta.digest[..]) {
                index.by_chunk.insert(
                    d,
                    ChunkPlace {
                        blob,
                        offset,
                        size: meta.size,
                    },
                );
            }
            offset += meta.size;
        }
    }
}

/// A blob's bytes `offset..end` as BlobChunk messages, each read when the client takes
/// the one before.
fn read_stream(
    pool: Arc<BlockingPool>,
    reader: Arc<dyn BlobReader>,
    offset: u64,
    end: u64,
) -> BoxStream<'static, Result<proto::BlobChunk, Status>> {
    stream::try_unfold(offset, move |offset| {
        let pool = pool.clone();
        let reader = reader.clone();
        async move {
            if offset >= end {
                return Ok(None);
            }
            let want = (end - offset).min(READ_MESSAGE as u64) as usize;
            let data = pool
                .run(move || {
                    let mut buf = vec![0u8; want];
                    let mut done = 0;
                    while done < want {
                        match reader.read_at(&mut buf[done..], offset + done as u64) {
                            Ok(0) => {
                                return Err(Status::data_loss(format!(
                                    "blob ends at {} bytes",
                                    offset + done as u64
                                )));
                            }
                            Ok(n) => done += n,
                            Err(e) => return Err(Status::data_loss(e.to_string())),
                        }
                    }
                    Ok(Bytes::from(buf))
                })
                .await??;
            Ok(Some((proto::BlobChunk { data }, offset + want as u64)))
        }
    })
    .boxed()
}

#[tonic::async_trait]
impl proto::blob_service_server::BlobService for Arc<BlobServer> {
    type ReadStream = BoxStream<'static, Result<proto::BlobChunk, Status>>;

    async fn stat(
        &self,
        request: Request<proto::StatBlobRequest>,
    ) -> Result<Response<proto::StatBlobResponse>, Status> {
        let request = request.into_inner();
        let digest = digest_arg(&request.digest)?;
        let cached = self
            .lists
            .lock()
            .expect("chunk lists poisoned")
            .get(&digest)
            .cloned();
        let blobs = self.blobs.clone();
        let is_chunk = self
            .index
            .lock()
            .expect("chunk index poisoned")
            .by_chunk
            .contains_key(&digest);
        let (list, bao) = self
            .pool
            .run(move || {
                let Some(reader) = blobs.open(&digest).map_err(internal)? else {
                    if is_chunk {
                        // A chunk a Stat listed: Read serves it; it has no chunks of its
                        // own (tvix's client Stats each chunk before reading it).
                        return Ok((None, Vec::new()));
                    }
                    return Err(Status::not_found(format!("blob {digest} not found")));
                };
                let large = reader.size() > OUTBOARD_MIN_BLOB;
                let list = match (request.send_chunks && large, cached) {
                    (false, _) => None,
                    (true, Some(list)) => Some((list, false)),
                    (true, None) => Some((
                        Arc::from(BlobServer::chunk_list(&*reader).map_err(internal)?),
                        true,
                    )),
                };
                let bao = if request.send_bao && large {
                    blobs
                        .outboard(&digest, WIRE_GROUP_LOG)
                        .map_err(internal)?
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                Ok((list, bao))
            })
            .await??;
        let chunks = match list {
            Some((list, fresh)) => {
                if fresh {
                    self.remember(digest, &list);
                }
                list.to_vec()
            }
            None => Vec::new(),
        };
        Ok(Response::new(proto::StatBlobResponse {
            chunks,
            bao: Bytes::from(bao),
        }))
    }

    async fn read(
        &self,
        request: Request<proto::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let digest = digest_arg(&request.into_inner().digest)?;
        let place = self
            .index
            .lock()
            .expect("chunk index poisoned")
            .by_chunk
            .get(&digest)
            .copied();
        let blobs = self.blobs.clone();
        let opened = self
            .pool
            .run(
                move || -> Result<Option<(Arc<dyn BlobReader>, u64, u64)>, Status> {
                    if let Some(reader) = blobs.open(&digest).map_err(internal)? {
                        let size = reader.size();
                        return Ok(Some((reader, 0, size)));
                    }
                    let Some(place) = place else { return Ok(None) };
                    Ok(blobs
                        .open(&place.blob)
                        .map_err(internal)?
                        .map(|reader| (reader, place.offset, place.offset + place.size)))
                },
            )
            .await??;
        let Some((reader, start, end)) = opened else {
            return Err(Status::not_found(format!("blob {digest} not found")));
        };
        Ok(Response::new(read_stream(
            self.pool.clone(),
            reader,
            start,
            end,
        )))
    }

    async fn put(
        &self,
        request: Request<Streaming<proto::BlobChunk>>,
    ) -> Result<Response<proto::PutBlobResponse>, Status> {
        let mut chunks = request.into_inner();
        let blobs = self.blobs.clone();
        let mut writer = self
            .pool
            .run(move || blobs.writer().map_err(internal))
            .await??;
        while let Some(chunk) = chunks.message().await? {
            writer = self
                .pool
                .run(move || {
                    std::io::Write::write_all(&mut writer, &chunk.data).map_err(internal)?;
                    Ok::<_, Status>(writer)
                })
                .await??;
        }
        let digest = self
            .pool
            .run(move || writer.close().map_err(internal))
            .await??;
        Ok(Response::new(proto::PutBlobResponse {
            digest: Bytes::copy_from_slice(digest.as_bytes()),
        }))
    }
}

/// The directory service, served.
pub struct DirectoryServer {
    directories: Arc<dyn DirectoryService>,
    pool: Arc<BlockingPool>,
}

impl DirectoryServer {
    /// Serves `directories`, calling it on `pool`.
    pub fn new(directories: Arc<dyn DirectoryService>, pool: Arc<BlockingPool>) -> Self {
        Self { directories, pool }
    }
}

/// The directories of the tree at `root`, breadth-first, each digest once, each fetched
/// when the client takes the one before. A directory missing from the store ends the
/// stream with an error: a closure is never sent incomplete.
fn tree_stream(
    pool: Arc<BlockingPool>,
    directories: Arc<dyn DirectoryService>,
    root: Directory,
    root_digest: B3Digest,
) -> BoxStream<'static, Result<proto::Directory, Status>> {
    let mut queue = VecDeque::new();
    let mut seen = HashSet::from([root_digest]);
    for (_, child) in root.child_directories() {
        if seen.insert(*child) {
            queue.push_back((*child, root_digest));
        }
    }
    let first = stream::once(async move { Ok(root.to_proto()) });
    let rest = stream::try_unfold((queue, seen), move |(mut queue, mut seen)| {
        let pool = pool.clone();
        let directories = directories.clone();
        async move {
            let Some((digest, parent)) = queue.pop_front() else {
                return Ok(None);
            };
            let directory = pool
                .run(move || directories.get(&digest).map_err(internal))
                .await??
                .ok_or_else(|| {
                    Status::data_loss(format!(
                        "directory {parent} refers to directory {digest}, which is not in the store"
                    ))
                })?;
            for (_, child) in directory.child_directories() {
                if seen.insert(*child) {
                    queue.push_back((*child, digest));
                }
            }
            Ok(Some((directory.to_proto(), (queue, seen))))
        }
    });
    first.chain(rest).boxed()
}

#[tonic::async_trait]
impl proto::directory_service_server::DirectoryService for Arc<DirectoryServer> {
    type GetStream = BoxStream<'static, Result<proto::Directory, Status>>;

    async fn get(
        &self,
        request: Request<proto::GetDirectoryRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let request = request.into_inner();
        let Some(ByWhat::Digest(digest)) = request.by_what else {
            return Err(Status::invalid_argument("no digest given"));
        };
        let digest = digest_arg(&digest)?;
        let directories = self.directories.clone();
        let root = self
            .pool
            .run(move || directories.get(&digest).map_err(internal))
            .await??
            .ok_or_else(|| Status::not_found(format!("directory {digest} not found")))?;
        if !request.recursive {
            return Ok(Response::new(
                stream::once(async move { Ok(root.to_proto()) }).boxed(),
            ));
        }
        Ok(Response::new(tree_stream(
            self.pool.clone(),
            self.directories.clone(),
            root,
            digest,
        )))
    }

    async fn put(
        &self,
        request: Request<Streaming<proto::Directory>>,
    ) -> Result<Response<proto::PutDirectoryResponse>, Status> {
        let mut messages = request.into_inner();
        // Only digests matter here: what was received is stored at once.
        let mut received: HashSet<B3Digest> = HashSet::new();
        let mut last = None;
        while let Some(message) = messages.message().await? {
            let directory = Directory::try_from(message)
                .map_err(|e| Status::invalid_argument(format!("invalid directory: {e}")))?;
            let digest = directory.digest();
            let children: Vec<B3Digest> = directory
                .child_directories()
                .map(|(_, d)| *d)
                .filter(|d| !received.contains(d))
                .collect();
            let directories = self.directories.clone();
            self.pool
                .run(move || {
                    for child in children {
                        if !directories.has(&child).map_err(internal)? {
                            return Err(Status::failed_precondition(format!(
                                "directory {digest} refers to directory {child}, which was not sent before it"
                            )));
                        }
                    }
                    directories.put(&directory).map_err(internal)?;
                    directories.flush().map_err(internal)
                })
                .await??;
            received.insert(digest);
            last = Some(digest);
        }
        let last = last.ok_or_else(|| Status::invalid_argument("no directory sent"))?;
        Ok(Response::new(proto::PutDirectoryResponse {
            root_digest: Bytes::copy_from_slice(last.as_bytes()),
        }))
    }
}

/// Routes requests for snix's package names (`/snix.castore.v1.…`, `/snix.store.v1.…`)
/// to the services of tvix's: the messages are the same.
pub fn accept_snix_names<B>(request: http::Request<B>) -> http::Request<B> {
    rename_request(request, "snix.", "tvix.")
}
