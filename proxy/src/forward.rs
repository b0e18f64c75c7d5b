//! The request path: route, read the request body (bounded), let the adapter look at it,
//! forward to the upstream, and answer with a tapped body. Every call ends in exactly one
//! record. The only status llmtap itself decides is for its own failures (`error_response`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use llmtap_ingest::recorder::RecordSender;
use llmtap_ingest::{CallMeta, ErrorKind, Exchange, ExchangeLimits, RequestOptions, RequestView, Timestamp};

use crate::body::ProxyBody;
use crate::route::RouteTable;
use crate::tap::TapBody;
use crate::upstream::Upstream;

pub const TRACE_HEADER: HeaderName = HeaderName::from_static("x-llmtap-trace-id");

/// Everything the request path needs, shared by all connections.
pub struct Proxy {
    pub routes: Arc<RouteTable>,
    pub client: Upstream,
    pub recorder: RecordSender,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_request_body: usize,
    pub capture_bodies: bool,
    pub limits: ExchangeLimits,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded in either direction.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
///
/// Most messages carry none of them, or only `transfer-encoding`: one pass over the names
/// finds those present, and only they are looked up again to be removed.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP.len()];
    let mut connection = false;
    for name in h.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| name.as_str() == *hop) {
            present[i] = true;
            connection |= name == header::CONNECTION;
        }
    }
    if connection {
        let named: Vec<HeaderName> =
            crate::h1::connection_tokens(h).filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()).collect();
        for n in named {
            h.remove(n);
        }
    }
    for (name, found) in HOP_BY_HOP.iter().zip(present) {
        if found {
            h.remove(*name);
        }
    }
}

/// `value` as `digits` lowercase hex digits (the low ones): trace and span ids without
/// the formatting machinery.
fn hex_id(value: u128, digits: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits: Vec<u8> = (0..digits).rev().map(|i| HEX[((value >> (4 * i)) & 0xf) as usize]).collect();
    // ASCII by construction: the check is one pass over 32 bytes, not a push per character.
    String::from_utf8(digits).unwrap_or_default()
}

/// Request metadata from `x-llmtap-*` headers and `traceparent`; the llmtap headers are
/// removed from `h` so they never reach the upstream.
fn take_meta(h: &mut HeaderMap, capture_default: bool) -> CallMeta {
    let mut meta = CallMeta { capture_bodies: capture_default, ..CallMeta::default() };
    let mut tags = BTreeMap::new();
    let ours: Vec<HeaderName> = h.keys().filter(|k| k.as_str().starts_with("x-llmtap-")).cloned().collect();
    for name in ours {
        let value = h.get(&name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        h.remove(&name);
        match name.as_str() {
            "x-llmtap-app" => meta.app = value,
            "x-llmtap-user" => meta.user_id = value,
            "x-llmtap-session" => meta.session_id = value,
            "x-llmtap-capture" => {
                if value.eq_ignore_ascii_case("none") {
                    meta.capture_bodies = false;
                }
            }
            "x-llmtap-score" => {
                meta.score = match value.to_ascii_lowercase().as_str() {
                    "off" => Some(false),
                    "force" => Some(true),
                    _ => None,
                }
            }
            other => {
                if let Some(key) = other.strip_prefix("x-llmtap-tag-") {
                    if !key.is_empty() && tags.len() < 64 {
                        tags.insert(key.to_owned(), value);
                    }
                }
            }
        }
    }
    meta.tags = tags;
    let parent = h.get("traceparent").and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
    match parent {
        Some((trace, span)) => {
            meta.trace_id = trace;
            meta.parent_span_id = span;
        }
        None => meta.trace_id = hex_id(fastrand::u128(1..), 32),
    }
    meta.span_id = hex_id(u128::from(fastrand::u64(1..)), 16);
    meta
}

/// W3C `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    Some((trace.to_owned(), span.to_owned()))
}

