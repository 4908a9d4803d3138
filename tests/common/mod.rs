//! Shared harness for the integration tests: one real PostgreSQL per test binary (started
//! by `pgshield::devdb`, `max_connections = 20`, scram-sha-256), proxies started in-process
//! on free ports, and small helpers for raw protocol bytes.
//!
//! Tests isolate themselves by role: each creates its own login role, so its pool and
//! its rows in `pg_stat_activity` are its own even while other tests run.

#![allow(dead_code)] // each test binary uses a part of this

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use pgshield::devdb::{DevDb, DevDbOptions};
use pgshield::proxy::Shared;
use pgshield::shutdown::Shutdown;
use pgshield::{Config, Proxy};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};

static CLUSTER: OnceLock<DevDb> = OnceLock::new();

/// A relay in front of the harness cluster that notes how each connection opens (the
/// request code of its first packet: 80877103 SSLRequest, 80877102 CancelRequest, 196608
/// a startup message) and passes on only those `pass` lets through.
pub struct Relay {
    pub port: u16,
    openings: Arc<std::sync::Mutex<Vec<i32>>>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(pass: fn(i32) -> bool) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let upstream = cluster().port();
        let openings = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::clone(&openings);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut head = [0u8; 8];
                    if client.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let code = i32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                    seen.lock().unwrap_or_else(|p| p.into_inner()).push(code);
                    if !pass(code) {
                        return;
                    }
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    raw::send(&mut server, &head).await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Relay {
            port,
            openings,
            task,
        }
    }

    /// `[databases.app]` on this relay.
    pub fn database(&self) -> String {
        format!(
            "[databases.app]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n",
            self.port
        )
    }

    pub fn openings(&self) -> Vec<i32> {
        self.openings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The test binary's PostgreSQL, started on first use and stopped when the process ends.
pub fn cluster() -> &'static DevDb {
    CLUSTER.get_or_init(|| {
        raise_fd_limit();
        let (cert, key) = pki().issue("127.0.0.1");
        DevDb::start(&DevDbOptions {
            max_connections: 20,
            // TLS on, with a certificate from the test CA, for backend TLS tests; plaintext
            // stays allowed.
            settings: vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), "server.crt".into()),
                ("ssl_key_file".into(), "server.key".into()),
            ],
            files: vec![
                ("server.crt".into(), cert.into_bytes()),
                ("server.key".into(), key.into_bytes()),
            ],
            // Roles whose names say how the server checks them, for backend auth tests.
            hba: vec![
                "host all be_md5 127.0.0.1/32 md5".into(),
                "host all be_md5hash 127.0.0.1/32 md5".into(),
                "host all af_md5 127.0.0.1/32 md5".into(),
                "host all be_password 127.0.0.1/32 password".into(),
                "host all be_trust 127.0.0.1/32 trust".into(),
            ],
        })
        .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL: {e}"))
    })
}

/// A certificate authority made for this test process.
pub struct TestPki {
    pub ca_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

static PKI: OnceLock<TestPki> = OnceLock::new();

pub fn pki() -> &'static TestPki {
    PKI.get_or_init(|| TestPki::new("pgshield test CA"))
}

impl TestPki {
    pub fn new(name: &str) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_cert = params.self_signed(&ca_key).expect("CA certificate");
        TestPki {
            ca_pem: ca_cert.pem(),
            ca_cert,
            ca_key,
        }
    }

    /// A certificate and key (PEM) for `name` (a host name or an IP address).
    pub fn issue(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec![name.to_owned()]).expect("certificate params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}

pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// A port nobody listens on right now.
///
/// Never the same port twice in one test binary: the system may hand a port just freed to
/// the next `bind(0)`, and two tests running side by side would then start their servers
/// on one port (one of them, with `listen.reuse_port`, sharing it with the other).
/// A port nothing listens on, kept so while the returned socket lives: bound, never
/// listening, so connections to it are refused, and no other test's listener (which the
/// system may give any port it has just freed) can take it meanwhile.
pub fn refusing_port() -> (socket2::Socket, u16) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a TCP socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("an address");
    socket.bind(&any.into()).expect("bind 127.0.0.1:0");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("a bound address")
        .port();
    (socket, port)
}

pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0 to find a free port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A fresh, empty directory under the system temp dir; the caller removes it.
pub fn unique_temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pgshield-test-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// tokio-postgres settings for a direct connection to the cluster.
pub fn direct_config(user: &str, password: &str) -> tokio_postgres::Config {
    let db = cluster();
    let mut c = tokio_postgres::Config::new();
    c.host(db.host())
        .port(db.port())
        .user(user)
        .password(password)
        .dbname("postgres");
    c.connect_timeout(Duration::from_secs(10));
    c
}

/// A superuser connection straight to the cluster (for setup and for watching).
pub async fn admin() -> Client {
    let db = cluster();
    connect(&direct_config(db.superuser(), db.password()))
        .await
        .expect("superuser connects directly")
        .client
}

