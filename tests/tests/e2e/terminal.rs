//! End-to-end: tvix-boot at a terminal. In the QEMU TCG test host, `pty-session`
//! (tests/src/bin) runs tvix-boot on a pseudo-terminal and types at it: the guest's
//! program has a real terminal of the pty's size that follows resizes, Ctrl-C interrupts
//! the guest's foreground job and not tvix-boot, TERM comes from the host, and the
//! terminal's settings are the same afterwards: after a normal exit, a guest kernel panic
//! and a SIGTERM to tvix-boot. Fails, never skips, when the test host cannot run.

use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::tree::last_value;
use tvix_boot_tests::{
    GUEST_KERNEL, GuestFile, Initramfs, Suite, TestHost, TestHostOutput, assets,
};

const TIMEOUT: Duration = Duration::from_secs(600);
const PANIC_INITRD: &str = "/guest/panic.cpio";

const SCRIPT: &str = r#"
# Pseudo-terminals need devpts, which the test host does not mount by itself.
mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666 devpts /dev/pts
[ -e /dev/ptmx ] || ln -s pts/ptmx /dev/ptmx
export XDG_DATA_HOME=/tmp/store TVIX_BOOT_KERNEL={kernel} TERM=xterm-tvix
mkdir -p /tmp/bb/bin
cp /bin/busybox /tmp/bb/bin/busybox
BB=$(tvix-boot store import /tmp/bb)/bin/busybox

echo shell-begin
pty-session 37 101 \
  'expect:# ' 'send:stty size\n' 'expect:37 101' \
  'send:echo term=$TERM\n' 'expect:term=xterm-tvix' \
  'send:sleep 1000\n' 'sleep:3' 'send:\x03' 'send:echo after-$((6*7))\n' 'expect:after-42' \
  'resize:40,120' 'sleep:2' 'send:stty size\n' 'expect:40 120' \
  'send:exit 3\n' \
  -- tvix-boot --shell
echo shell-end

echo run-begin
pty-session 24 80 'expect:# ' 'send:stty size; tty\n' 'expect:/dev/' 'send:exit\n' \
  -- tvix-boot --run $BB -- sh
echo run-end

echo panic-begin
pty-session 30 90 -- tvix-boot --initrd {panic_initrd}
echo panic-end

echo sigterm-begin
pty-session 30 90 'expect:# ' 'send:sleep 1000\n' 'sleep:2' 'kill:TERM' -- tvix-boot --shell
echo sigterm-end
"#;

pub const CHECKS: &[(&str, Check)] = &[(
    "the_guest_program_gets_a_real_terminal_and_the_host_terminal_comes_back_unchanged",
    the_guest_program_gets_a_real_terminal_and_the_host_terminal_comes_back_unchanged,
)];

pub fn suite() -> Suite {
    let pty_session = assets::pty_session_static_once()
        .unwrap_or_else(|e| panic!("cannot build pty-session: {e}"));
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("busybox: {e}"));
    // PID 1 exits: the guest kernel panics ("Attempted to kill init").
    let panic_initrd = Initramfs::busybox_init(&busybox, "echo guest-init-exits\nexit 1")
        .unwrap_or_else(|e| panic!("initrd: {e}"))
        .finish();
    Suite::new("terminal", TestHost::builder().with_static_tvix_boot()).case(
        "the_guest_program_gets_a_real_terminal_and_the_host_terminal_comes_back_unchanged",
        &SCRIPT
            .replace("{kernel}", GUEST_KERNEL)
            .replace("{panic_initrd}", PANIC_INITRD),
        vec![
            GuestFile::host("/bin/pty-session", pty_session, 0o755),
            GuestFile::bytes(PANIC_INITRD, panic_initrd, 0o644),
        ],
        TIMEOUT,
    )
}

fn section<'a>(out: &'a TestHostOutput, name: &str) -> &'a str {
    out.between(&format!("{name}-begin"), &format!("{name}-end"))
        .unwrap_or_else(|| panic!("no {name}-begin ... {name}-end: {out}"))
}

fn value<'a>(text: &'a str, key: &str) -> &'a str {
    last_value(text, key).unwrap_or_else(|| panic!("no {key}= in:\n{text}"))
}

fn the_guest_program_gets_a_real_terminal_and_the_host_terminal_comes_back_unchanged(
    out: &TestHostOutput,
) {
    assert!(!out.timed_out, "timed out: {out}");

    // An interactive shell: the pty's size, TERM, Ctrl-C to the guest's job, resizes
    // followed, the shell's exit status, the terminal as it was.
    let shell = section(out, "shell");
    assert!(!shell.contains("pty-session:"), "{out}");
    assert_eq!(value(shell, "pty-status"), "3", "{out}");
    assert_eq!(value(shell, "pty-termios-same"), "yes", "{out}");

    // --run with a terminal: the program's stdio is a terminal of the right size.
    let run = section(out, "run");
    assert!(run.contains("24 80"), "{out}");
    assert_eq!(value(run, "pty-status"), "0", "{out}");
    assert_eq!(value(run, "pty-termios-same"), "yes", "{out}");

    // A guest kernel panic: tvix-boot exits 2, the terminal is restored.
    let panic = section(out, "panic");
    assert!(panic.contains("guest-init-exits"), "{out}");
    assert_eq!(value(panic, "pty-status"), "2", "{out}");
    assert_eq!(value(panic, "pty-termios-same"), "yes", "{out}");

    // SIGTERM to tvix-boot: it dies of it (128 + 15), the terminal is restored.
    let sigterm = section(out, "sigterm");
    assert_eq!(value(sigterm, "pty-status"), "143", "{out}");
    assert_eq!(value(sigterm, "pty-termios-same"), "yes", "{out}");
}
