//! Real drivers through transaction pooling: asyncpg, psycopg 3, node-postgres and pgjdbc
//! (tests/drivers/, installed by scripts/drivers.sh, which scripts/test.sh runs), and sqlx
//! (a dev-dependency, `sqlx_client` below). Each driver's client runs ten clients at once
//! through two backends (named and unnamed statements, per-client settings, transactions,
//! cursors, pipelines, COPY, errors), and then a schema change under a prepared
//! `SELECT *` both straight against PostgreSQL and through pgshield: what the driver sees
//! must be the same.

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

/// A driver's client: a script run with `command`'s command line, or sqlx in this process.
enum Driver {
    Script(Vec<String>),
    Sqlx,
}

impl Driver {
    /// Runs `mode` (load or ddl) against `port`/`db`; what it printed.
    async fn run(&self, mode: &str, port: u16, role: &str, db: &str) -> String {
        match self {
            Driver::Script(cmd) => run(cmd, mode, port, role, db).await,
            Driver::Sqlx => sqlx_client::run(mode, port, role, db).await,
        }
    }
}

async fn driver_works_through_transaction_pooling(driver: &str, role: &str) {
    common::create_role(role, "pw").await;
    let users = format!("[users.{role}]\npassword = \"pw\"\n");
    let two = TestProxy::start(&format!(
        "[pool]\nmode = \"transaction\"\nmax_size = 2\n{users}"
    ))
    .await;
    let cmd = match driver {
        "sqlx" => Driver::Sqlx,
        _ => Driver::Script(command(driver)),
    };
    let load = cmd.run("load", two.addr.port(), role, "app").await;
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
    let direct = cmd.run("ddl", port, role, "postgres").await;
    let proxied = cmd.run("ddl", one.addr.port(), role, "app").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_works_through_transaction_pooling() {
    driver_works_through_transaction_pooling("sqlx", "drv_sqlx").await;
}

/// sqlx's `PgListener` (LISTEN on a connection of its own) through transaction pooling:
/// the listening client is pinned, and gets what another client's `pg_notify` sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_listener_is_pinned_and_notified() {
    let role = "drv_sqlx_listen";
    common::create_role(role, "pw").await;
    let proxy = TestProxy::start(&format!(
        "[pool]\nmode = \"transaction\"\nmax_size = 2\n[users.{role}]\npassword = \"pw\"\n"
    ))
    .await;
    sqlx_client::listen(proxy.addr.port(), role, "app").await;
    assert_eq!(proxy.shared.pins.get(PinReason::Listen), 1);
    proxy.stop().await;
}

/// The sqlx client, as the scripts in tests/drivers/ are for the other drivers: `load`
/// prints the most backends one client saw, `ddl` how a prepared `SELECT *` fared across
/// an added column.
mod sqlx_client {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Barrier;

    use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
    use sqlx::{Connection, Executor, Row};

    fn options(port: u16, role: &str, db: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .username(role)
            .password("pw")
            .database(db)
    }