/// Creates (or recreates) a login role with a password.
pub async fn create_role(name: &str, password: &str) {
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            // The lock serialises concurrent GRANTs on the same schema.
            "BEGIN; SELECT pg_advisory_xact_lock(4242); \
             DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN PASSWORD '{password}'; \
             GRANT CREATE ON SCHEMA public TO {name}; COMMIT;"
        ))
        .await
        .expect("create role");
}

/// Creates (or recreates) a login role whose password is stored as an md5 hash.
pub async fn create_md5_role(name: &str, password: &str) {
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(4242); SET LOCAL password_encryption = 'md5'; \
             DROP ROLE IF EXISTS {name}; CREATE ROLE {name} LOGIN PASSWORD '{password}'; COMMIT;"
        ))
        .await
        .expect("create md5 role");
}

/// Backends of `role` in `pg_stat_activity`.
pub async fn backends_of(admin: &Client, role: &str) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Waits (up to `within`) until the server process `pid` has left `pg_stat_activity`;
/// whether it did.
pub async fn backend_gone(admin: &Client, pid: i32, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if left == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A client connection plus what its server sent unasked (notices, notifications).
pub struct Conn {
    pub client: Client,
    pub messages: mpsc::UnboundedReceiver<AsyncMessage>,
    /// Resolves when the connection ends, with the error that ended it.
    pub done: JoinHandle<Result<(), tokio_postgres::Error>>,
}

pub async fn connect(config: &tokio_postgres::Config) -> Result<Conn, tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let (tx, messages) = mpsc::unbounded_channel();
    let done = tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = stream.next().await {
            let _ = tx.send(message?);
        }
        Ok(())
    });
    Ok(Conn {
        client,
        messages,
        done,
    })
}

/// A backend process stopped (SIGSTOP) until this is dropped: a server that stopped
/// answering without closing its socket, as a frozen host or a network that drops packets
/// looks. Resumed even if the test fails, so the shared cluster is not left stuck.
pub struct Frozen(nix::unistd::Pid);

impl Frozen {
    pub fn new(pid: i32) -> Frozen {
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop the backend");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.as_db_error().map(|d| d.code().code())
}

/// A pgshield running inside the test process on a free port, fronting the cluster as
/// database `app`. Dropping it shuts it down.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The admin HTTP listener (/metrics, /health, /ready), on a free port.
    pub http: Option<SocketAddr>,
    /// `listen.read_only_addr`, if the test's configuration asked for one.
    pub read_only: Option<SocketAddr>,
    pub shutdown: Shutdown,
    pub shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
    /// The configuration file RELOAD reads (written at start, see `rewrite_config`).
    config_dir: std::path::PathBuf,
}

impl TestProxy {
    /// Starts a proxy; `sections` is TOML for `[pool]`, `[users.*]` and the like (a
    /// `[listen]` table in it gets the free-port address added).
    pub async fn start(sections: &str) -> TestProxy {
        Self::start_toml(Self::toml(sections)).await
    }

    /// Starts a proxy for servers of the test's own: `databases` is the `[databases.*]`
    /// TOML (no `[databases.app]` on the shared cluster is added).
    pub async fn start_with_databases(databases: &str, sections: &str) -> TestProxy {
        Self::start_toml(Self::toml_with(databases, sections)).await
    }

    async fn start_toml(toml: String) -> TestProxy {
        let config =
            Config::from_toml(&toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        let proxy = Proxy::bind(config).await.expect("proxy binds");
        let config_dir = unique_temp_dir("proxy-config");
        std::fs::write(config_dir.join("pgshield.toml"), &toml).expect("write the config");
        proxy
            .shared()
            .reload_from(Some(config_dir.join("pgshield.toml")));
        let addr = proxy.local_addr();
        let http = proxy.http_addr();
        let read_only = proxy.read_only_addr();
        let shutdown = proxy.shutdown_handle();
        let shared = Arc::clone(proxy.shared());
        let task = tokio::spawn(proxy.run());
        TestProxy {
            addr,
            http,
            read_only,
            shutdown,
            shared,
            task: Some(task),
            config_dir,
        }
    }

    /// Replaces the configuration file with one made from `sections` as `start` makes
    /// it (the next RELOAD reads it).
    pub fn rewrite_config(&self, sections: &str) {
        std::fs::write(self.config_dir.join("pgshield.toml"), Self::toml(sections))
            .expect("write the config");
    }

    /// Writes `text` as the configuration file, unchecked.
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(self.config_dir.join("pgshield.toml"), text).expect("write the config");
    }

    /// The whole configuration `start` runs with.
    fn toml(sections: &str) -> String {
        let db = cluster();
        let app = format!(
            "[databases.app]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n",
            db.port()
        );
        Self::toml_with(&app, sections)
    }

    /// `databases` and `sections`, with a free listen port and an HTTP listener added.
    pub fn toml_with(databases: &str, sections: &str) -> String {
        let listen = "[listen]\naddr = \"127.0.0.1:0\"\n";
        let sections = if sections.contains("[listen]\n") {
            sections.replace("[listen]\n", listen)
        } else {
            format!("{listen}\n{sections}")
        };
        let sections = if sections.contains("[admin]\n") {
            sections
        } else {
            format!("{sections}\n[admin]\nhttp_listen = \"127.0.0.1:0\"\n")
        };
        format!("{databases}\n{sections}")
    }

