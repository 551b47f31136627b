//! End-to-end: `tvix-boot --run` behaves like the program itself when its stdio is not a
//! terminal. The program's stdin, stdout and stderr travel on virtio-console ports,
//! separate from the guest's console: byte-exact both ways, end of file on stdin, stderr
//! apart from stdout, SIGPIPE when the reader goes away, signals to tvix-boot reaching
//! the program, the program's exit status.
//! Inside the QEMU TCG test host (nested KVM); fails, never skips, when it cannot run.

use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::tree::last_value;
use tvix_boot_tests::{GUEST_KERNEL, Suite, TestHost, TestHostOutput};

const TIMEOUT: Duration = Duration::from_secs(600);

/// Every byte value, CR/LF in every combination, and no final newline.
const MAKE_BYTES: &str = r#"
i=0; while [ $i -lt 256 ]; do printf "\\$(printf %o $i)"; i=$((i + 1)); done > /tmp/data/bytes
printf 'a\r\nb\n\rc\r\rd\n\ne' >> /tmp/data/bytes
i=0; while [ $i -lt 256 ]; do printf "\\$(printf %o $((255 - i)))"; i=$((i + 1)); done >> /tmp/data/bytes
"#;

const SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME=/tmp/store TVIX_BOOT_KERNEL={kernel}
mkdir -p /tmp/bb/bin /tmp/data
cp /bin/busybox /tmp/bb/bin/busybox
BB=$(tvix-boot store import /tmp/bb)/bin/busybox
{make_bytes}
printf '#!/no/such/interpreter\n' > /tmp/data/bad-interpreter
chmod +x /tmp/data/bad-interpreter
D=$(tvix-boot store import /tmp/data)
head -c 67108864 /dev/urandom > /tmp/big
set +e

echo "bytes-size=$(wc -c < /tmp/data/bytes)"
tvix-boot --run $BB -- cat $D/bytes > /tmp/bytes.out 2> /tmp/bytes.err
echo "bytes-status=$?"
cmp /tmp/data/bytes /tmp/bytes.out && echo bytes-identical
echo "bytes-stderr=$(wc -c < /tmp/bytes.err)"

tvix-boot --run $BB -- sh -c 'echo to-stdout; echo to-stderr >&2; exit 42' > /tmp/split.out 2> /tmp/split.err
echo "split-status=$?"
echo "split-out=$(od -An -c /tmp/split.out | tr -s ' ')"
echo "split-err=$(od -An -c /tmp/split.err | tr -s ' ')"

read t0 _ < /proc/uptime
tvix-boot --run $BB -- cat < /tmp/big > /tmp/big.out
echo "big-status=$?"
read t1 _ < /proc/uptime
echo "big-in=$(sha256sum < /tmp/big | cut -d' ' -f1)"
echo "big-out=$(sha256sum < /tmp/big.out | cut -d' ' -f1)"
echo "big-seconds=$t0 $t1"

tvix-boot --run $BB -- sha256sum < /tmp/big > /tmp/sum.out
echo "sum-status=$?"
echo "sum-guest=$(cut -d' ' -f1 /tmp/sum.out)"

tvix-boot --run $BB -- cat < /dev/null > /tmp/empty.out
echo "empty-status=$?"
echo "empty-bytes=$(wc -c < /tmp/empty.out)"

read t0 _ < /proc/uptime
{ tvix-boot --run $BB -- yes; echo "yes-status=$?" > /tmp/yes.status; } | head -c 1 > /tmp/yes.out
read t1 _ < /proc/uptime
cat /tmp/yes.status
echo "yes-out=$(cat /tmp/yes.out)"
echo "yes-seconds=$t0 $t1"

tvix-boot --run $BB -- sh -c 'kill -TERM $$' < /dev/null > /dev/null
echo "signal-status=$?"

# Signals to tvix-boot reach the program, which handles them as it would on a host.
# (Not SIGINT: a background job of a script has it ignored, and so would the program.)
wait_ready() {
  i=0; while [ $i -lt 600 ] && ! grep -q ready "$1" 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
}
tvix-boot --run $BB -- sh -c 'trap "echo caught-term; exit 7" TERM; echo ready; while :; do sleep 1; done' < /dev/null > /tmp/trap.out &
P=$!
wait_ready /tmp/trap.out
kill -TERM $P
wait $P
echo "trap-status=$?"
echo "trap-out=$(tr '\n' ',' < /tmp/trap.out)"
tvix-boot --run $BB -- sh -c 'echo ready; exec sleep 1000' < /dev/null > /tmp/hup.out &
P=$!
wait_ready /tmp/hup.out
kill -HUP $P
wait $P
echo "hup-status=$?"

