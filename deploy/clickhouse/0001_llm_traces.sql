-- One row per LLM call. Column names are the local log's JSON keys (DESIGN.md, Records).
--
-- ORDER BY (app, route, request_model, ts): every dashboard panel filters a time range of
-- one app (often one route or model) and groups by route/model, so the primary index
-- narrows to the app's granules first, keeps each route/model's rows together for the
-- group-bys, and ts last makes the time filter a contiguous range inside them. Monthly
-- partitions prune long ranges and make TTL drops cheap. trace_id and session_id lookups
-- (one call, one conversation) use bloom-filter skip indexes instead of the sort key.
CREATE TABLE IF NOT EXISTS {{database}}.llm_traces{{local}} {{on_cluster}}
(
    trace_id String,
    span_id String,
    parent_span_id String,
    ts DateTime64(3, 'UTC'),
    app LowCardinality(String),
    route LowCardinality(String),
    provider LowCardinality(String),
    operation LowCardinality(String),
    method LowCardinality(String),
    path String,
    status UInt16,
    error_kind LowCardinality(String),
    streamed Bool,
    request_model LowCardinality(String),
    response_model LowCardinality(String),
    response_id String,
    finish_reason LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    reasoning_tokens UInt64,
    usage_source LowCardinality(String),
    cost_usd Float64,
    duration_ms Float64,
    ttft_ms Float64,
    upstream_ms Float64,
    overhead_us UInt64,
    request_bytes UInt64,
    response_bytes UInt64,
    tool_calls Array(LowCardinality(String)),
    tool_call_args Array(String) CODEC(ZSTD(3)),
    tools_offered Array(LowCardinality(String)),
    user_id String,
    session_id String,
    tags Map(LowCardinality(String), String),
    request_body String CODEC(ZSTD(3)) TTL toDateTime(ts) + INTERVAL {{body_ttl_days}} DAY,
    output_text String CODEC(ZSTD(3)) TTL toDateTime(ts) + INTERVAL {{body_ttl_days}} DAY,
    sampled Bool,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 4,
    INDEX idx_session_id session_id TYPE bloom_filter(0.01) GRANULARITY 4,
    -- A clock that says 1970 is a broken record, not a call: rejected, then quarantined.
    CONSTRAINT ts_is_plausible CHECK ts >= toDateTime64('2020-01-01 00:00:00', 3, 'UTC')
)
ENGINE = {{engine:MergeTree}}
PARTITION BY toYYYYMM(ts)
ORDER BY (app, route, request_model, ts)
TTL toDateTime(ts) + INTERVAL {{ttl_days}} DAY
-- Lets a retried batch carrying the same insert_deduplication_token be dropped.
SETTINGS non_replicated_deduplication_window = 10000;

-- @if cluster
CREATE TABLE IF NOT EXISTS {{database}}.llm_traces {{on_cluster}}
AS {{database}}.llm_traces_local
ENGINE = Distributed({{cluster}}, {{database}}, llm_traces_local, cityHash64(trace_id));
-- @endif
