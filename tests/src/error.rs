//! One error type for the harness. Every variant names the input that failed
//! (a path, a command, a package) so a red test says what to fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "qemu-system-x86_64 not found on PATH: end-to-end tests need it to run the test host \
         (apt-get install qemu-system-x86)"
    )]
    QemuMissing,

    #[error("{what} not found at {path}{hint}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        /// Extra advice, starting with "; " (or empty).
        hint: String,
    },

    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("could not start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}){}", output_tail(.output))]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        /// Its stderr (and stdout where useful), trimmed to the last lines.
        output: String,
    },

    #[error("`{command}` printed nothing usable on stdout: {detail}")]
    BadOutput { command: String, detail: String },

    #[error("{path} is dynamically linked; the test host has no libc, link it statically")]
    NotStatic { path: PathBuf },

    #[error("guest path {path:?} is not absolute or contains `..` or empty components")]
    BadGuestPath { path: String },

    #[error("{path} is larger than a newc cpio entry can hold (4 GiB)")]
    TooLarge { path: PathBuf },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

fn output_tail(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!(":\n{output}")
    }
}

/// The last `n` lines of `text`, for error messages about long build logs.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
