//! The contract between tvix-boot (host) and its guest init: which kernel
//! command-line keys the init honours, how `tvix.run` arguments are encoded,
//! and how the init reports an exit status back.
//!
//! Both sides use this module, so the encoder and the decoder cannot drift.
//!
//! # Command-line keys (checked in this order; the first one present wins)
//!
//! | key                  | meaning                                                        |
//! |----------------------|----------------------------------------------------------------|
//! | `tvix.find`          | print every path under /nix/store, one per line (like `find`)  |
//! | `tvix.shell[=PATH]`  | interactive shell on the console; default `/bin/sh`            |
//! | `tvix.run=PATH`      | run PATH with the arguments from `tvix.args`                   |
//! | `init=PATH`          | tmpfs at /fs, store at /fs/nix/store, switch_root, exec PATH   |
//!
//! # Arguments: `tvix.args=<base64url>`
//!
//! One key carries all arguments (`argv[1..]`; `argv[0]` is the `tvix.run` path):
//! every argument followed by a NUL byte, the whole encoded as base64url
//! (RFC 4648 §5: `A-Z a-z 0-9 - _`), padding omitted. That alphabet never needs
//! quoting on the kernel command line, so spaces, quotes, newlines and
//! non-UTF-8 bytes all arrive intact. NUL-*terminated* rather than
//! -separated so that "no arguments" (empty string, or no key) and "one empty
//! argument" (`"\0"` = `AA`) differ. Arguments cannot contain NUL (execve
//! could not pass them anyway). Mind the kernel's command-line limit (2048
//! bytes on x86_64): base64 grows the arguments by a third.
//!
//! # Exit status: guest to host
//!
//! After a `tvix.run`, `tvix.shell` or `tvix.find` finishes, the init reports
//! a status `n` over two channels:
//!
//! 1. I/O port [`EXIT_STATUS_PORT`]: one 32-bit `out` (little-endian `n`),
//!    written after the console output has drained and right before the ACPI
//!    power-off, so the VMM holds the status by the time the guest stops.
//!    Out of band: program output cannot forge or garble it. Needs a guest
//!    kernel with `CONFIG_X86_IOPL_IOPERM=y` (ioperm(2)).
//! 2. The console line `tvix-boot: exit-status <n>` (decimal, see
//!    [`exit_status_line`] / [`parse_exit_status_line`]), for hosts without
//!    the port device and for humans. Program output may precede it on the
//!    same line if the program did not end with a newline, so match it as a
//!    line *suffix*.
//!
//! `n` is 0..=255 for a program's status (128 + signal number when killed by
//! a signal, 127 when the program does not exist, 126 when it cannot be
//! executed, like shells), or [`STATUS_INIT_FAILED`] when the init itself
//! could not set up the guest. Nothing is written when no program ran (no
//! key on the command line, or `init=`, which hands PID 1 to another init).
//! The port is compatible with QEMU's `-device isa-debug-exit,iobase=0x501,iosize=4`,
//! which exits QEMU with `(n << 1) | 1`.

/// Key: list the store.
pub const KEY_FIND: &str = "tvix.find";
/// Key: interactive shell, optionally `=PATH`.
pub const KEY_SHELL: &str = "tvix.shell";
/// Key: run `=PATH`.
pub const KEY_RUN: &str = "tvix.run";
/// Key: the arguments for `tvix.run`, see the module docs.
pub const KEY_ARGS: &str = "tvix.args";
/// Key: switch_root into `=PATH`. The kernel ignores `init=` when the initrd
/// has an `/init`, so the key reaches us.
pub const KEY_INIT: &str = "init";

/// Key (no value): `tvix.run`'s program gets its stdin, stdout and stderr on the
/// virtio-console ports [`STDIN_PORT`], [`STDOUT_PORT`] and [`STDERR_PORT`] instead of
/// the console; the console keeps the kernel's and the init's messages.
pub const KEY_STDIO_PORTS: &str = "tvix.stdio-ports";
/// Name of the port the host sends the program's stdin on (end of file: the host closes
/// its side).
pub const STDIN_PORT: &str = "tvix.stdin";
/// Name of the port that carries the program's stdout to the host.
pub const STDOUT_PORT: &str = "tvix.stdout";
/// Name of the port that carries the program's stderr to the host.
pub const STDERR_PORT: &str = "tvix.stderr";

