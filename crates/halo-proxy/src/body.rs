//! Body types on both sides of the proxy.
//!
//! [`ProxyBody`] is what is sent upstream: empty or buffered bodies can be
//! replayed on a retry, a streamed body cannot. [`RespBody`] is what goes back
//! downstream: it streams the upstream body, gives the pooled connection back
//! when the body ends, and enforces the idle and whole-request timeouts.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::endpoint::InflightGuard;
use crate::pool::Pooled;

/// A request body on its way upstream.
pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    Stream(Incoming),
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
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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

/// Why a response body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("upstream body idle for longer than {0:?}")]
    Idle(Duration),
    #[error("request exceeded its timeout while streaming the response")]
    Deadline,
}

/// A response body on its way downstream.
pub struct RespBody(Kind);

enum Kind {
    Full(Option<Bytes>),
    Stream(Box<Streaming>),
}

struct Streaming {
    inner: Incoming,
    conn: Option<Pooled>,
    _inflight: InflightGuard,
    idle: Option<Duration>,
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl RespBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        RespBody(Kind::Full(Some(b.into())))
    }

    pub fn upstream(
        inner: Incoming,
        conn: Pooled,
        inflight: InflightGuard,
        idle: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Self {
        let mut s = Streaming { inner, conn: Some(conn), _inflight: inflight, idle, deadline, timer: None };
        if s.inner.is_end_stream() {
            s.finish();
        }
        RespBody(Kind::Stream(Box::new(s)))
    }
}

impl Streaming {
    /// The body was read to its end: the connection can serve another request.
    fn finish(&mut self) {
        if let Some(c) = self.conn.take() {
            c.release();
        }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<BodyError> {
        let (when, err) = match (self.idle, self.deadline) {
            (None, None) => return Poll::Pending,
            (Some(i), Some(d)) if Instant::now() + i > d => (d, BodyError::Deadline),
            (Some(i), _) => (Instant::now() + i, BodyError::Idle(i)),
            (None, Some(d)) => (d, BodyError::Deadline),
        };
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(when)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(err)
    }
}

use std::future::Future;

impl Body for RespBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let s = match &mut self.0 {
            Kind::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => s,
        };
        match Pin::new(&mut s.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                // Progress: the idle timer starts over from the next wait.
                if s.idle.is_some() {
                    s.timer = None;
                }
                if s.inner.is_end_stream() {
                    s.finish();
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                s.conn = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                s.finish();
                Poll::Ready(None)
            }
            Poll::Pending => match s.poll_timer(cx) {
                Poll::Ready(e) => {
                    s.conn = None;
                    Poll::Ready(Some(Err(e)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(s) => s.inner.size_hint(),
        }
    }
}
