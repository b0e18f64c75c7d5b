//! HTTP/1.1 upstream connections that run inside the call's own task, read and written with
//! llmtap's own codec (`h1`).
//!
//! hyper's pooled client gives every upstream connection a task of its own: the request
//! goes to it through a channel, the response head and every body frame come back through
//! another, and each crossing is a pass through the runtime's run queue. hyper's
//! `client::conn::http1` run in the call's task removed the passes but kept the channel:
//! its dispatcher still handed each body frame to the call through it, with
//! want-signalling, about 6,500 instructions per stream frame. Here the call reads the
//! socket itself and decodes each frame out of the read buffer (`h1::Decoder`): a read from
//! the upstream and the write to the client happen in one poll, as in nginx's event loop.
//!
//! Design notes
//! - One pool per worker thread (a connection belongs to the runtime that registered its
//!   socket), so the lock is never contended.
//! - Idle connections are reused newest first and polled before reuse: one the upstream
//!   closed meanwhile (or that sent bytes no request asked for) is dropped, not handed a
//!   request. A request whose first write fails on a reused connection is sent once more on
//!   a new one; one that was written is not, as with hyper's client.
//! - A connection goes back to the pool only when its response body ended cleanly, both
//!   sides allow keep-alive and no bytes are left over; a call cut short (client gone,
//!   timeout, upstream error) closes it.
//! - `sweep` (called from each worker's timer) closes connections idle past
//!   `client.pool_idle_timeout_secs` or closed by the upstream.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode};
use http_body::{Frame, SizeHint};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_service::Service;

use crate::h1::{self, Decoded, Decoder, H1Error};

