//! The session loop: relays protocol messages between one client and the backend it holds.
//!
//! It is server-driven: one `poll` waits on the client socket, the backend socket and both
//! pending writes at once, so replies flow as the server produces them (Flush works,
//! pipelines of any depth work, and neither side can deadlock the other by filling a
//! socket buffer). Messages are framed but not decoded, except the few whose content
//! matters (ReadyForQuery, ParameterStatus, ErrorResponse; in transaction mode also the
//! client's Query, Parse, Bind, Describe and Close, and the rows of pgshield's own settings
//! read-back); everything else, however large, streams through in pieces.
//!
//! When the client holds a backend is the pool mode's business. In session mode it
//! borrows on its first message that needs the database and keeps the backend until it
//! leaves; then the backend is reset (ROLLBACK if needed, DISCARD ALL) and returned, or
//! closed if it was left mid-reply. In transaction mode it borrows on the first message
//! of a transaction and gives the backend back as soon as it is idle (`release_if_done`);
//! statement names are translated by `prepared.rs`, and what statements do to the session
//! (settings to follow, state that pins) is learnt from `sql.rs` and from the server.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;

use super::access::Admission;
use super::cancel::Registration;
use super::handshake::Login;
use super::params::{self, ClientSettings};
use super::registry::{NewClient, Registered};
use super::ClientId;
use crate::config::PoolMode;
use crate::net::Stream;
use crate::pool::{Backend, Pool, PoolClient, PoolStats};
use postgres_protocol::escape::escape_literal;

use crate::client::sql::{self, Effects, PinReason};
use crate::config::OnSessionState;
use crate::prepared::{ClientStatements, Registry, Shape, StatementDrop, Translation, NAME_PREFIX};
use crate::protocol::frame::{peek_header, Header, DEFAULT_MAX_MESSAGE_SIZE, HEADER_LEN};
use crate::protocol::{messages, sqlstate, ErrorResponse};
use crate::proxy::Shared;
use crate::server::state::{Disposition, Hide, TxStatus};
use crate::server::{parse_parameter_status, ClientView, Server, ServerError};
use crate::shutdown::{Stage, Watch};

/// Stop reading from one side while this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;

/// The most replies a backend may owe a client before pgshield stops reading it (each
/// is a small entry in the reply tracker; a pipeline of thousands still flows).
const MAX_OWED: usize = 4096;
/// Read at least this much at a time.
/// While queued for a backend, read at most this much ahead from the client.
const QUEUED_READ_LIMIT: usize = 1024 * 1024;
/// A Bind's portal and statement names must arrive within this many bytes.
const MAX_BIND_NAMES: usize = 64 * 1024;
/// Limit for pgshield's own queries on a backend (settings, reset).
const INTERNAL_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a departing client gets to take its last bytes.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client sent Terminate.
    Terminated,
    /// The client's socket closed or failed.
    ClientGone,
    /// The client broke the protocol.
    ClientProtocol(String),
    /// The backend closed or failed.
    ServerLost(Option<io::Error>),
    /// The backend broke the protocol.
    ServerProtocol(String),
    /// Close the client with this error (e.g. a startup setting the server refused).
    Fatal(ErrorResponse),
    IdleTimeout,
    IdleInTransaction,
    Shutdown,
    ForcedShutdown,
    /// KILL or KILL_CLIENT from the admin console.
    Killed,
    /// A statement cancelled for query_timeout, with not a byte from the server for
    /// [`QUERY_CANCEL_GRACE`] since: the cancel never reached it (a network cut, say).
    StatementStuck,
    /// A statement cancelled for query_timeout whose client has read nothing of its
    /// result for [`MAX_UNREAD_LOOKS`] graces.
    ResultUnread,
}

/// Where a statement's query_timeout cancel stands: not sent ([`Cancelled::NO`]); sent,
/// and the server has said something since the last look ([`Cancelled::HEARD`]); or sent,
/// and not a byte from the server since the last look, with how many looks in a row found
/// pgshield reading no more of it for a client that does not read ([`Cancelled::silent`]).
/// (One byte: the session's size counts.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cancelled(u8);

impl Cancelled {
    const NO: Cancelled = Cancelled(0);
    const HEARD: Cancelled = Cancelled(1);

    fn silent(unread_looks: u8) -> Cancelled {
        Cancelled(unread_looks.saturating_add(2))
    }

    /// Silent, and how many looks found the result unread.
    fn unread_looks(self) -> Option<u8> {
        self.0.checked_sub(2)
    }
}

/// Looks ([`QUERY_CANCEL_GRACE`] apart) in a row that find a cancelled statement's
/// client reading none of its result before the client is ended: the server, blocked
/// writing it, cannot act on the cancel meanwhile, and holds its backend.
const MAX_UNREAD_LOOKS: u8 = 12;

impl End {
    /// A few words for the log line that says how the session ended.
    fn reason(&self) -> &'static str {
        match self {
            End::Terminated => "client terminated",
            End::ClientGone => "client closed the connection",
            End::ClientProtocol(_) => "client protocol violation",
            End::ServerLost(_) => "server connection lost",
            End::ServerProtocol(_) => "server protocol violation",
            End::Fatal(_) => "fatal error",
            End::IdleTimeout => "idle_client_timeout",
            End::IdleInTransaction => "idle_transaction_timeout",
            End::Shutdown => "shutdown",
            End::ForcedShutdown => "forced shutdown",
            End::Killed => "killed from the admin console",
            End::StatementStuck => "statement still running after its query_timeout cancel",
            End::ResultUnread => "client reads nothing of a statement cancelled for query_timeout",
        }
    }
}

/// What [`Session::take_idle_backend`] did.
enum Taken {
    /// The client holds a backend.
    Held,
    /// A backend was lent; the client's settings are yet to be applied to it. (Boxed:
    /// this value is in the relay loop's future, which is most of an idle session.)
    Settle(Box<Backend>),
    /// A backend was lent without the health check it was due: to be checked as a
    /// borrow is waited for (watching the client), and replaced if it fails.
    Check(Box<Backend>),
    /// None was lent at once: borrow one, waiting if need be.
    Borrow,
}

/// What is left of a borrow that was not lent at once ([`Session::finish_taking`]).
type BorrowLeft<'a> =
    dyn std::future::Future<Output = Result<Result<(), ErrorResponse>, End>> + Send + 'a;

/// What [`Session::answer_deallocate`] did with a Query.
enum Deallocation {
    /// Answered from the client's names.
    Answered,
    /// It waits for the replies owed before it.
    Wait,
    /// The server is to answer it.
    PassOn,
}

/// What [`Session::pass_at_once`] did with what the client sent.
#[derive(PartialEq)]
enum Short {
    /// Passed on, as the general path would have passed it.
    Passed,
    /// Nothing: the general path takes it.
    General,
    /// Nothing yet: a request the short path passes once the client holds a backend, and
    /// none was lent at once ([`Session::borrow_for_short_path`]).
    Borrow,
}

/// What happened on the sockets.
enum Event {
    /// Bytes arrived from the client, the backend, or both.
    Data,
    ClientEof,
    ClientError(io::Error),
    ServerEof,
    ServerError(io::Error),
    /// pgshield is draining and the client is between transactions.
    Drain,
    /// pgshield is closing every client now.
    Forced,
    /// The admin console killed this client.
    Killed,
    /// A reload changed the limits (`Session::limits` holds the new ones).
    Reloaded,
    /// All the client sent is written to a backend that owes it nothing.
    Flushed,
}

/// The session's time limits (None: no limit). One copy per reload, shared by every
/// session (see `Shared::session_limits`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    idle_client: Option<Duration>,
    idle_transaction: Option<Duration>,
    query: Option<Duration>,
    queue_notice: Option<Duration>,
    max_message_size: usize,
    /// `pool.max_client_prepared_statements` (no limit: `usize::MAX`).
    max_statements: usize,
    /// `log.connections`: a line when the session ends.
    log_connections: bool,
    /// The reload count they were read at (a reload changes them for every session).
    reloads: u64,
}

impl Limits {
    fn now_in_force(shared: &Shared) -> Arc<Limits> {
        let reloads = shared.reloads.load(std::sync::atomic::Ordering::Acquire);
        let mut cached = shared
            .session_limits
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(limits) = cached.as_ref().filter(|l| l.reloads == reloads) {
            return Arc::clone(limits);
        }
        let live = shared.live();
        let pool = &live.config.pool;
        let limit = |d: Duration| (!d.is_zero()).then_some(d);
        let limits = Arc::new(Limits {
            idle_client: limit(pool.idle_client_timeout),
            idle_transaction: limit(pool.idle_transaction_timeout),
            query: limit(pool.query_timeout),
            queue_notice: limit(pool.queue_notice_after),
            max_message_size: live.config.listen.max_message_size,
            max_statements: match pool.max_client_prepared_statements {
                0 => usize::MAX,
                n => n,
            },
            log_connections: live.config.log.connections,
            reloads,
        });
        *cached = Some(Arc::clone(&limits));
        limits
    }

    /// The limits again if a reload happened since they were read.
    fn reloaded(&self, shared: &Shared) -> Option<Arc<Limits>> {
        (shared.reloads.load(std::sync::atomic::Ordering::Relaxed) != self.reloads)
            .then(|| Limits::now_in_force(shared))
    }

    fn any(&self) -> bool {
        self.idle_client.is_some() || self.idle_transaction.is_some() || self.query.is_some()
    }

    /// Whether a limit counts from the client's last activity (which is then recorded).
    fn watch_activity(&self) -> bool {
        self.idle_client.is_some() || self.idle_transaction.is_some()
    }
}

