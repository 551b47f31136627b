//! Booting a system: the systemd closure of tests/nix/systemd-system.nix (Debian's
//! systemd 252 made into store paths), started as stage 2 through an `init=`, two stacks
//! side by side in one QEMU TCG test host (nested KVM), 1 vCPU and 512 MiB each:
//!
//! - `tvix-boot`: `tvix-boot --init $system/init` (its own guest init, vmlinux, the store
//!   copied in with `nix copy`, in-process virtio-fs);
//! - `qemu+virtiofsd`: QEMU microvm booting the same kernel (bzImage) with a busybox initrd
//!   that does what tvix-boot's init does for `init=` (tmpfs root, store over virtio-fs,
//!   switch_root), virtiofsd serving the same closure as a plain directory.
//!
//! Reported per stack: the guest's uptime when systemd has reached multi-user.target (the
//! marker unit prints it) and the wall time from starting the VMM to its exit after
//! `systemctl poweroff`.
//!
//! Also the guest's boot-to-init time with tvix-boot: the guest's uptime when the first
//! program runs (`--run busybox cat /proc/uptime`); with
//! `TVIX_BOOT_BENCH_BASELINE_KERNEL=/path/to/vmlinux` another kernel is measured
//! alternately beside the current one (the kernel-change comparison).
//!
//! TCG stretches absolute times: read the ratios.
//!
//!     cargo bench -p tvix-boot-benches --bench system_boot

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tvix_boot_benches::median;
use tvix_boot_tests::nix::{ServeNar, nix, nix_build, run};
use tvix_boot_tests::{GUEST_KERNEL, GuestFile, Initramfs, TVIX_BOOT, TestHost, assets, qemu};

const RUNS: usize = 5;
const GUEST_INITRD: &str = "/guest/initrd.cpio";
const GUEST_BZIMAGE: &str = "/guest/bzImage";
const BASELINE_KERNEL: &str = "/guest/baseline-vmlinux";

/// The QEMU guest's initrd: what tvix-boot's guest init does for `init=`.
const QEMU_GUEST_INIT: &str = r#"
SYSTEM=$(sed -n 's/.*bench.system=\([^ ]*\).*/\1/p' /proc/cmdline)
mkdir -p /fs && mount -t tmpfs -o mode=0755 tmpfs /fs
mkdir -p /fs/nix/store /fs/dev /fs/proc /fs/sys
mount -t virtiofs -o ro tvix /fs/nix/store || { echo bench-mount-failed; poweroff -f; }
mount --move /dev /fs/dev && mount --move /proc /fs/proc && mount --move /sys /fs/sys
exec switch_root /fs "$SYSTEM/init"
"#;

const HOST_SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME=/input/data TVIX_BOOT_KERNEL={kernel}
mkdir -p /tmp/share /tmp/bb/bin
tar -C /tmp/share -xf /input/closure.tar
cp /bin/busybox /tmp/bb/bin/busybox
BB=$(tvix-boot store import /tmp/bb)
set +e
kernels="{kernel} {baseline}"
run=0
while [ $run -lt {runs} ]; do
  run=$((run + 1))
  for k in $kernels; do
    echo "bench-kernel $k $(tvix-boot --kernel $k --run $BB/bin/busybox -- cat /proc/uptime | grep -E '^[0-9.]+ [0-9.]+' | tr -d '\r')"
  done
  echo "bench-backend tvix-boot"
  read t0 _ < /proc/uptime
  tvix-boot --init {system}/init --cpus 1 --memory 512M > /tmp/console
  status=$?
  read t1 _ < /proc/uptime
  grep -o 'tvix-boot-systemd-marker: .*' /tmp/console | tr -d '\r'
  echo "bench-wall $t0 $t1 $status"
  echo "bench-backend qemu+virtiofsd"
  rm -f /tmp/vfs.sock
  {virtiofsd} --socket-path=/tmp/vfs.sock --shared-dir=/tmp/share --sandbox=none --cache=auto 2>/dev/null &
  while [ ! -S /tmp/vfs.sock ]; do sleep 0.05; done
  read t0 _ < /proc/uptime
  qemu-system-x86_64 -M microvm,memory-backend=mem -enable-kvm -cpu host -smp 1 -m 512 \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -nodefaults -no-user-config -display none -monitor none -serial stdio -no-reboot \
    -chardev socket,id=vfs,path=/tmp/vfs.sock \
    -device vhost-user-fs-device,chardev=vfs,tag=tvix,queue-size=1024 \
    -kernel {bzimage} -initrd {initrd} \
    -append "console=ttyS0 reboot=k panic=-1 quiet bench.system={system}" > /tmp/console
  status=$?
  read t1 _ < /proc/uptime
  wait
  grep -o 'tvix-boot-systemd-marker: .*' /tmp/console | tr -d '\r'
  echo "bench-wall $t0 $t1 $status"
done
"#;

