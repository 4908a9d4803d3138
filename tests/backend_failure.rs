//! A backend that dies without a word (SIGKILL): its client gets 08006 instead of a hang,
//! and once PostgreSQL has recovered, the pool refills and clients carry on.
//!
//! Killing a backend makes PostgreSQL restart every other backend, so this file has its
//! own cluster and a single test.

mod common;

use std::time::{Duration, Instant};

use common::{sqlstate, TestProxy};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_gives_its_client_08006_and_the_pool_recovers() {
    common::create_role("fail_kill", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmode = \"session\"\nmax_size = 2\nborrow_timeout = \"5s\"\n[users.fail_kill]\npassword = \"pw\"\n",
    )
    .await;
    let victim = proxy.connect("fail_kill", "pw").await.expect("login");
    let pid: i32 = victim
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    let client = victim.client;
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill the backend");

    let err = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("the client hears about it, no hang")
        .unwrap()
        .expect_err("the query fails");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("app/fail_kill"));

    // PostgreSQL restarts its backends; a new client gets through once it is back.
    let started = Instant::now();
    let mut last_error = String::new();
    while started.elapsed() < Duration::from_secs(30) {
        match proxy.connect("fail_kill", "pw").await {
            Ok(conn) => match conn.client.query_one("SELECT pg_backend_pid()", &[]).await {
                Ok(row) => {
                    assert_ne!(row.get::<_, i32>(0), pid);
                    return;
                }
                Err(e) => last_error = e.to_string(),
            },
            Err(e) => last_error = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no client got through within 30 s after recovery; last error: {last_error}");
}
