//! The QEMU TCG "test host": a Linux booted under QEMU's software CPU with
//! nested SVM, which gives it a real /dev/kvm (the build machines' own
//! /dev/kvm is PVM and cannot run a Linux guest; see
//! docs/ARCHITECTURE.md). Each run boots a fresh test host from an
//! initramfs holding busybox, the KVM modules, the guest kernel, tvix-boot and
//! the test's files, runs one shell script as its /init's job, and reads the
//! script's exit code back from the serial console.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::assets::{self, TestHostKernel};
use crate::error::{Error, Result};
use crate::initramfs::Initramfs;
use crate::qemu;

/// Where the guest kernel (stripped ELF vmlinux) is inside the test host.
pub const GUEST_KERNEL: &str = "/guest/vmlinux";
/// Where the tvix-boot binary is inside the test host (when one was given).
pub const TVIX_BOOT: &str = "/bin/tvix-boot";
/// Where the KVM modules are inside the test host.
const MODULE_DIR: &str = "/lib/testhost";
/// The test's script inside the test host.
const SCRIPT: &str = "/testhost/script.sh";
/// Prefix of the line /init prints with the script's exit code.
pub const EXIT_MARKER: &str = "TESTHOST-EXIT";

/// A file to put into the test host's initramfs.
#[derive(Debug, Clone)]
pub struct GuestFile {
    /// Absolute path inside the test host.
    pub path: String,
    pub contents: FileContents,
    /// Permission bits, e.g. 0o644 or 0o755.
    pub mode: u32,
}

#[derive(Debug, Clone)]
pub enum FileContents {
    Bytes(Vec<u8>),
    Host(PathBuf),
}

impl GuestFile {
    pub fn bytes(path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        GuestFile {
            path: path.to_owned(),
            contents: FileContents::Bytes(contents.into()),
            mode,
        }
    }

    pub fn host(path: &str, host: impl Into<PathBuf>, mode: u32) -> Self {
        GuestFile {
            path: path.to_owned(),
            contents: FileContents::Host(host.into()),
            mode,
        }
    }

    /// Every regular file under the host directory `dir`, at the same place under
    /// `guest_dir`, mode 0644 (symlinks and empty directories do not occur in the stores
    /// and caches the tests copy in, and are not carried).
    pub fn host_tree(dir: &Path, guest_dir: &str) -> Result<Vec<GuestFile>> {
        let mut files = Vec::new();
        let mut pending = vec![(dir.to_owned(), guest_dir.to_owned())];
        while let Some((dir, guest_dir)) = pending.pop() {
            let read_err = |source| Error::Io {
                path: dir.clone(),
                source,
            };
            for entry in std::fs::read_dir(&dir).map_err(read_err)? {
                let entry = entry.map_err(read_err)?;
                let guest = format!("{guest_dir}/{}", entry.file_name().to_string_lossy());
                if entry.file_type().map_err(read_err)?.is_dir() {
                    pending.push((entry.path(), guest));
                } else {
                    files.push(GuestFile::host(&guest, entry.path(), 0o644));
                }
            }
        }
        Ok(files)
    }
}

/// What one test-host run produced (or one case of a shared run, see [`crate::suite`]).
#[derive(Debug, Clone)]
pub struct TestHostOutput {
    /// What ran: "test host", or the case and its suite.
    pub label: String,
    /// Everything the test host wrote to its serial console, `\r` removed (for a case of
    /// a suite: what it wrote while that case ran).
    pub serial: String,
    /// The script's exit code, if /init got to report it.
    pub exit_code: Option<i32>,
    /// The run was killed at its deadline.
    pub timed_out: bool,
    /// Wall time from starting QEMU to its exit (or the kill); for a case, its own time
    /// in the test host.
    pub elapsed: Duration,
    /// Where the time went; see [`Timings`].
    pub timings: Timings,
}

