//! The store: blob, directory and path-info services opened from addresses, and the
//! operations that span them.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use thiserror::Error;
use tvix_boot_castore::root_nodes::{RootNodes, RootNodesError};

use tvix_boot_castore::grpc::client::{GrpcBlobService, GrpcDirectoryService};
use tvix_boot_castore::grpc::{GrpcAddress, GrpcAddressError};

use crate::blobservice::{BlobError, BlobService, MemoryBlobService, ObjectStoreBlobService};
use crate::castore::Node;
use crate::directoryservice::{DirectoryError, DirectoryService, KvDirectoryService};
use crate::grpc::GrpcPathInfoService;
use crate::kv::{Kv, KvError, MemoryKv, ObjectStoreKv, RedbKv};
use crate::nar::{IngestedNar, NarError, ingest_nar, render_nar};
use crate::pathinfo::{IndexedNar, KvPathInfoService, PathInfo, PathInfoError, PathInfoService};
use crate::store_path::StorePath;
use crate::substituter::SubstitutingPathInfoService;

/// The environment variable with the blob service's address (as tvix names it).
pub const BLOB_SERVICE_ADDR_ENV: &str = "BLOB_SERVICE_ADDR";
/// The environment variable with the directory service's address.
pub const DIRECTORY_SERVICE_ADDR_ENV: &str = "DIRECTORY_SERVICE_ADDR";
/// The environment variable with the path-info service's address.
pub const PATH_INFO_SERVICE_ADDR_ENV: &str = "PATH_INFO_SERVICE_ADDR";

/// Why a store could not be opened, or an operation on it failed.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum StoreError {
    /// An address that does not parse, has an unknown scheme, or a scheme the service
    /// cannot use.
    #[error("invalid {service} service address {url:?}: {reason}")]
    BadAddress {
        service: &'static str,
        url: String,
        reason: String,
    },
    /// Neither XDG_DATA_HOME nor HOME is set, so the embedded store has no place.
    #[error("cannot find a data directory for the embedded store: set XDG_DATA_HOME or HOME")]
    NoDataDir,
    /// A directory for a file-based service could not be created.
    #[error("cannot create store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Content a path info (or a lookup on the way) refers to is not in the store.
    #[error("{path} refers to {what}, which is not in the store")]
    Incomplete { path: StorePath, what: String },
    /// The blob service failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The directory service failed.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    /// The path-info service failed.
    #[error(transparent)]
    PathInfo(#[from] PathInfoError),
    /// A NAR could not be ingested or rendered.
    #[error(transparent)]
    Nar(#[from] NarError),
    /// A key-value backend could not be opened (a redb file another process has open).
    #[error(transparent)]
    Backend(#[from] KvError),
    /// `syncfs` on one of the store's directories failed.
    #[error("cannot flush the store's files under {path} to disk: {source}")]
    Sync {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The answer of [`Store::lookup`]. Sub-paths (`at`, `found`) are relative to the store
/// path, with a leading '/', and empty for the store path itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The path names this node.
    Found(Node),
    /// The store has no path info for the store path.
    NoStorePath,
    /// `found` exists and is a directory, but has no entry `name`.
    Missing {
        /// The deepest directory found.
        found: String,
        /// The component it lacks.
        name: String,
    },
    /// `at` is a file, yet the path goes on below it.
    NotADirectory {
        /// The file.
        at: String,
    },
    /// `at` is a symlink and the path goes on below it.
    Symlink {
        /// The symlink.
        at: String,
    },
}

/// Where the three services live, as URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreAddrs {
    /// The blob service: `memory://`, `objectstore+file:///abs/path` or
    /// `objectstore+memory://`.
    pub blob: String,
    /// The directory service: as for blobs, or `redb:///abs/path`.
    pub directory: String,
    /// The path-info service: as for directories, or a binary cache to substitute from
    /// (`nix+https://host/path?trusted-public-keys=…`, see [`crate::substituter`]).
    pub path_info: String,
}

impl StoreAddrs {
    /// The embedded persistent store under the user's data directory. Every part is a
    /// directory of files written by atomic rename, so several tvix-boot processes (a VM and
    /// an import, say) can use it at once, with no daemon.
    pub fn embedded() -> Result<Self, StoreError> {
        let data_home = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".local/share"))
            })
            .ok_or(StoreError::NoDataDir)?;
        Ok(Self::in_directory(&data_home.join("tvix-boot")))
    }

    /// A file-based store in `root`.
    pub fn in_directory(root: &Path) -> Self {
        let url = |part: &str| format!("objectstore+file://{}", root.join(part).display());
        Self {
            blob: url("blobs"),
            directory: url("directories"),
            path_info: url("pathinfo"),
        }
    }

    /// Every service in memory: each [`Store::open`] of it is a new, empty store that
    /// lives as long as the `Store`.
    pub fn memory() -> Self {
        Self {
            blob: "memory://".into(),
            directory: "memory://".into(),
            path_info: "memory://".into(),
        }
    }
}

