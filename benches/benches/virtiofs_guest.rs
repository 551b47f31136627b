//! virtio-fs inside a guest, three stacks side by side:
//!
//! - `tvix-boot`: tvix-boot's own in-process virtio-fs device serving the store, a thread
//!   per queue;
//! - `tvix-boot/event-loop`: the same device with its queues served on the VM's event
//!   loop (`--virtiofs-queues event-loop`), to weigh the two;
//! - `qemu+tvix-vhost-user`: QEMU microvm with vhost-user-fs-device, served by
//!   `tvix-boot store virtiofs` from the same store;
//! - `qemu+virtiofsd`: the reference stack, QEMU microvm + virtiofsd serving a plain
//!   directory with the same trees.
//!
//! All boot the same bzImage and busybox initrd with 1 vCPU and 512 MiB inside one QEMU
//! TCG test host (nested KVM), in turn, each measurement on a freshly booted guest (cold
//! caches):
//!
//! - sequential read of a 128 MiB file (`dd bs=1M`), MB/s;
//! - lookup+stat of 10,000 files by path (one `stat` over 100 directories), per second;
//! - an import-heavy interpreter start: Debian's CPython 3.11 with its standard library
//!   (about 1,300 files) in the store, importing a dozen modules, C extensions among them
//!   (loaded with dlopen from lib-dynload), seconds.
//!
//! Absolute numbers are stretched by TCG; only the ratios are meaningful.
//!
//! Needs virtiofsd: `cargo install virtiofsd` (with libseccomp-dev and libcap-ng-dev),
//! or $VIRTIOFSD naming one. Run:
//!
//!     cargo bench -p tvix-boot-benches --bench virtiofs_guest

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tvix_boot_benches::median;
use tvix_boot_tests::{GuestFile, Initramfs, TVIX_BOOT, TestHost, assets, qemu};

const RUNS: usize = 3;
const BACKENDS: [&str; 4] = [
    "tvix-boot",
    "tvix-boot/event-loop",
    "qemu+tvix-vhost-user",
    "qemu+virtiofsd",
];
const LARGE_FILE_MIB: u64 = 128;
const FILES: u64 = 10_000;
const GUEST_INITRD: &str = "/guest/initrd.cpio";
const GUEST_BZIMAGE: &str = "/guest/bzImage";
/// Where the interpreter tree is handed into the test host.
const PYTHON_INPUT: &str = "/input/python";
const PYTHON_VERSION: &str = "python3.11";
/// What the interpreter imports: pure-Python packages and C extensions alike.
const PYTHON_IMPORTS: &str = "json, re, collections, decimal, datetime, email.message, \
    http.client, argparse, pathlib, typing, xml.etree.ElementTree, csv, hashlib, random, \
    statistics, asyncio, lzma, bz2, unittest";

/// The guest: mount the file system with tag `tvix`, time the two operations on the
/// tree named by `bench.path=`, print the uptimes around them.
const GUEST_INIT: &str = r#"
mkdir -p /nix/store /tmp
if ! mount -t virtiofs -o ro tvix /nix/store; then echo bench-mount-failed; poweroff -f; fi
P=$(sed -n 's/.*bench.path=\([^ ]*\).*/\1/p' /proc/cmdline)
PY=$(sed -n 's/.*bench.python=\([^ ]*\).*/\1/p' /proc/cmdline)
i=0; while [ $i -lt {files} ]; do echo "d$((i % 100))/f$i"; i=$((i + 1)); done > /tmp/list
read t0 _ < /proc/uptime
dd if="$P/large" of=/dev/null bs=1M 2>/dev/null
read t1 _ < /proc/uptime
# One stat process for all: busybox xargs garbles arguments at its batch boundaries.
cd "$P/files" && stat -c %s $(cat /tmp/list) > /tmp/sizes && cd /
read t2 _ < /proc/uptime
PYTHONHOME=$PY PYTHONDONTWRITEBYTECODE=1 "$PY/lib/ld-linux-x86-64.so.2" --library-path "$PY/lib" \
  "$PY/bin/{python}" -c "import {imports}; print('bench-python-ok')"
read t3 _ < /proc/uptime
echo "bench-result $t0 $t1 $t2 $t3 $(wc -l < /tmp/sizes) $(wc -c < "$P/large")"
poweroff -f
"#;

