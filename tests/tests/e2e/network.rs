//! End-to-end: the guest's network, in the QEMU TCG test host.
//!
//! - without `--net` a guest has `lo` and nothing else, and `lo` works;
//! - with `--net` (passt, Debian's package, started by tvix-boot) the guest downloads
//!   64 MiB from an HTTP server on the test host's loopback, through the gateway
//!   address, and the sha256 matches;
//! - `--publish` lets the test host reach a server in the guest;
//! - killing passt gives the guest network errors, not a hung VM;
//! - `--net tap=NAME`: tvix-boot opens a tap device (creating it, as root), the test host
//!   gives its end 10.0.2.2/24, and the guest fetches a file from a server there.
//!
//! Needs passt and busybox-static on the build machine. Fails, never skips.

use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::tree::last_value;
use tvix_boot_tests::{GUEST_KERNEL, Suite, TestHost, TestHostOutput, assets, qemu};

const TIMEOUT: Duration = Duration::from_secs(300);

/// The store gets busybox as `$BB`; the test host's loopback serves /suite/www on port
/// 8000 (busybox httpd), with a 64 MiB file whose sha256 is `$SUM`.
const SETUP: &str = r#"
set -e
export XDG_DATA_HOME=/suite/data TVIX_BOOT_KERNEL={kernel}
{uplink}mkdir -p /suite/bb/bin /suite/www
cp /bin/busybox /suite/bb/bin/busybox
ln -s busybox /suite/bb/bin/sh
BB=$(tvix-boot store import /suite/bb)
dd if=/dev/urandom of=/suite/www/blob bs=1M count=64 2>/dev/null
echo small > /suite/www/small
SUM=$(sha256sum /suite/www/blob | cut -d' ' -f1)
busybox httpd -p 127.0.0.1:8000 -h /suite/www
set +e
"#;

pub const CHECKS: &[(&str, Check)] = &[
    (
        "without_net_the_guest_has_a_working_lo_and_nothing_else",
        without_net_the_guest_has_a_working_lo_and_nothing_else,
    ),
    (
        "with_net_the_guest_downloads_from_the_hosts_loopback",
        with_net_the_guest_downloads_from_the_hosts_loopback,
    ),
    (
        "a_published_port_reaches_a_server_in_the_guest",
        a_published_port_reaches_a_server_in_the_guest,
    ),
    (
        "killing_passt_gives_the_guest_network_errors_not_a_hung_vm",
        killing_passt_gives_the_guest_network_errors_not_a_hung_vm,
    ),
    (
        "a_tap_device_carries_the_guests_traffic",
        a_tap_device_carries_the_guests_traffic,
    ),
];

/// A server and a client on the guest's 127.0.0.1, and the guest's interfaces.
const LOOPBACK: &str = r#"
tvix-boot --timeout 120 --run $BB/bin/sh -- -c "
  B=$BB/bin/busybox
  echo \"interfaces=\$(\$B ls /sys/class/net | \$B tr '\\n' ' ')\"
  \$B nc -l -p 7000 > /got &
  \$B sleep 1
  echo hello-over-lo | \$B nc 127.0.0.1 7000
  wait
  echo \"lo-got=\$(\$B cat /got)\"
"
echo "status=$?"
"#;

/// 64 MiB from the test host's loopback, through the gateway (passt maps it there).
const DOWNLOAD: &str = r#"
tvix-boot --net --timeout 240 --run $BB/bin/sh -- -c "
  B=$BB/bin/busybox
  echo \"interfaces=\$(\$B ls /sys/class/net | \$B tr '\\n' ' ')\"
  \$B ip -4 addr show eth0 | \$B grep inet
  \$B ip route | \$B grep default
  \$B cat /etc/resolv.conf
  start=\$(\$B cut -d' ' -f1 /proc/uptime)
  echo \"download-sum=\$(\$B wget -q -O - http://10.0.2.2:8000/blob | \$B sha256sum | \$B cut -d' ' -f1)\"
  end=\$(\$B cut -d' ' -f1 /proc/uptime)
  echo \"download-seconds=\$start \$end\"
"
echo "status=$?"
echo "expected-sum=$SUM"
"#;

/// A guest web server, published as the test host's port 8080.
const PUBLISH: &str = r#"
tvix-boot --net --publish 8080:80 --timeout 240 --run $BB/bin/sh -- -c "
  B=$BB/bin/busybox
  \$B mkdir -p /www && echo published-hello > /www/index.html
  exec \$B httpd -f -p 80 -h /www
