//! `virtio_mmio`: a driver's register accesses, from the input, against the virtio-mmio
//! transport wrapping a probe device that checks what it is handed. Beside the transport
//! runs a small model of the registers the driver can observe (status, selections,
//! feature words, queue readiness, interrupt bits); every read is checked against it.
//!
//! Input: a device description, then operations until the input ends.
//!
//! - device: queues:u8 (1 + n % 4) (max_size:u16)* features:u64 fail:u8 config_len:u8
//!   config[config_len % 33]. A maximum size that is no power of two up to 32768 makes
//!   the transport refuse the device (checked).
//! - [`op::READ`] offset:u16 len:u8: any read of `len % 9` bytes.
//! - [`op::WRITE`] offset:u16 len:u8 value:u64: any write of the low `len % 9` bytes.
//! - [`op::REG`] register:u8 value:u32: a well-formed write to one of [`REGISTERS`].
//! - [`op::RAISE`] which:u8: an activated device raises its used-buffer (even) or
//!   configuration-change (odd) interrupt.
//! - [`op::QUEUE`] index:u8 num:u16 desc:u64 avail:u64 used:u64: a queue set up and made
//!   ready, addresses as given (the memory is 0..64 KiB and 128..192 KiB).
//! - [`op::HANDSHAKE`] features:u64 driver_ok:u8: status ACKNOWLEDGE, DRIVER, the driver
//!   features, FEATURES_OK, and DRIVER_OK when `driver_ok` is odd.
//! - [`op::FAR`] offset:u64 len:u8: a read and a write of zeros anywhere in the 64-bit
//!   offset space.

use std::sync::{Arc, Mutex};

use tvix_boot_devices::BusDevice;
use tvix_boot_devices::event_loop::EventLoop;
use tvix_boot_devices::virtio::mmio::MmioTransport;
use tvix_boot_devices::virtio::{ActivateError, Activation, Interrupt, VirtioDevice};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::input::{Cursor, Encoder};

pub mod op {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const REG: u8 = 2;
    pub const RAISE: u8 = 3;
    pub const QUEUE: u8 = 4;
    pub const HANDSHAKE: u8 = 5;
    pub const FAR: u8 = 6;
    pub(super) const COUNT: u8 = 7;
}

/// Every register of the modern layout, readable or not; [`op::REG`] picks one.
pub const REGISTERS: [u32; 30] = [
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_GUEST_PAGE_SIZE,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_ALIGN,
    VIRTIO_MMIO_QUEUE_PFN,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_SHM_SEL,
    VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_CONFIG,
];

const DEVICE_ID: u32 = 42;
const MAGIC: u32 = 0x7472_6976;
/// The two memory regions, with a hole between them.
const REGIONS: [(u64, usize); 2] = [(0, 0x1_0000), (0x2_0000, 0x1_0000)];

/// What the probe device has been through, shared with the harness.
#[derive(Default)]
struct Seen {
    active: bool,
    activations: usize,
    resets: usize,
    features: u64,
    interrupt: Option<Arc<Interrupt>>,
}

/// A device that checks what the transport hands it and records it.
struct Probe {
    features: u64,
    sizes: Vec<u16>,
    config: Vec<u8>,
    fail: bool,
    seen: Arc<Mutex<Seen>>,
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.sizes.clone()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.config.len());
        let n = (self.config.len() - start).min(data.len());
        data[..n].copy_from_slice(&self.config[start..start + n]);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut seen = self.seen.lock().expect("not poisoned");
        assert!(!seen.active, "activated twice without a reset");
        assert_eq!(
            activation.queues.len(),
            self.sizes.len(),
            "activated with the wrong number of queues"
        );
        assert_eq!(
            activation.features & !self.features,
            0,
            "activated with features the device does not offer"
        );
        for (queue, _) in &activation.queues {
            assert!(queue.ready(), "activated with a queue that is not ready");
            assert!(
                queue.is_valid(&activation.memory),
                "activated with a queue outside guest memory"
            );
            assert!(queue.size() <= queue.max_size() && queue.size().is_power_of_two());
            // virtio-queue takes an available ring at 0 for a queue never set up, and pops
            // nothing from it: a device could not serve it.
            assert_ne!(
                queue.avail_ring(),
                0,
                "activated with a queue virtio-queue will not serve"
            );
        }
        if self.fail {
            return Err(ActivateError::QueueCount {
                device: "probe",
                expected: 0,
                actual: 0,
            });
        }
        seen.active = true;
        seen.activations += 1;
        seen.features = activation.features;
        seen.interrupt = Some(activation.interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        let mut seen = self.seen.lock().expect("not poisoned");
        assert!(seen.active, "reset of a device that was never activated");
        seen.active = false;
        seen.resets += 1;
        seen.interrupt = None;
    }
}

