//! Path info: what the store knows about a store path — its root node, NAR hash and size,
//! references, signatures, deriver and content address.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use thiserror::Error;

use crate::castore::{Node, ValidateError};
use crate::kv::{Kv, KvError};
use crate::nixbase32;
use crate::proto;
/// The hash algorithm and mode of a [`ContentAddress`].
pub use crate::proto::nar_info::ca::Hash as CaHash;
use crate::store_path::{DIGEST_LEN, StorePath, StorePathError};

/// Why path info is invalid, could not be decoded, or could not be read, stored or
/// substituted.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum PathInfoError {
    /// Wire path info without a root node.
    #[error("path info has no root node")]
    MissingNode,
    /// Wire path info without its narinfo part.
    #[error("path info has no narinfo")]
    MissingNarInfo,
    /// The root node's name is not a store path basename.
    #[error("root node name {name:?} is not a store path: {source}")]
    BadRootName {
        name: String,
        source: StorePathError,
    },
    /// The root node breaks the castore's rules.
    #[error("root node is invalid: {0}")]
    BadNode(#[from] ValidateError),
    /// The NAR SHA-256 is not 32 bytes.
    #[error("NAR sha256 must have 32 bytes, got {0}")]
    BadNarSha256(usize),
    /// A reference digest is not 20 bytes.
    #[error("reference {index} has {len} bytes, expected {DIGEST_LEN}")]
    BadReferenceDigest { index: usize, len: usize },
    /// A reference name is not a store path basename.
    #[error("reference name {name:?} is invalid: {source}")]
    BadReferenceName {
        name: String,
        source: StorePathError,
    },
    /// Reference digests and names differ in number or, at index `digests` (= `names`),
    /// in digest.
    #[error("references ({digests}) and reference names ({names}) disagree")]
    ReferenceMismatch { digests: usize, names: usize },
    /// The deriver is not a valid store path.
    #[error("deriver is invalid: {0}")]
    BadDeriver(StorePathError),
    /// A content address in a form not understood.
    #[error("content address {0:?} is not understood")]
    BadCa(String),
    /// Stored path info that does not decode; `key` names the entry.
    #[error("stored path info for {key} cannot be decoded: {source}")]
    Decode {
        key: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Stored path info for another path than the key it is stored under.
    #[error("stored path info under {key} describes {found}")]
    WrongKey { key: String, found: StorePath },
    /// Substituting the path from a binary cache failed.
    #[error("substituting: {0}")]
    Substitute(Box<crate::substituter::SubstituteError>),
    /// A remote path-info service failed, or sent what it must not.
    #[error("{what} at {url}: {reason}")]
    Remote {
        url: String,
        what: String,
        reason: String,
    },
    /// The key-value backend failed.
    #[error(transparent)]
    Backend(#[from] KvError),
}

/// A signature of a path's narinfo [fingerprint](crate::narinfo::NarInfo::fingerprint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    /// The signing key's name, such as `cache.nixos.org-1`.
    pub name: String,
    /// The ed25519 signature (64 bytes when valid; not checked here).
    pub data: Bytes,
}

impl fmt::Display for Signature {
    /// As in a .narinfo `Sig:` line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.name,
            data_encoding::BASE64.encode(&self.data)
        )
    }
}

/// A content address, as in Nix's `CA:` field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentAddress {
    /// What was hashed, and how.
    pub hash: CaHash,
    /// The hash.
    pub digest: Bytes,
}

impl ContentAddress {
    fn prefix_and_algo(hash: CaHash) -> (&'static str, &'static str) {
        match hash {
            CaHash::NarSha256 => ("fixed:r:", "sha256"),
            CaHash::NarSha1 => ("fixed:r:", "sha1"),
            CaHash::NarSha512 => ("fixed:r:", "sha512"),
            CaHash::NarMd5 => ("fixed:r:", "md5"),
            CaHash::TextSha256 => ("text:", "sha256"),
            CaHash::FlatSha1 => ("fixed:", "sha1"),
            CaHash::FlatMd5 => ("fixed:", "md5"),
            CaHash::FlatSha256 => ("fixed:", "sha256"),
            CaHash::FlatSha512 => ("fixed:", "sha512"),
        }
    }

