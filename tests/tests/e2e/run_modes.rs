//! End-to-end: what users type. `tvix-boot --run/--shell/--init/--find` and the
//! original CH_CMDLINE keys, with tvix-boot's own initrd and guest init, inside the QEMU
//! TCG test host (real nested KVM). Programs come from tvix-boot's embedded store,
//! imported inside the test host. These tests fail, never skip, when the test host
//! cannot run.
//!
//! The three cases share one test-host boot; each runs several tvix-boot commands and
//! prints `<marker>-status N` after each.

use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::tree::last_value;
use tvix_boot_tests::{GUEST_KERNEL, Suite, TVIX_BOOT, TestHost, TestHostOutput};

const TIMEOUT: Duration = Duration::from_secs(420);

/// Runs first in the test host: the embedded store under /suite/data gets busybox as the
/// store path `$BB` (`bin/busybox`, `bin/sh -> busybox`); every case sees `$BB`,
/// `$XDG_DATA_HOME` and `$TVIX_BOOT_KERNEL`.
const SETUP: &str = r#"
set -e
export XDG_DATA_HOME=/suite/data TVIX_BOOT_KERNEL={kernel}
mkdir -p /suite/bb/bin
cp /bin/busybox /suite/bb/bin/busybox
ln -s busybox /suite/bb/bin/sh
BB=$(tvix-boot store import /suite/bb)
set +e
"#;

/// Every case starts by naming the store path the setup made.
const CASE_START: &str = "echo \"bb-path=$BB\"\n";

pub const CHECKS: &[(&str, Check)] = &[
    (
        "run_passes_arguments_and_returns_the_exit_status",
        run_passes_arguments_and_returns_the_exit_status,
    ),
    (
        "find_and_shell_from_stdin_and_the_original_cmdline_keys",
        find_and_shell_from_stdin_and_the_original_cmdline_keys,
    ),
    (
        "init_switches_root_into_a_system_closure",
        init_switches_root_into_a_system_closure,
    ),
];

/// The cases in one test host; `tvix-boot` in it is the static binary (on PATH), and
/// TVIX_BOOT_KERNEL names the project's guest kernel.
pub fn suite() -> Suite {
    assert_eq!(
        TVIX_BOOT, "/bin/tvix-boot",
        "the scripts call tvix-boot through PATH"
    );
    let case = |script: &str| format!("{CASE_START}{script}");
    Suite::new("run_modes", TestHost::builder().with_static_tvix_boot())
        .setup(&SETUP.replace("{kernel}", GUEST_KERNEL), TIMEOUT)
        .case(
            "run_passes_arguments_and_returns_the_exit_status",
            &case(RUN_PASSES_ARGUMENTS),
            vec![],
            TIMEOUT,
        )
        .case(
            "find_and_shell_from_stdin_and_the_original_cmdline_keys",
            &case(FIND_AND_SHELL),
            vec![],
            TIMEOUT,
        )
        .case(
            "init_switches_root_into_a_system_closure",
            &case(INIT_SWITCHES_ROOT),
            vec![],
            TIMEOUT,
        )
}

/// What a test host of its own was checked for first.
fn finished(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
}

/// The value of `key=` at the start of a line of the serial output (the last one).
fn value<'a>(out: &'a TestHostOutput, key: &str) -> &'a str {
    last_value(&out.serial, key).unwrap_or_else(|| panic!("no {key}= in the output: {out}"))
}

/// The serial output between `begin` and `end` marker lines.
fn between<'a>(out: &'a TestHostOutput, begin: &str, end: &str) -> &'a str {
    out.between(begin, end)
        .unwrap_or_else(|| panic!("no {begin} ... {end} in the output: {out}"))
}

const RUN_PASSES_ARGUMENTS: &str = r#"
echo run-args-begin
tvix-boot --run "$BB/bin/busybox" -- printf 'arg=[%s]\n' 'a b' '' ' lead' 'x"y' '$HOME'
echo "run-args-status=$?"
echo run-args-end
echo run-lines-begin
tvix-boot --run "$BB/bin/busybox" -- seq 1 3000
echo run-lines-end
tvix-boot --run "$BB/bin/sh" -- -c 'exit 42'
echo "run-exit-status=$?"
tvix-boot --run "$BB/bin/sh" -- -c 'kill -SEGV $$'
echo "run-crash-status=$?"
CH_NUM_CPUS=2 CH_MEM_SIZE=256M tvix-boot --run "$BB/bin/sh" -- -c 'exit $(nproc)'
echo "run-cpus-status=$?"
echo missing-begin
tvix-boot --run /nix/store/00000000000000000000000000000000-nope/bin/x
echo "missing-status=$?"
tvix-boot --run "$BB/bin/bash"
echo "missing-entry-status=$?"
tvix-boot --run /bin/sh
echo "outside-store-status=$?"
echo missing-end
"#;

