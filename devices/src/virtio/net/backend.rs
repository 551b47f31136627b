//! Where a virtio-net device's frames go on the host: a stream socket that carries each
//! frame after a 4-byte big-endian length (the protocol of QEMU's `-netdev stream` and
//! of passt), or a tap device, which takes and gives one frame per write and read.
//!
//! Both are non-blocking and served from the VM's event loop. Memory is bounded: at most
//! one frame in each direction waits here (a stream's read buffer holds one frame and
//! the start of the next).

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::event_loop::set_nonblocking;

/// Largest frame either side may send: 64 KiB of payload (passt's MTU is 65,520) plus
/// link-layer headers with room to spare. A stream that announces more is broken.
pub const MAX_FRAME_LEN: usize = (64 << 10) + 256;

/// Smallest frame worth passing on: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// Length prefix of the stream protocol.
const PREFIX_LEN: usize = 4;

/// Why the host side of the network stopped working. Once it has, the device reports
/// the link as down and drops what the guest sends.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The other end closed the stream (passt exited, say).
    #[error("the network backend closed its end")]
    Closed,
    /// Reading or writing failed.
    #[error("network backend I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A stream frame's length prefix is out of bounds: the two ends disagree on the
    /// protocol.
    #[error("the network backend sent a frame of {0} bytes (at most {MAX_FRAME_LEN})")]
    FrameTooLong(usize),
    /// The tap device could not be opened or attached.
    #[error("cannot open tap device {name:?}: {source}")]
    Tap {
        /// The interface name given.
        name: String,
        /// Why.
        source: io::Error,
    },
}

/// The host end of a virtio-net device. See the module documentation.
pub struct Backend {
    kind: Kind,
    file: File,
    /// Bytes read and not yet taken as frames (a stream); one whole frame (a tap).
    read_buf: Box<[u8]>,
    read_len: usize,
    /// A frame (with its prefix, for a stream) the socket did not take whole yet.
    write_buf: Vec<u8>,
    write_pos: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// 4-byte big-endian length, then the frame.
    Stream,
    /// One frame per read and write.
    Tap,
}

impl Backend {
    /// Frames over a connected stream socket, length-prefixed (passt's `--fd`, QEMU's
    /// `-netdev stream`). The socket is made non-blocking.
    pub fn stream(socket: OwnedFd) -> Result<Self, BackendError> {
        Self::new(Kind::Stream, File::from(socket))
    }

    /// The existing tap device `name` (no packet-information header, no virtio-net
    /// header: plain Ethernet frames).
    pub fn tap(name: &str) -> Result<Self, BackendError> {
        let tap = open_tap(name).map_err(|source| BackendError::Tap {
            name: name.to_owned(),
            source,
        })?;
        Self::new(Kind::Tap, tap)
    }

    fn new(kind: Kind, file: File) -> Result<Self, BackendError> {
        set_nonblocking(&file)?;
        let capacity = match kind {
            // Room for a whole frame after a partial one: each read can then bring at
            // least one frame.
            Kind::Stream => 2 * (PREFIX_LEN + MAX_FRAME_LEN),
            Kind::Tap => MAX_FRAME_LEN,
        };
        Ok(Self {
            kind,
            file,
            read_buf: vec![0; capacity].into_boxed_slice(),
            read_len: 0,
            write_buf: Vec::new(),
            write_pos: 0,
        })
    }

