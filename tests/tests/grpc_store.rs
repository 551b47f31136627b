//! End-to-end: the store as a service, in one boot of the QEMU TCG test host.
//!
//! - `tvix-boot store daemon` serves the embedded store on a unix socket (and a second
//!   daemon on TCP loopback);
//! - a second process, `tvix-boot --run` with only `grpc+unix://` addresses (no embedded
//!   store to fall back on), runs Debian's CPython (tests/nix/python.nix) with an
//!   import-heavy script, whose output must be right; then the start of the same run is
//!   timed from the local store, over grpc+unix and over TCP, side by side (printed as
//!   `grpc-bench` lines; the goal is within 1.2x of local);
//! - `tvix-boot store virtiofs` with `grpc+unix://` addresses serves QEMU (microvm, KVM
//!   in the test host), whose guest lists an imported tree that must match the source;
//! - SIGTERM ends both daemons with status 0.
//!
//! Needs nix-bin, patchelf, python3.11, qemu-system-x86 and busybox-static on the build
//! machine. Fails, never skips.

use std::path::Path;
use std::time::Duration;

use tvix_boot_tests::nix::{ServeNar, nix, nix_build, run};
use tvix_boot_tests::testhost::shell_quote;
use tvix_boot_tests::tree::{LIST_TREE, MAKE_TREE, TREE_ENTRIES, lines_with};
use tvix_boot_tests::{GUEST_KERNEL, GuestFile, Initramfs, TVIX_BOOT, TestHost, assets, qemu};

const TIMEOUT: Duration = Duration::from_secs(1200);
const GUEST_INITRD: &str = "/guest/initrd.cpio";
const GUEST_BZIMAGE: &str = "/guest/bzImage";
/// Timed runs of each kind.
const RUNS: usize = 3;

/// Imports much of the standard library (hundreds of files, C extension modules) and
/// uses each module a little.
const PYTHON_PROGRAM: &str = r#"
import sys, json, ssl, sqlite3, decimal, ctypes, hashlib, bz2, lzma, uuid, asyncio, csv
import zoneinfo, unicodedata, xml.etree.ElementTree as ET, email.parser, multiprocessing
import argparse, logging, http.client, urllib.request, subprocess, tempfile, pathlib
import dataclasses, typing, statistics, fractions, datetime, textwrap, pprint, shutil
checks = [
    sqlite3.connect(":memory:").execute("select 6*7").fetchone() == (42,),
    str(decimal.Decimal(1) / 8) == "0.125",
    hashlib.sha256(b"abc").hexdigest().startswith("ba7816bf"),
    lzma.decompress(lzma.compress(b"tvix")) == b"tvix",
    asyncio.run(asyncio.sleep(0, result=7)) == 7,
    json.loads(json.dumps({"a": [1, 2]})) == {"a": [1, 2]},
    ET.fromstring('<a b="1"/>').get("b") == "1",
    statistics.mean([1, 2, 3]) == 2,
    unicodedata.name("λ") == "GREEK SMALL LETTER LAMDA",
]
print("python-modules", len(sys.modules))
print("python-checks", "ok" if all(checks) else "failed")
"#;

/// The QEMU guest: mount the store the backend serves and list the tree.
const GUEST_INIT: &str = r#"
mkdir -p /nix/store
mount -t virtiofs tvix /nix/store || echo guest-mount-failed
P=$(sed 's/.*tree.path=\([^ ]*\).*/\1/' /proc/cmdline)
list_tree "$P" guest-entry stat
poweroff -f
"#;

const HOST_SCRIPT: &str = r#"
export XDG_DATA_HOME=/input/data TVIX_BOOT_KERNEL={kernel}
ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up
mkdir -p /tmp/program && printf '%s' {program} > /tmp/program/check.py
PROGRAM=$(tvix-boot store import /tmp/program)
make_tree /tree 8
TREE=$(tvix-boot store import /tree)
list_tree /tree host-entry store

tvix-boot store daemon --listen /run/store.sock 2> /run/daemon-unix.log &
UNIX_DAEMON=$!
tvix-boot store daemon --listen 127.0.0.1:7000 2> /run/daemon-tcp.log &
TCP_DAEMON=$!
while [ ! -S /run/store.sock ]; do sleep 0.1; done
while ! grep -q serving /run/daemon-tcp.log; do sleep 0.1; done
echo "socket-mode $(stat -c %a /run/store.sock)"
U=grpc+unix:///run/store.sock
T=grpc+http://127.0.0.1:7000

# Only remote addresses: the embedded store is out of reach.
remote() {
  A=$1; shift
  env XDG_DATA_HOME=/nonexistent BLOB_SERVICE_ADDR=$A DIRECTORY_SERVICE_ADDR=$A \
    PATH_INFO_SERVICE_ADDR=$A "$@"
}
python_run() {
  case $1 in
    local) tvix-boot --run {python}/bin/python3.11 -- "$PROGRAM/check.py" ;;
    unix) remote $U tvix-boot --run {python}/bin/python3.11 -- "$PROGRAM/check.py" ;;
    tcp) remote $T tvix-boot --run {python}/bin/python3.11 -- "$PROGRAM/check.py" ;;
  esac
}
echo python-begin
python_run unix
echo "python-status=$?"
echo python-end