/// A JSON error of llmtap's own, shaped like OpenAI's so SDKs show the message.
pub fn error_response(status: StatusCode, kind: &str, message: &str, trace_id: Option<&str>) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": { "message": message, "type": format!("llmtap_{kind}"), "code": kind, "source": "llmtap" }
    });
    let mut resp = Response::new(ProxyBody::full(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(kind) {
        h.insert("x-llmtap-error", v);
    }
    if let Some(Ok(v)) = trace_id.map(HeaderValue::from_str) {
        h.insert(TRACE_HEADER, v);
    }
    resp
}

impl Proxy {
    /// Serves one request. Never fails: upstream and capture problems become responses and
    /// records.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let ts = Timestamp::now();
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().map(str::to_owned);

        let Some(m) = self.routes.route(&path, query.as_deref()) else {
            let msg = format!(
                "llmtap: no route for path {path}; configured prefixes: {}",
                self.routes.describe_prefixes().join(", ")
            );
            return Ok(error_response(StatusCode::NOT_FOUND, "no_route", &msg, None));
        };
        let route = m.route;
        let mut meta = take_meta(&mut parts.headers, self.capture_bodies);
        meta.ts = ts;
        meta.route = route.name.clone();
        meta.method = parts.method.as_str().to_owned();
        meta.path = path.clone();
        meta.server_address = m.uri.host().unwrap_or_default().to_owned();
        meta.server_port = m.uri.port_u16().unwrap_or(if m.uri.scheme_str() == Some("https") { 443 } else { 80 });
        let trace_id = meta.trace_id.clone();
        let mut overhead = started.elapsed();

        // The request body: bounded; LLM requests are small JSON, and the adapter needs it whole.
        let declared =
            parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        let body_bytes = if declared.is_some_and(|n| n > self.max_request_body as u64) {
            Err(ErrorKind::BodyTooLarge)
        } else {
            match Limited::new(body, self.max_request_body).collect().await {
                Ok(c) => Ok(c.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ErrorKind::BodyTooLarge),
                Err(_) => Err(ErrorKind::ClientDisconnect),
            }
        };
        let t_body = Instant::now();
        let body_bytes = match body_bytes {
            Ok(b) => b,
            Err(kind) => {
                let view = RequestView {
                    method: parts.method.as_str(),
                    path: &m.upstream_path,
                    query: query.as_deref().unwrap_or(""),
                    headers: &parts.headers,
                    body: &[],
                };
                let (ex, _) = Exchange::start(
                    meta,
                    route.adapter,
                    started,
                    &view,
                    Bytes::new(),
                    RequestOptions::default(),
                    self.limits,
                );
                let (status, msg) = if kind == ErrorKind::BodyTooLarge {
                    (
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!(
                            "llmtap: request body is larger than the limit of {} bytes (client.max_request_body_bytes)",
                            self.max_request_body
                        ),
                    )
                } else {
                    (
                        StatusCode::BAD_REQUEST,
                        "llmtap: the client closed the connection while sending the request body".to_owned(),
                    )
                };
                self.recorder.try_record(ex.finish(kind, status.as_u16()));
                return Ok(error_response(status, kind.as_str(), &msg, Some(&trace_id)));
            }
        };

        let view = RequestView {
            method: parts.method.as_str(),
            path: &m.upstream_path,
            query: query.as_deref().unwrap_or(""),
            headers: &parts.headers,
            body: &body_bytes,
        };
        let opts = RequestOptions { inject_stream_usage: route.inject_stream_usage };
        let (mut exchange, rewritten) =
            Exchange::start(meta, route.adapter, started, &view, body_bytes.clone(), opts, self.limits);

        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::HOST);
        if exchange.injected_stream_usage() {
            // The additions are removed from the client's copy, which needs plain bytes.
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        let forward_body = match rewritten {
            Some(b) => {
                headers.remove(header::CONTENT_LENGTH);
                b
            }
            None => body_bytes,
        };
        let mut upstream_req = Request::new(forward_body);
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.uri_mut() = m.uri;
        *upstream_req.version_mut() = Version::HTTP_11;
        *upstream_req.headers_mut() = headers;
        overhead += t_body.elapsed();
        exchange.add_overhead(overhead);

        let result = tokio::time::timeout(self.first_byte_timeout, self.client.send(upstream_req)).await;
        let t_head = Instant::now();
        let resp = match result {
            Ok(Ok(sent)) => sent,
            Ok(Err(e)) => {
                let (kind, msg) = if e.is_connect() {
                    (
                        ErrorKind::UpstreamConnect,
                        format!(
                            "llmtap: could not connect to the upstream of route {}: {}",
                            route.name,
                            error_chain(&e)
                        ),
                    )
                } else {
                    (
                        ErrorKind::UpstreamReset,
                        format!(
                            "llmtap: the upstream of route {} closed the connection: {}",
                            route.name,
                            error_chain(&e)
                        ),
                    )
                };
                tracing::debug!(route = %route.name, error = %msg, "upstream request failed");
                self.recorder.try_record(exchange.finish(kind, StatusCode::BAD_GATEWAY.as_u16()));
                return Ok(error_response(StatusCode::BAD_GATEWAY, kind.as_str(), &msg, Some(&trace_id)));
            }
            Err(_) => {
                let msg = format!(
                    "llmtap: the upstream of route {} sent no response head within {} ms (client.first_byte_timeout_ms)",
                    route.name,
                    self.first_byte_timeout.as_millis()
                );
                self.recorder
                    .try_record(exchange.finish(ErrorKind::UpstreamTimeout, StatusCode::GATEWAY_TIMEOUT.as_u16()));
                return Ok(error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    ErrorKind::UpstreamTimeout.as_str(),
                    &msg,
                    Some(&trace_id),
                ));
            }
        };

        let (mut rparts, mut rbody) = resp.into_parts();
        // What came with the head goes out with it: for JSON usually the whole body, for a
        // stream its first events.
        let early = crate::tap::ready_frames(&mut rbody).await;
        let rewrites = exchange.on_response_head(rparts.status.as_u16(), &rparts.headers);
        strip_hop_by_hop(&mut rparts.headers);
        if rewrites {
            rparts.headers.remove(header::CONTENT_LENGTH);
        }
        if let Ok(v) = HeaderValue::from_str(&trace_id) {
            rparts.headers.insert(TRACE_HEADER, v);
        }
        rparts.version = Version::HTTP_11;
        exchange.add_overhead(t_head.elapsed());
        let status = rparts.status.as_u16();
        let body = TapBody::new(rbody, early, exchange, self.recorder.clone(), self.idle_timeout, rewrites, status);
        Ok(Response::from_parts(rparts, ProxyBody::Tap(Box::new(body))))
    }
}

