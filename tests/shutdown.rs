//! Graceful shutdown of the real `pgshield` binary: SIGTERM drains (idle clients leave
//! with 57P01, a transaction in flight may finish, the listener closes), the process exits
//! 0, and a second signal forces everyone out at once.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::sqlstate;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long the binary gets to start listening.
const READY_LIMIT: Duration = Duration::from_secs(10);
/// How long to wait for anything the proxy is supposed to do "now".
const PROMPTLY: Duration = Duration::from_secs(10);

/// The `pgshield` binary running as a subprocess with its own config file. Dropping it
/// kills the process (if still running), reaps it and removes its directory; if the test
/// is failing, the proxy's log is printed first.
struct Pgshield {
    child: Child,
    dir: PathBuf,
    port: u16,
    exited: Option<ExitStatus>,
}

impl Pgshield {
    /// Starts the binary in front of the harness cluster, with one user `role`, and waits
    /// until its port accepts connections.
    async fn start(role: &str, password: &str) -> Pgshield {
        Self::start_on(role, password, None, "").await
    }

    /// As `start`, on `port` if given, with `listen_extra` added to `[listen]`.
    async fn start_on(
        role: &str,
        password: &str,
        port: Option<u16>,
        listen_extra: &str,
    ) -> Pgshield {
        Self::start_with_http(role, password, port, listen_extra, 0).await
    }

    /// As `start_on`, with the HTTP listener on `http_port` (0: any free one).
    async fn start_with_http(
        role: &str,
        password: &str,
        port: Option<u16>,
        listen_extra: &str,
        http_port: u16,
    ) -> Pgshield {
        let dir = common::unique_temp_dir(role);
        let mut last_log = String::new();
        // A free port can be taken by someone else before the child binds it: retry.
        for _ in 0..3 {
            let port = port.unwrap_or_else(common::free_port);
            let config = format!(
                "[listen]\naddr = \"127.0.0.1:{port}\"\n{listen_extra}\n\
                 [pool]\nmode = \"session\"\nmax_size = 2\nshutdown_timeout = \"20s\"\n\n\
                 [databases.app]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\n\
                 [users.{role}]\npassword = \"{password}\"\n\
                 [admin]\nhttp_listen = \"127.0.0.1:{http_port}\"\n",
                common::cluster().port()
            );
            let config_path = dir.join("pgshield.toml");
            std::fs::write(&config_path, config).expect("write the config file");
            let log = std::fs::File::create(dir.join("pgshield.log")).expect("create the log");
            let mut command = Command::new(env!("CARGO_BIN_EXE_pgshield"));
            command
                .arg("run")
                .arg("--config")
                .arg(&config_path)
                .env_remove("PGSHIELD_CONFIG")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("PGSHIELD__") {
                    command.env_remove(name);
                }
            }
            let child = command.spawn().expect("start the pgshield binary");
            let mut proxy = Pgshield {
                child,
                dir: dir.clone(),
                port,
                exited: None,
            };
            if proxy.wait_listening().await {
                return proxy;
            }
            last_log = proxy.log();
            // Keep the directory for the next attempt: forget it before the drop.
            proxy.dir = PathBuf::new();
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("pgshield did not start listening within {READY_LIMIT:?}; its log:\n{last_log}");
    }

