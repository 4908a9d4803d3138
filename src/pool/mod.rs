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

mod janitor;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool::managed::{
    self, Manager, Metrics, Object, PoolError, QueueMode, RecycleError, RecycleResult,
};
use deadpool::Runtime;

use crate::config::{Config, StoredPassword};
use crate::metrics::{Metrics as Numbers, PoolMetrics};
use crate::prepared::ServerStatements;
use crate::protocol::{sqlstate, ErrorResponse};
use crate::server::password::PasswordCommand;
use crate::server::{connect, BackendPassword, Server, ServerError, ServerParams, ServerTarget};
use crate::shutdown::Shutdown;
use crate::tls::ServerTls;

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
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BorrowError {
    #[error(
        "no server connection became free in pool {pool} within borrow_timeout ({}); all {max_size} are in use",
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
        }
    }
}

/// Opens and checks backends for one pool.
pub struct ServerManager {
    /// Where and as whom; behind a lock because a passthrough user's credential is
    /// replaced by the one from its latest login.
    target: Mutex<ServerTarget>,
    settings: PoolSettings,
    /// The database's `max_db_connections`, shared with its other pools.
    db_limit: Option<Arc<DbLimit>>,
    metrics: PoolMetrics,
    /// RECONNECT: backends of an older generation are closed instead of reused.
    generation: AtomicU64,
    /// Parameters of the newest backend, as it reported them at login: what a new client
    /// is told at its own login (PgBouncer's "welcome message").
    welcome: Mutex<Option<Arc<ServerParams>>>,
}

impl Manager for ServerManager {
    type Type = Server;
    type Error = ServerError;

    async fn create(&self) -> Result<Server, ServerError> {
        let permit = match &self.db_limit {
            Some(limit) => Some(limit.acquire(self.settings.borrow_timeout).await?),
            None => None,
        };
        let target = lock(&self.target).clone();
        let mut server = match connect(&target, self.settings.server_connect_timeout).await {
            Ok(server) => server,
            Err(e) => {
                self.metrics.backend_open_failures.increment(1);
                return Err(e);
            }
        };
        self.metrics.backends_opened.increment(1);
        server.db_permit = permit;
        server.generation = self.generation.load(Ordering::Acquire);
        server.statements = ServerStatements::new(self.settings.max_prepared_statements);
        tracing::debug!(server = %server.id(), pid = server.process_id(), addr = %target.addr(), "opened backend");
        *lock(&self.welcome) = Some(Arc::new(server.params().clone()));
        Ok(server)
    }

    async fn recycle(&self, server: &mut Server, _: &Metrics) -> RecycleResult<ServerError> {
        if let Some(reason) = self.unfit(server) {
            tracing::debug!(server = %server.id(), reason, "closing backend instead of lending it");
            return Err(RecycleError::message(reason));
        }
        Ok(())
    }
}