/// Settings a client's statements may have changed (transaction mode).
#[derive(Debug, Default)]
struct Dirty {
    names: Vec<String>,
    /// RESET ALL, DISCARD ALL: every setting pgshield knows of.
    all: bool,
    /// When `names` is next rid of repeats (a transaction of endless `SET`s would grow it
    /// without bound).
    dedup_at: usize,
    /// Of `names`, those a statement reset (RESET, `SET … TO DEFAULT`; with `all`, every
    /// one): an empty custom setting read back is a reset of it only then, not a value of
    /// `''` the client set.
    reset: Vec<String>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.names.is_empty() && !self.all
    }

    /// Adds what a statement may change.
    fn note(&mut self, effects: &Effects) {
        self.add(effects.all_settings, &effects.settings);
        if effects.resets && !effects.reset_settings.is_empty() {
            self.reset.extend(effects.reset_settings.iter().cloned());
            if self.reset.len() > 64 {
                crate::client::sql::dedup_names(&mut self.reset);
            }
        }
    }

    /// Adds what a statement resets.
    fn note_resets(&mut self, effects: &Effects) {
        self.add(effects.all_settings, &effects.reset_settings);
    }

    fn add(&mut self, all: bool, names: &[String]) {
        self.all |= all;
        self.names.extend(names.iter().cloned());
        if self.names.len() > self.dedup_at.max(64) {
            crate::client::sql::dedup_names(&mut self.names);
            self.dedup_at = 2 * self.names.len();
        }
    }

    /// Whether `name` is among them.
    fn has(&self, name: &str) -> bool {
        self.all || self.names.iter().any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Settings the client may have changed since they were last read back, and the
/// read-backs sent and not yet answered (oldest first).
#[derive(Debug, Default)]
struct FollowUp {
    dirty: Dirty,
    readbacks: VecDeque<Readback>,
    /// Settings a client that keeps its backend (pinned, session mode) reset: its startup
    /// values of them are given back once the backend is next idle
    /// ([`params::restore_statement`]).
    restore: Dirty,
    /// Session mode, restore due: the client parsed an unnamed statement since its reset.
    unnamed_parsed: bool,
    /// A `DEALLOCATE` of the client's own waits for the replies owed before it (see
    /// [`Session::answer_deallocate`]): here, as few clients ever pipeline one.
    deallocate_waits: bool,
    /// The client closed its connection while messages it sent before were held (see
    /// `Session::client_held`): they go on, as PostgreSQL runs what a client sent before
    /// it left, and what they are answered is dropped. (Here, as it is rare.)
    client_gone: Option<Instant>,
    /// A fingerprint of the client's own `search_path` (0: none), part of its parse
    /// environment ([`Session::parse_env`]): kept here when its settings change, not looked
    /// up for every message; here, not in the session, as few clients have one (an idle
    /// client's task is the session).
    search_path_env: u64,
    /// The client ran LISTEN (transaction mode): notifications on its backend are its.
    /// (Here, as few clients do.)
    listens: bool,
}

/// Keeps `value` as the client's [`FollowUp::search_path_env`] (making the follow-up only
/// for a value other than none).
fn keep_search_path_env(follow_up: &mut Option<Box<FollowUp>>, value: u64) {
    match follow_up {
        Some(f) => f.search_path_env = value,
        None if value != 0 => {
            follow_up
                .get_or_insert_with(Default::default)
                .search_path_env = value;
        }
        None => {}
    }
}

/// A hidden `SELECT current_setting(…)` sent to learn what the client's settings became;
/// with no names, a hidden statement giving back startup settings after a reset
/// ([`params::restore_statement`]), whose rows say nothing.
#[derive(Debug)]
struct Readback {
    names: Vec<String>,
    /// In the client's encoding.
    values: Option<Vec<Option<Vec<u8>>>>,
    /// It gives back the role the client started as: if it fails, the client is ended
    /// rather than left running as the login's role.
    role: bool,
}

/// What the statement giving back startup settings after a reset (`effects`) gives back
/// right behind it (the settings reset, and whether the role), if it may go there: sent
/// when the backend was idle (`idle`), and controlling neither the transaction nor a
/// COPY, the reset ends outside a transaction with nothing else under way (as Npgsql's
/// pool reset, which it pipelines with the next command). Otherwise it waits until the
/// backend is next idle (`FollowUp::restore`).
fn restore_after(effects: &Effects, idle: bool) -> Option<(Dirty, bool)> {
    (effects.resets && idle && !effects.control).then(|| {
        let mut reset = Dirty::default();
        reset.note_resets(effects);
        (reset, restores_role(effects))
    })
}

/// What [`push_restore`] gives back: whether a setting statements depend on (see
/// [`crate::server::shapes_statements`]) is among them, and which of the [`unsettled`]
/// flags.
#[derive(Debug, Clone, Copy)]
struct Restored {
    parse: bool,
    flags: u64,
}

/// Takes back the client's messages that the server will skip after an error it reported
/// (see `ReplyTracker::take_undone`).
fn take_back_undone(statements: &mut ClientStatements, server: &mut crate::server::Server) {
    if server.replies.has_takebacks() {
        for undo in server.replies.take_undone().into_iter().rev() {
            statements.undo(&mut server.statements, undo);
        }
    }
}

/// Sends, hidden, the statement giving back the `client`'s startup values of the
/// settings a reset touched (`reset`) that have no session value on the server
/// ([`params::restore_statement`]), and, with `role`, the one giving back its startup
/// role ([`params::restore_role_statement`]); `None` if there are none.
fn push_restore(
    (settings, client_view): (&ClientSettings, &ClientView),
    (reset, role): (&Dirty, bool),
    server: &mut Server,
    server_out: &mut BytesMut,
    follow_up: &mut Option<Box<FollowUp>>,
) -> Option<Restored> {
    // (Startup values are in the server's encoding: see `ClientSettings::as_given`.)
    let encoding = client_view.get("server_encoding").unwrap_or("UTF8");
    let startup_role = settings
        .given("role")
        .map(|role| params::restore_role_statement(role, encoding))
        .filter(|_| role);
    let touched = settings.startup().filter(|(name, _)| reset.has(name));
    let restored = Restored {
        parse: touched
            .clone()
            .any(|(name, _)| crate::server::shapes_statements(name)),
        flags: unsettled_flags(false, touched.clone().map(|(name, _)| name)),
    };
    let statements = [
        params::restore_statement(touched, encoding).map(|sql| (sql, false)),
        startup_role.map(|sql| (sql, true)),
    ];
    let mut sent = false;
    for (sql, role) in statements.into_iter().flatten() {
        if postgres_protocol::message::frontend::query(&sql, server_out).is_err() {
            continue;
        }
        server.replies.sent_with(b'Q', Hide::All, None);
        server.statements.forget_unnamed();
        follow_up
            .get_or_insert_with(Default::default)
            .readbacks
            .push_back(Readback {
                names: Vec::new(),
                values: None,
                role,
            });
        sent = true;
    }
    sent.then_some(restored)
}

/// Whether the role the client started as is to be given back right behind `effects`:
/// a statement of its own that reset it (a reset followed by, or rolled back with, other
/// statements in the same text may leave the role as the client chose it).
fn restores_role(effects: &Effects) -> bool {
    effects.statements == 1 && effects.reset_settings.iter().any(|n| n == "role")
}

/// `parse_env_unsettled` once a statement that may change parse settings is sent (with
/// `flags`, [`ENCODING_UNSETTLED`] and [`QUOTES_UNSETTLED`], saying which of them it may
/// be): a private environment of its own.
fn unsettled(was: u64, flags: u64) -> u64 {
    const FLAGS: u64 = ENCODING_UNSETTLED | QUOTES_UNSETTLED;
    (private_env() & !FLAGS) | (was & FLAGS) | (flags & FLAGS)
}

/// A value no other session's environment will have (process-wide, never 0).
fn private_env() -> u64 {
    static PRIVATE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    PRIVATE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The [`unsettled`] flags of a change: the client's encoding, `standard_conforming_strings`
/// (`all`: any setting).
fn unsettled_flags(all: bool, names: impl Iterator<Item = impl AsRef<str>>) -> u64 {
    if all {
        return ENCODING_UNSETTLED | QUOTES_UNSETTLED;
    }
    names.fold(0, |flags, name| {
        let name = name.as_ref();
        flags
            | if name.eq_ignore_ascii_case("client_encoding") {
                ENCODING_UNSETTLED
            } else if name.eq_ignore_ascii_case("standard_conforming_strings") {
                QUOTES_UNSETTLED
            } else {
                0
            }
    })
}

/// Whether `effects`, a reset, leaves the settings statements are read under as they
/// are now (see [`crate::server::shapes_statements`]): it sets none of them itself, and
/// the client's value of each (`settings`) is the one it started with (none given: the
/// server's, which it never changed), to which a reset returns; unless the startup values
/// are given back right behind it (`restored`), only the server's defaults, so none of
/// those may have been given at startup.
fn reset_keeps_parse_env(settings: &ClientSettings, effects: &Effects, restored: bool) -> bool {
    // (Not vouched for: a setter the screen could not read, or lists of names rid of
    // their repeats, and with them of the counts below.)
    if effects.local_parse_setting
        || effects.local_encoding
        || effects.local_quotes
        || effects.pin.is_some()
        || effects.names_deduped
    {
        return false;
    }
    let count = |names: &[String], name: &str| {
        names
            .iter()
            .filter(|n| n.eq_ignore_ascii_case(name))
            .count()
    };
    // (A name set more often than reset may be set last.)
    let sets_one = effects.settings.iter().any(|name| {
        crate::server::shapes_statements(name)
            && count(&effects.settings, name) > count(&effects.reset_settings, name)
    });
    if sets_one {
        return false;
    }
    crate::server::PARSE_SETTINGS
        .iter()
        .chain(std::iter::once(&"search_path"))
        .all(|name| {
            let given = settings.given(name);
            settings.get(name) == given && (restored || given.is_none())
        })
}

/// Whether a client's startup `search_path` puts the temporary schema first (see
/// [`Session::pin_at_login`], [`sql::path_puts_temp_schema_first`]).
fn starts_in_temp_schema(settings: &ClientSettings) -> bool {
    settings
        .get("search_path")
        .is_some_and(sql::path_puts_temp_schema_first)
}

/// The refusal of a login that would pin at once in a pool that refuses to pin
/// (`on_session_state = "reject"`): a startup `search_path` putting `pg_temp` first.
pub(super) fn refuses_at_login(pool: &Pool, settings: &ClientSettings) -> Option<ErrorResponse> {
    if pool.mode() != PoolMode::Transaction
        || pool.on_session_state() != OnSessionState::Reject
        || !starts_in_temp_schema(settings)
    {
        return None;
    }
    Some(
        ErrorResponse::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!(
                "pgshield: a search_path putting pg_temp first ({}) would tie this client to one \
                 server connection, which pool.on_session_state = \"reject\" does not allow",
                PinReason::TempTable.feature()
            ),
        )
        .with_hint("Use session mode, or pool.on_session_state = \"pin\"."),
    )
}

/// [`FollowUp::search_path_env`] for these settings.
fn search_path_env(settings: &ClientSettings) -> u64 {
    settings.get("search_path").map_or(0, |path| {
        use std::hash::{Hash, Hasher};
        // (std's SipHash with fixed keys: the same in every client of the process.)
        let mut hasher = std::hash::DefaultHasher::new();
        path.hash(&mut hasher);
        hasher.finish().max(1)
    })
}

/// How long the server may stay silent after a statement's `query_timeout` cancel before
/// the client is closed, and its backend (the cancel may not have reached the server).
const QUERY_CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How long a forced shutdown, or KILL, waits for the cancel of a running statement.
const FORCED_CANCEL_TIMEOUT: Duration = Duration::from_secs(2);

/// Session mode: the longest Query looked at for a reset of settings (longer ones stream
/// through unread).
const RESET_SCAN_LIMIT: usize = 8 * 1024;

/// In `Session::parse_env_unsettled`: a statement sent may have changed the encoding.
const ENCODING_UNSETTLED: u64 = 1 << 63;

/// In `Session::parse_env_unsettled`: a statement sent may have changed what a backslash
/// in a string means (`standard_conforming_strings`).
const QUOTES_UNSETTLED: u64 = 1 << 62;

/// The rest of a message being passed along (or dropped) in pieces.
#[derive(Debug, Default, Clone, Copy)]
struct Passing {
    left: usize,
    forward: bool,
}

impl Passing {
    /// Moves what has arrived of the message from `from` to `to` (or drops it).
    /// Returns false when nothing of it has arrived yet.
    fn pass(&mut self, from: &mut BytesMut, to: &mut BytesMut) -> bool {
        let n = self.left.min(from.len());
        if n == 0 {
            return false;
        }
        if self.forward {
            to.extend_from_slice(&from[..n]);
        }
        from.advance(n);
        self.left -= n;
        true
    }
}

/// A ReadyForQuery passed on to the client (see [`Session::note_ready`]).
#[derive(Clone, Copy)]
struct ReadySeen {
    /// It said the backend is outside a transaction block.
    idle: bool,
    /// More of the client's is owed behind it: its next request has started.
    pipelined: bool,
}

pub struct Session {
    shared: Arc<Shared>,
    id: ClientId,
    client: Stream,
    pool: Arc<Pool>,
    settings: ClientSettings,
    /// When the client holds a backend.
    mode: PoolMode,
    /// The client's prepared statements, by its own names (transaction mode).
    statements: ClientStatements,
    /// Transaction mode: why the client keeps its backend until it leaves, if it does.
    pinned: Option<PinReason>,
    /// What the client's statements may have changed and the read-backs under way, made
    /// when first needed (most clients never SET anything) and freed when done.
    follow_up: Option<Box<FollowUp>>,
    /// Since when the server has been working for the client (for query_timeout).
    busy_since: Option<Instant>,
    /// query_timeout already cancelled the statement running now.
    statement_cancelled: Cancelled,
    /// The client's cancel key; points at the backend it holds.
    cancel: Registration,
    /// The ParameterStatus values the client has been told.
    client_view: ClientView,
    /// Statements sent since the backend was borrowed that may have changed a setting
    /// statements are read under (a `SET TimeZone`), which `client_view` shows only once
    /// the server reports it: while any, the client's statements are its own, a new
    /// environment at each (`parse_env`).
    /// (The top bit: one of them may have changed the client's encoding.)
    parse_env_unsettled: u64,
    /// Boxed: an idle client holds only the empty pointer, not room for a whole guard.
    backend: Option<Box<Backend>>,
    /// Bytes from the client not yet processed.
    client_in: BytesMut,
    /// The epoch in which the client's socket was last found with nothing to read
    /// (see `epoch.rs`), 0 if it was not, or if tokio refused that read for the task's
    /// budget. Not 0: the task's waker is set with the socket, and until the socket
    /// turns readable (which wakes the task) a read in a later poll could only say the
    /// same. (A transaction's reply wakes the task through the backend's socket: the
    /// client's is not asked again then.)
    client_idle_in: u64,
    /// Bytes for the client not yet written.
    client_out: BytesMut,
    /// Bytes for the backend not yet written.
    server_out: BytesMut,
    client_msg: Passing,
    server_msg: Passing,
    /// After an error pgshield reported in the extended protocol: drop until Sync.
    skip_until_sync: bool,
    /// The backend sent a FATAL error (the client has it; no need to add ours).
    server_sent_fatal: bool,
    /// Transaction mode: a FATAL the backend sent that the client has not been given,
    /// since the session may carry on on another backend (see `carry_on`).
    server_fatal: Option<Box<ErrorResponse>>,
    /// Its backend was lost inside a transaction block: the client is told its
    /// transaction failed, and the next backend it gets starts in a failed transaction
    /// until the client ends it.
    lost_transaction: bool,
    /// The server reported a change of a setting that follows the client since it
    /// borrowed its backend (cleared on release): if the backend is lost before the
    /// transaction ends, whether the change stands is unknown.
    reported_since_borrow: bool,
    /// A statement the backend is describing before the client's next message goes on
    /// (`Translation::Hold`): client messages wait until then.
    checking: Option<Arc<crate::prepared::Statement>>,
    /// The statement whose description `checking` waited for came: a Bind of it is the
    /// message held (counted as a miss already).
    checked: Option<Arc<crate::prepared::Statement>>,
    /// The client sent a statement that changes the schema under prepared statements:
    /// at the next ReadyForQuery outside a transaction, every statement's text gets a new
    /// name (`Registry::retire_all`).
    schema_changed: bool,
    /// When the client last sent or was sent something (kept only if a limit needs it).
    last_activity: Instant,
    limits: Arc<Limits>,
    shutdown: Watch,
    /// Held for the session's life: its places under per-user/database client limits.
    _admission: Admission,
    /// When the oldest request still unanswered reached pgshield, and the backend.
    request_received: Option<Instant>,
    request_sent: Option<Instant>,
    /// When the client's current transaction began (SHOW STATS xact_time).
    xact_started: Option<Instant>,
    /// Counted among its pool's clients (SHOW POOLS) while the session lives.
    _in_pool: PoolClient,
    /// Its entry in SHOW CLIENTS (and the handle KILL uses).
    registered: Registered,
    /// What it did, for the line logged when it ends.
    counts: Counts,
    /// Its place under the client limit, and its count in closed connections.
    _held: super::Held,
}

/// A session's totals (its pool's are in `PoolStats`).
#[derive(Debug, Default)]
struct Counts {
    transactions: u64,
    queries: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        id: ClientId,
        (client, addr, local): (Stream, crate::net::Peer, Option<std::net::SocketAddr>),
        login: Login,
        leftover: BytesMut,
        held: super::Held,
    ) -> Session {
        let watch = shared.shutdown.watch();
        let leftover_len = leftover.len() as u64;
        PoolStats::add(&login.pool.stats.local().bytes_received, leftover_len);
        // (A search_path from the client's startup: see `FollowUp::search_path_env`.)
        let mut follow_up = None;
        keep_search_path_env(&mut follow_up, search_path_env(&login.settings));
        Session {
            mode: login.pool.mode(),
            limits: Limits::now_in_force(&shared),
            registered: shared.registry.register(
                NewClient {
                    id: id.0,
                    pool: Arc::clone(&login.pool),
                    addr,
                    local,
                    tls: client.is_tls(),
                    application_name: login
                        .settings
                        .get("application_name")
                        .unwrap_or_default()
                        .to_owned(),
                },
                watch.waker(),
            ),
            shutdown: watch,
            _admission: login.admission,
            request_received: None,
            request_sent: None,
            xact_started: None,
            _in_pool: login.in_pool,
            shared,
            id,
            client,
            pool: login.pool,
            settings: login.settings,
            statements: ClientStatements::default(),
            pinned: None,
            follow_up,
            busy_since: None,
            statement_cancelled: Cancelled::NO,
            cancel: login.cancel,
            client_view: login.client_view,
            parse_env_unsettled: 0,
            backend: None,
            client_in: leftover,
            client_idle_in: 0,
            client_out: BytesMut::new(),
            server_out: BytesMut::new(),
            client_msg: Passing::default(),
            server_msg: Passing::default(),
            skip_until_sync: false,
            server_sent_fatal: false,
            server_fatal: None,
            lost_transaction: false,
            reported_since_borrow: false,
            schema_changed: false,
            checking: None,
            checked: None,
            last_activity: Instant::now(),
            // (Bytes the login read past its last message are the session's first input.)
            counts: Counts {
                bytes_in: leftover_len,
                ..Counts::default()
            },
            _held: held,
        }
    }

    /// A client started with the temporary schema first in its `search_path` (transaction
    /// mode): its tables may be temporary, so it keeps the backend it first gets (with
    /// `on_session_state = "reject"` it was refused at login: [`refuses_at_login`]).
    fn pin_at_login(&mut self) {
        if self.mode != PoolMode::Transaction || !starts_in_temp_schema(&self.settings) {
            return;
        }
        pin(
            &mut self.pinned,
            &self.shared,
            self.id,
            self.pool.name(),
            PinReason::TempTable,
        );
        // (Its statements are its own, as any pinned client's: its temporary tables may
        // be named as other clients' tables are.)
        keep_search_path_env(&mut self.follow_up, private_env());
    }

    /// Relays until the session ends, then finishes it. Its task must be
    /// [`crate::epoch::Counted`]: `poll_io` skips sockets already found empty in the
    /// same poll. (Not an `async fn`: that would store the session twice in the future,
    /// once as the argument and once as the local it is moved into; an idle client's
    /// task is mostly this future.)
    #[allow(clippy::manual_async_fn)]
    pub(super) fn run(mut self) -> impl std::future::Future<Output = ()> + Send {
        async move {
            self.log_login();
            self.pin_at_login();
            let end = self.relay().await;
            let farewell = self.ending(&end);
            // Most sessions end holding no backend, with nothing to write: nothing to wait
            // for. Otherwise boxed, as is each borrow: an idle session's task holds only
            // the relay loop's own state, not the largest state it might pass through.
            let to_write = !self.client_out.is_empty() && !matches!(end, End::ClientGone);
            if self.backend.is_some() || farewell.is_some() || to_write {
                Box::pin(self.finish(end, farewell)).await;
            }
        }
    }

    fn log_login(&self) {
        if self.limits.log_connections {
            let info = &self.registered.info;
            tracing::info!(
                client = %self.id,
                peer = %info.addr,
                user = %info.user(),
                database = %info.database(),
                tls = info.tls,
                application_name = %info.application_name,
                "client logged in"
            );
        }
    }

    async fn relay(&mut self) -> End {
        // (Only what the loop needs across its awaits is kept here, not a copy of the
        // limits: this future is most of an idle client's memory.)
        let mut seen_reloads = self.limits.reloads;
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut timer_armed = false;
        // Once polled after being aimed, the timer has the task's waker: until it has
        // elapsed, polling it again (each turn of the loop) would only cost time.
        let mut timer_polled = false;
        let mut timer_state = None;
        // Re-aim the timer whenever the session changes state only when a limit with a
        // short deadline can apply; the idle limit alone is looked at when the timer fires.
        let reaims = |l: &Limits| l.query.is_some() || l.idle_transaction.is_some();
        let mut reaim_on_change = reaims(&self.limits);
        loop {
            if self.limits.reloads != seen_reloads {
                seen_reloads = self.limits.reloads;
                reaim_on_change = reaims(&self.limits);
                if self.limits.query.is_none() {
                    // (Kept only under a query_timeout, below: one a later reload adds
                    // counts a statement already running from the next turn of this loop.)
                    self.busy_since = None;
                }
                timer_state = None;
                timer_armed = false;
                timer_polled = false;
            }
            // (Mostly the client sent nothing this turn: the server answered. Else mostly a
            // lone Query, passed on without entering the general path's future.)
            if !self.client_in.is_empty() {
                // (The general path's future awaited here, not inside the borrow's, and
                // no result held across either: an idle client's task holds room for
                // the larger of the two alone.)
                let general = match self.pass_at_once(None) {
                    Short::Passed => false,
                    Short::Borrow => match self.borrow_for_short_path().await {
                        Ok(passed) => !passed,
                        Err(end) => return end,
                    },
                    Short::General => true,
                };
                if general {
                    if let Err(end) = self.process_client_input().await {
                        return end;
                    }
                }
            }
            let held = self.client_held();
            // (Only of use with messages waiting: see below.)
            let owed_full = !self.client_in.is_empty() && self.owed_full();
            if let Err(end) = self.process_server_input() {
                return end;
            }
            if held && !self.client_held() {
                // What they waited for came (see `client_held`): the client's messages
                // held for it go on now.
                continue;
            }
            if self.client_gone() && !self.client_held() {
                // What it sent before it left is passed on: `finish` lets it run.
                return End::ClientGone;
            }
            if self.server_msg.left == 0 {
                if let Some(backend) = self.backend.as_mut() {
                    backend
                        .server()
                        .replies
                        .write_due_fakes(&mut self.client_out);
                }
            }
            if owed_full && !self.client_in.is_empty() && !self.owed_full() {
                // Fewer replies owed than the most let pile up: the client's messages
                // waiting for that go on now (the server may have answered everything,
                // pgshield's own answers with it: no read would come to turn the loop).
                continue;
            }
            if self.mode == PoolMode::Transaction {
                self.release_if_done();
            }
            self.resync_if_unsure();
            // The limits run on one timer, re-aimed when the session changes state. (The
            // idle limit alone, the default, is aimed once: it is looked at when the timer
            // fires, and the state need not be worked out each turn.)
            if (self.limits.any() || self.client_gone())
                && (reaim_on_change || timer_state.is_none())
            {
                let state = (self.server_busy(), self.outside_transaction());
                // (Only query_timeout needs to know since when: a statement already running
                // when a reload adds one counts from the next turn of this loop.)
                if state.0 && self.busy_since.is_none() && self.limits.query.is_some() {
                    self.busy_since = Some(crate::epoch::instant());
                    self.statement_cancelled = Cancelled::NO;
                    // (A statement pipelined behind one that ended: busy all along, but
                    // its own deadline is another.)
                    timer_state = None;
                } else if !state.0 {
                    self.busy_since = None;
                }
                if timer_state.is_none() || (reaim_on_change && timer_state != Some(state)) {
                    timer_state = Some(state);
                    let limits = *self.limits;
                    let next = self.next_deadline(&limits, Instant::now());
                    timer_armed = next.is_some();
                    timer_polled = false;
                    if let Some(at) = next {
                        timer.as_mut().reset(at.into());
                    }
                }
            }
            let quiet = self.is_quiet();
            if quiet {
                // Nothing in flight: an idle client holds no buffer. One that holds a
                // backend (inside a transaction, or in session mode) keeps small ones
                // between statements: it costs a server connection anyway, and freeing
                // and growing them again for each statement is wasted work (about 1 % of
                // a tpcb transaction's instructions).
                let keep = if self.backend.is_some() {
                    crate::buffers::KEEP_WHILE_HELD
                } else {
                    0
                };
                crate::buffers::release(&mut self.client_in, keep);
                crate::buffers::release(&mut self.client_out, keep);
                crate::buffers::release(&mut self.server_out, keep);
                if self.follow_up.as_ref().is_some_and(|f| {
                    f.dirty.is_empty()
                        && f.readbacks.is_empty()
                        && f.restore.is_empty()
                        && f.search_path_env == 0
                        && !f.deallocate_waits
                        && f.client_gone.is_none()
                        && !f.listens
                }) {
                    self.follow_up = None;
                }
            }
            let between_transactions = quiet && self.outside_transaction();
            let event = tokio::select! {
                biased;
                _ = poll_fn(|cx| {
                    if timer_polled && !timer.is_elapsed() {
                        return Poll::Pending;
                    }
                    timer_polled = true;
                    // (Unconstrained: a poll refused for tokio's budget would register no
                    // waker, and the timer would not be polled again.)
                    let mut sleep = tokio::task::unconstrained(timer.as_mut());
                    std::future::Future::poll(Pin::new(&mut sleep), cx)
                }), if timer_armed => {
                    let now = Instant::now();
                    let limits = *self.limits;
                    if let Err(end) = self.enforce_limits(&limits, now) {
                        return end;
                    }
                    let next = self.next_deadline(&limits, now);
                    timer_armed = next.is_some();
                    timer_polled = false;
                    if let Some(at) = next {
                        timer.as_mut().reset(at.into());
                    }
                    continue;
                }
                event = poll_fn(|cx| self.poll_io(cx, !self.client_gone(), between_transactions)) => event,
            };
            match event {
                Event::Data => self.note_activity(),
                Event::Reloaded | Event::Flushed => {}
                Event::Drain => return End::Shutdown,
                Event::Forced => return End::ForcedShutdown,
                Event::Killed => return End::Killed,
                // Messages it sent before are held: they go on first.
                Event::ClientEof if self.backend.is_some() && self.client_held() => {
                    self.follow_up
                        .get_or_insert_with(Default::default)
                        .client_gone = Some(Instant::now());
                    // (Re-aimed: they get as long as its statements would, see
                    // `next_deadline`.)
                    timer_state = None;
                }
                Event::ClientEof => return End::ClientGone,
                Event::ClientError(e) => {
                    tracing::debug!(client = %self.id, error = %e, "client i/o error");
                    return End::ClientGone;
                }
                Event::ServerEof => {
                    if !self.carry_on(None) {
                        return End::ServerLost(None);
                    }
                }
                Event::ServerError(e) => {
                    if !self.carry_on(Some(&e)) {
                        return End::ServerLost(Some(e));
                    }
                }
            }
        }
    }

    /// The backend this client holds is gone (a failover, a restart, a killed backend).
    /// Its host is reported to the cluster. In transaction mode, when the client has no
    /// pinned state and nothing is half-written to it, it stays connected: what it is
    /// owed is answered with 08006 errors and ReadyForQuery, an open extended batch is
    /// skipped to its Sync, and a transaction block it was in stays failed (on its next
    /// backend) until it ends it. False: the session ends, as it must otherwise.
    fn carry_on(&mut self, error: Option<&io::Error>) -> bool {
        let Some(backend) = self.backend.as_mut() else {
            return false;
        };
        let server = backend.server();
        if let Some(lease) = server.host.as_ref() {
            lease
                .cluster()
                .backend_lost(lease.index, self.server_fatal.as_deref());
        }
        // Settings changed in the lost transaction (a SET awaiting its read-back, a
        // change the server reported) may or may not stand: they cannot follow.
        let settings_unsure = self.reported_since_borrow
            || self.follow_up.as_ref().is_some_and(|f| !f.dirty.is_empty());
        if self.mode != PoolMode::Transaction
            || self.pinned.is_some()
            || self.server_msg.left > 0
            || settings_unsure
        {
            return false;
        }
        let Some(lost) = server.replies.lost() else {
            return false;
        };
        for undo in server.replies.take_undone().into_iter().rev() {
            self.statements.undo(&mut server.statements, undo);
        }
        server.skip_terminate();
        let cause = match (&self.server_fatal, error) {
            (Some(fatal), _) => format!("{} ({})", fatal.message, fatal.code),
            (None, Some(e)) => e.to_string(),
            (None, None) => "the server closed the connection".to_owned(),
        };
        tracing::warn!(client = %self.id, pool = %self.pool.name(), cause, owed = lost.readies, in_transaction = lost.in_transaction, "server connection lost; the client carries on");
        let held_fatal = self.server_fatal.take().is_some();
        self.reported_since_borrow = false;
        // A description that backend was giving will not come.
        self.checking = None;
        self.cancel.detach();
        self.registered.info.set_server(None);
        if let Some(backend) = self.backend.take() {
            backend.discard();
        }
        // The rest of a message half-passed to the server is dropped.
        self.client_msg.forward = false;
        self.server_out.clear();
        self.busy_since = None;
        self.request_sent = None;
        self.lost_transaction = lost.in_transaction;
        let error = ErrorResponse::error(
            sqlstate::CONNECTION_FAILURE,
            format!(
                "pgshield lost the server connection of pool {} ({cause}): a failover or a server restart. \
                 What was running did not finish (a COMMIT under way may or may not have taken effect){}; \
                 this connection is still usable",
                self.pool.name(),
                if lost.in_transaction {
                    ", and the transaction is aborted: end it with ROLLBACK"
                } else {
                    ""
                }
            ),
        )
        .with_hint("retry the transaction");
        let status = self.idle_status();
        for _ in 0..lost.readies {
            error.encode(&mut self.client_out);
            self.local_ready(status);
        }
        if lost.open_batch {
            // (Unless the server already failed the batch, with an error the client has.)
            if !lost.batch_failed || held_fatal {
                error.encode(&mut self.client_out);
            }
            self.skip_until_sync = true;
        }
        if lost.readies == 0 && !lost.open_batch {
            // Nothing was asked: the client hears it as a notice, now.
            messages::notice(&mut self.client_out, &error.code, &error.message);
        }
        true
    }

    /// Puts a new backend in the failed transaction the client's lost one left it in
    /// (see `carry_on`): PostgreSQL itself then refuses its statements (25P02) until it
    /// ends the transaction, in whatever protocol it speaks.
    async fn fail_transaction(&mut self, backend: &mut Backend) -> Result<(), ServerError> {
        const SQL: &str = "BEGIN; DO $pgshield$BEGIN RAISE EXCEPTION USING ERRCODE = '08006', \
            MESSAGE = 'pgshield: this transaction was lost with its server connection (failover); end it with ROLLBACK'; END$pgshield$";
        let server = backend.server();
        match tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, Box::pin(server.run_internal(SQL))).await
        {
            Ok(Ok(_)) if server.replies.tx_status() == TxStatus::Failed => {
                self.lost_transaction = false;
                Ok(())
            }
            Ok(Ok(_)) => {
                server.mark_broken();
                Err(ServerError::Protocol(
                    "the backend did not enter a failed transaction".into(),
                ))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                server.mark_broken();
                Err(ServerError::Protocol(
                    "no reply to pgshield's own query".into(),
                ))
            }
        }
    }

    /// The transaction status of a client that holds no backend.
    fn idle_status(&self) -> u8 {
        if self.lost_transaction {
            b'E'
        } else {
            b'I'
        }
    }

    /// Nothing in flight: no reply owed, nothing half-passed, nothing unread.
    fn is_quiet(&self) -> bool {
        let backend_quiet = self.backend.as_ref().is_none_or(|b| {
            let s = b.server_ref();
            s.replies.at_boundary() && s.read_buf.is_empty()
        });
        backend_quiet
            && self.client_in.is_empty()
            && self.client_msg.left == 0
            && self.server_msg.left == 0
            && self.server_out.is_empty()
    }

    /// The server is working on something the client waits for (a statement runs, or its
    /// replies are on their way). A client that stalls mid-message, mid-COPY, or with an
    /// unsynced batch is not waited for: the server is waiting for it.
    fn server_busy(&self) -> bool {
        let Some(backend) = self.backend.as_ref() else {
            return false;
        };
        let server = backend.server_ref();
        // (Bytes still queued for the server do not count: they are written while the
        // session waits, with no event to mark the change. A client message held while
        // the server describes a statement waits for the server, as a running one does.)
        self.client_msg.left == 0
            && (self.server_msg.left > 0
                || server.replies.awaiting_reply()
                || self.checking.is_some()
                || self.role_restore_owed())
    }

    /// When a departed client's held messages are given up (see `finish`, which then
    /// treats what runs as any departed client's).
    fn gone_by(&self) -> Option<Instant> {
        let gone = self.follow_up.as_ref().and_then(|f| f.client_gone)?;
        gone.checked_add(INTERNAL_QUERY_TIMEOUT)
    }

    /// Whether as many replies are owed as are let pile up ([`MAX_OWED`]): the client's
    /// messages wait (see `process_client_input`).
    fn owed_full(&self) -> bool {
        self.backend
            .as_ref()
            .is_some_and(|b| b.server_ref().replies.owed_count() >= MAX_OWED)
    }

    /// See [`FollowUp::client_gone`].
    fn client_gone(&self) -> bool {
        self.follow_up
            .as_ref()
            .is_some_and(|f| f.client_gone.is_some())
    }

    /// Whether the client's next message waits, unread past what has arrived: for a
    /// statement being described, the role being given back, a reset's answer (see
    /// [`Self::reset_answer_owed`]), or the replies owed before a DEALLOCATE pgshield
    /// answers (see [`Self::answer_deallocate`]).
    fn client_held(&self) -> bool {
        self.checking.is_some()
            || self.role_restore_owed()
            || self.reset_answer_owed()
            || (self.follow_up.as_ref().is_some_and(|f| f.deallocate_waits)
                && self
                    .backend
                    .as_ref()
                    .is_some_and(|b| b.server_ref().replies.owes_ready()))
    }

    /// Whether the client reset settings (not right behind which their startup values
    /// could be given back, `restore_after`: in an extended batch, or a Query that also
    /// begins, ends or copies), outside a transaction block, and the ReadyForQuery ending
    /// that is owed. Whether they can be given back before what it sent next is known
    /// only then (if that still is outside a transaction block, see
    /// [`Self::restore_startup_settings`]): what follows waits. Not a message of the
    /// batch still open, nor COPY data: the server waits for those.
    fn reset_answer_owed(&self) -> bool {
        // (Session mode gives them back before a Query or an unnamed Parse only: see
        // `restore_startup_settings`.)
        self.mode == PoolMode::Transaction
            && self
                .follow_up
                .as_ref()
                .is_some_and(|f| !f.restore.is_empty())
            && self.backend.as_ref().is_some_and(|b| {
                let replies = &b.server_ref().replies;
                replies.tx_status() == TxStatus::Idle
                    && !replies.batch_open()
                    && replies.owes_ready()
            })
    }

    /// Whether the statement giving back the role the client started as is owed: until
    /// it is answered, nothing more of the client's goes to the server (had it failed,
    /// that would run as the login's role).
    fn role_restore_owed(&self) -> bool {
        self.follow_up
            .as_ref()
            .is_some_and(|f| f.readbacks.iter().any(|r| r.role))
    }

    /// The next moment one of the session's limits must be looked at, if any.
    fn next_deadline(&self, limits: &Limits, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        };
        if self.server_busy() {
            if let (Some(limit), Some(since)) = (limits.query, self.busy_since) {
                if self.statement_cancelled == Cancelled::NO {
                    consider(since.checked_add(limit));
                } else {
                    // (Whether the server has been silent since is looked at then.)
                    consider(now.checked_add(QUERY_CANCEL_GRACE));
                }
            }
            // Idle limits do not run while the server works; look again later.
            consider(limits.idle_client.and_then(|l| now.checked_add(l)));
        } else {
            if !self.outside_transaction() {
                consider(
                    limits
                        .idle_transaction
                        .and_then(|l| self.last_activity.checked_add(l)),
                );
            }
            consider(
                limits
                    .idle_client
                    .and_then(|l| self.last_activity.checked_add(l)),
            );
        }
        // A departed client's held messages get as long as its statements would.
        consider(self.gone_by());
        // Never in the past: a deadline already passed is looked at right away.
        next.map(|at| at.max(now))
    }

    /// Applies the limits now: ends an idle session, or cancels an overlong statement.
    fn enforce_limits(&mut self, limits: &Limits, now: Instant) -> Result<(), End> {
        if self.gone_by().is_some_and(|by| now >= by) {
            return Err(End::ClientGone);
        }
        let idle_for = now.saturating_duration_since(self.last_activity);
        if self.server_busy() {
            let running_for = self.busy_since.map(|s| now.saturating_duration_since(s));
            if let (Some(limit), Some(running)) = (limits.query, running_for) {
                let cancelled = self.statement_cancelled;
                if cancelled == Cancelled::NO && running >= limit {
                    self.statement_cancelled = Cancelled::silent(0);
                    tracing::info!(client = %self.id, pool = %self.pool.name(), "statement ran past query_timeout: cancelling it");
                    // (Attributed now, to the backend running it; only the sending waits.)
                    if let Some(target) = self.cancel.attribute() {
                        tokio::spawn(async move { target.send().await });
                    }
                } else if cancelled == Cancelled::HEARD {
                    // The server has sent something since the last look: another grace.
                    self.statement_cancelled = Cancelled::silent(0);
                } else if let Some(unread) = cancelled.unread_looks() {
                    if self.client_out.len() < HIGH_WATER {
                        // Not a byte from the server for a grace since the cancel (it
                        // never reached the server: a network cut, say): as PgBouncer's
                        // query_timeout, the client is closed and its backend with it.
                        return Err(End::StatementStuck);
                    }
                    // pgshield reads no more of the server for a client that does not
                    // read (the server may be stuck writing, the cancel waiting on that):
                    // for a while, as such a client holds the backend.
                    if unread + 1 >= MAX_UNREAD_LOOKS {
                        return Err(End::ResultUnread);
                    }
                    self.statement_cancelled = Cancelled::silent(unread + 1);
                }
            }
            return Ok(());
        }
        if !self.outside_transaction() && limits.idle_transaction.is_some_and(|l| idle_for >= l) {
            return Err(End::IdleInTransaction);
        }
        if limits.idle_client.is_some_and(|l| idle_for >= l) {
            return Err(End::IdleTimeout);
        }
        Ok(())
    }

    /// The client is not inside a transaction: no transaction block, and no extended
    /// batch (its implicit transaction runs to its Sync) or COPY under way.
    fn outside_transaction(&self) -> bool {
        self.backend.as_ref().is_none_or(|b| {
            let replies = &b.server_ref().replies;
            replies.tx_status() == TxStatus::Idle && !replies.batch_open()
        })
    }

    /// New limits from a reload. If the old ones did not watch activity, the clock
    /// starts now: the session was not idle all along just because nobody was counting.
    fn apply_limits(&mut self, limits: Arc<Limits>) {
        if !self.limits.watch_activity() {
            self.last_activity = Instant::now();
        }
        self.limits = limits;
    }

    fn note_activity(&mut self) {
        if self.limits.watch_activity() {
            self.last_activity = crate::epoch::instant();
        }
    }

    /// Looks at the shutdown stage, writes what is pending on both sides, then reads from
    /// whichever side has data. `drain`: the client may be closed if pgshield is draining.
    fn poll_io(&mut self, cx: &mut Context<'_>, read_client: bool, drain: bool) -> Poll<Event> {
        debug_assert!(
            crate::epoch::in_counted_poll(),
            "a session's task must be epoch::Counted"
        );
        match self.shutdown.poll_stage(cx) {
            Stage::Forced => return Poll::Ready(Event::Forced),
            Stage::Draining if drain => return Poll::Ready(Event::Drain),
            _ => {}
        }
        // Woken by the same waker the watch just registered (as are reloads).
        if self.registered.info.killed() {
            return Poll::Ready(Event::Killed);
        }
        if let Some(reloaded) = self.limits.reloaded(&self.shared) {
            self.apply_limits(reloaded);
            return Poll::Ready(Event::Reloaded);
        }
        if self.client_gone() {
            self.client_out.clear();
        }
        let unsent = self.client_out.len();
        let drained = poll_drain(cx, &mut self.client, &mut self.client_out);
        let sent = unsent - self.client_out.len();
        if sent > 0 {
            PoolStats::add(&self.pool.stats.local().bytes_sent, sent as u64);
            self.counts.bytes_out += sent as u64;
            if self.client_out.is_empty() && self.backend.is_none() {
                // All sent, and nothing more coming: the client may now sit idle, and an
                // idle client holds no buffer (the quiet check ran before this was sent).
                crate::buffers::release(&mut self.client_out, 0);
            }
        }
        if let Poll::Ready(Err(e)) = drained {
            return Poll::Ready(Event::ClientError(e));
        }
        // (Many replies owed: the client is not read, see below.)
        let mut owed_full = false;
        // Whether the last of what the client sent, all of it owing no reply, has just
        // been written (CopyData streamed on after its COPY failed, a lone Flush): the
        // relay loop must turn once more, as the backend may now go back to the pool, and
        // no reply will come to turn it.
        let mut flushed_idle = false;
        if let Some(backend) = self.backend.as_mut() {
            let server = backend.server();
            owed_full = server.replies.flush_due(MAX_OWED);
            if owed_full && !server.replies.flush_sent_already() && self.client_msg.left == 0 {
                // The client is not read now (see below) while its replies are owed: the
                // server must not hold any back (until a Sync it may keep up to 8 KB of
                // them unsent, ahead of pgshield's own answers queued behind them).
                self.server_out.extend_from_slice(&[b'H', 0, 0, 0, 4]);
                server.replies.sent_with(b'H', Hide::All, None);
                server.replies.flush_sent();
            }
            let unsent = self.server_out.len();
            if let Poll::Ready(Err(e)) =
                poll_drain(cx, &mut backend.server().stream, &mut self.server_out)
            {
                return Poll::Ready(Event::ServerError(e));
            }
            flushed_idle =
                unsent > 0 && self.server_out.is_empty() && backend.server_ref().replies.is_idle();
        }
        // Poll both reads every time, so a busy side cannot starve the other; but not a
        // socket already found empty in this poll of the task: its waker is set, and
        // until the task is woken it can only be empty again (see `epoch.rs`).
        let epoch = crate::epoch::now();
        let mut data = false;
        // (While a statement is being described, the client's messages wait unread in
        // `client_in`: up to the same bound.)
        let held = self.client_held() && self.client_in.len() >= HIGH_WATER;
        // Nor while what pgshield answers itself piles up for a client that does not
        // read it (a flood of Syncs between transactions, of Closes behind a long
        // statement): PostgreSQL stops reading a client it cannot write to, and so does
        // pgshield.
        // (Except to finish a message half passed on: the server is asked to send what
        // it holds only between messages, and waits for the rest of this one.)
        let answers_pile_up =
            self.client_out.len() >= HIGH_WATER || (owed_full && self.client_msg.left == 0);
        if read_client
            && self.server_out.len() < HIGH_WATER
            && !answers_pile_up
            && !held
            && self.client_idle_in != epoch
            && (self.client_idle_in == 0
                || self.waits_on_client()
                || !self.client.still_unreadable())
        {
            // (Through the thread's scratch space: a client waiting here holds no buffer.)
            let read = crate::buffers::poll_read(&mut self.client, cx, &mut self.client_in);
            // (A read tokio refused for the task's budget set no waker with the socket.)
            let armed = read.is_pending() && tokio::task::coop::has_budget_remaining();
            self.client_idle_in = if armed { epoch } else { 0 };
            match read {
                Poll::Ready(Ok(0)) => return Poll::Ready(Event::ClientEof),
                Poll::Ready(Ok(n)) => {
                    PoolStats::add(&self.pool.stats.local().bytes_received, n as u64);
                    self.counts.bytes_in += n as u64;
                    data = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientError(e)),
                Poll::Pending => {}
            }
        }
        if let Some(backend) = self.backend.as_mut() {
            let server = backend.server();
            if self.client_out.len() < HIGH_WATER && server.read_idle_in != epoch {
                reserve_for_read(&mut server.read_buf);
                match poll_read_buf(Pin::new(&mut server.stream), cx, &mut server.read_buf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::ServerEof),
                    Poll::Ready(Ok(_)) => {
                        data = true;
                        if self.statement_cancelled.unread_looks().is_some() {
                            self.statement_cancelled = Cancelled::HEARD;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerError(e)),
                    Poll::Pending => server.read_idle_in = epoch,
                }
            }
        }
        if data {
            Poll::Ready(Event::Data)
        } else if flushed_idle {
            Poll::Ready(Event::Flushed)
        } else {
            Poll::Pending
        }
    }

    /// Whether the session waits on its client alone (the server owes nothing). Its
    /// socket is then read, which sets the task's waker with it afresh, rather than
    /// relying on one set in an earlier poll (`poll_io`): a session was seen stalled in
    /// this state twice, its client's next statement unread, for want of a wake-up
    /// (docs/BENCHMARKS.md, eleventh session). The skip still serves what it was made
    /// for: a reply waking the task while the client has nothing to say.
    fn waits_on_client(&self) -> bool {
        self.backend
            .as_ref()
            .is_none_or(|b| b.server_ref().replies.owes_nothing())
    }

    /// Frames what the client sent and passes it to the backend, borrowing one first if
    /// needed.
    async fn process_client_input(&mut self) -> Result<(), End> {
        // One allocation for what this batch passes on, not one per message as it grows.
        crate::buffers::reserve_empty(&mut self.server_out, self.client_in.len());
        loop {
            if self.client_msg.left > 0 {
                if !self
                    .client_msg
                    .pass(&mut self.client_in, &mut self.server_out)
                {
                    return Ok(());
                }
                continue;
            }
            if self.client_held() {
                // Held until the backend has described a statement (`start_passing`), runs
                // as the role the client started as again (`push_restore`), or has
                // answered what came before (a reset's batch, what a DEALLOCATE waits
                // for): see `client_held`.
                return Ok(());
            }
            // Nor while as many replies are owed as are let pile up: the client is read
            // only to finish a message half passed on (see `poll_io`), and what it sent
            // behind that waits here, a read's worth at most.
            if self.owed_full() {
                return Ok(());
            }
            // Messages stream through (only some are read whole), but none may claim more
            // than listen.max_message_size.
            let header = match peek_header(&self.client_in) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e) => return Err(End::ClientProtocol(e.to_string())),
            };
            header
                .check_size(self.limits.max_message_size)
                .map_err(|e| End::ClientProtocol(e.to_string()))?;
            if self.request_received.is_none() && matches!(header.tag, b'Q' | b'P' | b'B' | b'F') {
                self.note_request_start(crate::epoch::instant());
            }
            if header.tag == b'S' {
                // (What its batch's portals were bound from is forgotten with it.)
                if let Some(backend) = self.backend.as_mut() {
                    backend.server().statements.batch_ended();
                }
            }
            match header.tag {
                b'X' => return Err(End::Terminated),
                b'Q' | b'P' | b'B' | b'E' | b'D' | b'C' | b'S' | b'H' | b'F' | b'd' | b'c'
                | b'f' => {}
                other => {
                    return Err(End::ClientProtocol(format!(
                        "invalid frontend message type {other}"
                    )));
                }
            }
            if self.skip_until_sync {
                if header.tag == b'S' {
                    self.skip_until_sync = false;
                    self.local_ready(self.idle_status());
                }
                self.client_msg = Passing {
                    left: header.len,
                    forward: false,
                };
                continue;
            }
            if self.mode == PoolMode::Transaction && header.tag == b'Q' {
                if !self.whole_message_arrived(header)? {
                    return Ok(());
                }
                match self.answer_deallocate(header)? {
                    Deallocation::Answered => continue,
                    // (Until what is owed has come: see `client_held`.)
                    Deallocation::Wait => return Ok(()),
                    Deallocation::PassOn => {}
                }
            }
            if self.backend.is_none() {
                // Between transactions a Sync has nothing to sync, and a Flush nothing to
                // flush: answered without borrowing a backend.
                if self.mode == PoolMode::Transaction && matches!(header.tag, b'S' | b'H') {
                    if header.tag == b'S' {
                        self.local_ready(self.idle_status());
                        // Answered here: nothing to time.
                        self.request_received = None;
                    }
                    self.client_msg = Passing {
                        left: header.len,
                        forward: false,
                    };
                    continue;
                }
                // Messages read whole in transaction mode are read whole before borrowing.
                if self.mode == PoolMode::Transaction
                    && matches!(header.tag, b'Q' | b'P' | b'D' | b'C')
                    && !self.whole_message_arrived(header)?
                {
                    return Ok(());
                }
                // A Query of no statement (a driver's ping: pgx's `-- ping`, Rails' `;`)
                // between transactions: PostgreSQL's answer without borrowing a backend,
                // which a ping waiting behind busy ones would be slow to get.
                if self.mode == PoolMode::Transaction
                    && header.tag == b'Q'
                    && !self.lost_transaction
                    && sql::holds_no_statement(
                        self.client_in[HEADER_LEN..header.len]
                            .strip_suffix(&[0])
                            .unwrap_or_default(),
                    )
                {
                    // (As in PostgreSQL, it drops the client's unnamed statement.)
                    self.statements.query_sent();
                    messages::put_message(&mut self.client_out, b'I', |_| {});
                    self.local_ready(b'I');
                    self.client_msg = Passing {
                        left: header.len,
                        forward: false,
                    };
                    continue;
                }
                // A Parse of a statement a server already accepted, or a Close, changes only
                // the client's names: answered without a backend (a client preparing
                // synchronously must not wait on one that others are holding).
                // (Not a Parse in a transaction lost with its backend: the next backend
                // starts it failed, and refuses the Parse as PostgreSQL would.)
                if self.mode == PoolMode::Transaction
                    && (header.tag == b'C' || (header.tag == b'P' && !self.lost_transaction))
                {
                    let answer = self
                        .statements
                        .answer_without_backend(
                            &self.pool.statements,
                            &self.client_in[..header.len],
                            (self.limits.max_statements, self.parse_env()),
                        )
                        .map_err(|e| End::ClientProtocol(e.to_string()))?;
                    if let Some(fake) = answer {
                        fake.write(&mut self.client_out);
                        self.client_in.advance(header.len);
                        continue;
                    }
                }
                // PostgreSQL ignores COPY messages outside COPY; so do we, without a backend.
                if matches!(header.tag, b'd' | b'c' | b'f') {
                    self.client_msg = Passing {
                        left: header.len,
                        forward: false,
                    };
                    continue;
                }
                // Usually an idle backend is lent at once and needs nothing applied: taken
                // without a future. Otherwise the borrow, and what it takes, is boxed.
                // (Two statements: a `?` around the awaits below would keep its result's
                // room in the relay loop's future.)
                let taken = poll_fn(|cx| Poll::Ready(self.take_idle_backend(cx))).await?;
                let taken = match self.finish_taking(taken) {
                    None => Ok(()),
                    Some(borrow) => borrow.await?,
                };
                if let Err(error) = taken {
                    self.refuse_message(header.tag, header.len, error);
                    continue;
                }
            }
            if !self.start_passing(header)? {
                return Ok(());
            }
        }
    }

    /// The common cases of a transaction-mode client, in one step, when what has arrived
    /// is one request alone, that changes nothing of the session: a simple Query
    /// ([`Self::pass_query_at_once`]) or a driver's run of a prepared statement
    /// ([`Self::pass_bind_at_once`]). It is passed on to the backend the client holds,
    /// or, holding none, to the warm backend next in line if that one needs nothing
    /// applied. Having changed nothing otherwise, [`Short::Borrow`] if only a backend is
    /// missing, else [`Short::General`]: the general path takes it (and reports what is
    /// wrong with it). `screened`: for a Query, the parse environment it was found to
    /// change nothing under, if it was (by a call that found no backend).
    fn pass_at_once(&mut self, screened: Option<u64>) -> Short {
        if self.mode != PoolMode::Transaction
            || self.client_msg.left > 0
            || self.skip_until_sync
            || self.lost_transaction
            || self.checking.is_some()
            || !self.server_out.is_empty()
        {
            return Short::General;
        }
        // What the general path does first for any message: messages wait while the role
        // is given back; the startup values of settings reset are restored before them.
        // (A client's own search_path, kept here too, is in its parse environment.)
        if self
            .follow_up
            .as_ref()
            .is_some_and(|f| !f.restore.is_empty() || f.readbacks.iter().any(|r| r.role))
        {
            return Short::General;
        }
        match self.client_in.first() {
            Some(b'Q') => self.pass_query_at_once(screened),
            Some(b'B') => self.pass_bind_at_once(),
            _ => Short::General,
        }
    }

    /// [`Self::pass_at_once`] for a whole simple Query, alone, that changes nothing of the
    /// session by the SQL screen (not screened again under the environment `screened`).
    fn pass_query_at_once(&mut self, screened: Option<u64>) -> Short {
        let header = match peek_header(&self.client_in) {
            Ok(Some(h)) if h.tag == b'Q' && h.len == self.client_in.len() => h,
            _ => return Short::General,
        };
        if header.check_size(self.limits.max_message_size).is_err() {
            return Short::General;
        }
        let mut body = &self.client_in[HEADER_LEN..header.len];
        let Some(query) = crate::protocol::frame::take_cstr_bytes(&mut body) else {
            return Short::General;
        };
        // (A DEALLOCATE, which pgshield may answer itself, is not empty either; nor a
        // ping of no statement between transactions, answered without a backend.)
        let env = self.parse_env();
        if screened != Some(env) && !sql::changes_nothing_in(query, env) {
            return Short::General;
        }
        if self.backend.is_none()
            && self.mode == PoolMode::Transaction
            && sql::holds_no_statement(query)
        {
            return Short::General;
        }
        if let Err(short) = self.hold_for_short_path() {
            return short;
        }
        let Some(backend) = self.backend.as_deref_mut() else {
            return Short::General; // (Never: held, or just lent and held.)
        };
        let server = backend.server();
        let translated = self.statements.translate_query(&mut server.statements);
        self.checked = None;
        server.replies.sent_with(b'Q', Hide::No, translated.undo);
        take_back_undone(&mut self.statements, server);
        // The message is all the client sent: its buffer becomes the server's.
        std::mem::swap(&mut self.client_in, &mut self.server_out);
        Short::Passed
    }

    /// [`Self::pass_at_once`] for a prepared statement run as drivers run it: a whole
    /// Bind of a named statement of the client's, perhaps a Describe of its portal, an
    /// Execute and a Sync, alone (libpq's `PQexecPrepared` and pgbench `-M prepared`,
    /// tokio-postgres, pgjdbc, asyncpg), when the statement changes nothing of the
    /// session and the backend has it prepared. Passed on as the general path passes
    /// them (`start_passing`), the Bind renamed ([`ClientStatements::bind_prepared`]),
    /// without that path's framing and translation of each message.
    fn pass_bind_at_once(&mut self) -> Short {
        let Some(bind_len) = self.bind_batch() else {
            return Short::General;
        };
        // (A Bind needs a backend whatever path takes it: one that lacks its statement
        // is held for the general path.)
        if let Err(short) = self.hold_for_short_path() {
            return short;
        }
        let env = self.parse_env();
        let Some(backend) = self.backend.as_deref_mut() else {
            return Short::General; // (Never: held, or just lent and held.)
        };
        let server = backend.server();
        // (A Bind replacing a portal that drops statements is noted there.)
        if server.replies.has_takebacks() || server.replies.has_dropping_portal() {
            return Short::General;
        }
        // (Room for the Bind renamed, at once: the backend's names are short.)
        crate::buffers::reserve_empty(&mut self.server_out, self.client_in.len() + 64);
        let Some(statement) = self.statements.bind_prepared(
            &mut server.statements,
            &self.client_in[..bind_len],
            env,
            &mut self.server_out,
        ) else {
            return Short::General;
        };
        // A hit, unless the Bind waited for the statement to be prepared and described
        // here (counted as a miss then, as `start_passing` counts it).
        let after_check = self
            .checked
            .take()
            .is_some_and(|checked| Arc::ptr_eq(&checked, &statement));
        if !after_check {
            self.pool.metrics().prepared_hits.increment(1);
        }
        server.replies.sent(b'B');
        server.replies.uses(Arc::clone(&statement));
        if self.client_in[bind_len] == b'D' {
            // (Of the Bind's portal: its rows are the statement's, looked at as in
            // `start_passing`.)
            server.replies.sent(b'D');
            server.replies.uses(statement);
        }
        server.replies.sent(b'E');
        server.statements.batch_ended();
        server.replies.sent(b'S');
        self.server_out
            .extend_from_slice(&self.client_in[bind_len..]);
        // (Advanced, not cleared: `buffers::release` keeps a buffer that was read to its
        // end as a spare.)
        self.client_in.advance(self.client_in.len());
        Short::Passed
    }

    /// Makes sure the client holds a backend for the request the short path passes (else
    /// [`Short::Borrow`]: none was lent at once), and notes when the request started.
    fn hold_for_short_path(&mut self) -> Result<(), Short> {
        if self.backend.is_none() && !self.hold_settled_warm_backend() {
            return Err(Short::Borrow);
        }
        // (As the general path times it: from a Parse answered before it, if any.)
        let now = crate::epoch::instant();
        self.note_request_start(now);
        self.request_sent.get_or_insert(now);
        Ok(())
    }

    /// The length of the Bind first in what the client sent, if that is all a batch
    /// [`Self::pass_bind_at_once`] takes: a Bind, perhaps a Describe of the Bind's
    /// portal, an Execute and a Sync, each whole, nothing after them.
    fn bind_batch(&self) -> Option<usize> {
        let max = self.limits.max_message_size;
        let all = &self.client_in[..];
        let whole = |at: usize, tag: u8| {
            let rest = all.get(at..)?;
            let header = peek_header(rest).ok()??;
            let whole = header.tag == tag && header.len <= rest.len();
            (whole && header.check_size(max).is_ok()).then(|| &rest[..header.len])
        };
        let bind = whole(0, b'B')?;
        let mut at = bind.len();
        if all.get(at) == Some(&b'D') {
            let describe = whole(at, b'D')?;
            at += describe.len();
            // 'P' and the name of the Bind's portal, with its NUL (the Bind's first NUL).
            let (kind, portal) = describe[HEADER_LEN..].split_first()?;
            let of_bind = memchr::memchr(0, portal).is_some_and(|nul| nul + 1 == portal.len())
                && bind.get(HEADER_LEN..HEADER_LEN + portal.len()) == Some(portal);
            if *kind != b'P' || !of_bind {
                return None;
            }
        }
        at += whole(at, b'E')?.len();
        let sync = whole(at, b'S')?;
        (sync.len() == HEADER_LEN && at + HEADER_LEN == all.len()).then_some(bind.len())
    }

    /// A request that [`Self::pass_at_once`] passes once the client holds a backend:
    /// borrowed for as the general path borrows ([`Self::finish_taking`]: lent at once
    /// with the client's settings applied, or waited for, watching the client; the
    /// request's time counts the wait), then passed on the short path (true) unless more
    /// has arrived meanwhile, or its first message refused as the general path refuses
    /// it; false: the general path goes on from there. Not through the general path's
    /// framing and `start_passing`: what a borrow that waits costs, most clients' borrows
    /// when they outnumber the pool.
    async fn borrow_for_short_path(&mut self) -> Result<bool, End> {
        self.note_request_start(crate::epoch::instant());
        // (What `pass_query_at_once` just screened a Query under. Should anything arrive
        // meanwhile, the request is no longer alone and is not passed on this way.)
        let screened = self.parse_env();
        // (The general path's two statements, written again: a shared async helper, or
        // `screened` passed in, grows the relay loop's future by 8 to 32 bytes, which the
        // session's size test refuses.)
        let taken = poll_fn(|cx| Poll::Ready(self.take_idle_backend(cx))).await?;
        let taken = match self.finish_taking(taken) {
            None => Ok(()),
            Some(borrow) => borrow.await?,
        };
        if let Err(error) = taken {
            // (The request's first message: what arrived meanwhile is behind it.)
            if let Ok(Some(first)) = peek_header(&self.client_in) {
                self.refuse_message(first.tag, first.len, error);
            }
            return Ok(false);
        }
        Ok(self.pass_at_once(Some(screened)) == Short::Passed)
    }

    /// A request of the client's starts at `now`, unless one already has (with a Parse
    /// answered without a backend, say): its timing, and its transaction's, start there.
    fn note_request_start(&mut self, now: Instant) {
        if self.request_received.is_none() {
            self.request_received = Some(now);
            self.xact_started.get_or_insert(now);
            self.registered.info.note_request(now);
        }
    }

    /// A backend whose replies can no longer be matched for sure (a failed COPY FROM
    /// STDIN may leave one ReadyForQuery more to come): once nothing known is owed, an
    /// empty Query of pgshield's finds their place again
    /// ([`crate::server::state::ReplyTracker::resync_sent`]). A client that keeps it
    /// (session mode, pinned) goes on with its timeouts, resets and shutdown as any
    /// other; in transaction mode the client lets go of it then (closed if a statement
    /// message was in doubt), having had the replies to whatever it pipelined behind the
    /// COPY.
    fn resync_if_unsure(&mut self) {
        let Some(backend) = self.backend.as_mut() else {
            return;
        };
        let server = backend.server();
        if !server.replies.needs_resync()
            || !self.server_out.is_empty()
            || self.client_msg.left > 0
            || self.server_msg.left > 0
        {
            return;
        }
        if self.mode == PoolMode::Transaction && server.replies.statements_unsure() {
            // (What it has prepared may be other than recorded, had the COPY swallowed
            // a Parse: never lent again, whoever lets go of it. Only Syncs in doubt, as
            // after any failed extended-protocol COPY, the resync ends all doubt.)
            server.mark_broken();
        }
        if postgres_protocol::message::frontend::query("", &mut self.server_out).is_ok() {
            server.replies.resync_sent();
            // (A Query, however empty, drops the unnamed statement.)
            server.statements.forget_unnamed();
        }
    }

    /// Lends and holds the warm backend next in line, if that one needs nothing applied
    /// (`pass_query_at_once`). False, having changed nothing, otherwise.
    fn hold_settled_warm_backend(&mut self) -> bool {
        if self.shared.shutdown.is_draining() {
            return false;
        }
        let settings = self.settings.as_str();
        let Some(backend) = self.pool.lend_warm_if(|s| s.settled_for(settings)) else {
            return false;
        };
        if self.pool.is_paused() {
            // Paused meanwhile: as `take_idle_backend`.
            backend.discard();
            return false;
        }
        self.note_borrowed(Duration::ZERO);
        self.hold(backend);
        true
    }

    /// Answers a client's `DEALLOCATE name` of one of its own prepared statements, or
    /// `DEALLOCATE ALL`, from its names alone (transaction mode): on the server the name
    /// does not exist (or would drop every client's statements). Only when nothing is
    /// pending, so the ReadyForQuery's status is known: behind replies the server sends
    /// without more from the client (tokio-postgres runs calls side by side), it waits
    /// for them, as the server would answer it after them.
    fn answer_deallocate(&mut self, header: Header) -> Result<Deallocation, End> {
        if let Some(follow_up) = self.follow_up.as_mut() {
            follow_up.deallocate_waits = false;
        }
        let mut body = &self.client_in[HEADER_LEN..header.len];
        // (The bytes first: most queries are not DEALLOCATE.)
        let starts_with_deallocate = body
            .trim_ascii_start()
            .get(..10)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"deallocate"));
        // (In a transaction lost with its backend, the server refuses it: 25P02.)
        if !starts_with_deallocate || self.lost_transaction {
            return Ok(Deallocation::PassOn);
        }
        let query = crate::protocol::frame::take_cstr_bytes(&mut body)
            .ok_or_else(|| End::ClientProtocol("malformed Query message".into()))?;
        let effects = sql::classify_in(query, self.parse_env());
        let Some(target) = effects
            .deallocate
            .clone()
            .filter(|_| effects.statements == 1)
        else {
            return Ok(Deallocation::PassOn);
        };
        // A pinned client may have statements of its own on the server (SQL PREPARE
        // pins): DEALLOCATE ALL drops those too, there. A name not the client's is one
        // the server answers for (26000).
        let answerable = match &target {
            None => self.pinned.is_none(),
            Some(name) => self.statements.has(name),
        };
        if !answerable {
            return Ok(Deallocation::PassOn);
        }
        let status = match self.backend.as_ref() {
            None => b'I',
            Some(backend) => {
                let replies = &backend.server_ref().replies;
                // (pgshield's own hidden queries still owed, perhaps still to be written,
                // end outside a transaction.)
                let nothing_pending = self.client_msg.left == 0
                    && self.server_msg.left == 0
                    && ((replies.at_boundary() && self.server_out.is_empty())
                        || replies.is_idle_but_hidden());
                match replies.tx_status() {
                    TxStatus::Idle if nothing_pending => b'I',
                    TxStatus::InTransaction if nothing_pending => b'T',
                    _ if !nothing_pending && replies.owes_ready() && !replies.batch_open() => {
                        self.follow_up
                            .get_or_insert_with(Default::default)
                            .deallocate_waits = true;
                        return Ok(Deallocation::Wait);
                    }
                    // (In a failed transaction the server refuses it, 25P02, as
                    // PostgreSQL would.)
                    _ => return Ok(Deallocation::PassOn),
                }
            }
        };
        let tag = match target {
            None => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            Some(name) => {
                self.statements.forget(&name);
                "DEALLOCATE"
            }
        };
        // A simple Query, even one answered here, destroys the unnamed statement.
        self.statements.query_sent();
        messages::command_complete(&mut self.client_out, tag);
        self.local_ready(status);
        self.client_in.advance(header.len);
        Ok(Deallocation::Answered)
    }

    /// Gives back the startup settings a reset took (see [`params::restore_statement`]),
    /// in a hidden statement sent before the client's next message (`tag`), if the client
    /// keeps its backend and it is idle: outside a transaction, with nothing under way
    /// (a DEALLOCATE pgshield answers itself, or a Terminate, does not wait for it). In
    /// session mode, where nothing prepares the client's unnamed statement again, not
    /// while one the client parsed since the reset may be used: only before a Query
    /// (which drops it anyway) or an unnamed Parse (which replaces it) then.
    fn restore_startup_settings(&mut self, tag: u8) {
        let Some(follow_up) = self.follow_up.as_mut() else {
            return;
        };
        // (A Parse whose name has not arrived yet may be of the unnamed statement.)
        let name = self.client_in.get(HEADER_LEN).filter(|_| tag == b'P');
        let unnamed_parse = name == Some(&0);
        let keeps = match self.mode {
            PoolMode::Session => tag == b'Q' || unnamed_parse || !follow_up.unnamed_parsed,
            // (Also one not pinned, still holding its backend while pgshield reads back
            // what its transaction set: what it sends meanwhile runs there.)
            PoolMode::Transaction => true,
        };
        let backend = self.backend.as_mut().filter(|_| keeps);
        let Some(server) = backend
            .map(|b| b.server())
            .filter(|s| s.replies.is_idle_but_hidden() && self.client_msg.left == 0)
        else {
            follow_up.unnamed_parsed |= tag == b'P' && name.is_none_or(|&b| b == 0);
            return;
        };
        let reset = std::mem::take(&mut follow_up.restore);
        let client = (&self.settings, &self.client_view);
        let out = &mut self.server_out;
        // (Never the role here: what the client did since may have set it.)
        let restored = push_restore(client, (&reset, false), server, out, &mut self.follow_up);
        // Transaction mode: what follows is read under the settings given back, once
        // they are reported.
        let transaction = self.mode == PoolMode::Transaction;
        if let Some(restored) = restored.filter(|r| r.parse && transaction) {
            self.parse_env_unsettled = unsettled(self.parse_env_unsettled, restored.flags);
        }
    }

    /// Whether all of a client message that must be read whole has arrived (room is made
    /// for the rest if not; its size was checked against listen.max_message_size).
    fn whole_message_arrived(&mut self, header: Header) -> Result<bool, End> {
        if self.client_in.len() >= header.len {
            return Ok(true);
        }
        let missing = header.len - self.client_in.len();
        self.client_in
            .reserve(missing.min(crate::buffers::RESERVE_AHEAD));
        Ok(false)
    }

    /// Starts passing one client message to the backend the client holds. In transaction
    /// mode statement names are translated first (see `prepared.rs`): that may need more
    /// of the message (false), inject messages before it, rewrite its head, or answer it.
    fn start_passing(&mut self, header: Header) -> Result<bool, End> {
        let translated = self.mode == PoolMode::Transaction
            && matches!(header.tag, b'P' | b'B' | b'D' | b'C' | b'Q');
        // (An Execute is read whole while a portal that drops the client's statements is
        // bound: which portal it runs tells whether they go.)
        let execute_read = header.tag == b'E'
            && self
                .backend
                .as_ref()
                .is_some_and(|b| b.server_ref().replies.has_dropping_portal());
        if ((translated && header.tag != b'B') || execute_read)
            && !self.whole_message_arrived(header)?
        {
            return Ok(false);
        }
        if self.mode == PoolMode::Transaction && header.tag == b'F' {
            // A fastpath call (large objects, say) may do anything to the session.
            let reason = PinReason::Unclassified;
            pin(
                &mut self.pinned,
                &self.shared,
                self.id,
                self.pool.name(),
                reason,
            );
        }
        if self
            .follow_up
            .as_ref()
            .is_some_and(|f| !f.restore.is_empty())
        {
            // (First: what this message is read under may be what it gives back.)
            self.restore_startup_settings(header.tag);
        }
        let parse_env = self.parse_env();
        // Session mode: only a reset of settings is looked for (see `restore_after`), and a
        // LOAD, in a Query short enough to hold whole (a LOAD in a Parse as well).
        let mut session_restore_behind = None;
        if self.mode == PoolMode::Session
            && header.tag == b'P'
            && header.len <= RESET_SCAN_LIMIT
            && self.pinned != Some(PinReason::Load)
        {
            if !self.whole_message_arrived(header)? {
                return Ok(false);
            }
            let mut body = &self.client_in[HEADER_LEN..header.len];
            let text = crate::protocol::frame::take_cstr_bytes(&mut body)
                .and_then(|_name| crate::protocol::frame::take_cstr_bytes(&mut body))
                .ok_or_else(|| End::ClientProtocol("malformed Parse message".into()))?;
            // (Most texts have no "load" at all: those are not read further.)
            if memchr::memchr2(b'l', b'L', text).is_some()
                && text.windows(4).any(|w| w.eq_ignore_ascii_case(b"load"))
                && sql::classify_in(text, parse_env).pin == Some(PinReason::Load)
            {
                self.pinned = Some(PinReason::Load);
            }
        }
        if self.mode == PoolMode::Session && header.tag == b'Q' && header.len <= RESET_SCAN_LIMIT {
            if !self.whole_message_arrived(header)? {
                return Ok(false);
            }
            let mut body = &self.client_in[HEADER_LEN..header.len];
            let query = crate::protocol::frame::take_cstr_bytes(&mut body)
                .ok_or_else(|| End::ClientProtocol("malformed Query message".into()))?;
            let effects = sql::classify_in(query, parse_env);
            if effects.pin == Some(PinReason::Load) {
                // What a library loads stays in the server process after DISCARD ALL (its
                // hooks): that backend is closed when the client leaves (`cleanup`), as in
                // transaction mode. (Nothing else reads `pinned` in session mode, where a
                // client keeps its backend anyway.)
                self.pinned = Some(PinReason::Load);
            }
            if effects.resets {
                let idle = self
                    .backend
                    .as_mut()
                    .is_some_and(|b| b.server().replies.is_idle_but_hidden());
                session_restore_behind = restore_after(&effects, idle);
                if session_restore_behind.is_none() {
                    let follow_up = self.follow_up.get_or_insert_with(Default::default);
                    follow_up.restore.note_resets(&effects);
                    // (This Query drops the unnamed statement.)
                    follow_up.unnamed_parsed = false;
                }
            }
        }
        let Some(backend) = self.backend.as_mut() else {
            return Ok(true);
        };
        if self.request_sent.is_none() {
            self.request_sent = Some(crate::epoch::instant());
        }
        let server = backend.server();
        if header.tag == b'E' {
            server.statements.portal_ran();
        }
        if !translated {
            if execute_read {
                let mut body = &self.client_in[HEADER_LEN..header.len];
                let portal = crate::protocol::frame::take_cstr_bytes(&mut body)
                    .ok_or_else(|| End::ClientProtocol("malformed Execute message".into()))?;
                // (Taken now, for what follows it in the pipeline; given back if it does
                // not run.)
                let undo = server.replies.take_dropping_portal(portal).then(|| {
                    crate::prepared::Undo::Dropped {
                        names: self.statements.take_named(),
                    }
                });
                server.replies.sent_with(b'E', Hide::No, undo);
                // (Skipped at once, behind an error already reported: the names are the
                // client's again before its next message is translated.)
                take_back_undone(&mut self.statements, server);
            } else {
                server.replies.sent(header.tag);
            }
            self.client_msg = Passing {
                left: header.len,
                forward: true,
            };
            if let Some((reset, role)) = session_restore_behind {
                self.client_msg
                    .pass(&mut self.client_in, &mut self.server_out);
                let client = (&self.settings, &self.client_view);
                let out = &mut self.server_out;
                push_restore(client, (&reset, role), server, out, &mut self.follow_up);
            }
            return Ok(true);
        }
        // (Only a simple Query's reset gets its restore right behind it.)
        let idle_before = header.tag == b'Q' && server.replies.is_idle_but_hidden();
        let available = self.client_in.len().min(header.len);
        // A Query's effects, worked out first (it is whole, as checked above).
        let mut query_effects = None;
        let translated = if header.tag == b'Q' {
            let translated = self.statements.translate_query(&mut server.statements);
            let mut body = &self.client_in[HEADER_LEN..header.len];
            let query = crate::protocol::frame::take_cstr_bytes(&mut body)
                .ok_or_else(|| End::ClientProtocol("malformed Query message".into()))?;
            let effects = sql::classify_in(query, parse_env);
            if effects.runs_proxy_statement {
                // (Without its terminating zero.)
                let text = HEADER_LEN..header.len - 1;
                sql::hide_proxy_statements(&mut self.client_in[text], parse_env, &[]);
            }
            if effects.is_empty() {
                // Nearly every Query changes nothing of the session: it is passed on here,
                // as the general path below would pass it, without that path's work.
                self.checked = None;
                server.replies.sent_with(b'Q', Hide::No, translated.undo);
                self.client_msg = Passing {
                    left: header.len,
                    forward: true,
                };
                take_back_undone(&mut self.statements, server);
                return Ok(true);
            }
            query_effects = Some(effects);
            translated
        } else {
            self.statements
                .translate(
                    &self.pool.statements,
                    &mut server.statements,
                    &self.client_in[..available],
                    header.len,
                    &mut self.server_out,
                    Self::situation(&self.limits, parse_env, &server.replies),
                )
                .map_err(|e| End::ClientProtocol(e.to_string()))?
        };
        if translated.translation == Translation::NeedMore {
            // Only a Bind whose two names have not all arrived gets here.
            if available >= MAX_BIND_NAMES {
                return Err(End::ClientProtocol("Bind names longer than 64 KiB".into()));
            }
            return Ok(false);
        }
        let metrics = self.pool.metrics();
        // (A Bind that waited while the backend prepared and described its statement.)
        let after_check = self.checked.take().is_some_and(|checked| {
            translated
                .bound
                .as_ref()
                .is_some_and(|b| Arc::ptr_eq(b, &checked))
        });
        // (A DEALLOCATE's stand-in prepares nothing of the client's.)
        let counted = !translated.stand_in;
        let prepared_here = counted && translated.injected.iter().any(|i| i.tag == b'P');
        let answered = matches!(translated.translation, Translation::Answered);
        let named = counted
            && (answered
                || matches!(
                    translated.translation,
                    Translation::Rewrite { .. }
                        | Translation::Rewritten { .. }
                        | Translation::Replace { .. }
                ));
        match header.tag {
            // Refused: the client holds as many statements as it may.
            b'P' if matches!(translated.translation, Translation::Replace { .. }) => {
                metrics.prepared_refused.increment(1);
                tracing::debug!(client = %self.id, "Parse refused: pool.max_client_prepared_statements reached");
            }
            // Prepared on this backend now: the client's own Parse, or one pgshield adds.
            b'P' if named && !answered => metrics.prepared_misses.increment(1),
            b'P' if answered => metrics.prepared_hits.increment(1),
            _ if prepared_here => metrics.prepared_misses.increment(1),
            // A Bind of a named statement the backend already had (not one that waited
            // for it to be prepared there: counted as a miss then).
            b'B' if named && !after_check => metrics.prepared_hits.increment(1),
            _ => {}
        }
        for injected in translated.injected {
            if matches!(injected.undo, Some(crate::prepared::Undo::Evicted { .. })) {
                metrics.prepared_evictions.increment(1);
            }
            server
                .replies
                .sent_with(injected.tag, Hide::KeepErrors, injected.undo);
            if let Some(checked) = translated.check.as_ref().filter(|_| injected.tag == b'D') {
                server.replies.uses(Arc::clone(checked));
            }
        }
        if translated.translation == Translation::Hold {
            // The client's message waits (in `client_in`) for the hidden Describe's reply.
            self.checking = translated.check;
            return Ok(false);
        }
        // What the statement does to the session.
        let effects = match (header.tag, &translated.bound) {
            (b'Q', _) => query_effects.map(Cow::Owned),
            // (Not for a stale statement's Bind: it is refused, below.)
            (b'B', Some(statement)) if !translated.refuse_stale => {
                Some(Cow::Borrowed(statement.effects()))
            }
            _ => None,
        };
        let mut translation = translated.translation;
        if translated.refuse_stale {
            // Its result columns changed since the client was told them: PostgreSQL fails
            // the Bind (drivers then prepare it again), and so does pgshield.
            translation = Self::refuse_bind(
                (&mut self.statements, &self.pool.statements, &self.limits),
                server,
                &mut self.server_out,
                (
                    translation,
                    &translated.portal,
                    crate::prepared::STALE_REFUSAL,
                ),
            );
        }
        let mut drops = None;
        // (Through the extended protocol: a Bind's, done by its portal's Execute.)
        let mut drops_names = false;
        let mut restore_behind = None;
        if let Some(effects) = effects.filter(|e| !e.is_empty()) {
            self.schema_changed |= effects.schema_change;
            match header.tag {
                b'Q' => drops = statement_drop(&effects),
                // Through the extended protocol: the backend's statements are taken for
                // gone, and the backend goes once this transaction is over (its state is
                // no longer known); the client's names go with an Execute of the portal.
                _ => {
                    if let Some(drop) = statement_drop(&effects) {
                        server.statements.dropping(&drop);
                        server.mark_broken();
                        drops_names = matches!(drop, StatementDrop::All(_));
                    }
                }
            }
            let pinned = self.pinned.is_some();
            let parse_setting = effects.all_settings
                || effects.local_parse_setting
                || effects
                    .settings
                    .iter()
                    .any(|name| crate::server::shapes_statements(name));
            let parse_flags = parse_setting.then(|| {
                unsettled_flags(effects.all_settings, effects.settings.iter())
                    | if effects.local_encoding {
                        ENCODING_UNSETTLED
                    } else {
                        0
                    }
                    | if effects.local_quotes {
                        QUOTES_UNSETTLED
                    } else {
                        0
                    }
            });
            let listens = effects.listens;
            if pinned && effects.pin == Some(PinReason::Load) {
                // Pinned already, for another reason: the backend is closed, not reset,
                // when the client leaves (see `cleanup`).
                self.pinned = Some(PinReason::Load);
            }
            let how = (pinned, &self.settings);
            if let Some(reason) = note_effects(&effects, &mut self.follow_up, how) {
                match self.pool.on_session_state() {
                    OnSessionState::Pin => pin(
                        &mut self.pinned,
                        &self.shared,
                        self.id,
                        self.pool.name(),
                        reason,
                    ),
                    // A refused Bind runs the stand-in prepared for it; a refused Query is
                    // replaced by one that fails the same way, on the server.
                    OnSessionState::Reject if header.tag == b'Q' => {
                        let mut head = BytesMut::new();
                        postgres_protocol::message::frontend::query(
                            &crate::prepared::refusal_statement(reason),
                            &mut head,
                        )
                        .map_err(|e| End::ClientProtocol(e.to_string()))?;
                        translation = Translation::Rewrite {
                            head,
                            consumed: header.len,
                        };
                    }
                    // A refused statement is not run: its Bind is replaced by one running a
                    // statement that fails with 0A000, in the same portal.
                    OnSessionState::Reject => {
                        let refusal = crate::prepared::refusal_statement(reason);
                        translation = Self::refuse_bind(
                            (&mut self.statements, &self.pool.statements, &self.limits),
                            server,
                            &mut self.server_out,
                            (translation, &translated.portal, &refusal),
                        );
                    }
                }
            }
            // A LISTEN that runs (the client is pinned: not refused) makes notifications
            // on this backend the client's from now on.
            if listens && self.pinned.is_some() {
                self.follow_up.get_or_insert_with(Default::default).listens = true;
            }
            let sets_search_path = effects.all_settings
                || effects
                    .settings
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case("search_path"));
            let unread = self
                .follow_up
                .as_ref()
                .is_some_and(|f| f.dirty.has("search_path"));
            if self.pinned.is_some() && (sets_search_path || unread) {
                // A pinned client's settings are not read back (it keeps its backend and
                // them): its search_path is not known from now on, so its statements are
                // its own, not another schema's. (What was to be read back never will be:
                // forgotten, so that this happens once for it.)
                keep_search_path_env(&mut self.follow_up, private_env());
                if let Some(f) = self.follow_up.as_mut() {
                    f.dirty = Dirty::default();
                }
            }
            let passed_on = header.tag == b'Q' && translation == Translation::PassOn;
            restore_behind = restore_after(&effects, idle_before).filter(|_| passed_on);
            if let Some(flags) = parse_flags {
                // A reset (Npgsql's and asyncpg's pool resets, pipelined with the next
                // command) returns to settings known now: the startup values given back
                // right behind it, or the server's defaults until they are. What follows
                // is read as before when those are the ones the client reads under now.
                let known = effects.resets
                    && reset_keeps_parse_env(&self.settings, &effects, restore_behind.is_some());
                if !known {
                    self.parse_env_unsettled = unsettled(self.parse_env_unsettled, flags);
                }
            }
            if restore_behind.is_none() && effects.resets {
                // Acted on if the client keeps this backend (pinned, now or later in this
                // transaction); forgotten when it lets go (read back then).
                let follow_up = self.follow_up.get_or_insert_with(Default::default);
                follow_up.restore.note_resets(&effects);
            }
        }
        if header.tag == b'B' && (drops_names || server.replies.has_dropping_portal()) {
            let portal = translated.portal.as_deref().unwrap_or_default();
            server.replies.bound(portal.as_bytes(), drops_names);
        }
        match translation {
            Translation::PassOn => {
                match drops {
                    Some(drops) => {
                        server.statements.dropping(&drops);
                        server.replies.sent_dropping(drops);
                    }
                    None => server
                        .replies
                        .sent_with(header.tag, Hide::No, translated.undo),
                }
                if let Some(statement) = translated.portal_of {
                    // Its RowDescription is the statement's columns, as a Describe of
                    // the statement's would be: kept, so that a backend preparing it
                    // afresh is checked against them (pgjdbc decodes rows by them).
                    server.replies.uses(statement);
                }
                self.client_msg = Passing {
                    left: header.len,
                    forward: true,
                };
            }
            rewrite @ (Translation::Rewrite { .. } | Translation::Rewritten { .. }) => {
                if let Some(consumed) = rewrite.put_head(&mut self.server_out) {
                    self.client_in.advance(consumed);
                    server
                        .replies
                        .sent_with(header.tag, Hide::No, translated.undo);
                    if let Some(statement) = translated.bound {
                        server.replies.uses(statement);
                    }
                    self.client_msg = Passing {
                        left: header.len - consumed,
                        forward: true,
                    };
                }
            }
            Translation::Replace { head, tag } => {
                self.server_out.extend_from_slice(&head);
                server.replies.sent_with(tag, Hide::No, None);
                self.client_msg = Passing {
                    left: header.len,
                    forward: false,
                };
            }
            Translation::Answered => {
                if let Some(fake) = translated.fake {
                    server.replies.fake(fake, translated.undo);
                }
                self.client_in.advance(header.len);
            }
            Translation::NeedMore | Translation::Hold => unreachable!("handled above"),
        }
        if let Some((reset, role)) = restore_behind {
            // Right behind the Query, before anything the client sent after it.
            self.client_msg
                .pass(&mut self.client_in, &mut self.server_out);
            let client = (&self.settings, &self.client_view);
            let out = &mut self.server_out;
            push_restore(client, (&reset, role), server, out, &mut self.follow_up);
        }
        take_back_undone(&mut self.statements, server);
        Ok(true)
    }

    /// A named statement's description from the server (a whole RowDescription or NoData):
    /// its result columns are noted, and the statement retired if they are not what its
    /// clients were told. (Out of line: the relay's common path does not need it.)
    #[inline(never)]
    fn look_at_description(
        pool: &Pool,
        client: &ClientId,
        statement: &Arc<crate::prepared::Statement>,
        reply: &[u8],
    ) {
        let shape = match reply.first() {
            Some(b'T') => Shape::of(&reply[HEADER_LEN..]),
            _ => Shape::NO_DATA,
        };
        if !statement.described(shape) {
            Self::retire_stale(pool, client, statement);
        }
    }

    /// A statement's result columns changed since clients were told them (a server said
    /// so, or described others): see `Registry::retire_stale`.
    fn retire_stale(pool: &Pool, client: &ClientId, statement: &Arc<crate::prepared::Statement>) {
        if pool.statements.retire_stale(statement) {
            tracing::info!(
                client = %client,
                statement = %statement.name(),
                "a prepared statement's result columns changed: it will be prepared again"
            );
        }
    }

    /// Replaces the client's Bind (`translation`, perhaps already written) by one, hidden,
    /// of `refusal`, a statement that fails, in the same portal, and an Execute of it: the
    /// client gets the error in place of its BindComplete, as PostgreSQL fails a Bind, and
    /// the server skips the rest of the batch (a Describe of the portal, its Execute).
    fn refuse_bind(
        (statements, registry, limits): (&mut ClientStatements, &Registry, &Limits),
        server: &mut Server,
        server_out: &mut BytesMut,
        (translation, portal, refusal): (Translation, &Option<String>, &str),
    ) -> Translation {
        // The client's Bind, rewritten, is already on its way: not any more.
        if let Translation::Rewritten { at, .. } = translation {
            server_out.truncate(at);
        }
        // (Its portal runs the refusal: a Describe of it is not the statement's.)
        server.statements.batch_ended();
        let refusal = registry.own(refusal);
        let (execute, injected) = statements.refusal_bind(
            &mut server.statements,
            &refusal,
            (
                portal.as_deref().unwrap_or_default(),
                // (pgshield's own statement, read under the server's defaults.)
                Self::situation(limits, 0, &server.replies),
            ),
            server_out,
        );
        for injected in injected {
            server
                .replies
                .sent_with(injected.tag, Hide::KeepErrors, injected.undo);
        }
        Translation::Replace {
            head: execute,
            tag: b'E',
        }
    }

    /// The client's parse environment (`ClientView::parse_env`), or while a setting it
    /// depends on may have changed unseen (`parse_env_unsettled`), one of this client's
    /// own for each such change, shared with nobody; after a change of encoding unseen
    /// (`SET client_encoding`), text is read as in one that may hide ASCII in its
    /// characters.
    fn parse_env(&self) -> u64 {
        use crate::server::ASCII_TRAILS;
        let env = self.client_view.parse_env();
        if self.parse_env_unsettled == 0 {
            // (A search_path of the client's own: see `server::shapes_statements`.)
            let own = self.follow_up.as_ref().map_or(0, |f| f.search_path_env);
            if own == 0 {
                return env;
            }
            let mixed = (env ^ own).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            return (mixed & !crate::server::PARSE_FLAGS) | (env & crate::server::PARSE_FLAGS);
        }
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        ("unsettled", self.parse_env_unsettled, env).hash(&mut hasher);
        let trails = self.parse_env_unsettled & ENCODING_UNSETTLED != 0 || env & ASCII_TRAILS != 0;
        (hasher.finish() & !crate::server::PARSE_FLAGS)
            | if trails { ASCII_TRAILS } else { 0 }
            | (env & crate::server::BACKSLASH_QUOTES)
            | if self.parse_env_unsettled & QUOTES_UNSETTLED != 0 {
                crate::server::QUOTES_UNSURE
            } else {
                0
            }
    }

    /// What translating a message sent to the backend now needs to know.
    fn situation(
        limits: &Limits,
        parse_env: u64,
        replies: &crate::server::state::ReplyTracker,
    ) -> crate::prepared::Situation {
        crate::prepared::Situation {
            max_named: limits.max_statements,
            batch_open: replies.batch_open(),
            batch: replies.batch(),
            can_hold: replies.answers_what_is_sent(),
            parse_env,
            failed_transaction: replies.reads_in_failed_transaction(),
        }
    }

    /// Answers a message that could not get a backend, as PostgreSQL answers a failed one.
    /// A ReadyForQuery pgshield answers itself: the request it ends took no backend
    /// time, and outside a transaction no transaction is running any more.
    fn local_ready(&mut self, status: u8) {
        messages::ready_for_query(&mut self.client_out, status);
        self.request_received = None;
        if status == b'I' {
            self.xact_started = None;
        }
    }

    /// Refuses the client's message (`tag`, `len` bytes) with `error`, and skips it.
    fn refuse_message(&mut self, tag: u8, len: usize, error: ErrorResponse) {
        if tag == b'Q' {
            // As in PostgreSQL, where a simple Query drops the unnamed statement first.
            self.statements.query_sent();
        }
        error.encode(&mut self.client_out);
        match tag {
            b'Q' | b'F' | b'S' => self.local_ready(self.idle_status()),
            _ => self.skip_until_sync = true,
        }
        self.client_msg = Passing {
            left: len,
            forward: false,
        };
    }

    /// Frames what the backend sent and passes it to the client, noting what matters.
    fn process_server_input(&mut self) -> Result<(), End> {
        while let Some(ready) = self.pass_server_messages()? {
            self.note_ready(ready);
        }
        Ok(())
    }

    /// Counts a ReadyForQuery passed to the client: the statement's, the request's and the
    /// transaction's times, and what follows from its end.
    fn note_ready(&mut self, ready: ReadySeen) {
        // query_timeout counts per statement: the next one starts now.
        self.busy_since = None;
        let m = self.pool.metrics();
        let stats = self.pool.stats.local();
        PoolStats::add(&stats.query_count, 1);
        self.counts.queries += 1;
        let now = crate::epoch::instant();
        // (The request, its transaction and its statement mostly started at one instant,
        // read in one poll: one subtraction serves all three.)
        let mut last: Option<(Instant, Duration)> = None;
        let mut since = |at: Instant| match last {
            Some((seen, took)) if seen == at => took,
            _ => {
                let took = now.saturating_duration_since(at);
                last = Some((at, took));
                took
            }
        };
        if ready.idle {
            if std::mem::take(&mut self.schema_changed) {
                // (Every pool's of the server database: each user's, the `_ro` pools,
                // any other name configured for it.)
                for pool in self.shared.pools.all() {
                    if pool.same_database_as(&self.pool) {
                        pool.statements.retire_all();
                    }
                }
            }
            PoolStats::add(&stats.xact_count, 1);
            self.counts.transactions += 1;
            if let Some(at) = self.xact_started.take() {
                let took = since(at).as_micros() as u64;
                PoolStats::add(&stats.xact_time_us, took);
            }
        }
        if let Some(at) = self.request_sent.take() {
            let took = since(at);
            m.query_duration.record(took.as_secs_f64());
            PoolStats::add(&stats.query_time_us, took.as_micros() as u64);
        }
        if let Some(at) = self.request_received.take() {
            m.client_query_duration.record(since(at).as_secs_f64());
        }
        // A pipelined client's next request (and transaction) starts now.
        if ready.pipelined {
            if ready.idle {
                self.xact_started = Some(now);
            }
            self.request_received = Some(now);
            self.request_sent = Some(now);
        }
    }

    /// Passes what the backend sent to the client up to its next ReadyForQuery (then
    /// returned, for [`Self::note_ready`]) or to the end of what has arrived (None).
    fn pass_server_messages(&mut self) -> Result<Option<ReadySeen>, End> {
        let Some(backend) = self.backend.as_mut() else {
            return Ok(None);
        };
        let server = backend.server();
        crate::buffers::reserve_empty(&mut self.client_out, server.read_buf.len());
        if self.server_msg.left == 0 {
            // Mostly the whole answer to what the client sent: taken in one step.
            if let Some(whole) = server.replies.answer_whole(&server.read_buf) {
                if let Some((statement, reply)) = &whole.described {
                    let reply = &server.read_buf[reply.clone()];
                    Self::look_at_description(&self.pool, &self.id, statement, reply);
                }
                self.client_out
                    .extend_from_slice(&server.read_buf[..whole.len]);
                server.read_buf.advance(whole.len);
                let idle = whole.status == TxStatus::Idle;
                return Ok(Some(ReadySeen {
                    idle,
                    pipelined: false,
                }));
            }
        }
        if server.read_buf.is_empty() {
            // (Fakes due now are written by the relay loop, after this.)
            return Ok(None);
        }
        loop {
            if self.server_msg.left > 0 {
                if !self
                    .server_msg
                    .pass(&mut server.read_buf, &mut self.client_out)
                {
                    return Ok(None);
                }
                continue;
            }
            // Between two server messages: replies pgshield gives itself go out in order.
            server.replies.write_due_fakes(&mut self.client_out);
            let untracked = server.replies.untracked_prefix(&server.read_buf);
            if untracked > 0 {
                self.client_out
                    .extend_from_slice(&server.read_buf[..untracked]);
                server.read_buf.advance(untracked);
            }
            let header = match peek_header(&server.read_buf) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(None),
                Err(e) => {
                    server.mark_broken();
                    return Err(End::ServerProtocol(e.to_string()));
                }
            };
            let readback = server.replies.answering_hidden_query();
            // A description of a named statement: its result columns are looked at.
            let described = matches!(header.tag, b'T' | b'n')
                .then(|| {
                    server
                        .replies
                        .describing()
                        .map(|(s, hidden)| (Arc::clone(s), hidden))
                })
                .flatten();
            let whole = matches!(header.tag, b'Z' | b'S' | b'E' | b'A')
                || (readback && header.tag == b'D')
                || described.is_some();
            if whole {
                if let Err(e) = header.check_size(DEFAULT_MAX_MESSAGE_SIZE) {
                    server.mark_broken();
                    return Err(End::ServerProtocol(e.to_string()));
                }
                if server.read_buf.len() < header.len {
                    let missing = header.len - server.read_buf.len();
                    server
                        .read_buf
                        .reserve(missing.min(crate::buffers::RESERVE_AHEAD));
                    return Ok(None);
                }
            }
            let status = (header.len > HEADER_LEN && server.read_buf.len() > HEADER_LEN)
                .then(|| server.read_buf[HEADER_LEN]);
            let disposition = match server.replies.received(header.tag, status) {
                Ok(d) => d,
                Err(_) => {
                    server.mark_broken();
                    return Err(End::ServerProtocol(out_of_step(header.tag)));
                }
            };
            // (Mostly nothing: looked at before anything is taken.)
            if server.replies.has_takebacks() {
                for undo in server.replies.take_undone().into_iter().rev() {
                    self.statements.undo(&mut server.statements, undo);
                }
                for (drop, happened) in server.replies.take_drops() {
                    match (drop, happened) {
                        (drop, true) => {
                            server.statements.dropping(&drop);
                            if let StatementDrop::All(mark) = drop {
                                self.statements.drop_made_before(mark);
                            }
                        }
                        // It may or may not have happened: that backend's statements are
                        // unknown now; it is closed once this client lets go of it.
                        (_, false) => server.mark_broken(),
                    }
                }
            }
            if let Some((statement, hidden)) = described {
                let reply = &server.read_buf[..header.len];
                Self::look_at_description(&self.pool, &self.id, &statement, reply);
                if hidden
                    && self
                        .checking
                        .as_ref()
                        .is_some_and(|c| Arc::ptr_eq(c, &statement))
                {
                    // Described: the client's message held for it goes on (refused if
                    // the columns changed).
                    self.checked = self.checking.take();
                }
            }
            let forward = disposition == Disposition::Forward;
            if !forward && whole && !readback {
                // (The description a hidden Describe asked for.)
                server.read_buf.advance(header.len);
                continue;
            }
            if readback && !forward {
                if header.tag == b'D' {
                    if let Some(front) = self
                        .follow_up
                        .as_mut()
                        .and_then(|f| f.readbacks.front_mut())
                    {
                        if !front.names.is_empty() {
                            let row = &server.read_buf[HEADER_LEN..header.len];
                            front.values = crate::server::parse_data_row_raw(row);
                        }
                    }
                }
                if header.tag == b'E' {
                    let body = &server.read_buf[HEADER_LEN..header.len];
                    let message = messages::error_field(body, b'M').unwrap_or_default();
                    tracing::info!(
                        client = %self.id,
                        error = %String::from_utf8_lossy(message),
                        "a statement pgshield sent for the client's settings failed"
                    );
                    let role = self
                        .follow_up
                        .as_ref()
                        .and_then(|f| f.readbacks.front())
                        .is_some_and(|r| r.role);
                    if role {
                        // Not to run on as the login's role: the client goes, its backend
                        // (a reply still owed) is closed.
                        let error = ErrorResponse::fatal(
                            sqlstate::INSUFFICIENT_PRIVILEGE,
                            format!(
                                "pgshield could not set the role this session started as again \
                                 after a reset: {}",
                                String::from_utf8_lossy(message)
                            ),
                        );
                        server.mark_broken();
                        return Err(End::Fatal(error));
                    }
                }
                if header.tag == b'Z' {
                    if let Some(done) = self
                        .follow_up
                        .as_mut()
                        .and_then(|f| f.readbacks.pop_front())
                        .filter(|done| !done.names.is_empty())
                    {
                        let pinning = apply_readback(done, &mut self.settings, server);
                        let own = if pinning.is_some() || self.pinned.is_some() {
                            // (Failed: what it was to read, a search_path perhaps, is not
                            // known; or pinned since it was sent: what the client has
                            // set since is not read back.)
                            private_env()
                        } else {
                            search_path_env(&self.settings)
                        };
                        keep_search_path_env(&mut self.follow_up, own);
                        if let Some(reason) = pinning {
                            pin(
                                &mut self.pinned,
                                &self.shared,
                                self.id,
                                self.pool.name(),
                                reason,
                            );
                        }
                    }
                }
                if whole {
                    server.read_buf.advance(header.len);
                } else {
                    self.server_msg = Passing {
                        left: header.len,
                        forward: false,
                    };
                }
                continue;
            }
            if !whole {
                // Rows, COPY data and the rest stream through: only the tag matters.
                self.server_msg = Passing {
                    left: header.len,
                    forward,
                };
                continue;
            }
            // Pass it on, then look at the copy (the backend's buffer is free again).
            let start = self.client_out.len();
            self.client_out
                .extend_from_slice(&server.read_buf[..header.len]);
            server.read_buf.advance(header.len);
            let body = &self.client_out[start + HEADER_LEN..];
            match header.tag {
                b'S' => {
                    if let Some((name, value)) = parse_parameter_status(body) {
                        let changed = self.client_view.get(name) != Some(value);
                        self.client_view.set(name, value);
                        server.note_param(name, value);
                        // Who the session is cannot follow the client: what the server
                        // reports catches what statements did not show (a function, say).
                        if changed
                            && self.mode == PoolMode::Transaction
                            && (name == "session_authorization" || name == "is_superuser")
                        {
                            let reason = PinReason::SessionAuthorization;
                            pin(
                                &mut self.pinned,
                                &self.shared,
                                self.id,
                                self.pool.name(),
                                reason,
                            );
                        }
                        if params::SETTABLE_REPORTED
                            .iter()
                            .any(|p| p.eq_ignore_ascii_case(name))
                        {
                            // The client changed it (SET, RESET, a function): it follows.
                            self.settings.record(name, value);
                            // (PostgreSQL 18 reports search_path: one putting pg_temp first
                            // makes tables temporary, as at login.)
                            if name.eq_ignore_ascii_case("search_path")
                                && self.mode == PoolMode::Transaction
                                && sql::path_puts_temp_schema_first(value)
                            {
                                pin(
                                    &mut self.pinned,
                                    &self.shared,
                                    self.id,
                                    self.pool.name(),
                                    PinReason::TempTable,
                                );
                            }
                            // (A pinned client's statements stay its own: a new search_path
                            // of its own, a new environment.)
                            if self.pinned.is_none() {
                                let own = search_path_env(&self.settings);
                                keep_search_path_env(&mut self.follow_up, own);
                            } else if name.eq_ignore_ascii_case("search_path") {
                                keep_search_path_env(&mut self.follow_up, private_env());
                            }
                            self.reported_since_borrow = true;
                            server.note_applied(name, value);
                        }
                    }
                }
                b'E' => {
                    // The batch fails: a hidden Describe in it will not be answered (one
                    // in a later batch still will, unless the replies can no longer be
                    // matched).
                    if self.checking.as_ref().is_some_and(|c| {
                        !server.replies.owes_description_of(c)
                            || !server.replies.answers_what_is_sent()
                    }) {
                        self.checking = None;
                    }
                    if let Some((name, shared)) = server.replies.take_failed_reprepare() {
                        // PostgreSQL's error names the client's statement, not the shared
                        // one the Parse went under (in whatever language and encoding the
                        // server speaks: only the name's bytes are replaced).
                        let renamed = (messages::error_field(body, b'C') == Some(b"42P05"))
                            // (A name cut inside a character is keyed with what was
                            // kept of it after a NUL: not shown.)
                            .then(|| {
                                let shown = name.split('\0').next().unwrap_or_default();
                                messages::renamed_error(body, &shared, shown)
                            })
                            .flatten();
                        if let Some(renamed) = renamed {
                            self.client_out.truncate(start);
                            self.client_out.extend_from_slice(&renamed);
                            continue;
                        }
                    }
                    let stale_plan = messages::is_stale_plan_error(body);
                    if stale_plan {
                        if let Some(stale) = server.replies.take_failed_statement() {
                            Self::retire_stale(&self.pool, &self.id, &stale);
                        }
                        if messages::error_field(body, b'R') != Some(b"RevalidateCachedQuery") {
                            // pgshield's refusal (`STALE_REFUSAL`): given the routine of
                            // PostgreSQL's own error, by which drivers know it.
                            self.client_out.truncate(start);
                            messages::stale_plan_error(&mut self.client_out);
                            continue;
                        }
                    }
                    if let Some(fatal) =
                        ErrorResponse::parse(body).filter(|e| e.severity.is_fatal())
                    {
                        server.mark_broken();
                        if self.mode == PoolMode::Transaction && self.pinned.is_none() {
                            // Held back: the session may carry on on another backend
                            // (`carry_on`); if not, the client gets it at the end.
                            self.client_out.truncate(start);
                            self.server_fatal = Some(Box::new(fatal));
                        } else {
                            self.server_sent_fatal = true;
                        }
                    }
                }
                b'A' if self.mode == PoolMode::Transaction
                    && !self.follow_up.as_ref().is_some_and(|f| f.listens) =>
                {
                    // A notification to a client not seen to LISTEN (pinned or not): the
                    // backend listens for a client that held it before, or for this one
                    // through a function no statement showed. Not passed on (it may be
                    // another tenant's); the backend is not lent again unreset.
                    self.client_out.truncate(start);
                    if !server.heard_notification() {
                        tracing::warn!(client = %self.id, pool = %self.pool.name(), "a notification came on a backend no client listens on through pgshield (a LISTEN inside a function?): not passed on; the backend is not lent again unless reset");
                    }
                    server.note_notification();
                }
                b'Z' => {
                    // (pgshield's own hidden queries are no request of the client's.)
                    let pipelined =
                        !server.replies.at_boundary() && !server.replies.is_idle_but_hidden();
                    let idle = body.first() == Some(&b'I');
                    return Ok(Some(ReadySeen { idle, pipelined }));
                }
                _ => {}
            }
        }
    }

    /// Transaction mode: once the backend is idle and nothing is half-passed either way,
    /// it goes back to the pool (before the client's replies are written). If the client's
    /// statements may have changed settings, they are read back first: the transaction
    /// has ended, so what the server says is what follows the client.
    fn release_if_done(&mut self) {
        if self.pinned.is_some() {
            // (Kept, but what the statements changed has been reported once all is
            // answered: see `parse_env`.)
            let idle = self
                .backend
                .as_mut()
                .is_some_and(|b| b.server().replies.is_idle());
            if idle {
                self.parse_env_unsettled = 0;
            }
            return;
        }
        let Some(backend) = self.backend.as_mut() else {
            return;
        };
        let server = backend.server();
        let quiet = server.read_buf.is_empty()
            && self.server_out.is_empty()
            && self.client_msg.left == 0
            && self.server_msg.left == 0;
        if quiet && server.replies.unsure_but_over() {
            // Its replies cannot be matched any more (a failed COPY FROM STDIN): pgshield
            // first finds its place among the replies again (`resync_if_unsure`; what
            // the client pipelined behind the COPY is answered meanwhile), then lets go
            // of it, closed if its prepared statements may be other than recorded (a
            // statement message was in doubt, not only Syncs). (Settings it may have
            // changed are read back after its next transaction.)
            if server.replies.statements_unsure() {
                server.mark_broken();
            }
            return;
        } else if !quiet || !server.replies.is_idle() {
            return;
        } else if let Some(follow_up) = self.follow_up.as_mut().filter(|f| !f.dirty.is_empty()) {
            // What the statements changed has been reported by now (all is answered): a
            // message the client sends while the read-back runs is read under it. Not a
            // search_path (the server reports none before PostgreSQL 18): known once read
            // back.
            if !follow_up.dirty.has("search_path") {
                self.parse_env_unsettled = 0;
            }
            let mut names = std::mem::take(&mut follow_up.dirty.names);
            let reset = std::mem::take(&mut follow_up.dirty.reset);
            let all_reset = follow_up.dirty.all;
            if std::mem::take(&mut follow_up.dirty.all) {
                names.extend(self.settings.iter().map(|(k, _)| k.to_ascii_lowercase()));
                names.extend(server.applied().iter().map(|(k, _)| k.to_ascii_lowercase()));
            }
            names.sort();
            names.dedup();
            // (Who the session is changes only by what pins, or the server reports.)
            names.retain(|n| n != "session_authorization" && !params::transaction_only(n));
            if !names.is_empty() {
                // Only what this session set counts (a SET the server refused, or of a
                // setting a session cannot change, leaves the default: nothing to follow).
                // The role, which pg_settings does not show, is read as it is: `none` is
                // none set (a RESET ROLE, a DISCARD ALL; not a rolled-back one).
                let columns: Vec<String> = names
                    .iter()
                    .map(|n| match n.as_str() {
                        "role" => "NULLIF(pg_catalog.current_setting('role'), 'none')"
                            .to_owned(),
                        // A custom setting no extension defines (`myapp.tenant`) is a
                        // placeholder, which `pg_settings` does not show: its value is
                        // the session's; empty after a reset of it, which returns to the
                        // client's startup value (or none), as in PostgreSQL.
                        n if n.contains('.') && !all_reset && !reset.iter().any(|r| r.eq_ignore_ascii_case(n)) => format!(
                            "COALESCE((SELECT pg_catalog.current_setting(s.name) \
                             FROM pg_catalog.pg_settings s WHERE pg_catalog.lower(s.name) = {0} \
                             AND s.source = 'session'), CASE WHEN NOT EXISTS (SELECT FROM \
                             pg_catalog.pg_settings s WHERE pg_catalog.lower(s.name) = {0}) \
                             THEN pg_catalog.current_setting({0}, true) END)",
                            escape_literal(n)
                        ),
                        n if n.contains('.') => format!(
                            "COALESCE((SELECT pg_catalog.current_setting(s.name) \
                             FROM pg_catalog.pg_settings s WHERE pg_catalog.lower(s.name) = {0} \
                             AND s.source = 'session'), CASE WHEN NOT EXISTS (SELECT FROM \
                             pg_catalog.pg_settings s WHERE pg_catalog.lower(s.name) = {0}) \
                             THEN NULLIF(pg_catalog.current_setting({0}, true), '') END)",
                            escape_literal(n)
                        ),
                        n => format!(
                            "(SELECT pg_catalog.current_setting(s.name) FROM pg_catalog.pg_settings s \
                             WHERE pg_catalog.lower(s.name) = {} AND s.source = 'session')",
                            escape_literal(n)
                        ),
                    })
                    .collect();
                let sql = format!("SELECT {}", columns.join(", "));
                if postgres_protocol::message::frontend::query(&sql, &mut self.server_out).is_ok() {
                    server.replies.sent_with(b'Q', Hide::All, None);
                    server.statements.forget_unnamed();
                    follow_up.readbacks.push_back(Readback {
                        names,
                        values: None,
                        role: false,
                    });
                    return;
                }
            }
        }
        self.cancel.detach();
        // (What the statements changed has been reported by now.)
        self.parse_env_unsettled = 0;
        if let Some(follow_up) = self.follow_up.as_mut() {
            // Read back instead (a reset shows as no session value).
            follow_up.restore = Dirty::default();
        }
        if let Some(backend) = self.backend.take() {
            self.registered.info.set_server(None);
            // A FATAL that came with its last reply belongs to it (it is closed, broken).
            self.server_fatal = None;
            self.reported_since_borrow = false;
            // Closed instead if a cancel was sent to it or it is otherwise unfit.
            (*backend).release();
        }
    }

    /// Borrows a backend for this client, watching the client while it waits, and brings
    /// the backend's settings in line with the client's (`lent`: one lent already, whose
    /// due health check is part of the wait). `Ok(Err(_))`: the client gets
    /// that error and stays connected. A client that hangs up while queued leaves the queue
    /// and its statements are not run: it gave up on them (and may retry elsewhere).
    async fn acquire_backend(
        &mut self,
        lent: Option<Backend>,
    ) -> Result<Result<(), ErrorResponse>, End> {
        if self.shared.shutdown.is_draining() {
            return Err(End::Shutdown);
        }
        let pool = Arc::clone(&self.pool);
        // A paused pool (PAUSE) lends nothing until RESUME; a drain meanwhile ends the wait.
        let shared = Arc::clone(&self.shared);
        // A backend lent without its due health check is checked first, as part of the
        // borrow: waited for as a borrow is, and replaced (with its place) if it fails.
        let borrow = async {
            let mut held = None;
            if let Some(backend) = lent {
                match pool.checked(backend).await {
                    Ok(backend) => return Ok(backend),
                    Err(place) => held = place,
                }
            }
            pool.borrow_unless_paused(&shared.shutdown, held).await
        };
        tokio::pin!(borrow);
        // Usually a backend is idle: no queue to join. Otherwise the client is counted as
        // waiting (SHOW POOLS) until it gets one.
        let first = poll_fn(|cx| Poll::Ready(std::future::Future::poll(borrow.as_mut(), cx))).await;
        // (A backend lent at once was not waited for: no clock to read.)
        let waiting_since = first.is_pending().then(Instant::now);
        let waiting = first.is_pending().then(|| {
            self.registered.info.set_waiting(waiting_since);
            // Back to active however the wait ends (a borrow error, a hang-up…).
            (pool.wait(), ActiveOnDrop(Arc::clone(&self.registered.info)))
        });
        // A cancel for the client ends the wait, until it holds the backend (settling it
        // included).
        let queued = first.is_pending().then(|| self.cancel.queued());
        let cancelled = queued.as_ref().map(|queued| Arc::clone(&queued.wait));
        let mut ready = match first {
            Poll::Ready(result) => Some(result),
            Poll::Pending => None,
        };
        // One NOTICE for a client queued longer than `queue_notice_after` (a complete
        // message: the client has no backend, so nothing is half-written to it).
        // (A timer only for a client that does wait: most borrows do not.)
        let mut notice = self
            .limits
            .queue_notice
            .zip(waiting_since)
            .and_then(|(after, since)| since.checked_add(after))
            .map(|at| Box::pin(tokio::time::sleep_until(at.into())));
        let backend = loop {
            if let Some(result) = ready.take() {
                match result {
                    Ok(backend) => break backend,
                    Err(crate::pool::BorrowError::Closed(_)) => return Err(End::Shutdown),
                    Err(e) => {
                        tracing::info!(client = %self.id, pool = %pool.name(), error = %e, "borrow failed");
                        return Ok(Err(e.to_client_error()));
                    }
                }
            }
            let read_ahead = self.client_in.len() < QUEUED_READ_LIMIT;
            tokio::select! {
                biased;
                result = &mut borrow => ready = Some(result),
                _ = async {
                    match notice.as_mut() {
                        Some(timer) => timer.as_mut().await,
                        None => std::future::pending().await,
                    }
                }, if notice.is_some() => {
                    notice = None;
                    let status = pool.status();
                    messages::notice(
                        &mut self.client_out,
                        sqlstate::SUCCESSFUL_COMPLETION,
                        &format!(
                            "pgshield: waiting for a server connection in pool {} (all {} are in use, {} clients queued)",
                            pool.name(),
                            status.max_size,
                            pool.waiting(),
                        ),
                    );
                    tracing::debug!(client = %self.id, pool = %pool.name(), "client told it is queued");
                }
                _ = async {
                    match &cancelled {
                        Some(wait) => wait.cancelled().await,
                        None => std::future::pending().await,
                    }
                }, if cancelled.is_some() => {
                    return Ok(Err(self.cancelled_while_queued()));
                }
                event = poll_fn(|cx| self.poll_io(cx, read_ahead, false)) => match event {
                    Event::Data => self.note_activity(),
                    Event::Reloaded | Event::Flushed => {}
                    Event::Forced => return Err(End::ForcedShutdown),
                    Event::Killed => return Err(End::Killed),
                    _ => return Err(End::ClientGone),
                },
            }
        };
        drop(waiting);
        let waited = waiting_since.map_or(Duration::ZERO, |since| since.elapsed());
        self.note_borrowed(waited);
        // Usually the backend needs nothing applied. (Boxed when it does: this future is
        // itself boxed per borrow that waits, and copied whole into its box.)
        if self.needs_settling(&backend) {
            return Box::pin(self.settle_backend(backend, queued)).await;
        }
        // (A cancel as the backend came, the borrow having won the race, ends the wait
        // all the same: not run, as the client asked; the backend goes back unused.)
        match &queued {
            Some(queued) => Ok(self.hold_unless_cancelled(backend, queued)),
            None => {
                self.hold(backend);
                Ok(Ok(()))
            }
        }
    }

    /// What a client whose wait for a backend a cancel ended gets: PostgreSQL's answer to
    /// a cancelled statement (nothing of it has run).
    fn cancelled_while_queued(&self) -> ErrorResponse {
        tracing::info!(client = %self.id, pool = %self.pool.name(), "a cancel request ended the client's wait for a backend");
        ErrorResponse::error(
            sqlstate::QUERY_CANCELED,
            "canceling statement due to user request",
        )
    }

    /// Takes a lent backend once the client's settings are applied to it (and, after a
    /// lost transaction, a failed one recreated); a backend that refused them is closed.
    /// (`queued`: the client's wait for it, which a cancel ends until it is held.)
    async fn settle_backend(
        &mut self,
        mut backend: Backend,
        queued: Option<crate::client::cancel::Queued>,
    ) -> Result<Result<(), ErrorResponse>, End> {
        // (The client holds nothing yet: a cancel meanwhile would find nothing to cancel.)
        let queued = queued.unwrap_or_else(|| self.cancel.queued());
        let lost_transaction = self.lost_transaction;
        let mut settled = self.apply_settings(&mut backend).await;
        if settled.is_ok() && self.lost_transaction {
            settled = self
                .fail_transaction(&mut backend)
                .await
                .map_err(SettingsError::Server);
        }
        match settled {
            Ok(()) => {
                let held = self.hold_unless_cancelled(backend, &queued);
                if held.is_err() {
                    // Its failed transaction, recreated on the backend given back, is
                    // still to be recreated on the next.
                    self.lost_transaction = lost_transaction;
                }
                Ok(held)
            }
            Err(SettingsError::Refused(error)) => {
                // Whatever made the server refuse may be the backend's: do not lend it again.
                backend.discard();
                Err(End::Fatal(error.into_fatal()))
            }
            Err(SettingsError::Server(e)) => {
                backend.discard();
                Ok(Err(e.to_client_error(self.pool.name())))
            }
        }
    }

    /// What is left of a borrow after [`Self::take_idle_backend`], boxed: settings to
    /// apply, a health check, or the borrow itself, which may wait (None: held already).
    /// Its Err inside is the refusal.
    fn finish_taking(&mut self, taken: Taken) -> Option<Pin<Box<BorrowLeft<'_>>>> {
        Some(match taken {
            Taken::Held => return None,
            Taken::Settle(backend) => Box::pin(self.settle_backend(*backend, None)),
            Taken::Check(backend) => Box::pin(self.acquire_backend(Some(*backend))),
            Taken::Borrow => Box::pin(self.acquire_backend(None)),
        })
    }

    /// Takes an idle backend without a future, if one is lent at once (most borrows in
    /// transaction mode, which then cost no allocation): [`Taken::Held`] if it needs
    /// nothing more, [`Taken::Settle`] if the client's settings must be applied to it
    /// first, [`Taken::Check`] if its health check is due. Tried only while the pool has
    /// an idle backend and a free place, no borrower waits for one, and it is not paused
    /// (so never joining clients queued for a place); the borrow polled here is dropped
    /// if it would wait ([`Taken::Borrow`]: the boxed [`Self::acquire_backend`] borrows
    /// instead), and runs under [`crate::pool::lend_idle_only`], so dropping it loses
    /// nothing.
    fn take_idle_backend(&mut self, cx: &mut Context<'_>) -> Result<Taken, End> {
        if self.shared.shutdown.is_draining() {
            return Err(End::Shutdown);
        }
        let pool = Arc::clone(&self.pool);
        if let Some(backend) = pool.lend_warm() {
            // Paused meanwhile: as below.
            if pool.is_paused() {
                backend.discard();
                return Ok(Taken::Borrow);
            }
            return Ok(self.take_lent(backend));
        }
        // (Pinned where it is made: the future is large, and a move is a copy of it.)
        let borrow = std::pin::pin!(pool.lend_at_once());
        let Some(borrow) = borrow.as_pin_mut() else {
            return Ok(Taken::Borrow);
        };
        let polled = crate::pool::lend_idle_only(|| std::future::Future::poll(borrow, cx));
        let backend = match polled {
            Poll::Ready(Ok(backend)) if !pool.is_paused() => backend,
            // Paused meanwhile: PAUSE keeps none open (as `borrow_unless_paused`).
            Poll::Ready(Ok(backend)) => {
                backend.discard();
                return Ok(Taken::Borrow);
            }
            // None idle after all, or none fit to lend: the borrow that may wait, and
            // open one, handles that (and any error, which this one could only be
            // "would open" or a closed pool), in one place.
            Poll::Ready(Err(_)) | Poll::Pending => return Ok(Taken::Borrow),
        };
        if backend.server_ref().check_due {
            return Ok(Taken::Check(Box::new(backend)));
        }
        Ok(self.take_lent(backend))
    }

    /// A backend lent at once, and checked if it was due.
    fn take_lent(&mut self, backend: Backend) -> Taken {
        self.note_borrowed(Duration::ZERO);
        if self.needs_settling(&backend) {
            return Taken::Settle(Box::new(backend));
        }
        self.hold(backend);
        Taken::Held
    }

    /// Whether a lent backend needs [`Self::settle_backend`] before the client has it:
    /// its settings differ from the client's, or a lost transaction is to be recreated.
    fn needs_settling(&self, backend: &Backend) -> bool {
        self.lost_transaction || !backend.server_ref().settled_for(self.settings.as_str())
    }

    /// Counts a borrow that waited `waited` (zero: lent at once).
    fn note_borrowed(&self, waited: Duration) {
        self.pool.metrics().borrow_wait.record(waited.as_secs_f64());
        PoolStats::add(
            &self.pool.stats.local().wait_time_us,
            waited.as_micros() as u64,
        );
    }

    /// Holds a lent backend whose settings are the client's.
    fn hold(&mut self, backend: Backend) {
        self.cancel.attach(backend.server_ref());
        self.hold_attached(backend);
    }

    /// Holds the backend, unless a cancel ended the client's wait (`queued`) first: then
    /// the backend is given back.
    fn hold_unless_cancelled(
        &mut self,
        backend: Backend,
        queued: &crate::client::cancel::Queued,
    ) -> Result<(), ErrorResponse> {
        if !self
            .cancel
            .attach_unless_cancelled(backend.server_ref(), queued)
        {
            // (Closed if a failed transaction recreated for the client is open on it.)
            backend.release();
            return Err(self.cancelled_while_queued());
        }
        self.hold_attached(backend);
        Ok(())
    }

    /// [`Self::hold`], its cancel target set already.
    fn hold_attached(&mut self, mut backend: Backend) {
        let s = backend.server_ref();
        self.registered
            .info
            .set_server(Some(crate::client::registry::LentServer {
                id: s.id().0,
                pid: s.process_id(),
                host: s.host.as_ref().map(|h| h.index),
                opened_secs: s.opened_secs(),
                tls: s.stream.is_tls(),
            }));
        // Whatever this session noted of the socket while it last held this backend no
        // longer holds: another task may have read it since.
        backend.server().read_idle_in = 0;
        self.backend = Some(Box::new(backend));
    }

    /// Applies the client's settings the backend lacks and resets those it carries for
    /// others, in one round trip whose replies the client never sees; passes on the
    /// ParameterStatus changes it has not seen.
    async fn apply_settings(&mut self, backend: &mut Backend) -> Result<(), SettingsError> {
        let server = backend.server();
        if server.settled_for(self.settings.as_str()) {
            return Ok(());
        }
        let missing: Vec<(String, String)> = self
            .settings
            .missing_on(server)
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let extra: Vec<String> = self.settings.extra_on(server).map(str::to_owned).collect();
        let client_encoding = self
            .settings
            .get("client_encoding")
            .or_else(|| self.client_view.get("client_encoding"))
            .unwrap_or("UTF8");
        let server_encoding = self.client_view.get("server_encoding").unwrap_or("UTF8");
        let settings = &self.settings;
        let Some(sql) = params::apply_statement(
            missing.iter().map(|(k, v)| {
                let given = settings.as_given(k, v);
                let encoding = if given {
                    server_encoding
                } else {
                    client_encoding
                };
                (k.as_str(), v.as_str(), encoding)
            }),
            extra.iter().map(String::as_str),
        ) else {
            server.note_settled(self.settings.as_str());
            return Ok(());
        };
        let reply =
            match tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, Box::pin(server.run_internal(&sql)))
                .await
            {
                Ok(Ok(reply)) => reply,
                Ok(Err(e)) => return Err(SettingsError::Server(e)),
                Err(_) => {
                    server.mark_broken();
                    return Err(SettingsError::Server(ServerError::Protocol(
                        "no reply to applying the client's settings".into(),
                    )));
                }
            };
        if let Some(error) = reply.error {
            return Err(SettingsError::Refused(error));
        }
        for name in &extra {
            server.forget_applied(name);
        }
        for (name, value) in &missing {
            server.note_applied(name, value);
        }
        for (name, value) in &reply.param_changes {
            if self.client_view.get(name) != Some(value.as_str()) {
                self.client_view.set(name, value);
                messages::parameter_status(&mut self.client_out, name, value);
            }
        }
        Ok(())
    }

    /// What ends the session without waiting: its pin and cancel key are let go, its end
    /// logged. Returns the error the client is to be told, if any.
    fn ending(&mut self, end: &End) -> Option<ErrorResponse> {
        if self.pinned.is_some() {
            self.shared.pinned.remove(self.id.0);
        }
        let farewell = self.farewell(end);
        if self.limits.log_connections {
            let info = &self.registered.info;
            let c = &self.counts;
            tracing::info!(
                client = %self.id,
                peer = %info.addr,
                user = %info.user(),
                database = %info.database(),
                duration_ms = self.registered.info.connected_for().as_millis() as u64,
                transactions = c.transactions,
                queries = c.queries,
                bytes_in = c.bytes_in,
                bytes_out = c.bytes_out,
                reason = end.reason(),
                sqlstate = farewell.as_ref().map_or("", |e| e.code.as_str()),
                "client disconnected"
            );
        }
        match &end {
            End::ServerLost(e) => {
                tracing::warn!(client = %self.id, pool = %self.pool.name(), error = ?e, "server connection lost")
            }
            End::ServerProtocol(m) => {
                tracing::warn!(client = %self.id, pool = %self.pool.name(), m, "server protocol error")
            }
            End::ClientProtocol(m) => tracing::info!(client = %self.id, m, "client protocol error"),
            End::StatementStuck => {
                tracing::warn!(client = %self.id, pool = %self.pool.name(), "statement still running after its query_timeout cancel, the server silent since: closing the client and its backend")
            }
            End::ResultUnread => {
                tracing::warn!(client = %self.id, pool = %self.pool.name(), "the client reads nothing of a statement cancelled for query_timeout: closing it and its backend")
            }
            other => tracing::debug!(client = %self.id, reason = ?other, "session ended"),
        }
        // From here no cancel reaches the backend; one sent before has marked it.
        self.cancel.detach();
        farewell
    }

    /// Ends the session after [`Self::ending`]: returns or closes the backend, then says
    /// goodbye to the client (`farewell`).
    async fn finish(&mut self, end: End, farewell: Option<ErrorResponse>) {
        // Release before the last write: a slow client must not hold a backend.
        let mid_message_to_client = self.server_msg.left > 0;
        let running = self.server_busy();
        if let Some(backend) = self.backend.take() {
            let mut backend = *backend;
            let mid_message_to_server = self.client_msg.forward && self.client_msg.left > 0;
            let server_failed = matches!(
                end,
                End::ForcedShutdown
                    | End::Killed
                    | End::ServerLost(_)
                    | End::ServerProtocol(_)
                    | End::StatementStuck
                    | End::ResultUnread
            );
            if server_failed || mid_message_to_server || mid_message_to_client {
                if running && matches!(end, End::ForcedShutdown | End::Killed) {
                    // A statement still running is cancelled first: the server would
                    // notice the closed connection only when it next writes, going on
                    // with it (and its locks, perhaps to its commit) meanwhile. (Briefly:
                    // a forced shutdown gives its sessions 5 s in all, and a server that
                    // does not answer is a reason to force one.)
                    let cancel = backend.server_ref().cancel_target();
                    let _ = tokio::time::timeout(FORCED_CANCEL_TIMEOUT, cancel.send()).await;
                }
                if mid_message_to_server || !self.server_out.is_empty() {
                    // The server may hold part of a message: a Terminate now would be read
                    // as the rest of it. Just close.
                    backend.server().skip_terminate();
                }
                backend.discard();
            } else if self.server_out.is_empty() && backend.server_ref().replies.at_boundary() {
                return_backend(backend, self.departing_cleanup()).await;
            } else if backend.server_ref().replies.is_idle_but_hidden()
                && !backend.server_ref().is_broken()
            {
                // Only pgshield's own hidden queries (settings given back, a read-back)
                // are under way: their replies are awaited, then the session is reset
                // whole, even in transaction mode (what a read-back was to tell of the
                // backend's settings is not known then).
                let cleanup = self.whole_cleanup();
                let pending = std::mem::take(&mut self.server_out);
                let finish = backend.server().finish_hidden(&pending);
                match tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, finish).await {
                    Ok(Ok(())) => return_backend(backend, cleanup).await,
                    Ok(Err(_)) => backend.discard(),
                    Err(_) => {
                        // Perhaps cut mid-message: a Terminate would be read as its rest.
                        backend.server().skip_terminate();
                        backend.discard();
                    }
                }
            } else if backend.server_ref().replies.departure_drainable().is_some()
                && !backend.server_ref().is_broken()
            {
                // Its statements run to their end, as PostgreSQL runs what a client sent
                // before it went away; meanwhile the backend keeps its place in the pool
                // (the server is still busy: a place given back now would let the pool
                // open more backends than `max_size` exactly when clients time out and
                // retry). Then it is rolled back and lent again.
                let pending = std::mem::take(&mut self.server_out);
                let drain = backend.server().drain_departed(&pending);
                match tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, drain).await {
                    // (Reset whole: what the statements set, committed by now, is not
                    // known to pgshield, which would not give it back for the next client.)
                    Ok(Ok(())) => return_backend(backend, self.whole_cleanup()).await,
                    Ok(Err(_)) => backend.discard(),
                    Err(_) => {
                        // Still running: cancelled first, so that the server does not go on
                        // with it past the place given back (it would notice the closed
                        // connection only when it next writes).
                        backend.server_ref().cancel_target().send().await;
                        // Perhaps cut mid-message: a Terminate would be read as its rest.
                        backend.server().skip_terminate();
                        backend.discard();
                    }
                }
            } else {
                hand_over_and_close(backend, std::mem::take(&mut self.server_out)).await;
            }
        }
        // A farewell inside a half-passed message would be read as part of it.
        if let Some(error) = farewell.filter(|_| !mid_message_to_client) {
            error.encode(&mut self.client_out);
        }
        if !self.client_out.is_empty() && !matches!(end, End::ClientGone) {
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
                use tokio::io::AsyncWriteExt;
                let _ = self.client.send(&self.client_out).await;
                let _ = self.client.shutdown().await;
            })
            .await;
        }
    }

    /// [`Self::cleanup`] for a client leaving with its backend at a boundary: the whole
    /// session is reset if settings its statements may have changed were not read back
    /// yet (a `SET` committed by `COMMIT AND CHAIN`, or with a `BEGIN` pipelined behind
    /// it, is read back only once the backend is idle: a rollback would leave it, one the
    /// server does not report, such as `work_mem` or `app.tenant`, for the next client).
    fn departing_cleanup(&self) -> Cleanup {
        let unread = self
            .follow_up
            .as_ref()
            .is_some_and(|f| !f.dirty.is_empty() || !f.readbacks.is_empty());
        if unread {
            self.whole_cleanup()
        } else {
            self.cleanup()
        }
    }

    /// [`Self::cleanup`], when what the client's last statements did to the session is not
    /// known (they ran after it went, or pgshield's read-back of them did not finish): the
    /// whole session is reset, in transaction mode too.
    fn whole_cleanup(&self) -> Cleanup {
        match self.cleanup() {
            Cleanup::Rollback => Cleanup::Reset,
            other => other,
        }
    }

    /// What a departing client's backend needs before another may have it. Transaction
    /// mode without pinned state: only an open transaction needs ending; the backend keeps
    /// its prepared statements for others. Otherwise the whole session is reset, or (after
    /// LOAD) the backend closed.
    fn cleanup(&self) -> Cleanup {
        match (self.mode, self.pinned) {
            (PoolMode::Transaction, None) => Cleanup::Rollback,
            (_, Some(PinReason::Load)) => Cleanup::Close,
            _ => Cleanup::Reset,
        }
    }

    fn farewell(&self, end: &End) -> Option<ErrorResponse> {
        match end {
            End::Terminated | End::ClientGone => None,
            End::ClientProtocol(m) => Some(ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, m.clone())),
            End::ServerLost(_) if self.server_sent_fatal => None,
            End::ServerLost(_) if self.server_fatal.is_some() => {
                self.server_fatal.as_deref().cloned()
            }
            End::ServerLost(_) | End::ServerProtocol(_) => Some(ErrorResponse::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "pgshield lost the connection to the server of pool {}; the session cannot continue",
                    self.pool.name()
                ),
            )),
            End::Fatal(e) => Some(e.clone()),
            End::IdleInTransaction => Some(ErrorResponse::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                format!(
                    "terminating connection: idle in a transaction for more than {} (pool.idle_transaction_timeout)",
                    humantime::format_duration(self.limits.idle_transaction.unwrap_or_default())
                ),
            )),
            End::IdleTimeout => Some(ErrorResponse::fatal(
                sqlstate::IDLE_SESSION_TIMEOUT,
                format!(
                    "terminating connection: idle for more than {} (pool.idle_client_timeout)",
                    humantime::format_duration(self.limits.idle_client.unwrap_or_default())
                ),
            )),
            End::Shutdown | End::ForcedShutdown => Some(ErrorResponse::fatal(sqlstate::ADMIN_SHUTDOWN, "pgshield is shutting down")),
            End::Killed => Some(ErrorResponse::fatal(
                sqlstate::ADMIN_SHUTDOWN,
                "terminating connection due to administrator command (pgshield admin console)",
            )),
            End::StatementStuck => Some(ErrorResponse::fatal(
                sqlstate::QUERY_CANCELED,
                format!(
                    "pgshield: the statement ran past query_timeout and the server sent nothing \
                     for {}s after it was cancelled; the connection is closed",
                    QUERY_CANCEL_GRACE.as_secs()
                ),
            )),
            End::ResultUnread => Some(ErrorResponse::fatal(
                sqlstate::QUERY_CANCELED,
                format!(
                    "pgshield: the statement ran past query_timeout, and its result was not \
                     read for {}s after it was cancelled; the connection is closed",
                    QUERY_CANCEL_GRACE.as_secs() * u64::from(MAX_UNREAD_LOOKS)
                ),
            )),
        }
    }
}

