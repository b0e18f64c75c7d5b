//! The tap body: wraps the upstream response body, forwards each frame to the client as
//! it arrives, and shows a side copy to the call's `Exchange`.
//!
//! Design notes
//! - Frames are forwarded unchanged (refcounted `Bytes`, no copy); the only exception is the
//!   OpenAI stream whose `include_usage` llmtap injected, where the exchange hands back the
//!   bytes without the additions.
//! - With a pooled HTTP/1.1 upstream (`pool::Conn`) the tap reads the upstream connection
//!   itself: each poll reads what the socket has and takes every frame decoded from it.
//!   The connection goes back to the pool when the body ended cleanly, and is closed with
//!   the tap otherwise.
//! - Exactly one record per call: at the end of the body, on an upstream error or idle
//!   timeout, or in `Drop` when the client went away first. The call goes to the recorder
//!   with `try_record`, which never waits; the recorder's thread builds the record.
//! - A stream's bytes are parsed on the recorder's thread, not here: the exchange keeps a
//!   copy and every few KiB the tap queues it to the recorder as a `StreamPiece`.
//! - A client that leaves after the stream's final event has succeeded; before it, the call
//!   is `client_disconnect` (the recorder decides, once it has parsed the stream). Dropping this body drops the upstream body, which closes the
//!   upstream stream at once: the upstream request is cancelled with the client's.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use llmtap_ingest::recorder::RecordSender;
use llmtap_ingest::{ErrorKind, Exchange};
use tokio::time::Sleep;

use crate::upstream::UpstreamBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("llmtap: upstream sent nothing for {0:?}")]
pub struct IdleTimeout(pub Duration);

/// A frame as the upstream body yields it.
pub type UpstreamFrame = Result<Frame<Bytes>, BoxError>;

/// Frames gathered before hyper gets them; more than this go out in the next write.
const MAX_GATHER: usize = 16;

/// Response body that taps the upstream's frames.
pub struct TapBody {
    inner: UpstreamBody,
    /// Frames taken from `inner` and not yet handed to hyper: those that came with the
    /// head (`ready_frames`), then each batch gathered while `gathering`.
    early: VecDeque<UpstreamFrame>,
    /// `inner` already ended: nothing follows `early`.
    upstream_ended: bool,
    /// A frame arrived and the tap requeued itself to take the ones right behind it.
    gathering: bool,
    exchange: Option<Box<Exchange>>,
    recorder: RecordSender,
    idle_timeout: Duration,
    /// When the upstream last sent a frame; the idle deadline counts from here.
    last_frame: Instant,
    /// Armed the first time the upstream makes us wait, and moved only when it fires: a
    /// frame costs a clock read, not a timer-wheel update.
    idle: IdleTimer,
    /// Bytes held back by the exchange, released after the upstream body ended.
    tail: Option<Bytes>,
    done: bool,
    rewrites: bool,
    status: u16,
}