/// Where a test-host run's time went, for choosing what to share and what to move out of
/// the test host. Uptimes are the test host's own clock (kernel start = 0), so "booted"
/// covers the kernel's boot, unpacking the initramfs and loading the KVM modules.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Size of the initramfs, in bytes.
    pub initramfs_bytes: u64,
    /// Host time to build and write the initramfs.
    pub initramfs_build: Duration,
    /// Test-host uptime when /init started the script, in seconds.
    pub script_start_uptime: Option<f64>,
    /// Test-host uptime when the script ended, in seconds.
    pub script_end_uptime: Option<f64>,
}

impl Timings {
    /// Seconds the script ran, by the test host's clock.
    pub fn script_seconds(&self) -> Option<f64> {
        Some(self.script_end_uptime? - self.script_start_uptime?)
    }
}

impl std::fmt::Display for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "initramfs {:.1} MB built in {:.2} s",
            self.initramfs_bytes as f64 / 1e6,
            self.initramfs_build.as_secs_f64()
        )?;
        if let Some(up) = self.script_start_uptime {
            write!(f, ", booted to the script at uptime {up:.1} s")?;
        }
        if let Some(script) = self.script_seconds() {
            write!(f, ", script {script:.1} s")?;
        }
        Ok(())
    }
}

impl TestHostOutput {
    /// True when the script ran to the end and exited 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }

    /// The serial output between the first `begin` marker and the next `end` marker
    /// after it, for scripts that bracket each step's output with echoed markers.
    pub fn between(&self, begin: &str, end: &str) -> Option<&str> {
        let start = self.serial.find(begin)? + begin.len();
        let len = self.serial[start..].find(end)?;
        Some(&self.serial[start..start + len])
    }

    /// The serial output without the kernel's and /init's own lines: just
    /// what the script printed, as far as it can be told apart.
    pub fn script_output(&self) -> &str {
        // The marker's line also carries the uptime; the script's output starts after it.
        let start = self
            .serial
            .find(SCRIPT_START)
            .map(|i| {
                self.serial[i..]
                    .find('\n')
                    .map_or(self.serial.len(), |n| i + n + 1)
            })
            .unwrap_or(0);
        let rest = &self.serial[start..];
        let end = rest.find(EXIT_MARKER).unwrap_or(rest.len());
        &rest[..end]
    }
}

impl std::fmt::Display for TestHostOutput {
    /// A summary plus the serial log, for assertion messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: exit_code={:?} timed_out={} after {:.1?} ({}); serial:",
            self.label, self.exit_code, self.timed_out, self.elapsed, self.timings
        )?;
        f.write_str(&self.serial)
    }
}

/// Printed by /init right before it runs the script, with the uptime.
const SCRIPT_START: &str = "TESTHOST-SCRIPT-START";
/// Printed by /init when the script has ended, with the nonce and the uptime.
const SCRIPT_END: &str = "TESTHOST-SCRIPT-END";

/// A prepared test host: everything except the per-run initramfs, which is
/// rebuilt (cheaply, in memory) for every [`TestHost::run`].
#[derive(Debug, Clone)]
pub struct TestHost {
    qemu: PathBuf,
    kernel: TestHostKernel,
    busybox: PathBuf,
    guest_kernel: Option<PathBuf>,
    tvix_boot: Option<PathBuf>,
    cpus: u32,
    memory_mib: u32,
}

/// Options for [`TestHost::builder`].
#[derive(Debug, Clone)]
pub struct TestHostBuilder {
    guest_kernel: GuestKernel,
    tvix_boot: Option<PathBuf>,
    cpus: u32,
    memory_mib: u32,
}

#[derive(Debug, Clone)]
enum GuestKernel {
    Build,
    Path(PathBuf),
    None,
}

impl Default for TestHostBuilder {
    fn default() -> Self {
        TestHostBuilder {
            guest_kernel: GuestKernel::Build,
            tvix_boot: std::env::var_os("TVIX_BOOT_BIN").map(PathBuf::from),
            cpus: 1,
            memory_mib: 1024,
        }
    }
}

