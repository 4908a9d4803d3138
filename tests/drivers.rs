//! Real drivers through transaction pooling: asyncpg, psycopg 3, node-postgres and pgjdbc
//! (tests/drivers/, installed by scripts/drivers.sh, which scripts/test.sh runs). Each
//! driver's own script runs ten clients at once through two backends (named and unnamed
//! statements, per-client settings, transactions, cursors, pipelines, COPY, errors), and
//! then a schema change under a prepared `SELECT *` both straight against PostgreSQL and
//! through pgshield: what the driver sees must be the same.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::TestProxy;
use pgshield::client::sql::PinReason;

/// Where scripts/drivers.sh put the drivers.
fn drivers_dir() -> PathBuf {
    std::env::var_os("PGSHIELD_DRIVERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/drivers"))
}

fn script(name: &str) -> String {
    format!("{}/tests/drivers/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A driver's command line, without the script's own arguments.
fn command(driver: &str) -> Vec<String> {
    let dir = drivers_dir();
    let missing = |what: &std::path::Path| {
        assert!(
            what.exists(),
            "{} is missing: run scripts/drivers.sh (scripts/test.sh does)",
            what.display()
        )
    };
    match driver {
        "asyncpg" | "psycopg" => {
            let python = dir.join("venv/bin/python");
            missing(&python);
            vec![
                python.display().to_string(),
                script(&format!("{driver}_client.py")),
            ]
        }
        "node-postgres" => {
            missing(&dir.join("node/node_modules/pg"));
            vec!["node".into(), script("node_pg_client.js")]
        }
        "pgjdbc" => {
            let jar = PathBuf::from("/usr/share/java/postgresql.jar");
            missing(&jar);
            // (Beside the drivers, compiled afresh each run: not one more directory in
            // /tmp per run.)
            let classes = dir.join("jdbc-classes");
            let built = std::process::Command::new("javac")
                .args([
                    "-d",
                    &classes.display().to_string(),
                    &script("JdbcClient.java"),
                ])
                .status()
                .expect("javac runs (scripts/drivers.sh installs a JDK)");
            assert!(built.success(), "JdbcClient.java compiles");
            vec![
                "java".into(),
                "-cp".into(),
                format!("{}:{}", classes.display(), jar.display()),
                "JdbcClient".into(),
            ]
        }
        _ => unreachable!("{driver}"),
    }
}

/// Runs `mode` (load or ddl) of a driver's script against `port`/`db`; its output.
async fn run(cmd: &[String], mode: &str, port: u16, role: &str, db: &str) -> String {
    let mut child = tokio::process::Command::new(&cmd[0]);
    child
        .args(&cmd[1..])
        .args([mode, &port.to_string(), role, "pw", db, role])
        .env(
            "NODE_PATH",
            drivers_dir()
                .join("node/node_modules")
                .display()
                .to_string(),
        )
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), child.output())
        .await
        .unwrap_or_else(|_| panic!("{cmd:?} {mode}: no answer in 180 s"))
        .expect("the driver's script starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} {mode} against port {port} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn driver_works_through_transaction_pooling(driver: &str, role: &str) {
    common::create_role(role, "pw").await;
    let users = format!("[users.{role}]\npassword = \"pw\"\n");
    let two = TestProxy::start(&format!(
        "[pool]\nmode = \"transaction\"\nmax_size = 2\n{users}"
    ))
    .await;
    let cmd = command(driver);
    let load = run(&cmd, "load", two.addr.port(), role, "app").await;
    let most: usize = load
        .trim()
        .strip_prefix("most backends one client saw: ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{driver}: unexpected output {load}"));
    assert!(most >= 2, "{driver}: clients never hopped between backends");
    // Nothing a driver does on its own (asyncpg's pool reset included) pins a client.
    for reason in PinReason::ALL {
        let pins = two.shared.pins.get(reason);
        assert_eq!(
            pins,
            0,
            "{driver}: {pins} clients pinned for {}",
            reason.name()
        );
    }
    two.stop().await;

    // One backend, so that the statement prepared before the change is the one the
    // driver runs after it, as it is straight against PostgreSQL.
    let one = TestProxy::start(&format!(
        "[pool]\nmode = \"transaction\"\nmax_size = 1\n{users}"
    ))
    .await;
    let port = common::cluster().port();
    let direct = run(&cmd, "ddl", port, role, "postgres").await;
    let proxied = run(&cmd, "ddl", one.addr.port(), role, "app").await;
    assert!(direct.starts_with("ddl: 1 1 "), "{driver}: {direct}");
    assert_eq!(proxied, direct, "{driver}: through pgshield, then straight");
    one.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_works_through_transaction_pooling() {
    driver_works_through_transaction_pooling("asyncpg", "drv_asyncpg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_works_through_transaction_pooling() {
    driver_works_through_transaction_pooling("psycopg", "drv_psycopg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_works_through_transaction_pooling() {
    driver_works_through_transaction_pooling("node-postgres", "drv_node").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_works_through_transaction_pooling() {
    driver_works_through_transaction_pooling("pgjdbc", "drv_jdbc").await;
}
