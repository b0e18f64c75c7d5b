//! LLM judges through the real proxy against a test judge endpoint that answers structured
//! JSON, prose, garbage, too slowly, with 429s, and that rejects `response_format`: every
//! sampled call gets a verdict or an error verdict with the reason, nothing is lost, and the
//! endpoint limits hold.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use llmtap_testkit::judge::JudgeMock;
use llmtap_testkit::process::read_records;
use serde_json::{json, Value};

const SCORES: [(f64, &str); 6] =
    [(5.0, "correct"), (4.0, "partial"), (3.0, "wrong"), (2.0, "correct"), (1.0, "partial"), (4.4, "wrong")];

fn config(judge: &JudgeMock) -> String {
    let llm = |name: &str, mode: &str, extra: &str| {
        format!(
            r#"
[[judge]]
name = "{name}"
kind = "llm"
apps = ["bot"]
endpoint = "{url}"
model = "gpt-4o-mini"
api_key_env = "JUDGE_API_KEY"
rubric = "Objective: {{{{objective}}}}\nQuestion: {{{{input}}}}\nAnswer: {{{{output}}}}\nTools: {{{{tool_calls}}}}"
{extra}
"#,
            url = judge.url(mode)
        )
    };
    let numeric = "output = { kind = \"numeric\", min = 1, max = 5, pass_at = 4, review_band = 0.5 }";
    [
        "[[intent]]\napp = \"bot\"\nobjective = \"Answer billing questions citing the plan.\"\n".to_owned(),
        llm("helpfulness", "json", numeric),
        llm("prose", "text", numeric),
        llm("strict", "json", "output = { kind = \"boolean\" }"),
        llm(
            "grade",
            "json",
            "output = { kind = \"categorical\", choices = { correct = 1.0, partial = 0.5, wrong = 0.0 }, pass_at = 0.75 }",
        ),
        llm("confused", "garbage", numeric),
        llm("broken", "notjson", numeric),
        llm("sluggish", "slow", &format!("{numeric}\ntimeout_ms = 300\nmax_retries = 1")),
        llm("busy", "429", numeric),
        llm("plain", "noschema", numeric),
        format!(
            "[scorer.endpoints.\"{}\"]\nconcurrency = 2\n[scorer.endpoints.\"{}\"]\nrate_limit_rps = 10\n",
            judge.url("json"),
            judge.url("text")
        ),
    ]
    .concat()
}

