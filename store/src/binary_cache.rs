//! The HTTP binary-cache protocol `nix copy --to http://...` speaks, served from the store:
//! NARs are streamed straight into blobs and directories, checked against their hash, and a
//! narinfo is accepted only for a NAR that arrived intact. Substituters (`nix copy --from`)
//! read the same store back.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::TryStreamExt;
use sha2::{Digest as _, Sha256};
use thiserror::Error;
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::narinfo::{Compression, NarInfo, NarInfoError};
use crate::nixbase32;
use crate::pathinfo::IndexedNar;
use crate::signing::SigningKey;
use crate::store::{Store, StoreError};
use crate::store_path::DIGEST_LEN;

const NIX_CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

/// Why a binary-cache request was refused (answered 400) or failed (500: the store's
/// and the server's own failures), or the server could not start.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum CacheError {
    /// A NAR name that is not `<nixbase32 sha256>.nar[.xz|.zst|.bz2]`.
    #[error("{0:?} is not a NAR file name like <nixbase32 sha256>.nar[.xz|.zst|.bz2]")]
    BadNarName(String),
    /// A narinfo name that is not `<hash>.narinfo`.
    #[error("{0:?} is not a narinfo name like <32-character hash>.narinfo")]
    BadNarInfoName(String),
    /// An upload whose bytes do not hash to the SHA-256 in its name.
    #[error("the uploaded file hashes to sha256:{actual}, not sha256:{expected} as its name says")]
    HashMismatch { expected: String, actual: String },
    /// An upload that is not a valid NAR.
    #[error("invalid NAR: {0}")]
    BadNar(StoreError),
    /// A narinfo upload that does not parse.
    #[error("invalid narinfo: {0}")]
    BadNarInfo(#[from] NarInfoError),
    /// A narinfo uploaded under the hash of another store path.
    #[error("narinfo for {path} is uploaded under {name}")]
    WrongName { path: String, name: String },
    /// A narinfo for a NAR that was not uploaded before it.
    #[error("narinfo refers to NAR sha256:{0}, which was not uploaded")]
    NarNotUploaded(String),
    /// A narinfo whose NarSize differs from the uploaded NAR's.
    #[error("narinfo says NarSize {claimed}, the uploaded NAR has {actual} bytes")]
    NarSizeMismatch { claimed: u64, actual: u64 },
    /// The upload could not be decompressed.
    #[error("decompressing the upload: {0}")]
    Decompress(io::Error),
    /// The store failed.
    #[error("store error: {0}")]
    Store(#[from] StoreError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    /// The HTTP server failed.
    #[error("serving HTTP: {0}")]
    Serve(io::Error),
    /// A request's blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for CacheError {
    fn into_response(self) -> Response {
        let status = match &self {
            CacheError::Store(_)
            | CacheError::Internal(_)
            | CacheError::Listen { .. }
            | CacheError::Serve(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "binary cache request failed");
        } else {
            tracing::info!(error = %self, "binary cache request refused");
        }
        (status, format!("{self}\n")).into_response()
    }
}

/// Serve `store` on `listener` until `shutdown` resolves.
/// What the handlers share: the store, and the key narinfos are signed with.
#[derive(Clone)]
struct CacheState {
    store: Arc<Store>,
    key: Option<Arc<SigningKey>>,
}

/// Serves `store` as a binary cache on `listener` until `shutdown` completes; narinfos
/// carry the signatures in their path info only.
pub async fn serve(
    store: Arc<Store>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CacheError> {
    serve_signed(store, listener, None, shutdown).await
}

/// As [`serve`], signing every narinfo served with `key` as well, as nix-serve and
/// harmonia do.
pub async fn serve_signed(
    store: Arc<Store>,
    listener: tokio::net::TcpListener,
    key: Option<Arc<SigningKey>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CacheError> {
    let app = Router::new()
        .route(
            "/nix-cache-info",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
                    NIX_CACHE_INFO,
                )
            }),
        )
        .route("/{name}", get(get_narinfo).put(put_narinfo))
        .route("/nar/{name}", get(get_nar).put(put_nar))
        .with_state(CacheState { store, key });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(CacheError::Serve)
}

