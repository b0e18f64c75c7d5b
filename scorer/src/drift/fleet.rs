//! The ClickHouse source: the same signals, windows and decisions as the in-memory engine,
//! computed from SQL aggregates over the whole fleet's rows, so N sidecars are judged as one.
//!
//! Design notes
//! - Each poll runs one query per signal. The query expands every row to its keys (app,
//!   route, model, judge) and (app, `*`, `*`, judge), ranks each key's observations newest
//!   first, and takes the same count-based windows as [`super::detect::Detector`]: the
//!   current window is the newest `current_window` observations, the baseline the
//!   `baseline_max` before them. Only aggregates leave ClickHouse: counts and hits for
//!   rates, baseline-quantile bin counts, the KS statistic and medians for numeric values,
//!   per-category counts for mixes, and the flags that arrived since the last poll (for
//!   the CUSUM).
//! - [`WindowStats`] is computed from those aggregates with the functions the in-memory
//!   detector uses, so both sources give the same statistics on the same observations
//!   (`proxy/tests/clickhouse.rs` checks it on the real engine).
//! - While a key fires, its baseline is pinned to the observations before the window that
//!   fired (the in-memory detector freezes its baseline the same way), so the alarm cannot
//!   teach itself the new normal. It resolves when the resolution test stays calm over a
//!   whole window of new observations, or rebaselines after `rebaseline_after` of them.
//! - Differences from the in-memory source, by design: no admission hold (the window is
//!   recomputed each poll, not learned online), the numeric CUSUM is not run (a numeric
//!   shift is caught by PSI or KS at the next poll), and mixes with more labels than
//!   `max_categories` keep the most frequent ones and lump the rest into `(other)`.
//! - Rows are read up to `settle_secs` ago, so rows a sidecar ships a little late are still
//!   counted by the CUSUM when their turn comes.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use llmtap_ingest::record::DriftEventRecord;
use llmtap_ingest::sink::clickhouse::service::quote;
use serde::{Deserialize, Serialize};

use super::detect::{
    bad_side, capped_severity, mix_decision, rate_increment, rate_severity, shift_is_material, BadDirection,
    DetectorConfig, Severity, SignalKind, Transition, WindowStats,
};
use super::engine::{signal, DriftEngine, Key, SIGNALS};
use super::stats;

/// `[drift.clickhouse]`: how the ClickHouse source polls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// Seconds between polls.
    pub poll_interval_secs: u64,
    /// How far back rows are read: the longest a baseline can reach.
    pub lookback_secs: u64,
    /// Rows newer than this are left for the next poll (shipping delay).
    pub settle_secs: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig { poll_interval_secs: 60, lookback_secs: 7 * 86_400, settle_secs: 10 }
    }
}

/// Far future, for "not pinned".
const UNPINNED: i64 = i64::MAX;
/// Separates the parts of a key in SQL (`\x1f`, the unit separator).
const SEP: char = '\u{1f}';

fn key_string(k: &Key) -> String {
    format!("{}{SEP}{}{SEP}{}{SEP}{}", k.app, k.route, k.model, k.judge)
}

