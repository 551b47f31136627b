//! The x86_64 guest's physical memory map, I/O ports and interrupt lines.
//!
//! Every address the VMM places something at is defined here and nowhere else.
//!
//! ```text
//! 0x0000_0000  +--------------------------------------------+
//!              | real-mode IVT / BDA (unused)               |
//! 0x0000_0500  | boot GDT, boot IDT                         |
//! 0x0000_6000  | setup_data: RNG seed                       |
//! 0x0000_7000  | zero page (struct boot_params)             |
//! 0x0000_8ff0  | boot stack (grows down)                    |
//! 0x0000_9000  | identity page tables: PML4, PDPT, PD       |
//! 0x0002_0000  | kernel command line                        |
//! 0x0009_fc00  +- EBDA: MP table --------------- reserved --+
//! 0x000e_0000  | ACPI: RSDP, then XSDT/FADT/MADT/DSDT       |
//! 0x0010_0000  +- RAM: kernel (ELF at its p_paddr) ... -----+
//!              | ... initrd at the top of low RAM           |
//! 0xc000_0000  +- 32-bit MMIO hole -------------------------+
//! 0xd000_0000  | virtio-mmio device slots                   |
//! 0xfec0_0000  | IOAPIC                                     |
//! 0xfee0_0000  | LAPIC                                      |
//! 0xfffb_d000  | KVM's TSS (Intel VMX needs 3 pages)        |
//! 0x1_0000_0000+- RAM above 4 GiB, if memory > 3 GiB -------+
//! ```

/// Where the 16-byte-aligned boot GDT lives (written by the vmm's `regs` module).
pub const BOOT_GDT_START: u64 = 0x500;
/// The boot IDT (empty: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x540;

/// The `setup_data` node carrying the RNG seed (SETUP_RNG_SEED).
pub const SETUP_DATA_START: u64 = 0x6000;
/// Upper bound of the setup_data node (it must not run into the zero page).
pub const SETUP_DATA_END: u64 = ZERO_PAGE_START;

/// The "zero page": Linux boot protocol `struct boot_params`. RSI points here.
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity-mapping page tables for the 64-bit entry: one PML4, one PDPT, one PD of
/// 2 MiB pages, which maps the first 1 GiB (all the early kernel touches).
pub const PML4_START: u64 = 0x9000;
/// The page-directory-pointer table, the PML4's only entry.
pub const PDPT_START: u64 = 0xa000;
/// The page directory of 2 MiB pages, the PDPT's only entry.
pub const PD_START: u64 = 0xb000;

/// The kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we pass (Linux's x86 COMMAND_LINE_SIZE is 2048; newer 4096).
pub const CMDLINE_MAX_SIZE: usize = 4096;

/// Start of the Extended BIOS Data Area: RAM below it is usable, from here to 1 MiB
/// is reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table (floating pointer + configuration table) sits at the EBDA start, one of
/// the places Linux scans for it.
pub const MPTABLE_START: u64 = EBDA_START;

/// The ACPI RSDP; also in the BIOS area Linux scans, and passed in boot_params.
pub const RSDP_START: u64 = 0xe0000;
/// The other ACPI tables follow the RSDP, up to the end of the BIOS area.
pub const ACPI_TABLES_END: u64 = HIMEM_START;

/// First byte above the legacy 1 MiB; the kernel is loaded from here up.
pub const HIMEM_START: u64 = 0x10_0000;

/// The hole below 4 GiB kept free of RAM for device MMIO.
pub const MMIO32_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the MMIO hole: 4 GiB.
pub const MMIO32_HOLE_END: u64 = 1 << 32;

/// virtio-mmio devices: one slot each, consecutive from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio slot (the register block is 0x200 bytes; a page keeps each
/// device separately mappable).
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// How many virtio-mmio slots there are: one per free IOAPIC line.
pub const VIRTIO_MMIO_SLOTS: u64 = (VIRTIO_MMIO_LAST_IRQ - VIRTIO_MMIO_FIRST_IRQ + 1) as u64;

