//! One activation of the network device on the VM's event loop: frames from the guest's
//! transmit queue to the backend, and from the backend into the guest's receive queue.
//!
//! Neither direction buffers more than one frame: a transmit buffer is taken from the
//! guest only when the backend has taken the previous frame, and the backend is read
//! only while the guest has receive buffers. A guest that floods holds itself back; a
//! host side that floods fills its own socket.

use std::fs::File;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Backend, BackendError, MAX_FRAME_LEN, MIN_FRAME_LEN};
use super::{LINK_DOWN, VIRTIO_NET_HDR_LEN};
use crate::event_loop::Watch;
use crate::virtio::{Interrupt, pop_chain};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Stop = 0,
    RxQueue = 1,
    TxQueue = 2,
    BackendReadable = 3,
    BackendWritable = 4,
}

impl Source {
    fn from_token(token: u32) -> Option<Self> {
        Some(match token {
            0 => Source::Stop,
            1 => Source::RxQueue,
            2 => Source::TxQueue,
            3 => Source::BackendReadable,
            4 => Source::BackendWritable,
            _ => return None,
        })
    }
}

/// What one activation serves.
pub(super) struct ActiveNet {
    pub(super) memory: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) rx: Queue,
    pub(super) rx_event: EventFd,
    pub(super) tx: Queue,
    pub(super) tx_event: EventFd,
    /// Shared with the device, which keeps it across driver resets.
    pub(super) backend: Arc<Mutex<Backend>>,
    /// The config space's status field, shared with the device.
    pub(super) status: Arc<AtomicU16>,
    pub(super) stop: EventFd,
    /// The backend's descriptor, watched for input while the guest has receive buffers.
    readable: Watch,
    /// A second descriptor of the backend, watched for room while a frame waits to go.
    writable: Watch,
    _writable_fd: File,
    /// The receive queue had no buffer for the frame that waits.
    rx_starved: bool,
    /// Where a transmit chain is gathered (one frame, reused).
    tx_frame: Vec<u8>,
    stopped: bool,
}

