//! The console's queue work on the caller's thread, for the fuzz targets in `fuzz/`: each
//! call is one pass of what the device's event-loop subscriber does when woken, over the
//! same code, so a run is deterministic and needs no waiting. The subscriber adds only
//! epoll registration around these passes. Not an API: only built with the `fuzzing`
//! feature.

use virtio_queue::Queue;

use super::VirtioConsole;
use super::device::{CONTROL_RX, CONTROL_TX, port_rx_queue};
use super::event_handler::ActiveConsole;
use super::queue::fill_buffers;
use crate::virtio::{ActivateError, Activation};

/// A console's queues, served one pass at a time on the calling thread.
pub struct ConsoleQueues {
    active: ActiveConsole,
}

impl ConsoleQueues {
    /// The work `console.activate(activation)` would hand to the event loop.
    pub fn new(console: &mut VirtioConsole, activation: Activation) -> Result<Self, ActivateError> {
        Ok(Self {
            active: console.take_activation(activation)?,
        })
    }

    /// The control queues' pass: the driver's messages in, queued messages out.
    pub fn serve_control(&mut self) -> Result<(), virtio_queue::Error> {
        let active = &mut self.active;
        active.control.serve(&mut active.ctx).map(drop)
    }

    /// An output port's pass: what the guest wrote goes to the host end. `None` when
    /// `port` is not an output port.
    pub fn drain_output(&mut self, port: usize) -> Option<Result<(), virtio_queue::Error>> {
        let active = &mut self.active;
        let output = active.outputs.iter_mut().find(|o| o.port == port)?;
        Some(output.drain_queue(&mut active.ctx))
    }

    /// What an input port does with `data` read from its host end: into the guest's
    /// buffers, as far as they go. `None` when `port` is not an input port, or the guest
    /// has not opened it (the port would hold it back); `Some(false)` when the buffers
    /// ran out (the port would wait for more) or the queue broke.
    pub fn deliver_input(&mut self, port: usize, data: &[u8]) -> Option<bool> {
        let active = &mut self.active;
        let input = active.inputs.iter_mut().find(|i| i.port == port)?;
        if !active.ctx.control.guest_open(port) {
            return None;
        }
        Some(fill_buffers(&mut input.queue, &active.ctx, data).is_ok_and(|n| n == data.len()))
    }

    /// The host end of input port `port` reached end of file.
    pub fn end_input(&mut self, port: usize) {
        let active = &mut self.active;
        if let Some(input) = active.inputs.iter_mut().find(|i| i.port == port) {
            input.host.close(&mut active.ctx.control, port);
        }
    }

    /// The driver said the guest side of `port` is open.
    pub fn guest_open(&self, port: usize) -> bool {
        self.active.ctx.control.guest_open(port)
    }

    /// The device's own state of queue `index` (numbered as the transport numbers them):
    /// how far it has taken the available ring. `None` for a queue nothing serves (the
    /// unused direction of a port).
    pub fn queue(&self, index: usize) -> Option<&Queue> {
        let p = &self.active;
        match index {
            CONTROL_RX => Some(&p.control.rx),
            CONTROL_TX => Some(&p.control.tx),
            _ => {
                let port = index.saturating_sub(2) / 2;
                if index == port_rx_queue(port) {
                    p.inputs.iter().find(|i| i.port == port).map(|i| &i.queue)
                } else {
                    p.outputs.iter().find(|o| o.port == port).map(|o| &o.queue)
                }
            }
        }
    }

    /// Messages for the driver still waiting for a control receive buffer.
    pub fn messages_waiting(&self) -> usize {
        self.active.ctx.control.messages_waiting()
    }
}
