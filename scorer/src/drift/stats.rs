//! Pure statistics behind drift detection: PSI over baseline-quantile bins, two-sample
//! Kolmogorov–Smirnov, Jensen–Shannon distance, the pooled two-proportion z-test, the
//! chi-square test of homogeneity, and the pieces of the sequential (CUSUM) detectors.
//!
//! Everything here is a pure function of its inputs so the same numbers can be reproduced
//! from counts computed elsewhere (the ClickHouse source counts bins in SQL and calls
//! [`psi_from_counts`]), and so each statistic can be tested against an independent
//! brute-force computation.

use std::collections::BTreeMap;
use std::f64::consts::{PI, SQRT_2};

/// Pseudo-count added to every bin by [`psi_from_counts`].
///
/// PSI takes `ln(cur / base)` per bin, which is infinite for an empty bin. Adding half an
/// observation to every bin on both sides (Jeffreys smoothing) keeps the statistic finite,
/// continuous in the counts, and makes the smoothing shrink as samples grow instead of
/// imposing a fixed floor whose effect depends on the window size.
pub const PSI_PSEUDO_COUNT: f64 = 0.5;

/// Complementary error function, relative error below 1.2e-7 for every finite `x`.
///
/// Chebyshev fit of Numerical Recipes (`erfcc`): unlike `1 - erf(x)` it keeps relative
/// precision far into the tail, which is where p-values live.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let ans = t * poly.exp();
    if x >= 0.0 {
        ans
    } else {
        2.0 - ans
    }
}

/// Standard normal CDF `P(Z <= x)`.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / SQRT_2)
}

/// Standard normal survival function `P(Z > x)`, accurate in the upper tail (no `1 - cdf`).
pub fn normal_sf(x: f64) -> f64 {
    0.5 * erfc(x / SQRT_2)
}