for i in {runs}; do
  for kind in local unix tcp; do
    start=$(cut -d' ' -f1 /proc/uptime)
    python_run $kind > /tmp/out 2>&1
    status=$?
    end=$(cut -d' ' -f1 /proc/uptime)
    echo "grpc-bench $kind $start $end $status $(grep -c 'python-checks ok' /tmp/out)"
  done
done

env XDG_DATA_HOME=/nonexistent BLOB_SERVICE_ADDR=$U DIRECTORY_SERVICE_ADDR=$U \
  PATH_INFO_SERVICE_ADDR=$U tvix-boot store virtiofs --socket /run/vfs.sock --threads 2 \
  2> /run/backend.log &
BACKEND=$!
while [ ! -S /run/vfs.sock ]; do sleep 0.1; done
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

kill -TERM $UNIX_DAEMON; wait $UNIX_DAEMON
echo "daemon-exit $?"
kill -TERM $TCP_DAEMON; wait $TCP_DAEMON
echo "daemon-exit $?"
sed 's/^/daemon-log /' /run/daemon-unix.log
sed 's/^/backend-log /' /run/backend.log
"#;

/// Copies the closure of `path` into a fresh tvix-boot store under `work/data` through
/// `nix copy --to http://…` and `tvix-boot store serve-nar`, and returns its files as
/// test-host files under /input/data.
fn closure_into_store(tvix_boot: &Path, work: &Path, path: &str) -> Vec<GuestFile> {
    let data_home = work.join("data");
    let server = ServeNar::start(tvix_boot, &data_home);
    run(nix(&work.join("nix-cache"))
        .args(["copy", "--to", &server.url("?compression=none")])
        .arg(path));
    server.stop();
    GuestFile::host_tree(&data_home, "/input/data")
        .unwrap_or_else(|e| panic!("the store copied into the test host: {e}"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

#[test]
fn a_daemon_serves_cpython_to_run_and_qemu_through_virtiofs() {
    let tvix_boot = assets::tvix_boot_static_once()
        .unwrap_or_else(|e| panic!("cannot get the static tvix-boot: {e}"));
    let work = tempfile::tempdir().unwrap();
    let python = nix_build(&Path::new(env!("CARGO_MANIFEST_DIR")).join("nix/python.nix"));
    let mut files = closure_into_store(&tvix_boot, work.path(), &python);

    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
    let initrd = Initramfs::busybox_init(&busybox, &format!("{LIST_TREE}{GUEST_INIT}"))
        .unwrap_or_else(|e| panic!("guest initrd: {e}"))
        .finish();
    files.extend(qemu::microvm_files().unwrap_or_else(|e| panic!("QEMU: {e}")));
    files.push(GuestFile::host(
        GUEST_BZIMAGE,
        vmlinux.with_file_name("bzImage"),
        0o644,
    ));
    files.push(GuestFile::bytes(GUEST_INITRD, initrd, 0o644));

    let runs: Vec<String> = (1..=RUNS).map(|i| i.to_string()).collect();
    let script = format!("{MAKE_TREE}{LIST_TREE}{HOST_SCRIPT}")
        .replace("{kernel}", GUEST_KERNEL)
        .replace("{program}", &shell_quote(PYTHON_PROGRAM))
        .replace("{python}", &python)
        .replace("{runs}", &runs.join(" "))
        .replace("{bzimage}", GUEST_BZIMAGE)
        .replace("{initrd}", GUEST_INITRD)
        .replace("tvix-boot ", &format!("{TVIX_BOOT} "));
    let out = TestHost::builder()
        .tvix_boot(&tvix_boot)
        .memory_mib(3072)
        .run_checked(&script, &files, TIMEOUT);
    let serial = &out.serial;

    // CPython over grpc+unix.
    let guest = out
        .between("python-begin", "python-end")
        .unwrap_or_else(|| panic!("no python-begin ... python-end: {out}"));
    assert!(guest.contains("python-checks ok"), "{out}");
    assert!(serial.contains("python-status=0"), "{out}");
    let modules: usize = lines_with(guest, "python-modules ")
        .first()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no python-modules line: {out}"));
    assert!(modules > 150, "an import-heavy start: {modules} modules");

    // The timings, side by side in this one test host.
    let mut times = std::collections::BTreeMap::<String, Vec<f64>>::new();
    for line in lines_with(serial, "grpc-bench ") {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 5, "{line}");
        assert_eq!(fields[3], "0", "a timed run failed: {line}: {out}");
        assert_eq!(
            fields[4], "1",
            "a timed run's output was wrong: {line}: {out}"
        );
        let start: f64 = fields[1].parse().unwrap();
        let end: f64 = fields[2].parse().unwrap();
        times
            .entry(fields[0].to_owned())
            .or_default()
            .push(end - start);
    }
    let local = median(times["local"].clone());
    for kind in ["local", "unix", "tcp"] {
        let m = median(times[kind].clone());
        eprintln!(
            "grpc-bench: CPython --run from {kind}: median {m:.2} s of {:?} ({:.2}x local)",
            times[kind],
            m / local
        );
    }

    // QEMU through store virtiofs over grpc+unix.
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

    // The daemons: private socket, one line per client, SIGTERM exits 0.
    assert_eq!(lines_with(serial, "socket-mode "), ["600"]);
    assert_eq!(lines_with(serial, "daemon-exit "), ["0", "0"], "{out}");
    let log = lines_with(serial, "daemon-log ").join("\n");
    assert!(log.contains("client connected: pid"), "{log}");
}
