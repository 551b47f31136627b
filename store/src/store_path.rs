//! Nix store paths: `/nix/store/<nixbase32 of 20 bytes>-<name>`, and how Nix computes them.

use std::fmt;

use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::nixbase32;

/// The store directory; the only one supported.
pub const STORE_DIR: &str = "/nix/store";
/// Length of a store path's digest, in bytes (32 nixbase32 characters in its name).
pub const DIGEST_LEN: usize = 20;
const ENCODED_DIGEST_LEN: usize = nixbase32::encoded_len(DIGEST_LEN);
const MAX_NAME_LEN: usize = 211;

/// Why text is not a store path.
#[derive(Debug, Error, PartialEq, Eq)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum StorePathError {
    /// An absolute path outside [`STORE_DIR`].
    #[error("{0:?} is not in {STORE_DIR}")]
    NotInStore(String),
    /// Too short for a hash, a `-` and a name.
    #[error("store path {0:?} is too short to hold a 32-character hash, '-' and a name")]
    TooShort(String),
    /// The hash part is not nixbase32 of 20 bytes.
    #[error("store path {path:?} has an invalid hash: {source}")]
    BadHash {
        path: String,
        source: nixbase32::Nixbase32Error,
    },
    /// No `-` after the hash.
    #[error("store path {0:?} has no '-' after its hash")]
    MissingDash(String),
    /// A name that breaks Nix's rules.
    #[error(
        "store path name {0:?} is invalid: 1 to 211 characters from a-z A-Z 0-9 + - . _ ? =, and not '.' or '..'"
    )]
    BadName(String),
}

/// A store path, without the store directory.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    digest: [u8; DIGEST_LEN],
    name: String,
}

impl StorePath {
    /// The store path with this digest and `name`; fails if the name breaks Nix's rules
    /// (1 to 211 characters from `a-z A-Z 0-9 + - . _ ? =`, not `.` or `..`).
    pub fn new(digest: [u8; DIGEST_LEN], name: &str) -> Result<Self, StorePathError> {
        validate_name(name)?;
        Ok(Self {
            digest,
            name: name.to_owned(),
        })
    }

    /// Parse `<hash>-<name>`, the basename of a store path.
    pub fn from_basename(basename: &str) -> Result<Self, StorePathError> {
        if basename.len() < ENCODED_DIGEST_LEN + 2 {
            return Err(StorePathError::TooShort(basename.to_owned()));
        }
        let (hash, rest) = basename
            .split_at_checked(ENCODED_DIGEST_LEN)
            .ok_or_else(|| StorePathError::BadName(basename.to_owned()))?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash(basename.to_owned()))?;
        let digest =
            nixbase32::decode(hash, DIGEST_LEN).map_err(|source| StorePathError::BadHash {
                path: basename.to_owned(),
                source,
            })?;
        Self::new(
            digest.try_into().expect("decode returns DIGEST_LEN bytes"),
            name,
        )
    }

    /// [`from_basename`](Self::from_basename) for bytes, which must be UTF-8.
    pub fn from_basename_bytes(basename: &[u8]) -> Result<Self, StorePathError> {
        let text = std::str::from_utf8(basename)
            .map_err(|_| StorePathError::BadName(String::from_utf8_lossy(basename).into_owned()))?;
        Self::from_basename(text)
    }

    /// Parse `/nix/store/<hash>-<name>`, allowing a trailing sub-path (`/bin/hello`), which is
    /// returned separately.
    pub fn from_absolute_path(path: &str) -> Result<(Self, &str), StorePathError> {
        let rest = path
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_owned()))?;
        let (basename, sub_path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        Ok((Self::from_basename(basename)?, sub_path))
    }

    /// The digest that the hash part encodes.
    pub fn digest(&self) -> &[u8; DIGEST_LEN] {
        &self.digest
    }

    /// The name, after the hash and `-`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`
    pub fn to_basename(&self) -> String {
        format!("{}-{}", nixbase32::encode(&self.digest), self.name)
    }

    /// `/nix/store/<hash>-<name>`
    pub fn to_absolute_path(&self) -> String {
        format!("{STORE_DIR}/{}", self.to_basename())
    }

    /// The path `nix-store --add` gives a tree whose NAR has this SHA-256: a fixed-output,
    /// recursive (NAR) sha256 path without references, which Nix names "source".
    pub fn for_nar_sha256(name: &str, nar_sha256: &[u8; 32]) -> Result<Self, StorePathError> {
        validate_name(name)?;
        let fingerprint = format!(
            "source:sha256:{}:{STORE_DIR}:{name}",
            data_encoding::HEXLOWER.encode(nar_sha256)
        );
        Self::new(compress_hash(&Sha256::digest(fingerprint.as_bytes())), name)
    }
}

/// Nix folds a hash into 20 bytes by XOR-ing it onto itself.
fn compress_hash(hash: &[u8]) -> [u8; DIGEST_LEN] {
    let mut out = [0u8; DIGEST_LEN];
    for (i, byte) in hash.iter().enumerate() {
        out[i % DIGEST_LEN] ^= byte;
    }
    out
}

pub(crate) fn validate_name(name: &str) -> Result<(), StorePathError> {
    let valid_char = |c: u8| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c);
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || !name.bytes().all(valid_char)
    {
        return Err(StorePathError::BadName(name.to_owned()));
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_absolute_path())
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.to_basename())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let path = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432";
        let (parsed, rest) = StorePath::from_absolute_path(path).unwrap();
        assert_eq!(rest, "");
        assert_eq!(parsed.to_absolute_path(), path);
        assert_eq!(parsed.name(), "net-tools-1.60_p20170221182432");

        let with_sub_path = format!("{path}/bin/ls");
        let (parsed, rest) = StorePath::from_absolute_path(&with_sub_path).unwrap();
        assert_eq!(rest, "/bin/ls");
        assert_eq!(parsed.to_absolute_path(), path);
    }

    #[test]
    fn rejects_invalid() {
        for bad in [
            "00bgd045z0d4icpbc2yyz4gx48ak44la",
            "00bgd045z0d4icpbc2yyz4gx48ak44la-",
            "00bgd045z0d4icpbc2yyz4gx48ak44la_x",
            "00bgd045z0d4icpbc2yyz4gx48ak44le-x",
            "00bgd045z0d4icpbc2yyz4gx48ak44la-a b",
            "00bgd045z0d4icpbc2yyz4gx48ak44la-..",
            "00bgd045z0d4icpbc2yyz4gx48ak44la-ä",
            "short",
        ] {
            assert!(StorePath::from_basename(bad).is_err(), "{bad} accepted");
        }
        let long = format!("00bgd045z0d4icpbc2yyz4gx48ak44la-{}", "a".repeat(212));
        assert!(StorePath::from_basename(&long).is_err());
        assert!(StorePath::from_absolute_path("/nix/stor/x").is_err());
    }
}
