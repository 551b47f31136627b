//! The device's two directions against a real socket pair, with queues in guest memory
//! laid out as a driver would (virtio-queue's mock), including what a broken or hostile
//! driver hands over.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::Queue;
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::active::{ActiveNet, PassError};
use super::*;
use crate::virtio::Interrupt;

const RX_RING: u64 = 0;
const TX_RING: u64 = 0x1_0000;
/// Buffers start here, 128 KiB apart.
const BUFFERS: u64 = 0x10_0000;
const BUFFER_SPACING: u64 = 0x2_0000;

struct Rig {
    memory: GuestMemoryMmap,
    rx: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: MockSplitQueue<'static, GuestMemoryMmap>,
    rx_posted: u16,
    tx_posted: u16,
    net: ActiveNet,
    peer: UnixStream,
    interrupt: Arc<Interrupt>,
    status: Arc<AtomicU16>,
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

impl Rig {
    fn new() -> Self {
        // Leaked so the mock queues can borrow it for the test's life.
        let memory: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap(),
        ));
        let rx = MockSplitQueue::create(memory, GuestAddress(RX_RING), 16);
        let tx = MockSplitQueue::create(memory, GuestAddress(TX_RING), 16);
        let (ours, peer) = UnixStream::pair().unwrap();
        let backend = Arc::new(Mutex::new(Backend::stream(OwnedFd::from(ours)).unwrap()));
        let interrupt = Arc::new(Interrupt::new(eventfd()));
        let status = Arc::new(AtomicU16::new(LINK_UP));
        let net = ActiveNet::new(
            memory.clone(),
            interrupt.clone(),
            (rx.create_queue::<Queue>().unwrap(), eventfd()),
            (tx.create_queue::<Queue>().unwrap(), eventfd()),
            backend,
            status.clone(),
            eventfd(),
        )
        .unwrap();
        Self {
            memory: memory.clone(),
            rx,
            tx,
            rx_posted: 0,
            tx_posted: 0,
            net,
            peer,
            interrupt,
            status,
        }
    }

    /// Posts a chain of `descs` (address, length, device-writable) on `queue`.
    fn post(&mut self, tx: bool, descs: &[(u64, u32, bool)]) {
        let (mock, posted) = if tx {
            (&self.tx, &mut self.tx_posted)
        } else {
            (&self.rx, &mut self.rx_posted)
        };
        // Each chain gets its own four table slots.
        let first = (*posted * 4) % 16;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
            }
            let desc = Descriptor::new(addr, len, flags, index + 1);
            mock.desc_table()
                .store(index, RawDescriptor::from(desc))
                .unwrap();
        }
        mock.avail()
            .ring()
            .ref_at(usize::from(*posted % 16))
            .unwrap()
            .store(first);
        *posted += 1;
        mock.avail().idx().store(*posted);
    }

    /// Posts a transmit chain: the header and `frame`, in one descriptor at buffer `n`.
    fn post_frame(&mut self, n: u64, frame: &[u8]) {
        let addr = BUFFERS + n * BUFFER_SPACING;
        let mut bytes = vec![0u8; VIRTIO_NET_HDR_LEN];
        bytes.extend_from_slice(frame);
        self.memory.write_slice(&bytes, GuestAddress(addr)).unwrap();
        self.post(true, &[(addr, bytes.len() as u32, false)]);
    }

    /// The used entry `i` of a queue: (head, length).
    fn used(&self, tx: bool, i: u16) -> (u32, u32) {
        let mock = if tx { &self.tx } else { &self.rx };
        let elem = mock.used().ring().ref_at(usize::from(i)).unwrap().load();
        (elem.id(), elem.len())
    }

    fn used_count(&self, tx: bool) -> u16 {
        if tx {
            self.tx.used().idx().load()
        } else {
            self.rx.used().idx().load()
        }
    }
}

fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut frame = vec![fill; len];
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    frame
}