/// Why a queue pass stopped short.
#[derive(Debug, thiserror::Error)]
pub(super) enum PassError {
    #[error("the driver broke the queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl ActiveNet {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        memory: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        (rx, rx_event): (Queue, EventFd),
        (tx, tx_event): (Queue, EventFd),
        backend: Arc<Mutex<Backend>>,
        status: Arc<AtomicU16>,
        stop: EventFd,
    ) -> std::io::Result<Self> {
        let (readable, writable_fd) = {
            let guard = backend.lock().unwrap_or_else(|e| e.into_inner());
            (
                Watch::new(&*guard, Source::BackendReadable as u32, EventSet::IN),
                guard.try_clone_fd()?,
            )
        };
        Ok(Self {
            memory,
            interrupt,
            rx,
            rx_event,
            tx,
            tx_event,
            backend,
            status,
            stop,
            readable,
            writable: Watch::new(&writable_fd, Source::BackendWritable as u32, EventSet::OUT),
            _writable_fd: writable_fd,
            rx_starved: false,
            tx_frame: Vec::with_capacity(VIRTIO_NET_HDR_LEN + MAX_FRAME_LEN),
            stopped: false,
        })
    }

    fn link_up(&self) -> bool {
        self.status.load(Ordering::SeqCst) != LINK_DOWN
    }

    /// The backend is gone: the link goes down (the driver hears of it through a
    /// configuration interrupt) and what the guest sends from now on is dropped.
    fn backend_failed(&mut self, error: &BackendError) {
        if self.link_up() {
            tracing::warn!("virtio-net: {error}; the guest's link is down from now on");
            self.status.store(LINK_DOWN, Ordering::SeqCst);
            self.interrupt.signal_config_change();
        }
    }

    /// Guest frames out to the backend, while the backend takes them. When the backend
    /// fails, the rest of what the guest offered is taken and dropped, and the error
    /// returned.
    pub(super) fn transmit(&mut self) -> Result<(), PassError> {
        let memory = &self.memory;
        let mut backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        let mut failure = None;
        let mut link_up = self.status.load(Ordering::SeqCst) != LINK_DOWN;
        let mut used = false;
        loop {
            if link_up {
                match backend.flush() {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => {
                        failure = Some(e);
                        link_up = false;
                    }
                }
            }
            let Some(chain) = pop_chain(&mut self.tx, memory)? else {
                if self.tx.enable_notification(memory)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            self.tx_frame.clear();
            let mut complete = true;
            for desc in chain.readable() {
                let room = self.tx_frame.capacity() - self.tx_frame.len();
                let len = desc.len() as usize;
                if len > room {
                    complete = false;
                    break;
                }
                let start = self.tx_frame.len();
                self.tx_frame.resize(start + len, 0);
                if memory
                    .read_slice(&mut self.tx_frame[start..], desc.addr())
                    .is_err()
                {
                    complete = false;
                    break;
                }
            }
            // The virtio-net header (no offloads are offered: nothing in it to act on),
            // then the frame.
            if complete && self.tx_frame.len() >= VIRTIO_NET_HDR_LEN + MIN_FRAME_LEN {
                if link_up && let Err(e) = backend.send_frame(&self.tx_frame[VIRTIO_NET_HDR_LEN..])
                {
                    failure = Some(e);
                    link_up = false;
                }
            } else {
                tracing::debug!(
                    head,
                    bytes = self.tx_frame.len(),
                    "virtio-net: dropped a malformed transmit buffer"
                );
            }
            if let Err(e) = self.tx.add_used(memory, head, 0) {
                tracing::warn!(head, error = %e, "virtio-net: cannot return a buffer");
            }
            used = true;
        }
        if used && self.tx.needs_notification(memory)? {
            self.interrupt.signal_used_queue();
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Backend frames into the guest's receive buffers, while there are both.
    pub(super) fn receive(&mut self) -> Result<(), PassError> {
        let memory = &self.memory;
        let mut backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        let mut used = false;
        let result = loop {
            let frame = match backend.peek_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.into()),
            };
            let chain = match pop_chain(&mut self.rx, memory) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    match self.rx.enable_notification(memory) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => break Err(e.into()),
                    }
                    self.rx_starved = true;
                    break Ok(());
                }
                Err(e) => break Err(e.into()),
            };
            self.rx_starved = false;
            let head = chain.head_index();
            // The header: no flags, no offload, one buffer (num_buffers, the last field).
            let mut header = [0u8; VIRTIO_NET_HDR_LEN];
            header[VIRTIO_NET_HDR_LEN - 2..].copy_from_slice(&1u16.to_le_bytes());
            let mut pieces = [&header[..], frame];
            let total = VIRTIO_NET_HDR_LEN + frame.len();
            let mut written = 0usize;
            let mut fits = true;
            for desc in chain.writable() {
                let mut addr = desc.addr();
                let mut room = desc.len() as usize;
                for piece in pieces.iter_mut() {
                    if room == 0 {
                        break;
                    }
                    let n = piece.len().min(room);
                    if n == 0 {
                        continue;
                    }
                    if memory.write_slice(&piece[..n], addr).is_err() {
                        fits = false;
                        break;
                    }
                    *piece = &piece[n..];
                    written += n;
                    room -= n;
                    match addr.checked_add(n as u64) {
                        Some(next) => addr = next,
                        None if room == 0 => {}
                        None => {
                            fits = false;
                            break;
                        }
                    }
                }
                if !fits || written == total {
                    break;
                }
            }
            let len = if fits && written == total {
                total
            } else {
                tracing::debug!(
                    head,
                    frame = frame.len(),
                    "virtio-net: a receive buffer too small or outside memory; frame dropped"
                );
                0
            };
            backend.consume_frame();
            if let Err(e) = self.rx.add_used(memory, head, len as u32) {
                tracing::warn!(head, error = %e, "virtio-net: cannot return a buffer");
            }
            used = true;
        };
        if used {
            match self.rx.needs_notification(memory) {
                Ok(true) => self.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => return Err(e.into()),
            }
        }
        result
    }

    /// Serves both directions, then watches the backend for what now waits on it.
    fn serve(&mut self, ops: &mut EventOps) {
        if self.link_up()
            && let Err(e) = self.receive()
        {
            self.pass_failed(e);
        }
        if let Err(e) = self.transmit() {
            self.pass_failed(e);
        }
        let link_up = self.link_up();
        let pending_write = link_up
            && self
                .backend
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .has_pending_write();
        self.readable.set(ops, link_up && !self.rx_starved);
        self.writable.set(ops, pending_write);
    }

    pub(super) fn pass_failed(&mut self, error: PassError) {
        match error {
            PassError::Backend(e) => self.backend_failed(&e),
            // Nothing more is served until the driver resets the device.
            PassError::Queue(e) => {
                tracing::warn!("virtio-net: {e}; the device stops");
                self.stopped = true;
            }
        }
    }

    #[cfg(test)]
    pub(super) fn has_pending_write_for_test(&self) -> bool {
        self.backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .has_pending_write()
    }

    fn shut_down(&mut self, ops: &mut EventOps) {
        for (fd, _) in [(&self.stop, 0), (&self.rx_event, 1), (&self.tx_event, 2)] {
            let _ = ops.remove(Events::new(fd, EventSet::IN));
        }
        self.readable.set(ops, false);
        self.writable.set(ops, false);
        self.stopped = true;
    }
}

impl MutEventSubscriber for ActiveNet {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, source) in [
            (&self.stop, Source::Stop),
            (&self.rx_event, Source::RxQueue),
            (&self.tx_event, Source::TxQueue),
        ] {
            if let Err(e) = ops.add(Events::with_data(fd, source as u32, EventSet::IN)) {
                tracing::warn!(?source, "virtio-net: cannot watch a queue: {e}");
            }
        }
        self.serve(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match Source::from_token(events.data()) {
            Some(Source::Stop) => {
                self.shut_down(ops);
                return;
            }
            Some(Source::RxQueue) => {
                let _ = self.rx_event.read();
                self.rx_starved = false;
            }
            Some(Source::TxQueue) => {
                let _ = self.tx_event.read();
            }
            Some(Source::BackendReadable | Source::BackendWritable) | None => {}
        }
        if self.stopped {
            self.shut_down(ops);
            return;
        }
        self.serve(ops);
    }
}
