//! Undoes, on the client's copy of an OpenAI chat stream, what llmtap's injected
//! `stream_options.include_usage` added upstream: the `"usage":null` member in every chunk
//! and the final usage-only chunk (`"choices":[]` with a usage object). Everything else is
//! forwarded byte for byte. This is the one place llmtap changes response bytes, and only
//! for requests whose client did not ask for usage itself.
//!
//! Events are released as soon as their terminating blank line arrives, so the only delay
//! is the rest of an event that is split across frames.

use bytes::{Bytes, BytesMut};

/// Per-stream state: bytes of an event not yet terminated.
#[derive(Debug, Default)]
pub struct StreamUsageStripper {
    pending: BytesMut,
    /// A `\r` ended the last feed; a following `\n` belongs to the same line end.
    scan_from: usize,
}

impl StreamUsageStripper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a frame from upstream; returns the bytes to forward now (possibly empty).
    pub fn push(&mut self, frame: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(frame.len());
        if self.pending.is_empty() {
            // Nothing held over (the usual case: one or more whole events per frame): read
            // the events straight from the frame and keep only an unfinished tail.
            let mut at = 0;
            while let Some(end) = event_end(&frame[at..], 0) {
                rewrite_event(&frame[at..at + end], &mut out);
                at += end;
            }
            self.pending.extend_from_slice(&frame[at..]);
            self.scan_from = self.pending.len().saturating_sub(3);
            return out.freeze();
        }
        self.pending.extend_from_slice(frame);
        loop {
            let Some(end) = event_end(&self.pending, self.scan_from) else {
                self.scan_from = self.pending.len().saturating_sub(3);
                break;
            };
            let event = self.pending.split_to(end);
            self.scan_from = 0;
            rewrite_event(&event, &mut out);
        }
        out.freeze()
    }

    /// The stream ended: whatever is buffered goes out unchanged.
    pub fn finish(&mut self) -> Bytes {
        self.scan_from = 0;
        self.pending.split().freeze()
    }
}

/// Byte offset just past the blank line that ends the first complete event, if any.
/// A blank line is two consecutive line ends, each `\n`, `\r\n` or `\r`. A lone `\r` at the
/// very end is not decided yet (a `\n` may follow), so it is left for the next feed.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    let mut at_line_start = from == 0;
    if from > 0 {
        // Re-derive whether `from` starts a line.
        at_line_start = matches!(buf.get(from - 1), Some(b'\n' | b'\r'));
        if buf.get(from - 1) == Some(&b'\r') && buf.get(from) == Some(&b'\n') {
            i += 1;
        }
    }
    while i < buf.len() {
        if !at_line_start {
            // Inside a line: jump to its end.
            i += memchr::memchr2(b'\n', b'\r', &buf[i..])?;
        }
        match buf[i] {
            b'\n' | b'\r' => {
                let len = if buf[i] == b'\r' {
                    match buf.get(i + 1) {
                        Some(b'\n') => 2,
                        Some(_) => 1,
                        None => return None,
                    }
                } else {
                    1
                };
                if at_line_start {
                    return Some(i + len);
                }
                at_line_start = true;
                i += len;
            }
            _ => {
                at_line_start = false;
                i += 1;
            }
        }
    }
    None
}

/// The lines of `buf`, each with its terminator (`\n` or `\r`; `\r\n` ends two lines, the
/// second empty, as `split_inclusive` on either byte would give).
fn lines_inclusive(buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = memchr::memchr2(b'\n', b'\r', rest).map_or(rest.len(), |i| i + 1);
        let (line, tail) = rest.split_at(n);
        rest = tail;
        Some(line)
    })
}

