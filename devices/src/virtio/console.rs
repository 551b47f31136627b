//! virtio-console (virtio ID 3) with the MULTIPORT feature: named ports that carry a
//! program's standard streams between host file descriptors and the guest, separate from
//! the serial console (which stays the kernel's log).
//!
//! Each port goes one way. An **input** port copies bytes read from a host descriptor to
//! the guest; at end of file the device tells the driver the host side closed, and the
//! guest's reads return end-of-file once it has read everything. An **output** port copies
//! what the guest writes to a host descriptor; when that descriptor breaks (EPIPE: the
//! reader went away) the device closes the host side, which the guest sees as POLLHUP.
//! The guest finds ports by name (`/sys/class/virtio-ports/vport*/name`).
//!
//! No threads of its own: each activation is one subscriber of the VM's event loop
//! (see [`crate::event_loop`]), woken by the queues' notify eventfds and, while there is
//! something to move, by its host descriptors' readiness. Host descriptors are
//! non-blocking (see [`HostFd`]), so a slow reader or writer never holds the loop up.
//!
//! The Linux driver drops data that arrives on a port the guest has not opened, so an
//! input port sends nothing before the driver reports the guest side open.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice, pop_chain,
};
use crate::event_loop::{HostFd, PendingOutput, Watch};

const VIRTIO_ID_CONSOLE: u32 = 3;
/// The device has more than one port and a control queue pair (virtio 1.2, 5.3.3).
const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
const QUEUE_SIZE: u16 = 256;
/// Queues 2 and 3 are the control receive (device to driver) and transmit queues.
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;
/// A control message: le32 port id, le16 event, le16 value (virtio 1.2, 5.3.6.2).
const CONTROL_LEN: usize = 8;
/// Most bytes taken from one guest buffer: Linux writes at most 32 KiB per buffer; a
/// driver that chains more gets the rest dropped, not an unbounded allocation.
const MAX_CHAIN_BYTES: usize = 1 << 20;
/// Host reads for an input port: a few guest buffers' worth at a time.
const INPUT_CHUNK: usize = 64 << 10;
/// Longest port name (the driver allocates what we send; keep it small).
const MAX_NAME_LEN: usize = 64;

/// Control events (virtio 1.2, 5.3.6.2).
mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const PORT_READY: u16 = 3;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

/// Why a console could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The guest finds ports by name, so a name must be short, non-empty text.
    #[error("virtio-console port name {0:?} must be 1 to {MAX_NAME_LEN} bytes, no NUL")]
    BadName(String),
    /// A console without ports.
    #[error("virtio-console needs at least one port")]
    NoPorts,
    /// A port's host descriptor could not be made ready for the event loop.
    #[error("virtio-console port {name:?}: cannot prepare its host descriptor: {source}")]
    HostEnd {
        /// The port's name.
        name: String,
        /// What failed.
        source: io::Error,
    },
}

/// Which way a port carries bytes, and the host end.
pub enum PortEnd {
    /// Host to guest: bytes read from this descriptor until end of file.
    Input(OwnedFd),
    /// Guest to host: bytes written to this descriptor.
    Output(OwnedFd),
}

/// A port as configured: its name and host end.
pub struct PortSpec {
    name: String,
    end: PortEnd,
}

impl PortSpec {
    /// A port the guest finds as `name`: 1 to 64 bytes, no NUL, else [`ConsoleError::BadName`].
    pub fn new(name: &str, end: PortEnd) -> Result<Self, ConsoleError> {
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
            return Err(ConsoleError::BadName(name.to_owned()));
        }
        Ok(Self {
            name: name.to_owned(),
            end,
        })
    }
}

/// What the device knows about one port.
#[derive(Default)]
struct PortState {
    /// The driver said the guest side is open (a process opened the port).
    guest_open: bool,
    /// The driver has set the port up (PORT_READY); messages about it may go out.
    ready: bool,
    /// The host side is finished: end of input, or the output's reader went away.
    host_closed: bool,
}

/// Messages for the driver, and the per-port state they depend on.
struct Control {
    ports: Vec<PortState>,
    names: Vec<String>,
    /// Encoded messages waiting for a buffer on the control receive queue.
    outbox: VecDeque<Vec<u8>>,
}

fn control_message(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(CONTROL_LEN + payload.len());
    message.extend_from_slice(&id.to_le_bytes());
    message.extend_from_slice(&event.to_le_bytes());
    message.extend_from_slice(&value.to_le_bytes());
    message.extend_from_slice(payload);
    message
}

