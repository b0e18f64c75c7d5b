//! The scorer's Prometheus metrics: verdicts by judge and result, judge cost, the scorer's
//! queue drops, and judge–human agreement per judge (recomputed at each scrape from recent
//! verdicts and feedback).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use llmtap_ingest::export::prometheus::prom::{
    self, CounterVec, GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
};
use llmtap_ingest::export::prometheus::LlmMetrics;
use llmtap_ingest::record::ScoreRecord;
use llmtap_scorer::agreement::AgreementTracker;
use llmtap_scorer::drift::runner::DriftStats;
use llmtap_scorer::runner::{ScorerStats, VerdictObserver};

pub struct JudgeMetrics {
    verdicts: IntCounterVec,
    cost: CounterVec,
    agreement: GaugeVec,
    pairs: IntGaugeVec,
    dropped: IntCounter,
    drift_inputs: IntCounterVec,
    pub tracker: Arc<Mutex<AgreementTracker>>,
    stats: Mutex<Option<Arc<ScorerStats>>>,
    drift: Mutex<Option<Arc<DriftStats>>>,
}

impl JudgeMetrics {
    pub fn register(metrics: &LlmMetrics, tracker: Arc<Mutex<AgreementTracker>>) -> prom::Result<Arc<Self>> {
        let verdicts = IntCounterVec::new(
            Opts::new("llmtap_judge_verdicts_total", "Verdicts written, by judge and result (pass, fail, error)."),
            &["judge", "result"],
        )?;
        let cost = CounterVec::new(
            Opts::new("llmtap_judge_cost_usd_total", "What LLM judges cost, by judge (USD)."),
            &["judge"],
        )?;
        let agreement = GaugeVec::new(
            Opts::new(
                "llmtap_judge_agreement",
                "Judge-human agreement over recent verdicts with feedback: Cohen's kappa or Spearman's rho (method).",
            ),
            &["judge", "method"],
        )?;
        let pairs = IntGaugeVec::new(
            Opts::new("llmtap_judge_agreement_pairs", "Recent verdicts that have human feedback, by judge."),
            &["judge"],
        )?;
        let dropped = IntCounter::new(
            "llmtap_scorer_dropped_total",
            "Sampled calls not judged because the scorer queue was full.",
        )?;
        let drift_inputs = IntCounterVec::new(
            Opts::new(
                "llmtap_drift_inputs_skipped_total",
                "Inputs the in-memory drift source did not observe: calls sampled out (above drift.max_calls_per_sec), or calls, verdicts and feedback dropped on a full queue.",
            ),
            &["reason"],
        )?;
        let r = metrics.registry();
        r.register(Box::new(drift_inputs.clone()))?;
        r.register(Box::new(verdicts.clone()))?;
        r.register(Box::new(cost.clone()))?;
        r.register(Box::new(agreement.clone()))?;
        r.register(Box::new(pairs.clone()))?;
        r.register(Box::new(dropped.clone()))?;
        Ok(Arc::new(JudgeMetrics {
            verdicts,
            cost,
            agreement,
            pairs,
            dropped,
            drift_inputs,
            tracker,
            stats: Mutex::new(None),
            drift: Mutex::new(None),
        }))
    }

    pub fn set_stats(&self, stats: Arc<ScorerStats>) {
        if let Ok(mut s) = self.stats.lock() {
            *s = Some(stats);
        }
    }

    pub fn set_drift_stats(&self, stats: Arc<DriftStats>) {
        if let Ok(mut s) = self.drift.lock() {
            *s = Some(stats);
        }
    }

    /// Brings the gauges up to date; call before rendering.
    pub fn refresh(&self) {
        if let Ok(t) = self.tracker.lock() {
            for a in t.agreement() {
                if let Some(v) = a.value {
                    self.agreement.with_label_values(&[a.judge.as_str(), a.method]).set(v);
                }
                self.pairs.with_label_values(&[a.judge.as_str()]).set(a.pairs as i64);
            }
        }
        if let Some(s) = self.stats.lock().ok().and_then(|s| s.clone()) {
            catch_up(&self.dropped, s.dropped.load(Ordering::Relaxed));
        }
        if let Some(s) = self.drift.lock().ok().and_then(|s| s.clone()) {
            catch_up(&self.drift_inputs.with_label_values(&["sampled"]), s.sampled_out.load(Ordering::Relaxed));
            catch_up(&self.drift_inputs.with_label_values(&["dropped"]), s.dropped.load(Ordering::Relaxed));
        }
    }

    pub fn observer(self: &Arc<Self>) -> Box<dyn VerdictObserver> {
        Box::new(Observer(self.clone()))
    }
}

/// Raises a counter to a total kept elsewhere.
fn catch_up(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

struct Observer(Arc<JudgeMetrics>);

impl VerdictObserver for Observer {
    fn verdict(&mut self, v: &ScoreRecord) {
        let result = if !v.error.is_empty() {
            "error"
        } else if v.passed == 1 {
            "pass"
        } else {
            "fail"
        };
        self.0.verdicts.with_label_values(&[v.judge.as_str(), result]).inc();
        if v.judge_cost_usd > 0.0 {
            self.0.cost.with_label_values(&[v.judge.as_str()]).inc_by(v.judge_cost_usd);
        }
        if let Ok(mut t) = self.0.tracker.lock() {
            t.add_verdict(v);
        }
    }
}

/// Sends each verdict to the OTLP exporter as a `gen_ai.evaluation.result` event.
pub fn otlp_observer(tx: llmtap_ingest::export::otlp::EvaluationSender) -> Box<dyn VerdictObserver> {
    struct Otlp(llmtap_ingest::export::otlp::EvaluationSender);
    impl VerdictObserver for Otlp {
        fn verdict(&mut self, v: &ScoreRecord) {
            self.0.send(v);
        }
    }
    Box::new(Otlp(tx))
}

/// `llmtap_drift_active`: 1 for each (signal, key) whose drift is firing.
pub struct DriftGauge(GaugeVec);

impl DriftGauge {
    pub fn register(metrics: &LlmMetrics) -> prom::Result<Box<dyn llmtap_scorer::drift::runner::DriftObserver>> {
        let g = GaugeVec::new(
            Opts::new(
                "llmtap_drift_active",
                "1 while a drift is firing, by signal, key, control surface and severity.",
            ),
            &["signal", "app", "route", "model", "judge", "control_surface", "severity"],
        )?;
        metrics.registry().register(Box::new(g.clone()))?;
        Ok(Box::new(DriftGauge(g)))
    }
}

impl llmtap_scorer::drift::runner::DriftObserver for DriftGauge {
    fn changed(
        &mut self,
        _event: &llmtap_ingest::record::DriftEventRecord,
        active: &[llmtap_scorer::drift::engine::Active],
    ) {
        self.restored(active);
    }

    fn restored(&mut self, active: &[llmtap_scorer::drift::engine::Active]) {
        self.0.reset();
        for a in active {
            let k = &a.key;
            self.0
                .with_label_values(&[a.signal, &k.app, &k.route, &k.model, &k.judge, a.surface.as_str(), a.severity])
                .set(1.0);
        }
    }
}
