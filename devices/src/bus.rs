//! A bus maps address ranges (I/O ports or guest-physical MMIO addresses) to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through port I/O or MMIO accesses.
///
/// `offset` is relative to the base address the device was registered at, so a device
/// does not need to know where it lives. The access width is `data.len()`.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the vCPU threads that may access it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Why a device could not be registered on a [`Bus`].
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum BusError {
    /// `len` is zero, or `base + len` overflows.
    #[error("cannot register {name}: range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { name: String, base: u64, len: u64 },
    /// The range overlaps one registered before (`other`).
    #[error(
        "cannot register {name} at {base:#x}+{len:#x}: overlaps {other} at {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        name: String,
        base: u64,
        len: u64,
        other: String,
        other_base: u64,
        other_len: u64,
    },
}

struct Entry {
    name: String,
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    // Keyed by base address; ranges never overlap, so the candidate for an address is
    // the entry with the greatest base <= address.
    entries: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`. `name` appears in error messages.
    pub fn insert(
        &self,
        name: &str,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::InvalidRange {
                name: name.to_owned(),
                base,
                len,
            });
        };
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        // The only ranges that can overlap [base, end) are the last one starting below
        // `end`; anything starting at or after `end` cannot.
        if let Some((&other_base, other)) = entries.range(..end).next_back()
            && other_base + other.len > base
        {
            return Err(BusError::Overlap {
                name: name.to_owned(),
                base,
                len,
                other: other.name.clone(),
                other_base,
                other_len: other.len,
            });
        }
        entries.insert(
            base,
            Entry {
                name: name.to_owned(),
                len,
                device,
            },
        );
        Ok(())
    }

    /// Finds the device covering the whole access `[addr, addr + size)`.
    fn resolve(&self, addr: u64, size: usize) -> Option<(SharedDevice, u64)> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = entries.range(..=addr).next_back()?;
        let offset = addr - base;
        // The guest picks the access width: an access that straddles the end of the
        // range is not the device's.
        if offset.checked_add(size as u64)? > entry.len {
            return None;
        }
        Some((entry.device.clone(), offset))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(&device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                lock(&device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on if another vCPU thread panicked while holding it: device
/// state stays usable and the panic itself is reported when that thread is joined.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let bus = Bus::new();
        let recorder = Arc::new(Mutex::new(Recorder::default()));
        bus.insert("rec", 0x100, 0x10, recorder.clone()).unwrap();

        let mut data = [0u8; 2];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data, [5, 5]);
        assert!(bus.write(0x10f, &[7]));
        assert_eq!(recorder.lock().unwrap().writes, vec![(0xf, vec![7])]);

        assert!(!bus.read(0xff, &mut data), "below the range");
        assert!(!bus.write(0x110, &[1]), "past the range");
        assert!(!bus.write(0x10f, &[1, 2]), "straddles the end");
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert("a", 0x100, 0x10, dev()).unwrap();
        assert!(matches!(
            bus.insert("b", 0x10f, 1, dev()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("c", 0xf0, 0x11, dev()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("d", 0x200, 0, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert("e", u64::MAX, 2, dev()),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert("f", 0x110, 0x10, dev()).unwrap();
        bus.insert("g", 0xf0, 0x10, dev()).unwrap();
    }
}