    /// A second descriptor for the same socket or tap, so that readiness to read and to
    /// write can be watched separately (epoll knows each descriptor once).
    pub fn try_clone_fd(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// The next frame from the host, without taking it ([`Self::consume_frame`] does);
    /// `None` when none has arrived whole yet.
    pub fn peek_frame(&mut self) -> Result<Option<&[u8]>, BackendError> {
        match self.kind {
            Kind::Stream => {
                if self.complete_stream_frame()?.is_none() {
                    self.fill()?;
                }
                Ok(self
                    .complete_stream_frame()?
                    .map(|len| &self.read_buf[PREFIX_LEN..PREFIX_LEN + len]))
            }
            Kind::Tap => {
                if self.read_len == 0 {
                    match self.file.read(&mut self.read_buf) {
                        Ok(0) => return Err(BackendError::Closed),
                        Ok(n) => self.read_len = n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(Some(&self.read_buf[..self.read_len]))
            }
        }
    }

    /// Drops the frame [`Self::peek_frame`] gave.
    pub fn consume_frame(&mut self) {
        match self.kind {
            Kind::Stream => {
                let Ok(Some(len)) = self.complete_stream_frame() else {
                    return;
                };
                let end = PREFIX_LEN + len;
                self.read_buf.copy_within(end..self.read_len, 0);
                self.read_len -= end;
            }
            Kind::Tap => self.read_len = 0,
        }
    }

    /// The length of the whole frame at the start of the read buffer, if there is one.
    fn complete_stream_frame(&self) -> Result<Option<usize>, BackendError> {
        if self.read_len < PREFIX_LEN {
            return Ok(None);
        }
        let prefix: [u8; PREFIX_LEN] = self.read_buf[..PREFIX_LEN].try_into().expect("4 bytes");
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_FRAME_LEN {
            return Err(BackendError::FrameTooLong(len));
        }
        Ok((self.read_len >= PREFIX_LEN + len).then_some(len))
    }

    /// Reads what the stream has, as far as the buffer goes.
    fn fill(&mut self) -> Result<(), BackendError> {
        while self.read_len < self.read_buf.len() {
            match self.file.read(&mut self.read_buf[self.read_len..]) {
                Ok(0) => return Err(BackendError::Closed),
                Ok(n) => {
                    self.read_len += n;
                    if self.complete_stream_frame()?.is_some() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Writes out what an earlier [`Self::send_frame`] left; true when nothing waits.
    pub fn flush(&mut self) -> Result<bool, BackendError> {
        while self.write_pos < self.write_buf.len() {
            match self.file.write(&self.write_buf[self.write_pos..]) {
                Ok(0) => return Err(BackendError::Closed),
                Ok(n) => self.write_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.write_buf.clear();
        self.write_pos = 0;
        Ok(true)
    }

    /// Whether a frame waits to be written out (then [`Self::send_frame`] must not be
    /// called before [`Self::flush`] says it is out).
    pub fn has_pending_write(&self) -> bool {
        self.write_pos < self.write_buf.len()
    }

    /// Sends `frame` (at most [`MAX_FRAME_LEN`] bytes), or keeps what the host does not
    /// take now for [`Self::flush`]. Call only when nothing is pending.
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<(), BackendError> {
        debug_assert!(!self.has_pending_write());
        debug_assert!(frame.len() <= MAX_FRAME_LEN);
        match self.kind {
            Kind::Stream => {
                let prefix = (frame.len() as u32).to_be_bytes();
                let total = PREFIX_LEN + frame.len();
                let written = loop {
                    match self
                        .file
                        .write_vectored(&[IoSlice::new(&prefix), IoSlice::new(frame)])
                    {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 0,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                };
                if written < total {
                    self.write_buf.extend_from_slice(&prefix);
                    self.write_buf.extend_from_slice(frame);
                    self.write_pos = written;
                }
            }
            Kind::Tap => loop {
                match self.file.write(frame) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.write_buf.extend_from_slice(frame);
                        self.write_pos = 0;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            },
        }
        Ok(())
    }
}

impl AsRawFd for Backend {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Opens /dev/net/tun and attaches it to the tap device `name` (which must exist, or
/// the caller must be allowed to create it).
fn open_tap(name: &str) -> io::Result<File> {
    // struct ifreq: the name, then a union whose first member here is the flags.
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        flags: libc::c_short,
        _rest: [u8; 22],
    }
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not an interface name (1 to {} bytes)", libc::IFNAMSIZ - 1),
        ));
    }
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut request = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _rest: [0; 22],
    };
    for (dst, src) in request.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `request` is laid out as
    // (40 bytes), and it lives for the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tun)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    fn pair() -> (Backend, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (Backend::stream(OwnedFd::from(ours)).unwrap(), theirs)
    }

    #[test]
    fn stream_frames_arrive_whole_across_partial_reads() {
        let (mut backend, mut peer) = pair();
        assert!(backend.peek_frame().unwrap().is_none());
        peer.write_all(&[0, 0, 0, 3, b'a']).unwrap();
        assert!(backend.peek_frame().unwrap().is_none(), "a partial frame");
        peer.write_all(b"bc\0\0\0\x02de").unwrap();
        assert_eq!(backend.peek_frame().unwrap(), Some(&b"abc"[..]));
        assert_eq!(
            backend.peek_frame().unwrap(),
            Some(&b"abc"[..]),
            "not taken yet"
        );
        backend.consume_frame();
        assert_eq!(backend.peek_frame().unwrap(), Some(&b"de"[..]));
        backend.consume_frame();
        assert!(backend.peek_frame().unwrap().is_none());
    }

    #[test]
    fn a_frame_announced_too_long_breaks_the_stream() {
        let (mut backend, mut peer) = pair();
        peer.write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
            .unwrap();
        assert!(matches!(
            backend.peek_frame(),
            Err(BackendError::FrameTooLong(_))
        ));
    }

    #[test]
    fn a_closed_peer_is_reported() {
        let (mut backend, peer) = pair();
        drop(peer);
        assert!(matches!(backend.peek_frame(), Err(BackendError::Closed)));
    }

    #[test]
    fn sends_are_prefixed_and_a_full_socket_keeps_one_frame() {
        let (mut backend, mut peer) = pair();
        backend.send_frame(b"hello").unwrap();
        let mut got = [0u8; 9];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\0\0\0\x05hello");

        // Fill the socket until a frame is left pending, then drain and flush.
        let frame = vec![7u8; MAX_FRAME_LEN];
        let mut sent = 0;
        while !backend.has_pending_write() {
            backend.send_frame(&frame).unwrap();
            sent += 1;
        }
        assert!(!backend.flush().unwrap(), "the peer reads nothing yet");
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        });
        while !backend.flush().unwrap() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(backend);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), sent * (PREFIX_LEN + MAX_FRAME_LEN));
        for chunk in all.chunks(PREFIX_LEN + MAX_FRAME_LEN) {
            assert_eq!(&chunk[..4], &(MAX_FRAME_LEN as u32).to_be_bytes());
            assert!(chunk[4..].iter().all(|&b| b == 7));
        }
    }

    #[test]
    fn tap_names_are_checked() {
        for name in ["", "a/b", "a\0b", "sixteen-letters!"] {
            assert!(matches!(Backend::tap(name), Err(BackendError::Tap { .. })));
        }
    }
}