    fn digest_len(algo: &str) -> usize {
        match algo {
            "md5" => 16,
            "sha1" => 20,
            "sha256" => 32,
            _ => 64,
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (prefix, algo) = Self::prefix_and_algo(self.hash);
        write!(f, "{prefix}{algo}:{}", nixbase32::encode(&self.digest))
    }
}

impl std::str::FromStr for ContentAddress {
    type Err = PathInfoError;
    fn from_str(s: &str) -> Result<Self, PathInfoError> {
        let bad = || PathInfoError::BadCa(s.to_owned());
        let all = [
            CaHash::NarSha256,
            CaHash::NarSha1,
            CaHash::NarSha512,
            CaHash::NarMd5,
            CaHash::TextSha256,
            CaHash::FlatSha1,
            CaHash::FlatMd5,
            CaHash::FlatSha256,
            CaHash::FlatSha512,
        ];
        for hash in all {
            let (prefix, algo) = Self::prefix_and_algo(hash);
            if let Some(encoded) = s
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix(algo))
                .and_then(|r| r.strip_prefix(':'))
            {
                let digest =
                    nixbase32::decode(encoded, Self::digest_len(algo)).map_err(|_| bad())?;
                return Ok(Self {
                    hash,
                    digest: digest.into(),
                });
            }
        }
        Err(bad())
    }
}

/// What the store knows about a store path: its content (a root node) and what Nix
/// records for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    /// The path.
    pub store_path: StorePath,
    /// Its content.
    pub node: Node,
    /// The paths its content refers to.
    pub references: Vec<StorePath>,
    /// Length of its NAR, in bytes.
    pub nar_size: u64,
    /// SHA-256 of its NAR.
    pub nar_sha256: [u8; 32],
    /// Signatures of its narinfo fingerprint.
    pub signatures: Vec<Signature>,
    /// The derivation that built it, if known.
    pub deriver: Option<StorePath>,
    /// Its content address, for a content-addressed path.
    pub ca: Option<ContentAddress>,
}

impl PathInfo {
    pub(crate) fn to_proto(&self) -> proto::PathInfo {
        proto::PathInfo {
            node: Some(self.node.to_proto(self.store_path.to_basename().into())),
            references: self
                .references
                .iter()
                .map(|r| Bytes::copy_from_slice(r.digest()))
                .collect(),
            narinfo: Some(proto::NarInfo {
                nar_size: self.nar_size,
                nar_sha256: Bytes::copy_from_slice(&self.nar_sha256),
                signatures: self
                    .signatures
                    .iter()
                    .map(|s| proto::nar_info::Signature {
                        name: s.name.clone(),
                        data: s.data.clone(),
                    })
                    .collect(),
                reference_names: self.references.iter().map(StorePath::to_basename).collect(),
                // tvix stores the deriver without its ".drv" suffix.
                deriver: self.deriver.as_ref().map(|d| proto::StorePath {
                    name: d.name().strip_suffix(".drv").unwrap_or(d.name()).to_owned(),
                    digest: Bytes::copy_from_slice(d.digest()),
                }),
                ca: self.ca.as_ref().map(|ca| proto::nar_info::Ca {
                    r#type: ca.hash as i32,
                    digest: ca.digest.clone(),
                }),
            }),
        }
    }
}

/// From the wire form (tvix's pathinfo.proto), checking every field.
impl TryFrom<proto::PathInfo> for PathInfo {
    type Error = PathInfoError;

