//! Blobs: file contents addressed by their BLAKE3 digest.
//!
//! Blob bytes are kept whole and uncompressed, so a reader can serve any offset with one
//! positioned read, and a local blob is a plain file the VMM can read or map directly.
//! No byte of a blob is handed out before it was checked against the blob's digest:
//!
//! - a local blob up to `OUTBOARD_MIN_BLOB` is hashed whole when it is opened;
//! - a larger one has an outboard beside it (written with the blob, see `outboard`): it
//!   opens at once, each read is checked range by range against the outboard, and the
//!   whole blob is hashed in the background on the store's I/O threads. Once that pass
//!   succeeded the file is served directly (`BlobReader::local_file`);
//! - a larger one without an outboard (written by an older version) is hashed whole on
//!   the store's I/O threads before the open returns, and gets its outboard then;
//! - a remote blob is fetched whole and hashed before use.
//!
//! A blob hashed whole once is remembered for the process, with its file's identity.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use thiserror::Error;

use crate::digest::B3Digest;
use crate::kv::fanned_out_path;
use crate::outboard::{OUTBOARD_MIN_BLOB, Outboard, TreeHasher, outboard_path};
use crate::runtime::{block_on, spawn_background};

/// Blobs up to this size are written with a single put from memory; larger ones are
/// spooled to a temporary file first, so memory use stays flat for huge files.
const IN_MEMORY_WRITE_LIMIT: usize = 4 << 20;
const VERIFY_CHUNK: usize = 1 << 20;

/// Why a blob could not be read or written.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum BlobError {
    /// The stored content does not hash to the digest it is stored under.
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    Corrupt { digest: B3Digest, actual: B3Digest },
    /// Reading the blob failed.
    #[error("blob {digest}: {source}")]
    Io { digest: B3Digest, source: io::Error },
    /// The blob is not as long as the directory that names it says.
    #[error("blob {digest} has {actual} bytes, not the {expected} its directory says")]
    WrongSize {
        digest: B3Digest,
        expected: u64,
        actual: u64,
    },
    /// Writing a new blob's bytes to a temporary file in `dir` failed.
    #[error("writing a blob to {dir}: {source}")]
    Spool { dir: PathBuf, source: io::Error },
    /// The object store failed.
    #[error("object store {url}: {source}")]
    ObjectStore {
        url: String,
        source: Box<object_store::Error>,
    },
}

/// Random access to the bytes of one blob, each checked against its digest.
pub trait BlobReader: Send + Sync {
    /// Length of the blob, in bytes.
    fn size(&self) -> u64;
    /// Read at `offset`; a short count only at the end of the blob. What `read_at` returns
    /// was checked; on error `buf` may hold bytes that failed their check, so it must be
    /// memory nobody else sees (never guest memory).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The local file that holds exactly this blob's bytes, once all of them were checked:
    /// lets the VMM move data between the file and guest memory without a buffer of its
    /// own. `None` while only ranges can be checked: read through `read_at` then.
    fn local_file(&self) -> Option<&File> {
        None
    }
    /// The blob's bytes, when they are held in memory: the other way to avoid a copy.
    fn as_bytes(&self) -> Option<&[u8]> {
        None
    }
}

/// Streams a new blob in; `close` returns its digest once it is durable in the service.
pub trait BlobWriter: Write + Send {
    /// Finishes the blob and stores it under its digest, which it returns.
    fn close(self: Box<Self>) -> Result<B3Digest, BlobError>;
}

/// Blobs by BLAKE3 digest.
pub trait BlobService: Send + Sync {
    /// Whether the blob is stored (its content is not checked).
    fn has(&self, digest: &B3Digest) -> Result<bool, BlobError>;
    /// `None` when the blob is absent; an error when it is present but corrupt.
    fn open(&self, digest: &B3Digest) -> Result<Option<Arc<dyn BlobReader>>, BlobError>;
    /// A writer for a new blob; [`BlobWriter::close`] gives its digest.
    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError>;
    /// As [`open`](Self::open), for a blob known (from a checked directory) to be `size`
    /// bytes long: a remote service then fetches no more than that, and a blob of
    /// another size is an error.
    fn open_sized(
        &self,
        digest: &B3Digest,
        size: u64,
    ) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        let blob = self.open(digest)?;
        if let Some(blob) = &blob
            && blob.size() != size
        {
            return Err(BlobError::WrongSize {
                digest: *digest,
                expected: size,
                actual: blob.size(),
            });
        }
        Ok(blob)
    }
    /// The blob's outboard with chunk groups of 2^`group_log` KiB (the file layout of
    /// `outboard`), when the service has one at hand: what a gRPC server sends with Stat.
    fn outboard(&self, _digest: &B3Digest, _group_log: u8) -> Result<Option<Vec<u8>>, BlobError> {
        Ok(None)
    }
}

