//! A path-info service that substitutes lazily from a Nix binary cache
//! (`nix+http://host/path`, `nix+https://...`, `nix+file:///abs/path`): the first lookup of a
//! path fetches its narinfo and NAR, checks the NAR hash (and a signature by a trusted key
//! when keys are given), ingests the NAR into the blob and directory services and remembers
//! the path info; later lookups are local.
//!
//! Trusted keys come as `?trusted-public-keys=name:base64,name:base64` on the address.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use ed25519_dalek::{Signature as Ed25519Signature, Verifier, VerifyingKey};
use thiserror::Error;

use crate::blobservice::BlobService;
use crate::directoryservice::DirectoryService;
use crate::narinfo::NarInfo;
use crate::nixbase32;
use crate::pathinfo::{IndexedNar, PathInfo, PathInfoError, PathInfoService};
use crate::store_path::DIGEST_LEN;

#[derive(Debug, Error)]
pub enum SubstituteError {
    #[error("invalid binary cache address {url:?}: {reason}")]
    BadAddress { url: String, reason: String },
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("{url}: {source}")]
    NarInfo {
        url: String,
        source: crate::narinfo::NarInfoError,
    },
    #[error("{path}: no signature by a trusted key ({trusted}) verifies")]
    Untrusted { path: String, trusted: String },
    #[error(
        "{url}: the NAR hashes to sha256:{actual} ({actual_size} bytes); the narinfo says sha256:{expected} ({expected_size} bytes)"
    )]
    NarMismatch {
        url: String,
        expected: String,
        actual: String,
        expected_size: u64,
        actual_size: u64,
    },
    #[error("{url}: {source}")]
    Nar {
        url: String,
        source: crate::nar::NarError,
    },
    #[error("{url}: decompressing: {source}")]
    Decompress { url: String, source: std::io::Error },
}

impl From<SubstituteError> for PathInfoError {
    fn from(e: SubstituteError) -> Self {
        PathInfoError::Substitute(Box::new(e))
    }
}

enum Location {
    Http(String),
    Directory(PathBuf),
}

pub struct SubstitutingPathInfoService {
    location: Location,
    trusted_keys: Vec<(String, VerifyingKey)>,
    /// What was substituted (and anything put here directly).
    local: Arc<dyn PathInfoService>,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
}