tvix-boot --env FOO='a b' --env HOME=/tmp --workdir $D --run $BB -- sh -c 'echo "[$FOO] $HOME $PWD $PATH ${TERM-unset}"' > /tmp/env.out
echo "env-status=$?"
echo "env-out=$(cat /tmp/env.out)"
echo "env-data=$D"

tvix-boot --workdir /no/such/dir --run $BB -- true > /tmp/wd.out 2> /tmp/wd.err
echo "workdir-status=$?"
echo "workdir-err=$(cat /tmp/wd.err)"

tvix-boot --run $D/bad-interpreter > /tmp/noexec.out 2> /tmp/noexec.err
echo "noexec-status=$?"
echo "noexec-err=$(cat /tmp/noexec.err)"

CH_CMDLINE="tvix.run=$BB tvix.args=$(printf 'echo\0from-cmdline\0' | base64 | tr '+/' '-_' | tr -d '=')" tvix-boot > /tmp/cmdline.out < /dev/null
echo "cmdline-status=$?"
echo "cmdline-out=$(cat /tmp/cmdline.out)"

tvix-boot --console-log /tmp/console.log --run $BB -- poweroff -f < /dev/null > /tmp/po.out 2> /tmp/po.err
echo "poweroff-status=$?"
echo "poweroff-out=$(wc -c < /tmp/po.out)"
grep -q 'without reporting an exit status' /tmp/po.err && echo poweroff-said-why
grep -q "console's last lines" /tmp/po.err && grep -q '| tvix-boot init' /tmp/po.err && echo poweroff-showed-console
grep -q '^tvix-boot init' /tmp/console.log && echo console-log-written
tvix-boot --verbose --run $BB -- true < /dev/null > /tmp/v.out 2> /tmp/v.err
grep -q 'tvix-boot: exit-status 0' /tmp/v.err && echo verbose-console-on-stderr
echo "verbose-out=$(wc -c < /tmp/v.out)"

read t0 _ < /proc/uptime
tvix-boot --timeout 3s --run $BB -- sleep 1000 < /dev/null > /dev/null 2> /tmp/timeout.err
echo "timeout-status=$?"
read t1 _ < /proc/uptime
echo "timeout-seconds=$t0 $t1"
echo "timeout-err=$(head -n 1 /tmp/timeout.err)"

tvix-boot --seccomp=off --run $BB -- echo unfiltered < /dev/null > /tmp/nofilter.out
echo "nofilter-status=$?"
echo "nofilter-out=$(cat /tmp/nofilter.out)"
"#;

pub const CHECKS: &[(&str, Check)] = &[(
    "run_passes_the_programs_streams_byte_exact_and_its_status",
    run_passes_the_programs_streams_byte_exact_and_its_status,
)];

pub fn suite() -> Suite {
    Suite::new(
        "program_streams",
        TestHost::builder().with_static_tvix_boot().memory_mib(2048),
    )
    .case(
        "run_passes_the_programs_streams_byte_exact_and_its_status",
        &SCRIPT
            .replace("{kernel}", GUEST_KERNEL)
            .replace("{make_bytes}", MAKE_BYTES),
        vec![],
        TIMEOUT,
    )
}

/// The value of `key=` at the start of a line (the last such line).
fn value<'a>(out: &'a TestHostOutput, key: &str) -> &'a str {
    last_value(&out.serial, key).unwrap_or_else(|| panic!("no {key}= in the output: {out}"))
}

fn seconds(out: &TestHostOutput, key: &str) -> f64 {
    let v: Vec<f64> = value(out, key)
        .split_whitespace()
        .map(|t| t.parse().unwrap())
        .collect();
    v[1] - v[0]
}

