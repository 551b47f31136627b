//! `stop()` of a guest whose program would sleep forever: the guest's init ends it with
//! SIGTERM and powers off, promptly.
//!
//!     TVIX_BOOT_KERNEL=... cargo run -p tvix-boot --example stop_sleeping

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use tvix_boot::{MicroVm, Stdio};

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (store, busybox) = common::store_with_busybox()?;
    let before = common::threads_and_fds();
    let mut vm = MicroVm::run(&busybox)
        .args(["sh", "-c", "echo sleeping; exec sleep 1000000"])
        .store(store)
        .stdin(Stdio::Null)
        .stdout(Stdio::Piped)
        .stop_grace(Duration::from_secs(30))
        .start()?;
    let mut stdout = BufReader::new(vm.stdout.take().expect("piped"));
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    print!("guest: {line}");

    let asked = Instant::now();
    vm.stop();
    let status = vm.wait()?;
    let took = asked.elapsed();
    drop((vm, stdout));
    let after = common::threads_and_fds_after(&before);
    println!("stopped in {took:?}: {status:?}");
    println!("threads, descriptors: before {before:?}, after {after:?}");
    // 128 + SIGTERM, reported by the guest: it stopped on request, not by the grace
    // time running out (that would be Killed, after 30 s).
    if status.code() != Some(143) {
        return Err("the guest did not end its program on request".into());
    }
    if before != after {
        return Err("the VM left threads or descriptors behind".into());
    }
    Ok(())
}
