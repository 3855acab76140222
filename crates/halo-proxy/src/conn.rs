//! Connections, plain TCP or TLS: downstream ([`Conn`], TLS terminated
//! here) as the HTTP/1.1 codec and tunnels use it (read, write, split
//! into halves, wait for bytes before taking memory for them), and
//! upstream ([`UpIo`], TLS to the endpoint) as pools hold it.
//!
//! Writes may sit in the TLS layer until flushed: whoever writes flushes
//! before waiting on anything else (a no-op on plain TCP).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An upstream connection: plain TCP or TLS to the endpoint.
pub enum UpIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpIo {
    /// The socket under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpIo::Plain(s) => s,
            UpIo::Tls(s) => s.get_ref().0,
        }
    }
}

impl Conn {
    /// Resolves when a read would find bytes (or an end): the socket is
    /// readable, or the TLS layer holds decrypted bytes already. Polled,
    /// not a future of tokio's: the socket keeps the waker, so a connection
    /// waiting here (an idle keep-alive one) holds a pointer, not a waiter
    /// of some 250 bytes.
    pub fn readable(&mut self) -> impl std::future::Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(move |cx| self.poll_readable(cx))
    }

    pub fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Conn::Plain(s) => s.poll_read_ready(cx),
            Conn::Tls(s) => {
                let (tcp, session) = s.get_mut();
                match session.process_new_packets() {
                    Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {
                        tcp.poll_read_ready(cx)
                    }
                    // Bytes, an end or an error: the next read says which.
                    _ => Poll::Ready(Ok(())),
                }
            }
        }
    }

    /// Borrowed halves, for reading a request body while the response is
    /// written.
    pub fn split(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        match self {
            Conn::Plain(s) => {
                let (r, w) = s.split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Conn::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// Owned halves, for a tunnel.
    pub fn into_split(self) -> (OwnedRead, OwnedWrite) {
        match self {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                (OwnedRead::Plain(r), OwnedWrite::Plain(w))
            }
            Conn::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (OwnedRead::Tls(r), OwnedWrite::Tls(w))
            }
        }
    }
}

/// The halves of a connection borrowed for one exchange.
pub enum ReadHalf<'a> {
    Plain(tokio::net::tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>),
}

pub enum WriteHalf<'a> {
    Plain(tokio::net::tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>),
}

/// The read side of a tunnel.
pub enum OwnedRead {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream<TcpStream>>),
}

/// The write side of a tunnel.
pub enum OwnedWrite {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream<TcpStream>>),
}

impl OwnedRead {
    /// Reads what is there into `buf` (cleared first), holding no buffer
    /// while the peer is quiet: `buf` is given memory once bytes are
    /// ready, and given back when none came for `release`. 0: the end.
    pub async fn read_some(&mut self, buf: &mut Vec<u8>, size: usize, release: Duration) -> io::Result<usize> {
        buf.clear();
        match self {
            OwnedRead::Plain(r) => loop {
                if buf.capacity() == 0 {
                    r.readable().await?;
                    buf.reserve_exact(size);
                }
                match r.try_read_buf(buf) {
                    // A timer only when the peer pauses, not per read.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if tokio::time::timeout(release, r.readable()).await.is_err() {
                            *buf = Vec::new();
                        }
                    }
                    other => return other,
                }
            },
            // Decrypted bytes may be waiting inside the TLS layer, which a
            // socket readiness check cannot see: read with a buffer.
            OwnedRead::Tls(r) => {
                buf.reserve_exact(size);
                r.read_buf(buf).await
            }
        }
    }
}

/// Delegates `AsyncRead` of an enum over `Unpin` readers.
macro_rules! delegate_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

/// Delegates `AsyncWrite` of an enum over `Unpin` writers.
macro_rules! delegate_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_read!(Conn);
delegate_write!(Conn);
delegate_read!(UpIo);
delegate_write!(UpIo);
delegate_read!(ReadHalf<'_>);
delegate_write!(WriteHalf<'_>);
delegate_read!(OwnedRead);
delegate_write!(OwnedWrite);