/// What the driver can know of the transport's registers.
#[derive(Default)]
struct Model {
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    queue_select: u32,
    ready: Vec<bool>,
    interrupt: u32,
}

struct Harness {
    transport: MmioTransport,
    /// Activates the device, as the VM's event loop does, after each status write.
    event_loop: EventLoop,
    seen: Arc<Mutex<Seen>>,
    features: u64,
    sizes: Vec<u16>,
    config: Vec<u8>,
    model: Model,
}

/// Runs one input; returns how often the device was activated (for the seeds' check).
pub fn run(data: &[u8]) -> usize {
    let mut input = Cursor::new(data);
    let Some(mut h) = Harness::new(&mut input) else {
        return 0;
    };
    while let Some(op) = input.u8() {
        if h.step(op, &mut input).is_none() {
            break;
        }
    }
    // Whatever the driver did, a reset brings the device back to the start.
    h.write_status(0);
    assert!(!h.seen().active);
    assert_eq!(h.read32(VIRTIO_MMIO_STATUS), 0);
    h.seen().activations
}

impl Harness {
    fn new(input: &mut Cursor) -> Option<Self> {
        let queues = 1 + usize::from(input.u8()? % 4);
        let sizes = (0..queues)
            .map(|_| input.u16())
            .collect::<Option<Vec<_>>>()?;
        let features = input.u64()?;
        let fail = input.u8()? & 1 != 0;
        let config_len = input.u8()? % 33;
        let config = input.up_to(config_len.into()).to_vec();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let probe = Probe {
            features,
            sizes: sizes.clone(),
            config: config.clone(),
            fail,
            seen: seen.clone(),
        };
        let regions: Vec<_> = REGIONS
            .iter()
            .map(|&(start, len)| (GuestAddress(start), len))
            .collect();
        let memory = GuestMemoryMmap::from_ranges(&regions).expect("guest memory");
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
        let event_loop = EventLoop::new().expect("an event loop");
        let transport = MmioTransport::new(Box::new(probe), memory, irqfd, event_loop.handle());
        let valid = sizes.iter().all(|s| s.is_power_of_two() && *s <= 32768);
        assert_eq!(
            transport.is_ok(),
            valid,
            "queue sizes {sizes:?} accepted wrongly"
        );
        Some(Self {
            transport: transport.ok()?,
            event_loop,
            seen,
            features,
            model: Model {
                ready: vec![false; sizes.len()],
                ..Model::default()
            },
            sizes,
            config,
        })
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().expect("not poisoned")
    }

    fn step(&mut self, op: u8, input: &mut Cursor) -> Option<()> {
        match op % op::COUNT {
            op::READ => {
                let offset = input.u16()?;
                let len = input.u8()? % 9;
                self.read(offset.into(), len.into());
            }
            op::WRITE => {
                let offset = input.u16()?;
                let len = input.u8()? % 9;
                let value = input.u64()?;
                self.write(offset.into(), &value.to_le_bytes()[..len.into()]);
            }
            op::REG => {
                let register = REGISTERS[usize::from(input.u8()?) % REGISTERS.len()];
                let value = input.u32()?;
                self.write32(register, value);
            }
            op::RAISE => {
                let which = input.u8()?;
                let interrupt = self.seen().interrupt.clone();
                if let Some(interrupt) = interrupt {
                    if which % 2 == 0 {
                        interrupt.signal_used_queue();
                        self.model.interrupt |= VIRTIO_MMIO_INT_VRING;
                    } else {
                        interrupt.signal_config_change();
                        self.model.interrupt |= VIRTIO_MMIO_INT_CONFIG;
                    }
                }
                assert_eq!(
                    self.read32(VIRTIO_MMIO_INTERRUPT_STATUS),
                    self.model.interrupt
                );
            }
            op::QUEUE => {
                let index = input.u8()?;
                let num = input.u16()?;
                let [desc, avail, used] = [input.u64()?, input.u64()?, input.u64()?];
                self.write32(VIRTIO_MMIO_QUEUE_SEL, index.into());
                self.write32(VIRTIO_MMIO_QUEUE_NUM, num.into());
                for (low, address) in [
                    (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
                    (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
                    (VIRTIO_MMIO_QUEUE_USED_LOW, used),
                ] {
                    self.write32(low, address as u32);
                    self.write32(low + 4, (address >> 32) as u32);
                }
                self.write32(VIRTIO_MMIO_QUEUE_READY, 1);
            }
            op::HANDSHAKE => {
                let features = input.u64()?;
                let driver_ok = input.u8()? % 2 == 1;
                self.write_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
                self.write_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
                for (select, word) in [(0, features as u32), (1, (features >> 32) as u32)] {
                    self.write32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, select);
                    self.write32(VIRTIO_MMIO_DRIVER_FEATURES, word);
                }
                let ok = VIRTIO_CONFIG_S_ACKNOWLEDGE
                    | VIRTIO_CONFIG_S_DRIVER
                    | VIRTIO_CONFIG_S_FEATURES_OK;
                self.write_status(ok);
                if driver_ok {
                    self.write_status(ok | VIRTIO_CONFIG_S_DRIVER_OK);
                }
            }
            _ => {
                let offset = input.u64()?;
                let len = usize::from(input.u8()? % 9);
                let mut data = [0xa5u8; 8];
                self.transport.read(offset, &mut data[..len]);
                if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
                    self.check_config(offset, &data[..len]);
                }
                // Zeros: to a register that takes them, a reset, which the model follows.
                self.write(offset, &[0u8; 8][..len]);
            }
        }
        Some(())
    }

