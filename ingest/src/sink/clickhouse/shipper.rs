//! The shipper: tails each record folder of the local log and inserts its lines into
//! ClickHouse in batches, acknowledging a range only after ClickHouse accepted it.
//!
//! Design notes
//! - Position: `<folder>/.shipper-checkpoint.json` holds (segment, offset) of the first
//!   line not yet acknowledged. It is replaced atomically (write, fsync, rename).
//! - Exactly once: before inserting a range the shipper writes it into the checkpoint as
//!   `pending`; the insert carries `insert_deduplication_token = llmtap:<table>:<segment>:
//!   <start>-<end>`. After a crash the pending range is re-sent first, byte for byte, with the
//!   same token, so ClickHouse drops it if the first attempt had landed.
//! - Retry: connection errors, timeouts and server-side errors are retried forever with
//!   exponential backoff and jitter (the local log grows meanwhile). A batch ClickHouse
//!   rejects for its content is split in halves until the offending lines are alone; those
//!   go to `<data_dir>/quarantine/<folder>/` with the error, are counted, and the rows
//!   behind them move on.
//! - Segments: only the newest segment of a folder is ever written, so any older one is
//!   sealed. A sealed segment that is fully acknowledged is deleted (unless `keep_local`).
//! - Disk cap: past `log.max_disk_bytes` the oldest segments are deleted, shipped or not;
//!   unshipped lines lost that way are counted and logged as errors. It is the one
//!   documented loss path.

use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::background::Yielder;
use crate::log::list_segments;

/// A record folder and the table its lines go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindSpec {
    pub folder: &'static str,
    pub table: &'static str,
}

/// Every record kind the local log holds.
pub const KINDS: [KindSpec; 4] = [
    KindSpec { folder: "traces", table: "llm_traces" },
    KindSpec { folder: "scores", table: "llm_scores" },
    KindSpec { folder: "feedback", table: "llm_feedback" },
    KindSpec { folder: "drift", table: "llm_drift_events" },
];

/// One complete line of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Byte offset of the line in its segment.
    pub start: u64,
    /// Offset just past its `\n`.
    pub end: u64,
    pub text: String,
}

/// Why an insert failed, as the retry policy sees it.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// ClickHouse refused these rows for their content: retrying cannot help.
    #[error("rejected (code {code}): {message}")]
    Rejected { code: u32, message: String },
    /// Down, overloaded, timed out, or a server-side fault: retry later.
    #[error("{0}")]
    Retryable(String),
}

/// Where batches go. `insert` must be all-or-nothing for one call.
pub trait BatchSink: Send + Sync + 'static {
    fn insert(
        &self,
        kind: KindSpec,
        lines: &[Line],
        token: &str,
    ) -> impl Future<Output = Result<(), InsertError>> + Send;
}

/// Counters per shipper, shared with logs and metrics.
#[derive(Debug, Default)]
pub struct ShipperStats {
    pub rows_shipped: AtomicU64,
    /// NDJSON bytes of the shipped rows (for the rows-behind estimate).
    pub bytes_shipped: AtomicU64,
    pub batches_shipped: AtomicU64,
    pub rows_quarantined: AtomicU64,
    pub insert_retries: AtomicU64,
    pub segments_dropped: AtomicU64,
    pub rows_dropped: AtomicU64,
    /// Bytes of unshipped lines on disk (all folders), as of the last lag report.
    pub bytes_behind: AtomicU64,
    /// Age (ms) of the oldest unshipped line, as of the last lag report.
    pub lag_ms: AtomicU64,
    /// 1 while the last attempt to reach ClickHouse failed.
    pub unreachable: AtomicU64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    segment: String,
    start: u64,
    end: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    /// File name of the segment holding the next unacknowledged line ("" before any).
    segment: String,
    offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<Pending>,
}

/// Reads complete lines of one folder from its checkpoint on.
#[derive(Debug)]
pub struct Tailer {
    dir: PathBuf,
    cp_path: PathBuf,
    cp: Checkpoint,
}

