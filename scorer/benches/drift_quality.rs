//! Drift detector quality bench: detection delay after a step change and false alarms on
//! stationary streams, for the default detectors, each method alone, and a plain
//! fixed-window reference test. Prints Markdown tables.
//!
//! `cargo bench --bench drift_quality` runs the full set (a few minutes on one core);
//! `-- --quick` runs fewer seeds; `-- --sweep` adds a CUSUM threshold sweep (the ARL
//! measurement the default thresholds were chosen from), `-- --sweep-only` runs just that.
//!
//! Streams are synthetic and seeded (SplitMix64), so every figure is reproducible. Delay is
//! the number of post-change calls up to and including the one that raised the first
//! firing transition after the change; a run with no firing within the horizon is a miss.

use std::time::Instant;

use llmtap_scorer::drift::detect::{BadDirection, Detector, DetectorConfig, Obs, SignalKind};
use llmtap_scorer::drift::stats;

/// SplitMix64: tiny, fast, and good enough for simulation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x9E37_79B9_7F4A_7C15)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// One synthetic observation.
#[derive(Clone, Copy)]
enum Sample {
    Flag(bool),
    Value(f64),
    Cat(usize),
}

const CATEGORIES: [&str; 3] = ["stop", "tool_calls", "length"];

/// A stream family; `shifted` selects the post-change regime.
#[derive(Clone, Copy)]
enum Stream {
    /// Bernoulli flags.
    Flag { before: f64, after: f64 },
    /// Lognormal around `median` with log-sd `sigma`, multiplied by `factor` after the
    /// change; `straggler_share` of calls are further multiplied by a Pareto(`alpha`) factor
    /// (infinite-variance stragglers).
    LogNormal { median: f64, sigma: f64, factor: f64, straggler_share: f64, alpha: f64 },
    /// Finish-reason mix with the `length` share moving.
    Mix { length_before: f64, length_after: f64, tool_calls: f64 },
}

impl Stream {
    fn sample(&self, rng: &mut Rng, shifted: bool) -> Sample {
        match *self {
            Stream::Flag { before, after } => Sample::Flag(rng.uniform() < if shifted { after } else { before }),
            Stream::LogNormal { median, sigma, factor, straggler_share, alpha } => {
                let mut v = median * (sigma * rng.normal()).exp();
                if straggler_share > 0.0 && rng.uniform() < straggler_share {
                    v *= rng.uniform().powf(-1.0 / alpha);
                }
                Sample::Value(if shifted { v * factor } else { v })
            }
            Stream::Mix { length_before, length_after, tool_calls } => {
                let length = if shifted { length_after } else { length_before };
                let u = rng.uniform();
                Sample::Cat(if u < length {
                    2
                } else if u < length + tool_calls {
                    1
                } else {
                    0
                })
            }
        }
    }
}

/// Anything that turns observations into alarms.
trait Method {
    /// Returns true when this observation starts a new alarm.
    fn feed(&mut self, s: Sample) -> bool;
}

struct DetectorMethod(Detector);

impl Method for DetectorMethod {
    fn feed(&mut self, s: Sample) -> bool {
        let obs = match s {
            Sample::Flag(b) => Obs::Flag(b),
            Sample::Value(v) => Obs::Value(v),
            Sample::Cat(i) => Obs::Category(CATEGORIES[i]),
        };
        self.0.observe(obs).is_some_and(|t| t.firing)
    }
}

/// The plain reference: the first `BASELINE` calls are the baseline; afterwards each
/// non-overlapping window of `WINDOW` calls is tested against it at p < 0.001 (one-sided
/// in the bad direction for rates and log-means, chi-square for mixes). An alarm is a
/// significant window following a non-significant one, so a persisting shift counts once.
struct FixedWindowRef {
    seen: usize,
    base_hits: u64,
    base_n: u64,
    base_sum: f64,
    base_sumsq: f64,
    base_counts: [u64; 3],
    win_hits: u64,
    win_n: u64,
    win_sum: f64,
    win_counts: [u64; 3],
    bad: BadDirection,
    was_significant: bool,
}

const REF_BASELINE: usize = 2_000;
const REF_WINDOW: u64 = 200;
const REF_ALPHA: f64 = 0.001;

impl FixedWindowRef {
    fn new(bad: BadDirection) -> Self {
        FixedWindowRef {
            seen: 0,
            base_hits: 0,
            base_n: 0,
            base_sum: 0.0,
            base_sumsq: 0.0,
            base_counts: [0; 3],
            win_hits: 0,
            win_n: 0,
            win_sum: 0.0,
            win_counts: [0; 3],
            bad,
            was_significant: false,
        }
    }

