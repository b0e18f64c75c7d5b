//! The local log: append-only NDJSON segments on disk, one folder per record kind
//! (`traces/`, `scores/`, `feedback/`, `drift/`) under the data directory. It is the
//! embedded default store and the source the ClickHouse shipper tails.
//!
//! Design notes
//! - A segment is `<kind>/<unix_ms:013>-<pid>-<seq:06>.ndjson`; names sort by creation time.
//!   Each line is one record whose keys are the ClickHouse column names, so a segment loads
//!   with `INSERT INTO <table> FORMAT JSONEachRow`.
//! - Only the writer appends, only to the newest segment it created; a segment is never
//!   reopened for writing. Rotation happens by size and by age.
//! - Lines are written whole and flushed to the OS after every batch; `fsync` follows the
//!   configured policy. A crash can leave a torn last line (no trailing `\n`) in the segment
//!   that was open: at start the writer cuts such a tail (logging how many bytes), so every
//!   segment on disk is a sequence of complete lines.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// When segment data is forced to stable storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// After every batch of records (safest, slowest).
    Always,
    /// At most every `fsync_interval_ms` (default).
    #[default]
    Interval,
    /// Never explicitly; the OS writes back on its own schedule.
    Never,
}

/// `[log]` in `llmtap.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A segment is closed and a new one started past this size (bytes).
    pub segment_max_bytes: u64,
    /// … or past this age (seconds).
    pub segment_max_age_secs: u64,
    pub fsync: FsyncPolicy,
    pub fsync_interval_ms: u64,
    /// Records waiting for the writer; when full, new records are dropped and counted.
    pub channel_capacity: usize,
    /// Disk cap per record kind (bytes; 0 for none). Past it the oldest segments are deleted:
    /// with ClickHouse, unshipped ones are counted and logged as lost; without, this is the
    /// local store's retention.
    pub max_disk_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_max_bytes: 64 * 1024 * 1024,
            segment_max_age_secs: 300,
            fsync: FsyncPolicy::Interval,
            fsync_interval_ms: 1000,
            channel_capacity: 16 * 1024,
            max_disk_bytes: 10 * 1024 * 1024 * 1024,
        }
    }
}

/// Writer of one record kind's segments. Blocking I/O: it runs on the recorder's own thread.
#[derive(Debug)]
pub struct SegmentWriter {
    dir: PathBuf,
    cfg: LogConfig,
    current: Option<Open>,
    seq: u64,
    last_sync: Instant,
    dirty: bool,
    /// Without a shipper the writer keeps the folder under its cap itself.
    enforce_cap_on_rotate: bool,
}

#[derive(Debug)]
struct Open {
    file: BufWriter<File>,
    path: PathBuf,
    size: u64,
    opened: Instant,
}

impl SegmentWriter {
    /// Opens (creating) `<data_dir>/<kind>/` and repairs a torn tail left by a crash.
    pub fn open(data_dir: &Path, kind: &str, cfg: LogConfig) -> io::Result<Self> {
        let dir = data_dir.join(kind);
        std::fs::create_dir_all(&dir)?;
        for seg in list_segments(&dir)? {
            repair_torn_tail(&seg)?;
        }
        Ok(SegmentWriter {
            dir,
            cfg,
            current: None,
            seq: 0,
            last_sync: Instant::now(),
            dirty: false,
            enforce_cap_on_rotate: true,
        })
    }

    /// Leaves the disk cap to a shipper, which knows what was shipped.
    pub fn set_cap_enforced_elsewhere(&mut self) {
        self.enforce_cap_on_rotate = false;
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one line (`line` must not contain `\n`; the writer adds it).
    pub fn append(&mut self, line: &[u8]) -> io::Result<()> {
        let rotate = match &self.current {
            Some(o) => {
                o.size > 0
                    && (o.size + line.len() as u64 + 1 > self.cfg.segment_max_bytes
                        || o.opened.elapsed() >= Duration::from_secs(self.cfg.segment_max_age_secs))
            }
            None => true,
        };
        if rotate {
            self.rotate()?;
        }
        let Some(o) = self.current.as_mut() else {
            return Err(io::Error::other("no open segment"));
        };
        o.file.write_all(line)?;
        o.file.write_all(b"\n")?;
        o.size += line.len() as u64 + 1;
        self.dirty = true;
        Ok(())
    }

    /// Ends a batch: hands the bytes to the OS and syncs per policy.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(o) = self.current.as_mut() {
            o.file.flush()?;
            let sync = match self.cfg.fsync {
                FsyncPolicy::Always => self.dirty,
                FsyncPolicy::Interval => {
                    self.dirty && self.last_sync.elapsed() >= Duration::from_millis(self.cfg.fsync_interval_ms)
                }
                FsyncPolicy::Never => false,
            };
            if sync {
                o.file.get_ref().sync_data()?;
                self.last_sync = Instant::now();
                self.dirty = false;
            }
        }
        Ok(())
    }

    /// Closes the open segment if it is older than the age limit (called on idle ticks so
    /// a quiet process still seals its segments).
    pub fn rotate_if_old(&mut self) -> io::Result<()> {
        if self
            .current
            .as_ref()
            .is_some_and(|o| o.opened.elapsed() >= Duration::from_secs(self.cfg.segment_max_age_secs))
        {
            self.close()?;
        }
        Ok(())
    }

    /// Flushes and fsyncs everything; the segment is closed.
    pub fn close(&mut self) -> io::Result<()> {
        if let Some(mut o) = self.current.take() {
            o.file.flush()?;
            if self.cfg.fsync != FsyncPolicy::Never {
                o.file.get_ref().sync_all()?;
            }
        }
        self.dirty = false;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.close()?;
        if self.cfg.max_disk_bytes > 0 && self.enforce_cap_on_rotate {
            for e in enforce_disk_cap(&self.dir, self.cfg.max_disk_bytes.saturating_sub(self.cfg.segment_max_bytes))? {
                tracing::info!(segment = %e.path.display(), bytes = e.bytes, "local log over log.max_disk_bytes: deleted the oldest segment");
            }
        }
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        self.seq += 1;
        let path = self.dir.join(format!("{ms:013}-{}-{:06}.ndjson", std::process::id(), self.seq));
        let file = OpenOptions::new().create_new(true).append(true).open(&path)?;
        self.current =
            Some(Open { file: BufWriter::with_capacity(64 * 1024, file), path, size: 0, opened: Instant::now() });
        Ok(())
    }

    /// Path of the segment being written, if any.
    pub fn current_path(&self) -> Option<&Path> {
        self.current.as_ref().map(|o| o.path.as_path())
    }
}

