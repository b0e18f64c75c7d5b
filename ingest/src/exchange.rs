//! One LLM call seen from the side: the proxy reports the request, the response head and
//! every response frame; the exchange keeps the facts and hands back what to forward.
//! Everything here is synchronous and bounded; nothing blocks or fails the request.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
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
    /// Stream bytes gathered before they go to the recorder's thread to be parsed, as one
    /// `StreamPiece`.
    pub stream_piece: usize,
}

impl Default for ExchangeLimits {
    fn default() -> Self {
        ExchangeLimits { text_cap: 64 * 1024, json_cap: 32 * 1024 * 1024, stream_piece: 4 * 1024 }
    }
}

/// While the recorder's queue has no room for a stream's pieces, the most the stream keeps
/// waiting for it. Past this the held bytes are dropped and the record says `parse_error`:
/// its facts (usage, output) are incomplete. The client's bytes are never affected.
const STREAM_HOLD_MAX: usize = 1024 * 1024;

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
/// columns are assembled. The proxy only queues the exchange (a box from its start); the
/// recorder's thread builds the record (`into_pending`), in batches, off the path the client
/// waits on.
#[derive(Debug)]
pub struct EndedCall(Ended);

#[derive(Debug)]
enum Ended {
    Call {
        exchange: Box<Exchange>,
        error: ErrorKind,
        client_status: u16,
        ended: Instant,
    },
    /// A record made by hand, for the recorder's own tests.
    #[cfg(test)]
    Built(Box<PendingTrace>),
}

/// The largest `Exchange` may be: its box is the worker's one large allocation per call.
/// glibc serves requests up to 1,008 bytes from its small bins; a larger one takes the
/// large-request path, which first consolidates every freed fast chunk of the arena, once
/// per call on a worker (callgrind: about 1,000 instructions per call, 2% of the worker's).
const EXCHANGE_MAX: usize = 1008;
const _: () = assert!(std::mem::size_of::<Exchange>() <= EXCHANGE_MAX);

impl EndedCall {
    /// The call's record, with what the recorder still adds (tokens, cost, bodies) left to do.
    /// `streams` holds the parsers of streams whose pieces went ahead of the call's end.
    pub fn into_pending(self, streams: &mut OpenStreams) -> PendingTrace {
        match self.0 {
            Ended::Call { exchange, error, client_status, ended } => {
                (*exchange).build(error, client_status, ended, streams)
            }
            #[cfg(test)]
            Ended::Built(p) => *p,
        }
    }
}

#[cfg(test)]
impl From<PendingTrace> for EndedCall {
    fn from(p: PendingTrace) -> Self {
        EndedCall(Ended::Built(Box::new(p)))
    }
}

/// A stream's bytes on their way to the recorder's thread, which parses them (`OpenStreams`).
///
/// Parsing a stream's events for usage, output text and tool calls costs more than
/// forwarding them. The worker only copies each frame's bytes and notes when the frame came;
/// every `stream_piece` bytes go to the recorder through the queue the call's end takes
/// later, so a stream's pieces arrive in order and before its end. The first piece carries
/// the call's adapter with it.
#[derive(Debug)]
pub struct StreamPiece(Box<Piece>);

#[derive(Debug)]
struct Piece {
    key: StreamKey,
    /// The adapter and the first-token time so far, with the stream's first piece.
    adapter: Option<(Adapter, Option<Duration>)>,
    bytes: Vec<u8>,
    stamps: Vec<Stamp>,
}

/// Where a frame ended in a piece's bytes, and when it arrived (since the call started).
type Stamp = (u32, Duration);

/// Names a stream whose parsing moved to the recorder. The recorder's entry holds a clone:
/// once it holds the only one, the call and its queued pieces are gone (its end was
/// refused by a full queue) and the entry can go too.
#[derive(Clone, Debug)]
struct StreamKey(Arc<()>);

impl StreamKey {
    fn id(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }
}

/// The recorder's side of the streams whose pieces it is parsing, until each call ends.
#[derive(Debug, Default)]
pub struct OpenStreams {
    streams: HashMap<usize, Moved>,
}

#[derive(Debug)]
struct Moved {
    key: StreamKey,
    adapter: Adapter,
    first_token_at: Option<Duration>,
}

impl OpenStreams {
    /// Parses a piece of a stream.
    pub fn feed(&mut self, piece: StreamPiece) {
        let Piece { key, adapter, bytes, stamps } = *piece.0;
        let moved = match adapter {
            Some((adapter, first_token_at)) => {
                self.streams.entry(key.id()).or_insert(Moved { key, adapter, first_token_at })
            }
            // The first piece always carries the adapter, and pieces arrive in order.
            None => match self.streams.get_mut(&key.id()) {
                Some(m) => m,
                None => return,
            },
        };
        parse_frames(&mut moved.adapter, &bytes, &stamps, &mut moved.first_token_at);
    }

