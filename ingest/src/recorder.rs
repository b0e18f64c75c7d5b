//! The recorder: the one consumer of finished calls. Proxy tasks hand it `EndedCall`s
//! through a bounded channel with `try_record` (never waits; full → drop and count), and,
//! ahead of a stream's end, its bytes in `StreamPiece`s (`try_piece`). Its own OS thread
//! parses the streams, builds each call's record (parsing a buffered JSON response),
//! estimates missing usage, prices the call, applies the capture policy, appends the record
//! to the local log and then shows it to observers (exporters, the scorer).
//!
//! Shutdown: `RecorderHandle::shutdown` closes the door, drains every queued record to disk,
//! fsyncs and joins the thread.
//!
//! Waking the recorder: a sender that finds it parked wakes it (a futex call). A proxy
//! worker shares its core with the recorder, and a woken recorder can take that core at
//! once: woken by the sender, it would run before the worker writes the response it just
//! finished. So worker threads defer the wake (`RecordSender::deferring_wakes`) to the
//! moment they go idle (`wake_deferred`, called from the runtime's `on_thread_park`), when
//! their writes are out. The recorder then runs in the worker's idle time instead of
//! ahead of its clients.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::background::Yielder;
use crate::capture::CapturePolicy;
use crate::estimate::estimate_usage;
use crate::exchange::{EndedCall, OpenStreams, PendingTrace, StreamPiece};
use crate::log::{LogConfig, SegmentWriter};
use crate::pricing::PriceTable;
use crate::record::{ErrorKind, TraceRecord, UsageSource};

/// Sees every record after it is on disk. Runs on the recorder thread: it must not block
/// (hand work to a bounded queue of its own).
pub trait RecordObserver: Send {
    fn observe(&mut self, record: &TraceRecord, pending_meta: &ObservedMeta);
}

/// Extra facts about a record that are not columns (request parameters, upstream address,
/// tool-call ids, the score directive).
pub type ObservedMeta = crate::exchange::CallExtras;

/// Counters the recorder keeps; shared with metrics.
#[derive(Debug, Default)]
pub struct RecorderStats {
    pub written: AtomicU64,
    pub dropped_full: AtomicU64,
    pub write_errors: AtomicU64,
    pub queued: AtomicU64,
    /// Stream pieces the queue had no room for: the worker parsed them itself, or held them
    /// for the next piece once the recorder had the stream's parser.
    pub pieces_refused: AtomicU64,
    last_drop_log: AtomicU64,
}

/// What the proxy queues for the recorder. One queue for both keeps a stream's pieces ahead
/// of its end.
#[derive(Debug)]
enum Message {
    Piece(StreamPiece),
    Ended(EndedCall),
}

/// The sending side, cloned into every connection task.
#[derive(Clone, Debug)]
pub struct RecordSender {
    tx: SyncSender<Message>,
    stats: Arc<RecorderStats>,
    /// The recorder's thread, to wake after queueing.
    recorder: Thread,
    /// Leave the wake to `wake_deferred` (see the module notes).
    defer: bool,
}

/// Sends whose wake a deferring thread may hold back before it wakes the recorder anyway:
/// a thread that never goes idle still gets its calls recorded.
const DEFER_MAX: u32 = 64;

thread_local! {
    /// The recorder this thread queued to without waking it, and how many times.
    static UNWOKEN: RefCell<Option<(Thread, u32)>> = const { RefCell::new(None) };
}

/// Wakes the recorder if this thread queued to it without waking it
/// (`RecordSender::deferring_wakes`). A worker runtime calls this just before it parks.
pub fn wake_deferred() {
    if let Some((recorder, _)) = UNWOKEN.take() {
        recorder.unpark();
    }
}

impl RecordSender {
    /// This sender, leaving the recorder's wake to `wake_deferred`, which the sending thread
    /// must call before it goes idle (the recorder otherwise finds the calls within
    /// `IDLE`), or after `DEFER_MAX` sends, whichever comes first.
    pub fn deferring_wakes(mut self) -> Self {
        self.defer = true;
        self
    }

