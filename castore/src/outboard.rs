//! BLAKE3 verified streaming: a blob's outboard, and reads checked against it.
//!
//! A blob's digest is the root of BLAKE3's own hash tree over its bytes. The outboard
//! keeps the inner nodes of that tree down to groups of 16 KiB (the chunk groups of
//! `bao-tree`), so any group can be checked against the digest alone, by hashing the group
//! and the path of hash pairs from it up to the root: a reader can serve the first bytes of
//! a large blob without hashing all of it first. The outboard is untrusted like the blob
//! itself: a wrong hash pair fails the check just as a wrong byte does.
//!
//! `TreeHasher` hashes a blob as it streams by, group by group, and yields both the digest
//! and the outboard, so writing a blob costs one pass of hashing as before. Checking walks
//! `bao_tree`'s tree iterator from the root down as its `encode_ranges_validated` does,
//! but hashes each group where it lies rather than in a zeroed copy. Both are checked
//! against `bao_tree` in the tests: the outboard against its builder, the checks against
//! its validating encoder (the same bytes accepted, the same damage refused).
//!
//! On disk an outboard is a 24-byte header (magic, group size, blob size) followed by the
//! hash pairs in pre-order, the layout `bao_tree::io::outboard::PreOrderOutboard` reads:
//! the pairs near the root, which every check needs, share the first pages of the file.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bao_tree::blake3;
use bao_tree::io::outboard::PreOrderMemOutboard;
use bao_tree::io::sync::{OutboardMut, truncate_ranges};
use bao_tree::iter::BaoChunk;
use bao_tree::{BaoTree, BlockSize, ChunkNum, ChunkRanges, TreeNode};
use blake3::hazmat::{HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root};
use thiserror::Error;

use crate::digest::B3Digest;

/// Chunk groups of 2^4 BLAKE3 chunks, 16 KiB: the outboard is 64 bytes per group, 0.4 % of
/// the blob (4 MiB for 1 GiB), and a check hashes at most 16 KiB more than was asked for.
/// Smaller groups grow the outboard (1 KiB groups, plain bao: 6 %); larger ones make the
/// first read of a small range hash more.
pub const GROUP_CHUNK_LOG: u8 = 4;
const BLOCK_SIZE: BlockSize = BlockSize::from_chunk_log(GROUP_CHUNK_LOG);
pub const GROUP_BYTES: u64 = 1024 << GROUP_CHUNK_LOG;
/// Blobs up to this size get no outboard: they are hashed whole before their first byte is
/// served, which takes about as long as one cold read of an outboard and a group would
/// (BLAKE3 hashes 1 MiB in well under a millisecond), and a store of many small files (most
/// of a Nix store) is spared a second file per blob.
pub const OUTBOARD_MIN_BLOB: u64 = 1 << 20;
/// Most bytes one check reads into a host buffer; longer reads are checked piece by piece,
/// so what a reader (a guest) asks for never sizes a buffer.
const MAX_CHECK_SPAN: usize = 1 << 20;

const MAGIC: [u8; 8] = *b"tvixbao1";
pub const HEADER_LEN: u64 = 24;
/// Hash pairs are read from the outboard file a page at a time and kept: a check needs the
/// pairs on the path from the root to its groups (about 20 for a 128 KiB read of a GiB),
/// and the next read's path is mostly the same. Past this many pages (1 MiB, the outboard
/// of 256 MiB) the kept pages are dropped and read again as needed.
const PAIR_PAGE: u64 = 4096;
const MAX_PAIR_PAGES: usize = 256;

#[derive(Debug, Error)]
pub enum OutboardError {
    #[error(
        "blob {digest}: bytes {start}..{end} do not match its digest (checked against its outboard)"
    )]
    Mismatch {
        digest: B3Digest,
        start: u64,
        end: u64,
    },
    #[error("blob {digest}: the file ends before byte {end}")]
    Truncated { digest: B3Digest, end: u64 },
    #[error("blob {digest}: reading bytes {start}..{end} or its outboard: {source}")]
    Io {
        digest: B3Digest,
        start: u64,
        end: u64,
        source: io::Error,
    },
    #[error("outboard {path} cannot be used: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error("outboard {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
}

