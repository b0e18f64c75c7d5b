//! Push-based decoding of `Content-Encoding` (gzip, deflate, br, zstd) for the capture side
//! only: the client always receives the upstream's bytes as they were.

use std::io::Write;

/// An incremental decoder; `push` returns the bytes decoded so far from this piece.
pub enum ContentDecoder {
    Identity,
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    Deflate(Box<flate2::write::ZlibDecoder<Vec<u8>>>),
    Brotli(Box<brotli_decompressor::DecompressorWriter<Vec<u8>>>),
    Zstd(Box<zstd::stream::write::Decoder<'static, Vec<u8>>>),
    /// Unknown encoding or a decode failure: nothing more is parsed.
    Failed,
}

impl ContentDecoder {
    /// Picks a decoder for a `Content-Encoding` value; `None` for an encoding llmtap cannot read.
    pub fn for_encoding(encoding: Option<&str>) -> Option<Self> {
        let enc = encoding.map(|e| e.trim().to_ascii_lowercase());
        Some(match enc.as_deref() {
            None | Some("") | Some("identity") => ContentDecoder::Identity,
            Some("gzip") | Some("x-gzip") => ContentDecoder::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
            Some("deflate") => ContentDecoder::Deflate(Box::new(flate2::write::ZlibDecoder::new(Vec::new()))),
            Some("br") => {
                ContentDecoder::Brotli(Box::new(brotli_decompressor::DecompressorWriter::new(Vec::new(), 4096)))
            }
            Some("zstd") => match zstd::stream::write::Decoder::new(Vec::new()) {
                Ok(d) => ContentDecoder::Zstd(Box::new(d)),
                Err(_) => return None,
            },
            Some(_) => return None,
        })
    }

    pub fn is_identity(&self) -> bool {
        matches!(self, ContentDecoder::Identity)
    }

    /// Decodes one piece. `Err` means the stream cannot be decoded; the caller records a
    /// parse error and stops feeding.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, std::io::Error> {
        fn run<W: Write>(w: &mut W, data: &[u8], out: impl FnOnce(&mut W) -> Vec<u8>) -> std::io::Result<Vec<u8>> {
            w.write_all(data)?;
            w.flush()?;
            Ok(out(w))
        }
        let res = match self {
            ContentDecoder::Identity => return Ok(data.to_vec()),
            ContentDecoder::Failed => return Ok(Vec::new()),
            ContentDecoder::Gzip(d) => run(d.as_mut(), data, |d| std::mem::take(d.get_mut())),
            ContentDecoder::Deflate(d) => run(d.as_mut(), data, |d| std::mem::take(d.get_mut())),
            ContentDecoder::Brotli(d) => run(d.as_mut(), data, |d| std::mem::take(d.get_mut())),
            ContentDecoder::Zstd(d) => run(d.as_mut(), data, |d| std::mem::take(d.get_mut())),
        };
        if res.is_err() {
            *self = ContentDecoder::Failed;
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(enc: &str, compressed: Vec<u8>, plain: &[u8]) {
        for split in [1usize, 3, 17, compressed.len().max(1)] {
            let mut d = ContentDecoder::for_encoding(Some(enc)).unwrap_or(ContentDecoder::Failed);
            let mut out = Vec::new();
            for piece in compressed.chunks(split) {
                out.extend(d.push(piece).unwrap_or_default());
            }
            assert_eq!(out, plain, "{enc} split {split}");
        }
    }

    #[test]
    fn decodes_every_supported_encoding_in_pieces() {
        let plain = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n".repeat(20);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).unwrap_or_default();
        round_trip("gzip", gz.finish().unwrap_or_default(), &plain);
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(&plain).unwrap_or_default();
        round_trip("deflate", zl.finish().unwrap_or_default(), &plain);
        round_trip("zstd", zstd::encode_all(&plain[..], 3).unwrap_or_default(), &plain);
        round_trip("br", brotli_compress(&plain), &plain);
    }

    // A stored (uncompressed) brotli meta-block stream: valid brotli without an encoder crate.
    fn brotli_compress(data: &[u8]) -> Vec<u8> {
        // WBITS=16 header bit '0'; then one uncompressed meta-block per <=65536 bytes; then
        // ISLAST empty block. Bits are written LSB first.
        let mut w = BitWriter::default();
        w.put(0, 1); // WBITS = 16
        for chunk in data.chunks(65536) {
            w.put(0, 1); // ISLAST = 0
            let len = chunk.len() - 1;
            let nibbles: u32 = if len < (1 << 16) { 4 } else { 5 };
            w.put(u64::from(nibbles - 4), 2); // MNIBBLES
            w.put(len as u64, nibbles * 4);
            w.put(1, 1); // ISUNCOMPRESSED
            w.align();
            w.bytes.extend_from_slice(chunk);
        }
        w.put(1, 1); // ISLAST
        w.put(1, 1); // ISLASTEMPTY
        w.align();
        w.bytes
    }

    #[derive(Default)]
    struct BitWriter {
        bytes: Vec<u8>,
        bit: u32,
    }

    impl BitWriter {
        fn put(&mut self, v: u64, n: u32) {
            for i in 0..n {
                if self.bit == 0 {
                    self.bytes.push(0);
                }
                if (v >> i) & 1 == 1 {
                    if let Some(last) = self.bytes.last_mut() {
                        *last |= 1 << self.bit;
                    }
                }
                self.bit = (self.bit + 1) % 8;
            }
        }
        fn align(&mut self) {
            self.bit = 0;
        }
    }
}