impl TestHostBuilder {
    /// Use this guest kernel instead of building boot/guest-kernel.
    pub fn guest_kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.guest_kernel = GuestKernel::Path(path.into());
        self
    }

    /// Put no guest kernel into the test host (for tests of the harness
    /// itself, which should not wait minutes for a kernel build).
    pub fn without_guest_kernel(mut self) -> Self {
        self.guest_kernel = GuestKernel::None;
        self
    }

    /// The tvix-boot binary to put at [`TVIX_BOOT`]; it must be static (see
    /// [`assets::build_tvix_boot_static`]). Defaults to `$TVIX_BOOT_BIN`.
    pub fn tvix_boot(mut self, path: impl Into<PathBuf>) -> Self {
        self.tvix_boot = Some(path.into());
        self
    }

    /// The test host's vCPUs (QEMU -smp). Under TCG each is a host thread;
    /// the build machines have 2 cores.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    /// The test host's memory (QEMU -m), in MiB. Must hold the initramfs
    /// twice (archive + unpacked) plus the guest's memory.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// tvix-boot built static once per test process ([`assets::tvix_boot_static_once`],
    /// or `$TVIX_BOOT_BIN`); panics with the reason when it cannot be had.
    pub fn with_static_tvix_boot(self) -> Self {
        let path = assets::tvix_boot_static_once()
            .unwrap_or_else(|e| panic!("cannot get the static tvix-boot: {e}"));
        self.tvix_boot(path)
    }

    /// For tests: builds the test host, runs `script` in it with `files`, prints what it
    /// printed, and panics if it could not be run or ran past `timeout`.
    pub fn run_checked(
        self,
        script: &str,
        files: &[GuestFile],
        timeout: Duration,
    ) -> TestHostOutput {
        let out = self
            .build()
            .unwrap_or_else(|e| panic!("cannot prepare the test host: {e}"))
            .run(script, files, timeout)
            .unwrap_or_else(|e| panic!("test host run failed: {e}"));
        eprintln!("{out}");
        assert!(!out.timed_out, "timed out: {out}");
        out
    }

    /// Builds the test host as configured.
    pub fn build(self) -> Result<TestHost> {
        let qemu = qemu::find_qemu()?;
        let kernel = TestHostKernel::find_or_fetch()?;
        let busybox = assets::busybox()?;
        let guest_kernel = match self.guest_kernel {
            GuestKernel::Build => Some(assets::guest_kernel()?),
            GuestKernel::Path(p) => Some(existing("guest kernel", p)?),
            GuestKernel::None => None,
        };
        let tvix_boot = match self.tvix_boot {
            Some(p) => {
                let p = existing("tvix-boot binary", p)?;
                assets::check_static(&p)?;
                Some(p)
            }
            None => None,
        };
        Ok(TestHost {
            qemu,
            kernel,
            busybox,
            guest_kernel,
            tvix_boot,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
        })
    }
}

impl TestHost {
    /// A test host with the guest kernel from boot/guest-kernel/build.sh, 1 vCPU
    /// and 1 GiB, and tvix-boot from `$TVIX_BOOT_BIN` if that is set.
    pub fn new() -> Result<TestHost> {
        Self::builder().build()
    }

    pub fn builder() -> TestHostBuilder {
        TestHostBuilder::default()
    }

    /// The Debian kernel version the test host runs.
    pub fn kernel_version(&self) -> &str {
        &self.kernel.version
    }

    /// The guest kernel on the host side, if one is included.
    pub fn guest_kernel(&self) -> Option<&Path> {
        self.guest_kernel.as_deref()
    }

    /// Boots the test host, runs `script` (busybox sh) in it with `files`
    /// added to its file system, and returns its serial output and exit code.
    /// QEMU is killed at `timeout`; the result then has `timed_out` set.
    ///
    /// Inside, /dev/kvm is ready, busybox applets are on PATH, the guest
    /// kernel is at [`GUEST_KERNEL`] and tvix-boot at [`TVIX_BOOT`].
    pub fn run(
        &self,
        script: &str,
        files: &[GuestFile],
        timeout: Duration,
    ) -> Result<TestHostOutput> {
        let nonce = nonce();
        let workdir = tempfile::Builder::new()
            .prefix("tvix-boot-testhost-")
            .tempdir()
            .map_err(Error::io(std::env::temp_dir()))?;
        let initrd = workdir.path().join("initrd.cpio");
        let started = std::time::Instant::now();
        let archive = self.initramfs(script, files, &nonce)?;
        let initramfs_bytes = archive.len() as u64;
        std::fs::write(&initrd, archive).map_err(Error::io(&initrd))?;
        let initramfs_build = started.elapsed();
        let mut out = self.boot(&initrd, &nonce, timeout)?;
        out.timings.initramfs_bytes = initramfs_bytes;
        out.timings.initramfs_build = initramfs_build;
        Ok(out)
    }

