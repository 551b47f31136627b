//! The 16550 UART at COM1, backed by vm-superio, wired to the host's stdout and stdin.
//!
//! Interrupts matter: Linux's 8250 driver sends user-space output from its
//! transmit-holding-register-empty (THRE) interrupt, so without one only the first
//! character of each write would ever appear.

use crate::seccomp::{self, RoleThread, SeccompError, ThreadRole};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, lock};

/// Number of byte registers a 16550 decodes.
pub const REGISTER_COUNT: u64 = 8;

/// Console output is written out once this much is pending, newline or not.
const FLUSH_THRESHOLD: usize = 4096;
/// Longest a partial line (a prompt, an echoed keystroke) waits before it is shown.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// Raises the UART's interrupt line: an eventfd registered with KVM as an irqfd.
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// A trigger that signals `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self(irqfd)
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest console bytes go. Only text: what the console says never decides how
/// the VM ends (any guest program can print a kernel's panic message); devices do.
pub struct ConsoleOutput {
    out: Box<dyn Write + Send>,
    /// Bytes not written out yet (see the `Write` impl).
    pending: Vec<u8>,
}

impl ConsoleOutput {
    /// Output that batches guest bytes for `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            pending: Vec::with_capacity(FLUSH_THRESHOLD),
        }
    }
}

impl ConsoleOutput {
    /// Writes out everything buffered so far.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = self
            .out
            .write_all(&self.pending)
            .and_then(|()| self.out.flush());
        // Dropped on error too: a closed stdout must not make the buffer grow forever.
        self.pending.clear();
        result
    }
}

/// The guest sends one byte per I/O exit. Passing each straight to a write(2) costs a
/// system call and, with a pipe, a reader wake-up per byte, which made boot with a
/// chatty kernel several times slower. Bytes are therefore batched: written out at
/// each newline, when `FLUSH_THRESHOLD` (4 KiB) are pending, and by
/// [`spawn_console_io`] at least every [`FLUSH_INTERVAL`] (for prompts and echoed
/// keystrokes, which end without a newline).
impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.pending.len() >= FLUSH_THRESHOLD {
            self.flush_pending()?;
        }
        Ok(buf.len())
    }

    /// Deliberately does not write out: vm-superio flushes after every byte, which
    /// is exactly the cost the batching above avoids. See
    /// [`ConsoleOutput::flush_pending`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Register offsets and bits the console watches (16550 data sheet).
const REG_IER: u8 = 1;
const REG_LCR: u8 = 3;
const REG_MCR: u8 = 4;
const IER_RECEIVED_DATA: u8 = 0x01;
const LCR_DLAB: u8 = 0x80;
const MCR_DTR: u8 = 0x01;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;

/// COM1 as seen by the guest.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOutput>,
    /// The guest's last line-control, interrupt-enable and modem-control values (IER
    /// only while the divisor latch is off; with DLAB set, offset 1 is the divisor's
    /// high byte).
    lcr: u8,
    ier: u8,
    mcr: u8,
}

impl SerialConsole {
    /// A UART in its reset state that raises `irq` and writes to `out`.
    pub fn new(irq: IrqTrigger, out: ConsoleOutput) -> Self {
        Self {
            uart: Serial::new(irq, out),
            lcr: 0,
            ier: 0,
            mcr: 0,
        }
    }

    /// Whether the guest listens for input: the port is open. Linux's 8250 driver
    /// shows that by the received-data interrupt on, DTR and OUT2 (the PC's interrupt
    /// gate) raised, loopback off; it raises OUT2 only when a program opens the tty.
    /// Before that it throws received bytes away: its probe turns every interrupt on
    /// for a moment (with DTR already raised by the console) and then reads RX in its
    /// loopback tests and while opening the port. Traced in the guest: an IER-only
    /// check let `printf 'ls …' | tvix-boot --shell` lose "ls " in one boot of three.
    fn accepts_input(&self) -> bool {
        const OPEN: u8 = MCR_DTR | MCR_OUT2;
        self.ier & IER_RECEIVED_DATA != 0 && self.mcr & (OPEN | MCR_LOOP) == OPEN
    }

