//! Small key-value backends that hold directories and path info: memory, redb, object_store.
//!
//! Directories and path info are small values looked up by digest, so one key-value trait
//! serves both; the typed services on top verify and validate what comes back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path as ObjectPath};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use thiserror::Error;

use crate::runtime::block_on;

/// Why a key-value backend (of the directory or path-info service) failed.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum KvError {
    /// The redb database failed.
    #[error("redb database {path}: {source}")]
    Redb {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    /// Another process has the redb file open.
    #[error("redb database {0} is in use by another process (redb allows one process at a time)")]
    RedbLocked(PathBuf),
    /// The object store failed.
    #[error("object store {url}: {source}")]
    ObjectStore {
        url: String,
        source: Box<object_store::Error>,
    },
}

/// A small key-value map: directories by digest, path info by store path digest.
pub trait Kv: Send + Sync {
    /// The value under `key`, if any.
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, KvError>;
    /// Store `value` under `key`, atomically: a reader sees the old state or the new one.
    fn put(&self, key: &[u8], value: Bytes) -> Result<(), KvError>;
    /// Whether there is a value under `key`.
    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        Ok(self.get(key)?.is_some())
    }
    /// Every key.
    fn keys(&self) -> Result<Vec<Vec<u8>>, KvError>;
}

#[derive(Default)]
/// A map in this process (`memory://`).
pub struct MemoryKv {
    map: RwLock<BTreeMap<Vec<u8>, Bytes>>,
}

impl Kv for MemoryKv {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, KvError> {
        Ok(self.map.read().expect("kv lock poisoned").get(key).cloned())
    }
    fn put(&self, key: &[u8], value: Bytes) -> Result<(), KvError> {
        self.map
            .write()
            .expect("kv lock poisoned")
            .insert(key.to_vec(), value);
        Ok(())
    }
    fn keys(&self) -> Result<Vec<Vec<u8>>, KvError> {
        Ok(self
            .map
            .read()
            .expect("kv lock poisoned")
            .keys()
            .cloned()
            .collect())
    }
}

/// One table of a redb database file.
pub struct RedbKv {
    db: Arc<redb::Database>,
    path: PathBuf,
    table: TableDefinition<'static, &'static [u8], &'static [u8]>,
}

impl RedbKv {
    /// Open (or create) `path` and use `table` in it. Several services may name the same
    /// file: redb allows one open handle per file, so handles are shared within the process.
    pub fn open(path: &Path, table: &'static str) -> Result<Self, KvError> {
        static OPEN: Mutex<Vec<(PathBuf, Weak<redb::Database>)>> = Mutex::new(Vec::new());
        let mut open = OPEN.lock().expect("redb registry poisoned");
        open.retain(|(_, db)| db.strong_count() > 0);
        let existing = open
            .iter()
            .find(|(p, _)| p == path)
            .and_then(|(_, db)| db.upgrade());
        let db = match existing {
            Some(db) => db,
            None => {
                let db = redb::Database::create(path).map_err(|e| match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => {
                        KvError::RedbLocked(path.to_owned())
                    }
                    e => KvError::Redb {
                        path: path.to_owned(),
                        source: Box::new(e.into()),
                    },
                })?;
                let db = Arc::new(db);
                open.push((path.to_owned(), Arc::downgrade(&db)));
                db
            }
        };
        let kv = Self {
            db,
            path: path.to_owned(),
            table: TableDefinition::new(table),
        };
        // Create the table up front so that reads of a fresh database find it.
        kv.write(|_| Ok(()))?;
        Ok(kv)
    }

    fn err(&self, e: impl Into<redb::Error>) -> KvError {
        KvError::Redb {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<&[u8], &[u8]>) -> Result<(), redb::Error>,
    ) -> Result<(), KvError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(self.table).map_err(|e| self.err(e))?;
            f(&mut table).map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }
}

