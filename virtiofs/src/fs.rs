//! `StoreFs`: the store as a read-only FUSE file system.
//!
//! Store paths appear at the root, looked up lazily through the path-info service; a
//! directory's entries are fetched on first use. Inodes are shared by equal content (same
//! directory digest, same blob and mode, same symlink target), which is safe because nothing
//! ever changes: the store is immutable, so caches and timeouts are long.
//!
//! The kernel counts the inodes it was handed (each LOOKUP reply and READDIRPLUS entry) and
//! gives them back with FORGET; an inode it no longer holds is dropped, with its directory
//! listing, so the table follows what the guest has cached, not everything it ever saw.
//! Inode numbers as the guest sees them (`st_ino`) come from the content, not from the
//! table, so they stay the same when an inode is forgotten and looked up again.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fuse_backend_rs::abi::fuse_abi::{CreateIn, stat64, statvfs64};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions,
    SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use lru::LruCache;
use tvix_boot_castore::blobservice::{BlobReader, BlobService};
use tvix_boot_castore::directoryservice::DirectoryService;
use tvix_boot_castore::{B3Digest, Node, RootNodes};

use crate::blob_source::BlobSource;

/// The inode of the mount's root, /nix/store itself.
pub(crate) const ROOT_INODE: u64 = fuse_backend_rs::api::filesystem::ROOT_ID;
/// The store never changes under a mount, so the kernel may cache names and attributes for
/// as long as it likes.
const CACHE_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// What Nix gives every store file, so tools that look at timestamps see what they expect.
const MTIME: i64 = 1;
const BLOCK_SIZE: i64 = 4096;
const XATTR_DIRECTORY_DIGEST: &[u8] = b"user.tvix.castore.directory.digest";
const XATTR_BLOB_DIGEST: &[u8] = b"user.tvix.castore.blob.digest";

/// File handles a guest may hold open at once; past that OPEN fails with ENFILE, as when
/// a system's file table is full. Bounds the VMM's memory, not its descriptors (below).
pub const MAX_OPEN_FILES: usize = 1 << 18;
/// Directory handles a guest may hold open at once (each pins a listing); ENFILE past it.
pub const MAX_OPEN_DIRS: usize = 16_384;
/// Open blobs kept for reading, shared by every handle of the same blob: a local blob holds
/// one host descriptor, so the VMM's descriptors follow this number, not the guest's opens.
/// A handle whose blob was dropped from the cache reopens it on its next read.
pub const OPEN_BLOBS: usize = 512;
/// How long a name that is not in the store stays known as missing: lookups of it within
/// that time neither ask the path-info service nor a binary cache behind it again.
pub const MISSING_PATH_TTL: Duration = Duration::from_secs(30);
/// Missing names remembered at once (least recently looked up forgotten first).
const MISSING_PATHS: usize = 4096;

/// What a [`StoreFs`] shows beyond the store paths themselves; by default, nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct StoreFsOptions {
    /// Allow listing /nix/store itself (else readdir of the root fails with EPERM).
    pub list_root: bool,
    /// Expose the castore digests as `user.tvix.castore.*` extended attributes.
    pub show_xattr: bool,
}

/// What a [`StoreFs`] serves: the castore's blobs and directories, and the nodes at its
/// root by name (for /nix/store: store paths, which the Nix layer looks up in path info).
#[derive(Clone)]
pub struct FsStore {
    /// File contents.
    pub blobs: Arc<dyn BlobService>,
    /// Directories.
    pub directories: Arc<dyn DirectoryService>,
    /// The names at the root.
    pub root_nodes: Arc<dyn RootNodes>,
}

/// An entry of a directory, as the file system hands it out.
#[derive(Clone, Debug)]
struct Child {
    name: Bytes,
    node: Node,
}

/// What an inode stands for: the store root, or a castore node. A directory's entries are
/// filled in on first use.
#[derive(Debug)]
enum InodeKind {
    Root,
    Node {
        node: Node,
        children: OnceLock<Arc<[Child]>>,
    },
}

/// Content that makes two inodes interchangeable.
#[derive(Clone, PartialEq, Eq, Hash)]
enum ContentKey {
    Directory(B3Digest),
    File(B3Digest, bool),
    Symlink(Bytes),
}

