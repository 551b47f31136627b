//! A gRPC store server that lies: it flips a byte of a blob it reads out, or serves a
//! directory that does not match its digest. tvix-boot, pointed at it with grpc+unix
//! addresses, must never hand out wrong bytes: reads of the file system (`store mount`,
//! the same StoreFs that serves a guest's /nix/store) get EIO, and host commands
//! (`store export-nar`) fail with a message naming the blob or directory.
//!
//! The lying server is the real daemon code (`tvix_boot_store::grpc::serve`) over a
//! store whose blob or directory service lies, in this test process. `store mount`
//! needs root and /dev/fuse.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tvix_boot_store::blobservice::{BlobError, BlobReader, BlobService, BlobWriter};
use tvix_boot_store::directoryservice::{DirectoryError, DirectoryService};
use tvix_boot_store::grpc::{self, ListenAddr, Listener};
use tvix_boot_store::import::import_path;
use tvix_boot_store::{B3Digest, Directory, Node, PathComponent, Store, StoreAddrs};

const BIN: &str = env!("CARGO_BIN_EXE_tvix-boot");

/// Where a flipped byte goes: in the third MiB of large blobs, the middle of small ones;
/// blobs under 16 bytes are left alone.
fn flip_at(size: u64) -> u64 {
    match size {
        0..16 => u64::MAX,
        16..=0x30_0000 => size / 2,
        _ => (2 << 20) + 4321,
    }
}

struct FlippingBlobs(Arc<dyn BlobService>);
struct FlippingReader(Arc<dyn BlobReader>);

