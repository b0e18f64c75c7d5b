//! Load, shutdown and the command line: 500 concurrent calls leave exactly 500 records;
//! SIGTERM lets an in-flight stream finish and exits 0; `check` and `stats` say what they
//! should.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use llmtap_testkit::process::read_records;
use llmtap_testkit::{fixtures_dir, Case};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_mixed_calls_leave_exactly_five_hundred_records() {
    let mut env = start("").await;
    let dir = fixtures_dir();
    let anthropic = Case::load(&dir, "anthropic/messages_stream_tools").unwrap();
    let anthropic_body = bytes::Bytes::from(anthropic.body(&dir, "anthropic/messages_stream_tools").unwrap());
    let gemini = Case::load(&dir, "gemini/stream_sse").unwrap();
    let gemini_body = bytes::Bytes::from(gemini.body(&dir, "gemini/stream_sse").unwrap());
    let mut tasks = Vec::new();
    for i in 0..500 {
        let c = env.client.clone();
        let base = env.llmtap.url("");
        let (anthropic, anthropic_body, gemini, gemini_body) =
            (anthropic.clone(), anthropic_body.clone(), gemini.clone(), gemini_body.clone());
        tasks.push(tokio::spawn(async move {
            let app = format!("app-{}", i % 5);
            let h = [("x-llmtap-app", app.as_str())];
            match i % 4 {
                0 => {
                    let r = post_json(
                        &c,
                        &format!("{base}/v1/chat/completions"),
                        &h,
                        &json!({"model": "gpt-4o", "messages": []}),
                    )
                    .await;
                    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hello from the mock upstream.");
                }
                1 => {
                    let r = post_json(
                        &c,
                        &format!("{base}/v1/chat/completions"),
                        &h,
                        &json!({"model": "gpt-4o-mini", "stream": true, "messages": []}),
                    )
                    .await;
                    assert!(r.body.ends_with(b"data: [DONE]\n\n"));
                    assert!(!String::from_utf8_lossy(&r.body).contains("usage"));
                }
                2 => {
                    let r = post_json(
                        &c,
                        &format!("{base}{}", anthropic.path),
                        &[h[0], ("x-mock-fixture", "anthropic/messages_stream_tools")],
                        &anthropic.request,
                    )
                    .await;
                    assert_eq!(r.body, anthropic_body);
                }
                _ => {
                    let r = post_json(
                        &c,
                        &format!("{base}{}", gemini.path),
                        &[h[0], ("x-mock-fixture", "gemini/stream_sse")],
                        &gemini.request,
                    )
                    .await;
                    assert_eq!(r.body, gemini_body);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let recs = records_at_least(&env.llmtap.data_dir, 500).await;
    assert_eq!(recs.len(), 500);
    assert!(recs.iter().all(|r| r["error_kind"] == "" && r["status"] == 200), "all succeeded");
    assert_eq!(recs.iter().filter(|r| r["provider"] == "anthropic").count(), 125);
    env.llmtap.terminate().unwrap();
    let status = env.llmtap.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(read_records(&env.llmtap.data_dir.join("traces")).len(), 500, "exactly 500 after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_streams_on_every_worker_finish_then_exits_zero() {
    let mut env = start("workers = 3").await;
    // A new thread names itself once it runs, which may be just after the port opens.
    let worker_names = |pid: u32| {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .map(|c| c.trim().to_owned())
            .filter(|c| c.starts_with("llmtap-w"))
            .collect();
        names.sort();
        names
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut threads = worker_names(env.llmtap.child.id());
    while threads.len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        threads = worker_names(env.llmtap.child.id());
    }
    assert_eq!(threads, ["llmtap-w0", "llmtap-w1", "llmtap-w2"]);
    // The drift engine runs at the lowest priority, the workers at the process's own: a
    // drift batch never holds a worker that has a call.
    let nice_of =
        |stat: &str| -> i64 { stat.rsplit_once(')').unwrap().1.split_whitespace().nth(16).unwrap().parse().unwrap() };
    let own = nice_of(&std::fs::read_to_string("/proc/self/stat").unwrap());
    let pid = env.llmtap.child.id();
    let mut nice: Vec<(String, i64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| {
            let t = t.unwrap().path();
            let comm = std::fs::read_to_string(t.join("comm")).ok()?.trim().to_owned();
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            (comm.starts_with("llmtap-w") || comm == "llmtap-drift" || comm == "llmtap-recorder")
                .then(|| (comm, nice_of(&stat)))
        })
        .collect();
    nice.sort();
    assert_eq!(
        nice,
        [
            ("llmtap-drift".to_owned(), 19),
            ("llmtap-recorder".to_owned(), own),
            ("llmtap-w0".to_owned(), own),
            ("llmtap-w1".to_owned(), own),
            ("llmtap-w2".to_owned(), own)
        ]
    );

    // Three streams at once: three connections, one per worker (least open first).
    let mut streams = Vec::new();
    for i in 0..3 {
        let content = format!("stream-{i}-abcdefghijklmnopqrstuvwxyz0123456789");
        let req = http::Request::post(env.llmtap.url("/v1/chat/completions"))
            .header("x-mock-chunks", "20")
            .header("x-mock-chunk-delay-ms", "100")
            .header("x-mock-content", content.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::from(
                serde_json::to_vec(&json!({"model": "gpt-4o", "stream": true, "messages": []})).unwrap(),
            )))
            .unwrap();
        streams.push((content, env.client.request(req)));
    }
    let mut open = Vec::new();
    for (content, resp) in streams {
        let resp = resp.await.unwrap();
        let trace = resp.headers()["x-llmtap-trace-id"].to_str().unwrap().to_owned();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(!first.is_empty());
        open.push((content, trace, first, body));
    }
    let metrics = get_text(&env.client, &format!("http://{}/metrics", env.llmtap.admin)).await;
    for w in 0..3 {
        let line = format!("llmtap_worker_connections{{worker=\"{w}\"}} 1\n");
        assert!(metrics.contains(&line), "one connection per worker:\n{metrics}");
    }
    env.llmtap.terminate().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New connections are refused while the streams go on.
    assert!(std::net::TcpStream::connect(env.llmtap.proxy).is_err(), "listener still open after SIGTERM");
    let mut traces = Vec::new();
    for (_, trace, first, body) in open {
        let rest = body.collect().await.unwrap().to_bytes();
        let text = format!("{}{}", String::from_utf8_lossy(&first), String::from_utf8_lossy(&rest));
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        traces.push(trace);
    }
    let status = env.llmtap.wait_exit(Duration::from_secs(20)).unwrap();
    assert_eq!(status.code(), Some(0));
    let recs = read_records(&env.llmtap.data_dir.join("traces"));
    assert_eq!(recs.len(), 3);
    for (i, trace) in traces.iter().enumerate() {
        let rec = recs.iter().find(|r| r["trace_id"] == trace.as_str()).unwrap();
        assert_eq!(rec["error_kind"], "");
        assert_eq!(rec["output_text"], format!("stream-{i}-abcdefghijklmnopqrstuvwxyz0123456789"));
    }
}

fn llmtap(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
    llmtap_cli(args, &env)
}

#[test]
fn check_names_the_key_value_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("llmtap.toml");
    let cfg_s = cfg.to_str().unwrap();
    std::fs::write(&cfg, "[capture]\nredact = ['(']\n").unwrap();
    let (code, _, err) = llmtap(&["check", "--config", cfg_s], &[]);
    assert_eq!(code, 2);
    assert!(err.starts_with("llmtap: capture.redact[0] = \"(\": regex parse error"), "{err}");

    std::fs::write(&cfg, "[[route]]\nname = \"vllm\"\nprefix = \"/vllm\"\nupstream = \"http://127.0.0.1:8000/v1\"\n")
        .unwrap();
    let (code, _, err) = llmtap(&["check", "--config", cfg_s], &[("LLMTAP_UPSTREAM_ANTHROPIC", "localhost:9")]);
    assert_eq!(code, 2);
    assert_eq!(err.trim(), "llmtap: LLMTAP_UPSTREAM_ANTHROPIC = \"localhost:9\": scheme must be http or https");

    let (code, _, err) = llmtap(&["check", "--config", cfg_s], &[("LLMTAP_LOG_FSYNC", "sometimes")]);
    assert_eq!(code, 2);
    assert!(
        err.contains("log.fsync: unknown variant `sometimes`, expected one of `always`, `interval`, `never`"),
        "{err}"
    );

    let (code, out, err) = llmtap(&["check", "--config", cfg_s], &[("LLMTAP_CLIENT_IDLE_TIMEOUT_MS", "1234")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("idle_timeout_ms = 1234"), "{out}");
    assert!(out.contains("vllm       /vllm                    -> http://127.0.0.1:8000/v1  adapter=openai"), "{out}");
    assert!(out.contains("openai     /openai /v1              -> https://api.openai.com  adapter=openai"), "{out}");
}

#[test]
fn a_closed_stdout_ends_a_report_quietly() {
    // `llmtap check | head -1`: the reader is gone before the report is written.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmtap"))
        .args(["check", "--data-dir", dir.path().to_str().unwrap()])
        .env_remove("LLMTAP_CONFIG")
        .current_dir(dir.path())
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_summarises_the_local_log() {
    let env = start("").await;
    let dir = fixtures_dir();
    for i in 0..4 {
        let tools = if i % 2 == 0 { "search,answer" } else { "search" };
        let r = post_json(
            &env.client,
            &env.llmtap.url("/v1/chat/completions"),
            &[("x-llmtap-app", "bot"), ("x-mock-tool-calls", tools)],
            &json!({"model": "gpt-4o", "stream": i % 2 == 0, "messages": []}),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let case = Case::load(&dir, "anthropic/messages_json").unwrap();
    post_json(
        &env.client,
        &env.llmtap.url(&case.path),
        &[("x-mock-fixture", "anthropic/messages_json")],
        &case.request,
    )
    .await;
    post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[("x-mock-status", "500")],
        &json!({"model": "gpt-4o"}),
    )
    .await;
    records_at_least(&env.llmtap.data_dir, 6).await;
    let data = env.llmtap.data_dir.to_str().unwrap();
    let (code, out, err) = llmtap(&["stats", "--data-dir", data, "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 6);
    let gpt = v["groups"]["model"].as_array().unwrap().iter().find(|r| r["key"] == "gpt-4o").unwrap();
    assert_eq!((gpt["requests"].as_u64(), gpt["errors"].as_u64()), (Some(5), Some(1)));
    assert_eq!((gpt["input_tokens"].as_u64(), gpt["output_tokens"].as_u64()), (Some(44), Some(28)));
    assert!((gpt["cost_usd"].as_f64().unwrap() - 4.0 * (11.0 * 2.5e-6 + 7.0 * 1e-5)).abs() < 1e-12);
    assert!(gpt["ttft_p50_ms"].as_f64().unwrap() > 0.0);
    let claude = v["groups"]["model"].as_array().unwrap().iter().find(|r| r["key"] != "gpt-4o").unwrap();
    assert_eq!(claude["input_tokens"], case.expect["input_tokens"]);
    assert_eq!(v["groups"]["app"][0]["key"], "bot");
    assert_eq!(v["tool_paths"], json!([{"path": ["search"], "calls": 2}, {"path": ["search", "answer"], "calls": 2}]));
    let (code, table, _) = llmtap(&["stats", "--data-dir", data, "--by", "route"], &[]);
    assert_eq!(code, 0);
    assert!(table.contains("by route") && table.contains("search → answer"), "{table}");
    assert!(!table.contains("by model"));
}
