//! Two microVMs at once, from one store, each with its own output and exit status; and
//! nothing of them left in this process afterwards (threads, descriptors).
//!
//!     TVIX_BOOT_KERNEL=... cargo run -p tvix-boot --example two_vms

use std::io::Read;

use tvix_boot::{MicroVm, RunningVm, Stdio};

mod common;

fn start(
    store: &std::sync::Arc<tvix_boot::Store>,
    busybox: &str,
    word: &str,
    status: u8,
) -> Result<RunningVm, tvix_boot::MicroVmError> {
    let script = format!("for i in $(seq 1000); do echo {word} $i; done; exit {status}");
    MicroVm::run(busybox)
        .args(["sh", "-c", &script])
        .store(store.clone())
        .memory(256 << 20)
        .stdin(Stdio::Null)
        .stdout(Stdio::Piped)
        .start()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (store, busybox) = common::store_with_busybox()?;
    let before = common::threads_and_fds();
    let mut first = start(&store, &busybox, "one", 3)?;
    let mut second = start(&store, &busybox, "two", 4)?;
    // Read both at once: each VM stalls while its pipe is full.
    let mut first_out = first.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        first_out.read_to_string(&mut text).map(|_| text)
    });
    let mut second_text = String::new();
    second
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut second_text)?;
    let first_text = reader.join().expect("reader thread")?;
    let statuses = (first.wait()?, second.wait()?);
    drop((first, second));
    let after = common::threads_and_fds_after(&before);

    let expected = |word: &str| {
        (1..=1000)
            .map(|i| format!("{word} {i}\n"))
            .collect::<String>()
    };
    println!(
        "first VM: {} lines, {:?}; second VM: {} lines, {:?}",
        first_text.lines().count(),
        statuses.0,
        second_text.lines().count(),
        statuses.1
    );
    println!("threads, descriptors: before {before:?}, after {after:?}");
    if first_text != expected("one") || second_text != expected("two") {
        return Err("the outputs are not each VM's own, complete".into());
    }
    if (statuses.0.code(), statuses.1.code()) != (Some(3), Some(4)) {
        return Err("wrong exit statuses".into());
    }
    if before != after {
        return Err("the VMs left threads or descriptors behind".into());
    }
    Ok(())
}
