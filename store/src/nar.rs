//! NAR, the Nix archive format: rendering store nodes as NAR bytes identical to
//! `nix-store --dump`, and ingesting NAR streams with strict validation.
//!
//! Written here rather than taken from a crate: the tvix implementation (nix-compat) is not
//! published on crates.io, and ingestion must stream file contents straight into blobs
//! while hashing, with byte offsets in every error.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::blobservice::{BlobError, BlobService};
use crate::castore::{Directory, Node, PathComponent, ValidateError, validate_symlink_target};
use crate::digest::B3Digest;
use crate::directoryservice::{DirectoryError, DirectoryService};

const MAGIC: &[u8] = b"nix-archive-1";
/// Longest token ingestion accepts; the longest valid one is a 4095-byte symlink target.
const MAX_TOKEN_LEN: u64 = 4096;
/// Directory nesting deeper than this is refused: walks use heap stacks, so this only bounds
/// the memory an untrusted NAR can make us hold.
pub const MAX_DEPTH: usize = 1024;
const COPY_CHUNK: usize = 256 * 1024;

/// Why a NAR could not be ingested or rendered. `offset` is where in the NAR stream the
/// problem was found.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum NarError {
    /// The stream ends inside the archive.
    #[error("NAR ends early at byte {offset}")]
    UnexpectedEof { offset: u64 },
    /// Not the token the format requires there.
    #[error("NAR byte {offset}: expected {expected}, found {found:?}")]
    UnexpectedToken {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    /// A string longer than any valid one (4096 bytes), refused before it is read.
    #[error("NAR byte {offset}: a token of {len} bytes is longer than any valid one")]
    TokenTooLong { offset: u64, len: u64 },
    /// Padding after a string or file contents that is not zero.
    #[error("NAR byte {offset}: padding is not zero")]
    NonZeroPadding { offset: u64 },
    /// A name or symlink target the castore does not allow.
    #[error("NAR byte {offset}: {source}")]
    Invalid { offset: u64, source: ValidateError },
    /// Directory entries not in strictly ascending name order.
    #[error("NAR byte {offset}: entry {name:?} is not sorted after {previous:?}")]
    EntryOrder {
        offset: u64,
        name: String,
        previous: String,
    },
    /// Directories nest deeper than [`MAX_DEPTH`].
    #[error("NAR byte {offset}: directories nest deeper than {MAX_DEPTH} levels")]
    TooDeep { offset: u64 },
    /// Bytes after the end of the archive.
    #[error("NAR has trailing data after byte {offset}")]
    TrailingData { offset: u64 },
    /// Reading the NAR, or writing the rendered one, failed.
    #[error("reading NAR: {0}")]
    Io(#[from] io::Error),
    /// Rendering: a blob of the tree is not in the store.
    #[error("blob {digest} of the tree is missing from the store")]
    MissingBlob { digest: B3Digest },
    /// Rendering: a directory of the tree is not in the store.
    #[error("directory {digest} of the tree is missing from the store")]
    MissingDirectory { digest: B3Digest },
    /// Rendering: a blob's length differs from the size its file node records.
    #[error("blob {digest} changed size: expected {expected} bytes, got {actual}")]
    BlobSize {
        digest: B3Digest,
        expected: u64,
        actual: u64,
    },
    /// The blob service failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
    /// The directory service failed.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Emits NAR tokens in order. The caller drives the tree walk, so the same emitter serves
/// rendering from the store and hashing a host tree during import.
pub(crate) struct NarEmitter<W: Write> {
    out: W,
}

impl<W: Write> NarEmitter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        write_str(&mut out, MAGIC)?;
        Ok(Self { out })
    }

    pub fn into_inner(self) -> W {
        self.out
    }

    pub fn symlink(&mut self, target: &[u8]) -> io::Result<()> {
        self.tokens(&[b"(", b"type", b"symlink", b"target", target, b")"])
    }

    /// Starts a regular file of `size` bytes; follow with `contents` and `end_file`.
    pub fn start_file(&mut self, executable: bool, size: u64) -> io::Result<()> {
        self.tokens(&[b"(", b"type", b"regular"])?;
        if executable {
            self.tokens(&[b"executable", b""])?;
        }
        self.tokens(&[b"contents"])?;
        self.out.write_all(&size.to_le_bytes())
    }

    pub fn contents(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)
    }

    pub fn end_file(&mut self, size: u64) -> io::Result<()> {
        self.out.write_all(&[0u8; 8][..padding(size)])?;
        self.tokens(&[b")"])
    }

    pub fn start_directory(&mut self) -> io::Result<()> {
        self.tokens(&[b"(", b"type", b"directory"])
    }

    pub fn start_entry(&mut self, name: &[u8]) -> io::Result<()> {
        self.tokens(&[b"entry", b"(", b"name", name, b"node"])
    }

    /// Ends an entry or a directory: both close with ")".
    pub fn close(&mut self) -> io::Result<()> {
        self.tokens(&[b")"])
    }

    fn tokens(&mut self, tokens: &[&[u8]]) -> io::Result<()> {
        for token in tokens {
            write_str(&mut self.out, token)?;
        }
        Ok(())
    }
}