/// Hashes a blob's bytes as they are written, one chunk group at a time, keeping each
/// group's chaining value: at the end these give the digest (the same as
/// `blake3::hash` of all the bytes) and, when wanted, the outboard. Holds 32 bytes per 16 KiB
/// written (0.2 %) until then.
pub struct TreeHasher {
    /// The group being filled; its input offset is the group's start.
    group: blake3::Hasher,
    group_len: u64,
    /// Chaining values of the groups before it, each hashed as a non-root subtree.
    groups: Vec<blake3::Hash>,
}

impl Default for TreeHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl TreeHasher {
    pub fn new() -> Self {
        Self {
            group: blake3::Hasher::new(),
            group_len: 0,
            groups: Vec::new(),
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.groups.len() as u64 * GROUP_BYTES + self.group_len
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            // A full group is closed only once more bytes come: if none do, and it is the
            // first, it is the whole blob and must be finalized as the root instead.
            if self.group_len == GROUP_BYTES {
                self.groups
                    .push(blake3::Hash::from(self.group.finalize_non_root()));
                let mut next = blake3::Hasher::new();
                next.set_input_offset(self.groups.len() as u64 * GROUP_BYTES);
                self.group = next;
                self.group_len = 0;
            }
            let take = data.len().min((GROUP_BYTES - self.group_len) as usize);
            self.group.update(&data[..take]);
            self.group_len += take as u64;
            data = &data[take..];
        }
    }

    /// The digest of everything hashed, and the outboard file's bytes (header included)
    /// when `with_outboard` and the blob is large enough to have one.
    pub fn finish(mut self, with_outboard: bool) -> (B3Digest, Option<Vec<u8>>) {
        let size = self.len();
        if self.groups.is_empty() {
            // One group (or none): the tree is a single leaf, hashed as the root.
            return (B3Digest::from(self.group.finalize()), None);
        }
        self.groups
            .push(blake3::Hash::from(self.group.finalize_non_root()));
        let tree = BaoTree::new(size, BLOCK_SIZE);
        let with_outboard = with_outboard && size > OUTBOARD_MIN_BLOB;
        let mut outboard = PreOrderMemOutboard {
            root: blake3::Hash::from([0; 32]),
            tree,
            data: if with_outboard {
                vec![0u8; usize::try_from(tree.outboard_size()).expect("outboard fits memory")]
            } else {
                Vec::new()
            },
        };
        // The groups in order, combined the way bao_tree's own outboard builder combines
        // them: its post-order walk yields each leaf, then each parent once its children
        // are done.
        let mut leaves = self.groups.into_iter();
        let mut stack: Vec<blake3::Hash> = Vec::new();
        for item in tree.post_order_chunks_iter() {
            match item {
                BaoChunk::Leaf { .. } => {
                    stack.push(leaves.next().expect("one chaining value per group"));
                }
                BaoChunk::Parent { node, is_root, .. } => {
                    let right = stack.pop().expect("a parent follows its two children");
                    let left = stack.pop().expect("a parent follows its two children");
                    if with_outboard {
                        outboard
                            .save(node, &(left, right))
                            .expect("saving into memory of the outboard's size");
                    }
                    stack.push(parent_cv(&left, &right, is_root));
                }
            }
        }
        debug_assert!(leaves.next().is_none() && stack.len() == 1);
        let root = B3Digest::from(stack.pop().expect("the walk ends at the root"));
        let file = with_outboard.then(|| {
            let mut file = Vec::with_capacity(HEADER_LEN as usize + outboard.data.len());
            file.extend_from_slice(&header(size));
            file.extend_from_slice(&outboard.data);
            file
        });
        (root, file)
    }
}

fn header(size: u64) -> [u8; HEADER_LEN as usize] {
    header_with(size, GROUP_CHUNK_LOG)
}

fn header_with(size: u64, group_chunk_log: u8) -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(&MAGIC);
    header[8] = group_chunk_log;
    header[16..].copy_from_slice(&size.to_le_bytes());
    header
}

/// Coarsest and finest chunk groups an outboard from elsewhere (a remote store's Stat) may
/// use: 16 KiB to 64 MiB. Finer ones make the outboard large for nothing; coarser ones
/// make each check hash a lot.
pub const MIN_WIRE_GROUP_LOG: u8 = 4;
/// See [`MIN_WIRE_GROUP_LOG`].
pub const MAX_WIRE_GROUP_LOG: u8 = 16;
/// The chunk groups of the outboards the gRPC server sends: 1 MiB, the size of the chunks
/// it lists, so a client checks each chunk it fetched with one call. 64 KiB per GiB.
pub const WIRE_GROUP_LOG: u8 = 10;

