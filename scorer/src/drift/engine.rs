//! The drift engine: turns calls, verdicts and feedback into observations of each signal,
//! runs a detector per (key, signal), and turns detector transitions into
//! `llm_drift_events` records.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use llmtap_ingest::record::{DriftEventRecord, ErrorKind, FeedbackRecord, ScoreRecord, Timestamp, TraceRecord};
use serde::{Deserialize, Serialize};

use super::detect::{BadDirection, Detector, DetectorConfig, Obs, Severity, SignalKind, Transition};

/// What drift needs of one call: no bodies, and the refusal check done by the sender.
#[derive(Clone, Debug, Default)]
pub struct CallObs {
    pub app: String,
    pub route: String,
    /// The response model, else the requested one.
    pub model: String,
    pub failed: bool,
    /// A judge's own call (never watched).
    pub judge_call: bool,
    pub duration_ms: f64,
    /// Set for streamed calls with a first token.
    pub ttft_ms: Option<f64>,
    pub cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub finish_reason: String,
    /// `None` when there is no output text.
    pub refused: Option<bool>,
    pub tool_calls: Vec<String>,
}

impl From<&TraceRecord> for CallObs {
    fn from(r: &TraceRecord) -> Self {
        CallObs {
            app: r.app.clone(),
            route: r.route.clone(),
            model: model_of(r).to_owned(),
            failed: r.error_kind != ErrorKind::None,
            judge_call: is_judge_call(r),
            duration_ms: r.duration_ms,
            ttft_ms: (r.streamed && r.ttft_ms > 0.0).then_some(r.ttft_ms),
            cost_usd: r.cost_usd,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            finish_reason: r.finish_reason.clone(),
            refused: (!r.output_text.is_empty()).then(|| refused(&r.output_text)),
            tool_calls: r.tool_calls.clone(),
        }
    }
}

/// A judge's own call, which drift never watches.
pub fn is_judge_call(r: &TraceRecord) -> bool {
    r.tags.contains_key(crate::llm::JUDGE_TAG)
}

/// What the engine consumes.
#[derive(Clone, Debug)]
pub enum Input {
    Call(Box<CallObs>),
    Verdict(Box<ScoreRecord>),
    Feedback(Box<FeedbackRecord>),
}

/// Which decision a drift sends the team back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// The model: capability, cost, latency, errors, or the model itself changed.
    Model,
    /// The prompt or workflow: quality moved while the model held steady.
    Prompt,
    /// The intent and its judges: agreement with humans fell, or reviews rose.
    IntentJudge,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Model => "model",
            Surface::Prompt => "prompt",
            Surface::IntentJudge => "intent_judge",
        }
    }
}

/// One watched signal.
#[derive(Clone, Copy, Debug)]
pub struct Signal {
    pub name: &'static str,
    pub kind: SignalKind,
    pub bad: BadDirection,
    /// The surface of this signal alone (quality signals are refined at fire time).
    pub surface: Surface,
    /// A quality signal: `prompt` unless a `model` signal fires for the same app.
    pub quality: bool,
    /// Numeric: the detector's default `min_relative_shift`.
    pub min_shift: f64,
    /// Numeric: the detector's `critical_relative_shift`.
    pub critical_shift: f64,
}

const fn sig(name: &'static str, kind: SignalKind, bad: BadDirection, surface: Surface, quality: bool) -> Signal {
    Signal { name, kind, bad, surface, quality, min_shift: 0.0, critical_shift: 0.0 }
}

/// Latency, cost and token counts alarm only when they move by at least this fraction (a
/// 10% slower upstream, not one whose millisecond-narrow latency moved by 2 ms), and are
/// critical only when their median moved by `CRITICAL_SHIFT` (+50%: a cost that tripled,
/// not a narrow latency 12% up). Judge scores have neither: a bounded score that drops by
/// less is still a quality drop.
const MIN_SHIFT: f64 = 0.1;
const CRITICAL_SHIFT: f64 = 0.5;

const fn material(s: Signal) -> Signal {
    Signal { min_shift: MIN_SHIFT, critical_shift: CRITICAL_SHIFT, ..s }
}

use BadDirection::{Both, Down, Up};
use SignalKind::{Categorical, Numeric, Rate};

