//! The API over HTTPS (`[node.tls]`): a listener that hands axum only
//! connections whose TLS handshake completed. Handshakes run on their own
//! tasks (10 s each at most), so a client that stalls in one holds up no
//! other.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use halo_proxy::config::TlsListener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// Where a request came from, for the change log; for plain and TLS
/// connections alike.
#[derive(Debug, Clone, Copy)]
pub struct Remote(pub SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for Remote {
    fn connect_info(s: IncomingStream<'_, TcpListener>) -> Remote {
        Remote(*s.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsApiListener>> for Remote {
    fn connect_info(s: IncomingStream<'_, TlsApiListener>) -> Remote {
        Remote(*s.remote_addr())
    }
}

/// Accepts TCP connections and yields those that completed a TLS
/// handshake with the node's certificate.
pub struct TlsApiListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsApiListener {
    pub fn new(listener: TcpListener, tls: Arc<TlsListener>) -> std::io::Result<TlsApiListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(async move {
            let acceptor = tls.acceptor_http1();
            loop {
                let (tcp, from) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin.
                        tracing::debug!(error = %e, "accepting an API connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, from)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%from, error = %e, "API TLS handshake failed"),
                        Err(_) => tracing::debug!(%from, "API TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsApiListener { local, ready, accepting })
    }
}

impl Drop for TlsApiListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Listener for TlsApiListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended (it never does while the listener
            // lives): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
