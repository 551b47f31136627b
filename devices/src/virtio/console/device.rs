//! The device as the transport sees it: features, configuration space and queue layout,
//! and each activation handed to the event loop as an [`ActiveConsole`].

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::ConsoleError;
use super::control::{Control, ControlQueues};
use super::event_handler::ActiveConsole;
use super::port::{PortEnd, PortSpec};
use super::queue::Context;
use crate::event_loop::HostFd;

use crate::virtio::{
    ActivateError, Activation, LoopActivation, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC,
    VirtioDevice, read_config_space,
};

/// How errors name this device.
const DEVICE_NAME: &str = "virtio-console";

const VIRTIO_ID_CONSOLE: u32 = 3;
/// The device has more than one port and a control queue pair (virtio 1.2, 5.3.3).
const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
pub(super) const QUEUE_SIZE: u16 = 256;
/// Queues 2 and 3 are the control receive (device to driver) and transmit queues.
pub(super) const CONTROL_RX: usize = 2;
pub(super) const CONTROL_TX: usize = 3;

/// The receive (device to driver) queue of port `port`; its transmit queue follows it.
pub(super) fn port_rx_queue(port: usize) -> usize {
    if port == 0 { 0 } else { 2 + 2 * port }
}

/// The virtio-console device: a [`VirtioDevice`] to put on a
/// [`MmioTransport`](crate::virtio::mmio::MmioTransport), its ports numbered in the order
/// given.
pub struct VirtioConsole {
    names: Vec<String>,
    /// Host ends, handed to the activation's subscriber (a reset-and-reactivate by the
    /// driver finds them gone: streams are not replayed).
    ends: Vec<Option<HostEnd>>,
    /// The current activation's subscriber on the event loop.
    activation: LoopActivation,
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
            activation: LoopActivation::default(),
        })
    }

    fn queue_count(&self) -> usize {
        2 + 2 * self.names.len()
    }

    /// The work of one activation, not yet handed to the event loop (the fuzz targets
    /// drive it on their own thread instead). Takes the ports' host ends.
    pub(super) fn take_activation(
        &mut self,
        activation: Activation,
    ) -> Result<ActiveConsole, ActivateError> {
        let expected = self.queue_count();
        if activation.queues.len() != expected {
            return Err(ActivateError::QueueCount {
                device: DEVICE_NAME,
                expected,
                actual: activation.queues.len(),
            });
        }
        let mut queues: Vec<Option<(Queue, EventFd)>> =
            activation.queues.into_iter().map(Some).collect();
        let rx = queues[CONTROL_RX].take().expect("counted above");
        let tx = queues[CONTROL_TX].take().expect("counted above");
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| ActivateError::Spawn {
            device: DEVICE_NAME,
            source,
        })?;
        let ctx = Context {
            memory: activation.memory,
            interrupt: activation.interrupt,
            control: Control::new(self.names.clone()),
            pending_output: activation.event_loop.pending_output(),
        };
        let mut active = ActiveConsole::new(ctx, ControlQueues::new(rx, tx), stop);
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
                    active.add_input(port, queue, event, host);
                }
                Some(HostEnd::Output(host)) => {
                    let (queue, event) = queues[rx + 1].take().expect("counted above");
                    active.add_output(port, queue, event, host);
                }
            }
        }
        Ok(active)
    }
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
mod tests {
    use std::fs::File;
    use std::os::fd::OwnedFd;

    use super::*;

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
}