impl ContentKey {
    fn of(node: &Node) -> Self {
        match node {
            Node::Directory { digest, .. } => ContentKey::Directory(*digest),
            Node::File {
                digest, executable, ..
            } => ContentKey::File(*digest, *executable),
            Node::Symlink { target } => ContentKey::Symlink(target.clone()),
        }
    }

    /// The guest-visible inode number of this content: the same for the same content across
    /// forget and lookup again, and 64 bits of BLAKE3, so two contents sharing one among
    /// a store's millions of entries is as unlikely as a hash collision. Never 0 or the root's.
    fn st_ino(&self) -> u64 {
        let (tag, bytes): (u8, &[u8]) = match self {
            ContentKey::Directory(digest) => (0, digest.as_bytes()),
            ContentKey::File(digest, false) => (1, digest.as_bytes()),
            ContentKey::File(digest, true) => (2, digest.as_bytes()),
            ContentKey::Symlink(target) => (3, target),
        };
        let mut hasher = blake3::Hasher::new();
        hasher.update(&[tag]);
        hasher.update(bytes);
        let hash = hasher.finalize();
        let ino = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
        ino.max(ROOT_INODE + 1)
    }
}

/// An inode the kernel holds, and how many times it was handed out and not yet forgotten.
struct InodeEntry {
    kind: Arc<InodeKind>,
    lookups: u64,
    /// Store-path basenames that resolved to this inode at the root.
    root_names: Vec<Bytes>,
}

struct InodeTable {
    /// Every inode but the root, by the number the kernel knows it by (its node id).
    inodes: HashMap<u64, InodeEntry>,
    by_content: HashMap<ContentKey, u64>,
    /// Store paths looked up at the root and not yet forgotten, by basename.
    root_entries: HashMap<Bytes, u64>,
    /// Node ids are never reused within a mount: a late request for a forgotten one fails
    /// rather than reaching some other file.
    next_inode: u64,
}

impl InodeTable {
    /// The inode for `node` (shared by equal content), counted as handed to the kernel.
    fn hand_out(&mut self, node: &Node) -> u64 {
        let key = ContentKey::of(node);
        if let Some(&inode) = self.by_content.get(&key) {
            self.inodes
                .get_mut(&inode)
                .expect("indexed inode exists")
                .lookups += 1;
            return inode;
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.inodes.insert(
            inode,
            InodeEntry {
                kind: Arc::new(InodeKind::Node {
                    node: node.clone(),
                    children: OnceLock::new(),
                }),
                lookups: 1,
                root_names: Vec::new(),
            },
        );
        self.by_content.insert(key, inode);
        inode
    }

    /// The kernel dropped `count` references to `inode`; at none left the inode goes.
    fn forget(&mut self, inode: u64, count: u64) {
        let Some(entry) = self.inodes.get_mut(&inode) else {
            return;
        };
        entry.lookups = entry.lookups.saturating_sub(count);
        if entry.lookups > 0 {
            return;
        }
        let entry = self.inodes.remove(&inode).expect("looked up above");
        if let InodeKind::Node { node, .. } = &*entry.kind {
            self.by_content.remove(&ContentKey::of(node));
        }
        for name in entry.root_names {
            self.root_entries.remove(&name);
        }
    }
}

/// What a file handle stands for: the blob is fetched from `open_blobs` when read.
#[derive(Clone, Copy)]
struct OpenFile {
    digest: B3Digest,
    size: u64,
}

/// The store as a read-only FUSE file system (a fuse-backend-rs [`FileSystem`]): a store
/// path appears at the root when looked up by name, and its contents come from the
/// store's directories and blobs. Every request that would change something gets EROFS.
pub struct StoreFs {
    store: FsStore,
    options: StoreFsOptions,
    root: Arc<InodeKind>,
    inodes: RwLock<InodeTable>,
    open_files: RwLock<HashMap<u64, OpenFile>>,
    open_dirs: RwLock<HashMap<u64, Arc<[Child]>>>,
    open_blobs: Mutex<LruCache<B3Digest, Arc<dyn BlobReader>>>,
    missing_paths: Mutex<LruCache<Bytes, Instant>>,
    next_handle: AtomicU64,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn read_only<T>() -> io::Result<T> {
    Err(errno(libc::EROFS))
}

impl StoreFs {
    /// A file system over `store`. Nothing is read from the store until the first request.
    pub fn new(store: FsStore, options: StoreFsOptions) -> Self {
        let table = InodeTable {
            inodes: HashMap::new(),
            by_content: HashMap::new(),
            root_entries: HashMap::new(),
            next_inode: ROOT_INODE + 1,
        };
        Self {
            store,
            options,
            root: Arc::new(InodeKind::Root),
            inodes: RwLock::new(table),
            open_files: RwLock::new(HashMap::new()),
            open_dirs: RwLock::new(HashMap::new()),
            open_blobs: Mutex::new(LruCache::new(
                NonZeroUsize::new(OPEN_BLOBS).expect("OPEN_BLOBS is not zero"),
            )),
            missing_paths: Mutex::new(LruCache::new(
                NonZeroUsize::new(MISSING_PATHS).expect("MISSING_PATHS is not zero"),
            )),
            next_handle: AtomicU64::new(1),
        }
    }

