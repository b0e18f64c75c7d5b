//! Talking to ClickHouse: one client, one retry policy (`classify`), migrations, and the
//! `BatchSink` the shipper inserts through. Every insert carries the caller's
//! `insert_deduplication_token`.

use std::future::Future;
use std::time::Duration;

use clickhouse::{Client, Row, RowWrite};
use serde::Deserialize;

use super::config::ValidatedClickHouse;
use super::encode::{DriftRow, FeedbackRow, ScoreRow, TraceRow};
use super::schema::{latest_version, SchemaContext, MIGRATIONS};
use super::shipper::{BatchSink, InsertError, KindSpec, Line, PrepareError};
use crate::background::Yielder;
use crate::record::{DriftEventRecord, FeedbackRecord, ScoreRecord, TraceRecord};

/// ClickHouse exception codes that mean "these rows are wrong": retrying the same bytes
/// cannot succeed, so the rows are isolated and quarantined. Every other failure (down,
/// overloaded, too many parts, missing table, auth) is retried with the rows kept on disk.
const CONTENT_ERRORS: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    469, // VIOLATED_CONSTRAINT
];

/// llmtap's own code for a local-log line that is not a record of its kind.
pub const LOCAL_PARSE_ERROR: u32 = 0;

/// `s` as a ClickHouse string literal.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The ClickHouse exception code at the start of an error text (`Code: 60. DB::Exception…`).
/// The crate reports server errors only as text; the code prefix is ClickHouse's stable
/// wire format, so this reads the number, never the message.
pub fn exception_code(text: &str) -> Option<u32> {
    let rest = text.trim_start().strip_prefix("Code: ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The one place that decides retry or give up.
pub fn classify(e: clickhouse::error::Error) -> InsertError {
    use clickhouse::error::Error as E;
    match e {
        E::BadResponse(text) => match exception_code(&text) {
            Some(code) if CONTENT_ERRORS.contains(&code) => InsertError::Rejected { code, message: text },
            _ => InsertError::Retryable(format!("clickhouse answered: {text}")),
        },
        E::TimedOut => InsertError::Retryable("timed out".into()),
        E::Network(err) => InsertError::Retryable(format!("network: {err}")),
        E::Custom(msg) => {
            InsertError::Rejected { code: LOCAL_PARSE_ERROR, message: format!("row serialisation: {msg}") }
        }
        other => InsertError::Retryable(other.to_string()),
    }
}

/// Why migrations did not apply.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("clickhouse schema is at version {found}, newer than this llmtap knows ({known}); upgrade llmtap before pointing it at this database")]
    NewerSchema { found: u32, known: u32 },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] InsertError),
}

/// The ClickHouse connection llmtap uses for inserts, migrations and stats.
#[derive(Clone)]
pub struct ClickHouseSink {
    client: Client,
    pub cfg: ValidatedClickHouse,
}

impl std::fmt::Debug for ClickHouseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseSink").field("url", &self.cfg.url).field("database", &self.cfg.database).finish()
    }
}

#[derive(Row, Deserialize)]
struct Version {
    version: u32,
}