    /// The recorder has something new: wake it, now or when this thread goes idle.
    fn wake(&self) {
        if !self.defer {
            self.recorder.unpark();
            return;
        }
        UNWOKEN.with_borrow_mut(|unwoken| match unwoken {
            Some((recorder, n)) if recorder.id() == self.recorder.id() => {
                *n += 1;
                if *n >= DEFER_MAX {
                    recorder.unpark();
                    *unwoken = None;
                }
            }
            _ => {
                if let Some((other, _)) = unwoken.replace((self.recorder.clone(), 1)) {
                    other.unpark();
                }
            }
        });
    }

    /// Queues a finished call without waiting. When the queue is full (or the recorder is
    /// gone) the record is dropped, counted, and a warning is logged at most every 10 s.
    pub fn try_record(&self, p: EndedCall) -> bool {
        match self.tx.try_send(Message::Ended(p)) {
            Ok(()) => {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
                self.wake();
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = self.stats.dropped_full.fetch_add(1, Ordering::Relaxed) + 1;
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                let last = self.stats.last_drop_log.load(Ordering::Relaxed);
                if now >= last + 10
                    && self
                        .stats
                        .last_drop_log
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        dropped_total = n,
                        "trace record queue full; dropping records (raise log.channel_capacity or check the disk)"
                    );
                }
                false
            }
        }
    }

    /// Queues a piece of a stream for parsing without waiting; hands it back when the queue
    /// is full (or the recorder is gone), for the caller to parse itself
    /// (`Exchange::piece_refused`).
    pub fn try_piece(&self, piece: StreamPiece) -> Result<(), StreamPiece> {
        let refused = match self.tx.try_send(Message::Piece(piece)) {
            Ok(()) => {
                self.wake();
                return Ok(());
            }
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => m,
        };
        self.stats.pieces_refused.fetch_add(1, Ordering::Relaxed);
        match refused {
            Message::Piece(p) => Err(p),
            Message::Ended(_) => unreachable!("try_send hands back the message it was given"),
        }
    }

    pub fn stats(&self) -> &Arc<RecorderStats> {
        &self.stats
    }
}

/// Owner of the recorder thread.
#[derive(Debug)]
pub struct RecorderHandle {
    closing: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<RecorderStats>,
}

impl RecorderHandle {
    /// Writes every record queued so far, fsyncs, and joins the thread. Records sent after
    /// this starts may be dropped (and are counted).
    pub fn shutdown(mut self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            if t.join().is_err() {
                tracing::error!("recorder thread panicked");
            }
        }
    }

    pub fn stats(&self) -> &Arc<RecorderStats> {
        &self.stats
    }
}

/// Everything the recorder needs to turn a pending call into a stored record.
pub struct RecorderConfig {
    pub log: LogConfig,
    pub prices: Arc<PriceTable>,
    pub capture: CapturePolicy,
    pub observers: Vec<Box<dyn RecordObserver>>,
    /// A shipper keeps the folder under `log.max_disk_bytes` (it knows what was shipped);
    /// otherwise the writer does on rotation.
    pub cap_enforced_by_shipper: bool,
}

/// How long the recorder lets records gather after each batch (see the loop).
/// Records reach the log at most this much later; the request path never waits for them.
const COALESCE: Duration = Duration::from_millis(10);

/// How long the recorder waits, with nothing queued, before it flushes the log, rotates an
/// old segment and forgets abandoned streams.
const IDLE: Duration = Duration::from_millis(100);

/// The most calls the recorder takes from its queue at once.
const BATCH: usize = 1024;