impl Control {
    /// Handles one message from the driver; returns the ports whose guest side opened.
    fn handle(&mut self, message: &[u8]) -> Option<usize> {
        let Some(header) = message.get(..CONTROL_LEN) else {
            tracing::warn!(len = message.len(), "virtio-console: short control message");
            return None;
        };
        let id = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let event = u16::from_le_bytes(header[4..6].try_into().expect("2 bytes"));
        let value = u16::from_le_bytes(header[6..8].try_into().expect("2 bytes"));
        if event == event::DEVICE_READY {
            if value == 1 {
                for id in 0..self.ports.len() as u32 {
                    self.outbox
                        .push_back(control_message(id, event::DEVICE_ADD, 0, &[]));
                }
            } else {
                tracing::warn!("virtio-console: the driver failed to set the device up");
            }
            return None;
        }
        let Some(port) = usize::try_from(id).ok().filter(|&p| p < self.ports.len()) else {
            tracing::warn!(
                id,
                event,
                "virtio-console: control message for an unknown port"
            );
            return None;
        };
        match event {
            event::PORT_READY if value == 1 => {
                self.ports[port].ready = true;
                // Open before the name: the guest looks for ports by name, and the driver
                // handles control messages in order, so a port it finds is already open
                // on the host side (a read does not see a premature end-of-file, a
                // write no hang-up). Closed already (empty input): never opened, so the
                // guest's first read is end-of-file rather than a wait.
                if !self.ports[port].host_closed {
                    self.outbox
                        .push_back(control_message(id, event::PORT_OPEN, 1, &[]));
                }
                self.outbox.push_back(control_message(
                    id,
                    event::PORT_NAME,
                    1,
                    self.names[port].as_bytes(),
                ));
                None
            }
            event::PORT_READY => {
                tracing::warn!(port, "virtio-console: the driver could not add a port");
                None
            }
            event::PORT_OPEN => {
                let opened = value == 1 && !self.ports[port].guest_open;
                self.ports[port].guest_open = value == 1;
                opened.then_some(port)
            }
            _ => None,
        }
    }

    /// The host side of `port` is done; the driver hears it once the port is set up.
    fn close_host_side(&mut self, port: usize) {
        let state = &mut self.ports[port];
        if state.host_closed {
            return;
        }
        state.host_closed = true;
        if state.ready {
            self.outbox
                .push_back(control_message(port as u32, event::PORT_OPEN, 0, &[]));
        }
    }
}

/// The virtio-console device: a [`VirtioDevice`] to put on a
/// [`MmioTransport`](super::mmio::MmioTransport), its ports numbered in the order given.
pub struct VirtioConsole {
    names: Vec<String>,
    /// Host ends, handed to the activation's subscriber (a reset-and-reactivate by the
    /// driver finds them gone: streams are not replayed).
    ends: Vec<Option<HostEnd>>,
    /// Stops the current activation's subscriber.
    stop: Option<EventFd>,
}

/// A port's host end, ready for the event loop.
enum HostEnd {
    Input(HostFd),
    Output(HostFd),
}

impl VirtioConsole {
    /// A console with `ports`; at least one ([`ConsoleError::NoPorts`]). Their host ends
    /// are made non-blocking here (see [`HostFd::new`]); the I/O starts when the driver
    /// activates the device.
    pub fn new(ports: Vec<PortSpec>) -> Result<Self, ConsoleError> {
        if ports.is_empty() {
            return Err(ConsoleError::NoPorts);
        }
        let mut names = Vec::with_capacity(ports.len());
        let mut ends = Vec::with_capacity(ports.len());
        for port in ports {
            let end = match port.end {
                PortEnd::Input(fd) => HostFd::new(fd, false).map(HostEnd::Input),
                PortEnd::Output(fd) => HostFd::new(fd, true).map(HostEnd::Output),
            }
            .map_err(|source| ConsoleError::HostEnd {
                name: port.name.clone(),
                source,
            })?;
            names.push(port.name);
            ends.push(Some(end));
        }
        Ok(Self {
            names,
            ends,
            stop: None,
        })
    }

    fn stop_activation(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
    }

    fn queue_count(&self) -> usize {
        2 + 2 * self.names.len()
    }

    /// The work of one activation, not yet handed to the event loop (the fuzz targets
    /// drive it on their own thread instead). Takes the ports' host ends.
    fn ports(&mut self, activation: Activation) -> Result<Ports, ActivateError> {
        let expected = self.queue_count();
        if activation.queues.len() != expected {
            return Err(ActivateError::QueueCount {
                device: "virtio-console",
                expected,
                actual: activation.queues.len(),
            });
        }
        let mut queues: Vec<Option<(Queue, EventFd)>> =
            activation.queues.into_iter().map(Some).collect();
        let (rx, rx_event) = queues[CONTROL_RX].take().expect("counted above");
        let (tx, tx_event) = queues[CONTROL_TX].take().expect("counted above");
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| ActivateError::Spawn {
            device: "virtio-console",
            source,
        })?;
        let mut ports = Ports {
            ctx: Context {
                memory: activation.memory,
                interrupt: activation.interrupt,
                control: Control {
                    ports: self.names.iter().map(|_| PortState::default()).collect(),
                    names: self.names.clone(),
                    outbox: VecDeque::new(),
                },
                pending_output: activation.event_loop.pending_output(),
            },
            control: ControlQueues {
                rx,
                rx_event,
                tx,
                tx_event,
                broken: false,
            },
            inputs: Vec::new(),
            outputs: Vec::new(),
            stop,
            stopped: false,
        };
        for port in 0..self.names.len() {
            let rx = port_rx_queue(port);
            match self.ends[port].take() {
                None => {
                    tracing::warn!(
                        port = self.names[port],
                        "virtio-console: reactivated; the port's stream is gone"
                    );
                }
                Some(HostEnd::Input(host)) => {
                    let (queue, event) = queues[rx].take().expect("counted above");
                    let index = ports.inputs.len();
                    ports.inputs.push(InputPort {
                        port,
                        queue,
                        watch: Watch::new(&host, Source::InputHost(index).token(), EventSet::IN),
                        event,
                        host: Some(host),
                        retired: None,
                        chunk: vec![0; INPUT_CHUNK],
                        start: 0,
                        end: 0,
                        broken: false,
                    });
                }
                Some(HostEnd::Output(host)) => {
                    let (queue, event) = queues[rx + 1].take().expect("counted above");
                    let index = ports.outputs.len();
                    ports
                        .outputs
                        .push(OutputPort::new(port, index, queue, event, host));
                }
            }
        }
        Ok(ports)
    }
}