    /// Polls a TCP connect until the port accepts one; false if the process exited (e.g.
    /// the port was taken) or the limit passed.
    async fn wait_listening(&mut self) -> bool {
        let started = Instant::now();
        while started.elapsed() < READY_LIMIT {
            if self.try_exit().is_some() {
                return false;
            }
            let attempt = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
            )
            .await;
            if let Ok(Ok(stream)) = attempt {
                // Hang up at once: the session sees EOF and ends. No pause after it: the
                // signal handlers are installed before the port opens.
                drop(stream);
                return self.try_exit().is_none();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits in i32"))
    }

    /// Sends `signal` to the child (which must not have been reaped yet).
    fn signal(&mut self, signal: Signal) {
        assert!(
            self.try_exit().is_none(),
            "pgshield exited before {signal} could be sent: {:?}",
            self.exited
        );
        kill(self.pid(), signal).unwrap_or_else(|e| panic!("send {signal} to pgshield: {e}"));
    }

    /// The exit status, if the child has exited (reaping it).
    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("poll the child's status");
        }
        self.exited
    }

    /// Waits up to `limit` for the child to exit; panics if it does not.
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "pgshield still running {limit:?} after it was asked to stop"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// tokio-postgres settings for a client of this proxy (database `app`).
    fn config(&self, user: &str, password: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname("app");
        c.connect_timeout(Duration::from_secs(10));
        c
    }

    async fn connect(&self, user: &str, password: &str) -> common::Conn {
        tokio::time::timeout(PROMPTLY, common::connect(&self.config(user, password)))
            .await
            .expect("login through pgshield within 10 s")
            .expect("login through pgshield")
    }

    /// What the proxy wrote to stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgshield.log")).unwrap_or_default()
    }

    /// True once the port refuses connections (polled for up to `limit`).
    async fn refuses_connections(&self, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            let attempt = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(("127.0.0.1", self.port)),
            )
            .await;
            match attempt {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return true,
                // Accepted (or still in the backlog): hang up and look again.
                Ok(Ok(stream)) => drop(stream),
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl Drop for Pgshield {
    fn drop(&mut self) {
        if self.try_exit().is_none() {
            // Kill by PID: std refuses once the child has been reaped, so no reused PID
            // can be hit.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- pgshield log ----\n{}\n---- end ----", self.log());
        }
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits for a connection to end and returns the error that ended it.
async fn closed_with(conn: &mut common::Conn, who: &str) -> tokio_postgres::Error {
    match tokio::time::timeout(PROMPTLY, &mut conn.done).await {
        Ok(Ok(Err(e))) => e,
        Ok(Ok(Ok(()))) => panic!("{who}: the connection ended without an error"),
        Ok(Err(e)) => panic!("{who}: the connection task failed: {e}"),
        Err(_) => panic!("{who}: still connected {PROMPTLY:?} later"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_transaction_in_flight_finish_then_exits_0() {
    let (role, password) = ("shut_inflight", "pw-inflight");
    common::create_role(role, password).await;
    let mut proxy = Pgshield::start(role, password).await;

    let mut a = proxy.connect(role, password).await;
    a.client
        .batch_execute(
            "DROP TABLE IF EXISTS shut_inflight_rows; CREATE TABLE shut_inflight_rows (n int)",
        )
        .await
        .expect("A creates its table");
    a.client
        .batch_execute("BEGIN; INSERT INTO shut_inflight_rows VALUES (1)")
        .await
        .expect("A opens a transaction");
    let mut b = proxy.connect(role, password).await;
    b.client.simple_query("SELECT 1").await.expect("B works");

    proxy.signal(Signal::SIGTERM);
    let signalled = Instant::now();

    // The idle client is told and closed at once.
    let e = closed_with(&mut b, "idle client B").await;
    assert_eq!(sqlstate(&e), Some("57P01"), "B: {e}");
    assert!(
        b.client.simple_query("SELECT 1").await.is_err(),
        "B can no longer run queries"
    );

    // Nobody new gets in while the proxy drains.
    assert!(
        proxy.refuses_connections(Duration::from_secs(5)).await,
        "the port still accepts connections after SIGTERM"
    );

    // The transaction in flight may finish.
    a.client
        .batch_execute("INSERT INTO shut_inflight_rows VALUES (2)")
        .await
        .expect("A inserts again after SIGTERM, inside its transaction");
    a.client
        .batch_execute("COMMIT")
        .await
        .expect("A commits after SIGTERM");

    // Then A is between transactions: it is closed too.
    let e = closed_with(&mut a, "client A after its COMMIT").await;
    assert_eq!(sqlstate(&e), Some("57P01"), "A: {e}");

    let status = proxy.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(15),
        "took {:?}",
        signalled.elapsed()
    );

    let admin = common::admin().await;
    let rows: Vec<i32> = admin
        .query("SELECT n FROM shut_inflight_rows ORDER BY n", &[])
        .await
        .expect("read the rows directly")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, vec![1, 2], "both inserts were committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_no_clients_exits_0_promptly() {
    let (role, password) = ("shut_idle", "pw-idle");
    common::create_role(role, password).await;
    let mut proxy = Pgshield::start(role, password).await;

    let signalled = Instant::now();
    proxy.signal(Signal::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_forces_shutdown() {
    let (role, password) = ("shut_forced", "pw-forced");
    common::create_role(role, password).await;
    let mut proxy = Pgshield::start(role, password).await;

    let mut conn = proxy.connect(role, password).await;
    conn.client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("open a transaction");

    proxy.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        proxy.try_exit().is_none(),
        "pgshield must still be draining (its client is in a transaction), but exited: {:?}",
        proxy.exited
    );
    assert!(
        !conn.done.is_finished(),
        "the client in a transaction was closed by the first signal alone"
    );

    proxy.signal(Signal::SIGINT);
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "a forced shutdown took {:?} (shutdown_timeout is 20s)",
        signalled.elapsed()
    );

    let e = closed_with(&mut conn, "the client in a transaction").await;
    assert_eq!(sqlstate(&e), Some("57P01"), "{e}");
}

/// A forced shutdown cancels what its clients' backends are running before closing
/// them: PostgreSQL notices a closed connection only when it next writes, and would go on
/// with the statement, its locks and perhaps its commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_shutdown_cancels_running_statements() {
    let (role, password) = ("shut_running", "pw-running");
    common::create_role(role, password).await;
    let mut proxy = Pgshield::start(role, password).await;
    let conn = proxy.connect(role, password).await;
    let client = conn.client;
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    let admin = common::admin().await;
    let running = || async {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'",
                &[&role],
            )
            .await
            .expect("pg_stat_activity");
        row.get::<_, i64>(0)
    };
    let started = Instant::now();
    while running().await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the sleep never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal(Signal::SIGINT);
    let status = proxy.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    let exited = Instant::now();
    while running().await > 0 {
        assert!(
            exited.elapsed() < Duration::from_secs(5),
            "the statement still runs on the server after pgshield exited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = sleeping.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_as_soon_as_the_port_opens_drains_instead_of_killing() {
    let (role, password) = ("shut_early", "pw-early");
    common::create_role(role, password).await;
    for _ in 0..5 {
        let mut proxy = Pgshield::start(role, password).await;
        proxy.signal(Signal::SIGTERM);
        let status = proxy.wait_exit(Duration::from_secs(5)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "exit status {status:?} (killed by the signal?)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_logs_in_does_not_hold_up_shutdown() {
    let (role, password) = ("shut_silent", "pw-silent");
    common::create_role(role, password).await;
    let mut proxy = Pgshield::start(role, password).await;
    // Like a load balancer's health check: a TCP connection that says nothing.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port))
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = Instant::now();
    proxy.signal(Signal::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "a silent connection held shutdown for {:?} (shutdown_timeout is 20s)",
        signalled.elapsed()
    );
}

/// The status code of a GET /ready, or None if the connection failed.
async fn ready_code(addr: std::net::SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /ready HTTP/1.1\r\nHost: pgshield\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_on_one_port_drops_no_client() {
    common::create_role("sd_roll", "pw").await;
    let port = common::free_port();
    // Both processes on the same ports, the operator's HTTP listener's too.
    let http_port = common::free_port();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], http_port));
    let start = || {
        Pgshield::start_with_http(
            "sd_roll",
            "pw",
            Some(port),
            "reuse_port = true\n",
            http_port,
        )
    };
    let mut old = start().await;
    // A client of the old process keeps running transactions throughout.
    let conn = common::connect(&old.config("sd_roll", "pw"))
        .await
        .expect("login");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = tokio::spawn({
        let stop = std::sync::Arc::clone(&stop);
        async move {
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                conn.client
                    .simple_query("BEGIN; SELECT 1; COMMIT")
                    .await
                    .map_err(|e| format!("transaction {done}: {e}"))?;
                done += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<_, String>((conn, done))
        }
    });
    // The new process binds the same port; the old one is told to hand over.
    let new = start().await;
    old.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The old process lets the HTTP port go too: soon every probe is the new one's,
    // ready (one caught in the old listener's queue as it closed may be reset).
    let mut ready_in_a_row = 0;
    for _ in 0..100 {
        ready_in_a_row = match ready_code(http).await {
            Some(200) => ready_in_a_row + 1,
            _ => 0,
        };
        if ready_in_a_row == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready_in_a_row, 10, "the new process answers every probe");
    // New clients are served (by the new process) while the old one still serves its own.
    for i in 0..20 {
        let c = common::connect(&new.config("sd_roll", "pw"))
            .await
            .unwrap_or_else(|e| panic!("new client {i}: {e}"));
        c.client.simple_query("SELECT 1").await.expect("served");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (conn, done) = looping
        .await
        .expect("no panic")
        .unwrap_or_else(|e| panic!("the old process's client saw an error: {e}"));
    assert!(done > 10, "the client kept working ({done} transactions)");
    // Its last client gone, the old process exits 0.
    drop(conn);
    let status = old.wait_exit(PROMPTLY).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    drop(new);
}