enum SettingsError {
    /// The server refused a setting the client asked for (as PostgreSQL would at login).
    Refused(ErrorResponse),
    Server(ServerError),
}

/// Resets a backend the client left at a boundary and returns it; closes it otherwise.
/// How a departing client's backend is made fit for the next.
enum Cleanup {
    Rollback,
    Reset,
    Close,
}

async fn return_backend(mut backend: Backend, cleanup: Cleanup) {
    let server = backend.server();
    let unfit = !server.replies.at_boundary() || !server.read_buf.is_empty() || server.is_broken();
    // A cancel sent to it may still land: never reuse it (not even for our reset).
    if unfit || server.cancel_was_sent() || matches!(cleanup, Cleanup::Close) {
        backend.discard();
        return;
    }
    let work = async {
        match cleanup {
            Cleanup::Rollback => server.rollback().await,
            _ => server.reset().await,
        }
    };
    match tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, work).await {
        Ok(Ok(())) => backend.release(),
        Ok(Err(e)) => {
            tracing::debug!(server = %server.id(), error = %e, "reset failed; closing backend");
            backend.discard();
        }
        Err(_) => backend.discard(),
    }
}

/// The client left with work queued or running that cannot be run to its end (an
/// extended batch without its Sync, a COPY FROM STDIN): deliver what it sent, as
/// PostgreSQL would have received it, then Terminate and close (nobody is left to read
/// the replies).
async fn hand_over_and_close(mut backend: Backend, mut pending: BytesMut) {
    pending.extend_from_slice(&[b'X', 0, 0, 0, 4]);
    let server = backend.server();
    server.mark_broken();
    // Sent with the rest, or (on a timeout) perhaps cut mid-message: no second Terminate.
    server.skip_terminate();
    let _ = tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, server.stream.send(&pending)).await;
    backend.discard();
}

