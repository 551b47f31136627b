//! The console's queue work on the caller's thread, for the fuzz targets in `fuzz/`: each
//! call is one pass of what a device thread does when woken, over the same code, so a run
//! is deterministic and needs no waiting. The threads `activate` starts add only poll(2)
//! around these passes. Not an API: only built with the `fuzzing` feature.

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateError, Activation, CONTROL_RX, CONTROL_TX, VirtioConsole, Workers, lock, port_rx_queue,
};

/// A console's queue workers, run one pass at a time on the calling thread.
pub struct ConsoleQueues {
    workers: Workers,
    /// Always signalled: where a thread would sleep for more buffers, a pass ends.
    stop: EventFd,
}

impl ConsoleQueues {
    /// The work `console.activate(activation)` would start threads for.
    pub fn new(console: &mut VirtioConsole, activation: Activation) -> Result<Self, ActivateError> {
        let workers = console.workers(activation)?;
        let spawn_err = |source| ActivateError::Spawn {
            device: "virtio-console",
            source,
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(spawn_err)?;
        stop.write(1).map_err(spawn_err)?;
        Ok(Self { workers, stop })
    }

    /// The control thread's pass: the driver's messages in, queued messages out.
    pub fn serve_control(&mut self) -> Result<(), virtio_queue::Error> {
        self.workers.control.serve()
    }

    /// An output port thread's pass: what the guest wrote goes to the host end. `None` when
    /// `port` is not an output port.
    pub fn drain_output(&mut self, port: usize) -> Option<Result<(), virtio_queue::Error>> {
        let output = self.workers.outputs.iter_mut().find(|o| o.port == port)?;
        Some(output.drain())
    }

    /// What an input port thread does with `data` read from its host end: into the guest's
    /// buffers, as far as they go. `None` when `port` is not an input port, or the guest
    /// has not opened it (the thread would still be waiting); `Some(false)` when the
    /// buffers ran out (the thread would wait for more) or the queue broke.
    pub fn deliver_input(&mut self, port: usize, data: &[u8]) -> Option<bool> {
        let input = self.workers.inputs.iter_mut().find(|i| i.port == port)?;
        if !input.shared.guest_open(port) {
            return None;
        }
        Some(input.deliver(data, &self.stop))
    }

    /// The host end of input port `port` reached end of file.
    pub fn end_input(&mut self, port: usize) {
        if let Some(input) = self.workers.inputs.iter().find(|i| i.port == port) {
            input.shared.close_host_side(port);
        }
    }

    /// The driver said the guest side of `port` is open.
    pub fn guest_open(&self, port: usize) -> bool {
        let control = lock(&self.workers.control.shared.control);
        control.ports.get(port).is_some_and(|p| p.guest_open)
    }

    /// The device's own state of queue `index` (numbered as the transport numbers them):
    /// how far it has taken the available ring. `None` for a queue nothing serves (the
    /// unused direction of a port).
    pub fn queue(&self, index: usize) -> Option<&Queue> {
        let w = &self.workers;
        match index {
            CONTROL_RX => Some(&w.control.rx),
            CONTROL_TX => Some(&w.control.tx),
            _ => {
                let port = index.saturating_sub(2) / 2;
                if index == port_rx_queue(port) {
                    w.inputs.iter().find(|i| i.port == port).map(|i| &i.queue)
                } else {
                    w.outputs.iter().find(|o| o.port == port).map(|o| &o.queue)
                }
            }
        }
    }

    /// Messages for the driver still waiting for a control receive buffer.
    pub fn messages_waiting(&self) -> usize {
        lock(&self.workers.control.shared.control).outbox.len()
    }
}
