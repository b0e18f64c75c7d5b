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
    pub dropped: AtomicU64,
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

impl RecordObserver for DriftSender {
    fn observe(&mut self, record: &TraceRecord, _meta: &ObservedMeta) {
        self.send(Input::Call(Box::new(record.into())));
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
