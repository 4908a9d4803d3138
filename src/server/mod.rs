//! One backend connection: opening and authenticating it (`connect`), what it still owes
//! (`state`), the parameters it reported, and the queries pgshield runs on it by itself
//! (parameter sync, reset) whose replies no client sees.
//!
//! A `Server` never decides when it is lent or returned: that is the pool's and the
//! session's business. It only knows its own state, and says so honestly: a backend that
//! errored at the protocol level or was lost is marked broken and is never reused.

pub mod connect;
pub mod password;
pub mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

pub(crate) use connect::start_tls;
pub use connect::{connect, BackendPassword, ServerError, ServerTarget};
use state::{ReplyTracker, TxStatus};

use crate::client::cancel::CancelTarget;
use crate::net::Stream;
use crate::prepared::ServerStatements;
use crate::protocol::frame::{read_message, take_cstr, ReadError};
use crate::protocol::ErrorResponse;

/// Largest message accepted in reply to pgshield's own queries.
const MAX_INTERNAL_REPLY: usize = 1 << 20;
/// A Terminate message: sent when a backend is closed on purpose.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Identifies a backend connection inside pgshield (not the Postgres PID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub u64);

impl ServerId {
    fn next() -> ServerId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ServerId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for ServerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// `(name, value)` pairs a backend reported with ParameterStatus. Names compare
/// case-insensitively, as PostgreSQL's do.
#[derive(Debug, Clone, Default)]
pub struct ServerParams {
    pairs: Vec<(String, String)>,
    /// The fingerprint of its [`PARSE_SETTINGS`], once asked for: a pool's welcome values
    /// are the view every new client starts from, and each login would otherwise look
    /// up and hash them again.
    parse_env: std::sync::OnceLock<u64>,
}

impl PartialEq for ServerParams {
    fn eq(&self, other: &Self) -> bool {
        self.pairs == other.pairs
    }
}

impl Eq for ServerParams {}

impl ServerParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.parse_env = std::sync::OnceLock::new();
        match self
            .pairs
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(entry) => value.clone_into(&mut entry.1),
            None => self.pairs.push((name.to_owned(), value.to_owned())),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// [`ClientView::parse_env`] of a view with these values and none of its own.
    fn parse_env(&self) -> u64 {
        *self
            .parse_env
            .get_or_init(|| fingerprint(|name| self.get(name)))
    }
}

/// The ParameterStatus values a client has been told: the welcome values of its pool
/// (one copy, shared by the pool's clients) and what differs for this client alone, so
/// that an idle client does not carry a dozen strings of its own.
#[derive(Debug, Clone)]
pub struct ClientView {
    base: Arc<ServerParams>,
    /// None until a value differs (most clients' never do).
    own: Option<Box<ServerParams>>,
    /// A fingerprint of its [`PARSE_SETTINGS`].
    parse_env: u64,
}

/// The settings under which PostgreSQL reads a statement's text as it prepares it: how
/// its bytes decode, what a backslash in a string means, how date, time and interval
/// literals read. All are reported with ParameterStatus, so a client's view has them. A
/// statement prepared under other values is another statement (see
/// [`crate::prepared::Registry`]), as it would be on a connection of one's own.
pub const PARSE_SETTINGS: [&str; 5] = [
    "client_encoding",
    "standard_conforming_strings",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
];

/// Whether a statement's meaning depends on setting `name`: one it is read under
/// ([`PARSE_SETTINGS`]), or `search_path`, in which its names are looked up. The server
/// does not report `search_path` (before PostgreSQL 18): a client's is the one pgshield
/// follows for it (see `Session::parse_env`), so that clients whose names resolve in other
/// schemas (a schema per tenant) never share a statement.
pub fn shapes_statements(name: &str) -> bool {
    name.eq_ignore_ascii_case("search_path")
        || PARSE_SETTINGS.iter().any(|p| p.eq_ignore_ascii_case(name))
}

