//! The server name a TLS client asks for, read from its ClientHello
//! without terminating TLS (RFC 8446 4.1.2, RFC 6066 3): what a tcp
//! listener routes by for TLS passthrough. The ClientHello is only
//! peeked, so the upstream gets the whole handshake.

use std::time::Duration;

use tokio::net::TcpStream;

/// Largest ClientHello record looked at (a record is at most 16 KiB).
const MAX_RECORD: usize = 5 + (16 << 10);

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming this server (lower-cased).
    Name(String),
    /// A ClientHello without server_name, or bytes that are not TLS.
    NoName,
}

/// Peeks at the connection's first record until it holds a whole
/// ClientHello (or cannot be one).
pub async fn peek(stream: &TcpStream) -> std::io::Result<Hello> {
    let mut buf = vec![0u8; MAX_RECORD];
    let mut last = 0;
    loop {
        let n = stream.peek(&mut buf).await?;
        match parse(&buf[..n]) {
            Some(h) => return Ok(h),
            // Closed, or as much as a record can hold: not a ClientHello.
            None if n == 0 || n == buf.len() => return Ok(Hello::NoName),
            None => {}
        }
        if n == last {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        last = n;
    }
}

/// `None` while more bytes are needed.
pub fn parse(b: &[u8]) -> Option<Hello> {
    // Record: handshake (22), version, length.
    if b.is_empty() {
        return None;
    }
    if b[0] != 22 {
        return Some(Hello::NoName);
    }
    if b.len() < 5 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    if b.len() < 5 + len {
        return None;
    }
    Some(client_hello(&b[5..5 + len]).map_or(Hello::NoName, Hello::Name))
}

/// The host_name of a ClientHello handshake message.
fn client_hello(h: &[u8]) -> Option<String> {
    let mut r = Reader(h);
    if r.u8()? != 1 {
        return None;
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    let mut r = Reader(body);
    r.take(2 + 32)?; // version, random
    let sid = usize::from(r.u8()?);
    r.take(sid)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let comp = usize::from(r.u8()?);
    r.take(comp)?;
    let exts_len = usize::from(r.u16()?);
    let mut exts = Reader(r.take(exts_len)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let len = usize::from(exts.u16()?);
        let data = exts.take(len)?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader(data);
        let list_len = usize::from(list.u16()?);
        let mut names = Reader(list.take(list_len)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name_len = usize::from(names.u16()?);
            let name = names.take(name_len)?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello with `exts` after a minimal body.
    fn hello(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1, (hs.len() >> 8) as u8, hs.len() as u8];
        rec.extend_from_slice(&hs);
        rec
    }

    fn sni_ext(name: &str) -> Vec<u8> {
        let n = name.len() as u16;
        let mut e = vec![0, 0];
        e.extend_from_slice(&(n + 5).to_be_bytes());
        e.extend_from_slice(&(n + 3).to_be_bytes());
        e.push(0);
        e.extend_from_slice(&n.to_be_bytes());
        e.extend_from_slice(name.as_bytes());
        e
    }

    #[test]
    fn the_name_is_found_among_extensions_and_partial_input_waits() {
        let mut exts = vec![0, 10, 0, 2, 0, 29]; // another extension first
        exts.extend(sni_ext("Shop.Example.COM"));
        let rec = hello(&exts);
        assert_eq!(parse(&rec), Some(Hello::Name("shop.example.com".into())));
        for cut in [1, 4, 5, rec.len() - 1] {
            assert_eq!(parse(&rec[..cut]), None, "cut at {cut}");
        }
        assert_eq!(parse(&hello(&[0, 10, 0, 2, 0, 29])), Some(Hello::NoName));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Some(Hello::NoName));
        // Lengths that lie are no name, not a panic.
        let mut bad = rec.clone();
        bad[8] = 0xff;
        assert_eq!(parse(&bad), Some(Hello::NoName));
    }
}
