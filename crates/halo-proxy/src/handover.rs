//! Zero-downtime binary upgrade, the proxy's part: an old process hands
//! its listening sockets (and the address claims, and the endpoints'
//! health) to a new process over a Unix socket, the descriptors riding
//! along as SCM_RIGHTS, as HAProxy, pingora and sozu do. The sockets are
//! the same kernel sockets, so no connection in an accept queue is lost
//! and no port is ever unbound; the old process then stops accepting and
//! drains, the new one accepts from the same queues.
//!
//! Wire format: one message, a 4-byte big-endian length and a JSON
//! [`Manifest`], the descriptors attached to its first bytes in the order
//! the manifest lists them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// At most this many descriptors in one handover (the kernel's
/// SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;

/// What the old process hands over, besides the descriptors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub pid: u32,
    pub listeners: Vec<ListenerFds>,
    /// The admin listener (one descriptor), when there is one.
    pub admin: Option<SocketAddr>,
    /// Other listening sockets by name (the node API), one descriptor each.
    pub extra: Vec<(String, SocketAddr)>,
    pub endpoints: Vec<EndpointState>,
}

/// One listener: `sockets` descriptors (one per worker), then its
/// address claim's lock file when `claim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerFds {
    pub name: String,
    /// As configured (port 0 stays 0) and as bound.
    pub addr: SocketAddr,
    pub bound: SocketAddr,
    pub sockets: usize,
    pub claim: bool,
}

/// An endpoint's health, so that the new process does not relearn it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointState {
    pub upstream: String,
    pub addr: SocketAddr,
    pub active_up: bool,
    /// How much of a passive ejection is left.
    pub ejected_for_ms: u64,
    pub ejections: u32,
}

/// Sends `manifest` with `fds` (in the manifest's order).
pub fn send(stream: &UnixStream, manifest: &Manifest, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("{} sockets to hand over; at most {MAX_FDS}", fds.len())));
    }
    let body = serde_json::to_vec(manifest).map_err(io::Error::other)?;
    let mut msg = (body.len() as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsgs = if raw.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&raw)] };
    let sent = sendmsg::<()>(stream.as_raw_fd(), &[IoSlice::new(&msg)], &cmsgs, MsgFlags::empty(), None)
        .map_err(io::Error::from)?;
    // The descriptors went with the first bytes; the rest is plain.
    let mut w = stream;
    w.write_all(&msg[sent..])?;
    w.flush()
}

/// Receives a manifest and its descriptors, reading nothing past it.
pub fn recv(stream: &UnixStream) -> io::Result<(Manifest, Vec<OwnedFd>)> {
    // The length first: the descriptors ride on its bytes.
    let mut first = [0u8; 4];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, raw) = {
        let mut iov = [IoSliceMut::new(&mut first)];
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(io::Error::from)?;
        let mut raw = Vec::new();
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                raw.extend(fds);
            }
        }
        (msg.bytes, raw)
    };
    let fds: Vec<OwnedFd> = raw.into_iter().map(own).collect();
    if n == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the old process closed before its manifest"));
    }
    let mut r = stream;
    r.read_exact(&mut first[n..])?;
    let len = u32::from_be_bytes(first) as usize;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let manifest: Manifest = serde_json::from_slice(&body).map_err(io::Error::other)?;
    Ok((manifest, fds))
}

/// Takes ownership of a descriptor the kernel just gave this process.
#[allow(unsafe_code)]
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` came out of an SCM_RIGHTS message received just now:
    // the kernel installed it in this process for us, nothing else knows
    // or owns it, and it is wrapped exactly once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// What a new process took over, by what it is for.
#[derive(Default)]
pub struct Inherited {
    pub listeners: HashMap<(String, SocketAddr), InheritedListener>,
    pub admin: Option<(SocketAddr, TcpListener)>,
    pub extra: HashMap<String, TcpListener>,
    pub endpoints: Vec<EndpointState>,
    /// The old process.
    pub from_pid: u32,
}

pub struct InheritedListener {
    pub bound: SocketAddr,
    pub sockets: Vec<TcpListener>,
    pub claim: Option<File>,
}

impl Inherited {
    /// Sorts the descriptors of a received manifest into what they are.
    pub fn new(m: Manifest, fds: Vec<OwnedFd>) -> io::Result<Inherited> {
        let want = m.listeners.iter().map(|l| l.sockets + usize::from(l.claim)).sum::<usize>()
            + usize::from(m.admin.is_some())
            + m.extra.len();
        if want != fds.len() {
            return Err(io::Error::other(format!("the manifest lists {want} sockets, {} came", fds.len())));
        }
        let mut fds = fds.into_iter();
        let mut next = || fds.next().ok_or_else(|| io::Error::other("descriptor missing"));
        let listener = |fd: OwnedFd| -> io::Result<TcpListener> {
            let l = TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let mut out = Inherited { from_pid: m.pid, endpoints: m.endpoints, ..Inherited::default() };
        for l in m.listeners {
            let sockets = (0..l.sockets).map(|_| listener(next()?)).collect::<io::Result<Vec<_>>>()?;
            let claim = if l.claim { Some(File::from(next()?)) } else { None };
            out.listeners.insert((l.name, l.addr), InheritedListener { bound: l.bound, sockets, claim });
        }
        if let Some(a) = m.admin {
            out.admin = Some((a, listener(next()?)?));
        }
        for (name, _) in m.extra {
            out.extra.insert(name, listener(next()?)?);
        }
        Ok(out)
    }
}