    fn one_sided(&self, z: f64) -> bool {
        let crit = stats::normal_quantile(1.0 - REF_ALPHA);
        match self.bad {
            BadDirection::Up => z >= crit,
            BadDirection::Down => -z >= crit,
            BadDirection::Both => z.abs() >= stats::normal_quantile(1.0 - REF_ALPHA / 2.0),
        }
    }
}

impl Method for FixedWindowRef {
    fn feed(&mut self, s: Sample) -> bool {
        self.seen += 1;
        let in_baseline = self.seen <= REF_BASELINE;
        match s {
            Sample::Flag(b) => {
                if in_baseline {
                    self.base_hits += u64::from(b);
                    self.base_n += 1;
                } else {
                    self.win_hits += u64::from(b);
                    self.win_n += 1;
                }
            }
            Sample::Value(v) => {
                let l = v.ln();
                if in_baseline {
                    self.base_sum += l;
                    self.base_sumsq += l * l;
                    self.base_n += 1;
                } else {
                    self.win_sum += l;
                    self.win_n += 1;
                }
            }
            Sample::Cat(i) => {
                if in_baseline {
                    self.base_counts[i] += 1;
                    self.base_n += 1;
                } else {
                    self.win_counts[i] += 1;
                    self.win_n += 1;
                }
            }
        }
        if in_baseline || self.win_n < REF_WINDOW {
            return false;
        }
        let significant = match s {
            Sample::Flag(_) => {
                self.one_sided(stats::two_proportion_z(self.base_hits, self.base_n, self.win_hits, self.win_n).z)
            }
            Sample::Value(_) => {
                let nb = self.base_n as f64;
                let mean_b = self.base_sum / nb;
                let var_b = (self.base_sumsq / nb - mean_b * mean_b).max(1e-12);
                let nw = self.win_n as f64;
                let z = (self.win_sum / nw - mean_b) / (var_b * (1.0 / nw + 1.0 / nb)).sqrt();
                self.one_sided(z)
            }
            Sample::Cat(_) => stats::chi_square_homogeneity(&self.base_counts, &self.win_counts).p_value < REF_ALPHA,
        };
        self.win_hits = 0;
        self.win_n = 0;
        self.win_sum = 0.0;
        self.win_counts = [0; 3];
        let alarm = significant && !self.was_significant;
        self.was_significant = significant;
        alarm
    }
}

/// A named way of building a fresh method per run.
struct Candidate {
    name: String,
    make: Box<dyn Fn() -> Box<dyn Method>>,
}

fn detector(name: &str, kind: SignalKind, cfg: DetectorConfig) -> Candidate {
    Candidate {
        name: name.to_string(),
        make: Box::new(move || Box::new(DetectorMethod(Detector::new(kind, cfg.clone())))),
    }
}

fn reference(bad: BadDirection) -> Candidate {
    Candidate {
        name: "reference: fixed 200-call windows, p<0.001".to_string(),
        make: Box::new(move || Box::new(FixedWindowRef::new(bad))),
    }
}

fn rate_candidates(bad: BadDirection) -> Vec<Candidate> {
    let base = DetectorConfig::with_direction(SignalKind::Rate, bad);
    vec![
        detector("default (CUSUM + z-test)", SignalKind::Rate, base.clone()),
        detector("CUSUM alone", SignalKind::Rate, DetectorConfig { z_fire: None, ..base.clone() }),
        detector("z-test alone (window 500)", SignalKind::Rate, DetectorConfig { cusum_h: None, ..base }),
        reference(bad),
    ]
}

fn numeric_candidates(bad: BadDirection) -> Vec<Candidate> {
    let base = DetectorConfig::with_direction(SignalKind::Numeric, bad);
    let only = |cusum: bool, psi: bool, ks: bool| DetectorConfig {
        cusum_h: if cusum { base.cusum_h } else { None },
        psi_fire: if psi { base.psi_fire } else { None },
        ks_fire_p: if ks { base.ks_fire_p } else { None },
        ..base.clone()
    };
    vec![
        detector("default (CUSUM + PSI + KS)", SignalKind::Numeric, base.clone()),
        detector("CUSUM alone (normal scores)", SignalKind::Numeric, only(true, false, false)),
        detector("PSI alone (window 300)", SignalKind::Numeric, only(false, true, false)),
        detector("KS alone (window 300)", SignalKind::Numeric, only(false, false, true)),
        reference(bad),
    ]
}

