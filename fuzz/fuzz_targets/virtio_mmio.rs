//! A driver's register reads and writes against the virtio-mmio transport and a probe
//! device. Beyond not crashing: every register reads as a model of the driver-visible state
//! says (unknown, write-only and misaligned reads give zeros; configuration space reads the
//! device's bytes, then zeros); status bits are only added, or cleared by a reset, which
//! reaches an activated device exactly once; FEATURES_OK sticks only for offered features;
//! the device is activated exactly when DRIVER_OK follows a complete negotiation with every
//! queue ready and inside guest memory, and otherwise status says FAILED or NEEDS_RESET;
//! a queue notify signals that queue's eventfd and no other.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tvix_boot_fuzz::mmio::run(data);
});
