//! A gRPC store server that lies: it flips a byte of a blob it reads out, or serves a
//! directory that does not match its digest. tvix-boot, pointed at it with grpc+unix
//! addresses, must never hand out wrong bytes: reads of the file system (`store mount`,
//! the same StoreFs that serves a guest's /nix/store) get EIO, and host commands
//! (`store export-nar`) fail with a message naming the blob or directory.
//!
//! The lying server is the real daemon code (`tvix_boot_store::grpc::serve`) over a
//! store whose blob or directory service lies (tvix_boot_tests::lying_store, which the
//! end-to-end suite `grpc_store` runs in the test host, where a guest reads through
//! it), in this test process. `store mount` needs root and /dev/fuse.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tvix_boot_store::import::import_path;
use tvix_boot_store::{B3Digest, Node, Store, StoreAddrs};
use tvix_boot_tests::lying_store::{self, Lie, PLANTED, Server, Targets};

const BIN: &str = env!("CARGO_BIN_EXE_tvix-boot");

/// Serves `honest` telling `lie` about everything below `path`.
fn serve_lying(honest: Store, lie: Lie, path: &str, socket: PathBuf) -> Server {
    let targets = Targets::below(&honest, path).unwrap();
    Server::start(lying_store::lying(honest, lie, targets), socket).unwrap()
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

/// A tree with a small file, a 5 MiB file and a subdirectory, imported into `store`: its
/// store path and the subdirectory's digest.
fn tree(dir: &Path, store: &Store) -> (String, B3Digest) {
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
    (info.store_path.to_absolute_path(), *sub)
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
    let (path, _) = tree(work.path(), &honest);
    let server = serve_lying(
        honest,
        Lie::FlipBlobBytes,
        &path,
        work.path().join("liar.sock"),
    );

    let (ok, stderr) = export_nar(server.socket(), &path);
    assert!(!ok, "export-nar of a lied-about path succeeded");
    assert!(stderr.contains("blob b3:"), "names the blob: {stderr}");

    let mnt = work.path().join("mnt");
    let _mount = mount(server.socket(), &mnt, &path);
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
}

#[test]
fn a_directory_that_does_not_match_its_digest_is_eio_and_a_named_error() {
    let work = tempfile::tempdir().unwrap();
    let honest = Store::open(&StoreAddrs::in_directory(&work.path().join("store"))).unwrap();
    let (path, sub) = tree(work.path(), &honest);
    let server = serve_lying(
        honest,
        Lie::PlantDirectoryEntries,
        &path,
        work.path().join("liar.sock"),
    );

    let (ok, stderr) = export_nar(server.socket(), &path);
    assert!(!ok, "export-nar through a lied-about directory succeeded");
    assert!(
        stderr.contains(&sub.to_string()),
        "names the directory {sub}: {stderr}"
    );

    let mnt = work.path().join("mnt");
    let _mount = mount(server.socket(), &mnt, &path);
    let at = mnt.join(path.trim_start_matches("/nix/store/"));
    // The root is honest; `sub` is not, and is never listed with the planted entry.
    assert!(read(&at.join("small")).is_ok());
    let err = std::fs::read_dir(at.join("sub")).and_then(|mut d| d.next().transpose());
    assert_eq!(err.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(std::fs::symlink_metadata(at.join("sub").join(PLANTED)).is_err());
}