/// A run of lines from one segment.
#[derive(Debug)]
pub struct Batch {
    pub segment: String,
    pub lines: Vec<Line>,
    /// The segment is sealed and this batch reaches its end.
    pub sealed_end: bool,
    /// This is the range a crash left pending: it must be sent as is.
    pub replay: bool,
}

impl Batch {
    pub fn start(&self) -> u64 {
        self.lines.first().map_or(0, |l| l.start)
    }
    pub fn end(&self) -> u64 {
        self.lines.last().map_or(0, |l| l.end)
    }
    pub fn bytes(&self) -> u64 {
        self.end() - self.start()
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Bytes the shipper reads from a segment per `read` call.
const READ_CHUNK: usize = 64 * 1024;

/// Reads `r` to its end, `READ_CHUNK` bytes at a time with `turn` ticked between reads.
/// One `read_to_end` of a batch (megabytes at 5,000 calls/s) ran for 2-3 ms in the kernel,
/// copying from the page cache and faulting in the new buffer, while a worker woken
/// meanwhile waited for all of it.
fn read_chunked(r: &mut impl Read, size_hint: usize, turn: &mut Yielder) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(size_hint);
    loop {
        turn.tick();
        if r.by_ref().take(READ_CHUNK as u64).read_to_end(&mut buf)? == 0 {
            return Ok(buf);
        }
    }
}

/// Reads lines of `path` from `from`, stopping at `max_rows`, `max_bytes` or `until`.
fn read_lines(
    path: &Path,
    from: u64,
    until: Option<u64>,
    max_rows: usize,
    max_bytes: usize,
) -> io::Result<(Vec<Line>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let stop = until.unwrap_or(len).min(len);
    if from >= stop {
        return Ok((Vec::new(), len));
    }
    f.seek(SeekFrom::Start(from))?;
    let want = (stop - from).min((max_bytes.max(1) as u64).saturating_add(64 * 1024));
    let mut turn = Yielder::new();
    let buf = read_chunked(&mut f.take(want), want as usize, &mut turn)?;
    let mut lines = Vec::new();
    let mut at = 0usize;
    let mut taken = 0usize;
    while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
        turn.tick();
        let end = at + i + 1;
        if !lines.is_empty() && (lines.len() >= max_rows || taken + (end - at) > max_bytes) && until.is_none() {
            break;
        }
        let text = String::from_utf8_lossy(&buf[at..at + i]).into_owned();
        lines.push(Line { start: from + at as u64, end: from + end as u64, text });
        taken += end - at;
        at = end;
    }
    Ok((lines, len))
}

