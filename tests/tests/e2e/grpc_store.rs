//! End-to-end: the store as a service, in one boot of the QEMU TCG test host.
//!
//! The setup imports what the cases need into a store that already holds Debian's
//! CPython (tests/nix/python.nix, copied in with `nix copy`), and starts four servers of
//! it: `tvix-boot store daemon` on a unix socket and on TCP loopback, and two lying
//! servers (`lying-store`, the daemon's code over a store that lies about one path). Then:
//!
//! - `tvix-boot --run` with only `grpc+unix://` addresses (no local store to fall back
//!   on) runs CPython with an import-heavy script, whose output must be right; the same
//!   over `grpc+http://` (TCP);
//! - `tvix-boot store virtiofs` with `grpc+unix://` addresses serves QEMU (microvm, KVM
//!   in the test host), whose guest lists an imported tree that must match the source;
//! - a guest whose store is a lying server gets EIO, and no wrong bytes, for a file whose
//!   blob's bytes are flipped and for a directory served with an entry planted in it;
//! - SIGTERM to the daemon while a guest is in the middle of reading a 64 MiB file over
//!   it: the guest still reads the whole file right, then the daemon exits 0.
//!
//! How fast CPython starts over each is the benchmark `grpc_run_start`, not a test.
//!
//! Needs nix-bin, patchelf, python3.11, qemu-system-x86 and busybox-static on the build
//! machine. Fails, never skips.

use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::testhost::shell_quote;
use tvix_boot_tests::tree::{LIST_TREE, MAKE_TREE, TREE_ENTRIES, lines_with};
use tvix_boot_tests::{
    GUEST_KERNEL, GuestFile, Initramfs, Suite, TestHost, TestHostOutput, assets, cpython, qemu,
};

const GUEST_INITRD: &str = "/guest/initrd.cpio";
const GUEST_BZIMAGE: &str = "/guest/bzImage";
/// The file read across the daemon's SIGTERM: large enough that most of its chunks are
/// asked for after the signal.
const LARGE_MIB: u32 = 64;
/// The grace time the unix daemon gets: far longer than the read across SIGTERM, so an
/// exit before it shows the daemon left when its client did.
const GRACE_SECS: u32 = 120;

/// For the setup and every case: shell functions (a case does not inherit them).
const COMMON: &str = r#"
# remote ADDRESS COMMAND...: COMMAND with ADDRESS as every store service and no local
# store to fall back on.
remote() {
  address=$1; shift
  env XDG_DATA_HOME=/nonexistent BLOB_SERVICE_ADDR="$address" \
    DIRECTORY_SERVICE_ADDR="$address" PATH_INFO_SERVICE_ADDR="$address" "$@"
}
# wait_until COMMAND...: until COMMAND succeeds, for 120 s at most (a guest's boot on a
# busy build machine included).
wait_until() {
  tries=0
  until "$@"; do
    tries=$((tries + 1))
    if [ $tries -gt 1200 ]; then echo "gave up waiting for: $*"; return 1; fi
    sleep 0.1
  done
}
# prefixed PREFIX FILE: FILE's lines, each after PREFIX and a space.
prefixed() { sed "s/^/$1 /" "$2"; }
"#;

const SETUP: &str = r#"
set -e
export XDG_DATA_HOME={data_home} TVIX_BOOT_KERNEL={kernel}
ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up
mkdir -p /suite/program /suite/busybox/bin /suite/lied/sub /suite/large

printf '%s' {program} > /suite/program/check.py
PROGRAM=$(tvix-boot store import /suite/program)

make_tree /suite/tree 8
TREE=$(tvix-boot store import /suite/tree)
list_tree /suite/tree host-entry store > /suite/host-listing

# Programs for guests whose store is a lying server (the lies are about $LIED only).
cp /bin/busybox /suite/busybox/bin/busybox
for tool in sh cat ls dd head sha256sum sleep; do ln -s busybox /suite/busybox/bin/$tool; done
BUSYBOX=$(tvix-boot store import /suite/busybox)

