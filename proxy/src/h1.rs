//! A sans-I/O HTTP/1.1 client codec for upstream calls: encodes a request whose body is
//! already whole, parses the response head, and decodes the response body frame by frame
//! straight out of the connection's read buffer (each data frame is a slice of it, no copy).
//!
//! Why not hyper's `client::conn::http1`: its dispatcher hands every body frame to the
//! call through a channel with want-signalling, about 6,500 instructions per stream frame
//! (`bench/instructions.py`), several times what nginx spends on the whole frame. This codec
//! is the framing only; the connection, its reads and writes and its pool stay with the
//! caller. Parsing is httparse's (heads, trailers, chunk-size lines), as in hyper.
//!
//! Framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; `Transfer-Encoding`
//! ending in `chunked` is chunked, any other transfer coding reads to the connection's
//! close; otherwise `Content-Length` (repeated values must agree), else to the close.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Most header fields a response head or trailer section may carry.
const MAX_HEADERS: usize = 128;

/// Longest chunk-size line (with extensions) the decoder waits for.
const MAX_CHUNK_LINE: usize = 16 * 1024;

/// Why an upstream response could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum H1Error {
    #[error("invalid response head: {0}")]
    Head(String),
    #[error("response head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("invalid content-length: {0:?}")]
    ContentLength(String),
    #[error("invalid chunk-size line")]
    ChunkSize,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("invalid trailer section: {0}")]
    Trailers(String),
    #[error("the upstream closed the connection before the response ended")]
    Incomplete,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
}

impl Head {
    /// Whether the connection may carry another request after this response's body ends
    /// (the framing must also end the body without closing: see `Decoder::reusable`).
    pub fn keep_alive(&self) -> bool {
        let has = |token: &str| connection_tokens(&self.headers).any(|t| t.eq_ignore_ascii_case(token));
        match self.version {
            Version::HTTP_11 => !has("close"),
            Version::HTTP_10 => has("keep-alive"),
            _ => false,
        }
    }
}

/// The options a `Connection` header lists (RFC 9110 §7.6.1), trimmed, over all its lines.
pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Writes a request with a whole body: request line, headers, `content-length`, body.
/// `content-length` and `transfer-encoding` in `headers` are replaced by the body's length.
pub fn encode_request(method: &Method, target: &str, headers: &HeaderMap, body: &[u8], out: &mut BytesMut) {
    out.reserve(target.len() + 64 + headers.len() * 32 + body.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // A request that carries no body and whose method defines none goes without a length,
    // as hyper sends it.
    let bodiless = matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE);
    if !body.is_empty() || !bodiless {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Parses the response head at the front of `buf` and consumes it. `Ok(None)`: the head
/// is not complete yet. Interim (1xx) heads are returned like any other; the caller skips
/// them.
pub fn parse_head(buf: &mut BytesMut, max: usize) -> Result<Option<Head>, H1Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > max => return Err(H1Error::HeadTooLarge(max)),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(H1Error::Head(e.to_string())),
    };
    if len > max {
        return Err(H1Error::HeadTooLarge(max));
    }
    let version = match res.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        v => return Err(H1Error::Head(format!("unsupported HTTP/1.{}", v.unwrap_or_default()))),
    };
    let status = res
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| H1Error::Head(format!("invalid status code {:?}", res.code)))?;
    let headers = header_map(res.headers).map_err(H1Error::Head)?;
    buf.advance(len);
    Ok(Some(Head { status, version, headers }))
}

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name =
            HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| format!("invalid header name {:?}", f.name))?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| format!("invalid value of header {}", f.name))?;
        map.append(name, value);
    }
    Ok(map)
}

/// What the decoder produced from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes, a slice of the read buffer.
    Data(Bytes),
    /// The body ended; a chunked body's trailer fields, if it had any.
    End(Option<HeaderMap>),
}

/// A response body's framing and how far it has got.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    /// The framing gave the length (`Content-Length`, or no body at all).
    sized: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `Content-Length` bytes still to come.
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk: bytes still to come.
    ChunkData(u64),
    /// After a chunk's data: its CRLF.
    ChunkEnd,
    /// After the last (zero-size) chunk: trailer fields up to an empty line.
    Trailers,
    /// Everything until the connection closes.
    Close,
    Done,
}

