//! The virtio-fs device driven through a real split virtqueue in guest memory, as a guest
//! driver would, including chains no honest driver sends.

use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    EntryOut, InHeader, InitIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn,
};
use tvix_boot_devices::virtio::Interrupt;
use tvix_boot_store::Store;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::fs::StoreFsOptions;

const MEM_SIZE: usize = 16 << 20;
const QUEUE_LEN: u16 = QUEUE_SIZE;
/// Request and reply buffers live above the queue structures.
const BUFFERS: u64 = 0x10_0000;

struct Harness<'a> {
    memory: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    worker: QueueWorker,
    irq: EventFd,
    next_desc: u16,
    next_avail: u16,
    next_buffer: u64,
}

impl<'a> Harness<'a> {
    fn new(memory: &'a GuestMemoryMmap, store: Store) -> Self {
        let mock = MockSplitQueue::create(memory, GuestAddress(0), QUEUE_LEN);
        let queue: Queue = mock.create_queue().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fs = StoreFs::new(crate::fs::test_fs_store(store), StoreFsOptions::default());
        let worker = QueueWorker {
            memory: memory.clone(),
            queue,
            notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            stop: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            server: Arc::new(Server::new(fs)),
            requests: RequestCounters::new(2),
            index: 1,
        };
        Self {
            memory,
            mock,
            worker,
            irq,
            next_desc: 0,
            next_avail: 0,
            next_buffer: BUFFERS,
        }
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += len.next_multiple_of(0x1000);
        addr
    }

    /// Put raw descriptors in the table and offer the first one to the device.
    fn offer(&mut self, descs: &[SplitDescriptor]) -> u16 {
        if self.next_desc as usize + descs.len() > QUEUE_LEN as usize {
            self.next_desc = 0;
        }
        let head = self.next_desc;
        for (i, desc) in descs.iter().enumerate() {
            self.mock
                .desc_table()
                .store(head + i as u16, RawDescriptor::from(*desc))
                .unwrap();
        }
        self.next_desc += descs.len() as u16;
        self.publish(head);
        head
    }

    fn publish(&mut self, head: u16) {
        let slot = self.next_avail % QUEUE_LEN;
        self.mock
            .avail()
            .ring()
            .ref_at(slot as usize)
            .unwrap()
            .store(head);
        self.next_avail += 1;
        self.mock.avail().idx().store(self.next_avail);
    }

    /// A well-formed request: one readable descriptor with `request`, then writable
    /// descriptors of the given sizes. Returns the writable buffers' addresses.
    fn offer_request(&mut self, request: &[u8], reply_sizes: &[u32]) -> Vec<u64> {
        let req_addr = self.alloc(request.len() as u64);
        self.memory
            .write_slice(request, GuestAddress(req_addr))
            .unwrap();
        let mut descs = Vec::new();
        let mut replies = Vec::new();
        if self.next_desc as usize + 1 + reply_sizes.len() > QUEUE_LEN as usize {
            self.next_desc = 0;
        }
        let base = self.next_desc;
        let count = 1 + reply_sizes.len() as u16;
        let next = |i: u16| {
            if i + 1 < count {
                (VRING_DESC_F_NEXT as u16, base + i + 1)
            } else {
                (0, 0)
            }
        };
        let (flags, n) = next(0);
        descs.push(SplitDescriptor::new(
            req_addr,
            request.len() as u32,
            flags,
            n,
        ));
        for (i, size) in reply_sizes.iter().enumerate() {
            let addr = self.alloc(*size as u64);
            replies.push(addr);
            let (flags, n) = next(i as u16 + 1);
            descs.push(SplitDescriptor::new(
                addr,
                *size,
                flags | VRING_DESC_F_WRITE as u16,
                n,
            ));
        }
        self.offer(&descs);
        replies
    }

    fn process(&mut self) {
        self.worker.process_queue().unwrap();
    }

    /// The used ring's entries so far, as (head, length).
    fn used(&self) -> Vec<(u32, u32)> {
        let count = self.mock.used().idx().load();
        (0..count)
            .map(|i| {
                let elem = self.mock.used().ring().ref_at(i as usize).unwrap().load();
                (elem.id(), elem.len())
            })
            .collect()
    }

