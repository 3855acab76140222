//! Telling the network where a floating IP is now, and asking whether
//! anyone still answers for it: gratuitous ARP (request and reply) for
//! IPv4, an unsolicited neighbour advertisement to all nodes (override
//! set) for IPv6, and an RFC 5227 ARP probe (sender address 0.0.0.0, so
//! no one's cache learns from it) before taking an IPv4 address.
//!
//! Frames are written whole on a packet socket bound to the interface.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::netlink::Interface;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const BROADCAST: [u8; 6] = [0xff; 6];

/// A raw packet socket on interface `index` for `protocol` frames, with a
/// short receive timeout.
#[allow(unsafe_code)]
fn packet_socket(index: u32, protocol: u16) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2)/bind(2)/setsockopt(2) calls on a descriptor
    // this function owns from the moment socket(2) returns it; the
    // addresses passed are fully initialised local values of the sizes
    // given.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(protocol.to_be()));
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = protocol.to_be();
        sll.sll_ifindex = index as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        if libc::bind(fd.as_raw_fd(), (&raw const sll).cast::<libc::sockaddr>(), len) < 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
        let tv_len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        if libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), tv_len) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn arp_frame(mac: [u8; 6], op: u16, sender: Ipv4Addr, target_mac: [u8; 6], target: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&BROADCAST);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, address lengths 6 and 4.
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac);
    f.extend_from_slice(&sender.octets());
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&target.octets());
    f
}

/// One's-complement sum of 16-bit words, as ICMPv6 checksums it.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for p in parts {
        for w in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An unsolicited neighbour advertisement of `ip` at `mac` to all nodes.
fn na_frame(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = Vec::with_capacity(32);
    // Type 136, code 0, checksum (later), flags: override.
    icmp.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
    icmp.extend_from_slice(&ip.octets());
    // Option: target link-layer address (type 2, 8 bytes).
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let len = (icmp.len() as u32).to_be_bytes();
    let sum = checksum(&[&ip.octets(), &all_nodes.octets(), &len, &[0, 0, 0, 58], &icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(14 + 40 + icmp.len());
    f.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    // Next header ICMPv6, hop limit 255 (receivers require it).
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&all_nodes.octets());
    f.extend_from_slice(&icmp);
    f
}

/// Announces that `ip` is at this interface: a gratuitous ARP request and
/// reply (IPv4) or an unsolicited neighbour advertisement (IPv6), `count`
/// times 20 ms apart.
pub fn announce(iface: &Interface, ip: IpAddr, count: usize) -> io::Result<()> {
    let (frames, proto) = match ip {
        IpAddr::V4(v4) => {
            (vec![arp_frame(iface.mac, 1, v4, [0; 6], v4), arp_frame(iface.mac, 2, v4, BROADCAST, v4)], ETH_P_ARP)
        }
        IpAddr::V6(v6) => (vec![na_frame(iface.mac, v6)], ETH_P_IPV6),
    };
    let fd = packet_socket(iface.index, proto)?;
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        for f in &frames {
            nix::unistd::write(&fd, f)?;
        }
    }
    Ok(())
}

/// Asks who has `ip` (an ARP probe) and listens for `listen`: the
/// hardware address of another host that answers, if one does.
pub fn probe(iface: &Interface, ip: Ipv4Addr, listen: Duration) -> io::Result<Option<[u8; 6]>> {
    let fd = packet_socket(iface.index, ETH_P_ARP)?;
    nix::unistd::write(&fd, &arp_frame(iface.mac, 1, Ipv4Addr::UNSPECIFIED, [0; 6], ip))?;
    let deadline = Instant::now() + listen;
    let mut buf = [0u8; 1514];
    while Instant::now() < deadline {
        let n = match nix::unistd::read(&fd, &mut buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(mac) = answer_for(&buf[..n], ip).filter(|m| *m != iface.mac) {
            return Ok(Some(mac));
        }
    }
    Ok(None)
}

/// The sender of an ARP reply (or announcement) for `ip` in this frame.
fn answer_for(f: &[u8], ip: Ipv4Addr) -> Option<[u8; 6]> {
    if f.len() < 42 || f[12..14] != ETH_P_ARP.to_be_bytes() || f[14..20] != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    let op = u16::from_be_bytes([f[20], f[21]]);
    let sender: [u8; 4] = f[28..32].try_into().ok()?;
    (op == 2 && Ipv4Addr::from(sender) == ip).then(|| f[22..28].try_into().expect("6 bytes"))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arp_reply_is_recognised_by_its_sender_address() {
        let ip = Ipv4Addr::new(10, 0, 0, 100);
        let mac = [2, 0, 0, 0, 0, 9];
        let reply = arp_frame(mac, 2, ip, [0; 6], Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(answer_for(&reply, ip), Some(mac));
        let request = arp_frame(mac, 1, ip, [0; 6], ip);
        assert_eq!(answer_for(&request, ip), None, "a request is not an answer");
        assert_eq!(answer_for(&reply, Ipv4Addr::new(10, 0, 0, 101)), None);
    }

    #[test]
    fn a_neighbour_advertisement_checksums_to_zero() {
        let f = na_frame([2, 0, 0, 0, 0, 9], "fd00::100".parse().unwrap());
        let ip: [u8; 16] = f[22..38].try_into().unwrap();
        let dst: [u8; 16] = f[38..54].try_into().unwrap();
        let icmp = &f[54..];
        let len = (icmp.len() as u32).to_be_bytes();
        // A correct checksum makes the whole sum (with it) all ones.
        assert_eq!(checksum(&[&ip, &dst, &len, &[0, 0, 0, 58], icmp]), 0);
        assert_eq!(icmp.len(), 32);
    }
}
