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
//! Threads: one serves the control queues (the driver's port handshake, and the messages
//! the device sends), one per port serves its data queue. Every thread sleeps in poll(2)
//! on its queue's notify eventfd, its host descriptor and a stop eventfd.
//!
//! The Linux driver drops data that arrives on a port the guest has not opened, so an
//! input port sends nothing before the driver reports the guest side open.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice, pop_chain,
};
use crate::bus::lock;
use crate::seccomp::{self, RoleThread, ThreadRole};

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

/// What the control thread knows about one port.
#[derive(Default)]
struct PortState {
    /// The driver said the guest side is open (a process opened the port).
    guest_open: bool,
    /// The driver has set the port up (PORT_READY); messages about it may go out.
    ready: bool,
    /// The host side is finished: end of input, or the output's reader went away.
    host_closed: bool,
}

/// Messages for the driver, and the per-port state they depend on, shared between the
/// control thread (which owns the control queues) and the port threads.
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

/// Shared by every thread of one activation.
struct Shared {
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    control: Mutex<Control>,
    /// Wakes the control thread to send what is in the outbox.
    control_wake: EventFd,
    /// Per port: wakes an input port's thread when the guest opens the port.
    opened: Vec<EventFd>,
}

impl Shared {
    fn close_host_side(&self, port: usize) {
        lock(&self.control).close_host_side(port);
        let _ = self.control_wake.write(1);
    }

    fn guest_open(&self, port: usize) -> bool {
        lock(&self.control).ports[port].guest_open
    }
}

/// The virtio-console device: a [`VirtioDevice`] to put on a
/// [`MmioTransport`](super::mmio::MmioTransport), its ports numbered in the order given.
pub struct VirtioConsole {
    names: Vec<String>,
    /// Host ends, handed to the port threads at activation (a reset-and-reactivate by
    /// the driver finds them gone: streams are not replayed).
    ends: Vec<Option<PortEnd>>,
    workers: Vec<(EventFd, RoleThread<()>)>,
}

impl VirtioConsole {
    /// A console with `ports`; at least one ([`ConsoleError::NoPorts`]). Their threads start
    /// when the driver activates the device.
    pub fn new(ports: Vec<PortSpec>) -> Result<Self, ConsoleError> {
        if ports.is_empty() {
            return Err(ConsoleError::NoPorts);
        }
        let (names, ends) = ports.into_iter().map(|p| (p.name, Some(p.end))).unzip();
        Ok(Self {
            names,
            ends,
            workers: Vec::new(),
        })
    }

    /// Stops every thread; output ports first write out what the guest has queued.
    fn stop_workers(&mut self) {
        for (stop, _) in &self.workers {
            let _ = stop.write(1);
        }
        for (_, worker) in self.workers.drain(..) {
            if worker.join().is_none() {
                tracing::warn!("virtio-console: a port thread panicked");
            }
        }
    }

    fn queue_count(&self) -> usize {
        2 + 2 * self.names.len()
    }

    /// The threads' work for one activation, before any thread runs (the fuzz targets run
    /// it on their own thread instead). Takes the ports' host ends.
    fn workers(&mut self, activation: Activation) -> Result<Workers, ActivateError> {
        let expected = self.queue_count();
        if activation.queues.len() != expected {
            return Err(ActivateError::QueueCount {
                device: "virtio-console",
                expected,
                actual: activation.queues.len(),
            });
        }
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| ActivateError::Spawn {
                device: "virtio-console",
                source,
            })
        };
        let mut queues: Vec<Option<(Queue, EventFd)>> =
            activation.queues.into_iter().map(Some).collect();
        let shared = Arc::new(Shared {
            memory: activation.memory,
            interrupt: activation.interrupt,
            control: Mutex::new(Control {
                ports: self.names.iter().map(|_| PortState::default()).collect(),
                names: self.names.clone(),
                outbox: VecDeque::new(),
            }),
            control_wake: eventfd()?,
            opened: (0..self.names.len())
                .map(|_| eventfd())
                .collect::<Result<_, _>>()?,
        });

        let (rx, rx_event) = queues[CONTROL_RX].take().expect("counted above");
        let (tx, tx_event) = queues[CONTROL_TX].take().expect("counted above");
        let mut workers = Workers {
            control: ControlWorker {
                shared: shared.clone(),
                rx,
                rx_event,
                tx,
                tx_event,
            },
            inputs: Vec::new(),
            outputs: Vec::new(),
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
                Some(PortEnd::Input(fd)) => {
                    let (queue, event) = queues[rx].take().expect("counted above");
                    workers.inputs.push(InputPort {
                        port,
                        shared: shared.clone(),
                        queue,
                        event,
                        host: File::from(fd),
                    });
                }
                Some(PortEnd::Output(fd)) => {
                    let (queue, event) = queues[rx + 1].take().expect("counted above");
                    workers.outputs.push(OutputPort {
                        port,
                        shared: shared.clone(),
                        queue,
                        event,
                        host: Some(File::from(fd)),
                    });
                }
            }
        }
        Ok(workers)
    }
}

