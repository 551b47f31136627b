//! The VM, in two types whose order is the order of its life: a [`VmBuilder`] is a
//! machine with its guest loaded, to which devices and event-loop subscribers are added;
//! [`VmBuilder::build`] writes the tables that describe them to the guest and creates the
//! vCPUs, and the [`Vm`] it gives can only be run. A device cannot be added after the
//! tables are written, nor a machine run without a guest: the types do not allow it.
//!
//! [`Vm::run`] runs on the thread that is to run the VM's event loop; it starts the vCPU
//! threads, serves the loop until the guest or the host stops the VM, and joins them.
//! Everything process-wide (the host terminal, signals, seccomp) is the front end's.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use tvix_boot_devices::acpi_sleep::AcpiSleepRegister;
use tvix_boot_devices::bus::SharedDevice;
use tvix_boot_devices::event_loop::{EventLoop, EventLoopError, EventLoopHandle, Subscriber};
use tvix_boot_devices::i8042::{self, I8042};
use tvix_boot_devices::pvpanic::PvPanic;
use tvix_boot_devices::serial::{self, ConsoleOutput, IrqTrigger, SerialConsole, SerialIo};
use tvix_boot_devices::status_port::{self, GuestStatus, StatusPort};
use tvix_boot_devices::virtio::VirtioDevice;
use tvix_boot_devices::virtio::mmio::{MmioError, MmioTransport};
use tvix_boot_devices::{Bus, BusError, ExitNotifier, VmExit};
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{self, AcpiConfig, AcpiError, MmioDeviceInfo};
use crate::arch::x86_64::linux::{self, BootError, Initrd, LoadedInitrd, LoadedKernel};
use crate::arch::x86_64::regs::{self, EntryMode, RegsError};
use crate::arch::x86_64::{cpuid, layout, mptable};
use crate::startup;
use crate::vcpu::{self, Vcpu, VcpuContext, VcpuError};

/// Most vCPUs we create: APIC ids are 8 bits in the MADT and MP table, and one id
/// goes to the IOAPIC.
pub const MAX_VCPUS: u8 = 254;

