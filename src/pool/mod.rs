//! Pools of backend connections, one per (database, user), on deadpool.
//!
//! The rest of pgshield sees only this module's small interface: [`Pool::borrow`] gives a
//! [`Backend`] guard or a [`BorrowError`] (after `borrow_timeout`, clients waiting FIFO);
//! [`Backend::release`] hands it back, [`Backend::discard`] closes it. A guard dropped
//! without either is closed, never reused: a backend in an unknown state is worthless.
//! If fairness or direct hand-off ever need a custom pool, only this module changes.
//!
//! Each pool has a janitor (`janitor.rs`) that closes dead, old and long-idle backends and
//! keeps `min_idle` open.

/// A backend opened or closed: a line at info with `log.connections`, at debug without.
macro_rules! backend_event {
    ($loud:expr, $($field:tt)+) => {
        if $loud {
            tracing::info!($($field)+)
        } else {
            tracing::debug!($($field)+)
        }
    };
}

pub mod cluster;
mod janitor;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use deadpool::managed::{
    self, Manager, Metrics, Object, PoolError, QueueMode, RecycleError, RecycleResult, Timeouts,
};
use deadpool::Runtime;

use crate::config::HostRole;
use crate::config::{Config, StoredPassword};
use crate::lock;
use crate::metrics::{Metrics as Numbers, PoolMetrics};
use crate::prepared::ServerStatements;
use crate::protocol::{sqlstate, ErrorResponse};
use crate::server::password::PasswordCommand;
use crate::server::{connect, BackendPassword, Server, ServerError, ServerParams, ServerTarget};
use crate::shutdown::Shutdown;
use crate::tls::ServerTls;
use crate::FastMap;
use cluster::{Cluster, Route};

/// How often a backend open waiting for a host looks again, whatever it was told.
const RECHECK: Duration = Duration::from_millis(500);

/// The knobs of one pool, taken from `[pool]`.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_size: usize,
    pub min_idle: usize,
    /// `None`: wait without limit.
    pub borrow_timeout: Option<Duration>,
    pub server_connect_timeout: Duration,
    pub server_lifetime: Option<Duration>,
    pub server_idle_timeout: Option<Duration>,
    pub max_prepared_statements: usize,
    pub mode: crate::config::PoolMode,
    pub on_session_state: crate::config::OnSessionState,
    /// `log.connections`: backends opened and closed are logged at info, not debug.
    pub log_connections: bool,
    /// `pool.health_check_after`: an idle backend older than this is checked before it
    /// is lent.
    pub health_check_after: Option<Duration>,
    /// `read_only.fallback_to_primary`.
    pub fallback_to_primary: bool,
}

impl PoolSettings {
    pub fn from_config(config: &Config) -> PoolSettings {
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        PoolSettings {
            max_size: config.pool.max_size,
            min_idle: config.pool.min_idle,
            borrow_timeout: nonzero(config.pool.borrow_timeout),
            server_connect_timeout: config.pool.server_connect_timeout,
            server_lifetime: nonzero(config.pool.server_lifetime),
            server_idle_timeout: nonzero(config.pool.server_idle_timeout),
            max_prepared_statements: config.pool.max_prepared_statements,
            mode: config.pool.mode,
            on_session_state: config.pool.on_session_state,
            log_connections: config.log.connections,
            health_check_after: nonzero(config.pool.health_check_after),
            fallback_to_primary: config.read_only.fallback_to_primary,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BorrowError {
    #[error(
        "no server connection could be had in pool {pool} within borrow_timeout ({}): all {max_size} in use, or one being opened did not open in time",
        humantime::format_duration(*.timeout)
    )]
    Timeout {
        pool: String,
        timeout: Duration,
        max_size: usize,
    },
    #[error("{0}")]
    Server(String, #[source] ServerError),
    #[error("pool {0} is closed: pgshield is shutting down")]
    Closed(String),
    #[error("pool {0} was removed from the configuration")]
    Removed(String),
}

impl BorrowError {
    /// The ErrorResponse the waiting client gets (its connection stays usable).
    pub fn to_client_error(&self) -> ErrorResponse {
        match self {
            BorrowError::Timeout { .. } => {
                ErrorResponse::error(sqlstate::TOO_MANY_CONNECTIONS, self.to_string()).with_hint(
                    "raise pool.max_size or pool.borrow_timeout, or shorten transactions",
                )
            }
            BorrowError::Server(pool, e) => e.to_client_error(pool),
            BorrowError::Closed(_) => {
                ErrorResponse::fatal(sqlstate::ADMIN_SHUTDOWN, self.to_string())
            }
            BorrowError::Removed(_) => {
                ErrorResponse::fatal(sqlstate::INVALID_CATALOG_NAME, self.to_string())
            }
        }
    }
}

/// Opens and checks backends for one pool.
pub struct ServerManager {
    /// The pool's name, for log lines.
    pool: String,
    /// Where and as whom; behind a lock because a passthrough user's credential is
    /// replaced by the one from its latest login. (Its host and port are the cluster's
    /// first; each backend goes to the host [`Cluster::pick`] gives.)
    target: Mutex<ServerTarget>,
    /// The database's servers (a reload that changes them replaces it).
    cluster: ArcSwap<Cluster>,
    /// A read-only pool (`<database>_ro`): its backends are on replicas.
    read_only: bool,
    /// Opens of this pool waiting for a place under the database's limit.
    db_waiting: AtomicUsize,
    /// Told when a backend of this pool is given back while some of its opens wait for a
    /// place under the database's limit: they step back and take it (a busy pool's own
    /// clients would otherwise take it, transaction after transaction, while the open
    /// waits out its borrow_timeout).
    given_back: tokio::sync::Notify,
    /// Opens told a backend was given back, on their way to take it (no longer counted in
    /// `db_waiting`; see `Pool::borrow_holding`).
    handing_off: AtomicUsize,
    /// Replaced whole by a reload.
    settings: ArcSwap<PoolSettings>,
    /// The database's `max_db_connections`, shared with its other pools (a reload may
    /// set, change or remove it).
    db_limit: Mutex<Option<Arc<DbLimit>>>,
    metrics: PoolMetrics,
    /// RECONNECT: backends of an older generation are closed instead of reused.
    generation: AtomicU64,
    /// Parameters of the newest backend, as it reported them at login: what a new client
    /// is told at its own login (PgBouncer's "welcome message").
    welcome: Mutex<Option<Arc<ServerParams>>>,
}

impl Manager for ServerManager {
    // Boxed: a lent backend's guard lives in its session, and an idle session keeps an
    // empty one; unboxed, every client would carry room for a whole `Server`.
    type Type = Box<Server>;
    type Error = ServerError;

    async fn create(&self) -> Result<Box<Server>, ServerError> {
        if lending_idle_only() {
            return Err(ServerError::NotOpened);
        }
        // Boxed: opening a backend (TCP, TLS, authentication) is a large state machine,
        // and deadpool's borrow future embeds it. Unboxed, every client waiting for or
        // holding a borrow would carry it; boxed, only an actual connect pays for it.
        Box::pin(self.open()).await
    }

    async fn recycle(&self, server: &mut Box<Server>, _: &Metrics) -> RecycleResult<ServerError> {
        // (Per borrow: the settings are read once, through arc-swap's guard, not cloned.)
        let (mut unfit, check_after, check_within) = {
            let settings = self.settings.load();
            let unfit = self.unfit(server, &settings);
            (
                unfit,
                settings.health_check_after,
                settings.server_connect_timeout,
            )
        };
        // Idle a while: an empty query says whether it still answers (a server that went
        // away without closing its sockets, a network that dropped them).
        let due = unfit.is_none() && check_after.is_some_and(|after| server.idle_for() >= after);
        server.check_due = due && lending_idle_only();
        if due && !server.check_due && !answers(server, check_within).await {
            unfit = Some(NO_ANSWER);
        }
        if let Some(reason) = unfit {
            backend_event!(self.settings.load().log_connections, pool = %self.pool, server = %server.id(), pid = server.process_id(), reason, "closing backend instead of lending it");
            return Err(RecycleError::message(reason));
        }
        Ok(())
    }
}

thread_local! {
    static LEND_IDLE_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, one poll of a borrow that will be dropped if it does not complete, so that
/// the borrow only lends an idle backend as it is: it opens none (it fails at once with
/// [`ServerError::NotOpened`]) and does not wait for a due health check (the backend is
/// lent with `check_due` set; its borrower runs [`Pool::checked`]). Dropped half-way,
/// such a borrow would leave a connection half-opened, or close a healthy backend
/// mid-check.
pub fn lend_idle_only<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            LEND_IDLE_ONLY.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(LEND_IDLE_ONLY.with(|c| c.replace(true)));
    f()
}

fn lending_idle_only() -> bool {
    LEND_IDLE_ONLY.with(Cell::get)
}

/// Why a backend that failed its health check is closed.
const NO_ANSWER: &str = "no answer to the health check before lending it";

/// Whether an idle backend answers an empty query within `within`; one that does not is
/// marked broken and its host reported.
async fn answers(server: &mut Server, within: Duration) -> bool {
    let check = tokio::time::timeout(within, Box::pin(server.run_internal("")));
    if matches!(check.await, Ok(Ok(_))) {
        return true;
    }
    server.mark_broken();
    if let Some(lease) = server.host.as_ref() {
        lease.cluster().backend_lost(lease.index, None);
    }
    false
}

/// `get`, failing once `deadline` passes (a backend being opened meanwhile is dropped,
/// its place and any `max_db_connections` place with it) as a timeout of `Create`: told
/// apart from deadpool's own timeouts, of `Wait` (see [`Pool::borrow_error`]).
async fn within<T, E>(
    deadline: Option<tokio::time::Instant>,
    get: impl std::future::Future<Output = Result<T, PoolError<E>>>,
) -> Result<T, PoolError<E>> {
    match deadline {
        Some(deadline) => {
            tokio::time::timeout_at(deadline, get)
                .await
                .unwrap_or(Err(PoolError::Timeout(
                    deadpool::managed::TimeoutType::Create,
                )))
        }
        None => get.await,
    }
}

tokio::task_local! {
    /// Set while the janitor opens backends up to `min_idle`: an open then takes a free
    /// place under `max_db_connections` or fails, never waiting for one nor closing
    /// another pool's idle backend for it (as PgBouncer fills `min_pool_size`), and waits
    /// for a host for a second at most.
    static FILLING: ();
}

/// How long an open to fill `min_idle` waits for a host to serve.
const FILL_HOST_WAIT: Duration = Duration::from_secs(1);

impl ServerManager {
    /// A place under the database's `max_db_connections`, if it has one: at once when
    /// filling to `min_idle` (which never waits), otherwise in line up to `borrow_timeout`.
    async fn db_place(
        &self,
        limit: Option<&DbLimit>,
        filling: bool,
        settings: &PoolSettings,
    ) -> Result<Option<Place>, ServerError> {
        Ok(match limit {
            Some(limit) if filling => {
                Some(limit.capacity.try_take().ok_or_else(|| limit.reached())?)
            }
            Some(limit) => Some(
                limit
                    .acquire(
                        settings.borrow_timeout,
                        &self.db_waiting,
                        (&self.given_back, &self.handing_off),
                    )
                    .await?,
            ),
            None => None,
        })
    }

    /// Opens a backend for the pool: under `max_db_connections`, with the target and
    /// settings in force now.
    async fn open(&self) -> Result<Box<Server>, ServerError> {
        // The generation first: a reload that changes the target or the limit after this
        // read bumps it, so a backend opened with what is read below is never reused.
        let mut generation = self.generation.load(Ordering::Acquire);
        let filling = FILLING.try_with(|_| ()).is_ok();
        let settings_now = || {
            let settings = self.settings.load_full();
            if !filling {
                return settings;
            }
            let mut quick = (*settings).clone();
            quick.borrow_timeout = Some(FILL_HOST_WAIT);
            Arc::new(quick)
        };
        let mut settings = settings_now();
        let mut db_limit = lock(&self.db_limit).clone();
        let mut permit = self
            .db_place(db_limit.as_deref(), filling, &settings)
            .await?;
        let mut attempts = 0;
        let (mut server, lease, target) = loop {
            let mut target = lock(&self.target).clone();
            let opened = match self.open_on_a_host(&mut target, &settings).await {
                Ok(opened) => opened,
                Err(e) => {
                    self.metrics.backend_open_failures.increment(1);
                    return Err(e);
                }
            };
            self.metrics.backends_opened.increment(1);
            // A reload (or RECONNECT) while it opened, waiting for a host perhaps: it was
            // opened with what that replaced (the database, user, password, TLS), and
            // would be lent once so. Opened again with what is in force now (a few times
            // at most: reloads do not come without end).
            let now = self.generation.load(Ordering::Acquire);
            attempts += 1;
            if now == generation || attempts == 3 {
                break (opened.0, opened.1, target);
            }
            generation = now;
            settings = settings_now();
            // A `max_db_connections` the reload set (or changed) counts this one too.
            let limit_now = lock(&self.db_limit).clone();
            let same = match (&db_limit, &limit_now) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            };
            // (The stale connection closes first: not open, uncounted, while the wait
            // for a place under the new limit lasts.)
            drop(opened);
            if !same {
                drop(permit.take());
                db_limit = limit_now;
                permit = self
                    .db_place(db_limit.as_deref(), filling, &settings)
                    .await?;
            }
        };
        server.host = Some(lease);
        server.db_permit = permit;
        server.generation = generation;
        server.statements = ServerStatements::new(settings.max_prepared_statements);
        backend_event!(settings.log_connections, pool = %self.pool, server = %server.id(), pid = server.process_id(), addr = %target.addr(), tls = server.stream.is_tls(), "opened backend");
        let mut welcome = lock(&self.welcome);
        // Kept when unchanged: clients share one copy (see `ClientView`).
        let changed = welcome.as_deref() != Some(server.params());
        if changed && generation == self.generation.load(Ordering::Acquire) {
            *welcome = Some(Arc::new(server.params().clone()));
        }
        Ok(Box::new(server))
    }

    /// Connects to the host the cluster picks for the pool's route, trying others (or
    /// waiting for one, up to `borrow_timeout`) while none serves. With one host, or a
    /// fixed primary, a failed connection is the client's error at once (there is no
    /// other to try). `target` ends up naming the host connected to.
    async fn open_on_a_host(
        &self,
        target: &mut ServerTarget,
        settings: &PoolSettings,
    ) -> Result<(Server, cluster::HostLease), ServerError> {
        let mut cluster = self.cluster.load_full();
        let route = self.route(settings);
        let started = tokio::time::Instant::now();
        let deadline = settings.borrow_timeout.map(|t| started + t);
        let no_host = |cluster: &Cluster| ServerError::NoHost {
            database: cluster.database.clone(),
            want: if self.read_only { "replica" } else { "primary" },
            waited: settings.borrow_timeout.unwrap_or_default(),
        };
        let mut waited = false;
        // Hosts tried since the last pause: retried only after one, others first.
        let mut tried = Vec::new();
        loop {
            // A reload may have replaced the database's hosts meanwhile.
            if !Arc::ptr_eq(&cluster, &self.cluster.load()) {
                cluster = self.cluster.load_full();
                tried.clear();
            }
            let changes = cluster.changes();
            let picked = cluster.pick_except(route, &tried);
            let Some(index) = picked else {
                // No host to try now (a failover under way, no replica up, or all tried):
                // wait for the cluster to change, looking again at least every
                // RECHECK (a back-off may have ended without anyone saying so).
                waited = true;
                tried.clear();
                let now = tokio::time::Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Err(no_host(&cluster));
                }
                let until = deadline.map_or(now + RECHECK, |d| d.min(now + RECHECK));
                Cluster::wait_for_change(changes, Some(until)).await;
                continue;
            };
            tried.push(index);
            let host = &cluster.hosts[index].spec;
            target.host.clone_from(&host.host);
            target.port = host.port;
            match connect(target, settings.server_connect_timeout).await {
                Ok(mut server) if cluster.confirm(index, &server, route) => {
                    if waited {
                        cluster.note_wait(started.elapsed());
                    }
                    if cluster.needs_capacity() && !self.read_only {
                        cluster
                            .read_capacity(&mut server, settings.server_connect_timeout)
                            .await;
                        if server.is_broken() {
                            // Its reply may still come: never lend it.
                            return Err(ServerError::Protocol(
                                "could not read the server's max_connections \
                                 (max_connections_percent)"
                                    .into(),
                            ));
                        }
                    }
                    return Ok((server, cluster.lease(index)));
                }
                Ok(server) => {
                    tracing::info!(pool = %self.pool, host = %host.addr(), "the host is not what the pool wants (a replica for writers, or the reverse); trying another");
                    drop(server);
                }
                Err(e) => {
                    cluster.connect_failed(index, &e);
                    // Another host may serve when this one is unreachable, shutting down
                    // or full; a refused login or a TLS failure would be the same there.
                    let about_the_host = match &e {
                        ServerError::Connect { .. }
                        | ServerError::Timeout { .. }
                        | ServerError::Closed
                        | ServerError::Io(_) => true,
                        ServerError::Refused(r) => {
                            cluster::host_is_going_away(r)
                                || r.code == crate::protocol::sqlstate::TOO_MANY_CONNECTIONS
                        }
                        _ => false,
                    };
                    let no_other = cluster.hosts.len() == 1
                        || (route == Route::Primary && host.role == HostRole::Primary);
                    if no_other
                        || !about_the_host
                        || deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
                    {
                        return Err(e);
                    }
                    tracing::warn!(pool = %self.pool, host = %host.addr(), error = %e, "cannot open a backend; trying another host");
                }
            }
        }
    }

