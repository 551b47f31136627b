//! virtio-console with MULTIPORT: control and port queues laid out by the input, driven one
//! device-thread pass at a time (deterministic; the threads only add poll(2) around the
//! same passes). Beyond not crashing or hanging: every chain taken is returned once, in
//! order, no longer than its writable bytes; the device writes nothing outside the buffers
//! and used rings; what the guest writes to an output port reaches the host byte for byte;
//! input reaches the guest in order and only once the driver opened the port; the device's
//! control messages are well-formed, about ports the driver has set up, and cut short only
//! by a full buffer; the device agrees with the driver on which ports are open.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tvix_boot_fuzz::console::run(data);
});
