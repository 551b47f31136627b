//! A guest's virtio-fs request queue, laid out in guest memory by the input (descriptor
//! addresses, lengths, flags, chaining, indirect tables, ring indexes, FUSE bytes) and
//! served by the device's own queue pass and FUSE server over a small store. Beyond not
//! crashing or hanging: every chain with a valid head is answered once, in order, with a
//! used length no larger than the chain's writable bytes; each reply is a FUSE out header
//! whose `len` is the used length and whose `unique` is the request's, an error reply has
//! no body; the device writes nothing outside the reply buffers and the used ring; it gives
//! up on the queue only when the driver offers more chains than the queue holds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tvix_boot_fuzz::virtiofs::run(data);
});