/// Why a VM could not be created or run.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {source} (is KVM available and accessible to this user?)")]
    OpenKvm { source: kvm_ioctls::Error },
    /// KVM does not offer a capability the VM relies on.
    #[error("/dev/kvm lacks {0:?}, which tvix-boot needs")]
    MissingCapability(Cap),
    /// A KVM ioctl on the VM failed.
    #[error("KVM {ioctl} failed: {source}")]
    Kvm {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    /// `vcpus` is 0, or above [`MAX_VCPUS`] or what KVM supports.
    #[error("{requested} vCPUs requested; between 1 and {max} are supported")]
    VcpuCount { requested: u8, max: u8 },
    /// `mem_size` is below the 64 MiB Linux needs to boot.
    #[error("{requested_mib} MiB of guest memory is too little; at least {min_mib} MiB are needed")]
    TooLittleMemory { requested_mib: u64, min_mib: u64 },
    /// Guest memory could not be mapped.
    #[error("cannot allocate {size} bytes of guest memory: {source}")]
    AllocateMemory {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The boot vCPU's registers could not be set.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// A vCPU failed or could not be started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device's address range is taken (a bug in the memory layout).
    #[error("cannot register device: {0}")]
    Bus(#[from] BusError),
    /// Every virtio-mmio slot already has a device.
    #[error("all {slots} virtio-mmio slots are taken")]
    NoVirtioMmioSlot { slots: u64 },
    /// The virtio-mmio transport for a device could not be created.
    #[error("cannot set up the virtio transport: {0}")]
    VirtioTransport(#[from] MmioError),
    /// An eventfd (exit notification, interrupt line) could not be created.
    #[error("cannot create {what} eventfd: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    /// The VM's event loop could not be created or failed.
    #[error("{0}")]
    EventLoop(#[from] EventLoopError),
    /// The host side of the serial console or the exit watcher could not be set up.
    #[error("cannot set up the {what}: {source}")]
    HostIo {
        what: &'static str,
        source: std::io::Error,
    },
}

fn kvm_error(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { ioctl, source }
}

/// The host's ends of the guest's serial console.
pub struct ConsoleIo {
    /// What the guest reads, read when the guest has room (a terminal is the front end's
    /// to put in raw mode); `None` for a console without input.
    pub input: Option<OwnedFd>,
    /// Where the guest's output goes.
    pub output: Box<dyn Write + Send>,
}

impl ConsoleIo {
    /// Output to `output`, no input (tests, embedding).
    pub fn output_only(output: impl Write + Send + 'static) -> Self {
        Self {
            input: None,
            output: Box::new(output),
        }
    }
}

/// What to boot and with which resources.
pub struct VmConfig {
    /// vmlinux (ELF) or bzImage.
    pub kernel: PathBuf,
    /// The initial RAM disk, if any; placed at the top of low RAM.
    pub initrd: Option<Initrd>,
    /// The kernel command line, complete (devices are described in the ACPI tables).
    pub cmdline: String,
    /// Number of vCPUs, 1 to [`MAX_VCPUS`] (and at most what KVM supports).
    pub vcpus: u8,
    /// Guest RAM in bytes, at least 64 MiB. Above 3 GiB the rest is placed above 4 GiB.
    pub mem_size: u64,
}

impl VmConfig {
    /// One vCPU, 512 MiB, empty command line, no initrd.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            vcpus: 1,
            mem_size: 512 << 20,
        }
    }
}

/// Where a virtio-mmio device was placed.
#[derive(Clone, Copy, Debug)]
pub struct MmioSlot {
    /// Guest-physical base address of the device's registers.
    pub addr: u64,
    /// Length of the region, in bytes.
    pub len: u64,
    /// The IOAPIC line the device interrupts on.
    pub irq: u32,
}

/// How vCPU 0 starts.
enum BootEntry {
    Linux {
        kernel: LoadedKernel,
        initrd: Option<LoadedInitrd>,
        cmdline: String,
    },
    /// Flat 32-bit protected mode at `entry`, no boot tables (tiny test guests).
    #[cfg(test)]
    Flat32 { entry: u64 },
}

/// The parts of a VM that both [`VmBuilder`] and [`Vm`] hold.
struct Machine {
    kvm: Kvm,
    vm_fd: VmFd,
    memory: GuestMemoryMmap,
    vcpu_count: u8,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: ExitNotifier,
    serial: Arc<Mutex<SerialConsole>>,
    console_input: Option<OwnedFd>,
    /// The last value the guest wrote to the exit-status port.
    guest_status: GuestStatus,
    /// Runs the host side of the devices (everything but vCPUs and virtio-fs queue
    /// workers) on the thread that calls [`Vm::run`].
    event_loop: EventLoop,
    /// When KVM setup began, for the start-up time logged by `run`.
    created_at: Instant,
}

/// A VM being set up: KVM VM, memory and legacy devices made, the guest loaded. Add
/// devices and subscribers, then [`build`](Self::build) it.
pub struct VmBuilder {
    machine: Machine,
    entry: BootEntry,
    virtio_mmio: Vec<MmioDeviceInfo>,
}

/// A VM ready to run: its boot tables written and its vCPUs created. Nothing about it
/// can change any more; [`run`](Self::run) it once.
pub struct Vm {
    machine: Machine,
    vcpus: Vec<Vcpu>,
}

impl VmBuilder {
    /// Checks the configuration, creates the VM and loads kernel and initrd, with the
    /// guest's serial console on `console`. Nothing runs yet; every input error is
    /// reported here.
    pub fn new(config: VmConfig, console: ConsoleIo) -> Result<Self, VmError> {
        if config.mem_size < layout::MIN_MEMORY {
            return Err(VmError::TooLittleMemory {
                requested_mib: config.mem_size >> 20,
                min_mib: layout::MIN_MEMORY >> 20,
            });
        }
        linux::check_kernel_format(&config.kernel)?;
        // Parse early: a bad command line is an input error too.
        linux::build_cmdline(&config.cmdline)?;

        let machine = Machine::create(config.vcpus, config.mem_size, console)?;
        startup::mark("legacy devices");
        let kernel = linux::load_kernel(&machine.memory, &config.kernel)?;
        startup::mark("kernel loaded");
        let initrd = match &config.initrd {
            Some(initrd) => Some(linux::load_initrd(&machine.memory, initrd, kernel.end)?),
            None => None,
        };
        startup::mark("initrd loaded");
        Ok(Self {
            machine,
            entry: BootEntry::Linux {
                kernel,
                initrd,
                cmdline: config.cmdline,
            },
            virtio_mmio: Vec::new(),
        })
    }

    /// The value the guest reports on the exit-status port (`layout::STATUS_PORT`), to
    /// read after [`Vm::run`] returns: tvix-boot's init writes the exit status of the
    /// program it ran there.
    pub fn guest_status(&self) -> GuestStatus {
        self.machine.guest_status.clone()
    }

    /// Where devices report how the guest wants to stop; the host stops the VM through it
    /// too (a request, or a deadline), from any thread, also while [`Vm::run`] runs.
    pub fn exit_notifier(&self) -> ExitNotifier {
        self.machine.exit.clone()
    }

    /// Guest memory, for devices that read and write it (virtio queues).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.machine.memory
    }

    /// Places a virtio-mmio device in the next free slot: `make` gets the slot and an
    /// eventfd that raises the slot's interrupt, and returns the device. The device is
    /// announced to the guest in the DSDT (see `write_boot_state` for why not also on
    /// the command line).
    pub fn add_virtio_mmio_device(
        &mut self,
        make: impl FnOnce(MmioSlot, EventFd) -> Result<SharedDevice, VmError>,
    ) -> Result<MmioSlot, VmError> {
        let index = self.virtio_mmio.len() as u64;
        let (addr, irq) = layout::virtio_mmio_slot(index).ok_or(VmError::NoVirtioMmioSlot {
            slots: layout::VIRTIO_MMIO_SLOTS,
        })?;
        let slot = MmioSlot {
            addr,
            len: layout::VIRTIO_MMIO_SLOT_SIZE,
            irq,
        };
        let interrupt = irqfd(&self.machine.vm_fd, irq, "virtio-mmio interrupt")?;
        let device = make(slot, interrupt)?;
        self.machine
            .mmio
            .insert(&format!("virtio-mmio slot {index}"), addr, slot.len, device)?;
        self.virtio_mmio.push(MmioDeviceInfo {
            addr,
            len: slot.len,
            irq,
        });
        Ok(slot)
    }

    /// Puts a virtio device on the MMIO bus behind a virtio-mmio transport. Queue
    /// notifications reach the device through KVM ioeventfds, without a trip through the
    /// vCPU thread; the device is activated on the VM's event-loop thread.
    pub fn add_virtio_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
    ) -> Result<MmioSlot, VmError> {
        let memory = self.machine.memory.clone();
        let event_loop = self.machine.event_loop.handle();
        let mut transport = None;
        let slot = self.add_virtio_mmio_device(|_slot, irq| {
            let shared = Arc::new(Mutex::new(MmioTransport::new(
                device, memory, irq, event_loop,
            )?));
            transport = Some(shared.clone());
            Ok(shared)
        })?;
        let transport = transport.expect("add_virtio_mmio_device calls make");
        let transport = transport.lock().unwrap_or_else(|e| e.into_inner());
        let notify = IoEventAddress::Mmio(slot.addr + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY));
        for (index, event) in transport.queue_events().iter().enumerate() {
            startup::kvm_ioctl("KVM_IOEVENTFD", || {
                self.machine
                    .vm_fd
                    .register_ioevent(event, &notify, index as u32)
            })
            .map_err(kvm_error("KVM_IOEVENTFD"))?;
        }
        Ok(slot)
    }

    /// Adds a subscriber to the VM's event loop (e.g. one that follows a signalfd); it
    /// runs on the thread that calls [`Vm::run`].
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.machine.event_loop.add(subscriber);
    }

    /// Adds subscribers to the VM's event loop from other threads, also while it runs.
    pub fn event_loop(&self) -> EventLoopHandle {
        self.machine.event_loop.handle()
    }

    /// Writes the boot tables that describe the machine and its devices, and creates the
    /// vCPUs (KVM ioctls on the VM and vCPU fds, which the thread that runs the VM may
    /// not be allowed once it has its seccomp filter).
    pub fn build(self) -> Result<Vm, VmError> {
        startup::mark("virtio devices added");
        let (entry, mode) = self.write_boot_state()?;
        startup::mark("boot tables written");
        let vcpus = self.machine.create_vcpus(entry, mode)?;
        startup::mark("vcpus created");
        Ok(Vm {
            machine: self.machine,
            vcpus,
        })
    }

    /// Writes everything the guest reads at boot; returns vCPU 0's entry point.
    fn write_boot_state(&self) -> Result<(u64, EntryMode), VmError> {
        let memory = &self.machine.memory;
        match &self.entry {
            BootEntry::Linux {
                kernel,
                initrd,
                cmdline,
            } => {
                // virtio-mmio devices are described in the DSDT only, not also with
                // virtio_mmio.device= on the command line: the ACPI tables are
                // hardware-reduced, so Linux has no legacy IRQs and cannot request a bare
                // IRQ number from the command line ("probe failed with error -22"); the
                // DSDT's _CRS gives it a GSI it maps. Listing a device in both places made
                // the second probe fail to claim the region.
                let cmdline = linux::build_cmdline(cmdline)?;
                linux::write_boot_params(memory, kernel, *initrd, &cmdline)?;
                let vcpu_count = u32::from(self.machine.vcpu_count);
                mptable::write(memory, vcpu_count)?;
                acpi::write_tables(
                    memory,
                    &AcpiConfig {
                        vcpu_count,
                        virtio_mmio: &self.virtio_mmio,
                    },
                )?;
                Ok((kernel.entry, EntryMode::Linux64))
            }
            #[cfg(test)]
            BootEntry::Flat32 { entry } => Ok((*entry, EntryMode::Flat32)),
        }
    }
}

