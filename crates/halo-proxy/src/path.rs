//! Request paths normalised before routing (RFC 3986 6.2.2 and 5.2.4), so
//! that a route matches the resource the upstream will serve:
//! `/public/../admin` and `/public/%2e%2e/admin` are `/admin`, never a
//! request under `/public`. Percent-encoded unreserved characters are
//! decoded, other escapes upper-cased, dot segments removed, and runs of
//! slashes merged when asked. The normalised path is what is forwarded.
//! A listener with `path_normalization = "off"` routes and forwards the
//! target as sent (for backends that need it raw), as Envoy's
//! `normalize_path` and HAProxy's `normalize-uri` leave it to the operator.

use http::uri::{PathAndQuery, Uri};

/// How a listener treats request paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathNormalization {
    /// Dot segments removed, unreserved escapes decoded (the default).
    #[default]
    Standard,
    /// As `Standard`, and `//` runs merged into one `/`.
    MergeSlashes,
    /// Matched and forwarded as sent.
    Off,
}

impl PathNormalization {
    pub const ACCEPTED: &'static str = "standard (dot segments removed, %XX of unreserved characters decoded), \
                                        merge_slashes (standard, and // merged), off (matched and forwarded as sent)";

    pub fn parse(s: &str) -> Option<PathNormalization> {
        match s {
            "standard" => Some(PathNormalization::Standard),
            "merge_slashes" => Some(PathNormalization::MergeSlashes),
            "off" => Some(PathNormalization::Off),
            _ => None,
        }
    }
}

/// What becomes of an encoded slash (`%2F`), which most backends treat as
/// a slash after routing and some as part of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncodedSlashes {
    /// Left encoded (as `%2F`): one segment, as RFC 3986 says.
    #[default]
    Keep,
    /// The request is refused with 400.
    Refuse,
    /// Decoded into `/` before routing, and forwarded so.
    Decode,
}

impl EncodedSlashes {
    pub const ACCEPTED: &'static str = "keep (left as %2F), refuse (400), decode (a / before routing)";

    pub fn parse(s: &str) -> Option<EncodedSlashes> {
        match s {
            "keep" => Some(EncodedSlashes::Keep),
            "refuse" => Some(EncodedSlashes::Refuse),
            "decode" => Some(EncodedSlashes::Decode),
            _ => None,
        }
    }
}

/// A listener's path rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathPolicy {
    pub normalization: PathNormalization,
    pub encoded_slashes: EncodedSlashes,
}

/// Why a path was refused (the client gets 400).
pub type Refusal = &'static str;

impl PathPolicy {
    /// The request target with its path normalised: `None` when it is
    /// already normal (the common case costs one scan and no allocation).
    pub fn apply(&self, uri: &Uri) -> Result<Option<Uri>, Refusal> {
        if self.normalization == PathNormalization::Off {
            return Ok(None);
        }
        let Some(path) = self.normalize(uri.path())? else { return Ok(None) };
        let pq = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = uri.clone().into_parts();
        parts.path_and_query = Some(PathAndQuery::try_from(pq).map_err(|_| "invalid request target")?);
        Uri::from_parts(parts).map(Some).map_err(|_| "invalid request target")
    }

    /// `path` normalised, or `None` when it already is.
    pub fn normalize(&self, path: &str) -> Result<Option<String>, Refusal> {
        let merge = self.normalization == PathNormalization::MergeSlashes;
        let b = path.as_bytes();
        // An asterisk-form or empty target has no segments.
        if b.first() != Some(&b'/') {
            return Ok(None);
        }
        let suspect = b.iter().enumerate().any(|(i, &c)| {
            c == b'%' || (c == b'.' && b[i - 1] == b'/') || (merge && c == b'/' && b.get(i + 1) == Some(&b'/'))
        });
        if !suspect {
            return Ok(None);
        }
        let mut decoded = self.decode(b)?;
        if merge {
            // Before the dot segments, as nginx does: `//a//..//b` is `/b`.
            let mut merged = String::with_capacity(decoded.len());
            for c in decoded.chars() {
                if !(c == '/' && merged.ends_with('/')) {
                    merged.push(c);
                }
            }
            decoded = merged;
        }
        let out = remove_dot_segments(&decoded);
        Ok((out != path).then_some(out))
    }