    /// What the pool's backends are for.
    fn route(&self, settings: &PoolSettings) -> Route {
        if self.read_only {
            Route::Replica {
                fallback: settings.fallback_to_primary,
            }
        } else {
            Route::Primary
        }
    }

    /// Why an idle backend must not be lent again, if it must not.
    fn unfit(&self, server: &Server, settings: &PoolSettings) -> Option<&'static str> {
        let host = server
            .host
            .as_ref()
            .and_then(|lease| lease.cluster().unfit(lease, self.route(settings)));
        if server.is_broken() {
            Some("broken")
        } else if let Some(reason) = host {
            Some(reason)
        } else if server.heard_notification() {
            Some("a notification came for no client listening through pgshield")
        } else if server.generation < self.generation.load(Ordering::Acquire) {
            Some("RECONNECT or a reload that changed its server")
        } else if !server.is_reusable() {
            Some("not at rest (a cancel was sent to it, or replies are owed)")
        } else if settings.server_lifetime.is_some_and(|l| server.outlived(l)) {
            Some("server_lifetime reached")
        } else if server.peer_closed_or_spoke() {
            Some("closed by the server while idle")
        } else if server
            .db_permit
            .as_ref()
            .is_some_and(|p| p.capacity.in_debt() && p.claim_debt())
        {
            // Last: a backend closed for another reason pays the debt anyway.
            Some("max_db_connections was lowered")
        } else {
            None
        }
    }
}

/// `d` ±20 %, the same for a given backend every time (lifetimes and idle timeouts, so
/// that backends opened together do not all close, and reconnect, together).
pub(crate) fn jittered(d: Duration, id: u64) -> Duration {
    // A multiplicative hash spreads consecutive ids over 0..=400 thousandths (integer
    // arithmetic: this runs twice a borrow, and Duration::mul_f64 is not cheap).
    let spread = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % 401;
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    Duration::from_nanos(micros.saturating_mul(800 + spread))
}

/// One pool: backends for one (database, user).
pub struct Pool {
    name: String,
    /// The database and user as clients name them (the config's table names).
    database: String,
    user: String,
    inner: managed::Pool<ServerManager>,
    /// Backends given back at rest, lent again before deadpool's idle ones.
    warm: Arc<Warm>,
    /// `max_size`: a place is held by each lent backend. (deadpool's own limit cannot be
    /// lowered while backends are lent; this one can, see [`Capacity`].)
    gate: Arc<Capacity>,
    /// Removed from the configuration by a reload: serves the clients it has, closes
    /// when they are gone. See [`Retirement`].
    retired: std::sync::atomic::AtomicU8,
    /// Totals for the admin console's SHOW STATS (Prometheus has its own handles).
    pub stats: PoolStats,
    /// Clients logged in to this pool.
    clients: AtomicUsize,
    /// Clients waiting for a backend (SHOW POOLS cl_waiting; its maxwait comes from the
    /// clients' own entries, as SHOW CLIENTS's wait does).
    waiters: AtomicUsize,
    /// PAUSE: no backend is lent until RESUME.
    paused: std::sync::atomic::AtomicBool,
    resumed: tokio::sync::Notify,
    /// Prepared statements by text, shared by the pool's clients (transaction mode). Per
    /// pool: its backends are its own, and what a text means (its result columns, the
    /// types it names) depends on the database and on the user (search_path).
    pub statements: crate::prepared::Registry,
}

/// The backends of a pool given back at rest, lent again newest first without a round
/// through deadpool: its queue, its semaphore and its recycle step cost a transaction-mode
/// borrow more than all the rest of the pool's work (docs/BENCHMARKS.md). A warm backend
/// is checked as deadpool's recycle checks it when it is lent ([`ServerManager::unfit`]),
/// and counts as idle in [`Pool::status`]. Deadpool counts
/// it as lent, so wherever deadpool's own view of the idle backends must be whole (each
/// janitor tick, for idle timeouts, health checks and `min_idle`; SHOW SERVERS,
/// RECONNECT, PAUSE, a resize, `max_db_connections`, closing) [`Pool::cool`] gives the
/// warm ones back to deadpool first.
///
/// While no borrower waits for a place, a backend given back keeps the place under
/// `max_size` it was lent under, for the next lend: a transaction then takes nothing from
/// the places' semaphore, nor gives anything back to it. Of the borrowers that wait for a
/// place together, the first frees those kept ([`Warm::unpark`]).
struct Warm {
    stack: Mutex<Vec<WarmBackend>>,
    /// Takes backends in; false while paused and once closed.
    open: AtomicBool,
    /// Borrowers waiting in deadpool's own queue (a place held, no backend to be had):
    /// backends go back to deadpool while any does.
    in_deadpool_queue: AtomicUsize,
    /// Borrowers waiting for a place: backends given back keep none meanwhile.
    queued: AtomicUsize,
    /// Of the backends in `stack`, those set aside for the pool's opens waiting under
    /// `max_db_connections` (see `ServerManager::given_back`): other borrowers take only
    /// those beyond. (Changed under the stack's lock; none once the stack is emptied.)
    reserved: AtomicUsize,
}

/// A backend kept warm, with the place it was lent under if it keeps one (see [`Warm`]).
/// (Fields drop in order: the backend goes back to deadpool before the place frees.)
struct WarmBackend {
    obj: Object<ServerManager>,
    place: Option<Place>,
}

impl Warm {
    /// Keeps `obj` warm, with `place` while no borrower waits for one and the limit is
    /// not in debt, or gives both back (`Err`) to go to deadpool.
    fn put(
        &self,
        obj: Object<ServerManager>,
        place: Option<Place>,
    ) -> Result<(), (Object<ServerManager>, Option<Place>)> {
        self.put_reserving(obj, place, 0).map(|_| ())
    }