    /// Writes out console output still buffered.
    pub fn flush_output(&mut self) {
        if let Err(e) = self.uart.writer_mut().flush_pending() {
            tracing::debug!("serial: console output lost: {e}");
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    /// Nothing is queued until the guest listens for input (see `accepts_input`).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        if !self.accepts_input() {
            return 0;
        }
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart
            .enqueue_raw_bytes(&bytes[..room])
            .unwrap_or_else(|e| {
                tracing::warn!("serial: could not queue input: {e:?}");
                0
            })
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |o| self.uart.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        match offset {
            REG_LCR => self.lcr = *value,
            REG_MCR => self.mcr = *value,
            REG_IER if self.lcr & LCR_DLAB == 0 => self.ier = *value,
            _ => {}
        }
        if let Err(e) = self.uart.write(offset, *value) {
            // Losing console output (host stdout closed) must not kill the guest.
            tracing::debug!("serial: write to register {offset}: {e:?}");
        }
    }
}

/// The console's host-side thread: flushes buffered output at least every
/// [`FLUSH_INTERVAL`] and, with `forward_stdin`, passes the host's stdin to the guest's
/// COM1 (until stdin ends). Runs until `stop` is set.
pub fn spawn_console_io(
    console: Arc<Mutex<SerialConsole>>,
    stop: Arc<AtomicBool>,
    forward_stdin: bool,
) -> Result<RoleThread<()>, SeccompError> {
    seccomp::spawn(ThreadRole::DeviceIo, "serial-console".into(), move || {
        if forward_stdin {
            let stdin = io::stdin();
            if let Err(e) = forward_input(&stdin, &console, &stop) {
                tracing::warn!("serial: reading stdin: {e}");
            }
        }
        // Input ended (or there is none): keep the output flowing.
        while !stop.load(Ordering::Relaxed) {
            lock(&console).flush_output();
            std::thread::sleep(FLUSH_INTERVAL);
        }
    })
}

