//! The drift thread: a bounded queue from the recorder, the scorer and the feedback API
//! (full: dropped and counted; the request path never waits), the engine, the
//! `<data-dir>/drift/` log, the observers (the Prometheus gauge) and webhook delivery.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use llmtap_ingest::log::{LogConfig, SegmentWriter};
use llmtap_ingest::record::{DriftEventRecord, ScoreRecord, TraceRecord};
use llmtap_ingest::recorder::{ObservedMeta, RecordObserver};
use tokio::sync::mpsc;

use super::detect::WindowStats;
use super::engine::{Active, DriftConfig, DriftEngine, Input, Key, SIGNALS};
use super::fleet::{FleetEngine, FleetRow};
use crate::llm::HttpClient;
use crate::runner::VerdictObserver;

/// Counters of the drift thread.
#[derive(Debug, Default)]
pub struct DriftStats {
    pub events: AtomicU64,
    /// Inputs lost to a full queue.
    pub dropped: AtomicU64,
    /// Calls left out by `drift.max_calls_per_sec` (sampling, not loss).
    pub sampled_out: AtomicU64,
    pub webhook_failures: AtomicU64,
    pub webhook_deliveries: AtomicU64,
}

/// Told about every event and the set of firing detectors after it.
pub trait DriftObserver: Send {
    fn changed(&mut self, event: &DriftEventRecord, active: &[Active]);
    /// What is firing, without an event: episodes a restarted ClickHouse source found still
    /// open in `llm_drift_events`.
    fn restored(&mut self, _active: &[Active]) {}
}

/// Feeds the drift thread without waiting.
#[derive(Clone)]
pub struct DriftSender {
    tx: mpsc::Sender<Input>,
    stats: Arc<DriftStats>,
}

