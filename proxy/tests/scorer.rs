//! The in-process scorer through the real proxy: verdicts for sampled calls in the scores
//! log, intent budgets as judges, `x-llmtap-score`, the same sampling in two processes, and
//! `llmtap check` naming the judge and the key.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use llmtap_testkit::process::read_records;
use serde_json::json;

const JUDGES: &str = r#"
[[intent]]
app = "support-bot"
objective = "Resolve billing questions politely and correctly, citing the account's plan."
latency_budget_ms = 60000
cost_budget_usd = 0.00001
safety = ["(?i)social security number", "(?i)wire the money"]

[[judge]]
name = "cites_plan"
kind = "rule"
apps = ["support-bot"]
sample_rate = 1.0
rule = { regex = "(?i)plan:" }

[[judge]]
name = "valid_json"
kind = "rule"
sample_rate = 0.5
rule = { json_valid = true }
"#;

async fn call(env: &Env, app: &str, content: &str, extra: &[(&str, &str)]) -> String {
    let mut h = vec![("x-llmtap-app", app), ("x-mock-content", content)];
    h.extend_from_slice(extra);
    let r = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &h,
        &json!({"model": "gpt-4o", "messages": []}),
    )
    .await;
    assert_eq!(r.status, 200);
    r.trace_id()
}

