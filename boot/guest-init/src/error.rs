//! Why the init could not do its job.
//!
//! `Display` is written out by hand instead of derived with thiserror: the
//! init is built a second time by boot/build.rs in a private target dir, and
//! keeping it libc-only keeps that build short (see Cargo.toml).

use std::fmt;
use std::io;

use tvix_boot_guest_init::protocol::ModeError;

#[derive(Debug)]
pub enum InitError {
    /// Creating a directory (a mount point) failed.
    Mkdir { path: String, source: io::Error },
    /// A mount(2) failed; `what` names the file system or operation.
    Mount {
        what: String,
        target: String,
        source: io::Error,
    },
    /// /proc/cmdline could not be read.
    ReadCmdline { source: io::Error },
    /// A key on the command line is unusable.
    Cmdline(ModeError),
    /// The mode needs the store, but mounting it failed (reported already).
    NoStore { mode: &'static str },
    /// A step of switch_root failed.
    SwitchRoot {
        step: &'static str,
        path: String,
        source: io::Error,
    },
    /// exec of the new root's init failed.
    Exec { path: String, source: io::Error },
    /// waitpid failed while waiting for the program.
    Wait { pid: u32, source: io::Error },
    /// fork of the process that runs the program failed.
    Fork { source: io::Error },
    /// The program's stdio ports are missing or cannot be opened.
    Ports { detail: String },
    /// The network the host asked for (`tvix.net`) could not be set up.
    Network { detail: String },
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Mkdir { path, source } => write!(f, "cannot create {path}: {source}"),
            InitError::Mount {
                what,
                target,
                source,
            } => write!(f, "cannot mount {what} at {target}: {source}"),
            InitError::ReadCmdline { source } => write!(f, "cannot read /proc/cmdline: {source}"),
            InitError::Cmdline(e) => write!(f, "bad kernel command line: {e}"),
            InitError::NoStore { mode } => {
                write!(
                    f,
                    "{mode} needs /nix/store, which is not mounted (see above)"
                )
            }
            InitError::SwitchRoot { step, path, source } => {
                write!(f, "switch_root: {step} {path}: {source}")
            }
            InitError::Exec { path, source } => write!(f, "cannot exec {path}: {source}"),
            InitError::Wait { pid, source } => write!(f, "waiting for pid {pid}: {source}"),
            InitError::Fork { source } => write!(f, "cannot fork to run the program: {source}"),
            InitError::Ports { detail } => write!(f, "program stdio: {detail}"),
            InitError::Network { detail } => write!(f, "network: {detail}"),
        }
    }
}

impl std::error::Error for InitError {}
