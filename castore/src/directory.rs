//! The castore model: directories of named nodes, addressed by BLAKE3 digests.
//!
//! These are the validated in-memory types; `proto` holds their wire form. Converting from
//! the wire form checks every rule tvix checks, so a `Directory` value is always valid.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message;
use thiserror::Error;

use crate::digest::{B3Digest, DigestError};
use crate::proto;

/// Longest entry name, in bytes (Linux's NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target, in bytes (Linux's PATH_MAX less the NUL).
pub const MAX_SYMLINK_TARGET_LEN: usize = 4095;

/// Why a name, node or directory breaks the castore's rules (the ones tvix checks).
#[derive(Debug, Error, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum ValidateError {
    /// An entry name that is empty, longer than [`MAX_NAME_LEN`], `.` or `..`, or has a
    /// `/` or NUL.
    #[error(
        "invalid entry name {0:?}: must be 1..=255 bytes without '/' or NUL, and not '.' or '..'"
    )]
    InvalidName(Bytes),
    /// A symlink target that is empty, longer than [`MAX_SYMLINK_TARGET_LEN`] or has a NUL.
    #[error("invalid symlink target {0:?}: must be 1..=4095 bytes without NUL")]
    InvalidSymlinkTarget(Bytes),
    /// Two entries of one directory with the same name.
    #[error("entry {0:?} appears twice")]
    DuplicateName(Bytes),
    /// A list of entries not in strictly ascending name order.
    #[error("entry {0:?} is out of order: each list must be strictly sorted by name")]
    WrongSorting(Bytes),
    /// A digest that is not 32 bytes.
    #[error("entry {name:?} has an invalid digest: {source}")]
    InvalidDigest { name: Bytes, source: DigestError },
    /// A wire node that is none of directory, file and symlink.
    #[error("node has no content")]
    EmptyNode,
    /// A directory whose [`Directory::size`] overflows `u64`.
    #[error("directory size overflows")]
    SizeOverflow,
    /// Bytes that are not a `Directory` protobuf message.
    #[error("cannot decode directory protobuf: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// A validated entry name: one path component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathComponent(Bytes);

impl PathComponent {
    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<Bytes> for PathComponent {
    type Error = ValidateError;
    fn try_from(name: Bytes) -> Result<Self, ValidateError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name.as_ref() != b"."
            && name.as_ref() != b".."
            && !name.iter().any(|b| *b == b'/' || *b == 0);
        if valid {
            Ok(Self(name))
        } else {
            Err(ValidateError::InvalidName(name))
        }
    }
}

impl TryFrom<&[u8]> for PathComponent {
    type Error = ValidateError;
    fn try_from(name: &[u8]) -> Result<Self, ValidateError> {
        Self::try_from(Bytes::copy_from_slice(name))
    }
}

impl std::fmt::Debug for PathComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl std::fmt::Display for PathComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// Checks a symlink target: 1 to [`MAX_SYMLINK_TARGET_LEN`] bytes, no NUL.
pub fn validate_symlink_target(target: &[u8]) -> Result<(), ValidateError> {
    if target.is_empty() || target.len() > MAX_SYMLINK_TARGET_LEN || target.contains(&0) {
        return Err(ValidateError::InvalidSymlinkTarget(Bytes::copy_from_slice(
            target,
        )));
    }
    Ok(())
}

/// One entry of a directory, without its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Directory {
        /// Names the directory in the directory service.
        digest: B3Digest,
        /// The directory's [`Directory::size`].
        size: u64,
    },
    /// A regular file.
    File {
        /// Names the file's contents in the blob service.
        digest: B3Digest,
        /// Length of the contents, in bytes.
        size: u64,
        /// Whether the file is executable (the NAR format's `executable` flag).
        executable: bool,
    },
    /// A symbolic link.
    Symlink {
        /// Where it points: 1 to [`MAX_SYMLINK_TARGET_LEN`] bytes, no NUL.
        target: Bytes,
    },
}

impl Node {
    /// The wire form of this node under `name`.
    pub fn to_proto(&self, name: Bytes) -> proto::Node {
        let node = match self {
            Node::Directory { digest, size } => {
                proto::node::Node::Directory(proto::DirectoryNode {
                    name,
                    digest: Bytes::copy_from_slice(digest.as_bytes()),
                    size: *size,
                })
            }
            Node::File {
                digest,
                size,
                executable,
            } => proto::node::Node::File(proto::FileNode {
                name,
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                size: *size,
                executable: *executable,
            }),
            Node::Symlink { target } => proto::node::Node::Symlink(proto::SymlinkNode {
                name,
                target: target.clone(),
            }),
        };
        proto::Node { node: Some(node) }
    }

