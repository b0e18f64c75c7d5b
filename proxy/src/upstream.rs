//! Upstream clients over rustls (webpki roots plus an optional extra CA file), with a
//! connect timeout: hyper-util's pooled client, HTTP/1.1 or HTTP/2 chosen by ALPN, and for
//! the request path `Upstream`, which sends HTTP/1.1 calls through `pool` instead.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::ClientConfig;
use crate::pool::{Conn, Pool, SendError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("client.extra_ca_file = {path:?}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("tls setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Builds the shared client. Called once at start; nothing here does network I/O.
pub fn build_client(cfg: &ClientConfig, connect_timeout: Duration) -> Result<UpstreamClient, UpstreamError> {
    Ok(pooled_client(cfg, tls_config(cfg)?, connect_timeout))
}

fn pooled_client(cfg: &ClientConfig, tls: rustls::ClientConfig, connect_timeout: Duration) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(cfg.pool_idle_timeout_secs))
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector(tls, connect_timeout, cfg.http2))
}

/// The request path's upstream: HTTP/1.1 calls go through a `Pool` whose connections run
/// in the call's own task; TLS upstreams that may answer in HTTP/2 (`client.http2`) go
/// through hyper's pooled client, which multiplexes a connection over many calls.
pub struct Upstream {
    client: UpstreamClient,
    pool: Arc<Pool>,
    http2: bool,
}

impl Upstream {
    /// One per worker thread: connections stay on the runtime that opened them.
    pub fn new(cfg: &ClientConfig, connect_timeout: Duration) -> Result<Upstream, UpstreamError> {
        let tls = tls_config(cfg)?;
        let idle_timeout = Duration::from_secs(cfg.pool_idle_timeout_secs);
        let pool = Pool::new(connector(tls.clone(), connect_timeout, false), cfg.pool_max_idle_per_host, idle_timeout);
        let client = pooled_client(cfg, tls, connect_timeout);
        Ok(Upstream { client, pool, http2: cfg.http2 })
    }

    /// Sends `req` (absolute URI) and waits for the response head.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<UpstreamBody>, SendError> {
        if self.http2 && req.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
            let resp = self.client.request(req.map(Full::new)).await.map_err(SendError::Client)?;
            return Ok(resp.map(|b| UpstreamBody(Source::Shared(b))));
        }
        let (resp, conn) = self.pool.send(req).await?;
        Ok(resp.map(|()| UpstreamBody(Source::Pooled(conn))))
    }

    /// Closes idle connections past their time or closed by the upstream.
    pub fn sweep(&self) {
        self.pool.sweep();
    }
}

/// A response body: read from a pooled HTTP/1.1 connection by the call's own task, or
/// from hyper's pooled client.
pub struct UpstreamBody(Source);

enum Source {
    Pooled(Box<Conn>),
    Shared(Incoming),
    /// Ended, and the connection went back to the pool.
    Released,
}

impl UpstreamBody {
    /// Whether the caller's polls do the reading: no other task decodes for it, so a
    /// `Pending` means the socket has nothing more.
    pub fn is_driven(&self) -> bool {
        matches!(self.0, Source::Pooled(_))
    }

    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Source::Pooled(c) => c.poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into))),
            Source::Shared(b) => Pin::new(b).poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into))),
            Source::Released => Poll::Ready(None),
        }
    }

    /// For a driven body, the next frame when the bytes already read hold it (or the end,
    /// or an error): `None` when it takes a read, which only `poll_frame` does. Never
    /// registers for a wake-up, so `None` is no reason to return `Pending`.
    pub fn buffered_frame(&mut self) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Source::Pooled(c) => c.decode_buffered().map(|f| f.map(|r| r.map_err(Into::into))),
            Source::Shared(_) => None,
            Source::Released => Some(None),
        }
    }

    pub fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Source::Pooled(c) => c.size_hint(),
            Source::Shared(b) => b.size_hint(),
            Source::Released => SizeHint::with_exact(0),
        }
    }

    /// The body ended cleanly: a pooled connection goes back to its pool.
    pub fn release(&mut self) {
        if let Source::Pooled(c) = std::mem::replace(&mut self.0, Source::Released) {
            c.release();
        }
    }
}

/// Roots (webpki plus `client.extra_ca_file`): read once, shared by both connectors.
fn tls_config(cfg: &ClientConfig) -> Result<rustls::ClientConfig, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !cfg.extra_ca_file.is_empty() {
        let path = cfg.extra_ca_file.clone();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
            .map_err(|e| UpstreamError::CaFile { path: path.clone(), reason: e.to_string() })?
            .collect::<Result<_, _>>()
            .map_err(|e| UpstreamError::CaFile { path: path.clone(), reason: e.to_string() })?;
        if certs.is_empty() {
            return Err(UpstreamError::CaFile { path, reason: "no certificates found".into() });
        }
        for c in certs {
            roots.add(c).map_err(|e| UpstreamError::CaFile { path: path.clone(), reason: e.to_string() })?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// TCP (nodelay, keepalive, connect timeout) and TLS, offering h2 by ALPN when `http2`.
fn connector(tls: rustls::ClientConfig, connect_timeout: Duration, http2: bool) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    if http2 {
        builder.enable_http1().enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    }
}
