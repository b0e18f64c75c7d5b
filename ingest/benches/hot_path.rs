//! Micro-benchmarks of the per-call work on the request path and in the recorder: the SSE
//! parser, each adapter over a real fixture (a whole `Exchange`: request hook, head, frames,
//! finish), the include_usage stripper, and turning a pending call into its NDJSON line.
//!
//!     cargo bench -p llmtap-ingest --bench hot_path

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use llmtap_ingest::capture::CaptureConfig;
use llmtap_ingest::pricing::PriceTable;
use llmtap_ingest::provider::stream_usage::StreamUsageStripper;
use llmtap_ingest::recorder::complete_record;
use llmtap_ingest::sse::SseParser;
use llmtap_ingest::{CallMeta, ErrorKind, Exchange, ExchangeLimits, ProviderKind, RequestOptions, RequestView};
use llmtap_testkit::{fixtures_dir, Case};

fn load(name: &str) -> (Case, Vec<u8>) {
    let dir = fixtures_dir();
    let c = Case::load(&dir, name).unwrap();
    let b = c.body(&dir, name).unwrap();
    (c, b)
}

fn frames(body: &[u8], size: usize) -> Vec<Bytes> {
    body.chunks(size).map(Bytes::copy_from_slice).collect()
}

/// `body` cut after each blank line: one SSE event per frame.
fn event_frames(body: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = body[at..].windows(2).position(|w| w == b"\n\n") {
        out.push(Bytes::copy_from_slice(&body[at..at + i + 2]));
        at += i + 2;
    }
    if at < body.len() {
        out.push(Bytes::copy_from_slice(&body[at..]));
    }
    out
}

fn run_exchange(
    kind: ProviderKind,
    path: &str,
    case: &Case,
    req: &Bytes,
    frames: &[Bytes],
) -> llmtap_ingest::PendingTrace {
    let headers = HeaderMap::new();
    let view = RequestView { method: "POST", path, query: "", headers: &headers, body: req };
    let meta =
        CallMeta { trace_id: "0af7651916cd43dd8448eb211c80319c".into(), capture_bodies: true, ..CallMeta::default() };
    let (mut ex, _) = Exchange::start(
        meta,
        kind,
        Instant::now(),
        &view,
        req.clone(),
        RequestOptions::default(),
        ExchangeLimits::default(),
    );
    let mut rh = HeaderMap::new();
    for (k, v) in &case.response.headers {
        rh.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    ex.on_response_head(case.response.status, &rh);
    for f in frames {
        black_box(ex.on_response_frame(f.clone()));
    }
    ex.on_response_end();
    ex.finish(ErrorKind::None, 200).into_pending(&mut llmtap_ingest::OpenStreams::default())
}

fn bench_sse(c: &mut Criterion) {
    let (_, body) = load("openai/chat_stream_tools");
    let mut g = c.benchmark_group("sse_parser");
    g.throughput(Throughput::Bytes(body.len() as u64));
    for size in [body.len(), 256, 32] {
        let fs = frames(&body, size);
        g.bench_function(format!("openai_tools_stream/frames_of_{size}B"), |b| {
            b.iter(|| {
                let mut p = SseParser::new();
                let mut n = 0;
                for f in &fs {
                    p.feed(f, |e| n += e.data.len());
                }
                black_box(n)
            })
        });
    }
    g.finish();
}

fn bench_adapters(c: &mut Criterion) {
    let mut g = c.benchmark_group("exchange");
    for (name, kind, path) in [
        ("openai/chat_json", ProviderKind::OpenAi, "/v1/chat/completions"),
        ("openai/chat_stream_tools", ProviderKind::OpenAi, "/v1/chat/completions"),
        ("openai/responses_stream", ProviderKind::OpenAi, "/v1/responses"),
        ("anthropic/messages_stream_tools", ProviderKind::Anthropic, "/v1/messages"),
        ("gemini/stream_sse", ProviderKind::Gemini, "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
    ] {
        let (case, body) = load(name);
        let req = Bytes::from(serde_json::to_vec(&case.request).unwrap());
        // Upstreams send a stream in frames of a few hundred bytes.
        let fs = frames(&body, 300);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| b.iter(|| black_box(run_exchange(kind, path, &case, &req, &fs))));
    }
    g.finish();
}

/// Bytes out of a fresh stripper fed `frames`.
fn strip(frames: &[Bytes]) -> usize {
    let mut s = StreamUsageStripper::new();
    frames.iter().map(|f| s.push(f).len()).sum::<usize>() + s.finish().len()
}

fn bench_stripper(c: &mut Criterion) {
    let (_, body) = load("openai/chat_stream");
    let fs = frames(&body, 300);
    let mut g = c.benchmark_group("stream_usage_stripper");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("openai/chat_stream", |b| b.iter(|| black_box(strip(&fs))));
    // As most upstreams write: one event per frame.
    let events = event_frames(&body);
    g.bench_function("openai/chat_stream/event_per_frame", |b| b.iter(|| black_box(strip(&events))));
    g.finish();
}

fn bench_encoder(c: &mut Criterion) {
    let (case, body) = load("openai/chat_stream_tools");
    let req = Bytes::from(serde_json::to_vec(&case.request).unwrap());
    let fs = frames(&body, 300);
    let prices = PriceTable::embedded();
    let capture = CaptureConfig::default().validate().unwrap();
    let mut g = c.benchmark_group("record");
    g.bench_function("complete_and_encode_ndjson", |b| {
        b.iter_batched(
            || run_exchange(ProviderKind::OpenAi, "/v1/chat/completions", &case, &req, &fs),
            |p| {
                let rec = complete_record(p, &prices, &capture);
                black_box(serde_json::to_vec(&rec).unwrap())
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_sse, bench_adapters, bench_stripper, bench_encoder);
criterion_main!(benches);