fn write_str(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    out.write_all(&(data.len() as u64).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&[0u8; 8][..padding(data.len() as u64)])
}

/// Write the NAR of `node` (a store path's root) to `out`.
pub fn render_nar(
    node: &Node,
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
    out: impl Write,
) -> Result<(), NarError> {
    let mut nar = NarEmitter::new(out)?;
    // Directories are walked with an explicit stack of unfinished entry lists.
    let mut open: Vec<std::vec::IntoIter<(PathComponent, Node)>> = Vec::new();
    render_node(&mut nar, node, blobs, directories, &mut open)?;
    while let Some(entries) = open.last_mut() {
        match entries.next() {
            Some((name, child)) => {
                nar.start_entry(name.as_bytes())?;
                if !render_node(&mut nar, &child, blobs, directories, &mut open)? {
                    nar.close()?; // the entry
                }
            }
            None => {
                open.pop();
                nar.close()?; // the directory
                if !open.is_empty() {
                    nar.close()?; // the entry holding it
                }
            }
        }
    }
    Ok(())
}

/// Write a file or symlink whole and return false, or open a directory (pushing its
/// entries) and return true.
fn render_node<W: Write>(
    nar: &mut NarEmitter<W>,
    node: &Node,
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
    open: &mut Vec<std::vec::IntoIter<(PathComponent, Node)>>,
) -> Result<bool, NarError> {
    match node {
        Node::Symlink { target } => nar.symlink(target)?,
        Node::File {
            digest,
            size,
            executable,
        } => {
            let blob = blobs
                .open_sized(digest, *size)?
                .ok_or(NarError::MissingBlob { digest: *digest })?;
            if blob.size() != *size {
                return Err(NarError::BlobSize {
                    digest: *digest,
                    expected: *size,
                    actual: blob.size(),
                });
            }
            nar.start_file(*executable, *size)?;
            let mut buf = vec![0u8; COPY_CHUNK.min(*size as usize)];
            let mut offset = 0u64;
            while offset < *size {
                let n = blob.read_at(&mut buf, offset)?;
                if n == 0 {
                    return Err(NarError::BlobSize {
                        digest: *digest,
                        expected: *size,
                        actual: offset,
                    });
                }
                nar.contents(&buf[..n])?;
                offset += n as u64;
            }
            nar.end_file(*size)?;
        }
        Node::Directory { digest, .. } => {
            let directory = directories
                .get(digest)?
                .ok_or(NarError::MissingDirectory { digest: *digest })?;
            nar.start_directory()?;
            let entries: Vec<_> = directory
                .entries()
                .map(|(n, c)| (n.clone(), c.clone()))
                .collect();
            open.push(entries.into_iter());
            return Ok(true);
        }
    }
    Ok(false)
}

