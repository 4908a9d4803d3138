//! Cancel requests: a client's cancel reaches the query it is running, and nothing else;
//! a backend that was sent a cancel is never lent to another client.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{raw, sqlstate, TestProxy};
use tokio_postgres::NoTls;

async fn proxy(role: &str, max_size: usize) -> TestProxy {
    common::create_role(role, "pw").await;
    // Session mode: these tests look at which backend a client holds.
    TestProxy::start(&format!(
        "[pool]\nmode = \"session\"\nmax_size = {max_size}\n[users.{role}]\npassword = \"pw\"\n"
    ))
    .await
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_query_returns_57014_and_the_connection_stays_usable() {
    let proxy = proxy("cancel_run", 2).await;
    let conn = proxy.connect("cancel_run", "pw").await.expect("login");
    backend_pid(&conn.client).await;
    let token = conn.client.cancel_token();
    let client = conn.client;
    let sleeping = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(10)").await.map(|_| ());
        (client, result)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cancelled_at = Instant::now();
    token
        .cancel_query(NoTls)
        .await
        .expect("the cancel request is accepted");
    let (client, result) = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("the query ends")
        .unwrap();
    let err = result.expect_err("cancelled");
    assert_eq!(sqlstate(&err), Some("57014"), "{err}");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(1),
        "{:?}",
        cancelled_at.elapsed()
    );
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("still usable")
        .get(0);
    assert_eq!(one, 1);
}