/// The observations of one signal as SQL: columns `a, r, m, j` (the key), `t` (ms), `id`
/// (a tie-breaker) and `x` (Float64 for rates and values, String for labels).
fn observations(name: &str, db: &str, from_ms: i64, upto_ms: i64) -> Option<String> {
    let between = |col: &str| {
        format!("{col} >= fromUnixTimestamp64Milli({from_ms}) AND {col} <= fromUnixTimestamp64Milli({upto_ms})")
    };
    let window = between("ts");
    let calls = |x: &str, cond: &str, per_model: bool| {
        let keys = if per_model {
            "[(route, if(response_model = '', request_model, response_model)), ('*', '*')]"
        } else {
            "[('*', '*')]"
        };
        format!(
            "SELECT app AS a, k.1 AS r, k.2 AS m, '' AS j, toUnixTimestamp64Milli(ts) AS t, \
             concat(trace_id, span_id) AS id, {x} AS x FROM {db}.llm_traces ARRAY JOIN {keys} AS k \
             WHERE {window} AND NOT mapContains(tags, {tag}) AND {cond}",
            tag = quote(crate::llm::JUDGE_TAG),
        )
    };
    let ok = "error_kind = ''";
    let verdicts = |x: &str, cond: &str| {
        format!(
            "SELECT app AS a, k.1 AS r, k.2 AS m, judge AS j, toUnixTimestamp64Milli(ts) AS t, \
             concat(trace_id, judge) AS id, {x} AS x FROM {db}.llm_scores FINAL \
             ARRAY JOIN [(route, request_model), ('*', '*')] AS k WHERE {window} AND error = '' AND {cond}"
        )
    };
    let refusals: Vec<String> = crate::rule::REFUSALS.iter().map(|p| quote(p)).collect();
    let pass_labels: Vec<String> = crate::report::PASS_LABELS.iter().map(|p| quote(p)).collect();
    Some(match name {
        "error_rate" => calls("toFloat64(error_kind != '')", "1", true),
        "latency_ms" => calls("duration_ms", ok, true),
        "ttft_ms" => calls("ttft_ms", "error_kind = '' AND streamed AND ttft_ms > 0", true),
        "cost_per_call" => calls("cost_usd", ok, true),
        "input_tokens" => calls("toFloat64(input_tokens)", ok, true),
        "output_tokens" => calls("toFloat64(output_tokens)", ok, true),
        "finish_reason_mix" => calls("toString(finish_reason)", "error_kind = '' AND finish_reason != ''", true),
        "refusal_rate" => calls(
            &format!("toFloat64(multiSearchAny(lowerUTF8(output_text), [{}]))", refusals.join(", ")),
            "error_kind = '' AND output_text != ''",
            true,
        ),
        "model_mix" => calls("if(response_model = '', request_model, response_model)", "x != ''", false),
        "tool_call_rate" => calls("toFloat64(notEmpty(tool_calls))", ok, true),
        "tool_path_mix" => calls("if(empty(tool_calls), '(none)', arrayStringConcat(tool_calls, '>'))", ok, true),
        "judge_pass_rate" => verdicts("toFloat64(passed)", "1"),
        "judge_score" => verdicts("score", "judge_kind = 'llm'"),
        "needs_review_rate" => verdicts("toFloat64(needs_review)", "judge_kind = 'llm'"),
        "judge_human_agreement" => format!(
            "SELECT s.app AS a, '*' AS r, '*' AS m, s.judge AS j, toUnixTimestamp64Milli(f.ts) AS t, \
             concat(f.trace_id, f.name, s.judge) AS id, \
             toFloat64(s.passed = if(f.label = '', f.value > 0, lower(f.label) IN ({labels}))) AS x \
             FROM {db}.llm_feedback AS f INNER JOIN \
             (SELECT trace_id, app, judge, passed FROM {db}.llm_scores FINAL WHERE error = '') AS s \
             ON f.trace_id = s.trace_id WHERE {window}",
            labels = pass_labels.join(", "),
            window = between("f.ts"),
        ),
        _ => return None,
    })
}

/// The windowing every signal shares: rank each key's observations newest first and mark
/// the current window (`cur`), the baseline (`base`, pinned before `pin` while firing) and
/// the observations since the last poll (`t > cursor`).
fn windowed(obs: &str, cfg: &DetectorConfig, pins: &[(String, i64)], bounds: &[(String, i64)]) -> String {
    let (w, b) = (cfg.current_window, cfg.baseline_max);
    let per_key = |list: &[(String, i64)], default: i64| {
        if list.is_empty() {
            return format!("toInt64({default})");
        }
        let keys: Vec<String> = list.iter().map(|(k, _)| quote(k)).collect();
        let at: Vec<String> = list.iter().map(|(_, t)| format!("toInt64({t})")).collect();
        format!(
            "transform(concat(a, '\\x1f', r, '\\x1f', m, '\\x1f', j), [{}], [{}], toInt64({default}))",
            keys.join(", "),
            at.join(", ")
        )
    };
    let (pin, bound) = (per_key(pins, UNPINNED), per_key(bounds, 0));
    let keep = if bounds.is_empty() { String::new() } else { format!(" WHERE t >= {bound}") };
    format!(
        "SELECT *, rn <= {w} AS cur, rn > {w} AND t < pin AND brn <= {b} + if(pin = {UNPINNED}, {w}, 0) AS base \
         FROM (SELECT *, \
           row_number() OVER (PARTITION BY a, r, m, j ORDER BY t DESC, id DESC) AS rn, \
           row_number() OVER (PARTITION BY a, r, m, j, t < pin ORDER BY t DESC, id DESC) AS brn \
         FROM (SELECT *, {pin} AS pin FROM ({obs}){keep}))"
    )
}