/// SHA-256 and length of a byte stream, as Nix records them for a NAR.
#[derive(Default)]
pub struct NarHasher {
    sha256: Sha256,
    len: u64,
}

impl NarHasher {
    /// The SHA-256 and length of everything written.
    pub fn finish(self) -> ([u8; 32], u64) {
        (self.sha256.finalize().into(), self.len)
    }
}

impl Write for NarHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sha256.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What ingesting a NAR produced.
#[derive(Debug)]
pub struct IngestedNar {
    /// The root node, without a name.
    pub node: Node,
    /// SHA-256 of the NAR's bytes.
    pub nar_sha256: [u8; 32],
    /// Length of the NAR, in bytes.
    pub nar_size: u64,
}

/// Parse a NAR from `input`, storing its files as blobs and its directories, and return the
/// root node with the NAR's hash and size. The stream must hold exactly one NAR. On error,
/// blobs and directories already written stay as unreferenced garbage: nothing points at
/// them, so the store stays consistent.
pub fn ingest_nar(
    input: impl Read,
    blobs: &dyn BlobService,
    directories: &dyn DirectoryService,
) -> Result<IngestedNar, NarError> {
    let mut reader = NarReader {
        input,
        hasher: NarHasher::default(),
        blobs,
        directories,
    };
    reader.expect(MAGIC, "the NAR magic \"nix-archive-1\"")?;
    let node = reader.node()?;
    let mut probe = [0u8; 1];
    if reader.input.read(&mut probe)? != 0 {
        return Err(NarError::TrailingData {
            offset: reader.hasher.len,
        });
    }
    let (nar_sha256, nar_size) = reader.hasher.finish();
    Ok(IngestedNar {
        node,
        nar_sha256,
        nar_size,
    })
}

struct NarReader<'a, R> {
    input: R,
    hasher: NarHasher,
    blobs: &'a dyn BlobService,
    directories: &'a dyn DirectoryService,
}