/// In a parse environment ([`ClientView::parse_env`]): the client's encoding has
/// characters whose later bytes may be ASCII (see [`has_ascii_trails`]).
pub const ASCII_TRAILS: u64 = 1 << 63;

/// In a parse environment: `standard_conforming_strings` is off, so a backslash in a
/// `'…'` string escapes (see [`crate::client::sql::classify_in`]).
pub const BACKSLASH_QUOTES: u64 = 1 << 62;

/// In a session's parse environment: a setting statements are read under may have
/// changed without the server's report yet, `standard_conforming_strings` perhaps.
pub const QUOTES_UNSURE: u64 = 1 << 61;

/// The flags of a parse environment; the rest is a fingerprint of the values.
pub const PARSE_FLAGS: u64 = ASCII_TRAILS | BACKSLASH_QUOTES | QUOTES_UNSURE;

/// Whether text in this `client_encoding` can hold a character whose second byte is
/// ASCII (`\`, `;` in JOHAB): SJIS, BIG5, GBK, UHC, GB18030, JOHAB, SHIFT_JIS_2004, which
/// PostgreSQL converts before it reads a statement. pgshield reads statements by their
/// ASCII bytes, so such text (with any byte beyond ASCII) it cannot classify.
pub fn has_ascii_trails(encoding: &str) -> bool {
    // (PostgreSQL's spelling rule: letters and digits count, case does not.)
    let name: String = encoding
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    [
        "sjis",
        "shiftjis",
        "mskanji",
        "win932",
        "windows932",
        "shiftjis2004",
        "big5",
        "win950",
        "windows950",
        "gbk",
        "win936",
        "windows936",
        "cp936",
        "uhc",
        "win949",
        "windows949",
        "gb18030",
        "johab",
    ]
    .contains(&name.as_str())
}

impl ClientView {
    pub fn new(base: Arc<ServerParams>) -> ClientView {
        ClientView {
            parse_env: base.parse_env(),
            base,
            own: None,
        }
    }

    /// A fingerprint of the values of [`PARSE_SETTINGS`] the client was told; its top bit
    /// is [`ASCII_TRAILS`].
    pub fn parse_env(&self) -> u64 {
        self.parse_env
    }

    /// Whether the client's encoding may hide ASCII in its characters (see
    /// [`has_ascii_trails`]).
    pub fn ascii_trails(&self) -> bool {
        self.parse_env & ASCII_TRAILS != 0
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.own
            .as_ref()
            .and_then(|own| own.get(name))
            .or_else(|| self.base.get(name))
    }

    pub fn set(&mut self, name: &str, value: &str) {
        let own_has = self.own.as_ref().is_some_and(|own| own.get(name).is_some());
        if own_has || self.base.get(name) != Some(value) {
            self.own
                .get_or_insert_with(Default::default)
                .set(name, value);
        }
        if PARSE_SETTINGS.iter().any(|p| p.eq_ignore_ascii_case(name)) {
            self.parse_env = fingerprint(|name| self.get(name));
        }
    }
}

/// A fingerprint of the values `get` gives for [`PARSE_SETTINGS`], with the flags
/// [`ASCII_TRAILS`] and [`BACKSLASH_QUOTES`].
fn fingerprint<'a>(get: impl Fn(&str) -> Option<&'a str>) -> u64 {
    use std::hash::{Hash, Hasher};
    // (std's SipHash with fixed keys: the same in every client of the process.)
    let mut hasher = std::hash::DefaultHasher::new();
    for name in PARSE_SETTINGS {
        get(name).hash(&mut hasher);
    }
    let trails = get("client_encoding").is_some_and(has_ascii_trails);
    // (As the client gave it, until the server reports it: `false`, `0` and `no` too.)
    let backslashes = get("standard_conforming_strings").and_then(pg_bool) == Some(false);
    (hasher.finish() & !PARSE_FLAGS)
        | if trails { ASCII_TRAILS } else { 0 }
        | if backslashes { BACKSLASH_QUOTES } else { 0 }
}

