//! Shared test support for llmtap: a mock LLM upstream that replays provider fixtures and
//! generates OpenAI Chat Completions (with or without `include_usage`), with controls for
//! delays, errors and resets, and counters for requests that the peer cancelled.
//! The contract is in `testkit/README.md`; the proxy tests, the Python SDK tests and the
//! benchmarks all use it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::sync::mpsc;

/// Counters of what the mock served.
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
}

/// The last request the mock received.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SeenRequest {
    pub method: String,
    /// `HTTP/1.1` or `HTTP/2.0`, as the request arrived.
    pub version: String,
    pub path: String,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: String,
}

struct State {
    fixtures: PathBuf,
    stats: Arc<MockStats>,
    last: Mutex<Option<SeenRequest>>,
}

/// A running mock upstream on loopback.
pub struct MockUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<MockStats>,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    /// Binds `addr` (use port 0) and serves plain HTTP/1.1 and h2c on the current runtime.
    pub async fn start(addr: SocketAddr, fixtures: &Path) -> std::io::Result<MockUpstream> {
        Self::start_with(addr, fixtures, None).await
    }

    /// Same, over TLS with the test certificate in `testkit/tls/` (trust `ca.pem`), offering
    /// `h2` and `http/1.1` by ALPN.
    pub async fn start_tls(addr: SocketAddr, fixtures: &Path) -> std::io::Result<MockUpstream> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tls");
        let certs = CertificateDer::pem_file_iter(dir.join("server.pem"))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(std::io::Error::other)?;
        let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).map_err(std::io::Error::other)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
            .map_err(std::io::Error::other)?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::start_with(addr, fixtures, Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
    }

    async fn start_with(
        addr: SocketAddr,
        fixtures: &Path,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<MockUpstream> {
        // A deep accept queue, as a real server has: the benchmarks open 1,000 streams at once.
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(MockStats::default());
        let state = Arc::new(State { fixtures: fixtures.to_path_buf(), stats: stats.clone(), last: Mutex::new(None) });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                let st = st.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), req));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Ok(MockUpstream { addr, stats, state, task })
    }

    /// Path of the CA that signed the TLS mock's certificate.
    pub fn tls_ca_file() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tls/ca.pem")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The last request received (after any proxy rewrite).
    pub fn last_request(&self) -> Option<SeenRequest> {
        self.state.last.lock().ok().and_then(|l| l.clone())
    }
}

/// The repository's fixture folder (`ingest/tests/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ingest/tests/fixtures")
}

pub mod chdb;
pub mod judge;
pub mod otlp;
pub mod process;
pub mod tools;
pub mod webhook;

/// One fixture case (`<provider>/<case>.case.json`).
#[derive(Clone, Debug, Deserialize)]
pub struct Case {
    #[serde(default)]
    pub description: String,
    pub path: String,
    #[serde(default = "post")]
    pub method: String,
    #[serde(default)]
    pub request: serde_json::Value,
    pub response: CaseResponse,
    #[serde(default)]
    pub expect: serde_json::Map<String, serde_json::Value>,
}

fn post() -> String {
    "POST".into()
}

#[derive(Clone, Debug, Deserialize)]
pub struct CaseResponse {
    pub status: u16,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    pub body_file: String,
}

impl Case {
    /// Loads `<dir>/<name>.case.json` (`name` is `provider/case`).
    pub fn load(dir: &Path, name: &str) -> anyhow::Result<Case> {
        let p = dir.join(format!("{name}.case.json"));
        let text = std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    }

    /// The response body bytes.
    pub fn body(&self, dir: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
        let folder = Path::new(name).parent().map(|p| dir.join(p)).unwrap_or_else(|| dir.to_path_buf());
        let p = folder.join(&self.response.body_file);
        std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    }
}