printf 'small file, flipped in the middle\n' > /suite/lied/small
dd if=/dev/urandom of=/suite/lied/big bs=1M count=5 2>/dev/null
echo inner > /suite/lied/sub/inner
LIED=$(tvix-boot store import /suite/lied)
LIED_BIG_HEAD=$(head -c 1048576 /suite/lied/big | sha256sum | cut -d' ' -f1)

dd if=/dev/urandom of=/suite/large/file bs=1M count={large_mib} 2>/dev/null
LARGE=$(tvix-boot store import /suite/large)
LARGE_SHA=$(sha256sum < /suite/large/file | cut -d' ' -f1)

# in_background NAME COMMAND...: COMMAND's output goes to /suite/NAME.log, its pid to
# /suite/NAME.pid and, when it ends, its exit status to /suite/NAME.status: the cases
# cannot `wait` for what the setup started.
in_background() {
  name=$1; shift
  (set +e; "$@" > /suite/$name.log 2>&1 & echo $! > /suite/$name.pid; wait $!
   echo $? > /suite/$name.status) &
}
in_background daemon-unix tvix-boot store daemon --listen /run/store.sock --shutdown-grace {grace}s
in_background daemon-tcp tvix-boot store daemon --listen 127.0.0.1:7000
in_background liar-flip lying-store /run/flip.sock flip-blobs "$LIED"
in_background liar-plant lying-store /run/plant.sock plant-directories "$LIED"
if ! { wait_until test -S /run/store.sock && wait_until grep -q serving /suite/daemon-tcp.log &&
       wait_until grep -q 'lying on' /suite/liar-flip.log &&
       wait_until grep -q 'lying on' /suite/liar-plant.log; }; then
  for log in /suite/*.log; do prefixed "$log" "$log"; done
  exit 1
fi
U=grpc+unix:///run/store.sock
T=grpc+http://127.0.0.1:7000
FLIP=grpc+unix:///run/flip.sock
PLANT=grpc+unix:///run/plant.sock
"#;

const CPYTHON_UNIX: &str = r#"
echo python-begin
remote "$U" tvix-boot --run {python}/bin/python3.11 -- "$PROGRAM/check.py"
echo "python-status=$?"
echo python-end
echo "socket-mode $(stat -c %a /run/store.sock)"
prefixed daemon-log /suite/daemon-unix.log
"#;

const CPYTHON_TCP: &str = r#"
echo python-begin
remote "$T" tvix-boot --run {python}/bin/python3.11 -- "$PROGRAM/check.py"
echo "python-status=$?"
echo python-end
prefixed daemon-log /suite/daemon-tcp.log
"#;

/// The QEMU guest: mount the store the backend serves and list the tree.
const QEMU_GUEST_INIT: &str = r#"
mkdir -p /nix/store
mount -t virtiofs tvix /nix/store || echo guest-mount-failed
P=$(sed 's/.*tree.path=\([^ ]*\).*/\1/' /proc/cmdline)
list_tree "$P" guest-entry stat
poweroff -f
"#;

const VIRTIOFS_QEMU: &str = r#"
cat /suite/host-listing
# Not through `remote`: $! must be tvix-boot's own pid (env execs it), not a subshell's
# that SIGTERM would end, leaving tvix-boot behind, connected to the daemon.
env XDG_DATA_HOME=/nonexistent BLOB_SERVICE_ADDR="$U" DIRECTORY_SERVICE_ADDR="$U" \
  PATH_INFO_SERVICE_ADDR="$U" tvix-boot store virtiofs --socket /run/vfs.sock --threads 2 \
  2> /tmp/backend.log &