impl Drop for VirtioConsole {
    fn drop(&mut self) {
        self.stop_activation();
    }
}

/// The receive (device to driver) queue of port `port`; its transmit queue follows it.
fn port_rx_queue(port: usize) -> usize {
    if port == 0 { 0 } else { 2 + 2 * port }
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    /// Indirect descriptors are not an optimisation here: Linux's splice into a port adds
    /// one descriptor per pipe page, and when the ring has some free descriptors but fewer
    /// than that, the driver drops the spliced pages and splice returns 0 (it only holds
    /// writers back once the ring is entirely full). With indirect descriptors every
    /// buffer takes one ring slot, so the add cannot fail that way.
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; self.queue_count()]
    }

    /// cols, rows (unused: no console port), max_nr_ports, emerg_wr.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[4..8].copy_from_slice(&(self.names.len() as u32).to_le_bytes());
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(config.len());
        let n = (config.len() - start).min(data.len());
        data[..n].copy_from_slice(&config[start..start + n]);
        data[n..].fill(0);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let event_loop = activation.event_loop.clone();
        let ports = self.ports(activation)?;
        self.stop_activation();
        let stop = ports
            .stop
            .try_clone()
            .map_err(|source| ActivateError::Spawn {
                device: "virtio-console",
                source,
            })?;
        event_loop
            .add(Box::new(ports))
            .map_err(|source| ActivateError::EventLoop {
                device: "virtio-console",
                source,
            })?;
        self.stop = Some(stop);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_activation();
    }
}

/// Every byte of the driver-readable part of `chain`, at most [`MAX_CHAIN_BYTES`]; `None`
/// when a descriptor points outside guest memory.
fn read_chain(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    for desc in chain.readable() {
        let room = MAX_CHAIN_BYTES - bytes.len();
        let len = (desc.len() as usize).min(room);
        let start = bytes.len();
        bytes.resize(start + len, 0);
        memory.read_slice(&mut bytes[start..], desc.addr()).ok()?;
        if bytes.len() == MAX_CHAIN_BYTES {
            break;
        }
    }
    Some(bytes)
}

/// Writes as much of `data` as fits into the device-writable part of `chain`; returns how
/// many bytes went in (0 when a descriptor points outside guest memory).
fn write_chain(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    data: &[u8],
) -> usize {
    let mut written = 0;
    for desc in chain.writable() {
        let len = (desc.len() as usize).min(data.len() - written);
        if memory
            .write_slice(&data[written..written + len], desc.addr())
            .is_err()
        {
            return 0;
        }
        written += len;
        if written == data.len() {
            break;
        }
    }
    written
}

/// Returns `head` used with `len` bytes; a head the driver put out of range is dropped.
fn add_used(queue: &mut Queue, memory: &GuestMemoryMmap, head: u16, len: usize) -> bool {
    match queue.add_used(memory, head, len as u32) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(head, error = %e, "virtio-console: cannot return a buffer");
            false
        }
    }
}

/// What every queue of one activation works with besides the queue itself.
struct Context {
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    control: Control,
    pending_output: PendingOutput,
}

/// Where an event comes from; its token is the event's data.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    Stop,
    ControlTx,
    ControlRx,
    /// The data queue / the host end of `inputs[i]` or `outputs[i]`.
    InputQueue(usize),
    InputHost(usize),
    OutputQueue(usize),
    OutputHost(usize),
}

impl Source {
    fn token(self) -> u32 {
        let (kind, index) = match self {
            Source::Stop => (0, 0),
            Source::ControlTx => (1, 0),
            Source::ControlRx => (2, 0),
            Source::InputQueue(i) => (3, i),
            Source::InputHost(i) => (4, i),
            Source::OutputQueue(i) => (5, i),
            Source::OutputHost(i) => (6, i),
        };
        // At most a few ports (their names go in a 12-byte config's count).
        kind | (index as u32) << 3
    }

    fn from_token(token: u32) -> Option<Self> {
        let index = (token >> 3) as usize;
        Some(match token & 7 {
            0 => Source::Stop,
            1 => Source::ControlTx,
            2 => Source::ControlRx,
            3 => Source::InputQueue(index),
            4 => Source::InputHost(index),
            5 => Source::OutputQueue(index),
            6 => Source::OutputHost(index),
            _ => return None,
        })
    }
}