/// The `*.ndjson` segments of a folder, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                let p = e?.path();
                if p.extension().is_some_and(|x| x == "ndjson") {
                    out.push(p);
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort();
    Ok(out)
}

/// A segment deleted to keep a folder under its disk cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub path: PathBuf,
    pub bytes: u64,
}

/// Deletes the oldest segments of `dir` until it holds at most `cap` bytes. The newest
/// segment (the one being written) is never deleted. `cap == 0` means no cap.
pub fn enforce_disk_cap(dir: &Path, cap: u64) -> io::Result<Vec<Evicted>> {
    if cap == 0 {
        return Ok(Vec::new());
    }
    let segs = list_segments(dir)?;
    let mut sizes = Vec::with_capacity(segs.len());
    for s in &segs {
        sizes.push(std::fs::metadata(s).map(|m| m.len()).unwrap_or(0));
    }
    let mut total: u64 = sizes.iter().sum();
    let mut out = Vec::new();
    for (seg, size) in segs.iter().zip(&sizes).take(segs.len().saturating_sub(1)) {
        if total <= cap {
            break;
        }
        match std::fs::remove_file(seg) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        total -= size;
        out.push(Evicted { path: seg.clone(), bytes: *size });
    }
    Ok(out)
}

/// Cuts bytes after the last `\n` of a segment (a line torn by a crash).
fn repair_torn_tail(path: &Path) -> io::Result<()> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut pos = len;
    let mut buf = vec![0u8; 4096];
    while pos > 0 {
        let n = buf.len().min(pos as usize);
        pos -= n as u64;
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            let keep = pos + i as u64 + 1;
            if keep < len {
                tracing::warn!(segment = %path.display(), torn_bytes = len - keep, "cut a torn last line left by a crash");
                f.set_len(keep)?;
            }
            return Ok(());
        }
    }
    tracing::warn!(segment = %path.display(), torn_bytes = len, "segment held no complete line; emptied");
    f.set_len(0)
}

/// Reads every complete line of every segment in `dir`, oldest first, calling `f` for each.
pub fn for_each_line(dir: &Path, mut f: impl FnMut(&Path, &str)) -> io::Result<()> {
    for seg in list_segments(dir)? {
        let text = std::fs::read_to_string(&seg)?;
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        for line in complete.lines() {
            if !line.trim().is_empty() {
                f(&seg, line);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_repairs_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = LogConfig { segment_max_bytes: 20, ..LogConfig::default() };
        let mut w = SegmentWriter::open(tmp.path(), "traces", cfg.clone()).unwrap();
        for i in 0..5 {
            w.append(format!("{{\"n\":{i}}}").as_bytes()).unwrap();
        }
        w.close().unwrap();
        let segs = list_segments(&tmp.path().join("traces")).unwrap();
        assert_eq!(segs.len(), 3, "{segs:?}"); // 8 bytes a line, two lines a segment
                                               // A crash mid-line:
        std::fs::OpenOptions::new().append(true).open(&segs[2]).unwrap().write_all(b"{\"n\":9").unwrap();
        let _w = SegmentWriter::open(tmp.path(), "traces", cfg).unwrap();
        let mut lines = Vec::new();
        for_each_line(&tmp.path().join("traces"), |_, l| lines.push(l.to_owned())).unwrap();
        assert_eq!(lines, vec!["{\"n\":0}", "{\"n\":1}", "{\"n\":2}", "{\"n\":3}", "{\"n\":4}"]);
        assert!(std::fs::read(&segs[2]).unwrap().ends_with(b"\n"));
    }

    #[test]
    fn disk_cap_deletes_oldest_but_never_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, n) in [("0001.ndjson", 100), ("0002.ndjson", 100), ("0003.ndjson", 100)] {
            std::fs::write(tmp.path().join(name), vec![b'x'; n]).unwrap();
        }
        let gone = enforce_disk_cap(tmp.path(), 150).unwrap();
        assert_eq!(
            gone.iter().map(|e| e.path.file_name().unwrap().to_str().unwrap()).collect::<Vec<_>>(),
            vec!["0001.ndjson", "0002.ndjson"]
        );
        assert_eq!(enforce_disk_cap(tmp.path(), 1).unwrap(), vec![], "the newest stays");
        assert_eq!(list_segments(tmp.path()).unwrap().len(), 1);
    }
}
