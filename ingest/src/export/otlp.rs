//! OpenTelemetry export: one CLIENT span per LLM call following the GenAI semantic
//! conventions, and the GenAI client metrics, sent over OTLP (HTTP/protobuf or gRPC).
//!
//! Design notes
//! - Records reach the exporter through a bounded queue filled with `try_send` on the recorder
//!   thread; a full queue drops the span and counts it. The exporter runs on its own thread
//!   and runtime, so a slow or dead collector costs spans, never request latency.
//! - Spans are built from the finished record: the record's trace and span ids, the caller's
//!   `traceparent` as parent, start = request received, end = last byte sent.
//! - A failed or timed-out export drops its batch (counted); the local log keeps the record.
//! - The conventions define no event for tool calls a model *requests* (`execute_tool` spans
//!   describe running a tool, which a proxy never does), so llmtap adds one span event
//!   `gen_ai.tool.call` per requested call with `gen_ai.tool.name` and `gen_ai.tool.call.id`,
//!   and, with content capture on, `tool_call` parts in `gen_ai.output.messages`.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::logs::{LogRecord as _, Logger as _, LoggerProvider as _};
use opentelemetry::metrics::{Histogram, MeterProvider as _};
use opentelemetry::trace::{Event, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{Array, InstrumentationScope, Key, KeyValue, StringValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::logs::{LogBatch, LogExporter as _, SdkLogRecord, SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};

use super::OtlpStats;
use crate::exchange::CallExtras;
use crate::record::{ErrorKind, Operation, ScoreRecord, TraceRecord, UsageSource};
use crate::recorder::{ObservedMeta, RecordObserver};

/// `gen_ai.client.token.usage` boundaries.
pub const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
    67108864.0,
];
/// `gen_ai.client.operation.duration` and `…time_to_first_chunk` boundaries (seconds).
pub const SECONDS_BUCKETS: [f64; 14] = super::prometheus::DURATION_BUCKETS;

/// `[otlp]` in `llmtap.toml`. With no endpoint here and no `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or `…_TRACES_ENDPOINT`) in the environment, OTLP export is off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// Collector base URL: `http://collector:4318` (HTTP; `/v1/traces` and `/v1/metrics` are
    /// appended) or `http://collector:4317` (gRPC).
    pub endpoint: String,
    /// `http/protobuf` or `grpc`; empty: `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    pub protocol: String,
    /// `service.name`; empty: `OTEL_SERVICE_NAME`, else `llmtap`.
    pub service_name: String,
    /// Put message content (`gen_ai.input.messages`, `gen_ai.output.messages`) on spans.
    /// Opt-in, as the conventions require, and only for calls whose bodies are captured.
    pub content: bool,
    /// Export the GenAI client metrics too.
    pub metrics: bool,
    /// Spans waiting for export; when full, new ones are dropped and counted.
    pub queue_capacity: usize,
    /// Spans per export request.
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent.
    pub flush_interval_ms: u64,
    /// One export's time limit; past it the batch is dropped and counted.
    pub timeout_ms: u64,
    /// Metrics export interval.
    pub metrics_interval_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: String::new(),
            protocol: String::new(),
            service_name: String::new(),
            content: false,
            metrics: true,
            queue_capacity: 4096,
            batch_size: 512,
            flush_interval_ms: 1000,
            timeout_ms: 5000,
            metrics_interval_ms: 10_000,
        }
    }
}

/// Settings after the environment has been consulted.
#[derive(Clone, Debug)]
pub struct ResolvedOtlp {
    pub cfg: OtlpConfig,
    pub grpc: bool,
    /// Explicit endpoint from the config (None: the exporter builders read the env vars).
    pub endpoint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("otlp.{key} = {value:?}: {reason}")]
    Config { key: &'static str, value: String, reason: &'static str },
    #[error("otlp exporter: {0}")]
    Build(String),
}

fn env<'a>(vars: &'a [(String, String)], name: &str) -> Option<&'a str> {
    vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