    /// The value a 32-bit read of `register` must give.
    fn expected(&self, register: u32) -> u32 {
        let queue = self.model.queue_select as usize;
        match register {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => 2,
            VIRTIO_MMIO_DEVICE_ID => DEVICE_ID,
            VIRTIO_MMIO_VENDOR_ID => 0x4258_5654,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.model.device_features_select {
                0 => self.features as u32,
                1 => (self.features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.sizes.get(queue).map_or(0, |s| u32::from(*s)),
            VIRTIO_MMIO_QUEUE_READY => self.model.ready.get(queue).is_some_and(|r| *r).into(),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.model.interrupt,
            VIRTIO_MMIO_STATUS => self.model.status,
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // Write-only, reserved and unknown registers (and the configuration
            // generation, which never changes) read as zero.
            _ => 0,
        }
    }

    fn read(&mut self, offset: u64, len: usize) {
        let mut data = [0xa5u8; 8];
        self.transport.read(offset, &mut data[..len]);
        let data = &data[..len];
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.check_config(offset, data);
        } else if len == 4 && offset.is_multiple_of(4) {
            let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            assert_eq!(
                value,
                self.expected(offset as u32),
                "register {offset:#x} reads wrong"
            );
        } else {
            assert!(
                data.iter().all(|b| *b == 0),
                "a {len}-byte read at {offset:#x} is not zeros"
            );
        }
    }

    fn check_config(&self, offset: u64, data: &[u8]) {
        let start = offset - u64::from(VIRTIO_MMIO_CONFIG);
        for (i, byte) in data.iter().enumerate() {
            let expected = usize::try_from(start)
                .ok()
                .and_then(|s| s.checked_add(i))
                .and_then(|at| self.config.get(at))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                *byte,
                expected,
                "configuration byte {} reads wrong",
                start + i as u64
            );
        }
    }