/// Asserts every field of a case's `expect` block on a record (as JSON); floats compare to
/// 1e-9 relative (costs are sums of products), everything else exactly.
pub fn check_expect(name: &str, expect: &serde_json::Map<String, serde_json::Value>, record: &serde_json::Value) {
    use serde_json::Value;
    for (k, want) in expect {
        let have = &record[k];
        match (want, have) {
            (Value::Number(w), Value::Number(h)) if w.is_f64() || h.is_f64() => {
                let (w, h) = (w.as_f64().unwrap_or(f64::NAN), h.as_f64().unwrap_or(f64::NAN));
                assert!((w - h).abs() <= 1e-12_f64.max(w.abs() * 1e-9), "{name}: {k}: want {w}, got {h}");
            }
            _ => assert_eq!(have, want, "{name}: {k}"),
        }
    }
}

/// Every case name (`provider/case`) in the fixture folder, sorted.
pub fn all_cases(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(providers) = std::fs::read_dir(dir) {
        for p in providers.flatten() {
            let Ok(files) = std::fs::read_dir(p.path()) else { continue };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some(case) = name.strip_suffix(".case.json") {
                    out.push(format!("{}/{case}", p.file_name().to_string_lossy()));
                }
            }
        }
    }
    out.sort();
    out
}

/// gzip of `data` as the mock sends it with `x-mock-gzip`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = gz.write_all(data);
    gz.finish().unwrap_or_default()
}

/// A response body fed by a task; counts completion and cancellation.
struct FeedBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    stats: Arc<MockStats>,
    finished: bool,
}

