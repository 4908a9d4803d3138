//! One client connection: its login (`handshake`, `auth`), the settings that follow it
//! (`params`), and the session loop that relays its messages (`session`).

pub mod access;
pub mod auth;
pub mod auth_query;
pub mod cancel;
pub mod handshake;
pub mod params;
pub mod registry;
pub mod session;
pub mod sql;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::net::{Peer, Stream};
use crate::protocol::{sqlstate, ErrorResponse};
use crate::proxy::Shared;

/// How long a refused TLS client gets to take its error.
const TLS_FAREWELL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Identifies a client connection inside pgshield.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl ClientId {
    fn next() -> ClientId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ClientId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// Counts client connections against `listen.max_client_connections`.
#[derive(Debug)]
pub struct ClientSlots {
    open: AtomicUsize,
    /// A reload may change it; clients over a lowered limit stay.
    max: AtomicUsize,
    /// Connections over the limit whose startup packet is being read, to refuse them
    /// with 53300 (see [`ClientSlots::try_refuse`]).
    refusing: AtomicUsize,
}

/// One taken slot; dropping it frees the slot.
pub struct ClientSlot(Arc<ClientSlots>);

/// A connection over the limit being refused; dropping it ends the count of it.
pub struct Refusing(Arc<ClientSlots>);

/// How long a connection over the client limit has to send its startup packet (it
/// only waits for its 53300): at most `listen.client_login_timeout`.
pub const REFUSAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl ClientSlots {
    pub fn new(max: usize) -> Arc<ClientSlots> {
        Arc::new(ClientSlots {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            refusing: AtomicUsize::new(0),
        })
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Release);
    }

    pub fn try_take(self: &Arc<Self>) -> Option<ClientSlot> {
        let max = self.max.load(Ordering::Acquire);
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientSlot(Arc::clone(self)))
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// A connection over the limit, to be told so (53300, as PostgreSQL tells it) once
    /// its startup packet is read, within [`REFUSAL_TIMEOUT`]: as many at once as the
    /// limit itself (at least 16). Beyond that, None: it is closed unread, so that a
    /// flood of connections over the limit holds no more than that many sockets.
    pub fn try_refuse(self: &Arc<Self>) -> Option<Refusing> {
        let cap = self.max.load(Ordering::Acquire).max(16);
        self.refusing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Refusing(Arc::clone(self)))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Refusing {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a client connection closed, however its task ends.
pub struct ClosedOnDrop(metrics::Counter);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.increment(1);
    }
}

/// What a client holds for as long as it is connected: its place under the client limit
/// and the count of closed connections it adds to when it goes.
pub struct Held {
    pub slot: Option<ClientSlot>,
    pub closed: ClosedOnDrop,
}

/// Serves one accepted connection: its login, then the session, in one task. The login
/// runs boxed, so that its state (TLS, SCRAM, the handshake's buffers) is freed when it
/// ends and an idle client's task holds only the session. (One task, not a login task
/// that spawns the session's: a second task per connection cost an aligned allocation,
/// a copy of the session and, often, a wake-up of another worker.) `slot` is `None` when
/// the client limit is reached: such a client is told so after its startup packet.
///
/// Not an `async` block: the session would stay in the task's future as a local, beside
/// the relay's future it is moved into (about 500 bytes more per idle client). `then`
/// keeps one state or the other.
pub fn serve(
    shared: Arc<Shared>,
    stream: Stream,
    addrs: (Peer, Option<SocketAddr>),
    slot: Option<ClientSlot>,
    read_only: bool,
) -> impl std::future::Future<Output = ()> + Send {
    use futures_util::future::{Either, FutureExt};
    let login = Box::pin(log_in(shared, stream, addrs, slot, read_only));
    // Counted: the session's `poll_io` skips sockets already found empty in the same poll.
    crate::epoch::Counted::new(login.then(|session| match session {
        Some(session) => Either::Left(session.run()),
        None => Either::Right(std::future::ready(())),
    }))
}

/// The login of an accepted connection: the session to run if it logged in to a
/// database, `None` if it was refused or was the admin console's (served here).
async fn log_in(
    shared: Arc<Shared>,
    mut stream: Stream,
    (peer, local): (Peer, Option<SocketAddr>),
    slot: Option<ClientSlot>,
    read_only: bool,
) -> Option<session::Session> {
    let id = ClientId::next();
    let clients = &shared.metrics.clients;
    clients.received.increment(1);
    let closed = ClosedOnDrop(clients.closed.clone());
    let mut buf = BytesMut::new();
    let mut login_timeout = shared.live().config.listen.client_login_timeout;
    if slot.is_none() {
        login_timeout = login_timeout.min(REFUSAL_TIMEOUT);
    }
    let shutdown = shared.shutdown.clone();
    let login = handshake::login(
        &shared,
        &mut stream,
        &mut buf,
        peer,
        slot.is_some(),
        read_only,
    );
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(login_timeout, login) => outcome,
        // A login in progress must not hold up a shutdown.
        _ = shutdown.draining() => Ok(Err(ErrorResponse::fatal(sqlstate::ADMIN_SHUTDOWN, "pgshield is shutting down").into())),
    };
    let refusal = match outcome {
        Ok(Ok(handshake::Outcome::Session(login))) => {
            clients.setup_succeeded.increment(1);
            let held = Held { slot, closed };
            return Some(session::Session::new(
                Arc::clone(&shared),
                id,
                (stream, peer, local),
                login,
                buf,
                held,
            ));
        }
        Ok(Ok(handshake::Outcome::Admin(user, registration))) => {
            clients.setup_succeeded.increment(1);
            crate::admin::run(Arc::clone(&shared), stream, buf, user).await;
            // (Its cancel key is good for as long as the console session lasts.)
            drop(registration);
            return None;
        }
        Ok(Err(refusal)) => refusal,
        Err(_) => {
            tracing::info!(client = %id, %peer, "login not completed within client_login_timeout");
            ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!(
                    "startup and authentication not completed within {} (listen.client_login_timeout)",
                    humantime::format_duration(login_timeout)
                ),
            )
            .into()
        }
    };
    let handshake::Refusal {
        error: refusal,
        unsent: mut out,
    } = refusal;
    if let Some(e) = refusal
        .as_ref()
        .filter(|_| shared.live().config.log.connections)
    {
        // (Debug: the message quotes names the client chose, newlines included.)
        tracing::info!(client = %id, %peer, sqlstate = %e.code, error = ?e.message, "login refused");
    }
    // A cancel request, or a client that left mid-login, was not refused.
    match &refusal {
        Some(e) if e.code == sqlstate::INVALID_PASSWORD => clients.setup_failed_auth.increment(1),
        Some(_) => clients.setup_refused.increment(1),
        None => {}
    }
    if let Some(error) = refusal {
        error.encode(&mut out);
        if stream.is_tls() {
            // A TLS record cannot be written without waiting: wait a little.
            let farewell = async {
                stream.send(&out).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(TLS_FAREWELL_TIMEOUT, Box::pin(farewell)).await;
        } else {
            // Best effort, never waiting on a client that does not read.
            stream.try_write_now(&out);
        }
    }
    None
}
