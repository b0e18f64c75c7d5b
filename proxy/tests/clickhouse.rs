//! ClickHouse on the real engine (chdb behind the test adapter): migrations, end-to-end
//! shipping with exact values, an outage, a crash, a poison record, JSONEachRow loading of a
//! local segment, and `stats --from clickhouse`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use llmtap_ingest::record::{ErrorKind, FeedbackRecord, ScoreRecord, Timestamp, TraceRecord};
use llmtap_ingest::sink::clickhouse::schema::{SchemaContext, MIGRATIONS};
use llmtap_testkit::chdb::{self, ChdbAdapter};
use llmtap_testkit::process::{read_records, LlmtapProcess};
use llmtap_testkit::{fixtures_dir, Case, MockUpstream};
use serde_json::{json, Value};

fn llmtap_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_llmtap"))
}

/// llmtap shipping to `ch`, in front of a fresh mock.
async fn start_shipping(ch: &ChdbAdapter, extra: &str, data_dir: Option<&Path>) -> (MockUpstream, LlmtapProcess) {
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), &fixtures_dir()).await.unwrap();
    let config = format!(
        "[clickhouse]\nurl = \"{}\"\nbatch_max_age_ms = 200\npoll_interval_ms = 50\nretry_initial_backoff_ms = 50\nretry_max_backoff_ms = 500\n{extra}\n{}",
        ch.url(),
        base_config(&mock)
    );
    let env = vec![
        ("LLMTAP_UPSTREAM_OPENAI", mock.url()),
        ("LLMTAP_UPSTREAM_ANTHROPIC", mock.url()),
        ("LLMTAP_UPSTREAM_GEMINI", mock.url()),
    ];
    let p = match data_dir {
        Some(d) => LlmtapProcess::start_with_data_dir(llmtap_bin(), &config, &env, d).unwrap(),
        None => LlmtapProcess::start(llmtap_bin(), &config, &env).unwrap(),
    };
    (mock, p)
}

fn count(ch: &ChdbAdapter, sql: &str) -> u64 {
    ch.rows(sql).unwrap()[0]["n"].as_u64().unwrap()
}

async fn wait_count(ch: &ChdbAdapter, want: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let n = ch
            .rows("SELECT count() AS n FROM default.llm_traces")
            .map(|r| r[0]["n"].as_u64().unwrap_or(0))
            .unwrap_or(0);
        if n >= want || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `n` mixed calls; returns their trace ids.
async fn traffic(c: &HttpClient, base: &str, n: usize) -> Vec<String> {
    let dir = fixtures_dir();
    let anthropic = Case::load(&dir, "anthropic/messages_stream_tools").unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let r = match i % 3 {
            0 => {
                post_json(
                    c,
                    &format!("{base}/v1/chat/completions"),
                    &[("x-llmtap-app", "bot"), ("x-llmtap-tag-run", "ch")],
                    &json!({"model": "gpt-4o", "messages": []}),
                )
                .await
            }
            1 => {
                post_json(
                    c,
                    &format!("{base}/v1/chat/completions"),
                    &[("x-mock-tool-calls", "search,answer")],
                    &json!({"model": "gpt-4o-mini", "stream": true, "messages": []}),
                )
                .await
            }
            _ => {
                post_json(
                    c,
                    &format!("{base}{}", anthropic.path),
                    &[("x-mock-fixture", "anthropic/messages_stream_tools")],
                    &anthropic.request,
                )
                .await
            }
        };
        assert_eq!(r.status, 200);
        ids.push(r.trace_id());
    }
    ids
}

