//! The castore's gRPC protocol, as tvix-store speaks it: addresses and channels
//! (`grpc+unix:///path`, `grpc+http://host:port`, `grpc+https://host:port`), the clients
//! of the blob and directory services ([`client`]), which check everything a server
//! sends, and the server side ([`server`]).
//!
//! The successor project (snix) renamed the protobuf packages `tvix.*.v1` to `snix.*.v1`
//! and kept the messages: a server here answers both names, and a client speaks `tvix.*`
//! unless its address says `?package=snix`.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::runtime;

pub mod client;
pub mod server;

/// HTTP/2 receive window of one stream: two of the server's 1 MiB messages.
pub const STREAM_WINDOW: u32 = 2 << 20;
/// HTTP/2 receive window of a connection: the chunks read ahead of a few readers.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// The largest HTTP/2 frame a peer may send: a whole 1 MiB message and its gRPC header
/// in one DATA frame. HTTP/2's default (16 KiB) cuts each message into 64 frames, each
/// one more wakeup and copy on the receiving side.
pub const MAX_FRAME: u32 = (1 << 20) + 64;

/// Where a gRPC store service is, and which package names it speaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcAddress {
    /// How to reach it.
    pub transport: GrpcTransport,
    /// The protobuf package names the client uses in method paths.
    pub package: Package,
}

/// How a gRPC store service is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrpcTransport {
    /// A unix socket (`grpc+unix:///path`).
    Unix(PathBuf),
    /// Plain HTTP/2 over TCP (`grpc+http://host:port`).
    Http(String),
    /// HTTP/2 over TLS (`grpc+https://host:port`), verified with rustls against the
    /// system's CA store plus NIX_SSL_CERT_FILE and SSL_CERT_FILE.
    Https(String),
}

/// The protobuf package generation in method paths: `/tvix.castore.v1.BlobService/Read`
/// or `/snix.castore.v1.BlobService/Read`. The messages are the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Package {
    /// tvix's `tvix.*.v1` (tvix-store; the default).
    #[default]
    Tvix,
    /// snix's `snix.*.v1`.
    Snix,
}

/// Why a gRPC address is not usable, or a channel could not be set up.
#[derive(Debug, Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum GrpcAddressError {
    /// The address breaks a rule of its scheme.
    #[error("invalid gRPC address {url:?}: {reason}")]
    Invalid { url: String, reason: String },
    /// A CA file named by an environment variable cannot be used.
    #[error("{variable}={}: {reason}", path.display())]
    CaFile {
        variable: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// tonic refused the endpoint or its TLS settings.
    #[error("gRPC endpoint {url:?}: {source}")]
    Endpoint {
        url: String,
        source: tonic::transport::Error,
    },
}

impl GrpcAddress {
    /// Whether `url` names a gRPC service (its scheme starts with `grpc+`).
    pub fn is_grpc(url: &str) -> bool {
        url.starts_with("grpc+")
    }

    /// Parses `grpc+unix:///abs/path` (no host), `grpc+http://host:port` or
    /// `grpc+https://host:port` (no path), each optionally with `?package=tvix|snix`.
    pub fn parse(url: &str) -> Result<Self, GrpcAddressError> {
        let invalid = |reason: &str| GrpcAddressError::Invalid {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
        let mut package = Package::Tvix;
        for (key, value) in parsed.query_pairs() {
            match (&*key, &*value) {
                ("package", "tvix") => package = Package::Tvix,
                ("package", "snix") => package = Package::Snix,
                ("package", other) => {
                    return Err(invalid(&format!("package {other:?}: it is tvix or snix")));
                }
                (other, _) => return Err(invalid(&format!("unknown option {other:?}"))),
            }
        }
        let host_port = || {
            let host = parsed
                .host_str()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| invalid("needs a host, as in grpc+http://host:port"))?;
            if !(parsed.path().is_empty() || parsed.path() == "/") {
                return Err(invalid("takes no path, only host and port"));
            }
            Ok(match parsed.port() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            })
        };
        let transport = match parsed.scheme() {
            "grpc+unix" => {
                if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(invalid(
                        "a socket path needs three slashes, as in grpc+unix:///run/store.sock",
                    ));
                }
                let path = PathBuf::from(
                    percent_encoding::percent_decode_str(parsed.path())
                        .decode_utf8()
                        .map_err(|e| invalid(&e.to_string()))?
                        .into_owned(),
                );
                if !path.is_absolute() || parsed.path().len() <= 1 {
                    return Err(invalid("needs an absolute socket path"));
                }
                GrpcTransport::Unix(path)
            }
            "grpc+http" => GrpcTransport::Http(host_port()?),
            "grpc+https" => GrpcTransport::Https(host_port()?),
            other => {
                return Err(invalid(&format!(
                    "unknown scheme {other:?}: grpc+unix, grpc+http or grpc+https"
                )));
            }
        };
        Ok(Self { transport, package })
    }

    /// A channel to the service; it connects on first use (and again after the
    /// connection broke), so opening a store never waits for its server. Services at the
    /// same address share one channel (one connection, many streams).
    pub fn channel(&self) -> Result<Channel, GrpcAddressError> {
        static CHANNELS: std::sync::Mutex<Vec<(GrpcTransport, Channel)>> =
            std::sync::Mutex::new(Vec::new());
        let mut channels = CHANNELS.lock().expect("channel list poisoned");
        if let Some((_, channel)) = channels.iter().find(|(t, _)| *t == self.transport) {
            return Ok(channel.clone());
        }
        let channel = self.new_channel()?;
        channels.push((self.transport.clone(), channel.clone()));
        Ok(channel)
    }

    fn new_channel(&self) -> Result<Channel, GrpcAddressError> {
        let url = match &self.transport {
            GrpcTransport::Unix(path) => format!("unix://{}", path.display()),
            GrpcTransport::Http(host) => format!("http://{host}"),
            GrpcTransport::Https(host) => format!("https://{host}"),
        };
        let endpoint_err = |source| GrpcAddressError::Endpoint {
            url: url.clone(),
            source,
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(endpoint_err)?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            // HTTP/2's default windows (64 KiB) would cost a window update per 64 KiB of
            // a blob: a chunk (1 MiB) may arrive whole, and several at once.
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .tcp_nodelay(true);
        if matches!(self.transport, GrpcTransport::Https(_)) {
            endpoint = endpoint.tls_config(tls_config()?).map_err(endpoint_err)?;
        }
        // The channel's connection task lives on the store's runtime.
        let _entered = runtime::handle().enter();
        Ok(endpoint.connect_lazy())
    }
}

