//! Wire compatibility with tvix-store, pinned without it (CI cannot fetch its source):
//! the encodings and digests of known Directory messages, written out by hand from the
//! protobuf rules, and the method paths the daemon answers, under both package names.

use std::sync::Arc;

use tvix_boot_castore::grpc::GrpcAddress;
use tvix_boot_castore::grpc::client::transport;
use tvix_boot_castore::runtime::block_on;
use tvix_boot_castore::{B3Digest, Directory, Node, PathComponent};
use tvix_boot_store::grpc::{self, ListenAddr, Listener};
use tvix_boot_store::{Store, proto};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn name(s: &str) -> PathComponent {
    PathComponent::try_from(s.as_bytes()).unwrap()
}

#[test]
fn directory_encodings_and_digests() {
    // The empty directory: no bytes; its digest is tvix's own fixture.
    assert!(Directory::new().encode().is_empty());
    assert_eq!(
        Directory::new().digest().to_string(),
        "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI="
    );
    assert_eq!(
        hex(Directory::new().digest().as_bytes()),
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    );

    // tvix's DIRECTORY_WITH_KEEP: one file ".keep", the empty blob, not executable.
    // files (field 2, length-delimited) { name (1) ".keep", digest (2) 32 bytes }; size 0
    // and executable false are defaults, so proto3 leaves them out.
    let empty_blob = B3Digest::of(b"");
    let mut keep = Directory::new();
    keep.add(
        name(".keep"),
        Node::File {
            digest: empty_blob,
            size: 0,
            executable: false,
        },
    )
    .unwrap();
    let mut expected = vec![0x12, 41, 0x0a, 5];
    expected.extend_from_slice(b".keep");
    expected.extend_from_slice(&[0x12, 32]);
    expected.extend_from_slice(empty_blob.as_bytes());
    assert_eq!(keep.encode(), expected);
    assert_eq!(
        keep.digest().to_string(),
        "b3:i1tdZCtka7jtUEsIYsOUE+h+V0kUl9570HWVP3uDgQ4="
    );

    // A directory with one of each kind, in the field order (directories, files,
    // symlinks), whatever order the names have across lists.
    let mut mixed = Directory::new();
    mixed
        .add(
            name("z-dir"),
            Node::Directory {
                digest: keep.digest(),
                size: keep.size(),
            },
        )
        .unwrap();
    mixed
        .add(
            name("a-file"),
            Node::File {
                digest: B3Digest::of(b"Hello World!"),
                size: 12,
                executable: true,
            },
        )
        .unwrap();
    mixed
        .add(
            name("m-link"),
            Node::Symlink {
                target: "a-file".into(),
            },
        )
        .unwrap();
    let mut expected = Vec::new();
    // directories: { name "z-dir", digest, size 1 }
    expected.extend_from_slice(&[0x0a, 2 + 5 + 2 + 32 + 2, 0x0a, 5]);
    expected.extend_from_slice(b"z-dir");
    expected.extend_from_slice(&[0x12, 32]);
    expected.extend_from_slice(keep.digest().as_bytes());
    expected.extend_from_slice(&[0x18, 1]);
    // files: { name "a-file", digest, size 12, executable true }
    expected.extend_from_slice(&[0x12, 2 + 6 + 2 + 32 + 2 + 2, 0x0a, 6]);
    expected.extend_from_slice(b"a-file");
    expected.extend_from_slice(&[0x12, 32]);
    expected.extend_from_slice(B3Digest::of(b"Hello World!").as_bytes());
    expected.extend_from_slice(&[0x18, 12, 0x20, 1]);
    // symlinks: { name "m-link", target "a-file" }
    expected.extend_from_slice(&[0x1a, 2 + 6 + 2 + 6, 0x0a, 6]);
    expected.extend_from_slice(b"m-link");
    expected.extend_from_slice(&[0x12, 6]);
    expected.extend_from_slice(b"a-file");
    assert_eq!(mixed.encode(), expected);
    assert_eq!(
        mixed.digest().to_string(),
        "b3:9TuaxRQLyzBfOF9UZXd27MPtzUEFgyBwZFecOyXQ9eY="
    );
}

/// Calls `path` with an empty message and returns the status code.
fn call(url: &str, path: &'static str) -> tonic::Code {
    let address = GrpcAddress::parse(url).unwrap();
    let mut grpc = tonic::client::Grpc::new(transport(&address).unwrap());
    block_on(async move {
        grpc.ready().await.unwrap();
        let codec =
            tonic_prost::ProstCodec::<proto::ListPathInfoRequest, proto::ListPathInfoRequest>::default();
        let request = tonic::Request::new(proto::ListPathInfoRequest {});
        match grpc
            .unary(request, http::uri::PathAndQuery::from_static(path), codec)
            .await
        {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    })
}

#[test]
fn the_daemon_answers_tvix_and_snix_method_paths() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listen = ListenAddr::Unix(socket.clone());
    let thread = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let listener = Listener::bind(&listen, None).await.unwrap();
                grpc::serve(
                    Arc::new(Store::memory()),
                    listener,
                    2,
                    Arc::new(|_: &str| {}),
                    async move {
                        let _ = stopped.await;
                    },
                    // Stopped when the test is done with it: nothing to wait for.
                    std::time::Duration::ZERO,
                )
                .await
                .unwrap();
            })
    });
    while !socket.exists() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let url = format!("grpc+unix://{}", socket.display());
    let paths: Vec<&'static str> = tvix_boot_castore::grpc::METHOD_PATHS
        .iter()
        .chain(grpc::METHOD_PATHS)
        .copied()
        .collect();
    assert_eq!(paths.len(), 9);
    for path in paths {
        let code = call(&url, path);
        assert_ne!(code, tonic::Code::Unimplemented, "{path}");
        let snix: &'static str = Box::leak(path.replace("/tvix.", "/snix.").into_boxed_str());
        assert_ne!(call(&url, snix), tonic::Code::Unimplemented, "{snix}");
    }
    assert_eq!(
        call(&url, "/tvix.castore.v1.BlobService/Nope"),
        tonic::Code::Unimplemented
    );
    assert_eq!(call(&url, "/grpc.health.v1.Health/Check"), tonic::Code::Ok);
    let _ = stop.send(());
    thread.join().unwrap();
}