/// An outboard held in memory, as a remote store sent it: untrusted, like the bytes it
/// checks (a wrong hash pair fails the check as a wrong byte does).
#[derive(Clone)]
pub struct MemOutboard {
    inner: PreOrderMemOutboard,
    group_log: u8,
}

impl MemOutboard {
    /// Parses an outboard in the file layout (header, then pairs) for the blob `digest`.
    /// Returns the blob's size, which the header states and every check confirms.
    pub fn parse(digest: B3Digest, bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < HEADER_LEN as usize {
            return Err(format!("{} bytes, shorter than its header", bytes.len()));
        }
        let (head, pairs) = bytes.split_at(HEADER_LEN as usize);
        let group_log = head[8];
        let size = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
        if head[..8] != MAGIC || head[9..16] != [0; 7] {
            return Err("no outboard header".into());
        }
        if !(MIN_WIRE_GROUP_LOG..=MAX_WIRE_GROUP_LOG).contains(&group_log) {
            return Err(format!(
                "chunk groups of 2^{group_log} KiB, not between 2^{MIN_WIRE_GROUP_LOG} and 2^{MAX_WIRE_GROUP_LOG}"
            ));
        }
        let tree = BaoTree::new(size, BlockSize::from_chunk_log(group_log));
        if pairs.len() as u64 != tree.outboard_size() {
            return Err(format!(
                "{} bytes of hash pairs where a {size}-byte blob has {}",
                pairs.len(),
                tree.outboard_size()
            ));
        }
        Ok(Self {
            inner: PreOrderMemOutboard {
                root: blake3::Hash::from(*digest.as_bytes()),
                tree,
                data: pairs.to_vec(),
            },
            group_log,
        })
    }

    /// The blob's size, as the outboard states it.
    pub fn size(&self) -> u64 {
        self.inner.tree.size()
    }

    /// Bytes per chunk group: what [`check`](Self::check) takes whole.
    pub fn group_bytes(&self) -> u64 {
        1024 << self.group_log
    }

    /// Checks `bytes`, the blob's bytes at `start`: whole chunk groups (the last may end
    /// with the blob).
    pub fn check(&self, bytes: &[u8], start: u64) -> Result<(), OutboardError> {
        let digest = B3Digest::from(*self.inner.root.as_bytes());
        let end = start + bytes.len() as u64;
        let aligned = start.is_multiple_of(self.group_bytes())
            && (end.is_multiple_of(self.group_bytes()) || end == self.size())
            && end <= self.size();
        if !aligned {
            return Err(OutboardError::Mismatch { digest, start, end });
        }
        // A pair missing from memory is a mismatch too: this outboard came from elsewhere.
        check_groups(&self.inner, bytes, start).map_err(|_| OutboardError::Mismatch {
            digest,
            start,
            end,
        })
    }
}

/// The outboard of `data` with chunk groups of 2^`group_log` KiB, in the file layout.
pub fn outboard_of(data: &[u8], group_log: u8) -> Vec<u8> {
    let outboard = PreOrderMemOutboard::create(data, BlockSize::from_chunk_log(group_log));
    let mut file = header_with(data.len() as u64, group_log).to_vec();
    file.extend_from_slice(&outboard.data);
    file
}

impl Outboard {
    /// The same tree's pairs above coarser chunk groups of 2^`group_log` KiB, in the file
    /// layout: what the gRPC server sends as a Stat's `bao`. Read from this outboard, and
    /// checked as bao_tree reads them (a damaged pair fails the client's checks, never
    /// passes them).
    pub fn coarsen(&self, group_log: u8) -> io::Result<Vec<u8>> {
        let size = self.tree.size();
        let coarse = BaoTree::new(size, BlockSize::from_chunk_log(group_log));
        let mut out = PreOrderMemOutboard {
            root: blake3::Hash::from(*self.digest.as_bytes()),
            tree: coarse,
            data: vec![0u8; usize::try_from(coarse.outboard_size()).expect("fits memory")],
        };
        for node in coarse.pre_order_nodes_iter() {
            if let Some(pair) = bao_tree::io::sync::Outboard::load(&self, node)? {
                out.save(node, &pair)?;
            }
        }
        let mut file = header_with(size, group_log).to_vec();
        file.extend_from_slice(&out.data);
        Ok(file)
    }

    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.tree.size()
    }
}

