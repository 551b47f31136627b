//! End-to-end: a guest booted by tvix-boot (inside the QEMU TCG test host, real nested KVM)
//! mounts the store over virtio-fs, tag `tvix`, and reads an imported tree with the same
//! checksums the host computes. Fails, never skips, when the test host cannot run.

use std::path::PathBuf;
use std::time::Duration;

use tvix_boot_tests::{GUEST_KERNEL, GuestFile, Initramfs, TVIX_BOOT, TestHost, assets};

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

#[test]
fn guest_reads_an_imported_tree_over_virtio_fs() {
    let host = TestHost::builder()
        .tvix_boot(tvix_boot_bin())
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
    let initrd = Initramfs::busybox_init(&busybox, GUEST_INIT)
        .unwrap()
        .finish();
    let script = HOST_SCRIPT
        .replace("{kernel}", GUEST_KERNEL)
        .replace("{initrd}", GUEST_INITRD);
    let out = host
        .run(
            &script.replace("tvix-boot ", &format!("{TVIX_BOOT} ")),
            &[GuestFile::bytes(GUEST_INITRD, initrd, 0o644)],
            TIMEOUT,
        )
        .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    eprintln!("{out}");
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