    /// Send one request and return the reply: header and body.
    fn call(
        &mut self,
        opcode: Opcode,
        nodeid: u64,
        body: &[u8],
        reply_size: u32,
    ) -> (OutHeader, Vec<u8>) {
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode: opcode as u32,
            unique: self.next_avail as u64 + 1,
            nodeid,
            ..Default::default()
        };
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(body);
        let reply = self.offer_request(&request, &[reply_size])[0];
        self.process();
        let (_, len) = *self.used().last().unwrap();
        let out: OutHeader = self.memory.read_obj(GuestAddress(reply)).unwrap();
        assert_eq!(out.len, len, "used length and reply length differ");
        let mut data = vec![0u8; len as usize - std::mem::size_of::<OutHeader>()];
        self.memory
            .read_slice(
                &mut data,
                GuestAddress(reply + std::mem::size_of::<OutHeader>() as u64),
            )
            .unwrap();
        (out, data)
    }

    fn init(&mut self) {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 1 << 20,
            flags: 0,
        };
        let (out, _) = self.call(Opcode::Init, 0, init.as_slice(), 4096);
        assert_eq!(out.error, 0);
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A store holding one tree: `hello` (a small file) and `big` (2 MiB + 3 bytes).
fn store_with_tree() -> (Store, String, Vec<u8>) {
    let store = Store::memory();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("hello"), b"hello from the store\n").unwrap();
    let big: Vec<u8> = (0..(2 << 20) + 3)
        .map(|i: u32| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    std::fs::write(root.join("big"), &big).unwrap();
    let info = tvix_boot_store::import::import_path(&store, &root, &mut |_| {}).unwrap();
    (store, info.store_path.to_basename(), big)
}

fn cstr(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

#[test]
fn lookup_open_and_read_through_the_queue() {
    let memory = memory();
    let (store, basename, big) = store_with_tree();
    let mut h = Harness::new(&memory, store);
    h.init();
    assert_eq!(
        h.irq.read().unwrap(),
        1,
        "used buffers must raise the interrupt"
    );

    let (out, body) = h.call(Opcode::Lookup, ROOT, &cstr(&basename), 4096);
    assert_eq!(out.error, 0);
    let tree = EntryOut::from_slice(&body[..std::mem::size_of::<EntryOut>()])
        .unwrap()
        .nodeid;
    let (out, _) = h.call(
        Opcode::Lookup,
        ROOT,
        &cstr("00000000000000000000000000000000-absent"),
        4096,
    );
    assert_eq!(out.error, -libc::ENOENT);
    let (out, _) = h.call(Opcode::Lookup, ROOT, &cstr("not-a-store-path"), 4096);
    assert_eq!(out.error, -libc::ENOENT);

    let (out, body) = h.call(Opcode::Lookup, tree, &cstr("big"), 4096);
    assert_eq!(out.error, 0);
    let entry = *EntryOut::from_slice(&body[..std::mem::size_of::<EntryOut>()]).unwrap();
    assert_eq!(
        (entry.attr.size, entry.attr.mode),
        (big.len() as u64, libc::S_IFREG | 0o444)
    );

    let (out, body) = h.call(
        Opcode::Open,
        entry.nodeid,
        OpenIn {
            flags: libc::O_RDONLY as u32,
            fuse_flags: 0,
        }
        .as_slice(),
        4096,
    );
    assert_eq!(out.error, 0);
    let fh = OpenOut::from_slice(&body[..std::mem::size_of::<OpenOut>()])
        .unwrap()
        .fh;

    // A 1 MiB read into a chain of 256 page-sized writable descriptors, like the kernel's.
    let read = ReadIn {
        fh,
        offset: 4096 + 5,
        size: 1 << 20,
        ..Default::default()
    };
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<ReadIn>()) as u32,
        opcode: Opcode::Read as u32,
        unique: 99,
        nodeid: entry.nodeid,
        ..Default::default()
    };
    let mut request = header.as_slice().to_vec();
    request.extend_from_slice(read.as_slice());
    let mut sizes = vec![std::mem::size_of::<OutHeader>() as u32];
    sizes.extend(std::iter::repeat_n(4096u32, 256));
    let buffers = h.offer_request(&request, &sizes);
    h.process();
    let (_, len) = *h.used().last().unwrap();
    assert_eq!(len as usize, std::mem::size_of::<OutHeader>() + (1 << 20));
    let mut data = Vec::new();
    for addr in &buffers[1..] {
        let mut page = vec![0u8; 4096];
        h.memory.read_slice(&mut page, GuestAddress(*addr)).unwrap();
        data.extend_from_slice(&page);
    }
    assert!(
        data == big[4096 + 5..4096 + 5 + (1 << 20)],
        "read returned wrong bytes"
    );

    // Writes fail read-only; unknown opcodes get ENOSYS; nothing is left unanswered.
    let (out, _) = h.call(Opcode::Mkdir, tree, &[0u8; 16], 4096);
    assert_eq!(out.error, -libc::EROFS);
    let (out, _) = h.call(
        Opcode::Read,
        entry.nodeid,
        ReadIn {
            fh: 12345,
            size: 10,
            ..Default::default()
        }
        .as_slice(),
        4096,
    );
    assert_eq!(out.error, -libc::EBADF);
    assert_eq!(h.used().len(), h.next_avail as usize);
    // Every answered chain was counted on this worker's queue, none elsewhere.
    assert_eq!(
        h.worker.requests.snapshot(),
        vec![0, u64::from(h.next_avail)]
    );
    assert_eq!(
        h.worker.requests.to_string(),
        format!("hiprio 0, q1 {}", h.next_avail)
    );
}

