//! The admin listener: `/healthz` (the process is up) and `/readyz` (the proxy listener is
//! bound and the trace log is writable), both with JSON bodies for Kubernetes probes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use llmtap_ingest::recorder::RecorderStats;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub struct AdminState {
    /// True while the proxy listener accepts calls.
    pub ready: Arc<AtomicBool>,
    pub recorder: Arc<RecorderStats>,
    pub data_dir: PathBuf,
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => {
            let listener = state.ready.load(Ordering::SeqCst);
            let traces = state.data_dir.join("traces");
            let log_writable =
                std::fs::metadata(&traces).map(|m| m.is_dir() && !m.permissions().readonly()).unwrap_or(false);
            let ok = listener && log_writable;
            let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            json(
                status,
                serde_json::json!({
                    "status": if ok { "ready" } else { "not_ready" },
                    "listener": listener,
                    "log_writable": log_writable,
                    "records_written": state.recorder.written.load(Ordering::Relaxed),
                    "records_dropped": state.recorder.dropped_full.load(Ordering::Relaxed),
                }),
            )
        }
        _ => json(StatusCode::NOT_FOUND, serde_json::json!({"error": "not found", "paths": ["/healthz", "/readyz"]})),
    }
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
                        let resp = route(&state, &req);
                        async move { Ok::<_, std::convert::Infallible>(resp) }
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
