//! TLS termination (rustls with ring): certificates chosen by SNI (exact
//! names, then `*.` wildcards, then the listener's first certificate),
//! ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3 (or 1.3 only), and
//! certificate files re-read when they change.
//!
//! A listener's certificates are loaded when its config is validated, so
//! a bad file refuses the config (or the reload) with the file named.
//! After that, [`TlsListener::refresh`] re-reads changed files: a good set
//! replaces the served one for new handshakes (open connections are not
//! touched), a bad one is reported and the old set keeps serving.

pub mod client;
mod der;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use halo_model::lock::LockExt;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// One certificate chain and its key, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Names it answers for; empty: the certificate's own DNS names.
    pub names: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersion {
    Tls12,
    Tls13,
}

/// What one loaded certificate is, for metrics and logs.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub path: String,
    pub names: Vec<String>,
    /// notAfter, seconds since the Unix epoch.
    pub not_after: Option<i64>,
}

/// The certificates a listener serves, by name.
pub struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    pub info: Vec<CertInfo>,
}

impl CertSet {
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(str::to_ascii_lowercase) else { return self.default.clone() };
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        let parent = name.split_once('.').map(|(_, p)| p);
        parent.and_then(|p| self.wildcard.get(p)).unwrap_or(&self.default).clone()
    }
}

#[derive(Debug)]
struct Resolver(ArcSwap<CertSet>);

impl std::fmt::Debug for CertSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSet").field("info", &self.info).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().pick(hello.server_name()))
    }
}

/// A TLS listener's settings and the certificates it serves now.
pub struct TlsListener {
    pub files: Vec<CertFiles>,
    pub min_version: MinVersion,
    resolver: Arc<Resolver>,
    config: Arc<rustls::ServerConfig>,
    /// The same, offering HTTP/1.1 only by ALPN.
    config_http1: Arc<rustls::ServerConfig>,
    /// The files as last read (modified time and length), to see changes.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener").field("files", &self.files).field("min_version", &self.min_version).finish()
    }
}

/// Settings compare equal; the certificates served are state.
impl PartialEq for TlsListener {
    fn eq(&self, other: &Self) -> bool {
        self.files == other.files && self.min_version == other.min_version
    }
}

impl Eq for TlsListener {}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsListener {
    /// Loads every certificate; the errors name the file and the problem,
    /// by index in `files`.
    pub fn new(files: Vec<CertFiles>, min_version: MinVersion) -> Result<TlsListener, Vec<(usize, String)>> {
        let stamps = stamps(&files);
        let set = load(&files)?;
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(set)));
        let versions: &[&rustls::SupportedProtocolVersion] = match min_version {
            MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            MinVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|e| vec![(0, format!("TLS setup: {e}"))])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| vec![(0, format!("TLS tickets: {e}"))])?;
        let mut http1 = config.clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (config, config_http1) = (Arc::new(config), Arc::new(http1));
        Ok(TlsListener { files, min_version, resolver, config, config_http1, stamps: Mutex::new(stamps) })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }

    /// The acceptor for a server that speaks HTTP/1.1 only (the admin and
    /// node APIs): ALPN offers no h2, which a client would otherwise pick.
    pub fn acceptor_http1(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config_http1.clone())
    }

    /// The certificates served now.
    pub fn certificates(&self) -> Arc<CertSet> {
        self.resolver.0.load_full()
    }

    /// Re-reads the files when any changed: `Ok(true)` when a new set is
    /// served, `Ok(false)` when nothing changed, `Err` (and the old set
    /// kept) when the new files are bad. A bad set is reported once per
    /// change of the files.
    pub fn refresh(&self) -> Result<bool, String> {
        let now = stamps(&self.files);
        {
            let mut seen = self.stamps.locked();
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        match load(&self.files) {
            Ok(set) => {
                self.resolver.0.store(Arc::new(set));
                Ok(true)
            }
            Err(errors) => Err(errors.into_iter().map(|(_, e)| e).collect::<Vec<_>>().join("; ")),
        }
    }
}

fn stamps(files: &[CertFiles]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .flat_map(|f| [&f.cert, &f.key])
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

/// Seconds since the Unix epoch now, signed as certificate times are.
pub fn unix_now() -> i64 {
    halo_model::clock::unix_secs() as i64
}

fn load(files: &[CertFiles]) -> Result<CertSet, Vec<(usize, String)>> {
    let provider = provider();
    let mut errors = Vec::new();
    let mut loaded = Vec::new();
    for (i, f) in files.iter().enumerate() {
        match load_one(f, &provider) {
            Ok(c) => loaded.push(c),
            Err(e) => errors.push((i, e)),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let Some((default, _)) = loaded.first() else { return Err(vec![(0, "no certificate configured".into())]) };
    let mut set =
        CertSet { exact: HashMap::new(), wildcard: HashMap::new(), default: default.clone(), info: Vec::new() };
    for (key, info) in loaded {
        for name in &info.names {
            // The first certificate that names a host serves it.
            match name.strip_prefix("*.") {
                Some(parent) => set.wildcard.entry(parent.to_string()).or_insert_with(|| key.clone()),
                None => set.exact.entry(name.clone()).or_insert_with(|| key.clone()),
            };
        }
        if let Some(t) = info.not_after.filter(|t| *t < unix_now()) {
            tracing::warn!(certificate = %info.path, expired_days_ago = (unix_now() - t) / 86_400, "certificate has expired");
        }
        set.info.push(info);
    }
    Ok(set)
}

fn load_one(f: &CertFiles, provider: &CryptoProvider) -> Result<(Arc<CertifiedKey>, CertInfo), String> {
    let (cert_path, key_path) = (f.cert.display(), f.key.display());
    let pem = std::fs::read(&f.cert).map_err(|e| format!("cannot read certificate file {cert_path}: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_path}: not a PEM certificate file: {e}"))?;
    let Some(leaf) = chain.first().cloned() else {
        return Err(format!("{cert_path}: no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)"));
    };
    let pem = std::fs::read(&f.key).map_err(|e| format!("cannot read key file {key_path}: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!("{key_path}: no private key in it (expected PEM: PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY): {e}")
    })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            format!("the key in {key_path} does not match the certificate in {cert_path}")
        }
        other => format!("{key_path}: {other}"),
    })?;
    let names = match f.names.is_empty() {
        false => f.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
        true => {
            der::dns_names(&leaf).ok_or_else(|| format!("{cert_path}: the certificate cannot be read (bad DER)"))?
        }
    };
    let info = CertInfo { path: cert_path.to_string(), names, not_after: der::not_after(&leaf) };
    Ok((Arc::new(key), info))
}