BACKEND=$!
wait_until test -S /run/vfs.sock
qemu-system-x86_64 -M microvm,memory-backend=mem -enable-kvm -cpu host -smp 1 -m 256 \
  -object memory-backend-memfd,id=mem,size=256M,share=on \
  -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
  -chardev socket,id=vfs,path=/run/vfs.sock \
  -device vhost-user-fs-device,chardev=vfs,tag=tvix,queue-size=1024,num-request-queues=2 \
  -kernel {bzimage} -initrd {initrd} \
  -append "console=ttyS0 reboot=k panic=-1 quiet tree.path=$TREE"
echo "qemu-exit $?"
kill -TERM $BACKEND; wait $BACKEND
echo "backend-exit $?"
prefixed backend-log /tmp/backend.log
"#;

/// Each guest program's stdout and stderr come back apart (`--run` with a pipe or file
/// for each); they are printed line by line with their own prefixes.
const LYING: &str = r#"
echo "lied-about $LIED"
echo "expected-big-head $LIED_BIG_HEAD"

# A small file whose bytes the server flips: fetched whole and checked before its first
# byte is handed out.
remote "$FLIP" tvix-boot --run "$BUSYBOX/bin/cat" -- "$LIED/small" > /tmp/out 2> /tmp/err
echo "flip-cat-status=$?"
echo "flip-cat-stdout-bytes=$(wc -c < /tmp/out)"
prefixed flip-cat-stderr /tmp/err

# A 5 MiB file, read chunk by chunk: its first MiB is right, the chunk with the flipped
# byte is EIO.
remote "$FLIP" tvix-boot --run "$BUSYBOX/bin/sh" -- -c \
  'head -c 1048576 "$1" | sha256sum; sha256sum "$1"; echo "sha256sum-status=$?"' sh "$LIED/big" \
  > /tmp/out 2> /tmp/err
echo "flip-big-status=$?"
prefixed flip-big-stdout /tmp/out
prefixed flip-big-stderr /tmp/err

remote "$FLIP" tvix-boot store export-nar "$LIED" > /dev/null 2> /tmp/err
echo "flip-export-status=$?"
prefixed flip-export-stderr /tmp/err

# Directories below $LIED come with a planted entry: the path's own (honest) directory
# is read, sub is EIO.
remote "$PLANT" tvix-boot --run "$BUSYBOX/bin/sh" -- -c \
  'cat "$1/small"; ls "$1/sub"; echo "ls-status=$?"; cat "$1/sub/inner"; echo "cat-inner-status=$?"' \
  sh "$LIED" > /tmp/out 2> /tmp/err
echo "plant-status=$?"
prefixed plant-stdout /tmp/out
prefixed plant-stderr /tmp/err

remote "$PLANT" tvix-boot store export-nar "$LIED" > /dev/null 2> /tmp/err
echo "plant-export-status=$?"
prefixed plant-export-stderr /tmp/err
"#;

/// The guest's reader starts 5 s late, so its `dd` stops on a full pipe after a MiB or
/// two; the host signals the daemon meanwhile, and the rest of the file is asked for
/// after the signal.
const SIGTERM_MID_READ: &str = r#"
remote "$U" tvix-boot --run "$BUSYBOX/bin/sh" -- -c \
  'echo reading; dd if="$1" bs=1M 2>/dev/null | { sleep 5; sha256sum; }' sh "$LARGE/file" \
  > /tmp/out 2> /tmp/err &
RUN=$!
wait_until grep -q reading /tmp/out
kill -TERM "$(cat /suite/daemon-unix.pid)"
echo "signalled $(cut -d' ' -f1 /proc/uptime)"
wait_until test ! -e /run/store.sock && echo socket-removed
if [ -e /suite/daemon-unix.status ]; then echo daemon-gone-during-the-read; fi
wait $RUN
echo "run-status=$?"
echo "run-ended $(cut -d' ' -f1 /proc/uptime)"
prefixed run-stdout /tmp/out
prefixed run-stderr /tmp/err
echo "expected-sha $LARGE_SHA"
wait_until test -e /suite/daemon-unix.status
echo "daemon-unix-exit $(cat /suite/daemon-unix.status) $(cut -d' ' -f1 /proc/uptime)"
kill -TERM "$(cat /suite/daemon-tcp.pid)"
wait_until test -e /suite/daemon-tcp.status
echo "daemon-tcp-exit $(cat /suite/daemon-tcp.status)"
prefixed daemon-log /suite/daemon-unix.log
"#;

