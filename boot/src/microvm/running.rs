//! A started microVM: the thread that runs it, and the handles that stop it.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tvix_boot_devices::ExitNotifier;
use tvix_boot_guest_init::protocol::HostRequest;
use tvix_boot_seccomp::{self as seccomp, RoleThread, ThreadRole};
use tvix_boot_vmm::HostStop;

use super::{ExitStatus, MicroVmError};

/// What the VM's thread runs once [`MicroVm::start`](super::MicroVm::start) has set the
/// VM up: the VM's life, from raw mode on the terminal to the exit status.
pub(super) type VmJob = Box<dyn FnOnce() -> Result<ExitStatus, MicroVmError> + Send>;

/// The thread that runs a VM and its event loop (`tvix-vm`). It is started first thing
/// in `start`, so that installing its seccomp filter (when filters are on; ~0.3 ms for
/// the event loop's) happens while the caller sets the VM up, not after; it then waits
/// for the VM.
pub(super) struct VmThread {
    job: Option<mpsc::SyncSender<VmJob>>,
    thread: Option<VmThreadHandle>,
}

type VmThreadHandle = RoleThread<Option<Result<ExitStatus, MicroVmError>>>;

impl VmThread {
    pub(super) fn start() -> Result<Self, MicroVmError> {
        let (job, jobs) = mpsc::sync_channel::<VmJob>(1);
        let thread = seccomp::spawn(ThreadRole::EventLoop, "tvix-vm".to_owned(), move || {
            // No job: `start` failed before the VM was ready, and said why.
            jobs.recv().ok().map(|job| job())
        })
        .map_err(MicroVmError::Thread)?;
        Ok(Self {
            job: Some(job),
            thread: Some(thread),
        })
    }

    /// Hands the VM's life to the thread.
    pub(super) fn run(mut self, job: VmJob, stopper: VmStopper) -> RunningVm {
        // The thread waits for exactly this; it is gone only if it failed to start
        // (its filter), which `wait` then reports.
        if let Some(sender) = self.job.take() {
            let _ = sender.send(job);
        }
        RunningVm {
            stdin: None,
            stdout: None,
            stderr: None,
            stopper,
            thread: self.thread.take(),
            status: None,
            passt: None,
        }
    }
}

impl Drop for VmThread {
    /// `start` failed: the thread ends without a job, and is joined.
    fn drop(&mut self) {
        drop(self.job.take());
        if let Some(thread) = self.thread.take() {
            thread.join();
        }
    }
}

/// A started microVM, like a [`std::process::Child`].
pub struct RunningVm {
    /// The program's stdin, when [`MicroVm::stdin`](super::MicroVm::stdin) was
    /// [`Stdio::Piped`](super::Stdio::Piped). Drop it for end of file.
    pub stdin: Option<File>,
    /// The program's stdout, when [`MicroVm::stdout`](super::MicroVm::stdout) was
    /// [`Stdio::Piped`](super::Stdio::Piped).
    pub stdout: Option<File>,
    /// The program's stderr, when [`MicroVm::stderr`](super::MicroVm::stderr) was
    /// [`Stdio::Piped`](super::Stdio::Piped).
    pub stderr: Option<File>,
    stopper: VmStopper,
    thread: Option<VmThreadHandle>,
    status: Option<ExitStatus>,
    /// The guest's passt, reaped once the VM (and with it passt's socket) is gone.
    pub(super) passt: Option<crate::network::Passt>,
}

impl RunningVm {
    /// Waits for the VM to end; every thread and descriptor of it is gone when this
    /// returns. Later calls return the same status.
    pub fn wait(&mut self) -> Result<ExitStatus, MicroVmError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        // Like Child::wait: the program must not block on a stdin nobody closes.
        drop(self.stdin.take());
        let thread = self.thread.take().ok_or(MicroVmError::AlreadyReported)?;
        let status = thread.join().flatten().ok_or(MicroVmError::Panicked);
        // The VM is gone, and its end of passt's socket with it: passt ends now.
        drop(self.passt.take());
        let status = status??;
        self.status = Some(status);
        Ok(status)
    }

    /// Asks the guest to end its program and power off; stops the VM without it if it
    /// has not within the grace time. Returns at once; [`Self::wait`] for the end.
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// Stops the VM now; [`Self::wait`] then gives [`HostStop::Killed`].
    pub fn kill(&self) {
        self.stopper.kill();
    }

    /// Sends `signal` to the guest's program; see [`VmStopper::signal`].
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        self.stopper.signal(signal)
    }

    /// A handle that stops this VM from elsewhere (another thread, a signal watcher).
    pub fn stopper(&self) -> VmStopper {
        self.stopper.clone()
    }
}

impl Drop for RunningVm {
    /// A VM does not outlive its handle: dropping one that runs kills it and waits.
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.kill();
            let _ = self.wait();
        }
    }
}

/// Stops a microVM; cheap to clone and usable from any thread.
#[derive(Clone)]
pub struct VmStopper {
    pub(super) exit: ExitNotifier,
    /// Our end of the control port, for tvix-boot's init.
    pub(super) control: Option<Arc<File>>,
    pub(super) grace: Duration,
}

impl VmStopper {
    /// Asks the guest to stop (tvix-boot's init ends the program with SIGTERM, reports
    /// its status and powers off), and stops the VM without it after the grace time.
    pub fn stop(&self) {
        let _ = self.request(HostRequest::Stop);
        self.stop_after_grace(HostStop::Killed);
    }

    /// Sends `signal` (1 to 64) to the guest's program, as a host would to a process:
    /// tvix-boot's init sends it to every process but itself; the program handles it or
    /// dies of it, and [`RunningVm::wait`] reports what it did. Only guests that run a
    /// program under tvix-boot's init (run, shell, find) can be signalled; for others,
    /// and for a number out of range, an `InvalidInput` or `Unsupported` error.
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        let request = HostRequest::signal(signal).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{signal} is not a signal number (1 to 64)"),
            )
        })?;
        self.request(request)
    }

    /// Whether the guest runs a program under tvix-boot's init, which takes requests.
    pub(crate) fn takes_requests(&self) -> bool {
        self.control.is_some()
    }

    fn request(&self, request: HostRequest) -> std::io::Result<()> {
        let Some(control) = &self.control else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this guest has no program to pass requests to (init or a custom initrd)",
            ));
        };
        // Non-blocking: a guest that reads nothing cannot hold the caller up.
        (&**control).write_all(format!("{}\n", request.to_line()).as_bytes())
    }

    /// Stops the VM now.
    pub fn kill(&self) {
        self.exit.host_stop(HostStop::Killed);
    }

    /// Stops the VM now for `why`.
    pub(crate) fn stop_now(&self, why: HostStop) {
        self.exit.host_stop(why);
    }

    /// Stops the VM after the grace time unless it ends before, with `why`.
    pub(crate) fn stop_after_grace(&self, why: HostStop) {
        self.exit.set_deadline(Instant::now() + self.grace, why);
    }
}
