//! The virtio-console ports between the host and tvix-boot's init: the program's own
//! stdin, stdout and stderr, the terminal's size, and the control port the host sends
//! requests on. Each port the guest gets comes with the command-line key that tells
//! the init to use it.

use std::fs::File;
use std::os::fd::{BorrowedFd, OwnedFd};

use tvix_boot_devices::event_loop::set_nonblocking;
use tvix_boot_devices::virtio::console::{PortEnd, PortSpec, VirtioConsole};
use tvix_boot_guest_init::protocol::{
    CONTROL_PORT, KEY_CONTROL_PORT, KEY_STDIO_PORTS, KEY_WINSIZE_PORT, STDERR_PORT, STDIN_PORT,
    STDOUT_PORT, WINSIZE_PORT,
};

use super::MicroVmError;
use crate::guest_mode::GuestCmdline;
use crate::host_signals::TerminalSizes;

/// One of the program's streams (`run` with separate streams), like
/// [`std::process::Stdio`].
#[derive(Debug, Default)]
pub enum Stdio {
    /// This process's own descriptor (0, 1 or 2).
    #[default]
    Inherit,
    /// A pipe; the other end is in [`RunningVm`](super::RunningVm)'s `stdin`, `stdout`
    /// or `stderr`.
    Piped,
    /// Nothing: end of file for stdin, discarded output.
    Null,
    /// This descriptor (a file, a socket, one end of a pipe).
    Fd(OwnedFd),
}

impl From<File> for Stdio {
    fn from(file: File) -> Self {
        Stdio::Fd(file.into())
    }
}

impl From<OwnedFd> for Stdio {
    fn from(fd: OwnedFd) -> Self {
        Stdio::Fd(fd)
    }
}

/// The ports a guest gets, as they are added, and the host's ends the caller keeps.
#[derive(Default)]
pub(super) struct Ports {
    specs: Vec<PortSpec>,
    /// The program's ends of its piped streams, for [`RunningVm`](super::RunningVm).
    pub(super) stdin: Option<File>,
    pub(super) stdout: Option<File>,
    pub(super) stderr: Option<File>,
    /// Our end of the control port.
    pub(super) control: Option<File>,
}

impl Ports {
    /// The program's stdin, stdout and stderr as three one-way ports.
    pub(super) fn add_program_streams(
        &mut self,
        cmdline: &mut GuestCmdline,
        [stdin, stdout, stderr]: [Stdio; 3],
    ) -> Result<(), MicroVmError> {
        let stdin = stream_end(stdin, 0, false)?;
        let stdout = stream_end(stdout, 1, true)?;
        let stderr = stream_end(stderr, 2, true)?;
        self.stdin = stdin.ours;
        self.stdout = stdout.ours;
        self.stderr = stderr.ours;
        self.add(STDIN_PORT, PortEnd::Input(stdin.guests));
        self.add(STDOUT_PORT, PortEnd::Output(stdout.guests));
        self.add(STDERR_PORT, PortEnd::Output(stderr.guests));
        cmdline.push_flag(KEY_STDIO_PORTS);
        Ok(())
    }

    /// `ROWS COLS` lines from `sizes` set the guest console's size.
    pub(super) fn add_terminal_sizes(&mut self, cmdline: &mut GuestCmdline, sizes: OwnedFd) {
        self.add(WINSIZE_PORT, PortEnd::Input(sizes));
        cmdline.push_flag(KEY_WINSIZE_PORT);
    }

    /// The terminal's sizes, followed on SIGWINCH: the port's end, and what feeds it.
    /// `None` when stdin is not a terminal.
    pub(super) fn follow_terminal_size(
        &mut self,
        cmdline: &mut GuestCmdline,
    ) -> Result<Option<TerminalSizes>, MicroVmError> {
        let Some((port_end, sizes)) = TerminalSizes::start().map_err(MicroVmError::Stdio)? else {
            return Ok(None);
        };
        self.add_terminal_sizes(cmdline, port_end);
        Ok(Some(sizes))
    }

    /// The port the host sends requests on (stop, signals).
    pub(super) fn add_control(&mut self, cmdline: &mut GuestCmdline) -> Result<(), MicroVmError> {
        let (guests, ours) = nonblocking_pipe().map_err(MicroVmError::Stdio)?;
        self.add(CONTROL_PORT, PortEnd::Input(guests));
        self.control = Some(ours);
        cmdline.push_flag(KEY_CONTROL_PORT);
        Ok(())
    }

    /// The virtio-console device with the ports, if there are any.
    pub(super) fn device(&mut self) -> Result<Option<VirtioConsole>, MicroVmError> {
        if self.specs.is_empty() {
            return Ok(None);
        }
        let specs = std::mem::take(&mut self.specs);
        VirtioConsole::new(specs)
            .map(Some)
            .map_err(MicroVmError::Console)
    }

    fn add(&mut self, name: &str, end: PortEnd) {
        self.specs
            .push(PortSpec::new(name, end).expect("tvix-boot's port names are valid"));
    }
}

/// One stream: the guest's descriptor (for the port), and ours when piped.
struct StreamEnd {
    guests: OwnedFd,
    ours: Option<File>,
}

/// The descriptor for a port, from `stdio` (`fd` is this process's 0, 1 or 2).
fn stream_end(stdio: Stdio, fd: i32, output: bool) -> Result<StreamEnd, MicroVmError> {
    let err = MicroVmError::Stdio;
    let guests = match stdio {
        Stdio::Fd(fd) => fd,
        Stdio::Null => null(output).map_err(err)?,
        Stdio::Inherit => match dup_own(fd).map_err(err)? {
            Some(fd) => fd,
            None => null(output).map_err(err)?,
        },
        Stdio::Piped => {
            let (reader, writer) = std::io::pipe().map_err(err)?;
            let (guests, ours): (OwnedFd, OwnedFd) = if output {
                (writer.into(), reader.into())
            } else {
                (reader.into(), writer.into())
            };
            return Ok(StreamEnd {
                guests,
                ours: Some(File::from(ours)),
            });
        }
    };
    Ok(StreamEnd { guests, ours: None })
}

/// A duplicate of this process's descriptor `fd` (0, 1 or 2); `None` if it is closed.
pub(super) fn dup_own(fd: i32) -> std::io::Result<Option<OwnedFd>> {
    // SAFETY: 0, 1 and 2 stay open for the process's life, or are closed; a closed one
    // is reported by the duplication as EBADF.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    match borrowed.try_clone_to_owned() {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(None),
        Err(e) => Err(e),
    }
}

fn null(writable: bool) -> std::io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(!writable)
        .write(writable)
        .open("/dev/null")?
        .into())
}

/// (read end for the guest, non-blocking write end for us), both close-on-exec.
pub(crate) fn nonblocking_pipe() -> std::io::Result<(OwnedFd, File)> {
    let (reader, writer) = std::io::pipe()?;
    let writer = File::from(OwnedFd::from(writer));
    set_nonblocking(&writer)?;
    Ok((reader.into(), writer))
}