impl ClickHouseSink {
    pub fn new(cfg: &ValidatedClickHouse) -> Self {
        let mut client = Client::default().with_url(&cfg.url).with_database(&cfg.database).with_user(&cfg.user);
        if !cfg.password.is_empty() {
            client = client.with_password(&cfg.password);
        }
        ClickHouseSink { client, cfg: cfg.clone() }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn schema_context(&self) -> SchemaContext {
        SchemaContext {
            database: self.cfg.database.clone(),
            cluster: self.cfg.cluster.clone(),
            ttl_days: self.cfg.ttl_days,
            body_ttl_days: self.cfg.body_ttl_days,
            rollup_ttl_days: self.cfg.rollup_ttl_days,
        }
    }

    /// Runs a request under `request_timeout`, mapped through the retry policy.
    pub(crate) async fn timed<T>(
        &self,
        f: impl Future<Output = clickhouse::error::Result<T>>,
    ) -> Result<T, InsertError> {
        match tokio::time::timeout(self.cfg.request_timeout, f).await {
            Ok(r) => r.map_err(classify),
            Err(_) => Err(InsertError::Retryable(format!("no answer within {:?}", self.cfg.request_timeout))),
        }
    }

    /// Runs a SELECT as written and returns its `JSONEachRow` lines (64-bit integers as
    /// plain numbers), under `request_timeout` like every other request.
    pub async fn json_lines(&self, sql: &str) -> Result<Vec<String>, InsertError> {
        let client = self.client.clone().with_setting("output_format_json_quote_64bit_integers", "0");
        let bytes = self.timed(async { client.query(sql).fetch_bytes("JSONEachRow")?.collect().await }).await?;
        Ok(String::from_utf8_lossy(&bytes).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect())
    }

    /// Runs one statement (DDL, INSERT … VALUES) as written (no `?` binding).
    pub async fn execute(&self, sql: &str) -> Result<(), InsertError> {
        // The database may not exist yet when the bootstrap creates it.
        let client = self.client.clone().with_database("default");
        self.timed(client.query_raw(sql).execute()).await
    }

    /// Schema versions recorded as applied; empty when the migrations table does not exist.
    pub async fn applied_versions(&self) -> Result<Vec<u32>, InsertError> {
        let sql = format!("SELECT version FROM {}.llmtap_migrations FINAL ORDER BY version", self.cfg.database);
        match self.timed(self.client.query_raw(&sql).fetch_all::<Version>()).await {
            Ok(v) => Ok(v.into_iter().map(|v| v.version).collect()),
            // UNKNOWN_TABLE, UNKNOWN_DATABASE: nothing applied yet.
            Err(InsertError::Retryable(text))
                if matches!(exception_code(text.trim_start_matches("clickhouse answered: ")), Some(60 | 81)) =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// The statements `migrate` would run now, in order (`llmtap migrate --dry-run`).
    pub async fn plan(&self) -> Result<Vec<String>, MigrateError> {
        let applied = self.applied_versions().await?;
        let found = applied.iter().copied().max().unwrap_or(0);
        if found > latest_version() {
            return Err(MigrateError::NewerSchema { found, known: latest_version() });
        }
        let ctx = self.schema_context();
        let mut out = ctx.bootstrap();
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            out.extend(ctx.statements(m));
            out.push(format!(
                "INSERT INTO {}.llmtap_migrations (version, name, checksum, applied_at) VALUES ({}, '{}', '{}', now64(3))",
                ctx.database,
                m.version,
                m.name,
                m.checksum()
            ));
        }
        Ok(out)
    }

    /// Applies pending migrations; returns the statements it ran (the same as `plan`).
    /// Every statement is idempotent, so an interrupted run is simply run again.
    pub async fn migrate(&self) -> Result<Vec<String>, MigrateError> {
        let plan = self.plan().await?;
        for stmt in &plan {
            self.execute(stmt).await?;
        }
        Ok(plan)
    }

    /// Inserts rows borrowed from records (`R::Value<'_>` is `R` with the data's lifetime).
    async fn insert_rows<R: Row + RowWrite>(
        &self,
        table: &str,
        rows: &[R::Value<'_>],
        token: &str,
    ) -> Result<(), InsertError> {
        let mut insert = self
            .timed(self.client.insert::<R>(table))
            .await?
            .with_setting("insert_deduplication_token", token)
            .with_setting("deduplicate_blocks_in_dependent_materialized_views", "1")
            .with_timeouts(Some(self.cfg.request_timeout), Some(self.cfg.request_timeout));
        let mut turn = Yielder::new();
        for row in rows {
            turn.tick();
            insert.write(row).await.map_err(classify)?;
        }
        insert.end().await.map_err(classify)
    }
}

fn parse_all<'a, T: Deserialize<'a>>(kind: KindSpec, lines: &'a [Line]) -> Result<Vec<T>, InsertError> {
    let mut turn = Yielder::new();
    lines
        .iter()
        .map(|l| {
            turn.tick();
            serde_json::from_str::<T>(&l.text).map_err(|e| InsertError::Rejected {
                code: LOCAL_PARSE_ERROR,
                message: format!("local log line at byte {} is not a {} record: {e}", l.start, kind.table),
            })
        })
        .collect()
}

impl BatchSink for ClickHouseSink {
    async fn insert(&self, kind: KindSpec, lines: &[Line], token: &str) -> Result<(), InsertError> {
        {
            match kind.folder {
                "traces" => {
                    let recs: Vec<TraceRecord> = parse_all(kind, lines)?;
                    let rows: Vec<TraceRow<'_>> = recs.iter().map(TraceRow::from).collect();
                    self.insert_rows::<TraceRow<'_>>(kind.table, &rows, token).await
                }
                "scores" => {
                    let recs: Vec<ScoreRecord> = parse_all(kind, lines)?;
                    let rows: Vec<ScoreRow<'_>> = recs.iter().map(ScoreRow::from).collect();
                    self.insert_rows::<ScoreRow<'_>>(kind.table, &rows, token).await
                }
                "feedback" => {
                    let recs: Vec<FeedbackRecord> = parse_all(kind, lines)?;
                    let rows: Vec<FeedbackRow<'_>> = recs.iter().map(FeedbackRow::from).collect();
                    self.insert_rows::<FeedbackRow<'_>>(kind.table, &rows, token).await
                }
                "drift" => {
                    let recs: Vec<DriftEventRecord> = parse_all(kind, lines)?;
                    let rows: Vec<DriftRow<'_>> = recs.iter().map(DriftRow::from).collect();
                    self.insert_rows::<DriftRow<'_>>(kind.table, &rows, token).await
                }
                other => Err(InsertError::Rejected {
                    code: LOCAL_PARSE_ERROR,
                    message: format!("unknown record folder {other}"),
                }),
            }
        }
    }
}

/// What `serve` runs before shipping: migrations (or, with `migrate_on_start = false`, a
/// check that the schema is not newer than this binary).
pub async fn prepare(sink: std::sync::Arc<ClickHouseSink>) -> Result<(), PrepareError> {
    let res = if sink.cfg.migrate_on_start { sink.migrate().await.map(|_| ()) } else { sink.plan().await.map(|_| ()) };
    match res {
        Ok(()) => Ok(()),
        Err(e @ MigrateError::NewerSchema { .. }) => Err(PrepareError::Fatal(e.to_string())),
        Err(MigrateError::ClickHouse(e)) => Err(PrepareError::Retryable(e.to_string())),
    }
}

/// How long to wait for ClickHouse during a one-off command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_read_from_the_exception_prefix() {
        assert_eq!(exception_code("Code: 469. DB::Exception: Constraint `ts_is_plausible` ..."), Some(469));
        assert_eq!(exception_code("  Code: 60. DB::Exception: Table x does not exist"), Some(60));
        assert_eq!(exception_code("503 Service Unavailable"), None);
    }

    #[test]
    fn content_errors_are_rejected_everything_else_retried() {
        let rejected = classify(clickhouse::error::Error::BadResponse("Code: 469. DB::Exception: violated".into()));
        assert!(matches!(rejected, InsertError::Rejected { code: 469, .. }));
        for text in ["Code: 60. DB::Exception: no table", "Code: 252. DB::Exception: too many parts", "502 Bad Gateway"]
        {
            assert!(
                matches!(classify(clickhouse::error::Error::BadResponse(text.into())), InsertError::Retryable(_)),
                "{text}"
            );
        }
        assert!(matches!(classify(clickhouse::error::Error::TimedOut), InsertError::Retryable(_)));
    }
}
