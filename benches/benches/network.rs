//! The guest's network, three stacks side by side in one QEMU TCG test host (nested KVM):
//!
//! - `tvix-boot --net`: tvix-boot's virtio-net device on its event loop, passt started by
//!   tvix-boot (MTU 65,520);
//! - `qemu+passt`: QEMU microvm with virtio-net-device on `-netdev stream` to the same
//!   passt, with passt's MTU (`host_mtu=65520`), the pairing passt is made for;
//! - `qemu-user`: QEMU microvm with `-netdev user` (libslirp, MTU 1500).
//!
//! Every stack boots the same bzImage and the same busybox initrd, whose init sets
//! eth0 to 10.0.2.15/24 via 10.0.2.2 (the host's loopback in all three) and runs
//! `net-probe` (tests/src/bin) against `net-probe` servers on the test host's loopback:
//!
//! - guest to host: 64 MiB sent to a sink, MB/s;
//! - host to guest: 64 MiB read from a source, MB/s;
//! - connect: 200 connections one after another (open, close, seen closed), ms each.
//!
//! Absolute numbers are stretched by TCG; compare the stacks within one run. Run:
//!
//!     cargo bench -p tvix-boot-benches --bench network

use std::time::Duration;

use tvix_boot_benches::median;
use tvix_boot_tests::{GuestFile, Initramfs, TVIX_BOOT, TestHost, assets, qemu};

const RUNS: usize = 3;
const STACKS: [&str; 3] = ["tvix-boot", "qemu+passt", "qemu-user"];
const BYTES: u64 = 64 << 20;
const CONNECTS: u32 = 200;
const GUEST_INITRD: &str = "/guest/initrd.cpio";
const GUEST_BZIMAGE: &str = "/guest/bzImage";

/// The guest: its network as tvix-boot's init would set it, then the three measurements.
const GUEST_INIT: &str = r#"
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "bench-mtu $(cat /sys/class/net/eth0/mtu)"
net-probe send 10.0.2.2:9000 {bytes}
net-probe recv 10.0.2.2:9001
net-probe connect 10.0.2.2:9000 {connects}
poweroff -f
"#;

const HOST_SCRIPT: &str = r#"
{uplink}net-probe sink 9000 &
net-probe source 9001 {bytes} &
qemu() {
  qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 1 -m 512 \
    -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
    "$@" -kernel {bzimage} -initrd {initrd} -append "console=ttyS0 reboot=k panic=-1 quiet"
}
run=0
while [ $run -lt {runs} ]; do
  run=$((run + 1))
  echo "bench-stack tvix-boot"
  tvix-boot --net --kernel {bzimage} --initrd {initrd} --cpus 1 --memory 512M
  echo "bench-stack qemu+passt"
  rm -f /tmp/passt.sock
  # As root, passt wants a user to become, and the test host has no passwd to look
  # "nobody" up in (tvix-boot passes the same).
  passt --foreground --quiet --runas 65534:65534 --socket /tmp/passt.sock \
    --address 10.0.2.15 --netmask 24 \
    --gateway 10.0.2.2 2>/dev/null &
  PASST=$!
  # Bounded: a passt that did not start fails the run rather than hang it.
  n=0
  while [ ! -S /tmp/passt.sock ]; do
    n=$((n + 1)); [ $n -lt 200 ] || { echo "passt did not start"; exit 1; }
    sleep 0.05
  done
  qemu -netdev stream,id=n0,server=off,addr.type=unix,addr.path=/tmp/passt.sock \
    -device virtio-net-device,netdev=n0,host_mtu=65520
  kill $PASST; wait $PASST
  echo "bench-stack qemu-user"
  qemu -netdev user,id=n0 -device virtio-net-device,netdev=n0
done
"#;

#[derive(Default)]
struct Sample {
    tx_mb_s: f64,
    rx_mb_s: f64,
    connect_ms: f64,
}

/// `key=value` from a net-probe line.
fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

