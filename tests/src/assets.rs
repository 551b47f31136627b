//! The heavy inputs of a test host, found or made once and cached outside the
//! checkout: the Debian test-host kernel and its KVM modules, busybox, the
//! project's guest kernel and the static tvix-boot binary.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::error::{Error, Result, last_lines};

/// Debian metapackage that always depends on the current cloud kernel.
const TESTHOST_KERNEL_META: &str = "linux-image-cloud-amd64";

/// Modules the test host loads, in load order, with their path under
/// `lib/modules/<version>/kernel/`: /dev/kvm, dummy network interfaces (passt needs a
/// non-loopback interface with a default route, which a test host without a network card
/// lacks; see [`UPLINK_SETUP`]), and /dev/net/tun.
pub const TESTHOST_MODULES: &[(&str, &str)] = &[
    ("irqbypass", "virt/lib/irqbypass"),
    ("kvm", "arch/x86/kvm/kvm"),
    ("kvm-amd", "arch/x86/kvm/kvm-amd"),
    ("dummy", "drivers/net/dummy"),
    ("tun", "drivers/net/tun"),
];

/// Test-host shell lines that bring `lo` up and give the test host a dummy uplink with a
/// default route (TEST-NET-1 addresses, reaching nothing), so that passt, which
/// refuses to start without an external interface, can run there.
pub const UPLINK_SETUP: &str = "ip link set lo up
ip link add uplink0 type dummy
ip addr add 192.0.2.1/24 dev uplink0
ip link set uplink0 up
ip route add default via 192.0.2.254 dev uplink0
";

/// Where Debian's busybox-static puts its binary.
const BUSYBOX: &str = "/bin/busybox";

/// Cache root shared with boot/guest-kernel/build.sh:
/// `${TVIX_BOOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-boot}`.
pub fn cache_dir() -> PathBuf {
    fn env(name: &str) -> Option<PathBuf> {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    }
    if let Some(dir) = env("TVIX_BOOT_CACHE") {
        return dir;
    }
    let base = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| std::env::temp_dir().join("cache"));
    base.join("tvix-boot")
}

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The test host's kernel and the KVM modules that match it.
#[derive(Debug, Clone)]
pub struct TestHostKernel {
    pub version: String,
    pub vmlinuz: PathBuf,
    /// (module name, uncompressed .ko on the host), in load order.
    pub modules: Vec<(String, PathBuf)>,
}

