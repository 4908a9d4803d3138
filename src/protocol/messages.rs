//! Backend messages pgshield writes itself (to clients), and the ErrorResponse it parses
//! from backends. Client-to-server messages are written with `postgres_protocol`.

use bytes::{BufMut, BytesMut};

/// Writes one tagged message: the tag, a length patched in afterwards, and the body.
pub fn put_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
}

pub fn authentication_ok(buf: &mut BytesMut) {
    put_message(buf, b'R', |b| b.put_i32(0));
}

pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    put_message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    put_message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    put_message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_message(buf, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, process_id: i32, secret_key: i32) {
    put_message(buf, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put_message(buf, b'C', |b| put_cstr(b, tag));
}

/// A NoticeResponse ('N') pgshield itself sends, with severity NOTICE.
pub fn notice(buf: &mut BytesMut, code: &str, message: &str) {
    put_message(buf, b'N', |b| {
        for (field, value) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', code),
            (b'M', message),
        ] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    put_message(buf, b'Z', |b| b.put_u8(status));
}

/// NegotiateProtocolVersion: we speak 3.0 and none of the `_pq_.` options asked for.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unrecognized: &[&str]) {
    put_message(buf, b'v', |b| {
        b.put_i32(PROTOCOL_3_MAJOR | newest_minor);
        b.put_i32(unrecognized.len() as i32);
        for opt in unrecognized {
            put_cstr(b, opt);
        }
    });
}

const PROTOCOL_3_MAJOR: i32 = 3 << 16;

/// Severity of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Panic,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
        }
    }

    /// Whether the sender closes the connection after this error.
    pub fn is_fatal(self) -> bool {
        matches!(self, Severity::Fatal | Severity::Panic)
    }
}

/// An ErrorResponse, either one pgshield reports or one parsed from a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    pub severity: Severity,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorResponse {
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn fatal(code: &str, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    fn new(severity: Severity, code: &str, message: impl Into<String>) -> Self {
        ErrorResponse {
            severity,
            code: code.to_owned(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The same error, now FATAL (the connection is about to close).
    pub fn into_fatal(mut self) -> Self {
        self.severity = Severity::Fatal;
        self
    }

    /// Appends the ErrorResponse ('E') to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        put_message(buf, b'E', |b| {
            for (field, value) in [
                (b'S', Some(self.severity.as_str())),
                (b'V', Some(self.severity.as_str())),
                (b'C', Some(self.code.as_str())),
                (b'M', Some(self.message.as_str())),
                (b'D', self.detail.as_deref()),
                (b'H', self.hint.as_deref()),
            ] {
                if let Some(v) = value {
                    b.put_u8(field);
                    put_cstr(b, v);
                }
            }
            b.put_u8(0);
        });
    }

    /// Parses the body of an ErrorResponse sent by a backend. Texts need not be UTF-8
    /// (the server writes them in the client's encoding).
    pub fn parse(mut body: &[u8]) -> Option<ErrorResponse> {
        let mut err = ErrorResponse::error("XX000", "");
        let mut saw_code = false;
        loop {
            let (&field, rest) = body.split_first()?;
            body = rest;
            if field == 0 {
                return saw_code.then_some(err);
            }
            let end = body.iter().position(|&b| b == 0)?;
            let value = String::from_utf8_lossy(&body[..end]);
            let value = value.as_ref();
            body = &body[end + 1..];
            match field {
                b'V' => {
                    err.severity = match value {
                        "FATAL" => Severity::Fatal,
                        "PANIC" => Severity::Panic,
                        _ => Severity::Error,
                    }
                }
                b'C' => {
                    err.code = value.to_owned();
                    saw_code = true;
                }
                b'M' => err.message = value.to_owned(),
                b'D' => err.detail = Some(value.to_owned()),
                b'H' => err.hint = Some(value.to_owned()),
                _ => {}
            }
        }
    }
}

/// One field of an ErrorResponse or NoticeResponse body, as sent.
pub fn error_field(mut body: &[u8], wanted: u8) -> Option<&[u8]> {
    loop {
        let (&field, rest) = body.split_first()?;
        if field == 0 {
            return None;
        }
        let end = rest.iter().position(|&b| b == 0)?;
        if field == wanted {
            return Some(&rest[..end]);
        }
        body = &rest[end + 1..];
    }
}

/// The ErrorResponse whose body is `body`, with `from` in its message replaced (once) by
/// `to`, byte for byte (the message is in the client's encoding); None if the message
/// does not hold `from`.
pub fn renamed_error(body: &[u8], from: &str, to: &str) -> Option<BytesMut> {
    let message = error_field(body, b'M')?;
    let at = memchr::memmem::find(message, from.as_bytes())?;
    let mut renamed = message[..at].to_vec();
    renamed.extend_from_slice(to.as_bytes());
    renamed.extend_from_slice(&message[at + from.len()..]);
    let mut buf = BytesMut::new();
    error_with_message(body, &renamed, &mut buf);
    Some(buf)
}

/// An ErrorResponse with the fields of `body` (another one's), but its message `message`.
fn error_with_message(body: &[u8], message: &[u8], buf: &mut BytesMut) {
    put_message(buf, b'E', |b| {
        let mut rest = body;
        while let Some((&field, after)) = rest.split_first() {
            let Some(end) = after.iter().position(|&c| c == 0) else {
                break;
            };
            if field == 0 {
                break;
            }
            b.put_u8(field);
            if field == b'M' {
                b.put_slice(message);
                b.put_u8(0);
            } else {
                b.put_slice(&after[..=end]);
            }
            rest = &after[end + 1..];
        }
        b.put_u8(0);
    });
}

