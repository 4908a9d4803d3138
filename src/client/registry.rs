//! Every logged-in client, for the admin console: SHOW CLIENTS, SHOW SERVERS (the backends
//! clients hold), KILL and KILL_CLIENT. A session publishes its state with atomic stores
//! as it goes (no lock on its path); the console reads snapshots.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::task::AtomicWaker;

use crate::FastMap;

/// What a client is doing, as PgBouncer's SHOW CLIENTS states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Logged in, holding a backend or not needing one.
    Active = 0,
    /// Queued for a backend.
    Waiting = 1,
}

/// The backend a client holds, as SHOW SERVERS shows it.
#[derive(Debug, Default, Clone, Copy)]
pub struct LentServer {
    pub id: u64,
    pub pid: i32,
    /// The index of its host among its database's.
    pub host: Option<usize>,
    /// When it was opened, in seconds since the Unix epoch.
    pub opened_secs: u64,
    pub tls: bool,
}

/// One client, as the console sees it.
pub struct ClientInfo {
    pub id: u64,
    /// Its pool: the user and database as it named them (not copied per client).
    pub pool: Arc<crate::pool::Pool>,
    pub addr: crate::net::Peer,
    pub local: Option<SocketAddr>,
    pub connected_at: SystemTime,
    /// The same moment on the monotonic clock the session reads anyway.
    connected: Instant,
    pub tls: bool,
    pub application_name: String,
    /// Since when it has waited for a backend, as a [`ClientInfo::stamp`] (0: it is not
    /// waiting).
    waiting_since: AtomicU64,
    /// When its latest request arrived, as a [`ClientInfo::stamp`] (0: none).
    request_at: AtomicU64,
    /// The backend it holds: server id and PostgreSQL pid (0: none).
    server_id: AtomicU64,
    server_pid: AtomicI32,
    /// The index of the lent backend's host among its database's, plus one (0: none).
    server_host: std::sync::atomic::AtomicU16,
    /// When the lent backend was opened (seconds since the Unix epoch), shifted left
    /// by one, with whether it is over TLS in the lowest bit.
    server_opened: AtomicU64,
    /// KILL / KILL_CLIENT: the session ends at its next turn.
    kill: AtomicBool,
    /// Wakes the session (the same waker its shutdown watch registers).
    waker: Arc<AtomicWaker>,
}

impl ClientInfo {
    /// How long the client has been logged in.
    pub fn connected_for(&self) -> Duration {
        self.connected.elapsed()
    }

    pub fn user(&self) -> &str {
        self.pool.user()
    }

    pub fn database(&self) -> &str {
        self.pool.database()
    }

    /// `at` as one number: microseconds since `connected`, plus one (0 stands for none).
    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.connected).as_micros() as u64 + 1
    }

    /// A [`ClientInfo::stamp`] back as time since `connected` (None for 0).
    fn since_connected(stamp: u64) -> Option<Duration> {
        stamp.checked_sub(1).map(Duration::from_micros)
    }

    /// The client waits for a backend since `since`, or no longer waits (None).
    pub fn set_waiting(&self, since: Option<Instant>) {
        let stamp = since.map_or(0, |at| self.stamp(at));
        self.waiting_since.store(stamp, Ordering::Relaxed);
    }

    pub fn state(&self) -> ClientState {
        match self.waiting_since.load(Ordering::Relaxed) {
            0 => ClientState::Active,
            _ => ClientState::Waiting,
        }
    }

    /// A request arrived `at` (the time the session already took: no clock read here).
    pub fn note_request(&self, at: Instant) {
        self.request_at.store(self.stamp(at), Ordering::Relaxed);
    }

    /// How long it has waited for a backend, if it is waiting for one.
    pub fn waiting_for(&self) -> Option<Duration> {
        let since = Self::since_connected(self.waiting_since.load(Ordering::Relaxed))?;
        Some(self.connected.elapsed().saturating_sub(since))
    }

    pub fn request_at(&self) -> Option<SystemTime> {
        Self::since_connected(self.request_at.load(Ordering::Relaxed))
            .map(|since| self.connected_at + since)
    }

    /// The backend lent to the client now, or none.
    pub fn set_server(&self, server: Option<LentServer>) {
        let s = server.unwrap_or_default();
        let host = s.host.map_or(0, |i| u16::try_from(i + 1).unwrap_or(0));
        self.server_host.store(host, Ordering::Relaxed);
        self.server_opened
            .store(s.opened_secs << 1 | u64::from(s.tls), Ordering::Relaxed);
        self.server_id.store(s.id, Ordering::Relaxed);
        self.server_pid.store(s.pid, Ordering::Relaxed);
    }

    /// When the lent backend was opened, and whether it is over TLS.
    pub fn server_opened(&self) -> (SystemTime, bool) {
        let packed = self.server_opened.load(Ordering::Relaxed);
        let at = std::time::UNIX_EPOCH + Duration::from_secs(packed >> 1);
        (at, packed & 1 == 1)
    }

    /// The index of the lent backend's host among its database's, if known.
    pub fn server_host(&self) -> Option<usize> {
        match self.server_host.load(Ordering::Relaxed) {
            0 => None,
            i => Some(usize::from(i) - 1),
        }
    }

    pub fn server(&self) -> Option<(u64, i32)> {
        match self.server_id.load(Ordering::Relaxed) {
            0 => None,
            id => Some((id, self.server_pid.load(Ordering::Relaxed))),
        }
    }

    /// Asks the session to end; it notices at once.
    pub fn kill(&self) {
        self.kill.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Wakes the session so that it looks at what changed (a reload).
    pub fn wake(&self) {
        self.waker.wake();
    }

    pub fn killed(&self) -> bool {
        self.kill.load(Ordering::Acquire)
    }
}

/// What a new client is registered with.
pub struct NewClient {
    pub id: u64,
    /// Its pool: the user and database as it named them (not copied per client).
    pub pool: Arc<crate::pool::Pool>,
    pub addr: crate::net::Peer,
    pub local: Option<SocketAddr>,
    pub tls: bool,
    pub application_name: String,
}

#[derive(Default)]
pub struct ClientRegistry {
    clients: Mutex<FastMap<u64, Arc<ClientInfo>>>,
}

/// A client's entry; dropping it removes the client.
pub struct Registered {
    pub info: Arc<ClientInfo>,
    registry: Arc<ClientRegistry>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.info.id);
    }
}

impl ClientRegistry {
    pub fn register(self: &Arc<Self>, client: NewClient, waker: Arc<AtomicWaker>) -> Registered {
        let info = Arc::new(ClientInfo {
            id: client.id,
            pool: client.pool,
            addr: client.addr,
            local: client.local,
            connected_at: SystemTime::now(),
            connected: Instant::now(),
            tls: client.tls,
            application_name: client.application_name,
            waiting_since: AtomicU64::new(0),
            request_at: AtomicU64::new(0),
            server_id: AtomicU64::new(0),
            server_pid: AtomicI32::new(0),
            server_host: std::sync::atomic::AtomicU16::new(0),
            server_opened: AtomicU64::new(0),
            kill: AtomicBool::new(false),
            waker,
        });
        self.lock().insert(info.id, Arc::clone(&info));
        Registered {
            info,
            registry: Arc::clone(self),
        }
    }

    /// Every client, oldest first.
    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by_key(|c| c.id);
        all
    }

    pub fn get(&self, id: u64) -> Option<Arc<ClientInfo>> {
        self.lock().get(&id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<u64, Arc<ClientInfo>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}
