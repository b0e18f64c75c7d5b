//! The ClickHouse schema: numbered migrations embedded from `deploy/clickhouse/*.sql`,
//! rendered for one server or for a cluster (`ON CLUSTER`, Replicated engines, Distributed
//! tables). Rendering is pure; `service` executes the statements and records each applied
//! migration in `llmtap_migrations`.

/// One numbered migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    template: &'static str,
}

/// Every migration this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "llm_traces",
        template: include_str!("../../../../deploy/clickhouse/0001_llm_traces.sql"),
    },
    Migration {
        version: 2,
        name: "llm_scores",
        template: include_str!("../../../../deploy/clickhouse/0002_llm_scores.sql"),
    },
    Migration {
        version: 3,
        name: "llm_feedback",
        template: include_str!("../../../../deploy/clickhouse/0003_llm_feedback.sql"),
    },
    Migration {
        version: 4,
        name: "llm_drift_events",
        template: include_str!("../../../../deploy/clickhouse/0004_llm_drift_events.sql"),
    },
    Migration {
        version: 5,
        name: "llm_traces_minute",
        template: include_str!("../../../../deploy/clickhouse/0005_llm_traces_minute.sql"),
    },
    Migration {
        version: 6,
        name: "llm_scores_span",
        template: include_str!("../../../../deploy/clickhouse/0006_llm_scores_span.sql"),
    },
];

/// The newest schema version this binary knows.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// What the templates are rendered with.
#[derive(Clone, Debug)]
pub struct SchemaContext {
    pub database: String,
    pub cluster: Option<String>,
    pub ttl_days: u32,
    pub body_ttl_days: u32,
    pub rollup_ttl_days: u32,
}

impl SchemaContext {
    fn on_cluster(&self) -> String {
        self.cluster.as_ref().map(|c| format!("ON CLUSTER {c}")).unwrap_or_default()
    }

    /// `MergeTree`, or `ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/{table}',
    /// '{replica}')` with a cluster; engine arguments such as `ReplacingMergeTree(ts)` follow.
    fn engine(&self, spec: &str) -> String {
        let (family, args) = match spec.split_once('(') {
            Some((f, rest)) => (f, rest.trim_end_matches(')')),
            None => (spec, ""),
        };
        match &self.cluster {
            None => spec.to_owned(),
            Some(_) => {
                let mut a = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'".to_owned();
                if !args.is_empty() {
                    a.push_str(", ");
                    a.push_str(args);
                }
                format!("Replicated{family}({a})")
            }
        }
    }

