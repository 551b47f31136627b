//! Runs a shell script inside the QEMU TCG test host, the way the end-to-end tests do:
//! for machines whose /dev/kvm cannot boot Linux (see docs/ARCHITECTURE.md). In the test host,
//! `tvix-boot` (static, built if needed) is on PATH, TVIX_BOOT_KERNEL names the guest
//! kernel and the embedded store lives under /tmp/data.
//!
//!     in-test-host [--memory MIB] [--cpus N] [--file HOST_PATH=GUEST_PATH]... SCRIPT
//!
//! Prints what the script printed and exits with its exit status.

use std::process::ExitCode;
use std::time::Duration;

use tvix_boot_tests::{GUEST_KERNEL, GuestFile, TestHost, assets};

const USAGE: &str =
    "usage: in-test-host [--memory MIB] [--cpus N] [--file HOST_PATH=GUEST_PATH]... SCRIPT";
/// The demo boots a VM or two; anything slower than this is stuck.
const TIMEOUT: Duration = Duration::from_secs(900);

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("in-test-host: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let mut files = Vec::new();
    let mut script = None;
    let mut memory_mib = None;
    let mut cpus = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--file" => {
                let spec = args.next().ok_or(USAGE)?;
                let (host, guest) = spec
                    .split_once('=')
                    .ok_or_else(|| format!("--file {spec:?}: expected HOST_PATH=GUEST_PATH"))?;
                let mode = std::fs::metadata(host)
                    .map_err(|e| format!("--file {host}: {e}"))?
                    .permissions();
                files.push(GuestFile::host(
                    guest,
                    host,
                    std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                ));
            }
            "--memory" => {
                let mib = args.next().ok_or(USAGE)?;
                memory_mib = Some(
                    mib.parse::<u32>()
                        .map_err(|e| format!("--memory {mib:?}: {e}"))?,
                );
            }
            "--cpus" => {
                let n = args.next().ok_or(USAGE)?;
                cpus = Some(n.parse::<u32>().map_err(|e| format!("--cpus {n:?}: {e}"))?);
            }
            _ if script.is_none() && !arg.starts_with("--") => script = Some(arg),
            _ => return Err(USAGE.into()),
        }
    }
    let script = script.ok_or(USAGE)?;

    eprintln!("in-test-host: building the static tvix-boot and starting the test host...");
    let tvix_boot = assets::tvix_boot_static().map_err(|e| e.to_string())?;
    let mut builder = TestHost::builder().tvix_boot(tvix_boot);
    if let Some(mib) = memory_mib {
        builder = builder.memory_mib(mib);
    }
    if let Some(cpus) = cpus {
        builder = builder.cpus(cpus);
    }
    let host = builder
        .build()
        .map_err(|e| format!("cannot prepare the test host: {e}"))?;
    let script =
        format!("export TVIX_BOOT_KERNEL={GUEST_KERNEL} XDG_DATA_HOME=/tmp/data\n{script}\n");
    let out = host
        .run(&script, &files, TIMEOUT)
        .map_err(|e| format!("test host run failed: {e}"))?;
    print!("{}", out.script_output());
    if out.timed_out {
        return Err(format!(
            "the test host did not finish within {TIMEOUT:?}:\n{out}"
        ));
    }
    eprintln!("in-test-host: the test host ran for {:.1?}", out.elapsed);
    match out.exit_code {
        Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        None => Err(format!("the script's exit status was not reported:\n{out}")),
    }
}
