//! `console_queues`: virtio-console with MULTIPORT, its control queues and port queues in
//! a guest memory built from the input, driven one device-thread pass at a time on this
//! thread (see `tvix_boot_devices::virtio::console::fuzzing` for why not on the device's
//! own threads).
//!
//! Input: two config bytes, then operations until the input ends; a last control pass and
//! output drain follow.
//!
//! - config: ports:u8 (1 + (n & 3) % 3 ports; bit 2 + i set: port i is an input, else an
//!   output), queue:u8 (size 2 << (n % 8); [`config::EVENT_IDX`]).
//! - [`op::CONTROL`] len:u8 bytes[len]: a control message from the driver (any bytes) on the
//!   control transmit queue.
//! - [`op::RECEIVE`] queue:u8 flags:u8 size:u16: an empty buffer on any queue.
//! - [`op::TRANSMIT`] queue:u8 flags:u8 len:u16 bytes[len]: a full buffer on any queue.
//! - [`op::DESC`] queue:u8 index:u16 addr:u64 len:u32 flags:u16 next:u16: any descriptor.
//! - [`op::PUBLISH`] queue:u8 head:u16; [`op::AVAIL_IDX`] queue:u8 delta:u16;
//!   [`op::NOTIFY`] queue:u8 flags:u16 used_event:u16; [`op::POKE`] addr:u32 len:u8
//!   bytes[len]: as in `virtiofs_request`.
//! - [`op::SERVE_CONTROL`]: the event loop's pass over the control queues.
//! - [`op::DRAIN`] port:u8: the event loop's pass over an output port.
//! - [`op::DELIVER`] port:u8 len:u16 bytes[len]: the event loop read these bytes from
//!   its host end.
//! - [`op::END_INPUT`] port:u8: an input port's host end reached end of file.
//!
//! Flags of RECEIVE and TRANSMIT: [`buffer::INDIRECT`], [`buffer::SPLIT`].

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use tvix_boot_devices::event_loop::EventLoop;
use tvix_boot_devices::virtio::console::fuzzing::ConsoleQueues;
use tvix_boot_devices::virtio::console::{PortEnd, PortSpec, VirtioConsole};
use tvix_boot_devices::virtio::{Activation, Interrupt, VIRTIO_F_VERSION_1};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::input::{Cursor, Encoder};
use crate::virtq::{
    Alloc, Buffer, ChainView, Desc, DriverQueue, MEM_SIZE, Watch, available_chains, gather, poke,
    read_desc,
};

pub mod config {
    pub const EVENT_IDX: u8 = 0x10;
}

pub mod op {
    pub const CONTROL: u8 = 0;
    pub const RECEIVE: u8 = 1;
    pub const TRANSMIT: u8 = 2;
    pub const DESC: u8 = 3;
    pub const PUBLISH: u8 = 4;
    pub const AVAIL_IDX: u8 = 5;
    pub const POKE: u8 = 6;
    pub const SERVE_CONTROL: u8 = 7;
    pub const DRAIN: u8 = 8;
    pub const DELIVER: u8 = 9;
    pub const END_INPUT: u8 = 10;
    pub const NOTIFY: u8 = 11;
    pub(super) const COUNT: u8 = 12;
}

pub mod buffer {
    pub const INDIRECT: u8 = 1;
    pub const SPLIT: u8 = 2;
}

/// Control events (virtio 1.2, 5.3.6.2).
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const PORT_READY: u16 = 3;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

pub const CONTROL_RX: usize = 2;
pub const CONTROL_TX: usize = 3;
const DEVICE_QUEUE_SIZE: u16 = 256;
const CONTROL_LEN: usize = 8;
/// The device takes at most this much of one buffer.
const MAX_CHAIN_BYTES: usize = 1 << 20;
const QUEUE_BASE: u64 = 0x1000;
const QUEUE_STRIDE: u64 = 0x2000;
const DATA_START: u64 = 0x2_0000;

/// The receive queue of `port`; its transmit queue follows.
pub fn port_rx(port: usize) -> usize {
    if port == 0 { 0 } else { 2 + 2 * port }
}

pub fn port_name(port: usize) -> String {
    format!("port{port}")
}