impl BlobReader for Bytes {
    fn size(&self) -> u64 {
        self.len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
    fn as_bytes(&self) -> Option<&[u8]> {
        Some(self)
    }
}

fn verify(digest: &B3Digest, data: &[u8]) -> Result<(), BlobError> {
    let actual = B3Digest::of(data);
    if actual != *digest {
        return Err(BlobError::Corrupt {
            digest: *digest,
            actual,
        });
    }
    Ok(())
}

/// Blobs in a process-local map (`memory://`).
#[derive(Default)]
pub struct MemoryBlobService {
    blobs: Arc<RwLock<HashMap<B3Digest, Bytes>>>,
}

impl BlobService for MemoryBlobService {
    fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        Ok(self
            .blobs
            .read()
            .expect("blob map poisoned")
            .contains_key(digest))
    }
    fn open(&self, digest: &B3Digest) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        let blob = self
            .blobs
            .read()
            .expect("blob map poisoned")
            .get(digest)
            .cloned();
        Ok(blob.map(|b| Arc::new(b) as Arc<dyn BlobReader>))
    }
    fn outboard(&self, digest: &B3Digest, group_log: u8) -> Result<Option<Vec<u8>>, BlobError> {
        let blob = self
            .blobs
            .read()
            .expect("blob map poisoned")
            .get(digest)
            .cloned();
        Ok(blob.map(|data| crate::outboard::outboard_of(&data, group_log)))
    }
    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        Ok(Box::new(MemoryBlobWriter {
            blobs: self.blobs.clone(),
            data: Vec::new(),
        }))
    }
}

struct MemoryBlobWriter {
    blobs: Arc<RwLock<HashMap<B3Digest, Bytes>>>,
    data: Vec<u8>,
}

impl Write for MemoryBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for MemoryBlobWriter {
    fn close(self: Box<Self>) -> Result<B3Digest, BlobError> {
        let digest = B3Digest::of(&self.data);
        self.blobs
            .write()
            .expect("blob map poisoned")
            .insert(digest, self.data.into());
        Ok(digest)
    }
}

/// Blobs as objects named by their hex digest in an object store
/// (`objectstore+file:///path`, `objectstore+memory://`).
pub struct ObjectStoreBlobService {
    inner: Arc<ObjectStoreBlobs>,
}

struct ObjectStoreBlobs {
    store: Arc<dyn ObjectStore>,
    url: String,
    /// Where objects live on disk when the store is a local directory: reads then go to the
    /// file directly instead of through the object-store API.
    local_root: Option<PathBuf>,
    /// Local files already hashed in this process, with the file identity seen then, so a
    /// blob is hashed once per process and not once per read.
    verified: Mutex<HashMap<B3Digest, FileIdentity>>,
    /// Large local blobs being hashed whole in the background: opens meanwhile share the
    /// blob (and its one pass) instead of starting another.
    verifying: Mutex<HashMap<B3Digest, Weak<LocalBlob>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        }
    }
}

