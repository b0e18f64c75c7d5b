//! Telemetry out of the record stream: Prometheus metrics (served on the admin port) and
//! OpenTelemetry (OTLP spans and metrics). Both observe records after they are on disk and
//! never touch the request path.

pub mod otlp;
pub mod prometheus;

use std::sync::atomic::AtomicU64;

/// Counters of the OTLP exporter.
#[derive(Debug, Default)]
pub struct OtlpStats {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped: the exporter queue was full, or the collector failed or timed out.
    pub dropped: AtomicU64,
}
