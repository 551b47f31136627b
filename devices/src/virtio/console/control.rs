//! The MULTIPORT control protocol (virtio 1.2, 5.3.6.2): what the driver tells the device
//! about its ports, what the device tells the driver, and the control queue pair that
//! carries both.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{Context, add_used, read_chain, write_chain};
use crate::virtio::pop_chain;

/// A control message: le32 port id, le16 event, le16 value (virtio 1.2, 5.3.6.2).
const CONTROL_LEN: usize = 8;

/// Control events (virtio 1.2, 5.3.6.2).
pub(super) mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const PORT_READY: u16 = 3;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
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
pub(super) struct Control {
    ports: Vec<PortState>,
    names: Vec<String>,
    /// Encoded messages waiting for a buffer on the control receive queue.
    outbox: VecDeque<Vec<u8>>,
}

/// A control message for port `id` (a PORT_NAME message's payload is the name).
pub(super) fn control_message(id: u32, event: u16, value: u16, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(CONTROL_LEN + payload.len());
    message.extend_from_slice(&id.to_le_bytes());
    message.extend_from_slice(&event.to_le_bytes());
    message.extend_from_slice(&value.to_le_bytes());
    message.extend_from_slice(payload);
    message
}

/// The port id, event, value and payload of a control message; `None` when it is
/// shorter than its header.
fn parse_control_message(message: &[u8]) -> Option<(u32, u16, u16, &[u8])> {
    let (header, payload) = message.split_first_chunk::<CONTROL_LEN>()?;
    let id = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let event = u16::from_le_bytes(header[4..6].try_into().expect("2 bytes"));
    let value = u16::from_le_bytes(header[6..8].try_into().expect("2 bytes"));
    Some((id, event, value, payload))
}

impl Control {
    /// Ports named `names`, numbered in that order, none of them set up yet.
    pub(super) fn new(names: Vec<String>) -> Self {
        Self {
            ports: names.iter().map(|_| PortState::default()).collect(),
            names,
            outbox: VecDeque::new(),
        }
    }

    /// The driver said the guest side of `port` is open; an unknown port is not.
    pub(super) fn guest_open(&self, port: usize) -> bool {
        self.ports.get(port).is_some_and(|p| p.guest_open)
    }

    /// Messages for the driver still waiting for a control receive buffer.
    pub(super) fn messages_waiting(&self) -> usize {
        self.outbox.len()
    }

    /// Handles one message from the driver; returns the port whose guest side it opened.
    pub(super) fn handle(&mut self, message: &[u8]) -> Option<usize> {
        let Some((id, event, value, _)) = parse_control_message(message) else {
            tracing::warn!(len = message.len(), "virtio-console: short control message");
            return None;
        };
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
    pub(super) fn close_host_side(&mut self, port: usize) {
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

/// The control queue pair of one activation.
pub(super) struct ControlQueues {
    /// Device to driver: the driver posts empty buffers, we fill them with messages.
    pub(super) rx: Queue,
    /// The driver posted more buffers: messages waiting in the outbox can go.
    pub(super) rx_event: EventFd,
    /// Driver to device.
    pub(super) tx: Queue,
    pub(super) tx_event: EventFd,
    /// A queue broke; nothing more is served on either.
    broken: bool,
}

impl ControlQueues {
    /// The control receive and transmit queues, each with its notify eventfd.
    pub(super) fn new(rx: (Queue, EventFd), tx: (Queue, EventFd)) -> Self {
        Self {
            rx: rx.0,
            rx_event: rx.1,
            tx: tx.0,
            tx_event: tx.1,
            broken: false,
        }
    }

    /// Reads the driver's messages, then sends what is in the outbox while there are
    /// buffers for it. Returns the ports the guest opened.
    pub(super) fn serve(&mut self, ctx: &mut Context) -> Result<Vec<usize>, virtio_queue::Error> {
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

#[cfg(test)]
impl Control {
    /// `ports` ports named `port0`, `port1`...
    pub(super) fn for_test(ports: usize) -> Self {
        Self::new((0..ports).map(|i| format!("port{i}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(message: &[u8]) -> (u32, u16, u16, Vec<u8>) {
        let (id, event, value, payload) = parse_control_message(message).unwrap();
        (id, event, value, payload.to_vec())
    }

    #[test]
    fn handshake_adds_names_and_opens_every_port() {
        let mut c = Control::for_test(2);
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
        let mut c = Control::for_test(1);
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
        let mut c = Control::for_test(1);
        c.handle(&control_message(0, event::PORT_READY, 1, &[]));
        c.outbox.clear();
        c.close_host_side(0);
        c.close_host_side(0);
        let sent: Vec<_> = c.outbox.drain(..).map(|m| decode(&m)).collect();
        assert_eq!(sent, vec![(0, event::PORT_OPEN, 0, vec![])]);
    }

    #[test]
    fn malformed_control_messages_are_ignored() {
        let mut c = Control::for_test(1);
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
}
