//! The servers of one database and what pgshield knows of each: its role (configured, or
//! detected with `pg_is_in_recovery()`), whether it is up, its replica lag, and its
//! `max_connections`. Every pool of the database (writers and read-only) shares one
//! `Cluster`, asks it which host a new backend goes to ([`Cluster::pick`]), and tells it
//! what connections learn (a refused connection, a FATAL shutdown, `in_hot_standby`).
//!
//! A database with several hosts, or with `role = "auto"`, has a monitor task: it keeps
//! one connection to each host and asks it, every `health_check_interval` (every
//! [`FAST_PROBE`] while no primary is known), whether it is in recovery and how far its
//! replay lags. A host that cannot be reached is marked down and probed again after a
//! back-off that doubles up to [`MAX_BACKOFF`]. With `role = "auto"` the writer pools
//! follow the host that is not in recovery; while there is none (a failover), their
//! borrowers wait, up to `borrow_timeout`, for the monitor to find the new one.
//!
//! Failover rules: a primary that fails is forgotten at once (its backends are never lent
//! again, see [`Cluster::fit`]); a new primary is taken only from a probe or a connection
//! that found the host out of recovery; a second host out of recovery while the current
//! primary is up is not followed (split brain is logged, not acted on).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{HostRole, HostSpec};
use crate::lock;
use crate::protocol::{sqlstate, ErrorResponse};
use crate::server::{connect, Server, ServerError, ServerTarget};

/// Probe period while a writer has no primary.
pub const FAST_PROBE: Duration = Duration::from_millis(250);
/// The longest back-off of a host that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

const NO_HOST: usize = usize::MAX;

/// What a backend is for: the writer pools want the primary; read-only pools a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Primary,
    /// A replica; the primary too if `fallback` and no replica is fit.
    Replica {
        fallback: bool,
    },
}

/// What is known of a host's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        }
    }
}

/// The knobs the monitor and the pickers use (from `[pool]` and the database's table).
#[derive(Debug, Clone)]
pub struct HealthSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub max_replica_lag: Option<Duration>,
    pub log_connections: bool,
}

/// A snapshot of one host, for SHOW and metrics.
#[derive(Debug, Clone)]
pub struct HostStatus {
    pub addr: String,
    pub host: String,
    pub port: u16,
    pub configured: HostRole,
    pub role: Role,
    pub up: bool,
    pub lag: Option<Duration>,
    pub open: usize,
    pub last_error: Option<String>,
}

struct HostState {
    role: Role,
    up: bool,
    /// Failures in a row (the back-off doubles with each).
    failures: u32,
    /// Down: not probed or picked before this.
    retry_at: Option<Instant>,
    lag: Option<Duration>,
    last_error: Option<String>,
    /// For the lag: WAL received and not yet replayed, by when it was seen.
    received: Received,
}

pub struct Host {
    pub spec: HostSpec,
    state: Mutex<HostState>,
    /// Backends open to it from pgshield's pools (least-outstanding routing).
    open: AtomicUsize,
    /// Bumped each time the host is marked down: a backend opened before is not reused.
    downs: AtomicU64,
}

/// `max_connections` as a server reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerCapacity {
    pub max_connections: usize,
    pub superuser_reserved: usize,
}

impl ServerCapacity {
    /// From columns `at` (max_connections) and `at + 1` (superuser_reserved_connections)
    /// of a row in text format.
    fn from_row(row: &[Option<String>], at: usize) -> Option<ServerCapacity> {
        let number = |i: usize| row.get(i)?.as_deref()?.parse::<usize>().ok();
        Some(ServerCapacity {
            max_connections: number(at)?,
            superuser_reserved: number(at + 1)?,
        })
    }
}

pub struct Cluster {
    pub database: String,
    pub hosts: Vec<Host>,
    /// The index of the host the writers use now, or `NO_HOST`.
    primary: AtomicUsize,
    /// Bumped on every change of role or health, to wake borrowers waiting for a host.
    version: tokio::sync::watch::Sender<u64>,
    /// Asks the monitor for a probe now (after a connection error).
    probe_now: tokio::sync::Notify,
    settings: arc_swap::ArcSwap<HealthSettings>,
    /// Whom the monitor logs in as (a pool's target; host and port are replaced).
    monitor_target: Mutex<Option<ServerTarget>>,
    /// The monitor's probes succeed (so waiting for it to find a primary makes sense);
    /// otherwise roles are learnt from backends' logins.
    monitored: std::sync::atomic::AtomicBool,
    /// Since when the writers have had no primary (for the failover's log line).
    outage: Mutex<Option<Instant>>,
    /// Borrowers that waited for a host, since the last failover's summary was logged.
    waits: Mutex<Waits>,
    capacity: Mutex<Option<ServerCapacity>>,
    /// `max_connections_percent`: the database limit sized from `capacity`.
    sizing: Mutex<Option<Sizing>>,
}