impl ObjectStoreBlobService {
    /// Blobs in `store`, which `url` names in errors. `local_root` is the directory of a
    /// local object store: blobs are then read from their files directly.
    pub fn new(store: Arc<dyn ObjectStore>, url: &str, local_root: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(ObjectStoreBlobs {
                store,
                url: url.to_owned(),
                local_root,
                verified: Mutex::new(HashMap::new()),
                verifying: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl ObjectStoreBlobs {
    fn err(&self, e: object_store::Error) -> BlobError {
        BlobError::ObjectStore {
            url: self.url.clone(),
            source: Box::new(e),
        }
    }

    fn local_path(&self, digest: &B3Digest) -> Option<PathBuf> {
        self.local_root
            .as_ref()
            .map(|root| root.join(fanned_out_path(digest.as_bytes()).as_ref()))
    }

    /// Spooled files and outboards are written here first, so the final step into the
    /// store is one atomic rename.
    fn spool_dir(&self) -> PathBuf {
        match &self.local_root {
            Some(root) => root.join("tmp"),
            None => std::env::temp_dir(),
        }
    }

    /// Puts `file` at `final_path` by rename, creating the fan-out directory when the
    /// rename says it is missing (it usually exists). Not flushed: `Store::sync` flushes
    /// the store's file systems before anything that names the file is acknowledged.
    fn persist(file: tempfile::NamedTempFile, final_path: &Path) -> Result<(), BlobError> {
        let parent = final_path.parent().expect("blob paths have a parent");
        let spool_err = |source| BlobError::Spool {
            dir: parent.to_owned(),
            source,
        };
        if let Err(e) = file.persist(final_path) {
            if e.error.kind() != io::ErrorKind::NotFound {
                return Err(spool_err(e.error));
            }
            std::fs::create_dir_all(parent).map_err(spool_err)?;
            e.file.persist(final_path).map_err(|e| spool_err(e.error))?;
        }
        Ok(())
    }

    /// Writes `bytes` as the outboard at `path`.
    fn write_outboard(&self, path: &Path, bytes: &[u8]) -> Result<(), BlobError> {
        let dir = self.spool_dir();
        let spool_err = |source| BlobError::Spool {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(spool_err)?;
        let mut file = tempfile::NamedTempFile::new_in(&dir).map_err(spool_err)?;
        file.write_all(bytes).map_err(spool_err)?;
        Self::persist(file, path)
    }

    fn open_local(
        self: &Arc<Self>,
        digest: &B3Digest,
        path: &Path,
    ) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        let io_err = |source| BlobError::Io {
            digest: *digest,
            source,
        };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let meta = file.metadata().map_err(io_err)?;
        let identity = FileIdentity::of(&meta);
        let size = meta.size();
        let known_good = self
            .verified
            .lock()
            .expect("verified set poisoned")
            .get(digest)
            == Some(&identity);
        if known_good {
            return Ok(Some(LocalBlob::verified(*digest, file, identity)));
        }
        if size <= OUTBOARD_MIN_BLOB {
            // Small: hashed whole here, which costs less than a trip to another thread.
            let actual = hash_file(&file, None).map_err(io_err)?.0;
            if actual != *digest {
                return Err(BlobError::Corrupt {
                    digest: *digest,
                    actual,
                });
            }
            self.verified
                .lock()
                .expect("verified set poisoned")
                .insert(*digest, identity);
            return Ok(Some(LocalBlob::verified(*digest, file, identity)));
        }

        // Large: served range by range against its outboard while a pass on the store's
        // I/O threads hashes all of it.
        let outboard_path = outboard_path(path);
        let outboard = Outboard::open(&outboard_path, *digest, size).unwrap_or_else(|e| {
            tracing::warn!(%digest, error = %e, "ignoring the blob's outboard: hashing the blob whole instead");
            None
        });
        let blob = {
            let mut verifying = self.verifying.lock().expect("verifying set poisoned");
            match verifying
                .get(digest)
                .and_then(Weak::upgrade)
                .filter(|blob| blob.identity == identity)
            {
                Some(blob) => blob,
                None => {
                    let blob = Arc::new(LocalBlob {
                        digest: *digest,
                        file,
                        size,
                        identity,
                        verified: AtomicBool::new(false),
                        outboard: RwLock::new(outboard),
                        pass: Mutex::new(Pass::Running),
                        pass_done: Condvar::new(),
                    });
                    verifying.insert(*digest, Arc::downgrade(&blob));
                    let (blobs, pass_blob) = (self.clone(), blob.clone());
                    spawn_background(move || blobs.whole_blob_pass(&pass_blob, &outboard_path));
                    blob
                }
            }
        };
        let has_outboard = blob
            .outboard
            .read()
            .expect("outboard lock poisoned")
            .is_some();
        if !has_outboard {
            // Nothing to check ranges against: no byte before all of them were hashed.
            blob.wait_for_pass()?;
        }
        Ok(Some(blob))
    }

    /// Hashes all of `blob` (on a store I/O thread) and records the outcome: a blob found
    /// right is served directly from then on. The pass builds the blob's outboard as it
    /// hashes (each byte is hashed once either way) and puts it in place when the one on
    /// disk is missing or differs, so a lost or damaged outboard costs one slow open.
    fn whole_blob_pass(&self, blob: &Arc<LocalBlob>, outboard_path: &Path) {
        // Whatever happens, the pass ends with an outcome: opens and reads wait for one.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.hash_whole_blob(blob, outboard_path)
        }))
        .unwrap_or_else(|_| Pass::Failed(io::ErrorKind::Other, "hashing it panicked".into()));
        let digest = blob.digest;
        {
            let mut verifying = self.verifying.lock().expect("verifying set poisoned");
            if verifying
                .get(&digest)
                .is_some_and(|entry| std::ptr::eq(entry.as_ptr(), Arc::as_ptr(blob)))
            {
                verifying.remove(&digest);
            }
        }
        *blob.pass.lock().expect("pass state poisoned") = outcome;
        blob.pass_done.notify_all();
    }

    fn hash_whole_blob(&self, blob: &LocalBlob, outboard_path: &Path) -> Pass {
        let digest = blob.digest;
        match hash_file(&blob.file, Some(TreeHasher::new())) {
            Ok((actual, outboard)) if actual == digest => {
                if let Some(bytes) = outboard {
                    match std::fs::read(outboard_path) {
                        Ok(found) if found == bytes => {}
                        found => {
                            if found.is_ok() {
                                tracing::warn!(%digest, path = %outboard_path.display(), "the blob's outboard does not match it: replacing it");
                            }
                            if let Err(e) = self.write_outboard(outboard_path, &bytes) {
                                // A read-only store, say: this process is served all the same.
                                tracing::debug!(%digest, error = %e, "cannot write the blob's outboard");
                            }
                        }
                    }
                }
                self.verified
                    .lock()
                    .expect("verified set poisoned")
                    .insert(digest, blob.identity);
                // Set before the outboard goes: a read that finds no outboard finds this.
                blob.verified.store(true, Ordering::Release);
                *blob.outboard.write().expect("outboard lock poisoned") = None;
                Pass::Verified
            }
            Ok((actual, _)) => {
                tracing::warn!(%digest, %actual, "blob is corrupt: its content hashes to another digest");
                Pass::Corrupt(actual)
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot read the blob to hash it");
                Pass::Failed(e.kind(), e.to_string())
            }
        }
    }
}

/// Hashes all of `file` with 1 MiB reads, into `tree` (which also gives the outboard of a
/// large blob) when given, else with a plain BLAKE3 hasher.
fn hash_file(file: &File, tree: Option<TreeHasher>) -> io::Result<(B3Digest, Option<Vec<u8>>)> {
    let mut plain = blake3::Hasher::new();
    let mut tree = tree;
    let mut buf = vec![0u8; VERIFY_CHUNK];
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(&mut buf, offset) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        match &mut tree {
            Some(tree) => tree.update(&buf[..n]),
            None => {
                plain.update(&buf[..n]);
            }
        }
        offset += n as u64;
    }
    Ok(match tree {
        Some(tree) => tree.finish(true),
        None => (B3Digest::from(plain.finalize()), None),
    })
}