/// What the threads of one activation serve: the control queues, and one data queue per
/// port that still has its host end.
struct Workers {
    control: ControlWorker,
    inputs: Vec<InputPort>,
    outputs: Vec<OutputPort>,
}

impl Drop for VirtioConsole {
    fn drop(&mut self) {
        self.stop_workers();
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
        let workers = self.workers(activation)?;
        self.stop_workers();
        let spawn_err = |source| ActivateError::Spawn {
            device: "virtio-console",
            source,
        };
        let mut spawn = |name: String, work: Box<dyn FnOnce(EventFd) + Send>| {
            let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn_err)?;
            let thread_stop = stop.try_clone().map_err(spawn_err)?;
            let handle = seccomp::spawn(ThreadRole::DeviceIo, name, move || work(thread_stop))
                .map_err(|source| ActivateError::Thread {
                    device: "virtio-console",
                    source,
                })?;
            self.workers.push((stop, handle));
            Ok::<(), ActivateError>(())
        };
        let control = workers.control;
        spawn(
            "virtio-console-control".to_owned(),
            Box::new(move |stop| control.run(&stop)),
        )?;
        for input in workers.inputs {
            spawn(
                format!("virtio-console-in{}", input.port),
                Box::new(move |stop| input.run(&stop)),
            )?;
        }
        for output in workers.outputs {
            spawn(
                format!("virtio-console-out{}", output.port),
                Box::new(move |stop| output.run(&stop)),
            )?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
    }
}

/// Why a thread woke up.
#[derive(PartialEq)]
enum Wake {
    Stop,
    /// The descriptor at this index in the list passed to `wait`.
    Ready(usize),
}

