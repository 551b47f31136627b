//! Lets fuse-backend-rs copy blob bytes into the reply buffers — guest memory for
//! virtio-fs. A blob whose every byte was checked is read straight into them, with no
//! buffer of ours in between. One that is still being checked (a large blob whose
//! whole-blob hash has not finished) is read into a host buffer, checked range by range,
//! and only then copied: whatever lands in guest memory is served, even if the reply
//! then says error.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;

use fuse_backend_rs::file_buf::FileVolatileSlice;
use fuse_backend_rs::file_traits::FileReadWriteVolatile;
use tvix_boot_castore::blobservice::BlobReader;

/// Most iovecs one preadv takes (Linux's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
/// Most bytes one checked read goes through the host buffer with; the rest of a longer
/// request is asked for again (FUSE reads are at most 1 MiB anyway). A guest's descriptor
/// lengths never size the buffer.
const MAX_CHECKED_READ: usize = 1 << 20;

thread_local! {
    /// The host buffer of checked reads, one per queue thread, kept between reads.
    static CHECKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub(crate) struct BlobSource<'a>(pub &'a dyn BlobReader);

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

impl FileReadWriteVolatile for BlobSource<'_> {
    fn read_volatile(&mut self, _slice: FileVolatileSlice) -> io::Result<usize> {
        // Replies always read at an explicit offset.
        Err(io::Error::from_raw_os_error(libc::ESPIPE))
    }

    fn write_volatile(&mut self, _slice: FileVolatileSlice) -> io::Result<usize> {
        Err(read_only())
    }

    fn read_at_volatile(&mut self, slice: FileVolatileSlice, offset: u64) -> io::Result<usize> {
        self.read_vectored_at_volatile(&[slice], offset)
    }

    fn read_vectored_at_volatile(
        &mut self,
        bufs: &[FileVolatileSlice],
        offset: u64,
    ) -> io::Result<usize> {
        let blob = self.0;
        if offset >= blob.size() {
            return Ok(0);
        }
        if let Some(file) = blob.local_file() {
            let iovecs: Vec<libc::iovec> = bufs
                .iter()
                .take(MAX_IOVECS)
                .map(|b| libc::iovec {
                    iov_base: b.as_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            let offset = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: each iovec describes a FileVolatileSlice, memory the caller guarantees
            // valid and writable for its length for the duration of this call; the kernel
            // writes at most that many bytes into each.
            let n = unsafe {
                libc::preadv(
                    file.as_raw_fd(),
                    iovecs.as_ptr(),
                    iovecs.len() as libc::c_int,
                    offset,
                )
            };
            return if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            };
        }
        let Some(bytes) = blob.as_bytes() else {
            return checked_read(blob, bufs, offset);
        };
        let mut position = offset as usize;
        let mut copied = 0;
        for buf in bufs {
            if position >= bytes.len() {
                break;
            }
            let n = buf.len().min(bytes.len() - position);
            buf.as_volatile_slice()
                .copy_from(&bytes[position..position + n]);
            position += n;
            copied += n;
        }
        Ok(copied)
    }

    fn write_at_volatile(&mut self, _slice: FileVolatileSlice, _offset: u64) -> io::Result<usize> {
        Err(read_only())
    }
}

/// Reads through `BlobReader::read_at`, which returns only checked bytes, into the host
/// buffer, and copies them into `bufs` once it returned them.
fn checked_read(
    blob: &dyn BlobReader,
    bufs: &[FileVolatileSlice],
    offset: u64,
) -> io::Result<usize> {
    let wanted = bufs
        .iter()
        .fold(0usize, |total, b| total.saturating_add(b.len()))
        .min(MAX_CHECKED_READ);
    CHECKED.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if buffer.len() < wanted {
            buffer.resize(wanted, 0);
        }
        let got = blob.read_at(&mut buffer[..wanted], offset).map_err(|e| {
            if e.raw_os_error().is_some() {
                return e;
            }
            // A range that failed its check (or a blob found corrupt): EIO, as for any
            // unreadable file; the log says which bytes.
            tracing::warn!(offset, error = %e, "blob read failed");
            io::Error::from_raw_os_error(libc::EIO)
        })?;
        let mut copied = 0;
        for buf in bufs {
            if copied == got {
                break;
            }
            let n = buf.len().min(got - copied);
            buf.as_volatile_slice()
                .copy_from(&buffer[copied..copied + n]);
            copied += n;
        }
        Ok(copied)
    })
}
