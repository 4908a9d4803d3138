//! Just enough SQL to know what a statement does to the session: a lexer that skips
//! comments, strings, quoted identifiers and dollar quotes, and a classifier that looks at
//! each statement's first words and at the functions it calls. No parser: what it cannot
//! classify with confidence pins the client, so nothing breaks.

use std::borrow::Cow;

/// Why a client must keep its backend for the rest of its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PinReason {
    Listen,
    TempTable,
    AdvisoryLock,
    SqlPrepare,
    CursorWithHold,
    SetRole,
    SessionAuthorization,
    Load,
    /// A session setting whose value is not UTF-8 (in a `client_encoding` such as LATIN1):
    /// pgshield carries settings to other backends as text.
    SettingNotUtf8,
    /// A statement the classifier cannot vouch for.
    Unclassified,
}

impl PinReason {
    pub const ALL: [PinReason; 10] = [
        PinReason::Listen,
        PinReason::TempTable,
        PinReason::AdvisoryLock,
        PinReason::SqlPrepare,
        PinReason::CursorWithHold,
        PinReason::SetRole,
        PinReason::SessionAuthorization,
        PinReason::Load,
        PinReason::SettingNotUtf8,
        PinReason::Unclassified,
    ];

    /// A short name, as in logs and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            PinReason::Listen => "listen",
            PinReason::TempTable => "temp_table",
            PinReason::AdvisoryLock => "advisory_lock",
            PinReason::SqlPrepare => "sql_prepare",
            PinReason::CursorWithHold => "cursor_with_hold",
            PinReason::SetRole => "set_role",
            PinReason::SessionAuthorization => "session_authorization",
            PinReason::Load => "load",
            PinReason::SettingNotUtf8 => "setting_not_utf8",
            PinReason::Unclassified => "unclassified",
        }
    }

    /// What the client did, for an error message.
    pub fn feature(self) -> &'static str {
        match self {
            PinReason::Listen => "LISTEN",
            PinReason::TempTable => "temporary tables",
            PinReason::AdvisoryLock => "session-level advisory locks",
            PinReason::SqlPrepare => "SQL PREPARE",
            PinReason::CursorWithHold => "cursors WITH HOLD",
            PinReason::SetRole => "SET ROLE",
            PinReason::SessionAuthorization => "SET SESSION AUTHORIZATION",
            PinReason::Load => "LOAD",
            PinReason::SettingNotUtf8 => "a session setting whose value is not UTF-8",
            PinReason::Unclassified => "a statement pgshield cannot classify",
        }
    }
}

/// What a statement (or a string of them) does to the session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Settings it may change (lower-case names); `all_settings` if RESET ALL or similar.
    pub settings: Vec<String>,
    pub all_settings: bool,
    /// It drops every prepared statement (DISCARD ALL).
    pub drops_all_statements: bool,
    /// DEALLOCATE: `None` for ALL, or the name.
    pub deallocate: Option<Option<String>>,
    /// It keeps state on the backend that cannot follow the client.
    pub pin: Option<PinReason>,
    /// It runs LISTEN (whatever `pin` says first): notifications are the client's.
    pub listens: bool,
    /// It changes the schema under existing statements (ALTER, DROP, CREATE OR REPLACE,
    /// not of temporary objects): a prepared statement's result type may be another now.
    pub schema_change: bool,
    /// How many statements the text holds.
    pub statements: usize,
    /// It changes, for its transaction only, a setting statements are read under
    /// (`SET LOCAL TimeZone`, `set_config('TimeZone', …, true)`).
    pub local_parse_setting: bool,
    /// Of those, the client's encoding (`SET LOCAL client_encoding`).
    pub local_encoding: bool,
    /// Of those, what a backslash in a string means (`SET LOCAL
    /// standard_conforming_strings`).
    pub local_quotes: bool,
    /// It makes the login's own role the current one (SET ROLE NONE): nothing to pin,
    /// unless the client started as another role (`options=-c role=…`): a role no query
    /// can read back (`pg_settings` does not show it), so the session pins that client.
    pub to_login_role: bool,
    /// Of `settings`, some go back to their defaults (RESET, RESET ALL, DISCARD ALL, SET …
    /// TO DEFAULT): in PostgreSQL, to the values the client gave at startup.
    pub resets: bool,
    /// Those `settings` (all of them with `all_settings`).
    pub reset_settings: Vec<String>,
    /// The lists of names were rid of repeats (a text of many settings): how often a name
    /// was set or reset, and in which order, is not known from them.
    pub names_deduped: bool,
    /// (While the lexer reads a text: the role was last reset, not set, in it; `role`
    /// joins `reset_settings` at the end. A flag, not a name taken out of the list again
    /// at each `SET ROLE`, which on a list of thousands of names took time growing as the
    /// square of the text.)
    role_reset: bool,
    /// It resets, and also controls the transaction or copies (BEGIN, COMMIT, COPY, …):
    /// what runs right behind it may be inside a transaction or a COPY.
    pub control: bool,
    /// It runs one of pgshield's own prepared statements by name (`EXECUTE pgshield_7`):
    /// not the client's to run, hidden from it by [`hide_proxy_statements`].
    pub runs_proxy_statement: bool,
}

impl Effects {
    /// Nothing to note (however many statements).
    pub fn is_empty(&self) -> bool {
        self.settings.is_empty()
            && !self.all_settings
            && !self.drops_all_statements
            && self.deallocate.is_none()
            && self.pin.is_none()
            && !self.schema_change
            && !self.to_login_role
            && !self.local_parse_setting
            && !self.local_encoding
            && !self.local_quotes
            && !self.resets
            && !self.runs_proxy_statement
    }

    /// The first reason to pin is kept, but a LOAD wins: its backend must be closed, not
    /// reset, when its client leaves (what a library loads stays after DISCARD ALL).
    fn pin(&mut self, reason: PinReason) {
        if reason == PinReason::Load {
            self.pin = Some(reason);
        } else {
            self.pin.get_or_insert(reason);
        }
    }
}

/// A token of SQL text, borrowed from it (the lexer allocates only for the token list).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token<'a> {
    /// A keyword or unquoted identifier, as written (compare case-insensitively).
    Word(&'a str),
    /// A quoted identifier's name (case-sensitive).
    Quoted(Cow<'a, str>),
    /// A string constant's content.
    Str(Cow<'a, str>),
    Number,
    /// A positional parameter, `$n`.
    Param,
    Punct(char),
    Semicolon,
}

/// Texts of more tokens than this are not read (they pin): each token takes some 32
/// bytes, so a text of commas would take 32 times its own size.
const MAX_TOKENS: usize = 2 << 20;

/// Where what reads as nothing from `i` on ends in `b`: white space (with the vertical
/// tab, as PostgreSQL 18 reads it; older servers refuse the statement), a `--` comment (to
/// the end of the line: either kind, as in PostgreSQL's scanner), a `/* */` comment
/// (nested ones too); `i` itself if nothing there is; None if the text ends inside a
/// `/*` comment.
fn skip_blank(b: &[u8], mut i: usize) -> Option<usize> {
    while i < b.len() {
        match b[i] {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => i = line_end(b, i),
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0;
                loop {
                    if i + 1 >= b.len() {
                        return None;
                    }
                    if b[i] == b'/' && b[i + 1] == b'*' {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b[i + 1] == b'/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            _ => break,
        }
    }
    Some(i)
}

/// Where the line holding `b[i]` ends (a `--` comment's end: either kind of line end,
/// as in PostgreSQL's scanner), or the text's end.
fn line_end(b: &[u8], i: usize) -> usize {
    memchr::memchr2(b'\n', b'\r', &b[i..]).map_or(b.len(), |at| i + at)
}

/// Splits SQL into tokens. Returns None if the text ends inside a string, comment or
/// quote (PostgreSQL would reject it anyway; pgshield will not guess), or has more than
/// [`MAX_TOKENS`]. `backslashes`: a
/// backslash in a `'…'` string escapes, as with `standard_conforming_strings` off.
fn tokens(sql: &str, backslashes: bool) -> Option<Vec<Token<'_>>> {
    let b = sql.as_bytes();
    let mut out = Vec::with_capacity(16);
    let mut i = 0;
    while i < b.len() {
        if out.len() > MAX_TOKENS {
            return None;
        }
        match skip_blank(b, i) {
            Some(next) if next > i => {
                i = next;
                continue;
            }
            Some(_) => {}
            None => return None,
        }
        let c = b[i];
        match c {
            // A string or identifier with Unicode escapes (`U&'…'`, `U&"…"`, perhaps
            // with UESCAPE): not decoded here, so not read.
            b'u' | b'U'
                if b.get(i + 1) == Some(&b'&') && matches!(b.get(i + 2), Some(b'\'' | b'"')) =>
            {
                return None;
            }
            b'\'' => {
                let (s, end) = quoted(sql, i, b'\'', backslashes)?;
                out.push(Token::Str(s));
                i = end;
            }
            b'e' | b'E' if b.get(i + 1) == Some(&b'\'') => {
                let (s, end) = quoted(sql, i + 1, b'\'', true)?;
                out.push(Token::Str(s));
                i = end;
            }
            b'"' => {
                let (s, end) = quoted(sql, i, b'"', false)?;
                out.push(Token::Quoted(s));
                i = end;
            }
            b'$' => {
                // $tag$ ... $tag$ (a positional parameter $1 is a Param).
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&x| x == b'$')
                    .map(|p| i + 1 + p);
                // (As PostgreSQL's scanner: letters, digits, `_` and any byte beyond
                // ASCII; not a digit first.)
                let tag_ok = |end: usize| {
                    b[i + 1..end]
                        .iter()
                        .all(|x| x.is_ascii_alphanumeric() || *x == b'_' || *x >= 0x80)
                        && !b.get(i + 1).is_some_and(u8::is_ascii_digit)
                };
                match tag_end {
                    Some(end) if tag_ok(end) => {
                        let tag = &b[i..=end];
                        let body_start = end + 1;
                        let close = b[body_start..].windows(tag.len()).position(|w| w == tag)?;
                        out.push(Token::Str(Cow::Borrowed(
                            &sql[body_start..body_start + close],
                        )));
                        i = body_start + close + tag.len();
                    }
                    _ => {
                        i += 1;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                        out.push(Token::Param);
                    }
                }
            }
            b';' => {
                out.push(Token::Semicolon);
                i += 1;
            }
            c if c.is_ascii_digit() => {
                i = number_end(b, i);
                out.push(Token::Number);
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len()
                    && (b[i].is_ascii_alphanumeric()
                        || b[i] == b'_'
                        || b[i] == b'$'
                        || b[i] >= 0x80)
                {
                    i += 1;
                }
                out.push(Token::Word(&sql[start..i]));
                // A bit string, `B'…'` or `X'…'`: a backslash there is itself, even with
                // `standard_conforming_strings` off.
                if i == start + 1
                    && matches!(c, b'b' | b'B' | b'x' | b'X')
                    && b.get(i) == Some(&b'\'')
                {
                    let (s, end) = quoted(sql, i, b'\'', false)?;
                    out.push(Token::Str(s));
                    i = end;
                }
            }
            _ => {
                // Multi-byte punctuation is irrelevant here; step over one character.
                let ch = sql[i..].chars().next()?;
                out.push(Token::Punct(ch));
                i += ch.len_utf8();
            }
        }
    }
    Some(out)
}

/// Where a number starting at `b[i]` (a digit) ends: digits, `_` between them (16+), a
/// decimal point, an exponent, or `0x`/`0o`/`0b` and their digits (16+). What follows
/// is another token, as PostgreSQL 14 and older read it (`1INTO` is `1 INTO`; 15 and later
/// refuse it).
fn number_end(b: &[u8], mut i: usize) -> usize {
    let digits = |mut i: usize, ok: fn(&u8) -> bool| {
        while b.get(i).is_some_and(|c| ok(c) || *c == b'_') {
            i += 1;
        }
        i
    };
    if b[i] == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X' | b'o' | b'O' | b'b' | b'B')) {
        return digits(i + 2, u8::is_ascii_hexdigit);
    }
    i = digits(i, u8::is_ascii_digit);
    if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
        i = digits(i + 1, u8::is_ascii_digit);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
        if b.get(i + 1 + sign).is_some_and(u8::is_ascii_digit) {
            i = digits(i + 1 + sign, u8::is_ascii_digit);
        }
    }
    i
}