impl OtlpConfig {
    /// `Ok(None)` when export is off. `vars` are the process's `OTEL_*` variables.
    pub fn resolve(&self, vars: &[(String, String)]) -> Result<Option<ResolvedOtlp>, OtlpError> {
        let from_env = env(vars, "OTEL_EXPORTER_OTLP_ENDPOINT").or(env(vars, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"));
        if self.endpoint.is_empty() && from_env.is_none() {
            return Ok(None);
        }
        let protocol = if !self.protocol.is_empty() {
            self.protocol.clone()
        } else {
            env(vars, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or(env(vars, "OTEL_EXPORTER_OTLP_PROTOCOL"))
                .unwrap_or("http/protobuf")
                .to_owned()
        };
        let grpc = match protocol.as_str() {
            "grpc" => true,
            "http/protobuf" => false,
            _ => {
                return Err(OtlpError::Config {
                    key: "protocol",
                    value: protocol,
                    reason: "expected http/protobuf or grpc",
                })
            }
        };
        let is_url = self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://");
        if !self.endpoint.is_empty() && !is_url {
            return Err(OtlpError::Config {
                key: "endpoint",
                value: self.endpoint.clone(),
                reason: "expected an http:// or https:// URL",
            });
        }
        if self.queue_capacity == 0 || self.batch_size == 0 {
            return Err(OtlpError::Config {
                key: "queue_capacity",
                value: self.queue_capacity.to_string(),
                reason: "queue_capacity and batch_size must be at least 1",
            });
        }
        let mut cfg = self.clone();
        if cfg.service_name.is_empty() {
            cfg.service_name = env(vars, "OTEL_SERVICE_NAME").unwrap_or("llmtap").to_owned();
        }
        let endpoint = (!self.endpoint.is_empty()).then(|| self.endpoint.trim_end_matches('/').to_owned());
        Ok(Some(ResolvedOtlp { cfg, grpc, endpoint }))
    }
}

/// `gen_ai.operation.name` for a record's operation; `None` for non-GenAI calls.
pub fn semconv_operation(op: Operation) -> Option<&'static str> {
    match op {
        Operation::Chat | Operation::Responses | Operation::Messages => Some("chat"),
        Operation::GenerateContent => Some("generate_content"),
        Operation::Embeddings => Some("embeddings"),
        Operation::Completions => Some("text_completion"),
        Operation::Other => None,
    }
}

/// `gen_ai.provider.name`: the adapter family, `azure.ai.openai` on the Azure route.
pub fn semconv_provider(r: &TraceRecord) -> &'static str {
    match (r.provider.as_str(), r.route.as_str()) {
        (_, "azure") => "azure.ai.openai",
        ("anthropic", _) => "anthropic",
        ("gemini", _) => "gcp.gemini",
        _ => "openai",
    }
}

/// `error.type`: the HTTP status for an upstream error status, else the error kind.
fn error_type(r: &TraceRecord) -> Option<String> {
    match r.error_kind {
        ErrorKind::None => None,
        ErrorKind::HttpError => Some(r.status.to_string()),
        k => Some(k.as_str().to_owned()),
    }
}

fn strs(v: impl IntoIterator<Item = String>) -> Value {
    Value::Array(Array::String(v.into_iter().map(StringValue::from).collect()))
}

/// Attributes shared by spans and metrics.
fn common_attributes(r: &TraceRecord, op: &'static str, x: &CallExtras) -> Vec<KeyValue> {
    let mut a =
        vec![KeyValue::new("gen_ai.operation.name", op), KeyValue::new("gen_ai.provider.name", semconv_provider(r))];
    if !r.request_model.is_empty() {
        a.push(KeyValue::new("gen_ai.request.model", r.request_model.clone()));
    }
    if !r.response_model.is_empty() {
        a.push(KeyValue::new("gen_ai.response.model", r.response_model.clone()));
    }
    if !x.server_address.is_empty() {
        a.push(KeyValue::new("server.address", x.server_address.clone()));
        a.push(KeyValue::new("server.port", i64::from(x.server_port)));
    }
    a
}

/// The span for one call, or `None` for calls that are not GenAI operations.
pub fn span_from(r: &TraceRecord, x: &CallExtras, scope: &InstrumentationScope, content: bool) -> Option<SpanData> {
    let op = semconv_operation(r.operation)?;
    let trace_id = TraceId::from_hex(&r.trace_id).ok()?;
    let span_id = SpanId::from_hex(&r.span_id).ok()?;
    let parent = if r.parent_span_id.is_empty() {
        SpanId::INVALID
    } else {
        SpanId::from_hex(&r.parent_span_id).unwrap_or(SpanId::INVALID)
    };
    let start = r.ts.0;
    let end = start + Duration::try_from_secs_f64(r.duration_ms / 1000.0).unwrap_or_default();
    let name: Cow<'static, str> =
        if r.request_model.is_empty() { op.into() } else { format!("{op} {}", r.request_model).into() };
    let mut attrs = common_attributes(r, op, x);
    if !r.response_id.is_empty() {
        attrs.push(KeyValue::new("gen_ai.response.id", r.response_id.clone()));
    }
    if !r.finish_reason.is_empty() {
        attrs.push(KeyValue::new("gen_ai.response.finish_reasons", strs([r.finish_reason.clone()])));
    }
    if r.usage_source != UsageSource::None {
        attrs.push(KeyValue::new("gen_ai.usage.input_tokens", r.input_tokens as i64));
        if r.operation != Operation::Embeddings {
            attrs.push(KeyValue::new("gen_ai.usage.output_tokens", r.output_tokens as i64));
        }
        if r.cache_read_tokens > 0 {
            attrs.push(KeyValue::new("gen_ai.usage.cache_read.input_tokens", r.cache_read_tokens as i64));
        }
        if r.cache_write_tokens > 0 {
            attrs.push(KeyValue::new("gen_ai.usage.cache_creation.input_tokens", r.cache_write_tokens as i64));
        }
        if r.reasoning_tokens > 0 {
            attrs.push(KeyValue::new("gen_ai.usage.reasoning.output_tokens", r.reasoning_tokens as i64));
        }
    }
    if let Some(n) = x.params.max_tokens {
        attrs.push(KeyValue::new("gen_ai.request.max_tokens", n as i64));
    }
    if let Some(t) = x.params.temperature {
        attrs.push(KeyValue::new("gen_ai.request.temperature", t));
    }
    if let Some(p) = x.params.top_p {
        attrs.push(KeyValue::new("gen_ai.request.top_p", p));
    }
    if x.params.stream {
        attrs.push(KeyValue::new("gen_ai.request.stream", true));
        if r.ttft_ms > 0.0 {
            attrs.push(KeyValue::new("gen_ai.response.time_to_first_chunk", r.ttft_ms / 1000.0));
        }
    }
    if !r.session_id.is_empty() {
        attrs.push(KeyValue::new("gen_ai.conversation.id", r.session_id.clone()));
    }
    let err = error_type(r);
    if let Some(e) = &err {
        attrs.push(KeyValue::new("error.type", e.clone()));
    }
    if !r.app.is_empty() {
        attrs.push(KeyValue::new("llmtap.app", r.app.clone()));
    }
    attrs.push(KeyValue::new("llmtap.route", r.route.clone()));
    if content {
        if let Some(input) = input_messages(&r.request_body) {
            attrs.push(KeyValue::new("gen_ai.input.messages", input));
        }
        if !r.output_text.is_empty() || !r.tool_calls.is_empty() {
            attrs.push(KeyValue::new("gen_ai.output.messages", output_messages(r, x)));
        }
    }
    let mut events = SpanEvents::default();
    events.events = r
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut a = vec![KeyValue::new("gen_ai.tool.name", name.clone())];
            if let Some(id) = x.tool_call_ids.get(i).filter(|s| !s.is_empty()) {
                a.push(KeyValue::new("gen_ai.tool.call.id", id.clone()));
            }
            if content {
                if let Some(args) = r.tool_call_args.get(i) {
                    a.push(KeyValue::new("gen_ai.tool.call.arguments", args.clone()));
                }
            }
            Event::new("gen_ai.tool.call", end, a, 0)
        })
        .collect();
    let status = match err {
        Some(e) => Status::error(e),
        None => Status::Unset,
    };
    Some(SpanData {
        span_context: SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::NONE),
        parent_span_id: parent,
        parent_span_is_remote: parent != SpanId::INVALID,
        span_kind: SpanKind::Client,
        name,
        start_time: start,
        end_time: end,
        attributes: attrs,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    })
}

