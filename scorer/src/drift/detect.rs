//! The per-(key, signal) drift detector: a state machine fed one observation at a time that
//! fires when current behaviour departs from a baseline learned online, and resolves with
//! hysteresis so alerts don't flap.
//!
//! # Windows
//!
//! Every observation first enters the *current window* (the last `current_window`
//! observations). What falls out of it joins the *baseline* (at most `baseline_max`
//! observations, optionally also bounded by age via [`Detector::observe_at`]). Windows are
//! counted in observations, not time, so the statistics have the same power whatever the
//! traffic rate. Nothing can fire until the current window is full and the baseline holds
//! `min_baseline` observations (the detector is then *armed*).
//!
//! # Methods
//!
//! * Rates ([`Obs::Flag`]): a Bernoulli CUSUM per bad direction (fast on step changes),
//!   plus a two-proportion z-test of the current window against the baseline (backup
//!   trigger and the resolution test).
//! * Numeric values ([`Obs::Value`]): a Gaussian CUSUM on mid-rank normal scores against
//!   the baseline (distribution-free, so latency tails or constant costs need no tuning),
//!   plus PSI over baseline-quantile bins and two-sample KS on the current window. PSI is
//!   the resolution test. Reported values are **medians**.
//! * Categorical mixes ([`Obs::Category`]): Jensen–Shannon distance of the current mix
//!   against the baseline mix, gated by a chi-square test of homogeneity so that the
//!   threshold means the same with 3 categories as with 60 (JS distance alone has a noise
//!   floor that grows with the number of categories). Reported values are the shares of
//!   the category whose share moved most.
//!
//! # Admission hold
//!
//! A shift too small to fire at once would otherwise leak into the baseline from the
//! moment it has been in the current window for `current_window` observations, and the
//! detector would slowly learn it as normal before it could fire. So at every windowed
//! check the detector also asks whether the current window looks *suspicious*: the
//! windowed statistic is at least `hold_z` standard errors in a bad direction (the z-test
//! for rates, the mean normal score times `√window` for numeric values, the chi-square
//! p-value's two-sided normal equivalent for mixes) or a CUSUM sum is past half its
//! threshold. While suspicious, observations leaving the current window are held back
//! instead of joining the baseline; they are admitted in order as soon as a check finds
//! the window unsuspicious. At most `baseline_max` are held; beyond that the oldest is
//! admitted, so a persistent sub-threshold shift is eventually learned rather than held
//! forever. The held observations are the ones that left the window, not the ones that
//! made it suspicious, so holding them biases nothing under no drift; it only delays
//! admission.
//!
//! # Episodes and hysteresis
//!
//! An episode starts with one firing [`Transition`]. While firing, the baseline is frozen
//! (observations leaving the current window are held, as above), so the alarm cannot teach
//! itself the new normal, and nothing can fire again. The episode ends with one resolving
//! transition, either
//! * `method` = the resolution test's name, once that windowed statistic has been below its
//!   resolve threshold (or on the harmless side of the baseline) at every check for a whole
//!   current window; the held observations are discarded, since they belong to the
//!   excursion, and the baseline resumes from the frozen one; or
//! * `method` = `"rebaseline"`, after `rebaseline_after` observations of firing: the shift
//!   is accepted as the new normal, the held observations become the baseline, and the
//!   detector re-arms against the new level.

use std::collections::{HashMap, VecDeque};

use super::stats;

/// What kind of observations a detector consumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SignalKind {
    /// Boolean outcomes ([`Obs::Flag`]); the watched value is the share of `true`.
    Rate,
    /// Real values ([`Obs::Value`]) such as latency, cost or token counts.
    Numeric,
    /// Labels ([`Obs::Category`]) such as finish reasons or tool paths.
    Categorical,
}

/// Which movement of the watched value is a problem. A pass rate falling is bad
/// (`Down`), an error rate or latency rising is bad (`Up`); token counts may be `Both`.
/// Movements in the harmless direction never fire and count as calm for resolution.
/// Categorical mixes have no direction and ignore this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BadDirection {
    /// The share of `true` flags / the value rising is bad.
    Up,
    /// The share of `true` flags / the value falling is bad.
    Down,
    /// Any movement is bad.
    Both,
}

/// One observation, in time order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Obs<'a> {
    /// For [`SignalKind::Rate`].
    Flag(bool),
    /// For [`SignalKind::Numeric`]; NaN is ignored.
    Value(f64),
    /// For [`SignalKind::Categorical`].
    Category(&'a str),
}

/// How bad a drift is, from the effect size rather than its significance (see the
/// `critical_*` fields of [`DetectorConfig`]).
///
/// The effect is measured on the observations believed to be shifted: for a CUSUM alarm
/// those since the CUSUM last left zero (its change-point estimate, capped at the current
/// window), for a windowed alarm the current window. The same segment gives a CUSUM
/// alarm's `current_value`, so an alarm raised 20 calls into a tripled cost reports the
/// tripled median rather than a window still mostly made of old calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// A real but moderate shift.
    Warning,
    /// A large shift.
    Critical,
}

/// Detector tuning. Start from [`DetectorConfig::for_kind`]; the defaults are what the
/// `drift_quality` bench measures (detection delay and false alarms per 100k calls).
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorConfig {
    /// Which movement is a problem.
    pub bad_direction: BadDirection,
    /// Baseline observations required before anything may fire. Guards against alarms
    /// from a baseline estimated on too few calls.
    pub min_baseline: usize,
    /// Most observations kept in the baseline (the oldest leave first).
    pub baseline_max: usize,
    /// Baseline observations older than this (relative to the latest timestamp passed to
    /// [`Detector::observe_at`]) are dropped, except while firing.
    pub baseline_max_age_ms: Option<u64>,
    /// Size of the current window compared against the baseline by the windowed tests.
    pub current_window: usize,
    /// Windowed tests run every this many observations (they cost `O(window + baseline)`).
    pub check_every: usize,
    /// Observations of continuous firing after which the new level becomes the baseline
    /// and the episode resolves with method `"rebaseline"`.
    pub rebaseline_after: usize,
    /// CUSUM decision threshold (in log-likelihood-ratio units for rates, in standard
    /// deviations of normal scores for numeric values); `None` disables the sequential
    /// detector. Not used for categorical signals.
    pub cusum_h: Option<f64>,
    /// Rates: the CUSUM is tuned to detect the odds of the bad outcome growing by this
    /// factor (1.6 turns a 10% failure rate into 15.1%).
    pub rate_odds_ratio: f64,
    /// Rates: the baseline bad-outcome rate used by the CUSUM is the estimate plus this
    /// many standard errors, a conservative reference against estimation noise in a young
    /// baseline. Defaults to 0: the bench's threshold sweep (whose baselines are learned
    /// online, noise included) shows that raising `cusum_h` buys the same false-alarm
    /// reduction with fewer missed small shifts; a margin only helps callers that lower
    /// `min_baseline` a lot.
    pub rate_margin_se: f64,
    /// Observations leaving the current window are held back from the baseline while the
    /// window is at least this many standard errors off in a bad direction (see the module
    /// docs, "Admission hold").
    pub hold_z: f64,
    /// Numeric: CUSUM reference value `k` in standard deviations (half the shift the
    /// CUSUM is tuned for; 0.25 targets a 0.5 sd shift of the normal scores).
    pub numeric_k: f64,
    /// Rates: fire when the windowed z-test's |z| in the bad direction reaches this;
    /// `None` leaves the z-test to resolution only.
    pub z_fire: Option<f64>,
    /// Rates: calm while the windowed z in the bad direction is below this.
    pub z_resolve: f64,
    /// Rates: `Critical` when the bad outcome's odds in the current window are at least
    /// this multiple of the baseline's.
    pub critical_odds_ratio: f64,
    /// Numeric: number of baseline-quantile bins for PSI.
    pub psi_bins: usize,
    /// Numeric: fire when PSI reaches this (and the median moved the bad way); `None`
    /// disables.
    pub psi_fire: Option<f64>,
    /// Numeric: calm while PSI is below this.
    pub psi_resolve: f64,
    /// Numeric: fire when the KS p-value is at most this (and the shift is the bad way);
    /// `None` disables.
    pub ks_fire_p: Option<f64>,
    /// Numeric: a shift fires only when the median or the mean of the shifted
    /// observations moved by at least this fraction of the baseline's (0.1: 10%). The
    /// tests are rank-based, so they see any shift of a narrow distribution: an upstream
    /// whose latency never varies by more than a millisecond fired a critical alarm for
    /// 141 → 143 ms. 0 lets every significant shift fire.
    pub min_relative_shift: f64,
    /// Numeric: an alarm is `Critical` (see `critical_shift_sd`) only when the reported
    /// median also moved by at least this fraction of the baseline's; 0 leaves severity to
    /// the normal scores alone. A narrow latency 12% up is many standard deviations away,
    /// and a warning.
    pub critical_relative_shift: f64,
    /// Numeric: `Critical` when the mean normal score of the shifted observations (see
    /// [`Severity`]) is at least this many standard deviations from 0. One sd is about a
    /// 65% latency increase at a log-sd of 0.5, and roughly where PSI reaches 1.
    pub critical_shift_sd: f64,
    /// Categorical: fire when the JS distance reaches this and the chi-square p-value is at
    /// most `chi2_fire_p`; `None` disables.
    pub js_fire: Option<f64>,
    /// Categorical: significance gate for firing.
    pub chi2_fire_p: f64,
    /// Categorical: calm while the JS distance is below this or the chi-square p-value is
    /// above `chi2_resolve_p`.
    pub js_resolve: f64,
    /// Categorical: see `js_resolve`.
    pub chi2_resolve_p: f64,
    /// Categorical: `Critical` when the JS distance is at least this.
    pub critical_js: f64,
    /// Categorical: distinct labels tracked; later new labels share one `"(other)"` slot
    /// so an unbounded label space cannot grow memory.
    pub max_categories: usize,
}

