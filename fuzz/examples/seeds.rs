//! Writes the seed corpora of the device targets (`fuzz/corpus/{virtiofs_request,
//! virtio_mmio,console_queues}/`), after running each seed through its target's harness
//! and checking that it gets where it is meant to (a seed that stops at FUSE INIT seeds
//! nothing). Run from `fuzz/`: `cargo +nightly run --example seeds`.

use std::path::Path;

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, BatchForgetIn, ForgetIn, ForgetOne, GetattrIn, GetxattrIn, InitIn, Opcode, OpenIn,
    ReadIn, ReleaseIn,
};
use tvix_boot_fuzz::virtiofs::{self, BIG_LEN, TREE_ENTRIES, fuse_request, request, test_store};
use tvix_boot_fuzz::virtq::{Desc, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use tvix_boot_fuzz::{console, mmio};
use virtio_bindings::virtio_mmio::*;
use vm_memory::ByteValued;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(name), bytes).expect("write");
    println!("{target}/{name}: {} bytes", bytes.len());
}

fn main() {
    virtiofs_seeds();
    mmio_seeds();
    console_seeds();
}

/// A FUSE request and the reply buffers it gets.
struct Fuse {
    seed: virtiofs::Seed,
    unique: u64,
}

const ROOT: u64 = 1;
const TREE: u64 = 2;

/// The inode a lookup in `tree` gives `name` (see `TREE_ENTRIES`).
fn tree_inode(name: &str) -> u64 {
    3 + TREE_ENTRIES
        .iter()
        .position(|n| *n == name)
        .expect("an entry of tree") as u64
}

fn cstr(name: &str) -> Vec<u8> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

impl Fuse {
    fn new(config: u8) -> Self {
        let mut f = Self {
            seed: virtiofs::Seed::new(config),
            unique: 0,
        };
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 1 << 17,
            flags: 0,
        };
        f.op(Opcode::Init, 0, init.as_slice());
        f
    }

    fn op_with(&mut self, flags: u8, opcode: Opcode, node: u64, body: &[u8], replies: &[u16]) {
        self.unique += 1;
        let bytes = fuse_request(opcode as u32, self.unique, node, body);
        self.seed.request(flags | request::FIX_LEN, &bytes, replies);
    }

    fn op(&mut self, opcode: Opcode, node: u64, body: &[u8]) {
        self.op_with(0, opcode, node, body, &[4096]);
    }

    /// Runs the seed through the harness: every reply must be a success, except those
    /// to the requests numbered in `failing`.
    fn finish(mut self, name: &str, failing: &[u64]) {
        self.seed.process();
        let bytes = self.seed.bytes();
        let replies = virtiofs::run(&bytes);
        for reply in &replies {
            assert_eq!(
                reply.error != 0,
                failing.contains(&reply.unique),
                "{name}: request {} got error {}",
                reply.unique,
                reply.error
            );
        }
        println!("  {} replies: {replies:?}", replies.len());
        write("virtiofs_request", name, &bytes);
    }
}