#[test]
fn malformed_chains_get_an_answer_and_touch_nothing_else() {
    let memory = memory();
    let (store, _, _) = store_with_tree();
    let mut h = Harness::new(&memory, store);
    h.init();
    let outside = MEM_SIZE as u64 + 0x1000;
    // No descriptor below points here: it must come through untouched.
    let canary = GuestAddress(0x80_0000);
    h.memory.write_slice(&[0xa5; 0x10_0000], canary).unwrap();

    // Request buffer outside guest memory.
    h.offer(&[
        SplitDescriptor::new(outside, 64, VRING_DESC_F_NEXT as u16, h.next_desc + 1),
        SplitDescriptor::new(BUFFERS, 64, VRING_DESC_F_WRITE as u16, 0),
    ]);
    // Reply buffer crossing the end of guest memory.
    let header = InHeader {
        len: 40,
        opcode: Opcode::Getattr as u32,
        nodeid: ROOT,
        ..Default::default()
    };
    h.memory
        .write_slice(header.as_slice(), GuestAddress(BUFFERS + 0x8000))
        .unwrap();
    h.offer(&[
        SplitDescriptor::new(
            BUFFERS + 0x8000,
            40,
            VRING_DESC_F_NEXT as u16,
            h.next_desc + 1,
        ),
        SplitDescriptor::new(MEM_SIZE as u64 - 8, 4096, VRING_DESC_F_WRITE as u16, 0),
    ]);
    // A descriptor that loops onto itself.
    let looping = h.next_desc;
    h.offer(&[SplitDescriptor::new(
        BUFFERS,
        40,
        VRING_DESC_F_NEXT as u16,
        looping,
    )]);
    // A chain whose "next" points past the table.
    h.offer(&[SplitDescriptor::new(
        BUFFERS,
        40,
        VRING_DESC_F_NEXT as u16,
        QUEUE_LEN + 7,
    )]);
    // An indirect table outside memory.
    h.offer(&[SplitDescriptor::new(
        outside,
        16 * 4,
        VRING_DESC_F_INDIRECT as u16,
        0,
    )]);
    // Truncated header; header claiming more bytes than sent; no reply buffer at all.
    h.offer_request(&[1, 2, 3], &[4096]);
    let lying = InHeader {
        len: 1 << 30,
        opcode: Opcode::Lookup as u32,
        nodeid: ROOT,
        ..Default::default()
    };
    h.offer_request(lying.as_slice(), &[4096]);
    let getattr = InHeader {
        len: 40,
        opcode: Opcode::Getattr as u32,
        nodeid: ROOT,
        ..Default::default()
    };
    h.offer_request(getattr.as_slice(), &[]);
    // A lookup whose name has no terminating NUL, and a name of 64 KiB.
    let mut unterminated = InHeader {
        len: 40 + 8,
        opcode: Opcode::Lookup as u32,
        nodeid: ROOT,
        ..Default::default()
    }
    .as_slice()
    .to_vec();
    unterminated.extend_from_slice(b"abcdefgh");
    h.offer_request(&unterminated, &[4096]);
    let mut huge = InHeader {
        len: 40 + 65536,
        opcode: Opcode::Lookup as u32,
        nodeid: ROOT,
        ..Default::default()
    }
    .as_slice()
    .to_vec();
    huge.extend(std::iter::repeat_n(b'a', 65535));
    huge.push(0);
    h.offer_request(&huge, &[4096]);
    // Unknown opcode, and an inode the file system never handed out.
    h.offer_request(
        InHeader {
            len: 40,
            opcode: 4242,
            nodeid: ROOT,
            ..Default::default()
        }
        .as_slice(),
        &[4096],
    );
    h.offer_request(
        InHeader {
            len: 40,
            opcode: Opcode::Getattr as u32,
            nodeid: 1 << 40,
            ..Default::default()
        }
        .as_slice(),
        &[4096],
    );

    h.process();
    // The device is still healthy and answers a normal request.
    let (out, _) = h.call(Opcode::Getattr, ROOT, &[0u8; 16], 4096);
    assert_eq!(out.error, 0);
    let used = h.used();
    // Every chain the queue could parse was returned; chains with an invalid head index are
    // skipped by the queue implementation itself.
    assert!(used.len() >= 12, "only {} chains answered", used.len());
    assert!(used.iter().all(|(head, _)| (*head as u16) < QUEUE_LEN));
    let mut after = vec![0u8; 0x10_0000];
    h.memory.read_slice(&mut after, canary).unwrap();
    assert!(
        after.iter().all(|b| *b == 0xa5),
        "a malformed chain wrote outside its buffers"
    );
}

