//! The guest's serial console as a log, when the program's streams go over their own
//! ports: written to `--console-log FILE` and, with `--verbose`, to stderr, and its last
//! lines kept in memory so a guest that panics or whose init fails can be diagnosed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// How much of the console's end is kept for error reports.
const TAIL_BYTES: usize = 16 << 10;
/// How many lines of it an error report shows.
pub const TAIL_LINES: usize = 20;

/// The last bytes the console wrote, shared between the writer and the CLI.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleTail {
    /// The last `lines` complete or partial lines, `\r` removed.
    pub fn last_lines(&self, lines: usize) -> Vec<String> {
        let bytes: Vec<u8> = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .filter(|&b| b != b'\r')
            .collect();
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| (*l).to_owned())
            .collect()
    }

    fn push(&self, bytes: &[u8]) {
        let mut tail = self.0.lock().unwrap_or_else(|e| e.into_inner());
        tail.extend(bytes);
        let excess = tail.len().saturating_sub(TAIL_BYTES);
        tail.drain(..excess);
    }
}

/// A `Write` for the VMM's serial console: into the tail, the log file, and stderr.
pub struct ConsoleLog {
    tail: ConsoleTail,
    file: Option<File>,
    to_stderr: bool,
}

impl ConsoleLog {
    pub fn new(file: Option<File>, to_stderr: bool) -> (Self, ConsoleTail) {
        let tail = ConsoleTail::default();
        (
            Self {
                tail: tail.clone(),
                file,
                to_stderr,
            },
            tail,
        )
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.push(buf);
        if let Some(file) = &mut self.file
            && let Err(e) = file.write_all(buf)
        {
            // A full disk must not stop the guest; say it once and stop logging.
            eprintln!("tvix-boot: cannot write the console log: {e}; no longer logging");
            self.file = None;
        }
        if self.to_stderr {
            let _ = io::stderr().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(file) = &mut self.file {
            let _ = file.flush();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_without_carriage_returns() {
        let (mut log, tail) = ConsoleLog::new(None, false);
        for i in 0..5000 {
            write!(log, "line {i}\r\n").unwrap();
        }
        write!(log, "partial").unwrap();
        assert_eq!(
            tail.last_lines(3),
            vec!["line 4998", "line 4999", "partial"]
        );
    }

    #[test]
    fn writes_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (mut log, _) = ConsoleLog::new(Some(File::create(&path).unwrap()), false);
        log.write_all(b"[    0.1] booting\r\n").unwrap();
        log.flush().unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"[    0.1] booting\r\n".to_vec()
        );
    }
}
