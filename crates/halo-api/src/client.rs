//! The client the CLI uses: one HTTP/1.1 request per call to a node's API.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use halo_control::dial::{self, DialError};

use crate::code::ErrorCode;

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
    Api { status: StatusCode, code: ErrorCode, message: String },
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
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .header(http::header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(body.unwrap_or_default()))
            .expect("a valid request");
        let addr = self.addr;
        let (status, all) =
            dial::request(addr, self.tls.as_deref(), req, &mut on_chunk).await.map_err(|e| match e {
                DialError::Connect(cause) => ClientError::Connect { addr, cause },
                DialError::Tls(cause) => ClientError::Tls { addr, cause },
                DialError::Http(e) => ClientError::Http(e),
            })?;
        if !status.is_success() {
            let code = serde_json::from_slice::<serde_json::Value>(&all)
                .ok()
                .and_then(|v| serde_json::from_value(v.get("code")?.clone()).ok())
                .unwrap_or(ErrorCode::Other);
            return Err(ClientError::Api { status, code, message: dial::error_message(status, &all) });
        }
        Ok(Bytes::from(all))
    }
}