/// Keeps a client on its backend until it disconnects (once; counted and logged).
fn pin(
    pinned: &mut Option<PinReason>,
    shared: &Shared,
    client: ClientId,
    pool: &str,
    reason: PinReason,
) {
    if pinned.is_some() {
        return;
    }
    *pinned = Some(reason);
    shared.pins.add(reason);
    shared.metrics.pinned(reason);
    shared.pinned.add(client.0, pool, reason);
    tracing::info!(
        %client,
        pool,
        reason = reason.name(),
        "client pinned to its backend until it disconnects: {}",
        reason.feature()
    );
}

/// Notes what a client's statement does to its session (transaction mode): settings to
/// read back. Returns why it would pin, if it would (and the client is not pinned
/// already). Dropped statements are forgotten once the drop has happened (see
/// `statement_drop`).
fn note_effects(
    effects: &Effects,
    follow_up: &mut Option<Box<FollowUp>>,
    (pinned, settings): (bool, &ClientSettings),
) -> Option<PinReason> {
    if pinned {
        return None;
    }
    if effects.pin.is_some() {
        return effects.pin;
    }
    // (See `Effects::to_login_role`.)
    let started_as_another = ["role", "session_authorization"]
        .iter()
        .any(|name| settings.get(name).is_some());
    if effects.to_login_role && started_as_another {
        return Some(PinReason::SetRole);
    }
    if effects.all_settings || !effects.settings.is_empty() {
        // Made here, only when there is something to follow up.
        follow_up
            .get_or_insert_with(Default::default)
            .dirty
            .note(effects);
    }
    None
}

