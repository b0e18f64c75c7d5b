//! One LLM call seen from the side: the proxy reports the request, the response head and
//! every response frame; the exchange keeps the facts and hands back what to forward.
//! Everything here is synchronous and bounded; nothing blocks or fails the request.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;

use crate::decode::ContentDecoder;
use crate::provider::stream_usage::StreamUsageStripper;
use crate::provider::{Adapter, ProviderKind, RequestOptions, RequestView};
use crate::record::{ErrorKind, Timestamp, TraceRecord, UsageSource};

/// Who made the call and how it is labelled; filled by the proxy from the request head.
#[derive(Clone, Debug, Default)]
pub struct CallMeta {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub ts: Timestamp,
    pub app: String,
    pub route: String,
    pub method: String,
    /// Client-facing path, without the query string (which may carry an API key).
    pub path: String,
    pub user_id: String,
    pub session_id: String,
    pub tags: BTreeMap<String, String>,
    /// `false` when the request said `x-llmtap-capture: none` or capture is off.
    pub capture_bodies: bool,
    /// `x-llmtap-score`: `Some(true)` force, `Some(false)` off.
    pub score: Option<bool>,
    /// Host and port of the upstream (`server.address`, `server.port` in OTLP).
    pub server_address: String,
    pub server_port: u16,
}

/// Facts about a call that are not `llm_traces` columns but that exporters report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CallExtras {
    pub server_address: String,
    pub server_port: u16,
    pub params: crate::provider::RequestParams,
    /// Provider call ids, parallel to `tool_calls`.
    pub tool_call_ids: Vec<String>,
    /// `x-llmtap-score`: `Some(true)` force, `Some(false)` off.
    pub score: Option<bool>,
}

/// Limits for what an exchange keeps.
#[derive(Clone, Copy, Debug)]
pub struct ExchangeLimits {
    /// Output text kept (for capture and estimation).
    pub text_cap: usize,
    /// Non-streaming response body kept for parsing.
    pub json_cap: usize,
}

impl Default for ExchangeLimits {
    fn default() -> Self {
        ExchangeLimits { text_cap: 64 * 1024, json_cap: 32 * 1024 * 1024 }
    }
}

/// A finished call that still needs its tokens estimated, its cost priced and its bodies
/// captured; the record writer does that off the request path.
#[derive(Debug)]
pub struct PendingTrace {
    pub record: TraceRecord,
    pub provider: ProviderKind,
    pub usage: Option<crate::provider::Usage>,
    /// The body the client sent (before any rewrite).
    pub request_body: Bytes,
    pub output_len: usize,
    pub capture_bodies: bool,
    pub extras: CallExtras,
}

/// A call that has ended, as the proxy hands it to the recorder.
///
/// Building a call's record costs more than everything else the request path does for it:
/// a JSON response is parsed whole for its usage, model and tool calls, and the record's
/// columns are assembled. The proxy only boxes the exchange and queues it; the recorder's
/// thread builds the record (`into_pending`), in batches, off the path the client waits on.
/// Boxed, so the recorder's queue holds a pointer per call, not a whole exchange.
#[derive(Debug)]
pub struct EndedCall(Box<Ended>);

#[derive(Debug)]
enum Ended {
    Call {
        exchange: Exchange,
        error: ErrorKind,
        client_status: u16,
        ended: Instant,
    },
    /// A record made by hand, for the recorder's own tests.
    #[cfg(test)]
    Built(PendingTrace),
}

impl EndedCall {
    /// The call's record, with what the recorder still adds (tokens, cost, bodies) left to do.
    pub fn into_pending(self) -> PendingTrace {
        match *self.0 {
            Ended::Call { exchange, error, client_status, ended } => exchange.build(error, client_status, ended),
            #[cfg(test)]
            Ended::Built(p) => p,
        }
    }
}

