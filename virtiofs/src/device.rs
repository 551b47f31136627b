//! The virtio-fs device (virtio ID 26): one high-priority queue plus request queues, each
//! served on its own thread straight out of guest memory by the shared FUSE server.

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use tvix_boot_devices::event_loop::{EventOps, EventSet, Events, MutEventSubscriber};
use tvix_boot_devices::virtio::{
    ActivateError, Activation, Interrupt, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, pop_chain,
};
use tvix_boot_seccomp::{self as seccomp, RoleThread, ThreadRole};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::fs::StoreFs;

const VIRTIO_ID_FS: u32 = 26;
/// Each queue holds this many descriptors; big enough for 1 MiB reads in 4 KiB pages.
pub const QUEUE_SIZE: u16 = 1024;
const TAG_LEN: usize = 36;

/// Why a virtio-fs device could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The tag is what the guest mounts by: 1 to 36 bytes.
    #[error("virtio-fs tag {0:?} must be 1 to {TAG_LEN} bytes")]
    BadTag(String),
    /// Zero request queues were asked for.
    #[error("virtio-fs needs at least one request queue")]
    NoRequestQueues,
}

/// The in-process virtio-fs device: a [`VirtioDevice`] serving a [`StoreFs`], to put on a
/// virtio-mmio transport. Each queue gets a thread when the driver activates the device
/// (or, with [`QueueService::EventLoop`], all are served on the VM's event loop).
pub struct VirtioFs {
    config: [u8; TAG_LEN + 4],
    request_queues: u16,
    server: Arc<Server<StoreFs>>,
    service: QueueService,
    workers: Vec<(EventFd, RoleThread<()>)>,
    /// Stops the event-loop subscriber of the current activation.
    subscriber_stop: Option<EventFd>,
    requests: RequestCounters,
}

/// Where the queues are served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueService {
    /// A thread per queue, woken by the queue's ioeventfd: requests on different queues
    /// run in parallel, and a request that waits for the store (a cold disk, a binary
    /// cache) holds up only its own queue.
    #[default]
    Threads,
    /// Every queue on the VM's event loop thread, beside the consoles: no threads of the
    /// device's own. Kept to measure the two against each other.
    EventLoop,
}

/// How many requests each queue has answered (queue 0 is the high-priority queue): how
/// one sees that the guest spreads its I/O over the request queues.
#[derive(Clone, Debug)]
pub struct RequestCounters(Arc<[AtomicU64]>);

impl RequestCounters {
    pub(crate) fn new(queues: usize) -> Self {
        Self((0..queues).map(|_| AtomicU64::new(0)).collect())
    }

    pub(crate) fn add(&self, queue: usize, requests: u64) {
        if let Some(counter) = self.0.get(queue) {
            counter.fetch_add(requests, Ordering::Relaxed);
        }
    }

    /// The counts so far, indexed by queue.
    pub fn snapshot(&self) -> Vec<u64> {
        self.0.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

/// `hiprio 0, q1 812, q2 433`
impl fmt::Display for RequestCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (queue, count) in self.snapshot().into_iter().enumerate() {
            match queue {
                0 => write!(f, "hiprio {count}")?,
                n => write!(f, ", q{n} {count}")?,
            }
        }
        Ok(())
    }
}

impl VirtioFs {
    /// A device with tag `tag` (the guest mounts it by that name) and `request_queues`
    /// request queues besides the high-priority queue; one per vCPU serves well.
    pub fn new(fs: StoreFs, tag: &str, request_queues: u16) -> Result<Self, DeviceError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(DeviceError::BadTag(tag.to_owned()));
        }
        if request_queues == 0 {
            return Err(DeviceError::NoRequestQueues);
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&u32::from(request_queues).to_le_bytes());
        Ok(Self {
            config,
            request_queues,
            server: Arc::new(Server::new(fs)),
            service: QueueService::Threads,
            workers: Vec::new(),
            subscriber_stop: None,
            requests: RequestCounters::new(1 + usize::from(request_queues)),
        })
    }

    /// Where the queues are served; threads unless said otherwise.
    pub fn with_queue_service(mut self, service: QueueService) -> Self {
        self.service = service;
        self
    }

    /// Requests answered per queue since the device was created.
    pub fn requests_per_queue(&self) -> Vec<u64> {
        self.requests.snapshot()
    }

    fn stop_workers(&mut self) {
        if let Some(stop) = self.subscriber_stop.take() {
            let _ = stop.write(1);
        }
        if self.workers.is_empty() {
            return;
        }
        for (stop, worker) in self.workers.drain(..) {
            let _ = stop.write(1);
            if worker.join().is_none() {
                tracing::warn!("virtio-fs queue worker panicked");
            }
        }
        tracing::info!("virtio-fs requests per queue: {}", self.requests);
    }
}