#[test]
fn guest_frames_go_out_length_prefixed_without_the_header() {
    let mut rig = Rig::new();
    rig.post_frame(0, &frame(60, 1));
    rig.post_frame(1, &frame(9000, 2));
    rig.net.transmit().unwrap();
    assert_eq!(rig.used_count(true), 2);
    for (len, fill) in [(60usize, 1u8), (9000, 2)] {
        let mut prefix = [0u8; 4];
        rig.peer.read_exact(&mut prefix).unwrap();
        assert_eq!(u32::from_be_bytes(prefix) as usize, len);
        let mut got = vec![0u8; len];
        rig.peer.read_exact(&mut got).unwrap();
        assert_eq!(got, frame(len, fill));
    }
}

#[test]
fn host_frames_land_in_receive_buffers_after_a_header() {
    let mut rig = Rig::new();
    // A receive buffer in two pieces: the header and part of the frame, then the rest.
    let a = BUFFERS;
    let b = BUFFERS + BUFFER_SPACING;
    rig.post(false, &[(a, 100, true), (b, 65_536, true)]);
    let sent = frame(1500, 7);
    rig.peer.write_all(&1500u32.to_be_bytes()).unwrap();
    rig.peer.write_all(&sent).unwrap();
    rig.net.receive().unwrap();
    assert_eq!(rig.used_count(false), 1);
    assert_eq!(rig.used(false, 0), (0, (VIRTIO_NET_HDR_LEN + 1500) as u32));
    let mut header = [0u8; VIRTIO_NET_HDR_LEN];
    rig.memory.read_slice(&mut header, GuestAddress(a)).unwrap();
    assert_eq!(&header[..10], &[0; 10]);
    assert_eq!(
        u16::from_le_bytes([header[10], header[11]]),
        1,
        "num_buffers"
    );
    let mut got = vec![0u8; 1500];
    let first = 100 - VIRTIO_NET_HDR_LEN;
    rig.memory
        .read_slice(
            &mut got[..first],
            GuestAddress(a + VIRTIO_NET_HDR_LEN as u64),
        )
        .unwrap();
    rig.memory
        .read_slice(&mut got[first..], GuestAddress(b))
        .unwrap();
    assert_eq!(got, sent);
    assert_ne!(rig.interrupt.status(), 0, "the driver is told");
}

#[test]
fn without_receive_buffers_a_frame_waits_and_nothing_more_is_read() {
    let mut rig = Rig::new();
    for fill in [1u8, 2] {
        rig.peer.write_all(&100u32.to_be_bytes()).unwrap();
        rig.peer.write_all(&frame(100, fill)).unwrap();
    }
    rig.net.receive().unwrap();
    assert_eq!(rig.used_count(false), 0);
    for n in 0..2 {
        rig.post(false, &[(BUFFERS + n * BUFFER_SPACING, 4096, true)]);
    }
    rig.net.receive().unwrap();
    assert_eq!(rig.used_count(false), 2, "both frames, in order");
    let mut got = [0u8; 1];
    for (n, fill) in [(0u64, 1u8), (1, 2)] {
        rig.memory
            .read_slice(
                &mut got,
                GuestAddress(BUFFERS + n * BUFFER_SPACING + VIRTIO_NET_HDR_LEN as u64),
            )
            .unwrap();
        assert_eq!(got[0], fill);
    }
}

#[test]
fn a_receive_buffer_too_small_drops_its_frame_only() {
    let mut rig = Rig::new();
    rig.post(false, &[(BUFFERS, 64, true)]);
    rig.post(false, &[(BUFFERS + BUFFER_SPACING, 4096, true)]);
    for len in [1000usize, 200] {
        rig.peer.write_all(&(len as u32).to_be_bytes()).unwrap();
        rig.peer.write_all(&frame(len, 3)).unwrap();
    }
    rig.net.receive().unwrap();
    assert_eq!(
        rig.used(false, 0),
        (0, 0),
        "the small buffer comes back empty"
    );
    assert_eq!(rig.used(false, 1).1, (VIRTIO_NET_HDR_LEN + 200) as u32);
}

