//! The session loop: relays protocol messages between one client and the backend it holds.
//!
//! It is server-driven: one `poll` waits on the client socket, the backend socket and both
//! pending writes at once, so replies flow as the server produces them (Flush works,
//! pipelines of any depth work, and neither side can deadlock the other by filling a
//! socket buffer). Messages are framed but not decoded, except the few whose content
//! matters (ReadyForQuery, ParameterStatus, ErrorResponse); everything else, however
//! large, streams through in pieces.
//!
//! When the client holds a backend is the pool mode's business. In session mode it
//! borrows on its first message that needs the database and keeps the backend until it
//! leaves; then the backend is reset (ROLLBACK if needed, DISCARD ALL) and returned, or
//! closed if it was left mid-reply.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;

use super::cancel::Registration;
use super::handshake::Login;
use super::params::{self, ClientSettings};
use super::ClientId;
use crate::net::Stream;
use crate::pool::{Backend, Pool};
use crate::protocol::frame::{peek_header, DEFAULT_MAX_MESSAGE_SIZE, HEADER_LEN};
use crate::protocol::{messages, sqlstate, ErrorResponse};
use crate::proxy::Shared;
use crate::server::state::TxStatus;
use crate::server::{parse_parameter_status, ServerError, ServerParams};

/// Stop reading from one side while this much is waiting to be written to the other.
const HIGH_WATER: usize = 256 * 1024;
/// Read at least this much at a time.
const READ_CHUNK: usize = 16 * 1024;
/// While queued for a backend, read at most this much ahead from the client.
const QUEUED_READ_LIMIT: usize = 1024 * 1024;
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
    Shutdown,
    ForcedShutdown,
}

/// What happened on the sockets.
enum Event {
    /// Bytes arrived from the client, the backend, or both.
    Data,
    ClientEof,
    ClientError(io::Error),
    ServerEof,
    ServerError(io::Error),
}

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

