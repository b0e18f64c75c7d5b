//! The admin listener: `/healthz` (the process is up), `/readyz` (the proxy listener is
//! bound and the trace log is writable; ClickHouse reported) with JSON bodies for Kubernetes
//! probes, and `/metrics` in the Prometheus text format.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use llmtap_ingest::export::prometheus::{LlmMetrics, CONTENT_TYPE};
use llmtap_ingest::recorder::RecorderStats;
use llmtap_ingest::sink::clickhouse::ShipperStats;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct AdminState {
    /// True while the proxy listener accepts calls.
    pub ready: Arc<AtomicBool>,
    pub recorder: Arc<RecorderStats>,
    pub data_dir: PathBuf,
    pub metrics: Arc<LlmMetrics>,
    /// Set when ClickHouse is configured.
    pub shipper: Option<Arc<ShipperStats>>,
    /// `log.max_disk_bytes`: a ClickHouse backlog near it fails readiness.
    pub max_disk_bytes: u64,
    pub feedback: Arc<crate::feedback::FeedbackWriter>,
    /// Bearer token `POST /v1/feedback` requires ("" for none).
    pub feedback_token: String,
    /// The scorer's metrics and the live judge–human agreement.
    pub judging: Arc<crate::judging::JudgeMetrics>,
    /// Feedback also feeds the drift detector (judge–human agreement); taken at shutdown.
    pub drift: std::sync::Mutex<Option<llmtap_scorer::drift::runner::DriftSender>>,
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

async fn feedback(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    use http_body_util::{BodyExt, Limited};
    if !state.feedback_token.is_empty() {
        let want = format!("Bearer {}", state.feedback_token);
        let ok = req.headers().get(header::AUTHORIZATION).is_some_and(|v| v.as_bytes() == want.as_bytes());
        if !ok {
            return json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": "missing or wrong bearer token"}));
        }
    }
    let body = match Limited::new(req.into_body(), crate::feedback::MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return json(
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": format!("body over {} bytes", crate::feedback::MAX_BODY)}),
            );
        }
    };
    match crate::feedback::validate(&body) {
        Err(reasons) => {
            json(StatusCode::UNPROCESSABLE_ENTITY, serde_json::json!({"error": "invalid feedback", "reasons": reasons}))
        }
        Ok(rec) => {
            let trace_id = rec.trace_id.clone();
            if let Ok(mut t) = state.judging.tracker.lock() {
                t.add_feedback(&rec);
            }
            if let Some(d) = state.drift.lock().ok().and_then(|d| d.clone()) {
                d.send(llmtap_scorer::drift::Input::Feedback(Box::new(rec.clone())));
            }
            if state.feedback.try_store(rec) {
                json(StatusCode::ACCEPTED, serde_json::json!({"status": "accepted", "trace_id": trace_id}))
            } else {
                json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"error": "feedback queue full; retry"}))
            }
        }
    }
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/v1/feedback" {
        if req.method() != http::Method::POST {
            return json(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "use POST"}));
        }
        return feedback(state, req).await;
    }
    route(state, &req)
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => readyz(state, req.uri().query().unwrap_or("")),
        "/metrics" => {
            state.judging.refresh();
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(CONTENT_TYPE));
            r
        }
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found", "paths": ["/healthz", "/readyz", "/metrics", "/v1/feedback"]}),
        ),
    }
}

/// Readiness checks, by the names `/readyz?exclude=<name>` takes (as kube-apiserver's do).
const READY_CHECKS: [&str; 3] = ["listener", "log_writable", "clickhouse_backlog"];

/// `GET /readyz[?exclude=<check>&…]`: ready when every check not excluded passes. A
/// deployment whose traffic must never wait on telemetry (the Helm chart's probe) excludes
/// `log_writable` and `clickhouse_backlog`: a full disk then drops records, counted, instead of
/// taking the proxy out of its Service.
fn readyz(state: &AdminState, query: &str) -> Response<Full<Bytes>> {
    let mut excluded = Vec::new();
    for (key, value) in query.split('&').filter(|kv| !kv.is_empty()).map(|kv| kv.split_once('=').unwrap_or((kv, ""))) {
        if key != "exclude" {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("unknown parameter {key:?}; only exclude=<check>"), "checks": READY_CHECKS}),
            );
        }
        match READY_CHECKS.iter().find(|c| **c == value) {
            Some(check) => excluded.push(*check),
            None => {
                return json(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": format!("unknown readiness check {value:?}"), "checks": READY_CHECKS}),
                );
            }
        }
    }
    let counts = |check: &str| !excluded.contains(&check);

    let listener = state.ready.load(Ordering::SeqCst);
    let traces = state.data_dir.join("traces");
    let log_writable = std::fs::metadata(&traces).map(|m| m.is_dir() && !m.permissions().readonly()).unwrap_or(false);
    // ClickHouse is reported, not required: while it is down the local log holds the
    // backlog. Only a backlog about to hit the disk cap (records would be dropped) makes the
    // sidecar unready.
    let clickhouse = state.shipper.as_ref().map(|s| {
        let behind = s.bytes_behind.load(Ordering::Relaxed);
        serde_json::json!({
            "reachable": s.unreachable.load(Ordering::Relaxed) == 0,
            "backlog_bytes": behind,
            "lag_seconds": s.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            "backlog_near_cap": state.max_disk_bytes > 0 && behind >= state.max_disk_bytes / 10 * 9,
        })
    });
    let backlog_ok = clickhouse.as_ref().is_none_or(|c| c["backlog_near_cap"] == false);
    let ok = (listener || !counts("listener"))
        && (log_writable || !counts("log_writable"))
        && (backlog_ok || !counts("clickhouse_backlog"));
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json(
        status,
        serde_json::json!({
            "status": if ok { "ready" } else { "not_ready" },
            "listener": listener,
            "log_writable": log_writable,
            "records_written": state.recorder.written.load(Ordering::Relaxed),
            "records_dropped": state.recorder.dropped_full.load(Ordering::Relaxed),
            "clickhouse": clickhouse,
            "excluded": excluded,
        }),
    )
}

/// Serves the admin API until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    // Admin requests are tiny; at shutdown an open connection is simply dropped.
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.changed() => {}
                    }
                });
            }
            _ = stop.changed() => return,
        }
    }
}