    /// Runs tvix-boot in the test host with the guest kernel
    /// (`--kernel /guest/vmlinux` unless `args` has its own `--kernel`),
    /// `args` and `env`; the result's exit code is tvix-boot's.
    pub fn run_tvix_boot(
        &self,
        args: &[&str],
        env: &[(&str, &str)],
        files: &[GuestFile],
        timeout: Duration,
    ) -> Result<TestHostOutput> {
        if self.tvix_boot.is_none() {
            return Err(Error::Missing {
                what: "tvix-boot binary",
                path: TVIX_BOOT.into(),
                hint: "; pass one with TestHost::builder().tvix_boot(..) or $TVIX_BOOT_BIN \
                       (assets::build_tvix_boot_static builds it)"
                    .into(),
            });
        }
        self.run(&tvix_boot_command(args, env), files, timeout)
    }

    fn initramfs(&self, script: &str, files: &[GuestFile], nonce: &str) -> Result<Vec<u8>> {
        let mut fs = Initramfs::new();
        fs.busybox(&self.busybox)?;
        for (name, ko) in &self.kernel.modules {
            fs.host_file(&format!("{MODULE_DIR}/{name}.ko"), 0o644, ko)?;
        }
        if let Some(kernel) = &self.guest_kernel {
            fs.host_file(GUEST_KERNEL, 0o644, kernel)?;
        }
        if let Some(bin) = &self.tvix_boot {
            fs.host_file(TVIX_BOOT, 0o755, bin)?;
        }
        // The test's files go after ours so a test may replace any of them.
        for file in files {
            match &file.contents {
                FileContents::Bytes(bytes) => fs.file(&file.path, file.mode, bytes)?,
                FileContents::Host(path) => fs.host_file(&file.path, file.mode, path)?,
            };
        }
        fs.file(SCRIPT, 0o755, script.as_bytes())?;
        fs.file("/init", 0o755, self.init_script(nonce).as_bytes())?;
        Ok(fs.finish())
    }