/// What the driver told the device, as far as the harness can follow it.
#[derive(Default)]
struct Driver {
    device_ready: bool,
    port_ready: Vec<bool>,
    guest_open: Vec<bool>,
}

struct Port {
    input: bool,
    /// An output's host end, and what must be in it.
    output: Option<(File, Vec<u8>)>,
    /// The port's thread would have stopped: its queue broke.
    broken: bool,
}

struct Harness {
    mem: GuestMemoryMmap,
    queues: Vec<DriverQueue>,
    device: ConsoleQueues,
    ports: Vec<Port>,
    alloc: Alloc,
    driver: Driver,
    /// Every pass so far was plain (see [`Watch`]), so the harness knows what the driver
    /// said and what the outputs must hold.
    exact: bool,
    control_broken: bool,
    /// Control messages the device sent, as (id, event, value, payload).
    sent: Vec<Message>,
}

pub type Message = (u32, u16, u16, Vec<u8>);

/// A queue as it was before a pass.
struct Before {
    queue: usize,
    chains: Vec<ChainView>,
    next_avail: u16,
    /// The device's used index: where the entries a pass adds start. The used index in
    /// memory may say anything before the pass (the driver can write the ring too).
    used: u16,
}

/// Runs one input; returns the control messages the device sent (for the seeds' check).
pub fn run(data: &[u8]) -> Vec<Message> {
    let mut input = Cursor::new(data);
    let ports = input.u8().unwrap_or(0);
    let queue = input.u8().unwrap_or(3);
    let mut h = Harness::new(ports, queue);
    while let Some(op) = input.u8() {
        if h.step(op, &mut input).is_none() {
            break;
        }
    }
    h.serve_control();
    for port in 0..h.ports.len() {
        h.drain(port);
    }
    h.sent
}