/// The error PostgreSQL gives for a prepared statement whose result type changed since it
/// was prepared ("cached plan must not change result type"): drivers (asyncpg, pgjdbc)
/// know it by its routine and prepare the statement again.
pub fn is_stale_plan_error(body: &[u8]) -> bool {
    error_field(body, b'C') == Some(b"0A000")
        && (error_field(body, b'R') == Some(b"RevalidateCachedQuery")
            || error_field(body, b'M') == Some(b"cached plan must not change result type"))
}

/// PostgreSQL's error for a Bind of a prepared statement whose result type changed, with
/// its routine (what `is_stale_plan_error` knows it by).
pub fn stale_plan_error(buf: &mut BytesMut) {
    put_message(buf, b'E', |b| {
        for (field, value) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "0A000"),
            (b'M', "cached plan must not change result type"),
            (b'R', "RevalidateCachedQuery"),
        ] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

impl std::fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.severity.as_str(),
            self.code,
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn fields_are_read_off_an_error_as_sent_and_a_stale_plan_is_known_by_its_routine() {
        let body = b"SERROR\0C0A000\0Mcached plan must not change result type\0Fplancache.c\0RRevalidateCachedQuery\0\0";
        assert_eq!(error_field(body, b'C'), Some(&b"0A000"[..]));
        assert_eq!(error_field(body, b'R'), Some(&b"RevalidateCachedQuery"[..]));
        assert_eq!(error_field(body, b'D'), None);
        assert!(is_stale_plan_error(body));
        // Translated (lc_messages), it is still known by its routine.
        let translated = b"SFEHLER\0C0A000\0Mgecachter Plan darf den Ergebnistyp nicht andern\0RRevalidateCachedQuery\0\0";
        assert!(is_stale_plan_error(translated));
        // Another 0A000, or a truncated body, is not it.
        let other = b"SERROR\0C0A000\0Mcannot PREPARE\0Rexec_stmt_raise\0\0";
        assert!(!is_stale_plan_error(other));
        assert!(!is_stale_plan_error(b"C0A000"));
    }

    #[test]
    fn an_error_is_given_another_message_with_its_other_fields_kept() {
        let body = b"SERROR\0VERROR\0C42P05\0Mprepared statement \"pgshield_2\" already exists\0Fprepare.c\0RStorePreparedStatement\0\0";
        let mut buf = BytesMut::new();
        error_with_message(body, b"prepared statement \"s0\" already exists", &mut buf);
        let Ok(Some(Message::ErrorResponse(_))) = Message::parse(&mut buf.clone()) else {
            panic!("not an ErrorResponse");
        };
        let rewritten = &buf[5..];
        assert_eq!(
            rewritten,
            &b"SERROR\0VERROR\0C42P05\0Mprepared statement \"s0\" already exists\0Fprepare.c\0RStorePreparedStatement\0\0"[..]
        );
        // A truncated body ends where it can no longer be read.
        let mut buf = BytesMut::new();
        error_with_message(b"SERROR\0C42P0", b"m", &mut buf);
        assert_eq!(&buf[5..], b"SERROR\0\0");
        // A name is replaced in a message in any language and encoding (LATIN1 here).
        let latin1 =
            b"SFEHLER\0C42P05\0MVorbereitete Anweisung \xbbpgshield_7\xab existiert bereits\0\0";
        let renamed = renamed_error(latin1, "pgshield_7", "s0").expect("renamed");
        assert_eq!(
            &renamed[5..],
            &b"SFEHLER\0C42P05\0MVorbereitete Anweisung \xbbs0\xab existiert bereits\0\0"[..]
        );
        assert!(renamed_error(latin1, "pgshield_8", "s0").is_none());
    }

    #[test]
    fn errors_round_trip_through_a_real_parser() {
        let mut buf = BytesMut::new();
        ErrorResponse::fatal("53300", "sorry, too many clients already")
            .with_hint("raise max_client_connections")
            .encode(&mut buf);
        let Ok(Some(Message::ErrorResponse(body))) = Message::parse(&mut buf) else {
            panic!("not an ErrorResponse");
        };
        use fallible_iterator::FallibleIterator;
        let fields: Vec<(u8, String)> = body
            .fields()
            .map(|f| {
                Ok((
                    f.type_(),
                    String::from_utf8_lossy(f.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .unwrap();
        assert!(fields.contains(&(b'C', "53300".into())));
        assert!(fields.contains(&(b'S', "FATAL".into())));
        assert!(fields.contains(&(b'H', "raise max_client_connections".into())));
    }

    #[test]
    fn parse_reads_back_what_encode_wrote() {
        let original =
            ErrorResponse::error("28P01", "password authentication failed for user \"x\"")
                .with_detail("d");
        let mut buf = BytesMut::new();
        original.encode(&mut buf);
        assert_eq!(ErrorResponse::parse(&buf[5..]), Some(original));
        assert_eq!(ErrorResponse::parse(b"Mno code\0\0"), None);
        assert_eq!(ErrorResponse::parse(b"Cabc"), None);
        let latin1 = ErrorResponse::parse(b"VFATAL\0C57P01\0Mterminaci\xf3n\0\0").expect("parses");
        assert!(latin1.severity.is_fatal());
    }

    #[test]
    fn ready_for_query_and_parameter_status_layouts() {
        let mut buf = BytesMut::new();
        ready_for_query(&mut buf, b'I');
        assert_eq!(&buf[..], b"Z\0\0\0\x05I");
        buf.clear();
        parameter_status(&mut buf, "a", "b");
        assert_eq!(&buf[..], b"S\0\0\0\x08a\0b\0");
    }
}
