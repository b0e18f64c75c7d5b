//! Summaries for `llmtap stats`: per model, app or route, the request and error counts,
//! latency and TTFT percentiles, tokens and cost, plus the most frequent tool paths.
//! Percentiles interpolate linearly between closest ranks (ClickHouse's
//! `quantileExactInclusive`), so the local and the ClickHouse tables agree.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::record::{ErrorKind, TraceRecord};

/// What rows are keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Model,
    App,
    Route,
}

impl GroupBy {
    pub fn key(self, r: &TraceRecord) -> String {
        match self {
            GroupBy::Model => r.model().to_owned(),
            GroupBy::App => r.app.clone(),
            GroupBy::Route => r.route.clone(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::App => "app",
            GroupBy::Route => "route",
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StatsRow {
    pub key: String,
    pub requests: u64,
    pub errors: u64,
    pub duration_p50_ms: f64,
    pub duration_p95_ms: f64,
    pub duration_p99_ms: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p95_ms: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_usd: f64,
}

/// A frequent sequence of tool calls.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolPathRow {
    pub path: Vec<String>,
    pub calls: u64,
}

/// Everything `stats` prints.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StatsReport {
    pub records: u64,
    pub groups: BTreeMap<String, Vec<StatsRow>>,
    pub tool_paths: Vec<ToolPathRow>,
}

#[derive(Default)]
struct Acc {
    requests: u64,
    errors: u64,
    durations: Vec<f64>,
    ttfts: Vec<f64>,
    input: u64,
    output: u64,
    cached: u64,
    reasoning: u64,
    cost: f64,
}

/// Accumulates records into a report.
pub struct StatsBuilder {
    by: Vec<GroupBy>,
    accs: Vec<HashMap<String, Acc>>,
    paths: HashMap<Vec<String>, u64>,
    records: u64,
}

impl StatsBuilder {
    pub fn new(by: &[GroupBy]) -> Self {
        StatsBuilder {
            by: by.to_vec(),
            accs: by.iter().map(|_| HashMap::new()).collect(),
            paths: HashMap::new(),
            records: 0,
        }
    }

    pub fn add(&mut self, r: &TraceRecord) {
        self.records += 1;
        for (g, accs) in self.by.iter().zip(self.accs.iter_mut()) {
            let a = accs.entry(g.key(r)).or_default();
            a.requests += 1;
            if r.error_kind != ErrorKind::None {
                a.errors += 1;
            }
            a.durations.push(r.duration_ms);
            if r.ttft_ms > 0.0 {
                a.ttfts.push(r.ttft_ms);
            }
            a.input += r.input_tokens;
            a.output += r.output_tokens;
            a.cached += r.cache_read_tokens;
            a.reasoning += r.reasoning_tokens;
            a.cost += r.cost_usd;
        }
        if !r.tool_calls.is_empty() {
            *self.paths.entry(r.tool_calls.clone()).or_default() += 1;
        }
    }

    pub fn finish(self, top_paths: usize) -> StatsReport {
        let mut groups = BTreeMap::new();
        for (g, accs) in self.by.iter().zip(self.accs) {
            let mut rows: Vec<StatsRow> = accs
                .into_iter()
                .map(|(key, mut a)| StatsRow {
                    key,
                    requests: a.requests,
                    errors: a.errors,
                    duration_p50_ms: quantile(&mut a.durations, 0.50),
                    duration_p95_ms: quantile(&mut a.durations, 0.95),
                    duration_p99_ms: quantile(&mut a.durations, 0.99),
                    ttft_p50_ms: quantile(&mut a.ttfts, 0.50),
                    ttft_p95_ms: quantile(&mut a.ttfts, 0.95),
                    input_tokens: a.input,
                    output_tokens: a.output,
                    cache_read_tokens: a.cached,
                    reasoning_tokens: a.reasoning,
                    cost_usd: a.cost,
                })
                .collect();
            rows.sort_by(|a, b| b.requests.cmp(&a.requests).then_with(|| a.key.cmp(&b.key)));
            groups.insert(g.as_str().to_owned(), rows);
        }
        let mut tool_paths: Vec<ToolPathRow> =
            self.paths.into_iter().map(|(path, calls)| ToolPathRow { path, calls }).collect();
        tool_paths.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.path.cmp(&b.path)));
        tool_paths.truncate(top_paths);
        StatsReport { records: self.records, groups, tool_paths }
    }
}

