//! End-to-end: a guest booted by tvix-boot (inside the QEMU TCG test host, real nested KVM)
//! mounts the store over virtio-fs, tag `tvix`, and reads an imported tree with the same
//! checksums the host computes. Fails, never skips, when the test host cannot run.

use std::path::PathBuf;
use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::{
    GUEST_KERNEL, GuestFile, Initramfs, Suite, TVIX_BOOT, TestHost, TestHostOutput, assets,
};

const TIMEOUT: Duration = Duration::from_secs(300);
const GUEST_INITRD: &str = "/guest/initrd.cpio";

/// The static tvix-boot binary: $TVIX_BOOT_BIN, else built once for all tests.
fn tvix_boot_bin() -> PathBuf {
    assets::tvix_boot_static_once()
        .unwrap_or_else(|e| panic!("cannot get the static tvix-boot: {e}"))
}

/// The guest: mount the store, report what it sees of the path named by `tvix.path=`.
const GUEST_INIT: &str = r#"
mkdir -p /nix/store
if ! mount -t virtiofs -o ro tvix /nix/store; then
  echo guest-mount-failed
  cat /proc/cmdline; dmesg | grep -iE 'virtio|fuse|mmio'; ls -l /sys/bus/virtio/devices/
  for d in /sys/bus/virtio/devices/*; do echo "$d $(cat $d/device) $(cat $d/features) $(cat $d/status)"; done
fi
P=$(sed 's/.*tvix.path=\([^ ]*\).*/\1/' /proc/cmdline)
cd "$P" && find . -type f | sort | while read -r f; do echo "guest-sum $(sha256sum "$f")"; done
ls /nix/store | sed 's/^/guest-ls /'
echo "guest-link $(readlink "$P/link")"
test -x "$P/bin/tool" && echo guest-exec-ok
echo "guest-tool $("$P/link")"
echo "guest-many $(ls "$P/many" | wc -l)"
touch "$P/new" 2>/dev/null || echo guest-write-refused
stat -c 'guest-stat %a %u %g %Y' "$P/big"
poweroff -f
"#;

/// The test host: build a tree, import it into tvix-boot's embedded store, checksum it,
/// then boot the guest on that store.
const HOST_SCRIPT: &str = r#"
set -e
mkdir -p /tmp/tree/bin /tmp/tree/many /tmp/tree/empty-dir
seq 1 400000 > /tmp/tree/big
printf '#!/bin/sh\necho tool-ran\n' > /tmp/tree/bin/tool
chmod +x /tmp/tree/bin/tool
ln -s bin/tool /tmp/tree/link
: > /tmp/tree/empty-file
for i in $(seq 1 350); do echo "entry $i" > /tmp/tree/many/file-with-a-long-name-$i; done
export XDG_DATA_HOME=/tmp/data
P=$(tvix-boot store import /tmp/tree)
echo "host-path $P"
cd /tmp/tree && find . -type f | sort | while read -r f; do echo "host-sum $(sha256sum "$f")"; done
cd /
tvix-boot --kernel {kernel} --initrd {initrd} --cmdline "tvix.path=$P"
"#;

fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .collect()
}

pub const CHECKS: &[(&str, Check)] = &[(
    "guest_reads_an_imported_tree_over_virtio_fs",
    guest_reads_an_imported_tree_over_virtio_fs,
)];

pub fn suite() -> Suite {
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
    let initrd = Initramfs::busybox_init(&busybox, GUEST_INIT)
        .unwrap()
        .finish();
    let script = HOST_SCRIPT
        .replace("{kernel}", GUEST_KERNEL)
        .replace("{initrd}", GUEST_INITRD);
    Suite::new(
        "virtiofs_guest",
        TestHost::builder().tvix_boot(tvix_boot_bin()),
    )
    .case(
        "guest_reads_an_imported_tree_over_virtio_fs",
        &script.replace("tvix-boot ", &format!("{TVIX_BOOT} ")),
        vec![GuestFile::bytes(GUEST_INITRD, initrd, 0o644)],
        TIMEOUT,
    )
}

pub const TWO_CPUS_CHECKS: &[(&str, Check)] = &[(
    "parallel_reads_on_two_vcpus_use_two_request_queues",
    parallel_reads_on_two_vcpus_use_two_request_queues,
)];

