//! The throwaway PostgreSQL that `pgshield dev`, the tests and the benchmarks stand on:
//! it starts, it stops without leaving anything behind, and when PostgreSQL cannot start
//! it says why at once.

use std::time::{Duration, Instant};

use pgshield::devdb::{DevDb, DevDbOptions};

/// The tests look at this process's cluster directories: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn leftover_dirs() -> Vec<String> {
    let prefix = format!("pgshield-pg-{}-", std::process::id());
    std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with(&prefix))
        .collect()
}

#[test]
fn a_cluster_starts_accepts_connections_and_stopping_removes_everything() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut db = DevDb::start(&DevDbOptions::default()).expect("starts");
    let (dir, port) = (db.dir().to_owned(), db.port());
    assert!(dir.join("data/PG_VERSION").exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    assert!(!db.version().is_empty());
    db.stop();
    assert!(!dir.exists(), "{} removed", dir.display());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server is gone"
    );
}

#[test]
fn a_server_that_cannot_start_is_reported_at_once_with_its_log_and_leaves_nothing_behind() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let err = DevDb::start(&DevDbOptions {
        settings: vec![("shared_buffers".into(), "plenty".into())],
        ..DevDbOptions::default()
    })
    .expect_err("PostgreSQL refuses the setting");
    let message = err.to_string();
    assert!(
        message.contains("shared_buffers"),
        "the log says why: {message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        leftover_dirs().is_empty(),
        "left behind: {:?}",
        leftover_dirs()
    );
}
