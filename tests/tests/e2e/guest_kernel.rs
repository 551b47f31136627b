//! The guest kernel from boot/guest-kernel/build.sh, booted by plain QEMU (TCG): a
//! check of the kernel configuration on its own, independent of tvix-boot.
//!
//! q35, not microvm: microvm's ACPI is hardware-reduced, which tells Linux
//! there is no PIT, and under TCG (no kvmclock, no TSC frequency in CPUID)
//! the kernel then has no timer to calibrate against and hangs at
//! "tsc: Marking TSC unstable". With acpi=off microvm boots but cannot power
//! off. q35 has full ACPI, so this also proves ACPI poweroff works on a
//! kernel without PCI (boot/guest-kernel/patches/0001); q35's own DSDT logs
//! harmless "PCI_Config has no handler" errors for its PCI link devices.

use std::time::Duration;

use tvix_boot_tests::{Initramfs, assets, qemu};

pub fn guest_kernel_boots_under_qemu_and_powers_off_via_acpi() {
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    // QEMU loads bzImage (its ELF loader wants a PVH note); build.sh keeps
    // both side by side.
    let bzimage = vmlinux.with_file_name("bzImage");
    let busybox = assets::busybox().unwrap_or_else(|e| panic!("{e}"));
    let initrd = Initramfs::busybox_init(
        &busybox,
        "echo GUEST-CPUS=$(nproc)\n\
         grep -q '\\bfuse$' /proc/filesystems && echo GUEST-FUSE\n\
         grep -q '\\bvirtiofs$' /proc/filesystems && echo GUEST-VIRTIOFS\n\
         echo GUEST-DONE\n\
         poweroff -f\n",
    )
    .unwrap_or_else(|e| panic!("initrd: {e}"))
    .finish();
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd_path = dir.path().join("initrd.cpio");
    std::fs::write(&initrd_path, initrd).expect("write initrd");

    let out = qemu::run_qemu(
        [
            "-M",
            "q35",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "256",
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-append",
            "console=ttyS0 panic=-1",
            "-kernel",
            bzimage.to_str().expect("utf-8 path"),
            "-initrd",
            initrd_path.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("qemu: {e}"));
    let serial = &out.serial;
    eprintln!(
        "{serial}\nQEMU q35: boot to poweroff in {:.2?}",
        out.elapsed
    );
    assert!(!out.timed_out, "timed out:\n{serial}");
    assert!(serial.contains("GUEST-CPUS=2"), "{serial}");
    assert!(serial.contains("GUEST-FUSE"), "{serial}");
    assert!(serial.contains("GUEST-VIRTIOFS"), "{serial}");
    assert!(serial.contains("GUEST-DONE"), "{serial}");
    // poweroff (ACPI) ends QEMU cleanly; a panic would reboot (-no-reboot
    // also exits 0), so check the kernel said it powered off.
    assert!(serial.contains("reboot: Power down"), "{serial}");
    assert!(out.status.success(), "{}\n{serial}", out.stderr);
}

/// Options the built kernel must have, each with who needs it. The fragment
/// (boot/guest-kernel/tvix-boot.config) is how they get there; this list is what they
/// are for, so a fragment edit that drops one fails here with the reason.
const REQUIRED_OPTIONS: &[(&str, &str)] = &[
    // tvix-boot's devices and boot protocol.
    ("CONFIG_64BIT", "tvix-boot: 64-bit boot"),
    ("CONFIG_SERIAL_8250_CONSOLE", "tvix-boot: serial console"),
    (
        "CONFIG_VIRTIO_MMIO",
        "tvix-boot: every device is virtio-mmio",
    ),
    (
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "tvix-boot: devices are described on the command line",
    ),
    ("CONFIG_VIRTIO_FS", "tvix-boot: the store over virtio-fs"),
    ("CONFIG_FUSE_DAX", "tvix-boot: virtio-fs DAX window"),
    (
        "CONFIG_VIRTIO_CONSOLE",
        "tvix-boot: program streams on virtio-console ports",
    ),
    ("CONFIG_VIRTIO_NET", "tvix-boot --net: the guest's eth0"),
    ("CONFIG_INET", "tvix-boot --net: IPv4"),
    ("CONFIG_IPV6", "tvix-boot --net: IPv6"),
    ("CONFIG_ACPI", "tvix-boot: power-off through ACPI S5"),
    (
        "CONFIG_PVPANIC",
        "tvix-boot: guest panics reported to the VMM",
    ),
    ("CONFIG_X86_IOPL_IOPERM", "tvix-boot: the exit-status port"),
    ("CONFIG_BLK_DEV_INITRD", "tvix-boot: in-memory initrd"),
    ("CONFIG_DEVTMPFS", "tvix-boot: the guest init's /dev"),
    ("CONFIG_TMPFS", "tvix-boot: init=: the new root is a tmpfs"),
    ("CONFIG_UNIX98_PTYS", "tvix-boot: interactive shells"),
    ("CONFIG_KVM_GUEST", "tvix-boot: kvmclock, PV features"),
    // systemd's README: required.
    ("CONFIG_CGROUPS", "systemd: cgroup2 (required)"),
    ("CONFIG_FHANDLE", "systemd: name_to_handle_at (required)"),
    ("CONFIG_INOTIFY_USER", "systemd: inotify (required)"),
    ("CONFIG_SIGNALFD", "systemd: signalfd (required)"),
    ("CONFIG_TIMERFD", "systemd: timerfd (required)"),
    ("CONFIG_EPOLL", "systemd: epoll (required)"),
    ("CONFIG_UNIX", "systemd: AF_UNIX sockets (required)"),
    ("CONFIG_SYSFS", "systemd: sysfs (required)"),
    ("CONFIG_PROC_FS", "systemd: procfs (required)"),
    ("CONFIG_NET", "systemd: netlink (required)"),
    // systemd's README: strongly recommended.
    ("CONFIG_AUTOFS_FS", "systemd: automount units (recommended)"),
    (
        "CONFIG_TMPFS_POSIX_ACL",
        "systemd: ACLs on tmpfs (recommended)",
    ),
    (
        "CONFIG_TMPFS_XATTR",
        "systemd: xattrs on tmpfs (recommended)",
    ),
    ("CONFIG_SECCOMP", "systemd: SystemCallFilter= (recommended)"),
    (
        "CONFIG_SECCOMP_FILTER",
        "systemd: SystemCallFilter= (recommended)",
    ),
    (
        "CONFIG_NAMESPACES",
        "systemd: Private*= sandboxing (recommended)",
    ),
    ("CONFIG_NET_NS", "systemd: PrivateNetwork= (recommended)"),
    ("CONFIG_USER_NS", "systemd: PrivateUsers= (recommended)"),
    ("CONFIG_PID_NS", "systemd: namespaces (recommended)"),
    // System closures built on the read-only store.
    (
        "CONFIG_OVERLAY_FS",
        "systems: writable layers over the store",
    ),
];

/// Options that must be off, and why.
const FORBIDDEN_OPTIONS: &[(&str, &str)] = &[
    (
        "CONFIG_IPV6_SIT",
        "tvix-boot: a guest's interfaces are lo and, with --net, eth0 (no sit0)",
    ),
    (
        "CONFIG_MODULES",
        "tvix-boot: no modules, everything built in",
    ),
    (
        "CONFIG_CMDLINE_BOOL",
        "tvix-boot: the VMM passes the whole command line",
    ),
    (
        "CONFIG_UEVENT_HELPER",
        "systemd: legacy hotplug helper (must be off)",
    ),
    (
        "CONFIG_FW_LOADER_USER_HELPER",
        "systemd: user-space firmware loading (must be off)",
    ),
];

pub fn guest_kernel_config_has_what_tvix_boot_and_systemd_need() {
    let vmlinux = assets::guest_kernel().unwrap_or_else(|e| panic!("guest kernel: {e}"));
    let config_path = vmlinux.with_file_name("config");
    let config = std::fs::read_to_string(&config_path)
        .unwrap_or_else(|e| panic!("{}: {e}", config_path.display()));
    let is_set = |option: &str| {
        config
            .lines()
            .any(|line| line == format!("{option}=y") || line == format!("{option}=m"))
    };
    let missing: Vec<String> = REQUIRED_OPTIONS
        .iter()
        .filter(|(option, _)| !is_set(option))
        .map(|(option, why)| format!("  {option} is not set; needed by {why}"))
        .chain(
            FORBIDDEN_OPTIONS
                .iter()
                .filter(|(option, _)| is_set(option))
                .map(|(option, why)| format!("  {option} is set; {why}")),
        )
        .collect();
    assert!(
        missing.is_empty(),
        "the guest kernel {} does not have what it needs:\n{}\n(add them to boot/guest-kernel/tvix-boot.config)",
        config_path.display(),
        missing.join("\n")
    );
    let version = config
        .lines()
        .find_map(|line| line.strip_prefix("# Linux/x86 "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("unknown");
    assert!(
        version.starts_with("6.12."),
        "the guest kernel should be Linux 6.12 (multi-queue virtio-fs), its config says {version}"
    );
}
