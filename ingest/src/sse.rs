//! Incremental `text/event-stream` parser following the WHATWG rules: `\n`, `\r\n` and `\r`
//! line ends (a `\r\n` may be split across feeds), comments, multi-line `data:`, a leading
//! BOM, events split across frames at any byte. It reads a side copy and never alters bytes.

/// One dispatched event. `event` is empty when the stream gave no `event:` field.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    pub id: Option<String>,
}

/// Parser state carried between feeds; events come out through a callback so the hot
/// path allocates nothing per event beyond the event's own text.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    started: bool,
    current: SseEvent,
    has_data: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; calls `on_event` for every event completed by them.
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(&SseEvent)) {
        const BOM: &[u8] = b"\xEF\xBB\xBF";
        if !self.started {
            // A UTF-8 BOM may open the stream, itself split across feeds: hold back up to
            // three bytes until it is clear whether they are one.
            self.line.extend_from_slice(bytes);
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return;
            }
            self.started = true;
            let mut head = std::mem::take(&mut self.line);
            let skip = if head.starts_with(BOM) { BOM.len() } else { 0 };
            self.feed_started(&head[skip..], &mut on_event);
            head.clear();
            if self.line.is_empty() {
                self.line = head;
            }
            return;
        }
        self.feed_started(bytes, &mut on_event);
    }

    fn feed_started(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(&SseEvent)) {
        while !bytes.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if bytes[0] == b'\n' {
                    bytes = &bytes[1..];
                    continue;
                }
            }
            match memchr::memchr2(b'\n', b'\r', bytes) {
                Some(i) => {
                    let end = bytes[i];
                    if self.line.is_empty() {
                        self.process_line(&bytes[..i], on_event);
                    } else {
                        self.line.extend_from_slice(&bytes[..i]);
                        let line = std::mem::take(&mut self.line);
                        self.process_line(&line, on_event);
                        self.line = line;
                        self.line.clear();
                    }
                    self.after_cr = end == b'\r';
                    bytes = &bytes[i + 1..];
                }
                None => {
                    self.line.extend_from_slice(bytes);
                    break;
                }
            }
        }
    }

    /// True when bytes of an unfinished event are buffered (the stream ended mid-event).
    pub fn has_partial(&self) -> bool {
        !self.line.is_empty() || self.has_data || !self.current.event.is_empty()
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(&SseEvent)) {
        if line.is_empty() {
            if self.has_data {
                if self.current.data.ends_with('\n') {
                    self.current.data.pop();
                }
                on_event(&self.current);
            }
            self.current.event.clear();
            self.current.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                push_lossy(&mut self.current.data, value);
                self.current.data.push('\n');
                self.has_data = true;
            }
            b"event" => {
                self.current.event.clear();
                push_lossy(&mut self.current.event, value);
            }
            // An id holding NUL is ignored, as the spec says.
            b"id" if !value.contains(&0) => {
                self.current.id = Some(String::from_utf8_lossy(value).into_owned());
            }
            _ => {} // `retry` and unknown fields carry nothing llmtap records.
        }
    }
}

/// Appends `bytes` as text, invalid UTF-8 replaced by U+FFFD. Valid text (all of it in
/// practice) takes `from_utf8`'s word-at-a-time path, several times faster than the lossy
/// decoder's per-chunk walk.
fn push_lossy(out: &mut String, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => out.push_str(s),
        Err(_) => out.push_str(&String::from_utf8_lossy(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut p = SseParser::new();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| out.push((e.event.clone(), e.data.clone())));
        }
        out
    }

    #[test]
    fn all_line_endings_and_comments() {
        let src = b": keep-alive\ndata: a\r\n\r\nevent: x\rdata: b\r\rdata:c\n\n";
        let got = parse_all(&[src]);
        assert_eq!(got, vec![(String::new(), "a".into()), ("x".into(), "b".into()), (String::new(), "c".into())]);
    }

    #[test]
    fn multi_line_data_joined_with_newline() {
        let got = parse_all(&[b"data: one\ndata: two\ndata\n\n"]);
        assert_eq!(got, vec![(String::new(), "one\ntwo\n".into())]);
    }

    #[test]
    fn events_split_at_every_byte_give_the_same_events() {
        let src: &[u8] = b"\xEF\xBB\xBFevent: message_start\r\ndata: {\"a\":1}\r\n\r\n: c\r\ndata: {\"b\":2}\r\n\r\ndata: [DONE]\r\n\r\n";
        let whole = parse_all(&[src]);
        assert_eq!(whole.len(), 3);
        for i in 0..src.len() {
            assert_eq!(parse_all(&[&src[..i], &src[i..]]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = src.chunks(1).collect();
        assert_eq!(parse_all(&bytes), whole);
    }

    #[test]
    fn no_dispatch_without_data_and_partial_event_reported() {
        let mut p = SseParser::new();
        let mut n = 0;
        p.feed(b"event: ping\n\ndata: x", |_| n += 1);
        assert_eq!(n, 0);
        assert!(p.has_partial());
    }
}
