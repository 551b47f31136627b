//! The Intel MultiProcessor Specification 1.4 table: the CPU and interrupt routing
//! description for kernels booted with `acpi=off` (with ACPI, Linux uses the MADT).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Why the MP table could not be written.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum MpTableError {
    /// More vCPUs than 8-bit APIC ids.
    #[error("{count} vCPUs do not fit the MP table's 8-bit APIC ids")]
    TooManyVcpus { count: u32 },
    /// The table for this many vCPUs runs into the ACPI tables' area.
    #[error("MP table ({size} bytes) does not fit between {start:#x} and {end:#x}")]
    TooBig { size: u64, start: u64, end: u64 },
    /// The table could not be written to guest memory.
    #[error("cannot write the MP table: {0}")]
    Write(vm_memory::GuestMemoryError),
}

const SPEC_REVISION: u8 = 4; // MP spec 1.4
const FLOATING_POINTER_LEN: usize = 16;
const CONFIG_HEADER_LEN: usize = 44;

// Entry types (MP spec 4.3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_USABLE: u8 = 1;
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;
/// Legacy ISA interrupt lines routed 1:1 to IOAPIC pins.
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

fn entries(vcpu_count: u8) -> Vec<u8> {
    let ioapic_id = vcpu_count; // distinct from every local APIC id
    let mut e = Vec::new();
    for cpu in 0..vcpu_count {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        e.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LAPIC_VERSION, flags]);
        e.extend_from_slice(&[0; 16]); // signature, feature flags, reserved
    }
    e.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    e.extend_from_slice(b"ISA   ");
    e.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_USABLE]);
    e.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    for irq in 0..ISA_IRQS {
        // type, interrupt type, flags (conforming), source bus/irq, destination
        e.extend_from_slice(&[ENTRY_IO_INTERRUPT, INTERRUPT_INT, 0, 0, ISA_BUS_ID, irq]);
        e.extend_from_slice(&[ioapic_id, irq]);
    }
    for (kind, lint) in [(INTERRUPT_EXTINT, 0), (INTERRUPT_NMI, 1)] {
        e.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0]);
        e.extend_from_slice(&[ALL_LOCAL_APICS, lint]);
    }
    e
}

/// Builds the floating pointer and configuration table for `vcpu_count` CPUs.
fn build(vcpu_count: u32) -> Result<Vec<u8>, MpTableError> {
    let count = u8::try_from(vcpu_count)
        .ok()
        .filter(|&c| c < u8::MAX)
        .ok_or(MpTableError::TooManyVcpus { count: vcpu_count })?;
    let entries = entries(count);
    let config_addr = layout::MPTABLE_START + FLOATING_POINTER_LEN as u64;

    let mut pointer = Vec::with_capacity(FLOATING_POINTER_LEN);
    pointer.extend_from_slice(b"_MP_");
    pointer.extend_from_slice(&(config_addr as u32).to_le_bytes());
    pointer.extend_from_slice(&[1, SPEC_REVISION, 0]); // length in 16-byte units
    pointer.extend_from_slice(&[0; 5]); // feature bytes: a configuration table follows
    pointer[10] = checksum(&pointer);

    let table_len = CONFIG_HEADER_LEN + entries.len();
    let entry_count = (count as usize) + 2 + ISA_IRQS as usize + 2;
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]); // revision, checksum
    table.extend_from_slice(b"TVIXBOOT"); // OEM id
    table.extend_from_slice(b"MICROVM     "); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&(entry_count as u16).to_le_bytes());
    table.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    pointer.extend_from_slice(&table);
    Ok(pointer)
}

/// Writes the MP table at `layout::MPTABLE_START`.
pub fn write(mem: &GuestMemoryMmap, vcpu_count: u32) -> Result<(), MpTableError> {
    let bytes = build(vcpu_count)?;
    let end = layout::MPTABLE_START + bytes.len() as u64;
    if end > layout::RSDP_START {
        return Err(MpTableError::TooBig {
            size: bytes.len() as u64,
            start: layout::MPTABLE_START,
            end: layout::RSDP_START,
        });
    }
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let bytes = build(2).unwrap();
        let (pointer, table) = bytes.split_at(FLOATING_POINTER_LEN);
        assert_eq!(checksum(pointer), 0);
        assert_eq!(checksum(table), 0);
        assert_eq!(
            u16::from_le_bytes([table[4], table[5]]) as usize,
            table.len()
        );
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 2 + 2 + 16 + 2);
        assert!(build(255).is_err());
    }
}