    /// [`Self::put`], and set aside for an open waiting under `max_db_connections` (see
    /// [`Warm::reserved`]) while fewer are than the `waiting` opens: true if it was.
    fn put_reserving(
        &self,
        obj: Object<ServerManager>,
        place: Option<Place>,
        waiting: usize,
    ) -> Result<bool, (Object<ServerManager>, Option<Place>)> {
        let mut stack = lock(&self.stack);
        // (All looked at under the lock: `Pool::cool` empties the stack after closing
        // it, a borrower joins deadpool's queue before its last look at the stack, and
        // the first of the borrowers that wait for a place together is counted before it
        // frees those kept here: this look sees it counted, or comes before that.)
        if !self.open.load(Ordering::Acquire) || self.in_deadpool_queue.load(Ordering::Acquire) > 0
        {
            return Err((obj, place));
        }
        let keep = self.queued.load(Ordering::Acquire) == 0;
        let (kept, freed) = match place {
            Some(place) if keep && !place.capacity.in_debt() => (Some(place), None),
            other => (None, other),
        };
        stack.push(WarmBackend { obj, place: kept });
        let reserve = self.reserved.load(Ordering::Acquire) < waiting;
        if reserve {
            self.reserved.fetch_add(1, Ordering::AcqRel);
        }
        drop(stack);
        // (Once the backend is there for the borrower it wakes.)
        drop(freed);
        Ok(reserve)
    }

    /// Frees the places kept with warm backends, for a borrower about to wait for one.
    fn unpark(&self) {
        let freed: Vec<Place> = lock(&self.stack)
            .iter_mut()
            .filter_map(|warm| warm.place.take())
            .collect();
        drop(freed);
    }
}

/// One borrower counted as waiting for a place, until dropped.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn join(count: &'a AtomicUsize) -> Queued<'a> {
        Self::join_first(count).0
    }

    /// As [`Queued::join`], and whether no other borrower was counted.
    fn join_first(count: &'a AtomicUsize) -> (Queued<'a>, bool) {
        let before = count.fetch_add(1, Ordering::Relaxed);
        (Queued(count), before == 0)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where a pool stands after reloads.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Retirement {
    Serving = 0,
    /// Not in the configuration any more; serving the clients it has.
    Retired = 1,
    /// Closed by its janitor after its last client left.
    Closed = 2,
}

/// A pool's running totals (as PgBouncer's SHOW STATS_TOTALS; times in microseconds),
/// each thread adding to its own copy ([`PoolStats::local`]).
#[derive(Default)]
pub struct PoolStats {
    shards: crate::metrics::Sharded<Totals>,
}

/// One thread's share of a pool's running totals.
#[derive(Default)]
pub struct Totals {
    pub xact_count: AtomicU64,
    pub query_count: AtomicU64,
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub xact_time_us: AtomicU64,
    pub query_time_us: AtomicU64,
    pub wait_time_us: AtomicU64,
}

impl PoolStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// This thread's copy of the totals, to add to.
    pub fn local(&self) -> &Totals {
        self.shards.local()
    }

    /// One total, its threads' copies added up.
    pub fn total(&self, field: impl Fn(&Totals) -> &AtomicU64) -> u64 {
        self.shards.sum(field)
    }

    /// (xact_count, query_count, bytes_received, bytes_sent, xact_time, query_time, wait_time)
    pub fn totals(&self) -> [u64; 7] {
        let fields: [fn(&Totals) -> &AtomicU64; 7] = [
            |t| &t.xact_count,
            |t| &t.query_count,
            |t| &t.bytes_received,
            |t| &t.bytes_sent,
            |t| &t.xact_time_us,
            |t| &t.query_time_us,
            |t| &t.wait_time_us,
        ];
        fields.map(|field| self.total(field))
    }
}

/// An idle backend, for SHOW SERVERS.
pub struct IdleServer {
    pub id: u64,
    pub pid: i32,
    /// The server's address as connected to (its socket's directory for a
    /// Unix-domain socket) and port.
    pub peer: (String, u16),
    pub local: Option<std::net::SocketAddr>,
    pub opened_at: std::time::SystemTime,
    /// When it was last given back (or opened).
    pub idle_since: std::time::SystemTime,
    pub tls: bool,
}

/// One client's place in its pool's client count; dropping it leaves.
pub struct PoolClient(Arc<Pool>);

impl Drop for PoolClient {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client counted as waiting for a backend; dropping it stops counting it.
pub struct Waiter<'a> {
    _counted: Queued<'a>,
}

/// A snapshot of a pool's occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    pub max_size: usize,
    /// Backends open (idle or lent).
    pub open: usize,
    /// Backends idle in the pool.
    pub idle: usize,
    /// Clients queued for a backend.
    pub waiting: usize,
}

impl Pool {
    pub fn new(
        database: &str,
        user: &str,
        target: ServerTarget,
        settings: PoolSettings,
        db_limit: Option<Arc<DbLimit>>,
        cluster: Arc<Cluster>,
        metrics: &Numbers,
    ) -> Arc<Pool> {
        let settings = DbLimit::size_pool(db_limit.as_deref(), settings);
        let name = format!("{database}/{user}");
        let manager = ServerManager {
            db_waiting: AtomicUsize::new(0),
            given_back: tokio::sync::Notify::new(),
            handing_off: AtomicUsize::new(0),
            // Read-only pools are the only ones named otherwise than their database.
            read_only: cluster.database != database,
            cluster: ArcSwap::new(cluster),
            pool: name.clone(),
            metrics: metrics.pool(&name),
            generation: AtomicU64::new(0),
            db_limit: Mutex::new(db_limit.clone()),
            target: Mutex::new(target),
            settings: ArcSwap::from_pointee(settings.clone()),
            welcome: Mutex::new(None),
        };
        // (`borrow` gives the wait timeout on each call: a reload may change it.)
        let inner = managed::Pool::builder(manager)
            .max_size(settings.max_size)
            // The most recently returned backend goes out first, so surplus backends
            // really sit idle and server_idle_timeout can close them.
            .queue_mode(QueueMode::Lifo)
            .runtime(Runtime::Tokio1)
            .build()
            .expect("a runtime is given");
        let pool = Arc::new(Pool {
            name,
            database: database.to_owned(),
            user: user.to_owned(),
            inner,
            warm: Arc::new(Warm {
                stack: Mutex::new(Vec::new()),
                open: AtomicBool::new(true),
                in_deadpool_queue: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
                reserved: AtomicUsize::new(0),
            }),
            gate: Capacity::new(settings.max_size),
            retired: std::sync::atomic::AtomicU8::new(Retirement::Serving as u8),
            stats: PoolStats::default(),
            clients: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            paused: std::sync::atomic::AtomicBool::new(false),
            resumed: tokio::sync::Notify::new(),
            statements: crate::prepared::Registry::default(),
        });
        if let Some(limit) = db_limit {
            lock(&limit.pools).push(Arc::downgrade(&pool));
        }
        pool
    }

    /// The pool's knobs as they are now (a reload replaces them).
    pub fn settings(&self) -> Arc<PoolSettings> {
        self.inner.manager().settings.load_full()
    }

    /// What transaction mode does with state that cannot follow a client.
    pub fn on_session_state(&self) -> crate::config::OnSessionState {
        self.inner.manager().settings.load().on_session_state
    }

    /// When a client of this pool holds a backend (a client keeps the mode it logged
    /// in with; a reload changes it for later clients).
    pub fn mode(&self) -> crate::config::PoolMode {
        self.inner.manager().settings.load().mode
    }

    /// A reload: new knobs (the pool grows or shrinks to `max_size` at once; lent
    /// backends beyond it close when returned), where and as whom backends log in, and
    /// the database's `max_db_connections`. A different server, database, role or TLS
    /// mode, or a database limit that did not exist, retire the backends open now: they
    /// close when next idle (as RECONNECT) and clients carry on on new ones.
    pub(crate) fn update(
        self: &Arc<Self>,
        settings: PoolSettings,
        mut target: ServerTarget,
        db_limit: Option<Arc<DbLimit>>,
        cluster: Arc<Cluster>,
    ) {
        let settings = DbLimit::size_pool(db_limit.as_deref(), settings);
        let manager = self.inner.manager();
        let new_hosts = !Arc::ptr_eq(&manager.cluster.load(), &cluster);
        if new_hosts {
            tracing::info!(pool = %self.name, "reload: the database's hosts changed; open backends close when next idle");
            manager.cluster.store(cluster);
        }
        let old = manager.settings.swap(Arc::new(settings.clone()));
        if old.max_size != settings.max_size {
            // (And after: a backend given back meanwhile, not yet in debt, went warm.)
            self.cool();
            self.gate.resize(settings.max_size);
            self.inner.resize(settings.max_size);
            self.cool();
            tracing::info!(pool = %self.name, from = old.max_size, to = settings.max_size, "reload: pool resized");
        }
        let new_limit = {
            let mut current = lock(&manager.db_limit);
            let new_limit = match (&*current, &db_limit) {
                (_, None) => false,
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (None, Some(_)) => true,
            };
            *current = db_limit.clone();
            new_limit
        };
        if let Some(limit) = db_limit.filter(|_| new_limit) {
            lock(&limit.pools).push(Arc::downgrade(self));
        }
        let moved = {
            let mut current = lock(&manager.target);
            // A user with no server credential in the configuration keeps the one its
            // latest login gave (passthrough).
            if target.password.is_none() {
                target.password = current
                    .password
                    .clone()
                    .filter(|p| matches!(p, BackendPassword::ScramKeys { .. }));
            }
            let moved = !current.same_server(&target);
            if moved {
                tracing::info!(pool = %self.name, from = %current.addr(), to = %target.addr(), "reload: the pool's server changed; open backends close when next idle");
            }
            *current = target;
            moved
        };
        if moved {
            // Another server: what a statement's text means there is its own.
            self.statements.retire_all();
        }
        if moved || new_limit || new_hosts {
            *lock(&manager.welcome) = None;
            self.reconnect();
        }
    }

    /// `max_connections_percent` sized the database: each of its pools may grow to the
    /// database's whole size (the fair share keeps one from starving the others).
    pub(crate) fn set_max_size(&self, max_size: usize) {
        let manager = self.inner.manager();
        let old = manager.settings.load_full();
        if old.max_size == max_size {
            return;
        }
        let mut settings = (*old).clone();
        settings.max_size = max_size;
        manager.settings.store(Arc::new(settings));
        self.cool();
        self.gate.resize(max_size);
        self.inner.resize(max_size);
        self.cool();
        tracing::info!(pool = %self.name, from = old.max_size, to = max_size, "max_connections_percent: pool resized");
    }

    /// A reload removed this pool's database or user: no new client finds it; those
    /// connected keep their sessions, and the janitor closes it when they have all left.
    pub(crate) fn retire(&self) {
        self.retired
            .store(Retirement::Retired as u8, Ordering::Release);
        tracing::info!(pool = %self.name, clients = self.clients(), "reload: pool removed from the configuration; it closes when its clients leave");
    }

    /// A reload put back the database or user of this retired pool: it serves again,
    /// unless it has closed already (false).
    fn unretire(&self) -> bool {
        self.retired
            .compare_exchange(
                Retirement::Retired as u8,
                Retirement::Serving as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The janitor's last act for a retired pool: closes it if it is still retired.
    fn close_if_retired(&self) -> bool {
        let closing = self
            .retired
            .compare_exchange(
                Retirement::Retired as u8,
                Retirement::Closed as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if closing {
            self.close();
        }
        closing
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire) != Retirement::Serving as u8
    }

    /// For a user with no server credential of its own (a SCRAM verifier only, or found
    /// by `[auth]`): the server is logged in to with what its latest login proved.
    pub fn use_login_credential(&self, password: BackendPassword) {
        let mut target = lock(&self.inner.manager().target);
        if matches!(
            target.password,
            None | Some(BackendPassword::ScramKeys { .. })
        ) {
            target.password = Some(password);
        }
    }

    /// Counts a client in this pool until the returned place is dropped.
    pub fn join(self: &Arc<Self>) -> PoolClient {
        self.clients.fetch_add(1, Ordering::Relaxed);
        PoolClient(Arc::clone(self))
    }

    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }

    /// Counts a client as waiting for a backend (SHOW POOLS cl_waiting) until dropped.
    pub fn wait(&self) -> Waiter<'_> {
        Waiter {
            _counted: Queued::join(&self.waiters),
        }
    }