/// The prepared statements a client's statement drops on the server, if any: DISCARD ALL,
/// DEALLOCATE ALL, or a DEALLOCATE of one of pgshield's own names (which the client may
/// not have meant, but which happens all the same). Names the client makes from now on
/// are not the ones it drops.
fn statement_drop(effects: &Effects) -> Option<StatementDrop> {
    let all = StatementDrop::All(crate::prepared::Named::mark());
    if effects.drops_all_statements {
        return Some(all);
    }
    match &effects.deallocate {
        // (On the server: in a Query of several statements, through the extended
        // protocol, or behind replies still owed; otherwise answered by pgshield.)
        Some(None) => Some(all),
        Some(Some(name)) if name.starts_with(NAME_PREFIX) => {
            Some(StatementDrop::One(name.as_str().into()))
        }
        _ => None,
    }
}

/// What the server said the client's settings are now: they follow the client. A value
/// that is not UTF-8 (a `client_encoding` other than UTF8) cannot: pgshield keeps settings
/// as text. The client is then to keep this backend (returned: why).
fn apply_readback(
    readback: Readback,
    settings: &mut ClientSettings,
    server: &mut Server,
) -> Option<PinReason> {
    let Some(values) = readback.values.filter(|v| v.len() == readback.names.len()) else {
        // The backend may carry settings nobody tracks now: it must not serve anyone else.
        // Nor may the client lose them (a late cancel of its own can fail the read-back):
        // it keeps this backend, which has them, and the backend closes after it.
        tracing::info!(names = ?readback.names, "settings read-back failed; the client keeps that backend, which is closed after it");
        server.mark_broken();
        return Some(PinReason::Unclassified);
    };
    let mut not_utf8 = None;
    let mut temp_schema = None;
    for (name, value) in readback.names.iter().zip(values) {
        if name == "role" {
            // What the backend runs as now, exactly (`none`: none set), so that a client
            // wanting another is given it. A SET ROLE to a named role pins, so a role
            // other than the one applied was reset (RESET ROLE, DISCARD ALL; a default
            // of the login's): the client's is then the one it started as, if any.
            let now = match value.map(String::from_utf8) {
                None => None,
                Some(Ok(now)) => Some(now),
                // (Not text pgshield can record: the client keeps this backend.)
                Some(Err(_)) => {
                    not_utf8 = Some(PinReason::SettingNotUtf8);
                    continue;
                }
            };
            let now = now.as_deref().unwrap_or("none");
            let was = server
                .applied()
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("role"))
                .map(|(_, v)| v.as_str());
            if was.unwrap_or("none") != now {
                settings.reset(name);
            }
            // (None applied and none set: nothing to note, nothing to reset later.)
            if was.is_some() || now != "none" {
                server.note_applied(name, now);
            }
            continue;
        }
        match value.map(String::from_utf8) {
            Some(Ok(value)) => {
                // (Set by what the screen cannot read: `set_config('search_path', $1,
                // false)`.)
                if name == "search_path" && sql::path_puts_temp_schema_first(&value) {
                    temp_schema = Some(PinReason::TempTable);
                }
                settings.record(name, &value);
                server.note_applied(name, &value);
            }
            // (The backend is reset when the pinned client leaves.)
            Some(Err(_)) => not_utf8 = Some(PinReason::SettingNotUtf8),
            // No session value on the server: RESET, DISCARD ALL. The client's value is
            // the one it started with, if any (the backend now lacks it: applied at the
            // next borrow, and the client told so then).
            None => {
                settings.reset(name);
                server.forget_applied(name);
            }
        }
    }
    not_utf8.or(temp_schema)
}

