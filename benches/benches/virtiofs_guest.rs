//! virtio-fs inside a guest, side by side with the reference stack: tvix-boot (its own
//! in-process virtio-fs device serving the store) against QEMU microvm + virtiofsd
//! (vhost-user-fs serving a plain directory with the same tree). Both boot the same
//! bzImage and busybox initrd with 1 vCPU and 512 MiB inside one QEMU TCG test host
//! (nested KVM), alternating, each measurement on a freshly booted guest (cold caches):
//!
//! - sequential read of a 128 MiB file (`dd bs=1M`), MB/s;
//! - lookup+stat of 10,000 files by path (one `stat` over 100 directories), per second.
//!
//! Absolute numbers are stretched by TCG; only the ratio between the two is meaningful.
//!
//! Needs virtiofsd: `cargo install virtiofsd` (with libseccomp-dev and libcap-ng-dev),
//! or $VIRTIOFSD naming one. Run:
//!
//!     cargo bench -p tvix-boot-benches --bench virtiofs_guest

use std::path::PathBuf;
use std::time::Duration;

use tvix_boot_tests::{GuestFile, Initramfs, TVIX_BOOT, TestHost, assets, qemu};

const RUNS: usize = 3;
const LARGE_FILE_MIB: u64 = 128;
const FILES: u64 = 10_000;
const GUEST_INITRD: &str = "/guest/initrd.cpio";
const GUEST_BZIMAGE: &str = "/guest/bzImage";

/// The guest: mount the file system with tag `tvix`, time the two operations on the
/// tree named by `bench.path=`, print the uptimes around them.
const GUEST_INIT: &str = r#"
mkdir -p /nix/store /tmp
if ! mount -t virtiofs -o ro tvix /nix/store; then echo bench-mount-failed; poweroff -f; fi
P=$(sed -n 's/.*bench.path=\([^ ]*\).*/\1/p' /proc/cmdline)
i=0; while [ $i -lt {files} ]; do echo "d$((i % 100))/f$i"; i=$((i + 1)); done > /tmp/list
read t0 _ < /proc/uptime
dd if="$P/large" of=/dev/null bs=1M 2>/dev/null
read t1 _ < /proc/uptime
# One stat process for all: busybox xargs garbles arguments at its batch boundaries.
cd "$P/files" && stat -c %s $(cat /tmp/list) > /tmp/sizes && cd /
read t2 _ < /proc/uptime
echo "bench-result $t0 $t1 $t2 $(wc -l < /tmp/sizes) $(wc -c < "$P/large")"
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
P=$(tvix-boot store import /tmp/share/tree)
set +e
run=0
while [ $run -lt {runs} ]; do
  run=$((run + 1))
  echo "bench-backend tvix-boot"
  tvix-boot --kernel {bzimage} --initrd {initrd} --cpus 1 --memory 512M --cmdline "bench.path=$P"
  echo "bench-backend qemu+virtiofsd"
  rm -f /tmp/vfs.sock
  {virtiofsd} --socket-path=/tmp/vfs.sock --shared-dir=/tmp/share --sandbox=none --cache=auto &
  while [ ! -S /tmp/vfs.sock ]; do sleep 0.1; done
  qemu-system-x86_64 -M microvm,memory-backend=mem -enable-kvm -cpu host -smp 1 -m 512 \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
    -chardev socket,id=vfs,path=/tmp/vfs.sock \
    -device vhost-user-fs-device,chardev=vfs,tag=tvix,queue-size=1024 \
    -kernel {bzimage} -initrd {initrd} \
    -append "console=ttyS0 reboot=k panic=-1 quiet bench.path=/nix/store/tree"
  wait
done
"#;

fn virtiofsd() -> PathBuf {
    let candidates = std::env::var_os("VIRTIOFSD")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd")))
        .chain([
            PathBuf::from("/usr/libexec/virtiofsd"),
            PathBuf::from("/usr/bin/virtiofsd"),
        ]);
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "virtiofsd not found ($VIRTIOFSD, ~/.cargo/bin, /usr/libexec, /usr/bin): \
                 apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd"
            )
        })
}

struct Sample {
    read_mb_s: f64,
    stats_per_s: f64,
}

fn main() {
    if std::env::args().all(|a| a != "--bench") {
        println!("virtiofs_guest: a benchmark; run it with cargo bench");
        return;
    }
    let virtiofsd = virtiofsd();
    let tvix_boot = assets::tvix_boot_static().unwrap_or_else(|e| panic!("tvix-boot: {e}"));
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));

    let guest_init = GUEST_INIT.replace("{files}", &FILES.to_string());
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

    let script = HOST_SCRIPT
        .replace("{large_mib}", &LARGE_FILE_MIB.to_string())
        .replace("{files}", &FILES.to_string())
        .replace("{runs}", &RUNS.to_string())
        .replace("{bzimage}", GUEST_BZIMAGE)
        .replace("{initrd}", GUEST_INITRD)
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
            let [t0, t1, t2, files, bytes] = v[..] else {
                panic!("bad result line {line:?}")
            };
            assert_eq!(files as u64, FILES, "{backend}: every stat answered: {out}");
            assert_eq!(bytes as u64, LARGE_FILE_MIB << 20, "{backend}: {out}");
            let sample = Sample {
                read_mb_s: bytes / 1e6 / (t1 - t0),
                stats_per_s: files / (t2 - t1),
            };
            println!(
                "{backend:>15}: sequential read {:6.0} MB/s   lookup+stat {:6.0}/s",
                sample.read_mb_s, sample.stats_per_s
            );
            samples.push((backend.clone(), sample));
        }
    }
    assert_eq!(samples.len(), 2 * RUNS, "every guest reported: {out}");
    for name in ["tvix-boot", "qemu+virtiofsd"] {
        let mine: Vec<&Sample> = samples
            .iter()
            .filter(|(b, _)| b == name)
            .map(|(_, s)| s)
            .collect();
        let median = |f: fn(&Sample) -> f64| {
            let mut v: Vec<f64> = mine.iter().map(|s| f(s)).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!(
            "{name:>15} median of {RUNS}: sequential read {:6.0} MB/s   lookup+stat {:6.0}/s",
            median(|s| s.read_mb_s),
            median(|s| s.stats_per_s)
        );
    }
}