    /// What `inode` stands for; ENOENT for one never handed out or already forgotten.
    fn inode(&self, inode: u64) -> io::Result<Arc<InodeKind>> {
        if inode == ROOT_INODE {
            return Ok(self.root.clone());
        }
        let table = self.inodes.read().expect("inode table poisoned");
        table
            .inodes
            .get(&inode)
            .map(|entry| entry.kind.clone())
            .ok_or_else(|| errno(libc::ENOENT))
    }

    /// The entry for `node`, counted as handed to the kernel: only for replies that carry
    /// it to the kernel (LOOKUP, READDIRPLUS), which will FORGET it in turn.
    fn hand_out(&self, node: &Node) -> Entry {
        let inode = self
            .inodes
            .write()
            .expect("inode table poisoned")
            .hand_out(node);
        Self::entry(inode, node)
    }

    /// Inodes the kernel holds (the root not counted).
    pub fn inode_count(&self) -> usize {
        self.inodes
            .read()
            .expect("inode table poisoned")
            .inodes
            .len()
    }

    /// A directory's entries, fetched from the directory service on first use.
    fn children(&self, kind: &InodeKind) -> io::Result<Arc<[Child]>> {
        let InodeKind::Node {
            node: Node::Directory { digest, .. },
            children,
        } = kind
        else {
            return Err(errno(libc::ENOTDIR));
        };
        if let Some(children) = children.get() {
            return Ok(children.clone());
        }
        let directory = match self.store.directories.get(digest) {
            Ok(Some(directory)) => directory,
            Ok(None) => {
                tracing::warn!(%digest, "directory missing from the store");
                return Err(errno(libc::EIO));
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot read directory");
                return Err(errno(libc::EIO));
            }
        };
        let list: Arc<[Child]> = directory
            .entries()
            .map(|(name, node)| Child {
                name: Bytes::copy_from_slice(name.as_bytes()),
                node: node.clone(),
            })
            .collect();
        Ok(children.get_or_init(|| list).clone())
    }

    /// Look up a name at the root (a store path's basename); anything the root does not
    /// have is simply absent.
    fn lookup_root(&self, name: &[u8]) -> io::Result<Entry> {
        {
            let mut table = self.inodes.write().expect("inode table poisoned");
            if let Some(&inode) = table.root_entries.get(name) {
                let entry = table.inodes.get_mut(&inode).expect("root entries are live");
                if let InodeKind::Node { node, .. } = &*entry.kind {
                    let entry_out = Self::entry(inode, node);
                    entry.lookups += 1;
                    return Ok(entry_out);
                }
            }
        }
        if self.recently_missing(name) {
            return Err(errno(libc::ENOENT));
        }
        let node = match self.store.root_nodes.get(name) {
            Ok(Some(node)) => node,
            Ok(None) => {
                self.missing_paths
                    .lock()
                    .expect("missing-path cache poisoned")
                    .put(Bytes::copy_from_slice(name), Instant::now());
                return Err(errno(libc::ENOENT));
            }
            Err(e) => {
                let name = String::from_utf8_lossy(name);
                tracing::warn!(%name, error = %e, "cannot look the name up");
                return Err(errno(libc::EIO));
            }
        };
        let mut table = self.inodes.write().expect("inode table poisoned");
        let inode = table.hand_out(&node);
        let name = Bytes::copy_from_slice(name);
        let entry = table.inodes.get_mut(&inode).expect("just handed out");
        if !entry.root_names.contains(&name) {
            entry.root_names.push(name.clone());
        }
        table.root_entries.insert(name, inode);
        drop(table);
        Ok(Self::entry(inode, &node))
    }