/// Reads a quoted run starting at `start` (the opening quote); doubled quotes stand for
/// one, and with `backslashes` a backslash escapes the next byte. A string (`'`) goes on
/// past its closing quote where [`continuation`] says, read the same way. Borrows when it
/// can.
fn quoted(sql: &str, start: usize, quote: u8, backslashes: bool) -> Option<(Cow<'_, str>, usize)> {
    let b = sql.as_bytes();
    let mut i = start + 1;
    let mut owned: Option<Vec<u8>> = None;
    loop {
        let c = *b.get(i)?;
        let escaped = if backslashes && c == b'\\' {
            let (value, width) = escape(b, i + 1)?;
            Some((value, width + 1))
        } else if c == quote && b.get(i + 1) == Some(&quote) {
            Some((Escaped::Byte(quote), 2))
        } else {
            None
        };
        if let Some((value, width)) = escaped {
            let bytes = owned.get_or_insert_with(|| b[start + 1..i].to_vec());
            match value {
                Escaped::Byte(byte) => bytes.push(byte),
                Escaped::Char(c) => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
            i += width;
        } else if c == quote {
            if let Some(next) = (quote == b'\'').then(|| continuation(b, i + 1)).flatten() {
                owned.get_or_insert_with(|| b[start + 1..i].to_vec());
                i = next + 1;
                continue;
            }
            let text = match owned {
                Some(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
                None => Cow::Borrowed(&sql[start + 1..i]),
            };
            return Some((text, i + 1));
        } else {
            if let Some(bytes) = owned.as_mut() {
                bytes.push(c);
            }
            i += 1;
        }
    }
}

/// Where a string closed right before `b[i]` goes on, as PostgreSQL's scanner reads
/// `'a'`, a newline, `'b'` as the one string `'ab'` (in the same kind: an `E'…'` string's
/// second part has escapes too): blanks and `--` comments holding at least one line end,
/// then a quote, whose index this is.
fn continuation(b: &[u8], mut i: usize) -> Option<usize> {
    let mut line_ended = false;
    loop {
        match *b.get(i)? {
            b' ' | b'\t' | 0x0b | 0x0c => i += 1,
            b'\n' | b'\r' => {
                line_ended = true;
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => i = line_end(b, i),
            b'\'' if line_ended => return Some(i),
            _ => return None,
        }
    }
}

/// What a backslash escape in an `E'…'` string stands for.
enum Escaped {
    Byte(u8),
    Char(char),
}

/// The escape whose backslash is right before `b[i]`, read as PostgreSQL reads it, and
/// how many bytes it takes from `i`: `\b \f \n \r \t`, octal `\o` to `\ooo`, hex `\xh`
/// and `\xhh`, `\uXXXX` and `\UXXXXXXXX`, and any other character as itself (`\\`, `\'`).
/// None for a `\u` or `\U` PostgreSQL would refuse, or a surrogate (a pair of them is
/// one character to PostgreSQL; pgshield does not guess).
fn escape(b: &[u8], i: usize) -> Option<(Escaped, usize)> {
    // The value of up to `max` digits of `radix` from `from`, and how many there were.
    let digits = |from: usize, max: usize, radix: u32| {
        let mut value = 0u32;
        let mut n = 0;
        while n < max {
            match b.get(from + n).and_then(|&d| char::from(d).to_digit(radix)) {
                Some(d) => value = value * radix + d,
                None => break,
            }
            n += 1;
        }
        (value, n)
    };
    let unicode = |len: usize| {
        let (value, n) = digits(i + 1, len, 16);
        let c = char::from_u32(value).filter(|_| n == len)?;
        Some((Escaped::Char(c), 1 + len))
    };
    let c = *b.get(i)?;
    Some(match c {
        b'b' => (Escaped::Byte(0x08), 1),
        b'f' => (Escaped::Byte(0x0c), 1),
        b'n' => (Escaped::Byte(b'\n'), 1),
        b'r' => (Escaped::Byte(b'\r'), 1),
        b't' => (Escaped::Byte(b'\t'), 1),
        b'0'..=b'7' => {
            let (value, n) = digits(i, 3, 8);
            (Escaped::Byte(value as u8), n)
        }
        b'x' => match digits(i + 1, 2, 16) {
            (value, n) if n > 0 => (Escaped::Byte(value as u8), 1 + n),
            _ => (Escaped::Byte(b'x'), 1),
        },
        b'u' => unicode(4)?,
        b'U' => unicode(8)?,
        other => (Escaped::Byte(other), 1),
    })
}

/// Functions whose call keeps session state (session-level advisory locks).
const ADVISORY_LOCKS: [&str; 4] = [
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Functions that run a query given as text (`query_to_xml('SELECT pg_advisory_lock(1)',
/// …)`): what it does is not read, so a call pins. (`ts_rewrite` runs one only in its
/// two-argument form; see [`calls_and_temporary_relations`].)
const QUERY_RUNNERS: [&str; 5] = [
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
];

/// First words of statements that control the transaction or copy (see `Effects::control`).
const CONTROL: &[&str] = &[
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "copy",
    "prepare",
];

/// First words of statements that change nothing beyond their transaction (what the
/// classifier looks at anywhere in a statement aside).
const PLAIN: &[&str] = &[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "with",
    "values",
    "table",
    "copy",
    "explain",
    "show",
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "lock",
    "truncate",
    "vacuum",
    "analyze",
    "analyse",
    "cluster",
    "reindex",
    "checkpoint",
    "notify",
    "unlisten",
    "grant",
    "revoke",
    "comment",
    "security",
    "alter",
    "drop",
    "refresh",
    "import",
    "fetch",
    "move",
    "close",
    "call",
    "execute",
    "create",
    "reassign",
];

/// First words of statements the classifier reads on from (`classify_statement`).
const LOOKED_AT: &[&str] = &[
    "do",
    "declare",
    "discard",
    "deallocate",
    "prepare",
    "set",
    "reset",
    "listen",
    "load",
];

/// Classifies a string of SQL statements, in the client's encoding. Text that is not UTF-8
/// (`client_encoding` LATIN1, SJIS, …) is lexed with each byte sequence UTF-8 lacks as
/// one character: every byte below 0x80 (the quotes, semicolons and keywords the lexer
/// reads) stays where it was.
pub fn classify(sql: &(impl AsRef<[u8]> + ?Sized)) -> Effects {
    classify_with(sql.as_ref(), false)
}

/// [`classify`], with backslashes in `'…'` strings read as escapes if `backslashes`.
fn classify_with(sql: &[u8], backslashes: bool) -> Effects {
    // (The byte screen leaves any text with a backslash to the lexer.)
    match plain(sql) {
        Some(effects) => effects,
        None => lex(sql, backslashes),
    }
}

/// Classifies with the lexer alone, text in the client's encoding (see [`classify`]).
fn lex(sql: &[u8], backslashes: bool) -> Effects {
    classify_tokens(&String::from_utf8_lossy(sql), backslashes)
}

/// As [`classify`], for text read under the client's parse environment `env`
/// ([`crate::server::ClientView::parse_env`]):
/// - its encoding may have characters whose later bytes are ASCII
///   ([`crate::server::ASCII_TRAILS`]): text with a byte beyond ASCII cannot be read by its
///   ASCII bytes, a statement pgshield cannot classify (it pins);
/// - with `standard_conforming_strings` off ([`crate::server::BACKSLASH_QUOTES`]) a
///   backslash in a `'…'` string escapes the next character, as in `E'…'`;
/// - when that setting may have changed unseen ([`crate::server::QUOTES_UNSURE`]), text
///   that reads otherwise either way pins.
pub fn classify_in(sql: &[u8], env: u64) -> Effects {
    classify_in_by(sql, env, classify_with)
}

/// [`classify_in`], reading the text by `classify` ([`classify_with`], or the lexer
/// alone for text the byte screen declined already).
fn classify_in_by(sql: &[u8], env: u64, classify: fn(&[u8], bool) -> Effects) -> Effects {
    use crate::server::{ASCII_TRAILS, BACKSLASH_QUOTES, QUOTES_UNSURE};
    let backslashes = env & BACKSLASH_QUOTES != 0;
    let mut effects = classify(sql, backslashes);
    if env & QUOTES_UNSURE != 0
        && memchr::memchr(b'\\', sql).is_some()
        && classify(sql, !backslashes) != effects
    {
        effects.pin(PinReason::Unclassified);
    }
    if env & ASCII_TRAILS != 0 && !sql.is_ascii() {
        // (What the bytes showed is kept, as a best guess for what else to follow; nothing
        // may go right behind a reset they showed.)
        effects.pin = Some(PinReason::Unclassified);
        effects.control = effects.resets;
    }
    effects
}

/// Whether [`classify_in`] finds that `sql` changes nothing ([`Effects::is_empty`]): the
/// question a simple Query on the short path asks, answered by the byte screen alone
/// when it can, without building the classifier's [`Effects`].
pub fn changes_nothing_in(sql: &[u8], env: u64) -> bool {
    use crate::server::ASCII_TRAILS;
    // (The screen declines text with a backslash, the one thing `BACKSLASH_QUOTES` and
    // `QUOTES_UNSURE` bear on; text an `ASCII_TRAILS` encoding cannot be read by pins.)
    if env & ASCII_TRAILS != 0 && !sql.is_ascii() {
        return false;
    }
    match plain_schema_change(sql) {
        Some(schema_change) => !schema_change,
        // (Declined: the lexer reads it, without a second look by the screen.)
        None => classify_in_by(sql, env, lex).is_empty(),
    }
}

/// Whether `rest` starts, in any case, with `temp`, `pg_temp`, `pg_advisory`,
/// `pg_try_advisory`, `set_config`, `setseed`, `pg_settings` or the name of one of
/// [`QUERY_RUNNERS`] (see [`plain`]). Its first four bytes as
/// one number, with bit 5 of each set (lower case for letters; `_` becomes 0x7F, as in
/// the keys), rule out nearly every word at once; the rest are spelled out.
fn looked_for_word(rest: &[u8]) -> bool {
    const fn key(w: &[u8]) -> u32 {
        u32::from_le_bytes([w[0], w[1], w[2], w[3]]) | 0x2020_2020
    }
    let Some(&[a, b, c, d]) = rest.get(..4) else {
        return false;
    };
    let words: &[&[u8]] = match u32::from_le_bytes([a, b, c, d]) | 0x2020_2020 {
        k if k == key(b"temp") => &[b"temp"],
        k if k == key(b"pg_t") => &[b"pg_temp", b"pg_try_advisory"],
        k if k == key(b"pg_a") => &[b"pg_advisory"],
        k if k == key(b"set_") => &[b"set_config"],
        k if k == key(b"sets") => &[b"setseed"],
        k if k == key(b"pgsh") => &[crate::prepared::NAME_PREFIX.as_bytes()],
        k if k == key(b"pg_s") => &[b"pg_settings"],
        k if k == key(b"quer") => &[b"query_to_xml"],
        k if k == key(b"ts_s") => &[b"ts_stat"],
        k if k == key(b"ts_r") => &[b"ts_rewrite"],
        _ => return false,
    };
    words.iter().any(|w| {
        rest.get(..w.len())
            .is_some_and(|r| r.eq_ignore_ascii_case(w))
    })
}

/// One of `PLAIN`, in any case.
fn is_plain_first_word(word: &[u8]) -> bool {
    // Each word as one number: its bytes, zero-padded (no word holds a zero byte).
    const fn key(word: &[u8]) -> u128 {
        let mut bytes = [0u8; 16];
        let mut i = 0;
        while i < word.len() {
            bytes[i] = word[i];
            i += 1;
        }
        u128::from_le_bytes(bytes)
    }
    static KEYS: [u128; PLAIN.len()] = {
        let mut keys = [0; PLAIN.len()];
        let mut i = 0;
        while i < PLAIN.len() {
            keys[i] = key(PLAIN[i].as_bytes());
            i += 1;
        }
        keys
    };
    if word.len() > 16 {
        return false;
    }
    let mut lower = [0u8; 16];
    for (l, c) in lower.iter_mut().zip(word) {
        *l = c.to_ascii_lowercase();
    }
    KEYS.contains(&u128::from_le_bytes(lower))
}

/// Byte classes for `plain`: letters (as the lexer starts words with), of which those that
/// start a word `plain` looks for (`HEAD`, a letter too), bytes that need a look, and the
/// rest (0).
const LETTER: u8 = 1;
const LOOK: u8 = 2;
const HEAD: u8 = 4 | LETTER;
static CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        table[i] = if matches!(c.to_ascii_lowercase(), b't' | b'p' | b's' | b'q') {
            HEAD
        } else if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
            LETTER
        } else if matches!(c, b'\'' | b'"' | b'\\' | b'$' | b'-' | b'/' | b';' | b'&') {
            LOOK
        } else {
            0
        };
        i += 1;
    }
    table
};

/// The common case without tokens: one statement that the classifier would find changes
/// nothing. None whenever that is not certain from a single pass over the bytes (then the
/// lexer decides): a comment, a dollar quote, a backslash, both kinds of quote, an odd
/// number of either (unterminated), a semicolon before the end, a word (even inside a
/// string) starting `temp`, `pg_temp`, `pg_advisory`, `pg_try_advisory`, `set_config`,
/// `setseed`, `pg_settings` or a [`QUERY_RUNNERS`] name, `U&` before a quote, or a first word that needs a look.
fn plain(b: &[u8]) -> Option<Effects> {
    plain_schema_change(b).map(|schema_change| Effects {
        statements: 1,
        schema_change,
        ..Effects::default()
    })
}

/// [`plain`]'s answer without its [`Effects`]: whether the one statement changes the
/// schema (the only thing a plain statement can note), or None for the lexer to decide.
fn plain_schema_change(b: &[u8]) -> Option<bool> {
    let space = |c: u8| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let letter = |c: u8| CLASS[usize::from(c)] & LETTER != 0;
    let (mut single, mut double) = (0usize, 0usize);
    // (One pass that stops only at the bytes that need a look and at letters that may
    // start a looked-for word: this runs on every simple Query.)
    let mut i = 0;
    while let Some(skip) = b[i..].iter().position(|&c| CLASS[usize::from(c)] > LETTER) {
        i += skip;
        let c = b[i];
        if CLASS[usize::from(c)] == LOOK {
            let next = b.get(i + 1);
            match c {
                b'\'' => single += 1,
                b'"' => double += 1,
                b'$' if next.is_some_and(u8::is_ascii_digit) => {}
                b'-' if next != Some(&b'-') => {}
                b'/' if next != Some(&b'*') => {}
                // (Not `U&'…'` or `U&"…"`: Unicode escapes, for the lexer to refuse.)
                b'&' if !matches!(next, Some(b'\'' | b'"')) => {}
                b';' if b[i + 1..].iter().all(|&c| space(c)) => {}
                _ => return None,
            }
        } else if !(i > 0 && letter(b[i - 1])) && looked_for_word(&b[i..]) {
            // A word of the lexer's starts only at the head of a run of letters (digits
            // and `$` end a run: after `$1` the lexer starts a new word).
            return None;
        }
        i += 1;
    }
    if (single > 0 && double > 0) || single % 2 == 1 || double % 2 == 1 {
        return None;
    }
    let start = b.iter().position(|&c| !space(c) && c != b'(')?;
    let first = &b[start..];
    if !letter(first[0]) {
        return None;
    }
    let word_char = |c: u8| letter(c) || c.is_ascii_digit() || c == b'$';
    let len = first
        .iter()
        .position(|&c| !word_char(c))
        .unwrap_or(first.len());
    if !is_plain_first_word(&first[..len]) {
        return None;
    }
    Some(changes_schema(&first[..len], || {
        let rest = &first[len..];
        let at = rest.iter().position(|&c| !space(c)).unwrap_or(rest.len());
        let rest = &rest[at..];
        let end = rest
            .iter()
            .position(|&c| !word_char(c))
            .unwrap_or(rest.len());
        rest[..end].eq_ignore_ascii_case(b"or")
    }))
}

/// Whether PostgreSQL runs the statement inside a failed transaction, as it runs only
/// what ends one (`IsTransactionExitStmt`: COMMIT, END, ROLLBACK, ABORT, ROLLBACK TO
/// SAVEPOINT, PREPARE TRANSACTION); it refuses anything else there with 25P02.
pub fn ends_transaction(sql: &(impl AsRef<[u8]> + ?Sized)) -> bool {
    let sql = String::from_utf8_lossy(sql.as_ref());
    let Some(tokens) = tokens(&sql, false) else {
        return false;
    };
    let mut words = tokens.iter().filter(|t| **t != Token::Punct('('));
    let (first, second) = (words.next(), words.next());
    match word(first).map(str::to_ascii_lowercase).as_deref() {
        Some("commit" | "end" | "rollback" | "abort") => !is(second, "prepared"),
        Some("prepare") => is(second, "transaction"),
        _ => false,
    }
}

/// Whether a statement's result columns are its query's own, so that PostgreSQL fails a
/// prepared one whose columns changed: a query or a DML statement (possibly with
/// RETURNING), not FETCH (its cursor's columns), EXPLAIN or SHOW. Unsure means no.
pub fn fixed_result(sql: &(impl AsRef<[u8]> + ?Sized)) -> bool {
    let sql = String::from_utf8_lossy(sql.as_ref());
    // (The lexer: past comments, which sqlc starts every query with.)
    let Some(tokens) = tokens(&sql, false) else {
        return false;
    };
    let first = tokens.iter().find(|t| **t != Token::Punct('('));
    word(first).is_some_and(|first| {
        [
            "select", "with", "values", "table", "insert", "update", "delete", "merge",
        ]
        .iter()
        .any(|w| first.eq_ignore_ascii_case(w))
    })
}

/// Whether a statement starting with `first` changes the schema under existing
/// statements; `or_follows` tells whether `OR` is the next word (CREATE OR REPLACE).
fn changes_schema(first: &[u8], or_follows: impl FnOnce() -> bool) -> bool {
    first.eq_ignore_ascii_case(b"alter")
        || first.eq_ignore_ascii_case(b"drop")
        || (first.eq_ignore_ascii_case(b"create") && or_follows())
}

/// Classifies with the lexer: whatever `plain` is not sure of.
fn classify_tokens(sql: &str, backslashes: bool) -> Effects {
    let mut effects = Effects::default();
    let Some(tokens) = tokens(sql, backslashes) else {
        effects.pin(PinReason::Unclassified);
        return effects;
    };
    // (Lists of names kept short: a statement may scan the names before it, and a text
    // of thousands of statements would take time growing as its square.)
    let mut dedup_at = 64;
    for statement in tokens.split(|t| *t == Token::Semicolon) {
        if !statement.is_empty() {
            effects.statements += 1;
            classify_statement(statement, &mut effects, backslashes);
            if effects.settings.len().max(effects.reset_settings.len()) > dedup_at {
                effects.names_deduped = true;
                dedup_names(&mut effects.settings);
                dedup_names(&mut effects.reset_settings);
                dedup_at = 2 * effects
                    .settings
                    .len()
                    .max(effects.reset_settings.len())
                    .max(32);
            }
        }
    }
    if std::mem::take(&mut effects.role_reset) {
        effects.reset_settings.push("role".into());
    }
    // (Only of use with a reset; the byte screen, which sees none, never says it.)
    effects.control &= effects.resets;
    effects.runs_proxy_statement = proxy_statements_run(&tokens).next().is_some();
    effects
}

/// Drops names met before, keeping the order of their first appearance.
pub(crate) fn dedup_names(names: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::with_capacity(names.len());
    names.retain(|name| seen.insert(name.clone()));
}

/// The names of pgshield's own prepared statements (`pgshield_` and a number) that `t`
/// runs, as written (a quoted one's inside its quotes): the word after an `EXECUTE` that
/// starts a statement or follows `EXPLAIN` and its options or an `AS` (`EXECUTE
/// pgshield_7`, `EXPLAIN (ANALYZE) EXECUTE "pgshield_7"(1)`, `CREATE TABLE … AS EXECUTE
/// …`), not a column named `execute` with an alias. PL/pgSQL's dynamic `EXECUTE` takes a
/// string, never a word of these.
fn proxy_statements_run<'a, 'b>(t: &'b [Token<'a>]) -> impl Iterator<Item = &'a str> + 'b {
    use crate::prepared::NAME_PREFIX;
    statements_run(t).filter_map(|(name, folded)| {
        let prefix = name.get(..NAME_PREFIX.len())?;
        let ours = if folded {
            prefix.eq_ignore_ascii_case(NAME_PREFIX)
        } else {
            prefix == NAME_PREFIX
        };
        let number = &name[NAME_PREFIX.len()..];
        let numbered = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
        (ours && numbered).then_some(name)
    })
}

/// The names of the prepared statements `t` runs (see [`proxy_statements_run`]), as
/// written, and whether unquoted (folded to lower case by the server). A quoted name
/// with a doubled quote in it is left out.
fn statements_run<'a, 'b>(t: &'b [Token<'a>]) -> impl Iterator<Item = (&'a str, bool)> + 'b {
    const BEFORE: &[&str] = &["explain", "analyze", "analyse", "verbose", "as"];
    t.windows(2).enumerate().filter_map(move |(at, pair)| {
        let before = at.checked_sub(1).map(|b| &t[b]);
        let starts = match before {
            None | Some(Token::Semicolon | Token::Punct(')')) => true,
            Some(tok) => BEFORE.iter().any(|w| is(Some(tok), w)),
        };
        if !starts || !is(pair.first(), "execute") {
            return None;
        }
        match &pair[1] {
            Token::Word(name) => Some((*name, true)),
            Token::Quoted(Cow::Borrowed(name)) => Some((*name, false)),
            _ => None,
        }
    })
}

/// The prepared statement one statement's tokens run, by name, and whether unquoted:
/// `EXECUTE name …`, or that after `EXPLAIN` and its options. Stricter than
/// [`statements_run`] (no `CREATE TABLE … AS EXECUTE`), as what it finds is rewritten:
/// a column named `execute` (`SELECT count(*) execute FROM t`) is never taken for one.
fn statement_runs<'a>(t: &[Token<'a>]) -> Option<(&'a str, bool)> {
    let mut i = 0;
    if is(t.first(), "explain") {
        i = 1;
        if t.get(1) == Some(&Token::Punct('(')) {
            let mut depth = 0;
            let close = t[1..].iter().position(|tok| {
                match tok {
                    Token::Punct('(') => depth += 1,
                    Token::Punct(')') => depth -= 1,
                    _ => {}
                }
                depth == 0
            })?;
            i = close + 2;
        } else {
            while ["analyze", "analyse", "verbose"]
                .iter()
                .any(|w| is(t.get(i), w))
            {
                i += 1;
            }
        }
    }
    if !is(t.get(i), "execute") {
        return None;
    }
    match t.get(i + 1) {
        Some(Token::Word(name)) => Some((name, true)),
        Some(Token::Quoted(Cow::Borrowed(name))) => Some((name, false)),
        _ => None,
    }
}