/// Writes `event` to `out` without the injected parts.
fn rewrite_event(event: &[u8], out: &mut BytesMut) {
    // Find the data payload (OpenAI sends one `data:` line per event).
    let mut data_line: Option<(usize, usize)> = None;
    let mut pos = 0;
    for line in lines_inclusive(event) {
        if let Some(rest) = line.strip_prefix(b"data:") {
            let start = pos + 5 + usize::from(rest.first() == Some(&b' '));
            let end = pos + line.len() - line.iter().rev().take_while(|b| **b == b'\n' || **b == b'\r').count();
            if data_line.is_some() {
                out.extend_from_slice(event); // multi-line data: not OpenAI's shape, leave it
                return;
            }
            data_line = Some((start, end));
        }
        pos += line.len();
    }
    let Some((start, end)) = data_line else {
        out.extend_from_slice(event);
        return;
    };
    let data = &event[start..end];
    if is_usage_only_chunk(data) {
        return;
    }
    match usage_null_at_end(data).or_else(|| find_usage_null(data)) {
        Some((a, b)) => {
            out.extend_from_slice(&event[..start + a]);
            out.extend_from_slice(&event[start + b..]);
        }
        None => out.extend_from_slice(event),
    }
}

/// The final chunk that `include_usage` adds: empty `choices` and a usage object.
fn is_usage_only_chunk(data: &[u8]) -> bool {
    // Content chunks have no empty array anywhere, and skip the parse.
    if !has_empty_array(data) {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        choices: Option<Vec<&'a serde_json::value::RawValue>>,
        #[serde(borrow)]
        usage: Option<&'a serde_json::value::RawValue>,
    }
    match serde_json::from_slice::<Probe<'_>>(data) {
        Ok(p) => p.choices.is_some_and(|c| c.is_empty()) && p.usage.is_some_and(|u| u.get() != "null"),
        Err(_) => false,
    }
}

/// Whether `data` holds `[`, optional whitespace, `]`. An empty JSON array always does (no
/// escape can hide the brackets); the converse may be text inside a string.
fn has_empty_array(data: &[u8]) -> bool {
    let mut rest = data;
    while let Some(i) = memchr::memchr(b'[', rest) {
        rest = &rest[i + 1..];
        match rest.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            Some(b']') => return true,
            Some(_) => {}
            None => return false,
        }
    }
    false
}

/// The span of `,"usage":null` when it is the object's last member, as OpenAI sends it,
/// found without scanning the event. In JSON that parses, a `}` that ends the data closes
/// the top-level object, and a member right before it, opened by an unescaped quote right
/// after a comma, is one of the object's own: `find_usage_null` finds the same span, but
/// only by walking the whole event.
fn usage_null_at_end(data: &[u8]) -> Option<(usize, usize)> {
    const TAIL: &[u8] = b",\"usage\":null}";
    (data.first() == Some(&b'{') && data.ends_with(TAIL)).then(|| (data.len() - TAIL.len(), data.len() - 1))
}