impl DetectorConfig {
    /// Defaults for a signal kind. Rates and numeric values default to `Up` being bad;
    /// set `bad_direction` for signals such as pass rate.
    ///
    /// Shared choices: a 500-observation minimum baseline (a 10% rate is then known to
    /// ±1.3 points), a 5,000-observation baseline, rebaselining after 5,000 observations
    /// of firing, windowed checks every 25 observations, holding baseline admission at 2
    /// standard errors.
    ///
    /// * Rate: CUSUM tuned for the bad outcome's odds ×1.6 with `h` = 9, which the
    ///   `drift_quality` bench measures at about 0.3 false alarms per 100k calls at a 90%
    ///   pass rate, a median delay of about 220 calls for 90% → 80% and 540 for 90% → 85%.
    ///   The windowed z-test (window 500) fires only at |z| ≥ 4.5, as a backstop for
    ///   shifts the CUSUM's tuning misses, and resolves below 2.
    /// * Numeric: CUSUM on normal scores with `k` = 0.25 (tuned for a 0.5 sd shift, i.e.
    ///   +30% latency at a log-sd of 0.5) and `h` = 25: about 80 calls to detect that shift
    ///   and ~0.03 false alarms per 100k. PSI ≥ 0.2 (10 bins) or KS p ≤ 1e-6 on a 300-call
    ///   window back it up; PSI below 0.1 resolves.
    /// * Categorical: JS distance ≥ 0.1 with chi-square p ≤ 1e-6 on a 500-call window;
    ///   resolves when JS < 0.05 or p > 0.01.
    pub fn for_kind(kind: SignalKind) -> Self {
        let mut cfg = DetectorConfig {
            bad_direction: BadDirection::Up,
            min_baseline: 500,
            baseline_max: 5_000,
            baseline_max_age_ms: None,
            current_window: 500,
            check_every: 25,
            rebaseline_after: 5_000,
            cusum_h: None,
            rate_odds_ratio: 1.6,
            rate_margin_se: 0.0,
            numeric_k: 0.25,
            hold_z: 2.0,
            z_fire: None,
            z_resolve: 2.0,
            critical_odds_ratio: 2.0,
            psi_bins: 10,
            psi_fire: None,
            psi_resolve: 0.1,
            ks_fire_p: None,
            min_relative_shift: 0.0,
            critical_relative_shift: 0.0,
            critical_shift_sd: 1.0,
            js_fire: None,
            chi2_fire_p: 1e-6,
            js_resolve: 0.05,
            chi2_resolve_p: 0.01,
            critical_js: 0.3,
            max_categories: 64,
        };
        match kind {
            SignalKind::Rate => {
                cfg.cusum_h = Some(9.0);
                cfg.z_fire = Some(4.5);
            }
            SignalKind::Numeric => {
                cfg.current_window = 300;
                cfg.cusum_h = Some(25.0);
                cfg.psi_fire = Some(0.2);
                cfg.ks_fire_p = Some(1e-6);
            }
            SignalKind::Categorical => {
                cfg.js_fire = Some(0.1);
            }
        }
        cfg
    }

    /// [`DetectorConfig::for_kind`] with the given bad direction.
    pub fn with_direction(kind: SignalKind, bad_direction: BadDirection) -> Self {
        DetectorConfig { bad_direction, ..Self::for_kind(kind) }
    }
}

/// A state change: the start or the end of a drift episode.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// `true` when the episode starts, `false` when it ends.
    pub firing: bool,
    /// What decided: `"cusum"`, `"z_test"`, `"psi"`, `"ks"`, `"js"`, or `"rebaseline"`
    /// when a long episode ended by accepting the new level.
    pub method: &'static str,
    /// The deciding statistic: CUSUM sum, |z| in the bad direction, PSI, KS `D`, JS
    /// distance; for resolutions the resolution test's statistic.
    pub statistic: f64,
    /// The threshold it crossed (the fire threshold, the resolve threshold, or for KS the
    /// critical `D` of `ks_fire_p` at the current sample sizes).
    pub threshold: f64,
    /// Observations in the baseline.
    pub baseline_n: u64,
    /// Observations in the current window.
    pub current_n: u64,
    /// Baseline share of `true` / median / share of the most-moved category.
    pub baseline_value: f64,
    /// Current-window counterpart of `baseline_value`.
    pub current_value: f64,
    /// Effect-size class of the shift at the time of the transition.
    pub severity: Severity,
    /// +1 when the current value is above the baseline, -1 below, 0 when equal.
    pub direction: i8,
    /// Categorical: the category whose share moved most.
    pub category: Option<String>,
}

/// Current state for reporting.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSnapshot {
    /// Observations in the baseline.
    pub baseline_n: u64,
    /// Observations in the current window.
    pub current_n: u64,
    /// As in [`Transition::baseline_value`] (NaN with no data).
    pub baseline_value: f64,
    /// As in [`Transition::current_value`] (NaN with no data).
    pub current_value: f64,
    /// Whether an episode is open.
    pub firing: bool,
    /// Whether the detector has enough data to fire.
    pub armed: bool,
    /// Largest CUSUM sum of the watched sides (0 when disabled or firing).
    pub cusum: f64,
    /// Categorical: the category behind the values.
    pub category: Option<String>,
}

/// The windowed statistics of one detector: what the in-memory and the ClickHouse sources
/// both compute, so that the two can be compared value for value. Fields that do not apply
/// to the signal kind are 0 (p-values 1).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowStats {
    pub baseline_n: u64,
    pub current_n: u64,
    /// Rate, median, or the share of the most-moved category.
    pub baseline_value: f64,
    pub current_value: f64,
    /// Rates: two-proportion z of the current window against the baseline.
    pub z: f64,
    /// Numeric: PSI over the baseline's quantile bins.
    pub psi: f64,
    /// Numeric: two-sample KS statistic and its asymptotic p-value.
    pub ks_d: f64,
    pub ks_p: f64,
    /// Categorical: Jensen–Shannon distance and the chi-square homogeneity p-value.
    pub js: f64,
    pub chi2_p: f64,
    /// Categorical: the category behind the values.
    pub category: Option<String>,
}

impl WindowStats {
    /// Rates from counts.
    pub fn rate(base_hits: u64, nb: u64, cur_hits: u64, nc: u64) -> Self {
        WindowStats {
            baseline_n: nb,
            current_n: nc,
            baseline_value: ratio_or_nan(base_hits, nb),
            current_value: ratio_or_nan(cur_hits, nc),
            z: stats::two_proportion_z(base_hits, nb, cur_hits, nc).z,
            ks_p: 1.0,
            chi2_p: 1.0,
            ..Default::default()
        }
    }

