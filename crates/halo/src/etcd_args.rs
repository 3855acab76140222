//! How `halo agent` and `halo backup restore --store` reach etcd: the
//! `--store` URL (`etcd://` in the clear, `etcds://` over TLS) and the
//! flags that secure it (CA, client certificate, user), one parser for both.

use std::path::PathBuf;

use crate::flag_file::read_flag_file;
use halo_store::{EtcdAuth, EtcdStore};

/// TLS and authentication to etcd.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// The CA certificate (PEM) that signed etcd's server certificates;
    /// needed by an etcds:// store.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// This node's client certificate (PEM), for an etcd started with
    /// --client-cert-auth.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM; readable by its owner only).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// An etcd user (etcd's role-based authentication); the password is read
    /// from --etcd-password-file or the HALO_ETCD_PASSWORD environment
    /// variable, never from the command line.
    #[arg(long, value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (readable by its owner only).
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

/// What a `--store` URL names: the endpoints, and whether they speak TLS.
#[derive(Debug, PartialEq, Eq)]
pub struct StoreUrl {
    pub endpoints: Vec<String>,
    pub tls: bool,
}

const ACCEPTED: &str = "use etcd://HOST:PORT[,HOST:PORT...] (or etcds:// for TLS)";

/// `etcd://a:2379,b:2379` -> ["a:2379", "b:2379"]; `etcds://` for TLS.
pub fn parse_store(s: &str) -> anyhow::Result<StoreUrl> {
    let (rest, tls) = match s.split_once("://") {
        Some(("etcd", rest)) => (rest, false),
        Some(("etcds", rest)) => (rest, true),
        Some((scheme, _)) => anyhow::bail!("--store: scheme '{scheme}' is not accepted; {ACCEPTED}"),
        None => (s, false),
    };
    let endpoints: Vec<String> = rest.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect();
    if endpoints.is_empty() {
        anyhow::bail!("--store: no endpoint in '{s}'; {ACCEPTED}");
    }
    for e in &endpoints {
        let ok = e.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !ok {
            anyhow::bail!("--store: '{e}' is not HOST:PORT (as in 10.0.0.1:2379)");
        }
    }
    Ok(StoreUrl { endpoints, tls })
}

impl EtcdArgs {
    /// Reads the files the flags name, checked against the URL's scheme.
    pub fn auth(&self, url: &StoreUrl) -> anyhow::Result<EtcdAuth> {
        if !url.tls && (self.etcd_ca.is_some() || self.etcd_cert.is_some()) {
            anyhow::bail!("--etcd-ca and --etcd-cert are for TLS; use --store etcds://HOST:PORT");
        }
        let ca = match &self.etcd_ca {
            Some(f) => Some(read_flag_file(f, "--etcd-ca", false)?),
            None if url.tls => {
                anyhow::bail!("--store: etcds:// needs --etcd-ca FILE, the CA that signed etcd's certificates")
            }
            None => None,
        };
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(c), Some(k)) => {
                Some((read_flag_file(c, "--etcd-cert", false)?, read_flag_file(k, "--etcd-key", true)?))
            }
            _ => None,
        };
        let user = match &self.etcd_user {
            None => None,
            Some(u) => {
                let password = match &self.etcd_password_file {
                    Some(f) => String::from_utf8_lossy(&read_flag_file(f, "--etcd-password-file", true)?)
                        .trim_end()
                        .to_string(),
                    None => std::env::var("HALO_ETCD_PASSWORD").map_err(|_| {
                        anyhow::anyhow!(
                            "--etcd-user: no password; give --etcd-password-file FILE or set HALO_ETCD_PASSWORD"
                        )
                    })?,
                };
                Some((u.clone(), password))
            }
        };
        Ok(EtcdAuth { ca, identity, user })
    }

    /// Connects to the etcd `url` names, as these flags say.
    pub async fn connect(&self, url: &StoreUrl, namespace: &str) -> anyhow::Result<EtcdStore> {
        connect(url, namespace, &self.auth(url)?).await
    }
}

/// Connects to the etcd `url` names with `auth` (read by [`EtcdArgs::auth`]).
pub async fn connect(url: &StoreUrl, namespace: &str, auth: &EtcdAuth) -> anyhow::Result<EtcdStore> {
    use halo_store::Store;
    let hint = if url.tls && auth.identity.is_none() {
        " (if etcd runs with --client-cert-auth, give --etcd-cert and --etcd-key)"
    } else {
        ""
    };
    let reach = || format!("cannot reach etcd at {}{hint}", url.endpoints.join(","));
    let store = EtcdStore::connect_with(&url.endpoints, namespace, auth).await.map_err(|e| match e {
        // It names the endpoint already.
        halo_store::StoreError::Open { message, .. } => anyhow::anyhow!("{}: {message}", reach()),
        e => anyhow::Error::new(e).context(reach()),
    })?;
    // Connections open lazily: one read proves the TLS handshake, the
    // certificate and the user before anything starts. A cluster between
    // leaders, or a member down, answers again in a moment (the next try
    // goes to another member): only those are tried again, for a while.
    let mut tries = 0;
    loop {
        match store.get("/halo/").await {
            Ok(_) => return Ok(store),
            Err(e) if tries < PROBE_TRIES && transient(&e) => {
                tries += 1;
                tracing::warn!(error = %e, "etcd did not answer the first read; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(reach())),
        }
    }
}

/// How many more times a transient failure of the first read is tried
/// (half a second apart): etcd elects a leader within about a second.
const PROBE_TRIES: u32 = 10;

/// An error that passes by itself: an election under way, a member that
/// is down or restarting. Refused credentials and certificates are not.
fn transient(e: &halo_store::StoreError) -> bool {
    let m = e.to_string();
    ["leader changed", "no leader", "DeadlineExceeded", "timed out", "Connection refused", "within"]
        .iter()
        .any(|t| m.contains(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        let u = parse_store("etcd://a:2379,b:2379").unwrap();
        assert_eq!((u.endpoints, u.tls), (vec!["a:2379".to_string(), "b:2379".to_string()], false));
        assert!(parse_store("etcds://a:2379").unwrap().tls);
        assert_eq!(parse_store("a:1").unwrap().endpoints, ["a:1"]);
        assert!(parse_store("redis://a:1").unwrap_err().to_string().contains("etcds://"));
        assert!(parse_store("etcd://a").unwrap_err().to_string().contains("HOST:PORT"));
        assert!(parse_store("etcd://").is_err());
    }

    #[test]
    fn tls_flags_must_match_the_scheme() {
        let tls = parse_store("etcds://a:1").unwrap();
        let e = EtcdArgs::default().auth(&tls).unwrap_err().to_string();
        assert!(e.contains("--etcd-ca"), "{e}");
        let plain = parse_store("etcd://a:1").unwrap();
        let args = EtcdArgs { etcd_ca: Some("/nonexistent".into()), ..Default::default() };
        assert!(args.auth(&plain).unwrap_err().to_string().contains("etcds://"));
    }
}
