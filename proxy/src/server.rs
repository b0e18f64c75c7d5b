//! Listeners and lifecycle: the proxy listener (HTTP/1.1 and h2c by prior knowledge), the
//! admin listener, and graceful shutdown: stop accepting, let in-flight calls finish within
//! the grace period, then drain every record to disk.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llmtap_ingest::export::otlp::spawn_otlp;
use llmtap_ingest::export::prometheus::{LlmMetrics, MetricsObserver, Sources};
use llmtap_ingest::recorder::{spawn_recorder, RecorderConfig};
use llmtap_ingest::sink::clickhouse::{service, spawn_shipper, ClickHouseSink, ShipperSettings, ValidatedClickHouse};
use llmtap_scorer::llm::LlmCaller;
use llmtap_scorer::runner::{spawn_scorer, ScorerSetup, VerdictCache};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::ValidatedConfig;
use crate::forward::Proxy;
use crate::upstream::{build_client, Upstream};
use crate::workers::Workers;

/// Runs `serve` until `shutdown` resolves. Returns after every record is on disk.
pub async fn serve(cfg: ValidatedConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener =
        bind_listener(cfg.listen).map_err(|e| anyhow::anyhow!("listen = {:?}: cannot bind: {e}", cfg.raw.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| anyhow::anyhow!("admin_listen = {:?}: cannot bind: {e}", cfg.raw.admin_listen))?;
    let proxy_addr = listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;

    let metrics = LlmMetrics::new(cfg.raw.metrics.max_models).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let mut observers: Vec<Box<dyn llmtap_ingest::recorder::RecordObserver>> =
        vec![Box::new(MetricsObserver(metrics.clone()))];
    let mut evaluations = None;
    let otlp = match &cfg.otlp {
        Some(o) => {
            let (observer, handle) = spawn_otlp(o.clone())?;
            tracing::info!(
                endpoint = o.endpoint.as_deref().unwrap_or("(from OTEL_EXPORTER_OTLP_*)"),
                grpc = o.grpc,
                "exporting OTLP spans, metrics and evaluation events"
            );
            evaluations = Some(observer.evaluations());
            observers.push(Box::new(observer));
            Some(handle)
        }
        None => None,
    };
    // The ClickHouse source judges the whole fleet from SQL; it needs no input from here.
    let fleet_drift = if cfg.raw.drift.enabled && cfg.raw.drift.source == "clickhouse" {
        let gauge = crate::judging::DriftGauge::register(&metrics).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
        tracing::info!("drift: polling the fleet's rows in clickhouse");
        Some(crate::drift::spawn_in_serve(&cfg, vec![gauge])?)
    } else {
        None
    };
    let drift = if cfg.raw.drift.enabled && fleet_drift.is_none() {
        let client = if cfg.raw.drift.webhooks.is_empty() {
            None
        } else {
            Some(build_client(&cfg.raw.client, cfg.connect_timeout)?)
        };
        let gauge = crate::judging::DriftGauge::register(&metrics).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
        let (sender, handle) = llmtap_scorer::drift::runner::spawn_drift(
            &cfg.raw.data_dir,
            cfg.raw.log.clone(),
            cfg.raw.drift.clone(),
            client,
            vec![gauge],
        )
        .map_err(|e| {
            anyhow::anyhow!("data_dir = {:?}: cannot open the drift log: {e}", cfg.raw.data_dir.display().to_string())
        })?;
        observers.push(Box::new(sender.calls(cfg.raw.drift.max_calls_per_sec)));
        Some((sender, handle))
    } else {
        None
    };
    let mut tracker = llmtap_scorer::agreement::AgreementTracker::new(10_000);
    if let Err(e) = tracker.load(&cfg.raw.data_dir) {
        tracing::warn!(error = %e, "cannot read earlier verdicts and feedback for the agreement metric");
    }
    let judging = crate::judging::JudgeMetrics::register(&metrics, Arc::new(std::sync::Mutex::new(tracker)))
        .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    if let Some((_, handle)) = &drift {
        judging.set_drift_stats(handle.stats.clone());
    }
    let scorer = if cfg.judges.is_empty() || !cfg.raw.scorer.in_process {
        None
    } else {
        let mut verdict_observers = vec![judging.observer()];
        if let Some((sender, _)) = &drift {
            verdict_observers.push(Box::new(sender.clone()));
        }
        if let Some(e) = evaluations.take() {
            verdict_observers.push(crate::judging::otlp_observer(e));
        }
        let setup = scorer_setup(&cfg, verdict_observers, VerdictCache::new(cfg.raw.scorer.cache_entries))?;
        let (observer, handle) = spawn_scorer(&cfg.raw.data_dir, cfg.raw.log.clone(), setup)?;
        judging.set_stats(handle.stats.clone());
        tracing::info!(
            rule_judges = cfg.judges.rules.len(),
            llm_judges = cfg.judges.llm.len(),
            "scoring sampled calls"
        );
        observers.push(Box::new(observer));
        Some(handle)
    };
    // Without a scorer nobody sends evaluations; the exporter must not wait for this sender.
    drop(evaluations);
    let (recorder_tx, recorder) = spawn_recorder(
        &cfg.raw.data_dir,
        RecorderConfig {
            log: cfg.raw.log.clone(),
            prices: cfg.prices.clone(),
            capture: cfg.capture.clone(),
            observers,
            cap_enforced_by_shipper: cfg.clickhouse.is_some(),
        },
    )
    .map_err(|e| {
        anyhow::anyhow!("data_dir = {:?}: cannot open the trace log: {e}", cfg.raw.data_dir.display().to_string())
    })?;

    let shipper = match &cfg.clickhouse {
        Some(ch) => {
            let sink = Arc::new(ClickHouseSink::new(ch));
            let settings = shipper_settings(&cfg, ch);
            tracing::info!(url = %ch.url, database = %ch.database, "shipping records to clickhouse");
            Some(spawn_shipper(sink, cfg.raw.data_dir.clone(), settings, service::prepare)?)
        }
        None => None,
    };

    let workers = cfg.workers;
    let proxies = (0..workers)
        .map(|_| {
            Ok(Arc::new(Proxy {
                routes: cfg.routes.clone(),
                // A pool per worker: upstream connections stay on the worker's thread.
                client: Upstream::new(&cfg.raw.client, cfg.connect_timeout)?,
                // Wakes the recorder when the worker goes idle (see `workers`).
                recorder: recorder_tx.clone().deferring_wakes(),
                first_byte_timeout: cfg.first_byte_timeout,
                idle_timeout: cfg.idle_timeout,
                max_request_body: cfg.raw.client.max_request_body_bytes,
                capture_bodies: cfg.capture.bodies == llmtap_ingest::capture::BodyCapture::All,
                limits: llmtap_ingest::ExchangeLimits {
                    text_cap: cfg.capture.max_body_bytes.max(64 * 1024),
                    ..Default::default()
                },
            }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Half the shortest call timeout: every call's timers then land after the anchor's.
    let anchor =
        (cfg.first_byte_timeout.min(cfg.idle_timeout) / 2).clamp(Duration::from_millis(1), Duration::from_secs(60));
    let mut workers = Workers::spawn(proxies, cfg.shutdown_grace, anchor)?;
    metrics.registry().register(Box::new(workers.gauge()?)).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;

    let ready = Arc::new(AtomicBool::new(true));
    metrics.set_sources(Sources {
        recorder: Some(recorder_tx.stats().clone()),
        shipper: shipper.as_ref().map(|s| s.stats.clone()),
        prices: Some(cfg.prices.clone()),
        otlp: otlp.as_ref().map(|h| h.stats.clone()),
        trace_dir: Some(cfg.raw.data_dir.join("traces")),
    });
    let feedback =
        Arc::new(crate::feedback::FeedbackWriter::spawn(&cfg.raw.data_dir, cfg.raw.log.clone()).map_err(|e| {
            anyhow::anyhow!(
                "data_dir = {:?}: cannot open the feedback log: {e}",
                cfg.raw.data_dir.display().to_string()
            )
        })?);
    let admin_state = Arc::new(AdminState {
        feedback: feedback.clone(),
        feedback_token: cfg.raw.feedback.token.clone(),
        ready: ready.clone(),
        recorder: recorder_tx.stats().clone(),
        data_dir: cfg.raw.data_dir.clone(),
        metrics: metrics.clone(),
        shipper: shipper.as_ref().map(|s| s.stats.clone()),
        max_disk_bytes: cfg.raw.log.max_disk_bytes,
        judging: judging.clone(),
        drift: std::sync::Mutex::new(drift.as_ref().map(|(s, _)| s.clone())),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state.clone(), stop_rx.clone()));

    tracing::info!(%proxy_addr, %admin_addr, data_dir = %cfg.raw.data_dir.display(), routes = ?cfg.routes.describe_prefixes(), "llmtap serving");
    // One line on stdout for scripts that start llmtap on port 0.
    println!("llmtap listening on {proxy_addr} (admin {admin_addr})");

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, peer)) => workers.dispatch(stream, peer),
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    ready.store(false, Ordering::SeqCst);
    tracing::info!(grace_secs = cfg.shutdown_grace.as_secs(), "shutting down: finishing in-flight calls");
    tokio::task::spawn_blocking(move || workers.close()).await?;
    tracing::info!("in-flight calls finished");
    let _ = stop_tx.send(true);
    let _ = admin_task.await;
    // The drift thread ends when its last sender is gone; the admin API's goes now.
    if let Ok(mut d) = admin_state.drift.lock() {
        d.take();
    }
    // Admin connections are gone; the last feedback handle writes what is queued.
    if let Ok(fb) = Arc::try_unwrap(feedback) {
        tokio::task::spawn_blocking(move || fb.shutdown()).await?;
    }
    drop(recorder_tx);
    let stats = recorder.stats().clone();
    tokio::task::spawn_blocking(move || recorder.shutdown()).await?;
    if let Some(scorer) = scorer {
        tokio::task::spawn_blocking(move || scorer.shutdown()).await?;
    }
    if let Some((sender, handle)) = drift {
        drop(sender);
        tokio::task::spawn_blocking(move || handle.shutdown()).await?;
    }
    if let Some((stop, thread)) = fleet_drift {
        let _ = stop.send(());
        tokio::task::spawn_blocking(move || {
            if thread.join().is_err() {
                tracing::error!("drift thread panicked");
            }
        })
        .await?;
    }
    if let Some(otlp) = otlp {
        // The recorder is gone, so the exporter's queue is closed: it sends what it holds.
        tokio::task::spawn_blocking(move || otlp.shutdown()).await?;
    }
    if let Some(shipper) = shipper {
        // One last attempt to ship what is on disk; what ClickHouse does not take now stays
        // in the local log and goes out after the next start.
        tokio::task::spawn_blocking(move || shipper.shutdown()).await?;
    }
    tracing::info!(
        written = stats.written.load(Ordering::Relaxed),
        dropped = stats.dropped_full.load(Ordering::Relaxed),
        "trace log flushed; bye"
    );
    Ok(())
}

/// How the shipper batches and retries, from `[clickhouse]` and `[log]`.
/// For the jobs that read ClickHouse (`llmtap score`, `llmtap drift`): the schema prepared
/// now (they cannot start without it), and a shipper for what they write to the local log.
pub async fn clickhouse_job(
    cfg: &ValidatedConfig,
    ch: &ValidatedClickHouse,
) -> anyhow::Result<(Arc<ClickHouseSink>, llmtap_ingest::sink::clickhouse::ShipperHandle)> {
    let sink = Arc::new(ClickHouseSink::new(ch));
    service::prepare(sink.clone()).await.map_err(|e| anyhow::anyhow!("clickhouse {}: {e}", ch.url))?;
    let shipper = spawn_shipper(sink.clone(), cfg.raw.data_dir.clone(), shipper_settings(cfg, ch), service::prepare)?;
    Ok((sink, shipper))
}

pub fn shipper_settings(cfg: &ValidatedConfig, ch: &ValidatedClickHouse) -> ShipperSettings {
    ShipperSettings {
        batch_max_rows: ch.batch_max_rows,
        batch_max_bytes: ch.batch_max_bytes,
        batch_max_age: ch.batch_max_age,
        poll_interval: ch.poll_interval,
        retry_initial_backoff: ch.retry_initial_backoff,
        retry_max_backoff: ch.retry_max_backoff,
        keep_local: ch.keep_local,
        max_disk_bytes: cfg.raw.log.max_disk_bytes,
    }
}

/// The scorer's judges, judge client and limits from the config.
pub fn scorer_setup(
    cfg: &ValidatedConfig,
    observers: Vec<Box<dyn llmtap_scorer::runner::VerdictObserver>>,
    cache: VerdictCache,
) -> anyhow::Result<ScorerSetup> {
    let s = &cfg.raw.scorer;
    let caller = if cfg.judges.llm.is_empty() {
        None
    } else {
        // A client of its own: its connections live on the scorer's runtime.
        let client = build_client(&cfg.raw.client, cfg.connect_timeout)?;
        Some(LlmCaller::new(client, &cfg.judges.llm, &s.endpoints, cfg.prices.clone(), &cfg.judges.intents))
    };
    Ok(ScorerSetup {
        judges: cfg.judges.clone(),
        caller,
        queue_capacity: s.queue_capacity,
        max_in_flight: s.max_in_flight,
        cache,
        observers,
    })
}

/// Binds with a deep accept queue: a burst of new connections (a fleet reconnecting, a
/// thousand streams opening at once) waits in the kernel instead of overflowing into SYN
/// retransmits, which cost clients a second each. tokio's default backlog is 1024.
fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
