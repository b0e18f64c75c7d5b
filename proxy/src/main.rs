//! `llmtap`: the sidecar binary. Wires config, the proxy and the recorder together;
//! every decision lives in the library modules.

mod admin;
mod body;
mod config;
mod drift;
mod feedback;
mod forward;
mod h1;
mod judging;
mod pool;
mod route;
mod score;
mod server;
mod tap;
mod upstream;
mod workers;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use llmtap_ingest::stats::{self, GroupBy};

use crate::config::{Config, Overrides};

#[derive(Parser)]
#[command(name = "llmtap", version, about = "Transparent tracing proxy for LLM APIs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Config file (TOML).
    #[arg(long, env = "LLMTAP_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Local data directory (traces/, scores/, …).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Proxy listen address.
        #[arg(long)]
        listen: Option<String>,
        /// Admin listen address (health, readiness).
        #[arg(long)]
        admin_listen: Option<String>,
    },
    /// Summaries per model, app and route from the local trace log.
    Stats {
        #[command(flatten)]
        common: Common,
        /// Group by (repeatable or comma-separated); default: model, app and route.
        #[arg(long, value_delimiter = ',')]
        by: Vec<By>,
        /// Only calls newer than this (e.g. 30m, 6h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// How many tool paths to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Where to read: the local trace log or ClickHouse (all sidecars together).
        #[arg(long, value_enum, default_value_t = Source::Local)]
        from: Source,
        /// Per judge, app and model: verdicts, pass rate, mean score, reviews, errors, cost
        /// and agreement with human feedback (from the local log).
        #[arg(long)]
        judges: bool,
    },
    /// Create or upgrade the ClickHouse schema.
    Migrate {
        #[command(flatten)]
        common: Common,
        /// Print the SQL that would run, and run nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Judge sampled calls read from ClickHouse (the fleet's scorer; see `--shard`).
    Score {
        #[command(flatten)]
        common: Common,
        /// This worker's share: calls with cityHash64(trace_id) % N = i.
        #[arg(long, default_value = "0/1")]
        shard: score::Shard,
        /// Read what is there once, judge it, ship the verdicts and exit.
        #[arg(long)]
        once: bool,
        /// Only calls newer than this (s, m, h, d).
        #[arg(long, default_value = "1h")]
        since: String,
        /// Re-read this far behind the newest call seen, for rows that reach ClickHouse late.
        #[arg(long, default_value = "5m")]
        lookback: String,
        /// Pause between passes.
        #[arg(long, default_value = "5s")]
        poll_interval: String,
    },
    /// Watch the whole fleet for drift from ClickHouse (one job per fleet): the signals of
    /// `serve`'s in-memory source, computed in SQL over every sidecar's rows.
    Drift {
        #[command(flatten)]
        common: Common,
        /// Poll once, write the events and exit (`--polls 1`).
        #[arg(long)]
        once: bool,
        /// Poll this many times (at `drift.clickhouse.poll_interval_secs`), then exit.
        #[arg(long)]
        polls: Option<u64>,
        /// Print every key's window statistics of the last poll (JSON lines) at exit.
        #[arg(long)]
        stats: bool,
    },
    /// Verdicts that need a human (inside a judge's review band), oldest first.
    Review {
        #[command(flatten)]
        common: Common,
        /// Only this judge.
        #[arg(long)]
        judge: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the config and print the effective one.
    Check {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    Local,
    Clickhouse,
}

#[derive(Clone, Copy, ValueEnum)]
enum By {
    Model,
    App,
    Route,
}

fn llmtap_env() -> Vec<(String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with("LLMTAP_")).collect()
}

fn load(
    common: &Common,
    listen: Option<String>,
    admin_listen: Option<String>,
) -> anyhow::Result<(Config, Vec<(String, String)>)> {
    let env = llmtap_env();
    let flags = Overrides { listen, admin_listen, data_dir: common.data_dir.clone() };
    let cfg = Config::load(common.config.as_deref(), &env, &flags)?;
    Ok((cfg, env))
}

/// The ClickHouse connection a command needs; an error when none is configured.
fn clickhouse_sink(
    cfg: &Config,
    env: &[(String, String)],
) -> anyhow::Result<llmtap_ingest::sink::clickhouse::ClickHouseSink> {
    let v = cfg.validate(env)?;
    let ch = v
        .clickhouse
        .ok_or_else(|| anyhow::anyhow!("clickhouse.url is empty: set LLMTAP_CLICKHOUSE_URL or [clickhouse] url"))?;
    Ok(llmtap_ingest::sink::clickhouse::ClickHouseSink::new(&ch))
}

/// `30s`, `5m`, `6h`, `7d` as a duration.
fn parse_duration(flag: &str, s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| anyhow::anyhow!("{flag} {s:?}: expected a number and a unit (s, m, h, d)"))?;
    Ok(Duration::from_secs(match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => anyhow::bail!("{flag} {s:?}: unit must be s, m, h or d"),
    }))
}

