//! Drift alerts leave the drift thread for three webhooks: a generic JSON receiver that
//! answers 500 once (the alert is retried), a Slack-compatible one, and a real Alertmanager
//! (the Debian package) that accepts the v2 payload and lists the alert.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llmtap_ingest::log::LogConfig;
use llmtap_ingest::record::{DriftEventRecord, ScoreRecord, TraceRecord};
use llmtap_scorer::drift::alert::{body, WebhookConfig};
use llmtap_scorer::drift::runner::spawn_drift;
use llmtap_scorer::drift::{CallObs, DriftConfig, Input};
use llmtap_testkit::webhook::WebhookReceiver;
use serde_json::Value;

fn client() -> llmtap_scorer::llm::HttpClient {
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots().https_or_http().enable_http1().build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https)
}

/// A real Alertmanager on a free port, with a config that routes everything nowhere.
struct Alertmanager {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    fn start(bin: &std::path::Path) -> Alertmanager {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("alertmanager.yml");
        std::fs::write(&cfg, "route:\n  receiver: nowhere\nreceivers:\n  - name: nowhere\n").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Alertmanager { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(url: &str) -> Option<(u16, String)> {
    use http_body_util::BodyExt;
    let c = client();
    let req = http::Request::get(url).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    let resp = c.request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// 2,000 calls at a steady cost, then 2,000 at three times the cost, with verdicts.
fn cost_jump() -> Vec<Input> {
    let mut out = Vec::new();
    let mut rnd = fastrand::Rng::with_seed(3);
    for i in 0..4000u32 {
        let cost = if i < 2000 { 0.001 } else { 0.003 } * (1.0 + 0.1 * (rnd.f64() - 0.5));
        out.push(Input::Call(Box::new(CallObs::from(&TraceRecord {
            app: "bot".into(),
            route: "openai".into(),
            request_model: "gpt-4o".into(),
            cost_usd: cost,
            duration_ms: 800.0 * (1.0 + 0.2 * (rnd.f64() - 0.5)),
            input_tokens: 100,
            output_tokens: 50,
            finish_reason: "stop".into(),
            ..TraceRecord::default()
        }))));
        out.push(Input::Verdict(Box::new(ScoreRecord {
            trace_id: format!("t{i}"),
            judge: "cites_plan".into(),
            judge_kind: "rule".into(),
            app: "bot".into(),
            route: "openai".into(),
            request_model: "gpt-4o".into(),
            passed: u8::from(rnd.f64() < 0.9),
            ..ScoreRecord::default()
        })));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_generic_slack_and_a_real_alertmanager_with_a_retry_after_a_500() {
    let Some(am_bin) = llmtap_testkit::tools::find("prometheus-alertmanager") else { return };
    let am = Alertmanager::start(&am_bin);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("{}/-/ready", am.url)).await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "alertmanager did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let generic = WebhookReceiver::start(&[500]).await.unwrap();
    let slack = WebhookReceiver::start(&[]).await.unwrap();
    let resends = WebhookReceiver::start(&[]).await.unwrap();
    let hook = |url: String, format: &str| WebhookConfig { url, format: format.into(), ..WebhookConfig::default() };
    let webhooks = vec![
        hook(generic.url("/hooks/drift"), "generic"),
        WebhookConfig {
            headers: [("authorization".to_owned(), "Bearer hook-secret".to_owned())].into(),
            ..hook(slack.url("/services/T000/B000"), "slack")
        },
        hook(format!("{}/api/v2/alerts", am.url), "alertmanager"),
        // Alertmanager format at a recorder, re-sent every second while firing.
        WebhookConfig { resend_secs: 1, ..hook(resends.url("/api/v2/alerts"), "alertmanager") },
    ];
    let cfg = DriftConfig { webhooks, ..DriftConfig::default() };
    cfg.validate().unwrap();

    let data = tempfile::tempdir().unwrap();
    let (sender, handle) = spawn_drift(data.path(), LogConfig::default(), cfg, Some(client()), Vec::new()).unwrap();
    for input in cost_jump() {
        sender.send(input);
        // The queue is bounded; keep well inside it.
        tokio::task::yield_now().await;
    }
    // Long enough for two re-sends of what is firing.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    drop(sender);
    let stats = handle.stats.clone();
    tokio::task::spawn_blocking(move || handle.shutdown()).await.unwrap();
    assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);

    let events: Vec<DriftEventRecord> = llmtap_testkit::process::read_records(&data.path().join("drift"))
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let cost: Vec<&DriftEventRecord> = events.iter().filter(|e| e.signal == "cost_per_call").collect();
    assert!(
        !cost.is_empty() && cost.iter().all(|e| e.state == "firing" && e.control_surface == "model"),
        "{events:#?}"
    );
    assert_eq!(stats.webhook_failures.load(std::sync::atomic::Ordering::Relaxed), 0);

    // Generic: every batch arrives; the first was answered 500 and sent again, byte for byte.
    let got = generic.received();
    assert_eq!(got[0].answered, 500);
    assert_eq!((got[1].answered, &got[1].body), (200, &got[0].body));
    let delivered: Vec<DriftEventRecord> = got[1..]
        .iter()
        .flat_map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["source"], "llmtap");
            assert_eq!(r.path, "/hooks/drift");
            assert_eq!(r.headers["content-type"], "application/json");
            serde_json::from_value::<Vec<DriftEventRecord>>(v["events"].clone()).unwrap()
        })
        .collect();
    assert_eq!(delivered, events, "every event, once, in order");

