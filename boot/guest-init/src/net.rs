//! The guest's interfaces: `lo` always, and `eth0` as `tvix.net` says
//! ([`protocol::GuestNetwork`]). With the classic interface ioctls rather than
//! netlink: four requests for IPv4, and this binary stays free of crates.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tvix_boot_guest_init::protocol::GuestNetwork;

/// The interface the first virtio-net device becomes (no udev renames it here).
pub const GUEST_INTERFACE: &str = "eth0";

/// Where programs look for name servers.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// What failed, on which interface.
#[derive(Debug)]
pub struct NetError {
    pub step: &'static str,
    pub interface: &'static str,
    pub source: io::Error,
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot {} on {}: {}",
            self.step, self.interface, self.source
        )
    }
}

/// Brings `lo` up; the kernel gives it 127.0.0.1/8 and ::1 as it comes up.
pub fn bring_up_loopback() -> Result<(), NetError> {
    let socket = inet_socket("lo")?;
    set_up(&socket, "lo")
}

/// Configures [`GUEST_INTERFACE`] as `network` says: address and netmask, up, a default
/// route through the gateway, and the name server in /etc/resolv.conf.
pub fn configure(network: &GuestNetwork) -> Result<(), NetError> {
    let interface = GUEST_INTERFACE;
    let socket = inet_socket(interface)?;
    let fail = |step| {
        move |source| NetError {
            step,
            interface,
            source,
        }
    };
    let netmask = if network.prefix_len == 0 {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(network.prefix_len)))
    };
    address_ioctl(&socket, interface, libc::SIOCSIFADDR, network.address)
        .map_err(fail("set the address"))?;
    address_ioctl(&socket, interface, libc::SIOCSIFNETMASK, netmask)
        .map_err(fail("set the netmask"))?;
    set_up(&socket, interface)?;
    add_default_route(&socket, network.gateway).map_err(fail("add the default route"))?;
    if let Some(dns) = network.dns {
        std::fs::create_dir_all("/etc")
            .and_then(|()| std::fs::write(RESOLV_CONF, format!("nameserver {dns}\n")))
            .map_err(fail("write /etc/resolv.conf"))?;
    }
    Ok(())
}

fn inet_socket(interface: &'static str) -> Result<OwnedFd, NetError> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError {
            step: "open a socket for interface requests",
            interface,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: socket() returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A `struct ifreq` naming `interface`, the rest zero.
fn ifreq(interface: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of plain data); all zeros is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(interface.bytes()) {
        *dst = src as libc::c_char;
    }
    request
}

fn sockaddr_in(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is
    // plain data; this is the cast the socket API is built on.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

fn ioctl(socket: &OwnedFd, request: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
    // SAFETY: every caller passes a request whose argument is the struct `arg` points
    // to, alive for the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request, arg) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn address_ioctl(
    socket: &OwnedFd,
    interface: &str,
    request: libc::c_ulong,
    address: Ipv4Addr,
) -> io::Result<()> {
    let mut req = ifreq(interface);
    req.ifr_ifru.ifru_addr = sockaddr_in(address);
    ioctl(socket, request, (&raw mut req).cast())
}

fn set_up(socket: &OwnedFd, interface: &'static str) -> Result<(), NetError> {
    let mut req = ifreq(interface);
    ioctl(socket, libc::SIOCGIFFLAGS, (&raw mut req).cast()).map_err(|source| NetError {
        step: "read the interface flags",
        interface,
        source,
    })?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(socket, libc::SIOCSIFFLAGS, (&raw mut req).cast()).map_err(|source| NetError {
        step: "bring the interface up",
        interface,
        source,
    })
}

fn add_default_route(socket: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    // SAFETY: rtentry is plain data (addresses, integers, a name pointer that may be
    // null); all zeros is valid.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_in(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(socket, libc::SIOCADDRT, (&raw mut route).cast())
}