fn categorical_candidates() -> Vec<Candidate> {
    vec![
        detector(
            "default (JS + chi-square gate)",
            SignalKind::Categorical,
            DetectorConfig::for_kind(SignalKind::Categorical),
        ),
        reference(BadDirection::Both),
    ]
}

struct DelayRow {
    runs: usize,
    delays: Vec<Option<usize>>,
    pre_change_alarms: usize,
}

const WARM_UP: usize = 2_000;

fn measure_delay(stream: Stream, cand: &Candidate, seeds: usize, horizon: usize, seed_base: u64) -> DelayRow {
    let mut delays = Vec::with_capacity(seeds);
    let mut pre = 0;
    for seed in 0..seeds {
        let mut rng = Rng::new(seed_base + seed as u64);
        let mut m = (cand.make)();
        for _ in 0..WARM_UP {
            if m.feed(stream.sample(&mut rng, false)) {
                pre += 1;
            }
        }
        let mut hit = None;
        for i in 1..=horizon {
            if m.feed(stream.sample(&mut rng, true)) {
                hit = Some(i);
                break;
            }
        }
        delays.push(hit);
    }
    DelayRow { runs: seeds, delays, pre_change_alarms: pre }
}

fn quantile_delay(delays: &[Option<usize>], q: f64) -> Option<usize> {
    let mut sorted: Vec<usize> = delays.iter().map(|d| d.unwrap_or(usize::MAX)).collect();
    sorted.sort_unstable();
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted.get(idx).copied().filter(|&d| d != usize::MAX)
}

fn fmt_delay(d: Option<usize>, horizon: usize) -> String {
    d.map_or_else(|| format!(">{horizon}"), |d| d.to_string())
}

struct FalseAlarmRow {
    calls: u64,
    alarms: u64,
}

fn measure_false_alarms(stream: Stream, cand: &Candidate, runs: usize, calls: usize, seed_base: u64) -> FalseAlarmRow {
    let mut alarms = 0;
    for run in 0..runs {
        let mut rng = Rng::new(seed_base + run as u64);
        let mut m = (cand.make)();
        for _ in 0..calls {
            if m.feed(stream.sample(&mut rng, false)) {
                alarms += 1;
            }
        }
    }
    FalseAlarmRow { calls: (runs * calls) as u64, alarms }
}

struct DelayScenario {
    name: &'static str,
    stream: Stream,
    horizon: usize,
    bar: Option<usize>,
    candidates: Vec<Candidate>,
}

struct AlarmScenario {
    name: &'static str,
    stream: Stream,
    runs: usize,
    candidates: Vec<Candidate>,
}

const LATENCY: Stream = Stream::LogNormal { median: 800.0, sigma: 0.5, factor: 1.3, straggler_share: 0.0, alpha: 1.0 };
const LATENCY_HEAVY: Stream =
    Stream::LogNormal { median: 800.0, sigma: 0.5, factor: 1.3, straggler_share: 0.05, alpha: 1.1 };
const LATENCY_WIDE: Stream =
    Stream::LogNormal { median: 800.0, sigma: 1.0, factor: 1.3, straggler_share: 0.0, alpha: 1.0 };