impl Drop for VirtioFs {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 1 + self.request_queues as usize]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.config.len());
        let available = &self.config[start..];
        let n = available.len().min(data.len());
        data[..n].copy_from_slice(&available[..n]);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let expected = 1 + self.request_queues as usize;
        if activation.queues.len() != expected {
            return Err(ActivateError::QueueCount {
                device: "virtio-fs",
                expected,
                actual: activation.queues.len(),
            });
        }
        self.stop_workers();
        let spawn_err = |source| ActivateError::Spawn {
            device: "virtio-fs",
            source,
        };
        if self.service == QueueService::EventLoop {
            let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn_err)?;
            let workers = activation
                .queues
                .into_iter()
                .enumerate()
                .map(|(index, (queue, notify))| {
                    Ok(QueueWorker {
                        memory: activation.memory.clone(),
                        queue,
                        notify,
                        stop: stop.try_clone()?,
                        interrupt: activation.interrupt.clone(),
                        server: self.server.clone(),
                        requests: self.requests.clone(),
                        index,
                    })
                })
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(spawn_err)?;
            activation
                .event_loop
                .add(Box::new(QueueSubscriber {
                    workers,
                    stop: stop.try_clone().map_err(spawn_err)?,
                }))
                .map_err(|source| ActivateError::EventLoop {
                    device: "virtio-fs",
                    source,
                })?;
            self.subscriber_stop = Some(stop);
            return Ok(());
        }
        for (index, (queue, notify)) in activation.queues.into_iter().enumerate() {
            let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn_err)?;
            let worker = QueueWorker {
                memory: activation.memory.clone(),
                queue,
                notify,
                stop: stop.try_clone().map_err(spawn_err)?,
                interrupt: activation.interrupt.clone(),
                server: self.server.clone(),
                requests: self.requests.clone(),
                index,
            };
            let name = if index == 0 {
                "virtio-fs-hiprio".to_owned()
            } else {
                format!("virtio-fs-q{index}")
            };
            let handle =
                seccomp::spawn(ThreadRole::VirtioFs, name, move || worker.run()).map_err(|e| {
                    ActivateError::Thread {
                        device: "virtio-fs",
                        source: std::io::Error::other(e),
                    }
                })?;
            self.workers.push((stop, handle));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
    }
}

/// Serves one queue until told to stop.
pub(crate) struct QueueWorker {
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) queue: Queue,
    pub(crate) notify: EventFd,
    pub(crate) stop: EventFd,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) server: Arc<Server<StoreFs>>,
    pub(crate) requests: RequestCounters,
    /// This queue's index (0: high priority).
    pub(crate) index: usize,
}

impl QueueWorker {
    fn run(mut self) {
        loop {
            // Serve what is there before sleeping: the driver may have queued requests
            // before this thread started.
            if let Err(e) = self.process_queue() {
                tracing::warn!(error = %e, "virtio-fs: queue broken, no longer served");
                return;
            }
            match wait_for(&self.notify, &self.stop) {
                Ok(Wake::Notified) => {
                    let _ = self.notify.read();
                }
                Ok(Wake::Stop) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-fs: cannot wait for notifications");
                    return;
                }
            }
        }
    }

    /// Answer every available request, then tell the driver if it wants to know.
    pub(crate) fn process_queue(&mut self) -> Result<(), virtio_queue::Error> {
        let served = serve_available_requests(&mut self.queue, &self.memory, &self.server)?;
        self.requests.add(self.index, served.requests);
        if served.notify {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }
}