#[cfg(test)]
impl From<PendingTrace> for EndedCall {
    fn from(p: PendingTrace) -> Self {
        EndedCall(Box::new(Ended::Built(p)))
    }
}

/// Per-call state.
pub struct Exchange {
    meta: CallMeta,
    provider: ProviderKind,
    adapter: Adapter,
    decoder: Option<ContentDecoder>,
    stripper: Option<StreamUsageStripper>,
    request_body: Bytes,
    started: Instant,
    status: u16,
    upstream_at: Option<Duration>,
    first_byte_at: Option<Duration>,
    first_token_at: Option<Duration>,
    overhead: Duration,
    response_bytes: u64,
    forwarded_bytes: u64,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("trace_id", &self.meta.trace_id)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// Starts an exchange and runs the adapter's request hook. Returns the body to forward
    /// when the adapter rewrote it (OpenAI stream usage injection).
    pub fn start(
        meta: CallMeta,
        provider: ProviderKind,
        started: Instant,
        request: &RequestView<'_>,
        request_body: Bytes,
        opts: RequestOptions,
        limits: ExchangeLimits,
    ) -> (Self, Option<Bytes>) {
        let mut adapter = Adapter::new(provider, limits.text_cap, limits.json_cap);
        let rewritten = adapter.on_request(request, opts).map(Bytes::from);
        let ex = Exchange {
            meta,
            provider,
            adapter,
            decoder: Some(ContentDecoder::Identity),
            stripper: None,
            request_body,
            started,
            status: 0,
            upstream_at: None,
            first_byte_at: None,
            first_token_at: None,
            overhead: Duration::ZERO,
            response_bytes: 0,
            forwarded_bytes: 0,
        };
        (ex, rewritten)
    }

    pub fn trace_id(&self) -> &str {
        &self.meta.trace_id
    }

    /// Whether llmtap added `stream_options.include_usage` to the forwarded request (the
    /// proxy then asks the upstream for an uncompressed body so it can hide the additions).
    pub fn injected_stream_usage(&self) -> bool {
        self.adapter.facts.injected_stream_usage
    }

    /// Time spent inside llmtap, as measured by the proxy around its own work.
    pub fn add_overhead(&mut self, d: Duration) {
        self.overhead += d;
    }

    /// Response head arrived. Returns whether the body will be rewritten (so the proxy drops
    /// `content-length`).
    pub fn on_response_head(&mut self, status: u16, headers: &HeaderMap) -> bool {
        self.status = status;
        self.upstream_at = Some(self.started.elapsed());
        self.adapter.on_response_head(status, headers);
        let encoding = headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
        self.decoder = ContentDecoder::for_encoding(encoding);
        if self.decoder.is_none() {
            // An encoding llmtap cannot read: the body still passes through untouched.
            self.adapter.facts.parse_error = true;
        }
        let rewrite = self.adapter.facts.injected_stream_usage
            && self.adapter.facts.streamed
            && status < 300
            && self.decoder.as_ref().is_some_and(ContentDecoder::is_identity);
        if rewrite {
            self.stripper = Some(StreamUsageStripper::new());
        }
        rewrite
    }

    /// One response frame from upstream; returns the bytes to forward to the client.
    pub fn on_response_frame(&mut self, frame: Bytes) -> Bytes {
        let now = self.started.elapsed();
        if self.first_byte_at.is_none() && !frame.is_empty() {
            self.first_byte_at = Some(now);
        }
        self.response_bytes += frame.len() as u64;
        if let Some(dec) = self.decoder.as_mut() {
            match dec {
                ContentDecoder::Identity => {
                    if self.adapter.on_response_data(&frame) && self.first_token_at.is_none() {
                        self.first_token_at = Some(now);
                    }
                }
                _ => match dec.push(&frame) {
                    Ok(plain) => {
                        if self.adapter.on_response_data(&plain) && self.first_token_at.is_none() {
                            self.first_token_at = Some(now);
                        }
                    }
                    Err(_) => {
                        self.adapter.facts.parse_error = true;
                        self.decoder = None;
                    }
                },
            }
        }
        let out = match self.stripper.as_mut() {
            Some(s) => s.push(&frame),
            None => frame,
        };
        self.forwarded_bytes += out.len() as u64;
        out
    }

