//! One activation on the VM's event loop: which descriptor woke it, and what to serve
//! then. Host ends are watched only while there is something to wait for.

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::control::ControlQueues;
use super::port::{InputPort, OutputPort};
use super::queue::Context;
use crate::event_loop::HostFd;

/// Where an event comes from; its token is the event's data.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    Stop,
    ControlTx,
    ControlRx,
    /// The data queue / the host end of `inputs[i]` or `outputs[i]`.
    InputQueue(usize),
    InputHost(usize),
    OutputQueue(usize),
    OutputHost(usize),
}

impl Source {
    fn token(self) -> u32 {
        let (kind, index) = match self {
            Source::Stop => (0, 0),
            Source::ControlTx => (1, 0),
            Source::ControlRx => (2, 0),
            Source::InputQueue(i) => (3, i),
            Source::InputHost(i) => (4, i),
            Source::OutputQueue(i) => (5, i),
            Source::OutputHost(i) => (6, i),
        };
        // At most a few ports (their names go in a 12-byte config's count).
        kind | (index as u32) << 3
    }

    fn from_token(token: u32) -> Option<Self> {
        let index = (token >> 3) as usize;
        Some(match token & 7 {
            0 => Source::Stop,
            1 => Source::ControlTx,
            2 => Source::ControlRx,
            3 => Source::InputQueue(index),
            4 => Source::InputHost(index),
            5 => Source::OutputQueue(index),
            6 => Source::OutputHost(index),
            _ => return None,
        })
    }
}

/// One activation: the control queues and the data queue of every port that still has
/// its host end. A subscriber of the VM's event loop; every queue and host end is
/// served on the loop's thread.
pub(super) struct ActiveConsole {
    pub(super) ctx: Context,
    pub(super) control: ControlQueues,
    pub(super) inputs: Vec<InputPort>,
    pub(super) outputs: Vec<OutputPort>,
    /// Signalled when the driver resets the device (or the device goes away).
    pub(super) stop: EventFd,
    /// Stopped: nothing watched any more, host ends closed.
    stopped: bool,
}

impl ActiveConsole {
    /// An activation serving the control queues, and no ports yet.
    pub(super) fn new(ctx: Context, control: ControlQueues, stop: EventFd) -> Self {
        Self {
            ctx,
            control,
            inputs: Vec::new(),
            outputs: Vec::new(),
            stop,
            stopped: false,
        }
    }

    /// Serves input port `port`: `host` into `queue`.
    pub(super) fn add_input(&mut self, port: usize, queue: Queue, event: EventFd, host: HostFd) {
        let token = Source::InputHost(self.inputs.len()).token();
        self.inputs
            .push(InputPort::new(port, queue, event, host, token));
    }

    /// Serves output port `port`: `queue` out to `host`.
    pub(super) fn add_output(&mut self, port: usize, queue: Queue, event: EventFd, host: HostFd) {
        let token = Source::OutputHost(self.outputs.len()).token();
        self.outputs
            .push(OutputPort::new(port, queue, event, host, token));
    }

    /// The driver's control messages, inputs the guest opened, messages for the driver.
    fn serve_control(&mut self) {
        let _ = self.control.tx_event.read();
        let _ = self.control.rx_event.read();
        match self.control.serve(&mut self.ctx) {
            Ok(opened) => {
                for port in opened {
                    if let Some(input) = self.inputs.iter_mut().find(|i| i.port == port) {
                        input.pump(&mut self.ctx, false);
                    }
                }
                // An input that ended at once (empty) closed its host side in `pump`.
                if self.ctx.control.messages_waiting() != 0
                    && let Err(e) = self.control.serve(&mut self.ctx)
                {
                    tracing::warn!(error = %e, "virtio-console: control queue broken");
                }
            }
            Err(e) => tracing::warn!(error = %e, "virtio-console: control queue broken"),
        }
    }

    /// Registers the host ends that have something to wait for, and only those (a
    /// readable input whose bytes the guest cannot take yet would wake the loop for
    /// nothing, over and over).
    fn update_watches(&mut self, ops: &mut EventOps) {
        for input in &mut self.inputs {
            let on = input.waits_for_host(&self.ctx.control);
            input.host.watch(ops, on);
        }
        for output in &mut self.outputs {
            let on = output.waits_for_host();
            output.host.watch(ops, on);
        }
    }

    fn shut_down(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::new(&self.stop, EventSet::IN));
        for event in [&self.control.tx_event, &self.control.rx_event]
            .into_iter()
            .chain(self.inputs.iter().map(|i| &i.event))
            .chain(self.outputs.iter().map(|o| &o.event))
        {
            let _ = ops.remove(Events::new(event, EventSet::IN));
        }
        for input in &mut self.inputs {
            input.host.watch(ops, false);
        }
        for output in &mut self.outputs {
            output.host.watch(ops, false);
        }
        // Closes the host ends.
        self.inputs.clear();
        self.outputs.clear();
        self.stopped = true;
    }
}

impl MutEventSubscriber for ActiveConsole {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &EventFd, source: Source| {
            if let Err(e) = ops.add(Events::with_data(fd, source.token(), EventSet::IN)) {
                tracing::warn!(?source, "virtio-console: cannot watch a queue: {e}");
            }
        };
        add(&self.stop, Source::Stop);
        add(&self.control.tx_event, Source::ControlTx);
        add(&self.control.rx_event, Source::ControlRx);
        for (i, input) in self.inputs.iter().enumerate() {
            add(&input.event, Source::InputQueue(i));
        }
        for (i, output) in self.outputs.iter().enumerate() {
            add(&output.event, Source::OutputQueue(i));
        }
        // The driver may have queued messages before the loop took the device over.
        self.serve_control();
        for output in &mut self.outputs {
            output.drain(&mut self.ctx);
        }
        self.update_watches(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stopped {
            return;
        }
        let source = Source::from_token(events.data());
        match source {
            Some(Source::Stop) => {
                self.shut_down(ops);
                return;
            }
            Some(Source::ControlTx | Source::ControlRx) | None => {}
            Some(Source::InputQueue(i)) => {
                if let Some(input) = self.inputs.get_mut(i) {
                    let _ = input.event.read();
                    input.pump(&mut self.ctx, false);
                }
            }
            Some(Source::InputHost(i)) => {
                if let Some(input) = self.inputs.get_mut(i) {
                    input.pump(&mut self.ctx, true);
                }
            }
            Some(Source::OutputQueue(i)) => {
                if let Some(output) = self.outputs.get_mut(i) {
                    let _ = output.event.read();
                    output.drain(&mut self.ctx);
                }
            }
            Some(Source::OutputHost(i)) => {
                if let Some(output) = self.outputs.get_mut(i) {
                    output.drain(&mut self.ctx);
                }
            }
        }
        // The control queues when the driver used them, or when a port's host side
        // closed and the driver is to hear it; not on every stream event.
        if matches!(source, Some(Source::ControlTx | Source::ControlRx))
            || self.ctx.control.messages_waiting() != 0
        {
            self.serve_control();
        }
        self.update_watches(ops);
    }
}
