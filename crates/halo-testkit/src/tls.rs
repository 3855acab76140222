//! Certificates made by the test (rcgen: a CA and leaves it signs) and a
//! TLS client that trusts that CA, for HTTPS listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A certificate authority for one test.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate: its PEM files' text and its DER (to compare with
/// what a server presented).
#[derive(Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Leaf {
    /// Writes `STEM.crt` and `STEM.key` into `dir`.
    pub fn write(&self, dir: &crate::TempDir, stem: &str) -> (PathBuf, PathBuf) {
        (dir.write(&format!("{stem}.crt"), &self.cert_pem), dir.write(&format!("{stem}.key"), &self.key_pem))
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "halo test CA");
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa { cert, key }
    }

    /// The CA's certificate, PEM: what a client trusts.
    pub fn ca_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (DNS names, `*.x` wildcards allowed).
    pub fn issue(&self, names: &[&str]) -> Leaf {
        self.issue_until(names, false)
    }

    /// A self-signed certificate for `names` that says it is a CA, as
    /// `openssl req -x509` makes them: its own trust anchor.
    pub fn self_signed(names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed certificate");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// A certificate that expired on 2020-01-01.
    pub fn issue_expired(&self, names: &[&str]) -> Leaf {
        self.issue_until(names, true)
    }

    fn issue_until(&self, names: &[&str], expired: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("leaf certificate");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().to_vec() }
    }

    /// A client config trusting this CA, offering `alpn`. Sessions are
    /// not resumed: every connection is a full handshake and sees the
    /// certificate served now.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("CA root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg.resumption = rustls::client::Resumption::disabled();
        Arc::new(cfg)
    }
}

/// What one HTTPS exchange saw.
#[derive(Debug)]
pub struct HttpsReply {
    pub status: u16,
    pub body: String,
    /// The server's leaf certificate.
    pub peer: Vec<u8>,
    pub alpn: Option<Vec<u8>>,
}

/// Opens a TLS connection to `to` for `sni`, sends `GET path` over
/// HTTP/1.1 (connection: close) and reads the whole answer.
pub async fn https_get(
    to: SocketAddr,
    sni: &str,
    path: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> Result<HttpsReply, String> {
    let tcp = TcpStream::connect(to).await.map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| format!("server name {sni}: {e}"))?;
    let mut tls = TlsConnector::from(cfg.clone()).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
    let (peer, alpn) = {
        let (_, c) = tls.get_ref();
        let peer =
            c.peer_certificates().and_then(|p| p.first()).map(|c: &CertificateDer| c.to_vec()).unwrap_or_default();
        (peer, c.alpn_protocol().map(<[u8]>::to_vec))
    };
    let req = format!("GET {path} HTTP/1.1\r\nhost: {sni}\r\nconnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    // A server may end without close_notify; what arrived counts.
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok(HttpsReply { status, body, peer, alpn })
}

/// `GET path` over HTTP/2 on a TLS connection that must negotiate `h2`
/// by ALPN (`cfg` offers it); the status and body.
pub async fn https_h2_get(
    to: SocketAddr,
    sni: &str,
    path: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    let tcp = TcpStream::connect(to).await.map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(sni.to_string()).map_err(|e| format!("server name {sni}: {e}"))?;
    let tls = TlsConnector::from(cfg.clone()).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(format!("ALPN chose {:?}, not h2", tls.get_ref().1.alpn_protocol()));
    }
    let io = hyper_util::rt::TokioIo::new(tls);
    let (mut send, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://{sni}{path}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| format!("h2 request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| format!("h2 body: {e}"))?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A TLS server presenting `leaf`, answering every request with 200 and
/// its `name`, one request per connection.
pub struct HttpsServer {
    pub addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl HttpsServer {
    pub async fn start(leaf: &Leaf, name: &str) -> HttpsServer {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<_, _>>().expect("cert pem");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key pem");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind https server");
        let addr = listener.local_addr().expect("addr");
        let body = name.to_string();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, body) = (acceptor.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                    }
                    let answer =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        HttpsServer { addr, accept }
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A node file's `[node.tls]` section serving `cert` and `key`, trusting
/// `ca` for the other nodes.
pub fn node_tls(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path) -> String {
    format!("\n[node.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n", cert.display(), key.display(), ca.display())
}