const COST: Stream = Stream::LogNormal { median: 0.002, sigma: 0.5, factor: 3.0, straggler_share: 0.0, alpha: 1.0 };
const MIX: Stream = Stream::Mix { length_before: 0.02, length_after: 0.10, tool_calls: 0.08 };

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let sweep_only = args.iter().any(|a| a == "--sweep-only");
    let sweep = sweep_only || args.iter().any(|a| a == "--sweep");
    let seeds = if quick { 60 } else { 400 };
    let fa_runs_fast = if quick { 10 } else { 200 };
    let fa_runs_slow = if quick { 4 } else { 60 };
    let calls = 100_000;
    let started = Instant::now();

    if sweep_only {
        run_sweep(quick);
        return;
    }
    println!("# Drift detector quality ({})\n", if quick { "quick" } else { "full" });
    println!("Warm-up {WARM_UP} stationary calls, then a step change. Delay = calls after the change until the");
    println!("first firing transition; p90 counts misses as infinite; a miss is no firing within the horizon.\n");

    let delay_scenarios = vec![
        DelayScenario {
            name: "pass rate 0.90 → 0.80",
            stream: Stream::Flag { before: 0.90, after: 0.80 },
            horizon: 5_000,
            bar: Some(400),
            candidates: rate_candidates(BadDirection::Down),
        },
        DelayScenario {
            name: "pass rate 0.90 → 0.85",
            stream: Stream::Flag { before: 0.90, after: 0.85 },
            horizon: 5_000,
            bar: Some(1_500),
            candidates: rate_candidates(BadDirection::Down),
        },
        DelayScenario {
            name: "error rate 0.02 → 0.04",
            stream: Stream::Flag { before: 0.02, after: 0.04 },
            horizon: 5_000,
            bar: None,
            candidates: rate_candidates(BadDirection::Up),
        },
        DelayScenario {
            name: "error rate 0.001 → 0.01",
            stream: Stream::Flag { before: 0.001, after: 0.01 },
            horizon: 5_000,
            bar: None,
            candidates: rate_candidates(BadDirection::Up),
        },
        DelayScenario {
            name: "latency lognormal σ=0.5, median ×1.3",
            stream: LATENCY,
            horizon: 3_000,
            bar: Some(300),
            candidates: numeric_candidates(BadDirection::Up),
        },
        DelayScenario {
            name: "latency σ=0.5 + 5% Pareto(1.1) stragglers, ×1.3",
            stream: LATENCY_HEAVY,
            horizon: 3_000,
            bar: Some(300),
            candidates: numeric_candidates(BadDirection::Up),
        },
        DelayScenario {
            name: "latency lognormal σ=1.0 (wide), median ×1.3",
            stream: LATENCY_WIDE,
            horizon: 3_000,
            bar: None,
            candidates: numeric_candidates(BadDirection::Up),
        },
        DelayScenario {
            name: "cost per call ×3 (lognormal σ=0.5)",
            stream: COST,
            horizon: 3_000,
            bar: None,
            candidates: numeric_candidates(BadDirection::Up),
        },
        DelayScenario {
            name: "finish_reason length 2% → 10%",
            stream: MIX,
            horizon: 3_000,
            bar: None,
            candidates: categorical_candidates(),
        },
    ];

    println!("## Detection delay ({seeds} seeded runs per row)\n");
    println!("| scenario | method | median | p90 | miss rate | pre-change alarms | bar |");
    println!("|---|---|---:|---:|---:|---:|---|");
    for sc in &delay_scenarios {
        for cand in &sc.candidates {
            let t = Instant::now();
            let row = measure_delay(sc.stream, cand, seeds, sc.horizon, 1_000);
            let median = quantile_delay(&row.delays, 0.5);
            let p90 = quantile_delay(&row.delays, 0.9);
            let misses = row.delays.iter().filter(|d| d.is_none()).count();
            let bar = match sc.bar {
                Some(b) if median.is_some_and(|m| m <= b) => format!("median ≤ {b}: met"),
                Some(b) => format!("median ≤ {b}: **missed**"),
                None => String::new(),
            };
            println!(
                "| {} | {} | {} | {} | {:.1}% | {} | {} |",
                sc.name,
                cand.name,
                fmt_delay(median, sc.horizon),
                fmt_delay(p90, sc.horizon),
                100.0 * misses as f64 / row.runs as f64,
                row.pre_change_alarms,
                bar
            );
            eprintln!("  [{} / {}: {:.1}s]", sc.name, cand.name, t.elapsed().as_secs_f64());
        }
    }

    let alarm_scenarios = vec![
        AlarmScenario {
            name: "pass rate 0.90",
            stream: Stream::Flag { before: 0.90, after: 0.90 },
            runs: fa_runs_fast,
            candidates: rate_candidates(BadDirection::Down),
        },
        AlarmScenario {
            name: "error rate 0.02",
            stream: Stream::Flag { before: 0.02, after: 0.02 },
            runs: fa_runs_fast,
            candidates: rate_candidates(BadDirection::Up),
        },
        AlarmScenario {
            name: "error rate 0.001",
            stream: Stream::Flag { before: 0.001, after: 0.001 },
            runs: fa_runs_fast,
            candidates: rate_candidates(BadDirection::Up),
        },
        AlarmScenario {
            name: "latency lognormal σ=0.5",
            stream: LATENCY,
            runs: fa_runs_slow,
            candidates: numeric_candidates(BadDirection::Up),
        },
        AlarmScenario {
            name: "latency σ=0.5 + 5% Pareto(1.1)",
            stream: LATENCY_HEAVY,
            runs: fa_runs_slow,
            candidates: numeric_candidates(BadDirection::Up),
        },
        AlarmScenario {
            name: "finish_reason mix",
            stream: MIX,
            runs: fa_runs_slow,
            candidates: categorical_candidates(),
        },
    ];

    println!("\n## False alarms on stationary streams ({calls} calls per run, from a cold start)\n");
    println!("| stream | method | calls | false alarms | per 100k calls | bar ≤ 1 |");
    println!("|---|---|---:|---:|---:|---|");
    for sc in &alarm_scenarios {
        for cand in &sc.candidates {
            let t = Instant::now();
            let row = measure_false_alarms(sc.stream, cand, sc.runs, calls, 50_000);
            let rate = row.alarms as f64 * 100_000.0 / row.calls as f64;
            println!(
                "| {} | {} | {} | {} | {:.2} | {} |",
                sc.name,
                cand.name,
                row.calls,
                row.alarms,
                rate,
                if rate <= 1.0 { "met" } else { "**missed**" }
            );
            eprintln!("  [{} / {}: {:.1}s]", sc.name, cand.name, t.elapsed().as_secs_f64());
        }
    }

    if sweep {
        run_sweep(quick);
    }
    eprintln!("total {:.1}s", started.elapsed().as_secs_f64());
}