/// Every signal, in the order they are observed.
pub const SIGNALS: &[Signal] = &[
    sig("error_rate", Rate, Up, Surface::Model, false),
    material(sig("latency_ms", Numeric, Up, Surface::Model, false)),
    material(sig("ttft_ms", Numeric, Up, Surface::Model, false)),
    material(sig("cost_per_call", Numeric, Up, Surface::Model, false)),
    material(sig("input_tokens", Numeric, Both, Surface::Model, false)),
    material(sig("output_tokens", Numeric, Both, Surface::Model, false)),
    sig("finish_reason_mix", Categorical, Both, Surface::Model, false),
    sig("refusal_rate", Rate, Up, Surface::Model, false),
    sig("model_mix", Categorical, Both, Surface::Model, false),
    sig("tool_call_rate", Rate, Both, Surface::Prompt, true),
    sig("tool_path_mix", Categorical, Both, Surface::Prompt, true),
    sig("judge_pass_rate", Rate, Down, Surface::Prompt, true),
    sig("judge_score", Numeric, Down, Surface::Prompt, true),
    sig("needs_review_rate", Rate, Up, Surface::IntentJudge, false),
    sig("judge_human_agreement", Rate, Down, Surface::IntentJudge, false),
];

/// Indices into [`SIGNALS`], so the per-call path never looks a signal up by name.
mod idx {
    pub const ERROR_RATE: usize = 0;
    pub const LATENCY_MS: usize = 1;
    pub const TTFT_MS: usize = 2;
    pub const COST_PER_CALL: usize = 3;
    pub const INPUT_TOKENS: usize = 4;
    pub const OUTPUT_TOKENS: usize = 5;
    pub const FINISH_REASON_MIX: usize = 6;
    pub const REFUSAL_RATE: usize = 7;
    pub const MODEL_MIX: usize = 8;
    pub const TOOL_CALL_RATE: usize = 9;
    pub const TOOL_PATH_MIX: usize = 10;
    pub const JUDGE_PASS_RATE: usize = 11;
    pub const JUDGE_SCORE: usize = 12;
    pub const NEEDS_REVIEW_RATE: usize = 13;
    pub const JUDGE_HUMAN_AGREEMENT: usize = 14;
}

pub(crate) fn signal(name: &str) -> Option<(usize, &'static Signal)> {
    SIGNALS.iter().enumerate().find(|(_, s)| s.name == name)
}

/// `[drift.signals.<name>]`: overrides of one signal's detector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalOverride {
    pub enabled: Option<bool>,
    pub min_baseline: Option<usize>,
    pub baseline_max: Option<usize>,
    pub current_window: Option<usize>,
    pub rebaseline_after: Option<usize>,
    /// The sequential detector's threshold (CUSUM `h`).
    pub cusum_h: Option<f64>,
    /// Rates: |z| that fires the windowed z-test.
    pub z_fire: Option<f64>,
    /// Numeric: PSI that fires.
    pub psi_fire: Option<f64>,
    /// Numeric: the smallest move of the median or the mean, as a fraction of the
    /// baseline's, that may fire (default 0.1 for latency, cost and tokens, 0 for
    /// `judge_score`).
    pub min_relative_shift: Option<f64>,
    /// Categorical: Jensen–Shannon distance that fires.
    pub js_fire: Option<f64>,
    /// Observations leaving the current window are held back from the baseline while the
    /// window is this many standard errors off in a bad direction.
    pub hold_z: Option<f64>,
    /// Baseline observations older than this are dropped (a sliding window in time, e.g.
    /// 7 days); unset: bounded by count only.
    pub baseline_max_age_secs: Option<u64>,
}

