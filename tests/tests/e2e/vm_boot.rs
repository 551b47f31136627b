//! End-to-end: tvix-boot boots the project's guest kernel with a busybox initrd inside
//! the QEMU TCG test host (real nested KVM). These tests fail, never skip, when the
//! test host cannot run.

use std::path::PathBuf;
use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::testhost::tvix_boot_command;
use tvix_boot_tests::{GuestFile, Initramfs, Suite, TestHost, TestHostOutput, assets};

/// Generous: the test host alone boots in ~3 s, but TCG is slow and tests run in
/// parallel on 2 cores.
const TIMEOUT: Duration = Duration::from_secs(240);

/// Where the benchmarks put the guest's initrd inside the test host (each case of the
/// suite has its own, see [`case_initrd`]).
const GUEST_INITRD: &str = "/guest/initrd.cpio";

/// The static tvix-boot binary: $TVIX_BOOT_BIN, else built once for all tests.
fn tvix_boot_bin() -> PathBuf {
    assets::tvix_boot_static_once()
        .unwrap_or_else(|e| panic!("cannot get the static tvix-boot: {e}"))
}

fn test_host() -> TestHost {
    TestHost::builder()
        .tvix_boot(tvix_boot_bin())
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
}

/// A busybox guest initrd at `path` whose /init runs `init_body` after the usual mounts.
fn guest_initrd_at(path: &str, init_body: &str) -> GuestFile {
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
    let initrd = Initramfs::busybox_init(&busybox, init_body)
        .unwrap_or_else(|e| panic!("building the guest initrd: {e}"))
        .finish();
    GuestFile::bytes(path, initrd, 0o644)
}

/// A busybox guest initrd at [`GUEST_INITRD`].
fn guest_initrd(init_body: &str) -> GuestFile {
    guest_initrd_at(GUEST_INITRD, init_body)
}

/// Where case `name` finds its guest initrd in the shared test host.
fn case_initrd(name: &str) -> String {
    format!("/guest/{name}.cpio")
}

pub const CHECKS: &[(&str, Check)] = &[
    (
        "cpus_and_memory_from_env_and_poweroff_exits_zero",
        cpus_and_memory_from_env_and_poweroff_exits_zero,
    ),
    ("reboot_exits_zero", reboot_exits_zero),
    ("guest_panic_exits_nonzero", guest_panic_exits_nonzero),
    ("bzimage_boots_too", bzimage_boots_too),
];

/// Runs tvix-boot with the guest kernel, its own initrd (a busybox /init that runs
/// `init_body`) and `env`; the case's exit status is tvix-boot's.
fn boot(suite: Suite, name: &str, init_body: &str, env: &[(&str, &str)]) -> Suite {
    let initrd = case_initrd(name);
    suite.case(
        name,
        &tvix_boot_command(&["--initrd", &initrd], env),
        vec![guest_initrd_at(&initrd, init_body)],
        TIMEOUT,
    )
}

/// The four boots in one test host.
pub fn suite() -> Suite {
    let suite = Suite::new("vm_boot", TestHost::builder().tvix_boot(tvix_boot_bin()));
    let suite = boot(
        suite,
        "cpus_and_memory_from_env_and_poweroff_exits_zero",
        "echo guest-cpus=$(nproc)\n\
         echo guest-memtotal-kib=$(awk '/MemTotal/ {print $2}' /proc/meminfo)\n\
         poweroff -f\n",
        &[("CH_NUM_CPUS", "2"), ("CH_MEM_SIZE", "256M")],
    );
    let suite = boot(
        suite,
        "reboot_exits_zero",
        "echo about-to-reboot\nreboot -f\n",
        &[],
    );
    // When init exits the kernel panics ("Attempted to kill init!").
    let suite = boot(
        suite,
        "guest_panic_exits_nonzero",
        "echo init-exits-now\nexit 1\n",
        &[],
    );
    // build.sh leaves the same kernel as a bzImage next to the vmlinux.
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let bzimage = vmlinux.with_file_name("bzImage");
    assert!(
        bzimage.is_file(),
        "no bzImage next to {}",
        vmlinux.display()
    );
    let initrd = case_initrd("bzimage_boots_too");
    suite.case(
        "bzimage_boots_too",
        &tvix_boot_command(&["--kernel", "/guest/bzImage", "--initrd", &initrd], &[]),
        vec![
            GuestFile::host("/guest/bzImage", bzimage, 0o644),
            guest_initrd_at(&initrd, "echo booted-from-bzimage\npoweroff -f\n"),
        ],
        TIMEOUT,
    )
}