impl Vm {
    /// See [`VmBuilder::guest_status`].
    pub fn guest_status(&self) -> GuestStatus {
        self.machine.guest_status.clone()
    }

    /// See [`VmBuilder::exit_notifier`].
    pub fn exit_notifier(&self) -> ExitNotifier {
        self.machine.exit.clone()
    }

    /// Starts the vCPUs and serves the VM's event loop on this thread until the guest
    /// powers off, resets or panics, or the host stops it. All vCPU threads are stopped
    /// and joined before it returns, and what the guest wrote has gone out (unless the
    /// host stopped it at once).
    pub fn run(self) -> Result<VmExit, VmError> {
        let Vm { mut machine, vcpus } = self;
        let serial_io = SerialIo::new(machine.serial.clone(), machine.console_input.take())
            .map_err(|source| VmError::HostIo {
                what: "serial console",
                source,
            })?;
        machine.event_loop.add(Box::new(serial_io));
        let exit_watcher = machine.exit.watcher().map_err(|source| VmError::HostIo {
            what: "exit watcher",
            source,
        })?;
        machine.event_loop.add(Box::new(exit_watcher));
        startup::mark("event loop set up");

        let stop = Arc::new(AtomicBool::new(false));
        let ctx = VcpuContext {
            pio: machine.pio.clone(),
            mmio: machine.mmio.clone(),
            exit: machine.exit.clone(),
            stop: stop.clone(),
        };
        let mut threads = Vec::with_capacity(vcpus.len());
        let mut result = Ok(());
        for vcpu in vcpus {
            match vcpu::spawn(vcpu, ctx.clone()) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        if result.is_ok() {
            tracing::info!(
                "guest started: {:?} after KVM setup began",
                machine.created_at.elapsed()
            );
            // Until a device's exit request, a deadline, or a vCPU thread ending.
            let exit = machine.exit.clone();
            result = machine
                .event_loop
                .run_until(|| exit.woken())
                .map_err(VmError::from);
        }

        stop.store(true, Ordering::Release);
        let vcpu_result = vcpu::stop_all(threads);
        // What the guest wrote before it stopped still goes out, unless the host asked to
        // stop at once.
        let exit = machine.exit.clone();
        if let Err(e) = machine.event_loop.drain(|| exit.forced()) {
            tracing::warn!("output after the guest stopped may be lost: {e}");
        }
        // The guest's last words (e.g. a panic message) may still be buffered.
        tvix_boot_devices::bus::lock(&machine.serial).flush_output();
        result?;

        match machine.exit.reason() {
            Some(reason) => Ok(reason),
            None => {
                vcpu_result?;
                // Every vCPU ended without an error and without a guest request:
                // only possible if one stopped on its own, which is a bug.
                Err(VmError::Vcpu(VcpuError::UnexpectedExit {
                    index: 0,
                    exit: "vCPU stopped without a reason".into(),
                }))
            }
        }
    }
}

impl Machine {
    /// The machine without a guest: KVM VM, irqchip, PIT, memory, legacy devices.
    fn create(vcpus: u8, mem_size: u64, console: ConsoleIo) -> Result<Self, VmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount {
                requested: vcpus,
                max: MAX_VCPUS,
            });
        }
        let created_at = Instant::now();
        let kvm = startup::kvm_ioctl("open /dev/kvm, KVM_GET_API_VERSION", Kvm::new)
            .map_err(|source| VmError::OpenKvm { source })?;
        startup::mark("kvm opened");
        for cap in [
            Cap::Irqchip,
            Cap::Irqfd,
            Cap::Pit2,
            Cap::UserMemory,
            Cap::ExtCpuid,
        ] {
            if !startup::kvm_ioctl("KVM_CHECK_EXTENSION", || kvm.check_extension(cap)) {
                return Err(VmError::MissingCapability(cap));
            }
        }
        let max_vcpus = startup::kvm_ioctl("KVM_CHECK_EXTENSION", || kvm.get_max_vcpus())
            .min(usize::from(MAX_VCPUS));
        if usize::from(vcpus) > max_vcpus {
            return Err(VmError::VcpuCount {
                requested: vcpus,
                max: max_vcpus as u8,
            });
        }

        // kvm-ioctls asks for KVM_GET_VCPU_MMAP_SIZE too.
        let vm_fd = startup::kvm_ioctl("KVM_CREATE_VM", || kvm.create_vm())
            .map_err(kvm_error("KVM_CREATE_VM"))?;
        startup::kvm_ioctl("KVM_SET_TSS_ADDR", || {
            vm_fd.set_tss_address(layout::KVM_TSS_START as usize)
        })
        .map_err(kvm_error("KVM_SET_TSS_ADDR"))?;
        startup::kvm_ioctl("KVM_CREATE_IRQCHIP", || vm_fd.create_irq_chip())
            .map_err(kvm_error("KVM_CREATE_IRQCHIP"))?;
        // The PIT drives the PC speaker on port 0x61; a dummy speaker keeps that port
        // inside KVM too.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        startup::kvm_ioctl("KVM_CREATE_PIT2", || vm_fd.create_pit2(pit))
            .map_err(kvm_error("KVM_CREATE_PIT2"))?;
        startup::mark("vm created");

        let memory = create_memory(&vm_fd, mem_size)?;
        startup::mark("guest memory registered");

        let exit = ExitNotifier::new().map_err(|source| VmError::EventFd {
            what: "exit",
            source,
        })?;
        let serial_irq = irqfd(&vm_fd, layout::SERIAL_IRQ, "serial interrupt")?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            IrqTrigger::new(serial_irq),
            ConsoleOutput::new(console.output),
        )));

        let pio = Arc::new(Bus::new());
        pio.insert(
            "serial (COM1)",
            layout::SERIAL_PORT.into(),
            serial::REGISTER_COUNT,
            serial.clone(),
        )?;
        pio.insert(
            "i8042",
            layout::I8042_DATA_PORT.into(),
            i8042::PORT_RANGE_LEN,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
        )?;
        pio.insert(
            "ACPI sleep register",
            layout::ACPI_SLEEP_PORT.into(),
            1,
            Arc::new(Mutex::new(AcpiSleepRegister::new(exit.clone()))),
        )?;
        pio.insert(
            "pvpanic",
            layout::PVPANIC_PORT.into(),
            1,
            Arc::new(Mutex::new(PvPanic::new(exit.clone()))),
        )?;
        let guest_status = GuestStatus::default();
        pio.insert(
            "exit-status port",
            layout::STATUS_PORT.into(),
            status_port::STATUS_PORT_LEN,
            Arc::new(Mutex::new(StatusPort::new(guest_status.clone()))),
        )?;

        Ok(Self {
            kvm,
            vm_fd,
            memory,
            vcpu_count: vcpus,
            pio,
            mmio: Arc::new(Bus::new()),
            exit,
            serial,
            console_input: console.input,
            guest_status,
            event_loop: EventLoop::new()?,
            created_at,
        })
    }

    fn create_vcpus(&self, entry: u64, mode: EntryMode) -> Result<Vec<Vcpu>, VmError> {
        let supported = startup::kvm_ioctl("KVM_GET_SUPPORTED_CPUID", || {
            self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        })
        .map_err(kvm_error("KVM_GET_SUPPORTED_CPUID"))?;
        (0..self.vcpu_count)
            .map(|index| {
                // With the mmap of its kvm_run area, which kvm-ioctls makes here.
                let fd = startup::kvm_ioctl("KVM_CREATE_VCPU", || {
                    self.vm_fd.create_vcpu(u64::from(index))
                })
                .map_err(kvm_error("KVM_CREATE_VCPU"))?;
                let mut cpuid = supported.clone();
                cpuid::normalize(&mut cpuid, u32::from(index), u32::from(self.vcpu_count));
                startup::kvm_ioctl("KVM_SET_CPUID2", || fd.set_cpuid2(&cpuid))
                    .map_err(kvm_error("KVM_SET_CPUID2"))?;
                regs::setup_msrs(&fd)?;
                regs::setup_fpu(&fd)?;
                regs::setup_lint(&fd)?;
                // Only the boot vCPU starts running; the others wait for the INIT/SIPI
                // the kernel sends them through the in-kernel LAPIC.
                if index == 0 {
                    regs::setup_sregs(&self.memory, &fd, mode)?;
                    regs::setup_regs(&fd, entry, mode)?;
                }
                Ok(Vcpu { index, fd })
            })
            .collect()
    }
}