/// Where `sql` (UTF-8 text read under the parse environment `env`) runs prepared
/// statements by name, as [`statement_runs`] finds them: each name's byte range in
/// `sql` (inside its quotes, for a quoted one) and the name the server looks up (an
/// unquoted one folded to lower case). Nothing when the lexer cannot be sure of reading
/// the text as the server does (see [`hide_proxy_statements`]), or it is not UTF-8.
pub fn executed_names(sql: &[u8], env: u64) -> Vec<(std::ops::Range<usize>, String)> {
    use crate::server::{ASCII_TRAILS, BACKSLASH_QUOTES, QUOTES_UNSURE};
    let unsure_quotes = env & QUOTES_UNSURE != 0 && memchr::memchr(b'\\', sql).is_some();
    if unsure_quotes || (env & ASCII_TRAILS != 0 && !sql.is_ascii()) {
        return Vec::new();
    }
    let Ok(text) = std::str::from_utf8(sql) else {
        return Vec::new();
    };
    let Some(t) = tokens(text, env & BACKSLASH_QUOTES != 0) else {
        return Vec::new();
    };
    let base = text.as_ptr() as usize;
    t.split(|tok| *tok == Token::Semicolon)
        .filter_map(statement_runs)
        .map(|(name, folded)| {
            let at = name.as_ptr() as usize - base;
            let looked_up = if folded {
                name.to_ascii_lowercase()
            } else {
                name.to_owned()
            };
            (at..at + name.len(), looked_up)
        })
        .collect()
}

/// Makes `sql` (text read under the parse environment `env`, see [`classify_in`]) run
/// none of pgshield's own prepared statements: the `_` of each such name it runs
/// ([`Effects::runs_proxy_statement`]) becomes a `$`, a name no statement has, so that
/// the server answers `26000` (it does not exist) as PostgreSQL answers a client that
/// prepared no such statement, in the same place among its statements. Same length: the
/// message is changed where it lies.
///
/// Text the classifier cannot be sure of reading as the server does is left as it is
/// (the client is pinned then, see [`classify_in`]): a backslash while
/// `standard_conforming_strings` may have changed unseen, or bytes beyond ASCII in an
/// encoding whose characters may end in ASCII bytes.
pub fn hide_proxy_statements(sql: &mut [u8], env: u64, keep: &[&str]) {
    use crate::server::{ASCII_TRAILS, BACKSLASH_QUOTES, QUOTES_UNSURE};
    let unsure_quotes = env & QUOTES_UNSURE != 0 && memchr::memchr(b'\\', sql).is_some();
    if unsure_quotes || (env & ASCII_TRAILS != 0 && !sql.is_ascii()) {
        return;
    }
    let backslashes = env & BACKSLASH_QUOTES != 0;
    let underscores: Vec<usize> = {
        let text = String::from_utf8_lossy(sql);
        let Some(t) = tokens(&text, backslashes) else {
            return;
        };
        // Where each name's `_` is in `text` (in order), then in `sql`.
        let base = text.as_ptr() as usize;
        let in_text = proxy_statements_run(&t)
            .filter(|name| !keep.contains(name))
            .map(|name| name.as_ptr() as usize - base + crate::prepared::NAME_PREFIX.len() - 1);
        if matches!(text, Cow::Borrowed(_)) {
            in_text.collect()
        } else {
            // Text not UTF-8 was read with each byte sequence UTF-8 lacks as one
            // character, every ASCII byte kept in its order, so the n-th ASCII byte of one
            // is the n-th of the other: both walked once, side by side.
            let (mut text_at, mut nth) = (0, 0);
            let (mut sql_at, mut sql_nth) = (0, 0);
            let mut found = Vec::new();
            for at in in_text {
                nth += text.as_bytes()[text_at..at]
                    .iter()
                    .filter(|b| b.is_ascii())
                    .count();
                text_at = at;
                while sql_at < sql.len() {
                    if sql[sql_at].is_ascii() {
                        if sql_nth == nth {
                            found.push(sql_at);
                            break;
                        }
                        sql_nth += 1;
                    }
                    sql_at += 1;
                }
            }
            found
        }
    };
    for at in underscores {
        if sql[at] == b'_' {
            sql[at] = b'$';
        }
    }
}

/// The token as an unquoted word, as written.
fn word<'a>(t: Option<&Token<'a>>) -> Option<&'a str> {
    match t {
        Some(Token::Word(w)) => Some(w),
        _ => None,
    }
}

/// The token is the unquoted word `keyword` (case-insensitively).
fn is(t: Option<&Token<'_>>, keyword: &str) -> bool {
    word(t).is_some_and(|w| w.eq_ignore_ascii_case(keyword))
}

/// A name a function call or relation may go by: an unquoted word (any case) or a quoted
/// identifier (exactly), compared with a lower-case `name`.
fn names(t: &Token<'_>, name: &str) -> bool {
    match t {
        Token::Word(w) => w.eq_ignore_ascii_case(name),
        Token::Quoted(q) => q == name,
        _ => false,
    }
}

