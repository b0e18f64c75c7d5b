//! Provider adapters: per-exchange parsers that read a side copy of a call's request and
//! response and yield its facts (models, usage, tool calls, finish reason, first-token time).
//! They do no I/O, never change the bytes the client gets, and never fail a request: a
//! parse problem becomes `parse_error` on the facts.

mod anthropic;
mod gemini;
mod openai;
pub mod stream_usage;

use std::fmt;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::jsonseq::JsonArraySplitter;
use crate::record::Operation;
use crate::sse::{SseEvent, SseParser};

pub use anthropic::AnthropicProtocol;
pub use gemini::GeminiProtocol;
pub use openai::OpenAiProtocol;

/// The adapter family a route uses; it is also the record's `provider`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
    Gemini,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openai" => Some(ProviderKind::OpenAi),
            "anthropic" => Some(ProviderKind::Anthropic),
            "gemini" => Some(ProviderKind::Gemini),
            _ => None,
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token counts as the record stores them (see DESIGN.md conventions: input includes cache
/// reads and writes, output includes reasoning).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
    pub reasoning: u64,
}

/// One tool call as the model emitted it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
    /// The provider's call id (`call_…`, `toolu_…`), when it sends one.
    pub id: String,
}

/// Request parameters exported as span attributes (not record columns).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RequestParams {
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// The request asked for a stream (`gen_ai.request.stream`).
    pub stream: bool,
}

/// What an adapter learned about one exchange.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub operation: Operation,
    /// The request asked for a stream (or the path is a streaming one).
    pub streamed: bool,
    pub request_model: String,
    pub response_model: String,
    pub response_id: String,
    pub finish_reason: String,
    pub usage: Option<Usage>,
    pub tool_calls: Vec<ToolCall>,
    pub tools_offered: Vec<String>,
    pub user_id: String,
    pub params: RequestParams,
    /// Assembled output text, kept up to `text_cap` bytes; `text_len` counts all of it.
    pub output_text: String,
    pub text_len: usize,
    pub text_cap: usize,
    /// Some part of the request or response could not be parsed.
    pub parse_error: bool,
    /// The stream's final event (`[DONE]`, `message_stop`, `response.completed`, a Gemini
    /// finish reason) or the whole JSON body was seen.
    pub saw_final: bool,
    /// llmtap added `stream_options.include_usage` upstream and hides what it adds.
    pub injected_stream_usage: bool,
}

impl Facts {
    /// Appends model output text, keeping at most `text_cap` bytes (on a char boundary).
    pub fn push_text(&mut self, s: &str) {
        self.text_len += s.len();
        let room = self.text_cap.saturating_sub(self.output_text.len());
        if room >= s.len() {
            self.output_text.push_str(s);
        } else if room > 0 {
            let mut end = room;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.output_text.push_str(&s[..end]);
        }
    }

    /// Adds a fragment to tool call `index` (OpenAI-style deltas), creating it when new.
    pub fn tool_call_at(&mut self, index: usize) -> &mut ToolCall {
        if self.tool_calls.len() <= index {
            self.tool_calls.resize_with(index + 1, ToolCall::default);
        }
        &mut self.tool_calls[index]
    }
}

/// A body or event that is not the JSON the provider's format promises. Recorded as
/// `parse_error`; never returned to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed provider JSON")]
pub struct MalformedBody;

/// Read-only view of the request an adapter sees.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// Path as forwarded upstream (route prefix removed), without the query.
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Options that change what an adapter does to the request.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestOptions {
    /// Add `stream_options.include_usage` to OpenAI chat and completion streams.
    pub inject_stream_usage: bool,
}

/// The provider-specific half of an adapter; the framing (SSE, JSON, JSON array) is shared.
pub trait Protocol: Send {
    /// Parses the request; returns a rewritten body to forward instead, if any.
    fn on_request(&mut self, req: &RequestView<'_>, opts: RequestOptions, facts: &mut Facts) -> Option<Vec<u8>>;
    /// Handles one SSE event or one element of a JSON-array stream. Returns whether it
    /// carried model content (text or a tool-call token): the first such one is TTFT.
    /// `Err` marks a parse error; later events are still handled.
    fn on_stream_event(&mut self, event: &str, data: &str, facts: &mut Facts) -> Result<bool, MalformedBody>;
    /// Handles a complete non-streaming JSON body.
    fn on_json_body(&mut self, body: &[u8], facts: &mut Facts) -> Result<(), MalformedBody>;
    /// Called once after the response ended.
    fn finish(&mut self, _facts: &mut Facts) {}
}

enum Framing {
    /// Response head not seen yet.
    Pending,
    Sse(SseParser),
    JsonArray(JsonArraySplitter),
    /// Whole body kept (up to a cap) and parsed at the end.
    Json {
        buf: Vec<u8>,
        cap: usize,
        overflow: bool,
    },
    /// Nothing to parse (an error status with a non-JSON body, say).
    Ignore,
}

/// An adapter for one exchange: a protocol plus the framing the response turned out to use.
pub struct Adapter {
    protocol: Box<dyn Protocol>,
    framing: Framing,
    json_cap: usize,
    pub facts: Facts,
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter").field("facts", &self.facts).finish_non_exhaustive()
    }
}

