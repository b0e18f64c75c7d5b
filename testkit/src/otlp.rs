//! A real OTLP receiver for tests: OTLP/HTTP (`POST /v1/traces`, `/v1/metrics`, `/v1/logs`) and
//! OTLP/gRPC (h2c, `…TraceService/Export`, `…MetricsService/Export`, `…LogsService/Export`), bodies decoded with
//! `opentelemetry-proto` and kept for assertions.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message;
use tokio::net::TcpListener;

#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    logs: Vec<ExportLogsServiceRequest>,
}

/// A log record (event) as received.
#[derive(Clone, Debug)]
pub struct ReceivedEvent {
    pub event_name: String,
    pub trace_id: String,
    pub span_id: String,
    pub severity_number: i32,
    pub time_unix_nano: u64,
    pub attributes: serde_json::Map<String, serde_json::Value>,
}

/// A receiver on loopback.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    got: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A successful unary gRPC answer: an empty message, then `grpc-status: 0` in trailers.
#[derive(Default)]
struct GrpcOk(u8);

impl hyper::body::Body for GrpcOk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0 += 1;
        std::task::Poll::Ready(match self.0 {
            1 => Some(Ok(hyper::body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])))),
            2 => {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Some(Ok(hyper::body::Frame::trailers(trailers)))
            }
            _ => None,
        })
    }
}

/// A histogram as received: (name, unit, explicit bounds, total count, each point's attributes).
pub type ReceivedHistogram = (String, String, Vec<f64>, u64, Vec<serde_json::Map<String, serde_json::Value>>);

/// A flattened span for assertions.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub kind: i32,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub events: Vec<(String, serde_json::Map<String, serde_json::Value>)>,
    pub status_code: i32,
    pub status_message: String,
    pub resource: serde_json::Map<String, serde_json::Value>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An attribute value as JSON.
pub fn any_to_json(v: &Option<AnyValue>) -> serde_json::Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(any_value::Value::IntValue(i)) => serde_json::json!(i),
        Some(any_value::Value::DoubleValue(d)) => serde_json::json!(d),
        Some(any_value::Value::ArrayValue(a)) => {
            serde_json::Value::Array(a.values.iter().map(|x| any_to_json(&Some(x.clone()))).collect())
        }
        _ => serde_json::Value::Null,
    }
}

/// Attributes as a JSON object.
pub fn attrs(kvs: &[KeyValue]) -> serde_json::Map<String, serde_json::Value> {
    kvs.iter().map(|kv| (kv.key.clone(), any_to_json(&kv.value))).collect()
}

impl OtlpReceiver {
    pub async fn start() -> std::io::Result<OtlpReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let got = Arc::new(Mutex::new(Received::default()));
        let g = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let g = g.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let g = g.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let grpc = req
                                .headers()
                                .get(http::header::CONTENT_TYPE)
                                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                            let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                            // gRPC: one length-prefixed message (flag byte, u32 big-endian length).
                            let (path, body) = if grpc && body.len() >= 5 {
                                let kind = if path.ends_with("TraceService/Export") {
                                    "/v1/traces"
                                } else if path.ends_with("MetricsService/Export") {
                                    "/v1/metrics"
                                } else if path.ends_with("LogsService/Export") {
                                    "/v1/logs"
                                } else {
                                    ""
                                };
                                (kind.to_owned(), body.slice(5..))
                            } else {
                                (path, body)
                            };
                            if let Ok(mut r) = g.lock() {
                                match path.as_str() {
                                    "/v1/traces" => {
                                        if let Ok(m) = ExportTraceServiceRequest::decode(body.as_ref()) {
                                            r.traces.push(m);
                                        }
                                    }
                                    "/v1/metrics" => {
                                        if let Ok(m) = ExportMetricsServiceRequest::decode(body.as_ref()) {
                                            r.metrics.push(m);
                                        }
                                    }
                                    "/v1/logs" => {
                                        if let Ok(m) = ExportLogsServiceRequest::decode(body.as_ref()) {
                                            r.logs.push(m);
                                        }
                                    }
                                    _ => {}
                                }
                            }
                            if grpc {
                                let mut resp = Response::new(BoxBody::new(GrpcOk::default()));
                                resp.headers_mut().insert(
                                    http::header::CONTENT_TYPE,
                                    http::HeaderValue::from_static("application/grpc"),
                                );
                                return Ok::<_, Infallible>(resp);
                            }
                            let mut resp = Response::new(BoxBody::new(Full::new(Bytes::new())));
                            resp.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/x-protobuf"),
                            );
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(OtlpReceiver { addr, got, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let Ok(r) = self.got.lock() else { return Vec::new() };
        let mut out = Vec::new();
        for req in &r.traces {
            for rs in &req.resource_spans {
                let resource = rs.resource.as_ref().map(|r| attrs(&r.attributes)).unwrap_or_default();
                for ss in &rs.scope_spans {
                    for s in &ss.spans {
                        out.push(ReceivedSpan {
                            trace_id: hex(&s.trace_id),
                            span_id: hex(&s.span_id),
                            parent_span_id: hex(&s.parent_span_id),
                            name: s.name.clone(),
                            kind: s.kind,
                            attributes: attrs(&s.attributes),
                            events: s.events.iter().map(|e| (e.name.clone(), attrs(&e.attributes))).collect(),
                            status_code: s.status.as_ref().map_or(0, |st| st.code),
                            status_message: s.status.as_ref().map(|st| st.message.clone()).unwrap_or_default(),
                            resource: resource.clone(),
                            start_unix_nano: s.start_time_unix_nano,
                            end_unix_nano: s.end_time_unix_nano,
                        });
                    }
                }
            }
        }
        out
    }

    /// Every log record (event) received.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        let Ok(r) = self.got.lock() else { return Vec::new() };
        let mut out = Vec::new();
        for req in &r.logs {
            for rl in &req.resource_logs {
                for sl in &rl.scope_logs {
                    for l in &sl.log_records {
                        out.push(ReceivedEvent {
                            event_name: l.event_name.clone(),
                            trace_id: hex(&l.trace_id),
                            span_id: hex(&l.span_id),
                            severity_number: l.severity_number,
                            time_unix_nano: l.time_unix_nano,
                            attributes: attrs(&l.attributes),
                        });
                    }
                }
            }
        }
        out
    }

    /// Every histogram metric received: (name, unit, explicit bounds, total count, data point attributes).
    pub fn histograms(&self) -> Vec<ReceivedHistogram> {
        use opentelemetry_proto::tonic::metrics::v1::metric::Data;
        let Ok(r) = self.got.lock() else { return Vec::new() };
        let mut out = Vec::new();
        for req in &r.metrics {
            for rm in &req.resource_metrics {
                for sm in &rm.scope_metrics {
                    for m in &sm.metrics {
                        if let Some(Data::Histogram(h)) = &m.data {
                            let bounds = h.data_points.first().map(|p| p.explicit_bounds.clone()).unwrap_or_default();
                            let count = h.data_points.iter().map(|p| p.count).sum();
                            let pts = h.data_points.iter().map(|p| attrs(&p.attributes)).collect();
                            out.push((m.name.clone(), m.unit.clone(), bounds, count, pts));
                        }
                    }
                }
            }
        }
        out
    }
}
