//! The tap body: wraps the upstream response body, forwards each frame to the client as
//! it arrives, and shows a side copy to the call's `Exchange`.
//!
//! Design notes
//! - Frames are forwarded unchanged (refcounted `Bytes`, no copy); the only exception is the
//!   OpenAI stream whose `include_usage` llmtap injected, where the exchange hands back the
//!   bytes without the additions.
//! - Exactly one record per call: at the end of the body, on an upstream error or idle
//!   timeout, or in `Drop` when the client went away first. It goes out with `try_record`,
//!   which never waits.
//! - A client that leaves after the stream's final event has succeeded; before it, the call
//!   is `client_disconnect`. Dropping this body drops the upstream body, which closes the
//!   upstream stream at once: the upstream request is cancelled with the client's.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use llmtap_ingest::recorder::RecordSender;
use llmtap_ingest::{ErrorKind, Exchange};
use tokio::time::Sleep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("llmtap: upstream sent nothing for {0:?}")]
pub struct IdleTimeout(pub Duration);

/// A frame as the upstream body yields it.
pub type UpstreamFrame = Result<Frame<Bytes>, hyper::Error>;

/// Response body that taps the upstream's frames.
pub struct TapBody {
    inner: Incoming,
    /// Frames taken from `inner` before the response head went to hyper (`ready_frames`).
    early: VecDeque<UpstreamFrame>,
    /// `inner` already ended: nothing follows `early`.
    upstream_ended: bool,
    exchange: Option<Exchange>,
    recorder: RecordSender,
    idle_timeout: Duration,
    /// Armed the first time the upstream makes us wait; a body that is already in hand
    /// never touches the timer wheel.
    idle: Option<Pin<Box<Sleep>>>,
    /// Bytes held back by the exchange, released after the upstream body ended.
    tail: Option<Bytes>,
    done: bool,
    rewrites: bool,
    status: u16,
}

impl TapBody {
    pub fn new(
        inner: Incoming,
        (early, upstream_ended): (VecDeque<UpstreamFrame>, bool),
        exchange: Exchange,
        recorder: RecordSender,
        idle_timeout: Duration,
        rewrites: bool,
        status: u16,
    ) -> Self {
        TapBody {
            inner,
            early,
            upstream_ended,
            exchange: Some(exchange),
            recorder,
            idle_timeout,
            idle: None,
            tail: None,
            done: false,
            rewrites,
            status,
        }
    }

    fn finish(&mut self, error: ErrorKind) {
        if let Some(ex) = self.exchange.take() {
            let pending = ex.finish(error, self.status);
            self.recorder.try_record(pending);
        }
    }

    /// The upstream body ended cleanly: record the call and keep what the exchange held back.
    fn end(&mut self) {
        self.done = true;
        if let Some(ex) = self.exchange.as_mut() {
            let tail = ex.on_response_end();
            if !tail.is_empty() {
                self.tail = Some(tail);
            }
        }
        self.finish(ErrorKind::None);
    }

    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> Poll<Option<UpstreamFrame>> {
        if let Some(f) = self.early.pop_front() {
            return Poll::Ready(Some(f));
        }
        if self.upstream_ended {
            return Poll::Ready(None);
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }
}

/// The frames the upstream connection already holds, taken without waiting: a JSON body
/// usually arrives in the same read as its head. Handed to hyper together with the head,
/// the head, the body and the end of a chunked body leave in one write instead of two or
/// three. Returns the frames and whether the body ended.
///
/// The upstream connection's task decodes what it has read only when it gets to run, so
/// one requeue is allowed after each frame; the next `Pending` ends the wait.
pub async fn ready_frames(body: &mut Incoming) -> (VecDeque<UpstreamFrame>, bool) {
    const MAX_FRAMES: usize = 16;
    let mut frames = VecDeque::new();
    let mut yielded = false;
    while frames.len() < MAX_FRAMES {
        match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await {
            Poll::Ready(Some(f)) => {
                let failed = f.is_err();
                frames.push_back(f);
                if failed {
                    break;
                }
                yielded = false;
            }
            Poll::Ready(None) => return (frames, true),
            Poll::Pending if yielded => break,
            Poll::Pending => {
                requeue().await;
                yielded = true;
            }
        }
    }
    (frames, false)
}

/// Goes to the back of the runtime's run queue, behind the upstream connection's task that
/// taking a frame just woke. Unlike `yield_now`, which waits for the next I/O driver poll
/// (one more `epoll_wait` per call), this only reschedules.
async fn requeue() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(tail) = this.tail.take() {
                return Poll::Ready(Some(Ok(Frame::data(tail))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.poll_upstream(cx) {
                Poll::Pending => {
                    let timeout = this.idle_timeout;
                    let idle = this.idle.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if idle.as_mut().poll(cx).is_ready() {
                        this.done = true;
                        this.finish(ErrorKind::UpstreamTimeout);
                        return Poll::Ready(Some(Err(Box::new(IdleTimeout(this.idle_timeout)))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let started = Instant::now();
                    if let Some(idle) = this.idle.as_mut() {
                        idle.as_mut().reset(tokio::time::Instant::now() + this.idle_timeout);
                    }
                    let frame = match frame.into_data() {
                        Ok(data) => match this.exchange.as_mut() {
                            Some(ex) => {
                                let out = ex.on_response_frame(data);
                                ex.add_overhead(started.elapsed());
                                if out.is_empty() {
                                    continue;
                                }
                                Frame::data(out)
                            }
                            None => Frame::data(data),
                        },
                        Err(trailers) => trailers,
                    };
                    if this.upstream_ended && this.early.is_empty() {
                        // The last frame: ending now lets hyper see `is_end_stream` and
                        // write the body's end with it.
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.finish(ErrorKind::UpstreamReset);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(None) => {
                    this.end();
                    continue;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.tail.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.rewrites {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for TapBody {
    fn drop(&mut self) {
        if let Some(ex) = &self.exchange {
            let error = if ex.saw_final() { ErrorKind::None } else { ErrorKind::ClientDisconnect };
            self.finish(error);
        }
    }
}