    fn try_from(info: proto::PathInfo) -> Result<Self, PathInfoError> {
        let (name, node) = Node::from_proto(info.node.ok_or(PathInfoError::MissingNode)?)?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let store_path = StorePath::from_basename(&name)
            .map_err(|source| PathInfoError::BadRootName { name, source })?;
        let narinfo = info.narinfo.ok_or(PathInfoError::MissingNarInfo)?;
        let nar_sha256 = narinfo
            .nar_sha256
            .as_ref()
            .try_into()
            .map_err(|_| PathInfoError::BadNarSha256(narinfo.nar_sha256.len()))?;
        if info.references.len() != narinfo.reference_names.len() {
            return Err(PathInfoError::ReferenceMismatch {
                digests: info.references.len(),
                names: narinfo.reference_names.len(),
            });
        }
        let mut references = Vec::with_capacity(info.references.len());
        for (index, (digest, name)) in info
            .references
            .iter()
            .zip(&narinfo.reference_names)
            .enumerate()
        {
            if digest.len() != DIGEST_LEN {
                return Err(PathInfoError::BadReferenceDigest {
                    index,
                    len: digest.len(),
                });
            }
            let reference = StorePath::from_basename(name).map_err(|source| {
                PathInfoError::BadReferenceName {
                    name: name.clone(),
                    source,
                }
            })?;
            if reference.digest()[..] != digest[..] {
                return Err(PathInfoError::ReferenceMismatch {
                    digests: index,
                    names: index,
                });
            }
            references.push(reference);
        }
        let deriver = narinfo
            .deriver
            .map(|d| {
                let digest: [u8; DIGEST_LEN] = d.digest.as_ref().try_into().map_err(|_| {
                    PathInfoError::BadDeriver(StorePathError::TooShort(format!(
                        "{} digest bytes",
                        d.digest.len()
                    )))
                })?;
                StorePath::new(digest, &format!("{}.drv", d.name))
                    .map_err(PathInfoError::BadDeriver)
            })
            .transpose()?;
        let ca = narinfo
            .ca
            .map(|ca| {
                let hash = CaHash::try_from(ca.r#type)
                    .map_err(|_| PathInfoError::BadCa(format!("type {}", ca.r#type)))?;
                Ok::<_, PathInfoError>(ContentAddress {
                    hash,
                    digest: ca.digest,
                })
            })
            .transpose()?;
        Ok(PathInfo {
            store_path,
            node,
            references,
            nar_size: narinfo.nar_size,
            nar_sha256,
            signatures: narinfo
                .signatures
                .into_iter()
                .map(|s| Signature {
                    name: s.name,
                    data: s.data,
                })
                .collect(),
            deriver,
            ca,
        })
    }
}

/// Path info by store path digest, and the NAR index the binary-cache server keeps.
pub trait PathInfoService: Send + Sync {
    /// Look a path up by the 20-byte digest in its name.
    fn get(&self, digest: &[u8; DIGEST_LEN]) -> Result<Option<PathInfo>, PathInfoError>;
    /// Stores `info`, replacing what was stored for its digest. Does not check that its
    /// content is in the store: [`Store::put_path_info`](crate::Store::put_path_info) does.
    fn put(&self, info: &PathInfo) -> Result<(), PathInfoError>;
    /// Every path info stored, sorted by name, then by path.
    fn list(&self) -> Result<Vec<PathInfo>, PathInfoError>;
    /// Remember which root node a NAR with this SHA-256 unpacks to: binary caches name NARs
    /// by hash, and an uploaded NAR comes before the narinfo that names its store path.
    fn put_nar(&self, nar_sha256: &[u8; 32], nar: &IndexedNar) -> Result<(), PathInfoError>;
    /// What [`put_nar`](Self::put_nar) recorded for this NAR hash.
    fn get_nar(&self, nar_sha256: &[u8; 32]) -> Result<Option<IndexedNar>, PathInfoError>;
    /// Remember that the file a client uploaded as `nar/<file_sha256>.nar.<ext>` (a
    /// compressed NAR) is the NAR with `nar_sha256`. Nix keeps the narinfo it uploaded,
    /// with that URL, in its disk cache and asks for that URL again later.
    fn put_nar_file(
        &self,
        file_sha256: &[u8; 32],
        nar_sha256: &[u8; 32],
    ) -> Result<(), PathInfoError>;
    /// The NAR a file uploaded by [`put_nar_file`](Self::put_nar_file) holds.
    fn nar_of_file(&self, file_sha256: &[u8; 32]) -> Result<Option<[u8; 32]>, PathInfoError>;
}

/// A NAR known by its hash: its root node (unnamed) and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedNar {
    /// The root node the NAR unpacks to.
    pub node: Node,
    /// Length of the NAR, in bytes.
    pub nar_size: u64,
}

/// NAR index entries share the key space with path info; their keys are longer, so they
/// never collide with (or list as) the 20-byte path digests.
const NAR_KEY_PREFIX: &[u8] = b"nar:";

fn nar_key(nar_sha256: &[u8; 32]) -> Vec<u8> {
    [NAR_KEY_PREFIX, nar_sha256].concat()
}

/// Uploaded-file entries (file SHA-256 -> NAR SHA-256), kept apart like the NAR index.
const NAR_FILE_KEY_PREFIX: &[u8] = b"file:";

fn nar_file_key(file_sha256: &[u8; 32]) -> Vec<u8> {
    [NAR_FILE_KEY_PREFIX, file_sha256].concat()
}

/// Path info in any key-value backend, keyed by the store path digest.
/// Path info in a key-value backend, keyed by store path digest.
pub struct KvPathInfoService {
    kv: Arc<dyn Kv>,
}

impl KvPathInfoService {
    /// Path info kept in `kv`.
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        Self { kv }
    }

    fn decode(key: &[u8], bytes: &[u8]) -> Result<PathInfo, PathInfoError> {
        let key_text = nixbase32::encode(key);
        let decode_err = |source: Box<dyn std::error::Error + Send + Sync>| PathInfoError::Decode {
            key: key_text.clone(),
            source,
        };
        let proto = proto::PathInfo::decode(bytes).map_err(|e| decode_err(Box::new(e)))?;
        let info = PathInfo::try_from(proto).map_err(|e| decode_err(Box::new(e)))?;
        if info.store_path.digest()[..] != *key {
            return Err(PathInfoError::WrongKey {
                key: key_text,
                found: info.store_path,
            });
        }
        Ok(info)
    }
}

impl PathInfoService for KvPathInfoService {
    fn get(&self, digest: &[u8; DIGEST_LEN]) -> Result<Option<PathInfo>, PathInfoError> {
        self.kv
            .get(digest)?
            .map(|bytes| Self::decode(digest, &bytes))
            .transpose()
    }

    fn put(&self, info: &PathInfo) -> Result<(), PathInfoError> {
        self.kv.put(
            info.store_path.digest(),
            info.to_proto().encode_to_vec().into(),
        )?;
        Ok(())
    }

    fn list(&self) -> Result<Vec<PathInfo>, PathInfoError> {
        let mut infos = Vec::new();
        for key in self
            .kv
            .keys()?
            .into_iter()
            .filter(|k| k.len() == DIGEST_LEN)
        {
            if let Some(bytes) = self.kv.get(&key)? {
                infos.push(Self::decode(&key, &bytes)?);
            }
        }
        infos.sort_by(|a, b| {
            a.store_path
                .name()
                .cmp(b.store_path.name())
                .then(a.store_path.cmp(&b.store_path))
        });
        Ok(infos)
    }

    fn put_nar(&self, nar_sha256: &[u8; 32], nar: &IndexedNar) -> Result<(), PathInfoError> {
        // Stored as a PathInfo message without a name, which carries node and size.
        let proto = proto::PathInfo {
            node: Some(nar.node.to_proto(Bytes::new())),
            references: Vec::new(),
            narinfo: Some(proto::NarInfo {
                nar_size: nar.nar_size,
                ..Default::default()
            }),
        };
        self.kv
            .put(&nar_key(nar_sha256), proto.encode_to_vec().into())?;
        Ok(())
    }

    fn get_nar(&self, nar_sha256: &[u8; 32]) -> Result<Option<IndexedNar>, PathInfoError> {
        let Some(bytes) = self.kv.get(&nar_key(nar_sha256))? else {
            return Ok(None);
        };
        let key = format!("nar sha256:{}", nixbase32::encode(nar_sha256));
        let decode_err = |source: Box<dyn std::error::Error + Send + Sync>| PathInfoError::Decode {
            key: key.clone(),
            source,
        };
        let proto = proto::PathInfo::decode(bytes.as_ref()).map_err(|e| decode_err(Box::new(e)))?;
        let node = proto.node.ok_or_else(|| decode_err("no node".into()))?;
        let (_, node) = Node::from_proto(node).map_err(|e| decode_err(Box::new(e)))?;
        let nar_size = proto.narinfo.map_or(0, |n| n.nar_size);
        Ok(Some(IndexedNar { node, nar_size }))
    }

    fn put_nar_file(
        &self,
        file_sha256: &[u8; 32],
        nar_sha256: &[u8; 32],
    ) -> Result<(), PathInfoError> {
        self.kv
            .put(&nar_file_key(file_sha256), nar_sha256.to_vec().into())?;
        Ok(())
    }

    fn nar_of_file(&self, file_sha256: &[u8; 32]) -> Result<Option<[u8; 32]>, PathInfoError> {
        let Some(bytes) = self.kv.get(&nar_file_key(file_sha256))? else {
            return Ok(None);
        };
        let nar_sha256 =
            <[u8; 32]>::try_from(bytes.as_ref()).map_err(|_| PathInfoError::Decode {
                key: format!("nar file sha256:{}", nixbase32::encode(file_sha256)),
                source: format!("{} bytes where a SHA-256 belongs", bytes.len()).into(),
            })?;
        Ok(Some(nar_sha256))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::B3Digest;
    use crate::kv::MemoryKv;

    fn sample() -> PathInfo {
        let reference = StorePath::from_basename("00bgd045z0d4icpbc2yyz4gx48ak44la-dep").unwrap();
        PathInfo {
            store_path: StorePath::from_basename("1b1w9l4x2ay6hy4bdwiqy2m0rhcjgd20-hello").unwrap(),
            node: Node::File {
                digest: B3Digest::of(b"x"),
                size: 1,
                executable: true,
            },
            references: vec![reference],
            nar_size: 120,
            nar_sha256: [7; 32],
            signatures: vec![Signature {
                name: "cache.example-1".into(),
                data: Bytes::from_static(&[1; 64]),
            }],
            deriver: Some(
                StorePath::from_basename("2c3w9l4x2ay6hy4bdwiqy2m0rhcjgd20-hello.drv").unwrap(),
            ),
            ca: Some(
                "fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
                    .parse()
                    .unwrap(),
            ),
        }
    }

    #[test]
    fn proto_roundtrip_and_service() {
        let info = sample();
        assert_eq!(PathInfo::try_from(info.to_proto()).unwrap(), info);
        assert_eq!(
            info.ca.as_ref().unwrap().to_string(),
            "fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );

        let service = KvPathInfoService::new(Arc::new(MemoryKv::default()));
        service.put(&info).unwrap();
        assert_eq!(
            service.get(info.store_path.digest()).unwrap(),
            Some(info.clone())
        );
        assert_eq!(service.get(&[0; 20]).unwrap(), None);
        assert_eq!(service.list().unwrap(), vec![info.clone()]);

        let nar = IndexedNar {
            node: info.node.clone(),
            nar_size: info.nar_size,
        };
        service.put_nar(&info.nar_sha256, &nar).unwrap();
        assert_eq!(service.get_nar(&info.nar_sha256).unwrap(), Some(nar));
        assert_eq!(service.get_nar(&[1; 32]).unwrap(), None);
        assert_eq!(
            service.list().unwrap().len(),
            1,
            "NAR index entries must not list as paths"
        );
    }

    #[test]
    fn rejects_inconsistent_references() {
        let mut proto = sample().to_proto();
        proto.references[0] = Bytes::from_static(&[9; 20]);
        assert!(matches!(
            PathInfo::try_from(proto.clone()),
            Err(PathInfoError::ReferenceMismatch { .. })
        ));
        proto.references.clear();
        assert!(matches!(
            PathInfo::try_from(proto),
            Err(PathInfoError::ReferenceMismatch { .. })
        ));
    }
}
