//! The scoring engine, shared by both modes.
//!
//! In-process, a recorder observer picks the judges a finished call is sampled for and hands
//! it to a bounded queue (full: dropped and counted; the proxy never waits). Standalone,
//! `llmtap score` feeds the same queue from ClickHouse and waits when it is full. A scorer
//! thread with its own runtime runs rule judges inline and LLM judges as tasks (bounded by
//! `max_in_flight` and each endpoint's limits), remembers every (judge, version, trace, span)
//! it has judged so nothing is judged twice, and appends `llm_scores` verdicts to
//! `<data-dir>/scores/`, telling each verdict observer (metrics, OTLP, drift).

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use llmtap_ingest::log::{LogConfig, SegmentWriter};
use llmtap_ingest::record::{ScoreRecord, TraceRecord};
use llmtap_ingest::recorder::{ObservedMeta, RecordObserver};
use tokio::sync::mpsc;

use crate::config::{Selector, ValidatedJudges};
use crate::llm::{blank_verdict, LlmCaller, JUDGE_TAG};
use crate::rule::failed;
use crate::sample::is_sampled;

/// Counters of the scorer.
#[derive(Debug, Default)]
pub struct ScorerStats {
    /// Verdicts written (error verdicts included).
    pub verdicts: AtomicU64,
    /// Verdicts that are errors: the judge could not produce one.
    pub errors: AtomicU64,
    /// Sampled calls dropped because the queue was full.
    pub dropped: AtomicU64,
    pub write_errors: AtomicU64,
    /// Judgements skipped because that judge version already judged that call.
    pub already_judged: AtomicU64,
}

/// Sees every verdict after it is written (on the scorer thread; keep it quick).
pub trait VerdictObserver: Send {
    fn verdict(&mut self, v: &ScoreRecord);
}

