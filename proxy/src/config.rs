//! `llmtap.toml`: the raw config (`Config`), `LLMTAP_*` environment overrides for every
//! key, and validation into `ValidatedConfig`. Precedence: defaults < file < environment <
//! command-line flags. Errors name the key, the value and why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use llmtap_ingest::capture::{CaptureConfig, CapturePolicy};
use llmtap_ingest::log::LogConfig;
use llmtap_ingest::pricing::PriceTable;
use llmtap_ingest::sink::clickhouse::{ClickHouseConfig, ValidatedClickHouse};
use serde::{Deserialize, Serialize};

use crate::route::{RouteConfig, RouteTable};

/// The whole file. Every field has a default, so an empty file (or none) is valid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Proxy listener (`LLMTAP_LISTEN`, `--listen`).
    pub listen: String,
    /// Admin listener: health, metrics, feedback (`LLMTAP_ADMIN_LISTEN`, `--admin-listen`).
    pub admin_listen: String,
    /// Local data directory: `traces/`, `scores/`, … (`LLMTAP_DATA_DIR`, `--data-dir`).
    pub data_dir: PathBuf,
    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    pub shutdown_grace_secs: u64,
    /// Threads serving the proxy listener, each with its own upstream pool; 0 = one per CPU.
    pub workers: usize,
    /// Log filter when `RUST_LOG` is unset (tracing `EnvFilter` syntax).
    pub log_level: String,
    pub client: ClientConfig,
    pub capture: CaptureConfig,
    pub log: LogConfig,
    pub pricing: PricingConfig,
    pub clickhouse: ClickHouseConfig,
    pub metrics: MetricsConfig,
    pub otlp: llmtap_ingest::export::otlp::OtlpConfig,
    pub scorer: llmtap_scorer::ScorerConfig,
    pub feedback: crate::feedback::FeedbackConfig,
    /// Drift detection; with no section every signal is watched with the defaults.
    pub drift: llmtap_scorer::drift::DriftConfig,
    /// What each app is for; budgets and safety rules become rule judges.
    #[serde(rename = "intent")]
    pub intents: Vec<llmtap_scorer::IntentConfig>,
    /// Judges applied to sampled calls.
    #[serde(rename = "judge")]
    pub judges: Vec<llmtap_scorer::JudgeConfig>,
    /// Extra routes, or overrides of the built-in ones by name.
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// Folder of the config file; relative paths in it (JSON schemas) resolve from here.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9464".into(),
            data_dir: PathBuf::from("./llmtap-data"),
            shutdown_grace_secs: 30,
            workers: 0,
            log_level: "info".into(),
            client: ClientConfig::default(),
            capture: CaptureConfig::default(),
            log: LogConfig::default(),
            pricing: PricingConfig::default(),
            clickhouse: ClickHouseConfig::default(),
            metrics: MetricsConfig::default(),
            otlp: Default::default(),
            scorer: Default::default(),
            drift: Default::default(),
            feedback: Default::default(),
            intents: Vec::new(),
            judges: Vec::new(),
            routes: Vec::new(),
            base_dir: PathBuf::from("."),
        }
    }
}

/// `[client]`: how llmtap talks to upstreams.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// TCP + TLS connect timeout.
    pub connect_timeout_ms: u64,
    /// From sending the request to the upstream's response head; past it the client gets 504.
    pub first_byte_timeout_ms: u64,
    /// Longest silence between two response body frames; past it the call is cut and
    /// recorded as `upstream_timeout`.
    pub idle_timeout_ms: u64,
    /// How long an unused pooled connection is kept.
    pub pool_idle_timeout_secs: u64,
    /// Pooled idle connections kept per upstream host.
    pub pool_max_idle_per_host: usize,
    /// PEM file of extra CA certificates trusted besides the webpki roots ("" for none).
    pub extra_ca_file: String,
    /// Offer HTTP/2 to TLS upstreams through ALPN.
    pub http2: bool,
    /// Request bodies larger than this get 413 (bytes).
    pub max_request_body_bytes: usize,
    /// Add `stream_options.include_usage` to OpenAI chat streams that lack it, and hide
    /// what that adds from the client, so every stream has reported usage.
    pub inject_stream_usage: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout_ms: 10_000,
            first_byte_timeout_ms: 600_000,
            idle_timeout_ms: 300_000,
            pool_idle_timeout_secs: 90,
            pool_max_idle_per_host: 256,
            extra_ca_file: String::new(),
            http2: true,
            max_request_body_bytes: 32 * 1024 * 1024,
            inject_stream_usage: true,
        }
    }
}

/// `[metrics]`: the Prometheus exposition on the admin port (`/metrics`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Distinct models that get their own label value; later ones are counted as `other`,
    /// so a client cannot explode the label's cardinality.
    pub max_models: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { max_models: 50 }
    }
}

