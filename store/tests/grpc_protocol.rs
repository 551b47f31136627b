//! The gRPC protocol, our client against our daemon, over a unix socket and over TCP:
//! every RPC (the ordering of a recursive Get, the Put of a deep tree), List,
//! CalculateNAR against `nix-store --dump | sha256sum`, Stat with the outboard, a range
//! read in a 1 GiB blob, snix's package names, the health service; and servers that lie.
//!
//! CalculateNAR is compared with Debian's `nix-bin`; without it that test fails, loudly.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use tvix_boot_castore::blobservice::{BlobError, BlobReader, BlobService, BlobWriter};
use tvix_boot_castore::directoryservice::{DirectoryError, DirectoryService};
use tvix_boot_castore::grpc::GrpcAddress;
use tvix_boot_castore::grpc::client::{GrpcBlobService, transport};
use tvix_boot_castore::proto as cproto;
use tvix_boot_castore::runtime::block_on;
use tvix_boot_castore::{B3Digest, Directory, Node, PathComponent};
use tvix_boot_store::grpc::{self, GrpcPathInfoService, ListenAddr, Listener};
use tvix_boot_store::import::import_path;
use tvix_boot_store::{Store, StoreAddrs};

/// A daemon serving `store` in this process, until dropped.
struct Daemon {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Unix,
    Tcp,
}

fn start_daemon(store: Arc<Store>, via: Via) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let addr = match via {
        Via::Unix => ListenAddr::Unix(dir.path().join("store.sock")),
        Via::Tcp => ListenAddr::Tcp("127.0.0.1:0".into()),
    };
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let listener = Listener::bind(&addr, None).await.unwrap();
            url_tx.send(listener.client_url()).unwrap();
            grpc::serve(
                store,
                listener,
                4,
                Arc::new(|_: &str| {}),
                async move {
                    let _ = stopped.await;
                },
                // Stopped when the test is done with it: nothing to wait for.
                std::time::Duration::ZERO,
            )
            .await
            .unwrap();
        });
    });
    Daemon {
        url: url_rx.recv().unwrap(),
        stop: Some(stop),
        thread: Some(thread),
        _dir: dir,
    }
}

fn client_store(url: &str) -> Store {
    Store::open(&StoreAddrs {
        blob: url.into(),
        directory: url.into(),
        path_info: url.into(),
    })
    .unwrap()
}

/// A local store with outboards (file-based), in a fresh directory.
fn local_store() -> (Arc<Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&StoreAddrs::in_directory(dir.path())).unwrap();
    (Arc::new(store), dir)
}