/// Where the outboard of the blob at `blob_path` lives: beside it, so it is written,
/// renamed and flushed (`Store::sync`) with the blob's own directory.
pub fn outboard_path(blob_path: &Path) -> PathBuf {
    let mut path = blob_path.as_os_str().to_owned();
    path.push(".outboard");
    PathBuf::from(path)
}

/// An outboard file opened for checking reads of one blob against its digest.
pub struct Outboard {
    digest: B3Digest,
    tree: BaoTree,
    file: File,
    /// Pages of hash pairs read so far, by page number (from the end of the header).
    pages: Mutex<HashMap<u64, Box<[u8]>>>,
}

/// The outboard as `bao_tree` reads it: the pre-order layout of `PreOrderOutboard`, through
/// the page cache above.
impl bao_tree::io::sync::Outboard for &Outboard {
    fn root(&self) -> blake3::Hash {
        blake3::Hash::from(*self.digest.as_bytes())
    }

    fn tree(&self) -> BaoTree {
        self.tree
    }

    fn load(&self, node: TreeNode) -> io::Result<Option<(blake3::Hash, blake3::Hash)>> {
        // Nodes below the group level are not kept: bao_tree hashes those itself.
        let Some(index) = self.tree.pre_order_offset(node) else {
            return Ok(None);
        };
        let offset = index * 64;
        let (page, within) = (offset / PAIR_PAGE, (offset % PAIR_PAGE) as usize);
        let mut pages = self.pages.lock().expect("outboard pages poisoned");
        if !pages.contains_key(&page) {
            if pages.len() >= MAX_PAIR_PAGES {
                pages.clear();
            }
            // The file was as long as the tree needs when opened; if it shrank since, the
            // missing pairs read as zeros, which match no hash.
            let mut bytes = vec![0u8; PAIR_PAGE as usize];
            let mut done = 0;
            while done < bytes.len() {
                match self.file.read_at(
                    &mut bytes[done..],
                    HEADER_LEN + page * PAIR_PAGE + done as u64,
                ) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            pages.insert(page, bytes.into_boxed_slice());
        }
        let pair = &pages[&page][within..within + 64];
        let half =
            |bytes: &[u8]| blake3::Hash::from(<[u8; 32]>::try_from(bytes).expect("32 bytes"));
        Ok(Some((half(&pair[..32]), half(&pair[32..]))))
    }
}

/// Bytes of the blob read into a host buffer: `base` is the blob offset of `bytes[0]`.
/// The chaining value of a parent node from its children's (the blob's digest at the root).
fn parent_cv(left: &blake3::Hash, right: &blake3::Hash, is_root: bool) -> blake3::Hash {
    if is_root {
        merge_subtrees_root(left.as_bytes(), right.as_bytes(), Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(
            left.as_bytes(),
            right.as_bytes(),
            Mode::Hash,
        ))
    }
}

/// Why bytes failed [`check_groups`].
enum GroupsError {
    /// A leaf or parent hash that does not match, or a pair the outboard lacks.
    Mismatch,
    /// The outboard could not be read.
    Io(io::Error),
}

/// Checks `bytes`, the blob's bytes from `start` on, against `outboard`: whole chunk groups
/// (the last may end with the blob). The same walk as bao_tree's
/// `encode_ranges_validated` (each parent pair must hash to what its parent said, each
/// group to what its pair said, from the root down), but each group is hashed where it
/// lies in `bytes`: that function copies every group into a zeroed buffer first, which
/// cost more than a tenth of a remote blob read.
fn check_groups<O: bao_tree::io::sync::Outboard>(
    outboard: &O,
    bytes: &[u8],
    start: u64,
) -> Result<(), GroupsError> {
    let tree = outboard.tree();
    let end = start + bytes.len() as u64;
    let ranges = ChunkRanges::from(ChunkNum::full_chunks(start)..ChunkNum::chunks(end));
    let ranges = truncate_ranges(&ranges, tree.size());
    let mut expected: Vec<blake3::Hash> = vec![outboard.root()];
    for item in tree.ranges_pre_order_chunks_iter_ref(ranges, 0) {
        match item {
            BaoChunk::Parent {
                node,
                is_root,
                left,
                right,
                ..
            } => {
                let (l, r) = outboard
                    .load(node)
                    .map_err(GroupsError::Io)?
                    .ok_or(GroupsError::Mismatch)?;
                if expected.pop() != Some(parent_cv(&l, &r, is_root)) {
                    return Err(GroupsError::Mismatch);
                }
                if right {
                    expected.push(r);
                }
                if left {
                    expected.push(l);
                }
            }
            BaoChunk::Leaf {
                start_chunk,
                size,
                is_root,
                ranges,
            } => {
                // Whole groups were asked for, so every leaf is wanted whole.
                if !ranges.is_all() {
                    return Err(GroupsError::Mismatch);
                }
                let group = start_chunk
                    .to_bytes()
                    .checked_sub(start)
                    .and_then(|from| usize::try_from(from).ok())
                    .and_then(|from| bytes.get(from..from.checked_add(size)?))
                    .ok_or(GroupsError::Mismatch)?;
                let actual = if is_root {
                    blake3::hash(group)
                } else {
                    let mut hasher = blake3::Hasher::new();
                    hasher.set_input_offset(start_chunk.to_bytes());
                    hasher.update(group);
                    blake3::Hash::from(hasher.finalize_non_root())
                };
                if expected.pop() != Some(actual) {
                    return Err(GroupsError::Mismatch);
                }
            }
        }
    }
    Ok(())
}

thread_local! {
    /// Where reads that do not cover whole groups are checked: reused, so a stream of
    /// small reads does not allocate each time. At most MAX_CHECK_SPAN + 2 groups.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Outboard {
    /// The outboard at `path` for the blob `digest` of `size` bytes; `None` when there is
    /// none. One made for another group size or another blob size, or cut short, is
    /// `Unusable`: the caller treats it as missing.
    pub fn open(path: &Path, digest: B3Digest, size: u64) -> Result<Option<Self>, OutboardError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(OutboardError::Open {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let open_err = |source| OutboardError::Open {
            path: path.to_owned(),
            source,
        };
        let unusable = |reason: String| OutboardError::Unusable {
            path: path.to_owned(),
            reason,
        };
        let mut found = [0u8; HEADER_LEN as usize];
        match file.read_exact_at(&mut found, 0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(unusable("shorter than its header".into()));
            }
            Err(e) => return Err(open_err(e)),
        }
        if found != header(size) {
            return Err(unusable(format!(
                "its header does not describe a {size}-byte blob in {GROUP_BYTES}-byte groups"
            )));
        }
        let tree = BaoTree::new(size, BLOCK_SIZE);
        let len = file.metadata().map_err(open_err)?.len();
        if len != HEADER_LEN + tree.outboard_size() {
            return Err(unusable(format!(
                "{len} bytes long instead of {}",
                HEADER_LEN + tree.outboard_size()
            )));
        }
        Ok(Some(Self {
            digest,
            tree,
            file,
            pages: Mutex::new(HashMap::new()),
        }))
    }

    /// Fills `out` with the blob's bytes at `offset` from `data` (the blob's file), checked
    /// against the digest. Only an Ok makes `out` usable: on error it may hold the bytes
    /// that failed (whole groups are checked in place), so `out` must be memory the caller
    /// alone sees, never guest memory. `offset..offset + out.len()` must lie within the blob.
    pub fn read_verified(
        &self,
        data: &File,
        out: &mut [u8],
        offset: u64,
    ) -> Result<(), OutboardError> {
        let size = self.tree.size();
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&end| end <= size);
        if end.is_none() {
            return Err(OutboardError::Truncated {
                digest: self.digest,
                end: offset.saturating_add(out.len() as u64),
            });
        }
        for (i, piece) in out.chunks_mut(MAX_CHECK_SPAN).enumerate() {
            self.read_piece(data, piece, offset + (i * MAX_CHECK_SPAN) as u64)?;
        }
        Ok(())
    }

