//! `grpc+https://` store addresses: rustls, trusting the CA named by SSL_CERT_FILE or
//! NIX_SSL_CERT_FILE (as `nix+https` does), and refusing a server no trusted CA signed.
//! The server is the daemon's own services behind tonic's TLS, in this process; the
//! certificates are made with openssl.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tvix_boot_castore::grpc::server::{BlobServer, BlockingPool, DirectoryServer};
use tvix_boot_castore::proto::blob_service_server::BlobServiceServer;
use tvix_boot_castore::proto::directory_service_server::DirectoryServiceServer;
use tvix_boot_store::castore::Node;
use tvix_boot_store::grpc::PathInfoServer;
use tvix_boot_store::import::import_path;
use tvix_boot_store::{Store, proto};

const BIN: &str = env!("CARGO_BIN_EXE_tvix-boot");

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ca.pem`, and `server.pem`/`server.key` it signed for 127.0.0.1.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-days",
        "2",
        "-subj",
        "/CN=grpc test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(dir, &args);
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
}

#[test]
fn grpc_https_trusts_the_configured_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let store = Arc::new(Store::memory());
    let tree = dir.path().join("over-tls");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("file"), b"served over TLS\n").unwrap();
    let info = import_path(&store, &tree, &mut |_| {}).unwrap();
    assert!(matches!(info.node, Node::Directory { .. }));

    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(dir.path().join("server.pem")).unwrap(),
        std::fs::read(dir.path().join("server.key")).unwrap(),
    );
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_store = store.clone();
    let thread = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(listener.local_addr().unwrap().port()).unwrap();
                let pool = BlockingPool::new(2, "tls-test").unwrap();
                tonic::transport::Server::builder()
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .unwrap()
                    .add_service(BlobServiceServer::new(Arc::new(BlobServer::new(
                        server_store.blobs.clone(),
                        pool.clone(),
                    ))))
                    .add_service(DirectoryServiceServer::new(Arc::new(DirectoryServer::new(
                        server_store.directories.clone(),
                        pool.clone(),
                    ))))
                    .add_service(proto::path_info_service_server::PathInfoServiceServer::new(
                        Arc::new(PathInfoServer::new(server_store, pool)),
                    ))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async move {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            })
    });
    let port = port_rx.recv().unwrap();
    let url = format!("grpc+https://127.0.0.1:{port}");
    let export = |ca_variable: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.env("XDG_DATA_HOME", "/nonexistent")
            .env_remove("SSL_CERT_FILE")
            .env_remove("NIX_SSL_CERT_FILE")
            .env("BLOB_SERVICE_ADDR", &url)
            .env("DIRECTORY_SERVICE_ADDR", &url)
            .env("PATH_INFO_SERVICE_ADDR", &url)
            .args(["store", "export-nar", &info.store_path.to_absolute_path()]);
        if let Some(variable) = ca_variable {
            cmd.env(variable, dir.path().join("ca.pem"));
        }
        cmd.output().unwrap()
    };
    let expected = {
        let mut nar = Vec::new();
        store.write_nar(&info.node, &mut nar).unwrap();
        nar
    };
    for variable in ["SSL_CERT_FILE", "NIX_SSL_CERT_FILE"] {
        let out = export(Some(variable));
        assert!(
            out.status.success(),
            "{variable}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == expected);
    }
    // No CA that signed it: refused, with a message that says why.
    let out = export(None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&url[..url.len() - 1]) || stderr.contains("127.0.0.1"),
        "{stderr}"
    );
    let _ = stop.send(());
    thread.join().unwrap();
}
