//! The 16550 UART at COM1, backed by vm-superio, wired to the host's stdout and stdin.
//!
//! Interrupts matter: Linux's 8250 driver sends user-space output from its
//! transmit-holding-register-empty (THRE) interrupt, so without one only the first
//! character of each write would ever appear.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::event_loop::{HostFd, Watch};

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
    /// Signalled when bytes start waiting, for [`SerialIo`]'s flush timer.
    waiting: Option<EventFd>,
}

impl ConsoleOutput {
    /// Output that batches guest bytes for `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self {
            out,
            pending: Vec::with_capacity(FLUSH_THRESHOLD),
            waiting: None,
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
/// each newline, when `FLUSH_THRESHOLD` (4 KiB) are pending, and by [`SerialIo`]
/// [`FLUSH_INTERVAL`] after bytes started waiting (prompts and echoed keystrokes end
/// without a newline).
impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let was_empty = self.pending.is_empty();
        self.pending.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.pending.len() >= FLUSH_THRESHOLD {
            self.flush_pending()?;
        } else if was_empty && let Some(waiting) = &self.waiting {
            // Cannot fail short of counter overflow, which leaves it readable anyway.
            let _ = waiting.write(1);
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
const REG_DATA: u64 = 0;
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
    /// Signalled when the guest made room for input the host holds back (see
    /// [`SerialConsole::queue_input`]).
    room: Option<EventFd>,
    /// The host holds input back: signal `room` once the guest drained the FIFO or
    /// started listening.
    input_waiting: bool,
    /// The receive FIFO's capacity when empty.
    fifo_size: usize,
}

impl SerialConsole {
    /// A UART in its reset state that raises `irq` and writes to `out`.
    pub fn new(irq: IrqTrigger, out: ConsoleOutput) -> Self {
        let uart = Serial::new(irq, out);
        Self {
            fifo_size: uart.fifo_capacity(),
            uart,
            lcr: 0,
            ier: 0,
            mcr: 0,
            room: None,
            input_waiting: false,
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
    /// Nothing is queued until the guest listens for input (see `accepts_input`). When
    /// not everything fits, the room eventfd (see [`SerialIo`]) is signalled once the
    /// guest has read the FIFO empty or starts listening.
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let queued = if !self.accepts_input() {
            0
        } else {
            let room = self.uart.fifo_capacity().min(bytes.len());
            if room == 0 {
                0
            } else {
                self.uart
                    .enqueue_raw_bytes(&bytes[..room])
                    .unwrap_or_else(|e| {
                        tracing::warn!("serial: could not queue input: {e:?}");
                        0
                    })
            }
        };
        self.input_waiting = queued < bytes.len();
        queued
    }

    /// Tells the host side there is room for the input it holds back, if it does and
    /// there is.
    fn signal_room(&mut self) {
        if self.input_waiting
            && self.accepts_input()
            && self.uart.fifo_capacity() == self.fifo_size
            && let Some(room) = &self.room
        {
            self.input_waiting = false;
            let _ = room.write(1);
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |o| self.uart.read(o));
        data.fill(value);
        if offset == REG_DATA && self.lcr & LCR_DLAB == 0 {
            self.signal_room();
        }
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
        if matches!(offset, REG_IER | REG_MCR) {
            self.signal_room();
        }
    }
}

/// The console's host side, a subscriber of the VM's event loop: writes out output
/// [`FLUSH_INTERVAL`] after it started waiting (a timerfd armed by an eventfd the
/// output signals), and with stdin forwarded, passes the host's stdin to the guest's
/// COM1 as the guest makes room (an eventfd the UART signals) until stdin ends.
pub struct SerialIo {
    console: Arc<Mutex<SerialConsole>>,
    output_waiting: EventFd,
    flush_timer: TimerFd,
    flush_armed: bool,
    room: EventFd,
    input: Option<SerialInput>,
}

/// The host's stdin on its way to the guest.
struct SerialInput {
    /// Non-blocking (see [`HostFd::new`]): a readiness that is gone by the time it is
    /// read cannot hold the loop up.
    host: HostFd,
    watch: Watch,
    buf: [u8; 64],
    /// Bytes read but not yet taken by the guest: `buf[start..end]`.
    start: usize,
    end: usize,
}

const OUTPUT_WAITING: u32 = 0;
const FLUSH_TIMER: u32 = 1;
const ROOM: u32 = 2;
const STDIN: u32 = 3;

impl SerialIo {
    /// The host side of `console`; what is read from `input` (the process's stdin, say)
    /// goes to the guest. Wires its eventfds into the console.
    pub fn new(console: Arc<Mutex<SerialConsole>>, input: Option<OwnedFd>) -> io::Result<Self> {
        let output_waiting = EventFd::new(libc::EFD_NONBLOCK)?;
        let room = EventFd::new(libc::EFD_NONBLOCK)?;
        {
            let mut uart = lock(&console);
            uart.uart.writer_mut().waiting = Some(output_waiting.try_clone()?);
            uart.room = Some(room.try_clone()?);
        }
        let input = match input {
            Some(fd) => {
                // Watched as the descriptor it becomes: it may be opened anew.
                let host = HostFd::new(fd, false)?;
                Some(SerialInput {
                    watch: Watch::new(&host, STDIN, EventSet::IN),
                    host,
                    buf: [0; 64],
                    start: 0,
                    end: 0,
                })
            }
            None => None,
        };
        Ok(Self {
            console,
            output_waiting,
            flush_timer: crate::event_loop::nonblocking_timer()?,
            flush_armed: false,
            room,
            input,
        })
    }

