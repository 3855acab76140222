//! Listener validation: http listeners (traffic goes by routes) and tcp
//! listeners (bytes to one upstream).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::file::{self, FileConfig};
use super::{
    CertFiles, Cidr, EncodedSlashes, HashKey, HostMatch, ListenerConfig, ListenerProtocol, MinVersion,
    PathNormalization, PathPolicy, TcpForward, TlsListener, UpstreamConfig, Validator,
};

/// The largest `max_connections` accepted (what one process can hold).
const MAX_CONNECTIONS: u64 = 10_000_000;

impl Validator<'_> {
    pub(super) fn listeners(
        &mut self,
        raw: &FileConfig,
        ups: &BTreeMap<String, UpstreamConfig>,
    ) -> Vec<ListenerConfig> {
        if raw.listeners.is_empty() {
            self.err(0, "listeners", "at least one [[listeners]] entry with listen = \"IP:PORT\" is required");
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            let line = self.loc.array_item("listeners", i);
            let field = format!("listeners[{i}]");
            let name = l.name.clone().unwrap_or_else(|| format!("listener{i}"));
            if !seen.insert(name.clone()) {
                self.err(line, format!("{field}.name"), format!("duplicate listener name '{name}'"));
            }
            if l.tls.is_some() && l.protocol.as_deref() != Some("https") {
                self.err(self.loc.key(line, "tls"), format!("{field}.tls"), "is for protocol = \"https\" listeners");
            }
            let proto = l.protocol.as_deref().unwrap_or("http");
            if proto != "tcp" {
                let tcp_only = [
                    ("upstream", l.upstream.is_some()),
                    ("sni", l.sni.is_some()),
                    ("idle_timeout", l.idle_timeout.is_some()),
                    ("connect_timeout", l.connect_timeout.is_some()),
                    ("connect_tries", l.connect_tries.is_some()),
                ];
                for (key, _) in tcp_only.iter().filter(|(_, set)| *set) {
                    self.err(
                        self.loc.key(line, key),
                        format!("{field}.{key}"),
                        "is for protocol = \"tcp\" listeners; an http or https listener's traffic goes by [[routes]]",
                    );
                }
            }
            let protocol = match proto {
                "http" => ListenerProtocol::Http,
                "https" => self.tls(line, &field, l),
                "tcp" => ListenerProtocol::Tcp(self.tcp_forward(line, &field, l, ups)),
                other => {
                    self.err(
                        self.loc.key(line, "protocol"),
                        format!("{field}.protocol"),
                        format!(
                            "unknown protocol '{other}'; accepted: http (HTTP/1.1 and h2c), https (TLS, then HTTP/1.1 \
                             or h2 by ALPN), tcp (bytes to an upstream)"
                        ),
                    );
                    ListenerProtocol::Http
                }
            };
            let mut proxy_protocol_from = Vec::new();
            for c in l.proxy_protocol_from.iter().flatten() {
                match c.parse::<Cidr>() {
                    Ok(c) => proxy_protocol_from.push(c),
                    Err(e) => {
                        self.err(self.loc.key(line, "proxy_protocol_from"), format!("{field}.proxy_protocol_from"), e)
                    }
                }
            }
            let max_connections = l.max_connections.filter(|n| {
                let ok = (1..=MAX_CONNECTIONS).contains(n);
                if !ok {
                    self.err(
                        self.loc.key(line, "max_connections"),
                        format!("{field}.max_connections"),
                        format!("accepted: 1 to {MAX_CONNECTIONS} (omit it for no limit)"),
                    );
                }
                ok
            });
            let paths = self.paths(line, &field, l, proto);
            if let Some(addr) = self.addr(self.loc.key(line, "listen"), &format!("{field}.listen"), &l.listen) {
                out.push(ListenerConfig {
                    name,
                    addr,
                    protocol,
                    proxy_protocol_from,
                    max_connections,
                    freebind: false,
                    paths,
                });
            }
        }
        out
    }

    /// An http listener's path rules; `path_normalization` and
    /// `encoded_slashes` name what is accepted.
    fn paths(&mut self, line: usize, field: &str, l: &file::ListenerSection, proto: &str) -> PathPolicy {
        let mut paths = PathPolicy::default();
        let set = [("path_normalization", &l.path_normalization), ("encoded_slashes", &l.encoded_slashes)];
        for (key, value) in set {
            let Some(value) = value else { continue };
            let at = self.loc.key(line, key);
            if proto == "tcp" {
                self.err(at, format!("{field}.{key}"), "is for http and https listeners (a tcp listener has no paths)");
                continue;
            }
            let ok = match key {
                "path_normalization" => PathNormalization::parse(value).map(|n| paths.normalization = n),
                _ => EncodedSlashes::parse(value).map(|e| paths.encoded_slashes = e),
            };
            if ok.is_none() {
                let accepted =
                    if key == "encoded_slashes" { EncodedSlashes::ACCEPTED } else { PathNormalization::ACCEPTED };
                self.err(at, format!("{field}.{key}"), format!("unknown value '{value}'; accepted: {accepted}"));
            }
        }
        paths
    }

    /// An https listener's certificates, loaded now so that a bad file
    /// is reported with the config.
    fn tls(&mut self, line: usize, field: &str, l: &file::ListenerSection) -> ListenerProtocol {
        let Some(t) = &l.tls else {
            self.err(
                line,
                format!("{field}.tls"),
                "an https listener needs [listeners.tls] with certificates = [{ cert = \"FILE\", key = \"FILE\" }]",
            );
            return ListenerProtocol::Http;
        };
        match self.tls_section(line, &format!("{field}.tls"), t) {
            Some(t) => ListenerProtocol::Https(t),
            None => ListenerProtocol::Http,
        }
    }

    /// A `tls` section's certificates, loaded now so that a bad file is
    /// reported with the config; `field` names the section.
    pub(super) fn tls_section(&mut self, line: usize, field: &str, t: &file::TlsSection) -> Option<Arc<TlsListener>> {
        let tl = self.loc.key(line, "certificates");
        if t.certificates.is_empty() {
            self.err(
                tl,
                format!("{field}.certificates"),
                "at least one { cert = \"FILE\", key = \"FILE\" } is required",
            );
            return None;
        }
        let min_version = match t.min_version.as_deref().unwrap_or("1.2") {
            "1.2" => MinVersion::Tls12,
            "1.3" => MinVersion::Tls13,
            other => {
                self.err(
                    self.loc.key(line, "min_version"),
                    format!("{field}.min_version"),
                    format!("'{other}' is not accepted; accepted: \"1.2\" (TLS 1.2 and 1.3) or \"1.3\""),
                );
                MinVersion::Tls12
            }
        };
        // Relative paths are the config file's.
        let base = Path::new(&self.file).parent().map(Path::to_path_buf).unwrap_or_default();
        let files: Vec<CertFiles> = t
            .certificates
            .iter()
            .map(|c| CertFiles {
                cert: base.join(&c.cert),
                key: base.join(&c.key),
                names: c.names.clone().unwrap_or_default(),
            })
            .collect();
        for (j, c) in t.certificates.iter().enumerate() {
            for n in c.names.iter().flatten() {
                let plain = n.strip_prefix("*.").unwrap_or(n);
                if plain.is_empty() || plain.contains('*') || n.contains(':') {
                    self.err(
                        tl,
                        format!("{field}.certificates[{j}].names"),
                        format!("'{n}' is not accepted; use a host name or *.example.com"),
                    );
                }
            }
        }
        match TlsListener::new(files, min_version) {
            Ok(t) => Some(Arc::new(t)),
            Err(errors) => {
                for (j, e) in errors {
                    self.err(tl, format!("{field}.certificates[{j}]"), e);
                }
                None
            }
        }
    }

    /// An upstream a tcp listener sends to: it exists (or may come with a
    /// service) and balances without HTTP request fields.
    fn tcp_upstream(&mut self, line: usize, field: String, upstream: &str, ups: &BTreeMap<String, UpstreamConfig>) {
        match ups.get(upstream) {
            None if self.services_later => {}
            None => self.check_upstream(line, field, upstream, ups),
            Some(u) => {
                let by_request = matches!(u.hash_key, Some(HashKey::Header(_) | HashKey::Cookie(_) | HashKey::Path));
                if by_request || u.session_cookie.is_some() {
                    self.err(
                        line,
                        field,
                        format!(
                            "upstream '{upstream}' hashes or pins by HTTP request fields, which a tcp listener does not have; \
                             accepted for tcp: hash_key = \"source_ip\" and no session_cookie"
                        ),
                    );
                }
            }
        }
    }

    fn tcp_forward(
        &mut self,
        line: usize,
        field: &str,
        l: &file::ListenerSection,
        ups: &BTreeMap<String, UpstreamConfig>,
    ) -> TcpForward {
        let ul = self.loc.key(line, "upstream");
        if let Some(u) = &l.upstream {
            self.tcp_upstream(ul, format!("{field}.upstream"), u, ups);
        }
        let mut sni = Vec::new();
        for (j, r) in l.sni.iter().flatten().enumerate() {
            let sl = self.loc.key(line, "sni");
            self.tcp_upstream(sl, format!("{field}.sni[{j}].upstream"), &r.upstream, ups);
            if r.names.is_empty() {
                self.err(sl, format!("{field}.sni[{j}].names"), "at least one name, as in names = [\"example.com\"]");
            }
            let names = r
                .names
                .iter()
                .filter_map(|n| {
                    HostMatch::parse(n).map_err(|e| self.err(sl, format!("{field}.sni[{j}].names"), e)).ok()
                })
                .collect();
            sni.push((names, r.upstream.clone()));
        }
        if l.upstream.is_none() && sni.is_empty() {
            self.err(
                line,
                format!("{field}.upstream"),
                "a tcp listener needs upstream = \"NAME\", or sni = [{ names = [...], upstream = \"NAME\" }] for TLS passthrough",
            );
        }
        let il = self.loc.key(line, "idle_timeout");
        let idle =
            self.duration(il, &format!("{field}.idle_timeout"), l.idle_timeout.as_deref(), TcpForward::DEFAULT_IDLE);
        let cl = self.loc.key(line, "connect_timeout");
        let connect_timeout = self.duration(
            cl,
            &format!("{field}.connect_timeout"),
            l.connect_timeout.as_deref(),
            TcpForward::DEFAULT_CONNECT,
        );
        if connect_timeout.is_zero() {
            self.err(cl, format!("{field}.connect_timeout"), "must be above 0");
        }
        let connect_tries = l.connect_tries.unwrap_or(TcpForward::DEFAULT_TRIES);
        if !(1..=10).contains(&connect_tries) {
            self.err(self.loc.key(line, "connect_tries"), format!("{field}.connect_tries"), "accepted: 1 to 10");
        }
        TcpForward {
            upstream: l.upstream.clone(),
            sni,
            // "0" turns the idle timeout off.
            idle_timeout: Some(idle).filter(|d| !d.is_zero()),
            connect_timeout: connect_timeout.max(Duration::from_millis(1)),
            connect_tries: connect_tries.clamp(1, 10),
        }
    }
}
