//! VMM start-up on this machine's own /dev/kvm: from starting `tvix-boot` to the guest's
//! first instructions, stage by stage, and the VMM's resident memory outside guest RAM,
//! each against its target.
//!
//! The guest is a tiny ELF "kernel" (built here) whose first instructions write one byte
//! to the serial port and halt, so the vCPU's first exit comes right after the first
//! instructions ran. tvix-boot logs each stage's CLOCK_MONOTONIC time and the time it
//! spent in each KVM ioctl before the first KVM_RUN, timed around the calls in-process
//! (`TVIX_BOOT_LOG=tvix_boot::startup=debug`, see vmm/src/startup.rs); this process
//! reads the same clock just before it spawns tvix-boot. So the work that is not KVM's
//! own is the time from spawn to KVM_RUN less those ioctls, per run.
//! Works on a PVM /dev/kvm (it runs a guest's first instructions fine).
//!
//!     cargo bench -p tvix-boot-benches --bench vmm_startup
//!     TVIX_BOOT_BIN=path/to/tvix-boot cargo bench ...   (another build of it)

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const RUNS: usize = 20;
/// Guest RAM; its mapping is left out of the VMM's resident memory.
const GUEST_MIB: u64 = 512;
/// Where vmlinux-style ELF kernels are loaded (vmm's layout: HIMEM_START).
const LOAD_ADDRESS: u64 = 0x100_0000;
/// Targets: work before the first guest instruction other than the KVM ioctls, and the
/// VMM's resident memory outside guest RAM (Firecracker's budget).
const TARGET_NON_IOCTL_MS: f64 = 3.0;
const TARGET_RSS_MIB: f64 = 5.0;