/// Standard normal quantile (inverse CDF), relative error about 1e-9 (Acklam's algorithm).
///
/// Returns `-inf` for `p <= 0`, `+inf` for `p >= 1` and NaN for NaN.
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] =
        [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
    const P_LOW: f64 = 0.024_25;
    if p.is_nan() {
        return f64::NAN;
    }
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// Natural log of the gamma function for `x > 0` (Lanczos, g = 7; ~1e-15 relative).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEF: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the approximation in the region where it is accurate.
        return (PI / (PI * x).sin().abs()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEF[0];
    for (i, c) in COEF.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// Regularized upper incomplete gamma `Q(a, x) = Γ(a, x) / Γ(a)` for `a > 0`, `x >= 0`.
///
/// Series below `a + 1`, Lentz continued fraction above (each converges fast on its side),
/// computing the upper tail directly so small p-values keep their relative precision.
pub fn gamma_q(a: f64, x: f64) -> f64 {
    const EPS: f64 = 1e-15;
    const TINY: f64 = 1e-300;
    const MAX_ITER: usize = 10_000;
    if x.is_nan() || a.is_nan() || a <= 0.0 {
        return f64::NAN;
    }
    if x <= 0.0 {
        return 1.0;
    }
    let log_prefactor = -x + a * x.ln() - ln_gamma(a);
    if x < a + 1.0 {
        let mut ap = a;
        let mut del = 1.0 / a;
        let mut sum = del;
        for _ in 0..MAX_ITER {
            ap += 1.0;
            del *= x / ap;
            sum += del;
            if del.abs() < sum.abs() * EPS {
                break;
            }
        }
        (1.0 - sum * log_prefactor.exp()).clamp(0.0, 1.0)
    } else {
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..=MAX_ITER {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < EPS {
                break;
            }
        }
        (log_prefactor.exp() * h).clamp(0.0, 1.0)
    }
}

/// Chi-square survival function `P(X > x)` with `df` degrees of freedom.
pub fn chi2_sf(x: f64, df: f64) -> f64 {
    gamma_q(df / 2.0, x / 2.0)
}

// ---------------------------------------------------------------------------------------
// PSI
// ---------------------------------------------------------------------------------------

/// Bin edges at the baseline's `1/bins, 2/bins, ..` quantiles; see [`quantile_edges_sorted`].
/// NaN values are ignored.
pub fn quantile_edges(baseline: &[f64], bins: usize) -> Vec<f64> {
    let mut sorted: Vec<f64> = baseline.iter().copied().filter(|v| !v.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    quantile_edges_sorted(&sorted, bins)
}

/// Bin edges from an ascending, NaN-free baseline: edge `i` (for `i = 1..bins`) is the
/// nearest-rank quantile `sorted[ceil(i * n / bins) - 1]`, so with the `(e[i-1], e[i]]` rule
/// of [`bin_index`] each bin holds about `n / bins` baseline values.
///
/// Ties collapse duplicate edges (fewer, still strictly increasing edges), because a bin
/// boundary inside a run of equal values would be meaningless. When the first edge equals
/// the baseline minimum (heavy ties at the bottom, e.g. a constant cost), the next float
/// below the minimum is prepended so a fall below everything the baseline has seen lands in
/// a bin of its own instead of being lumped with the minimum. Empty input or `bins < 2`
/// gives no edges (a single bin, PSI 0).
pub fn quantile_edges_sorted(sorted: &[f64], bins: usize) -> Vec<f64> {
    let n = sorted.len();
    let mut edges: Vec<f64> = Vec::with_capacity(bins.saturating_sub(1) + 1);
    if n == 0 || bins < 2 {
        return edges;
    }
    for i in 1..bins {
        let rank = (i * n).div_ceil(bins);
        let e = sorted[rank.saturating_sub(1).min(n - 1)];
        if edges.last().is_none_or(|&last| e > last) {
            edges.push(e);
        }
    }
    if let Some(&first) = edges.first() {
        if first <= sorted[0] && first.is_finite() {
            edges.insert(0, first.next_down());
        }
    }
    edges
}

/// Bin of `v` for ascending `edges`: the `i` with `edges[i-1] < v <= edges[i]`; the first
/// bin is `(-inf, edges[0]]` and the last (index `edges.len()`) is `(edges[last], +inf)`.
///
/// This is the counting rule any external counter (e.g. SQL) must follow for its counts to
/// be comparable with [`bin_counts`].
pub fn bin_index(v: f64, edges: &[f64]) -> usize {
    edges.partition_point(|&e| e < v)
}

/// Counts of `values` per bin (`edges.len() + 1` bins, rule of [`bin_index`]); NaN skipped.
pub fn bin_counts(values: &[f64], edges: &[f64]) -> Vec<u64> {
    let mut counts = vec![0u64; edges.len() + 1];
    for &v in values {
        if !v.is_nan() {
            counts[bin_index(v, edges)] += 1;
        }
    }
    counts
}

/// [`bin_counts`] for an ascending, NaN-free sample in `O(bins log n)`.
pub fn bin_counts_sorted(sorted: &[f64], edges: &[f64]) -> Vec<u64> {
    let mut counts = Vec::with_capacity(edges.len() + 1);
    let mut prev = 0usize;
    for &e in edges {
        let upto = sorted.partition_point(|&v| v <= e);
        counts.push((upto.saturating_sub(prev)) as u64);
        prev = prev.max(upto);
    }
    counts.push((sorted.len().saturating_sub(prev)) as u64);
    counts
}

/// Population stability index `Σ (c_i - b_i) ln(c_i / b_i)` between the baseline and the
/// current bin counts, with proportions smoothed as
/// `(count_i + PSI_PSEUDO_COUNT) / (total + PSI_PSEUDO_COUNT * bins)` (see
/// [`PSI_PSEUDO_COUNT`]).
///
/// Slices of different lengths are padded with zero counts; an empty side gives 0 (no
/// evidence of a shift).
pub fn psi_from_counts(base: &[u64], cur: &[u64]) -> f64 {
    let bins = base.len().max(cur.len());
    let nb: u64 = base.iter().sum();
    let nc: u64 = cur.iter().sum();
    if bins == 0 || nb == 0 || nc == 0 {
        return 0.0;
    }
    let db = nb as f64 + PSI_PSEUDO_COUNT * bins as f64;
    let dc = nc as f64 + PSI_PSEUDO_COUNT * bins as f64;
    (0..bins)
        .map(|i| {
            let b = (base.get(i).copied().unwrap_or(0) as f64 + PSI_PSEUDO_COUNT) / db;
            let c = (cur.get(i).copied().unwrap_or(0) as f64 + PSI_PSEUDO_COUNT) / dc;
            (c - b) * (c / b).ln()
        })
        .sum()
}

// ---------------------------------------------------------------------------------------
// Kolmogorov–Smirnov
// ---------------------------------------------------------------------------------------

/// Two-sample Kolmogorov–Smirnov result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KsTest {
    /// `sup |F_a(x) - F_b(x)|` over all x.
    pub d: f64,
    /// Asymptotic two-sided p-value.
    pub p_value: f64,
}

/// KS statistic `D` of two ascending, NaN-free samples in `O(n + m)`.
///
/// Both ECDFs are advanced past every copy of the next smallest value before comparing,
/// so tied values (within or across samples) are handled exactly: the ECDFs are only
/// compared where both are right-continuous step values.
pub fn ks_statistic_sorted(a: &[f64], b: &[f64]) -> f64 {
    let (n, m) = (a.len(), b.len());
    if n == 0 || m == 0 {
        return 0.0;
    }
    let (mut i, mut j) = (0usize, 0usize);
    let mut d: f64 = 0.0;
    while i < n && j < m {
        let x = a[i].min(b[j]);
        while i < n && a[i] <= x {
            i += 1;
        }
        while j < m && b[j] <= x {
            j += 1;
        }
        d = d.max((i as f64 / n as f64 - j as f64 / m as f64).abs());
    }
    // Once one sample is exhausted its ECDF is 1 and the other only climbs towards 1, so
    // the gap can only shrink from here.
    d
}

/// Kolmogorov distribution survival function `Q(λ) = 2 Σ_{k≥1} (-1)^{k-1} e^{-2k²λ²}`.
///
/// The alternating series converges slowly for small λ, so below 1.18 the equivalent
/// Jacobi-theta form `1 - √(2π)/λ Σ e^{-(2k-1)²π²/(8λ²)}` is used instead.
pub fn kolmogorov_sf(lambda: f64) -> f64 {
    if lambda.is_nan() {
        return f64::NAN;
    }
    if lambda <= 0.0 {
        return 1.0;
    }
    let q = if lambda < 1.18 {
        let y = -PI * PI / (8.0 * lambda * lambda);
        let mut sum = 0.0;
        for k in 1..=100u32 {
            let odd = f64::from(2 * k - 1);
            let term = (odd * odd * y).exp();
            sum += term;
            if term < 1e-17 * sum {
                break;
            }
        }
        1.0 - (2.0 * PI).sqrt() / lambda * sum
    } else {
        let mut sum = 0.0;
        let mut sign = 1.0;
        for k in 1..=100u32 {
            let kf = f64::from(k);
            let term = (-2.0 * kf * kf * lambda * lambda).exp();
            sum += sign * term;
            if term < 1e-17 * sum.abs() {
                break;
            }
            sign = -sign;
        }
        2.0 * sum
    };
    q.clamp(0.0, 1.0)
}

/// Asymptotic p-value for a two-sample KS statistic `d` with sample sizes `n` and `m`,
/// using the effective size `ne = nm/(n+m)` and Stephens' small-sample correction
/// `λ = (√ne + 0.12 + 0.11/√ne) d`.
pub fn ks_p_value(d: f64, n: usize, m: usize) -> f64 {
    if n == 0 || m == 0 {
        return 1.0;
    }
    let ne = (n as f64 * m as f64) / (n as f64 + m as f64);
    let sq = ne.sqrt();
    kolmogorov_sf((sq + 0.12 + 0.11 / sq) * d)
}

/// Smallest `D` whose [`ks_p_value`] is at most `alpha` for sample sizes `n` and `m`
/// (bisection on the monotone Kolmogorov tail), so a KS alarm can be reported as
/// "statistic D crossed threshold D*" like every other method. Returns `+inf` for empty
/// samples or `alpha <= 0`, and 0 for `alpha >= 1`.
pub fn ks_critical_d(alpha: f64, n: usize, m: usize) -> f64 {
    if n == 0 || m == 0 || alpha.is_nan() || alpha <= 0.0 {
        return f64::INFINITY;
    }
    if alpha >= 1.0 {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 20.0f64);
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if kolmogorov_sf(mid) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let ne = (n as f64 * m as f64) / (n as f64 + m as f64);
    let sq = ne.sqrt();
    hi / (sq + 0.12 + 0.11 / sq)
}

/// Two-sample KS test of unsorted samples (NaN ignored).
pub fn ks_two_sample(a: &[f64], b: &[f64]) -> KsTest {
    let mut sa: Vec<f64> = a.iter().copied().filter(|v| !v.is_nan()).collect();
    let mut sb: Vec<f64> = b.iter().copied().filter(|v| !v.is_nan()).collect();
    sa.sort_by(f64::total_cmp);
    sb.sort_by(f64::total_cmp);
    ks_test_sorted(&sa, &sb)
}

/// Two-sample KS test of ascending, NaN-free samples.
pub fn ks_test_sorted(a: &[f64], b: &[f64]) -> KsTest {
    let d = ks_statistic_sorted(a, b);
    KsTest { d, p_value: ks_p_value(d, a.len(), b.len()) }
}

// ---------------------------------------------------------------------------------------
// Categorical mixes
// ---------------------------------------------------------------------------------------

/// Jensen–Shannon distance (square root of the base-2 JS divergence, so in `[0, 1]`)
/// between two count vectors over the same categories in the same order.
///
/// Missing trailing categories count as zero. If either side has no observations there is
/// nothing to compare and the distance is 0.
pub fn js_distance(p: &[u64], q: &[u64]) -> f64 {
    let sp: u64 = p.iter().sum();
    let sq: u64 = q.iter().sum();
    if sp == 0 || sq == 0 {
        return 0.0;
    }
    let len = p.len().max(q.len());
    let mut div = 0.0;
    for i in 0..len {
        let a = p.get(i).copied().unwrap_or(0) as f64 / sp as f64;
        let b = q.get(i).copied().unwrap_or(0) as f64 / sq as f64;
        let m = 0.5 * (a + b);
        if a > 0.0 {
            div += 0.5 * a * (a / m).log2();
        }
        if b > 0.0 {
            div += 0.5 * b * (b / m).log2();
        }
    }
    div.clamp(0.0, 1.0).sqrt()
}

/// Aligns two category→count maps on the union of their keys (sorted), returning
/// `(keys, base_counts, cur_counts)`.
pub fn align_categories(
    base: &BTreeMap<String, u64>,
    cur: &BTreeMap<String, u64>,
) -> (Vec<String>, Vec<u64>, Vec<u64>) {
    let mut keys: Vec<String> = base.keys().chain(cur.keys()).cloned().collect();
    keys.sort();
    keys.dedup();
    let b = keys.iter().map(|k| base.get(k).copied().unwrap_or(0)).collect();
    let c = keys.iter().map(|k| cur.get(k).copied().unwrap_or(0)).collect();
    (keys, b, c)
}

/// [`js_distance`] between two category→count maps, aligning categories by name.
pub fn js_distance_maps(base: &BTreeMap<String, u64>, cur: &BTreeMap<String, u64>) -> f64 {
    let (_, b, c) = align_categories(base, cur);
    js_distance(&b, &c)
}

/// Chi-square test result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChiSquareTest {
    /// Pearson statistic.
    pub statistic: f64,
    /// Degrees of freedom (categories seen on either side, minus one).
    pub df: u32,
    /// Upper-tail p-value.
    pub p_value: f64,
}

/// Pearson chi-square test of homogeneity of the 2×K table (baseline row, current row).
///
/// Categories absent from both rows are dropped (they carry no information and would add
/// spurious degrees of freedom). Gives statistic 0 and p 1 when either row is empty or
/// fewer than two categories occur.
pub fn chi_square_homogeneity(base: &[u64], cur: &[u64]) -> ChiSquareTest {
    let nb: u64 = base.iter().sum();
    let nc: u64 = cur.iter().sum();
    let none = ChiSquareTest { statistic: 0.0, df: 0, p_value: 1.0 };
    if nb == 0 || nc == 0 {
        return none;
    }
    let n = (nb + nc) as f64;
    let mut stat = 0.0;
    let mut k = 0u32;
    for i in 0..base.len().max(cur.len()) {
        let b = base.get(i).copied().unwrap_or(0) as f64;
        let c = cur.get(i).copied().unwrap_or(0) as f64;
        let t = b + c;
        if t == 0.0 {
            continue;
        }
        k += 1;
        let eb = t * nb as f64 / n;
        let ec = t * nc as f64 / n;
        stat += (b - eb) * (b - eb) / eb + (c - ec) * (c - ec) / ec;
    }
    if k < 2 {
        return none;
    }
    let df = k - 1;
    ChiSquareTest { statistic: stat, df, p_value: chi2_sf(stat, f64::from(df)) }
}

// ---------------------------------------------------------------------------------------
// Rates
// ---------------------------------------------------------------------------------------

/// Two-proportion z-test result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZTest {
    /// `(p_cur - p_base) / se_pooled`: positive when the current rate is higher.
    pub z: f64,
    /// Two-sided p-value.
    pub p_value: f64,
}