fn classify_statement(t: &[Token<'_>], e: &mut Effects, backslashes: bool) {
    let temporary = calls_and_temporary_relations(t, e);
    let Some(first_at) = t.iter().position(|x| *x != Token::Punct('(')) else {
        return;
    };
    let Some(first) = word(t.get(first_at)) else {
        e.pin(PinReason::Unclassified);
        return;
    };
    let Some(first) = PLAIN
        .iter()
        .chain(LOOKED_AT)
        .copied()
        .find(|p| p.eq_ignore_ascii_case(first))
    else {
        e.pin(PinReason::Unclassified);
        return;
    };
    let t = &t[first_at..];
    e.schema_change |= !temporary && changes_schema(first.as_bytes(), || is(t.get(1), "or"));
    e.control |= CONTROL.contains(&first);
    match first {
        "do" => do_block(&t[1..], e, backslashes),
        "set" => set_statement(&t[1..], e),
        "reset" => {
            e.resets = true;
            let before = e.settings.len();
            if dotted(&t[1..]) {
                // (`RESET session.x`: a custom setting, whatever its first word.)
                setting_name(&t[1..], e);
            } else if is(t.get(1), "all") {
                e.all_settings = true;
            } else if is(t.get(1), "role") || is(t.get(1), "session") {
                back(e, Back::Reset);
            } else if is(t.get(1), "time") && is(t.get(2), "zone") {
                session_setting("timezone".into(), e);
            } else if is(t.get(1), "transaction") {
                // RESET TRANSACTION ISOLATION LEVEL: of this transaction only.
            } else {
                setting_name(&t[1..], e);
            }
            resets_since(e, before);
        }
        "listen" => {
            e.listens = true;
            e.pin(PinReason::Listen);
        }
        "load" => e.pin(PinReason::Load),
        "prepare" if !is(t.get(1), "transaction") => e.pin(PinReason::SqlPrepare),
        "declare"
            if t.windows(2)
                .any(|w| is(w.first(), "with") && is(w.get(1), "hold")) =>
        {
            e.pin(PinReason::CursorWithHold)
        }
        "discard" => {
            if is(t.get(1), "all") {
                e.all_settings = true;
                e.drops_all_statements = true;
                e.resets = true;
                // (RESET ALL leaves the role; DISCARD ALL resets it too.)
                e.role_reset = true;
            } else if !["plans", "sequences", "temp", "temporary"]
                .iter()
                .any(|k| is(t.get(1), k))
            {
                e.pin(PinReason::Unclassified);
            }
        }
        "deallocate" => {
            let rest = if is(t.get(1), "prepare") {
                &t[2..]
            } else {
                &t[1..]
            };
            let name = match rest.first() {
                Some(tok) if is(Some(tok), "all") => None,
                Some(Token::Word(name)) => Some(name.to_ascii_lowercase()),
                Some(Token::Quoted(name)) => Some(name.to_string()),
                _ => {
                    e.pin(PinReason::Unclassified);
                    return;
                }
            };
            // ALL, or one of pgshield's own names.
            let ours = |n: &Option<String>| {
                n.as_ref()
                    .is_none_or(|n| n.starts_with(crate::prepared::NAME_PREFIX))
            };
            e.deallocate = Some(match e.deallocate.take() {
                // A DEALLOCATE ALL, or of one of pgshield's names, earlier in the same Query
                // stands: a later one of the client's does not hide it. A second of
                // pgshield's names counts as ALL: which of the backend's statements are
                // gone is not kept track of then, so all are taken for gone, and the
                // client's names with them, which it may find gone (26000) where
                // PostgreSQL keeps them, but never run as something else.
                Some(earlier) if ours(&earlier) => {
                    if ours(&name) {
                        None
                    } else {
                        earlier
                    }
                }
                _ => name,
            });
        }
        _ => {}
    }
}

/// What a statement does anywhere in it (a WITH, an EXPLAIN ANALYZE, a subquery, a
/// PL/pgSQL expression): function calls that keep session state, and temporary
/// relations; true if it names a temporary relation. A temporary table created ON COMMIT
/// DROP ends with its transaction, which holds the backend anyway: no pin (the
/// COPY-then-merge upsert pattern).
fn calls_and_temporary_relations(t: &[Token<'_>], e: &mut Effects) -> bool {
    let mut temporary = false;
    let mut calls_read = 0;
    let ends_with_transaction = t
        .windows(3)
        .any(|w| is(w.first(), "on") && is(w.get(1), "commit") && is(w.get(2), "drop"))
        && is(t.iter().find(|x| **x != Token::Punct('(')), "create");
    let mut temp = |e: &mut Effects| {
        temporary = true;
        if !ends_with_transaction {
            e.pin(PinReason::TempTable);
        }
    };
    for (i, tok) in t.iter().enumerate() {
        if names(tok, "pg_temp")
            || matches!(tok, Token::Word(w) if w.len() > 8 && w.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("pg_temp_")))
        {
            temp(e);
        }
        if matches!(tok, Token::Word(w) if w.eq_ignore_ascii_case("temp") || w.eq_ignore_ascii_case("temporary"))
            && i > 0
            && ["create", "into", "global", "local", "replace"]
                .iter()
                .any(|k| is(t.get(i - 1), k))
        {
            temp(e);
        }
        if t.get(i + 1) != Some(&Token::Punct('(')) {
            continue;
        }
        if ADVISORY_LOCKS.iter().any(|f| names(tok, f)) {
            e.pin(PinReason::AdvisoryLock);
        }
        if names(tok, "set_config") {
            // (Each call's arguments are read to their end: a text of thousands of calls
            // nested would take time growing as its square.)
            calls_read += 1;
            if calls_read > MAX_SET_CONFIG_CALLS {
                e.pin(PinReason::Unclassified);
            } else {
                set_config_call(&t[i + 2..], e);
            }
        }
        if names(tok, "setseed") {
            // (The backend's random generator, as `SET seed`.)
            e.pin(PinReason::Unclassified);
        }
        if QUERY_RUNNERS.iter().any(|f| names(tok, f)) {
            // A query not read; but `ts_rewrite(query, target, substitute)`, of three
            // tsquery arguments, runs none. (Each call's arguments are read to their end,
            // so few calls are: see `calls_read`.)
            calls_read += 1;
            let three = names(tok, "ts_rewrite")
                && calls_read <= MAX_SET_CONFIG_CALLS
                && argument_count(&t[i + 2..]) == Some(3);
            if !three {
                e.pin(PinReason::Unclassified);
            }
        }
    }
    // `UPDATE pg_settings SET setting = …`: PostgreSQL's rule on the view runs
    // set_config(name, setting, false) for each row.
    if updates_pg_settings(t) {
        e.pin(PinReason::Unclassified);
    }
    // A search path that puts the temporary schema first, written as a string (`SET
    // search_path TO 'pg_temp', public`; the unquoted name is seen above): an unqualified
    // CREATE TABLE then makes a temporary table.
    if sets_search_path(t) && t.iter().any(names_temp_schema) {
        temp(e);
    }
    temporary
}

/// `UPDATE [ONLY] [pg_catalog.]pg_settings` anywhere in a statement (a WITH clause's
/// too).
fn updates_pg_settings(t: &[Token<'_>]) -> bool {
    t.iter().enumerate().any(|(i, tok)| {
        if !names(tok, "update") {
            return false;
        }
        let mut rest = &t[i + 1..];
        if rest.first().is_some_and(|x| names(x, "only")) {
            rest = &rest[1..];
        }
        if let [schema, Token::Punct('.'), ..] = rest {
            if names(schema, "pg_catalog") {
                rest = &rest[2..];
            }
        }
        rest.first().is_some_and(|x| names(x, "pg_settings"))
    })
}

/// `SET [LOCAL | SESSION] search_path …` or `SET SCHEMA …`.
fn sets_search_path(t: &[Token<'_>]) -> bool {
    let mut words = t.iter().filter(|x| **x != Token::Punct('('));
    if !is(words.next(), "set") {
        return false;
    }
    let mut name = words.next();
    if is(name, "local") || is(name, "session") {
        name = words.next();
    }
    name.is_some_and(|n| names(n, "search_path") || names(n, "schema"))
}

/// A string that names the temporary schema among others (`'pg_temp, public'`).
fn names_temp_schema(tok: &Token<'_>) -> bool {
    matches!(tok, Token::Str(s) if s.split(',').any(names_the_temp_schema))
}

/// Whether a `search_path` value (`pg_temp, public`) puts the temporary schema first:
/// an unqualified `CREATE TABLE` then makes a temporary table, kept by the backend,
/// unseen. PostgreSQL creates in the first schema of the path that exists: `"$user"`
/// may not, so the temporary schema behind it counts too; behind any other schema (the
/// hardened `public, pg_temp`) it does not. (Told of a value read back from the server,
/// or given at startup; a SET naming pg_temp anywhere pins, see
/// [`calls_and_temporary_relations`].)
pub fn path_puts_temp_schema_first(path: &str) -> bool {
    path.split(',')
        .map(str::trim)
        .find(|part| !part.eq_ignore_ascii_case("\"$user\"") && !part.eq_ignore_ascii_case("$user"))
        .is_some_and(names_the_temp_schema)
}

/// Whether one schema name of a path (perhaps quoted) is the temporary schema.
fn names_the_temp_schema(part: &str) -> bool {
    let part = part.trim().trim_matches('"');
    part.eq_ignore_ascii_case("pg_temp")
        || part
            .get(..8)
            .is_some_and(|p| p.eq_ignore_ascii_case("pg_temp_"))
}

/// `DO [LANGUAGE plpgsql] 'code'` (the language before or after the code): the block's
/// statements are classified as each would be on its own, as far as PL/pgSQL can be read
/// without a parser (see [`plpgsql`]). Another language, or what pgshield follows only as
/// a statement of its own (a reset, a DEALLOCATE, DISCARD, going back to the login role),
/// pins. (asyncpg's pool resets every connection it takes back with a DO block that runs
/// `UNLISTEN *` if the session listens.)
fn do_block(t: &[Token<'_>], e: &mut Effects, backslashes: bool) {
    let mut code = None;
    let mut rest = t;
    while let Some(tok) = rest.first() {
        match (tok, rest.get(1)) {
            (Token::Str(body), _) if code.is_none() => {
                code = Some(body);
                rest = &rest[1..];
            }
            (Token::Word(w), Some(language)) if w.eq_ignore_ascii_case("language") => {
                let plpgsql = match language {
                    Token::Word(l) => l.eq_ignore_ascii_case("plpgsql"),
                    Token::Str(l) | Token::Quoted(l) => *l == "plpgsql",
                    _ => false,
                };
                if !plpgsql {
                    return e.pin(PinReason::Unclassified);
                }
                rest = &rest[2..];
            }
            _ => return e.pin(PinReason::Unclassified),
        }
    }
    let Some(body) = code.and_then(|code| tokens(code, backslashes)) else {
        return e.pin(PinReason::Unclassified);
    };
    let mut inner = Effects::default();
    plpgsql(&body, &mut inner, backslashes);
    if inner.resets
        || inner.all_settings
        || inner.drops_all_statements
        || inner.deallocate.is_some()
        || inner.to_login_role
    {
        return e.pin(PinReason::Unclassified);
    }
    if let Some(reason) = inner.pin {
        e.pin(reason);
    }
    e.listens |= inner.listens;
    e.settings.extend(inner.settings);
    e.schema_change |= inner.schema_change;
    e.local_parse_setting |= inner.local_parse_setting;
    e.local_encoding |= inner.local_encoding;
    e.local_quotes |= inner.local_quotes;
}

/// PL/pgSQL statements that run no SQL of their own but the expressions in them (read
/// for calls only).
const PLPGSQL_STATEMENTS: &[&str] = &[
    "perform", "raise", "return", "exit", "continue", "null", "get", "assert", "open",
];

/// A PL/pgSQL block's statements (`t`: its tokens), each stripped of the words of the
/// block structure before it: `<<label>>`, DECLARE, BEGIN, EXCEPTION, ELSE, LOOP,
/// IF/ELSIF/WHEN/CASE … THEN, WHILE/FOR/FOREACH … LOOP, END …. What those words enclose
/// (conditions, a FOR's query), declarations, assignments and PL/pgSQL's own statements
/// are read for calls and temporary relations; every other statement is SQL, classified
/// as it would be on its own. Dynamic SQL (`EXECUTE`) cannot be read: it pins.
fn plpgsql(t: &[Token<'_>], e: &mut Effects, backslashes: bool) {
    if t.iter().any(|tok| is(Some(tok), "execute")) {
        return e.pin(PinReason::Unclassified);
    }
    let keyword = |s: &[Token<'_>], words: &[&str]| {
        word(s.first()).is_some_and(|w| words.iter().any(|k| w.eq_ignore_ascii_case(k)))
    };
    // Where the first `word` outside parentheses and brackets is in `s` (as PL/pgSQL
    // ends a condition or a loop's header), if it is there.
    let find = |s: &[Token<'_>], word: &str| {
        let mut depth = 0usize;
        for (at, tok) in s.iter().enumerate() {
            match tok {
                Token::Punct('(' | '[') => depth += 1,
                Token::Punct(')' | ']') => depth = depth.checked_sub(1)?,
                tok if depth == 0 && is(Some(tok), word) => return Some(at),
                _ => {}
            }
        }
        None
    };
    let past = |s: &[Token<'_>], word: &str| find(s, word).map(|at| at + 1);
    let mut declaring = false;
    for statement in t.split(|tok| *tok == Token::Semicolon) {
        let mut s = statement;
        loop {
            let skip = if let [Token::Punct('<'), Token::Punct('<'), Token::Word(_), Token::Punct('>'), Token::Punct('>'), ..] =
                s
            {
                Some(5)
            } else if keyword(s, &["declare"]) {
                declaring = true;
                Some(1)
            } else if keyword(s, &["begin"]) {
                declaring = false;
                Some(1)
            } else if keyword(s, &["exception", "else", "loop"]) {
                Some(1)
            } else if keyword(s, &["if", "elsif", "elseif", "when"]) {
                past(s, "then")
            } else if keyword(s, &["case"]) {
                // (Up to its first WHEN, which the next turn takes.)
                find(&s[1..], "when").map(|at| at + 1)
            } else if keyword(s, &["while", "for", "foreach"]) {
                past(s, "loop")
            } else if keyword(s, &["end"])
                && s.len() <= 3
                && s.iter().all(|tok| matches!(tok, Token::Word(_)))
            {
                // END, END IF, END LOOP, END CASE, with a label or not.
                Some(s.len())
            } else {
                break;
            };
            let Some(skip) = skip else {
                return e.pin(PinReason::Unclassified);
            };
            calls_and_temporary_relations(&s[..skip], e);
            s = &s[skip..];
        }
        if s.is_empty() {
            continue;
        }
        let assignment = matches!(s.get(1), Some(Token::Punct(':' | '=' | '.' | '[')));
        let first = s.iter().find(|tok| **tok != Token::Punct('('));
        if is(first, "do") {
            // A DO in a DO: not read (each level would lex its text again, and go a
            // level deeper on the stack).
            e.pin(PinReason::Unclassified);
        } else if declaring || assignment || keyword(s, PLPGSQL_STATEMENTS) {
            calls_and_temporary_relations(s, e);
        } else {
            classify_statement(s, e, backslashes);
        }
    }
}

/// Whether a SET ROLE's or SET SESSION AUTHORIZATION's value (`t`, past the name) is
/// `word` (NONE for a role) or DEFAULT. Either way no pin: a client that changed neither
/// role nor authorization is there already, and one that did is pinned. (Npgsql's pool
/// reset sends SET SESSION AUTHORIZATION DEFAULT every time.)
fn back_to_default(t: &[Token<'_>], word: &str) -> Option<Back> {
    let t = match t.first() {
        Some(Token::Punct('=')) => &t[1..],
        first if is(first, "to") => &t[1..],
        _ => t,
    };
    if t.len() != 1 {
        return None;
    }
    if is(t.first(), "default") {
        Some(Back::Reset)
    } else if is(t.first(), word) {
        Some(Back::ToLogin)
    } else {
        None
    }
}

/// Where a role statement goes back to.
enum Back {
    /// The role's default (RESET ROLE, SET ROLE DEFAULT, SET SESSION AUTHORIZATION
    /// DEFAULT): for a client that started as a role (`options=-c role=…`, applied as a
    /// setting), that one, as PostgreSQL makes startup settings the defaults. The setting
    /// is read back, finds no session value, and returns to the client's startup value.
    Reset,
    /// The login's own role (SET ROLE NONE): see `Effects::to_login_role`.
    ToLogin,
}

fn back(e: &mut Effects, to: Back) {
    // (The role is read back either way: what the backend runs as now.)
    e.settings.push("role".into());
    match to {
        Back::ToLogin => {
            e.to_login_role = true;
            // (A reset of the role before it in the same text is undone by it.)
            e.role_reset = false;
        }
        Back::Reset => {
            e.resets = true;
            e.role_reset = true;
        }
    }
}

/// The settings noted from `before` on are reset (the role's reset is told by
/// [`Effects::role_reset`]).
fn resets_since(e: &mut Effects, before: usize) {
    let reset: Vec<String> = e.settings[before..]
        .iter()
        .filter(|n| *n != "role")
        .cloned()
        .collect();
    e.reset_settings.extend(reset);
}

/// SET [SESSION | LOCAL] …
fn set_statement(t: &[Token<'_>], e: &mut Effects) {
    // (A custom setting whose first part is one of SET's own words, `SET local.tenant =
    // 1`, `SET session.user_id = 7`, is `dotted`: PostgreSQL reads a name there.)
    let (t, local) = if is(t.first(), "local") && !dotted(t) {
        (&t[1..], true)
    } else if is(t.first(), "session")
        && !dotted(t)
        && !is(t.get(1), "authorization")
        && !is(t.get(1), "characteristics")
    {
        (&t[1..], false)
    } else {
        (t, false)
    };
    // Only for the current transaction. (SET LOCAL ROLE, for row-level security: a change
    // of who the session is that outlives the statement still shows, in the server's
    // report of `is_superuser` or `session_authorization`, and pins then.) Still, a
    // statement parsed after a SET LOCAL TimeZone is read under it.
    if (is(t.first(), "transaction") || is(t.first(), "constraints")) && !dotted(t) {
        return;
    }
    if local {
        if dotted(t) || (!is(t.first(), "role") && !is(t.first(), "session")) {
            let mut named = Effects::default();
            set_names(t, &mut named);
            e.local_parse_setting |= named.settings.iter().any(|n| is_parse_setting(n));
            e.local_encoding |= named.settings.iter().any(|n| n == "client_encoding");
            e.local_quotes |= named
                .settings
                .iter()
                .any(|n| n == "standard_conforming_strings");
            if is(t.first(), "seed") {
                // (Given back at the transaction's end, the value does not seed the
                // generator again: its state stays on the backend.)
                e.pin(PinReason::Unclassified);
            }
        }
        return;
    }
    if is(t.first(), "role") && !dotted(t) {
        if let Some(to) = back_to_default(&t[1..], "none") {
            return back(e, to);
        }
        e.role_reset = false;
        return e.pin(PinReason::SetRole);
    }
    let authorization = match (t.first(), t.get(1)) {
        (first, Some(second)) if is(first, "session") && is(Some(second), "authorization") => {
            Some(&t[2..])
        }
        (first, _) if is(first, "authorization") && !dotted(t) => Some(&t[1..]),
        _ => None,
    };
    if let Some(value) = authorization {
        if back_to_default(value, "default").is_some() {
            return back(e, Back::Reset);
        }
        e.role_reset = false;
        return e.pin(PinReason::SessionAuthorization);
    }
    // `SET name TO DEFAULT` (or `= DEFAULT`) resets, whatever the name's form; so do
    // `SET TIME ZONE DEFAULT | LOCAL` and `SET NAMES [DEFAULT]`.
    let n = t.len();
    let to_default = n >= 3
        && is(t.last(), "default")
        && (is(t.get(n - 2), "to") || t.get(n - 2) == Some(&Token::Punct('=')));
    let time_zone = is(t.first(), "time")
        && is(t.get(1), "zone")
        && n == 3
        && (is(t.get(2), "default") || is(t.get(2), "local"));
    let names = is(t.first(), "names") && (n == 1 || (n == 2 && is(t.get(1), "default")));
    let before = e.settings.len();
    set_names(t, e);
    if to_default || time_zone || names {
        e.resets = true;
        resets_since(e, before);
    }
}

/// Whether PostgreSQL reads statements under this setting (see
/// [`crate::server::PARSE_SETTINGS`]). (Not `search_path`, for a transaction: a private
/// environment for each transaction that sets it, as PostgREST's every request does,
/// would have every statement prepared again each time.)
fn is_parse_setting(name: &str) -> bool {
    crate::server::PARSE_SETTINGS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(name))
}

/// The settings a SET (past SET [SESSION | LOCAL]) names.
fn set_names(t: &[Token<'_>], e: &mut Effects) {
    if dotted(t) {
        setting_name(t, e);
    } else if is(t.first(), "time") && is(t.get(1), "zone") {
        e.settings.push("timezone".into());
    } else if is(t.first(), "schema") {
        e.settings.push("search_path".into());
    } else if is(t.first(), "names") {
        e.settings.push("client_encoding".into());
    } else if is(t.first(), "xml") && is(t.get(1), "option") {
        e.settings.push("xmloption".into());
    } else if is(t.first(), "session") && is(t.get(1), "characteristics") {
        for name in [
            "default_transaction_isolation",
            "default_transaction_read_only",
            "default_transaction_deferrable",
        ] {
            e.settings.push(name.into());
        }
    } else {
        setting_name(t, e);
    }
}

/// The statement's words start with a dotted name (`local.tenant`): the first word is no
/// keyword then, but a custom setting's prefix.
fn dotted(t: &[Token<'_>]) -> bool {
    matches!(t.first(), Some(Token::Word(_) | Token::Quoted(_)))
        && t.get(1) == Some(&Token::Punct('.'))
}

/// A (possibly dotted) setting name at the start of `t`.
fn setting_name(t: &[Token<'_>], e: &mut Effects) {
    let mut name = String::new();
    let mut i = 0;
    loop {
        match t.get(i) {
            Some(Token::Word(w)) => name.push_str(w),
            Some(Token::Quoted(q)) => name.push_str(q),
            _ => return e.pin(PinReason::Unclassified),
        }
        if t.get(i + 1) == Some(&Token::Punct('.')) {
            name.push('.');
            i += 2;
        } else {
            break;
        }
    }
    session_setting(name.to_ascii_lowercase(), e);
}

/// A session-level change of `name` (lower case): followed by reading it back, except who
/// the session is, which pins as SET ROLE and SET SESSION AUTHORIZATION do (SET "role",
/// set_config('role', …, false)).
fn session_setting(name: String, e: &mut Effects) {
    match name.as_str() {
        "role" => e.pin(PinReason::SetRole),
        "session_authorization" => e.pin(PinReason::SessionAuthorization),
        // The random generator's state: `pg_settings` does not show it, and no value
        // read back could give it to another backend.
        "seed" => e.pin(PinReason::Unclassified),
        // (The transaction's own, as SET TRANSACTION.)
        n if crate::client::params::transaction_only(n) => {}
        // The names PostgreSQL still takes for these (guc.c, `map_old_guc_names`), which
        // `pg_settings` knows only by their own.
        "sort_mem" => e.settings.push("work_mem".into()),
        "vacuum_mem" => e.settings.push("maintenance_work_mem".into()),
        _ => e.settings.push(name),
    }
}

/// Whether a Query's text holds no statement at all: nothing but comments, white space
/// and semicolons (a driver's ping: pgx's `-- ping`, Rails' `;`). Read up to the first
/// thing that is none of them, without tokens: a statement is told at its first word.
pub fn holds_no_statement(sql: &[u8]) -> bool {
    let mut i = 0;
    loop {
        match skip_blank(sql, i) {
            Some(end) if end == sql.len() => return true,
            Some(at) if sql[at] == b';' => i = at + 1,
            // (A statement; or a comment left open, which the server answers.)
            _ => return false,
        }
    }
}

/// More `set_config` calls (with those of [`QUERY_RUNNERS`]) than this in one statement
/// are not read: it pins.
const MAX_SET_CONFIG_CALLS: usize = 64;

/// set_config('name', value, is_local): with a literal name and a literal `false` it sets
/// that setting for the session (a `NULL` value resets it, as `RESET name` does); a
/// literal `true` only for the transaction; anything else cannot be vouched for.
fn set_config_call(args: &[Token<'_>], e: &mut Effects) {
    // (The name a literal on its own: `'app.' || 'tenant'` is not `app.`.)
    let (Some(Token::Str(name)), Some(Token::Punct(','))) = (args.first(), args.get(1)) else {
        // A parameter for the name (PostgREST's `set_config($1, $2, true)` for a role's
        // settings) and the transaction only: whichever it is, it ends with the
        // transaction, which holds the backend; read as any setting statements are read
        // under. (Were it `seed`, the random generator's state would stay on the backend
        // after it, as `setseed()` leaves it through PgBouncer: the one trace. And as for
        // a literal `search_path` whose value is a parameter, a `pg_temp` in it is not
        // seen.) Not an expression (`'search_path'::text`), which hides no more than a
        // literal would, and is read as one is not.
        let parameter = matches!(
            (args.first(), args.get(1)),
            (Some(Token::Param), Some(Token::Punct(',')))
        );
        if parameter && lone_third_argument(args).is_some_and(|c| is(args.get(c + 1), "true")) {
            e.local_parse_setting = true;
            e.local_encoding = true;
            e.local_quotes = true;
            return;
        }
        return e.pin(PinReason::Unclassified);
    };
    // The third argument, after the second top-level comma. (Nor is `true AND false` a
    // literal `true`.)
    let Some(comma) = lone_third_argument(args) else {
        return e.pin(PinReason::Unclassified);
    };
    let third = args.get(comma + 1);
    if name.eq_ignore_ascii_case("search_path") && args[2..comma].iter().any(names_temp_schema) {
        // (As `SET search_path TO 'pg_temp', …`: see `calls_and_temporary_relations`;
        // for the transaction only too, as a table it creates outlives it.)
        e.pin(PinReason::TempTable);
    }
    if is(third, "true") {
        e.local_parse_setting |= is_parse_setting(name);
        e.local_encoding |= name.eq_ignore_ascii_case("client_encoding");
        e.local_quotes |= name.eq_ignore_ascii_case("standard_conforming_strings");
        if name.eq_ignore_ascii_case("seed") {
            // (As `SET LOCAL seed`.)
            e.pin(PinReason::Unclassified);
        }
        return;
    }
    if is(third, "false") {
        let name = name.to_ascii_lowercase();
        let null = args.get(1) == Some(&Token::Punct(',')) && is_null(&args[2..comma]);
        if !null {
            return session_setting(name, e);
        }
        if name == "role" || name == "session_authorization" {
            // RESET ROLE, RESET SESSION AUTHORIZATION.
            return back(e, Back::Reset);
        }
        let before = e.settings.len();
        session_setting(name, e);
        e.resets = true;
        resets_since(e, before);
    } else {
        e.pin(PinReason::Unclassified);
    }
}

/// Where the second top-level comma of a call whose arguments start `args` is, when a
/// third argument of one token alone follows it (`true`, not `true AND false`). (Each
/// call's arguments are read to their end at most; see `MAX_SET_CONFIG_CALLS`.)
fn lone_third_argument(args: &[Token<'_>]) -> Option<usize> {
    let mut depth = 0;
    let mut commas = 0;
    for (i, tok) in args.iter().enumerate() {
        match tok {
            Token::Punct('(') => depth += 1,
            Token::Punct(')') if depth == 0 => return None,
            Token::Punct(')') => depth -= 1,
            Token::Punct(',') if depth == 0 => {
                commas += 1;
                if commas == 2 {
                    return (args.get(i + 2) == Some(&Token::Punct(')'))).then_some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// How many arguments a call whose arguments start `args` has (None if its closing
/// parenthesis is not there).
fn argument_count(args: &[Token<'_>]) -> Option<usize> {
    let mut depth = 0;
    let mut commas = 0;
    for tok in args {
        match tok {
            Token::Punct('(') => depth += 1,
            Token::Punct(')') if depth == 0 => return Some(commas + 1),
            Token::Punct(')') => depth -= 1,
            Token::Punct(',') if depth == 0 => commas += 1,
            _ => {}
        }
    }
    None
}

/// Whether an argument, as written, is SQL's NULL: `NULL`, cast to a one-word type
/// (`NULL::text`, `CAST(NULL AS text)`), in parentheses or not. Anything else (`NULL ||
/// 'x'`, a quoted or qualified type) is not vouched for.
fn is_null(mut value: &[Token<'_>]) -> bool {
    loop {
        value = match value {
            [inner @ .., Token::Punct(':'), Token::Punct(':'), Token::Word(_)] => inner,
            [Token::Punct('('), inner @ .., Token::Punct(')')] => inner,
            [cast, Token::Punct('('), inner @ .., as_, Token::Word(_), Token::Punct(')')]
                if is(Some(cast), "cast") && is(Some(as_), "as") =>
            {
                inner
            }
            [word] => return is(Some(word), "null"),
            _ => return false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_change_the_schema_under_prepared_ones_are_known() {
        for sql in [
            "ALTER TABLE t ADD COLUMN b int",
            "drop view v",
            "CREATE OR REPLACE VIEW v AS SELECT 1",
            "create  or replace function f() returns int language sql as 'select 1'",
            "BEGIN; ALTER TABLE t DROP COLUMN b; COMMIT",
            "/* migration */ ALTER TABLE t RENAME TO u",
            "CREATE TEMP TABLE s (a int); ALTER TABLE t ADD COLUMN b int",
        ] {
            assert!(classify(sql).schema_change, "{sql}");
        }
        for sql in [
            "CREATE TABLE t (a int)",
            "CREATE INDEX ON t (a)",
            "CREATE TEMP TABLE x (a int)",
            "DROP TABLE pg_temp.x",
            "SELECT * FROM t",
            "INSERT INTO drop_log VALUES ('alter')",
            "create origin_table",
            "create or1 x",
            "CREATE OR$a t",
        ] {
            assert!(!classify(sql).schema_change, "{sql}");
        }
        // Only the columns of a query or a DML statement are held fixed by PostgreSQL.
        for sql in [
            "SELECT 1",
            " (select 1)",
            "WITH a AS (SELECT 1) SELECT * FROM a",
            "insert into t values (1) returning *",
            "TABLE t",
        ] {
            assert!(fixed_result(sql), "{sql}");
        }
        for sql in [
            "/* c */ SELECT 1",
            "-- name: GetAuthor :one\nSELECT * FROM authors WHERE id = $1",
            "/* a /* nested */ comment */ (SELECT 1)",
        ] {
            assert!(fixed_result(sql), "{sql}");
        }
        for sql in [
            "FETCH 5 FROM c",
            "EXPLAIN SELECT 1",
            "SHOW search_path",
            "/* unterminated SELECT 1",
            "-- only a comment",
        ] {
            assert!(!fixed_result(sql), "{sql}");
        }
    }

    #[test]
    fn words_with_multibyte_characters_do_not_panic() {
        // Found by the `messages` fuzz target: a word whose 8th byte is inside a char.
        let e = classify("SELECT ÖÖÖÖÖ, pg_tempé, pg_temp_ü.t FROM ünïcödé");
        assert_eq!(e.pin, Some(PinReason::TempTable));
        classify("ééééééééé");
    }

    #[test]
    fn text_in_another_encoding_is_classified_by_its_ascii() {
        // LATIN1: 0xE9 is é, a byte UTF-8 lacks on its own.
        assert!(classify(b"SELECT 'caf\xe9' FROM t\xe9").is_empty());
        let e = classify(b"SELECT 'caf\xe9'; LISTEN ch\xe9");
        assert_eq!((e.pin, e.statements), (Some(PinReason::Listen), 2));
        let set = classify(b"SET search_path = 'sch\xe9ma'");
        assert_eq!(set.settings, ["search_path"]);
        assert!(classify(b"ALTER TABLE t\xe9 ADD c int").schema_change);
        assert!(fixed_result(b"/* \xe9 */ SELECT * FROM t\xe9"));
    }

    fn pin(sql: &str) -> Option<PinReason> {
        classify(sql).pin
    }

    fn settings(sql: &str) -> Vec<String> {
        let e = classify(sql);
        assert_eq!(e.pin, None, "{sql}");
        e.settings
    }

    #[test]
    fn plain_statements_change_nothing() {
        for sql in [
            "SELECT 1",
            "SELECT 1; SELECT 2",
            "select * from t where x = 'SET ROLE' -- LISTEN x\n",
            "INSERT INTO t VALUES ($1, $$pg_advisory_lock(1)$$)",
            "/* LISTEN */ UPDATE t SET a = 1",
            "BEGIN; SELECT pg_advisory_xact_lock(1); COMMIT",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "SET LOCAL search_path = x",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT set_config('search_path', 'x', true)",
            "SET LOCAL work_mem = '1MB'",
            "CREATE TABLE t (x int)",
            "DECLARE c CURSOR FOR SELECT 1",
            "PREPARE TRANSACTION 'x'",
            "DISCARD PLANS",
            "  ",
            "",
        ] {
            assert!(classify(sql).is_empty(), "{sql}: {:?}", classify(sql));
        }
        assert_eq!(pin("SET application_name = 'pg_temp'"), None);
        // What a backslash means, for the rest of the transaction.
        for sql in [
            "SET LOCAL standard_conforming_strings = off",
            "SELECT set_config('standard_conforming_strings', 'off', true)",
        ] {
            let local = Effects {
                statements: 1,
                local_parse_setting: true,
                local_quotes: true,
                ..Effects::default()
            };
            assert_eq!(classify(sql), local, "{sql}");
        }
        // The generator's state outlives a transaction-only seed.
        for sql in [
            "SET LOCAL seed = 0.5",
            "SELECT set_config('seed', '0.5', true)",
        ] {
            assert_eq!(classify(sql).pin, Some(PinReason::Unclassified), "{sql}");
        }
    }

    #[test]
    fn resets_are_told_from_sets() {
        for sql in [
            "RESET ALL",
            "reset search_path",
            "DISCARD ALL",
            "SET search_path TO DEFAULT",
            "set session TimeZone = default",
            "SET TIME ZONE LOCAL",
            "SET SESSION TIME ZONE DEFAULT",
            "SET NAMES",
            "SET NAMES DEFAULT",
            "SELECT 1; RESET work_mem",
        ] {
            assert!(classify(sql).resets, "{sql}");
        }
        assert_eq!(settings("RESET TIME ZONE"), ["timezone"]);
        let mixed = classify("SET TimeZone = 'UTC'; RESET search_path; SET a.b TO DEFAULT");
        assert_eq!(mixed.reset_settings, ["search_path", "a.b"]);
        assert_eq!(classify("SET TIME ZONE LOCAL").reset_settings, ["timezone"]);
        let null = classify("SELECT set_config('Search_Path', null, false)");
        assert_eq!(null.reset_settings, ["search_path"]);
        assert_eq!(null.settings, ["search_path"]);
        for null in [
            "NULL::text",
            "CAST(NULL AS text)",
            "cast ( null as TEXT )",
            "(NULL)",
            "((NULL))::text",
            "(CAST(NULL AS varchar))::text",
        ] {
            let cast = classify(&format!("SELECT set_config('work_mem', {null}, false)"));
            assert_eq!(cast.reset_settings, ["work_mem"], "{null}");
        }
        for who in ["role", "session_authorization"] {
            let null = classify(&format!("SELECT set_config('{who}', NULL, false)"));
            assert_eq!((null.reset_settings, null.pin), (vec!["role".into()], None));
        }
        for sql in [
            "RESET ROLE",
            "SET ROLE DEFAULT",
            "DISCARD ALL",
            "SET SESSION AUTHORIZATION DEFAULT",
        ] {
            assert!(
                classify(sql).reset_settings.contains(&"role".to_owned()),
                "{sql}"
            );
        }
        assert!(classify("RESET ALL").reset_settings.is_empty());
        for sql in [
            "RESET ROLE; SET ROLE NONE",
            "DISCARD ALL; SET ROLE r",
            "RESET ROLE; SET SESSION AUTHORIZATION u",
        ] {
            assert!(
                !classify(sql).reset_settings.contains(&"role".to_owned()),
                "{sql}"
            );
        }
        assert!(!classify("SET ROLE NONE").resets);
        assert!(settings("RESET TRANSACTION ISOLATION LEVEL").is_empty());
        assert!(!classify("DISCARD ALL").control);
        for sql in [
            "BEGIN; RESET ALL",
            "RESET ALL; COPY t FROM STDIN",
            "reset all; commit",
        ] {
            let e = classify(sql);
            assert!(e.resets && e.control, "{sql}");
        }
        for sql in [
            "SET search_path = x",
            "SET search_path TO 'default'",
            "SET TIME ZONE 'UTC'",
            "SET NAMES 'LATIN1'",
            "SET LOCAL search_path TO DEFAULT",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT set_config('a.b', NULL || 'c', false)",
            "SELECT set_config('a.b', NULL::text || 'c', false)",
            "SELECT set_config('a.b', CAST(NULL AS text) || 'c', false)",
            "SELECT set_config('a.b', (NULL) || (NULL), false)",
            "SELECT set_config('a.b', (NULL || 'c'), false)",
            "SELECT set_config('a.b', CAST('c' AS text), false)",
            "SELECT set_config('a.b', CAST(NULL AS \"text\"), false)",
            "SELECT set_config('a.b', NULL::pg_catalog.text, false)",
            "SELECT set_config('a.b', f(NULL), false)",
            "SELECT set_config('a.b', (NULL), true)",
            "SELECT set_config('a' + NULL, false)",
            "SELECT set_config('a.b', NULL, true)",
            "DISCARD PLANS",
            "SELECT 'RESET ALL'",
        ] {
            assert!(!classify(sql).resets, "{sql}");
        }
    }

    #[test]
    fn session_settings_are_noticed() {
        assert_eq!(settings("SET search_path = a, b"), ["search_path"]);
        assert_eq!(
            settings("set SESSION statement_timeout TO '5s'"),
            ["statement_timeout"]
        );
        assert_eq!(settings("SET myapp.user_id = 42"), ["myapp.user_id"]);
        assert_eq!(settings("SET \"Work_Mem\" = '64MB'"), ["work_mem"]);
        assert_eq!(settings("SET TIME ZONE 'UTC'"), ["timezone"]);
        assert_eq!(settings("SET SCHEMA 'x'"), ["search_path"]);
        assert_eq!(settings("RESET work_mem"), ["work_mem"]);
        assert_eq!(
            settings("SELECT pg_catalog.set_config('work_mem', '8MB', false)"),
            ["work_mem"]
        );
        assert_eq!(
            settings("SELECT set_config('a.b', f(x, y), false), 1"),
            ["a.b"]
        );
        assert!(classify("RESET ALL").all_settings);
        let discard = classify("DISCARD ALL");
        assert!(discard.all_settings && discard.drops_all_statements);
        assert_eq!(classify("DEALLOCATE ALL").deallocate, Some(None));
        // A later DEALLOCATE in the same Query does not hide an earlier DEALLOCATE ALL.
        let both = classify("DEALLOCATE ALL; DEALLOCATE p1");
        assert_eq!(both.deallocate, Some(None));
        let ours = classify("DEALLOCATE pgshield_7; DEALLOCATE p1");
        assert_eq!(ours.deallocate, Some(Some("pgshield_7".into())));
        // Two of pgshield's own: all of the backend's are taken for gone.
        let two = classify("DEALLOCATE pgshield_5; DEALLOCATE \"pgshield_6\"");
        assert_eq!(two.deallocate, Some(None));
        assert_eq!(
            classify("DEALLOCATE PREPARE p1").deallocate,
            Some(Some("p1".into()))
        );
        assert_eq!(classify("SELECT 1; SELECT 2").statements, 2);
    }

    #[test]
    fn state_that_cannot_follow_pins() {
        let cases = [
            ("LISTEN chan", PinReason::Listen),
            ("CREATE TEMP TABLE t (x int)", PinReason::TempTable),
            (
                "create local temporary table t (x int)",
                PinReason::TempTable,
            ),
            ("CREATE TABLE pg_temp.t (x int)", PinReason::TempTable),
            ("SELECT 1 INTO TEMP t", PinReason::TempTable),
            ("SELECT pg_advisory_lock(1)", PinReason::AdvisoryLock),
            (
                "select pg_try_advisory_lock_shared(1, 2)",
                PinReason::AdvisoryLock,
            ),
            ("PREPARE p AS SELECT 1", PinReason::SqlPrepare),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                PinReason::CursorWithHold,
            ),
            ("SET ROLE admin", PinReason::SetRole),
            ("SET SESSION ROLE admin", PinReason::SetRole),
            ("SET ROLE 'none'", PinReason::SetRole),
            ("SET ROLE none_of_them", PinReason::SetRole),
            (
                "SET SESSION AUTHORIZATION bob",
                PinReason::SessionAuthorization,
            ),
            (
                "SET SESSION AUTHORIZATION 'default'",
                PinReason::SessionAuthorization,
            ),
            ("LOAD 'auto_explain'", PinReason::Load),
            // (A LOAD wins over a reason before it: its backend is closed, not reset.)
            ("LISTEN chan; LOAD 'auto_explain'", PinReason::Load),
            ("DO $$ BEGIN LISTEN chan; END $$", PinReason::Listen),
            (
                "SELECT set_config(name, 'x', false) FROM t",
                PinReason::Unclassified,
            ),
            ("SELECT set_config('x', 'y', $1)", PinReason::Unclassified),
            ("FROBNICATE everything", PinReason::Unclassified),
            ("SELECT 'unterminated", PinReason::Unclassified),
            ("SELECT 1; LISTEN x; SELECT 2", PinReason::Listen),
            (
                "WITH x AS (SELECT 1) SELECT * INTO TEMP t FROM x",
                PinReason::TempTable,
            ),
            (
                "EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1",
                PinReason::TempTable,
            ),
            (
                "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
                PinReason::TempTable,
            ),
            ("INSERT INTO \"pg_temp\".t VALUES (1)", PinReason::TempTable),
            ("SELECT \"pg_advisory_lock\"(1)", PinReason::AdvisoryLock),
            (
                "SELECT pg_catalog.pg_advisory_lock(1)",
                PinReason::AdvisoryLock,
            ),
        ];
        for (sql, reason) in cases {
            assert_eq!(pin(sql), Some(reason), "{sql}");
        }
    }

    #[test]
    fn text_whose_encoding_hides_ascii_in_characters_is_not_read_by_its_ascii() {
        // SJIS: 表 is 0x95 0x5C, a backslash as its second byte. PostgreSQL reads a string
        // and then SET ROLE; read by its ASCII bytes, it would all be one string.
        let hidden = b"SELECT E'\x95\x5c'; SET ROLE admin; -- '";
        assert_eq!(classify(hidden).pin, None, "what the ASCII reading misses");
        assert_eq!(
            classify_in(hidden, crate::server::ASCII_TRAILS).pin,
            Some(PinReason::Unclassified)
        );
        assert!(classify_in(b"SELECT 'plain'", crate::server::ASCII_TRAILS).is_empty());
        assert!(classify_in(b"SELECT 'caf\xe9'", 0).is_empty());
        for encoding in [
            "SJIS",
            "Shift_JIS",
            "big5",
            "GBK",
            "UHC",
            "GB18030",
            "JOHAB",
        ] {
            assert!(crate::server::has_ascii_trails(encoding), "{encoding}");
        }
        for encoding in ["UTF8", "utf-8", "LATIN1", "EUC_JP", "WIN1252", "SQL_ASCII"] {
            assert!(!crate::server::has_ascii_trails(encoding), "{encoding}");
        }
    }

    #[test]
    fn a_transaction_only_change_of_a_setting_statements_are_read_under_is_known() {
        for sql in [
            "SET LOCAL TimeZone = 'Asia/Tokyo'",
            "SET LOCAL TIME ZONE 'UTC'",
            "set local datestyle to 'SQL, DMY'",
            "SELECT set_config('TimeZone', 'UTC', true)",
        ] {
            let e = classify(sql);
            assert!(
                e.local_parse_setting && e.settings.is_empty(),
                "{sql}: {e:?}"
            );
        }
        for sql in [
            "SET LOCAL work_mem = '1MB'",
            "SET LOCAL ROLE r",
            "SET TimeZone = 'UTC'",
        ] {
            assert!(!classify(sql).local_parse_setting, "{sql}");
        }
        for sql in [
            "SET LOCAL client_encoding = 'SJIS'",
            "SET LOCAL NAMES 'SJIS'",
            "SELECT set_config('client_encoding', 'SJIS', true)",
        ] {
            assert!(classify(sql).local_encoding, "{sql}");
        }
        assert!(!classify("SET LOCAL TimeZone = 'UTC'").local_encoding);
        // Who the session is, by other spellings, pins.
        for sql in [
            "SET \"role\" = admin",
            "SELECT set_config('role', 'admin', false)",
            "SELECT set_config('session_authorization', 'bob', false)",
        ] {
            assert!(pin(sql).is_some(), "{sql}");
        }
    }

    #[test]
    fn a_temporary_table_dropped_at_commit_does_not_pin() {
        for sql in [
            "CREATE TEMP TABLE stage (LIKE items) ON COMMIT DROP",
            "create temporary table stage (id int) on commit drop",
            "CREATE TEMP TABLE stage ON COMMIT DROP AS SELECT 1",
        ] {
            let e = classify(sql);
            assert_eq!((e.pin, e.schema_change), (None, false), "{sql}");
        }
        for sql in [
            "CREATE TEMP TABLE stage (id int) ON COMMIT DELETE ROWS",
            "CREATE TEMP TABLE stage (id int) ON COMMIT PRESERVE ROWS",
            "SELECT 1 INTO TEMP t; SELECT 'on commit drop'",
            "CREATE TEMP TABLE t (x int); CREATE TABLE u (x int) ON COMMIT DROP",
        ] {
            assert_eq!(pin(sql), Some(PinReason::TempTable), "{sql}");
        }
    }

    #[test]
    fn going_back_to_the_logins_own_role_or_a_transactions_role_does_not_pin() {
        // Npgsql's pool reset, whole.
        let npgsql = "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;CLOSE ALL;UNLISTEN *;\
                      SELECT pg_advisory_unlock_all();DISCARD SEQUENCES;DISCARD TEMP";
        assert_eq!(pin(npgsql), None);
        assert!(classify(npgsql).all_settings);
        for sql in [
            "RESET ROLE",
            "RESET SESSION AUTHORIZATION",
            "SET ROLE NONE",
            "SET ROLE TO DEFAULT",
            "set session role = none",
            "SET LOCAL ROLE tenant_42",
            "SET LOCAL SESSION AUTHORIZATION bob",
        ] {
            assert_eq!(pin(sql), None, "{sql}");
        }
    }

    #[test]
    fn escape_strings_and_dollar_quotes_are_read_as_postgresql_reads_them() {
        let text = |sql: &str| match tokens(sql, false).as_deref() {
            Some([Token::Str(s)]) => Some(s.to_string()),
            _ => None,
        };
        assert_eq!(
            text(r"E'\101\x41\x4a\u0041\U00000041\n\q\\\'\1234'").as_deref(),
            Some("AAJAA\nq\\'S4")
        );
        assert_eq!(text(r"E'\xg'").as_deref(), Some("xg"), "no hex digit: an x");
        for refused in [r"E'\u12'", r"E'\u123g'", r"E'\uD83D'", r"E'\U0011FFFF'"] {
            assert_eq!(tokens(refused, false), None, "{refused}");
        }
        // Letters beyond ASCII make a dollar quote's tag too.
        assert_eq!(text("$é$'$é$").as_deref(), Some("'"));
        for (sql, reason) in [
            (
                r"SELECT set_config(E'\x72ole', 'admin', false)",
                PinReason::SetRole,
            ),
            (
                r"SELECT set_config(E'\u0072ole', 'admin', false)",
                PinReason::SetRole,
            ),
            (
                r"SELECT set_config(E'\162ole', 'admin', false)",
                PinReason::SetRole,
            ),
            (
                "SELECT $é$'$é$; LISTEN y; SELECT $é$'$é$",
                PinReason::Listen,
            ),
        ] {
            assert_eq!(pin(sql), Some(reason), "{sql}");
        }
    }

    #[test]
    fn a_do_block_is_read_statement_by_statement() {
        // asyncpg's pool reset, whole: nothing to pin.
        let asyncpg = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\n\
                       DO $$\nBEGIN\n    PERFORM * FROM pg_listening_channels() LIMIT 1;\n    \
                       IF FOUND THEN\n        UNLISTEN *;\n    END IF;\nEND;\n$$;\nRESET ALL;\n";
        assert_eq!(pin(asyncpg), None);
        assert!(classify(asyncpg).all_settings);
        let plain = [
            "DO $$ BEGIN PERFORM 1; END $$",
            "do 'begin null; end'",
            "DO LANGUAGE plpgsql $$ BEGIN PERFORM 1; END $$",
            "DO $$ BEGIN PERFORM 1; END $$ LANGUAGE 'plpgsql'",
            "DO $do$\n<<outer>>\nDECLARE\n  n int := 0;\n  r record;\n  c CURSOR FOR SELECT 1;\n\
             BEGIN\n  FOR r IN SELECT g FROM generate_series(1, 3) g LOOP\n    n := n + r.g;\n  \
             END LOOP;\n  WHILE n > 0 LOOP n = n - 1; END LOOP outer;\n  \
             FOREACH n IN ARRAY ARRAY[1, 2] LOOP EXIT WHEN n > 1; END LOOP;\n  \
             IF n = 1 THEN UPDATE t SET x = 1; ELSIF n = 2 THEN DELETE FROM t; \
             ELSE INSERT INTO t VALUES (1); END IF;\n  \
             CASE n WHEN 1 THEN RAISE NOTICE 'one'; ELSE NULL; END CASE;\n  \
             BEGIN PERFORM 1 / 0; EXCEPTION WHEN division_by_zero OR others THEN RETURN; END;\n  \
             GET DIAGNOSTICS n = ROW_COUNT; OPEN c; CLOSE c; NOTIFY chan; COMMIT;\n\
             END outer $do$",
        ];
        for sql in plain {
            let effects = classify(sql);
            assert_eq!(effects.pin, None, "{sql}");
            assert!(!effects.resets && effects.settings.is_empty(), "{sql}");
        }
        let pins = [
            (
                "DO $$ BEGIN CREATE TEMP TABLE t (x int); END $$",
                PinReason::TempTable,
            ),
            (
                "DO $$ BEGIN PERFORM pg_advisory_lock(1); END $$",
                PinReason::AdvisoryLock,
            ),
            (
                "DO $$ BEGIN IF pg_try_advisory_lock(1) THEN NULL; END IF; END $$",
                PinReason::AdvisoryLock,
            ),
            (
                "DO $$ DECLARE got bool := pg_advisory_lock(7) IS NULL; BEGIN END $$",
                PinReason::AdvisoryLock,
            ),
            (
                "DO $$ BEGIN IF true THEN SET ROLE admin; END IF; END $$",
                PinReason::SetRole,
            ),
            ("DO $$ BEGIN LOAD 'auto_explain'; END $$", PinReason::Load),
            // Dynamic SQL cannot be read, nor other languages.
            (
                "DO $$ BEGIN EXECUTE 'LISTEN x'; END $$",
                PinReason::Unclassified,
            ),
            (
                "DO $$ BEGIN FOR r IN EXECUTE 'SELECT 1' LOOP END LOOP; END $$",
                PinReason::Unclassified,
            ),
            (
                "DO LANGUAGE plpython3u $$ plpy.execute('LISTEN x') $$",
                PinReason::Unclassified,
            ),
            ("DO $$ BEGIN FROBNICATE; END $$", PinReason::Unclassified),
            (
                "DO $a$ BEGIN DO $b$ BEGIN NULL; END $b$; END $a$",
                PinReason::Unclassified,
            ),
            (
                "DO $a$ BEGIN (DO $b$ BEGIN NULL; END $b$); END $a$",
                PinReason::Unclassified,
            ),
            // A condition ends at the first THEN (a header at the first LOOP, a CASE's
            // selector at its first WHEN) outside parentheses, as PL/pgSQL reads it.
            (
                "DO $$ BEGIN IF (CASE WHEN random() > 0 THEN NULL END) IS NULL THEN \
                 SET ROLE tenant_b; END IF; END $$",
                PinReason::SetRole,
            ),
            (
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM t WHERE CASE WHEN t.a THEN t.b END) \
                 THEN LISTEN ch; END IF; END $$",
                PinReason::Listen,
            ),
            (
                "DO $$ BEGIN FOR r IN SELECT * FROM (SELECT 1 AS loop) s LOOP LISTEN ch; \
                 END LOOP; END $$",
                PinReason::Listen,
            ),
            (
                "DO $$ BEGIN CASE (CASE WHEN true THEN 1 END) WHEN 1 THEN LISTEN ch; \
                 END CASE; END $$",
                PinReason::Listen,
            ),
            (
                "DO $$ BEGIN IF (x THEN LISTEN y; END IF; END $$",
                PinReason::Unclassified,
            ),
            // An escape string's quote written as an escape does not end it.
            (
                r"DO E'BEGIN PERFORM \x27a''; LISTEN y; PERFORM ''b\x27; END'",
                PinReason::Listen,
            ),
            (
                "DO $$ BEGIN IF x LISTEN y; END IF; END $$",
                PinReason::Unclassified,
            ),
            ("DO", PinReason::Unclassified),
            (
                "DO $$ BEGIN END $$ $$ BEGIN END $$",
                PinReason::Unclassified,
            ),
            ("DO LANGUAGE", PinReason::Unclassified),
            ("DO $$ BEGIN PERFORM ' $$", PinReason::Unclassified),
            // What pgshield follows only as a statement of its own.
            (
                "DO $$ BEGIN RESET search_path; END $$",
                PinReason::Unclassified,
            ),
            (
                "DO $$ BEGIN DEALLOCATE ALL; END $$",
                PinReason::Unclassified,
            ),
            ("DO $$ BEGIN SET ROLE NONE; END $$", PinReason::Unclassified),
        ];
        for (sql, reason) in pins {
            assert_eq!(pin(sql), Some(reason), "{sql}");
        }
        // However deep DO blocks nest, one level is read (no deeper on the stack).
        let levels = 20_000;
        let open: String = (0..levels).map(|n| format!("DO $t{n}$ BEGIN (")).collect();
        let close: String = (0..levels)
            .rev()
            .map(|n| format!("); END $t{n}$"))
            .collect();
        assert_eq!(
            pin(&format!("{open}{close}")),
            Some(PinReason::Unclassified)
        );
        // Settings it changes are followed as a SET's; schema changes are seen.
        let effects = classify(
            "DO $$ BEGIN SET search_path = app; PERFORM set_config('work_mem', '8MB', false); END $$",
        );
        assert_eq!(
            (effects.pin, effects.settings),
            (None, vec!["search_path".into(), "work_mem".into()])
        );
        assert!(classify("DO $$ BEGIN SET LOCAL TimeZone = 'UTC'; END $$").local_parse_setting);
        assert!(classify("DO $$ BEGIN ALTER TABLE t ADD COLUMN y int; END $$").schema_change);
        assert!(!classify("DO $$ BEGIN CREATE TEMP TABLE t (x int); END $$").schema_change);
    }

    #[test]
    fn plain_first_words_are_those_of_plain_in_any_case() {
        for word in PLAIN {
            let upper = word.to_ascii_uppercase();
            assert!(is_plain_first_word(word.as_bytes()), "{word}");
            assert!(is_plain_first_word(upper.as_bytes()), "{upper}");
        }
        let others = [
            "",
            "frobnicate",
            "selectx",
            "sel",
            "pg_sleep",
            "deallocates",
        ];
        for word in LOOKED_AT.iter().chain(&others) {
            assert!(!is_plain_first_word(word.as_bytes()), "{word}");
        }
    }

    #[test]
    fn names_run_by_execute_are_found_only_where_a_statement_runs_one() {
        let names = |sql: &str| -> Vec<String> {
            executed_names(sql.as_bytes(), 0)
                .into_iter()
                .map(|(range, name)| {
                    assert!(sql[range].eq_ignore_ascii_case(&name), "{sql}");
                    name
                })
                .collect()
        };
        assert_eq!(
            names("EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE sqlx_s_1(NULL)"),
            ["sqlx_s_1"]
        );
        assert_eq!(
            names("execute S1(1); EXPLAIN ANALYZE EXECUTE \"Mixed\""),
            ["s1", "Mixed"]
        );
        for sql in [
            "SELECT count(*) AS execute FROM t",
            "SELECT count(*) execute FROM t",
            "CREATE TABLE t AS EXECUTE s1",
            "SELECT 'EXECUTE s1'",
        ] {
            assert!(names(sql).is_empty(), "{sql}");
        }
    }

    #[test]
    fn texts_of_no_statement_are_known_as_such() {
        for sql in [
            "",
            " ",
            "-- ping",
            ";",
            " ;; ",
            "/* a */ ; -- b\n",
            "\n-- x\n;",
            "/* a /* nested */ still */",
        ] {
            assert!(holds_no_statement(sql.as_bytes()), "{sql:?}");
        }
        for sql in [
            "SELECT 1",
            "-- x\nSELECT 1",
            "; SELECT 1",
            "/* unterminated",
            "/* a /* b */ SELECT 1",
            "'x'",
        ] {
            assert!(!holds_no_statement(sql.as_bytes()), "{sql:?}");
        }
    }

    #[test]
    fn set_config_of_a_name_not_written_out_for_the_transaction_does_not_pin() {
        // PostgREST, for the settings of the role it switches to.
        for sql in [
            "select set_config($1, $2, true)",
            "SELECT set_config($3, $4, TRUE), set_config('role', $5, true)",
        ] {
            let e = classify(sql);
            assert_eq!(e.pin, None, "{sql}");
            // Whichever it is, statements are read as under any setting until the
            // transaction ends.
            assert!(
                e.local_parse_setting && e.local_encoding && e.local_quotes,
                "{sql}"
            );
        }
        for sql in [
            "select set_config($1, $2, false)",
            "select set_config($1, $2, $3)",
            "select set_config($1, $2, true AND x)",
            "select set_config($1, $2)",
            "SELECT set_config('search_path'::text, 'pg_temp', true)",
            "SELECT set_config('search_' || 'path', 'pg_temp', true)",
            "SELECT set_config(k, v, true) FROM t",
        ] {
            assert_eq!(classify(sql).pin, Some(PinReason::Unclassified), "{sql}");
        }
    }

    #[test]
    fn texts_too_long_to_read_cheaply_pin_and_name_lists_stay_short() {
        // More than 64 `set_config` calls in one statement are not read.
        let calls = |n: usize| {
            let call = "set_config('a.b', 'x', false)";
            format!("SELECT {}", vec![call; n].join(", "))
        };
        assert_eq!(classify(&calls(64)).pin, None);
        assert_eq!(classify(&calls(65)).pin, Some(PinReason::Unclassified));
        // Nor a text of more than MAX_TOKENS tokens (a comment takes it past the screen).
        let commas = format!("/**/ SELECT 1{}", ",1".repeat(MAX_TOKENS / 2 + 1));
        assert_eq!(classify(&commas).pin, Some(PinReason::Unclassified));
        let fewer = format!("/**/ SELECT 1{}", ",1".repeat(1000));
        assert_eq!(classify(&fewer).pin, None);
        // A name reset or set over and over is listed once, or a few times.
        let resets = classify(&"RESET a.b; SET ROLE NONE; ".repeat(10_000));
        assert_eq!(resets.statements, 20_000);
        assert!(
            resets.reset_settings.len() <= 64,
            "{}",
            resets.reset_settings.len()
        );
        assert!(resets.settings.len() <= 64, "{}", resets.settings.len());
        assert!(resets.reset_settings.contains(&"a.b".to_owned()));
        assert!(resets.settings.contains(&"role".to_owned()));
    }

    /// The byte screen never answers differently from the lexer: over every statement in
    /// these tests and random strings built from the pieces that matter to either.
    #[test]
    fn sql_execute_of_pgshields_own_names_is_seen_and_hidden() {
        for (sql, runs) in [
            ("EXECUTE pgshield_7", true),
            ("execute PGSHIELD_7(1, 'x')", true),
            ("EXPLAIN ANALYZE EXECUTE \"pgshield_7\"", true),
            ("CREATE TABLE t AS EXECUTE pgshield_7", true),
            ("SELECT 1; EXECUTE pgshield_7", true),
            ("EXECUTE \"PGSHIELD_7\"", false),
            ("EXECUTE pgshield_x", false),
            ("EXECUTE pgshield_", false),
            ("EXECUTE p", false),
            ("SELECT 'EXECUTE pgshield_7' -- EXECUTE pgshield_7", false),
            ("SELECT pgshield_7 FROM t", false),
            ("SELECT execute pgshield_7 FROM t", false),
            ("EXPLAIN (ANALYZE, BUFFERS) EXECUTE pgshield_7", true),
            ("explain verbose execute pgshield_7", true),
        ] {
            assert_eq!(classify(sql).runs_proxy_statement, runs, "{sql}");
            assert_eq!(changes_nothing_in(sql.as_bytes(), 0), !runs, "{sql}");
        }
        let hidden = |sql: &[u8], env: u64| {
            let mut sql = sql.to_vec();
            hide_proxy_statements(&mut sql, env, &[]);
            sql
        };
        assert_eq!(
            hidden(
                b"SELECT 'pgshield_1'; EXECUTE pgshield_7; EXECUTE \"pgshield_12\"(1)",
                0
            ),
            b"SELECT 'pgshield_1'; EXECUTE pgshield$7; EXECUTE \"pgshield$12\"(1)"
        );
        // Text that is not UTF-8 (LATIN1 here) keeps its bytes.
        assert_eq!(
            hidden(b"SELECT '\xe9\xe8'; EXECUTE PGSHIELD_7", 0),
            b"SELECT '\xe9\xe8'; EXECUTE PGSHIELD$7"
        );
        let latin1 = b"SELECT '\xe9'; EXECUTE pgshield_1; SELECT '\xe8\xe8'; EXECUTE pgshield_2";
        assert_eq!(
            hidden(latin1, 0),
            b"SELECT '\xe9'; EXECUTE pgshield$1; SELECT '\xe8\xe8'; EXECUTE pgshield$2"
        );
        // Read as the server reads it: with standard_conforming_strings off, all but
        // `SELECT` is a string.
        let sql = b"SELECT 'a\\'; EXECUTE pgshield_7; --'";
        assert_eq!(hidden(sql, 0), b"SELECT 'a\\'; EXECUTE pgshield$7; --'");
        assert_eq!(hidden(sql, crate::server::BACKSLASH_QUOTES), sql);
        // Not when unsure how the server reads it (the client is pinned then).
        assert_eq!(hidden(sql, crate::server::QUOTES_UNSURE), sql);
        let sjis = b"SELECT '\x95\x5c'; EXECUTE pgshield_7";
        assert_eq!(hidden(sjis, crate::server::ASCII_TRAILS), sjis);
        assert_eq!(
            hidden(b"EXECUTE pgshield_7", crate::server::ASCII_TRAILS),
            b"EXECUTE pgshield$7"
        );
    }

    #[test]
    fn the_byte_screen_agrees_with_the_lexer() {
        use crate::server::{ASCII_TRAILS, BACKSLASH_QUOTES, QUOTES_UNSURE};
        use rand::{Rng, SeedableRng};
        let pieces = [
            "SELECT",
            "select",
            "insert",
            "Update",
            "with",
            "begin",
            "commit",
            "create",
            "or",
            "OR",
            "or1",
            "alter",
            "DROP",
            "replace",
            "set",
            "reset",
            "listen",
            "prepare",
            "declare",
            "deallocate",
            "discard",
            "load",
            "frob",
            "temp",
            "TEMPORARY",
            "pg_temp",
            "pg_temp_3",
            "execute",
            "pgshield_1",
            "PGSHIELD_12",
            "pgshield_",
            "pgshield",
            "pg_advisory_lock",
            "set_config",
            "setseed",
            "pg_try_advisory_lock_shared",
            "PG_TRY_ADVISORY_LOCK",
            "SetSeed",
            "Set_Config",
            "pg_tables",
            "pg_t",
            "tempo",
            "1temp",
            "sets",
            "into",
            "&",
            "1INTO",
            "local",
            "with hold",
            "transaction",
            "e",
            "E",
            "U&",
            "x",
            "_y",
            "é",
            "1",
            "2.5",
            "$1",
            "$$",
            "a",
            "Temp",
            "p",
            "PG_",
            "_temp",
            "$a$",
            "$",
            "'",
            "''",
            "\"",
            "\\",
            "(",
            ")",
            ",",
            ";",
            ";",
            "-",
            "--",
            "/",
            "/*",
            "*/",
            "*",
            "=",
            " ",
            " ",
            "\n",
            "\t",
            "'s;t'",
            "\"q\"",
            "false",
            "true",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut fast = 0;
        for _ in 0..200_000 {
            let n = rng.random_range(1..10);
            let mut sql = String::new();
            for _ in 0..n {
                sql.push_str(pieces[rng.random_range(0..pieces.len())]);
                if rng.random_bool(0.6) {
                    sql.push(' ');
                }
            }
            if let Some(effects) = plain(sql.as_bytes()) {
                fast += 1;
                assert_eq!(effects, classify_tokens(&sql, false), "{sql:?}");
            }
            // The short path's question, under each parse environment.
            let flags = [BACKSLASH_QUOTES, QUOTES_UNSURE, ASCII_TRAILS]
                .into_iter()
                .filter(|_| rng.random_bool(0.5))
                .fold(0, |env, flag| env | flag);
            // (The bits below the flags tell search paths apart: no bearing here.)
            let env = flags | rng.random_range(0..1u64 << 40);
            assert_eq!(
                changes_nothing_in(sql.as_bytes(), env),
                classify_in(sql.as_bytes(), env).is_empty(),
                "{sql:?} under {env:#x}"
            );
        }
        // (The screen is worth having only if it answers often.)
        assert!(fast > 5_000, "{fast}");
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
            "UPDATE pgbench_accounts SET abalance = abalance + -4711 WHERE aid = 42;",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (5, 1, 42, -4711, CURRENT_TIMESTAMP);",
            "select * from t where a = $1 and b = 'x'",
            "INSERT INTO \"T\" (a) VALUES ($1) RETURNING id ;  ",
            "(SELECT 1) UNION (SELECT 2)",
        ] {
            assert_eq!(
                plain(sql.as_bytes()),
                Some(classify_tokens(sql, false)),
                "{sql}"
            );
        }
    }

    #[test]
    fn the_lexer_skips_what_hides_keywords() {
        assert!(classify("SELECT $tag$ LISTEN x; $tag$").is_empty());
        assert!(classify("SELECT E'it\\'s; LISTEN'").is_empty());
        assert!(classify("SELECT \"LISTEN\" FROM t").is_empty());
        assert!(classify("SELECT 1 /* nested /* LISTEN */ still */").is_empty());
        assert_eq!(
            pin("SELECT 1 /* unterminated"),
            Some(PinReason::Unclassified)
        );
    }

    #[test]
    fn corners_of_postgresqls_grammar_are_read_as_postgresql_reads_them() {
        // SET's own words as the first part of a custom setting's name.
        for (sql, name) in [
            ("SET local.tenant = '42'", "local.tenant"),
            ("SET LOCAL.tenant TO 42", "local.tenant"),
            ("SET session.user_id = 7", "session.user_id"),
            ("SET transaction.x = 1", "transaction.x"),
            ("SET constraints.x = 1", "constraints.x"),
            ("SET names.x = 1", "names.x"),
            ("SET schema.x = 1", "schema.x"),
            ("SET role.x = 1", "role.x"),
            ("SET authorization.x = 1", "authorization.x"),
            ("SET SESSION local.x = 1", "local.x"),
            ("RESET session.x", "session.x"),
            ("RESET transaction.x", "transaction.x"),
            ("RESET role.x", "role.x"),
            // The old names PostgreSQL still takes.
            ("SET sort_mem = '1GB'", "work_mem"),
            ("SET vacuum_mem TO '1GB'", "maintenance_work_mem"),
            ("SELECT set_config('sort_mem', '1GB', false)", "work_mem"),
        ] {
            assert_eq!(settings(sql), [name], "{sql}");
        }
        // ... which is only for the transaction after SET LOCAL.
        assert!(classify("SET LOCAL local.tenant = 1").is_empty());
        assert!(classify("SET LOCAL session.x = 1").is_empty());
        // set_config whose name or is_local is not one literal.
        for sql in [
            "SELECT set_config('app.' || 'tenant', '42', false)",
            "SELECT set_config('ro' || 'le', 'admin', false)",
            "SELECT set_config('search_path', 'evil', true AND false)",
            "SELECT set_config('search_path', 'evil', false OR true)",
            "SELECT set_config('search_path'::text, 'evil', false)",
        ] {
            assert_eq!(pin(sql), Some(PinReason::Unclassified), "{sql}");
        }
        assert_eq!(
            settings("SELECT set_config('search_path', 'a' || 'b', false)"),
            ["search_path"]
        );
        // A search path with the temporary schema first, as a string.
        for sql in [
            "SET search_path TO 'pg_temp', public",
            "SET search_path = 'PG_TEMP'",
            "SET LOCAL search_path TO '\"pg_temp\"', public",
            "SET search_path TO 'pg_temp_3'",
            "SELECT set_config('search_path', 'pg_temp, public', false)",
            "SELECT set_config('search_path', 'pg_temp', true)",
        ] {
            assert_eq!(pin(sql), Some(PinReason::TempTable), "{sql}");
        }
        assert_eq!(
            settings("SET search_path TO 'app', public"),
            ["search_path"]
        );
        // The random generator's state.
        assert_eq!(pin("SELECT setseed(0.5)"), Some(PinReason::Unclassified));
        assert_eq!(pin("SET seed = 0.5"), Some(PinReason::Unclassified));
        // A `--` comment ends at a carriage return too.
        assert_eq!(
            settings("SELECT 1; -- c\rSET search_path = x"),
            ["search_path"]
        );
        // Unicode escapes are not decoded: not read.
        for sql in [
            "SET U&\"rol\\0065\" = 'admin'",
            "SELECT U&\"\\0070g_advisory_lock\"(1)",
            "SELECT U&\"pg!005ftemp\" UESCAPE '!'",
            "SELECT set_config(U&'rol\\0065', 'admin', false)",
        ] {
            assert_eq!(pin(sql), Some(PinReason::Unclassified), "{sql}");
        }
        assert!(classify("SELECT a & b FROM t").is_empty());
        // A number ends where its digits do (PostgreSQL 14 and older read on).
        assert_eq!(pin("SELECT 1INTO TEMP t"), Some(PinReason::TempTable));
        assert_eq!(pin("SELECT 1.5e-3INTO TEMP t"), Some(PinReason::TempTable));
        for sql in [
            "SELECT 1_000, 0x1F, 0b101, 1.5E+10, .5, 1e5 FROM t",
            "SELECT 1.5",
        ] {
            assert!(classify(sql).is_empty(), "{sql}");
        }
    }

    #[test]
    fn what_ends_a_failed_transaction_is_known() {
        for sql in [
            "ROLLBACK",
            "rollback to savepoint a",
            "/* x */ COMMIT",
            "END",
            "abort",
            "PREPARE TRANSACTION 'x'",
        ] {
            assert!(ends_transaction(sql), "{sql}");
        }
        for sql in [
            "COMMIT PREPARED 'x'",
            "SELECT 1",
            "PREPARE p AS SELECT 1",
            "BEGIN",
            "",
        ] {
            assert!(!ends_transaction(sql), "{sql}");
        }
    }

    #[test]
    fn a_backslash_in_a_string_escapes_when_the_client_says_so() {
        use crate::server::{BACKSLASH_QUOTES, QUOTES_UNSURE};
        let hidden = b"SELECT 'x\\''; SET search_path = evil; --'";
        assert!(classify_in(hidden, 0).is_empty(), "one string, read as on");
        let off = classify_in(hidden, BACKSLASH_QUOTES);
        assert_eq!(
            (off.pin, off.settings),
            (None, vec!["search_path".to_owned()])
        );
        let lock = b"SELECT 'x\\'' , pg_advisory_lock(1) --'";
        assert_eq!(
            classify_in(lock, BACKSLASH_QUOTES).pin,
            Some(PinReason::AdvisoryLock)
        );
        // Unsure which: pinned when the two readings differ, not otherwise.
        assert_eq!(
            classify_in(hidden, QUOTES_UNSURE).pin,
            Some(PinReason::Unclassified)
        );
        assert!(classify_in(b"SELECT 'a\\_b' LIKE x", QUOTES_UNSURE).is_empty());
        assert!(classify_in(b"SELECT 1", QUOTES_UNSURE | BACKSLASH_QUOTES).is_empty());
    }

    #[test]
    fn strings_go_on_across_lines_and_vertical_tabs_are_blanks_as_postgresql_reads_them() {
        use crate::server::BACKSLASH_QUOTES;
        // An `E'…'` string continued on the next line keeps its escapes: `\'` is a quote
        // there, so the lock runs.
        let continued = "SELECT E'a'\n'\\' ' ; SELECT pg_advisory_lock(42); -- '";
        assert_eq!(pin(continued), Some(PinReason::AdvisoryLock));
        for gap in ["\n", " -- note\r\n  ", "\t\n\n-- x\n", "\x0b\n"] {
            let sql = format!("SELECT E'a'{gap}'\\' ' ; SET ROLE x; -- '");
            assert_eq!(pin(&sql), Some(PinReason::SetRole), "{sql:?}");
        }
        let text = |sql: &str| match tokens(sql, false).as_deref() {
            Some([Token::Str(s)]) => Some(s.to_string()),
            _ => None,
        };
        assert_eq!(text("'a'\n'b' -- c\n'c'").as_deref(), Some("abc"));
        assert_eq!(text("E'a'\n'\\n'").as_deref(), Some("a\n"));
        // No line end, or a `/* */` comment: two strings (PostgreSQL refuses them).
        for two in ["'a' 'b'", "'a' /*\n*/ 'b'", "\"a\"\n\"b\""] {
            assert_eq!(tokens(two, false).map(|t| t.len()), Some(2), "{two:?}");
        }
        // A `search_path` split over lines still names pg_temp.
        assert_eq!(
            pin("SET search_path = 'pg_'\n'temp'"),
            Some(PinReason::TempTable)
        );

        // The vertical tab is white space to PostgreSQL 18.
        for sql in [
            "SELECT pg_advisory_lock\x0b(1)",
            "CREATE\x0bTEMP TABLE users (a int)",
            "DECLARE c CURSOR WITH\x0bHOLD FOR SELECT 1",
        ] {
            assert!(pin(sql).is_some(), "{sql:?}");
        }
        assert_eq!(
            settings("SELECT set_config\x0b('app.tenant', '42', false)"),
            ["app.tenant"]
        );

        // A bit string's backslash is itself, whatever `standard_conforming_strings` says.
        let bits = b"SELECT B'\\', X'\\'; SELECT pg_advisory_lock(1); -- '";
        assert_eq!(
            classify_in(bits, BACKSLASH_QUOTES).pin,
            Some(PinReason::AdvisoryLock)
        );
    }

    #[test]
    fn functions_that_run_sql_text_and_updates_of_pg_settings_pin() {
        for sql in [
            "SELECT query_to_xml('select pg_advisory_lock(1)', true, true, '')",
            "select * from pg_catalog.QUERY_TO_XML_AND_XMLSCHEMA('select 1', true, true, '')",
            "SELECT ts_stat('SELECT to_tsvector(set_config(''a.b'', ''1'', false))')",
            "SELECT ts_rewrite('a'::tsquery, 'SELECT 1')",
            "SELECT ts_rewrite(q, (SELECT 'x'))",
            "UPDATE pg_settings SET setting = 'evil' WHERE name = 'search_path'",
            "with s as (update pg_catalog.\"pg_settings\" set setting = '1s' where name = 'statement_timeout' returning 1) select 1",
        ] {
            assert_eq!(pin(sql), Some(PinReason::Unclassified), "{sql}");
        }
        assert_eq!(pin("SELECT name, setting FROM pg_settings"), None);
        assert_eq!(
            pin("SELECT ts_rewrite('a & b'::tsquery, 'a'::tsquery, 'c'::tsquery)"),
            None,
            "three tsquery arguments run no query"
        );
        for sql in [
            "UPDATE cfg SET v = (SELECT setting FROM pg_settings WHERE name = 'x')",
            "INSERT INTO cfg SELECT name FROM pg_settings ON CONFLICT (k) DO UPDATE SET v = 1",
        ] {
            assert_eq!(pin(sql), None, "{sql}");
        }
        assert_eq!(
            pin("update only pg_settings set setting = 'x' where name = 'work_mem'"),
            Some(PinReason::Unclassified)
        );
        assert_eq!(pin("SELECT query_to_xml_col FROM t"), None);
    }

    #[test]
    fn a_do_block_that_sets_standard_conforming_strings_locally_says_so() {
        let sql =
            "DO $$BEGIN PERFORM set_config('standard_conforming_strings', 'off', true); END$$";
        assert!(classify(sql).local_quotes);
        assert!(
            classify("DO $$BEGIN SET LOCAL standard_conforming_strings = off; END$$").local_quotes
        );
    }

    #[test]
    fn a_path_makes_tables_temporary_only_with_the_temporary_schema_first() {
        for path in [
            "pg_temp, public",
            "\"$user\", pg_temp",
            "pg_temp_3,public",
            "\"pg_temp\"",
        ] {
            assert!(path_puts_temp_schema_first(path), "{path}");
        }
        for path in ["public, pg_temp", "\"$user\", public, pg_temp", "", "app"] {
            assert!(!path_puts_temp_schema_first(path), "{path}");
        }
    }
}