/// The error and its sources on one line (hyper's errors hide the useful part in sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing() {
        assert_eq!(
            parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            Some(("0af7651916cd43dd8448eb211c80319c".into(), "b7ad6b7169203331".into()))
        );
        assert_eq!(parse_traceparent("00-00000000000000000000000000000000-b7ad6b7169203331-01"), None);
        assert_eq!(parse_traceparent("00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01"), None);
        assert_eq!(parse_traceparent("garbage"), None);
    }

    #[test]
    fn ids_are_zero_padded_lowercase_hex() {
        assert_eq!(hex_id(0xabc, 16), "0000000000000abc");
        assert_eq!(hex_id(u128::MAX, 32), "ffffffffffffffffffffffffffffffff");
        let v = 0x0af7651916cd43dd8448eb211c80319c_u128;
        assert_eq!(hex_id(v, 32), format!("{v:032x}"));
    }

    #[test]
    fn meta_headers_are_taken_and_stripped() {
        let mut h = HeaderMap::new();
        h.insert("x-llmtap-app", HeaderValue::from_static("bot"));
        h.insert("x-llmtap-tag-team", HeaderValue::from_static("search"));
        h.insert("x-llmtap-capture", HeaderValue::from_static("none"));
        h.insert("x-llmtap-score", HeaderValue::from_static("force"));
        h.insert("authorization", HeaderValue::from_static("Bearer sk"));
        let m = take_meta(&mut h, true);
        assert_eq!(m.app, "bot");
        assert_eq!(m.tags.get("team").map(String::as_str), Some("search"));
        assert!(!m.capture_bodies);
        assert_eq!(m.score, Some(true));
        assert_eq!(m.trace_id.len(), 32);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-type", HeaderValue::from_static("text/event-stream"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);

        let mut h = HeaderMap::new();
        for name in HOP_BY_HOP.iter().chain(&["content-type", "x-kept"]) {
            h.insert(*name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        let mut kept: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["content-type", "x-kept"]);
    }
}
