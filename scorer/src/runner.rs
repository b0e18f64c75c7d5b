//! The in-process scorer: a recorder observer picks the judges a finished call is sampled
//! for and hands it to a bounded queue (full: dropped and counted, the proxy never waits);
//! a scorer thread runs the judges and appends `llm_scores` verdicts to `<data-dir>/scores/`.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use llmtap_ingest::log::{LogConfig, SegmentWriter};
use llmtap_ingest::record::{ScoreRecord, Timestamp, TraceRecord};
use llmtap_ingest::recorder::{ObservedMeta, RecordObserver};

use crate::config::{Selector, ValidatedJudges};
use crate::rule::failed;
use crate::sample::is_sampled;

/// Counters of the scorer.
#[derive(Debug, Default)]
pub struct ScorerStats {
    pub verdicts: AtomicU64,
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
}

/// Whether a judge with `sel` looks at this call. `force` (`x-llmtap-score: force`) skips
/// sampling; the filters still apply.
pub fn selects(sel: &Selector, judge: &str, r: &TraceRecord, force: bool) -> bool {
    if failed(r) && !sel.score_failed {
        return false;
    }
    if !sel.apps.is_empty() && !sel.apps.contains(&r.app) {
        return false;
    }
    if !sel.routes.is_empty() && !sel.routes.contains(&r.route) {
        return false;
    }
    if !sel.models.is_empty() && !sel.models.iter().any(|m| *m == r.request_model || *m == r.response_model) {
        return false;
    }
    if !sel.tags.iter().all(|(k, v)| r.tags.get(k) == Some(v)) {
        return false;
    }
    force || is_sampled(&r.trace_id, judge, sel.sample_rate)
}

struct Job {
    record: TraceRecord,
    judges: Vec<usize>,
}

/// The recorder-side end.
pub struct ScorerObserver {
    tx: SyncSender<Job>,
    judges: Arc<ValidatedJudges>,
    stats: Arc<ScorerStats>,
}

impl RecordObserver for ScorerObserver {
    fn observe(&mut self, record: &TraceRecord, meta: &ObservedMeta) {
        if meta.score == Some(false) {
            return;
        }
        let force = meta.score == Some(true);
        let picks: Vec<usize> = self
            .judges
            .rules
            .iter()
            .enumerate()
            .filter(|(_, j)| selects(&j.selector, &j.name, record, force))
            .map(|(i, _)| i)
            .collect();
        if picks.is_empty() {
            return;
        }
        if self.tx.try_send(Job { record: record.clone(), judges: picks }).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Owner of the scorer thread.
pub struct ScorerHandle {
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<ScorerStats>,
}

impl ScorerHandle {
    /// Waits for queued calls to be judged. Call after the recorder (which owns the observer)
    /// has shut down, so the queue is closed.
    pub fn shutdown(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("scorer thread panicked");
            }
        }
    }
}

/// The verdict record of one judge on one call.
pub fn score_record(judge: &crate::config::ValidatedJudge, r: &TraceRecord) -> ScoreRecord {
    let start = Instant::now();
    let v = judge.rule.evaluate(r);
    ScoreRecord {
        ts: Timestamp::now(),
        trace_id: r.trace_id.clone(),
        judge: judge.name.clone(),
        judge_version: judge.version.clone(),
        judge_kind: "rule".into(),
        app: r.app.clone(),
        route: r.route.clone(),
        request_model: r.request_model.clone(),
        score: v.score,
        passed: u8::from(v.passed),
        label: v.label,
        reasoning: v.reasoning,
        needs_review: 0,
        error: String::new(),
        judge_model: String::new(),
        judge_ms: start.elapsed().as_secs_f64() * 1000.0,
        judge_cost_usd: 0.0,
    }
}

/// Starts the scorer thread writing to `<data_dir>/scores/`.
pub fn spawn_scorer(
    data_dir: &Path,
    log: LogConfig,
    judges: Arc<ValidatedJudges>,
    capacity: usize,
) -> std::io::Result<(ScorerObserver, ScorerHandle)> {
    let mut writer = SegmentWriter::open(data_dir, "scores", log)?;
    let (tx, rx) = mpsc::sync_channel::<Job>(capacity.max(1));
    let stats = Arc::new(ScorerStats::default());
    let thread = {
        let (judges, stats) = (judges.clone(), stats.clone());
        std::thread::Builder::new().name("llmtap-scorer".into()).spawn(move || {
            let mut line = Vec::with_capacity(1024);
            while let Ok(job) = rx.recv() {
                let mut jobs = vec![job];
                jobs.extend(rx.try_iter().take(1023));
                for job in jobs {
                    for &i in &job.judges {
                        let Some(judge) = judges.rules.get(i) else { continue };
                        let rec = score_record(judge, &job.record);
                        line.clear();
                        let ok = serde_json::to_writer(&mut line, &rec).is_ok() && writer.append(&line).is_ok();
                        if ok {
                            stats.verdicts.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if let Err(e) = writer.flush() {
                    tracing::error!(error = %e, "scores log flush failed");
                }
            }
            if let Err(e) = writer.close() {
                tracing::error!(error = %e, "scores log close failed");
            }
        })?
    };
    Ok((ScorerObserver { tx, judges, stats: stats.clone() }, ScorerHandle { thread: Some(thread), stats }))
}
