//! vCPU state for entering Linux's 64-bit boot protocol: GDT, identity page tables,
//! segment/control registers, general registers, FPU, MSRs and the LAPIC's LINT pins.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout;

/// Why the boot vCPU's state (registers, GDT, page tables, MSRs) could not be set.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum RegsError {
    /// A boot structure (GDT, IDT, page table) could not be written to guest memory.
    #[error("writing the boot {what} to guest memory at {addr:#x}: {source}")]
    WriteMemory {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    /// A KVM ioctl that sets vCPU state failed.
    #[error("KVM {ioctl} failed: {source}")]
    Kvm {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM_SET_MSRS set fewer MSRs than given.
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    MsrsRejected { set: usize, wanted: usize },
}

fn kvm(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { ioctl, source }
}

/// GDT slots. Linux's boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const GDT_NULL: usize = 0;
const GDT_CODE: usize = 2;
const GDT_DATA: usize = 3;
const GDT_TSS: usize = 4;
pub const GDT_ENTRIES: u64 = 5;

// Segment descriptor access/flag bits (Intel SDM vol. 3, 3.4.5).
const SEG_ACCESSED: u8 = 1;
const SEG_TYPE_CODE_READ: u8 = 0b1010;
const SEG_TYPE_DATA_WRITE: u8 = 0b0010;
const SEG_TYPE_TSS_BUSY: u8 = 0b1011;
const SEG_FLAG_LONG: u8 = 1 << 1; // L
const SEG_FLAG_32BIT: u8 = 1 << 2; // D/B
const SEG_FLAG_4K: u8 = 1 << 3; // G

/// One segment, both as the 8-byte descriptor the GDT holds and as the hidden part of
/// a segment register KVM wants, so the two cannot disagree.
struct Segment {
    index: usize,
    type_: u8,
    system: bool, // S bit: code/data rather than system segment
    flags: u8,
    base: u32,
    limit: u32, // in units given by SEG_FLAG_4K
}

impl Segment {
    fn descriptor(&self) -> u64 {
        let base = u64::from(self.base);
        let limit = u64::from(self.limit);
        let access = u64::from(self.type_) | (u64::from(self.system) << 4) | (1 << 7); // P
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (access << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (u64::from(self.flags) << 52)
            | (((base >> 24) & 0xff) << 56)
    }

    fn register(&self) -> kvm_segment {
        let byte_limit = if self.flags & SEG_FLAG_4K != 0 {
            (self.limit << 12) | 0xfff
        } else {
            self.limit
        };
        kvm_segment {
            base: u64::from(self.base),
            limit: byte_limit,
            selector: (self.index * 8) as u16,
            type_: self.type_,
            present: 1,
            dpl: 0,
            db: u8::from(self.flags & SEG_FLAG_32BIT != 0),
            s: u8::from(self.system),
            l: u8::from(self.flags & SEG_FLAG_LONG != 0),
            g: u8::from(self.flags & SEG_FLAG_4K != 0),
            avl: 0,
            unusable: 0,
            padding: 0,
        }
    }
}

/// Flat segments for either a 64-bit or a 32-bit (protected mode, no paging) entry.
fn boot_segments(long_mode: bool) -> [Segment; 3] {
    let code_flags = if long_mode {
        SEG_FLAG_LONG | SEG_FLAG_4K
    } else {
        SEG_FLAG_32BIT | SEG_FLAG_4K
    };
    [
        Segment {
            index: GDT_CODE,
            type_: SEG_TYPE_CODE_READ | SEG_ACCESSED,
            system: true,
            flags: code_flags,
            base: 0,
            limit: 0xf_ffff,
        },
        Segment {
            index: GDT_DATA,
            type_: SEG_TYPE_DATA_WRITE | SEG_ACCESSED,
            system: true,
            flags: SEG_FLAG_32BIT | SEG_FLAG_4K,
            base: 0,
            limit: 0xf_ffff,
        },
        // KVM on Intel refuses to enter a guest with an unusable TR.
        Segment {
            index: GDT_TSS,
            type_: SEG_TYPE_TSS_BUSY,
            system: false,
            flags: 0,
            base: 0,
            limit: 0x67,
        },
    ]
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
const HUGE_PAGE_SIZE: u64 = 2 << 20;
const ENTRIES_PER_TABLE: u64 = 512;

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// Flat 32-bit protected mode without paging (tiny test guests).
    #[cfg_attr(not(test), allow(dead_code))]
    Flat32,
}

fn write_memory<M: GuestMemory>(
    mem: &M,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), RegsError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| RegsError::WriteMemory { what, addr, source })
}

/// Writes the boot GDT and an empty IDT.
fn write_descriptor_tables<M: GuestMemory>(mem: &M, segments: &[Segment]) -> Result<(), RegsError> {
    let mut gdt = [0u64; GDT_ENTRIES as usize];
    gdt[GDT_NULL] = 0;
    for segment in segments {
        gdt[segment.index] = segment.descriptor();
    }
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    write_memory(mem, "GDT", layout::BOOT_GDT_START, &bytes)?;
    write_memory(mem, "IDT", layout::BOOT_IDT_START, &0u64.to_le_bytes())
}

