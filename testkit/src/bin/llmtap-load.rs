//! `llmtap-load`: the benchmark load generator.
//!
//! - `open`: constant arrival rate. Request i is due at a random point of the i-th 1/rate
//!   slot (`--arrivals slotted`, the default, as the harness runs it), at start + i/rate
//!   (`even`), or after exponential gaps (`poisson`); latency is measured from that scheduled time, so a stalled target cannot
//!   hide behind requests it delayed (no coordinated omission). Requests that could not
//!   even be started on time count. A plain thread paces the sends to within tens of
//!   microseconds.
//! - `closed`: C connections each sending back to back, for maximum throughput.
//! - `streams`: C streams held open at once (the upstream paces chunks), for memory.
//!
//! Reports JSON on stdout: achieved rate, errors, and p50/p90/p99/p99.9/max of time to the
//! first body byte (TTFT for streams: the first SSE frame) and of total time, in ms.
//!
//! Several `--url`s (open mode) take turns: each gets `--slice` seconds at the rate, one
//! after another, until each has had `--duration`, and each gets a report of its own. Two
//! targets measured ten seconds apart meet different machines: on shared cores the
//! background (the host, the load generator's own core) moves a p99 by half from one ten
//! seconds to the next. Turns of a second spread that over every target alike.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Mode {
    Open,
    Closed,
    Streams,
}

/// When open-loop requests are due.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Arrivals {
    /// Exactly 1/rate apart.
    Even,
    /// One request in each 1/rate slot, at a random point of it: `even`'s rate, never
    /// more than two requests in any 1/rate window, and no fixed phase against periodic
    /// work elsewhere. An upstream whose timers fire on whole milliseconds (tokio's do) sends
    /// every stream's chunks on the same ticks; requests exactly 2 ms apart then all meet
    /// those bursts at one offset, which differs from run to run and sets the run's TTFT.
    Slotted,
    /// A Poisson process: exponential gaps with mean 1/rate.
    Poisson,
}

/// Offsets from the start at which requests are due, in order, all within `duration`
/// seconds. The same `seed` gives every target the same schedule.
fn schedule(arrivals: Arrivals, rate: f64, duration: f64, seed: u64) -> Vec<Duration> {
    let n = (rate * duration).round() as u64;
    let mut rng = fastrand::Rng::with_seed(seed);
    match arrivals {
        Arrivals::Even => (0..n).map(|i| Duration::from_secs_f64(i as f64 / rate)).collect(),
        Arrivals::Slotted => (0..n).map(|i| Duration::from_secs_f64((i as f64 + rng.f64()) / rate)).collect(),
        Arrivals::Poisson => {
            let mut at = 0.0;
            std::iter::from_fn(|| {
                // 1 - u is in (0, 1]: its logarithm is finite.
                at += -(1.0 - rng.f64()).ln() / rate;
                (at < duration).then(|| Duration::from_secs_f64(at))
            })
            .collect()
        }
    }
}

#[derive(Parser)]
#[command(name = "llmtap-load", about = "Open- and closed-loop HTTP load for llmtap benchmarks")]
struct Args {
    /// Target; several (open mode) take turns.
    #[arg(long, required = true)]
    url: Vec<String>,
    #[arg(long, value_enum, default_value_t = Mode::Open)]
    mode: Mode,
    /// Requests per second (open).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// How requests are spread over time (open).
    #[arg(long, value_enum, default_value_t = Arrivals::Slotted)]
    arrivals: Arrivals,
    /// Seed of the random schedules (`slotted`, `poisson`).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Connections or concurrent streams (closed, streams).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Request body (JSON).
    #[arg(long, default_value = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}"#)]
    body: String,
    /// Extra header `name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Seconds a request may take before it counts as an error.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Also write every completed request as a line `<scheduled µs after start> <ttfb µs>
    /// <total µs>` to this file, to see when the slow ones happened; with several `--url`s
    /// each line starts with the target's index (0 for the first `--url`).
    #[arg(long)]
    samples: Option<std::path::PathBuf>,
    /// With several `--url`s: seconds of one turn.
    #[arg(long, default_value_t = 1.0)]
    slice: f64,
    /// With several `--url`s: seconds of quiet after a turn's last response, before the
    /// next turn, so a proxy's background threads (recording the calls of its turn) are
    /// done before the next target's requests.
    #[arg(long, default_value_t = 0.1)]
    settle: f64,
}