/// How often the recorder forgets streams whose end was refused by a full queue.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Starts the recorder thread writing to `<data_dir>/traces/`.
pub fn spawn_recorder(data_dir: &Path, cfg: RecorderConfig) -> std::io::Result<(RecordSender, RecorderHandle)> {
    let mut writer = SegmentWriter::open(data_dir, "traces", cfg.log.clone())?;
    if cfg.cap_enforced_by_shipper {
        writer.set_cap_enforced_elsewhere();
    }
    let (tx, rx) = mpsc::sync_channel::<Message>(cfg.log.channel_capacity.max(1));
    let stats = Arc::new(RecorderStats::default());
    let closing = Arc::new(AtomicBool::new(false));
    let thread = {
        let stats = stats.clone();
        let closing = closing.clone();
        let RecorderConfig { prices, capture, observers, .. } = cfg;
        let mut out = Batcher {
            writer,
            prices,
            capture,
            observers,
            stats,
            streams: OpenStreams::default(),
            last_sweep: Instant::now(),
            last_err_log: None,
        };
        std::thread::Builder::new().name("llmtap-recorder".into()).spawn(move || {
            let mut batch = Vec::with_capacity(256);
            loop {
                let mut gone = false;
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            gone = true;
                            break;
                        }
                    }
                }
                if batch.is_empty() {
                    if gone || closing.load(Ordering::SeqCst) {
                        break;
                    }
                    // Nothing queued: wait for a sender's wake (which may come before this
                    // park; the park then returns at once), or do the idle chores.
                    let parked = Instant::now();
                    std::thread::park_timeout(IDLE);
                    if parked.elapsed() >= IDLE {
                        out.idle();
                    }
                    continue;
                }
                // A full batch means more are waiting: the recorder is behind, so it keeps
                // the core (no yields) and goes straight on to the next batch.
                let behind = batch.len() >= BATCH;
                out.write(&mut batch, if behind { Yielder::off() } else { Yielder::new() });
                if !behind {
                    // Let the next records gather instead of being woken for each one: a
                    // sender only wakes a parked recorder, and each wake is a futex call and
                    // a context switch on both sides. At most one wake per COALESCE.
                    std::thread::sleep(COALESCE);
                }
            }
            // Drain what is still queued.
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
                if batch.len() >= BATCH {
                    out.write(&mut batch, Yielder::off());
                }
            }
            out.write(&mut batch, Yielder::off());
            out.close();
        })?
    };
    let recorder = thread.thread().clone();
    Ok((
        RecordSender { tx, stats: stats.clone(), recorder, defer: false },
        RecorderHandle { closing, thread: Some(thread), stats },
    ))
}

fn log_write_error(last: &mut Option<Instant>, e: &std::io::Error) {
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
        tracing::error!(error = %e, "trace log write failed; records in this batch are lost");
        *last = Some(Instant::now());
    }
}

/// The recorder thread's output side: where records go and what it needs to build them.
struct Batcher {
    writer: SegmentWriter,
    prices: Arc<PriceTable>,
    capture: CapturePolicy,
    observers: Vec<Box<dyn RecordObserver>>,
    stats: Arc<RecorderStats>,
    /// Streams whose pieces came ahead of their end.
    streams: OpenStreams,
    last_sweep: Instant,
    /// When a write error was last logged: at most one line per 10 s.
    last_err_log: Option<Instant>,
}

impl Batcher {
    /// Parses the stream pieces in `batch`; builds, writes and shows the observers every
    /// call in it, offering the core between messages through `turn`.
    fn write(&mut self, batch: &mut Vec<Message>, mut turn: Yielder) {
        if batch.is_empty() {
            return;
        }
        let stats = &*self.stats;
        let mut done = Vec::with_capacity(batch.len());
        let mut line = Vec::with_capacity(2048);
        for msg in batch.drain(..) {
            turn.tick();
            let call = match msg {
                Message::Piece(piece) => {
                    self.streams.feed(piece);
                    continue;
                }
                Message::Ended(call) => call,
            };
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            let mut p = call.into_pending(&mut self.streams);
            let extras = std::mem::take(&mut p.extras);
            let rec = complete_record(p, &self.prices, &self.capture);
            line.clear();
            if serde_json::to_writer(&mut line, &rec).is_err() {
                stats.write_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match self.writer.append(&line) {
                Ok(()) => done.push((rec, extras)),
                Err(e) => {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    log_write_error(&mut self.last_err_log, &e);
                }
            }
        }
        if let Err(e) = self.writer.flush() {
            log_write_error(&mut self.last_err_log, &e);
        }
        stats.written.fetch_add(done.len() as u64, Ordering::Relaxed);
        for (rec, meta) in &done {
            turn.tick();
            for o in self.observers.iter_mut() {
                o.observe(rec, meta);
            }
        }
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.streams.sweep();
            self.last_sweep = Instant::now();
        }
    }

