//! Cancel requests. Each client gets a BackendKeyData issued by pgshield (random and
//! unguessable); a CancelRequest carrying it is sent, over a fresh connection, to the
//! server of the backend that client holds at that moment, with that backend's real key.
//! A client queued for a backend has its wait cancelled: its statement is not run, and it
//! gets `57014` as from PostgreSQL (PgBouncer leaves it queued). Any other client holding
//! no backend has nothing to cancel; a wrong key does nothing.
//!
//! The race older poolers lose: a cancel meant for client A, delivered just after A let go
//! of its backend, would cancel whatever the next client runs there. Here the backend is
//! marked the moment a cancel is attributed to it (under the same lock the session takes to
//! let go of it), and a marked backend is closed instead of reused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;

use crate::lock;
use crate::server::Server;
use crate::FastMap;

/// How long forwarding one cancel may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// The key a client was given in BackendKeyData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub process_id: i32,
    pub secret_key: i32,
}

/// Where a cancel for a backend goes: its server and real key. Made once per backend.
#[derive(Debug)]
pub struct CancelTarget {
    host: String,
    port: u16,
    /// The address the backend's connection went to, over TCP.
    addr: Option<std::net::SocketAddr>,
    /// The backend's connection was TLS: its cancels are too (as libpq 17's), checked
    /// as its login was (a server behind a TLS-only front would refuse plaintext).
    tls: Option<Arc<crate::tls::ServerTls>>,
    process_id: i32,
    secret_key: i32,
    /// Set when a cancel is attributed to this backend; the backend is then not reused.
    sent: AtomicBool,
}