/// The query of one signal, or `None` for an unknown name.
pub fn signal_query(
    name: &str,
    db: &str,
    cfg: &DetectorConfig,
    window_ms: (i64, i64),
    cursor: i64,
    pins: &[(String, i64)],
    bounds: &[(String, i64)],
) -> Option<String> {
    let (_, s) = signal(name)?;
    let win = windowed(&observations(name, db, window_ms.0, window_ms.1)?, cfg, pins, bounds);
    let common = format!(
        "countIf(cur) AS cn, countIf(base) AS bn, countIf(t > {cursor}) AS new_n, \
         minIf(t, cur) AS cur_start, max(t) AS last_t, minIf(t, cur OR base) AS first_t"
    );
    let rows = format!("FROM ({win}) WHERE cur OR base OR t > {cursor} GROUP BY a, r, m, j");
    let mut sql = String::new();
    match s.kind {
        SignalKind::Rate => {
            let _ = write!(
                sql,
                "SELECT a, r, m, j, {common}, toUInt64(sumIf(x, cur)) AS chits, toUInt64(sumIf(x, base)) AS bhits, \
                 arrayMap(p -> toUInt8(p.3), arraySort(groupArrayIf((t, id, x), t > {cursor}))) AS new_flags {rows}"
            );
        }
        SignalKind::Numeric => {
            // Edges at the baseline's nearest-rank quantiles, duplicates collapsed, plus a
            // bin below the minimum when the first edge is the minimum: the rule of
            // `stats::quantile_edges_sorted` and `stats::bin_index`, in SQL.
            let p = cfg.psi_bins.max(2);
            let bin = "arrayCount(e -> e < v, e0) + (low AND v >= bs[1])";
            let median = |a: &str| {
                format!(
                    "if(length({a}) = 0, nan, if(length({a}) % 2 = 1, {a}[intDiv(length({a}), 2) + 1], \
                     ({a}[intDiv(length({a}), 2)] + {a}[intDiv(length({a}), 2) + 1]) / 2))"
                )
            };
            let _ = write!(
                sql,
                "SELECT a, r, m, j, cn, bn, new_n, cur_start, last_t, first_t, \
                   arrayMap(i -> countEqual(arrayMap(v -> {bin}, bs), i), range(nbins)) AS base_bins, \
                   arrayMap(i -> countEqual(arrayMap(v -> {bin}, cs), i), range(nbins)) AS cur_bins, \
                   {bmed} AS base_median, {cmed} AS cur_median, base_mean, cur_mean, \
                   arrayMax(arrayMap((q, i) -> if(i = length(mg) OR mg[i + 1].1 != q.1, \
                     abs(cb[i] / greatest(bn, 1) - cc[i] / greatest(cn, 1)), 0), mg, arrayEnumerate(mg))) AS ks_d \
                 FROM (SELECT *, \
                   if(length(bs) = 0, [], arrayDistinct(arrayMap(i -> bs[intDiv(i * length(bs) + {p} - 1, {p})], range(1, {p})))) AS e0, \
                   length(e0) > 0 AND e0[1] <= bs[1] AS low, \
                   length(e0) + 1 + low AS nbins, \
                   arraySort(arrayConcat(arrayMap(v -> (v, 0), bs), arrayMap(v -> (v, 1), cs))) AS mg, \
                   arrayCumSum(arrayMap(q -> toUInt64(q.2 = 0), mg)) AS cb, \
                   arrayCumSum(arrayMap(q -> toUInt64(q.2 = 1), mg)) AS cc \
                 FROM (SELECT a, r, m, j, {common}, arraySort(groupArrayIf(x, base)) AS bs, \
                   arraySort(groupArrayIf(x, cur)) AS cs, avgIf(x, base) AS base_mean, avgIf(x, cur) AS cur_mean {rows}))",
                bmed = median("bs"),
                cmed = median("cs"),
            );
        }
        SignalKind::Categorical => {
            let _ = write!(
                sql,
                "SELECT a, r, m, j, sum(xc) AS cn, sum(xb) AS bn, sum(xn) AS new_n, \
                   minIf(xs, xc > 0) AS cur_start, max(xt) AS last_t, minIf(xf, xc + xb > 0) AS first_t, \
                   groupArray((x, xb, xc)) AS cats \
                 FROM (SELECT a, r, m, j, x, countIf(cur) AS xc, countIf(base) AS xb, countIf(t > {cursor}) AS xn, \
                   minIf(t, cur) AS xs, max(t) AS xt, minIf(t, cur OR base) AS xf {rows}, x) GROUP BY a, r, m, j"
            );
        }
    }
    Some(sql)
}

