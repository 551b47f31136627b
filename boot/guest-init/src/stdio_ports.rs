//! A program's standard streams on virtio-console ports instead of the console
//! (`tvix.stdio-ports` on the command line; see [`protocol`] for the port names).
//!
//! - stdin is the input port itself: the program reads what the host sends and,
//!   once the host side closes (its input reached end of file), end-of-file.
//! - stdout and stderr are pipes, relayed to the output ports by a thread each
//!   with splice(2) (the driver takes pipe pages without a copy). A pipe rather
//!   than the port itself so that a host side that goes away behaves as it would
//!   locally: the relay sees the port hang up and closes the pipe's read end, and
//!   the program's next write gets SIGPIPE / EPIPE. (A write to a hung-up port
//!   would instead block forever.)
//!
//! When the program has exited, each relay moves what is still in its pipe and
//! stops; descendants that keep the pipe open do not keep the VM alive.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tvix_boot_guest_init::protocol::{
    CONTROL_PORT, HostRequest, STDERR_PORT, STDIN_PORT, STDOUT_PORT, WINSIZE_PORT,
};

use crate::error::InitError;

/// The driver adds ports as the host announces them, after the init may already run.
const PORT_WAIT: Duration = Duration::from_secs(10);
/// Most bytes one splice moves: a whole pipe's worth (16 pages by default, more if the
/// program grew its pipe).
const SPLICE_CHUNK: usize = 1 << 20;

/// The three ports, opened: stdin for the program, the two output ports for the relays.
pub struct Ports {
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

/// Waits (bounded) for the host's stdio ports to appear, then opens them.
pub fn open_ports() -> Result<Ports, InitError> {
    let paths = wait_for_ports(&[STDIN_PORT, STDOUT_PORT, STDERR_PORT])?;
    let open = |path: &PathBuf, options: &mut OpenOptions| {
        options.open(path).map_err(|source| InitError::Ports {
            detail: format!("cannot open {}: {source}", path.display()),
        })
    };
    Ok(Ports {
        stdin: open(&paths[0], OpenOptions::new().read(true))?,
        stdout: open(
            &paths[1],
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK),
        )?,
        stderr: open(
            &paths[2],
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK),
        )?,
    })
}

/// Sets the terminal on `tty` to the size the host sends first on [`WINSIZE_PORT`], then
/// keeps applying the sizes that follow from a thread of its own (each TIOCSWINSZ makes
/// the kernel send SIGWINCH to the terminal's foreground process group).
pub fn follow_window_size(tty: RawFd) -> Result<(), InitError> {
    let path = wait_for_ports(&[WINSIZE_PORT])?.remove(0);
    let port = File::open(&path).map_err(|source| InitError::Ports {
        detail: format!("cannot open {}: {source}", path.display()),
    })?;
    // The host writes the first size before the guest starts; do not wait forever
    // should it not.
    if poll_one(port.as_raw_fd(), libc::POLLIN, Some(PORT_WAIT)).is_none_or(|r| r == 0) {
        return Err(InitError::Ports {
            detail: format!("no terminal size on {WINSIZE_PORT}"),
        });
    }
    let mut lines = io::BufReader::new(port).lines();
    if let Some(Ok(line)) = lines.next() {
        set_window_size(tty, &line);
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            set_window_size(tty, &line);
        }
    });
    Ok(())
}

/// Watches [`CONTROL_PORT`] from a thread of its own and calls `on_request` with each
/// [`HostRequest`] the host sends. Unknown lines are ignored (a newer host may send more).
pub fn follow_control_port(
    on_request: impl Fn(HostRequest) + Send + 'static,
) -> Result<(), InitError> {
    let path = wait_for_ports(&[CONTROL_PORT])?.remove(0);
    let port = File::open(&path).map_err(|source| InitError::Ports {
        detail: format!("cannot open {}: {source}", path.display()),
    })?;
    std::thread::spawn(move || {
        for line in io::BufReader::new(port).lines().map_while(Result::ok) {
            if let Some(request) = HostRequest::parse(&line) {
                on_request(request);
            }
        }
    });
    Ok(())
}

/// Applies a `ROWS COLS` line to the terminal `tty`; anything else is ignored.
fn set_window_size(tty: RawFd, line: &str) {
    let mut numbers = line.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(rows)), Some(Ok(cols)), None) = (numbers.next(), numbers.next(), numbers.next())
    else {
        return;
    };
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize struct from the valid pointer given.
    unsafe { libc::ioctl(tty, libc::TIOCSWINSZ, &size) };
}