/// The test host: build the tree once, import it for tvix-boot, then alternate.
const HOST_SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME=/tmp/data
mkdir -p /tmp/share/tree/files
dd if=/dev/urandom of=/tmp/share/tree/large bs=1M count={large_mib} 2>/dev/null
i=0; while [ $i -lt 100 ]; do mkdir /tmp/share/tree/files/d$i; i=$((i + 1)); done
i=0; while [ $i -lt {files} ]; do echo "file $i" > /tmp/share/tree/files/d$((i % 100))/f$i; i=$((i + 1)); done
cp -a {python_input} /tmp/share/python
P=$(tvix-boot store import /tmp/share/tree)
PY=$(tvix-boot store import /tmp/share/python)
set +e
# QEMU microvm with a vhost-user-fs device on socket $1; the rest is the guest cmdline.
qemu_vhost_user_fs() {
  socket=$1; shift
  while [ ! -S "$socket" ]; do sleep 0.1; done
  qemu-system-x86_64 -M microvm,memory-backend=mem -enable-kvm -cpu host -smp 1 -m 512 \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
    -chardev socket,id=vfs,path="$socket" \
    -device vhost-user-fs-device,chardev=vfs,tag=tvix,queue-size=1024 \
    -kernel {bzimage} -initrd {initrd} \
    -append "console=ttyS0 reboot=k panic=-1 quiet $*"
  wait
}
run=0
while [ $run -lt {runs} ]; do
  run=$((run + 1))
  echo "bench-backend tvix-boot"
  tvix-boot --kernel {bzimage} --initrd {initrd} --cpus 1 --memory 512M --cmdline "bench.path=$P bench.python=$PY"
  echo "bench-backend tvix-boot/event-loop"
  tvix-boot --kernel {bzimage} --initrd {initrd} --cpus 1 --memory 512M --virtiofs-queues event-loop --cmdline "bench.path=$P bench.python=$PY"
  echo "bench-backend qemu+tvix-vhost-user"
  rm -f /tmp/tvix.sock
  tvix-boot store virtiofs --socket /tmp/tvix.sock --threads 1 --once 2>/dev/null &
  qemu_vhost_user_fs /tmp/tvix.sock "bench.path=$P bench.python=$PY"
  echo "bench-backend qemu+virtiofsd"
  rm -f /tmp/vfs.sock
  {virtiofsd} --socket-path=/tmp/vfs.sock --shared-dir=/tmp/share --sandbox=none --cache=auto &
  qemu_vhost_user_fs /tmp/vfs.sock "bench.path=/nix/store/tree bench.python=/nix/store/python"
done
"#;

/// Debian's CPython as a self-contained tree: bin/python3.11, the dynamic loader and every
/// library it and the C extensions need in lib/, the standard library in lib/python3.11
/// (without its tests, its static library and site packages). Symlinks are followed.
fn python_tree() -> Vec<GuestFile> {
    let python = Path::new("/usr/bin").join(PYTHON_VERSION);
    let stdlib = Path::new("/usr/lib").join(PYTHON_VERSION);
    assert!(
        python.is_file() && stdlib.is_dir(),
        "{} and {} are needed: apt-get install {PYTHON_VERSION}",
        python.display(),
        stdlib.display()
    );
    let mut files = vec![GuestFile::host(
        &format!("{PYTHON_INPUT}/bin/{PYTHON_VERSION}"),
        &python,
        0o755,
    )];
    let mut needs_libraries = vec![python.clone()];
    let skip = [
        "test",
        "config-3.11-x86_64-linux-gnu",
        "site-packages",
        "dist-packages",
    ];
    let mut dirs = vec![stdlib.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(&stdlib).unwrap();
            if skip.iter().any(|s| relative == Path::new(s)) {
                continue;
            }
            if path.is_dir() {
                dirs.push(path);
            } else if path.is_file() {
                if path.extension().is_some_and(|e| e == "so") {
                    needs_libraries.push(path.clone());
                }
                let target = format!("{PYTHON_INPUT}/lib/{PYTHON_VERSION}/{}", relative.display());
                files.push(GuestFile::host(&target, &path, 0o644));
            }
        }
    }
    let mut libraries = BTreeSet::new();
    for binary in &needs_libraries {
        let out = Command::new("ldd").arg(binary).output().unwrap();
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(library) = line.split_whitespace().find(|w| w.starts_with('/')) {
                libraries.insert(PathBuf::from(library));
            }
        }
    }
    for library in libraries {
        let name = library.file_name().unwrap().to_string_lossy().into_owned();
        files.push(GuestFile::host(
            &format!("{PYTHON_INPUT}/lib/{name}"),
            &library,
            0o755,
        ));
    }
    files
}