/// Allocates guest RAM and hands it to KVM.
fn create_memory(vm_fd: &VmFd, mem_size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<_> = layout::ram_ranges(mem_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    let memory =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::AllocateMemory {
            size: mem_size,
            source,
        })?;
    for (slot, region) in memory.iter().enumerate() {
        let region_spec = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        startup::kvm_ioctl("KVM_SET_USER_MEMORY_REGION", || {
            // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned
            // by `memory`, which outlives every vCPU that can access it (they are joined
            // in `Vm::run` before `memory` is dropped), and slots do not overlap.
            unsafe { vm_fd.set_user_memory_region(region_spec) }
        })
        .map_err(kvm_error("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(memory)
}

/// An eventfd that raises interrupt line `irq` when written.
fn irqfd(vm_fd: &VmFd, irq: u32, what: &'static str) -> Result<EventFd, VmError> {
    let fd =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::EventFd { what, source })?;
    startup::kvm_ioctl("KVM_IRQFD", || vm_fd.register_irqfd(&fd, irq))
        .map_err(kvm_error("KVM_IRQFD"))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    //! Tiny hand-assembled guests on the local /dev/kvm. They need /dev/kvm and fail
    //! (rather than skip) without it.

    use super::*;
    use std::time::{Duration, Instant};
    use tvix_boot_devices::GuestExit;
    use tvix_boot_devices::acpi_sleep;

    /// Where test guest code is placed and entered (flat 32-bit protected mode).
    const CODE_START: u64 = 0x1000;
    const TEST_MEMORY: u64 = 2 << 20;

    /// A `Write` the test can read back.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    // 32-bit x86 encodings used by the test guests.
    fn mov_dx(port: u16) -> Vec<u8> {
        let [lo, hi] = port.to_le_bytes();
        vec![0x66, 0xba, lo, hi]
    }
    fn mov_al(value: u8) -> Vec<u8> {
        vec![0xb0, value]
    }
    const OUT_DX_AL: u8 = 0xee;
    /// `hlt; jmp <hlt>`: park the vCPU if it ever gets past the exit.
    const HALT_FOREVER: [u8; 3] = [0xf4, 0xeb, 0xfd];

    fn out_bytes(port: u16, bytes: &[u8]) -> Vec<u8> {
        let mut code = mov_dx(port);
        for &b in bytes {
            code.extend(mov_al(b));
            code.push(OUT_DX_AL);
        }
        code
    }

    const I8042_COMMAND_PORT: u16 = layout::I8042_DATA_PORT + i8042::COMMAND_OFFSET as u16;
    /// The i8042 command that pulses the CPU reset line.
    const I8042_RESET_CPU: u8 = 0xfe;

    fn power_off() -> Vec<u8> {
        let mut code = out_bytes(layout::ACPI_SLEEP_PORT, &[acpi_sleep::s5_command()]);
        code.extend(HALT_FOREVER);
        code
    }

    fn test_vm(code: &[u8], vcpus: u8) -> (VmBuilder, Capture) {
        let capture = Capture::default();
        let machine = Machine::create(vcpus, TEST_MEMORY, ConsoleIo::output_only(capture.clone()))
            .expect("these tests need a usable /dev/kvm");
        machine
            .memory
            .write_slice(code, GuestAddress(CODE_START))
            .unwrap();
        let vm = VmBuilder {
            machine,
            entry: BootEntry::Flat32 { entry: CODE_START },
            virtio_mmio: Vec::new(),
        };
        (vm, capture)
    }

    fn run_with_deadline(vm: VmBuilder) -> VmExit {
        let start = Instant::now();
        let exit = vm.build().expect("vCPUs created").run().expect("guest ran");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "VM took too long"
        );
        exit
    }

    use vm_memory::Bytes;

    #[test]
    fn serial_output_then_power_off_with_two_vcpus() {
        let mut code = out_bytes(layout::SERIAL_PORT, b"hello\n");
        code.extend(power_off());
        // vCPU 1 never gets a SIPI and sits in KVM_RUN: stopping must still join it.
        let (vm, capture) = test_vm(&code, 2);
        assert_eq!(run_with_deadline(vm), VmExit::Guest(GuestExit::PowerOff));
        assert_eq!(capture.text(), "hello\n");
    }

    #[test]
    fn i8042_reset_command_resets() {
        let mut code = out_bytes(I8042_COMMAND_PORT, &[I8042_RESET_CPU]);
        code.extend(HALT_FOREVER);
        let (vm, _) = test_vm(&code, 1);
        assert_eq!(run_with_deadline(vm), VmExit::Guest(GuestExit::Reset));
    }

    #[test]
    fn pvpanic_reports_a_panic() {
        let mut code = out_bytes(
            layout::PVPANIC_PORT,
            &[tvix_boot_devices::pvpanic::PANICKED],
        );
        code.extend(HALT_FOREVER);
        let (vm, _) = test_vm(&code, 1);
        assert_eq!(run_with_deadline(vm), VmExit::Guest(GuestExit::Panic));
    }

    #[test]
    fn status_port_keeps_the_last_32_bit_value_through_power_off() {
        const MOV_EAX_IMM32: u8 = 0xb8;
        const OUT_DX_EAX: u8 = 0xef;
        let mut code = mov_dx(layout::STATUS_PORT);
        for value in [7u32, 0x101] {
            code.push(MOV_EAX_IMM32);
            code.extend(value.to_le_bytes());
            code.push(OUT_DX_EAX);
        }
        code.extend(power_off());
        let (vm, _) = test_vm(&code, 1);
        let status = vm.guest_status();
        assert_eq!(status.get(), None);
        assert_eq!(run_with_deadline(vm), VmExit::Guest(GuestExit::PowerOff));
        assert_eq!(status.get(), Some(0x101));
    }

    #[test]
    fn a_panic_banner_on_the_console_does_not_make_a_reset_a_panic() {
        let mut code = out_bytes(layout::SERIAL_PORT, b"Kernel panic - not syncing: test\n");
        code.extend(out_bytes(I8042_COMMAND_PORT, &[I8042_RESET_CPU]));
        code.extend(HALT_FOREVER);
        let (vm, _) = test_vm(&code, 1);
        assert_eq!(run_with_deadline(vm), VmExit::Guest(GuestExit::Reset));
    }

    /// (offset, bytes) of every write the probe saw.
    type WriteLog = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// Records MMIO writes and answers reads with a fixed byte.
    struct MmioProbe {
        writes: WriteLog,
    }

    const PROBE_READ_VALUE: u8 = b'M';

    impl tvix_boot_devices::BusDevice for MmioProbe {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(PROBE_READ_VALUE);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn mmio_accesses_reach_a_virtio_mmio_slot() {
        let slot_base = layout::VIRTIO_MMIO_START as u32;
        let mut code = Vec::new();
        // mov dword [slot_base + 0x10], 0x12345678
        code.extend([0xc7, 0x05]);
        code.extend((slot_base + 0x10).to_le_bytes());
        code.extend(0x1234_5678u32.to_le_bytes());
        // mov eax, [slot_base + 0x20]; then send al to the serial port
        code.push(0xa1);
        code.extend((slot_base + 0x20).to_le_bytes());
        code.extend(mov_dx(layout::SERIAL_PORT));
        code.push(OUT_DX_AL);
        code.extend(power_off());

        let (mut vm, capture) = test_vm(&code, 1);
        let writes = WriteLog::default();
        let probe = MmioProbe {
            writes: writes.clone(),
        };
        let slot = vm
            .add_virtio_mmio_device(|_, _irq| Ok(Arc::new(Mutex::new(probe))))
            .unwrap();
        assert_eq!(slot.addr, layout::VIRTIO_MMIO_START);
        assert_eq!(slot.irq, layout::VIRTIO_MMIO_FIRST_IRQ);

        assert_eq!(run_with_deadline(vm), VmExit::Guest(GuestExit::PowerOff));
        assert_eq!(
            *writes.lock().unwrap(),
            vec![(0x10, 0x1234_5678u32.to_le_bytes().to_vec())]
        );
        assert_eq!(capture.text(), (PROBE_READ_VALUE as char).to_string());
    }

    #[test]
    fn input_errors_are_reported_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-vmlinux");
        let console = || ConsoleIo::output_only(std::io::sink());
        let err = VmBuilder::new(VmConfig::new(&missing), console())
            .err()
            .unwrap();
        assert!(err.to_string().contains("no-such-vmlinux"), "{err}");

        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, b"not a kernel").unwrap();
        let err = VmBuilder::new(VmConfig::new(&garbage), console())
            .err()
            .unwrap();
        assert!(
            matches!(err, VmError::Boot(BootError::UnknownKernelFormat { .. })),
            "{err}"
        );

        let err = VmBuilder::new(
            VmConfig {
                mem_size: 16 << 20,
                ..VmConfig::new(&garbage)
            },
            console(),
        )
        .err()
        .unwrap();
        assert!(matches!(err, VmError::TooLittleMemory { .. }), "{err}");
    }
}
