//! Virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] puts it on the MMIO bus,
//! negotiates features and queues with the guest driver, and once the driver says
//! DRIVER_OK hands the device its queues, on the VM's event-loop thread. The device then
//! serves each queue on its own terms (a thread per queue woken by the queue's notify
//! eventfd, or a subscriber of the event loop).

pub mod console;
pub mod mmio;
pub mod net;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{EventLoopError, EventLoopHandle};

/// Feature bits every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// The driver may chain descriptors through indirect tables (virtio 1.2, 2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Notifications are suppressed by ring indices instead of flags (virtio 1.2, 2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Why a device could not start serving its queues; the transport then reports
/// DEVICE_NEEDS_RESET to the driver.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum ActivateError {
    /// Setting up the workers failed (an eventfd, a host descriptor).
    #[error("cannot start the {device} device's queue workers: {source}")]
    Spawn {
        device: &'static str,
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start a {device} queue worker thread: {source}")]
    Thread {
        device: &'static str,
        source: std::io::Error,
    },
    /// The device's subscriber could not be handed to the VM's event loop.
    #[error("cannot hand the {device} device to the event loop: {source}")]
    EventLoop {
        device: &'static str,
        source: EventLoopError,
    },
    /// The driver enabled fewer or more queues than the device works with.
    #[error("the {device} device expects {expected} queues, the driver set up {actual}")]
    QueueCount {
        device: &'static str,
        expected: usize,
        actual: usize,
    },
}

/// The device's interrupt line as the guest sees it: the MMIO InterruptStatus register and
/// the irqfd that raises the IRQ.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised through `irqfd`, with no bits pending.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tell the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// Tell the driver that the device configuration changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!(error = %e, "cannot raise a virtio interrupt");
        }
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub(crate) fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// The next chain the driver offers on `queue`, `None` when it offers none.
///
/// `Queue::pop_descriptor_chain` also gives `None` when the queue cannot be served: the
/// driver's available index claims more chains than the queue holds, or the available
/// ring is unreadable. A worker that then asks `enable_notification` whether more is
/// offered hears yes, and spins forever on a queue the guest broke. Here those are errors,
/// and the queue is given up until the driver resets the device.
pub fn pop_chain<'m>(
    queue: &mut Queue,
    memory: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(memory)?.next())
}

/// What a device gets when the driver has set it up.
pub struct Activation {
    /// The guest's memory, where the queues and their buffers are.
    pub memory: GuestMemoryMmap,
    /// Features both sides agreed on.
    pub features: u64,
    /// The queues, ready, each with the eventfd the driver's notifications arrive on.
    pub queues: Vec<(Queue, EventFd)>,
    /// Raises the device's interrupt when used buffers or a configuration change wait.
    pub interrupt: Arc<Interrupt>,
    /// The VM's event loop, for devices whose host-side I/O runs there.
    pub event_loop: EventLoopHandle,
}

/// Copies `config`, a device's configuration space, from `offset` into `data`; what lies
/// past its end reads as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let n = (config.len() - start).min(data.len());
    data[..n].copy_from_slice(&config[start..start + n]);
    data[n..].fill(0);
}

/// The current activation of a device whose queues are served by a subscriber of the
/// VM's event loop: the subscriber stops when its stop eventfd is signalled, which
/// happens on a driver reset, on the next activation, and when the device is dropped.
#[derive(Default)]
pub struct LoopActivation {
    stop: Option<EventFd>,
}

impl LoopActivation {
    /// Stops the previous activation and hands `subscriber` to `event_loop`; `stop` is
    /// a duplicate of the eventfd the subscriber stops on (`try_clone` of it, so that the
    /// caller can take it before the subscriber moves).
    pub fn start(
        &mut self,
        device: &'static str,
        event_loop: &EventLoopHandle,
        stop: std::io::Result<EventFd>,
        subscriber: crate::event_loop::Subscriber,
    ) -> Result<(), ActivateError> {
        let stop = stop.map_err(|source| ActivateError::Spawn { device, source })?;
        self.stop();
        event_loop
            .add(subscriber)
            .map_err(|source| ActivateError::EventLoop { device, source })?;
        self.stop = Some(stop);
        Ok(())
    }

    /// Stops the current activation, if any.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
    }
}

impl Drop for LoopActivation {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A virtio device type, independent of the transport that puts it before the guest.
pub trait VirtioDevice: Send {
    /// The virtio device ID (26 for virtio-fs).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers; the driver acknowledges a subset.
    fn features(&self) -> u64;
    /// The largest size of each queue, one entry per queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Read device-specific configuration; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Start serving the queues (the driver set DRIVER_OK). Called on the VM's event-loop
    /// thread; threads started here inherit its seccomp filter. An error marks the device
    /// as needing a reset.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stop using the queues and guest memory (the driver reset the device).
    fn reset(&mut self);
}
