//! Telemetry out: Prometheus `/metrics` scraped by a real Prometheus server and accepted by
//! `promtool`; health and readiness; OTLP spans and metrics to a real OTLP/HTTP receiver.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::json;

async fn get(c: &HttpClient, url: &str) -> Reply {
    send(c, Method::GET, url, &[], "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_request_count_and_promtool_accepts_the_exposition() {
    let (Some(prometheus), Some(promtool)) =
        (llmtap_testkit::tools::find("prometheus"), llmtap_testkit::tools::find("promtool"))
    else {
        return;
    };
    let env = start("").await;
    for i in 0..7 {
        let stream = i % 2 == 0;
        let r = post_json(
            &env.client,
            &env.llmtap.url("/v1/chat/completions"),
            &[],
            &json!({"model": "gpt-4o", "stream": stream, "messages": []}),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[("x-mock-status", "503")],
        &json!({"model": "gpt-4o"}),
    )
    .await;
    records_at_least(&env.llmtap.data_dir, 8).await;
    let admin = format!("http://{}", env.llmtap.admin);
    let m = get(&env.client, &format!("{admin}/metrics")).await;
    assert_eq!(m.status, 200);
    assert_eq!(m.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    for line in [
        r#"llmtap_requests_total{model="gpt-4o",provider="openai",route="openai",status_class="2xx"} 7"#,
        r#"llmtap_requests_total{model="gpt-4o",provider="openai",route="openai",status_class="5xx"} 1"#,
        r#"llmtap_tokens_total{model="gpt-4o",provider="openai",route="openai",type="input"} 77"#,
        r#"llmtap_tokens_total{model="gpt-4o",provider="openai",route="openai",type="output"} 49"#,
        r#"llmtap_errors_total{kind="http_error",provider="openai",route="openai"} 1"#,
        "llmtap_trace_log_records_written_total 8",
        "llmtap_trace_log_records_dropped_total 0",
        "llmtap_trace_log_queue_depth 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
    }
    let cost: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"llmtap_cost_usd_total{model="gpt-4o",provider="openai",route="openai"} "#))
        .unwrap()
        .parse()
        .unwrap();
    assert!((cost - 7.0 * (11.0 * 2.5e-6 + 7.0 * 1e-5)).abs() < 1e-12);
    let disk: u64 = text.lines().find_map(|l| l.strip_prefix("llmtap_trace_log_disk_bytes ")).unwrap().parse().unwrap();
    assert!(disk > 0);

    // promtool lints the exposition.
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes the admin port; its query API returns the count.
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: llmtap\n    static_configs:\n      - targets: ['{}']\n", env.llmtap.admin),
    )
    .unwrap();
    let mut prom = Command::new(&prometheus)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let query = format!("http://127.0.0.1:{port}/api/v1/query?query=sum(llmtap_requests_total)");
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), env.client.get(query.parse().unwrap())).await
        {
            let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if let Some(val) = v["data"]["result"][0]["value"][1].as_str() {
                break val.to_owned();
            }
        }
        assert!(Instant::now() < deadline, "prometheus never returned the series");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = prom.kill();
    let _ = prom.wait();
    assert_eq!(value, "8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_report_in_json() {
    let env = start("").await;
    let admin = format!("http://{}", env.llmtap.admin);
    let h = get(&env.client, &format!("{admin}/healthz")).await;
    assert_eq!((h.status.as_u16(), h.json()), (200, json!({"status": "ok"})));
    let r = get(&env.client, &format!("{admin}/readyz")).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(
        (v["status"].as_str(), v["listener"].as_bool(), v["log_writable"].as_bool()),
        (Some("ready"), Some(true), Some(true))
    );
    assert!(v["clickhouse"].is_null(), "no ClickHouse configured");
    assert_eq!(v["excluded"], json!([]));

    // An unwritable trace folder fails readiness, unless the probe excludes that check.
    use std::os::unix::fs::PermissionsExt;
    let traces = env.llmtap.data_dir.join("traces");
    std::fs::set_permissions(&traces, std::fs::Permissions::from_mode(0o555)).unwrap();
    let r = get(&env.client, &format!("{admin}/readyz")).await;
    let v = r.json();
    assert_eq!(
        (r.status.as_u16(), v["status"].as_str(), v["log_writable"].as_bool()),
        (503, Some("not_ready"), Some(false))
    );
    let r = get(&env.client, &format!("{admin}/readyz?exclude=log_writable&exclude=clickhouse_backlog")).await;
    let v = r.json();
    assert_eq!(
        (r.status.as_u16(), v["status"].as_str(), v["log_writable"].as_bool()),
        (200, Some("ready"), Some(false))
    );
    assert_eq!(v["excluded"], json!(["log_writable", "clickhouse_backlog"]));
    std::fs::set_permissions(&traces, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(get(&env.client, &format!("{admin}/readyz")).await.status, 200);

    let r = get(&env.client, &format!("{admin}/readyz?exclude=disk")).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"error": "unknown readiness check \"disk\"", "checks": ["listener", "log_writable", "clickhouse_backlog"]})
    );
    let r = get(&env.client, &format!("{admin}/readyz?verbose")).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "unknown parameter \"verbose\"; only exclude=<check>");
}