/// How PostgreSQL reads `value` as a boolean setting (`parse_bool`): in any case, a
/// prefix of `true`, `yes`, `false` or `no`, `on`, `off` (`of` at least), `1` or `0`.
/// None: not a boolean.
pub fn pg_bool(value: &str) -> Option<bool> {
    let v = value.to_ascii_lowercase();
    let prefix_of = |word: &str| !v.is_empty() && word.starts_with(v.as_str());
    if prefix_of("true") || prefix_of("yes") || v == "on" || v == "1" {
        Some(true)
    } else if prefix_of("false") || prefix_of("no") || v == "of" || v == "off" || v == "0" {
        Some(false)
    } else {
        None
    }
}

/// Parses a ParameterStatus body into (name, value).
pub fn parse_parameter_status(mut body: &[u8]) -> Option<(&str, &str)> {
    let name = take_cstr(&mut body)?;
    let value = take_cstr(&mut body)?;
    Some((name, value))
}

/// What one of pgshield's own queries produced.
#[derive(Debug, Default)]
pub struct InternalReply {
    /// ParameterStatus changes the query caused, in order.
    pub param_changes: Vec<(String, String)>,
    /// The error the server reported, if any (the backend is still usable unless FATAL).
    pub error: Option<ErrorResponse>,
    /// The first rows returned (text format), up to [`MAX_INTERNAL_ROWS`].
    pub rows: Vec<Vec<Option<String>>>,
}

/// Rows of an internal query's reply that are kept.
pub const MAX_INTERNAL_ROWS: usize = 16;

pub struct Server {
    pub(crate) stream: Stream,
    /// Bytes read from the backend and not yet processed.
    pub(crate) read_buf: BytesMut,
    /// The epoch in which a client's session last found `stream` with nothing to read
    /// (see `epoch.rs`), 0 if none.
    pub(crate) read_idle_in: u64,
    pub(crate) replies: ReplyTracker,
    /// The statements pgshield has prepared here for clients (transaction mode).
    pub(crate) statements: ServerStatements,
    /// Where cancel requests for this backend go, and whether one was sent: then it is
    /// not reused, so a cancel that lands late can never hit another client.
    cancel: Arc<CancelTarget>,
    id: ServerId,
    process_id: i32,
    secret_key: i32,
    params: ServerParams,
    /// Client settings applied to this backend by pgshield, as (name, value) given.
    applied: Vec<(String, String)>,
    /// A client's settings (as `ClientSettings` keeps them) this backend was last found to
    /// match, nothing to apply and nothing to reset, while `settled` holds: any change to
    /// its parameters or to what was applied clears it. Spares a borrow the comparison.
    settled_for: String,
    settled: bool,
    broken: bool,
    /// A notification came that no client was seen to LISTEN for (a LISTEN inside a
    /// function, a departed client's): the backend listens on some channel, and must be
    /// reset (DISCARD ALL unlistens) or closed before another client has it.
    notified: bool,
    /// Lent without the health check it was due (see `pool::lend_idle_only`): its
    /// borrower runs the check before using it (`Pool::checked`).
    pub(crate) check_due: bool,
    /// Closing sends no Terminate (the server's input may be mid-message, or it has one).
    no_terminate: bool,
    created: Instant,
    /// When it was opened, in seconds since the Unix epoch (SHOW SERVERS' connect_time).
    opened_secs: u64,
    /// When it has lived the `server_lifetime` last asked about (see [`Server::outlived`]),
    /// with that lifetime: worked out once, not from its age at each borrow and return.
    retire_at: std::cell::Cell<Option<(Duration, Option<Instant>)>>,
    idle_since: Instant,
    /// This backend's place under its database's `max_db_connections`, if it has one.
    pub(crate) db_permit: Option<crate::pool::Place>,
    /// Its pool's RECONNECT generation when it was opened.
    pub(crate) generation: u64,
    /// The host of its database it is on (and its count there).
    pub(crate) host: Option<crate::pool::cluster::HostLease>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("id", &self.id)
            .field("pid", &self.process_id)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl Server {
    fn new(stream: Stream, host: &str, port: u16) -> Server {
        let now = Instant::now();
        Server {
            stream,
            cancel: Arc::new(CancelTarget::new(host, port, 0, 0)),
            read_buf: BytesMut::new(),
            read_idle_in: 0,
            replies: ReplyTracker::default(),
            statements: ServerStatements::new(1),
            id: ServerId::next(),
            process_id: 0,
            secret_key: 0,
            params: ServerParams::default(),
            applied: Vec::new(),
            settled_for: String::new(),
            settled: false,
            broken: false,
            notified: false,
            check_due: false,
            no_terminate: false,
            created: now,
            opened_secs: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            retire_at: std::cell::Cell::new(None),
            idle_since: now,
            db_permit: None,
            generation: 0,
            host: None,
        }
    }

    pub fn id(&self) -> ServerId {
        self.id
    }

    /// The backend's PostgreSQL process id (from BackendKeyData).
    pub fn process_id(&self) -> i32 {
        self.process_id
    }

    pub fn secret_key(&self) -> i32 {
        self.secret_key
    }

    pub fn params(&self) -> &ServerParams {
        &self.params
    }

    /// Records a ParameterStatus the backend sent.
    pub fn note_param(&mut self, name: &str, value: &str) {
        self.settled = false;
        // A setting pgshield applied that the server now reports otherwise (a rolled-back
        // transaction of a departed client reverted it, say): it carries what it reports,
        // still counted as applied (reset for a client that wants the default).
        if let Some(entry) = self
            .applied
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            value.clone_into(&mut entry.1);
        }
        self.params.set(name, value);
    }

