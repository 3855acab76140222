//! A WebSocket echo server and client (RFC 6455), enough for tunnels
//! through the proxy: the opening handshake with its accept key, masked
//! client frames, text/binary echo, ping/pong and close.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Echoes every message back; says its name in the `x-backend` header
/// of its 101.
pub struct WsEcho {
    pub addr: SocketAddr,
    /// Connections upgraded so far.
    pub upgraded: Arc<AtomicU64>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl WsEcho {
    pub async fn start(name: &str) -> WsEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws echo");
        let addr = listener.local_addr().expect("addr");
        let upgraded = Arc::new(AtomicU64::new(0));
        let tasks = Arc::new(Mutex::new(JoinSet::new()));
        let name = name.to_string();
        let accept = {
            let (upgraded, tasks) = (upgraded.clone(), tasks.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((s, _)) = listener.accept().await else { continue };
                    let (upgraded, name) = (upgraded.clone(), name.clone());
                    tasks.lock().expect("tasks").spawn(async move {
                        let _ = serve(s, &name, &upgraded).await;
                    });
                }
            })
        };
        WsEcho { addr, upgraded, tasks, accept: Some(accept) }
    }

    /// Stops listening and drops every connection, like a crash.
    pub fn kill(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        self.tasks.lock().expect("tasks").abort_all();
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve(mut s: TcpStream, name: &str, upgraded: &AtomicU64) -> std::io::Result<()> {
    let (head, mut rest) = read_head(&mut s).await?;
    let key = header(&head, "sec-websocket-key");
    let wants = header(&head, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let Some(key) = key.filter(|_| wants) else {
        s.write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await?;
        return Ok(());
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {}\r\nx-backend: {name}\r\n\r\n",
        accept_key(&key)
    );
    s.write_all(answer.as_bytes()).await?;
    upgraded.fetch_add(1, SeqCst);
    loop {
        let Some((opcode, payload)) = read_frame(&mut s, &mut rest).await? else { return Ok(()) };
        match opcode {
            0x1 | 0x2 => s.write_all(&frame(opcode, &payload, None)).await?,
            0x9 => s.write_all(&frame(0xA, &payload, None)).await?,
            0x8 => {
                s.write_all(&frame(0x8, &payload, None)).await?;
                return Ok(());
            }
            _ => {}
        }
    }
}

/// A WebSocket client connection.
pub struct WsClient {
    stream: TcpStream,
    rest: Vec<u8>,
    /// The headers of the 101 (lower-case names).
    pub response_head: String,
    mask_seed: u32,
}

impl WsClient {
    /// Opens `ws://host/path` over a TCP connection to `to`.
    pub async fn connect(to: SocketAddr, host: &str, path: &str) -> Result<WsClient, String> {
        let mut stream = TcpStream::connect(to).await.map_err(|e| format!("connect: {e}"))?;
        let seed = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.subsec_nanos())
            ^ to.port() as u32)
            | 1;
        let key = base64(&seed.to_le_bytes().repeat(4));
        let req = format!(
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.map_err(|e| format!("write handshake: {e}"))?;
        let (head, rest) = read_head(&mut stream).await.map_err(|e| format!("read handshake: {e}"))?;
        // Checked as RFC 6455 4.1 has a client (every browser) check it.
        if !head.starts_with("HTTP/1.1 101") {
            return Err(format!("no 101: {}", head.lines().next().unwrap_or("")));
        }
        if !header(&head, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
            return Err(format!("missing Upgrade: websocket in {head:?}"));
        }
        let upgrade_option = |v: String| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        if !header(&head, "connection").is_some_and(upgrade_option) {
            return Err(format!("missing Connection: upgrade in {head:?}"));
        }
        if header(&head, "sec-websocket-accept").as_deref() != Some(accept_key(&key).as_str()) {
            return Err(format!("wrong accept key in {head:?}"));
        }
        Ok(WsClient { stream, rest, response_head: head.to_ascii_lowercase(), mask_seed: seed })
    }

    pub async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.mask_seed = self.mask_seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        self.stream.write_all(&frame(0x1, text.as_bytes(), Some(self.mask_seed.to_be_bytes()))).await
    }

    /// The next text or binary message; `None` when the server closed.
    pub async fn recv(&mut self) -> std::io::Result<Option<String>> {
        loop {
            match read_frame(&mut self.stream, &mut self.rest).await? {
                None | Some((0x8, _)) => return Ok(None),
                Some((0x1 | 0x2, p)) => return Ok(Some(String::from_utf8_lossy(&p).into_owned())),
                Some(_) => continue,
            }
        }
    }

    /// Sends a close frame and waits for the server's.
    pub async fn close(mut self) -> std::io::Result<()> {
        self.stream.write_all(&frame(0x8, &[0x03, 0xE8], Some([1, 2, 3, 4]))).await?;
        while self.recv().await?.is_some() {}
        Ok(())
    }
}

/// Reads up to the end of an HTTP head; returns it and the bytes after.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 << 10 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed in the head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// One frame, FIN set; masked when a key is given (client to server).
fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n <= 0xFFFF => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// Reads one frame (unmasked); `None` at end of stream.
async fn read_frame<S: AsyncRead + Unpin>(s: &mut S, rest: &mut Vec<u8>) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    loop {
        if let Some((opcode, payload, used)) = parse_frame(rest) {
            rest.drain(..used);
            return Ok(Some((opcode, payload)));
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}

fn parse_frame(b: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if b.len() < 2 {
        return None;
    }
    let opcode = b[0] & 0x0F;
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7F {
        126 => (u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let key: Option<[u8; 4]> = if masked {
        let k = b.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(k)
    } else {
        None
    };
    let data = b.get(at..at + len)?;
    let payload = match key {
        Some(k) => data.iter().enumerate().map(|(i, x)| x ^ k[i % 4]).collect(),
        None => data.to_vec(),
    };
    Some((opcode, payload, at + len))
}

fn accept_key(key: &str) -> String {
    base64(&sha1(format!("{key}{GUID}").as_bytes()))
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// SHA-1 (FIPS 180-4): what the handshake's accept key is made of.
fn sha1(msg: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
    let mut data = msg.to_vec();
    data.push(0x80);
    while data.len() % 64 != 56 {
        data.push(0);
    }
    data.extend_from_slice(&((msg.len() as u64) * 8).to_be_bytes());
    for block in data.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().expect("4 bytes"));
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn accept_key_matches_rfc_6455_example() {
        // RFC 6455 section 1.3.
        assert_eq!(super::accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