    /// Clients waiting for a backend now (queued, or held by PAUSE).
    pub fn waiting(&self) -> usize {
        self.waiters.load(Ordering::Relaxed)
    }

    /// PAUSE: lends no backend until [`Pool::resume`]; idle backends are closed as
    /// they come back. Returns once no backend is open and none is being borrowed (or
    /// once the pool is resumed meanwhile). Pause every pool with [`Pool::hold`] first,
    /// then wait on each, so that pools are paused together.
    pub async fn pause(&self) {
        self.hold();
        self.until_paused().await;
    }

    /// Stops lending backends (the first half of PAUSE).
    pub fn hold(&self) {
        self.paused.store(true, Ordering::Release);
        self.warm.open.store(false, Ordering::Release);
    }

    /// Waits until no backend is open or being borrowed; gives up if resumed meanwhile.
    pub async fn until_paused(&self) {
        loop {
            if !self.is_paused() {
                return;
            }
            self.cool();
            self.inner.retain(|_, _| false);
            let s = self.status();
            // `waiting` counts borrows in progress, a backend being opened included.
            if s.open == 0 && s.waiting == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Borrows a backend, waiting while the pool is paused. A backend obtained just as
    /// PAUSE began is closed (PAUSE means none stays open) and the wait starts again; so
    /// does a borrow that failed while paused (the database may be down on purpose). A
    /// drain ends a paused wait with [`BorrowError::Closed`].
    /// `held`: a place under `max_size` the borrower already has (see [`Pool::checked`]).
    pub(crate) async fn borrow_unless_paused(
        &self,
        shutdown: &Shutdown,
        mut held: Option<Place>,
    ) -> Result<Backend, BorrowError> {
        loop {
            tokio::select! {
                biased;
                _ = self.until_resumed() => {}
                _ = shutdown.draining() => return Err(BorrowError::Closed(self.name.clone())),
            }
            match self.borrow_holding(held.take()).await {
                Ok(backend) if self.is_paused() => backend.discard(),
                Ok(backend) => return Ok(backend),
                Err(_) if self.is_paused() => {}
                Err(e) => return Err(e),
            }
        }
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
        self.warm.open.store(true, Ordering::Release);
        // (A pool closed meanwhile keeps none.)
        if self.inner.is_closed() {
            self.warm.open.store(false, Ordering::Release);
            self.cool();
        }
        self.resumed.notify_waiters();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Waits while the pool is paused.
    pub async fn until_resumed(&self) {
        // The usual case, without touching the Notify's lock.
        if !self.is_paused() {
            return;
        }
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.is_paused() {
                return;
            }
            resumed.await;
        }
    }

    /// The idle backends: (server id, pid, peer, local address, opened at, TLS).
    pub fn idle_servers(&self) -> Vec<IdleServer> {
        self.cool();
        let mut idle = Vec::new();
        self.inner.retain(|server, _| {
            idle.push(IdleServer {
                id: server.id().0,
                pid: server.process_id(),
                peer: if server.stream.is_unix() {
                    let target = server.cancel_target();
                    let (dir, port) = target.server();
                    (dir.to_owned(), port)
                } else {
                    let peer = server.stream.peer_addr();
                    (peer.ip().to_string(), peer.port())
                },
                local: server.stream.local_addr(),
                opened_at: server.opened_at(),
                idle_since: std::time::SystemTime::now()
                    .checked_sub(server.idle_for())
                    .unwrap_or(std::time::UNIX_EPOCH),
                tls: server.stream.is_tls(),
            });
            true
        });
        idle
    }

    /// RECONNECT: backends open now close when next idle instead of being reused.
    pub fn reconnect(&self) {
        self.inner
            .manager()
            .generation
            .fetch_add(1, Ordering::AcqRel);
        self.cool();
        self.inner.retain(|_, _| false);
    }

    /// This pool's numbers.
    pub fn metrics(&self) -> &PoolMetrics {
        &self.inner.manager().metrics
    }

    /// Sets the gauges that describe the pool from its current state, and the counters
    /// kept in [`PoolStats`] (before a scrape).
    pub fn refresh_gauges(&self) {
        let s = self.status();
        let m = self.metrics();
        m.backends_open.set(s.open as f64);
        m.backends_idle.set(s.idle as f64);
        m.backends_lent.set(s.open.saturating_sub(s.idle) as f64);
        m.clients_waiting.set(self.waiting() as f64);
        let [xacts, queries, received, sent, ..] = self.stats.totals();
        m.publish([xacts, queries, received, sent]);
        m.max_backends.set(s.max_size as f64);
    }

    /// Whether `other` reaches the same server database: a pool of another user, the
    /// `<database>_ro` pool (same hosts), or another name configured for it. A schema
    /// change made through one is a schema change for all of them.
    pub fn same_database_as(&self, other: &Pool) -> bool {
        if std::ptr::eq(self, other) {
            return true;
        }
        let (mine, theirs) = (self.inner.manager(), other.inner.manager());
        let (a, b) = (mine.cluster.load(), theirs.cluster.load());
        if !Arc::ptr_eq(&a, &b) {
            // Another configured name: the same server database if they share a host
            // (listed in any order; a wrong match costs statements prepared again).
            let shared_host = a.hosts.iter().any(|h| {
                b.hosts
                    .iter()
                    .any(|o| o.spec.host == h.spec.host && o.spec.port == h.spec.port)
            });
            if !shared_host {
                return false;
            }
        }
        // (One lock at a time: two sessions may compare the same two pools either way.)
        let database = lock(&mine.target).database.clone();
        lock(&theirs.target).database == database
    }

    /// The database as clients name it.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// The user as clients name it.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `database/user`, as shown in messages and logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lends a backend, waiting in FIFO order up to `borrow_timeout`.
    pub async fn borrow(&self) -> Result<Backend, BorrowError> {
        self.borrow_holding(None).await
    }

    /// A borrow that can lend an idle backend at once, for one poll under
    /// [`lend_idle_only`]; `None` if none can be: the pool is paused, borrowers wait for
    /// a place (the borrow would join them), every place under `max_size` is taken, or
    /// no backend is idle.
    pub(crate) fn lend_at_once(
        &self,
    ) -> Option<impl std::future::Future<Output = Result<Backend, BorrowError>> + '_> {
        if self.is_paused() || self.others_queued() {
            return None;
        }
        let place = self.gate.try_take()?;
        let lendable = {
            let stack = lock(&self.warm.stack);
            stack.len() > self.held_back(self.warm.reserved.load(Ordering::Acquire))
        };
        if self.inner.status().available == 0 && !lendable {
            return None;
        }
        Some(self.borrow_holding(Some(place)))
    }

    /// [`Pool::borrow`], with a place under `max_size` already held (`held`) if any.
    async fn borrow_holding(&self, held: Option<Place>) -> Result<Backend, BorrowError> {
        let settings = self.inner.manager().settings.load_full();
        // (Read only when the borrow waits: most do not.)
        let mut started = None;
        let place = match held.or_else(|| self.gate.try_take()) {
            Some(place) => place,
            None => {
                started = Some(tokio::time::Instant::now());
                // Counted while waiting, however the wait ends (a borrower that gives
                // up drops this future); from now on no place is kept warm. (Those kept
                // until now are freed by the first of the borrowers queued together: a
                // backend given back while any is counted keeps none.)
                let (_queued, first) = Queued::join_first(&self.warm.queued);
                if first {
                    self.warm.unpark();
                }
                let place = match settings.borrow_timeout {
                    Some(limit) => tokio::time::timeout(limit, self.gate.take()).await,
                    None => Ok(self.gate.take().await),
                };
                match place {
                    Ok(Some(place)) => place,
                    Ok(None) => return Err(self.borrow_error(PoolError::Closed, &settings)),
                    Err(_) => {
                        let e = PoolError::Timeout(deadpool::managed::TimeoutType::Wait);
                        return Err(self.borrow_error(e, &settings));
                    }
                }
            }
        };
        // With a place, a warm backend is lent if there is one. Otherwise deadpool has an
        // idle backend or room to open one, and its own permit is free too (a lent
        // backend gives its permit back before its place), unless warm backends given
        // back meanwhile hold them: taken without a timer, as a wait of zero is
        // deadpool's non-blocking path. Should it not be, the borrow goes on as one that
        // waits, under what is left of `borrow_timeout`.
        if let Some(obj) = self.take_warm(&settings) {
            return Ok(self.lent(obj, place, &settings));
        }
        let timeouts = |wait| Timeouts {
            wait,
            create: None,
            recycle: None,
        };
        // From here on a backend may be opened (a host tried after another, a wait for
        // max_db_connections, a failover): all of it within what is left of
        // `borrow_timeout`, whose error then comes on time.
        let deadline = settings
            .borrow_timeout
            .map(|limit| started.unwrap_or_else(tokio::time::Instant::now) + limit);
        let got = loop {
            match self.get_within(deadline, &timeouts).await {
                // A backend of the pool given back while this borrow's open waited under
                // max_db_connections: lent, if still there (else it waits again).
                Err(PoolError::Backend(ServerError::GivenBack)) => {
                    let taken = self.take_warm_if(&settings, |_| true, true);
                    // (Counted from its wake-up to here, all in one poll: none drops
                    // this future in between.)
                    self.inner
                        .manager()
                        .handing_off
                        .fetch_sub(1, Ordering::AcqRel);
                    if let Some(warm) = taken {
                        return Ok(self.lent(warm.obj, place, &settings));
                    }
                }
                got => break got,
            }
        };
        match got {
            Ok(obj) => Ok(self.lent(obj, place, &settings)),
            Err(e) => Err(self.borrow_error(e, &settings)),
        }
    }

    /// Deadpool's part of [`Self::borrow_holding`]: an idle backend or a new one, within
    /// `deadline`.
    async fn get_within(
        &self,
        deadline: Option<tokio::time::Instant>,
        timeouts: &impl Fn(Option<Duration>) -> Timeouts,
    ) -> Result<Object<ServerManager>, PoolError<ServerError>> {
        let settings = self.inner.manager().settings.load_full();
        match within(
            deadline,
            self.inner.timeout_get(&timeouts(Some(Duration::ZERO))),
        )
        .await
        {
            Err(PoolError::Timeout(deadpool::managed::TimeoutType::Wait)) => {
                // Deadpool is full because of warm backends given back meanwhile: one
                // is lent. Otherwise, while this borrow waits in deadpool's queue, the
                // backends given back go there.
                let _queued = Queued::join(&self.warm.in_deadpool_queue);
                if let Some(obj) = self.take_warm(&settings) {
                    return Ok(obj);
                }
                let left =
                    deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
                within(deadline, self.inner.timeout_get(&timeouts(left))).await
            }
            got => got,
        }
    }

    /// The backend, once the health check it was lent without (`check_due`, see
    /// [`lend_idle_only`]) is done. If it failed, the backend is closed and its place
    /// under `max_size` is handed back, so that its borrower borrows another with it
    /// (`borrow_unless_paused`) instead of queueing again, as a check failed while
    /// lending does.
    pub(crate) async fn checked(&self, mut backend: Backend) -> Result<Backend, Option<Place>> {
        if !backend.server_ref().check_due {
            return Ok(backend);
        }
        backend.server().check_due = false;
        let within = self.inner.manager().settings.load().server_connect_timeout;
        if answers(backend.server(), within).await {
            return Ok(backend);
        }
        let loud = self.inner.manager().settings.load().log_connections;
        let server = backend.server_ref();
        backend_event!(loud, pool = %self.name, server = %server.id(), pid = server.process_id(), reason = NO_ANSWER, "closing backend instead of lending it");
        let place = backend._place.take();
        backend.discard();
        Err(place)
    }

    fn borrow_error(&self, e: PoolError<ServerError>, settings: &PoolSettings) -> BorrowError {
        match e {
            // (Only a borrow that may not open one, which says nothing of it.)
            PoolError::Backend(ServerError::NotOpened) => {
                BorrowError::Server(self.name.clone(), ServerError::NotOpened)
            }
            // borrow_timeout ran out while a backend was being opened: with no host to
            // open it on (a failover under way), the failover's error, as
            // `open_on_a_host` gives it; otherwise a timeout like any other.
            PoolError::Timeout(deadpool::managed::TimeoutType::Create)
                if self
                    .inner
                    .manager()
                    .cluster
                    .load()
                    .pick(self.inner.manager().route(settings))
                    .is_none() =>
            {
                BorrowError::Server(
                    self.name.clone(),
                    ServerError::NoHost {
                        database: self.database.clone(),
                        want: if self.inner.manager().read_only {
                            "replica"
                        } else {
                            "primary"
                        },
                        waited: settings.borrow_timeout.unwrap_or_default(),
                    },
                )
            }
            PoolError::Timeout(_) => {
                self.metrics().borrow_timeouts.increment(1);
                BorrowError::Timeout {
                    pool: self.name.clone(),
                    timeout: settings.borrow_timeout.unwrap_or_default(),
                    max_size: settings.max_size,
                }
            }
            PoolError::Backend(e) => {
                tracing::warn!(pool = %self.name, error = %e, "cannot open a backend");
                BorrowError::Server(self.name.clone(), e)
            }
            PoolError::Closed if self.is_retired() => BorrowError::Removed(self.name.clone()),
            PoolError::Closed => BorrowError::Closed(self.name.clone()),
            other => {
                BorrowError::Server(self.name.clone(), ServerError::Protocol(other.to_string()))
            }
        }
    }

    /// The parameters a new client is told at login. Opens a backend the first time,
    /// once the pool is not paused (PAUSE keeps none open; the login waits, as in
    /// PgBouncer, up to its own timeout).
    pub async fn welcome_params(&self) -> Result<Arc<ServerParams>, BorrowError> {
        loop {
            if let Some(params) = lock(&self.inner.manager().welcome).clone() {
                return Ok(params);
            }
            self.until_resumed().await;
            let backend = self.borrow().await?;
            if !self.is_paused() {
                backend.release();
                break;
            }
            backend.discard();
        }
        lock(&self.inner.manager().welcome)
            .clone()
            .ok_or_else(|| BorrowError::Closed(self.name.clone()))
    }

    pub fn status(&self) -> PoolStatus {
        let s = self.inner.status();
        // (Deadpool counts the warm ones as lent.)
        let warm = lock(&self.warm.stack).len();
        PoolStatus {
            max_size: self.gate.max(),
            open: s.size,
            idle: s.available + warm,
            waiting: s.waiting + self.warm.queued.load(Ordering::Relaxed),
        }
    }

    /// Closes idle backends and refuses new borrows; lent backends close on return.
    pub fn close(&self) {
        self.gate.close();
        self.inner.close();
        self.warm.open.store(false, Ordering::Release);
        self.cool();
    }

    /// Gives the warm backends back to deadpool (see [`Warm`]), the most recently used
    /// last, so that it is the first deadpool lends.
    pub(crate) fn cool(&self) {
        let warm = {
            let mut stack = lock(&self.warm.stack);
            self.warm.reserved.store(0, Ordering::Release);
            std::mem::take(&mut *stack)
        };
        drop(warm);
    }

    /// A warm backend fit to lend, if any (see [`Warm`]); those found unfit are closed,
    /// and one due for a health check goes to deadpool, whose recycle step runs it. (A
    /// place it kept is freed: the borrower has one.)
    fn take_warm(&self, settings: &PoolSettings) -> Option<Object<ServerManager>> {
        Some(self.take_warm_if(settings, |_| true, false)?.obj)
    }

    /// As [`Self::take_warm`], but only while the warm backend next in line is `wanted`,
    /// and with the place it kept, if any.
    /// `for_waiter`: for an open waiting under `max_db_connections`, which may take one
    /// set aside for it (see [`Warm::reserved`]); others take only those beyond.
    fn take_warm_if(
        &self,
        settings: &PoolSettings,
        wanted: impl Fn(&Server) -> bool,
        mut for_waiter: bool,
    ) -> Option<WarmBackend> {
        let manager = self.inner.manager();
        loop {
            let warm = {
                let mut stack = lock(&self.warm.stack);
                let reserved = self.warm.reserved.load(Ordering::Acquire);
                let held_back = self.held_back(reserved);
                if (!for_waiter && stack.len() <= held_back) || !wanted(&stack.last()?.obj) {
                    return None;
                }
                if for_waiter && reserved > 0 {
                    // (Its one: an unfit one closed below leaves it none to take next.)
                    self.warm.reserved.store(reserved - 1, Ordering::Release);
                    for_waiter = false;
                } else if reserved > held_back {
                    // (Set aside for opens no longer waiting.)
                    self.warm.reserved.store(held_back, Ordering::Release);
                }
                stack.pop()?
            };
            let WarmBackend { obj, place } = warm;
            if let Some(reason) = manager.unfit(&obj, settings) {
                backend_event!(settings.log_connections, pool = %self.name, server = %obj.id(), pid = obj.process_id(), reason, "closing backend instead of lending it");
                drop(Object::take(obj));
            } else if settings
                .health_check_after
                .is_some_and(|after| obj.idle_for() >= after)
            {
                drop(obj);
            } else {
                return Some(WarmBackend { obj, place });
            }
        }
    }

    /// Of `reserved` warm backends, those still set aside: only while opens wait for
    /// them, or are on their way to take them (one that got its place otherwise, or went
    /// away, leaves its backend to the others).
    fn held_back(&self, reserved: usize) -> usize {
        if reserved == 0 {
            return 0;
        }
        let manager = self.inner.manager();
        let waiting = manager.db_waiting.load(Ordering::Acquire)
            + manager.handing_off.load(Ordering::Acquire);
        reserved.min(waiting)
    }

    /// Whether borrowers wait for a place under `max_size`. A borrow then joins them
    /// instead of being lent at once: places go to them in turn, and warm backends keep
    /// none (from the moment the first of them has freed those kept; a place handed to
    /// one not yet polled is not free either). A cheap look that spares the lends at
    /// once that would fail (taking a warm backend off the stack, checking it, putting
    /// it back) when clients outnumber the pool; `borrow_holding` serves a borrow that
    /// finds a place free after all.
    fn others_queued(&self) -> bool {
        self.warm.queued.load(Ordering::Relaxed) > 0
    }

    fn lent(&self, obj: Object<ServerManager>, place: Place, settings: &PoolSettings) -> Backend {
        Backend {
            obj: Some(obj),
            _place: Some(place),
            lifetime: settings.server_lifetime,
            warm: Arc::clone(&self.warm),
        }
    }

    /// A warm backend now, with a place under `max_size`, if both are to be had without
    /// waiting: the borrow of a transaction-mode client, most of the time.
    pub(crate) fn lend_warm(&self) -> Option<Backend> {
        self.lend_warm_if(|_| true)
    }

    /// As [`Self::lend_warm`], but only while the warm backend next in line is `wanted`.
    pub(crate) fn lend_warm_if(&self, wanted: impl Fn(&Server) -> bool) -> Option<Backend> {
        if self.is_paused() || self.others_queued() {
            return None;
        }
        let settings = self.inner.manager().settings.load();
        let WarmBackend { obj, place } = self.take_warm_if(&settings, wanted, false)?;
        // The place it kept (unless `max_size` was lowered since: that place pays the
        // debt), or a free one.
        let place = place.filter(|p| !p.capacity.in_debt());
        let Some(place) = place.or_else(|| self.gate.try_take()) else {
            // None free: borrowers wait for places, and are served in turn.
            if let Err((obj, _)) = self.warm.put(obj, None) {
                drop(obj);
            }
            return None;
        };
        Some(self.lent(obj, place, &settings))
    }
}

/// A lent backend. Give it back with [`Backend::release`] or close it with
/// [`Backend::discard`]; dropping it closes it.
pub struct Backend {
    obj: Option<Object<ServerManager>>,
    /// Its place under the pool's `max_size`, given back after the backend (a field
    /// drops after `Drop::drop` has returned or closed the backend).
    _place: Option<Place>,
    lifetime: Option<Duration>,
    /// Where it goes back to first (see [`Warm`]).
    warm: Arc<Warm>,
}

impl Backend {
    pub fn server(&mut self) -> &mut Server {
        self.obj
            .as_mut()
            .expect("a backend guard holds a server until consumed")
    }

