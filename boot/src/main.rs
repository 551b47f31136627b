//! `tvix-boot`: boot a microVM whose /nix/store is served from a content-addressed store.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    tune_allocator();
    cli::main()
}

/// Fixed glibc malloc thresholds, for the 1 MiB buffers the store's streams pass around
/// (gRPC messages, blob chunks, NAR copies).
///
/// glibc's default moves its mmap threshold up to the size of the last large block
/// freed and its trim threshold to twice that. With a few 1 MiB blocks in flight, the
/// free space at the top of a thread's heap keeps crossing 2 MiB and is handed back to
/// the kernel, and the next block faults it in again, zeroed. Reading a 1 GiB blob over
/// `grpc+unix` spent most of its system time so (0.7 to 0.9 s); with these values 0.3 to
/// 0.4 s, and the whole read took 1.5 s instead of 1.8 s. `store export-nar` of the same
/// blob from the local store went from 0.9 to 0.45 s. The cost is up to 32 MiB of
/// free space kept at the top of a heap; blocks of 4 MiB and more are still mapped
/// on their own and returned when freed.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD: libc::c_int = 4 << 20;
        const TRIM_THRESHOLD: libc::c_int = 32 << 20;
        // SAFETY: mallopt only sets glibc's allocator parameters; no other thread exists yet.
        let set = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        };
        // mallopt fails only for values out of its range, which these are not; the
        // defaults would still work, only slower.
        debug_assert!(set, "mallopt refused the thresholds");
    }
}
