//! One thread per vCPU: run the vCPU, dispatch its I/O exits to the buses, stop when
//! the guest or the VMM says so.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tvix_boot_devices::{Bus, ExitNotifier, GuestExit};
use tvix_boot_seccomp::{self as seccomp, RoleThread, SeccompError, ThreadRole};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

/// Why a vCPU stopped the VM, or could not be started. `index` is the vCPU's number.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum VcpuError {
    /// KVM_RUN failed other than by being interrupted (EINTR, EAGAIN).
    #[error("vCPU {index}: KVM_RUN failed: {source}")]
    Run {
        index: u8,
        source: kvm_ioctls::Error,
    },
    /// KVM_EXIT_FAIL_ENTRY: the vCPU state is invalid for the hardware.
    #[error("vCPU {index}: KVM could not enter the guest (hardware reason {reason:#x})")]
    FailEntry { index: u8, reason: u64 },
    /// KVM_EXIT_INTERNAL_ERROR, typically an instruction KVM cannot emulate.
    #[error("vCPU {index}: KVM internal error (the guest did something KVM cannot emulate)")]
    Internal { index: u8 },
    /// An exit the VMM does not handle; `exit` describes it.
    #[error("vCPU {index}: unexpected exit {exit}")]
    UnexpectedExit { index: u8, exit: String },
    /// The vCPU thread could not be started.
    #[error("vCPU {index}: thread could not be started: {source}")]
    Spawn { index: u8, source: SeccompError },
    /// The vCPU thread panicked, or ended at once because its seccomp filter could not be
    /// installed.
    #[error("vCPU {index}: thread panicked or could not install its seccomp filter")]
    Panicked { index: u8 },
    /// The signal handler that stops vCPUs could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
}

/// The signal that interrupts KVM_RUN so a vCPU thread notices it should stop.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// The run area (kvm_run) of the vCPU this thread runs; null before it starts.
    static RUN_AREA: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Runs on the vCPU thread the kick was sent to. Delivery alone makes a KVM_RUN in
/// progress return EINTR; setting `immediate_exit` makes one about to start return EINTR
/// at once, so a kick is never lost between the stop check and KVM_RUN (no retries).
extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let area = RUN_AREA.with(Cell::get);
    if !area.is_null() {
        // SAFETY: a non-null RUN_AREA points at this thread's vCPU's kvm_run mapping,
        // which lives as long as the VcpuFd that this thread owns and clears it before
        // dropping; immediate_exit is a plain byte that KVM reads on entry.
        unsafe { (*area).immediate_exit = 1 };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(VcpuError::SignalHandler);
    });
    result
}

/// What a vCPU thread needs besides its fd.
#[derive(Clone)]
pub(crate) struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitNotifier,
    pub stop: Arc<AtomicBool>,
}

pub(crate) struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
}

/// Value an unclaimed port or MMIO read returns, as on an open bus.
const OPEN_BUS: u8 = 0xff;

impl Vcpu {
    fn run(mut self, ctx: VcpuContext) -> Result<(), VcpuError> {
        // Cleared on every way out, before the VcpuFd (and its kvm_run mapping) goes.
        struct ForgetRunArea;
        impl Drop for ForgetRunArea {
            fn drop(&mut self) {
                RUN_AREA.with(|area| area.set(std::ptr::null_mut()));
            }
        }
        RUN_AREA.with(|area| area.set(std::ptr::from_mut(self.fd.get_kvm_run())));
        let _forget = ForgetRunArea;
        let index = self.index;
        let mut first_exit = index == 0;
        if first_exit {
            crate::startup::mark("entering KVM_RUN");
        }
        while !ctx.stop.load(Ordering::Acquire) && ctx.exit.reason().is_none() {
            let exit = self.fd.run();
            if first_exit {
                // The guest's first instructions ran before this.
                crate::startup::mark("first exit");
                crate::startup::report();
                first_exit = false;
            }
            match exit {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !ctx.pio.read(u64::from(port), data) {
                        data.fill(OPEN_BUS);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !ctx.pio.write(u64::from(port), data) {
                        tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !ctx.mmio.read(addr, data) {
                        tracing::debug!("vCPU {index}: read from unclaimed MMIO {addr:#x}");
                        data.fill(OPEN_BUS);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !ctx.mmio.write(addr, data) {
                        tracing::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
                    }
                }
                // A triple fault; also Linux's `reboot=t`.
                Ok(VcpuExit::Shutdown) => ctx.exit.guest_stopped(GuestExit::Reset),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ctx.exit.guest_stopped(GuestExit::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => ctx.exit.guest_stopped(GuestExit::Reset),
                    KVM_SYSTEM_EVENT_CRASH => ctx.exit.guest_stopped(GuestExit::Panic),
                    other => {
                        return Err(VcpuError::UnexpectedExit {
                            index,
                            exit: format!("system event {other}"),
                        });
                    }
                },
                Ok(VcpuExit::Intr) => {}
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(VcpuError::FailEntry { index, reason });
                }
                Ok(VcpuExit::InternalError) => return Err(VcpuError::Internal { index }),
                Ok(other) => {
                    return Err(VcpuError::UnexpectedExit {
                        index,
                        exit: format!("{other:?}"),
                    });
                }
                Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => {
                    // A kick: the loop condition says whether to stop. If not (a stray
                    // signal), enter the guest again.
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(source) => return Err(VcpuError::Run { index, source }),
            }
        }
        Ok(())
    }
}

/// A running vCPU thread.
pub(crate) struct VcpuThread {
    index: u8,
    handle: RoleThread<Result<(), VcpuError>>,
}

/// Starts `vcpu` on its own thread. When it ends for any reason it wakes the VMM.
pub(crate) fn spawn(vcpu: Vcpu, ctx: VcpuContext) -> Result<VcpuThread, VcpuError> {
    install_kick_handler()?;
    let index = vcpu.index;
    // From the VM's thread, whose event-loop filter allows all a vCPU's does.
    let handle = seccomp::spawn(ThreadRole::Vcpu, format!("vcpu{index}"), move || {
        let exit = ctx.exit.clone();
        // Wake the VMM however this thread ends, panics included.
        struct WakeOnDrop(ExitNotifier);
        impl Drop for WakeOnDrop {
            fn drop(&mut self) {
                self.0.wake();
            }
        }
        let _wake = WakeOnDrop(exit);
        vcpu.run(ctx)
    })
    .map_err(|source| VcpuError::Spawn { index, source })?;
    Ok(VcpuThread { index, handle })
}

/// Stops and joins all vCPU threads (`stop` must already be set), returning the first
/// error any of them ended with.
pub(crate) fn stop_all(threads: Vec<VcpuThread>) -> Result<(), VcpuError> {
    // A vCPU may be inside KVM_RUN (e.g. halted) and only a signal gets it out; one kick
    // is enough (see `on_kick`).
    for thread in &threads {
        // Fails only if the thread is already gone.
        let _ = thread.handle.thread_handle().kill(kick_signal());
    }
    let mut first_error = Ok(());
    for thread in threads {
        let result = thread.handle.join().unwrap_or(Err(VcpuError::Panicked {
            index: thread.index,
        }));
        if let Err(e) = result {
            tracing::error!("{e}");
            if first_error.is_ok() {
                first_error = Err(e);
            }
        }
    }
    first_error
}
