//! Rows as the `clickhouse` crate writes them (RowBinary with names and types, checked
//! against the table): one type per table, borrowing from the parsed record, fields in the
//! table's column order.

use std::collections::BTreeMap;

use clickhouse::Row;
use serde::Serialize;
use time::OffsetDateTime;

use crate::record::{DriftEventRecord, FeedbackRecord, ScoreRecord, Timestamp, TraceRecord};

fn odt(ts: Timestamp) -> OffsetDateTime {
    OffsetDateTime::from(ts.0)
}

fn map(tags: &BTreeMap<String, String>) -> Vec<(&str, &str)> {
    tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[derive(Row, Serialize)]
pub struct TraceRow<'a> {
    pub trace_id: &'a str,
    pub span_id: &'a str,
    pub parent_span_id: &'a str,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub ts: OffsetDateTime,
    pub app: &'a str,
    pub route: &'a str,
    pub provider: &'a str,
    pub operation: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub error_kind: &'a str,
    pub streamed: bool,
    pub request_model: &'a str,
    pub response_model: &'a str,
    pub response_id: &'a str,
    pub finish_reason: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    pub usage_source: &'a str,
    pub cost_usd: f64,
    pub duration_ms: f64,
    pub ttft_ms: f64,
    pub upstream_ms: f64,
    pub overhead_us: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub tool_calls: &'a [String],
    pub tool_call_args: &'a [String],
    pub tools_offered: &'a [String],
    pub user_id: &'a str,
    pub session_id: &'a str,
    pub tags: Vec<(&'a str, &'a str)>,
    pub request_body: &'a str,
    pub output_text: &'a str,
    pub sampled: bool,
}

impl<'a> From<&'a TraceRecord> for TraceRow<'a> {
    fn from(r: &'a TraceRecord) -> Self {
        TraceRow {
            trace_id: &r.trace_id,
            span_id: &r.span_id,
            parent_span_id: &r.parent_span_id,
            ts: odt(r.ts),
            app: &r.app,
            route: &r.route,
            provider: &r.provider,
            operation: r.operation.as_str(),
            method: &r.method,
            path: &r.path,
            status: r.status,
            error_kind: r.error_kind.as_str(),
            streamed: r.streamed,
            request_model: &r.request_model,
            response_model: &r.response_model,
            response_id: &r.response_id,
            finish_reason: &r.finish_reason,
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cache_read_tokens: r.cache_read_tokens,
            cache_write_tokens: r.cache_write_tokens,
            reasoning_tokens: r.reasoning_tokens,
            usage_source: r.usage_source.as_str(),
            cost_usd: r.cost_usd,
            duration_ms: r.duration_ms,
            ttft_ms: r.ttft_ms,
            upstream_ms: r.upstream_ms,
            overhead_us: r.overhead_us,
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            tool_calls: &r.tool_calls,
            tool_call_args: &r.tool_call_args,
            tools_offered: &r.tools_offered,
            user_id: &r.user_id,
            session_id: &r.session_id,
            tags: map(&r.tags),
            request_body: &r.request_body,
            output_text: &r.output_text,
            sampled: r.sampled,
        }
    }
}

#[derive(Row, Serialize)]
pub struct ScoreRow<'a> {
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub ts: OffsetDateTime,
    pub trace_id: &'a str,
    pub judge: &'a str,
    pub judge_version: &'a str,
    pub judge_kind: &'a str,
    pub app: &'a str,
    pub route: &'a str,
    pub request_model: &'a str,
    pub score: f64,
    pub passed: u8,
    pub label: &'a str,
    pub reasoning: &'a str,
    pub needs_review: u8,
    pub error: &'a str,
    pub judge_model: &'a str,
    pub judge_ms: f64,
    pub judge_cost_usd: f64,
    pub span_id: &'a str,
}

impl<'a> From<&'a ScoreRecord> for ScoreRow<'a> {
    fn from(r: &'a ScoreRecord) -> Self {
        ScoreRow {
            ts: odt(r.ts),
            trace_id: &r.trace_id,
            judge: &r.judge,
            judge_version: &r.judge_version,
            judge_kind: &r.judge_kind,
            app: &r.app,
            route: &r.route,
            request_model: &r.request_model,
            score: r.score,
            passed: r.passed,
            label: &r.label,
            reasoning: &r.reasoning,
            needs_review: r.needs_review,
            error: &r.error,
            judge_model: &r.judge_model,
            judge_ms: r.judge_ms,
            judge_cost_usd: r.judge_cost_usd,
            span_id: &r.span_id,
        }
    }
}

#[derive(Row, Serialize)]
pub struct FeedbackRow<'a> {
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub ts: OffsetDateTime,
    pub trace_id: &'a str,
    pub name: &'a str,
    pub value: f64,
    pub label: &'a str,
    pub comment: &'a str,
    pub correction: &'a str,
    pub annotator: &'a str,
}

impl<'a> From<&'a FeedbackRecord> for FeedbackRow<'a> {
    fn from(r: &'a FeedbackRecord) -> Self {
        FeedbackRow {
            ts: odt(r.ts),
            trace_id: &r.trace_id,
            name: &r.name,
            value: r.value,
            label: &r.label,
            comment: &r.comment,
            correction: &r.correction,
            annotator: &r.annotator,
        }
    }
}

#[derive(Row, Serialize)]
pub struct DriftRow<'a> {
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub ts: OffsetDateTime,
    pub signal: &'a str,
    pub app: &'a str,
    pub route: &'a str,
    pub model: &'a str,
    pub judge: &'a str,
    pub method: &'a str,
    pub statistic: f64,
    pub threshold: f64,
    pub baseline_n: u64,
    pub current_n: u64,
    pub baseline_value: f64,
    pub current_value: f64,
    pub severity: &'a str,
    pub state: &'a str,
    pub control_surface: &'a str,
}

impl<'a> From<&'a DriftEventRecord> for DriftRow<'a> {
    fn from(r: &'a DriftEventRecord) -> Self {
        DriftRow {
            ts: odt(r.ts),
            signal: &r.signal,
            app: &r.app,
            route: &r.route,
            model: &r.model,
            judge: &r.judge,
            method: &r.method,
            statistic: r.statistic,
            threshold: r.threshold,
            baseline_n: r.baseline_n,
            current_n: r.current_n,
            baseline_value: r.baseline_value,
            current_value: r.current_value,
            severity: &r.severity,
            state: &r.state,
            control_surface: &r.control_surface,
        }
    }
}
