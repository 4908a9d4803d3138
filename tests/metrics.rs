//! The operator's HTTP listener: /metrics moves as a workload runs (logins, queues,
//! borrow timeouts, pins, queries, bytes, prepared statements), /health and /ready.

mod common;

use std::time::Duration;

use common::{http_get as get, sqlstate, TestProxy};

/// The value of one sample line, e.g. `pgshield_queries_total{pool="app/x"}`.
fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

#[tokio::test]
async fn metrics_follow_a_workload() {
    common::create_role("met_user", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmax_size = 1\nborrow_timeout = \"1s\"\n[users.met_user]\npassword = \"pw\"\n",
    )
    .await;
    let http = proxy.http.expect("an HTTP listener");
    let pool = "pool=\"app/met_user\"";

    let a = proxy.connect("met_user", "pw").await.expect("a");
    let b = proxy.connect("met_user", "pw").await.expect("b");
    assert!(proxy.connect("met_user", "wrong").await.is_err());
    // A holds the only backend; B queues behind it for a while.
    a.client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let queued = tokio::spawn(async move {
        b.client
            .simple_query("SELECT 2")
            .await
            .expect("b runs once a commits");
        b
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.client.batch_execute("COMMIT").await.expect("commit");
    let b = queued.await.expect("no panic");
    // A third client waits past borrow_timeout while A holds the backend again.
    a.client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let c = proxy.connect("met_user", "pw").await.expect("c");
    let err = c
        .client
        .simple_query("SELECT 3")
        .await
        .expect_err("timed out");
    assert_eq!(sqlstate(&err), Some("53300"));
    a.client.batch_execute("COMMIT").await.expect("commit");
    // A named statement prepared once and reused, then a pin (which keeps the backend).
    let st = a
        .client
        .prepare("SELECT $1::int + 1")
        .await
        .expect("prepare");
    for i in 0..3 {
        a.client.query_one(&st, &[&i]).await.expect("execute");
    }
    b.client
        .batch_execute("LISTEN metrics_test")
        .await
        .expect("listen");

    b.client
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("a cancel request");
    // The cancel travels on its own connection: give it a moment to be counted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, m) = get(http, "/metrics").await;
    assert_eq!(code, 200);
    assert!(value(&m, "pgshield_client_connections_received_total") >= 4.0);
    assert!(value(&m, "pgshield_client_connections_setup_succeeded_total") >= 3.0);
    assert!(value(&m, "pgshield_client_connections_setup_failed_auth_total") >= 1.0);
    assert_eq!(value(&m, "pgshield_client_connections"), 3.0);
    assert_eq!(value(&m, "pgshield_pins_total{reason=\"listen\"}"), 1.0);
    assert_eq!(value(&m, "pgshield_cancel_requests_total"), 1.0);
    assert_eq!(
        value(&m, &format!("pgshield_borrow_timeouts_total{{{pool}}}")),
        1.0
    );
    // B's wait (about 300 ms) lands above the 0.1 s bucket.
    let waits = value(&m, &format!("pgshield_borrow_wait_seconds_count{{{pool}}}"));
    let quick = value(
        &m,
        &format!("pgshield_borrow_wait_seconds_bucket{{{pool},le=\"0.1\"}}"),
    );
    assert!(
        waits > quick,
        "a wait above 100 ms was recorded: {waits} > {quick}"
    );
    assert!(value(&m, &format!("pgshield_queries_total{{{pool}}}")) >= 6.0);
    assert!(value(&m, &format!("pgshield_transactions_total{{{pool}}}")) >= 3.0);
    assert!(
        value(
            &m,
            &format!("pgshield_query_duration_seconds_count{{{pool}}}")
        ) >= 6.0
    );
    assert!(
        value(
            &m,
            &format!("pgshield_client_query_duration_seconds_count{{{pool}}}")
        ) >= 6.0
    );
    // B's query waited about 300 ms for a backend: the client saw that wait, the server
    // did not (every statement here is quick).
    let client_time = value(
        &m,
        &format!("pgshield_client_query_duration_seconds_sum{{{pool}}}"),
    );
    let server_time = value(
        &m,
        &format!("pgshield_query_duration_seconds_sum{{{pool}}}"),
    );
    assert!(client_time >= 0.25, "{client_time}");
    assert!(server_time < 0.25, "{server_time}");
    assert!(
        value(
            &m,
            &format!("pgshield_client_bytes_received_total{{{pool}}}")
        ) > 0.0
    );
    assert!(value(&m, &format!("pgshield_client_bytes_sent_total{{{pool}}}")) > 0.0);
    assert_eq!(
        value(&m, &format!("pgshield_database_connections_max{{{pool}}}")),
        1.0
    );
    assert_eq!(
        value(&m, &format!("pgshield_database_connections{{{pool}}}")),
        1.0
    );
    assert!(
        value(
            &m,
            &format!("pgshield_database_connections_setup_succeeded_total{{{pool}}}")
        ) >= 1.0
    );
    assert!(
        value(
            &m,
            &format!("pgshield_prepared_statement_cache_misses_total{{{pool}}}")
        ) >= 1.0
    );
    assert!(
        value(
            &m,
            &format!("pgshield_prepared_statement_cache_hits_total{{{pool}}}")
        ) >= 2.0
    );
    assert!(m.contains("# HELP pgshield_borrow_wait_seconds"));
    drop((a, b, c));
}

#[tokio::test]
async fn health_and_ready_say_what_they_mean() {
    common::create_role("met_ready", "pw").await;
    let proxy = TestProxy::start("[users.met_ready]\npassword = \"pw\"\n").await;
    let http = proxy.http.expect("an HTTP listener");
    assert_eq!(get(http, "/health").await, (200, "ok\n".into()));
    assert_eq!(get(http, "/ready").await, (200, "ready\n".into()));
    assert_eq!(get(http, "/nope").await.0, 404);
    // No longer accepting clients (SHUTDOWN WAIT_FOR_CLIENTS, a rolling restart; a
    // client still connected keeps pgshield up): not ready.
    let conn = proxy.connect("met_ready", "pw").await.expect("login");
    proxy.shutdown.close_listener();
    let (code, body) = get(http, "/ready").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: no longer accepting clients\n")
    );
    // Draining (a client in a transaction keeps it from finishing): not ready any more.
    conn.client.batch_execute("BEGIN").await.expect("begin");
    proxy.shutdown.begin();
    let (code, body) = get(http, "/ready").await;
    assert_eq!(code, 503, "{body}");
    drop(conn);

    // A database whose server is down: not ready, and says which.
    let (_kept, down) = common::refusing_port();
    let proxy = TestProxy::start(&format!(
        "[databases.gone]\nhost = \"127.0.0.1\"\nport = {down}\n[users.met_ready]\npassword = \"pw\"\n"
    ))
    .await;
    let (code, body) = get(proxy.http.expect("listener"), "/ready").await;
    assert_eq!(code, 503);
    assert!(body.contains("database gone"), "{body}");
    assert_eq!(get(proxy.http.expect("listener"), "/health").await.0, 200);
}

/// Connections that send nothing cannot keep a probe out: past a bound, the oldest make
/// way (before, 32 idle connections held every place for 5 s, and a kubelet's 1 s probe
/// timed out). And `/ready` probes a database's server at most once a second, however
/// many ask at once: each probe makes PostgreSQL fork a process.
#[tokio::test]
async fn idle_connections_and_a_flood_of_ready_requests_cost_little() {
    use tokio::io::AsyncWriteExt;
    common::raise_fd_limit();
    // A "server" that counts the connections the probes make.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = server.local_addr().expect("address").port();
    let probes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&probes);
    let accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = server.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let proxy = TestProxy::start(&format!(
        "[databases.probed]\nhost = \"127.0.0.1\"\nport = {port}\n[users.met_flood]\npassword = \"pw\"\n"
    ))
    .await;
    let http = proxy.http.expect("an HTTP listener");

    let mut idle = Vec::new();
    for _ in 0..400 {
        let mut s = tokio::net::TcpStream::connect(http).await.expect("connect");
        s.write_all(b"GET /hea").await.expect("half a request");
        idle.push(s);
    }
    let health = tokio::time::timeout(Duration::from_secs(1), get(http, "/health")).await;
    assert_eq!(
        health.expect("/health answered within 1 s despite 400 idle connections"),
        (200, "ok\n".into())
    );
    // No more than 256 are kept open: the oldest made way (closed) for the rest.
    let closed = futures_util::future::join_all(idle.iter_mut().map(|s| async move {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_millis(300), s.read(&mut byte)).await;
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    }))
    .await;
    let closed = closed.iter().filter(|&&c| c).count();
    assert!(closed >= 400 + 1 - 256, "{closed} of 400 closed");

    let asks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { get(http, "/ready").await }))
        .collect();
    for ask in asks {
        let (code, body) = ask.await.expect("a /ready request");
        assert_eq!((code, body.as_str()), (200, "ready\n"));
    }
    let made = probes.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=2).contains(&made), "{made} probes for 20 requests");
    drop(idle);
    accepting.abort();
}