impl Decoder {
    /// The framing of the response `head` to a `method` request (RFC 9112 §6.3).
    pub fn new(method: &Method, head: &Head) -> Result<Decoder, H1Error> {
        let s = head.status.as_u16();
        if *method == Method::HEAD || (100..200).contains(&s) || s == 204 || s == 304 {
            return Ok(Decoder { state: State::Done, sized: true });
        }
        let mut codings = head.headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
        if codings.peek().is_some() {
            let last = codings.last().and_then(|v| v.to_str().ok()).and_then(|s| s.rsplit(',').next());
            let chunked = last.is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            let state = if chunked && head.version == Version::HTTP_11 { State::ChunkSize } else { State::Close };
            return Ok(Decoder { state, sized: false });
        }
        let mut length: Option<u64> = None;
        for v in head.headers.get_all(header::CONTENT_LENGTH) {
            for part in v.to_str().map_err(|_| H1Error::ContentLength(format!("{v:?}")))?.split(',') {
                let part = part.trim();
                let n = part
                    .parse::<u64>()
                    .ok()
                    .filter(|_| part.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| H1Error::ContentLength(part.to_owned()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(H1Error::ContentLength(format!("{} and {n}", length.unwrap_or_default())));
                }
                length = Some(n);
            }
        }
        let state = match length {
            Some(0) => State::Done,
            Some(n) => State::Length(n),
            None => State::Close,
        };
        Ok(Decoder { state, sized: length.is_some() })
    }

    /// Whether the body ends without the connection closing (it may then be reused).
    pub fn reusable(&self) -> bool {
        self.state != State::Close
    }

    /// The body bytes still to come, when the framing gave the length (a chunked body that
    /// ended has none either, but never had a length to report).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) if self.sized => Some(n),
            State::Done if self.sized => Some(0),
            _ => None,
        }
    }

    /// Whether the body has ended.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Takes the next piece of the body from the front of `buf`. `Ok(None)`: more bytes
    /// are needed. After `End`, bytes left in `buf` belong to no response (a reused
    /// connection must have none).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, H1Error> {
        loop {
            match self.state {
                State::Done => return Ok(Some(Decoded::End(None))),
                State::Length(left) => return Ok(self.take_data(buf, left, State::Length, State::Done)),
                State::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(Decoded::Data(buf.split().freeze())));
                }
                State::ChunkSize => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((line, size))) => {
                        buf.advance(line);
                        self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => return Err(H1Error::ChunkSize),
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err(H1Error::ChunkSize),
                },
                State::ChunkData(left) => {
                    return Ok(self.take_data(buf, left, State::ChunkData, State::ChunkEnd));
                }
                State::ChunkEnd => {
                    // What has arrived of the CRLF must match it.
                    if !buf.starts_with(&b"\r\n"[..buf.len().min(2)]) {
                        return Err(H1Error::ChunkEnd);
                    }
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let trailers = if fields.is_empty() {
                                None
                            } else {
                                Some(header_map(fields).map_err(H1Error::Trailers)?)
                            };
                            buf.advance(len);
                            self.state = State::Done;
                            return Ok(Some(Decoded::End(trailers)));
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                            return Err(H1Error::Trailers("larger than 16 KiB".into()))
                        }
                        Ok(httparse::Status::Partial) => return Ok(None),
                        Err(e) => return Err(H1Error::Trailers(e.to_string())),
                    }
                }
            }
        }
    }

    /// Up to `left` body bytes from the front of `buf`, as one slice; the state becomes
    /// `more(rest)` while bytes remain, `after` once none do.
    fn take_data(&mut self, buf: &mut BytesMut, left: u64, more: fn(u64) -> State, after: State) -> Option<Decoded> {
        if buf.is_empty() {
            return None;
        }
        let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        self.state = if n as u64 == left { after } else { more(left - n as u64) };
        Some(Decoded::Data(buf.split_to(n).freeze()))
    }

    /// The connection reached its end: the body's end when it reads to the close, an
    /// error when it was cut short.
    pub fn eof(&mut self) -> Result<Decoded, H1Error> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(Decoded::End(None))
            }
            _ => Err(H1Error::Incomplete),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(raw: &[u8]) -> Head {
        let mut buf = BytesMut::from(raw);
        match parse_head(&mut buf, 64 * 1024) {
            Ok(Some(h)) => h,
            other => panic!("head of {raw:?}: {other:?}"),
        }
    }

    /// Feeds `wire` to a decoder for `raw_head` split at `at`, as two reads; returns the
    /// body bytes, the trailers and the bytes left after the end.
    fn decode_split(
        raw_head: &[u8],
        wire: &[u8],
        at: usize,
        eof: bool,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let head = head_of(raw_head);
        let mut d = Decoder::new(&Method::POST, &head)?;
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for piece in [&wire[..at], &wire[at..]] {
            buf.extend_from_slice(piece);
            while let Some(decoded) = d.decode(&mut buf)? {
                match decoded {
                    Decoded::Data(b) => {
                        assert!(!b.is_empty(), "empty data frame");
                        body.extend_from_slice(&b);
                    }
                    Decoded::End(t) => {
                        assert!(buf.is_empty(), "bytes left after the end: {buf:?}");
                        return Ok((body, t));
                    }
                }
            }
        }
        if eof {
            if let Decoded::End(t) = d.eof()? {
                return Ok((body, t));
            }
        }
        Err(H1Error::Incomplete)
    }

    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

    #[test]
    fn a_chunked_body_decodes_the_same_at_every_split() {
        let wire = b"6\r\ndata: \r\n19;ext=1\r\n{\"a\":1}\n\n0123456789abcdef\r\n0\r\n\r\n";
        for at in 0..=wire.len() {
            let (body, trailers) = decode_split(CHUNKED, wire, at, false).unwrap_or_else(|e| panic!("at {at}: {e}"));
            assert_eq!(body, b"data: {\"a\":1}\n\n0123456789abcdef", "at {at}");
            assert_eq!(trailers, None);
        }
    }

    #[test]
    fn chunked_trailers_are_returned_at_every_split() {
        let wire = b"3\r\nabc\r\n0\r\nx-usage: 12\r\nx-more: a\r\n\r\n";
        for at in 0..=wire.len() {
            let (body, trailers) = decode_split(CHUNKED, wire, at, false).unwrap_or_else(|e| panic!("at {at}: {e}"));
            assert_eq!(body, b"abc");
            let t = trailers.unwrap_or_default();
            assert_eq!(t.get("x-usage").map(|v| v.as_bytes()), Some(&b"12"[..]), "at {at}");
            assert_eq!(t.len(), 2);
        }
    }

    #[test]
    fn a_chunk_without_its_crlf_or_with_a_bad_size_is_an_error() {
        assert_eq!(decode_split(CHUNKED, b"3\r\nabcX\r\n0\r\n\r\n", 0, false), Err(H1Error::ChunkEnd));
        assert_eq!(decode_split(CHUNKED, b"zz\r\nabc\r\n0\r\n\r\n", 0, false), Err(H1Error::ChunkSize));
        // Cut short: the connection closed inside a chunk.
        assert_eq!(decode_split(CHUNKED, b"5\r\nab", 0, true), Err(H1Error::Incomplete));
    }

    #[test]
    fn a_content_length_body_ends_at_its_length_at_every_split() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n";
        for at in 0..=11 {
            let (body, _) = decode_split(raw, b"hello world", at, false).unwrap_or_else(|e| panic!("at {at}: {e}"));
            assert_eq!(body, b"hello world");
        }
        assert_eq!(decode_split(raw, b"hello", 2, true), Err(H1Error::Incomplete));
    }

    #[test]
    fn bytes_after_a_content_length_body_are_left_in_the_buffer() {
        let head = head_of(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n");
        let mut d = Decoder::new(&Method::POST, &head).unwrap_or_else(|e| panic!("{e}"));
        let mut buf = BytesMut::from(&b"okHTTP/1.1"[..]);
        assert_eq!(d.decode(&mut buf), Ok(Some(Decoded::Data(Bytes::from_static(b"ok")))));
        assert_eq!(d.decode(&mut buf), Ok(Some(Decoded::End(None))));
        assert_eq!(&buf[..], b"HTTP/1.1");
        assert!(d.reusable());
    }

    #[test]
    fn a_body_without_length_reads_to_the_close() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n";
        let (body, _) = decode_split(raw, b"{\"x\":1}", 3, true).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body, b"{\"x\":1}");
        let head = head_of(raw);
        assert!(!Decoder::new(&Method::POST, &head).is_ok_and(|d| d.reusable()));
        // A transfer coding other than chunked last also reads to the close.
        let gz = head_of(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
        assert!(!Decoder::new(&Method::POST, &gz).is_ok_and(|d| d.reusable()));
    }

    #[test]
    fn head_204_304_and_interim_responses_have_no_body() {
        let with_length = head_of(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n");
        let d = Decoder::new(&Method::HEAD, &with_length).unwrap_or_else(|e| panic!("{e}"));
        assert!(d.is_done());
        for raw in [
            &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            let d = Decoder::new(&Method::POST, &head_of(raw)).unwrap_or_else(|e| panic!("{e}"));
            assert!(d.is_done(), "{raw:?}");
        }
    }

    #[test]
    fn content_length_values_must_agree_and_be_digits() {
        let ok = head_of(b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n");
        assert!(Decoder::new(&Method::POST, &ok).is_ok());
        for raw in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: three\r\n\r\n",
        ] {
            assert!(matches!(Decoder::new(&Method::POST, &head_of(raw)), Err(H1Error::ContentLength(_))), "{raw:?}");
        }
    }

    #[test]
    fn the_head_is_parsed_when_whole_and_consumed() {
        let raw = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nx-a: 1\r\nx-a: 2\r\n\r\nbody";
        for at in 0..raw.len() - 4 {
            let mut buf = BytesMut::from(&raw[..at]);
            assert!(matches!(parse_head(&mut buf, 1024), Ok(None)), "at {at}");
        }
        let mut buf = BytesMut::from(&raw[..]);
        let head = match parse_head(&mut buf, 1024) {
            Ok(Some(h)) => h,
            other => panic!("{other:?}"),
        };
        assert_eq!(head.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"3"[..]));
        assert_eq!(head.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(&buf[..], b"body");
    }

    #[test]
    fn a_head_too_large_or_malformed_is_an_error() {
        let mut big = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx-long: "[..]);
        big.extend_from_slice(&[b'a'; 2000]);
        assert_eq!(parse_head(&mut big, 1024).err(), Some(H1Error::HeadTooLarge(1024)));
        let mut bad = BytesMut::from(&b"HTTX/1.1 200 OK\r\n\r\n"[..]);
        assert!(matches!(parse_head(&mut bad, 1024), Err(H1Error::Head(_))));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_tokens() {
        assert!(head_of(b"HTTP/1.1 200 OK\r\n\r\n").keep_alive());
        assert!(!head_of(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n\r\n").keep_alive());
        assert!(!head_of(b"HTTP/1.0 200 OK\r\n\r\n").keep_alive());
        assert!(head_of(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n").keep_alive());
    }

    #[test]
    fn a_request_is_encoded_with_the_body_length() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("api.example:8443"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut out = BytesMut::new();
        encode_request(&Method::POST, "/v1/chat/completions?x=1", &headers, b"{}", &mut out);
        assert_eq!(
            &out[..],
            &b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: api.example:8443\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 2\r\n\r\n{}"[..]
        );
        let mut get = BytesMut::new();
        encode_request(&Method::GET, "/v1/models", &HeaderMap::new(), b"", &mut get);
        assert_eq!(&get[..], b"GET /v1/models HTTP/1.1\r\n\r\n");
        let mut post = BytesMut::new();
        encode_request(&Method::POST, "/x", &HeaderMap::new(), b"", &mut post);
        assert_eq!(&post[..], b"POST /x HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    }
}