impl Adapter {
    /// Chooses the protocol for a provider; `text_cap` bounds the kept output text,
    /// `json_cap` the non-streaming body kept for parsing.
    pub fn new(kind: ProviderKind, text_cap: usize, json_cap: usize) -> Self {
        let protocol: Box<dyn Protocol> = match kind {
            ProviderKind::OpenAi => Box::new(OpenAiProtocol::default()),
            ProviderKind::Anthropic => Box::new(AnthropicProtocol::default()),
            ProviderKind::Gemini => Box::new(GeminiProtocol),
        };
        Adapter { protocol, framing: Framing::Pending, json_cap, facts: Facts { text_cap, ..Facts::default() } }
    }

    /// Request hook: fills request facts, may return a rewritten body to forward.
    pub fn on_request(&mut self, req: &RequestView<'_>, opts: RequestOptions) -> Option<Vec<u8>> {
        self.protocol.on_request(req, opts, &mut self.facts)
    }

    /// Response head hook: picks the framing from the content type.
    pub fn on_response_head(&mut self, status: u16, headers: &HeaderMap) {
        let ctype =
            headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        self.framing = if ctype.starts_with("text/event-stream") {
            self.facts.streamed = true;
            Framing::Sse(SseParser::new())
        } else if ctype.contains("json") || ctype.is_empty() {
            if self.facts.streamed && status < 300 && self.facts.operation == Operation::GenerateContent {
                // Gemini's `streamGenerateContent` without `alt=sse`: a JSON array, streamed.
                Framing::JsonArray(JsonArraySplitter::new())
            } else {
                // A JSON answer is not a stream, even to a streaming request (an error, say).
                self.facts.streamed = false;
                Framing::Json { buf: Vec::new(), cap: self.json_cap, overflow: false }
            }
        } else {
            self.facts.streamed = false;
            Framing::Ignore
        };
    }

    /// Feeds decoded response bytes. Returns whether they carried the first model content.
    pub fn on_response_data(&mut self, data: &[u8]) -> bool {
        let Adapter { protocol, framing, facts, .. } = self;
        let mut content = false;
        match framing {
            Framing::Pending | Framing::Ignore => {}
            Framing::Sse(p) => {
                p.feed(data, |ev: &SseEvent| match protocol.on_stream_event(&ev.event, &ev.data, facts) {
                    Ok(c) => content |= c,
                    Err(MalformedBody) => facts.parse_error = true,
                })
            }
            Framing::JsonArray(s) => s.feed(data, |el| {
                let text = String::from_utf8_lossy(el);
                match protocol.on_stream_event("", &text, facts) {
                    Ok(c) => content |= c,
                    Err(MalformedBody) => facts.parse_error = true,
                }
            }),
            Framing::Json { buf, cap, overflow } => {
                if buf.len() + data.len() <= *cap {
                    buf.extend_from_slice(data);
                } else {
                    *overflow = true;
                }
            }
        }
        content
    }

    /// Ends the exchange. `complete` is false when the body stopped early (reset, timeout,
    /// client gone); a truncated body is then not reported as a parse error.
    pub fn finish(&mut self, complete: bool) {
        let framing = std::mem::replace(&mut self.framing, Framing::Ignore);
        match framing {
            Framing::Json { buf, overflow, .. } => {
                if complete && !buf.is_empty() {
                    // A body past the parse cap cannot be read whole: its facts are unknown.
                    if overflow || self.protocol.on_json_body(&buf, &mut self.facts).is_err() {
                        self.facts.parse_error = true;
                    } else {
                        self.facts.saw_final = true;
                    }
                }
            }
            Framing::Sse(p) => {
                if complete && p.has_partial() {
                    self.facts.parse_error = true;
                }
            }
            Framing::JsonArray(s) => {
                if complete && s.is_malformed_at_end() {
                    self.facts.parse_error = true;
                }
            }
            Framing::Pending | Framing::Ignore => {}
        }
        self.protocol.finish(&mut self.facts);
    }
}

/// Parses JSON into `T`; any error is a `MalformedBody` (the caller records a parse error).
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(s: &'a [u8]) -> Result<T, MalformedBody> {
    // One UTF-8 check of the whole body is far cheaper than `from_slice`'s check of every
    // string in it; bodies that fail it take `from_slice`, which decides as before.
    match std::str::from_utf8(s) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(s),
    }
    .map_err(|_| MalformedBody)
}

/// Deserialises `null` as the default value.
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
