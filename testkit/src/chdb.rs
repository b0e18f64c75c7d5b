//! The real ClickHouse engine for tests: `tests/chdb/adapter.py` (chdb behind ClickHouse's
//! HTTP interface) as a child process. Tests use it where production uses a ClickHouse
//! server. The Python comes from `LLMTAP_CHDB_PYTHON` (set by `make test` to the venv
//! that has chdb).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Python with chdb installed, or `None` when this run has none. Under `CI=true` a
/// missing engine is a failure, never a skip.
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("LLMTAP_CHDB_PYTHON") {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "LLMTAP_CHDB_PYTHON is not set: the ClickHouse tests must run in CI (make test sets it)"
            );
            eprintln!("SKIPPED: ClickHouse engine tests need LLMTAP_CHDB_PYTHON (a Python with chdb); run `make test`");
            None
        }
    }
}

/// A running adapter over a chdb data directory.
pub struct ChdbAdapter {
    child: Option<Child>,
    pub addr: SocketAddr,
    python: PathBuf,
    path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/chdb/adapter.py")
}

fn spawn(python: &Path, path: &Path, listen: &str) -> anyhow::Result<(Child, SocketAddr)> {
    let mut child = Command::new(python)
        .arg(script())
        .arg("--listen")
        .arg(listen)
        .arg("--path")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = line.trim().parse().map_err(|_| anyhow::anyhow!("chdb adapter did not start: {line:?}"))?;
    Ok((child, addr))
}

impl ChdbAdapter {
    /// Starts an adapter on a fresh data directory.
    pub fn start(python: &Path) -> anyhow::Result<ChdbAdapter> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("chdb");
        let (child, addr) = spawn(python, &path, "127.0.0.1:0")?;
        Ok(ChdbAdapter { child: Some(child), addr, python: python.to_path_buf(), path, _dir: Some(dir) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the engine (SIGTERM, then wait): ClickHouse is down.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Starts it again on the same address and data directory: ClickHouse is back.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match spawn(&self.python, &self.path, &self.addr.to_string()) {
                Ok((child, _)) => {
                    self.child = Some(child);
                    return Ok(());
                }
                // The port may linger for a moment after the old process exits.
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one HTTP request and returns (status, body).
    pub fn request(&self, method: &str, path_and_query: &str, body: &[u8]) -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect(self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let head = format!(
            "{method} {path_and_query} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        Ok((status, if chunked { dechunk(body) } else { body.to_owned() }))
    }

    /// Runs SQL; `Err` carries ClickHouse's exception text.
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        let (status, body) = self.request("POST", "/?output_format_json_quote_64bit_integers=0", sql.as_bytes())?;
        anyhow::ensure!(status == 200, "{status}: {body}");
        Ok(body)
    }

    /// Runs a SELECT and parses `FORMAT JSONEachRow` output.
    pub fn rows(&self, sql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let body = self.query(&format!("{sql} FORMAT JSONEachRow"))?;
        body.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
    }

    /// The statements the adapter executed, oldest first (its request log).
    pub fn statements(&self) -> anyhow::Result<Vec<String>> {
        let (status, body) = self.request("GET", "/__adapter/requests", b"")?;
        anyhow::ensure!(status == 200, "{status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let list =
            v.get("requests").and_then(|r| r.as_array()).cloned().or_else(|| v.as_array().cloned()).unwrap_or_default();
        Ok(list.iter().filter_map(|r| r.get("sql").and_then(|q| q.as_str()).map(str::to_owned)).collect())
    }

    /// Clears the request log.
    pub fn reset_log(&self) -> anyhow::Result<()> {
        self.request("POST", "/__adapter/reset", b"")?;
        Ok(())
    }

    /// Delays every ClickHouse request by `ms` (an insert is then in flight for that long).
    pub fn set_delay(&self, ms: u64) -> anyhow::Result<()> {
        self.request("POST", &format!("/__adapter/delay?ms={ms}"), b"")?;
        Ok(())
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

impl Drop for ChdbAdapter {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