/// Binds `addr` (`host:port`; port 0 picks a free port) for [`serve`], and returns the
/// listener with the address it got.
pub async fn bind(addr: &str) -> Result<(tokio::net::TcpListener, SocketAddr), CacheError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| CacheError::Listen {
            addr: addr.to_owned(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| CacheError::Listen {
        addr: addr.to_owned(),
        source,
    })?;
    Ok((listener, local))
}

/// The store API is synchronous; run it off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CacheError::Internal(e.to_string()))?
}

fn parse_narinfo_name(name: &str) -> Result<[u8; DIGEST_LEN], CacheError> {
    let bad = || CacheError::BadNarInfoName(name.to_owned());
    let hash = name.strip_suffix(".narinfo").ok_or_else(bad)?;
    let digest = nixbase32::decode(hash, DIGEST_LEN).map_err(|_| bad())?;
    digest.try_into().map_err(|_| bad())
}

fn parse_nar_name(name: &str) -> Result<([u8; 32], Compression), CacheError> {
    let bad = || CacheError::BadNarName(name.to_owned());
    let (hash, extension) = name.split_once(".nar").ok_or_else(bad)?;
    let compression = Compression::from_extension(extension).ok_or_else(bad)?;
    let digest = nixbase32::decode(hash, 32).map_err(|_| bad())?;
    Ok((digest.try_into().map_err(|_| bad())?, compression))
}

async fn get_narinfo(
    State(CacheState { store, key }): State<CacheState>,
    Path(name): Path<String>,
) -> Result<Response, CacheError> {
    let digest = parse_narinfo_name(&name)?;
    let info = blocking(move || {
        let info = store.path_infos.get(&digest).map_err(StoreError::from)?;
        if let Some(info) = &info {
            // The NAR it points to is found by its hash: a path this process did not
            // store (a remote path-info service's) is indexed now.
            if store
                .path_infos
                .get_nar(&info.nar_sha256)
                .map_err(StoreError::from)?
                .is_none()
            {
                let nar = IndexedNar {
                    node: info.node.clone(),
                    nar_size: info.nar_size,
                };
                store
                    .path_infos
                    .put_nar(&info.nar_sha256, &nar)
                    .map_err(StoreError::from)?;
            }
        }
        Ok(info)
    })
    .await?;
    Ok(match info {
        Some(info) => {
            let mut narinfo = NarInfo::for_path_info(&info);
            if let Some(key) = &key {
                key.sign_narinfo(&mut narinfo);
            }
            (
                [(header::CONTENT_TYPE, "text/x-nix-narinfo")],
                narinfo.render(),
            )
                .into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    })
}

async fn put_narinfo(
    State(CacheState { store, .. }): State<CacheState>,
    Path(name): Path<String>,
    body: String,
) -> Result<Response, CacheError> {
    let digest = parse_narinfo_name(&name)?;
    let narinfo = NarInfo::parse(&body)?;
    if narinfo.store_path.digest() != &digest {
        return Err(CacheError::WrongName {
            path: narinfo.store_path.to_string(),
            name,
        });
    }
    blocking(move || {
        let nar = store
            .path_infos
            .get_nar(&narinfo.nar_hash)
            .map_err(StoreError::from)?
            .ok_or_else(|| CacheError::NarNotUploaded(nixbase32::encode(&narinfo.nar_hash)))?;
        if nar.nar_size != narinfo.nar_size {
            return Err(CacheError::NarSizeMismatch {
                claimed: narinfo.nar_size,
                actual: nar.nar_size,
            });
        }
        let info = narinfo.into_path_info(nar.node);
        store.put_path_info(&info)?;
        tracing::info!(path = %info.store_path, "path added");
        Ok(())
    })
    .await?;
    Ok(StatusCode::OK.into_response())
}

/// Counts and hashes what passes through, as uploaded (before decompression).
struct HashingReader<R> {
    inner: R,
    sha256: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha256.update(&buf[..n]);
        Ok(n)
    }
}

