//! Wall time of `tvix-boot --run` of a static hello (boot/demo/hello.c) inside the QEMU
//! TCG test host (nested KVM): from starting tvix-boot to its exit, guest boot, program
//! and power-off included. Also prints the size of the initrd tvix-boot builds for it.
//! TCG stretches absolute times; compare runs taken in the same test host.
//!
//!     cargo bench -p tvix-boot-benches --bench run_hello

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tvix_boot_tests::{GUEST_KERNEL, GuestFile, TestHost, assets};

const RUNS: usize = 5;

const HOST_SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME=/tmp/data TVIX_BOOT_KERNEL={kernel}
HELLO=$(tvix-boot store import /input/hello)
TVIX_BOOT_LOG=info tvix-boot --run "$HELLO/bin/hello" 2>&1 | sed -n 's/.*initrd built in memory: \([0-9]*\) bytes.*/bench-initrd-bytes \1/p'
run=0
while [ $run -lt {runs} ]; do
  run=$((run + 1))
  read t0 _ < /proc/uptime
  tvix-boot --run "$HELLO/bin/hello" > /tmp/out
  read t1 _ < /proc/uptime
  grep -q "Hello from a tvix-boot guest" /tmp/out
  echo "bench-run $t0 $t1"
done
"#;

fn main() {
    tvix_boot_benches::bench_mode_only("run_hello");
    let work = tempfile::tempdir().unwrap();
    let hello = work.path().join("hello");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boot/demo/hello.c");
    let status = Command::new("cc")
        .args(["-static", "-Os", "-o"])
        .arg(&hello)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("cc (apt-get install build-essential): {e}"));
    assert!(status.success(), "cc -static {} failed", source.display());

    let tvix_boot = assets::tvix_boot_static().unwrap_or_else(|e| panic!("tvix-boot: {e}"));
    let script = HOST_SCRIPT
        .replace("{kernel}", GUEST_KERNEL)
        .replace("{runs}", &RUNS.to_string());
    let out = TestHost::builder()
        .tvix_boot(tvix_boot)
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
        .run(
            &script,
            &[GuestFile::host("/input/hello/bin/hello", &hello, 0o755)],
            Duration::from_secs(900),
        )
        .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    assert!(out.success(), "{out}");

    let mut times = Vec::new();
    for line in out.serial.lines().map(str::trim) {
        if let Some(bytes) = line.strip_prefix("bench-initrd-bytes ") {
            println!("initrd for --run: {bytes} bytes");
        } else if let Some(run) = line.strip_prefix("bench-run ") {
            let (t0, t1) = run.split_once(' ').expect("two uptimes");
            let seconds = t1.parse::<f64>().unwrap() - t0.parse::<f64>().unwrap();
            println!("tvix-boot --run hello: {seconds:.2} s");
            times.push(seconds);
        }
    }
    assert_eq!(times.len(), RUNS, "{out}");
    times.sort_by(f64::total_cmp);
    println!(
        "median of {RUNS}: {:.2} s (min {:.2} s, max {:.2} s)",
        times[RUNS / 2],
        times[0],
        times[RUNS - 1]
    );
}
