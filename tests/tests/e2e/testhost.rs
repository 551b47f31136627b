//! Self-tests of the test-host harness: they boot the real QEMU TCG test host
//! (seconds each) and must fail, never skip, when it cannot run. The first ones boot a
//! test host each; the suite below checks what the cases of a shared boot get.

use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::{GuestFile, Suite, TestHost, TestHostOutput};

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

pub fn kvm_is_available_in_the_test_host() {
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

pub fn script_exit_code_is_reported() {
    let out = host()
        .run("echo about to fail\nexit 3\n", &[], TIMEOUT)
        .expect("test host run");
    assert_eq!(out.exit_code, Some(3), "{out}");
    assert!(!out.timed_out, "{out}");
    assert!(!out.success());
    assert!(out.script_output().contains("about to fail"), "{out}");
}

pub fn a_too_short_timeout_is_reported() {
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

pub fn host_files_and_the_guest_kernel_are_installed() {
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

pub fn static_tvix_boot_runs_in_the_test_host() {
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

/// A suite of the harness's own: what the cases of a shared boot get.
pub fn suite() -> Suite {
    Suite::new(
        "testhost_suite",
        TestHost::builder().without_guest_kernel(),
    )
    .setup(
        "mkdir -p /suite\necho shared > /suite/file\nGREETING='from the setup'\necho setup-ran\n",
        Duration::from_secs(60),
    )
    .case(
        "setup_variables_and_files_reach_the_case_and_its_status_is_its_own",
        "echo \"greeting=$GREETING\"\ncat /suite/file\necho left > /tmp/left-by-the-first\n\
         echo \"cwd=$(pwd)\"\nexit 3\n",
        vec![],
        Duration::from_secs(60),
    )
    .case(
        "each_case_gets_a_fresh_tmp_and_its_own_files",
        "echo \"tmp-entries=$(ls -A /tmp | wc -l)\"\ncat /case/own-file\n",
        vec![GuestFile::bytes("/case/own-file", "the case's own file\n", 0o644)],
        Duration::from_secs(60),
    )
    .case(
        "a_case_past_its_deadline_is_killed",
        "echo sleeping\nsleep 1000\necho woke-up\n",
        vec![],
        Duration::from_secs(3),
    )
    .case(
        "the_next_case_runs_and_a_last_line_without_newline_stays_whole",
        "printf 'no newline'",
        vec![],
        Duration::from_secs(60),
    )
}

pub const CHECKS: &[(&str, Check)] = &[
    (
        "setup_variables_and_files_reach_the_case_and_its_status_is_its_own",
        setup_variables_and_files_reach_the_case_and_its_status_is_its_own,
    ),
    (
        "each_case_gets_a_fresh_tmp_and_its_own_files",
        each_case_gets_a_fresh_tmp_and_its_own_files,
    ),
    (
        "a_case_past_its_deadline_is_killed",
        a_case_past_its_deadline_is_killed,
    ),
    (
        "the_next_case_runs_and_a_last_line_without_newline_stays_whole",
        the_next_case_runs_and_a_last_line_without_newline_stays_whole,
    ),
];

fn setup_variables_and_files_reach_the_case_and_its_status_is_its_own(out: &TestHostOutput) {
    assert!(!out.timed_out, "{out}");
    assert_eq!(out.exit_code, Some(3), "{out}");
    assert!(!out.success());
    assert!(out.serial.contains("greeting=from the setup\n"), "{out}");
    assert!(out.serial.contains("shared\n"), "{out}");
    assert!(out.serial.contains("cwd=/root\n"), "{out}");
    // Only this case's part of the console: not the setup's, not the next case's.
    assert!(!out.serial.contains("setup-ran"), "{out}");
    assert!(!out.serial.contains("tmp-entries"), "{out}");
}

fn each_case_gets_a_fresh_tmp_and_its_own_files(out: &TestHostOutput) {
    assert!(out.success(), "{out}");
    assert_eq!(
        out.serial.trim(),
        "tmp-entries=0\nthe case's own file",
        "{out}"
    );
}

fn a_case_past_its_deadline_is_killed(out: &TestHostOutput) {
    assert!(out.timed_out, "{out}");
    assert_eq!(out.exit_code, None, "{out}");
    assert!(out.serial.contains("sleeping"), "{out}");
    assert!(!out.serial.contains("woke-up"), "{out}");
    assert!(out.elapsed < Duration::from_secs(60), "{out}");
}

fn the_next_case_runs_and_a_last_line_without_newline_stays_whole(out: &TestHostOutput) {
    assert!(out.success(), "{out}");
    assert_eq!(out.serial, "no newline", "{out}");
}

/// A setup that fails stops every case, and each says so with the setup's output.
pub fn a_failed_setup_fails_every_case_with_its_output() {
    let out = Suite::new(
        "testhost_failing_setup",
        TestHost::builder().without_guest_kernel(),
    )
    .setup(
        "set -e\necho setting-up\nfalse\necho not-reached\n",
        Duration::from_secs(60),
    )
    .case("a", "echo case-a-ran\n", vec![], Duration::from_secs(60))
    .case("b", "echo case-b-ran\n", vec![], Duration::from_secs(60))
    .run()
    .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    assert!(!out.whole.timed_out, "{}", out.whole);
    let setup = out.setup.as_ref().expect("the setup's output");
    assert_eq!(setup.exit_code, Some(1), "{setup}");
    assert!(setup.serial.contains("setting-up"), "{setup}");
    assert!(!setup.serial.contains("not-reached"), "{setup}");
    for case in ["a", "b"] {
        let why = out.case(case).expect_err("a case after a failed setup");
        assert!(
            why.contains("setup of suite testhost_failing_setup failed"),
            "{why}"
        );
        assert!(why.contains("setting-up"), "{why}");
    }
    assert!(!out.whole.serial.contains("case-a-ran"), "{}", out.whole);
}
