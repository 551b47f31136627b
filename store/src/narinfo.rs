//! The `.narinfo` text format of Nix binary caches: parsing what `nix copy` uploads and
//! rendering what substituters read.

use std::fmt::Write as _;

use thiserror::Error;

use crate::nixbase32;
use crate::pathinfo::{ContentAddress, PathInfo, Signature};
use crate::store_path::{StorePath, StorePathError};

/// Why a .narinfo does not parse.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum NarInfoError {
    /// A line that is not `Key: value`.
    #[error("narinfo line {line:?} is not `Key: value`")]
    BadLine { line: String },
    /// A required field is absent.
    #[error("narinfo lacks the {0} field")]
    Missing(&'static str),
    /// A field whose value does not parse.
    #[error("narinfo field {field} has an invalid value {value:?}")]
    BadValue { field: &'static str, value: String },
    /// A field that should name a store path does not.
    #[error("narinfo field {field}: {source}")]
    BadPath {
        field: &'static str,
        source: StorePathError,
    },
    /// A field that may appear once appears twice.
    #[error("narinfo has the {0} field twice")]
    Duplicate(&'static str),
}

/// How a NAR file is compressed in a binary cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Not compressed.
    None,
    /// xz (`.xz`).
    Xz,
    /// zstd (`.zst`).
    Zstd,
    /// bzip2 (`.bz2`), Nix's default when a narinfo names none.
    Bzip2,
}

impl Compression {
    /// The compression a narinfo's `Compression:` value names (empty means none); `None`
    /// for one not supported.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "none" | "" => Some(Self::None),
            "xz" => Some(Self::Xz),
            "zstd" => Some(Self::Zstd),
            "bzip2" => Some(Self::Bzip2),
            _ => None,
        }
    }

    /// The file name extension Nix gives NARs compressed this way.
    pub fn extension(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Xz => ".xz",
            Self::Zstd => ".zst",
            Self::Bzip2 => ".bz2",
        }
    }

    /// The compression of a NAR file whose name ends `.nar` plus `extension` (one of
    /// [`extension`](Self::extension)'s values).
    pub fn from_extension(extension: &str) -> Option<Self> {
        match extension {
            "" => Some(Self::None),
            ".xz" => Some(Self::Xz),
            ".zst" => Some(Self::Zstd),
            ".bz2" => Some(Self::Bzip2),
            _ => None,
        }
    }

    /// A reader that undoes this compression.
    pub fn decoder<'a>(
        self,
        input: impl std::io::Read + 'a,
    ) -> std::io::Result<Box<dyn std::io::Read + 'a>> {
        Ok(match self {
            Self::None => Box::new(input),
            Self::Xz => Box::new(xz2::read::XzDecoder::new(input)),
            Self::Zstd => Box::new(zstd::Decoder::new(input)?),
            Self::Bzip2 => Box::new(bzip2::read::BzDecoder::new(input)),
        })
    }

    /// Runs `produce` with a writer that compresses into `out`, then finishes the
    /// compressed stream and returns `out`. Fast presets: this serves downloads.
    pub fn encode<W: std::io::Write>(
        self,
        out: W,
        produce: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> std::io::Result<W> {
        match self {
            Self::None => {
                let mut out = out;
                produce(&mut out)?;
                Ok(out)
            }
            Self::Xz => {
                let mut encoder = xz2::write::XzEncoder::new(out, 1);
                produce(&mut encoder)?;
                encoder.finish()
            }
            Self::Zstd => {
                let mut encoder = zstd::Encoder::new(out, 3)?;
                produce(&mut encoder)?;
                encoder.finish()
            }
            Self::Bzip2 => {
                let mut encoder = bzip2::write::BzEncoder::new(out, bzip2::Compression::fast());
                produce(&mut encoder)?;
                encoder.finish()
            }
        }
    }

    /// The name a narinfo's `Compression:` field gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
        }
    }
}

/// A parsed .narinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    /// The path described (`StorePath:`).
    pub store_path: StorePath,
    /// Where the NAR file is, relative to the cache (`URL:`).
    pub url: String,
    /// How that file is compressed (`Compression:`).
    pub compression: Compression,
    /// SHA-256 of the file as stored (`FileHash:`).
    pub file_hash: Option<[u8; 32]>,
    /// Size of the file as stored, in bytes (`FileSize:`).
    pub file_size: Option<u64>,
    /// SHA-256 of the uncompressed NAR (`NarHash:`).
    pub nar_hash: [u8; 32],
    /// Size of the uncompressed NAR, in bytes (`NarSize:`).
    pub nar_size: u64,
    /// The paths this one refers to (`References:`).
    pub references: Vec<StorePath>,
    /// The derivation that built the path (`Deriver:`).
    pub deriver: Option<StorePath>,
    /// Signatures of the [`fingerprint`](Self::fingerprint) (`Sig:`, one per line).
    pub signatures: Vec<Signature>,
    /// The content address of a content-addressed path (`CA:`).
    pub ca: Option<ContentAddress>,
}

