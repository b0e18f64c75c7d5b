//! Drift detection end to end through the real proxy, with default detectors: a rule
//! judge's pass rate steps from 0.90 to 0.75 (→ one `judge_pass_rate` event, surface
//! `prompt`), and, separately, every call starts costing three times as much while quality
//! holds (→ a cost or token event, surface `model`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::time::{Duration, Instant};

use common::*;
use llmtap_testkit::process::read_records;
use serde_json::{json, Value};

const JUDGE: &str = r#"
[[judge]]
name = "cites_plan"
kind = "rule"
rule = { regex = "(?i)plan:" }
"#;

/// A small xorshift, so both phases draw the same way in every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sends `n` calls, one after another (the detector sees them in order); each passes the judge with probability `pass`. The
/// latency is a random 2–12 ms upstream delay, drawn the same way in both phases.
async fn phase(env: &Env, rng: &mut Rng, n: usize, pass: f64, tokens: (u64, u64)) {
    let plan: Vec<(bool, u64)> = (0..n).map(|_| (rng.next() < pass, 2 + (rng.next() * 10.0) as u64)).collect();
    for (ok, delay) in &plan {
        {
            let content = if *ok { "Your plan: Pro covers it." } else { "I could not find that." };
            let (p, c, d) = (tokens.0.to_string(), tokens.1.to_string(), delay.to_string());
            {
                let h = [
                    ("x-llmtap-app", "support-bot"),
                    ("x-mock-content", content),
                    ("x-mock-prompt-tokens", p.as_str()),
                    ("x-mock-completion-tokens", c.as_str()),
                    ("x-mock-first-byte-delay-ms", d.as_str()),
                ];
                let r = post_json(
                    &env.client,
                    &env.llmtap.url("/v1/chat/completions"),
                    &h,
                    &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "what plan?"}]}),
                )
                .await;
                assert_eq!(r.status, 200);
            }
        }
    }
}

async fn wait_lines(dir: &std::path::Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_records(dir).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(read_records(dir).len() >= n, "{} of {n} in {}", read_records(dir).len(), dir.display());
}

fn firing(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e["state"] == "firing").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_rate_drop_fires_once_and_points_at_the_prompt() {
    // Latency here is the test machine's. In 2 of 4 CI runs on one day the pass-rate event
    // pointed at the model, and latency is the only model-kind signal that can move in this
    // traffic (no errors, refusals, tool calls or new models; fixed tokens and finish
    // reason): a busy host fired it. This test is about the quality signal.
    let config =
        format!("{JUDGE}\n[drift.signals.latency_ms]\nenabled = false\n[drift.signals.ttft_ms]\nenabled = false\n");
    let mut env = start(&config).await;
    let mut rng = Rng(0x5eed_1234);
    let drift = env.llmtap.data_dir.join("drift");
    phase(&env, &mut rng, 2000, 0.90, (11, 7)).await;
    wait_lines(&env.llmtap.data_dir.join("scores"), 2000).await;
    let before = read_records(&drift);
    let early: Vec<&Value> = before
        .iter()
        .filter(|e| e["signal"].as_str().is_some_and(|s| s.starts_with("judge") || s == "cost_per_call"))
        .collect();
    assert!(early.is_empty(), "quality or cost events before the change: {early:#?}");
    phase(&env, &mut rng, 2000, 0.75, (11, 7)).await;
    wait_lines(&env.llmtap.data_dir.join("scores"), 4000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.llmtap.terminate().unwrap();
    assert!(env.llmtap.wait_exit(Duration::from_secs(20)).unwrap().success());

    let events = read_records(&drift);
    let pass: Vec<&Value> = firing(&events).into_iter().filter(|e| e["signal"] == "judge_pass_rate").collect();
    assert!(!pass.is_empty(), "no judge_pass_rate event: {events:#?}");
    for e in &pass {
        assert_eq!(e["judge"], "cites_plan");
        assert_eq!(e["app"], "support-bot");
        assert_eq!(e["control_surface"], "prompt", "{e}\nfiring: {:#?}", firing(&events));
        assert!(e["current_value"].as_f64().unwrap() < e["baseline_value"].as_f64().unwrap(), "{e}");
        assert!(e["baseline_n"].as_u64().unwrap() >= 500, "{e}");
        for col in ["ts", "method", "statistic", "threshold", "current_n", "severity", "route", "model"] {
            assert!(e.get(col).is_some(), "{col} missing: {e}");
        }
    }
    // One firing per key: the per-model key and the across-models key.
    let mut keys: Vec<(String, String)> = pass
        .iter()
        .map(|e| (e["route"].as_str().unwrap().to_owned(), e["model"].as_str().unwrap().to_owned()))
        .collect();
    keys.sort();
    let n = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), n, "repeated firing for a key: {pass:#?}");
    assert!(firing(&events).iter().all(|e| e["signal"] != "cost_per_call"), "{events:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tripled_cost_with_steady_quality_points_at_the_model() {
    let mut env = start(JUDGE).await;
    let mut rng = Rng(0xc057_0003);
    phase(&env, &mut rng, 2000, 0.90, (11, 7)).await;
    wait_lines(&env.llmtap.data_dir.join("scores"), 2000).await;
    phase(&env, &mut rng, 2000, 0.90, (33, 21)).await;
    wait_lines(&env.llmtap.data_dir.join("scores"), 4000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.llmtap.terminate().unwrap();
    assert!(env.llmtap.wait_exit(Duration::from_secs(20)).unwrap().success());

    let events = read_records(&env.llmtap.data_dir.join("drift"));
    let f = firing(&events);
    let cost: Vec<&&Value> = f
        .iter()
        .filter(|e| matches!(e["signal"].as_str(), Some("cost_per_call" | "input_tokens" | "output_tokens")))
        .collect();
    assert!(f.iter().any(|e| e["signal"] == "cost_per_call"), "{events:#?}");
    for e in &cost {
        assert_eq!(e["control_surface"], "model", "{e}");
        assert!(e["current_value"].as_f64().unwrap() > 2.5 * e["baseline_value"].as_f64().unwrap(), "{e}");
    }
    assert!(f.iter().all(|e| e["signal"] != "judge_pass_rate"), "quality held: {events:#?}");
}