fn memfd() -> File {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"console-output".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created, and nothing else owns it.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether used entry `i`'s buffers were filled again by a later entry of the same head.
fn overwritten(used: &[(u32, ChainView)], i: usize) -> bool {
    used[i + 1..].iter().any(|(_, c)| c.head == used[i].1.head)
}

fn decode(header: &[u8]) -> (u32, u16, u16) {
    (
        u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")),
        u16::from_le_bytes(header[4..6].try_into().expect("2 bytes")),
        u16::from_le_bytes(header[6..8].try_into().expect("2 bytes")),
    )
}

impl Harness {
    fn new(ports: u8, queue: u8) -> Self {
        let count = 1 + usize::from(ports & 3) % 3;
        let size = 2u16 << (queue % 8);
        let event_idx = queue & config::EVENT_IDX != 0;
        let mem = crate::virtq::memory();
        let mut specs = Vec::new();
        let mut port_state = Vec::new();
        for port in 0..count {
            let input = ports & (4 << port) != 0;
            let (end, output) = if input {
                let null = File::open("/dev/null").expect("/dev/null");
                (PortEnd::Input(null.into()), None)
            } else {
                let file = memfd();
                let ours = file.try_clone().expect("dup");
                (PortEnd::Output(file.into()), Some((ours, Vec::new())))
            };
            specs.push(PortSpec::new(&port_name(port), end).expect("a good name"));
            port_state.push(Port {
                input,
                output,
                broken: false,
            });
        }
        let mut console = VirtioConsole::new(specs).expect("ports");
        let queues: Vec<DriverQueue> = (0..2 + 2 * count)
            .map(|q| DriverQueue::new(&mem, QUEUE_BASE + QUEUE_STRIDE * q as u64, size))
            .collect();
        let activation = Activation {
            memory: mem.clone(),
            features: VIRTIO_F_VERSION_1 | 1 << 1,
            queues: queues
                .iter()
                .map(|q| {
                    (
                        q.device_queue(&mem, DEVICE_QUEUE_SIZE, event_idx),
                        EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
                    )
                })
                .collect(),
            interrupt: Arc::new(Interrupt::new(
                EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
            )),
            // Nothing is handed to it: the passes run on this thread.
            event_loop: EventLoop::new().expect("an event loop").handle(),
        };
        let device = ConsoleQueues::new(&mut console, activation).expect("activation");
        Self {
            mem,
            queues,
            device,
            ports: port_state,
            alloc: Alloc::new(DATA_START, MEM_SIZE),
            driver: Driver {
                port_ready: vec![false; count],
                guest_open: vec![false; count],
                ..Driver::default()
            },
            exact: true,
            control_broken: false,
            sent: Vec::new(),
        }
    }

    fn step(&mut self, op: u8, input: &mut Cursor) -> Option<()> {
        let mem = &self.mem;
        let queue = |byte: u8| usize::from(byte) % self.queues.len();
        let port = |byte: u8| usize::from(byte) % self.ports.len();
        match op % op::COUNT {
            op::CONTROL => {
                let len = input.u8()?;
                let message = input.up_to(len.into()).to_vec();
                self.offer(CONTROL_TX, 0, &message, 0);
            }
            op::RECEIVE => {
                let (q, flags, size) = (queue(input.u8()?), input.u8()?, input.u16()?);
                self.offer(q, flags, &[], size.into());
            }
            op::TRANSMIT => {
                let (q, flags, len) = (queue(input.u8()?), input.u8()?, input.u16()?);
                let bytes = input.up_to(len.into()).to_vec();
                self.offer(q, flags, &bytes, 0);
            }
            op::DESC => {
                let q = queue(input.u8()?);
                let (index, desc) = read_desc(input)?;
                self.queues[q].set_desc(mem, index, desc);
            }
            op::PUBLISH => {
                let (q, head) = (queue(input.u8()?), input.u16()?);
                self.queues[q].publish(mem, head);
            }
            op::AVAIL_IDX => {
                let (q, delta) = (queue(input.u8()?), input.u16()?);
                let idx = self.queues[q].avail_idx(mem).wrapping_add(delta);
                self.queues[q].set_avail_idx(mem, idx);
            }
            op::NOTIFY => {
                let q = queue(input.u8()?);
                let (flags, used_event) = (input.u16()?, input.u16()?);
                self.queues[q].set_notification_fields(mem, flags, used_event);
            }
            op::POKE => poke(input, mem)?,
            op::SERVE_CONTROL => self.serve_control(),
            op::DRAIN => {
                let p = port(input.u8()?);
                self.drain(p);
            }
            op::DELIVER => {
                let p = port(input.u8()?);
                let len = input.u16()?;
                let data = input.up_to(len.into()).to_vec();
                self.deliver(p, &data);
            }
            _ => {
                let p = port(input.u8()?);
                self.device.end_input(p);
            }
        }
        Some(())
    }

    /// A well-formed chain on `queue`: `data` in readable buffers (an empty one when there
    /// is neither data nor room), then `room` bytes of writable ones.
    fn offer(&mut self, queue: usize, flags: u8, data: &[u8], room: u32) {
        let mut buffers = Vec::new();
        let mut place = |len: u32, write: bool, alloc: &mut Alloc| {
            let start = alloc.take(len.into());
            if flags & buffer::SPLIT != 0 && len >= 2 {
                buffers.push(Buffer {
                    addr: start,
                    len: len / 2,
                    write,
                });
                buffers.push(Buffer {
                    addr: start + u64::from(len / 2),
                    len: len - len / 2,
                    write,
                });
            } else {
                buffers.push(Buffer {
                    addr: start,
                    len,
                    write,
                });
            }
            start
        };
        if !data.is_empty() || room == 0 {
            let addr = place(data.len() as u32, false, &mut self.alloc);
            self.mem
                .write_slice(data, GuestAddress(addr))
                .expect("inside the data area");
        }
        if room > 0 {
            place(room, true, &mut self.alloc);
        }
        if flags & buffer::INDIRECT != 0 {
            let table = self.alloc.take(16 * buffers.len() as u64);
            self.queues[queue].offer_indirect(&self.mem, table, &buffers);
        } else {
            self.queues[queue].offer(&self.mem, &buffers);
        }
    }

    /// Notes the state of `queues` before a pass over them.
    fn begin(&self, queues: &[usize]) -> (Watch, Vec<Before>) {
        let before: Vec<Before> = queues
            .iter()
            .map(|&queue| {
                let device = self.device.queue(queue).expect("a served queue");
                Before {
                    queue,
                    chains: available_chains(device, &self.mem),
                    next_avail: device.next_avail(),
                    used: device.next_used(),
                }
            })
            .collect();
        let all: Vec<&DriverQueue> = self.queues.iter().collect();
        let served: Vec<(&DriverQueue, &[ChainView])> = before
            .iter()
            .map(|b| (&self.queues[b.queue], b.chains.as_slice()))
            .collect();
        (Watch::new(&self.mem, &all, &served), before)
    }

    /// The driver offered more chains than the queue holds: the one way a pass over a
    /// valid queue may fail.
    fn overfull(&self, before: &Before) -> bool {
        let q = &self.queues[before.queue];
        q.avail_idx(&self.mem).wrapping_sub(before.next_avail) > q.size
    }

    /// The used entries a pass added to one queue, each with the chain it answers: the
    /// valid heads among the chains the device took, in order, none longer than the
    /// chain's writable bytes. Checked fully only while the harness is exact.
    fn answered(&self, before: &Before) -> Vec<(u32, ChainView)> {
        let q = &self.queues[before.queue];
        let device = self.device.queue(before.queue).expect("a served queue");
        // Nothing used, nothing written: memory holds whatever the driver put there.
        let used = if device.next_used() == before.used {
            Vec::new()
        } else {
            assert_eq!(
                q.used_idx(&self.mem),
                device.next_used(),
                "the used index in memory is not the device's, after the device added entries"
            );
            q.used_since(&self.mem, before.used)
        };
        assert!(
            used.iter().all(|(id, _)| *id < u32::from(q.size)),
            "a used entry names a descriptor outside the table"
        );
        if !self.exact {
            return Vec::new();
        }
        let taken = usize::from(device.next_avail().wrapping_sub(before.next_avail));
        assert!(
            taken <= before.chains.len(),
            "the device took chains never offered"
        );
        let valid: Vec<&ChainView> = before.chains[..taken]
            .iter()
            .filter(|c| c.head < q.size)
            .collect();
        assert_eq!(used.len(), valid.len(), "a chain taken but not returned");
        used.iter()
            .zip(valid)
            .map(|(&(id, len), chain)| {
                assert_eq!(id, u32::from(chain.head), "answers out of order");
                assert!(
                    u64::from(len) <= chain.capacity(),
                    "used length {len} exceeds the chain's {} writable bytes",
                    chain.capacity()
                );
                (len, chain.clone())
            })
            .collect()
    }

    /// Took every chain the driver offered.
    fn took_all(&self, before: &Before) -> bool {
        let device = self.device.queue(before.queue).expect("a served queue");
        device.next_avail() == self.queues[before.queue].avail_idx(&self.mem)
    }

    fn serve_control(&mut self) {
        if self.control_broken {
            return;
        }
        let (watch, before) = self.begin(&[CONTROL_RX, CONTROL_TX]);
        if let Err(e) = self.device.serve_control() {
            assert!(
                !watch.plain() || before.iter().any(|b| self.overfull(b)),
                "the control queues' pass gave up on queues it could serve: {e}"
            );
            // Part of the pass happened before the queue broke: what the driver said is
            // no longer known.
            self.exact = false;
            self.control_broken = true;
            return;
        }
        self.exact &= watch.plain();
        watch.check(&self.mem);
        let [rx, tx] = [&before[0], &before[1]];
        assert!(self.took_all(tx), "driver messages left on the queue");
        let tx_used = self.answered(tx);
        let rx_used = self.answered(rx);
        if !self.exact {
            return;
        }
        assert!(
            tx_used.iter().all(|(len, _)| *len == 0),
            "a transmit buffer returned with a length"
        );
        // All the driver's messages of this pass came before any of the device's.
        for chain in &tx.chains {
            if let Some(message) = gather(&self.mem, &chain.readable, MAX_CHAIN_BYTES) {
                self.driver_said(&message);
            }
        }
        for port in 0..self.ports.len() {
            assert_eq!(
                self.device.guest_open(port),
                self.driver.guest_open[port],
                "port {port}: device and driver disagree on whether the guest opened it"
            );
        }
        for (i, (len, chain)) in rx_used.iter().enumerate() {
            // A head offered again was filled again: its buffer holds the later message.
            if !overwritten(&rx_used, i) {
                self.device_said(*len, chain);
            }
        }
        // The device stops taking receive buffers only when it has nothing to send.
        assert!(
            self.took_all(rx) || self.device.messages_waiting() == 0,
            "messages held back while the driver offered buffers"
        );
    }

    fn driver_said(&mut self, message: &[u8]) {
        let Some(header) = message.get(..CONTROL_LEN) else {
            return;
        };
        let (id, event, value) = decode(header);
        let d = &mut self.driver;
        if event == event::DEVICE_READY {
            d.device_ready |= value == 1;
            return;
        }
        let Some(port) = usize::try_from(id).ok().filter(|p| *p < d.port_ready.len()) else {
            return;
        };
        match event {
            event::PORT_READY => d.port_ready[port] |= value == 1,
            event::PORT_OPEN => d.guest_open[port] = value == 1,
            _ => {}
        }
    }

    /// A message the device put in a control receive buffer: well-formed, about a port
    /// that exists and that the driver has set up, cut short only by a full buffer.
    fn device_said(&mut self, len: u32, chain: &ChainView) {
        if len == 0 {
            return;
        }
        let bytes =
            gather(&self.mem, &chain.writable, len as usize).expect("written, so in memory");
        let full = u64::from(len) == chain.capacity();
        let Some(header) = bytes.get(..CONTROL_LEN) else {
            assert!(full, "a {len}-byte control message in a larger buffer");
            return;
        };
        let (id, event, value) = decode(header);
        let payload = bytes[CONTROL_LEN..].to_vec();
        let port = id as usize;
        assert!(port < self.ports.len(), "a message about port {id}");
        match event {
            event::DEVICE_ADD => {
                assert!(self.driver.device_ready, "a port added before DEVICE_READY");
                assert_eq!((value, payload.len()), (0, 0));
            }
            event::PORT_OPEN => {
                assert!(
                    self.driver.port_ready[port],
                    "port {port} opened before PORT_READY"
                );
                assert!(value <= 1 && payload.is_empty());
            }
            event::PORT_NAME => {
                assert!(
                    self.driver.port_ready[port],
                    "port {port} named before PORT_READY"
                );
                let name = port_name(port);
                assert!(
                    name.as_bytes().starts_with(&payload) && (payload.len() == name.len() || full),
                    "port {port} named {payload:?}"
                );
            }
            _ => panic!("the device sent control event {event}"),
        }
        self.sent.push((id, event, value, payload));
    }

    /// An output port's pass: every chain taken and returned, and the host end holds
    /// exactly what the guest wrote.
    fn drain(&mut self, port: usize) {
        if self.ports[port].input || self.ports[port].broken {
            return;
        }
        let (watch, before) = self.begin(&[port_rx(port) + 1]);
        let before = &before[0];
        match self.device.drain_output(port) {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                assert!(
                    !watch.plain() || self.overfull(before),
                    "output port {port} gave up on a queue it could serve: {e}"
                );
                self.exact = false;
                self.ports[port].broken = true;
                return;
            }
            None => panic!("port {port} is an output"),
        }
        self.exact &= watch.plain();
        watch.check(&self.mem);
        assert!(self.took_all(before), "output left on the queue");
        let used = self.answered(before);
        if !self.exact {
            return;
        }
        assert!(
            used.iter().all(|(len, _)| *len == 0),
            "a transmit buffer returned with a length"
        );
        let (file, expected) = self.ports[port].output.as_mut().expect("an output");
        for chain in &before.chains {
            if let Some(bytes) = gather(&self.mem, &chain.readable, MAX_CHAIN_BYTES) {
                expected.extend_from_slice(&bytes);
            }
        }
        let mut written = Vec::new();
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.read_to_end(&mut written).expect("read");
        assert!(
            written == *expected,
            "port {port}: the host got {} bytes, the guest wrote {}",
            written.len(),
            expected.len()
        );
    }

    /// An input port's pass: the bytes land in the guest's buffers in order, as far as the
    /// buffers go.
    fn deliver(&mut self, port: usize, data: &[u8]) {
        if !self.ports[port].input || self.ports[port].broken {
            return;
        }
        let (watch, before) = self.begin(&[port_rx(port)]);
        let before = &before[0];
        let Some(delivered) = self.device.deliver_input(port, data) else {
            assert!(
                !self.exact || !self.driver.guest_open[port],
                "port {port} open, yet its input is held back"
            );
            return;
        };
        assert!(
            !self.exact || self.driver.guest_open[port],
            "port {port} not open, yet input went out"
        );
        if !delivered && self.overfull(before) {
            // The queue broke; the port's thread stops.
            self.ports[port].broken = true;
        }
        self.exact &= watch.plain();
        watch.check(&self.mem);
        let used = self.answered(before);
        if !self.exact {
            return;
        }
        let received: usize = used.iter().map(|(len, _)| *len as usize).sum();
        assert!(
            received <= data.len(),
            "port {port}: more bytes received than sent"
        );
        assert!(
            self.ports[port].broken || delivered == (received == data.len()),
            "port {port}: {received} of {} bytes received, and deliver said {delivered}",
            data.len()
        );
        // The bytes, where no buffer was filled twice.
        if (0..used.len()).all(|i| !overwritten(&used, i)) {
            let mut bytes = Vec::new();
            for (len, chain) in &used {
                bytes.extend(
                    gather(&self.mem, &chain.writable, *len as usize)
                        .expect("written, so in memory"),
                );
            }
            assert!(
                data.starts_with(&bytes),
                "port {port}: the guest received bytes it was not sent"
            );
        }
    }
}