    /// Nothing arrived for a while: push buffered lines to the file, rotate an old segment,
    /// forget streams whose end will not come.
    fn idle(&mut self) {
        if let Err(e) = self.writer.flush().and_then(|_| self.writer.rotate_if_old()) {
            log_write_error(&mut self.last_err_log, &e);
        }
        self.streams.sweep();
    }

    fn close(mut self) {
        if let Err(e) = self.writer.close() {
            log_write_error(&mut self.last_err_log, &e);
        }
    }
}

/// Turns a pending call into the stored record: tokens (reported or estimated), cost, bodies.
pub fn complete_record(p: PendingTrace, prices: &PriceTable, capture: &CapturePolicy) -> TraceRecord {
    let PendingTrace { mut record, usage, request_body, output_len, capture_bodies, .. } = p;
    let answered = record.status > 0 && record.status < 400 && !matches!(record.error_kind, ErrorKind::UpstreamConnect);
    let usage = match usage {
        Some(u) => {
            record.usage_source = UsageSource::Reported;
            Some(u)
        }
        None if answered => {
            let tool_calls: Vec<_> = record
                .tool_calls
                .iter()
                .zip(&record.tool_call_args)
                .map(|(n, a)| crate::provider::ToolCall { name: n.clone(), arguments: a.clone(), id: String::new() })
                .collect();
            let u = estimate_usage(record.model(), &request_body, &record.output_text, output_len, &tool_calls);
            record.usage_source = UsageSource::Estimated;
            Some(u)
        }
        None => None,
    };
    if let Some(u) = usage {
        record.input_tokens = u.input;
        record.output_tokens = u.output;
        record.cache_read_tokens = u.cache_read;
        record.cache_write_tokens = u.cache_write;
        record.reasoning_tokens = u.reasoning;
        record.cost_usd = prices.cost(record.model(), &u);
    }
    if capture_bodies {
        record.request_body = capture.apply(&request_body);
        let out = std::mem::take(&mut record.output_text);
        record.output_text = capture.apply_text(&out);
    } else {
        record.request_body.clear();
        record.output_text.clear();
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{ProviderKind, Usage};

    fn pending(id: &str) -> EndedCall {
        PendingTrace {
            record: TraceRecord {
                trace_id: id.into(),
                status: 200,
                request_model: "gpt-4o".into(),
                ..TraceRecord::default()
            },
            provider: ProviderKind::OpenAi,
            usage: Some(Usage { input: 10, output: 5, ..Usage::default() }),
            request_body: bytes::Bytes::from_static(b"{}"),
            output_len: 0,
            capture_bodies: true,
            extras: Default::default(),
        }
        .into()
    }

    #[test]
    fn drops_record_when_queue_full_without_waiting() {
        let (tx, rx) = mpsc::sync_channel(2);
        let sender = RecordSender {
            tx,
            stats: Arc::new(RecorderStats::default()),
            recorder: std::thread::current(),
            defer: false,
        };
        assert!(sender.try_record(pending("a")));
        assert!(sender.try_record(pending("b")));
        assert!(!sender.try_record(pending("c")));
        assert!(!sender.try_record(pending("d")));
        assert_eq!(sender.stats().dropped_full.load(Ordering::Relaxed), 2);
        let ids: Vec<_> = rx
            .try_iter()
            .map(|m| match m {
                Message::Ended(c) => c.into_pending(&mut OpenStreams::default()).record.trace_id,
                Message::Piece(p) => panic!("no pieces were sent: {p:?}"),
            })
            .collect();
        assert_eq!(ids, vec!["a", "b"]);
    }

    /// A stand-in recorder thread that counts its wakes.
    fn counting_thread() -> (Thread, Arc<AtomicU64>, Arc<AtomicBool>, JoinHandle<()>) {
        let wakes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (wakes, stop) = (wakes.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::park();
                    wakes.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        (t.thread().clone(), wakes, stop, t)
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < until, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn unwoken() -> Option<u32> {
        UNWOKEN.with_borrow(|u| u.as_ref().map(|(_, n)| *n))
    }

    #[test]
    fn a_deferring_sender_wakes_the_recorder_when_its_thread_goes_idle_or_after_defer_max() {
        // Runs on a thread of its own: the deferred wakes are the thread's.
        std::thread::spawn(|| {
            let (recorder, wakes, stop, handle) = counting_thread();
            let (tx, rx) = mpsc::sync_channel(1000);
            let stats = Arc::new(RecorderStats::default());
            let sender = RecordSender { tx, stats, recorder: recorder.clone(), defer: false }.deferring_wakes();

            for i in 0..3 {
                assert!(sender.try_record(pending(&format!("a{i}"))));
            }
            assert_eq!(unwoken(), Some(3), "three sends, no wake yet");
            wake_deferred();
            assert_eq!(unwoken(), None);
            wait_for("the wake at idle", || wakes.load(Ordering::SeqCst) == 1);
            wake_deferred(); // nothing left to wake

            for i in 0..DEFER_MAX - 1 {
                assert!(sender.try_record(pending(&format!("b{i}"))));
            }
            assert_eq!(unwoken(), Some(DEFER_MAX - 1));
            assert!(sender.try_record(pending("last")));
            assert_eq!(unwoken(), None, "the {DEFER_MAX}th send wakes the recorder itself");
            wait_for("the wake after DEFER_MAX sends", || wakes.load(Ordering::SeqCst) == 2);
            assert_eq!(rx.try_iter().count(), 3 + DEFER_MAX as usize);

            // A sender that does not defer wakes on every send and leaves nothing behind.
            let eager = RecordSender { defer: false, ..sender };
            assert!(eager.try_record(pending("eager")));
            assert_eq!(unwoken(), None);
            wait_for("the eager wake", || wakes.load(Ordering::SeqCst) == 3);

            stop.store(true, Ordering::SeqCst);
            recorder.unpark();
            handle.join().unwrap();
        })
        .join()
        .unwrap();
    }

    /// The default log and capture policy, embedded prices, no observers.
    fn plain_config() -> RecorderConfig {
        RecorderConfig {
            log: LogConfig::default(),
            prices: Arc::new(PriceTable::embedded()),
            capture: crate::capture::CaptureConfig::default().validate().unwrap(),
            observers: Vec::new(),
            cap_enforced_by_shipper: false,
        }
    }

    #[test]
    fn a_call_queued_while_the_recorder_is_parked_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, handle) = spawn_recorder(dir.path(), plain_config()).unwrap();
        let tx = tx.deferring_wakes();
        assert!(tx.try_record(pending("deferred")));
        wake_deferred();
        let stats = handle.stats().clone();
        wait_for("the record on disk", || stats.written.load(Ordering::SeqCst) == 1);
        drop(tx);
        handle.shutdown();
    }

    #[test]
    fn shutdown_writes_every_queued_record() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, handle) = spawn_recorder(dir.path(), plain_config()).unwrap();
        for i in 0..2000 {
            assert!(tx.try_record(pending(&format!("t{i}"))));
        }
        drop(tx);
        handle.shutdown();
        let mut n = 0;
        crate::log::for_each_line(&dir.path().join("traces"), |_, line| {
            let r: TraceRecord = serde_json::from_str(line).unwrap();
            assert_eq!(r.trace_id, format!("t{n}"));
            assert_eq!(r.usage_source, UsageSource::Reported);
            assert!((r.cost_usd - (10.0 * 2.5e-6 + 5.0 * 1e-5)).abs() < 1e-15);
            n += 1;
        })
        .unwrap();
        assert_eq!(n, 2000);
    }
}
