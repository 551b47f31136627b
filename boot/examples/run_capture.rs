//! Runs a program from the store in a microVM and captures its stdout as a String.
//!
//!     TVIX_BOOT_KERNEL=... cargo run -p tvix-boot --example run_capture

use std::io::Read;

use tvix_boot::{MicroVm, Stdio};

mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (store, busybox) = common::store_with_busybox()?;
    let mut vm = MicroVm::run(&busybox)
        .args(["sh", "-c", "echo hello from the guest; uname -sr"])
        .store(store)
        .stdin(Stdio::Null)
        .stdout(Stdio::Piped)
        .start()?;
    let mut output = String::new();
    // End of file comes when the VM is gone.
    vm.stdout
        .take()
        .expect("piped")
        .read_to_string(&mut output)?;
    let status = vm.wait()?;
    print!("{output}");
    println!("exit status: {status:?}");
    if status.code() != Some(0) || !output.starts_with("hello from the guest\n") {
        return Err("the guest's program did not say hello".into());
    }
    Ok(())
}