/// One store: its three services, and the operations that span them. Every method takes
/// `&self`; share it between threads as an `Arc<Store>`. The API is synchronous, also for
/// the backends that are async inside (they run on the store's own I/O threads).
pub struct Store {
    /// File contents, by BLAKE3 digest.
    pub blobs: Arc<dyn BlobService>,
    /// Directories, by the BLAKE3 digest of their encoding.
    pub directories: Arc<dyn DirectoryService>,
    /// Path info, by store path digest, and the NAR index of the binary-cache server.
    pub path_infos: Arc<dyn PathInfoService>,
    /// Directories whose files hold this store (objectstore+file services): what
    /// [`Store::sync`] flushes to disk. redb commits durably by itself.
    local_dirs: Vec<PathBuf>,
}

enum Backend {
    /// A remote store's service over gRPC (`grpc+unix://`, `grpc+http(s)://`).
    Grpc(GrpcAddress),
    /// Lives as long as the service that opened it: each `memory://` is a fresh store.
    Memory,
    LocalObjectStore(PathBuf),
    MemoryObjectStore,
    Redb(PathBuf),
}

fn parse_address(service: &'static str, url: &str) -> Result<Backend, StoreError> {
    let bad = |reason: &str| StoreError::BadAddress {
        service,
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    let absolute_path = || {
        if parsed.host_str().is_some_and(|h| !h.is_empty()) {
            return Err(bad(
                "a file path needs three slashes, as in scheme:///abs/path",
            ));
        }
        let path = PathBuf::from(parsed.path());
        if !path.is_absolute() || parsed.path().len() <= 1 {
            return Err(bad("needs an absolute path, as in scheme:///abs/path"));
        }
        Ok(path)
    };
    match parsed.scheme() {
        scheme if scheme.starts_with("grpc+") => GrpcAddress::parse(url)
            .map(Backend::Grpc)
            .map_err(|e| bad(&e.to_string())),
        "memory" => Ok(Backend::Memory),
        "objectstore+file" => Ok(Backend::LocalObjectStore(absolute_path()?)),
        "objectstore+memory" => Ok(Backend::MemoryObjectStore),
        "redb" if service != "blob" => Ok(Backend::Redb(absolute_path()?)),
        "redb" => Err(bad("redb holds directories and path info, not blobs")),
        other => Err(bad(&format!(
            "unknown scheme {other:?}; supported: memory://, objectstore+file:///path, objectstore+memory://, grpc+unix:///path, grpc+http://host:port, grpc+https://host:port{}",
            if service == "blob" {
                ""
            } else {
                ", redb:///path"
            }
        ))),
    }
}

fn create_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::create_dir_all(path).map_err(|source| StoreError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

fn local_object_store(
    path: &Path,
    service: &'static str,
    url: &str,
) -> Result<Arc<object_store::local::LocalFileSystem>, StoreError> {
    create_dir(path)?;
    object_store::local::LocalFileSystem::new_with_prefix(path)
        .map(Arc::new)
        .map_err(|e| StoreError::BadAddress {
            service,
            url: url.to_owned(),
            reason: e.to_string(),
        })
}

fn grpc_err<'a>(
    service: &'static str,
    url: &'a str,
) -> impl Fn(GrpcAddressError) -> StoreError + 'a {
    move |e| StoreError::BadAddress {
        service,
        url: url.to_owned(),
        reason: e.to_string(),
    }
}