    /// Whether this backend was found to match exactly these client settings, and has
    /// not changed since.
    pub fn settled_for(&self, settings: &str) -> bool {
        self.settled && self.settled_for == settings
    }

    /// This backend matches these client settings: nothing to apply, nothing to reset.
    pub fn note_settled(&mut self, settings: &str) {
        settings.clone_into(&mut self.settled_for);
        self.settled = true;
    }

    pub fn applied(&self) -> &[(String, String)] {
        &self.applied
    }

    /// The server's setting `name` is back to its default (RESET).
    pub fn forget_applied(&mut self, name: &str) {
        self.settled = false;
        self.applied.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    pub fn note_applied(&mut self, name: &str, value: &str) {
        self.settled = false;
        match self
            .applied
            .iter_mut()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            Some(entry) => value.clone_into(&mut entry.1),
            None => self.applied.push((name.to_owned(), value.to_owned())),
        }
    }

    /// Never lend this backend again.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// A notification came that no client holding this backend was seen to LISTEN for.
    pub fn note_notification(&mut self) {
        self.notified = true;
    }

    /// Whether a notification has come since the last reset (see `notified`).
    pub fn heard_notification(&self) -> bool {
        self.notified
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Close without a Terminate: the server's input may end mid-message, where a
    /// Terminate would be read as the rest of that message.
    pub fn skip_terminate(&mut self) {
        self.broken = true;
        self.no_terminate = true;
    }

    /// When it was opened (SHOW SERVERS' connect_time).
    pub fn opened_at(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(self.opened_secs)
    }

    /// When it was opened, in seconds since the Unix epoch.
    pub fn opened_secs(&self) -> u64 {
        self.opened_secs
    }

    pub fn age(&self) -> Duration {
        crate::epoch::instant().saturating_duration_since(self.created)
    }

    /// Whether it has lived `lifetime`, jittered for this backend (see
    /// [`crate::pool::jittered`]).
    pub fn outlived(&self, lifetime: Duration) -> bool {
        let at = match self.retire_at.get() {
            Some((asked, at)) if asked == lifetime => at,
            _ => {
                let at = self
                    .created
                    .checked_add(crate::pool::jittered(lifetime, self.id.0));
                self.retire_at.set(Some((lifetime, at)));
                at
            }
        };
        at.is_some_and(|at| crate::epoch::instant() >= at)
    }

    pub fn idle_for(&self) -> Duration {
        crate::epoch::instant().saturating_duration_since(self.idle_since)
    }

    pub fn mark_idle_now(&mut self) {
        self.idle_since = crate::epoch::instant();
    }

    /// True if the backend is at rest and can go back to the pool as it is.
    pub fn is_reusable(&self) -> bool {
        !self.broken
            && !self.cancel.was_sent()
            && self.replies.is_idle()
            && self.read_buf.is_empty()
    }

    /// A client's cancel request was sent to this backend (it must not be reused).
    pub fn cancel_was_sent(&self) -> bool {
        self.cancel.was_sent()
    }

    /// Where a client's cancel for this backend goes.
    pub fn cancel_target(&self) -> Arc<CancelTarget> {
        Arc::clone(&self.cancel)
    }

    /// Records the BackendKeyData the server sent at login.
    pub(super) fn set_key(&mut self, to: &connect::ServerTarget, process_id: i32, secret_key: i32) {
        self.process_id = process_id;
        self.secret_key = secret_key;
        let mut target = CancelTarget::new(&to.host, to.port, process_id, secret_key);
        // (The address connected to, not the name again: a name with several addresses,
        // a reader endpoint, would send the cancel to whichever it gives next.)
        target.connected_to(self.stream.tcp_peer_addr());
        if self.stream.is_tls() {
            target.encrypted_with(Arc::clone(&to.tls));
        }
        self.cancel = Arc::new(target);
    }

    /// Whether an idle backend has closed its end or sent something unasked (a FATAL).
    pub fn peer_closed_or_spoke(&self) -> bool {
        self.stream.peer_closed_or_spoke()
    }

    /// Runs `sql` as a simple query whose replies nobody else sees. Must be called at a
    /// boundary (nothing owed). The caller bounds it with a timeout.
    pub async fn run_internal(&mut self, sql: &str) -> Result<InternalReply, ServerError> {
        if !self.replies.at_boundary() || !self.read_buf.is_empty() {
            self.broken = true;
            return Err(ServerError::Protocol(
                "internal query on a busy backend".into(),
            ));
        }
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut out).map_err(ServerError::Io)?;
        if let Err(e) = self.stream.send(&out).await {
            self.broken = true;
            return Err(ServerError::Io(e));
        }
        self.replies.sent(b'Q');
        // A simple Query destroys the server's unnamed statement.
        self.statements.forget_unnamed();
        let out_of_step = |server: &mut Server, tag: u8| {
            server.broken = true;
            ServerError::Protocol(format!(
                "unexpected message type '{}' in reply to an internal query",
                char::from(tag)
            ))
        };
        let mut reply = InternalReply::default();
        loop {
            let (tag, body) = match read_message(
                &mut self.stream,
                &mut self.read_buf,
                MAX_INTERNAL_REPLY,
            )
            .await
            {
                Ok(m) => m,
                Err(e) => {
                    self.broken = true;
                    return Err(ServerError::from_read(e));
                }
            };
            if self.replies.received(tag, body.first().copied()).is_err() {
                return Err(out_of_step(self, tag));
            }
            match tag {
                b'Z' => break,
                b'S' => {
                    if let Some((name, value)) = parse_parameter_status(&body) {
                        self.note_param(name, value);
                        reply
                            .param_changes
                            .push((name.to_owned(), value.to_owned()));
                    }
                }
                b'E' => {
                    let err = ErrorResponse::parse(&body).unwrap_or_else(|| {
                        ErrorResponse::error("XX000", "unparseable error from the server")
                    });
                    if err.severity.is_fatal() {
                        self.broken = true;
                    }
                    reply.error = Some(err);
                }
                b'D' if reply.rows.len() < MAX_INTERNAL_ROWS => {
                    if let Some(row) = parse_data_row(&body) {
                        reply.rows.push(row);
                    }
                }
                // Completions and notices of our own queries are nobody's business.
                b'T' | b'D' | b'C' | b'I' | b'N' => {}
                // A notification: the backend listens on a channel (a client's, to be
                // reset; or one no statement showed). Not lent again unreset.
                b'A' => self.notified = true,
                other => return Err(out_of_step(self, other)),
            }
        }
        Ok(reply)
    }

