//! Copying store paths, with their whole closure, out of the local Nix store. Nix's own
//! metadata (via `nix path-info --json --recursive`) supplies references, signatures and the
//! NAR hash each path must match; NARs come from `nix-store --dump`.

use std::io::Read;
use std::process::{Command, Stdio};

use serde::Deserialize;
use thiserror::Error;

use crate::nixbase32;
use crate::pathinfo::{PathInfo, Signature};
use crate::store::{Store, StoreError};
use crate::store_path::{StorePath, StorePathError};

/// Why a closure could not be copied from the local Nix store.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum LocalNixError {
    /// `nix` or `nix-store` could not be started, or waited for.
    #[error("cannot run {command}: {source} (is Nix installed? apt-get install nix-bin)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    /// The command failed; `stderr` is what it printed.
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    /// `nix path-info --json` printed something not understood.
    #[error("cannot parse the output of {command}: {reason}")]
    BadOutput { command: String, reason: String },
    /// Nix named a path that is not a valid store path.
    #[error("{path}: Nix reports an invalid path: {source}")]
    BadPath {
        path: String,
        source: StorePathError,
    },
    /// The NAR dumped does not match the hash and size in Nix's database.
    #[error(
        "{path}: the NAR from nix-store --dump hashes to sha256:{actual} ({actual_size} bytes), Nix's database says sha256:{expected} ({expected_size} bytes)"
    )]
    HashMismatch {
        path: String,
        expected: String,
        actual: String,
        expected_size: u64,
        actual_size: u64,
    },
    /// Storing the path failed.
    #[error("{path}: {source}")]
    Store { path: String, source: StoreError },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NixPathInfo {
    path: String,
    nar_hash: String,
    nar_size: u64,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
    #[serde(default)]
    signatures: Vec<String>,
    ca: Option<String>,
}

/// `sha256-<base64>` (SRI, what `nix path-info --json` prints) or `sha256:<nixbase32>`.
fn parse_nar_hash(text: &str) -> Option<[u8; 32]> {
    let bytes = if let Some(b64) = text.strip_prefix("sha256-") {
        data_encoding::BASE64.decode(b64.as_bytes()).ok()?
    } else {
        nixbase32::decode(text.strip_prefix("sha256:")?, 32).ok()?
    };
    bytes.try_into().ok()
}

fn absolute(field: &str, path: &str) -> Result<StorePath, LocalNixError> {
    StorePath::from_absolute_path(path)
        .and_then(|(p, rest)| {
            if rest.is_empty() {
                Ok(p)
            } else {
                Err(StorePathError::NotInStore(path.to_owned()))
            }
        })
        .map_err(|source| LocalNixError::BadPath {
            path: format!("{field} {path}"),
            source,
        })
}

/// Copy `paths` and everything they refer to. Returns the closure, dependencies first,
/// marking which paths were already in the store.
pub fn copy_closure(
    store: &Store,
    paths: &[String],
) -> Result<Vec<(StorePath, bool)>, LocalNixError> {
    let command = format!("nix path-info --json --recursive {}", paths.join(" "));
    let output = Command::new("nix")
        // Only the local store: never ask a substituter (or the network) about a path.
        .args([
            "--extra-experimental-features",
            "nix-command",
            "--option",
            "substituters",
            "",
        ])
        .args(["path-info", "--json", "--recursive"])
        .args(paths)
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| LocalNixError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(LocalNixError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let mut infos: Vec<NixPathInfo> =
        serde_json::from_slice(&output.stdout).map_err(|e| LocalNixError::BadOutput {
            command: command.clone(),
            reason: e.to_string(),
        })?;
    // Dependencies first: a path's references land before the path does.
    sort_topologically(&mut infos);

    let mut copied = Vec::new();
    for nix_info in infos {
        let store_path = absolute("path", &nix_info.path)?;
        let store_err = |source| LocalNixError::Store {
            path: nix_info.path.clone(),
            source,
        };
        if store.path_info(&store_path).map_err(store_err)?.is_some() {
            copied.push((store_path, true));
            continue;
        }
        let nar_sha256 =
            parse_nar_hash(&nix_info.nar_hash).ok_or_else(|| LocalNixError::BadOutput {
                command: command.clone(),
                reason: format!("narHash {:?} of {}", nix_info.nar_hash, nix_info.path),
            })?;
        let ingested = dump_and_ingest(store, &nix_info.path)?;
        if ingested.nar_sha256 != nar_sha256 || ingested.nar_size != nix_info.nar_size {
            return Err(LocalNixError::HashMismatch {
                path: nix_info.path.clone(),
                expected: nixbase32::encode(&nar_sha256),
                actual: nixbase32::encode(&ingested.nar_sha256),
                expected_size: nix_info.nar_size,
                actual_size: ingested.nar_size,
            });
        }
        let info = PathInfo {
            store_path: store_path.clone(),
            node: ingested.node,
            references: nix_info
                .references
                .iter()
                .map(|r| absolute("reference", r))
                .collect::<Result<_, _>>()?,
            nar_size: ingested.nar_size,
            nar_sha256,
            signatures: nix_info
                .signatures
                .iter()
                .filter_map(|s| {
                    let (name, data) = s.split_once(':')?;
                    Some(Signature {
                        name: name.to_owned(),
                        data: data_encoding::BASE64.decode(data.as_bytes()).ok()?.into(),
                    })
                })
                .collect(),
            deriver: nix_info
                .deriver
                .as_deref()
                .map(|d| absolute("deriver", d))
                .transpose()?,
            ca: nix_info.ca.as_deref().and_then(|ca| ca.parse().ok()),
        };
        store.put_path_info(&info).map_err(store_err)?;
        copied.push((store_path, false));
    }
    Ok(copied)
}

fn dump_and_ingest(store: &Store, path: &str) -> Result<crate::nar::IngestedNar, LocalNixError> {
    let command = format!("nix-store --dump {path}");
    let mut child = Command::new("nix-store")
        .args(["--dump", path])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LocalNixError::Spawn {
            command: command.clone(),
            source,
        })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let ingested = store.ingest_nar(stdout);
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(|source| LocalNixError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !status.success() {
        return Err(LocalNixError::Failed {
            command,
            stderr: stderr.trim().to_owned(),
        });
    }
    ingested.map_err(|source| LocalNixError::Store {
        path: path.to_owned(),
        source,
    })
}

/// Order so that every path comes after the paths it refers to (self-references ignored).
fn sort_topologically(infos: &mut Vec<NixPathInfo>) {
    let mut remaining: Vec<NixPathInfo> = std::mem::take(infos);
    while !remaining.is_empty() {
        let placed: std::collections::HashSet<String> =
            infos.iter().map(|i| i.path.clone()).collect();
        let in_set: std::collections::HashSet<String> =
            remaining.iter().map(|i| i.path.clone()).collect();
        let (ready, rest): (Vec<_>, Vec<_>) = remaining.into_iter().partition(|info| {
            info.references
                .iter()
                .all(|r| r == &info.path || placed.contains(r) || !in_set.contains(r))
        });
        if ready.is_empty() {
            // A cycle cannot happen in a Nix store; keep the rest in Nix's order regardless.
            infos.extend(rest);
            return;
        }
        infos.extend(ready);
        remaining = rest;
    }
}