/// One row of a signal's query (JSONEachRow, 64-bit integers unquoted).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct FleetRow {
    pub a: String,
    pub r: String,
    pub m: String,
    pub j: String,
    pub cn: u64,
    pub bn: u64,
    pub new_n: u64,
    pub cur_start: i64,
    pub last_t: i64,
    /// The oldest observation either window used.
    pub first_t: i64,
    pub chits: u64,
    pub bhits: u64,
    pub new_flags: Vec<u8>,
    pub base_bins: Vec<u64>,
    pub cur_bins: Vec<u64>,
    pub base_median: Option<f64>,
    pub cur_median: Option<f64>,
    pub base_mean: Option<f64>,
    pub cur_mean: Option<f64>,
    pub ks_d: Option<f64>,
    pub cats: Vec<(String, u64, u64)>,
}

impl FleetRow {
    pub fn key(&self) -> Key {
        Key { app: self.a.clone(), route: self.r.clone(), model: self.m.clone(), judge: self.j.clone() }
    }

    /// The window statistics, computed from the aggregates as the in-memory detector
    /// computes them from its windows.
    pub fn stats(&self, kind: SignalKind, max_categories: usize) -> WindowStats {
        match kind {
            SignalKind::Rate => WindowStats::rate(self.bhits, self.bn, self.chits, self.cn),
            SignalKind::Numeric => {
                let d = if self.bn == 0 || self.cn == 0 { 0.0 } else { self.ks_d.unwrap_or(0.0) };
                WindowStats {
                    baseline_n: self.bn,
                    current_n: self.cn,
                    baseline_value: self.base_median.unwrap_or(f64::NAN),
                    current_value: self.cur_median.unwrap_or(f64::NAN),
                    psi: stats::psi_from_counts(&self.base_bins, &self.cur_bins),
                    ks_d: d,
                    ks_p: stats::ks_p_value(d, self.bn as usize, self.cn as usize),
                    chi2_p: 1.0,
                    ..Default::default()
                }
            }
            SignalKind::Categorical => {
                let mut cats = self.cats.clone();
                cats.retain(|c| c.1 + c.2 > 0);
                if cats.len() > max_categories.max(1) {
                    // Keep the most frequent labels; the rest share one slot.
                    cats.sort_by(|x, y| (y.1 + y.2).cmp(&(x.1 + x.2)).then_with(|| x.0.cmp(&y.0)));
                    let rest = cats.split_off(max_categories.max(1) - 1);
                    let other = rest.iter().fold((0, 0), |acc, c| (acc.0 + c.1, acc.1 + c.2));
                    cats.push(("(other)".into(), other.0, other.1));
                }
                cats.sort_by(|x, y| x.0.cmp(&y.0));
                let names: Vec<String> = cats.iter().map(|c| c.0.clone()).collect();
                let base: Vec<u64> = cats.iter().map(|c| c.1).collect();
                let cur: Vec<u64> = cats.iter().map(|c| c.2).collect();
                WindowStats::categorical(&names, &base, &cur)
            }
        }
    }

    fn mean_direction(&self) -> f64 {
        match (self.base_median, self.cur_median) {
            (Some(b), Some(c)) if c != b => c - b,
            _ => self.cur_mean.unwrap_or(0.0) - self.base_mean.unwrap_or(0.0),
        }
    }
}

