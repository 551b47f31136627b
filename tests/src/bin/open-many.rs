//! A guest program for the bounded-resources test: it holds one file open many times,
//! then walks a tree repeatedly, reading every file. Between steps it prints what it did
//! on stdout and waits for a line on stdin, so the host can measure the VMM meanwhile.
//!
//!     open-many FILE COUNT DIR WALKS
//!
//! Lines: `held COUNT`, then per walk `walked N files, D directories`, then `done`.
//! After each walk the guest's caches are dropped (as root), so the kernel FORGETs the
//! walk's inodes and the next walk looks them up again.

use std::fs::{self, File};
use std::io::{self, BufRead, Read, Write};
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("open-many: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, count, dir, walks] = args.as_slice() else {
        return Err("usage: open-many FILE COUNT DIR WALKS".into());
    };
    let count: usize = count.parse().map_err(|e| format!("COUNT {count:?}: {e}"))?;
    let walks: usize = walks.parse().map_err(|e| format!("WALKS {walks:?}: {e}"))?;
    raise_open_file_limit(count as u64 + 64)?;

    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        held.push(File::open(file).map_err(|e| format!("open {file} #{}: {e}", i + 1))?);
    }
    report_and_wait(&format!("held {count}"))?;
    drop(held);

    for _ in 0..walks {
        let (mut files, mut dirs) = (0, 0);
        walk_tree(Path::new(dir), &mut files, &mut dirs)?;
        report_and_wait(&format!("walked {files} files, {dirs} directories"))?;
        drop_caches()?;
    }
    println!("done");
    Ok(())
}

/// The kernel evicts unused dentries and inodes, and FORGETs them to the file system.
fn drop_caches() -> Result<(), String> {
    fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| format!("cannot drop the caches: {e}"))
}

fn raise_open_file_limit(limit: u64) -> Result<(), String> {
    let rlimit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: setrlimit reads one valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) } != 0 {
        return Err(format!(
            "cannot raise the open file limit to {limit}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn report_and_wait(line: &str) -> Result<(), String> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))?;
    let mut answer = String::new();
    io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| format!("stdin: {e}"))?;
    Ok(())
}

fn walk_tree(dir: &Path, files: &mut usize, dirs: &mut usize) -> Result<(), String> {
    *dirs += 1;
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut buf = [0u8; 64 << 10];
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if kind.is_dir() {
            walk_tree(&path, files, dirs)?;
        } else if kind.is_file() {
            let mut file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            while file
                .read(&mut buf)
                .map_err(|e| format!("{}: {e}", path.display()))?
                > 0
            {}
            *files += 1;
        }
    }
    Ok(())
}
