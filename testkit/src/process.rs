//! Runs the real `llmtap` binary for end-to-end tests: a temporary data directory, loopback
//! listeners on port 0 (addresses read from its first stdout line), environment and config
//! of the test's choosing, and helpers to read the records it wrote.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running `llmtap serve`.
pub struct LlmtapProcess {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub data_dir: PathBuf,
    _dir: tempfile::TempDir,
    stderr_path: PathBuf,
}

impl LlmtapProcess {
    /// Starts `bin serve` with `config` (TOML text) and extra environment variables.
    /// Inherited `LLMTAP_*` variables are removed so the caller's shell cannot interfere.
    pub fn start(bin: &Path, config: &str, env: &[(&str, String)]) -> anyhow::Result<LlmtapProcess> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        Self::start_in(bin, config, env, dir, data_dir)
    }

    /// Same, with a data directory that outlives the process (crash and restart tests).
    pub fn start_with_data_dir(
        bin: &Path,
        config: &str,
        env: &[(&str, String)],
        data_dir: &Path,
    ) -> anyhow::Result<LlmtapProcess> {
        Self::start_in(bin, config, env, tempfile::tempdir()?, data_dir.to_path_buf())
    }

    fn start_in(
        bin: &Path,
        config: &str,
        env: &[(&str, String)],
        dir: tempfile::TempDir,
        data_dir: PathBuf,
    ) -> anyhow::Result<LlmtapProcess> {
        let cfg_path = dir.path().join("llmtap.toml");
        std::fs::write(&cfg_path, config)?;
        let stderr_path = dir.path().join("stderr.log");
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--admin-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path)?);
        for (k, _) in std::env::vars() {
            if k.starts_with("LLMTAP_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        // "llmtap listening on 127.0.0.1:PORT (admin 127.0.0.1:PORT)"
        let parse = || -> Option<(SocketAddr, SocketAddr)> {
            let rest = line.trim().strip_prefix("llmtap listening on ")?;
            let (p, a) = rest.split_once(" (admin ")?;
            Some((p.parse().ok()?, a.trim_end_matches(')').parse().ok()?))
        };
        let Some((proxy, admin)) = parse() else {
            let _ = child.wait();
            let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            anyhow::bail!("llmtap did not start: stdout {line:?}, stderr:\n{err}");
        };
        Ok(LlmtapProcess { child, proxy, admin, data_dir, _dir: dir, stderr_path })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Every trace record written so far (complete lines only).
    pub fn records(&self) -> Vec<Value> {
        read_records(&self.data_dir.join("traces"))
    }

    /// Waits until at least `n` records exist (up to `timeout`), returning them.
    pub fn wait_records(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.records();
            if r.len() >= n || Instant::now() >= deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The record of one trace id, waiting for it up to 10 s.
    pub fn record(&self, trace_id: &str) -> Option<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.records().into_iter().find(|r| r["trace_id"] == trace_id) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(())
    }

    /// Waits for exit (up to `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                anyhow::bail!("llmtap did not exit within {timeout:?}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LlmtapProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads every complete NDJSON line of the segments in `dir`.
pub fn read_records(dir: &Path) -> Vec<Value> {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "ndjson")).collect())
        .unwrap_or_default();
    segs.sort();
    let mut out = Vec::new();
    for s in segs {
        let text = std::fs::read_to_string(&s).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        for line in complete.lines().filter(|l| !l.trim().is_empty()) {
            if let Ok(v) = serde_json::from_str(line) {
                out.push(v);
            }
        }
    }
    out
}
