//! Transaction mode: a client whose backend goes away (here `pg_terminate_backend`, as a
//! failover or a restart would) stays connected. What it was owed is answered with
//! 08006, a transaction block it was in stays failed until it rolls back, and its next
//! statement runs on another backend. State that cannot follow still ends the session.

mod common;

use std::time::Duration;

use common::{sqlstate, Frozen, TestProxy};
use tokio_postgres::SimpleQueryMessage;

const POOL: &str = "[pool]\nmax_size = 2\nborrow_timeout = \"10s\"\n";

async fn proxy_for(role: &str) -> TestProxy {
    common::create_role(role, "pw").await;
    TestProxy::start(&format!("{POOL}[users.{role}]\npassword = \"pw\"\n")).await
}

/// Terminates, from outside, every backend of `role` running `like`.
async fn terminate(role: &str, like: &str) {
    let admin = common::admin().await;
    for _ in 0..50 {
        let n: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE usename = $1 AND query LIKE $2 AND pid <> pg_backend_pid()",
                &[&role, &like],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no backend of {role} ran {like}");
}

async fn pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("a query after the loss")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_backend_is_lost_gets_08006_and_the_connection_carries_on() {
    let proxy = proxy_for("lost_stmt").await;
    let conn = proxy.connect("lost_stmt", "pw").await.expect("login");
    let before = pid(&conn.client).await;
    // Simple protocol, then extended (a parameter), each cut mid-statement.
    let simple = {
        let c = &conn.client;
        async move {
            c.simple_query("SELECT pg_sleep(30) /* lost-simple */")
                .await
        }
    };
    let (result, ()) = tokio::join!(simple, terminate("lost_stmt", "%lost-simple%"));
    let e = result.expect_err("the statement was cut");
    assert_eq!(sqlstate(&e), Some("08006"), "{e:?}");
    let message = e.as_db_error().unwrap().message().to_owned();
    assert!(message.contains("still usable"), "{message}");
    assert_ne!(
        pid(&conn.client).await,
        before,
        "the next statement runs elsewhere"
    );

    let extended = {
        let c = &conn.client;
        async move {
            c.query("SELECT pg_sleep($1) /* lost-extended */", &[&30f64])
                .await
        }
    };
    let (result, ()) = tokio::join!(extended, terminate("lost_stmt", "%lost-extended%"));
    let e = result.expect_err("the statement was cut");
    assert_eq!(sqlstate(&e), Some("08006"), "{e:?}");
    // Prepared statements of the client's still work (prepared again where needed).
    let stmt = conn.client.prepare("SELECT $1::int + 1").await.unwrap();
    let row = conn.client.query_one(&stmt, &[&41]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(!conn.client.is_closed());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_block_whose_backend_is_lost_stays_failed_until_rollback() {
    let proxy = proxy_for("lost_tx").await;
    let conn = proxy.connect("lost_tx", "pw").await.expect("login");
    let other = proxy.connect("lost_tx", "pw").await.expect("login");
    conn.client
        .batch_execute("BEGIN; SELECT 1 /* lost-in-block */")
        .await
        .unwrap();
    // Idle inside its transaction, the client's backend goes away.
    terminate("lost_tx", "%lost-in-block%").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another client leaves its backend warm: the next one lent, and lent at once.
    other.client.simple_query("SELECT 1").await.unwrap();
    // PostgreSQL's own rule holds on the next backend: aborted until the block ends.
    let e = conn
        .client
        .simple_query("SELECT 2")
        .await
        .expect_err("the transaction is aborted");
    assert_eq!(sqlstate(&e), Some("25P02"), "{e:?}");
    let e = conn
        .client
        .query("SELECT $1::int", &[&3])
        .await
        .expect_err("aborted in the extended protocol too");
    assert_eq!(sqlstate(&e), Some("25P02"), "{e:?}");
    // A DEALLOCATE, which pgshield answers itself otherwise, is PostgreSQL's to refuse too.
    let e = conn
        .client
        .simple_query("DEALLOCATE ALL")
        .await
        .expect_err("aborted: DEALLOCATE refused");
    assert_eq!(sqlstate(&e), Some("25P02"), "{e:?}");
    let done = conn
        .client
        .simple_query("ROLLBACK")
        .await
        .expect("ROLLBACK");
    assert!(done
        .iter()
        .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(_))));
    let row = conn
        .client
        .query_one("SELECT 4", &[])
        .await
        .expect("carries on");
    assert_eq!(row.get::<_, i32>(0), 4);
    proxy.stop().await;
}

/// A proxy whose pool of `max_size` checks backends idle past 100 ms (giving up after 1 s).
async fn health_checking(role: &str, max_size: usize) -> TestProxy {
    common::create_role(role, "pw").await;
    TestProxy::start(&format!(
        "[pool]\nmax_size = {max_size}\nborrow_timeout = \"10s\"\nhealth_check_after = \"100ms\"\n\
         server_connect_timeout = \"1s\"\n[users.{role}]\npassword = \"pw\"\n"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_idle_past_health_check_after_that_does_not_answer_is_not_lent() {
    let proxy = health_checking("lost_frozen", 2).await;
    let conn = proxy.connect("lost_frozen", "pw").await.expect("login");
    let frozen = pid(&conn.client).await;
    // Nothing about the stopped backend looks closed.
    let stopped = Frozen::new(frozen);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let other = tokio::time::timeout(Duration::from_secs(10), pid(&conn.client))
        .await
        .expect("the check gives up on the frozen backend");
    drop(stopped);
    assert_ne!(other, frozen, "the frozen backend was not lent");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_backend_fails_its_health_check_keeps_its_turn() {
    let proxy = health_checking("lost_turn", 1).await;
    let first = proxy.connect("lost_turn", "pw").await.expect("login");
    let second = proxy.connect("lost_turn", "pw").await.expect("login");
    let stopped = Frozen::new(pid(&first.client).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The first client gets the only backend, due its check, which hangs; the second
    // queues meanwhile. When the check fails, the first client borrows another backend
    // with the place it had, ahead of the second (which had queued after it).
    let started = std::time::Instant::now();
    let a = tokio::spawn(async move {
        first.client.simple_query("SELECT 1").await.expect("first");
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = tokio::spawn(async move {
        second
            .client
            .simple_query("SELECT pg_sleep(0.5)")
            .await
            .expect("second");
        started.elapsed()
    });
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    drop(stopped);
    assert!(a < b, "the first client kept its turn: {a:?} against {b:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_idle_past_health_check_after_that_answers_is_lent_again() {
    let proxy = health_checking("lost_checked", 2).await;
    let conn = proxy.connect("lost_checked", "pw").await.expect("login");
    let first = pid(&conn.client).await;
    // Each time idle past health_check_after: the check runs, and the same backend is
    // lent (a borrow that gave up on the check half-way had closed it).
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pid(&conn.client).await, first, "checked, and lent again");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_its_server_closed_between_transactions_is_not_lent_again() {
    let proxy = proxy_for("lost_between").await;
    let conn = proxy.connect("lost_between", "pw").await.expect("login");
    let admin = common::admin().await;
    for _ in 0..3 {
        let given_back = pid(&conn.client).await;
        // Closed by its server right after its transaction: lent again at once, not
        // after the pool's upkeep (once a second) has looked at it.
        admin
            .execute("SELECT pg_terminate_backend($1)", &[&given_back])
            .await
            .unwrap();
        common::backend_gone(&admin, given_back, Duration::from_millis(500)).await;
        let next = pid(&conn.client).await;
        assert_ne!(next, given_back, "a closed backend was lent");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_backend_with_a_setting_changed_in_its_transaction_ends_the_session() {
    let proxy = proxy_for("lost_set").await;
    let conn = proxy.connect("lost_set", "pw").await.expect("login");
    conn.client
        .batch_execute("BEGIN; SET application_name = 'lost-set'; SELECT 1 /* lost-set */")
        .await
        .unwrap();
    // Whether the SET stands is unknown once the transaction is lost: no guessing.
    terminate("lost_set", "%lost-set%").await;
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        conn.client.simple_query("SELECT 1"),
    )
    .await
    .expect("an answer, no hang")
    .expect_err("the session ended");
    let ended = tokio::time::timeout(Duration::from_secs(10), conn.done)
        .await
        .expect("the connection closes")
        .unwrap();
    // The server's own FATAL (57P01), held back in case the session could go on, is
    // what the client is told: as the answer to its query if it asked first, else as
    // the end of the connection.
    let codes = [sqlstate(&err), ended.as_ref().err().and_then(sqlstate)];
    assert!(codes.contains(&Some("57P01")), "{err:?} / {ended:?}");
    proxy.stop().await;
}
