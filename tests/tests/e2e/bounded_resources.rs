//! End-to-end: what a guest does to its store does not grow the VMM's host resources
//! without bound. A guest holds one store file open 100,000 times, then walks a tree of
//! 10,000 files three times (dropping its caches after each, so its kernel FORGETs the
//! inodes and looks them up again). Meanwhile the test host counts tvix-boot's open
//! descriptors and its resident memory outside guest RAM.
//!
//! The tree is 20 times the VMM's cache of open blobs (512) and 10 times the bound on
//! the inodes it may still hold at the end, so neither bound can hold by chance; a larger
//! one only makes the suite longer (it is the longest of the tier).
//! Inside the QEMU TCG test host (nested KVM); fails, never skips, when it cannot run.

use std::time::Duration;

use tvix_boot_tests::plan::Check;
use tvix_boot_tests::tree::last_value;
use tvix_boot_tests::{GUEST_KERNEL, GuestFile, Suite, TestHost, TestHostOutput, assets};

/// A deadline against hangs, not a measurement: this took about 13 minutes on the 2-core
/// machines with another test host beside it (with a tree of 20,000 files).
const TIMEOUT: Duration = Duration::from_secs(1800);
const OPENS: u32 = 100_000;
const TREE_FILES: u32 = 10_000;
/// The tree's directories: one per 500 files (the script's `awk`), and its root.
const TREE_DIRECTORIES: u32 = TREE_FILES / 500 + 1;
/// Guest RAM in MiB; its mapping is left out of the VMM's own resident memory.
const GUEST_MIB: u32 = 1024;

const SCRIPT: &str = r#"
set -e
export XDG_DATA_HOME=/tmp/store TVIX_BOOT_KERNEL={kernel}
mkdir -p /tmp/prog/bin
cp /bin/open-many /tmp/prog/bin/open-many
P=$(tvix-boot store import /tmp/prog)
awk 'BEGIN { for (i = 0; i < {tree_files}; i++) { d = "/tmp/tree/d" int(i / 500); if (i % 500 == 0) system("mkdir -p " d); f = d "/f" i; print "file " i > f; close(f) } }'
T=$(tvix-boot store import /tmp/tree)
set +e
echo "imported-uptime=$(cut -d' ' -f1 /proc/uptime)"
mkfifo /tmp/to-guest /tmp/from-guest
TVIX_BOOT_LOG=info tvix-boot --memory {guest_mib}M --run $P/bin/open-many -- $P/bin/open-many {opens} $T 3 < /tmp/to-guest > /tmp/from-guest 2> /tmp/log &
pid=$!
exec 3> /tmp/to-guest 4< /tmp/from-guest
# Resident KiB of every mapping but guest RAM: the one at least its size (the kernel may
# merge a neighbouring anonymous mapping into it, so not exactly its size).
vmm_rss() {
    awk -v guest=$(({guest_mib} * 1024)) '/^[0-9a-f]+-[0-9a-f]+ / { size = -1 } /^Size:/ { size = $2 } /^Rss:/ { if (size < guest) rss += $2 } END { print rss }' /proc/$pid/smaps
}
step=0
while read -r line <&4; do
    echo "guest: $line"
    case $line in done) break ;; esac
    step=$((step + 1))
    echo "step$step-uptime=$(cut -d' ' -f1 /proc/uptime)"
    echo "step$step-fds=$(ls /proc/$pid/fd | wc -l)"
    echo "step$step-rss-kib=$(vmm_rss)"
    echo go >&3
done
exec 3>&- 4<&-
wait $pid
echo "status=$?"
echo "inodes-at-end=$(sed -n 's/.*store file system: \([0-9]*\) inodes still held.*/\1/p' /tmp/log)"
"#;

pub const CHECKS: &[(&str, Check)] = &[(
    "many_opens_and_repeated_walks_leave_the_vmms_fds_and_memory_bounded",
    many_opens_and_repeated_walks_leave_the_vmms_fds_and_memory_bounded,
)];

pub fn suite() -> Suite {
    let open_many =
        assets::open_many_static_once().unwrap_or_else(|e| panic!("cannot build open-many: {e}"));
    Suite::new(
        "bounded_resources",
        TestHost::builder().with_static_tvix_boot().memory_mib(2048),
    )
    .case(
        "many_opens_and_repeated_walks_leave_the_vmms_fds_and_memory_bounded",
        &SCRIPT
            .replace("{kernel}", GUEST_KERNEL)
            .replace("{opens}", &OPENS.to_string())
            .replace("{tree_files}", &TREE_FILES.to_string())
            .replace("{guest_mib}", &GUEST_MIB.to_string()),
        vec![GuestFile::host("/bin/open-many", open_many, 0o755)],
        TIMEOUT,
    )
}

fn number(out: &TestHostOutput, key: &str) -> u64 {
    last_value(&out.serial, key)
        .unwrap_or_else(|| panic!("no {key}= in the output: {out}"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}: {out}"))
}

fn many_opens_and_repeated_walks_leave_the_vmms_fds_and_memory_bounded(out: &TestHostOutput) {
    assert!(!out.timed_out, "timed out: {out}");
    assert_eq!(number(out, "status"), 0, "{out}");
    assert!(
        out.serial.contains(&format!("guest: held {OPENS}")),
        "{out}"
    );
    let walked = format!("guest: walked {TREE_FILES} files, {TREE_DIRECTORIES} directories");
    assert_eq!(out.serial.matches(&walked).count(), 3, "{out}");

    // Descriptors follow the blobs in use, not the guest's opens: one blob, held 100,000
    // times, and then TREE_FILES blobs read one after another.
    let fds: Vec<u64> = (1..=4)
        .map(|step| number(out, &format!("step{step}-fds")))
        .collect();
    let rss: Vec<u64> = (1..=4)
        .map(|step| number(out, &format!("step{step}-rss-kib")))
        .collect();
    eprintln!(
        "VMM descriptors after: 100,000 opens {}, walks {:?}",
        fds[0],
        &fds[1..]
    );
    eprintln!(
        "VMM resident KiB outside guest RAM after: 100,000 opens {}, walks {:?}",
        rss[0],
        &rss[1..]
    );
    for (step, &n) in fds.iter().enumerate() {
        assert!(n < 1024, "step {}: the VMM holds {n} descriptors", step + 1);
    }
    // After the last walk the guest dropped its caches: its kernel FORGOT the tree's
    // inodes (more than TREE_FILES were handed out), and the VMM dropped them.
    let inodes = number(out, "inodes-at-end");
    eprintln!("VMM inodes still held after the guest dropped its caches: {inodes}");
    assert!(inodes < 1000, "the VMM still held {inodes} inodes: {out}");

    // Tens of MiB at most (the tables, the blob cache's buffers, the binary itself) ...
    for (step, &kib) in rss.iter().enumerate() {
        assert!(kib < 64 << 10, "step {}: the VMM holds {kib} KiB", step + 1);
    }
    // ... and the second and third walks find what the first did: it stays where it was
    // (it grew by 1.1 MiB over the two walks of a tree twice this size).
    let growth = rss[3].saturating_sub(rss[1]);
    assert!(
        growth < 4 << 10,
        "the VMM grew by {growth} KiB between the first and the third walk: {rss:?}"
    );
}
