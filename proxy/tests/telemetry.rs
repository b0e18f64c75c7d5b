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
}