    /// Forgets streams whose call will never reach the recorder: its end was refused by a
    /// full queue, so nothing else holds its key.
    pub fn sweep(&mut self) {
        self.streams.retain(|_, m| Arc::strong_count(&m.key.0) > 1);
    }

    /// Streams being parsed here.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    fn take(&mut self, key: &StreamKey) -> Option<Moved> {
        self.streams.remove(&key.id())
    }
}

/// Feeds an adapter frame by frame; the arrival of the frame that completes the first event
/// with model content is the time to first token.
/// Stamps room is made for at the start of each piece: a piece's worth of 256-byte frames.
const PIECE_STAMPS: usize = 16;

fn parse_frames(adapter: &mut Adapter, bytes: &[u8], stamps: &[Stamp], first_token_at: &mut Option<Duration>) {
    let mut from = 0;
    for &(end, at) in stamps {
        let end = end as usize;
        if adapter.on_response_data(&bytes[from..end]) && first_token_at.is_none() {
            *first_token_at = Some(at);
        }
        from = end;
    }
}

/// Per-call state.
pub struct Exchange {
    meta: CallMeta,
    provider: ProviderKind,
    /// `None` once the stream's parsing moved to the recorder (`StreamPiece`).
    adapter: Option<Adapter>,
    /// Set when the first stream piece is cut; names the stream to the recorder.
    key: Option<StreamKey>,
    /// The response is a stream: its bytes are parsed on the recorder's thread.
    defer: bool,
    /// Stream bytes not yet sent to the recorder, and where each frame ends in them.
    unparsed: Vec<u8>,
    stamps: Vec<Stamp>,
    stream_piece: usize,
    /// Stream bytes were dropped while the recorder had no room (`STREAM_HOLD_MAX`).
    lost: bool,
    decoder: Option<ContentDecoder>,
    /// Boxed: only streams with injected usage have one, and inline it would push `Ended`
    /// past glibc's small-chunk sizes (see `ENDED_MAX`).
    stripper: Option<Box<StreamUsageStripper>>,
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
    /// when the adapter rewrote it (OpenAI stream usage injection). Boxed once here, the
    /// exchange moves into the response body and on to the recorder as a pointer.
    pub fn start(
        meta: CallMeta,
        provider: ProviderKind,
        started: Instant,
        request: &RequestView<'_>,
        request_body: Bytes,
        opts: RequestOptions,
        limits: ExchangeLimits,
    ) -> (Box<Self>, Option<Bytes>) {
        let mut adapter = Adapter::new(provider, limits.text_cap, limits.json_cap);
        let rewritten = adapter.on_request(request, opts).map(Bytes::from);
        let ex = Box::new(Exchange {
            meta,
            provider,
            adapter: Some(adapter),
            key: None,
            defer: false,
            unparsed: Vec::new(),
            stamps: Vec::new(),
            stream_piece: limits.stream_piece.max(1),
            lost: false,
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
        });
        (ex, rewritten)
    }

    pub fn trace_id(&self) -> &str {
        &self.meta.trace_id
    }

    /// Whether llmtap added `stream_options.include_usage` to the forwarded request (the
    /// proxy then asks the upstream for an uncompressed body so it can hide the additions).
    pub fn injected_stream_usage(&self) -> bool {
        self.adapter.as_ref().is_some_and(|a| a.facts.injected_stream_usage)
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
        let Some(adapter) = self.adapter.as_mut() else {
            return false;
        };
        adapter.on_response_head(status, headers);
        let encoding = headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
        self.decoder = ContentDecoder::for_encoding(encoding);
        if self.decoder.is_none() {
            // An encoding llmtap cannot read: the body still passes through untouched.
            adapter.facts.parse_error = true;
        }
        // The adapter calls a response a stream only when its framing is one (SSE, a JSON
        // array); a JSON body is kept whole and parsed when the record is built.
        self.defer = adapter.facts.streamed;
        let rewrite = adapter.facts.injected_stream_usage
            && adapter.facts.streamed
            && status < 300
            && self.decoder.as_ref().is_some_and(ContentDecoder::is_identity);
        if rewrite {
            self.stripper = Some(Box::new(StreamUsageStripper::new()));
        }
        rewrite
    }