use llmtap_testkit::otlp::OtlpReceiver;
use llmtap_testkit::{fixtures_dir, Case};

async fn wait_spans(r: &OtlpReceiver, n: usize) -> Vec<llmtap_testkit::otlp::ReceivedSpan> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = r.spans();
        if s.len() >= n || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_spans_and_metrics_follow_the_genai_conventions() {
    let recv = OtlpReceiver::start().await.unwrap();
    let env =
        start(&format!("[otlp]\nendpoint = \"{}\"\nflush_interval_ms = 100\nmetrics_interval_ms = 300\n", recv.url()))
            .await;
    let mock_port = env.mock.addr.port();
    // An OpenAI stream with two tool calls, inside the caller's trace.
    let req = json!({"model": "gpt-4o", "stream": true, "max_tokens": 100, "temperature": 0.2, "top_p": 0.9, "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}, {"type": "function", "function": {"name": "get_time"}}]});
    let a = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[
            ("x-mock-tool-calls", "get_weather,get_time"),
            ("x-llmtap-session", "conv-7"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ],
        &req,
    )
    .await;
    assert_eq!(a.status, 200);
    // An Anthropic answer with cache reads and writes.
    let dir = fixtures_dir();
    let case = Case::load(&dir, "anthropic/messages_json").unwrap();
    let b = post_json(
        &env.client,
        &env.llmtap.url(&case.path),
        &[
            ("x-mock-fixture", "anthropic/messages_json"),
            ("traceparent", "00-11111111111111111111111111111111-2222222222222222-01"),
        ],
        &case.request,
    )
    .await;
    assert_eq!(b.status, 200);
    let spans = wait_spans(&recv, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let rec_a = record(&env.llmtap.data_dir, &a.trace_id()).await;
    let sa = spans.iter().find(|s| s.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736").unwrap();
    assert_eq!(sa.parent_span_id, "00f067aa0ba902b7");
    assert_eq!(sa.span_id, rec_a["span_id"].as_str().unwrap(), "the span is the record's span");
    assert_eq!(sa.name, "chat gpt-4o");
    assert_eq!(sa.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(sa.status_code, 0, "unset on success");
    assert_eq!(sa.resource["service.name"], "llmtap");
    let want = json!({
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o", "gen_ai.response.id": "chatcmpl-mock", "gen_ai.response.finish_reasons": ["tool_calls"],
        "gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 7, "gen_ai.request.max_tokens": 100,
        "gen_ai.request.temperature": 0.2, "gen_ai.request.top_p": 0.9, "gen_ai.request.stream": true,
        "gen_ai.conversation.id": "conv-7", "server.address": "127.0.0.1", "server.port": mock_port, "llmtap.route": "openai"
    });
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&sa.attributes[k], v, "attribute {k}");
    }
    assert!(sa.attributes["gen_ai.response.time_to_first_chunk"].as_f64().unwrap() > 0.0);
    assert!(!sa.attributes.contains_key("gen_ai.input.messages"), "content is opt-in");
    assert!(!sa.attributes.contains_key("error.type"));
    let events: Vec<(String, serde_json::Value, serde_json::Value)> = sa
        .events
        .iter()
        .map(|(n, a)| (n.clone(), a["gen_ai.tool.name"].clone(), a["gen_ai.tool.call.id"].clone()))
        .collect();
    assert_eq!(
        events,
        vec![
            ("gen_ai.tool.call".to_owned(), json!("get_weather"), json!("call_0")),
            ("gen_ai.tool.call".to_owned(), json!("get_time"), json!("call_1")),
        ]
    );
    let dur = (sa.end_unix_nano - sa.start_unix_nano) as f64 / 1e6;
    assert!((dur - rec_a["duration_ms"].as_f64().unwrap()).abs() < 0.01, "span length is the record's duration");

    let sb = spans.iter().find(|s| s.trace_id == "11111111111111111111111111111111").unwrap();
    assert_eq!(sb.parent_span_id, "2222222222222222");
    assert_eq!(sb.name, format!("chat {}", case.request["model"].as_str().unwrap()));
    assert_eq!(sb.attributes["gen_ai.provider.name"], "anthropic");
    assert_eq!(sb.attributes["gen_ai.usage.input_tokens"], case.expect["input_tokens"]);
    assert_eq!(sb.attributes["gen_ai.usage.output_tokens"], case.expect["output_tokens"]);
    assert_eq!(sb.attributes["gen_ai.usage.cache_read.input_tokens"], case.expect["cache_read_tokens"]);
    assert_eq!(sb.attributes["gen_ai.usage.cache_creation.input_tokens"], case.expect["cache_write_tokens"]);
    assert_eq!(sb.attributes["gen_ai.response.finish_reasons"], json!([case.expect["finish_reason"]]));
    assert!(!sb.attributes.contains_key("gen_ai.request.stream"), "set only for streaming requests");

    // Metrics: names, units and the conventions' bucket boundaries.
    let deadline = Instant::now() + Duration::from_secs(20);
    let hists = loop {
        let h = recv.histograms();
        let names: Vec<&str> = h.iter().map(|x| x.0.as_str()).collect();
        if [
            "gen_ai.client.operation.duration",
            "gen_ai.client.token.usage",
            "gen_ai.client.operation.time_to_first_chunk",
        ]
        .iter()
        .all(|n| names.contains(n))
            || Instant::now() > deadline
        {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |n: &str| hists.iter().rev().find(|h| h.0 == n).unwrap_or_else(|| panic!("no {n}: {hists:?}")).clone();
    let d = find("gen_ai.client.operation.duration");
    assert_eq!((d.1.as_str(), d.2.clone(), d.3), ("s", llmtap_ingest::export::otlp::SECONDS_BUCKETS.to_vec(), 2));
    let t = find("gen_ai.client.token.usage");
    assert_eq!((t.1.as_str(), t.2.clone()), ("{token}", llmtap_ingest::export::otlp::TOKEN_BUCKETS.to_vec()));
    assert_eq!(t.3, 4, "input and output for each call");
    assert!(t.4.iter().any(|a| a["gen_ai.token.type"] == "input" && a["gen_ai.provider.name"] == "anthropic"));
    let f = find("gen_ai.client.operation.time_to_first_chunk");
    assert_eq!((f.1.as_str(), f.3), ("s", 1), "streaming calls only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_message_content_only_when_opted_in() {
    let recv = OtlpReceiver::start().await.unwrap();
    let env = start(&format!(
        "[otlp]\nendpoint = \"{}\"\nflush_interval_ms = 100\ncontent = true\nmetrics = false\n",
        recv.url()
    ))
    .await;
    let req = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "weather in Paris?"}]});
    post_json(&env.client, &env.llmtap.url("/v1/chat/completions"), &[("x-mock-tool-calls", "get_weather")], &req)
        .await;
    let spans = wait_spans(&recv, 1).await;
    let input: serde_json::Value =
        serde_json::from_str(spans[0].attributes["gen_ai.input.messages"].as_str().unwrap()).unwrap();
    assert_eq!(input, json!([{"role": "user", "parts": [{"type": "text", "content": "weather in Paris?"}]}]));
    let output: serde_json::Value =
        serde_json::from_str(spans[0].attributes["gen_ai.output.messages"].as_str().unwrap()).unwrap();
    assert_eq!(
        output,
        json!([{"role": "assistant", "finish_reason": "tool_calls",
        "parts": [{"type": "tool_call", "id": "call_0", "name": "get_weather", "arguments": {"arg": 0}}]}])
    );
    assert_eq!(spans[0].events[0].1["gen_ai.tool.call.arguments"], "{\"arg\":0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_spans_not_calls() {
    let env = start("[otlp]\nendpoint = \"http://127.0.0.1:9\"\nflush_interval_ms = 50\nmetrics = false\nqueue_capacity = 256\nbatch_size = 64\n").await;
    let mut tasks = Vec::new();
    for chunk in 0..20 {
        let c = env.client.clone();
        let url = env.llmtap.url("/v1/chat/completions");
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let r = post_json(
                    &c,
                    &url,
                    &[],
                    &json!({"model": "gpt-4o", "stream": (chunk + i) % 2 == 0, "messages": []}),
                )
                .await;
                assert_eq!(r.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(records_at_least(&env.llmtap.data_dir, 1000).await.len(), 1000, "every call recorded");
    let admin = format!("http://{}/metrics", env.llmtap.admin);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = String::from_utf8(get(&env.client, &admin).await.body.to_vec()).unwrap();
        let dropped: u64 =
            text.lines().find_map(|l| l.strip_prefix("llmtap_otlp_spans_dropped_total ")).unwrap().parse().unwrap();
        let exported: u64 =
            text.lines().find_map(|l| l.strip_prefix("llmtap_otlp_spans_exported_total ")).unwrap().parse().unwrap();
        assert_eq!(exported, 0);
        if dropped > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "dropped-span counter never rose");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_export_reaches_a_grpc_receiver() {
    let recv = OtlpReceiver::start().await.unwrap();
    let env = start(&format!(
        "[otlp]\nendpoint = \"{}\"\nprotocol = \"grpc\"\nflush_interval_ms = 100\nmetrics_interval_ms = 300\n",
        recv.url()
    ))
    .await;
    let r = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[],
        &json!({"model": "gpt-4o-mini", "messages": []}),
    )
    .await;
    let spans = wait_spans(&recv, 1).await;
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].trace_id, r.trace_id());
    assert_eq!(spans[0].name, "chat gpt-4o-mini");
    assert_eq!(spans[0].attributes["gen_ai.usage.output_tokens"], 7);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !recv.histograms().iter().any(|h| h.0 == "gen_ai.client.operation.duration") {
        assert!(Instant::now() < deadline, "no metrics over gRPC");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The collector acknowledged it: counted as exported, not dropped.
    let text = String::from_utf8(get(&env.client, &format!("http://{}/metrics", env.llmtap.admin)).await.body.to_vec())
        .unwrap();
    assert!(text.lines().any(|l| l == "llmtap_otlp_spans_exported_total 1"), "{text}");
    assert!(text.lines().any(|l| l == "llmtap_otlp_spans_dropped_total 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_become_gen_ai_evaluation_result_events() {
    let recv = OtlpReceiver::start().await.unwrap();
    let judge = llmtap_testkit::judge::JudgeMock::start().await.unwrap();
    let cfg = format!(
        r#"
[otlp]
endpoint = "{otlp}"
flush_interval_ms = 100

[[judge]]
name = "cites_plan"
kind = "rule"
rule = {{ regex = "(?i)plan:" }}

[[judge]]
name = "helpfulness"
kind = "llm"
endpoint = "{ok}"
model = "gpt-4o-mini"
rubric = "{{{{output}}}}"
output = {{ kind = "numeric", min = 1, max = 5, pass_at = 4 }}

[[judge]]
name = "confused"
kind = "llm"
endpoint = "{garbage}"
model = "gpt-4o-mini"
rubric = "{{{{output}}}}"
"#,
        otlp = recv.url(),
        ok = judge.url("json"),
        garbage = judge.url("garbage"),
    );
    let env = start(&cfg).await;
    let r = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[
            ("x-mock-content", "SCORE=5 Your plan: Pro"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ],
        &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "plan?"}]}),
    )
    .await;
    assert_eq!(r.status, 200);
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let e = recv.events();
        if e.len() >= 3 || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(events.len(), 3, "{events:#?}");
    let by = |name: &str| events.iter().find(|e| e.attributes["gen_ai.evaluation.name"] == name).unwrap();
    for e in &events {
        assert_eq!(e.event_name, "gen_ai.evaluation.result");
        assert_eq!(e.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(e.span_id, rec["span_id"].as_str().unwrap(), "parented to the judged call's span");
        assert_eq!(e.severity_number, 9, "INFO");
    }
    let rule = &by("cites_plan").attributes;
    assert_eq!(rule["gen_ai.evaluation.score.value"], json!(1.0));
    assert_eq!(rule["gen_ai.evaluation.score.label"], "pass");
    assert_eq!(rule["gen_ai.evaluation.explanation"], "every pattern matches");
    assert_eq!(rule["llmtap.judge.kind"], "rule");
    let llm = &by("helpfulness").attributes;
    assert_eq!(llm["gen_ai.evaluation.score.value"], json!(5.0));
    assert_eq!(llm["gen_ai.evaluation.score.label"], "pass");
    assert_eq!(llm["llmtap.judge.model"], "gpt-4o-mini");
    assert_eq!(llm["llmtap.judge.passed"], true);
    let err = &by("confused").attributes;
    assert_eq!(err["error.type"], "judge_error");
    assert!(err.get("gen_ai.evaluation.score.value").is_none());
    assert!(err["gen_ai.evaluation.explanation"].as_str().unwrap().starts_with("unreadable judge answer"), "{err:?}");
}

/// The value of `llmtap_drift_inputs_skipped_total{reason}` in an exposition.
fn skipped(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("llmtap_drift_inputs_skipped_total{{reason=\"{reason}\"}} ");
    let line = metrics.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix}in:\n{metrics}"));
    line[prefix.len()..].trim().parse().unwrap()
}

/// Here rather than with the drift tests: those watch latency, and must not share the
/// machine with a burst of calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_app_is_sampled_for_drift_and_every_call_is_still_traced() {
    let mut env = start("[drift]\nmax_calls_per_sec = 10\n").await;
    let url = env.llmtap.url("/v1/chat/completions");
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let started = Instant::now();
    for _ in 0..200 {
        let r = post_json(&env.client, &url, &[("x-llmtap-app", "busy")], &body).await;
        assert_eq!(r.status, 200);
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(records_at_least(&env.llmtap.data_dir, 200).await.len(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await; // the recorder's last batch
    let metrics =
        String::from_utf8(get(&env.client, &format!("http://{}/metrics", env.llmtap.admin)).await.body.to_vec())
            .unwrap();
    let observed = 200 - skipped(&metrics, "sampled");
    // The first 10 of a second are kept, then the k-th with odds 10/k: at most about
    // 10 × (1 + ln 200) = 63 in each second the calls touched.
    let most = (10.0 * (1.0 + 200f64.ln()) * (secs.ceil() + 1.0)) as u64;
    assert!((10..=most).contains(&observed), "{observed} observed in {secs:.2} s (at most {most})");
    assert_eq!(skipped(&metrics, "dropped"), 0);
    env.llmtap.terminate().unwrap();
    assert!(env.llmtap.wait_exit(Duration::from_secs(20)).unwrap().success());
}