    fn recently_missing(&self, name: &[u8]) -> bool {
        let mut missing = self
            .missing_paths
            .lock()
            .expect("missing-path cache poisoned");
        match missing.get(name) {
            Some(since) if since.elapsed() < MISSING_PATH_TTL => true,
            Some(_) => {
                missing.pop(name);
                false
            }
            None => false,
        }
    }

    /// The open blob `digest`, shared with every other handle of it; opened (outside the
    /// cache's lock: a first open may hash a blob whole) when the cache has none.
    fn blob(&self, digest: &B3Digest, size: u64) -> io::Result<Arc<dyn BlobReader>> {
        if let Some(blob) = self
            .open_blobs
            .lock()
            .expect("blob cache poisoned")
            .get(digest)
        {
            return Ok(blob.clone());
        }
        let blob: Arc<dyn BlobReader> = match self.store.blobs.open_sized(digest, size) {
            Ok(Some(blob)) if blob.size() == size => blob,
            Ok(Some(blob)) => {
                tracing::warn!(%digest, expected = size, actual = blob.size(), "blob has the wrong size");
                return Err(errno(libc::EIO));
            }
            Ok(None) => {
                tracing::warn!(%digest, "blob missing from the store");
                return Err(errno(libc::EIO));
            }
            Err(e) => {
                tracing::warn!(%digest, error = %e, "cannot open blob");
                return Err(errno(libc::EIO));
            }
        };
        let mut cache = self.open_blobs.lock().expect("blob cache poisoned");
        // Another thread may have opened it meanwhile: keep one, so descriptors stay shared.
        Ok(cache.get_or_insert(*digest, || blob).clone())
    }

    fn root_listing(&self) -> io::Result<Arc<[Child]>> {
        if !self.options.list_root {
            return Err(errno(libc::EPERM));
        }
        let nodes = self.store.root_nodes.list().map_err(|e| {
            tracing::warn!(error = %e, "cannot list the root");
            errno(libc::EIO)
        })?;
        let mut children: Vec<Child> = nodes
            .into_iter()
            .map(|(name, node)| Child { name, node })
            .collect();
        children.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(children.into())
    }

    /// The attributes of `node`, or of the root for `None`.
    fn stat(node: Option<&Node>) -> stat64 {
        // SAFETY: stat64 is a plain C struct for which all-zero bytes is a valid value.
        let mut st: stat64 = unsafe { std::mem::zeroed() };
        st.st_ino = node.map_or(ROOT_INODE, |node| ContentKey::of(node).st_ino());
        st.st_nlink = 1;
        st.st_uid = 0;
        st.st_gid = 0;
        st.st_mtime = MTIME;
        st.st_ctime = MTIME;
        st.st_atime = MTIME;
        st.st_blksize = BLOCK_SIZE;
        let (mode, size) = match node {
            None => (libc::S_IFDIR | 0o555, 0),
            Some(Node::Directory { size, .. }) => (libc::S_IFDIR | 0o555, *size),
            Some(Node::File {
                size, executable, ..
            }) => (
                libc::S_IFREG | if *executable { 0o555 } else { 0o444 },
                *size,
            ),
            Some(Node::Symlink { target }) => (libc::S_IFLNK | 0o777, target.len() as u64),
        };
        st.st_mode = mode;
        st.st_size = size as i64;
        st.st_blocks = (size as i64 + 511) / 512;
        st
    }

    fn entry(inode: u64, node: &Node) -> Entry {
        Entry {
            inode,
            generation: 0,
            attr: Self::stat(Some(node)),
            attr_flags: 0,
            attr_timeout: CACHE_TIMEOUT,
            entry_timeout: CACHE_TIMEOUT,
        }
    }