impl ServerManager {
    /// Why an idle backend must not be lent again, if it must not.
    fn unfit(&self, server: &Server) -> Option<&'static str> {
        if server.is_broken() {
            Some("broken")
        } else if server.generation < self.generation.load(Ordering::Acquire) {
            Some("RECONNECT was requested")
        } else if !server.is_reusable() {
            Some("not at rest (a cancel was sent to it, or replies are owed)")
        } else if self
            .settings
            .server_lifetime
            .is_some_and(|l| server.age() >= l)
        {
            Some("server_lifetime reached")
        } else if server.peer_closed_or_spoke() {
            Some("closed by the server while idle")
        } else {
            None
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One pool: backends for one (database, user).
pub struct Pool {
    name: String,
    /// The database and user as clients name them (the config's table names).
    database: String,
    user: String,
    inner: managed::Pool<ServerManager>,
    settings: PoolSettings,
    /// Totals for the admin console's SHOW STATS (Prometheus has its own handles).
    pub stats: PoolStats,
    /// Clients logged in to this pool.
    clients: AtomicUsize,
    /// Clients waiting for a backend, by ticket, since when (SHOW POOLS maxwait).
    waiters: Mutex<HashMap<u64, std::time::Instant>>,
    /// PAUSE: no backend is lent until RESUME.
    paused: std::sync::atomic::AtomicBool,
    resumed: tokio::sync::Notify,
}

/// A pool's running totals (as PgBouncer's SHOW STATS_TOTALS; times in microseconds).
#[derive(Default)]
pub struct PoolStats {
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

    /// (xact_count, query_count, bytes_received, bytes_sent, xact_time, query_time, wait_time)
    pub fn totals(&self) -> [u64; 7] {
        [
            &self.xact_count,
            &self.query_count,
            &self.bytes_received,
            &self.bytes_sent,
            &self.xact_time_us,
            &self.query_time_us,
            &self.wait_time_us,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }
}

/// An idle backend, for SHOW SERVERS.
pub struct IdleServer {
    pub id: u64,
    pub pid: i32,
    pub peer: std::net::SocketAddr,
    pub local: Option<std::net::SocketAddr>,
    pub opened_at: std::time::SystemTime,
    pub tls: bool,
}

/// One client's place in its pool's client count; dropping it leaves.
pub struct PoolClient(Arc<Pool>);

impl Drop for PoolClient {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's place in the queue for a backend; dropping it leaves the queue.
pub struct Waiter<'a> {
    pool: &'a Pool,
    ticket: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        lock(&self.pool.waiters).remove(&self.ticket);
    }
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
        metrics: &Numbers,
    ) -> Arc<Pool> {
        let name = format!("{database}/{user}");
        let manager = ServerManager {
            metrics: metrics.pool(&name),
            generation: AtomicU64::new(0),
            db_limit: db_limit.clone(),
            target: Mutex::new(target),
            settings: settings.clone(),
            welcome: Mutex::new(None),
        };
        let inner = managed::Pool::builder(manager)
            .max_size(settings.max_size)
            // The most recently returned backend goes out first, so surplus backends
            // really sit idle and server_idle_timeout can close them.
            .queue_mode(QueueMode::Lifo)
            .wait_timeout(settings.borrow_timeout)
            .runtime(Runtime::Tokio1)
            .build()
            .expect("a runtime is given");
        let pool = Arc::new(Pool {
            name,
            database: database.to_owned(),
            user: user.to_owned(),
            inner,
            settings,
            stats: PoolStats::default(),
            clients: AtomicUsize::new(0),
            waiters: Mutex::new(HashMap::new()),
            paused: std::sync::atomic::AtomicBool::new(false),
            resumed: tokio::sync::Notify::new(),
        });
        if let Some(limit) = db_limit {
            lock(&limit.pools).push(Arc::downgrade(&pool));
        }
        pool
    }

    /// What transaction mode does with state that cannot follow a client.
    pub fn on_session_state(&self) -> crate::config::OnSessionState {
        self.settings.on_session_state
    }

    /// When a client of this pool holds a backend.
    pub fn mode(&self) -> crate::config::PoolMode {
        self.settings.mode
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

    /// Notes a client starting to wait for a backend (SHOW POOLS maxwait).
    pub fn wait(&self) -> Waiter<'_> {
        static TICKETS: AtomicU64 = AtomicU64::new(0);
        let ticket = TICKETS.fetch_add(1, Ordering::Relaxed);
        lock(&self.waiters).insert(ticket, std::time::Instant::now());
        Waiter { pool: self, ticket }
    }

    /// Clients waiting for a backend now (queued, or held by PAUSE).
    pub fn waiting(&self) -> usize {
        lock(&self.waiters).len()
    }

    /// How long the client waiting longest has waited.
    pub fn max_wait(&self) -> Duration {
        lock(&self.waiters)
            .values()
            .map(|since| since.elapsed())
            .max()
            .unwrap_or_default()
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
    }

    /// Waits until no backend is open or being borrowed; gives up if resumed meanwhile.
    pub async fn until_paused(&self) {
        loop {
            if !self.is_paused() {
                return;
            }
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
    pub async fn borrow_unless_paused(&self, shutdown: &Shutdown) -> Result<Backend, BorrowError> {
        loop {
            tokio::select! {
                biased;
                _ = self.until_resumed() => {}
                _ = shutdown.draining() => return Err(BorrowError::Closed(self.name.clone())),
            }
            match self.borrow().await {
                Ok(backend) if self.is_paused() => backend.discard(),
                Ok(backend) => return Ok(backend),
                Err(_) if self.is_paused() => {}
                Err(e) => return Err(e),
            }
        }
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
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
        let mut idle = Vec::new();
        self.inner.retain(|server, _| {
            idle.push(IdleServer {
                id: server.id().0,
                pid: server.process_id(),
                peer: server.stream.peer_addr(),
                local: server.stream.local_addr(),
                opened_at: std::time::SystemTime::now()
                    .checked_sub(server.age())
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
        m.transactions.absolute(xacts);
        m.queries.absolute(queries);
        m.bytes_from_clients.absolute(received);
        m.bytes_to_clients.absolute(sent);
        m.max_backends.set(s.max_size as f64);
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
        match self.inner.get().await {
            Ok(obj) => Ok(Backend {
                obj: Some(obj),
                lifetime: self.settings.server_lifetime,
            }),
            Err(e) => Err(self.borrow_error(e)),
        }
    }

    fn borrow_error(&self, e: PoolError<ServerError>) -> BorrowError {
        match e {
            PoolError::Timeout(_) => {
                self.metrics().borrow_timeouts.increment(1);
                BorrowError::Timeout {
                    pool: self.name.clone(),
                    timeout: self.settings.borrow_timeout.unwrap_or_default(),
                    max_size: self.settings.max_size,
                }
            }
            PoolError::Backend(e) => {
                tracing::warn!(pool = %self.name, error = %e, "cannot open a backend");
                BorrowError::Server(self.name.clone(), e)
            }
            PoolError::Closed => BorrowError::Closed(self.name.clone()),
            other => {
                BorrowError::Server(self.name.clone(), ServerError::Protocol(other.to_string()))
            }
        }
    }

    /// The parameters a new client is told at login. Opens a backend the first time.
    pub async fn welcome_params(&self) -> Result<Arc<ServerParams>, BorrowError> {
        if let Some(params) = lock(&self.inner.manager().welcome).clone() {
            return Ok(params);
        }
        self.borrow().await?.release();
        lock(&self.inner.manager().welcome)
            .clone()
            .ok_or_else(|| BorrowError::Closed(self.name.clone()))
    }

    pub fn status(&self) -> PoolStatus {
        let s = self.inner.status();
        PoolStatus {
            max_size: s.max_size,
            open: s.size,
            idle: s.available,
            waiting: s.waiting,
        }
    }

    /// Closes idle backends and refuses new borrows; lent backends close on return.
    pub fn close(&self) {
        self.inner.close();
    }
}

/// A lent backend. Give it back with [`Backend::release`] or close it with
/// [`Backend::discard`]; dropping it closes it.
pub struct Backend {
    obj: Option<Object<ServerManager>>,
    lifetime: Option<Duration>,
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
        let expired = self.lifetime.is_some_and(|l| obj.age() >= l);
        if obj.is_reusable() && !expired {
            obj.mark_idle_now();
            drop(obj);
        } else {
            tracing::debug!(server = %obj.id(), expired, "closing backend on release");
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

/// How often a pool waiting under `max_db_connections` looks for an idle backend of
/// another pool to close.
const DB_LIMIT_LOOK_AGAIN: Duration = Duration::from_millis(100);

/// `max_db_connections`: backends open to one database across all its pools. A pool
/// that needs one more when the cap is reached closes an idle backend of another pool
/// of the database (as PgBouncer does), or waits for one to close.
pub struct DbLimit {
    database: String,
    max: usize,
    permits: Arc<tokio::sync::Semaphore>,
    pools: Mutex<Vec<std::sync::Weak<Pool>>>,
}

impl DbLimit {
    fn new(database: &str, max: usize) -> Arc<DbLimit> {
        Arc::new(DbLimit {
            database: database.to_owned(),
            max,
            permits: Arc::new(tokio::sync::Semaphore::new(max)),
            pools: Mutex::new(Vec::new()),
        })
    }

    async fn acquire(
        &self,
        wait: Option<Duration>,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ServerError> {
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        loop {
            if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
                return Ok(permit);
            }
            // A backend that went idle in another pool since the last look makes way.
            self.close_one_idle();
            let mut next_look = tokio::time::Instant::now() + DB_LIMIT_LOOK_AGAIN;
            if let Some(deadline) = deadline {
                if tokio::time::Instant::now() >= deadline {
                    return Err(self.reached());
                }
                next_look = next_look.min(deadline);
            }
            let acquire = Arc::clone(&self.permits).acquire_owned();
            if let Ok(permit) = tokio::time::timeout_at(next_look, acquire).await {
                return permit.map_err(|_| self.reached());
            }
        }
    }

    /// Closes one idle backend of some pool of the database, freeing its place.
    fn close_one_idle(&self) {
        let pools: Vec<Arc<Pool>> = lock(&self.pools)
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        for pool in pools {
            let mut closed = false;
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
            max: self.max,
        }
    }
}

/// All pools, keyed by (database, user) as clients name them.
pub struct Pools {
    pools: HashMap<(String, String), Arc<Pool>>,
    /// Pools of users found by `[auth]` (made at their first login).
    dynamic: Mutex<HashMap<(String, String), Arc<Pool>>>,
    /// What a dynamic pool is made from.
    databases: std::collections::BTreeMap<String, crate::config::DatabaseConfig>,
    settings: PoolSettings,
    tls: Arc<ServerTls>,
    /// Stops the janitors of all pools, dynamic ones too.
    janitor_stop: std::sync::OnceLock<tokio_util::sync::CancellationToken>,
    /// `max_db_connections`, by database.
    db_limits: HashMap<String, Arc<DbLimit>>,
    metrics: Arc<Numbers>,
}

impl Pools {
    /// One pool for every configured database and user.
    pub fn from_config(config: &Config, tls: &Arc<ServerTls>, metrics: &Arc<Numbers>) -> Pools {
        let settings = PoolSettings::from_config(config);
        for (name, user) in &config.users {
            if backend_password(user).is_none() {
                tracing::warn!(
                    user = %name,
                    "no password pgshield can log in to the server with (none, or only a SCRAM \
                     verifier): it logs in with the keys of the user's own SCRAM logins \
                     (passthrough), or to servers that trust it"
                );
            }
        }
        // One credential per user, shared by its pools (so a command runs once for all).
        let passwords: HashMap<&String, Option<BackendPassword>> = config
            .users
            .iter()
            .map(|(name, user)| (name, backend_password(user)))
            .collect();
        let db_limits: HashMap<String, Arc<DbLimit>> = config
            .databases
            .iter()
            .filter(|(_, db)| db.max_db_connections > 0)
            .map(|(name, db)| (name.clone(), DbLimit::new(name, db.max_db_connections)))
            .collect();
        let mut pools = HashMap::new();
        for (db_name, db) in &config.databases {
            for (user_name, user) in &config.users {
                let target = ServerTarget {
                    host: db.host.clone(),
                    port: db.port,
                    database: db.dbname.clone().unwrap_or_else(|| db_name.clone()),
                    user: user
                        .server_user
                        .clone()
                        .unwrap_or_else(|| user_name.clone()),
                    password: passwords.get(user_name).cloned().flatten(),
                    tls: Arc::clone(tls),
                };
                let limit = db_limits.get(db_name).cloned();
                pools.insert(
                    (db_name.clone(), user_name.clone()),
                    Pool::new(db_name, user_name, target, settings.clone(), limit, metrics),
                );
            }
        }
        Pools {
            pools,
            dynamic: Mutex::new(HashMap::new()),
            databases: config.databases.clone(),
            settings,
            tls: Arc::clone(tls),
            janitor_stop: std::sync::OnceLock::new(),
            db_limits,
            metrics: Arc::clone(metrics),
        }
    }

    /// The pool of a configured user, or of a user `[auth]` found that has logged in.
    pub fn get(&self, database: &str, user: &str) -> Option<Arc<Pool>> {
        let key = (database.to_owned(), user.to_owned());
        match self.pools.get(&key) {
            Some(pool) => Some(Arc::clone(pool)),
            None => lock(&self.dynamic).get(&key).cloned(),
        }
    }

    /// The pool of a user found by `[auth]`, made at its first login, logging in to the
    /// server with `password` (the credential from its latest login replaces older ones).
    /// None if the database is not configured.
    pub fn for_found_user(
        &self,
        database: &str,
        user: &str,
        password: BackendPassword,
    ) -> Option<Arc<Pool>> {
        let db = self.databases.get(database)?;
        let key = (database.to_owned(), user.to_owned());
        let mut dynamic = lock(&self.dynamic);
        if let Some(pool) = dynamic.get(&key) {
            // Whatever it held: the password may have changed, md5 to SCRAM even.
            lock(&pool.inner.manager().target).password = Some(password);
            return Some(Arc::clone(pool));
        }
        let target = ServerTarget {
            host: db.host.clone(),
            port: db.port,
            database: db.dbname.clone().unwrap_or_else(|| database.to_owned()),
            user: user.to_owned(),
            password: Some(password),
            tls: Arc::clone(&self.tls),
        };
        let pool = Pool::new(
            database,
            user,
            target,
            self.settings.clone(),
            self.db_limits.get(database).cloned(),
            &self.metrics,
        );
        if let Some(stop) = self.janitor_stop.get() {
            tokio::spawn(janitor::run(Arc::clone(&pool), stop.clone()));
        }
        dynamic.insert(key, Arc::clone(&pool));
        Some(pool)
    }

    /// Every pool: configured ones and those made for users `[auth]` found.
    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut all: Vec<Arc<Pool>> = self.pools.values().cloned().collect();
        all.extend(lock(&self.dynamic).values().cloned());
        all
    }

    /// Starts each pool's janitor; they stop when `stop` is cancelled.
    pub fn spawn_janitors(&self, stop: tokio_util::sync::CancellationToken) {
        for pool in self.all() {
            tokio::spawn(janitor::run(pool, stop.clone()));
        }
        let _ = self.janitor_stop.set(stop);
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
    let secret = user.server_password.as_ref().or(user.password.as_ref())?;
    match StoredPassword::classify(secret).ok()? {
        StoredPassword::Plain(s) => Some(BackendPassword::Plain(s)),
        StoredPassword::Md5Hash(s) => Some(BackendPassword::Md5Hash(s)),
        StoredPassword::Scram(_) => None,
    }
}