    /// Moves input along: what is held back into the FIFO, then more from the host while
    /// the guest takes it. Watches stdin only when there is nothing held back.
    fn pump_input(&mut self, ops: &mut EventOps, readable: bool) {
        let Some(input) = &mut self.input else {
            return;
        };
        let mut readable = readable || !input.host.pollable();
        loop {
            if input.start < input.end {
                input.start += lock(&self.console).queue_input(&input.buf[input.start..input.end]);
                if input.start < input.end {
                    // The guest has not drained its FIFO yet: wait for `room`.
                    input.watch.set(ops, false);
                    return;
                }
            }
            if !readable {
                input.watch.set(ops, true);
                return;
            }
            match input.host.file().read(&mut input.buf) {
                Ok(0) => break,
                Ok(n) => (input.start, input.end) = (0, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    input.watch.set(ops, true);
                    return;
                }
                Err(e) => {
                    tracing::warn!("serial: reading stdin: {e}");
                    break;
                }
            }
            // One read per readiness for pipes and terminals; files are read on.
            readable = !input.host.pollable();
        }
        // End of input (or an error): stop watching it for good.
        input.watch.set(ops, false);
        self.input = None;
    }
}

impl MutEventSubscriber for SerialIo {
    fn init(&mut self, ops: &mut EventOps) {
        for (fd, token) in [
            (self.output_waiting.as_raw_fd(), OUTPUT_WAITING),
            (self.flush_timer.as_raw_fd(), FLUSH_TIMER),
            (self.room.as_raw_fd(), ROOM),
        ] {
            if let Err(e) = ops.add(Events::with_data_raw(fd, token, EventSet::IN)) {
                tracing::warn!("serial: cannot watch the console's events: {e}");
            }
        }
        self.pump_input(ops, false);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            OUTPUT_WAITING => {
                let _ = self.output_waiting.read();
                if !self.flush_armed {
                    match self.flush_timer.reset(FLUSH_INTERVAL, None) {
                        Ok(()) => self.flush_armed = true,
                        Err(e) => {
                            tracing::debug!("serial: cannot arm the flush timer: {e}");
                            lock(&self.console).flush_output();
                        }
                    }
                }
            }
            FLUSH_TIMER => {
                // Non-blocking, like every timer of the loop.
                let _ = self.flush_timer.wait();
                self.flush_armed = false;
                lock(&self.console).flush_output();
            }
            ROOM => {
                let _ = self.room.read();
                self.pump_input(ops, false);
            }
            _ => self.pump_input(ops, true),
        }
    }
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
    fn input_waits_for_room_and_stops_at_end_of_input() {
        let (mut uart, _, _) = console();
        open_port(&mut uart);
        let uart = Arc::new(Mutex::new(uart));
        let (reader, mut writer) = std::io::pipe().unwrap();
        // More than the FIFO holds, so the rest waits for the guest to read.
        let text: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        writer.write_all(&text).unwrap();
        drop(writer);
        let mut event_loop = crate::event_loop::EventLoop::new().unwrap();
        let io = SerialIo::new(uart.clone(), Some(reader.into())).unwrap();
        event_loop.add(Box::new(io));
        let mut got = Vec::new();
        for _ in 0..100 {
            // The guest reads whatever the FIFO holds (as its interrupt handler would).
            loop {
                let mut lsr = [0];
                uart.lock().unwrap().read(LSR, &mut lsr);
                if lsr[0] & LSR_DATA_READY == 0 {
                    break;
                }
                let mut byte = [0];
                uart.lock().unwrap().read(THR, &mut byte);
                got.push(byte[0]);
            }
            if got.len() == text.len() {
                break;
            }
            event_loop.run_once(1000).unwrap();
        }
        assert_eq!(got, text);
    }
}