pub const CHECKS: &[(&str, Check)] = &[
    (
        "cpython_runs_with_only_grpc_unix_addresses",
        cpython_runs_with_only_grpc_unix_addresses,
    ),
    ("cpython_runs_over_grpc_tcp", cpython_runs_over_grpc_tcp),
    (
        "store_virtiofs_over_grpc_serves_qemu",
        store_virtiofs_over_grpc_serves_qemu,
    ),
    (
        "a_lying_daemon_gives_the_guest_eio",
        a_lying_daemon_gives_the_guest_eio,
    ),
    // Last: it stops the daemons.
    (
        "sigterm_lets_a_running_request_finish_then_exits_0",
        sigterm_lets_a_running_request_finish_then_exits_0,
    ),
];

pub fn suite() -> Suite {
    let tvix_boot = assets::tvix_boot_static_once()
        .unwrap_or_else(|e| panic!("cannot get the static tvix-boot: {e}"));
    let lying_store = assets::lying_store_static_once()
        .unwrap_or_else(|e| panic!("cannot get the static lying-store: {e}"));
    let work = tempfile::tempdir().unwrap();
    let (python, mut files) = cpython::closure_in_store(&tvix_boot, work.path());
    files.push(GuestFile::host("/bin/lying-store", lying_store, 0o755));

    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
    let initrd = Initramfs::busybox_init(&busybox, &format!("{LIST_TREE}{QEMU_GUEST_INIT}"))
        .unwrap_or_else(|e| panic!("guest initrd: {e}"))
        .finish();
    let mut qemu_files = qemu::microvm_files().unwrap_or_else(|e| panic!("QEMU: {e}"));
    qemu_files.push(GuestFile::host(
        GUEST_BZIMAGE,
        vmlinux.with_file_name("bzImage"),
        0o644,
    ));
    qemu_files.push(GuestFile::bytes(GUEST_INITRD, initrd, 0o644));

    let setup = format!("{COMMON}{MAKE_TREE}{LIST_TREE}{SETUP}")
        .replace("{data_home}", cpython::DATA_HOME)
        .replace("{kernel}", GUEST_KERNEL)
        .replace("{program}", &shell_quote(cpython::PROGRAM))
        .replace("{large_mib}", &LARGE_MIB.to_string())
        .replace("{grace}", &GRACE_SECS.to_string());
    let case = |script: &str| {
        format!("{COMMON}{script}")
            .replace("{python}", &python)
            .replace("{bzimage}", GUEST_BZIMAGE)
            .replace("{initrd}", GUEST_INITRD)
    };
    let minutes = |m: u64| Duration::from_secs(60 * m);
    Suite::new(
        "grpc_store",
        TestHost::builder().tvix_boot(&tvix_boot).memory_mib(3072),
    )
    .files(files)
    .setup(&setup, minutes(5))
    .case(
        "cpython_runs_with_only_grpc_unix_addresses",
        &case(CPYTHON_UNIX),
        vec![],
        minutes(5),
    )
    .case(
        "cpython_runs_over_grpc_tcp",
        &case(CPYTHON_TCP),
        vec![],
        minutes(5),
    )
    .case(
        "store_virtiofs_over_grpc_serves_qemu",
        &case(VIRTIOFS_QEMU),
        qemu_files,
        minutes(5),
    )
    .case(
        "a_lying_daemon_gives_the_guest_eio",
        &case(LYING),
        vec![],
        minutes(5),
    )
    .case(
        "sigterm_lets_a_running_request_finish_then_exits_0",
        &case(SIGTERM_MID_READ),
        vec![],
        minutes(5),
    )
    .hold(work)
}

