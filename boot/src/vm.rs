//! Booting a VM from the command line: a thin layer over the vmm crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use tvix_boot_devices::virtio::VirtioDevice;
use tvix_boot_init::protocol::{Mode, STATUS_INIT_FAILED};
use tvix_boot_store::{Store, StoreError};
use tvix_boot_virtiofs::{StoreFs, StoreFsOptions, VirtioFs};
use tvix_boot_vmm::{Console, Initrd, Vm, VmConfig, VmError, VmExit};

use crate::initrd::{self, HOST_BUSYBOX};
use crate::mode::{self, ModeArgs};
use crate::store_cmd::StoreAddrArgs;

/// The virtio-fs tag the guest mounts at /nix/store.
const STORE_TAG: &str = "tvix";

/// Arguments every guest gets; `--cmdline` / CH_CMDLINE are appended (later arguments
/// win in Linux, so they can override these: `loglevel=7` brings the boot log back).
///
/// `quiet` because every console byte is an I/O exit: under nested virtualization the
/// kernel's boot log alone more than doubled the time to the guest's init. Panic and
/// halt messages are printed at emergency level and still appear.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Exit status when the guest kernel panicked (VMM errors exit with 1).
const GUEST_PANIC_STATUS: u8 = 2;

/// Flags that describe the VM to boot.
#[derive(clap::Args)]
pub struct VmArgs {
    /// Guest kernel, vmlinux (ELF) or bzImage. Default: the kernel built by
    /// boot/kernel/build.sh ($XDG_CACHE_HOME/tvix-boot/kernel/current/vmlinux).
    #[arg(long, env = "TVIX_BOOT_KERNEL", value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Your own initramfs (cpio archive, optionally compressed) instead of the one
    /// tvix-boot builds around its guest init (so none of --run, --shell, --init, --find).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["run", "shell", "shell_path", "init", "find"])]
    initrd: Option<PathBuf>,

    /// Extra kernel command-line arguments, appended to the defaults
    /// ("console=ttyS0 reboot=k panic=-1 quiet"). The guest init reads tvix.find,
    /// tvix.shell[=PATH], tvix.run=PATH and init=PATH from here too.
    #[arg(long, env = "CH_CMDLINE", value_name = "STR")]
    cmdline: Option<String>,

    /// Number of vCPUs.
    #[arg(long, env = "CH_NUM_CPUS", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(tvix_boot_vmm::MAX_VCPUS)))]
    cpus: u8,

    /// Guest memory: bytes, or with a K, M, G or T suffix (e.g. 512M, 1G).
    #[arg(long, env = "CH_MEM_SIZE", value_name = "SIZE", default_value = "512M",
          value_parser = parse_size)]
    memory: u64,

    #[command(flatten)]
    mode: ModeArgs,
}

