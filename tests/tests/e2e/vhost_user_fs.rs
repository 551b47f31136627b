//! End-to-end: `tvix-boot store virtiofs` as the vhost-user-fs backend of the real peer,
//! QEMU (Debian's, microvm with KVM inside the QEMU TCG test host). The guest mounts tag
//! `tvix` and lists an imported tree; every entry must match the source: sha256 of each
//! file, the store's modes, symlink targets. Writes must fail with EROFS from the backend
//! itself (the guest mounts read-write). Fails, never skips, when the test host cannot run.

use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::tree::{LIST_TREE, MAKE_TREE, TREE_ENTRIES, lines_with};
use tvix_boot_tests::{
    GuestFile, Initramfs, Suite, TVIX_BOOT, TestHost, TestHostOutput, assets, qemu,
};

const TIMEOUT: Duration = Duration::from_secs(600);
const GUEST_INITRD: &str = "/guest/initrd.cpio";
const GUEST_BZIMAGE: &str = "/guest/bzImage";
const LARGE_MIB: u32 = 64;

/// The guest: mount read-write (so only the backend can refuse writes), list the tree
/// named by `tree.path=`, run its executable, try to write.
const GUEST_INIT: &str = r#"
mkdir -p /nix/store
mount -t virtiofs tvix /nix/store || echo guest-mount-failed
P=$(sed 's/.*tree.path=\([^ ]*\).*/\1/' /proc/cmdline)
list_tree "$P" guest-entry stat
echo "guest-tool $("$P/link-to-tool")"
touch "$P/new-file" 2>&1 | sed 's/^/guest-write /'
mkdir "$P/new-dir" 2>&1 | sed 's/^/guest-write /'
(echo more >> "$P/many/f1") 2>&1 | sed 's/^/guest-write /'
rm "$P/empty-file" 2>&1 | sed 's/^/guest-write /'
poweroff -f
"#;

const HOST_SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME=/data
make_tree /tree {large_mib}
P=$(tvix-boot store import /tree)
echo "host-path $P"
list_tree /tree host-entry store
tvix-boot store virtiofs --socket /run/tvix-vfs.sock --threads 2 2> /run/backend.log &
BACKEND=$!
while [ ! -S /run/tvix-vfs.sock ]; do sleep 0.1; done
echo "socket-mode $(stat -c %a /run/tvix-vfs.sock)"
qemu-system-x86_64 -M microvm,memory-backend=mem -enable-kvm -cpu host -smp 1 -m 256 \
  -object memory-backend-memfd,id=mem,size=256M,share=on \
  -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
  -chardev socket,id=vfs,path=/run/tvix-vfs.sock \
  -device vhost-user-fs-device,chardev=vfs,tag=tvix,queue-size=1024,num-request-queues=2 \
  -kernel {bzimage} -initrd {initrd} \
  -append "console=ttyS0 reboot=k panic=-1 quiet tree.path=$P"
echo "qemu-exit $?"
sleep 1
kill -TERM $BACKEND
set +e
wait $BACKEND
echo "backend-exit $?"
if [ -e /run/tvix-vfs.sock ]; then echo socket-left; else echo socket-removed; fi
sed 's/^/backend-log /' /run/backend.log
"#;

pub const CHECKS: &[(&str, Check)] = &[(
    "qemu_guest_reads_an_imported_tree_through_the_vhost_user_backend",
    qemu_guest_reads_an_imported_tree_through_the_vhost_user_backend,
)];

pub fn suite() -> Suite {
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
    let initrd = Initramfs::busybox_init(&busybox, &format!("{LIST_TREE}{GUEST_INIT}"))
        .unwrap_or_else(|e| panic!("guest initrd: {e}"))
        .finish();
    let mut files = qemu::microvm_files().unwrap_or_else(|e| panic!("QEMU: {e}"));
    files.push(GuestFile::host(
        GUEST_BZIMAGE,
        vmlinux.with_file_name("bzImage"),
        0o644,
    ));
    files.push(GuestFile::bytes(GUEST_INITRD, initrd, 0o644));
    let script = format!("{MAKE_TREE}{LIST_TREE}{HOST_SCRIPT}")
        .replace("{large_mib}", &LARGE_MIB.to_string())
        .replace("{bzimage}", GUEST_BZIMAGE)
        .replace("{initrd}", GUEST_INITRD)
        .replace("tvix-boot ", &format!("{TVIX_BOOT} "));
    Suite::new(
        "vhost_user_fs",
        TestHost::builder().with_static_tvix_boot().memory_mib(2048),
    )
    .case(
        "qemu_guest_reads_an_imported_tree_through_the_vhost_user_backend",
        &script,
        files,
        TIMEOUT,
    )
}

fn qemu_guest_reads_an_imported_tree_through_the_vhost_user_backend(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert_eq!(out.exit_code, Some(0), "{out}");
    let serial = &out.serial;
    assert!(!serial.contains("guest-mount-failed"), "{out}");

    let host = lines_with(serial, "host-entry ");
    let guest = lines_with(serial, "guest-entry ");
    assert_eq!(host.len(), TREE_ENTRIES, "the host listed the whole tree");
    for (h, g) in host.iter().zip(&guest) {
        assert_eq!(g, h, "the guest sees an entry differently from the source");
    }
    assert_eq!(guest.len(), host.len(), "the guest lists as many entries");

    assert_eq!(lines_with(serial, "guest-tool "), ["tool-ran"]);
    let writes = lines_with(serial, "guest-write ");
    assert_eq!(writes.len(), 4, "every write attempt failed: {writes:?}");
    assert!(
        writes.iter().all(|w| w.contains("Read-only file system")),
        "writes fail with EROFS: {writes:?}"
    );
    assert_eq!(lines_with(serial, "socket-mode "), ["600"]);
    assert_eq!(lines_with(serial, "qemu-exit "), ["0"]);
    assert_eq!(lines_with(serial, "backend-exit "), ["0"], "{out}");
    assert!(
        serial.contains("socket-removed"),
        "SIGTERM removes the socket"
    );
    let log = lines_with(serial, "backend-log ").join("\n");
    assert!(
        log.contains("frontend connected: pid") && log.contains("(qemu-system-x86)"),
        "the backend names its frontend: {log}"
    );
    assert!(log.contains("disconnected"), "{log}");
}