/// Every queue of one activation on the VM's event loop ([`QueueService::EventLoop`]).
struct QueueSubscriber {
    workers: Vec<QueueWorker>,
    stop: EventFd,
}

/// The token of the stop eventfd; queue `i` has token `i`.
const STOP_TOKEN: u32 = u32::MAX;

impl MutEventSubscriber for QueueSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        let watches = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.notify.as_raw_fd(), i as u32))
            .chain([(self.stop.as_raw_fd(), STOP_TOKEN)]);
        for (fd, token) in watches {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::warn!("virtio-fs: cannot watch a queue: {e}");
            }
        }
        // The driver may have queued requests before the loop took the device over.
        for i in 0..self.workers.len() {
            self.serve(i, ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == STOP_TOKEN {
            for worker in &self.workers {
                let _ = ops.remove(Events::new(&worker.notify, EventSet::IN));
            }
            let _ = ops.remove(Events::new(&self.stop, EventSet::IN));
            self.workers.clear();
            return;
        }
        let index = events.data() as usize;
        if let Some(worker) = self.workers.get(index) {
            let _ = worker.notify.read();
            self.serve(index, ops);
        }
    }
}

impl QueueSubscriber {
    fn serve(&mut self, index: usize, ops: &mut EventOps) {
        let Some(worker) = self.workers.get_mut(index) else {
            return;
        };
        if let Err(e) = worker.process_queue() {
            tracing::warn!(error = %e, "virtio-fs: queue broken, no longer served");
            let _ = ops.remove(Events::new(&worker.notify, EventSet::IN));
        }
    }
}

/// What one pass over a queue did.
pub(crate) struct Served {
    /// Descriptor chains answered.
    pub(crate) requests: u64,
    /// The driver asked to be told (an interrupt or a call eventfd, the transport's
    /// business).
    pub(crate) notify: bool,
}

/// Answers every request the driver has made available on `queue`, reading and writing
/// `memory` in place; the part of a request queue that the in-process device and the
/// vhost-user-fs backend share.
pub(crate) fn serve_available_requests(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    server: &Server<StoreFs>,
) -> Result<Served, virtio_queue::Error> {
    let mut requests = 0;
    loop {
        queue.disable_notification(memory)?;
        while let Some(chain) = pop_chain(queue, memory)? {
            let head = chain.head_index();
            let written = handle_chain(memory, server, chain);
            // A head index the driver put out of range cannot be returned; the chain is
            // dropped and the queue goes on.
            match queue.add_used(memory, head, written) {
                Ok(()) => requests += 1,
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {
                    tracing::warn!(head, "virtio-fs: chain with an invalid head index dropped");
                }
                Err(e) => return Err(e),
            }
        }
        // Re-enabling tells us whether the driver added more while notifications were off.
        if !queue.enable_notification(memory)? {
            break;
        }
    }
    let notify = requests > 0 && queue.needs_notification(memory)?;
    Ok(Served { requests, notify })
}

/// Returns how many bytes were written into the chain. A chain that does not describe
/// valid guest memory gets nothing written and is returned as used with length 0, so the
/// driver never waits forever.
fn handle_chain(
    memory: &GuestMemoryMmap,
    server: &Server<StoreFs>,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let reader = Reader::from_descriptor_chain(memory, chain.clone());
    let writer = VirtioFsWriter::new(memory, chain);
    let (reader, writer) = match (reader, writer) {
        (Ok(reader), Ok(writer)) => (reader, writer),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "virtio-fs: malformed descriptor chain dropped");
            return 0;
        }
    };
    match server.handle_message(reader, writer.into(), None, None) {
        Ok(written) => u32::try_from(written).unwrap_or(u32::MAX),
        Err(e) => {
            tracing::debug!(error = %e, "virtio-fs: request failed");
            0
        }
    }
}

enum Wake {
    Notified,
    Stop,
}

fn wait_for(notify: &EventFd, stop: &EventFd) -> std::io::Result<Wake> {
    let mut fds = [
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: notify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            return Ok(Wake::Stop);
        }
        if fds[1].revents != 0 {
            return Ok(Wake::Notified);
        }
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
