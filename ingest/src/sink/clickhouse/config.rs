//! `[clickhouse]` in `llmtap.toml`: where and how records are shipped. Empty `url` turns
//! the sink off (the local log alone is the store).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Raw `[clickhouse]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP(S) URL of ClickHouse, e.g. `http://clickhouse:8123` (`LLMTAP_CLICKHOUSE_URL`);
    /// empty: local log only.
    pub url: String,
    pub user: String,
    /// `LLMTAP_CLICKHOUSE_PASSWORD`; never printed by `llmtap check`.
    pub password: String,
    pub database: String,
    /// With a cluster name the schema is created `ON CLUSTER` with Replicated engines and
    /// Distributed tables.
    pub cluster: String,
    /// Rows older than this are dropped by ClickHouse TTL.
    pub ttl_days: u32,
    /// `request_body` and `output_text` are cleared after this many days.
    pub body_ttl_days: u32,
    /// Retention of the per-minute rollup.
    pub rollup_ttl_days: u32,
    /// Apply pending migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// A batch is sent at this many rows…
    pub batch_max_rows: usize,
    /// …or this many bytes of NDJSON…
    pub batch_max_bytes: usize,
    /// …or when its oldest row has waited this long.
    pub batch_max_age_ms: u64,
    /// How often the shipper looks for new lines.
    pub poll_interval_ms: u64,
    /// Backoff between retries while ClickHouse is down (doubles, with jitter, up to the max).
    pub retry_initial_backoff_ms: u64,
    pub retry_max_backoff_ms: u64,
    /// Timeout of one insert or query.
    pub request_timeout_ms: u64,
    /// Keep shipped segments on disk instead of deleting them.
    pub keep_local: bool,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: String::new(),
            user: "default".into(),
            password: String::new(),
            database: "default".into(),
            cluster: String::new(),
            ttl_days: 90,
            body_ttl_days: 30,
            rollup_ttl_days: 400,
            migrate_on_start: true,
            batch_max_rows: 10_000,
            batch_max_bytes: 8 * 1024 * 1024,
            batch_max_age_ms: 1000,
            poll_interval_ms: 200,
            retry_initial_backoff_ms: 200,
            retry_max_backoff_ms: 30_000,
            request_timeout_ms: 30_000,
            keep_local: false,
        }
    }
}

/// A `[clickhouse]` value that cannot work: the key, the value, and why.
#[derive(Debug, thiserror::Error)]
#[error("clickhouse.{key} = {value}: {reason}")]
pub struct ClickHouseConfigError {
    pub key: &'static str,
    pub value: String,
    pub reason: &'static str,
}

/// Checked settings.
#[derive(Clone, Debug)]
pub struct ValidatedClickHouse {
    pub url: String,
    pub user: String,
    pub password: String,
    pub database: String,
    pub cluster: Option<String>,
    pub ttl_days: u32,
    pub body_ttl_days: u32,
    pub rollup_ttl_days: u32,
    pub migrate_on_start: bool,
    pub batch_max_rows: usize,
    pub batch_max_bytes: usize,
    pub batch_max_age: Duration,
    pub poll_interval: Duration,
    pub retry_initial_backoff: Duration,
    pub retry_max_backoff: Duration,
    pub request_timeout: Duration,
    pub keep_local: bool,
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

impl ClickHouseConfig {
    /// `Ok(None)` when the sink is off (empty URL).
    pub fn validate(&self) -> Result<Option<ValidatedClickHouse>, ClickHouseConfigError> {
        if self.url.is_empty() {
            return Ok(None);
        }
        let err = |key, value: String, reason| Err(ClickHouseConfigError { key, value, reason });
        let uri: http::Uri = match self.url.parse() {
            Ok(u) => u,
            Err(_) => return err("url", format!("{:?}", self.url), "not a URL"),
        };
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return err("url", format!("{:?}", self.url), "expected http://host:port or https://host:port");
        }
        if !is_identifier(&self.database) {
            return err("database", format!("{:?}", self.database), "must be a plain identifier (letters, digits, _)");
        }
        if !self.cluster.is_empty() && !is_identifier(&self.cluster) {
            return err("cluster", format!("{:?}", self.cluster), "must be a plain identifier (letters, digits, _)");
        }
        for (key, v) in [
            ("ttl_days", self.ttl_days),
            ("body_ttl_days", self.body_ttl_days),
            ("rollup_ttl_days", self.rollup_ttl_days),
        ] {
            if v == 0 {
                return err(key, "0".into(), "must be at least 1");
            }
        }
        if self.body_ttl_days > self.ttl_days {
            return err("body_ttl_days", self.body_ttl_days.to_string(), "must not exceed ttl_days");
        }
        if self.batch_max_rows == 0 {
            return err("batch_max_rows", "0".into(), "must be at least 1");
        }
        if self.batch_max_bytes < 1024 {
            return err("batch_max_bytes", self.batch_max_bytes.to_string(), "must be at least 1024");
        }
        for (key, v) in [
            ("batch_max_age_ms", self.batch_max_age_ms),
            ("poll_interval_ms", self.poll_interval_ms),
            ("retry_initial_backoff_ms", self.retry_initial_backoff_ms),
            ("request_timeout_ms", self.request_timeout_ms),
        ] {
            if v == 0 {
                return err(key, "0".into(), "must be greater than 0");
            }
        }
        if self.retry_max_backoff_ms < self.retry_initial_backoff_ms {
            return err(
                "retry_max_backoff_ms",
                self.retry_max_backoff_ms.to_string(),
                "must be at least retry_initial_backoff_ms",
            );
        }
        Ok(Some(ValidatedClickHouse {
            url: self.url.trim_end_matches('/').to_owned(),
            user: self.user.clone(),
            password: self.password.clone(),
            database: self.database.clone(),
            cluster: (!self.cluster.is_empty()).then(|| self.cluster.clone()),
            ttl_days: self.ttl_days,
            body_ttl_days: self.body_ttl_days,
            rollup_ttl_days: self.rollup_ttl_days,
            migrate_on_start: self.migrate_on_start,
            batch_max_rows: self.batch_max_rows,
            batch_max_bytes: self.batch_max_bytes,
            batch_max_age: Duration::from_millis(self.batch_max_age_ms),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            retry_initial_backoff: Duration::from_millis(self.retry_initial_backoff_ms),
            retry_max_backoff: Duration::from_millis(self.retry_max_backoff_ms),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            keep_local: self.keep_local,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_url_is_off_and_bad_values_name_the_key() {
        assert!(ClickHouseConfig::default().validate().unwrap().is_none());
        let c = ClickHouseConfig { url: "clickhouse:8123".into(), ..Default::default() };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "clickhouse.url = \"clickhouse:8123\": expected http://host:port or https://host:port"
        );
        let c = ClickHouseConfig { url: "http://ch:8123".into(), database: "my-db".into(), ..Default::default() };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "clickhouse.database = \"my-db\": must be a plain identifier (letters, digits, _)"
        );
        let c = ClickHouseConfig { url: "http://ch:8123/".into(), ..Default::default() };
        assert_eq!(c.validate().unwrap().unwrap().url, "http://ch:8123");
    }
}