    /// Sends `pending` (what is left to write of pgshield's own hidden queries) and reads
    /// the replies of every hidden query still owed: the backend is then at a boundary,
    /// for a departing client's cleanup. The caller bounds it with a timeout.
    pub async fn finish_hidden(&mut self, pending: &[u8]) -> Result<(), ServerError> {
        if !self.replies.is_idle_but_hidden() {
            self.broken = true;
            return Err(ServerError::Protocol("not only hidden queries owed".into()));
        }
        if let Err(e) = self.stream.send(pending).await {
            self.broken = true;
            return Err(ServerError::Io(e));
        }
        while !self.replies.at_boundary() {
            self.read_owed_reply("a hidden query").await?;
        }
        Ok(())
    }

    /// Reads one reply nobody is to see (in answer to `what`): matched with what is
    /// owed, a ParameterStatus noted. Any failure marks the backend broken.
    async fn read_owed_reply(&mut self, what: &str) -> Result<(), ServerError> {
        let read = read_message(&mut self.stream, &mut self.read_buf, MAX_INTERNAL_REPLY);
        let (tag, body) = match read.await {
            Ok(m) => m,
            Err(e) => {
                self.broken = true;
                return Err(ServerError::from_read(e));
            }
        };
        if self.replies.received(tag, body.first().copied()).is_err() {
            self.broken = true;
            return Err(ServerError::Protocol(format!(
                "unexpected message type '{}' in reply to {what}",
                char::from(tag)
            )));
        }
        self.notified |= tag == b'A';
        if tag == b'S' {
            if let Some((name, value)) = parse_parameter_status(&body) {
                self.note_param(name, value);
            }
        }
        Ok(())
    }

