//! The guest's network, when one is asked for ([`MicroVm::network`]): a virtio-net
//! device whose frames go to passt (user-mode networking, no root, no tap) or to an
//! existing tap device.
//!
//! The guest is addressed as under QEMU's user-mode networking, which users know:
//! 10.0.2.15/24, gateway 10.0.2.2, name server 10.0.2.3. tvix-boot tells passt these
//! addresses and the guest's init the same ([`GuestNetwork`] on the command line), so no
//! DHCP runs. passt maps connections to the gateway to the host's loopback and forwards
//! DNS queries sent to 10.0.2.3 to the host's resolver; IPv6 comes from passt's router
//! advertisements when the host has it.
//!
//! passt is started with one end of a socket pair (`--fd`) and exits when tvix-boot
//! closes it, which it does when the VM ends, or when tvix-boot dies.
//!
//! [`MicroVm::network`]: crate::MicroVm::network

use std::fs::File;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use tvix_boot_devices::virtio::net::{Backend, BackendError, MAX_MTU, NetError};
use tvix_boot_guest_init::protocol::GuestNetwork;

/// How the guest is addressed; see the module documentation.
pub const GUEST_NETWORK: GuestNetwork = GuestNetwork {
    address: Ipv4Addr::new(10, 0, 2, 15),
    prefix_len: 24,
    gateway: Ipv4Addr::new(10, 0, 2, 2),
    dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
};

/// The MTU of a guest on a tap device: the Ethernet default, which a tap has unless
/// its owner changed it.
pub const TAP_MTU: u16 = 1500;

/// How long passt may take to start (it writes its PID file when ready).
const PASST_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Whom passt runs as when tvix-boot runs as root: `nobody` on Debian.
const PASST_RUNAS_ROOT: &str = "65534:65534";

/// Where the descriptor of the socket pair's passt end is, in passt.
const PASST_FD: i32 = 3;

/// Which network a guest gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network {
    /// User-mode networking through passt (Debian's `passt` package).
    Passt {
        /// The passt program; `passt` from `PATH` unless set.
        program: PathBuf,
        /// Host ports forwarded to guest ports.
        publish: Vec<PublishedPort>,
    },
    /// An existing tap device; the host side is the caller's to configure (for the
    /// guest's addressing, give the host end 10.0.2.2/24).
    Tap {
        /// The interface name.
        name: String,
        /// Always empty for a working configuration: publishing is passt's
        /// ([`NetworkError::PublishWithTap`]).
        publish: Vec<PublishedPort>,
    },
}

impl Network {
    /// User-mode networking through `passt` from `PATH`.
    pub fn passt() -> Self {
        Network::Passt {
            program: PathBuf::from("passt"),
            publish: Vec::new(),
        }
    }

    /// The existing tap device `name`.
    pub fn tap(name: impl Into<String>) -> Self {
        Network::Tap {
            name: name.into(),
            publish: Vec::new(),
        }
    }

    /// Forwards TCP connections to `port.host` on the host (all addresses) to
    /// `port.guest` in the guest. For passt only ([`NetworkError::PublishWithTap`]).
    pub fn publish(mut self, port: PublishedPort) -> Self {
        match &mut self {
            Network::Passt { publish, .. } | Network::Tap { publish, .. } => publish.push(port),
        }
        self
    }

    /// Runs `program` as passt.
    pub fn passt_program(mut self, path: impl Into<PathBuf>) -> Self {
        if let Network::Passt { program, .. } = &mut self {
            *program = path.into();
        }
        self
    }
}

/// `HOST_PORT:GUEST_PORT`, or one port for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishedPort {
    /// The port the host listens on.
    pub host: u16,
    /// The port in the guest it reaches.
    pub guest: u16,
}

impl FromStr for PublishedPort {
    type Err = NetworkError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || NetworkError::BadPort(text.to_owned());
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        match text.split_once(':') {
            Some((host, guest)) => Ok(Self {
                host: port(host)?,
                guest: port(guest)?,
            }),
            None => {
                let p = port(text)?;
                Ok(Self { host: p, guest: p })
            }
        }
    }
}

/// Why the guest's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// passt is not installed (or not where it was said to be).
    #[error(
        "cannot start {}: not found (user-mode networking needs passt: on Debian, \
         apt-get install passt)",
        .0.display()
    )]
    PasstMissing(PathBuf),
    /// passt could not be started.
    #[error("cannot start {}: {source}", .program.display())]
    PasstSpawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// passt ended before it was ready.
    #[error("passt exited as it started ({status}): {output}")]
    PasstExited {
        /// How it ended.
        status: std::process::ExitStatus,
        /// What it said.
        output: String,
    },
    /// passt did not get ready in time.
    #[error("passt did not get ready within {} s", PASST_START_TIMEOUT.as_secs())]
    PasstTimeout,
    /// The socket pair or passt's work directory could not be made.
    #[error("cannot set up passt's socket or directory: {0}")]
    Setup(io::Error),
    /// The tap device could not be opened.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The device refused its configuration.
    #[error(transparent)]
    Device(#[from] NetError),
    /// `--publish` is passt's; a tap's forwarding is the host's own.
    #[error("published ports need user-mode networking (passt), not a tap device")]
    PublishWithTap,
    /// A published port that is not `HOST:GUEST` (1 to 65535).
    #[error("{0:?} is not a port to publish: HOST_PORT:GUEST_PORT or PORT, each 1 to 65535")]
    BadPort(String),
}

/// The host side of a guest's network, ready for the device.
pub(crate) struct HostSide {
    pub(crate) backend: Backend,
    pub(crate) mtu: u16,
    /// passt, when it is the host side.
    pub(crate) passt: Option<Passt>,
}