impl<R: Read> NarReader<'_, R> {
    fn offset(&self) -> u64 {
        self.hasher.len
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        match self.input.read_exact(buf) {
            Ok(()) => {
                self.hasher.write_all(buf)?;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(NarError::UnexpectedEof {
                offset: self.offset(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut buf = [0u8; 8];
        self.read_exact(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let mut pad = [0u8; 8];
        let pad = &mut pad[..padding(len)];
        let offset = self.offset();
        self.read_exact(pad)?;
        if pad.iter().any(|b| *b != 0) {
            return Err(NarError::NonZeroPadding { offset });
        }
        Ok(())
    }

    fn read_token(&mut self) -> Result<Vec<u8>, NarError> {
        let offset = self.offset();
        let len = self.read_u64()?;
        if len > MAX_TOKEN_LEN {
            return Err(NarError::TokenTooLong { offset, len });
        }
        let mut token = vec![0u8; len as usize];
        self.read_exact(&mut token)?;
        self.read_padding(len)?;
        Ok(token)
    }

    fn expect(&mut self, token: &[u8], expected: &'static str) -> Result<(), NarError> {
        let offset = self.offset();
        let found = self.read_token()?;
        if found != token {
            return Err(NarError::UnexpectedToken {
                offset,
                expected,
                found: String::from_utf8_lossy(&found).into(),
            });
        }
        Ok(())
    }

    /// Parse one node. Directories are walked with an explicit stack, not recursion: the
    /// NAR is untrusted, and its nesting must not decide how deep our stack goes.
    fn node(&mut self) -> Result<Node, NarError> {
        struct OpenDirectory {
            directory: Directory,
            /// The entry whose node is being parsed; it also orders the next entry.
            current: Option<PathComponent>,
        }
        let mut open: Vec<OpenDirectory> = Vec::new();
        loop {
            // Parse a node's opening; a file or symlink is complete right away.
            let mut finished = match self.node_start()? {
                Some(leaf) => Some(leaf),
                None => {
                    if open.len() >= MAX_DEPTH {
                        return Err(NarError::TooDeep {
                            offset: self.offset(),
                        });
                    }
                    open.push(OpenDirectory {
                        directory: Directory::new(),
                        current: None,
                    });
                    None
                }
            };
            // Attach finished nodes to their parents until a new entry begins.
            loop {
                if let Some(node) = finished.take() {
                    let Some(parent) = open.last_mut() else {
                        return Ok(node);
                    };
                    self.expect(b")", "\")\" closing an entry")?;
                    let name = parent.current.clone().expect("an entry is open");
                    let offset = self.offset();
                    parent
                        .directory
                        .add(name, node)
                        .map_err(|source| NarError::Invalid { offset, source })?;
                }
                let parent = open.last_mut().expect("inside a directory");
                let offset = self.offset();
                match self.read_token()?.as_slice() {
                    b")" => {
                        let done = open.pop().expect("inside a directory").directory;
                        let size = done.size();
                        let digest = self.directories.put(&done)?;
                        finished = Some(Node::Directory { digest, size });
                    }
                    b"entry" => {
                        self.expect(b"(", "\"(\"")?;
                        self.expect(b"name", "\"name\"")?;
                        let offset = self.offset();
                        let name = PathComponent::try_from(bytes::Bytes::from(self.read_token()?))
                            .map_err(|source| NarError::Invalid { offset, source })?;
                        if let Some(previous) = &parent.current
                            && previous >= &name
                        {
                            return Err(NarError::EntryOrder {
                                offset,
                                name: name.to_string(),
                                previous: previous.to_string(),
                            });
                        }
                        self.expect(b"node", "\"node\"")?;
                        parent.current = Some(name);
                        break;
                    }
                    other => {
                        return Err(NarError::UnexpectedToken {
                            offset,
                            expected: "\"entry\" or \")\"",
                            found: String::from_utf8_lossy(other).into(),
                        });
                    }
                }
            }
        }
    }

    /// Parse `( type <t>`: a whole file or symlink node, or `None` after the opening of a
    /// directory, whose entries follow.
    fn node_start(&mut self) -> Result<Option<Node>, NarError> {
        self.expect(b"(", "\"(\"")?;
        self.expect(b"type", "\"type\"")?;
        let offset = self.offset();
        let node = match self.read_token()?.as_slice() {
            b"regular" => self.regular()?,
            b"symlink" => {
                self.expect(b"target", "\"target\"")?;
                let offset = self.offset();
                let target = self.read_token()?;
                validate_symlink_target(&target)
                    .map_err(|source| NarError::Invalid { offset, source })?;
                Node::Symlink {
                    target: target.into(),
                }
            }
            b"directory" => return Ok(None),
            other => {
                return Err(NarError::UnexpectedToken {
                    offset,
                    expected: "a node type (regular, symlink, directory)",
                    found: String::from_utf8_lossy(other).into(),
                });
            }
        };
        self.expect(b")", "\")\"")?;
        Ok(Some(node))
    }

    fn regular(&mut self) -> Result<Node, NarError> {
        let offset = self.offset();
        let executable = match self.read_token()?.as_slice() {
            b"executable" => {
                self.expect(b"", "an empty string after \"executable\"")?;
                self.expect(b"contents", "\"contents\"")?;
                true
            }
            b"contents" => false,
            other => {
                return Err(NarError::UnexpectedToken {
                    offset,
                    expected: "\"executable\" or \"contents\"",
                    found: String::from_utf8_lossy(other).into(),
                });
            }
        };
        let size = self.read_u64()?;
        let mut writer = self.blobs.writer()?;
        let mut buf = vec![0u8; COPY_CHUNK.min(size as usize)];
        let mut remaining = size;
        while remaining > 0 {
            let chunk = &mut buf[..remaining.min(COPY_CHUNK as u64) as usize];
            self.read_exact(chunk)?;
            writer.write_all(chunk)?;
            remaining -= chunk.len() as u64;
        }
        let digest = writer.close()?;
        self.read_padding(size)?;
        Ok(Node::File {
            digest,
            size,
            executable,
        })
    }
}
