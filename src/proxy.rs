//! The listener and the state every session shares: accept connections, hand each to its
//! own task, and on shutdown drain them (see `shutdown.rs`) before closing the pools.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::client::cancel::Cancels;
use crate::client::sql::PinReason;
use crate::client::throttle::LoginThrottle;
use crate::client::{self, ClientSlots};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::reload::{Live, ReloadError};
use crate::shutdown::Shutdown;

/// Binds the client listener; with `reuse_port`, another pgshield may bind the same port
/// (SO_REUSEPORT), which is how a new process takes over while the old one lets its
/// clients finish.
fn listen(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    // Inherited by the connections it accepts.
    crate::net::set_tcp_options(socket2::SockRef::from(&socket))?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// How long forced-out sessions get to close after `shutdown_timeout`.
const FORCED_GRACE: Duration = Duration::from_secs(5);

/// What every session can see.
pub struct Shared {
    /// The configuration in force; a reload replaces it (read it with [`Shared::live`]).
    pub(crate) live: ArcSwap<Live>,
    /// How many reloads have been applied: sessions look at it to pick up new limits.
    pub reloads: std::sync::atomic::AtomicU64,
    /// The client limits sessions apply, one copy per reload.
    pub(crate) session_limits: std::sync::Mutex<Option<Arc<crate::client::session::Limits>>>,
    /// Serialises reloads.
    pub(crate) reloading: std::sync::Mutex<()>,
    /// Where a reload reads the configuration (see [`Shared::reload_from`]).
    pub(crate) config_source: std::sync::OnceLock<Option<std::path::PathBuf>>,
    pub pools: Pools,
    pub shutdown: Shutdown,
    pub clients: Arc<ClientSlots>,
    pub cancels: Arc<Cancels>,
    /// Clients pinned to their backend, by reason, since start.
    pub pins: PinCounts,
    /// Failed logins by address, to slow down guessing.
    pub login_throttle: LoginThrottle,
    pub metrics: Arc<Metrics>,
    /// Clients pinned now, for SHOW PINS.
    pub pinned: PinnedClients,
    /// Every logged-in client, for SHOW CLIENTS/SERVERS and KILL.
    pub registry: Arc<crate::client::registry::ClientRegistry>,
    /// SHOW STATS averages over the last `admin.stats_period`.
    pub stats_averages: crate::admin::Averages,
}

impl Shared {
    /// The configuration in force, and what is derived from it.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }
}

/// Clients pinned to their backend right now: id → (pool, reason, since).
#[derive(Default)]
pub struct PinnedClients(std::sync::Mutex<PinnedMap>);

type PinnedMap = std::collections::HashMap<u64, (String, PinReason, std::time::SystemTime)>;

impl PinnedClients {
    pub fn add(&self, client: u64, pool: &str, reason: PinReason) {
        self.lock().insert(
            client,
            (pool.to_owned(), reason, std::time::SystemTime::now()),
        );
    }

    pub fn remove(&self, client: u64) {
        self.lock().remove(&client);
    }

    /// (client, pool, reason, since), oldest first.
    pub fn list(&self) -> Vec<(u64, String, PinReason, std::time::SystemTime)> {
        let mut all: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, (pool, reason, since))| (*id, pool.clone(), *reason, *since))
            .collect();
        all.sort_by_key(|p| p.3);
        all
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<u64, (String, PinReason, std::time::SystemTime)>,
    > {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many clients were pinned, by reason.
#[derive(Default)]
pub struct PinCounts([std::sync::atomic::AtomicU64; PinReason::ALL.len()]);

impl PinCounts {
    pub fn add(&self, reason: PinReason) {
        let i = PinReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self, reason: PinReason) -> u64 {
        let i = PinReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.0[i].load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Invalid(#[from] ReloadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Serves one accepted connection in a task of its own (`read_only`: it came through
/// `listen.read_only_addr`; `listening`: the address of the listener it came through).
async fn accept(
    shared: &Arc<Shared>,
    sessions: &TaskTracker,
    accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
    (listening, read_only): (SocketAddr, bool),
) {
    match accepted {
        Ok((tcp, peer)) => {
            let slot = shared.clients.try_take();
            // The connection's own address is the listener's, unless that is a wildcard.
            let local = if listening.ip().to_canonical().is_unspecified() {
                tcp.local_addr().ok()
            } else {
                Some(listening)
            };
            sessions.spawn(client::serve(
                Arc::clone(shared),
                tcp,
                (peer, local),
                slot,
                read_only,
            ));
        }
        Err(e) => {
            // Out of file descriptors and the like: back off instead of spinning.
            tracing::warn!(error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A bound, not yet running, proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    listener: TcpListener,
    local_addr: SocketAddr,
    /// `listen.read_only_addr`: clients served from replicas, if configured.
    read_only: Option<(TcpListener, SocketAddr)>,
    /// The admin HTTP listener, if configured.
    http: Option<(TcpListener, SocketAddr)>,
}

impl Proxy {
    /// Validates the configuration, derives verifiers, builds the pools and binds.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        let live = Live::new(config, None)?;
        let config = &live.config;
        let metrics = Arc::new(Metrics::new());
        let addr = config.listen_addr()?;
        // Each listener with the address it got (port 0 picks one).
        let bound = |listener: std::io::Result<TcpListener>| {
            listener.and_then(|l| Ok((l.local_addr()?, l)).map(|(local, l)| (l, local)))
        };
        let bind_error = |addr| move |source| StartError::Bind { addr, source };
        let (listener, local_addr) =
            bound(listen(addr, config.listen.reuse_port)).map_err(bind_error(addr))?;
        let read_only = match config.read_only_addr()? {
            Some(addr) => {
                Some(bound(listen(addr, config.listen.reuse_port)).map_err(bind_error(addr))?)
            }
            None => None,
        };
        let http = match config.admin_http_addr()? {
            Some(addr) => Some(bound(TcpListener::bind(addr).await).map_err(bind_error(addr))?),
            None => None,
        };
        let shared = Arc::new(Shared {
            pools: Pools::from_config(config, &live.server_tls, &metrics),
            clients: ClientSlots::new(config.listen.max_client_connections),
            live: ArcSwap::from_pointee(live),
            reloads: Default::default(),
            reloading: Default::default(),
            session_limits: Default::default(),
            config_source: Default::default(),
            shutdown: Shutdown::new(),
            cancels: Cancels::new(),
            pins: PinCounts::default(),
            login_throttle: LoginThrottle::default(),
            metrics,
            pinned: PinnedClients::default(),
            registry: Default::default(),
            stats_averages: Default::default(),
        });
        Ok(Proxy {
            shared,
            listener,
            local_addr,
            read_only,
            http,
        })
    }

    /// The address clients connect to (useful when `listen.addr` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The read-only clients' address, if there is one.
    pub fn read_only_addr(&self) -> Option<SocketAddr> {
        self.read_only.as_ref().map(|(_, addr)| *addr)
    }

    /// Where /metrics, /health and /ready are served, if they are.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(_, addr)| *addr)
    }

    /// A handle that starts (or forces) shutdown from elsewhere: signals, tests.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shared.shutdown.clone()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves clients until shutdown, then drains them and closes every backend.
    pub async fn run(self) {
        let Proxy {
            shared,
            listener,
            local_addr,
            read_only,
            http,
        } = self;
        let janitors = CancellationToken::new();
        shared.pools.spawn_janitors(janitors.clone());
        if let Some((listener, _)) = http {
            tokio::spawn(crate::http::serve(
                listener,
                Arc::clone(&shared),
                janitors.clone(),
            ));
        }
        tokio::spawn(crate::admin::average_stats(
            Arc::clone(&shared),
            janitors.clone(),
        ));
        tokio::spawn(crate::admin::log_stats(
            Arc::clone(&shared),
            janitors.clone(),
        ));
        let sessions = TaskTracker::new();
        let shutdown = shared.shutdown.clone();
        tracing::info!(
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            mode = %shared.live().config.pool.mode,
            pools = shared.pools.all().len(),
            "pgshield is listening"
        );
        loop {
            tokio::select! {
                _ = shutdown.draining() => break,
                _ = shutdown.listener_closed() => break,
                accepted = listener.accept() => accept(&shared, &sessions, accepted, (local_addr, false)).await,
                (accepted, listening) = async {
                    match &read_only {
                        Some((listener, addr)) => (listener.accept().await, *addr),
                        None => std::future::pending().await,
                    }
                } => accept(&shared, &sessions, accepted, (listening, true)).await,
            }
        }
        drop(listener);
        drop(read_only);
        sessions.close();
        if !shutdown.is_draining() {
            // WAIT_FOR_CLIENTS: connected clients carry on until they leave, or until a
            // drain or a forced stop is asked for after all.
            tracing::info!(
                clients = shared.clients.open(),
                "stopped listening; serving connected clients until they leave"
            );
            tokio::select! {
                _ = sessions.wait() => {}
                _ = shutdown.draining() => {}
            }
        }
        let timeout = shared.live().config.pool.shutdown_timeout;
        tracing::info!(
            clients = shared.clients.open(),
            timeout = %humantime::format_duration(timeout),
            "shutting down: stopped listening; clients in a transaction may finish it"
        );
        tokio::select! {
            _ = sessions.wait() => {}
            _ = shutdown.forced() => {}
            _ = tokio::time::sleep(timeout) => {
                tracing::warn!(clients = shared.clients.open(), "shutdown_timeout reached: closing remaining clients");
            }
        }
        shutdown.force();
        if tokio::time::timeout(FORCED_GRACE, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not close in time");
        }
        janitors.cancel();
        shared.pools.close_all();
        tracing::info!("pgshield stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_clients_have_nodelay_and_keepalive() {
        let listener = listen("127.0.0.1:0".parse().expect("addr"), false).expect("listen");
        let addr = listener.local_addr().expect("addr");
        for _ in 0..2 {
            let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut stream = crate::net::Stream::from_accepted(tcp);
            let tcp = stream.take_tcp().expect("plain TCP");
            let sock = socket2::SockRef::from(&tcp);
            assert!(sock.tcp_nodelay().expect("nodelay"));
            assert!(sock.keepalive().expect("keepalive"));
            assert_eq!(
                sock.tcp_keepalive_time().expect("time"),
                Duration::from_secs(60)
            );
            assert_eq!(
                sock.tcp_keepalive_interval().expect("interval"),
                Duration::from_secs(10)
            );
        }
    }
}
