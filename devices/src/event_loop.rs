//! One event loop per VM: every piece of host-side device I/O that is not a vCPU or a
//! virtio-fs queue worker (console input and output, program streams, the exit and stop
//! eventfds, timers, signals) is a subscriber of one `event-manager` [`EventManager`],
//! run by the thread that runs the VM. Nothing sleeps or polls on a timeout: every
//! subscriber waits on a descriptor (eventfd, timerfd, signalfd, or a host stream).
//!
//! Devices are activated on the loop's thread ([`EventLoopHandle::run_on_loop`], from the
//! vCPU that saw the driver's DRIVER_OK), and add their subscribers there.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use event_manager::{EventManager, RemoteEndpoint};

/// What a subscriber is written with.
pub use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
pub use vmm_sys_util::epoll::EventSet;

/// What the loop runs: any subscriber that may move to the loop's thread.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// Why the event loop failed.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll or the loop's own channel failed.
    #[error("event loop: {0}")]
    Manager(#[from] event_manager::Error),
    /// The loop has ended: nothing runs subscribers any more.
    #[error("the VM's event loop has ended")]
    Gone,
}

/// The VM's event loop; run on one thread (see the module documentation).
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    pending_output: PendingOutput,
}

impl EventLoop {
    /// An empty loop. Fails only if epoll or an eventfd cannot be created.
    pub fn new() -> Result<Self, EventLoopError> {
        Ok(Self {
            manager: EventManager::new()?,
            pending_output: PendingOutput::default(),
        })
    }

    /// A handle for adding subscribers from other threads.
    pub fn handle(&self) -> EventLoopHandle {
        EventLoopHandle {
            endpoint: self.manager.remote_endpoint(),
            pending_output: self.pending_output.clone(),
        }
    }

    /// Adds a subscriber on the loop's own thread.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Waits for events and dispatches them until `done` holds (checked after each
    /// round of events).
    pub fn run_until(&mut self, done: impl Fn() -> bool) -> Result<(), EventLoopError> {
        while !done() {
            self.manager.run()?;
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: without limit) for events and dispatches them;
    /// returns how many there were.
    pub fn run_once(&mut self, timeout_ms: i32) -> Result<usize, EventLoopError> {
        Ok(self.manager.run_with_timeout(timeout_ms)?)
    }

    /// After the guest stopped: dispatches what is already pending, and keeps going while
    /// output taken from the guest still waits for its host reader, unless `abandon`
    /// holds (checked after each round).
    pub fn drain(&mut self, abandon: impl Fn() -> bool) -> Result<(), EventLoopError> {
        loop {
            let waiting = self.pending_output.count() > 0;
            let events = self
                .manager
                .run_with_timeout(if waiting { -1 } else { 0 })?;
            if (events == 0 && !waiting) || abandon() {
                return Ok(());
            }
        }
    }
}

/// Adds subscribers to a VM's [`EventLoop`] from any thread; cheap to clone.
#[derive(Clone)]
pub struct EventLoopHandle {
    endpoint: RemoteEndpoint<Subscriber>,
    pending_output: PendingOutput,
}

impl EventLoopHandle {
    /// Hands `subscriber` to the loop, which registers it the next time it wakes; does not
    /// wait for that.
    pub fn add(&self, subscriber: Subscriber) -> Result<(), EventLoopError> {
        self.endpoint
            .fire(move |ops| {
                ops.add_subscriber(subscriber);
            })
            .map_err(|e| match e {
                event_manager::Error::ChannelSend => EventLoopError::Gone,
                e => EventLoopError::Manager(e),
            })
    }

    /// Runs `work` on the loop's thread the next time it wakes; does not wait for that.
    /// Devices are activated this way, so that the threads they start are started by
    /// the thread that runs the VM.
    pub fn run_on_loop(&self, work: impl FnOnce() + Send + 'static) -> Result<(), EventLoopError> {
        self.endpoint.fire(move |_ops| work()).map_err(|e| match e {
            event_manager::Error::ChannelSend => EventLoopError::Gone,
            e => EventLoopError::Manager(e),
        })
    }

