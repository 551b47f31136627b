//! Loading a Linux kernel (vmlinux ELF or bzImage) and initrd, and writing the zero
//! page (`struct boot_params`): e820 map, command line, initrd, RNG seed, RSDP.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::layout;

/// Why a kernel or initrd could not be loaded, or the zero page written.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // the fields are named for what the messages say
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file starts with neither the ELF magic nor a bzImage setup header.
    #[error("{path} is neither a vmlinux ELF nor a bzImage")]
    UnknownKernelFormat { path: PathBuf },
    /// linux-loader could not load the image into guest memory.
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: loader::Error,
    },
    /// The bzImage does not announce the 64-bit entry point (XLF_KERNEL_64), or is not
    /// loaded high.
    #[error("bzImage {path} cannot be booted in 64-bit mode (too old, or a 32-bit kernel)")]
    BzImageNot64Bit { path: PathBuf },
    /// An [`Initrd::File`] could not be read.
    #[error("cannot read initrd {initrd}: {source}")]
    ReadInitrd {
        initrd: String,
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel's end and the top of low RAM.
    #[error(
        "initrd {initrd} ({size} bytes) does not fit in guest memory above the kernel; give the guest more memory"
    )]
    InitrdTooBig { initrd: String, size: u64 },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy initrd {initrd} into guest memory: {source}")]
    LoadInitrd {
        initrd: String,
        source: vm_memory::GuestMemoryError,
    },
    /// The command line has a character that is not printable ASCII, or is longer than
    /// `max` bytes (with its NUL).
    #[error("kernel command line is invalid or longer than {max} bytes: {source}")]
    Cmdline {
        max: usize,
        source: linux_loader::cmdline::Error,
    },
    /// The command line could not be written to guest memory.
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(loader::Error),
    /// getrandom(2) failed for the RNG seed passed in setup_data.
    #[error("cannot get random bytes for the guest's RNG seed: {0}")]
    RngSeed(std::io::Error),
    /// A boot structure could not be written to guest memory.
    #[error("cannot write {what} to guest memory: {source}")]
    WriteMemory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
}

/// Linux boot protocol constants (Documentation/arch/x86/boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// xloadflags bit: the kernel has the 64-bit entry point above.
const XLF_KERNEL_64: u16 = 1 << 0;
/// loadflags bit: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 1 << 0;
/// Offset of the setup header's "HdrS" magic in a bzImage file.
const BZIMAGE_HDR_MAGIC_OFFSET: u64 = 0x202;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// setup_data type for an RNG seed, and the seed length we pass.
const SETUP_RNG_SEED: u32 = 9;
const RNG_SEED_LEN: usize = 32;

const PAGE_SIZE: u64 = 4096;

/// A kernel in guest memory, ready to be entered.
#[derive(Debug)]
pub struct LoadedKernel {
    /// Guest-physical 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Where an initrd landed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// Checks that `path` is a kernel we can boot, without loading it: used to fail
/// before anything starts.
pub fn check_kernel_format(path: &Path) -> Result<(), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    kernel_format(&mut file, path).map(drop)
}

#[derive(Debug, PartialEq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn kernel_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let unknown = || BootError::UnknownKernelFormat {
        path: path.to_owned(),
    };
    let mut magic = [0u8; 4];
    file.rewind().map_err(|_| unknown())?;
    if file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    file.seek(SeekFrom::Start(BZIMAGE_HDR_MAGIC_OFFSET))
        .map_err(|_| unknown())?;
    if file.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == KERNEL_HDR_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(unknown())
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    })?;
    let format = kernel_format(&mut file, path)?;
    let load_error = |source| BootError::LoadKernel {
        path: path.to_owned(),
        source,
    };
    let highmem = Some(GuestAddress(layout::HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let result = Elf::load(mem, None, &mut file, highmem).map_err(load_error)?;
            Ok(LoadedKernel {
                entry: result.kernel_load.raw_value(),
                end: result.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let result = BzImage::load(mem, None, &mut file, highmem).map_err(load_error)?;
            let header = result
                .setup_header
                .ok_or_else(|| BootError::BzImageNot64Bit {
                    path: path.to_owned(),
                })?;
            if header.xloadflags & XLF_KERNEL_64 == 0 || header.loadflags & LOADED_HIGH == 0 {
                return Err(BootError::BzImageNot64Bit {
                    path: path.to_owned(),
                });
            }
            Ok(LoadedKernel {
                entry: result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: result.kernel_end,
                setup_header: Some(header),
            })
        }
    }
}

/// Where the initrd comes from.
#[derive(Clone, Debug)]
pub enum Initrd {
    /// A file, read when the VM is created.
    File(PathBuf),
    /// An archive built in memory (tvix-boot assembles its own).
    Bytes(Vec<u8>),
}

impl Initrd {
    /// How errors name it.
    fn describe(&self) -> String {
        match self {
            Initrd::File(path) => path.display().to_string(),
            Initrd::Bytes(bytes) => format!("(built in memory, {} bytes)", bytes.len()),
        }
    }
}

/// Copies the initrd to the top of low RAM (below the 32-bit MMIO hole), page-aligned,
/// where Linux expects to find it; it must not overlap the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &Initrd,
    kernel_end: u64,
) -> Result<LoadedInitrd, BootError> {
    let name = initrd.describe();
    let read_error = |source| BootError::ReadInitrd {
        initrd: name.clone(),
        source,
    };
    let load_error = |source| BootError::LoadInitrd {
        initrd: name.clone(),
        source,
    };
    let low_ram_end = mem
        .last_addr()
        .raw_value()
        .min(layout::MMIO32_HOLE_START - 1)
        + 1;
    let place = |size: u64| {
        low_ram_end
            .checked_sub(size)
            .map(|a| a & !(PAGE_SIZE - 1))
            .filter(|&a| a >= kernel_end)
            .ok_or_else(|| BootError::InitrdTooBig {
                initrd: name.clone(),
                size,
            })
    };
    match initrd {
        Initrd::File(path) => {
            let mut file = File::open(path).map_err(read_error)?;
            let size = file.metadata().map_err(read_error)?.len();
            let addr = place(size)?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
                .map_err(load_error)?;
            Ok(LoadedInitrd { addr, size })
        }
        Initrd::Bytes(bytes) => {
            let size = bytes.len() as u64;
            let addr = place(size)?;
            mem.write_slice(bytes, GuestAddress(addr))
                .map_err(load_error)?;
            Ok(LoadedInitrd { addr, size })
        }
    }
}