type Io = TokioIo<MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest response head accepted (hyper's default limit for a client is about 400 KiB;
/// LLM APIs send a few KiB).
const MAX_HEAD: usize = 64 * 1024;

/// Size of a fresh read buffer.
const READ_SIZE: usize = 8 * 1024;

/// A read goes into the room left in the buffer while there is at least this much; below
/// it the buffer is replaced with a fresh `READ_SIZE` one first.
const MIN_READ_ROOM: usize = 1024;

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (TCP connect, TLS handshake).
    #[error("client error (Connect)")]
    Connect(#[source] BoxError),
    /// The connection failed before the response head.
    #[error("connection error")]
    Io(#[source] std::io::Error),
    /// The upstream closed the connection before the response head.
    #[error("connection closed before the response head")]
    Closed,
    /// The response head was not valid HTTP/1.1.
    #[error("invalid response")]
    Protocol(#[source] H1Error),
    /// From hyper's pooled client (TLS upstreams that may speak HTTP/2).
    #[error(transparent)]
    Client(hyper_util::client::legacy::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Io(_) | SendError::Closed | SendError::Protocol(_) => false,
            SendError::Client(e) => e.is_connect(),
        }
    }
}

/// Why a response body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("connection error reading the response body")]
    Io(#[source] std::io::Error),
    #[error("invalid response body")]
    Protocol(#[source] H1Error),
}

/// Where a connection goes: scheme and authority.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    https: bool,
    authority: Authority,
}

/// An upstream connection. While it carries a response body, whoever holds it reads the
/// body with `poll_frame`.
pub struct Conn {
    io: Io,
    /// Read from the socket, not yet decoded.
    buf: BytesMut,
    /// The framing of the response being read.
    decoder: Option<Decoder>,
    /// The connection may carry another request once this response ends.
    keep_alive: bool,
    /// The upstream closed its side.
    eof: bool,
    key: Key,
    pool: Arc<Pool>,
}

impl Conn {
    /// Reads what the socket has into the buffer: the count, 0 at the upstream's close.
    ///
    /// Each frame decoded from the buffer shares its allocation until the client has been
    /// sent it, so the buffer cannot take its room back; asking for `READ_SIZE` before
    /// every read allocated a new buffer per stream event. Reading into the room left
    /// lets a stream's events share one allocation.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_READ_ROOM {
            self.buf.reserve(READ_SIZE);
        }
        let read = self.io.read_buf(&mut self.buf);
        std::pin::pin!(read).as_mut().poll(cx)
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// The next piece of the response body: data, then trailers if the upstream sent any,
    /// then `None` at its end.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            if let Some(next) = self.decode_buffered() {
                return Poll::Ready(next);
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(BodyError::Io(e)))),
            }
        }
    }

    /// What `poll_frame` would return, when the bytes already read decide it: `None` when
    /// a read is needed first. Reads nothing, so registers for no wake-up either.
    pub fn decode_buffered(&mut self) -> Option<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(decoder) = self.decoder.as_mut() else {
            return Some(None);
        };
        match decoder.decode(&mut self.buf) {
            Ok(Some(Decoded::Data(data))) => Some(Some(Ok(Frame::data(data)))),
            Ok(Some(Decoded::End(trailers))) => Some(trailers.map(|t| Ok(Frame::trailers(t)))),
            Ok(None) if self.eof => Some(decoder.eof().err().map(|e| Err(BodyError::Protocol(e)))),
            Ok(None) => None,
            Err(e) => Some(Some(Err(BodyError::Protocol(e)))),
        }
    }

    /// What is known of the body's remaining length.
    pub fn size_hint(&self) -> SizeHint {
        match self.decoder.as_ref().and_then(Decoder::remaining) {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }

    /// Whether an idle connection can take a request: still open, and nothing unasked
    /// waiting on it.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        !self.eof && self.buf.is_empty() && self.poll_fill(&mut cx).is_pending()
    }

    /// The response body ended cleanly: back to the pool if the connection can take
    /// another request.
    pub fn release(mut self: Box<Self>) {
        let ended = self.decoder.take().is_some_and(|d| d.is_done());
        if ended && self.keep_alive && !self.eof && self.buf.is_empty() {
            let pool = self.pool.clone();
            pool.put(self);
        }
    }
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// The connections of one worker thread.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    idle: Mutex<Vec<(Key, Vec<Idle>)>>,
    max_idle_per_host: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        max_idle_per_host: usize,
        idle_timeout: Duration,
    ) -> Arc<Pool> {
        Arc::new(Pool { connector, idle: Mutex::new(Vec::new()), max_idle_per_host, idle_timeout })
    }

    /// Sends `req` (absolute URI, no `Host`) and waits for the response head. The returned
    /// connection carries the response body: the caller reads it (`Conn::poll_frame`)
    /// until it ends, then releases the connection.
    pub async fn send(self: &Arc<Self>, req: Request<Bytes>) -> Result<(Response<()>, Box<Conn>), SendError> {
        let (mut parts, body) = req.into_parts();
        let key = to_origin_form(&mut parts)?;
        let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        let mut wire = BytesMut::new();
        h1::encode_request(&parts.method, target, &parts.headers, &body, &mut wire);
        let mut conn = loop {
            let (mut conn, fresh) = match self.checkout(&key) {
                Some(c) => (c, false),
                None => (self.connect(&key).await?, true),
            };
            // The first write tells whether a reused connection still works; only a request
            // of which nothing was written is sent again.
            let first = match conn.io.write(&wire).await {
                Ok(n) => n,
                Err(_) if !fresh => continue,
                Err(e) => return Err(SendError::Io(e)),
            };
            conn.io.write_all(&wire[first..]).await.map_err(SendError::Io)?;
            conn.io.flush().await.map_err(SendError::Io)?;
            break conn;
        };
        let mut head = loop {
            match h1::parse_head(&mut conn.buf, MAX_HEAD).map_err(SendError::Protocol)? {
                // Interim responses (100 Continue, 103 Early Hints) come before the real one.
                Some(h) if h.status.is_informational() && h.status != StatusCode::SWITCHING_PROTOCOLS => continue,
                Some(h) => break h,
                None => {
                    if conn.fill().await.map_err(SendError::Io)? == 0 {
                        return Err(SendError::Closed);
                    }
                }
            }
        };
        let decoder = Decoder::new(&parts.method, &head).map_err(SendError::Protocol)?;
        if head.headers.contains_key(header::TRANSFER_ENCODING) {
            // Transfer-Encoding overrides a Content-Length beside it, and an intermediary
            // removes that Content-Length before forwarding (RFC 9112 §6.3).
            head.headers.remove(header::CONTENT_LENGTH);
        }
        conn.keep_alive = head.keep_alive() && decoder.reusable() && head.status != StatusCode::SWITCHING_PROTOCOLS;
        conn.decoder = Some(decoder);
        let mut resp = Response::new(());
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        Ok((resp, conn))
    }

    /// The newest idle connection to `key` that the upstream has not closed.
    fn checkout(&self, key: &Key) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = &mut idle.iter_mut().find(|(k, _)| k == key)?.1;
        while let Some(mut i) = list.pop() {
            if i.since.elapsed() < self.idle_timeout && i.conn.is_open() {
                return Some(i.conn);
            }
        }
        None
    }

    /// Boxed: a TLS connection's state is over a kilobyte, and a connection moves between
    /// the pool and its calls.
    async fn connect(self: &Arc<Self>, key: &Key) -> Result<Box<Conn>, SendError> {
        let scheme = if key.https { Scheme::HTTPS } else { Scheme::HTTP };
        let uri = Uri::builder()
            .scheme(scheme)
            .authority(key.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Connect(e.into()))?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await.map_err(SendError::Connect)?;
        let io = connector.call(uri).await.map_err(SendError::Connect)?;
        Ok(Box::new(Conn {
            io: TokioIo::new(io),
            buf: BytesMut::with_capacity(READ_SIZE),
            decoder: None,
            keep_alive: false,
            eof: false,
            key: key.clone(),
            pool: self.clone(),
        }))
    }

    fn put(&self, conn: Box<Conn>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let i = match idle.iter().position(|(k, _)| *k == conn.key) {
            Some(i) => i,
            None => {
                idle.push((conn.key.clone(), Vec::new()));
                idle.len() - 1
            }
        };
        let list = &mut idle[i].1;
        if list.len() < self.max_idle_per_host {
            list.push(Idle { conn, since: Instant::now() });
        }
    }

    /// Closes connections idle too long or closed by the upstream.
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for (_, list) in idle.iter_mut() {
            list.retain_mut(|i| i.since.elapsed() < self.idle_timeout && i.conn.is_open());
        }
        idle.retain(|(_, list)| !list.is_empty());
    }

    /// Idle connections held, for tests.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.iter().map(|(_, l)| l.len()).sum()).unwrap_or(0)
    }
}