/// Key (no value): the program has the console as its terminal, and the host sends the
/// terminal's size on the port [`WINSIZE_PORT`] as text lines `ROWS COLS`, first at once,
/// then whenever it changes; the init applies each to the console (which signals
/// SIGWINCH to the program).
pub const KEY_WINSIZE_PORT: &str = "tvix.winsize-port";
/// Name of the port carrying terminal sizes.
pub const WINSIZE_PORT: &str = "tvix.winsize";

/// Key (no value): the host may ask the guest to stop on the port [`CONTROL_PORT`], by
/// sending the line [`STOP_REQUEST`]. The init then ends the program (SIGTERM to every
/// process but itself; `tvix.find` stops walking), reports its status and powers off.
pub const KEY_CONTROL_PORT: &str = "tvix.control-port";
/// Name of the port carrying host requests.
pub const CONTROL_PORT: &str = "tvix.control";
/// The line that asks the guest to stop.
pub const STOP_REQUEST: &str = "stop";
/// Status reported for a `tvix.find` stopped by [`STOP_REQUEST`]: as if SIGTERM ended it.
pub const STATUS_STOPPED: u32 = 128 + 15;
/// The line `signal N` passes signal N (1 to 64) to the program: the init sends it to
/// every process but itself, as it does SIGTERM for [`STOP_REQUEST`]; a `tvix.find`
/// stops walking with status 128 + N.
pub const SIGNAL_REQUEST: &str = "signal";

/// What the host asks on [`CONTROL_PORT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRequest {
    /// [`STOP_REQUEST`].
    Stop,
    /// [`SIGNAL_REQUEST`] with a signal number from 1 to 64.
    Signal(i32),
}

impl HostRequest {
    /// The line that carries the request (without its newline).
    pub fn to_line(self) -> String {
        match self {
            HostRequest::Stop => STOP_REQUEST.to_owned(),
            HostRequest::Signal(signal) => format!("{SIGNAL_REQUEST} {signal}"),
        }
    }

    /// The request to pass `signal` on; `None` for a number that is not a signal (1 to
    /// 64).
    pub fn signal(signal: i32) -> Option<Self> {
        (1..=64)
            .contains(&signal)
            .then_some(HostRequest::Signal(signal))
    }

    /// A line from the host; `None` for anything else (a newer host may send more).
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim();
        if line == STOP_REQUEST {
            return Some(HostRequest::Stop);
        }
        let number = line.strip_prefix(SIGNAL_REQUEST)?.strip_prefix(' ')?;
        Self::signal(number.parse().ok()?)
    }
}

/// In tvix-boot's initrd: the environment of `tvix.run`'s and `tvix.shell`'s program,
/// exactly (see [`encode_env`]). Without it the init uses a small default.
pub const PROGRAM_ENV_FILE: &str = "/tvix/env";
/// In tvix-boot's initrd: the program's working directory (the path's bytes). Without
/// it, `/`.
pub const PROGRAM_WORKDIR_FILE: &str = "/tvix/workdir";

/// `KEY=VALUE` entries, each followed by a NUL byte (the form of /proc/PID/environ).
pub fn encode_env<K: AsRef<[u8]>, V: AsRef<[u8]>>(entries: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in entries {
        out.extend_from_slice(key.as_ref());
        out.push(b'=');
        out.extend_from_slice(value.as_ref());
        out.push(0);
    }
    out
}

/// The entries of [`encode_env`]'s output; malformed ones (no `=`, empty key) are
/// skipped.
pub fn decode_env(bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    bytes
        .split(|&b| b == 0)
        .filter_map(|entry| {
            let eq = entry.iter().position(|&b| b == b'=')?;
            (eq > 0).then(|| (entry[..eq].to_vec(), entry[eq + 1..].to_vec()))
        })
        .collect()
}

