//! The pool: clients queue for a bounded number of backends, time out with 53300 and can
//! retry, backends are opened at start (`min_idle`), closed when idle or old, and clients
//! are limited and timed out.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{backends_of, raw, sqlstate, TestProxy};

async fn proxy(role: &str, pool: &str) -> TestProxy {
    common::create_role(role, "pw").await;
    TestProxy::start(&format!(
        "[pool]\nmode = \"session\"\n{pool}\n[users.{role}]\npassword = \"pw\"\n"
    ))
    .await
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_waits_for_the_only_backend_then_proceeds() {
    let proxy = proxy("pool_wait", "max_size = 1\nborrow_timeout = \"30s\"\n").await;
    let first = proxy.connect("pool_wait", "pw").await.expect("login");
    let first_pid: i32 = first
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    // Logging in needs no backend; the first query waits for one.
    let second = proxy
        .connect("pool_wait", "pw")
        .await
        .expect("login while the pool is busy");
    let waiting = tokio::spawn(async move {
        let pid: i32 = second
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        Ok::<_, tokio_postgres::Error>(pid)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the second client must wait while the first holds the backend"
    );
    assert_eq!(
        proxy
            .shared
            .pools
            .get("app", "pool_wait")
            .unwrap()
            .status()
            .waiting,
        1
    );

    drop(first);
    let second_pid = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("proceeds once the backend is free")
        .unwrap()
        .expect("query succeeds");
    assert_eq!(second_pid, first_pid, "it got the same (only) backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn borrow_times_out_with_53300_and_the_client_can_retry() {
    let proxy = proxy("pool_timeout", "max_size = 1\nborrow_timeout = \"1s\"\n").await;
    let holder = proxy.connect("pool_timeout", "pw").await.expect("login");
    holder.client.simple_query("SELECT 1").await.unwrap();

    let waiter = proxy.connect("pool_timeout", "pw").await.expect("login");
    let started = Instant::now();
    let err = waiter
        .client
        .simple_query("SELECT 1")
        .await
        .expect_err("times out");
    let waited = started.elapsed();
    assert_eq!(sqlstate(&err), Some("53300"), "{err}");
    let message = err.as_db_error().unwrap().message();
    assert!(
        message.contains("app/pool_timeout") && message.contains("1s"),
        "{message}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );

    // The extended protocol gets the same error, and the connection stays in step.
    let err = waiter
        .client
        .query("SELECT $1::int", &[&1i32])
        .await
        .expect_err("times out");
    assert_eq!(sqlstate(&err), Some("53300"));

    drop(holder);
    let one: i32 = tokio::time::timeout(
        Duration::from_secs(10),
        waiter.client.query_one("SELECT 1", &[]),
    )
    .await
    .expect("retry answered")
    .expect("retry on the same connection succeeds")
    .get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn min_idle_backends_are_opened_at_start_and_kept() {
    let proxy = proxy(
        "pool_min",
        "max_size = 4\nmin_idle = 2\nserver_idle_timeout = \"1s\"\n",
    )
    .await;
    let admin = common::admin().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            backends_of(&admin, "pool_min").await == 2
        })
        .await,
        "two backends open before any client"
    );
    // Idle timeouts never take the pool below min_idle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(backends_of(&admin, "pool_min").await, 2);
    // PAUSE keeps none open, min_idle's included, until RESUME.
    let pool = proxy.shared.pools.get("app", "pool_min").expect("the pool");
    pool.pause().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        backends_of(&admin, "pool_min").await,
        0,
        "opened while paused"
    );
    pool.resume();
    assert!(
        eventually(Duration::from_secs(10), || async {
            backends_of(&admin, "pool_min").await == 2
        })
        .await,
        "min_idle again after RESUME"
    );
    drop(proxy);
}

#[tokio::test]
async fn idle_backends_are_closed_after_server_idle_timeout() {
    let proxy = proxy("pool_idle", "max_size = 3\nserver_idle_timeout = \"1s\"\n").await;
    let admin = common::admin().await;
    let clients =
        futures_util::future::join_all((0..3).map(|_| proxy.connect("pool_idle", "pw"))).await;
    for c in &clients {
        c.as_ref()
            .expect("login")
            .client
            .simple_query("SELECT 1")
            .await
            .unwrap();
    }
    assert_eq!(backends_of(&admin, "pool_idle").await, 3);
    drop(clients);
    assert!(
        eventually(Duration::from_secs(10), || async {
            backends_of(&admin, "pool_idle").await == 0
        })
        .await,
        "idle backends closed"
    );
}

/// Listens on a port of its own and relays each connection to PostgreSQL, counting the
/// connections it accepted.
async fn counting_relay() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let to = common::cluster().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (port, accepted)
}