#[test]
fn a_driver_claiming_more_chains_than_the_queue_holds_breaks_the_queue() {
    let memory = memory();
    let h = Harness::new(&memory, Store::memory());
    // None of these can be taken, and "is there more?" is always yes.
    h.mock.avail().idx().store(QUEUE_LEN + 1);
    let Harness { mut worker, .. } = h;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(worker.process_queue().is_err());
    });
    let broken = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the queue worker spins on a broken queue");
    assert!(broken, "the queue worker did not give up on the queue");
}

const ROOT: u64 = crate::fs::ROOT_INODE;

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Random descriptor tables: whatever the guest writes, the device neither panics nor
    /// hangs, and the queue stays usable.
    #[test]
    fn random_chains_never_panic(
        descs in proptest::collection::vec((0u64..(MEM_SIZE as u64 * 2), 0u32..70000, 0u16..8, 0u16..(QUEUE_LEN + 16)), 1..48),
        heads in proptest::collection::vec(0u16..(QUEUE_LEN + 16), 1..16),
        payload in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
    ) {
        let memory = memory();
        let (store, _, _) = store_with_tree();
        let mut h = Harness::new(&memory, store);
        // Plausible FUSE headers sit where random descriptors may point.
        for (i, addr) in (BUFFERS..BUFFERS + 0x20_0000).step_by(0x1000).enumerate() {
            let header = InHeader { len: 40 + payload.len() as u32, opcode: (i % 50) as u32, nodeid: 1 + (i as u64 % 3), ..Default::default() };
            memory.write_slice(header.as_slice(), GuestAddress(addr)).unwrap();
            memory.write_slice(&payload, GuestAddress(addr + 40)).unwrap();
        }
        let table: Vec<SplitDescriptor> = descs.iter().map(|(a, l, f, n)| SplitDescriptor::new(*a, *l, *f, *n)).collect();
        for (i, desc) in table.iter().enumerate() {
            h.mock.desc_table().store(i as u16, RawDescriptor::from(*desc)).unwrap();
        }
        for head in heads {
            h.publish(head);
        }
        h.worker.process_queue().unwrap();
    }
}

#[test]
fn config_space_holds_tag_and_queue_count() {
    let fs = StoreFs::new(
        crate::fs::test_fs_store(Store::memory()),
        StoreFsOptions::default(),
    );
    let device = VirtioFs::new(fs, "tvix", 3).unwrap();
    // Linux reads the tag a byte at a time and the queue count as one 32-bit read.
    let tag: Vec<u8> = (0..36)
        .map(|offset| {
            let mut byte = [0xffu8];
            device.read_config(offset, &mut byte);
            byte[0]
        })
        .collect();
    assert_eq!(&tag[..4], b"tvix");
    assert!(tag[4..].iter().all(|b| *b == 0));
    let mut count = [0u8; 4];
    device.read_config(36, &mut count);
    assert_eq!(u32::from_le_bytes(count), 3);
    let mut past_end = [0xffu8; 4];
    device.read_config(40, &mut past_end);
    assert_eq!(
        past_end, [0xff; 4],
        "bytes past the config are left as the caller zeroed them"
    );
    assert_eq!(device.queue_max_sizes(), vec![QUEUE_SIZE; 4]);
}

