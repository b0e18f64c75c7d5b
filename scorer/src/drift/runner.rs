//! The drift thread: a bounded queue from the recorder, the scorer and the feedback API
//! (full: dropped and counted; the request path never waits), the engine, the
//! `<data-dir>/drift/` log, the observers (the Prometheus gauge) and webhook delivery.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llmtap_ingest::log::{LogConfig, SegmentWriter};
use llmtap_ingest::record::{DriftEventRecord, ScoreRecord, TraceRecord};
use llmtap_ingest::recorder::{ObservedMeta, RecordObserver};
use tokio::sync::mpsc;

use super::engine::{Active, DriftConfig, DriftEngine, Input};
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

/// Starts the drift thread writing events to `<data_dir>/drift/`.
pub fn spawn_drift(
    data_dir: &Path,
    log: LogConfig,
    cfg: DriftConfig,
    client: Option<HttpClient>,
    mut observers: Vec<Box<dyn DriftObserver>>,
) -> std::io::Result<(DriftSender, DriftHandle)> {
    let mut writer = SegmentWriter::open(data_dir, "drift", log)?;
    let (tx, mut rx) = mpsc::channel::<Input>(cfg.queue_capacity.max(1));
    let stats = Arc::new(DriftStats::default());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let hooks = Arc::new(cfg.webhooks.clone());
    let mut engine = DriftEngine::new(cfg);
    let thread = {
        let stats = stats.clone();
        std::thread::Builder::new().name("llmtap-drift".into()).spawn(move || {
            runtime.block_on(async move {
                let mut deliveries = tokio::task::JoinSet::new();
                let mut line = Vec::with_capacity(512);
                while let Some(input) = rx.recv().await {
                    let mut events = engine.observe(&input);
                    while events.len() < 256 {
                        match rx.try_recv() {
                            Ok(i) => events.extend(engine.observe(&i)),
                            Err(_) => break,
                        }
                    }
                    if events.is_empty() {
                        continue;
                    }
                    for e in &events {
                        line.clear();
                        if serde_json::to_writer(&mut line, e).is_ok() && writer.append(&line).is_ok() {
                            stats.events.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::warn!(
                            signal = %e.signal, app = %e.app, route = %e.route, model = %e.model, judge = %e.judge,
                            state = %e.state, severity = %e.severity, control_surface = %e.control_surface,
                            method = %e.method, baseline = e.baseline_value, current = e.current_value,
                            "drift"
                        );
                    }
                    if let Err(e) = writer.flush() {
                        tracing::error!(error = %e, "drift log flush failed");
                    }
                    let active = engine.active();
                    for e in &events {
                        for o in observers.iter_mut() {
                            o.changed(e, &active);
                        }
                    }
                    if let Some(client) = &client {
                        for hook in hooks.iter() {
                            let (client, hook, events, stats) =
                                (client.clone(), hook.clone(), events.clone(), stats.clone());
                            deliveries.spawn(async move {
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
                    while deliveries.try_join_next().is_some() {}
                }
                while deliveries.join_next().await.is_some() {}
                if let Err(e) = writer.close() {
                    tracing::error!(error = %e, "drift log close failed");
                }
            })
        })?
    };
    Ok((DriftSender { tx, stats: stats.clone() }, DriftHandle { thread: Some(thread), stats }))
}