/// Parses and length-checks a command line.
pub fn build_cmdline(text: &str) -> Result<Cmdline, BootError> {
    Cmdline::try_from(text, layout::CMDLINE_MAX_SIZE).map_err(|source| BootError::Cmdline {
        max: layout::CMDLINE_MAX_SIZE,
        source,
    })
}

/// Writes the command line, RNG seed and zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    initrd: Option<LoadedInitrd>,
    cmdline: &Cmdline,
) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(BootError::WriteCmdline)?;
    let cmdline_len = cmdline.as_cstring().map_or(0, |c| c.as_bytes().len());

    let mut params = boot_params::default();
    if let Some(header) = kernel.setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = layout::RSDP_START;

    write_rng_seed(mem)?;
    params.hdr.setup_data = layout::SETUP_DATA_START;

    let e820 = e820_map(mem);
    params.e820_entries = e820.len() as u8;
    params.e820_table[..e820.len()].copy_from_slice(&e820);

    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| BootError::WriteMemory {
            what: "the zero page",
            source,
        })
}

/// A `setup_data` node with fresh host randomness, so the guest's CRNG is initialised
/// at once instead of waiting for entropy.
fn write_rng_seed(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let mut seed = [0u8; RNG_SEED_LEN];
    fill_random(&mut seed).map_err(BootError::RngSeed)?;
    // struct setup_data { u64 next; u32 type; u32 len; u8 data[]; }
    let mut node = Vec::with_capacity(16 + RNG_SEED_LEN);
    node.extend_from_slice(&0u64.to_le_bytes());
    node.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node.extend_from_slice(&(RNG_SEED_LEN as u32).to_le_bytes());
    node.extend_from_slice(&seed);
    debug_assert!(layout::SETUP_DATA_START + node.len() as u64 <= layout::SETUP_DATA_END);
    mem.write_slice(&node, GuestAddress(layout::SETUP_DATA_START))
        .map_err(|source| BootError::WriteMemory {
            what: "the RNG seed",
            source,
        })
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(err);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

/// RAM below the EBDA, the reserved BIOS area up to 1 MiB, then RAM from 1 MiB on
/// (split around the MMIO hole).
fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let entry = |addr, size, type_| boot_e820_entry { addr, size, type_ };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(
            layout::EBDA_START,
            layout::HIMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    let mem_size = mem.iter().map(|r| r.len()).sum::<u64>();
    for (start, size) in layout::ram_ranges(mem_size) {
        let start_above_bios = start.max(layout::HIMEM_START);
        let end = start + size;
        if end > start_above_bios {
            map.push(entry(start_above_bios, end - start_above_bios, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<_> = layout::ram_ranges(size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn e820_covers_ram_and_reserves_bios_area() {
        let mem = memory(256 << 20);
        let map = e820_map(&mem);
        let summary: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.type_)).collect();
        assert_eq!(
            summary,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, (256 << 20) - 0x100000, E820_RAM),
            ]
        );
        assert!(mem.iter().all(|r| r.len() > 0));
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-kernel");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let err = check_kernel_format(&path).unwrap_err();
        assert!(err.to_string().contains("not-a-kernel"), "{err}");
        let err = check_kernel_format(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram_and_must_fit() {
        let mem = memory(64 << 20);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd");
        std::fs::write(&path, vec![0xabu8; 5000]).unwrap();
        let from_file = Initrd::File(path);
        let initrd = load_initrd(&mem, &from_file, 16 << 20).unwrap();
        assert_eq!(initrd.addr % PAGE_SIZE, 0);
        assert!(initrd.addr + initrd.size <= 64 << 20);
        let byte: u8 = mem.read_obj(GuestAddress(initrd.addr + 4999)).unwrap();
        assert_eq!(byte, 0xab);
        assert!(matches!(
            load_initrd(&mem, &from_file, (64 << 20) - 4096),
            Err(BootError::InitrdTooBig { .. })
        ));

        let in_memory = Initrd::Bytes(vec![0xcd; 5000]);
        let initrd = load_initrd(&mem, &in_memory, 16 << 20).unwrap();
        assert_eq!(initrd.size, 5000);
        let byte: u8 = mem.read_obj(GuestAddress(initrd.addr + 4999)).unwrap();
        assert_eq!(byte, 0xcd);
        let err = load_initrd(&mem, &Initrd::File(dir.path().join("gone")), 16 << 20);
        assert!(err.unwrap_err().to_string().contains("gone"));
    }
}