/// rustls with the system's CA store plus the certificates in NIX_SSL_CERT_FILE and
/// SSL_CERT_FILE, as the `nix+https` substituter trusts.
fn tls_config() -> Result<ClientTlsConfig, GrpcAddressError> {
    let mut config = ClientTlsConfig::new().with_native_roots();
    for variable in ["NIX_SSL_CERT_FILE", "SSL_CERT_FILE"] {
        let Some(path) = std::env::var_os(variable).filter(|p| !p.is_empty()) else {
            continue;
        };
        let path = PathBuf::from(path);
        let ca_err = |reason: String| GrpcAddressError::CaFile {
            variable,
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read(&path).map_err(|e| ca_err(e.to_string()))?;
        if !pem
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(ca_err("no certificate in it".into()));
        }
        config = config.ca_certificate(Certificate::from_pem(pem));
    }
    Ok(config)
}

/// Rewrites a method path of one package generation to the other: `/snix.castore.v1.X/Y`
/// to `/tvix.castore.v1.X/Y` (server side) and back (client side).
fn rename_path(path: &str, from: &str, to: &str) -> Option<String> {
    path.strip_prefix('/')
        .and_then(|p| p.strip_prefix(from))
        .map(|rest| format!("/{to}{rest}"))
}

fn rename_request<B>(mut request: http::Request<B>, from: &str, to: &str) -> http::Request<B> {
    let Some(path) = rename_path(request.uri().path(), from, to) else {
        return request;
    };
    let mut parts = request.uri().clone().into_parts();
    let path_and_query = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    request
}

/// The method paths of every service, for tests and documentation: what the golden
/// tests pin.
pub const METHOD_PATHS: &[&str] = &[
    "/tvix.castore.v1.BlobService/Stat",
    "/tvix.castore.v1.BlobService/Read",
    "/tvix.castore.v1.BlobService/Put",
    "/tvix.castore.v1.DirectoryService/Get",
    "/tvix.castore.v1.DirectoryService/Put",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let unix = GrpcAddress::parse("grpc+unix:///run/store.sock").unwrap();
        assert_eq!(
            unix.transport,
            GrpcTransport::Unix(PathBuf::from("/run/store.sock"))
        );
        assert_eq!(unix.package, Package::Tvix);
        assert_eq!(
            GrpcAddress::parse("grpc+http://127.0.0.1:8000").unwrap(),
            GrpcAddress {
                transport: GrpcTransport::Http("127.0.0.1:8000".into()),
                package: Package::Tvix
            }
        );
        assert_eq!(
            GrpcAddress::parse("grpc+https://store.example:443?package=snix").unwrap(),
            GrpcAddress {
                transport: GrpcTransport::Https("store.example:443".into()),
                package: Package::Snix
            }
        );
        for bad in [
            "grpc+unix://host/run/store.sock",
            "grpc+unix://",
            "grpc+http://host:1/path",
            "grpc+http:///path",
            "grpc+ftp://host",
            "grpc+unix:///x?package=other",
            "grpc+unix:///x?foo=bar",
        ] {
            let err = GrpcAddress::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn package_renaming() {
        assert_eq!(
            rename_path("/snix.castore.v1.BlobService/Read", "snix.", "tvix.").as_deref(),
            Some("/tvix.castore.v1.BlobService/Read")
        );
        assert_eq!(
            rename_path("/grpc.health.v1.Health/Check", "snix.", "tvix."),
            None
        );
        let request = http::Request::builder()
            .uri("http://x/tvix.store.v1.PathInfoService/Get")
            .body(())
            .unwrap();
        let renamed = rename_request(request, "tvix.", "snix.");
        assert_eq!(renamed.uri().path(), "/snix.store.v1.PathInfoService/Get");
    }
}