struct Sample {
    read_mb_s: f64,
    stats_per_s: f64,
    python_s: f64,
}

fn main() {
    tvix_boot_benches::bench_mode_only("virtiofs_guest");
    let virtiofsd = qemu::virtiofsd().unwrap_or_else(|e| panic!("{e}"));
    let tvix_boot = assets::tvix_boot_static().unwrap_or_else(|e| panic!("tvix-boot: {e}"));
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));

    let guest_init = GUEST_INIT
        .replace("{files}", &FILES.to_string())
        .replace("{python}", PYTHON_VERSION)
        .replace("{imports}", PYTHON_IMPORTS);
    let initrd = Initramfs::busybox_init(&busybox, &guest_init)
        .unwrap_or_else(|e| panic!("guest initrd: {e}"))
        .finish();
    let mut files = qemu::microvm_files().unwrap_or_else(|e| panic!("QEMU: {e}"));
    files.extend(
        qemu::binary_with_libraries(&virtiofsd).unwrap_or_else(|e| panic!("virtiofsd: {e}")),
    );
    files.push(GuestFile::host(
        GUEST_BZIMAGE,
        vmlinux.with_file_name("bzImage"),
        0o644,
    ));
    files.push(GuestFile::bytes(GUEST_INITRD, initrd, 0o644));
    files.extend(python_tree());

    let script = HOST_SCRIPT
        .replace("{large_mib}", &LARGE_FILE_MIB.to_string())
        .replace("{files}", &FILES.to_string())
        .replace("{runs}", &RUNS.to_string())
        .replace("{bzimage}", GUEST_BZIMAGE)
        .replace("{initrd}", GUEST_INITRD)
        .replace("{python_input}", PYTHON_INPUT)
        .replace("{virtiofsd}", &virtiofsd.display().to_string())
        .replace("tvix-boot ", &format!("{TVIX_BOOT} "));
    let out = TestHost::builder()
        .tvix_boot(tvix_boot)
        .memory_mib(3072)
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
        .run(&script, &files, Duration::from_secs(1800))
        .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    assert!(out.success(), "{out}");
    assert!(!out.serial.contains("bench-mount-failed"), "{out}");

    let mut backend = String::new();
    let mut samples: Vec<(String, Sample)> = Vec::new();
    for line in out.serial.lines() {
        if let Some(name) = line.trim().strip_prefix("bench-backend ") {
            backend = name.to_owned();
        } else if let Some(result) = line.trim().strip_prefix("bench-result ") {
            let v: Vec<f64> = result
                .split_whitespace()
                .map(|x| x.parse().unwrap_or_else(|_| panic!("bad result {line:?}")))
                .collect();
            let [t0, t1, t2, t3, files, bytes] = v[..] else {
                panic!("bad result line {line:?}")
            };
            assert_eq!(files as u64, FILES, "{backend}: every stat answered: {out}");
            assert_eq!(bytes as u64, LARGE_FILE_MIB << 20, "{backend}: {out}");
            let sample = Sample {
                read_mb_s: bytes / 1e6 / (t1 - t0),
                stats_per_s: files / (t2 - t1),
                python_s: t3 - t2,
            };
            println!(
                "{backend:>20}: sequential read {:6.0} MB/s   lookup+stat {:6.0}/s   python start {:5.2} s",
                sample.read_mb_s, sample.stats_per_s, sample.python_s
            );
            samples.push((backend.clone(), sample));
        }
    }
    assert_eq!(
        samples.len(),
        BACKENDS.len() * RUNS,
        "every guest reported: {out}"
    );
    assert_eq!(
        out.serial.matches("bench-python-ok").count(),
        BACKENDS.len() * RUNS,
        "every interpreter start succeeded: {out}"
    );
    for name in BACKENDS {
        let mine: Vec<&Sample> = samples
            .iter()
            .filter(|(b, _)| b == name)
            .map(|(_, s)| s)
            .collect();
        let median_of = |f: fn(&Sample) -> f64| median(mine.iter().map(|s| f(s)).collect());
        println!(
            "{name:>20} median of {RUNS}: sequential read {:6.0} MB/s   lookup+stat {:6.0}/s   python start {:5.2} s",
            median_of(|s| s.read_mb_s),
            median_of(|s| s.stats_per_s),
            median_of(|s| s.python_s)
        );
    }
}