/// What the guest runs: our init in `mode`, or the user's own initrd.
enum Guest {
    TvixInit(Mode),
    CustomInitrd(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum VmCmdError {
    #[error(
        "no guest kernel{}: pass --kernel PATH, set TVIX_BOOT_KERNEL, or build one with \
         boot/kernel/build.sh",
        .looked_at.as_ref().map_or_else(String::new, |p| format!(" (looked for {})", p.display()))
    )]
    NoKernel { looked_at: Option<PathBuf> },
    #[error(transparent)]
    Mode(#[from] mode::ModeArgsError),
    #[error("cannot open the store: {0}")]
    OpenStore(#[from] StoreError),
    #[error("cannot build the initrd: {0}")]
    Initrd(#[from] initrd::InitrdError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

pub fn run(args: VmArgs, store_addrs: &StoreAddrArgs) -> ExitCode {
    match boot(args, store_addrs) {
        Ok((guest, VmExit::PowerOff | VmExit::Reset, reported)) => exit_code(&guest, reported),
        Ok((_, VmExit::Panic, _)) => {
            eprintln!("tvix-boot: the guest kernel panicked");
            ExitCode::from(GUEST_PANIC_STATUS)
        }
        Err(e) => {
            eprintln!("tvix-boot: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Checks everything, boots, waits for the guest to stop. Returns how it stopped and
/// the status it reported on the exit-status port.
fn boot(
    args: VmArgs,
    store_addrs: &StoreAddrArgs,
) -> Result<(Guest, VmExit, Option<u32>), VmCmdError> {
    let kernel = match args.kernel {
        Some(kernel) => kernel,
        None => match default_kernel() {
            Some(kernel) if kernel.exists() => kernel,
            looked_at => return Err(VmCmdError::NoKernel { looked_at }),
        },
    };
    let mut cmdline = DEFAULT_CMDLINE.to_owned();
    if let Some(extra) = args
        .cmdline
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    let mut guest = match args.initrd {
        Some(path) => Guest::CustomInitrd(path),
        None => Guest::TvixInit(mode::choose(&cmdline, args.mode.requested()?.as_ref())?),
    };

    // The store is opened before anything boots, so a bad address is reported at once,
    // and so is a program that is not in it.
    let store = Arc::new(store_addrs.open()?);
    if let Guest::TvixInit(mode) = &mut guest {
        mode::check_in_store(&store, mode)?;
        mode::append_keys(&mut cmdline, mode)?;
    }
    let initrd = match &guest {
        Guest::CustomInitrd(path) => Initrd::File(path.clone()),
        Guest::TvixInit(mode) => {
            let bytes = initrd::build_initrd_for(mode, Path::new(HOST_BUSYBOX))?;
            tracing::info!("initrd built in memory: {} bytes", bytes.len());
            Initrd::Bytes(bytes)
        }
    };
    let config = VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline,
        vcpus: args.cpus,
        mem_size: args.memory,
        console: Console::Stdio,
    };

    let mut vm = Vm::new(config)?;
    vm.add_virtio_device(store_device(store, u16::from(args.cpus)))?;
    let status = vm.guest_status();
    let exit = vm.run()?;
    Ok((guest, exit, status.get()))
}

/// tvix-boot's exit code after a clean stop: the status the guest init reported for
/// the program it ran (0..=255, as a shell would give it), else success.
fn exit_code(guest: &Guest, reported: Option<u32>) -> ExitCode {
    let expects_status = matches!(
        guest,
        Guest::TvixInit(Mode::Run { .. } | Mode::Shell { .. } | Mode::Find)
    );
    match reported {
        Some(status) => match u8::try_from(status) {
            Ok(status) => ExitCode::from(status),
            Err(_) if status == STATUS_INIT_FAILED => {
                eprintln!("tvix-boot: the guest init failed; its error is on the console above");
                ExitCode::FAILURE
            }
            Err(_) => {
                eprintln!("tvix-boot: the guest reported an invalid exit status {status}");
                ExitCode::FAILURE
            }
        },
        None if expects_status => {
            eprintln!(
                "tvix-boot: the guest powered off without reporting an exit status (a guest \
                 kernel without CONFIG_X86_IOPL_IOPERM cannot write the status port)"
            );
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

/// The guest's /nix/store: the store as a virtio-fs device with tag `tvix`, one request
/// queue per vCPU. The root is listable, so `tvix.find` and `ls /nix/store` work.
fn store_device(store: Arc<Store>, request_queues: u16) -> Box<dyn VirtioDevice> {
    let fs = StoreFs::new(
        store,
        StoreFsOptions {
            list_root: true,
            show_xattr: false,
        },
    );
    Box::new(
        VirtioFs::new(fs, STORE_TAG, request_queues).expect("the tag and queue count are valid"),
    )
}

/// Where boot/kernel/build.sh puts the kernel: `current/vmlinux` under
/// ${TVIX_BOOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tvix-boot}/kernel.
fn default_kernel() -> Option<PathBuf> {
    // Empty variables count as unset, as in the shell's ${VAR:-default}.
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let cache_root = match var("TVIX_BOOT_CACHE") {
        Some(root) => root,
        None => var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|home| home.join(".cache")))?
            .join("tvix-boot"),
    };
    Some(cache_root.join("kernel/current/vmlinux"))
}

/// Parses "512M", "1G", "1024K", "1073741824"; an optional "B"/"iB" after the
/// unit is accepted (units are powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let lower = text.trim().to_ascii_lowercase();
    let without_b = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match without_b.char_indices().last() {
        Some((i, 'k')) => (&without_b[..i], 10),
        Some((i, 'm')) => (&without_b[..i], 20),
        Some((i, 'g')) => (&without_b[..i], 30),
        Some((i, 't')) => (&without_b[..i], 40),
        _ => (without_b, 0),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512M or 1G"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_vmm_agree_on_the_status_port() {
        use tvix_boot_init::protocol::{EXIT_STATUS_PORT, EXIT_STATUS_PORT_LEN};
        use tvix_boot_vmm::arch::x86_64::layout::STATUS_PORT;
        assert_eq!(EXIT_STATUS_PORT, STATUS_PORT);
        assert_eq!(
            u64::from(EXIT_STATUS_PORT_LEN),
            tvix_boot_devices::status_port::STATUS_PORT_LEN
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