fn parse_since(s: &str) -> anyhow::Result<u64> {
    let ago = parse_duration("--since", s)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Ok(now.saturating_sub(ago).as_millis() as u64)
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // Reports go to stdout through `?`, so a closed pipe (`llmtap stats | head`) ends the
    // command instead of panicking in `println!`.
    let out = &mut std::io::stdout();
    match cli.command {
        Command::Serve { common, listen, admin_listen } => {
            let (cfg, env) = load(&common, listen, admin_listen)?;
            let validated = cfg.validate(&env)?;
            init_tracing(&validated.raw.log_level);
            // Setup, the listener and the admin API; calls run on the workers' runtimes.
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(server::serve(validated, server::shutdown_signal()))
        }
        Command::Score { common, shard, once, since, lookback, poll_interval } => {
            let (cfg, env) = load(&common, None, None)?;
            let validated = cfg.validate(&env)?;
            init_tracing(&validated.raw.log_level);
            let args = score::ScoreArgs {
                shard,
                once,
                since: parse_duration("--since", &since)?,
                lookback: parse_duration("--lookback", &lookback)?,
                poll_interval: parse_duration("--poll-interval", &poll_interval)?,
                page_rows: 5000,
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("llmtap").build()?;
            let summary = rt.block_on(score::run(validated, args, server::shutdown_signal()))?;
            writeln!(out, "{}", serde_json::to_string(&summary)?)?;
            Ok(())
        }
        Command::Drift { common, once, polls, stats } => {
            let (cfg, env) = load(&common, None, None)?;
            let validated = cfg.validate(&env)?;
            init_tracing(&validated.raw.log_level);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("llmtap").build()?;
            let polls = if once { Some(1) } else { polls };
            let summary = rt.block_on(drift::run(validated, polls, server::shutdown_signal()))?;
            if stats {
                for (key, signal, st) in &summary.stats {
                    let line = serde_json::json!({
                        "signal": signal, "app": key.app, "route": key.route, "model": key.model,
                        "judge": key.judge, "stats": st,
                    });
                    writeln!(out, "{line}")?;
                }
            }
            writeln!(out, "{}", serde_json::to_string(&summary)?)?;
            Ok(())
        }
        Command::Review { common, judge, limit, json } => {
            let (cfg, _) = load(&common, None, None)?;
            let items = llmtap_scorer::report::review_queue(&cfg.data_dir, judge.as_deref(), limit)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", cfg.data_dir.join("scores").display()))?;
            if json {
                for v in &items {
                    writeln!(out, "{}", serde_json::to_string(v)?)?;
                }
            } else {
                write!(out, "{}", llmtap_scorer::report::render_review(&items))?;
            }
            Ok(())
        }
        Command::Stats { common, by, since, top, json, from, judges } => {
            let (cfg, env) = load(&common, None, None)?;
            if judges {
                let rows = llmtap_scorer::report::judges_report(&cfg.data_dir)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", cfg.data_dir.join("scores").display()))?;
                if json {
                    writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
                } else {
                    write!(out, "{}", llmtap_scorer::report::render(&rows))?;
                }
                return Ok(());
            }
            let by: Vec<GroupBy> = if by.is_empty() {
                vec![GroupBy::Model, GroupBy::App, GroupBy::Route]
            } else {
                by.into_iter()
                    .map(|b| match b {
                        By::Model => GroupBy::Model,
                        By::App => GroupBy::App,
                        By::Route => GroupBy::Route,
                    })
                    .collect()
            };
            let since_ms = since.as_deref().map(parse_since).transpose()?;
            let (report, bad) = if from == Source::Clickhouse {
                let sink = clickhouse_sink(&cfg, &env)?;
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let report = rt
                    .block_on(llmtap_ingest::sink::clickhouse::stats::from_clickhouse(&sink, &by, since_ms, top))
                    .map_err(|e| anyhow::anyhow!("clickhouse {}: {e}", sink.cfg.url))?;
                (report, 0)
            } else {
                stats::from_local_log(&cfg.data_dir, &by, since_ms, top)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", cfg.data_dir.join("traces").display()))?
            };
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                write!(out, "{}", report.render())?;
            }
            if bad > 0 {
                eprintln!("llmtap stats: skipped {bad} lines that are not trace records");
            }
            Ok(())
        }
        Command::Migrate { common, dry_run } => {
            let (cfg, env) = load(&common, None, None)?;
            let sink = clickhouse_sink(&cfg, &env)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let statements = rt.block_on(async {
                if dry_run {
                    sink.plan().await
                } else {
                    sink.migrate().await
                }
            })?;
            if dry_run {
                for s in &statements {
                    writeln!(out, "{s};\n")?;
                }
            } else {
                let versions = rt.block_on(sink.applied_versions()).map_err(|e| anyhow::anyhow!("clickhouse: {e}"))?;
                eprintln!(
                    "llmtap migrate: {} statements run; schema at version {} (database {})",
                    statements.len(),
                    versions.iter().max().copied().unwrap_or(0),
                    sink.cfg.database
                );
            }
            Ok(())
        }
        Command::Check { common } => {
            let (cfg, env) = load(&common, None, None)?;
            let v = cfg.validate(&env)?;
            writeln!(out, "# effective llmtap config (defaults < file < LLMTAP_* environment < flags)")?;
            write!(out, "{}", toml::to_string_pretty(&v.raw.redacted())?)?;
            writeln!(out, "\n# routes (longest prefix wins)")?;
            for r in v.routes.routes() {
                let prefixes: Vec<&str> = r.prefixes.iter().map(|p| p.path.as_str()).collect();
                writeln!(
                    out,
                    "#   {:<10} {:<24} -> {}://{}{}  adapter={}",
                    r.name,
                    prefixes.join(" "),
                    r.upstream.scheme,
                    r.upstream.authority,
                    r.upstream.base_path,
                    r.adapter
                )?;
            }
            writeln!(out, "# price table: {} models (as of {})", v.prices.len(), v.prices.as_of)?;
            Ok(())
        }
    }
}

/// The reader of our stdout went away (`| head`): not an error of the command.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmtap: {e:#}");
            ExitCode::from(2)
        }
    }
}
