//! Binding listener sockets, one per worker, without ever sharing a port
//! with another process. `SO_REUSEPORT` lets this process's workers bind
//! one address; it would also let a second halo join the address and take
//! half its connections. So a listener first claims its address (a lock
//! file held for the listener's life, which a second halo cannot take),
//! then probe-binds it without `SO_REUSEPORT` (which fails while any
//! other program listens there), and only then binds the workers' sockets.
//! An address in use is an error naming it and, where `/proc` tells, the
//! process that holds it.

use std::fs::File;
use std::io::{Error, ErrorKind};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;

/// A non-blocking listening socket; `reuse_port` lets several workers bind
/// the same address; `freebind` binds an address this host does not have
/// (yet): a floating IP, which only the node holding it has.
pub fn bind(addr: SocketAddr, reuse_port: bool, freebind: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    if freebind {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpFreebind, &true)?;
    }
    socket.bind(addr).map_err(|e| in_use(addr, e))?;
    let std: TcpListener = socket.listen(4096)?.into_std()?;
    std.set_nonblocking(true)?;
    Ok(std)
}

/// A listener's sockets, one per worker, and its claim on the address.
pub struct BoundSet {
    /// The bound address (port 0 resolved).
    pub local: SocketAddr,
    pub sockets: Vec<TcpListener>,
    /// Held while the listener lives.
    pub claim: Option<Claim>,
}

/// This process's hold on a listening address.
pub struct Claim {
    lock: File,
}

impl Claim {
    /// A claim handed over by an old process (its lock file, still locked).
    pub fn inherited(lock: File) -> Claim {
        Claim { lock }
    }

    /// The lock file, to hand the claim to a new process (the lock
    /// belongs to the open file, which both then share).
    pub fn file(&self) -> &File {
        &self.lock
    }
}

/// Binds `addr` once per worker (`SO_REUSEPORT` when more than one); port 0
/// resolves on the first socket and the others join it.
pub fn bind_set(addr: SocketAddr, n: usize, freebind: bool) -> std::io::Result<BoundSet> {
    let claim = if addr.port() == 0 { None } else { Some(claim(addr)?) };
    if addr.port() != 0 && n > 1 {
        // Fails while anyone else listens here, SO_REUSEPORT or not.
        drop(bind(addr, false, freebind)?);
    }
    let first = bind(addr, n > 1, freebind)?;
    let local = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..n {
        sockets.push(bind(local, true, freebind)?);
    }
    Ok(BoundSet { local, sockets, claim })
}

/// The address's lock file, in the private runtime directory.
fn lock_path(addr: SocketAddr) -> std::io::Result<PathBuf> {
    let name = format!("{}_{}.lock", addr.ip().to_string().replace(':', "-"), addr.port());
    Ok(crate::run_dir::sub("listen")?.join(name))
}

/// Takes the address's lock file, or says who holds it.
fn claim(addr: SocketAddr) -> std::io::Result<Claim> {
    use std::io::{Seek, Write};
    let path = lock_path(addr)?;
    let mut lock = crate::run_dir::open_private(&path)
        .map_err(|e| Error::new(e.kind(), format!("cannot claim {addr} through {}: {e}", path.display())))?;
    match lock.try_lock() {
        Ok(()) => {
            // Through the locked file itself, never by its name again.
            lock.set_len(0)?;
            lock.rewind()?;
            lock.write_all(std::process::id().to_string().as_bytes())?;
            Ok(Claim { lock })
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok());
            let holder = listener_of(addr).or_else(|| pid.map(|p| (p, command_of(p))));
            Err(Error::new(ErrorKind::AddrInUse, describe(addr, holder)))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// `e`, or for an address in use, who uses it.
fn in_use(addr: SocketAddr, e: Error) -> Error {
    if e.kind() != ErrorKind::AddrInUse {
        return e;
    }
    Error::new(ErrorKind::AddrInUse, describe(addr, listener_of(addr)))
}

fn describe(addr: SocketAddr, holder: Option<(u32, String)>) -> String {
    match holder {
        Some((pid, cmd)) if !cmd.is_empty() => format!("{addr} is in use by pid {pid} ({cmd})"),
        Some((pid, _)) => format!("{addr} is in use by pid {pid}"),
        None => format!("{addr} is in use by another program"),
    }
}

/// A process's command line, shortened.
fn command_of(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut cmd: String = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a)).collect::<Vec<_>>().join(" ");
    cmd = cmd.trim().to_string();
    if cmd.len() > 80 {
        cmd.truncate(cmd.char_indices().nth(77).map_or(cmd.len(), |(i, _)| i));
        cmd.push_str("...");
    }
    cmd
}

/// The process with a socket listening on `addr` (or on the wildcard of
/// its family, or `addr` being the wildcard), from `/proc`.
fn listener_of(addr: SocketAddr) -> Option<(u32, String)> {
    let inode = listening_inodes(addr).into_iter().next()?;
    let needle = format!("socket:[{inode}]");
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()) {
                return Some((pid, command_of(pid)));
            }
        }
    }
    None
}

/// Inodes of listening TCP sockets that conflict with `addr`.
fn listening_inodes(addr: SocketAddr) -> Vec<u64> {
    let file = if addr.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((ip_hex, port_hex)) = f[1].split_once(':') else { continue };
        if u16::from_str_radix(port_hex, 16).ok() != Some(addr.port()) {
            continue;
        }
        let Some(ip) = parse_proc_ip(ip_hex) else { continue };
        if ip == addr.ip() || ip.is_unspecified() || addr.ip().is_unspecified() {
            if let Ok(inode) = f[9].parse() {
                out.push(inode);
            }
        }
    }
    out
}

/// An address as `/proc/net/tcp*` prints it: 32-bit words, each in host
/// (little-endian) order.
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> =
        (0..hex.len() / 8).map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()).collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_on_an_address_names_the_holder() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let held = bind_set(addr, 2, false).unwrap();
        assert_eq!(held.sockets.len(), 2);
        // The claim is per process: a second halo would be refused by
        // the lock; within this process the probe bind refuses it.
        let e = bind(addr, false, false).expect_err("the address is taken");
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("{addr} is in use by pid {}", std::process::id())), "{msg}");
        drop(held);
        let again = bind_set(addr, 2, false).expect("released with the listener");
        drop(again);
    }

    #[test]
    fn proc_addresses_parse() {
        assert_eq!(parse_proc_ip("0100007F"), Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(parse_proc_ip("00000000000000000000000001000000"), Some("::1".parse().unwrap()));
    }
}