impl TestHostKernel {
    /// Returns the cached test-host kernel, fetching it with apt on first use
    /// into `<cache>/testhost/<version>/`.
    ///
    /// A cached copy is used without asking apt anything, so reruns work
    /// offline and do not move to a newer kernel behind the tests' back; delete
    /// the cache directory to update.
    pub fn find_or_fetch() -> Result<TestHostKernel> {
        // Tests of one binary run on parallel threads; let one of them fetch
        // while the others wait for its result. (Separate processes are safe
        // too, just wasteful: each fetches into its own temporary directory.)
        static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = FETCH
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let root = cache_dir().join("testhost");
        if let Some(cached) = Self::cached(&root)? {
            return Ok(cached);
        }
        let package = resolve_kernel_package()?;
        let version = package
            .strip_prefix("linux-image-")
            .unwrap_or(&package)
            .to_owned();
        let dir = root.join(&version);
        fetch_kernel_package(&package, &version, &dir)?;
        let current = root.join("current");
        let tmp_link = root.join(format!("current.tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(&version, &tmp_link).map_err(Error::io(&tmp_link))?;
        std::fs::rename(&tmp_link, &current).map_err(Error::io(&current))?;
        Self::load(&dir, &version)
    }

    fn cached(root: &Path) -> Result<Option<TestHostKernel>> {
        let current = root.join("current");
        let Ok(version) = std::fs::read_link(&current) else {
            return Ok(None);
        };
        let version = version.to_string_lossy().into_owned();
        let dir = root.join(&version);
        if !is_complete(&dir) {
            return Ok(None);
        }
        Self::load(&dir, &version).map(Some)
    }

    fn load(dir: &Path, version: &str) -> Result<TestHostKernel> {
        let vmlinuz = dir.join("vmlinuz");
        if !vmlinuz.is_file() {
            return Err(missing("test-host kernel", &vmlinuz, ""));
        }
        let modules = TESTHOST_MODULES
            .iter()
            .map(|(name, _)| {
                let ko = dir.join(format!("{name}.ko"));
                if ko.is_file() {
                    Ok((name.to_string(), ko))
                } else {
                    Err(missing("test-host kernel module", &ko, ""))
                }
            })
            .collect::<Result<_>>()?;
        Ok(TestHostKernel {
            version: version.to_owned(),
            vmlinuz,
            modules,
        })
    }
}

/// `linux-image-cloud-amd64` is a metapackage; the kernel is in the package
/// it depends on, `linux-image-<version>-cloud-amd64`.
fn resolve_kernel_package() -> Result<String> {
    let query = || {
        run(Command::new("apt-cache").args(["depends", TESTHOST_KERNEL_META]))
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
                    l.trim()
                        .strip_prefix("Depends: ")
                        .filter(|p| p.starts_with("linux-image-"))
                        .map(str::to_owned)
                })
            })
    };
    if let Some(package) = query() {
        return Ok(package);
    }
    // A fresh machine may not have package lists yet.
    run(Command::new("apt-get").args(["update", "-q"]))?;
    query().ok_or_else(|| Error::BadOutput {
        command: format!("apt-cache depends {TESTHOST_KERNEL_META}"),
        detail: "no linux-image-* dependency".into(),
    })
}

/// Downloads and unpacks the kernel package, keeping only vmlinuz and the KVM
/// modules (the package unpacks to ~100 MB). Works in a temporary directory
/// and renames it into place, so a concurrent or interrupted fetch never
/// leaves a half-filled cache entry.
fn fetch_kernel_package(package: &str, version: &str, dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(parent)
        .map_err(Error::io(parent))?;
    let work_path = work.path();

    // apt-get download writes into the current directory.
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(work_path))?;
    let deb = std::fs::read_dir(work_path)
        .map_err(Error::io(work_path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension() == Some(OsStr::new("deb")))
        .ok_or_else(|| Error::BadOutput {
            command: format!("apt-get download {package}"),
            detail: format!("no .deb in {}", work_path.display()),
        })?;
    let unpacked = work_path.join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;

    let result = work_path.join("result");
    std::fs::create_dir(&result).map_err(Error::io(&result))?;
    let vmlinuz = unpacked.join(format!("boot/vmlinuz-{version}"));
    copy(&vmlinuz, &result.join("vmlinuz"))?;
    let module_dir = unpacked.join(format!("lib/modules/{version}/kernel"));
    for (name, rel) in TESTHOST_MODULES {
        let dest = result.join(format!("{name}.ko"));
        install_module(&module_dir, rel, &dest)?;
    }
    let complete = result.join(".complete");
    std::fs::write(&complete, format!("{package}\n")).map_err(Error::io(&complete))?;

    if is_complete(dir) {
        // Another process finished first; its copy is as good as ours.
        return Ok(());
    }
    // A leftover that is not complete is from an interrupted fetch, or from before a
    // module joined the list.
    let _ = std::fs::remove_dir_all(dir);
    match std::fs::rename(&result, dir) {
        Ok(()) => Ok(()),
        // Lost a race with another process that just renamed its copy in.
        Err(_) if is_complete(dir) => Ok(()),
        Err(e) => Err(Error::io(dir)(e)),
    }
}

/// Whether a fetched test-host kernel in `dir` is whole: marked complete, and with every
/// module of [`TESTHOST_MODULES`] (a cache from before a module joined the list is not).
fn is_complete(dir: &Path) -> bool {
    dir.join(".complete").exists()
        && TESTHOST_MODULES
            .iter()
            .all(|(name, _)| dir.join(format!("{name}.ko")).is_file())
}

