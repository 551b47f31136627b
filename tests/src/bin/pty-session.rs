//! Drives a program on a pseudo-terminal, as a user at a terminal would, for the
//! interactive end-to-end tests (the test host has no `script` or `expect`).
//!
//!     pty-session ROWS COLS STEP... -- PROGRAM [ARGS...]
//!
//! Opens a pty of ROWS x COLS, starts PROGRAM in a new session with the pty as its
//! controlling terminal and stdio, then runs the steps in order against the pty:
//!
//! - `send:TEXT`: types TEXT (`\n`, `\r`, `\xHH` escapes);
//! - `expect:TEXT`: waits (at most 120 s) until the output since the last `expect`
//!   contains TEXT;
//! - `sleep:SECONDS`;
//! - `resize:ROWS,COLS`: resizes the pty (the kernel signals SIGWINCH to the program);
//! - `kill:SIGNAL`: sends SIGTERM, SIGINT or SIGHUP to the program.
//!
//! Then waits for the program to exit and prints everything it wrote to the terminal,
//! and these lines: `pty-status=N` (exit code, or 128 + signal),
//! `pty-termios-same=yes|no` (the terminal's settings after equal those before).

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const EXPECT_TIMEOUT: Duration = Duration::from_secs(120);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pty-session: {e}");
            ExitCode::FAILURE
        }
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args
        .iter()
        .position(|a| a == "--")
        .ok_or("usage: pty-session ROWS COLS STEP... -- PROGRAM [ARGS...]")?;
    let (head, program) = (&args[..split], &args[split + 1..]);
    if head.len() < 2 || program.is_empty() {
        return Err("usage: pty-session ROWS COLS STEP... -- PROGRAM [ARGS...]".into());
    }
    let rows: u16 = head[0].parse().map_err(|_| "ROWS is not a number")?;
    let cols: u16 = head[1].parse().map_err(|_| "COLS is not a number")?;

    let (master, slave) = open_pty(rows, cols)?;
    let before = termios(slave.as_raw_fd())?;
    let pid = spawn_on(&slave, program)?;

    let mut transcript = Vec::new();
    let mut since_expect = 0;
    for step in &head[2..] {
        let (kind, arg) = step.split_once(':').ok_or(format!("bad step {step:?}"))?;
        match kind {
            "send" => {
                let bytes = unescape(arg);
                let mut file = std::fs::File::from(master.try_clone().map_err(|e| e.to_string())?);
                file.write_all(&bytes).map_err(|e| format!("typing: {e}"))?;
            }
            "expect" => {
                let deadline = Instant::now() + EXPECT_TIMEOUT;
                loop {
                    if find(&transcript[since_expect..], arg.as_bytes()).is_some() {
                        since_expect = transcript.len();
                        break;
                    }
                    if Instant::now() >= deadline {
                        io::stdout().write_all(&transcript).ok();
                        return Err(format!("timed out waiting for {arg:?}"));
                    }
                    read_some(&master, &mut transcript, Duration::from_millis(200));
                }
            }
            "sleep" => {
                let seconds: f64 = arg.parse().map_err(|_| format!("bad step {step:?}"))?;
                let until = Instant::now() + Duration::from_secs_f64(seconds);
                while Instant::now() < until {
                    read_some(&master, &mut transcript, until - Instant::now());
                }
            }
            "resize" => {
                let (r, c) = arg.split_once(',').ok_or(format!("bad step {step:?}"))?;
                let size = winsize(
                    r.parse().map_err(|_| "bad rows")?,
                    c.parse().map_err(|_| "bad cols")?,
                );
                // SAFETY: TIOCSWINSZ reads one winsize struct from the valid pointer.
                if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
                    return Err(os_err("TIOCSWINSZ"));
                }
            }
            "kill" => {
                let signal = match arg {
                    "TERM" => libc::SIGTERM,
                    "INT" => libc::SIGINT,
                    "HUP" => libc::SIGHUP,
                    _ => return Err(format!("bad step {step:?}")),
                };
                // SAFETY: kill only sends a signal to the child we started.
                unsafe { libc::kill(pid, signal) };
            }
            _ => return Err(format!("bad step {step:?}")),
        }
    }

    // Read until the program exits (and the pty drains).
    let status = loop {
        read_some(&master, &mut transcript, Duration::from_millis(100));
        let mut raw = 0;
        // SAFETY: waitpid on our own child, writing to a valid int.
        let n = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
        if n == pid {
            break if libc::WIFEXITED(raw) {
                libc::WEXITSTATUS(raw)
            } else {
                128 + libc::WTERMSIG(raw)
            };
        }
        if n < 0 {
            return Err(os_err("waitpid"));
        }
    };
    read_some(&master, &mut transcript, Duration::from_millis(300));
    let after = termios(slave.as_raw_fd())?;

    let mut out = io::stdout().lock();
    out.write_all(&transcript).ok();
    writeln!(out, "\npty-status={status}").ok();
    writeln!(
        out,
        "pty-termios-same={}",
        if same_termios(&before, &after) {
            "yes"
        } else {
            "no"
        }
    )
    .ok();
    Ok(())
}