    /// Runs a departed client's messages to their end, as PostgreSQL runs what a client
    /// sent before it went away: sends `pending` (whole messages), a Sync if the server
    /// skips to one after an error, and reads and drops every reply still owed. The
    /// backend is then at a boundary: rolled back, it can be lent again, and until then it
    /// keeps its place in the pool (the statement still runs on the server). The caller
    /// bounds it with a timeout.
    pub async fn drain_departed(&mut self, pending: &[u8]) -> Result<(), ServerError> {
        let Some(needs_sync) = self.replies.departure_drainable() else {
            self.broken = true;
            return Err(ServerError::Protocol(
                "replies that cannot be drained".into(),
            ));
        };
        let mut out = BytesMut::from(pending);
        if needs_sync {
            out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
            self.replies.sent_with(b'S', state::Hide::All, None);
        }
        if let Err(e) = self.stream.send(&out).await {
            self.broken = true;
            return Err(ServerError::Io(e));
        }
        let mut dropped = BytesMut::new();
        loop {
            // (Replies pgshield gave itself, due in their place: nobody to give them to.)
            self.replies.write_due_fakes(&mut dropped);
            dropped.clear();
            if self.replies.at_boundary() {
                return Ok(());
            }
            if self.replies.departure_drainable().is_none() {
                // A COPY FROM STDIN began (nobody will send its data), or the replies
                // cannot be matched any more: no boundary is coming.
                self.broken = true;
                return Err(ServerError::Protocol("a departed client's COPY".into()));
            }
            self.read_owed_reply("a departed client").await?;
            // What a failed or skipped message leaves of the backend's statements (the
            // client's names went with it).
            if self.replies.has_takebacks() {
                let mut nobody = crate::prepared::ClientStatements::default();
                for undo in self.replies.take_undone().into_iter().rev() {
                    nobody.undo(&mut self.statements, undo);
                }
                for (drop, happened) in self.replies.take_drops() {
                    if happened {
                        self.statements.dropping(&drop);
                    } else {
                        self.broken = true;
                    }
                }
            }
        }
    }