fn open_kv(
    service: &'static str,
    url: &str,
    redb_table: &'static str,
) -> Result<Arc<dyn Kv>, StoreError> {
    Ok(match parse_address(service, url)? {
        Backend::Grpc(_) => unreachable!("gRPC services are opened before key-value ones"),
        Backend::Memory => Arc::new(MemoryKv::default()),
        Backend::LocalObjectStore(path) => Arc::new(ObjectStoreKv::new(
            local_object_store(&path, service, url)?,
            url,
        )),
        Backend::MemoryObjectStore => Arc::new(ObjectStoreKv::new(
            Arc::new(object_store::memory::InMemory::new()),
            url,
        )),
        Backend::Redb(path) => {
            if let Some(parent) = path.parent() {
                create_dir(parent)?;
            }
            Arc::new(RedbKv::open(&path, redb_table)?)
        }
    })
}

fn open_blob_service(url: &str) -> Result<Arc<dyn BlobService>, StoreError> {
    Ok(match parse_address("blob", url)? {
        Backend::Grpc(address) => {
            Arc::new(GrpcBlobService::new(&address, url).map_err(grpc_err("blob", url))?)
        }
        Backend::Memory => Arc::new(MemoryBlobService::default()),
        Backend::LocalObjectStore(path) => {
            let store = local_object_store(&path, "blob", url)?;
            Arc::new(ObjectStoreBlobService::new(store, url, Some(path)))
        }
        Backend::MemoryObjectStore => Arc::new(ObjectStoreBlobService::new(
            Arc::new(object_store::memory::InMemory::new()),
            url,
            None,
        )),
        Backend::Redb(_) => unreachable!("parse_address refuses redb for blobs"),
    })
}

fn open_directory_service(url: &str) -> Result<Arc<dyn DirectoryService>, StoreError> {
    if let Backend::Grpc(address) = parse_address("directory", url)? {
        return Ok(Arc::new(
            GrpcDirectoryService::new(&address, url).map_err(grpc_err("directory", url))?,
        ));
    }
    Ok(Arc::new(KvDirectoryService::new(open_kv(
        "directory",
        url,
        "directories",
    )?)))
}

fn open_path_info_service(url: &str) -> Result<Arc<dyn PathInfoService>, StoreError> {
    if let Backend::Grpc(address) = parse_address("path info", url)? {
        return Ok(Arc::new(
            GrpcPathInfoService::new(&address, url).map_err(grpc_err("path info", url))?,
        ));
    }
    Ok(Arc::new(KvPathInfoService::new(open_kv(
        "path info",
        url,
        "pathinfo",
    )?)))
}

impl Store {
    /// Opens the services `addrs` names, creating the directories of file-based ones. With a
    /// `nix+…` path-info address, paths are substituted from that binary cache on first
    /// lookup, and their path info is kept in memory for this process.
    pub fn open(addrs: &StoreAddrs) -> Result<Self, StoreError> {
        let blobs = open_blob_service(&addrs.blob)?;
        let directories = open_directory_service(&addrs.directory)?;
        let path_infos: Arc<dyn PathInfoService> = if addrs.path_info.starts_with("nix+") {
            // Substituted paths are remembered for this process; their content lands in
            // the blob and directory services, which may well be persistent.
            let local = Arc::new(KvPathInfoService::new(Arc::new(MemoryKv::default())));
            Arc::new(
                SubstitutingPathInfoService::new(
                    &addrs.path_info,
                    local,
                    blobs.clone(),
                    directories.clone(),
                )
                .map_err(|e| StoreError::BadAddress {
                    service: "path info",
                    url: addrs.path_info.clone(),
                    reason: e.to_string(),
                })?,
            )
        } else {
            open_path_info_service(&addrs.path_info)?
        };
        let mut local_dirs = Vec::new();
        for (service, url) in [
            ("blob", &addrs.blob),
            ("directory", &addrs.directory),
            ("path info", &addrs.path_info),
        ] {
            if url.starts_with("nix+") {
                continue;
            }
            if let Backend::LocalObjectStore(path) = parse_address(service, url)? {
                local_dirs.push(path);
            }
        }
        Ok(Self {
            blobs,
            directories,
            path_infos,
            local_dirs,
        })
    }

