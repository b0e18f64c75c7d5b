//! ClickHouse on the real engine (chdb behind the test adapter): migrations, end-to-end
//! shipping with exact values, an outage, a crash, a poison record, JSONEachRow loading of a
//! local segment, and `stats --from clickhouse`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
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