/// A tree to import: files small and large, an executable, a symlink, nested dirs.
fn sample_tree(base: &Path) -> PathBuf {
    let root = base.join("sample");
    std::fs::create_dir_all(root.join("lib/python/encodings")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("lib/python/os.py"), b"import sys\n").unwrap();
    std::fs::write(root.join("lib/python/encodings/utf_8.py"), b"# utf-8\n").unwrap();
    let big: Vec<u8> = (0..3_000_017u32)
        .map(|i| ((i * 31) ^ (i >> 11)) as u8)
        .collect();
    std::fs::write(root.join("lib/big.so"), &big).unwrap();
    std::fs::write(root.join("bin/run"), b"#!/bin/sh\necho hi\n").unwrap();
    let mut perms = std::fs::metadata(root.join("bin/run"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(root.join("bin/run"), perms).unwrap();
    std::os::unix::fs::symlink("bin/run", root.join("run")).unwrap();
    root
}

fn nar_of(store: &Store, node: &Node) -> Vec<u8> {
    let mut out = Vec::new();
    store.write_nar(node, &mut out).unwrap();
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

fn each_transport(test: impl Fn(Via)) {
    test(Via::Unix);
    test(Via::Tcp);
}

#[test]
fn a_store_served_over_grpc_reads_and_writes_as_local() {
    each_transport(|via| {
        let (server_store, _dir) = local_store();
        let tree = tempfile::tempdir().unwrap();
        let root = sample_tree(tree.path());
        let info = import_path(&server_store, &root, &mut |_| {}).unwrap();
        let daemon = start_daemon(server_store.clone(), via);
        let client = client_store(&daemon.url);

        // Path info: Get, then List.
        let got = client.path_info(&info.store_path).unwrap().unwrap();
        assert_eq!(got, info, "{via:?}");
        let listed = client.path_infos.list().unwrap();
        assert_eq!(listed, vec![info.clone()]);
        // Every blob and directory, through the NAR: byte for byte the local rendering.
        assert!(nar_of(&client, &info.node) == nar_of(&server_store, &info.node));

        // Writing: import another tree through the client; the server has it whole.
        let other = tree.path().join("other");
        std::fs::create_dir_all(other.join("a/b/c")).unwrap();
        std::fs::write(other.join("a/b/c/deep"), b"deep\n").unwrap();
        std::fs::write(other.join("large"), vec![7u8; 2_500_000]).unwrap();
        let written = import_path(&client, &other, &mut |_| {}).unwrap();
        let on_server = server_store
            .path_info(&written.store_path)
            .unwrap()
            .unwrap();
        assert_eq!(on_server, written);
        assert!(nar_of(&server_store, &on_server.node) == nar_of(&client, &written.node));
        assert_eq!(client.path_infos.list().unwrap().len(), 2);
    });
}

#[test]
fn calculate_nar_is_what_nix_store_dump_hashes_to() {
    each_transport(|via| {
        let (server_store, _dir) = local_store();
        let tree = tempfile::tempdir().unwrap();
        let root = sample_tree(tree.path());
        let info = import_path(&server_store, &root, &mut |_| {}).unwrap();
        let daemon = start_daemon(server_store, via);
        let address = GrpcAddress::parse(&daemon.url).unwrap();
        let service = GrpcPathInfoService::new(&address, &daemon.url).unwrap();
        let (size, hash) = service.calculate_nar(&info.node).unwrap();

        let dump = std::process::Command::new("nix-store")
            .arg("--dump")
            .arg(&root)
            .output()
            .expect("nix-store from Debian's nix-bin");
        assert!(dump.status.success());
        assert_eq!(size, dump.stdout.len() as u64);
        assert_eq!(hash, sha256(&dump.stdout), "{via:?}");
        assert_eq!((size, hash), (info.nar_size, info.nar_sha256));

        // A node whose content the server does not have: an error, not a hash.
        let absent = Node::File {
            digest: B3Digest::of(b"not there"),
            size: 9,
            executable: false,
        };
        assert!(service.calculate_nar(&absent).is_err());
    });
}

/// A tree `depth` directories deep, each with `width` files and one subdirectory;
/// returns the directories leaves first.
fn deep_tree(depth: usize, width: usize) -> Vec<Directory> {
    let mut out: Vec<Directory> = Vec::new();
    for level in 0..depth {
        let mut dir = Directory::new();
        for i in 0..width {
            dir.add(
                PathComponent::try_from(format!("f{i}").as_bytes()).unwrap(),
                Node::File {
                    digest: B3Digest::of(format!("{level}/{i}").as_bytes()),
                    size: 3,
                    executable: false,
                },
            )
            .unwrap();
        }
        if let Some(child) = out.last() {
            dir.add(
                PathComponent::try_from(&b"sub"[..]).unwrap(),
                Node::Directory {
                    digest: child.digest(),
                    size: child.size(),
                },
            )
            .unwrap();
        }
        out.push(dir);
    }
    out
}

#[test]
fn directory_put_of_a_deep_tree_and_recursive_get_in_order() {
    each_transport(|via| {
        let store = Arc::new(Store::memory());
        let daemon = start_daemon(store.clone(), via);
        let address = GrpcAddress::parse(&daemon.url).unwrap();
        let mut client = cproto::directory_service_client::DirectoryServiceClient::new(
            transport(&address).unwrap(),
        );

        // Put: 300 levels, leaves to root, in one stream.
        let tree = deep_tree(300, 3);
        let root = tree.last().unwrap().digest();
        let messages: Vec<cproto::Directory> = tree.iter().map(Directory::to_proto).collect();
        let mut put_client = client.clone();
        let answer = block_on(async move { put_client.put(futures::stream::iter(messages)).await })
            .unwrap()
            .into_inner();
        assert_eq!(&answer.root_digest[..], root.as_bytes());
        assert!(store.directories.has(&root).unwrap());

        // A parent before its child is refused.
        let mut bad_client = client.clone();
        let orphan = deep_tree(2, 1).pop().unwrap().to_proto();
        let refused =
            block_on(async move { bad_client.put(futures::stream::iter(vec![orphan])).await });
        assert!(refused.is_err());

        // A wide and deep tree: recursive Get is breadth-first, each parent before its
        // children, each digest once.
        let mut leaf_a = Directory::new();
        leaf_a
            .add(
                PathComponent::try_from(&b"x"[..]).unwrap(),
                Node::Symlink { target: "a".into() },
            )
            .unwrap();
        let leaf_b = Directory::new();
        let mut mid = Directory::new();
        for (name, d) in [("a", &leaf_a), ("b", &leaf_b)] {
            mid.add(
                PathComponent::try_from(name.as_bytes()).unwrap(),
                Node::Directory {
                    digest: d.digest(),
                    size: d.size(),
                },
            )
            .unwrap();
        }
        let mut top = Directory::new();
        for name in ["m1", "m2"] {
            top.add(
                PathComponent::try_from(name.as_bytes()).unwrap(),
                Node::Directory {
                    digest: mid.digest(),
                    size: mid.size(),
                },
            )
            .unwrap();
        }
        top.add(
            PathComponent::try_from(&b"z"[..]).unwrap(),
            Node::Directory {
                digest: leaf_a.digest(),
                size: leaf_a.size(),
            },
        )
        .unwrap();
        for d in [&leaf_a, &leaf_b, &mid, &top] {
            store.directories.put(d).unwrap();
        }
        let top_digest = top.digest();
        let got: Vec<B3Digest> = block_on(async move {
            let mut stream = client
                .get(cproto::GetDirectoryRequest {
                    by_what: Some(cproto::get_directory_request::ByWhat::Digest(
                        Bytes::copy_from_slice(top_digest.as_bytes()),
                    )),
                    recursive: true,
                })
                .await
                .unwrap()
                .into_inner();
            let mut got = Vec::new();
            while let Some(d) = stream.next().await {
                got.push(Directory::try_from(d.unwrap()).unwrap().digest());
            }
            got
        });
        assert_eq!(
            got,
            vec![top.digest(), mid.digest(), leaf_a.digest(), leaf_b.digest()],
            "{via:?}"
        );
    });
}

#[test]
fn blob_rpcs_stat_with_outboard_read_put() {
    each_transport(|via| {
        let (store, _dir) = local_store();
        let daemon = start_daemon(store.clone(), via);
        let address = GrpcAddress::parse(&daemon.url).unwrap();
        let client =
            cproto::blob_service_client::BlobServiceClient::new(transport(&address).unwrap());

        // Put, as a stream of pieces.
        let data: Vec<u8> = (0..(5u32 << 20) + 333)
            .map(|i| ((i * 7) ^ (i >> 13)) as u8)
            .collect();
        let pieces: Vec<cproto::BlobChunk> = data
            .chunks(100_000)
            .map(|c| cproto::BlobChunk {
                data: Bytes::copy_from_slice(c),
            })
            .collect();
        let digest = B3Digest::of(&data);
        let mut put = client.clone();
        let answer = block_on(async move { put.put(futures::stream::iter(pieces)).await })
            .unwrap()
            .into_inner();
        assert_eq!(&answer.digest[..], digest.as_bytes());

        // Stat with chunks and outboard: 1 MiB chunks that are blobs of their own, and an
        // outboard that checks each against the blob's digest.
        let mut stat = client.clone();
        let answer = block_on(async move {
            stat.stat(cproto::StatBlobRequest {
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                send_chunks: true,
                send_bao: true,
            })
            .await
        })
        .unwrap()
        .into_inner();
        assert_eq!(answer.chunks.len(), 6);
        assert_eq!(
            answer.chunks.iter().map(|c| c.size).sum::<u64>(),
            data.len() as u64
        );
        assert_eq!(&answer.bao[..8], b"tvixbao1");
        assert_eq!(answer.bao[8], 10, "1 MiB chunk groups");
        assert_eq!(answer.bao.len(), 24 + 5 * 64, "{via:?}");
        // Each chunk: Read by its own digest gives its bytes.
        let mut offset = 0usize;
        for chunk in &answer.chunks {
            let mut read = client.clone();
            let chunk_digest = chunk.digest.clone();
            let bytes = block_on(async move {
                let mut stream = read
                    .read(cproto::ReadBlobRequest {
                        digest: chunk_digest,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let mut out = Vec::new();
                while let Some(m) = stream.next().await {
                    out.extend_from_slice(&m.unwrap().data);
                }
                out
            });
            assert!(bytes == data[offset..offset + chunk.size as usize]);
            assert_eq!(&chunk.digest[..], blake3::hash(&bytes).as_bytes());
            // A chunk is there for Stat too, with no chunks of its own (tvix-store's
            // client Stats every chunk before it reads it).
            let mut stat = client.clone();
            let chunk_digest = chunk.digest.clone();
            let answer = block_on(async move {
                stat.stat(cproto::StatBlobRequest {
                    digest: chunk_digest,
                    send_chunks: true,
                    send_bao: true,
                })
                .await
            })
            .unwrap()
            .into_inner();
            assert!(answer.chunks.is_empty() && answer.bao.is_empty());
            offset += bytes.len();
        }
        // Stat without asking: neither. Small blobs: neither either. Absent: NOT_FOUND.
        let mut stat = client.clone();
        let plain = block_on(async move {
            stat.stat(cproto::StatBlobRequest {
                digest: Bytes::copy_from_slice(digest.as_bytes()),
                ..Default::default()
            })
            .await
        })
        .unwrap()
        .into_inner();
        assert!(plain.chunks.is_empty() && plain.bao.is_empty());
        let mut stat = client.clone();
        let absent = block_on(async move {
            stat.stat(cproto::StatBlobRequest {
                digest: Bytes::copy_from_slice(B3Digest::of(b"nope").as_bytes()),
                ..Default::default()
            })
            .await
        });
        assert_eq!(absent.unwrap_err().code(), tonic::Code::NotFound);
        let mut stat = client.clone();
        let bad = block_on(async move {
            stat.stat(cproto::StatBlobRequest {
                digest: Bytes::from_static(b"short"),
                ..Default::default()
            })
            .await
        });
        assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);

        // And the checking client reads it right at any offset.
        let blobs = GrpcBlobService::new(&address, &daemon.url).unwrap();
        let reader = blobs.open(&digest).unwrap().unwrap();
        assert_eq!(reader.size(), data.len() as u64);
        let mut buf = vec![0u8; 300_000];
        for offset in [0usize, 1 << 20, (1 << 20) - 7, data.len() - 1000] {
            let n = reader.read_at(&mut buf, offset as u64).unwrap();
            assert!(n > 0 && buf[..n] == data[offset..offset + n], "{offset}");
        }
    });
}

/// One MiB of pattern; each MiB of a test blob is this with its index in its first
/// 8 bytes (cheap to make in a debug build, and no two MiBs alike).
fn pattern() -> Vec<u8> {
    (0..1u32 << 20)
        .map(|i| (i ^ (i >> 7) ^ (i >> 13)) as u8)
        .collect()
}

fn write_blob(service: &dyn BlobService, size: u64) -> B3Digest {
    let mut writer: Box<dyn BlobWriter> = service.writer().unwrap();
    let mut piece = pattern();
    let mut offset = 0u64;
    while offset < size {
        let n = (size - offset).min(piece.len() as u64) as usize;
        piece[..8].copy_from_slice(&(offset >> 20).to_le_bytes());
        writer.write_all(&piece[..n]).unwrap();
        offset += n as u64;
    }
    writer.close().unwrap()
}

fn expected_bytes(offset: u64, len: usize) -> Vec<u8> {
    let base = pattern();
    (offset..offset + len as u64)
        .map(|at| {
            let within = (at & ((1 << 20) - 1)) as usize;
            if within < 8 {
                (at >> 20).to_le_bytes()[within]
            } else {
                base[within]
            }
        })
        .collect()
}

#[test]
fn a_range_of_a_gib_blob_arrives_without_the_rest() {
    let (store, _dir) = local_store();
    let size = 1u64 << 30;
    let digest = write_blob(&*store.blobs, size);
    let daemon = start_daemon(store.clone(), Via::Unix);
    let address = GrpcAddress::parse(&daemon.url).unwrap();
    let blobs = GrpcBlobService::new(&address, &daemon.url).unwrap();
    let started = Instant::now();
    let reader = blobs.open(&digest).unwrap().unwrap();
    assert_eq!(reader.size(), size);
    let offset = 700u64 << 20;
    let mut buf = vec![0u8; 128 << 10];
    let n = reader.read_at(&mut buf, offset + 12345).unwrap();
    let first_byte = started.elapsed();
    assert_eq!(n, buf.len().min((1 << 20) - 12345));
    assert!(buf[..n] == expected_bytes(offset + 12345, n));
    // And a range across a chunk boundary, including a MiB's first bytes.
    let n = reader.read_at(&mut buf, (900 << 20) - 100).unwrap();
    assert!(buf[..n] == expected_bytes((900 << 20) - 100, n));
    eprintln!("a 128 KiB range at 700 MiB of a 1 GiB blob over grpc+unix: {first_byte:?}");
}

/// Blobs whose readers flip one byte: what a server that lies about content serves.
struct FlippingBlobs(Arc<dyn BlobService>);

struct FlippingReader(Arc<dyn BlobReader>);

impl BlobReader for FlippingReader {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.0.read_at(buf, offset)?;
        let flip = 1_500_000u64.min(self.size() / 2);
        if (offset..offset + n as u64).contains(&flip) {
            buf[(flip - offset) as usize] ^= 0x20;
        }
        Ok(n)
    }
}

impl BlobService for FlippingBlobs {
    fn has(&self, digest: &B3Digest) -> Result<bool, BlobError> {
        self.0.has(digest)
    }
    fn open(&self, digest: &B3Digest) -> Result<Option<Arc<dyn BlobReader>>, BlobError> {
        Ok(self
            .0
            .open(digest)?
            .map(|r| Arc::new(FlippingReader(r)) as Arc<dyn BlobReader>))
    }
    fn writer(&self) -> Result<Box<dyn BlobWriter>, BlobError> {
        self.0.writer()
    }
    fn outboard(&self, digest: &B3Digest, log: u8) -> Result<Option<Vec<u8>>, BlobError> {
        self.0.outboard(digest, log)
    }
}

/// Directories that come back as another directory.
struct SwappingDirectories(Arc<dyn DirectoryService>);

impl DirectoryService for SwappingDirectories {
    fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        Ok(self.0.get(digest)?.map(|mut d| {
            let _ = d.add(
                PathComponent::try_from(&b"planted"[..]).unwrap(),
                Node::Symlink {
                    target: "/etc/shadow".into(),
                },
            );
            d
        }))
    }
    fn has(&self, digest: &B3Digest) -> Result<bool, DirectoryError> {
        self.0.has(digest)
    }
    fn put(&self, directory: &Directory) -> Result<B3Digest, DirectoryError> {
        self.0.put(directory)
    }
}

#[test]
fn a_lying_server_gives_errors_naming_the_object_never_bytes() {
    each_transport(|via| {
        let (honest, _dir) = local_store();
        let tree = tempfile::tempdir().unwrap();
        let root = sample_tree(tree.path());
        let info = import_path(&honest, &root, &mut |_| {}).unwrap();
        let small = B3Digest::of(b"import sys\n");
        let big = B3Digest::of(
            &(0..3_000_017u32)
                .map(|i| ((i * 31) ^ (i >> 11)) as u8)
                .collect::<Vec<u8>>(),
        );

        // Blobs with a flipped byte: small ones are refused at open, large ones at the
        // chunk that holds the byte, and the chunks before it still read right.
        let liar = Store::open(&StoreAddrs::memory()).unwrap();
        let liar = Arc::new(liar.with_blobs(Arc::new(FlippingBlobs(honest.blobs.clone()))));
        let daemon = start_daemon(liar, via);
        let address = GrpcAddress::parse(&daemon.url).unwrap();
        let blobs = GrpcBlobService::new(&address, &daemon.url).unwrap();
        let err = blobs
            .open(&small)
            .err()
            .expect("a flipped small blob is refused");
        assert!(err.to_string().contains(&small.to_string()), "{err}");
        let reader = blobs.open(&big).unwrap().unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(reader.read_at(&mut buf, 0).unwrap(), 4096);
        let err = reader.read_at(&mut buf, 1_500_000).unwrap_err();
        assert!(err.to_string().contains(&big.to_string()), "{err}");
        drop(daemon);

        // Directories that do not match their digest.
        let liar = Store::open(&StoreAddrs::memory()).unwrap();
        let liar = Arc::new(
            liar.with_directories(Arc::new(SwappingDirectories(honest.directories.clone()))),
        );
        let daemon = start_daemon(liar, via);
        let client = client_store(&daemon.url);
        let Node::Directory { digest, .. } = info.node else {
            panic!("a directory");
        };
        let err = client.directories.get(&digest).unwrap_err();
        assert!(err.to_string().contains(&digest.to_string()), "{err}");
        let mut nar = Vec::new();
        assert!(client.write_nar(&info.node, &mut nar).is_err());
    });
}

#[test]
fn snix_package_names_and_health() {
    let store = Arc::new(Store::memory());
    let tree = tempfile::tempdir().unwrap();
    let root = sample_tree(tree.path());
    let info = import_path(&store, &root, &mut |_| {}).unwrap();
    let daemon = start_daemon(store, Via::Unix);
    let snix = format!("{}?package=snix", daemon.url);
    let client = client_store(&snix);
    assert_eq!(client.path_info(&info.store_path).unwrap().unwrap(), info);
    assert!(nar_of(&client, &info.node).len() as u64 == info.nar_size);

    let address = GrpcAddress::parse(&daemon.url).unwrap();
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(transport(&address).unwrap());
    let status = block_on(async move {
        let mut statuses = HashSet::new();
        for service in [
            "",
            "tvix.castore.v1.BlobService",
            "snix.store.v1.PathInfoService",
        ] {
            let answer = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            statuses.insert(answer.status);
        }
        statuses
    });
    assert_eq!(
        status,
        HashSet::from([tonic_health::pb::health_check_response::ServingStatus::Serving as i32])
    );
}