    /// The count of output streams holding bytes the guest wrote and the host has not
    /// taken yet; the loop keeps running for them after the guest stops.
    pub fn pending_output(&self) -> PendingOutput {
        self.pending_output.clone()
    }
}

/// How many output streams hold bytes not yet written to the host (see
/// [`EventLoop::drain`]).
#[derive(Clone, Default)]
pub struct PendingOutput(Arc<AtomicUsize>);

impl PendingOutput {
    /// One more stream holds bytes.
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// One stream no longer does.
    pub fn remove(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }

    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// A host descriptor a subscriber reads or writes: made non-blocking, and whether epoll
/// can wait on it. Regular files and some character devices (/dev/null) cannot be waited
/// on; they never block for long, so they are used as always ready.
pub struct HostFd {
    file: File,
    pollable: bool,
    /// File status flags to put back on drop, when `O_NONBLOCK` had to be set on a
    /// description shared with other processes.
    restore_flags: Option<libc::c_int>,
}

impl HostFd {
    /// Prepares `fd` for the event loop. A pipe, FIFO or terminal without `O_NONBLOCK`
    /// is opened again through /proc/self/fd, so the flag is set on a description of our
    /// own and not on the one the caller shares (a shell's terminal, say); what cannot be
    /// reopened (a socket) gets the flag until this value is dropped.
    pub fn new(fd: OwnedFd, write: bool) -> io::Result<Self> {
        if !pollable(fd.as_raw_fd())? {
            return Ok(Self {
                file: File::from(fd),
                pollable: false,
                restore_flags: None,
            });
        }
        let flags = fcntl_getfl(fd.as_raw_fd())?;
        if flags & libc::O_NONBLOCK != 0 {
            return Ok(Self {
                file: File::from(fd),
                pollable: true,
                restore_flags: None,
            });
        }
        if let Ok(reopened) = reopen_nonblocking(fd.as_raw_fd(), write) {
            return Ok(Self {
                file: reopened,
                pollable: true,
                restore_flags: None,
            });
        }
        fcntl_setfl(fd.as_raw_fd(), flags | libc::O_NONBLOCK)?;
        Ok(Self {
            file: File::from(fd),
            pollable: true,
            restore_flags: Some(flags),
        })
    }

    /// Whether epoll can wait on it; if not, it is always ready.
    pub fn pollable(&self) -> bool {
        self.pollable
    }

