//! The listener and the state every session shares: accept connections, hand each to its
//! own task, and on shutdown drain them (see `shutdown.rs`) before closing the pools.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::client::cancel::Cancels;
use crate::client::sql::PinReason;
use crate::client::throttle::LoginThrottle;
use crate::client::{self, ClientSlots};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::net::{Peer, Stream};
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

/// pgshield's Unix-domain socket (`listen.unix_socket_dir`). It is bound and listens
/// under a name of its own first (its path and this process's id), and takes its real
/// name only when everything else has bound ([`UnixSocket::publish`]): a start that fails
/// leaves the socket in place untouched, and a rolling restart's takes the name over in
/// one rename. Dropping it removes the file, unless another pgshield has taken the name
/// meanwhile.
struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Where it listens until published.
    temporary: PathBuf,
    published: bool,
    /// The port in its name, what a client over it is shown with.
    port: u16,
    /// The file's (device, inode): how this socket is told from a successor's.
    file: (u64, u64),
}

impl UnixSocket {
    /// Gives the socket its real name, replacing what was there (a stale socket, or the
    /// live one of the pgshield this one takes over from).
    fn publish(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.temporary, &self.path)?;
        self.published = true;
        Ok(())
    }
}

impl UnixSocket {
    /// The connections queued on the socket (its owner then closes it).
    fn take_queued(&self) -> Vec<tokio::net::UnixStream> {
        let socket = socket2::SockRef::from(&self.listener);
        let mut queued = Vec::new();
        // (Non-blocking, as tokio left it: stops at the first WouldBlock.)
        for _ in 0..MAX_QUEUED {
            let Some(accepted) = next_queued(socket.accept()) else {
                break;
            };
            let stream = accepted.and_then(|(accepted, _)| {
                let stream =
                    std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(accepted));
                stream.set_nonblocking(true)?;
                tokio::net::UnixStream::from_std(stream)
            });
            queued.extend(stream.ok());
        }
        queued
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        let name = if self.published {
            &self.path
        } else {
            &self.temporary
        };
        if file_id(name).is_ok_and(|file| file == self.file) {
            let _ = std::fs::remove_file(name);
        }
    }
}

fn file_id(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))
}

/// Whether a server listens on the socket at `path`: it accepts, or its queue is full
/// (not waited for). Refused means nobody does; any other error is returned.
fn listened_on(path: &Path) -> std::io::Result<bool> {
    let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&socket2::SockAddr::unix(path)?) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(false),
        Err(e) => Err(e),
    }
}