/// Sleeps until `stop` or one of `fds` is readable (or hung up).
fn wait(stop: &EventFd, fds: &[RawFd]) -> io::Result<Wake> {
    let mut pollfds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
        .chain(fds.iter().copied())
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pollfds` is a valid array of pollfd structs that outlives the call.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if pollfds[0].revents != 0 {
            return Ok(Wake::Stop);
        }
        if let Some(i) = pollfds[1..].iter().position(|p| p.revents != 0) {
            return Ok(Wake::Ready(i));
        }
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

struct ControlWorker {
    shared: Arc<Shared>,
    /// Device to driver: the driver posts empty buffers, we fill them with messages.
    rx: Queue,
    /// The driver posted more buffers: messages waiting in the outbox can go.
    rx_event: EventFd,
    /// Driver to device.
    tx: Queue,
    tx_event: EventFd,
}

impl ControlWorker {
    fn run(mut self, stop: &EventFd) {
        loop {
            let _ = self.tx_event.read();
            let _ = self.rx_event.read();
            let _ = self.shared.control_wake.read();
            if let Err(e) = self.serve() {
                tracing::warn!(error = %e, "virtio-console: control queue broken");
                return;
            }
            match wait(
                stop,
                &[
                    self.tx_event.as_raw_fd(),
                    self.rx_event.as_raw_fd(),
                    self.shared.control_wake.as_raw_fd(),
                ],
            ) {
                Ok(Wake::Ready(_)) => {}
                Ok(Wake::Stop) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-console: cannot wait for the driver");
                    return;
                }
            }
        }
    }

    /// Reads the driver's messages, then sends what is in the outbox while there are
    /// buffers for it.
    fn serve(&mut self) -> Result<(), virtio_queue::Error> {
        let memory = &self.shared.memory;
        let mut used_tx = false;
        while let Some(chain) = pop_chain(&mut self.tx, memory)? {
            let head = chain.head_index();
            if let Some(message) = read_chain(memory, chain)
                && let Some(port) = lock(&self.shared.control).handle(&message)
            {
                let _ = self.shared.opened[port].write(1);
            }
            used_tx |= add_used(&mut self.tx, memory, head, 0);
        }
        let mut used_rx = false;
        let mut control = lock(&self.shared.control);
        while !control.outbox.is_empty() {
            let Some(chain) = pop_chain(&mut self.rx, memory)? else {
                break;
            };
            let head = chain.head_index();
            let message = control.outbox.pop_front().expect("not empty");
            let written = write_chain(memory, chain, &message);
            if written < message.len() {
                tracing::warn!("virtio-console: control buffer too small, message dropped");
            }
            used_rx |= add_used(&mut self.rx, memory, head, written);
        }
        drop(control);
        if (used_tx && self.tx.needs_notification(memory)?)
            || (used_rx && self.rx.needs_notification(memory)?)
        {
            self.shared.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

/// Host to guest.
struct InputPort {
    port: usize,
    shared: Arc<Shared>,
    queue: Queue,
    event: EventFd,
    host: File,
}

impl InputPort {
    fn run(mut self, stop: &EventFd) {
        // Nothing before the guest opens the port: the driver would throw it away.
        while !self.shared.guest_open(self.port) {
            match wait(stop, &[self.shared.opened[self.port].as_raw_fd()]) {
                Ok(Wake::Ready(_)) => {
                    let _ = self.shared.opened[self.port].read();
                }
                _ => return,
            }
        }
        let mut chunk = vec![0u8; INPUT_CHUNK];
        loop {
            match wait(stop, &[self.host.as_raw_fd()]) {
                Ok(Wake::Ready(_)) => {}
                Ok(Wake::Stop) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-console: cannot wait for input");
                    return;
                }
            }
            let n = match self.host.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-console: reading input failed");
                    break;
                }
            };
            if !self.deliver(&chunk[..n], stop) {
                return;
            }
        }
        self.shared.close_host_side(self.port);
    }

    /// Puts `data` into the guest's buffers, waiting for buffers as needed; one
    /// interrupt per batch of buffers filled, not per buffer. Returns false when told to
    /// stop (or the queue broke) first.
    fn deliver(&mut self, mut data: &[u8], stop: &EventFd) -> bool {
        let memory = &self.shared.memory;
        while !data.is_empty() {
            let _ = self.event.read();
            let mut used = false;
            while !data.is_empty() {
                let chain = match pop_chain(&mut self.queue, memory) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-console: input queue broken");
                        return false;
                    }
                };
                let head = chain.head_index();
                let written = write_chain(memory, chain, data);
                data = &data[written..];
                used |= add_used(&mut self.queue, memory, head, written);
            }
            if used {
                match self.queue.needs_notification(memory) {
                    Ok(true) => self.shared.interrupt.signal_used_queue(),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "virtio-console: input queue broken");
                        return false;
                    }
                }
            }
            if data.is_empty() {
                break;
            }
            // Out of buffers: ask to be notified, and look again (the driver may have
            // posted some in between) before sleeping.
            match self.queue.enable_notification(memory) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-console: input queue broken");
                    return false;
                }
            }
            match wait(stop, &[self.event.as_raw_fd()]) {
                Ok(Wake::Ready(_)) => continue,
                _ => return false,
            }
        }
        true
    }
}

/// Guest to host.
struct OutputPort {
    port: usize,
    shared: Arc<Shared>,
    queue: Queue,
    event: EventFd,
    /// `None` once the host side broke: later output is taken and dropped.
    host: Option<File>,
}

impl OutputPort {
    fn run(mut self, stop: &EventFd) {
        loop {
            let _ = self.event.read();
            if let Err(e) = self.drain() {
                tracing::warn!(error = %e, "virtio-console: output queue broken");
                return;
            }
            match wait(stop, &[self.event.as_raw_fd()]) {
                Ok(Wake::Ready(_)) => {}
                Ok(Wake::Stop) => {
                    // What the guest wrote before it stopped still goes out.
                    let _ = self.drain();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-console: cannot wait for output");
                    return;
                }
            }
        }
    }

    fn drain(&mut self) -> Result<(), virtio_queue::Error> {
        let memory = &self.shared.memory;
        loop {
            self.queue.disable_notification(memory)?;
            let mut used = false;
            while let Some(chain) = pop_chain(&mut self.queue, memory)? {
                let head = chain.head_index();
                // The host write happens before the buffer goes back, so a full host pipe
                // holds the guest's writer back (flow control), as a local pipe would.
                if let Some(bytes) = read_chain(memory, chain)
                    && let Some(host) = &mut self.host
                    && let Err(e) = host.write_all(&bytes)
                {
                    if e.kind() != io::ErrorKind::BrokenPipe {
                        tracing::warn!(error = %e, "virtio-console: writing output failed");
                    }
                    self.host = None;
                    self.shared.close_host_side(self.port);
                }
                used |= add_used(&mut self.queue, memory, head, 0);
            }
            if used && self.queue.needs_notification(memory)? {
                self.shared.interrupt.signal_used_queue();
            }
            if !self.queue.enable_notification(memory)? {
                return Ok(());
            }
        }
    }
}

#[cfg(feature = "fuzzing")]
#[path = "console_fuzzing.rs"]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Runs `f` on a thread; a worker that spins instead of giving up on a broken queue
    /// fails the test rather than hanging it.
    fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the worker spins on a broken queue")
    }

    #[test]
    fn a_driver_claiming_more_buffers_than_a_queue_holds_breaks_the_queue() {
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = Arc::new(Shared {
            memory: memory.clone(),
            interrupt: Arc::new(Interrupt::new(eventfd())),
            control: Mutex::new(control(1)),
            control_wake: eventfd(),
            opened: vec![eventfd()],
        });
        // Each queue holds 16 chains; the driver's available index says 1000 are waiting,
        // so none can be taken, and "is there more?" is always yes.
        let overfull = |base: u64| {
            let mock = MockSplitQueue::create(&memory, GuestAddress(base), 16);
            mock.avail().idx().store(1000);
            mock.create_queue::<Queue>().unwrap()
        };
        let null = || File::options().write(true).open("/dev/null").unwrap();

        let mut output = OutputPort {
            port: 0,
            shared: shared.clone(),
            queue: overfull(0),
            event: eventfd(),
            host: Some(null()),
        };
        assert!(within_seconds(move || output.drain().is_err()));

        let mut input = InputPort {
            port: 0,
            shared: shared.clone(),
            queue: overfull(0x1_0000),
            event: eventfd(),
            host: null(),
        };
        let stop = eventfd();
        stop.write(1).unwrap();
        assert!(!within_seconds(move || input.deliver(b"data", &stop)));

        // Control: messages wait to go out, but neither queue can be served.
        lock(&shared.control).handle(&control_message(0, event::DEVICE_READY, 1, &[]));
        let mut control = ControlWorker {
            shared,
            rx: overfull(0x2_0000),
            rx_event: eventfd(),
            tx: overfull(0x3_0000),
            tx_event: eventfd(),
        };
        assert!(within_seconds(move || control.serve().is_err()));
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
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut port = OutputPort {
            port: 0,
            shared: Arc::new(Shared {
                memory: memory.clone(),
                interrupt: Arc::new(Interrupt::new(eventfd())),
                control: Mutex::new(control(1)),
                control_wake: eventfd(),
                opened: vec![eventfd()],
            }),
            queue: mock.create_queue().unwrap(),
            event: eventfd(),
            host: Some(out.try_clone().unwrap()),
        };
        port.drain().unwrap();
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