/// What the whole-blob pass found.
enum Pass {
    Running,
    Verified,
    Corrupt(B3Digest),
    Failed(io::ErrorKind, String),
}

/// An open local blob, shared by every reader of it and by its whole-blob pass.
struct LocalBlob {
    digest: B3Digest,
    file: File,
    size: u64,
    identity: FileIdentity,
    /// Every byte was hashed and found right: reads go straight to the file, and
    /// `local_file` lets a VMM read it into guest memory itself.
    verified: AtomicBool,
    /// Until then each read is checked against this; dropped (its descriptor closed) once
    /// `verified` is set. `None` from the start for a blob that had no usable outboard:
    /// such a blob is handed out only once verified.
    outboard: RwLock<Option<Outboard>>,
    pass: Mutex<Pass>,
    pass_done: Condvar,
}

impl LocalBlob {
    fn verified(digest: B3Digest, file: File, identity: FileIdentity) -> Arc<Self> {
        Arc::new(Self {
            digest,
            file,
            size: identity.size,
            identity,
            verified: AtomicBool::new(true),
            outboard: RwLock::new(None),
            pass: Mutex::new(Pass::Verified),
            pass_done: Condvar::new(),
        })
    }

    /// Waits for the whole-blob pass; Ok when it found the blob right.
    fn wait_for_pass(&self) -> Result<(), BlobError> {
        let pass = self.pass.lock().expect("pass state poisoned");
        let pass = self
            .pass_done
            .wait_while(pass, |pass| matches!(pass, Pass::Running))
            .expect("pass state poisoned");
        match &*pass {
            Pass::Running => unreachable!("waited until the pass ended"),
            Pass::Verified => Ok(()),
            Pass::Corrupt(actual) => Err(BlobError::Corrupt {
                digest: self.digest,
                actual: *actual,
            }),
            Pass::Failed(kind, message) => Err(BlobError::Io {
                digest: self.digest,
                source: io::Error::new(*kind, message.clone()),
            }),
        }
    }
}