/// Binds pgshield's Unix-domain socket for `path`, with permissions `mode` set before it
/// listens; [`UnixSocket::publish`] then gives it that name. A socket file left at `path`
/// by a process that is gone will be replaced (as PostgreSQL and PgBouncer do); one a
/// server still listens on only when `take_over` (`listen.reuse_port`: a new pgshield
/// taking over from the one that drains), and is an error otherwise. PostgreSQL's lock
/// file beside it (`.s.PGSQL.<port>.lock`), or anything at `path` but a socket, is an
/// error, and left alone.
fn listen_unix(path: &Path, port: u16, mode: u32, take_over: bool) -> std::io::Result<UnixSocket> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let beside = |suffix: String| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    if beside(".lock".into()).exists() {
        return Err(Error::new(
            ErrorKind::AddrInUse,
            "PostgreSQL's lock file for it is there: a server of its own uses this name",
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(found) if !found.file_type().is_socket() => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Ok(_) if listened_on(path)? && !take_over => {
            return Err(Error::new(
                ErrorKind::AddrInUse,
                "another server is listening on it",
            ))
        }
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let temporary = beside(format!(".{}", std::process::id()));
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(&temporary)?)?;
    let listening = (|| {
        let file = file_id(&temporary)?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        let listener = UnixListener::from_std(std::os::unix::net::UnixListener::from(
            std::os::fd::OwnedFd::from(socket),
        ))?;
        Ok((listener, file))
    })();
    match listening {
        Ok((listener, file)) => Ok(UnixSocket {
            listener,
            path: path.to_owned(),
            temporary,
            published: false,
            port,
            file,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            Err(e)
        }
    }
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
    #[error("cannot listen on {}: {source} (listen.unix_socket_dir)", path.display())]
    BindUnix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An accepted client: its stream, where it came from, and the address it reached (none
/// over the Unix-domain socket).
type Accepted = (Stream, Peer, Option<SocketAddr>);

/// The most connections taken from one closing socket's queue (the kernel's own bound,
/// `net.core.somaxconn`, is 4096 by default).
const MAX_QUEUED: usize = 65_536;

/// Closes `listener`, with the connections queued on it if `take` is false; else returns
/// them.
fn take_queued(listener: TcpListener, take: bool) -> Vec<(TcpStream, SocketAddr)> {
    let mut queued = Vec::new();
    let Some(listener) = listener.into_std().ok().filter(|_| take) else {
        return queued;
    };
    // (Non-blocking, as tokio left it: stops at the first WouldBlock. Bounded, should an
    // error keep coming.)
    for _ in 0..MAX_QUEUED {
        let Some(accepted) = next_queued(listener.accept()) else {
            break;
        };
        let tcp = accepted.and_then(|(tcp, peer)| {
            tcp.set_nonblocking(true)?;
            Ok((TcpStream::from_std(tcp)?, peer))
        });
        queued.extend(tcp.ok());
    }
    queued
}

/// What a non-blocking accept of what is queued gave: a connection, or a failure of that
/// one only (it went away before it was accepted; on Linux also network errors pending
/// on it, which accept(2) says to treat as a retry); None once the queue is empty, or the
/// process is out of descriptors or memory (the rest are lost).
fn next_queued<T>(accepted: std::io::Result<T>) -> Option<std::io::Result<T>> {
    use nix::errno::Errno;
    match accepted {
        Ok(accepted) => Some(Ok(accepted)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e)
            if e.raw_os_error().is_some_and(|code| {
                [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
                    .contains(&Errno::from_raw(code))
            }) =>
        {
            None
        }
        Err(e) => Some(Err(e)),
    }
}

/// A client accepted over TCP through the listener at `listening`.
fn accepted_tcp((tcp, peer): (TcpStream, SocketAddr), listening: SocketAddr) -> Accepted {
    // The connection's own address is the listener's, unless that is a wildcard.
    let local = if listening.ip().to_canonical().is_unspecified() {
        tcp.local_addr().ok()
    } else {
        Some(listening)
    };
    (Stream::from_accepted(tcp), Peer::Tcp(peer), local)
}

/// Serves one accepted connection in a task of its own (`read_only`: it came through
/// `listen.read_only_addr`).
async fn accept(
    shared: &Arc<Shared>,
    sessions: &TaskTracker,
    accepted: std::io::Result<Accepted>,
    read_only: bool,
) {
    match accepted {
        Ok((stream, peer, local)) => {
            let slot = shared.clients.try_take();
            let serve = |slot| {
                let shared = Arc::clone(shared);
                client::serve(shared, stream, (peer, local), slot, read_only)
            };
            if slot.is_some() {
                sessions.spawn(serve(slot));
                return;
            }
            // Over the client limit: told so, as many at a time as the limit; beyond
            // that, closed unread.
            let Some(refusing) = shared.clients.try_refuse() else {
                tracing::debug!(%peer, "over the client limit, and as many being refused: closed");
                return;
            };
            let refusal = serve(None);
            sessions.spawn(async move {
                let _refusing = refusing;
                refusal.await;
            });
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
    /// `listen.unix_socket_dir`: the Unix-domain socket, if configured.
    unix: Option<UnixSocket>,
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
        let mut unix = match config.unix_socket_path(local_addr.port()) {
            Some(path) => Some(
                listen_unix(
                    &path,
                    local_addr.port(),
                    config.unix_socket_mode()?,
                    config.listen.reuse_port,
                )
                .map_err(|source| StartError::BindUnix { path, source })?,
            ),
            None => None,
        };
        // (Shared with the new process of a rolling restart too, which takes it over.)
        let http = match config.admin_http_addr()? {
            Some(addr) => {
                Some(bound(listen(addr, config.listen.reuse_port)).map_err(bind_error(addr))?)
            }
            None => None,
        };
        // Last, once nothing else can fail.
        if let Some(unix) = unix.as_mut() {
            unix.publish().map_err(|source| StartError::BindUnix {
                path: unix.path.clone(),
                source,
            })?;
        }
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
            unix,
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

    /// The path of the Unix-domain socket clients may connect to, if there is one.
    pub fn unix_socket_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
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
            unix,
        } = self;
        let janitors = CancellationToken::new();
        shared.pools.spawn_janitors(janitors.clone());
        if let Some((listener, _)) = http {
            // A rolling restart's new process, listening on the same ports, answers the
            // probes and scrapes once this one hands over: this one's would say it is
            // not ready, and a probe would get either answer.
            let stop = janitors.child_token();
            if shared.live().config.listen.reuse_port {
                let (shutdown, stop) = (shared.shutdown.clone(), stop.clone());
                tokio::spawn(async move {
                    shutdown.listener_closed().await;
                    stop.cancel();
                });
            }
            tokio::spawn(crate::http::serve(listener, Arc::clone(&shared), stop));
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
            unix_socket = unix.as_ref().map(|u| u.path.display().to_string()),
            mode = %shared.live().config.pool.mode,
            pools = shared.pools.all().len(),
            "pgshield is listening"
        );
        loop {
            tokio::select! {
                _ = shutdown.draining() => break,
                _ = shutdown.listener_closed() => break,
                accepted = listener.accept() => {
                    accept(&shared, &sessions, accepted.map(|a| accepted_tcp(a, local_addr)), false).await
                }
                accepted = async {
                    match &read_only {
                        Some((listener, addr)) => listener.accept().await.map(|a| accepted_tcp(a, *addr)),
                        None => std::future::pending().await,
                    }
                } => accept(&shared, &sessions, accepted, true).await,
                accepted = async {
                    match &unix {
                        Some(unix) => unix.listener.accept().await.map(|(stream, _)| {
                            (Stream::from_accepted_unix(stream), Peer::Unix { port: unix.port }, None)
                        }),
                        None => std::future::pending().await,
                    }
                } => accept(&shared, &sessions, accepted, false).await,
            }
        }
        // Stopped listening for a successor (a rolling restart, or WAIT_FOR_CLIENTS):
        // connections already queued on this process's sockets are served rather than
        // reset as the sockets close (the kernel gives each socket of a reuse_port group
        // its own queue). Draining, they are refused with the sockets.
        let serve_queued = !shutdown.is_draining();
        let mut queued = Vec::new();
        queued.extend(
            take_queued(listener, serve_queued)
                .into_iter()
                .map(|q| (q, local_addr, false)),
        );
        if let Some((listener, addr)) = read_only {
            queued.extend(
                take_queued(listener, serve_queued)
                    .into_iter()
                    .map(|q| (q, addr, true)),
            );
        }
        for (tcp, listening, read_only) in queued {
            accept(
                &shared,
                &sessions,
                Ok(accepted_tcp(tcp, listening)),
                read_only,
            )
            .await;
        }
        if let Some(unix) = unix.as_ref().filter(|_| serve_queued) {
            for stream in unix.take_queued() {
                let peer = Peer::Unix { port: unix.port };
                let accepted = (Stream::from_accepted_unix(stream), peer, None);
                accept(&shared, &sessions, Ok(accepted), false).await;
            }
        }
        drop(unix);
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

    /// A listener closed for a successor hands over the connections queued on it (they
    /// would be reset as it closes); closed for a drain, it does not.
    #[tokio::test]
    async fn a_closing_listener_gives_up_its_queued_connections() {
        for take in [true, false] {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            let clients: Vec<_> = (0..3)
                .map(|_| std::net::TcpStream::connect(addr).expect("queued"))
                .collect();
            let queued = take_queued(listener, take);
            assert_eq!(queued.len(), if take { 3 } else { 0 });
            assert!(std::net::TcpStream::connect(addr).is_err(), "closed");
            drop(clients);
        }
        // The Unix-domain socket's too.
        let dir = std::env::temp_dir().join(format!("pgshield-queued-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(".s.PGSQL.6998");
        let mut unix = listen_unix(&path, 6998, 0o700, false).expect("unix socket");
        unix.publish().expect("published");
        let clients: Vec<_> = (0..2)
            .map(|_| std::os::unix::net::UnixStream::connect(&path).expect("queued"))
            .collect();
        assert_eq!(unix.take_queued().len(), 2);
        assert!(unix.take_queued().is_empty());
        drop((unix, clients));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_unix_socket_replaces_a_stale_file_and_only_a_successor_takes_a_live_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("pgshield-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(".s.PGSQL.6999");
        let mode = |path: &Path| {
            std::fs::metadata(path)
                .map(|m| m.permissions().mode() & 0o777)
                .ok()
        };
        let listens = |path: &Path| std::os::unix::net::UnixStream::connect(path).is_ok();
        let bind = |mode, take_over| listen_unix(&path, 6999, mode, take_over);
        // Left by a process that is gone: bound, never listened on again.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
        let mut first = bind(0o700, false).expect("a stale file is no obstacle");
        assert!(!listens(&path), "not under its name before it is published");
        first.publish().expect("published");
        assert_eq!(mode(&path), Some(0o700));
        assert!(listens(&path));
        let err = bind(0o777, false).err().expect("a live socket is in use");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        // A rolling restart whose start fails leaves the running socket as it was.
        drop(bind(0o770, true).expect("may take over"));
        assert_eq!(mode(&path), Some(0o700));
        assert!(listens(&path));
        // One that starts takes the name over; the old process, when it goes, leaves the
        // new file alone.
        let mut second = bind(0o770, true).expect("taken over");
        second.publish().expect("published");
        drop(first);
        assert_eq!(mode(&path), Some(0o770), "the successor's file stays");
        assert!(listens(&path), "the successor listens");
        drop(second);
        assert!(!path.exists(), "removed by the process that made it");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).expect("dir").collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // PostgreSQL's socket (its lock file beside it), and anything but a socket, are
        // never replaced.
        std::fs::write(dir.join(".s.PGSQL.6999.lock"), "4242").expect("a lock file");
        let err = bind(0o777, true).err().expect("PostgreSQL's name");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        std::fs::remove_file(dir.join(".s.PGSQL.6999.lock")).expect("unlock");
        std::fs::write(&path, "data").expect("a regular file");
        let err = bind(0o777, true).err().expect("a file is in the way");
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read_to_string(&path).ok().as_deref(), Some("data"));
        std::fs::remove_dir_all(&dir).ok();
    }

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
