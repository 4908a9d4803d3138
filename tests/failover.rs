//! Several hosts per database on a real primary and a real streaming replica (made with
//! pg_basebackup): read-only routing and a host that goes down and comes back, pools
//! sized from the server's max_connections, then a failover (the primary stopped at
//! once, as a crash; the replica promoted) under 200 clients.
//!
//! The failover ends the primary, so the phases run in order in one test, on this
//! file's own pair of servers.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{sqlstate, Conn, TestProxy};
use pgshield::devdb::{DevDb, DevDbOptions};

/// The rows of an admin console command, as text.
async fn show(console: &tokio_postgres::Client, command: &str) -> Vec<Vec<String>> {
    console
        .simple_query(command)
        .await
        .expect(command)
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The body of an HTTP GET.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: pgshield\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// A database error's message, or the error itself.
fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map_or_else(|| e.to_string(), |d| d.message().to_owned())
}

fn superuser(db: &DevDb) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(db.host())
        .port(db.port())
        .user(db.superuser())
        .password(db.password())
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    c
}

async fn direct(db: &DevDb) -> Conn {
    common::connect(&superuser(db))
        .await
        .expect("superuser connects directly")
}

async fn in_recovery(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await?
        .get(0))
}

/// Retries `check` every 100 ms until it returns true, or panics after `within`.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < within {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within {within:?}: {what}");
}