/// The input format, for writing seeds.
pub struct Seed(Encoder);

impl Seed {
    /// `inputs`: which ports are inputs; `size`: log2 of the queue size, minus one.
    pub fn new(inputs: &[bool], size: u8, event_idx: bool) -> Self {
        let mut ports = (inputs.len() as u8 - 1) % 3;
        for (i, input) in inputs.iter().enumerate() {
            if *input {
                ports |= 4 << i;
            }
        }
        let mut e = Encoder::default();
        e.u8(ports)
            .u8(size | if event_idx { config::EVENT_IDX } else { 0 });
        Self(e)
    }

    pub fn control(&mut self, id: u32, event: u16, value: u16) -> &mut Self {
        let mut message = Encoder::default();
        message.u32(id).u16(event).u16(value);
        self.control_bytes(&message.0)
    }

    pub fn control_bytes(&mut self, message: &[u8]) -> &mut Self {
        self.0
            .u8(op::CONTROL)
            .u8(message.len() as u8)
            .bytes(message);
        self
    }

    pub fn receive(&mut self, queue: u8, flags: u8, size: u16) -> &mut Self {
        self.0.u8(op::RECEIVE).u8(queue).u8(flags).u16(size);
        self
    }

    pub fn transmit(&mut self, queue: u8, flags: u8, bytes: &[u8]) -> &mut Self {
        self.0
            .u8(op::TRANSMIT)
            .u8(queue)
            .u8(flags)
            .u16(bytes.len() as u16)
            .bytes(bytes);
        self
    }

