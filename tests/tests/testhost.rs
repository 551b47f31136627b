//! Self-tests of the test-host harness: they boot the real QEMU TCG test host
//! (seconds each) and must fail, never skip, when it cannot run.

use std::time::Duration;

use tvix_boot_tests::{GuestFile, TestHost};

/// Generous: a test host boots in ~3 s alone, but tests run in parallel on
/// 2 cores and TCG slows down a lot under contention.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The harness's own tests do not need the guest kernel; leaving it out keeps
/// them from waiting minutes for a first kernel build.
fn host() -> TestHost {
    TestHost::builder()
        .without_guest_kernel()
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
}

#[test]
fn kvm_is_available_in_the_test_host() {
    let out = host()
        .run(
            "test -c /dev/kvm && echo kvm-ok\n\
             cat /testhost-data/greeting\n\
             grep -c . /proc/cpuinfo >/dev/null && echo cpus=$(nproc)\n",
            &[GuestFile::bytes(
                "/testhost-data/greeting",
                "hello from the host\n",
                0o644,
            )],
            TIMEOUT,
        )
        .expect("test host run");
    assert!(out.success(), "{out}");
    assert_eq!(out.exit_code, Some(0), "{out}");
    assert!(!out.timed_out, "{out}");
    let script = out.script_output();
    assert!(script.contains("kvm-ok"), "{out}");
    assert!(script.contains("hello from the host"), "{out}");
    assert!(script.contains("cpus=1"), "{out}");
    eprintln!("{out}");
}

#[test]
fn script_exit_code_is_reported() {
    let out = host()
        .run("echo about to fail\nexit 3\n", &[], TIMEOUT)
        .expect("test host run");
    assert_eq!(out.exit_code, Some(3), "{out}");
    assert!(!out.timed_out, "{out}");
    assert!(!out.success());
    assert!(out.script_output().contains("about to fail"), "{out}");
}

#[test]
fn a_too_short_timeout_is_reported() {
    // The test host cannot even boot in half a second; the script would hang
    // anyway.
    let out = host()
        .run("sleep 1000\n", &[], Duration::from_millis(500))
        .expect("test host run");
    assert!(out.timed_out, "{out}");
    assert_eq!(out.exit_code, None, "{out}");
    assert!(!out.success());
    assert!(out.elapsed < Duration::from_secs(30), "{out}");
}

#[test]
fn host_files_and_the_guest_kernel_are_installed() {
    // Uses the real guest kernel from boot/guest-kernel/build.sh (cached after the
    // first build).
    let host = TestHost::new().unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"));
    let guest = host.guest_kernel().expect("guest kernel").to_owned();
    let size = std::fs::metadata(&guest).expect("guest kernel size").len();
    let out = host
        .run(
            &format!(
                "set -e\n\
                 test \"$(stat -c %s /guest/vmlinux)\" = {size}\n\
                 head -c 4 /guest/vmlinux | grep -q ELF\n\
                 test -x /opt/tool && /opt/tool\n"
            ),
            &[GuestFile::bytes(
                "/opt/tool",
                "#!/bin/sh\necho tool ran\n",
                0o755,
            )],
            TIMEOUT,
        )
        .expect("test host run");
    assert!(out.success(), "{out}");
    assert!(out.script_output().contains("tool ran"), "{out}");
}

#[test]
fn static_tvix_boot_runs_in_the_test_host() {
    // The test host has no libc: this proves the static build is
    // self-contained (and is the first step of every end-to-end test).
    let bin = tvix_boot_tests::assets::tvix_boot_static()
        .unwrap_or_else(|e| panic!("cannot build static tvix-boot: {e}"));
    let host = TestHost::builder()
        .without_guest_kernel()
        .tvix_boot(bin)
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"));
    let out = host
        .run(
            &format!("{} --version\n", tvix_boot_tests::TVIX_BOOT),
            &[],
            TIMEOUT,
        )
        .expect("test host run");
    assert!(out.success(), "{out}");
    assert!(out.script_output().contains("tvix-boot"), "{out}");
}