/// `[drift]` in `llmtap.toml`. With no section at all every signal is watched with the
/// defaults the `drift_quality` bench measures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftConfig {
    pub enabled: bool,
    /// `memory` (the live record stream of this process) or `clickhouse` (the fleet).
    pub source: String,
    /// Most (key, signal) detectors; later keys are not watched (counted).
    pub max_detectors: usize,
    /// Queue from the recorder and scorer; when full, inputs are dropped and counted.
    pub queue_capacity: usize,
    /// Most calls a second per app the in-memory source observes; above it, a random sample
    /// of that size (see `runner::DriftCalls`). 0 observes every call.
    pub max_calls_per_sec: u32,
    /// Per-signal overrides, by signal name.
    pub signals: BTreeMap<String, SignalOverride>,
    /// Where alerts go.
    pub webhooks: Vec<crate::drift::alert::WebhookConfig>,
    /// `[drift.clickhouse]`: polling of the ClickHouse source.
    pub clickhouse: crate::drift::fleet::FleetConfig,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            enabled: true,
            source: "memory".into(),
            max_detectors: 20_000,
            queue_capacity: 65_536,
            max_calls_per_sec: 200,
            signals: BTreeMap::new(),
            webhooks: Vec::new(),
            clickhouse: Default::default(),
        }
    }
}

impl DriftConfig {
    /// Checks names and values; `Err((key, value, reason))`.
    pub fn validate(&self) -> Result<(), (String, String, String)> {
        if self.source != "memory" && self.source != "clickhouse" {
            return Err(("drift.source".into(), format!("{:?}", self.source), "expected memory or clickhouse".into()));
        }
        for (name, o) in &self.signals {
            if signal(name).is_none() {
                let known: Vec<&str> = SIGNALS.iter().map(|s| s.name).collect();
                return Err((
                    format!("drift.signals.{name}"),
                    format!("{name:?}"),
                    format!("unknown signal; known: {}", known.join(", ")),
                ));
            }
            if let Some(v) = o.min_relative_shift.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err((
                    format!("drift.signals.{name}.min_relative_shift"),
                    v.to_string(),
                    "must be 0 or more (a fraction of the baseline: 0.1 = 10%)".into(),
                ));
            }
            for (k, v) in [("min_baseline", o.min_baseline), ("current_window", o.current_window)] {
                if v == Some(0) {
                    return Err((format!("drift.signals.{name}.{k}"), "0".into(), "must be above 0".into()));
                }
            }
        }
        let ch = &self.clickhouse;
        for (k, v) in [("poll_interval_secs", ch.poll_interval_secs), ("lookback_secs", ch.lookback_secs)] {
            if v == 0 {
                return Err((format!("drift.clickhouse.{k}"), "0".into(), "must be above 0".into()));
            }
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            w.validate().map_err(|(k, v, r)| (format!("drift.webhooks[{i}].{k}"), v, r))?;
        }
        Ok(())
    }

    fn detector_config(&self, s: &Signal) -> Option<DetectorConfig> {
        let o = self.signals.get(s.name).cloned().unwrap_or_default();
        if o.enabled == Some(false) {
            return None;
        }
        let mut c = DetectorConfig::with_direction(s.kind, s.bad);
        c.min_relative_shift = o.min_relative_shift.unwrap_or(s.min_shift);
        c.critical_relative_shift = s.critical_shift;
        if let Some(v) = o.min_baseline {
            c.min_baseline = v;
        }
        if let Some(v) = o.baseline_max {
            c.baseline_max = v;
        }
        if let Some(v) = o.current_window {
            c.current_window = v;
        }
        if let Some(v) = o.rebaseline_after {
            c.rebaseline_after = v;
        }
        if o.cusum_h.is_some() {
            c.cusum_h = o.cusum_h;
        }
        if o.z_fire.is_some() {
            c.z_fire = o.z_fire;
        }
        if o.psi_fire.is_some() {
            c.psi_fire = o.psi_fire;
        }
        if o.js_fire.is_some() {
            c.js_fire = o.js_fire;
        }
        if let Some(v) = o.hold_z {
            c.hold_z = v;
        }
        c.baseline_max_age_ms = o.baseline_max_age_secs.map(|s| s * 1000);
        Some(c)
    }
}

/// (app, route, model, judge); `*` for "across".
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub app: String,
    pub route: String,
    pub model: String,
    pub judge: String,
}

/// A detector that is firing, for the control-surface rule and the gauge.
#[derive(Clone, Debug, PartialEq)]
pub struct Active {
    pub key: Key,
    pub signal: &'static str,
    pub surface: Surface,
    pub severity: &'static str,
}

/// Counters of the engine.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EngineStats {
    pub observations: u64,
    pub detectors: u64,
    /// Observations of keys beyond `max_detectors`.
    pub untracked: u64,
    pub events: u64,
}