    pub fn desc(&mut self, queue: u8, index: u16, desc: Desc) -> &mut Self {
        self.0
            .u8(op::DESC)
            .u8(queue)
            .u16(index)
            .u64(desc.addr)
            .u32(desc.len)
            .u16(desc.flags)
            .u16(desc.next);
        self
    }

    pub fn publish(&mut self, queue: u8, head: u16) -> &mut Self {
        self.0.u8(op::PUBLISH).u8(queue).u16(head);
        self
    }

    pub fn avail_idx(&mut self, queue: u8, delta: u16) -> &mut Self {
        self.0.u8(op::AVAIL_IDX).u8(queue).u16(delta);
        self
    }

    pub fn serve_control(&mut self) -> &mut Self {
        self.0.u8(op::SERVE_CONTROL);
        self
    }

    pub fn drain(&mut self, port: u8) -> &mut Self {
        self.0.u8(op::DRAIN).u8(port);
        self
    }

    pub fn deliver(&mut self, port: u8, bytes: &[u8]) -> &mut Self {
        self.0
            .u8(op::DELIVER)
            .u8(port)
            .u16(bytes.len() as u16)
            .bytes(bytes);
        self
    }

    pub fn end_input(&mut self, port: u8) -> &mut Self {
        self.0.u8(op::END_INPUT).u8(port);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.0.clone()
    }
}