impl Tailer {
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let cp_path = dir.join(".shipper-checkpoint.json");
        let cp = match std::fs::read(&cp_path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", cp_path.display())))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Checkpoint::default(),
            Err(e) => return Err(e),
        };
        Ok(Tailer { dir: dir.to_path_buf(), cp_path, cp })
    }

    fn persist(&self) -> io::Result<()> {
        let tmp = self.cp_path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&self.cp).map_err(io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.cp_path)?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Segments at or after the checkpoint, oldest first.
    fn remaining(&self) -> io::Result<Vec<PathBuf>> {
        Ok(list_segments(&self.dir)?.into_iter().filter(|p| file_name(p) >= self.cp.segment).collect())
    }

    /// The next lines to ship, or `None` when everything is acknowledged. Fully acknowledged
    /// sealed segments are passed (and deleted unless `keep_local`).
    pub fn next_batch(&mut self, max_rows: usize, max_bytes: usize, keep_local: bool) -> io::Result<Option<Batch>> {
        if let Some(p) = self.cp.pending.clone() {
            let path = self.dir.join(&p.segment);
            match read_lines(&path, p.start, Some(p.end), usize::MAX, usize::MAX) {
                Ok((lines, _)) if !lines.is_empty() => {
                    return Ok(Some(Batch { segment: p.segment, lines, sealed_end: false, replay: true }));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            // The pending range is gone (dropped by the disk cap): nothing to replay.
            self.cp.pending = None;
            self.persist()?;
        }
        loop {
            let segs = self.remaining()?;
            let Some(first) = segs.first() else { return Ok(None) };
            let name = file_name(first);
            let offset = if name == self.cp.segment { self.cp.offset } else { 0 };
            let sealed = segs.len() > 1;
            let (lines, len) = match read_lines(first, offset, None, max_rows, max_bytes) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if !lines.is_empty() {
                let end = lines.last().map_or(0, |l| l.end);
                return Ok(Some(Batch { segment: name, lines, sealed_end: sealed && end >= len, replay: false }));
            }
            if !sealed {
                if self.cp.segment != name {
                    self.cp = Checkpoint { segment: name, offset, pending: None };
                    self.persist()?;
                }
                return Ok(None);
            }
            // Sealed and fully acknowledged: move on to the next segment.
            let next = file_name(&segs[1]);
            self.cp = Checkpoint { segment: next, offset: 0, pending: None };
            self.persist()?;
            if !keep_local {
                match std::fs::remove_file(first) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Records `batch` as in flight before it is sent.
    pub fn mark_pending(&mut self, batch: &Batch) -> io::Result<()> {
        self.cp.pending = Some(Pending { segment: batch.segment.clone(), start: batch.start(), end: batch.end() });
        self.persist()
    }

    /// ClickHouse acknowledged `batch`: the checkpoint moves past it.
    pub fn commit(&mut self, batch: &Batch) -> io::Result<()> {
        self.cp = Checkpoint { segment: batch.segment.clone(), offset: batch.end(), pending: None };
        self.persist()
    }

    /// Unshipped bytes on disk and the age of the oldest unshipped line.
    pub fn backlog(&self) -> (u64, Option<Duration>) {
        let Ok(segs) = self.remaining() else { return (0, None) };
        let mut bytes = 0;
        for s in &segs {
            let len = std::fs::metadata(s).map(|m| m.len()).unwrap_or(0);
            let from = if file_name(s) == self.cp.segment { self.cp.offset } else { 0 };
            bytes += len.saturating_sub(from);
        }
        if bytes == 0 {
            return (0, None);
        }
        let age = segs.iter().find_map(|s| {
            let from = if file_name(s) == self.cp.segment { self.cp.offset } else { 0 };
            let (lines, _) = read_lines(s, from, None, 1, 64 * 1024).ok()?;
            let ts = serde_json::from_str::<TsOnly>(&lines.first()?.text).ok()?.ts;
            SystemTime::now().duration_since(ts.0).ok()
        });
        (bytes, age)
    }

    /// Keeps the folder under `cap`; returns (segments, lines) dropped before shipping.
    pub fn enforce_disk_cap(&mut self, cap: u64) -> io::Result<(u64, u64)> {
        if cap == 0 {
            return Ok((0, 0));
        }
        // Count what is about to go before it goes.
        let segs = list_segments(&self.dir)?;
        let total: u64 = segs.iter().map(|s| std::fs::metadata(s).map(|m| m.len()).unwrap_or(0)).sum();
        if total <= cap {
            return Ok((0, 0));
        }
        let mut lost_lines = 0u64;
        let mut lost_segments = 0u64;
        let mut freed = 0u64;
        for s in segs.iter().take(segs.len().saturating_sub(1)) {
            if total - freed <= cap {
                break;
            }
            let name = file_name(s);
            let len = std::fs::metadata(s).map(|m| m.len()).unwrap_or(0);
            if name >= self.cp.segment {
                let from = if name == self.cp.segment { self.cp.offset } else { 0 };
                let (lines, _) = read_lines(s, from, Some(len), usize::MAX, usize::MAX)?;
                lost_lines += lines.len() as u64;
                lost_segments += 1;
                tracing::error!(
                    segment = %s.display(),
                    lines = lines.len(),
                    "local log over log.max_disk_bytes while ClickHouse is behind: dropping the oldest unshipped segment"
                );
            }
            std::fs::remove_file(s)?;
            freed += len;
        }
        let remaining = self.remaining()?;
        if let Some(first) = remaining.first() {
            let name = file_name(first);
            if name != self.cp.segment {
                self.cp = Checkpoint { segment: name, offset: 0, pending: None };
                self.persist()?;
            }
        }
        Ok((lost_segments, lost_lines))
    }
}

#[derive(Deserialize)]
struct TsOnly {
    ts: crate::record::Timestamp,
}

/// Writes rejected lines and the reason under `<data_dir>/quarantine/<folder>/`.
fn quarantine(
    data_dir: &Path,
    kind: KindSpec,
    segment: &str,
    lines: &[Line],
    err: &InsertError,
) -> io::Result<PathBuf> {
    let dir = data_dir.join("quarantine").join(kind.folder);
    std::fs::create_dir_all(&dir)?;
    let stem = segment.trim_end_matches(".ndjson");
    let start = lines.first().map_or(0, |l| l.start);
    let path = dir.join(format!("{stem}-{start:012}.ndjson"));
    let mut body = String::new();
    for l in lines {
        body.push_str(&l.text);
        body.push('\n');
    }
    std::fs::write(&path, body)?;
    std::fs::write(path.with_extension("error.txt"), format!("table {}: {err}\n", kind.table))?;
    Ok(path)
}

/// Settings one shipper loop runs with.
#[derive(Clone, Debug)]
pub struct ShipperSettings {
    pub batch_max_rows: usize,
    pub batch_max_bytes: usize,
    pub batch_max_age: Duration,
    pub poll_interval: Duration,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub keep_local: bool,
    pub max_disk_bytes: u64,
}

fn backoff(settings: &ShipperSettings, attempt: u32) -> Duration {
    let base = settings.retry_initial_backoff.saturating_mul(1u32 << attempt.min(16));
    let capped = base.min(settings.retry_max_backoff);
    // Full jitter on the upper half keeps a fleet of sidecars from retrying in step.
    capped.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// Ships one folder until `stop` is set, then makes one last attempt to send what is on disk.
pub async fn run_kind<S: BatchSink>(
    sink: Arc<S>,
    data_dir: PathBuf,
    kind: KindSpec,
    settings: ShipperSettings,
    stats: Arc<ShipperStats>,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    let mut tailer = Tailer::open(&data_dir.join(kind.folder))?;
    let mut first_seen: Option<Instant> = None;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let (lost_segments, lost_lines) = tailer.enforce_disk_cap(settings.max_disk_bytes)?;
        stats.segments_dropped.fetch_add(lost_segments, Ordering::Relaxed);
        stats.rows_dropped.fetch_add(lost_lines, Ordering::Relaxed);
        let batch = tailer.next_batch(settings.batch_max_rows, settings.batch_max_bytes, settings.keep_local)?;
        let Some(batch) = batch else {
            first_seen = None;
            if stopping {
                return Ok(());
            }
            tokio::time::sleep(settings.poll_interval).await;
            continue;
        };
        let seen = *first_seen.get_or_insert_with(Instant::now);
        let ready = batch.replay
            || batch.sealed_end
            || stopping
            || batch.lines.len() >= settings.batch_max_rows
            || batch.bytes() as usize >= settings.batch_max_bytes
            || seen.elapsed() >= settings.batch_max_age;
        if !ready {
            tokio::time::sleep(settings.poll_interval).await;
            continue;
        }
        tailer.mark_pending(&batch)?;
        let token = format!("llmtap:{}:{}:{}-{}", kind.table, batch.segment, batch.start(), batch.end());
        let shipped =
            ship_range(&*sink, &data_dir, kind, &batch.segment, &batch.lines, &token, &settings, &stats, &stop).await?;
        if !shipped {
            // Stopping while ClickHouse is unreachable: the range stays pending on disk.
            return Ok(());
        }
        tailer.commit(&batch)?;
        stats.batches_shipped.fetch_add(1, Ordering::Relaxed);
        first_seen = None;
    }
}

/// Inserts `lines` with retries; bisects a rejected range down to the rejected lines.
/// Returns false only when asked to stop while ClickHouse is unreachable.
#[allow(clippy::too_many_arguments)]
fn ship_range<'a, S: BatchSink>(
    sink: &'a S,
    data_dir: &'a Path,
    kind: KindSpec,
    segment: &'a str,
    lines: &'a [Line],
    token: &'a str,
    settings: &'a ShipperSettings,
    stats: &'a ShipperStats,
    stop: &'a AtomicBool,
) -> std::pin::Pin<Box<dyn Future<Output = io::Result<bool>> + Send + 'a>> {
    Box::pin(async move {
        let mut attempt = 0u32;
        let mut stop_attempts = 0u32;
        loop {
            match sink.insert(kind, lines, token).await {
                Ok(()) => {
                    stats.unreachable.store(0, Ordering::Relaxed);
                    stats.rows_shipped.fetch_add(lines.len() as u64, Ordering::Relaxed);
                    stats
                        .bytes_shipped
                        .fetch_add(lines.iter().map(|l| l.end - l.start).sum::<u64>(), Ordering::Relaxed);
                    return Ok(true);
                }
                Err(InsertError::Retryable(reason)) => {
                    stats.unreachable.store(1, Ordering::Relaxed);
                    stats.insert_retries.fetch_add(1, Ordering::Relaxed);
                    if attempt == 0 || attempt.is_power_of_two() {
                        tracing::warn!(table = kind.table, attempt, %reason, "clickhouse insert failed; retrying (records stay in the local log)");
                    }
                    if stop.load(Ordering::SeqCst) {
                        stop_attempts += 1;
                        if stop_attempts >= 2 {
                            return Ok(false);
                        }
                    }
                    tokio::time::sleep(backoff(settings, attempt)).await;
                    attempt = attempt.saturating_add(1);
                }
                Err(e @ InsertError::Rejected { .. }) => {
                    if lines.len() == 1 {
                        let path = quarantine(data_dir, kind, segment, lines, &e)?;
                        stats.rows_quarantined.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(table = kind.table, error = %e, file = %path.display(), "clickhouse rejected a record; quarantined");
                        return Ok(true);
                    }
                    let mid = lines.len() / 2;
                    for half in [&lines[..mid], &lines[mid..]] {
                        let t =
                            format!("llmtap:{}:{}:{}-{}", kind.table, segment, half[0].start, half[half.len() - 1].end);
                        if !ship_range(sink, data_dir, kind, segment, half, &t, settings, stats, stop).await? {
                            return Ok(false);
                        }
                    }
                    // The halves counted their own rows.
                    return Ok(true);
                }
            }
        }
    })
}

/// Every `every`, measures how far each folder is behind and logs it while it is.
async fn report_lag(data_dir: PathBuf, stats: Arc<ShipperStats>, stop: Arc<AtomicBool>, every: Duration) {
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(every).await;
        let (mut bytes, mut lag) = (0u64, Duration::ZERO);
        for kind in KINDS {
            // The checkpoint is replaced atomically, so a fresh read sees a consistent one.
            let Ok(t) = Tailer::open(&data_dir.join(kind.folder)) else { continue };
            let (b, age) = t.backlog();
            bytes += b;
            lag = lag.max(age.unwrap_or_default());
        }
        stats.bytes_behind.store(bytes, Ordering::Relaxed);
        stats.lag_ms.store(lag.as_millis() as u64, Ordering::Relaxed);
        if bytes > 0 {
            let shipped = stats.rows_shipped.load(Ordering::Relaxed);
            let avg = stats.bytes_shipped.load(Ordering::Relaxed).checked_div(shipped).unwrap_or(1024).max(1);
            tracing::info!(
                rows_behind_estimate = bytes / avg,
                bytes_behind = bytes,
                lag_secs = lag.as_secs_f64(),
                unreachable = stats.unreachable.load(Ordering::Relaxed) == 1,
                rows_shipped = shipped,
                rows_quarantined = stats.rows_quarantined.load(Ordering::Relaxed),
                insert_retries = stats.insert_retries.load(Ordering::Relaxed),
                "clickhouse shipper behind"
            );
        }
    }
}

/// Owner of the shipper thread.
#[derive(Debug)]
pub struct ShipperHandle {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<ShipperStats>,
}

impl ShipperHandle {
    /// Asks the shipper to send what is on disk (briefly retrying) and waits for it.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("clickhouse shipper thread panicked");
            }
        }
    }
}