/// Identity-maps the first 1 GiB with 2 MiB pages.
fn write_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    let entry = |addr: u64| (addr | PTE_PRESENT | PTE_WRITABLE).to_le_bytes();
    write_memory(mem, "PML4", layout::PML4_START, &entry(layout::PDPT_START))?;
    write_memory(mem, "PDPT", layout::PDPT_START, &entry(layout::PD_START))?;
    let pd: Vec<u8> = (0..ENTRIES_PER_TABLE)
        .flat_map(|i| ((i * HUGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE).to_le_bytes())
        .collect();
    write_memory(mem, "page directory", layout::PD_START, &pd)
}

/// Sets segment and control registers (and writes the tables they point at).
pub fn setup_sregs<M: GuestMemory>(
    mem: &M,
    vcpu: &VcpuFd,
    mode: EntryMode,
) -> Result<(), RegsError> {
    let long_mode = matches!(mode, EntryMode::Linux64);
    let [code, data, tss] = boot_segments(long_mode);
    write_descriptor_tables(mem, &[code, data, tss])?;
    let [code, data, tss] = boot_segments(long_mode);

    let mut sregs: kvm_sregs = crate::startup::kvm_ioctl("KVM_GET_SREGS", || vcpu.get_sregs())
        .map_err(kvm("KVM_GET_SREGS"))?;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code.register();
    let data = data.register();
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = tss.register();

    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET;
    if long_mode {
        write_page_tables(mem)?;
        sregs.cr3 = layout::PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    crate::startup::kvm_ioctl("KVM_SET_SREGS", || vcpu.set_sregs(&sregs))
        .map_err(kvm("KVM_SET_SREGS"))
}

/// Sets general registers: entry point, boot stack and (for Linux) the zero page.
pub fn setup_regs(vcpu: &VcpuFd, entry: u64, mode: EntryMode) -> Result<(), RegsError> {
    const RFLAGS_RESERVED_ONE: u64 = 1 << 1;
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED_ONE,
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        ..Default::default()
    };
    if let EntryMode::Linux64 = mode {
        regs.rsi = layout::ZERO_PAGE_START;
    }
    crate::startup::kvm_ioctl("KVM_SET_REGS", || vcpu.set_regs(&regs)).map_err(kvm("KVM_SET_REGS"))
}

/// The x87/SSE state after FNINIT and with the default MXCSR.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const FCW_DEFAULT: u16 = 0x37f;
    const MXCSR_DEFAULT: u32 = 0x1f80;
    let fpu = kvm_fpu {
        fcw: FCW_DEFAULT,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    };
    crate::startup::kvm_ioctl("KVM_SET_FPU", || vcpu.set_fpu(&fpu)).map_err(kvm("KVM_SET_FPU"))
}

// MSR numbers (Intel SDM vol. 4) and values.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default memory type write-back: without it a guest may treat all
/// of RAM as uncacheable.
const MTRR_ENABLE_WRITEBACK_DEFAULT: u64 = (1 << 11) | 6;

/// Boot values for the MSRs the kernel expects to start out defined.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK_DEFAULT),
    ];
    let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits a KVM MSR array");
    let set = crate::startup::kvm_ioctl("KVM_SET_MSRS", || vcpu.set_msrs(&msrs))
        .map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::MsrsRejected {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

// Local APIC register offsets and LVT delivery modes (Intel SDM vol. 3, 10.5.1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_MODE_SHIFT: u32 = 8;
const APIC_DELIVERY_MODE_MASK: u32 = 0b111 << APIC_DELIVERY_MODE_SHIFT;
const APIC_MODE_NMI: u32 = 0b100;
const APIC_MODE_EXTINT: u32 = 0b111;

/// Wires LINT0 to the (in-kernel) 8259 PIC as ExtINT and LINT1 to NMI, the virtual-wire
/// setup firmware leaves behind and Linux expects.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = crate::startup::kvm_ioctl("KVM_GET_LAPIC", || vcpu.get_lapic())
        .map_err(kvm("KVM_GET_LAPIC"))?;
    for (register, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let bytes = &mut lapic.regs[register..register + 4];
        let raw: [u8; 4] = std::array::from_fn(|i| bytes[i] as u8);
        let value = (u32::from_le_bytes(raw) & !APIC_DELIVERY_MODE_MASK)
            | (mode << APIC_DELIVERY_MODE_SHIFT);
        for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
    crate::startup::kvm_ioctl("KVM_SET_LAPIC", || vcpu.set_lapic(&lapic))
        .map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_known_encodings() {
        let [code, data, _] = boot_segments(true);
        // The classic 64-bit kernel code / data descriptors.
        assert_eq!(code.descriptor(), 0x00af_9b00_0000_ffff);
        assert_eq!(data.descriptor(), 0x00cf_9300_0000_ffff);
        assert_eq!(code.register().selector, 0x10);
        assert_eq!(data.register().selector, 0x18);
        assert_eq!(data.register().limit, 0xffff_ffff);
    }

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPT_START);
        let last: u64 = mem
            .read_obj(GuestAddress(layout::PD_START + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 511 * HUGE_PAGE_SIZE);
        assert_ne!(last & PTE_HUGE, 0);
    }
}