    /// The file to read or write.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl AsRawFd for HostFd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for HostFd {
    fn drop(&mut self) {
        if let Some(flags) = self.restore_flags {
            let _ = fcntl_setfl(self.file.as_raw_fd(), flags);
        }
    }
}

/// A timerfd whose read never blocks: an expiry epoll reported can be gone by the time
/// it is read (re-arming a timer clears it), and a blocking read would then hold the
/// whole loop until the new expiry.
pub fn nonblocking_timer() -> io::Result<vmm_sys_util::timerfd::TimerFd> {
    let timer = vmm_sys_util::timerfd::TimerFd::new()?;
    set_nonblocking(&timer)?;
    Ok(timer)
}

/// Sets `O_NONBLOCK` on `fd`'s open file description (shared with every duplicate of
/// it: for a description of one's own; [`HostFd`] takes care of shared ones).
pub fn set_nonblocking(fd: &impl AsRawFd) -> io::Result<()> {
    let flags = fcntl_getfl(fd.as_raw_fd())?;
    fcntl_setfl(fd.as_raw_fd(), flags | libc::O_NONBLOCK)
}

/// Whether epoll can wait on `fd` (it refuses regular files and devices without poll).
fn pollable(fd: RawFd) -> io::Result<bool> {
    let epoll = vmm_sys_util::epoll::Epoll::new()?;
    let event = vmm_sys_util::epoll::EpollEvent::new(EventSet::IN, 0);
    match epoll.ctl(vmm_sys_util::epoll::ControlOperation::Add, fd, event) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(false),
        Err(e) => Err(e),
    }
}

fn fcntl_getfl(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL takes no pointer; an invalid fd is reported as an error.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

fn fcntl_setfl(fd: RawFd, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: F_SETFL takes an integer; an invalid fd is reported as an error.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn reopen_nonblocking(fd: RawFd, write: bool) -> io::Result<File> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    let access = if write {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    let new = unsafe {
        libc::open(
            path.as_ptr(),
            access | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(new) })
}

/// One descriptor a subscriber waits on now and then: registered with the loop only
/// while [`Watch::set`] says so.
pub struct Watch {
    fd: RawFd,
    token: u32,
    events: EventSet,
    on: bool,
}

impl Watch {
    /// A descriptor not yet registered; its events come with `token` as their data.
    pub fn new(fd: &impl AsRawFd, token: u32, events: EventSet) -> Self {
        Self {
            fd: fd.as_raw_fd(),
            token,
            events,
            on: false,
        }
    }

    /// Whether the descriptor is registered.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Registers or unregisters the descriptor to match `on`.
    pub fn set(&mut self, ops: &mut EventOps, on: bool) {
        if self.on == on {
            return;
        }
        let events = Events::with_data_raw(self.fd, self.token, self.events);
        let result = if on {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.on = on,
            Err(e) => tracing::warn!(fd = self.fd, on, "event loop: cannot change a watch: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn regular_files_are_always_ready_and_pipes_are_waited_on() {
        let file = tempfile::tempfile().unwrap();
        let host = HostFd::new(file.into(), true).unwrap();
        assert!(!host.pollable());
        let (reader, _writer) = std::io::pipe().unwrap();
        let host = HostFd::new(reader.into(), false).unwrap();
        assert!(host.pollable());
    }

    #[test]
    fn a_blocking_pipe_gets_a_nonblocking_description_of_its_own() {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let shared = writer.try_clone().unwrap();
        let host = HostFd::new(writer.into(), true).unwrap();
        let ours = fcntl_getfl(host.as_raw_fd()).unwrap();
        assert_ne!(ours & libc::O_NONBLOCK, 0);
        let theirs = fcntl_getfl(shared.as_raw_fd()).unwrap();
        assert_eq!(
            theirs & libc::O_NONBLOCK,
            0,
            "the caller's description is untouched"
        );
        // Fill the pipe: the write that does not fit fails instead of blocking.
        let chunk = vec![0u8; 1 << 16];
        let mut written = 0;
        loop {
            match host.file().write(&chunk) {
                Ok(n) => written += n,
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        let mut back = vec![0u8; written];
        reader.read_exact(&mut back).unwrap();
    }

    #[test]
    fn a_timer_rearmed_before_its_read_does_not_block() {
        let mut timer = nonblocking_timer().unwrap();
        timer
            .reset(std::time::Duration::from_millis(1), None)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        timer
            .reset(std::time::Duration::from_secs(3600), None)
            .unwrap();
        // On a thread: a blocking timer would sleep for the hour instead of failing.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(timer.wait().is_err());
        });
        let nothing_expired = rx
            .recv_timeout(std::time::Duration::from_secs(2))
            .expect("the read of a re-armed timer blocked");
        assert!(nothing_expired, "nothing expired since the re-arm");
    }

    #[test]
    fn subscribers_added_from_another_thread_run_on_the_loop() {
        struct Once(vmm_sys_util::eventfd::EventFd, Arc<AtomicUsize>);
        impl MutEventSubscriber for Once {
            fn process(&mut self, _events: Events, _ops: &mut EventOps) {
                let _ = self.0.read();
                self.1.fetch_add(1, Ordering::SeqCst);
            }
            fn init(&mut self, ops: &mut EventOps) {
                ops.add(Events::new(&self.0, EventSet::IN)).unwrap();
            }
        }
        let mut event_loop = EventLoop::new().unwrap();
        let handle = event_loop.handle();
        let fired = Arc::new(AtomicUsize::new(0));
        let eventfd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        eventfd.write(1).unwrap();
        let subscriber = Once(eventfd, fired.clone());
        std::thread::spawn(move || handle.add(Box::new(subscriber)).unwrap())
            .join()
            .unwrap();
        event_loop
            .run_until(|| fired.load(Ordering::SeqCst) == 1)
            .unwrap();
    }
}
