//! Splits a streamed JSON array (`[{…},\r\n{…}]`, Gemini's `streamGenerateContent` without
//! `alt=sse`) into its top-level elements as they complete, across arbitrary feed boundaries.

/// Incremental splitter: tracks nesting and string state so it never parses twice.
#[derive(Debug, Default)]
pub struct JsonArraySplitter {
    buf: Vec<u8>,
    depth: u32,
    in_string: bool,
    escaped: bool,
    opened: bool,
    closed: bool,
    bad: bool,
}

impl JsonArraySplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; calls `on_element` with the raw text of every completed element.
    pub fn feed(&mut self, bytes: &[u8], mut on_element: impl FnMut(&[u8])) {
        for &b in bytes {
            if self.closed {
                if !b.is_ascii_whitespace() {
                    self.bad = true;
                }
                continue;
            }
            if !self.opened {
                match b {
                    b'[' => self.opened = true,
                    _ if b.is_ascii_whitespace() => {}
                    _ => {
                        self.bad = true;
                        self.closed = true;
                    }
                }
                continue;
            }
            if self.depth == 0 {
                match b {
                    b'{' | b'[' => {
                        self.depth = 1;
                        self.buf.clear();
                        self.buf.push(b);
                    }
                    b']' => self.closed = true,
                    b',' => {}
                    _ if b.is_ascii_whitespace() => {}
                    _ => self.bad = true,
                }
                continue;
            }
            self.buf.push(b);
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        on_element(&self.buf);
                        self.buf.clear();
                    }
                }
                _ => {}
            }
        }
    }

    /// True when the input so far is not a well-formed array, or stopped inside one.
    pub fn is_malformed_at_end(&self) -> bool {
        self.bad || !self.closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_gemini_style_array_at_any_boundary() {
        let src: &[u8] = b"[{\"a\":\"x]}\\\"\",\"b\":[1,{\"c\":2}]}\n,\r\n{\"d\":3}\n]";
        let mut whole = Vec::new();
        let mut s = JsonArraySplitter::new();
        s.feed(src, |e| whole.push(e.to_vec()));
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[1], b"{\"d\":3}");
        assert!(!s.is_malformed_at_end());
        for i in 0..src.len() {
            let mut got = Vec::new();
            let mut s = JsonArraySplitter::new();
            s.feed(&src[..i], |e| got.push(e.to_vec()));
            s.feed(&src[i..], |e| got.push(e.to_vec()));
            assert_eq!(got, whole, "split at {i}");
        }
    }

    #[test]
    fn truncated_array_is_malformed() {
        let mut s = JsonArraySplitter::new();
        s.feed(b"[{\"a\":1},{\"b\"", |_| {});
        assert!(s.is_malformed_at_end());
    }
}
