//! Importing host files into the store, giving the very store path `nix-store --add` gives.
//!
//! One pass over the tree: each file is read once, its bytes going both into a blob and
//! into the SHA-256 of the tree's NAR, which names the store path.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::castore::{Directory, Node, PathComponent, ValidateError, validate_symlink_target};
use crate::nar::{MAX_DEPTH, NarEmitter, NarHasher};
use crate::pathinfo::{ContentAddress, PathInfo};
use crate::proto::nar_info::ca::Hash as CaHash;
use crate::store::{Store, StoreError};
use crate::store_path::{StorePath, StorePathError};

const READ_CHUNK: usize = 256 * 1024;

/// Why a host path could not be imported; `path` is the host path at fault.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum ImportError {
    /// Reading it failed.
    #[error("cannot import {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A device, socket or FIFO.
    #[error(
        "cannot import {path}: it is a {kind}, and the store holds only files, directories and symlinks"
    )]
    UnsupportedType { path: PathBuf, kind: &'static str },
    /// A name or symlink target the castore does not allow.
    #[error("cannot import {path}: {source}")]
    Invalid {
        path: PathBuf,
        source: ValidateError,
    },
    /// The top-level name is not a valid store path name.
    #[error("cannot import {path}: its name does not make a valid store path name: {source}")]
    BadName {
        path: PathBuf,
        source: StorePathError,
    },
    /// Directories nest deeper than [`MAX_DEPTH`].
    #[error("cannot import {path}: directories nest deeper than {MAX_DEPTH} levels")]
    TooDeep { path: PathBuf },
    /// A file changed size while it was read.
    #[error(
        "cannot import {path}: the file changed size while being read ({expected} bytes expected)"
    )]
    Changed { path: PathBuf, expected: u64 },
    /// Storing a blob, directory or the path info failed.
    #[error("cannot import {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImportError + '_ {
    move |source| ImportError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Import `path` (a directory, file or symlink; a symlink is stored as a symlink, as Nix
/// does) and record its path info. `progress` is told how many file bytes were read.
pub fn import_path(
    store: &Store,
    path: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<PathInfo, ImportError> {
    let name = store_path_name(path)?;
    fs::symlink_metadata(path).map_err(io_err(path))?;

    let mut walker = Walker {
        store,
        nar: NarEmitter::new(NarHasher::default()).map_err(io_err(path))?,
        progress,
        open: Vec::new(),
    };
    let node = walker.walk(path)?;
    let (nar_sha256, nar_size) = walker.nar.into_inner().finish();
    let store_path =
        StorePath::for_nar_sha256(&name, &nar_sha256).map_err(|source| ImportError::BadName {
            path: path.to_owned(),
            source,
        })?;
    let info = PathInfo {
        store_path,
        node,
        references: Vec::new(),
        nar_size,
        nar_sha256,
        signatures: Vec::new(),
        deriver: None,
        ca: Some(ContentAddress {
            hash: CaHash::NarSha256,
            digest: nar_sha256.to_vec().into(),
        }),
    };
    store
        .put_path_info(&info)
        .map_err(|source| ImportError::Store {
            path: path.to_owned(),
            source,
        })?;
    Ok(info)
}

/// The store path name Nix takes for `path`: its base name, after resolving `.` and `..`.
fn store_path_name(path: &Path) -> Result<String, ImportError> {
    let absolute = std::path::absolute(path).map_err(io_err(path))?;
    let normalized: PathBuf = absolute.components().fold(PathBuf::new(), |mut acc, c| {
        match c {
            std::path::Component::ParentDir => {
                acc.pop();
            }
            std::path::Component::CurDir => {}
            other => acc.push(other),
        }
        acc
    });
    let bad = |source| ImportError::BadName {
        path: path.to_owned(),
        source,
    };
    let name = normalized
        .file_name()
        .ok_or_else(|| bad(StorePathError::BadName(String::new())))?
        .to_str()
        .ok_or_else(|| bad(StorePathError::BadName(path.display().to_string())))?
        .to_owned();
    crate::store_path::validate_name(&name).map_err(bad)?;
    Ok(name)
}

/// A directory being imported: its remaining entries, and what is done of it.
struct OpenDirectory {
    path: PathBuf,
    remaining: std::vec::IntoIter<std::ffi::OsString>,
    directory: Directory,
    /// The entry being imported now.
    current: Option<(PathComponent, PathBuf)>,
}

struct Walker<'a> {
    store: &'a Store,
    nar: NarEmitter<NarHasher>,
    progress: &'a mut dyn FnMut(u64),
    /// Directories are walked with an explicit stack, so depth costs heap, not stack.
    open: Vec<OpenDirectory>,
}

impl Walker<'_> {
    fn walk(&mut self, root: &Path) -> Result<Node, ImportError> {
        if let Some(leaf) = self.node(root)? {
            return Ok(leaf);
        }
        loop {
            let top = self.open.last_mut().expect("a directory is open");
            match top.remaining.next() {
                Some(name) => {
                    let child_path = top.path.join(&name);
                    let component = PathComponent::try_from(name.as_bytes()).map_err(|source| {
                        ImportError::Invalid {
                            path: child_path.clone(),
                            source,
                        }
                    })?;
                    top.current = Some((component, child_path.clone()));
                    self.nar
                        .start_entry(name.as_bytes())
                        .map_err(io_err(&child_path))?;
                    if let Some(leaf) = self.node(&child_path)? {
                        self.finish_entry(leaf)?;
                    }
                }
                None => {
                    let done = self.open.pop().expect("a directory is open");
                    self.nar.close().map_err(io_err(&done.path))?;
                    let size = done.directory.size();
                    let digest = self.store.directories.put(&done.directory).map_err(|e| {
                        ImportError::Store {
                            path: done.path.clone(),
                            source: e.into(),
                        }
                    })?;
                    let node = Node::Directory { digest, size };
                    if self.open.is_empty() {
                        return Ok(node);
                    }
                    self.finish_entry(node)?;
                }
            }
        }
    }

    /// Close the current entry of the innermost open directory, adding `node` to it.
    fn finish_entry(&mut self, node: Node) -> Result<(), ImportError> {
        let parent = self.open.last_mut().expect("a directory is open");
        let (name, path) = parent.current.take().expect("an entry is open");
        self.nar.close().map_err(io_err(&path))?;
        parent
            .directory
            .add(name, node)
            .map_err(|source| ImportError::Invalid { path, source })
    }

    /// Import a file or symlink whole, or open a directory (returning `None`).
    fn node(&mut self, path: &Path) -> Result<Option<Node>, ImportError> {
        let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
        let file_type = meta.file_type();
        if file_type.is_symlink() {
            let target = fs::read_link(path).map_err(io_err(path))?;
            let target = target.as_os_str().as_bytes();
            validate_symlink_target(target).map_err(|source| ImportError::Invalid {
                path: path.to_owned(),
                source,
            })?;
            self.nar.symlink(target).map_err(io_err(path))?;
            Ok(Some(Node::Symlink {
                target: bytes::Bytes::copy_from_slice(target),
            }))
        } else if file_type.is_file() {
            // Nix marks a file executable when its owner may execute it.
            let executable = meta.permissions().mode() & 0o100 != 0;
            self.file(path, meta.len(), executable).map(Some)
        } else if file_type.is_dir() {
            self.open_directory(path)?;
            Ok(None)
        } else {
            let kind = if file_type.is_socket() {
                "socket"
            } else if file_type.is_fifo() {
                "named pipe"
            } else if file_type.is_block_device() {
                "block device"
            } else if file_type.is_char_device() {
                "character device"
            } else {
                "special file"
            };
            Err(ImportError::UnsupportedType {
                path: path.to_owned(),
                kind,
            })
        }
    }

    fn open_directory(&mut self, path: &Path) -> Result<(), ImportError> {
        if self.open.len() >= MAX_DEPTH {
            return Err(ImportError::TooDeep {
                path: path.to_owned(),
            });
        }
        let mut names = Vec::new();
        for entry in fs::read_dir(path).map_err(io_err(path))? {
            names.push(entry.map_err(io_err(path))?.file_name());
        }
        // NAR and castore both order entries by their bytes.
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        self.nar.start_directory().map_err(io_err(path))?;
        self.open.push(OpenDirectory {
            path: path.to_owned(),
            remaining: names.into_iter(),
            directory: Directory::new(),
            current: None,
        });
        Ok(())
    }

    fn file(&mut self, path: &Path, size: u64, executable: bool) -> Result<Node, ImportError> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let blob_err = |e: crate::blobservice::BlobError| ImportError::Store {
            path: path.to_owned(),
            source: e.into(),
        };
        let mut blob = self.store.blobs.writer().map_err(blob_err)?;
        self.nar
            .start_file(executable, size)
            .map_err(io_err(path))?;
        let mut buf = vec![0u8; READ_CHUNK.min(size as usize + 1)];
        let mut total = 0u64;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(path)(e)),
            };
            total += n as u64;
            if total > size {
                break;
            }
            blob.write_all(&buf[..n]).map_err(io_err(path))?;
            self.nar.contents(&buf[..n]).map_err(io_err(path))?;
            (self.progress)(n as u64);
        }
        if total != size {
            return Err(ImportError::Changed {
                path: path.to_owned(),
                expected: size,
            });
        }
        self.nar.end_file(size).map_err(io_err(path))?;
        let digest = blob.close().map_err(blob_err)?;
        Ok(Node::File {
            digest,
            size,
            executable,
        })
    }
}