    /// Returns the backend to a clean session: ROLLBACK if a transaction is open, then
    /// DISCARD ALL. Any failure means the backend must be closed instead.
    pub async fn reset(&mut self) -> Result<(), ServerError> {
        self.rollback().await?;
        self.run_internal_ok("DISCARD ALL").await?;
        // (DISCARD ALL includes UNLISTEN *.)
        self.notified = false;
        self.settled = false;
        self.applied.clear();
        self.statements.clear();
        self.replies.forget_statement_doubt();
        Ok(())
    }

    /// Ends a transaction a departing client left open, if it did.
    pub async fn rollback(&mut self) -> Result<(), ServerError> {
        if self.replies.tx_status() != TxStatus::Idle {
            self.run_internal_ok("ROLLBACK").await?;
        }
        Ok(())
    }

    async fn run_internal_ok(&mut self, sql: &str) -> Result<(), ServerError> {
        match self.run_internal(sql).await?.error {
            None => Ok(()),
            Some(err) => {
                self.broken = true;
                Err(ServerError::Query(err))
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Say goodbye so the server does not log an unexpected EOF (at once, where it can
        // be written without waiting).
        let tls = self.stream.is_tls();
        if !self.no_terminate && !tls {
            self.stream.try_write_now(&TERMINATE);
        }
        // A place under max_db_connections is given back only once the server process is
        // gone: until it exits, PostgreSQL counts it against max_connections, and a backend
        // opened in its place at once could be refused. (Not for a broken backend, whose
        // server may never answer again.)
        let place = self.db_permit.take().filter(|_| !self.broken);
        let goodbye_later = tls && !self.no_terminate;
        if place.is_none() && !goodbye_later {
            return;
        }
        // A TLS record cannot be written without waiting: a task does it, and waits for the
        // server to go, briefly, if there is a runtime to run it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some(place) = &place {
            place.returning();
        }
        let mut stream = std::mem::replace(&mut self.stream, Stream::Detached);
        runtime.spawn(async move {
            let goodbye = async {
                if goodbye_later {
                    stream.send(&TERMINATE).await?;
                }
                tokio::io::AsyncWriteExt::shutdown(&mut stream).await?;
                if place.is_some() {
                    // The server closes its end as its process exits.
                    let mut rest = [0u8; 512];
                    while tokio::io::AsyncReadExt::read(&mut stream, &mut rest).await? > 0 {}
                }
                std::io::Result::Ok(())
            };
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, goodbye).await;
            // Closed first, then the place given back.
            drop(stream);
            drop(place);
        });
    }
}

/// How long a closing backend gets to take its Terminate (and, when it holds a place
/// under max_db_connections, to exit).
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// The column values of a DataRow (None for NULL), as text (bytes UTF-8 lacks replaced);
/// None if malformed.
pub fn parse_data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    data_row(body, |v| String::from_utf8_lossy(v).into_owned())
}

/// The column values of a DataRow as sent, in the client's encoding; None if malformed.
pub fn parse_data_row_raw(body: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
    data_row(body, <[u8]>::to_vec)
}

fn data_row<T>(mut body: &[u8], value: impl Fn(&[u8]) -> T) -> Option<Vec<Option<T>>> {
    if body.len() < 2 {
        return None;
    }
    let count = body.get_i16();
    let mut values = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count {
        if body.len() < 4 {
            return None;
        }
        let len = body.get_i32();
        if len < 0 {
            values.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return None;
        }
        values.push(Some(value(&body[..len])));
        body.advance(len);
    }
    Some(values)
}

