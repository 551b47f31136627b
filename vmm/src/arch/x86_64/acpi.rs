//! ACPI tables for a hardware-reduced platform: RSDP -> XSDT -> FADT (-> DSDT), MADT.
//!
//! The FADT's sleep control/status and reset registers point at one I/O port (see
//! `devices::acpi_sleep`), and the DSDT's `_S5_` gives the sleep type for soft-off, so
//! the guest's `poweroff` ends the VM. The DSDT also describes COM1, the pvpanic port
//! and every virtio-mmio device (for kernels without virtio_mmio.device= support).

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use tvix_boot_devices::acpi_sleep;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

/// Why the ACPI tables could not be written.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum AcpiError {
    /// The tables (more virtio-mmio devices or vCPUs make them longer) run past the BIOS
    /// area they must stay in.
    #[error("ACPI tables ({size} bytes from {start:#x}) do not fit below {end:#x}")]
    TooBig { start: u64, size: u64, end: u64 },
    /// A table could not be written to guest memory.
    #[error("cannot write ACPI table {table}: {source}")]
    Write {
        table: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    /// More vCPUs than 8-bit APIC ids.
    #[error("{count} vCPUs do not fit the MADT's 8-bit APIC ids")]
    TooManyVcpus { count: u32 },
}

const OEM_ID: [u8; 6] = *b"TVIXBT";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2 and up means 64-bit AML integers.
const DSDT_REVISION: u8 = 6;
const SDT_HEADER_LEN: u32 = 36;
const TABLE_ALIGNMENT: u64 = 16;

/// A virtio-mmio device to describe in the DSDT.
#[derive(Clone, Copy, Debug)]
pub struct MmioDeviceInfo {
    pub addr: u64,
    pub len: u64,
    pub irq: u32,
}

/// Everything the tables describe.
pub struct AcpiConfig<'a> {
    pub vcpu_count: u32,
    pub virtio_mmio: &'a [MmioDeviceInfo],
}

fn dsdt(config: &AcpiConfig) -> Vec<u8> {
    // Each object is built and serialised in one statement: the AML builders borrow
    // their children, which are temporaries.
    let mut bytes = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&acpi_sleep::S5_SLEEP_TYPE]),
    )
    .to_aml_bytes(&mut bytes);

    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 1, 8),
                    &aml::Interrupt::new(true, true, false, false, layout::SERIAL_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut bytes);

    aml::Device::new(
        "_SB_.PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::IO::new(
                    layout::PVPANIC_PORT,
                    layout::PVPANIC_PORT,
                    1,
                    1,
                )]),
            ),
        ],
    )
    .to_aml_bytes(&mut bytes);

    for (index, device) in config.virtio_mmio.iter().enumerate() {
        let name = format!("_SB_.V{index:03X}");
        let uid = index as u32;
        aml::Device::new(
            name.as_str().into(),
            vec![
                // "LNRO0005" is the ACPI id Linux's virtio_mmio driver matches.
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, device.addr as u32, device.len as u32),
                        &aml::Interrupt::new(true, true, false, false, device.irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut bytes);
    }

    let mut table = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"TVIXDSDT",
        OEM_REVISION,
    );
    table.append_slice(&bytes);
    table.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let sleep_register = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(layout::ACPI_SLEEP_PORT),
    );
    let mut builder = FADTBuilder::new(OEM_ID, *b"TVIXFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    builder.reset_reg = sleep_register;
    builder.reset_value = acpi_sleep::RESET_VALUE;
    builder.sleep_control_reg = sleep_register;
    builder.sleep_status_reg = sleep_register;
    let mut bytes = Vec::new();
    builder.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn madt(vcpu_count: u32) -> Result<Vec<u8>, AcpiError> {
    let too_many = || AcpiError::TooManyVcpus { count: vcpu_count };
    let mut madt = MADT::new(
        OEM_ID,
        *b"TVIXMADT",
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_START as u32),
    );
    for index in 0..vcpu_count {
        let id = u8::try_from(index).map_err(|_| too_many())?;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IOAPIC's id must differ from every local APIC's.
    let ioapic_id = u8::try_from(vcpu_count).map_err(|_| too_many())?;
    madt.add_structure(IoApic::new(ioapic_id, layout::IOAPIC_START as u32, 0));
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    Ok(bytes)
}

/// Places tables one after another after the RSDP.
struct TableWriter<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl TableWriter<'_> {
    fn write(&mut self, table: &'static str, bytes: &[u8]) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(TABLE_ALIGNMENT);
        let end = addr + bytes.len() as u64;
        if end > layout::ACPI_TABLES_END {
            return Err(AcpiError::TooBig {
                start: layout::RSDP_START,
                size: end - layout::RSDP_START,
                end: layout::ACPI_TABLES_END,
            });
        }
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write { table, source })?;
        self.next = end;
        Ok(addr)
    }
}

/// Writes all tables; the RSDP lands at `layout::RSDP_START`.
pub fn write_tables(mem: &GuestMemoryMmap, config: &AcpiConfig) -> Result<(), AcpiError> {
    let mut writer = TableWriter {
        mem,
        next: layout::RSDP_START + Rsdp::len() as u64,
    };
    let dsdt_addr = writer.write("DSDT", &dsdt(config))?;
    let fadt_addr = writer.write("FADT", &fadt(dsdt_addr))?;
    let madt_addr = writer.write("MADT", &madt(config.vcpu_count)?)?;

    let mut xsdt = XSDT::new(OEM_ID, *b"TVIXXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut bytes = Vec::new();
    xsdt.to_aml_bytes(&mut bytes);
    let xsdt_addr = writer.write("XSDT", &bytes)?;

    let mut bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut bytes);
    mem.write_slice(&bytes, GuestAddress(layout::RSDP_START))
        .map_err(|source| AcpiError::Write {
            table: "RSDP",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed() {
        let config = AcpiConfig {
            vcpu_count: 2,
            virtio_mmio: &[MmioDeviceInfo {
                addr: layout::VIRTIO_MMIO_START,
                len: layout::VIRTIO_MMIO_SLOT_SIZE,
                irq: layout::VIRTIO_MMIO_FIRST_IRQ,
            }],
        };
        let dsdt = dsdt(&config);
        assert!(checksum_ok(&dsdt));
        assert_eq!(
            u32::from_le_bytes(dsdt[4..8].try_into().unwrap()) as usize,
            dsdt.len()
        );
        let find = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"_S5_") && find(b"QEMU0001") && find(b"LNRO0005"));

        let fadt = fadt(0x1234);
        assert!(checksum_ok(&fadt));
        assert!(checksum_ok(&madt(2).unwrap()));
        assert!(madt(300).is_err());

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), layout::HIMEM_START as usize)])
            .unwrap();
        write_tables(&mem, &config).unwrap();
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(layout::RSDP_START))
            .unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp));
    }
}