/// Waits for a host (a failover, a replica down), summed up in one log line.
#[derive(Default)]
struct Waits {
    /// When the new primary was found (the summary comes a little later, once the
    /// waiting borrowers have been served).
    failover_at: Option<Instant>,
    count: usize,
    longest: Duration,
}

/// How long after a failover its summary is logged.
const WAIT_SUMMARY_AFTER: Duration = Duration::from_secs(2);

/// `max_connections_percent` and `max_idle_percent` of a database, applied to its
/// `DbLimit` whenever the server's `max_connections` is learnt.
pub struct Sizing {
    pub limit: Arc<super::DbLimit>,
    pub percent: u8,
    pub idle_percent: u8,
    pub reserved: usize,
    /// `max_db_connections`, if also set: the lower of the two applies.
    pub cap: usize,
}

/// A backend's claim on its host: counts it among the host's open backends, and says
/// which host it is on.
pub struct HostLease {
    cluster: Arc<Cluster>,
    pub index: usize,
    downs: u64,
}

impl Drop for HostLease {
    fn drop(&mut self) {
        if let Some(host) = self.cluster.hosts.get(self.index) {
            host.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl HostLease {
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }
}

impl Cluster {
    pub fn new(database: &str, hosts: Vec<HostSpec>, settings: HealthSettings) -> Arc<Cluster> {
        let fixed_primary = hosts.iter().position(|h| h.role == HostRole::Primary);
        let hosts = hosts
            .into_iter()
            .map(|spec| Host {
                state: Mutex::new(HostState {
                    role: match spec.role {
                        HostRole::Primary => Role::Primary,
                        HostRole::Replica => Role::Replica,
                        HostRole::Auto => Role::Unknown,
                    },
                    up: true,
                    failures: 0,
                    retry_at: None,
                    lag: None,
                    last_error: None,
                    received: Received::default(),
                }),
                spec,
                open: AtomicUsize::new(0),
                downs: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Cluster {
            database: database.to_owned(),
            hosts,
            primary: AtomicUsize::new(fixed_primary.unwrap_or(NO_HOST)),
            version: tokio::sync::watch::channel(0).0,
            probe_now: tokio::sync::Notify::new(),
            settings: arc_swap::ArcSwap::from_pointee(settings),
            monitor_target: Mutex::new(None),
            monitored: std::sync::atomic::AtomicBool::new(false),
            outage: Mutex::new(None),
            waits: Mutex::new(Waits::default()),
            capacity: Mutex::new(None),
            sizing: Mutex::new(None),
        })
    }

    /// Whether `hosts` is this cluster's list (same servers, same roles, same order).
    pub fn same_hosts(&self, hosts: &[HostSpec]) -> bool {
        self.hosts.len() == hosts.len() && self.hosts.iter().zip(hosts).all(|(a, b)| a.spec == *b)
    }

    /// Whether the cluster needs a monitor: several hosts, or roles to detect.
    pub fn wants_monitor(&self) -> bool {
        self.hosts.len() > 1
            || self.hosts.iter().any(|h| h.spec.role == HostRole::Auto)
            || lock(&self.sizing).is_some()
    }

    /// Reads `max_connections` on a new backend (when sizing needs it and no probe has).
    pub async fn read_capacity(&self, server: &mut Server, timeout: Duration) {
        const SQL: &str = "SELECT pg_catalog.current_setting('max_connections'), \
            pg_catalog.current_setting('superuser_reserved_connections')";
        let Ok(Ok(reply)) = tokio::time::timeout(timeout, server.run_internal(SQL)).await else {
            server.mark_broken();
            return;
        };
        if let Some(capacity) = reply
            .rows
            .first()
            .and_then(|r| ServerCapacity::from_row(r, 0))
        {
            self.learn_capacity(capacity);
        }
    }

    pub fn set_settings(&self, settings: HealthSettings) {
        self.settings.store(Arc::new(settings));
    }

    pub fn set_monitor_target(&self, target: Option<ServerTarget>) {
        *lock(&self.monitor_target) = target;
    }

    /// The host the writers use now.
    pub fn primary(&self) -> Option<usize> {
        let i = self.primary.load(Ordering::Acquire);
        (i != NO_HOST).then_some(i)
    }

    pub fn capacity(&self) -> Option<ServerCapacity> {
        *lock(&self.capacity)
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn backoff(failures: u32, interval: Duration) -> Duration {
        let doubled = interval.saturating_mul(1u32 << failures.min(16).saturating_sub(1));
        doubled.min(MAX_BACKOFF)
    }

    /// Which host a new backend for `route` goes to now; None while there is none to
    /// try (then [`Cluster::wait_for_change`]).
    pub fn pick(&self, route: Route) -> Option<usize> {
        self.pick_except(route, &[])
    }

    /// As [`Cluster::pick`], leaving out the hosts in `tried` (those a backend open has
    /// just failed on, which may not be marked down: a timeout, a full server).
    pub fn pick_except(&self, route: Route, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let usable = |h: &Host| {
            let s = lock(&h.state);
            s.up || s.retry_at.is_none_or(|at| now >= at)
        };
        let unwatched = !self.monitored.load(Ordering::Acquire);
        let primary = match self.primary().filter(|i| !tried.contains(i)) {
            // A fixed primary is tried even when it failed last (there is no other).
            Some(i) if self.hosts[i].spec.role == HostRole::Primary => Some(i),
            Some(i) if usable(&self.hosts[i]) => Some(i),
            // Nobody watches (no credentials, or the probes are refused): the first host
            // not known to be a replica is tried, then any (one may have been promoted),
            // and what it reports at login decides.
            _ if unwatched => {
                let auto = |(i, h): &(usize, &Host)| {
                    h.spec.role == HostRole::Auto && !tried.contains(i) && usable(h)
                };
                let mut hosts = self.hosts.iter().enumerate();
                hosts
                    .clone()
                    .find(|ih| auto(ih) && lock(&ih.1.state).role != Role::Replica)
                    .or_else(|| hosts.find(auto))
                    .map(|(i, _)| i)
            }
            _ => None,
        };
        match route {
            Route::Primary => primary,
            Route::Replica { fallback } => {
                // Unwatched, a replica that failed is tried again after its back-off.
                let replica = self
                    .hosts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !tried.contains(i))
                    .filter(|(_, h)| {
                        self.replica_fit(h) || (unwatched && usable(h) && self.replica_fit_if_up(h))
                    })
                    .min_by_key(|(_, h)| h.open.load(Ordering::Relaxed))
                    .map(|(i, _)| i);
                replica.or(primary.filter(|_| fallback))
            }
        }
    }

    /// A replica read-only clients may use: up, in recovery, lag within `max_replica_lag`.
    fn replica_fit(&self, host: &Host) -> bool {
        lock(&host.state).up && self.replica_fit_if_up(host)
    }

    /// In recovery, lag (as last known) within `max_replica_lag`.
    fn replica_fit_if_up(&self, host: &Host) -> bool {
        let max_lag = self.settings.load().max_replica_lag;
        let s = lock(&host.state);
        s.role == Role::Replica && max_lag.is_none_or(|max| s.lag.is_none_or(|lag| lag <= max))
    }

    /// A receiver of changes, taken before [`Cluster::pick`] so that a change between
    /// the pick and the wait is not missed.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Waits until something changes (a host found, back up, promoted) or `deadline`.
    /// False at the deadline.
    pub async fn wait_for_change(
        mut rx: tokio::sync::watch::Receiver<u64>,
        deadline: Option<tokio::time::Instant>,
    ) -> bool {
        match deadline {
            Some(at) => tokio::time::timeout_at(at, rx.changed()).await.is_ok(),
            None => rx.changed().await.is_ok(),
        }
    }

    /// A backend open waited `waited` for a host to pick (counted for the failover's
    /// summary).
    pub fn note_wait(&self, waited: Duration) {
        let mut w = lock(&self.waits);
        w.count += 1;
        w.longest = w.longest.max(waited);
    }

    /// Logs, once, how long borrowers waited through the last failover.
    fn summarize_waits(&self) {
        let mut w = lock(&self.waits);
        if w.failover_at
            .is_some_and(|at| at.elapsed() >= WAIT_SUMMARY_AFTER)
        {
            tracing::warn!(
                database = %self.database,
                waited = w.count,
                longest_wait_ms = w.longest.as_millis() as u64,
                "failover: backend opens that waited for the new primary (their clients waited as long)"
            );
            *w = Waits::default();
        }
    }

    /// A backend's lease on host `index` (counts it open there).
    pub fn lease(self: &Arc<Self>, index: usize) -> HostLease {
        self.hosts[index].open.fetch_add(1, Ordering::Relaxed);
        HostLease {
            cluster: Arc::clone(self),
            index,
            downs: self.hosts[index].downs.load(Ordering::Acquire),
        }
    }

    /// Why a backend on `lease`'s host must not be lent for `route` any more, if so.
    pub fn unfit(&self, lease: &HostLease, route: Route) -> Option<&'static str> {
        let host = &self.hosts[lease.index];
        if host.downs.load(Ordering::Acquire) != lease.downs {
            return Some("its host was marked down since it opened");
        }
        match route {
            Route::Primary if self.primary() != Some(lease.index) => {
                Some("its host is no longer the primary")
            }
            Route::Primary => None,
            Route::Replica { fallback } => {
                if self.replica_fit(host) {
                    return None;
                }
                if lock(&host.state).role == Role::Replica {
                    return Some("its replica lags more than max_replica_lag");
                }
                let on_primary = self.primary() == Some(lease.index);
                if !(fallback && on_primary) {
                    Some("its host is no longer a replica")
                } else if self.pick(route) != Some(lease.index) {
                    Some("a replica is fit to serve again")
                } else {
                    None
                }
            }
        }
    }

    /// A new backend on host `index` reported its parameters: `in_hot_standby` (14+)
    /// says what it is. Returns whether it serves `route`.
    pub fn confirm(&self, index: usize, server: &Server, route: Route) -> bool {
        let detected = match server.params().get("in_hot_standby") {
            Some("on") => Some(Role::Replica),
            Some("off") => Some(Role::Primary),
            _ => None,
        };
        if let Some(role) = detected {
            self.learn_role(index, role, "login");
        }
        self.mark_up(index);
        let role = lock(&self.hosts[index].state).role;
        match route {
            Route::Primary => self.primary() == Some(index) && role != Role::Replica,
            Route::Replica { fallback } => {
                role == Role::Replica || (fallback && self.primary() == Some(index))
            }
        }
    }

    /// What a probe or a login found: `role` for host `index` (an `auto` host's only).
    fn learn_role(&self, index: usize, role: Role, how: &str) {
        let host = &self.hosts[index];
        if host.spec.role != HostRole::Auto {
            return;
        }
        let before = std::mem::replace(&mut lock(&host.state).role, role);
        let mut changed = before != role;
        match role {
            Role::Primary => match self.primary() {
                None => {
                    self.primary.store(index, Ordering::Release);
                    changed = true;
                    let outage = lock(&self.outage).take();
                    if outage.is_some() {
                        lock(&self.waits).failover_at = Some(Instant::now());
                    }
                    match outage {
                        Some(since) => tracing::warn!(
                            database = %self.database,
                            primary = %host.spec.addr(),
                            without_primary_ms = since.elapsed().as_millis() as u64,
                            found_by = how,
                            "failover: writers follow the new primary"
                        ),
                        None => {
                            tracing::info!(database = %self.database, primary = %host.spec.addr(), found_by = how, "primary found")
                        }
                    }
                }
                // (Said once, when the other host is first found out of recovery.)
                Some(current) if current != index && before != Role::Primary => {
                    tracing::error!(
                        database = %self.database,
                        current = %self.hosts[current].spec.addr(),
                        other = %host.spec.addr(),
                        "two hosts are out of recovery; writers stay on the current primary"
                    );
                }
                Some(_) => {}
            },
            Role::Replica | Role::Unknown => {
                if self.primary() == Some(index) {
                    self.lose_primary(index, "it is in recovery now (demoted)");
                    changed = true;
                }
            }
        }
        if changed {
            self.bump();
        }
    }

    /// The writers' primary is gone: no backend of it is lent again.
    fn lose_primary(&self, index: usize, why: &str) {
        if self
            .primary
            .compare_exchange(index, NO_HOST, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            lock(&self.outage).get_or_insert_with(Instant::now);
            tracing::warn!(database = %self.database, primary = %self.hosts[index].spec.addr(), reason = why, "primary lost; writers wait for a new one (up to borrow_timeout)");
            self.probe_now.notify_one();
        }
    }

    fn mark_up(&self, index: usize) {
        let host = &self.hosts[index];
        let mut s = lock(&host.state);
        let was_down = !s.up;
        s.up = true;
        s.failures = 0;
        s.retry_at = None;
        s.last_error = None;
        drop(s);
        if was_down {
            tracing::info!(database = %self.database, host = %host.spec.addr(), "host is up again");
            self.bump();
        }
    }

    /// Host `index` failed (unreachable, refused, shutting down): marked down, probed
    /// again after a back-off. If it was the writers' primary (`auto` roles), it is
    /// forgotten.
    pub fn mark_down(&self, index: usize, why: &str) {
        let Some(host) = self.hosts.get(index) else {
            return;
        };
        let interval = self.settings.load().interval;
        let now = Instant::now();
        let mut s = lock(&host.state);
        let was_up = s.up;
        // One failure per back-off window: many sessions reporting the same outage at
        // once do not stretch the back-off.
        if s.up || s.retry_at.is_none_or(|at| now >= at) {
            s.failures = s.failures.saturating_add(1);
        }
        s.up = false;
        let backoff = Self::backoff(s.failures, interval);
        s.retry_at = Some(now + backoff);
        s.last_error = Some(why.to_owned());
        if host.spec.role == HostRole::Auto {
            s.role = Role::Unknown;
        }
        drop(s);
        if was_up {
            host.downs.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(database = %self.database, host = %host.spec.addr(), reason = why, retry_in_ms = backoff.as_millis() as u64, "host marked down");
        }
        if host.spec.role == HostRole::Auto {
            self.lose_primary(index, why);
        }
        self.bump();
    }

    /// A connection to host `index` failed to open with `error`: refused, reset, or
    /// told the server is shutting down or starting up, it is marked down; a timeout
    /// (which may be the network's, or a busy server's) has the monitor look.
    pub fn connect_failed(&self, index: usize, error: &ServerError) {
        let unwatched = !self.monitored.load(Ordering::Acquire);
        let down = match error {
            ServerError::Connect { .. } | ServerError::Closed => true,
            // Nobody else will find out.
            ServerError::Timeout { .. } => unwatched,
            ServerError::Refused(e) => host_is_going_away(e),
            _ => false,
        };
        if down {
            self.mark_down(index, &error.to_string());
        } else {
            self.probe_now.notify_one();
        }
    }

    /// A lent backend on host `index` was lost: the monitor looks at once. A FATAL
    /// saying the server crashed (57P02) or cannot take connections (57P03) marks it
    /// down now; 57P01 does not, since `pg_terminate_backend` sends it too, for one
    /// backend of a healthy server (a real shutdown refuses the monitor's probe).
    pub fn backend_lost(&self, index: usize, fatal: Option<&ErrorResponse>) {
        let down = fatal.filter(|e| {
            [sqlstate::CRASH_SHUTDOWN, sqlstate::CANNOT_CONNECT_NOW].contains(&e.code.as_str())
        });
        match down {
            Some(e) => self.mark_down(index, &format!("{} ({})", e.message, e.code)),
            None => self.probe_now.notify_one(),
        }
    }

    /// Every host, for SHOW and metrics.
    pub fn status(&self) -> Vec<HostStatus> {
        self.hosts
            .iter()
            .map(|h| {
                let s = lock(&h.state);
                HostStatus {
                    addr: h.spec.addr(),
                    host: h.spec.host.clone(),
                    port: h.spec.port,
                    configured: h.spec.role,
                    role: s.role,
                    up: s.up,
                    lag: s.lag,
                    open: h.open.load(Ordering::Relaxed),
                    last_error: s.last_error.clone(),
                }
            })
            .collect()
    }

    /// Notes what a server said its `max_connections` is (the primary's, or the first
    /// host's, counts for sizing), and sizes the database's limit from it.
    pub fn learn_capacity(&self, capacity: ServerCapacity) {
        let changed = lock(&self.capacity).replace(capacity) != Some(capacity);
        if changed {
            self.apply_sizing();
        }
    }

    /// Sizing is set (or removed) by a reload; applied at once if the capacity is known.
    pub fn set_sizing(&self, sizing: Option<Sizing>) {
        *lock(&self.sizing) = sizing;
        self.apply_sizing();
    }

    /// Whether a backend should read the server's `max_connections` (sizing wants it
    /// and nobody has yet).
    pub fn needs_capacity(&self) -> bool {
        lock(&self.sizing).is_some() && self.capacity().is_none()
    }

    fn apply_sizing(&self) {
        let Some(capacity) = self.capacity() else {
            return;
        };
        let sizing = lock(&self.sizing);
        let Some(s) = sizing.as_ref() else {
            return;
        };
        let usable = capacity
            .max_connections
            .saturating_sub(capacity.superuser_reserved)
            .saturating_sub(s.reserved);
        let share = |percent: u8| (usable * usize::from(percent) / 100).max(1);
        let mut max = share(s.percent);
        if s.cap > 0 {
            max = max.min(s.cap);
        }
        let idle = if s.idle_percent > 0 {
            share(s.idle_percent)
        } else {
            0
        };
        s.limit.max_idle.store(idle, Ordering::Release);
        s.limit.set_pool_max(max);
        if s.limit.capacity.max() != max {
            tracing::info!(
                database = %self.database,
                backends = max,
                idle = idle,
                max_connections = capacity.max_connections,
                superuser_reserved_connections = capacity.superuser_reserved,
                reserved_connections = s.reserved,
                percent = s.percent,
                "max_connections_percent: the database's pools are sized from the server"
            );
            s.limit.capacity.resize(max);
        }
    }
}

/// 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now.
pub fn host_is_going_away(e: &ErrorResponse) -> bool {
    [
        sqlstate::ADMIN_SHUTDOWN,
        sqlstate::CRASH_SHUTDOWN,
        sqlstate::CANNOT_CONNECT_NOW,
    ]
    .contains(&e.code.as_str())
}

/// What one probe asks: recovery; on a replica, how far it has received and replayed WAL
/// (as byte positions); and the connection limits.
const PROBE_SQL: &str = "SELECT pg_catalog.pg_is_in_recovery(), \
     pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_last_wal_receive_lsn(), '0/0')::int8, \
     pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_last_wal_replay_lsn(), '0/0')::int8, \
     pg_catalog.current_setting('max_connections'), \
     pg_catalog.current_setting('superuser_reserved_connections'), \
     EXTRACT(EPOCH FROM pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp()), \
     EXISTS (SELECT FROM pg_catalog.pg_stat_wal_receiver WHERE pid IS NOT NULL)";

/// The lag of a replica that replays without streaming (restarted and not reconnected
/// to its primary, or restoring from an archive) that has replayed nothing since: as
/// good as unknown, so read-only clients skip it when `max_replica_lag` is set.
pub const UNKNOWN_LAG: Duration = Duration::MAX;

/// WAL positions a replica had received, by when a probe saw them: the oldest one not yet
/// replayed says how long replay is behind. (Unlike the age of the last replayed
/// transaction, this is not fooled by a primary that was idle for a while.)
#[derive(Default)]
struct Received(std::collections::VecDeque<(Instant, u64)>);

impl Received {
    /// Notes a probe's positions; returns the replay lag (to a probe's precision).
    fn lag(&mut self, now: Instant, received: Option<u64>, replayed: Option<u64>) -> Duration {
        let Some(replayed) = replayed else {
            self.0.clear();
            return Duration::ZERO;
        };
        while self.0.front().is_some_and(|(_, lsn)| *lsn <= replayed) {
            self.0.pop_front();
        }
        if let Some(received) = received.filter(|r| *r > replayed) {
            if self.0.back().is_none_or(|(_, lsn)| *lsn < received) {
                if self.0.len() >= 256 {
                    self.0.pop_back();
                }
                self.0.push_back((now, received));
            }
        }
        self.0
            .front()
            .map_or(Duration::ZERO, |(at, _)| now.duration_since(*at))
    }
}

/// Runs the monitor of `cluster` until `stop` (or the cluster is dropped by a reload
/// that replaced it: `retired`).
pub async fn monitor(
    cluster: Arc<Cluster>,
    stop: tokio_util::sync::CancellationToken,
    retired: tokio_util::sync::CancellationToken,
) {
    let mut conns: Vec<Option<Server>> = cluster.hosts.iter().map(|_| None).collect();
    let mut warned_no_target = false;
    loop {
        cluster.summarize_waits();
        let target = lock(&cluster.monitor_target).clone();
        match target {
            Some(target) => {
                // All at once: a host that does not answer must not hold up finding the
                // others (a replica promoted while the old primary is cut off).
                let probes = conns
                    .iter_mut()
                    .enumerate()
                    .map(|(i, conn)| probe(&cluster, i, conn, &target));
                futures_util::future::join_all(probes).await;
            }
            None if !warned_no_target => {
                warned_no_target = true;
                cluster.monitored.store(false, Ordering::Release);
                tracing::warn!(database = %cluster.database, "no user to check the hosts with (set monitor_user to one with a server password): roles are learnt from backends' logins only");
            }
            None => {}
        }
        let period = if cluster.primary().is_none()
            && cluster.hosts.iter().any(|h| h.spec.role == HostRole::Auto)
        {
            FAST_PROBE
        } else {
            cluster.settings.load().interval
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = retired.cancelled() => break,
            _ = tokio::time::sleep(period) => {}
            _ = cluster.probe_now.notified() => {
                // Several reports at once make one probe.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    cluster.monitored.store(false, Ordering::Release);
}

/// One health check of `host` over `conn` (opened if needed), within `timeout`.
async fn probe_once(
    host: &Host,
    conn: &mut Option<Server>,
    target: &ServerTarget,
    timeout: Duration,
) -> Result<Result<Vec<Vec<Option<String>>>, ServerError>, tokio::time::error::Elapsed> {
    let mut t = target.clone();
    if conn.is_none() {
        // A password command runs before the check's clock starts (its own limit bounds
        // it): a slow credential fetch is not a host that is down.
        if let Some(crate::server::BackendPassword::Command(command)) = &target.password {
            match command.password().await {
                Ok(secret) => {
                    t.password = Some(crate::server::BackendPassword::Plain(secret.clone()));
                    let result = probe_on(host, conn, &t, timeout).await;
                    if let Ok(Err(ServerError::CredentialRefused(_))) = &result {
                        command.forget(&secret).await;
                    }
                    return result;
                }
                Err(e) => return Ok(Err(ServerError::PasswordCommand(e))),
            }
        }
    }
    probe_on(host, conn, &t, timeout).await
}

/// [`probe_once`], its target's password resolved.
async fn probe_on(
    host: &Host,
    conn: &mut Option<Server>,
    target: &ServerTarget,
    timeout: Duration,
) -> Result<Result<Vec<Vec<Option<String>>>, ServerError>, tokio::time::error::Elapsed> {
    tokio::time::timeout(timeout, async {
        if conn.is_none() {
            let mut t = target.clone();
            t.host = host.spec.host.clone();
            t.port = host.spec.port;
            t.application_name = Some("pgshield health check");
            *conn = Some(connect(&t, timeout).await?);
        }
        let server = conn.as_mut().ok_or(ServerError::Closed)?;
        let reply = server.run_internal(PROBE_SQL).await?;
        match reply.error {
            Some(e) => Err(ServerError::Query(e)),
            None => Ok(reply.rows),
        }
    })
    .await
}

/// Probes host `index` over its monitor connection (opened if needed).
async fn probe(cluster: &Cluster, index: usize, conn: &mut Option<Server>, target: &ServerTarget) {
    let host = &cluster.hosts[index];
    {
        let s = lock(&host.state);
        // While writers have no primary, an `auto` host is probed whatever its back-off:
        // a restarted primary must be found as soon as it is back.
        let urgent = cluster.primary().is_none() && host.spec.role == HostRole::Auto;
        if !s.up && !urgent && s.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
    }
    let settings = cluster.settings.load_full();
    let reused = conn.is_some();
    let mut result = probe_once(host, conn, target, settings.timeout).await;
    if reused && !matches!(result, Ok(Ok(_))) {
        // The check's own connection failed (ended by an administrator's
        // pg_terminate_backend, say): once more on a fresh one before the host is taken
        // for down, and every backend on it closed.
        *conn = None;
        result = probe_once(host, conn, target, settings.timeout).await;
    }
    let rows = match result {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            *conn = None;
            let going_away = matches!(&e, ServerError::Refused(r) if host_is_going_away(r));
            let unreachable = matches!(
                e,
                ServerError::Connect { .. } | ServerError::Timeout { .. } | ServerError::Closed
            ) || going_away
                || matches!(e, ServerError::Io(_));
            if unreachable {
                cluster.mark_down(index, &e.to_string());
            } else {
                // Reachable but refusing us (a password, say): roles are learnt from
                // backends' logins instead until a probe succeeds.
                tracing::warn!(database = %cluster.database, host = %host.spec.addr(), error = %e, "health check failed");
                lock(&host.state).last_error = Some(e.to_string());
                cluster.monitored.store(false, Ordering::Release);
            }
            return;
        }
        Err(_) => {
            *conn = None;
            cluster.mark_down(
                index,
                &format!(
                    "no answer to the health check within {}",
                    humantime::format_duration(settings.timeout)
                ),
            );
            return;
        }
    };
    let Some(row) = rows.first() else {
        return;
    };
    let text = |i: usize| row.get(i).and_then(|v| v.as_deref());
    let in_recovery = text(0) == Some("t");
    let lsn = |i: usize| text(i).and_then(|v| v.parse::<u64>().ok());
    cluster.monitored.store(true, Ordering::Release);
    cluster.mark_up(index);
    let fit_before = cluster.replica_fit(host);
    {
        let mut s = lock(&host.state);
        s.lag = if !in_recovery {
            s.received = Received::default();
            None
        } else if lsn(1).is_some() && text(6) != Some("f") {
            Some(s.received.lag(Instant::now(), lsn(1), lsn(2)))
        } else {
            // Not streaming (never started, or its WAL receiver has stopped: the position
            // received then stays, replayed long since, and says nothing of what the
            // primary has written since): how old the last replayed transaction is, if
            // any was.
            s.received = Received::default();
            let age = text(5)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(Duration::from_secs_f64);
            Some(age.unwrap_or(UNKNOWN_LAG))
        };
    }
    if cluster.replica_fit(host) != fit_before {
        // A replica past max_replica_lag, or back within it: read-only borrowers look again.
        cluster.bump();
    }
    cluster.learn_role(
        index,
        if in_recovery {
            Role::Replica
        } else {
            Role::Primary
        },
        "health check",
    );
    if let Some(capacity) = ServerCapacity::from_row(row, 3) {
        if !in_recovery || cluster.capacity().is_none() {
            cluster.learn_capacity(capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_lag_is_the_age_of_the_oldest_wal_received_and_not_replayed() {
        let mut r = Received::default();
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        // Caught up: no lag, however old the last transaction.
        assert_eq!(r.lag(t0, Some(100), Some(100)), Duration::ZERO);
        // Behind since t0+1s, replay stuck: the lag grows with time.
        assert_eq!(r.lag(t0 + s, Some(200), Some(100)), Duration::ZERO);
        assert_eq!(r.lag(t0 + 3 * s, Some(300), Some(100)), 2 * s);
        // Replay passed the first position but not the second: counted from the second.
        assert_eq!(r.lag(t0 + 4 * s, Some(300), Some(250)), s);
        // Caught up again.
        assert_eq!(r.lag(t0 + 5 * s, Some(300), Some(300)), Duration::ZERO);
        // Not streaming (no receive position): no lag to speak of.
        assert_eq!(r.lag(t0 + 6 * s, None, Some(300)), Duration::ZERO);
        assert_eq!(r.lag(t0 + 7 * s, None, None), Duration::ZERO);
    }

    fn cluster(roles: &[HostRole]) -> Arc<Cluster> {
        let hosts = roles
            .iter()
            .enumerate()
            .map(|(i, role)| HostSpec {
                host: "127.0.0.1".into(),
                port: 5432 + i as u16,
                role: *role,
            })
            .collect();
        Cluster::new(
            "db",
            hosts,
            HealthSettings {
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                max_replica_lag: Some(Duration::from_secs(5)),
                log_connections: false,
            },
        )
    }

    #[test]
    fn a_host_just_tried_is_passed_over_for_another() {
        use HostRole::{Auto, Primary, Replica};
        let c = cluster(&[Primary, Replica, Replica]);
        let read = Route::Replica { fallback: true };
        // Least busy replica first; one that failed is skipped; then the primary.
        let first = c.pick(read).unwrap();
        assert!(first == 1 || first == 2);
        let _lease = c.lease(first);
        let other = c.pick(read).unwrap();
        assert_ne!(other, first, "the least busy replica");
        assert_eq!(c.pick_except(read, &[other]), Some(first));
        assert_eq!(
            c.pick_except(read, &[1, 2]),
            Some(0),
            "fallback to the primary"
        );
        assert_eq!(
            c.pick_except(Route::Replica { fallback: false }, &[1, 2]),
            None
        );
        // A lagging replica is skipped; one whose lag is unknown too.
        lock(&c.hosts[1].state).lag = Some(Duration::from_secs(6));
        lock(&c.hosts[2].state).lag = Some(UNKNOWN_LAG);
        assert_eq!(c.pick(Route::Replica { fallback: false }), None);
        // Writers: the fixed primary, even after it failed (there is no other).
        c.mark_down(0, "test");
        assert_eq!(c.pick(Route::Primary), Some(0));

        // Auto roles, nobody watching: the host learnt as primary, then, once it was
        // tried, the others (one may have been promoted).
        let a = cluster(&[Auto, Auto]);
        a.learn_role(0, Role::Primary, "test");
        a.learn_role(1, Role::Replica, "test");
        assert_eq!(a.pick(Route::Primary), Some(0));
        assert_eq!(a.pick_except(Route::Primary, &[0]), Some(1));
        // Watched: a lost primary means waiting for the monitor.
        a.monitored.store(true, Ordering::Release);
        a.mark_down(0, "test");
        assert_eq!(a.primary(), None);
        assert_eq!(a.pick(Route::Primary), None);
        a.learn_role(1, Role::Primary, "test");
        assert_eq!(a.pick(Route::Primary), Some(1));
        // The old primary back out of recovery: writers stay.
        a.learn_role(0, Role::Primary, "test");
        assert_eq!(a.primary(), Some(1));
    }

    #[test]
    fn backoff_doubles_from_the_interval_up_to_a_minute() {
        let i = Duration::from_millis(500);
        assert_eq!(Cluster::backoff(1, i), i);
        assert_eq!(Cluster::backoff(2, i), 2 * i);
        assert_eq!(Cluster::backoff(4, i), 8 * i);
        assert_eq!(Cluster::backoff(30, i), MAX_BACKOFF);
    }
}
