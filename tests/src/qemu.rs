//! Running QEMU with a hard deadline and its serial console captured.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::GuestFile;
use crate::error::{Error, Result};

/// What one QEMU run produced.
#[derive(Debug, Clone)]
pub struct QemuOutput {
    /// The serial console (QEMU's stdout), `\r` removed.
    pub serial: String,
    /// QEMU's own stderr.
    pub stderr: String,
    /// QEMU's exit status (after the kill, when it timed out).
    pub status: ExitStatus,
    /// QEMU was killed at the deadline.
    pub timed_out: bool,
    /// Wall time from spawn to exit (or kill).
    pub elapsed: Duration,
}

/// Finds qemu-system-x86_64 on PATH. Its absence is an error, loudly: tests
/// that need it must fail, not pass by doing nothing.
pub fn find_qemu() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or(Error::QemuMissing)
}

/// Runs qemu-system-x86_64 with `args`, the serial console on stdout
/// (`-serial stdio` must be among the args, or something equivalent), no
/// stdin, and kills it at `timeout`.
///
/// Always uses TCG: the build machines' /dev/kvm is PVM, which cannot run the
/// guests these tests boot.
pub fn run_qemu<I, S>(args: I, timeout: Duration) -> Result<QemuOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let qemu = find_qemu()?;
    let mut cmd = Command::new(&qemu);
    cmd.args(["-accel", "tcg"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = qemu.display().to_string();
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;

    // Drain both pipes on threads so QEMU never blocks on a full pipe.
    let serial = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        child
            .stdout
            .take()
            .map(|out| drain(out, Arc::clone(&serial))),
        child
            .stderr
            .take()
            .map(|err| drain(err, Arc::clone(&stderr))),
    ];

    let deadline = started + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                // Kill and reap: a test must never leave QEMU behind.
                let _ = child.kill();
                break child.wait().map_err(|source| Error::Spawn {
                    command: command.clone(),
                    source,
                })?;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Spawn { command, source });
            }
        }
    };
    let elapsed = started.elapsed();
    for handle in readers.into_iter().flatten() {
        let _ = handle.join();
    }
    Ok(QemuOutput {
        serial: String::from_utf8_lossy(&take(&serial)).replace('\r', ""),
        stderr: String::from_utf8_lossy(&take(&stderr)).into_owned(),
        status,
        timed_out,
        elapsed,
    })
}

fn drain(
    mut source: impl Read + Send + 'static,
    sink: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => match sink.lock() {
                    Ok(mut sink) => sink.extend_from_slice(&buf[..n]),
                    Err(poisoned) => poisoned.into_inner().extend_from_slice(&buf[..n]),
                },
            }
        }
    })
}

fn take(buf: &Mutex<Vec<u8>>) -> Vec<u8> {
    match buf.lock() {
        Ok(mut b) => std::mem::take(&mut *b),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    }
}

/// A dynamically linked host program and the shared libraries `ldd` lists for it, as
/// test-host files at the same paths: how QEMU and virtiofsd run inside the test host.
pub fn binary_with_libraries(binary: &Path) -> Result<Vec<GuestFile>> {
    let path = binary.to_str().ok_or_else(|| Error::BadOutput {
        command: format!("ldd {}", binary.display()),
        detail: "the path is not UTF-8".into(),
    })?;
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| Error::Spawn {
            command: format!("ldd {path}"),
            source,
        })?;
    if !output.status.success() {
        return Err(Error::CommandFailed {
            command: format!("ldd {path}"),
            status: output.status,
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    let mut files = vec![GuestFile::host(path, binary, 0o755)];
    // Lines look like "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or
    // "/lib64/ld-linux-x86-64.so.2 (0x...)".
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(library) = line.split_whitespace().find(|word| word.starts_with('/')) {
            files.push(GuestFile::host(library, library, 0o755));
        }
    }
    Ok(files)
}

/// The firmware QEMU's microvm machine loads.
pub const MICROVM_BIOS: &str = "/usr/share/qemu/bios-microvm.bin";
/// The option ROMs QEMU loads `-kernel` with: over DMA (fast) or, when that one is
/// missing, over port I/O, byte by byte; then QEMU only warns "Could not open option
/// rom 'linuxboot_dma.bin'", and a boot-time comparison would be unfair to QEMU.
pub const KERNEL_LOADER_ROMS: &[&str] = &[
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/linuxboot.bin",
    "/usr/share/qemu/pvh.bin",
];

/// qemu-system-x86_64 (from PATH), its libraries, the microvm firmware and the kernel
/// loader ROMs, for running QEMU microvm with KVM inside the test host.
pub fn microvm_files() -> Result<Vec<GuestFile>> {
    let qemu = find_qemu()?;
    let mut files = binary_with_libraries(&qemu)?;
    // Inside the test host QEMU is run by this name.
    files[0] = GuestFile::host("/usr/bin/qemu-system-x86_64", &qemu, 0o755);
    for firmware in std::iter::once(&MICROVM_BIOS).chain(KERNEL_LOADER_ROMS) {
        if !Path::new(firmware).is_file() {
            return Err(Error::Missing {
                what: "QEMU firmware",
                path: firmware.into(),
                hint: "; apt-get install qemu-system-x86".into(),
            });
        }
        files.push(GuestFile::host(firmware, firmware, 0o644));
    }
    Ok(files)
}

/// virtiofsd, the reference vhost-user-fs backend: $VIRTIOFSD, else where `cargo install
/// virtiofsd` or Debian put it.
pub fn virtiofsd() -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = std::env::var_os("VIRTIOFSD")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd")))
        .chain([
            PathBuf::from("/usr/libexec/virtiofsd"),
            PathBuf::from("/usr/bin/virtiofsd"),
        ])
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| Error::Missing {
            what: "virtiofsd",
            path: candidates[0].clone(),
            hint: "; apt-get install libseccomp-dev libcap-ng-dev && cargo install virtiofsd \
                   (or set VIRTIOFSD)"
                .into(),
        })
}
