//! The operator's HTTP listener (`admin.http_listen`): `/metrics` (Prometheus text),
//! `/health` (the process is up) and `/ready` (listening, not draining, and every
//! configured database reachable: a backend of it is open, or its server accepts a TCP
//! connection; probed at most once a second). A few lines of HTTP/1.1, one request per
//! connection; connections that send nothing make way for new ones, so an idle flood
//! cannot keep a health check out.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::lock;
use crate::proxy::Shared;

/// A request head must arrive within this time and size (probes and scrapers send theirs
/// at once).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long `/ready` waits for a database's server to accept a connection.
const READY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a `/ready` answer that probed the databases stands for the next requests:
/// probes do not follow requests one for one (each makes the server fork a process).
const READY_KEPT: Duration = Duration::from_secs(1);

/// Connections open at once. Past this, the oldest still sending its request (or waiting
/// for a place to render `/metrics`) is closed for the newcomer: idle connections cannot
/// keep a probe out. If none is, the newcomer is closed (file descriptors are the proxy's
/// clients' and backends' too).
const MAX_OPEN: usize = 256;
/// `/metrics` renderings under way at once, each to its last byte written; more wait (a
/// stuck scraper cannot pile up work). `/health` and `/ready` do not wait for them.
const MAX_RENDERING: usize = 8;
/// A whole exchange, request to last byte written, must fit in this time.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the listener's connections share.
struct Server {
    shared: Arc<Shared>,
    /// Connections reading their request, oldest first (an id, to leave, and the task).
    reading: std::sync::Mutex<std::collections::VecDeque<(u64, tokio::task::AbortHandle)>>,
    /// Connections open (their tasks not ended).
    open: std::sync::atomic::AtomicUsize,
    rendering: tokio::sync::Semaphore,
    /// The last answer of `/ready`'s probes and when it was made; held while probing,
    /// so that requests meanwhile wait for its answer rather than probe again.
    ready: tokio::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let server = Arc::new(Server {
        shared,
        reading: Default::default(),
        open: Default::default(),
        rendering: tokio::sync::Semaphore::new(MAX_RENDERING),
        ready: Default::default(),
    });
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                if server.open.load(Ordering::Acquire) >= MAX_OPEN {
                    let oldest = lock(&server.reading).pop_front();
                    match oldest {
                        Some((_, task)) => task.abort(),
                        // (Every one is being answered: this one waits for none of them.)
                        None => continue,
                    }
                }
                next_id += 1;
                let id = next_id;
                let open = Open::count(&server);
                // (Registered before it can run to its end and leave the list.)
                let mut reading = lock(&server.reading);
                let task = tokio::spawn({
                    let server = Arc::clone(&server);
                    async move {
                        let _open = open;
                        let exchange = answer(stream, &server, id);
                        let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await;
                        server.done_reading(id);
                    }
                });
                reading.push_back((id, task.abort_handle()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One open connection, counted until its task ends (or is aborted).
struct Open(Arc<Server>);

impl Open {
    fn count(server: &Arc<Server>) -> Open {
        server.open.fetch_add(1, Ordering::AcqRel);
        Open(Arc::clone(server))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Server {
    /// The connection `id` has its request (or gave up): it can no longer be closed for
    /// a newcomer.
    fn done_reading(&self, id: u64) {
        let mut reading = lock(&self.reading);
        if let Some(at) = reading.iter().position(|(i, _)| *i == id) {
            reading.remove(at);
        }
    }
}

async fn answer(mut stream: TcpStream, server: &Server, id: u64) {
    let path = match tokio::time::timeout(REQUEST_TIMEOUT, read_path(&mut stream)).await {
        Ok(Ok(Some(path))) => path,
        _ => return,
    };
    let shared = &server.shared;
    // (Held to the last byte written: a scraper that does not read holds its place.)
    let mut _rendering = None;
    if path == "/metrics" {
        // Waiting for a place, it can still be closed for a newcomer (a flood of scrapes
        // that do not read cannot keep a probe out either).
        let Ok(permit) = server.rendering.acquire().await else {
            return;
        };
        _rendering = Some(permit);
    }
    server.done_reading(id);
    let (status, content_type, body) = match path.as_str() {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4",
            render_metrics(shared),
        ),
        "/health" => ("200 OK", "text/plain", "ok\n".to_owned()),
        "/ready" => match not_ready(server).await {
            None => ("200 OK", "text/plain", "ready\n".to_owned()),
            Some(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /health or /ready\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads a request head; returns the path of a GET (None for anything else).
async fn read_path(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
            return Ok(None);
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = std::str::from_utf8(line).unwrap_or_default().split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => {
            let path = target.split('?').next().unwrap_or_default();
            Ok(Some(path.to_owned()))
        }
        _ => Ok(None),
    }
}

fn render_metrics(shared: &Shared) -> String {
    shared
        .metrics
        .clients
        .open
        .set(shared.clients.open() as f64);
    for pool in shared.pools.all() {
        pool.refresh_gauges();
    }
    for cluster in shared.pools.clusters() {
        for host in cluster.status() {
            shared.metrics.set_host(&cluster.database, &host);
        }
    }
    shared.metrics.render()
}

/// Why pgshield is not ready to serve, if it is not.
async fn not_ready(server: &Server) -> Option<String> {
    let shared = &server.shared;
    if shared.shutdown.is_draining() {
        return Some("not ready: shutting down".into());
    }
    if shared.shutdown.is_listener_closed() {
        return Some("not ready: no longer accepting clients".into());
    }
    let mut kept = server.ready.lock().await;
    if let Some((at, why)) = &*kept {
        if at.elapsed() < READY_KEPT {
            return why.clone();
        }
    }
    let why = databases_not_ready(shared).await;
    *kept = Some((std::time::Instant::now(), why.clone()));
    why
}

/// Why a configured database is not reachable, if one is not.
async fn databases_not_ready(shared: &Shared) -> Option<String> {
    let pools = shared.pools.all();
    let live = shared.live();
    // Every host of every database without an open backend, probed at once (a probe has
    // a second or so: a silent host must not make the next one's answer late).
    let mut probes = tokio::task::JoinSet::new();
    let mut unknown: Vec<&String> = Vec::new();
    for (name, db) in &live.config.databases {
        let has_backend = pools
            .iter()
            .any(|p| p.database() == name && p.status().open > 0);
        if has_backend {
            continue;
        }
        unknown.push(name);
        for host in db.servers().unwrap_or_default() {
            let name = name.clone();
            probes.spawn(async move {
                let connect = crate::net::connect_server(&host.host, host.port);
                let outcome = match tokio::time::timeout(READY_CONNECT_TIMEOUT, connect).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("{} cannot be reached: {e}", host.addr())),
                    Err(_) => Err(format!(
                        "{} did not answer within {READY_CONNECT_TIMEOUT:?}",
                        host.addr()
                    )),
                };
                (name, outcome)
            });
        }
    }
    // Ready when any host of each answers (a failover may be under way).
    let mut why: std::collections::HashMap<String, String> = Default::default();
    while let Some(probe) = probes.join_next().await {
        let Ok((name, outcome)) = probe else { continue };
        match outcome {
            Ok(()) => {
                unknown.retain(|n| **n != name);
                why.remove(&name);
            }
            Err(e) if unknown.contains(&&name) => {
                why.insert(name, e);
            }
            Err(_) => {}
        }
        if unknown.is_empty() {
            return None;
        }
    }
    let name = unknown.first()?;
    let last = why.get(name.as_str()).cloned().unwrap_or_default();
    Some(format!("not ready: database {name}: {last}"))
}
