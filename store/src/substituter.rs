//! A path-info service that substitutes lazily from a Nix binary cache
//! (`nix+http://host/path`, `nix+https://...`, `nix+file:///abs/path`): the first lookup of a
//! path fetches its narinfo and NAR, checks the NAR hash (and a signature by a trusted key
//! when keys are given), ingests the NAR into the blob and directory services and remembers
//! the path info; later lookups are local.
//!
//! Trusted keys come as `?trusted-public-keys=name:base64,name:base64` on the address.
//! Signatures are required, as Nix requires them by default: an address without trusted
//! keys is refused unless it says `?require-sigs=false` (Nix's setting of that name).
//!
//! A cache is untrusted input: a narinfo may be at most `MAX_NARINFO_BYTES`, its `URL:`
//! must be a relative path inside the cache, and a NAR may not be longer than the
//! `NarSize:` its narinfo declares (checked as it streams in, so a decompression bomb
//! stops there). HTTPS trusts the system's CA store plus the certificates in
//! `NIX_SSL_CERT_FILE` and `SSL_CERT_FILE`, as Nix reads them.

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::{Signature as Ed25519Signature, Verifier, VerifyingKey};
use thiserror::Error;

use crate::blobservice::BlobService;
use crate::directoryservice::DirectoryService;
use crate::narinfo::NarInfo;
use crate::nixbase32;
use crate::pathinfo::{IndexedNar, PathInfo, PathInfoError, PathInfoService};
use crate::store_path::DIGEST_LEN;

