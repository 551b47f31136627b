//! End-to-end: the library's examples (boot/examples), built static and run in the test
//! host, where /dev/kvm is real. Each checks its own results and exits non-zero when one
//! is wrong; this test runs them and checks their reports too.
//!
//! - run_capture: a program's stdout as a String, and its status;
//! - two_vms: two VMs at once from one store, outputs separate and complete, statuses
//!   right, no threads or descriptors left in the process afterwards;
//! - stop_sleeping: `stop()` ends a guest whose program sleeps forever, promptly.

use std::time::Duration;

use tvix_boot_tests::{GUEST_KERNEL, GuestFile, TestHost, assets};

const TIMEOUT: Duration = Duration::from_secs(600);
const EXAMPLES: [&str; 3] = ["run_capture", "two_vms", "stop_sleeping"];

const SCRIPT: &str = r#"
export TVIX_BOOT_KERNEL={kernel}
for example in run_capture two_vms stop_sleeping; do
    echo "== $example"
    /bin/$example
    echo "$example-status=$?"
done
"#;

#[test]
fn the_library_examples_run_and_check_out() {
    let files: Vec<GuestFile> = EXAMPLES
        .iter()
        .map(|name| {
            let path = assets::build_static_example(name)
                .unwrap_or_else(|e| panic!("cannot build example {name}: {e}"));
            GuestFile::host(&format!("/bin/{name}"), path, 0o755)
        })
        .collect();
    let out = TestHost::builder()
        .with_static_tvix_boot()
        .memory_mib(2048)
        .run_checked(&SCRIPT.replace("{kernel}", GUEST_KERNEL), &files, TIMEOUT);
    for name in EXAMPLES {
        assert!(
            out.serial.contains(&format!("{name}-status=0")),
            "example {name} failed: {out}"
        );
    }
    assert!(out.serial.contains("hello from the guest\n"), "{out}");
    assert!(
        out.serial.contains("exit status: Guest(Exited(0))"),
        "{out}"
    );
    assert!(
        out.serial.contains(
            "first VM: 1000 lines, Guest(Exited(3)); second VM: 1000 lines, Guest(Exited(4))"
        ),
        "{out}"
    );
    // Promptly: well before the 30 s grace time would have killed it.
    let stopped = out
        .serial
        .lines()
        .find_map(|l| l.strip_prefix("stopped in "))
        .unwrap_or_else(|| panic!("no stop report: {out}"));
    eprintln!("stop() took {stopped}");
    assert!(stopped.ends_with(": Guest(Exited(143))"), "{out}");
}