/// A test host of its own with two CPUs, as before the suites: once, run after the
/// other case in one 2-CPU test host, this test host stopped printing anything (the
/// case's own deadline did not fire either) until it was killed.
pub fn two_cpus_suite() -> Suite {
    Suite::new(
        "virtiofs_guest_two_cpus",
        TestHost::builder().tvix_boot(tvix_boot_bin()).cpus(2),
    )
    .case(
        "parallel_reads_on_two_vcpus_use_two_request_queues",
        &PARALLEL_READ_SCRIPT.replace("{kernel}", GUEST_KERNEL),
        vec![],
        TIMEOUT,
    )
}

fn guest_reads_an_imported_tree_over_virtio_fs(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert_eq!(out.exit_code, Some(0), "{out}");

    let serial = &out.serial;
    assert!(!serial.contains("guest-mount-failed"), "{out}");
    let host_sums = lines_with(serial, "host-sum ");
    let guest_sums = lines_with(serial, "guest-sum ");
    assert_eq!(
        host_sums.len(),
        353,
        "host checksummed the whole tree: {out}"
    );
    assert_eq!(
        guest_sums, host_sums,
        "the guest reads different bytes than the host wrote"
    );

    let path = lines_with(serial, "host-path ")[0];
    let basename = path.trim_start_matches("/nix/store/");
    assert_eq!(lines_with(serial, "guest-ls "), vec![basename]);
    assert_eq!(lines_with(serial, "guest-link "), vec!["bin/tool"]);
    assert_eq!(lines_with(serial, "guest-tool "), vec!["tool-ran"]);
    assert_eq!(lines_with(serial, "guest-many "), vec!["350"]);
    assert!(
        serial.contains("guest-exec-ok") && serial.contains("guest-write-refused"),
        "{out}"
    );
    assert_eq!(lines_with(serial, "guest-stat "), vec!["444 0 0 1"]);
}

/// Two vCPUs read two files at once (each reader pinned to its own vCPU): Linux 6.11+
/// sends each CPU's requests down its own request queue, so both queues carry reads.
/// tvix-boot logs the count per queue when the device stops.
const PARALLEL_READ_SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME=/tmp/data TVIX_BOOT_KERNEL={kernel}
mkdir -p /tmp/bb/bin /tmp/files
cp /bin/busybox /tmp/bb/bin/busybox
BB=$(tvix-boot store import /tmp/bb)
head -c 16777216 /dev/urandom > /tmp/files/a
head -c 16777216 /dev/urandom > /tmp/files/b
F=$(tvix-boot store import /tmp/files)
set +e
TVIX_BOOT_LOG=info tvix-boot --cpus 2 --run "$BB/bin/busybox" -- sh -c \
  "$BB/bin/busybox taskset 1 $BB/bin/busybox sha256sum $F/a & $BB/bin/busybox taskset 2 $BB/bin/busybox sha256sum $F/b & wait" \
  > /tmp/out 2> /tmp/log
echo "parallel-status=$?"
sed 's/^/parallel-out /' /tmp/out
grep -o 'virtio-fs requests per queue: .*' /tmp/log | sed 's/^/parallel-/'
cd /tmp/files && sha256sum a b | sed 's/^/host-sum /'
"#;

fn parallel_reads_on_two_vcpus_use_two_request_queues(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert!(out.serial.contains("parallel-status=0"), "{out}");

    // Both files read whole and right (stdout also carries the console's lines).
    let digest = |line: &str| line.split_whitespace().next().unwrap_or("").to_owned();
    let mut host_sums: Vec<String> = lines_with(&out.serial, "host-sum ")
        .into_iter()
        .map(digest)
        .collect();
    let mut guest_sums: Vec<String> = lines_with(&out.serial, "parallel-out ")
        .into_iter()
        .filter(|line| line.contains("-files/"))
        .map(digest)
        .collect();
    host_sums.sort_unstable();
    guest_sums.sort_unstable();
    assert_eq!(host_sums.len(), 2, "{out}");
    assert_eq!(guest_sums, host_sums, "{out}");

    // "requests per queue: hiprio 0, q1 300, q2 290": both request queues carried a
    // share of the 32 MiB read (at most 1 MiB per request: at least 16 requests each).
    let counts = lines_with(&out.serial, "parallel-virtio-fs requests per queue: ");
    let counts = counts
        .first()
        .unwrap_or_else(|| panic!("no per-queue counts in tvix-boot's log: {out}"));
    let per_queue: Vec<u64> = counts
        .split(", ")
        .map(|entry| {
            entry
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("bad per-queue entry {entry:?} in {counts:?}"))
        })
        .collect();
    assert_eq!(
        per_queue.len(),
        3,
        "hiprio and two request queues: {counts}"
    );
    assert!(
        per_queue[1] >= 16 && per_queue[2] >= 16,
        "both request queues carried reads: {counts}"
    );
}