    /// Renders a template: conditional sections, then placeholders.
    pub fn render(&self, template: &str) -> String {
        let mut kept = String::with_capacity(template.len());
        let mut keep = true;
        for line in template.lines() {
            let t = line.trim();
            if let Some(cond) = t.strip_prefix("-- @if ") {
                keep = match cond.trim() {
                    "cluster" => self.cluster.is_some(),
                    "single" => self.cluster.is_none(),
                    _ => true,
                };
                continue;
            }
            if t == "-- @endif" {
                keep = true;
                continue;
            }
            if keep {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        let mut out = String::with_capacity(kept.len());
        let mut rest = kept.as_str();
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let Some(len) = rest[start..].find("}}") else {
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let key = &rest[start + 2..start + len];
            let value = match key {
                "database" => self.database.clone(),
                "on_cluster" => self.on_cluster(),
                "local" => {
                    if self.cluster.is_some() {
                        "_local".into()
                    } else {
                        String::new()
                    }
                }
                "cluster" => self.cluster.clone().unwrap_or_default(),
                "ttl_days" => self.ttl_days.to_string(),
                "body_ttl_days" => self.body_ttl_days.to_string(),
                "rollup_ttl_days" => self.rollup_ttl_days.to_string(),
                k => match k.strip_prefix("engine:") {
                    Some(spec) => self.engine(spec),
                    None => format!("{{{{{k}}}}}"),
                },
            };
            out.push_str(&value);
            rest = &rest[start + len + 2..];
        }
        out.push_str(rest);
        out
    }

    /// The statements that create the database and the migrations table.
    pub fn bootstrap(&self) -> Vec<String> {
        vec![
            format!("CREATE DATABASE IF NOT EXISTS {} {}", self.database, self.on_cluster()).trim_end().to_owned(),
            format!(
                "CREATE TABLE IF NOT EXISTS {db}.llmtap_migrations {oc}\n(\n    version UInt32,\n    name String,\n    checksum String,\n    applied_at DateTime64(3, 'UTC')\n)\nENGINE = {engine}\nORDER BY version",
                db = self.database,
                oc = self.on_cluster(),
                engine = self.engine("ReplacingMergeTree(applied_at)"),
            ),
        ]
    }

    /// A migration's statements, rendered.
    pub fn statements(&self, m: &Migration) -> Vec<String> {
        split_statements(&self.render(m.template))
    }
}

impl Migration {
    /// FNV-1a of the template, recorded with the migration so a changed file is noticed.
    pub fn checksum(&self) -> String {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in self.template.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        format!("{h:016x}")
    }
}

/// Splits SQL at `;` that end a line; comment-only pieces are dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in sql.lines() {
        let t = line.trim_end();
        if let Some(body) = t.strip_suffix(';') {
            cur.push_str(body);
            push_statement(&mut out, &mut cur);
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    push_statement(&mut out, &mut cur);
    out
}

fn push_statement(out: &mut Vec<String>, cur: &mut String) {
    let has_sql = cur.lines().any(|l| {
        let t = l.trim();
        !t.is_empty() && !t.starts_with("--")
    });
    if has_sql {
        // Leading comment lines stay: they document the statement in `--dry-run` output.
        out.push(cur.trim().to_owned());
    }
    cur.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(cluster: Option<&str>) -> SchemaContext {
        SchemaContext {
            database: "llm".into(),
            cluster: cluster.map(str::to_owned),
            ttl_days: 90,
            body_ttl_days: 30,
            rollup_ttl_days: 400,
        }
    }

    #[test]
    fn single_server_rendering() {
        let stmts = ctx(None).statements(&MIGRATIONS[0]);
        assert_eq!(stmts.len(), 1);
        let s = &stmts[0];
        assert!(
            s.contains("CREATE TABLE IF NOT EXISTS llm.llm_traces \n")
                || s.contains("CREATE TABLE IF NOT EXISTS llm.llm_traces \n("),
            "{s}"
        );
        assert!(s.contains("ENGINE = MergeTree\n"));
        assert!(s.contains("TTL toDateTime(ts) + INTERVAL 30 DAY"));
        assert!(!s.contains("{{"), "{s}");
        let scores = ctx(None).statements(&MIGRATIONS[1]);
        assert!(scores[0].contains("ENGINE = ReplacingMergeTree(ts)"));
    }

    #[test]
    fn cluster_rendering_uses_replicated_and_distributed() {
        let stmts = ctx(Some("prod")).statements(&MIGRATIONS[1]);
        assert_eq!(stmts.len(), 2);
        assert!(stmts[0].contains("CREATE TABLE IF NOT EXISTS llm.llm_scores_local ON CLUSTER prod"));
        assert!(stmts[0].contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', ts)"
        ));
        assert!(stmts[1].contains("ENGINE = Distributed(prod, llm, llm_scores_local, cityHash64(trace_id))"));
        let rollup = ctx(Some("prod")).statements(&MIGRATIONS[4]);
        assert_eq!(rollup.len(), 3);
        assert!(rollup[1].contains("TO llm.llm_traces_minute_local"));
    }

    #[test]
    fn versions_are_dense_and_ordered() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
        }
        assert_eq!(latest_version(), 6);
    }

    #[test]
    fn split_keeps_statements_and_drops_comment_only_pieces() {
        let s = split_statements("-- a\nSELECT 1;\n\n-- only a comment\n");
        assert_eq!(s, vec!["-- a\nSELECT 1"]);
    }
}