/// While the janitor opens backends up to `min_idle`, those open already are lent: it
/// used to hold each until the last had opened, so a slow connection (a server forking
/// under load, a TLS handshake far away) kept every client waiting although a backend
/// sat idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_open_already_are_lent_while_the_janitor_opens_more() {
    common::create_role("pool_fill", "pw").await;
    // A relay that passes the first connection and holds the later ones, unanswered.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let to = common::cluster().port();
    let relay = tokio::spawn(async move {
        let mut stalled = Vec::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            if count.fetch_add(1, Ordering::SeqCst) > 0 {
                stalled.push(inbound);
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    let proxy = TestProxy::start_with_databases(
        &format!("[databases.app]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\n"),
        "[pool]\nmax_size = 2\nmin_idle = 2\nserver_connect_timeout = \"60s\"\n\
         [tls.server]\nmode = \"disable\"\n[users.pool_fill]\npassword = \"pw\"\n",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            accepted.load(Ordering::SeqCst) >= 2
        })
        .await,
        "the janitor opens the first backend and waits on the second"
    );
    let served = tokio::time::timeout(Duration::from_secs(10), async {
        let conn = proxy.connect("pool_fill", "pw").await.expect("login");
        conn.client
            .simple_query("SELECT 1")
            .await
            .expect("SELECT 1");
    })
    .await;
    assert!(
        served.is_ok(),
        "the open backend was held while the janitor waited on the other"
    );
    relay.abort();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_an_expired_idle_backend_opens_one_connection() {
    common::create_role("pool_reopen", "pw").await;
    let (port, accepted) = counting_relay().await;
    let proxy = TestProxy::start_with_databases(
        &format!("[databases.app]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\n"),
        "[pool]\nmax_size = 2\nserver_lifetime = \"100ms\"\n[users.pool_reopen]\npassword = \"pw\"\n",
    )
    .await;
    let conn = proxy.connect("pool_reopen", "pw").await.expect("login");
    conn.client.simple_query("SELECT 1").await.unwrap();
    // Each time the idle backend is past its lifetime (unless the janitor closed it
    // first): one new connection replaces it. A borrow that tried to lend at once and
    // gave up when it would wait had started a connection of its own, for nothing.
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let before = accepted.load(Ordering::SeqCst);
        conn.client.simple_query("SELECT 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let opened = accepted.load(Ordering::SeqCst) - before;
        assert_eq!(opened, 1, "round {round}: connections opened");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_backend_past_server_lifetime_is_closed_instead_of_reused() {
    let proxy = proxy("pool_life", "max_size = 1\nserver_lifetime = \"1s\"\n").await;
    let first = proxy.connect("pool_life", "pw").await.expect("login");
    let old: i32 = first
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = proxy.connect("pool_life", "pw").await.expect("login");
    let new: i32 = second
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(new, old, "an expired backend is not lent again");
}

#[tokio::test]
async fn max_client_connections_refuses_the_next_client_with_53300() {
    common::create_role("pool_maxcl", "pw").await;
    let proxy = TestProxy::start(
        "[listen]\nmax_client_connections = 2\n[pool]\nmax_size = 1\n[users.pool_maxcl]\npassword = \"pw\"\n",
    )
    .await;
    let a = proxy.connect("pool_maxcl", "pw").await.expect("first");
    let b = proxy.connect("pool_maxcl", "pw").await.expect("second");
    let err = proxy
        .connect("pool_maxcl", "pw")
        .await
        .err()
        .expect("third is refused");
    assert_eq!(sqlstate(&err), Some("53300"), "{err}");
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "sorry, too many clients already"
    );
    drop(a);
    // The slot frees when a client leaves.
    let mut admitted = false;
    for _ in 0..50 {
        if proxy.connect("pool_maxcl", "pw").await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "a client is admitted once another left");
    drop(b);
}

/// Connections over the client limit hold nothing for long, however many come: as many
/// as the limit (at least 16) are read for their startup packet, for a few seconds, to
/// be told 53300; any more are closed unread.
#[tokio::test]
async fn a_flood_of_connections_over_the_client_limit_is_bounded() {
    common::create_role("pool_flood", "pw").await;
    let proxy = TestProxy::start(
        "[listen]\nmax_client_connections = 1\n[users.pool_flood]\npassword = \"pw\"\n",
    )
    .await;
    let _in = proxy.connect("pool_flood", "pw").await.expect("first");
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(raw::connect(proxy.addr).await);
    }
    // (The accept loop has taken them all once a 17th is answered.)
    let mut over = raw::connect(proxy.addr).await;
    let started = Instant::now();
    assert!(raw::closed(&mut over).await, "the 17th is closed");
    assert!(started.elapsed() < Duration::from_secs(2), "at once");
    // The 16 are closed within REFUSAL_TIMEOUT (5 s), not client_login_timeout (60 s).
    for s in &mut silent {
        assert!(raw::closed(s).await, "closed in time");
    }
    assert!(started.elapsed() < Duration::from_secs(9));
    let err = proxy.connect("pool_flood", "pw").await.err().expect("over");
    assert_eq!(sqlstate(&err), Some("53300"), "{err}");
}

#[tokio::test]
async fn a_client_idle_past_idle_client_timeout_is_closed_with_57p05() {
    let proxy = proxy(
        "pool_idlecl",
        "max_size = 1\nidle_client_timeout = \"1s\"\n",
    )
    .await;
    let admin = common::admin().await;
    let conn = proxy.connect("pool_idlecl", "pw").await.expect("login");
    conn.client.simple_query("SELECT 1").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn.done)
        .await
        .expect("closed within 10 s")
        .unwrap();
    let err = ended.expect_err("the proxy ended the connection with an error");
    assert_eq!(sqlstate(&err), Some("57P05"), "{err}");
    // Its backend went back to the pool (reset), ready for others.
    assert_eq!(backends_of(&admin, "pool_idlecl").await, 1);
    let next = proxy.connect("pool_idlecl", "pw").await.expect("login");
    next.client
        .simple_query("SELECT 1")
        .await
        .expect("the backend is reusable");
}

