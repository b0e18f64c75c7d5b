//! Prometheus metrics in the text exposition format (0.0.4, what `promtool` and every
//! Prometheus server read). Per-call metrics are fed by a recorder observer; counters kept
//! elsewhere (recorder, shipper, OTLP exporter) are mirrored at scrape time. Labels come
//! only from bounded sets: route, provider, status class, error kind, token type, and the
//! model, capped at `max_models` distinct values (later ones are reported as `other`).

/// The `prometheus` crate, for collectors registered from other crates.
pub use prometheus as prom;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::record::{ErrorKind, TraceRecord};
use crate::recorder::{ObservedMeta, RecordObserver, RecorderStats};
use crate::sink::clickhouse::ShipperStats;

/// `gen_ai.client.operation.duration` boundaries (seconds), shared by duration and TTFT.
pub const DURATION_BUCKETS: [f64; 14] =
    [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];
/// Time llmtap itself spends on a call (seconds).
pub const OVERHEAD_BUCKETS: [f64; 10] =
    [0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01];

/// Counters kept outside this module that `/metrics` reports.
#[derive(Default, Clone)]
pub struct Sources {
    pub recorder: Option<Arc<RecorderStats>>,
    pub shipper: Option<Arc<ShipperStats>>,
    pub prices: Option<Arc<crate::pricing::PriceTable>>,
    pub otlp: Option<Arc<crate::export::OtlpStats>>,
    /// `<data-dir>/traces`, measured for bytes on disk.
    pub trace_dir: Option<PathBuf>,
}

/// A counter mirrored from an atomic that only grows.
struct Mirror {
    counter: IntCounter,
    seen: AtomicU64,
}

impl Mirror {
    fn new(registry: &Registry, name: &str, help: &str) -> prometheus::Result<Self> {
        let counter = IntCounter::new(name, help)?;
        registry.register(Box::new(counter.clone()))?;
        Ok(Mirror { counter, seen: AtomicU64::new(0) })
    }

    fn set(&self, now: u64) {
        let before = self.seen.swap(now, Ordering::Relaxed);
        if now > before {
            self.counter.inc_by(now - before);
        }
    }
}

/// The registry and every llmtap metric.
pub struct LlmMetrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    ttft: HistogramVec,
    tokens: IntCounterVec,
    cost: CounterVec,
    errors: IntCounterVec,
    overhead: HistogramVec,
    models: Mutex<HashSet<String>>,
    max_models: usize,
    sources: Mutex<Sources>,
    queue_depth: IntGauge,
    disk_bytes: IntGauge,
    written: Mirror,
    dropped: Mirror,
    pieces_refused: Mirror,
    write_errors: Mirror,
    unknown_models: Mirror,
    ch_lag: prometheus::Gauge,
    ch_bytes_behind: IntGauge,
    ch_up: IntGauge,
    ch_shipped: Mirror,
    ch_quarantined: Mirror,
    ch_dropped: Mirror,
    ch_retries: Mirror,
    otlp_exported: Mirror,
    otlp_dropped: Mirror,
}

impl std::fmt::Debug for LlmMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmMetrics").field("max_models", &self.max_models).finish_non_exhaustive()
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

