//! Request bodies, at the bottom of the proxy: [`DownBody`] as it comes
//! from the client (our HTTP/1.1 connection task, or hyper's HTTP/2
//! server), [`ProxyBody`] as it is sent upstream (empty or buffered ones
//! can be replayed on a retry, a streamed one cannot). The response body
//! is `crate::response::RespBody`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::decode::Decoder;
use crate::error::BoxError;

/// A request body as it comes from the client: read by our HTTP/1.1
/// connection task, or by hyper's HTTP/2 server.
pub enum DownBody {
    H1(RequestBody),
    H2(H2Body),
}

/// An HTTP/2 request body, which must arrive whole within `within` of
/// its first read (HTTP/1.1 bodies have the same limit in the codec).
pub struct H2Body {
    body: Incoming,
    within: std::time::Duration,
    /// Made at the first read that has to wait: a body that is there at
    /// once, or absent, costs no timer.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl H2Body {
    pub fn new(body: Incoming, within: std::time::Duration) -> H2Body {
        H2Body { body, within, deadline: None }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(f) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        let within = self.within;
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "the request body did not arrive whole within {within:?} (request_body_timeout)"
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Body for DownBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            DownBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            DownBody::H2(b) => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownBody::H1(b) => b.is_end_stream(),
            DownBody::H2(b) => b.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownBody::H1(b) => b.size_hint(),
            DownBody::H2(b) => b.body.size_hint(),
        }
    }
}

/// A request body on its way upstream.
pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    Stream(DownBody),
}

impl ProxyBody {
    /// A copy for another attempt, when the body can be replayed.
    pub fn replay(&self) -> Option<ProxyBody> {
        match self {
            ProxyBody::Empty => Some(ProxyBody::Empty),
            ProxyBody::Full(b) => Some(ProxyBody::Full(b.clone())),
            ProxyBody::Stream(_) => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Stream(s) => s.size_hint(),
        }
    }
}

/// An HTTP/1.1 request body as our connection task reads it (`h1`).
pub struct RequestBody {
    rx: Option<mpsc::Receiver<io::Result<Bytes>>>,
    /// Bytes still to come when the length is known.
    left: Option<u64>,
}

impl RequestBody {
    /// The body `decoder` frames, and the sender the connection task feeds
    /// (none for a request without a body).
    pub fn channel(decoder: &Decoder) -> (RequestBody, Option<mpsc::Sender<io::Result<Bytes>>>) {
        if decoder.is_done() {
            return (RequestBody { rx: None, left: Some(0) }, None);
        }
        let (tx, rx) = mpsc::channel(4);
        (RequestBody { rx: Some(rx), left: decoder.remaining() }, Some(tx))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let Some(rx) = self.rx.as_mut() else { return Poll::Ready(None) };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                if let Some(left) = self.left.as_mut() {
                    *left = left.saturating_sub(b.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => {
                self.rx = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.rx = None;
                self.left = Some(0);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none() || self.left == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::new(),
        }
    }
}