fn run_passes_arguments_and_returns_the_exit_status(out: &TestHostOutput) {
    finished(out);
    assert!(out.success(), "{out}");
    let bb = value(out, "bb-path");

    let run_args = between(out, "run-args-begin", "run-args-end");
    let printed: Vec<&str> = run_args
        .lines()
        .filter_map(|l| l.trim().strip_prefix("arg="))
        .collect();
    assert_eq!(
        printed,
        ["[a b]", "[]", "[ lead]", "[x\"y]", "[$HOME]"],
        "arguments arrive intact: {out}"
    );
    assert_eq!(value(out, "run-args-status"), "0", "{out}");
    // A program that ends right after writing kilobytes: its last lines must not be lost
    // when it exits (the keeper lets the console drain before the session ends).
    let numbers: Vec<u32> = between(out, "run-lines-begin", "run-lines-end")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(
        numbers,
        (1..=3000).collect::<Vec<u32>>(),
        "every line of seq 1 3000 arrives, in order: {out}"
    );
    assert!(
        run_args.contains("Nothing left to be done, powering off."),
        "{out}"
    );
    assert_eq!(value(out, "run-exit-status"), "42", "{out}");
    assert_eq!(
        value(out, "run-crash-status"),
        "139",
        "128 + SIGSEGV: {out}"
    );
    assert_eq!(value(out, "run-cpus-status"), "2", "CH_NUM_CPUS: {out}");

    // Missing programs are refused before anything boots, by name.
    let missing = between(out, "missing-begin", "missing-end");
    assert!(
        missing.contains("/nix/store/00000000000000000000000000000000-nope is not in the store"),
        "{out}"
    );
    assert!(
        missing.contains(&format!("{bb}/bin has no entry \"bash\"")),
        "{out}"
    );
    assert!(missing.contains("not a path in /nix/store"), "{out}");
    assert!(
        !missing.contains("Nothing left to be done"),
        "no guest booted: {out}"
    );
    for key in [
        "missing-status",
        "missing-entry-status",
        "outside-store-status",
    ] {
        assert_eq!(value(out, key), "1", "{key}: {out}");
    }
}

const FIND_AND_SHELL: &str = r#"
echo find-begin
tvix-boot --find
echo "find-status=$?"
echo find-end
echo cmdline-find-begin
CH_CMDLINE=tvix.find tvix-boot
echo "cmdline-find-status=$?"
echo cmdline-find-end
echo shell-begin
printf 'ls /nix/store | sed s/^/shell-sees-/\nexit 3\n' | tvix-boot --shell
echo "shell-status=$?"
echo shell-end
echo store-shell-begin
printf 'echo store-shell-$((6 * 7))\nexit\n' | tvix-boot --shell-path "$BB"
echo "store-shell-status=$?"
echo store-shell-end
CH_CMDLINE="tvix.run=$BB/bin/sh tvix.args=LWMAZXhpdCA1AA" tvix-boot
echo "cmdline-run-status=$?"
tvix-boot --run "$BB/bin/sh" --cmdline tvix.shell
echo "conflict-status=$?"
"#;

fn find_and_shell_from_stdin_and_the_original_cmdline_keys(out: &TestHostOutput) {
    finished(out);
    assert!(out.success(), "{out}");
    let bb = value(out, "bb-path");

    for (begin, end, status) in [
        ("find-begin", "find-end", "find-status"),
        (
            "cmdline-find-begin",
            "cmdline-find-end",
            "cmdline-find-status",
        ),
    ] {
        let listing = between(out, begin, end);
        let lines: Vec<&str> = listing.lines().map(str::trim).collect();
        for path in [
            bb.to_owned(),
            format!("{bb}/bin"),
            format!("{bb}/bin/busybox"),
            format!("{bb}/bin/sh"),
        ] {
            assert!(
                lines.contains(&path.as_str()),
                "{begin}: {path} missing: {out}"
            );
        }
        assert_eq!(value(out, status), "0", "{out}");
    }

    let shell = between(out, "shell-begin", "shell-end");
    let basename = bb.trim_start_matches("/nix/store/");
    assert!(
        shell.contains(&format!("shell-sees-{basename}")),
        "the shell read its commands from stdin: {out}"
    );
    assert_eq!(value(out, "shell-status"), "3", "{out}");
    assert!(
        between(out, "store-shell-begin", "store-shell-end").contains("store-shell-42"),
        "{out}"
    );
    assert_eq!(value(out, "store-shell-status"), "0", "{out}");
    // tvix.args=LWMAZXhpdCA1AA is base64url of "-c\0exit 5\0".
    assert_eq!(value(out, "cmdline-run-status"), "5", "{out}");
    assert_eq!(value(out, "conflict-status"), "1", "{out}");
    assert!(
        out.serial.contains("--run conflicts with the command line"),
        "{out}"
    );
}

const INIT_SWITCHES_ROOT: &str = r##"
mkdir -p /tmp/system
{
  echo "#!$BB/bin/sh"
  echo 'echo "system-init pid=$$"'
  echo "$BB/bin/busybox ls / | $BB/bin/busybox sed s/^/system-root-/"
  echo "test -x $BB/bin/busybox && echo system-store-ok"
  echo "$BB/bin/busybox poweroff -f"
} > /tmp/system/init
chmod +x /tmp/system/init
SYSTEM=$(tvix-boot store import /tmp/system)
tvix-boot --init "$SYSTEM/init"
echo "init-status=$?"
"##;

fn init_switches_root_into_a_system_closure(out: &TestHostOutput) {
    finished(out);
    assert!(out.success(), "{out}");
    assert_eq!(value(out, "system-init pid"), "1", "runs as PID 1: {out}");
    assert!(out.serial.contains("system-store-ok"), "{out}");
    let root: Vec<&str> = out
        .serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix("system-root-"))
        .collect();
    assert!(root.contains(&"nix"), "the new root has /nix: {out}");
    assert!(
        !root.contains(&"init"),
        "the initramfs is no longer / : {out}"
    );
    assert_eq!(value(out, "init-status"), "0", "{out}");
}
