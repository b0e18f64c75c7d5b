//! The client gets exactly the upstream's bytes, and every call leaves an exact record:
//! every provider fixture through the real binary, OpenAI usage injection invisible at every
//! byte split, compressed bodies, h2c, metadata headers and secrets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use common::*;
use http::Method;
use llmtap_testkit::{all_cases, fixtures_dir, Case};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_passes_through_unchanged_with_an_exact_record() {
    let env = start("").await;
    let dir = fixtures_dir();
    for name in all_cases(&dir) {
        let case = Case::load(&dir, &name).unwrap();
        let body = case.body(&dir, &name).unwrap();
        for chunk in ["0", "7"] {
            let headers = [
                ("authorization", "Bearer sk-test-secret"),
                ("x-mock-fixture", name.as_str()),
                ("x-mock-chunk-bytes", chunk),
            ];
            let r = post_json(&env.client, &env.llmtap.url(&case.path), &headers, &case.request).await;
            assert_eq!(r.status.as_u16(), case.response.status, "{name}");
            assert_eq!(r.body.as_ref(), body.as_slice(), "{name}: body bytes differ");
            for (k, v) in &case.response.headers {
                assert_eq!(
                    r.headers.get(k.as_str()).and_then(|h| h.to_str().ok()),
                    Some(v.as_str()),
                    "{name}: header {k}"
                );
            }
            let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
            check_expect(&name, &case.expect, &rec);
            assert_eq!(rec["request_body"], serde_json::to_string(&case.request).unwrap(), "{name}");
            assert!(rec["duration_ms"].as_f64().unwrap() >= rec["upstream_ms"].as_f64().unwrap(), "{name}");
            assert!(!rec.to_string().contains("sk-test-secret"), "{name}: secret stored");
        }
    }
    let seen = env.mock.last_request().unwrap();
    assert_eq!(
        seen.headers.get("authorization").map(String::as_str),
        Some("Bearer sk-test-secret"),
        "auth is forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_stream_usage_is_invisible_to_the_client_at_every_split() {
    let env = start("").await;
    let req = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    // What the client would get without llmtap: the mock answering a request without include_usage.
    let direct = post_json(&env.client, &format!("{}/v1/chat/completions", env.mock.url()), &[], &req).await;
    assert!(!String::from_utf8_lossy(&direct.body).contains("usage"));
    // What the upstream sends once llmtap has injected include_usage.
    let with_usage = post_json(
        &env.client,
        &format!("{}/v1/chat/completions", env.mock.url()),
        &[],
        &json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": []}),
    )
    .await;
    let n = with_usage.body.len();
    assert!(n > direct.body.len());
    for at in 0..=n {
        let at_s = at.to_string();
        let r =
            post_json(&env.client, &env.llmtap.url("/v1/chat/completions"), &[("x-mock-split-at", &at_s)], &req).await;
        assert_eq!(r.body, direct.body, "split at {at}");
        assert!(r.headers.get("content-length").is_none());
    }
    let seen = env.mock.last_request().unwrap();
    let forwarded: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(forwarded["stream_options"]["include_usage"], true);
    assert_eq!(seen.headers.get("accept-encoding").map(String::as_str), Some("identity"));
    let recs = records_at_least(&env.llmtap.data_dir, n + 1).await;
    assert_eq!(recs.len(), n + 1);
    for rec in recs {
        assert_eq!(rec["usage_source"], "reported");
        assert_eq!((rec["input_tokens"].as_u64(), rec["output_tokens"].as_u64()), (Some(11), Some(7)));
        assert_eq!(rec["output_text"], "Hello from the mock upstream.");
        assert_eq!(rec["request_body"], serde_json::to_string(&req).unwrap(), "stored body is what the client sent");
        assert!((rec["cost_usd"].as_f64().unwrap() - (11.0 * 2.5e-6 + 7.0 * 1e-5)).abs() < 1e-15);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_asking_for_usage_still_gets_it() {
    let env = start("").await;
    let req = json!({"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let direct = post_json(&env.client, &format!("{}/v1/chat/completions", env.mock.url()), &[], &req).await;
    let r = post_json(&env.client, &env.llmtap.url("/v1/chat/completions"), &[], &req).await;
    assert_eq!(r.body, direct.body);
    assert!(String::from_utf8_lossy(&r.body).contains(r#""choices":[],"usage":{"prompt_tokens":11"#));
}

/// A stream long enough to reach the recorder in several pieces (4 KiB each): its facts are
/// the whole stream's, and its time to first token is when the first content arrived, not
/// when the piece holding it was cut or parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_streams_record_is_exact_and_its_first_token_time_is_the_first_contents() {
    let env = start("").await;
    let content: String = (0..60).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let req = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let headers = [("x-mock-content", content.as_str()), ("x-mock-chunks", "60"), ("x-mock-chunk-delay-ms", "25")];
    let direct = post_json(&env.client, &format!("{}/v1/chat/completions", env.mock.url()), &headers, &req).await;
    let r = post_json(&env.client, &env.llmtap.url("/v1/chat/completions"), &headers, &req).await;
    assert_eq!(r.body, direct.body);
    assert!(r.body.len() > 3 * 4096, "the stream spans several pieces: {} bytes", r.body.len());
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!(rec["output_text"], content.as_str());
    assert_eq!((rec["input_tokens"].as_u64(), rec["output_tokens"].as_u64()), (Some(11), Some(7)));
    assert_eq!((rec["usage_source"].as_str(), rec["finish_reason"].as_str()), (Some("reported"), Some("stop")));
    assert_eq!(rec["error_kind"], "");
    // The role event comes with the head; the first content 25 ms later; the first 4 KiB
    // piece is cut about 18 events (450 ms) in, and the stream ends after 1.5 s.
    let (ttft, upstream, duration) =
        (rec["ttft_ms"].as_f64().unwrap(), rec["upstream_ms"].as_f64().unwrap(), rec["duration_ms"].as_f64().unwrap());
    assert!(duration >= 1475.0, "{rec}");
    assert!(ttft - upstream >= 10.0 && ttft - upstream < 200.0, "ttft {ttft} ms, head at {upstream} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_reach_the_client_compressed_and_are_still_parsed() {
    let env = start("").await;
    let dir = fixtures_dir();
    for name in ["openai/chat_json", "anthropic/messages_stream_tools", "gemini/stream_json_array"] {
        let case = Case::load(&dir, name).unwrap();
        let plain = case.body(&dir, name).unwrap();
        let r = post_json(
            &env.client,
            &env.llmtap.url(&case.path),
            &[
                ("x-mock-fixture", name),
                ("x-mock-gzip", "1"),
                ("x-mock-chunk-bytes", "13"),
                ("accept-encoding", "gzip"),
            ],
            &case.request,
        )
        .await;
        assert_eq!(r.headers.get("content-encoding").unwrap(), "gzip");
        assert_eq!(r.body.as_ref(), llmtap_testkit::gzip(&plain).as_slice(), "{name}");
        let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
        check_expect(name, &case.expect, &rec);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served() {
    let env = start("").await;
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let req = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let r = post_json(&h2, &env.llmtap.url("/openai/v1/chat/completions"), &[], &req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hello from the mock upstream.");
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!(rec["route"], "openai");
    assert_eq!(rec["path"], "/openai/v1/chat/completions");
    assert!((rec["cost_usd"].as_f64().unwrap() - (11.0 * 0.15e-6 + 7.0 * 0.6e-6)).abs() < 1e-15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_headers_fill_the_record_and_never_reach_the_upstream() {
    let env = start("").await;
    let req = json!({"model": "gpt-4o", "user": "body-user", "messages": []});
    let r = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[
            ("x-llmtap-app", "support-bot"),
            ("x-llmtap-session", "sess-1"),
            ("x-llmtap-tag-team", "search"),
            ("x-llmtap-tag-env", "prod"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ("x-api-key", "sk-ant-secret"),
            ("cookie", "session=secret-cookie"),
        ],
        &req,
    )
    .await;
    assert_eq!(r.trace_id(), "0af7651916cd43dd8448eb211c80319c");
    let rec = record(&env.llmtap.data_dir, "0af7651916cd43dd8448eb211c80319c").await;
    assert_eq!(rec["app"], "support-bot");
    assert_eq!(rec["session_id"], "sess-1");
    assert_eq!(rec["user_id"], "body-user", "OpenAI `user` fills user_id when no header does");
    assert_eq!(rec["tags"], json!({"env": "prod", "team": "search"}));
    assert_eq!(rec["parent_span_id"], "b7ad6b7169203331");
    assert_eq!(rec["span_id"].as_str().unwrap().len(), 16);
    let text = rec.to_string();
    assert!(!text.contains("sk-ant-secret") && !text.contains("secret-cookie"));
    let seen = env.mock.last_request().unwrap();
    assert!(seen.headers.keys().all(|k| !k.starts_with("x-llmtap-")), "{:?}", seen.headers.keys());
    assert_eq!(
        seen.headers.get("traceparent").map(String::as_str),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );

    let r = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[("x-llmtap-user", "hdr-user"), ("x-llmtap-capture", "none")],
        &req,
    )
    .await;
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!(rec["user_id"], "hdr-user");
    assert_eq!((rec["request_body"].as_str(), rec["output_text"].as_str()), (Some(""), Some("")));
    assert_eq!(rec["output_tokens"], 7, "facts are kept without bodies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_redacts_caps_and_replaces_images() {
    let env = start("[capture]\nmax_body_bytes = 200\nredact = ['sk-[a-z0-9]+', '\\d{3}-\\d{2}-\\d{4}']\n").await;
    let img = "iVBORw0KGgo".repeat(100);
    let req = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "my ssn is 123-45-6789"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{img}")}}
    ]}]});
    let r = post_json(
        &env.client,
        &env.llmtap.url("/v1/chat/completions"),
        &[("x-mock-content", "key sk-abc123 here")],
        &req,
    )
    .await;
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    let body = rec["request_body"].as_str().unwrap();
    assert!(body.contains("my ssn is [REDACTED]"), "{body}");
    assert!(body.contains("data:image/png;base64,[inline data: 1100 bytes]"), "{body}");
    assert!(body.len() <= 200);
    assert_eq!(rec["output_text"], "key [REDACTED] here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_llm_paths_pass_through_too() {
    let env = start("").await;
    let r = send(&env.client, Method::GET, &env.llmtap.url("/v1/models"), &[], "").await;
    assert_eq!(r.status, 404, "the mock knows no /v1/models");
    let rec = record(&env.llmtap.data_dir, &r.trace_id()).await;
    assert_eq!(rec["operation"], "other");
    assert_eq!(rec["error_kind"], "http_error");
    assert_eq!(rec["method"], "GET");
}

/// llmtap in front of the TLS mock, reached through a `/secure` route.
async fn tls_env(client_cfg: &str) -> (llmtap_testkit::MockUpstream, llmtap_testkit::process::LlmtapProcess) {
    let mock = llmtap_testkit::MockUpstream::start_tls("127.0.0.1:0".parse().unwrap(), &fixtures_dir()).await.unwrap();
    let config = format!(
        "{client_cfg}\n[[route]]\nname = \"secure\"\nprefix = \"/secure\"\nupstream = \"https://localhost:{}\"\n",
        mock.addr.port()
    );
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_llmtap"));
    let p = llmtap_testkit::process::LlmtapProcess::start(bin, &config, &[]).unwrap();
    (mock, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_use_h2_by_alpn_and_trust_the_extra_ca() {
    let ca = llmtap_testkit::MockUpstream::tls_ca_file();
    let c = client();
    let req = json!({"model": "gpt-4o", "stream": true, "messages": []});
    for (http2, version) in [("true", "HTTP/2.0"), ("false", "HTTP/1.1")] {
        let (mock, p) =
            tls_env(&format!("[client]\nextra_ca_file = {:?}\nhttp2 = {http2}\n", ca.display().to_string())).await;
        let direct = generate_direct(&req);
        let r = post_json(&c, &p.url("/secure/v1/chat/completions"), &[], &req).await;
        assert_eq!(r.status, 200, "{}", p.stderr());
        assert_eq!(r.body.as_ref(), direct.as_slice());
        assert_eq!(mock.last_request().unwrap().version, version);
        let rec = record(&p.data_dir, &r.trace_id()).await;
        assert_eq!((rec["route"].as_str(), rec["usage_source"].as_str()), (Some("secure"), Some("reported")));
    }
    // Without the extra CA the certificate is not trusted: a connect error, not a hang.
    let (_mock, p) = tls_env("").await;
    let r = post_json(&c, &p.url("/secure/v1/chat/completions"), &[], &req).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers.get("x-llmtap-error").unwrap(), "upstream_connect");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("certificate"), "{}", r.json());
}

/// What the mock sends for `req` when the client did not ask for usage.
fn generate_direct(req: &serde_json::Value) -> Vec<u8> {
    llmtap_testkit::generate_chat(req, &http::HeaderMap::new()).1.concat()
}