/// `gen_ai.input.messages` (JSON) from a captured request body: OpenAI and Anthropic
/// `messages` (plus Anthropic `system`), Gemini `contents`, Responses `input`.
fn input_messages(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let mut out = Vec::new();
    let text_parts = |content: &serde_json::Value| -> Vec<serde_json::Value> {
        match content {
            serde_json::Value::String(s) => vec![serde_json::json!({"type": "text", "content": s})],
            serde_json::Value::Array(parts) => parts
                .iter()
                .filter_map(|p| {
                    p.get("text").and_then(|t| t.as_str()).map(|t| serde_json::json!({"type": "text", "content": t}))
                })
                .collect(),
            _ => Vec::new(),
        }
    };
    if let Some(sys) = v.get("system") {
        out.push(serde_json::json!({"role": "system", "parts": text_parts(sys)}));
    }
    if let Some(msgs) = v.get("messages").and_then(|m| m.as_array()) {
        for m in msgs {
            let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("user");
            out.push(serde_json::json!({"role": role, "parts": text_parts(m.get("content").unwrap_or(&serde_json::Value::Null))}));
        }
    }
    if let Some(contents) = v.get("contents").and_then(|m| m.as_array()) {
        for c in contents {
            let role = c.get("role").and_then(|r| r.as_str()).unwrap_or("user");
            out.push(serde_json::json!({"role": role, "parts": text_parts(c.get("parts").unwrap_or(&serde_json::Value::Null))}));
        }
    }
    match v.get("input") {
        Some(serde_json::Value::String(s)) => {
            out.push(serde_json::json!({"role": "user", "parts": [{"type": "text", "content": s}]}))
        }
        Some(serde_json::Value::Array(items)) => {
            for m in items {
                let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("user");
                out.push(serde_json::json!({"role": role, "parts": text_parts(m.get("content").unwrap_or(&serde_json::Value::Null))}));
            }
        }
        _ => {}
    }
    (!out.is_empty()).then(|| serde_json::Value::Array(out).to_string())
}