    /// Convert a wire node, returning its (unvalidated) name beside it: a root node's name
    /// is a store path basename, which has rules of its own.
    pub fn from_proto(node: proto::Node) -> Result<(Bytes, Node), ValidateError> {
        match node.node.ok_or(ValidateError::EmptyNode)? {
            proto::node::Node::Directory(d) => {
                let digest = parse_digest(&d.name, &d.digest)?;
                Ok((
                    d.name,
                    Node::Directory {
                        digest,
                        size: d.size,
                    },
                ))
            }
            proto::node::Node::File(f) => {
                let digest = parse_digest(&f.name, &f.digest)?;
                Ok((
                    f.name,
                    Node::File {
                        digest,
                        size: f.size,
                        executable: f.executable,
                    },
                ))
            }
            proto::node::Node::Symlink(s) => {
                validate_symlink_target(&s.target)?;
                Ok((s.name, Node::Symlink { target: s.target }))
            }
        }
    }
}

fn parse_digest(name: &Bytes, digest: &[u8]) -> Result<B3Digest, ValidateError> {
    B3Digest::try_from(digest).map_err(|source| ValidateError::InvalidDigest {
        name: name.clone(),
        source,
    })
}

/// A directory: uniquely named entries, kept sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    entries: BTreeMap<PathComponent, Node>,
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry; fails with [`ValidateError::DuplicateName`] if there is one by that
    /// name.
    pub fn add(&mut self, name: PathComponent, node: Node) -> Result<(), ValidateError> {
        if self.entries.contains_key(&name) {
            return Err(ValidateError::DuplicateName(name.0));
        }
        self.entries.insert(name, node);
        Ok(())
    }

    /// The entry named `name`, if any.
    pub fn get(&self, name: &[u8]) -> Option<&Node> {
        // PathComponent orders as its bytes, so a borrowed lookup needs a key of that type;
        // an invalid name cannot be in the map anyway.
        let key = PathComponent::try_from(name).ok()?;
        self.entries.get(&key)
    }

    /// Entries in name order (the order of the NAR format and of readdir).
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (&PathComponent, &Node)> {
        self.entries.iter()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What a `DirectoryNode` pointing here records as `size`: the number of entries,
    /// plus the sizes of the child directories.
    pub fn size(&self) -> u64 {
        self.entries
            .values()
            .map(|node| match node {
                Node::Directory { size, .. } => 1 + size,
                _ => 1,
            })
            .fold(0u64, u64::saturating_add)
    }

    /// The wire form (its entries split into the three sorted lists).
    pub fn to_proto(&self) -> proto::Directory {
        let mut out = proto::Directory::default();
        for (name, node) in &self.entries {
            match node.to_proto(name.0.clone()).node {
                Some(proto::node::Node::Directory(d)) => out.directories.push(d),
                Some(proto::node::Node::File(f)) => out.files.push(f),
                Some(proto::node::Node::Symlink(s)) => out.symlinks.push(s),
                None => unreachable!("to_proto always sets the node"),
            }
        }
        out
    }

    /// The protobuf encoding (tvix's castore.proto `Directory`) that
    /// [`digest`](Self::digest) hashes.
    pub fn encode(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// BLAKE3 of the protobuf encoding: the name of this directory in the store.
    pub fn digest(&self) -> B3Digest {
        B3Digest::of(&self.encode())
    }

    /// Parses an [`encode`](Self::encode)d directory and checks every rule: lists sorted,
    /// names unique and valid, digests of 32 bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ValidateError> {
        Self::try_from(proto::Directory::decode(bytes)?)
    }

    /// Child directories, for walking a closure.
    pub fn child_directories(&self) -> impl Iterator<Item = (&PathComponent, &B3Digest)> {
        self.entries.iter().filter_map(|(name, node)| match node {
            Node::Directory { digest, .. } => Some((name, digest)),
            _ => None,
        })
    }
}

impl TryFrom<proto::Directory> for Directory {
    type Error = ValidateError;

    fn try_from(dir: proto::Directory) -> Result<Self, ValidateError> {
        // Each list must be strictly sorted on its own; uniqueness across lists is checked by
        // `add`.
        fn check_sorted<'a>(names: impl Iterator<Item = &'a Bytes>) -> Result<(), ValidateError> {
            let mut previous: Option<&Bytes> = None;
            for name in names {
                if previous.is_some_and(|p| p >= name) {
                    return Err(ValidateError::WrongSorting(name.clone()));
                }
                previous = Some(name);
            }
            Ok(())
        }
        check_sorted(dir.directories.iter().map(|d| &d.name))?;
        check_sorted(dir.files.iter().map(|f| &f.name))?;
        check_sorted(dir.symlinks.iter().map(|s| &s.name))?;