    fn read32(&mut self, register: u32) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(register.into(), &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(&mut self, register: u32, value: u32) {
        self.write(register.into(), &value.to_le_bytes());
    }

    /// A write, followed in the model where it is well-formed.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let well_formed =
            data.len() == 4 && offset.is_multiple_of(4) && offset < u64::from(VIRTIO_MMIO_CONFIG);
        if !well_formed {
            self.transport.write(offset, data);
            // Ignored: nothing the driver can see changed.
            assert_eq!(self.read32(VIRTIO_MMIO_STATUS), self.model.status);
            return;
        }
        let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        let register = offset as u32;
        if register == VIRTIO_MMIO_STATUS {
            self.write_status(value);
            return;
        }
        self.transport.write(offset, data);
        let m = &mut self.model;
        let live = m.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => m.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => m.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES if m.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match m.driver_features_select {
                    0 => m.driver_features = (m.driver_features & !0xffff_ffff) | u64::from(value),
                    1 => {
                        m.driver_features =
                            (m.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => m.queue_select = value,
            VIRTIO_MMIO_QUEUE_READY if !live => {
                if let Some(ready) = m.ready.get_mut(m.queue_select as usize)
                    && !*ready
                {
                    *ready = value == 1;
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => m.interrupt &= !value,
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                for (index, event) in self.transport.queue_events().iter().enumerate() {
                    let signalled = event.read().is_ok();
                    assert_eq!(
                        signalled,
                        index as u32 == value,
                        "notify of queue {value} signalled queue {index}"
                    );
                }
            }
            _ => {}
        }
        for register in [
            VIRTIO_MMIO_STATUS,
            VIRTIO_MMIO_QUEUE_READY,
            VIRTIO_MMIO_QUEUE_NUM_MAX,
            VIRTIO_MMIO_INTERRUPT_STATUS,
            VIRTIO_MMIO_DEVICE_FEATURES,
        ] {
            assert_eq!(
                self.read32(register),
                self.expected(register),
                "register {register:#x} after a write of {value:#x} to {offset:#x}"
            );
        }
    }

    /// The driver may only add status bits, or write 0 to reset; FEATURES_OK sticks only
    /// for offered features; DRIVER_OK activates the device exactly when the negotiation
    /// is complete and every queue is good, and otherwise says why not.
    fn write_status(&mut self, value: u32) {
        let old = self.model.status;
        let (activations, resets, was_active) = {
            let seen = self.seen();
            (seen.activations, seen.resets, seen.active)
        };
        self.transport
            .write(VIRTIO_MMIO_STATUS.into(), &value.to_le_bytes());
        self.event_loop
            .run_once(0)
            .expect("the event loop runs the activation");
        let new = self.read32(VIRTIO_MMIO_STATUS);
        let (activated, reset, active) = {
            let seen = self.seen();
            (
                seen.activations - activations,
                seen.resets - resets,
                seen.active,
            )
        };
        if value == 0 {
            assert_eq!(new, 0, "reset left status {new:#x}");
            assert_eq!(
                reset,
                usize::from(was_active),
                "reset did not reach the device"
            );
            assert!(!active);
            self.model = Model {
                ready: vec![false; self.sizes.len()],
                ..Model::default()
            };
        } else {
            assert_eq!(reset, 0, "a reset without a write of 0");
            let added = value & !old;
            let required =
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
            if value & old != old {
                assert_eq!(new, old, "status bits cleared without a reset");
            } else if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
                && self.model.driver_features & !self.features != 0
            {
                assert_eq!(
                    new,
                    value & !VIRTIO_CONFIG_S_FEATURES_OK,
                    "FEATURES_OK accepted for features never offered"
                );
            } else if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !was_active {
                if value & required != required {
                    assert_eq!(new, value | VIRTIO_CONFIG_S_FAILED);
                    assert_eq!(activated, 0, "activated before negotiation");
                } else if activated == 1 {
                    assert_eq!(new, value, "activated, yet status says otherwise");
                    assert!(
                        self.model.ready.iter().all(|r| *r),
                        "activated with a queue the driver never made ready"
                    );
                    assert_eq!(self.seen().features, self.model.driver_features);
                } else {
                    assert_eq!(activated, 0);
                    assert_eq!(
                        new,
                        value | VIRTIO_CONFIG_S_NEEDS_RESET,
                        "not activated, and status does not say so"
                    );
                }
            } else {
                assert_eq!(new, value);
                assert_eq!(activated, 0, "activated without DRIVER_OK");
            }
            self.model.status = new;
        }
        assert_eq!(
            self.read32(VIRTIO_MMIO_INTERRUPT_STATUS),
            self.model.interrupt
        );
    }
}

/// The input format, for writing seeds.
pub struct Seed(Encoder);

impl Seed {
    pub fn new(sizes: &[u16], features: u64, fail: bool, config: &[u8]) -> Self {
        let mut e = Encoder::default();
        e.u8(sizes.len() as u8 - 1);
        for size in sizes {
            e.u16(*size);
        }
        e.u64(features)
            .u8(fail.into())
            .u8(config.len() as u8)
            .bytes(config);
        Self(e)
    }

    pub fn read(&mut self, offset: u16, len: u8) -> &mut Self {
        self.0.u8(op::READ).u16(offset).u8(len);
        self
    }

    pub fn write(&mut self, offset: u16, len: u8, value: u64) -> &mut Self {
        self.0.u8(op::WRITE).u16(offset).u8(len).u64(value);
        self
    }

    pub fn reg(&mut self, register: u32, value: u32) -> &mut Self {
        let index = REGISTERS
            .iter()
            .position(|r| *r == register)
            .expect("a known register");
        self.0.u8(op::REG).u8(index as u8).u32(value);
        self
    }

    pub fn raise(&mut self, which: u8) -> &mut Self {
        self.0.u8(op::RAISE).u8(which);
        self
    }

    pub fn queue(&mut self, index: u8, num: u16, desc: u64, avail: u64, used: u64) -> &mut Self {
        self.0
            .u8(op::QUEUE)
            .u8(index)
            .u16(num)
            .u64(desc)
            .u64(avail)
            .u64(used);
        self
    }

    pub fn handshake(&mut self, features: u64, driver_ok: bool) -> &mut Self {
        self.0.u8(op::HANDSHAKE).u64(features).u8(driver_ok.into());
        self
    }

    pub fn far(&mut self, offset: u64, len: u8) -> &mut Self {
        self.0.u8(op::FAR).u64(offset).u8(len);
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.0.clone()
    }
}