    /// A fresh store that lives only in this process.
    pub fn memory() -> Self {
        Self {
            blobs: Arc::new(MemoryBlobService::default()),
            directories: Arc::new(KvDirectoryService::new(Arc::new(
                crate::kv::MemoryKv::default(),
            ))),
            path_infos: Arc::new(KvPathInfoService::new(Arc::new(
                crate::kv::MemoryKv::default(),
            ))),
            local_dirs: Vec::new(),
        }
    }

    /// This store with another blob service (a layer over the one it had, say).
    pub fn with_blobs(self, blobs: Arc<dyn BlobService>) -> Self {
        Self { blobs, ..self }
    }

    /// This store with another directory service.
    pub fn with_directories(self, directories: Arc<dyn DirectoryService>) -> Self {
        Self {
            directories,
            ..self
        }
    }

    /// Flushes everything written to the store's local files so far to disk: file data,
    /// and the renames that put files in place. One `syncfs` per file system (rather than
    /// an fsync per file) keeps this cheap when many small files were written.
    pub fn sync(&self) -> Result<(), StoreError> {
        // A remote directory service sends the trees put so far.
        self.directories.flush()?;
        let mut synced_devices = Vec::new();
        for dir in &self.local_dirs {
            let sync_err = |source| StoreError::Sync {
                path: dir.clone(),
                source,
            };
            let handle = std::fs::File::open(dir).map_err(sync_err)?;
            let device = std::os::unix::fs::MetadataExt::dev(&handle.metadata().map_err(sync_err)?);
            if synced_devices.contains(&device) {
                continue;
            }
            // SAFETY: syncfs only reads the descriptor, which `handle` keeps open.
            if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&handle)) } != 0 {
                return Err(sync_err(std::io::Error::last_os_error()));
            }
            synced_devices.push(device);
        }
        Ok(())
    }

    /// Record `info`, after checking that the content it points to is in the store (the
    /// directory service guarantees a stored directory's whole tree is present). Durable
    /// when this returns: the content reaches the disk before the path info that names
    /// it, and the path info before this returns, so a crash at any point leaves either no
    /// path or a complete one.
    pub fn put_path_info(&self, info: &PathInfo) -> Result<(), StoreError> {
        let present = match &info.node {
            Node::Directory { digest, .. } => self.directories.has(digest)?,
            Node::File { digest, .. } => self.blobs.has(digest)?,
            Node::Symlink { .. } => true,
        };
        if !present {
            return Err(StoreError::Incomplete {
                path: info.store_path.clone(),
                what: format!("{:?}", info.node),
            });
        }
        let nar = IndexedNar {
            node: info.node.clone(),
            nar_size: info.nar_size,
        };
        self.sync()?;
        self.path_infos.put_nar(&info.nar_sha256, &nar)?;
        self.path_infos.put(info)?;
        self.sync()
    }

    /// The path info of `path`, if the store has it (for that very path, not only for one
    /// with the same digest). May substitute it, with a `nix+…` path-info service.
    pub fn path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        Ok(self
            .path_infos
            .get(path.digest())?
            .filter(|info| info.store_path == *path))
    }

    /// What an absolute path such as `/nix/store/<hash>-hello/bin/hello` names in the
    /// store: the path info of its store path, then one directory per component.
    /// Only what the store holds is looked at; a symlink on the way ends the walk,
    /// since where it leads is for whoever follows it to decide.
    pub fn lookup(&self, path: &StorePath, sub_path: &str) -> Result<Lookup, StoreError> {
        let Some(info) = self.path_info(path)? else {
            return Ok(Lookup::NoStorePath);
        };
        let mut node = info.node;
        let mut walked = String::new();
        for component in sub_path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            let digest = match &node {
                Node::Directory { digest, .. } => *digest,
                Node::Symlink { .. } => return Ok(Lookup::Symlink { at: walked }),
                Node::File { .. } => return Ok(Lookup::NotADirectory { at: walked }),
            };
            let directory =
                self.directories
                    .get(&digest)?
                    .ok_or_else(|| StoreError::Incomplete {
                        path: path.clone(),
                        what: format!("directory {digest} at {walked:?}"),
                    })?;
            let Some(child) = directory.get(component.as_bytes()) else {
                return Ok(Lookup::Missing {
                    found: walked,
                    name: component.to_owned(),
                });
            };
            node = child.clone();
            walked.push('/');
            walked.push_str(component);
        }
        Ok(Lookup::Found(node))
    }

    /// Writes the NAR of `node` to `out`: the bytes `nix-store --dump` gives for the same
    /// tree. Fails if a blob or directory of the tree is missing or corrupt.
    pub fn write_nar(&self, node: &Node, out: impl Write) -> Result<(), StoreError> {
        Ok(render_nar(node, &*self.blobs, &*self.directories, out)?)
    }

    /// Ingest one NAR: blobs and directories are stored, no path info is written.
    pub fn ingest_nar(&self, input: impl Read) -> Result<IngestedNar, StoreError> {
        Ok(ingest_nar(input, &*self.blobs, &*self.directories)?)
    }
}

