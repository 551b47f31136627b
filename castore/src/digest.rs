//! BLAKE3 digests that name blobs and directories.

use std::fmt;

use data_encoding::BASE64;
use thiserror::Error;

/// A BLAKE3-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct B3Digest([u8; 32]);

/// Why bytes or text are not a [`B3Digest`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DigestError {
    /// Raw bytes, not 32 of them.
    #[error("a BLAKE3 digest has 32 bytes, got {0}")]
    WrongLength(usize),
    /// Text that is not `b3:` and the base64 of 32 bytes.
    #[error("{0:?} is not a b3:<base64> digest")]
    BadText(String),
}

impl B3Digest {
    /// Length of a digest, in bytes.
    pub const LEN: usize = 32;

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, used as the object name in file-based backends.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }
}

impl From<[u8; 32]> for B3Digest {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<blake3::Hash> for B3Digest {
    fn from(hash: blake3::Hash) -> Self {
        Self(*hash.as_bytes())
    }
}

impl TryFrom<&[u8]> for B3Digest {
    type Error = DigestError;
    fn try_from(bytes: &[u8]) -> Result<Self, DigestError> {
        Ok(Self(
            bytes
                .try_into()
                .map_err(|_| DigestError::WrongLength(bytes.len()))?,
        ))
    }
}

impl std::str::FromStr for B3Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, DigestError> {
        let bad = || DigestError::BadText(s.to_owned());
        let encoded = s.strip_prefix("b3:").ok_or_else(bad)?;
        let bytes = BASE64.decode(encoded.as_bytes()).map_err(|_| bad())?;
        Self::try_from(bytes.as_slice()).map_err(|_| bad())
    }
}

/// The textual form tvix uses: `b3:<base64>`.
impl fmt::Display for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b3:{}", BASE64.encode(&self.0))
    }
}

impl fmt::Debug for B3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_roundtrip() {
        let digest = B3Digest::of(b"hello");
        let text = digest.to_string();
        assert!(text.starts_with("b3:"));
        assert_eq!(text.parse::<B3Digest>().unwrap(), digest);
        assert!("b3:AAAA".parse::<B3Digest>().is_err());
        assert!("sha256:xyz".parse::<B3Digest>().is_err());
        assert_eq!(
            B3Digest::try_from(&[0u8; 31][..]),
            Err(DigestError::WrongLength(31))
        );
    }
}