/// Starts the host side `network` needs: passt, or the tap device opened.
pub(crate) fn start(network: &Network) -> Result<HostSide, NetworkError> {
    match network {
        Network::Tap { publish, .. } if !publish.is_empty() => Err(NetworkError::PublishWithTap),
        Network::Tap { name, .. } => Ok(HostSide {
            backend: Backend::tap(name)?,
            mtu: TAP_MTU,
            passt: None,
        }),
        Network::Passt { program, publish } => {
            let (ours, theirs) = UnixStream::pair().map_err(NetworkError::Setup)?;
            let passt = Passt::spawn(program, publish, OwnedFd::from(theirs))?;
            Ok(HostSide {
                backend: Backend::stream(OwnedFd::from(ours))?,
                mtu: MAX_MTU,
                passt: Some(passt),
            })
        }
    }
}

/// A running passt, serving one VM. Dropping it waits for passt to end (it does once
/// the VM's device has closed its socket), and kills it if it does not.
pub(crate) struct Passt {
    child: Child,
    /// Holds its PID file and what it writes to stderr.
    dir: tempfile::TempDir,
}

impl Passt {
    fn spawn(
        program: &PathBuf,
        publish: &[PublishedPort],
        socket: OwnedFd,
    ) -> Result<Self, NetworkError> {
        let dir = tempfile::Builder::new()
            .prefix("tvix-boot-passt.")
            .tempdir()
            .map_err(NetworkError::Setup)?;
        let stderr = File::create(dir.path().join("stderr")).map_err(NetworkError::Setup)?;
        // Started as root, passt drops to `nobody` before it writes its PID file: the
        // file is made here, writable by it, in a directory others may enter but not
        // list.
        let pid_file = dir.path().join("pid");
        let allow = |path: &std::path::Path, mode| {
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        };
        File::create(&pid_file)
            .and_then(|_| allow(&pid_file, 0o666))
            .and_then(|()| allow(dir.path(), 0o711))
            .map_err(NetworkError::Setup)?;
        let network = GUEST_NETWORK;
        let mut command = Command::new(program);
        command
            .args(["--foreground", "--quiet", "--stderr"])
            .args(["--fd", &PASST_FD.to_string()])
            .arg("--pid")
            .arg(&pid_file)
            .args(["--address", &network.address.to_string()])
            .args(["--netmask", &network.prefix_len.to_string()])
            .args(["--gateway", &network.gateway.to_string()]);
        if let Some(dns) = network.dns {
            command.args(["--dns-forward", &dns.to_string()]);
        }
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // passt refuses to keep root and looks `nobody` up by name, which a minimal
            // system (a container, the test host) may not have: name it by number.
            command.args(["--runas", PASST_RUNAS_ROOT]);
        }
        for port in publish {
            command.args(["--tcp-ports", &format!("{}:{}", port.host, port.guest)]);
        }
        let socket_fd = socket.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe calls (dup2, fcntl) on a descriptor the parent keeps open.
        unsafe {
            command.pre_exec(move || {
                if socket_fd == PASST_FD {
                    // dup2 onto itself would keep close-on-exec set.
                    let flags = libc::fcntl(socket_fd, libc::F_GETFD);
                    if flags < 0
                        || libc::fcntl(socket_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(socket_fd, PASST_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => NetworkError::PasstMissing(program.clone()),
                _ => NetworkError::PasstSpawn {
                    program: program.clone(),
                    source,
                },
            })?;
        drop(socket);
        Ok(Self { child, dir })
    }

    /// Waits until passt has written its PID file: its ports are bound and its socket
    /// is served. Reports what it said if it exits instead.
    pub(crate) fn wait_ready(&mut self) -> Result<(), NetworkError> {
        let deadline = Instant::now() + PASST_START_TIMEOUT;
        let pid_file = self.dir.path().join("pid");
        loop {
            if std::fs::read(&pid_file).is_ok_and(|pid| pid.ends_with(b"\n")) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(NetworkError::PasstExited {
                    status,
                    output: self.output(),
                });
            }
            if Instant::now() > deadline {
                return Err(NetworkError::PasstTimeout);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// What passt wrote to stderr, without its complaints that there is no syslog.
    fn output(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.dir.path().join("stderr")) {
            let _ = file.by_ref().take(64 << 10).read_to_string(&mut text);
        }
        text.lines()
            .filter(|line| !line.contains("syslog") && !line.is_empty())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_parse_and_bad_ones_are_named() {
        assert_eq!(
            "8080:80".parse::<PublishedPort>().unwrap(),
            PublishedPort {
                host: 8080,
                guest: 80
            }
        );
        assert_eq!(
            "22".parse::<PublishedPort>().unwrap(),
            PublishedPort {
                host: 22,
                guest: 22
            }
        );
        for bad in ["", "0", "65536", "80:", ":80", "a:b", "1:2:3"] {
            let error = bad.parse::<PublishedPort>().unwrap_err();
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
    }

    #[test]
    fn a_missing_passt_names_the_package() {
        let network = Network::passt().passt_program("/nonexistent/passt");
        let error = start(&network).err().expect("no passt there");
        assert!(
            error.to_string().contains("apt-get install passt"),
            "{error}"
        );
    }

    /// The real passt, when the machine has it; it must then start, serve and exit.
    #[test]
    fn passt_starts_gets_ready_and_ends_with_the_socket() {
        if std::process::Command::new("passt")
            .arg("--version")
            .output()
            .is_err()
        {
            panic!("this test needs passt (apt-get install passt)");
        }
        let mut side = start(&Network::passt()).unwrap();
        let mut passt = side.passt.take().unwrap();
        passt.wait_ready().unwrap();
        let pid = passt.child.id();
        drop(side.backend);
        let started = Instant::now();
        drop(passt);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "passt ended with its socket"
        );
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