impl BlobReader for FlippingReader {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.0.read_at(buf, offset)?;
        let flip = flip_at(self.size());
        if (offset..offset + n as u64).contains(&flip) {
            buf[(flip - offset) as usize] ^= 1;
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

/// Serves every directory but the root with an extra entry.
struct PlantingDirectories(Arc<dyn DirectoryService>, B3Digest);

impl DirectoryService for PlantingDirectories {
    fn get(&self, digest: &B3Digest) -> Result<Option<Directory>, DirectoryError> {
        let honest = self.0.get(digest)?;
        if *digest == self.1 {
            return Ok(honest);
        }
        Ok(honest.map(|mut d| {
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

struct Server {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(store: Store, socket: PathBuf) -> Server {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listen = ListenAddr::Unix(socket.clone());
    let (ready, is_ready) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let listener = Listener::bind(&listen, None).await.unwrap();
                ready.send(()).unwrap();
                grpc::serve(
                    Arc::new(store),
                    listener,
                    2,
                    Arc::new(|_: &str| {}),
                    async move {
                        let _ = stopped.await;
                    },
                    Duration::ZERO,
                )
                .await
                .unwrap();
            })
    });
    is_ready.recv().unwrap();
    Server {
        socket,
        stop: Some(stop),
        thread: Some(thread),
    }
}

fn with_grpc<'a>(cmd: &'a mut Command, socket: &Path) -> &'a mut Command {
    let url = format!("grpc+unix://{}", socket.display());
    cmd.env("XDG_DATA_HOME", "/nonexistent")
        .env("BLOB_SERVICE_ADDR", &url)
        .env("DIRECTORY_SERVICE_ADDR", &url)
        .env("PATH_INFO_SERVICE_ADDR", &url)
}

struct Mount {
    child: Child,
    dir: PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mount(socket: &Path, dir: &Path, store_path: &str) -> Mount {
    std::fs::create_dir_all(dir).unwrap();
    let child = with_grpc(&mut Command::new(BIN), socket)
        .args(["store", "mount"])
        .arg(dir)
        .env("TVIX_BOOT_LOG", "warn")
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    let basename = store_path.trim_start_matches("/nix/store/");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::symlink_metadata(dir.join(basename)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the mount never showed {basename}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Mount {
        child,
        dir: dir.to_owned(),
    }
}

fn export_nar(socket: &Path, store_path: &str) -> (bool, String) {
    let out = with_grpc(&mut Command::new(BIN), socket)
        .args(["store", "export-nar", store_path])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A tree with a small file, a 5 MiB file and a subdirectory, imported into `store`.
fn tree(dir: &Path, store: &Store) -> (String, B3Digest, B3Digest, B3Digest) {
    let root = dir.join("lied-about");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("small"), b"small file, flipped in the middle\n").unwrap();
    let big: Vec<u8> = (0..5u32 << 20).map(|i| (i ^ (i >> 10)) as u8).collect();
    std::fs::write(root.join("big"), &big).unwrap();
    std::fs::write(root.join("sub/inner"), b"inner\n").unwrap();
    let info = import_path(store, &root, &mut |_| {}).unwrap();
    let Node::Directory { digest, .. } = info.node else {
        panic!("a directory")
    };
    let root_dir = store.directories.get(&digest).unwrap().unwrap();
    let Some(Node::Directory { digest: sub, .. }) = root_dir.get(b"sub") else {
        panic!("sub is a directory")
    };
    (
        info.store_path.to_absolute_path(),
        digest,
        B3Digest::of(&big),
        *sub,
    )
}

fn read(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut out)?;
    Ok(out)
}

#[test]
fn flipped_blob_bytes_are_eio_and_a_named_error() {
    let work = tempfile::tempdir().unwrap();
    let honest = Store::open(&StoreAddrs::in_directory(&work.path().join("store"))).unwrap();
    let (path, _, big, _) = tree(work.path(), &honest);
    let blobs = honest.blobs.clone();
    let liar = honest.with_blobs(Arc::new(FlippingBlobs(blobs)));
    let server = serve(liar, work.path().join("liar.sock"));

    let (ok, stderr) = export_nar(&server.socket, &path);
    assert!(!ok, "export-nar of a lied-about path succeeded");
    assert!(stderr.contains("blob b3:"), "names the blob: {stderr}");

    let mnt = work.path().join("mnt");
    let _mount = mount(&server.socket, &mnt, &path);
    let at = mnt.join(path.trim_start_matches("/nix/store/"));
    // The small file: EIO at open or read. The large one: its first MiBs read right,
    // the range with the flipped byte is EIO.
    let err = read(&at.join("small")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = || std::fs::read_to_string(mnt.with_extension("log")).unwrap_or_default();
    let mut file = std::fs::File::open(at.join("big")).unwrap_or_else(|e| panic!("{e}: {}", log()));
    let mut head = vec![0u8; 1 << 20];
    file.read_exact(&mut head).unwrap();
    assert!(
        head.iter()
            .enumerate()
            .all(|(i, b)| *b == (i ^ (i >> 10)) as u8)
    );
    let err = read(&at.join("big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(read(&at.join("sub/inner")).unwrap(), b"inner\n");
    let _ = big;
}

#[test]
fn a_directory_that_does_not_match_its_digest_is_eio_and_a_named_error() {
    let work = tempfile::tempdir().unwrap();
    let honest = Store::open(&StoreAddrs::in_directory(&work.path().join("store"))).unwrap();
    let (path, root, _, sub) = tree(work.path(), &honest);
    let directories = honest.directories.clone();
    let liar = honest.with_directories(Arc::new(PlantingDirectories(directories, root)));
    let server = serve(liar, work.path().join("liar.sock"));

    let (ok, stderr) = export_nar(&server.socket, &path);
    assert!(!ok, "export-nar through a lied-about directory succeeded");
    assert!(
        stderr.contains(&sub.to_string()),
        "names the directory {sub}: {stderr}"
    );

    let mnt = work.path().join("mnt");
    let _mount = mount(&server.socket, &mnt, &path);
    let at = mnt.join(path.trim_start_matches("/nix/store/"));
    // The root is honest; `sub` is not, and is never listed with the planted entry.
    assert!(read(&at.join("small")).is_ok());
    let err = std::fs::read_dir(at.join("sub")).and_then(|mut d| d.next().transpose());
    assert_eq!(err.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(std::fs::symlink_metadata(at.join("sub/planted")).is_err());
}
