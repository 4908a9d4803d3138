//! Named prepared statements across backends, for transaction pooling.
//!
//! A client prepares statements by its own names; its next transaction may run on another
//! backend. So pgshield keeps each client's names (name → statement), gives every distinct
//! statement (query text and parameter types) one name shared by all clients of its pool
//! (a `Registry` per pool: its backends are its own, and a text's meaning depends on the
//! database and the user), and prepares it on whichever backend the client holds, the
//! first time that backend needs it (a Parse injected before the Bind or Describe, its
//! reply swallowed). Each backend remembers, in a bounded LRU, what it has prepared; the
//! least recently used is closed when it is full.
//!
//! A schema change can alter a statement's result columns. A statement keeps those a
//! server first described; a backend that prepares it afresh describes it first (`Shape`,
//! `Translation::Hold`), and a statement whose columns changed is retired: its Binds fail
//! as PostgreSQL fails them (drivers prepare it again), its text gets a new statement.
//!
//! Postgres's answers are kept: closing a statement answers CloseComplete whether or not
//! it existed; re-preparing a name the client already has fails with 42P05 (the server
//! itself says so: the Parse is sent under the existing statement's name, and the
//! session puts the client's name back into the error); binding a name
//! the client never prepared fails with 26000 (the Bind goes through unchanged). Two
//! clients using the same name for different queries each get their own.
//!
//! The unnamed statement lives on the backend until the next unnamed Parse or simple
//! Query. Each backend records whose unnamed statement it holds; a client binding the
//! unnamed statement on a backend that holds someone else's gets its own re-parsed first
//! (or, if it has none, the backend's is closed so the server answers 26000).

use std::collections::HashMap;

// The backends' statement maps, looked up on every Bind (the names are pgshield's own).
use crate::FastMap;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Buf, BufMut, BytesMut};

use postgres_protocol::escape::escape_literal;

use crate::client::sql::{self, Effects, PinReason};
use crate::protocol::frame::{take_cstr, take_cstr_bytes};
use crate::protocol::messages::put_message;

/// The prefix of the names pgshield prepares statements under on backends.
pub const NAME_PREFIX: &str = "pgshield_";

/// The statement a client's `DEALLOCATE` of its own name through the extended protocol
/// deallocates instead (see `ClientStatements::deallocate_stand_in`): not one of
/// pgshield's shared names, whose drop would make the backend's statements unknown.
const DEALLOCATE_STAND_IN: &str = "_pgshield_deallocate";
/// A statement that fails, when run, the way pgshield refuses state that would pin a
/// client (`pool.on_session_state = "reject"`).
pub fn refusal_statement(reason: PinReason) -> String {
    let message = format!(
        "pgshield: {} would tie this client to one server connection, which pool.on_session_state = \"reject\" does not allow",
        reason.feature()
    );
    format!(
        "DO $pgshield$ BEGIN RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', MESSAGE = {}, \
         HINT = 'Use session mode, or pool.on_session_state = \"pin\".'; END $pgshield$",
        escape_literal(&message)
    )
}

/// An Execute of all of `portal`'s rows.
fn put_execute(portal: &str) -> BytesMut {
    let mut execute = BytesMut::new();
    put_message(&mut execute, b'E', |b| {
        b.put_slice(portal.as_bytes());
        b.put_u8(0);
        b.put_i32(0);
    });
    execute
}

/// The portal a refused Parse's stand-in runs in.
const REFUSAL_PORTAL: &str = "pgshield_refusal";

/// A statement that fails, when run, the way pgshield refuses a Parse from a client that
/// already holds `limit` named statements (`pool.max_client_prepared_statements`).
fn too_many_statements(limit: usize) -> String {
    let message = format!(
        "pgshield: a client may hold at most {limit} prepared statements (pool.max_client_prepared_statements)"
    );
    format!(
        "DO $pgshield$ BEGIN RAISE EXCEPTION USING ERRCODE = 'configuration_limit_exceeded', MESSAGE = {}, \
         HINT = 'Close (or DEALLOCATE) statements the client no longer needs, or raise the limit.'; END $pgshield$",
        escape_literal(&message)
    )
}

/// One distinct statement: query text and parameter types, under its shared name.
#[derive(Debug)]
pub struct Statement {
    name: Arc<str>,
    /// In the client's encoding, which need not be UTF-8.
    query: Arc<[u8]>,
    param_types: Vec<u32>,
    /// The fingerprint of the settings it is read under ([`crate::server::PARSE_SETTINGS`]).
    parse_env: u64,
    /// No longer its text's statement in the registry (`Registry::retire`): a Parse of the
    /// text is to look it up again.
    retired: AtomicBool,
    /// What running it does to the session (classified once).
    effects: Effects,
    /// A server has accepted it (answered its Parse with ParseComplete).
    valid: AtomicBool,
    /// Its result columns as a server first described them (see [`Shape`]), 0 until then:
    /// what clients holding it were told.
    shape: AtomicU64,
    /// Its result columns are no longer what clients holding it were told: a server said
    /// so, or described other ones. Binds of it are refused as PostgreSQL refuses them.
    stale: AtomicBool,
    /// Its result columns are the query's own (see `sql::fixed_result`).
    fixed_result: bool,
    /// The statements its text runs by their shared names (`EXECUTE pgshield_7`, which
    /// the client wrote as `EXECUTE` of its own name for them: sqlx describes a query so,
    /// with `EXPLAIN … EXECUTE sqlx_s_1`): prepared on a backend before it is parsed or
    /// run there (PostgreSQL looks the name up then), and not hidden in its text.
    runs: Vec<Arc<Statement>>,
}

/// A statement's result columns, as one number (see [`Shape::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape(u64);

impl Shape {
    /// NoData: a statement that returns no rows.
    pub const NO_DATA: Shape = Shape(1);

    /// A RowDescription body: what PostgreSQL compares to tell that a prepared
    /// statement's result type changed, and what a driver decodes rows by: the columns'
    /// types and modifiers. (Not their names, which PostgreSQL 16 no longer compares and
    /// whose bytes depend on each client's client_encoding.)
    pub fn of(row_description: &[u8]) -> Shape {
        use std::hash::{BuildHasher, Hash, Hasher};
        // (A fingerprint compared within this process only, taken at each description a
        // server sends: foldhash with a fixed seed, a few instructions per column where
        // SipHash took some 80 per value hashed.)
        let mut hasher = foldhash::fast::FixedState::with_seed(0x5348_4150_4553).build_hasher();
        let (columns, mut body) = match row_description.split_first_chunk::<2>() {
            Some((count, rest)) => (i16::from_be_bytes(*count), rest),
            None => (-1, row_description),
        };
        columns.hash(&mut hasher);
        for _ in 0..columns.max(0) {
            let Some(end) = body.iter().position(|&b| b == 0) else {
                break;
            };
            body = &body[end + 1..];
            // table oid (4), column number (2), type oid (4), size (2), modifier (4), format (2)
            let Some(fixed) = body.get(..18) else {
                break;
            };
            fixed[6..10].hash(&mut hasher);
            fixed[12..16].hash(&mut hasher);
            body = &body[18..];
        }
        Shape(hasher.finish().max(2))
    }
}

impl Statement {
    /// Whether this (not retired) statement is what a Parse of `query` with these types,
    /// under `parse_env`, makes.
    fn is_for(&self, parse_env: u64, query: &[u8], types: &[u32]) -> bool {
        !self.retired.load(Ordering::Acquire)
            && self.parse_env == parse_env
            && *self.query == *query
            && self.param_types == types
    }

    /// A server accepted it: later Parses of it can be answered without a backend.
    pub fn mark_valid(&self) {
        self.valid.store(true, Ordering::Release);
    }

    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    /// Notes the result columns a server described; false if another server had
    /// described other ones (the first description stands: it is what clients hold).
    /// Only for statements whose columns PostgreSQL holds fixed (not FETCH, whose
    /// columns are its cursor's).
    pub fn described(&self, shape: Shape) -> bool {
        if !self.fixed_result {
            return true;
        }
        match self
            .shape
            .compare_exchange(0, shape.0, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(known) => known == shape.0,
        }
    }

    /// Whether a backend that lacks it is to describe it before a client's Bind runs it
    /// there: when its rows were described (a statement that returns none keeps returning
    /// none).
    fn checked_where_prepared(&self) -> bool {
        !matches!(self.shape.load(Ordering::Acquire), 0 | 1)
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Acquire)
    }

    /// The name it is prepared under on backends.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn effects(&self) -> &Effects {
        &self.effects
    }

    /// Writes a Parse preparing it under `name` (its own name, or "" for unnamed).
    fn write_parse(&self, name: &str, out: &mut BytesMut) {
        put_message(out, b'P', |b| {
            b.put_slice(name.as_bytes());
            b.put_u8(0);
            let text = b.len();
            b.put_slice(&self.query);
            if self.effects.runs_proxy_statement {
                let keep: Vec<&str> = self.runs.iter().map(|s| &*s.name).collect();
                sql::hide_proxy_statements(&mut b[text..], self.parse_env, &keep);
            }
            b.put_u8(0);
            b.put_i16(self.param_types.len() as i16);
            for oid in &self.param_types {
                b.put_u32(*oid);
            }
        });
    }
}

/// What a Bind of a stale statement runs instead, in its portal: it fails as PostgreSQL
/// fails the Bind of a statement whose result type changed (the session gives the error
/// that statement's routine, by which drivers know to prepare again).
pub const STALE_REFUSAL: &str =
    "DO $pgshield$ BEGIN RAISE EXCEPTION USING ERRCODE = 'feature_not_supported', \
     MESSAGE = 'cached plan must not change result type'; END $pgshield$";

/// Gives equal statements one shared name, in one pool.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

/// A text's statement for one list of parameter types and one parse environment (see
/// [`variant_env`]).
type Variant = (Vec<u32>, u64, Weak<Statement>);

/// The parse environment a text's statement is kept under in the registry: its own, or,
/// for a text pgshield made to run a client's statements by their shared names
/// ([`Statement::runs`]), one of its own for those statements: the same text written by
/// a client, or made to run other statements (the rest of its names written by the
/// client), is another statement.
fn variant_env(parse_env: u64, runs: &[Arc<Statement>]) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    if runs.is_empty() {
        return parse_env;
    }
    let mut hasher = foldhash::fast::FixedState::with_seed(0x5253_4f4c_5645_4421).build_hasher();
    for run in runs {
        run.name.hash(&mut hasher);
    }
    parse_env ^ hasher.finish() ^ 0x5253_4f4c_5645_4421
}

#[derive(Default)]
struct RegistryInner {
    /// By text, then by parameter types (nearly always one: a text is seldom prepared with
    /// other types). Looked up by the borrowed text, so that a Parse of a statement already
    /// known (every transaction of an unnamed-statement driver) allocates nothing.
    /// (The text is the statement's own, shared.)
    by_text: HashMap<Arc<[u8]>, Vec<Variant>>,
    /// The bytes of the texts in `by_text`, dead ones' too.
    text_bytes: usize,
    /// Numbers the names (a pool's own: its backends are only ever lent to its clients).
    next_id: u64,
    /// pgshield's own statements (refusals), kept alive so that each is prepared once
    /// per backend, not once per use under a new name (a handful: one per refusal text).
    own: Vec<Arc<Statement>>,
    /// Purge dead entries when the map grows past this many texts, or bytes of them
    /// (a client parsing large texts once each, as unnamed statements, would otherwise
    /// leave a thousand of them behind).
    purge_at: usize,
    purge_bytes_at: usize,
}

/// The fewest bytes of texts the registry purges at.
const PURGE_BYTES_LEAST: usize = 16 << 20;

impl RegistryInner {
    /// `by_text.retain`, keeping `text_bytes` true.
    fn retain(&mut self, mut keep: impl FnMut(&Arc<[u8]>, &mut Vec<Variant>) -> bool) {
        let mut dropped = 0;
        self.by_text.retain(|text, variants| {
            let kept = keep(text, variants);
            if !kept {
                dropped += text.len();
            }
            kept
        });
        self.text_bytes -= dropped;
    }

    fn find(&self, parse_env: u64, query: &[u8], param_types: &[u32]) -> Option<Arc<Statement>> {
        let variants = self.by_text.get(query)?;
        let (_, _, weak) = variants
            .iter()
            .find(|(types, env, _)| types == param_types && *env == parse_env)?;
        weak.upgrade()
    }
}

impl Registry {
    /// The statement for this text and these types, shared with every client using it,
    /// read under the server's default settings (pgshield's own statements; tests).
    pub fn intern(
        &self,
        query: &(impl AsRef<[u8]> + ?Sized),
        param_types: &[u32],
    ) -> Arc<Statement> {
        self.intern_under(0, query.as_ref(), param_types)
    }

    /// The statement for this text and these types read under `parse_env` (a client's
    /// [`crate::server::ClientView::parse_env`]), shared with every client reading it so.
    pub fn intern_under(
        &self,
        parse_env: u64,
        query: &[u8],
        param_types: &[u32],
    ) -> Arc<Statement> {
        self.intern_running(parse_env, query, param_types, Vec::new())
    }