/// Every detector and what is firing.
pub struct DriftEngine {
    cfg: DriftConfig,
    configs: Vec<Option<DetectorConfig>>,
    /// Keys by their joined text (see `key_id`), and the detectors of each key by signal.
    key_ids: HashMap<String, u32>,
    keys: Vec<Key>,
    detectors: Vec<Vec<Option<Detector>>>,
    /// Reused to join a key for lookup without allocating.
    scratch: String,
    active: BTreeMap<(Key, &'static str), Active>,
    /// Recent verdicts by trace, to pair with feedback (judge–human agreement).
    recent: HashMap<String, Vec<(u32, bool)>>,
    recent_order: VecDeque<String>,
    /// Calls seen per app, and the models each app has used.
    app_calls: HashMap<String, u64>,
    app_models: HashMap<String, HashSet<String>>,
    /// Apps where a model never seen before appeared, with the app's call count then
    /// ([`MODEL_APPEARED_NOW`] from the ClickHouse source: in the current window).
    model_appeared: HashMap<String, u64>,
    pub stats: EngineStats,
}

/// Calls an app must have made before a new model counts as a switch (before that, every
/// model is new), and for how many calls after it appeared it keeps counting as one.
const MODEL_HISTORY: u64 = 500;
const MODEL_RECENT: u64 = 5_000;
/// See `DriftEngine::model_appeared`.
const MODEL_APPEARED_NOW: u64 = u64::MAX;

fn model_of(r: &TraceRecord) -> &str {
    if r.response_model.is_empty() {
        &r.request_model
    } else {
        &r.response_model
    }
}

fn refused(text: &str) -> bool {
    let lower = text.to_lowercase();
    crate::rule::REFUSALS.iter().any(|p| lower.contains(p))
}

fn human_pass(f: &FeedbackRecord) -> bool {
    crate::report::human_pass(f)
}

impl DriftEngine {
    pub fn new(cfg: DriftConfig) -> Self {
        let configs = SIGNALS.iter().map(|s| cfg.detector_config(s)).collect();
        DriftEngine {
            cfg,
            configs,
            key_ids: HashMap::new(),
            keys: Vec::new(),
            detectors: Vec::new(),
            scratch: String::new(),
            active: BTreeMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            app_calls: HashMap::new(),
            app_models: HashMap::new(),
            model_appeared: HashMap::new(),
            stats: EngineStats::default(),
        }
    }

    /// The detector tuning of signal `idx` (`None`: disabled).
    pub fn detector_config(&self, idx: usize) -> Option<&DetectorConfig> {
        self.configs.get(idx).and_then(Option::as_ref)
    }

    pub fn max_detectors(&self) -> usize {
        self.cfg.max_detectors
    }

    /// The ClickHouse source saw a model in `app`'s current window that its baseline never
    /// had. Replaces what an earlier poll said.
    pub(crate) fn set_models_appeared(&mut self, apps: impl IntoIterator<Item = String>) {
        self.model_appeared = apps.into_iter().map(|a| (a, MODEL_APPEARED_NOW)).collect();
    }

    /// The event of a transition of signal `idx` for `key` (the ClickHouse source's way in).
    pub(crate) fn transition_event(&mut self, key: &Key, idx: usize, t: &Transition) -> DriftEventRecord {
        let out = self.event(key, &SIGNALS[idx], t);
        self.stats.events += 1;
        out
    }

    /// Marks a detector as firing without an event (restored from ClickHouse at start).
    pub(crate) fn restore_active(&mut self, key: &Key, idx: usize, surface: &str, severity: &str) {
        let s = &SIGNALS[idx];
        let surface = match surface {
            "model" => Surface::Model,
            "intent_judge" => Surface::IntentJudge,
            "prompt" => Surface::Prompt,
            _ => s.surface,
        };
        let severity = if severity == "critical" { "critical" } else { "warning" };
        self.active.insert((key.clone(), s.name), Active { key: key.clone(), signal: s.name, surface, severity });
    }

    /// Whether a model new to `app` appeared recently.
    fn model_switched(&self, app: &str) -> bool {
        self.model_appeared.get(app).is_some_and(|&at| {
            at == MODEL_APPEARED_NOW || self.app_calls.get(app).copied().unwrap_or(0).saturating_sub(at) <= MODEL_RECENT
        })
    }