/// Why a binary cache's address was refused, or substituting a path from it failed.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum SubstituteError {
    /// An address that does not parse, has an unknown option, a bad key, or no trusted
    /// keys without `require-sigs=false`.
    #[error("invalid binary cache address {url:?}: {reason}")]
    BadAddress { url: String, reason: String },
    /// Fetching a narinfo or NAR failed (HTTP or file).
    #[error("fetching {url}: {reason}")]
    Fetch { url: String, reason: String },
    /// A narinfo that does not parse.
    #[error("{url}: {source}")]
    NarInfo {
        url: String,
        source: crate::narinfo::NarInfoError,
    },
    /// No signature of the narinfo verifies with a trusted key.
    #[error("{path}: no signature by a trusted key ({trusted}) verifies")]
    Untrusted { path: String, trusted: String },
    /// The NAR's hash or size differs from what the narinfo says.
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
    /// The NAR is not valid.
    #[error("{url}: {source}")]
    Nar {
        url: String,
        source: crate::nar::NarError,
    },
    /// The NAR file could not be decompressed.
    #[error("{url}: decompressing: {source}")]
    Decompress { url: String, source: std::io::Error },
    /// A narinfo larger than [`MAX_NARINFO_BYTES`].
    #[error("{url}: the narinfo is larger than {MAX_NARINFO_BYTES} bytes; refused")]
    NarInfoTooLarge { url: String },
    /// A narinfo whose `URL:` is absolute or leaves the cache.
    #[error("{narinfo}: URL {nar_url:?} is not a relative path inside the cache; refused")]
    NarOutsideCache { narinfo: String, nar_url: String },
    /// A CA certificate file named by `NIX_SSL_CERT_FILE` or `SSL_CERT_FILE` could not be
    /// read.
    #[error("cannot read the CA certificates in {path} ({variable}): {reason}")]
    CaFile {
        variable: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Narinfos are a few hundred bytes; even thousands of references fit well below this.
pub const MAX_NARINFO_BYTES: u64 = 1 << 20;

impl From<SubstituteError> for PathInfoError {
    fn from(e: SubstituteError) -> Self {
        PathInfoError::Substitute(Box::new(e))
    }
}

enum Location {
    Http { base: String, agent: ureq::Agent },
    Directory(PathBuf),
}

pub(crate) struct SubstitutingPathInfoService {
    location: Location,
    trusted_keys: Vec<(String, VerifyingKey)>,
    /// False only when the address says `require-sigs=false`.
    require_signatures: bool,
    /// What was substituted (and anything put here directly).
    local: Arc<dyn PathInfoService>,
    blobs: Arc<dyn BlobService>,
    directories: Arc<dyn DirectoryService>,
}

impl SubstitutingPathInfoService {
    pub(crate) fn new(
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
        let mut require_signatures = true;
        // Not `query_pairs`: form decoding turns the '+' of base64 keys into spaces.
        let options = parsed
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|o| !o.is_empty());
        for option in options {
            let (key, value) = option.split_once('=').unwrap_or((option, ""));
            let value = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
            if key == "require-sigs" {
                require_signatures = match &*value {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(bad(&format!(
                            "require-sigs is true or false, not {other:?}"
                        )));
                    }
                };
                continue;
            }
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
                Location::Http {
                    base: base.trim_end_matches('/').to_owned(),
                    agent: https_agent()?,
                }
            }
            "nix+file" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) || parsed.path().len() <= 1 {
                    return Err(bad("needs an absolute path, as in nix+file:///abs/path"));
                }
                Location::Directory(PathBuf::from(parsed.path()))
            }
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        if require_signatures && trusted_keys.is_empty() {
            return Err(bad(
                "no trusted-public-keys given, and signatures are required: add \
                 ?trusted-public-keys=name:base64 (or ?require-sigs=false to accept unsigned paths)",
            ));
        }
        Ok(Self {
            location,
            trusted_keys,
            require_signatures,
            local,
            blobs,
            directories,
        })
    }

    fn describe(&self, name: &str) -> String {
        match &self.location {
            Location::Http { base, .. } => format!("{base}/{name}"),
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
            Location::Http { agent, .. } => match agent.get(&url).call() {
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
        if !self.require_signatures {
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
        let Some(reader) = self.fetch(&name)? else {
            return Ok(None);
        };
        let mut text = String::new();
        reader
            .take(MAX_NARINFO_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| SubstituteError::Fetch {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        if text.len() as u64 > MAX_NARINFO_BYTES {
            return Err(SubstituteError::NarInfoTooLarge { url });
        }
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
        if !is_inside_cache(&narinfo.url) {
            return Err(SubstituteError::NarOutsideCache {
                narinfo: url,
                nar_url: narinfo.url,
            });
        }

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
        let decompressed = narinfo
            .compression
            .decoder(compressed)
            .map_err(decompress_err)?;
        // One byte past the declared size is enough to know the NAR lies about it.
        let input = AtMost {
            inner: decompressed,
            left: narinfo.nar_size.saturating_add(1),
            declared: narinfo.nar_size,
        };
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

/// Whether a narinfo's `URL:` names a file inside the cache: a relative path of plain
/// components, no scheme, no `..`, no absolute path.
fn is_inside_cache(nar_url: &str) -> bool {
    !nar_url.is_empty()
        && !nar_url.contains("://")
        && !nar_url.contains('\\')
        && !nar_url.contains('?')
        && !nar_url.contains('#')
        && Path::new(nar_url)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Reads at most `left` bytes, then fails: a NAR streaming past its declared size is
/// refused there, not after it filled the disk.
struct AtMost<R> {
    inner: R,
    left: u64,
    declared: u64,
}

impl<R: Read> Read for AtMost<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the NAR is longer than the {} bytes its narinfo declares",
                    self.declared
                ),
            ));
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// An HTTP(S) client that trusts the system's CA store plus the certificates named by
/// NIX_SSL_CERT_FILE and SSL_CERT_FILE.
fn https_agent() -> Result<ureq::Agent, SubstituteError> {
    let mut roots: Vec<ureq::tls::Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    for variable in ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"] {
        let Some(path) = std::env::var_os(variable).filter(|p| !p.is_empty()) else {
            continue;
        };
        let path = PathBuf::from(path);
        let ca_err = |reason: String| SubstituteError::CaFile {
            variable,
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read(&path).map_err(|e| ca_err(e.to_string()))?;
        let before = roots.len();
        for item in ureq::tls::parse_pem(&pem) {
            if let ureq::tls::PemItem::Certificate(cert) =
                item.map_err(|e| ca_err(e.to_string()))?
            {
                roots.push(cert.to_owned());
            }
        }
        if roots.len() == before {
            return Err(ca_err("no certificate in it".into()));
        }
    }
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .build();
    Ok(ureq::Agent::config_builder().tls_config(tls).build().into())
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

    /// A `nix+file://` cache in `dir` holding one path (a small file) whose narinfo
    /// `tamper` may change and whose NAR is `nar_tail` longer than it should be.
    /// Returns the path's digest.
    fn malicious_cache(
        dir: &Path,
        tamper: impl FnOnce(&mut NarInfo),
        nar_tail: &[u8],
    ) -> [u8; DIGEST_LEN] {
        let source = dir.join("payload");
        std::fs::write(&source, b"harmless bytes\n").unwrap();
        let scratch = Store::memory();
        let info = crate::import::import_path(&scratch, &source, &mut |_| {}).unwrap();
        let mut nar = Vec::new();
        scratch.write_nar(&info.node, &mut nar).unwrap();
        nar.extend_from_slice(nar_tail);
        let mut narinfo = NarInfo::for_path_info(&info);
        narinfo.url = "nar/payload.nar".into();
        tamper(&mut narinfo);
        let cache = dir.join("cache");
        std::fs::create_dir_all(cache.join("nar")).unwrap();
        std::fs::write(cache.join("nar/payload.nar"), &nar).unwrap();
        let digest = *info.store_path.digest();
        std::fs::write(
            cache.join(format!("{}.narinfo", nixbase32::encode(&digest))),
            narinfo.render(),
        )
        .unwrap();
        digest
    }

    fn substitute(dir: &Path, options: &str, digest: &[u8; DIGEST_LEN]) -> String {
        let store = Store::memory();
        let url = format!("nix+file://{}?{options}", dir.join("cache").display());
        let service = SubstitutingPathInfoService::new(
            &url,
            store.path_infos.clone(),
            store.blobs.clone(),
            store.directories.clone(),
        )
        .unwrap();
        match service.get(digest) {
            Ok(info) => format!("substituted: {info:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_honest_cache_substitutes() {
        let dir = tempfile::tempdir().unwrap();
        let digest = malicious_cache(dir.path(), |_| {}, b"");
        let out = substitute(dir.path(), "require-sigs=false", &digest);
        assert!(out.starts_with("substituted: Some"), "{out}");
    }

    #[test]
    fn a_nar_url_outside_the_cache_is_refused() {
        for url in [
            "../payload",
            "nar/../../payload",
            "/etc/passwd",
            "file:///etc/passwd",
            "http://elsewhere/nar/x.nar",
            "",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let digest = malicious_cache(dir.path(), |n| n.url = url.into(), b"");
            let out = substitute(dir.path(), "require-sigs=false", &digest);
            assert!(
                out.contains("is not a relative path inside the cache"),
                "{url:?}: {out}"
            );
        }
    }

    #[test]
    fn an_oversized_narinfo_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let digest = malicious_cache(
            dir.path(),
            |n| n.url = format!("nar/{}", "x".repeat(MAX_NARINFO_BYTES as usize)),
            b"",
        );
        let out = substitute(dir.path(), "require-sigs=false", &digest);
        assert!(out.contains("narinfo is larger than"), "{out}");
    }

    #[test]
    fn a_nar_longer_than_declared_stops_at_the_declared_size() {
        let dir = tempfile::tempdir().unwrap();
        let digest = malicious_cache(dir.path(), |n| n.nar_size -= 10, b"");
        let out = substitute(dir.path(), "require-sigs=false", &digest);
        assert!(out.contains("longer than the"), "{out}");
        // Megabytes of garbage after an honest NAR: refused, not ingested.
        let dir = tempfile::tempdir().unwrap();
        let digest = malicious_cache(dir.path(), |_| {}, &vec![0u8; 4 << 20]);
        let out = substitute(dir.path(), "require-sigs=false", &digest);
        assert!(out.contains("nar/payload.nar"), "{out}");
        assert!(!out.starts_with("substituted"), "{out}");
    }

    #[test]
    fn unsigned_paths_need_an_explicit_opt_out() {
        let dir = tempfile::tempdir().unwrap();
        let digest = malicious_cache(dir.path(), |_| {}, b"");
        let keys = "trusted-public-keys=test-1:WM8M69vA7+QE+3dyx/IatJOPoD79iWkgU8toUoqefMo=";
        let out = substitute(dir.path(), keys, &digest);
        assert!(
            out.contains("no signature by a trusted key (test-1)"),
            "{out}"
        );
        let store = Store::memory();
        let refused = SubstitutingPathInfoService::new(
            &format!("nix+file://{}", dir.path().join("cache").display()),
            store.path_infos.clone(),
            store.blobs.clone(),
            store.directories.clone(),
        )
        .err()
        .expect("an address without keys is refused");
        assert!(
            refused.to_string().contains("require-sigs=false"),
            "{refused}"
        );
    }
}