/// The in-kernel IOAPIC (fixed by KVM / the architecture).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC (fixed by the architecture).
pub const APIC_START: u64 = 0xfee0_0000;

/// Three pages KVM needs for the real-mode TSS on Intel; inside the MMIO hole, above
/// everything else there.
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// RAM resumes at 4 GiB when the guest has more than fits below the hole.
pub const HIGH_RAM_START: u64 = MMIO32_HOLE_END;

/// Number of IOAPIC input lines (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u32 = 24;

// Legacy I/O ports.

/// COM1 (16550 UART), 8 registers, interrupt line 4.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's interrupt line (ISA IRQ 4, wired 1:1 to the IOAPIC pin).
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller data port; its command port is at +4 (0x64).
pub const I8042_DATA_PORT: u16 = 0x60;
/// The ACPI sleep control / sleep status / reset register (hardware-reduced ACPI); an
/// otherwise unused ISA port (the same choice as cloud-hypervisor's).
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
/// QEMU's pvpanic device (default ISA port).
pub const PVPANIC_PORT: u16 = 0x505;
/// The exit-status port (tvix_boot_devices::status_port): where the guest init writes
/// its program's status, so the init's protocol defines it.
pub const STATUS_PORT: u16 = tvix_boot_guest_init::protocol::EXIT_STATUS_PORT;

/// IOAPIC lines for virtio-mmio devices: everything above the legacy ISA lines we use.
pub const VIRTIO_MMIO_FIRST_IRQ: u32 = 5;
/// The last IOAPIC line for virtio-mmio devices (inclusive).
pub const VIRTIO_MMIO_LAST_IRQ: u32 = IOAPIC_PINS - 1;

/// Smallest guest we agree to boot: Linux needs some room beyond kernel and initrd.
pub const MIN_MEMORY: u64 = 64 << 20;

/// The guest-physical RAM ranges, as (start, length), for `mem_size` bytes of memory.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO32_HOLE_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO32_HOLE_START),
            (HIGH_RAM_START, mem_size - MMIO32_HOLE_START),
        ]
    }
}

/// Guest-physical address of virtio-mmio slot `index`, and its interrupt line; `None`
/// past the last slot.
pub fn virtio_mmio_slot(index: u64) -> Option<(u64, u32)> {
    (index < VIRTIO_MMIO_SLOTS).then(|| {
        (
            VIRTIO_MMIO_START + index * VIRTIO_MMIO_SLOT_SIZE,
            VIRTIO_MMIO_FIRST_IRQ + index as u32,
        )
    })
}

// The layout is checked when the crate is compiled: nothing above may overlap.
const _: () = {
    assert!(BOOT_IDT_START >= BOOT_GDT_START + 8 * super::regs::GDT_ENTRIES);
    assert!(BOOT_IDT_START + 8 <= SETUP_DATA_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PD_START + 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
    assert!(MPTABLE_START < RSDP_START && RSDP_START < HIMEM_START);
    assert!(VIRTIO_MMIO_FIRST_IRQ > SERIAL_IRQ);
    assert!(MMIO32_HOLE_START <= VIRTIO_MMIO_START);
    assert!(VIRTIO_MMIO_START + VIRTIO_MMIO_SLOTS * VIRTIO_MMIO_SLOT_SIZE <= IOAPIC_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_fit_below_the_ioapic() {
        let (last, irq) = virtio_mmio_slot(VIRTIO_MMIO_SLOTS - 1).unwrap();
        assert!(last + VIRTIO_MMIO_SLOT_SIZE <= IOAPIC_START);
        assert_eq!(irq, VIRTIO_MMIO_LAST_IRQ);
        assert!(virtio_mmio_slot(VIRTIO_MMIO_SLOTS).is_none());
    }

    #[test]
    fn ram_skips_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO32_HOLE_START),
                (1 << 32, (4 << 30) - MMIO32_HOLE_START)
            ]
        );
    }
}