/// The turns of a run with `targets` targets: (target, seconds, seed), in order. Each
/// target gets `duration` seconds in turns of `slice` (the last one shorter when `slice`
/// does not divide it). Round k's turns share one schedule seed, so every target gets the
/// same requests at the same offsets, and start one target later than round k - 1's, so
/// no target always follows the same one.
fn turns(targets: usize, duration: f64, slice: f64, seed: u64) -> Vec<(usize, f64, u64)> {
    let rounds = ((duration / slice) - 1e-9).ceil().max(1.0) as usize;
    let mut out = Vec::with_capacity(rounds * targets);
    for k in 0..rounds {
        let len = if k + 1 == rounds { duration - slice * k as f64 } else { slice };
        let round_seed = seed.wrapping_mul(1_000_003).wrapping_add(k as u64);
        out.extend((0..targets).map(|i| ((i + k) % targets, len, round_seed)));
    }
    out
}

struct Stats {
    ttfb: Mutex<Histogram<u64>>,
    total: Mutex<Histogram<u64>>,
    ok: AtomicU64,
    errors: AtomicU64,
    start: Instant,
    /// Microseconds this target's turns took (several targets).
    busy_us: AtomicU64,
    /// (scheduled, ttfb, total) in µs, when `--samples` asked for them.
    samples: Option<Mutex<Vec<(u64, u64, u64)>>>,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn one(client: &HttpClient, args: &Args, url: &str, scheduled: Instant, stats: &Stats) {
    let mut req = http::Request::post(url).header("content-type", "application/json");
    for h in &args.headers {
        if let Some((k, v)) = h.split_once(':') {
            req = req.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = req.body(Full::new(Bytes::from(args.body.clone()))) else {
        stats.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let work = async {
        let resp = client.request(req).await.map_err(|_| ())?;
        if !resp.status().is_success() {
            return Err(());
        }
        let mut body = resp.into_body();
        let mut first: Option<Duration> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| ())?;
            if first.is_none() && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                first = Some(scheduled.elapsed());
            }
        }
        Ok::<_, ()>((first.unwrap_or_else(|| scheduled.elapsed()), scheduled.elapsed()))
    };
    match tokio::time::timeout(Duration::from_secs_f64(args.timeout), work).await {
        Ok(Ok((ttfb, total))) => {
            stats.ok.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut h) = stats.ttfb.lock() {
                let _ = h.record(ttfb.as_micros() as u64);
            }
            if let Ok(mut h) = stats.total.lock() {
                let _ = h.record(total.as_micros() as u64);
            }
            if let Some(Ok(mut v)) = stats.samples.as_ref().map(Mutex::lock) {
                let at = scheduled.saturating_duration_since(stats.start).as_micros() as u64;
                v.push((at, ttfb.as_micros() as u64, total.as_micros() as u64));
            }
        }
        _ => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    let ms = |v: u64| v as f64 / 1000.0;
    serde_json::json!({
        "p50": ms(h.value_at_quantile(0.50)), "p90": ms(h.value_at_quantile(0.90)), "p99": ms(h.value_at_quantile(0.99)),
        "p999": ms(h.value_at_quantile(0.999)), "max": ms(h.max()), "mean": h.mean() / 1000.0,
    })
}

fn new_stats(start: Instant, samples: bool) -> anyhow::Result<Arc<Stats>> {
    Ok(Arc::new(Stats {
        ttfb: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
        total: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        start,
        busy_us: AtomicU64::new(0),
        samples: samples.then(|| Mutex::new(Vec::new())),
    }))
}

/// A target's report: `seconds` is the run's wall time, or with several targets the time
/// of this one's turns.
fn report(args: &Args, stats: &Stats, seconds: f64) -> anyhow::Result<serde_json::Value> {
    let ok = stats.ok.load(Ordering::Relaxed);
    let errors = stats.errors.load(Ordering::Relaxed);
    let poisoned = || anyhow::anyhow!("poisoned");
    Ok(serde_json::json!({
        "requests": ok + errors, "ok": ok, "errors": errors, "seconds": seconds,
        "achieved_rate": ok as f64 / (if args.mode == Mode::Open { args.duration } else { seconds }),
        "ttfb_ms": summary(&*stats.ttfb.lock().map_err(|_| poisoned())?),
        "total_ms": summary(&*stats.total.lock().map_err(|_| poisoned())?),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let several = args.url.len() > 1;
    if several && args.mode != Mode::Open {
        anyhow::bail!("--url given {} times: targets take turns in --mode open only", args.url.len());
    }
    if several && !(args.slice > 0.0 && args.slice.is_finite()) {
        anyhow::bail!("--slice {}: must be a positive number of seconds", args.slice);
    }
    if !(args.settle >= 0.0 && args.settle.is_finite()) {
        anyhow::bail!("--settle {}: must be zero or a positive number of seconds", args.settle);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(4096)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build_http();
        let start = Instant::now();
        let stats: Vec<Arc<Stats>> =
            args.url.iter().map(|_| new_stats(start, args.samples.is_some())).collect::<anyhow::Result<_>>()?;
        let run_for = Duration::from_secs_f64(args.duration);
        let mut tasks = Vec::new();
        match args.mode {
            Mode::Open => {
                // The pacer is a plain thread: tokio's timers fire on whole milliseconds, which
                // would add up to a millisecond of sender lateness to every measurement.
                let plan = if several {
                    turns(args.url.len(), args.duration, args.slice, args.seed)
                } else {
                    vec![(0, args.duration, args.seed)]
                };
                let handle = tokio::runtime::Handle::current();
                let (c, a, s) = (client.clone(), args.clone(), stats.clone());
                let pacer = std::thread::spawn(move || {
                    let mut tasks = Vec::new();
                    for (target, seconds, seed) in plan {
                        let begin = if several { Instant::now() } else { start };
                        let mut turn = Vec::new();
                        for offset in schedule(a.arrivals, a.rate, seconds, seed) {
                            let due = begin + offset;
                            std::thread::sleep(due.saturating_duration_since(Instant::now()));
                            let (c, a, s) = (c.clone(), a.clone(), s[target].clone());
                            turn.push(handle.spawn(async move { one(&c, &a, &a.url[target], due, &s).await }));
                        }
                        if several {
                            // The next turn starts once this one's responses are all in.
                            for t in turn {
                                let _ = handle.block_on(t);
                            }
                            s[target].busy_us.fetch_add(begin.elapsed().as_micros() as u64, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_secs_f64(a.settle));
                        } else {
                            tasks.extend(turn);
                        }
                    }
                    tasks
                });
                tasks = tokio::task::spawn_blocking(move || pacer.join())
                    .await?
                    .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
            }
            Mode::Closed => {
                for _ in 0..args.connections {
                    let (c, a, s) = (client.clone(), args.clone(), stats[0].clone());
                    tasks.push(tokio::spawn(async move {
                        while start.elapsed() < run_for {
                            one(&c, &a, &a.url[0], Instant::now(), &s).await;
                        }
                    }));
                }
            }
            Mode::Streams => {
                for _ in 0..args.connections {
                    let (c, a, s) = (client.clone(), args.clone(), stats[0].clone());
                    tasks.push(tokio::spawn(async move { one(&c, &a, &a.url[0], Instant::now(), &s).await }));
                }
            }
        }
        for t in tasks {
            let _ = t.await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let out = if several {
            let mut targets = Vec::with_capacity(stats.len());
            for (url, st) in args.url.iter().zip(&stats) {
                let mut r = report(&args, st, st.busy_us.load(Ordering::Relaxed) as f64 / 1e6)?;
                r["url"] = url.as_str().into();
                targets.push(r);
            }
            serde_json::json!({ "seconds": elapsed, "slice": args.slice, "targets": targets })
        } else {
            report(&args, &stats[0], elapsed)?
        };
        if let Some(path) = &args.samples {
            let mut lines = String::new();
            for (i, st) in stats.iter().enumerate() {
                let Some(Ok(mut v)) = st.samples.as_ref().map(Mutex::lock) else { continue };
                v.sort_unstable();
                for (at, ttfb, total) in v.iter() {
                    if several {
                        lines.push_str(&format!("{i} "));
                    }
                    lines.push_str(&format!("{at} {ttfb} {total}\n"));
                }
            }
            std::fs::write(path, lines)?;
        }
        println!("{out}");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(v: &[Duration]) -> Vec<f64> {
        v.iter().map(Duration::as_secs_f64).collect()
    }

    #[test]
    fn even_arrivals_are_exactly_one_over_rate_apart() {
        let s = secs(&schedule(Arrivals::Even, 500.0, 0.01, 7));
        assert_eq!(s, [0.0, 0.002, 0.004, 0.006, 0.008]);
    }

    #[test]
    fn slotted_arrivals_put_one_request_in_each_slot_at_no_fixed_phase() {
        let rate = 500.0;
        let s = secs(&schedule(Arrivals::Slotted, rate, 10.0, 1));
        assert_eq!(s.len(), 5000);
        for (i, at) in s.iter().enumerate() {
            let slot = i as f64 / rate;
            assert!((slot..slot + 1.0 / rate).contains(at), "request {i} at {at} s is outside its slot");
        }
        // The offsets within the slots cover the slot: no phase is favoured.
        let mut quarters = [0usize; 4];
        for (i, at) in s.iter().enumerate() {
            let phase = (at - i as f64 / rate) * rate;
            quarters[((phase * 4.0) as usize).min(3)] += 1;
        }
        assert!(quarters.iter().all(|&q| (1100..1400).contains(&q)), "{quarters:?}");
    }

    #[test]
    fn poisson_arrivals_keep_the_rate_within_the_duration() {
        let s = secs(&schedule(Arrivals::Poisson, 1000.0, 20.0, 3));
        assert!((19_500..20_500).contains(&s.len()), "{} requests for 20,000 expected", s.len());
        assert!(s.windows(2).all(|w| w[0] <= w[1]));
        assert!(s.iter().all(|&t| (0.0..20.0).contains(&t)));
        // Exponential gaps: about e^-1 of them exceed the mean.
        let long = s.windows(2).filter(|w| w[1] - w[0] > 0.001).count() as f64 / s.len() as f64;
        assert!((0.34..0.40).contains(&long), "{long}");
    }

    #[test]
    fn targets_take_turns_until_each_has_had_the_duration() {
        let t = turns(3, 2.5, 1.0, 7);
        let who: Vec<usize> = t.iter().map(|x| x.0).collect();
        // Each round starts one target later than the one before.
        assert_eq!(who, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        for target in 0..3 {
            let secs: f64 = t.iter().filter(|x| x.0 == target).map(|x| x.1).sum();
            assert!((secs - 2.5).abs() < 1e-9, "target {target} got {secs} s");
        }
        assert_eq!(t.iter().map(|x| x.1).collect::<Vec<_>>()[6..], [0.5, 0.5, 0.5]);
        // A round's turns share a seed (the same requests); rounds differ.
        assert!(t.chunks(3).all(|r| r.iter().all(|x| x.2 == r[0].2)));
        assert_ne!(t[0].2, t[3].2);
        assert_ne!(t[3].2, t[6].2);
    }

    #[test]
    fn a_slice_that_divides_the_duration_leaves_no_short_turn() {
        let t = turns(2, 3.0, 1.0, 1);
        assert_eq!(t.len(), 6);
        assert!(t.iter().all(|x| x.1 == 1.0));
        assert_eq!(turns(2, 0.5, 1.0, 1).iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(), [(0, 0.5), (1, 0.5)]);
    }

    #[test]
    fn a_seed_gives_every_target_the_same_schedule() {
        for a in [Arrivals::Slotted, Arrivals::Poisson] {
            assert_eq!(schedule(a, 500.0, 2.0, 9), schedule(a, 500.0, 2.0, 9));
            assert_ne!(schedule(a, 500.0, 2.0, 9), schedule(a, 500.0, 2.0, 10));
        }
    }
}