#[tokio::test]
async fn an_unreachable_server_refuses_the_first_login_with_08006() {
    common::create_role("pool_down", "pw").await;
    let (_kept, port) = common::refusing_port(); // nothing listens there
    let config = pgshield::Config::from_toml(&format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[admin]\nhttp_listen = \"\"\n\
         [pool]\nserver_connect_timeout = \"2s\"\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {port}\n[users.pool_down]\npassword = \"pw\"\n"
    ))
    .unwrap();
    let proxy = pgshield::Proxy::bind(config).await.unwrap();
    let addr = proxy.local_addr();
    let shutdown = proxy.shutdown_handle();
    tokio::spawn(proxy.run());
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(addr.port())
        .user("pool_down")
        .password("pw")
        .dbname("app");
    // The login needs the server's parameters, so it is refused with 08006.
    let err = common::connect(&config).await.err().expect("refused");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("app/pool_down"));
    shutdown.force();
}

#[tokio::test]
async fn a_client_stalled_mid_message_or_mid_batch_is_still_idle() {
    common::create_role("pool_stall", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmax_size = 2\nidle_client_timeout = \"1s\"\n\
         [users.pool_stall]\nauth = \"trust\"\nserver_password = \"pw\"\n",
    )
    .await;
    let half_a_query = {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&100i32.to_be_bytes());
        q.extend_from_slice(b"SELECT 1 ");
        q
    };
    let unsynced_batch = {
        // Parse "SELECT 1", Bind, Execute: and then neither Sync nor Flush.
        let mut b = vec![b'P'];
        let body = b"\0SELECT 1\0\0\0";
        b.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        b.extend_from_slice(body);
        b.extend_from_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
        b
    };
    for (what, bytes) in [
        ("half a query", half_a_query),
        ("an unsynced batch", unsynced_batch),
    ] {
        let mut s = raw::login_trusted(proxy.addr, "pool_stall").await;
        raw::send(&mut s, &bytes).await;
        let started = Instant::now();
        let mut code = String::new();
        while let Some((tag, body)) = raw::read_message(&mut s).await {
            if tag == b'E' {
                code = raw::error_code(&body);
            }
        }
        assert_eq!(code, "57P05", "{what}: closed by idle_client_timeout");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_client_queued_past_queue_notice_after_is_told_once_which_pool() {
    common::create_role("pool_notice", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmax_size = 1\nqueue_notice_after = \"200ms\"\n\
         [users.pool_notice]\npassword = \"pw\"\n",
    )
    .await;
    let holder = proxy.connect("pool_notice", "pw").await.expect("login");
    holder.client.simple_query("BEGIN").await.expect("BEGIN");
    let common::Conn {
        client,
        mut messages,
        done: _done,
    } = proxy.connect("pool_notice", "pw").await.expect("login");
    let queued = tokio::spawn(async move {
        client
            .simple_query("SELECT 1")
            .await
            .expect("runs once free");
        client
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    holder.client.simple_query("COMMIT").await.expect("COMMIT");
    let client = queued.await.expect("no panic");
    // A client served at once is told nothing.
    client.simple_query("SELECT 2").await.expect("SELECT 2");
    let mut notices = Vec::new();
    while let Ok(message) = messages.try_recv() {
        if let tokio_postgres::AsyncMessage::Notice(n) = message {
            notices.push(n.message().to_owned());
        }
    }
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].contains("waiting for a server connection in pool app/pool_notice"),
        "{notices:?}"
    );
}

/// A server whose `host` is a directory is reached over its Unix-domain socket (as libpq
/// does): queries, named statements across backends, a cancel (forwarded to the socket
/// too), and a backend the server ended while idle is not lent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_is_reached_over_its_unix_socket() {
    let db = common::cluster();
    common::create_role("pool_unix", "pw").await;
    let databases = format!(
        "[databases.app]\nhost = \"{}\"\nport = {}\ndbname = \"postgres\"\n",
        db.dir().join("sock").display(),
        db.port()
    );
    let proxy = TestProxy::start_with_databases(
        &databases,
        "[pool]\nmax_size = 2\n[users.pool_unix]\npassword = \"pw\"\n\
         [admin]\nhttp_listen = \"\"\nusers = [\"pool_unix\"]\n",
    )
    .await;
    let conn = proxy.connect("pool_unix", "pw").await.expect("login");
    // (No server address: the backend's connection is a Unix-domain socket's.)
    let on_socket = "SELECT inet_server_addr() IS NULL, pg_backend_pid()";
    let row = conn.client.query_one(on_socket, &[]).await.expect("query");
    assert!(row.get::<_, bool>(0), "connected over the socket");
    let first: i32 = row.get(1);
    // An idle backend on a socket is lent again (the pool is LIFO: alone, the same one).
    let row = conn.client.query_one(on_socket, &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(1), first, "reused");
    // SHOW SERVERS names the idle backend's server by its socket's directory and port.
    let mut console_config = proxy.config("pool_unix", "pw");
    console_config.dbname("pgshield");
    let console = common::connect(&console_config).await.expect("console");
    let idle: Vec<(String, String)> = console
        .client
        .simple_query("SHOW SERVERS")
        .await
        .expect("SHOW SERVERS")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("state") == Some("idle") => {
                let field = |name| r.get(name).unwrap_or_default().to_owned();
                Some((field("addr"), field("port")))
            }
            _ => None,
        })
        .collect();
    let sock = (
        db.dir().join("sock").display().to_string(),
        db.port().to_string(),
    );
    assert_eq!(idle, [sock], "SHOW SERVERS");
    let statement = conn
        .client
        .prepare("SELECT $1::int + 1")
        .await
        .expect("prepare");
    let other = proxy.connect("pool_unix", "pw").await.expect("login");
    other.client.batch_execute("BEGIN").await.expect("hold one");
    for i in 0..4 {
        let row = conn.client.query_one(&statement, &[&i]).await.expect("run");
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
    other.client.batch_execute("COMMIT").await.expect("commit");
    // A cancel reaches the backend through the socket.
    let cancel = conn.client.cancel_token();
    let sleeping = conn.client.batch_execute("SELECT pg_sleep(10)");
    let started = Instant::now();
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cancel.cancel_query(tokio_postgres::NoTls).await
    };
    let (slept, cancelled) = tokio::join!(sleeping, canceller);
    cancelled.expect("cancel sent");
    let error = slept.expect_err("cancelled");
    assert_eq!(sqlstate(&error), Some("57014"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The server ends the idle backends (and they are gone, their FATAL sent): the next
    // statement runs on a fresh one, not on one of them.
    let admin = common::admin().await;
    let ended: Vec<i32> = admin
        .query(
            "SELECT pid FROM pg_stat_activity, pg_terminate_backend(pid, 5000) \
             WHERE usename = 'pool_unix' AND client_addr IS NULL",
            &[],
        )
        .await
        .expect("terminate")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // (Not `first` any more: the backend a cancel was sent to is closed, not reused.)
    assert!(
        !ended.is_empty() && !ended.contains(&first),
        "{ended:?} {first}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let row = conn
        .client
        .query_one(on_socket, &[])
        .await
        .expect("a fresh backend");
    assert!(row.get::<_, bool>(0));
    assert!(!ended.contains(&row.get(1)), "{ended:?}");
}

/// A backend given back between transactions keeps its place under max_size for the next
/// lend while nobody waits for one; a borrower that must wait frees it and gets it, rather
/// than waiting on a place that a warm backend keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_kept_with_a_warm_backend_goes_to_a_borrower_that_waits() {
    common::create_role("pool_kept", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmode = \"transaction\"\nmax_size = 1\nborrow_timeout = \"3s\"\n\
         [users.pool_kept]\npassword = \"pw\"\n",
    )
    .await;
    let pool = proxy.shared.pools.get("app", "pool_kept").expect("pool");
    let client = proxy.connect("pool_kept", "pw").await.expect("login");
    // (Without that, the pool's janitor would free the place at its next tick, within a
    // second: each borrow is to be far quicker.)
    for _ in 0..5 {
        // (The backend goes back warm, with its place, after each.)
        client.client.simple_query("SELECT 1").await.unwrap();
        let started = Instant::now();
        let backend = tokio::time::timeout(Duration::from_secs(10), pool.borrow())
            .await
            .expect("no hang")
            .expect("the only place is lent to a borrower that waits for it");
        let waited = started.elapsed();
        assert!(waited < Duration::from_millis(300), "{waited:?}");
        backend.release();
    }
    let status = pool.status();
    assert_eq!((status.open, status.idle, status.waiting), (1, 1, 0));
}

/// `borrow_timeout` bounds the whole borrow, opening a backend included: a server that
/// takes connections and never answers (a host hung mid-failover) costs a client
/// `borrow_timeout`, not `server_connect_timeout`.
#[tokio::test]
async fn borrow_timeout_bounds_opening_a_backend_too() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let proxy = TestProxy::start_with_databases(
        &format!("[databases.app]\nhost = \"127.0.0.1\"\nport = {port}\n"),
        "[pool]\nborrow_timeout = \"1s\"\nserver_connect_timeout = \"30s\"\n\
         [users.pool_silent]\npassword = \"pw\"\n",
    )
    .await;
    let started = Instant::now();
    let login = proxy.connect("pool_silent", "pw");
    let refused = tokio::time::timeout(Duration::from_secs(20), login)
        .await
        .expect("an answer before server_connect_timeout");
    assert!(refused.is_err(), "no backend to be had");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "took {took:?}");
    held.abort();
}