/// An open episode of one key.
#[derive(Clone, Debug)]
struct Episode {
    /// New observations since the alarm.
    age: u64,
    /// New observations since the resolution test became calm.
    calm: Option<u64>,
}

/// The decision state of one (key, signal) between polls.
#[derive(Clone, Debug, Default)]
struct FleetDetector {
    episode: Option<Episode>,
    /// The baseline ends before this (ms) while firing.
    pin: Option<i64>,
    cusum_up: f64,
    cusum_down: f64,
}

fn sign(x: f64) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}

fn bad(dir: BadDirection, direction: i8) -> bool {
    match dir {
        BadDirection::Up => direction > 0,
        BadDirection::Down => direction < 0,
        BadDirection::Both => direction != 0,
    }
}

impl FleetDetector {
    /// One poll's row; a transition when the firing state changes.
    fn poll(&mut self, kind: SignalKind, cfg: &DetectorConfig, row: &FleetRow) -> Option<Transition> {
        let st = row.stats(kind, cfg.max_categories);
        let armed = row.bn as usize >= cfg.min_baseline.max(1) && row.cn as usize >= cfg.current_window.max(1);
        // Windowed tests: (fire, calm, resolve stat, resolve threshold, direction, severity).
        let (fire, calm, resolve, direction, severity) = match kind {
            SignalKind::Rate => {
                let bad_z = bad_side(cfg.bad_direction, st.z);
                let severity = rate_severity(cfg, (row.bhits, row.bn), (row.chits, row.cn));
                (
                    cfg.z_fire.filter(|&t| bad_z >= t).map(|t| ("z_test", bad_z, t)),
                    bad_z < cfg.z_resolve,
                    ("z_test", bad_z, cfg.z_resolve),
                    sign(st.current_value - st.baseline_value),
                    severity,
                )
            }
            SignalKind::Numeric => {
                let direction = sign(row.mean_direction());
                let is_bad = bad(cfg.bad_direction, direction);
                let mut fire = None;
                if is_bad {
                    if let Some(t) = cfg.psi_fire.filter(|&t| st.psi >= t) {
                        fire = Some(("psi", st.psi, t));
                    } else if let Some(alpha) = cfg.ks_fire_p.filter(|&a| st.ks_p <= a) {
                        fire = Some(("ks", st.ks_d, stats::ks_critical_d(alpha, row.bn as usize, row.cn as usize)));
                    }
                    let nan = f64::NAN;
                    let medians = (row.base_median.unwrap_or(nan), row.cur_median.unwrap_or(nan));
                    let means = (row.base_mean.unwrap_or(nan), row.cur_mean.unwrap_or(nan));
                    if fire.is_some() && !shift_is_material(cfg.min_relative_shift, medians, means) {
                        fire = None;
                    }
                }
                // PSI near 1 is about a one-sd shift, where the in-memory detector's
                // normal-score severity turns critical.
                let severity = if st.psi >= 1.0 { Severity::Critical } else { Severity::Warning };
                let severity =
                    capped_severity(severity, cfg.critical_relative_shift, (st.baseline_value, st.current_value));
                let calm = st.psi < cfg.psi_resolve || (!is_bad && cfg.bad_direction != BadDirection::Both);
                (fire, calm, ("psi", st.psi, cfg.psi_resolve), direction, severity)
            }
            SignalKind::Categorical => {
                let (fire, calm, severity) = mix_decision(cfg, st.js, st.chi2_p);
                (fire, calm, ("js", st.js, cfg.js_resolve), sign(st.current_value - st.baseline_value), severity)
            }
        };
        let transition =
            |firing: bool, (method, statistic, threshold): (&'static str, f64, f64), direction: i8| Transition {
                firing,
                method,
                statistic,
                threshold,
                baseline_n: st.baseline_n,
                current_n: st.current_n,
                baseline_value: st.baseline_value,
                current_value: st.current_value,
                severity,
                direction,
                category: st.category.clone(),
            };

        if let Some(ep) = self.episode.as_mut() {
            ep.age += row.new_n;
            ep.calm = if calm { Some(ep.calm.map_or(0, |c| c + row.new_n)) } else { None };
            let method = if ep.age >= cfg.rebaseline_after as u64 {
                Some("rebaseline")
            } else if ep.calm.is_some_and(|c| c >= cfg.current_window as u64) {
                Some(resolve.0)
            } else {
                None
            };
            let method = method?;
            *self = FleetDetector::default();
            return Some(transition(false, (method, resolve.1, resolve.2), direction));
        }
        if !armed {
            self.cusum_up = 0.0;
            self.cusum_down = 0.0;
            return None;
        }
        // The CUSUM over the flags since the last poll, against the baseline rate.
        let mut cusum = None;
        if let (SignalKind::Rate, Some(h)) = (kind, cfg.cusum_h) {
            let (n, hits) = (row.bn as f64, row.bhits as f64);
            let up = matches!(cfg.bad_direction, BadDirection::Up | BadDirection::Both);
            let down = matches!(cfg.bad_direction, BadDirection::Down | BadDirection::Both);
            for &f in &row.new_flags {
                let hit = f == 1;
                if up {
                    self.cusum_up = stats::cusum_update(self.cusum_up, rate_increment(cfg, hits, n, hit));
                }
                if down {
                    self.cusum_down = stats::cusum_update(self.cusum_down, rate_increment(cfg, n - hits, n, !hit));
                }
                let (sum, dir) =
                    if self.cusum_up >= self.cusum_down { (self.cusum_up, 1) } else { (self.cusum_down, -1) };
                if sum >= h {
                    cusum = Some((("cusum", sum, h), dir));
                    break;
                }
            }
        }
        let (method, direction) = match (cusum, fire) {
            (Some(c), _) => c,
            (None, Some(f)) => (f, direction),
            (None, None) => return None,
        };
        self.episode = Some(Episode { age: 0, calm: None });
        self.pin = Some(row.cur_start);
        self.cusum_up = 0.0;
        self.cusum_down = 0.0;
        Some(transition(true, method, direction))
    }
}

