//! The ClickHouse drift source: `llmtap drift`, one job per fleet, and `serve` with
//! `drift.source = "clickhouse"`. The statistics and decisions live in
//! `llmtap_scorer::drift::fleet`; this module brings the ClickHouse client and the shipper.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use llmtap_ingest::sink::clickhouse::ClickHouseSink;
use llmtap_scorer::drift::runner::{run_fleet, DriftObserver, FleetFetch, FleetSummary};

use crate::config::ValidatedConfig;

/// Runs the fleet queries on the configured ClickHouse.
pub struct ClickHouseFetch(pub Arc<ClickHouseSink>);

impl FleetFetch for ClickHouseFetch {
    fn fetch(&self, sql: String) -> Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send + '_>> {
        Box::pin(async move { self.0.json_lines(&sql).await.map_err(|e| e.to_string()) })
    }
}

/// The webhook client, when there are webhooks.
pub fn webhook_client(cfg: &ValidatedConfig) -> anyhow::Result<Option<llmtap_scorer::llm::HttpClient>> {
    if cfg.raw.drift.webhooks.is_empty() {
        return Ok(None);
    }
    Ok(Some(crate::upstream::build_client(&cfg.raw.client, cfg.connect_timeout)?))
}

/// `llmtap drift`: polls ClickHouse until `shutdown` (or `polls` times), and ships its
/// events back through its own local log.
pub async fn run(
    cfg: ValidatedConfig,
    polls: Option<u64>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<FleetSummary> {
    let ch = cfg
        .clickhouse
        .clone()
        .ok_or_else(|| anyhow::anyhow!("llmtap drift reads the fleet's rows from ClickHouse: set clickhouse.url"))?;
    let (sink, shipper) = crate::server::clickhouse_job(&cfg, &ch).await?;
    let fetch = ClickHouseFetch(sink);
    let summary = run_fleet(
        &cfg.raw.data_dir,
        cfg.raw.log.clone(),
        cfg.raw.drift.clone(),
        &ch.database,
        &fetch,
        webhook_client(&cfg)?,
        Vec::new(),
        polls,
        shutdown,
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!("data_dir = {:?}: cannot open the drift log: {e}", cfg.raw.data_dir.display().to_string())
    })?;
    tokio::task::spawn_blocking(move || shipper.shutdown()).await?;
    Ok(summary)
}

/// `serve` with `drift.source = "clickhouse"`: the same poll loop on a thread of its own;
/// it stops when `stop` is dropped or sent.
pub fn spawn_in_serve(
    cfg: &ValidatedConfig,
    observers: Vec<Box<dyn DriftObserver>>,
) -> anyhow::Result<(tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<()>)> {
    let ch =
        cfg.clickhouse.clone().ok_or_else(|| anyhow::anyhow!("drift.source = \"clickhouse\" needs clickhouse.url"))?;
    let client = webhook_client(cfg)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (data_dir, log, drift) = (cfg.raw.data_dir.clone(), cfg.raw.log.clone(), cfg.raw.drift.clone());
    let thread = std::thread::Builder::new().name("llmtap-drift".into()).spawn(move || {
        // A poll's sweep over the fleet's windows must never hold a proxy worker.
        llmtap_ingest::background::background_priority();
        runtime.block_on(async move {
            let fetch = ClickHouseFetch(Arc::new(ClickHouseSink::new(&ch)));
            let stop = async {
                let _ = stop_rx.await;
            };
            match run_fleet(&data_dir, log, drift, &ch.database, &fetch, client, observers, None, stop).await {
                Ok(s) => tracing::info!(
                    polls = s.polls,
                    failed_polls = s.failed_polls,
                    events = s.events,
                    "drift source stopped"
                ),
                Err(e) => tracing::error!(error = %e, "drift source cannot open its log"),
            }
        })
    })?;
    Ok((stop_tx, thread))
}
