//! `llmtap stats --from clickhouse`: the local table, computed in SQL over `llm_traces`
//! (a fleet's sidecars together). Percentiles use `quantileExactInclusive`, the same
//! interpolation as the local summary.

use clickhouse::Row;
use serde::Deserialize;

use super::service::ClickHouseSink;
use super::shipper::InsertError;
use crate::stats::{GroupBy, StatsReport, StatsRow, ToolPathRow};

#[derive(Row, Deserialize)]
struct AggRow {
    key: String,
    requests: u64,
    errors: u64,
    d50: f64,
    d95: f64,
    d99: f64,
    t50: f64,
    t95: f64,
    input_tokens: u64,
    output_tokens: u64,
    cache_read_tokens: u64,
    reasoning_tokens: u64,
    cost_usd: f64,
}

#[derive(Row, Deserialize)]
struct PathRow {
    path: Vec<String>,
    calls: u64,
}

#[derive(Row, Deserialize)]
struct Count {
    n: u64,
}

fn key_expr(by: GroupBy) -> &'static str {
    match by {
        GroupBy::Model => "if(response_model != '', response_model, request_model)",
        GroupBy::App => "app",
        GroupBy::Route => "route",
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// The report for calls since `since_ms` (all when `None`).
pub async fn from_clickhouse(
    sink: &ClickHouseSink,
    by: &[GroupBy],
    since_ms: Option<u64>,
    top_paths: usize,
) -> Result<StatsReport, InsertError> {
    let db = &sink.cfg.database;
    let filter = format!("ts >= fromUnixTimestamp64Milli(toInt64({}), 'UTC')", since_ms.unwrap_or(0));
    let client = sink.client();
    let total: Vec<Count> = sink
        .timed(
            client.query_raw(&format!("SELECT count() AS n FROM {db}.llm_traces WHERE {filter}")).fetch_all::<Count>(),
        )
        .await?;
    let mut report = StatsReport { records: total.first().map_or(0, |c| c.n), ..StatsReport::default() };
    for g in by {
        let sql = format!(
            "SELECT toString({key}) AS key, count() AS requests, countIf(error_kind != '') AS errors, \
             quantileExactInclusive(0.5)(duration_ms) AS d50, quantileExactInclusive(0.95)(duration_ms) AS d95, \
             quantileExactInclusive(0.99)(duration_ms) AS d99, \
             quantileExactInclusiveIf(0.5)(ttft_ms, ttft_ms > 0) AS t50, quantileExactInclusiveIf(0.95)(ttft_ms, ttft_ms > 0) AS t95, \
             sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, \
             sum(cache_read_tokens) AS cache_read_tokens, sum(reasoning_tokens) AS reasoning_tokens, sum(cost_usd) AS cost_usd \
             FROM {db}.llm_traces WHERE {filter} GROUP BY key",
            key = key_expr(*g)
        );
        let rows: Vec<AggRow> = sink.timed(client.query_raw(&sql).fetch_all::<AggRow>()).await?;
        let mut rows: Vec<StatsRow> = rows
            .into_iter()
            .map(|r| StatsRow {
                key: r.key,
                requests: r.requests,
                errors: r.errors,
                duration_p50_ms: finite(r.d50),
                duration_p95_ms: finite(r.d95),
                duration_p99_ms: finite(r.d99),
                ttft_p50_ms: finite(r.t50),
                ttft_p95_ms: finite(r.t95),
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cache_read_tokens: r.cache_read_tokens,
                reasoning_tokens: r.reasoning_tokens,
                cost_usd: r.cost_usd,
            })
            .collect();
        rows.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.key.cmp(&b.key)));
        report.groups.insert(g.as_str().to_owned(), rows);
    }
    let sql = format!(
        "SELECT CAST(tool_calls, 'Array(String)') AS path, count() AS calls FROM {db}.llm_traces \
         WHERE {filter} AND notEmpty(tool_calls) GROUP BY path"
    );
    let paths: Vec<PathRow> = sink.timed(client.query_raw(&sql).fetch_all::<PathRow>()).await?;
    let mut tool_paths: Vec<ToolPathRow> =
        paths.into_iter().map(|p| ToolPathRow { path: p.path, calls: p.calls }).collect();
    tool_paths.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.path.cmp(&b.path)));
    tool_paths.truncate(top_paths);
    report.tool_paths = tool_paths;
    Ok(report)
}
