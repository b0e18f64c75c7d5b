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

/// Response body that taps the upstream's frames.
pub struct TapBody {
    inner: Incoming,
    exchange: Option<Exchange>,
    recorder: RecordSender,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    /// Bytes held back by the exchange, released after the upstream body ended.
    tail: Option<Bytes>,
    done: bool,
    rewrites: bool,
    status: u16,
}

impl TapBody {
    pub fn new(
        inner: Incoming,
        exchange: Exchange,
        recorder: RecordSender,
        idle_timeout: Duration,
        rewrites: bool,
        status: u16,
    ) -> Self {
        TapBody {
            inner,
            exchange: Some(exchange),
            recorder,
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
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
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if this.idle.as_mut().poll(cx).is_ready() {
                        this.done = true;
                        this.finish(ErrorKind::UpstreamTimeout);
                        return Poll::Ready(Some(Err(Box::new(IdleTimeout(this.idle_timeout)))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let started = Instant::now();
                    this.idle.as_mut().reset(tokio::time::Instant::now() + this.idle_timeout);
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
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.finish(ErrorKind::UpstreamReset);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    if let Some(ex) = this.exchange.as_mut() {
                        let tail = ex.on_response_end();
                        if !tail.is_empty() {
                            this.tail = Some(tail);
                        }
                    }
                    this.finish(ErrorKind::None);
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