/// Pooled two-proportion z-test of `cur_hits / cur_n` against `base_hits / base_n`.
///
/// The pooled variance is the right null for "has the rate changed", and it stays defined
/// when one side has no hits. Empty samples or a pooled rate of exactly 0 or 1 (the two
/// proportions are then equal) give z 0 and p 1.
pub fn two_proportion_z(base_hits: u64, base_n: u64, cur_hits: u64, cur_n: u64) -> ZTest {
    if base_n == 0 || cur_n == 0 {
        return ZTest { z: 0.0, p_value: 1.0 };
    }
    let (nb, nc) = (base_n as f64, cur_n as f64);
    let pb = base_hits as f64 / nb;
    let pc = cur_hits as f64 / nc;
    let pooled = (base_hits + cur_hits) as f64 / (nb + nc);
    let var = pooled * (1.0 - pooled) * (1.0 / nb + 1.0 / nc);
    if var <= 0.0 {
        return ZTest { z: 0.0, p_value: 1.0 };
    }
    let z = (pc - pb) / var.sqrt();
    ZTest { z, p_value: (2.0 * normal_sf(z.abs())).min(1.0) }
}

/// The probability whose odds are `odds_ratio` times the odds of `q` (for `0 < q < 1`).
///
/// Shifts for the Bernoulli CUSUM are expressed as odds ratios so one setting means the
/// same thing at an error rate of 1% and at a failure rate of 10%.
pub fn shift_odds(q: f64, odds_ratio: f64) -> f64 {
    let odds = q / (1.0 - q) * odds_ratio;
    odds / (1.0 + odds)
}

