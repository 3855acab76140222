//! HTTP/1.1 body framing (RFC 9112 section 6): fixed length, chunked, or
//! until the connection closes. The bottom of the proxy: the upstream
//! client reads responses with it, the h1 server requests.

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;

/// Longest chunk-size line (size, extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

/// Why a body's framing is refused: each one a way a peer could frame
/// the body otherwise than we do (request smuggling), or a broken peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("unreadable transfer-encoding")]
    TransferEncoding,
    #[error("invalid content-length {0:?}")]
    ContentLength(String),
    #[error("conflicting content-length headers")]
    ConflictingLengths,
    #[error("invalid chunk size")]
    ChunkSize,
    #[error("missing CRLF after chunk data")]
    ChunkEnd,
    #[error("a chunk line not ended by CRLF (a bare LF or CR)")]
    BareLineEnd,
    #[error("chunk line too long")]
    LineTooLong,
}

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
    pub fn for_response(status: StatusCode, head_only: bool, f: &Framing<'_>) -> Result<(Decoder, bool), FramingError> {
        if head_only
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok((Decoder::Done, true));
        }
        if let Some(te) = f.transfer_encoding {
            let te = std::str::from_utf8(te).map_err(|_| FramingError::TransferEncoding)?;
            if te.rsplit(',').next().is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked")) {
                return Ok((Decoder::Chunked(Chunk::Size), true));
            }
            return Ok((Decoder::UntilClose, false));
        }
        if let Some(first) = f.content_length {
            let n = digits(first.trim_ascii(), 10)
                .ok_or_else(|| FramingError::ContentLength(String::from_utf8_lossy(first).into_owned()))?;
            if f.conflicting_lengths {
                return Err(FramingError::ConflictingLengths);
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
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, FramingError> {
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
                        // chunk-size [BWS ; ext]: only hex digits (no sign,
                        // no 0x, no spaces inside), at most 16 of them.
                        let size = line.split(|b| *b == b';').next().unwrap_or_default();
                        let size = digits(size.trim_ascii_end(), 16).ok_or(FramingError::ChunkSize)?;
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
                            return Err(FramingError::ChunkEnd);
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

/// `s` as a number in `radix` (10 or 16) if it is digits
/// only: no sign, prefix or spaces (what `str::parse` would let through:
/// "+5" is a known request-smuggling vector); `None` on overflow.
pub(crate) fn digits(s: &[u8], radix: u32) -> Option<u64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.iter().try_fold(0u64, |n, b| {
        let d = (*b as char).to_digit(radix)?;
        n.checked_mul(u64::from(radix))?.checked_add(u64::from(d))
    })
}

/// A CRLF-terminated line without its CRLF, or `None` when incomplete.
/// A chunk-size or trailer line, ended by CRLF. A bare LF or CR in it
/// (even inside a chunk extension) is refused: a peer that ends lines
/// otherwise would frame the body differently (request smuggling).
fn take_line(buf: &mut BytesMut) -> Result<Option<Bytes>, FramingError> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) if i > 0 && buf[i - 1] == b'\r' && !buf[..i - 1].contains(&b'\r') => {
            let line = buf.split_to(i - 1).freeze();
            buf.advance(2);
            Ok(Some(line))
        }
        Some(_) => Err(FramingError::BareLineEnd),
        None if buf.len() > MAX_LINE => Err(FramingError::LineTooLong),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

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

    /// Encodes `body` as chunks of random sizes, with random-case hex,
    /// extensions and trailers.
    fn chunked(rng: &mut Rng, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = body;
        while !rest.is_empty() {
            let n = (1 + rng.next(40) as usize).min(rest.len());
            let hex = format!("{n:x}");
            let hex = if rng.next(2) == 0 { hex.to_uppercase() } else { hex };
            out.extend_from_slice(hex.as_bytes());
            if rng.next(4) == 0 {
                out.extend_from_slice(b" ;name=value");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
        }
        out.extend_from_slice(b"0\r\n");
        for t in 0..rng.next(3) {
            out.extend_from_slice(format!("x-trailer-{t}: {t}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Feeds `input` in random pieces; the body, whether it ended, and the
    /// bytes left after it. Errors are returned, never panics.
    fn feed(rng: &mut Rng, d: &mut Decoder, input: &[u8]) -> Result<(Vec<u8>, bool, Vec<u8>), FramingError> {
        let (mut buf, mut out, mut fed) = (BytesMut::new(), Vec::new(), 0);
        loop {
            match d.step(&mut buf)? {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::End => {
                    buf.extend_from_slice(&input[fed..]);
                    return Ok((out, true, buf.to_vec()));
                }
                Step::More if fed >= input.len() => return Ok((out, false, Vec::new())),
                Step::More => {
                    let end = (fed + 1 + rng.next(64) as usize).min(input.len());
                    buf.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn property_any_chunking_and_any_split_decode_to_the_body_and_keep_what_follows() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for _ in 0..2_000 {
            let body: Vec<u8> = (0..rng.next(300)).map(|_| rng.next(256) as u8).collect();
            let mut wire = chunked(&mut rng, &body);
            wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let (out, ended, rest) = feed(&mut rng, &mut Decoder::Chunked(Chunk::Size), &wire).unwrap();
            assert!(ended);
            assert_eq!(out, body);
            assert_eq!(rest, b"HTTP/1.1 200 OK\r\n", "the next message's bytes were eaten");
        }
    }

    #[test]
    fn property_damaged_input_never_panics_nor_yields_more_than_it_was_given() {
        let mut rng = Rng(0x2545f4914f6cdd1d);
        for _ in 0..5_000 {
            let body: Vec<u8> = (0..rng.next(100)).map(|_| rng.next(256) as u8).collect();
            let mut wire = chunked(&mut rng, &body);
            for _ in 0..1 + rng.next(4) {
                let i = rng.next(wire.len() as u64) as usize;
                match rng.next(3) {
                    0 => wire[i] = rng.next(256) as u8,
                    1 => wire.insert(i, b"+-x \r\n;0"[rng.next(8) as usize]),
                    _ => {
                        wire.remove(i);
                    }
                }
            }
            if let Ok((out, _, _)) = feed(&mut rng, &mut Decoder::Chunked(Chunk::Size), &wire) {
                assert!(out.len() <= wire.len());
            }
        }
    }

    #[test]
    fn numbers_are_digits_only() {
        for bad in ["+5", "0x5", "5 5", "-1", " ", ""] {
            let mut d = Decoder::Chunked(Chunk::Size);
            let mut buf = BytesMut::from(format!("{bad}\r\nhello\r\n0\r\n\r\n").as_bytes());
            assert!(d.step(&mut buf).is_err(), "chunk size {bad:?} was accepted");
            let mut f = Framing::default();
            f.note(b"content-length", bad.as_bytes());
            assert!(Decoder::for_response(StatusCode::OK, false, &f).is_err(), "content-length {bad:?} was accepted");
        }
        assert_eq!(digits(b"ffffffffffffffff", 16), Some(u64::MAX));
        assert_eq!(digits(b"10000000000000000", 16), None, "overflow");
    }

    #[test]
    fn bad_chunks_are_errors() {
        let mut d = Decoder::Chunked(Chunk::Size);
        assert!(d.step(&mut BytesMut::from(&b"zz\r\n"[..])).is_err());
        for bad in [&b"5;ext\nhello\r\n"[..], b"5;a\rb\r\nhello\r\n", b"5\n"] {
            let mut d = Decoder::Chunked(Chunk::Size);
            assert!(d.step(&mut BytesMut::from(bad)).is_err(), "{:?} was accepted", String::from_utf8_lossy(bad));
        }
        let mut d = Decoder::Chunked(Chunk::Size);
        let mut buf = BytesMut::from(&b"2\r\nabXX"[..]);
        assert_eq!(d.step(&mut buf).unwrap(), Step::Data(Bytes::from_static(b"ab")));
        assert!(d.step(&mut buf).is_err());
    }
}
