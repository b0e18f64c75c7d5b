//! Body capture policy: what of a call's bodies is stored. Runs in the record writer, never
//! on the request path: inline base64 payloads become a placeholder, configured patterns
//! become `[REDACTED]`, and the result is cut to the cap on a character boundary.

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Whether bodies are stored at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyCapture {
    #[default]
    All,
    None,
}

/// `[capture]` in `llmtap.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaptureConfig {
    /// `"all"` stores `request_body` and `output_text`; `"none"` stores neither (a request
    /// can also opt out with `x-llmtap-capture: none`).
    pub bodies: BodyCapture,
    /// Bytes kept of each of `request_body` and `output_text` (default 64 KiB).
    pub max_body_bytes: usize,
    /// Regular expressions whose matches are replaced by `[REDACTED]` in stored bodies.
    pub redact: Vec<String>,
    /// Base64 runs at least this long (images, audio) are replaced by a placeholder.
    pub inline_data_min_bytes: usize,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            bodies: BodyCapture::All,
            max_body_bytes: 64 * 1024,
            redact: Vec::new(),
            inline_data_min_bytes: 512,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("capture.redact[{index}] = {pattern:?}: {source}")]
    Redact {
        index: usize,
        pattern: String,
        #[source]
        source: regex::Error,
    },
    #[error("capture.inline_data_min_bytes = {value}: must be between 16 and 1000000")]
    InlineDataMin { value: usize },
}

/// A checked capture policy.
#[derive(Clone, Debug)]
pub struct CapturePolicy {
    pub bodies: BodyCapture,
    pub max_body_bytes: usize,
    redact: Vec<Regex>,
    inline_data: Regex,
}

impl CaptureConfig {
    /// Compiles the patterns; an invalid one names its key, index and the pattern.
    pub fn validate(&self) -> Result<CapturePolicy, CaptureError> {
        let redact = self
            .redact
            .iter()
            .enumerate()
            .map(|(index, p)| {
                Regex::new(p).map_err(|source| CaptureError::Redact { index, pattern: p.clone(), source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let min = self.inline_data_min_bytes;
        if !(16..=1_000_000).contains(&min) {
            return Err(CaptureError::InlineDataMin { value: min });
        }
        // A run of base64 alphabet with optional padding; a data: URI keeps its media type.
        let inline_data = Regex::new(&format!(r"(data:[a-zA-Z0-9.+/-]+;base64,)?[A-Za-z0-9+/]{{{min},}}={{0,2}}"))
            .map_err(|_| CaptureError::InlineDataMin { value: min })?;
        Ok(CapturePolicy { bodies: self.bodies, max_body_bytes: self.max_body_bytes, redact, inline_data })
    }
}

impl CapturePolicy {
    /// Text to store for a body, or `""` when capture is off.
    pub fn apply(&self, body: &[u8]) -> String {
        if self.bodies == BodyCapture::None || body.is_empty() {
            return String::new();
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return format!("[binary body: {} bytes]", body.len());
        };
        self.apply_text(text)
    }

    /// Same as [`apply`](Self::apply) for text already decoded.
    pub fn apply_text(&self, text: &str) -> String {
        if self.bodies == BodyCapture::None || text.is_empty() {
            return String::new();
        }
        let mut s = self
            .inline_data
            .replace_all(text, |c: &regex::Captures<'_>| {
                let whole = c.get(0).map_or(0, |m| m.len());
                match c.get(1) {
                    Some(prefix) => format!("{}[inline data: {} bytes]", prefix.as_str(), whole - prefix.len()),
                    None => format!("[inline data: {whole} bytes]"),
                }
            })
            .into_owned();
        for re in &self.redact {
            if let std::borrow::Cow::Owned(o) = re.replace_all(&s, "[REDACTED]") {
                s = o;
            }
        }
        truncate_at_char_boundary(&mut s, self.max_body_bytes);
        s
    }
}

/// Cuts `s` to at most `max` bytes without splitting a character.
pub fn truncate_at_char_boundary(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_become_placeholders_keeping_media_type() {
        let Ok(p) = CaptureConfig::default().validate() else { panic!("default policy") };
        let img = "A".repeat(2000);
        let body = format!(r#"{{"url":"data:image/png;base64,{img}=","x":"{img}"}}"#);
        assert_eq!(
            p.apply(body.as_bytes()),
            r#"{"url":"data:image/png;base64,[inline data: 2001 bytes]","x":"[inline data: 2000 bytes]"}"#
        );
    }

    #[test]
    fn redaction_and_cap() {
        let cfg =
            CaptureConfig { redact: vec![r"\b\d{3}-\d{2}-\d{4}\b".into()], max_body_bytes: 24, ..Default::default() };
        let Ok(p) = cfg.validate() else { panic!("valid policy") };
        assert_eq!(p.apply(b"ssn 123-45-6789 ok"), "ssn [REDACTED] ok");
        assert_eq!(p.apply("ééééééééééééééééééééé".as_bytes()), "éééééééééééé");
    }

    #[test]
    fn capture_none_stores_nothing() {
        let Ok(p) = CaptureConfig { bodies: BodyCapture::None, ..Default::default() }.validate() else { panic!() };
        assert_eq!(p.apply(b"secret prompt"), "");
    }

    #[test]
    fn invalid_pattern_names_index_and_pattern() {
        let cfg = CaptureConfig { redact: vec!["ok".into(), "(unclosed".into()], ..Default::default() };
        let msg = cfg.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.starts_with("capture.redact[1] = \"(unclosed\": regex parse error"), "{msg}");
    }
}