/// Log-likelihood ratios of one Bernoulli observation under `q1` versus `q0`: the
/// increment for an event and for a non-event, `(ln(q1/q0), ln((1-q1)/(1-q0)))`.
pub fn bernoulli_llr(q0: f64, q1: f64) -> (f64, f64) {
    ((q1 / q0).ln(), ((1.0 - q1) / (1.0 - q0)).ln())
}

/// One CUSUM step: `max(0, s + increment)`. The clamp at 0 is what makes CUSUM forget
/// evidence for "no change" so it reacts to a change whenever it starts.
pub fn cusum_update(s: f64, increment: f64) -> f64 {
    (s + increment).max(0.0)
}

/// Mid-rank normal score of `x` against an ascending, NaN-free reference sample.
///
/// With `lt` reference values below `x` and `eq` equal to it, `u = (lt + eq/2 + 1/2)/(n+1)`
/// is the mid-rank of `x` among the `n + 1` values, and the score is `Φ⁻¹(u)`. If `x` comes
/// from the reference distribution the score is (nearly) standard normal whatever that
/// distribution is (heavy tails, ties, discreteness), which is what lets one Gaussian
/// CUSUM serve latency, cost and token counts alike. Ties push scores towards 0, which
/// only makes the detector more conservative. An empty reference gives 0.
pub fn normal_score(sorted_ref: &[f64], x: f64) -> f64 {
    if x.is_nan() {
        return 0.0;
    }
    let (lt, le) = ranks(sorted_ref, x);
    score_from_ranks(lt, le, sorted_ref.len())
}

/// Values below `x` and values at most `x` in an ascending sample.
fn ranks(sorted: &[f64], x: f64) -> (usize, usize) {
    let lt = sorted.partition_point(|&v| v < x);
    // Continuous values rarely tie: one comparison settles `le` then.
    let le = if sorted.get(lt).is_some_and(|&v| v <= x) { lt + sorted[lt..].partition_point(|&v| v <= x) } else { lt };
    (lt, le)
}

fn score_from_ranks(lt: usize, le: usize, n: usize) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let u = (lt as f64 + 0.5 * (le - lt) as f64 + 0.5) / (n as f64 + 1.0);
    normal_quantile(u)
}

/// Pending changes a [`LazySorted`] holds before merging them in.
const LAZY_PENDING: usize = 32;

/// An ascending multiset of NaN-free values (a sliding baseline) whose inserts and
/// removals are buffered and merged in one pass every [`LAZY_PENDING`] changes.
///
/// A baseline of 5,000 values takes one in and one out per observation; kept as a plain
/// sorted vector, each step shifted a third of it on average (13 KB at 5,000), which was
/// the drift thread's largest cost and swept the caches the request path shares. Reads
/// stay exact: ranks count the pending changes, and [`LazySorted::view`] merges them.
#[derive(Debug, Clone, Default)]
pub struct LazySorted {
    sorted: Vec<f64>,
    /// Values added since the last merge.
    ins: Vec<f64>,
    /// Values of `sorted` removed since the last merge.
    del: Vec<f64>,
}

