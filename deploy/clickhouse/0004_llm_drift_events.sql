-- One row per drift state change (firing, resolved), with the control surface to revisit.
CREATE TABLE IF NOT EXISTS {{database}}.llm_drift_events{{local}} {{on_cluster}}
(
    ts DateTime64(3, 'UTC'),
    signal LowCardinality(String),
    app LowCardinality(String),
    route LowCardinality(String),
    model LowCardinality(String),
    judge LowCardinality(String),
    method LowCardinality(String),
    statistic Float64,
    threshold Float64,
    baseline_n UInt64,
    current_n UInt64,
    baseline_value Float64,
    current_value Float64,
    severity LowCardinality(String),
    state LowCardinality(String),
    control_surface LowCardinality(String)
)
ENGINE = {{engine:MergeTree}}
PARTITION BY toYYYYMM(ts)
ORDER BY (app, signal, ts)
TTL toDateTime(ts) + INTERVAL {{ttl_days}} DAY
SETTINGS non_replicated_deduplication_window = 10000;

-- @if cluster
CREATE TABLE IF NOT EXISTS {{database}}.llm_drift_events {{on_cluster}}
AS {{database}}.llm_drift_events_local
ENGINE = Distributed({{cluster}}, {{database}}, llm_drift_events_local, rand());
-- @endif