    /// One response frame from upstream; returns the bytes to forward to the client. A
    /// stream's bytes are only kept here, for `take_piece`.
    pub fn on_response_frame(&mut self, frame: Bytes) -> Bytes {
        let now = self.started.elapsed();
        if self.first_byte_at.is_none() && !frame.is_empty() {
            self.first_byte_at = Some(now);
        }
        self.response_bytes += frame.len() as u64;
        if let Some(dec) = self.decoder.as_mut() {
            match dec {
                ContentDecoder::Identity => self.on_plain(&frame, now),
                _ => match dec.push(&frame) {
                    Ok(plain) => self.on_plain(&plain, now),
                    Err(_) => {
                        self.decoder = None;
                        match self.adapter.as_mut() {
                            Some(a) => a.facts.parse_error = true,
                            None => self.lost = true,
                        }
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

    /// Decoded response bytes: a stream's are kept for the recorder, anything else goes to
    /// the adapter (which keeps a JSON body whole).
    fn on_plain(&mut self, data: &[u8], at: Duration) {
        if !self.defer {
            if let Some(a) = self.adapter.as_mut() {
                if a.on_response_data(data) && self.first_token_at.is_none() {
                    self.first_token_at = Some(at);
                }
            }
            return;
        }
        if data.is_empty() {
            return;
        }
        if self.unparsed.capacity() == 0 {
            self.unparsed.reserve_exact(self.stream_piece.max(data.len()));
            // A stamp per frame, and a stream's frames are a few hundred bytes each.
            self.stamps.reserve(PIECE_STAMPS);
        }
        self.unparsed.extend_from_slice(data);
        self.stamps.push((self.unparsed.len() as u32, at));
    }

    /// The stream bytes gathered so far, once there are `stream_piece` of them, for the
    /// caller to queue to the recorder (`RecordSender::try_piece`). A piece the queue
    /// refuses goes back through `piece_refused`.
    pub fn take_piece(&mut self) -> Option<StreamPiece> {
        if self.unparsed.len() < self.stream_piece {
            return None;
        }
        let key = self.key.get_or_insert_with(|| StreamKey(Arc::new(()))).clone();
        let adapter = self.adapter.take().map(|a| (a, self.first_token_at));
        let bytes = std::mem::take(&mut self.unparsed);
        let stamps = std::mem::take(&mut self.stamps);
        Some(StreamPiece(Box::new(Piece { key, adapter, bytes, stamps })))
    }

    /// The recorder's queue had no room for `piece`. While the adapter is still here the
    /// piece is parsed right away, on this thread; once it has moved, the bytes wait for
    /// the next piece, up to `STREAM_HOLD_MAX`.
    pub fn piece_refused(&mut self, piece: StreamPiece) {
        let Piece { adapter, mut bytes, mut stamps, .. } = *piece.0;
        if let Some((mut adapter, mut first_token_at)) = adapter {
            parse_frames(&mut adapter, &bytes, &stamps, &mut first_token_at);
            self.adapter = Some(adapter);
            self.first_token_at = first_token_at;
            bytes.clear();
            stamps.clear();
        } else if bytes.len() + self.unparsed.len() > STREAM_HOLD_MAX {
            bytes.clear();
            stamps.clear();
            self.lost = true;
        }
        if !self.unparsed.is_empty() {
            // Frames that came after the piece was cut (none when the caller queues each
            // piece as it is cut): they go after the piece's bytes.
            let base = bytes.len() as u32;
            bytes.extend_from_slice(&self.unparsed);
            stamps.extend(self.stamps.iter().map(|&(end, at)| (base + end, at)));
        }
        self.unparsed = bytes;
        self.stamps = stamps;
    }

    /// The upstream body ended; returns any bytes still held back for the client.
    pub fn on_response_end(&mut self) -> Bytes {
        let out = self.stripper.as_mut().map(|s| s.finish()).unwrap_or_default();
        self.forwarded_bytes += out.len() as u64;
        out
    }

    /// Ends the call with `error` (`ErrorKind::None` when the body completed) and the status
    /// the client got. A client that left (`ClientDisconnect`) after the stream's final event
    /// is a success: the record says so once the stream is parsed. The call's duration stops now. This only moves the exchange into the returned
    /// value: the record is built by `EndedCall::into_pending`, on the recorder's thread.
    pub fn finish(self: Box<Self>, error: ErrorKind, client_status: u16) -> EndedCall {
        EndedCall(Ended::Call { exchange: self, error, client_status, ended: Instant::now() })
    }

    /// Builds the record: parses what is left of a stream or a buffered JSON body, then
    /// assembles the columns.
    fn build(
        mut self,
        error: ErrorKind,
        client_status: u16,
        ended: Instant,
        streams: &mut OpenStreams,
    ) -> PendingTrace {
        let moved = self.key.as_ref().and_then(|k| streams.take(k));
        let (mut adapter, mut first_token_at) = match (self.adapter.take(), moved) {
            (Some(a), _) => (a, self.first_token_at),
            (None, Some(m)) => (m.adapter, m.first_token_at),
            (None, None) => {
                // Only a piece that never reached `streams` can leave neither (a bug): the
                // record keeps what the worker knows and says its facts are incomplete.
                debug_assert!(false, "stream {} lost its adapter", self.meta.trace_id);
                let mut a = Adapter::new(self.provider, 0, 0);
                a.facts.parse_error = true;
                (a, None)
            }
        };
        parse_frames(&mut adapter, &self.unparsed, &self.stamps, &mut first_token_at);
        if self.lost {
            adapter.facts.parse_error = true;
        }
        let error = match error {
            ErrorKind::ClientDisconnect if adapter.facts.saw_final => ErrorKind::None,
            e => e,
        };
        let complete = error == ErrorKind::None;
        adapter.finish(complete);
        let duration = ended.saturating_duration_since(self.started);
        let facts = std::mem::take(&mut adapter.facts);
        let status = if self.status == 0 { client_status } else { self.status };
        let error_kind = match error {
            ErrorKind::None if status >= 400 => ErrorKind::HttpError,
            ErrorKind::None if facts.parse_error => ErrorKind::ParseError,
            e => e,
        };
        let ttft = if facts.streamed { first_token_at } else { self.first_byte_at };
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn stream_exchange(stream_piece: usize) -> Box<Exchange> {
        let body = br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let headers = HeaderMap::new();
        let view = RequestView { method: "POST", path: "/v1/chat/completions", query: "", headers: &headers, body };
        let limits = ExchangeLimits { stream_piece, ..ExchangeLimits::default() };
        let meta = CallMeta { trace_id: "t".into(), ..CallMeta::default() };
        let (mut ex, _) = Exchange::start(
            meta,
            ProviderKind::OpenAi,
            Instant::now(),
            &view,
            Bytes::from_static(body),
            RequestOptions::default(),
            limits,
        );
        let mut head = HeaderMap::new();
        head.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
        assert!(!ex.on_response_head(200, &head));
        ex
    }

    const EVENT: &[u8] =
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ab\"},\"finish_reason\":null}]}\n\n";

    #[test]
    fn streams_whose_end_never_comes_are_swept() {
        let mut streams = OpenStreams::default();
        let mut ex = stream_exchange(16);
        assert_eq!(ex.on_response_frame(Bytes::from_static(EVENT)), EVENT);
        streams.feed(ex.take_piece().unwrap());
        assert_eq!(streams.len(), 1);
        streams.sweep();
        assert_eq!(streams.len(), 1, "the call is still open");
        drop(ex); // its end was refused by a full queue
        streams.sweep();
        assert!(streams.is_empty());
    }

    #[test]
    fn a_stream_the_recorder_has_no_room_for_is_marked_incomplete() {
        let mut streams = OpenStreams::default();
        let mut ex = stream_exchange(EVENT.len());
        ex.on_response_frame(Bytes::from_static(EVENT));
        streams.feed(ex.take_piece().unwrap());
        // The adapter is on the recorder's side now; every later piece is refused.
        let mut held = 0;
        while held <= STREAM_HOLD_MAX {
            assert_eq!(ex.on_response_frame(Bytes::from_static(EVENT)), EVENT, "the client's bytes never change");
            held += EVENT.len();
            let piece = ex.take_piece().unwrap();
            ex.piece_refused(piece);
        }
        assert!(ex.unparsed.len() < STREAM_HOLD_MAX);
        ex.on_response_frame(Bytes::from_static(b"data: [DONE]\n\n"));
        let rec = ex.finish(ErrorKind::None, 200).into_pending(&mut streams).record;
        assert_eq!(rec.error_kind, ErrorKind::ParseError);
        assert_eq!(rec.output_text, "ab", "the first piece was parsed; the held bytes were dropped");
        assert!(streams.is_empty());
    }

    #[test]
    fn refused_pieces_wait_for_the_next_one_while_the_recorder_has_the_adapter() {
        let mut streams = OpenStreams::default();
        let mut ex = stream_exchange(EVENT.len());
        for i in 0..4 {
            ex.on_response_frame(Bytes::from_static(EVENT));
            let piece = ex.take_piece().unwrap();
            if i == 1 || i == 2 {
                ex.piece_refused(piece);
            } else {
                streams.feed(piece);
            }
        }
        assert!(ex.unparsed.is_empty(), "the fourth piece took the two refused ones with it");
        ex.on_response_frame(Bytes::from_static(b"data: [DONE]\n\n"));
        let rec = ex.finish(ErrorKind::ClientDisconnect, 200).into_pending(&mut streams).record;
        assert_eq!(rec.output_text, "abababab");
        assert_eq!(rec.error_kind, ErrorKind::None, "the client left after [DONE]: a success");
    }
}