/// Whether a judge with `sel` looks at this call. `force` (`x-llmtap-score: force`) skips
/// sampling; the filters still apply. A judge's own calls are never judged.
pub fn selects(sel: &Selector, judge: &str, r: &TraceRecord, force: bool) -> bool {
    if r.tags.contains_key(JUDGE_TAG) {
        return false;
    }
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

/// One call and the judges it is sampled for (indexes into `rules` and `llm`).
#[derive(Debug)]
pub struct Job {
    pub record: TraceRecord,
    pub rules: Vec<usize>,
    pub llm: Vec<usize>,
}

/// The judges `r` is sampled for; `None` when there are none. `score` is `x-llmtap-score`.
pub fn pick(judges: &ValidatedJudges, r: &TraceRecord, score: Option<bool>) -> Option<Job> {
    if score == Some(false) {
        return None;
    }
    let force = score == Some(true);
    let rules: Vec<usize> = (0..judges.rules.len())
        .filter(|&i| selects(&judges.rules[i].selector, &judges.rules[i].name, r, force))
        .collect();
    let llm: Vec<usize> =
        (0..judges.llm.len()).filter(|&i| selects(&judges.llm[i].selector, &judges.llm[i].name, r, force)).collect();
    (!rules.is_empty() || !llm.is_empty()).then(|| Job { record: r.clone(), rules, llm })
}

/// The key a verdict is remembered by.
pub fn verdict_key(judge: &str, version: &str, trace_id: &str, span_id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (judge, version, trace_id, span_id).hash(&mut h);
    h.finish()
}

/// The (judge, version, trace, span) keys judged lately; the oldest are forgotten first.
#[derive(Debug)]
pub struct VerdictCache {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl VerdictCache {
    pub fn new(capacity: usize) -> Self {
        VerdictCache { seen: HashSet::new(), order: VecDeque::new(), capacity: capacity.max(1) }
    }

    /// `true` when `key` is new (and is now remembered).
    pub fn insert(&mut self, key: u64) -> bool {
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// Remembers the verdicts already in `<data_dir>/scores` (e.g. not yet shipped).
    pub fn load(&mut self, data_dir: &Path) -> std::io::Result<usize> {
        let mut n = 0;
        llmtap_ingest::log::for_each_line(&data_dir.join("scores"), |_, line| {
            if let Ok(s) = serde_json::from_str::<ScoreRecord>(line) {
                n += usize::from(self.insert(verdict_key(&s.judge, &s.judge_version, &s.trace_id, &s.span_id)));
            }
        })?;
        Ok(n)
    }
}

/// The rule verdict of one judge on one call.
pub fn score_record(judge: &crate::config::ValidatedJudge, r: &TraceRecord) -> ScoreRecord {
    let start = Instant::now();
    let v = judge.rule.evaluate(r);
    let mut out = blank_verdict(&judge.name, &judge.version, "rule", r);
    out.score = v.score;
    out.passed = u8::from(v.passed);
    out.label = v.label;
    out.reasoning = v.reasoning;
    out.judge_ms = start.elapsed().as_secs_f64() * 1000.0;
    out
}

/// Feeds the scorer.
#[derive(Clone)]
pub struct JobSender {
    tx: mpsc::Sender<Job>,
    stats: Arc<ScorerStats>,
}

impl JobSender {
    /// Never waits: a full queue drops the job and counts it.
    pub fn try_send(&self, job: Job) -> bool {
        let ok = self.tx.try_send(job).is_ok();
        if !ok {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Waits for room (standalone mode, where the source can wait).
    pub async fn send(&self, job: Job) -> bool {
        self.tx.send(job).await.is_ok()
    }

    /// Jobs waiting.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// The recorder-side end of the in-process scorer.
pub struct ScorerObserver {
    tx: JobSender,
    judges: Arc<ValidatedJudges>,
}

impl RecordObserver for ScorerObserver {
    fn observe(&mut self, record: &TraceRecord, meta: &ObservedMeta) {
        if let Some(job) = pick(&self.judges, record, meta.score) {
            self.tx.try_send(job);
        }
    }
}

/// Owner of the scorer thread.
pub struct ScorerHandle {
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<ScorerStats>,
}

impl ScorerHandle {
    /// Waits for queued calls to be judged. Call once every `JobSender` is gone (for the
    /// in-process scorer: after the recorder, which owns the observer, has shut down).
    pub fn shutdown(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("scorer thread panicked");
            }
        }
    }
}

/// How the scorer runs.
pub struct ScorerSetup {
    pub judges: Arc<ValidatedJudges>,
    /// Required when there are LLM judges.
    pub caller: Option<LlmCaller>,
    pub queue_capacity: usize,
    pub max_in_flight: usize,
    pub cache: VerdictCache,
    pub observers: Vec<Box<dyn VerdictObserver>>,
}

/// Starts the scorer thread writing to `<data_dir>/scores/`.
pub fn spawn_engine(data_dir: &Path, log: LogConfig, setup: ScorerSetup) -> std::io::Result<(JobSender, ScorerHandle)> {
    let mut writer = SegmentWriter::open(data_dir, "scores", log)?;
    let (tx, mut rx) = mpsc::channel::<Job>(setup.queue_capacity.max(1));
    let stats = Arc::new(ScorerStats::default());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ScorerSetup { judges, caller, max_in_flight, mut cache, mut observers, .. } = setup;
    if !judges.llm.is_empty() && caller.is_none() {
        return Err(std::io::Error::other("llm judges need a judge client"));
    }
    let caller = caller.map(Arc::new);
    let thread = {
        let stats = stats.clone();
        std::thread::Builder::new().name("llmtap-scorer".into()).spawn(move || {
            runtime.block_on(async move {
                let (vtx, mut vrx) = mpsc::unbounded_channel::<ScoreRecord>();
                let writer_stats = stats.clone();
                let write = tokio::spawn(async move {
                    let mut line = Vec::with_capacity(1024);
                    while let Some(v) = vrx.recv().await {
                        let mut batch = vec![v];
                        while batch.len() < 1024 {
                            match vrx.try_recv() {
                                Ok(v) => batch.push(v),
                                Err(_) => break,
                            }
                        }
                        for v in &batch {
                            line.clear();
                            let ok = serde_json::to_writer(&mut line, v).is_ok() && writer.append(&line).is_ok();
                            if ok {
                                writer_stats.verdicts.fetch_add(1, Ordering::Relaxed);
                                if !v.error.is_empty() {
                                    writer_stats.errors.fetch_add(1, Ordering::Relaxed);
                                }
                            } else {
                                writer_stats.write_errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if let Err(e) = writer.flush() {
                            tracing::error!(error = %e, "scores log flush failed");
                        }
                        for v in &batch {
                            for o in observers.iter_mut() {
                                o.verdict(v);
                            }
                        }
                    }
                    if let Err(e) = writer.close() {
                        tracing::error!(error = %e, "scores log close failed");
                    }
                });
                let in_flight = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
                let mut tasks = tokio::task::JoinSet::new();
                while let Some(job) = rx.recv().await {
                    let r = &job.record;
                    for &i in &job.rules {
                        let Some(j) = judges.rules.get(i) else { continue };
                        if !cache.insert(verdict_key(&j.name, &j.version, &r.trace_id, &r.span_id)) {
                            stats.already_judged.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let _ = vtx.send(score_record(j, r));
                    }
                    let (Some(caller), false) = (&caller, job.llm.is_empty()) else { continue };
                    let record = Arc::new(job.record);
                    for &i in &job.llm {
                        let Some(j) = judges.llm.get(i) else { continue };
                        if !cache.insert(verdict_key(&j.name, &j.version, &record.trace_id, &record.span_id)) {
                            stats.already_judged.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                        let (caller, judges, record, vtx) =
                            (caller.clone(), judges.clone(), record.clone(), vtx.clone());
                        tasks.spawn(async move {
                            if let Some(j) = judges.llm.get(i) {
                                let _ = vtx.send(caller.judge(j, &record).await);
                            }
                            drop(permit);
                        });
                    }
                    while tasks.try_join_next().is_some() {}
                }
                while tasks.join_next().await.is_some() {}
                drop(vtx);
                if write.await.is_err() {
                    tracing::error!("scores writer panicked");
                }
            })
        })?
    };
    Ok((JobSender { tx, stats: stats.clone() }, ScorerHandle { thread: Some(thread), stats }))
}

/// The in-process scorer: an observer for the recorder and the thread's handle.
pub fn spawn_scorer(
    data_dir: &Path,
    log: LogConfig,
    setup: ScorerSetup,
) -> std::io::Result<(ScorerObserver, ScorerHandle)> {
    let judges = setup.judges.clone();
    let (tx, handle) = spawn_engine(data_dir, log, setup)?;
    Ok((ScorerObserver { tx, judges }, handle))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{JudgeConfig, JudgeEnv};
    use crate::rule::RuleSpec;

    #[test]
    fn a_call_is_judged_once_per_judge_version() {
        let dir = tempfile::tempdir().unwrap();
        let judge = JudgeConfig {
            name: "fast".into(),
            rule: Some(RuleSpec { max_latency_ms: Some(100.0), ..RuleSpec::default() }),
            ..JudgeConfig::default()
        };
        let judges = Arc::new(ValidatedJudges::build(&[judge], &[], &JudgeEnv::plain(dir.path())).unwrap());
        let setup = |cache| ScorerSetup {
            judges: judges.clone(),
            caller: None,
            queue_capacity: 16,
            max_in_flight: 1,
            cache,
            observers: Vec::new(),
        };
        let r =
            TraceRecord { trace_id: "a".repeat(32), span_id: "b".repeat(16), duration_ms: 5.0, ..Default::default() };
        let (tx, handle) = spawn_engine(dir.path(), LogConfig::default(), setup(VerdictCache::new(10))).unwrap();
        for _ in 0..3 {
            assert!(tx.try_send(pick(&judges, &r, None).unwrap()));
        }
        drop(tx);
        let stats = handle.stats.clone();
        handle.shutdown();
        assert_eq!((stats.verdicts.load(Ordering::Relaxed), stats.already_judged.load(Ordering::Relaxed)), (1, 2));
        // After a restart the verdicts on disk are remembered too.
        let mut cache = VerdictCache::new(10);
        assert_eq!(cache.load(dir.path()).unwrap(), 1);
        let (tx, handle) = spawn_engine(dir.path(), LogConfig::default(), setup(cache)).unwrap();
        assert!(tx.try_send(pick(&judges, &r, None).unwrap()));
        drop(tx);
        let stats = handle.stats.clone();
        handle.shutdown();
        assert_eq!(stats.verdicts.load(Ordering::Relaxed), 0);
        assert_eq!(llmtap_ingest::log::list_segments(&dir.path().join("scores")).unwrap().len(), 1);
    }
}