fn hosts_toml(primary: &DevDb, replica: &DevDb, extra: &str) -> String {
    format!(
        "[databases.app]\nhosts = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\ndbname = \"postgres\"\n{extra}\n",
        primary.port(),
        replica.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_read_only_routing_and_sizing_on_a_real_replica() {
    common::raise_fd_limit();
    let (mut primary, mut replica) = tokio::task::block_in_place(|| {
        let primary = DevDb::start(&DevDbOptions {
            max_connections: 40,
            // Commits wait for the replica once it is synchronous (set below), so a
            // commit the client saw succeed survives the primary's crash.
            settings: vec![("synchronous_commit".into(), "on".into())],
            ..DevDbOptions::default()
        })
        .expect("start the primary");
        let replica = primary.replica().expect("start a streaming replica");
        (primary, replica)
    });
    {
        let admin = direct(&primary).await;
        admin
            .client
            .batch_execute(
                "CREATE ROLE fo LOGIN PASSWORD 'pw'; CREATE ROLE fo2 LOGIN PASSWORD 'pw'; \
                 CREATE TABLE fo_writes (client int, seq int, PRIMARY KEY (client, seq)); \
                 GRANT ALL ON fo_writes TO fo;",
            )
            .await
            .expect("set up roles and table");
        let replica_admin = direct(&replica).await;
        assert!(in_recovery(&replica_admin.client).await.unwrap());
        eventually(
            "the replica streams and has the roles",
            Duration::from_secs(30),
            || async {
                replica_admin
                    .client
                    .query_one("SELECT count(*) FROM pg_roles WHERE rolname = 'fo2'", &[])
                    .await
                    .is_ok_and(|r| r.get::<_, i64>(0) == 1)
            },
        )
        .await;
    }

    read_only_routing_and_a_host_that_comes_back(&primary, &mut replica).await;
    sizing_from_max_connections(&primary).await;
    failover(&mut primary, &replica).await;
}

async fn read_only_routing_and_a_host_that_comes_back(primary: &DevDb, replica: &mut DevDb) {
    let pool = "[pool]\nmax_size = 4\nborrow_timeout = \"10s\"\nhealth_check_interval = \"200ms\"\nhealth_check_timeout = \"1s\"\n[users.fo]\npassword = \"pw\"\n";
    let solo = format!(
        "[databases.solo]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n",
        primary.port()
    );
    let falls_back = TestProxy::start_with_databases(
        &format!("{}{solo}", hosts_toml(primary, replica, "max_replica_lag = \"1s\"")),
        &format!("{pool}[listen]\nread_only_addr = \"127.0.0.1:0\"\n[read_only]\nfallback_to_primary = true\n[admin]\nusers = [\"fo\"]\nhttp_listen = \"127.0.0.1:0\"\n"),
    )
    .await;
    let strict = TestProxy::start_with_databases(
        &hosts_toml(primary, replica, ""),
        &pool.replace("borrow_timeout = \"10s\"", "borrow_timeout = \"1s\""),
    )
    .await;
    // A refused server login is the client's error at once, not after trying every host
    // until borrow_timeout (30 s here): another host would refuse it the same way.
    let refused = TestProxy::start_with_databases(
        &hosts_toml(primary, replica, ""),
        "[pool]\nborrow_timeout = \"30s\"\n[users.fo]\npassword = \"pw\"\nserver_password = \"wrong\"\n",
    )
    .await;
    let started = Instant::now();
    let e = refused
        .connect("fo", "pw")
        .await
        .err()
        .expect("the server refuses pgshield's login");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused after {:?}: {}",
        started.elapsed(),
        message(&e)
    );
    refused.stop().await;
    // Fixed roles: writers on `primary`, read-only clients on `replicas`, no detection.
    let fixed = TestProxy::start_with_databases(
        &format!(
            "[databases.app]\nprimary = \"127.0.0.1:{}\"\nreplicas = [\"127.0.0.1:{}\"]\ndbname = \"postgres\"\n",
            primary.port(),
            replica.port()
        ),
        pool,
    )
    .await;
    let fixed_writer = fixed.connect("fo", "pw").await.expect("writer login");
    let mut fixed_ro = fixed.config("fo", "pw");
    fixed_ro.dbname("app_ro");
    let fixed_reader = common::connect(&fixed_ro).await.expect("read-only login");
    assert!(!in_recovery(&fixed_writer.client).await.expect("write side"));
    assert!(in_recovery(&fixed_reader.client).await.expect("read side"));
    fixed.stop().await;
    let ro_config = |proxy: &TestProxy| {
        let mut c = proxy.config("fo", "pw");
        c.dbname("app_ro");
        c
    };
    let writer = falls_back.connect("fo", "pw").await.expect("writer login");
    eventually(
        "writers are on the primary",
        Duration::from_secs(10),
        || async { in_recovery(&writer.client).await.is_ok_and(|r| !r) },
    )
    .await;
    let reader = common::connect(&ro_config(&falls_back))
        .await
        .expect("read-only login");
    let strict_reader = common::connect(&ro_config(&strict))
        .await
        .expect("read-only login");
    // The read-only listener: database app is served as app_ro.
    let ro_addr = falls_back.read_only.expect("read-only listener");
    let mut listener_config = tokio_postgres::Config::new();
    listener_config
        .host(ro_addr.ip().to_string())
        .port(ro_addr.port())
        .user("fo")
        .password("pw")
        .dbname("app");
    let listener_reader = common::connect(&listener_config)
        .await
        .expect("login through the read-only listener");
    for r in [&reader, &strict_reader, &listener_reader] {
        assert!(
            in_recovery(&r.client).await.expect("read"),
            "app_ro and the read-only listener read from the replica"
        );
    }
    let no_replicas = common::connect(listener_config.clone().dbname("solo"))
        .await
        .err()
        .expect("a database without replicas is refused on the read-only listener");
    assert_eq!(sqlstate(&no_replicas), Some("3D000"), "{no_replicas}");
    let refused = reader
        .client
        .batch_execute("CREATE TABLE ro_write (x int)")
        .await
        .expect_err("the replica refuses writes");
    assert_eq!(sqlstate(&refused), Some("25006"), "{refused}");

    // The replica goes away: marked down and skipped; the reader that may fall back
    // reads from the primary, on the same client connection.
    tokio::task::block_in_place(|| replica.stop_immediately()).expect("stop the replica");
    eventually(
        "reads fall back to the primary",
        Duration::from_secs(15),
        || async { in_recovery(&reader.client).await.is_ok_and(|r| !r) },
    )
    .await;
    assert!(!reader.client.is_closed());
    // Without fallback, a read waits borrow_timeout for a replica, then fails clearly;
    // the connection stays usable.
    let mut strict_error = None;
    for _ in 0..3 {
        let started = Instant::now();
        match in_recovery(&strict_reader.client).await {
            Err(e) if message(&e).contains("no replica") => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "{:?}",
                    started.elapsed()
                );
                strict_error = Some(e);
                break;
            }
            // The first read may meet the backend the replica's end cut (08006).
            Err(e) => {
                eprintln!("strict read: {}", message(&e));
                assert_eq!(sqlstate(&e), Some("08006"), "{e}")
            }
            Ok(r) => panic!("a read without fallback was served (in recovery: {r})"),
        }
    }
    let e = strict_error.expect("a clear error without fallback");
    assert_eq!(sqlstate(&e), Some("08006"), "{e}");
    assert!(!strict_reader.client.is_closed());
    let servers = falls_back
        .shared
        .pools
        .clusters()
        .into_iter()
        .flat_map(|c| c.status())
        .find(|h| h.port == replica.port())
        .expect("the replica is listed");
    assert!(!servers.up, "the stopped replica is marked down");
    // The console and the metrics say so too.
    let mut console = falls_back.config("fo", "pw");
    console.dbname("pgshield");
    let console = common::connect(&console).await.expect("admin login");
    let rows = show(&console.client, "SHOW HOSTS").await;
    let row = |port: u16| {
        rows.iter()
            .find(|r| r[2] == port.to_string())
            .unwrap_or_else(|| panic!("SHOW HOSTS lists port {port}: {rows:?}"))
            .clone()
    };
    let p = row(primary.port());
    assert_eq!(
        (&p[0][..], &p[3][..], &p[4][..], &p[5][..]),
        ("app", "auto", "primary", "up"),
        "{p:?}"
    );
    let r = row(replica.port());
    assert_eq!(&r[5], "down", "{r:?}");
    // SHOW SERVERS names the host a lent read-only backend is on (the primary, now).
    reader.client.batch_execute("BEGIN").await.unwrap();
    let servers = show(&console.client, "SHOW SERVERS").await;
    let lent = servers
        .iter()
        .find(|r| r[2] == "app_ro" && r[3] == "active")
        .unwrap_or_else(|| panic!("a lent app_ro backend in SHOW SERVERS: {servers:?}"));
    assert_eq!(lent[5], primary.port().to_string(), "{lent:?}");
    reader.client.batch_execute("ROLLBACK").await.unwrap();
    // The console's commands take the read-only database SHOW POOLS lists.
    for command in ["RECONNECT app_ro", "PAUSE app_ro", "RESUME app_ro"] {
        let done = console.client.simple_query(command);
        tokio::time::timeout(Duration::from_secs(10), done)
            .await
            .unwrap_or_else(|_| panic!("{command} in time"))
            .unwrap_or_else(|e| panic!("{command}: {e:?}"));
    }
    let err = console.client.simple_query("PAUSE nope_ro").await.err();
    assert_eq!(
        err.as_ref().and_then(|e| e.code()).map(|c| c.code()),
        Some("3D000")
    );
    reader
        .client
        .simple_query("SELECT 1")
        .await
        .expect("after RESUME");
    let metrics = http_get(falls_back.http.expect("http listener"), "/metrics").await;
    for (series, want) in [
        (
            format!(
                "pgshield_host_up{{database=\"app\",host=\"127.0.0.1:{}\"}} 0",
                replica.port()
            ),
            true,
        ),
        (
            format!(
                "pgshield_host_primary{{database=\"app\",host=\"127.0.0.1:{}\"}} 1",
                primary.port()
            ),
            true,
        ),
    ] {
        assert_eq!(
            metrics.lines().any(|l| l == series),
            want,
            "{series} in\n{metrics}"
        );
    }

    // It comes back: used again, by both, without anything being restarted.
    tokio::task::block_in_place(|| replica.start_again()).expect("restart the replica");
    for r in [&reader, &strict_reader] {
        eventually(
            "reads go back to the replica",
            Duration::from_secs(90),
            || async { in_recovery(&r.client).await.unwrap_or(false) },
        )
        .await;
    }
    assert!(in_recovery(&writer.client).await.is_ok_and(|r| !r));

    // A replica whose replay lags more than max_replica_lag (1 s) is skipped; it is used
    // again once it catches up.
    let replica_admin = direct(replica).await;
    let primary_admin = direct(primary).await;
    replica_admin
        .client
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();
    // Reads leave the replica while the primary goes on writing.
    let seq = std::cell::Cell::new(0);
    let skipped = |what: &'static str, within: u64| {
        eventually(what, Duration::from_secs(within), || {
            seq.set(seq.get() + 1);
            let (primary_admin, reader, n) = (&primary_admin, &reader, seq.get());
            async move {
                primary_admin
                    .client
                    .batch_execute(&format!("INSERT INTO fo_writes VALUES (-1, {n})"))
                    .await
                    .unwrap();
                in_recovery(&reader.client).await.is_ok_and(|r| !r)
            }
        })
    };
    skipped("a lagging replica is skipped", 20).await;
    replica_admin
        .client
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    eventually(
        "a replica that caught up serves again",
        Duration::from_secs(20),
        || async { in_recovery(&reader.client).await.unwrap_or(false) },
    )
    .await;
    // One whose WAL receiver has stopped (its primary gone, or cut off from it) keeps the
    // position it last received, replayed long since: how old its last replayed
    // transaction is counts then, and it is skipped once that passes max_replica_lag;
    // streaming again, it serves again.
    let conninfo: String = replica_admin
        .client
        .query_one("SHOW primary_conninfo", &[])
        .await
        .unwrap()
        .get(0);
    for sql in [
        "ALTER SYSTEM SET primary_conninfo = ''",
        "SELECT pg_reload_conf()",
    ] {
        replica_admin.client.batch_execute(sql).await.unwrap();
    }
    skipped("a replica no longer streaming is skipped", 30).await;
    let restore = format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    );
    for sql in [restore.as_str(), "SELECT pg_reload_conf()"] {
        replica_admin.client.batch_execute(sql).await.unwrap();
    }
    eventually(
        "a replica streaming again serves again",
        Duration::from_secs(30),
        || async { in_recovery(&reader.client).await.unwrap_or(false) },
    )
    .await;
    falls_back.stop().await;
    strict.stop().await;
}

