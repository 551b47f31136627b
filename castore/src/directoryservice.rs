//! Directories, addressed by the BLAKE3 digest of their protobuf encoding.

use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;

use crate::digest::B3Digest;
use crate::directory::{Directory, ValidateError};
use crate::kv::{Kv, KvError};

/// Why a directory could not be read or stored.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum DirectoryError {
    /// The stored bytes do not hash to the digest they are stored under.
    #[error("directory {digest} is corrupt: its bytes hash to {actual}")]
    Corrupt { digest: B3Digest, actual: B3Digest },
    /// The stored bytes break the castore's rules.
    #[error("directory {digest} is invalid: {source}")]
    Invalid {
        digest: B3Digest,
        source: ValidateError,
    },
    /// A directory put before one of its child directories.
    #[error("directory {digest} refers to child directory {child}, which is not in the store")]
    MissingChild { digest: B3Digest, child: B3Digest },
    /// A remote directory service failed, or sent what it must not.
    #[error("directory {digest} from {url}: {source}")]
    Remote {
        digest: B3Digest,
        url: String,
        source: std::io::Error,
    },
    /// A remote service answered a Get of `root` with a directory that is not part of the
    /// tree below it.
    #[error(
        "asked for directory {root}, the server sent directory {digest}, which is not in its tree"
    )]
    Unexpected { root: B3Digest, digest: B3Digest },
    /// The key-value backend failed.
    #[error(transparent)]
    Backend(#[from] KvError),
}

/// Directories by digest. What a service returns was checked against the digest asked for.
pub trait DirectoryService: Send + Sync {
    /// `None` when absent; an error when present but corrupt or invalid.
    fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError>;
    /// Whether the directory is stored (its bytes are not checked).
    fn has(&self, digest: &B3Digest) -> Result<bool, DirectoryError>;
    /// Store a directory whose child directories are already stored (so a stored
    /// directory's whole tree is always present: put leaves first).
    fn put(&self, directory: &Directory) -> Result<B3Digest, DirectoryError>;
    /// Makes every directory put so far stored: a service that sends trees whole (a remote
    /// one) sends them now. The store calls this before it writes path info.
    fn flush(&self) -> Result<(), DirectoryError> {
        Ok(())
    }
}

/// Directories in any key-value backend, keyed by digest.
pub struct KvDirectoryService {
    kv: Arc<dyn Kv>,
}

impl KvDirectoryService {
    /// Directories kept in `kv`.
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        Self { kv }
    }
}

impl DirectoryService for KvDirectoryService {
    fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        let Some(bytes) = self.kv.get(digest.as_bytes())? else {
            return Ok(None);
        };
        let actual = B3Digest::of(&bytes);
        if actual != *digest {
            return Err(DirectoryError::Corrupt {
                digest: *digest,
                actual,
            });
        }
        Directory::decode(&bytes)
            .map(Some)
            .map_err(|source| DirectoryError::Invalid {
                digest: *digest,
                source,
            })
    }

    fn has(&self, digest: &B3Digest) -> Result<bool, DirectoryError> {
        Ok(self.kv.contains(digest.as_bytes())?)
    }

    fn put(&self, directory: &Directory) -> Result<B3Digest, DirectoryError> {
        let bytes = directory.encode();
        let digest = B3Digest::of(&bytes);
        for (_, child) in directory.child_directories() {
            if !self.has(child)? {
                return Err(DirectoryError::MissingChild {
                    digest,
                    child: *child,
                });
            }
        }
        self.kv.put(digest.as_bytes(), Bytes::from(bytes))?;
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{Node, PathComponent};
    use crate::kv::MemoryKv;

    #[test]
    fn put_get_and_closure_rule() {
        let kv = Arc::new(MemoryKv::default());
        let service = KvDirectoryService::new(kv.clone());
        let leaf = Directory::new();
        let mut parent = Directory::new();
        let name = PathComponent::try_from(&b"leaf"[..]).unwrap();
        parent
            .add(
                name,
                Node::Directory {
                    digest: leaf.digest(),
                    size: 0,
                },
            )
            .unwrap();

        assert!(matches!(
            service.put(&parent),
            Err(DirectoryError::MissingChild { .. })
        ));
        assert_eq!(service.put(&leaf).unwrap(), leaf.digest());
        let digest = service.put(&parent).unwrap();
        assert_eq!(service.get(&digest).unwrap(), Some(parent));
        assert_eq!(service.get(&B3Digest::of(b"nothing")).unwrap(), None);

        // Bytes that do not hash to their key are refused, never decoded.
        kv.put(digest.as_bytes(), Bytes::from_static(b"garbage"))
            .unwrap();
        assert!(matches!(
            service.get(&digest),
            Err(DirectoryError::Corrupt { .. })
        ));
    }
}