    pub fn server_ref(&self) -> &Server {
        self.obj
            .as_ref()
            .expect("a backend guard holds a server until consumed")
    }

    /// Returns the backend to its pool if it is at rest and young enough; closes it
    /// otherwise.
    pub fn release(mut self) {
        let Some(mut obj) = self.obj.take() else {
            return;
        };
        let expired = self.lifetime.is_some_and(|l| obj.outlived(l));
        // Another pool of the database waits for a place this pool holds more than its
        // share of: the backend closes instead (a busy pool must not starve the others).
        // (Looked into only while some pool waits under the limit: this runs per
        // transaction, and the check below does not come free.)
        let contended = obj
            .db_permit
            .as_ref()
            .is_some_and(|p| p.capacity.waiters.load(Ordering::Relaxed) > 0);
        let over_share = contended
            && Object::pool(&obj).is_some_and(|p| {
                let limit = lock(&p.manager().db_limit).clone();
                limit.is_some_and(|l| l.over_fair_share(p.manager(), p.status().size))
            });
        if obj.is_reusable() && !expired && !over_share {
            obj.mark_idle_now();
            // (A lowered `max_size` takes the places of backends given back to deadpool,
            // which closes those beyond its size.)
            // Given back to deadpool (dropped) unless kept warm.
            let in_debt = self._place.as_ref().is_some_and(|p| p.capacity.in_debt());
            // An open of this pool waiting for a place under the database's limit is
            // told, once the backend is back, to take it instead.
            let given_back = contended
                .then(|| Object::pool(&obj))
                .flatten()
                .filter(|p| p.manager().db_waiting.load(Ordering::Acquire) > 0);
            let waiting = given_back.as_ref().map_or(0, |p| {
                let manager = p.manager();
                manager.db_waiting.load(Ordering::Acquire)
                    + manager.handing_off.load(Ordering::Acquire)
            });
            if in_debt {
                drop(obj);
            } else {
                // Set aside for the first of them (others take only backends beyond it),
                // which is woken to take it.
                match self.warm.put_reserving(obj, self._place.take(), waiting) {
                    Ok(true) => {
                        if let Some(pool) = given_back {
                            pool.manager().given_back.notify_one();
                        }
                    }
                    Ok(false) => {}
                    Err((obj, place)) => {
                        drop(obj);
                        drop(place);
                    }
                }
            }
        } else {
            let loud =
                Object::pool(&obj).is_some_and(|p| p.manager().settings.load().log_connections);
            let reason = if expired {
                "server_lifetime reached"
            } else if over_share {
                "another pool of the database waits under max_db_connections"
            } else {
                "not at rest"
            };
            backend_event!(loud, server = %obj.id(), pid = obj.process_id(), reason, "closing backend on release");
            drop(Object::take(obj));
        }
    }