    // Slack: one text line per event, with the configured header.
    let got = slack.received();
    assert!(got.iter().all(|r| r.answered == 200 && r.headers["authorization"] == "Bearer hook-secret"));
    let text: Vec<String> = got
        .iter()
        .flat_map(|r| {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            v["text"].as_str().unwrap().lines().map(str::to_owned).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(text.len(), events.len());
    let line = text.iter().find(|l| l.contains(" cost_per_call firing ")).unwrap();
    assert!(line.starts_with("*llmtap drift* "), "{line}");
    assert!(
        line.contains("(app=bot route=openai model=gpt-4o)") || line.contains("(app=bot route=* model=*)"),
        "{line}"
    );
    assert!(line.ends_with("Revisit: model."), "{line}");
    // The line of the per-model cost event, as a person reads it.
    let e = cost.iter().find(|e| e.model == "gpt-4o").unwrap();
    let want = format!(
        "*llmtap drift* {} cost_per_call firing (app=bot route=openai model=gpt-4o): moved {:.4} → {:.4} ({} ",
        e.severity, e.baseline_value, e.current_value, e.method
    );
    assert!(text.iter().any(|l| l.starts_with(&want)), "{want}\n{text:#?}");
    // Every body is what `body` makes of some of the events.
    for r in &got {
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        let lines = v["text"].as_str().unwrap().lines().count();
        assert!(lines >= 1 && v.as_object().unwrap().len() == 1, "{v}");
    }
    assert_eq!(body("slack", &[]), br#"{"text":""}"#);

    // What is still firing went to the Alertmanager-format recorder again, unchanged.
    let got = resends.received();
    let firing_labels = |r: &llmtap_testkit::webhook::Received| -> Vec<Value> {
        let v: Vec<Value> = serde_json::from_slice(&r.body).unwrap();
        v.iter().filter(|a| a.get("endsAt").is_none()).map(|a| a["labels"].clone()).collect()
    };
    let last = firing_labels(got.last().unwrap());
    assert_eq!(last.len(), events.iter().filter(|e| e.state == "firing").count() - resolved(&events));
    let repeats = got[1..].iter().filter(|r| firing_labels(r) == last).count();
    assert!(repeats >= 2, "{} requests, {repeats} re-sends", got.len());

    // Alertmanager took the v2 payload: the alert is listed, with its labels.
    let (status, listed) = get(&format!("{}/api/v2/alerts", am.url)).await.unwrap();
    assert_eq!(status, 200, "{listed}");
    let alerts: Vec<Value> = serde_json::from_str(&listed).unwrap();
    let cost_alerts: Vec<&Value> = alerts.iter().filter(|a| a["labels"]["signal"] == "cost_per_call").collect();
    assert_eq!(cost_alerts.len(), cost.len(), "{listed}");
    for a in cost_alerts {
        assert_eq!(a["labels"]["alertname"], "LLMTapDrift");
        assert_eq!(a["labels"]["control_surface"], "model");
        assert_eq!(a["labels"]["app"], "bot");
        assert!(a["labels"].get("judge").is_none(), "empty labels are left out: {a}");
        assert_eq!(a["status"]["state"], "active", "{a}");
        assert!(a["annotations"]["summary"].as_str().unwrap().contains("revisit the model"), "{a}");
    }
}

/// Episodes that resolved again.
fn resolved(events: &[DriftEventRecord]) -> usize {
    events.iter().filter(|e| e.state == "resolved").count()
}