impl BlobService for ObjectStoreBlobService {
    fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        let inner = &self.inner;
        if let Some(path) = inner.local_path(digest) {
            return Ok(path.is_file());
        }
        match block_on(inner.store.head(&fanned_out_path(digest.as_bytes()))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(inner.err(e)),
        }
    }

    fn open(&self, digest: &B3Digest) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        let inner = &self.inner;
        if let Some(path) = inner.local_path(digest) {
            return inner.open_local(digest, &path);
        }
        // A remote blob is fetched whole and verified before use.
        let path = fanned_out_path(digest.as_bytes());
        let data = block_on(async {
            match inner.store.get(&path).await {
                Ok(got) => got.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .map_err(|e| inner.err(e))?;
        let Some(data) = data else { return Ok(None) };
        verify(digest, &data)?;
        Ok(Some(Arc::new(data)))
    }

    fn outboard(&self, digest: &B3Digest, group_log: u8) -> Result<Option<Vec<u8>>, BlobError> {
        let Some(path) = self.inner.local_path(digest) else {
            return Ok(None);
        };
        let io_err = |source| BlobError::Io {
            digest: *digest,
            source,
        };
        let size = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        match Outboard::open(&outboard_path(&path), *digest, size) {
            Ok(Some(outboard)) => outboard.coarsen(group_log).map(Some).map_err(io_err),
            // None, or not usable: the blob is served whole until its pass writes one.
            _ => Ok(None),
        }
    }
    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        Ok(Box::new(ObjectStoreBlobWriter {
            blobs: self.inner.clone(),
            hasher: TreeHasher::new(),
            buffer: Vec::new(),
            spool: None,
        }))
    }
}

impl BlobReader for LocalBlob {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let blob = self;
        let want = buf.len().min(
            blob.size
                .saturating_sub(offset)
                .try_into()
                .unwrap_or(usize::MAX),
        );
        if want == 0 {
            return Ok(0);
        }
        let buf = &mut buf[..want];
        if !blob.verified.load(Ordering::Acquire) {
            let checked = blob
                .outboard
                .read()
                .expect("outboard lock poisoned")
                .as_ref()
                .map(|outboard| outboard.read_verified(&blob.file, buf, offset));
            match checked {
                Some(Ok(())) => return Ok(want),
                Some(Err(e)) => {
                    // Wrong bytes, or a wrong outboard: the whole-blob pass tells which.
                    // Only if it finds every byte right is the file read as it is.
                    tracing::warn!(digest = %blob.digest, error = %e, "a read failed its check: waiting for the whole blob's hash");
                    if blob.wait_for_pass().is_err() {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                    }
                }
                // The outboard is dropped only after `verified` was set.
                None if blob.verified.load(Ordering::Acquire) => {}
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("blob {} was not checked", blob.digest),
                    ));
                }
            }
        }
        let mut done = 0;
        while done < want {
            match blob.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
    fn local_file(&self) -> Option<&File> {
        self.verified.load(Ordering::Acquire).then_some(&self.file)
    }
}

struct ObjectStoreBlobWriter {
    blobs: Arc<ObjectStoreBlobs>,
    /// Gives the digest and, for a local store, the outboard: each byte is hashed once.
    hasher: TreeHasher,
    buffer: Vec<u8>,
    /// Set once the blob outgrows `IN_MEMORY_WRITE_LIMIT`.
    spool: Option<(tempfile::NamedTempFile, PathBuf)>,
}