/// Copies a module out of the package, uncompressing it: newer Debian kernels
/// ship .ko.xz or .ko.zst, and busybox insmod loads only plain .ko files.
fn install_module(module_dir: &Path, rel: &str, dest: &Path) -> Result<()> {
    let plain = module_dir.join(format!("{rel}.ko"));
    if plain.is_file() {
        return copy(&plain, dest);
    }
    for (ext, tool) in [("xz", "xz"), ("zst", "zstd")] {
        let packed = module_dir.join(format!("{rel}.ko.{ext}"));
        if packed.is_file() {
            let out = run(Command::new(tool).arg("-dc").arg(&packed))?;
            return std::fs::write(dest, out.stdout).map_err(Error::io(dest));
        }
    }
    Err(missing(
        "test-host kernel module",
        &plain,
        "; the kernel package has no such module (.ko, .ko.xz or .ko.zst)",
    ))
}

/// Debian's static busybox, for the test host's and guests' shells.
pub fn busybox() -> Result<PathBuf> {
    let path = PathBuf::from(BUSYBOX);
    if path.is_file() {
        Ok(path)
    } else {
        Err(missing(
            "busybox",
            &path,
            "; apt-get install busybox-static",
        ))
    }
}

/// The project's guest kernel (stripped ELF vmlinux), built by
/// boot/guest-kernel/build.sh on first use (minutes) and cached by it.
pub fn guest_kernel() -> Result<PathBuf> {
    let script = workspace_root().join("boot/guest-kernel/build.sh");
    if !script.is_file() {
        return Err(missing("guest kernel build script", &script, ""));
    }
    let out = run(Command::new("bash").arg(&script))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| Error::BadOutput {
            command: script.display().to_string(),
            detail: "expected the vmlinux path as the last line".into(),
        })?;
    if !path.is_file() {
        return Err(missing("guest kernel (from build.sh)", &path, ""));
    }
    Ok(path)
}

/// Where `cargo build --release --target x86_64-unknown-linux-gnu` puts
/// tvix-boot.
pub fn tvix_boot_static_path() -> PathBuf {
    static_path("tvix-boot")
}

fn static_path(bin: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("x86_64-unknown-linux-gnu/release").join(bin)
}

/// Builds tvix-boot as a static binary (the test host has no libc) and
/// returns its path.
pub fn build_tvix_boot_static() -> Result<PathBuf> {
    build_static("tvix-boot", "tvix-boot")
}

/// Builds `bin` of `package` as a static binary and returns its path.
fn build_static(package: &str, bin: &str) -> Result<PathBuf> {
    build_static_target(package, "--bin", bin, bin)
}

/// Builds target `name` (`kind`: `--bin` or `--example`) of `package` as a static binary
/// and returns its path, `output` under the target directory's release folder.
///
/// An explicit `--target` keeps the static RUSTFLAGS away from build scripts
/// and proc macros, and keeps these artifacts apart from the normal ones, so
/// neither build invalidates the other.
///
/// This is a second release build of every dependency, which no other step needs. Its
/// intermediate artifacts are kept in the cache (`static-build`, cargo's build
/// directory), like the kernels, so a fresh clone builds only the project's own crates
/// again; the binaries still land in this checkout's target directory.
fn build_static_target(package: &str, kind: &str, name: &str, output: &str) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    if std::env::var_os("CARGO_BUILD_BUILD_DIR").is_none() {
        cmd.env("CARGO_BUILD_BUILD_DIR", cache_dir().join("static-build"));
    }
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "--release",
            "-p",
            package,
            kind,
            name,
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Every test-host run copies the binary into its initrd: keep it lean.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols");
    run(&mut cmd)?;
    let path = static_path(output);
    check_static(&path)?;
    Ok(path)
}

/// Builds example `name` of the tvix-boot library (boot/examples) as a static binary,
/// for the test host, and returns its path.
pub fn build_static_example(name: &str) -> Result<PathBuf> {
    build_static_target("tvix-boot", "--example", name, &format!("examples/{name}"))
}

