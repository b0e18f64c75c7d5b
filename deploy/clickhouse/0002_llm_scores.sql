-- One row per judge verdict. A verdict is keyed by (trace, judge, version): re-running a
-- judge replaces its row (ReplacingMergeTree on ts), so re-runs stay idempotent.
CREATE TABLE IF NOT EXISTS {{database}}.llm_scores{{local}} {{on_cluster}}
(
    ts DateTime64(3, 'UTC'),
    trace_id String,
    judge LowCardinality(String),
    judge_version LowCardinality(String),
    judge_kind LowCardinality(String),
    app LowCardinality(String),
    route LowCardinality(String),
    request_model LowCardinality(String),
    score Float64,
    passed UInt8,
    label LowCardinality(String),
    reasoning String CODEC(ZSTD(3)),
    needs_review UInt8,
    error String,
    judge_model LowCardinality(String),
    judge_ms Float64,
    judge_cost_usd Float64,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.001) GRANULARITY 4
)
ENGINE = {{engine:ReplacingMergeTree(ts)}}
PARTITION BY toYYYYMM(ts)
ORDER BY (app, judge, judge_version, trace_id)
TTL toDateTime(ts) + INTERVAL {{ttl_days}} DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- @if cluster
CREATE TABLE IF NOT EXISTS {{database}}.llm_scores {{on_cluster}}
AS {{database}}.llm_scores_local
ENGINE = Distributed({{cluster}}, {{database}}, llm_scores_local, cityHash64(trace_id));
-- @endif
