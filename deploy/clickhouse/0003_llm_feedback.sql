-- One row per human signal (thumbs, ratings, labels, corrections), joined to calls and
-- verdicts by trace_id.
CREATE TABLE IF NOT EXISTS {{database}}.llm_feedback{{local}} {{on_cluster}}
(
    ts DateTime64(3, 'UTC'),
    trace_id String,
    name LowCardinality(String),
    value Float64,
    label LowCardinality(String),
    comment String CODEC(ZSTD(3)),
    correction String CODEC(ZSTD(3)),
    annotator String
)
ENGINE = {{engine:MergeTree}}
PARTITION BY toYYYYMM(ts)
ORDER BY (trace_id, name, ts)
TTL toDateTime(ts) + INTERVAL {{ttl_days}} DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- @if cluster
CREATE TABLE IF NOT EXISTS {{database}}.llm_feedback {{on_cluster}}
AS {{database}}.llm_feedback_local
ENGINE = Distributed({{cluster}}, {{database}}, llm_feedback_local, cityHash64(trace_id));
-- @endif