    /// The SQLSTATE of a failed query.
    fn code(e: &sqlx::Error) -> String {
        e.as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned())
            .unwrap_or_else(|| panic!("not a server error: {e}"))
    }

    pub async fn run(mode: &str, port: u16, role: &str, db: &str) -> String {
        let options = options(port, role, db);
        match mode {
            "load" => {
                // (Logged in before any starts, so that they overlap: a client's work
                // takes less time than a login.)
                let start = Arc::new(Barrier::new(10));
                let clients: Vec<_> = (0..10)
                    .map(|i| tokio::spawn(client(options.clone(), i, start.clone())))
                    .collect();
                let mut most = 0;
                for c in clients {
                    most = most.max(c.await.expect("an sqlx client"));
                }
                pooled(options).await;
                format!("most backends one client saw: {most}\n")
            }
            _ => ddl(options, role).await,
        }
    }

    /// One client: its own statement_timeout, parameters, more distinct statements than
    /// its statement cache holds (so sqlx closes the oldest), committed and dropped
    /// (rolled back) transactions, an error, a ping (a lone Sync) and a simple Query of
    /// two statements, fifteen times.
    async fn client(options: PgConnectOptions, i: i32, start: Arc<Barrier>) -> usize {
        let mut c = PgConnection::connect_with(&options.statement_cache_capacity(4))
            .await
            .expect("sqlx connects");
        start.wait().await;
        let timeout = format!("{}s", i + 1);
        sqlx::query(&format!("SET statement_timeout = '{timeout}'"))
            .execute(&mut c)
            .await
            .expect("SET");
        let mut pids = HashSet::new();
        for k in 0..15 {
            let sum: i32 = sqlx::query_scalar("SELECT $1::int + $2::int")
                .bind(i)
                .bind(k)
                .fetch_one(&mut c)
                .await
                .expect("a sum");
            assert_eq!(sum, i + k);
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut c)
                .await
                .expect("a pid");
            pids.insert(pid);
            let shown: String = sqlx::query_scalar("SHOW statement_timeout")
                .fetch_one(&mut c)
                .await
                .expect("SHOW");
            assert_eq!(shown, timeout);
            let joined: String = sqlx::query_scalar(&format!("SELECT $1::text || '-{}'", k % 6))
                .bind(i.to_string())
                .fetch_one(&mut c)
                .await
                .expect("a text");
            assert_eq!(joined, format!("{i}-{}", k % 6));

            let mut tx = c.begin().await.expect("BEGIN");
            let rows: Vec<i32> = sqlx::query_scalar("SELECT g FROM generate_series(1, $1::int) g")
                .bind(k + 1)
                .fetch_all(&mut *tx)
                .await
                .expect("rows");
            assert_eq!(rows, (1..=k + 1).collect::<Vec<_>>());
            tx.commit().await.expect("COMMIT");
            {
                // Dropped without a commit: sqlx sends the ROLLBACK ahead of its next query.
                let mut tx = c.begin().await.expect("BEGIN");
                sqlx::query("SET LOCAL statement_timeout = '9s'")
                    .execute(&mut *tx)
                    .await
                    .expect("SET LOCAL");
            }
            let failed = sqlx::query_scalar::<_, i32>("SELECT 1 / $1::int")
                .bind(0)
                .fetch_one(&mut c)
                .await
                .expect_err("a division by zero");
            assert_eq!(code(&failed), "22012");
            c.ping().await.expect("ping");
            c.execute("SELECT 1; SELECT 2")
                .await
                .expect("a simple Query");
        }
        let shown: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&mut c)
            .await
            .expect("SHOW");
        assert_eq!(shown, timeout);
        c.close().await.expect("Terminate");
        pids.len()
    }

    /// A pool of two connections shared by six tasks, each checked with a ping before use.
    async fn pooled(options: PgConnectOptions) {
        let pool = PgPoolOptions::new()
            .min_connections(2)
            .max_connections(2)
            .test_before_acquire(true)
            .connect_with(options)
            .await
            .expect("a pool");
        let tasks: Vec<_> = (0..6)
            .map(|k: i32| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    for n in 0..10 {
                        let product: i32 = sqlx::query_scalar("SELECT $1::int * $2::int")
                            .bind(k)
                            .bind(n)
                            .fetch_one(&pool)
                            .await
                            .expect("a product");
                        assert_eq!(product, k * n);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("a pooled task");
        }
        pool.close().await;
    }

    async fn ddl(options: PgConnectOptions, role: &str) -> String {
        let mut c = PgConnection::connect_with(&options).await.expect("sqlx");
        let table = format!("drv_ddl_{role}");
        c.execute(
            format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (a int); \
                 INSERT INTO {table} VALUES (1)"
            )
            .as_str(),
        )
        .await
        .expect("the table");
        let select = format!("SELECT * FROM {table}");
        // Another client holds the same statement (through pgshield, the same server
        // statement).
        let mut other = PgConnection::connect_with(&options).await.expect("sqlx");
        sqlx::query(&select)
            .fetch_one(&mut other)
            .await
            .expect("a row");
        let mut out = Vec::new();
        for _ in 0..2 {
            out.push(fetch_len(&mut c, &select).await);
        }
        c.execute(format!("ALTER TABLE {table} ADD COLUMN b int DEFAULT 2").as_str())
            .await
            .expect("ALTER");
        for _ in 0..3 {
            out.push(fetch_len(&mut c, &select).await);
        }
        c.execute(format!("DROP TABLE {table}").as_str())
            .await
            .expect("DROP");
        other.close().await.expect("Terminate");
        c.close().await.expect("Terminate");
        format!("ddl: {}\n", out.join(" "))
    }

    /// How many columns `select`'s row had, or the SQLSTATE it failed with.
    async fn fetch_len(c: &mut PgConnection, select: &str) -> String {
        match sqlx::query(select).fetch_one(c).await {
            Ok(row) => row.len().to_string(),
            Err(e) => format!("ERR {}", code(&e)),
        }
    }

    /// A `PgListener` listens; another connection of the same pool notifies it.
    pub async fn listen(port: u16, role: &str, db: &str) {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options(port, role, db))
            .await
            .expect("a pool");
        let mut listener = PgListener::connect_with(&pool).await.expect("a listener");
        listener.listen("drv_sqlx_chan").await.expect("LISTEN");
        for n in 0..3 {
            let payload = format!("hello {n}");
            sqlx::query("SELECT pg_notify('drv_sqlx_chan', $1)")
                .bind(&payload)
                .execute(&pool)
                .await
                .expect("pg_notify");
            let got = tokio::time::timeout(Duration::from_secs(10), listener.recv())
                .await
                .expect("a notification within 10 s")
                .expect("a notification");
            assert_eq!(
                (got.channel(), got.payload()),
                ("drv_sqlx_chan", payload.as_str())
            );
        }
        drop(listener);
        pool.close().await;
    }
}
