//! A test judge endpoint: an OpenAI-compatible chat-completions server whose behaviour is
//! chosen by the first path segment, so one server plays every kind of judge:
//!
//! - `/json/…` answers the structured JSON the system prompt asks for;
//! - `/text/…` answers prose with the verdict in it (`I'd rate it 4 out of 5.`);
//! - `/garbage/…` answers text with no verdict; `/notjson/…` a 200 that is not JSON;
//! - `/slow/…` waits 5 s before answering;
//! - `/429/…` answers 429 twice for each prompt, then as `/json/`;
//! - `/noschema/…` rejects `response_format` with a 400, then answers as `/json/`.
//!
//! The verdict comes from the prompt: `SCORE=<n>` (numeric; boolean passes at 4 or more) and
//! `LABEL=<label>` (categorical). Every answer reports 100 prompt and 20 completion tokens.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};

/// One request the judge endpoint saw.
#[derive(Clone, Debug)]
pub struct JudgeRequest {
    pub mode: String,
    pub path: String,
    pub authorization: Option<String>,
    pub score_header: Option<String>,
    pub body: Value,
    pub at: Instant,
}

#[derive(Default)]
struct JudgeState {
    seen: Mutex<Vec<JudgeRequest>>,
    in_flight: Mutex<HashMap<String, usize>>,
    max_in_flight: Mutex<HashMap<String, usize>>,
    attempts: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
}

/// The running test judge endpoint.
pub struct JudgeMock {
    pub addr: SocketAddr,
    state: Arc<JudgeState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JudgeMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JudgeMock {
    pub async fn start() -> std::io::Result<JudgeMock> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(JudgeState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(JudgeMock { addr, state, task })
    }

    /// Base URL of one behaviour, e.g. `url("json")` → `http://127.0.0.1:p/json/v1`.
    pub fn url(&self, mode: &str) -> String {
        format!("http://{}/{mode}/v1", self.addr)
    }

    pub fn requests(&self) -> Vec<JudgeRequest> {
        self.state.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Most requests of one mode in flight at once.
    pub fn max_in_flight(&self, mode: &str) -> usize {
        self.state.max_in_flight.lock().ok().and_then(|m| m.get(mode).copied()).unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.state.total.load(Ordering::Relaxed)
    }
}

fn chat(content: &str, model: &str) -> Value {
    json!({
        "id": "chatcmpl-judge",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    })
}

fn marker<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    let rest = &text[at..];
    let end = rest.find(|c: char| c.is_whitespace() || c == '"' || c == ',').unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The verdict the prompt asks for, in the shape the system prompt names.
fn structured(body: &Value) -> String {
    let system = body.pointer("/messages/0/content").and_then(Value::as_str).unwrap_or("");
    let prompt = body.pointer("/messages/1/content").and_then(Value::as_str).unwrap_or("");
    let score: f64 = marker(prompt, "SCORE=").and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let reasoning = format!("judged {} chars", prompt.len());
    if system.contains("\"pass\"") {
        json!({"reasoning": reasoning, "pass": score >= 4.0}).to_string()
    } else if system.contains("\"label\"") {
        json!({"reasoning": reasoning, "label": marker(prompt, "LABEL=").unwrap_or("none")}).to_string()
    } else {
        json!({"reasoning": reasoning, "score": score}).to_string()
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

async fn handle(st: Arc<JudgeState>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let mode = path.trim_start_matches('/').split('/').next().unwrap_or("").to_owned();
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (authorization, score_header) = (header("authorization"), header("x-llmtap-score"));
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    st.total.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut seen) = st.seen.lock() {
        seen.push(JudgeRequest {
            mode: mode.clone(),
            path,
            authorization,
            score_header,
            body: body.clone(),
            at: Instant::now(),
        });
    }
    if let (Ok(mut now), Ok(mut max)) = (st.in_flight.lock(), st.max_in_flight.lock()) {
        let n = now.entry(mode.clone()).or_default();
        *n += 1;
        let m = max.entry(mode.clone()).or_default();
        *m = (*m).max(*n);
    }
    let model = body.get("model").and_then(Value::as_str).unwrap_or("judge").to_owned();
    let prompt = body.pointer("/messages/1/content").and_then(Value::as_str).unwrap_or("").to_owned();
    // Long enough that concurrent calls overlap.
    tokio::time::sleep(Duration::from_millis(40)).await;
    let resp = match mode.as_str() {
        "json" => reply(StatusCode::OK, chat(&structured(&body), &model).to_string()),
        "text" => {
            let score: f64 = marker(&prompt, "SCORE=").and_then(|s| s.parse().ok()).unwrap_or(3.0);
            let text = format!("The reply answers the question and names the plan.\n\nI'd rate it {score} out of 5.");
            reply(StatusCode::OK, chat(&text, &model).to_string())
        }
        "garbage" => reply(StatusCode::OK, chat("¯\\_(ツ)_/¯ bananas all the way down", &model).to_string()),
        "notjson" => reply(StatusCode::OK, "<html>upstream proxy error</html>".into()),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            reply(StatusCode::OK, chat(&structured(&body), &model).to_string())
        }
        "429" => {
            let n = st
                .attempts
                .lock()
                .map(|mut a| {
                    let n = a.entry(prompt.clone()).or_default();
                    *n += 1;
                    *n
                })
                .unwrap_or(3);
            if n <= 2 {
                let mut r = reply(
                    StatusCode::TOO_MANY_REQUESTS,
                    json!({"error": {"message": "Rate limit reached", "type": "rate_limit"}}).to_string(),
                );
                r.headers_mut().insert("retry-after", http::HeaderValue::from_static("0.05"));
                r
            } else {
                reply(StatusCode::OK, chat(&structured(&body), &model).to_string())
            }
        }
        "noschema" if body.get("response_format").is_some() => reply(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": "response_format of type json_schema is not supported by this model"}})
                .to_string(),
        ),
        "noschema" => reply(StatusCode::OK, chat(&structured(&body), &model).to_string()),
        _ => reply(StatusCode::NOT_FOUND, json!({"error": {"message": "unknown judge mode"}}).to_string()),
    };
    if let Ok(mut now) = st.in_flight.lock() {
        if let Some(n) = now.get_mut(&mode) {
            *n -= 1;
        }
    }
    Ok(resp)
}