async fn wait_scores(dir: &std::path::Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = read_records(&dir.join("scores"));
        if v.len() >= n || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_judges_give_verdicts_or_error_verdicts_for_every_sampled_call() {
    let judge = JudgeMock::start().await.unwrap();
    let mut env = start_with_env(&config(&judge), &[("JUDGE_API_KEY", "sk-judge-secret".to_owned())]).await;
    let mut traces = Vec::new();
    for (i, (score, label)) in SCORES.iter().enumerate() {
        let content = format!("SCORE={score} LABEL={label} Your plan: Pro.");
        let r = post_json(
            &env.client,
            &env.llmtap.url("/v1/chat/completions"),
            &[("x-llmtap-app", "bot"), ("x-mock-content", &content)],
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("Which plan am I on? #{i}")}]}),
        )
        .await;
        assert_eq!(r.status, 200);
        traces.push(r.trace_id());
    }
    // A call that looks like a judge's own (what a judge pointed back through llmtap sends).
    let own = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[("x-llmtap-app", "bot"), ("x-llmtap-tag-llmtap_judge", "helpfulness"), ("x-llmtap-score", "off")],
        &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "judge this"}]}),
    )
    .await
    .trace_id();

    let judges = 9;
    wait_scores(&env.llmtap.data_dir, traces.len() * judges).await;
    env.llmtap.terminate().unwrap();
    assert!(env.llmtap.wait_exit(Duration::from_secs(30)).unwrap().success());
    // Nothing lost, nothing doubled, nothing extra: one verdict per judge and call.
    let scores = read_records(&env.llmtap.data_dir.join("scores"));
    assert_eq!(scores.len(), traces.len() * judges, "{scores:#?}");
    assert!(scores.iter().all(|s| s["trace_id"] != own.as_str()), "a judge's own call is never judged");
    let mut by: BTreeMap<(String, String), Value> = BTreeMap::new();
    for s in scores {
        let key = (s["judge"].as_str().unwrap().to_owned(), s["trace_id"].as_str().unwrap().to_owned());
        assert!(by.insert(key, s).is_none());
    }
    let v = |judge: &str, i: usize| by[&(judge.to_owned(), traces[i].clone())].clone();
    let judge_cost = 100.0 * 0.15e-6 + 20.0 * 0.6e-6;

    for (i, (score, label)) in SCORES.iter().enumerate() {
        for name in ["helpfulness", "prose", "busy", "plain"] {
            let s = v(name, i);
            assert_eq!(s["error"], "", "{name}: {s}");
            assert_eq!(s["judge_kind"], "llm");
            assert_eq!(s["score"].as_f64(), Some(*score), "{name}");
            assert_eq!(s["passed"].as_u64(), Some(u64::from(*score >= 4.0)), "{name}");
            assert_eq!(s["needs_review"].as_u64(), Some(u64::from((score - 4.0).abs() <= 0.5)), "{name} {score}");
            assert_eq!(s["judge_model"], "gpt-4o-mini");
            assert!((s["judge_cost_usd"].as_f64().unwrap() - judge_cost).abs() < 1e-12, "{name}: {s}");
            assert_eq!(s["app"], "bot");
            assert!(s["span_id"].as_str().is_some_and(|x| x.len() == 16));
        }
        let reasoning = v("helpfulness", i)["reasoning"].as_str().unwrap().to_owned();
        assert!(reasoning.starts_with("judged ") && reasoning.ends_with(" chars"), "{reasoning}");
        assert_eq!(
            v("prose", i)["reasoning"],
            format!("The reply answers the question and names the plan.\n\nI'd rate it {score} out of 5.")
        );
        let strict = v("strict", i);
        assert_eq!(
            (strict["passed"].as_u64(), strict["label"].as_str()),
            (Some(u64::from(*score >= 4.0)), Some(if *score >= 4.0 { "pass" } else { "fail" }))
        );
        let grade = v("grade", i);
        let want = match *label {
            "correct" => 1.0,
            "partial" => 0.5,
            _ => 0.0,
        };
        assert_eq!((grade["label"].as_str(), grade["score"].as_f64()), (Some(*label), Some(want)));
        assert_eq!(grade["passed"].as_u64(), Some(u64::from(want >= 0.75)));

        let err = |name: &str| v(name, i)["error"].as_str().unwrap().to_owned();
        assert!(err("confused").starts_with("unreadable judge answer: \"¯\\\\_(ツ)_/¯ bananas"), "{}", err("confused"));
        assert!(
            err("broken").starts_with("judge response is not JSON: \"<html>upstream proxy error</html>\""),
            "{}",
            err("broken")
        );
        assert_eq!(err("sluggish"), "judge call timed out after 300 ms (after 2 attempts)");
        assert_eq!(v("sluggish", i)["passed"].as_u64(), Some(0));
    }

    let reqs = judge.requests();
    // The rubric is rendered from the call and the intent; the key and the score-off header go along.
    let first = reqs.iter().find(|r| r.mode == "json").unwrap();
    let prompt = first.body["messages"][1]["content"].as_str().unwrap();
    assert!(
        prompt.starts_with("Objective: Answer billing questions citing the plan.\nQuestion: Which plan am I on? #"),
        "{prompt}"
    );
    assert!(prompt.contains("Tools: (none)"), "{prompt}");
    assert_eq!(first.authorization.as_deref(), Some("Bearer sk-judge-secret"));
    assert_eq!(first.score_header.as_deref(), Some("off"));
    assert_eq!(first.body["response_format"]["type"], "json_schema");
    assert_eq!(first.body["temperature"], 0.0);
    // 429s: two refusals per call, then the verdict.
    assert_eq!(reqs.iter().filter(|r| r.mode == "429").count(), SCORES.len() * 3);
    // A server that rejects response_format is asked once with it, then never again.
    let plain: Vec<bool> =
        reqs.iter().filter(|r| r.mode == "noschema").map(|r| r.body.get("response_format").is_some()).collect();
    assert_eq!(plain.iter().filter(|b| **b).count(), plain.len() - SCORES.len());
    assert!(plain.len() > SCORES.len());
    // Concurrency limit: three judges on the json endpoint, never more than 2 calls at once.
    assert_eq!(judge.max_in_flight("json"), 2);
    // Rate limit: 10 requests/s on the text endpoint.
    let mut starts: Vec<Instant> = reqs.iter().filter(|r| r.mode == "text").map(|r| r.at).collect();
    starts.sort();
    assert_eq!(starts.len(), SCORES.len());
    for w in starts.windows(2) {
        assert!(w[1] - w[0] >= Duration::from_millis(90), "text judge calls {:?} apart", w[1] - w[0]);
    }
    // The key never reaches a log.
    assert!(!env.llmtap.stderr().contains("sk-judge-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_bad_llm_judges() {
    let bad = [
        (
            "[[judge]]\nname = \"h\"\nkind = \"llm\"\nendpoint = \"openai\"\nmodel = \"m\"\nrubric = \"{{answer}}\"\n",
            "judge \"h\": rubric = \"{{answer}}\": unknown variable {{answer}}",
        ),
        (
            "[[judge]]\nname = \"h\"\nkind = \"llm\"\nendpoint = \"anthropic\"\nmodel = \"m\"\nrubric = \"{{output}}\"\n",
            "judge \"h\": endpoint = \"anthropic\": route \"anthropic\" is not an OpenAI-compatible chat endpoint",
        ),
        (
            "[[judge]]\nname = \"h\"\nkind = \"llm\"\nendpoint = \"nowhere\"\nmodel = \"m\"\nrubric = \"{{output}}\"\n",
            "judge \"h\": endpoint = \"nowhere\": neither a route name nor an http(s) URL",
        ),
        (
            "[[judge]]\nname = \"h\"\nkind = \"llm\"\nendpoint = \"openai\"\nmodel = \"m\"\napi_key_env = \"LLMTAP_TEST_UNSET_KEY\"\nrubric = \"{{output}}\"\n",
            "judge \"h\": api_key_env = \"LLMTAP_TEST_UNSET_KEY\": the variable is not set in the environment",
        ),
        (
            "[[judge]]\nname = \"h\"\nkind = \"llm\"\nendpoint = \"openai\"\nmodel = \"m\"\nrubric = \"{{output}}\"\noutput = { kind = \"numeric\", min = 1, max = 5, pass_at = 7 }\n",
            "judge \"h\": output.pass_at = 7: must lie between output.min and output.max",
        ),
        (
            "[[judge]]\nname = \"h\"\nkind = \"llm\"\nendpoint = \"openai\"\nmodel = \"m\"\nrubric = \"{{output}}\"\noutput = { kind = \"categorical\", choices = { yes = 1.0 } }\n",
            "judge \"h\": output.choices = {\"yes\": 1.0}: a categorical judge needs two or more",
        ),
    ];
    for (cfg, want) in bad {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("llmtap.toml");
        std::fs::write(&path, cfg).unwrap();
        let (code, _, stderr) = llmtap_cli(&["check", "--config", path.to_str().unwrap()], &[]);
        assert_ne!(code, 0, "{cfg}");
        assert!(stderr.contains(want), "{cfg}\nwant: {want}\ngot: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agreement_metric_and_review_queue_follow_feedback() {
    let judge = JudgeMock::start().await.unwrap();
    let cfg = format!(
        r#"
[[judge]]
name = "helpfulness"
kind = "llm"
endpoint = "{}"
model = "gpt-4o-mini"
rubric = "{{{{output}}}}"
output = {{ kind = "numeric", min = 1, max = 5, pass_at = 4, review_band = 0.5 }}
"#,
        judge.url("json")
    );
    let mut env = start(&cfg).await;
    // Judge scores, and what a human says about the same calls (1–5).
    let judged = [5.0, 4.0, 3.0, 2.0, 1.0, 4.2, 3.8];
    let human = [4.0, 5.0, 3.0, 1.0, 2.0];
    let mut traces = Vec::new();
    for s in judged {
        let r = post_json(
            &env.client,
            &env.llmtap.url("/v1/chat/completions"),
            &[("x-mock-content", &format!("SCORE={s}"))],
            &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        traces.push(r.trace_id());
        // Verdict timestamps in call order, for the review queue's order.
        wait_scores(&env.llmtap.data_dir, traces.len()).await;
    }
    let fb = format!("http://{}/v1/feedback", env.llmtap.admin);
    for (t, h) in traces.iter().zip(human) {
        let r = post_json(&env.client, &fb, &[], &json!({"trace_id": t, "name": "rating", "value": h})).await;
        assert_eq!(r.status, 202, "{:?}", r.body);
    }
    let metrics = get_text(&env.client, &format!("http://{}/metrics", env.llmtap.admin)).await;
    // Spearman over the 5 pairs: ranks (5,4,3,2,1) vs (4,5,3,1,2); d² = 1+1+0+1+1 = 4;
    // rho = 1 − 6·4 / (5·24) = 0.8.
    let line =
        metrics.lines().find(|l| l.starts_with("llmtap_judge_agreement{")).unwrap_or_else(|| panic!("{metrics}"));
    let (series, value) = line.rsplit_once(' ').unwrap();
    assert_eq!(series, "llmtap_judge_agreement{judge=\"helpfulness\",method=\"spearman\"}");
    assert!((value.parse::<f64>().unwrap() - 0.8).abs() < 1e-12, "{line}");
    assert!(metrics.contains("llmtap_judge_agreement_pairs{judge=\"helpfulness\"} 5"), "{metrics}");
    assert!(metrics.contains("llmtap_judge_verdicts_total{judge=\"helpfulness\",result=\"pass\"} 3"), "{metrics}");
    assert!(metrics.contains("llmtap_judge_verdicts_total{judge=\"helpfulness\",result=\"fail\"} 4"), "{metrics}");

    env.llmtap.terminate().unwrap();
    assert!(env.llmtap.wait_exit(Duration::from_secs(20)).unwrap().success());
    // Needing review: 4.0 (has feedback), 4.2 and 3.8 (none yet) — the last two, oldest first.
    let data = env.llmtap.data_dir.to_str().unwrap().to_owned();
    let (code, out, err) = llmtap_cli(&["review", "--json", "--data-dir", &data], &[]);
    assert_eq!(code, 0, "{err}");
    let items: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: Vec<(&str, f64)> =
        items.iter().map(|i| (i["trace_id"].as_str().unwrap(), i["score"].as_f64().unwrap())).collect();
    assert_eq!(got, vec![(traces[5].as_str(), 4.2), (traces[6].as_str(), 3.8)]);
    let (_, table, _) = llmtap_cli(&["review", "--data-dir", &data, "--judge", "nope"], &[]);
    assert_eq!(table, "nothing to review\n");
    let (_, table, _) = llmtap_cli(&["review", "--data-dir", &data, "--limit", "1"], &[]);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.lines().nth(1).unwrap().contains(&traces[5]), "{table}");
}