    fn new_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn dir_entry_type(node: &Node) -> u32 {
        match node {
            Node::File { .. } => libc::DT_REG as u32,
            Node::Symlink { .. } => libc::DT_LNK as u32,
            Node::Directory { .. } => libc::DT_DIR as u32,
        }
    }

    /// Hands entries from `offset` on to `add`, stopping (without losing the entry) when the
    /// kernel's buffer is full: `add` returns 0 then, and the next call resumes at that entry.
    fn list_from(
        &self,
        handle: u64,
        offset: u64,
        mut add: impl FnMut(&Child, u64) -> io::Result<usize>,
    ) -> io::Result<()> {
        let children = self
            .open_dirs
            .read()
            .expect("handle table poisoned")
            .get(&handle)
            .cloned();
        let children = children.ok_or_else(|| errno(libc::EBADF))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, child) in children.iter().enumerate().skip(start) {
            if add(child, index as u64 + 1)? == 0 {
                break;
            }
        }
        Ok(())
    }

    fn xattrs(&self, kind: &InodeKind) -> Vec<(&'static [u8], String)> {
        if !self.options.show_xattr {
            return Vec::new();
        }
        match kind {
            InodeKind::Node {
                node: Node::Directory { digest, .. },
                ..
            } => {
                vec![(XATTR_DIRECTORY_DIGEST, digest.to_string())]
            }
            InodeKind::Node {
                node: Node::File { digest, .. },
                ..
            } => {
                vec![(XATTR_BLOB_DIGEST, digest.to_string())]
            }
            _ => Vec::new(),
        }
    }
}

impl Drop for StoreFs {
    /// How many inodes the kernel still held: shows FORGET at work (after the guest drops
    /// its caches this is small, however much it walked).
    fn drop(&mut self) {
        tracing::info!(
            "store file system: {} inodes still held at the end",
            self.inode_count()
        );
    }
}

impl FileSystem for StoreFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let wanted = FsOptions::ASYNC_READ
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::MAX_PAGES
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::BIG_WRITES;
        Ok(capable & wanted)
    }

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let name = name.to_bytes();
        let parent_kind = self.inode(parent)?;
        match &*parent_kind {
            InodeKind::Root => self.lookup_root(name),
            kind @ InodeKind::Node {
                node: Node::Directory { .. },
                ..
            } => {
                let children = self.children(kind)?;
                let index = children
                    .binary_search_by(|child| child.name.as_ref().cmp(name))
                    .map_err(|_| errno(libc::ENOENT))?;
                Ok(self.hand_out(&children[index].node))
            }
            _ => Err(errno(libc::ENOTDIR)),
        }
    }

    fn forget(&self, _ctx: &Context, inode: u64, count: u64) {
        self.inodes
            .write()
            .expect("inode table poisoned")
            .forget(inode, count);
    }

    fn batch_forget(&self, _ctx: &Context, requests: Vec<(u64, u64)>) {
        let mut table = self.inodes.write().expect("inode table poisoned");
        for (inode, count) in requests {
            table.forget(inode, count);
        }
    }

    fn getattr(
        &self,
        _ctx: &Context,
        inode: u64,
        _handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        let attr = match &*self.inode(inode)? {
            InodeKind::Root => Self::stat(None),
            InodeKind::Node { node, .. } => Self::stat(Some(node)),
        };
        Ok((attr, CACHE_TIMEOUT))
    }

    fn readlink(&self, _ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        match &*self.inode(inode)? {
            InodeKind::Node {
                node: Node::Symlink { target },
                ..
            } => Ok(target.to_vec()),
            _ => Err(errno(libc::EINVAL)),
        }
    }

    fn open(
        &self,
        _ctx: &Context,
        inode: u64,
        flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if flags as i32 & libc::O_ACCMODE != libc::O_RDONLY {
            return read_only();
        }
        let (digest, size) = match &*self.inode(inode)? {
            InodeKind::Node {
                node: Node::File { digest, size, .. },
                ..
            } => (*digest, *size),
            InodeKind::Root
            | InodeKind::Node {
                node: Node::Directory { .. },
                ..
            } => {
                return Err(errno(libc::EISDIR));
            }
            InodeKind::Node {
                node: Node::Symlink { .. },
                ..
            } => return Err(errno(libc::ELOOP)),
        };
        // Opened now, so a missing blob, or a damaged one that is checked whole before it
        // is served, fails the open rather than a later read. A large blob with an outboard
        // opens at once; a damaged range of it fails the read that asks for it.
        self.blob(&digest, size)?;
        let handle = self.new_handle();
        let mut open_files = self.open_files.write().expect("handle table poisoned");
        if open_files.len() >= MAX_OPEN_FILES {
            tracing::warn!(limit = MAX_OPEN_FILES, "open file limit reached");
            return Err(errno(libc::ENFILE));
        }
        open_files.insert(handle, OpenFile { digest, size });
        Ok((Some(handle), OpenOptions::KEEP_CACHE, None))
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _ctx: &Context,
        _inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        _lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let file = self
            .open_files
            .read()
            .expect("handle table poisoned")
            .get(&handle)
            .copied();
        let file = file.ok_or_else(|| errno(libc::EBADF))?;
        let blob = self.blob(&file.digest, file.size)?;
        if offset >= blob.size() {
            return Ok(0);
        }
        let count = (size as u64).min(blob.size() - offset) as usize;
        let mut source = BlobSource(&*blob);
        let mut done = 0;
        while done < count {
            match w.write_from(&mut source, count - done, offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn release(
        &self,
        _ctx: &Context,
        _inode: u64,
        _flags: u32,
        handle: u64,
        _flush: bool,
        _flock_release: bool,
        _lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.open_files
            .write()
            .expect("handle table poisoned")
            .remove(&handle);
        Ok(())
    }

    fn opendir(
        &self,
        _ctx: &Context,
        inode: u64,
        _flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let children = match &*self.inode(inode)? {
            InodeKind::Root => self.root_listing()?,
            kind @ InodeKind::Node {
                node: Node::Directory { .. },
                ..
            } => self.children(kind)?,
            _ => return Err(errno(libc::ENOTDIR)),
        };
        let handle = self.new_handle();
        let mut open_dirs = self.open_dirs.write().expect("handle table poisoned");
        if open_dirs.len() >= MAX_OPEN_DIRS {
            tracing::warn!(limit = MAX_OPEN_DIRS, "open directory limit reached");
            return Err(errno(libc::ENFILE));
        }
        open_dirs.insert(handle, children);
        Ok((
            Some(handle),
            OpenOptions::CACHE_DIR | OpenOptions::KEEP_CACHE,
        ))
    }

    fn readdir(
        &self,
        _ctx: &Context,
        _inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.list_from(handle, offset, |child, next_offset| {
            add_entry(DirEntry {
                ino: ContentKey::of(&child.node).st_ino(),
                offset: next_offset,
                type_: Self::dir_entry_type(&child.node),
                name: &child.name,
            })
        })
    }

    fn readdirplus(
        &self,
        _ctx: &Context,
        _inode: u64,
        handle: u64,
        _size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.list_from(handle, offset, |child, next_offset| {
            let entry = self.hand_out(&child.node);
            let dir_entry = DirEntry {
                ino: entry.attr.st_ino,
                offset: next_offset,
                type_: Self::dir_entry_type(&child.node),
                name: &child.name,
            };
            let added = add_entry(dir_entry, entry);
            // Not in the reply (the buffer is full, or it failed): the kernel never got it.
            if !matches!(added, Ok(n) if n > 0) {
                self.inodes
                    .write()
                    .expect("inode table poisoned")
                    .forget(entry.inode, 1);
            }
            added
        })
    }

    fn releasedir(&self, _ctx: &Context, _inode: u64, _flags: u32, handle: u64) -> io::Result<()> {
        self.open_dirs
            .write()
            .expect("handle table poisoned")
            .remove(&handle);
        Ok(())
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> io::Result<statvfs64> {
        // SAFETY: statvfs64 is a plain C struct for which all-zero bytes is a valid value.
        let mut st: statvfs64 = unsafe { std::mem::zeroed() };
        st.f_bsize = BLOCK_SIZE as u64;
        st.f_frsize = BLOCK_SIZE as u64;
        st.f_namemax = 255;
        st.f_flag = libc::ST_RDONLY;
        Ok(st)
    }

    fn access(&self, _ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        self.inode(inode)?;
        if mask as i32 & libc::W_OK != 0 {
            return read_only();
        }
        Ok(())
    }

    fn getxattr(
        &self,
        _ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        let kind = self.inode(inode)?;
        let value = self
            .xattrs(&kind)
            .into_iter()
            .find(|(n, _)| *n == name.to_bytes())
            .map(|(_, v)| v.into_bytes())
            .ok_or_else(|| errno(libc::ENODATA))?;
        match size {
            0 => Ok(GetxattrReply::Count(value.len() as u32)),
            n if (n as usize) < value.len() => Err(errno(libc::ERANGE)),
            _ => Ok(GetxattrReply::Value(value)),
        }
    }

    fn listxattr(&self, _ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        let kind = self.inode(inode)?;
        let mut names = Vec::new();
        for (name, _) in self.xattrs(&kind) {
            names.extend_from_slice(name);
            names.push(0);
        }
        match size {
            0 => Ok(ListxattrReply::Count(names.len() as u32)),
            n if (n as usize) < names.len() => Err(errno(libc::ERANGE)),
            _ => Ok(ListxattrReply::Names(names)),
        }
    }

    // Everything that would change the store fails: it is read-only by design.

    fn setattr(
        &self,
        _ctx: &Context,
        _inode: u64,
        _attr: stat64,
        _handle: Option<u64>,
        _valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        read_only()
    }

    fn symlink(
        &self,
        _ctx: &Context,
        _linkname: &CStr,
        _parent: u64,
        _name: &CStr,
    ) -> io::Result<Entry> {
        read_only()
    }

    fn mknod(
        &self,
        _ctx: &Context,
        _parent: u64,
        _name: &CStr,
        _mode: u32,
        _rdev: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        read_only()
    }

    fn mkdir(
        &self,
        _ctx: &Context,
        _parent: u64,
        _name: &CStr,
        _mode: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        read_only()
    }

    fn unlink(&self, _ctx: &Context, _parent: u64, _name: &CStr) -> io::Result<()> {
        read_only()
    }

    fn rmdir(&self, _ctx: &Context, _parent: u64, _name: &CStr) -> io::Result<()> {
        read_only()
    }

    fn rename(
        &self,
        _ctx: &Context,
        _olddir: u64,
        _oldname: &CStr,
        _newdir: u64,
        _newname: &CStr,
        _flags: u32,
    ) -> io::Result<()> {
        read_only()
    }

    fn link(
        &self,
        _ctx: &Context,
        _inode: u64,
        _newparent: u64,
        _newname: &CStr,
    ) -> io::Result<Entry> {
        read_only()
    }

    fn create(
        &self,
        _ctx: &Context,
        _parent: u64,
        _name: &CStr,
        _args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        read_only()
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _r: &mut dyn ZeroCopyReader,
        _size: u32,
        _offset: u64,
        _lock_owner: Option<u64>,
        _delayed_write: bool,
        _flags: u32,
        _fuse_flags: u32,
    ) -> io::Result<usize> {
        read_only()
    }

    fn fallocate(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: u64,
        _mode: u32,
        _offset: u64,
        _length: u64,
    ) -> io::Result<()> {
        read_only()
    }

    fn setxattr(
        &self,
        _ctx: &Context,
        _inode: u64,
        _name: &CStr,
        _value: &[u8],
        _flags: u32,
    ) -> io::Result<()> {
        read_only()
    }

    fn removexattr(&self, _ctx: &Context, _inode: u64, _name: &CStr) -> io::Result<()> {
        read_only()
    }
}

#[cfg(test)]
#[path = "fs_tests.rs"]
mod tests;

/// The file system's view of a whole store, for tests.
#[cfg(test)]
pub(crate) fn test_fs_store(store: tvix_boot_store::Store) -> FsStore {
    let store = Arc::new(store);
    FsStore {
        blobs: store.blobs.clone(),
        directories: store.directories.clone(),
        root_nodes: store,
    }
}