impl CancelTarget {
    /// The server's host (or socket directory) and port, as connected to.
    pub fn server(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    pub fn new(host: &str, port: u16, process_id: i32, secret_key: i32) -> CancelTarget {
        CancelTarget {
            host: host.to_owned(),
            port,
            addr: None,
            tls: None,
            process_id,
            secret_key,
            sent: AtomicBool::new(false),
        }
    }

    /// The address the backend's connection went to: its cancels go there.
    pub fn connected_to(&mut self, addr: Option<std::net::SocketAddr>) {
        self.addr = addr;
    }

    /// The backend's connection is TLS with these settings: so are its cancels.
    pub fn encrypted_with(&mut self, tls: Arc<crate::tls::ServerTls>) {
        self.tls = Some(tls);
    }

    /// A client's cancel request was sent to this backend.
    pub fn was_sent(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    /// Sends PostgreSQL's CancelRequest for this backend, over a fresh connection to its
    /// server. Nobody is told how it went (as in PostgreSQL): it is logged.
    pub async fn send(&self) {
        let mut packet = BytesMut::with_capacity(16);
        postgres_protocol::message::frontend::cancel_request(
            self.process_id,
            self.secret_key,
            &mut packet,
        );
        let send = async {
            let mut stream = match self.addr {
                Some(addr) => {
                    crate::net::Stream::from_tcp(tokio::net::TcpStream::connect(addr).await?)
                }
                None => crate::net::connect_server(&self.host, self.port).await?,
            };
            if let Some(tls) = &self.tls {
                // (Declined, it goes unsent: the backend's connection was TLS.)
                stream = crate::server::start_tls(stream, tls, &self.host).await?;
            }
            stream.write_all(&packet).await?;
            stream.shutdown().await
        };
        match tokio::time::timeout(CANCEL_TIMEOUT, send).await {
            Ok(Ok(())) => tracing::debug!(server_pid = self.process_id, "cancel forwarded"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot forward a cancel request"),
            Err(_) => tracing::warn!("forwarding a cancel request timed out"),
        }
    }
}

type Slot = Arc<Mutex<SlotState>>;

/// What a cancel for one client reaches.
#[derive(Default)]
struct SlotState {
    /// The backend it holds.
    target: Option<Arc<CancelTarget>>,
    /// Its wait for a backend, while it is queued.
    queued: Option<Arc<QueuedCancel>>,
}

/// A queued client's wait, which a cancel ends.
#[derive(Default)]
pub struct QueuedCancel {
    cancelled: AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl QueuedCancel {
    /// Whether a cancel for the client has arrived.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Resolves once a cancel for the client has arrived.
    pub async fn cancelled(&self) {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.is_cancelled() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// While held, a cancel for the client ends its wait (see [`Registration::queued`]).
pub struct Queued {
    slot: Slot,
    pub wait: Arc<QueuedCancel>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        lock(&self.slot).queued = None;
    }
}

/// Every logged-in client's cancel key, process-wide.
#[derive(Default)]
pub struct Cancels {
    clients: Mutex<FastMap<i32, (i32, Slot)>>,
    /// The keys of admin console sessions among them: a cancel with one resumes every
    /// pool (see [`Cancels::is_console`]).
    consoles: Mutex<std::collections::HashSet<i32>>,
}

/// A client's registration; dropping it forgets the key.
pub struct Registration {
    cancels: Arc<Cancels>,
    key: CancelKey,
    slot: Slot,
}

impl Cancels {
    pub fn new() -> Arc<Cancels> {
        Arc::new(Cancels::default())
    }

    /// Issues a fresh, unused key for a new client.
    pub fn register(self: &Arc<Self>) -> Registration {
        let mut rng = rand::rng();
        let mut clients = lock(&self.clients);
        let process_id = loop {
            let candidate = rng.random_range(1..i32::MAX);
            if !clients.contains_key(&candidate) {
                break candidate;
            }
        };
        let key = CancelKey {
            process_id,
            secret_key: rng.random(),
        };
        let slot = Slot::default();
        clients.insert(process_id, (key.secret_key, Arc::clone(&slot)));
        Registration {
            cancels: Arc::clone(self),
            key,
            slot,
        }
    }

    /// Issues a key for an admin console session (see [`Cancels::is_console`]).
    pub fn register_console(self: &Arc<Self>) -> Registration {
        let registration = self.register();
        lock(&self.consoles).insert(registration.key.process_id);
        registration
    }

    /// Whether a CancelRequest carries an admin console session's key: as PgBouncer,
    /// pgshield then resumes every pool (Ctrl-C in psql ends a PAUSE that waits).
    pub fn is_console(&self, process_id: i32, secret_key: &[u8]) -> bool {
        if !lock(&self.consoles).contains(&process_id) {
            return false;
        }
        let clients = lock(&self.clients);
        clients.get(&process_id).is_some_and(|(expected, _)| {
            bool::from(expected.to_be_bytes().as_slice().ct_eq(secret_key))
        })
    }

    /// Handles a CancelRequest: forwards it to the backend the keyed client holds, if the
    /// key is right and it holds one. Never tells the requester anything (as PostgreSQL).
    pub async fn cancel(&self, process_id: i32, secret_key: &[u8]) {
        let Some(target) = self.attribute(process_id, secret_key) else {
            tracing::debug!(
                process_id,
                "cancel request matched no client holding a backend"
            );
            return;
        };
        target.send().await;
    }

    /// Finds the backend a cancel is for and marks it, under the client's lock; or ends
    /// the client's wait for one.
    fn attribute(&self, process_id: i32, secret_key: &[u8]) -> Option<Arc<CancelTarget>> {
        let slot = {
            let clients = lock(&self.clients);
            let (expected, slot) = clients.get(&process_id)?;
            if !bool::from(expected.to_be_bytes().as_slice().ct_eq(secret_key)) {
                return None;
            }
            Arc::clone(slot)
        };
        let slot = lock(&slot);
        if let (None, Some(queued)) = (&slot.target, &slot.queued) {
            queued.cancelled.store(true, Ordering::Release);
            queued.waker.wake();
            tracing::debug!(process_id, "cancel request ends a queued client's wait");
            return None;
        }
        let target = slot.target.as_ref()?;
        target.sent.store(true, Ordering::Release);
        Some(Arc::clone(target))
    }
}

impl Registration {
    pub fn key(&self) -> CancelKey {
        self.key
    }

    /// From now on, cancels for this client go to `server`.
    pub fn attach(&self, server: &Server) {
        lock(&self.slot).target = Some(server.cancel_target());
    }

    /// As [`Registration::attach`], unless a cancel ended the client's wait `queued`
    /// first (false): looked at under the lock a cancel takes, so that one comes either
    /// before (the wait ends) or after (it reaches the backend).
    pub fn attach_unless_cancelled(&self, server: &Server, queued: &Queued) -> bool {
        let mut slot = lock(&self.slot);
        if queued.wait.is_cancelled() {
            return false;
        }
        slot.target = Some(server.cancel_target());
        true
    }

    /// The client is queued for a backend: until the guard is dropped, a cancel for it
    /// ends the wait (`Queued::wait`).
    pub fn queued(&self) -> Queued {
        let wait = Arc::new(QueuedCancel::default());
        lock(&self.slot).queued = Some(Arc::clone(&wait));
        Queued {
            slot: Arc::clone(&self.slot),
            wait,
        }
    }

    /// The backend this client holds, marked as a client's cancel marks it (under the
    /// same lock), for pgshield to cancel its statement (`query_timeout`); None if it
    /// holds none.
    pub fn attribute(&self) -> Option<Arc<CancelTarget>> {
        let slot = lock(&self.slot);
        let target = slot.target.as_ref()?;
        target.sent.store(true, Ordering::Release);
        Some(Arc::clone(target))
    }

    /// This client no longer holds a backend. Call before the backend is released: a
    /// cancel attributed until now has marked it.
    pub fn detach(&self) {
        lock(&self.slot).target = None;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.cancels.clients).remove(&self.key.process_id);
        lock(&self.cancels.consoles).remove(&self.key.process_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Arc<CancelTarget> {
        Arc::new(CancelTarget::new("127.0.0.1", 1, 42, 7))
    }

    #[test]
    fn only_a_console_sessions_right_key_is_a_consoles() {
        let cancels = Cancels::new();
        let console = cancels.register_console();
        let client = cancels.register();
        let (c, k) = (console.key(), client.key());
        assert!(cancels.is_console(c.process_id, &c.secret_key.to_be_bytes()));
        let wrong = c.secret_key.wrapping_add(1).to_be_bytes();
        assert!(!cancels.is_console(c.process_id, &wrong));
        assert!(!cancels.is_console(k.process_id, &k.secret_key.to_be_bytes()));
        drop(console);
        assert!(!cancels.is_console(c.process_id, &c.secret_key.to_be_bytes()));
    }

    #[test]
    fn keys_are_unique_and_forgotten_when_the_client_leaves() {
        let cancels = Cancels::new();
        let a = cancels.register();
        let b = cancels.register();
        assert_ne!(a.key().process_id, b.key().process_id);
        assert_eq!(lock(&cancels.clients).len(), 2);
        drop(a);
        assert_eq!(lock(&cancels.clients).len(), 1);
    }

    #[test]
    fn only_the_right_key_reaches_a_held_backend_and_marks_it() {
        let cancels = Cancels::new();
        let reg = cancels.register();
        let key = reg.key();
        let secret = key.secret_key.to_be_bytes();
        assert!(
            cancels.attribute(key.process_id, &secret).is_none(),
            "holds nothing"
        );
        let t = target();
        lock(&reg.slot).target = Some(Arc::clone(&t));
        let wrong = key.secret_key.wrapping_add(1).to_be_bytes();
        assert!(cancels.attribute(key.process_id, &wrong).is_none());
        assert!(cancels.attribute(key.process_id, &secret[..3]).is_none());
        assert!(!t.was_sent());
        assert_eq!(
            cancels
                .attribute(key.process_id, &secret)
                .map(|t| t.process_id),
            Some(42)
        );
        assert!(t.was_sent(), "the backend is marked");
        reg.detach();
        assert!(
            cancels.attribute(key.process_id, &secret).is_none(),
            "let go: nothing to cancel"
        );
        // Queued: only the right key ends the wait, and only while it lasts.
        let queued = reg.queued();
        assert!(cancels.attribute(key.process_id, &wrong).is_none());
        assert!(!queued.wait.cancelled.load(Ordering::Acquire));
        assert!(cancels.attribute(key.process_id, &secret).is_none());
        assert!(queued.wait.cancelled.load(Ordering::Acquire));
        drop(queued);
        assert!(lock(&reg.slot).queued.is_none());
    }
}
