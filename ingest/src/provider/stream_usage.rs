//! Undoes, on the client's copy of an OpenAI chat stream, what llmtap's injected
//! `stream_options.include_usage` added upstream: the `"usage":null` member in every chunk
//! and the final usage-only chunk (`"choices":[]` with a usage object). Everything else is
//! forwarded byte for byte. This is the one place llmtap changes response bytes, and only
//! for requests whose client did not ask for usage itself.
//!
//! Events are released as soon as their terminating blank line arrives, so the only delay
//! is the rest of an event that is split across frames.

use std::ops::Range;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};

/// Per-stream state: bytes of an event not yet terminated.
#[derive(Debug, Default)]
pub struct StreamUsageStripper {
    pending: BytesMut,
    /// A `\r` ended the last feed; a following `\n` belongs to the same line end.
    scan_from: usize,
    /// Where the bytes to forward are written: each push's output is split off its front,
    /// so a stream's events share an allocation of `OUT_BLOCK` bytes, not one each.
    out: BytesMut,
}

/// Size of the output buffer a stream's events are written into.
const OUT_BLOCK: usize = 1024;

impl StreamUsageStripper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a frame from upstream; returns the bytes to forward now (possibly empty).
    pub fn push(&mut self, frame: &[u8]) -> Bytes {
        // What was split off before is usually sent and dropped by now, and the room is
        // taken back without an allocation.
        if self.out.capacity() < frame.len() {
            self.out.reserve(frame.len().max(OUT_BLOCK));
        }
        let out = &mut self.out;
        if self.pending.is_empty() {
            // Nothing held over (the usual case: one or more whole events per frame): read
            // the events straight from the frame and keep only an unfinished tail.
            let mut at = 0;
            while at < frame.len() {
                let rest = &frame[at..];
                let end = match one_line_data_event(rest) {
                    Some((end, data)) => {
                        rewrite_data(&rest[..end], data, out);
                        end
                    }
                    None => match event_end(rest, 0) {
                        Some(end) => {
                            rewrite_event(&rest[..end], out);
                            end
                        }
                        None => break,
                    },
                };
                at += end;
            }
            self.pending.extend_from_slice(&frame[at..]);
            self.scan_from = self.pending.len().saturating_sub(3);
            return out.split().freeze();
        }
        self.pending.extend_from_slice(frame);
        loop {
            let Some(end) = event_end(&self.pending, self.scan_from) else {
                self.scan_from = self.pending.len().saturating_sub(3);
                break;
            };
            let event = self.pending.split_to(end);
            self.scan_from = 0;
            rewrite_event(&event, out);
        }
        out.split().freeze()
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
        if let Some(value) = data_value_at(line) {
            let start = pos + value;
            let end = pos + line.len() - line.iter().rev().take_while(|b| **b == b'\n' || **b == b'\r').count();
            if data_line.is_some() {
                out.extend_from_slice(event); // multi-line data: not OpenAI's shape, leave it
                return;
            }
            data_line = Some((start, end));
        }
        pos += line.len();
    }
    match data_line {
        Some((start, end)) => rewrite_data(event, start..end, out),
        None => out.extend_from_slice(event),
    }
}

/// Where the value of a `data:` field line starts (after one optional space), if `line` is one.
fn data_value_at(line: &[u8]) -> Option<usize> {
    let rest = line.strip_prefix(b"data:")?;
    Some(5 + usize::from(rest.first() == Some(&b' ')))
}

/// The end of the event that starts `buf` and its payload's span, when the event is one
/// `data:` line ended by `\n\n`, as OpenAI sends every event: `rewrite_event` would find
/// the same payload, without scanning the event twice.
fn one_line_data_event(buf: &[u8]) -> Option<(usize, Range<usize>)> {
    let start = data_value_at(buf)?;
    let end = start + memchr::memchr2(b'\n', b'\r', &buf[start..])?;
    (buf.get(end..end + 2) == Some(b"\n\n")).then_some((end + 2, start..end))
}