/// A large blob in a file-backed store is served before it was hashed whole, each range
/// checked against its outboard: a damaged range gets EIO, and none of its bytes reach
/// guest memory.
#[test]
fn a_damaged_range_of_a_large_blob_fails_and_leaves_guest_memory_alone() {
    let dir = tempfile::tempdir().unwrap();
    let addrs = tvix_boot_store::StoreAddrs::in_directory(&dir.path().join("data"));
    let root = dir.path().join("tree");
    std::fs::create_dir(&root).unwrap();
    let big: Vec<u8> = (0..(4 << 20) + 3)
        .map(|i: u32| (i.wrapping_mul(29) >> 2) as u8)
        .collect();
    std::fs::write(root.join("big"), &big).unwrap();
    let store = Store::open(&addrs).unwrap();
    let info = tvix_boot_store::import::import_path(&store, &root, &mut |_| {}).unwrap();
    drop(store);
    // One byte flipped on disk after the import.
    let hex = tvix_boot_store::B3Digest::of(&big).to_hex();
    let blob = dir.path().join("data/blobs").join(&hex[..2]).join(&hex);
    let damaged = (3 << 20) + 100;
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[damaged] ^= 0x10;
    std::fs::write(&blob, &bytes).unwrap();

    let memory = memory();
    let mut h = Harness::new(&memory, Store::open(&addrs).unwrap());
    h.init();
    let basename = info.store_path.to_basename();
    let (out, body) = h.call(Opcode::Lookup, ROOT, &cstr(&basename), 4096);
    assert_eq!(out.error, 0);
    let tree = EntryOut::from_slice(&body[..std::mem::size_of::<EntryOut>()])
        .unwrap()
        .nodeid;
    let (out, body) = h.call(Opcode::Lookup, tree, &cstr("big"), 4096);
    assert_eq!(out.error, 0);
    let node = EntryOut::from_slice(&body[..std::mem::size_of::<EntryOut>()])
        .unwrap()
        .nodeid;
    let open = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    let (out, body) = h.call(Opcode::Open, node, open.as_slice(), 4096);
    assert_eq!(out.error, 0, "the damage is not found at open");
    let fh = OpenOut::from_slice(&body[..std::mem::size_of::<OpenOut>()])
        .unwrap()
        .fh;

    // A read into `pages` page-sized descriptors that hold a canary beforehand.
    let read = |h: &mut Harness, offset: u64, pages: usize| {
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + std::mem::size_of::<ReadIn>()) as u32,
            opcode: Opcode::Read as u32,
            unique: 7,
            nodeid: node,
            ..Default::default()
        };
        let mut request = header.as_slice().to_vec();
        let body = ReadIn {
            fh,
            offset,
            size: (pages * 4096) as u32,
            ..Default::default()
        };
        request.extend_from_slice(body.as_slice());
        let mut sizes = vec![std::mem::size_of::<OutHeader>() as u32];
        sizes.extend(std::iter::repeat_n(4096u32, pages));
        let buffers = h.offer_request(&request, &sizes);
        for addr in &buffers[1..] {
            h.memory
                .write_slice(&[0xA5u8; 4096], GuestAddress(*addr))
                .unwrap();
        }
        h.process();
        let out: OutHeader = h.memory.read_obj(GuestAddress(buffers[0])).unwrap();
        let mut data = Vec::new();
        for addr in &buffers[1..] {
            let mut page = vec![0u8; 4096];
            h.memory.read_slice(&mut page, GuestAddress(*addr)).unwrap();
            data.extend_from_slice(&page);
        }
        (out, data)
    };

    // Before the damage: served, right.
    let (out, data) = read(&mut h, 5, 64);
    assert_eq!(out.error, 0);
    assert!(
        data == big[5..5 + 64 * 4096],
        "wrong bytes before the damage"
    );
    // The damaged range, as the kernel asks for it (1 MiB at once): EIO, and not one byte
    // of the reply buffers was written.
    let (out, data) = read(&mut h, 3 << 20, 256);
    assert_eq!(out.error, -libc::EIO);
    assert!(
        data.iter().all(|&b| b == 0xA5),
        "bytes reached guest memory"
    );
    // After it: served, right.
    let (out, data) = read(&mut h, (4 << 20) - 4096, 1);
    assert_eq!(out.error, 0);
    assert_eq!(out.len as usize, std::mem::size_of::<OutHeader>() + 4096);
    assert!(data == big[(4 << 20) - 4096..4 << 20]);
}