    /// Notes the model of a call; a model an established app never used counts as a switch.
    fn note_model(&mut self, app: &str, model: &str) {
        // Looked up before inserting: this runs for every call, and the app is almost
        // always known.
        let calls = match self.app_calls.get_mut(app) {
            Some(c) => {
                *c += 1;
                *c
            }
            None => {
                self.app_calls.insert(app.to_owned(), 1);
                1
            }
        };
        if self.app_models.get(app).is_some_and(|m| m.contains(model)) {
            return;
        }
        let models = self.app_models.entry(app.to_owned()).or_default();
        if models.len() >= 256 {
            return;
        }
        models.insert(model.to_owned());
        if calls > MODEL_HISTORY {
            self.model_appeared.insert(app.to_owned(), calls);
        }
    }

    /// Every detector's window statistics, sorted by key and signal.
    pub fn window_stats(&self) -> Vec<(Key, &'static str, super::detect::WindowStats)> {
        let mut out: Vec<_> = self
            .detectors
            .iter()
            .zip(&self.keys)
            .flat_map(|(ds, k)| {
                ds.iter()
                    .enumerate()
                    .filter_map(move |(i, d)| Some((k.clone(), SIGNALS[i].name, d.as_ref()?.window_stats())))
            })
            .collect();
        out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        out
    }

    /// What is firing now.
    pub fn active(&self) -> Vec<Active> {
        self.active.values().cloned().collect()
    }

    /// Feeds one input; returns the events it caused.
    pub fn observe(&mut self, input: &Input) -> Vec<DriftEventRecord> {
        let mut out = Vec::new();
        match input {
            Input::Call(r) => {
                if r.judge_call {
                    return out;
                }
                let keys = [self.key_id(&r.app, &r.route, &r.model, ""), self.key_id(&r.app, "*", "*", "")];
                let path = if r.tool_calls.is_empty() { "(none)".to_owned() } else { r.tool_calls.join(">") };
                for key in keys.into_iter().flatten() {
                    self.feed(key, idx::ERROR_RATE, Obs::Flag(r.failed), &mut out);
                    if r.failed {
                        continue;
                    }
                    self.feed(key, idx::LATENCY_MS, Obs::Value(r.duration_ms), &mut out);
                    if let Some(ttft) = r.ttft_ms {
                        self.feed(key, idx::TTFT_MS, Obs::Value(ttft), &mut out);
                    }
                    self.feed(key, idx::COST_PER_CALL, Obs::Value(r.cost_usd), &mut out);
                    self.feed(key, idx::INPUT_TOKENS, Obs::Value(r.input_tokens as f64), &mut out);
                    self.feed(key, idx::OUTPUT_TOKENS, Obs::Value(r.output_tokens as f64), &mut out);
                    if !r.finish_reason.is_empty() {
                        self.feed(key, idx::FINISH_REASON_MIX, Obs::Category(&r.finish_reason), &mut out);
                    }
                    if let Some(refused) = r.refused {
                        self.feed(key, idx::REFUSAL_RATE, Obs::Flag(refused), &mut out);
                    }
                    self.feed(key, idx::TOOL_CALL_RATE, Obs::Flag(!r.tool_calls.is_empty()), &mut out);
                    self.feed(key, idx::TOOL_PATH_MIX, Obs::Category(&path), &mut out);
                }
                if !r.model.is_empty() {
                    self.note_model(&r.app, &r.model);
                    if let Some(app) = keys[1] {
                        self.feed(app, idx::MODEL_MIX, Obs::Category(&r.model), &mut out);
                    }
                }
            }
            Input::Verdict(v) => {
                if !v.error.is_empty() {
                    return out;
                }
                let keys = [
                    self.key_id(&v.app, &v.route, &v.request_model, &v.judge),
                    self.key_id(&v.app, "*", "*", &v.judge),
                ];
                for key in keys.into_iter().flatten() {
                    self.feed(key, idx::JUDGE_PASS_RATE, Obs::Flag(v.passed == 1), &mut out);
                    if v.judge_kind == "llm" {
                        self.feed(key, idx::JUDGE_SCORE, Obs::Value(v.score), &mut out);
                        self.feed(key, idx::NEEDS_REVIEW_RATE, Obs::Flag(v.needs_review == 1), &mut out);
                    }
                }
                let Some(app_key) = keys[1] else { return out };
                let entry = self.recent.entry(v.trace_id.clone()).or_default();
                if entry.is_empty() {
                    self.recent_order.push_back(v.trace_id.clone());
                    if self.recent_order.len() > 100_000 {
                        if let Some(old) = self.recent_order.pop_front() {
                            self.recent.remove(&old);
                        }
                    }
                }
                if let Some(e) = self.recent.get_mut(&v.trace_id) {
                    e.push((app_key, v.passed == 1));
                }
            }
            Input::Feedback(f) => {
                let Some(verdicts) = self.recent.get(&f.trace_id).cloned() else { return out };
                let human = human_pass(f);
                for (key, passed) in verdicts {
                    self.feed(key, idx::JUDGE_HUMAN_AGREEMENT, Obs::Flag(passed == human), &mut out);
                }
            }
        }
        out
    }