/// Linear interpolation between closest ranks; 0 for an empty set.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Reads `<data_dir>/traces/*.ndjson`; lines that do not parse are counted, not fatal.
pub fn from_local_log(
    data_dir: &Path,
    by: &[GroupBy],
    since_ms: Option<u64>,
    top_paths: usize,
) -> std::io::Result<(StatsReport, u64)> {
    let mut b = StatsBuilder::new(by);
    let mut bad = 0u64;
    crate::log::for_each_line(&data_dir.join("traces"), |_, line| match serde_json::from_str::<TraceRecord>(line) {
        Ok(r) => {
            let ms = r.ts.0.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            if since_ms.is_none_or(|s| ms >= s) {
                b.add(&r);
            }
        }
        Err(_) => bad += 1,
    })?;
    Ok((b.finish(top_paths), bad))
}

impl StatsReport {
    /// The human table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.records == 0 {
            out.push_str("no trace records yet\n");
            return out;
        }
        for (by, rows) in &self.groups {
            let _ = writeln!(
                out,
                "{:<28} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9} {:>11}",
                format!("by {by}"),
                "requests",
                "errors",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "ttft p50",
                "ttft p95",
                "input tok",
                "output tok",
                "cached",
                "reasoning",
                "cost usd"
            );
            for r in rows {
                let key = if r.key.is_empty() { "(none)" } else { r.key.as_str() };
                let _ = writeln!(
                    out,
                    "{:<28} {:>8} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10} {:>10} {:>9} {:>9} {:>11.6}",
                    truncate(key, 28),
                    r.requests,
                    r.errors,
                    r.duration_p50_ms,
                    r.duration_p95_ms,
                    r.duration_p99_ms,
                    r.ttft_p50_ms,
                    r.ttft_p95_ms,
                    r.input_tokens,
                    r.output_tokens,
                    r.cache_read_tokens,
                    r.reasoning_tokens,
                    r.cost_usd
                );
            }
            out.push('\n');
        }
        if !self.tool_paths.is_empty() {
            let _ = writeln!(out, "{:<60} {:>8}", "most frequent tool paths", "calls");
            for p in &self.tool_paths {
                let _ = writeln!(out, "{:<60} {:>8}", truncate(&p.path.join(" → "), 60), p.calls);
            }
        }
        out
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(n - 1).collect();
    t.push('…');
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_clickhouse_inclusive() {
        let mut v = vec![10.0, 20.0, 30.0, 40.0];
        assert_eq!(quantile(&mut v, 0.5), 25.0);
        assert_eq!(quantile(&mut v, 0.95), 38.5);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn groups_errors_tokens_and_tool_paths() {
        let mk = |model: &str, app: &str, err: ErrorKind, tools: &[&str], d: f64| TraceRecord {
            request_model: model.into(),
            app: app.into(),
            error_kind: err,
            duration_ms: d,
            ttft_ms: d / 2.0,
            input_tokens: 10,
            output_tokens: 5,
            cost_usd: 0.5,
            tool_calls: tools.iter().map(|s| s.to_string()).collect(),
            ..TraceRecord::default()
        };
        let mut b = StatsBuilder::new(&[GroupBy::Model, GroupBy::App]);
        b.add(&mk("gpt-4o", "bot", ErrorKind::None, &["search", "answer"], 100.0));
        b.add(&mk("gpt-4o", "bot", ErrorKind::HttpError, &[], 300.0));
        b.add(&mk("claude", "bot", ErrorKind::None, &["search", "answer"], 50.0));
        let r = b.finish(5);
        let models = &r.groups["model"];
        assert_eq!(models[0].key, "gpt-4o");
        assert_eq!((models[0].requests, models[0].errors, models[0].input_tokens), (2, 1, 20));
        assert_eq!(models[0].duration_p50_ms, 200.0);
        assert_eq!(models[0].cost_usd, 1.0);
        assert_eq!(r.groups["app"][0].requests, 3);
        assert_eq!(r.tool_paths, vec![ToolPathRow { path: vec!["search".into(), "answer".into()], calls: 2 }]);
        assert!(r.render().contains("search → answer"));
    }
}