impl LazySorted {
    pub fn len(&self) -> usize {
        self.sorted.len() + self.ins.len() - self.del.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.sorted.clear();
        self.ins.clear();
        self.del.clear();
    }

    pub fn insert(&mut self, v: f64) {
        self.ins.push(v);
        self.maybe_flush();
    }

    /// Removes one copy of `v`, which must be one of the values (a baseline removes only
    /// what it added).
    pub fn remove(&mut self, v: f64) {
        if let Some(i) = self.ins.iter().position(|&x| x == v) {
            self.ins.swap_remove(i);
            return;
        }
        debug_assert!(
            {
                let (lt, le) = ranks(&self.sorted, v);
                le - lt > self.del.iter().filter(|&&x| x == v).count()
            },
            "removing {v}, which is not in the set"
        );
        self.del.push(v);
        self.maybe_flush();
    }

    /// Removes one copy of `old` (one of the values) and inserts `new`.
    pub fn replace(&mut self, old: f64, new: f64) {
        self.remove(old);
        self.insert(new);
    }

    fn maybe_flush(&mut self) {
        if self.ins.len() + self.del.len() >= LAZY_PENDING {
            self.flush();
        }
    }

    /// Merges the pending changes, after which [`LazySorted::view`] borrows.
    pub fn flush(&mut self) {
        if self.ins.is_empty() && self.del.is_empty() {
            return;
        }
        self.sorted = merge_sorted(&self.sorted, &self.ins, &self.del);
        self.ins.clear();
        self.del.clear();
    }

    /// The values, ascending: borrowed after a [`LazySorted::flush`], merged otherwise.
    pub fn view(&self) -> std::borrow::Cow<'_, [f64]> {
        if self.ins.is_empty() && self.del.is_empty() {
            std::borrow::Cow::Borrowed(&self.sorted)
        } else {
            std::borrow::Cow::Owned(merge_sorted(&self.sorted, &self.ins, &self.del))
        }
    }

    /// [`normal_score`] of `x` against the values, pending changes included.
    pub fn normal_score(&self, x: f64) -> f64 {
        if x.is_nan() {
            return 0.0;
        }
        let (mut lt, mut le) = ranks(&self.sorted, x);
        for &v in &self.ins {
            lt += usize::from(v < x);
            le += usize::from(v <= x);
        }
        for &v in &self.del {
            lt -= usize::from(v < x);
            le -= usize::from(v <= x);
        }
        score_from_ranks(lt, le, self.len())
    }
}

/// `sorted` with `ins` added and `del` removed (one copy each), copying the runs between
/// the changes whole. `ins` and `del` are the few pending changes, in any order.
fn merge_sorted(sorted: &[f64], ins: &[f64], del: &[f64]) -> Vec<f64> {
    let mut ins = ins.to_vec();
    let mut del = del.to_vec();
    ins.sort_by(f64::total_cmp);
    del.sort_by(f64::total_cmp);
    let mut out = Vec::with_capacity((sorted.len() + ins.len()).saturating_sub(del.len()));
    let (mut at, mut i, mut d) = (0, 0, 0);
    while i < ins.len() || d < del.len() {
        let take_ins = d == del.len() || (i < ins.len() && ins[i] < del[d]);
        let x = if take_ins { ins[i] } else { del[d] };
        let pos = at + sorted[at..].partition_point(|&v| v < x);
        out.extend_from_slice(&sorted[at..pos]);
        at = pos;
        if take_ins {
            out.push(x);
            i += 1;
        } else {
            if sorted.get(at) == Some(&x) {
                at += 1;
            }
            d += 1;
        }
    }
    out.extend_from_slice(&sorted[at..]);
    out
}

