//! Drift alerts to webhooks: a generic JSON body, a Slack-compatible text body, or the
//! Alertmanager v2 `POST /api/v2/alerts` format; retried with backoff.
//!
//! Alertmanager resolves an alert nobody re-sends within its `resolve_timeout` (5 minutes by
//! default), so what is still firing is re-sent to `alertmanager` webhooks every
//! `resend_secs`, as Prometheus does; the other formats are notifications, sent once per
//! transition.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use llmtap_ingest::record::{ts_format, DriftEventRecord};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::llm::HttpClient;

/// `[[drift.webhooks]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// `generic`, `slack` or `alertmanager` (the URL is then `…/api/v2/alerts`).
    pub format: String,
    pub max_retries: u32,
    pub timeout_ms: u64,
    /// Extra headers, e.g. an `Authorization` for the receiver.
    pub headers: BTreeMap<String, String>,
    /// `alertmanager`: seconds between re-sends of what is still firing.
    pub resend_secs: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            format: "generic".into(),
            max_retries: 5,
            timeout_ms: 5000,
            headers: BTreeMap::new(),
            resend_secs: 60,
        }
    }
}

impl WebhookConfig {
    pub fn validate(&self) -> Result<(), (String, String, String)> {
        match self.url.parse::<http::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {}
            _ => return Err(("url".into(), format!("{:?}", self.url), "expected an http(s) URL".into())),
        }
        if !matches!(self.format.as_str(), "generic" | "slack" | "alertmanager") {
            return Err((
                "format".into(),
                format!("{:?}", self.format),
                "expected generic, slack or alertmanager".into(),
            ));
        }
        if self.resend_secs == 0 {
            return Err(("resend_secs".into(), "0".into(), "must be above 0".into()));
        }
        Ok(())
    }
}

fn what(e: &DriftEventRecord) -> String {
    let mut key = format!("app={} route={} model={}", e.app, e.route, e.model);
    if !e.judge.is_empty() {
        key.push_str(&format!(" judge={}", e.judge));
    }
    format!(
        "{} {} {} ({key}): {} {:.4} → {:.4} ({} {:.3} vs {:.3}; n {} vs {}). Revisit: {}.",
        e.severity,
        e.signal,
        e.state,
        if e.state == "firing" { "moved" } else { "back near baseline" },
        e.baseline_value,
        e.current_value,
        e.method,
        e.statistic,
        e.threshold,
        e.baseline_n,
        e.current_n,
        e.control_surface
    )
}

/// The request body of `events` in `format`.
pub fn body(format: &str, events: &[DriftEventRecord]) -> Vec<u8> {
    match format {
        "slack" => {
            let lines: Vec<String> = events.iter().map(|e| format!("*llmtap drift* {}", what(e))).collect();
            json!({"text": lines.join("\n")}).to_string().into_bytes()
        }
        "alertmanager" => {
            let alerts: Vec<serde_json::Value> = events
                .iter()
                .map(|e| {
                    let at = ts_format::format(e.ts.0).replacen(' ', "T", 1) + "Z";
                    // An empty label is an absent one in Prometheus' data model.
                    let labels: serde_json::Map<String, serde_json::Value> = [
                        ("alertname", "LLMTapDrift"),
                        ("signal", e.signal.as_str()),
                        ("app", e.app.as_str()),
                        ("route", e.route.as_str()),
                        ("model", e.model.as_str()),
                        ("judge", e.judge.as_str()),
                        ("control_surface", e.control_surface.as_str()),
                        ("severity", e.severity.as_str()),
                    ]
                    .into_iter()
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.to_owned(), json!(v)))
                    .collect();
                    let mut a = json!({
                        "labels": labels,
                        "annotations": {
                            "summary": format!("{} drift for {}: revisit the {}", e.signal, e.app, e.control_surface),
                            "description": what(e),
                            "method": e.method,
                        },
                        "startsAt": at,
                    });
                    if e.state == "resolved" {
                        a["endsAt"] = json!(at);
                    }
                    a
                })
                .collect();
            serde_json::Value::Array(alerts).to_string().into_bytes()
        }
        _ => json!({"source": "llmtap", "events": events}).to_string().into_bytes(),
    }
}

/// Sends `events` to one webhook, retrying 5xx, 429 and connection errors with backoff.
/// Returns the attempts made, or the last error.
pub async fn deliver(
    client: &HttpClient,
    hook: &WebhookConfig,
    events: &[DriftEventRecord],
    backoff: Duration,
) -> Result<u32, String> {
    let payload = Bytes::from(body(&hook.format, events));
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(hook.url.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("llmtap/", env!("CARGO_PKG_VERSION")));
        for (k, v) in &hook.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(payload.clone())).map_err(|e| e.to_string())?;
        let outcome = tokio::time::timeout(Duration::from_millis(hook.timeout_ms), async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            Ok::<_, String>(status)
        })
        .await;
        let err = match outcome {
            Ok(Ok(s)) if s.is_success() => return Ok(attempt),
            Ok(Ok(s)) if s.is_client_error() && s.as_u16() != 429 => return Err(format!("webhook answered {s}")),
            Ok(Ok(s)) => format!("webhook answered {s}"),
            Ok(Err(e)) => e,
            Err(_) => format!("webhook timed out after {} ms", hook.timeout_ms),
        };
        if attempt > hook.max_retries {
            return Err(format!("{err} (after {attempt} attempts)"));
        }
        tokio::time::sleep(backoff.saturating_mul(1 << (attempt - 1).min(8))).await;
    }
}