    /// tokio-postgres settings for a client of this proxy.
    pub fn config(&self, user: &str, password: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(self.addr.ip().to_string())
            .port(self.addr.port())
            .user(user)
            .password(password)
            .dbname("app");
        c.connect_timeout(Duration::from_secs(30));
        c
    }

    pub async fn connect(&self, user: &str, password: &str) -> Result<Conn, tokio_postgres::Error> {
        connect(&self.config(user, password)).await
    }

    /// Waits (up to `within`) for the proxy to finish on its own; true if it did.
    pub async fn exits_within(mut self, within: Duration) -> bool {
        match self.task.take() {
            Some(task) => tokio::time::timeout(within, task).await.is_ok(),
            None => true,
        }
    }

    /// Starts a graceful shutdown and waits for the proxy to finish.
    pub async fn stop(mut self) {
        self.shutdown.begin();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.force();
        let _ = std::fs::remove_dir_all(&self.config_dir);
    }
}

/// Raw protocol helpers, for what a well-behaved driver would never send.
pub mod raw {
    use super::*;

    /// A StartupMessage for protocol 3.0 with the given parameters.
    pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = (3i32 << 16).to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        packet
    }

    /// A simple Query message.
    pub fn query(sql: &str) -> Vec<u8> {
        query_bytes(sql.as_bytes())
    }

    /// A simple Query message of text in any encoding.
    pub fn query_bytes(sql: &[u8]) -> Vec<u8> {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        msg.extend_from_slice(sql);
        msg.push(0);
        msg
    }

    /// Terminate.
    pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
    /// Sync.
    pub const SYNC: [u8; 5] = [b'S', 0, 0, 0, 4];
    /// CopyDone.
    pub const COPY_DONE: [u8; 5] = [b'c', 0, 0, 0, 4];

    /// A tagged message with the given body.
    pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut msg = vec![tag];
        msg.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        msg.extend_from_slice(body);
        msg
    }

    /// Parse (unnamed statement, no parameter types), Bind (unnamed portal, no
    /// parameters), Execute (all rows): the extended protocol's run of one statement.
    pub fn parse_bind_execute(sql: &str) -> Vec<u8> {
        let mut parse = vec![0];
        parse.extend_from_slice(sql.as_bytes());
        parse.extend_from_slice(&[0, 0, 0]);
        let mut bytes = message(b'P', &parse);
        bytes.extend(message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
        bytes.extend(message(b'E', &[0, 0, 0, 0, 0]));
        bytes
    }

    /// Reads messages up to and including the next ReadyForQuery; returns their tags and
    /// the SQLSTATEs of any errors.
    pub async fn until_ready<S: AsyncRead + Unpin>(stream: &mut S) -> (String, Vec<String>) {
        let (mut tags, mut codes) = (String::new(), Vec::new());
        loop {
            let (tag, body) = read_message(stream)
                .await
                .expect("the connection stays open");
            tags.push(char::from(tag));
            if tag == b'E' {
                codes.push(error_code(&body));
            }
            if tag == b'Z' {
                return (tags, codes);
            }
        }
    }

    /// Logs in as a trust user and reads up to the first ReadyForQuery.
    pub async fn login_trusted(addr: SocketAddr, user: &str) -> TcpStream {
        let mut s = connect(addr).await;
        send(&mut s, &startup(&[("user", user), ("database", "app")])).await;
        loop {
            match read_message(&mut s).await {
                Some((b'Z', _)) => return s,
                Some((b'E', body)) => panic!("login refused: {}", String::from_utf8_lossy(&body)),
                Some(_) => continue,
                None => panic!("closed during login"),
            }
        }
    }

    /// An untagged packet: length, then a request code, then `rest`.
    pub fn request(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut packet = ((rest.len() + 8) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&code.to_be_bytes());
        packet.extend_from_slice(rest);
        packet
    }

    pub async fn connect(addr: SocketAddr) -> TcpStream {
        TcpStream::connect(addr).await.expect("raw connect")
    }

    pub async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
        stream.write_all(bytes).await.expect("raw send");
        stream.flush().await.expect("raw flush");
    }

    /// Reads one tagged message; `None` when the proxy closed the connection.
    pub async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut header))
            .await
            .expect("the proxy answers within 10 s")
            .ok()?;
        let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await.ok()?;
        Some((header[0], body))
    }

    /// The SQLSTATE (`C` field) of an ErrorResponse body.
    pub fn error_code(body: &[u8]) -> String {
        let mut fields = body.split(|&b| b == 0);
        fields
            .find_map(|f| f.strip_prefix(b"C"))
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .unwrap_or_default()
    }

    /// True once the proxy has closed the connection (reads EOF within 10 s).
    pub async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// GETs `path` from pgshield's HTTP listener; returns the status line's code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: pgshield\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .expect("an answer within 10 s")
        .expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (code, body.to_owned())
}