fn virtiofs_seeds() {
    let store = test_store();
    let size64 = 6;

    let f = Fuse::new(size64);
    f.finish("init", &[]);

    let mut f = Fuse::new(size64);
    f.op(Opcode::Lookup, ROOT, &cstr(&store.tree));
    f.op(Opcode::Getattr, TREE, GetattrIn::default().as_slice());
    f.op(Opcode::Lookup, TREE, &cstr("hello"));
    f.op(
        Opcode::Getattr,
        tree_inode("hello"),
        GetattrIn::default().as_slice(),
    );
    f.op(Opcode::Lookup, TREE, &cstr("sub"));
    f.op(Opcode::Lookup, tree_inode("sub"), &cstr("deep"));
    f.op(Opcode::Lookup, ROOT, &cstr(&store.file));
    f.op(Opcode::Lookup, ROOT, &cstr(&store.link));
    f.op(Opcode::Lookup, ROOT, &cstr("not-a-store-path")); // 10: ENOENT
    f.finish("lookup_getattr", &[10]);

    let mut f = Fuse::new(size64);
    f.op(Opcode::Lookup, ROOT, &cstr(&store.tree));
    f.op(Opcode::Lookup, TREE, &cstr("big"));
    let big = tree_inode("big");
    let open = OpenIn {
        flags: libc::O_RDONLY as u32,
        fuse_flags: 0,
    };
    f.op(Opcode::Open, big, open.as_slice());
    let read = |offset: u64, size: u32| ReadIn {
        fh: 1,
        offset,
        size,
        ..ReadIn::default()
    };
    // The reply in a header-sized buffer and two pages, as the kernel sends reads.
    f.op_with(
        0,
        Opcode::Read,
        big,
        read(4096 + 5, 8192).as_slice(),
        &[16, 4096, 4096],
    );
    f.op_with(
        request::SPLIT | request::INDIRECT,
        Opcode::Read,
        big,
        read(BIG_LEN as u64 - 10, 100).as_slice(),
        &[200],
    );
    let release = ReleaseIn {
        fh: 1,
        ..ReleaseIn::default()
    };
    f.op(Opcode::Release, big, release.as_slice());
    f.op(Opcode::Lookup, TREE, &cstr("exec"));
    f.op(Opcode::Open, tree_inode("exec"), open.as_slice());
    f.op(Opcode::Open, TREE, open.as_slice()); // 10: EISDIR
    f.finish("open_read", &[10]);

    let mut f = Fuse::new(size64);
    f.op(Opcode::Lookup, ROOT, &cstr(&store.tree));
    f.op(Opcode::Opendir, TREE, OpenIn::default().as_slice());
    let listing = ReadIn {
        fh: 1,
        size: 4096,
        ..ReadIn::default()
    };
    f.op(Opcode::Readdirplus, TREE, listing.as_slice());
    f.op(Opcode::Readdir, TREE, listing.as_slice());
    let resume = ReadIn {
        offset: 3,
        size: 200,
        ..listing
    };
    f.op(Opcode::Readdirplus, TREE, resume.as_slice());
    f.op(Opcode::Releasedir, TREE, release.as_slice());
    f.finish("readdirplus", &[]);

    let mut f = Fuse::new(size64);
    f.op(Opcode::Lookup, ROOT, &cstr(&store.tree));
    f.op(Opcode::Lookup, TREE, &cstr("link"));
    f.op(Opcode::Readlink, tree_inode("link"), &[]);
    f.op(Opcode::Readlink, TREE, &[]); // 5: EINVAL
    f.finish("readlink", &[5]);

    let mut f = Fuse::new(size64 | virtiofs::config::SHOW_XATTR);
    f.op(Opcode::Lookup, ROOT, &cstr(&store.tree));
    let xattr = |size: u32, name: &str| {
        let mut body = GetxattrIn { size, padding: 0 }.as_slice().to_vec();
        body.extend(cstr(name));
        body
    };
    let directory = "user.tvix.castore.directory.digest";
    f.op(Opcode::Getxattr, TREE, &xattr(0, directory));
    f.op(Opcode::Getxattr, TREE, &xattr(256, directory));
    f.op(Opcode::Listxattr, TREE, GetxattrIn::default().as_slice());
    f.op(
        Opcode::Listxattr,
        TREE,
        GetxattrIn {
            size: 256,
            padding: 0,
        }
        .as_slice(),
    );
    f.op(Opcode::Lookup, TREE, &cstr("big"));
    f.op(
        Opcode::Getxattr,
        tree_inode("big"),
        &xattr(256, "user.tvix.castore.blob.digest"),
    );
    f.op(Opcode::Getxattr, TREE, &xattr(4, directory)); // 9: ERANGE
    f.finish("xattr", &[9]);

    let mut f = Fuse::new(size64);
    f.op(Opcode::Lookup, ROOT, &cstr(&store.tree));
    f.op(Opcode::Forget, TREE, ForgetIn { nlookup: 1 }.as_slice());
    let mut batch = BatchForgetIn { count: 2, dummy: 0 }.as_slice().to_vec();
    for nodeid in [TREE, 3] {
        batch.extend_from_slice(ForgetOne { nodeid, nlookup: 1 }.as_slice());
    }
    f.op(Opcode::BatchForget, 0, &batch);
    f.op(Opcode::Getattr, TREE, GetattrIn::default().as_slice());
    f.finish("forget", &[]);

    let mut f = Fuse::new(size64 | virtiofs::config::LIST_ROOT);
    f.op(Opcode::Opendir, ROOT, OpenIn::default().as_slice());
    f.op(Opcode::Readdirplus, ROOT, listing.as_slice());
    f.op(Opcode::Statfs, ROOT, &[]);
    let access = |mask| AccessIn { mask, padding: 0 };
    f.op(Opcode::Access, ROOT, access(libc::R_OK as u32).as_slice());
    f.op(Opcode::Access, ROOT, access(libc::W_OK as u32).as_slice()); // 6: EROFS
    let mut mkdir = vec![0u8; 8];
    mkdir.extend(cstr("new"));
    f.op(Opcode::Mkdir, ROOT, &mkdir); // 7: EROFS
    f.op(Opcode::Getattr, 1 << 40, GetattrIn::default().as_slice()); // 8: ENOENT
    f.finish("list_root_misc", &[6, 7, 8]);

    // Chains no honest driver sends, around requests that must still be answered.
    let mut f = Fuse::new(size64 | virtiofs::config::EVENT_IDX);
    f.op_with(
        request::REPLY_FIRST,
        Opcode::Getattr,
        ROOT,
        GetattrIn::default().as_slice(),
        &[4096],
    );
    f.seed.notify(0, 0);
    f.seed
        .desc(
            40,
            Desc {
                addr: 0x20000,
                len: 40,
                flags: VRING_DESC_F_NEXT,
                next: 40,
            },
        )
        .publish(40)
        .desc(
            41,
            Desc {
                addr: 0x20000,
                len: 0xffff_ffff,
                flags: VRING_DESC_F_WRITE,
                next: 0,
            },
        )
        .publish(41)
        .desc(
            42,
            Desc {
                addr: 0xffff_f000,
                len: 64,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            },
        )
        .publish(42)
        .publish(1000)
        .poke(
            0x20000,
            &fuse_request(Opcode::Getattr as u32, 77, ROOT, &[0; 16]),
        )
        .process();
    f.op(Opcode::Getattr, ROOT, GetattrIn::default().as_slice());
    f.finish("odd_chains", &[]);

    // A driver that claims more chains than the queue holds: the device gives the queue
    // up (it used to spin on it).
    let mut f = Fuse::new(size64);
    f.op(Opcode::Getattr, ROOT, GetattrIn::default().as_slice());
    f.seed.process().avail_idx(1000);
    f.op(Opcode::Getattr, ROOT, GetattrIn::default().as_slice());
    f.finish("overfull", &[]);
}