    /// Categorical mixes from aligned counts (`names[i]` is the label of slot `i`).
    pub fn categorical(names: &[String], base: &[u64], cur: &[u64]) -> Self {
        // Slots in name order, so that ties pick the same category whatever order the
        // labels were first seen in.
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&x, &y| names[x].cmp(&names[y]));
        let pick = |v: &[u64]| order.iter().map(|&i| v.get(i).copied().unwrap_or(0)).collect::<Vec<u64>>();
        let (base, cur) = (pick(base), pick(cur));
        let names: Vec<&String> = order.iter().map(|&i| &names[i]).collect();
        let (category, baseline_value, current_value) = most_moved(&base, &cur);
        let (base, cur) = (&base[..], &cur[..]);
        WindowStats {
            baseline_n: base.iter().sum(),
            current_n: cur.iter().sum(),
            baseline_value,
            current_value,
            js: stats::js_distance(base, cur),
            chi2_p: stats::chi_square_homogeneity(base, cur).p_value,
            ks_p: 1.0,
            category: category.and_then(|i| names.get(i).map(|n| n.to_string())),
            ..Default::default()
        }
    }
}

/// The category that moved most, with its baseline and current shares. "Most" is the
/// largest chi-square contribution `(c - b)² / (b + c)`, so 2% → 10% outranks the 90% → 82%
/// it came from: the relative change is what an operator needs to see.
fn most_moved(base: &[u64], cur: &[u64]) -> (Option<usize>, f64, f64) {
    let nb: u64 = base.iter().sum();
    let nc: u64 = cur.iter().sum();
    let mut best: (Option<usize>, f64, f64) = (None, f64::NAN, f64::NAN);
    let mut best_gap = -1.0;
    for i in 0..base.len().max(cur.len()) {
        let b = ratio_or_nan(base.get(i).copied().unwrap_or(0), nb);
        let c = ratio_or_nan(cur.get(i).copied().unwrap_or(0), nc);
        let gap = if nb == 0 || nc == 0 || b + c <= 0.0 { 0.0 } else { (c - b) * (c - b) / (b + c) };
        if gap > best_gap {
            best_gap = gap;
            best = (Some(i), b, c);
        }
    }
    best
}

/// One stored observation: the value (0/1 for flags, the interned id for categories), the
/// timestamp it was observed at, and (numeric values) its normal score against the baseline
/// when it arrived, which the CUSUM used and the windowed mean score reuses.
#[derive(Debug, Clone, Copy)]
struct Sample {
    v: f64,
    t: u64,
    z: f64,
}