/// One activation: the control queues and the data queue of every port that still has
/// its host end. A subscriber of the VM's event loop; every queue and host end is
/// served on the loop's thread.
struct Ports {
    ctx: Context,
    control: ControlQueues,
    inputs: Vec<InputPort>,
    outputs: Vec<OutputPort>,
    /// Signalled when the driver resets the device (or the device goes away).
    stop: EventFd,
    /// Stopped: nothing watched any more, host ends closed.
    stopped: bool,
}

impl Ports {
    /// The driver's control messages, inputs the guest opened, messages for the driver.
    fn serve_control(&mut self) {
        let _ = self.control.tx_event.read();
        let _ = self.control.rx_event.read();
        match self.control.serve(&mut self.ctx) {
            Ok(opened) => {
                for port in opened {
                    if let Some(input) = self.inputs.iter_mut().find(|i| i.port == port) {
                        input.pump(&mut self.ctx, false);
                    }
                }
                // An input that ended at once (empty) closed its host side in `pump`.
                if !self.ctx.control.outbox.is_empty()
                    && let Err(e) = self.control.serve(&mut self.ctx)
                {
                    tracing::warn!(error = %e, "virtio-console: control queue broken");
                }
            }
            Err(e) => tracing::warn!(error = %e, "virtio-console: control queue broken"),
        }
    }

    /// Registers the host ends that have something to wait for, and only those (a
    /// readable input whose bytes the guest cannot take yet would wake the loop for
    /// nothing, over and over).
    fn update_watches(&mut self, ops: &mut EventOps) {
        for input in &mut self.inputs {
            let on = input.waits_for_host(&self.ctx.control);
            input.watch.set(ops, on);
            if !input.watch.is_on() {
                input.retired = None;
            }
        }
        for output in &mut self.outputs {
            let on = output.waits_for_host();
            output.watch.set(ops, on);
            if !output.watch.is_on() {
                output.retired = None;
            }
        }
    }

    fn shut_down(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::new(&self.stop, EventSet::IN));
        for event in [&self.control.tx_event, &self.control.rx_event]
            .into_iter()
            .chain(self.inputs.iter().map(|i| &i.event))
            .chain(self.outputs.iter().map(|o| &o.event))
        {
            let _ = ops.remove(Events::new(event, EventSet::IN));
        }
        for input in &mut self.inputs {
            input.watch.set(ops, false);
        }
        for output in &mut self.outputs {
            output.watch.set(ops, false);
        }
        // Closes the host ends.
        self.inputs.clear();
        self.outputs.clear();
        self.stopped = true;
    }
}

impl MutEventSubscriber for Ports {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &EventFd, source: Source| {
            if let Err(e) = ops.add(Events::with_data(fd, source.token(), EventSet::IN)) {
                tracing::warn!(?source, "virtio-console: cannot watch a queue: {e}");
            }
        };
        add(&self.stop, Source::Stop);
        add(&self.control.tx_event, Source::ControlTx);
        add(&self.control.rx_event, Source::ControlRx);
        for (i, input) in self.inputs.iter().enumerate() {
            add(&input.event, Source::InputQueue(i));
        }
        for (i, output) in self.outputs.iter().enumerate() {
            add(&output.event, Source::OutputQueue(i));
        }
        // The driver may have queued messages before the loop took the device over.
        self.serve_control();
        for output in &mut self.outputs {
            output.drain(&mut self.ctx);
        }
        self.update_watches(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stopped {
            return;
        }
        let source = Source::from_token(events.data());
        match source {
            Some(Source::Stop) => {
                self.shut_down(ops);
                return;
            }
            Some(Source::ControlTx | Source::ControlRx) | None => {}
            Some(Source::InputQueue(i)) => {
                if let Some(input) = self.inputs.get_mut(i) {
                    let _ = input.event.read();
                    input.pump(&mut self.ctx, false);
                }
            }
            Some(Source::InputHost(i)) => {
                if let Some(input) = self.inputs.get_mut(i) {
                    input.pump(&mut self.ctx, true);
                }
            }
            Some(Source::OutputQueue(i)) => {
                if let Some(output) = self.outputs.get_mut(i) {
                    let _ = output.event.read();
                    output.drain(&mut self.ctx);
                }
            }
            Some(Source::OutputHost(i)) => {
                if let Some(output) = self.outputs.get_mut(i) {
                    output.drain(&mut self.ctx);
                }
            }
        }
        // The control queues when the driver used them, or when a port's host side
        // closed and the driver is to hear it; not on every stream event.
        if matches!(source, Some(Source::ControlTx | Source::ControlRx))
            || !self.ctx.control.outbox.is_empty()
        {
            self.serve_control();
        }
        self.update_watches(ops);
    }
}

struct ControlQueues {
    /// Device to driver: the driver posts empty buffers, we fill them with messages.
    rx: Queue,
    /// The driver posted more buffers: messages waiting in the outbox can go.
    rx_event: EventFd,
    /// Driver to device.
    tx: Queue,
    tx_event: EventFd,
    /// A queue broke; nothing more is served on either.
    broken: bool,
}