/// The import-heavy script's output, which must be right, between its markers.
fn check_cpython(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert!(out.success(), "{out}");
    let guest = out
        .between("python-begin", "python-end")
        .unwrap_or_else(|| panic!("no python-begin ... python-end: {out}"));
    assert!(guest.contains("python-checks ok"), "{out}");
    assert!(out.serial.contains("python-status=0"), "{out}");
    let modules: usize = lines_with(guest, "python-modules ")
        .first()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no python-modules line: {out}"));
    assert!(modules > 150, "an import-heavy start: {modules} modules");
}

fn cpython_runs_with_only_grpc_unix_addresses(out: &TestHostOutput) {
    check_cpython(out);
    // The daemon: a private socket, one line per client.
    assert_eq!(lines_with(&out.serial, "socket-mode "), ["600"], "{out}");
    let log = lines_with(&out.serial, "daemon-log ").join("\n");
    assert!(
        log.contains("client connected: pid") && log.contains("(tvix-boot)"),
        "the daemon names its client: {log}"
    );
}

fn cpython_runs_over_grpc_tcp(out: &TestHostOutput) {
    check_cpython(out);
    let log = lines_with(&out.serial, "daemon-log ").join("\n");
    assert!(
        log.contains("client connected: 127.0.0.1:"),
        "the TCP daemon names its client: {log}"
    );
}

fn store_virtiofs_over_grpc_serves_qemu(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert!(out.success(), "{out}");
    let serial = &out.serial;
    assert!(!serial.contains("guest-mount-failed"), "{out}");
    let host = lines_with(serial, "host-entry ");
    let guest = lines_with(serial, "guest-entry ");
    assert_eq!(host.len(), TREE_ENTRIES, "the host listed the whole tree");
    assert_eq!(
        guest, host,
        "the QEMU guest sees the tree as the source: {out}"
    );
    assert_eq!(lines_with(serial, "qemu-exit "), ["0"], "{out}");
    assert_eq!(lines_with(serial, "backend-exit "), ["0"], "{out}");
}

/// The value after `key=` on its own line.
fn value<'a>(out: &'a TestHostOutput, key: &str) -> &'a str {
    tvix_boot_tests::tree::last_value(&out.serial, key)
        .unwrap_or_else(|| panic!("no {key}= line: {out}"))
}

