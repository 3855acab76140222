//! How nodes ask nodes' APIs: this node's peers' health probes and backup
//! hooks ([`Dialer`]) and the CLI's client, one HTTP/1.1 request per
//! connection, over TLS verified against a CA when the API is HTTPS.

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
    ) -> Result<(StatusCode, Vec<u8>), SendError> {
        let tls = match (https, &self.tls) {
            (false, _) => None,
            (true, Some(tls)) => Some(&**tls),
            (true, None) => return Err(SendError::NoCa(api)),
        };
        request(api, tls, req, &mut |_| {}).await.map_err(|e| match e {
            DialError::Tls(source) => SendError::Tls { api, source },
            e => SendError::Dial(e),
        })
    }
}

/// Why a request to a node's API got no answer.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Tls(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// Why another node's API gave this one no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(
        "the API at {0} is HTTPS: give this node [node.tls] ca = \"FILE\" (the CA that signed every node's API \
         certificate)"
    )]
    NoCa(SocketAddr),
    #[error("TLS with {api}: {source}")]
    Tls { api: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Dial(DialError),
}

/// One HTTP/1.1 request on a new connection to `api`, over TLS verified by
/// `tls` when given: the status and the whole body, each chunk of a
/// successful answer also given to `on_chunk` as it arrives (the CLI's log
/// following). The CLI's client and this node's [`Dialer`] both use it.
pub async fn request(
    api: SocketAddr,
    tls: Option<&UpstreamTls>,
    req: Request<Full<Bytes>>,
    on_chunk: &mut impl FnMut(&[u8]),
) -> Result<(StatusCode, Vec<u8>), DialError> {
    let tcp = tokio::net::TcpStream::connect(api).await.map_err(DialError::Connect)?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => exchange(tcp, req, on_chunk).await,
        Some(tls) => exchange(tls.handshake(tcp, api).await.map_err(DialError::Tls)?, req, on_chunk).await,
    }
}

/// What an API's error answer says: its JSON `error`, else its body as
/// text, else its status.
pub fn error_message(status: StatusCode, body: &[u8]) -> String {
    let error = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string));
    match error {
        Some(e) => e,
        None if body.is_empty() => status.to_string(),
        None => String::from_utf8_lossy(body).into_owned(),
    }
}

async fn exchange<IO>(
    io: IO,
    req: Request<Full<Bytes>>,
    on_chunk: &mut impl FnMut(&[u8]),
) -> Result<(StatusCode, Vec<u8>), DialError>
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