impl Write for ObjectStoreBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        if self.spool.is_none() && self.buffer.len() + buf.len() > IN_MEMORY_WRITE_LIMIT {
            let dir = self.blobs.spool_dir();
            std::fs::create_dir_all(&dir)?;
            let mut file = tempfile::NamedTempFile::new_in(&dir)?;
            file.write_all(&self.buffer)?;
            self.buffer = Vec::new();
            self.spool = Some((file, dir));
        }
        match &mut self.spool {
            Some((file, _)) => file.write_all(buf)?,
            None => self.buffer.extend_from_slice(buf),
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for ObjectStoreBlobWriter {
    fn close(self: Box<Self>) -> Result<B3Digest, BlobError> {
        let blobs = &self.blobs;
        let (digest, outboard) = self.hasher.finish(blobs.local_root.is_some());
        let object = fanned_out_path(digest.as_bytes());
        if let Some(final_path) = blobs.local_path(&digest) {
            // A local store skips the object-store API: write (or keep) the file, then one
            // atomic rename. The outboard goes first, so a reader that finds the blob finds
            // it too (else it would hash the blob whole); a crash in between leaves an
            // outboard without a blob, which nothing reads. Both are flushed by
            // `Store::sync` with the rest of the path's content.
            let outboard_path = outboard_path(&final_path);
            if final_path.is_file() {
                // Content-addressed, so an existing file is already right; a store written
                // before outboards existed gets the outboard now.
                if let Some(bytes) = &outboard
                    && !outboard_path.is_file()
                {
                    blobs.write_outboard(&outboard_path, bytes)?;
                }
                return Ok(digest);
            }
            let spool_err = |dir: &Path| {
                let dir = dir.to_owned();
                move |source| BlobError::Spool { dir, source }
            };
            let file = match self.spool {
                Some((file, _)) => file,
                None => {
                    let dir = blobs.spool_dir();
                    std::fs::create_dir_all(&dir).map_err(spool_err(&dir))?;
                    let mut file =
                        tempfile::NamedTempFile::new_in(&dir).map_err(spool_err(&dir))?;
                    file.write_all(&self.buffer).map_err(spool_err(&dir))?;
                    file
                }
            };
            if let Some(bytes) = &outboard {
                blobs.write_outboard(&outboard_path, bytes)?;
            }
            ObjectStoreBlobs::persist(file, &final_path)?;
            return Ok(digest);
        }
        match self.spool {
            None => {
                block_on(blobs.store.put(&object, PutPayload::from(self.buffer)))
                    .map_err(|e| blobs.err(e))?;
            }
            Some((file, dir)) => {
                let file = file
                    .reopen()
                    .map_err(|source| BlobError::Spool { dir, source })?;
                upload_from_file(blobs, &object, file)?;
            }
        }
        Ok(digest)
    }
}

fn upload_from_file(
    blobs: &ObjectStoreBlobs,
    object: &object_store::path::Path,
    mut file: File,
) -> Result<(), BlobError> {
    block_on(async {
        let upload = blobs
            .store
            .put_multipart(object)
            .await
            .map_err(|e| blobs.err(e))?;
        let mut writer = WriteMultipart::new(upload);
        let mut buf = vec![0u8; VERIFY_CHUNK];
        loop {
            let n = file.read(&mut buf).map_err(|source| BlobError::Spool {
                dir: object.to_string().into(),
                source,
            })?;
            if n == 0 {
                break;
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(|e| blobs.err(e))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(service: &dyn BlobService, data: &[u8]) -> B3Digest {
        let mut writer = service.writer().unwrap();
        // Several writes, crossing the in-memory limit for big data.
        for chunk in data.chunks(1 << 20) {
            writer.write_all(chunk).unwrap();
        }
        writer.close().unwrap()
    }

    fn exercise(service: &dyn BlobService) {
        for size in [0usize, 1, 4096, IN_MEMORY_WRITE_LIMIT + 12345] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
            let digest = put(service, &data);
            assert_eq!(digest, B3Digest::of(&data));
            assert!(service.has(&digest).unwrap());
            let reader = service.open(&digest).unwrap().expect("blob present");
            assert_eq!(reader.size(), size as u64);
            // Random access: a window in the middle, and a read past the end.
            let mut buf = vec![0u8; 1000];
            let offset = size / 2;
            let n = reader.read_at(&mut buf, offset as u64).unwrap();
            assert_eq!(&buf[..n], &data[offset..(offset + 1000).min(size)]);
            assert_eq!(reader.read_at(&mut buf, size as u64 + 5).unwrap(), 0);
        }
        assert!(service.open(&B3Digest::of(b"absent")).unwrap().is_none());
        assert!(!service.has(&B3Digest::of(b"absent")).unwrap());
    }

    #[test]
    fn memory() {
        exercise(&MemoryBlobService::default());
    }

    #[test]
    fn object_store_memory() {
        exercise(&ObjectStoreBlobService::new(
            Arc::new(object_store::memory::InMemory::new()),
            "memory",
            None,
        ));
    }

    #[test]
    fn object_store_local_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let service =
            ObjectStoreBlobService::new(Arc::new(local), "test", Some(dir.path().to_owned()));
        exercise(&service);

        let digest = put(&service, b"precious bytes");
        let path = service.inner.local_path(&digest).unwrap();
        assert!(
            service
                .open(&digest)
                .unwrap()
                .unwrap()
                .local_file()
                .is_some()
        );
        std::fs::write(&path, b"precious bytez").unwrap();
        match service.open(&digest) {
            Err(BlobError::Corrupt { digest: d, .. }) => assert_eq!(d, digest),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("corrupt blob was served"),
        }
    }

    fn local_service(dir: &Path) -> ObjectStoreBlobService {
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
        ObjectStoreBlobService::new(Arc::new(local), "test", Some(dir.to_owned()))
    }

    /// A large blob, its path and its outboard's path.
    fn large(service: &ObjectStoreBlobService, size: usize) -> (Vec<u8>, B3Digest, PathBuf) {
        let data: Vec<u8> = (0..size).map(|i| (i * 13 + i / 4093) as u8).collect();
        let digest = put(service, &data);
        let path = service.inner.local_path(&digest).unwrap();
        (data, digest, path)
    }

    fn wait_until_verified(reader: &dyn BlobReader) {
        let started = std::time::Instant::now();
        while reader.local_file().is_none() {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "the whole-blob pass never finished"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn read_all(reader: &dyn BlobReader, piece: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; piece];
        loop {
            let n = reader.read_at(&mut buf, out.len() as u64)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn outboards_are_written_beside_large_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let service = local_service(dir.path());
        let (data, digest, path) = large(&service, 3 << 20);
        let outboard = std::fs::read(outboard_path(&path)).unwrap();
        // 4 bytes per KiB of blob (one 64-byte pair per 16 KiB group), plus the header.
        assert!(outboard.len() < data.len() / 200, "{}", outboard.len());
        assert_eq!(digest, B3Digest::of(&data));

        let small = put(&service, &vec![7u8; OUTBOARD_MIN_BLOB as usize]);
        let small_path = service.inner.local_path(&small).unwrap();
        assert!(small_path.is_file());
        assert!(!outboard_path(&small_path).exists());

        // A store written before outboards: writing the blob again adds its outboard.
        std::fs::remove_file(outboard_path(&path)).unwrap();
        assert_eq!(put(&service, &data), digest);
        assert_eq!(std::fs::read(outboard_path(&path)).unwrap(), outboard);
        // Nothing is left behind in the spool directory.
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn large_blobs_are_served_before_they_are_hashed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let service = local_service(dir.path());
        let (data, digest, _) = large(&service, (5 << 20) + 12345);
        let reader = service.open(&digest).unwrap().unwrap();
        assert_eq!(reader.size(), data.len() as u64);
        // Right at any offset and alignment, whether the pass has finished or not.
        for (offset, len) in [(0, 4096), (1, 1), (16383, 2), (3 << 20, 200_000)] {
            let mut buf = vec![0u8; len];
            assert_eq!(reader.read_at(&mut buf, offset as u64).unwrap(), len);
            assert!(buf == data[offset..offset + len]);
        }
        // Guest-chosen offsets and sizes: past the end reads nothing, a huge buffer is
        // cut at the end, and nothing panics.
        let end = data.len() as u64;
        let mut buf = vec![0u8; 3 << 20];
        assert_eq!(reader.read_at(&mut buf, end).unwrap(), 0);
        assert_eq!(reader.read_at(&mut buf, u64::MAX).unwrap(), 0);
        assert_eq!(reader.read_at(&mut buf, end - 10).unwrap(), 10);
        assert_eq!(&buf[..10], &data[data.len() - 10..]);
        assert!(read_all(&*reader, 100_000).unwrap() == data);

        // The pass ends: the file is handed out, and a second open knows it is good.
        wait_until_verified(&*reader);
        assert!(read_all(&*reader, 1 << 20).unwrap() == data);
        let again = service.open(&digest).unwrap().unwrap();
        assert!(again.local_file().is_some());
    }

    #[test]
    fn a_flipped_byte_fails_its_range_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let service = local_service(dir.path());
        let (data, digest, path) = large(&service, 4 << 20);
        let flipped = (3 << 20) + 777;
        let mut bad = data.clone();
        bad[flipped] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();

        let reader = service.open(&digest).unwrap().unwrap();
        let mut buf = vec![0u8; 4096];
        // Before the damage: served.
        assert_eq!(reader.read_at(&mut buf, 0).unwrap(), 4096);
        assert!(buf == data[..4096]);
        assert_eq!(reader.read_at(&mut buf, 1 << 20).unwrap(), 4096);
        // The damaged range: an error, whatever the pass has found by then.
        assert!(reader.read_at(&mut buf, flipped as u64 - 100).is_err());
        assert!(read_all(&*reader, 1 << 20).is_err());
        // The pass found it corrupt: the file is never handed out, ranges stay checked.
        let mut tiny = [0u8; 1];
        assert!(reader.read_at(&mut tiny, flipped as u64).is_err());
        assert!(reader.local_file().is_none());
        assert_eq!(reader.read_at(&mut buf, 8192).unwrap(), 4096);
        assert!(buf == data[8192..8192 + 4096]);
        // After the damage: served.
        assert_eq!(reader.read_at(&mut buf, (4 << 20) - 4096).unwrap(), 4096);
        assert!(buf == data[data.len() - 4096..]);
    }

    #[test]
    fn a_large_blob_without_outboard_is_hashed_whole_first() {
        let dir = tempfile::tempdir().unwrap();
        let service = local_service(dir.path());
        let (data, digest, path) = large(&service, 3 << 20);
        let outboard = std::fs::read(outboard_path(&path)).unwrap();
        std::fs::remove_file(outboard_path(&path)).unwrap();

        // A fresh service, as a new process would open it.
        let service = local_service(dir.path());
        let reader = service.open(&digest).unwrap().unwrap();
        assert!(reader.local_file().is_some());
        assert!(read_all(&*reader, 65536).unwrap() == data);
        // ... and the pass left the outboard for the next process.
        assert_eq!(std::fs::read(outboard_path(&path)).unwrap(), outboard);

        // Corrupt and without outboard: the open fails, as for a small blob.
        let mut bad = data.clone();
        bad[12345] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        std::fs::remove_file(outboard_path(&path)).unwrap();
        let service = local_service(dir.path());
        match service.open(&digest) {
            Err(BlobError::Corrupt { digest: d, .. }) => assert_eq!(d, digest),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("corrupt blob was served"),
        }
        assert!(!outboard_path(&path).exists());
    }

    #[test]
    fn a_truncated_large_blob_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let service = local_service(dir.path());
        let (data, digest, path) = large(&service, 3 << 20);
        std::fs::write(&path, &data[..data.len() - 1000]).unwrap();
        // Its outboard describes another size, so the blob is hashed whole, and fails.
        let service = local_service(dir.path());
        assert!(matches!(
            service.open(&digest),
            Err(BlobError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_wrong_outboard_costs_time_not_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let service = local_service(dir.path());
        let (data, digest, path) = large(&service, 3 << 20);
        let outboard = std::fs::read(outboard_path(&path)).unwrap();
        // Another blob's outboard, of the same size: its root is not this digest.
        let other: Vec<u8> = data.iter().map(|b| b ^ 0x55).collect();
        let other_path = service.inner.local_path(&put(&service, &other)).unwrap();
        let other_outboard = std::fs::read(outboard_path(&other_path)).unwrap();
        std::fs::write(outboard_path(&path), &other_outboard).unwrap();

        let service = local_service(dir.path());
        let reader = service.open(&digest).unwrap().unwrap();
        // The check fails, the whole blob's hash shows the bytes are right: served.
        let mut buf = vec![0u8; 4096];
        assert_eq!(reader.read_at(&mut buf, 4096).unwrap(), 4096);
        assert!(buf == data[4096..8192]);
        // ... and the pass put the right outboard in its place.
        wait_until_verified(&*reader);
        assert_eq!(std::fs::read(outboard_path(&path)).unwrap(), outboard);

        // With the bytes damaged as well: an error, never the bytes.
        let mut bad = data.clone();
        bad[4096] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        std::fs::write(outboard_path(&path), &other_outboard).unwrap();
        let service = local_service(dir.path());
        let reader = service.open(&digest).unwrap().unwrap();
        assert!(reader.read_at(&mut buf, 0).is_err());
        assert!(reader.read_at(&mut buf, 1 << 20).is_err());
        assert!(reader.local_file().is_none());
    }
}
