//! `virtiofs_request`: a guest's request queue, built from the input, served by the
//! virtio-fs device's own queue pass and FUSE server over a small store.
//!
//! Input: one config byte, then operations until the input ends; a last pass follows.
//!
//! - config: bits 0-3 log2 of the queue size (at most 1024), [`config::EVENT_IDX`],
//!   [`config::LIST_ROOT`], [`config::SHOW_XATTR`].
//! - [`op::REQUEST`] flags:u8 len:u16 bytes[len] replies:u8 (size:u16)*: a chain of the
//!   request (FUSE bytes as given) and `replies % 9` writable buffers, in free buffer space.
//! - [`op::DESC`] index:u16 addr:u64 len:u32 flags:u16 next:u16: any descriptor.
//! - [`op::PUBLISH`] head:u16: offer any head.
//! - [`op::POKE`] addr:u32 len:u8 bytes[len]: write guest memory anywhere.
//! - [`op::AVAIL_IDX`] delta:u16: move the available index without offering anything.
//! - [`op::NOTIFY`] flags:u16 used_event:u16: the available ring's notification fields.
//! - [`op::PROCESS`]: the device serves the queue, as a queue worker does when notified.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::sync::{Arc, OnceLock};

use tvix_boot_store::Store;
use tvix_boot_virtiofs::device::QUEUE_SIZE;
use tvix_boot_virtiofs::fuzzing::RequestServer;
use tvix_boot_virtiofs::{StoreFs, StoreFsOptions};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::{Cursor, Encoder};
use crate::virtq::{
    Alloc, Buffer, ChainView, Desc, DriverQueue, MEM_SIZE, Watch, available_chains, gather, poke,
    read_desc,
};

pub mod config {
    pub const EVENT_IDX: u8 = 0x10;
    pub const LIST_ROOT: u8 = 0x20;
    pub const SHOW_XATTR: u8 = 0x40;
}

pub mod op {
    pub const REQUEST: u8 = 0;
    pub const DESC: u8 = 1;
    pub const PUBLISH: u8 = 2;
    pub const POKE: u8 = 3;
    pub const AVAIL_IDX: u8 = 4;
    pub const PROCESS: u8 = 5;
    pub const NOTIFY: u8 = 6;
    pub(super) const COUNT: u8 = 7;
}

/// Flags of [`op::REQUEST`].
pub mod request {
    /// Set the FUSE header's `len` to the request's real length (mutations that grow or
    /// shrink a request keep it well-formed).
    pub const FIX_LEN: u8 = 1;
    /// Through an indirect descriptor table.
    pub const INDIRECT: u8 = 2;
    /// The request in two readable buffers.
    pub const SPLIT: u8 = 4;
    /// Writable buffers before the readable ones (not allowed).
    pub const REPLY_FIRST: u8 = 8;
}

const QUEUE_BASE: u64 = 0x1000;
const DATA_START: u64 = 0x10000;
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;

/// A reply seen in a plain pass (see [`Watch`]).
#[derive(Debug)]
pub struct Reply {
    pub unique: u64,
    pub error: i32,
    pub len: u32,
}

/// Three store paths: a tree with files, an executable, an empty file, a symlink and a
/// subdirectory; a single file; a symlink.
pub struct TestStore {
    pub store: Arc<Store>,
    pub tree: String,
    pub file: String,
    pub link: String,
}

/// `tree`'s entries in name order: the inodes a fresh file system gives them after a
/// lookup of `tree` (inode 2) are 3, 4, ...
pub const TREE_ENTRIES: [&str; 6] = ["big", "empty", "exec", "hello", "link", "sub"];
pub const BIG_LEN: usize = 70_000;