/// Starts the shipper on its own thread and runtime, so its file reads and retries never
/// touch the proxy's workers. `prepare` runs first (migrations), retried until it succeeds.
pub fn spawn_shipper<S, P, F>(
    sink: Arc<S>,
    data_dir: PathBuf,
    settings: ShipperSettings,
    prepare: P,
) -> io::Result<ShipperHandle>
where
    S: BatchSink,
    P: Fn(Arc<S>) -> F + Send + 'static,
    F: Future<Output = Result<(), PrepareError>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ShipperStats::default());
    let thread = {
        let (stop, stats) = (stop.clone(), stats.clone());
        std::thread::Builder::new().name("llmtap-shipper".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "clickhouse shipper: no runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let mut attempt = 0;
                loop {
                    match prepare(sink.clone()).await {
                        Ok(()) => break,
                        Err(PrepareError::Fatal(msg)) => {
                            tracing::error!(error = %msg, "clickhouse shipper stopped; records stay in the local log");
                            return;
                        }
                        Err(PrepareError::Retryable(msg)) => {
                            if stop.load(Ordering::SeqCst) {
                                return;
                            }
                            if attempt == 0 || u32::is_power_of_two(attempt) {
                                tracing::warn!(error = %msg, attempt, "clickhouse not ready; retrying (records stay in the local log)");
                            }
                            tokio::time::sleep(backoff(&settings, attempt)).await;
                            attempt += 1;
                        }
                    }
                }
                let reporter = tokio::spawn(report_lag(data_dir.clone(), stats.clone(), stop.clone(), Duration::from_secs(10)));
                let mut tasks = Vec::new();
                for kind in KINDS {
                    let fut = run_kind(sink.clone(), data_dir.clone(), kind, settings.clone(), stats.clone(), stop.clone());
                    tasks.push(tokio::spawn(async move {
                        if let Err(e) = fut.await {
                            tracing::error!(table = kind.table, error = %e, "clickhouse shipper failed reading the local log");
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
                reporter.abort();
            });
        })?
    };
    Ok(ShipperHandle { stop, thread: Some(thread), stats })
}

/// Why the shipper could not start shipping.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// ClickHouse unreachable or failing: try again later.
    #[error("{0}")]
    Retryable(String),
    /// A state retrying cannot fix (a newer schema than this binary knows).
    #[error("{0}")]
    Fatal(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that remembers what it accepted, rejects lines containing "POISON" and can
    /// be made unreachable.
    #[derive(Default)]
    struct FakeSink {
        rows: Mutex<Vec<String>>,
        tokens: Mutex<Vec<String>>,
        down: AtomicBool,
    }

    impl BatchSink for FakeSink {
        fn insert(
            &self,
            _kind: KindSpec,
            lines: &[Line],
            token: &str,
        ) -> impl Future<Output = Result<(), InsertError>> + Send {
            let res = if self.down.load(Ordering::SeqCst) {
                Err(InsertError::Retryable("connection refused".into()))
            } else if lines.iter().any(|l| l.text.contains("POISON")) {
                Err(InsertError::Rejected { code: 469, message: "constraint".into() })
            } else if self.tokens.lock().unwrap().iter().any(|t| t == token) {
                Ok(()) // deduplicated, as ClickHouse does
            } else {
                self.tokens.lock().unwrap().push(token.to_owned());
                self.rows.lock().unwrap().extend(lines.iter().map(|l| l.text.clone()));
                Ok(())
            };
            async move { res }
        }
    }

    /// A reader that hands out at most 1,000 bytes per call and is interrupted once.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupted: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = out.len().min(1000).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn chunked_reads_return_every_byte_in_order() {
        let data: Vec<u8> = (0..3 * READ_CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let got = read_chunked(&mut data.as_slice(), data.len(), &mut Yielder::new()).unwrap();
        assert_eq!(got, data);
        let got = read_chunked(&mut Trickle { data: &data, interrupted: false }, 10, &mut Yielder::new()).unwrap();
        assert_eq!(got, data);
        assert!(read_chunked(&mut [].as_slice(), 0, &mut Yielder::new()).unwrap().is_empty());
    }

    fn settings() -> ShipperSettings {
        ShipperSettings {
            batch_max_rows: 3,
            batch_max_bytes: 1 << 20,
            batch_max_age: Duration::from_millis(1),
            poll_interval: Duration::from_millis(5),
            retry_initial_backoff: Duration::from_millis(1),
            retry_max_backoff: Duration::from_millis(5),
            keep_local: false,
            max_disk_bytes: 0,
        }
    }

    fn write_seg(dir: &Path, name: &str, lines: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = String::new();
        for l in lines {
            s.push_str(l);
            s.push('\n');
        }
        std::fs::write(dir.join(name), s).unwrap();
    }

    async fn run_until_idle(sink: Arc<FakeSink>, data: &Path, stats: Arc<ShipperStats>) {
        let stop = Arc::new(AtomicBool::new(true));
        run_kind(sink, data.to_path_buf(), KINDS[0], settings(), stats, stop).await.unwrap();
    }

    #[tokio::test]
    async fn ships_every_line_once_and_deletes_sealed_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("traces");
        write_seg(&dir, "0001.ndjson", &["a1", "a2", "a3", "a4"]);
        write_seg(&dir, "0002.ndjson", &["b1"]);
        let sink = Arc::new(FakeSink::default());
        let stats = Arc::new(ShipperStats::default());
        run_until_idle(sink.clone(), tmp.path(), stats.clone()).await;
        assert_eq!(*sink.rows.lock().unwrap(), vec!["a1", "a2", "a3", "a4", "b1"]);
        assert_eq!(list_segments(&dir).unwrap().len(), 1, "the sealed segment is deleted, the newest kept");
        // A torn (unterminated) tail is not shipped until its newline arrives.
        std::fs::OpenOptions::new().append(true).open(dir.join("0002.ndjson")).unwrap().write_all(b"b2\nb3").unwrap();
        run_until_idle(sink.clone(), tmp.path(), stats.clone()).await;
        assert_eq!(sink.rows.lock().unwrap().len(), 6);
        assert_eq!(stats.rows_shipped.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn poison_lines_are_quarantined_and_the_rest_arrive() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("traces");
        write_seg(&dir, "0001.ndjson", &["ok1", "POISON", "ok2", "ok3", "ok4"]);
        let sink = Arc::new(FakeSink::default());
        let stats = Arc::new(ShipperStats::default());
        run_until_idle(sink.clone(), tmp.path(), stats.clone()).await;
        assert_eq!(*sink.rows.lock().unwrap(), vec!["ok1", "ok2", "ok3", "ok4"]);
        assert_eq!(stats.rows_quarantined.load(Ordering::Relaxed), 1);
        let q = tmp.path().join("quarantine/traces");
        let files: Vec<String> =
            std::fs::read_dir(&q).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(files.len(), 2, "{files:?}");
        let lines = std::fs::read_to_string(q.join("0001-000000000004.ndjson")).unwrap();
        assert_eq!(lines, "POISON\n");
        assert!(std::fs::read_to_string(q.join("0001-000000000004.error.txt")).unwrap().contains("code 469"));
    }

    #[tokio::test]
    async fn a_crash_between_insert_and_commit_replays_the_same_range_and_token() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("traces");
        write_seg(&dir, "0001.ndjson", &["a1", "a2"]);
        let sink = Arc::new(FakeSink::default());
        // Simulate: pending written, insert landed, crash before commit; more lines arrived.
        let mut t = Tailer::open(&dir).unwrap();
        let b = t.next_batch(10, 1 << 20, false).unwrap().unwrap();
        t.mark_pending(&b).unwrap();
        let token = format!("llmtap:llm_traces:0001.ndjson:{}-{}", b.start(), b.end());
        sink.insert(KINDS[0], &b.lines, &token).await.unwrap();
        drop(t);
        std::fs::OpenOptions::new().append(true).open(dir.join("0001.ndjson")).unwrap().write_all(b"a3\n").unwrap();
        run_until_idle(sink.clone(), tmp.path(), Arc::new(ShipperStats::default())).await;
        assert_eq!(*sink.rows.lock().unwrap(), vec!["a1", "a2", "a3"], "no duplicate of a1, a2");
    }

    #[tokio::test]
    async fn stopping_while_down_keeps_the_range_pending() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("traces");
        write_seg(&dir, "0001.ndjson", &["a1"]);
        let sink = Arc::new(FakeSink::default());
        sink.down.store(true, Ordering::SeqCst);
        let stats = Arc::new(ShipperStats::default());
        run_until_idle(sink.clone(), tmp.path(), stats.clone()).await;
        assert!(sink.rows.lock().unwrap().is_empty());
        assert!(stats.insert_retries.load(Ordering::Relaxed) >= 1);
        sink.down.store(false, Ordering::SeqCst);
        run_until_idle(sink.clone(), tmp.path(), stats).await;
        assert_eq!(*sink.rows.lock().unwrap(), vec!["a1"]);
    }

    #[test]
    fn backlog_counts_unshipped_bytes_and_the_oldest_age() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("traces");
        let old = crate::record::ts_format::format(SystemTime::now() - Duration::from_secs(120));
        let line = format!("{{\"ts\":\"{old}\"}}");
        write_seg(&dir, "0001.ndjson", &[&line, &line]);
        let mut t = Tailer::open(&dir).unwrap();
        let (bytes, age) = t.backlog();
        assert_eq!(bytes, 2 * (line.len() as u64 + 1));
        let age = age.unwrap().as_secs();
        assert!((119..=125).contains(&age), "{age}");
        let b = t.next_batch(1, 1 << 20, false).unwrap().unwrap();
        t.commit(&b).unwrap();
        assert_eq!(Tailer::open(&dir).unwrap().backlog().0, line.len() as u64 + 1, "a fresh read sees the checkpoint");
    }

    #[tokio::test]
    async fn disk_cap_drops_oldest_unshipped_and_counts_them() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("traces");
        write_seg(&dir, "0001.ndjson", &["x1", "x2"]);
        write_seg(&dir, "0002.ndjson", &["y1"]);
        write_seg(&dir, "0003.ndjson", &["z1"]);
        let sink = Arc::new(FakeSink::default());
        let stats = Arc::new(ShipperStats::default());
        let mut s = settings();
        s.max_disk_bytes = 7; // room for 0002 (3 bytes) and 0003 (3 bytes) only
        run_kind(sink.clone(), tmp.path().to_path_buf(), KINDS[0], s, stats.clone(), Arc::new(AtomicBool::new(true)))
            .await
            .unwrap();
        assert_eq!(*sink.rows.lock().unwrap(), vec!["y1", "z1"]);
        assert_eq!(
            (stats.segments_dropped.load(Ordering::Relaxed), stats.rows_dropped.load(Ordering::Relaxed)),
            (1, 2)
        );
    }
}
