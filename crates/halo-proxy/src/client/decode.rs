//! Response body framing (RFC 9112 section 6): fixed length, chunked, or
//! until the connection closes.

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;

/// Longest chunk-size line (size, extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoder {
    /// No body (HEAD, 204, 304, 1xx) or a body fully read.
    Done,
    Length(u64),
    Chunked(Chunk),
    /// Read until the upstream closes; the connection cannot be reused.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data with this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// What one decoding step produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// More bytes are needed from the connection.
    More,
    /// The body is complete.
    End,
}

/// What a response head says about its body's framing, read off the raw
/// header lines (before they become a `HeaderMap`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Framing<'a> {
    /// The value of the last Transfer-Encoding line, if any.
    pub transfer_encoding: Option<&'a [u8]>,
    /// The first Content-Length value, if any.
    pub content_length: Option<&'a [u8]>,
    /// A later Content-Length line disagreed with the first.
    pub conflicting_lengths: bool,
}

impl<'a> Framing<'a> {
    /// Notes one header line if it is about framing.
    pub fn note(&mut self, name: &[u8], value: &'a [u8]) {
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.transfer_encoding = Some(value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            match self.content_length {
                None => self.content_length = Some(value),
                Some(first) if first != value => self.conflicting_lengths = true,
                Some(_) => {}
            }
        }
    }
}

impl Decoder {
    /// The framing of a response; the flag is false when the body only ends
    /// at connection close (no reuse possible).
    pub fn for_response(status: StatusCode, head_only: bool, f: &Framing<'_>) -> Result<(Decoder, bool), String> {
        if head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok((Decoder::Done, true));
        }
        if let Some(te) = f.transfer_encoding {
            let te = std::str::from_utf8(te).map_err(|_| "unreadable transfer-encoding".to_string())?;
            if te.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked")) {
                return Ok((Decoder::Chunked(Chunk::Size), true));
            }
            return Ok((Decoder::UntilClose, false));
        }
        if let Some(first) = f.content_length {
            let n: u64 = std::str::from_utf8(first)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| format!("invalid content-length {:?}", String::from_utf8_lossy(first)))?;
            if f.conflicting_lengths {
                return Err("conflicting content-length headers".into());
            }
            return Ok((if n == 0 { Decoder::Done } else { Decoder::Length(n) }, true));
        }
        Ok((Decoder::UntilClose, false))
    }

    pub fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// The exact remaining length when known.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Decoder::Done => Some(0),
            Decoder::Length(n) => Some(*n),
            _ => None,
        }
    }

    /// Takes what it can from `buf`.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, String> {
        loop {
            match self {
                Decoder::Done => return Ok(Step::End),
                Decoder::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Decoder::Done;
                    }
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Decoder::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Decoder::Chunked(state) => match *state {
                    Chunk::Size => {
                        let Some(line) = take_line(buf)? else { return Ok(Step::More) };
                        let size = line.split(|b| *b == b';').next().unwrap_or_default();
                        let size = std::str::from_utf8(size)
                            .ok()
                            .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                            .ok_or_else(|| "invalid chunk size".to_string())?;
                        *state = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(Step::More);
                        }
                        let n = left.min(buf.len() as u64) as usize;
                        *state = if left == n as u64 { Chunk::DataEnd } else { Chunk::Data(left - n as u64) };
                        return Ok(Step::Data(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(Step::More);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err("missing CRLF after chunk data".into());
                        }
                        buf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        // Trailers are read and dropped: the downstream side
                        // does not forward them.
                        let Some(line) = take_line(buf)? else { return Ok(Step::More) };
                        if line.is_empty() {
                            *self = Decoder::Done;
                        }
                    }
                },
            }
        }
    }
}

/// A CRLF-terminated line without its CRLF, or `None` when incomplete.
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, String> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(i) => {
            let line = buf.split_to(i).freeze();
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("chunk line too long".into()),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(d: &mut Decoder, input: &[u8], split: usize) -> (Vec<u8>, bool) {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match d.step(&mut buf).unwrap() {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::End => return (out, true),
                Step::More if fed >= input.len() => return (out, false),
                Step::More => {
                    let end = (fed + split).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_in_any_split() {
        let input = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in 1..input.len() {
            let mut d = Decoder::Chunked(Chunk::Size);
            assert_eq!(all(&mut d, input, split), (b"hello, world".to_vec(), true), "split {split}");
        }
    }

    #[test]
    fn fixed_length_stops_at_length() {
        let mut d = Decoder::Length(5);
        let mut buf = BytesMut::from(&b"helloHTTP/1.1"[..]);
        assert_eq!(d.step(&mut buf).unwrap(), Step::Data(Bytes::from_static(b"hello")));
        assert_eq!(d.step(&mut buf).unwrap(), Step::End);
        assert_eq!(&buf[..], b"HTTP/1.1");
    }

    #[test]
    fn framing_rules() {
        let mut f = Framing::default();
        assert_eq!(Decoder::for_response(StatusCode::OK, true, &f).unwrap(), (Decoder::Done, true));
        assert_eq!(Decoder::for_response(StatusCode::NO_CONTENT, false, &f).unwrap(), (Decoder::Done, true));
        assert_eq!(Decoder::for_response(StatusCode::OK, false, &f).unwrap(), (Decoder::UntilClose, false));
        f.note(b"Content-Length", b"10");
        f.note(b"content-length", b"10");
        assert_eq!(Decoder::for_response(StatusCode::OK, false, &f).unwrap(), (Decoder::Length(10), true));
        f.note(b"content-length", b"11");
        assert!(Decoder::for_response(StatusCode::OK, false, &f).is_err());
        f.note(b"Transfer-Encoding", b"gzip, chunked");
        assert_eq!(Decoder::for_response(StatusCode::OK, false, &f).unwrap(), (Decoder::Chunked(Chunk::Size), true));
        f.note(b"transfer-encoding", b"gzip");
        assert_eq!(Decoder::for_response(StatusCode::OK, false, &f).unwrap(), (Decoder::UntilClose, false));
    }

    #[test]
    fn bad_chunks_are_errors() {
        let mut d = Decoder::Chunked(Chunk::Size);
        assert!(d.step(&mut BytesMut::from(&b"zz\r\n"[..])).is_err());
        let mut d = Decoder::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"2\r\nabXX"[..]);
        assert_eq!(d.step(&mut buf).unwrap(), Step::Data(Bytes::from_static(b"ab")));
        assert!(d.step(&mut buf).is_err());
    }
}