" > /tmp/guest.out 2>&1 &
VM=$!
got=
for i in $(seq 1 120); do
  # Not wget -T: busybox 1.35's static wget segfaults with it.
  got=$(timeout 10 wget -q -O - http://127.0.0.1:8080/index.html 2>/dev/null) && break
  sleep 1
done
echo "host-got=$got"
kill -TERM $VM
wait $VM
echo "status=$?"
cat /tmp/guest.out
"#;

/// passt is killed while the guest runs: its next download fails within its own
/// timeout, and the VM ends normally.
const KILL_PASST: &str = r#"
tvix-boot --net --timeout 240 --run $BB/bin/sh -- -c "
  B=$BB/bin/busybox
  \$B wget -q -O /dev/null http://10.0.2.2:8000/small && echo first-download-ok
  \$B sleep 8
  \$B timeout 20 \$B wget -q -O /dev/null http://10.0.2.2:8000/small
  echo \"after-kill=\$?\"
" > /tmp/guest.out 2>&1 &
VM=$!
for i in $(seq 1 120); do
  grep -q first-download-ok /tmp/guest.out && break
  sleep 0.5
done
echo "passt-pids=$(pidof passt)"
kill -9 $(pidof passt)
wait $VM
echo "status=$?"
cat /tmp/guest.out
"#;

/// `--net tap=tap0`: the guest waits until the test host has put 10.0.2.2/24 on its
/// end of the tap (which tvix-boot's TUNSETIFF creates) and serves a file there.
const TAP: &str = r#"
tvix-boot --net tap=tap0 --timeout 240 --run $BB/bin/sh -- -c "
  B=$BB/bin/busybox
  \$B ip -4 addr show eth0 | \$B grep inet
  for i in \$(\$B seq 1 100); do
    \$B wget -q -O - http://10.0.2.2:8001/small > /got 2>/dev/null && break
    \$B sleep 0.2
  done
  echo \"tap-got=\$(\$B cat /got)\"
" > /tmp/guest.out 2>&1 &
VM=$!
for i in $(seq 1 200); do
  ip link show tap0 > /dev/null 2>&1 && break
  sleep 0.05
done
ip addr add 10.0.2.2/24 dev tap0
ip link set tap0 up
busybox httpd -p 10.0.2.2:8001 -h /suite/www
wait $VM
echo "status=$?"
cat /tmp/guest.out
"#;

pub fn suite() -> Suite {
    let passt = qemu::binary_with_libraries(std::path::Path::new("/usr/bin/passt"))
        .unwrap_or_else(|e| panic!("passt (apt-get install passt): {e}"));
    Suite::new(
        "network",
        TestHost::builder().with_static_tvix_boot().memory_mib(1536),
    )
    .setup(
        &SETUP
            .replace("{kernel}", GUEST_KERNEL)
            .replace("{uplink}", assets::UPLINK_SETUP),
        TIMEOUT,
    )
    .files(passt)
    .case(
        "without_net_the_guest_has_a_working_lo_and_nothing_else",
        LOOPBACK,
        vec![],
        TIMEOUT,
    )
    .case(
        "with_net_the_guest_downloads_from_the_hosts_loopback",
        DOWNLOAD,
        vec![],
        TIMEOUT,
    )
    .case(
        "a_published_port_reaches_a_server_in_the_guest",
        PUBLISH,
        vec![],
        TIMEOUT,
    )
    .case(
        "killing_passt_gives_the_guest_network_errors_not_a_hung_vm",
        KILL_PASST,
        vec![],
        TIMEOUT,
    )
    .case(
        "a_tap_device_carries_the_guests_traffic",
        TAP,
        vec![],
        TIMEOUT,
    )
}

/// The last `key=value` line's value.
fn value<'a>(out: &'a TestHostOutput, key: &str) -> Option<&'a str> {
    last_value(&out.serial, key).map(str::trim)
}

fn finished(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert!(out.success(), "the case's script failed: {out}");
}

fn without_net_the_guest_has_a_working_lo_and_nothing_else(out: &TestHostOutput) {
    finished(out);
    assert_eq!(value(out, "status"), Some("0"), "{out}");
    assert_eq!(value(out, "interfaces"), Some("lo"), "{out}");
    assert_eq!(value(out, "lo-got"), Some("hello-over-lo"), "{out}");
}

fn with_net_the_guest_downloads_from_the_hosts_loopback(out: &TestHostOutput) {
    finished(out);
    assert_eq!(value(out, "status"), Some("0"), "{out}");
    assert_eq!(value(out, "interfaces"), Some("eth0 lo"), "{out}");
    let text = out.script_output();
    assert!(text.contains("inet 10.0.2.15/24"), "{out}");
    assert!(text.contains("default via 10.0.2.2 dev eth0"), "{out}");
    assert!(text.contains("nameserver 10.0.2.3"), "{out}");
    let expected = value(out, "expected-sum").expect("the setup's sum");
    assert_eq!(expected.len(), 64, "{out}");
    assert_eq!(value(out, "download-sum"), Some(expected), "{out}");
    if let Some((start, end)) = value(out, "download-seconds").and_then(|v| v.split_once(' '))
        && let (Ok(start), Ok(end)) = (start.parse::<f64>(), end.parse::<f64>())
    {
        eprintln!(
            "network: 64 MiB from the test host's loopback in {:.1} s (guest clock, TCG-stretched)",
            end - start
        );
    }
}

fn a_published_port_reaches_a_server_in_the_guest(out: &TestHostOutput) {
    finished(out);
    assert_eq!(value(out, "host-got"), Some("published-hello"), "{out}");
    // SIGTERM went to the guest's httpd, which it ends: 128 + 15.
    assert_eq!(value(out, "status"), Some("143"), "{out}");
}

fn killing_passt_gives_the_guest_network_errors_not_a_hung_vm(out: &TestHostOutput) {
    finished(out);
    let text = out.script_output();
    assert!(text.contains("first-download-ok"), "{out}");
    assert!(
        value(out, "passt-pids").is_some_and(|pids| !pids.is_empty()),
        "passt ran: {out}"
    );
    let after = value(out, "after-kill").unwrap_or_else(|| panic!("no after-kill: {out}"));
    assert_ne!(after, "0", "a download without passt failed: {out}");
    assert_eq!(
        value(out, "status"),
        Some("0"),
        "the VM ended normally: {out}"
    );
}

fn a_tap_device_carries_the_guests_traffic(out: &TestHostOutput) {
    finished(out);
    assert_eq!(value(out, "status"), Some("0"), "{out}");
    // Without passt the guest gets the same defaults.
    assert!(out.script_output().contains("inet 10.0.2.15/24"), "{out}");
    assert_eq!(value(out, "tap-got"), Some("small"), "{out}");
}
