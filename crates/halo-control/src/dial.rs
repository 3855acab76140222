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
            return exchange(tcp, req, &mut |_| {}).await.map(body).map_err(|e| e.to_string());
        }
        let Some(tls) = &self.tls else {
            return Err(format!(
                "the API at {api} is HTTPS: give this node [node.tls] ca = \"FILE\" (the CA that signed every node's \
                 API certificate)"
            ));
        };
        let io = tls.handshake(tcp, api).await.map_err(|e| format!("TLS with {api}: {e}"))?;
        exchange(io, req, &mut |_| {}).await.map(body).map_err(|e| e.to_string())
    }
}

fn body((status, all): (StatusCode, Vec<u8>)) -> (StatusCode, Bytes) {
    (status, Bytes::from(all))
}

/// One HTTP/1.1 request on a connected socket (plain or TLS): the status
/// and the whole body, each chunk of a successful answer also given to
/// `on_chunk` as it arrives (the CLI's log following).
pub async fn exchange<IO>(
    io: IO,
    req: Request<Full<Bytes>>,
    on_chunk: &mut impl FnMut(&[u8]),
) -> Result<(StatusCode, Vec<u8>), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut all = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if status.is_success() {
                on_chunk(&data);
            }
            all.extend_from_slice(&data);
        }
    }
    Ok((status, all))
}