impl SubstitutingPathInfoService {
    pub fn new(
        url: &str,
        local: Arc<dyn PathInfoService>,
        blobs: Arc<dyn BlobService>,
        directories: Arc<dyn DirectoryService>,
    ) -> Result<Self, SubstituteError> {
        let bad = |reason: &str| SubstituteError::BadAddress {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let mut trusted_keys = Vec::new();
        // Not `query_pairs`: form decoding turns the '+' of base64 keys into spaces.
        let options = parsed
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|o| !o.is_empty());
        for option in options {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            if key != "trusted-public-keys" {
                return Err(bad(&format!("unknown option {key:?}")));
            }
            for entry in value.split([',', ' ']).filter(|e| !e.is_empty()) {
                let (name, b64) = entry
                    .split_once(':')
                    .ok_or_else(|| bad(&format!("key {entry:?} is not name:base64")))?;
                let bytes = data_encoding::BASE64
                    .decode(b64.as_bytes())
                    .map_err(|_| bad(&format!("key {entry:?} is not base64")))?;
                let bytes: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| bad(&format!("key {entry:?} is not 32 bytes")))?;
                let key = VerifyingKey::from_bytes(&bytes)
                    .map_err(|_| bad(&format!("key {entry:?} is not an ed25519 key")))?;
                trusted_keys.push((name.to_owned(), key));
            }
        }
        let location = match parsed.scheme() {
            "nix+http" | "nix+https" => {
                let mut base =
                    format!("{}{}", &parsed.scheme()[4..], &url[parsed.scheme().len()..]);
                if let Some(q) = base.find('?') {
                    base.truncate(q);
                }
                Location::Http(base.trim_end_matches('/').to_owned())
            }
            "nix+file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) || parsed.path().len() <= 1 {
                    return Err(bad("needs an absolute path, as in nix+file:///abs/path"));
                }
                Location::Directory(PathBuf::from(parsed.path()))
            }
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        Ok(Self {
            location,
            trusted_keys,
            local,
            blobs,
            directories,
        })
    }

    fn describe(&self, name: &str) -> String {
        match &self.location {
            Location::Http(base) => format!("{base}/{name}"),
            Location::Directory(dir) => dir.join(name).display().to_string(),
        }
    }

    /// `None` when the cache does not have `name`.
    fn fetch(&self, name: &str) -> Result<Option<Box<dyn Read + Send>>, SubstituteError> {
        let url = self.describe(name);
        let fetch_err = |reason: String| SubstituteError::Fetch {
            url: url.clone(),
            reason,
        };
        match &self.location {
            Location::Http(_) => match ureq::get(&url).call() {
                Ok(response) => Ok(Some(Box::new(response.into_body().into_reader()))),
                Err(ureq::Error::StatusCode(404)) => Ok(None),
                Err(e) => Err(fetch_err(e.to_string())),
            },
            Location::Directory(dir) => match std::fs::File::open(dir.join(name)) {
                Ok(file) => Ok(Some(Box::new(file))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(fetch_err(e.to_string())),
            },
        }
    }

    fn check_signature(&self, narinfo: &NarInfo) -> Result<(), SubstituteError> {
        if self.trusted_keys.is_empty() {
            return Ok(());
        }
        let fingerprint = narinfo.fingerprint();
        let verified = narinfo.signatures.iter().any(|signature| {
            let Ok(bytes) = <[u8; 64]>::try_from(signature.data.as_ref()) else {
                return false;
            };
            self.trusted_keys.iter().any(|(name, key)| {
                *name == signature.name
                    && key
                        .verify(
                            fingerprint.as_bytes(),
                            &Ed25519Signature::from_bytes(&bytes),
                        )
                        .is_ok()
            })
        });
        if verified {
            Ok(())
        } else {
            let trusted: Vec<&str> = self.trusted_keys.iter().map(|(n, _)| n.as_str()).collect();
            Err(SubstituteError::Untrusted {
                path: narinfo.store_path.to_string(),
                trusted: trusted.join(", "),
            })
        }
    }

    fn substitute(&self, digest: &[u8; DIGEST_LEN]) -> Result<Option<PathInfo>, SubstituteError> {
        let name = format!("{}.narinfo", nixbase32::encode(digest));
        let url = self.describe(&name);
        let Some(mut reader) = self.fetch(&name)? else {
            return Ok(None);
        };
        let mut text = String::new();
        reader
            .read_to_string(&mut text)
            .map_err(|e| SubstituteError::Fetch {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let narinfo = NarInfo::parse(&text).map_err(|source| SubstituteError::NarInfo {
            url: url.clone(),
            source,
        })?;
        if narinfo.store_path.digest() != digest {
            return Err(SubstituteError::Fetch {
                url,
                reason: format!("it describes {}", narinfo.store_path),
            });
        }
        self.check_signature(&narinfo)?;

        let nar_url = self.describe(&narinfo.url);
        let compressed = self
            .fetch(&narinfo.url)?
            .ok_or_else(|| SubstituteError::Fetch {
                url: nar_url.clone(),
                reason: "not found".into(),
            })?;
        let decompress_err = |source| SubstituteError::Decompress {
            url: nar_url.clone(),
            source,
        };
        let input = narinfo
            .compression
            .decoder(compressed)
            .map_err(decompress_err)?;
        let ingested =
            crate::nar::ingest_nar(input, &*self.blobs, &*self.directories).map_err(|source| {
                SubstituteError::Nar {
                    url: nar_url.clone(),
                    source,
                }
            })?;
        if ingested.nar_sha256 != narinfo.nar_hash || ingested.nar_size != narinfo.nar_size {
            return Err(SubstituteError::NarMismatch {
                url: nar_url,
                expected: nixbase32::encode(&narinfo.nar_hash),
                actual: nixbase32::encode(&ingested.nar_sha256),
                expected_size: narinfo.nar_size,
                actual_size: ingested.nar_size,
            });
        }
        tracing::info!(path = %narinfo.store_path, "substituted");
        Ok(Some(narinfo.into_path_info(ingested.node)))
    }
}

impl PathInfoService for SubstitutingPathInfoService {
    fn get(&self, digest: &[u8; DIGEST_LEN]) -> Result<Option<PathInfo>, PathInfoError> {
        if let Some(info) = self.local.get(digest)? {
            return Ok(Some(info));
        }
        let Some(info) = self.substitute(digest)? else {
            return Ok(None);
        };
        self.local.put_nar(
            &info.nar_sha256,
            &IndexedNar {
                node: info.node.clone(),
                nar_size: info.nar_size,
            },
        )?;
        self.local.put(&info)?;
        Ok(Some(info))
    }

    fn put(&self, info: &PathInfo) -> Result<(), PathInfoError> {
        self.local.put(info)
    }

    /// Only what was substituted so far: a binary cache cannot be listed.
    fn list(&self) -> Result<Vec<PathInfo>, PathInfoError> {
        self.local.list()
    }

    fn put_nar(&self, nar_sha256: &[u8; 32], nar: &IndexedNar) -> Result<(), PathInfoError> {
        self.local.put_nar(nar_sha256, nar)
    }

    fn get_nar(&self, nar_sha256: &[u8; 32]) -> Result<Option<IndexedNar>, PathInfoError> {
        self.local.get_nar(nar_sha256)
    }

    fn put_nar_file(
        &self,
        file_sha256: &[u8; 32],
        nar_sha256: &[u8; 32],
    ) -> Result<(), PathInfoError> {
        self.local.put_nar_file(file_sha256, nar_sha256)
    }

    fn nar_of_file(&self, file_sha256: &[u8; 32]) -> Result<Option<[u8; 32]>, PathInfoError> {
        self.local.nar_of_file(file_sha256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;

    #[test]
    fn keys_with_plus_and_slash_parse() {
        let store = Store::memory();
        // A real key as nix-store --generate-binary-cache-key prints it: base64 with '+' and '/'.
        let url = "nix+file:///cache?trusted-public-keys=test-1:WM8M69vA7+QE+3dyx/IatJOPoD79iWkgU8toUoqefMo=,other-1:WM8M69vA7%2BQE+3dyx/IatJOPoD79iWkgU8toUoqefMo=";
        let service = SubstitutingPathInfoService::new(
            url,
            store.path_infos.clone(),
            store.blobs.clone(),
            store.directories.clone(),
        )
        .unwrap();
        assert_eq!(service.trusted_keys.len(), 2);
        for bad in [
            "nix+file:///c?trusted-public-keys=x:notbase64",
            "nix+file:///c?other=1",
            "nix+ftp://host/",
            "nix+file://relative",
        ] {
            assert!(
                SubstitutingPathInfoService::new(
                    bad,
                    store.path_infos.clone(),
                    store.blobs.clone(),
                    store.directories.clone()
                )
                .is_err(),
                "{bad}"
            );
        }
    }
}
