//! Every failure path: what the client receives and the record written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::json;

fn chat(stream: bool) -> serde_json::Value {
    json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

fn assert_llmtap_error(r: &Reply, status: u16, kind: &str) {
    assert_eq!(r.status, status);
    assert_eq!(r.headers.get("x-llmtap-error").unwrap(), kind);
    assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
    let v = r.json();
    assert_eq!(v["error"]["source"], "llmtap");
    assert_eq!(v["error"]["code"], kind);
    assert!(v["error"]["message"].as_str().unwrap().starts_with("llmtap: "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_gets_404_naming_the_prefixes() {
    let env = start("").await;
    let r = send(&env.client, Method::POST, &env.llmtap.url("/nope/v1/chat"), &[], "{}").await;
    assert_llmtap_error(&r, 404, "no_route");
    assert_eq!(
        r.json()["error"]["message"],
        "llmtap: no route for path /nope/v1/chat; configured prefixes: /anthropic, /azure/<resource>, /compat, /dead, /gemini, /openai, /v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502_upstream_connect() {
    let env = start("").await;
    let r = post_json(&env.client, &env.llmtap.url("/dead/v1/chat/completions"), &[], &chat(false)).await;
    assert_llmtap_error(&r, 502, "upstream_connect");
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!(
        (rec["status"].as_u64(), rec["error_kind"].as_str(), rec["route"].as_str()),
        (Some(502), Some("upstream_connect"), Some("dead"))
    );
    assert_eq!(rec["usage_source"], "none");
    assert_eq!(rec["request_model"], "gpt-4o");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_504_before_the_head_and_cut_the_stream_after_it() {
    let env = start("[client]\nfirst_byte_timeout_ms = 300\nidle_timeout_ms = 300\n").await;
    let t = Instant::now();
    let r = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[("x-mock-first-byte-delay-ms", "3000")],
        &chat(false),
    )
    .await;
    assert!(t.elapsed() < Duration::from_millis(2500));
    assert_llmtap_error(&r, 504, "upstream_timeout");
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!((rec["status"].as_u64(), rec["error_kind"].as_str()), (Some(504), Some("upstream_timeout")));

    // Mid-stream silence: the client gets the head and the first frame, then a cut body.
    let req = http::Request::post(env.llmtap.url("/v1/chat/completions"))
        .header("x-mock-chunk-delay-ms", "2000")
        .body(http_body_util::Full::new(bytes::Bytes::from(serde_json::to_vec(&chat(true)).unwrap())))
        .unwrap();
    let resp = env.client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-llmtap-trace-id"].to_str().unwrap().to_owned();
    let res = http_body_util::BodyExt::collect(resp.into_body()).await;
    assert!(res.is_err(), "the client must see the stream cut, not a clean end");
    let rec = record(&env.llmtap.data_dir, &trace).await;
    assert_eq!((rec["status"].as_u64(), rec["error_kind"].as_str()), (Some(200), Some("upstream_timeout")));
    assert_eq!(rec["usage_source"], "estimated", "tokens already generated are estimated");

    // Frames closer than the idle timeout keep a stream alive for many times its length.
    let r = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[("x-mock-chunks", "8"), ("x-mock-chunk-delay-ms", "150")],
        &chat(true),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.ends_with(b"data: [DONE]\n\n"));
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!(rec["error_kind"], "", "a stream that never paused 300 ms is not idle");
    assert!(rec["duration_ms"].as_f64().unwrap() > 1200.0);

    // The same silence inside a JSON body.
    let resp = env.client.request(split_json_request(&env, "2000")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-llmtap-trace-id"].to_str().unwrap().to_owned();
    assert!(http_body_util::BodyExt::collect(resp.into_body()).await.is_err(), "a cut body, not a clean end");
    let rec = record(&env.llmtap.data_dir, &trace).await;
    assert_eq!((rec["status"].as_u64(), rec["error_kind"].as_str()), (Some(200), Some("upstream_timeout")));
}

/// A JSON body sent to llmtap in two frames, the second `delay_ms` after the first.
fn split_json_request(env: &Env, delay_ms: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(env.llmtap.url("/v1/chat/completions"))
        .header("x-mock-split-at", "20")
        .header("x-mock-chunk-delay-ms", delay_ms)
        .body(http_body_util::Full::new(bytes::Bytes::from(serde_json::to_vec(&chat(false)).unwrap())))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_is_forwarded_as_it_arrives_not_held_for_its_end() {
    let env = start("").await;
    let direct = post_json(&env.client, &format!("{}/v1/chat/completions", env.mock.url()), &[], &chat(false)).await;
    let t = Instant::now();
    let resp = env.client.request(split_json_request(&env, "3000")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let trace = resp.headers()["x-llmtap-trace-id"].to_str().unwrap().to_owned();
    let mut body = resp.into_body();
    let first = http_body_util::BodyExt::frame(&mut body).await.unwrap().unwrap().into_data().unwrap();
    // llmtap takes what the upstream already sent along with the head, and no more.
    assert!(t.elapsed() < Duration::from_millis(2000), "the first 20 bytes took {:?}", t.elapsed());
    assert_eq!(first.as_ref(), &direct.body[..20]);
    let rest = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
    assert!(t.elapsed() >= Duration::from_millis(3000));
    assert_eq!([first, rest].concat(), direct.body.to_vec(), "the client gets the upstream's bytes");
    let rec = record(&env.llmtap.data_dir, &trace).await;
    assert_eq!((rec["status"].as_u64(), rec["error_kind"].as_str()), (Some(200), Some("")));
    assert_eq!(rec["output_text"], "Hello from the mock upstream.");
    assert_eq!((rec["input_tokens"].as_u64(), rec["output_tokens"].as_u64()), (Some(11), Some(7)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_413_with_or_without_content_length() {
    let env = start("[client]\nmax_request_body_bytes = 1024\n").await;
    let big = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let r = post_json(&env.client, &env.llmtap.url("/v1/chat/completions"), &[], &big).await;
    assert_llmtap_error(&r, 413, "body_too_large");
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!((rec["status"].as_u64(), rec["error_kind"].as_str()), (Some(413), Some("body_too_large")));

    // Chunked, no content-length: the limit still holds.
    let mut s = TcpStream::connect(env.llmtap.proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = "y".repeat(800);
    let mut req = String::from("POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n");
    for _ in 0..3 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(env.mock.stats.requests.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing reached the upstream");
    let recs = records_at_least(&env.llmtap.data_dir, 2).await;
    assert_eq!(recs.iter().filter(|r| r["error_kind"] == "body_too_large").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_statuses_pass_through_unchanged() {
    let env = start("").await;
    for status in ["400", "429", "500", "503"] {
        let direct = post_json(
            &env.client,
            &format!("{}/v1/chat/completions", env.mock.url()),
            &[("x-mock-status", status)],
            &chat(false),
        )
        .await;
        let r =
            post_json(&env.client, &env.llmtap.url("/v1/chat/completions"), &[("x-mock-status", status)], &chat(false))
                .await;
        assert_eq!(r.status.as_str(), status);
        assert_eq!(r.body, direct.body);
        assert!(r.headers.get("x-llmtap-error").is_none());
        let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
        assert_eq!(rec["status"].as_str().map(str::to_owned).unwrap_or(rec["status"].to_string()), status);
        assert_eq!(rec["error_kind"], "http_error");
        assert_eq!((rec["usage_source"].as_str(), rec["input_tokens"].as_u64()), (Some("none"), Some(0)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_stream_is_recorded() {
    let env = start("").await;
    let req = http::Request::post(env.llmtap.url("/v1/chat/completions"))
        .header("x-mock-abort-after-chunks", "3")
        .header("x-mock-chunk-delay-ms", "50")
        .body(http_body_util::Full::new(bytes::Bytes::from(serde_json::to_vec(&chat(true)).unwrap())))
        .unwrap();
    let resp = env.client.request(req).await.unwrap();
    let trace = resp.headers()["x-llmtap-trace-id"].to_str().unwrap().to_owned();
    assert!(http_body_util::BodyExt::collect(resp.into_body()).await.is_err());
    let rec = record(&env.llmtap.data_dir, &trace).await;
    assert_eq!((rec["status"].as_u64(), rec["error_kind"].as_str()), (Some(200), Some("upstream_reset")));
    assert_eq!(rec["output_text"], "Hello from the ", "the role chunk and two pieces arrived before the reset");
}

/// Raw HTTP/1.1 so the test controls exactly when the client goes away.
fn open_stream(addr: std::net::SocketAddr, extra: &str) -> (TcpStream, String, String) {
    let body = serde_json::to_string(&chat(true)).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("data: ") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let trace = seen.lines().find_map(|l| l.strip_prefix("x-llmtap-trace-id: ")).unwrap().trim().to_owned();
    (s, trace, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_stream_cancels_the_upstream_within_a_second() {
    let env = start("").await;
    let (s, trace, _) = open_stream(env.llmtap.proxy, "x-mock-chunk-delay-ms: 300\r\nx-mock-chunks: 30\r\n");
    drop(s);
    let t = Instant::now();
    while env.mock.stats.cancelled.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t.elapsed() < Duration::from_secs(1), "upstream request not cancelled within 1 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rec = record(&env.llmtap.data_dir, &trace).await;
    assert_eq!((rec["status"].as_u64(), rec["error_kind"].as_str()), (Some(200), Some("client_disconnect")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_right_after_the_final_event_has_succeeded() {
    let env = start("").await;
    let (mut s, trace, mut seen) = open_stream(env.llmtap.proxy, "x-mock-hold-after-ms: 5000\r\n");
    let mut buf = [0u8; 4096];
    while !seen.contains("data: [DONE]") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(s);
    let rec = record(&env.llmtap.data_dir, &trace).await;
    assert_eq!(rec["error_kind"], "", "closing after [DONE] is success");
    assert_eq!(rec["usage_source"], "reported");
    assert_eq!(rec["finish_reason"], "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_json_passes_through_and_is_parse_error() {
    let env = start("").await;
    let dir = llmtap_testkit::fixtures_dir();
    let case = llmtap_testkit::Case::load(&dir, "openai/chat_stream_malformed").unwrap();
    let body = case.body(&dir, "openai/chat_stream_malformed").unwrap();
    let r = post_json(
        &env.client,
        &env.llmtap.url(&case.path),
        &[("x-mock-fixture", "openai/chat_stream_malformed")],
        &case.request,
    )
    .await;
    assert_eq!(r.body.as_ref(), body.as_slice());
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!(rec["error_kind"], "parse_error");
    check_expect("malformed", &case.expect, &rec);
}