/// A health check whose own connection an administrator ends (pg_terminate_backend on
/// "pgshield health check") is tried again on a fresh one before the host is taken for
/// down: the backends clients use there are not all closed for it.
#[tokio::test]
async fn a_health_check_ended_by_an_administrator_does_not_take_its_host_down() {
    common::create_role("pool_hc_term", "pw").await;
    let port = common::cluster().port();
    let proxy = TestProxy::start_with_databases(
        &format!("[databases.app]\nhosts = [\"127.0.0.1:{port}\"]\nrole = \"auto\"\ndbname = \"postgres\"\n"),
        "[pool]\nmax_size = 1\nhealth_check_interval = \"100ms\"\n\
         [users.pool_hc_term]\npassword = \"pw\"\n",
    )
    .await;
    let conn = proxy.connect("pool_hc_term", "pw").await.expect("login");
    let pid = || async {
        let row = conn.client.query_one("SELECT pg_backend_pid()", &[]).await;
        row.expect("pid").get::<_, i32>(0)
    };
    let before = pid().await;
    let admin = common::admin().await;
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = 'pgshield health check' AND usename = 'pool_hc_term'";
    let mut ended = 0;
    for _ in 0..50 {
        ended = admin
            .query_one(terminate, &[])
            .await
            .expect("terminate")
            .get::<_, i64>(0);
        if ended > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ended > 0, "the health check's session was found");
    // Several probes later.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pid().await, before, "the backend in use was kept");
}

/// The hosts of a database are checked all at once: one that takes connections and never
/// answers (cut off mid-failover) does not hold up learning which other is the primary.
#[tokio::test]
async fn a_silent_host_does_not_hold_up_the_health_checks_of_the_others() {
    common::create_role("pool_hc_silent", "pw").await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let port = common::cluster().port();
    let started = Instant::now();
    let proxy = TestProxy::start_with_databases(
        &format!(
            "[databases.app]\nhosts = [\"127.0.0.1:{silent_port}\", \"127.0.0.1:{port}\"]\n\
             role = \"auto\"\ndbname = \"postgres\"\n"
        ),
        "[pool]\nhealth_check_interval = \"100ms\"\nhealth_check_timeout = \"5s\"\n\
         [users.pool_hc_silent]\npassword = \"pw\"\n",
    )
    .await;
    let primary_known = || {
        proxy.shared.pools.clusters().iter().any(|c| {
            c.status()
                .iter()
                .any(|h| h.port == port && h.role == pgshield::pool::cluster::Role::Primary)
        })
    };
    while !primary_known() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the primary is never learnt"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "learnt after {:?}: behind the silent host's timeout",
        started.elapsed()
    );
    held.abort();
}
