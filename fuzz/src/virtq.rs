//! Split virtqueues (virtio 1.2, 2.7) written into guest memory the way a driver writes
//! them, and a check of what a device's pass over them changed.
//!
//! The driver side here is deliberately plain (raw descriptors, rings as bytes); the
//! device side is the product's code. What a chain is made of is read back through
//! virtio-queue, the library the devices themselves walk chains with, so the checks see the
//! chains as the devices did.

use std::cell::RefCell;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::Cursor;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;
const DESC_SIZE: u64 = 16;

/// Small, so a fuzz run touches all of it and a snapshot of it is cheap.
pub const MEM_SIZE: u64 = 1 << 20;

thread_local! {
    /// One mapping for every run, zeroed at the start of each: mapping and faulting in a
    /// fresh one per run took most of the time.
    static MEMORY: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
            .expect("a 1 MiB guest memory");
    /// Snapshot buffers, for the same reason.
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// The guest memory, all zeros. Only one run may use it at a time (runs are sequential:
/// a run drops every clone it made before it returns).
pub fn memory() -> GuestMemoryMmap {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    MEMORY.with(|mem| {
        for addr in (0..MEM_SIZE).step_by(ZEROS.len()) {
            store(mem, addr, &ZEROS);
        }
        mem.clone()
    })
}

/// `[start, end)` in guest-physical addresses.
pub type Range = (u64, u64);

fn range(addr: u64, len: u64) -> Range {
    (addr, addr.saturating_add(len))
}

fn store(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    // The harness only writes where it laid things out, inside memory.
    mem.write_slice(bytes, GuestAddress(addr))
        .expect("queue structures are inside guest memory");
}

fn load<const N: usize>(mem: &GuestMemoryMmap, addr: u64) -> [u8; N] {
    let mut bytes = [0u8; N];
    mem.read_slice(&mut bytes, GuestAddress(addr))
        .expect("queue structures are inside guest memory");
    bytes
}

/// The driver's view of one queue: where its parts are, and what it has offered so far.
pub struct DriverQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    next_avail: u16,
    next_desc: u16,
}