/// The ClickHouse source's state: one decision state per (key, signal), the poll cursors,
/// and the engine that names control surfaces and tracks what fires.
pub struct FleetEngine {
    pub engine: DriftEngine,
    pub cfg: FleetConfig,
    detectors: HashMap<(Key, usize), FleetDetector>,
    /// Per signal: the newest observation (ms) already seen; `None` before the first poll.
    cursors: Vec<Option<i64>>,
    /// Window statistics of the last poll, for `llmtap drift --stats`.
    pub last_stats: BTreeMap<(Key, &'static str), WindowStats>,
    /// Per signal, per key with a full baseline: the oldest observation its windows used
    /// last poll. Windows only move forward, so older rows are never needed again and the
    /// next poll ranks only what is newer (see `queries`). The flag: every key had a full
    /// baseline, so nothing older than the oldest bound needs reading at all.
    bounds: Vec<(Vec<(String, i64)>, bool)>,
}

/// The order signals are polled in: whatever can say "the model moved" comes before the
/// quality signals, so their control surface sees it in the same poll.
fn poll_order() -> Vec<usize> {
    let mut order: Vec<usize> = (0..SIGNALS.len()).collect();
    order.sort_by_key(|&i| SIGNALS[i].quality);
    order
}

impl FleetEngine {
    pub fn new(engine: DriftEngine, cfg: FleetConfig) -> Self {
        FleetEngine {
            engine,
            cfg,
            detectors: HashMap::new(),
            cursors: vec![None; SIGNALS.len()],
            last_stats: BTreeMap::new(),
            bounds: vec![(Vec::new(), false); SIGNALS.len()],
        }
    }

    /// This poll's queries, `(signal index, SQL)`, in poll order, for rows up to `now_ms`
    /// minus the settle time.
    pub fn queries(&self, db: &str, now_ms: i64) -> Vec<(usize, String)> {
        let upto = now_ms - (self.cfg.settle_secs as i64) * 1000;
        let from = upto - (self.cfg.lookback_secs as i64) * 1000;
        poll_order()
            .into_iter()
            .filter_map(|i| {
                let cfg = self.engine.detector_config(i)?;
                let pins: Vec<(String, i64)> = self
                    .detectors
                    .iter()
                    .filter(|((_, s), _)| *s == i)
                    .filter_map(|((k, _), d)| d.pin.map(|p| (key_string(k), p)))
                    .collect();
                // Before the first poll nothing is "new": the CUSUM starts from now.
                let cursor = self.cursors[i].unwrap_or(upto);
                // Read from the oldest row any known key still needs; a key that appeared
                // since has only newer rows.
                let (bounds, all_full) = &self.bounds[i];
                let from = match bounds.iter().map(|b| b.1).min() {
                    Some(oldest) if *all_full => oldest.max(from),
                    _ => from,
                };
                signal_query(SIGNALS[i].name, db, cfg, (from, upto), cursor, &pins, bounds).map(|q| (i, q))
            })
            .collect()
    }