    fn read_piece(&self, data: &File, out: &mut [u8], offset: u64) -> Result<(), OutboardError> {
        let end = offset + out.len() as u64;
        // The groups that hold the range: only whole groups can be checked.
        let start = offset / GROUP_BYTES * GROUP_BYTES;
        let group_end = end.div_ceil(GROUP_BYTES).saturating_mul(GROUP_BYTES);
        let group_end = group_end.min(self.tree.size());
        if start == offset && group_end == end {
            // Whole groups: read and check them in `out` itself, which the caller only
            // uses once this returned Ok.
            return self.check(data, out, start);
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize((group_end - start) as usize, 0);
            self.check(data, &mut scratch, start)?;
            let from = (offset - start) as usize;
            out.copy_from_slice(&scratch[from..from + out.len()]);
            Ok(())
        })
    }

    /// Reads the whole groups `window` covers at `start` and checks them.
    fn check(&self, data: &File, window: &mut [u8], start: u64) -> Result<(), OutboardError> {
        let end = start + window.len() as u64;
        let io_err = |source| OutboardError::Io {
            digest: self.digest,
            start,
            end,
            source,
        };
        let mut done = 0;
        while done < window.len() {
            match data.read_at(&mut window[done..], start + done as u64) {
                Ok(0) => {
                    return Err(OutboardError::Truncated {
                        digest: self.digest,
                        end,
                    });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        match check_groups(&self, window, start) {
            Ok(()) => Ok(()),
            Err(GroupsError::Io(e)) if e.kind() != io::ErrorKind::InvalidData => Err(io_err(e)),
            // A leaf or parent hash that does not match, or a hash pair the outboard does
            // not have: either way these bytes are not the blob's.
            Err(_) => Err(OutboardError::Mismatch {
                digest: self.digest,
                start,
                end,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bao_tree::io::outboard::PreOrderMemOutboard;
    use proptest::prelude::*;

    fn data(size: usize, seed: u8) -> Vec<u8> {
        (0..size)
            .map(|i| (i as u8).wrapping_mul(31) ^ (i >> 9) as u8 ^ seed)
            .collect()
    }

    fn hashed(data: &[u8], pieces: usize) -> (B3Digest, Option<Vec<u8>>) {
        let mut hasher = TreeHasher::new();
        for piece in data.chunks(pieces.max(1)) {
            hasher.update(piece);
        }
        assert_eq!(hasher.len(), data.len() as u64);
        hasher.finish(true)
    }

    /// The digest is the blob's BLAKE3 hash (the store's address), and the outboard is
    /// byte for byte what bao_tree builds for the same bytes.
    fn check_against_bao_tree(data: &[u8], pieces: usize) {
        let (digest, file) = hashed(data, pieces);
        assert_eq!(digest, B3Digest::of(data), "size {}", data.len());
        let reference = PreOrderMemOutboard::create(data, BLOCK_SIZE);
        assert_eq!(*digest.as_bytes(), *reference.root.as_bytes());
        match file {
            Some(file) => {
                assert!(data.len() as u64 > OUTBOARD_MIN_BLOB);
                assert_eq!(&file[..HEADER_LEN as usize], &header(data.len() as u64));
                assert_eq!(&file[HEADER_LEN as usize..], &reference.data[..]);
            }
            None => assert!(data.len() as u64 <= OUTBOARD_MIN_BLOB),
        }
    }

    #[test]
    fn digest_and_outboard_match_blake3_and_bao_tree() {
        let g = GROUP_BYTES as usize;
        for size in [
            0,
            1,
            1023,
            1024,
            1025,
            g - 1,
            g,
            g + 1,
            2 * g,
            3 * g + 7,
            OUTBOARD_MIN_BLOB as usize,
            OUTBOARD_MIN_BLOB as usize + 1,
            OUTBOARD_MIN_BLOB as usize + g,
            5 * OUTBOARD_MIN_BLOB as usize + 3 * g + 1000,
        ] {
            let data = data(size, 7);
            for pieces in [1, 1000, g, 65536, usize::MAX] {
                check_against_bao_tree(&data, pieces);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_size_any_split(size in 0usize..(3 << 20), pieces in 1usize..100_000) {
            check_against_bao_tree(&data(size, 3), pieces);
        }
    }

    /// `check_groups` accepts and refuses exactly what bao_tree's validating encoder does,
    /// for a run of whole groups, with a byte of it or of the outboard flipped or not.
    fn checks_agree_with_bao_tree(
        size: usize,
        first: usize,
        groups: usize,
        flip_byte: Option<usize>,
        flip_pair: Option<usize>,
    ) {
        let mut data = data(size, 5);
        let mut outboard = PreOrderMemOutboard::create(&data, BLOCK_SIZE);
        let g = GROUP_BYTES as usize;
        let total = size.div_ceil(g).max(1);
        let first = first % total;
        let last = (first + 1 + groups % total).min(total);
        let (start, end) = (first * g, (last * g).min(size));
        if let Some(i) = flip_byte.filter(|_| end > start) {
            data[start + i % (end - start)] ^= 0x10;
        }
        if let Some(i) = flip_pair.filter(|_| !outboard.data.is_empty()) {
            let i = i % outboard.data.len();
            outboard.data[i] ^= 0x10;
        }
        let ours = check_groups(&outboard, &data[start..end], start as u64).is_ok();
        let ranges =
            ChunkRanges::from(ChunkNum::full_chunks(start as u64)..ChunkNum::chunks(end as u64));
        let theirs =
            bao_tree::io::sync::encode_ranges_validated(&data[..], &outboard, &ranges, io::sink())
                .is_ok();
        assert_eq!(
            ours, theirs,
            "size {size}, bytes {start}..{end}, flipped byte {flip_byte:?}, pair {flip_pair:?}"
        );
        if flip_byte.is_none() && flip_pair.is_none() {
            assert!(ours, "intact bytes {start}..{end} of {size} refused");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn checks_agree_with_bao_tree_anywhere(
            size in 0usize..(1 << 20),
            first in 0usize..64,
            groups in 0usize..64,
            flip_byte in proptest::option::of(0usize..(1 << 20)),
            flip_pair in proptest::option::of(0usize..4096),
        ) {
            checks_agree_with_bao_tree(size, first, groups, flip_byte, flip_pair);
        }
    }

    struct Blob {
        _dir: tempfile::TempDir,
        data: Vec<u8>,
        digest: B3Digest,
        file: File,
        outboard_path: PathBuf,
    }

    fn blob(size: usize) -> Blob {
        let dir = tempfile::tempdir().unwrap();
        let data = data(size, 11);
        let (digest, outboard) = hashed(&data, 1 << 16);
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).unwrap();
        let outboard_path = outboard_path(&path);
        std::fs::write(&outboard_path, outboard.unwrap()).unwrap();
        Blob {
            file: File::open(&path).unwrap(),
            _dir: dir,
            data,
            digest,
            outboard_path,
        }
    }

    fn open(blob: &Blob) -> Outboard {
        Outboard::open(&blob.outboard_path, blob.digest, blob.data.len() as u64)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn intact_blob_reads_right_at_any_alignment() {
        let blob = blob(3 * OUTBOARD_MIN_BLOB as usize + 12345);
        let outboard = open(&blob);
        let size = blob.data.len();
        let g = GROUP_BYTES as usize;
        for (offset, len) in [
            (0, 4096),
            (0, g),
            (g, 8 * g),
            (1, 1),
            (g - 1, 2),
            (5 * g + 17, 3 * g),
            (0, size),
            (size - 1, 1),
            (size - 12345, 12345),
            (size - 20000, 20000),
            (100, MAX_CHECK_SPAN + 2 * g + 5),
        ] {
            let mut out = vec![0u8; len];
            outboard
                .read_verified(&blob.file, &mut out, offset as u64)
                .unwrap();
            assert!(out == blob.data[offset..offset + len], "{offset}+{len}");
        }
        // Past the end is refused, not a panic.
        let mut out = vec![0u8; 10];
        assert!(
            outboard
                .read_verified(&blob.file, &mut out, size as u64 - 5)
                .is_err()
        );
        assert!(
            outboard
                .read_verified(&blob.file, &mut out, u64::MAX - 3)
                .is_err()
        );
    }

    #[test]
    fn a_flipped_byte_fails_its_group_only() {
        let blob = blob(2 * OUTBOARD_MIN_BLOB as usize + 5000);
        let flipped = OUTBOARD_MIN_BLOB as usize + 3 * GROUP_BYTES as usize + 100;
        let mut bad = blob.data.clone();
        bad[flipped] ^= 1;
        let path = blob._dir.path().join("bad");
        std::fs::write(&path, &bad).unwrap();
        let file = File::open(&path).unwrap();
        let outboard = open(&blob);
        // The byte's group fails, whatever part of it is asked for, and nothing of a
        // failed read is left in the output.
        for (offset, len) in [
            (flipped, 1),
            (flipped - 50, 100),
            (
                flipped - flipped % GROUP_BYTES as usize,
                GROUP_BYTES as usize,
            ),
            (flipped + 1, 10),
            (0, blob.data.len()),
        ] {
            let mut out = vec![0xAAu8; len];
            match outboard.read_verified(&file, &mut out, offset as u64) {
                Err(OutboardError::Mismatch { digest, start, end }) => {
                    assert_eq!(digest, blob.digest);
                    assert!((start..end).contains(&(flipped as u64)));
                }
                other => panic!("{offset}+{len}: {other:?}"),
            }
            let start = offset - offset % GROUP_BYTES as usize;
            if len < MAX_CHECK_SPAN && (start != offset || len % GROUP_BYTES as usize != 0) {
                // Checked in the scratch buffer: the output was not touched.
                assert!(out.iter().all(|&b| b == 0xAA));
            }
        }
        // Groups before and after it read right.
        for offset in [
            0,
            flipped - flipped % GROUP_BYTES as usize - 10,
            flipped + 20000,
        ] {
            let mut out = vec![0u8; 10];
            outboard
                .read_verified(&file, &mut out, offset as u64)
                .unwrap();
            assert_eq!(out, &bad[offset..offset + 10]);
        }
    }

    #[test]
    fn an_outboard_for_other_bytes_fails() {
        let blob = blob(2 * OUTBOARD_MIN_BLOB as usize);
        // Same size, other content: its outboard's root is not this digest.
        let other = data(blob.data.len(), 99);
        let (_, other_outboard) = hashed(&other, 1 << 20);
        std::fs::write(&blob.outboard_path, other_outboard.unwrap()).unwrap();
        let outboard = open(&blob);
        let mut out = vec![0u8; 4096];
        assert!(matches!(
            outboard.read_verified(&blob.file, &mut out, 0),
            Err(OutboardError::Mismatch { .. })
        ));

        // One hash pair flipped (the last in pre-order: the lowest one on the right): the
        // groups under it fail, the others still read right.
        let (_, good) = hashed(&blob.data, 1 << 20);
        let mut bytes = good.unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&blob.outboard_path, &bytes).unwrap();
        let outboard = open(&blob);
        let size = blob.data.len() as u64;
        assert!(
            outboard
                .read_verified(&blob.file, &mut out, size - 4096)
                .is_err()
        );
        outboard.read_verified(&blob.file, &mut out, 0).unwrap();
        assert_eq!(out, &blob.data[..4096]);
    }

    #[test]
    fn a_truncated_blob_fails() {
        let blob = blob(2 * OUTBOARD_MIN_BLOB as usize);
        let path = blob._dir.path().join("short");
        std::fs::write(&path, &blob.data[..blob.data.len() - 100]).unwrap();
        let file = File::open(&path).unwrap();
        let outboard = open(&blob);
        let mut out = vec![0u8; 4096];
        let end = blob.data.len() as u64;
        assert!(matches!(
            outboard.read_verified(&file, &mut out, end - 4096),
            Err(OutboardError::Truncated { .. })
        ));
        // The groups the file still holds whole are fine.
        outboard.read_verified(&file, &mut out, 0).unwrap();
    }

    #[test]
    fn unusable_outboards_are_named() {
        let blob = blob(2 * OUTBOARD_MIN_BLOB as usize);
        let size = blob.data.len() as u64;
        // Another size than the blob's.
        assert!(matches!(
            Outboard::open(&blob.outboard_path, blob.digest, size + 1),
            Err(OutboardError::Unusable { .. })
        ));
        // Cut short.
        let bytes = std::fs::read(&blob.outboard_path).unwrap();
        std::fs::write(&blob.outboard_path, &bytes[..bytes.len() - 64]).unwrap();
        assert!(matches!(
            Outboard::open(&blob.outboard_path, blob.digest, size),
            Err(OutboardError::Unusable { .. })
        ));
        std::fs::write(&blob.outboard_path, &bytes[..10]).unwrap();
        assert!(matches!(
            Outboard::open(&blob.outboard_path, blob.digest, size),
            Err(OutboardError::Unusable { .. })
        ));
        std::fs::remove_file(&blob.outboard_path).unwrap();
        assert!(
            Outboard::open(&blob.outboard_path, blob.digest, size)
                .unwrap()
                .is_none()
        );
    }
}