    /// The id of a key, allocating one on first sight; `None` once `max_detectors` keys
    /// are tracked (the observation is counted as untracked).
    fn key_id(&mut self, app: &str, route: &str, model: &str, judge: &str) -> Option<u32> {
        self.scratch.clear();
        for (i, part) in [app, route, model, judge].into_iter().enumerate() {
            if i > 0 {
                self.scratch.push('\u{1f}');
            }
            self.scratch.push_str(part);
        }
        if let Some(&id) = self.key_ids.get(self.scratch.as_str()) {
            return Some(id);
        }
        if self.keys.len() >= self.cfg.max_detectors {
            self.stats.untracked += 1;
            return None;
        }
        let id = self.keys.len() as u32;
        self.key_ids.insert(self.scratch.clone(), id);
        self.keys.push(Key { app: app.into(), route: route.into(), model: model.into(), judge: judge.into() });
        self.detectors.push((0..SIGNALS.len()).map(|_| None).collect());
        Some(id)
    }

    fn feed(&mut self, key: u32, idx: usize, obs: Obs<'_>, out: &mut Vec<DriftEventRecord>) {
        let Some(cfg) = &self.configs[idx] else { return };
        self.stats.observations += 1;
        let Some(slot) = self.detectors.get_mut(key as usize).and_then(|d| d.get_mut(idx)) else { return };
        if slot.is_none() {
            if self.stats.detectors as usize >= self.cfg.max_detectors {
                self.stats.untracked += 1;
                return;
            }
            *slot = Some(Detector::new(SIGNALS[idx].kind, cfg.clone()));
            self.stats.detectors += 1;
        }
        let Some(t) = slot.as_mut().and_then(|d| d.observe(obs)) else { return };
        let key = self.keys[key as usize].clone();
        out.push(self.event(&key, &SIGNALS[idx], &t));
        self.stats.events += 1;
    }

    /// The control surface of a detector that starts firing, from what else fires for the
    /// same app.
    fn surface(&self, key: &Key, s: &Signal) -> Surface {
        if !s.quality {
            return s.surface;
        }
        let model_moved = self.model_switched(&key.app)
            || self
                .active
                .values()
                .any(|a| a.key.app == key.app && signal(a.signal).is_some_and(|(_, x)| x.surface == Surface::Model));
        if model_moved {
            Surface::Model
        } else {
            s.surface
        }
    }