/// Forwards `input` to the guest until `stop` is set or input ends; flushes console
/// output on the way (see [`spawn_console_io`]).
fn forward_input(
    input: &impl AsRawFd,
    console: &Mutex<SerialConsole>,
    stop: &AtomicBool,
) -> io::Result<()> {
    let poll_timeout_ms = FLUSH_INTERVAL.as_millis() as i32;
    let fd = input.as_raw_fd();
    let mut buf = [0u8; 64];
    // Bytes read but not yet taken by the guest: buf[start..end].
    let (mut start, mut end) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        lock(console).flush_output();
        if start < end {
            start += lock(console).queue_input(&buf[start..end]);
            if start < end {
                // The guest has not drained its FIFO yet.
                std::thread::sleep(Duration::from_millis(5));
            }
            continue;
        }
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pollfd` is a valid, exclusively borrowed array of one pollfd for the
        // duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, poll_timeout_ms) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ready == 0 {
            continue;
        }
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes and `fd` stays open
        // for as long as `input` is borrowed.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Ok(()), // end of input
            n if n < 0 => {
                let err = io::Error::last_os_error();
                if !matches!(
                    err.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) {
                    return Err(err);
                }
            }
            n => (start, end) = (0, n as usize),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` whose bytes the test can look at afterwards.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const MCR: u64 = 4;

    /// What Linux's 8250 driver leaves behind once a program opened the tty.
    fn open_port(uart: &mut SerialConsole) {
        uart.write(MCR, &[MCR_DTR | 0x02 | MCR_OUT2]);
        uart.write(IER, &[IER_RECEIVED_DATA]);
    }
    const IER_THR_EMPTY: u8 = 0x02;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 0x01;

    fn console() -> (SerialConsole, Capture, EventFd) {
        let capture = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = ConsoleOutput::new(Box::new(capture.clone()));
        let console = SerialConsole::new(IrqTrigger::new(irq.try_clone().unwrap()), out);
        (console, capture, irq)
    }

    fn type_text(uart: &mut SerialConsole, text: &[u8]) {
        for b in text {
            uart.write(THR, &[*b]);
        }
    }

    #[test]
    fn output_reaches_the_writer_and_raises_thre_interrupt() {
        let (mut uart, capture, irq) = console();
        uart.write(IER, &[IER_THR_EMPTY]);
        for b in b"hi\n" {
            uart.write(THR, &[*b]);
        }
        assert_eq!(&*capture.0.lock().unwrap(), b"hi\n");
        assert!(irq.read().unwrap() > 0, "THRE interrupt was raised");
    }

    #[test]
    fn output_is_batched_until_newline_or_flush() {
        let (mut uart, capture, _) = console();
        type_text(&mut uart, b"prompt# ");
        assert!(capture.0.lock().unwrap().is_empty());
        uart.flush_output();
        assert_eq!(&*capture.0.lock().unwrap(), b"prompt# ");
        type_text(&mut uart, b"ls\n");
        assert_eq!(&*capture.0.lock().unwrap(), b"prompt# ls\n");
    }

    #[test]
    fn input_waits_until_the_guest_opens_the_port() {
        let (mut uart, _, _) = console();
        assert_eq!(uart.queue_input(b"ab"), 0, "nobody listens yet");
        // The driver's probe: all interrupts on for a moment, DTR raised by the
        // console, OUT2 not.
        uart.write(MCR, &[MCR_DTR]);
        uart.write(IER, &[0x0f]);
        assert_eq!(uart.queue_input(b"ab"), 0, "probing, not listening");
        uart.write(IER, &[0]);
        // Loopback tests.
        uart.write(MCR, &[MCR_LOOP | MCR_OUT2 | MCR_DTR]);
        uart.write(IER, &[IER_RECEIVED_DATA]);
        assert_eq!(uart.queue_input(b"ab"), 0, "loopback");
        uart.write(IER, &[0]);
        uart.write(MCR, &[MCR_DTR]);
        // With the divisor latch on, offset 1 is the divisor, not IER.
        uart.write(LCR, &[LCR_DLAB]);
        uart.write(IER, &[IER_RECEIVED_DATA]);
        uart.write(LCR, &[0x03]);
        assert_eq!(uart.queue_input(b"ab"), 0);
        open_port(&mut uart);
        assert_eq!(uart.queue_input(b"ab"), 2);
        uart.write(IER, &[0]);
        assert_eq!(uart.queue_input(b"c"), 0, "the guest closed the port");
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let (mut uart, _, _) = console();
        open_port(&mut uart);
        assert_eq!(uart.queue_input(b"ab"), 2);
        let mut lsr = [0];
        uart.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & LSR_DATA_READY, 0);
        let mut byte = [0];
        uart.read(THR, &mut byte);
        assert_eq!(byte, [b'a']);
    }

    #[test]
    fn a_kernel_panic_message_on_the_console_is_only_text() {
        let (mut uart, capture, _) = console();
        let text = b"[ 1.0] Kernel panic - not syncing: fake\r\n---[ end Kernel panic - not syncing: fake ]---\r\nreboot: System halted\r\n";
        type_text(&mut uart, text);
        assert_eq!(&*capture.0.lock().unwrap(), text);
    }

    #[test]
    fn stdin_forwarding_stops_at_end_of_input() {
        let (mut uart, _, _) = console();
        open_port(&mut uart);
        let uart = Mutex::new(uart);
        let (reader, mut writer) = std::io::pipe().unwrap();
        writer.write_all(b"x").unwrap();
        drop(writer);
        forward_input(&reader, &uart, &AtomicBool::new(false)).unwrap();
        let mut byte = [0];
        uart.lock().unwrap().read(THR, &mut byte);
        assert_eq!(byte, [b'x']);
    }
}
