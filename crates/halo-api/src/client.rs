//! The client the CLI uses: one HTTP/1.1 request per call to a node's API.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use halo_control::dial::exchange;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    // The cause is in the message, not a `source`: printed with its
    // chain, it would be said twice.
    #[error("cannot reach the halo API at {addr}: {cause} (is `halo up` running? --api or HALO_API set the address)")]
    Connect { addr: SocketAddr, cause: std::io::Error },
    #[error("TLS with the halo API at {addr} failed: {cause} (--api-ca or HALO_API_CA names the CA that signed its certificate)")]
    Tls { addr: SocketAddr, cause: std::io::Error },
    #[error("talking to the halo API failed")]
    Http(#[from] hyper::Error),
    #[error("the node's answer to {path} is not what this halo reads (is the node another version?): {cause}")]
    Decode { path: String, cause: serde_json::Error },
    #[error("{message}")]
    Api { status: StatusCode, message: String },
}

/// A node's API address and token.
#[derive(Debug, Clone)]
pub struct ApiClient {
    pub addr: SocketAddr,
    pub token: String,
    /// HTTPS, trusting this CA.
    pub tls: Option<std::sync::Arc<halo_proxy::config::UpstreamTls>>,
}

impl ApiClient {
    /// GETs `path` and reads the answer as `T` (a view the API serves).
    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.call(Method::GET, path, None, |_| {}).await?;
        serde_json::from_slice(&body).map_err(|cause| ClientError::Decode { path: path.into(), cause })
    }

    /// Sends a change and reads what it did.
    pub async fn change(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<halo_control::Outcome, ClientError> {
        let answer = self.call(method, path, body, |_| {}).await?;
        serde_json::from_slice(&answer).map_err(|cause| ClientError::Decode { path: path.into(), cause })
    }

    /// Sends one request; a non-2xx answer becomes [`ClientError::Api`]
    /// with the API's error message. Each chunk of the body goes to
    /// `on_chunk` as it arrives (log following); the whole body is returned.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        mut on_chunk: impl FnMut(&[u8]),
    ) -> Result<Bytes, ClientError> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|cause| ClientError::Connect { addr: self.addr, cause })?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(body.unwrap_or_default()))
            .expect("a valid request");
        let (status, all) = match &self.tls {
            None => exchange(stream, req, &mut on_chunk).await?,
            Some(tls) => {
                let io = tls
                    .handshake(stream, self.addr)
                    .await
                    .map_err(|cause| ClientError::Tls { addr: self.addr, cause })?;
                exchange(io, req, &mut on_chunk).await?
            }
        };
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&all)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&all).into_owned());
            return Err(ClientError::Api { status, message });
        }
        Ok(Bytes::from(all))
    }
}
