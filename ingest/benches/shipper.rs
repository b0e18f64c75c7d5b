//! Shipper throughput into the real ClickHouse engine (chdb behind the test adapter):
//! typical rows without bodies (rows/s), then rows with 4 KiB bodies (bytes/s).
//!
//!     LLMTAP_CHDB_PYTHON=.venv/bin/python cargo bench -p llmtap-ingest --bench shipper
//!
//! Rows are written to local-log segments first; the timer covers only shipping them
//! (read, parse, encode, insert, checkpoint) with the production batch size.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use llmtap_ingest::record::{ErrorKind, Operation, Timestamp, TraceRecord, UsageSource};
use llmtap_ingest::sink::clickhouse::shipper::{run_kind, KINDS};
use llmtap_ingest::sink::clickhouse::{ClickHouseConfig, ClickHouseSink, ShipperSettings, ShipperStats};
use llmtap_testkit::chdb::ChdbAdapter;

fn record(i: usize, body: usize) -> TraceRecord {
    let mut tags = std::collections::BTreeMap::new();
    tags.insert("team".to_owned(), format!("team-{}", i % 7));
    TraceRecord {
        trace_id: format!("{:032x}", i as u128 * 0x9e3779b97f4a7c15),
        span_id: format!("{:016x}", i),
        ts: Timestamp(SystemTime::now()),
        app: format!("app-{}", i % 5),
        route: "openai".into(),
        provider: "openai".into(),
        operation: Operation::Chat,
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        status: 200,
        error_kind: if i.is_multiple_of(50) { ErrorKind::HttpError } else { ErrorKind::None },
        streamed: i.is_multiple_of(2),
        request_model: "gpt-4o-mini".into(),
        response_model: "gpt-4o-mini-2024-07-18".into(),
        response_id: format!("chatcmpl-{i}"),
        finish_reason: "stop".into(),
        input_tokens: 812 + (i % 100) as u64,
        output_tokens: 143 + (i % 37) as u64,
        cache_read_tokens: 512,
        usage_source: UsageSource::Reported,
        cost_usd: 0.000_205,
        duration_ms: 840.5 + (i % 400) as f64,
        ttft_ms: 210.25,
        upstream_ms: 205.0,
        overhead_us: 85,
        request_bytes: 2400,
        response_bytes: 5200,
        tool_calls: if i.is_multiple_of(3) { vec!["search".into(), "answer".into()] } else { vec![] },
        tool_call_args: if i.is_multiple_of(3) { vec![r#"{"q":"plan"}"#.into(), r#"{"a":1}"#.into()] } else { vec![] },
        tools_offered: vec!["search".into(), "answer".into()],
        user_id: format!("user-{}", i % 1000),
        session_id: format!("sess-{}", i % 5000),
        tags,
        request_body: "x".repeat(body),
        output_text: "y".repeat(body),
        ..TraceRecord::default()
    }
}

fn run(py: &std::path::Path, rows: usize, body: usize) -> (f64, f64, u64) {
    let ch = ChdbAdapter::start(py).unwrap();
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("traces");
    std::fs::create_dir_all(&dir).unwrap();
    let mut bytes = 0u64;
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("0000000000001-1-000001.ndjson")).unwrap());
    for i in 0..rows {
        let line = serde_json::to_vec(&record(i, body)).unwrap();
        bytes += line.len() as u64 + 1;
        f.write_all(&line).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let cfg = ClickHouseConfig { url: ch.url(), ..ClickHouseConfig::default() }.validate().unwrap().unwrap();
    let settings = ShipperSettings {
        batch_max_rows: cfg.batch_max_rows,
        batch_max_bytes: cfg.batch_max_bytes,
        batch_max_age: Duration::from_millis(1),
        poll_interval: Duration::from_millis(5),
        retry_initial_backoff: cfg.retry_initial_backoff,
        retry_max_backoff: cfg.retry_max_backoff,
        keep_local: true,
        max_disk_bytes: 0,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let sink = Arc::new(ClickHouseSink::new(&cfg));
    rt.block_on(sink.migrate()).unwrap();
    let stats = Arc::new(ShipperStats::default());
    let start = Instant::now();
    // `stop` set up front: ship everything on disk, then return.
    rt.block_on(run_kind(
        sink,
        data.path().to_path_buf(),
        KINDS[0],
        settings,
        stats.clone(),
        Arc::new(AtomicBool::new(true)),
    ))
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    let shipped = stats.rows_shipped.load(Ordering::Relaxed);
    assert_eq!(shipped, rows as u64);
    let in_ch = ch.rows("SELECT count() AS n FROM default.llm_traces").unwrap()[0]["n"].as_u64().unwrap();
    assert_eq!(in_ch, rows as u64);
    (rows as f64 / secs, bytes as f64 / secs, stats.batches_shipped.load(Ordering::Relaxed))
}

fn main() {
    let Some(py) = std::env::var_os("LLMTAP_CHDB_PYTHON") else {
        eprintln!("set LLMTAP_CHDB_PYTHON to a Python with chdb (make bench-shipper does)");
        std::process::exit(2);
    };
    let py = std::path::PathBuf::from(py);
    println!("| rows | body bytes (each of 2) | rows/s | MB/s of NDJSON | batches |");
    println!("|---:|---:|---:|---:|---:|");
    for (rows, body) in [(200_000, 0), (200_000, 0), (20_000, 4096), (20_000, 4096)] {
        let (rps, bps, batches) = run(&py, rows, body);
        println!("| {rows} | {body} | {rps:.0} | {:.1} | {batches} |", bps / 1e6);
    }
}
