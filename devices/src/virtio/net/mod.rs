//! virtio-net: an Ethernet interface for the guest whose frames go to a host
//! [`Backend`] (passt on a stream socket, or a tap device), served on the VM's event
//! loop.
//!
//! - this file: [`VirtioNet`], the device as the transport sees it (features, the
//!   configuration space, activation);
//! - `backend.rs`: the host side and its framing;
//! - `active.rs`: one activation's subscriber, moving frames between the queues and the
//!   backend.
//!
//! No offloads are offered (checksum, segmentation): every frame is a plain Ethernet
//! frame on both sides, which is what passt's stream protocol and a tap without a
//! virtio-net header carry. Large frames come from the MTU instead (passt's is 65,520):
//! the device offers it (VIRTIO_NET_F_MTU), and Linux then posts receive buffers big
//! enough for such frames.

mod active;
mod backend;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

pub use backend::{Backend, BackendError, MAX_FRAME_LEN};

use self::active::ActiveNet;
use crate::virtio::{
    ActivateError, Activation, LoopActivation, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, read_config_space,
};

/// How errors name this device.
const DEVICE_NAME: &str = "virtio-net";

const VIRTIO_ID_NET: u32 = 1;
/// The device reports the MTU in its configuration space.
const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// The device has a MAC address in its configuration space.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The configuration space's status field says whether the link is up.
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// `struct virtio_net_hdr_v1`, which precedes every frame in both queues once
/// VIRTIO_F_VERSION_1 is agreed (virtio 1.2, 5.1.6).
pub(crate) const VIRTIO_NET_HDR_LEN: usize = 12;
/// Status values: VIRTIO_NET_S_LINK_UP, or nothing.
const LINK_UP: u16 = 1;
pub(crate) const LINK_DOWN: u16 = 0;

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;

/// The MAC address a guest gets unless told otherwise (QEMU's default, which passt
/// and users know).
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Largest MTU the device offers: the largest frame less its Ethernet header.
pub const MAX_MTU: u16 = 65_520;

/// Why a network device could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MTU is outside what an Ethernet frame of [`MAX_FRAME_LEN`] can carry.
    #[error("MTU {0} is out of range (68 to {MAX_MTU})")]
    Mtu(u16),
}

/// The virtio-net device: a [`VirtioDevice`] to put on a
/// [`MmioTransport`](crate::virtio::mmio::MmioTransport).
pub struct VirtioNet {
    mac: [u8; 6],
    mtu: u16,
    /// Kept across driver resets: a reactivated driver goes on with the same host side.
    backend: Arc<Mutex<Backend>>,
    /// The configuration space's status field; the activation takes the link down when
    /// the backend goes away.
    status: Arc<AtomicU16>,
    /// The current activation's subscriber on the event loop.
    activation: LoopActivation,
}

impl VirtioNet {
    /// A network interface with address `mac` and MTU `mtu` whose frames go to
    /// `backend`. The MTU is what the guest's driver uses; it must match what the
    /// backend carries (passt: up to 65,520; a tap: its own MTU).
    pub fn new(backend: Backend, mac: [u8; 6], mtu: u16) -> Result<Self, NetError> {
        if !(68..=MAX_MTU).contains(&mtu) {
            return Err(NetError::Mtu(mtu));
        }
        Ok(Self {
            mac,
            mtu,
            backend: Arc::new(Mutex::new(backend)),
            status: Arc::new(AtomicU16::new(LINK_UP)),
            activation: LoopActivation::default(),
        })
    }

    /// The work of one activation, not yet handed to the event loop.
    fn take_activation(&mut self, activation: Activation) -> Result<ActiveNet, ActivateError> {
        if activation.queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                device: DEVICE_NAME,
                expected: 2,
                actual: activation.queues.len(),
            });
        }
        let spawn_error = |source| ActivateError::Spawn {
            device: DEVICE_NAME,
            source,
        };
        let mut queues = activation.queues.into_iter();
        let rx = queues.next().expect("counted above");
        let tx = queues.next().expect("counted above");
        debug_assert_eq!((RX_QUEUE, TX_QUEUE), (0, 1));
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn_error)?;
        ActiveNet::new(
            activation.memory,
            activation.interrupt,
            rx,
            tx,
            self.backend.clone(),
            self.status.clone(),
            stop,
        )
        .map_err(spawn_error)
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    /// Indirect descriptors: Linux's receive buffers for large frames are chains of 17
    /// pages; with an indirect table each takes one ring slot instead of 17.
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MTU
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    /// `struct virtio_net_config`: mac, status, max_virtqueue_pairs, mtu.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&self.status.load(Ordering::SeqCst).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        read_config_space(&config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let event_loop = activation.event_loop.clone();
        let active = self.take_activation(activation)?;
        let stop = active.stop.try_clone();
        self.activation
            .start(DEVICE_NAME, &event_loop, stop, Box::new(active))
    }

    fn reset(&mut self) {
        self.activation.stop();
    }
}

#[cfg(test)]
mod tests;