/// `gen_ai.output.messages` (JSON): the text and the requested tool calls.
fn output_messages(r: &TraceRecord, x: &CallExtras) -> String {
    let mut parts = Vec::new();
    if !r.output_text.is_empty() {
        parts.push(serde_json::json!({"type": "text", "content": r.output_text}));
    }
    for (i, name) in r.tool_calls.iter().enumerate() {
        let id = x.tool_call_ids.get(i).filter(|s| !s.is_empty());
        let args = r
            .tool_call_args
            .get(i)
            .map(|a| serde_json::from_str::<serde_json::Value>(a).unwrap_or(serde_json::Value::String(a.clone())));
        parts.push(serde_json::json!({"type": "tool_call", "id": id, "name": name, "arguments": args}));
    }
    serde_json::json!([{"role": "assistant", "parts": parts, "finish_reason": r.finish_reason}]).to_string()
}

/// The GenAI client metrics.
#[derive(Clone)]
struct Instruments {
    tokens: Histogram<u64>,
    duration: Histogram<f64>,
    first_chunk: Histogram<f64>,
}

impl Instruments {
    fn record(&self, r: &TraceRecord, x: &CallExtras) {
        let Some(op) = semconv_operation(r.operation) else { return };
        let common = common_attributes(r, op, x);
        let err = error_type(r);
        let mut d = common.clone();
        if let Some(e) = &err {
            d.push(KeyValue::new("error.type", e.clone()));
        }
        self.duration.record(r.duration_ms / 1000.0, &d);
        if x.params.stream && r.ttft_ms > 0.0 {
            self.first_chunk.record(r.ttft_ms / 1000.0, &common);
        }
        // Reported usage only: the conventions allow offline counts only when asked for.
        if r.usage_source == UsageSource::Reported && err.is_none() {
            for (ty, n) in [("input", r.input_tokens), ("output", r.output_tokens)] {
                let mut a = common.clone();
                a.push(KeyValue::new("gen_ai.token.type", ty));
                self.tokens.record(n, &a);
            }
        }
    }
}

