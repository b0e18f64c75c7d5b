//! Table-driven suite over every provider fixture: the recorded facts match the case's
//! `expect` block exactly, whole and with the response re-split at every byte boundary,
//! and the bytes handed back for the client are the upstream's bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use llmtap_ingest::capture::CaptureConfig;
use llmtap_ingest::pricing::PriceTable;
use llmtap_ingest::recorder::complete_record;
use llmtap_ingest::{
    CallMeta, ErrorKind, Exchange, ExchangeLimits, OpenStreams, ProviderKind, RequestOptions, RequestView, TraceRecord,
};
use llmtap_testkit::{all_cases, fixtures_dir, Case};

/// Client path → (provider, upstream path, query), mirroring the default routes and the
/// `/compat` route the proxy tests configure.
fn route(path: &str) -> (ProviderKind, String, String) {
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let (kind, up) = if let Some(r) = p.strip_prefix("/anthropic") {
        (ProviderKind::Anthropic, r.to_owned())
    } else if let Some(r) = p.strip_prefix("/gemini") {
        (ProviderKind::Gemini, r.to_owned())
    } else if let Some(r) = p.strip_prefix("/azure/") {
        (ProviderKind::OpenAi, r[r.find('/').unwrap()..].to_owned())
    } else if let Some(r) = p.strip_prefix("/compat") {
        (ProviderKind::OpenAi, r.to_owned())
    } else if let Some(r) = p.strip_prefix("/openai") {
        (ProviderKind::OpenAi, r.to_owned())
    } else {
        (ProviderKind::OpenAi, p.to_owned())
    };
    (kind, up, q.to_owned())
}

/// How a run hands a stream's bytes to the recorder's side: in pieces of `size` bytes, the
/// queue refusing each piece `refuse` says to (as a full one does).
struct Pieces<'a> {
    size: usize,
    refuse: &'a mut dyn FnMut() -> bool,
}

/// Runs a case through an exchange with the response cut into `frames`.
fn run(case: &Case, frames: &[&[u8]]) -> (TraceRecord, Vec<u8>) {
    run_in_pieces(case, frames, Pieces { size: ExchangeLimits::default().stream_piece, refuse: &mut || false })
}

