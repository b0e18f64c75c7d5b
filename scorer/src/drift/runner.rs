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
/// but do buy cache misses for the proxy's workers on the same cores.
///
/// Each app has its own odds, so a busy app cannot crowd a quiet one out. Every call of a
/// second is kept with the same odds, drawn independently, so the sample does not depend on
/// what a call contains, how long it took or where it falls in a pattern. (A token bucket
/// does: it keeps calls by their position in the arrival sequence, which aliases with
/// periodic traffic, and with calls timed on their start it leans to fast calls.)
pub struct DriftCalls {
    sender: DriftSender,
    limit: Option<PerApp>,
}

impl RecordObserver for DriftCalls {
    fn observe(&mut self, record: &TraceRecord, _meta: &ObservedMeta) {
        if super::engine::is_judge_call(record) {
            return; // never watched: not converted, queued or counted against the app
        }
        if let Some(limit) = &mut self.limit {
            // Calls reach the recorder as they end, so seconds are counted on end times.
            let started = record.ts.0.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
            if !limit.admit(&record.app, started + record.duration_ms.max(0.0)) {
                self.sender.stats.sampled_out.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        self.sender.send(Input::Call(Box::new(record.into())));
    }
}

/// Per-app odds of observing a call: `rate` over the app's calls in the busier of the last
/// second and this one so far (1 while that is at most `rate`).
///
/// In a steady second that keeps `rate` calls on average. When traffic jumps, the odds fall
/// as the new second's count grows, so a jump from nothing to `N` calls keeps about
/// `rate × (1 + ln(N / rate))` in its first second, then `rate`.
struct PerApp {
    rate: f64,
    apps: std::collections::HashMap<String, Second>,
    /// Shared by apps beyond `MAX_APPS`, so an unbounded app label cannot grow memory.
    overflow: Second,
    /// Seeded, so a run's sample can be replayed.
    rng: fastrand::Rng,
}

#[derive(Default)]
struct Second {
    start_ms: f64,
    seen: u32,
    last: u32,
}

impl PerApp {
    const MAX_APPS: usize = 10_000;

    fn new(rate: u32) -> Self {
        PerApp {
            rate: f64::from(rate),
            apps: Default::default(),
            overflow: Second::default(),
            rng: fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15),
        }
    }

    /// Whether a call of `app` that ended at `at_ms` is observed. A time more than a second
    /// before the current second's start (the clock was set back) starts a new second.
    fn admit(&mut self, app: &str, at_ms: f64) -> bool {
        let s = if let Some(s) = self.apps.get_mut(app) {
            s
        } else if self.apps.len() < Self::MAX_APPS {
            self.apps.entry(app.to_owned()).or_insert(Second { start_ms: at_ms, seen: 0, last: 0 })
        } else {
            &mut self.overflow
        };
        if at_ms >= s.start_ms + 1000.0 || at_ms < s.start_ms - 1000.0 {
            // The second that just ended sets the odds, unless a quiet one came between.
            let next = at_ms >= s.start_ms + 1000.0 && at_ms < s.start_ms + 2000.0;
            s.last = if next { s.seen } else { 0 };
            s.start_ms = at_ms;
            s.seen = 0;
        }
        s.seen = s.seen.saturating_add(1);
        let busiest = f64::from(s.last.max(s.seen));
        if busiest <= self.rate {
            return true;
        }
        self.rng.f64() < self.rate / busiest
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

/// How long the drift thread lets inputs gather after each batch. Each wake-up of an idle
/// thread costs tens of microseconds on a VM, whatever it then does: at 10 ms the thread
/// cost 6-7 µs per proxied call at 1,000 calls/s, nearly all of it wake-ups. The detectors
/// count observations, not seconds, so a tenth of a second changes no verdict; it only
/// delays an event by at most that much.
const GATHER: Duration = Duration::from_millis(100);

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
        // Its batches must never hold a proxy worker (see `background_priority`).
        llmtap_ingest::background::background_priority();
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
                // Everything that gathered (the queue bounds it), so the pause below never
                // leaves a backlog behind.
                while let Ok(i) = rx.try_recv() {
                    events.extend(engine.observe(&i));
                }
                if !events.is_empty() {
                    emitter.emit(&events, &engine.active());
                }
                tokio::time::sleep(GATHER).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A call of `app` that ended at `at_ms` (and took no time).
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
        let mut busy = Vec::new();
        let mut quiet = 0;
        // 8 s: "busy" at 1,000 calls/s, "quiet" at 50/s.
        for second in 0..8u64 {
            for ms in second * 1000..(second + 1) * 1000 {
                calls.observe(&call("busy", ms, false), &meta);
                if ms % 20 == 0 {
                    calls.observe(&call("quiet", ms, false), &meta);
                }
            }
            let got = received(&mut rx);
            busy.push(got.iter().filter(|c| c.app == "busy").count());
            quiet += got.iter().filter(|c| c.app == "quiet").count();
        }
        // The first second: 250, then odds of 250/n for the n-th call, about 250 × ln 4 more.
        assert!((540..=650).contains(&busy[0]), "first second: {busy:?}");
        // Then 250 a second: 1,750 in 7 s, binomial sd 36.
        let steady: usize = busy[1..].iter().sum();
        assert!((1_600..=1_900).contains(&steady), "{busy:?}");
        assert_eq!(quiet, 400);
        let kept: usize = busy.iter().sum();
        assert_eq!(stats.sampled_out.load(Ordering::Relaxed), 8_000 - kept as u64);
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
    fn slow_calls_are_sampled_as_often_as_fast_ones() {
        let (mut calls, mut rx, _) = wire(250);
        let meta = ObservedMeta::default();
        // 60 s at 1,000 calls/s, every other one taking 2 s instead of 50 ms, shown to the
        // sampler in the order they end (as the recorder sees them). Only the first and last
        // 2 s are lopsided (fast calls end first, slow ones last): about 1% of the sample.
        let mut finished: Vec<TraceRecord> = (0..60_000u64)
            .map(|ms| {
                let mut c = call("busy", ms, false);
                c.duration_ms = if ms % 2 == 0 { 2_000.0 } else { 50.0 };
                c
            })
            .collect();
        finished.sort_by(|a, b| {
            let end = |c: &TraceRecord| c.ts.0 + Duration::from_secs_f64(c.duration_ms / 1000.0);
            end(a).cmp(&end(b))
        });
        for c in &finished {
            calls.observe(c, &meta);
        }
        let got = received(&mut rx);
        let slow = got.iter().filter(|c| c.duration_ms > 1_000.0).count() as f64 / got.len() as f64;
        assert!((0.48..=0.52).contains(&slow), "slow calls are {slow} of a sample of {}", got.len());
    }

    #[test]
    fn a_clock_set_back_does_not_starve_the_app() {
        let (mut calls, mut rx, _) = wire(100);
        let meta = ObservedMeta::default();
        for ms in 0..10_000u64 {
            calls.observe(&call("a", 60_000 + ms, false), &meta);
        }
        received(&mut rx);
        // The clock steps back a minute: after the first second, 100 a second again.
        for ms in 0..1_000u64 {
            calls.observe(&call("a", ms, false), &meta);
        }
        received(&mut rx);
        for ms in 1_000..10_000u64 {
            calls.observe(&call("a", ms, false), &meta);
        }
        let after = received(&mut rx).len();
        assert!((780..=1_020).contains(&after), "{after} in 9 s at 100 a second");
    }

    #[test]
    fn a_sudden_burst_is_cut_to_the_rate_and_a_logarithmic_tail() {
        let (mut calls, mut rx, _) = wire(100);
        let meta = ObservedMeta::default();
        // 1,000 calls in one millisecond: 100, then 100/k for the k-th.
        for _ in 0..1_000 {
            calls.observe(&call("a", 5_000, false), &meta);
        }
        let kept = received(&mut rx).len();
        assert!((290..=370).contains(&kept), "{kept} (100 × (1 + ln 10) = 330)");
    }
}