impl DriverQueue {
    /// A queue of `size` entries laid out from `base` (16-byte aligned): descriptor table,
    /// available ring, used ring.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + DESC_SIZE * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        let queue = Self {
            desc,
            avail,
            used,
            size,
            next_avail: 0,
            next_desc: 0,
        };
        store(mem, base, &vec![0; (queue.end() - base) as usize]);
        queue
    }

    fn end(&self) -> u64 {
        self.used + 6 + 8 * u64::from(self.size)
    }

    /// The device's side of this queue, set up as a transport does before activation.
    pub fn device_queue(&self, mem: &GuestMemoryMmap, max_size: u16, event_idx: bool) -> Queue {
        let mut queue = Queue::new(max_size).expect("a valid maximum queue size");
        queue.set_size(self.size);
        let halves = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = halves(self.desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = halves(self.avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = halves(self.used);
        queue.set_used_ring_address(lo, hi);
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        assert!(queue.is_valid(mem), "the harness laid out an invalid queue");
        queue
    }

    /// The descriptor table, the available ring and the used ring.
    pub fn structures(&self) -> [Range; 3] {
        [
            range(self.desc, DESC_SIZE * u64::from(self.size)),
            range(self.avail, 6 + 2 * u64::from(self.size)),
            self.used_ring(),
        ]
    }

    /// What the device may write of this queue itself.
    pub fn used_ring(&self) -> Range {
        range(self.used, 6 + 8 * u64::from(self.size))
    }

    /// Writes descriptor `index` (taken modulo the queue size: the table is all there is).
    pub fn set_desc(&self, mem: &GuestMemoryMmap, index: u16, desc: Desc) {
        let at = self.desc + DESC_SIZE * u64::from(index % self.size);
        write_desc(mem, at, desc);
    }

    /// Offers `head` in the next slot of the available ring.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        store(mem, self.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.next_avail = self.next_avail.wrapping_add(1);
        store(mem, self.avail + 2, &self.next_avail.to_le_bytes());
    }

    /// Moves the available index without filling slots: a driver that lies about how many
    /// chains it offers.
    pub fn set_avail_idx(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.next_avail = idx;
        store(mem, self.avail + 2, &idx.to_le_bytes());
    }

    /// The available ring's flags and `used_event` (used with VIRTIO_F_EVENT_IDX).
    pub fn set_notification_fields(&self, mem: &GuestMemoryMmap, flags: u16, used_event: u16) {
        store(mem, self.avail, &flags.to_le_bytes());
        store(
            mem,
            self.avail + 4 + 2 * u64::from(self.size),
            &used_event.to_le_bytes(),
        );
    }

    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le_bytes(load(mem, self.avail + 2))
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le_bytes(load(mem, self.used + 2))
    }

    /// The used ring's entries from index `from` to its index now, as (id, len).
    pub fn used_since(&self, mem: &GuestMemoryMmap, from: u16) -> Vec<(u32, u32)> {
        let count = self.used_idx(mem).wrapping_sub(from);
        (0..count)
            .map(|i| {
                let slot = u64::from(from.wrapping_add(i) % self.size);
                let elem: [u8; 8] = load(mem, self.used + 4 + 8 * slot);
                (
                    u32::from_le_bytes(elem[..4].try_into().expect("4 bytes")),
                    u32::from_le_bytes(elem[4..].try_into().expect("4 bytes")),
                )
            })
            .collect()
    }

    /// Puts `descs` in the table as one chain (from where the last one ended, wrapping) and
    /// offers it. A chain longer than the queue is cut to the queue size.
    pub fn offer(&mut self, mem: &GuestMemoryMmap, descs: &[Buffer]) {
        let descs = &descs[..descs.len().min(self.size as usize)];
        if descs.is_empty() {
            return;
        }
        let head = self.next_desc % self.size;
        for (i, buffer) in descs.iter().enumerate() {
            let index = (head as usize + i) as u16 % self.size;
            let last = i + 1 == descs.len();
            self.set_desc(
                mem,
                index,
                buffer.desc(last, index.wrapping_add(1) % self.size),
            );
        }
        self.next_desc = (head as usize + descs.len()) as u16 % self.size;
        self.publish(mem, head);
    }

    /// Offers `descs` as one chain through an indirect table at `table`.
    pub fn offer_indirect(&mut self, mem: &GuestMemoryMmap, table: u64, descs: &[Buffer]) {
        let descs = &descs[..descs.len().min(u16::MAX as usize)];
        if descs.is_empty() {
            return;
        }
        for (i, buffer) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let at = table + DESC_SIZE * i as u64;
            if at + DESC_SIZE > MEM_SIZE {
                break;
            }
            write_desc(mem, at, buffer.desc(last, i as u16 + 1));
        }
        let head = self.next_desc % self.size;
        self.set_desc(
            mem,
            head,
            Desc {
                addr: table,
                len: (DESC_SIZE * descs.len() as u64) as u32,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            },
        );
        self.next_desc = head.wrapping_add(1) % self.size;
        self.publish(mem, head);
    }

    /// Where every indirect table in the descriptor table points.
    fn indirect_tables(&self, mem: &GuestMemoryMmap) -> Vec<Range> {
        (0..self.size)
            .filter_map(|i| {
                let raw: [u8; 16] = load(mem, self.desc + DESC_SIZE * u64::from(i));
                let flags = u16::from_le_bytes([raw[12], raw[13]]);
                (flags & VRING_DESC_F_INDIRECT != 0).then(|| {
                    range(
                        u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")),
                        u64::from(u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"))),
                    )
                })
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

fn write_desc(mem: &GuestMemoryMmap, at: u64, desc: Desc) {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&desc.addr.to_le_bytes());
    raw[8..12].copy_from_slice(&desc.len.to_le_bytes());
    raw[12..14].copy_from_slice(&desc.flags.to_le_bytes());
    raw[14..].copy_from_slice(&desc.next.to_le_bytes());
    store(mem, at, &raw);
}

/// One buffer of a well-formed chain.
#[derive(Clone, Copy, Debug)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Buffer {
    fn desc(&self, last: bool, next: u16) -> Desc {
        let mut flags = if self.write { VRING_DESC_F_WRITE } else { 0 };
        if !last {
            flags |= VRING_DESC_F_NEXT;
        }
        Desc {
            addr: self.addr,
            len: self.len,
            flags,
            next: if last { 0 } else { next },
        }
    }
}

/// Hands out buffer space from `[start, end)`, starting over at `start` when it runs out
/// (later buffers then overlap earlier ones, which the checks notice).
pub struct Alloc {
    start: u64,
    end: u64,
    next: u64,
}

impl Alloc {
    pub fn new(start: u64, end: u64) -> Self {
        Self {
            start,
            end,
            next: start,
        }
    }

    pub fn take(&mut self, len: u64) -> u64 {
        let len = len.next_multiple_of(8);
        if self.next.saturating_add(len) > self.end {
            self.next = self.start;
        }
        let addr = self.next;
        self.next = self.next.saturating_add(len).min(self.end);
        addr
    }
}

/// A chain as the device sees it when it pops it.
#[derive(Clone, Debug)]
pub struct ChainView {
    pub head: u16,
    pub readable: Vec<(u64, u32)>,
    pub writable: Vec<(u64, u32)>,
}

impl ChainView {
    /// Bytes the device may write into this chain.
    pub fn capacity(&self) -> u64 {
        self.writable.iter().map(|(_, len)| u64::from(*len)).sum()
    }
}

/// The first `limit` bytes of `buffers`, in order; `None` when one is outside memory.
pub fn gather(mem: &GuestMemoryMmap, buffers: &[(u64, u32)], limit: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for &(addr, len) in buffers {
        if out.len() >= limit {
            break;
        }
        let n = (len as usize).min(limit - out.len());
        let start = out.len();
        out.resize(start + n, 0);
        mem.read_slice(&mut out[start..], GuestAddress(addr)).ok()?;
    }
    Some(out)
}

/// The chains `queue` would pop now, in order, read through a copy of it.
pub fn available_chains(queue: &Queue, mem: &GuestMemoryMmap) -> Vec<ChainView> {
    let Ok(mut shadow) = Queue::try_from(queue.state()) else {
        return Vec::new();
    };
    let mut chains = Vec::new();
    while let Some(chain) = shadow.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        for desc in chain {
            let buffer = (desc.addr().0, desc.len());
            if desc.is_write_only() {
                writable.push(buffer);
            } else {
                readable.push(buffer);
            }
        }
        chains.push(ChainView {
            head,
            readable,
            writable,
        });
    }
    chains
}

/// Watches one pass of a device over some queues of a memory.
///
/// The pass is *plain* when nothing the device may write (writable buffers, the used
/// rings of the queues it serves) overlaps anything else it reads or writes (queue
/// structures, indirect tables, readable buffers, other writable buffers). Then the chains cannot change under the device, and exact checks hold: the
/// device wrote nothing outside the writable buffers of the chains offered and the used
/// rings of the queues served. A pass that is not plain (a guest that points a reply into
/// its own descriptor table, say) is only checked for not crashing.
pub struct Watch {
    before: Option<Vec<u8>>,
    allowed: Vec<Range>,
}

impl Watch {
    /// `all`: every queue in the memory; `served`: the queues the pass may use, with the
    /// chains available on each.
    pub fn new(
        mem: &GuestMemoryMmap,
        all: &[&DriverQueue],
        served: &[(&DriverQueue, &[ChainView])],
    ) -> Self {
        // (start, end, written by the device)
        let mut ranges: Vec<(u64, u64, bool)> = Vec::new();
        for queue in all {
            let serving = served.iter().any(|(q, _)| q.used == queue.used);
            for (start, end) in queue
                .structures()
                .into_iter()
                .chain(queue.indirect_tables(mem))
            {
                // A served queue's used ring is written by the device, like a buffer.
                ranges.push((start, end, serving && (start, end) == queue.used_ring()));
            }
        }
        let mut allowed = Vec::new();
        for (queue, chains) in served {
            allowed.push(queue.used_ring());
            let mut seen_heads = Vec::new();
            for chain in chains.iter() {
                for &(addr, len) in &chain.readable {
                    let (start, end) = range(addr, u64::from(len));
                    ranges.push((start, end, false));
                }
                // The same head offered twice is the same chain: its buffers are one.
                if seen_heads.contains(&chain.head) {
                    continue;
                }
                seen_heads.push(chain.head);
                for &(addr, len) in &chain.writable {
                    let (start, end) = range(addr, u64::from(len));
                    ranges.push((start, end, true));
                    allowed.push((start, end));
                }
            }
        }
        ranges.retain(|(start, end, _)| start < end);
        ranges.sort_unstable();
        let (mut end_any, mut end_writable) = (0u64, 0u64);
        let mut plain = true;
        for &(start, end, writable) in &ranges {
            if (writable && start < end_any) || start < end_writable {
                plain = false;
                break;
            }
            end_any = end_any.max(end);
            if writable {
                end_writable = end_writable.max(end);
            }
        }
        Self {
            before: plain.then(|| snapshot(mem)),
            allowed,
        }
    }

    pub fn plain(&self) -> bool {
        self.before.is_some()
    }

    /// After the pass: every byte that changed is in a writable buffer or a used ring.
    pub fn check(&self, mem: &GuestMemoryMmap) {
        let Some(before) = &self.before else {
            return;
        };
        const CHUNK: usize = 4096;
        let mut b = [0u8; CHUNK];
        for (chunk, a) in before.chunks(CHUNK).enumerate() {
            mem.read_slice(&mut b, GuestAddress((chunk * CHUNK) as u64))
                .expect("the whole memory reads");
            if a == b {
                continue;
            }
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                let addr = (chunk * CHUNK + i) as u64;
                assert!(
                    x == y
                        || self
                            .allowed
                            .iter()
                            .any(|(start, end)| (*start..*end).contains(&addr)),
                    "the device wrote {addr:#x}, outside every buffer it was given"
                );
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(buffer) = self.before.take() {
            SPARE.with(|spare| spare.borrow_mut().push(buffer));
        }
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; MEM_SIZE as usize]);
    mem.read_slice(&mut bytes, GuestAddress(0))
        .expect("the whole memory reads");
    bytes
}

/// `index:u16 addr:u64 len:u32 flags:u16 next:u16`
pub fn read_desc(input: &mut Cursor) -> Option<(u16, Desc)> {
    Some((
        input.u16()?,
        Desc {
            addr: input.u64()?,
            len: input.u32()?,
            flags: input.u16()?,
            next: input.u16()?,
        },
    ))
}

/// `addr:u32 len:u8 bytes[len]`: guest memory written anywhere (cut at its end).
pub fn poke(input: &mut Cursor, mem: &GuestMemoryMmap) -> Option<()> {
    let addr = u64::from(input.u32()?) % MEM_SIZE;
    let len = input.u8()?;
    let bytes = input.up_to(len.into());
    let fits = bytes.len().min((MEM_SIZE - addr) as usize);
    mem.write_slice(&bytes[..fits], GuestAddress(addr)).ok()
}