fn main() {
    tvix_boot_benches::bench_mode_only("system_boot");
    let virtiofsd = qemu::virtiofsd().unwrap_or_else(|e| panic!("{e}"));
    let tvix_boot = assets::tvix_boot_static().unwrap_or_else(|e| panic!("tvix-boot: {e}"));
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
    let work = tempfile::tempdir().unwrap();

    let expr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/nix/systemd-system.nix");
    let system = nix_build(&expr);
    let closure = run(Command::new("nix-store").args(["--query", "--requisites", &system]));
    let closure: Vec<String> = String::from_utf8_lossy(&closure.stdout)
        .lines()
        .map(|p| p.trim_start_matches("/nix/store/").to_owned())
        .collect();
    let tar = work.path().join("closure.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg("/nix/store")
        .arg("-cf")
        .arg(&tar)
        .args(&closure));
    let data_home = work.path().join("data");
    let server = ServeNar::start(&tvix_boot, &data_home);
    run(nix(&work.path().join("nix-cache"))
        .args(["copy", "--to", &server.url("?compression=none")])
        .arg(&system));
    server.stop();

    let initrd = Initramfs::busybox_init(&busybox, QEMU_GUEST_INIT)
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
    files.push(GuestFile::host("/input/closure.tar", &tar, 0o644));
    files.extend(GuestFile::host_tree(&data_home, "/input/data").unwrap_or_else(|e| panic!("{e}")));
    let baseline = std::env::var_os("TVIX_BOOT_BENCH_BASELINE_KERNEL");
    if let Some(baseline) = &baseline {
        files.push(GuestFile::host(BASELINE_KERNEL, baseline, 0o644));
    }

    let script = HOST_SCRIPT
        .replace("{kernel}", GUEST_KERNEL)
        .replace(
            "{baseline}",
            if baseline.is_some() {
                BASELINE_KERNEL
            } else {
                ""
            },
        )
        .replace("{runs}", &RUNS.to_string())
        .replace("{system}", &system)
        .replace("{bzimage}", GUEST_BZIMAGE)
        .replace("{initrd}", GUEST_INITRD)
        .replace("{virtiofsd}", &virtiofsd.display().to_string())
        .replace("tvix-boot ", &format!("{TVIX_BOOT} "));
    let out = TestHost::builder()
        .tvix_boot(tvix_boot)
        .memory_mib(2048)
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
        .run(&script, &files, Duration::from_secs(1800))
        .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    assert!(out.success(), "{out}");
    assert!(!out.serial.contains("bench-mount-failed"), "{out}");

    // kernel -> guest uptimes at the first program
    let mut boot_to_init: Vec<(String, Vec<f64>)> = Vec::new();
    // stack -> (uptime at multi-user.target, wall time to power-off)
    let mut systemd: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    let mut backend = String::new();
    for line in out.serial.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("bench-kernel ") {
            let mut words = rest.split_whitespace();
            let kernel = words.next().unwrap_or_default().to_owned();
            let uptime: f64 = words
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("no uptime from the guest: {line:?}\n{out}"));
            match boot_to_init.iter_mut().find(|(k, _)| *k == kernel) {
                Some((_, v)) => v.push(uptime),
                None => boot_to_init.push((kernel, vec![uptime])),
            }
        } else if let Some(name) = line.strip_prefix("bench-backend ") {
            backend = name.to_owned();
            systemd.push((backend.clone(), Vec::new(), Vec::new()));
        } else if let Some(rest) = line.strip_prefix("tvix-boot-systemd-marker: ") {
            let uptime: f64 = rest
                .rsplit("uptime ")
                .next()
                .and_then(|u| u.trim_end_matches(" s").parse().ok())
                .unwrap_or_else(|| panic!("bad marker line {line:?}"));
            assert!(rest.starts_with("multi-user.target is active"), "{line}");
            systemd.last_mut().expect("a backend").1.push(uptime);
        } else if let Some(rest) = line.strip_prefix("bench-wall ") {
            let v: Vec<f64> = rest
                .split_whitespace()
                .map(|x| {
                    x.parse()
                        .unwrap_or_else(|_| panic!("bad wall line {line:?}"))
                })
                .collect();
            assert_eq!(v[2], 0.0, "{backend} exited with status {}: {out}", v[2]);
            systemd.last_mut().expect("a backend").2.push(v[1] - v[0]);
        }
    }

    println!("boot to the first program (guest uptime), tvix-boot, median of {RUNS}:");
    for (kernel, uptimes) in &boot_to_init {
        assert_eq!(uptimes.len(), RUNS, "{kernel}: {out}");
        println!("  {kernel:>28}: {:.3} s", median(uptimes.clone()));
    }
    println!(
        "systemd to multi-user.target (guest uptime) and VMM start to exit, median of {RUNS}:"
    );
    for stack in ["tvix-boot", "qemu+virtiofsd"] {
        let (multi_user, wall): (Vec<f64>, Vec<f64>) = systemd
            .iter()
            .filter(|(name, _, _)| name == stack)
            .fold((Vec::new(), Vec::new()), |(mut m, mut w), (_, mu, wa)| {
                m.extend(mu);
                w.extend(wa);
                (m, w)
            });
        assert_eq!(
            multi_user.len(),
            RUNS,
            "{stack} reached multi-user.target: {out}"
        );
        assert_eq!(wall.len(), RUNS, "{stack}: {out}");
        println!(
            "  {stack:>16}: multi-user.target at {:.3} s   powered off after {:.3} s",
            median(multi_user),
            median(wall)
        );
    }
}
