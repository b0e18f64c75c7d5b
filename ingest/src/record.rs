//! The record kinds, with exactly the ClickHouse column names: `llm_traces` (one per LLM
//! call), `llm_scores`, `llm_feedback` and `llm_drift_events`. Each is one NDJSON line in
//! its folder of the local log; this module does no I/O.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Why a call did not succeed; `None` serialises as `''`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    #[default]
    #[serde(rename = "")]
    None,
    UpstreamConnect,
    UpstreamTimeout,
    UpstreamReset,
    ClientDisconnect,
    HttpError,
    ParseError,
    BodyTooLarge,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::None => "",
            ErrorKind::UpstreamConnect => "upstream_connect",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::ClientDisconnect => "client_disconnect",
            ErrorKind::HttpError => "http_error",
            ErrorKind::ParseError => "parse_error",
            ErrorKind::BodyTooLarge => "body_too_large",
        }
    }
}

/// Where the token counts came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    Reported,
    Estimated,
    #[default]
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
        }
    }
}

/// The API operation, from the request path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Chat,
    Responses,
    Messages,
    Embeddings,
    GenerateContent,
    Completions,
    #[default]
    Other,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Chat => "chat",
            Operation::Responses => "responses",
            Operation::Messages => "messages",
            Operation::Embeddings => "embeddings",
            Operation::GenerateContent => "generate_content",
            Operation::Completions => "completions",
            Operation::Other => "other",
        }
    }
}

/// One row of `llm_traces`. Field names are the ClickHouse column names; `ts` is
/// `YYYY-MM-DD hh:mm:ss.fff` UTC so a log segment loads with `FORMAT JSONEachRow`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TraceRecord {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub ts: Timestamp,
    pub app: String,
    pub route: String,
    pub provider: String,
    pub operation: Operation,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub error_kind: ErrorKind,
    pub streamed: bool,
    pub request_model: String,
    pub response_model: String,
    pub response_id: String,
    pub finish_reason: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub reasoning_tokens: u64,
    pub usage_source: UsageSource,
    pub cost_usd: f64,
    pub duration_ms: f64,
    pub ttft_ms: f64,
    pub upstream_ms: f64,
    pub overhead_us: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub tool_calls: Vec<String>,
    pub tool_call_args: Vec<String>,
    pub tools_offered: Vec<String>,
    pub user_id: String,
    pub session_id: String,
    pub tags: BTreeMap<String, String>,
    pub request_body: String,
    pub output_text: String,
    pub sampled: bool,
}

impl TraceRecord {
    /// The tool path as one string (`a → b → c`), the unit `stats` groups by.
    pub fn tool_path(&self) -> String {
        self.tool_calls.join(" → ")
    }

    /// The model a call is priced and grouped under: what answered, else what was asked for.
    pub fn model(&self) -> &str {
        if self.response_model.is_empty() {
            &self.request_model
        } else {
            &self.response_model
        }
    }
}

/// `DateTime64(3, 'UTC')` text form used by every record kind.
pub mod ts_format {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};
    use time::macros::format_description;
    use time::{OffsetDateTime, PrimitiveDateTime};

    const FORMAT: &[time::format_description::FormatItem<'static>] =
        format_description!("[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]");

    /// Formats a time as `YYYY-MM-DD hh:mm:ss.fff` UTC.
    pub fn format(ts: SystemTime) -> String {
        let odt = OffsetDateTime::from(ts);
        odt.format(FORMAT).unwrap_or_default()
    }

    /// Parses `YYYY-MM-DD hh:mm:ss.fff` (UTC).
    pub fn parse(s: &str) -> Option<SystemTime> {
        let pdt = PrimitiveDateTime::parse(s, FORMAT).ok()?;
        let odt = pdt.assume_utc();
        let nanos = odt.unix_timestamp_nanos();
        if nanos < 0 {
            return None;
        }
        Some(UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).ok()?))
    }

    pub fn serialize<S: Serializer>(ts: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*ts))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| serde::de::Error::custom(format!("invalid timestamp {s:?}")))
    }
}

/// One row of `llm_scores`: a judge's verdict on one call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScoreRecord {
    pub ts: Timestamp,
    pub trace_id: String,
    /// The judged call within the trace (calls sharing a `traceparent` share a trace id).
    pub span_id: String,
    pub judge: String,
    pub judge_version: String,
    /// `rule` or `llm`.
    pub judge_kind: String,
    pub app: String,
    pub route: String,
    pub request_model: String,
    pub score: f64,
    pub passed: u8,
    pub label: String,
    pub reasoning: String,
    pub needs_review: u8,
    /// `''` when a verdict was produced.
    pub error: String,
    pub judge_model: String,
    pub judge_ms: f64,
    pub judge_cost_usd: f64,
}

/// One row of `llm_feedback`: a human signal about one call.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FeedbackRecord {
    pub ts: Timestamp,
    pub trace_id: String,
    pub name: String,
    pub value: f64,
    pub label: String,
    pub comment: String,
    pub correction: String,
    pub annotator: String,
}

/// One row of `llm_drift_events`: a drift detector changed state for one key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriftEventRecord {
    pub ts: Timestamp,
    pub signal: String,
    pub app: String,
    pub route: String,
    pub model: String,
    /// `''` when not a judge signal.
    pub judge: String,
    pub method: String,
    pub statistic: f64,
    pub threshold: f64,
    pub baseline_n: u64,
    pub current_n: u64,
    pub baseline_value: f64,
    pub current_value: f64,
    /// `warning` or `critical`.
    pub severity: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// `model`, `prompt` or `intent_judge`.
    pub control_surface: String,
}

/// A wall-clock instant stored as `DateTime64(3, 'UTC')` text; defaults to the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(#[serde(with = "ts_format")] pub SystemTime);

impl Default for Timestamp {
    fn default() -> Self {
        Timestamp(std::time::UNIX_EPOCH)
    }
}

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn ts_round_trips_with_millisecond_precision() {
        let t = UNIX_EPOCH + Duration::from_millis(1_732_630_000_123);
        let s = ts_format::format(t);
        assert_eq!(s, "2024-11-26 14:06:40.123");
        assert_eq!(ts_format::parse(&s), Some(t));
    }

    #[test]
    fn record_serialises_with_column_names_and_empty_error_kind() {
        let rec = TraceRecord {
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            ts: Timestamp(UNIX_EPOCH),
            operation: Operation::Chat,
            tool_calls: vec!["a".into(), "b".into()],
            ..TraceRecord::default()
        };
        let v: serde_json::Value = serde_json::to_value(&rec).unwrap_or_default();
        assert_eq!(v["error_kind"], "");
        assert_eq!(v["operation"], "chat");
        assert_eq!(v["usage_source"], "none");
        assert_eq!(v["ts"], "1970-01-01 00:00:00.000");
        assert_eq!(v["tool_calls"], serde_json::json!(["a", "b"]));
        let back: TraceRecord = serde_json::from_value(v).unwrap_or_default();
        assert_eq!(back, rec);
        assert_eq!(rec.tool_path(), "a → b");
    }
}