impl ServerError {
    fn from_read(e: ReadError) -> ServerError {
        match e {
            ReadError::Io(e) => ServerError::Io(e),
            ReadError::Closed => ServerError::Closed,
            ReadError::Frame(f) => ServerError::Protocol(f.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backend_outlives_the_lifetime_asked_about_now() {
        let (pipe, _other) = tokio::io::duplex(64);
        let server = Server::new(Stream::Memory(pipe), "127.0.0.1", 5432);
        let hour = Duration::from_secs(3600);
        assert!(!server.outlived(hour));
        assert!(!server.outlived(hour), "the same, remembered");
        // A reload that shortens server_lifetime applies to backends already open.
        assert!(server.outlived(Duration::ZERO));
        std::thread::sleep(Duration::from_millis(30));
        assert!(server.outlived(Duration::from_millis(10)), "±20 % of 10 ms");
        assert!(!server.outlived(hour));
        assert!(!server.outlived(Duration::MAX), "beyond the clock: never");
    }

    #[test]
    fn booleans_read_as_postgresql_reads_them() {
        for off in ["off", "OFF", "of", "false", "f", "FAL", "no", "n", "0"] {
            assert_eq!(pg_bool(off), Some(false), "{off}");
        }
        for on in ["on", "true", "T", "yes", "y", "1"] {
            assert_eq!(pg_bool(on), Some(true), "{on}");
        }
        for neither in ["", "o", "offf", "truex", "2", "00", " off"] {
            assert_eq!(pg_bool(neither), None, "{neither:?}");
        }
        let quotes = |value: &'static str| {
            fingerprint(|name| (name == "standard_conforming_strings").then_some(value))
                & BACKSLASH_QUOTES
        };
        assert_ne!(quotes("false"), 0);
        assert_eq!(quotes("on"), 0);
    }

    #[test]
    fn a_client_view_keeps_only_what_differs_from_its_pool() {
        let mut base = ServerParams::default();
        base.set("TimeZone", "UTC");
        base.set("DateStyle", "ISO, MDY");
        let mut view = ClientView::new(Arc::new(base));
        view.set("TimeZone", "UTC");
        assert!(
            view.own.is_none(),
            "the same value as the pool's costs nothing"
        );
        assert_eq!(view.get("timezone"), Some("UTC"));
        view.set("TimeZone", "Europe/Paris");
        assert_eq!(view.get("TimeZone"), Some("Europe/Paris"));
        // Back to the pool's value: still answered from the client's own copy.
        view.set("TimeZone", "UTC");
        assert_eq!(view.get("TimeZone"), Some("UTC"));
        view.set("application_name", "app");
        assert_eq!(view.get("application_name"), Some("app"));
        assert_eq!(view.get("DateStyle"), Some("ISO, MDY"));
        assert_eq!(view.get("nonexistent"), None);
    }

    #[test]
    fn a_views_parse_environment_follows_its_values_not_how_it_got_them() {
        let mut base = ServerParams::default();
        base.set("client_encoding", "UTF8");
        base.set("TimeZone", "UTC");
        let base = Arc::new(base);
        let fresh = ClientView::new(Arc::clone(&base));
        assert_eq!(fresh.parse_env(), fingerprint(|name| base.get(name)));
        // The pool's value cached once is the same for the next client.
        assert_eq!(
            ClientView::new(Arc::clone(&base)).parse_env(),
            fresh.parse_env()
        );
        let mut view = ClientView::new(Arc::clone(&base));
        view.set("application_name", "app");
        assert_eq!(view.parse_env(), fresh.parse_env(), "not a parse setting");
        view.set("TimeZone", "Asia/Tokyo");
        assert_ne!(view.parse_env(), fresh.parse_env());
        view.set("TimeZone", "UTC");
        assert_eq!(view.parse_env(), fresh.parse_env());
        view.set("client_encoding", "SJIS");
        assert!(view.ascii_trails());
        assert!(!fresh.ascii_trails());
        // Values changed after a fingerprint was cached are fingerprinted afresh.
        let mut changed = (*base).clone();
        changed.set("client_encoding", "SJIS");
        assert_eq!(
            ClientView::new(Arc::new(changed)).parse_env(),
            view.parse_env()
        );
        // Equal values are equal whether or not a fingerprint was cached (reloads compare
        // a pool's welcome values).
        let mut uncached = ServerParams::default();
        uncached.set("client_encoding", "UTF8");
        uncached.set("TimeZone", "UTC");
        assert_eq!(*base, uncached, "the cache is not compared");
    }
}
