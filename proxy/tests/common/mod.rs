//! Helpers shared by the proxy's end-to-end tests: a mock upstream plus the real `llmtap`
//! binary wired to it, and a plain hyper client.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llmtap_testkit::process::{read_records, LlmtapProcess};
use llmtap_testkit::MockUpstream;
use serde_json::Value;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Env {
    pub mock: MockUpstream,
    pub llmtap: LlmtapProcess,
    pub client: HttpClient,
}

/// Config every test starts from: a `/compat` route (OpenAI-compatible) to the mock and a
/// `/dead` route to a closed port.
pub fn base_config(mock: &MockUpstream) -> String {
    format!(
        r#"
[[route]]
name = "compat"
prefix = "/compat"
upstream = "{url}"

[[route]]
name = "dead"
prefix = "/dead"
upstream = "http://127.0.0.1:9"
"#,
        url = mock.url()
    )
}

/// Starts a mock and llmtap in front of it; `extra` is appended to the config.
pub async fn start(extra: &str) -> Env {
    start_with_env(extra, &[]).await
}

/// Same, with more environment variables for llmtap.
pub async fn start_with_env(extra: &str, more_env: &[(&str, String)]) -> Env {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), &llmtap_testkit::fixtures_dir()).await.unwrap();
    let config = format!("{extra}\n{}", base_config(&mock));
    let env: Vec<(&str, String)> = ["OPENAI", "ANTHROPIC", "GEMINI", "AZURE"]
        .iter()
        .map(|r| {
            (
                match *r {
                    "OPENAI" => "LLMTAP_UPSTREAM_OPENAI",
                    "ANTHROPIC" => "LLMTAP_UPSTREAM_ANTHROPIC",
                    "GEMINI" => "LLMTAP_UPSTREAM_GEMINI",
                    _ => "LLMTAP_UPSTREAM_AZURE",
                },
                mock.url(),
            )
        })
        .chain(more_env.iter().cloned())
        .collect();
    let llmtap = LlmtapProcess::start(Path::new(env!("CARGO_BIN_EXE_llmtap")), &config, &env).unwrap();
    Env { mock, llmtap, client: client() }
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn trace_id(&self) -> String {
        self.headers.get("x-llmtap-trace-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

pub async fn send(
    c: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c.request(b.body(Full::new(body.into())).unwrap()).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

pub async fn post_json(c: &HttpClient, url: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(c, Method::POST, url, &h, serde_json::to_vec(body).unwrap()).await
}

/// A GET's body as text (`/metrics` and other admin pages).
pub async fn get_text(c: &HttpClient, url: &str) -> String {
    String::from_utf8(send(c, Method::GET, url, &[], "").await.body.to_vec()).unwrap()
}

/// Waits (async) until the data dir holds at least `n` trace records.
pub async fn records_at_least(data_dir: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = read_records(&data_dir.join("traces"));
        if r.len() >= n || Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The record of `trace_id`, waiting for it.
pub async fn record(data_dir: &Path, trace_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(r) = read_records(&data_dir.join("traces")).into_iter().find(|r| r["trace_id"] == trace_id) {
            return r;
        }
        assert!(Instant::now() < deadline, "no record for trace {trace_id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub use llmtap_testkit::check_expect;

/// Runs the `llmtap` binary with `args` and only the given `LLMTAP_*` variables; returns
/// (exit code, stdout, stderr).
pub fn llmtap_cli(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_llmtap"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("LLMTAP_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