        let mut out = Directory::new();
        let mut size = 0u64;
        let nodes = dir
            .directories
            .into_iter()
            .map(proto::node::Node::Directory)
            .chain(dir.files.into_iter().map(proto::node::Node::File))
            .chain(dir.symlinks.into_iter().map(proto::node::Node::Symlink));
        for node in nodes {
            let (name, node) = Node::from_proto(proto::Node { node: Some(node) })?;
            let entry_size = match &node {
                Node::Directory { size, .. } => size.checked_add(1),
                _ => Some(1),
            };
            size = entry_size
                .and_then(|s| size.checked_add(s))
                .ok_or(ValidateError::SizeOverflow)?;
            out.add(PathComponent::try_from(name)?, node)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> PathComponent {
        PathComponent::try_from(s.as_bytes()).unwrap()
    }

    #[test]
    fn empty_directory_digest_matches_tvix() {
        // An empty Directory encodes to zero bytes, so its digest is BLAKE3("").
        assert_eq!(
            Directory::new().digest().to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn roundtrip_and_size() {
        let mut child = Directory::new();
        child
            .add(
                name("a"),
                Node::Symlink {
                    target: Bytes::from_static(b"/x"),
                },
            )
            .unwrap();
        let mut dir = Directory::new();
        dir.add(
            name("sub"),
            Node::Directory {
                digest: child.digest(),
                size: child.size(),
            },
        )
        .unwrap();
        dir.add(
            name("file"),
            Node::File {
                digest: B3Digest::of(b""),
                size: 0,
                executable: true,
            },
        )
        .unwrap();
        dir.add(
            name("link"),
            Node::Symlink {
                target: Bytes::from_static(b"file"),
            },
        )
        .unwrap();
        assert_eq!(dir.size(), 4);
        assert_eq!(Directory::decode(&dir.encode()).unwrap(), dir);
        assert_eq!(
            dir.entries()
                .map(|(n, _)| n.to_string())
                .collect::<Vec<_>>(),
            ["file", "link", "sub"]
        );
        assert!(matches!(
            dir.add(name("sub"), Node::Symlink { target: "x".into() }),
            Err(ValidateError::DuplicateName(_))
        ));
    }

    #[test]
    fn rejects_invalid_wire_directories() {
        let file = |n: &'static [u8]| proto::FileNode {
            name: Bytes::from_static(n),
            digest: Bytes::copy_from_slice(B3Digest::of(b"").as_bytes()),
            size: 0,
            executable: false,
        };
        let symlink = |n: &'static [u8], t: &'static [u8]| proto::SymlinkNode {
            name: Bytes::from_static(n),
            target: Bytes::from_static(t),
        };
        let cases: Vec<proto::Directory> = vec![
            proto::Directory {
                files: vec![file(b"b"), file(b"a")],
                ..Default::default()
            },
            proto::Directory {
                files: vec![file(b"a"), file(b"a")],
                ..Default::default()
            },
            proto::Directory {
                files: vec![file(b"a")],
                symlinks: vec![symlink(b"a", b"x")],
                ..Default::default()
            },
            proto::Directory {
                files: vec![file(b"")],
                ..Default::default()
            },
            proto::Directory {
                files: vec![file(b".")],
                ..Default::default()
            },
            proto::Directory {
                files: vec![file(b"..")],
                ..Default::default()
            },
            proto::Directory {
                files: vec![file(b"a/b")],
                ..Default::default()
            },
            proto::Directory {
                files: vec![file(b"a\0")],
                ..Default::default()
            },
            proto::Directory {
                symlinks: vec![symlink(b"a", b"")],
                ..Default::default()
            },
            proto::Directory {
                symlinks: vec![symlink(b"a", b"x\0")],
                ..Default::default()
            },
            proto::Directory {
                files: vec![proto::FileNode {
                    digest: Bytes::from_static(b"short"),
                    ..file(b"a")
                }],
                ..Default::default()
            },
            proto::Directory {
                directories: vec![proto::DirectoryNode {
                    name: Bytes::from_static(b"d"),
                    digest: Bytes::copy_from_slice(B3Digest::of(b"").as_bytes()),
                    size: u64::MAX,
                }],
                files: vec![file(b"e")],
                ..Default::default()
            },
        ];
        for case in cases {
            assert!(
                Directory::try_from(case.clone()).is_err(),
                "accepted {case:?}"
            );
        }
        let long = Bytes::from(vec![b'x'; 256]);
        assert!(PathComponent::try_from(long).is_err());
        assert!(validate_symlink_target(&vec![b'x'; 4096]).is_err());
        assert!(validate_symlink_target(&vec![b'x'; 4095]).is_ok());
    }
}
