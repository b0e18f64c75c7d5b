//! `llmtap score`: the standalone scorer. It reads the fleet's calls from ClickHouse, judges
//! the sampled ones with the same engine `serve` runs in-process, and ships its verdicts
//! back through its own local log and shipper (so a dead ClickHouse costs no verdict).
//!
//! Design notes
//! - `--shard i/N` keeps the calls with `cityHash64(trace_id) % N = i`: N workers split the
//!   work without talking to each other, and every call belongs to exactly one of them.
//! - Each pass reads calls newer than a watermark minus `--lookback` (rows that reach
//!   ClickHouse late, from a sidecar that was cut off, still arrive within it), in pages
//!   ordered by (ts, trace_id, span_id). The verdict cache, seeded at start from the shard's
//!   verdicts in ClickHouse and the unshipped ones on disk, keeps every call judged once.
//! - The engine's queue applies backpressure here: a pass waits for judges rather than
//!   dropping calls, unlike `serve`, where the request path never waits.

use std::time::{Duration, SystemTime};

use llmtap_ingest::record::{ts_format, TraceRecord};
use llmtap_ingest::sink::clickhouse::service::quote;
use llmtap_ingest::sink::clickhouse::ClickHouseSink;
use llmtap_scorer::runner::{pick, spawn_engine, verdict_key, VerdictCache};
use serde::Deserialize;

use crate::config::ValidatedConfig;

/// `--shard i/N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard {s:?}: expected i/N with 0 <= i < N, e.g. 0/2");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (u32, u32) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// How `llmtap score` runs.
#[derive(Clone, Debug)]
pub struct ScoreArgs {
    pub shard: Shard,
    /// One pass over what is there, then exit.
    pub once: bool,
    /// Calls older than this are never read.
    pub since: Duration,
    pub lookback: Duration,
    pub poll_interval: Duration,
    pub page_rows: usize,
}

/// What a run did (printed as JSON at exit).
#[derive(Debug, Default, serde::Serialize)]
pub struct ScoreSummary {
    pub shard: String,
    pub calls_read: u64,
    pub calls_sampled: u64,
    pub verdicts: u64,
    pub error_verdicts: u64,
    pub already_judged: u64,
}

fn ts_sql(t: SystemTime) -> String {
    format!("toDateTime64({}, 3, 'UTC')", quote(&ts_format::format(t)))
}

#[derive(Deserialize)]
struct Key {
    judge: String,
    judge_version: String,
    trace_id: String,
    span_id: String,
}

async fn fetch_lines(sink: &ClickHouseSink, sql: &str) -> anyhow::Result<Vec<String>> {
    sink.json_lines(sql).await.map_err(|e| anyhow::anyhow!("clickhouse: {e}"))
}

/// Runs until `shutdown` resolves (or after one pass with `once`).
pub async fn run(
    cfg: ValidatedConfig,
    args: ScoreArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ScoreSummary> {
    let ch = cfg
        .clickhouse
        .clone()
        .ok_or_else(|| anyhow::anyhow!("llmtap score reads calls from ClickHouse: set clickhouse.url"))?;
    if cfg.judges.is_empty() {
        anyhow::bail!("no [[judge]] or [[intent]] in the config: nothing to score with");
    }
    let (sink, shipper) = crate::server::clickhouse_job(&cfg, &ch).await?;
    let db = &ch.database;
    let shard_cond = format!("cityHash64(trace_id) % {} = {}", args.shard.count, args.shard.index);
    let start = SystemTime::now() - args.since;

    let mut cache = VerdictCache::new(cfg.raw.scorer.cache_entries);
    let local = cache.load(&cfg.raw.data_dir)?;
    let known = fetch_lines(
        &sink,
        &format!(
            "SELECT judge, judge_version, trace_id, span_id FROM {db}.llm_scores WHERE ts >= {} AND {shard_cond}",
            ts_sql(start)
        ),
    )
    .await?;
    for line in &known {
        let k: Key = serde_json::from_str(line)?;
        cache.insert(verdict_key(&k.judge, &k.judge_version, &k.trace_id, &k.span_id));
    }
    tracing::info!(shard = ?args.shard, verdicts_known = known.len() + local, "scoring calls from clickhouse");

    let setup = crate::server::scorer_setup(&cfg, Vec::new(), cache)?;
    let (jobs, engine) = spawn_engine(&cfg.raw.data_dir, cfg.raw.log.clone(), setup)?;
    let mut summary =
        ScoreSummary { shard: format!("{}/{}", args.shard.index, args.shard.count), ..Default::default() };
    let mut watermark = start;

    let passes = async {
        loop {
            let from = watermark.checked_sub(args.lookback).unwrap_or(start).max(start);
            let mut cursor = (ts_sql(from), String::new(), String::new());
            loop {
                let sql = format!(
                    "SELECT * FROM {db}.llm_traces WHERE ts >= {from} AND {shard_cond} \
                     AND NOT mapContains(tags, {tag}) \
                     AND (ts, trace_id, span_id) > ({c0}, {c1}, {c2}) \
                     ORDER BY ts, trace_id, span_id LIMIT {limit}",
                    from = ts_sql(from),
                    tag = quote(llmtap_scorer::llm::JUDGE_TAG),
                    c0 = cursor.0,
                    c1 = quote(&cursor.1),
                    c2 = quote(&cursor.2),
                    limit = args.page_rows,
                );
                let rows = fetch_lines(&sink, &sql).await?;
                for line in &rows {
                    let r: TraceRecord = serde_json::from_str(line)
                        .map_err(|e| anyhow::anyhow!("llm_traces row does not read as a record: {e}: {line}"))?;
                    summary.calls_read += 1;
                    watermark = watermark.max(r.ts.0);
                    cursor = (ts_sql(r.ts.0), r.trace_id.clone(), r.span_id.clone());
                    if let Some(job) = pick(&cfg.judges, &r, None) {
                        summary.calls_sampled += 1;
                        if !jobs.send(job).await {
                            anyhow::bail!("the scorer stopped");
                        }
                    }
                }
                if rows.len() < args.page_rows {
                    break;
                }
            }
            if args.once {
                return Ok::<(), anyhow::Error>(());
            }
            tokio::time::sleep(args.poll_interval).await;
        }
    };
    let outcome = tokio::select! {
        r = passes => r,
        () = shutdown => Ok(()),
    };
    drop(jobs);
    let stats = engine.stats.clone();
    tokio::task::spawn_blocking(move || engine.shutdown()).await?;
    tokio::task::spawn_blocking(move || shipper.shutdown()).await?;
    use std::sync::atomic::Ordering::Relaxed;
    summary.verdicts = stats.verdicts.load(Relaxed);
    summary.error_verdicts = stats.errors.load(Relaxed);
    summary.already_judged = stats.already_judged.load(Relaxed);
    outcome.map(|()| summary)
}