fn main() {
    tvix_boot_benches::bench_mode_only("network");
    let tvix_boot = assets::tvix_boot_static().unwrap_or_else(|e| panic!("tvix-boot: {e}"));
    let net_probe = assets::net_probe_static_once().unwrap_or_else(|e| panic!("net-probe: {e}"));
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));

    let guest_init = GUEST_INIT
        .replace("{bytes}", &BYTES.to_string())
        .replace("{connects}", &CONNECTS.to_string());
    let mut initrd = Initramfs::busybox_init(&busybox, &guest_init)
        .unwrap_or_else(|e| panic!("guest initrd: {e}"));
    initrd
        .host_file("/bin/net-probe", 0o755, &net_probe)
        .unwrap_or_else(|e| panic!("guest initrd: {e}"));
    let mut files = qemu::microvm_files().unwrap_or_else(|e| panic!("QEMU: {e}"));
    files.extend(
        qemu::binary_with_libraries(std::path::Path::new("/usr/bin/passt"))
            .unwrap_or_else(|e| panic!("passt (apt-get install passt): {e}")),
    );
    files.push(GuestFile::host("/bin/net-probe", &net_probe, 0o755));
    files.push(GuestFile::host(
        GUEST_BZIMAGE,
        vmlinux.with_file_name("bzImage"),
        0o644,
    ));
    files.push(GuestFile::bytes(GUEST_INITRD, initrd.finish(), 0o644));

    let script = HOST_SCRIPT
        .replace("{uplink}", assets::UPLINK_SETUP)
        .replace("{bytes}", &BYTES.to_string())
        .replace("{runs}", &RUNS.to_string())
        .replace("{bzimage}", GUEST_BZIMAGE)
        .replace("{initrd}", GUEST_INITRD)
        .replace("tvix-boot ", &format!("{TVIX_BOOT} "));
    let out = TestHost::builder()
        .tvix_boot(tvix_boot)
        .memory_mib(2048)
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
        .run(&script, &files, Duration::from_secs(2400))
        .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    assert!(out.success(), "{out}");

    let mut stack = String::new();
    let mut samples: Vec<(String, Sample)> = Vec::new();
    for line in out.serial.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("bench-stack ") {
            stack = name.to_owned();
            samples.push((stack.clone(), Sample::default()));
        } else if let Some(mtu) = line.strip_prefix("bench-mtu ") {
            println!("{stack:>12}: guest MTU {mtu}");
        } else if line.starts_with("net-probe ") {
            let sample = &mut samples
                .last_mut()
                .unwrap_or_else(|| panic!("a result before any stack: {out}"))
                .1;
            if line.starts_with("net-probe send ") {
                assert_eq!(field(line, "bytes") as u64, BYTES, "{line}");
                sample.tx_mb_s = BYTES as f64 / 1e6 / field(line, "seconds");
            } else if line.starts_with("net-probe recv ") {
                assert_eq!(
                    field(line, "bytes") as u64,
                    BYTES,
                    "{stack}: every byte: {line}"
                );
                sample.rx_mb_s = BYTES as f64 / 1e6 / field(line, "seconds");
            } else if line.starts_with("net-probe connect ") {
                sample.connect_ms = field(line, "seconds") * 1e3 / f64::from(CONNECTS);
            }
        }
    }
    for (stack, s) in &samples {
        assert!(
            s.tx_mb_s > 0.0 && s.rx_mb_s > 0.0 && s.connect_ms > 0.0,
            "{stack} did not finish every measurement: {out}"
        );
        println!(
            "{stack:>12}: guest->host {:7.1} MB/s   host->guest {:7.1} MB/s   connect {:6.2} ms",
            s.tx_mb_s, s.rx_mb_s, s.connect_ms
        );
    }
    assert_eq!(samples.len(), STACKS.len() * RUNS, "every stack ran: {out}");
    for name in STACKS {
        let mine: Vec<&Sample> = samples
            .iter()
            .filter(|(s, _)| s == name)
            .map(|(_, s)| s)
            .collect();
        let median_of = |f: fn(&Sample) -> f64| median(mine.iter().map(|s| f(s)).collect());
        println!(
            "{name:>12} median of {RUNS}: guest->host {:7.1} MB/s   host->guest {:7.1} MB/s   connect {:6.2} ms",
            median_of(|s| s.tx_mb_s),
            median_of(|s| s.rx_mb_s),
            median_of(|s| s.connect_ms)
        );
    }
}