fn winsize(rows: u16, cols: u16) -> libc::winsize {
    libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn open_pty(rows: u16, cols: u16) -> Result<(OwnedFd, OwnedFd), String> {
    let (mut master, mut slave) = (0, 0);
    let size = winsize(rows, cols);
    // SAFETY: openpty fills two ints; the name and termios pointers may be null, the
    // winsize pointer is valid.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if rc != 0 {
        return Err(os_err("openpty"));
    }
    // SAFETY: openpty returned two fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) })
}

fn termios(fd: RawFd) -> Result<libc::termios, String> {
    // SAFETY: termios is plain old data; all-zero is valid to overwrite.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to fill.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(os_err("tcgetattr"));
    }
    Ok(t)
}

fn same_termios(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

/// Starts `program` in a new session whose controlling terminal and stdio are `slave`.
fn spawn_on(slave: &OwnedFd, program: &[String]) -> Result<libc::pid_t, String> {
    let argv: Vec<CString> = program
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| "NUL in an argument".to_owned()))
        .collect::<Result<_, _>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let fd = slave.as_raw_fd();
    // SAFETY: single-threaded here; the child only calls async-signal-safe functions
    // (setsid, ioctl, dup2, execvp, _exit) on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork"));
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            libc::setsid();
            libc::ioctl(fd, libc::TIOCSCTTY, 0);
            for target in 0..3 {
                libc::dup2(fd, target);
            }
            libc::execvp(argv_ptrs[0], argv_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    Ok(pid)
}

/// Appends what the master has to read within `timeout` (nothing if it has nothing).
fn read_some(master: &OwnedFd, transcript: &mut Vec<u8>, timeout: Duration) {
    let mut pollfd = libc::pollfd {
        fd: master.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd struct.
    if unsafe { libc::poll(&mut pollfd, 1, ms) } <= 0 || pollfd.revents & libc::POLLIN == 0 {
        return;
    }
    let mut buf = [0u8; 65536];
    // SAFETY: reading into a valid buffer of the given length.
    let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n > 0 {
        transcript.extend_from_slice(&buf[..n as usize]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `\n`, `\r`, `\\`, `\xHH`.
fn unescape(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 1 < bytes.len() {
            match bytes[i + 1] {
                b'n' => {
                    out.push(b'\n');
                    i += 2;
                    continue;
                }
                b'r' => {
                    out.push(b'\r');
                    i += 2;
                    continue;
                }
                b'\\' => {
                    out.push(b'\\');
                    i += 2;
                    continue;
                }
                b'x' if i + 3 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).ok();
                    if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                        out.push(v);
                        i += 4;
                        continue;
                    }
                }
                _ => {}
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}