/// The shell `tvix.shell` runs when it has no `=PATH`: busybox from the initrd.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// I/O port the init writes the exit status to (32-bit `out`). 0x501 is
/// QEMU's isa-debug-exit default and collides with none of the VMM's ports
/// (serial 0x3f8, i8042 0x60/0x64, ACPI sleep 0x3c0, pvpanic 0x505). This is the one
/// definition: the VMM's memory layout places its exit-status device here.
pub const EXIT_STATUS_PORT: u16 = 0x501;
/// Width of the exit-status write, in bytes: the device's one register.
pub const EXIT_STATUS_PORT_LEN: u16 = 4;
/// Status reported when the init itself failed (mounts, bad command line,
/// switch_root): outside 0..=255 so it cannot be mistaken for a program's.
pub const STATUS_INIT_FAILED: u32 = 0x100;

/// Prefix of the console status line.
pub const EXIT_STATUS_PREFIX: &str = "tvix-boot: exit-status ";
/// The last line the init prints before it powers the guest off.
pub const POWER_OFF_LINE: &str = "Nothing left to be done, powering off.";

/// The console line reporting `status` (without the newline).
pub fn exit_status_line(status: u32) -> String {
    format!("{EXIT_STATUS_PREFIX}{status}")
}

/// The status in a console line that ends with the status report (trailing
/// `\r`/`\n` allowed; anything before the prefix is ignored, see module docs).
pub fn parse_exit_status_line(line: &str) -> Option<u32> {
    let line = line.trim_end_matches(['\r', '\n']);
    let at = line.rfind(EXIT_STATUS_PREFIX)?;
    let digits = &line[at + EXIT_STATUS_PREFIX.len()..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// An argument for `tvix.run` contains a NUL byte, which execve cannot pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NulInArgument {
    /// Index of the offending argument (0 = first argument after the path).
    pub index: usize,
}

impl std::fmt::Display for NulInArgument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "argument {} contains a NUL byte", self.index + 1)
    }
}

impl std::error::Error for NulInArgument {}

/// Encodes arguments as the value of `tvix.args` (without the `tvix.args=`).
/// Empty for no arguments; then the key can be left out.
pub fn encode_args<A: AsRef<[u8]>>(args: &[A]) -> Result<String, NulInArgument> {
    let mut raw = Vec::new();
    for (index, arg) in args.iter().enumerate() {
        let arg = arg.as_ref();
        if arg.contains(&0) {
            return Err(NulInArgument { index });
        }
        raw.extend_from_slice(arg);
        raw.push(0);
    }
    Ok(base64url_encode(&raw))
}

/// Decodes the value of `tvix.args`; `None` if it is not valid base64url or
/// the last argument lacks its NUL terminator.
pub fn decode_args(value: &str) -> Option<Vec<Vec<u8>>> {
    let raw = base64url_decode(value)?;
    if raw.is_empty() {
        return Some(Vec::new());
    }
    let body = raw.strip_suffix(&[0])?;
    Some(body.split(|&b| b == 0).map(<[u8]>::to_vec).collect())
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

// Hand-written rather than a crate: ~40 lines, and the init stays libc-only
// (see Cargo.toml).
fn base64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        // chunk.len() + 1 sextets carry the chunk's bits (no padding).
        for i in 0..=chunk.len() {
            let sextet = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(BASE64URL[sextet as usize]));
        }
    }
    out
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    // Tolerate padding from encoders that add it.
    let text = text.trim_end_matches('=').as_bytes();
    if text.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 2);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = BASE64URL.iter().position(|&a| a == c)? as u32;
            n |= v << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        // 2, 3 or 4 sextets carry 1, 2 or 3 bytes.
        let len = chunk.len() - 1;
        // Canonical encodings leave the bits below the carried bytes zero;
        // reject others so one argument list has exactly one encoding.
        if n & ((1 << (24 - 8 * len as u32)) - 1) != 0 {
            return None;
        }
        out.extend_from_slice(&bytes[1..=len]);
    }
    Some(out)
}

