//! The guest kernel from boot/kernel/build.sh, booted by plain QEMU (TCG): a
//! check of the kernel configuration on its own, independent of tvix-boot.
//!
//! q35, not microvm: microvm's ACPI is hardware-reduced, which tells Linux
//! there is no PIT, and under TCG (no kvmclock, no TSC frequency in CPUID)
//! the kernel then has no timer to calibrate against and hangs at
//! "tsc: Marking TSC unstable". With acpi=off microvm boots but cannot power
//! off. q35 has full ACPI, so this also proves ACPI poweroff works on a
//! kernel without PCI (boot/kernel/patches/0001); q35's own DSDT logs
//! harmless "PCI_Config has no handler" errors for its PCI link devices.

use std::time::Duration;

use tvix_boot_tests::{Initramfs, assets, qemu};

#[test]
fn guest_kernel_boots_under_qemu_and_powers_off_via_acpi() {
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
