//! The PROXY protocol (HAProxy's, versions 1 and 2): the client address a
//! load balancer in front of halo saw, sent as a header before the
//! connection's own bytes; and the header halo sends to upstreams that
//! want to know the client's address.
//!
//! A listener with `proxy_protocol_from` requires the header from those
//! sources and refuses a connection from anywhere else that starts with
//! one (it would be a forged client address). The header is read with
//! exact reads after peeks, so not one byte of what follows is consumed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The 12 bytes every version 2 header starts with.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line (the spec's 107 bytes).
const V1_MAX: usize = 107;

/// Which version to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A network `ADDR/BITS` (or one address) a header may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("'{s}' is not accepted; expected an address or ADDR/BITS such as 10.0.0.0/8 or ::1");
        let (ip, bits) = match s.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net: IpAddr = ip.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        if bits > max {
            return Err(bad());
        }
        Ok(Cidr { net, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) if self.net.is_ipv4() => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            _ => ip,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("a PROXY protocol header from {0}, which is not in the listener's proxy_protocol_from")]
    Untrusted(IpAddr),
    #[error("no PROXY protocol header from {0}, which the listener requires it from")]
    Missing(IpAddr),
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads the header a trusted source must send: the client address it
/// names (`None`: the header says the connection is the balancer's own,
/// as a health check's). An untrusted source only has its first bytes
/// looked at: if they are a header, the connection is refused.
pub async fn accept(stream: &mut TcpStream, peer: SocketAddr, trusted: bool) -> Result<Option<SocketAddr>, Refused> {
    if !trusted {
        // Six bytes tell: "PROXY " or the start of the v2 signature,
        // neither of which begins any request.
        let mut head = [0u8; 6];
        let n = peek_at_least(stream, &mut head, 6).await?;
        let forged = n > 0 && (head[..n] == b"PROXY "[..n] || head[..n] == V2_SIG[..n]);
        return if forged { Err(Refused::Untrusted(peer.ip())) } else { Ok(None) };
    }
    let mut head = [0u8; 16];
    let n = peek_at_least(stream, &mut head, 16).await?;
    if n == 16 && head[..12] == *V2_SIG {
        return read_v2(stream, &head).await;
    }
    if head[..n].starts_with(b"PROXY ") {
        return read_v1(stream).await;
    }
    Err(Refused::Missing(peer.ip()))
}

/// Peeks until `want` bytes are there, the peer closes, or the buffer is
/// full; how many are there.
async fn peek_at_least(stream: &TcpStream, buf: &mut [u8], want: usize) -> io::Result<usize> {
    peek_until(stream, buf, |b| b.len() >= want).await
}

/// Peeks until `done` says what is there is enough, the peer closes, or
/// the buffer is full; how many bytes are there.
async fn peek_until(stream: &TcpStream, buf: &mut [u8], done: impl Fn(&[u8]) -> bool) -> io::Result<usize> {
    let mut last = 0;
    loop {
        let n = stream.peek(buf).await?;
        if n == 0 || n == buf.len() || done(&buf[..n]) {
            return Ok(n);
        }
        if n == last {
            // Part of it so far: wait for more.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        last = n;
    }
}

async fn read_v1(stream: &mut TcpStream) -> Result<Option<SocketAddr>, Refused> {
    let mut line = [0u8; V1_MAX];
    let n = peek_until(stream, &mut line, |b| b.windows(2).any(|w| w == b"\r\n")).await?;
    let end = line[..n]
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or(Refused::Malformed("v1 line without CRLF in 107 bytes"))?;
    let mut taken = vec![0u8; end + 2];
    stream.read_exact(&mut taken).await?;
    let text = std::str::from_utf8(&taken[..end]).map_err(|_| Refused::Malformed("v1 line is not text"))?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", family @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| Refused::Malformed("v1 source address"))?;
            if ip.is_ipv4() != (*family == "TCP4") {
                return Err(Refused::Malformed("v1 address family differs from the address"));
            }
            let port: u16 = sport.parse().map_err(|_| Refused::Malformed("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(Refused::Malformed("v1 line is not PROXY TCP4|TCP6|UNKNOWN ...")),
    }
}

async fn read_v2(stream: &mut TcpStream, head: &[u8; 16]) -> Result<Option<SocketAddr>, Refused> {
    if head[12] >> 4 != 2 {
        return Err(Refused::Malformed("v2 version is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut all = vec![0u8; 16 + len];
    stream.read_exact(&mut all).await?;
    let body = &all[16..];
    match head[12] & 0x0F {
        // LOCAL: the balancer's own connection.
        0 => return Ok(None),
        1 => {}
        _ => return Err(Refused::Malformed("v2 command is neither LOCAL nor PROXY")),
    }
    match head[13] {
        // TCP over IPv4: src, dst, sport, dport.
        0x11 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Some(SocketAddr::new(ip.into(), u16::from_be_bytes([body[8], body[9]]))))
        }
        0x21 if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().map_err(|_| Refused::Malformed("v2 address"))?;
            Ok(Some(SocketAddr::new(Ipv6Addr::from(octets).into(), u16::from_be_bytes([body[32], body[33]]))))
        }
        0x11 | 0x21 => Err(Refused::Malformed("v2 address block too short")),
        // UNSPEC, UDP or unix sockets: keep the connection's own address.
        _ => Ok(None),
    }
}

/// The header announcing a connection from `src` to `dst`.
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    // Mixed families (an IPv4 client on an IPv6 socket) go as IPv6.
    let (src, dst) = match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => (src, dst),
        _ => (v6(src), v6(dst)),
    };
    match version {
        Version::V1 => {
            let family = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes()
        }
        Version::V2 => {
            let mut out = V2_SIG.to_vec();
            out.push(0x21);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let six = |ip: IpAddr| match ip {
                        IpAddr::V6(v) => v.octets(),
                        IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
                    };
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&six(s));
                    out.extend_from_slice(&six(d));
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

/// The header of a connection halo makes itself (a health check).
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIG.to_vec();
            out.extend_from_slice(&[0x20, 0x00, 0, 0]);
            out
        }
    }
}

fn v6(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_networks_only() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped");
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()) && !one.contains("127.0.0.2".parse().unwrap()));
        let six: Cidr = "fd00::/8".parse().unwrap();
        assert!(six.contains("fd12::1".parse().unwrap()) && !six.contains("fe80::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err() && "nope".parse::<Cidr>().is_err());
        let odd: Cidr = "192.168.0.0/23".parse().unwrap();
        assert!(odd.contains("192.168.1.255".parse().unwrap()) && !odd.contains("192.168.2.0".parse().unwrap()));
    }

    #[test]
    fn encoded_headers_have_the_spec_layout() {
        let (s, d) = ("192.0.2.1:5000".parse().unwrap(), "198.51.100.2:443".parse().unwrap());
        assert_eq!(encode(Version::V1, s, d), b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 443\r\n");
        let v2 = encode(Version::V2, s, d);
        assert_eq!(&v2[..16], b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c");
        assert_eq!(&v2[16..], &[192, 0, 2, 1, 198, 51, 100, 2, 0x13, 0x88, 0x01, 0xbb]);
        let mixed = encode(Version::V1, s, "[::1]:80".parse().unwrap());
        assert!(mixed.starts_with(b"PROXY TCP6 ::ffff:192.0.2.1 ::1 "), "{}", String::from_utf8_lossy(&mixed));
    }
}
