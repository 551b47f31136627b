//! Throughput of a `--run` program's stdout and stdin, inside the QEMU TCG test host
//! (nested KVM), through the two channels tvix-boot has:
//!
//! - `ports`: the program's own streams on virtio-console ports (the default when
//!   stdin or stdout is not a terminal);
//! - `serial`: the program on the serial console (`--tty`), as every `--run` was before.
//!
//! stdout: the guest `cat`s a text file from the store (32 MiB through the ports, 256 KiB
//! through the serial console: every byte is a trapped port write there, a few KB/s
//! under TCG). stdin: the host pipes text in, the guest reads exactly that many bytes
//! (`head -c`; 32 MiB through the ports, 64 KiB through the serial console, whose
//! terminal is put in raw mode without echo first).
//! Reported in MB/s (KB/s when slower) of payload, boot included in neither (the time
//! of an empty run is subtracted). TCG stretches absolute numbers: read the ratio.
//!
//!     cargo bench -p tvix-boot-benches --bench program_streams

use std::time::Duration;

use tvix_boot_benches::median;
use tvix_boot_tests::{GUEST_KERNEL, TestHost, assets};

const RUNS: usize = 3;
const PORTS_BYTES: u64 = 32 << 20;
const SERIAL_STDOUT_BYTES: u64 = 256 << 10;
const SERIAL_STDIN_BYTES: u64 = 64 << 10;

const SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME=/tmp/store TVIX_BOOT_KERNEL={kernel}
mkdir -p /tmp/bb/bin /tmp/data
cp /bin/busybox /tmp/bb/bin/busybox
BB=$(tvix-boot store import /tmp/bb)/bin/busybox
# Text without control characters, so the serial console's line discipline passes it.
seq 1 100000000 | head -c {bytes} > /tmp/data/text
head -c {serial_out} /tmp/data/text > /tmp/data/serial-text
head -c {serial_in} /tmp/data/text > /tmp/serial-in
D=$(tvix-boot store import /tmp/data)
set +e
t() { read t _ < /proc/uptime; echo $t; }
run=0
while [ $run -lt {runs} ]; do
  run=$((run + 1))
  a=$(t); timeout 600 tvix-boot --run $BB -- true < /dev/null > /dev/null; b=$(t)
  echo "bench empty-ports $a $b"
  a=$(t); timeout 600 tvix-boot --run $BB -- cat $D/text < /dev/null > /tmp/out; b=$(t)
  echo "bench stdout-ports $a $b $(wc -c < /tmp/out)"
  a=$(t); timeout 600 tvix-boot --run $BB -- head -c {bytes} < /tmp/data/text > /dev/null; b=$(t)
  echo "bench stdin-ports $a $b {bytes}"
  a=$(t); timeout 600 tvix-boot --tty --run $BB -- true < /dev/null > /dev/null; b=$(t)
  echo "bench empty-serial $a $b"
  a=$(t); timeout 600 tvix-boot --tty --run $BB -- cat $D/serial-text < /dev/null > /tmp/out; b=$(t)
  echo "bench stdout-serial $a $b $(wc -c < /tmp/out)"
  a=$(t); timeout 600 tvix-boot --tty --run $BB -- sh -c "stty raw -echo; head -c {serial_in} > /dev/null" < /tmp/serial-in > /dev/null; b=$(t)
  echo "bench stdin-serial $a $b {serial_in}"
done
"#;

fn main() {
    tvix_boot_benches::bench_mode_only("program_streams");
    let tvix_boot = assets::tvix_boot_static().unwrap_or_else(|e| panic!("tvix-boot: {e}"));
    let script = SCRIPT
        .replace("{kernel}", GUEST_KERNEL)
        .replace("{bytes}", &PORTS_BYTES.to_string())
        .replace("{serial_out}", &SERIAL_STDOUT_BYTES.to_string())
        .replace("{serial_in}", &SERIAL_STDIN_BYTES.to_string())
        .replace("{runs}", &RUNS.to_string());
    let out = TestHost::builder()
        .tvix_boot(tvix_boot)
        .memory_mib(2048)
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
        .run(&script, &[], Duration::from_secs(3600))
        .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    assert!(out.success(), "{out}");

    let samples = |name: &str| -> Vec<(f64, Option<u64>)> {
        out.serial
            .lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("bench {name} ")))
            .map(|rest| {
                let w: Vec<&str> = rest.split_whitespace().collect();
                let t0: f64 = w[0].parse().unwrap();
                let t1: f64 = w[1].parse().unwrap();
                (t1 - t0, w.get(2).map(|n| n.parse().unwrap()))
            })
            .collect()
    };
    for channel in ["ports", "serial"] {
        let empty = median(
            samples(&format!("empty-{channel}"))
                .iter()
                .map(|s| s.0)
                .collect(),
        );
        for (direction, bytes) in [
            (
                "stdout",
                if channel == "ports" {
                    PORTS_BYTES
                } else {
                    SERIAL_STDOUT_BYTES
                },
            ),
            (
                "stdin",
                if channel == "ports" {
                    PORTS_BYTES
                } else {
                    SERIAL_STDIN_BYTES
                },
            ),
        ] {
            let runs = samples(&format!("{direction}-{channel}"));
            assert_eq!(runs.len(), RUNS, "{direction}-{channel}: {out}");
            for (_, n) in &runs {
                // The serial console turns "\n" into "\r\n": at least the payload.
                assert!(
                    n.unwrap_or(0) >= bytes,
                    "{direction}-{channel} lost bytes: {out}"
                );
            }
            let seconds = (median(runs.iter().map(|s| s.0).collect()) - empty).max(1e-3);
            // The serial console moves a few KB/s: MB/s with two decimals would read 0.00.
            let rate = bytes as f64 / seconds;
            let rate = if rate >= 1e6 {
                format!("{:7.2} MB/s", rate / 1e6)
            } else {
                format!("{:7.2} KB/s", rate / 1e3)
            };
            println!(
                "{direction:>6} via {channel:<6}: {rate}  ({} KiB in {seconds:.2} s beyond an empty run of {empty:.2} s)",
                bytes >> 10
            );
        }
    }
}
