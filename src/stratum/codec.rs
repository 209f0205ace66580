//! Line framing: `\n`- or `\r\n`-terminated lines with a byte cap, blank lines skipped.
//!
//! Used through `FramedRead`, whose `next()` is cancel-safe: a partial line stays in the buffer
//! when a `select!` picks another branch.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Splits a byte stream into lines of at most `max` bytes (terminator excluded).
#[derive(Debug, Clone)]
pub struct LineCodec {
    max: usize,
    /// Bytes of the buffer already searched for `\n`, so a slow line is scanned once.
    scanned: usize,
}

impl LineCodec {
    pub fn new(max: usize) -> Self {
        Self { max, scanned: 0 }
    }
}

impl Decoder for LineCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        loop {
            let Some(pos) = memchr(&buf[self.scanned..]).map(|p| p + self.scanned) else {
                self.scanned = buf.len();
                // `\r` may still belong to a `\r\n` terminator.
                if buf.len() > self.max + 1 {
                    return Err(FrameError::TooLong(self.max));
                }
                return Ok(None);
            };
            self.scanned = 0;
            let mut line = buf.split_to(pos + 1);
            line.truncate(pos);
            if line.last() == Some(&b'\r') {
                line.truncate(pos - 1);
            }
            if line.len() > self.max {
                return Err(FrameError::TooLong(self.max));
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Ok(Some(line));
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(buf)? {
            Some(line) => Ok(Some(line)),
            None => {
                // A final line without a terminator is dropped: a half-written request is not a request.
                buf.advance(buf.len());
                self.scanned = 0;
                Ok(None)
            }
        }
    }
}

fn memchr(haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|b| *b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[&[u8]], max: usize) -> Result<Vec<Vec<u8>>, String> {
        let mut codec = LineCodec::new(max);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in input {
            buf.extend_from_slice(chunk);
            while let Some(line) = codec.decode(&mut buf).map_err(|e| e.to_string())? {
                out.push(line.to_vec());
            }
        }
        Ok(out)
    }

    #[test]
    fn terminators_and_blank_lines() {
        assert_eq!(lines(&[b"a\nb\r\n\n\r\n  \nc\n"], 16).unwrap(), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn arbitrary_chunking() {
        let input = b"{\"id\":1}\r\n{\"id\":2}\n\n{\"id\":3}\n";
        let whole = lines(&[input], 64).unwrap();
        for split in 0..input.len() {
            for split2 in split..input.len() {
                let got = lines(&[&input[..split], &input[split..split2], &input[split2..]], 64).unwrap();
                assert_eq!(got, whole, "{split}/{split2}");
            }
        }
    }

    #[test]
    fn cap_is_enforced_with_or_without_a_newline() {
        assert_eq!(lines(&[b"12345678\n"], 8).unwrap(), vec![b"12345678".to_vec()]);
        assert_eq!(lines(&[b"12345678\r\n"], 8).unwrap(), vec![b"12345678".to_vec()]);
        assert!(lines(&[b"123456789\n"], 8).is_err());
        assert!(lines(&[b"1234", b"56789", b"0"], 8).is_err());
        assert!(lines(&[&[b'x'; 100]], 8).is_err());
    }

    #[test]
    fn cr_only_is_not_a_terminator() {
        assert!(lines(&[b"{}\r{}\r{}\r{}\r"], 8).is_err());
        assert_eq!(lines(&[b"{}\r{}\n"], 8).unwrap(), vec![b"{}\r{}".to_vec()]);
    }
}