/// Key: configure `eth0`, the first virtio-net interface: `tvix.net=ADDRESS/PREFIX,GATEWAY`
/// with an optional `,DNS` (IPv4, dotted). The init brings the interface up with the
/// address, adds a default route through the gateway and writes the name server into
/// /etc/resolv.conf. IPv6 needs no key: the kernel configures it from the router
/// advertisements the host side sends. `lo` is brought up in every guest.
pub const KEY_NET: &str = "tvix.net";

/// What `tvix.net` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestNetwork {
    pub address: std::net::Ipv4Addr,
    /// The network prefix length, 0 to 32.
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    pub dns: Option<std::net::Ipv4Addr>,
}

/// A `tvix.net` value the init cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadNetworkKey(pub String);

impl std::fmt::Display for BadNetworkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{KEY_NET}={:?} is not ADDRESS/PREFIX,GATEWAY[,DNS] (IPv4)",
            self.0
        )
    }
}

impl GuestNetwork {
    /// The key's value.
    pub fn to_value(&self) -> String {
        let mut value = format!("{}/{},{}", self.address, self.prefix_len, self.gateway);
        if let Some(dns) = self.dns {
            value.push_str(&format!(",{dns}"));
        }
        value
    }

    pub fn parse(value: &str) -> Result<Self, BadNetworkKey> {
        let bad = || BadNetworkKey(value.to_owned());
        let mut fields = value.split(',');
        let (address, prefix_len) = fields
            .next()
            .and_then(|f| f.split_once('/'))
            .ok_or_else(bad)?;
        let network = GuestNetwork {
            address: address.parse().map_err(|_| bad())?,
            prefix_len: prefix_len
                .parse()
                .ok()
                .filter(|&p: &u8| p <= 32)
                .ok_or_else(bad)?,
            gateway: fields.next().ok_or_else(bad)?.parse().map_err(|_| bad())?,
            dns: fields
                .next()
                .map(|dns| dns.parse().map_err(|_| bad()))
                .transpose()?,
        };
        if fields.next().is_some() {
            return Err(bad());
        }
        Ok(network)
    }
}

/// The kernel command line, split into parameters the way the kernel's
/// `next_arg` does: whitespace separates, double quotes group (and are
/// dropped). Parsing stops at a lone `--` (what follows is init's argv).
#[derive(Debug, Clone, Default)]
pub struct Cmdline {
    params: Vec<(String, Option<String>)>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        let mut chars = text.chars().peekable();
        loop {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.peek().is_none() {
                break;
            }
            let mut word = String::new();
            let mut quoted = false;
            while let Some(c) = chars.next_if(|c| quoted || !c.is_whitespace()) {
                if c == '"' {
                    quoted = !quoted;
                } else {
                    word.push(c);
                }
            }
            if word == "--" {
                break;
            }
            let param = match word.split_once('=') {
                Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
                None => (word, None),
            };
            params.push(param);
        }
        Cmdline { params }
    }

    /// Whether `key` is present, with or without a value.
    pub fn has(&self, key: &str) -> bool {
        self.params.iter().any(|(k, _)| k == key)
    }

    /// The value of the last `key=value` (later parameters override earlier
    /// ones, as for the kernel's own). `Some(None)` for a bare `key`.
    pub fn get(&self, key: &str) -> Option<Option<&str>> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_deref())
    }
}

/// What the init is asked to do, after the precedence rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Find,
    Shell { path: String },
    Run { path: String, args: Vec<Vec<u8>> },
    Init { path: String },
    Nothing,
}