/// `[pricing]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PricingConfig {
    /// Price file (LiteLLM `model_prices_and_context_window.json` or llmtap's format) whose
    /// entries override the embedded table (`LLMTAP_PRICING_FILE`; "" for none).
    pub file: String,
}

/// A config problem: which key, which value, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{key} = {value}: {reason}")]
    Invalid { key: String, value: String, reason: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), value: value.to_string(), reason: reason.into() }
    }
}

/// Command-line values that win over file and environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// The config as `check` prints it: secrets masked.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if !c.clickhouse.password.is_empty() {
            c.clickhouse.password = "********".into();
        }
        if !c.feedback.token.is_empty() {
            c.feedback.token = "********".into();
        }
        c
    }

    /// Reads the file (if any), applies `LLMTAP_*` variables from `env`, then flags.
    pub fn load(path: Option<&Path>, env: &[(String, String)], flags: &Overrides) -> Result<Config, ConfigError> {
        let (mut value, source) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.display().to_string(), source })?;
                let v: toml::Table = toml::from_str(&text)
                    .map_err(|e| ConfigError::Syntax { path: p.display().to_string(), message: e.to_string() })?;
                (v, p.display().to_string())
            }
            None => (toml::Table::new(), "<defaults>".to_owned()),
        };
        apply_env(&mut value, env)?;
        let de = toml::Value::Table(value);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Syntax { path: source.clone(), message: format!("{key}: {}", e.inner()) }
        })?;
        if let Some(dir) = path.and_then(Path::parent).filter(|d| !d.as_os_str().is_empty()) {
            cfg.base_dir = dir.to_path_buf();
        }
        if let Some(v) = &flags.listen {
            cfg.listen = v.clone();
        }
        if let Some(v) = &flags.admin_listen {
            cfg.admin_listen = v.clone();
        }
        if let Some(v) = &flags.data_dir {
            cfg.data_dir = v.clone();
        }
        Ok(cfg)
    }

    /// Checks every value; the first problem found is returned with its key.
    pub fn validate(&self, env: &[(String, String)]) -> Result<ValidatedConfig, ConfigError> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            ConfigError::invalid("listen", format!("{:?}", self.listen), "not a socket address (host:port)")
        })?;
        let admin_listen: SocketAddr = self.admin_listen.parse().map_err(|_| {
            ConfigError::invalid("admin_listen", format!("{:?}", self.admin_listen), "not a socket address (host:port)")
        })?;
        if admin_listen == listen && listen.port() != 0 {
            return Err(ConfigError::invalid(
                "admin_listen",
                format!("{:?}", self.admin_listen),
                "must differ from listen",
            ));
        }
        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n if n > 1024 => {
                return Err(ConfigError::invalid("workers", n.to_string(), "must be at most 1024 (0 = one per CPU)"))
            }
            n => n,
        };
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("data_dir", "\"\"", "must not be empty"));
        }
        let c = &self.client;
        for (key, v) in [
            ("client.connect_timeout_ms", c.connect_timeout_ms),
            ("client.first_byte_timeout_ms", c.first_byte_timeout_ms),
            ("client.idle_timeout_ms", c.idle_timeout_ms),
            ("log.segment_max_bytes", self.log.segment_max_bytes),
            ("log.segment_max_age_secs", self.log.segment_max_age_secs),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(key, v, "must be greater than 0"));
            }
        }
        if c.max_request_body_bytes == 0 {
            return Err(ConfigError::invalid("client.max_request_body_bytes", 0, "must be greater than 0"));
        }
        if self.log.channel_capacity == 0 {
            return Err(ConfigError::invalid("log.channel_capacity", 0, "must be greater than 0"));
        }
        if !c.extra_ca_file.is_empty() && !Path::new(&c.extra_ca_file).is_file() {
            return Err(ConfigError::invalid(
                "client.extra_ca_file",
                format!("{:?}", c.extra_ca_file),
                "file not found",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(ConfigError::invalid("log_level", format!("{:?}", self.log_level), "not a valid log filter"));
        }
        let capture = self.capture.validate().map_err(|e| {
            let (key, value) = match &e {
                llmtap_ingest::capture::CaptureError::Redact { index, pattern, .. } => {
                    (format!("capture.redact[{index}]"), format!("{pattern:?}"))
                }
                llmtap_ingest::capture::CaptureError::InlineDataMin { value } => {
                    ("capture.inline_data_min_bytes".to_owned(), value.to_string())
                }
            };
            let reason = match &e {
                llmtap_ingest::capture::CaptureError::Redact { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            ConfigError::Invalid { key, value, reason }
        })?;
        let pricing_path = (!self.pricing.file.is_empty()).then(|| PathBuf::from(&self.pricing.file));
        let prices = PriceTable::load(pricing_path.as_deref())
            .map_err(|e| ConfigError::invalid("pricing.file", format!("{:?}", self.pricing.file), e.to_string()))?;
        let routes = RouteTable::build(&self.routes, env, c.inject_stream_usage)?;
        let otel_env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")).collect();
        let otlp = self.otlp.resolve(&otel_env).map_err(|e| match e {
            llmtap_ingest::export::otlp::OtlpError::Config { key, value, reason } => ConfigError::Invalid {
                key: format!("otlp.{key}"),
                value: format!("{value:?}"),
                reason: reason.to_owned(),
            },
            other => ConfigError::invalid("otlp", "", other.to_string()),
        })?;
        let route_url = |name: &str| {
            let r = routes.routes().iter().find(|r| r.name == name)?;
            Some(if r.adapter != llmtap_ingest::provider::ProviderKind::OpenAi || r.azure {
                Err(format!("route {name:?} is not an OpenAI-compatible chat endpoint; judges need one"))
            } else {
                Ok(format!("{}://{}{}", r.upstream.scheme, r.upstream.authority, r.upstream.base_path))
            })
        };
        let var = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).or_else(|| std::env::var(k).ok());
        let judge_env = llmtap_scorer::config::JudgeEnv { base: &self.base_dir, route_url: &route_url, var: &var };
        let judges = llmtap_scorer::ValidatedJudges::build(&self.judges, &self.intents, &judge_env).map_err(|e| {
            ConfigError::Invalid {
                key: format!("{} {:?}: {}", e.what, e.name, e.key),
                value: e.value,
                reason: e.reason,
            }
        })?;
        self.drift.validate().map_err(|(key, value, reason)| ConfigError::Invalid { key, value, reason })?;
        if self.drift.enabled && self.drift.source == "clickhouse" && self.clickhouse.url.is_empty() {
            return Err(ConfigError::invalid(
                "drift.source",
                "\"clickhouse\"",
                "the clickhouse source reads the fleet's rows: set clickhouse.url".to_owned(),
            ));
        }
        let clickhouse = self.clickhouse.validate().map_err(|e| ConfigError::Invalid {
            key: format!("clickhouse.{}", e.key),
            value: e.value.clone(),
            reason: e.reason.to_owned(),
        })?;
        Ok(ValidatedConfig {
            raw: self.clone(),
            listen,
            admin_listen,
            capture,
            prices: Arc::new(prices),
            routes: Arc::new(routes),
            clickhouse,
            otlp,
            judges: Arc::new(judges),
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            first_byte_timeout: Duration::from_millis(c.first_byte_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            workers,
        })
    }
}

/// Checked config, ready to run.
#[derive(Debug)]
pub struct ValidatedConfig {
    pub raw: Config,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub capture: CapturePolicy,
    pub prices: Arc<PriceTable>,
    pub routes: Arc<RouteTable>,
    /// `None` when no ClickHouse URL is set.
    pub clickhouse: Option<ValidatedClickHouse>,
    /// `None` when no OTLP endpoint is configured here or in `OTEL_EXPORTER_OTLP_*`.
    pub otlp: Option<llmtap_ingest::export::otlp::ResolvedOtlp>,
    /// Rule judges (from `[[judge]]` and `[[intent]]`) and LLM judges.
    pub judges: Arc<llmtap_scorer::ValidatedJudges>,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// `workers` resolved: at least 1.
    pub workers: usize,
}

/// Applies `LLMTAP_<SECTION>_<KEY>` variables. The variable names come from the keys of the
/// default config, so every key has one; values are parsed as the key's type. Lists take
/// a JSON array (`["a","b"]`) or comma-separated text.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    let Ok(toml::Value::Table(defaults)) = toml::Value::try_from(Config::default()) else {
        return Ok(());
    };
    let mut leaves = Vec::new();
    collect_leaves(&defaults, &mut Vec::new(), &mut leaves);
    for (path, template) in leaves {
        let var = format!("LLMTAP_{}", path.join("_").to_ascii_uppercase());
        let Some((_, raw)) = env.iter().find(|(k, _)| *k == var) else { continue };
        let value = parse_env_value(&var, raw, &template)?;
        let mut t = &mut *table;
        for seg in &path[..path.len() - 1] {
            let entry = t.entry(seg.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(next) = entry else {
                return Err(ConfigError::invalid(
                    path[..path.len() - 1].join("."),
                    entry.to_string(),
                    "must be a table",
                ));
            };
            t = next;
        }
        if let Some(last) = path.last() {
            t.insert(last.clone(), value);
        }
    }
    Ok(())
}

fn collect_leaves(t: &toml::Table, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, toml::Value)>) {
    for (k, v) in t {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(inner) => collect_leaves(inner, prefix, out),
            // Arrays of tables (routes) are configured in the file, not by variables.
            toml::Value::Array(a) if a.iter().any(|x| x.is_table()) || k == "route" => {}
            other => out.push((prefix.clone(), other.clone())),
        }
        prefix.pop();
    }
}