pub fn test_store() -> &'static TestStore {
    static STORE: OnceLock<TestStore> = OnceLock::new();
    STORE.get_or_init(|| {
        let store = Store::memory();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        let big: Vec<u8> = (0..BIG_LEN as u32)
            .map(|i| (i.wrapping_mul(31) >> 3) as u8)
            .collect();
        std::fs::write(tree.join("big"), big).expect("write");
        std::fs::write(tree.join("empty"), b"").expect("write");
        std::fs::write(tree.join("exec"), b"#!/bin/sh\necho hi\n").expect("write");
        std::fs::set_permissions(tree.join("exec"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(tree.join("hello"), b"hello from the store\n").expect("write");
        symlink("hello", tree.join("link")).expect("symlink");
        std::fs::write(tree.join("sub/deep"), b"deep\n").expect("write");
        symlink("/nix/store/nowhere", tree.join("sub/dangling")).expect("symlink");
        let file = dir.path().join("hello.txt");
        std::fs::write(&file, b"a store path that is a file\n").expect("write");
        let link = dir.path().join("link");
        symlink("tree/hello", &link).expect("symlink");
        let import = |path: &std::path::Path| {
            tvix_boot_store::import::import_path(&store, path, &mut |_| {})
                .expect("import")
                .store_path
                .to_basename()
        };
        let (tree, file, link) = (import(&tree), import(&file), import(&link));
        TestStore {
            store: Arc::new(store),
            tree,
            file,
            link,
        }
    })
}

pub fn run(data: &[u8]) -> Vec<Reply> {
    let mut input = Cursor::new(data);
    let config = input.u8().unwrap_or(6);
    let size = 1u16 << (config & 0xf).min(QUEUE_SIZE.trailing_zeros() as u8);
    let mem = crate::virtq::memory();
    let mut driver = DriverQueue::new(&mem, QUEUE_BASE, size);
    let mut queue = driver.device_queue(&mem, QUEUE_SIZE, config & config::EVENT_IDX != 0);
    let options = StoreFsOptions {
        list_root: config & config::LIST_ROOT != 0,
        show_xattr: config & config::SHOW_XATTR != 0,
    };
    let server = RequestServer::new(StoreFs::new(
        tvix_boot_virtiofs::FsStore {
            blobs: test_store().store.blobs.clone(),
            directories: test_store().store.directories.clone(),
            root_nodes: test_store().store.clone(),
        },
        options,
    ));
    let mut alloc = Alloc::new(DATA_START, MEM_SIZE);
    let mut replies = Vec::new();

    while let Some(op) = input.u8() {
        let done = match op % op::COUNT {
            op::REQUEST => offer_request(&mut input, &mem, &mut driver, &mut alloc).is_none(),
            op::DESC => read_desc(&mut input)
                .map(|(index, desc)| driver.set_desc(&mem, index, desc))
                .is_none(),
            op::PUBLISH => input.u16().map(|head| driver.publish(&mem, head)).is_none(),
            op::POKE => poke(&mut input, &mem).is_none(),
            op::AVAIL_IDX => input
                .u16()
                .map(|delta| {
                    let idx = driver.avail_idx(&mem).wrapping_add(delta);
                    driver.set_avail_idx(&mem, idx)
                })
                .is_none(),
            op::NOTIFY => (|| {
                let (flags, used_event) = (input.u16()?, input.u16()?);
                driver.set_notification_fields(&mem, flags, used_event);
                Some(())
            })()
            .is_none(),
            _ => {
                if !serve(&mem, &driver, &mut queue, &server, &mut replies) {
                    // A queue worker stops serving a queue the driver broke.
                    return replies;
                }
                false
            }
        };
        if done {
            break;
        }
    }
    serve(&mem, &driver, &mut queue, &server, &mut replies);
    replies
}

fn offer_request(
    input: &mut Cursor,
    mem: &GuestMemoryMmap,
    driver: &mut DriverQueue,
    alloc: &mut Alloc,
) -> Option<()> {
    let flags = input.u8()?;
    let len = input.u16()?;
    let mut request = input.up_to(len.into()).to_vec();
    if flags & request::FIX_LEN != 0 && request.len() >= 4 {
        let len = request.len() as u32;
        request[..4].copy_from_slice(&len.to_le_bytes());
    }
    let addr = alloc.take(request.len() as u64);
    mem.write_slice(&request, GuestAddress(addr)).ok()?;
    let mut buffers = Vec::new();
    let len = request.len() as u32;
    if flags & request::SPLIT != 0 && len >= 2 {
        buffers.push(Buffer {
            addr,
            len: len / 2,
            write: false,
        });
        buffers.push(Buffer {
            addr: addr + u64::from(len / 2),
            len: len - len / 2,
            write: false,
        });
    } else {
        buffers.push(Buffer {
            addr,
            len,
            write: false,
        });
    }
    let readable = buffers.len();
    for _ in 0..input.u8()? % 9 {
        let size = input.u16()?;
        buffers.push(Buffer {
            addr: alloc.take(size.into()),
            len: size.into(),
            write: true,
        });
    }
    if flags & request::REPLY_FIRST != 0 {
        buffers.rotate_left(readable);
    }
    if flags & request::INDIRECT != 0 {
        let table = alloc.take(16 * buffers.len() as u64);
        driver.offer_indirect(mem, table, &buffers);
    } else {
        driver.offer(mem, &buffers);
    }
    Some(())
}

/// One pass of the device over the queue, checked. False when the device gave up on the
/// queue (as a queue worker does when the driver broke it).
fn serve(
    mem: &GuestMemoryMmap,
    driver: &DriverQueue,
    queue: &mut Queue,
    server: &RequestServer,
    replies: &mut Vec<Reply>,
) -> bool {
    let chains = available_chains(queue, mem);
    let watch = Watch::new(mem, &[driver], &[(driver, &chains)]);
    let used_before = driver.used_idx(mem);
    let offered = driver.avail_idx(mem).wrapping_sub(queue.next_avail());
    let answered = match server.serve(queue, mem) {
        Ok((answered, _notify)) => answered,
        Err(e) => {
            // The only way a pass over a valid queue can fail: the driver claims to offer
            // more chains than the queue holds. (In a pass that is not plain, a reply may
            // have rewritten the ring itself.)
            assert!(
                !watch.plain() || offered > driver.size,
                "the device gave up on a queue it could serve: {e}"
            );
            return false;
        }
    };
    assert_eq!(
        queue.next_avail(),
        driver.avail_idx(mem),
        "a pass ended with chains still offered"
    );
    assert_eq!(
        driver.used_idx(mem),
        queue.next_used(),
        "the used index in memory is not the device's"
    );
    let used = driver.used_since(mem, used_before);
    assert_eq!(used.len() as u64, answered, "answers counted wrongly");
    assert!(
        used.iter().all(|(id, _)| *id < u32::from(driver.size)),
        "a used entry names a descriptor outside the table"
    );
    if !watch.plain() {
        return true;
    }
    watch.check(mem);
    let expected: Vec<&ChainView> = chains.iter().filter(|c| c.head < driver.size).collect();
    assert_eq!(
        used.len(),
        expected.len(),
        "every chain with a valid head gets exactly one answer"
    );
    for (i, (&(id, len), chain)) in used.iter().zip(&expected).enumerate() {
        assert_eq!(id, u32::from(chain.head), "answers out of order");
        assert!(
            u64::from(len) <= chain.capacity(),
            "used length {len} exceeds the chain's {} writable bytes",
            chain.capacity()
        );
        // A head offered again later was answered again: its buffers hold the later reply.
        if len == 0 || expected[i + 1..].iter().any(|c| c.head == chain.head) {
            continue;
        }
        replies.push(check_reply(mem, chain, len));
    }
    true
}

/// A reply is one FUSE out header that counts the bytes written, for the request's
/// `unique`, with 0 or a negative errno and nothing after an error.
fn check_reply(mem: &GuestMemoryMmap, chain: &ChainView, len: u32) -> Reply {
    let reply = gather(mem, &chain.writable, len as usize).expect("written, so in memory");
    assert!(
        reply.len() >= OUT_HEADER_LEN,
        "a {len}-byte reply has no header"
    );
    let header_len = u32::from_le_bytes(reply[0..4].try_into().expect("4 bytes"));
    let error = i32::from_le_bytes(reply[4..8].try_into().expect("4 bytes"));
    let unique = u64::from_le_bytes(reply[8..16].try_into().expect("8 bytes"));
    assert_eq!(
        header_len, len,
        "the out header's len is not the used length"
    );
    assert!((-4095..=0).contains(&error), "error {error} is not -errno");
    assert!(
        error == 0 || len as usize == OUT_HEADER_LEN,
        "an error reply with a body"
    );
    if let Some(request) = gather(mem, &chain.readable, IN_HEADER_LEN)
        && request.len() == IN_HEADER_LEN
    {
        let request_unique = u64::from_le_bytes(request[8..16].try_into().expect("8 bytes"));
        assert_eq!(unique, request_unique, "a reply to another request");
    }
    Reply { unique, error, len }
}

/// The input format, for writing seeds.
pub struct Seed(Encoder);

impl Seed {
    pub fn new(config: u8) -> Self {
        let mut e = Encoder::default();
        e.u8(config);
        Self(e)
    }

    /// A well-formed chain: `request`, then writable buffers of `replies` bytes each.
    pub fn request(&mut self, flags: u8, request: &[u8], replies: &[u16]) -> &mut Self {
        self.0
            .u8(op::REQUEST)
            .u8(flags)
            .u16(request.len() as u16)
            .bytes(request)
            .u8(replies.len() as u8);
        for size in replies {
            self.0.u16(*size);
        }
        self
    }

    pub fn desc(&mut self, index: u16, desc: Desc) -> &mut Self {
        self.0
            .u8(op::DESC)
            .u16(index)
            .u64(desc.addr)
            .u32(desc.len)
            .u16(desc.flags)
            .u16(desc.next);
        self
    }

    pub fn publish(&mut self, head: u16) -> &mut Self {
        self.0.u8(op::PUBLISH).u16(head);
        self
    }

    pub fn poke(&mut self, addr: u32, bytes: &[u8]) -> &mut Self {
        self.0
            .u8(op::POKE)
            .u32(addr)
            .u8(bytes.len() as u8)
            .bytes(bytes);
        self
    }

    pub fn avail_idx(&mut self, delta: u16) -> &mut Self {
        self.0.u8(op::AVAIL_IDX).u16(delta);
        self
    }

    pub fn notify(&mut self, flags: u16, used_event: u16) -> &mut Self {
        self.0.u8(op::NOTIFY).u16(flags).u16(used_event);
        self
    }

    pub fn process(&mut self) -> &mut Self {
        self.0.u8(op::PROCESS);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.0.clone()
    }
}

/// A FUSE request: the in header (with the right `len`) and `body`.
pub fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u32((IN_HEADER_LEN + body.len()) as u32)
        .u32(opcode)
        .u64(unique)
        .u64(nodeid)
        .u32(0) // uid
        .u32(0) // gid
        .u32(1) // pid
        .u32(0) // padding
        .bytes(body);
    e.0
}