/// Parse `sha256:<nixbase32>` (or 64 hex digits after `sha256:`).
fn parse_sha256(field: &'static str, value: &str) -> Result<[u8; 32], NarInfoError> {
    let bad = || NarInfoError::BadValue {
        field,
        value: value.to_owned(),
    };
    let digest = value.strip_prefix("sha256:").ok_or_else(bad)?;
    let bytes = if digest.len() == 64 {
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(digest.as_bytes())
            .map_err(|_| bad())?
    } else {
        nixbase32::decode(digest, 32).map_err(|_| bad())?
    };
    bytes.try_into().map_err(|_| bad())
}

fn parse_basename(field: &'static str, value: &str) -> Result<StorePath, NarInfoError> {
    StorePath::from_basename(value).map_err(|source| NarInfoError::BadPath { field, source })
}

impl NarInfo {
    /// Parses a .narinfo. StorePath, URL, NarHash and NarSize are required; a missing
    /// Compression means bzip2, as in Nix; fields not listed on [`NarInfo`] are ignored.
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut fields: Vec<(&str, &str)> = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line.split_once(": ").ok_or_else(|| NarInfoError::BadLine {
                line: line.to_owned(),
            })?;
            fields.push((key, value.trim()));
        }
        let single = |name: &'static str| -> Result<Option<&str>, NarInfoError> {
            let mut values = fields.iter().filter(|(k, _)| *k == name).map(|(_, v)| *v);
            let first = values.next();
            if values.next().is_some() {
                return Err(NarInfoError::Duplicate(name));
            }
            Ok(first)
        };
        let required = |name: &'static str| single(name)?.ok_or(NarInfoError::Missing(name));
        let number = |name: &'static str, value: &str| {
            value.parse::<u64>().map_err(|_| NarInfoError::BadValue {
                field: name,
                value: value.to_owned(),
            })
        };

        let store_path_text = required("StorePath")?;
        let (store_path, rest) =
            StorePath::from_absolute_path(store_path_text).map_err(|source| {
                NarInfoError::BadPath {
                    field: "StorePath",
                    source,
                }
            })?;
        if !rest.is_empty() {
            return Err(NarInfoError::BadValue {
                field: "StorePath",
                value: store_path_text.to_owned(),
            });
        }
        let compression_text = single("Compression")?.unwrap_or("bzip2");
        let compression =
            Compression::parse(compression_text).ok_or_else(|| NarInfoError::BadValue {
                field: "Compression",
                value: compression_text.to_owned(),
            })?;
        let references = match single("References")? {
            Some(list) => list
                .split_whitespace()
                .map(|r| parse_basename("References", r))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let deriver = match single("Deriver")? {
            Some("unknown-deriver") | None => None,
            Some(d) => Some(parse_basename("Deriver", d)?),
        };
        let mut signatures = Vec::new();
        for (_, value) in fields.iter().filter(|(k, _)| *k == "Sig") {
            let bad = || NarInfoError::BadValue {
                field: "Sig",
                value: value.to_string(),
            };
            let (name, data) = value.split_once(':').ok_or_else(bad)?;
            let data = data_encoding::BASE64
                .decode(data.as_bytes())
                .map_err(|_| bad())?;
            signatures.push(Signature {
                name: name.to_owned(),
                data: data.into(),
            });
        }
        let ca = single("CA")?
            .map(|ca| {
                ca.parse().map_err(|_| NarInfoError::BadValue {
                    field: "CA",
                    value: ca.to_owned(),
                })
            })
            .transpose()?;
        Ok(Self {
            store_path,
            url: required("URL")?.to_owned(),
            compression,
            file_hash: single("FileHash")?
                .map(|v| parse_sha256("FileHash", v))
                .transpose()?,
            file_size: single("FileSize")?
                .map(|v| number("FileSize", v))
                .transpose()?,
            nar_hash: parse_sha256("NarHash", required("NarHash")?)?,
            nar_size: number("NarSize", required("NarSize")?)?,
            references,
            deriver,
            signatures,
            ca,
        })
    }

    /// The narinfo a cache serves for `info`, pointing at an uncompressed NAR named by its hash.
    pub fn for_path_info(info: &PathInfo) -> Self {
        Self {
            store_path: info.store_path.clone(),
            url: nar_url(&info.nar_sha256),
            compression: Compression::None,
            file_hash: Some(info.nar_sha256),
            file_size: Some(info.nar_size),
            nar_hash: info.nar_sha256,
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            signatures: info.signatures.clone(),
            ca: info.ca.clone(),
        }
    }

    /// The path info this narinfo describes, for a NAR that unpacked to `node`.
    pub fn into_path_info(self, node: crate::castore::Node) -> PathInfo {
        PathInfo {
            store_path: self.store_path,
            node,
            references: self.references,
            nar_size: self.nar_size,
            nar_sha256: self.nar_hash,
            signatures: self.signatures,
            deriver: self.deriver,
            ca: self.ca,
        }
    }

    /// The .narinfo text, which [`parse`](Self::parse) reads back as an equal value.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let hash = |h: &[u8; 32]| format!("sha256:{}", nixbase32::encode(h));
        let _ = writeln!(out, "StorePath: {}", self.store_path);
        let _ = writeln!(out, "URL: {}", self.url);
        let _ = writeln!(out, "Compression: {}", self.compression.name());
        if let Some(file_hash) = &self.file_hash {
            let _ = writeln!(out, "FileHash: {}", hash(file_hash));
        }
        if let Some(file_size) = self.file_size {
            let _ = writeln!(out, "FileSize: {file_size}");
        }
        let _ = writeln!(out, "NarHash: {}", hash(&self.nar_hash));
        let _ = writeln!(out, "NarSize: {}", self.nar_size);
        let references: Vec<String> = self.references.iter().map(StorePath::to_basename).collect();
        let _ = writeln!(out, "References: {}", references.join(" "));
        if let Some(deriver) = &self.deriver {
            let _ = writeln!(out, "Deriver: {}", deriver.to_basename());
        }
        for signature in &self.signatures {
            let _ = writeln!(out, "Sig: {signature}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(out, "CA: {ca}");
        }
        out
    }

    /// What Nix signs: `1;<path>;<nar hash>;<nar size>;<comma-separated references>`.
    pub fn fingerprint(&self) -> String {
        let references: Vec<String> = self
            .references
            .iter()
            .map(StorePath::to_absolute_path)
            .collect();
        format!(
            "1;{};sha256:{};{};{}",
            self.store_path,
            nixbase32::encode(&self.nar_hash),
            self.nar_size,
            references.join(",")
        )
    }
}