/// Median of an ascending sample (mean of the two middle values for even sizes); NaN when
/// empty.
pub fn median_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rel_close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(f64::MIN_POSITIVE)
    }

    /// Deterministic LCG so tests need no dependencies.
    struct Lcg(u64);
    impl Lcg {
        fn next_f64(&mut self) -> f64 {
            self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn normal_tail_values() {
        // Reference values from python3 math.erfc (double precision).
        assert!(rel_close(normal_cdf(1.96), 0.975_002_104_851_779_5, 1.2e-7));
        assert!(rel_close(normal_sf(5.0), 2.866_515_718_791_946e-7, 1.2e-7));
        assert!(rel_close(normal_sf(8.0), 6.220_960_574_271_819e-16, 1.2e-7));
        assert!(rel_close(normal_cdf(-3.0) + normal_sf(-3.0), 1.0, 1e-12));
        assert!(rel_close(normal_sf(-3.0), 0.998_650_101_968_369_9, 1.2e-7));
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((erfc(0.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn normal_quantile_inverts_cdf() {
        // Reference values from python3 statistics.NormalDist().inv_cdf.
        assert!(rel_close(normal_quantile(0.975), 1.959_963_984_540_053_6, 1e-8));
        assert!(rel_close(normal_quantile(1e-6), -4.753_424_308_822_899, 1e-8));
        assert!(rel_close(normal_quantile(0.3), -0.524_400_512_708_040_7, 1e-8));
        assert!(rel_close(normal_quantile(0.02), -2.053_748_910_631_822_5, 1e-8));
        assert_eq!(normal_quantile(0.5), 0.0);
        assert_eq!(normal_quantile(0.0), f64::NEG_INFINITY);
        assert_eq!(normal_quantile(1.0), f64::INFINITY);
        for i in 1..200 {
            let p = f64::from(i) / 200.0;
            assert!((normal_cdf(normal_quantile(p)) - p).abs() < 2e-7, "p={p}");
        }
    }

    #[test]
    fn chi2_sf_matches_closed_forms() {
        // Even df: Q = e^{-x/2} Σ_{k<df/2} (x/2)^k / k!; df = 1: Q = 2 Φ̄(√x).
        let even = |x: f64, df: u32| {
            let h = x / 2.0;
            let mut term = 1.0;
            let mut sum = 0.0;
            for k in 0..df / 2 {
                if k > 0 {
                    term *= h / f64::from(k);
                }
                sum += term;
            }
            (-h).exp() * sum
        };
        for &(x, df) in &[(10.0, 4u32), (30.0, 20), (0.5, 2), (80.0, 10), (3.0, 40)] {
            assert!(rel_close(chi2_sf(x, f64::from(df)), even(x, df), 1e-10), "x={x} df={df}");
        }
        for &x in &[0.1, 1.0, 3.84, 10.83, 30.0] {
            assert!(rel_close(chi2_sf(x, 1.0), 2.0 * normal_sf(x.sqrt()), 3e-7), "x={x}");
        }
        assert!(rel_close(chi2_sf(10.0, 4.0), 0.040_427_681_994_512_8, 1e-10));
        assert_eq!(chi2_sf(0.0, 3.0), 1.0);
    }

    #[test]
    fn quantile_edges_and_counting_rule() {
        let base: Vec<f64> = (1..=100).map(f64::from).collect();
        let edges = quantile_edges(&base, 4);
        assert_eq!(edges, vec![25.0, 50.0, 75.0]);
        assert_eq!(bin_counts(&base, &edges), vec![25, 25, 25, 25]);
        // Boundary values belong to the bin they close: (-inf, 25], (25, 50], ...
        assert_eq!(bin_index(25.0, &edges), 0);
        assert_eq!(bin_index(25.000_001, &edges), 1);
        assert_eq!(bin_index(-1e300, &edges), 0);
        assert_eq!(bin_index(f64::INFINITY, &edges), 3);
        assert_eq!(bin_counts(&[f64::NAN, 80.0], &edges), vec![0, 0, 0, 1]);
        // Sorted fast path agrees with the plain counter.
        let mut rng = Lcg(7);
        let mut vals: Vec<f64> = (0..1000).map(|_| (rng.next_f64() * 120.0).floor()).collect();
        let plain = bin_counts(&vals, &edges);
        vals.sort_by(f64::total_cmp);
        assert_eq!(bin_counts_sorted(&vals, &edges), plain);
    }

    #[test]
    fn quantile_edges_with_ties() {
        // Constant baseline: one bin below, one at, one above the constant.
        let edges = quantile_edges(&[2.0; 50], 10);
        assert_eq!(edges, vec![2.0f64.next_down(), 2.0]);
        assert_eq!(bin_counts(&[1.0, 2.0, 3.0], &edges), vec![1, 1, 1]);
        // Heavy ties in the middle collapse edges but keep them increasing.
        let mut base = vec![5.0; 80];
        base.extend((0..20).map(f64::from));
        let edges = quantile_edges(&base, 10);
        assert!(edges.windows(2).all(|w| w[0] < w[1]));
        assert!(quantile_edges(&[], 10).is_empty());
        assert!(quantile_edges(&[1.0, 2.0], 1).is_empty());
    }

    #[test]
    fn psi_matches_explicit_formula() {
        // Independent computation: smoothed shares then the symmetric KL form written as
        // KL(c||b) + KL(b||c).
        let cases: [(&[u64], &[u64]); 4] = [
            (&[10, 20, 30, 0], &[5, 25, 40, 10]),
            (&[100, 100], &[100, 100]),
            (&[1, 0, 0], &[0, 0, 7]),
            (&[3, 9, 27, 81], &[81, 27, 9, 3]),
        ];
        for (base, cur) in cases {
            let k = base.len() as f64;
            let tb = base.iter().sum::<u64>() as f64 + 0.5 * k;
            let tc = cur.iter().sum::<u64>() as f64 + 0.5 * k;
            let mut kl_cb = 0.0;
            let mut kl_bc = 0.0;
            for i in 0..base.len() {
                let b = (base[i] as f64 + 0.5) / tb;
                let c = (cur[i] as f64 + 0.5) / tc;
                kl_cb += c * (c / b).ln();
                kl_bc += b * (b / c).ln();
            }
            assert!((psi_from_counts(base, cur) - (kl_cb + kl_bc)).abs() < 1e-12);
        }
        // python3 reference for the first case.
        assert!((psi_from_counts(&[10, 20, 30, 0], &[5, 25, 40, 10]) - 0.427_697_720_117_093_7).abs() < 1e-12);
        assert_eq!(psi_from_counts(&[5, 5], &[5, 5]), 0.0);
        assert_eq!(psi_from_counts(&[], &[1]), 0.0);
        assert_eq!(psi_from_counts(&[0, 0], &[1, 2]), 0.0);
        assert!(psi_from_counts(&[4], &[1, 3]) > 0.0);
    }

    /// O(n·(n+m)) reference: evaluate both ECDFs at every observed point.
    fn brute_ks(a: &[f64], b: &[f64]) -> f64 {
        let ecdf = |s: &[f64], t: f64| s.iter().filter(|&&x| x <= t).count() as f64 / s.len() as f64;
        a.iter().chain(b.iter()).map(|&t| (ecdf(a, t) - ecdf(b, t)).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn ks_statistic_matches_brute_force_with_ties() {
        let mut rng = Lcg(42);
        for round in 0..200 {
            let n = 1 + round % 37;
            let m = 1 + (round * 7) % 53;
            // Coarse values force plenty of ties within and across samples.
            let levels = 3.0 + f64::from(round as u32 % 10);
            let shift = if round % 2 == 0 { 0.0 } else { 1.0 };
            let a: Vec<f64> = (0..n).map(|_| (rng.next_f64() * levels).floor()).collect();
            let b: Vec<f64> = (0..m).map(|_| (rng.next_f64() * levels).floor() + shift).collect();
            let fast = ks_two_sample(&a, &b).d;
            assert!((fast - brute_ks(&a, &b)).abs() < 1e-12, "round {round}");
        }
        assert_eq!(ks_two_sample(&[1.0, 2.0], &[1.0, 2.0]).d, 0.0);
        assert_eq!(ks_two_sample(&[1.0, 2.0], &[3.0, 4.0]).d, 1.0);
        assert_eq!(ks_two_sample(&[], &[3.0]).p_value, 1.0);
    }

    #[test]
    fn ks_p_value_reference() {
        // python3: both Kolmogorov series summed to 200 terms agree on these.
        assert!(rel_close(kolmogorov_sf(1.0), 0.269_999_671_677_354_6, 1e-12));
        assert!(rel_close(kolmogorov_sf(0.5), 0.963_945_243_664_875_1, 1e-12));
        assert!(rel_close(kolmogorov_sf(1.36), 0.049_485_876_755_377_88, 1e-12));
        assert!(rel_close(kolmogorov_sf(2.0), 6.709_252_557_796_953e-4, 1e-10));
        assert!((kolmogorov_sf(1.18 - 1e-12) - kolmogorov_sf(1.18)).abs() < 1e-10);
        assert_eq!(kolmogorov_sf(0.0), 1.0);
        // Worked example with ties: D = 20/63, ne = 63/16, p from python3.
        let a = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 9.0];
        let b = [2.0, 2.5, 3.0, 5.0, 6.0, 7.0, 7.0];
        let t = ks_two_sample(&a, &b);
        assert!((t.d - 20.0 / 63.0).abs() < 1e-12);
        assert!(rel_close(t.p_value, 0.734_997_985_741_987, 1e-10));
    }

    #[test]
    fn ks_critical_d_inverts_p_value() {
        for &(alpha, n, m) in &[(1e-6, 300usize, 5000usize), (0.05, 20, 30), (1e-3, 500, 500)] {
            let d = ks_critical_d(alpha, n, m);
            assert!(ks_p_value(d, n, m) <= alpha * (1.0 + 1e-9));
            assert!(ks_p_value(d * (1.0 - 1e-6), n, m) > alpha);
        }
        assert_eq!(ks_critical_d(0.0, 5, 5), f64::INFINITY);
        assert_eq!(ks_critical_d(1.0, 5, 5), 0.0);
    }

    #[test]
    fn js_distance_matches_definition() {
        // Definition with natural logs divided by ln 2.
        let reference = |p: &[u64], q: &[u64]| {
            let sp: u64 = p.iter().sum();
            let sq: u64 = q.iter().sum();
            let mut d = 0.0;
            for i in 0..p.len() {
                let a = p[i] as f64 / sp as f64;
                let b = q[i] as f64 / sq as f64;
                let m = (a + b) / 2.0;
                if a > 0.0 {
                    d += a * (a / m).ln() / 2.0;
                }
                if b > 0.0 {
                    d += b * (b / m).ln() / 2.0;
                }
            }
            (d / std::f64::consts::LN_2).sqrt()
        };
        let cases: [(&[u64], &[u64]); 4] =
            [(&[90, 8, 2], &[82, 8, 10]), (&[1, 0], &[0, 1]), (&[3, 1, 0], &[1, 1, 2]), (&[5, 5], &[50, 50])];
        for (p, q) in cases {
            assert!((js_distance(p, q) - reference(p, q)).abs() < 1e-12);
        }
        assert!((js_distance(&[90, 8, 2], &[82, 8, 10]) - 0.149_469_665_481_202_08).abs() < 1e-12);
        assert!((js_distance(&[1, 0], &[0, 1]) - 1.0).abs() < 1e-12);
        assert_eq!(js_distance(&[], &[1]), 0.0);
    }

    #[test]
    fn js_maps_align_categories() {
        let base: BTreeMap<String, u64> = [("stop".to_string(), 90), ("length".to_string(), 10)].into();
        let cur: BTreeMap<String, u64> = [("tool_calls".to_string(), 5), ("stop".to_string(), 90)].into();
        let (keys, b, c) = align_categories(&base, &cur);
        assert_eq!(keys, vec!["length", "stop", "tool_calls"]);
        assert_eq!(b, vec![10, 90, 0]);
        assert_eq!(c, vec![0, 90, 5]);
        assert!((js_distance_maps(&base, &cur) - js_distance(&[10, 90, 0], &[0, 90, 5])).abs() < 1e-15);
        assert_eq!(js_distance_maps(&base, &base), 0.0);
    }

    #[test]
    fn chi_square_homogeneity_textbook() {
        // 2×3 table worked by hand: rows (20, 30, 50) and (30, 30, 40), column totals
        // (50, 60, 90), expected 25/30/45 in each row.
        let t = chi_square_homogeneity(&[20, 30, 50], &[30, 30, 40]);
        let expected_stat = 2.0 * (25.0 / 25.0 + 0.0 + 25.0 / 45.0);
        assert!((t.statistic - expected_stat).abs() < 1e-12);
        assert_eq!(t.df, 2);
        assert!((t.p_value - (-expected_stat / 2.0).exp()).abs() < 1e-12);
        // Unused categories add no degrees of freedom.
        assert_eq!(chi_square_homogeneity(&[20, 0, 30, 50], &[30, 0, 30, 40]).df, 2);
        assert_eq!(chi_square_homogeneity(&[5], &[7]).p_value, 1.0);
    }

    #[test]
    fn two_proportion_z_textbook() {
        for &(x1, n1, x2, n2) in
            &[(900u64, 1000u64, 160u64, 200u64), (45, 50, 40, 50), (1, 3000, 9, 400), (0, 100, 3, 100)]
        {
            let (p1, p2) = (x1 as f64 / n1 as f64, x2 as f64 / n2 as f64);
            let pp = (x1 + x2) as f64 / (n1 + n2) as f64;
            let z = (p2 - p1) / (pp * (1.0 - pp) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
            let t = two_proportion_z(x1, n1, x2, n2);
            assert!((t.z - z).abs() < 1e-12);
            assert!(rel_close(t.p_value, 2.0 * normal_sf(z.abs()), 1e-12));
        }
        // python3 reference: z = -4.0215..., p = math.erfc(|z|/√2).
        let t = two_proportion_z(900, 1000, 160, 200);
        assert!((t.z + 4.021_505_531_333_317).abs() < 1e-12);
        assert!(rel_close(t.p_value, 5.782_734_984_687_09e-5, 2e-7));
        assert_eq!(two_proportion_z(10, 10, 5, 5), ZTest { z: 0.0, p_value: 1.0 });
        assert_eq!(two_proportion_z(0, 0, 5, 5).p_value, 1.0);
    }

    #[test]
    fn cusum_pieces() {
        let q1 = shift_odds(0.1, 1.6);
        assert!(((q1 / (1.0 - q1)) / (0.1 / 0.9) - 1.6).abs() < 1e-12);
        let (up, down) = bernoulli_llr(0.1, 0.2);
        assert!((up - 2f64.ln()).abs() < 1e-12);
        assert!((down - (0.8f64 / 0.9).ln()).abs() < 1e-12);
        // Expected increment is -KL(q0||q1) under q0 and +KL(q1||q0) under q1.
        assert!(0.1 * up + 0.9 * down < 0.0);
        assert!(0.2 * up + 0.8 * down > 0.0);
        assert_eq!(cusum_update(1.0, -3.0), 0.0);
        assert_eq!(cusum_update(1.0, 0.5), 1.5);
    }

    #[test]
    fn lazy_sorted_reads_like_a_sorted_vector() {
        let mut seed = 7u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 20) as f64 // few values: many ties
        };
        let mut lazy = LazySorted::default();
        let mut plain: Vec<f64> = Vec::new();
        for step in 0..5000 {
            let v = next() + 0.5 * f64::from(u8::from(next() > 10.0));
            match step % 3 {
                0 | 1 => {
                    lazy.insert(v);
                    let at = plain.partition_point(|&x| x < v);
                    plain.insert(at, v);
                }
                _ => {
                    if plain.is_empty() {
                        continue;
                    }
                    let old = plain[(next() as usize * 7) % plain.len()];
                    lazy.replace(old, v);
                    let at = plain.partition_point(|&x| x < old);
                    plain.remove(at);
                    let at = plain.partition_point(|&x| x < v);
                    plain.insert(at, v);
                }
            }
            if step % 5 == 0 && !plain.is_empty() {
                let old = plain[(next() as usize * 13) % plain.len()];
                lazy.remove(old);
                let at = plain.partition_point(|&x| x < old);
                plain.remove(at);
            }
            assert_eq!(lazy.len(), plain.len());
            let x = next() - 0.25;
            assert_eq!(lazy.normal_score(x), normal_score(&plain, x), "step {step}");
            assert_eq!(lazy.normal_score(x.round()), normal_score(&plain, x.round()), "step {step}");
            if step % 97 == 0 {
                assert_eq!(*lazy.view(), plain[..], "step {step}");
            }
        }
        lazy.flush();
        assert!(matches!(lazy.view(), std::borrow::Cow::Borrowed(_)));
        assert_eq!(*lazy.view(), plain[..]);
        lazy.clear();
        assert!(lazy.is_empty() && lazy.view().is_empty());
    }

    #[test]
    fn normal_scores_are_mid_ranks() {
        let reference: Vec<f64> = (1..=99).map(f64::from).collect();
        assert!(normal_score(&reference, 50.0).abs() < 1e-12);
        assert!((normal_score(&reference, 1000.0) - normal_quantile(99.5 / 100.0)).abs() < 1e-12);
        assert!((normal_score(&reference, -5.0) + normal_quantile(99.5 / 100.0)).abs() < 1e-12);
        // All ties: a value equal to a constant reference scores 0.
        assert!(normal_score(&[3.0; 10], 3.0).abs() < 1e-12);
        assert_eq!(normal_score(&[], 1.0), 0.0);
        assert_eq!(median_sorted(&[1.0, 2.0, 10.0]), 2.0);
        assert_eq!(median_sorted(&[1.0, 2.0, 4.0, 10.0]), 3.0);
        assert!(median_sorted(&[]).is_nan());
    }
}
