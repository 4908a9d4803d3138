//! Untagged startup packets: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.
//!
//! A startup packet is a big-endian `i32` length (counting itself) followed by a request
//! code. PostgreSQL refuses packets over 10,000 bytes; so do we, before reading the body.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::frame::{take_cstr, ReadError};

/// PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`, which excludes the length word.
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol 3.0 as a request code: major 3 in the high 16 bits.
pub const PROTOCOL_3_0: i32 = 3 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        process_id: i32,
        secret_key: Vec<u8>,
    },
    Startup(StartupMessage),
    /// A protocol major version pgshield does not speak.
    UnsupportedVersion {
        major: u16,
        minor: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupMessage {
    /// Minor protocol version the client asked for (we speak 3.0 and negotiate down).
    pub minor_version: u16,
    /// Parameters in the order the client sent them (later duplicates win, as in Postgres).
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(i64),
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
}

/// Parses one whole startup packet body (after the length word).
pub fn parse(mut body: &[u8]) -> Result<StartupPacket, StartupError> {
    if body.len() < 4 {
        return Err(StartupError::BadLength(body.len() as i64 + 4));
    }
    let code = body.get_i32();
    match code {
        SSL_REQUEST_CODE if body.is_empty() => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if body.is_empty() => Ok(StartupPacket::GssEncRequest),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => Err(StartupError::Malformed(
            "unexpected bytes after request code",
        )),
        CANCEL_REQUEST_CODE => {
            // Protocol 3.0 keys are 4 bytes; 3.2 allows up to 256.
            if body.len() < 8 || body.len() > 4 + 256 {
                return Err(StartupError::Malformed("cancel request of the wrong size"));
            }
            let process_id = body.get_i32();
            Ok(StartupPacket::Cancel {
                process_id,
                secret_key: body.to_vec(),
            })
        }
        _ => {
            let major = (code as u32 >> 16) as u16;
            let minor = (code as u32 & 0xffff) as u16;
            if major != 3 {
                return Ok(StartupPacket::UnsupportedVersion { major, minor });
            }
            let params = parse_params(body)?;
            Ok(StartupPacket::Startup(StartupMessage {
                minor_version: minor,
                params,
            }))
        }
    }
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        match body {
            [] => return Err(StartupError::Malformed("expected terminator as last byte")),
            [0] => return Ok(params),
            _ => {}
        }
        let name = take_cstr(&mut body)
            .ok_or(StartupError::Malformed("unterminated or non-UTF-8 name"))?;
        let value = take_cstr(&mut body)
            .ok_or(StartupError::Malformed("unterminated or non-UTF-8 value"))?;
        params.push((name.to_owned(), value.to_owned()));
    }
}

/// What the first read of a connection makes room for: most drivers' startup packets fit.
const TYPICAL_PACKET_LEN: usize = 256;

/// Reads one startup packet from a new connection. Checks the length before reading more.
pub async fn read<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<StartupPacket, StartupReadError> {
    while buf.len() < 4 {
        // Room for a whole typical packet: one read, not one for the length and one for
        // the rest. (Bytes beyond the packet stay in `buf`: the caller refuses them after
        // an SSLRequest, and a session takes them as its first input.)
        buf.reserve(TYPICAL_PACKET_LEN);
        if stream.read_buf(buf).await.map_err(ReadError::Io)? == 0 {
            return Err(ReadError::Closed.into());
        }
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as i64;
    if len < 8 || len > (MAX_STARTUP_PACKET_LEN + 4) as i64 {
        return Err(StartupError::BadLength(len).into());
    }
    let len = len as usize;
    while buf.len() < len {
        buf.reserve(len - buf.len());
        if stream.read_buf(buf).await.map_err(ReadError::Io)? == 0 {
            return Err(ReadError::Closed.into());
        }
    }
    let packet = buf.split_to(len);
    Ok(parse(&packet[4..])?)
}

#[derive(Debug, thiserror::Error)]
pub enum StartupReadError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Invalid(#[from] StartupError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut v = ((rest.len() + 8) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn parses_a_startup_message() {
        let p = parse(&packet(PROTOCOL_3_0, b"user\0bob\0database\0app\0user\0alice\0\0")[4..])
            .unwrap();
        let StartupPacket::Startup(m) = p else {
            panic!("{p:?}")
        };
        assert_eq!(m.minor_version, 0);
        assert_eq!(m.get("user"), Some("alice"));
        assert_eq!(m.get("database"), Some("app"));
        assert_eq!(m.get("options"), None);
    }

    #[test]
    fn recognises_requests_and_versions() {
        assert_eq!(
            parse(&packet(SSL_REQUEST_CODE, b"")[4..]),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse(&packet(GSSENC_REQUEST_CODE, b"")[4..]),
            Ok(StartupPacket::GssEncRequest)
        );
        assert_eq!(
            parse(&packet(CANCEL_REQUEST_CODE, &[0, 0, 0, 7, 1, 2, 3, 4])[4..]),
            Ok(StartupPacket::Cancel {
                process_id: 7,
                secret_key: vec![1, 2, 3, 4]
            })
        );
        assert_eq!(
            parse(&packet(2 << 16, b"")[4..]),
            Ok(StartupPacket::UnsupportedVersion { major: 2, minor: 0 })
        );
        let StartupPacket::Startup(m) = parse(&packet(PROTOCOL_3_0 | 2, b"\0")[4..]).unwrap()
        else {
            panic!()
        };
        assert_eq!(m.minor_version, 2);
    }

    #[test]
    fn malformed_layouts_are_refused() {
        for body in [&b"user\0bob\0"[..], b"user\0bob", b"user", b""] {
            assert!(parse(&packet(PROTOCOL_3_0, body)[4..]).is_err(), "{body:?}");
        }
        assert!(parse(&packet(CANCEL_REQUEST_CODE, &[0, 0])[4..]).is_err());
        assert!(parse(&packet(SSL_REQUEST_CODE, b"x")[4..]).is_err());
    }

    #[tokio::test]
    async fn oversized_startup_packets_are_refused_unread() {
        let mut bytes: &[u8] = &[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0];
        let err = read(&mut bytes, &mut BytesMut::new()).await.unwrap_err();
        assert!(matches!(
            err,
            StartupReadError::Invalid(StartupError::BadLength(_))
        ));
        let mut tiny: &[u8] = &[0, 0, 0, 4];
        assert!(read(&mut tiny, &mut BytesMut::new()).await.is_err());
    }
}
