//! virtio-console (virtio ID 3) with the MULTIPORT feature: named ports that carry a
//! program's standard streams between host file descriptors and the guest, separate from
//! the serial console (which stays the kernel's log).
//!
//! Each port goes one way. An **input** port copies bytes read from a host descriptor to
//! the guest; at end of file the device tells the driver the host side closed, and the
//! guest's reads return end-of-file once it has read everything. An **output** port copies
//! what the guest writes to a host descriptor; when that descriptor breaks (EPIPE: the
//! reader went away) the device closes the host side, which the guest sees as POLLHUP.
//! The guest finds ports by name (`/sys/class/virtio-ports/vport*/name`).
//!
//! No threads of its own: each activation is one subscriber of the VM's event loop
//! (see [`crate::event_loop`]), woken by the queues' notify eventfds and, while there is
//! something to move, by its host descriptors' readiness. Host descriptors are
//! non-blocking (see [`HostFd`](crate::event_loop::HostFd)), so a slow reader or writer never holds the loop up.
//!
//! The Linux driver drops data that arrives on a port the guest has not opened, so an
//! input port sends nothing before the driver reports the guest side open.
//!
//! The files: [`VirtioConsole`] (`device.rs`) is what the transport sees; each activation
//! becomes an `ActiveConsole` (`event_handler.rs`), which serves the control queues
//! (`control.rs`, the MULTIPORT protocol) and the ports' data queues (`port.rs`) through
//! the buffer helpers in `queue.rs`.

mod control;
mod device;
mod event_handler;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod port;
mod queue;

use std::io;

pub use device::VirtioConsole;
use port::MAX_NAME_LEN;
pub use port::{PortEnd, PortSpec};

/// Why a console could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The guest finds ports by name, so a name must be short, non-empty text.
    #[error("virtio-console port name {0:?} must be 1 to {MAX_NAME_LEN} bytes, no NUL")]
    BadName(String),
    /// A console without ports.
    #[error("virtio-console needs at least one port")]
    NoPorts,
    /// A port's host descriptor could not be made ready for the event loop.
    #[error("virtio-console port {name:?}: cannot prepare its host descriptor: {source}")]
    HostEnd {
        /// The port's name.
        name: String,
        /// What failed.
        source: io::Error,
    },
}