pub struct Session {
    shared: Arc<Shared>,
    id: ClientId,
    client: Stream,
    pool: Arc<Pool>,
    settings: ClientSettings,
    /// The client's cancel key; points at the backend it holds.
    cancel: Registration,
    /// The ParameterStatus values the client has been told.
    client_view: ServerParams,
    backend: Option<Backend>,
    /// Bytes from the client not yet processed.
    client_in: BytesMut,
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
    last_activity: Instant,
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        id: ClientId,
        client: Stream,
        login: Login,
        leftover: BytesMut,
    ) -> Session {
        Session {
            shared,
            id,
            client,
            pool: login.pool,
            settings: login.settings,
            cancel: login.cancel,
            client_view: login.client_view,
            backend: None,
            client_in: leftover,
            client_out: BytesMut::new(),
            server_out: BytesMut::new(),
            client_msg: Passing::default(),
            server_msg: Passing::default(),
            skip_until_sync: false,
            server_sent_fatal: false,
            last_activity: Instant::now(),
        }
    }

    pub async fn run(mut self) {
        let end = self.relay().await;
        self.finish(end).await;
    }

    async fn relay(&mut self) -> End {
        let mut idle_timeout =
            Some(self.shared.config.pool.idle_client_timeout).filter(|t| !t.is_zero());
        let idle_timer = tokio::time::sleep(idle_timeout.unwrap_or(Duration::MAX / 4));
        tokio::pin!(idle_timer);
        let shutdown = self.shared.shutdown.clone();
        loop {
            if let Err(end) = self.process_client_input().await {
                return end;
            }
            if let Err(end) = self.process_server_input() {
                return end;
            }
            let quiet = self.is_quiet();
            let between_transactions = quiet && self.outside_transaction();
            let event = tokio::select! {
                biased;
                _ = shutdown.forced() => return End::ForcedShutdown,
                _ = shutdown.draining(), if between_transactions => return End::Shutdown,
                _ = &mut idle_timer, if idle_timeout.is_some() => {
                    let timeout = idle_timeout.unwrap_or_default();
                    let server_busy = self.server_busy();
                    if !server_busy && self.last_activity.elapsed() >= timeout {
                        return End::IdleTimeout;
                    }
                    // Idle: no bytes either way while the server is not working for us.
                    let since = if server_busy { Instant::now() } else { self.last_activity };
                    match since.checked_add(timeout) {
                        Some(deadline) => idle_timer.as_mut().reset(deadline.into()),
                        None => idle_timeout = None,
                    }
                    continue;
                }
                event = poll_fn(|cx| self.poll_io(cx, true)) => event,
            };
            match event {
                Event::Data => self.last_activity = Instant::now(),
                Event::ClientEof => return End::ClientGone,
                Event::ClientError(e) => {
                    tracing::debug!(client = %self.id, error = %e, "client i/o error");
                    return End::ClientGone;
                }
                Event::ServerEof => return End::ServerLost(None),
                Event::ServerError(e) => return End::ServerLost(Some(e)),
            }
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
        self.client_msg.left == 0
            && (!self.server_out.is_empty()
                || self.server_msg.left > 0
                || server.replies.awaiting_ready())
    }

    /// The client is not inside a transaction block.
    fn outside_transaction(&self) -> bool {
        self.backend
            .as_ref()
            .is_none_or(|b| b.server_ref().replies.tx_status() == TxStatus::Idle)
    }

    /// Writes what is pending on both sides, then reads from whichever side has data.
    fn poll_io(&mut self, cx: &mut Context<'_>, read_client: bool) -> Poll<Event> {
        if let Poll::Ready(Err(e)) = poll_drain(cx, &mut self.client, &mut self.client_out) {
            return Poll::Ready(Event::ClientError(e));
        }
        if let Some(backend) = self.backend.as_mut() {
            if let Poll::Ready(Err(e)) =
                poll_drain(cx, &mut backend.server().stream, &mut self.server_out)
            {
                return Poll::Ready(Event::ServerError(e));
            }
        }
        // Poll both reads every time, so a busy side cannot starve the other.
        let mut data = false;
        if read_client && self.server_out.len() < HIGH_WATER {
            reserve_for_read(&mut self.client_in);
            match poll_read_buf(Pin::new(&mut self.client), cx, &mut self.client_in) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Event::ClientEof),
                Poll::Ready(Ok(_)) => data = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Event::ClientError(e)),
                Poll::Pending => {}
            }
        }
        if let Some(backend) = self.backend.as_mut() {
            if self.client_out.len() < HIGH_WATER {
                let server = backend.server();
                reserve_for_read(&mut server.read_buf);
                match poll_read_buf(Pin::new(&mut server.stream), cx, &mut server.read_buf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Event::ServerEof),
                    Poll::Ready(Ok(_)) => data = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::ServerError(e)),
                    Poll::Pending => {}
                }
            }
        }
        if data {
            Poll::Ready(Event::Data)
        } else {
            Poll::Pending
        }
    }

    /// Frames what the client sent and passes it to the backend, borrowing one first if
    /// needed.
    async fn process_client_input(&mut self) -> Result<(), End> {
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
            // Every client message streams through: PostgreSQL enforces its own limits.
            let header = match peek_header(&self.client_in) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e) => return Err(End::ClientProtocol(e.to_string())),
            };
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
                    messages::ready_for_query(&mut self.client_out, b'I');
                }
                self.client_msg = Passing {
                    left: header.len,
                    forward: false,
                };
                continue;
            }
            if self.backend.is_none() {
                // PostgreSQL ignores COPY messages outside COPY; so do we, without a backend.
                if matches!(header.tag, b'd' | b'c' | b'f') {
                    self.client_msg = Passing {
                        left: header.len,
                        forward: false,
                    };
                    continue;
                }
                if let Err(error) = self.acquire_backend().await? {
                    self.refuse(header.tag, error);
                    self.client_msg = Passing {
                        left: header.len,
                        forward: false,
                    };
                    continue;
                }
            }
            if let Some(backend) = self.backend.as_mut() {
                backend.server().replies.sent(header.tag);
            }
            self.client_msg = Passing {
                left: header.len,
                forward: true,
            };
        }
    }

    /// Answers a message that could not get a backend, as PostgreSQL answers a failed one.
    fn refuse(&mut self, tag: u8, error: ErrorResponse) {
        error.encode(&mut self.client_out);
        match tag {
            b'Q' | b'F' | b'S' => messages::ready_for_query(&mut self.client_out, b'I'),
            _ => self.skip_until_sync = true,
        }
    }

    /// Frames what the backend sent and passes it to the client, noting what matters.
    fn process_server_input(&mut self) -> Result<(), End> {
        let Some(backend) = self.backend.as_mut() else {
            return Ok(());
        };
        let server = backend.server();
        loop {
            if self.server_msg.left > 0 {
                if !self
                    .server_msg
                    .pass(&mut server.read_buf, &mut self.client_out)
                {
                    return Ok(());
                }
                continue;
            }
            let header = match peek_header(&server.read_buf) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(e) => {
                    server.mark_broken();
                    return Err(End::ServerProtocol(e.to_string()));
                }
            };
            if !matches!(header.tag, b'Z' | b'S' | b'E') {
                // Rows, COPY data and the rest stream through: only the tag matters.
                if server.replies.received(header.tag, None).is_err() {
                    server.mark_broken();
                    return Err(End::ServerProtocol(out_of_step(header.tag)));
                }
                self.server_msg = Passing {
                    left: header.len,
                    forward: true,
                };
                continue;
            }
            if let Err(e) = header.check_size(DEFAULT_MAX_MESSAGE_SIZE) {
                server.mark_broken();
                return Err(End::ServerProtocol(e.to_string()));
            }
            if server.read_buf.len() < header.len {
                let missing = header.len - server.read_buf.len();
                server.read_buf.reserve(missing);
                return Ok(());
            }
            // Pass it on, then look at the copy (the backend's buffer is free again).
            let start = self.client_out.len();
            self.client_out
                .extend_from_slice(&server.read_buf[..header.len]);
            server.read_buf.advance(header.len);
            let body = &self.client_out[start + HEADER_LEN..];
            if server
                .replies
                .received(header.tag, body.first().copied())
                .is_err()
            {
                server.mark_broken();
                return Err(End::ServerProtocol(out_of_step(header.tag)));
            }
            match header.tag {
                b'S' => {
                    if let Some((name, value)) = parse_parameter_status(body) {
                        self.client_view.set(name, value);
                        server.note_param(name, value);
                    }
                }
                b'E' if ErrorResponse::parse(body).is_some_and(|e| e.severity.is_fatal()) => {
                    server.mark_broken();
                    self.server_sent_fatal = true;
                }
                _ => {}
            }
        }
    }

    /// Borrows a backend for this client, watching the client while it waits, and brings
    /// the backend's settings in line with the client's. `Ok(Err(_))`: the client gets
    /// that error and stays connected. A client that hangs up while queued leaves the queue
    /// and its statements are not run: it gave up on them (and may retry elsewhere).
    async fn acquire_backend(&mut self) -> Result<Result<(), ErrorResponse>, End> {
        let shutdown = self.shared.shutdown.clone();
        if shutdown.is_draining() {
            return Err(End::Shutdown);
        }
        let pool = Arc::clone(&self.pool);
        let borrow = pool.borrow();
        tokio::pin!(borrow);
        let mut backend = loop {
            let read_ahead = self.client_in.len() < QUEUED_READ_LIMIT;
            tokio::select! {
                biased;
                _ = shutdown.forced() => return Err(End::ForcedShutdown),
                result = &mut borrow => match result {
                    Ok(backend) => break backend,
                    Err(crate::pool::BorrowError::Closed(_)) => return Err(End::Shutdown),
                    Err(e) => {
                        tracing::info!(client = %self.id, pool = %pool.name(), error = %e, "borrow failed");
                        return Ok(Err(e.to_client_error()));
                    }
                },
                event = poll_fn(|cx| self.poll_io(cx, read_ahead)) => match event {
                    Event::Data => self.last_activity = Instant::now(),
                    _ => return Err(End::ClientGone),
                },
            }
        };
        match self.apply_settings(&mut backend).await {
            Ok(()) => {
                self.cancel.attach(backend.server_ref());
                self.backend = Some(backend);
                Ok(Ok(()))
            }
            Err(SettingsError::Refused(error)) => {
                backend.release();
                Err(End::Fatal(error.into_fatal()))
            }
            Err(SettingsError::Server(e)) => {
                backend.discard();
                Ok(Err(e.to_client_error(pool.name())))
            }
        }
    }

    /// Applies the client's settings the backend lacks, in one round trip whose replies the
    /// client never sees; passes on the ParameterStatus changes it has not seen.
    async fn apply_settings(&mut self, backend: &mut Backend) -> Result<(), SettingsError> {
        let server = backend.server();
        let missing: Vec<(String, String)> = self
            .settings
            .missing_on(server)
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let Some(sql) =
            params::apply_statement(missing.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        else {
            return Ok(());
        };
        let reply =
            match tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, server.run_internal(&sql)).await {
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

    /// Ends the session: returns or closes the backend, then says goodbye to the client.
    async fn finish(mut self, end: End) {
        let farewell = self.farewell(&end);
        match &end {
            End::ServerLost(e) => {
                tracing::warn!(client = %self.id, pool = %self.pool.name(), error = ?e, "server connection lost")
            }
            End::ServerProtocol(m) => {
                tracing::warn!(client = %self.id, pool = %self.pool.name(), m, "server protocol error")
            }
            End::ClientProtocol(m) => tracing::info!(client = %self.id, m, "client protocol error"),
            other => tracing::debug!(client = %self.id, reason = ?other, "session ended"),
        }
        // Release before the last write: a slow client must not hold a backend.
        let mid_message_to_client = self.server_msg.left > 0;
        // From here no cancel reaches the backend; one sent before has marked it.
        self.cancel.detach();
        if let Some(mut backend) = self.backend.take() {
            let mid_message_to_server = self.client_msg.forward && self.client_msg.left > 0;
            let server_failed = matches!(
                end,
                End::ForcedShutdown | End::ServerLost(_) | End::ServerProtocol(_)
            );
            if server_failed || mid_message_to_server || mid_message_to_client {
                if mid_message_to_server || !self.server_out.is_empty() {
                    // The server may hold part of a message: a Terminate now would be read
                    // as the rest of it. Just close.
                    backend.server().skip_terminate();
                }
                backend.discard();
            } else if self.server_out.is_empty() && backend.server_ref().replies.at_boundary() {
                return_backend(backend).await;
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
                let _ = self.client.write_all(&self.client_out).await;
                let _ = self.client.shutdown().await;
            })
            .await;
        }
    }

    fn farewell(&self, end: &End) -> Option<ErrorResponse> {
        match end {
            End::Terminated | End::ClientGone => None,
            End::ClientProtocol(m) => Some(ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, m.clone())),
            End::ServerLost(_) if self.server_sent_fatal => None,
            End::ServerLost(_) | End::ServerProtocol(_) => Some(ErrorResponse::fatal(
                sqlstate::CONNECTION_FAILURE,
                format!(
                    "pgshield lost the connection to the server of pool {}; the session cannot continue",
                    self.pool.name()
                ),
            )),
            End::Fatal(e) => Some(e.clone()),
            End::IdleTimeout => Some(ErrorResponse::fatal(
                sqlstate::IDLE_SESSION_TIMEOUT,
                format!(
                    "terminating connection: idle for more than {} (pool.idle_client_timeout)",
                    humantime::format_duration(self.shared.config.pool.idle_client_timeout)
                ),
            )),
            End::Shutdown | End::ForcedShutdown => Some(ErrorResponse::fatal(sqlstate::ADMIN_SHUTDOWN, "pgshield is shutting down")),
        }
    }
}