/// Verdicts by trace id: judge → passed.
fn verdicts(data_dir: &std::path::Path) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for v in read_records(&data_dir.join("scores")) {
        out.entry(v["trace_id"].as_str().unwrap().to_owned())
            .or_default()
            .insert(v["judge"].as_str().unwrap().to_owned(), v["passed"].as_u64().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_calls_get_verdicts_in_the_scores_log() {
    let mut env = start(JUDGES).await;
    let good = call(&env, "support-bot", "Your plan: Pro includes refunds.", &[]).await;
    let bad = call(&env, "support-bot", "Please wire the money today.", &[]).await;
    let off = call(&env, "support-bot", "Your plan: Pro", &[("x-llmtap-score", "off")]).await;
    let forced = call(&env, "other-app", "{\"ok\":true}", &[("x-llmtap-score", "force")]).await;
    let mut others = Vec::new();
    for i in 0..30 {
        others.push(call(&env, "other-app", &format!("{{\"n\":{i}}}"), &[]).await);
    }
    records_at_least(&env.llmtap.data_dir, 34).await;
    env.llmtap.terminate().unwrap();
    assert!(env.llmtap.wait_exit(Duration::from_secs(20)).unwrap().success());
    let v = verdicts(&env.llmtap.data_dir);

    let judged = |t: &str| v.get(t).cloned().unwrap_or_default();
    let g = judged(&good);
    assert_eq!(g["cites_plan"], 1);
    assert_eq!(g["intent_latency_budget"], 1);
    assert_eq!(g["intent_cost_envelope"], 0, "each call costs $0.0000975, over the $0.00001 envelope");
    assert_eq!(g["intent_safety"], 1);
    let b = judged(&bad);
    assert_eq!((b["cites_plan"], b["intent_safety"]), (0, 0));
    assert!(!v.contains_key(&off), "x-llmtap-score: off gets no verdicts");
    assert_eq!(judged(&forced).get("valid_json"), Some(&1), "force skips sampling");
    // valid_json at 0.5: exactly the calls the trace-id sample picks, none of the app judges.
    let expected: BTreeSet<&String> =
        others.iter().filter(|t| llmtap_scorer::sample::is_sampled(t, "valid_json", 0.5)).collect();
    let got: BTreeSet<&String> = others.iter().filter(|t| v.contains_key(*t)).collect();
    assert_eq!(got, expected);
    assert!(!expected.is_empty() && expected.len() < others.len());
    for t in &expected {
        assert_eq!(judged(t).keys().collect::<Vec<_>>(), vec!["valid_json"]);
        assert_eq!(judged(t)["valid_json"], 1);
    }
    // The rows carry the llm_scores columns.
    let row = read_records(&env.llmtap.data_dir.join("scores"))
        .into_iter()
        .find(|r| r["trace_id"] == good.as_str() && r["judge"] == "cites_plan")
        .unwrap();
    for col in [
        "ts",
        "judge_version",
        "judge_kind",
        "app",
        "route",
        "request_model",
        "score",
        "label",
        "reasoning",
        "needs_review",
        "error",
        "judge_model",
        "judge_ms",
        "judge_cost_usd",
    ] {
        assert!(row.get(col).is_some(), "{col} missing: {row}");
    }
    assert_eq!(
        (row["judge_kind"].as_str(), row["app"].as_str(), row["label"].as_str()),
        (Some("rule"), Some("support-bot"), Some("pass"))
    );
    assert_eq!(row["reasoning"], "every pattern matches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sample_the_same_calls() {
    let cfg = "[[judge]]\nname = \"sampled\"\nkind = \"rule\"\nsample_rate = 0.3\nrule = { max_latency_ms = 60000 }\n";
    let ids: Vec<String> = (0..40).map(|i| format!("{:032x}", 0xabcdef_u128 * (i + 1) + 17)).collect();
    let mut sets = Vec::new();
    for _ in 0..2 {
        let mut env = start(cfg).await;
        for id in &ids {
            let tp = format!("00-{id}-00f067aa0ba902b7-01");
            post_json(
                &env.client,
                &env.llmtap.url("/v1/chat/completions"),
                &[("traceparent", tp.as_str())],
                &json!({"model": "gpt-4o"}),
            )
            .await;
        }
        records_at_least(&env.llmtap.data_dir, 40).await;
        env.llmtap.terminate().unwrap();
        env.llmtap.wait_exit(Duration::from_secs(20)).unwrap();
        sets.push(verdicts(&env.llmtap.data_dir).keys().cloned().collect::<BTreeSet<_>>());
    }
    assert_eq!(sets[0], sets[1]);
    assert!(!sets[0].is_empty() && sets[0].len() < 40, "{}", sets[0].len());
}

#[test]
fn check_names_the_judge_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("llmtap.toml");
    let run = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        llmtap_cli(&["check", "--config", cfg.to_str().unwrap()], &[])
    };
    let (code, _, err) = run("[[judge]]\nname = \"cites_plan\"\nkind = \"rule\"\nrule = { regex = \"(\" }\n");
    assert_eq!(code, 2);
    assert!(err.starts_with("llmtap: judge \"cites_plan\": rule.regex = \"(\": regex parse error"), "{err}");
    let (code, _, err) =
        run("[[judge]]\nname = \"valid_json\"\nkind = \"rule\"\nrule = { json_schema = \"schemas/answer.json\" }\n");
    assert_eq!(code, 2);
    assert!(err.contains("judge \"valid_json\": rule.json_schema = \"schemas/answer.json\": cannot read"), "{err}");
    let (code, _, err) = run("[[judge]]\nname = \"x\"\nkind = \"rule\"\nrule = { regx = \"a\" }\n");
    assert_eq!(code, 2);
    assert!(err.contains("judge[0].rule") && err.contains("unknown field `regx`"), "{err}");
    // A schema next to the config file is found and the config is accepted.
    std::fs::create_dir_all(dir.path().join("schemas")).unwrap();
    std::fs::write(dir.path().join("schemas/answer.json"), r#"{"type":"object"}"#).unwrap();
    let (code, out, err) = run(&format!(
        "{}\n[[judge]]\nname = \"valid_json\"\nkind = \"rule\"\nrule = {{ json_schema = \"schemas/answer.json\" }}\n",
        JUDGES.replace("name = \"valid_json\"", "name = \"valid_json_any\"")
    ));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("name = \"cites_plan\""), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_api_validates_authenticates_and_stores() {
    for token in ["", "s3cret"] {
        let cfg = if token.is_empty() { String::new() } else { format!("[feedback]\ntoken = \"{token}\"\n") };
        let mut env = start(&cfg).await;
        let url = format!("http://{}/v1/feedback", env.llmtap.admin);
        let trace = call(&env, "support-bot", "Your plan: Pro", &[]).await;
        let auth = format!("Bearer {token}");
        let mut h: Vec<(&str, &str)> = vec![];
        if !token.is_empty() {
            h.push(("authorization", auth.as_str()));
        }
        let good =
            json!({"trace_id": trace, "name": "thumbs", "value": 1, "comment": "cited the plan", "annotator": "ann"});
        let r = post_json(&env.client, &url, &h, &good).await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json(), json!({"status": "accepted", "trace_id": trace}));
        let label =
            json!({"trace_id": trace, "name": "verdict", "label": "wrong_plan", "correction": "The plan is Team."});
        assert_eq!(post_json(&env.client, &url, &h, &label).await.status, 202);
        let bad = post_json(&env.client, &url, &h, &json!({"trace_id": "nope", "name": "", "value": 1})).await;
        assert_eq!(bad.status, 422);
        let reasons = bad.json()["reasons"].as_array().unwrap().clone();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons[0].as_str().unwrap().starts_with("trace_id: \"nope\""));
        if !token.is_empty() {
            assert_eq!(post_json(&env.client, &url, &[], &good).await.status, 401);
            assert_eq!(post_json(&env.client, &url, &[("authorization", "Bearer wrong")], &good).await.status, 401);
        }
        env.llmtap.terminate().unwrap();
        assert!(env.llmtap.wait_exit(Duration::from_secs(20)).unwrap().success());
        let stored = read_records(&env.llmtap.data_dir.join("feedback"));
        assert_eq!(stored.len(), 2, "{stored:?}");
        assert_eq!(
            (stored[0]["name"].as_str(), stored[0]["value"].as_f64(), stored[0]["annotator"].as_str()),
            (Some("thumbs"), Some(1.0), Some("ann"))
        );
        assert_eq!(
            (stored[1]["label"].as_str(), stored[1]["correction"].as_str()),
            (Some("wrong_plan"), Some("The plan is Team."))
        );
        assert_eq!(stored[1]["trace_id"], trace.as_str());
        // stats --judges pairs the verdicts with the feedback on the same call.
        let (code, out, err) =
            llmtap_cli(&["stats", "--judges", "--json", "--data-dir", env.llmtap.data_dir.to_str().unwrap()], &[]);
        assert_eq!(code, 0, "{err}");
        let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
        let plan = rows.as_array().unwrap().iter().find(|r| r["judge"] == "cites_plan");
        assert!(plan.is_none(), "no judges configured in this test: {rows}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_judges_reports_pass_rates_and_agreement() {
    let mut env = start(JUDGES).await;
    let url = format!("http://{}/v1/feedback", env.llmtap.admin);
    // Four support-bot calls: the judge passes 2, humans agree on 3 of 4.
    for (content, human) in [("Your plan: Pro", 1), ("Your plan: Team", 1), ("no idea", 0), ("still no idea", 1)] {
        let t = call(&env, "support-bot", content, &[]).await;
        let r = post_json(&env.client, &url, &[], &json!({"trace_id": t, "name": "thumbs", "value": human})).await;
        assert_eq!(r.status, 202);
    }
    records_at_least(&env.llmtap.data_dir, 4).await;
    env.llmtap.terminate().unwrap();
    assert!(env.llmtap.wait_exit(Duration::from_secs(20)).unwrap().success());
    let (code, out, err) =
        llmtap_cli(&["stats", "--judges", "--json", "--data-dir", env.llmtap.data_dir.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let plan = rows.as_array().unwrap().iter().find(|r| r["judge"] == "cites_plan").unwrap();
    assert_eq!(
        (plan["verdicts"].as_u64(), plan["pass_rate"].as_f64(), plan["agreement_n"].as_u64()),
        (Some(4), Some(0.5), Some(4))
    );
    // judge [1,1,0,0] vs human [1,1,0,1]: observed 0.75, chance 0.5 x 0.75 + 0.5 x 0.25 = 0.5.
    assert!((plan["agreement"].as_f64().unwrap() - 0.5).abs() < 1e-12, "{plan}");
    let cost = rows.as_array().unwrap().iter().find(|r| r["judge"] == "intent_cost_envelope").unwrap();
    assert_eq!(cost["pass_rate"].as_f64(), Some(0.0));
    let (code, table, _) = llmtap_cli(&["stats", "--judges", "--data-dir", env.llmtap.data_dir.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(table.contains("cites_plan") && table.contains("kappa 0.50 (n=4)"), "{table}");
}