async fn sizing_from_max_connections(primary: &DevDb) {
    // max_connections 40, superuser_reserved_connections 3, no reserve: 50 % is 18.
    let proxy = TestProxy::start_with_databases(
        &format!(
            "[databases.app]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\nmax_connections_percent = 50\nmax_idle_percent = 20\n",
            primary.port()
        ),
        "[pool]\nmax_size = 5\nborrow_timeout = \"60s\"\n[users.fo]\npassword = \"pw\"\n[users.fo2]\npassword = \"pw\"\n[admin]\nusers = [\"fo\"]\nhttp_listen = \"127.0.0.1:0\"\n",
    )
    .await;
    let watcher = direct(primary).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let mut tasks = Vec::new();
    for (i, user) in ["fo", "fo2"].into_iter().enumerate() {
        for _ in 0..25 {
            let conn = proxy.connect(user, "pw").await.expect("login");
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done[i]));
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    conn.client
                        .batch_execute("SELECT pg_sleep(0.02)")
                        .await
                        .expect("a query under the sized limit");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    let started = Instant::now();
    let mut most = 0;
    while started.elapsed() < Duration::from_secs(4) {
        most = most.max(pool_backends(&watcher).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (a, b) = (
        done[0].load(Ordering::Relaxed),
        done[1].load(Ordering::Relaxed),
    );
    eprintln!("sizing: at most {most} backends open (limit 18); fo ran {a} queries, fo2 {b}");
    assert!(most <= 18, "{most} backends open; 50 % of (40 - 3) is 18");
    // pool.max_size (5) does not bind: each pool may grow to the database's size.
    assert!(
        most >= 12,
        "the computed limit is used ({most} open at most)"
    );
    assert!(
        a.min(b) * 3 >= a.max(b),
        "both pools make progress: fo {a}, fo2 {b}"
    );
    // SHOW DATABASES gives the sizes in force: 18 for the database and each pool.
    let mut console = proxy.config("fo", "pw");
    console.dbname("pgshield");
    let console = common::connect(&console).await.expect("admin login");
    let databases = show(&console.client, "SHOW DATABASES").await;
    let app = databases
        .iter()
        .find(|r| r[0] == "app")
        .expect("app in SHOW DATABASES");
    assert_eq!((&app[5][..], &app[9][..]), ("18", "18"), "{app:?}");
    // Idle now: max_idle_percent (20 % of 37 is 7) closes the surplus.
    eventually(
        "idle backends come down to 7",
        Duration::from_secs(10),
        || async { pool_backends(&watcher).await <= 7 },
    )
    .await;
    proxy.stop().await;
}

/// Backends of the sizing test's pools (pgshield's own health checks aside).
async fn pool_backends(watcher: &Conn) -> i64 {
    watcher
        .client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('fo', 'fo2') \
             AND application_name NOT LIKE 'pgshield %'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// What one looping client saw.
#[derive(Default)]
struct Seen {
    committed: Vec<(i32, i32)>,
    /// Writes whose COMMIT failed: their outcome is unknown to the client.
    in_doubt: Vec<(i32, i32)>,
    errors: Vec<String>,
    longest: Duration,
    committed_after_promote: u64,
}

async fn failover(primary: &mut DevDb, replica: &DevDb) {
    let admin = direct(primary).await;
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
    ] {
        admin.client.batch_execute(sql).await.unwrap();
    }
    eventually(
        "the replica is synchronous",
        Duration::from_secs(30),
        || async {
            admin
                .client
                .query_one(
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        },
    )
    .await;
    let proxy = TestProxy::start_with_databases(
        &hosts_toml(primary, replica, ""),
        "[pool]\nmax_size = 10\nborrow_timeout = \"60s\"\nhealth_check_interval = \"500ms\"\nhealth_check_timeout = \"1s\"\n[users.fo]\npassword = \"pw\"\n",
    )
    .await;

    const BUSY: i32 = 180;
    const IDLE: i32 = 20;
    const DIRECT: i32 = 10;
    let stop = Arc::new(AtomicBool::new(false));
    let promoted_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let mut busy = Vec::new();
    for id in 0..BUSY {
        let conn = proxy.connect("fo", "pw").await.expect("login");
        busy.push(spawn_writer(id, conn, &stop, &promoted_at));
    }
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let conn = proxy.connect("fo", "pw").await.expect("login");
        conn.client
            .batch_execute("SELECT 1")
            .await
            .expect("idle client's first query");
        idle.push(conn);
    }
    let mut direct_clients = Vec::new();
    for id in 0..DIRECT {
        let mut c = superuser(primary);
        c.user("fo").password("pw");
        let conn = common::connect(&c).await.expect("direct login");
        direct_clients.push(spawn_writer(1000 + id, conn, &stop, &promoted_at));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The primary crashes (an immediate shutdown); the replica is promoted.
    let killed = Instant::now();
    tokio::task::block_in_place(|| primary.stop_immediately()).expect("stop the primary");
    let promoting = Instant::now();
    tokio::task::block_in_place(|| replica.promote()).expect("promote the replica");
    let promote_took = promoting.elapsed();
    *promoted_at.lock().unwrap() = Some(Instant::now());
    let down_for = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);

    let mut seen = Vec::new();
    for t in busy {
        seen.push(t.await.unwrap());
    }
    let mut direct_seen = Vec::new();
    for t in direct_clients {
        direct_seen.push(t.await.unwrap());
    }
    for conn in &idle {
        assert!(
            !conn.client.is_closed(),
            "an idle client's connection survived"
        );
        conn.client
            .batch_execute("SELECT 1")
            .await
            .expect("an idle client carries on after the failover");
    }

    // Every committed write is on the new primary, once; nothing else is but writes
    // whose COMMIT was cut (in doubt).
    let new_primary = direct(replica).await;
    let rows: HashSet<(i32, i32)> = new_primary
        .client
        .query(
            "SELECT client, seq FROM fo_writes WHERE client BETWEEN 0 AND 999",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let committed: HashSet<(i32, i32)> = seen.iter().flat_map(|s| s.committed.clone()).collect();
    let in_doubt: HashSet<(i32, i32)> = seen.iter().flat_map(|s| s.in_doubt.clone()).collect();
    let lost: Vec<_> = committed.difference(&rows).collect();
    assert!(lost.is_empty(), "committed writes lost: {lost:?}");
    let unexplained: Vec<_> = rows
        .iter()
        .filter(|r| !committed.contains(r) && !in_doubt.contains(r))
        .collect();
    assert!(
        unexplained.is_empty(),
        "writes nobody committed: {unexplained:?}"
    );

    let errors: Vec<&String> = seen.iter().flat_map(|s| &s.errors).collect();
    let longest = seen.iter().map(|s| s.longest).max().unwrap_or_default();
    let direct_errors: usize = direct_seen.iter().map(|s| s.errors.len()).sum();
    let direct_after: u64 = direct_seen.iter().map(|s| s.committed_after_promote).sum();
    eprintln!(
        "failover: {} busy clients committed {} writes ({} in doubt, {} errors: {:?}); \
         longest client-visible transaction {:?}; primary down to promoted {:?} \
         (pg_ctl promote itself {:?}); direct clients to the old address: {} errors, \
         {} commits after the promotion",
        BUSY,
        committed.len(),
        in_doubt.len(),
        errors.len(),
        errors.iter().take(3).collect::<Vec<_>>(),
        longest,
        down_for,
        promote_took,
        direct_errors,
        direct_after
    );
    for (id, s) in seen.iter().enumerate() {
        assert!(
            s.committed_after_promote > 0,
            "client {id} committed after the promotion, on its same connection"
        );
    }
    // Only transactions under way at the crash fail: at most one per backend lent then
    // (and one more for a backend whose end had not been seen yet).
    assert!(errors.len() <= 20, "{} errors: {errors:?}", errors.len());
    assert!(errors.iter().all(|e| e.contains("08006")), "{errors:?}");
    assert_eq!(direct_after, 0, "direct clients cannot follow the failover");
    assert!(direct_errors >= DIRECT as usize);

    // The old primary comes back as it was, out of recovery (split brain): writers stay
    // on the new primary, and the old one gets no write.
    tokio::task::block_in_place(|| primary.start_again()).expect("the old primary restarts");
    let old = direct(primary).await;
    assert!(!in_recovery(&old.client).await.unwrap());
    let writer = proxy.connect("fo", "pw").await.expect("login");
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(3) {
        i += 1;
        writer
            .client
            .batch_execute(&format!("INSERT INTO fo_writes VALUES (-2, {i})"))
            .await
            .expect("a write after the old primary came back");
        let port: i32 = writer
            .client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            port,
            i32::from(replica.port()),
            "writers stay on the new primary"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let on_old: i64 = old
        .client
        .query_one("SELECT count(*) FROM fo_writes WHERE client = -2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(on_old, 0, "the old primary got no write");
    proxy.stop().await;
}

/// A client that writes `(id, seq)` rows in short transactions until `stop`.
fn spawn_writer(
    id: i32,
    conn: Conn,
    stop: &Arc<AtomicBool>,
    promoted_at: &Arc<Mutex<Option<Instant>>>,
) -> tokio::task::JoinHandle<Seen> {
    let (stop, promoted_at) = (Arc::clone(stop), Arc::clone(promoted_at));
    tokio::spawn(async move {
        let mut seen = Seen::default();
        let mut seq = 0;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let started = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(70),
                conn.client.batch_execute(&format!(
                    "BEGIN; INSERT INTO fo_writes VALUES ({id}, {seq}); COMMIT"
                )),
            )
            .await;
            seen.longest = seen.longest.max(started.elapsed());
            match result {
                Ok(Ok(())) => {
                    seen.committed.push((id, seq));
                    if promoted_at.lock().unwrap().is_some_and(|at| started >= at) {
                        seen.committed_after_promote += 1;
                    }
                }
                Ok(Err(e)) => {
                    seen.in_doubt.push((id, seq));
                    seen.errors
                        .push(format!("{} {}", sqlstate(&e).unwrap_or("-"), message(&e)));
                    if conn.client.is_closed() {
                        // A direct client: its server is gone and so is its connection.
                        while !stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        break;
                    }
                }
                Err(_) => seen.errors.push("no answer within 70 s".into()),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen
    })
}
