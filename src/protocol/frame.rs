//! Framing of tagged protocol messages: one tag byte, then a big-endian `i32` length that
//! counts itself but not the tag.
//!
//! The length is checked against a cap *before* any buffer grows for it, so a client that
//! announces a 2 GiB message costs nothing. Postgres-protocol's own parser has no cap and
//! rejects some tags, which is why pgshield frames messages itself.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Tag byte plus the length field.
pub const HEADER_LEN: usize = 5;

/// Largest message pgshield buffers whole. Messages that need no inspection (rows, COPY
/// data) are streamed through in pieces whatever their size.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Bytes of the whole message, tag included.
    pub len: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} for message type '{}'", char::from(*.tag))]
    BadLength { tag: u8, len: i32 },
    #[error("message type '{}' of {len} bytes exceeds the limit of {max} bytes", char::from(*.tag))]
    TooLarge { tag: u8, len: usize, max: usize },
}

/// Reads the header at the start of `buf`, if five bytes are there. Checks only that the
/// length is possible: a message that is streamed through is never held whole, so only
/// the caller knows whether its size matters (see [`Header::check_size`]).
pub fn peek_header(buf: &[u8]) -> Result<Option<Header>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let raw = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if raw < 4 {
        return Err(FrameError::BadLength { tag, len: raw });
    }
    Ok(Some(Header {
        tag,
        len: raw as usize + 1,
    }))
}

impl Header {
    /// Refuses a message too large to be held whole.
    pub fn check_size(&self, max_len: usize) -> Result<(), FrameError> {
        if self.len > max_len {
            return Err(FrameError::TooLarge {
                tag: self.tag,
                len: self.len,
                max: max_len,
            });
        }
        Ok(())
    }
}

/// Splits one whole message off the front of `buf`, if it is all there.
/// Reserves room for the rest of a message whose header has arrived.
pub fn split_message(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<(u8, BytesMut)>, FrameError> {
    let header = peek_header(buf)?;
    if let Some(h) = &header {
        h.check_size(max_len)?;
    }
    match header {
        Some(h) if buf.len() >= h.len => {
            let mut msg = buf.split_to(h.len);
            msg.advance(HEADER_LEN);
            Ok(Some((h.tag, msg)))
        }
        Some(h) => {
            buf.reserve(h.len - buf.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("connection closed")]
    Closed,
}

/// Reads one whole message (tag and body without header) from a stream, buffering in `buf`.
/// Used during handshakes, where messages are few and small; the relay has its own loop.
pub async fn read_message<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<(u8, BytesMut), ReadError> {
    loop {
        if let Some(msg) = split_message(buf, max_len)? {
            return Ok(msg);
        }
        buf.reserve(HEADER_LEN);
        if stream.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// Reads a NUL-terminated string from the front of `body`, advancing past it.
pub fn take_cstr<'a>(body: &mut &'a [u8]) -> Option<&'a str> {
    let mut rest = *body;
    let s = std::str::from_utf8(take_cstr_bytes(&mut rest)?).ok()?;
    *body = rest;
    Some(s)
}

/// Like [`take_cstr`], in any encoding: SQL text is in the client's `client_encoding`
/// (LATIN1, SJIS, …), which PostgreSQL accepts and pgshield passes on as it is.
pub fn take_cstr_bytes<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = memchr::memchr(0, body)?;
    let s = &body[..end];
    *body = &body[end + 1..];
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_needs_five_bytes() {
        assert_eq!(peek_header(b"Q\0\0"), Ok(None));
        assert_eq!(
            peek_header(b"Q\0\0\0\x05x"),
            Ok(Some(Header { tag: b'Q', len: 6 }))
        );
    }

    #[test]
    fn lengths_below_four_are_refused() {
        assert_eq!(
            peek_header(b"Q\0\0\0\x03"),
            Err(FrameError::BadLength { tag: b'Q', len: 3 })
        );
        assert!(matches!(
            peek_header(b"Q\xff\xff\xff\xff"),
            Err(FrameError::BadLength { .. })
        ));
    }

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        let mut buf = BytesMut::from(&b"d\x7f\xff\xff\xff"[..]);
        let err = split_message(&mut buf, 1 << 20).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { tag: b'd', .. }));
        assert!(buf.capacity() < 1 << 20);
    }

    #[test]
    fn split_message_waits_for_the_whole_body() {
        let mut buf = BytesMut::from(&b"Q\0\0\0\x0aSEL"[..]);
        assert_eq!(split_message(&mut buf, 100), Ok(None));
        buf.extend_from_slice(b"ECT");
        buf.extend_from_slice(b"X\0\0\0\x04");
        let (tag, body) = split_message(&mut buf, 100).unwrap().unwrap();
        assert_eq!((tag, &body[..]), (b'Q', &b"SELECT"[..]));
        let (tag, body) = split_message(&mut buf, 100).unwrap().unwrap();
        assert_eq!((tag, body.len()), (b'X', 0));
        assert!(buf.is_empty());
    }

    #[test]
    fn cstr_parsing_stops_at_nul_and_rejects_unterminated() {
        let mut body: &[u8] = b"user\0bob\0";
        assert_eq!(take_cstr(&mut body), Some("user"));
        assert_eq!(take_cstr(&mut body), Some("bob"));
        assert_eq!(body, b"");
        let mut bad: &[u8] = b"abc";
        assert_eq!(take_cstr(&mut bad), None);
        let mut latin1: &[u8] = b"caf\xe9\0rest";
        assert_eq!(take_cstr_bytes(&mut latin1), Some(&b"caf\xe9"[..]));
        assert_eq!(latin1, b"rest");
        assert_eq!(take_cstr_bytes(&mut latin1), None);
    }
}