/// Writes `event`, whose `data` span is the payload, to `out` without the injected parts.
fn rewrite_data(event: &[u8], data: Range<usize>, out: &mut BytesMut) {
    let payload = &event[data.clone()];
    // A payload whose top-level usage the shortcut found null is not the usage chunk,
    // whose usage is an object (with the member twice, serde reads no usage chunk either):
    // the usual content chunk is settled without looking for an empty array.
    let found = match usage_null_at_end(payload) {
        Some(span) => Some(span),
        None if is_usage_only_chunk(payload) => return,
        None => find_usage_null(payload),
    };
    match found {
        Some((a, b)) => {
            out.extend_from_slice(&event[..data.start + a]);
            out.extend_from_slice(&event[data.start + b..]);
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

/// The span of `,"usage":null` when nothing but members with plain scalar values follows
/// it to the end of the data, as OpenAI sends it (last, or before `"obfuscation":"…"`),
/// found without walking the event. In JSON that parses:
/// - a quote right after a comma opens a key: inside a string it would close the string,
///   and `usage"` cannot follow one;
/// - the `}` that ends the data closes the top-level object, and with no bracket between
///   the member and it (the members after have no escapes, so their quotes are found for
///   sure), the member is one of that object's own.
///
/// `find_usage_null` finds the same span, but only by walking the whole event.
fn usage_null_at_end(data: &[u8]) -> Option<(usize, usize)> {
    const NEEDLE: &[u8] = b",\"usage\":null";
    static FINDER: LazyLock<memchr::memmem::FinderRev<'static>> =
        LazyLock::new(|| memchr::memmem::FinderRev::new(NEEDLE));
    let inner = data.strip_prefix(b"{")?.strip_suffix(b"}")?;
    let at = match inner.ends_with(NEEDLE) {
        true => inner.len() - NEEDLE.len(),
        false => FINDER.rfind(inner)?,
    };
    let after = at + NEEDLE.len();
    scalar_members(&inner[after..]).then_some((at + 1, after + 1))
}

/// Whether `s` is only `,"key":value` members, each key a string without escapes and each
/// value one too, or a bare token (`null`, `true`, `false`, a number).
fn scalar_members(mut s: &[u8]) -> bool {
    /// The length of a string without escapes at the start of `s`, quotes included.
    fn plain_string(s: &[u8]) -> Option<usize> {
        let rest = s.strip_prefix(b"\"")?;
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        (rest[end] == b'"').then_some(end + 2)
    }
    while !s.is_empty() {
        let Some(key) = s.strip_prefix(b",").and_then(plain_string) else {
            return false;
        };
        let Some(value) = s[1 + key..].strip_prefix(b":") else {
            return false;
        };
        let len = match plain_string(value) {
            Some(n) => n,
            None => {
                let n =
                    value.iter().take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')).count();
                if n == 0 {
                    return false;
                }
                n
            }
        };
        s = &value[len..];
    }
    true
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
        let (mut shortcuts, mut followed) = (0, 0);
        for _ in 0..20_000 {
            let mut data = b"{".to_vec();
            for i in 0..rng.usize(0..4) {
                data.extend_from_slice(format!("\"m{i}\":").as_bytes());
                data.extend_from_slice(serde_json::to_string(&random_json(&mut rng, 0)).unwrap().as_bytes());
                data.push(b',');
            }
            match rng.usize(0..3) {
                0 => {
                    data.extend_from_slice(b"\"usage\":null");
                    // OpenAI's `obfuscation` and other scalar members may follow.
                    for _ in 0..rng.usize(0..3) {
                        let value =
                            ["\"9sX}B]\"", "null", "-1.5e3", "true", "\"\\\"usage\\\":null}\""][rng.usize(0..5)];
                        data.extend_from_slice(format!(",\"o{}\":{value}", rng.u8(..)).as_bytes());
                    }
                    data.push(b'}');
                }
                1 => data.extend_from_slice(b"\"usage\":{\"n\":1}}"),
                _ => {
                    data.pop_if(|b| *b == b',');
                    data.push(b'}');
                }
            }
            assert!(serde_json::from_slice::<serde_json::Value>(&data).is_ok(), "{}", String::from_utf8_lossy(&data));
            if let Some(span) = usage_null_at_end(&data) {
                shortcuts += 1;
                followed += usize::from(span.1 + 1 < data.len());
                // The member with the comma before it or the one after: the same bytes out.
                let without = |(a, b): (usize, usize)| [&data[..a], &data[b..]].concat();
                let scanned = find_usage_null(&data).map(without);
                assert_eq!(Some(without(span)), scanned, "{}", String::from_utf8_lossy(&data));
            }
        }
        assert!(
            shortcuts > 3_000 && followed > 1_000,
            "the shortcut was taken {shortcuts} times, {followed} before other members"
        );
    }

    #[test]
    fn the_tail_shortcut_leaves_what_is_not_a_top_level_member_before_plain_ones_alone() {
        for data in [
            &br#"{"a":{"b":1,"usage":null}}"#[..],
            br#"{"a":{"b":1,"usage":null,"o":"x"}}"#,
            br#"{"a":[{"x":2,"usage":null,"o":1}],"o":"x"}"#,
            br#"{"a":1,"usage":null,"o":"a\"b"}"#,
            br#"{"a":1,"usage":null,"o":{}}"#,
            br#"{"a":1,"usage":null,"o":}"#,
            br#"{"a":"x,\"usage\":null}"}"#,
            br#"{"usage":null}"#,
            br#"[1,"usage":null}"#,
        ] {
            assert_eq!(usage_null_at_end(data), None, "{}", String::from_utf8_lossy(data));
        }
    }

    /// `rewrite_event` as it was before `one_line_data_event` and the `usage_null_at_end`
    /// shortcut ahead of the usage-chunk check: lines walked one by one, the usage chunk
    /// looked for first.
    fn rewrite_event_reference(event: &[u8]) -> Vec<u8> {
        let lines: Vec<&[u8]> = event.split_inclusive(|&b| b == b'\n' || b == b'\r').collect();
        let mut data = None;
        let mut pos = 0;
        for line in &lines {
            if let Some(rest) = line.strip_prefix(b"data:") {
                if data.is_some() {
                    return event.to_vec();
                }
                let start = pos + 5 + usize::from(rest.first() == Some(&b' '));
                let end = pos + line.len() - line.iter().rev().take_while(|b| matches!(b, b'\n' | b'\r')).count();
                data = Some((start, end));
            }
            pos += line.len();
        }
        let Some((start, end)) = data else { return event.to_vec() };
        let payload = &event[start..end];
        if is_usage_only_chunk(payload) {
            return Vec::new();
        }
        match usage_null_at_end(payload).or_else(|| find_usage_null(payload)) {
            Some((a, b)) => [&event[..start + a], &event[start + b..]].concat(),
            None => event.to_vec(),
        }
    }

    #[test]
    fn the_one_line_fast_path_rewrites_as_the_reference_does() {
        const PIECES: &[&str] = &[
            "\"choices\":[]",
            "\"choices\":[{\"delta\":{\"content\":\"[]\"}}]",
            "\"usage\":null",
            "\"usage\":{\"total_tokens\":5}",
            "\"x\":\"\\\"usage\\\":null}\"",
            "\"id\":\"c\"",
        ];
        let mut rng = fastrand::Rng::with_seed(5);
        let (mut fast, mut stripped) = (0, 0);
        for _ in 0..20_000 {
            let members: Vec<&str> = (0..rng.usize(0..4)).map(|_| PIECES[rng.usize(0..PIECES.len())]).collect();
            let mut payload = format!("{{{}}}", members.join(","));
            if rng.u8(..) < 20 {
                payload.truncate(rng.usize(0..=payload.len()));
            }
            let sep = ["data: ", "data:", "event: x\ndata: "][rng.usize(0..3)];
            let end = ["\n\n", "\r\n\r\n", "\n\r\n"][rng.usize(0..3)];
            let event = format!("{sep}{payload}{end}");
            let event = event.as_bytes();
            let mut out = BytesMut::new();
            match one_line_data_event(event) {
                Some((len, data)) => {
                    assert_eq!(Some(len), event_end(event, 0), "{event:?}");
                    rewrite_data(event, data, &mut out);
                    fast += 1;
                }
                None => rewrite_event(event, &mut out),
            }
            let want = rewrite_event_reference(event);
            stripped += usize::from(want != event);
            assert_eq!(out, want, "{}", String::from_utf8_lossy(event));
        }
        assert!(fast > 3_000 && stripped > 3_000, "the cases cover both paths: {fast} fast, {stripped} changed");
    }

    #[test]
    fn a_streams_events_share_one_output_buffer() {
        let mut s = StreamUsageStripper::new();
        let event = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        // Held, as hyper holds each until the client has been sent it.
        let outs: Vec<Bytes> = (0..3).map(|_| s.push(event)).collect();
        let want = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        for out in &outs {
            assert_eq!(out.as_ref(), want);
        }
        assert_eq!(outs[1].as_ptr() as usize, outs[0].as_ptr() as usize + want.len());
        assert_eq!(outs[2].as_ptr() as usize, outs[1].as_ptr() as usize + want.len());
    }

    #[test]
    fn unterminated_tail_is_flushed_unchanged() {
        assert_eq!(run(&[b"data: {\"usage\":null,\"x\":1}"]), b"data: {\"usage\":null,\"x\":1}");
    }
}