fn a_lying_daemon_gives_the_guest_eio(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert!(out.success(), "{out}");
    let serial = &out.serial;
    // tvix-boot's own warnings (which name the blob or directory) share stderr with the
    // guest program's: the program's line is the one that starts with its name.
    let eio = |prefix: &str, program: &str| {
        let lines = lines_with(serial, prefix);
        assert!(
            lines.iter().any(
                |l| l.starts_with(&format!("{program}: ")) && l.ends_with("Input/output error")
            ),
            "{prefix}: the guest's {program} says EIO: {lines:#?}\n{out}"
        );
    };

    // The small file: cat fails, having written nothing.
    assert_ne!(value(out, "flip-cat-status"), "0", "{out}");
    assert_eq!(value(out, "flip-cat-stdout-bytes"), "0", "{out}");
    eio("flip-cat-stderr ", "cat");

    // The large one: its first MiB comes right, its whole is EIO and never hashed.
    let head = lines_with(serial, "expected-big-head ");
    assert_eq!(head.len(), 1, "{out}");
    let stdout = lines_with(serial, "flip-big-stdout ");
    assert_eq!(
        stdout.first().map(|l| l.split_whitespace().next()),
        Some(Some(head[0])),
        "the first MiB, before the flipped byte, reads right: {out}"
    );
    assert_eq!(
        stdout.iter().filter(|l| l.contains("/big")).count(),
        0,
        "no digest of the whole lied-about file: {out}"
    );
    assert!(
        stdout.contains(&"sha256sum-status=1"),
        "sha256sum of the whole file fails: {out}"
    );
    eio("flip-big-stderr ", "sha256sum");

    // The host command fails, naming the blob.
    assert_eq!(value(out, "flip-export-status"), "1", "{out}");
    let export = lines_with(serial, "flip-export-stderr ").join("\n");
    assert!(export.contains("blob b3:"), "names the blob: {export}");

    // The planted directory entry: the path's own directory is honest and read; sub,
    // and the file in it, are EIO, and the planted entry is never listed.
    let stdout = lines_with(serial, "plant-stdout ");
    assert_eq!(
        stdout.first().copied(),
        Some("small file, flipped in the middle"),
        "{out}"
    );
    assert!(
        stdout
            .iter()
            .any(|l| l.starts_with("ls-status=") && *l != "ls-status=0"),
        "ls of the lied-about directory fails: {out}"
    );
    assert!(
        stdout
            .iter()
            .any(|l| l.starts_with("cat-inner-status=") && *l != "cat-inner-status=0"),
        "a file in the lied-about directory cannot be read: {out}"
    );
    assert!(
        !stdout
            .iter()
            .any(|l| l.contains("planted") || *l == "inner"),
        "nothing of the lied-about directory reaches the guest's program: {out}"
    );
    eio("plant-stderr ", "ls");
    eio("plant-stderr ", "cat");
    assert_eq!(value(out, "plant-export-status"), "1", "{out}");
    let export = lines_with(serial, "plant-export-stderr ").join("\n");
    assert!(
        export.contains("directory") && export.contains("b3:"),
        "names the directory: {export}"
    );
}

fn uptime_after(out: &TestHostOutput, prefix: &str) -> f64 {
    lines_with(&out.serial, prefix)
        .last()
        .and_then(|l| l.split_whitespace().last())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}line with an uptime: {out}"))
}

fn sigterm_lets_a_running_request_finish_then_exits_0(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert!(out.success(), "{out}");
    let serial = &out.serial;
    assert!(serial.contains("socket-removed"), "no new clients: {out}");
    assert!(
        !serial.contains("daemon-gone-during-the-read"),
        "the daemon left while its client was reading: {out}"
    );
    // The guest read the whole file right.
    assert_eq!(value(out, "run-status"), "0", "{out}");
    let expected = lines_with(serial, "expected-sha ");
    assert_eq!(expected.len(), 1, "{out}");
    let got = lines_with(serial, "run-stdout ");
    assert!(
        got.iter()
            .any(|l| l.split_whitespace().next() == Some(expected[0])),
        "the guest's sha256 of the file read across SIGTERM: {got:?}, expected {}: {out}",
        expected[0]
    );
    // Then the daemon exited 0, when its client had gone, not at the end of its grace.
    let exit = lines_with(serial, "daemon-unix-exit ");
    assert_eq!(
        exit.first().and_then(|l| l.split_whitespace().next()),
        Some("0"),
        "{out}"
    );
    let signalled = uptime_after(out, "signalled ");
    let run_ended = uptime_after(out, "run-ended ");
    let daemon_exited = uptime_after(out, "daemon-unix-exit ");
    assert!(
        run_ended > signalled + 1.0,
        "the guest was still reading after the signal: {out}"
    );
    assert!(
        daemon_exited - signalled < f64::from(GRACE_SECS) - 20.0,
        "the daemon left {:.1} s after the signal: it waited for the grace time ({GRACE_SECS} s), \
         not for its client: {out}",
        daemon_exited - signalled
    );
    assert_eq!(lines_with(serial, "daemon-tcp-exit "), ["0"], "{out}");
    let log = lines_with(serial, "daemon-log ").join("\n");
    assert!(log.contains("signal 15"), "{log}");
}