/// CUSUM-only threshold sweep: the delay/false-alarm trade-off the defaults were chosen
/// from. "early" counts the false alarms raised in the first 10k calls of each run, while
/// the baseline is still young.
fn run_sweep(quick: bool) {
    let seeds = if quick { 60 } else { 200 };
    let runs = if quick { 10 } else { 60 };
    println!("\n## CUSUM threshold sweep (CUSUM alone; {seeds} delay runs, {runs} × 100k stationary calls)\n");
    println!("| signal | h | margin / k | median A | median B | p90 B | miss B | false alarms per 100k (early) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let base = DetectorConfig::with_direction(SignalKind::Rate, BadDirection::Down);
    for &margin in &[0.0, 1.0] {
        for &h in &[7.0, 8.0, 9.0, 10.0] {
            let cfg = DetectorConfig { z_fire: None, cusum_h: Some(h), rate_margin_se: margin, ..base.clone() };
            let cand = detector("sweep", SignalKind::Rate, cfg);
            let a = Stream::Flag { before: 0.9, after: 0.8 };
            let b = Stream::Flag { before: 0.9, after: 0.85 };
            sweep_row(
                "pass rate (A: 0.80, B: 0.85)",
                h,
                margin,
                &cand,
                a,
                b,
                Stream::Flag { before: 0.9, after: 0.9 },
                seeds,
                runs,
                5_000,
            );
        }
    }
    let base = DetectorConfig::with_direction(SignalKind::Numeric, BadDirection::Up);
    for &k in &[0.25, 0.35] {
        for &h in &[20.0, 25.0, 30.0] {
            let cfg =
                DetectorConfig { cusum_h: Some(h), numeric_k: k, psi_fire: None, ks_fire_p: None, ..base.clone() };
            let cand = detector("sweep", SignalKind::Numeric, cfg);
            sweep_row(
                "latency (A: σ=0.5, B: σ=1.0)",
                h,
                k,
                &cand,
                LATENCY,
                LATENCY_WIDE,
                LATENCY,
                seeds,
                runs / 2,
                3_000,
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sweep_row(
    label: &str,
    h: f64,
    param: f64,
    cand: &Candidate,
    a: Stream,
    b: Stream,
    stationary: Stream,
    seeds: usize,
    runs: usize,
    horizon: usize,
) {
    let da = measure_delay(a, cand, seeds, horizon, 1_000);
    let db = measure_delay(b, cand, seeds, horizon, 1_000);
    let fa = measure_false_alarms(stationary, cand, runs, 100_000, 50_000);
    let early = measure_false_alarms(stationary, cand, runs, 10_000, 50_000);
    println!(
        "| {label} | {h} | {param} | {} | {} | {} | {:.1}% | {:.2} ({}) |",
        fmt_delay(quantile_delay(&da.delays, 0.5), horizon),
        fmt_delay(quantile_delay(&db.delays, 0.5), horizon),
        fmt_delay(quantile_delay(&db.delays, 0.9), horizon),
        100.0 * db.delays.iter().filter(|d| d.is_none()).count() as f64 / db.runs as f64,
        fa.alarms as f64 * 1e5 / fa.calls as f64,
        early.alarms
    );
}