impl ControlQueues {
    /// Reads the driver's messages, then sends what is in the outbox while there are
    /// buffers for it. Returns the ports the guest opened.
    fn serve(&mut self, ctx: &mut Context) -> Result<Vec<usize>, virtio_queue::Error> {
        if self.broken {
            return Ok(Vec::new());
        }
        let result = self.serve_queues(ctx);
        self.broken = result.is_err();
        result
    }

    fn serve_queues(&mut self, ctx: &mut Context) -> Result<Vec<usize>, virtio_queue::Error> {
        let memory = &ctx.memory;
        let mut opened = Vec::new();
        let mut used_tx = false;
        while let Some(chain) = pop_chain(&mut self.tx, memory)? {
            let head = chain.head_index();
            if let Some(message) = read_chain(memory, chain)
                && let Some(port) = ctx.control.handle(&message)
            {
                opened.push(port);
            }
            used_tx |= add_used(&mut self.tx, memory, head, 0);
        }
        let mut used_rx = false;
        while !ctx.control.outbox.is_empty() {
            let Some(chain) = pop_chain(&mut self.rx, memory)? else {
                break;
            };
            let head = chain.head_index();
            let message = ctx.control.outbox.pop_front().expect("not empty");
            let written = write_chain(memory, chain, &message);
            if written < message.len() {
                tracing::warn!("virtio-console: control buffer too small, message dropped");
            }
            used_rx |= add_used(&mut self.rx, memory, head, written);
        }
        if (used_tx && self.tx.needs_notification(memory)?)
            || (used_rx && self.rx.needs_notification(memory)?)
        {
            ctx.interrupt.signal_used_queue();
        }
        Ok(opened)
    }
}

/// Host to guest.
struct InputPort {
    port: usize,
    queue: Queue,
    event: EventFd,
    /// `None` once the host end reached end of file (or failed).
    host: Option<HostFd>,
    /// The host end after that, kept open until it is no longer watched: the loop knows
    /// descriptors by number, and a closed number may come back for another one.
    retired: Option<HostFd>,
    watch: Watch,
    /// Bytes read from the host; `chunk[start..end]` are not in the guest yet.
    chunk: Vec<u8>,
    start: usize,
    end: usize,
    broken: bool,
}

impl InputPort {
    fn waits_for_host(&self, control: &Control) -> bool {
        control.ports[self.port].guest_open
            && !self.broken
            && self.start == self.end
            && self.host.as_ref().is_some_and(HostFd::pollable)
    }

    /// Moves input along: what was read into the guest's buffers, then more from the
    /// host while the guest has buffers for it. `readable`: epoll said the host end is.
    /// Nothing moves before the guest opens the port: the driver would drop it.
    fn pump(&mut self, ctx: &mut Context, mut readable: bool) {
        if self.broken || !ctx.control.ports[self.port].guest_open {
            return;
        }
        loop {
            if self.start < self.end {
                match fill_buffers(&mut self.queue, ctx, &self.chunk[self.start..self.end]) {
                    Ok(n) => self.start += n,
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-console: input queue broken");
                        self.broken = true;
                        return;
                    }
                }
                if self.start < self.end {
                    return; // waits for buffers
                }
            }
            let Some(host) = &self.host else {
                return;
            };
            if host.pollable() && !readable {
                return; // waits for the host
            }
            match host.file().read(&mut self.chunk) {
                Ok(0) => break,
                Ok(n) => (self.start, self.end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-console: reading input failed");
                    break;
                }
            }
            // One read per readiness: a terminal or pipe says again when it has more.
            readable = false;
        }
        self.retired = self.host.take();
        ctx.control.close_host_side(self.port);
    }
}

/// Puts `data` into the guest's buffers on `queue` as far as they go; returns how many
/// bytes went in. One interrupt per batch of buffers filled, not per buffer. Asks for a
/// notification when the buffers run out first.
fn fill_buffers(
    queue: &mut Queue,
    ctx: &Context,
    mut data: &[u8],
) -> Result<usize, virtio_queue::Error> {
    let memory = &ctx.memory;
    let total = data.len();
    loop {
        let mut used = false;
        while !data.is_empty() {
            let Some(chain) = pop_chain(queue, memory)? else {
                break;
            };
            let head = chain.head_index();
            let written = write_chain(memory, chain, data);
            data = &data[written..];
            used |= add_used(queue, memory, head, written);
        }
        if used && queue.needs_notification(memory)? {
            ctx.interrupt.signal_used_queue();
        }
        // Out of buffers: ask to be notified, and look again (the driver may have posted
        // some in between) before waiting.
        if data.is_empty() || !queue.enable_notification(memory)? {
            return Ok(total - data.len());
        }
    }
}