/// A key is present but unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeError {
    /// `key` was given without `=PATH` (or with an empty one).
    MissingPath { key: &'static str },
    /// `tvix.args` is not valid; holds the value.
    BadArgs { value: String },
    /// A path the kernel command line cannot carry (empty, or with a `"`,
    /// a control character or NUL).
    BadPath { path: String },
    /// A `tvix.run` argument contains NUL.
    NulInArgument(NulInArgument),
}

impl std::fmt::Display for ModeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModeError::MissingPath { key } => {
                write!(f, "`{key}` needs a path: `{key}=/nix/store/...`")
            }
            ModeError::BadArgs { value } => write!(
                f,
                "`{KEY_ARGS}={value}` is not base64url of NUL-terminated arguments"
            ),
            ModeError::BadPath { path } => write!(
                f,
                "path {path:?} cannot be put on the kernel command line (empty, or has a \" or control character)"
            ),
            ModeError::NulInArgument(e) => write!(f, "cannot pass the arguments: {e}"),
        }
    }
}

impl std::error::Error for ModeError {}

impl Mode {
    /// Picks the mode: `tvix.find`, then `tvix.shell`, then `tvix.run`, then `init`.
    pub fn from_cmdline(cmdline: &Cmdline) -> Result<Mode, ModeError> {
        let path_of = |key: &'static str| match cmdline.get(key) {
            Some(Some(path)) if !path.is_empty() => Ok(path.to_owned()),
            _ => Err(ModeError::MissingPath { key }),
        };
        if cmdline.has(KEY_FIND) {
            return Ok(Mode::Find);
        }
        if let Some(path) = cmdline.get(KEY_SHELL) {
            let path = match path {
                Some(p) if !p.is_empty() => p.to_owned(),
                _ => DEFAULT_SHELL.to_owned(),
            };
            return Ok(Mode::Shell { path });
        }
        if cmdline.has(KEY_RUN) {
            let path = path_of(KEY_RUN)?;
            let args = match cmdline.get(KEY_ARGS) {
                None | Some(None) => Vec::new(),
                Some(Some(value)) => decode_args(value).ok_or_else(|| ModeError::BadArgs {
                    value: value.to_owned(),
                })?,
            };
            return Ok(Mode::Run { path, args });
        }
        if cmdline.has(KEY_INIT) {
            return Ok(Mode::Init {
                path: path_of(KEY_INIT)?,
            });
        }
        Ok(Mode::Nothing)
    }
}