/// `run`, with the stream's pieces going to the recorder's side as `pieces` says.
fn run_in_pieces(case: &Case, frames: &[&[u8]], pieces: Pieces<'_>) -> (TraceRecord, Vec<u8>) {
    let (kind, up_path, query) = route(&case.path);
    let body = serde_json::to_vec(&case.request).unwrap();
    let headers = HeaderMap::new();
    let view = RequestView { method: &case.method, path: &up_path, query: &query, headers: &headers, body: &body };
    let meta = CallMeta { trace_id: "t".into(), capture_bodies: true, ..CallMeta::default() };
    let (mut ex, rewritten) = Exchange::start(
        meta,
        kind,
        Instant::now(),
        &view,
        Bytes::from(body.clone()),
        RequestOptions { inject_stream_usage: false },
        ExchangeLimits { stream_piece: pieces.size, ..ExchangeLimits::default() },
    );
    assert!(rewritten.is_none());
    let mut rh = HeaderMap::new();
    for (k, v) in &case.response.headers {
        rh.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    ex.on_response_head(case.response.status, &rh);
    let mut out = Vec::new();
    let mut streams = OpenStreams::default();
    for f in frames {
        out.extend_from_slice(&ex.on_response_frame(Bytes::copy_from_slice(f)));
        if let Some(piece) = ex.take_piece() {
            if (pieces.refuse)() {
                ex.piece_refused(piece);
            } else {
                streams.feed(piece);
            }
        }
    }
    out.extend_from_slice(&ex.on_response_end());
    let pending = ex.finish(ErrorKind::None, case.response.status).into_pending(&mut streams);
    assert!(streams.is_empty(), "the call's end took its stream's parser back");
    let prices = PriceTable::embedded();
    let capture = CaptureConfig::default().validate().unwrap();
    (complete_record(pending, &prices, &capture), out)
}

fn check(name: &str, case: &Case, rec: &TraceRecord) {
    llmtap_testkit::check_expect(name, &case.expect, &serde_json::to_value(rec).unwrap());
}

#[test]
fn every_fixture_records_the_expected_facts() {
    let dir = fixtures_dir();
    let cases = all_cases(&dir);
    assert!(cases.len() >= 20, "fixtures missing: {cases:?}");
    for name in &cases {
        let case = Case::load(&dir, name).unwrap();
        let body = case.body(&dir, name).unwrap();
        let (rec, out) = run(&case, &[&body]);
        assert_eq!(out, body, "{name}: bytes for the client changed");
        check(name, &case, &rec);
        assert_eq!(rec.request_body, serde_json::to_string(&case.request).unwrap(), "{name}: request_body");
    }
}

#[test]
fn every_stream_gives_the_same_facts_split_at_every_byte() {
    let dir = fixtures_dir();
    for name in all_cases(&dir) {
        let case = Case::load(&dir, &name).unwrap();
        let body = case.body(&dir, &name).unwrap();
        let (whole, _) = run(&case, &[&body]);
        for i in 0..=body.len() {
            let (rec, out) = run(&case, &[&body[..i], &body[i..]]);
            assert_eq!(out, body, "{name}: split at {i}: bytes changed");
            let mut rec = rec;
            rec.duration_ms = whole.duration_ms;
            rec.ttft_ms = whole.ttft_ms;
            rec.upstream_ms = whole.upstream_ms;
            rec.overhead_us = whole.overhead_us;
            assert_eq!(rec, whole, "{name}: split at {i}");
        }
    }
}

#[test]
fn random_multi_splits_give_the_same_facts() {
    let dir = fixtures_dir();
    let mut rng = fastrand::Rng::with_seed(7);
    for name in all_cases(&dir) {
        let case = Case::load(&dir, &name).unwrap();
        let body = case.body(&dir, &name).unwrap();
        let (whole, _) = run(&case, &[&body]);
        for _ in 0..50 {
            let mut cuts: Vec<usize> = (0..rng.usize(1..12)).map(|_| rng.usize(0..=body.len())).collect();
            cuts.sort_unstable();
            let mut frames = Vec::new();
            let mut at = 0;
            for c in cuts {
                frames.push(&body[at..c]);
                at = c;
            }
            frames.push(&body[at..]);
            // Pieces as small as one byte, as large as the stream, and a queue that refuses
            // some of them: the facts are the same however the bytes reach the parser.
            let size = [1, 16, 256, 1 << 20][rng.usize(0..4)];
            let refuse_one_in = rng.usize(1..5);
            let mut refuse = || rng.usize(0..refuse_one_in) == 1;
            let (mut rec, out) = run_in_pieces(&case, &frames, Pieces { size, refuse: &mut refuse });
            assert_eq!(out, body, "{name}");
            rec.duration_ms = whole.duration_ms;
            rec.ttft_ms = whole.ttft_ms;
            rec.upstream_ms = whole.upstream_ms;
            rec.overhead_us = whole.overhead_us;
            assert_eq!(rec, whole, "{name}: frames {:?}", frames.iter().map(|f| f.len()).collect::<Vec<_>>());
        }
    }
}

#[test]
fn stream_without_usage_is_estimated_with_tiktoken() {
    let dir = fixtures_dir();
    let name = "compat/ollama_stream_no_usage";
    let case = Case::load(&dir, name).unwrap();
    let body = case.body(&dir, name).unwrap();
    let (rec, _) = run(&case, &[&body]);
    assert_eq!(rec.usage_source, llmtap_ingest::UsageSource::Estimated);
    let output =
        llmtap_ingest::estimate::count_tokens(&rec.request_model, case.expect["output_text"].as_str().unwrap());
    assert!(output > 0);
    assert_eq!(rec.output_tokens, output);
    assert!(rec.input_tokens > 0);
    assert_eq!(rec.cost_usd, 0.0, "llama3.2 is not priced");
}

#[test]
fn malformed_stream_keeps_what_parsed() {
    let dir = fixtures_dir();
    let name = "openai/chat_stream_malformed";
    let case = Case::load(&dir, name).unwrap();
    let body = case.body(&dir, name).unwrap();
    let (rec, out) = run(&case, &[&body]);
    assert_eq!(out, body);
    assert_eq!(rec.error_kind, ErrorKind::ParseError);
}