enum Queued {
    Span(Box<(TraceRecord, CallExtras)>),
    Evaluation(Box<ScoreRecord>),
}

/// The scorer-side end: queues `gen_ai.evaluation.result` events without waiting.
#[derive(Clone)]
pub struct EvaluationSender {
    tx: tokio::sync::mpsc::Sender<Queued>,
    stats: Arc<OtlpStats>,
}

impl EvaluationSender {
    /// Queues one verdict; a full queue drops it (counted with the spans).
    pub fn send(&self, v: &ScoreRecord) {
        if self.tx.try_send(Queued::Evaluation(Box::new(v.clone()))).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The `gen_ai.evaluation.result` event of one verdict, in the judged call's span context.
/// Error verdicts carry `error.type = judge_error` and the reason as the explanation.
pub fn evaluation_event(v: &ScoreRecord, logger: &SdkLogger) -> SdkLogRecord {
    let mut rec = logger.create_log_record();
    rec.set_event_name("gen_ai.evaluation.result");
    rec.set_timestamp(v.ts.0);
    rec.set_observed_timestamp(std::time::SystemTime::now());
    rec.set_severity_number(opentelemetry::logs::Severity::Info);
    rec.set_severity_text("INFO");
    if let (Ok(t), Ok(s)) = (TraceId::from_hex(&v.trace_id), SpanId::from_hex(&v.span_id)) {
        rec.set_trace_context(t, s, Some(TraceFlags::SAMPLED));
    }
    rec.add_attribute("gen_ai.evaluation.name", v.judge.clone());
    if v.error.is_empty() {
        rec.add_attribute("gen_ai.evaluation.score.value", v.score);
        let label = if v.label.is_empty() {
            if v.passed == 1 {
                "pass"
            } else {
                "fail"
            }
        } else {
            v.label.as_str()
        };
        rec.add_attribute("gen_ai.evaluation.score.label", label.to_owned());
        if !v.reasoning.is_empty() {
            rec.add_attribute("gen_ai.evaluation.explanation", v.reasoning.clone());
        }
    } else {
        rec.add_attribute("error.type", "judge_error");
        rec.add_attribute("gen_ai.evaluation.explanation", v.error.clone());
    }
    rec.add_attribute("llmtap.judge.version", v.judge_version.clone());
    rec.add_attribute("llmtap.judge.kind", v.judge_kind.clone());
    rec.add_attribute("llmtap.judge.passed", v.passed == 1);
    rec.add_attribute("llmtap.judge.needs_review", v.needs_review == 1);
    if !v.judge_model.is_empty() {
        rec.add_attribute("llmtap.judge.model", v.judge_model.clone());
    }
    if !v.app.is_empty() {
        rec.add_attribute("llmtap.app", v.app.clone());
    }
    rec
}

/// The recorder-side end: counts metrics and queues spans without waiting.
pub struct OtlpObserver {
    tx: tokio::sync::mpsc::Sender<Queued>,
    instruments: Option<Instruments>,
    stats: Arc<OtlpStats>,
}

impl OtlpObserver {
    /// Where the scorer sends verdicts. Drop it before waiting on the handle.
    pub fn evaluations(&self) -> EvaluationSender {
        EvaluationSender { tx: self.tx.clone(), stats: self.stats.clone() }
    }
}

impl RecordObserver for OtlpObserver {
    fn observe(&mut self, record: &TraceRecord, meta: &ObservedMeta) {
        if let Some(i) = &self.instruments {
            i.record(record, meta);
        }
        if semconv_operation(record.operation).is_none() {
            return;
        }
        if self.tx.try_send(Queued::Span(Box::new((record.clone(), meta.clone())))).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Owner of the exporter thread.
pub struct OtlpHandle {
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<OtlpStats>,
}

impl OtlpHandle {
    /// Waits for the exporter to send what is queued (each export bounded by its timeout).
    /// Call after the recorder has shut down, which drops the observer and closes the queue.
    pub fn shutdown(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("otlp exporter thread panicked");
            }
        }
    }
}

/// Runs a metric export on the exporter's runtime (the periodic reader's own thread has none).
#[derive(Debug)]
struct OnRuntime {
    handle: tokio::runtime::Handle,
    inner: opentelemetry_otlp::MetricExporter,
}

impl opentelemetry_sdk::metrics::exporter::PushMetricExporter for OnRuntime {
    async fn export(
        &self,
        m: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.handle.block_on(self.inner.export(m))
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, t: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(t)
    }
    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

fn https_connector(
) -> Result<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, OtlpError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| OtlpError::Build(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build())
}

fn resource(service_name: &str) -> Resource {
    let r = Resource::builder().build();
    match r.get(&Key::new("service.name")) {
        Some(v) if !v.as_str().starts_with("unknown_service") && service_name == "llmtap" => r,
        _ => Resource::builder().with_service_name(service_name.to_owned()).build(),
    }
}

/// Builds an OTLP exporter of one signal (`SpanExporter`, `LogExporter`): gRPC to the
/// endpoint, or HTTP/protobuf to `<endpoint><path>`. The builders share no trait for
/// `build()`, hence a macro rather than a generic function.
macro_rules! otlp_exporter {
    ($o:expr, $exporter:ty, $path:literal) => {{
        let o: &ResolvedOtlp = $o;
        let timeout = Duration::from_millis(o.cfg.timeout_ms);
        let b = <$exporter>::builder();
        let res = if o.grpc {
            let mut t = b.with_tonic().with_protocol(Protocol::Grpc).with_timeout(timeout);
            if let Some(e) = &o.endpoint {
                t = t.with_endpoint(e.clone());
                if e.starts_with("https://") {
                    t = t.with_tls_config(
                        opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new().with_enabled_roots(),
                    );
                }
            }
            t.build()
        } else {
            let client = opentelemetry_http::hyper::HyperClient::new(https_connector()?, timeout, None);
            let mut h =
                b.with_http().with_protocol(Protocol::HttpBinary).with_timeout(timeout).with_http_client(client);
            if let Some(e) = &o.endpoint {
                h = h.with_endpoint(format!("{e}{}", $path));
            }
            h.build()
        };
        res.map_err(|e| OtlpError::Build(e.to_string()))
    }};
}

fn build_span_exporter(o: &ResolvedOtlp) -> Result<opentelemetry_otlp::SpanExporter, OtlpError> {
    otlp_exporter!(o, opentelemetry_otlp::SpanExporter, "/v1/traces")
}

fn build_log_exporter(o: &ResolvedOtlp) -> Result<opentelemetry_otlp::LogExporter, OtlpError> {
    otlp_exporter!(o, opentelemetry_otlp::LogExporter, "/v1/logs")
}

fn build_meter_provider(
    o: &ResolvedOtlp,
    res: &Resource,
    handle: tokio::runtime::Handle,
) -> Result<SdkMeterProvider, OtlpError> {
    let timeout = Duration::from_millis(o.cfg.timeout_ms);
    let b = opentelemetry_otlp::MetricExporter::builder();
    let exporter = if o.grpc {
        let mut t = b.with_tonic().with_protocol(Protocol::Grpc).with_timeout(timeout);
        if let Some(e) = &o.endpoint {
            t = t.with_endpoint(e.clone());
        }
        t.build()
    } else {
        let client = opentelemetry_http::hyper::HyperClient::new(https_connector()?, timeout, None);
        let mut h = b.with_http().with_protocol(Protocol::HttpBinary).with_timeout(timeout).with_http_client(client);
        if let Some(e) = &o.endpoint {
            h = h.with_endpoint(format!("{e}/v1/metrics"));
        }
        h.build()
    }
    .map_err(|e| OtlpError::Build(e.to_string()))?;
    let reader = PeriodicReader::builder(OnRuntime { handle, inner: exporter })
        .with_interval(Duration::from_millis(o.cfg.metrics_interval_ms.max(100)))
        .build();
    Ok(SdkMeterProvider::builder().with_resource(res.clone()).with_reader(reader).build())
}

/// Counts one export's items as exported or dropped.
fn account(
    stats: &OtlpStats,
    n: u64,
    what: &'static str,
    outcome: Result<opentelemetry_sdk::error::OTelSdkResult, tokio::time::error::Elapsed>,
) {
    match outcome {
        Ok(Ok(())) => {
            stats.exported.fetch_add(n, Ordering::Relaxed);
        }
        Ok(Err(e)) => {
            stats.dropped.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(error = %e, items = n, what, "otlp export failed; dropped");
        }
        Err(_) => {
            stats.dropped.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(items = n, what, "otlp export timed out; dropped");
        }
    }
}

/// Starts the exporter thread; returns the observer for the recorder and the handle.
pub fn spawn_otlp(o: ResolvedOtlp) -> Result<(OtlpObserver, OtlpHandle), OtlpError> {
    let stats = Arc::new(OtlpStats::default());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Queued>(o.cfg.queue_capacity);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<Option<Instruments>, OtlpError>>(1);
    let thread_stats = stats.clone();
    let thread = std::thread::Builder::new()
        .name("llmtap-otlp".into())
        .spawn(move || {
            // One worker: the span exporter, the metric reader's exports and tonic's channel
            // all run here, away from the proxy's runtime.
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("llmtap-otlp-io")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(OtlpError::Build(e.to_string())));
                    return;
                }
            };
            let res = resource(&o.cfg.service_name);
            let setup = rt.block_on(async {
                let mut spans = build_span_exporter(&o)?;
                spans.set_resource(&res);
                let mut logs = build_log_exporter(&o)?;
                logs.set_resource(&res);
                let meters = if o.cfg.metrics {
                    Some(build_meter_provider(&o, &res, tokio::runtime::Handle::current())?)
                } else {
                    None
                };
                Ok::<_, OtlpError>((spans, logs, meters))
            });
            let (spans, logs, meters) = match setup {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let instruments = meters.as_ref().map(|p| {
                let meter = p.meter_with_scope(
                    InstrumentationScope::builder("llmtap").with_version(env!("CARGO_PKG_VERSION")).build(),
                );
                Instruments {
                    tokens: meter
                        .u64_histogram("gen_ai.client.token.usage")
                        .with_unit("{token}")
                        .with_description("Number of input and output tokens used.")
                        .with_boundaries(TOKEN_BUCKETS.to_vec())
                        .build(),
                    duration: meter
                        .f64_histogram("gen_ai.client.operation.duration")
                        .with_unit("s")
                        .with_description("GenAI operation duration.")
                        .with_boundaries(SECONDS_BUCKETS.to_vec())
                        .build(),
                    first_chunk: meter
                        .f64_histogram("gen_ai.client.operation.time_to_first_chunk")
                        .with_unit("s")
                        .with_description("Time to receive the first chunk of a streaming response.")
                        .with_boundaries(SECONDS_BUCKETS.to_vec())
                        .build(),
                }
            });
            let _ = ready_tx.send(Ok(instruments));
            let scope = InstrumentationScope::builder("llmtap").with_version(env!("CARGO_PKG_VERSION")).build();
            // Only a record factory: events are exported below, on this runtime, like spans.
            let logger =
                SdkLoggerProvider::builder().with_resource(res.clone()).build().logger_with_scope(scope.clone());
            let timeout = Duration::from_millis(o.cfg.timeout_ms);
            let flush = Duration::from_millis(o.cfg.flush_interval_ms.max(1));
            rt.block_on(async move {
                let mut queued = Vec::with_capacity(o.cfg.batch_size);
                let mut open = true;
                while open {
                    let deadline = tokio::time::Instant::now() + flush;
                    while queued.len() < o.cfg.batch_size {
                        let room = o.cfg.batch_size - queued.len();
                        match tokio::time::timeout_at(deadline, rx.recv_many(&mut queued, room)).await {
                            Ok(0) => {
                                open = false;
                                break;
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    if queued.is_empty() {
                        continue;
                    }
                    let mut batch: Vec<SpanData> = Vec::new();
                    let mut events: Vec<SdkLogRecord> = Vec::new();
                    for q in queued.drain(..) {
                        match q {
                            Queued::Span(q) => {
                                batch.extend(span_from(&q.0, &q.1, &scope, o.cfg.content));
                            }
                            Queued::Evaluation(v) => events.push(evaluation_event(&v, &logger)),
                        }
                    }
                    if !batch.is_empty() {
                        let n = batch.len() as u64;
                        let outcome = tokio::time::timeout(timeout, spans.export(batch)).await;
                        account(&thread_stats, n, "spans", outcome);
                    }
                    if !events.is_empty() {
                        let n = events.len() as u64;
                        let pairs: Vec<(&SdkLogRecord, &InstrumentationScope)> =
                            events.iter().map(|e| (e, &scope)).collect();
                        let outcome = tokio::time::timeout(timeout, logs.export(LogBatch::new(&pairs))).await;
                        account(&thread_stats, n, "evaluation events", outcome);
                    }
                }
                if let Some(p) = meters {
                    // The reader's last collect-and-export blocks; never on this runtime's thread.
                    let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
                }
            });
        })
        .map_err(|e| OtlpError::Build(e.to_string()))?;
    let instruments = ready_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| OtlpError::Build("exporter did not start".into()))??;
    Ok((OtlpObserver { tx, instruments, stats: stats.clone() }, OtlpHandle { thread: Some(thread), stats }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn off_without_endpoint_on_with_config_or_env() {
        assert!(OtlpConfig::default().resolve(&[]).unwrap().is_none());
        let r = OtlpConfig::default()
            .resolve(&vars(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SERVICE_NAME", "checkout"),
            ]))
            .unwrap()
            .unwrap();
        assert!(r.grpc);
        assert_eq!(r.endpoint, None, "the exporter reads the env endpoint itself");
        assert_eq!(r.cfg.service_name, "checkout");
        let r = OtlpConfig { endpoint: "http://c:4318/".into(), ..Default::default() }.resolve(&[]).unwrap().unwrap();
        assert_eq!(
            (r.grpc, r.endpoint.as_deref(), r.cfg.service_name.as_str()),
            (false, Some("http://c:4318"), "llmtap")
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = OtlpConfig { endpoint: "c:4318".into(), ..Default::default() }.resolve(&[]).unwrap_err().to_string();
        assert_eq!(e, "otlp.endpoint = \"c:4318\": expected an http:// or https:// URL");
        let e = OtlpConfig { endpoint: "http://c".into(), protocol: "thrift".into(), ..Default::default() }
            .resolve(&[])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "otlp.protocol = \"thrift\": expected http/protobuf or grpc");
    }

    #[test]
    fn operations_and_providers_use_the_conventions_values() {
        assert_eq!(semconv_operation(Operation::Messages), Some("chat"));
        assert_eq!(semconv_operation(Operation::Responses), Some("chat"));
        assert_eq!(semconv_operation(Operation::Completions), Some("text_completion"));
        assert_eq!(semconv_operation(Operation::Other), None);
        let r =
            |p: &str, route: &str| TraceRecord { provider: p.into(), route: route.into(), ..TraceRecord::default() };
        assert_eq!(semconv_provider(&r("gemini", "gemini")), "gcp.gemini");
        assert_eq!(semconv_provider(&r("openai", "azure")), "azure.ai.openai");
        assert_eq!(semconv_provider(&r("openai", "vllm")), "openai");
    }
}
