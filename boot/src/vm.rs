//! Booting a VM from the command line: a thin layer over the vmm crate.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use tvix_boot_devices::virtio::VirtioDevice;
use tvix_boot_store::Store;
use tvix_boot_virtiofs::{StoreFs, StoreFsOptions, VirtioFs};
use tvix_boot_vmm::{Console, Vm, VmConfig, VmExit};

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

    /// initramfs (cpio archive, optionally compressed) for the guest.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Extra kernel command-line arguments, appended to the defaults
    /// ("console=ttyS0 reboot=k panic=-1 quiet").
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
}

pub fn run(args: VmArgs, store_addrs: &StoreAddrArgs) -> ExitCode {
    let kernel = match args.kernel {
        Some(kernel) => kernel,
        None => match default_kernel() {
            Some(kernel) if kernel.exists() => kernel,
            looked_at => {
                let looked_at = looked_at
                    .map_or_else(String::new, |p| format!(" (looked for {})", p.display()));
                eprintln!(
                    "tvix-boot: no guest kernel{looked_at}: pass --kernel PATH, set \
                     TVIX_BOOT_KERNEL, or build one with boot/kernel/build.sh"
                );
                return ExitCode::FAILURE;
            }
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
    let config = VmConfig {
        kernel,
        initrd: args.initrd,
        cmdline,
        vcpus: args.cpus,
        mem_size: args.memory,
        console: Console::Stdio,
    };

    // The store is opened before anything boots, so a bad address is reported at once.
    let store = match store_addrs.open() {
        Ok(store) => Arc::new(store),
        Err(e) => {
            eprintln!("tvix-boot: cannot open the store: {e}");
            return ExitCode::FAILURE;
        }
    };
    let request_queues = u16::from(args.cpus);
    let result = Vm::new(config).and_then(|mut vm| {
        vm.add_virtio_device(store_device(store, request_queues))?;
        vm.run()
    });
    match result {
        Ok(VmExit::PowerOff | VmExit::Reset) => ExitCode::SUCCESS,
        Ok(VmExit::Panic) => {
            eprintln!("tvix-boot: the guest kernel panicked");
            ExitCode::from(GUEST_PANIC_STATUS)
        }
        Err(e) => {
            eprintln!("tvix-boot: {e}");
            ExitCode::FAILURE
        }
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