    /// Closes the backend; its slot in the pool frees at once.
    pub fn discard(mut self) {
        if let Some(obj) = self.obj.take() {
            drop(Object::take(obj));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(obj) = self.obj.take() {
            drop(Object::take(obj));
        }
    }
}

/// A number of places that a reload can change: a semaphore whose permits are held (as
/// [`Place`]s) for as long as a place is used. Raising `max` frees places at once;
/// lowering it takes free places out of circulation at once and the others as they are
/// given back (a "debt"), so the places in use never exceed the new `max` once those in
/// use at the reload end. Waiters are served first come, first served (tokio's
/// semaphore), and a place paying the debt never reaches them.
pub(crate) struct Capacity {
    permits: Arc<tokio::sync::Semaphore>,
    max: AtomicUsize,
    /// Places still to take out of circulation after `max` was lowered.
    debt: AtomicUsize,
    /// Opens waiting for a place (`DbLimit`s count theirs here).
    waiters: AtomicUsize,
    /// Places of closed backends not given back yet (their servers are exiting): as good
    /// as free for a waiter, which closes no other backend for them.
    returning: AtomicUsize,
}

impl Capacity {
    fn new(max: usize) -> Arc<Capacity> {
        Arc::new(Capacity {
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
            max: AtomicUsize::new(max),
            debt: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            returning: AtomicUsize::new(0),
        })
    }

    fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// Whether `max` was lowered below the places in use, and some have yet to be given back.
    fn in_debt(&self) -> bool {
        self.debt.load(Ordering::Acquire) > 0
    }

    fn resize(&self, max: usize) {
        let old = self.max.swap(max, Ordering::AcqRel);
        if max > old {
            let want = max - old;
            let mut grow = want;
            let _ = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                    let paid = debt.min(want);
                    grow = want - paid;
                    Some(debt - paid)
                });
            self.permits.add_permits(grow);
        } else if max < old {
            self.debt.fetch_add(old - max, Ordering::AcqRel);
            // Free places pay at once.
            while self.in_debt() {
                let Ok(permit) = self.permits.try_acquire() else {
                    break;
                };
                if !self.owe_one() {
                    break;
                }
                permit.forget();
            }
        }
    }

    /// Counts one place off the debt, if one is owed.
    fn owe_one(&self) -> bool {
        self.debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok()
    }