impl LlmMetrics {
    /// Builds every metric. `max_models` bounds the model label.
    pub fn new(max_models: usize) -> prometheus::Result<Arc<Self>> {
        let registry = Registry::new();
        let call = ["route", "provider", "model"];
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                registry.register(Box::new(m.clone()))?;
                m
            }};
        }
        let requests = reg!(IntCounterVec::new(
            Opts::new("llmtap_requests_total", "LLM calls by route, provider, model and status class."),
            &["route", "provider", "model", "status_class"]
        )?);
        let duration = reg!(HistogramVec::new(
            HistogramOpts::new("llmtap_request_duration_seconds", "Request received to last byte sent.")
                .buckets(DURATION_BUCKETS.to_vec()),
            &call
        )?);
        let ttft = reg!(HistogramVec::new(
            HistogramOpts::new(
                "llmtap_time_to_first_token_seconds",
                "Request received to the first content or tool-call token forwarded."
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &call
        )?);
        let tokens = reg!(IntCounterVec::new(
            Opts::new("llmtap_tokens_total", "Tokens by type (input, output, cache_read, cache_write, reasoning); cache and reasoning tokens are parts of input and output."),
            &["route", "provider", "model", "type"]
        )?);
        let cost = reg!(CounterVec::new(
            Opts::new("llmtap_cost_usd_total", "Cost in US dollars from the price table."),
            &call
        )?);
        let errors = reg!(IntCounterVec::new(
            Opts::new(
                "llmtap_errors_total",
                "Failed calls by error kind (upstream_connect, upstream_timeout, http_error, ...)."
            ),
            &["route", "provider", "kind"]
        )?);
        let overhead = reg!(HistogramVec::new(
            HistogramOpts::new(
                "llmtap_overhead_seconds",
                "Time spent inside llmtap per call, waiting on neither peer."
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
            &["route"]
        )?);
        let queue_depth =
            reg!(IntGauge::new("llmtap_trace_log_queue_depth", "Records waiting for the trace-log writer.")?);
        let disk_bytes = reg!(IntGauge::new("llmtap_trace_log_disk_bytes", "Bytes of trace-log segments on disk.")?);
        let ch_lag = reg!(prometheus::Gauge::new(
            "llmtap_clickhouse_lag_seconds",
            "Age of the oldest record not yet in ClickHouse."
        )?);
        let ch_bytes_behind =
            reg!(IntGauge::new("llmtap_clickhouse_backlog_bytes", "Local-log bytes not yet in ClickHouse.")?);
        let ch_up =
            reg!(IntGauge::new("llmtap_clickhouse_up", "1 while the last attempt to reach ClickHouse succeeded.")?);
        Ok(Arc::new(LlmMetrics {
            written: Mirror::new(
                &registry,
                "llmtap_trace_log_records_written_total",
                "Records written to the trace log.",
            )?,
            dropped: Mirror::new(
                &registry,
                "llmtap_trace_log_records_dropped_total",
                "Records dropped because the writer queue was full.",
            )?,
            pieces_refused: Mirror::new(
                &registry,
                "llmtap_trace_log_stream_pieces_refused_total",
                "Stream pieces the writer queue had no room for (parsed or held by the worker).",
            )?,
            write_errors: Mirror::new(
                &registry,
                "llmtap_trace_log_write_errors_total",
                "Records lost to trace-log write errors.",
            )?,
            unknown_models: Mirror::new(
                &registry,
                "llmtap_pricing_unknown_model_calls_total",
                "Calls priced at 0 because their model is not in the price table.",
            )?,
            ch_shipped: Mirror::new(
                &registry,
                "llmtap_clickhouse_rows_shipped_total",
                "Rows ClickHouse acknowledged.",
            )?,
            ch_quarantined: Mirror::new(
                &registry,
                "llmtap_clickhouse_rows_quarantined_total",
                "Rows ClickHouse rejected, kept in the quarantine folder.",
            )?,
            ch_dropped: Mirror::new(
                &registry,
                "llmtap_clickhouse_rows_dropped_total",
                "Unshipped rows deleted by the local log's disk cap.",
            )?,
            ch_retries: Mirror::new(
                &registry,
                "llmtap_clickhouse_insert_retries_total",
                "Insert attempts that failed and were retried.",
            )?,
            otlp_exported: Mirror::new(
                &registry,
                "llmtap_otlp_spans_exported_total",
                "Spans the OTLP collector accepted.",
            )?,
            otlp_dropped: Mirror::new(
                &registry,
                "llmtap_otlp_spans_dropped_total",
                "Spans dropped: exporter queue full or collector failing.",
            )?,
            registry,
            requests,
            duration,
            ttft,
            tokens,
            cost,
            errors,
            overhead,
            models: Mutex::new(HashSet::new()),
            max_models: max_models.max(1),
            sources: Mutex::new(Sources::default()),
            queue_depth,
            disk_bytes,
            ch_lag,
            ch_bytes_behind,
            ch_up,
        }))
    }

    /// Sets the counters `/metrics` mirrors (called once the components exist).
    pub fn set_sources(&self, s: Sources) {
        if let Ok(mut g) = self.sources.lock() {
            *g = s;
        }
    }

    /// The model label: the model itself while fewer than `max_models` were seen, then `other`.
    fn model_label(&self, model: &str) -> String {
        let Ok(mut seen) = self.models.lock() else { return "other".into() };
        if seen.contains(model) {
            return model.to_owned();
        }
        if seen.len() < self.max_models {
            seen.insert(model.to_owned());
            return model.to_owned();
        }
        "other".into()
    }

    /// Counts one finished call.
    pub fn record(&self, r: &TraceRecord) {
        let model = self.model_label(r.model());
        let call = [r.route.as_str(), r.provider.as_str(), model.as_str()];
        self.requests.with_label_values(&[call[0], call[1], call[2], status_class(r.status)]).inc();
        self.duration.with_label_values(&call).observe(r.duration_ms / 1000.0);
        if r.ttft_ms > 0.0 {
            self.ttft.with_label_values(&call).observe(r.ttft_ms / 1000.0);
        }
        for (ty, n) in [
            ("input", r.input_tokens),
            ("output", r.output_tokens),
            ("cache_read", r.cache_read_tokens),
            ("cache_write", r.cache_write_tokens),
            ("reasoning", r.reasoning_tokens),
        ] {
            if n > 0 {
                self.tokens.with_label_values(&[call[0], call[1], call[2], ty]).inc_by(n);
            }
        }
        if r.cost_usd > 0.0 {
            self.cost.with_label_values(&call).inc_by(r.cost_usd);
        }
        if r.error_kind != ErrorKind::None {
            self.errors.with_label_values(&[call[0], call[1], r.error_kind.as_str()]).inc();
        }
        self.overhead.with_label_values(&[call[0]]).observe(r.overhead_us as f64 / 1e6);
    }

    fn refresh(&self) {
        let Ok(s) = self.sources.lock().map(|s| s.clone()) else { return };
        if let Some(r) = &s.recorder {
            self.queue_depth.set(r.queued.load(Ordering::Relaxed) as i64);
            self.written.set(r.written.load(Ordering::Relaxed));
            self.dropped.set(r.dropped_full.load(Ordering::Relaxed));
            self.pieces_refused.set(r.pieces_refused.load(Ordering::Relaxed));
            self.write_errors.set(r.write_errors.load(Ordering::Relaxed));
        }
        if let Some(p) = &s.prices {
            self.unknown_models.set(p.unknown_model_calls());
        }
        if let Some(dir) = &s.trace_dir {
            let bytes: u64 = crate::log::list_segments(dir)
                .map(|segs| segs.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum())
                .unwrap_or(0);
            self.disk_bytes.set(bytes as i64);
        }
        if let Some(sh) = &s.shipper {
            self.ch_lag.set(sh.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0);
            self.ch_bytes_behind.set(sh.bytes_behind.load(Ordering::Relaxed) as i64);
            self.ch_up.set(i64::from(sh.unreachable.load(Ordering::Relaxed) == 0));
            self.ch_shipped.set(sh.rows_shipped.load(Ordering::Relaxed));
            self.ch_quarantined.set(sh.rows_quarantined.load(Ordering::Relaxed));
            self.ch_dropped.set(sh.rows_dropped.load(Ordering::Relaxed));
            self.ch_retries.set(sh.insert_retries.load(Ordering::Relaxed));
        }
        if let Some(o) = &s.otlp {
            self.otlp_exported.set(o.exported.load(Ordering::Relaxed));
            self.otlp_dropped.set(o.dropped.load(Ordering::Relaxed));
        }
    }

    /// The registry, for collectors of other parts (the scorer's, the drift detector's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The exposition text for `GET /metrics` (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        self.refresh();
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Content type of [`LlmMetrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Feeds finished calls into the metrics.
pub struct MetricsObserver(pub Arc<LlmMetrics>);

impl RecordObserver for MetricsObserver {
    fn observe(&mut self, record: &TraceRecord, _meta: &ObservedMeta) {
        self.0.record(record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_tokens_cost_and_errors_with_bounded_models() {
        let m = LlmMetrics::new(2).unwrap();
        let mk = |model: &str, status: u16, err: ErrorKind| TraceRecord {
            route: "openai".into(),
            provider: "openai".into(),
            request_model: model.into(),
            status,
            error_kind: err,
            duration_ms: 1500.0,
            ttft_ms: 200.0,
            input_tokens: 10,
            output_tokens: 4,
            cache_read_tokens: 3,
            cost_usd: 0.25,
            ..TraceRecord::default()
        };
        m.record(&mk("gpt-4o", 200, ErrorKind::None));
        m.record(&mk("gpt-4o", 429, ErrorKind::HttpError));
        m.record(&mk("o3", 200, ErrorKind::None));
        m.record(&mk("gpt-5", 200, ErrorKind::None)); // third model: `other`
        let text = m.render();
        for line in [
            r#"llmtap_requests_total{model="gpt-4o",provider="openai",route="openai",status_class="2xx"} 1"#,
            r#"llmtap_requests_total{model="gpt-4o",provider="openai",route="openai",status_class="4xx"} 1"#,
            r#"llmtap_requests_total{model="other",provider="openai",route="openai",status_class="2xx"} 1"#,
            r#"llmtap_tokens_total{model="gpt-4o",provider="openai",route="openai",type="input"} 20"#,
            r#"llmtap_tokens_total{model="o3",provider="openai",route="openai",type="cache_read"} 3"#,
            r#"llmtap_cost_usd_total{model="gpt-4o",provider="openai",route="openai"} 0.5"#,
            r#"llmtap_errors_total{kind="http_error",provider="openai",route="openai"} 1"#,
            r#"llmtap_request_duration_seconds_bucket{model="gpt-4o",provider="openai",route="openai",le="2.56"} 2"#,
            r#"llmtap_request_duration_seconds_bucket{model="gpt-4o",provider="openai",route="openai",le="1.28"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(!text.contains("gpt-5"));
    }

    #[test]
    fn mirrors_external_counters_at_scrape() {
        let m = LlmMetrics::new(10).unwrap();
        let rec = Arc::new(RecorderStats::default());
        m.set_sources(Sources { recorder: Some(rec.clone()), ..Sources::default() });
        rec.dropped_full.store(5, Ordering::Relaxed);
        rec.queued.store(7, Ordering::Relaxed);
        let t = m.render();
        assert!(t.contains("llmtap_trace_log_records_dropped_total 5\n"), "{t}");
        assert!(t.contains("llmtap_trace_log_queue_depth 7\n"));
        rec.dropped_full.store(9, Ordering::Relaxed);
        assert!(m.render().contains("llmtap_trace_log_records_dropped_total 9\n"));
    }
}
