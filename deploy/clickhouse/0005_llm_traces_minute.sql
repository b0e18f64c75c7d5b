-- Per-minute rollup for dashboards over months: counts, errors, token and cost sums, and
-- t-digest states of duration and TTFT by app, route, provider and model. Fed by a
-- materialized view on every insert into llm_traces (on each shard's local table).
-- Query with sum(...) and quantilesTDigestMerge(0.5, 0.95, 0.99)(duration_q).
CREATE TABLE IF NOT EXISTS {{database}}.llm_traces_minute{{local}} {{on_cluster}}
(
    minute DateTime('UTC'),
    app LowCardinality(String),
    route LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    requests SimpleAggregateFunction(sum, UInt64),
    errors SimpleAggregateFunction(sum, UInt64),
    input_tokens SimpleAggregateFunction(sum, UInt64),
    output_tokens SimpleAggregateFunction(sum, UInt64),
    cache_read_tokens SimpleAggregateFunction(sum, UInt64),
    cache_write_tokens SimpleAggregateFunction(sum, UInt64),
    reasoning_tokens SimpleAggregateFunction(sum, UInt64),
    cost_usd SimpleAggregateFunction(sum, Float64),
    duration_q AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float64),
    ttft_q AggregateFunction(quantilesTDigest(0.5, 0.95), Float64)
)
ENGINE = {{engine:AggregatingMergeTree}}
PARTITION BY toYYYYMM(minute)
ORDER BY (app, route, provider, model, minute)
TTL minute + INTERVAL {{rollup_ttl_days}} DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS {{database}}.llm_traces_minute_mv{{local}} {{on_cluster}}
TO {{database}}.llm_traces_minute{{local}}
AS SELECT
    toStartOfMinute(ts) AS minute,
    app,
    route,
    provider,
    if(response_model != '', response_model, request_model) AS model,
    count() AS requests,
    countIf(error_kind != '') AS errors,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(cost_usd) AS cost_usd,
    quantilesTDigestState(0.5, 0.95, 0.99)(duration_ms) AS duration_q,
    quantilesTDigestStateIf(0.5, 0.95)(ttft_ms, ttft_ms > 0) AS ttft_q
FROM {{database}}.llm_traces{{local}}
GROUP BY minute, app, route, provider, model;

-- @if cluster
CREATE TABLE IF NOT EXISTS {{database}}.llm_traces_minute {{on_cluster}}
AS {{database}}.llm_traces_minute_local
ENGINE = Distributed({{cluster}}, {{database}}, llm_traces_minute_local, rand());
-- @endif