/// The value after `key=` on its own line of the guest's output.
fn reported<'a>(out: &'a TestHostOutput, key: &str) -> Option<&'a str> {
    out.serial
        .lines()
        .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
}

fn cpus_and_memory_from_env_and_poweroff_exits_zero(out: &TestHostOutput) {
    assert!(!out.timed_out, "tvix-boot did not finish: {out}");
    assert_eq!(
        out.exit_code,
        Some(0),
        "poweroff -f must end tvix-boot with 0: {out}"
    );
    assert_eq!(reported(out, "guest-cpus"), Some("2"), "{out}");
    let mem_kib: u64 = reported(out, "guest-memtotal-kib")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in output: {out}"));
    // MemTotal is RAM minus what the kernel keeps for itself (its image, page
    // tables, reserved areas): a bit under 256 MiB, far above the 512 MiB default's
    // half and below 256 MiB.
    assert!(
        (200 * 1024..=256 * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} KiB does not match CH_MEM_SIZE=256M: {out}"
    );
}

fn reboot_exits_zero(out: &TestHostOutput) {
    assert!(!out.timed_out, "tvix-boot did not finish: {out}");
    assert_eq!(out.exit_code, Some(0), "{out}");
    assert!(out.serial.contains("about-to-reboot"), "{out}");
}

fn guest_panic_exits_nonzero(out: &TestHostOutput) {
    assert!(!out.timed_out, "tvix-boot did not finish: {out}");
    assert!(
        matches!(out.exit_code, Some(code) if code != 0),
        "a guest panic must end tvix-boot with a nonzero status: {out}"
    );
    assert!(out.serial.contains("guest kernel panicked"), "{out}");
}

fn bzimage_boots_too(out: &TestHostOutput) {
    assert!(!out.timed_out, "{out}");
    assert_eq!(out.exit_code, Some(0), "{out}");
    assert!(out.serial.contains("booted-from-bzimage"), "{out}");
}

/// Boot-time benchmark, not a pass/fail test: prints the time from starting tvix-boot
/// to the guest's /init and to tvix-boot's exit, measured inside the test host (TCG
/// stretches absolute numbers; compare only runs made side by side).
///
///     cargo test -p tvix-boot-tests --test e2e -- --ignored vm_boot::boot_timing
pub fn boot_timing() {
    const RUNS: usize = 3;
    // The default command line has `quiet`; `loglevel=7` brings the boot log back.
    for (label, extra_cmdline) in [
        ("default (quiet)", ""),
        ("boot log (loglevel=7)", "loglevel=7"),
    ] {
        // The marker lines are stamped with the test host's uptime when they arrive;
        // the rest of the console is dropped, since echoing it to the test host's own
        // (emulated, slow) serial console would delay the reader.
        let script = format!(
            "read t0 _ < /proc/uptime\n\
             echo bench-start=$t0\n\
             for i in $(seq {RUNS}); do\n\
               read t0 _ < /proc/uptime\n\
               echo bench-run-start=$t0\n\
               {{ {bin} --kernel {kernel} --initrd {GUEST_INITRD} --cmdline '{extra_cmdline}'; \
                  echo bench-exit=$?; }} 2>&1 | \
               while IFS= read -r line; do case \"$line\" in \
                 *GUEST-INIT-REACHED*|bench-exit=*) read now _ < /proc/uptime; echo \"[$now] $line\";; \
               esac; done\n\
             done\n",
            bin = tvix_boot_tests::TVIX_BOOT,
            kernel = tvix_boot_tests::GUEST_KERNEL,
        );
        let out = test_host()
            .run(
                &script,
                &[guest_initrd("echo GUEST-INIT-REACHED\npoweroff -f\n")],
                TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("test host run failed: {e}"));
        assert!(out.success(), "{out}");
        let mut start = None;
        let mut init = None;
        for line in out.serial.lines() {
            if let Some(t) = line.strip_prefix("bench-run-start=") {
                start = t.trim().parse::<f64>().ok();
                init = None;
            }
            let stamp = || {
                line.strip_prefix('[')?
                    .split(']')
                    .next()?
                    .parse::<f64>()
                    .ok()
            };
            if line.contains("GUEST-INIT-REACHED")
                && !line.contains("echo")
                && let Some(t) = stamp()
            {
                init = Some(t);
            }
            if line.contains("bench-exit=")
                && let (Some(t), Some(s)) = (stamp(), start)
            {
                let code = line.rsplit('=').next().unwrap_or("?");
                println!(
                    "{label}: start->init {:.2} s, start->exit {:.2} s (exit status {code})",
                    init.map_or(f64::NAN, |i| i - s),
                    t - s
                );
            }
        }
    }
}