    fn place(self: &Arc<Self>, permit: tokio::sync::OwnedSemaphorePermit) -> Place {
        Place {
            permit: Some(permit),
            capacity: Arc::clone(self),
            doomed: std::sync::atomic::AtomicBool::new(false),
            returning: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A place now, if one is free.
    fn try_take(self: &Arc<Self>) -> Option<Place> {
        let permit = Arc::clone(&self.permits).try_acquire_owned().ok()?;
        Some(self.place(permit))
    }

    /// A place, waiting in line. None if closed.
    async fn take(self: &Arc<Self>) -> Option<Place> {
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok()?;
        Some(self.place(permit))
    }

    fn close(&self) {
        self.permits.close();
    }
}

/// One place under a [`Capacity`], given back when dropped (or, while the capacity is
/// in debt, taken out of circulation).
pub(crate) struct Place {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    capacity: Arc<Capacity>,
    /// Chosen to pay the debt of a lowered limit: forgotten, not given back.
    doomed: std::sync::atomic::AtomicBool,
    /// Its backend is closed; counted in `Capacity::returning` until dropped.
    returning: std::sync::atomic::AtomicBool,
}

impl Place {
    /// Its backend is closed, and it is given back once the server has exited: counted as
    /// on its way back meanwhile (and, if the limit was lowered, it pays that debt now).
    pub(crate) fn returning(&self) {
        if self.capacity.in_debt() {
            self.claim_debt();
        }
        if !self.returning.swap(true, Ordering::AcqRel) {
            self.capacity.returning.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// While the limit is in debt, claims one unit of it for this place (which must then
    /// be closed: true) so that exactly as many holders close as the debt asks.
    fn claim_debt(&self) -> bool {
        if self.doomed.load(Ordering::Acquire) {
            return true;
        }
        let claimed = self.capacity.owe_one();
        if claimed {
            self.doomed.store(true, Ordering::Release);
        }
        claimed
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.returning.load(Ordering::Acquire) {
            self.capacity.returning.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(permit) = self.permit.take() {
            if self.doomed.load(Ordering::Acquire) || self.capacity.owe_one() {
                permit.forget();
            }
        }
    }
}

/// How often, at most, pools of users `[auth]` found are looked at for ones nobody uses,
/// and how long one must have gone unused.
const FOUND_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The places of a `max_db_connections` a reload removed: as good as none.
const LIFTED: usize = 1 << 24;

/// How often a pool waiting under `max_db_connections` looks for an idle backend of
/// another pool to close.
const DB_LIMIT_LOOK_AGAIN: Duration = Duration::from_millis(100);

/// `max_db_connections`: backends open to one database across all its pools. A pool
/// that needs one more when the cap is reached closes an idle backend of another pool
/// of the database (as PgBouncer does), or waits for one to close.
pub struct DbLimit {
    database: String,
    capacity: Arc<Capacity>,
    pools: Mutex<Vec<std::sync::Weak<Pool>>>,
    /// `max_idle_percent`: idle backends of the database kept at most (0: no limit).
    max_idle: AtomicUsize,
    /// `max_connections_percent`, once the server's size is known: the `max_size` of each
    /// of the database's pools (0: `pool.max_size` applies).
    pool_max: AtomicUsize,
}

impl DbLimit {
    fn new(database: &str, max: usize) -> Arc<DbLimit> {
        Arc::new(DbLimit {
            database: database.to_owned(),
            capacity: Capacity::new(max),
            pools: Mutex::new(Vec::new()),
            max_idle: AtomicUsize::new(0),
            pool_max: AtomicUsize::new(0),
        })
    }

    /// `settings` with the `max_size` sizing gave the database's pools, if it did.
    fn size_pool(limit: Option<&DbLimit>, mut settings: PoolSettings) -> PoolSettings {
        match limit.map_or(0, |l| l.pool_max.load(Ordering::Acquire)) {
            0 => settings,
            max => {
                settings.max_size = max;
                settings
            }
        }
    }

    /// Sizing: every pool of the database may grow to `max` (0: back to `pool.max_size`,
    /// which the caller's next `Pool::update` applies).
    pub(crate) fn set_pool_max(&self, max: usize) {
        self.pool_max.store(max, Ordering::Release);
        if max > 0 {
            for pool in self.pools() {
                pool.set_max_size(max);
            }
        }
    }

    fn pools(&self) -> Vec<Arc<Pool>> {
        let mut pools = lock(&self.pools);
        // (Those gone are dropped here: found users' pools come and go for good.)
        pools.retain(|p| p.strong_count() > 0);
        pools.iter().filter_map(std::sync::Weak::upgrade).collect()
    }

    /// Whether the pool of `manager`, with `open` backends, holds more than its share
    /// while another pool below its share waits for a place: the places are shared
    /// evenly between the pools that have clients or backends.
    fn over_fair_share(&self, manager: &ServerManager, open: usize) -> bool {
        let pools = self.pools();
        let mine = |p: &Pool| std::ptr::eq(p.inner.manager(), manager);
        let busy = pools
            .iter()
            .filter(|p| p.clients() > 0 || p.status().open > 0)
            .count()
            .max(1);
        let share = (self.capacity.max() / busy).max(1);
        open > share
            && pools.iter().any(|p| {
                !mine(p)
                    && p.inner.manager().db_waiting.load(Ordering::Acquire) > 0
                    && p.status().open < share
            })
    }

    /// Idle backends of the database beyond `max_idle_percent`.
    fn idle_excess(&self) -> usize {
        let max = self.max_idle.load(Ordering::Acquire);
        if max == 0 {
            return 0;
        }
        let idle: usize = self.pools().iter().map(|p| p.status().idle).sum();
        idle.saturating_sub(max)
    }

    /// A place, waiting up to `wait`; `waiting` (the pool's) counts the wait. In line
    /// from the first look: waiters are served in the order they came. `ServerError::
    /// GivenBack` when `given_back` (the pool's) is told: a backend of the pool is there
    /// to be lent instead.
    async fn acquire(
        &self,
        wait: Option<Duration>,
        waiting: &AtomicUsize,
        (given_back, handing_off): (&tokio::sync::Notify, &AtomicUsize),
    ) -> Result<Place, ServerError> {
        if let Some(permit) = self.capacity.try_take() {
            return Ok(permit);
        }
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        // (Told from the moment it is counted as waiting: see `Backend::release`.)
        let returned = given_back.notified();
        tokio::pin!(returned);
        if returned.as_mut().enable() {
            // (Told already: a backend is there.)
            handing_off.fetch_add(1, Ordering::AcqRel);
            return Err(ServerError::GivenBack);
        }
        let _waiting = (Queued::join(waiting), Queued::join(&self.capacity.waiters));
        let take = self.capacity.take();
        tokio::pin!(take);
        loop {
            // A backend that went idle in another pool since the last look makes way
            // (unless closed ones, their places on their way back, are enough for the
            // waiters, this one included).
            let in_line = self.capacity.waiters.load(Ordering::Acquire);
            if self.capacity.returning.load(Ordering::Acquire) < in_line {
                self.close_one_idle();
            }
            let mut next_look = tokio::time::Instant::now() + DB_LIMIT_LOOK_AGAIN;
            if let Some(deadline) = deadline {
                if tokio::time::Instant::now() >= deadline {
                    return Err(self.reached());
                }
                next_look = next_look.min(deadline);
            }
            tokio::select! {
                // (A place granted as the deadline comes is taken.)
                biased;
                permit = &mut take => return permit.ok_or_else(|| self.reached()),
                () = &mut returned => {
                    // (Counted until it has taken the backend, in the same poll: see
                    // `Pool::borrow_holding`.)
                    handing_off.fetch_add(1, Ordering::AcqRel);
                    return Err(ServerError::GivenBack);
                }
                () = tokio::time::sleep_until(next_look) => {}
            }
        }
    }

    /// Closes one idle backend of some pool of the database, freeing its place.
    fn close_one_idle(&self) {
        // The pool with the most backends gives first.
        let mut pools = self.pools();
        pools.sort_by_key(|p| std::cmp::Reverse(p.status().open));
        for pool in pools {
            let mut closed = false;
            pool.cool();
            pool.inner.retain(|_, _| {
                if closed {
                    return true;
                }
                closed = true;
                false
            });
            if closed {
                tracing::debug!(pool = %pool.name, database = %self.database, "closed an idle backend for another pool (max_db_connections)");
                return;
            }
        }
    }

    fn reached(&self) -> ServerError {
        ServerError::DbLimit {
            database: self.database.clone(),
            max: self.capacity.max(),
        }
    }
}

type PoolKey = (String, String);

/// All pools, keyed by (database, user) as clients name them.
pub struct Pools {
    state: Mutex<PoolsState>,
    /// Stops the janitors of all pools, those made later too.
    janitor_stop: std::sync::OnceLock<tokio_util::sync::CancellationToken>,
    metrics: Arc<Numbers>,
    /// What the console's PAUSE covers until RESUME, pools made meanwhile too (a user
    /// `[auth]` finds, a reload's).
    paused: Mutex<PauseScope>,
}

/// What the console's PAUSE covers (see [`Pools::note_paused`]).
#[derive(Default)]
struct PauseScope {
    /// Every database (PAUSE alone, SIGUSR1)…
    all: bool,
    /// …but these, resumed since (RESUME db).
    resumed: std::collections::HashSet<String>,
    /// Databases paused by name (PAUSE db, KILL db).
    databases: std::collections::HashSet<String>,
}

impl PauseScope {
    fn covers(&self, database: &str) -> bool {
        (self.all && !self.resumed.contains(database)) || self.databases.contains(database)
    }

    fn pause(&mut self, database: Option<&str>) {
        match database {
            None => {
                *self = PauseScope {
                    all: true,
                    ..Default::default()
                }
            }
            Some(db) => {
                self.resumed.remove(db);
                self.databases.insert(db.to_owned());
            }
        }
    }

    fn resume(&mut self, database: Option<&str>) {
        match database {
            None => *self = PauseScope::default(),
            Some(db) => {
                self.databases.remove(db);
                if self.all {
                    self.resumed.insert(db.to_owned());
                }
            }
        }
    }
}

/// What a reload replaces.
struct PoolsState {
    configured: FastMap<PoolKey, Arc<Pool>>,
    /// Pools of users found by `[auth]` (made at their first login).
    found: FastMap<PoolKey, Arc<Pool>>,
    /// When each of `found` was last handed to a login.
    found_handed: FastMap<PoolKey, Instant>,
    /// When `found` was last looked at for pools nobody uses (see `sweep_found`).
    found_swept: Option<Instant>,
    /// Pools a reload removed that still have clients.
    retired: Vec<Arc<Pool>>,
    /// What a pool is made from.
    databases: std::collections::BTreeMap<String, crate::config::DatabaseConfig>,
    settings: PoolSettings,
    /// `[auth]` is on, and the users `auth.file` lists: who may get a pool at their first
    /// login (one that found a user just before a reload took that away gets none).
    auth_enabled: bool,
    listed: std::collections::HashSet<String>,
    tls: Arc<ServerTls>,
    /// `max_db_connections`, by database.
    db_limits: HashMap<String, Arc<DbLimit>>,
    /// Each database's servers, and the token that stops its monitor.
    clusters: HashMap<String, (Arc<Cluster>, tokio_util::sync::CancellationToken)>,
}

impl PoolsState {
    /// Retires the pools of users `[auth]` found that nobody uses (no client, no backend,
    /// not handed to a login for [`FOUND_SWEEP_EVERY`]), at most that often: their
    /// janitors close them and end. A user whose role exists for a while only (Vault's
    /// dynamic credentials) would otherwise leave a pool and its task for good. Retired
    /// pools already closed are forgotten.
    fn sweep_found(&mut self, now: Instant) -> bool {
        if self
            .found_swept
            .is_some_and(|at| now.saturating_duration_since(at) < FOUND_SWEEP_EVERY)
        {
            return false;
        }
        self.found_swept = Some(now);
        let handed = &self.found_handed;
        let unused: Vec<PoolKey> = self
            .found
            .iter()
            .filter(|(key, pool)| {
                handed
                    .get(*key)
                    .is_none_or(|at| now.saturating_duration_since(*at) >= FOUND_SWEEP_EVERY)
                    && pool.clients() == 0
                    && pool.waiting() == 0
                    && pool.status().open == 0
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in unused {
            self.found_handed.remove(&key);
            if let Some(pool) = self.found.remove(&key) {
                tracing::debug!(pool = %pool.name, "closing the pool of a user [auth] found: unused");
                pool.retired
                    .store(Retirement::Retired as u8, Ordering::Release);
                self.retired.push(pool);
            }
        }
        self.retired.retain(|p| !p.inner.is_closed());
        true
    }

    /// A retired pool of (database, user) that has not closed yet, serving again.
    fn revive(&mut self, database: &str, user: &str) -> Option<Arc<Pool>> {
        let i = self
            .retired
            .iter()
            .position(|p| (p.database(), p.user()) == (database, user) && p.unretire())?;
        Some(self.retired.swap_remove(i))
    }

    fn target(
        &self,
        database: &str,
        db: &crate::config::DatabaseConfig,
        server_user: &str,
        password: Option<BackendPassword>,
    ) -> ServerTarget {
        // The first host stands for the database (each backend goes where the cluster says).
        let (host, port) = self
            .clusters
            .get(database)
            .and_then(|(c, _)| c.hosts.first())
            .map_or_else(
                || (db.host.clone(), db.port),
                |h| (h.spec.host.clone(), h.spec.port),
            );
        ServerTarget {
            host,
            port,
            database: db.dbname.clone().unwrap_or_else(|| database.to_owned()),
            user: server_user.to_owned(),
            password,
            tls: Arc::clone(&self.tls),
            application_name: None,
        }
    }
}

impl Pools {
    /// One pool for every configured database and user.
    pub fn from_config(config: &Config, tls: &Arc<ServerTls>, metrics: &Arc<Numbers>) -> Pools {
        let pools = Pools {
            state: Mutex::new(PoolsState {
                configured: FastMap::default(),
                found: FastMap::default(),
                found_handed: FastMap::default(),
                found_swept: None,
                retired: Vec::new(),
                databases: Default::default(),
                settings: PoolSettings::from_config(config),
                auth_enabled: config.auth.enabled,
                listed: Default::default(),
                tls: Arc::clone(tls),
                db_limits: HashMap::new(),
                clusters: HashMap::new(),
            }),
            janitor_stop: std::sync::OnceLock::new(),
            metrics: Arc::clone(metrics),
            paused: Mutex::default(),
        };
        pools.apply(config, tls);
        pools
    }

    /// Makes the pools what `config` says (at start, and on each reload): pools of
    /// databases and users it no longer has are retired (their clients carry on), new
    /// ones are made, and the others take the new settings and targets (see
    /// [`Pool::update`]). Returns (pools added, pools retired).
    pub fn apply(&self, config: &Config, tls: &Arc<ServerTls>) -> (usize, usize) {
        let settings = PoolSettings::from_config(config);
        // (One line for all of them: an auth.file made from pg_authid lists hundreds.)
        let passthrough: Vec<&str> = config
            .users
            .iter()
            .filter(|(_, user)| backend_password(user).is_none())
            .map(|(name, _)| name.as_str())
            .collect();
        if !passthrough.is_empty() {
            tracing::warn!(
                users = passthrough.len(),
                first = %passthrough.iter().take(5).copied().collect::<Vec<_>>().join(", "),
                "users with no password pgshield can log in to the server with (none, or only \
                 a SCRAM verifier): it logs in with the keys of each one's own SCRAM logins \
                 (passthrough), or to servers that trust it"
            );
        }
        // One credential per user, shared by its pools (so a command runs once for all);
        // `auth.file`'s users' too, for health checks and for their pools made at login.
        let passwords: HashMap<&String, Option<BackendPassword>> = config
            .users
            .iter()
            .map(|(name, user)| (name, backend_password(user)))
            .chain(
                config
                    .auth
                    .listed
                    .iter()
                    .map(|(name, secret)| (name, server_password_in(secret))),
            )
            .collect();
        let mut state = lock(&self.state);
        let db_limits: HashMap<String, Arc<DbLimit>> = config
            .databases
            .iter()
            .filter(|(_, db)| db.max_db_connections > 0 || db.max_connections_percent > 0)
            .map(|(name, db)| {
                let limit = match state.db_limits.get(name) {
                    // Sized by its cluster (below) when it knows the server's capacity.
                    Some(limit) if db.max_connections_percent > 0 => Arc::clone(limit),
                    Some(limit) => {
                        limit.capacity.resize(db.max_db_connections);
                        Arc::clone(limit)
                    }
                    // Until the first backend has read max_connections, one at a time.
                    None if db.max_connections_percent > 0 => DbLimit::new(name, 1),
                    None => DbLimit::new(name, db.max_db_connections),
                };
                (name.clone(), limit)
            })
            .collect();
        state.settings = settings.clone();
        state.auth_enabled = config.auth.enabled;
        // (Who was listed until now: a pool made with the file's password is not one
        // `[auth]` may keep once the file drops the user.)
        let was_listed = std::mem::replace(
            &mut state.listed,
            config.auth.listed.keys().cloned().collect(),
        );
        state.tls = Arc::clone(tls);
        state.databases = config.databases.clone();
        // A limit the configuration no longer has lets its waiters go (they hold it, and
        // would wait on for places nothing gives back now).
        for (name, old) in &state.db_limits {
            if !db_limits.contains_key(name) {
                old.capacity.resize(LIFTED);
            }
        }
        state.db_limits = db_limits;
        let new_clusters = self.apply_clusters(&mut state, config);
        for (name, db) in &config.databases {
            let sizing = (db.max_connections_percent > 0).then(|| cluster::Sizing {
                limit: Arc::clone(&state.db_limits[name]),
                percent: db.max_connections_percent,
                idle_percent: db.max_idle_percent,
                reserved: db.reserved_connections,
                cap: db.max_db_connections,
            });
            if sizing.is_none() {
                if let Some(limit) = state.db_limits.get(name) {
                    limit.max_idle.store(0, Ordering::Release);
                    limit.set_pool_max(0);
                }
            }
            state.clusters[name].0.set_sizing(sizing);
        }
        let (mut added, mut retired) = (0, 0);
        let mut old = std::mem::take(&mut state.configured);
        for (db_name, db) in &config.databases {
            // The writers' pools, and with replicas the read-only ones (`<db>_ro`, outside
            // max_db_connections: their backends are on other servers).
            let mut names = vec![(db_name.clone(), state.db_limits.get(db_name).cloned())];
            if db.has_replicas() {
                names.push((
                    format!("{db_name}{}", crate::config::READ_ONLY_SUFFIX),
                    None,
                ));
            }
            let cluster = Arc::clone(&state.clusters[db_name].0);
            for (user_name, user) in &config.users {
                let server_user = user.server_user.as_deref().unwrap_or(user_name);
                let password = passwords.get(user_name).cloned().flatten();
                let target = state.target(db_name, db, server_user, password);
                for (pool_db, limit) in &names {
                    let key = (pool_db.clone(), user_name.clone());
                    // A pool this reload keeps, or one an earlier reload retired that still
                    // serves clients (so the two never add up to more than max_size).
                    // (A user `[auth]` found that is now configured keeps its pool too.)
                    let kept = old
                        .remove(&key)
                        .or_else(|| state.found.remove(&key))
                        .or_else(|| state.revive(pool_db, user_name));
                    let pool = match kept {
                        Some(pool) => {
                            let (t, c) = (target.clone(), Arc::clone(&cluster));
                            pool.update(settings.clone(), t, limit.clone(), c);
                            pool
                        }
                        None => {
                            added += 1;
                            self.spawn_janitor(Pool::new(
                                pool_db,
                                user_name,
                                target.clone(),
                                settings.clone(),
                                limit.clone(),
                                Arc::clone(&cluster),
                                &self.metrics,
                            ))
                        }
                    };
                    state.configured.insert(key, pool);
                }
            }
            // The health checks log in as `monitor_user`, or the first user that has a
            // password for the server.
            let monitor = db
                .monitor_user
                .iter()
                .chain(config.users.keys())
                .chain(config.auth.listed.keys())
                .find_map(|name| {
                    let password = passwords.get(name).cloned().flatten()?;
                    let server_user = config
                        .users
                        .get(name)
                        .and_then(|user| user.server_user.as_deref())
                        .unwrap_or(name);
                    Some(state.target(db_name, db, server_user, Some(password)))
                });
            cluster.set_monitor_target(monitor);
        }
        let mut gone: Vec<Arc<Pool>> = old.into_values().collect();
        // Users `[auth]` found keep their pools while `[auth]` is on, and `auth.file`'s
        // while it lists them (a user it dropped is not kept for `[auth]`: the pool logs
        // in with the file's password), their database is configured, and they have not
        // become configured users.
        for (key, pool) in std::mem::take(&mut state.found) {
            let db = config
                .resolve_database(&key.0)
                .map(|(base, _)| (base, &config.databases[base]));
            let listed = config.auth.listed.contains_key(&key.1);
            let still_found = listed || (config.auth.enabled && !was_listed.contains(&key.1));
            match db.filter(|_| still_found && !config.users.contains_key(&key.1)) {
                Some((base, db)) => {
                    // Its credential is the file's password if it has one (a reload may
                    // have changed it), or the one its latest login gave, whatever its kind.
                    let password = passwords
                        .get(&key.1)
                        .cloned()
                        .flatten()
                        .or_else(|| lock(&pool.inner.manager().target).password.clone());
                    let target = state.target(base, db, &key.1, password);
                    let limit = if base == key.0 {
                        state.db_limits.get(base).cloned()
                    } else {
                        None
                    };
                    let cluster = Arc::clone(&state.clusters[base].0);
                    pool.update(settings.clone(), target, limit, cluster);
                    state.found.insert(key, pool);
                }
                None => gone.push(pool),
            }
        }
        for pool in gone {
            retired += 1;
            pool.retire();
            state.retired.push(pool);
        }
        state.retired.retain(|p| !p.inner.is_closed());
        let PoolsState {
            found,
            found_handed,
            ..
        } = &mut *state;
        found_handed.retain(|key, _| found.contains_key(key));
        // (Those of pools removed by earlier reloads, closed and gone since.)
        self.metrics.forget_unused_histograms();
        // Monitors start once they have whom to log in as, and sizing to apply.
        for (cluster, stop) in new_clusters {
            self.spawn_monitor(&cluster, &stop);
        }
        (added, retired)
    }

    /// Makes each database's `Cluster` what `config` says: kept (with new health-check
    /// settings) while its hosts are the same, replaced (and its monitor stopped)
    /// otherwise. Returns the new ones, whose monitors are still to start.
    fn apply_clusters(
        &self,
        state: &mut PoolsState,
        config: &Config,
    ) -> Vec<(Arc<Cluster>, tokio_util::sync::CancellationToken)> {
        let mut new = Vec::new();
        let mut old = std::mem::take(&mut state.clusters);
        for (name, db) in &config.databases {
            // Validated: an error here is a configuration `validate` let through.
            let hosts = db.servers().unwrap_or_default();
            let health = cluster::HealthSettings {
                interval: config.pool.health_check_interval,
                timeout: config.pool.health_check_timeout,
                max_replica_lag: (!db.max_replica_lag.is_zero()).then_some(db.max_replica_lag),
                log_connections: config.log.connections,
            };
            let entry = match old.remove(name) {
                Some((cluster, stop)) if cluster.same_hosts(&hosts) => {
                    cluster.set_settings(health);
                    (cluster, stop)
                }
                replaced => {
                    if let Some((_, stop)) = replaced {
                        stop.cancel();
                    }
                    let cluster = Cluster::new(name, hosts, health);
                    let stop = tokio_util::sync::CancellationToken::new();
                    new.push((Arc::clone(&cluster), stop.clone()));
                    (cluster, stop)
                }
            };
            state.clusters.insert(name.clone(), entry);
        }
        for (_, stop) in old.into_values() {
            stop.cancel();
        }
        new
    }

    /// Starts the monitor of a cluster that needs one, if the pools are running already.
    fn spawn_monitor(&self, cluster: &Arc<Cluster>, retired: &tokio_util::sync::CancellationToken) {
        if let Some(stop) = self.janitor_stop.get().filter(|_| cluster.wants_monitor()) {
            tokio::spawn(cluster::monitor(
                Arc::clone(cluster),
                stop.clone(),
                retired.clone(),
            ));
        }
    }

    /// The backends `database` may have open across its pools now (`max_db_connections`,
    /// or what `max_connections_percent` computed), if it is limited.
    pub fn database_limit(&self, database: &str) -> Option<usize> {
        let state = lock(&self.state);
        state.db_limits.get(database).map(|l| l.capacity.max())
    }

    /// Each database's servers, by database name.
    pub fn clusters(&self) -> Vec<Arc<Cluster>> {
        let state = lock(&self.state);
        state
            .clusters
            .values()
            .map(|(c, _)| Arc::clone(c))
            .collect()
    }

    /// Starts a new pool's janitor if the pools are running already; paused if a PAUSE
    /// covers its database.
    fn spawn_janitor(&self, pool: Arc<Pool>) -> Arc<Pool> {
        if lock(&self.paused).covers(pool.database()) {
            pool.hold();
        }
        if let Some(stop) = self.janitor_stop.get() {
            tokio::spawn(janitor::run(Arc::clone(&pool), stop.clone()));
        }
        pool
    }

    /// The console's PAUSE of `database` (every one with None), for pools made until the
    /// RESUME too (those there now are held by the console).
    pub fn note_paused(&self, database: Option<&str>) {
        lock(&self.paused).pause(database);
    }

    /// The console's RESUME of `database` (every one with None).
    pub fn note_resumed(&self, database: Option<&str>) {
        lock(&self.paused).resume(database);
    }

    /// The pool of a configured user, or of a user `[auth]` found that has logged in.
    pub fn get(&self, database: &str, user: &str) -> Option<Arc<Pool>> {
        let key = (database.to_owned(), user.to_owned());
        let state = lock(&self.state);
        state
            .configured
            .get(&key)
            .or_else(|| state.found.get(&key))
            .cloned()
    }

    /// The pool of a user found by `[auth]` (or listed in `auth.file`), made at its first
    /// login, logging in to the server with `password` (the credential from its latest
    /// login replaces older ones). None if the database is not configured.
    pub fn for_found_user(
        &self,
        database: &str,
        user: &str,
        password: BackendPassword,
    ) -> Option<Arc<Pool>> {
        let mut state = lock(&self.state);
        // (As the configuration in force has it, not the one the login started under.)
        let may = state.listed.contains(user) || state.auth_enabled;
        if !may
            || state
                .configured
                .contains_key(&(database.to_owned(), user.to_owned()))
        {
            return None;
        }
        let (base, read_only) = match state.databases.get(database) {
            Some(_) => (database.to_owned(), false),
            None => {
                let base = database.strip_suffix(crate::config::READ_ONLY_SUFFIX)?;
                state.databases.get(base).filter(|db| db.has_replicas())?;
                (base.to_owned(), true)
            }
        };
        let db = state.databases.get(&base)?.clone();
        let key = (database.to_owned(), user.to_owned());
        let now = Instant::now();
        if state.sweep_found(now) {
            // (Those of pools closed and gone since.)
            self.metrics.forget_unused_histograms();
        }
        let cluster = Arc::clone(&state.clusters.get(&base)?.0);
        state.found_handed.insert(key.clone(), now);
        if let Some(pool) = state.found.get(&key) {
            // Whatever it held: the password may have changed, md5 to SCRAM even.
            lock(&pool.inner.manager().target).password = Some(password);
            return Some(Arc::clone(pool));
        }
        let target = state.target(&base, &db, user, Some(password));
        // Read-only pools are outside max_db_connections (their backends are on replicas).
        let limit = state.db_limits.get(&base).cloned().filter(|_| !read_only);
        if let Some(pool) = state.revive(database, user) {
            pool.update(state.settings.clone(), target, limit, cluster);
            state.found.insert(key, Arc::clone(&pool));
            return Some(pool);
        }
        let pool = self.spawn_janitor(Pool::new(
            database,
            user,
            target,
            state.settings.clone(),
            limit,
            cluster,
            &self.metrics,
        ));
        state.found.insert(key, Arc::clone(&pool));
        Some(pool)
    }

    /// Every pool: configured ones, those made for users `[auth]` found, and those a
    /// reload removed that still serve clients.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let state = lock(&self.state);
        let mut all: Vec<Arc<Pool>> = state.configured.values().cloned().collect();
        all.extend(state.found.values().cloned());
        all.extend(
            state
                .retired
                .iter()
                .filter(|p| !p.inner.is_closed())
                .cloned(),
        );
        all
    }

    /// Starts each pool's janitor; they stop when `stop` is cancelled.
    pub fn spawn_janitors(&self, stop: tokio_util::sync::CancellationToken) {
        // Under the lock, so that a pool made meanwhile gets exactly one janitor.
        let state = lock(&self.state);
        if self.janitor_stop.set(stop.clone()).is_err() {
            return;
        }
        for (cluster, retired) in state.clusters.values() {
            self.spawn_monitor(cluster, retired);
        }
        let pools = state.configured.values().chain(state.found.values());
        for pool in pools.chain(state.retired.iter()) {
            tokio::spawn(janitor::run(Arc::clone(pool), stop.clone()));
        }
    }

    pub fn close_all(&self) {
        for pool in self.all() {
            pool.close();
        }
    }
}

/// The credential pgshield presents to the backend for a user: `server_password_command`,
/// `server_password`, or else the user's own password when it is plaintext or an md5 hash.
fn backend_password(user: &crate::config::UserConfig) -> Option<BackendPassword> {
    if let Some(command) = &user.server_password_command {
        return Some(BackendPassword::Command(Arc::new(PasswordCommand::new(
            command.expose().to_owned(),
            user.server_password_ttl,
        ))));
    }
    server_password_in(user.server_password.as_ref().or(user.password.as_ref())?)
}

/// The credential a stored secret gives for the server: a password, or an md5 hash
/// (enough for md5 servers); none from a SCRAM verifier (passthrough needs a login).
pub fn server_password_in(secret: &crate::config::Secret) -> Option<BackendPassword> {
    match StoredPassword::classify(secret).ok()? {
        StoredPassword::Plain(s) => Some(BackendPassword::Plain(s)),
        StoredPassword::Md5Hash(s) => Some(BackendPassword::Md5Hash(s)),
        StoredPassword::Scram(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_covers_new_pools_of_what_it_named_until_resumed() {
        let mut p = PauseScope::default();
        assert!(!p.covers("a"));
        p.pause(Some("a"));
        assert!(p.covers("a") && !p.covers("b"));
        p.resume(Some("a"));
        assert!(!p.covers("a"));
        // Everything, then one database resumed: the others stay paused.
        p.pause(None);
        assert!(p.covers("a") && p.covers("b"));
        p.resume(Some("a"));
        assert!(!p.covers("a") && p.covers("b"));
        p.pause(Some("a"));
        assert!(p.covers("a"));
        p.resume(None);
        assert!(!p.covers("a") && !p.covers("b"));
    }

    /// The pool of a user `[auth]` found is retired once nobody has used it for a
    /// minute (no client, no backend, not handed to a login), and a login after that
    /// gets it back while it has not closed (or a new one).
    #[tokio::test]
    async fn unused_pools_of_found_users_are_retired() {
        let config = Config::from_toml(
            "[databases.app]\nhost = \"127.0.0.1\"\nport = 1\n\
             [auth]\nenabled = true\nuser = \"a\"\npassword = \"p\"\n",
        )
        .expect("config");
        let tls = Arc::new(ServerTls::new(&config.tls.server).expect("tls"));
        let pools = Pools::from_config(&config, &tls, &Arc::new(Numbers::new()));
        let password = || BackendPassword::Plain(crate::config::Secret::new("pw"));
        let pool = pools
            .for_found_user("app", "dyn_1", password())
            .expect("a pool");
        let now = Instant::now();
        let swept = |at: Instant| lock(&pools.state).sweep_found(at);
        // (The login swept already: not again within the minute.)
        assert!(!swept(now + FOUND_SWEEP_EVERY / 2));
        lock(&pools.state).found_swept = None;
        // Handed out half a minute ago: kept.
        assert!(swept(now + FOUND_SWEEP_EVERY / 2));
        assert!(lock(&pools.state)
            .found
            .contains_key(&("app".into(), "dyn_1".into())));
        assert!(!pool.is_retired());
        // (Not looked at again within the minute.)
        assert!(!swept(now + FOUND_SWEEP_EVERY));
        assert!(swept(now + FOUND_SWEEP_EVERY * 2));
        assert!(lock(&pools.state).found.is_empty());
        assert!(pool.is_retired());
        // Its next login revives it (its janitor had not closed it yet).
        let again = pools
            .for_found_user("app", "dyn_1", password())
            .expect("a pool");
        assert!(Arc::ptr_eq(&pool, &again) && !again.is_retired());
    }

    #[test]
    fn jitter_spreads_backends_over_plus_or_minus_twenty_percent() {
        let d = Duration::from_secs(100);
        let all: Vec<Duration> = (1..=1000).map(|id| jittered(d, id)).collect();
        assert!(all
            .iter()
            .all(|j| (80.0..=120.0).contains(&j.as_secs_f64())));
        // Spread, not clustered: both ends of the range are used, and a backend always
        // gets the same value.
        assert!(all.iter().any(|j| j.as_secs_f64() < 85.0));
        assert!(all.iter().any(|j| j.as_secs_f64() > 115.0));
        assert_eq!(jittered(d, 7), jittered(d, 7));
    }
}
