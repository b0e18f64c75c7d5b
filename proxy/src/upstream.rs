//! The pooled upstream client: hyper-util's legacy client over rustls (webpki roots plus an
//! optional extra CA file), HTTP/1.1 or HTTP/2 chosen by ALPN, with a connect timeout.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::ClientConfig;

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
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    let connector = if cfg.http2 {
        builder.enable_http1().enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(cfg.pool_idle_timeout_secs))
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}