impl DriftSender {
    pub fn send(&self, input: Input) {
        if self.tx.try_send(input).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl DriftSender {
    /// The recorder's observer: every call, or at most `max_per_sec` calls a second per app
    /// (0: every call).
    pub fn calls(&self, max_per_sec: u32) -> DriftCalls {
        DriftCalls { sender: self.clone(), limit: (max_per_sec > 0).then(|| PerApp::new(max_per_sec)) }
    }
}

/// Hands calls to the drift thread, thinned per app above `drift.max_calls_per_sec`.
///
/// The detectors count observations, not seconds, and each call costs them a few
/// microseconds and a sweep over 5,000-value windows every 25 calls. Above a few hundred
/// calls a second more calls buy no earlier alarm that matters (80 calls is 0.4 s at 200/s)
/// but do buy cache misses for the proxy's workers on the same cores. A per-app token
/// bucket on the calls' own timestamps keeps the rate, and a busy app cannot crowd a quiet
/// one out. Its admission threshold is drawn at random, so the sample is independent of
/// what the calls contain: a plain bucket takes every k-th call, which a periodic pattern
/// in the traffic (every 10th call fails) would alias into a wrong rate.
pub struct DriftCalls {
    sender: DriftSender,
    limit: Option<PerApp>,
}

impl RecordObserver for DriftCalls {
    fn observe(&mut self, record: &TraceRecord, _meta: &ObservedMeta) {
        if record.tags.contains_key(crate::llm::JUDGE_TAG) {
            return; // a judge's own call is never watched
        }
        if let Some(limit) = &mut self.limit {
            let at_ms = record.ts.0.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            if !limit.admit(&record.app, at_ms) {
                self.sender.stats.sampled_out.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.sender.send(Input::Call(Box::new(record.into())));
    }
}

/// Token buckets by app: `rate` tokens a second, one second's worth of burst.
struct PerApp {
    rate: f64,
    apps: std::collections::HashMap<String, Bucket>,
    /// Shared by apps beyond `MAX_APPS`, so an unbounded app label cannot grow memory.
    overflow: Bucket,
    /// xorshift64 state for the admission thresholds.
    rng: u64,
}

struct Bucket {
    tokens: f64,
    at_ms: f64,
}

impl PerApp {
    const MAX_APPS: usize = 10_000;

    fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        PerApp {
            rate,
            apps: Default::default(),
            overflow: Bucket { tokens: rate, at_ms: 0.0 },
            rng: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Whether a call of `app` at `at_ms` (call timestamps; an earlier one counts as the
    /// latest seen) is observed.
    fn admit(&mut self, app: &str, at_ms: f64) -> bool {
        let rate = self.rate;
        let b = if let Some(b) = self.apps.get_mut(app) {
            b
        } else if self.apps.len() < Self::MAX_APPS {
            self.apps.entry(app.to_owned()).or_insert(Bucket { tokens: rate, at_ms })
        } else {
            &mut self.overflow
        };
        let elapsed = (at_ms - b.at_ms).max(0.0);
        b.at_ms = b.at_ms.max(at_ms);
        b.tokens = (b.tokens + elapsed * rate / 1000.0).min(rate);
        // Admit when the tokens reach a uniform draw in [0, 1) and spend one: tokens stay
        // above -1, so over any stretch the count admitted is the refill, within one call.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let threshold = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        if b.tokens > threshold {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(app: &str, at_ms: u64, failed: bool) -> TraceRecord {
        TraceRecord {
            app: app.into(),
            ts: llmtap_ingest::record::Timestamp(UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + at_ms)),
            error_kind: if failed {
                llmtap_ingest::record::ErrorKind::HttpError
            } else {
                llmtap_ingest::record::ErrorKind::None
            },
            ..Default::default()
        }
    }

    fn wire(max_per_sec: u32) -> (DriftCalls, mpsc::Receiver<Input>, Arc<DriftStats>) {
        let (tx, rx) = mpsc::channel(1 << 20);
        let stats = Arc::new(DriftStats::default());
        (DriftSender { tx, stats: stats.clone() }.calls(max_per_sec), rx, stats)
    }

    fn received(rx: &mut mpsc::Receiver<Input>) -> Vec<super::super::engine::CallObs> {
        let mut out = Vec::new();
        while let Ok(Input::Call(c)) = rx.try_recv() {
            out.push(*c);
        }
        out
    }

    #[test]
    fn a_busy_app_is_thinned_to_the_rate_and_a_quiet_one_is_not() {
        let (mut calls, mut rx, stats) = wire(250);
        let meta = ObservedMeta::default();
        // 8 s: "busy" at 1,000 calls/s, "quiet" at 50/s.
        for ms in 0..8_000u64 {
            calls.observe(&call("busy", ms, false), &meta);
            if ms % 20 == 0 {
                calls.observe(&call("quiet", ms, false), &meta);
            }
        }
        let got = received(&mut rx);
        let busy = got.iter().filter(|c| c.app == "busy").count();
        let quiet = got.iter().filter(|c| c.app == "quiet").count();
        // A full bucket (250) plus 0.25 a millisecond for 7,999 ms, within one call.
        assert!((2_248..=2_251).contains(&busy), "busy: {busy}");
        assert_eq!(quiet, 400);
        assert_eq!(stats.sampled_out.load(Ordering::Relaxed), 8_000 - busy as u64);
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_sample_keeps_a_periodic_failure_rate() {
        let (mut calls, mut rx, _) = wire(250);
        let meta = ObservedMeta::default();
        // Every 10th call fails; a stride of 4 would see 20% or none of them.
        for ms in 0..40_000u64 {
            calls.observe(&call("busy", ms, ms % 10 == 0), &meta);
        }
        let got = received(&mut rx);
        let failed = got.iter().filter(|c| c.failed).count() as f64 / got.len() as f64;
        assert!((0.09..=0.11).contains(&failed), "failure rate in the sample: {failed} of {}", got.len());
    }

    #[test]
    fn zero_observes_every_call_and_judge_calls_never() {
        let (mut calls, mut rx, stats) = wire(0);
        let meta = ObservedMeta::default();
        for ms in 0..5_000u64 {
            calls.observe(&call("busy", ms / 10, false), &meta);
        }
        let mut judge = call("busy", 600, false);
        judge.tags.insert(crate::llm::JUDGE_TAG.into(), "cites_plan".into());
        calls.observe(&judge, &meta);
        assert_eq!(received(&mut rx).len(), 5_000);
        assert_eq!(stats.sampled_out.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn late_and_out_of_order_timestamps_add_no_tokens() {
        let (mut calls, mut rx, _) = wire(100);
        let meta = ObservedMeta::default();
        // 100 at t = 10 s spend the bucket; 50 that started earlier get nothing back.
        for _ in 0..100 {
            calls.observe(&call("a", 10_000, false), &meta);
        }
        for ms in 0..50 {
            calls.observe(&call("a", 9_000 + ms, false), &meta);
        }
        assert!((99..=101).contains(&received(&mut rx).len()));
    }
}

impl VerdictObserver for DriftSender {
    fn verdict(&mut self, v: &ScoreRecord) {
        self.send(Input::Verdict(Box::new(v.clone())));
    }
}

pub struct DriftHandle {
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<DriftStats>,
}

impl DriftHandle {
    /// Waits for queued inputs and webhook deliveries. Call once every sender is gone.
    pub fn shutdown(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("drift thread panicked");
            }
        }
    }
}

/// Where events go: the `<data-dir>/drift/` log, the log line, the observers and the
/// webhooks. Shared by both sources.
struct Emitter {
    writer: SegmentWriter,
    observers: Vec<Box<dyn DriftObserver>>,
    hooks: Arc<Vec<super::alert::WebhookConfig>>,
    client: Option<HttpClient>,
    stats: Arc<DriftStats>,
    deliveries: tokio::task::JoinSet<()>,
    line: Vec<u8>,
    /// The firing event of every open episode, re-sent to Alertmanager.
    firing: BTreeMap<(String, String, String, String, String), DriftEventRecord>,
}

impl Emitter {
    fn new(
        data_dir: &Path,
        log: LogConfig,
        cfg: &DriftConfig,
        client: Option<HttpClient>,
        observers: Vec<Box<dyn DriftObserver>>,
        stats: Arc<DriftStats>,
    ) -> std::io::Result<Self> {
        Ok(Emitter {
            writer: SegmentWriter::open(data_dir, "drift", log)?,
            observers,
            hooks: Arc::new(cfg.webhooks.clone()),
            client,
            stats,
            deliveries: tokio::task::JoinSet::new(),
            line: Vec::with_capacity(512),
            firing: BTreeMap::new(),
        })
    }

    /// Writes, logs and announces `events`; webhook deliveries run in the background.
    fn emit(&mut self, events: &[DriftEventRecord], active: &[Active]) {
        if events.is_empty() {
            return;
        }
        for e in events {
            self.line.clear();
            if serde_json::to_writer(&mut self.line, e).is_ok() && self.writer.append(&self.line).is_ok() {
                self.stats.events.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(
                signal = %e.signal, app = %e.app, route = %e.route, model = %e.model, judge = %e.judge,
                state = %e.state, severity = %e.severity, control_surface = %e.control_surface,
                method = %e.method, baseline = e.baseline_value, current = e.current_value,
                "drift"
            );
        }
        if let Err(e) = self.writer.flush() {
            tracing::error!(error = %e, "drift log flush failed");
        }
        for e in events {
            for o in self.observers.iter_mut() {
                o.changed(e, active);
            }
        }
        for e in events {
            let key = (e.signal.clone(), e.app.clone(), e.route.clone(), e.model.clone(), e.judge.clone());
            if e.state == "firing" {
                self.firing.insert(key, e.clone());
            } else {
                self.firing.remove(&key);
            }
        }
        self.deliver(events, |_| true);
    }

    /// Sends `events` to the webhooks `which` selects, in the background.
    fn deliver(&mut self, events: &[DriftEventRecord], which: impl Fn(&super::alert::WebhookConfig) -> bool) {
        if let Some(client) = &self.client {
            for hook in self.hooks.iter().filter(|h| which(h)) {
                let (client, hook, events, stats) = (client.clone(), hook.clone(), events.to_vec(), self.stats.clone());
                self.deliveries.spawn(async move {
                    match super::alert::deliver(&client, &hook, &events, Duration::from_millis(200)).await {
                        Ok(_) => stats.webhook_deliveries.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            tracing::warn!(url = %hook.url, error = %e, "drift webhook failed");
                            stats.webhook_failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                });
            }
        }
        while self.deliveries.try_join_next().is_some() {}
    }

    /// Re-sends what is still firing to the Alertmanager webhooks that are due at `now`
    /// (`last` holds each webhook's last re-send).
    fn resend(&mut self, now: Instant, last: &mut Vec<Instant>) {
        last.resize(self.hooks.len(), now);
        let mut due = Vec::new();
        for (i, h) in self.hooks.iter().enumerate() {
            // Half a tick of slack, so a 1 s period is not missed by a tick that came early.
            let period = Duration::from_secs(h.resend_secs).saturating_sub(Duration::from_millis(500));
            if h.format == "alertmanager" && now.duration_since(last[i]) >= period {
                last[i] = now;
                due.push(h.url.clone());
            }
        }
        if due.is_empty() || self.firing.is_empty() {
            return;
        }
        let events: Vec<DriftEventRecord> = self.firing.values().cloned().collect();
        self.deliver(&events, |h| h.format == "alertmanager" && due.contains(&h.url));
    }

    fn restored(&mut self, active: &[Active]) {
        for o in self.observers.iter_mut() {
            o.restored(active);
        }
    }

    /// Waits for webhook deliveries and closes the log.
    async fn close(mut self) {
        while self.deliveries.join_next().await.is_some() {}
        if let Err(e) = self.writer.close() {
            tracing::error!(error = %e, "drift log close failed");
        }
    }
}

/// Starts the drift thread writing events to `<data_dir>/drift/`.
pub fn spawn_drift(
    data_dir: &Path,
    log: LogConfig,
    cfg: DriftConfig,
    client: Option<HttpClient>,
    observers: Vec<Box<dyn DriftObserver>>,
) -> std::io::Result<(DriftSender, DriftHandle)> {
    let stats = Arc::new(DriftStats::default());
    let mut emitter = Emitter::new(data_dir, log, &cfg, client, observers, stats.clone())?;
    let (tx, mut rx) = mpsc::channel::<Input>(cfg.queue_capacity.max(1));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut engine = DriftEngine::new(cfg);
    let thread = std::thread::Builder::new().name("llmtap-drift".into()).spawn(move || {
        runtime.block_on(async move {
            // Re-sends to Alertmanager are checked every second; without such a webhook
            // the thread sleeps until an input comes.
            let period = if emitter.hooks.iter().any(|h| h.format == "alertmanager") { 1 } else { 3600 };
            let mut tick = tokio::time::interval(Duration::from_secs(period));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut resent = Vec::new();
            loop {
                let input = tokio::select! {
                    i = rx.recv() => i,
                    _ = tick.tick() => {
                        emitter.resend(Instant::now(), &mut resent);
                        continue;
                    }
                };
                let Some(input) = input else { break };
                let mut events = engine.observe(&input);
                for _ in 1..1024 {
                    match rx.try_recv() {
                        Ok(i) => events.extend(engine.observe(&i)),
                        Err(_) => break,
                    }
                }
                if !events.is_empty() {
                    emitter.emit(&events, &engine.active());
                }
                // Let inputs gather rather than be woken for each one (as the recorder
                // does); drift needs no millisecond latency.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            emitter.close().await;
        })
    })?;
    Ok((DriftSender { tx, stats: stats.clone() }, DriftHandle { thread: Some(thread), stats }))
}

/// Runs SQL for the ClickHouse source: JSONEachRow lines, 64-bit integers unquoted.
pub trait FleetFetch: Send + Sync + 'static {
    fn fetch(&self, sql: String) -> Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send + '_>>;
}

/// What a run of the ClickHouse source did.
#[derive(Debug, Default, serde::Serialize)]
pub struct FleetSummary {
    pub polls: u64,
    /// Polls that could not start (ClickHouse unreachable).
    pub failed_polls: u64,
    /// Signal queries that failed within a poll.
    pub failed_queries: u64,
    pub events: u64,
    /// Firing episodes found in `llm_drift_events` at start.
    pub restored: u64,
    /// `(key, signal, statistics)` of the last poll.
    #[serde(skip)]
    pub stats: Vec<(Key, &'static str, WindowStats)>,
}

/// The ClickHouse source: polls `db` every `drift.clickhouse.poll_interval_secs` until
/// `shutdown` (or `polls` times), writing events as the in-memory source does.
#[allow(clippy::too_many_arguments)]
pub async fn run_fleet(
    data_dir: &Path,
    log: LogConfig,
    cfg: DriftConfig,
    db: &str,
    fetch: &dyn FleetFetch,
    client: Option<HttpClient>,
    observers: Vec<Box<dyn DriftObserver>>,
    polls: Option<u64>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<FleetSummary> {
    let stats = Arc::new(DriftStats::default());
    let mut emitter = Emitter::new(data_dir, log, &cfg, client, observers, stats.clone())?;
    let interval = Duration::from_secs(cfg.clickhouse.poll_interval_secs.max(1));
    let lookback_ms = (cfg.clickhouse.lookback_secs as i64).saturating_mul(1000);
    let mut fleet = FleetEngine::new(DriftEngine::new(cfg.clone()), cfg.clickhouse.clone());
    let mut summary = FleetSummary::default();
    let mut restored = false;
    let mut resent = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let poll = async {
            if !restored {
                summary.restored = restore(&mut fleet, fetch, db, now_ms - lookback_ms).await?;
                restored = true;
                if summary.restored > 0 {
                    emitter.restored(&fleet.engine.active());
                }
            }
            let mut failed = 0;
            for (idx, sql) in fleet.queries(db, now_ms) {
                let name = SIGNALS[idx].name;
                let rows = fetch.fetch(sql).await.and_then(|lines| {
                    lines
                        .iter()
                        .map(|l| {
                            serde_json::from_str::<FleetRow>(l).map_err(|e| format!("row does not read: {e}: {l}"))
                        })
                        .collect::<Result<Vec<_>, _>>()
                });
                match rows {
                    Ok(rows) => {
                        let events = fleet.apply(idx, &rows);
                        summary.events += events.len() as u64;
                        emitter.emit(&events, &fleet.engine.active());
                    }
                    Err(e) => {
                        // One signal's failure (e.g. a timeout) does not stop the others.
                        failed += 1;
                        tracing::warn!(signal = name, error = %e, "drift query failed; retrying at the next poll");
                    }
                }
            }
            Ok::<u64, String>(failed)
        };
        match poll.await {
            Ok(0) => summary.polls += 1,
            Ok(failed) => {
                summary.polls += 1;
                summary.failed_queries += failed;
            }
            Err(e) => {
                summary.failed_polls += 1;
                tracing::warn!(error = %e, "drift poll of clickhouse failed; retrying at the next poll");
            }
        }
        emitter.resend(Instant::now(), &mut resent);
        if polls.is_some_and(|n| summary.polls + summary.failed_polls >= n) {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut shutdown => break,
        }
    }
    summary.stats = std::mem::take(&mut fleet.last_stats).into_iter().map(|((k, s), st)| (k, s, st)).collect();
    emitter.close().await;
    Ok(summary)
}

/// Marks what `llm_drift_events` says is still firing; returns how many.
async fn restore(fleet: &mut FleetEngine, fetch: &dyn FleetFetch, db: &str, from_ms: i64) -> Result<u64, String> {
    #[derive(serde::Deserialize)]
    struct Open {
        signal: String,
        app: String,
        route: String,
        model: String,
        judge: String,
        surface: String,
        severity: String,
        at: i64,
    }
    let sql = format!(
        "SELECT signal, app, route, model, judge, argMax(state, ts) AS last, argMax(control_surface, ts) AS surface, \
         argMax(severity, ts) AS severity, toUnixTimestamp64Milli(max(ts)) AS at FROM {db}.llm_drift_events \
         WHERE ts >= fromUnixTimestamp64Milli({from_ms}) GROUP BY signal, app, route, model, judge HAVING last = 'firing'"
    );
    let mut n = 0;
    for l in fetch.fetch(sql).await? {
        let o: Open = serde_json::from_str(&l).map_err(|e| format!("llm_drift_events row does not read: {e}: {l}"))?;
        let key = Key { app: o.app, route: o.route, model: o.model, judge: o.judge };
        fleet.restore_firing(key, &o.signal, &o.surface, &o.severity, o.at);
        n += 1;
    }
    Ok(n)
}
