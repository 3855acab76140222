//! The floating address on an interface, through rtnetlink: add it with a
//! lifetime the kernel enforces, refresh that lifetime, remove it. No
//! `ip` command: one request per change on a netlink route socket, the
//! kernel's acknowledgement read back.
//!
//! The lifetime is what makes a frozen or dead holder safe: the kernel
//! removes the address [`LIFETIME_SECS`] after the last refresh whatever
//! the process is doing, so a holder that stopped renewing cannot keep
//! the address on the wire. (The kernel checks lifetimes to about a
//! quarter of a second.)

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

/// Seconds the kernel keeps the address after each refresh (its
/// `valid_lft` and `preferred_lft`; whole seconds is what it takes).
pub const LIFETIME_SECS: u32 = 1;

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_CACHEINFO: u16 = 6;
const IFA_FLAGS: u16 = 8;
/// IPv6: usable at once, no duplicate address detection (a second of
/// tentative state); halo's lease is what keeps the address unique.
const IFA_F_NODAD: u32 = 0x02;

/// One address on one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    pub index: u32,
    pub ip: IpAddr,
    pub prefix: u8,
}

fn route_socket() -> io::Result<OwnedFd> {
    let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &NetlinkAddr::new(0, 0))?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(1, 0))?;
    Ok(fd)
}

fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn message(kind: u16, flags: u16, a: &IfAddr, lifetime: Option<u32>) -> Vec<u8> {
    let (family, bytes) = match a.ip {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let mut m = vec![0u8; 16];
    // struct ifaddrmsg: family, prefix length, flags, scope (universe), index.
    m.extend_from_slice(&[family, a.prefix, 0, 0]);
    m.extend_from_slice(&a.index.to_ne_bytes());
    attr(&mut m, IFA_LOCAL, &bytes);
    attr(&mut m, IFA_ADDRESS, &bytes);
    if let Some(secs) = lifetime {
        // struct ifa_cacheinfo: preferred, valid, (created, updated: ignored).
        let mut ci = Vec::with_capacity(16);
        for v in [secs, secs, 0, 0] {
            ci.extend_from_slice(&v.to_ne_bytes());
        }
        attr(&mut m, IFA_CACHEINFO, &ci);
        if a.ip.is_ipv6() {
            attr(&mut m, IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes());
        }
    }
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m[8..12].copy_from_slice(&1u32.to_ne_bytes());
    m
}

/// Sends one request and reads the kernel's answer: `Ok` for an
/// acknowledgement, the errno it names otherwise.
fn request(m: &[u8]) -> io::Result<()> {
    let fd = route_socket()?;
    sendto(std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()), m, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    let mut buf = [0u8; 4096];
    loop {
        let n = recv(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut buf, MsgFlags::empty())?;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if kind == NLMSG_ERROR && at + 20 <= n {
                let code = i32::from_ne_bytes(buf[at + 16..at + 20].try_into().expect("4 bytes"));
                return if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-code)) };
            }
            if len < 16 {
                break;
            }
            at += (len + 3) & !3;
        }
    }
}

/// Adds the address, or refreshes its lifetime if it is there already.
pub fn put(a: &IfAddr) -> io::Result<()> {
    request(&message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, a, Some(LIFETIME_SECS)))
}

/// Removes the address; one that is not there (the kernel's lifetime
/// ran out, or someone removed it) is no error.
pub fn remove(a: &IfAddr) -> io::Result<()> {
    match request(&message(RTM_DELADDR, 0, a, None)) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL) | Some(libc::ENOENT) | Some(libc::ENODEV)) => {
            Ok(())
        }
        other => other,
    }
}

/// An interface of this host: its index and hardware address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub mac: [u8; 6],
}

/// Looks `name` up; the error says what is missing.
pub fn interface(name: &str) -> Result<Interface, String> {
    let index = nix::net::if_::if_nametoindex(name).map_err(|_| format!("interface {name} does not exist here"))?;
    let mut mac = None;
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs.filter(|a| a.interface_name == name) {
            if let Some(l) = a.address.as_ref().and_then(|s| s.as_link_addr()) {
                mac = l.addr();
            }
        }
    }
    let mac = mac.ok_or_else(|| format!("interface {name} has no Ethernet address (floating IPs need one)"))?;
    Ok(Interface { index, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_add_request_is_laid_out_as_the_kernel_reads_it() {
        let a = IfAddr { index: 7, ip: "10.0.0.100".parse().unwrap(), prefix: 24 };
        let m = message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &a, Some(1));
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len());
        assert_eq!(&m[16..20], &[libc::AF_INET as u8, 24, 0, 0]);
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        // IFA_LOCAL, IFA_ADDRESS (8 bytes each), IFA_CACHEINFO (20).
        assert_eq!(m.len(), 24 + 8 + 8 + 20);
        assert_eq!(&m[28..32], &[10, 0, 0, 100]);
    }
}