fn run_passes_the_programs_streams_byte_exact_and_its_status(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");

    // 256 byte values twice plus the CR/LF mix, no final newline: identical on stdout,
    // nothing else there (no banner, no status lines, no kernel messages).
    assert_eq!(value(out, "bytes-size"), "525", "{out}");
    assert_eq!(value(out, "bytes-status"), "0", "{out}");
    assert!(
        out.serial.contains("bytes-identical"),
        "stdout differs: {out}"
    );
    assert_eq!(value(out, "bytes-stderr"), "0", "{out}");

    // stdout and stderr apart, each exactly what the program wrote; its own status.
    assert_eq!(value(out, "split-status"), "42", "{out}");
    assert_eq!(value(out, "split-out"), " t o - s t d o u t \\n", "{out}");
    assert_eq!(value(out, "split-err"), " t o - s t d e r r \\n", "{out}");

    // 64 MiB through stdin and back out.
    assert_eq!(value(out, "big-status"), "0", "{out}");
    assert_eq!(value(out, "big-in"), value(out, "big-out"), "{out}");
    eprintln!(
        "64 MiB in and out through the guest: {:.1} s",
        seconds(out, "big-seconds")
    );

    // A program from the store reads piped input to its end.
    assert_eq!(value(out, "sum-status"), "0", "{out}");
    assert_eq!(value(out, "sum-guest"), value(out, "big-in"), "{out}");

    // No input is end of file at once.
    assert_eq!(value(out, "empty-status"), "0", "{out}");
    assert_eq!(value(out, "empty-bytes"), "0", "{out}");

    // The reader goes away: `yes` dies of SIGPIPE (128 + 13) and the VM ends promptly.
    assert_eq!(value(out, "yes-out"), "y", "{out}");
    assert_eq!(value(out, "yes-status"), "141", "{out}");
    let yes_seconds = seconds(out, "yes-seconds");
    assert!(
        yes_seconds < 60.0,
        "`tvix-boot --run yes | head -c1` took {yes_seconds} s"
    );

    // Killed by a signal: 128 + SIGTERM.
    assert_eq!(value(out, "signal-status"), "143", "{out}");
    // SIGTERM to tvix-boot went to the program, whose trap ran and chose the status;
    // SIGHUP ended a program without a handler: 128 + 1.
    assert_eq!(value(out, "trap-out"), "ready,caught-term,", "{out}");
    assert_eq!(value(out, "trap-status"), "7", "{out}");
    assert_eq!(value(out, "hup-status"), "129", "{out}");

    // --env adds to and replaces the small default environment; --workdir.
    assert_eq!(value(out, "env-status"), "0", "{out}");
    assert_eq!(
        value(out, "env-out"),
        format!("[a b] /tmp {} /bin:/sbin unset", value(out, "env-data")),
        "{out}"
    );

    // The init's complaints about the program go to the program's stderr.
    assert_eq!(value(out, "workdir-status"), "126", "{out}");
    assert!(
        value(out, "workdir-err").contains("working directory /no/such/dir"),
        "{out}"
    );
    assert_eq!(value(out, "noexec-status"), "127", "{out}");
    assert!(value(out, "noexec-err").contains("cannot run"), "{out}");

    // The console is a log: on stderr with --verbose, in --console-log, and its last
    // lines after a guest that stopped without a status; never on stdout.
    assert_eq!(value(out, "poweroff-status"), "1", "{out}");
    assert_eq!(value(out, "poweroff-out"), "0", "{out}");
    for line in [
        "poweroff-said-why",
        "poweroff-showed-console",
        "console-log-written",
        "verbose-console-on-stderr",
    ] {
        assert!(out.serial.contains(line), "no {line}: {out}");
    }
    assert_eq!(value(out, "verbose-out"), "0", "{out}");

    // --timeout stops a guest that would run on: 124, like timeout(1), and promptly
    // (the boot takes a few seconds here).
    assert_eq!(value(out, "timeout-status"), "124", "{out}");
    assert!(
        value(out, "timeout-err").contains("did not stop within 3s"),
        "{out}"
    );
    let timeout_seconds = seconds(out, "timeout-seconds");
    assert!(
        (3.0..30.0).contains(&timeout_seconds),
        "--timeout 3s took {timeout_seconds} s"
    );

    // The filters can be turned off.
    assert_eq!(value(out, "nofilter-status"), "0", "{out}");
    assert_eq!(value(out, "nofilter-out"), "unfiltered", "{out}");

    // The original CH_CMDLINE keys work the same way.
    assert_eq!(value(out, "cmdline-status"), "0", "{out}");
    assert_eq!(value(out, "cmdline-out"), "from-cmdline", "{out}");
}