#[test]
fn migrations_apply_twice_match_the_dry_run_and_refuse_newer_schemas() {
    let Some(py) = chdb::python() else { return };
    let ch = ChdbAdapter::start(&py).unwrap();
    let env = vec![("LLMTAP_CLICKHOUSE_URL", ch.url())];
    let (code, dry, err) = llmtap_cli(&["migrate", "--dry-run"], &env);
    assert_eq!(code, 0, "{err}");
    let planned: Vec<String> = dry.split(";\n\n").map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    assert_eq!(planned.len(), 2 + 7 + 6, "bootstrap, 7 statements, 6 version rows: {planned:#?}");
    ch.reset_log().unwrap();
    let (code, _, err) = llmtap_cli(&["migrate"], &env);
    assert_eq!(code, 0, "{err}");
    let executed: Vec<String> =
        ch.statements().unwrap().into_iter().filter(|s| !s.starts_with("SELECT version")).collect();
    assert_eq!(executed, planned, "the dry run prints exactly what migrate runs");
    let tables: Vec<String> = ch
        .rows("SELECT name FROM system.tables WHERE database = 'default' ORDER BY name")
        .unwrap()
        .into_iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    for t in [
        "llm_drift_events",
        "llm_feedback",
        "llm_scores",
        "llm_traces",
        "llm_traces_minute",
        "llm_traces_minute_mv",
        "llmtap_migrations",
    ] {
        assert!(tables.contains(&t.to_owned()), "{t} missing from {tables:?}");
    }
    // Again: nothing pending, nothing fails.
    let (code, _, err) = llmtap_cli(&["migrate"], &env);
    assert_eq!(code, 0, "{err}");
    let (_, dry2, _) = llmtap_cli(&["migrate", "--dry-run"], &env);
    assert_eq!(dry2.matches("CREATE TABLE").count(), 1, "only the bootstrap's migrations table remains: {dry2}");
    // Every migration's statements run twice over (idempotent).
    let ctx = SchemaContext {
        database: "default".into(),
        cluster: None,
        ttl_days: 90,
        body_ttl_days: 30,
        rollup_ttl_days: 400,
    };
    for m in MIGRATIONS {
        for s in ctx.statements(m) {
            ch.query(&s).unwrap();
            ch.query(&s).unwrap();
        }
    }
    // The cluster variant parses (chdb has no Keeper to run it).
    let cluster = SchemaContext { cluster: Some("prod".into()), ..ctx.clone() };
    let mut n = 0;
    for stmt in cluster.bootstrap().into_iter().chain(MIGRATIONS.iter().flat_map(|m| cluster.statements(m))) {
        let ast = ch.query(&format!("EXPLAIN AST {stmt}")).unwrap_or_else(|e| panic!("{e}\n{stmt}"));
        assert!(!ast.is_empty());
        n += 1;
    }
    assert_eq!(n, 2 + 13);
    // A schema newer than this binary is refused.
    ch.query("INSERT INTO default.llmtap_migrations VALUES (99, 'future', '', now64(3))").unwrap();
    let (code, _, err) = llmtap_cli(&["migrate"], &env);
    assert_eq!(code, 2);
    assert!(err.contains("schema is at version 99, newer than this llmtap knows (6)"), "{err}");
}