/// The prepared-statement cache counts each Bind once: on a backend that lacks its
/// statement, a miss (the statement is prepared there, its description checked first, as
/// for any statement whose rows a client was told); on one that has it, a hit. Not a hit
/// as well when the Bind goes on after that check, on the short path for a prepared
/// statement's run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bind_counts_once_as_a_cache_hit_or_a_miss() {
    let role = "met_prep";
    common::create_role(role, "pw").await;
    let proxy = TestProxy::start(&format!(
        "[pool]\nmax_size = 2\n[users.{role}]\nauth = \"trust\"\nserver_password = \"pw\"\n"
    ))
    .await;
    let http = proxy.http.expect("an HTTP listener");
    let counts = |m: String| {
        let series = |what: &str| {
            let name = format!("pgshield_prepared_statement_cache_{what}_total");
            value(&m, &format!("{name}{{pool=\"app/{role}\"}}"))
        };
        (series("misses"), series("hits"))
    };
    let (h1, h2) = (
        proxy.connect(role, "pw").await.expect("h1").client,
        proxy.connect(role, "pw").await.expect("h2").client,
    );
    let mut a = common::raw::login_trusted(proxy.addr, role).await;
    // A run as libpq sends it: Bind, Describe of the portal, Execute, Sync.
    let run = |parse: bool| {
        let mut bytes = Vec::new();
        if parse {
            bytes.extend(common::raw::message(b'P', b"S_1\0SELECT 1\0\0\0"));
        }
        bytes.extend(common::raw::message(b'B', b"\0S_1\0\0\0\0\0\0\0"));
        bytes.extend(common::raw::message(b'D', b"P\0"));
        bytes.extend(common::raw::message(b'E', b"\0\0\0\0\0"));
        bytes.extend_from_slice(&common::raw::SYNC);
        bytes
    };
    // h1 holds one backend; `a` prepares, describes and runs S_1 on the other.
    h1.batch_execute("BEGIN").await.expect("begin");
    let first = backend_pid(&h1).await;
    common::raw::send(&mut a, &run(true)).await;
    assert_eq!(
        common::raw::until_ready(&mut a).await.1,
        Vec::<String>::new()
    );
    h1.batch_execute("COMMIT").await.expect("commit");
    let (misses, hits) = counts(get(http, "/metrics").await.1);
    // Now the other backend is held, so that `a` runs on the one that lacks S_1.
    h1.batch_execute("BEGIN").await.expect("begin");
    if backend_pid(&h1).await == first {
        h2.batch_execute("BEGIN").await.expect("h2 holds the other");
        h1.batch_execute("COMMIT").await.expect("frees the first");
    }
    common::raw::send(&mut a, &run(false)).await;
    assert_eq!(
        common::raw::until_ready(&mut a).await.1,
        Vec::<String>::new()
    );
    let after_miss = counts(get(http, "/metrics").await.1);
    assert_eq!(after_miss, (misses + 1.0, hits), "a miss alone");
    common::raw::send(&mut a, &run(false)).await;
    assert_eq!(
        common::raw::until_ready(&mut a).await.1,
        Vec::<String>::new()
    );
    let after_hit = counts(get(http, "/metrics").await.1);
    assert_eq!(after_hit, (misses + 1.0, hits + 1.0), "a hit alone");
    for held in [&h1, &h2] {
        let _ = held.batch_execute("COMMIT").await;
    }
}

/// The backend's pid, by a simple query (which uses no prepared statement).
async fn backend_pid(client: &tokio_postgres::Client) -> String {
    let rows = client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("pid");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("a row")
}