#[test]
fn malformed_transmit_buffers_are_returned_and_dropped() {
    let mut rig = Rig::new();
    // A header alone, a chain into memory that does not exist, a writable-only chain.
    rig.post(true, &[(BUFFERS, VIRTIO_NET_HDR_LEN as u32, false)]);
    rig.post(true, &[(1 << 40, 1000, false)]);
    rig.post(true, &[(BUFFERS, 1000, true)]);
    rig.post_frame(3, &frame(64, 9));
    rig.net.transmit().unwrap();
    assert_eq!(rig.used_count(true), 4);
    let mut prefix = [0u8; 4];
    rig.peer.read_exact(&mut prefix).unwrap();
    assert_eq!(
        u32::from_be_bytes(prefix),
        64,
        "only the good frame went out"
    );
}

#[test]
fn a_guest_that_floods_holds_itself_back() {
    let mut rig = Rig::new();
    let big = frame(60_000, 5);
    // More than a socket buffer holds (virtio-queue's mock ring takes at most 8 chains
    // before its used ring overlaps the available one), and the peer reads nothing.
    const FRAMES: u16 = 8;
    for _ in 0..FRAMES {
        let n = u64::from(rig.tx_posted);
        rig.post_frame(n, &big);
    }
    rig.net.transmit().unwrap();
    let taken = rig.used_count(true);
    assert!(
        taken < FRAMES,
        "buffers are taken only while the backend takes frames ({taken} of {FRAMES})"
    );
    // The peer reads; the rest goes out as room appears.
    let mut peer = rig.peer.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = vec![0u8; usize::from(FRAMES) * (4 + 60_000)];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut got = 0;
        while got < all.len() {
            match peer.read(&mut all[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(_) => break,
            }
        }
        assert_eq!(got, all.len(), "every frame went out");
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while rig.used_count(true) < FRAMES || rig.net.has_pending_write_for_test() {
        assert!(std::time::Instant::now() < deadline, "transmit stalled");
        rig.net.transmit().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    reader.join().unwrap();
}

#[test]
fn a_backend_that_goes_away_takes_the_link_down() {
    let mut rig = Rig::new();
    drop(std::mem::replace(
        &mut rig.peer,
        UnixStream::pair().unwrap().0,
    ));
    let error = rig.net.receive().unwrap_err();
    assert!(matches!(error, PassError::Backend(BackendError::Closed)));
    rig.net.pass_failed(error);
    assert_eq!(rig.status.load(Ordering::SeqCst), LINK_DOWN);
    assert_ne!(rig.interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
    // What the guest sends now is taken and dropped.
    rig.post_frame(0, &frame(64, 1));
    rig.net.transmit().unwrap();
    assert_eq!(rig.used_count(true), 1);
}

#[test]
fn the_configuration_space_has_mac_status_and_mtu() {
    let (ours, _peer) = UnixStream::pair().unwrap();
    let net = VirtioNet::new(
        Backend::stream(OwnedFd::from(ours)).unwrap(),
        DEFAULT_MAC,
        MAX_MTU,
    )
    .unwrap();
    let mut config = [0u8; 12];
    net.read_config(0, &mut config);
    assert_eq!(&config[..6], &DEFAULT_MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), LINK_UP);
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), MAX_MTU);
    let mut tail = [0xffu8; 4];
    net.read_config(10, &mut tail);
    assert_eq!(tail, [0xf0, 0xff, 0, 0]);
    assert!(
        VirtioNet::new(
            Backend::stream(OwnedFd::from(UnixStream::pair().unwrap().0)).unwrap(),
            DEFAULT_MAC,
            MAX_MTU + 1
        )
        .is_err()
    );
}