impl hyper::body::Body for FeedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => {
                self.finished = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                if !self.finished {
                    self.finished = true;
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for FeedBody {
    fn drop(&mut self) {
        if !self.finished {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn header_u64(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok())
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn json_response(status: StatusCode, body: String) -> Response<FeedBody> {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Ok(Bytes::from(body)));
    drop(tx);
    let mut r = Response::new(FeedBody { rx, stats: Arc::new(MockStats::default()), finished: false });
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<FeedBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if path == "/__mock/stats" {
        let s = &st.stats;
        let v = serde_json::json!({
            "requests": s.requests.load(Ordering::Relaxed),
            "completed": s.completed.load(Ordering::Relaxed),
            "cancelled": s.cancelled.load(Ordering::Relaxed),
        });
        return Ok(json_response(StatusCode::OK, v.to_string()));
    }
    if path == "/__mock/last-request" {
        let last = st.last.lock().ok().and_then(|l| l.clone()).unwrap_or_default();
        return Ok(json_response(StatusCode::OK, serde_json::to_string(&last).unwrap_or_default()));
    }
    st.stats.requests.fetch_add(1, Ordering::Relaxed);
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let h = parts.headers;
    let seen = SeenRequest {
        method: parts.method.to_string(),
        version: format!("{:?}", parts.version),
        path: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        headers: h.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect(),
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    if let Ok(mut l) = st.last.lock() {
        *l = Some(seen);
    }

    if let Some(d) = header_u64(&h, "x-mock-first-byte-delay-ms") {
        tokio::time::sleep(Duration::from_millis(d)).await;
    }
    let chunk_delay = header_u64(&h, "x-mock-chunk-delay-ms").map(Duration::from_millis);
    let abort_after = header_u64(&h, "x-mock-abort-after-chunks");

    if let Some(status) = header_u64(&h, "x-mock-status") {
        let code = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = format!(
            r#"{{"error":{{"message":"mock error {status}","type":"mock_error","param":null,"code":"{status}"}}}}"#
        );
        return Ok(json_response(code, body));
    }

    let (status, headers, frames) = if let Some(name) = header_str(&h, "x-mock-fixture") {
        match Case::load(&st.fixtures, name).and_then(|c| c.body(&st.fixtures, name).map(|b| (c, b))) {
            Ok((case, bytes)) => {
                let frames =
                    split_frames(bytes, header_u64(&h, "x-mock-chunk-bytes"), header_u64(&h, "x-mock-split-at"));
                (case.response.status, case.response.headers, frames)
            }
            Err(e) => {
                return Ok(json_response(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": e.to_string()}).to_string(),
                ))
            }
        }
    } else if path.ends_with("/chat/completions") {
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let (ctype, frames) = generate_chat(&req, &h);
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("content-type".to_owned(), ctype.to_owned());
        let frames = match header_u64(&h, "x-mock-split-at") {
            Some(at) => split_frames(frames.concat(), None, Some(at)),
            None => frames,
        };
        (200, headers, frames)
    } else {
        return Ok(json_response(StatusCode::NOT_FOUND, r#"{"error":{"message":"mock: unknown path"}}"#.to_owned()));
    };

    let (headers, frames) = if h.contains_key("x-mock-gzip") {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = gz.write_all(&frames.concat());
        let mut headers = headers;
        headers.insert("content-encoding".to_owned(), "gzip".to_owned());
        let zipped = gz.finish().unwrap_or_default();
        (headers, split_frames(zipped, header_u64(&h, "x-mock-chunk-bytes"), None))
    } else {
        (headers, frames)
    };
    let hold_after = header_u64(&h, "x-mock-hold-after-ms").map(Duration::from_millis);
    let (tx, rx) = mpsc::channel(16);
    let split_pause = header_u64(&h, "x-mock-split-at").map(|_| Duration::from_millis(2));
    tokio::spawn(async move {
        for (i, f) in frames.into_iter().enumerate() {
            if i > 0 {
                if let Some(d) = chunk_delay.or(split_pause) {
                    tokio::time::sleep(d).await;
                }
            }
            if abort_after.is_some_and(|n| i as u64 >= n) {
                let _ = tx.send(Err(std::io::Error::other("mock: abort"))).await;
                return;
            }
            if tx.send(Ok(Bytes::from(f))).await.is_err() {
                return;
            }
        }
        if let Some(d) = hold_after {
            // Keep the body open after the last frame, as a slow upstream close would.
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tx.closed() => {}
            }
        }
    });
    let mut r = Response::new(FeedBody { rx, stats: st.stats.clone(), finished: false });
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(&v)) {
            r.headers_mut().insert(k, v);
        }
    }
    Ok(r)
}

fn split_frames(bytes: Vec<u8>, chunk: Option<u64>, split_at: Option<u64>) -> Vec<Vec<u8>> {
    if let Some(at) = split_at {
        let at = (at as usize).min(bytes.len());
        return vec![bytes[..at].to_vec(), bytes[at..].to_vec()].into_iter().filter(|f| !f.is_empty()).collect();
    }
    match chunk {
        Some(n) if n > 0 => bytes.chunks(n as usize).map(<[u8]>::to_vec).collect(),
        _ => vec![bytes],
    }
}

/// Splits `s` into `n` pieces of near-equal character length (earlier pieces longer).
pub fn split_even(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let n = n.clamp(1, chars.len().max(1));
    let (base, extra) = (chars.len() / n, chars.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(chars[at..at + len].iter().collect());
        at += len;
    }
    out
}

/// The generated Chat Completions answer: content type and body frames.
pub fn generate_chat(req: &serde_json::Value, h: &HeaderMap) -> (&'static str, Vec<Vec<u8>>) {
    let model = req.get("model").and_then(|m| m.as_str()).unwrap_or("gpt-4o").to_owned();
    let model = serde_json::to_string(&model).unwrap_or_default();
    let stream = req.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    let include_usage = req.pointer("/stream_options/include_usage").and_then(|v| v.as_bool()).unwrap_or(false);
    let content = header_str(h, "x-mock-content").unwrap_or("Hello from the mock upstream.").to_owned();
    let pieces = header_u64(h, "x-mock-chunks").unwrap_or(4) as usize;
    let tools: Vec<String> = header_str(h, "x-mock-tool-calls")
        .map(|t| t.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let prompt = header_u64(h, "x-mock-prompt-tokens").unwrap_or(11);
    let completion = header_u64(h, "x-mock-completion-tokens").unwrap_or(7);
    let usage = format!(
        r#"{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
        prompt + completion
    );
    let finish = if tools.is_empty() { "stop" } else { "tool_calls" };
    if !stream {
        let message = if tools.is_empty() {
            format!(
                r#"{{"role":"assistant","content":{},"refusal":null,"annotations":[]}}"#,
                serde_json::to_string(&content).unwrap_or_default()
            )
        } else {
            let calls: Vec<String> = tools
                .iter()
                .enumerate()
                .map(|(i, n)| format!(r#"{{"id":"call_{i}","type":"function","function":{{"name":{},"arguments":"{{\"arg\":{i}}}"}}}}"#, serde_json::to_string(n).unwrap_or_default()))
                .collect();
            format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{}],"refusal":null,"annotations":[]}}"#,
                calls.join(",")
            )
        };
        let body = format!(
            r#"{{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":{model},"choices":[{{"index":0,"message":{message},"logprobs":null,"finish_reason":"{finish}"}}],"usage":{usage},"service_tier":"default","system_fingerprint":"fp_mock"}}"#
        );
        return ("application/json", vec![body.into_bytes()]);
    }
    let usage_null = if include_usage { r#","usage":null"# } else { "" };
    let chunk = |delta: &str, finish: &str| -> Vec<u8> {
        format!(
            "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":{model},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]{usage_null}}}\n\n"
        )
        .into_bytes()
    };
    let mut frames = vec![chunk(r#"{"role":"assistant","content":"","refusal":null}"#, "null")];
    if tools.is_empty() {
        for p in split_even(&content, pieces) {
            frames.push(chunk(&format!(r#"{{"content":{}}}"#, serde_json::to_string(&p).unwrap_or_default()), "null"));
        }
    } else {
        for (i, name) in tools.iter().enumerate() {
            let name = serde_json::to_string(name).unwrap_or_default();
            frames.push(chunk(
                &format!(r#"{{"tool_calls":[{{"index":{i},"id":"call_{i}","type":"function","function":{{"name":{name},"arguments":""}}}}]}}"#),
                "null",
            ));
            for piece in [r#"{\"ar"#.to_owned(), r#"g\":"#.to_owned(), format!("{i}}}")] {
                frames.push(chunk(
                    &format!(r#"{{"tool_calls":[{{"index":{i},"function":{{"arguments":"{piece}"}}}}]}}"#),
                    "null",
                ));
            }
        }
    }
    frames.push(chunk("{}", &format!("\"{finish}\"")));
    if include_usage {
        frames.push(
            format!(
                "data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":{model},\"service_tier\":\"default\",\"system_fingerprint\":\"fp_mock\",\"choices\":[],\"usage\":{usage}}}\n\n"
            )
            .into_bytes(),
        );
    }
    frames.push(b"data: [DONE]\n\n".to_vec());
    ("text/event-stream", frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_pieces() {
        assert_eq!(split_even("Hello from the mock upstream.", 4), vec!["Hello fr", "om the ", "mock up", "stream."]);
    }

    #[test]
    fn stream_with_usage_differs_only_by_usage() {
        let h = HeaderMap::new();
        let with =
            generate_chat(&serde_json::json!({"model":"m","stream":true,"stream_options":{"include_usage":true}}), &h)
                .1
                .concat();
        let without = generate_chat(&serde_json::json!({"model":"m","stream":true}), &h).1.concat();
        let with = String::from_utf8(with).unwrap();
        let without = String::from_utf8(without).unwrap();
        assert!(with.contains(r#""choices":[],"usage":{"prompt_tokens":11"#));
        assert_eq!(without.matches("data: ").count(), 7); // role + 4 pieces + finish + [DONE]
        assert!(!without.contains("usage"));
    }
}