    /// Decodes escapes of unreserved characters (and of `/` when asked);
    /// upper-cases the others.
    fn decode(&self, b: &[u8]) -> Result<String, Refusal> {
        // Bytes, not chars: a raw non-ASCII byte passes through as it came.
        let mut out: Vec<u8> = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] != b'%' {
                out.push(b[i]);
                i += 1;
                continue;
            }
            let hex = |c: Option<&u8>| c.and_then(|c| (*c as char).to_digit(16));
            let (Some(hi), Some(lo)) = (hex(b.get(i + 1)), hex(b.get(i + 2))) else {
                return Err("malformed percent-encoding in the path");
            };
            let byte = (hi * 16 + lo) as u8;
            match byte {
                b'/' => match self.encoded_slashes {
                    EncodedSlashes::Refuse => return Err("an encoded slash (%2F) in the path"),
                    EncodedSlashes::Decode => out.push(b'/'),
                    EncodedSlashes::Keep => out.extend_from_slice(b"%2F"),
                },
                c if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => out.push(c),
                c => {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.extend_from_slice(&[b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]);
                }
            }
            i += 3;
        }
        String::from_utf8(out).map_err(|_| "invalid request target")
    }
}

/// RFC 3986 5.2.4 on an absolute path: `.` segments go, `..` takes the
/// segment before it (never above the root); a path that ended in a dot
/// segment ends in `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut dir = false;
    for seg in path[1..].split('/') {
        dir = matches!(seg, "." | "..");
        match seg {
            "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if dir || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Refusal> {
        let policy = PathPolicy::default();
        Ok(policy.normalize(p)?.unwrap_or_else(|| p.to_string()))
    }

    #[test]
    fn dot_segments_and_their_escapes_are_resolved() {
        for (given, want) in [
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/..", "/"),
            ("/a//../b", "/a/b"),
            ("/a/..b/c", "/a/..b/c"),
            ("/.well-known/x", "/.well-known/x"),
            ("/%7Euser/%41", "/~user/A"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%3fb%c3%a9", "/a%3Fb%C3%A9"),
            ("/plain/path", "/plain/path"),
            ("*", "*"),
        ] {
            assert_eq!(norm(given).as_deref(), Ok(want), "{given}");
        }
        assert!(norm("/a%zz").is_err());
        assert!(norm("/a%2").is_err());
    }

    #[test]
    fn unchanged_paths_cost_no_allocation() {
        let p = PathPolicy::default();
        assert_eq!(p.normalize("/api/v1/items"), Ok(None));
        assert_eq!(p.normalize("/a//b"), Ok(None));
    }

    #[test]
    fn slashes_by_setting() {
        let merge = PathPolicy { normalization: PathNormalization::MergeSlashes, ..Default::default() };
        assert_eq!(merge.normalize("/a//b///c"), Ok(Some("/a/b/c".into())));
        assert_eq!(merge.normalize("//public//..//echo"), Ok(Some("/echo".into())));
        let refuse = PathPolicy { encoded_slashes: EncodedSlashes::Refuse, ..Default::default() };
        assert!(refuse.normalize("/a%2Fb").is_err());
        let decode = PathPolicy { encoded_slashes: EncodedSlashes::Decode, ..Default::default() };
        assert_eq!(decode.normalize("/public%2F..%2Fadmin"), Ok(Some("/admin".into())));
        let off = PathPolicy { normalization: PathNormalization::Off, ..Default::default() };
        let uri: Uri = "/public/../admin".parse().unwrap();
        assert_eq!(off.apply(&uri), Ok(None));
    }

    #[test]
    fn the_query_and_authority_stay() {
        let uri: Uri = "http://a.example/x/../y?q=%2e%2e/z".parse().unwrap();
        let got = PathPolicy::default().apply(&uri).unwrap().unwrap();
        assert_eq!(got.to_string(), "http://a.example/y?q=%2e%2e/z");
    }
}