/// The result of running the windowed tests once.
#[derive(Debug, Clone)]
struct WindowEval {
    /// Method that would fire, with its statistic and threshold.
    fire: Option<(&'static str, f64, f64)>,
    /// Whether this check counts towards resolution.
    calm: bool,
    /// Whether observations leaving the window should be held back from the baseline.
    suspicious: bool,
    /// Name, statistic and resolve threshold of the resolution test.
    resolve: (&'static str, f64, f64),
    severity: Severity,
    direction: i8,
    baseline_value: f64,
    current_value: f64,
    category: Option<usize>,
}

/// Open episode bookkeeping.
#[derive(Debug, Clone)]
struct Episode {
    /// Observations since the episode started.
    age: usize,
    /// Observation count at the first check of the current calm streak.
    calm_since: Option<u64>,
}

/// Label for the shared overflow slot of categorical detectors.
const OTHER_CATEGORY: &str = "(other)";

/// Drift detector for one (key, signal). See the module docs for the algorithm.
///
/// Memory is about `16 × (current_window + baseline_max)` bytes (twice the baseline while
/// firing, for the held observations), plus `8 × baseline_max` for numeric signals.
#[derive(Debug, Clone)]
pub struct Detector {
    kind: SignalKind,
    cfg: DetectorConfig,
    current: VecDeque<Sample>,
    baseline: VecDeque<Sample>,
    /// Observations that left the current window while firing or suspicious.
    held: VecDeque<Sample>,
    /// Whether the last windowed check found the window suspicious (admission hold).
    suspicious: bool,
    /// Rates: `true` flags in the baseline / current window.
    base_hits: u64,
    cur_hits: u64,
    /// Numeric: the baseline values, ascending.
    base_sorted: stats::LazySorted,
    /// Numeric: the current window's values, ascending.
    cur_sorted: Vec<f64>,
    /// Categorical: interned labels and per-label counts.
    names: Vec<String>,
    ids: HashMap<String, usize>,
    base_counts: Vec<u64>,
    cur_counts: Vec<u64>,
    /// CUSUM sums for "went up" and "went down".
    cusum_up: f64,
    cusum_down: f64,
    /// Observations since each CUSUM sum was last zero (the change-point estimate).
    run_up: usize,
    run_down: usize,
    episode: Option<Episode>,
    seen: u64,
    since_check: usize,
    last_t: u64,
}

impl Detector {
    /// A detector with no history. Zero sizes in `cfg` are raised to 1 and
    /// `rebaseline_after` to at least `current_window + min_baseline`, so a rebaseline
    /// always leaves enough held observations to arm again.
    pub fn new(kind: SignalKind, mut cfg: DetectorConfig) -> Self {
        cfg.current_window = cfg.current_window.max(1);
        cfg.baseline_max = cfg.baseline_max.max(1);
        cfg.min_baseline = cfg.min_baseline.clamp(1, cfg.baseline_max);
        cfg.check_every = cfg.check_every.max(1);
        cfg.psi_bins = cfg.psi_bins.max(2);
        cfg.max_categories = cfg.max_categories.max(1);
        cfg.rebaseline_after = cfg.rebaseline_after.max(cfg.current_window + cfg.min_baseline);
        Detector {
            kind,
            cfg,
            current: VecDeque::new(),
            baseline: VecDeque::new(),
            held: VecDeque::new(),
            suspicious: false,
            base_hits: 0,
            cur_hits: 0,
            base_sorted: stats::LazySorted::default(),
            cur_sorted: Vec::new(),
            names: Vec::new(),
            ids: HashMap::new(),
            base_counts: Vec::new(),
            cur_counts: Vec::new(),
            cusum_up: 0.0,
            cusum_down: 0.0,
            run_up: 0,
            run_down: 0,
            episode: None,
            seen: 0,
            since_check: 0,
            last_t: 0,
        }
    }

    /// The signal kind this detector consumes.
    pub fn kind(&self) -> SignalKind {
        self.kind
    }

    /// The effective configuration (after the adjustments of [`Detector::new`]).
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// Feeds one observation stamped with the latest timestamp seen (0 if none). Returns a
    /// transition only when the firing state changes. Observations of the wrong kind and
    /// NaN values are ignored.
    pub fn observe(&mut self, obs: Obs<'_>) -> Option<Transition> {
        self.observe_at(obs, self.last_t)
    }

    /// Feeds one observation with its timestamp (milliseconds, non-decreasing; an earlier
    /// timestamp is treated as the latest one). The timestamp only matters when
    /// `baseline_max_age_ms` is set.
    pub fn observe_at(&mut self, obs: Obs<'_>, t_ms: u64) -> Option<Transition> {
        let v = match (self.kind, obs) {
            (SignalKind::Rate, Obs::Flag(b)) => f64::from(u8::from(b)),
            (SignalKind::Numeric, Obs::Value(x)) if !x.is_nan() => x,
            (SignalKind::Categorical, Obs::Category(label)) => self.intern(label) as f64,
            _ => return None,
        };
        self.last_t = self.last_t.max(t_ms);
        self.expire_baseline();
        self.seen += 1;

        // The new observation joins the current window; the oldest one moves on.
        let z = if self.kind == SignalKind::Numeric { self.base_sorted.normal_score(v) } else { 0.0 };
        let sample = Sample { v, t: self.last_t, z };
        self.add_current(sample);
        if self.current.len() > self.cfg.current_window {
            if let Some(old) = self.current.pop_front() {
                self.remove_current(old);
                self.retire(old);
            }
        }

        let mut transition = None;
        if self.episode.is_none() && self.armed() {
            transition = self.sequential_step(v, z);
        }

        self.since_check += 1;
        if transition.is_none() && self.since_check >= self.cfg.check_every {
            self.since_check = 0;
            if self.armed() || self.episode.is_some() {
                transition = self.windowed_check();
            }
        }

        if transition.is_none() {
            let expired = match self.episode.as_mut() {
                Some(ep) => {
                    ep.age += 1;
                    ep.age >= self.cfg.rebaseline_after
                }
                None => false,
            };
            if expired {
                transition = Some(self.rebaseline());
            }
        }
        transition
    }

    /// Whether a drift episode is open.
    pub fn is_firing(&self) -> bool {
        self.episode.is_some()
    }

    /// Whether the current window is full and the baseline large enough to fire.
    pub fn armed(&self) -> bool {
        self.current.len() >= self.cfg.current_window && self.baseline.len() >= self.cfg.min_baseline
    }

    /// Window sizes and the watched values, for reporting.
    pub fn snapshot(&self) -> WindowSnapshot {
        let (baseline_value, current_value, category) = self.values();
        let cusum = match self.cfg.bad_direction {
            BadDirection::Up => self.cusum_up,
            BadDirection::Down => self.cusum_down,
            BadDirection::Both => self.cusum_up.max(self.cusum_down),
        };
        WindowSnapshot {
            baseline_n: self.baseline.len() as u64,
            current_n: self.current.len() as u64,
            baseline_value,
            current_value,
            firing: self.is_firing(),
            armed: self.armed(),
            cusum,
            category: category.and_then(|i| self.names.get(i).cloned()),
        }
    }

    /// The windowed statistics of the current window against the baseline, as the
    /// ClickHouse source computes them in SQL.
    pub fn window_stats(&self) -> WindowStats {
        let (nb, nc) = (self.baseline.len() as u64, self.current.len() as u64);
        match self.kind {
            SignalKind::Rate => WindowStats::rate(self.base_hits, nb, self.cur_hits, nc),
            SignalKind::Numeric => {
                let cur = &self.cur_sorted;
                let base = self.base_sorted.view();
                let edges = stats::quantile_edges_sorted(&base, self.cfg.psi_bins);
                let ks = stats::ks_test_sorted(&base, cur);
                WindowStats {
                    baseline_n: nb,
                    current_n: nc,
                    baseline_value: stats::median_sorted(&base),
                    current_value: stats::median_sorted(cur),
                    psi: stats::psi_from_counts(
                        &stats::bin_counts_sorted(&base, &edges),
                        &stats::bin_counts_sorted(cur, &edges),
                    ),
                    ks_d: ks.d,
                    ks_p: ks.p_value,
                    chi2_p: 1.0,
                    ..Default::default()
                }
            }
            SignalKind::Categorical => WindowStats::categorical(&self.names, &self.base_counts, &self.cur_counts),
        }
    }

    // -----------------------------------------------------------------------------------
    // Window bookkeeping
    // -----------------------------------------------------------------------------------

    fn intern(&mut self, label: &str) -> usize {
        if let Some(&id) = self.ids.get(label) {
            return id;
        }
        let name = if self.names.len() < self.cfg.max_categories { label } else { OTHER_CATEGORY };
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len();
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        self.base_counts.push(0);
        self.cur_counts.push(0);
        id
    }

    fn add_current(&mut self, s: Sample) {
        match self.kind {
            SignalKind::Rate => self.cur_hits += u64::from(s.v > 0.5),
            SignalKind::Numeric => {
                let at = self.cur_sorted.partition_point(|&x| x < s.v);
                self.cur_sorted.insert(at, s.v);
            }
            SignalKind::Categorical => {
                if let Some(c) = self.cur_counts.get_mut(s.v as usize) {
                    *c += 1;
                }
            }
        }
        self.current.push_back(s);
    }

    fn remove_current(&mut self, s: Sample) {
        match self.kind {
            SignalKind::Rate => self.cur_hits -= u64::from(s.v > 0.5).min(self.cur_hits),
            SignalKind::Numeric => {
                let at = self.cur_sorted.partition_point(|&x| x < s.v);
                if self.cur_sorted.get(at) == Some(&s.v) {
                    self.cur_sorted.remove(at);
                }
            }
            SignalKind::Categorical => {
                if let Some(c) = self.cur_counts.get_mut(s.v as usize) {
                    *c = c.saturating_sub(1);
                }
            }
        }
    }

    /// Routes an observation leaving the current window: into the baseline, or held back
    /// while firing (frozen baseline) or suspicious (admission hold).
    fn retire(&mut self, s: Sample) {
        if self.episode.is_none() && !self.suspicious {
            self.admit(s);
            return;
        }
        self.held.push_back(s);
        if self.held.len() > self.cfg.baseline_max {
            if let Some(old) = self.held.pop_front() {
                // A hold that outgrows the baseline is a persistent sub-threshold shift:
                // learn it. During an episode the baseline stays frozen instead.
                if self.episode.is_none() {
                    self.admit(old);
                }
            }
        }
    }

    fn admit(&mut self, s: Sample) {
        if self.kind == SignalKind::Numeric && self.baseline.len() >= self.cfg.baseline_max {
            // A full baseline: one in, one out.
            if let Some(old) = self.baseline.pop_front() {
                self.base_sorted.replace(old.v, s.v);
                self.baseline.push_back(s);
                return;
            }
        }
        self.add_baseline(s);
        while self.baseline.len() > self.cfg.baseline_max {
            self.pop_baseline();
        }
    }

    /// Admits every held observation, oldest first.
    fn release_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        for s in held {
            self.admit(s);
        }
    }

    fn add_baseline(&mut self, s: Sample) {
        match self.kind {
            SignalKind::Rate => self.base_hits += u64::from(s.v > 0.5),
            SignalKind::Numeric => {
                self.base_sorted.insert(s.v);
            }
            SignalKind::Categorical => {
                if let Some(c) = self.base_counts.get_mut(s.v as usize) {
                    *c += 1;
                }
            }
        }
        self.baseline.push_back(s);
    }

    fn pop_baseline(&mut self) {
        let Some(s) = self.baseline.pop_front() else { return };
        match self.kind {
            SignalKind::Rate => self.base_hits -= u64::from(s.v > 0.5).min(self.base_hits),
            SignalKind::Numeric => {
                self.base_sorted.remove(s.v);
            }
            SignalKind::Categorical => {
                if let Some(c) = self.base_counts.get_mut(s.v as usize) {
                    *c = c.saturating_sub(1);
                }
            }
        }
    }

    /// Drops baseline observations past the age bound, except while firing (frozen).
    fn expire_baseline(&mut self) {
        let Some(max_age) = self.cfg.baseline_max_age_ms else { return };
        if self.episode.is_some() {
            return;
        }
        let cutoff = self.last_t.saturating_sub(max_age);
        while self.baseline.front().is_some_and(|s| s.t < cutoff) {
            self.pop_baseline();
        }
        if self.baseline.len() < self.cfg.min_baseline {
            // Disarmed: evidence gathered against a baseline that no longer exists is void,
            // and there is nothing left to protect from the held observations.
            self.reset_cusum();
            self.suspicious = false;
            self.release_held();
        }
    }

    // -----------------------------------------------------------------------------------
    // Sequential detector
    // -----------------------------------------------------------------------------------

    fn watches_up(&self) -> bool {
        matches!(self.cfg.bad_direction, BadDirection::Up | BadDirection::Both)
    }

    fn watches_down(&self) -> bool {
        matches!(self.cfg.bad_direction, BadDirection::Down | BadDirection::Both)
    }

    /// One CUSUM step for the new observation `v` against the (armed) baseline.
    fn sequential_step(&mut self, v: f64, z: f64) -> Option<Transition> {
        let h = self.cfg.cusum_h?;
        match self.kind {
            SignalKind::Rate => {
                let n = self.baseline.len() as f64;
                let hit = v > 0.5;
                if self.watches_up() {
                    // Bad outcome = `true` flag.
                    let inc = self.rate_increment(self.base_hits as f64, n, hit);
                    self.cusum_up = stats::cusum_update(self.cusum_up, inc);
                }
                if self.watches_down() {
                    // Bad outcome = `false` flag.
                    let inc = self.rate_increment(n - self.base_hits as f64, n, !hit);
                    self.cusum_down = stats::cusum_update(self.cusum_down, inc);
                }
            }
            SignalKind::Numeric => {
                let k = self.cfg.numeric_k;
                if self.watches_up() {
                    self.cusum_up = stats::cusum_update(self.cusum_up, z - k);
                }
                if self.watches_down() {
                    self.cusum_down = stats::cusum_update(self.cusum_down, -z - k);
                }
            }
            SignalKind::Categorical => return None,
        }
        self.run_up = if self.cusum_up > 0.0 { self.run_up + 1 } else { 0 };
        self.run_down = if self.cusum_down > 0.0 { self.run_down + 1 } else { 0 };
        let (sum, dir, run) = if self.cusum_up >= self.cusum_down {
            (self.cusum_up, 1, self.run_up)
        } else {
            (self.cusum_down, -1, self.run_down)
        };
        if sum < h {
            return None;
        }
        let segment = self.change_segment(run, dir);
        let (current_value, severity) = self.segment_summary(segment);
        if self.kind == SignalKind::Numeric && !self.is_material(current_value, || self.segment_mean(segment)) {
            // Significant but too small to matter: start gathering evidence afresh.
            if dir > 0 {
                (self.cusum_up, self.run_up) = (0.0, 0);
            } else {
                (self.cusum_down, self.run_down) = (0.0, 0);
            }
            return None;
        }
        let mut eval = self.evaluate(false);
        eval.current_value = current_value;
        eval.severity = severity;
        Some(self.open_episode("cusum", sum, h, &eval, dir))
    }

    /// Bernoulli CUSUM increment for one observation, with the bad outcome observed
    /// `bad_count` times in `n` baseline observations. The baseline rate is smoothed
    /// (`(x + 1/2)/(n + 1)`, so an error-free baseline still gives a usable rate) and
    /// raised by `rate_margin_se` standard errors to absorb estimation noise.
    fn rate_increment(&self, bad_count: f64, n: f64, bad: bool) -> f64 {
        rate_increment(&self.cfg, bad_count, n, bad)
    }

    /// Length of the suffix of the current window that a CUSUM alarm attributes to the
    /// shift: the generalized-likelihood-ratio change-point estimate (the suffix whose
    /// departure from the baseline in the alarm's direction is least likely under no
    /// change), searched over suffixes no longer than the CUSUM run (the sum's last zero)
    /// and no shorter than a few observations, so that one extreme call cannot define the
    /// segment. Only used for reporting; detection never depends on it.
    fn change_segment(&self, run: usize, direction: i8) -> usize {
        let w = self.current.len();
        let min_len = match self.kind {
            SignalKind::Rate => MIN_RATE_SEGMENT,
            _ => MIN_NUMERIC_SEGMENT,
        }
        .min(w);
        let max_len = run.clamp(min_len, w.max(1));
        let dir = f64::from(direction);
        let p0 = (self.base_hits as f64 + 0.5) / (self.baseline.len() as f64 + 1.0);
        let mut best = (max_len, f64::NEG_INFINITY);
        let mut sum = 0.0;
        for (i, s) in self.current.iter().rev().take(max_len).enumerate() {
            let len = i + 1;
            let glr = match self.kind {
                SignalKind::Rate => {
                    sum += s.v;
                    let p = sum / len as f64;
                    if (p - p0) * dir > 0.0 {
                        len as f64 * bernoulli_kl(p, p0)
                    } else {
                        f64::NEG_INFINITY
                    }
                }
                _ => {
                    sum += self.base_sorted.normal_score(s.v);
                    if sum * dir > 0.0 {
                        sum * sum / len as f64
                    } else {
                        f64::NEG_INFINITY
                    }
                }
            };
            if len >= min_len && glr > best.1 {
                best = (len, glr);
            }
        }
        best.0
    }

    /// Value and severity over the last `len` observations of the current window (at
    /// least one, at most the whole window): the CUSUM's estimate of the shifted segment.
    fn segment_summary(&self, len: usize) -> (f64, Severity) {
        let len = len.clamp(1, self.current.len().max(1));
        let segment = self.current.iter().skip(self.current.len().saturating_sub(len));
        match self.kind {
            SignalKind::Rate => {
                let (hits, n) = segment.fold((0u64, 0u64), |(h, n), s| (h + u64::from(s.v > 0.5), n + 1));
                let severity = self.rate_severity(hits, n);
                (ratio_or_nan(hits, n), severity)
            }
            SignalKind::Numeric => {
                let mut vals: Vec<f64> = segment.map(|s| s.v).collect();
                vals.sort_by(f64::total_cmp);
                let shift = self.mean_score(&vals);
                (stats::median_sorted(&vals), self.numeric_severity(shift))
            }
            SignalKind::Categorical => (f64::NAN, Severity::Warning),
        }
    }

    /// Whether current observations with this median and mean (the mean computed only
    /// when needed) moved from the baseline by at least `min_relative_shift` (see
    /// [`shift_is_material`]).
    fn is_material(&self, median: f64, mean_of: impl FnOnce() -> f64) -> bool {
        if self.cfg.min_relative_shift <= 0.0 {
            return true;
        }
        let base = self.base_sorted.view();
        shift_is_material(self.cfg.min_relative_shift, (stats::median_sorted(&base), median), (mean(&base), mean_of()))
    }

    /// Mean of the last `len` observations of the current window (at least one).
    fn segment_mean(&self, len: usize) -> f64 {
        let len = len.clamp(1, self.current.len().max(1));
        let tail = self.current.iter().skip(self.current.len().saturating_sub(len));
        let (sum, n) = tail.fold((0.0, 0usize), |(sum, n), s| (sum + s.v, n + 1));
        if n == 0 {
            f64::NAN
        } else {
            sum / n as f64
        }
    }

    /// `Critical` when the odds of the segment's rate differ from the baseline's by at
    /// least `critical_odds_ratio` either way (half-count smoothing keeps empty counts
    /// finite).
    fn rate_severity(&self, hits: u64, n: u64) -> Severity {
        rate_severity(&self.cfg, (self.base_hits, self.baseline.len() as u64), (hits, n))
    }

    fn numeric_severity(&self, mean_score: f64) -> Severity {
        if mean_score.abs() >= self.cfg.critical_shift_sd {
            Severity::Critical
        } else {
            Severity::Warning
        }
    }

    /// Mean normal score of `values` against the baseline: the shift in standard
    /// deviations of the rank-normalised baseline distribution. It uses every observation,
    /// ignores outliers' magnitudes, and is never undecided by ties the way a median
    /// comparison can be.
    fn mean_score(&self, values: &[f64]) -> f64 {
        if values.is_empty() {
            return 0.0;
        }
        values.iter().map(|&x| self.base_sorted.normal_score(x)).sum::<f64>() / values.len() as f64
    }

    // -----------------------------------------------------------------------------------
    // Windowed tests
    // -----------------------------------------------------------------------------------

    fn windowed_check(&mut self) -> Option<Transition> {
        self.base_sorted.flush();
        let firing = self.episode.is_some();
        let eval = self.evaluate(!firing);
        if !firing {
            if let Some((method, stat, threshold)) = eval.fire {
                let dir = eval.direction;
                return Some(self.open_episode(method, stat, threshold, &eval, dir));
            }
            let cusum_high = self.cfg.cusum_h.is_some_and(|h| self.cusum_up.max(self.cusum_down) >= 0.5 * h);
            self.suspicious = eval.suspicious || cusum_high;
            if !self.suspicious {
                self.release_held();
            }
            return None;
        }
        let seen = self.seen;
        let window = self.cfg.current_window as u64;
        let ep = self.episode.as_mut()?;
        if !eval.calm {
            ep.calm_since = None;
            return None;
        }
        let since = *ep.calm_since.get_or_insert(seen);
        if seen - since < window {
            return None;
        }
        let (method, stat, threshold) = eval.resolve;
        let t = self.transition(false, method, stat, threshold, &eval, eval.direction);
        self.episode = None;
        self.held.clear();
        self.reset_cusum();
        Some(t)
    }

    /// Whether a shift with sign `direction` is in a watched direction.
    fn is_bad(&self, direction: i8) -> bool {
        match self.cfg.bad_direction {
            BadDirection::Up => direction > 0,
            BadDirection::Down => direction < 0,
            BadDirection::Both => direction != 0,
        }
    }

    /// Runs the windowed tests of the current window against the baseline. `want_fire`
    /// skips the fire-only tests (KS) during an episode.
    fn evaluate(&self, want_fire: bool) -> WindowEval {
        match self.kind {
            SignalKind::Rate => self.evaluate_rate(),
            SignalKind::Numeric => self.evaluate_numeric(want_fire),
            SignalKind::Categorical => self.evaluate_categorical(),
        }
    }

    fn evaluate_rate(&self) -> WindowEval {
        let (nb, nc) = (self.baseline.len() as u64, self.current.len() as u64);
        let z = stats::two_proportion_z(self.base_hits, nb, self.cur_hits, nc).z;
        let bad_z = bad_side(self.cfg.bad_direction, z);
        let fire = self.cfg.z_fire.filter(|&t| bad_z >= t).map(|t| ("z_test", bad_z, t));
        let severity = self.rate_severity(self.cur_hits, nc);
        let base_rate = ratio_or_nan(self.base_hits, nb);
        let cur_rate = ratio_or_nan(self.cur_hits, nc);
        WindowEval {
            fire,
            calm: bad_z < self.cfg.z_resolve,
            suspicious: bad_z >= self.cfg.hold_z,
            resolve: ("z_test", bad_z, self.cfg.z_resolve),
            severity,
            direction: sign(cur_rate - base_rate),
            baseline_value: base_rate,
            current_value: cur_rate,
            category: None,
        }
    }

    fn evaluate_numeric(&self, want_fire: bool) -> WindowEval {
        let cur = &self.cur_sorted;
        // Borrowed: the windowed check merged the baseline's pending changes first.
        let base = self.base_sorted.view();
        let edges = stats::quantile_edges_sorted(&base, self.cfg.psi_bins);
        let psi =
            stats::psi_from_counts(&stats::bin_counts_sorted(&base, &edges), &stats::bin_counts_sorted(cur, &edges));
        // The scores the samples got on arrival: the baseline moves by one observation per
        // arrival (and not at all while held or firing), so this is the mean score against
        // the current baseline up to a negligible drift, without re-ranking the window.
        let mean_score = if self.current.is_empty() {
            0.0
        } else {
            self.current.iter().map(|s| s.z).sum::<f64>() / self.current.len() as f64
        };
        let direction = sign(mean_score);
        let score_z = mean_score * (cur.len() as f64).sqrt();
        let bad_score_z = match self.cfg.bad_direction {
            BadDirection::Up => score_z,
            BadDirection::Down => -score_z,
            BadDirection::Both => score_z.abs(),
        };
        let bad = self.is_bad(direction);
        let mut fire = None;
        if want_fire && bad {
            if let Some(t) = self.cfg.psi_fire.filter(|&t| psi >= t) {
                fire = Some(("psi", psi, t));
            } else if let Some(alpha) = self.cfg.ks_fire_p {
                let ks = stats::ks_test_sorted(&base, cur);
                if ks.p_value <= alpha {
                    fire = Some(("ks", ks.d, stats::ks_critical_d(alpha, base.len(), cur.len())));
                }
            }
            if fire.is_some() && !self.is_material(stats::median_sorted(cur), || mean(cur)) {
                fire = None;
            }
        }
        let severity = self.numeric_severity(mean_score);
        WindowEval {
            fire,
            calm: psi < self.cfg.psi_resolve || (!bad && self.cfg.bad_direction != BadDirection::Both),
            suspicious: bad_score_z >= self.cfg.hold_z,
            resolve: ("psi", psi, self.cfg.psi_resolve),
            severity,
            direction,
            baseline_value: stats::median_sorted(&base),
            current_value: stats::median_sorted(cur),
            category: None,
        }
    }

    fn evaluate_categorical(&self) -> WindowEval {
        let js = stats::js_distance(&self.base_counts, &self.cur_counts);
        let chi = stats::chi_square_homogeneity(&self.base_counts, &self.cur_counts);
        let (fire, calm, severity) = mix_decision(&self.cfg, js, chi.p_value);
        let (category, base_share, cur_share) = self.most_moved_category();
        WindowEval {
            fire,
            calm,
            suspicious: chi.p_value <= 2.0 * stats::normal_sf(self.cfg.hold_z),
            resolve: ("js", js, self.cfg.js_resolve),
            severity,
            direction: sign(cur_share - base_share),
            baseline_value: base_share,
            current_value: cur_share,
            category,
        }
    }

    fn most_moved_category(&self) -> (Option<usize>, f64, f64) {
        most_moved(&self.base_counts, &self.cur_counts)
    }

    /// Baseline and current values (and category) for snapshots.
    fn values(&self) -> (f64, f64, Option<usize>) {
        match self.kind {
            SignalKind::Rate => (
                ratio_or_nan(self.base_hits, self.baseline.len() as u64),
                ratio_or_nan(self.cur_hits, self.current.len() as u64),
                None,
            ),
            SignalKind::Numeric => {
                let cur = &self.cur_sorted;
                (stats::median_sorted(&self.base_sorted.view()), stats::median_sorted(cur), None)
            }
            SignalKind::Categorical => {
                let (category, b, c) = self.most_moved_category();
                (b, c, category)
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Episodes
    // -----------------------------------------------------------------------------------

    fn reset_cusum(&mut self) {
        self.cusum_up = 0.0;
        self.cusum_down = 0.0;
        self.run_up = 0;
        self.run_down = 0;
    }

    fn open_episode(
        &mut self,
        method: &'static str,
        statistic: f64,
        threshold: f64,
        eval: &WindowEval,
        direction: i8,
    ) -> Transition {
        let mut t = self.transition(true, method, statistic, threshold, eval, direction);
        if self.kind == SignalKind::Numeric {
            t.severity =
                capped_severity(t.severity, self.cfg.critical_relative_shift, (t.baseline_value, t.current_value));
        }
        self.episode = Some(Episode { age: 0, calm_since: None });
        self.suspicious = false;
        self.reset_cusum();
        t
    }

    /// Ends a long episode by adopting the held observations (the new level) as the
    /// baseline.
    fn rebaseline(&mut self) -> Transition {
        self.base_sorted.flush();
        let eval = self.evaluate(false);
        let (_, stat, threshold) = eval.resolve;
        let t = self.transition(false, "rebaseline", stat, threshold, &eval, eval.direction);
        self.episode = None;
        while !self.baseline.is_empty() {
            self.pop_baseline();
        }
        self.base_sorted.clear();
        let held = std::mem::take(&mut self.held);
        for s in held {
            self.add_baseline(s);
        }
        // The window's scores were against the old baseline.
        if self.kind == SignalKind::Numeric {
            for i in 0..self.current.len() {
                let z = self.base_sorted.normal_score(self.current[i].v);
                self.current[i].z = z;
            }
        }
        self.reset_cusum();
        t
    }

    fn transition(
        &self,
        firing: bool,
        method: &'static str,
        statistic: f64,
        threshold: f64,
        eval: &WindowEval,
        direction: i8,
    ) -> Transition {
        Transition {
            firing,
            method,
            statistic,
            threshold,
            baseline_n: self.baseline.len() as u64,
            current_n: self.current.len() as u64,
            baseline_value: eval.baseline_value,
            current_value: eval.current_value,
            severity: eval.severity,
            direction,
            category: eval.category.and_then(|i| self.names.get(i).cloned()),
        }
    }
}

/// Shortest segments a CUSUM alarm's change-point estimate may pick (see
/// `Detector::change_segment`): a rate needs a few dozen flags to mean anything, a numeric
/// median a handful of values.
const MIN_RATE_SEGMENT: usize = 30;
const MIN_NUMERIC_SEGMENT: usize = 5;

// The decisions both sources share: the in-memory detector and the ClickHouse source
// (`super::fleet`) take the same windowed statistics through these.

/// Whether a numeric shift is large enough to alarm: the (baseline, current) medians or
/// means differ by at least `min` of the baseline value. A zero baseline counts any move;
/// `min` at or below 0 accepts every shift.
pub fn shift_is_material(min: f64, medians: (f64, f64), means: (f64, f64)) -> bool {
    if min <= 0.0 {
        return true;
    }
    [medians, means].into_iter().any(|(base, cur)| {
        if !base.is_finite() || !cur.is_finite() {
            return false;
        }
        if base == 0.0 {
            return cur != 0.0;
        }
        ((cur - base) / base).abs() >= min
    })
}

/// `severity`, but `Warning` when the (baseline, current) medians moved by less than
/// `critical_min` of the baseline value (a `critical_min` at or below 0 changes nothing).
pub fn capped_severity(severity: Severity, critical_min: f64, medians: (f64, f64)) -> Severity {
    if severity == Severity::Critical && !shift_is_material(critical_min, medians, (f64::NAN, f64::NAN)) {
        Severity::Warning
    } else {
        severity
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// A windowed statistic signed so that the bad direction is positive.
pub fn bad_side(dir: BadDirection, z: f64) -> f64 {
    match dir {
        BadDirection::Up => z,
        BadDirection::Down => -z,
        BadDirection::Both => z.abs(),
    }
}

/// `Critical` when the odds of the current rate differ from the baseline's by at least
/// `critical_odds_ratio` either way (half-count smoothing keeps empty counts finite).
/// Arguments are (hits, observations).
pub fn rate_severity(cfg: &DetectorConfig, base: (u64, u64), cur: (u64, u64)) -> Severity {
    let odds = |(hits, n): (u64, u64)| (hits as f64 + 0.5) / ((n - hits.min(n)) as f64 + 0.5);
    let ratio = odds(cur) / odds(base);
    if ratio.max(1.0 / ratio) >= cfg.critical_odds_ratio {
        Severity::Critical
    } else {
        Severity::Warning
    }
}

/// A mix's windowed decision: (fire as (method, statistic, threshold), calm, severity).
pub fn mix_decision(cfg: &DetectorConfig, js: f64, chi2_p: f64) -> (Option<(&'static str, f64, f64)>, bool, Severity) {
    let fire = cfg.js_fire.filter(|&t| js >= t && chi2_p <= cfg.chi2_fire_p).map(|t| ("js", js, t));
    let calm = js < cfg.js_resolve || chi2_p > cfg.chi2_resolve_p;
    let severity = if js >= cfg.critical_js { Severity::Critical } else { Severity::Warning };
    (fire, calm, severity)
}

/// Bernoulli CUSUM increment for one observation, with the bad outcome observed
/// `bad_count` times in `n` baseline observations. The baseline rate is smoothed
/// (`(x + 1/2)/(n + 1)`, so an error-free baseline still gives a usable rate) and raised by
/// `rate_margin_se` standard errors to absorb estimation noise. Shared with the ClickHouse
/// source, whose CUSUM runs over the flags each poll brings.
pub fn rate_increment(cfg: &DetectorConfig, bad_count: f64, n: f64, bad: bool) -> f64 {
    let q_hat = (bad_count + 0.5) / (n + 1.0);
    let q0 = (q_hat + cfg.rate_margin_se * (q_hat * (1.0 - q_hat) / n).sqrt()).clamp(1e-9, 1.0 - 1e-6);
    let q1 = stats::shift_odds(q0, cfg.rate_odds_ratio);
    let (llr_bad, llr_good) = stats::bernoulli_llr(q0, q1);
    if bad {
        llr_bad
    } else {
        llr_good
    }
}

/// Kullback–Leibler divergence of Bernoulli(`p`) from Bernoulli(`q`), `0 < q < 1`.
fn bernoulli_kl(p: f64, q: f64) -> f64 {
    let term = |a: f64, b: f64| if a > 0.0 { a * (a / b).ln() } else { 0.0 };
    term(p, q) + term(1.0 - p, 1.0 - q)
}

fn ratio_or_nan(num: u64, den: u64) -> f64 {
    if den == 0 {
        f64::NAN
    } else {
        num as f64 / den as f64
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Deterministic generator (SplitMix64) so tests need no dependencies.
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let u1 = self.uniform().max(1e-300);
            let u2 = self.uniform();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    fn feed_flags(
        d: &mut Detector,
        rng: &mut Rng,
        n: usize,
        p: f64,
        out: &mut Vec<(usize, Transition)>,
        offset: usize,
    ) {
        for i in 0..n {
            if let Some(t) = d.observe(Obs::Flag(rng.uniform() < p)) {
                out.push((offset + i, t));
            }
        }
    }

    #[test]
    fn pass_rate_drop_fires_once_after_the_change() {
        for seed in 1..=8u64 {
            let mut rng = Rng(seed);
            let mut d =
                Detector::new(SignalKind::Rate, DetectorConfig::with_direction(SignalKind::Rate, BadDirection::Down));
            let mut ts = Vec::new();
            feed_flags(&mut d, &mut rng, 2_000, 0.90, &mut ts, 0);
            feed_flags(&mut d, &mut rng, 2_000, 0.75, &mut ts, 2_000);
            assert_eq!(ts.len(), 1, "seed {seed}: {ts:?}");
            let (at, t) = &ts[0];
            assert!(*at >= 2_000, "seed {seed} fired before the change at {at}");
            assert!(t.firing);
            assert_eq!(t.direction, -1);
            assert!(t.current_value < t.baseline_value);
            assert!(d.is_firing());
        }
    }

    #[test]
    fn stationary_pass_rate_never_fires() {
        for seed in 11..=18u64 {
            let mut rng = Rng(seed);
            let mut d =
                Detector::new(SignalKind::Rate, DetectorConfig::with_direction(SignalKind::Rate, BadDirection::Down));
            let mut ts = Vec::new();
            feed_flags(&mut d, &mut rng, 4_000, 0.90, &mut ts, 0);
            assert!(ts.is_empty(), "seed {seed}: {ts:?}");
            let s = d.snapshot();
            assert!(s.armed && !s.firing);
            assert_eq!(s.current_n, 500);
            assert_eq!(s.baseline_n, 3_500);
        }
    }

    #[test]
    fn cost_tripling_fires_once_quickly() {
        for seed in 21..=26u64 {
            let mut rng = Rng(seed);
            let mut d = Detector::new(SignalKind::Numeric, DetectorConfig::for_kind(SignalKind::Numeric));
            let mut ts = Vec::new();
            for i in 0..4_000 {
                let c = if i < 2_000 { 0.002 } else { 0.006 };
                // Small multiplicative noise around the per-call cost.
                let v = c * (0.05 * rng.normal()).exp();
                if let Some(t) = d.observe(Obs::Value(v)) {
                    ts.push((i, t));
                }
            }
            assert_eq!(ts.len(), 1, "seed {seed}: {ts:?}");
            let (at, t) = &ts[0];
            assert!((2_000..2_020).contains(at), "seed {seed} fired at {at}");
            assert_eq!(t.direction, 1);
            assert_eq!(t.method, "cusum");
            assert_eq!(t.severity, Severity::Critical);
            // The reported current value is the shifted segment's median, not the window's.
            assert!((t.current_value / t.baseline_value - 3.0).abs() < 0.3, "{t:?}");
        }
        // An exactly constant cost is all ties; the step must still fire once.
        let mut d = Detector::new(SignalKind::Numeric, DetectorConfig::for_kind(SignalKind::Numeric));
        let fired: Vec<usize> =
            (0..4_000).filter_map(|i| d.observe(Obs::Value(if i < 2_000 { 0.01 } else { 0.03 })).map(|_| i)).collect();
        assert_eq!(fired.len(), 1);
        assert!((2_000..2_020).contains(&fired[0]), "fired at {}", fired[0]);
    }

    /// Latency of an upstream that never varies by more than a millisecond, stepping up by
    /// `step` (a fraction) at call 2,000: the calls at which the detector fired.
    fn narrow_latency_step(cfg: DetectorConfig, step: f64, seed: u64) -> Vec<(usize, Transition)> {
        let mut rng = Rng(seed);
        let mut d = Detector::new(SignalKind::Numeric, cfg);
        (0..6_000)
            .filter_map(|i| {
                let base = if i < 2_000 { 141.0 } else { 141.0 * (1.0 + step) };
                d.observe(Obs::Value(base + rng.uniform())).map(|t| (i, t))
            })
            .collect()
    }

    #[test]
    fn a_shift_below_the_minimum_relative_shift_never_fires() {
        let gated = DetectorConfig { min_relative_shift: 0.1, ..DetectorConfig::for_kind(SignalKind::Numeric) };
        for seed in 31..=34u64 {
            // Without the gate, 141 → 143 ms fires (all rank tests see it), and critical.
            let ungated = narrow_latency_step(DetectorConfig::for_kind(SignalKind::Numeric), 0.015, seed);
            assert_eq!(ungated.len(), 1, "seed {seed}: {ungated:?}");
            assert_eq!(ungated[0].1.severity, Severity::Critical);
            assert!(narrow_latency_step(gated.clone(), 0.015, seed).is_empty(), "seed {seed}");
            assert!(narrow_latency_step(gated.clone(), 0.09, seed).is_empty(), "seed {seed}");
            // A move past the minimum fires as soon as without it.
            let fired = narrow_latency_step(gated.clone(), 0.12, seed);
            assert_eq!(fired.len(), 1, "seed {seed}: {fired:?}");
            assert!((2_000..2_020).contains(&fired[0].0), "seed {seed} fired at {}", fired[0].0);
            assert!((fired[0].1.current_value / fired[0].1.baseline_value - 1.12).abs() < 0.01);
            assert_eq!(fired[0].1.severity, Severity::Critical, "no cap on severity set");
            // With the cap, 12% is a warning and 60% critical.
            let capped = DetectorConfig { critical_relative_shift: 0.5, ..gated.clone() };
            let fired = narrow_latency_step(capped.clone(), 0.12, seed);
            assert_eq!((fired.len(), fired[0].1.severity), (1, Severity::Warning), "seed {seed}");
            let fired = narrow_latency_step(capped, 0.6, seed);
            assert_eq!((fired.len(), fired[0].1.severity), (1, Severity::Critical), "seed {seed}");
        }
    }

    #[test]
    fn a_tail_that_grows_counts_through_the_mean() {
        // The median stays put; one call in five gets three times slower.
        let cfg = DetectorConfig { min_relative_shift: 0.1, ..DetectorConfig::for_kind(SignalKind::Numeric) };
        let mut rng = Rng(41);
        let mut d = Detector::new(SignalKind::Numeric, cfg);
        let fired: Vec<Transition> = (0..6_000)
            .filter_map(|i| {
                let slow = i >= 2_000 && i % 5 == 0;
                d.observe(Obs::Value(if slow { 420.0 } else { 140.0 } + rng.uniform()))
            })
            .collect();
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert!((fired[0].current_value / fired[0].baseline_value - 1.0).abs() < 0.05, "{:?}", fired[0]);
    }

    #[test]
    fn material_shifts_by_median_or_mean() {
        assert!(shift_is_material(0.0, (100.0, 100.5), (100.0, 100.5)));
        assert!(!shift_is_material(0.1, (100.0, 105.0), (100.0, 109.9)));
        assert!(shift_is_material(0.1, (100.0, 110.0), (100.0, 100.0)));
        assert!(shift_is_material(0.1, (100.0, 100.0), (100.0, 90.0)), "a fall counts too");
        assert!(shift_is_material(0.1, (0.0, 1.0), (0.0, 0.2)), "any move off a zero baseline");
        assert!(!shift_is_material(0.1, (0.0, 0.0), (f64::NAN, f64::NAN)));
        assert_eq!(capped_severity(Severity::Critical, 0.5, (100.0, 140.0)), Severity::Warning);
        assert_eq!(capped_severity(Severity::Critical, 0.5, (100.0, 150.0)), Severity::Critical);
        assert_eq!(capped_severity(Severity::Critical, 0.0, (100.0, 101.0)), Severity::Critical);
        assert_eq!(capped_severity(Severity::Warning, 0.5, (100.0, 300.0)), Severity::Warning);
    }

    #[test]
    fn stationary_latency_never_fires_and_reports_medians() {
        for seed in 31..=34u64 {
            let mut rng = Rng(seed);
            let mut d = Detector::new(SignalKind::Numeric, DetectorConfig::for_kind(SignalKind::Numeric));
            for _ in 0..6_000 {
                assert!(d.observe(Obs::Value(800.0 * (0.5 * rng.normal()).exp())).is_none());
            }
            let s = d.snapshot();
            assert!((s.baseline_value / 800.0 - 1.0).abs() < 0.05, "{s:?}");
        }
    }

    #[test]
    fn nothing_fires_before_min_baseline() {
        let cfg = DetectorConfig::with_direction(SignalKind::Rate, BadDirection::Down);
        let mut d = Detector::new(SignalKind::Rate, cfg);
        // 900 passes then failures only: the baseline only reaches 500 at observation 1000.
        for i in 0..999 {
            let flag = i < 900;
            assert!(d.observe(Obs::Flag(flag)).is_none(), "fired at {i}");
            assert!(!d.armed());
        }
        let fired = (999..1_100).find(|_| d.observe(Obs::Flag(false)).is_some());
        assert!(fired.is_some());
    }

    #[test]
    fn episode_resolves_with_hysteresis_when_the_rate_recovers() {
        let mut rng = Rng(99);
        let mut d =
            Detector::new(SignalKind::Rate, DetectorConfig::with_direction(SignalKind::Rate, BadDirection::Down));
        let mut ts = Vec::new();
        feed_flags(&mut d, &mut rng, 3_000, 0.90, &mut ts, 0);
        feed_flags(&mut d, &mut rng, 1_000, 0.70, &mut ts, 3_000);
        feed_flags(&mut d, &mut rng, 3_000, 0.90, &mut ts, 4_000);
        assert_eq!(ts.len(), 2, "{ts:?}");
        assert!(ts[0].1.firing && ts[0].1.severity == Severity::Critical);
        assert!(!ts[1].1.firing);
        assert_eq!(ts[1].1.method, "z_test");
        // Resolution needs a whole calm window after the recovery.
        assert!(ts[1].0 >= 4_500, "{ts:?}");
        // The frozen baseline stayed at the old level.
        assert!(ts[1].1.baseline_value > 0.88);
        assert!(!d.is_firing());
    }

    #[test]
    fn long_episode_rebaselines_to_the_new_level() {
        let mut rng = Rng(5);
        let cfg = DetectorConfig::with_direction(SignalKind::Rate, BadDirection::Down);
        let mut d = Detector::new(SignalKind::Rate, cfg);
        let mut ts = Vec::new();
        feed_flags(&mut d, &mut rng, 2_000, 0.95, &mut ts, 0);
        feed_flags(&mut d, &mut rng, 12_000, 0.80, &mut ts, 2_000);
        assert_eq!(ts.len(), 2, "{ts:?}");
        assert!(ts[0].1.firing);
        assert_eq!(ts[1].1.method, "rebaseline");
        assert!(!ts[1].1.firing);
        let s = d.snapshot();
        assert!((s.baseline_value - 0.80).abs() < 0.03, "{s:?}");
    }

    #[test]
    fn categorical_mix_shift_fires_with_the_moved_category() {
        let mut rng = Rng(7);
        let mut d = Detector::new(SignalKind::Categorical, DetectorConfig::for_kind(SignalKind::Categorical));
        let mut ts = Vec::new();
        for i in 0..5_000 {
            let length_share = if i < 2_500 { 0.02 } else { 0.10 };
            let u = rng.uniform();
            let label = if u < length_share {
                "length"
            } else if u < length_share + 0.08 {
                "tool_calls"
            } else {
                "stop"
            };
            if let Some(t) = d.observe(Obs::Category(label)) {
                ts.push((i, t));
            }
        }
        assert_eq!(ts.len(), 1, "{ts:?}");
        assert!(ts[0].0 >= 2_500);
        assert_eq!(ts[0].1.method, "js");
        assert_eq!(ts[0].1.category.as_deref(), Some("length"));
        assert_eq!(ts[0].1.direction, 1);
    }

    #[test]
    fn categories_beyond_the_cap_share_one_slot() {
        let cfg = DetectorConfig { max_categories: 2, ..DetectorConfig::for_kind(SignalKind::Categorical) };
        let mut d = Detector::new(SignalKind::Categorical, cfg);
        for label in ["a", "b", "c", "d", "a"] {
            d.observe(Obs::Category(label));
        }
        assert_eq!(d.names, vec!["a", "b", OTHER_CATEGORY]);
        assert_eq!(d.cur_counts, vec![2, 1, 2]);
    }

    #[test]
    fn direction_decides_what_fires() {
        let run = |bad: BadDirection| {
            let mut rng = Rng(3);
            let mut d = Detector::new(SignalKind::Numeric, DetectorConfig::with_direction(SignalKind::Numeric, bad));
            let mut ts = Vec::new();
            for i in 0..4_000 {
                // Output tokens halve after call 2,000.
                let scale = if i < 2_000 { 400.0 } else { 200.0 };
                if let Some(t) = d.observe(Obs::Value((scale * (0.4 * rng.normal()).exp()).round())) {
                    ts.push(t);
                }
            }
            ts
        };
        assert!(run(BadDirection::Up).is_empty());
        let down = run(BadDirection::Down);
        assert_eq!(down.len(), 1);
        assert_eq!(down[0].direction, -1);
        assert_eq!(down[0].severity, Severity::Critical);
        let both = run(BadDirection::Both);
        assert_eq!(both.len(), 1);
        assert_eq!(both[0].direction, -1);
    }

    #[test]
    fn wrong_kind_and_nan_are_ignored() {
        let mut d = Detector::new(SignalKind::Numeric, DetectorConfig::for_kind(SignalKind::Numeric));
        assert!(d.observe(Obs::Flag(true)).is_none());
        assert!(d.observe(Obs::Value(f64::NAN)).is_none());
        assert_eq!(d.snapshot().current_n, 0);
    }

    #[test]
    fn baseline_age_bound_drops_old_observations() {
        let cfg = DetectorConfig {
            baseline_max_age_ms: Some(10_000),
            ..DetectorConfig::with_direction(SignalKind::Rate, BadDirection::Down)
        };
        let mut d = Detector::new(SignalKind::Rate, cfg);
        for i in 0..1_500u64 {
            d.observe_at(Obs::Flag(true), i);
        }
        assert_eq!(d.snapshot().baseline_n, 1_000);
        // Ten seconds later everything in the baseline is too old.
        d.observe_at(Obs::Flag(true), 1_500 + 10_000);
        let s = d.snapshot();
        assert_eq!(s.baseline_n, 1);
        assert!(!s.armed);
    }
}
