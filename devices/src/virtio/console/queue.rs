//! Bytes in and out of the guest's buffers, for the control queues and the ports alike,
//! and what every queue of one activation shares.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::control::Control;
use crate::event_loop::PendingOutput;
use crate::virtio::{Interrupt, pop_chain};

/// Most bytes taken from one guest buffer: Linux writes at most 32 KiB per buffer; a
/// driver that chains more gets the rest dropped, not an unbounded allocation.
const MAX_CHAIN_BYTES: usize = 1 << 20;

/// What every queue of one activation works with besides the queue itself.
pub(super) struct Context {
    pub(super) memory: GuestMemoryMmap,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) control: Control,
    pub(super) pending_output: PendingOutput,
}

/// Every byte of the driver-readable part of `chain`, at most [`MAX_CHAIN_BYTES`]; `None`
/// when a descriptor points outside guest memory.
pub(super) fn read_chain(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<Vec<u8>> {
    let mut bytes = Vec::new();
    for desc in chain.readable() {
        let room = MAX_CHAIN_BYTES - bytes.len();
        let len = (desc.len() as usize).min(room);
        let start = bytes.len();
        bytes.resize(start + len, 0);
        memory.read_slice(&mut bytes[start..], desc.addr()).ok()?;
        if bytes.len() == MAX_CHAIN_BYTES {
            break;
        }
    }
    Some(bytes)
}

/// Writes as much of `data` as fits into the device-writable part of `chain`; returns how
/// many bytes went in (0 when a descriptor points outside guest memory).
pub(super) fn write_chain(
    memory: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    data: &[u8],
) -> usize {
    let mut written = 0;
    for desc in chain.writable() {
        let len = (desc.len() as usize).min(data.len() - written);
        if memory
            .write_slice(&data[written..written + len], desc.addr())
            .is_err()
        {
            return 0;
        }
        written += len;
        if written == data.len() {
            break;
        }
    }
    written
}

/// Returns `head` used with `len` bytes; a head the driver put out of range is dropped.
pub(super) fn add_used(queue: &mut Queue, memory: &GuestMemoryMmap, head: u16, len: usize) -> bool {
    match queue.add_used(memory, head, len as u32) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(head, error = %e, "virtio-console: cannot return a buffer");
            false
        }
    }
}

/// Puts `data` into the guest's buffers on `queue` as far as they go; returns how many
/// bytes went in. One interrupt per batch of buffers filled, not per buffer. Asks for a
/// notification when the buffers run out first.
pub(super) fn fill_buffers(
    queue: &mut Queue,
    ctx: &Context,
    mut data: &[u8],
) -> Result<usize, virtio_queue::Error> {
    let memory = &ctx.memory;
    let total = data.len();
    loop {
        let mut used = false;
        while !data.is_empty() {
            let Some(chain) = pop_chain(queue, memory)? else {
                break;
            };
            let head = chain.head_index();
            let written = write_chain(memory, chain, data);
            data = &data[written..];
            used |= add_used(queue, memory, head, written);
        }
        if used && queue.needs_notification(memory)? {
            ctx.interrupt.signal_used_queue();
        }
        // Out of buffers: ask to be notified, and look again (the driver may have posted
        // some in between) before waiting.
        if data.is_empty() || !queue.enable_notification(memory)? {
            return Ok(total - data.len());
        }
    }
}

#[cfg(test)]
impl Context {
    /// An activation's context in `memory` with `ports` ports named `port0`, `port1`...
    pub(super) fn for_test(memory: &GuestMemoryMmap, ports: usize) -> Self {
        use vmm_sys_util::eventfd::EventFd;
        Self {
            memory: memory.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            control: Control::for_test(ports),
            pending_output: PendingOutput::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::console::control::{ControlQueues, control_message, event};
    use crate::virtio::console::port::OutputPort;

    /// Runs `f` on a thread; a pass that spins instead of giving up on a broken queue
    /// fails the test rather than hanging it.
    fn within_seconds<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the pass spins on a broken queue")
    }

    #[test]
    fn a_driver_claiming_more_buffers_than_a_queue_holds_breaks_the_queue() {
        use virtio_queue::mock::MockSplitQueue;

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Each queue holds 16 chains; the driver's available index says 1000 are waiting,
        // so none can be taken, and "is there more?" is always yes.
        let overfull = |base: u64| {
            let mock = MockSplitQueue::create(&memory, GuestAddress(base), 16);
            mock.avail().idx().store(1000);
            mock.create_queue::<Queue>().unwrap()
        };
        let null = || File::options().write(true).open("/dev/null").unwrap();

        let mut ctx = Context::for_test(&memory, 1);
        let mut output = OutputPort::for_test(overfull(0), null());
        assert!(within_seconds(move || output
            .drain_queue(&mut ctx)
            .is_err()));

        let ctx = Context::for_test(&memory, 1);
        let mut queue = overfull(0x1_0000);
        assert!(within_seconds(move || fill_buffers(
            &mut queue, &ctx, b"data"
        )
        .is_err()));

        // Control: messages wait to go out, but neither queue can be served.
        let mut ctx = Context::for_test(&memory, 1);
        ctx.control
            .handle(&control_message(0, event::DEVICE_READY, 1, &[]));
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut control = ControlQueues::new(
            (overfull(0x2_0000), eventfd()),
            (overfull(0x3_0000), eventfd()),
        );
        assert!(within_seconds(move || {
            let first = control.serve(&mut ctx).is_err();
            // Broken stays broken: nothing more is served, nothing spins.
            first
                && control
                    .serve(&mut ctx)
                    .is_ok_and(|opened| opened.is_empty())
        }));
    }
}
