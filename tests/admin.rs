//! The admin console: PgBouncer's commands with PgBouncer's columns, PAUSE and RESUME
//! under a workload, and the extras (SHOW PINS, SHOW PREPARED).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{sqlstate, TestProxy};
use tokio_postgres::SimpleQueryMessage;

/// Runs an admin command; returns its rows as column → value maps.
async fn show(admin: &tokio_postgres::Client, command: &str) -> Vec<HashMap<String, String>> {
    admin
        .simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), row.get(i).unwrap_or("").to_owned()))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The SQLSTATE an admin command that must fail fails with.
/// The columns `command` answers NULL in, by row: PgBouncer never sends one, and tools
/// scan its columns into strings (Datadog's check parses the times).
async fn nulls(admin: &tokio_postgres::Client, command: &str) -> Vec<(usize, String)> {
    let rows = admin.simple_query(command).await.expect(command);
    let rows = rows.into_iter().filter_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let mut found = Vec::new();
    for (n, row) in rows.enumerate() {
        for (i, column) in row.columns().iter().enumerate() {
            if row.get(i).is_none() {
                found.push((n, column.name().to_owned()));
            }
        }
    }
    found
}

async fn refused(admin: &tokio_postgres::Client, command: &str) -> String {
    let err = admin.simple_query(command).await.expect_err(command);
    sqlstate(&err).unwrap_or_default().to_owned()
}

async fn proxy(role: &str, extra: &str) -> TestProxy {
    common::create_role(role, "pw").await;
    common::create_role(&format!("{role}_ops"), "pw").await;
    TestProxy::start(&sections(role, extra)).await
}

/// The configuration `proxy` runs with: `extra`, the user `role` (password `pw`) and
/// the admin user `{role}_ops`.
fn sections(role: &str, extra: &str) -> String {
    format!(
        "{extra}[users.{role}]\npassword = \"pw\"\n[users.{role}_ops]\npassword = \"pw\"\n\
         [admin]\nhttp_listen = \"\"\nusers = [\"{role}_ops\"]\nstats_period = \"1s\"\n"
    )
}

async fn console(proxy: &TestProxy, user: &str) -> common::Conn {
    let mut c = proxy.config(user, "pw");
    c.dbname("pgshield");
    common::connect(&c).await.expect("admin login")
}

const POOLS_COLUMNS: &[&str] = &[
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
];