fn mmio_seeds() {
    let version_1 = 1u64 << 32;
    let event_idx = 1u64 << 29;
    let ok = 0xb; // ACKNOWLEDGE | DRIVER | FEATURES_OK

    let mut s = mmio::Seed::new(&[16, 16], version_1 | event_idx, false, b"tvix config");
    for register in [
        VIRTIO_MMIO_MAGIC_VALUE,
        VIRTIO_MMIO_VERSION,
        VIRTIO_MMIO_DEVICE_ID,
        VIRTIO_MMIO_VENDOR_ID,
    ] {
        s.read(register as u16, 4);
    }
    s.reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        .read(VIRTIO_MMIO_DEVICE_FEATURES as u16, 4)
        .handshake(version_1 | event_idx, false)
        .queue(0, 16, 0x1000, 0x2000, 0x3000)
        .read(VIRTIO_MMIO_QUEUE_READY as u16, 4)
        .queue(1, 16, 0x2_0000, 0x2_1000, 0x2_2000)
        .reg(VIRTIO_MMIO_STATUS, ok | 4)
        .reg(VIRTIO_MMIO_QUEUE_NOTIFY, 1)
        .reg(VIRTIO_MMIO_QUEUE_NOTIFY, 7)
        .raise(0)
        .raise(1)
        .read(VIRTIO_MMIO_INTERRUPT_STATUS as u16, 4)
        .reg(VIRTIO_MMIO_INTERRUPT_ACK, 1)
        .read(VIRTIO_MMIO_CONFIG as u16, 4)
        .read(VIRTIO_MMIO_CONFIG as u16 + 9, 8)
        .read(VIRTIO_MMIO_SHM_LEN_LOW as u16, 4)
        .reg(VIRTIO_MMIO_QUEUE_NUM, 8)
        .reg(VIRTIO_MMIO_STATUS, 0)
        .read(VIRTIO_MMIO_STATUS as u16, 4);
    mmio_seed("handshake", &s, 1);

    // Queues outside memory, across the hole between the regions, misaligned, too big.
    let mut s = mmio::Seed::new(&[16, 256], version_1, false, &[]);
    s.handshake(version_1, false)
        .queue(0, 16, 0xffff_ffff_ffff_f000, 0x2000, 0x3000)
        .queue(1, 256, 0xf000, 0x1_f800, 0x2_2000)
        .reg(VIRTIO_MMIO_STATUS, ok | 4)
        .reg(VIRTIO_MMIO_STATUS, 0)
        .handshake(version_1, false)
        .queue(0, 16, 0x1001, 0x2001, 0x3002)
        .queue(1, 512, 0x2_0000, 0x2_1000, 0x2_2000)
        .reg(VIRTIO_MMIO_STATUS, ok | 4);
    mmio_seed("bad_queues", &s, 0);

    // Features never offered; DRIVER_OK before negotiation; bits cleared without reset.
    let mut s = mmio::Seed::new(&[4], version_1, false, &[1, 2, 3]);
    s.handshake(version_1 | 1 << 3, true)
        .reg(VIRTIO_MMIO_STATUS, 0)
        .reg(VIRTIO_MMIO_STATUS, 1)
        .reg(VIRTIO_MMIO_STATUS, 1 | 4)
        .reg(VIRTIO_MMIO_STATUS, 2)
        .reg(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 5)
        .reg(VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
    mmio_seed("bad_features", &s, 0);

    // Widths, alignment, far offsets, read-only and configuration writes, absent queues.
    let mut s = mmio::Seed::new(&[8, 8, 8], 0, false, b"0123456789");
    s.read(VIRTIO_MMIO_STATUS as u16, 1)
        .read(VIRTIO_MMIO_STATUS as u16 + 2, 4)
        .read(0x0fc, 8)
        .read(0x101, 3)
        .write(VIRTIO_MMIO_STATUS as u16, 2, 1)
        .write(VIRTIO_MMIO_STATUS as u16 + 1, 4, 1)
        .write(0x104, 4, 0xdead_beef)
        .reg(VIRTIO_MMIO_MAGIC_VALUE, 0)
        .reg(VIRTIO_MMIO_QUEUE_SEL, 99)
        .read(VIRTIO_MMIO_QUEUE_NUM_MAX as u16, 4)
        .reg(VIRTIO_MMIO_QUEUE_READY, 1)
        .reg(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2)
        .read(VIRTIO_MMIO_DEVICE_FEATURES as u16, 4)
        .far(u64::MAX - 3, 4)
        .far(0x1_0000_0070, 4)
        .far(VIRTIO_MMIO_STATUS.into(), 4);
    mmio_seed("odd_access", &s, 0);

    let mut s = mmio::Seed::new(&[2], version_1, true, &[]);
    s.handshake(version_1, false)
        .queue(0, 2, 0x100, 0x200, 0x300)
        .reg(VIRTIO_MMIO_STATUS, ok | 4)
        .reg(VIRTIO_MMIO_STATUS, ok | 4 | 0x80)
        .reg(VIRTIO_MMIO_STATUS, 0);
    mmio_seed("activation_fails", &s, 0);

    mmio_seed("bad_max_size", &mmio::Seed::new(&[3, 16], 0, false, &[]), 0);
}

fn mmio_seed(name: &str, seed: &mmio::Seed, activations: usize) {
    let bytes = seed.bytes();
    assert_eq!(mmio::run(&bytes), activations, "{name}: activations");
    write("virtio_mmio", name, &bytes);
}

fn console_seeds() {
    use console::event::*;
    const RX: u8 = console::CONTROL_RX as u8;
    let port_rx = |port| console::port_rx(port) as u8;

    // The driver's handshake, then a program's streams: port 0 output, port 1 input.
    let mut s = console::Seed::new(&[false, true], 3, false);
    for _ in 0..6 {
        s.receive(RX, 0, 64);
    }
    s.control(0, DEVICE_READY, 1)
        .serve_control()
        .control(0, PORT_READY, 1)
        .control(1, PORT_READY, 1)
        .serve_control()
        .control(1, PORT_OPEN, 1)
        .serve_control()
        .receive(port_rx(1), 0, 8)
        .receive(port_rx(1), console::buffer::SPLIT, 64)
        .deliver(1, b"hello from the host")
        .transmit(port_rx(0) + 1, 0, b"hello from the guest\n")
        .transmit(port_rx(0) + 1, console::buffer::INDIRECT, b"and more\n")
        .drain(0)
        .end_input(1)
        .receive(RX, 0, 64)
        .serve_control();
    console_seed("streams", &s, 7);

    // Short, unknown and refused control messages; buffers too small for the messages.
    let mut s = console::Seed::new(&[false], 2, true);
    s.receive(RX, 0, 4)
        .receive(RX, 0, 10)
        .receive(RX, console::buffer::SPLIT, 12)
        .control_bytes(&[1, 2, 3])
        .control(7, PORT_READY, 1)
        .control(u32::MAX, PORT_OPEN, 1)
        .control(0, 0xffff, 1)
        .control(0, DEVICE_READY, 0)
        .control(0, PORT_READY, 0)
        .control(0, DEVICE_READY, 1)
        .control(0, PORT_READY, 1)
        .serve_control();
    console_seed("bogus_control", &s, 2);

    // Chains no honest driver sends on an output port: a loop, a huge length, an indirect
    // table outside memory, a head past the table.
    let mut s = console::Seed::new(&[false, false, true], 4, false);
    let tx = port_rx(2) - 1;
    s.desc(
        tx,
        10,
        Desc {
            addr: 0x3_0000,
            len: 16,
            flags: VRING_DESC_F_NEXT,
            next: 10,
        },
    )
    .publish(tx, 10)
    .desc(
        tx,
        11,
        Desc {
            addr: 0x3_0000,
            len: 0xffff_ffff,
            flags: 0,
            next: 0,
        },
    )
    .publish(tx, 11)
    .desc(
        tx,
        12,
        Desc {
            addr: 0xffff_0000,
            len: 32,
            flags: VRING_DESC_F_INDIRECT,
            next: 0,
        },
    )
    .publish(tx, 12)
    .publish(tx, 999)
    .transmit(tx, 0, b"still served\n")
    .drain(1)
    .deliver(2, b"not open yet")
    .publish(RX, 5)
    .serve_control();
    console_seed("odd_chains", &s, 0);

    // Queues whose driver claims more chains than they hold: each is given up (the
    // output and input passes used to spin on them, the control pass to hold messages).
    let mut s = console::Seed::new(&[false, true], 3, false);
    for _ in 0..4 {
        s.receive(RX, 0, 64);
    }
    s.control(0, DEVICE_READY, 1)
        .control(1, PORT_READY, 1)
        .control(1, PORT_OPEN, 1)
        .serve_control()
        .transmit(port_rx(0) + 1, 0, b"lost")
        .avail_idx(port_rx(0) + 1, 1000)
        .drain(0)
        .receive(port_rx(1), 0, 64)
        .avail_idx(port_rx(1), 1000)
        .deliver(1, b"lost too")
        .receive(RX, 0, 64)
        .avail_idx(RX, 1000)
        .end_input(1)
        .serve_control();
    console_seed("overfull", &s, 4);
}

fn console_seed(name: &str, seed: &console::Seed, messages: usize) {
    let bytes = seed.bytes();
    let sent = console::run(&bytes);
    println!("  {} messages: {sent:?}", sent.len());
    assert_eq!(sent.len(), messages, "{name}: the device sent {sent:?}");
    write("console_queues", name, &bytes);
}