/// The store paths at the root of a /nix/store file system: a name is a node when it is a
/// store path the store has path info for.
impl RootNodes for Store {
    fn get(&self, name: &[u8]) -> Result<Option<Node>, RootNodesError> {
        let Ok(path) = StorePath::from_basename_bytes(name) else {
            return Ok(None);
        };
        Ok(self
            .path_info(&path)
            .map_err(|e| RootNodesError(Box::new(e)))?
            .map(|info| info.node))
    }

    fn list(&self) -> Result<Vec<(Bytes, Node)>, RootNodesError> {
        Ok(self
            .path_infos
            .list()
            .map_err(|e| RootNodesError(Box::new(e)))?
            .into_iter()
            .map(|info| (Bytes::from(info.store_path.to_basename()), info.node))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_flushes_local_stores_and_names_what_it_could_not() {
        assert!(Store::memory().sync().is_ok());
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreAddrs::in_directory(dir.path())).unwrap();
        assert_eq!(store.local_dirs.len(), 3);
        store.sync().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::remove_dir_all(&blobs).unwrap();
        match store.sync() {
            Err(StoreError::Sync { path, .. }) => assert_eq!(path, blobs),
            other => panic!(
                "expected a sync error naming {}: {other:?}",
                blobs.display()
            ),
        }
    }

    #[test]
    fn addresses() {
        for (url, ok) in [
            ("memory://", true),
            ("objectstore+file:///tmp/x", true),
            ("objectstore+file://tmp/x", false),
            ("objectstore+file://", false),
            ("objectstore+memory://", true),
            ("redb:///tmp/x.redb", true),
            ("s4://bucket", false),
            ("not a url", false),
        ] {
            assert_eq!(parse_address("directory", url).is_ok(), ok, "{url}");
        }
        assert!(parse_address("blob", "redb:///tmp/x").is_err());
        let err = open_blob_service("bogus://x").err().unwrap().to_string();
        assert!(err.contains("bogus://x") && err.contains("blob"), "{err}");
    }

    #[test]
    fn lookup_walks_directories_and_stops_at_symlinks() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path().join("demo");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/hello"), b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("bin", root.join("link")).unwrap();
        let store = Store::memory();
        let info = crate::import::import_path(&store, &root, &mut |_| {}).unwrap();
        let path = &info.store_path;

        assert!(matches!(
            store.lookup(path, ""),
            Ok(Lookup::Found(Node::Directory { .. }))
        ));
        assert!(matches!(
            store.lookup(path, "/bin/hello"),
            Ok(Lookup::Found(Node::File { .. }))
        ));
        assert!(matches!(
            store.lookup(path, "/bin/./hello/"),
            Ok(Lookup::Found(_))
        ));
        assert_eq!(
            store.lookup(path, "/bin/hellp").unwrap(),
            Lookup::Missing {
                found: "/bin".into(),
                name: "hellp".into()
            }
        );
        assert_eq!(
            store.lookup(path, "/bin/hello/x").unwrap(),
            Lookup::NotADirectory {
                at: "/bin/hello".into()
            }
        );
        assert_eq!(
            store.lookup(path, "/link/hello").unwrap(),
            Lookup::Symlink { at: "/link".into() }
        );
        let other = StorePath::new([7; 20], "demo").unwrap();
        assert_eq!(store.lookup(&other, "/bin").unwrap(), Lookup::NoStorePath);
    }
}
