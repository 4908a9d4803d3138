//! PAUSE as operators use it: during a workload, PAUSE lets transactions in flight finish
//! and leaves no backend open; the database is restarted; RESUME, and the workload ends
//! with zero client errors. This binary restarts its own cluster, so it has one of its own.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgshield::devdb::{DevDb, DevDbOptions};
use pgshield::{Config, Proxy};
use tokio_postgres::SimpleQueryMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_restart_the_database_resume_and_no_client_sees_an_error() {
    let mut db = tokio::task::spawn_blocking(|| DevDb::start(&DevDbOptions::default()))
        .await
        .expect("no panic")
        .expect("a cluster of this test's own");
    let password = db.password().to_owned();
    let config = Config::from_toml(&format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[pool]\nmax_size = 4\nborrow_timeout = \"60s\"\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\
         [users.postgres]\npassword = \"{password}\"\n\
         [admin]\nhttp_listen = \"\"\nusers = [\"postgres\"]\n",
        db.port()
    ))
    .expect("config");
    let proxy = Proxy::bind(config).await.expect("bind");
    let addr = proxy.local_addr();
    let shutdown = proxy.shutdown_handle();
    tokio::spawn(proxy.run());
    let client_config = |dbname: &str| {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(addr.port())
            .user("postgres")
            .password(password.as_str())
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        c
    };

    // Four clients run short transactions until told to stop, counting errors.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workload = Vec::new();
    for _ in 0..4 {
        let conn = common::connect(&client_config("app")).await.expect("login");
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        workload.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                conn.client
                    .simple_query("BEGIN; SELECT pg_sleep(0.01); COMMIT")
                    .await
                    .map_err(|e| e.to_string())?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let admin = common::connect(&client_config("pgshield"))
        .await
        .expect("admin");
    tokio::time::timeout(Duration::from_secs(20), admin.client.simple_query("PAUSE"))
        .await
        .expect("PAUSE returns once transactions in flight are done")
        .expect("pause");
    // No backend left open: the database can go.
    let open: i64 = admin
        .client
        .simple_query("SHOW POOLS")
        .await
        .expect("show pools")
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                r.get("sv_active")
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0)
                    + r.get("sv_idle")
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0),
            ),
            _ => None,
        })
        .sum();
    assert_eq!(open, 0, "backends still open after PAUSE");
    let before_restart = done.load(Ordering::Relaxed);
    let mut db = tokio::task::spawn_blocking(move || {
        db.restart().expect("the database restarts");
        db
    })
    .await
    .expect("no panic");
    assert!(
        done.load(Ordering::Relaxed) <= before_restart + 4,
        "work ran while paused"
    );
    admin.client.simple_query("RESUME").await.expect("resume");
    let resumed_at = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workload {
        w.await
            .expect("no panic")
            .unwrap_or_else(|e| panic!("a client saw an error: {e}"));
    }
    assert!(
        done.load(Ordering::Relaxed) > resumed_at,
        "the workload went on after RESUME"
    );
    shutdown.force();
    tokio::task::spawn_blocking(move || db.stop())
        .await
        .expect("no panic");
}
