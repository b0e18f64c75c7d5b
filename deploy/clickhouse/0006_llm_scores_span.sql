-- Verdicts are per call, not per trace: calls that share a caller's `traceparent` share a
-- trace id, and each of them is judged. The new column joins the sorting key, so a re-run
-- of one judge on one call still replaces its row.
ALTER TABLE {{database}}.llm_scores{{local}} {{on_cluster}}
    ADD COLUMN IF NOT EXISTS span_id String AFTER trace_id,
    MODIFY ORDER BY (app, judge, judge_version, trace_id, span_id);

-- @if cluster
ALTER TABLE {{database}}.llm_scores {{on_cluster}}
    ADD COLUMN IF NOT EXISTS span_id String AFTER trace_id;
-- @endif