    /// The upstream body ended; returns any bytes still held back for the client.
    pub fn on_response_end(&mut self) -> Bytes {
        let out = self.stripper.as_mut().map(StreamUsageStripper::finish).unwrap_or_default();
        self.forwarded_bytes += out.len() as u64;
        out
    }

    /// Whether the stream's final event was seen (a client leaving after it succeeded).
    pub fn saw_final(&self) -> bool {
        self.adapter.facts.saw_final
    }

    /// Ends the call with `error` (`ErrorKind::None` when the body completed) and the status
    /// the client got; its duration stops now. This only moves the exchange into the returned
    /// value: the record is built by `EndedCall::into_pending`, on the recorder's thread.
    pub fn finish(self, error: ErrorKind, client_status: u16) -> EndedCall {
        EndedCall(Box::new(Ended::Call { exchange: self, error, client_status, ended: Instant::now() }))
    }

    /// Builds the record: parses a buffered JSON body, then assembles the columns.
    fn build(mut self, error: ErrorKind, client_status: u16, ended: Instant) -> PendingTrace {
        let complete = error == ErrorKind::None;
        self.adapter.finish(complete);
        let duration = ended.saturating_duration_since(self.started);
        let facts = std::mem::take(&mut self.adapter.facts);
        let status = if self.status == 0 { client_status } else { self.status };
        let error_kind = match error {
            ErrorKind::None if status >= 400 => ErrorKind::HttpError,
            ErrorKind::None if facts.parse_error => ErrorKind::ParseError,
            e => e,
        };
        let ttft = if facts.streamed { self.first_token_at } else { self.first_byte_at };
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        let user_id = if self.meta.user_id.is_empty() { facts.user_id } else { std::mem::take(&mut self.meta.user_id) };
        let tool_call_ids = facts.tool_calls.iter().map(|t| t.id.clone()).collect();
        let (tool_calls, tool_call_args) = facts.tool_calls.into_iter().map(|t| (t.name, t.arguments)).unzip();
        let extras = CallExtras {
            server_address: std::mem::take(&mut self.meta.server_address),
            server_port: self.meta.server_port,
            params: facts.params,
            tool_call_ids,
            score: self.meta.score,
        };
        let record = TraceRecord {
            trace_id: self.meta.trace_id,
            span_id: self.meta.span_id,
            parent_span_id: self.meta.parent_span_id,
            ts: self.meta.ts,
            app: self.meta.app,
            route: self.meta.route,
            provider: self.provider.as_str().to_owned(),
            operation: facts.operation,
            method: self.meta.method,
            path: self.meta.path,
            status,
            error_kind,
            streamed: facts.streamed,
            request_model: facts.request_model,
            response_model: facts.response_model,
            response_id: facts.response_id,
            finish_reason: facts.finish_reason,
            usage_source: UsageSource::None,
            duration_ms: duration.as_secs_f64() * 1000.0,
            ttft_ms: ms(ttft),
            upstream_ms: ms(self.upstream_at),
            overhead_us: self.overhead.as_micros() as u64,
            request_bytes: self.request_body.len() as u64,
            response_bytes: self.forwarded_bytes,
            tool_calls,
            tool_call_args,
            tools_offered: facts.tools_offered,
            user_id,
            session_id: self.meta.session_id,
            tags: self.meta.tags,
            output_text: facts.output_text,
            ..TraceRecord::default()
        };
        PendingTrace {
            record,
            provider: self.provider,
            usage: facts.usage,
            request_body: self.request_body,
            output_len: facts.text_len,
            capture_bodies: self.meta.capture_bodies,
            extras,
        }
    }
}