    /// Applies one signal's rows; returns the events.
    pub fn apply(&mut self, idx: usize, rows: &[FleetRow]) -> Vec<DriftEventRecord> {
        let mut out = Vec::new();
        let Some(cfg) = self.engine.detector_config(idx).cloned() else { return out };
        let s = &SIGNALS[idx];
        let mut newest = self.cursors[idx];
        if s.name == "model_mix" {
            let apps = rows.iter().filter(|r| r.bn > 0 && r.cats.iter().any(|c| c.1 == 0 && c.2 > 0));
            self.engine.set_models_appeared(apps.map(|r| r.a.clone()));
        }
        for row in rows {
            let key = row.key();
            newest = Some(newest.map_or(row.last_t, |n| n.max(row.last_t)));
            self.last_stats.insert((key.clone(), s.name), row.stats(s.kind, cfg.max_categories));
            let id = (key.clone(), idx);
            if !self.detectors.contains_key(&id) && self.detectors.len() >= self.engine.max_detectors() {
                self.engine.stats.untracked += 1;
                continue;
            }
            let d = self.detectors.entry(id).or_default();
            if let Some(t) = d.poll(s.kind, &cfg, row) {
                out.push(self.engine.transition_event(&key, idx, &t));
            }
        }
        self.cursors[idx] = newest.or(self.cursors[idx]);
        let full = |r: &&FleetRow| r.bn as usize >= cfg.baseline_max;
        self.bounds[idx] = (
            rows.iter().filter(full).map(|r| (key_string(&r.key()), r.first_t)).collect(),
            !rows.is_empty() && rows.iter().all(|r| full(&r)),
        );
        self.engine.stats.detectors = self.detectors.len() as u64;
        out
    }