    /// [`Self::intern_under`], for a text that runs `runs` by their shared names (see
    /// [`Statement::runs`]). Such a text is kept apart from the same text as a client
    /// wrote it (which names pgshield's statements, hidden from it): a client that writes
    /// what another's text was made into gets its own, whose names the server refuses.
    pub fn intern_running(
        &self,
        parse_env: u64,
        query: &[u8],
        param_types: &[u32],
        runs: Vec<Arc<Statement>>,
    ) -> Arc<Statement> {
        let key_env = variant_env(parse_env, &runs);
        if let Some(statement) = self.find(key_env, query, param_types) {
            return statement;
        }
        // Read outside the lock: a long text costs its own client the time, not every
        // client of the pool preparing a statement meanwhile.
        let effects = sql::classify_in(query, parse_env);
        let fixed_result = sql::fixed_result(query);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(statement) = inner.find(key_env, query, param_types) {
            return statement; // made by another client meanwhile
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let text: Arc<[u8]> = Arc::from(query);
        let statement = Arc::new(Statement {
            name: format!("{NAME_PREFIX}{id}").into(),
            query: Arc::clone(&text),
            param_types: param_types.to_vec(),
            parse_env,
            retired: AtomicBool::new(false),
            effects,
            valid: AtomicBool::new(false),
            shape: AtomicU64::new(0),
            stale: AtomicBool::new(false),
            fixed_result,
            runs,
        });
        let weak = Arc::downgrade(&statement);
        let inner = &mut *inner;
        let variants = inner.by_text.entry(text).or_insert_with(|| {
            inner.text_bytes += query.len();
            Vec::new()
        });
        // (Dead variants go first: a client could otherwise pile up variants of one text,
        // each with other parameter types, that no purge of the map would find.)
        variants.retain(|(_, _, weak)| weak.strong_count() > 0);
        let same = |(types, env, _): &&mut Variant| types == param_types && *env == key_env;
        match variants.iter_mut().find(same) {
            Some((_, _, dead)) => *dead = weak,
            None => variants.push((param_types.to_vec(), key_env, weak)),
        }
        if inner.by_text.len() > inner.purge_at
            || inner.text_bytes > inner.purge_bytes_at.max(PURGE_BYTES_LEAST)
        {
            inner.retain(|_, variants| {
                variants.retain(|(_, _, weak)| weak.strong_count() > 0);
                !variants.is_empty()
            });
            inner.purge_at = (inner.by_text.len() * 2).max(1024);
            inner.purge_bytes_at = inner.text_bytes * 2;
        }
        statement
    }

    /// The statement already made for this text, these types and `parse_env`, if a client
    /// still holds it.
    pub fn find(
        &self,
        parse_env: u64,
        query: &[u8],
        param_types: &[u32],
    ) -> Option<Arc<Statement>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.find(parse_env, query, param_types)
    }

    /// The statement's result type has changed since clients were told it (a column added
    /// to a table it selects `*` from, say): a server failed it with the error drivers heal
    /// from by preparing it again, or described other columns. Binds of it fail from now
    /// on with that error (`Statement::is_stale`), and its text makes a new statement,
    /// under a new name, which every backend prepares afresh: otherwise the Parse a driver
    /// heals with would find the stale statement still standing, and fail again, forever.
    /// True the first time (for the log).
    pub fn retire_stale(&self, statement: &Arc<Statement>) -> bool {
        if statement.stale.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.retire(statement);
        true
    }

    /// From now on the statement's text makes a new statement (see `retire_stale`).
    fn retire(&self, statement: &Arc<Statement>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.own.iter().any(|s| Arc::ptr_eq(s, statement)) {
            return;
        }
        let Some(variants) = inner.by_text.get_mut(&statement.query[..]) else {
            return;
        };
        variants.retain(|(_, _, weak)| weak.as_ptr() != Arc::as_ptr(statement));
        if variants.is_empty() {
            inner.by_text.remove(&statement.query[..]);
            inner.text_bytes -= statement.query.len();
        }
        statement.retired.store(true, Ordering::Release);
    }

    /// A client changed the schema (ALTER, DROP, CREATE OR REPLACE): every statement may
    /// have another result type now. As in PostgreSQL, a Parse from now on analyses its
    /// query afresh: every text gets a new statement (see `retire`).
    pub fn retire_all(&self) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *guard;
        let own = inner.own.clone();
        inner.retain(|_, variants| {
            variants.retain(|(_, _, weak)| {
                let keep = own.iter().any(|s| weak.as_ptr() == Arc::as_ptr(s));
                if let Some(statement) = weak.upgrade().filter(|_| !keep) {
                    statement.retired.store(true, Ordering::Release);
                }
                keep
            });
            !variants.is_empty()
        });
    }

    /// One of pgshield's own statements (no parameters), kept for the process's life.
    pub fn own(&self, query: &str) -> Arc<Statement> {
        let statement = self.intern(query, &[]);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if !inner.own.iter().any(|s| Arc::ptr_eq(s, &statement)) {
            inner.own.push(Arc::clone(&statement));
        }
        statement
    }

    /// The statements some client holds now: (name, query, parameter count, whether a
    /// server has accepted it), by name (for the admin console's SHOW PREPARED).
    pub fn list(&self) -> Vec<(Arc<str>, String, usize, bool)> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = inner
            .by_text
            .values()
            .flatten()
            .filter_map(|(_, _, weak)| weak.upgrade())
            .map(|s| {
                (
                    Arc::clone(&s.name),
                    String::from_utf8_lossy(&s.query).into_owned(),
                    s.param_types.len(),
                    s.is_valid(),
                )
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// Prepared statements a client's Query drops on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementDrop {
    /// DISCARD ALL, DEALLOCATE ALL; sent when names were at this mark (see
    /// [`Named::mark`]).
    All(u64),
    /// DEALLOCATE of one of pgshield's names.
    One(Arc<str>),
}

/// What to take back when the server never acted on a message.
#[derive(Debug)]
pub enum Undo {
    /// A Parse (the client's, or pgshield's own when `client_name` is None) did not happen.
    Parse {
        /// The client's name it made, and which making of it (see [`Named`]).
        client_name: Option<(Arc<str>, u64)>,
        statement: Arc<Statement>,
        /// It went to the server (rather than being answered by pgshield): the other
        /// clone of its `Doubt`'s token.
        sent: Option<Arc<()>>,
        /// It went behind a Close of the same name (its presence was unsure).
        behind_close: bool,
    },
    /// A client's Close did not happen: the name still means the statement.
    Close {
        client_name: Arc<str>,
        named: Named,
        /// For a Close the server may yet skip: counts it as pending for as long as this
        /// undo exists (see `ClientStatements::closing`).
        _pending: Option<Arc<()>>,
    },
    /// A client's Close of its unnamed statement did not happen: it still has it (unless
    /// it prepared another since, in a batch that ran).
    CloseUnnamed { named: Named },
    /// A Parse of the unnamed statement did not happen (or failed): the client's own (it
    /// loses that unnamed statement), or pgshield's.
    UnnamedParse {
        /// Which making of the client's unnamed statement it was (see [`Named`]); None
        /// for pgshield's, putting the client's on a backend.
        made_by: Option<u64>,
        /// The other clone of its `Doubt`'s token.
        _doubt: Arc<()>,
    },
    /// Nothing to take back: a Parse of a name the client already has, sent under that
    /// statement's shared name so that the server refuses it (42P05) as PostgreSQL
    /// would; its error is given the client's name (see
    /// [`crate::server::state::ReplyTracker::take_failed_reprepare`]).
    Reprepare {
        client_name: Arc<str>,
        /// The shared name the Parse went under (which the server's error names).
        shared_name: Arc<str>,
    },
    /// An Execute of a portal dropping the client's statements (DISCARD ALL, DEALLOCATE
    /// ALL, through the extended protocol) did not run: the names it took are the
    /// client's again (those it has not made again since).
    Dropped { names: TakenNames },
    /// pgshield's Close of a statement evicted from a full backend did not happen: the
    /// backend may still have it.
    Evicted {
        name: Arc<str>,
        /// The other clone of its `Doubt`'s token, if it may be skipped.
        doubt: Option<Arc<()>>,
    },
}

/// The names a dropping Execute took ([`ClientStatements::take_named`]), which come back
/// if it does not run: until its outcome is known they still count toward the client's
/// limit, or a client could have them taken by an Execute doomed to fail, prepare as
/// many new ones meanwhile, and have both, again and again.
/// (They count as Closes whose outcome is unknown do: a clone of
/// [`ClientStatements::closing`]'s token each.)
#[derive(Debug)]
pub struct TakenNames {
    names: Vec<(Arc<str>, Named)>,
    _pending: Vec<Arc<()>>,
}

/// The longest statement name PostgreSQL tells apart (`NAMEDATALEN` - 1 bytes).
const MAX_NAME: usize = 63;

/// The most statements of the client's one text may run by name (see `resolve`).
const MAX_RUNS: usize = 8;

/// An identifier from SQL text as PostgreSQL keeps it: at most [`MAX_NAME`] bytes, cut at
/// a character's end (`truncate_identifier`), where a protocol message's name is cut at
/// the byte (see [`key`]).
fn sql_identifier(name: &str) -> &str {
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// The part of a client's statement name PostgreSQL tells statements apart by: its first
/// [`MAX_NAME`] bytes, as its table of prepared statements keys them. So two names alike
/// that far are one statement, as there, and a name costs pgshield no more than that
/// however long it is sent. (Cut inside a character, the bytes of it kept are written
/// after a NUL, which no name has: the key stays text, and names differing there differ.)
fn key(name: &str) -> Cow<'_, str> {
    if name.len() <= MAX_NAME {
        return Cow::Borrowed(name);
    }
    let mut end = MAX_NAME;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut key = name[..end].to_owned();
    if end < MAX_NAME {
        key.push('\0');
        for byte in &name.as_bytes()[end..MAX_NAME] {
            key.push_str(&format!("{byte:02x}"));
        }
    }
    Cow::Owned(key)
}

/// What one of a client's names stands for: a statement, and which Parse gave the name
/// to it (a Parse the server skipped is taken back only if the name still holds what it
/// made: the client may have closed and prepared it again since, in a batch that ran).
#[derive(Debug)]
pub struct Named {
    statement: Arc<Statement>,
    made_by: u64,
}

/// Numbers the makings of names, process-wide.
static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Named {
    fn new(statement: Arc<Statement>) -> Named {
        Named {
            statement,
            made_by: MADE.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Names made from now on have a `made_by` at least this.
    pub fn mark() -> u64 {
        MADE.load(Ordering::Relaxed)
    }
}

/// One client's statements, by its own names.
#[derive(Debug, Default)]
pub struct ClientStatements {
    named: LazyMap<Arc<str>, Named>,
    unnamed: Option<Named>,
    /// Each Close the server may yet skip (one after other messages in its batch: if one
    /// of them fails, the name comes back) holds a clone while its outcome is unknown:
    /// such names still count toward the client's limit, or a client could close names in
    /// a batch doomed to fail and prepare new ones meanwhile, without end. (A Close first
    /// in its batch cannot be skipped: a driver's Close-then-Parse is not held back.) So
    /// does each name a dropping Execute took ([`TakenNames`]).
    closing: Option<Arc<()>>,
}

/// A map that takes no memory until its first entry: every client has one, and many
/// never name a statement.
#[derive(Debug)]
// The box is the point: 8 bytes in every client instead of an empty map's 48.
#[allow(clippy::box_collection)]
// (std's SipHash, not foldhash: the client picks these names, as many as it likes when
// `pool.max_client_prepared_statements` is 0, and foldhash is not made to resist a
// client that studies a long-running process to make its names collide. It costs some
// 170 instructions of a prepared statement's run.)
struct LazyMap<K, V>(Option<Box<HashMap<K, V>>>);

impl<K, V> Default for LazyMap<K, V> {
    fn default() -> Self {
        LazyMap(None)
    }
}

impl<K: Eq + std::hash::Hash, V> LazyMap<K, V> {
    fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        self.0.as_ref()?.get(key)
    }

    fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        self.get(key).is_some()
    }

    fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.0
            .get_or_insert_with(Default::default)
            .insert(key, value)
    }

    fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        self.0.as_mut()?.get_mut(key)
    }

    fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        self.remove_entry(key).map(|(_, v)| v)
    }

    fn remove_entry<Q>(&mut self, key: &Q) -> Option<(K, V)>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        let map = self.0.as_mut()?;
        let entry = map.remove_entry(key);
        if map.is_empty() {
            self.0 = None;
        }
        entry
    }

    fn clear(&mut self) {
        self.0 = None;
    }

    fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        if let Some(map) = self.0.as_mut() {
            map.retain(keep);
            if map.is_empty() {
                self.0 = None;
            }
        }
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What one backend has prepared under proxy-wide names (bounded, least recently used
/// first out), and whose unnamed statement it holds.
///
/// What was sent is recorded at once (messages later in the same batch count on it: if
/// it fails or is skipped, the server skips them too). But a Parse may fail (in a failed
/// transaction, say) or be skipped, and an eviction's Close sent after other messages in
/// its batch may be skipped; a later batch, already on its way, cannot count on them
/// until their outcome is known: such a name is `Unsure`, and is prepared again behind
/// a Close (a Close of a statement that does not exist is no error, so Close + Parse
/// leaves it prepared whatever happened before).
#[derive(Debug)]
pub struct ServerStatements {
    names: FastMap<Arc<str>, Prepared>,
    /// Evicted names whose Close may yet be skipped.
    evicting: FastMap<Arc<str>, Doubt>,
    clock: u64,
    capacity: usize,
    unnamed: Option<Arc<Statement>>,
    /// The Parse that put `unnamed` there, if it may yet be skipped.
    unnamed_doubt: Option<Doubt>,
    /// The parse environment other than its own that `unnamed` was last used under, if
    /// any (see `Prepared::read_under`).
    unnamed_read_under: Option<u64>,
    /// The statements the portals of the current batch were bound from (the unnamed
    /// portal's name is empty; at most [`PORTALS_KEPT`], latest last): a Describe of such
    /// a portal describes its statement's result columns (pgjdbc describes portals, never
    /// statements; a named one when it runs a query by a fetch size). Forgotten at the
    /// batch's end ([`ServerStatements::batch_ended`]); kept with the backend, where the
    /// portals are, not in every idle client, and its room kept for the next batch.
    portals: Vec<(Box<str>, Arc<Statement>)>,
}

/// How many portals' statements a batch keeps (see `ServerStatements::portals`).
const PORTALS_KEPT: usize = 4;

#[derive(Debug)]
struct Prepared {
    /// When last used (least recently used first out).
    stamp: u64,
    /// Its Parse's outcome, if it may yet be skipped.
    doubt: Option<Doubt>,
    /// The parse environment other than its own that a client last bound or described
    /// it under, if any. PostgreSQL reads a prepared statement's text again, under the
    /// session's settings of the moment, whenever its plan is invalidated (DDL anywhere
    /// in the database can do that): the backend's copy may now read as that
    /// environment's (a UTC statement bound by a client now in Tokyo reads in Tokyo).
    /// Only a client of that environment uses it as it is; any other prepares it again
    /// behind a Close.
    read_under: Option<u64>,
}

/// A message whose outcome is not known yet: a Parse (it may fail, or be skipped), or a
/// Close after other messages in its batch (it may be skipped; it cannot fail), until
/// its undo, which holds the other clone of `token`, is settled: acted on, or taken back.
#[derive(Debug)]
struct Doubt {
    /// None: unsure until prepared again (nothing left to wait for).
    token: Option<Arc<()>>,
    /// Its batch (Syncs sent before it).
    batch: u64,
}

impl Doubt {
    /// For a Parse sent now; the token for its undo.
    fn parse(situation: Situation) -> (Doubt, Arc<()>) {
        let token = Arc::new(());
        let doubt = Doubt {
            token: Some(Arc::clone(&token)),
            batch: situation.batch,
        };
        (doubt, token)
    }

    /// For a Close sent now: a doubt if others precede it in its batch.
    fn close(situation: Situation) -> Option<(Doubt, Arc<()>)> {
        situation.batch_open.then(|| Doubt::parse(situation))
    }

    /// Not known either way, and nothing will tell: unsure until prepared again.
    fn lost() -> Doubt {
        Doubt {
            token: None,
            batch: u64::MAX,
        }
    }

    fn settled(&self) -> bool {
        self.token
            .as_ref()
            .is_some_and(|token| Arc::strong_count(token) == 1)
    }

    /// A message of batch `batch` cannot count on the outcome.
    fn unsettled_for(&self, batch: u64) -> bool {
        self.batch != batch && !self.settled()
    }

    /// Whether this is the doubt about the message whose undo holds `token`.
    fn is(&self, token: &Arc<()>) -> bool {
        self.token.as_ref().is_some_and(|t| Arc::ptr_eq(t, token))
    }
}

/// What a backend has under a name, for a message about to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    Absent,
    Present,
    /// Prepared, or closed, by a message whose outcome this one cannot count on.
    Unsure,
}