/// Guest to host.
struct OutputPort {
    port: usize,
    queue: Queue,
    event: EventFd,
    /// `None` once the host side broke: later output is taken and dropped.
    host: Option<HostFd>,
    /// The host end after that, kept open until it is no longer watched (see
    /// `InputPort::retired`).
    retired: Option<HostFd>,
    watch: Watch,
    /// Taken from the guest, not yet taken by the host: `pending[start..]`. While any is
    /// left no more buffers are taken, so a slow host reader holds the guest's writer
    /// back (flow control), as a local pipe would.
    pending: Vec<u8>,
    start: usize,
    /// Counted in the VM's pending output while bytes wait.
    counted: Option<PendingOutput>,
    broken: bool,
}

impl OutputPort {
    /// Port `port`, `outputs[index]` of its activation.
    fn new(port: usize, index: usize, queue: Queue, event: EventFd, host: HostFd) -> Self {
        Self {
            port,
            queue,
            watch: Watch::new(&host, Source::OutputHost(index).token(), EventSet::OUT),
            event,
            host: Some(host),
            retired: None,
            pending: Vec::new(),
            start: 0,
            counted: None,
            broken: false,
        }
    }

    fn waits_for_host(&self) -> bool {
        !self.broken && self.has_pending() && self.host.as_ref().is_some_and(HostFd::pollable)
    }

    fn has_pending(&self) -> bool {
        self.start < self.pending.len()
    }

    /// Writes out what is pending, then takes the guest's buffers and writes them out,
    /// until the guest has no more or the host takes no more.
    fn drain(&mut self, ctx: &mut Context) {
        if self.broken {
            return;
        }
        if let Err(e) = self.drain_queue(ctx) {
            tracing::warn!(error = %e, "virtio-console: output queue broken");
            self.broken = true;
        }
        match (self.has_pending(), &self.counted) {
            (true, None) => {
                ctx.pending_output.add();
                self.counted = Some(ctx.pending_output.clone());
            }
            (false, Some(counted)) => {
                counted.remove();
                self.counted = None;
            }
            _ => {}
        }
    }

    fn drain_queue(&mut self, ctx: &mut Context) -> Result<(), virtio_queue::Error> {
        let Context {
            memory,
            interrupt,
            control,
            ..
        } = ctx;
        loop {
            self.write_pending(control);
            if self.has_pending() {
                return Ok(());
            }
            self.queue.disable_notification(memory)?;
            let mut used = false;
            while !self.has_pending() {
                let Some(chain) = pop_chain(&mut self.queue, memory)? else {
                    break;
                };
                let head = chain.head_index();
                if let Some(bytes) = read_chain(memory, chain) {
                    (self.pending, self.start) = (bytes, 0);
                }
                used |= add_used(&mut self.queue, memory, head, 0);
                self.write_pending(control);
            }
            if used && self.queue.needs_notification(memory)? {
                interrupt.signal_used_queue();
            }
            if self.has_pending() {
                // Notifications stay off: the host's readiness brings us back.
                return Ok(());
            }
            if !self.queue.enable_notification(memory)? {
                return Ok(());
            }
        }
    }

    /// Writes `pending[start..]` to the host as far as it takes it without blocking.
    fn write_pending(&mut self, control: &mut Control) {
        while self.has_pending() {
            let Some(host) = &self.host else {
                self.pending.clear();
                self.start = 0;
                return;
            };
            match host.file().write(&self.pending[self.start..]) {
                Ok(0) => {
                    tracing::warn!("virtio-console: the host end takes no output");
                    self.retired = self.host.take();
                    control.close_host_side(self.port);
                }
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    if e.kind() != io::ErrorKind::BrokenPipe {
                        tracing::warn!(error = %e, "virtio-console: writing output failed");
                    }
                    self.retired = self.host.take();
                    control.close_host_side(self.port);
                }
            }
        }
        self.pending.clear();
        self.start = 0;
    }
}

impl Drop for OutputPort {
    fn drop(&mut self) {
        if let Some(counted) = self.counted.take() {
            counted.remove();
        }
    }
}

