//! How this node asks other nodes' APIs (the peers' health probes, backup
//! hooks): one HTTP/1.1 request per connection, over TLS verified against
//! `[node.tls] ca` when the other node's record says its API is HTTPS.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use halo_proxy::config::UpstreamTls;

/// This node's way to other nodes' APIs.
pub struct Dialer {
    /// The cluster's API token, for requests that need it (backup hooks).
    pub token: String,
    /// Trusts the CA that signed every node's API certificate.
    tls: Option<Arc<UpstreamTls>>,
}

impl Dialer {
    pub fn new(token: String, tls: Option<Arc<UpstreamTls>>) -> Dialer {
        Dialer { token, tls }
    }

    /// Sends `req` to the API at `api` (HTTPS when `https`); the answer's
    /// status and body. The caller bounds the time.
    pub async fn send(
        &self,
        api: SocketAddr,
        https: bool,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let tcp = tokio::net::TcpStream::connect(api).await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        if !https {
            return exchange(tcp, req).await;
        }
        let Some(tls) = &self.tls else {
            return Err(format!(
                "the API at {api} is HTTPS: give this node [node.tls] ca = \"FILE\" (the CA that signed every node's \
                 API certificate)"
            ));
        };
        let io = tls.handshake(tcp, api).await.map_err(|e| format!("TLS with {api}: {e}"))?;
        exchange(io, req).await
    }
}

async fn exchange<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, body))
}