impl ServerStatements {
    pub fn new(capacity: usize) -> ServerStatements {
        ServerStatements {
            names: FastMap::default(),
            evicting: FastMap::default(),
            clock: 0,
            capacity: capacity.max(1),
            unnamed: None,
            unnamed_doubt: None,
            unnamed_read_under: None,
            portals: Vec::new(),
        }
    }

    /// Records a Parse of the unnamed statement sent now (`made_by`: the client's, which
    /// making of it; None: pgshield's); returns its undo.
    fn unnamed_parsed(
        &mut self,
        statement: Arc<Statement>,
        situation: Situation,
        made_by: Option<u64>,
    ) -> Undo {
        let (doubt, token) = Doubt::parse(situation);
        self.unnamed = Some(statement);
        self.unnamed_doubt = Some(doubt);
        self.unnamed_read_under = None;
        Undo::UnnamedParse {
            made_by,
            _doubt: token,
        }
    }

    /// Whether the backend's unnamed statement is `statement`, for a message in
    /// `situation`: not if put there by a Parse of an earlier batch that may yet be
    /// skipped (the backend may still hold another client's), nor if it may read as
    /// another parse environment's (`unnamed_read_under`).
    fn unnamed_is(&self, statement: &Arc<Statement>, situation: Situation) -> bool {
        self.unnamed
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, statement))
            && !self
                .unnamed_doubt
                .as_ref()
                .is_some_and(|d| d.unsettled_for(situation.batch))
            && self
                .unnamed_read_under
                .is_none_or(|read| read == situation.parse_env)
    }

    /// Records that the backend's copy of `name` may read as parse environment `env`'s,
    /// not its own (see `Prepared::read_under`).
    fn read_under(&mut self, name: &Arc<str>, env: u64) {
        if let Some(prepared) = self.names.get_mut(name) {
            prepared.read_under = Some(env);
        }
    }

    /// Whether the backend has `name`, for a message of batch `batch` from a client of
    /// parse environment `env` (a use: it becomes the most recently used). A copy that
    /// may read as another environment's (`Prepared::read_under`) is unsure.
    fn presence(&mut self, name: &Arc<str>, batch: u64, env: u64) -> Presence {
        self.clock += 1;
        if let Some(prepared) = self.names.get_mut(name) {
            prepared.stamp = self.clock;
            if prepared.read_under.is_some_and(|read| read != env) {
                return Presence::Unsure;
            }
            return match &prepared.doubt {
                Some(doubt) if doubt.unsettled_for(batch) => Presence::Unsure,
                Some(doubt) if doubt.settled() => {
                    prepared.doubt = None;
                    Presence::Present
                }
                _ => Presence::Present,
            };
        }
        if self.evicting.is_empty() {
            return Presence::Absent;
        }
        match self.evicting.get(name) {
            Some(close) if close.unsettled_for(batch) => Presence::Unsure,
            Some(close) if close.settled() => {
                self.evicting.remove(name);
                Presence::Absent
            }
            _ => Presence::Absent,
        }
    }

    /// Records a Parse of `name` sent now (`doubt`: while its outcome is unknown);
    /// returns the statements to close first, least recently used, to keep to capacity.
    fn add(&mut self, name: Arc<str>, doubt: Doubt) -> Vec<Arc<str>> {
        self.clock += 1;
        let stamp = self.clock;
        let doubt = Some(doubt);
        if let Some(prepared) = self.names.get_mut(&name) {
            // Prepared again (it was unsure): the newest Parse is what counts.
            *prepared = Prepared {
                stamp,
                doubt,
                read_under: None,
            };
            return Vec::new();
        }
        // (Mostly none or one; more after skipped Closes brought statements back.)
        let mut evicted = Vec::new();
        while self.names.len() >= self.capacity {
            let oldest = self
                .names
                .iter()
                .min_by_key(|(_, p)| p.stamp)
                .map(|(n, _)| Arc::clone(n));
            match oldest.and_then(|name| self.names.remove_entry(&name)) {
                Some((name, _)) => evicted.push(name),
                None => break,
            }
        }
        self.names.insert(
            name,
            Prepared {
                stamp,
                doubt,
                read_under: None,
            },
        );
        evicted
    }

    /// Records that `name` is being closed by a Close that may yet be skipped.
    fn closing(&mut self, name: Arc<str>, close: Doubt) {
        if self.evicting.len() >= 64 {
            self.evicting.retain(|_, close| !close.settled());
        }
        self.evicting.insert(name, close);
    }

    /// A Parse of `name` (the one whose undo held `token`) was skipped, or failed. If it
    /// is still what the record says, the statement is not there, unless the Parse went
    /// behind a Close of a statement that might have been (`behind_close`): then nothing
    /// is known (unsure: prepared again behind a Close when next used). A record a later
    /// Parse made is that Parse's (a later batch, on its way before this outcome was known,
    /// prepares behind a Close whatever this one did).
    fn parse_skipped(&mut self, name: &str, token: &Arc<()>, behind_close: bool) {
        let Some(prepared) = self.names.get_mut(name) else {
            return;
        };
        if !prepared.doubt.as_ref().is_some_and(|d| d.is(token)) {
            return;
        }
        if behind_close {
            prepared.doubt = Some(Doubt::lost());
        } else {
            self.names.remove(name);
        }
    }

    /// An eviction's Close (the one whose undo held `token`) was skipped: the statement
    /// is there if it was before, which nothing here tells for sure (its own Parse may
    /// have been skipped too): unsure, until prepared again behind a Close.
    fn close_skipped(&mut self, name: Arc<str>, token: Option<&Arc<()>>) {
        if token.is_some_and(|token| self.evicting.get(&name).is_some_and(|d| d.is(token))) {
            self.evicting.remove(&name);
        }
        self.clock += 1;
        let lost = Prepared {
            stamp: self.clock,
            doubt: Some(Doubt::lost()),
            read_under: None,
        };
        self.names.insert(name, lost);
    }

    /// A client's Query dropping statements (DISCARD ALL, DEALLOCATE ALL, DEALLOCATE of
    /// one of pgshield's names) is sent, or has run. Until it has, whether it will is not
    /// known, and messages sent behind it may prepare statements again: whatever it drops
    /// is unsure (prepared again behind a Close when next used) from when it is sent, and
    /// again once it has run (what was prepared meanwhile may be gone or not).
    pub fn dropping(&mut self, drop: &StatementDrop) {
        let lost = |prepared: &mut Prepared| prepared.doubt = Some(Doubt::lost());
        match drop {
            StatementDrop::All(_) => self.names.values_mut().for_each(lost),
            StatementDrop::One(name) => self.names.get_mut(name).into_iter().for_each(lost),
        }
    }

    /// The server dropped every prepared statement (DISCARD ALL, DEALLOCATE ALL).
    pub fn clear(&mut self) {
        self.names.clear();
        self.evicting.clear();
        self.unnamed = None;
        self.portals.clear();
    }

    /// A simple Query destroys the unnamed statement (and the unnamed portal; and it may
    /// declare a cursor, a portal, of any name: no portal is known to be a statement's).
    pub fn forget_unnamed(&mut self) {
        self.unnamed = None;
        self.portals.clear();
    }

    /// An Execute was sent: it may declare a cursor, which is a portal, of any name
    /// (`DECLARE c CURSOR FOR …`), so no portal is known to be a statement's any more (a
    /// driver describes its portal between its Bind and its Execute).
    pub fn portal_ran(&mut self) {
        self.portals.clear();
    }

    /// Whether the backend has `name` prepared, its Parse's outcome known, and reading
    /// as its own parse environment's (never used under another's, `Prepared::read_under`);
    /// if so, it is now the most recently used (as [`Self::presence`] finds it).
    fn use_prepared(&mut self, name: &Arc<str>) -> bool {
        match self.names.get_mut(name) {
            Some(prepared)
                if prepared.doubt.as_ref().is_none_or(Doubt::settled)
                    && prepared.read_under.is_none() =>
            {
                prepared.doubt = None;
                self.clock += 1;
                prepared.stamp = self.clock;
                true
            }
            _ => false,
        }
    }

    /// Notes the statement a Bind just sent binds `portal` to (the caller has forgotten
    /// a portal of that name bound before: a Bind it refuses binds none).
    fn bound(&mut self, portal: &str, statement: &Arc<Statement>) {
        if self.portals.len() == PORTALS_KEPT {
            self.portals.remove(0);
        }
        self.portals.push((portal.into(), Arc::clone(statement)));
    }

    /// The client's batch ended (its Sync, or a Bind refused): its portals are gone, or
    /// not the statements'.
    pub fn batch_ended(&mut self) {
        self.portals.clear();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// What translating a client message needs to know besides the message.
#[derive(Debug, Clone, Copy)]
pub struct Situation {
    /// `pool.max_client_prepared_statements` (`usize::MAX`: no limit).
    pub max_named: usize,
    /// Messages before this one since the last Sync: if one of them fails, the server
    /// skips this one.
    pub batch_open: bool,
    /// Its batch: how many Syncs were sent before it.
    pub batch: u64,
    /// The server answers what is sent now (it is not skipping to a Sync, nor in COPY):
    /// a client message may wait for a hidden Describe's reply.
    pub can_hold: bool,
    /// The client's parse environment ([`crate::server::ClientView::parse_env`]).
    pub parse_env: u64,
    /// The server will read it in a failed transaction (see
    /// [`crate::server::state::ReplyTracker::reads_in_failed_transaction`]), where it
    /// refuses a Parse of anything but a statement that ends the transaction.
    pub failed_transaction: bool,
}

impl Situation {
    /// No limit, first in its batch.
    pub const FREE: Situation = Situation {
        max_named: usize::MAX,
        batch_open: false,
        batch: 0,
        can_hold: false,
        parse_env: 0,
        failed_transaction: false,
    };
}

/// What pgshield does with one client message.
#[derive(Debug, PartialEq, Eq)]
pub enum Translation {
    /// Pass it on unchanged.
    PassOn,
    /// Write `head` in place of the message's first `consumed` bytes, then pass on the
    /// rest unchanged (the rest may still be arriving).
    Rewrite { head: BytesMut, consumed: usize },
    /// As `Rewrite`, with the head already written to `out`, from offset `at` on (a Bind:
    /// no allocation per message). Whoever sends something else in the message's place
    /// truncates `out` to `at` first.
    Rewritten { at: usize, consumed: usize },
    /// Answer it with a fake reply (already queued); the message goes nowhere.
    Answered,
    /// Write `head`, a message tagged `tag`, in its place; the whole message is dropped.
    Replace { head: BytesMut, tag: u8 },
    /// Not enough of the message has arrived to decide.
    NeedMore,
    /// Not yet: the statement is being prepared and described on the backend first (see
    /// [`Translated::check`]); translate the message again once that is answered.
    Hold,
}

impl Translation {
    /// A rewrite's head put in `out` (where a `Rewritten` one is already) and how much of
    /// the client's message it replaces; None for anything but a rewrite.
    pub fn put_head(self, out: &mut BytesMut) -> Option<usize> {
        match self {
            Translation::Rewrite { head, consumed } => {
                out.extend_from_slice(&head);
                Some(consumed)
            }
            Translation::Rewritten { consumed, .. } => Some(consumed),
            _ => None,
        }
    }
}

/// A message pgshield sends on its own before the client's (its replies swallowed), for
/// the tracker to note in order.
#[derive(Debug)]
pub struct Injected {
    pub tag: u8,
    pub undo: Option<Undo>,
}

/// The result of translating one client message: messages to send first (already
/// written to `out`), and what to do with the client's message.
#[derive(Debug)]
pub struct Translated {
    pub injected: Vec<Injected>,
    pub translation: Translation,
    /// For the client's own message when it is sent: what to take back if not acted on.
    pub undo: Option<Undo>,
    /// Instead of sending: a fake reply to queue.
    pub fake: Option<crate::server::state::Fake>,
    /// The client's statement a Bind runs (its effects are the client's session's) or a
    /// Describe describes.
    pub bound: Option<Arc<Statement>>,
    /// The portal a Bind creates.
    pub portal: Option<String>,
    /// The statement whose Bind made the portal a Describe describes, if in its batch.
    pub portal_of: Option<Arc<Statement>>,
    /// A Bind of a stale statement: to be refused, as PostgreSQL would (`STALE_REFUSAL`).
    pub refuse_stale: bool,
    /// With `Translation::Hold`: the statement whose hidden Describe must be answered
    /// before the client's message goes on, its result columns compared with those the
    /// clients holding it were told.
    pub check: Option<Arc<Statement>>,
    /// A client's `DEALLOCATE` of its own name, run through a stand-in (see
    /// `ClientStatements::deallocate_stand_in`): no prepared statement of its to count.
    pub stand_in: bool,
}

impl Translated {
    /// Nothing injected; the message passes on unchanged.
    fn pass_on() -> Translated {
        Translated {
            injected: Vec::new(),
            translation: Translation::PassOn,
            undo: None,
            fake: None,
            bound: None,
            portal: None,
            portal_of: None,
            refuse_stale: false,
            check: None,
            stand_in: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed {0} message, or a statement or portal name that is not UTF-8")]
pub struct Malformed(&'static str);

impl Undo {
    /// The message this undo belongs to did happen: a parsed statement is valid.
    pub fn succeeded(&self) {
        if let Undo::Parse { statement, .. } = self {
            statement.mark_valid();
        }
    }
}

impl ClientStatements {
    /// Answers, without any backend, a whole Parse of a statement some server already
    /// accepted, or a Close of a statement: the client's names change, and the reply to
    /// write is returned. None: a backend is needed (also to refuse a Parse beyond
    /// `max_named` statements: the refusal has to happen on the server, see `translate`).
    /// `parse_env`: the client's ([`crate::server::ClientView::parse_env`]).
    pub fn answer_without_backend(
        &mut self,
        registry: &Registry,
        msg: &[u8],
        (max_named, parse_env): (usize, u64),
    ) -> Result<Option<crate::server::state::Fake>, Malformed> {
        use crate::server::state::Fake;
        let mut body = &msg[5..];
        match msg[0] {
            b'P' => {
                let name = key(take_cstr(&mut body).ok_or(Malformed("Parse"))?);
                let name = &*name;
                let query = take_cstr_bytes(&mut body).ok_or(Malformed("Parse"))?;
                let types = parse_types(body)?;
                if self.named.contains_key(name) || self.full(name, max_named) {
                    return Ok(None); // the server is to refuse it
                }
                // (Only a statement a server accepted will do: a text not known yet is
                // left to `translate`, which makes its statement, on a backend.)
                let known = match &self.unnamed {
                    Some(Named { statement, .. })
                        if name.is_empty()
                            && self.is_unnamed_again(statement, parse_env, query, &types) =>
                    {
                        Some(Arc::clone(statement))
                    }
                    _ => match self.resolve(query, parse_env) {
                        Some((text, runs)) => {
                            registry.find(variant_env(parse_env, &runs), &text, &types)
                        }
                        None => registry.find(parse_env, query, &types),
                    },
                };
                let Some(statement) = known else {
                    return Ok(None);
                };
                // (A DEALLOCATE of a client's name goes to a backend: see
                // `deallocate_stand_in`.)
                if !statement.is_valid() || statement.effects().deallocate.is_some() {
                    return Ok(None);
                }
                if name.is_empty() {
                    self.unnamed = Some(Named::new(statement));
                } else {
                    self.named.insert(name.into(), Named::new(statement));
                }
                Ok(Some(Fake::ParseComplete))
            }
            b'C' if body.first() == Some(&b'S') => {
                let mut rest = &body[1..];
                let name = key(take_cstr(&mut rest).ok_or(Malformed("Close"))?);
                let name = &*name;
                let mut ignored = Translated::pass_on();
                self.close(name, false, &mut ignored);
                Ok(Some(Fake::CloseComplete))
            }
            _ => Ok(None),
        }
    }

    /// Translates a client message for the backend's statements. `msg` holds the message
    /// from its tag on (whole, or at least its first part for Bind); `len` is its full
    /// length. Injected messages are written to `out`; the caller then writes the
    /// client's message (or its rewritten head) after them. A Parse of a new name when
    /// the client already has `max_named` is refused, on the server (see `refuse_parse`).
    pub fn translate(
        &mut self,
        registry: &Registry,
        server: &mut ServerStatements,
        msg: &[u8],
        len: usize,
        out: &mut BytesMut,
        situation: Situation,
    ) -> Result<Translated, Malformed> {
        let max_named = situation.max_named;
        let mut t = Translated::pass_on();
        let tag = msg[0];
        // Parse, Describe and Close are short: wait for them whole. Bind can carry huge
        // parameters: only its two names are needed.
        if tag != b'B' && msg.len() < len {
            t.translation = Translation::NeedMore;
            return Ok(t);
        }
        let mut body = &msg[5..];
        match tag {
            b'P' => {
                let name = key(take_cstr(&mut body).ok_or(Malformed("Parse"))?);
                let name = &*name;
                let query = take_cstr_bytes(&mut body).ok_or(Malformed("Parse"))?;
                let types = parse_types(body)?;
                if self.full(name, max_named) {
                    self.refuse_parse(registry, server, situation, out, &mut t);
                } else {
                    let how = (len, situation);
                    self.parse(registry, server, (name, query, &types), how, out, &mut t);
                }
            }
            b'B' => {
                let Some((portal, statement, consumed)) = bind_names(msg, len)? else {
                    t.translation = Translation::NeedMore;
                    return Ok(t);
                };
                let statement = key(statement);
                let statement = &*statement;
                t.portal = Some(portal.to_owned());
                t.bound = self.lookup(statement);
                server.portals.retain(|(p, _)| **p != *portal);
                if statement.is_empty()
                    && t.bound
                        .as_ref()
                        .is_some_and(|s| *s.query == *STAND_IN_TEXT.as_bytes())
                {
                    // Run anew (or on another backend): what it deallocates is there.
                    put_stand_in(out, None, &mut t);
                }
                // (The unnamed statement was parsed for this very use.)
                if !statement.is_empty() && t.bound.as_ref().is_some_and(|s| s.is_stale()) {
                    t.refuse_stale = true;
                    return Ok(t);
                }
                let used = (statement, t.bound.clone());
                if let Some(proxy_name) =
                    self.use_statement((registry, server), used, situation, out, &mut t)
                {
                    if t.translation == Translation::Hold {
                        return Ok(t);
                    }
                    let at = out.len();
                    put_bind_head(out, (len, consumed), portal, &proxy_name);
                    t.translation = Translation::Rewritten { at, consumed };
                }
                // (The statement it runs once `use_statement` has made it sure; not one it
                // refuses.)
                if let Some(bound) = t.bound.as_ref().filter(|_| !t.refuse_stale) {
                    server.bound(portal, bound);
                }
            }
            b'D' | b'C' => {
                let (&kind, mut rest) = body.split_first().ok_or(Malformed("Describe/Close"))?;
                let name = take_cstr(&mut rest).ok_or(Malformed("Describe/Close"))?;
                if !rest.is_empty() || !matches!(kind, b'S' | b'P') {
                    return Err(Malformed("Describe/Close"));
                }
                let name = if kind == b'S' {
                    key(name)
                } else {
                    Cow::Borrowed(name)
                };
                let name = &*name;
                if kind == b'S' && tag == b'D' {
                    let found = self.lookup(name);
                    t.bound.clone_from(&found);
                    let used = (name, found);
                    if let Some(proxy_name) =
                        self.use_statement((registry, server), used, situation, out, &mut t)
                    {
                        if t.translation == Translation::Hold {
                            return Ok(t);
                        }
                        let mut head = BytesMut::new();
                        put_message(&mut head, b'D', |b| {
                            b.put_u8(b'S');
                            b.put_slice(proxy_name.as_bytes());
                            b.put_u8(0);
                        });
                        t.translation = Translation::Rewrite {
                            head,
                            consumed: len,
                        };
                    }
                } else if kind == b'S' {
                    self.close(name, situation.batch_open, &mut t);
                } else if tag == b'C' {
                    // (A portal made again under that name is not the statement's.)
                    server.portals.retain(|(portal, _)| **portal != *name);
                } else if tag == b'D' {
                    t.portal_of = server
                        .portals
                        .iter()
                        .rev()
                        .find(|(portal, _)| **portal == *name)
                        .map(|(_, statement)| Arc::clone(statement));
                }
            }
            b'Q' => return Ok(self.translate_query(server)),
            _ => {}
        }
        Ok(t)
    }

    /// A driver's Bind of its prepared statement on a short path (the session's
    /// `pass_bind_at_once`), as [`Self::translate`] would take it when that changes
    /// nothing but the name: it names a statement of the client's that changes nothing
    /// of the session, prepared under `parse_env`, not stale, and the backend has it
    /// prepared, its Parse's outcome known. Writes the Bind (`bind`,
    /// whole) to `out` under the backend's name for the statement, notes its use and its
    /// portal there, and returns the statement. None, having changed nothing, otherwise:
    /// `translate` takes the Bind.
    pub fn bind_prepared(
        &self,
        server: &mut ServerStatements,
        bind: &[u8],
        parse_env: u64,
        out: &mut BytesMut,
    ) -> Option<Arc<Statement>> {
        let (portal, statement, consumed) = self.bound_as_is(bind, parse_env)?;
        if !server.use_prepared(statement.name()) {
            return None;
        }
        put_bind_head(out, (bind.len(), consumed), portal, statement.name());
        out.extend_from_slice(&bind[consumed..]);
        server.portals.retain(|(p, _)| **p != *portal);
        server.bound(portal, statement);
        Some(Arc::clone(statement))
    }

    /// The portal, the statement and where the names end, of a whole Bind of a statement
    /// [`Self::bind_prepared`] may take.
    fn bound_as_is<'a>(
        &'a self,
        bind: &'a [u8],
        parse_env: u64,
    ) -> Option<(&'a str, &'a Arc<Statement>, usize)> {
        let (portal, name, consumed) = bind_names(bind, bind.len()).ok()??;
        // (Not the unnamed statement: it is not among the named.)
        let statement = &self.named.get(&*key(name))?.statement;
        let as_is = statement.parse_env == parse_env
            && statement.runs.is_empty()
            && !statement.is_stale()
            && statement.effects().is_empty();
        as_is.then_some((portal, statement, consumed))
    }

    /// [`Self::translate`] for a simple Query, which names no statement (the session
    /// calls this directly: nothing to look at, no situation to work out). It drops the
    /// unnamed statement, the client's and the backend's, and passes on unchanged.
    pub fn translate_query(&mut self, server: &mut ServerStatements) -> Translated {
        self.query_sent();
        server.forget_unnamed();
        Translated::pass_on()
    }

    /// The statement for an unnamed Parse: the client's unnamed statement again when the
    /// text, types and parse environment are its own and it is still the registry's for
    /// them, not retired (no lookup: drivers parse the same unnamed statement in every
    /// transaction), else the registry's.
    fn intern_unnamed(
        &self,
        registry: &Registry,
        parse_env: u64,
        query: &[u8],
        types: &[u32],
    ) -> Arc<Statement> {
        if let Some(Named { statement, .. }) = &self.unnamed {
            if self.is_unnamed_again(statement, parse_env, query, types) {
                return Arc::clone(statement);
            }
        }
        self.intern(registry, parse_env, query, types)
    }

    /// Whether the client's unnamed statement is what a Parse of `query` makes again:
    /// the same text as written, not one that may run the client's statements by name
    /// (made otherwise, with what the client has by then: see `resolve`).
    fn is_unnamed_again(
        &self,
        statement: &Statement,
        parse_env: u64,
        query: &[u8],
        types: &[u32],
    ) -> bool {
        statement.runs.is_empty()
            && statement.is_for(parse_env, query, types)
            && !self.may_resolve(query)
    }

    /// Whether `query` may run the client's statements by name (see `resolve`): cheap,
    /// and false for nearly every text.
    fn may_resolve(&self, query: &[u8]) -> bool {
        !self.named.is_empty() && query.windows(7).any(|w| w.eq_ignore_ascii_case(b"execute"))
    }

    /// The registry's statement for a Parse of `query` by this client: a text that runs
    /// the client's own statements by name (SQL `EXECUTE`) runs them by their shared
    /// names instead (see [`Statement::runs`]).
    fn intern(
        &self,
        registry: &Registry,
        parse_env: u64,
        query: &[u8],
        types: &[u32],
    ) -> Arc<Statement> {
        match self.resolve(query, parse_env) {
            Some((text, runs)) => registry.intern_running(parse_env, &text, types, runs),
            None => registry.intern_under(parse_env, query, types),
        }
    }

    /// `query` running the client's statements by their shared names, and those
    /// statements, if it runs any of them by name; else None (the text as it is).
    fn resolve(&self, query: &[u8], parse_env: u64) -> Option<(Vec<u8>, Vec<Arc<Statement>>)> {
        // (Cheap first: most clients name no statement, and most texts run none.)
        if !self.may_resolve(query) {
            return None;
        }
        let mut text = Vec::with_capacity(query.len());
        let mut runs: Vec<Arc<Statement>> = Vec::new();
        let mut copied = 0;
        for (range, name) in sql::executed_names(query, parse_env) {
            // (An identifier in SQL is cut at 63 bytes by characters, as PostgreSQL
            // cuts it.)
            let Some(named) = self.named.get(&*key(sql_identifier(&name))) else {
                continue;
            };
            let statement = &named.statement;
            // Only a statement a server accepted (else the server's own error, as for a
            // name it lacks) that runs none by name itself (no chains to follow), and a
            // few of them.
            let new = !runs.iter().any(|r| Arc::ptr_eq(r, statement));
            if !statement.is_valid()
                || !statement.runs.is_empty()
                || (new && runs.len() == MAX_RUNS)
            {
                continue;
            }
            text.extend_from_slice(&query[copied..range.start]);
            text.extend_from_slice(statement.name().as_bytes());
            copied = range.end;
            if new {
                runs.push(Arc::clone(statement));
            }
        }
        if runs.is_empty() {
            return None;
        }
        text.extend_from_slice(&query[copied..]);
        Some((text, runs))
    }

    /// Prepares on the backend the statements `statement` runs by name, where it lacks
    /// them (hidden Parses), before `statement` is parsed or run there.
    fn ensure_runs(
        &mut self,
        server: &mut ServerStatements,
        statement: &Statement,
        situation: Situation,
        out: &mut BytesMut,
        t: &mut Translated,
    ) {
        // (They run none themselves: see `resolve`.)
        for run in &statement.runs {
            self.ensure_prepared(server, run, (situation, false), out, t);
        }
    }

    fn parse(
        &mut self,
        registry: &Registry,
        server: &mut ServerStatements,
        (name, query, types): (&str, &[u8], &[u32]),
        (len, situation): (usize, Situation),
        out: &mut BytesMut,
        t: &mut Translated,
    ) {
        if name.is_empty() {
            // Passed on as it is; it replaces the backend's unnamed statement.
            let mut statement = self.intern_unnamed(registry, situation.parse_env, query, types);
            let stand_in =
                self.deallocate_stand_in(registry, &statement, (situation, types), out, t);
            // (Written out, not passed on: pgshield's own names hidden in it, or run
            // by them, prepared first.)
            if stand_in.is_some() || statement.effects.runs_proxy_statement {
                statement = stand_in.unwrap_or(statement);
                self.ensure_runs(server, &statement, situation, out, t);
                let mut head = BytesMut::new();
                statement.write_parse("", &mut head);
                t.translation = Translation::Rewrite {
                    head,
                    consumed: len,
                };
            }
            let named = Named::new(Arc::clone(&statement));
            let made_by = Some(named.made_by);
            self.unnamed = Some(named);
            t.undo = Some(server.unnamed_parsed(statement, situation, made_by));
            return;
        }
        let statement = self.intern(registry, situation.parse_env, query, types);
        if let Some(existing) = self.named.get(name).map(|n| Arc::clone(&n.statement)) {
            // PostgreSQL refuses to re-prepare a name: let the server say so, by preparing
            // again under the name it already has there.
            let injected = t.injected.len();
            self.ensure_prepared(server, &existing, (situation, false), out, t);
            // (Prepared there just now under the settings of now, not its own, it reads as
            // theirs.)
            if t.injected.len() > injected && existing.parse_env != situation.parse_env {
                server.read_under(existing.name(), situation.parse_env);
            }
            let mut head = BytesMut::new();
            statement.write_parse(existing.name(), &mut head);
            t.translation = Translation::Rewrite {
                head,
                consumed: len,
            };
            t.undo = Some(Undo::Reprepare {
                client_name: name.into(),
                shared_name: Arc::clone(existing.name()),
            });
            return;
        }
        let named = Named::new(Arc::clone(&statement));
        let client_name: (Arc<str>, u64) = (name.into(), named.made_by);
        self.named.insert(Arc::clone(&client_name.0), named);
        let presence = server.presence(statement.name(), situation.batch, situation.parse_env);
        // In a failed transaction the server refuses it (25P02) and skips to the Sync, as
        // it refuses any Parse there but one that ends the transaction: not answered here.
        // (Not an empty text: PostgreSQL looks at no transaction for what runs nothing.)
        let refused_there = situation.failed_transaction
            && statement.effects().statements > 0
            && !crate::client::sql::ends_transaction(query);
        if presence == Presence::Present && !refused_there {
            t.translation = Translation::Answered;
            t.fake = Some(crate::server::state::Fake::ParseComplete);
            t.undo = Some(Undo::Parse {
                client_name: Some(client_name),
                statement,
                sent: None,
                behind_close: false,
            });
            return;
        }
        // (One the backend has, sent to be refused: nothing of the backend's to record.)
        if presence != Presence::Present {
            self.ensure_runs(server, &statement, situation, out, t);
        }
        let sent = (presence != Presence::Present)
            .then(|| record_parse(server, statement.name(), (presence, situation), out, t));
        let mut head = BytesMut::new();
        statement.write_parse(statement.name(), &mut head);
        t.translation = Translation::Rewrite {
            head,
            consumed: len,
        };
        t.undo = Some(Undo::Parse {
            client_name: Some(client_name),
            statement,
            sent,
            behind_close: presence == Presence::Unsure,
        });
    }

    /// A `DEALLOCATE name` of one of the client's own statements, prepared as the unnamed
    /// statement (libpq's PQsendQueryParams: psycopg in pipeline mode with a libpq older
    /// than 17): on the server that name does not exist. The client's name is forgotten
    /// now, and the text replaced by one that deallocates a stand-in prepared just
    /// before it (hidden), so that the client gets PostgreSQL's replies, `DEALLOCATE`
    /// included, and the backend is left as it was.
    fn deallocate_stand_in(
        &mut self,
        registry: &Registry,
        statement: &Statement,
        (situation, types): (Situation, &[u32]),
        out: &mut BytesMut,
        t: &mut Translated,
    ) -> Option<Arc<Statement>> {
        let effects = statement.effects();
        let Some(Some(target)) = effects
            .deallocate
            .as_ref()
            .filter(|_| effects.statements == 1)
        else {
            return None;
        };
        if target.starts_with(NAME_PREFIX) {
            return None;
        }
        let (client_name, named) = self.named.remove_entry(&*key(sql_identifier(target)))?;
        // The name comes back if what stands in for it is skipped or fails (as in
        // PostgreSQL, where the Parse that failed dropped nothing).
        // (Counted as pending even first in its batch: unlike a Close, its Parse may fail.)
        let pending = Some(Arc::clone(self.closing.get_or_insert_with(Arc::default)));
        let undo = Undo::Close {
            client_name,
            named,
            _pending: pending,
        };
        put_stand_in(out, Some(undo), t);
        Some(registry.intern_under(situation.parse_env, STAND_IN_TEXT.as_bytes(), types))
    }

    /// Whether a Parse naming `name` would hold one statement more than `max_named`
    /// (counting those whose Close may yet be skipped).
    fn full(&self, name: &str, max_named: usize) -> bool {
        let closing = self
            .closing
            .as_ref()
            .map_or(0, |token| Arc::strong_count(token) - 1);
        !name.is_empty()
            && self.named.len() + closing >= max_named
            && !self.named.contains_key(name)
    }

    /// Refuses a Parse beyond the client's limit the way the server refuses one: with an
    /// error in its place, after which the server skips the client's messages up to its
    /// Sync and rolls back the transaction (so the client's other statements in the batch
    /// do exactly what they would do had PostgreSQL refused the Parse). In its place goes
    /// a hidden Bind of a statement that raises 53400, into a portal of pgshield's own (the
    /// transaction's end drops it; the client's portals are left alone), and the Execute
    /// whose error the client gets.
    fn refuse_parse(
        &mut self,
        registry: &Registry,
        server: &mut ServerStatements,
        situation: Situation,
        out: &mut BytesMut,
        t: &mut Translated,
    ) {
        let refusal = registry.own(&too_many_statements(situation.max_named));
        self.ensure_prepared(server, &refusal, (situation, false), out, t);
        put_bind(out, REFUSAL_PORTAL, refusal.name());
        t.injected.push(Injected {
            tag: b'B',
            undo: None,
        });
        let head = put_execute(REFUSAL_PORTAL);
        t.translation = Translation::Replace { head, tag: b'E' };
    }

    /// Makes a statement the client names usable on this backend. Returns the name to use
    /// on the server, or None to pass the message on unchanged.
    /// The client's statement of that name (the unnamed one for "").
    fn lookup(&self, name: &str) -> Option<Arc<Statement>> {
        if name.is_empty() {
            self.unnamed.as_ref().map(|n| Arc::clone(&n.statement))
        } else {
            self.named.get(name).map(|n| Arc::clone(&n.statement))
        }
    }

    /// Makes sure the backend has the statement the client calls `name` (`found`, from
    /// `lookup`); returns the name to use for it there, if not the client's own.
    fn use_statement(
        &mut self,
        (registry, server): (&Registry, &mut ServerStatements),
        (name, found): (&str, Option<Arc<Statement>>),
        situation: Situation,
        out: &mut BytesMut,
        t: &mut Translated,
    ) -> Option<Arc<str>> {
        // Prepared on a backend that lacks it, a statement is read under the client's
        // settings now: if they are no longer those it was prepared under (the client
        // changed its TimeZone, say), the copy made here is the text's statement for the
        // settings now, so that no client of the old ones ever finds it on this backend.
        let mut conflict = false;
        let found = found.map(|statement| {
            if statement.parse_env == situation.parse_env {
                return statement;
            }
            // Where the backend has it, it is used as it is (as PostgreSQL would use
            // it), but may be read again under the settings now: from now on only
            // clients of these use that copy (`Prepared::read_under`).
            if name.is_empty() {
                if server.unnamed_is(&statement, situation) {
                    server.unnamed_read_under = Some(situation.parse_env);
                    return statement;
                }
            } else if server.presence(statement.name(), situation.batch, situation.parse_env)
                == Presence::Present
            {
                server.read_under(statement.name(), situation.parse_env);
                return statement;
            }
            let query = &statement.query;
            let now = registry.intern_running(
                situation.parse_env,
                query,
                &statement.param_types,
                statement.runs.clone(),
            );
            // The client's name means it from now on: it keeps what the client was told
            // of the rows (checked where it is prepared), and stays in use. One another
            // client was told other rows of (a schema change between) is refused, as
            // PostgreSQL refuses a statement whose result type changed.
            let told = statement.shape.load(Ordering::Acquire);
            if let Err(known) =
                now.shape
                    .compare_exchange(0, told, Ordering::AcqRel, Ordering::Acquire)
            {
                // (A Describe, no portal, is of the statement as it is now: the client's
                // name then means it, as below.)
                if told != 0 && known != told && t.portal.is_some() {
                    conflict = true;
                    return statement;
                }
            }
            let named = if name.is_empty() {
                self.unnamed.as_mut()
            } else {
                self.named.get_mut(name)
            };
            if let Some(named) = named {
                named.statement = Arc::clone(&now);
            }
            t.bound = Some(Arc::clone(&now));
            now
        });
        if conflict {
            // The Bind fails as a stale statement's does (the client prepares it again).
            t.refuse_stale = true;
            return None;
        }
        if let Some(statement) = &found {
            self.ensure_runs(server, statement, situation, out, t);
        }
        if name.is_empty() {
            match &found {
                Some(mine) if server.unnamed_is(mine, situation) => {}
                Some(mine) => {
                    mine.write_parse("", out);
                    let undo = server.unnamed_parsed(Arc::clone(mine), situation, None);
                    t.injected.push(Injected {
                        tag: b'P',
                        undo: Some(undo),
                    });
                }
                None => {
                    // Whatever this backend holds is not the client's: drop it, so the
                    // server answers "unnamed prepared statement does not exist".
                    put_message(out, b'C', |b| b.put_slice(b"S\0"));
                    t.injected.push(Injected {
                        tag: b'C',
                        undo: None,
                    });
                    server.unnamed = None;
                }
            }
            return None;
        }
        let Some(statement) = found else {
            // Not the client's: the server answers "does not exist", unless the name is
            // one of pgshield's own, which a client must never reach.
            return (name.starts_with(NAME_PREFIX) || name == DEALLOCATE_STAND_IN)
                .then(|| format!("{NAME_PREFIX}!{name}").into());
        };
        self.ensure_prepared(server, &statement, (situation, true), out, t);
        Some(Arc::clone(statement.name()))
    }

    /// Prepares `statement` on the backend if it lacks it (a hidden Parse). For a client's
    /// Bind or Describe (`check`), a statement whose rows were described is then described
    /// there too (a hidden Describe and a Flush), and the client's message held (`Translation::Hold`, `Translated::check`)
    /// until the description shows whether the result columns are still those clients
    /// were told. Prepared afresh after a schema change, they may not be: a Bind there
    /// would return rows the client would decode by the old description (PostgreSQL
    /// instead fails such a statement's Bind, and drivers prepare it again).
    fn ensure_prepared(
        &mut self,
        server: &mut ServerStatements,
        statement: &Arc<Statement>,
        (situation, check): (Situation, bool),
        out: &mut BytesMut,
        t: &mut Translated,
    ) {
        let presence = server.presence(statement.name(), situation.batch, situation.parse_env);
        if presence == Presence::Present {
            return;
        }
        let token = record_parse(server, statement.name(), (presence, situation), out, t);
        statement.write_parse(statement.name(), out);
        t.injected.push(Injected {
            tag: b'P',
            undo: Some(Undo::Parse {
                client_name: None,
                statement: Arc::clone(statement),
                sent: Some(token),
                behind_close: presence == Presence::Unsure,
            }),
        });
        if check
            && situation.can_hold
            && statement.checked_where_prepared()
            && !statement.is_stale()
        {
            put_message(out, b'D', |b| {
                b.put_u8(b'S');
                b.put_slice(statement.name().as_bytes());
                b.put_u8(0);
            });
            put_message(out, b'H', |_| {});
            for tag in [b'D', b'H'] {
                t.injected.push(Injected { tag, undo: None });
            }
            t.translation = Translation::Hold;
            t.check = Some(Arc::clone(statement));
        }
    }

    fn close(&mut self, name: &str, batch_open: bool, t: &mut Translated) {
        t.translation = Translation::Answered;
        t.fake = Some(crate::server::state::Fake::CloseComplete);
        if name.is_empty() {
            t.undo = self
                .unnamed
                .take()
                .map(|named| Undo::CloseUnnamed { named });
            return;
        }
        if let Some((client_name, named)) = self.named.remove_entry(name) {
            let pending =
                batch_open.then(|| Arc::clone(self.closing.get_or_insert_with(Arc::default)));
            t.undo = Some(Undo::Close {
                client_name,
                named,
                _pending: pending,
            });
        }
    }

    /// A Bind of `refusal` (a statement that fails the way pgshield refuses a stale
    /// statement, or state that would pin) in `portal`, in place of the client's, written
    /// to `out` after its Parse if needed (both returned as injected): returns the
    /// Execute of it whose error the client gets in place of its BindComplete.
    pub fn refusal_bind(
        &mut self,
        server: &mut ServerStatements,
        refusal: &Arc<Statement>,
        (portal, situation): (&str, Situation),
        out: &mut BytesMut,
    ) -> (BytesMut, Vec<Injected>) {
        let mut t = Translated::pass_on();
        self.ensure_prepared(server, refusal, (situation, false), out, &mut t);
        put_bind(out, portal, refusal.name());
        t.injected.push(Injected {
            tag: b'B',
            undo: None,
        });
        (put_execute(portal), t.injected)
    }

    /// Takes back what the server never acted on.
    pub fn undo(&mut self, server: &mut ServerStatements, undo: Undo) {
        match undo {
            Undo::Parse {
                client_name,
                statement,
                sent,
                behind_close,
            } => {
                if let Some(token) = sent {
                    server.parse_skipped(statement.name(), &token, behind_close);
                }
                if let Some((name, made_by)) = client_name {
                    if self.named.get(&name).is_some_and(|n| n.made_by == made_by) {
                        self.named.remove(&name);
                    }
                }
            }
            Undo::Close {
                client_name, named, ..
            } => {
                // (Unless the client made the name again since, in a batch that ran.)
                if !self.named.contains_key(&*client_name) {
                    self.named.insert(client_name, named);
                }
            }
            Undo::UnnamedParse { made_by, .. } => {
                // (Unless prepared again since, by a batch that ran.)
                if made_by.is_some() && self.unnamed.as_ref().map(|n| n.made_by) == made_by {
                    self.unnamed = None;
                }
                // Whatever the backend holds now is not known for sure: the next Bind
                // of the unnamed statement parses it again (which replaces any).
                server.unnamed = None;
                server.unnamed_doubt = None;
            }
            Undo::Evicted { name, doubt } => server.close_skipped(name, doubt.as_ref()),
            Undo::CloseUnnamed { named } => {
                if self.unnamed.is_none() {
                    self.unnamed = Some(named);
                }
            }
            Undo::Dropped { mut names } => {
                for (client_name, named) in std::mem::take(&mut names.names) {
                    if !self.named.contains_key(&*client_name) {
                        self.named.insert(client_name, named);
                    }
                }
            }
            Undo::Reprepare { .. } => {}
        }
    }

    /// The client sent a simple Query: as in PostgreSQL, its unnamed statement is gone.
    pub fn query_sent(&mut self) {
        self.unnamed = None;
    }

    /// A dropping Query sent when names were at `mark` (see [`Named::mark`]) has run:
    /// the client's names made before it are gone (those made by messages behind it
    /// stay; its unnamed statement went when the Query was sent).
    pub fn drop_made_before(&mut self, mark: u64) {
        self.named.retain(|_, named| named.made_by >= mark);
    }

    /// Takes every one of the client's names (an extended-protocol DISCARD ALL or
    /// DEALLOCATE ALL about to run), to be given back by [`Undo::Dropped`] if it does
    /// not. Its unnamed statement stays, as in PostgreSQL.
    pub fn take_named(&mut self) -> TakenNames {
        let named = std::mem::take(&mut self.named).0;
        let names: Vec<_> = named.map(|m| m.into_iter().collect()).unwrap_or_default();
        let token = self.closing.get_or_insert_with(Arc::default);
        TakenNames {
            _pending: names.iter().map(|_| Arc::clone(token)).collect(),
            names,
        }
    }

    /// The client's statements are all gone (DEALLOCATE ALL, DISCARD ALL).
    pub fn clear(&mut self) {
        self.named.clear();
        self.unnamed = None;
    }

    /// Whether the client has a statement of this name.
    pub fn has(&self, name: &str) -> bool {
        self.named.contains_key(&*key(sql_identifier(name)))
    }

    /// Forgets one of the client's statements (its DEALLOCATE); false if it had none.
    pub fn forget(&mut self, name: &str) -> bool {
        self.named.remove(&*key(sql_identifier(name))).is_some()
    }

    /// How many named statements the client has.
    pub fn len(&self) -> usize {
        self.named.len()
    }

    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }
}

/// The head of a Bind (`len` long, the client's names ending at `consumed`) renamed to
/// run `statement` in `portal`: what follows the names is the client's.
fn put_bind_head(
    out: &mut BytesMut,
    (len, consumed): (usize, usize),
    portal: &str,
    statement: &str,
) {
    let new_len = len - consumed + 5 + portal.len() + 1 + statement.len() + 1;
    out.put_u8(b'B');
    out.put_i32((new_len - 1) as i32);
    out.put_slice(portal.as_bytes());
    out.put_u8(0);
    out.put_slice(statement.as_bytes());
    out.put_u8(0);
}

/// A Bind of `statement` (no parameters, text results) into `portal`.
fn put_bind(out: &mut BytesMut, portal: &str, statement: &str) {
    put_message(out, b'B', |b| {
        b.put_slice(portal.as_bytes());
        b.put_u8(0);
        b.put_slice(statement.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
}

/// The parameter types at the end of a Parse.
fn parse_types(mut body: &[u8]) -> Result<Vec<u32>, Malformed> {
    if body.len() < 2 {
        return Err(Malformed("Parse"));
    }
    let count = body.get_i16();
    if count < 0 || body.len() != count as usize * 4 {
        return Err(Malformed("Parse"));
    }
    Ok((0..count).map(|_| body.get_u32()).collect())
}

/// Records a Parse of `name` about to be written to the backend, which lacks it or may:
/// behind a Close if unsure, after the Close of the least recently used statement if
/// full. Returns the Parse's doubt token, for its undo.
fn record_parse(
    server: &mut ServerStatements,
    name: &Arc<str>,
    (presence, situation): (Presence, Situation),
    out: &mut BytesMut,
    t: &mut Translated,
) -> Arc<()> {
    if presence == Presence::Unsure {
        close_unsure(name, out, t);
    }
    let (doubt, token) = Doubt::parse(situation);
    for evicted in server.add(Arc::clone(name), doubt) {
        close_on_server(server, evicted, situation, out, t);
    }
    token
}

/// Injects a Close of a statement evicted from a full backend.
fn close_on_server(
    server: &mut ServerStatements,
    name: Arc<str>,
    situation: Situation,
    out: &mut BytesMut,
    t: &mut Translated,
) {
    put_close(out, &name);
    let doubt = Doubt::close(situation).map(|(close, token)| {
        server.closing(Arc::clone(&name), close);
        token
    });
    t.injected.push(Injected {
        tag: b'C',
        undo: Some(Undo::Evicted { name, doubt }),
    });
}

/// Injects a Close of a statement whose presence is unsure, before preparing it again
/// (no error if it is not there; its reply is swallowed).
fn close_unsure(name: &str, out: &mut BytesMut, t: &mut Translated) {
    put_close(out, name);
    t.injected.push(Injected {
        tag: b'C',
        undo: None,
    });
}

/// The text of the statement a client's `DEALLOCATE` of its own name runs instead (of
/// [`DEALLOCATE_STAND_IN`]).
const STAND_IN_TEXT: &str = "DEALLOCATE _pgshield_deallocate";

/// Injects, hidden, a Close and a Parse of [`DEALLOCATE_STAND_IN`] (closed first: one a
/// stand-in left, never deallocated, would fail the Parse); `undo` goes with the Parse.
fn put_stand_in(out: &mut BytesMut, undo: Option<Undo>, t: &mut Translated) {
    put_close(out, DEALLOCATE_STAND_IN);
    put_message(out, b'P', |b| {
        b.put_slice(DEALLOCATE_STAND_IN.as_bytes());
        b.put_slice(b"\0SELECT\0");
        b.put_i16(0);
    });
    t.injected.push(Injected {
        tag: b'C',
        undo: None,
    });
    t.injected.push(Injected { tag: b'P', undo });
    t.stand_in = true;
}

fn put_close(out: &mut BytesMut, name: &str) {
    put_message(out, b'C', |b| {
        b.put_u8(b'S');
        b.put_slice(name.as_bytes());
        b.put_u8(0);
    });
}

/// The portal and statement names at the start of a Bind, and where they end; None if
/// they have not all arrived yet.
fn bind_names(msg: &[u8], len: usize) -> Result<Option<(&str, &str, usize)>, Malformed> {
    let available = &msg[5..msg.len().min(len)];
    let Some(first) = memchr::memchr(0, available) else {
        return if msg.len() >= len {
            Err(Malformed("Bind"))
        } else {
            Ok(None)
        };
    };
    let Some(second) = memchr::memchr(0, &available[first + 1..]) else {
        return if msg.len() >= len {
            Err(Malformed("Bind"))
        } else {
            Ok(None)
        };
    };
    let portal = std::str::from_utf8(&available[..first]).map_err(|_| Malformed("Bind"))?;
    let statement = std::str::from_utf8(&available[first + 1..first + 1 + second])
        .map_err(|_| Malformed("Bind"))?;
    Ok(Some((portal, statement, 5 + first + 1 + second + 1)))
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_deallocate_stand_in_deallocates_the_stand_in() {
        assert_eq!(
            super::STAND_IN_TEXT,
            format!("DEALLOCATE {}", super::DEALLOCATE_STAND_IN)
        );
        assert!(!super::DEALLOCATE_STAND_IN.starts_with(super::NAME_PREFIX));
    }
    use super::*;

    #[test]
    fn names_are_keyed_by_their_first_63_bytes_even_inside_a_character() {
        let x = "x".repeat(62);
        assert_eq!(key(&format!("{x}a")), format!("{x}a"));
        assert_eq!(key(&format!("{x}ab")), key(&format!("{x}ac")));
        // A two-byte character across byte 63: its first byte is what tells them apart.
        let (e, zhe) = (format!("{x}é"), format!("{x}ж"));
        assert_ne!(key(&e), key(&zhe));
        assert_eq!(
            key(&e),
            key(&format!("{x}è")),
            "é and è share their first byte"
        );
        assert!(key(&e).len() < 70);
        // From SQL, an identifier is cut at the character's start, as PostgreSQL cuts it.
        assert_eq!(sql_identifier(&e), x);
        assert_eq!(sql_identifier("short"), "short");
    }
    #[test]
    fn a_retired_statement_gives_its_text_to_a_new_one_and_only_once() {
        let r = Registry::default();
        let old = r.intern("SELECT * FROM t", &[]);
        r.retire(&old);
        let new = r.intern("SELECT * FROM t", &[]);
        assert_ne!(old.name(), new.name());
        // A late report about the old one (from another backend) leaves the new one be.
        r.retire(&old);
        assert!(Arc::ptr_eq(&new, &r.intern("SELECT * FROM t", &[])));
        // Other parameter types are another statement.
        assert_ne!(r.intern("SELECT * FROM t", &[23]).name(), new.name());
        // pgshield's own statements stay.
        let own = r.own("SELECT 1");
        r.retire(&own);
        assert!(Arc::ptr_eq(&own, &r.intern("SELECT 1", &[])));
        // After a schema change every text is another statement, but pgshield's own.
        r.retire_all();
        assert_ne!(r.intern("SELECT * FROM t", &[]).name(), new.name());
        assert!(Arc::ptr_eq(&own, &r.intern("SELECT 1", &[])));
    }

    #[test]
    fn an_unnamed_statement_parsed_again_is_looked_up_again_only_after_a_retirement() {
        let r = Registry::default();
        let mut c = ClientStatements::default();
        let unnamed = |c: &mut ClientStatements, query: &str, types: &[u32]| {
            let statement = c.intern_unnamed(&r, 0, query.as_bytes(), types);
            c.unnamed = Some(Named::new(Arc::clone(&statement)));
            statement
        };
        let first = unnamed(&mut c, "SELECT * FROM t", &[]);
        assert!(Arc::ptr_eq(
            &first,
            &unnamed(&mut c, "SELECT * FROM t", &[])
        ));
        // Other text or types: the registry's.
        let typed = unnamed(&mut c, "SELECT * FROM t", &[23]);
        assert!(Arc::ptr_eq(&typed, &r.intern("SELECT * FROM t", &[23])));
        assert!(!Arc::ptr_eq(&typed, &first));
        // Retired (by this client or any other): the text's new statement.
        r.retire_stale(&typed);
        let again = unnamed(&mut c, "SELECT * FROM t", &[23]);
        assert_ne!(again.name(), typed.name());
        r.retire_all();
        assert_ne!(
            unnamed(&mut c, "SELECT * FROM t", &[23]).name(),
            again.name()
        );
        // Variants no client holds any more do not pile up under one text.
        for types in 100..200 {
            drop(r.intern("SELECT * FROM t", &[types]));
        }
        let inner = r.inner.lock().unwrap();
        assert!(inner.by_text[&b"SELECT * FROM t"[..]].len() <= 3);
        drop(inner);
        // Nor texts: a hundred of a megabyte each, each dropped at once, leave at most
        // some 16 MiB of them (the texts clients hold, and twice as many dead, beyond).
        for n in 0..100 {
            let text = format!("SELECT {n} -- {}", "x".repeat(1 << 20));
            drop(r.intern(text.as_str(), &[]));
        }
        let inner = r.inner.lock().unwrap();
        let bytes: usize = inner.by_text.keys().map(|k| k.len()).sum();
        assert_eq!(bytes, inner.text_bytes);
        assert!(bytes <= PURGE_BYTES_LEAST + (1 << 21), "{bytes}");
        drop(inner);
        // Read under other settings (another TimeZone, say): another statement.
        let elsewhere = c.intern_unnamed(&r, 7, b"SELECT * FROM t", &[23]);
        assert_ne!(
            elsewhere.name(),
            c.unnamed.as_ref().unwrap().statement.name()
        );
        assert!(Arc::ptr_eq(
            &elsewhere,
            &r.intern_under(7, b"SELECT * FROM t", &[23])
        ));
    }

    fn parse_msg(name: &str, query: &str) -> BytesMut {
        let mut m = BytesMut::new();
        put_message(&mut m, b'P', |b| {
            b.put_slice(name.as_bytes());
            b.put_u8(0);
            b.put_slice(query.as_bytes());
            b.put_u8(0);
            b.put_i16(0);
        });
        m
    }

    fn bind_msg(statement: &str, params: &[u8]) -> BytesMut {
        let mut m = BytesMut::new();
        put_message(&mut m, b'B', |b| {
            b.put_u8(0);
            b.put_slice(statement.as_bytes());
            b.put_u8(0);
            b.put_slice(params);
        });
        m
    }

    fn small(tag: u8, kind: u8, name: &str) -> BytesMut {
        let mut m = BytesMut::new();
        put_message(&mut m, tag, |b| {
            b.put_u8(kind);
            b.put_slice(name.as_bytes());
            b.put_u8(0);
        });
        m
    }

    /// A registry, a backend holding up to `capacity` statements, and a client.
    fn fresh(capacity: usize) -> (Registry, ServerStatements, ClientStatements) {
        (
            Registry::default(),
            ServerStatements::new(capacity),
            ClientStatements::default(),
        )
    }

    fn run(
        c: &mut ClientStatements,
        r: &Registry,
        s: &mut ServerStatements,
        msg: &[u8],
    ) -> (Translated, BytesMut) {
        let mut out = BytesMut::new();
        let t = c
            .translate(r, s, msg, msg.len(), &mut out, Situation::FREE)
            .expect("well formed");
        (t, out)
    }

    #[test]
    fn a_new_statement_is_prepared_under_its_shared_name() {
        let (r, mut s, mut c) = fresh(10);
        let (t, out) = run(&mut c, &r, &mut s, &parse_msg("s0", "SELECT 1"));
        assert!(out.is_empty());
        let Translation::Rewrite { head, .. } = t.translation else {
            panic!("{t:?}")
        };
        assert!(head.windows(10).any(|w| w == b"pgshield_1"), "{head:?}");
        assert!(matches!(t.undo, Some(Undo::Parse { sent: Some(_), .. })));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_same_statement_on_a_backend_that_has_it_is_answered_by_pgshield() {
        let (r, mut s) = (Registry::default(), ServerStatements::new(10));
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        run(&mut a, &r, &mut s, &parse_msg("a_name", "SELECT 1"));
        let (t, out) = run(&mut b, &r, &mut s, &parse_msg("b_name", "SELECT 1"));
        assert_eq!(t.translation, Translation::Answered);
        assert_eq!(t.fake, Some(crate::server::state::Fake::ParseComplete));
        assert!(out.is_empty());
    }

    #[test]
    fn a_shape_is_its_columns_types_and_modifiers_not_their_names() {
        // RowDescription bodies: (name, type oid, modifier) per column.
        let body = |columns: &[(&str, u32, i32)]| {
            let mut b = BytesMut::new();
            b.put_i16(columns.len() as i16);
            for (name, oid, modifier) in columns {
                b.put_slice(name.as_bytes());
                b.put_u8(0);
                b.put_u32(0); // table
                b.put_i16(0); // column number
                b.put_u32(*oid);
                b.put_i16(4); // size
                b.put_i32(*modifier);
                b.put_i16(0); // format
            }
            b
        };
        let shape = |columns: &[(&str, u32, i32)]| Shape::of(&body(columns)).0;
        let int4 = shape(&[("x", 23, -1)]);
        assert_eq!(int4, shape(&[("renamed", 23, -1)]));
        assert!(int4 >= 2, "0 and 1 are not shapes of rows");
        assert_ne!(int4, shape(&[("x", 25, -1)]), "another type");
        assert_ne!(
            shape(&[("v", 1043, 14)]),
            shape(&[("v", 1043, 24)]),
            "another modifier"
        );
        assert_ne!(int4, shape(&[("x", 23, -1), ("y", 23, -1)]));
        assert_ne!(int4, Shape::of(&[0, 0]).0, "no columns");
    }

    #[test]
    fn a_described_statement_is_described_again_where_it_is_prepared_afresh() {
        let r = Registry::default();
        let (mut s1, mut s2) = (ServerStatements::new(10), ServerStatements::new(10));
        let mut c = ClientStatements::default();
        let (t, _) = run(&mut c, &r, &mut s1, &parse_msg("s0", "SELECT * FROM t"));
        let Some(Undo::Parse { statement, .. }) = t.undo else {
            panic!("{t:?}")
        };
        // One int4 column named x, as a server described it to the client.
        let mut columns = BytesMut::new();
        columns.put_i16(1);
        columns.put_slice(b"x\0");
        columns.put_slice(&[
            0, 0, 0, 0, 0, 1, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0,
        ]);
        assert!(statement.described(Shape::of(&columns)));
        assert!(statement.described(Shape::of(&columns)), "the same again");
        let can_hold = Situation {
            can_hold: true,
            ..Situation::FREE
        };
        let bind = bind_msg("s0", b"\0\0\0\0\0\0");
        // Where it is prepared: bound at once.
        let mut out = BytesMut::new();
        let t = c
            .translate(&r, &mut s1, &bind, bind.len(), &mut out, can_hold)
            .unwrap();
        assert!(
            matches!(t.translation, Translation::Rewritten { .. }),
            "{t:?}"
        );
        // Where it is not: prepared, described and flushed, and the Bind held.
        let mut out = BytesMut::new();
        let t = c
            .translate(&r, &mut s2, &bind, bind.len(), &mut out, can_hold)
            .unwrap();
        assert_eq!(t.translation, Translation::Hold);
        let tags: Vec<u8> = t.injected.iter().map(|i| i.tag).collect();
        assert_eq!(tags, b"PDH");
        assert!(t.check.as_ref().is_some_and(|s| Arc::ptr_eq(s, &statement)));
        // Once prepared there, bound at once; not held where the server answers nothing.
        let mut out = BytesMut::new();
        let t = c
            .translate(&r, &mut s2, &bind, bind.len(), &mut out, can_hold)
            .unwrap();
        assert!(
            matches!(t.translation, Translation::Rewritten { .. }),
            "{t:?}"
        );
        let mut s3 = ServerStatements::new(10);
        let t = c.translate(&r, &mut s3, &bind, bind.len(), &mut out, Situation::FREE);
        assert!(matches!(
            t.unwrap().translation,
            Translation::Rewritten { .. }
        ));
        // Other columns described (text, not int4): stale, and its Binds are refused.
        columns[13] = 25;
        assert!(!statement.described(Shape::of(&columns)));
        r.retire_stale(&statement);
        let t = c
            .translate(&r, &mut s1, &bind, bind.len(), &mut out, can_hold)
            .unwrap();
        assert!(t.refuse_stale);
    }

    #[test]
    fn a_bind_on_another_backend_prepares_the_statement_first() {
        let r = Registry::default();
        let (mut s1, mut s2) = (ServerStatements::new(10), ServerStatements::new(10));
        let mut c = ClientStatements::default();
        run(&mut c, &r, &mut s1, &parse_msg("s0", "SELECT $1"));
        let bind = bind_msg("s0", b"\0\0\0\0\0\0");
        let mut out = BytesMut::new();
        let t = c
            .translate(&r, &mut s2, &bind, bind.len(), &mut out, Situation::FREE)
            .unwrap();
        assert_eq!(t.injected.len(), 1, "a hidden Parse");
        assert_eq!(out[0], b'P');
        let Translation::Rewritten { at, consumed } = t.translation else {
            panic!()
        };
        let head = &out[at..];
        assert_eq!(head[0], b'B', "after the Parse");
        assert_eq!(consumed, 5 + 1 + 3);
        // The rewritten Bind's length covers the new name plus the untouched rest.
        let new_len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize + 1;
        assert_eq!(new_len, head.len() + (bind.len() - consumed));
        // Used again there: nothing injected.
        let t = c
            .translate(
                &r,
                &mut s2,
                &bind,
                bind.len(),
                &mut BytesMut::new(),
                Situation::FREE,
            )
            .unwrap();
        assert!(t.injected.is_empty());
    }

    #[test]
    fn the_short_path_binds_as_translate_does_or_leaves_the_bind_to_it() {
        // Two worlds alike: in one the Bind is translated, in the other it takes the
        // short path.
        let world = || {
            let (r, mut s, mut c) = fresh(10);
            let (t, _) = run(&mut c, &r, &mut s, &parse_msg("s0", "SELECT $1"));
            (r, s, c, t)
        };
        let (r1, mut s1, mut c1, parse1) = world();
        let (r2, mut s2, c2, parse2) = world();
        let bind = bind_msg("s0", b"\0\0\0\0\0\0");
        let env = Situation::FREE.parse_env;
        let mut short = BytesMut::new();
        // While its Parse's outcome is not known, the Bind is left to `translate`, which
        // finds the statement unsure; nothing is written or noted.
        assert!(c2.bind_prepared(&mut s2, &bind, env, &mut short).is_none());
        assert!(short.is_empty() && s2.portals.is_empty());
        // The Parses succeeded. (Bound twice in the same batch: the portal bound again.)
        drop((parse1, parse2));
        let noted = |s: &ServerStatements, name: &Arc<str>| {
            let portals: Vec<_> = s
                .portals
                .iter()
                .map(|(p, b)| (p.clone(), b.name().clone()))
                .collect();
            let prepared = &s.names[name];
            (portals, prepared.stamp, prepared.doubt.is_none(), s.clock)
        };
        let mut bound = None;
        for _ in 0..2 {
            let mut out = BytesMut::new();
            let t = c1
                .translate(&r1, &mut s1, &bind, bind.len(), &mut out, Situation::FREE)
                .expect("well formed");
            assert!(t.injected.is_empty() && !t.refuse_stale);
            let Translation::Rewritten { at, consumed } = t.translation else {
                panic!("{t:?}")
            };
            out.extend_from_slice(&bind[consumed..]);
            let mut short = BytesMut::new();
            let statement = c2
                .bind_prepared(&mut s2, &bind, env, &mut short)
                .expect("taken on the short path");
            assert_eq!(&short[..], &out[at..], "the Bind renamed, whole");
            assert_eq!(Some(statement.name()), t.bound.as_ref().map(|b| b.name()));
            let name = statement.name();
            assert_eq!(
                noted(&s2, name),
                noted(&s1, name),
                "the portal and the use, noted alike"
            );
            bound = Some(statement);
        }
        let bound = bound.expect("bound");

        // Left to `translate`, nothing written: a name the client does not have, the
        // unnamed statement, another parse environment, a backend without the statement,
        // a statement that changes the session, a stale one.
        let declined = |c: &ClientStatements, s: &mut ServerStatements, bind: &[u8], env| {
            let mut out = BytesMut::new();
            c.bind_prepared(s, bind, env, &mut out).is_none() && out.is_empty()
        };
        assert!(declined(
            &c2,
            &mut s2,
            &bind_msg("s1", b"\0\0\0\0\0\0"),
            env
        ));
        assert!(declined(&c2, &mut s2, &bind, env + 1));
        assert!(declined(&c2, &mut ServerStatements::new(10), &bind, env));
        let (r, mut s, mut c) = fresh(10);
        for (name, query) in [("", "SELECT 1"), ("set", "SET search_path = x")] {
            drop(run(&mut c, &r, &mut s, &parse_msg(name, query)));
            assert!(
                declined(&c, &mut s, &bind_msg(name, b"\0\0\0\0\0\0"), env),
                "{query}"
            );
        }
        // One another client bound under other settings (it may read as theirs now).
        let mut other = ClientStatements::default();
        drop(run(&mut other, &r2, &mut s2, &parse_msg("o", "SELECT $1")));
        let foreign = Situation {
            parse_env: env + 1,
            ..Situation::FREE
        };
        let o = bind_msg("o", b"\0\0\0\0\0\0");
        let t = other
            .translate(&r2, &mut s2, &o, o.len(), &mut BytesMut::new(), foreign)
            .expect("well formed");
        assert!(t.injected.is_empty(), "{t:?}");
        assert!(declined(&c2, &mut s2, &bind, env));
        assert!(r2.retire_stale(&bound));
        assert!(declined(&c2, &mut s2, &bind, env));
    }

    #[test]
    fn two_clients_with_one_name_for_different_queries_get_their_own() {
        let (r, mut s) = (Registry::default(), ServerStatements::new(10));
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        run(&mut a, &r, &mut s, &parse_msg("s0", "SELECT 'a'"));
        run(&mut b, &r, &mut s, &parse_msg("s0", "SELECT 'b'"));
        let name = |c: &mut ClientStatements| {
            let bind = bind_msg("s0", b"\0\0\0\0\0\0");
            let mut out = BytesMut::new();
            let t = c
                .translate(
                    &r,
                    &mut ServerStatements::new(10),
                    &bind,
                    bind.len(),
                    &mut out,
                    Situation::FREE,
                )
                .unwrap();
            let Translation::Rewritten { at, .. } = t.translation else {
                panic!()
            };
            out.split_off(at)
        };
        assert_ne!(name(&mut a), name(&mut b));
    }

    #[test]
    fn an_unknown_name_passes_through_for_the_server_to_refuse() {
        let (r, mut s, mut c) = fresh(10);
        let (t, out) = run(&mut c, &r, &mut s, &bind_msg("nope", b"\0\0\0\0\0\0"));
        assert_eq!(t.translation, Translation::PassOn);
        assert!(out.is_empty());
    }

    #[test]
    fn a_client_cannot_reach_pgshields_own_statement_names() {
        let (r, mut s) = (Registry::default(), ServerStatements::new(10));
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        run(&mut a, &r, &mut s, &parse_msg("s0", "SELECT 'a secret'"));
        let (t, out) = run(&mut b, &r, &mut s, &bind_msg("pgshield_1", b"\0\0\0\0\0\0"));
        let Translation::Rewritten { at, .. } = t.translation else {
            panic!("{t:?}")
        };
        let head = &out[at..];
        assert!(
            head.windows(20).any(|w| w == b"pgshield_!pgshield_1"),
            "{head:?}"
        );
    }

    #[test]
    fn close_is_answered_by_pgshield_and_forgets_the_name() {
        let (r, mut s, mut c) = fresh(10);
        run(&mut c, &r, &mut s, &parse_msg("s0", "SELECT 1"));
        let (t, _) = run(&mut c, &r, &mut s, &small(b'C', b'S', "s0"));
        assert_eq!(t.fake, Some(crate::server::state::Fake::CloseComplete));
        assert!(c.is_empty());
        // Closing what does not exist is fine, as in PostgreSQL.
        let (t, _) = run(&mut c, &r, &mut s, &small(b'C', b'S', "s0"));
        assert_eq!(t.translation, Translation::Answered);
        // And the name can be prepared again.
        let (t, _) = run(&mut c, &r, &mut s, &parse_msg("s0", "SELECT 2"));
        assert!(matches!(t.translation, Translation::Rewrite { .. }));
    }

    #[test]
    fn re_preparing_a_name_goes_to_the_server_under_the_existing_name_to_be_refused() {
        let (r, mut s, mut c) = fresh(10);
        run(&mut c, &r, &mut s, &parse_msg("s0", "SELECT 1"));
        let (t, _) = run(&mut c, &r, &mut s, &parse_msg("s0", "SELECT 2"));
        let Translation::Rewrite { head, .. } = t.translation else {
            panic!()
        };
        assert!(head.windows(11).any(|w| w == b"pgshield_1\0"));
        // Nothing to take back when it fails; the names, to put the client's in the error.
        let Some(Undo::Reprepare {
            client_name,
            shared_name,
        }) = t.undo
        else {
            panic!("{:?}", t.undo)
        };
        assert_eq!((&*client_name, &*shared_name), ("s0", "pgshield_1"));
    }

    #[test]
    fn a_full_backend_closes_its_least_recently_used_statement() {
        let (r, mut s, mut c) = fresh(2);
        run(&mut c, &r, &mut s, &parse_msg("a", "SELECT 'a'"));
        run(&mut c, &r, &mut s, &parse_msg("b", "SELECT 'b'"));
        run(&mut c, &r, &mut s, &bind_msg("a", b"\0\0\0\0\0\0")); // a is fresher than b
        let (t, out) = run(&mut c, &r, &mut s, &parse_msg("c", "SELECT 'c'"));
        assert_eq!(out[0], b'C');
        assert!(
            out.windows(11).any(|w| w == b"pgshield_2\0"),
            "b is closed: {out:?}"
        );
        assert!(matches!(t.injected[..], [Injected { tag: b'C', .. }]));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn an_eviction_close_the_server_skipped_is_taken_back() {
        let (r, mut s, mut c) = fresh(1);
        run(&mut c, &r, &mut s, &parse_msg("a", "SELECT 'a'"));
        // After other messages in its batch: the eviction's Close may be skipped.
        let b = parse_msg("b", "SELECT 'b'");
        let in_batch = Situation {
            batch_open: true,
            ..Situation::FREE
        };
        let mut t = c
            .translate(&r, &mut s, &b, b.len(), &mut BytesMut::new(), in_batch)
            .expect("well formed");
        let close = t
            .injected
            .pop()
            .and_then(|i| i.undo)
            .expect("the eviction Close's undo");
        // The server skipped the Close (an earlier error): pgshield_1 is there if it was
        // before; pgshield_2 is not (its Parse was skipped too).
        c.undo(&mut s, t.undo.take().expect("the Parse's undo"));
        c.undo(&mut s, close);
        // So a's statement is prepared again, behind a Close (no error if absent)...
        let (t, out) = run(&mut c, &r, &mut s, &bind_msg("a", b"\0\0\0\0\0\0"));
        let tags: Vec<u8> = t.injected.iter().map(|i| i.tag).collect();
        assert_eq!(tags, b"CP");
        assert!(out.windows(11).any(|w| w == b"pgshield_1\0"), "{out:?}");
        // ...and b is not the client's (its Parse never happened): the server says so.
        let (t, _) = run(&mut c, &r, &mut s, &bind_msg("b", b"\0\0\0\0\0\0"));
        assert!(t.injected.is_empty() && t.translation == Translation::PassOn);
    }

    #[test]
    fn batches_the_server_skipped_leave_nothing_said_present_that_is_not() {
        let (r, mut s, mut c) = fresh(1);
        run(&mut c, &r, &mut s, &parse_msg("a", "SELECT 'a'"));
        // Two batches, each after a statement that fails: in the first b evicts a, in
        // the second c evicts b. The server skips them all; the first batch's undos come
        // first (each batch's in reverse).
        // (Held, so that their names stay theirs once the client lets go of them.)
        let _held = ["SELECT 'b'", "SELECT 'c'"].map(|q| r.intern(q, &[]));
        let mut batches = Vec::new();
        for (batch, name, query) in [(0, "b", "SELECT 'b'"), (1, "c", "SELECT 'c'")] {
            let situation = Situation {
                batch_open: true,
                batch,
                ..Situation::FREE
            };
            let msg = parse_msg(name, query);
            let t = c
                .translate(&r, &mut s, &msg, msg.len(), &mut BytesMut::new(), situation)
                .expect("well formed");
            let mut undos: Vec<_> = t.injected.into_iter().filter_map(|i| i.undo).collect();
            undos.extend(t.undo);
            batches.push(undos);
        }
        for undos in batches {
            for undo in undos.into_iter().rev() {
                c.undo(&mut s, undo);
            }
        }
        let presence =
            |s: &mut ServerStatements, query: &str| s.presence(r.intern(query, &[]).name(), 2, 0);
        // a is there (its Close skipped), b and c are not (each Parse skipped). Nothing
        // may say present for what is not there; what is not known is unsure (prepared
        // again behind a Close).
        assert_eq!(presence(&mut s, "SELECT 'a'"), Presence::Unsure);
        assert_eq!(presence(&mut s, "SELECT 'b'"), Presence::Unsure);
        assert_eq!(presence(&mut s, "SELECT 'c'"), Presence::Absent);
    }

    #[test]
    fn undo_takes_back_a_parse_the_server_never_ran() {
        let (r, mut s, mut c) = fresh(10);
        let (t, _) = run(&mut c, &r, &mut s, &parse_msg("s0", "SELEKT"));
        c.undo(&mut s, t.undo.expect("undo"));
        assert!(c.is_empty() && s.is_empty());
    }

    #[test]
    fn the_unnamed_statement_follows_its_client() {
        let r = Registry::default();
        let (mut s1, mut s2) = (ServerStatements::new(10), ServerStatements::new(10));
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        run(&mut a, &r, &mut s1, &parse_msg("", "SELECT 'a'"));
        // On the same backend: as it is.
        let (t, out) = run(&mut a, &r, &mut s1, &bind_msg("", b"\0\0\0\0\0\0"));
        assert_eq!((t.translation, out.len()), (Translation::PassOn, 0));
        // On another backend: parsed there first.
        let (_, out) = run(&mut a, &r, &mut s2, &bind_msg("", b"\0\0\0\0\0\0"));
        assert_eq!(out[0], b'P');
        // A client without one, on a backend holding another's: that one is closed first.
        let (t, out) = run(&mut b, &r, &mut s1, &bind_msg("", b"\0\0\0\0\0\0"));
        assert_eq!((out[0], t.translation), (b'C', Translation::PassOn));
        // A simple Query destroys the unnamed statement, the client's too (as in
        // PostgreSQL): the backend's is closed, for the server to say it does not exist.
        run(&mut a, &r, &mut s1, &[b'Q', 0, 0, 0, 5, 0]);
        let (_, out) = run(&mut a, &r, &mut s1, &bind_msg("", b"\0\0\0\0\0\0"));
        assert_eq!(out[0], b'C');
    }

    /// A statement a client bound under another parse environment than its own (a client
    /// that changed its TimeZone) may since read as that environment's (PostgreSQL reads
    /// it again when its plan is invalidated), and one a client's re-Parse of its name
    /// prepared there under another does: a client of its own environment gets it
    /// prepared again, named or unnamed; the client that bound it keeps using it.
    #[test]
    fn a_statement_used_under_other_settings_is_prepared_again_for_its_own() {
        let r = Registry::default();
        let (mut s1, mut s2) = (ServerStatements::new(10), ServerStatements::new(10));
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        let under = |c: &mut ClientStatements, s: &mut ServerStatements, msg: &[u8], env| {
            let mut out = BytesMut::new();
            let situation = Situation {
                parse_env: env,
                ..Situation::FREE
            };
            let t = c
                .translate(&r, s, msg, msg.len(), &mut out, situation)
                .expect("well formed");
            let tags: Vec<u8> = t.injected.iter().map(|i| i.tag).collect();
            (tags, out)
        };
        let bind = |name| bind_msg(name, b"\0\0\0\0\0\0");
        // Named: b's Parse finds a's statement there (both of environment 0).
        under(&mut a, &mut s1, &parse_msg("s", "SELECT now()"), 0);
        under(&mut b, &mut s1, &parse_msg("t", "SELECT now()"), 0);
        assert_eq!(under(&mut a, &mut s1, &bind("s"), 1).0, b"");
        assert_eq!(
            under(&mut a, &mut s1, &bind("s"), 1).0,
            b"",
            "still a's to use"
        );
        assert_eq!(under(&mut b, &mut s1, &bind("t"), 0).0, b"CP");
        assert_eq!(under(&mut b, &mut s1, &bind("t"), 0).0, b"");
        // Unnamed: b, whose unnamed statement is a's too, binds it without a Parse.
        under(&mut a, &mut s1, &parse_msg("", "SELECT now()"), 0);
        under(&mut b, &mut s2, &parse_msg("", "SELECT now()"), 0);
        let (tags, out) = under(&mut a, &mut s1, &bind(""), 1);
        assert_eq!((tags.as_slice(), out.len()), (&b""[..], 0));
        let (tags, out) = under(&mut b, &mut s1, &bind(""), 0);
        assert_eq!((tags.as_slice(), out[0]), (&b"P"[..], b'P'));
        // A Parse of a name a has (refused by the server) on a backend without its
        // statement: prepared there first, under the settings of now. b, of the
        // statement's own, does not find that copy present.
        let mut s3 = ServerStatements::new(10);
        assert_eq!(
            under(&mut a, &mut s3, &parse_msg("s", "SELECT 1"), 1).0,
            b"P"
        );
        let (tags, out) = under(&mut b, &mut s3, &parse_msg("t2", "SELECT now()"), 0);
        assert_eq!((tags.as_slice(), out[0]), (&b"C"[..], b'C'));
    }

    #[test]
    fn a_bind_needs_only_its_names_to_have_arrived() {
        let (r, mut s, mut c) = fresh(10);
        run(&mut c, &r, &mut s, &parse_msg("s0", "SELECT $1"));
        let bind = bind_msg("s0", &[7u8; 1000]);
        let t = c
            .translate(
                &r,
                &mut s,
                &bind[..7],
                bind.len(),
                &mut BytesMut::new(),
                Situation::FREE,
            )
            .unwrap();
        assert_eq!(t.translation, Translation::NeedMore);
        let t = c
            .translate(
                &r,
                &mut s,
                &bind[..20],
                bind.len(),
                &mut BytesMut::new(),
                Situation::FREE,
            )
            .unwrap();
        assert!(matches!(
            t.translation,
            Translation::Rewritten { consumed: 9, .. }
        ));
    }

    #[test]
    fn only_statements_a_server_accepted_are_answered_without_a_backend() {
        let (r, mut s, mut a) = (
            Registry::default(),
            ServerStatements::new(10),
            ClientStatements::default(),
        );
        let parse = parse_msg("s0", "SELECT 1");
        let mut b = ClientStatements::default();
        assert_eq!(
            b.answer_without_backend(&r, &parse, (usize::MAX, 0)),
            Ok(None),
            "never accepted yet"
        );
        let (t, _) = run(&mut a, &r, &mut s, &parse);
        t.undo.expect("undo").succeeded(); // the server's ParseComplete
        assert_eq!(
            b.answer_without_backend(&r, &parse, (usize::MAX, 0)),
            Ok(Some(crate::server::state::Fake::ParseComplete))
        );
        assert_eq!(b.len(), 1);
        assert_eq!(
            b.answer_without_backend(&r, &parse, (usize::MAX, 0)),
            Ok(None),
            "a re-prepared name goes to a server"
        );
        assert_eq!(
            b.answer_without_backend(&r, &small(b'C', b'S', "s0"), (usize::MAX, 0)),
            Ok(Some(crate::server::state::Fake::CloseComplete))
        );
        assert!(b.is_empty());
    }

    #[test]
    fn a_parse_beyond_the_clients_limit_is_refused_on_the_server() {
        let (r, mut s, mut c) = fresh(10);
        // Each message after others in its batch (`batch_open`), unless said otherwise.
        let in_batch =
            |c: &mut ClientStatements, s: &mut ServerStatements, msg: &[u8], batch_open: bool| {
                let mut out = BytesMut::new();
                let situation = Situation {
                    max_named: 2,
                    batch_open,
                    batch: 0,
                    can_hold: false,
                    parse_env: 0,
                    failed_transaction: false,
                };
                let t = c
                    .translate(&r, s, msg, msg.len(), &mut out, situation)
                    .expect("well formed");
                (t, out)
            };
        let limited = |c: &mut ClientStatements, s: &mut ServerStatements, msg: &[u8]| {
            in_batch(c, s, msg, true)
        };
        for name in ["s0", "s1"] {
            let (t, _) = limited(&mut c, &mut s, &parse_msg(name, "SELECT 1"));
            assert!(
                !matches!(t.translation, Translation::Replace { .. }),
                "{t:?}"
            );
        }
        // A third name: in its place, the refusal prepared, bound (hidden) and executed.
        let (t, out) = limited(&mut c, &mut s, &parse_msg("s2", "SELECT 2"));
        let Translation::Replace { head, tag } = &t.translation else {
            panic!("{t:?}")
        };
        assert_eq!((*tag, head[0]), (b'E', b'E'));
        let tags: Vec<u8> = t.injected.iter().map(|i| i.tag).collect();
        assert_eq!(tags, b"PB");
        assert_eq!(out[0], b'P');
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("configuration_limit_exceeded"), "{text}");
        assert!(text.contains("max_client_prepared_statements"), "{text}");
        assert_eq!(c.len(), 2, "the refused name is not the client's");
        assert!(c
            .answer_without_backend(&r, &parse_msg("s2", "SELECT 1"), (2, 0))
            .expect("well formed")
            .is_none());
        // Names the client has, and the unnamed statement, are not held back.
        let (t, _) = limited(&mut c, &mut s, &parse_msg("s0", "SELECT 3"));
        assert!(
            matches!(t.translation, Translation::Rewrite { .. }),
            "{t:?}"
        );
        let (t, _) = limited(&mut c, &mut s, &parse_msg("", "SELECT 3"));
        assert_eq!(t.translation, Translation::PassOn);
        // The refusal is prepared on a backend once, not once per refusal.
        let (t, out) = limited(&mut c, &mut s, &parse_msg("s3", "SELECT 2"));
        assert!(
            matches!(t.translation, Translation::Replace { .. }),
            "{t:?}"
        );
        let tags: Vec<u8> = t.injected.iter().map(|i| i.tag).collect();
        assert_eq!((tags.as_slice(), out[0]), (&b"B"[..], b'B'));
        // A Close makes room, once it is known to have happened: while the server may
        // still skip it (its undo held), the name still counts.
        let (close, _) = limited(&mut c, &mut s, &small(b'C', b'S', "s0"));
        let (t, _) = limited(&mut c, &mut s, &parse_msg("s2", "SELECT 2"));
        assert!(
            matches!(t.translation, Translation::Replace { .. }),
            "{t:?}"
        );
        let undo = close.undo.expect("a Close of a name the client had");
        c.undo(&mut s, undo);
        assert_eq!(c.len(), 2, "skipped: the name is back");
        let (close, _) = limited(&mut c, &mut s, &small(b'C', b'S', "s0"));
        drop(close);
        let (t, _) = limited(&mut c, &mut s, &parse_msg("s2", "SELECT 2"));
        assert!(
            !matches!(t.translation, Translation::Replace { .. }),
            "{t:?}"
        );
        assert_eq!(c.len(), 2);
        // A Close first in its batch cannot be skipped: room at once (a driver closing a
        // statement, then preparing another, without waiting in between).
        let (_close, _) = in_batch(&mut c, &mut s, &small(b'C', b'S', "s1"), false);
        let (t, _) = limited(&mut c, &mut s, &parse_msg("s4", "SELECT 4"));
        assert!(
            !matches!(t.translation, Translation::Replace { .. }),
            "{t:?}"
        );
    }

    #[test]
    fn malformed_messages_are_refused() {
        let (r, mut s, mut c) = fresh(10);
        for msg in [
            &b"P\0\0\0\x06s0"[..],
            b"B\0\0\0\x06\0x",
            b"D\0\0\0\x06Xa\0",
            b"C\0\0\0\x05S",
        ] {
            assert!(
                c.translate(
                    &r,
                    &mut s,
                    msg,
                    msg.len(),
                    &mut BytesMut::new(),
                    Situation::FREE
                )
                .is_err(),
                "{msg:?}"
            );
        }
    }
}
