//! HTTP/1.1 upstream connections that run inside the call's own task.
//!
//! hyper's pooled client gives every upstream connection a task of its own: the request
//! goes to it through a channel, the response head and every body frame come back through
//! another, and each crossing is a pass through the runtime's run queue. Under load a pass
//! waits behind whatever else is queued, so a call paid for it four times before its first
//! byte reached the client. Here the call's task polls the connection itself (hyper's
//! `client::conn::http1`): a read from the upstream and the write to the client happen in
//! one poll, as in nginx's event loop.
//!
//! Design notes
//! - One pool per worker thread (a connection belongs to the runtime that registered its
//!   socket), so the lock is never contended.
//! - Idle connections are reused newest first and polled before reuse: one the upstream
//!   closed meanwhile is dropped, not handed a request. A request that was never written
//!   (the connection failed first) is retried once on a new connection; one that was
//!   written is not, as with hyper's client.
//! - A connection goes back to the pool only when its response body ended cleanly; a call
//!   cut short (client gone, timeout, upstream error) closes it.
//! - `sweep` (called from each worker's timer) closes connections idle past
//!   `client.pool_idle_timeout_secs` or closed by the upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower_service::Service;

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request did not get a response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (TCP connect, TLS handshake).
    #[error("client error (Connect)")]
    Connect(#[source] BoxError),
    /// The connection failed or closed before the response head.
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// From hyper's pooled client (TLS upstreams that may speak HTTP/2).
    #[error(transparent)]
    Client(hyper_util::client::legacy::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        match self {
            SendError::Connect(_) => true,
            SendError::Http(_) => false,
            SendError::Client(e) => e.is_connect(),
        }
    }
}

/// Where a connection goes: scheme and authority.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    https: bool,
    authority: Authority,
}

/// An upstream connection: the request side and the connection future that does the I/O.
/// Whoever holds it must poll it (`drive`) while waiting for the upstream.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    conn: http1::Connection<Io, Full<Bytes>>,
    /// The connection future finished (closed or failed): it is not polled again.
    closed: bool,
    key: Key,
    pool: Arc<Pool>,
}

impl Conn {
    /// Lets the connection read, decode and write what it can. Returns false once the
    /// connection has closed.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.closed && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.closed = true;
        }
        !self.closed
    }

    /// Whether a request can be sent now, after letting the connection settle: after a
    /// response ends, hyper's dispatcher takes a second pass to return to idle.
    fn ready(&mut self, cx: &mut Context<'_>) -> bool {
        for _ in 0..3 {
            if !self.drive(cx) {
                return false;
            }
            match self.sender.poll_ready(cx) {
                Poll::Ready(r) => return r.is_ok(),
                Poll::Pending => {}
            }
        }
        false
    }

    /// The response body ended cleanly: back to the pool if the connection can take
    /// another request.
    pub fn release(mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        if self.ready(&mut cx) {
            let pool = self.pool.clone();
            pool.put(self);
        }
    }
}

struct Idle {
    conn: Conn,
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
    /// connection carries the response body: the caller drives it until the body ends,
    /// then releases it.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        let key = to_origin_form(&mut req)?;
        let mut fresh = false;
        loop {
            let mut conn = match self.checkout(&key) {
                Some(c) => c,
                None => {
                    fresh = true;
                    self.connect(&key).await?
                }
            };
            if fresh {
                std::future::poll_fn(|cx| {
                    if !conn.drive(cx) {
                        return Poll::Ready(Ok(()));
                    }
                    conn.sender.poll_ready(cx)
                })
                .await?;
            } else if !std::future::poll_fn(|cx| Poll::Ready(conn.ready(cx))).await {
                continue;
            }
            let mut response = std::pin::pin!(conn.sender.try_send_request(req));
            let result = std::future::poll_fn(|cx| {
                conn.drive(cx);
                response.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection was gone before it. Once more on a new one.
                    Some(r) if !fresh => req = r,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// The newest idle connection to `key` that the upstream has not closed.
    fn checkout(&self, key: &Key) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = &mut idle.iter_mut().find(|(k, _)| k == key)?.1;
        while let Some(i) = list.pop() {
            if i.since.elapsed() < self.idle_timeout {
                return Some(i.conn);
            }
        }
        None
    }

    async fn connect(self: &Arc<Self>, key: &Key) -> Result<Conn, SendError> {
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
        let (sender, conn) = http1::handshake(io).await?;
        Ok(Conn { sender, conn, closed: false, key: key.clone(), pool: self.clone() })
    }

    fn put(&self, conn: Conn) {
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
        let mut cx = Context::from_waker(Waker::noop());
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for (_, list) in idle.iter_mut() {
            list.retain_mut(|i| i.since.elapsed() < self.idle_timeout && i.conn.drive(&mut cx));
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
fn to_origin_form(req: &mut Request<Full<Bytes>>) -> Result<Key, SendError> {
    let uri = req.uri();
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
    *req.uri_mut() = Uri::from(path);
    req.headers_mut().entry(header::HOST).or_insert(host);
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

    fn request(uri: &str) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from_static(b"{}")));
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

    async fn body_text(resp: Response<Incoming>, mut conn: Conn) -> (String, Conn) {
        let mut body = resp.into_body();
        let mut out = Vec::new();
        loop {
            let frame = std::future::poll_fn(|cx| {
                conn.drive(cx);
                Pin::new(&mut body).poll_frame(cx)
            })
            .await;
            match frame {
                Some(Ok(f)) => out.extend_from_slice(f.data_ref().map(|d| d.as_ref()).unwrap_or_default()),
                Some(Err(e)) => panic!("body: {e}"),
                None => break,
            }
        }
        (String::from_utf8_lossy(&out).into_owned(), conn)
    }

    use http_body::Body as _;

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
            let (text, conn) = body_text(resp, conn).await;
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
            let (text, conn) = body_text(resp, conn).await;
            assert_eq!(text, "ok");
            conn.release();
            // Let the close reach us.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.await.unwrap_or_default(), 2);
        pool.sweep();
        assert_eq!(pool.idle_count(), 0, "the closed connection was swept");
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
            let mut req = request(uri);
            let key = to_origin_form(&mut req).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(req.headers()[header::HOST], host, "{uri}");
            assert_eq!(req.uri().to_string(), target, "{uri}");
            assert_eq!(key.https, uri.starts_with("https"));
        }
    }
}
