//! CPU cost of the in-memory drift engine per call: what the drift thread spends at a given
//! request rate. Feeds synthetic calls (and a verdict for every other call) for a few apps,
//! routes and models, and prints nanoseconds per call.
//!
//! `cargo bench -p llmtap-scorer --bench drift_engine` (`-- --calls N` to change the count).

use std::time::Instant;

use llmtap_ingest::record::{ScoreRecord, TraceRecord};
use llmtap_scorer::drift::{CallObs, DriftConfig, DriftEngine, Input};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut calls = 400_000u64;
    while let Some(a) = args.next() {
        if a == "--calls" {
            calls = args.next().and_then(|n| n.parse().ok()).unwrap_or(calls);
        }
    }
    let mut rnd = fastrand::Rng::with_seed(1);
    let apps = ["support-bot", "search", "summarizer"];
    let models = ["gpt-4o", "gpt-4o-mini"];
    let finish = ["stop", "stop", "stop", "length", "tool_calls"];
    let inputs: Vec<Input> = (0..calls.min(100_000))
        .flat_map(|i| {
            let app = apps[rnd.usize(0..apps.len())];
            let model = models[rnd.usize(0..models.len())];
            let mut out = vec![Input::Call(Box::new(CallObs::from(&TraceRecord {
                app: app.into(),
                route: "openai".into(),
                request_model: model.into(),
                response_model: model.into(),
                streamed: i % 2 == 0,
                ttft_ms: 200.0 + 100.0 * rnd.f64(),
                duration_ms: 800.0 * (1.0 + rnd.f64()),
                cost_usd: 0.001 * (1.0 + rnd.f64()),
                input_tokens: 100 + rnd.u64(0..50),
                output_tokens: 40 + rnd.u64(0..200),
                finish_reason: finish[rnd.usize(0..finish.len())].into(),
                output_text: "Here is the plan.".into(),
                tool_calls: if rnd.bool() { vec!["search".into()] } else { vec![] },
                ..TraceRecord::default()
            })))];
            if i % 2 == 0 {
                out.push(Input::Verdict(Box::new(ScoreRecord {
                    trace_id: format!("t{i}"),
                    judge: "cites_plan".into(),
                    judge_kind: "rule".into(),
                    app: app.into(),
                    route: "openai".into(),
                    request_model: model.into(),
                    passed: u8::from(rnd.f64() < 0.9),
                    ..ScoreRecord::default()
                })));
            }
            out
        })
        .collect();
    let mut engine = DriftEngine::new(DriftConfig::default());
    // Warm up: fill every baseline, as a long-running sidecar has them.
    for input in &inputs {
        engine.observe(input);
    }
    let start = Instant::now();
    let mut fed = 0u64;
    let mut events = 0usize;
    while fed < calls {
        for input in &inputs {
            events += engine.observe(input).len();
            if matches!(input, Input::Call(_)) {
                fed += 1;
            }
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / fed as f64;
    println!(
        "drift engine: {ns:.0} ns per call ({fed} calls with a verdict every other call, {} detectors, {events} events)",
        engine.stats.detectors
    );
    println!("at 5,000 calls/s: {:.1}% of one core", ns * 5000.0 / 1e7);
}