/// Turns an absolute-form request into what goes on an HTTP/1.1 connection: origin-form
/// target and a `Host` header (with the port when it is not the scheme's default), as
/// hyper's pooled client does. Returns the connection key.
fn to_origin_form(req: &mut http::request::Parts) -> Result<Key, SendError> {
    let uri = &req.uri;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        return Err(SendError::Connect(format!("upstream URI {uri} is not absolute").into()));
    };
    let https = *scheme == Scheme::HTTPS;
    let key = Key { https, authority: authority.clone() };
    let default_port = if https { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(p) if p != default_port => HeaderValue::from_str(authority.as_str()),
        _ => HeaderValue::from_str(authority.host()),
    }
    .map_err(|e| SendError::Connect(e.into()))?;
    let path = uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
    req.uri = Uri::from(path);
    req.headers.entry(header::HOST).or_insert(host);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn pool() -> Arc<Pool> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth());
        let Ok(tls) = tls else { panic!("tls config") };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Pool::new(connector, 4, Duration::from_secs(60))
    }

    fn request(uri: &str) -> Request<Bytes> {
        let mut req = Request::new(Bytes::from_static(b"{}"));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri.parse().unwrap_or_default();
        req
    }

    /// Reads one request head and body (content-length), returns the head text.
    async fn read_request(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                buf.drain(..end + 4 + len);
                return Some(head);
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn body_text(mut conn: Box<Conn>) -> (String, Box<Conn>) {
        let mut out = Vec::new();
        loop {
            let frame = std::future::poll_fn(|cx| conn.poll_frame(cx)).await;
            match frame {
                Some(Ok(f)) => out.extend_from_slice(f.data_ref().map(|d| d.as_ref()).unwrap_or_default()),
                Some(Err(e)) => panic!("body: {e}"),
                None => break,
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), conn)
    }

    #[tokio::test]
    async fn origin_form_host_and_reuse_of_one_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
            let mut buf = Vec::new();
            let mut heads = Vec::new();
            for i in 0..3 {
                let Some(head) = read_request(&mut s, &mut buf).await else { break };
                heads.push(head);
                let body = format!("reply {i}");
                let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                s.write_all(resp.as_bytes()).await.unwrap_or_else(|e| panic!("{e}"));
            }
            // The socket stays open until the test takes it: closing it here would make the
            // last release find a closed connection.
            (heads, s)
        });
        let pool = pool();
        for i in 0..3 {
            let (resp, conn) = pool
                .send(request(&format!("http://{addr}/v1/chat/completions?x=1")))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(resp.status(), 200);
            let (text, conn) = body_text(conn).await;
            assert_eq!(text, format!("reply {i}"));
            conn.release();
            assert_eq!(pool.idle_count(), 1);
        }
        let Ok((heads, _socket)) = server.await else { panic!("server task") };
        assert_eq!(heads.len(), 3, "all three requests on the one accepted connection");
        for h in heads {
            assert!(h.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"), "{h}");
            assert!(h.contains(&format!("\r\nhost: {addr}")), "{h}");
        }
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
                accepted += 1;
                let mut buf = Vec::new();
                if read_request(&mut s, &mut buf).await.is_some() {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                }
                // Closes after one response, keep-alive or not.
            }
            accepted
        });
        let pool = pool();
        for _ in 0..2 {
            let (resp, conn) = pool.send(request(&format!("http://{addr}/x"))).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(resp.status(), 200);
            let (text, conn) = body_text(conn).await;
            assert_eq!(text, "ok");
            conn.release();
            // Let the close reach us.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.await.unwrap_or_default(), 2);
        pool.sweep();
        assert_eq!(pool.idle_count(), 0, "the closed connection was swept");
    }

    /// An upstream that answers each request on one connection with the next of `replies`,
    /// then keeps the socket open until the test ends. Returns its address.
    async fn scripted(replies: Vec<&'static [u8]>) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
            let mut buf = Vec::new();
            for reply in replies {
                if read_request(&mut s, &mut buf).await.is_none() {
                    return;
                }
                let _ = s.write_all(reply).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        addr
    }

    /// An upstream that takes one connection and one request, writes `pieces` 20 ms apart
    /// and closes. Returns its address.
    async fn answer_once(pieces: &'static [&'static [u8]]) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap_or_else(|e| panic!("{e}"));
            let mut buf = Vec::new();
            read_request(&mut s, &mut buf).await;
            for (i, piece) in pieces.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = s.write_all(piece).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn stream_events_read_one_at_a_time_share_one_buffer() {
        static PIECES: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
            b"6\r\nsecond\r\n",
            b"5\r\nthird\r\n0\r\n\r\n",
        ];
        let addr = answer_once(PIECES).await;
        let pool = pool();
        let (_, mut conn) = pool.send(request(&format!("http://{addr}/x"))).await.unwrap_or_else(|e| panic!("{e}"));
        // Held, as hyper holds a frame until the client has been sent it.
        let mut frames = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| conn.poll_frame(cx)).await {
            frames.extend(frame.unwrap_or_else(|e| panic!("{e}")).into_data().ok());
        }
        let text: Vec<&[u8]> = frames.iter().map(|f| f.as_ref()).collect();
        assert_eq!(text, [&b"first"[..], b"second", b"third"]);
        // Each event arrived in a read of its own, 20 ms apart; each is read into the room
        // after the one before, past its CRLF and the next size line.
        let at = |i: usize| frames[i].as_ptr() as usize;
        assert_eq!(at(1), at(0) + "first\r\n6\r\n".len());
        assert_eq!(at(2), at(1) + "second\r\n5\r\n".len());
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_chunked_trailers_end_the_body() {
        let addr = scripted(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let pool = pool();
        let (resp, conn) = pool.send(request(&format!("http://{addr}/x"))).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), 201);
        let (text, conn) = body_text(conn).await;
        assert_eq!(text, "hello");
        conn.release();
        assert_eq!(pool.idle_count(), 1, "a chunked body that ended leaves the connection reusable");
        let (resp, conn) = pool.send(request(&format!("http://{addr}/y"))).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.status(), 200);
        assert_eq!(body_text(conn).await.0, "ok");
    }

    #[tokio::test]
    async fn connection_close_and_bodies_read_to_the_close_are_not_pooled() {
        let addr = scripted(vec![b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"]).await;
        let pool = pool();
        let (_, conn) = pool.send(request(&format!("http://{addr}/x"))).await.unwrap_or_else(|e| panic!("{e}"));
        let (text, conn) = body_text(conn).await;
        assert_eq!(text, "ok");
        conn.release();
        assert_eq!(pool.idle_count(), 0);

        // Transfer-Encoding wins over a Content-Length beside it, which is not forwarded.
        let addr = scripted(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ])
        .await;
        let (resp, conn) = pool.send(request(&format!("http://{addr}/x"))).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(!resp.headers().contains_key(header::CONTENT_LENGTH));
        assert_eq!(body_text(conn).await.0, "ok");

        // No length: the body is everything up to the close.
        let addr = answer_once(&[b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of ", b"it"]).await;
        let (_, conn) = pool.send(request(&format!("http://{addr}/x"))).await.unwrap_or_else(|e| panic!("{e}"));
        let (text, conn) = body_text(conn).await;
        assert_eq!(text, "all of it");
        conn.release();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_close_before_the_head_or_an_invalid_head_is_an_error() {
        let pool = pool();
        let addr = answer_once(&[]).await;
        let closed = pool.send(request(&format!("http://{addr}/x"))).await.err();
        assert!(matches!(closed, Some(SendError::Closed)), "{closed:?}");
        let addr = answer_once(&[b"HTTP/1.1 2OO OK\r\n\r\n"]).await;
        let invalid = pool.send(request(&format!("http://{addr}/x"))).await.err();
        assert!(matches!(invalid, Some(SendError::Protocol(H1Error::Head(_)))), "{invalid:?}");
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error() {
        let addr = answer_once(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"]).await;
        let (_, mut conn) = pool().send(request(&format!("http://{addr}/x"))).await.unwrap_or_else(|e| panic!("{e}"));
        let first = std::future::poll_fn(|cx| conn.poll_frame(cx)).await;
        assert_eq!(first.and_then(|f| f.ok()).and_then(|f| f.into_data().ok()), Some(Bytes::from_static(b"short")));
        let second = std::future::poll_fn(|cx| conn.poll_frame(cx)).await;
        assert!(matches!(second, Some(Err(BodyError::Protocol(H1Error::Incomplete)))), "{second:?}");
    }

    #[tokio::test]
    async fn connect_failures_are_connect_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        drop(listener);
        let err = pool().send(request(&format!("http://{addr}/x"))).await.err();
        assert!(err.is_some_and(|e| e.is_connect()));
    }

    #[test]
    fn host_carries_the_port_only_when_it_is_not_the_default() {
        for (uri, host, target) in [
            ("http://up:80/a?b", "up", "/a?b"),
            ("http://up:8080/a", "up:8080", "/a"),
            ("https://api.example.com/v1", "api.example.com", "/v1"),
            ("https://api.example.com:8443", "api.example.com:8443", "/"),
        ] {
            let (mut req, _) = request(uri).into_parts();
            let key = to_origin_form(&mut req).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(req.headers[header::HOST], host, "{uri}");
            assert_eq!(req.uri.to_string(), target, "{uri}");
            assert_eq!(key.https, uri.starts_with("https"));
        }
    }
}