#[tokio::test]
async fn pgbouncer_commands_answer_with_pgbouncers_columns() {
    let proxy = proxy("adm_cols", "[pool]\nmax_size = 1\n").await;
    let admin = console(&proxy, "adm_cols_ops").await;
    let a = proxy.connect("adm_cols", "pw").await.expect("a");
    let b = proxy.connect("adm_cols", "pw").await.expect("b");
    // A holds the only backend; B queues.
    a.client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let queued = tokio::spawn(async move {
        b.client
            .simple_query("SELECT 2")
            .await
            .expect("b runs later");
        b
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pools = show(&admin.client, "SHOW POOLS").await;
    let mine = pools
        .iter()
        .find(|r| r["user"] == "adm_cols")
        .expect("the pool");
    for column in POOLS_COLUMNS {
        assert!(mine.contains_key(*column), "SHOW POOLS lacks {column}");
    }
    assert_eq!(mine["database"], "app");
    assert_eq!(mine["cl_waiting"], "1", "{mine:?}");
    assert_eq!(mine["cl_active"], "1", "{mine:?}");
    assert_eq!(mine["sv_active"], "1", "{mine:?}");
    assert_eq!(mine["pool_mode"], "transaction");
    // B has waited about 200 ms, since its query came.
    let micros = |row: &HashMap<String, String>, s: &str, us: &str| {
        let n = |c: &str| row[c].parse::<u64>().expect("a number");
        n(s) * 1_000_000 + n(us)
    };
    let maxwait = micros(mine, "maxwait", "maxwait_us");
    assert!((100_000..10_000_000).contains(&maxwait), "{mine:?}");
    let clients = show(&admin.client, "SHOW CLIENTS").await;
    let waiting = clients
        .iter()
        .find(|r| r["user"] == "adm_cols" && r["state"] == "waiting")
        .expect("B, waiting");
    // (Both counted from when B began to wait; SHOW CLIENTS ran later.)
    let wait = micros(waiting, "wait", "wait_us");
    assert!(
        wait + 1_000 >= maxwait && wait < maxwait + 5_000_000,
        "{waiting:?}, {mine:?}"
    );
    a.client.batch_execute("COMMIT").await.expect("commit");
    let b = queued.await.expect("no panic");

    let columns: &[(&str, &[&str])] = &[
        (
            "SHOW STATS",
            &[
                "database",
                "total_xact_count",
                "total_query_count",
                "total_received",
                "total_sent",
                "total_xact_time",
                "total_query_time",
                "total_wait_time",
                "avg_xact_count",
                "avg_query_count",
                "avg_recv",
                "avg_sent",
                "avg_xact_time",
                "avg_query_time",
                "avg_wait_time",
            ],
        ),
        (
            "SHOW STATS_TOTALS",
            &[
                "database",
                "xact_count",
                "query_count",
                "bytes_received",
                "bytes_sent",
                "xact_time",
                "query_time",
                "wait_time",
            ],
        ),
        (
            "SHOW STATS_AVERAGES",
            &[
                "database",
                "xact_count",
                "query_count",
                "bytes_received",
                "bytes_sent",
                "xact_time",
                "query_time",
                "wait_time",
            ],
        ),
        (
            "SHOW DATABASES",
            &[
                "name",
                "host",
                "port",
                "database",
                "force_user",
                "pool_size",
                "min_pool_size",
                "reserve_pool",
                "pool_mode",
                "max_connections",
                "current_connections",
                "paused",
                "disabled",
            ],
        ),
        ("SHOW USERS", &["name", "pool_mode"]),
        ("SHOW CONFIG", &["key", "value", "default", "changeable"]),
        ("SHOW LISTS", &["list", "items"]),
        ("SHOW VERSION", &["version"]),
        ("SHOW HELP", &["command"]),
    ];
    for (command, expected) in columns {
        let rows = show(&admin.client, command).await;
        let first = rows.first().unwrap_or_else(|| panic!("{command}: no rows"));
        for column in *expected {
            assert!(
                first.contains_key(*column),
                "{command} lacks {column}: {first:?}"
            );
        }
    }
    let totals = show(&admin.client, "SHOW STATS_TOTALS").await;
    let app = totals.iter().find(|r| r["database"] == "app").expect("app");
    assert!(app["xact_count"].parse::<u64>().unwrap() >= 2, "{app:?}");
    assert!(
        app["wait_time"].parse::<u64>().unwrap() >= 100_000,
        "B waited: {app:?}"
    );
    // Averages are per stats_period (1 s here): a period with transactions in it shows them.
    for _ in 0..20 {
        b.client.simple_query("SELECT 3").await.expect("b");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let averages = show(&admin.client, "SHOW STATS_AVERAGES").await;
    let avg = averages
        .iter()
        .find(|r| r["database"] == "app")
        .expect("app");
    assert!(avg["xact_count"].parse::<u64>().unwrap() > 0, "{avg:?}");
    assert!(avg["query_time"].parse::<u64>().unwrap() > 0, "{avg:?}");
    let config = show(&admin.client, "SHOW CONFIG").await;
    let size = config
        .iter()
        .find(|r| r["key"] == "pool.max_size")
        .expect("pool.max_size");
    assert_eq!(
        (size["value"].as_str(), size["default"].as_str()),
        ("1", "20")
    );
    for key in ["max_client_conn", "default_pool_size", "pool_mode"] {
        assert!(config.iter().any(|r| r["key"] == key), "PgBouncer's {key}");
    }
    let version = show(&admin.client, "SHOW VERSION").await;
    assert!(version[0]["version"].starts_with("pgshield "));
    let lists = show(&admin.client, "SHOW LISTS").await;
    assert!(lists.iter().any(|r| r["list"] == "pools"));
}

#[tokio::test]
async fn only_admin_users_get_in_and_unknown_commands_are_clear_errors() {
    let proxy = proxy("adm_who", "").await;
    let mut c = proxy.config("adm_who", "pw");
    c.dbname("pgshield");
    let err = common::connect(&c).await.err().expect("not an admin");
    assert_eq!(sqlstate(&err), Some("28000"));
    let admin = console(&proxy, "adm_who_ops").await;
    for (command, code) in [
        ("SHOW NONSENSE", "08P01"),
        ("SELECT 1", "08P01"),
        ("SET pool_mode = session", "0A000"),
    ] {
        assert_eq!(refused(&admin.client, command).await, code, "{command}");
    }
    // The console still answers after errors.
    assert!(!show(&admin.client, "SHOW VERSION").await.is_empty());
}

/// A user of `admin.stats_users` (PgBouncer's stats_users: what an exporter logs in as)
/// may look, not act.
#[tokio::test]
async fn stats_users_may_show_but_not_act() {
    common::create_role("adm_stats", "pw").await;
    common::create_role("adm_stats_ops", "pw").await;
    common::create_role("adm_stats_look", "pw").await;
    let proxy = TestProxy::start(&format!(
        "[users.adm_stats_look]\npassword = \"pw\"\n{}stats_users = [\"adm_stats_look\"]\n",
        sections("adm_stats", "")
    ))
    .await;
    let look = console(&proxy, "adm_stats_look").await;
    assert!(!show(&look.client, "SHOW POOLS").await.is_empty());
    assert!(!show(&look.client, "show stats;").await.is_empty());
    for command in [
        "PAUSE",
        "RESUME",
        "RECONNECT",
        "SHUTDOWN",
        "KILL app",
        "RELOAD",
    ] {
        assert_eq!(refused(&look.client, command).await, "42501", "{command}");
    }
    let ops = console(&proxy, "adm_stats_ops").await;
    ops.client
        .simple_query("RECONNECT")
        .await
        .expect("an admin acts");
    // Nobody else gets in.
    let mut c = proxy.config("adm_stats", "pw");
    c.dbname("pgshield");
    let err = common::connect(&c).await.err().expect("not an admin");
    assert_eq!(sqlstate(&err), Some("28000"));
}

#[tokio::test]
async fn show_pins_and_show_prepared_list_what_pgbouncer_cannot() {
    let proxy = proxy("adm_pins", "").await;
    let admin = console(&proxy, "adm_pins_ops").await;
    let conn = proxy.connect("adm_pins", "pw").await.expect("login");
    conn.client
        .batch_execute("LISTEN adm")
        .await
        .expect("listen");
    let st = conn
        .client
        .prepare("SELECT $1::int * 7")
        .await
        .expect("prepare");
    conn.client.query_one(&st, &[&6]).await.expect("run");
    let pins = show(&admin.client, "SHOW PINS").await;
    assert!(
        pins.iter()
            .any(|r| r["pool"] == "app/adm_pins" && r["reason"] == "listen"),
        "{pins:?}"
    );
    let prepared = show(&admin.client, "SHOW PREPARED").await;
    assert!(
        prepared
            .iter()
            .any(|r| r["query"] == "SELECT $1::int * 7" && r["accepted"] == "yes"),
        "{prepared:?}"
    );
    drop(conn);
    for _ in 0..100 {
        if show(&admin.client, "SHOW PINS")
            .await
            .iter()
            .all(|r| r["pool"] != "app/adm_pins")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("a departed client is still listed as pinned");
}

/// Client A of `role` begins a transaction, then the console `admin` sends PAUSE, which
/// waits for it: A, and the PAUSE under way (its task gives the console back).
async fn pause_behind_a_transaction(
    proxy: &TestProxy,
    role: &str,
    admin: common::Conn,
) -> (common::Conn, tokio::task::JoinHandle<common::Conn>) {
    let a = proxy.connect(role, "pw").await.expect("a");
    a.client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("a begins");
    let pausing = tokio::spawn(async move {
        admin.client.simple_query("PAUSE").await.expect("pause");
        admin
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !pausing.is_finished(),
        "PAUSE returned with a transaction in flight"
    );
    (a, pausing)
}

/// Ctrl-C in the console (a CancelRequest with its key) resumes every pool, as in
/// PgBouncer: a PAUSE waiting on a transaction that does not end can be given up.
#[tokio::test]
async fn a_cancel_from_the_console_resumes_every_pool() {
    let proxy = proxy(
        "adm_cancel",
        "[pool]\nmax_size = 2\nborrow_timeout = \"30s\"\n",
    )
    .await;
    let admin = console(&proxy, "adm_cancel_ops").await;
    let cancel = admin.client.cancel_token();
    let (a, pausing) = pause_behind_a_transaction(&proxy, "adm_cancel", admin).await;
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let _admin = tokio::time::timeout(Duration::from_secs(10), pausing)
        .await
        .expect("PAUSE gives up once resumed")
        .expect("no panic");
    // Resumed: a new client's work runs at once.
    let b = proxy.connect("adm_cancel", "pw").await.expect("b");
    let ran = tokio::time::timeout(Duration::from_secs(5), b.client.simple_query("SELECT 1"));
    ran.await.expect("not paused").expect("query");
    a.client.batch_execute("COMMIT").await.expect("a ends");
}

#[tokio::test]
async fn pause_lets_transactions_finish_holds_new_ones_and_resume_releases_them() {
    let proxy = proxy(
        "adm_pause",
        "[pool]\nmax_size = 2\nborrow_timeout = \"30s\"\n",
    )
    .await;
    let admin = console(&proxy, "adm_pause_ops").await;
    let watcher = common::admin().await;
    let b = proxy.connect("adm_pause", "pw").await.expect("b");
    let (a, pausing) = pause_behind_a_transaction(&proxy, "adm_pause", admin).await;
    a.client
        .batch_execute("SELECT 2; COMMIT")
        .await
        .expect("a finishes");
    let admin = tokio::time::timeout(Duration::from_secs(10), pausing)
        .await
        .expect("PAUSE returns once the transaction is over")
        .expect("no panic");
    // Paused: no backend is open, and new work waits.
    assert_eq!(common::backends_of(&watcher, "adm_pause").await, 0);
    let waiting = tokio::spawn(async move {
        let n: i32 = b
            .client
            .query_one("SELECT 42", &[])
            .await
            .expect("runs after RESUME")
            .get(0);
        n
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a query ran while paused");
    let pools = show(&admin.client, "SHOW POOLS").await;
    let mine = pools
        .iter()
        .find(|r| r["user"] == "adm_pause")
        .expect("pool");
    assert_eq!(mine["cl_waiting"], "1", "{mine:?}");
    let databases = show(&admin.client, "SHOW DATABASES").await;
    assert_eq!(
        databases.iter().find(|r| r["name"] == "app").expect("app")["paused"],
        "1"
    );
    admin.client.simple_query("RESUME").await.expect("resume");
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served after RESUME")
        .expect("no panic");
    assert_eq!(answer, 42);
    a.client
        .simple_query("SELECT 3")
        .await
        .expect("a carries on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_backend_is_health_checked_waits_as_for_a_borrow() {
    let proxy = proxy(
        "adm_check",
        "[pool]\nmax_size = 2\nborrow_timeout = \"10s\"\nhealth_check_after = \"100ms\"\n\
         server_connect_timeout = \"5s\"\n",
    )
    .await;
    let admin = console(&proxy, "adm_check_ops").await;
    let conn = proxy.connect("adm_check", "pw").await.expect("login");
    let frozen: i32 = conn
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // The idle backend stops answering; the next borrow's health check waits on it.
    let stopped = common::Frozen::new(frozen);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = conn.client;
    let query = tokio::spawn(async move {
        client
            .query_one("SELECT 7", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pools = show(&admin.client, "SHOW POOLS").await;
    let clients = show(&admin.client, "SHOW CLIENTS").await;
    drop(stopped);
    // Counted as waiting, as a client queued for a backend is (and, like one, watched:
    // a hang-up or a KILL ends the wait).
    let mine = pools
        .iter()
        .find(|r| r["user"] == "adm_check")
        .expect("pool");
    assert_eq!(mine["cl_waiting"], "1", "{mine:?}");
    let me = clients
        .iter()
        .find(|r| r["user"] == "adm_check")
        .expect("client");
    assert_eq!(me["state"], "waiting", "{me:?}");
    let answer = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(answer.expect("the query runs"), 7);
    proxy.stop().await;
}

#[tokio::test]
async fn a_backend_given_back_between_transactions_is_idle_in_show_pools() {
    let proxy = proxy("adm_warm", "").await;
    let admin = console(&proxy, "adm_warm_ops").await;
    let conn = proxy.connect("adm_warm", "pw").await.expect("login");
    for _ in 0..3 {
        conn.client.simple_query("SELECT 1").await.expect("query");
        let pools = show(&admin.client, "SHOW POOLS").await;
        let mine = pools
            .iter()
            .find(|r| r["user"] == "adm_warm")
            .expect("the pool");
        assert_eq!(
            (mine["sv_idle"].as_str(), mine["sv_active"].as_str()),
            ("1", "0"),
            "{mine:?}"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn show_clients_and_servers_and_kill_client() {
    let proxy = proxy("adm_kill", "").await;
    let admin = console(&proxy, "adm_kill_ops").await;
    let a = proxy.connect("adm_kill", "pw").await.expect("a");
    let b = proxy.connect("adm_kill", "pw").await.expect("b");
    a.client.batch_execute("BEGIN").await.expect("a begins");
    let a_pid: i32 = a
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    b.client.simple_query("SELECT 1").await.expect("b");

    let clients = show(&admin.client, "SHOW CLIENTS").await;
    let mine: Vec<_> = clients.iter().filter(|c| c["user"] == "adm_kill").collect();
    assert_eq!(mine.len(), 2, "{clients:?}");
    for column in [
        "type",
        "addr",
        "port",
        "connect_time",
        "ptr",
        "link",
        "tls",
        "application_name",
    ] {
        assert!(mine[0].contains_key(column), "SHOW CLIENTS lacks {column}");
    }
    assert!(mine
        .iter()
        .all(|c| c["type"] == "C" && c["addr"] == "127.0.0.1"));
    // The local end is the listener's address (taken from it, not asked of each socket).
    let port = proxy.addr.port().to_string();
    assert!(
        mine.iter()
            .all(|c| c["local_addr"] == "127.0.0.1" && c["local_port"] == port),
        "{mine:?}"
    );
    // A holds a backend in its transaction: its client row links to a server row with its pid.
    let servers = show(&admin.client, "SHOW SERVERS").await;
    for command in ["SHOW CLIENTS", "SHOW SERVERS"] {
        assert_eq!(nulls(&admin.client, command).await, [], "{command}");
    }
    let active = servers
        .iter()
        .find(|s| s["state"] == "active" && s["remote_pid"] == a_pid.to_string())
        .unwrap_or_else(|| panic!("A's backend in {servers:?}"));
    let a_row = mine
        .iter()
        .find(|c| c["link"] == active["ptr"])
        .expect("A's client row links to its server");
    assert!(servers
        .iter()
        .any(|s| s["user"] == "adm_kill" && s["state"] == "idle"));

    // KILL_CLIENT ends A (its transaction is rolled back by the closed backend); B goes on.
    admin
        .client
        .simple_query(&format!("KILL_CLIENT {}", a_row["ptr"]))
        .await
        .expect("kill_client");
    let err = a
        .client
        .simple_query("SELECT 1")
        .await
        .expect_err("A is gone");
    assert!(
        err.is_closed() || sqlstate(&err) == Some("57P01"),
        "{err:?}"
    );
    b.client
        .simple_query("SELECT 2")
        .await
        .expect("B is untouched");
    assert_eq!(refused(&admin.client, "KILL_CLIENT c999999").await, "42601");

    // KILL app: every client of the database goes, and (as PgBouncer) the database is
    // paused: new work waits for RESUME.
    admin.client.simple_query("KILL app").await.expect("kill");
    assert!(
        b.client.simple_query("SELECT 3").await.is_err(),
        "B killed too"
    );
    let c = proxy.connect("adm_kill", "pw").await.expect("a new client");
    let held = tokio::spawn(async move {
        c.client
            .simple_query("SELECT 4")
            .await
            .expect("runs after RESUME");
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "ran while the killed database was paused"
    );
    admin.client.simple_query("RESUME").await.expect("resume");
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("served after RESUME")
        .expect("no panic");
}

#[tokio::test]
async fn shutdown_wait_for_clients_stops_listening_and_serves_connected_clients_until_they_leave() {
    let proxy = proxy("adm_wait", "").await;
    let client = proxy.connect("adm_wait", "pw").await.expect("login");
    let admin = console(&proxy, "adm_wait_ops").await;
    admin
        .client
        .simple_query("SHUTDOWN WAIT_FOR_CLIENTS")
        .await
        .expect("shutdown wait_for_clients");
    // No new clients: the port closes.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(proxy.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "still accepting after SHUTDOWN WAIT_FOR_CLIENTS");
    // The connected client is not dropped between transactions: it carries on.
    for i in 0..20 {
        let n: i32 = client
            .client
            .query_one("SELECT $1::int", &[&i])
            .await
            .expect("served while the old process waits")
            .get(0);
        assert_eq!(n, i);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Once every client has left, pgshield exits.
    drop(client);
    drop(admin);
    assert!(
        proxy.exits_within(Duration::from_secs(10)).await,
        "pgshield did not exit after its last client left"
    );
}

#[tokio::test]
async fn pause_completes_after_a_queued_client_gave_up() {
    let proxy = proxy("adm_gaveup", "[pool]\nmax_size = 1\n").await;
    let admin = console(&proxy, "adm_gaveup_ops").await;
    let holder = proxy.connect("adm_gaveup", "pw").await.expect("login");
    holder.client.simple_query("BEGIN").await.expect("BEGIN");
    let common::Conn { client, done, .. } = proxy.connect("adm_gaveup", "pw").await.expect("login");
    let queued = tokio::spawn(async move {
        let _ = client.simple_query("SELECT 1").await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        proxy
            .shared
            .pools
            .get("app", "adm_gaveup")
            .expect("pool")
            .status()
            .waiting,
        1
    );
    // The queued client hangs up while waiting (its socket closes with its connection task).
    queued.abort();
    done.abort();
    let _ = (queued.await, done.await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.client.simple_query("COMMIT").await.expect("COMMIT");
    tokio::time::timeout(Duration::from_secs(10), admin.client.simple_query("PAUSE"))
        .await
        .expect("PAUSE completes: nobody is left waiting")
        .expect("PAUSE");
    admin.client.simple_query("RESUME").await.expect("RESUME");
}

#[tokio::test]
async fn resume_while_a_pause_waits_ends_the_pause_and_nothing_stays_held() {
    let proxy = proxy("adm_race", "").await;
    let a = proxy.connect("adm_race", "pw").await.expect("a");
    a.client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let pauser = console(&proxy, "adm_race_ops").await;
    let pausing = tokio::spawn(async move {
        pauser.client.simple_query("PAUSE").await.expect("pause");
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pausing.is_finished(), "PAUSE waits for A's transaction");
    let resumer = console(&proxy, "adm_race_ops").await;
    resumer.client.simple_query("RESUME").await.expect("resume");
    tokio::time::timeout(Duration::from_secs(10), pausing)
        .await
        .expect("the pending PAUSE gives up once resumed")
        .expect("no panic");
    // Not paused: A finishes and carries on, and its backend is kept, not closed.
    a.client.batch_execute("COMMIT").await.expect("commit");
    let first: i32 = a
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again: i32 = a
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    assert_eq!(again, first, "idle backends are no longer closed");
}

/// Runs `SELECT pg_sleep(0.02)` in a loop until `stop`; returns how many ran.
fn looping_client(
    conn: common::Conn,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Result<u64, tokio_postgres::Error>> {
    tokio::spawn(async move {
        let mut done = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            conn.client.simple_query("SELECT pg_sleep(0.02)").await?;
            done += 1;
        }
        Ok(done)
    })
}

/// The most backends `role` has open over `samples` looks 50 ms apart.
async fn most_backends(watcher: &tokio_postgres::Client, role: &str, samples: usize) -> i64 {
    let mut most = 0;
    for _ in 0..samples {
        most = most.max(common::backends_of(watcher, role).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    most
}

/// Waits (up to 5 s) until `role` has `n` backends open or fewer.
async fn settles_at_most(watcher: &tokio_postgres::Client, role: &str, n: i64) -> bool {
    for _ in 0..100 {
        if common::backends_of(watcher, role).await <= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn reload_resizes_a_pool_under_load_without_a_client_error() {
    let role = "adm_grow";
    let proxy = proxy(role, "[pool]\nmax_size = 2\nborrow_timeout = \"60s\"\n").await;
    let admin = console(&proxy, "adm_grow_ops").await;
    let watcher = common::admin().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..10 {
        let conn = proxy.connect(role, "pw").await.expect("login");
        clients.push(looping_client(conn, stop.clone()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(common::backends_of(&watcher, role).await <= 2);

    proxy.rewrite_config(&sections(
        role,
        "[pool]\nmax_size = 5\nborrow_timeout = \"60s\"\n",
    ));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    let mut most = 0;
    for _ in 0..100 {
        most = most.max(common::backends_of(&watcher, role).await);
        if most == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(most, 5, "the pool grew to the new max_size");
    let pools = show(&admin.client, "SHOW DATABASES").await;
    let app = pools.iter().find(|r| r["name"] == "app").expect("app");
    assert_eq!(app["pool_size"], "5");
    assert!(most_backends(&watcher, role, 10).await <= 5);

    // And back down while every backend is busy: those over the new size close as
    // they come back, and no more open.
    proxy.rewrite_config(&sections(
        role,
        "[pool]\nmax_size = 2\nborrow_timeout = \"60s\"\n",
    ));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    assert!(settles_at_most(&watcher, role, 2).await, "the pool shrank");
    assert!(most_backends(&watcher, role, 20).await <= 2);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        let done = client.await.expect("no panic").expect("no client error");
        assert!(done > 0);
    }
}

#[tokio::test]
async fn reload_changes_max_db_connections_under_load() {
    let role = "adm_dbcap";
    let port = common::cluster().port();
    let capped = |cap: usize| {
        format!(
            "[pool]\nmax_size = 10\nborrow_timeout = \"60s\"\n[databases.capped]\n\
             host = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\nmax_db_connections = {cap}\n"
        )
    };
    let proxy = proxy(role, &capped(4)).await;
    let admin = console(&proxy, "adm_dbcap_ops").await;
    let watcher = common::admin().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut config = proxy.config(role, "pw");
    config.dbname("capped");
    let mut clients = Vec::new();
    for _ in 0..8 {
        let conn = common::connect(&config).await.expect("login");
        clients.push(looping_client(conn, stop.clone()));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(most_backends(&watcher, role, 10).await, 4);
    // Lowered while every place is in use: backends close until the new cap holds.
    proxy.rewrite_config(&sections(role, &capped(2)));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    assert!(
        settles_at_most(&watcher, role, 2).await,
        "down to the new cap"
    );
    assert!(most_backends(&watcher, role, 20).await <= 2);
    // Raised: room at once.
    proxy.rewrite_config(&sections(role, &capped(3)));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(most_backends(&watcher, role, 20).await, 3);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        let done = client.await.expect("no panic").expect("no client error");
        assert!(done > 0);
    }
    // Lowered by one with three idle backends: one closes, not all three.
    proxy.rewrite_config(&sections(role, &capped(2)));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    assert!(settles_at_most(&watcher, role, 2).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(common::backends_of(&watcher, role).await, 2);
}

/// A reload that removes a database, or its max_db_connections, lets go of the clients
/// waiting on it: RESUME reaches a removed database's paused pools (whose clients stay
/// until they leave), and a borrow waiting for a place under the removed limit gets one.
#[tokio::test]
async fn a_reload_that_removes_a_database_or_its_limit_strands_no_waiting_client() {
    let role = "adm_gone";
    let port = common::cluster().port();
    let database = |name: &str, extra: &str| {
        format!(
            "[databases.{name}]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\n{extra}"
        )
    };
    let pool = "[pool]\nborrow_timeout = \"60s\"\n";
    let both = format!(
        "{pool}{}{}",
        database("gone", ""),
        database("capped", "max_db_connections = 1\n")
    );
    let proxy = proxy(role, &both).await;
    let admin = console(&proxy, "adm_gone_ops").await;
    let client_of = |db: &str| {
        let mut c = proxy.config(role, "pw");
        c.dbname(db);
        c
    };
    // A client of `gone`, paused; a client of `capped` waiting behind one holding its
    // only place.
    let paused = common::connect(&client_of("gone")).await.expect("login");
    admin
        .client
        .simple_query("PAUSE gone")
        .await
        .expect("PAUSE");
    let paused =
        tokio::spawn(async move { paused.client.simple_query("SELECT 1").await.map(|_| ()) });
    let holder = common::connect(&client_of("capped")).await.expect("login");
    holder
        .client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let waiter = common::connect(&client_of("capped")).await.expect("login");
    let waiting =
        tokio::spawn(async move { waiter.client.simple_query("SELECT 2").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!paused.is_finished() && !waiting.is_finished());
    // Both go from the configuration.
    proxy.rewrite_config(&sections(
        role,
        &format!("{pool}{}", database("capped", "")),
    ));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once the limit is gone")
        .expect("no panic")
        .expect("SELECT 2");
    admin
        .client
        .simple_query("RESUME gone")
        .await
        .expect("RESUME of a removed database whose clients wait");
    tokio::time::timeout(Duration::from_secs(5), paused)
        .await
        .expect("answered once resumed")
        .expect("no panic")
        .ok();
    drop(holder);
}

#[tokio::test]
async fn reload_keeps_start_only_keys_and_says_so_and_moves_client_limits() {
    let role = "adm_limits";
    let limited = |n: usize| {
        sections(role, "").replace(
            &format!("[users.{role}]\npassword = \"pw\"\n"),
            &format!("[users.{role}]\npassword = \"pw\"\nmax_client_connections = {n}\n"),
        )
    };
    let proxy = TestProxy::start(&limited(1)).await;
    common::create_role(role, "pw").await;
    common::create_role("adm_limits_ops", "pw").await;
    let mut admin = console(&proxy, "adm_limits_ops").await;
    let first = proxy.connect(role, "pw").await.expect("the one allowed");
    let err = proxy
        .connect(role, "pw")
        .await
        .err()
        .expect("over the limit");
    assert_eq!(sqlstate(&err), Some("53300"));

    // Raised to 2: the client already connected still counts, so one more gets in.
    // admin.stats_period changes too, but only a restart applies it.
    proxy.rewrite_config(&limited(2).replace("stats_period = \"1s\"", "stats_period = \"7s\""));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    let mut notices = Vec::new();
    while let Ok(m) = admin.messages.try_recv() {
        if let tokio_postgres::AsyncMessage::Notice(n) = m {
            notices.push(n.message().to_owned());
        }
    }
    assert!(
        notices
            .iter()
            .any(|n| n.contains("admin.stats_period") && n.contains("next start")),
        "{notices:?}"
    );
    let config = show(&admin.client, "SHOW CONFIG").await;
    let period = config
        .iter()
        .find(|r| r["key"] == "admin.stats_period")
        .expect("admin.stats_period");
    assert_eq!(period["value"], "1s", "the running value stays");
    let second = proxy.connect(role, "pw").await.expect("room for one more");
    let err = proxy
        .connect(role, "pw")
        .await
        .err()
        .expect("two are connected");
    assert_eq!(sqlstate(&err), Some("53300"));
    drop((first, second));
}

#[tokio::test]
async fn reload_rejects_an_invalid_configuration_whole() {
    let role = "adm_bad";
    let proxy = proxy(role, "[pool]\nmax_size = 2\n").await;
    let admin = console(&proxy, "adm_bad_ops").await;
    let client = proxy.connect(role, "pw").await.expect("login");
    // A valid change beside an invalid one: neither applies.
    for bad in [
        sections(role, "[pool]\nmax_size = 7\nborrow_timeout = \"soon\"\n"),
        sections(
            role,
            "[pool]\nmax_size = 7\n[databases.pgshield]\nhost = \"x\"\n",
        ),
        format!(
            "{}[users.nobody]\nauth = \"sha1\"\n",
            sections(role, "[pool]\nmax_size = 7\n")
        ),
        // Passes every check but names a certificate that cannot be read.
        sections(
            role,
            "[pool]\nmax_size = 7\n[tls.client]\nmode = \"prefer\"\ncert = \"/nonexistent/cert.pem\"\n\
             key = \"/nonexistent/key.pem\"\n",
        ),
    ] {
        proxy.rewrite_config(&bad);
        assert_eq!(refused(&admin.client, "RELOAD").await, "F0000", "{bad}");
    }
    proxy.write_raw_config("this is [not toml");
    let err = admin
        .client
        .simple_query("RELOAD")
        .await
        .expect_err("bad TOML");
    assert_eq!(sqlstate(&err), Some("F0000"));
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("RELOAD rejected"), "{message}");

    let pools = show(&admin.client, "SHOW DATABASES").await;
    let app = pools.iter().find(|r| r["name"] == "app").expect("app");
    assert_eq!(app["pool_size"], "2", "the old configuration stays");
    let pool = proxy.shared.pools.get("app", role).expect("pool");
    assert_eq!(pool.status().max_size, 2);
    client
        .client
        .simple_query("SELECT 1")
        .await
        .expect("clients carry on");
    proxy.connect(role, "pw").await.expect("logins carry on");
}

#[tokio::test]
async fn reload_changes_users_passwords_and_databases_without_dropping_clients() {
    let role = "adm_users";
    common::create_role("adm_users_new", "pw2").await;
    let port = common::cluster().port();
    let extra_db =
        format!("[databases.extra]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\n");
    let proxy = proxy(role, &extra_db).await;
    let admin = console(&proxy, "adm_users_ops").await;
    let on_app = proxy.connect(role, "pw").await.expect("login to app");
    let mut extra = proxy.config(role, "pw");
    extra.dbname("extra");
    let on_extra = common::connect(&extra).await.expect("login to extra");
    let newcomer = proxy.config("adm_users_new", "pw2");
    let err = common::connect(&newcomer)
        .await
        .err()
        .expect("not a user yet");
    assert_eq!(sqlstate(&err), Some("28P01"));

    // `extra` goes; a user arrives; the role's client password changes (the server's
    // stays `pw`).
    let next = sections(role, "").replace(
        &format!("[users.{role}]\npassword = \"pw\"\n"),
        &format!("[users.{role}]\npassword = \"newpw\"\nserver_password = \"pw\"\n"),
    ) + "[users.adm_users_new]\npassword = \"pw2\"\n";
    proxy.rewrite_config(&next);
    admin.client.simple_query("RELOAD").await.expect("RELOAD");

    let new_user = common::connect(&newcomer)
        .await
        .expect("the new user logs in");
    new_user
        .client
        .simple_query("SELECT 1")
        .await
        .expect("and queries");
    let err = proxy
        .connect(role, "pw")
        .await
        .err()
        .expect("the old password");
    assert_eq!(sqlstate(&err), Some("28P01"));
    proxy
        .connect(role, "newpw")
        .await
        .expect("the new password");
    let err = common::connect(extra.clone().password("newpw"))
        .await
        .err()
        .expect("a removed database");
    assert_eq!(sqlstate(&err), Some("3D000"));
    // Clients logged in before the reload carry on, on a removed database too.
    on_app
        .client
        .simple_query("SELECT 1")
        .await
        .expect("app client");
    on_extra
        .client
        .simple_query("SELECT 1")
        .await
        .expect("extra client");
    let listed = |rows: &[HashMap<String, String>]| {
        rows.iter()
            .filter(|r| r["database"] == "extra" && r["user"] == role)
            .map(|r| r["cl_active"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(&show(&admin.client, "SHOW POOLS").await), ["1"]);

    // Put back while its client is still there: the same pool serves again.
    proxy.rewrite_config(&format!("{extra_db}{next}"));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    let again = common::connect(extra.clone().password("newpw"))
        .await
        .expect("the database is back");
    again.client.simple_query("SELECT 1").await.expect("query");
    assert_eq!(listed(&show(&admin.client, "SHOW POOLS").await), ["2"]);
    drop(again);

    // Removed again: the pool closes once its last client has gone.
    proxy.rewrite_config(&next);
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    on_extra
        .client
        .simple_query("SELECT 1")
        .await
        .expect("extra client");
    drop(on_extra);
    let mut gone = false;
    for _ in 0..100 {
        if listed(&show(&admin.client, "SHOW POOLS").await).is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gone,
        "the removed database's pool closed after its last client left"
    );
}

#[tokio::test]
async fn reload_with_a_new_server_moves_clients_to_new_backends_and_new_limits_apply() {
    let role = "adm_move";
    let port = common::cluster().port();
    let moving = |dbname: &str, pool: &str| {
        sections(
            role,
            &format!(
                "[pool]\nmax_size = 1\n{pool}[databases.moving]\nhost = \"127.0.0.1\"\nport = {port}\n\
                 dbname = \"{dbname}\"\n"
            ),
        )
    };
    let proxy = TestProxy::start(&moving("postgres", "")).await;
    common::create_role(role, "pw").await;
    common::create_role("adm_move_ops", "pw").await;
    let admin = console(&proxy, "adm_move_ops").await;
    let mut config = proxy.config(role, "pw");
    config.dbname("moving");
    let client = common::connect(&config).await.expect("login");
    let idle = common::connect(&config).await.expect("login");
    let where_am_i = || async {
        let row = client
            .client
            .query_one("SELECT current_database()::text, pg_backend_pid()", &[])
            .await
            .expect("query");
        (row.get::<_, String>(0), row.get::<_, i32>(1))
    };
    // Long enough that a session whose idleness nobody counted (no idle limit yet) would
    // look idle past the limit the reload brings; it must not be closed for it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (db, old_pid) = where_am_i().await;
    assert_eq!(db, "postgres");

    proxy.rewrite_config(&moving(
        "template1",
        "query_timeout = \"300ms\"\nidle_client_timeout = \"1s\"\n",
    ));
    admin.client.simple_query("RELOAD").await.expect("RELOAD");
    let (db, pid) = where_am_i().await;
    assert_eq!(
        db, "template1",
        "the client's next transaction runs on the new server"
    );
    assert_ne!(pid, old_pid);
    let watcher = common::admin().await;
    assert!(
        common::backend_gone(&watcher, old_pid, Duration::from_secs(5)).await,
        "the backend to the old server closed"
    );
    // The new query_timeout applies to a client connected before the reload.
    let err = client
        .client
        .simple_query("SELECT pg_sleep(5)")
        .await
        .expect_err("cancelled by the reloaded query_timeout");
    assert_eq!(sqlstate(&err), Some("57014"));
    // And the new idle_client_timeout to one that has been idle all along.
    let ended = tokio::time::timeout(Duration::from_secs(10), idle.done)
        .await
        .expect("the idle client is closed")
        .expect("no panic");
    let err = ended.expect_err("closed with an error");
    assert_eq!(sqlstate(&err), Some("57P05"));
}

/// A request starts with its first message: a Parse pgshield answers without a backend,
/// then a simple Query sent before any Sync, show in SHOW CLIENTS as one request that
/// started at the Parse, however the Query is passed on.
#[tokio::test]
async fn a_request_starts_at_its_first_message_even_one_answered_without_a_backend() {
    use common::raw;
    common::create_role("adm_req", "pw").await;
    common::create_role("adm_req_ops", "pw").await;
    let proxy = TestProxy::start(
        "[users.adm_req]\nauth = \"trust\"\nserver_password = \"pw\"\n\
         [users.adm_req_ops]\npassword = \"pw\"\n\
         [admin]\nhttp_listen = \"\"\nusers = [\"adm_req_ops\"]\n",
    )
    .await;
    let admin = console(&proxy, "adm_req_ops").await;
    let mut s = raw::login_trusted(proxy.addr, "adm_req").await;
    let mut other = raw::login_trusted(proxy.addr, "adm_req").await;
    let parse = |name: &str| {
        let mut body = name.as_bytes().to_vec();
        body.extend_from_slice(b"\0SELECT 1\0\0\0");
        raw::message(b'P', &body)
    };
    // A server accepts the statement once; the same text parsed again needs none.
    let mut first = parse("s1");
    first.extend(raw::message(b'S', &[]));
    raw::send(&mut s, &first).await;
    raw::until_ready(&mut s).await;
    let parsed_at = std::time::SystemTime::now();
    raw::send(&mut s, &parse("s2")).await;
    assert_eq!(raw::read_message(&mut s).await.map(|m| m.0), Some(b'1'));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // (Another client's transaction just before leaves a backend warm, as under load: the
    // Query then takes pgshield's short path.)
    raw::send(&mut other, &raw::query("SELECT 3")).await;
    raw::until_ready(&mut other).await;
    raw::send(&mut s, &raw::query("SELECT 2")).await;
    raw::until_ready(&mut s).await;

    let port = s.local_addr().expect("local address").port().to_string();
    let clients = show(&admin.client, "SHOW CLIENTS").await;
    let me = clients
        .iter()
        .find(|r| r["user"] == "adm_req" && r["port"] == port)
        .expect("client");
    let started = humantime::parse_rfc3339(
        &me["request_time"]
            .replace(" UTC", "Z")
            .replacen(' ', "T", 1),
    )
    .expect("request_time");
    // (Shown to the second.)
    let late = started.duration_since(parsed_at).unwrap_or_default();
    assert!(
        late < Duration::from_secs(1),
        "{me:?}: {late:?} after the Parse"
    );
}