fn main() {
    tvix_boot_benches::bench_mode_only("vmm_startup");
    if std::fs::metadata("/dev/kvm").is_err() {
        eprintln!("vmm_startup: no /dev/kvm on this machine: nothing to measure");
        std::process::exit(1);
    }
    let work = tempfile::tempdir().unwrap();
    let kernel = work.path().join("tiny.elf");
    std::fs::write(&kernel, tiny_kernel()).unwrap();
    let initrd = work.path().join("empty.cpio");
    std::fs::write(&initrd, empty_cpio()).unwrap();
    let tvix_boot = build_tvix_boot();
    // All of the binary in the page cache, as after it was installed or copied: the
    // kernel maps up to 16 cached pages around each page fault ("fault-around"), so
    // resident memory depends on how much of the file is cached, and only a file that
    // is cached whole gives the same number every time.
    std::fs::read(&tvix_boot).expect("cannot read tvix-boot");

    let mut stages: BTreeMap<usize, (String, Vec<f64>)> = BTreeMap::new();
    let mut ioctls: BTreeMap<String, (u32, Vec<f64>)> = BTreeMap::new();
    let mut totals = Vec::new();
    let mut to_run = Vec::new();
    let mut ioctl_totals = Vec::new();
    let mut non_ioctl = Vec::new();
    let mut rss = Vec::new();
    let mut rss_file = Vec::new();
    // One run first to warm the page cache; not counted.
    for run in 0..=RUNS {
        let result = run_once(&tvix_boot, &kernel, &initrd);
        if run == 0 {
            continue;
        }
        let mut previous = result.spawned_ns;
        let mut entering_ns = None;
        for (i, (name, at)) in result.marks.iter().enumerate() {
            stages
                .entry(i)
                .or_insert_with(|| (name.clone(), Vec::new()))
                .1
                .push(at.saturating_sub(previous) as f64 / 1e6);
            previous = *at;
            if name == "entering KVM_RUN" {
                entering_ns = Some(*at);
            }
        }
        let entering_ns = entering_ns.expect("tvix-boot never reported entering KVM_RUN");
        let ioctl_ns: u64 = result.ioctls.iter().map(|(_, _, ns)| ns).sum();
        for (name, count, ns) in result.ioctls {
            let entry = ioctls.entry(name).or_insert((count, Vec::new()));
            entry.1.push(ns as f64 / 1e6);
        }
        let spawn_to_run = entering_ns - result.spawned_ns;
        totals.push((result.first_exit_ns - result.spawned_ns) as f64 / 1e6);
        to_run.push(spawn_to_run as f64 / 1e6);
        ioctl_totals.push(ioctl_ns as f64 / 1e6);
        non_ioctl.push(spawn_to_run.saturating_sub(ioctl_ns) as f64 / 1e6);
        rss.push(result.vmm_rss.total_kib as f64);
        rss_file.push(result.vmm_rss.file_kib as f64);
    }

    println!("vmm_startup: {RUNS} runs, medians, ms since the previous stage");
    println!("  {:<40} {:>8}", "spawn -> main entered", "");
    for (name, times) in stages.values() {
        println!("  {name:<40} {:>8.3}", median(times));
    }
    let total = median(&totals);
    println!(
        "  {:<40} {total:>8.3} ms (min {:.3}, max {:.3})",
        "spawn -> first exit (total)",
        min(&totals),
        max(&totals)
    );
    println!("  KVM ioctls before the first KVM_RUN, timed in tvix-boot (medians):");
    let mut by_time: Vec<(String, u32, f64)> = ioctls
        .into_iter()
        .map(|(name, (count, times))| (name, count, median(&times)))
        .collect();
    by_time.sort_by(|a, b| b.2.total_cmp(&a.2));
    for (name, count, ms) in by_time {
        println!("    {:<38} {ms:>8.3} ms", format!("{name} x {count}"));
    }
    println!("  {:<40} {:>8.3} ms", "all of them", median(&ioctl_totals));
    println!(
        "  {:<40} {:>8.3} ms",
        "spawn -> entering KVM_RUN",
        median(&to_run)
    );
    let non_ioctl_ms = median(&non_ioctl);
    println!(
        "  target: work before the first guest instruction but KVM ioctls {non_ioctl_ms:.3} ms \
         (min {:.3}, max {:.3}) vs <= {TARGET_NON_IOCTL_MS} ms: {}",
        min(&non_ioctl),
        max(&non_ioctl),
        verdict(non_ioctl_ms <= TARGET_NON_IOCTL_MS)
    );
    let rss_mib = median(&rss) / 1024.0;
    println!(
        "  target: VMM resident memory outside guest RAM at the first exit {rss_mib:.2} MiB \
         (min {:.2}, max {:.2}) vs <= {TARGET_RSS_MIB} MiB: {}",
        min(&rss) / 1024.0,
        max(&rss) / 1024.0,
        verdict(rss_mib <= TARGET_RSS_MIB)
    );
    println!(
        "    of which mapped from files (the binary, shared by every tvix-boot process) {:.2} MiB",
        median(&rss_file) / 1024.0
    );
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

struct RunResult {
    spawned_ns: u64,
    marks: Vec<(String, u64)>,
    /// Request, how often, nanoseconds in all.
    ioctls: Vec<(String, u32, u64)>,
    first_exit_ns: u64,
    vmm_rss: Rss,
}

fn run_once(tvix_boot: &Path, kernel: &Path, initrd: &Path) -> RunResult {
    let mut cmd = Command::new(tvix_boot);
    cmd.arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", &format!("{GUEST_MIB}M"), "--timeout", "10s"])
        .env("TVIX_BOOT_LOG", "tvix_boot::startup=debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let spawned_ns = monotonic_ns();
    let mut child = cmd.spawn().expect("cannot start tvix-boot");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut marks = Vec::new();
    let mut ioctls = Vec::new();
    let mut first_exit_ns = 0;
    let mut vmm_rss = Rss::default();
    for line in stderr.lines().map_while(Result::ok) {
        if let Some(ioctl) = parse_ioctl(&line) {
            ioctls.push(ioctl);
            continue;
        }
        let Some((name, at)) = parse_mark(&line) else {
            continue;
        };
        marks.push((name.clone(), at));
        if name == "first exit" {
            first_exit_ns = at;
            vmm_rss = rss_outside_guest_ram(child.id());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(first_exit_ns > 0, "tvix-boot never reported its first exit");
    RunResult {
        spawned_ns,
        marks,
        ioctls,
        first_exit_ns,
        vmm_rss,
    }
}

/// `stage NAME at NS` from tvix-boot's log.
fn parse_mark(line: &str) -> Option<(String, u64)> {
    let rest = &line[line.find("stage ")? + "stage ".len()..];
    let (name, at) = rest.rsplit_once(" at ")?;
    Some((name.to_owned(), at.trim().parse().ok()?))
}

/// `ioctl NAME x COUNT took NS` from tvix-boot's log.
fn parse_ioctl(line: &str) -> Option<(String, u32, u64)> {
    let rest = &line[line.find("ioctl ")? + "ioctl ".len()..];
    let (rest, ns) = rest.rsplit_once(" took ")?;
    let (name, count) = rest.rsplit_once(" x ")?;
    Some((
        name.to_owned(),
        count.parse().ok()?,
        ns.trim().parse().ok()?,
    ))
}

#[derive(Default)]
struct Rss {
    total_kib: u64,
    /// Of which mapped from files: the binary's pages (and, dynamic, its libraries'),
    /// which every tvix-boot process running the same file shares.
    file_kib: u64,
}

/// Resident KiB of every mapping of `pid` but guest RAM (the one at least its size).
fn rss_outside_guest_ram(pid: u32) -> Rss {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut size = 0;
    let mut from_file = false;
    let mut rss = Rss::default();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next();
        match first {
            Some("Size:") => size = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            Some("Rss:") if size < GUEST_MIB * 1024 => {
                let kib = fields
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
                rss.total_kib += kib;
                if from_file {
                    rss.file_kib += kib;
                }
            }
            // A mapping's header: address range, permissions, offset, device, inode,
            // path; an inode other than 0 means a file.
            Some(range) if range.contains('-') && !range.ends_with(':') => {
                from_file = fields.nth(3).is_some_and(|inode| inode != "0");
            }
            _ => {}
        }
    }
    rss
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::MAX, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// `$TVIX_BOOT_BIN` when set (to compare builds; a relative path is from the workspace
/// root, where cargo is run, not this package's directory, where benches run), else the
/// release tvix-boot, built now.
fn build_tvix_boot() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    if let Some(bin) = std::env::var_os("TVIX_BOOT_BIN").filter(|v| !v.is_empty()) {
        return root.join(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "tvix-boot",
            "--bin",
            "tvix-boot",
        ])
        .status()
        .expect("cannot run cargo");
    assert!(status.success(), "cannot build tvix-boot");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("release/tvix-boot")
}

/// A 64-bit ELF executable with one segment at [`LOAD_ADDRESS`]: `out 0x3f8, '!'`, then
/// `hlt` forever. tvix-boot enters it in long mode, as it enters a vmlinux.
fn tiny_kernel() -> Vec<u8> {
    const CODE: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'!', // mov al, '!'
        0xee, // out dx, al
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ];
    const CODE_OFFSET: u64 = 0x1000;
    let mut elf = Vec::new();
    // ELF header: 64-bit, little endian, version 1, System V; executable, x86-64.
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // e_entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    // Program header: PT_LOAD, read + execute.
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes());
    elf.extend_from_slice(&CODE_OFFSET.to_le_bytes()); // p_offset
    elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // p_vaddr
    elf.extend_from_slice(&LOAD_ADDRESS.to_le_bytes()); // p_paddr
    elf.extend_from_slice(&(CODE.len() as u64).to_le_bytes()); // p_filesz
    elf.extend_from_slice(&(CODE.len() as u64).to_le_bytes()); // p_memsz
    elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    elf.resize(CODE_OFFSET as usize, 0);
    elf.extend_from_slice(CODE);
    elf
}

/// A newc archive with nothing but its trailer.
fn empty_cpio() -> Vec<u8> {
    let name = b"TRAILER!!!\0";
    let mut header = format!(
        "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        name.len(),
        0
    )
    .into_bytes();
    header.extend_from_slice(name);
    while header.len() % 4 != 0 {
        header.push(0);
    }
    header.resize(512, 0);
    header
}
