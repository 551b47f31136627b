//! How long `tvix-boot --run` of Debian's CPython with an import-heavy script (hundreds of
//! files, C extension modules) takes, from start to exit, with its store local, behind
//! `tvix-boot store daemon` over grpc+unix, and over TCP loopback: side by side in one
//! QEMU TCG test host (nested KVM), in turn, after one warm-up run of each. Prints each
//! run, the medians and each median's ratio to local's. Goal: within 1.2x of local.
//!
//! TCG stretches absolute times; compare the ratios, taken in one test host. Needs
//! nix-bin, patchelf and python3.11 (tests/nix/python.nix). Run:
//!
//!     cargo bench -p tvix-boot-benches --bench grpc_run_start
//!
//! GRPC_BENCH_ROUNDS sets the rounds (default 3).

use std::collections::BTreeMap;
use std::time::Duration;

use tvix_boot_benches::median;
use tvix_boot_tests::testhost::shell_quote;
use tvix_boot_tests::tree::lines_with;
use tvix_boot_tests::{GUEST_KERNEL, TestHost, assets, cpython};

const KINDS: [&str; 3] = ["local", "unix", "tcp"];

const HOST_SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME={data_home} TVIX_BOOT_KERNEL={kernel}
ifconfig lo 127.0.0.1 up 2>/dev/null || ip link set lo up
mkdir -p /tmp/program && printf '%s' {program} > /tmp/program/check.py
PROGRAM=$(tvix-boot store import /tmp/program)
tvix-boot store daemon --listen /run/store.sock 2> /run/daemon-unix.log &
tvix-boot store daemon --listen 127.0.0.1:7000 2> /run/daemon-tcp.log &
while [ ! -S /run/store.sock ]; do sleep 0.1; done
while ! grep -q serving /run/daemon-tcp.log; do sleep 0.1; done
set +e
python_run() {
  case $1 in
    local) A= ;;
    unix) A=grpc+unix:///run/store.sock ;;
    tcp) A=grpc+http://127.0.0.1:7000 ;;
  esac
  if [ -z "$A" ]; then
    tvix-boot --run {python}/bin/python3.11 -- "$PROGRAM/check.py"
  else
    env XDG_DATA_HOME=/nonexistent BLOB_SERVICE_ADDR=$A DIRECTORY_SERVICE_ADDR=$A \
      PATH_INFO_SERVICE_ADDR=$A tvix-boot --run {python}/bin/python3.11 -- "$PROGRAM/check.py"
  fi
}
for round in warm-up {rounds}; do
  for kind in local unix tcp; do
    read t0 _ < /proc/uptime
    python_run $kind > /tmp/out 2>&1
    status=$?
    read t1 _ < /proc/uptime
    echo "bench-run $round $kind $t0 $t1 $status $(grep -c 'python-checks ok' /tmp/out)"
  done
done
"#;

fn main() {
    tvix_boot_benches::bench_mode_only("grpc_run_start");
    let rounds: usize = std::env::var("GRPC_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let tvix_boot = assets::tvix_boot_static().unwrap_or_else(|e| panic!("tvix-boot: {e}"));
    let work = tempfile::tempdir().unwrap();
    let (python, files) = cpython::closure_in_store(&tvix_boot, work.path());
    let round_names: Vec<String> = (1..=rounds).map(|r| r.to_string()).collect();
    let script = HOST_SCRIPT
        .replace("{data_home}", cpython::DATA_HOME)
        .replace("{kernel}", GUEST_KERNEL)
        .replace("{program}", &shell_quote(cpython::PROGRAM))
        .replace("{python}", &python)
        .replace("{rounds}", &round_names.join(" "));
    let out = TestHost::builder()
        .tvix_boot(tvix_boot)
        .memory_mib(3072)
        .build()
        .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
        .run(
            &script,
            &files,
            Duration::from_secs(300 + 180 * (rounds as u64 + 1)),
        )
        .unwrap_or_else(|e| panic!("test host run failed: {e}"));
    assert!(out.success(), "{out}");

    let mut times = BTreeMap::<&str, Vec<f64>>::new();
    for line in lines_with(&out.serial, "bench-run ") {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [round, kind, t0, t1, status, ok] = fields[..] else {
            panic!("a bench-run line with other fields: {line}");
        };
        assert_eq!(status, "0", "a run failed: {line}: {out}");
        assert_eq!(ok, "1", "a run's output was wrong: {line}: {out}");
        let seconds = t1.parse::<f64>().unwrap() - t0.parse::<f64>().unwrap();
        println!("round {round:>7}: CPython --run from {kind:5}: {seconds:.2} s");
        if round != "warm-up" {
            let kind = KINDS
                .into_iter()
                .find(|k| *k == kind)
                .unwrap_or_else(|| panic!("an unknown kind: {line}"));
            times.entry(kind).or_default().push(seconds);
        }
    }
    for kind in KINDS {
        assert_eq!(times.get(kind).map_or(0, Vec::len), rounds, "{kind}: {out}");
    }
    let local = median(times["local"].clone());
    println!("CPython start with --run, median of {rounds} (TCG: compare the ratios):");
    for kind in KINDS {
        let m = median(times[kind].clone());
        println!(
            "  {:16} {m:6.2} s  {:.2}x local",
            match kind {
                "local" => "local store:",
                "unix" => "grpc+unix:",
                _ => "grpc+http (TCP):",
            },
            m / local
        );
    }
    println!("  goal: grpc within 1.2x of local");
}