/// Where a cache serves the uncompressed NAR with this hash.
pub fn nar_url(nar_sha256: &[u8; 32]) -> String {
    format!("nar/{}.nar", nixbase32::encode(nar_sha256))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "StorePath: /nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432
URL: nar/1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d.nar.xz
Compression: xz
FileHash: sha256:1094wph9z4nwlgvsd53abfz8i117ykiv5dwnq9nnhz846s7xqd7d
FileSize: 114980
NarHash: sha256:0lxjvvpr59c2mdram7ympy5ay741f180kv3349hvfc3f8nrmbqf6
NarSize: 464152
References: 7gx4kiv5m0i7d7qkixq2cwzbr10lvxwc-glibc-2.27 00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432
Deriver: 0s5chs7qj2k6xy8lxpyd8hn4dzmzyr7w-net-tools-1.60_p20170221182432.drv
Sig: cache.nixos.org-1:NODvfEjsBuCXaqB9Awyd1sbq3mzIbRf9wVrhb7RSbjeQJmUW4P7XlSZxoYpSbmXKGjgaxAXx7pnd34bu9JFoAw==
";

    #[test]
    fn parse_render_roundtrip() {
        let info = NarInfo::parse(SAMPLE).unwrap();
        assert_eq!(info.compression, Compression::Xz);
        assert_eq!(info.nar_size, 464152);
        assert_eq!(info.references.len(), 2);
        assert_eq!(info.signatures[0].name, "cache.nixos.org-1");
        assert_eq!(info.signatures[0].data.len(), 64);
        assert_eq!(NarInfo::parse(&info.render()).unwrap(), info);
        assert!(info.fingerprint().starts_with(
            "1;/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432;sha256:0lxjvvpr"
        ));
    }

    #[test]
    fn rejects_bad_narinfo() {
        for (bad, what) in [
            (
                SAMPLE.replace("NarHash: sha256:", "NarHash: md5:"),
                "NarHash",
            ),
            (
                SAMPLE.replace("NarSize: 464152", "NarSize: many"),
                "NarSize",
            ),
            (
                SAMPLE.replace("StorePath: /nix/store/00bgd", "StorePath: /nix/stor/00bgd"),
                "StorePath",
            ),
            (
                SAMPLE.replace("References: 7gx4", "References: not-a-path 7gx4"),
                "References",
            ),
            (SAMPLE.replace("URL: ", "URL "), "URL"),
            (format!("{SAMPLE}NarSize: 1\n"), "NarSize"),
            (
                SAMPLE.replace("Compression: xz", "Compression: lz4"),
                "Compression",
            ),
        ] {
            let err = NarInfo::parse(&bad).unwrap_err().to_string();
            assert!(err.contains(what), "{what}: {err}");
        }
    }
}