/// `pty-session` (tests/src/bin), static for the test host: it drives interactive
/// programs on a pseudo-terminal there. Built once per test process.
pub fn pty_session_static_once() -> std::result::Result<PathBuf, String> {
    static BIN: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    BIN.get_or_init(|| build_static("tvix-boot-tests", "pty-session").map_err(|e| e.to_string()))
        .clone()
}

/// `open-many` (tests/src/bin), static: a guest program that holds many files open and
/// walks a tree, for the bounded-resources test. Built once per test process.
pub fn open_many_static_once() -> std::result::Result<PathBuf, String> {
    static BIN: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    BIN.get_or_init(|| build_static("tvix-boot-tests", "open-many").map_err(|e| e.to_string()))
        .clone()
}

/// `net-probe` (tests/src/bin), static: TCP throughput and connect time, measured by the
/// same program in every guest and in the test host. Built once per process.
pub fn net_probe_static_once() -> std::result::Result<PathBuf, String> {
    static BIN: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    BIN.get_or_init(|| build_static("tvix-boot-tests", "net-probe").map_err(|e| e.to_string()))
        .clone()
}

/// `lying-store` (tests/src/bin, see [`crate::lying_store`]), static: a store server that
/// lies about one store path, for the test host. Built once per test process.
pub fn lying_store_static_once() -> std::result::Result<PathBuf, String> {
    static BIN: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    BIN.get_or_init(|| build_static("tvix-boot-tests", "lying-store").map_err(|e| e.to_string()))
        .clone()
}

/// The static tvix-boot binary for the test host: `$TVIX_BOOT_BIN` when set
/// (checked to be static), otherwise [`build_tvix_boot_static`].
pub fn tvix_boot_static() -> Result<PathBuf> {
    match std::env::var_os("TVIX_BOOT_BIN").filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            if !path.is_file() {
                return Err(missing("tvix-boot binary ($TVIX_BOOT_BIN)", &path, ""));
            }
            check_static(&path)?;
            Ok(path)
        }
        None => build_tvix_boot_static(),
    }
}

/// [`tvix_boot_static`], resolved once per test process: tests running in parallel share
/// one build instead of queueing on cargo's lock.
pub fn tvix_boot_static_once() -> std::result::Result<PathBuf, String> {
    static BIN: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    BIN.get_or_init(|| tvix_boot_static().map_err(|e| e.to_string()))
        .clone()
}

/// Fails unless `path` is an ELF file without a program interpreter
/// (PT_INTERP), i.e. one the test host can run without a dynamic loader.
///
/// Hand-parsed: it reads three header fields, not worth an ELF crate.
pub fn check_static(path: &Path) -> Result<()> {
    const PT_INTERP: u32 = 3;
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    let not_elf = || Error::BadOutput {
        command: path.display().to_string(),
        detail: "not a 64-bit little-endian ELF file".into(),
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err(not_elf());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().map_err(|_| not_elf())?) as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(header) = bytes.get(at..at + 4) else {
            return Err(not_elf());
        };
        let p_type = u32::from_le_bytes(header.try_into().map_err(|_| not_elf())?);
        if p_type == PT_INTERP {
            return Err(Error::NotStatic {
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if !from.is_file() {
        return Err(missing("file", from, ""));
    }
    std::fs::copy(from, to).map_err(Error::io(from))?;
    Ok(())
}

fn missing(what: &'static str, path: &Path, hint: &str) -> Error {
    Error::Missing {
        what,
        path: path.to_owned(),
        hint: hint.to_owned(),
    }
}

/// Runs a command to completion, capturing its output; a non-zero exit is an
/// error carrying the tail of stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let command = format!(
        "{} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().map_err(|source| Error::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::CommandFailed {
            command,
            status: out.status,
            output: last_lines(&String::from_utf8_lossy(&out.stderr), 40),
        });
    }
    Ok(out)
}
