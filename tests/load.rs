//! The reason pgshield exists: a thousand clients at once, against a PostgreSQL that
//! allows twenty connections. Through pgshield with five backends they all succeed, and
//! the database never sees more than five of pgshield's connections; straight at
//! PostgreSQL, the same burst fails.
//!
//! The two tests share the cluster's connection slots, so they take turns.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{backends_of, sqlstate, TestProxy};
use tokio::sync::Mutex;

const CLIENTS: usize = 1000;

static TURN: Mutex<()> = Mutex::const_new(());

/// Runs `CLIENTS` concurrent connect → `SELECT 1` → disconnect; returns the errors.
async fn burst(config: tokio_postgres::Config) -> Vec<tokio_postgres::Error> {
    let config = Arc::new(config);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let config = Arc::clone(&config);
            tokio::spawn(async move {
                let conn = common::connect(&config).await?;
                let n: i32 = conn
                    .client
                    .query_one("SELECT $1::int", &[&(i as i32)])
                    .await?
                    .get(0);
                assert_eq!(n, i as i32);
                Ok::<_, tokio_postgres::Error>(())
            })
        })
        .collect();
    let mut errors = Vec::new();
    for task in tasks {
        if let Err(e) = task.await.expect("client task") {
            errors.push(e);
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_share_five_backends_and_all_succeed() {
    let _turn = TURN.lock().await;
    common::create_role("load_pooled", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmode = \"session\"\nmax_size = 5\n[users.load_pooled]\npassword = \"pw\"\n",
    )
    .await;

    // Watch pg_stat_activity for the whole run.
    let admin = common::admin().await;
    let most = Arc::new(AtomicI64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (most, stop) = (Arc::clone(&most), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = backends_of(&admin, "load_pooled").await;
                most.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let errors = tokio::time::timeout(
        Duration::from_secs(300),
        burst(proxy.config("load_pooled", "pw")),
    )
    .await
    .expect("the burst completes");
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();

    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} failed, first: {}",
        errors.len(),
        errors[0]
    );
    let most = most.load(Ordering::Relaxed);
    assert!(most <= 5, "PostgreSQL saw {most} backends from pgshield");
    assert!(most >= 1, "the watcher saw the pool at work");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_thousand_clients_straight_at_postgres_fail() {
    let _turn = TURN.lock().await;
    common::create_role("load_direct", "pw").await;
    let errors = tokio::time::timeout(
        Duration::from_secs(300),
        burst(common::direct_config("load_direct", "pw")),
    )
    .await
    .expect("the burst completes");
    let refused = errors
        .iter()
        .filter(|e| sqlstate(e) == Some("53300"))
        .count();
    assert!(
        refused > 0,
        "PostgreSQL with max_connections = 20 refused none of {CLIENTS} concurrent clients ({} other errors)",
        errors.len()
    );
}