fn out_of_step(tag: u8) -> String {
    format!(
        "the server sent a '{}' message that nothing the client sent asked for",
        char::from(tag)
    )
}

/// Makes room for a read into a backend's own buffer (a backend is busy or pooled, so
/// its buffer is worth keeping).
fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < crate::buffers::CHUNK / 4 {
        buf.reserve(crate::buffers::CHUNK);
    }
}

/// Writes as much of `buf` as the socket takes now; flushes once it is all written (a
/// stream that holds back no bytes of its own, a plain socket, has nothing to flush).
#[inline]
fn poll_drain(
    cx: &mut Context<'_>,
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Poll<io::Result<()>> {
    // (Asked of both sockets in every turn of the relay loop, mostly with nothing to
    // write to a plain socket: answered without a call.)
    if buf.is_empty() && !stream.holds_back_writes() {
        return Poll::Ready(Ok(()));
    }
    poll_write_all(cx, stream, buf)
}

fn poll_write_all(
    cx: &mut Context<'_>,
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Poll<io::Result<()>> {
    while !buf.is_empty() {
        match Pin::new(&mut *stream).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => buf.advance(n),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    if stream.holds_back_writes() {
        Pin::new(stream).poll_flush(cx)
    } else {
        Poll::Ready(Ok(()))
    }
}

/// Marks a client active again when its wait for a backend ends, however it ends.
struct ActiveOnDrop(Arc<super::registry::ClientInfo>);

impl Drop for ActiveOnDrop {
    fn drop(&mut self) {
        self.0.set_waiting(None);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_reset_is_vouched_for_only_when_nothing_after_it_may_set_what_statements_read_under() {
        use crate::client::sql::classify;
        let settings = super::ClientSettings::default();
        assert!(super::reset_keeps_parse_env(
            &settings,
            &classify("RESET ALL"),
            true
        ));
        assert!(super::reset_keeps_parse_env(
            &settings,
            &classify("DISCARD ALL"),
            false
        ));
        for sql in [
            "RESET ALL; SET client_encoding = 'SJIS'".to_owned(),
            "RESET search_path; SET search_path = other".to_owned(),
            "RESET ALL; SELECT set_config(current_user, 'x', false)".to_owned(),
            // Repeats dropped from long lists: the SET after the RESET no longer counts.
            format!(
                "RESET search_path; {}",
                "SET search_path = other; ".repeat(64)
            ),
        ] {
            let effects = classify(&sql);
            assert!(
                !super::reset_keeps_parse_env(&settings, &effects, true),
                "{sql}"
            );
        }
    }

    #[test]
    fn a_transaction_of_endless_sets_keeps_its_list_of_names_short() {
        let mut dirty = super::Dirty::default();
        let set = crate::client::sql::classify("SET work_mem = '1MB'");
        let reset = crate::client::sql::classify("RESET search_path");
        for _ in 0..10_000 {
            dirty.note(&set);
            dirty.note_resets(&reset);
        }
        assert!(dirty.names.len() <= 64, "{}", dirty.names.len());
        assert!(dirty.has("work_mem") && dirty.has("search_path") && !dirty.has("datestyle"));
    }

    /// An idle client's memory is mostly its task, and the task mostly this session: a
    /// few bytes more can move the task into the allocator's next size class, 256 bytes
    /// more per idle client (issue 7's bound is 2 KiB; 10,000 idle clients measured 1,820
    /// bytes each at this size, 2,070 at 600). What few clients need goes in a box
    /// (`FollowUp`), and what only a held backend needs, with the backend.
    #[test]
    fn the_session_stays_as_small_as_an_idle_client_needs() {
        let size = std::mem::size_of::<super::Session>();
        assert!(size <= 576, "Session is {size} bytes");
        fn future_size<A, F: std::future::Future>(_: impl FnOnce(A) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        // And the session's future, which is the rest of the task: 904 bytes in a release
        // build (912 in this test's) measured 1,835 bytes per idle client; 1,008 (1,016
        // here), with a result held across an await of the relay loop, 2,070.
        let size = future_size(super::Session::run);
        assert!(
            size <= 912,
            "the session's future is {size} bytes: measure idle-swarm's bytes per client \
             (docs/BENCHMARKS.md) before raising this bound (a new compiler may change it)"
        );
    }
}