/// Waits (bounded) until a port of each name exists; their /dev nodes, in order.
fn wait_for_ports(names: &[&str]) -> Result<Vec<PathBuf>, InitError> {
    let deadline = Instant::now() + PORT_WAIT;
    loop {
        let found = find_ports(names);
        if found.iter().all(Option::is_some) {
            return Ok(found.into_iter().map(Option::unwrap).collect());
        }
        if Instant::now() >= deadline {
            let missing = names
                .iter()
                .zip(&found)
                .filter(|(_, p)| p.is_none())
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ");
            return Err(InitError::Ports {
                detail: format!(
                    "virtio-console port(s) {missing} did not appear within {} s (does the \
                     guest kernel have CONFIG_VIRTIO_CONSOLE, and did the VMM add the device?)",
                    PORT_WAIT.as_secs()
                ),
            });
        }
        // The driver names ports from a work queue; there is nothing to wait on.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The /dev node of each named port that exists yet.
fn find_ports(names: &[&str]) -> Vec<Option<PathBuf>> {
    let mut found = vec![None; names.len()];
    let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(name) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| *n == name.trim_end()) {
            found[i] = Some(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    found
}

/// A pipe: (read end, write end), both close-on-exec (the program gets the write end
/// through its stdio, which clears the flag on that copy).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-element array for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Copies `from` (a pipe's read end) to `to` (an output port opened O_NONBLOCK) until
/// end of file, or, once `finished` is set, until the pipe is empty. Returns early, and
/// closes `from`, when the host side of the port hangs up.
pub fn relay(from: OwnedFd, to: File, finished: Arc<AtomicBool>, wake: Arc<OwnedFd>) {
    set_nonblocking(from.as_raw_fd());
    let mut splice_works = true;
    loop {
        let moved = if splice_works {
            splice(from.as_raw_fd(), to.as_raw_fd())
        } else {
            copy(&from, &to)
        };
        match moved {
            Ok(n) if n > 0 => continue,
            // 0 is not end of file here: the driver's splice returns 0 for an empty pipe.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && splice_works => {
                splice_works = false;
                continue;
            }
            Err(_) => return,
        }
        if bytes_in_pipe(from.as_raw_fd()) > 0 {
            // Data, but the port is full: wait until the host takes some, or hangs up.
            match poll_one(to.as_raw_fd(), libc::POLLOUT, None) {
                Some(revents) if revents & libc::POLLOUT != 0 => continue,
                _ => return, // hung up (or poll failed): the program gets SIGPIPE
            }
        }
        // An empty pipe: finished when no writer is left, or the program is gone.
        let hung_up = poll_one(from.as_raw_fd(), libc::POLLIN, Some(Duration::ZERO))
            .is_none_or(|revents| revents & libc::POLLHUP != 0);
        if hung_up || finished.load(Ordering::Acquire) {
            return;
        }
        poll_two(from.as_raw_fd(), wake.as_raw_fd());
    }
}

fn splice(from: RawFd, to: RawFd) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets mean
    // "the file position", which pipes and character devices ignore.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            SPLICE_CHUNK,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The fallback when the port cannot take spliced pages: one buffer at a time. Bytes
/// read are written out before the next read, waiting for the port as needed.
fn copy(from: &OwnedFd, to: &File) -> io::Result<usize> {
    let mut buf = [0u8; 32 << 10];
    let mut reader = File::from(from.try_clone()?);
    let n = reader.read(&mut buf)?;
    let mut writer = to;
    let mut done = 0;
    while done < n {
        match writer.write(&buf[done..n]) {
            Ok(w) => done += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match poll_one(to.as_raw_fd(), libc::POLLOUT, None) {
                    Some(revents) if revents & libc::POLLOUT != 0 => {}
                    _ => return Err(io::Error::from(io::ErrorKind::BrokenPipe)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

fn bytes_in_pipe(fd: RawFd) -> libc::c_int {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the valid pointer given.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    n
}

/// Polls one descriptor for `events`; the revents, or `None` if poll failed.
fn poll_one(fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> Option<libc::c_short> {
    let mut pollfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let timeout = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: one valid pollfd struct that outlives the call.
        let n = unsafe { libc::poll(&mut pollfd, 1, timeout) };
        if n >= 0 {
            return Some(pollfd.revents);
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return None;
        }
    }
}

/// Waits until `a` or `b` is readable (or hung up).
fn poll_two(a: RawFd, b: RawFd) {
    let mut fds = [a, b].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: a valid array of two pollfd structs that outlives the call. An error
    // (EINTR) just means the caller looks again.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
}