impl Kv for RedbKv {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, KvError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(self.table).map_err(|e| self.err(e))?;
        let value = table.get(key).map_err(|e| self.err(e))?;
        Ok(value.map(|v| Bytes::copy_from_slice(v.value())))
    }
    fn put(&self, key: &[u8], value: Bytes) -> Result<(), KvError> {
        self.write(|table| {
            table.insert(key, value.as_ref())?;
            Ok(())
        })
    }
    fn keys(&self) -> Result<Vec<Vec<u8>>, KvError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(self.table).map_err(|e| self.err(e))?;
        let mut keys = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            keys.push(entry.map_err(|e| self.err(e))?.0.value().to_vec());
        }
        Ok(keys)
    }
}

/// Values as objects named `<hex key[..2]>/<hex key>` in an object store.
pub struct ObjectStoreKv {
    store: Arc<dyn ObjectStore>,
    url: String,
}

impl ObjectStoreKv {
    /// Values as objects in `store`, which `url` names in errors.
    pub fn new(store: Arc<dyn ObjectStore>, url: &str) -> Self {
        Self {
            store,
            url: url.to_owned(),
        }
    }

    fn err(&self, e: object_store::Error) -> KvError {
        KvError::ObjectStore {
            url: self.url.clone(),
            source: Box::new(e),
        }
    }
}

/// The object name for `key`, fanned out over 256 prefixes so no listing gets huge.
pub fn fanned_out_path(key: &[u8]) -> ObjectPath {
    let hex = data_encoding::HEXLOWER.encode(key);
    ObjectPath::from(format!("{}/{hex}", &hex[..2.min(hex.len())]))
}

impl Kv for ObjectStoreKv {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, KvError> {
        let path = fanned_out_path(key);
        let result = block_on(async {
            match self.store.get(&path).await {
                Ok(got) => got.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        result.map_err(|e| self.err(e))
    }
    fn put(&self, key: &[u8], value: Bytes) -> Result<(), KvError> {
        let path = fanned_out_path(key);
        block_on(self.store.put(&path, PutPayload::from_bytes(value))).map_err(|e| self.err(e))?;
        Ok(())
    }
    fn contains(&self, key: &[u8]) -> Result<bool, KvError> {
        let path = fanned_out_path(key);
        match block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }
    fn keys(&self) -> Result<Vec<Vec<u8>>, KvError> {
        let objects: Vec<_> =
            block_on(self.store.list(None).try_collect()).map_err(|e| self.err(e))?;
        // Anything that is not a hex name (a backend's staging file) is not a value.
        Ok(objects
            .iter()
            .filter_map(|meta| meta.location.filename())
            .filter_map(|name| data_encoding::HEXLOWER.decode(name.as_bytes()).ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(kv: &dyn Kv) {
        assert_eq!(kv.get(b"k1").unwrap(), None);
        assert!(!kv.contains(b"k1").unwrap());
        kv.put(b"k1", Bytes::from_static(b"v1")).unwrap();
        kv.put(b"k2", Bytes::from_static(b"v2")).unwrap();
        assert_eq!(kv.get(b"k1").unwrap().as_deref(), Some(&b"v1"[..]));
        assert!(kv.contains(b"k2").unwrap());
        let mut keys = kv.keys().unwrap();
        keys.sort();
        assert_eq!(keys, vec![b"k1".to_vec(), b"k2".to_vec()]);
    }

    #[test]
    fn memory() {
        exercise(&MemoryKv::default());
    }

    #[test]
    fn redb_shares_handles_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let a = RedbKv::open(&path, "a").unwrap();
            let b = RedbKv::open(&path, "b").unwrap();
            exercise(&a);
            assert_eq!(b.get(b"k1").unwrap(), None);
        }
        let a = RedbKv::open(&path, "a").unwrap();
        assert_eq!(a.get(b"k2").unwrap().as_deref(), Some(&b"v2"[..]));
    }

    #[test]
    fn object_store_local_and_memory() {
        let dir = tempfile::tempdir().unwrap();
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        exercise(&ObjectStoreKv::new(Arc::new(local), "test"));
        exercise(&ObjectStoreKv::new(
            Arc::new(object_store::memory::InMemory::new()),
            "test",
        ));
    }
}