/// Logs in with the raw protocol and returns the connection and its BackendKeyData.
async fn raw_login(proxy: &TestProxy, user: &str) -> (tokio::net::TcpStream, i32, Vec<u8>) {
    let mut s = raw::connect(proxy.addr).await;
    raw::send(
        &mut s,
        &raw::startup(&[("user", user), ("database", "app")]),
    )
    .await;
    let mut key = None;
    loop {
        match raw::read_message(&mut s).await.expect("login") {
            (b'K', body) => {
                key = Some((
                    i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                    body[4..8].to_vec(),
                ))
            }
            (b'Z', _) => break,
            (b'E', body) => panic!("refused: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    let (pid, secret) = key.expect("BackendKeyData");
    (s, pid, secret)
}

async fn send_cancel(proxy: &TestProxy, pid: i32, secret: &[u8]) {
    let mut rest = pid.to_be_bytes().to_vec();
    rest.extend_from_slice(secret);
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &raw::request(80_877_102, &rest)).await;
    assert!(
        raw::closed(&mut s).await,
        "the proxy closes a cancel connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_cancels_nothing_and_the_right_one_does() {
    common::create_role("cancel_key", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmode = \"session\"\nmax_size = 2\n[users.cancel_key]\nauth = \"trust\"\nserver_password = \"pw\"\n",
    )
    .await;
    let (mut s, pid, secret) = raw_login(&proxy, "cancel_key").await;

    // Nothing held yet: a cancel with the right key is a no-op.
    send_cancel(&proxy, pid, &secret).await;

    raw::send(&mut s, &raw::query("SELECT pg_sleep(1.5)")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut wrong = secret.clone();
    wrong[0] ^= 0xff;
    send_cancel(&proxy, pid, &wrong).await;
    send_cancel(&proxy, pid ^ 0x55, &secret).await;
    let (tags, codes) = raw::until_ready(&mut s).await;
    assert!(
        codes.is_empty(),
        "wrong keys cancelled the query: {codes:?} ({tags})"
    );

    raw::send(&mut s, &raw::query("SELECT pg_sleep(10)")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_cancel(&proxy, pid, &secret).await;
    let (_, codes) = raw::until_ready(&mut s).await;
    assert_eq!(codes, vec!["57014".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_never_reaches_another_clients_query() {
    let proxy = proxy("cancel_other", 2).await;
    let a = proxy.connect("cancel_other", "pw").await.expect("login");
    let b = proxy.connect("cancel_other", "pw").await.expect("login");
    assert_ne!(backend_pid(&a.client).await, backend_pid(&b.client).await);
    let b_client = b.client;
    let b_query = tokio::spawn(async move {
        b_client
            .simple_query("SELECT pg_sleep(1)")
            .await
            .map(|_| ())
    });
    let a_token = a.client.cancel_token();
    let a_client = a.client;
    let a_query = tokio::spawn(async move {
        a_client
            .simple_query("SELECT pg_sleep(10)")
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    a_token.cancel_query(NoTls).await.unwrap();
    let a_result = tokio::time::timeout(Duration::from_secs(5), a_query)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        sqlstate(&a_result.expect_err("A is cancelled")),
        Some("57014")
    );
    let b_result = tokio::time::timeout(Duration::from_secs(5), b_query)
        .await
        .unwrap()
        .unwrap();
    b_result.expect("B's query is not touched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_was_sent_a_cancel_is_never_lent_again() {
    // With one backend: if it were reused, a cancel still on its way could hit the next
    // client. It is closed instead, and the next client gets a fresh one.
    let proxy = proxy("cancel_stale", 1).await;
    let a = proxy.connect("cancel_stale", "pw").await.expect("login");
    let pid = backend_pid(&a.client).await;
    let token = a.client.cancel_token();
    let client = a.client;
    let sleeping = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(10)").await.map(|_| ());
        (client, result)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(NoTls).await.unwrap();
    // The 57014 shows the cancel reached A's backend (so it was attributed to it).
    let (client, result) = tokio::time::timeout(Duration::from_secs(5), sleeping)
        .await
        .expect("cancelled in time")
        .unwrap();
    assert_eq!(sqlstate(&result.expect_err("cancelled")), Some("57014"));
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = proxy.connect("cancel_stale", "pw").await.expect("login");
    assert_ne!(
        backend_pid(&b.client).await,
        pid,
        "the cancelled backend was not reused"
    );
    let slept = b.client.simple_query("SELECT pg_sleep(0.5)").await;
    assert!(
        slept.is_ok(),
        "the next client's query is not cancelled: {slept:?}"
    );
}

/// A cancel for a client queued for a backend ends its wait at once with `57014`, as
/// PostgreSQL answers a cancelled statement: the statement never runs, and the
/// connection stays usable (PgBouncer leaves such a client queued, its statement to run
/// later). Through the simple and the extended protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_ends_a_queued_clients_wait_and_its_statement_never_runs() {
    let role = "cancel_queued";
    common::create_role(role, "pw").await;
    let admin = common::admin().await;
    admin
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS cancel_queued_t; CREATE TABLE cancel_queued_t (x int); \
             GRANT ALL ON cancel_queued_t TO {role}"
        ))
        .await
        .expect("table");
    let proxy = TestProxy::start(&format!(
        "[pool]\nmode = \"transaction\"\nmax_size = 1\nborrow_timeout = \"30s\"\n\
         [users.{role}]\npassword = \"pw\"\n"
    ))
    .await;
    let holder = proxy.connect(role, "pw").await.expect("login");
    holder
        .client
        .batch_execute("BEGIN")
        .await
        .expect("hold the backend");
    let queued = proxy.connect(role, "pw").await.expect("login");
    let token = queued.client.cancel_token();
    let client = Arc::new(queued.client);
    for extended in [false, true] {
        let c = Arc::clone(&client);
        let waiting = tokio::spawn(async move {
            if extended {
                c.execute("INSERT INTO cancel_queued_t VALUES ($1)", &[&2i32])
                    .await
                    .map(|_| ())
            } else {
                c.batch_execute("INSERT INTO cancel_queued_t VALUES (1)")
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "queued behind the holder");
        let cancelled_at = Instant::now();
        token.cancel_query(NoTls).await.expect("cancel sent");
        let result = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends")
            .expect("task");
        let err = result.expect_err("cancelled");
        assert_eq!(sqlstate(&err), Some("57014"), "{err}");
        assert!(cancelled_at.elapsed() < Duration::from_secs(1));
    }
    holder.client.batch_execute("COMMIT").await.expect("commit");
    let rows: i64 = client
        .query_one("SELECT count(*) FROM cancel_queued_t", &[])
        .await
        .expect("usable after the cancels")
        .get(0);
    assert_eq!(rows, 0, "a cancelled statement ran");
}

/// A proxy (transaction mode, query_timeout 500 ms) whose server is reached through a
/// relay that drops every CancelRequest, as a network cut would; `user` is the role's
/// `[users.ROLE]` table.
async fn losing_cancels(role: &str, user: &str) -> (common::Relay, TestProxy) {
    common::create_role(role, "pw").await;
    let relay = common::Relay::start(|code| code != 80877102).await;
    let proxy = TestProxy::start_with_databases(
        &relay.database(),
        &format!(
            "[pool]\nmode = \"transaction\"\nquery_timeout = \"500ms\"\n\
             [tls.server]\nmode = \"disable\"\n[users.{role}]\n{user}\n"
        ),
    )
    .await;
    (relay, proxy)
}

/// `query_timeout` still ends a statement whose cancel never reaches the server (a relay
/// here drops every CancelRequest, as a network cut would): after a grace of 5 s the
/// client is closed with `57014` and its backend with it, as PgBouncer's query_timeout
/// closes them. Before, the client waited for the statement however long it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_closes_a_client_whose_cancel_does_not_arrive() {
    let role = "cancel_lost";
    let (relay, proxy) = losing_cancels(role, "password = \"pw\"").await;
    let conn = proxy.connect(role, "pw").await.expect("login");
    let pid = backend_pid(&conn.client).await;
    let started = Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        conn.client.simple_query("SELECT pg_sleep(30)"),
    )
    .await
    .expect("ended well before the statement would have")
    .expect_err("closed");
    assert_eq!(sqlstate(&err), Some("57014"), "{err}");
    let took = started.elapsed();
    assert!(
        (Duration::from_secs(5)..Duration::from_secs(10)).contains(&took),
        "{took:?}"
    );
    assert!(
        relay.openings().contains(&80877102),
        "a cancel was tried first"
    );
    // Its backend was closed, not returned to the pool (the server, whose pg_sleep
    // notices nothing, would hold it busy for the rest of its 30 s).
    let open: usize = proxy
        .shared
        .pools
        .all()
        .iter()
        .map(|p| p.status().open)
        .sum();
    assert_eq!(open, 0, "backend {pid} is still open");
}

/// The silence that ends such a client is the server's: a client that keeps sending
/// (a Sync every second, here) while its cancelled statement's server says nothing is
/// ended all the same. (Before, its own bytes counted as the server's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_talking_client_does_not_hide_a_silent_server() {
    let role = "cancel_lost_talk";
    let (_relay, proxy) = losing_cancels(role, "auth = \"trust\"\nserver_password = \"pw\"").await;
    let mut s = raw::login_trusted(proxy.addr, role).await;
    raw::send(&mut s, &raw::query("SELECT pg_sleep(30)")).await;
    let started = Instant::now();
    let ended = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if started.elapsed() > Duration::from_secs(20) {
            break false;
        }
        use tokio::io::AsyncWriteExt;
        if s.write_all(&raw::message(b'S', &[])).await.is_err() {
            break true;
        }
        let mut byte = [0u8; 1];
        let peeked = tokio::time::timeout(Duration::from_millis(10), s.peek(&mut byte)).await;
        if matches!(peeked, Ok(Ok(_))) {
            break true;
        }
    };
    assert!(ended, "still not ended after 20 s");
    let (tag, body) = raw::read_message(&mut s).await.expect("the farewell");
    assert_eq!((tag, raw::error_code(&body)), (b'E', "57014".to_owned()));
}