/// Ingest a NAR from `input`, decompressing as `compression` says, and check that the bytes as
/// uploaded hash to `file_hash`. Returns the NAR's hash and what it unpacked to.
fn ingest_upload(
    store: &Store,
    input: impl Read,
    compression: Compression,
    file_hash: &[u8; 32],
) -> Result<([u8; 32], IndexedNar), CacheError> {
    let mut hashing = HashingReader {
        inner: input,
        sha256: Sha256::new(),
    };
    let ingested = {
        let decompressed = compression
            .decoder(&mut hashing)
            .map_err(CacheError::Decompress)?;
        store.ingest_nar(decompressed).map_err(CacheError::BadNar)?
    };
    // A decompressor may stop before the end of its input; the file hash covers all of it.
    io::copy(&mut hashing, &mut io::sink()).map_err(CacheError::Decompress)?;
    let actual: [u8; 32] = hashing.sha256.finalize().into();
    if actual != *file_hash {
        return Err(CacheError::HashMismatch {
            expected: nixbase32::encode(file_hash),
            actual: nixbase32::encode(&actual),
        });
    }
    Ok((
        ingested.nar_sha256,
        IndexedNar {
            node: ingested.node,
            nar_size: ingested.nar_size,
        },
    ))
}

async fn put_nar(
    State(CacheState { store, .. }): State<CacheState>,
    Path(name): Path<String>,
    body: Body,
) -> Result<Response, CacheError> {
    let (file_hash, compression) = parse_nar_name(&name)?;
    let stream = body.into_data_stream().map_err(io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    blocking(move || {
        let (nar_sha256, nar) = ingest_upload(&store, reader, compression, &file_hash)?;
        store
            .path_infos
            .put_nar(&nar_sha256, &nar)
            .map_err(StoreError::from)?;
        if compression != Compression::None {
            store
                .path_infos
                .put_nar_file(&file_hash, &nar_sha256)
                .map_err(StoreError::from)?;
        }
        // Acknowledged below: what the upload stored must survive a crash from then on.
        store.sync()?;
        tracing::info!(nar = %nixbase32::encode(&nar_sha256), size = nar.nar_size, "NAR uploaded");
        Ok(())
    })
    .await?;
    Ok(StatusCode::OK.into_response())
}

/// Hands written bytes to the HTTP response as they are produced.
struct ChannelWriter(tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `nar/<nar sha256>.nar` is what our narinfos point to. A compressed name,
/// `nar/<file sha256>.nar.xz` and friends, is what a client uploaded and may still have in
/// its narinfo cache: it is served compressed the same way (the bytes differ from the
/// upload, but Nix checks the NAR hash after decompression, not the file hash).
async fn get_nar(
    State(CacheState { store, .. }): State<CacheState>,
    Path(name): Path<String>,
) -> Result<Response, CacheError> {
    let (name_sha256, compression) = parse_nar_name(&name)?;
    let lookup = store.clone();
    let Some(nar) = blocking(move || {
        let nar_sha256 = match compression {
            Compression::None => Some(name_sha256),
            _ => lookup
                .path_infos
                .nar_of_file(&name_sha256)
                .map_err(StoreError::from)?,
        };
        Ok(match nar_sha256 {
            Some(nar_sha256) => lookup
                .path_infos
                .get_nar(&nar_sha256)
                .map_err(StoreError::from)?,
            None => None,
        })
    })
    .await?
    else {
        return Ok(StatusCode::NOT_FOUND.into_response());
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::task::spawn_blocking(move || {
        let out = io::BufWriter::with_capacity(256 * 1024, ChannelWriter(sender.clone()));
        let result = compression
            .encode(out, |writer| {
                store.write_nar(&nar.node, writer).map_err(io::Error::other)
            })
            .and_then(|mut out| out.flush());
        if let Err(e) = result {
            tracing::warn!(error = %e, "streaming a NAR failed");
            // The client sees a truncated body, never wrong bytes.
            let _ = sender.blocking_send(Err(e));
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver));
    let mut response = ([(header::CONTENT_TYPE, "application/x-nix-nar")], body).into_response();
    // A compressed body's size is known only at its end.
    if compression == Compression::None {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, nar.nar_size.into());
    }
    Ok(response)
}
