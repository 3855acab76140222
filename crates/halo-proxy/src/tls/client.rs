//! TLS to upstreams: an upstream with `[upstreams.NAME.tls]` is reached
//! over TLS, its certificate verified against a CA bundle (on by
//! default), for the configured server name or else the endpoint's IP
//! address; ALPN offers what the upstream's protocol is.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use crate::conn::UpIo;

/// An upstream's TLS settings and the client config built from them.
#[derive(Clone)]
pub struct UpstreamTls {
    /// PEM bundle of the CAs trusted for this upstream.
    pub ca: Option<PathBuf>,
    pub verify: bool,
    /// The name asked for (SNI) and verified; `None`: the endpoint's IP.
    pub server_name: Option<String>,
    connector: TlsConnector,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca)
            .field("verify", &self.verify)
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Settings compare equal (a reload that keeps them keeps the pools).
impl PartialEq for UpstreamTls {
    fn eq(&self, o: &Self) -> bool {
        self.ca == o.ca && self.verify == o.verify && self.server_name == o.server_name
    }
}

impl UpstreamTls {
    /// Reads the CA bundle; `h2` offers ALPN h2, else http/1.1. The error
    /// names the file and what is wrong.
    pub fn new(ca: Option<PathBuf>, verify: bool, server_name: Option<String>, h2: bool) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let verifier = if verify {
            let Some(path) = &ca else {
                return Err(
                    "verification needs ca = \"FILE\" (a PEM bundle of the CAs to trust), or verify = false".into()
                );
            };
            let pem = std::fs::read(path).map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            let mut pinned = Vec::new();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
                roots.add(c.clone()).map_err(|e| format!("{}: {e}", path.display()))?;
                pinned.push(c);
            }
            if roots.is_empty() {
                return Err(format!(
                    "{}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)",
                    path.display()
                ));
            }
            let chain = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Verifier { chain: Some((chain, pinned)), provider }
        } else {
            Verifier { chain: None, provider }
        };
        let mut cfg = builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth();
        cfg.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        if let Some(n) = &server_name {
            ServerName::try_from(n.clone()).map_err(|e| format!("server_name '{n}': {e}"))?;
        }
        Ok(UpstreamTls { ca, verify, server_name, connector: TlsConnector::from(Arc::new(cfg)) })
    }

    /// The TLS handshake on a connected socket.
    pub async fn connect(&self, tcp: TcpStream, addr: SocketAddr) -> io::Result<UpIo> {
        Ok(UpIo::Tls(Box::new(self.handshake(tcp, addr).await?)))
    }

    /// The TLS handshake on a connected socket, verifying the server as
    /// `server_name` or else as the address it was reached at.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(n) => ServerName::try_from(n.clone()).map_err(io::Error::other)?,
            None => ServerName::IpAddress(addr.ip().into()),
        };
        self.connector.connect(name, tcp).await
    }
}

/// Who the server may be. `verify = true` (`chain`): a certificate
/// chained to the CA file's, or one of the file's own certificates
/// presented as is, which is what a self-signed certificate made with
/// `openssl req -x509` needs (it says it is a CA, and webpki refuses a CA
/// as a server's certificate). `verify = false`: anyone. Handshake
/// signatures are checked either way, so the connection is TLS.
#[derive(Debug)]
struct Verifier {
    chain: Option<(Arc<rustls::client::WebPkiServerVerifier>, Vec<CertificateDer<'static>>)>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some((chain, pinned)) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end, intermediates, name, ocsp, now) {
            Ok(v) => Ok(v),
            Err(_) if pinned.iter().any(|p| p.as_ref() == end.as_ref()) => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