    /// The test host's /init. It must always end in `reboot -f` (QEMU runs
    /// with -no-reboot, so that is how the run ends); setup failures are
    /// reported with exit code 125 rather than by hanging.
    fn init_script(&self, nonce: &str) -> String {
        let modules: Vec<&str> = self
            .kernel
            .modules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        format!(
            r#"#!/bin/busybox sh
# The initramfs is rootfs, where pivot_root(2) is refused, and passt sandboxes itself
# with pivot_root: move everything to a tmpfs and switch_root into it first. Moved, not
# copied, so that the store and tools in the initramfs are not held twice.
if [ ! -e /.testhost-root ]; then
    /bin/busybox mkdir -p /.newroot
    /bin/busybox mount -t tmpfs -o mode=0755 tmpfs /.newroot
    for entry in /*; do
        case "$entry" in
            # switch_root checks that the old root still has /init, and runs on /bin.
            /bin|/init) /bin/busybox cp -a "$entry" /.newroot/ ;;
            *) /bin/busybox mv "$entry" /.newroot/ ;;
        esac
    done
    : > /.newroot/.testhost-root
    exec /bin/busybox switch_root /.newroot /init
fi
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
finish() {{
    read up _ < /proc/uptime
    echo "{SCRIPT_END}-{nonce} $up"
    echo "{EXIT_MARKER}-{nonce}=$1"
    sync
    reboot -f
    sleep 5
}}
for m in {modules}; do
    insmod {MODULE_DIR}/$m.ko || {{ echo "testhost: insmod $m failed"; finish 125; }}
done
[ -c /dev/kvm ] || {{ echo "testhost: /dev/kvm missing after loading KVM modules"; finish 125; }}
read up _ < /proc/uptime
echo "{SCRIPT_START} $up"
cd /root
sh {SCRIPT} </dev/console
finish $?
"#,
            modules = modules.join(" "),
        )
    }

    fn boot(&self, initrd: &Path, nonce: &str, timeout: Duration) -> Result<TestHostOutput> {
        let mut args: Vec<OsString> = [
            "-M",
            "q35",
            "-cpu",
            "max,+svm",
            // No default NIC, VGA, etc.: nothing the tests use, all boot time.
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-append",
            "console=ttyS0 panic=-1 reboot=k quiet",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.extend(["-smp".into(), self.cpus.to_string().into()]);
        args.extend(["-m".into(), self.memory_mib.to_string().into()]);
        args.extend(["-kernel".into(), self.kernel.vmlinuz.clone().into()]);
        args.extend(["-initrd".into(), initrd.as_os_str().to_owned()]);
        let out = qemu::run_qemu(args, timeout)?;
        let exit_code = parse_exit(&out.serial, nonce);
        // QEMU itself failing (bad option, missing file) is a harness error,
        // not a test result; a clean or killed exit is a result.
        if !out.timed_out && exit_code.is_none() && !out.status.success() {
            return Err(Error::CommandFailed {
                command: format!("{} (test host)", self.qemu.display()),
                status: out.status,
                output: format!("{}\n{}", out.stderr, out.serial),
            });
        }
        let timings = Timings {
            script_start_uptime: marker_value(&out.serial, SCRIPT_START),
            script_end_uptime: marker_value(&out.serial, &format!("{SCRIPT_END}-{nonce}")),
            ..Timings::default()
        };
        Ok(TestHostOutput {
            label: "test host".into(),
            serial: out.serial,
            exit_code,
            timed_out: out.timed_out,
            elapsed: out.elapsed,
            timings,
        })
    }
}

/// The exit code from /init's marker line. The nonce keeps a script that
/// prints something marker-like from faking a result.
fn parse_exit(serial: &str, nonce: &str) -> Option<i32> {
    let marker = format!("{EXIT_MARKER}-{nonce}=");
    serial.lines().rev().find_map(|line| {
        let at = line.find(&marker)?;
        line[at + marker.len()..].trim().parse().ok()
    })
}

/// The number after the first line that starts with `marker` and a space.
pub(crate) fn marker_value(serial: &str, marker: &str) -> Option<f64> {
    serial.lines().find_map(|line| {
        line.trim()
            .strip_prefix(marker)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Unique enough per run: time and process id and a per-process counter.
pub(crate) fn nonce() -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}{n:x}", std::process::id(), nanos)
}

/// The shell line that runs tvix-boot in the test host with the guest kernel
/// (`--kernel /guest/vmlinux` unless `args` has its own `--kernel`), `args` and `env`, as
/// [`TestHost::run_tvix_boot`] does; for cases of a [`crate::Suite`].
pub fn tvix_boot_command(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut line = String::new();
    for (key, value) in env {
        line.push_str(&format!("{key}={} ", shell_quote(value)));
    }
    line.push_str(TVIX_BOOT);
    if !args.contains(&"--kernel") {
        line.push_str(&format!(" --kernel {GUEST_KERNEL}"));
    }
    for arg in args {
        line.push(' ');
        line.push_str(&shell_quote(arg));
    }
    line.push('\n');
    line
}

/// Quotes a word for busybox sh.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn existing(what: &'static str, path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::Missing {
            what,
            path,
            hint: String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_marker_needs_the_nonce() {
        let serial = "TESTHOST-EXIT-fake=0\nhello\nTESTHOST-EXIT-abc=3\n";
        assert_eq!(parse_exit(serial, "abc"), Some(3));
        assert_eq!(parse_exit(serial, "zzz"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--cpus=2"), "--cpus=2");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