impl Mode {
    /// The kernel command-line keys that make the init pick this mode (the
    /// inverse of [`Mode::from_cmdline`]); empty for [`Mode::Nothing`].
    /// Paths with spaces are quoted; arguments are always encoded.
    pub fn to_cmdline(&self) -> Result<String, ModeError> {
        fn path(p: &str) -> Result<String, ModeError> {
            if p.is_empty() || p.chars().any(|c| c == '"' || c.is_control()) {
                return Err(ModeError::BadPath { path: p.to_owned() });
            }
            Ok(if p.chars().any(char::is_whitespace) {
                format!("\"{p}\"")
            } else {
                p.to_owned()
            })
        }
        Ok(match self {
            Mode::Find => KEY_FIND.to_owned(),
            Mode::Shell { path: p } if p == DEFAULT_SHELL => KEY_SHELL.to_owned(),
            Mode::Shell { path: p } => format!("{KEY_SHELL}={}", path(p)?),
            Mode::Run { path: p, args } if args.is_empty() => format!("{KEY_RUN}={}", path(p)?),
            Mode::Run { path: p, args } => format!(
                "{KEY_RUN}={} {KEY_ARGS}={}",
                path(p)?,
                encode_args(args).map_err(ModeError::NulInArgument)?
            ),
            Mode::Init { path: p } => format!("{KEY_INIT}={}", path(p)?),
            Mode::Nothing => String::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_network_key_round_trips_and_rejects_what_the_init_cannot_use() {
        let network = GuestNetwork {
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: "10.0.2.2".parse().unwrap(),
            dns: Some("10.0.2.3".parse().unwrap()),
        };
        assert_eq!(network.to_value(), "10.0.2.15/24,10.0.2.2,10.0.2.3");
        assert_eq!(GuestNetwork::parse(&network.to_value()), Ok(network));
        let without_dns = GuestNetwork {
            dns: None,
            ..network
        };
        assert_eq!(
            GuestNetwork::parse("10.0.2.15/24,10.0.2.2"),
            Ok(without_dns)
        );
        for bad in [
            "",
            "10.0.2.15",
            "10.0.2.15/33,10.0.2.2",
            "10.0.2.15/24",
            "10.0.2.15/24,gateway",
            "10.0.2.15/24,10.0.2.2,10.0.2.3,extra",
            "::1/64,::2",
        ] {
            assert!(GuestNetwork::parse(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn host_requests_round_trip_and_nonsense_is_ignored() {
        for request in [
            HostRequest::Stop,
            HostRequest::Signal(1),
            HostRequest::Signal(2),
            HostRequest::Signal(64),
        ] {
            assert_eq!(HostRequest::parse(&request.to_line()), Some(request));
        }
        assert_eq!(HostRequest::parse(" stop \n"), Some(HostRequest::Stop));
        for line in [
            "signal 0",
            "signal 65",
            "signal -2",
            "signal",
            "signal2",
            "signal x",
            "halt",
        ] {
            assert_eq!(HostRequest::parse(line), None, "{line}");
        }
    }

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        // RFC 4648 §10, padding dropped; the url alphabet only differs in 62/63.
        let vectors = [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64url_encode(plain.as_bytes()), encoded);
            assert_eq!(base64url_decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url_decode("Zg==").unwrap(), b"f");
    }

    #[test]
    fn base64url_rejects_garbage() {
        assert_eq!(base64url_decode("Z"), None);
        assert_eq!(base64url_decode("Zm+v"), None);
        assert_eq!(base64url_decode("Zm/v"), None);
        assert_eq!(base64url_decode("Zm 9"), None);
        // Non-zero unused bits: "Zh" would be 'f' with a stray bit.
        assert_eq!(base64url_decode("Zh"), None);
    }

    #[test]
    fn args_round_trip_every_byte() {
        let all: Vec<u8> = (1..=255).collect();
        let args: Vec<Vec<u8>> = vec![
            b"hello world".to_vec(),
            Vec::new(),
            b" lead and trail ".to_vec(),
            b"quote\" and 'single' \\ $HOME \n newline".to_vec(),
            all,
            "ünïcødé".as_bytes().to_vec(),
        ];
        let encoded = encode_args(&args).unwrap();
        assert!(
            encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(decode_args(&encoded).unwrap(), args);
    }

    #[test]
    fn no_args_and_one_empty_arg_differ() {
        let none: [&[u8]; 0] = [];
        assert_eq!(encode_args(&none).unwrap(), "");
        assert_eq!(decode_args("").unwrap(), Vec::<Vec<u8>>::new());
        assert_eq!(encode_args(&[b""]).unwrap(), "AA");
        assert_eq!(decode_args("AA").unwrap(), vec![Vec::<u8>::new()]);
        // Missing terminator.
        assert_eq!(decode_args(&base64url_encode(b"abc")), None);
    }

    #[test]
    fn nul_in_argument_is_rejected() {
        assert_eq!(
            encode_args(&[&b"ok"[..], b"a\0b"]),
            Err(NulInArgument { index: 1 })
        );
    }

    #[test]
    fn cmdline_splits_like_the_kernel() {
        let c = Cmdline::parse(
            "console=ttyS0 tvix.run=\"/nix/store/x-a b/bin/p\" tvix.find quiet -- tvix.shell\n",
        );
        assert_eq!(c.get("console"), Some(Some("ttyS0")));
        assert_eq!(c.get(KEY_RUN), Some(Some("/nix/store/x-a b/bin/p")));
        assert_eq!(c.get(KEY_FIND), Some(None));
        assert!(!c.has(KEY_SHELL), "keys after -- belong to init's argv");
        assert!(!c.has("tvix"));
    }

    #[test]
    fn mode_precedence() {
        let mode = |s| Mode::from_cmdline(&Cmdline::parse(s));
        assert_eq!(
            mode("tvix.run=/a tvix.shell tvix.find init=/i"),
            Ok(Mode::Find)
        );
        assert_eq!(
            mode("tvix.run=/a tvix.shell init=/i"),
            Ok(Mode::Shell {
                path: DEFAULT_SHELL.into()
            })
        );
        assert_eq!(
            mode("tvix.shell=/nix/store/x-bash/bin/bash"),
            Ok(Mode::Shell {
                path: "/nix/store/x-bash/bin/bash".into()
            })
        );
        assert_eq!(
            mode("init=/i tvix.run=/a tvix.args=YQBiIGMA"),
            Ok(Mode::Run {
                path: "/a".into(),
                args: vec![b"a".to_vec(), b"b c".to_vec()]
            })
        );
        assert_eq!(
            mode("init=/nix/store/x-sys/init"),
            Ok(Mode::Init {
                path: "/nix/store/x-sys/init".into()
            })
        );
        assert_eq!(mode("console=ttyS0"), Ok(Mode::Nothing));
        assert_eq!(
            mode("tvix.run"),
            Err(ModeError::MissingPath { key: KEY_RUN })
        );
        assert_eq!(
            mode("tvix.run=/a tvix.args=!!"),
            Err(ModeError::BadArgs { value: "!!".into() })
        );
    }

    #[test]
    fn mode_to_cmdline_round_trips() {
        let modes = [
            Mode::Find,
            Mode::Shell {
                path: DEFAULT_SHELL.into(),
            },
            Mode::Shell {
                path: "/nix/store/x-bash/bin/bash".into(),
            },
            Mode::Run {
                path: "/nix/store/x-hello/bin/hello".into(),
                args: vec![],
            },
            Mode::Run {
                path: "/nix/store/x-a b/bin/p".into(),
                args: vec![b"a b".to_vec(), b"".to_vec(), vec![0xff, b'"']],
            },
            Mode::Init {
                path: "/nix/store/x-system/init".into(),
            },
            Mode::Nothing,
        ];
        for mode in modes {
            let line = format!("console=ttyS0 {} panic=-1", mode.to_cmdline().unwrap());
            assert_eq!(
                Mode::from_cmdline(&Cmdline::parse(&line)),
                Ok(mode),
                "{line}"
            );
        }
        let bad = Mode::Init {
            path: "/a\"b".into(),
        };
        assert!(matches!(bad.to_cmdline(), Err(ModeError::BadPath { .. })));
        let nul = Mode::Run {
            path: "/a".into(),
            args: vec![b"x\0".to_vec()],
        };
        assert!(matches!(nul.to_cmdline(), Err(ModeError::NulInArgument(_))));
    }

    #[test]
    fn exit_status_line_round_trips() {
        assert_eq!(exit_status_line(3), "tvix-boot: exit-status 3");
        assert_eq!(
            parse_exit_status_line("tvix-boot: exit-status 3\r\n"),
            Some(3)
        );
        assert_eq!(
            parse_exit_status_line("no newline at endtvix-boot: exit-status 256"),
            Some(STATUS_INIT_FAILED)
        );
        assert_eq!(parse_exit_status_line("tvix-boot: exit-status "), None);
        assert_eq!(parse_exit_status_line("tvix-boot: exit-status 1 x"), None);
    }

    #[test]
    fn environment_round_trips() {
        let entries = [
            ("PATH", "/bin"),
            ("EMPTY", ""),
            ("EQ", "a=b"),
            ("SP", "x y\n"),
        ];
        let decoded = decode_env(&encode_env(&entries));
        let expected: Vec<(Vec<u8>, Vec<u8>)> = entries
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(decoded, expected);
        assert_eq!(
            decode_env(b"noequals\0=nokey\0K=v\0"),
            vec![(b"K".to_vec(), b"v".to_vec())]
        );
    }
}