#[cfg(feature = "fuzzing")]
#[path = "console_fuzzing.rs"]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn control(ports: usize) -> Control {
        Control {
            ports: (0..ports).map(|_| PortState::default()).collect(),
            names: (0..ports).map(|i| format!("port{i}")).collect(),
            outbox: VecDeque::new(),
        }
    }

    fn decode(message: &[u8]) -> (u32, u16, u16, Vec<u8>) {
        (
            u32::from_le_bytes(message[0..4].try_into().unwrap()),
            u16::from_le_bytes(message[4..6].try_into().unwrap()),
            u16::from_le_bytes(message[6..8].try_into().unwrap()),
            message[8..].to_vec(),
        )
    }

    #[test]
    fn handshake_adds_names_and_opens_every_port() {
        let mut c = control(2);
        assert_eq!(
            c.handle(&control_message(0, event::DEVICE_READY, 1, &[])),
            None
        );
        let added: Vec<_> = c.outbox.drain(..).map(|m| decode(&m)).collect();
        assert_eq!(
            added,
            vec![
                (0, event::DEVICE_ADD, 0, vec![]),
                (1, event::DEVICE_ADD, 0, vec![])
            ]
        );
        c.handle(&control_message(1, event::PORT_READY, 1, &[]));
        let sent: Vec<_> = c.outbox.drain(..).map(|m| decode(&m)).collect();
        assert_eq!(
            sent,
            vec![
                (1, event::PORT_OPEN, 1, vec![]),
                (1, event::PORT_NAME, 1, b"port1".to_vec())
            ]
        );
        assert_eq!(
            c.handle(&control_message(1, event::PORT_OPEN, 1, &[])),
            Some(1)
        );
        // A second open report is not a new opening.
        assert_eq!(
            c.handle(&control_message(1, event::PORT_OPEN, 1, &[])),
            None
        );
    }

    #[test]
    fn a_host_side_closed_before_the_port_is_ready_is_never_opened() {
        let mut c = control(1);
        c.close_host_side(0);
        assert!(
            c.outbox.is_empty(),
            "nothing about a port the driver has not set up"
        );
        c.handle(&control_message(0, event::PORT_READY, 1, &[]));
        let sent: Vec<_> = c.outbox.drain(..).map(|m| decode(&m)).collect();
        assert_eq!(sent, vec![(0, event::PORT_NAME, 1, b"port0".to_vec())]);
    }

    #[test]
    fn a_host_side_closed_after_ready_is_reported_once() {
        let mut c = control(1);
        c.handle(&control_message(0, event::PORT_READY, 1, &[]));
        c.outbox.clear();
        c.close_host_side(0);
        c.close_host_side(0);
        let sent: Vec<_> = c.outbox.drain(..).map(|m| decode(&m)).collect();
        assert_eq!(sent, vec![(0, event::PORT_OPEN, 0, vec![])]);
    }

    #[test]
    fn malformed_control_messages_are_ignored() {
        let mut c = control(1);
        assert_eq!(c.handle(&[1, 2, 3]), None);
        assert_eq!(
            c.handle(&control_message(7, event::PORT_READY, 1, &[])),
            None
        );
        assert_eq!(
            c.handle(&control_message(u32::MAX, event::PORT_OPEN, 1, &[])),
            None
        );
        assert_eq!(c.handle(&control_message(0, 0xffff, 1, &[])), None);
        assert!(c.outbox.is_empty());
        assert!(!c.ports[0].ready && !c.ports[0].guest_open);
    }

    /// Runs `f` on a thread; a pass that spins instead of giving up on a broken queue
    /// fails the test rather than hanging it.
    fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the pass spins on a broken queue")
    }

    fn context(memory: &GuestMemoryMmap, ports: usize) -> Context {
        Context {
            memory: memory.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            control: control(ports),
            pending_output: PendingOutput::default(),
        }
    }

    fn output_port(queue: Queue, host: File) -> OutputPort {
        let host = HostFd::new(host.into(), true).unwrap();
        OutputPort::new(0, 0, queue, EventFd::new(libc::EFD_NONBLOCK).unwrap(), host)
    }

    #[test]
    fn a_driver_claiming_more_buffers_than_a_queue_holds_breaks_the_queue() {
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Each queue holds 16 chains; the driver's available index says 1000 are waiting,
        // so none can be taken, and "is there more?" is always yes.
        let overfull = |base: u64| {
            let mock = MockSplitQueue::create(&memory, GuestAddress(base), 16);
            mock.avail().idx().store(1000);
            mock.create_queue::<Queue>().unwrap()
        };
        let null = || File::options().write(true).open("/dev/null").unwrap();

        let mut ctx = context(&memory, 1);
        let mut output = output_port(overfull(0), null());
        assert!(within_seconds(move || output
            .drain_queue(&mut ctx)
            .is_err()));

        let ctx = context(&memory, 1);
        let mut queue = overfull(0x1_0000);
        assert!(within_seconds(move || fill_buffers(
            &mut queue, &ctx, b"data"
        )
        .is_err()));

        // Control: messages wait to go out, but neither queue can be served.
        let mut ctx = context(&memory, 1);
        ctx.control
            .handle(&control_message(0, event::DEVICE_READY, 1, &[]));
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut control = ControlQueues {
            rx: overfull(0x2_0000),
            rx_event: eventfd(),
            tx: overfull(0x3_0000),
            tx_event: eventfd(),
            broken: false,
        };
        assert!(within_seconds(move || {
            let first = control.serve(&mut ctx).is_err();
            // Broken stays broken: nothing more is served, nothing spins.
            first
                && control
                    .serve(&mut ctx)
                    .is_ok_and(|opened| opened.is_empty())
        }));
    }

    #[test]
    fn a_slow_host_reader_holds_output_back_and_is_counted() {
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&memory, GuestAddress(0), 16);
        // Four 64 KiB buffers: more than a pipe holds.
        const LEN: u32 = 64 << 10;
        for i in 0..4u16 {
            let addr = 0x10000 + u64::from(i) * u64::from(LEN);
            memory
                .write_slice(&vec![i as u8 + 1; LEN as usize], GuestAddress(addr))
                .unwrap();
            let desc = virtio_queue::desc::split::Descriptor::new(addr, LEN, 0, 0);
            mock.desc_table()
                .store(i, virtio_queue::desc::RawDescriptor::from(desc))
                .unwrap();
            mock.avail().ring().ref_at(i.into()).unwrap().store(i);
        }
        mock.avail().idx().store(4);
        let (mut reader, writer) = std::io::pipe().unwrap();
        let mut ctx = context(&memory, 1);
        let pending = ctx.pending_output.clone();
        let mut port = output_port(
            mock.create_queue().unwrap(),
            File::from(OwnedFd::from(writer)),
        );
        port.drain(&mut ctx);
        assert!(port.has_pending(), "the pipe is full: bytes wait");
        assert!(port.waits_for_host());
        assert_eq!(pending.count(), 1);
        assert!(
            mock.used().idx().load() < 4,
            "no more buffers taken while bytes wait"
        );
        // The reader drains the pipe as the port writes on.
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < 4 * LEN as usize {
            let n = reader.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
            port.drain(&mut ctx);
        }
        assert_eq!(mock.used().idx().load(), 4);
        assert!(!port.has_pending());
        assert_eq!(pending.count(), 0);
        for (i, chunk) in got.chunks(LEN as usize).enumerate() {
            assert!(
                chunk.iter().all(|&b| b == i as u8 + 1),
                "buffer {i} in order"
            );
        }
    }

    #[test]
    fn port_names_are_checked() {
        let fd = || OwnedFd::from(File::open("/dev/null").unwrap());
        assert!(PortSpec::new("tvix.stdout", PortEnd::Output(fd())).is_ok());
        assert!(PortSpec::new("", PortEnd::Output(fd())).is_err());
        assert!(PortSpec::new("a\0b", PortEnd::Output(fd())).is_err());
        assert!(PortSpec::new(&"x".repeat(65), PortEnd::Output(fd())).is_err());
        assert!(VirtioConsole::new(Vec::new()).is_err());
    }

    #[test]
    fn queues_follow_the_multiport_layout() {
        assert_eq!(port_rx_queue(0), 0);
        assert_eq!(port_rx_queue(1), 4);
        assert_eq!(port_rx_queue(2), 6);
        let console = VirtioConsole::new(vec![
            PortSpec::new(
                "a",
                PortEnd::Output(OwnedFd::from(File::open("/dev/null").unwrap())),
            )
            .unwrap(),
            PortSpec::new(
                "b",
                PortEnd::Output(OwnedFd::from(File::open("/dev/null").unwrap())),
            )
            .unwrap(),
        ])
        .unwrap();
        assert_eq!(console.queue_max_sizes().len(), 6);
        let mut config = [0u8; 12];
        console.read_config(0, &mut config);
        assert_eq!(u32::from_le_bytes(config[4..8].try_into().unwrap()), 2);
    }

    /// What the guest's splice sends: one buffer of many pages, here through an indirect
    /// table (the feature is offered so that such buffers never need many ring slots).
    #[test]
    fn output_takes_a_many_page_buffer_through_an_indirect_table() {
        use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
        use virtio_queue::desc::{RawDescriptor, split::Descriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{GuestAddress, GuestMemoryMmap};

        let console = VirtioConsole::new(vec![
            PortSpec::new(
                "out",
                PortEnd::Output(OwnedFd::from(File::open("/dev/null").unwrap())),
            )
            .unwrap(),
        ])
        .unwrap();
        assert_ne!(console.features() & VIRTIO_RING_F_INDIRECT_DESC, 0);

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&memory, GuestAddress(0), QUEUE_SIZE);
        // 16 pages of data, each its own descriptor in an indirect table at 0x8000.
        const PAGES: u16 = 16;
        const DATA: u64 = 0x10000;
        const TABLE: u64 = 0x8000;
        let data: Vec<u8> = (0..PAGES as usize * 4096)
            .map(|i| (i % 251) as u8)
            .collect();
        memory.write_slice(&data, GuestAddress(DATA)).unwrap();
        for page in 0..PAGES {
            let (flags, next) = if page + 1 < PAGES {
                (VRING_DESC_F_NEXT as u16, page + 1)
            } else {
                (0, 0)
            };
            let desc = Descriptor::new(DATA + u64::from(page) * 4096, 4096, flags, next);
            memory
                .write_obj(
                    RawDescriptor::from(desc),
                    GuestAddress(TABLE + u64::from(page) * 16),
                )
                .unwrap();
        }
        let head = Descriptor::new(
            TABLE,
            u32::from(PAGES) * 16,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        mock.desc_table()
            .store(0, RawDescriptor::from(head))
            .unwrap();
        mock.avail().ring().ref_at(0).unwrap().store(0);
        mock.avail().idx().store(1);

        let out = tempfile::tempfile().unwrap();
        let mut port = output_port(mock.create_queue().unwrap(), out.try_clone().unwrap());
        port.drain_queue(&mut context(&memory, 1)).unwrap();
        assert_eq!(mock.used().idx().load(), 1, "the buffer went back");
        let mut written = Vec::new();
        let mut out = out;
        std::io::Seek::rewind(&mut out).unwrap();
        out.read_to_end(&mut written).unwrap();
        assert!(
            written == data,
            "{} bytes written of {}",
            written.len(),
            data.len()
        );
    }
}