enum SettingsError {
    /// The server refused a setting the client asked for (as PostgreSQL would at login).
    Refused(ErrorResponse),
    Server(ServerError),
}

/// Resets a backend the client left at a boundary and returns it; closes it otherwise.
async fn return_backend(mut backend: Backend) {
    let server = backend.server();
    let unfit = !server.replies.at_boundary() || !server.read_buf.is_empty() || server.is_broken();
    // A cancel sent to it may still land: never reuse it (not even for our reset).
    if unfit || server.cancel_was_sent() {
        backend.discard();
        return;
    }
    match tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, server.reset()).await {
        Ok(Ok(())) => backend.release(),
        Ok(Err(e)) => {
            tracing::debug!(server = %server.id(), error = %e, "reset failed; closing backend");
            backend.discard();
        }
        Err(_) => backend.discard(),
    }
}

/// The client left with work queued or running: deliver what it sent, as PostgreSQL would
/// have received it, then Terminate and close (nobody is left to read the replies).
async fn hand_over_and_close(mut backend: Backend, mut pending: BytesMut) {
    use tokio::io::AsyncWriteExt;
    pending.extend_from_slice(&[b'X', 0, 0, 0, 4]);
    let server = backend.server();
    server.mark_broken();
    // Sent with the rest, or (on a timeout) perhaps cut mid-message: no second Terminate.
    server.skip_terminate();
    let _ = tokio::time::timeout(INTERNAL_QUERY_TIMEOUT, server.stream.write_all(&pending)).await;
    backend.discard();
}

fn out_of_step(tag: u8) -> String {
    format!(
        "the server sent a '{}' message that nothing the client sent asked for",
        char::from(tag)
    )
}

/// Makes sure a read has room to land.
fn reserve_for_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Writes as much of `buf` as the socket takes now; flushes once it is all written.
fn poll_drain(
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
    Pin::new(stream).poll_flush(cx)
}
