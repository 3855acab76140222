//! The response body on its way downstream: it streams the upstream body,
//! gives the pooled connection back when the body ends, releases the
//! endpoint's in-flight count and the upstream's admission then, counts a
//! gRPC call's status, and enforces the idle and whole-request timeouts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::decode::{Decoder, Step};
use crate::endpoint::InflightGuard;
use crate::overload::Admitted;
use crate::pool::Pooled;
use crate::tunnel::Upgraded;

/// Why a response body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("upstream body: {0}")]
    Upstream(#[from] hyper::Error),
    #[error("upstream body: {0}")]
    Read(#[from] std::io::Error),
    #[error("upstream body: {0}")]
    Framing(#[from] crate::decode::FramingError),
    #[error("upstream closed the connection in the middle of the body")]
    Truncated,
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
    /// A 101's: no body, the connection becomes a tunnel.
    Upgrade(Option<Box<Upgraded>>),
}

/// Where a streamed body comes from.
pub enum Source {
    /// Our HTTP/1.1 client: decoded from the pooled connection's buffer.
    H1 { decoder: Decoder, keep_alive: bool },
    /// hyper's HTTP/2 client.
    H2(Incoming),
}

struct Streaming {
    source: Source,
    conn: Option<Pooled>,
    /// The endpoint's in-flight count and the upstream's admission, held
    /// until the body is done.
    _inflight: (InflightGuard, Option<Admitted>),
    /// A gRPC call's route: counts the `grpc-status` of its trailers.
    grpc: Option<Arc<crate::router::RouteRuntime>>,
    idle: Option<Duration>,
    deadline: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl RespBody {
    pub fn full(b: impl Into<Bytes>) -> Self {
        RespBody(Kind::Full(Some(b.into())))
    }

    /// The body of a 101: the upstream connection, for the tunnel.
    pub fn upgrade(u: Upgraded) -> Self {
        RespBody(Kind::Upgrade(Some(Box::new(u))))
    }

    /// The upstream connection of a 101, once.
    pub fn take_upgrade(&mut self) -> Option<Box<Upgraded>> {
        match &mut self.0 {
            Kind::Upgrade(u) => u.take(),
            _ => None,
        }
    }

    pub fn upstream(
        source: Source,
        conn: Pooled,
        inflight: (InflightGuard, Option<Admitted>),
        idle: Option<Duration>,
        deadline: Option<Instant>,
        grpc: Option<Arc<crate::router::RouteRuntime>>,
    ) -> Self {
        let mut s = Streaming { source, conn: Some(conn), _inflight: inflight, grpc, idle, deadline, timer: None };
        if s.is_end() {
            s.finish();
        }
        RespBody(Kind::Stream(Box::new(s)))
    }
}

impl Streaming {
    fn is_end(&self) -> bool {
        match &self.source {
            Source::H1 { decoder, .. } => decoder.is_done(),
            Source::H2(b) => b.is_end_stream(),
        }
    }

    /// The body was read to its end: the connection can serve another
    /// request, unless the upstream asked to close it.
    fn finish(&mut self) {
        let reusable = match &self.source {
            Source::H1 { keep_alive, .. } => *keep_alive,
            Source::H2(_) => true,
        };
        match self.conn.take() {
            Some(c) if reusable => c.release(),
            _ => {}
        }
    }

    /// Fails the body: the connection is in an unknown state and is dropped.
    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.conn = None;
        self.source = Source::H1 { decoder: Decoder::Done, keep_alive: false };
        Poll::Ready(Some(Err(e)))
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

    fn poll_source(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.source {
            // Data and trailers (gRPC's status travels in them).
            Source::H2(b) => match ready!(Pin::new(&mut *b).poll_frame(cx)) {
                None => Poll::Ready(None),
                Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                Some(Ok(f)) => {
                    if let (Some(t), Some(rt)) = (f.trailers_ref(), &self.grpc) {
                        rt.stats.grpc.count(t.get("grpc-status"));
                        self.grpc = None;
                    }
                    Poll::Ready(Some(Ok(f)))
                }
            },
            Source::H1 { decoder, keep_alive } => {
                let Some(conn) = self.conn.as_mut().and_then(Pooled::h1) else { return Poll::Ready(None) };
                loop {
                    match decoder.step(&mut conn.buf) {
                        Err(e) => return Poll::Ready(Some(Err(BodyError::Framing(e)))),
                        Ok(Step::Data(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
                        Ok(Step::End) => return Poll::Ready(None),
                        Ok(Step::More) => match ready!(conn.poll_fill(cx)) {
                            Err(e) => return Poll::Ready(Some(Err(e.into()))),
                            Ok(0) if *decoder == Decoder::UntilClose => {
                                *decoder = Decoder::Done;
                                *keep_alive = false;
                                return Poll::Ready(None);
                            }
                            Ok(0) => return Poll::Ready(Some(Err(BodyError::Truncated))),
                            Ok(_) => continue,
                        },
                    }
                }
            }
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let s = match &mut self.0 {
            Kind::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upgrade(_) => return Poll::Ready(None),
            Kind::Stream(s) => s,
        };
        match s.poll_source(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // Progress: the idle timer starts over from the next wait.
                if s.idle.is_some() {
                    s.timer = None;
                }
                if s.is_end() {
                    s.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => s.fail(e),
            Poll::Ready(None) => {
                s.finish();
                Poll::Ready(None)
            }
            Poll::Pending => match s.poll_timer(cx) {
                Poll::Ready(e) => s.fail(e),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(b) => b.is_none(),
            Kind::Upgrade(_) => true,
            Kind::Stream(s) => s.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upgrade(_) => SizeHint::with_exact(0),
            Kind::Stream(s) => match &s.source {
                Source::H1 { decoder, .. } => decoder.remaining().map_or_else(SizeHint::new, SizeHint::with_exact),
                Source::H2(b) => b.size_hint(),
            },
        }
    }
}