fn parse_env_value(var: &str, raw: &str, template: &toml::Value) -> Result<toml::Value, ConfigError> {
    let bad = |what: &str| ConfigError::invalid(var, format!("{raw:?}"), format!("expected {what}"));
    Ok(match template {
        toml::Value::Integer(_) => toml::Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?),
        toml::Value::Float(_) => toml::Value::Float(raw.trim().parse().map_err(|_| bad("a number"))?),
        toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(bad("true or false")),
        }),
        toml::Value::Array(_) => {
            let items: Vec<String> = if raw.trim_start().starts_with('[') {
                serde_json::from_str(raw).map_err(|_| bad("a JSON array of strings"))?
            } else if raw.trim().is_empty() {
                Vec::new()
            } else {
                raw.split(',').map(|s| s.trim().to_owned()).collect()
            };
            toml::Value::Array(items.into_iter().map(toml::Value::String).collect())
        }
        _ => toml::Value::String(raw.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_validate() {
        let cfg = Config::load(None, &[], &Overrides::default()).unwrap();
        let v = cfg.validate(&[]).unwrap();
        assert_eq!(v.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(v.admin_listen.to_string(), "127.0.0.1:9464");
    }

    #[test]
    fn env_overrides_every_kind_of_key() {
        let e = env(&[
            ("LLMTAP_LISTEN", "0.0.0.0:9000"),
            ("LLMTAP_CLIENT_CONNECT_TIMEOUT_MS", "250"),
            ("LLMTAP_CAPTURE_BODIES", "none"),
            ("LLMTAP_CAPTURE_REDACT", r#"["\\d{3,4}","x"]"#),
            ("LLMTAP_CLIENT_INJECT_STREAM_USAGE", "false"),
            ("LLMTAP_PRICING_FILE", ""),
        ]);
        let cfg = Config::load(None, &e, &Overrides::default()).unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:9000");
        assert_eq!(cfg.client.connect_timeout_ms, 250);
        assert_eq!(cfg.capture.bodies, llmtap_ingest::capture::BodyCapture::None);
        assert_eq!(cfg.capture.redact, vec![r"\d{3,4}".to_owned(), "x".to_owned()]);
        assert!(!cfg.client.inject_stream_usage);
        // Flags beat the environment.
        let flags = Overrides { listen: Some("127.0.0.1:1".into()), ..Overrides::default() };
        assert_eq!(Config::load(None, &e, &flags).unwrap().listen, "127.0.0.1:1");
    }

    #[test]
    fn errors_name_key_value_and_reason() {
        let e = env(&[("LLMTAP_CLIENT_CONNECT_TIMEOUT_MS", "soon")]);
        let err = Config::load(None, &e, &Overrides::default()).unwrap_err().to_string();
        assert_eq!(err, "LLMTAP_CLIENT_CONNECT_TIMEOUT_MS = \"soon\": expected an integer");

        let cfg = Config { listen: "localhost".into(), ..Config::default() };
        assert_eq!(
            cfg.validate(&[]).unwrap_err().to_string(),
            "listen = \"localhost\": not a socket address (host:port)"
        );

        let cfg = Config { workers: 5000, ..Config::default() };
        assert_eq!(
            cfg.validate(&[]).unwrap_err().to_string(),
            "workers = 5000: must be at most 1024 (0 = one per CPU)"
        );
        let cfg = Config { workers: 0, ..Config::default() };
        assert_eq!(cfg.validate(&[]).unwrap().workers, std::thread::available_parallelism().map_or(1, usize::from));

        let cfg = Config {
            clickhouse: ClickHouseConfig { url: "ch:8123".into(), ..Default::default() },
            ..Config::default()
        };
        assert_eq!(
            cfg.validate(&[]).unwrap_err().to_string(),
            "clickhouse.url = \"ch:8123\": expected http://host:port or https://host:port"
        );

        let mut cfg = Config::default();
        cfg.capture.redact = vec!["(".into()];
        let err = cfg.validate(&[]).unwrap_err().to_string();
        assert!(err.starts_with("capture.redact[0] = \"(\": regex parse error"), "{err}");
    }

    #[test]
    fn file_type_errors_name_the_key_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("llmtap.toml");
        std::fs::write(&p, "[client]\nconnect_timeout_ms = \"ten\"\n").unwrap();
        let err = Config::load(Some(&p), &[], &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("client.connect_timeout_ms: invalid type: string \"ten\", expected u64"), "{err}");
        std::fs::write(&p, "[client]\nconect_timeout_ms = 5\n").unwrap();
        let err = Config::load(Some(&p), &[], &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("unknown field `conect_timeout_ms`"), "{err}");
    }
}