    fn event(&mut self, key: &Key, s: &'static Signal, t: &Transition) -> DriftEventRecord {
        let akey = (key.clone(), s.name);
        let severity = match t.severity {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        };
        let surface = if t.firing {
            let surface = self.surface(key, s);
            self.active.insert(akey, Active { key: key.clone(), signal: s.name, surface, severity });
            surface
        } else {
            self.active.remove(&akey).map_or(s.surface, |a| a.surface)
        };
        DriftEventRecord {
            ts: Timestamp::now(),
            signal: s.name.to_owned(),
            app: key.app.clone(),
            route: key.route.clone(),
            model: key.model.clone(),
            judge: key.judge.clone(),
            method: t.method.to_owned(),
            statistic: finite(t.statistic),
            threshold: finite(t.threshold),
            baseline_n: t.baseline_n,
            current_n: t.current_n,
            baseline_value: finite(t.baseline_value),
            current_value: finite(t.current_value),
            severity: severity.to_owned(),
            state: if t.firing { "firing" } else { "resolved" }.to_owned(),
            control_surface: surface.as_str().to_owned(),
        }
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn call(app: &str, model: &str, cost: f64, latency: f64) -> Input {
        Input::Call(Box::new(CallObs::from(&TraceRecord {
            app: app.into(),
            route: "openai".into(),
            request_model: model.into(),
            response_model: model.into(),
            cost_usd: cost,
            duration_ms: latency,
            input_tokens: 100,
            output_tokens: 50,
            finish_reason: "stop".into(),
            output_text: "ok".into(),
            ..TraceRecord::default()
        })))
    }

    fn verdict(app: &str, model: &str, passed: bool, trace: &str) -> Input {
        Input::Verdict(Box::new(ScoreRecord {
            trace_id: trace.into(),
            judge: "cites_plan".into(),
            judge_kind: "rule".into(),
            app: app.into(),
            route: "openai".into(),
            request_model: model.into(),
            passed: u8::from(passed),
            score: f64::from(u8::from(passed)),
            ..ScoreRecord::default()
        }))
    }

    fn firing(events: &[DriftEventRecord]) -> Vec<(String, String, String)> {
        events
            .iter()
            .filter(|e| e.state == "firing")
            .map(|e| (e.signal.clone(), e.model.clone(), e.control_surface.clone()))
            .collect()
    }

    #[test]
    fn quality_drop_with_steady_model_points_at_the_prompt() {
        let mut e = DriftEngine::new(DriftConfig::default());
        let mut r = rng(7);
        let mut events = Vec::new();
        for i in 0..4000 {
            let lat = 800.0 * (1.0 + 0.2 * (r() - 0.5));
            events.extend(e.observe(&call("bot", "gpt-4o", 0.001, lat)));
            let p = if i < 2000 { 0.9 } else { 0.75 };
            events.extend(e.observe(&verdict("bot", "gpt-4o", r() < p, &format!("t{i}"))));
        }
        let f = firing(&events);
        assert!(!f.is_empty());
        assert!(f.iter().all(|(s, _, c)| s == "judge_pass_rate" && c == "prompt"), "{f:?}");
    }

    #[test]
    fn cost_jump_with_steady_quality_points_at_the_model() {
        let mut e = DriftEngine::new(DriftConfig::default());
        let mut r = rng(11);
        let mut events = Vec::new();
        for i in 0..4000 {
            let cost = if i < 2000 { 0.001 } else { 0.003 } * (1.0 + 0.1 * (r() - 0.5));
            events.extend(e.observe(&call("bot", "gpt-4o", cost, 800.0 * (1.0 + 0.2 * (r() - 0.5)))));
            events.extend(e.observe(&verdict("bot", "gpt-4o", r() < 0.9, &format!("t{i}"))));
        }
        let f = firing(&events);
        assert!(f.iter().any(|(s, _, c)| s == "cost_per_call" && c == "model"), "{f:?}");
        assert!(f.iter().all(|(s, _, c)| c == "model" && s != "judge_pass_rate"), "{f:?}");
    }

    #[test]
    fn quality_drop_with_a_model_switch_points_at_the_model() {
        let mut e = DriftEngine::new(DriftConfig::default());
        let mut r = rng(3);
        let mut events = Vec::new();
        for i in 0..4000 {
            let (model, p) = if i < 2000 { ("gpt-4o", 0.9) } else { ("gpt-4o-mini", 0.7) };
            events.extend(e.observe(&call("bot", model, 0.001, 800.0)));
            events.extend(e.observe(&verdict("bot", model, r() < p, &format!("t{i}"))));
        }
        let f = firing(&events);
        assert!(f.iter().any(|(s, _, c)| s == "model_mix" && c == "model"), "{f:?}");
        let quality: Vec<_> = f.iter().filter(|(s, m, _)| s == "judge_pass_rate" && m == "*").collect();
        assert!(!quality.is_empty() && quality.iter().all(|(_, _, c)| c == "model"), "{f:?}");
    }

    #[test]
    fn falling_agreement_points_at_the_intent_and_judge() {
        let mut e = DriftEngine::new(DriftConfig::default());
        let mut r = rng(5);
        let mut events = Vec::new();
        for i in 0..4000 {
            let t = format!("t{i}");
            let passed = r() < 0.9;
            events.extend(e.observe(&verdict("bot", "gpt-4o", passed, &t)));
            // Humans agree 95% of the time, then 70%.
            let agree = r() < if i < 2000 { 0.95 } else { 0.7 };
            let human = if agree { passed } else { !passed };
            events.extend(e.observe(&Input::Feedback(Box::new(FeedbackRecord {
                trace_id: t,
                name: "thumbs".into(),
                value: if human { 1.0 } else { 0.0 },
                ..FeedbackRecord::default()
            }))));
        }
        let f = firing(&events);
        assert!(f.iter().any(|(s, _, c)| s == "judge_human_agreement" && c == "intent_judge"), "{f:?}");
        assert!(f.iter().all(|(s, _, _)| s == "judge_human_agreement"), "{f:?}");
    }

    #[test]
    fn signal_indices_name_their_signals() {
        let named = [
            (idx::ERROR_RATE, "error_rate"),
            (idx::LATENCY_MS, "latency_ms"),
            (idx::TTFT_MS, "ttft_ms"),
            (idx::COST_PER_CALL, "cost_per_call"),
            (idx::INPUT_TOKENS, "input_tokens"),
            (idx::OUTPUT_TOKENS, "output_tokens"),
            (idx::FINISH_REASON_MIX, "finish_reason_mix"),
            (idx::REFUSAL_RATE, "refusal_rate"),
            (idx::MODEL_MIX, "model_mix"),
            (idx::TOOL_CALL_RATE, "tool_call_rate"),
            (idx::TOOL_PATH_MIX, "tool_path_mix"),
            (idx::JUDGE_PASS_RATE, "judge_pass_rate"),
            (idx::JUDGE_SCORE, "judge_score"),
            (idx::NEEDS_REVIEW_RATE, "needs_review_rate"),
            (idx::JUDGE_HUMAN_AGREEMENT, "judge_human_agreement"),
        ];
        assert_eq!(named.len(), SIGNALS.len());
        for (i, name) in named {
            assert_eq!(SIGNALS[i].name, name);
        }
    }

    #[test]
    fn bad_signal_names_are_config_errors() {
        let mut cfg = DriftConfig::default();
        cfg.signals.insert("vibes".into(), SignalOverride::default());
        let (k, _, r) = cfg.validate().unwrap_err();
        assert_eq!(k, "drift.signals.vibes");
        assert!(r.starts_with("unknown signal; known: error_rate, latency_ms"), "{r}");
    }

    #[test]
    fn latency_cost_and_tokens_need_a_tenth_to_fire_and_judge_scores_do_not() {
        let cfg = DriftConfig::default();
        let floor = |name: &str| cfg.detector_config(signal(name).unwrap().1).unwrap().min_relative_shift;
        for name in ["latency_ms", "ttft_ms", "cost_per_call", "input_tokens", "output_tokens"] {
            assert_eq!(floor(name), 0.1, "{name}");
        }
        assert_eq!(floor("judge_score"), 0.0);
        let cap = |name: &str| cfg.detector_config(signal(name).unwrap().1).unwrap().critical_relative_shift;
        assert_eq!((cap("latency_ms"), cap("cost_per_call"), cap("judge_score")), (0.5, 0.5, 0.0));
        let mut cfg = DriftConfig::default();
        cfg.signals
            .insert("cost_per_call".into(), SignalOverride { min_relative_shift: Some(0.02), ..Default::default() });
        assert_eq!(cfg.detector_config(signal("cost_per_call").unwrap().1).unwrap().min_relative_shift, 0.02);
        cfg.signals.insert("ttft_ms".into(), SignalOverride { min_relative_shift: Some(-0.1), ..Default::default() });
        let (k, v, r) = cfg.validate().unwrap_err();
        assert_eq!((k.as_str(), v.as_str()), ("drift.signals.ttft_ms.min_relative_shift", "-0.1"));
        assert!(r.starts_with("must be 0 or more"), "{r}");
    }
}
