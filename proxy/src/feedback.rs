//! `POST /v1/feedback` on the admin port: human signals about calls (ratings, labels,
//! corrections), validated and stored as `llm_feedback` rows in `<data-dir>/feedback/`.
//! Bad input gets 422 with every reason; a configured bearer token is required when set.
//! Writes go through a bounded queue to a writer thread (full: 503, nothing half-stored).

use std::path::Path;
use std::sync::mpsc::{self, SyncSender, TrySendError};

use llmtap_ingest::log::{LogConfig, SegmentWriter};
use llmtap_ingest::record::{FeedbackRecord, Timestamp};
use serde::{Deserialize, Serialize};

/// `[feedback]` in `llmtap.toml`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Bearer token required on `POST /v1/feedback` (`LLMTAP_FEEDBACK_TOKEN`); empty: none.
    pub token: String,
}

/// Largest accepted request body.
pub const MAX_BODY: usize = 256 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackIn {
    trace_id: Option<String>,
    name: Option<String>,
    value: Option<f64>,
    label: Option<String>,
    comment: Option<String>,
    correction: Option<String>,
    annotator: Option<String>,
}

/// Checks a request body; `Err` lists every problem.
pub fn validate(body: &[u8]) -> Result<FeedbackRecord, Vec<String>> {
    let f: FeedbackIn = serde_json::from_slice(body).map_err(|e| vec![format!("body: not a feedback object: {e}")])?;
    let mut reasons = Vec::new();
    let trace_id = f.trace_id.unwrap_or_default();
    if trace_id.len() != 32 || !trace_id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        reasons
            .push(format!("trace_id: {trace_id:?} is not 32 lowercase hex digits (the x-llmtap-trace-id of the call)"));
    }
    let name = f.name.unwrap_or_default();
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c)) {
        reasons.push(format!("name: {name:?} must be 1-128 letters, digits, '_', '.', ':' or '-'"));
    }
    if f.value.is_none() && f.label.as_deref().is_none_or(str::is_empty) {
        reasons.push("value or label: give a numeric value, a label, or both".into());
    }
    if let Some(v) = f.value {
        if !v.is_finite() {
            reasons.push(format!("value: {v} is not a finite number"));
        }
    }
    for (key, v, max) in [
        ("label", &f.label, 128usize),
        ("comment", &f.comment, 16 * 1024),
        ("correction", &f.correction, 64 * 1024),
        ("annotator", &f.annotator, 256),
    ] {
        if v.as_ref().is_some_and(|s| s.len() > max) {
            reasons.push(format!("{key}: longer than {max} bytes"));
        }
    }
    if !reasons.is_empty() {
        return Err(reasons);
    }
    Ok(FeedbackRecord {
        ts: Timestamp::now(),
        trace_id,
        name,
        value: f.value.unwrap_or(0.0),
        label: f.label.unwrap_or_default(),
        comment: f.comment.unwrap_or_default(),
        correction: f.correction.unwrap_or_default(),
        annotator: f.annotator.unwrap_or_default(),
    })
}

/// The queue to the feedback writer.
pub struct FeedbackWriter {
    tx: SyncSender<FeedbackRecord>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FeedbackWriter {
    pub fn spawn(data_dir: &Path, log: LogConfig) -> std::io::Result<Self> {
        let mut writer = SegmentWriter::open(data_dir, "feedback", log)?;
        let (tx, rx) = mpsc::sync_channel::<FeedbackRecord>(1024);
        let thread = std::thread::Builder::new().name("llmtap-feedback".into()).spawn(move || {
            while let Ok(rec) = rx.recv() {
                for rec in std::iter::once(rec).chain(rx.try_iter()) {
                    match serde_json::to_vec(&rec) {
                        Ok(line) => {
                            if let Err(e) = writer.append(&line) {
                                tracing::error!(error = %e, "feedback log write failed");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "feedback encode failed"),
                    }
                }
                if let Err(e) = writer.flush() {
                    tracing::error!(error = %e, "feedback log flush failed");
                }
            }
            let _ = writer.close();
        })?;
        Ok(FeedbackWriter { tx, thread: Some(thread) })
    }

    /// Queues a record; `false` when the queue is full.
    pub fn try_store(&self, rec: FeedbackRecord) -> bool {
        !matches!(self.tx.try_send(rec), Err(TrySendError::Full(_) | TrySendError::Disconnected(_)))
    }

    /// Writes what is queued and stops.
    pub fn shutdown(mut self) {
        let (tx, _) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_and_invalid_bodies() {
        let ok = validate(br#"{"trace_id":"0af7651916cd43dd8448eb211c80319c","name":"thumbs","value":1,"comment":"good","annotator":"ann"}"#).unwrap();
        assert_eq!((ok.name.as_str(), ok.value, ok.annotator.as_str()), ("thumbs", 1.0, "ann"));
        let label_only =
            validate(br#"{"trace_id":"0af7651916cd43dd8448eb211c80319c","name":"verdict","label":"wrong_plan"}"#)
                .unwrap();
        assert_eq!(label_only.label, "wrong_plan");
        let e = validate(br#"{"trace_id":"XYZ","name":"bad name!"}"#).unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].starts_with("trace_id: \"XYZ\""));
        assert!(e[1].starts_with("name: \"bad name!\""));
        assert!(e[2].starts_with("value or label"));
        assert!(validate(b"[1,2]").unwrap_err()[0].starts_with("body: not a feedback object"));
        assert!(validate(br#"{"trace_id":"0af7651916cd43dd8448eb211c80319c","name":"x","value":1,"extra":1}"#)
            .unwrap_err()[0]
            .contains("unknown field `extra`"));
    }
}
