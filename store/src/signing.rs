//! Signing narinfos with a Nix binary-cache key, as nix-serve and harmonia do.
//!
//! A secret key file holds one line `name:base64`, the base64 of 64 bytes (the ed25519
//! seed, then the public key), as `nix-store --generate-binary-cache-key` writes it. A
//! signature is over the narinfo's fingerprint and reads `Sig: name:base64(signature)`.

use std::path::{Path, PathBuf};

use data_encoding::BASE64;
use ed25519_dalek::{Signer, SigningKey as Ed25519Key};
use thiserror::Error;

use crate::narinfo::NarInfo;
use crate::pathinfo::Signature;

/// Why a secret key file cannot be used.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum SigningKeyError {
    /// The file cannot be read.
    #[error("cannot read secret key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Its contents are not a Nix secret key.
    #[error("secret key {}: {reason} (expected name:base64 of 64 bytes, as nix-store --generate-binary-cache-key writes)", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// A binary-cache signing key: its name and ed25519 key.
pub struct SigningKey {
    name: String,
    key: Ed25519Key,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        write!(f, "SigningKey({})", self.name)
    }
}

impl SigningKey {
    /// Reads a key file written by `nix-store --generate-binary-cache-key`.
    pub fn read(path: &Path) -> Result<Self, SigningKeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| SigningKeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(text.trim()).map_err(|reason| SigningKeyError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Parses `name:base64`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, encoded) = text
            .split_once(':')
            .ok_or_else(|| "no ':' between name and key".to_owned())?;
        if name.is_empty() {
            return Err("the key has no name".into());
        }
        let bytes = BASE64
            .decode(encoded.as_bytes())
            .map_err(|e| format!("the key is not base64: {e}"))?;
        let bytes: [u8; 64] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("the key has {} bytes", bytes.len()))?;
        let key = Ed25519Key::from_keypair_bytes(&bytes)
            .map_err(|_| "its public half does not belong to its secret half".to_owned())?;
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }

    /// The key's name, as in `trusted-public-keys`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key as Nix's `trusted-public-keys` takes it: `name:base64`.
    pub fn public_key(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(self.key.verifying_key().as_bytes())
        )
    }

    /// The signature of `narinfo`'s fingerprint.
    pub fn sign(&self, narinfo: &NarInfo) -> Signature {
        let signature = self.key.sign(narinfo.fingerprint().as_bytes());
        Signature {
            name: self.name.clone(),
            data: signature.to_bytes().to_vec().into(),
        }
    }

    /// Adds this key's signature to `narinfo`, replacing any it had by this key's name.
    pub fn sign_narinfo(&self, narinfo: &mut NarInfo) {
        let signature = self.sign(narinfo);
        narinfo.signatures.retain(|s| s.name != self.name);
        narinfo.signatures.push(signature);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    #[test]
    fn parses_signs_and_refuses() {
        let seed = [7u8; 32];
        let key = Ed25519Key::from_bytes(&seed);
        let text = format!("test-1:{}", BASE64.encode(&key.to_keypair_bytes()));
        let signing = SigningKey::parse(&text).unwrap();
        assert_eq!(signing.name(), "test-1");
        assert!(signing.public_key().starts_with("test-1:"));
        let narinfo = NarInfo::parse(
            "StorePath: /nix/store/1b1w9l4x2ay6hy4bdwiqy2m0rhcjgd20-hello\nURL: nar/x.nar\n\
             Compression: none\nNarHash: sha256:1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d\n\
             NarSize: 120\nReferences: \n",
        )
        .unwrap();
        let signature = signing.sign(&narinfo);
        let bytes: [u8; 64] = signature.data[..].try_into().unwrap();
        key.verifying_key()
            .verify(
                narinfo.fingerprint().as_bytes(),
                &ed25519_dalek::Signature::from_bytes(&bytes),
            )
            .unwrap();
        for bad in ["nocolon", ":AAAA", "x:not base64!", "x:AAAA"] {
            assert!(SigningKey::parse(bad).is_err(), "{bad}");
        }
        // A key whose public half is not its own.
        let mut pair = key.to_keypair_bytes();
        pair[40] ^= 1;
        assert!(SigningKey::parse(&format!("x:{}", BASE64.encode(&pair))).is_err());
    }
}
