//! Blobs: file contents addressed by their BLAKE3 digest.
//!
//! Blob bytes are kept whole and uncompressed, so a reader can serve any offset with one
//! positioned read, and a local blob is a plain file the VMM can read or map directly.
//! Every blob is checked against its digest before its first byte is handed out.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use thiserror::Error;

use crate::digest::B3Digest;
use crate::kv::fanned_out_path;
use crate::runtime::block_on;

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

/// Random access to the bytes of one verified blob.
pub trait BlobReader: Send + Sync {
    /// Length of the blob, in bytes.
    fn size(&self) -> u64;
    /// Read at `offset`; a short count only at the end of the blob.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The local file that holds exactly this blob's bytes, when there is one: lets the VMM
    /// move data between the file and guest memory without a buffer of its own.
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

    fn open_local(
        &self,
        digest: &B3Digest,
        path: &Path,
    ) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        let io_err = |source| BlobError::Io {
            digest: *digest,
            source,
        };
        let mut file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(e)),
        };
        let meta = file.metadata().map_err(io_err)?;
        let identity = FileIdentity::of(&meta);
        let known_good = self
            .verified
            .lock()
            .expect("verified set poisoned")
            .get(digest)
            == Some(&identity);
        if !known_good {
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; VERIFY_CHUNK];
            loop {
                let n = file.read(&mut buf).map_err(io_err)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            let actual = B3Digest::from(hasher.finalize());
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
            file.rewind().map_err(io_err)?;
        }
        Ok(Some(Arc::new(LocalBlobReader {
            file,
            size: meta.size(),
        })))
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

    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        Ok(Box::new(ObjectStoreBlobWriter {
            blobs: self.inner.clone(),
            hasher: blake3::Hasher::new(),
            buffer: Vec::new(),
            spool: None,
        }))
    }
}

struct LocalBlobReader {
    file: File,
    size: u64,
}

impl BlobReader for LocalBlobReader {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let want = buf.len().min(
            self.size
                .saturating_sub(offset)
                .try_into()
                .unwrap_or(usize::MAX),
        );
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

struct ObjectStoreBlobWriter {
    blobs: Arc<ObjectStoreBlobs>,
    hasher: blake3::Hasher,
    buffer: Vec<u8>,
    /// Set once the blob outgrows `IN_MEMORY_WRITE_LIMIT`.
    spool: Option<(tempfile::NamedTempFile, PathBuf)>,
}

impl ObjectStoreBlobWriter {
    /// Spool next to the objects for a local store, so the final step is an atomic rename.
    fn spool_dir(&self) -> PathBuf {
        match &self.blobs.local_root {
            Some(root) => root.join("tmp"),
            None => std::env::temp_dir(),
        }
    }
}

impl Write for ObjectStoreBlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.hasher.update(buf);
        if self.spool.is_none() && self.buffer.len() + buf.len() > IN_MEMORY_WRITE_LIMIT {
            let dir = self.spool_dir();
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
        let digest = B3Digest::from(self.hasher.finalize());
        let blobs = &self.blobs;
        let object = fanned_out_path(digest.as_bytes());
        if let Some(final_path) = blobs.local_path(&digest) {
            // A local store skips the object-store API: write (or keep) the file, then one
            // atomic rename. Content-addressed, so an existing file is already right.
            if final_path.is_file() {
                return Ok(digest);
            }
            let spool_err = |dir: &Path| {
                let dir = dir.to_owned();
                move |source| BlobError::Spool { dir, source }
            };
            let parent = final_path.parent().expect("blob paths have a parent");
            let file = match self.spool {
                Some((file, _)) => file,
                None => {
                    let dir = self.spool_dir();
                    std::fs::create_dir_all(&dir).map_err(spool_err(&dir))?;
                    let mut file =
                        tempfile::NamedTempFile::new_in(&dir).map_err(spool_err(&dir))?;
                    file.write_all(&self.buffer).map_err(spool_err(&dir))?;
                    file
                }
            };
            // The fan-out directory usually exists; create it only when the rename says not.
            if let Err(e) = file.persist(&final_path) {
                if e.error.kind() != io::ErrorKind::NotFound {
                    return Err(spool_err(parent)(e.error));
                }
                std::fs::create_dir_all(parent).map_err(spool_err(parent))?;
                e.file
                    .persist(&final_path)
                    .map_err(|e| spool_err(parent)(e.error))?;
            }
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
}