    /// Marks `(key, signal)` as firing since `since_ms` (an event found in ClickHouse at
    /// start), so a restarted job neither fires it again nor forgets to resolve it.
    pub fn restore_firing(&mut self, key: Key, signal_name: &str, surface: &str, severity: &str, since_ms: i64) {
        let Some((idx, _)) = signal(signal_name) else { return };
        self.engine.restore_active(&key, idx, surface, severity);
        let d = self.detectors.entry((key, idx)).or_default();
        d.episode = Some(Episode { age: 0, calm: None });
        d.pin = Some(since_ms);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::drift::engine::{DriftConfig, SignalOverride};

    fn rate_row(bn: u64, bhits: u64, cn: u64, chits: u64, flags: Vec<u8>) -> FleetRow {
        FleetRow {
            a: "bot".into(),
            r: "*".into(),
            m: "*".into(),
            j: "cites_plan".into(),
            bn,
            bhits,
            cn,
            chits,
            new_n: flags.len() as u64,
            new_flags: flags,
            cur_start: 1000,
            last_t: 2000,
            ..Default::default()
        }
    }

    #[test]
    fn a_pass_rate_drop_fires_once_pins_the_baseline_and_resolves_after_a_calm_window() {
        let mut f = FleetEngine::new(DriftEngine::new(DriftConfig::default()), FleetConfig::default());
        let idx = signal("judge_pass_rate").unwrap().0;
        // Steady: 90% in both windows, nothing new.
        assert!(f.apply(idx, &[rate_row(5000, 4500, 500, 450, vec![])]).is_empty());
        // 200 new verdicts at 70%: the CUSUM fires.
        let flags: Vec<u8> = (0..200).map(|i| u8::from(i % 10 < 7)).collect();
        let ev = f.apply(idx, &[rate_row(5000, 4500, 500, 410, flags.clone())]);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].state.as_str(), ev[0].method.as_str(), ev[0].control_surface.as_str()),
            ("firing", "cusum", "prompt")
        );
        let pins: Vec<_> = f.queries("default", 10_000_000).into_iter().filter(|(i, _)| *i == idx).collect();
        assert!(pins[0].1.contains("transform(concat(a, '\\x1f', r"), "{}", pins[0].1);
        assert!(pins[0].1.contains("toInt64(1000)"));
        // Still low: no second event.
        assert!(f.apply(idx, &[rate_row(5000, 4500, 500, 350, flags)]).is_empty());
        // Back to 90%: calm over one poll of 300 new, then 200 more completes the window.
        assert!(f.apply(idx, &[FleetRow { new_n: 300, ..rate_row(5000, 4500, 500, 450, vec![]) }]).is_empty());
        let ev = f.apply(idx, &[FleetRow { new_n: 500, ..rate_row(5000, 4500, 500, 452, vec![]) }]);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].state.as_str(), ev[0].method.as_str()), ("resolved", "z_test"));
        assert!(f.engine.active().is_empty());
    }

    #[test]
    fn a_model_that_appears_makes_a_quality_drop_point_at_the_model() {
        let mut f = FleetEngine::new(DriftEngine::new(DriftConfig::default()), FleetConfig::default());
        let mix = signal("model_mix").unwrap().0;
        let pass = signal("judge_pass_rate").unwrap().0;
        let row = FleetRow {
            a: "bot".into(),
            r: "*".into(),
            m: "*".into(),
            bn: 5000,
            cn: 500,
            cats: vec![("gpt-4o".into(), 5000, 450), ("gpt-4o-mini".into(), 0, 50)],
            ..Default::default()
        };
        f.apply(mix, &[row]);
        let ev = f.apply(pass, &[rate_row(5000, 4500, 500, 300, vec![])]);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].method.as_str(), ev[0].control_surface.as_str()), ("z_test", "model"));
    }

    #[test]
    fn a_narrow_latency_fires_only_once_it_moved_by_a_tenth() {
        // Every current call lands in the baseline's top decile (PSI and KS far past their
        // thresholds): a shift the tests call certain, of 2% or of 20%.
        let row = |cur: f64| FleetRow {
            a: "bot".into(),
            r: "*".into(),
            m: "*".into(),
            bn: 5000,
            cn: 500,
            new_n: 500,
            base_bins: vec![500; 10],
            cur_bins: [vec![0; 9], vec![500]].concat(),
            base_median: Some(141.0),
            cur_median: Some(cur),
            base_mean: Some(141.2),
            cur_mean: Some(cur + 0.2),
            ks_d: Some(0.9),
            cur_start: 1000,
            last_t: 2000,
            ..Default::default()
        };
        let idx = signal("latency_ms").unwrap().0;
        let mut f = FleetEngine::new(DriftEngine::new(DriftConfig::default()), FleetConfig::default());
        assert!(f.apply(idx, &[row(143.8)]).is_empty(), "141 -> 143.8 ms is below the 10% floor");
        let ev = f.apply(idx, &[row(169.2)]);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0].state.as_str(), ev[0].method.as_str()), ("firing", "psi"));
        // PSI is far past 1 (critical by the tests alone), but the median moved 20%.
        assert_eq!(ev[0].severity, "warning");
        // With the floor at 0 the small move fires too.
        let mut cfg = DriftConfig::default();
        cfg.signals.insert("latency_ms".into(), SignalOverride { min_relative_shift: Some(0.0), ..Default::default() });
        let mut f = FleetEngine::new(DriftEngine::new(cfg), FleetConfig::default());
        assert_eq!(f.apply(idx, &[row(143.8)]).len(), 1);
    }

    #[test]
    fn queries_cover_every_signal_with_quality_last() {
        let f = FleetEngine::new(DriftEngine::new(DriftConfig::default()), FleetConfig::default());
        let q = f.queries("db", 1_700_000_000_000);
        assert_eq!(q.len(), SIGNALS.len());
        let first_quality = q.iter().position(|(i, _)| SIGNALS[*i].quality).unwrap();
        assert!(q[first_quality..].iter().all(|(i, _)| SIGNALS[*i].quality));
        assert!(q.iter().all(|(_, sql)| sql.contains("db.llm_")));
    }
}
