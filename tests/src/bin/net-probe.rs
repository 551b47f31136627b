//! TCP throughput and connect time, for the network benchmark: the same static program
//! in tvix-boot's guest, in QEMU's guest and in the test host, so every contender is
//! measured by the same code (busybox's nc stops reading its input early).
//!
//! ```text
//! net-probe sink PORT                 accept forever; read each connection to its end
//! net-probe source PORT BYTES         accept forever; write BYTES to each, then close
//! net-probe send HOST:PORT BYTES      connect, write BYTES, wait for the peer's close
//! net-probe recv HOST:PORT            connect, read to the end
//! net-probe connect HOST:PORT COUNT   COUNT connections one after another
//! ```
//!
//! The client commands print one line, `net-probe KIND bytes=N seconds=S` (for
//! `connect`: `count=N seconds=S`), timed with the local clock.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: net-probe sink PORT | source PORT BYTES | send HOST:PORT BYTES | \
                     recv HOST:PORT | connect HOST:PORT COUNT";
const CHUNK: usize = 256 << 10;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["sink", port] => number(port).and_then(|port| serve(port, None)),
        ["source", port, bytes] => number(port).and_then(|port| serve(port, Some(number(bytes)?))),
        ["send", address, bytes] => number(bytes).and_then(|bytes| send(address, bytes)),
        ["recv", address] => recv(address),
        ["connect", address, count] => number(count).and_then(|count| connect(address, count)),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, USAGE)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("net-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn number<T: std::str::FromStr>(text: &str) -> io::Result<T> {
    text.parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{text:?}: {USAGE}")))
}

/// Serves connections one after another: drains each (`source` = None) or writes
/// `source` bytes to it.
fn serve(port: u16, source: Option<u64>) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    let chunk = vec![0x5a; CHUNK];
    let mut buf = vec![0; CHUNK];
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = match source {
            None => io::copy(&mut stream, &mut io::sink()).map(|_| ()),
            Some(bytes) => write_bytes(&mut stream, &chunk, bytes),
        };
        let _ = stream.shutdown(Shutdown::Write);
        // The peer's end, so that it has read everything before the close.
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }
    Ok(())
}

fn write_bytes(stream: &mut TcpStream, chunk: &[u8], mut bytes: u64) -> io::Result<()> {
    while bytes > 0 {
        let n = bytes.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n])?;
        bytes -= n as u64;
    }
    Ok(())
}

fn send(address: &str, bytes: u64) -> io::Result<()> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address)?;
    write_bytes(&mut stream, &vec![0x5a; CHUNK], bytes)?;
    stream.shutdown(Shutdown::Write)?;
    // The sink closes once it has read everything.
    io::copy(&mut stream, &mut io::sink())?;
    let seconds = started.elapsed().as_secs_f64();
    println!("net-probe send bytes={bytes} seconds={seconds:.3}");
    Ok(())
}

fn recv(address: &str) -> io::Result<()> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(address)?;
    let bytes = io::copy(&mut stream, &mut io::sink())?;
    let seconds = started.elapsed().as_secs_f64();
    println!("net-probe recv bytes={bytes} seconds={seconds:.3}");
    Ok(())
}

/// Connections to a sink, each opened, closed and seen closed by the sink.
fn connect(address: &str, count: u32) -> io::Result<()> {
    let started = Instant::now();
    for _ in 0..count {
        let mut stream = TcpStream::connect(address)?;
        stream.shutdown(Shutdown::Write)?;
        let mut byte = [0u8; 1];
        while stream.read(&mut byte)? != 0 {}
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("net-probe connect count={count} seconds={seconds:.3}");
    Ok(())
}