/// Span of the top-level `"usage":null` member including one adjoining comma.
fn find_usage_null(data: &[u8]) -> Option<(usize, usize)> {
    const NEEDLE: &[u8] = b"\"usage\":null";
    let mut depth = 0i32;
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'"' => {
                if depth == 1 && data[i..].starts_with(NEEDLE) {
                    let after = i + NEEDLE.len();
                    if data.get(after) == Some(&b',') {
                        return Some((i, after + 1));
                    }
                    if data.get(after) == Some(&b'}') && i > 0 && data[i - 1] == b',' {
                        return Some((i - 1, after));
                    }
                }
                // Skip the string: to its closing quote, stepping over each escaped byte.
                i += 1;
                loop {
                    i += memchr::memchr2(b'"', b'\\', data.get(i..)?)?;
                    if data[i] == b'"' {
                        break;
                    }
                    i += 2;
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\":null\"}}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"total_tokens\":5}}\n\n\
data: [DONE]\n\n";
    const WITHOUT: &[u8] =
        b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\":null\"}}]}\n\n\
data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: [DONE]\n\n";

    fn run(frames: &[&[u8]]) -> Vec<u8> {
        let mut s = StreamUsageStripper::new();
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&s.push(f));
        }
        out.extend_from_slice(&s.finish());
        out
    }

    #[test]
    fn strips_usage_null_and_usage_chunk_at_every_split() {
        assert_eq!(run(&[WITH]), WITHOUT);
        for i in 0..WITH.len() {
            assert_eq!(run(&[&WITH[..i], &WITH[i..]]), WITHOUT, "split at {i}");
        }
        let singles: Vec<&[u8]> = WITH.chunks(1).collect();
        assert_eq!(run(&singles), WITHOUT);
    }

    #[test]
    fn crlf_streams_and_usage_first_member() {
        let src = b"data: {\"usage\":null,\"choices\":[]}\r\n\r\ndata: [DONE]\r\n\r\n";
        let want = b"data: {\"choices\":[]}\r\n\r\ndata: [DONE]\r\n\r\n";
        for i in 0..src.len() {
            assert_eq!(run(&[&src[..i], &src[i..]]), want, "split at {i}");
        }
    }

    #[test]
    fn azure_prompt_filter_chunk_with_empty_choices_is_kept() {
        let src = b"data: {\"choices\":[],\"prompt_filter_results\":[],\"usage\":null}\n\n";
        assert_eq!(run(&[src]), b"data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n");
    }

    #[test]
    fn empty_arrays_are_found_with_whitespace_and_not_invented() {
        assert!(has_empty_array(br#"{"choices":[],"usage":{}}"#));
        assert!(has_empty_array(b"{\"choices\": [ \n\t ],\"usage\":{}}"));
        assert!(!has_empty_array(br#"{"choices":[{"delta":{"content":"[x]"}}],"usage":null}"#));
        assert!(!has_empty_array(b"{\"a\":[ "));
        // Spaced out the same way, the usage chunk is still dropped.
        let src = b"data: {\"choices\": [ ], \"usage\": {\"prompt_tokens\": 3}}\n\ndata: [DONE]\n\n";
        assert_eq!(run(&[src]), b"data: [DONE]\n\n");
    }

    /// The byte-at-a-time scanners these replaced, kept as the reference.
    fn event_end_reference(buf: &[u8], from: usize) -> Option<usize> {
        let mut i = from;
        let mut at_line_start = from == 0;
        if from > 0 {
            at_line_start = matches!(buf.get(from - 1), Some(b'\n' | b'\r'));
            if buf.get(from - 1) == Some(&b'\r') && buf.get(from) == Some(&b'\n') {
                i += 1;
            }
        }
        while i < buf.len() {
            match buf[i] {
                b'\n' | b'\r' => {
                    let len = match (buf[i], buf.get(i + 1)) {
                        (b'\r', Some(b'\n')) => 2,
                        (b'\r', None) => return None,
                        _ => 1,
                    };
                    if at_line_start {
                        return Some(i + len);
                    }
                    at_line_start = true;
                    i += len;
                }
                _ => {
                    at_line_start = false;
                    i += 1;
                }
            }
        }
        None
    }

    fn find_usage_null_reference(data: &[u8]) -> Option<(usize, usize)> {
        const NEEDLE: &[u8] = b"\"usage\":null";
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        for (i, &b) in data.iter().enumerate() {
            if in_str {
                if esc {
                    esc = false;
                } else if b == b'\\' {
                    esc = true;
                } else if b == b'"' {
                    in_str = false;
                }
                continue;
            }
            match b {
                b'"' => {
                    if depth == 1 && data[i..].starts_with(NEEDLE) {
                        let after = i + NEEDLE.len();
                        if data.get(after) == Some(&b',') {
                            return Some((i, after + 1));
                        }
                        if data.get(after) == Some(&b'}') && i > 0 && data[i - 1] == b',' {
                            return Some((i - 1, after));
                        }
                    }
                    in_str = true;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth -= 1,
                _ => {}
            }
        }
        None
    }

    #[test]
    fn scanners_agree_with_the_byte_at_a_time_reference() {
        // Random strings over the bytes the scanners decide on, with whole needles mixed in.
        const PIECES: &[&[u8]] =
            &[b"\"", b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\n", b"\r", b"a", b" ", b"\"usage\":null", b"data: "];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            for _ in 0..rng.usize(0..24) {
                buf.extend_from_slice(PIECES[rng.usize(0..PIECES.len())]);
            }
            assert_eq!(find_usage_null(&buf), find_usage_null_reference(&buf), "{:?}", String::from_utf8_lossy(&buf));
            for from in 0..=buf.len() {
                assert_eq!(event_end(&buf, from), event_end_reference(&buf, from), "{buf:?} from {from}");
            }
            let lines: Vec<&[u8]> = lines_inclusive(&buf).collect();
            let want: Vec<&[u8]> = buf.split_inclusive(|&b| b == b'\n' || b == b'\r').collect();
            assert_eq!(lines, want);
        }
    }

    /// A random JSON value whose strings and nested objects are full of `"usage":null}`.
    fn random_json(rng: &mut fastrand::Rng, depth: usize) -> serde_json::Value {
        use serde_json::{json, Value};
        const TEXT: &[&str] = &["usage", "\"usage\":null}", ",\"usage\":null}", "}", "\\", "a", "\n"];
        match rng.usize(0..if depth > 2 { 3 } else { 5 }) {
            0 => Value::Null,
            1 => json!(rng.i32(..)),
            2 => Value::String((0..rng.usize(0..4)).map(|_| TEXT[rng.usize(0..TEXT.len())]).collect()),
            3 => Value::Array((0..rng.usize(0..3)).map(|_| random_json(rng, depth + 1)).collect()),
            _ => {
                let mut m = serde_json::Map::new();
                for i in 0..rng.usize(0..3) {
                    m.insert(format!("k{i}"), random_json(rng, depth + 1));
                }
                if rng.bool() {
                    m.insert("usage".into(), Value::Null);
                }
                Value::Object(m)
            }
        }
    }

    #[test]
    fn the_tail_shortcut_finds_what_the_scan_finds_in_json_that_parses() {
        let mut rng = fastrand::Rng::with_seed(11);
        let mut shortcuts = 0;
        for _ in 0..20_000 {
            let mut data = b"{".to_vec();
            for i in 0..rng.usize(0..4) {
                data.extend_from_slice(format!("\"m{i}\":").as_bytes());
                data.extend_from_slice(serde_json::to_string(&random_json(&mut rng, 0)).unwrap().as_bytes());
                data.push(b',');
            }
            match rng.usize(0..3) {
                0 => data.extend_from_slice(b"\"usage\":null}"),
                1 => data.extend_from_slice(b"\"usage\":{\"n\":1}}"),
                _ => {
                    data.pop_if(|b| *b == b',');
                    data.push(b'}');
                }
            }
            assert!(serde_json::from_slice::<serde_json::Value>(&data).is_ok(), "{}", String::from_utf8_lossy(&data));
            if let Some(span) = usage_null_at_end(&data) {
                shortcuts += 1;
                assert_eq!(Some(span), find_usage_null(&data), "{}", String::from_utf8_lossy(&data));
            }
        }
        assert!(shortcuts > 5_000, "the shortcut was taken {shortcuts} times");
    }

    #[test]
    fn the_tail_shortcut_leaves_what_is_not_the_last_member_alone() {
        for data in [
            &br#"{"a":{"b":1,"usage":null}}"#[..],
            br#"{"a":"x,\"usage\":null}"}"#,
            br#"{"usage":null}"#,
            br#"[1,"usage":null}"#,
        ] {
            assert_eq!(usage_null_at_end(data), None, "{}", String::from_utf8_lossy(data));
        }
    }

    #[test]
    fn unterminated_tail_is_flushed_unchanged() {
        assert_eq!(run(&[b"data: {\"usage\":null,\"x\":1}"]), b"data: {\"usage\":null,\"x\":1}");
    }
}