impl TapBody {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: UpstreamBody,
        (early, upstream_ended): (VecDeque<UpstreamFrame>, bool),
        exchange: Box<Exchange>,
        recorder: RecordSender,
        idle_timeout: Duration,
        rewrites: bool,
        status: u16,
    ) -> Self {
        TapBody {
            inner,
            early,
            upstream_ended,
            gathering: false,
            exchange: Some(exchange),
            recorder,
            idle_timeout,
            last_frame: Instant::now(),
            idle: IdleTimer::default(),
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

    /// The upstream body ended cleanly: keep what the exchange held back and queue the call
    /// for the recorder, which builds its record (`EndedCall`).
    fn end(&mut self) {
        self.done = true;
        self.inner.release();
        let Some(mut ex) = self.exchange.take() else {
            return;
        };
        let tail = ex.on_response_end();
        if !tail.is_empty() {
            self.tail = Some(tail);
        }
        self.recorder.try_record(ex.finish(ErrorKind::None, self.status));
    }

    /// The next frame: gathered ones first, then the upstream's. A frame fresh from the
    /// upstream is not handed out at once: the tap requeues itself behind the upstream
    /// connection's task, which then decodes whatever else it has read, and hands out the
    /// whole batch, which hyper writes at once. One write per batch instead of per frame;
    /// the cost is one run-queue pass, no syscall.
    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> Poll<Option<UpstreamFrame>> {
        if self.inner.is_driven() {
            return self.poll_driven(cx);
        }
        if self.gathering {
            match self.inner.poll_frame(cx) {
                Poll::Ready(Some(f)) => {
                    let more = f.is_ok() && self.early.len() + 1 < MAX_GATHER;
                    self.early.push_back(f);
                    if more {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Poll::Ready(None) => self.upstream_ended = true,
                Poll::Pending => {}
            }
            self.gathering = false;
        }
        if let Some(f) = self.early.pop_front() {
            return Poll::Ready(Some(f));
        }
        if self.upstream_ended {
            return Poll::Ready(None);
        }
        match self.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.early.push_back(Ok(frame));
                self.gathering = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }

    /// `poll_upstream` when this task reads the upstream connection: no requeue is needed
    /// to let it decode, so the batch is gathered at once. Only the first frame may take a
    /// socket read; those behind it come from what that read brought. Polling the socket
    /// again would find it empty almost always, and register a wake-up that hyper's next
    /// poll registers anyway: hyper polls again at once after a frame, and that poll reads
    /// whatever else has arrived.
    fn poll_driven(&mut self, cx: &mut Context<'_>) -> Poll<Option<UpstreamFrame>> {
        if self.early.is_empty() && !self.upstream_ended {
            // `None` when there is nothing to take without waiting; `Some(None)` at the end.
            let mut next = match self.inner.poll_frame(cx) {
                Poll::Ready(polled) => Some(polled),
                Poll::Pending => None,
            };
            while let Some(polled) = next {
                match polled {
                    Some(f) => {
                        let failed = f.is_err();
                        self.early.push_back(f);
                        if failed || self.early.len() == MAX_GATHER {
                            break;
                        }
                    }
                    None => {
                        self.upstream_ended = true;
                        break;
                    }
                }
                next = self.inner.buffered_frame();
            }
        }
        match self.early.pop_front() {
            Some(f) => Poll::Ready(Some(f)),
            None if self.upstream_ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// Whether the upstream has been silent for `idle_timeout`; arms the timer otherwise.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.idle.expired(tokio::time::Instant::from_std(self.last_frame + self.idle_timeout), cx)
    }
}

/// The idle timer of one response body. Frames only move the deadline later, so a timer
/// armed for an older deadline fires early and is moved then: one timer-wheel update per
/// `idle_timeout`, not per frame.
///
/// hyper polls a streaming body about three times per frame, twice to a `Pending`. While
/// the timer is armed, has not fired and would wake the same task, polling it again only
/// re-registers the same waker (the task budget, two atomic swaps), so it is skipped.
#[derive(Default)]
struct IdleTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the armed timer will wake; `None` until a poll is known to have armed it.
    armed_for: Option<Waker>,
}

impl IdleTimer {
    fn expired(&mut self, deadline: tokio::time::Instant, cx: &mut Context<'_>) -> bool {
        if let (Some(sleep), Some(waker)) = (&self.sleep, &self.armed_for) {
            if !sleep.is_elapsed() && waker.will_wake(cx.waker()) {
                return false;
            }
        }
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            if sleep.deadline() >= deadline {
                return true;
            }
            sleep.as_mut().reset(deadline);
            if sleep.as_mut().poll(cx).is_ready() {
                return true;
            }
        }
        // A poll that found the task's budget spent registered nothing (tokio's coop): the
        // next one must poll again. The budget is the same before and after this poll.
        self.armed_for = tokio::task::coop::has_budget_remaining().then(|| cx.waker().clone());
        false
    }
}

/// The frames the upstream connection already holds, taken without waiting: a JSON body
/// usually arrives in the same read as its head, a stream's head with its first event.
/// Handed to hyper together with the head, the head, the body and the end of a chunked
/// body leave in one write instead of two or three. Returns the frames and whether the
/// body ended.
///
/// A connection that runs in its own task decodes what it has read only when it gets to
/// run, so one requeue is allowed after each frame; the next `Pending` ends the wait. One
/// this task reads (`is_driven`) has nothing more at its first `Pending`.
pub async fn ready_frames(body: &mut UpstreamBody) -> (VecDeque<UpstreamFrame>, bool) {
    let driven = body.is_driven();
    let mut frames = VecDeque::new();
    let mut yielded = false;
    while frames.len() < MAX_GATHER {
        let polled = std::future::poll_fn(|cx| Poll::Ready(body.poll_frame(cx))).await;
        match polled {
            Poll::Ready(Some(f)) => {
                let failed = f.is_err();
                frames.push_back(f);
                if failed {
                    break;
                }
                yielded = false;
            }
            Poll::Ready(None) => return (frames, true),
            Poll::Pending if yielded || driven => break,
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
                    if this.gathering || !this.idle_expired(cx) {
                        return Poll::Pending;
                    }
                    this.done = true;
                    this.finish(ErrorKind::UpstreamTimeout);
                    return Poll::Ready(Some(Err(Box::new(IdleTimeout(this.idle_timeout)))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let started = Instant::now();
                    this.last_frame = started;
                    let frame = match frame.into_data() {
                        Ok(data) => match this.exchange.as_mut() {
                            Some(ex) => {
                                let out = ex.on_response_frame(data);
                                if let Some(piece) = ex.take_piece() {
                                    if let Err(piece) = this.recorder.try_piece(piece) {
                                        ex.piece_refused(piece);
                                    }
                                }
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
                    return Poll::Ready(Some(Err(e)));
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
            return SizeHint::default();
        }
        // The frames taken ahead of hyper are part of the body still to send.
        let early: u64 = self.early.iter().filter_map(|f| f.as_ref().ok()?.data_ref().map(|d| d.len() as u64)).sum();
        match self.inner.size_hint().exact() {
            Some(n) => SizeHint::with_exact(n + early),
            None => SizeHint::default(),
        }
    }
}

impl Drop for TapBody {
    fn drop(&mut self) {
        // A client that left after the stream's final event succeeded; the recorder, which
        // parses the stream, tells the two apart.
        self.finish(ErrorKind::ClientDisconnect);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `timer` with `deadline` until it says the silence ran out; the time that took.
    /// Inside a spawned task, whose waker is the same at every poll, as a connection's is
    /// (the test's own `block_on` hands out a different one each time).
    async fn wait_expired(mut timer: IdleTimer, deadline: tokio::time::Instant) -> Duration {
        let start = Instant::now();
        let wait =
            std::future::poll_fn(move |cx| if timer.expired(deadline, cx) { Poll::Ready(()) } else { Poll::Pending });
        tokio::time::timeout(Duration::from_secs(5), wait).await.expect("the idle timer never fired");
        start.elapsed()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn fires_even_when_its_first_poll_found_the_task_budget_spent() {
        let task = tokio::spawn(async {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            for i in 0..1000 {
                tx.send(i).unwrap();
            }
            let mut timer = IdleTimer::default();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(30);
            // Spend the task's budget, then poll the timer: tokio arms nothing on that poll.
            std::future::poll_fn(|cx| {
                while tokio::task::coop::has_budget_remaining() {
                    let _ = rx.poll_recv(cx);
                }
                assert!(!timer.expired(deadline, cx));
                Poll::Ready(())
            })
            .await;
            wait_expired(timer, deadline).await
        });
        let took = task.await.unwrap();
        assert!(took <= Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_later_deadline_moves_the_armed_timer_when_it_fires() {
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            let mut timer = IdleTimer::default();
            // Armed for 20 ms; frames then move the deadline to 80 ms.
            let first =
                std::future::poll_fn(|cx| Poll::Ready(timer.expired(start + Duration::from_millis(20), cx))).await;
            assert!(!first);
            wait_expired(timer, start + Duration::from_millis(80)).await
        })
        .await
        .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(80), "fired at {:?}", start.elapsed());
    }
}