/// Every column of every ClickHouse row equals the local record.
fn assert_rows_equal_local(ch: &ChdbAdapter, local: &[Value]) {
    let rows = ch.rows("SELECT * FROM default.llm_traces ORDER BY trace_id").unwrap();
    assert_eq!(rows.len(), local.len());
    let mut local: Vec<&Value> = local.iter().collect();
    local.sort_by_key(|r| r["trace_id"].as_str().unwrap().to_owned());
    for (row, rec) in rows.iter().zip(local) {
        for (k, v) in rec.as_object().unwrap() {
            let got = &row[k];
            match (v, got) {
                (Value::Number(a), Value::Number(b)) => {
                    assert_eq!(a.as_f64(), b.as_f64(), "{k} of {}", rec["trace_id"])
                }
                _ => assert_eq!(got, v, "{k} of {}", rec["trace_id"]),
            }
        }
        assert_eq!(row.as_object().unwrap().len(), rec.as_object().unwrap().len(), "same columns");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_arrive_in_clickhouse_with_exact_values_and_stats_agree() {
    let Some(py) = chdb::python() else { return };
    let ch = ChdbAdapter::start(&py).unwrap();
    let (_mock, p) = start_shipping(&ch, "keep_local = true", None).await;
    let c = client();
    let t = Instant::now();
    let ids = traffic(&c, &p.url(""), 30).await;
    let got = wait_count(&ch, 30, Duration::from_secs(20)).await;
    eprintln!("30 calls visible in ClickHouse {:?} after the first was sent", t.elapsed());
    assert_eq!(got, 30);
    let local = read_records(&p.data_dir.join("traces"));
    assert_eq!(local.len(), 30);
    assert_rows_equal_local(&ch, &local);
    let ids_in_ch: Vec<String> = ch
        .rows("SELECT trace_id FROM default.llm_traces")
        .unwrap()
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.iter().all(|i| ids_in_ch.contains(i)));
    // The rollup saw every call.
    assert_eq!(count(&ch, "SELECT sum(requests) AS n FROM default.llm_traces_minute"), 30);
    let cost = ch.rows("SELECT sum(cost_usd) AS c FROM default.llm_traces_minute").unwrap()[0]["c"].as_f64().unwrap();
    let local_cost: f64 = local.iter().map(|r| r["cost_usd"].as_f64().unwrap()).sum();
    assert!((cost - local_cost).abs() < 1e-12);
    // stats from ClickHouse is the local table.
    let env = vec![("LLMTAP_CLICKHOUSE_URL", ch.url())];
    let data = p.data_dir.to_str().unwrap();
    let (code, local_stats, err) = llmtap_cli(&["stats", "--data-dir", data, "--json"], &env);
    assert_eq!(code, 0, "{err}");
    let (code, ch_stats, err) = llmtap_cli(&["stats", "--from", "clickhouse", "--json"], &env);
    assert_eq!(code, 0, "{err}");
    let (a, b): (Value, Value) =
        (serde_json::from_str(&local_stats).unwrap(), serde_json::from_str(&ch_stats).unwrap());
    assert_json_close(&a, &b, "stats");
    assert_eq!(
        a["tool_paths"],
        json!([{"path": ["get_weather"], "calls": 10}, {"path": ["search", "answer"], "calls": 10}])
    );
    // A local segment loads as it is with FORMAT JSONEachRow.
    ch.query("CREATE TABLE default.llm_traces_copy AS default.llm_traces").unwrap();
    let seg = std::fs::read_dir(p.data_dir.join("traces"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "ndjson"))
        .unwrap();
    let body = std::fs::read(&seg).unwrap();
    let (status, resp) =
        ch.request("POST", "/?query=INSERT%20INTO%20default.llm_traces_copy%20FORMAT%20JSONEachRow", &body).unwrap();
    assert_eq!(status, 200, "{resp}");
    let lines = body.iter().filter(|b| **b == b'\n').count() as u64;
    assert_eq!(count(&ch, "SELECT count() AS n FROM default.llm_traces_copy"), lines);
}

fn assert_json_close(a: &Value, b: &Value, at: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-9 * x.abs().max(1.0), "{at}: {x} vs {y}");
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: {x:?} vs {y:?}");
            for (k, v) in x {
                assert_json_close(v, &y[k], &format!("{at}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                assert_json_close(v, w, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_loses_nothing_and_duplicates_nothing() {
    let Some(py) = chdb::python() else { return };
    let mut ch = ChdbAdapter::start(&py).unwrap();
    let (_mock, p) = start_shipping(&ch, "", None).await;
    let c = client();
    let base = p.url("");
    let mut ids = traffic(&c, &base, 20).await;
    assert_eq!(wait_count(&ch, 20, Duration::from_secs(20)).await, 20);
    ch.stop().unwrap();
    ids.extend(traffic(&c, &base, 60).await); // ClickHouse is down; calls go on
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ids.extend(traffic(&c, &base, 20).await);
    ch.restart().unwrap();
    ids.extend(traffic(&c, &base, 20).await);
    let n = wait_count(&ch, 120, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(n, 120);
    assert_eq!(count(&ch, "SELECT count() AS n FROM default.llm_traces"), 120, "no duplicates");
    assert_eq!(count(&ch, "SELECT uniqExact(trace_id) AS n FROM default.llm_traces"), 120);
    let in_ch: Vec<String> = ch
        .rows("SELECT trace_id FROM default.llm_traces")
        .unwrap()
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.iter().all(|i| in_ch.contains(i)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_shipping_then_restart_ships_every_row_once() {
    let Some(py) = chdb::python() else { return };
    let ch = ChdbAdapter::start(&py).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir: PathBuf = data.path().join("data");
    let (_mock, mut p) = start_shipping(&ch, "keep_local = true\nbatch_max_rows = 7", Some(&data_dir)).await;
    let c = client();
    traffic(&c, &p.url(""), 40).await;
    wait_count(&ch, 1, Duration::from_secs(20)).await;
    // Inserts now take 400 ms: the kill lands while one is in flight.
    ch.set_delay(400).unwrap();
    traffic(&c, &p.url(""), 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();
    ch.set_delay(0).unwrap();
    let written = read_records(&data_dir.join("traces")).len() as u64;
    assert!(written >= 55, "records on disk before the crash: {written}");
    let before = count(&ch, "SELECT count() AS n FROM default.llm_traces");
    assert!(before < written, "the crash must interrupt shipping ({before} of {written} shipped)");
    let (_mock2, p2) = start_shipping(&ch, "keep_local = true\nbatch_max_rows = 7", Some(&data_dir)).await;
    let n = wait_count(&ch, written, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(n, written);
    assert_eq!(count(&ch, "SELECT count() AS n FROM default.llm_traces"), written, "every row exactly once");
    assert_eq!(count(&ch, "SELECT uniqExact(trace_id) AS n FROM default.llm_traces"), written);
    drop(p2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_quarantined_and_later_rows_arrive() {
    let Some(py) = chdb::python() else { return };
    let ch = ChdbAdapter::start(&py).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let traces = data_dir.join("traces");
    std::fs::create_dir_all(&traces).unwrap();
    // Recent timestamps: older ones would fall to the table's TTL.
    let now = llmtap_ingest::record::ts_format::format(std::time::SystemTime::now());
    let rec = |id: &str, ts: &str| json!({"trace_id": id, "ts": ts, "app": "old", "status": 200}).to_string();
    // An older segment, left by an earlier run: good, poison (a 1970 clock), good.
    std::fs::write(
        traces.join("0000000000001-1-000001.ndjson"),
        format!("{}\n{}\n{}\n", rec("good-1", &now), rec("poison", "1970-01-01 00:00:00.000"), rec("good-2", &now)),
    )
    .unwrap();
    let (_mock, p) = start_shipping(&ch, "", Some(&data_dir)).await;
    let c = client();
    traffic(&c, &p.url(""), 5).await;
    let n = wait_count(&ch, 7, Duration::from_secs(20)).await;
    assert_eq!(n, 7, "llmtap stderr:\n{}", p.stderr());
    let ids: Vec<String> = ch
        .rows("SELECT trace_id FROM default.llm_traces WHERE app = 'old' ORDER BY trace_id")
        .unwrap()
        .iter()
        .map(|r| r["trace_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec!["good-1", "good-2"]);
    let q = data_dir.join("quarantine/traces");
    let lines = std::fs::read_to_string(
        q.join("0000000000001-1-000001-000000000000.ndjson").with_file_name(
            std::fs::read_dir(&q)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .find(|n| n.ends_with(".ndjson"))
                .unwrap(),
        ),
    )
    .unwrap();
    assert!(lines.contains("\"poison\""), "{lines}");
    let err = std::fs::read_dir(&q)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".error.txt"))
        .unwrap();
    assert!(std::fs::read_to_string(err).unwrap().contains("code 469"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_feedback_and_drift_events_are_shipped_too() {
    let Some(py) = chdb::python() else { return };
    let ch = ChdbAdapter::start(&py).unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let now = llmtap_ingest::record::ts_format::format(std::time::SystemTime::now());
    let score = json!({"ts": now, "trace_id": "t1", "span_id": "00f067aa0ba902b7", "judge": "helpfulness", "judge_version": "3", "judge_kind": "llm", "app": "bot",
        "route": "openai", "request_model": "gpt-4o", "score": 4.5, "passed": 1, "label": "good", "reasoning": "cites the plan",
        "needs_review": 0, "error": "", "judge_model": "gpt-4o-mini", "judge_ms": 812.5, "judge_cost_usd": 0.00021});
    let feedback = json!({"ts": now, "trace_id": "t1", "name": "thumbs", "value": 1.0, "label": "up", "comment": "great",
        "correction": "", "annotator": "alice"});
    let drift = json!({"ts": now, "signal": "judge_pass_rate", "app": "bot", "route": "openai", "model": "gpt-4o", "judge": "helpfulness",
        "method": "cusum", "statistic": 7.25, "threshold": 5.0, "baseline_n": 2000, "current_n": 400, "baseline_value": 0.9,
        "current_value": 0.75, "severity": "critical", "state": "firing", "control_surface": "prompt"});
    for (folder, rec) in [("scores", &score), ("feedback", &feedback), ("drift", &drift)] {
        std::fs::create_dir_all(data_dir.join(folder)).unwrap();
        std::fs::write(data_dir.join(folder).join("0000000000001-1-000001.ndjson"), format!("{rec}\n")).unwrap();
    }
    let (_mock, _p) = start_shipping(&ch, "", Some(&data_dir)).await;
    for (table, rec) in [("llm_scores", &score), ("llm_feedback", &feedback), ("llm_drift_events", &drift)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        let rows = loop {
            let rows = ch.rows(&format!("SELECT * FROM default.{table}")).unwrap_or_default();
            if !rows.is_empty() || Instant::now() > deadline {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(rows.len(), 1, "{table}");
        assert_json_close(rec, &rows[0], table);
    }
}

/// The judges of the standalone test: a rule at 0.3 and an LLM judge at 0.5 on app "bot".
fn standalone_judges(judge_url: &str) -> String {
    format!(
        r#"
[scorer]
in_process = false

[[judge]]
name = "short"
kind = "rule"
sample_rate = 0.3
rule = {{ max_output_tokens = 100000 }}

[[judge]]
name = "helpful"
kind = "llm"
apps = ["bot"]
sample_rate = 0.5
endpoint = "{judge_url}"
model = "gpt-4o-mini"
rubric = "Rate this answer: {{{{output}}}}"
output = {{ kind = "numeric", min = 1, max = 5, pass_at = 4 }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standalone_shards_judge_every_sampled_call_exactly_once() {
    let Some(py) = chdb::python() else { return };
    let ch = ChdbAdapter::start(&py).unwrap();
    let judge = llmtap_testkit::judge::JudgeMock::start().await.unwrap();
    let judges = standalone_judges(&judge.url("json"));
    let (_mock, mut p) = start_shipping(&ch, &judges, None).await;
    let c = client();
    let ids = traffic(&c, &p.url(""), 90).await;
    assert_eq!(wait_count(&ch, 90, Duration::from_secs(30)).await, 90);
    p.terminate().unwrap();
    assert!(p.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(!p.data_dir.join("scores").exists() || read_records(&p.data_dir.join("scores")).is_empty());

    // What the sampling says must be judged: (trace id, judge).
    let apps: std::collections::HashMap<String, String> = ch
        .rows("SELECT trace_id, app FROM default.llm_traces")
        .unwrap()
        .into_iter()
        .map(|r| (r["trace_id"].as_str().unwrap().to_owned(), r["app"].as_str().unwrap().to_owned()))
        .collect();
    let mut expected = std::collections::BTreeSet::new();
    for t in &ids {
        if llmtap_scorer::sample::is_sampled(t, "short", 0.3) {
            expected.insert((t.clone(), "short".to_owned()));
        }
        if apps[t] == "bot" && llmtap_scorer::sample::is_sampled(t, "helpful", 0.5) {
            expected.insert((t.clone(), "helpful".to_owned()));
        }
    }
    assert!(expected.len() > 20, "{}", expected.len());

    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("llmtap.toml");
    std::fs::write(
        &cfg_path,
        format!("[clickhouse]\nurl = \"{}\"\nbatch_max_age_ms = 100\npoll_interval_ms = 50\n{judges}", ch.url()),
    )
    .unwrap();
    let run = |shard: &str, data: PathBuf| {
        let (cfg, shard) = (cfg_path.to_str().unwrap().to_owned(), shard.to_owned());
        std::thread::spawn(move || {
            let args = ["score", "--once", "--shard", &shard, "--config", &cfg, "--data-dir", data.to_str().unwrap()];
            let (code, out, err) = llmtap_cli(&args, &[]);
            assert_eq!(code, 0, "{err}");
            serde_json::from_str::<Value>(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
        })
    };
    let shards = [run("0/2", dir.path().join("s0")), run("1/2", dir.path().join("s1"))];
    let summaries: Vec<Value> = shards.into_iter().map(|h| h.join().unwrap()).collect();
    eprintln!("shards: {summaries:?}");
    let verdicts: u64 = summaries.iter().map(|s| s["verdicts"].as_u64().unwrap()).sum();
    let read: u64 = summaries.iter().map(|s| s["calls_read"].as_u64().unwrap()).sum();
    assert_eq!(read, 90, "the shards split the calls: {summaries:?}");
    assert!(summaries.iter().all(|s| s["calls_read"].as_u64().unwrap() > 0), "{summaries:?}");
    assert_eq!(verdicts, expected.len() as u64, "{summaries:?}");
    assert_eq!(summaries.iter().map(|s| s["error_verdicts"].as_u64().unwrap()).sum::<u64>(), 0);

    // In ClickHouse: exactly the expected (trace, judge) pairs, each once.
    let rows = ch.rows("SELECT trace_id, judge, span_id, judge_kind, score FROM default.llm_scores").unwrap();
    assert_eq!(rows.len(), expected.len());
    let got: std::collections::BTreeSet<(String, String)> = rows
        .iter()
        .map(|r| (r["trace_id"].as_str().unwrap().to_owned(), r["judge"].as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(got, expected);
    for r in rows.iter().filter(|r| r["judge"] == "helpful") {
        assert_eq!((r["judge_kind"].as_str(), r["score"].as_f64()), (Some("llm"), Some(3.0)));
    }
    // A rerun of one shard (fresh disk) finds everything judged already.
    let again = run("0/2", dir.path().join("s0-again")).join().unwrap();
    assert_eq!(again["verdicts"], 0, "{again}");
    assert!(again["already_judged"].as_u64().unwrap() > 0, "{again}");
    assert_eq!(count(&ch, "SELECT count() AS n FROM default.llm_scores"), expected.len() as u64);
}

/// `[drift]` for the statistics comparison: small windows, and nothing may fire or hold
/// observations back, so both sources' windows are simply "the newest 150, and the 600
/// before them".
fn comparison_drift_config() -> String {
    let mut out = String::new();
    for s in llmtap_scorer::drift::engine::SIGNALS {
        out.push_str(&format!(
            "[drift.signals.{}]\ncurrent_window = 150\nbaseline_max = 600\nmin_baseline = 50\nhold_z = 1e9\n\
             cusum_h = 1e9\nz_fire = 1e9\npsi_fire = 1e9\njs_fire = 1e9\n",
            s.name
        ));
    }
    out
}

/// 1,000 calls of two models with ties, errors, refusals, tool paths and streams; two
/// judges' verdicts on each; human feedback on every third. One second apart, ending an hour
/// ago.
fn comparison_data() -> (Vec<TraceRecord>, Vec<ScoreRecord>, Vec<FeedbackRecord>) {
    use std::time::SystemTime;
    let mut rnd = fastrand::Rng::with_seed(42);
    let start = SystemTime::now() - Duration::from_secs(2 * 3600);
    let (mut calls, mut verdicts, mut feedback) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..1000u64 {
        let at = |ms: u64| Timestamp(start + Duration::from_millis(i * 1000 + ms));
        let model = if i < 500 || rnd.f64() < 0.6 { "gpt-4o" } else { "gpt-4o-mini" };
        let failed = rnd.f64() < 0.05;
        let paths: [&[&str]; 4] = [&[], &["search"], &["search", "book"], &["lookup"]];
        let trace_id = format!("{i:032x}");
        let streamed = i % 2 == 0;
        calls.push(TraceRecord {
            trace_id: trace_id.clone(),
            span_id: format!("{i:016x}"),
            ts: at(0),
            app: "bot".into(),
            route: "openai".into(),
            request_model: model.into(),
            response_model: if i % 7 == 0 { String::new() } else { format!("{model}-2024-08-06") },
            error_kind: if failed { ErrorKind::HttpError } else { ErrorKind::None },
            streamed,
            ttft_ms: if streamed { 100.0 + 300.0 * rnd.f64() } else { 0.0 },
            duration_ms: (800.0 * (1.0 + rnd.f64())).round(),
            // Many ties at the minimum: the "bin below the minimum" rule.
            cost_usd: if rnd.f64() < 0.4 { 0.001 } else { 0.001 + 0.002 * rnd.f64() },
            input_tokens: 100 + rnd.u64(0..20),
            output_tokens: 40 + rnd.u64(0..200),
            finish_reason: ["stop", "stop", "length", "tool_calls"][rnd.usize(0..4)].into(),
            output_text: match rnd.u8(0..10) {
                0 => "I'm sorry, but I can't do that.".into(),
                1 => String::new(),
                _ => "Here is the plan.".into(),
            },
            tool_calls: paths[rnd.usize(0..4)].iter().map(|s| s.to_string()).collect(),
            ..TraceRecord::default()
        });
        let passed = rnd.f64() < 0.85;
        verdicts.push(ScoreRecord {
            ts: at(100),
            trace_id: trace_id.clone(),
            judge: "cites_plan".into(),
            judge_kind: "rule".into(),
            app: "bot".into(),
            route: "openai".into(),
            request_model: model.into(),
            passed: u8::from(passed),
            score: f64::from(u8::from(passed)),
            ..ScoreRecord::default()
        });
        let score = f64::from(rnd.u8(1..=5));
        verdicts.push(ScoreRecord {
            ts: at(200),
            trace_id: trace_id.clone(),
            judge: "helpful".into(),
            judge_kind: "llm".into(),
            app: "bot".into(),
            route: "openai".into(),
            request_model: model.into(),
            passed: u8::from(score >= 4.0),
            score,
            needs_review: u8::from(score == 3.0),
            // Error verdicts are never observed by either source.
            error: if i % 50 == 0 { "timeout".into() } else { String::new() },
            ..ScoreRecord::default()
        });
        if i % 3 == 0 {
            let up = rnd.f64() < 0.8;
            feedback.push(FeedbackRecord {
                ts: at(500),
                trace_id,
                name: "thumbs".into(),
                value: if up { 1.0 } else { 0.0 },
                label: if i % 2 == 0 {
                    String::new()
                } else if up {
                    "Good".into()
                } else {
                    "bad".into()
                },
                ..FeedbackRecord::default()
            });
        }
    }
    (calls, verdicts, feedback)
}

fn insert<T: serde::Serialize>(ch: &ChdbAdapter, table: &str, rows: &[T]) {
    let mut sql = format!("INSERT INTO default.{table} FORMAT JSONEachRow\n");
    for r in rows {
        sql.push_str(&serde_json::to_string(r).unwrap());
        sql.push('\n');
    }
    ch.query(&sql).unwrap();
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[test]
fn the_clickhouse_source_computes_the_in_memory_statistics() {
    use llmtap_scorer::drift::detect::WindowStats;
    use llmtap_scorer::drift::{CallObs, DriftConfig, DriftEngine, Input};
    let Some(py) = chdb::python() else { return };
    let ch = ChdbAdapter::start(&py).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let drift = comparison_drift_config();
    let cfg_path = dir.path().join("llmtap.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "data_dir = {:?}\n[clickhouse]\nurl = \"{}\"\n[drift.clickhouse]\npoll_interval_secs = 1\n{drift}",
            dir.path().join("data"),
            ch.url()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(llmtap_bin()).args(args).arg("--config").arg(&cfg_path).output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        if args[0] == "drift" {
            let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
            assert_eq!((&summary["polls"], &summary["failed_queries"]), (&json!(2), &json!(0)), "{stderr}");
        }
        stdout
    };
    run(&["migrate"]);
    let (calls, verdicts, feedback) = comparison_data();
    insert(&ch, "llm_traces", &calls);
    insert(&ch, "llm_scores", &verdicts);
    insert(&ch, "llm_feedback", &feedback);

    // The ClickHouse source, through the binary.
    let mut fleet = std::collections::BTreeMap::new();
    // Two polls: the second reads only what each key with a full baseline still needs
    // (rows from the oldest one its windows used), and must see the same windows.
    for line in run(&["drift", "--polls", "2", "--stats"]).lines().filter(|l| l.contains("\"stats\"")) {
        let v: Value = serde_json::from_str(line).unwrap();
        let key: Vec<String> =
            ["signal", "app", "route", "model", "judge"].iter().map(|k| v[k].as_str().unwrap().to_owned()).collect();
        let st = &v["stats"];
        let num = |k: &str| st[k].as_f64().unwrap_or(f64::NAN);
        let st = WindowStats {
            baseline_n: st["baseline_n"].as_u64().unwrap(),
            current_n: st["current_n"].as_u64().unwrap(),
            baseline_value: num("baseline_value"),
            current_value: num("current_value"),
            z: num("z"),
            psi: num("psi"),
            ks_d: num("ks_d"),
            ks_p: num("ks_p"),
            js: num("js"),
            chi2_p: num("chi2_p"),
            category: st["category"].as_str().map(str::to_owned),
        };
        fleet.insert(key, st);
    }

    let bounded = ch.statements().unwrap().iter().filter(|q| q.contains(") WHERE t >= transform(concat(a")).count();
    assert!(bounded >= 10, "the second poll's queries read from per-key bounds ({bounded})");

    // The in-memory source, fed the same rows in time order.
    #[derive(serde::Deserialize)]
    struct Wrapper {
        drift: DriftConfig,
    }
    let cfg: Wrapper = toml::from_str(&drift).unwrap();
    let mut engine = DriftEngine::new(cfg.drift);
    let mut inputs: Vec<(Timestamp, Input)> = Vec::new();
    inputs.extend(calls.iter().map(|c| (c.ts, Input::Call(Box::new(CallObs::from(c))))));
    inputs.extend(verdicts.iter().map(|v| (v.ts, Input::Verdict(Box::new(v.clone())))));
    inputs.extend(feedback.iter().map(|f| (f.ts, Input::Feedback(Box::new(f.clone())))));
    inputs.sort_by_key(|(t, _)| *t);
    for (_, input) in &inputs {
        assert!(engine.observe(input).is_empty(), "nothing may fire in this comparison");
    }
    let memory = engine.window_stats();

    // Same keys, same counts, same statistics.
    let mut memory: Vec<_> = memory
        .into_iter()
        .map(|(k, s, st)| (vec![s.to_string(), k.app.clone(), k.route.clone(), k.model.clone(), k.judge.clone()], st))
        .collect();
    memory.sort_by(|a, b| a.0.cmp(&b.0));
    let keys: Vec<Vec<String>> = memory.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys, fleet.keys().cloned().collect::<Vec<_>>());
    // 10 call signals × 4 response models and the app, the model mix, 1 + 3 verdict
    // signals × 2 request models and the app, and agreement for each judge.
    assert_eq!(memory.len(), 10 * 5 + 1 + 4 * 3 + 2, "{keys:?}");
    for ((key, m), _) in memory.iter().zip(&keys) {
        let f = &fleet[key];
        assert_eq!((m.baseline_n, m.current_n, &m.category), (f.baseline_n, f.current_n, &f.category), "{key:?}");
        assert!(m.current_n > 0, "{key:?}");
        for (what, a, b) in [
            ("baseline_value", m.baseline_value, f.baseline_value),
            ("current_value", m.current_value, f.current_value),
            ("z", m.z, f.z),
            ("psi", m.psi, f.psi),
            ("ks_d", m.ks_d, f.ks_d),
            ("ks_p", m.ks_p, f.ks_p),
            ("js", m.js, f.js),
            ("chi2_p", m.chi2_p, f.chi2_p),
        ] {
            assert!(close(a, b), "{key:?} {what}: in memory {a}, clickhouse {b}");
        }
    }
    // The statistics are not all zero: the comparison compares something.
    let psi: f64 = memory.iter().map(|(_, s)| s.psi).sum();
    let js: f64 = memory.iter().map(|(_, s)| s.js).sum();
    let z: f64 = memory.iter().map(|(_, s)| s.z.abs()).sum();
    assert!(psi > 0.1 && js > 0.05 && z > 1.0, "psi {psi} js {js} z {z}");
}

/// A judge's pass rate falls from 0.9 to 0.7 across the fleet's verdicts: `llmtap drift`
/// fires once per key with `control_surface = "prompt"` and ships the events; a second run
/// finds them still open and fires nothing; `serve` with `drift.source = "clickhouse"`
/// restores them into its gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clickhouse_source_fires_once_ships_and_restores_after_a_restart() {
    let Some(py) = chdb::python() else { return };
    let ch = ChdbAdapter::start(&py).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cfg_path = dir.path().join("llmtap.toml");
    let ch_cfg = format!("[clickhouse]\nurl = \"{}\"\nbatch_max_age_ms = 100\npoll_interval_ms = 50\n", ch.url());
    std::fs::write(&cfg_path, format!("data_dir = {:?}\n{ch_cfg}", data_dir)).unwrap();
    let run = |args: &[&str]| -> Value {
        let out = std::process::Command::new(llmtap_bin()).args(args).arg("--config").arg(&cfg_path).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        stdout.lines().last().map(|l| serde_json::from_str(l).unwrap()).unwrap_or(Value::Null)
    };
    run(&["migrate"]);
    let mut rnd = fastrand::Rng::with_seed(9);
    let start = std::time::SystemTime::now() - Duration::from_secs(3600);
    let verdicts: Vec<ScoreRecord> = (0..3000u64)
        .map(|i| {
            let passed = rnd.f64() < if i < 2400 { 0.9 } else { 0.7 };
            ScoreRecord {
                ts: Timestamp(start + Duration::from_millis(i * 500)),
                trace_id: format!("{i:032x}"),
                judge: "cites_plan".into(),
                judge_kind: "rule".into(),
                app: "bot".into(),
                route: "openai".into(),
                request_model: "gpt-4o".into(),
                passed: u8::from(passed),
                score: f64::from(u8::from(passed)),
                ..ScoreRecord::default()
            }
        })
        .collect();
    insert(&ch, "llm_scores", &verdicts);

    let first = run(&["drift", "--once"]);
    assert_eq!((&first["events"], &first["restored"], &first["failed_queries"]), (&json!(2), &json!(0), &json!(0)));
    let events = read_records(&data_dir.join("drift"));
    let got: Vec<(&str, &str, &str, &str, &str)> = events
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap();
            (s("signal"), s("model"), s("state"), s("method"), s("control_surface"))
        })
        .collect();
    assert_eq!(
        got,
        [
            ("judge_pass_rate", "*", "firing", "z_test", "prompt"),
            ("judge_pass_rate", "gpt-4o", "firing", "z_test", "prompt")
        ]
    );
    for e in &events {
        assert_eq!((&e["baseline_n"], &e["current_n"]), (&json!(2500), &json!(500)));
        let (b, c) = (e["baseline_value"].as_f64().unwrap(), e["current_value"].as_f64().unwrap());
        assert!((0.85..0.9).contains(&b) && (0.65..0.75).contains(&c), "{e}");
    }
    // Shipped before `llmtap drift` exited.
    assert_eq!(count(&ch, "SELECT count() AS n FROM default.llm_drift_events WHERE state = 'firing'"), 2);

    let second = run(&["drift", "--once"]);
    assert_eq!((&second["events"], &second["restored"]), (&json!(0), &json!(2)));
    assert_eq!(read_records(&data_dir.join("drift")).len(), 2);

    // `serve` with the ClickHouse source: the open episodes are in its gauge.
    let mock = MockUpstream::start("127.0.0.1:0".parse().unwrap(), &fixtures_dir()).await.unwrap();
    let config = format!(
        "{ch_cfg}[drift]\nsource = \"clickhouse\"\n[drift.clickhouse]\npoll_interval_secs = 1\n{}",
        base_config(&mock)
    );
    let p = LlmtapProcess::start(llmtap_bin(), &config, &[]).unwrap();
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        let r = send(&c, hyper::Method::GET, &format!("http://{}/metrics", p.admin), &[], "").await;
        let m = String::from_utf8_lossy(&r.body).into_owned();
        if m.contains("llmtap_drift_active{") || Instant::now() > deadline {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let active: Vec<&str> = metrics.lines().filter(|l| l.starts_with("llmtap_drift_active{")).collect();
    assert_eq!(active.len(), 2, "{metrics}\n{}", p.stderr());
    assert!(active.iter().all(|l| l.contains("control_surface=\"prompt\"") && l.ends_with(" 1")), "{active:?}");
    assert!(!p.stderr().contains("drift query failed"), "{}", p.stderr());
    // SIGTERM stops the poll loop with the rest.
    let mut p = p;
    p.terminate().unwrap();
    assert!(p.wait_exit(Duration::from_secs(20)).unwrap().success(), "{}", p.stderr());
}