/// tvix-boot against QEMU (microvm, KVM) with the same bzImage, initrd, command line,
/// 1 vCPU and 512 MiB, interleaved in one test host. Prints start->init and
/// start->exit for each; like [`boot_timing`] a benchmark, not a pass/fail test.
///
///     cargo test -p tvix-boot-tests --test e2e -- --ignored vm_boot::qemu_comparison
pub fn qemu_comparison_timing() {
    const RUNS: usize = 3;
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let bzimage = vmlinux.with_file_name("bzImage");
    let cmdline = "console=ttyS0 reboot=k panic=-1 quiet";
    let tvix_boot = format!(
        "{} --kernel /guest/bzImage --initrd {GUEST_INITRD} --cpus 1 --memory 512M",
        tvix_boot_tests::TVIX_BOOT
    );
    let qemu = format!(
        "qemu-system-x86_64 -M microvm -enable-kvm -cpu host -smp 1 -m 512 -nodefaults \
         -no-user-config -display none -monitor none -serial stdio -no-reboot \
         -kernel /guest/bzImage -initrd {GUEST_INITRD} -append '{cmdline}'"
    );
    let mut script = String::new();
    for _ in 0..RUNS {
        for (label, command) in [("tvix-boot", &tvix_boot), ("qemu-microvm", &qemu)] {
            script.push_str(&format!(
                "read t0 _ < /proc/uptime\n\
                 echo bench-run-start={label}=$t0\n\
                 {{ {command}; echo bench-exit=$?; }} 2>&1 | \
                 while IFS= read -r line; do case \"$line\" in \
                   *GUEST-INIT-REACHED*|bench-exit=*) read now _ < /proc/uptime; \
                   echo \"[$now] $line\";; \
                 esac; done\n"
            ));
        }
    }
    let mut files = tvix_boot_tests::qemu::microvm_files()
        .unwrap_or_else(|e| panic!("QEMU for the test host: {e}"));
    files.push(GuestFile::host("/guest/bzImage", bzimage, 0o644));
    // poweroff: microvm has no i8042, so a reboot there takes minutes of fallbacks.
    files.push(guest_initrd("echo GUEST-INIT-REACHED\npoweroff -f\n"));
    let out = TestHost::builder()
        .tvix_boot(tvix_boot_bin())
        .memory_mib(2048)
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
        .run(&script, &files, Duration::from_secs(600))
        .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    assert!(out.success(), "{out}");

    let stamp =
        |line: &str| -> Option<f64> { line.strip_prefix('[')?.split(']').next()?.parse().ok() };
    let (mut label, mut start, mut init) = (String::new(), None, None);
    for line in out.serial.lines() {
        if let Some(rest) = line.strip_prefix("bench-run-start=") {
            let (l, t) = rest.rsplit_once('=').unwrap_or((rest, ""));
            (label, start, init) = (l.to_owned(), t.trim().parse::<f64>().ok(), None);
        } else if line.contains("GUEST-INIT-REACHED") && !line.contains("echo") {
            init = stamp(line);
        } else if line.contains("bench-exit=")
            && let (Some(t), Some(s)) = (stamp(line), start)
        {
            let code = line.rsplit('=').next().unwrap_or("?");
            println!(
                "{label}: start->init {:.2} s, start->exit {:.2} s (exit status {code})",
                init.map_or(f64::NAN, |i| i - s),
                t - s
            );
        }
    }
}
