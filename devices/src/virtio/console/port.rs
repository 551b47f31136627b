//! A port's two ends: [`PortSpec`] and [`PortEnd`], how a port is configured, and
//! [`InputPort`] and [`OutputPort`], which move its bytes between the host descriptor and
//! the port's data queue during one activation.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::ConsoleError;
use super::control::Control;
use super::queue::{Context, add_used, fill_buffers, read_chain};
use crate::event_loop::{EventOps, HostFd, PendingOutput, Watch};
use crate::virtio::pop_chain;

/// Host reads for an input port: a few guest buffers' worth at a time.
const INPUT_CHUNK: usize = 64 << 10;

/// Longest port name (the driver allocates what we send; keep it small).
pub(super) const MAX_NAME_LEN: usize = 64;

/// Which way a port carries bytes, and the host end.
pub enum PortEnd {
    /// Host to guest: bytes read from this descriptor until end of file.
    Input(OwnedFd),
    /// Guest to host: bytes written to this descriptor.
    Output(OwnedFd),
}

/// A port as configured: its name and host end.
pub struct PortSpec {
    pub(super) name: String,
    pub(super) end: PortEnd,
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

/// A port's host descriptor during one activation, and its registration with the loop.
pub(super) struct HostSide {
    /// `None` once the stream is over: end of input, or the output's reader went away.
    open: Option<HostFd>,
    /// The descriptor after that, kept open until it is no longer watched: the loop knows
    /// descriptors by number, and a closed number may come back for another one.
    retired: Option<HostFd>,
    watch: Watch,
}

impl HostSide {
    /// `host`, whose readiness for `events` comes with `token`; not watched yet.
    fn new(host: HostFd, token: u32, events: EventSet) -> Self {
        Self {
            watch: Watch::new(&host, token, events),
            open: Some(host),
            retired: None,
        }
    }

    /// Open, and the loop can wait on it (else it is always ready, or over).
    fn pollable(&self) -> bool {
        self.open.as_ref().is_some_and(HostFd::pollable)
    }

    /// The stream is over: the descriptor is retired and the driver hears that the host
    /// side of `port` closed.
    pub(super) fn close(&mut self, control: &mut Control, port: usize) {
        self.retired = self.open.take();
        control.close_host_side(port);
    }

    /// Registers the descriptor with the loop or not, to match `on`; a retired one is
    /// closed once it is not.
    pub(super) fn watch(&mut self, ops: &mut EventOps, on: bool) {
        self.watch.set(ops, on);
        if !self.watch.is_on() {
            self.retired = None;
        }
    }
}

/// Host to guest.
pub(super) struct InputPort {
    pub(super) port: usize,
    pub(super) queue: Queue,
    /// The driver's notifications on `queue`.
    pub(super) event: EventFd,
    pub(super) host: HostSide,
    /// Bytes read from the host; `chunk[start..end]` are not in the guest yet.
    chunk: Vec<u8>,
    start: usize,
    end: usize,
    broken: bool,
}

impl InputPort {
    /// Port `port`, reading `host` into `queue`; readiness of `host` comes with `token`.
    pub(super) fn new(port: usize, queue: Queue, event: EventFd, host: HostFd, token: u32) -> Self {
        Self {
            port,
            queue,
            event,
            host: HostSide::new(host, token, EventSet::IN),
            chunk: vec![0; INPUT_CHUNK],
            start: 0,
            end: 0,
            broken: false,
        }
    }

    pub(super) fn waits_for_host(&self, control: &Control) -> bool {
        control.guest_open(self.port)
            && !self.broken
            && self.start == self.end
            && self.host.pollable()
    }

    /// Moves input along: what was read into the guest's buffers, then more from the
    /// host while the guest has buffers for it. `readable`: epoll said the host end is.
    /// Nothing moves before the guest opens the port: the driver would drop it.
    pub(super) fn pump(&mut self, ctx: &mut Context, mut readable: bool) {
        if self.broken || !ctx.control.guest_open(self.port) {
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
            let Some(host) = &self.host.open else {
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
        self.host.close(&mut ctx.control, self.port);
    }
}

/// Guest to host.
pub(super) struct OutputPort {
    pub(super) port: usize,
    pub(super) queue: Queue,
    /// The driver's notifications on `queue`.
    pub(super) event: EventFd,
    /// Once its stream is over, later output is taken and dropped.
    pub(super) host: HostSide,
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
    /// Port `port`, writing `queue` to `host`; readiness of `host` comes with `token`.
    pub(super) fn new(port: usize, queue: Queue, event: EventFd, host: HostFd, token: u32) -> Self {
        Self {
            port,
            queue,
            event,
            host: HostSide::new(host, token, EventSet::OUT),
            pending: Vec::new(),
            start: 0,
            counted: None,
            broken: false,
        }
    }

    pub(super) fn waits_for_host(&self) -> bool {
        !self.broken && self.has_pending() && self.host.pollable()
    }

    fn has_pending(&self) -> bool {
        self.start < self.pending.len()
    }

    /// Writes out what is pending, then takes the guest's buffers and writes them out,
    /// until the guest has no more or the host takes no more.
    pub(super) fn drain(&mut self, ctx: &mut Context) {
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

    pub(super) fn drain_queue(&mut self, ctx: &mut Context) -> Result<(), virtio_queue::Error> {
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
            let Some(host) = &self.host.open else {
                self.pending.clear();
                self.start = 0;
                return;
            };
            match host.file().write(&self.pending[self.start..]) {
                Ok(0) => {
                    tracing::warn!("virtio-console: the host end takes no output");
                    self.host.close(control, self.port);
                }
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    if e.kind() != io::ErrorKind::BrokenPipe {
                        tracing::warn!(error = %e, "virtio-console: writing output failed");
                    }
                    self.host.close(control, self.port);
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

#[cfg(test)]
impl OutputPort {
    /// Port 0, writing `queue` to `host`.
    pub(super) fn for_test(queue: Queue, host: std::fs::File) -> Self {
        let host = HostFd::new(host.into(), true).unwrap();
        OutputPort::new(0, queue, EventFd::new(libc::EFD_NONBLOCK).unwrap(), host, 0)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;
    use crate::virtio::console::VirtioConsole;
    use crate::virtio::console::device::QUEUE_SIZE;
    use crate::virtio::{VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice};

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
        let mut ctx = Context::for_test(&memory, 1);
        let pending = ctx.pending_output.clone();
        let mut port = OutputPort::for_test(
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
        let mut port = OutputPort::for_test(mock.create_queue().unwrap(), out.try_clone().unwrap());
        port.drain_queue(&mut Context::for_test(&memory, 1))
            .unwrap();
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
