//! Transaction pooling: many clients share few backends one transaction at a time, and
//! what drivers do keeps working. Pools here are tiny (1 to 3 backends) so that
//! transactions really hop between backends; tests assert that they do.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{raw, sqlstate, TestProxy};
use tokio_postgres::NoTls;

async fn proxy(role: &str, pool: &str) -> TestProxy {
    common::create_role(role, "pw").await;
    TestProxy::start(&format!(
        "[pool]\nmode = \"transaction\"\n{pool}\n[users.{role}]\npassword = \"pw\"\n"
    ))
    .await
}

/// A proxy whose user `role` logs in by trust (for raw protocol clients), with `pool`
/// settings.
async fn trusted_proxy(role: &str, pool: &str) -> TestProxy {
    common::create_role(role, "pw").await;
    TestProxy::start(&format!(
        "[pool]\n{pool}\n[users.{role}]\nauth = \"trust\"\nserver_password = \"pw\"\n"
    ))
    .await
}

async fn pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

/// Another client that, every other call, holds one backend in an open transaction: with
/// two backends, the observed client's transactions then alternate between them.
struct Hopper {
    other: tokio_postgres::Client,
    holding: bool,
}

impl Hopper {
    async fn hop(&mut self) {
        let sql = if self.holding {
            "COMMIT"
        } else {
            "BEGIN; SELECT 1"
        };
        self.other.batch_execute(sql).await.expect("hopper");
        self.holding = !self.holding;
    }
}

async fn setting(client: &tokio_postgres::Client, name: &str) -> String {
    client
        .query_one("SELECT current_setting($1)", &[&name])
        .await
        .expect("setting")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_follow_50_clients_across_2_backends() {
    let proxy = Arc::new(proxy("tx_prep", "max_size = 2").await);
    let tasks: Vec<_> = (0..50)
        .map(|c| {
            let proxy = Arc::clone(&proxy);
            tokio::spawn(async move {
                let conn = proxy.connect("tx_prep", "pw").await.expect("login");
                let statement = conn
                    .client
                    .prepare("SELECT $1::int * 10 + $2::int, pg_backend_pid()")
                    .await
                    .expect("prepare");
                let mut pids = HashSet::new();
                for i in 0..100 {
                    let row = conn
                        .client
                        .query_one(&statement, &[&c, &i])
                        .await
                        .expect("execute");
                    assert_eq!(
                        row.get::<_, i32>(0),
                        c * 10 + i,
                        "client {c}, transaction {i}"
                    );
                    pids.insert(row.get::<_, i32>(1));
                }
                pids.len()
            })
        })
        .collect();
    let mut hopped = 0;
    for task in tasks {
        if task.await.expect("client") > 1 {
            hopped += 1;
        }
    }
    assert!(
        hopped > 0,
        "no client's transactions ran on more than one backend"
    );
    let admin = common::admin().await;
    assert!(common::backends_of(&admin, "tx_prep").await <= 2);
}

/// Parse, Bind, Execute, Sync of a named statement on a raw connection; the row's text.
async fn run_named(s: &mut tokio::net::TcpStream, name: &str) -> Result<String, String> {
    let mut bind = vec![0];
    bind.extend_from_slice(name.as_bytes());
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
    let mut bytes = raw::message(b'B', &bind);
    bytes.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(s, &bytes).await;
    row_until_ready(s).await
}

/// Reads up to the next ReadyForQuery: the text of the (one-column) row, or the error.
async fn row_until_ready(s: &mut tokio::net::TcpStream) -> Result<String, String> {
    let mut value = Err("no row".to_owned());
    loop {
        let (tag, body) = raw::read_message(s).await.expect("reply");
        match tag {
            b'D' => value = Ok(String::from_utf8_lossy(&body[6..]).into_owned()),
            b'E' => value = Err(raw::error_code(&body)),
            b'Z' => return value,
            _ => {}
        }
    }
}

async fn parse_named(s: &mut tokio::net::TcpStream, name: &str, sql: &str) -> String {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    let mut bytes = raw::message(b'P', &body);
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(s, &bytes).await;
    let (tags, codes) = raw::until_ready(s).await;
    codes.into_iter().next().unwrap_or(tags)
}

/// `n` Closes of a statement no one has: pgshield answers each itself.
fn closes(n: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(n * 11);
    for _ in 0..n {
        bytes.extend(raw::message(b'C', b"Snope\0"));
    }
    bytes
}

/// A trust login of `role`, inside a transaction block (so it holds a backend).
async fn in_transaction(proxy: &TestProxy, role: &str) -> tokio::net::TcpStream {
    let mut s = raw::login_trusted(proxy.addr, role).await;
    raw::send(&mut s, &raw::query("BEGIN")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("CZ".into(), vec![]));
    s
}

/// A Parse of `sql` as `name` with these parameter types, a Describe of it and a Sync,
/// as a driver prepares (its answer: "1tTZ", or "1tnZ" for a statement of no rows).
fn prepare_described(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut body = format!("{name}\0{sql}\0").into_bytes();
    body.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        body.extend_from_slice(&t.to_be_bytes());
    }
    let mut bytes = raw::message(b'P', &body);
    bytes.extend(raw::message(b'D', format!("S{name}\0").as_bytes()));
    bytes.extend_from_slice(&raw::SYNC);
    bytes
}

/// With `standard_conforming_strings` off, a backslash in a `'…'` string escapes: a
/// statement pgshield read as one string would hide a SET that PostgreSQL runs, which
/// then stayed on the backend for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_behind_a_backslashed_quote_follows_the_client_when_strings_take_escapes() {
    let proxy = proxy("tx_scs", "max_size = 2").await;
    let conn = proxy.connect("tx_scs", "pw").await.expect("login");
    let other = proxy.connect("tx_scs", "pw").await.expect("login");
    let observer = proxy.connect("tx_scs", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let c = &conn.client;
    c.batch_execute("SET standard_conforming_strings = off")
        .await
        .unwrap();
    c.batch_execute("SELECT 'x\\''; SET statement_timeout = '7s'; --'")
        .await
        .unwrap();
    let mut pids = HashSet::new();
    for _ in 0..6 {
        hopper.hop().await;
        pids.insert(pid(c).await);
        assert_eq!(setting(c, "statement_timeout").await, "7s");
        assert_eq!(setting(c, "standard_conforming_strings").await, "off");
    }
    assert_eq!(pids.len(), 2, "the client was not pinned");
    if hopper.holding {
        hopper.hop().await;
    }
    for _ in 0..4 {
        assert_eq!(setting(&observer.client, "statement_timeout").await, "0");
    }
}

/// A schema per tenant: clients of one pool whose search_path differs prepare the same
/// text, which means another table, with other columns, for each. Each must get its own
/// statement (as on connections of their own), not one shared and retired back and forth
/// with "cached plan must not change result type" errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_their_own_search_path_never_share_a_statement() {
    let proxy = proxy("tx_tenant", "max_size = 1").await;
    let admin = common::admin().await;
    admin
        .batch_execute(
            "DROP SCHEMA IF EXISTS tx_tenant_a CASCADE; DROP SCHEMA IF EXISTS tx_tenant_b CASCADE;
             CREATE SCHEMA tx_tenant_a; CREATE SCHEMA tx_tenant_b;
             CREATE TABLE tx_tenant_a.items (x int); INSERT INTO tx_tenant_a.items VALUES (1);
             CREATE TABLE tx_tenant_b.items (x text, y int); INSERT INTO tx_tenant_b.items VALUES ('b', 2);
             GRANT USAGE ON SCHEMA tx_tenant_a, tx_tenant_b TO tx_tenant;
             GRANT SELECT ON ALL TABLES IN SCHEMA tx_tenant_a, tx_tenant_b TO tx_tenant",
        )
        .await
        .expect("schemas");
    let a = proxy.connect("tx_tenant", "pw").await.expect("a").client;
    let b = proxy.connect("tx_tenant", "pw").await.expect("b").client;
    a.batch_execute("SET search_path = tx_tenant_a")
        .await
        .expect("a");
    b.batch_execute("SET search_path = tx_tenant_b")
        .await
        .expect("b");
    let sql = "SELECT * FROM items";
    for _ in 0..5 {
        let on_a = a.prepare(sql).await.expect("prepare a");
        let on_b = b.prepare(sql).await.expect("prepare b");
        for _ in 0..2 {
            let row = a.query_one(&on_a, &[]).await.expect("a runs");
            assert_eq!((row.len(), row.get::<_, i32>(0)), (1, 1));
            let row = b.query_one(&on_b, &[]).await.expect("b runs");
            assert_eq!(
                (row.get::<_, String>(0), row.get::<_, i32>(1)),
                ("b".into(), 2)
            );
        }
    }
    // A client switching tenants, each statement right behind its SET (while pgshield
    // reads the new search_path back): prepared under the new one.
    let c = proxy.connect("tx_tenant", "pw").await.expect("c").client;
    for (tenant, columns) in [("b", 2), ("a", 1), ("b", 2), ("a", 1)] {
        c.batch_execute(&format!("SET search_path = tx_tenant_{tenant}"))
            .await
            .expect("c");
        let on_c = c.prepare(sql).await.expect("prepare c");
        let row = c.query_one(&on_c, &[]).await.expect("c runs");
        assert_eq!(row.len(), columns, "{tenant}");
    }
    admin
        .batch_execute("DROP SCHEMA tx_tenant_a CASCADE; DROP SCHEMA tx_tenant_b CASCADE")
        .await
        .expect("drop");
}

/// A client that goes away while its statement runs: PostgreSQL runs the statement to its
/// end, as it would for a client of its own, and until then its backend keeps its place
/// in the pool. The next client waits for that backend (rolled back, lent again) rather
/// than getting a new one beside the busy one: under load, clients that time out and
/// retry must not make the pool exceed `max_size` on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_clients_statement_keeps_its_place_until_it_ends() {
    let proxy = trusted_proxy("tx_departed", "max_size = 1").await;
    let admin = common::admin().await;
    let mut a = raw::login_trusted(proxy.addr, "tx_departed").await;
    raw::send(&mut a, &raw::query("SELECT pg_backend_pid()")).await;
    let first = row_until_ready(&mut a).await.expect("pid");
    // In a transaction block too: rolled back when its client is gone, as PostgreSQL does.
    raw::send(
        &mut a,
        &raw::query("BEGIN; CREATE TABLE tx_departed_t (x int); SELECT pg_sleep(1.5)"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut b = raw::login_trusted(proxy.addr, "tx_departed").await;
    raw::send(&mut b, &raw::query("SELECT pg_backend_pid()")).await;
    let waiting = tokio::spawn(async move {
        let pid = row_until_ready(&mut b).await;
        (pid, b)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        common::backends_of(&admin, "tx_departed").await,
        1,
        "no second backend while the first is busy"
    );
    let (second, mut b) = waiting.await.expect("b");
    assert_eq!(second.as_deref(), Ok(first.as_str()), "the same backend");
    raw::send(&mut b, &raw::query("SELECT count(*) FROM tx_departed_t")).await;
    assert_eq!(
        row_until_ready(&mut b).await,
        Err("42P01".to_owned()),
        "rolled back"
    );
    // Outside a transaction block what its statements set stands once they have run:
    // never for the next client on that backend.
    let mut c = raw::login_trusted(proxy.addr, "tx_departed").await;
    raw::send(
        &mut c,
        &raw::query("SET statement_timeout = '42s'; SELECT pg_sleep(1)"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw::send(&mut b, &raw::query("SELECT pg_backend_pid()")).await;
    assert_eq!(row_until_ready(&mut b).await.as_deref(), Ok(first.as_str()));
    raw::send(&mut b, &raw::query("SHOW statement_timeout")).await;
    assert_eq!(row_until_ready(&mut b).await.as_deref(), Ok("0"));
}

/// One whose statement runs past the time pgshield waits for it (10 s) is cancelled as
/// its backend is closed: the server must not go on running it outside the pool's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_clients_statement_that_runs_on_is_cancelled_with_its_backend() {
    let proxy = trusted_proxy("tx_departed_long", "max_size = 1").await;
    let admin = common::admin().await;
    let mut a = raw::login_trusted(proxy.addr, "tx_departed_long").await;
    raw::send(&mut a, &raw::query("SELECT pg_sleep(120) AS departed_long")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(a);
    let running = "SELECT count(*) FROM pg_stat_activity \
                   WHERE query LIKE '%AS departed_long' AND state = 'active' AND pid <> pg_backend_pid()";
    let started = Instant::now();
    loop {
        let count: i64 = admin.query_one(running, &[]).await.expect("count").get(0);
        if count == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still running after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "waited for first"
    );
}

/// A pinned client's settings are not read back: once it changes its search_path, its
/// statements are its own, not those of clients that resolve the same names elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_changing_its_search_path_shares_no_statement() {
    let proxy = proxy("tx_pinpath", "max_size = 3").await;
    let admin = common::admin().await;
    admin
        .batch_execute(
            "DROP SCHEMA IF EXISTS tx_pinpath CASCADE; DROP SCHEMA IF EXISTS tx_pinpath_b CASCADE;
             CREATE SCHEMA tx_pinpath AUTHORIZATION tx_pinpath; CREATE SCHEMA tx_pinpath_b;
             CREATE TABLE tx_pinpath.items (x int); INSERT INTO tx_pinpath.items VALUES (1);
             CREATE TABLE tx_pinpath_b.items (x text, y int); INSERT INTO tx_pinpath_b.items VALUES ('b', 2);
             GRANT USAGE ON SCHEMA tx_pinpath_b TO tx_pinpath;
             GRANT SELECT ON ALL TABLES IN SCHEMA tx_pinpath, tx_pinpath_b TO tx_pinpath",
        )
        .await
        .expect("schemas");
    let sql = "SELECT * FROM items";
    // `d` finds its own schema first ("$user"), with no search_path of its own.
    let d = proxy.connect("tx_pinpath", "pw").await.expect("d").client;
    let on_d = d.prepare(sql).await.expect("prepare d");
    assert_eq!(d.query_one(&on_d, &[]).await.expect("d").len(), 1);
    let c = proxy.connect("tx_pinpath", "pw").await.expect("c").client;
    c.batch_execute("LISTEN tx_pinpath_channel; SET search_path = tx_pinpath_b")
        .await
        .expect("pinned");
    let on_c = c.prepare(sql).await.expect("prepare c");
    assert_eq!(c.query_one(&on_c, &[]).await.expect("c").len(), 2);
    assert_eq!(d.query_one(&on_d, &[]).await.expect("d again").len(), 1);
    // Set before the pin, in the transaction that pins it: never read back either.
    let e = proxy.connect("tx_pinpath", "pw").await.expect("e").client;
    e.batch_execute("BEGIN; SET search_path = tx_pinpath_b")
        .await
        .expect("set");
    e.batch_execute("LISTEN tx_pinpath_other; COMMIT")
        .await
        .expect("pinned");
    let on_e = e.prepare(sql).await.expect("prepare e");
    assert_eq!(e.query_one(&on_e, &[]).await.expect("e").len(), 2);
    assert_eq!(d.query_one(&on_d, &[]).await.expect("d still").len(), 1);
    drop((c, e));
    admin
        .batch_execute("DROP SCHEMA tx_pinpath CASCADE; DROP SCHEMA tx_pinpath_b CASCADE")
        .await
        .expect("drop");
}

/// Thousands of messages pgshield answers itself (Closes) behind one the server answers,
/// before the Sync: the client is not read past a bound while they are owed, and the
/// server, which keeps its replies until a Sync or a Flush, is asked to flush, so that the
/// answers come and the client is read again (PostgreSQL alone answers it all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_thousands_of_closes_behind_a_parse_is_answered() {
    let proxy = trusted_proxy("tx_closes", "max_size = 1").await;
    let mut a = in_transaction(&proxy, "tx_closes").await;
    let mut batch = raw::message(b'P', b"s1\0SELECT 1\0\0\0");
    let n = 6000;
    batch.extend(closes(n));
    batch.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &batch).await;
    let (tags, codes) = tokio::time::timeout(Duration::from_secs(20), raw::until_ready(&mut a))
        .await
        .expect("answered");
    assert!(codes.is_empty(), "{codes:?}");
    assert_eq!(
        tags.len(),
        1 + n + 1,
        "ParseComplete, CloseCompletes, ReadyForQuery"
    );
    assert!(tags.starts_with("13") && tags.ends_with("3Z"));
}

/// The same, the last of the Closes that make 4,096 replies owed read together with the
/// start of a large Bind: pgshield stops reading a client once that many are owed, and
/// asks the server to flush what it holds only between messages; so it reads on until
/// the Bind is whole, or neither side would ever go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_owed_replies_before_a_large_bind_do_not_stall_it() {
    let proxy = trusted_proxy("tx_closes_bind", "max_size = 1").await;
    let mut a = in_transaction(&proxy, "tx_closes_bind").await;
    let mut batch = raw::message(b'P', b"s1\0SELECT length($1::text)\0\0\x01\0\0\0\x19");
    let n = 4095;
    batch.extend(closes(n));
    let value = vec![b'x'; 100_000];
    let mut bind = b"\0s1\0\0\0\0\x01".to_vec();
    bind.extend_from_slice(&(value.len() as i32).to_be_bytes());
    bind.extend_from_slice(&value);
    bind.extend_from_slice(&[0, 0]);
    batch.extend(raw::message(b'B', &bind));
    batch.extend(raw::message(b'E', b"\0\0\0\0\0"));
    batch.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &batch).await;
    let (tags, codes) = tokio::time::timeout(Duration::from_secs(20), raw::until_ready(&mut a))
        .await
        .expect("answered, not stalled");
    assert!(codes.is_empty(), "{codes:?}");
    assert_eq!(tags.len(), 1 + n + 4, "{}", &tags[tags.len() - 8..]);
    assert!(tags.ends_with("32DCZ"), "{}", &tags[tags.len() - 8..]);
}

/// Behind a slow statement, more Closes than the replies let pile up (pgshield answers
/// them, in their place behind its reply), then a Sync: when the slow reply comes, all
/// that is owed is answered at once, and the messages still waiting go on without a
/// read from either side to wake the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_on_owed_replies_go_on_when_all_are_answered_at_once() {
    let proxy = trusted_proxy("tx_owed_wait", "max_size = 1").await;
    let mut a = in_transaction(&proxy, "tx_owed_wait").await;
    let mut batch = raw::query("SELECT pg_sleep(0.3)");
    let n = 4200;
    batch.extend(closes(n));
    batch.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &batch).await;
    assert_eq!(raw::until_ready(&mut a).await, ("TDCZ".into(), vec![]));
    let (tags, codes) = tokio::time::timeout(Duration::from_secs(20), raw::until_ready(&mut a))
        .await
        .expect("answered, not stalled");
    assert!(codes.is_empty(), "{codes:?}");
    assert_eq!(tags.len(), n + 1);
}

/// The same, and behind those a statement and as many Closes again: the second pile-up
/// gets a Flush of its own, or the server would hold the statement's replies waiting for
/// a Sync that pgshield does not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pile_of_owed_replies_gets_a_flush_of_its_own() {
    let proxy = trusted_proxy("tx_owed_twice", "max_size = 1").await;
    let mut a = in_transaction(&proxy, "tx_owed_twice").await;
    let mut batch = raw::query("SELECT pg_sleep(0.3)");
    batch.extend(closes(4200));
    batch.extend(raw::parse_bind_execute("SELECT 1"));
    batch.extend(closes(4200));
    batch.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &batch).await;
    assert_eq!(raw::until_ready(&mut a).await, ("TDCZ".into(), vec![]));
    let (tags, codes) = tokio::time::timeout(Duration::from_secs(20), raw::until_ready(&mut a))
        .await
        .expect("answered, not stalled");
    assert!(codes.is_empty(), "{codes:?}");
    assert_eq!(tags.len(), 8400 + 4 + 1);
}

/// In a failed transaction PostgreSQL refuses a Parse (25P02), and the name stays free:
/// pgshield must not answer it itself because the backend already has the statement (a
/// libpq application preparing a fixed name, retrying after ROLLBACK, got 42P05).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_in_a_failed_transaction_is_refused_as_postgresql_refuses_it() {
    let proxy = trusted_proxy("tx_failed_parse", "max_size = 1").await;
    let mut a = raw::login_trusted(proxy.addr, "tx_failed_parse").await;
    let mut b = raw::login_trusted(proxy.addr, "tx_failed_parse").await;
    let sql = "SELECT 'prepared'";
    // Another client has the backend prepare both texts (and keeps them there).
    assert_eq!(parse_named(&mut b, "b_user", sql).await, "1Z");
    assert_eq!(parse_named(&mut b, "b_end", "ROLLBACK").await, "1Z");
    assert_eq!(parse_named(&mut b, "b_empty", "").await, "1Z");
    assert_eq!(parse_named(&mut a, "mine", "SELECT 'mine'").await, "1Z");
    raw::send(&mut a, &raw::query("BEGIN; SELECT 1/0")).await;
    assert_eq!(raw::until_ready(&mut a).await.1, ["22012"]);
    assert_eq!(parse_named(&mut a, "get_user", sql).await, "25P02");
    // An empty statement, which runs nothing, PostgreSQL prepares there all the same.
    assert_eq!(parse_named(&mut a, "empty", "").await, "1Z");
    // Behind a Sync still unanswered, which does not end the transaction block.
    let mut batch = raw::SYNC.to_vec();
    batch.extend(raw::message(b'P', b"get_user\0SELECT 'prepared'\0\0\0"));
    batch.extend(raw::SYNC);
    raw::send(&mut a, &batch).await;
    assert_eq!(raw::until_ready(&mut a).await, ("Z".to_owned(), vec![]));
    assert_eq!(
        raw::until_ready(&mut a).await,
        ("EZ".to_owned(), vec!["25P02".to_owned()])
    );
    // Also behind a Close in the same batch: the Close is done, the Parse refused.
    let mut batch = raw::message(b'C', b"Smine\0");
    batch.extend(raw::message(b'P', b"get_user\0SELECT 'prepared'\0\0\0"));
    batch.extend(raw::SYNC);
    raw::send(&mut a, &batch).await;
    assert_eq!(
        raw::until_ready(&mut a).await,
        ("3EZ".to_owned(), vec!["25P02".to_owned()])
    );
    assert_eq!(run_named(&mut a, "mine").await, Err("26000".into()));
    // What ends the transaction is still prepared there, as PostgreSQL does.
    assert_eq!(parse_named(&mut a, "end_it", "ROLLBACK").await, "1Z");
    assert_eq!(run_named(&mut a, "end_it").await, Err("no row".into()));
    assert_eq!(parse_named(&mut a, "get_user", sql).await, "1Z");
    assert_eq!(
        run_named(&mut a, "get_user").await.as_deref(),
        Ok("prepared")
    );
    assert_eq!(run_named(&mut a, "mine").await, Err("26000".into()));
    // Behind a ROLLBACK run in the same batch, it is read outside any transaction.
    raw::send(&mut a, &raw::query("BEGIN; SELECT 1/0")).await;
    assert_eq!(raw::until_ready(&mut a).await.1, ["22012"]);
    let mut batch = raw::parse_bind_execute("ROLLBACK");
    batch.extend(raw::message(b'P', b"again\0SELECT 'prepared'\0\0\0"));
    batch.extend(raw::SYNC);
    raw::send(&mut a, &batch).await;
    assert_eq!(raw::until_ready(&mut a).await, ("12C1Z".to_owned(), vec![]));
    assert_eq!(run_named(&mut a, "again").await.as_deref(), Ok("prepared"));
    // Also once that ROLLBACK has been answered (the client flushed), before its
    // ReadyForQuery has come.
    raw::send(&mut a, &raw::query("BEGIN; SELECT 1/0")).await;
    assert_eq!(raw::until_ready(&mut a).await.1, ["22012"]);
    let mut rollback = raw::parse_bind_execute("ROLLBACK");
    rollback.extend(raw::message(b'H', b""));
    raw::send(&mut a, &rollback).await;
    let mut tags = String::new();
    while tags.len() < 3 {
        let (tag, _) = raw::read_message(&mut a).await.expect("reply");
        tags.push(char::from(tag));
    }
    assert_eq!(tags, "12C");
    let mut parse = raw::message(b'P', b"once_more\0SELECT 'prepared'\0\0\0");
    parse.extend(raw::SYNC);
    raw::send(&mut a, &parse).await;
    assert_eq!(raw::until_ready(&mut a).await, ("1Z".to_owned(), vec![]));
    assert_eq!(
        run_named(&mut a, "once_more").await.as_deref(),
        Ok("prepared")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_naming_s0_differently_get_their_own_and_close_then_reparse_works() {
    let proxy = trusted_proxy("tx_names", "max_size = 1").await;
    let mut a = raw::login_trusted(proxy.addr, "tx_names").await;
    let mut b = raw::login_trusted(proxy.addr, "tx_names").await;
    assert_eq!(parse_named(&mut a, "s0", "SELECT 'from a'").await, "1Z");
    assert_eq!(parse_named(&mut b, "s0", "SELECT 'from b'").await, "1Z");
    for _ in 0..3 {
        assert_eq!(run_named(&mut a, "s0").await.as_deref(), Ok("from a"));
        assert_eq!(run_named(&mut b, "s0").await.as_deref(), Ok("from b"));
    }
    // PostgreSQL's own answers: re-preparing a name fails, an unknown name fails.
    assert_eq!(parse_named(&mut a, "s0", "SELECT 'again'").await, "42P05");
    assert_eq!(run_named(&mut a, "nope").await, Err("26000".into()));
    // Close, then the name can be prepared again, for a new query.
    let mut close = raw::message(b'C', b"Ss0\0");
    close.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &close).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "3Z");
    assert_eq!(run_named(&mut a, "s0").await, Err("26000".into()));
    assert_eq!(parse_named(&mut a, "s0", "SELECT 'a again'").await, "1Z");
    assert_eq!(run_named(&mut a, "s0").await.as_deref(), Ok("a again"));
    assert_eq!(run_named(&mut b, "s0").await.as_deref(), Ok("from b"));
}

/// The fields of each ErrorResponse up to the next ReadyForQuery, and the tags read.
async fn errors_until_ready(s: &mut tokio::net::TcpStream) -> (String, Vec<Vec<(u8, String)>>) {
    let (mut tags, mut errors) = (String::new(), Vec::new());
    loop {
        let (tag, body) = raw::read_message(s).await.expect("reply");
        tags.push(char::from(tag));
        if tag == b'E' {
            let fields = body
                .split(|&b| b == 0)
                .filter_map(|f| f.split_first())
                .map(|(&t, v)| (t, String::from_utf8_lossy(v).into_owned()))
                .collect();
            errors.push(fields);
        }
        if tag == b'Z' {
            return (tags, errors);
        }
    }
}

/// A Parse of a name the client already has is refused as PostgreSQL refuses it: 42P05,
/// with PostgreSQL's message naming the client's statement (not the one the Parse went
/// under on the server), its other fields kept, on either backend, alone or in a batch
/// that then skips to its Sync; the name keeps its statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reprepared_name_is_refused_in_the_clients_own_words() {
    let proxy = trusted_proxy("tx_reprepare", "max_size = 2").await;
    let mut s = raw::login_trusted(proxy.addr, "tx_reprepare").await;
    let mut hopper = Hopper {
        other: proxy
            .connect("tx_reprepare", "pw")
            .await
            .expect("login")
            .client,
        holding: false,
    };
    assert_eq!(parse_named(&mut s, "s0", "SELECT 'first'").await, "1Z");
    let field = |error: &[(u8, String)], t: u8| {
        error
            .iter()
            .find(|(f, _)| *f == t)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    for (round, sql) in [
        "SELECT 'other'",
        "SELECT 'first'",
        "SELECT 'other'",
        "SELECT 'first'",
    ]
    .into_iter()
    .enumerate()
    {
        // (Every other round on the other backend, which may lack the statement.)
        hopper.hop().await;
        let mut body = b"s0\0".to_vec();
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        let mut batch = raw::message(b'P', &body);
        if round >= 2 {
            // The rest of the batch is skipped, as behind any failed message.
            batch.extend(raw::message(b'B', b"\0s0\0\0\0\0\0\0\0"));
            batch.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
        }
        batch.extend_from_slice(&raw::SYNC);
        raw::send(&mut s, &batch).await;
        let (tags, errors) = errors_until_ready(&mut s).await;
        assert_eq!(tags, "EZ", "round {round}");
        let error = &errors[0];
        assert_eq!(field(error, b'C'), "42P05", "round {round}");
        assert_eq!(
            field(error, b'M'),
            "prepared statement \"s0\" already exists",
            "round {round}"
        );
        assert_eq!(field(error, b'S'), "ERROR");
        assert_eq!(field(error, b'R'), "StorePreparedStatement");
        assert_eq!(run_named(&mut s, "s0").await.as_deref(), Ok("first"));
    }
}

/// The same refusal after the client changed its TimeZone, on a backend that had closed
/// the name's statement for room: pgshield prepares the statement there again, for the
/// server to refuse the name, under the client's TimeZone of now. That copy is not the
/// statement's for a client of the settings it was made under: it is prepared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reprepared_name_after_a_time_zone_change_leaves_no_copy_for_others() {
    let proxy = trusted_proxy("tx_reparse_tz", "max_size = 1\nmax_prepared_statements = 1").await;
    let mut a = raw::login_trusted(proxy.addr, "tx_reparse_tz").await;
    let mut b = raw::login_trusted(proxy.addr, "tx_reparse_tz").await;
    let sql = "SELECT extract(epoch FROM '2024-01-01 00:00'::timestamptz)::bigint::text";
    raw::send(&mut b, &raw::query(sql)).await;
    let here = row_until_ready(&mut b).await.expect("read in b's zone");
    assert_ne!(here, "1704034800", "b's zone is not Tokyo's");
    assert_eq!(parse_named(&mut a, "s", sql).await, "1Z");
    // b's other statement takes the backend's only room: a's is closed there.
    assert_eq!(parse_named(&mut b, "other", "SELECT 'other'").await, "1Z");
    raw::send(&mut a, &raw::query("SET TimeZone = 'Asia/Tokyo'")).await;
    assert!(raw::until_ready(&mut a).await.1.is_empty());
    assert_eq!(parse_named(&mut a, "s", sql).await, "42P05");
    // b, of the zone a's statement was made under, prepares the same text.
    assert_eq!(parse_named(&mut b, "t", sql).await, "1Z");
    assert_eq!(run_named(&mut b, "t").await, Ok(here));
}

/// Runs pgbench (from the server's binaries) against the proxy; returns its output.
async fn pgbench(proxy: &TestProxy, args: &[&str]) -> String {
    let db = common::cluster();
    let out = tokio::process::Command::new(db.bindir().join("pgbench"))
        .args(args)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.addr.port().to_string(),
            "-U",
            "tx_bench",
            "app",
        ])
        .env("PGPASSWORD", "pw")
        .output()
        .await
        .expect("run pgbench");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_every_protocol_mode_through_transaction_pooling_without_failures() {
    common::create_role("tx_bench", "pw").await;
    let db = common::cluster();
    let init = tokio::process::Command::new(db.bindir().join("pgbench"))
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            &db.port().to_string(),
            "-U",
            "tx_bench",
            "postgres",
        ])
        .env("PGPASSWORD", "pw")
        .output()
        .await
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let proxy =
        TestProxy::start("[pool]\nmax_size = 3\n[users.tx_bench]\npassword = \"pw\"\n").await;
    for mode in ["simple", "extended", "prepared"] {
        for script in [&["-S"][..], &[][..]] {
            let mut args = vec!["-n", "-M", mode, "-c", "8", "-j", "2", "-T", "2"];
            args.extend_from_slice(script);
            let out = pgbench(&proxy, &args).await;
            assert!(
                out.contains("number of failed transactions: 0"),
                "{mode} {script:?}:\n{out}"
            );
            assert!(!out.contains("aborted"), "{mode} {script:?}:\n{out}");
        }
    }
}

/// Two clients with the same startup settings on one backend: a session SET of one (not a
/// reported setting, so only read back) never reaches the other, whose settings the backend
/// matched before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_matched_a_clients_settings_is_looked_at_again_after_a_set() {
    let proxy = proxy("tx_settled", "max_size = 1").await;
    let a = proxy.connect("tx_settled", "pw").await.expect("login");
    let b = proxy.connect("tx_settled", "pw").await.expect("login");
    let default = setting(&b.client, "statement_timeout").await;
    assert_eq!(setting(&a.client, "statement_timeout").await, default);
    a.client
        .batch_execute("SET statement_timeout = '4321ms'")
        .await
        .expect("set");
    assert_eq!(setting(&b.client, "statement_timeout").await, default);
    assert_eq!(setting(&a.client, "statement_timeout").await, "4321ms");
    assert_eq!(setting(&b.client, "statement_timeout").await, default);
}

/// A client that leaves inside a transaction that SET a reported setting: the rollback
/// reverts it, and the next clients get what they asked for, not what pgshield last
/// thought the backend carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_reverted_by_a_departed_clients_rollback_are_what_the_backend_carries() {
    let proxy = proxy("tx_revert", "max_size = 1").await;
    let with_tz = |tz: &str| {
        let mut config = proxy.config("tx_revert", "pw");
        config.options(format!("-c TimeZone={tz}"));
        config
    };
    let leave_inside = |config: tokio_postgres::Config| async move {
        let conn = common::connect(&config).await.expect("login");
        conn.client
            .batch_execute("BEGIN; SET TimeZone = 'Asia/Tokyo'")
            .await
            .expect("set");
        drop(conn);
    };
    // Nothing applied before: the rollback brings back the server's default.
    leave_inside(proxy.config("tx_revert", "pw")).await;
    let tokyo = common::connect(&with_tz("Asia/Tokyo"))
        .await
        .expect("login");
    assert_eq!(setting(&tokyo.client, "TimeZone").await, "Asia/Tokyo");
    drop(tokyo);
    let plain = proxy.connect("tx_revert", "pw").await.expect("login");
    let default = setting(&plain.client, "TimeZone").await;
    assert_ne!(default, "Asia/Tokyo");
    drop(plain);
    // Applied by pgshield before: the rollback brings that back, which is not the default.
    leave_inside(with_tz("Europe/Paris")).await;
    let plain = proxy.connect("tx_revert", "pw").await.expect("login");
    assert_eq!(setting(&plain.client, "TimeZone").await, default);
    drop(plain);
    let paris = common::connect(&with_tz("Europe/Paris"))
        .await
        .expect("login");
    assert_eq!(setting(&paris.client, "TimeZone").await, "Europe/Paris");
}

/// A `search_path` naming `pg_temp` makes an unqualified `CREATE TABLE` temporary: a
/// client whose path names it, from its startup packet or set where the screen cannot
/// read the value (`set_config('search_path', $1, false)`), keeps its backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_path_naming_pg_temp_pins_from_startup_or_read_back() {
    let proxy = proxy("tx_temp_path", "max_size = 2").await;
    let other = proxy.connect("tx_temp_path", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let mut config = proxy.config("tx_temp_path", "pw");
    config.options("-c search_path=pg_temp,public");
    for from_startup in [true, false] {
        let conn = if from_startup {
            common::connect(&config).await.expect("login")
        } else {
            let conn = proxy.connect("tx_temp_path", "pw").await.expect("login");
            conn.client
                .query(
                    "SELECT set_config('search_path', $1, false)",
                    &[&"pg_temp, public"],
                )
                .await
                .expect("set_config");
            conn
        };
        let c = &conn.client;
        c.batch_execute("CREATE TABLE tx_temp_path_t (a int)")
            .await
            .expect("a temporary table, by the path");
        let mut pids = HashSet::new();
        for _ in 0..4 {
            hopper.hop().await;
            pids.insert(pid(c).await);
            c.batch_execute("SELECT * FROM tx_temp_path_t")
                .await
                .expect("its table, on its backend");
        }
        assert_eq!(pids.len(), 1, "the client kept its backend");
        if hopper.holding {
            hopper.hop().await;
        }
    }
    // The hardened path, pg_temp last, makes no table temporary: no pin.
    let mut last = proxy.config("tx_temp_path", "pw");
    last.options("-c search_path=public,pg_temp");
    let conn = common::connect(&last).await.expect("login");
    conn.client.batch_execute("SELECT 1").await.expect("runs");
    assert_eq!(
        proxy
            .shared
            .pins
            .get(pgshield::client::sql::PinReason::TempTable),
        2
    );
    // Strict mode pins nothing: such a client is refused.
    let strict = self::proxy(
        "tx_temp_path_strict",
        "max_size = 2\non_session_state = \"reject\"",
    )
    .await;
    let mut config = strict.config("tx_temp_path_strict", "pw");
    config.options("-c search_path=pg_temp,public");
    // (Ended right after its login: the error comes as the connection's end.)
    let refused = match common::connect(&config).await {
        Ok(conn) => tokio::time::timeout(Duration::from_secs(10), conn.done)
            .await
            .expect("ended")
            .expect("no panic")
            .err(),
        Err(e) => Some(e),
    }
    .expect("refused");
    assert_eq!(
        refused.as_db_error().map(|e| e.code().code()),
        Some("0A000"),
        "{refused}"
    );
    assert_eq!(
        proxy
            .shared
            .pins
            .get(pgshield::client::sql::PinReason::TempTable),
        2
    );
}

/// `transaction_isolation`, `transaction_read_only` and `transaction_deferrable` are the
/// transaction's own: a `SET` of one is not a session setting to follow (applied to
/// another backend, `transaction_isolation` failed the client: "must be called before
/// any query"), and at login PostgreSQL refuses the first and last and ignores the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_settings_are_not_session_settings() {
    let proxy = proxy("tx_xact_only", "max_size = 2").await;
    let mut config = proxy.config("tx_xact_only", "pw");
    config.options("-c default_transaction_isolation=serializable");
    let conn = common::connect(&config).await.expect("login");
    let other = proxy.connect("tx_xact_only", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let c = &conn.client;
    c.batch_execute("SET transaction_isolation = 'serializable'")
        .await
        .expect("a SET of this transaction's isolation");
    c.batch_execute("SET transaction_read_only = on; SET transaction_deferrable = on")
        .await
        .expect("a SET of this transaction's others");
    let mut pids = HashSet::new();
    for _ in 0..6 {
        hopper.hop().await;
        pids.insert(pid(c).await);
        assert_eq!(setting(c, "transaction_isolation").await, "serializable");
        assert_eq!(setting(c, "transaction_read_only").await, "off");
    }
    assert_eq!(pids.len(), 2, "the client went to both backends");

    let mut refused = proxy.config("tx_xact_only", "pw");
    refused.options("-c transaction_isolation=serializable");
    let err = common::connect(&refused)
        .await
        .err()
        .expect("refused at login");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("25001"),
        "{err}"
    );
    let mut ignored = proxy.config("tx_xact_only", "pw");
    ignored.options("-c transaction_read_only=on -c transaction_isolation=read\\ committed");
    let conn = common::connect(&ignored).await.expect("login");
    assert_eq!(setting(&conn.client, "transaction_read_only").await, "off");
}

/// Npgsql's pool reset: `DISCARD ALL` in one write with the next command (a Parse, Bind,
/// Execute, Sync), or asyncpg's `RESET ALL` with a Query. The reset returns to settings
/// known (the startup values are given back right behind it), so the command's text is
/// read as before: one with a character beyond ASCII was taken for text of an unknown
/// encoding and pinned its client, each time a pooled connection was reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_pipelined_with_the_next_command_leaves_it_read_as_before() {
    use pgshield::client::sql::PinReason;
    let proxy = trusted_proxy(
        "tx_discard_then_cmd",
        "mode = \"transaction\"\nmax_size = 2",
    )
    .await;
    let mut s = raw::login_trusted(proxy.addr, "tx_discard_then_cmd").await;
    for round in 0..3 {
        let mut batch = raw::query("DISCARD ALL");
        batch.extend(raw::parse_bind_execute("SELECT 'Zürich' AS city"));
        batch.extend(raw::SYNC);
        batch.extend(raw::query("RESET ALL"));
        batch.extend(raw::query("SELECT 'Genève'"));
        raw::send(&mut s, &batch).await;
        for _ in 0..4 {
            let (_, errors) = raw::until_ready(&mut s).await;
            assert!(errors.is_empty(), "round {round}: {errors:?}");
        }
    }
    assert_eq!(proxy.shared.pins.get(PinReason::Unclassified), 0);
    // A client started with settings of its own still reads under them after a reset.
    let mut latin = raw::connect(proxy.addr).await;
    raw::send(
        &mut latin,
        &raw::startup(&[
            ("user", "tx_discard_then_cmd"),
            ("database", "app"),
            ("client_encoding", "LATIN1"),
        ]),
    )
    .await;
    raw::until_ready(&mut latin).await;
    let mut batch = raw::query("DISCARD ALL");
    batch.extend(raw::query_bytes(b"SELECT length('Z\xfcrich')"));
    raw::send(&mut latin, &batch).await;
    raw::until_ready(&mut latin).await;
    let (tags, errors) = raw::until_ready(&mut latin).await;
    assert!(errors.is_empty() && tags.contains('D'), "{tags} {errors:?}");
    assert_eq!(proxy.shared.pins.get(PinReason::Unclassified), 0);
}

/// A custom setting given at startup and then set to `''` stays `''` on every backend, as
/// in PostgreSQL (it came back as its startup value: an empty custom setting read back
/// was taken for a reset of it); a RESET of it returns to the startup value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_setting_emptied_stays_empty_and_a_reset_returns_to_its_startup_value() {
    let proxy = proxy("tx_tenant_empty", "max_size = 2").await;
    let other = proxy.connect("tx_tenant_empty", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let mut config = proxy.config("tx_tenant_empty", "pw");
    config.options("-c app.tenant=42");
    let conn = common::connect(&config).await.expect("login");
    let c = &conn.client;
    assert_eq!(setting(c, "app.tenant").await, "42");
    c.batch_execute("SET app.tenant = ''").await.expect("SET");
    let mut pids = HashSet::new();
    for _ in 0..4 {
        hopper.hop().await;
        pids.insert(pid(c).await);
        assert_eq!(setting(c, "app.tenant").await, "", "emptied");
    }
    assert_eq!(pids.len(), 2, "on both backends");
    c.batch_execute("RESET app.tenant").await.expect("RESET");
    for _ in 0..4 {
        hopper.hop().await;
        assert_eq!(
            setting(c, "app.tenant").await,
            "42",
            "reset to its startup value"
        );
    }
}

/// A `SET` committed by `COMMIT AND CHAIN` is read back only once the backend is idle;
/// a client that leaves before that (inside the chained transaction) must not leave it,
/// one the server does not report, to the next client of the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_committed_but_not_read_back_when_the_client_leaves_stay_its_own() {
    let proxy = proxy("tx_chain_set", "max_size = 1").await;
    let a = proxy.connect("tx_chain_set", "pw").await.expect("login");
    a.client
        .batch_execute("BEGIN; SET work_mem = '77MB'; SET app.tenant = '42'; COMMIT AND CHAIN")
        .await
        .expect("set and chain");
    drop(a);
    let b = proxy.connect("tx_chain_set", "pw").await.expect("login");
    assert_eq!(setting(&b.client, "work_mem").await, "4MB");
    let tenant: Option<String> = b
        .client
        .query_one("SELECT current_setting('app.tenant', true)", &[])
        .await
        .expect("tenant")
        .get(0);
    assert_ne!(tenant.as_deref(), Some("42"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_hold_in_every_transaction_on_every_backend() {
    let proxy = proxy("tx_startup", "max_size = 2").await;
    let mut config = proxy.config("tx_startup", "pw");
    config
        .application_name("tx-app")
        .options("-c statement_timeout=4321 -c TimeZone=Asia/Tokyo");
    let conn = common::connect(&config).await.expect("login");
    let other = proxy.connect("tx_startup", "pw").await.expect("login");
    let observer = proxy.connect("tx_startup", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let mut pids = HashSet::new();
    for _ in 0..20 {
        hopper.hop().await;
        pids.insert(pid(&conn.client).await);
        assert_eq!(setting(&conn.client, "application_name").await, "tx-app");
        assert_eq!(setting(&conn.client, "statement_timeout").await, "4321ms");
        assert_eq!(setting(&conn.client, "TimeZone").await, "Asia/Tokyo");
    }
    hopper.hop().await; // let go
    for _ in 0..4 {
        assert_ne!(
            setting(&observer.client, "statement_timeout").await,
            "4321ms"
        );
        assert_ne!(
            setting(&observer.client, "application_name").await,
            "tx-app"
        );
    }
    assert_eq!(pids.len(), 2, "transactions ran on both backends");
}

/// PostgreSQL makes the startup settings the session's defaults: `RESET ALL` and
/// `DISCARD ALL` (run by asyncpg's and Npgsql's pools at every release) return to them,
/// not to the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_all_and_discard_all_return_to_the_startup_settings_on_every_backend() {
    let proxy = proxy("tx_reset", "max_size = 2").await;
    let mut config = proxy.config("tx_reset", "pw");
    config
        .application_name("tx-reset-app")
        .options("-c statement_timeout=4321 -c search_path=tx_reset_path");
    let conn = common::connect(&config).await.expect("login");
    let other = proxy.connect("tx_reset", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let mut pids = HashSet::new();
    for reset in ["RESET ALL", "DISCARD ALL", "RESET search_path", "RESET ALL"] {
        conn.client
            .batch_execute("SET statement_timeout = 99; SET search_path = elsewhere")
            .await
            .unwrap();
        conn.client
            .batch_execute("SET application_name = 'renamed'")
            .await
            .unwrap();
        hopper.hop().await;
        assert_eq!(setting(&conn.client, "search_path").await, "elsewhere");
        conn.client.batch_execute(reset).await.unwrap();
        for _ in 0..2 {
            hopper.hop().await;
            pids.insert(pid(&conn.client).await);
            assert_eq!(
                setting(&conn.client, "search_path").await,
                "tx_reset_path",
                "after {reset}"
            );
            if reset != "RESET search_path" {
                assert_eq!(setting(&conn.client, "statement_timeout").await, "4321ms");
                assert_eq!(
                    setting(&conn.client, "application_name").await,
                    "tx-reset-app"
                );
            }
        }
    }
    assert_eq!(pids.len(), 2, "transactions ran on both backends");
}

/// A pinned client's RESET sent in the extended protocol returns to its startup value, as
/// in PostgreSQL: pgshield gives that value back before the client's next statement, a
/// lone simple Query too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_clients_extended_reset_returns_to_the_startup_value_before_its_next_query() {
    let proxy = trusted_proxy("tx_reset_pin", "mode = \"transaction\"\nmax_size = 2").await;
    let mut s = raw::connect(proxy.addr).await;
    let startup = raw::startup(&[
        ("user", "tx_reset_pin"),
        ("database", "app"),
        ("options", "-c statement_timeout=4321"),
    ]);
    raw::send(&mut s, &startup).await;
    raw::until_ready(&mut s).await;
    raw::send(&mut s, &raw::query("LISTEN tx_reset_pin")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("CZ".to_owned(), vec![]));
    raw::send(&mut s, &raw::query("SET statement_timeout = 99")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("CZ".to_owned(), vec![]));
    let mut reset = raw::parse_bind_execute("RESET statement_timeout");
    reset.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &reset).await;
    assert_eq!(raw::until_ready(&mut s).await, ("12CZ".to_owned(), vec![]));
    raw::send(&mut s, &raw::query("SHOW statement_timeout")).await;
    assert_eq!(row_until_ready(&mut s).await, Ok("4321ms".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_sets_follow_the_client_without_pinning_and_rolled_back_ones_do_not() {
    let proxy = proxy("tx_set", "max_size = 2").await;
    let admin = common::admin().await;
    admin
        .batch_execute("CREATE SCHEMA IF NOT EXISTS tx_set_schema")
        .await
        .unwrap();
    let conn = proxy.connect("tx_set", "pw").await.expect("login");
    let other = proxy.connect("tx_set", "pw").await.expect("login");
    let observer = proxy.connect("tx_set", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let c = &conn.client;
    c.batch_execute("SET search_path = tx_set_schema, public")
        .await
        .unwrap();
    c.batch_execute("SET statement_timeout = '7s'")
        .await
        .unwrap();
    c.batch_execute("SET LOCAL work_mem = '5MB'").await.unwrap(); // transaction-only: nothing
    c.batch_execute("BEGIN; SET statement_timeout = '99s'; ROLLBACK")
        .await
        .unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    c.batch_execute("SET work_mem = '6MB'").await.unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    let mut pids = HashSet::new();
    for _ in 0..20 {
        hopper.hop().await;
        pids.insert(pid(c).await);
        assert_eq!(setting(c, "search_path").await, "tx_set_schema, public");
        assert_eq!(setting(c, "statement_timeout").await, "7s");
        assert_eq!(setting(c, "work_mem").await, "4MB", "rolled back");
    }
    assert_eq!(pids.len(), 2, "the client was not pinned");
    if hopper.holding {
        hopper.hop().await;
    }
    for _ in 0..4 {
        assert_eq!(
            setting(&observer.client, "statement_timeout").await,
            "0",
            "never another client's"
        );
        assert_eq!(
            setting(&observer.client, "search_path").await,
            "\"$user\", public"
        );
    }
    c.batch_execute("RESET statement_timeout").await.unwrap();
    for _ in 0..4 {
        hopper.hop().await;
        assert_eq!(setting(c, "statement_timeout").await, "0");
    }
    assert_eq!(
        proxy
            .shared
            .pins
            .get(pgshield::client::sql::PinReason::Unclassified),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_session_state_pins_and_plain_statements_do_not() {
    use pgshield::client::sql::PinReason;
    let proxy = proxy("tx_pin", "max_size = 3").await;
    common::admin()
        .await
        .batch_execute("GRANT pg_read_all_stats TO tx_pin")
        .await
        .unwrap();
    let pinning = [
        ("LISTEN tx_pin_channel", PinReason::Listen),
        ("CREATE TEMP TABLE tx_pin_t (x int)", PinReason::TempTable),
        ("SELECT pg_advisory_lock(42)", PinReason::AdvisoryLock),
        ("PREPARE tx_pin_p AS SELECT 1", PinReason::SqlPrepare),
        (
            "BEGIN; DECLARE tx_pin_c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
            PinReason::CursorWithHold,
        ),
        ("SET ROLE tx_pin", PinReason::SetRole),
        ("DO $$ BEGIN LISTEN tx_pin_do; END $$", PinReason::Listen),
        // Dynamic SQL cannot be read.
        (
            "DO $$ BEGIN EXECUTE 'SELECT 1'; END $$",
            PinReason::Unclassified,
        ),
        // Refused by PostgreSQL for a non-superuser; pinned all the same (pgshield pins on
        // what a statement may do, not on whether it succeeded).
        (
            "SET SESSION AUTHORIZATION tx_pin",
            PinReason::SessionAuthorization,
        ),
        ("LOAD 'auto_explain'", PinReason::Load),
    ];
    for (sql, reason) in pinning {
        let before = proxy.shared.pins.get(reason);
        let conn = proxy.connect("tx_pin", "pw").await.expect("login");
        let busy = proxy.connect("tx_pin", "pw").await.expect("login");
        let may_fail = matches!(reason, PinReason::SessionAuthorization | PinReason::Load);
        if let Err(e) = conn.client.batch_execute(sql).await {
            assert!(may_fail, "{sql}: {e}");
        }
        let pinned_pid = pid(&conn.client).await;
        for _ in 0..5 {
            busy.client.simple_query("SELECT 1").await.unwrap();
            assert_eq!(pid(&conn.client).await, pinned_pid, "{sql} pins");
        }
        assert_eq!(
            proxy.shared.pins.get(reason),
            before + 1,
            "{sql} counted as {reason:?}"
        );
    }
    // None of these pin.
    let conn = proxy.connect("tx_pin", "pw").await.expect("login");
    let other = proxy.connect("tx_pin", "pw").await.expect("login");
    for sql in [
        "SET statement_timeout = '1min'",
        "BEGIN; SET LOCAL work_mem = '8MB'; COMMIT",
        "BEGIN; SELECT pg_advisory_xact_lock(7); COMMIT",
        "SELECT 1",
        "CREATE TABLE IF NOT EXISTS tx_pin_plain (x int); INSERT INTO tx_pin_plain VALUES (1)",
        NPGSQL_RESET,
        "BEGIN; SET LOCAL ROLE tx_pin; SELECT current_user; COMMIT",
        "BEGIN; CREATE TEMP TABLE tx_pin_stage (x int) ON COMMIT DROP; \
         INSERT INTO tx_pin_stage VALUES (1); COMMIT",
        ASYNCPG_RESET,
        "DO $$ BEGIN IF true THEN UPDATE tx_pin_plain SET x = 2; END IF; \
         SET statement_timeout = '2min'; END $$",
    ] {
        conn.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    // Not pinned: once another client holds the backend this client used last, this
    // client's next transaction runs elsewhere.
    let mut moved = false;
    for _ in 0..10 {
        let last = pid(&conn.client).await;
        other.client.batch_execute("BEGIN").await.expect("begin");
        let others = pid(&other.client).await;
        let next = pid(&conn.client).await;
        other.client.batch_execute("COMMIT").await.expect("commit");
        if others == last {
            assert_ne!(next, last, "plain statements must not pin");
            moved = true;
            break;
        }
    }
    assert!(
        moved,
        "the other client never got this client's last backend"
    );
    // The DO block's SET follows it to another backend: the other client holds the one
    // this client used last.
    for _ in 0..3 {
        other.client.batch_execute("BEGIN").await.expect("begin");
        assert_eq!(setting(&conn.client, "statement_timeout").await, "2min");
        other.client.batch_execute("COMMIT").await.expect("commit");
    }
}

/// What asyncpg before 0.30 sends when it takes a connection back from its pool.
const ASYNCPG_RESET: &str = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\n\
    DO $$\nBEGIN\n    PERFORM * FROM pg_listening_channels() LIMIT 1;\n    IF FOUND THEN\n        \
    UNLISTEN *;\n    END IF;\nEND;\n$$;\nRESET ALL;";

/// What Npgsql sends when it takes a connection back from its pool (with prepared
/// statements; `No Reset On Close=false`).
const NPGSQL_RESET: &str = "SET SESSION AUTHORIZATION DEFAULT;RESET ALL;CLOSE ALL;UNLISTEN *;\
                            SELECT pg_advisory_unlock_all();DISCARD SEQUENCES;DISCARD TEMP";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_refuses_session_state_with_0a000_and_the_connection_stays_usable() {
    let proxy = proxy("tx_reject", "max_size = 2\non_session_state = \"reject\"").await;
    let conn = proxy.connect("tx_reject", "pw").await.expect("login");
    // What only looks like session state is not refused.
    conn.client
        .batch_execute(NPGSQL_RESET)
        .await
        .expect("a pool's reset runs in reject mode");
    for sql in [
        "LISTEN tx_reject_channel",
        "CREATE TEMP TABLE tx_reject_t (x int)",
        "SELECT pg_advisory_lock(1)",
        "PREPARE tx_reject_p AS SELECT 1",
        "SET ROLE tx_reject",
    ] {
        let err = conn.client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), Some("0A000"), "{sql}: {err}");
        let one: i32 = conn
            .client
            .query_one("SELECT 1", &[])
            .await
            .expect("usable")
            .get(0);
        assert_eq!(one, 1);
    }
    // Through the extended protocol too.
    let err = conn
        .client
        .query("SELECT pg_advisory_lock($1)", &[&5i64])
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err), Some("0A000"), "{err}");
    conn.client.simple_query("SELECT 1").await.expect("usable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_clients_query_within_a_second_and_nobody_elses() {
    let proxy = proxy("tx_cancel", "max_size = 2").await;
    let a = proxy.connect("tx_cancel", "pw").await.expect("login");
    let b = proxy.connect("tx_cancel", "pw").await.expect("login");
    // Between transactions a client holds nothing: a cancel then does nothing.
    a.client.cancel_token().cancel_query(NoTls).await.unwrap();
    let token = a.client.cancel_token();
    let a_client = a.client;
    let b_client = b.client;
    let a_query = tokio::spawn(async move {
        let r = a_client
            .simple_query("SELECT pg_sleep(10)")
            .await
            .map(|_| ());
        (a_client, r)
    });
    let b_query = tokio::spawn(async move {
        b_client
            .simple_query("SELECT pg_sleep(1)")
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    token.cancel_query(NoTls).await.unwrap();
    let (a_client, result) = tokio::time::timeout(Duration::from_secs(5), a_query)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sqlstate(&result.expect_err("cancelled")), Some("57014"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    a_client.simple_query("SELECT 1").await.expect("usable");
    tokio::time::timeout(Duration::from_secs(5), b_query)
        .await
        .unwrap()
        .unwrap()
        .expect("the other client's query is not cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_queries_return_in_order() {
    let proxy = proxy("tx_pipe", "max_size = 2").await;
    let conn = proxy.connect("tx_pipe", "pw").await.expect("login");
    let statement = conn.client.prepare("SELECT $1::int + 1").await.unwrap();
    let results = futures_util::future::join_all((0..1000i32).map(|i| {
        let (client, statement) = (&conn.client, &statement);
        async move { (i, client.query_one(statement, &[&i]).await) }
    }))
    .await;
    for (i, row) in results {
        assert_eq!(row.expect("query").get::<_, i32>(0), i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn between_transactions_a_client_holds_nothing_but_a_failed_transaction_keeps_its_backend() {
    let proxy = proxy("tx_hold", "max_size = 1\nborrow_timeout = \"1s\"").await;
    let a = proxy.connect("tx_hold", "pw").await.expect("login");
    let b = proxy.connect("tx_hold", "pw").await.expect("login");
    a.client.simple_query("SELECT 1").await.unwrap();
    b.client
        .simple_query("SELECT 1")
        .await
        .expect("the only backend is free between transactions");
    a.client.batch_execute("BEGIN").await.unwrap();
    assert!(a.client.simple_query("SELECT 1/0").await.is_err());
    let err = b
        .client
        .simple_query("SELECT 1")
        .await
        .expect_err("a failed transaction keeps its backend");
    assert_eq!(sqlstate(&err), Some("53300"));
    a.client.batch_execute("ROLLBACK").await.unwrap();
    b.client
        .simple_query("SELECT 1")
        .await
        .expect("free again after ROLLBACK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_transaction_affects_only_its_client() {
    let proxy = proxy("tx_kill", "max_size = 2").await;
    let admin = common::admin().await;
    let a = proxy.connect("tx_kill", "pw").await.expect("login");
    let b = proxy.connect("tx_kill", "pw").await.expect("login");
    a.client.batch_execute("BEGIN").await.unwrap();
    let victim = pid(&a.client).await;
    b.client.batch_execute("BEGIN").await.unwrap();
    admin
        .query_one("SELECT pg_terminate_backend($1)", &[&victim])
        .await
        .unwrap();
    assert!(
        a.client.simple_query("SELECT 1").await.is_err(),
        "the victim's client gets an error"
    );
    b.client
        .batch_execute("SELECT 1; COMMIT")
        .await
        .expect("the other client carries on");
    let c = proxy.connect("tx_kill", "pw").await.expect("login");
    c.client
        .simple_query("SELECT 1")
        .await
        .expect("the pool refills");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_ends_the_client_and_frees_its_backend() {
    let proxy = proxy("tx_idle", "max_size = 1\nidle_transaction_timeout = \"1s\"").await;
    let a = proxy.connect("tx_idle", "pw").await.expect("login");
    a.client
        .batch_execute("BEGIN; CREATE TABLE tx_idle_t (x int)")
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), a.done)
        .await
        .expect("closed")
        .unwrap();
    assert_eq!(
        sqlstate(&ended.expect_err("closed with an error")),
        Some("25P03")
    );
    let b = proxy.connect("tx_idle", "pw").await.expect("login");
    let exists: bool = b
        .client
        .query_one("SELECT to_regclass('tx_idle_t') IS NOT NULL", &[])
        .await
        .expect("the backend was rolled back and returned")
        .get(0);
    assert!(!exists, "the abandoned transaction was rolled back");
}

/// A statement sent with a Flush and no Sync (psycopg's pipeline mode) is the server's to
/// finish: `idle_transaction_timeout` does not end the client while it runs, and
/// `query_timeout` cancels it. An extended batch left open holds its backend as a
/// transaction does: `idle_transaction_timeout` ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_sent_with_a_flush_is_timed_as_a_running_one() {
    let limits = "max_size = 1\nidle_transaction_timeout = \"1s\"\nquery_timeout = \"3s\"";
    let proxy = trusted_proxy("tx_flushed", limits).await;
    let mut s = raw::login_trusted(proxy.addr, "tx_flushed").await;
    // The tags up to and including the first CommandComplete or ErrorResponse.
    async fn until_done(s: &mut tokio::net::TcpStream) -> (String, Vec<String>) {
        let mut tags = String::new();
        let mut codes = Vec::new();
        loop {
            let read = tokio::time::timeout(Duration::from_secs(8), raw::read_message(s));
            let (tag, body) = read.await.expect("a reply in time").expect("a reply");
            tags.push(char::from(tag));
            if tag == b'E' {
                codes.push(raw::error_code(&body));
            }
            if matches!(tag, b'C' | b'E') {
                return (tags, codes);
            }
        }
    }
    raw::send(&mut s, &raw::query("BEGIN")).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "CZ");
    let mut run = raw::parse_bind_execute("SELECT pg_sleep(1.5)");
    run.extend(raw::message(b'H', b""));
    raw::send(&mut s, &run).await;
    assert_eq!(until_done(&mut s).await, ("12DC".to_owned(), vec![]));
    let mut run = raw::parse_bind_execute("SELECT pg_sleep(10)");
    run.extend(raw::message(b'H', b""));
    let started = Instant::now();
    raw::send(&mut s, &run).await;
    assert_eq!(
        until_done(&mut s).await,
        ("12E".to_owned(), vec!["57014".to_owned()])
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    raw::send(&mut s, &raw::SYNC).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "Z");
    raw::send(&mut s, &raw::query("ROLLBACK")).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "CZ");
    raw::send(&mut s, &raw::parse_bind_execute("SELECT 1")).await;
    assert_eq!(
        until_done(&mut s).await,
        ("E".to_owned(), vec!["25P03".to_owned()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_a_statement_that_runs_too_long() {
    let proxy = proxy("tx_qt", "max_size = 1\nquery_timeout = \"1s\"").await;
    let conn = proxy.connect("tx_qt", "pw").await.expect("login");
    let started = Instant::now();
    let err = conn
        .client
        .simple_query("SELECT pg_sleep(10)")
        .await
        .expect_err("cancelled");
    assert_eq!(sqlstate(&err), Some("57014"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    conn.client
        .simple_query("SELECT pg_sleep(0.2)")
        .await
        .expect("short statements run");
}

/// Each of two statements pipelined in one go gets its own query_timeout: the second is
/// cancelled half a second after it starts, not at a deadline left from the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_statements_each_get_their_query_timeout() {
    let role = "tx_qt_pipe";
    let proxy = trusted_proxy(role, "mode = \"transaction\"\nquery_timeout = \"500ms\"").await;
    let mut s = raw::login_trusted(proxy.addr, role).await;
    let mut both = raw::query("SELECT pg_sleep(10)");
    both.extend_from_slice(&raw::query("SELECT pg_sleep(10)"));
    let started = Instant::now();
    raw::send(&mut s, &both).await;
    let mut cancelled = 0;
    while cancelled < 2 {
        let (tag, body) = raw::read_message(&mut s).await.expect("answered");
        if tag == b'E' {
            assert_eq!(raw::error_code(&body), "57014");
            cancelled += 1;
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A client that stops reading a large result past query_timeout is not ended: the
/// server, blocked writing to pgshield (which reads no more for a client that does not
/// read), acts on the cancel only once the client reads again, and then it is the usual
/// ERROR 57014, the connection usable. (A server silent for 5 s after the cancel while
/// pgshield reads it ends the client; so does a result left unread for a minute.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_spares_a_client_that_reads_slowly() {
    let role = "tx_qt_slow";
    let proxy = trusted_proxy(role, "mode = \"transaction\"\nquery_timeout = \"1s\"").await;
    let mut s = raw::login_trusted(proxy.addr, role).await;
    raw::send(
        &mut s,
        &raw::query("SELECT repeat('x', 1000) FROM generate_series(1, 1000000)"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut error = None;
    loop {
        let (tag, body) = raw::read_message(&mut s)
            .await
            .expect("answered, not closed");
        match tag {
            b'E' => {
                let severity = body.split(|&b| b == 0).find_map(|f| f.strip_prefix(b"S"));
                error = Some((raw::error_code(&body), severity.map(<[u8]>::to_vec)));
            }
            b'Z' => break,
            _ => {}
        }
    }
    assert_eq!(
        error,
        Some(("57014".to_owned(), Some(b"ERROR".to_vec()))),
        "cancelled as usual"
    );
    raw::send(&mut s, &raw::query("SELECT 'on'")).await;
    assert_eq!(row_until_ready(&mut s).await.as_deref(), Ok("on"));
}

/// A client that pipelines a Query behind a COPY FROM STDIN that fails (data sent ahead
/// of the CopyInResponse): which ReadyForQuery answers what cannot be told from outside,
/// so pgshield finds its place among the replies again before letting go of the backend,
/// and the Query's answer still reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_pipelined_behind_a_failed_copy_is_answered() {
    let proxy = trusted_proxy("tx_copy_pipe", "max_size = 1").await;
    common::admin()
        .await
        .batch_execute(
            "CREATE TABLE tx_copy_pipe_t (x int); \
             CREATE VIEW tx_copy_pipe_v AS SELECT * FROM tx_copy_pipe_t; \
             GRANT ALL ON tx_copy_pipe_t, tx_copy_pipe_v TO tx_copy_pipe",
        )
        .await
        .expect("setup");
    let mut s = raw::login_trusted(proxy.addr, "tx_copy_pipe").await;
    let mut all = raw::parse_bind_execute("COPY tx_copy_pipe_v FROM STDIN");
    all.extend_from_slice(&raw::SYNC);
    all.extend(raw::message(b'd', b"1\n"));
    all.extend_from_slice(&raw::COPY_DONE);
    all.extend_from_slice(&raw::SYNC);
    all.extend(raw::query("SELECT 'after'"));
    raw::send(&mut s, &all).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("12GEZ".to_owned(), vec!["42809".to_owned()])
    );
    assert_eq!(raw::until_ready(&mut s).await.0, "Z");
    assert_eq!(row_until_ready(&mut s).await.as_deref(), Ok("after"));
    raw::send(&mut s, &raw::query("SELECT 'and on'")).await;
    assert_eq!(row_until_ready(&mut s).await.as_deref(), Ok("and on"));
}

/// A COPY FROM STDIN in the extended protocol that fails (a bad row, or a sink dropped
/// unfinished: CopyFail) leaves replies pgshield cannot match for sure; the client still
/// holds nothing once it ended outside a transaction (its backend goes back once its
/// replies are matched again), and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_copy_from_stdin_leaves_the_client_holding_no_backend() {
    use futures_util::SinkExt;
    let proxy = proxy("tx_copyfail", "max_size = 2\nborrow_timeout = \"3s\"").await;
    let conn = proxy.connect("tx_copyfail", "pw").await.expect("login");
    let c = &conn.client;
    c.batch_execute("CREATE TABLE tx_copyfail_t (x int)")
        .await
        .unwrap();
    for finish in [false, true] {
        {
            let sink = c.copy_in("COPY tx_copyfail_t FROM STDIN").await.unwrap();
            futures_util::pin_mut!(sink);
            if finish {
                sink.send(bytes::Bytes::from_static(b"1\nnot a number\n"))
                    .await
                    .unwrap();
                let e = sink.finish().await.expect_err("a bad row fails the COPY");
                assert_eq!(sqlstate(&e), Some("22P02"));
            } else {
                sink.send(bytes::Bytes::from_static(b"1\n")).await.unwrap();
                // Dropped unfinished (at the end of this block): CopyFail.
            }
        }
        let one: i32 = c
            .query_one("SELECT 1", &[])
            .await
            .expect("the client goes on")
            .get(0);
        assert_eq!(one, 1);
        // Both backends are free for two others at once: this client holds none.
        let a = proxy.connect("tx_copyfail", "pw").await.expect("login");
        let b = proxy.connect("tx_copyfail", "pw").await.expect("login");
        a.client.batch_execute("BEGIN; SELECT 1").await.unwrap();
        b.client
            .batch_execute("BEGIN; SELECT 1")
            .await
            .expect("the failed COPY's client keeps no backend");
    }
    let count: i64 = c
        .query_one("SELECT count(*) FROM tx_copyfail_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "nothing of either COPY was stored");
}

/// A failed extended-protocol COPY FROM STDIN (tokio-postgres sends every COPY so) whose
/// only messages in doubt are Syncs keeps its backend: pgshield's resync ends all doubt,
/// and nothing of the backend's prepared statements can differ from what is recorded.
/// Before, every such failure closed the backend (a reconnect each time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_extended_copy_keeps_its_backend() {
    use futures_util::SinkExt;
    let proxy = proxy("tx_copykeep", "max_size = 1").await;
    let conn = proxy.connect("tx_copykeep", "pw").await.expect("login");
    let c = &conn.client;
    c.batch_execute("CREATE TABLE tx_copykeep_t (x int PRIMARY KEY)")
        .await
        .expect("table");
    let before = pid(c).await;
    {
        let sink = c
            .copy_in("COPY tx_copykeep_t FROM STDIN")
            .await
            .expect("copy");
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n1\n"))
            .await
            .expect("data");
        let e = sink.finish().await.expect_err("a duplicate fails the COPY");
        assert_eq!(sqlstate(&e), Some("23505"));
    }
    let statement = c.prepare("SELECT $1::int + 1").await.expect("prepare");
    let two: i32 = c.query_one(&statement, &[&1i32]).await.expect("run").get(0);
    assert_eq!(two, 2);
    assert_eq!(pid(c).await, before, "the backend was kept");
}

/// A client pinned by SQL PREPARE has statements of its own on its backend: its DEALLOCATE
/// ALL drops them there (and its protocol-level ones), as in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_clients_deallocate_all_drops_its_sql_prepared_statements() {
    let proxy = proxy("tx_pin_dealloc", "max_size = 2").await;
    let conn = proxy.connect("tx_pin_dealloc", "pw").await.expect("login");
    let c = &conn.client;
    let named = c
        .prepare("SELECT 41")
        .await
        .expect("a protocol-level statement");
    c.batch_execute("PREPARE p AS SELECT 1")
        .await
        .expect("PREPARE pins");
    c.batch_execute("DEALLOCATE ALL")
        .await
        .expect("DEALLOCATE ALL");
    let e = c
        .batch_execute("EXECUTE p")
        .await
        .expect_err("p is gone, as in PostgreSQL");
    assert_eq!(sqlstate(&e), Some("26000"));
    let e = c
        .query(&named, &[])
        .await
        .expect_err("so is the protocol-level one");
    assert_eq!(sqlstate(&e), Some("26000"));
    c.batch_execute("PREPARE p AS SELECT 2")
        .await
        .expect("p can be prepared again");
    let rows = c.simple_query("EXECUTE p").await.expect("EXECUTE p");
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("2"));
}

/// A simple-Query COPY FROM STDIN that fails on its first row while the client streams on
/// (psql and libpq read the error only after their CopyDone): PostgreSQL answers the error
/// and ReadyForQuery at once and drops the rest of the data. The client, idle once it has
/// read them, holds no backend: the only one of the pool serves another client at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fails_while_the_client_streams_on_leaves_it_holding_no_backend() {
    let proxy = trusted_proxy(
        "tx_copystream",
        "mode = \"transaction\"\nmax_size = 1\nborrow_timeout = \"3s\"",
    )
    .await;
    let setup = proxy.connect("tx_copystream", "pw").await.expect("login");
    setup
        .client
        .batch_execute("CREATE TABLE tx_copystream_t (x int)")
        .await
        .unwrap();
    drop(setup);
    let mut s = raw::login_trusted(proxy.addr, "tx_copystream").await;
    for round in 0..3 {
        raw::send(&mut s, &raw::query("COPY tx_copystream_t FROM STDIN")).await;
        let (tag, _) = raw::read_message(&mut s).await.expect("CopyInResponse");
        assert_eq!(tag, b'G', "round {round}");
        // A bad first row, then 4 MB more in one go, then CopyDone; only then is the
        // error read.
        let mut bytes = raw::message(b'd', b"not a number\n");
        let rows = "1\n".repeat(4096);
        for _ in 0..512 {
            bytes.extend(raw::message(b'd', rows.as_bytes()));
        }
        bytes.extend_from_slice(&raw::COPY_DONE);
        raw::send(&mut s, &bytes).await;
        let (tags, codes) = raw::until_ready(&mut s).await;
        assert_eq!((tags.as_str(), codes), ("EZ", vec!["22P02".to_owned()]));
        let other = proxy.connect("tx_copystream", "pw").await.expect("login");
        let started = Instant::now();
        other
            .client
            .simple_query("SELECT 1")
            .await
            .expect("the failed COPY's client, idle, keeps no backend");
        assert!(started.elapsed() < Duration::from_secs(2), "round {round}");
    }
    raw::send(&mut s, &raw::query("SELECT count(*) FROM tx_copystream_t")).await;
    let (tag, _) = raw::read_message(&mut s).await.expect("reply");
    assert_eq!(tag, b'T');
    let (tag, row) = raw::read_message(&mut s).await.expect("row");
    assert_eq!(tag, b'D');
    // One column, one byte long: "0", nothing was stored.
    assert_eq!(row, [0, 1, 0, 0, 0, 1, b'0']);
    assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_describe_and_function_calls_work_in_transaction_mode() {
    use futures_util::{SinkExt, TryStreamExt};
    let proxy = proxy("tx_copy", "max_size = 2").await;
    let conn = proxy.connect("tx_copy", "pw").await.expect("login");
    let c = &conn.client;
    c.batch_execute("CREATE TABLE tx_copy_t (id int, v text)")
        .await
        .unwrap();
    let data: String = (0..20_000).map(|i| format!("{i}\tvalue {i}\n")).collect();
    let sink = c
        .copy_in("COPY tx_copy_t FROM STDIN")
        .await
        .expect("COPY IN");
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.expect("COPY IN completes"), 20_000);
    let out: Vec<bytes::Bytes> = c
        .copy_out("COPY tx_copy_t TO STDOUT")
        .await
        .expect("COPY OUT")
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out.concat(), data.as_bytes());
    // Describe (prepare asks for parameter and column types), then use it.
    let statement = c
        .prepare("SELECT v FROM tx_copy_t WHERE id = $1")
        .await
        .unwrap();
    assert_eq!(statement.params().len(), 1);
    assert_eq!(statement.columns()[0].name(), "v");
    let row = c.query_one(&statement, &[&7i32]).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "value 7");
    // The backend is released after all that (nothing owed, no pin).
    let other = proxy.connect("tx_copy", "pw").await.expect("login");
    other.client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_keeps_the_backend_until_the_batch_is_synced() {
    // asyncpg's pattern: Parse, Describe, Flush; read the descriptions; then Bind,
    // Execute, Sync. The unnamed statement must still be there: same backend.
    let proxy = trusted_proxy("tx_flush", "max_size = 2\nborrow_timeout = \"1s\"").await;
    let mut s = raw::login_trusted(proxy.addr, "tx_flush").await;
    let mut first = raw::message(b'P', b"\0SELECT pg_backend_pid(), $1::int\0\0\0");
    first.extend(raw::message(b'D', b"S\0"));
    first.extend(raw::message(b'H', b""));
    raw::send(&mut s, &first).await;
    let mut tags = String::new();
    while tags.len() < 3 {
        let (tag, _) = raw::read_message(&mut s).await.expect("reply");
        tags.push(char::from(tag));
    }
    assert_eq!(tags, "1tT");
    // Meanwhile another client runs: it must not get the backend holding our batch.
    let mut other = raw::login_trusted(proxy.addr, "tx_flush").await;
    raw::send(&mut other, &raw::query("SELECT pg_backend_pid()")).await;
    let (tags, codes) = raw::until_ready(&mut other).await;
    assert_eq!((tags.as_str(), codes.len()), ("TDCZ", 0));
    let mut second = raw::message(b'B', b"\0\0\0\0\0\x01\0\0\0\x0242\0\0");
    second.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
    second.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &second).await;
    let (tags, codes) = raw::until_ready(&mut s).await;
    assert_eq!((tags.as_str(), codes), ("2DCZ", vec![]));
}

/// A transaction-mode pool of one backend, for trusted user `role`, with `borrow_timeout`,
/// and a client holding that backend in a transaction block.
async fn one_backend_held(role: &str, borrow_timeout: &str) -> (TestProxy, tokio::net::TcpStream) {
    let pool =
        format!("mode = \"transaction\"\nmax_size = 1\nborrow_timeout = \"{borrow_timeout}\"");
    let proxy = trusted_proxy(role, &pool).await;
    let mut holder = raw::login_trusted(proxy.addr, role).await;
    raw::send(&mut holder, &raw::query("BEGIN")).await;
    assert_eq!(raw::until_ready(&mut holder).await.0, "CZ");
    (proxy, holder)
}

/// A Parse refused for want of a backend (its borrow timed out) has the client's messages
/// skipped until its Sync, as PostgreSQL skips them after an error: a simple Query sent on
/// its own before that Sync too, even once a backend is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_after_a_refused_parse_is_skipped_until_the_sync() {
    let (proxy, mut holder) = one_backend_held("tx_skipq", "300ms").await;
    let mut s = raw::login_trusted(proxy.addr, "tx_skipq").await;
    raw::send(&mut s, &raw::message(b'P', b"\0SELECT 'skipped'\0\0\0")).await;
    let (tag, _) = raw::read_message(&mut s).await.expect("refused");
    assert_eq!(tag, b'E');
    raw::send(&mut holder, &raw::query("COMMIT")).await;
    assert_eq!(raw::until_ready(&mut holder).await.0, "CZ");
    raw::send(&mut s, &raw::query("SELECT 'skipped'")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw::send(&mut s, &raw::SYNC).await;
    assert_eq!(raw::until_ready(&mut s).await, ("Z".to_owned(), vec![]));
    raw::send(&mut s, &raw::query("SELECT 1")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("TDCZ".to_owned(), vec![]));
}

/// A lone Query that must queue for a backend: refused with `53300` and a ReadyForQuery
/// when `borrow_timeout` passes, the connection going on; passed on once a backend is
/// free, with a second Query sent while it waited answered after it; and the time that
/// one queued counted as waiting, from its Query (SHOW CLIENTS, SHOW POOLS, SHOW STATS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_query_queued_for_a_backend_times_out_or_goes_on_in_order() {
    let (proxy, mut holder) = one_backend_held("tx_queued", "1s").await;
    let mut s = raw::login_trusted(proxy.addr, "tx_queued").await;
    let started = Instant::now();
    raw::send(&mut s, &raw::query("SELECT 'refused'")).await;
    let refused = raw::until_ready(&mut s).await;
    assert_eq!(refused, ("EZ".to_owned(), vec!["53300".to_owned()]));
    // (Refused once: not borrowed for again by the general path, which would take 2 s.)
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(950) && waited < Duration::from_millis(1900));

    let sent_first = std::time::SystemTime::now();
    raw::send(&mut s, &raw::query("SELECT 'first'")).await;
    let pool = proxy.shared.pools.get("app", "tx_queued").expect("pool");
    let queued = async {
        loop {
            let waiting = proxy.shared.registry.list().into_iter().find(|c| {
                c.user() == "tx_queued"
                    && c.state() == pgshield::client::registry::ClientState::Waiting
            });
            if let Some(client) = waiting {
                return client;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let waiting = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("the client queues");
    assert_eq!(pool.status().waiting, 1);
    let since = waiting.request_at().expect("waiting since");
    assert!(since + Duration::from_millis(50) >= sent_first);
    raw::send(&mut s, &raw::query("SELECT 'second'")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    raw::send(&mut holder, &raw::query("COMMIT")).await;
    assert_eq!(raw::until_ready(&mut holder).await.0, "CZ");
    assert_eq!(row_until_ready(&mut s).await, Ok("first".to_owned()));
    assert_eq!(row_until_ready(&mut s).await, Ok("second".to_owned()));
    assert_eq!(pool.status().waiting, 0);
    let waited = pool.stats.total(|t| &t.wait_time_us);
    assert!(waited >= 100_000, "{waited} µs");
}

/// The same for a prepared statement's run (Bind, Describe of its portal, Execute, Sync,
/// as libpq sends it), which takes the same short way through a queued borrow: refused
/// with `53300` and its batch skipped to the Sync when `borrow_timeout` passes; run once
/// a backend is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepared_run_queued_for_a_backend_times_out_or_goes_on() {
    let role = "tx_queued_run";
    let pool = "mode = \"transaction\"\nmax_size = 1\nborrow_timeout = \"1s\"";
    let proxy = trusted_proxy(role, pool).await;
    let mut s = raw::login_trusted(proxy.addr, role).await;
    let mut prepare = raw::message(b'P', b"S_1\0SELECT 1\0\0\0");
    prepare.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &prepare).await;
    assert_eq!(raw::until_ready(&mut s).await, ("1Z".to_owned(), vec![]));
    let mut run = raw::message(b'B', b"\0S_1\0\0\0\0\0\0\0");
    run.extend(raw::message(b'D', b"P\0"));
    run.extend(raw::message(b'E', b"\0\0\0\0\0"));
    run.extend_from_slice(&raw::SYNC);
    let mut holder = raw::login_trusted(proxy.addr, role).await;
    raw::send(&mut holder, &raw::query("BEGIN")).await;
    assert_eq!(raw::until_ready(&mut holder).await.0, "CZ");
    let started = Instant::now();
    raw::send(&mut s, &run).await;
    let refused = raw::until_ready(&mut s).await;
    assert_eq!(refused, ("EZ".to_owned(), vec!["53300".to_owned()]));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(950) && waited < Duration::from_millis(1900));
    // Queued again, and run once the holder lets go.
    raw::send(&mut s, &run).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    raw::send(&mut holder, &raw::query("COMMIT")).await;
    assert_eq!(raw::until_ready(&mut holder).await.0, "CZ");
    assert_eq!(raw::until_ready(&mut s).await, ("2TDCZ".to_owned(), vec![]));
    raw::send(&mut s, &run).await;
    assert_eq!(raw::until_ready(&mut s).await, ("2TDCZ".to_owned(), vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_set_of_a_server_wide_setting_harms_no_one() {
    // shared_buffers cannot be changed in a session: the SET fails, and the setting must
    // not be taken for one the client changed (it would poison the backend for others).
    let proxy = proxy("tx_badset", "max_size = 1").await;
    let a = proxy.connect("tx_badset", "pw").await.expect("login");
    let err = a
        .client
        .batch_execute("SET shared_buffers = '1GB'")
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err), Some("55P02"));
    a.client
        .simple_query("SELECT 1")
        .await
        .expect("the client carries on");
    let c = proxy.connect("tx_badset", "pw").await.expect("login");
    for _ in 0..3 {
        c.client
            .simple_query("SELECT 1")
            .await
            .expect("others carry on");
        a.client
            .simple_query("SELECT 1")
            .await
            .expect("the client carries on");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_survives_another_clients_settings_on_its_backend() {
    let proxy = trusted_proxy("tx_unnamed", "max_size = 1").await;
    let login = |app: &'static str| {
        let addr = proxy.addr;
        async move {
            let mut s = raw::connect(addr).await;
            raw::send(
                &mut s,
                &raw::startup(&[
                    ("user", "tx_unnamed"),
                    ("database", "app"),
                    ("application_name", app),
                ]),
            )
            .await;
            raw::until_ready(&mut s).await;
            s
        }
    };
    let mut a = login("client-a").await;
    let mut c = login("client-c").await;
    // A prepares the unnamed statement and lets go of the backend.
    let mut parse = raw::message(b'P', b"\0SELECT 'a unnamed'\0\0\0");
    parse.extend(raw::message(b'D', b"S\0"));
    parse.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &parse).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "1tTZ");
    // C uses that backend: its settings are applied there (a simple Query, which destroys
    // the server's unnamed statement).
    raw::send(&mut c, &raw::query("SELECT 1")).await;
    raw::until_ready(&mut c).await;
    // A's unnamed statement is still A's.
    assert_eq!(run_named(&mut a, "").await.as_deref(), Ok("a unnamed"));
}

/// A column added (straight on the server) to a table a prepared `SELECT *` reads: PostgreSQL fails the statement
/// once with "cached plan must not change result type" (0A000), and drivers heal by
/// preparing it again. That Parse must not find the stale statement still standing for the
/// same text on the backend (it failed again, on every retry, for good: asyncpg and pgjdbc
/// clients broke until pgshield restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_result_type_changed_fails_once_and_prepared_again_works() {
    let proxy = proxy("tx_stale", "max_size = 1").await;
    let a = proxy.connect("tx_stale", "pw").await.expect("a").client;
    let b = proxy.connect("tx_stale", "pw").await.expect("b").client;
    a.batch_execute("DROP TABLE IF EXISTS tx_stale_t; CREATE TABLE tx_stale_t (x int); INSERT INTO tx_stale_t VALUES (1)")
        .await
        .expect("table");
    let sql = "SELECT * FROM tx_stale_t";
    let on_a = a.prepare(sql).await.expect("prepare a");
    let on_b = b.prepare(sql).await.expect("prepare b");
    assert_eq!(a.query(&on_a, &[]).await.expect("a")[0].len(), 1);
    assert_eq!(b.query(&on_b, &[]).await.expect("b")[0].len(), 1);
    // Straight on the server, as a migration tool may: pgshield does not see it happen.
    common::admin()
        .await
        .batch_execute("ALTER TABLE tx_stale_t ADD COLUMN y int DEFAULT 2")
        .await
        .expect("alter");
    let stale = a.query(&on_a, &[]).await.expect_err("stale");
    assert_eq!(sqlstate(&stale), Some("0A000"), "{stale}");
    // Prepared again (as asyncpg and pgjdbc do on this error): it works, on the new shape,
    // for this client and for any other that prepares it again.
    let again = a.prepare(sql).await.expect("prepare again");
    assert_eq!(a.query(&again, &[]).await.expect("again")[0].len(), 2);
    // A client still holding the old statement gets the error, as in PostgreSQL ...
    let stale = b.query(&on_b, &[]).await.expect_err("b stale");
    assert_eq!(sqlstate(&stale), Some("0A000"), "{stale}");
    let again = b.prepare(sql).await.expect("b prepare again");
    assert_eq!(b.query(&again, &[]).await.expect("b again")[0].len(), 2);
    // ... and a client preparing it for the first time gets the new shape at once.
    let c = proxy.connect("tx_stale", "pw").await.expect("c").client;
    let fresh = c.prepare(sql).await.expect("prepare c");
    assert_eq!(c.query(&fresh, &[]).await.expect("c")[0].len(), 2);
    a.batch_execute("DROP TABLE tx_stale_t")
        .await
        .expect("drop");
}

/// The same, on a backend that had not prepared the statement before the change: prepared
/// there afresh, it would return the new columns to a client that decodes them by the old
/// description (here, text where an integer was: tokio-postgres fails to decode it; a
/// driver could as well read wrong values). pgshield has that backend describe it first
/// and refuses the Bind as PostgreSQL does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_columns_changed_is_refused_on_a_backend_preparing_it_afresh() {
    let proxy = proxy("tx_fresh", "max_size = 2").await;
    let connect = || async { proxy.connect("tx_fresh", "pw").await.expect("login").client };
    let (a, h1, h2) = (connect().await, connect().await, connect().await);
    a.batch_execute("DROP TABLE IF EXISTS tx_fresh_t; CREATE TABLE tx_fresh_t (x int); INSERT INTO tx_fresh_t VALUES (1)")
        .await
        .expect("table");
    // `a` prepares and runs it on one backend (h1 holds the other).
    h1.batch_execute("BEGIN").await.expect("begin");
    let other = pid(&h1).await;
    let sql = "SELECT * FROM tx_fresh_t";
    let statement = a.prepare(sql).await.expect("prepare");
    let x: i32 = a.query_one(&statement, &[]).await.expect("run").get(0);
    assert_eq!(x, 1);
    h1.batch_execute("COMMIT").await.expect("commit");
    common::admin()
        .await
        .batch_execute("ALTER TABLE tx_fresh_t ALTER COLUMN x TYPE text USING x || 'x'")
        .await
        .expect("alter");
    // Hold the backend `a` used, so that its next Bind goes to `other`, which lacks it.
    h1.batch_execute("BEGIN").await.expect("begin");
    if pid(&h1).await == other {
        h2.batch_execute("BEGIN; SELECT 1")
            .await
            .expect("h2 holds the first");
        h1.batch_execute("COMMIT").await.expect("frees the other");
    }
    let stale = a.query(&statement, &[]).await.expect_err("refused");
    assert_eq!(sqlstate(&stale), Some("0A000"), "{stale}");
    assert_eq!(pid(&a).await, other, "ran on the backend that lacked it");
    // Prepared again, it works, on the new columns.
    let again = a.prepare(sql).await.expect("prepare again");
    let x: String = a.query_one(&again, &[]).await.expect("again").get(0);
    assert_eq!(x, "1x");
    for held in [&h1, &h2] {
        let _ = held.batch_execute("COMMIT").await;
    }
    a.batch_execute("DROP TABLE tx_fresh_t")
        .await
        .expect("drop");
}

/// The same for a driver that describes the portal, never the statement (pgjdbc: Parse,
/// Bind, Describe of the portal and Execute the first time, then Bind and Execute alone,
/// decoding rows by the description it kept). The portal's description is the statement's
/// columns: a backend preparing it afresh after they changed must not run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_described_only_through_its_portals_is_refused_when_its_columns_changed() {
    described_only_through_a_portal("tx_portal", "", false).await;
}

/// The same through a named portal (pgjdbc's, for a query run by a fetch size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_described_only_through_a_named_portal_is_refused_too() {
    described_only_through_a_portal("tx_portal_named", "C_1", false).await;
}

/// The same for libpq's way (psycopg, pgbench -M prepared): the statement prepared alone
/// (Parse, Sync), then each run a Bind, a Describe of the portal, an Execute and a Sync,
/// whose first description is noted on pgshield's short path for such runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_alone_then_described_through_its_portal_is_refused_too() {
    described_only_through_a_portal("tx_portal_libpq", "", true).await;
}

async fn described_only_through_a_portal(role: &str, portal: &str, prepared_alone: bool) {
    let proxy = trusted_proxy(role, "max_size = 2").await;
    let connect = || async { proxy.connect(role, "pw").await.expect("login").client };
    let (h1, h2) = (connect().await, connect().await);
    let mut a = raw::login_trusted(proxy.addr, role).await;
    let table = format!("{role}_t");
    h1.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (x int); INSERT INTO {table} VALUES (1)"
    ))
    .await
    .expect("table");
    let named = |tag: u8, head: &[u8], tail: &[u8]| {
        let mut body = head.to_vec();
        body.extend_from_slice(portal.as_bytes());
        body.push(0);
        body.extend_from_slice(tail);
        raw::message(tag, &body)
    };
    let bind_execute = |describe: bool| {
        let mut bytes = named(b'B', b"", b"S_1\0\0\0\0\0\0\0");
        if describe {
            bytes.extend(named(b'D', b"P", b""));
        }
        bytes.extend(named(b'E', b"", &[0, 0, 0, 0]));
        bytes.extend_from_slice(&raw::SYNC);
        bytes
    };
    // `a` prepares and runs it on one backend (h1 holds the other).
    h1.batch_execute("BEGIN").await.expect("begin");
    let other = pid(&h1).await.to_string();
    let mut first = raw::message(b'P', format!("S_1\0SELECT * FROM {table}\0\0\0").as_bytes());
    if prepared_alone {
        first.extend_from_slice(&raw::SYNC);
        raw::send(&mut a, &first).await;
        assert_eq!(row_until_ready(&mut a).await, Err("no row".to_owned()));
        first = bind_execute(true);
    } else {
        first.extend(bind_execute(true));
    }
    raw::send(&mut a, &first).await;
    assert_eq!(row_until_ready(&mut a).await.as_deref(), Ok("1"));
    raw::send(&mut a, &bind_execute(false)).await;
    assert_eq!(row_until_ready(&mut a).await.as_deref(), Ok("1"));
    h1.batch_execute("COMMIT").await.expect("commit");
    common::admin()
        .await
        .batch_execute(&format!(
            "ALTER TABLE {table} ALTER COLUMN x TYPE text USING x || 'x'"
        ))
        .await
        .expect("alter");
    // Hold the backend `a` used, so that its next Bind goes to `other`, which lacks it.
    h1.batch_execute("BEGIN").await.expect("begin");
    if pid(&h1).await.to_string() == other {
        h2.batch_execute("BEGIN; SELECT 1")
            .await
            .expect("h2 holds the first");
        h1.batch_execute("COMMIT").await.expect("frees the other");
    }
    // Run as pgjdbc runs it once described: PostgreSQL's own error, not rows of text the
    // driver would decode as integers.
    raw::send(&mut a, &bind_execute(false)).await;
    assert_eq!(row_until_ready(&mut a).await, Err("0A000".to_owned()));
    raw::send(&mut a, &raw::query("SELECT pg_backend_pid()")).await;
    let ran_on = row_until_ready(&mut a).await.expect("pid");
    assert_eq!(ran_on, other, "ran on the backend that lacked it");
    for held in [&h1, &h2] {
        let _ = held.batch_execute("COMMIT").await;
    }
    h1.batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop");
}

/// A schema change a client sends through pgshield makes the next Parse of a text prepare
/// it afresh in every pool, not only the client's: here a second name configured for the
/// same server database, whose clients prepare the statement again after the change and
/// must not be handed the one prepared before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_through_one_pool_is_seen_by_every_pool() {
    common::create_role("tx_alias", "pw").await;
    let port = common::cluster().port();
    let databases = format!(
        "[databases.app]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\n\
         [databases.alias]\nhost = \"127.0.0.1\"\nport = {port}\ndbname = \"postgres\"\n"
    );
    let proxy = TestProxy::start_with_databases(
        &databases,
        "[pool]\nmode = \"transaction\"\nmax_size = 1\n[users.tx_alias]\npassword = \"pw\"\n",
    )
    .await;
    let app = proxy.connect("tx_alias", "pw").await.expect("app").client;
    let mut config = proxy.config("tx_alias", "pw");
    config.dbname("alias");
    let alias = common::connect(&config).await.expect("alias").client;
    app.batch_execute("DROP TABLE IF EXISTS tx_alias_t; CREATE TABLE tx_alias_t (x int); INSERT INTO tx_alias_t VALUES (1)")
        .await
        .expect("table");
    let sql = "SELECT * FROM tx_alias_t";
    let before = alias.prepare(sql).await.expect("prepare");
    assert_eq!(alias.query(&before, &[]).await.expect("run")[0].len(), 1);
    app.batch_execute("ALTER TABLE tx_alias_t ADD COLUMN y int DEFAULT 2")
        .await
        .expect("alter");
    // Prepared after the change: analysed afresh, as on a new connection to PostgreSQL.
    let after = alias.prepare(sql).await.expect("prepare again");
    assert_eq!(alias.query(&after, &[]).await.expect("runs")[0].len(), 2);
    // The statement prepared before it fails, as in PostgreSQL.
    let stale = alias.query(&before, &[]).await.expect_err("stale");
    assert_eq!(sqlstate(&stale), Some("0A000"), "{stale}");
    app.batch_execute("DROP TABLE tx_alias_t")
        .await
        .expect("drop");
}

/// The same text means other columns for another user (its own schema first in its
/// search_path here, or another database): each pool keeps its own statements, so neither
/// user's description makes the other's statement look stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_text_with_other_columns_for_another_user_is_no_schema_change() {
    common::create_role("tx_scope_a", "pw").await;
    common::create_role("tx_scope_b", "pw").await;
    let admin = common::admin().await;
    admin
        .batch_execute(
            "DROP SCHEMA IF EXISTS tx_scope_a CASCADE; DROP SCHEMA IF EXISTS tx_scope_b CASCADE; \
             CREATE SCHEMA tx_scope_a AUTHORIZATION tx_scope_a; \
             CREATE SCHEMA tx_scope_b AUTHORIZATION tx_scope_b; \
             CREATE TABLE tx_scope_a.t (x int); INSERT INTO tx_scope_a.t VALUES (1); \
             CREATE TABLE tx_scope_b.t (y text, z int); INSERT INTO tx_scope_b.t VALUES ('b', 2); \
             GRANT ALL ON ALL TABLES IN SCHEMA tx_scope_a TO tx_scope_a; \
             GRANT ALL ON ALL TABLES IN SCHEMA tx_scope_b TO tx_scope_b",
        )
        .await
        .expect("schemas");
    let proxy = TestProxy::start(
        "[pool]\nmode = \"transaction\"\nmax_size = 1\n\
         [users.tx_scope_a]\npassword = \"pw\"\n[users.tx_scope_b]\npassword = \"pw\"\n",
    )
    .await;
    // (The user's own schema comes first in the default search_path, "$user", public.)
    let a = proxy.connect("tx_scope_a", "pw").await.expect("a").client;
    let b = proxy.connect("tx_scope_b", "pw").await.expect("b").client;
    let sql = "SELECT * FROM t";
    for _ in 0..3 {
        let on_a = a.prepare(sql).await.expect("prepare a");
        let on_b = b.prepare(sql).await.expect("prepare b");
        let x: i32 = a.query_one(&on_a, &[]).await.expect("a runs").get(0);
        let y: String = b.query_one(&on_b, &[]).await.expect("b runs").get(0);
        assert_eq!((x, y.as_str()), (1, "b"));
    }
    admin
        .batch_execute("DROP SCHEMA tx_scope_a CASCADE; DROP SCHEMA tx_scope_b CASCADE")
        .await
        .expect("drop");
}

/// The backend's description of a statement it prepares afresh is awaited even when an
/// earlier batch the client pipelined fails meanwhile: that error does not let the
/// client's Bind go on before the description is known. (The error and the description
/// often arrive in one read, which hides the difference: this holds the outcome, and
/// `ReplyTracker::owes_description_of` the rule.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_description_awaited_outlives_an_error_in_an_earlier_pipelined_batch() {
    let proxy = trusted_proxy("tx_check", "max_size = 2").await;
    let mut s = raw::login_trusted(proxy.addr, "tx_check").await;
    let mut h1 = raw::login_trusted(proxy.addr, "tx_check").await;
    let mut h2 = raw::login_trusted(proxy.addr, "tx_check").await;
    let admin = common::admin().await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS tx_check_t; CREATE TABLE tx_check_t (x int); \
             INSERT INTO tx_check_t VALUES (1); GRANT SELECT ON tx_check_t TO tx_check",
        )
        .await
        .expect("table");
    async fn hold(h: &mut tokio::net::TcpStream) -> String {
        raw::send(h, &raw::query("BEGIN; SELECT pg_backend_pid()")).await;
        row_until_ready(h).await.expect("pid")
    }
    async fn free(h: &mut tokio::net::TcpStream) {
        raw::send(h, &raw::query("COMMIT")).await;
        raw::until_ready(h).await;
    }
    // Described on one backend (h1 holds the other, q).
    let q = hold(&mut h1).await;
    let mut describe = b"S".to_vec();
    describe.extend_from_slice(b"x1\0");
    let mut bytes = raw::message(b'P', b"x1\0SELECT * FROM tx_check_t\0\0\0");
    bytes.extend(raw::message(b'D', &describe));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bytes).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "1tTZ");
    assert_eq!(run_named(&mut s, "x1").await.as_deref(), Ok("1"));
    free(&mut h1).await;
    admin
        .batch_execute("ALTER TABLE tx_check_t ALTER COLUMN x TYPE text USING x || 'x'")
        .await
        .expect("alter");
    // Hold the backend that has x1, so that `s` goes to q.
    if hold(&mut h1).await == q {
        hold(&mut h2).await;
        free(&mut h1).await;
    }
    let mut bytes = raw::parse_bind_execute("SELECT 1/0");
    bytes.extend_from_slice(&raw::SYNC);
    bytes.extend(raw::message(b'B', b"\0x1\0\0\0\0\0\0\0"));
    bytes.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bytes).await;
    assert_eq!(raw::until_ready(&mut s).await.1, vec!["22012".to_owned()]);
    // Refused as PostgreSQL refuses it, not run on the new columns.
    let (tags, codes) = raw::until_ready(&mut s).await;
    assert_eq!((tags.as_str(), codes), ("EZ", vec!["0A000".to_owned()]));
    // The Bind fails, as in PostgreSQL, with no Execute behind it too.
    let mut bind = raw::message(b'B', b"\0x1\0\0\0\0\0\0\0");
    bind.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bind).await;
    let (tags, codes) = raw::until_ready(&mut s).await;
    assert_eq!((tags.as_str(), codes), ("EZ", vec!["0A000".to_owned()]));
    assert_eq!(
        parse_named(&mut s, "x2", "SELECT * FROM tx_check_t").await,
        "1Z"
    );
    assert_eq!(run_named(&mut s, "x2").await.as_deref(), Ok("1x"));
    for h in [&mut h1, &mut h2] {
        raw::send(h, &raw::query("ROLLBACK")).await;
        raw::until_ready(h).await;
    }
    admin
        .batch_execute("DROP TABLE tx_check_t")
        .await
        .expect("drop");
}

/// pgshield's own statements (`pgshield_…`, which `pg_prepared_statements` shows) are not
/// a client's to run by SQL `EXECUTE`: PostgreSQL would answer `26000`, the client having
/// prepared no such statement, and so does pgshield, in a simple Query or a Parse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_execute_of_pgshields_own_statement_names_fails_as_in_postgres() {
    let proxy = trusted_proxy("tx_exec_ours", "max_size = 1").await;
    let mut a = raw::login_trusted(proxy.addr, "tx_exec_ours").await;
    let mut b = raw::login_trusted(proxy.addr, "tx_exec_ours").await;
    assert_eq!(parse_named(&mut a, "s", "SELECT 'secret'").await, "1Z");
    assert_eq!(run_named(&mut a, "s").await.as_deref(), Ok("secret"));
    let find = b"SELECT name FROM pg_prepared_statements WHERE statement = 'SELECT ''secret'''";
    let name = query_bytes(&mut b, find)
        .await
        .expect("a's statement on the backend");
    let name = String::from_utf8(name).expect("UTF-8");
    assert!(name.starts_with("pgshield_"), "{name}");
    let upper = name.to_uppercase();
    for (i, sql) in [
        format!("EXECUTE {name}"),
        format!("EXECUTE {upper}"),
        format!("explain execute \"{name}\""),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            query_bytes(&mut b, sql.as_bytes()).await,
            Err("26000".into())
        );
        // (Prepared by the client, through the extended protocol.)
        for client_name in ["", &format!("x{i}")] {
            assert_eq!(parse_named(&mut b, client_name, &sql).await, "1Z", "{sql}");
            let run = run_named(&mut b, client_name).await;
            assert_eq!(run, Err("26000".into()), "{sql}");
        }
    }
    // In its place among the Query's statements, as PostgreSQL fails it.
    let sql = format!("SELECT 1; EXECUTE {name}; SELECT 2");
    raw::send(&mut b, &raw::query(&sql)).await;
    assert_eq!(
        raw::until_ready(&mut b).await,
        ("TDCEZ".to_owned(), vec!["26000".to_owned()])
    );
    // Text that only reads alike runs as written; a's statement still runs.
    let sql = "SELECT 'EXECUTE pgshield_1' AS \"EXECUTE pgshield_1\"";
    assert_eq!(
        query_bytes(&mut b, sql.as_bytes()).await.as_deref(),
        Ok(&b"EXECUTE pgshield_1"[..])
    );
    assert_eq!(run_named(&mut a, "s").await.as_deref(), Ok("secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_works_on_protocol_level_statements_as_in_postgres() {
    let proxy = trusted_proxy("tx_dealloc", "max_size = 1").await;
    let mut s = raw::login_trusted(proxy.addr, "tx_dealloc").await;
    let mut other = raw::login_trusted(proxy.addr, "tx_dealloc").await;
    assert_eq!(parse_named(&mut s, "a5", "SELECT 'five'").await, "1Z");
    assert_eq!(
        parse_named(&mut other, "mine", "SELECT 'other'").await,
        "1Z"
    );
    // As ActiveRecord does when its statement cache evicts, inside a transaction too.
    raw::send(&mut s, &raw::query("BEGIN")).await;
    raw::until_ready(&mut s).await;
    raw::send(&mut s, &raw::query("DEALLOCATE a5")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("CZ".to_owned(), vec![]));
    raw::send(&mut s, &raw::query("COMMIT")).await;
    assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
    assert_eq!(run_named(&mut s, "a5").await, Err("26000".into()));
    assert_eq!(parse_named(&mut s, "a5", "SELECT 'five again'").await, "1Z");
    raw::send(&mut s, &raw::query("DEALLOCATE ALL")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("CZ".to_owned(), vec![]));
    assert_eq!(run_named(&mut s, "a5").await, Err("26000".into()));
    // Another client's statements on the same backend were not touched.
    assert_eq!(run_named(&mut other, "mine").await.as_deref(), Ok("other"));
    // A DISCARD ALL that fails (inside a transaction) drops nothing.
    assert_eq!(parse_named(&mut s, "b1", "SELECT 'b'").await, "1Z");
    raw::send(&mut s, &raw::query("BEGIN")).await;
    raw::until_ready(&mut s).await;
    raw::send(&mut s, &raw::query("DISCARD ALL")).await;
    assert_eq!(raw::until_ready(&mut s).await.1, vec!["25001".to_owned()]);
    raw::send(&mut s, &raw::query("ROLLBACK")).await;
    raw::until_ready(&mut s).await;
    assert_eq!(run_named(&mut s, "b1").await.as_deref(), Ok("b"));
    assert_eq!(run_named(&mut other, "mine").await.as_deref(), Ok("other"));
    // Through the extended protocol (as pgjdbc sends them) likewise: one that fails
    // inside a transaction, one refused in a failed transaction, and one bound but never
    // executed drop nothing; one that runs drops the client's names.
    let with_sync = |sql: &str| {
        let mut bytes = raw::parse_bind_execute(sql);
        bytes.extend_from_slice(&raw::SYNC);
        bytes
    };
    raw::send(&mut s, &raw::query("BEGIN")).await;
    raw::until_ready(&mut s).await;
    raw::send(&mut s, &with_sync("DISCARD ALL")).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("12EZ".to_owned(), vec!["25001".to_owned()])
    );
    raw::send(&mut s, &raw::query("ROLLBACK")).await;
    raw::until_ready(&mut s).await;
    assert_eq!(run_named(&mut s, "b1").await.as_deref(), Ok("b"));
    raw::send(&mut s, &raw::query("BEGIN; SELECT 1/0")).await;
    raw::until_ready(&mut s).await;
    raw::send(&mut s, &with_sync("DEALLOCATE ALL")).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("EZ".to_owned(), vec!["25P02".to_owned()])
    );
    raw::send(&mut s, &raw::query("ROLLBACK")).await;
    raw::until_ready(&mut s).await;
    assert_eq!(run_named(&mut s, "b1").await.as_deref(), Ok("b"));
    let mut unexecuted = raw::message(b'P', b"\0DISCARD ALL\0\0\0");
    unexecuted.extend(raw::message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
    unexecuted.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &unexecuted).await;
    assert_eq!(raw::until_ready(&mut s).await, ("12Z".to_owned(), vec![]));
    assert_eq!(run_named(&mut s, "b1").await.as_deref(), Ok("b"));
    raw::send(&mut s, &with_sync("DISCARD ALL")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("12CZ".to_owned(), vec![]));
    assert_eq!(run_named(&mut s, "b1").await, Err("26000".into()));
    assert_eq!(run_named(&mut other, "mine").await.as_deref(), Ok("other"));
    // The names go as the Execute is sent, for what follows it in the pipeline: a name
    // made again right behind it, or used there.
    assert_eq!(parse_named(&mut s, "c1", "SELECT 'c'").await, "1Z");
    let mut bytes = raw::parse_bind_execute("DEALLOCATE ALL");
    bytes.extend(raw::message(b'P', b"c1\0SELECT 'c again'\0\0\0"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bytes).await;
    assert_eq!(raw::until_ready(&mut s).await, ("12C1Z".to_owned(), vec![]));
    assert_eq!(run_named(&mut s, "c1").await.as_deref(), Ok("c again"));
    let mut bytes = raw::parse_bind_execute("DISCARD ALL");
    bytes.extend(raw::message(b'B', b"\0c1\0\0\0\0\0\0\0"));
    bytes.extend(raw::message(b'E', b"\0\0\0\0\0"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bytes).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("12CEZ".to_owned(), vec!["26000".to_owned()])
    );
    // Of two portals, the one executed drops them, a name made between its Bind and
    // its Execute too.
    assert_eq!(parse_named(&mut s, "c2", "SELECT 'c2'").await, "1Z");
    let mut bytes = raw::message(b'P', b"\0DEALLOCATE ALL\0\0\0");
    bytes.extend(raw::message(b'B', b"a\0\0\0\0\0\0\0\0"));
    bytes.extend(raw::message(b'B', b"b\0\0\0\0\0\0\0\0"));
    bytes.extend(raw::message(b'P', b"c3\0SELECT 'c3'\0\0\0"));
    bytes.extend(raw::message(b'E', b"a\0\0\0\0\0"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bytes).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("1221CZ".to_owned(), vec![])
    );
    assert_eq!(run_named(&mut s, "c2").await, Err("26000".into()));
    assert_eq!(run_named(&mut s, "c3").await, Err("26000".into()));
    // Its Execute sent once its batch is known to have failed is skipped: the names are
    // the client's for what it pipelines right behind.
    assert_eq!(parse_named(&mut s, "d1", "SELECT 'd'").await, "1Z");
    let mut failing = raw::message(b'B', b"\0nope\0\0\0\0\0\0\0");
    failing.extend(raw::message(b'P', b"\0DISCARD ALL\0\0\0"));
    failing.extend(raw::message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
    failing.extend(raw::message(b'H', b""));
    raw::send(&mut s, &failing).await;
    let (tag, body) = raw::read_message(&mut s).await.expect("the error");
    assert_eq!((tag, raw::error_code(&body)), (b'E', "26000".to_owned()));
    let mut bytes = raw::message(b'E', b"\0\0\0\0\0");
    bytes.extend_from_slice(&raw::SYNC);
    bytes.extend(raw::message(b'B', b"\0d1\0\0\0\0\0\0\0"));
    bytes.extend(raw::message(b'E', b"\0\0\0\0\0"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bytes).await;
    assert_eq!(raw::until_ready(&mut s).await, ("Z".to_owned(), vec![]));
    assert_eq!(row_until_ready(&mut s).await.as_deref(), Ok("d"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_session_user_the_server_reports_pins_the_client() {
    use pgshield::client::sql::PinReason;
    // set_config on session_authorization looks like a plain setting to the classifier;
    // the server's ParameterStatus tells otherwise. Needs a superuser: the cluster's own.
    common::create_role("tx_psa", "pw").await;
    let db = common::cluster();
    let proxy = TestProxy::start(&format!(
        "[pool]\nmax_size = 2\n[users.postgres]\npassword = \"{}\"\n",
        db.password()
    ))
    .await;
    let conn = proxy
        .connect("postgres", db.password())
        .await
        .expect("login");
    let other = proxy
        .connect("postgres", db.password())
        .await
        .expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let before = proxy.shared.pins.get(PinReason::SessionAuthorization);
    conn.client
        .batch_execute("SELECT set_config('session_authorization', 'tx_psa', false)")
        .await
        .unwrap();
    let pinned = pid(&conn.client).await;
    for _ in 0..4 {
        hopper.hop().await;
        assert_eq!(pid(&conn.client).await, pinned, "pinned to its backend");
        assert_eq!(
            setting(&conn.client, "session_authorization").await,
            "tx_psa"
        );
    }
    assert_eq!(
        proxy.shared.pins.get(PinReason::SessionAuthorization),
        before + 1
    );
}

/// A Query of no statement (pgx's `-- ping`, Rails' `;`) between transactions is
/// answered as PostgreSQL answers it, without waiting for a backend: here every one is
/// held by another client. As in PostgreSQL it drops the client's unnamed statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_of_no_statement_needs_no_backend() {
    let proxy = trusted_proxy("tx_ping", "max_size = 1\nborrow_timeout = \"1s\"").await;
    let holder = proxy.connect("tx_ping", "pw").await.expect("login");
    holder
        .client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("holds the backend");
    let mut s = raw::login_trusted(proxy.addr, "tx_ping").await;
    for ping in ["-- ping", ";", ""] {
        raw::send(&mut s, &raw::query(ping)).await;
        assert_eq!(
            raw::until_ready(&mut s).await,
            ("IZ".into(), vec![]),
            "{ping:?}"
        );
    }
    holder.client.batch_execute("COMMIT").await.expect("commit");
    let mut parse = raw::message(b'P', b"\0SELECT 'unnamed'\0\0\0");
    parse.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &parse).await;
    assert_eq!(raw::until_ready(&mut s).await, ("1Z".into(), vec![]));
    raw::send(&mut s, &raw::query("-- ping")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("IZ".into(), vec![]));
    assert_eq!(run_named(&mut s, "").await, Err("26000".into()));
}

/// PostgREST sets a role's settings for the request's transaction with
/// `set_config($1, $2, true)`: whatever the name, it ends with the transaction, and the
/// client is not pinned for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_local_set_config_of_any_name_does_not_pin() {
    use pgshield::client::sql::PinReason;
    let proxy = trusted_proxy("tx_local_any", "max_size = 2").await;
    let conn = proxy.connect("tx_local_any", "pw").await.expect("login");
    let before = proxy.shared.pins.get(PinReason::Unclassified);
    let c = &conn.client;
    c.batch_execute("BEGIN").await.expect("begin");
    c.query(
        "SELECT set_config($1, $2, true)",
        &[&"application_name", &"inside"],
    )
    .await
    .expect("set_config");
    let inside: String = c
        .query_one("SHOW application_name", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(inside, "inside");
    c.batch_execute("COMMIT").await.expect("commit");
    let after: String = c
        .query_one("SHOW application_name", &[])
        .await
        .expect("show")
        .get(0);
    assert_ne!(after, "inside", "for the transaction only");
    assert_eq!(proxy.shared.pins.get(PinReason::Unclassified), before);
}

/// A client inside a transaction that sends its last statements and closes its
/// connection without waiting (a Terminate, then the socket closed) has them run, as
/// PostgreSQL runs what it received before the end: also when pgshield holds them while
/// its backend, which lacked the statement, checks its description. (A client that
/// leaves while queued for a backend leaves the queue, as in PgBouncer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_held_when_its_client_leaves_still_runs() {
    let proxy = trusted_proxy("tx_held_leave", "max_size = 1").await;
    let admin = common::admin().await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS tx_held_leave_t; CREATE TABLE tx_held_leave_t (x int); \
             GRANT ALL ON tx_held_leave_t TO tx_held_leave",
        )
        .await
        .expect("table");
    let mut s = raw::login_trusted(proxy.addr, "tx_held_leave").await;
    let prepare = prepare_described(
        "ins",
        "INSERT INTO tx_held_leave_t VALUES ($1::int) RETURNING x",
        &[],
    );
    raw::send(&mut s, &prepare).await;
    assert_eq!(raw::until_ready(&mut s).await, ("1tTZ".into(), vec![]));
    // The backend that has it goes: the next one prepares and describes it first.
    proxy
        .shared
        .pools
        .get("app", "tx_held_leave")
        .expect("pool")
        .reconnect();
    // In a transaction (so the client holds a backend that lacks the statement), the
    // INSERT, its Sync, COMMIT and a Terminate, and the connection closed at once.
    raw::send(&mut s, &raw::query("BEGIN")).await;
    assert_eq!(raw::until_ready(&mut s).await, ("CZ".into(), vec![]));
    let bind = b"\0ins\0\0\0\0\x01\0\0\0\x017\0\0".to_vec();
    let mut bytes = raw::message(b'B', &bind);
    bytes.extend(raw::message(b'E', b"\0\0\0\0\0"));
    bytes.extend_from_slice(&raw::SYNC);
    bytes.extend(raw::query("COMMIT"));
    bytes.extend(raw::message(b'X', b""));
    raw::send(&mut s, &bytes).await;
    drop(s);
    let mut rows = 0;
    for _ in 0..100 {
        rows = admin
            .query_one("SELECT count(*) FROM tx_held_leave_t WHERE x = 7", &[])
            .await
            .expect("count")
            .get::<_, i64>(0);
        if rows > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows, 1, "the INSERT sent before the client left ran");
}

/// A simple Query ends an extended batch as a Sync does (pgjdbc closes a statement, no
/// Sync, then runs a plain Statement): once its ReadyForQuery says idle, the backend goes
/// back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simple_query_after_extended_messages_gives_the_backend_back() {
    let proxy = trusted_proxy(
        "tx_close_then_query",
        "max_size = 1\nborrow_timeout = \"2s\"",
    )
    .await;
    let mut s = raw::login_trusted(proxy.addr, "tx_close_then_query").await;
    let mut bytes = raw::message(b'C', b"P\0");
    bytes.extend(raw::query("SELECT 1"));
    raw::send(&mut s, &bytes).await;
    assert_eq!(raw::until_ready(&mut s).await, ("3TDCZ".into(), vec![]));
    // The only backend is free for another client.
    let other = proxy
        .connect("tx_close_then_query", "pw")
        .await
        .expect("login");
    other.client.simple_query("SELECT 2").await.expect("served");
}

/// sqlx works out which columns may be null by running `EXPLAIN (VERBOSE, FORMAT JSON)
/// EXECUTE sqlx_s_1(NULL)`: SQL `EXECUTE` of its own protocol-level statement, which on
/// the server has pgshield's shared name. The text runs it by that name, prepared first
/// on whichever backend runs it (and a plain `EXECUTE` of it too, which PostgreSQL looks
/// up already at its Parse). Another name stays the server's to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_execute_of_the_clients_own_statement_runs_it_as_sqlx_describes() {
    let proxy = trusted_proxy("tx_sqlx_explain", "max_size = 2").await;
    let pool = proxy
        .shared
        .pools
        .get("app", "tx_sqlx_explain")
        .expect("the pool");
    let mut s = raw::login_trusted(proxy.addr, "tx_sqlx_explain").await;
    raw::send(
        &mut s,
        &prepare_described("sqlx_s_1", "SELECT $1::int + 1 AS a", &[23]),
    )
    .await;
    assert_eq!(raw::until_ready(&mut s).await, ("1tTZ".into(), vec![]));
    let explain = "EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE sqlx_s_1(NULL)";
    raw::send(&mut s, &prepare_described("sqlx_s_2", explain, &[])).await;
    assert_eq!(raw::until_ready(&mut s).await, ("1tTZ".into(), vec![]));
    // On a backend that has neither (the others closed).
    pool.reconnect();
    assert_eq!(
        run_named(&mut s, "sqlx_s_2")
            .await
            .map(|plan| plan.contains("\"Plan\"")),
        Ok(true)
    );
    raw::send(
        &mut s,
        &prepare_described("run", "EXECUTE sqlx_s_1(41)", &[]),
    )
    .await;
    assert_eq!(raw::until_ready(&mut s).await, ("1tTZ".into(), vec![]));
    pool.reconnect();
    assert_eq!(run_named(&mut s, "run").await.as_deref(), Ok("42"));
    // Not a name of the client's: the server's answer when it runs, as straight against
    // PostgreSQL (which describes it as returning nothing); nor one of pgshield's own,
    // written by the client.
    for (name, sql) in [
        ("other", "EXECUTE sqlx_s_9(1)"),
        ("theirs", "EXECUTE pgshield_1"),
    ] {
        raw::send(&mut s, &prepare_described(name, sql, &[])).await;
        assert_eq!(
            raw::until_ready(&mut s).await,
            ("1tnZ".into(), vec![]),
            "{sql}"
        );
        assert_eq!(run_named(&mut s, name).await, Err("26000".into()), "{sql}");
    }
    // Not followed through a chain (each statement runs the client's own by name at most
    // one deep): the server's answer for the name it lacks.
    raw::send(&mut s, &prepare_described("chain", "EXECUTE run", &[])).await;
    raw::until_ready(&mut s).await;
    assert_eq!(run_named(&mut s, "chain").await, Err("26000".into()));
    // Nor to a statement the server refused.
    raw::send(&mut s, &prepare_described("bad", "SELEKT 1", &[])).await;
    assert_eq!(raw::until_ready(&mut s).await.1, vec!["42601".to_owned()]);
    raw::send(
        &mut s,
        &prepare_described("runs_bad", "EXPLAIN EXECUTE bad", &[]),
    )
    .await;
    raw::until_ready(&mut s).await;
    assert_eq!(run_named(&mut s, "runs_bad").await, Err("26000".into()));
    // Another client that writes the text its EXPLAIN was made into (pgshield's name for
    // sqlx_s_1, which it has not prepared) gets a statement of its own, whose name the
    // server refuses.
    let made: Vec<String> = pool
        .statements
        .list()
        .into_iter()
        .map(|(_, query, _, _)| query)
        .filter(|q| q.starts_with("EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE pgshield_"))
        .collect();
    assert_eq!(made.len(), 1, "{made:?}");
    let mut other = raw::login_trusted(proxy.addr, "tx_sqlx_explain").await;
    raw::send(&mut other, &prepare_described("copied", &made[0], &[])).await;
    assert_eq!(raw::until_ready(&mut other).await.0, "1tTZ");
    assert_eq!(run_named(&mut other, "copied").await, Err("26000".into()));
}

/// A Describe of a portal describes the statement it was bound from, which pgshield
/// checks against what clients were told of that statement; but a portal of that name
/// made since by other means (a cursor DECLAREd after the portal was closed) is not the
/// statement's, and its columns must not mark another client's statement stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_named_as_a_closed_portal_does_not_make_a_statement_stale() {
    let proxy = trusted_proxy("tx_portal_name", "max_size = 1").await;
    let text = "SELECT 1::int AS a";
    let mut victim = raw::login_trusted(proxy.addr, "tx_portal_name").await;
    raw::send(&mut victim, &prepare_described("v", text, &[])).await;
    assert_eq!(raw::until_ready(&mut victim).await.0, "1tTZ");
    assert_eq!(run_named(&mut victim, "v").await.as_deref(), Ok("1"));

    let mut other = raw::login_trusted(proxy.addr, "tx_portal_name").await;
    raw::send(&mut other, &raw::query("BEGIN")).await;
    raw::until_ready(&mut other).await;
    assert_eq!(parse_named(&mut other, "x", text).await, "1Z");
    let mut batch = raw::message(b'B', b"c\0x\0\0\0\0\0\0\0");
    batch.extend(raw::message(b'C', b"Pc\0"));
    batch.extend(raw::message(
        b'P',
        b"\0DECLARE c CURSOR FOR SELECT 'z'::text AS z, 2 AS w\0\0\0",
    ));
    batch.extend(raw::message(b'B', b"\0\0\0\0\0\0\0\0"));
    batch.extend(raw::message(b'E', b"\0\0\0\0\0"));
    batch.extend(raw::message(b'D', b"Pc\0"));
    batch.extend_from_slice(&raw::SYNC);
    raw::send(&mut other, &batch).await;
    assert_eq!(
        raw::until_ready(&mut other).await,
        ("2312CTZ".into(), vec![])
    );
    raw::send(&mut other, &raw::query("ROLLBACK")).await;
    raw::until_ready(&mut other).await;

    // The victim's statement still runs.
    assert_eq!(run_named(&mut victim, "v").await.as_deref(), Ok("1"));
}

/// pgshield's stand-in for a client's `DEALLOCATE` of its own name (prepared on the
/// backend, and left there when the client's statement is parsed and never run) is not
/// a name another client can reach: 26000, as for pgshield's shared names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deallocation_stand_in_is_hidden_from_clients() {
    let proxy = trusted_proxy("tx_stand_in", "max_size = 1").await;
    let mut a = raw::login_trusted(proxy.addr, "tx_stand_in").await;
    assert_eq!(parse_named(&mut a, "s1", "SELECT 1").await, "1Z");
    assert_eq!(parse_named(&mut a, "", "DEALLOCATE s1").await, "1Z");
    let mut b = raw::login_trusted(proxy.addr, "tx_stand_in").await;
    assert_eq!(
        run_named(&mut b, "_pgshield_deallocate").await,
        Err("26000".into())
    );
}

/// PostgreSQL tells statement names apart by their first 63 bytes: names alike that far
/// are one statement (a second Parse is 42P05, a Bind by either runs it; PostgreSQL 15
/// answers so, checked with libpq's PQprepare), as through pgshield, which keeps no more
/// of a name than that however long it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_names_are_told_apart_by_their_first_63_bytes_as_in_postgres() {
    let proxy = trusted_proxy("tx_long_names", "max_size = 1").await;
    let long = "n".repeat(63);
    let (first, second) = (format!("{long}_first"), format!("{long}_second"));
    let mut s = raw::login_trusted(proxy.addr, "tx_long_names").await;
    assert_eq!(parse_named(&mut s, &first, "SELECT 'first'").await, "1Z");
    assert_eq!(
        parse_named(&mut s, &second, "SELECT 'second'").await,
        "42P05"
    );
    assert_eq!(run_named(&mut s, &second).await.as_deref(), Ok("first"));
    assert_eq!(run_named(&mut s, &long).await.as_deref(), Ok("first"));
    // A name of a megabyte is kept as its first 63 bytes.
    let huge = "h".repeat(1 << 20);
    assert_eq!(parse_named(&mut s, &huge, "SELECT 'huge'").await, "1Z");
    assert_eq!(
        run_named(&mut s, &"h".repeat(63)).await.as_deref(),
        Ok("huge")
    );
}

/// The names an extended DEALLOCATE ALL takes as its Execute is sent come back if it
/// does not run; until that is known they still count toward the client's limit, or a
/// client could pipeline new names behind an Execute doomed to fail and end with both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_a_failing_deallocate_all_took_still_count_toward_the_limit() {
    let proxy = trusted_proxy(
        "tx_taken_limit",
        "max_size = 1\nmax_client_prepared_statements = 2",
    )
    .await;
    let mut s = raw::login_trusted(proxy.addr, "tx_taken_limit").await;
    assert_eq!(parse_named(&mut s, "d", "DEALLOCATE ALL").await, "1Z");
    assert_eq!(parse_named(&mut s, "s1", "SELECT 'one'").await, "1Z");
    // A batch that fails before its Execute of `d` runs, and behind it, before that is
    // known, a Parse of a new name.
    let mut batches = raw::message(b'P', b"\0SELEKT\0\0\0");
    batches.extend(raw::message(b'B', b"\0d\0\0\0\0\0\0\0"));
    batches.extend(raw::message(b'E', b"\0\0\0\0\0"));
    batches.extend_from_slice(&raw::SYNC);
    batches.extend(raw::message(b'P', b"n1\0SELECT 'new'\0\0\0"));
    batches.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &batches).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("EZ".to_owned(), vec!["42601".to_owned()])
    );
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("EZ".to_owned(), vec!["53400".to_owned()]),
        "a third name"
    );
    assert_eq!(run_named(&mut s, "s1").await.as_deref(), Ok("one"));
    assert_eq!(run_named(&mut s, "n1").await, Err("26000".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parse_beyond_the_clients_statement_limit_fails_as_a_refused_parse_does() {
    // (The role first: the table is granted to it.)
    let proxy = trusted_proxy(
        "tx_stmt_limit",
        "max_size = 1\nmax_client_prepared_statements = 2",
    )
    .await;
    common::admin()
        .await
        .batch_execute(
            "DROP TABLE IF EXISTS tx_stmt_limit_t; CREATE TABLE tx_stmt_limit_t (x int); \
             GRANT ALL ON tx_stmt_limit_t TO tx_stmt_limit",
        )
        .await
        .expect("table");
    let mut s = raw::login_trusted(proxy.addr, "tx_stmt_limit").await;
    assert_eq!(parse_named(&mut s, "s0", "SELECT 'zero'").await, "1Z");
    assert_eq!(parse_named(&mut s, "s1", "SELECT 'one'").await, "1Z");
    assert_eq!(parse_named(&mut s, "s2", "SELECT 'two'").await, "53400");
    // The connection stays usable, its statements work, the refused one does not exist.
    assert_eq!(run_named(&mut s, "s0").await.as_deref(), Ok("zero"));
    assert_eq!(run_named(&mut s, "s2").await, Err("26000".into()));
    assert_eq!(parse_named(&mut s, "s0", "SELECT 'again'").await, "42P05");
    assert_eq!(parse_named(&mut s, "", "SELECT 'unnamed'").await, "1Z");

    // As when PostgreSQL refuses a Parse: the batch's earlier work is rolled back and the
    // rest skipped up to the Sync.
    let mut refused = b"s2\0SELECT 'two'\0\0\0".to_vec();
    refused = raw::message(b'P', &refused);
    let mut batch = raw::parse_bind_execute("INSERT INTO tx_stmt_limit_t VALUES (1)");
    batch.extend(refused.iter().copied());
    batch.extend(raw::parse_bind_execute(
        "INSERT INTO tx_stmt_limit_t VALUES (2)",
    ));
    batch.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &batch).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("12CEZ".to_owned(), vec!["53400".to_owned()])
    );
    let rows: i64 = common::admin()
        .await
        .query_one("SELECT count(*) FROM tx_stmt_limit_t", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        rows, 0,
        "the INSERT before the refused Parse was rolled back"
    );
    // Inside a transaction block, the transaction fails, as it would.
    raw::send(&mut s, &raw::query("BEGIN")).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "CZ");
    let mut parse_sync = refused.clone();
    parse_sync.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &parse_sync).await;
    let (tag, body) = loop {
        let (tag, body) = raw::read_message(&mut s).await.expect("reply");
        if tag == b'Z' {
            break (tag, body);
        }
        assert_eq!((tag, raw::error_code(&body)), (b'E', "53400".to_owned()));
    };
    assert_eq!((tag, body), (b'Z', vec![b'E']), "a failed transaction");
    raw::send(&mut s, &raw::query("SELECT 1")).await;
    assert_eq!(raw::until_ready(&mut s).await.1, vec!["25P02".to_owned()]);
    raw::send(&mut s, &raw::query("ROLLBACK")).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "CZ");
    // Closes after a statement that fails are skipped: the names stay, and still count,
    // even for a Parse sent before the failure is known.
    let mut batches = raw::parse_bind_execute("SELECT 1 / (random() * 0)::int");
    batches.extend(raw::message(b'C', b"Ss0\0"));
    batches.extend(raw::message(b'C', b"Ss1\0"));
    batches.extend_from_slice(&raw::SYNC);
    batches.extend(raw::message(b'P', b"s5\0SELECT 5\0\0\0"));
    batches.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &batches).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("12EZ".to_owned(), vec!["22012".to_owned()])
    );
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("EZ".to_owned(), vec!["53400".to_owned()])
    );
    assert_eq!(run_named(&mut s, "s0").await.as_deref(), Ok("zero"));
    assert_eq!(run_named(&mut s, "s1").await.as_deref(), Ok("one"));

    // A driver's view: tokio-postgres names every statement and closes it when dropped.
    let conn = proxy.connect("tx_stmt_limit", "pw").await.expect("login");
    let one = conn.client.prepare("SELECT 1").await.expect("first");
    let _two = conn.client.prepare("SELECT 2").await.expect("second");
    let err = conn.client.prepare("SELECT 3").await.expect_err("third");
    assert_eq!(sqlstate(&err), Some("53400"), "{err}");
    drop(one);
    let three = conn
        .client
        .prepare("SELECT 3")
        .await
        .expect("room after a Close");
    let value: i32 = conn
        .client
        .query_one(&three, &[])
        .await
        .expect("runs")
        .get(0);
    assert_eq!(value, 3);
    // Five refusals on the one backend: the statement refusing them was prepared once.
    let rows = conn
        .client
        .simple_query(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE 'DO $pgshield$%'",
        )
        .await
        .expect("count");
    let count = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(count.as_deref(), Some("1"));
}

/// Bind (unnamed portal, no parameters) and Execute of `statement`.
fn bind_execute(statement: &str) -> Vec<u8> {
    let mut bind = vec![0];
    bind.extend_from_slice(statement.as_bytes());
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
    let mut bytes = raw::message(b'B', &bind);
    bytes.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
    bytes
}

/// Sends `failing` then `then` in one batch, and a second batch running `again`, at once
/// (the second on its way before the first fails); returns the replies to each batch,
/// with the second's row, if any.
async fn two_batches(
    s: &mut tokio::net::TcpStream,
    (failing, then): (&str, &str),
    again: &str,
) -> ((String, Vec<String>), Result<String, String>) {
    let mut bytes = bind_execute(failing);
    bytes.extend(bind_execute(then));
    bytes.extend_from_slice(&raw::SYNC);
    bytes.extend(bind_execute(again));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(s, &bytes).await;
    let first = raw::until_ready(s).await;
    (first, row_until_ready(s).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_before_the_previous_one_failed_does_not_count_on_what_that_one_prepared() {
    let proxy = trusted_proxy("tx_doubt", "max_size = 1\nmax_prepared_statements = 1").await;
    let mut c = raw::login_trusted(proxy.addr, "tx_doubt").await;
    let fails = "SELECT 1 / (random() * 0)::int";
    assert_eq!(parse_named(&mut c, "fail", fails).await, "1Z");
    assert_eq!(parse_named(&mut c, "s1", "SELECT 'one'").await, "1Z");
    assert_eq!(parse_named(&mut c, "s2", "SELECT 'two'").await, "1Z");
    // The backend holds one statement (s2's). The first batch fails before the hidden
    // Parse that would bring s1 back, and before the Close that would make room for it:
    // the server skips both. The second batch, already sent, still finds its statement.
    let failed = ("2EZ".to_owned(), vec!["22012".to_owned()]);
    let (first, second) = two_batches(&mut c, ("fail", "s1"), "s1").await;
    assert_eq!((first, second.as_deref()), (failed.clone(), Ok("one")));
    let (first, second) = two_batches(&mut c, ("fail", "s2"), "s1").await;
    assert_eq!((first, second.as_deref()), (failed.clone(), Ok("one")));
    // Both a Parse and the Close evicting it skipped, in one batch: neither is there.
    let mut bytes = bind_execute("fail");
    bytes.extend(bind_execute("s1"));
    bytes.extend(bind_execute("s2"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut c, &bytes).await;
    assert_eq!(raw::until_ready(&mut c).await, failed);
    assert_eq!(run_named(&mut c, "s1").await.as_deref(), Ok("one"));
    assert_eq!(run_named(&mut c, "s2").await.as_deref(), Ok("two"));
    // A hidden Parse first in its batch fails on its own (in a failed transaction): the
    // batch after the ROLLBACK, sent with it, does not count on it either.
    raw::send(&mut c, &raw::query("BEGIN")).await;
    assert_eq!(raw::until_ready(&mut c).await.0, "CZ");
    assert_eq!(run_named(&mut c, "fail").await, Err("22012".into()));
    let mut bytes = bind_execute("s1");
    bytes.extend_from_slice(&raw::SYNC);
    bytes.extend(raw::query("ROLLBACK"));
    bytes.extend(bind_execute("s1"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut c, &bytes).await;
    assert_eq!(
        raw::until_ready(&mut c).await,
        ("EZ".to_owned(), vec!["25P02".to_owned()])
    );
    assert_eq!(raw::until_ready(&mut c).await.0, "CZ");
    assert_eq!(row_until_ready(&mut c).await.as_deref(), Ok("one"));

    // The unnamed statement: the backend holds another client's; the hidden Parse that
    // would put this client's back is skipped. The second batch must not run the other's.
    assert_eq!(parse_named(&mut c, "", "SELECT 'mine'").await, "1Z");
    let mut other = raw::login_trusted(proxy.addr, "tx_doubt").await;
    assert_eq!(parse_named(&mut other, "", "SELECT 'other''s'").await, "1Z");
    let (first, second) = two_batches(&mut c, ("fail", ""), "").await;
    assert_eq!((first, second.as_deref()), (failed, Ok("mine")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_again_in_skipped_batches_are_not_lost_or_invented() {
    let proxy = trusted_proxy("tx_doubt3", "max_size = 1\nmax_prepared_statements = 1").await;
    let mut c = raw::login_trusted(proxy.addr, "tx_doubt3").await;
    assert_eq!(parse_named(&mut c, "s1", "SELECT 'one'").await, "1Z");
    assert_eq!(parse_named(&mut c, "s2", "SELECT 'two'").await, "1Z");
    // (Fails as it runs; the unnamed statement, so the backend's one place stays free.)
    let failing = raw::parse_bind_execute("SELECT 1 / (random() * 0)::int");
    let failed = ("12EZ".to_owned(), vec!["22012".to_owned()]);

    // s1 prepared in one batch; the next, sent before that one's answer, prepares it again
    // behind a Close, and is skipped: the backend still has it.
    let mut bytes = bind_execute("s1");
    bytes.extend_from_slice(&raw::SYNC);
    bytes.extend(failing.iter().copied());
    bytes.extend(bind_execute("s1"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut c, &bytes).await;
    assert_eq!(row_until_ready(&mut c).await.as_deref(), Ok("one"));
    assert_eq!(raw::until_ready(&mut c).await, failed);
    assert_eq!(run_named(&mut c, "s1").await.as_deref(), Ok("one"));

    // A skipped eviction of s1, then batches (sent with it) that prepare s1 again and
    // evict it for good: s1 must not be taken for present afterwards.
    let mut bytes = failing.clone();
    bytes.extend(bind_execute("s2"));
    bytes.extend_from_slice(&raw::SYNC);
    for name in ["s1", "s2"] {
        bytes.extend(bind_execute(name));
        bytes.extend_from_slice(&raw::SYNC);
    }
    raw::send(&mut c, &bytes).await;
    assert_eq!(raw::until_ready(&mut c).await, failed);
    assert_eq!(row_until_ready(&mut c).await.as_deref(), Ok("one"));
    assert_eq!(row_until_ready(&mut c).await.as_deref(), Ok("two"));
    assert_eq!(run_named(&mut c, "s1").await.as_deref(), Ok("one"));
    assert_eq!(run_named(&mut c, "s2").await.as_deref(), Ok("two"));

    // A name whose Parse, in a batch not answered yet, is skipped, closed and prepared
    // again by the next batch: it keeps what the later Parse made.
    let parse_s3 = raw::message(b'P', b"s3\0SELECT 'three'\0\0\0");
    let mut bytes = failing.clone();
    bytes.extend(parse_s3.iter().copied());
    bytes.extend_from_slice(&raw::SYNC);
    bytes.extend(raw::message(b'C', b"Ss3\0"));
    bytes.extend(parse_s3.iter().copied());
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut c, &bytes).await;
    assert_eq!(raw::until_ready(&mut c).await, failed);
    assert_eq!(raw::until_ready(&mut c).await.0, "31Z");
    assert_eq!(run_named(&mut c, "s3").await.as_deref(), Ok("three"));
    // The same for the unnamed statement: the later Parse stands.
    assert_eq!(
        parse_named(&mut c, "fail", "SELECT 1 / (random() * 0)::int").await,
        "1Z"
    );
    let mut bytes = bind_execute("fail");
    bytes.extend(raw::message(b'P', b"\0SELECT 'x'\0\0\0"));
    bytes.extend_from_slice(&raw::SYNC);
    bytes.extend(raw::message(b'P', b"\0SELECT 'y'\0\0\0"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut c, &bytes).await;
    assert_eq!(
        raw::until_ready(&mut c).await,
        ("2EZ".to_owned(), vec!["22012".to_owned()])
    );
    assert_eq!(raw::until_ready(&mut c).await.0, "1Z");
    assert_eq!(run_named(&mut c, "").await.as_deref(), Ok("y"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_dropped_on_the_server_harm_no_one_and_nothing_behind_them_assumes_them() {
    let proxy = trusted_proxy("tx_drops", "max_size = 1").await;
    let mut a = raw::login_trusted(proxy.addr, "tx_drops").await;
    let mut b = raw::login_trusted(proxy.addr, "tx_drops").await;
    assert_eq!(parse_named(&mut a, "s1", "SELECT 'one'").await, "1Z");
    assert_eq!(run_named(&mut a, "s1").await.as_deref(), Ok("one"));
    // Another client's DEALLOCATE ALL through the extended protocol (as JDBC sends it)
    // drops every statement of the one backend; a's is prepared again.
    let mut dealloc = raw::parse_bind_execute("DEALLOCATE ALL");
    dealloc.extend_from_slice(&raw::SYNC);
    raw::send(&mut b, &dealloc).await;
    assert_eq!(raw::until_ready(&mut b).await.0, "12CZ");
    assert_eq!(run_named(&mut a, "s1").await.as_deref(), Ok("one"));
    // A statement prepared right behind a DISCARD ALL, before it has answered.
    let mut bytes = raw::query("DISCARD ALL");
    bytes.extend(raw::message(b'P', b"s2\0SELECT 'one'\0\0\0"));
    bytes.extend(bind_execute("s2"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &bytes).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "CZ");
    assert_eq!(row_until_ready(&mut a).await.as_deref(), Ok("one"));
    // A name made right behind a DISCARD ALL is not one it drops.
    let mut bytes = raw::query("DISCARD ALL");
    bytes.extend(raw::message(b'P', b"s5\0SELECT 'five'\0\0\0"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &bytes).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "CZ");
    assert_eq!(raw::until_ready(&mut a).await.0, "1Z");
    assert_eq!(run_named(&mut a, "s5").await.as_deref(), Ok("five"));
    // A DEALLOCATE ALL through the extended protocol, inside a transaction (the backend
    // stays with the client): what it dropped is prepared again.
    assert_eq!(parse_named(&mut a, "s6", "SELECT 'six'").await, "1Z");
    assert_eq!(run_named(&mut a, "s6").await.as_deref(), Ok("six"));
    // (b names it too: the statement stays pgshield's same one after a drops its names.)
    assert_eq!(parse_named(&mut b, "keep", "SELECT 'six'").await, "1Z");
    raw::send(&mut a, &raw::query("BEGIN")).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "CZ");
    raw::send(&mut a, &dealloc).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "12CZ");
    // (Its own unnamed statement stays, as in PostgreSQL: it can run again.)
    let mut again = bind_execute("");
    again.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &again).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "2CZ");
    assert_eq!(parse_named(&mut a, "s7", "SELECT 'six'").await, "1Z");
    assert_eq!(run_named(&mut a, "s7").await.as_deref(), Ok("six"));
    raw::send(&mut a, &raw::query("COMMIT")).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "CZ");
    // A simple Query destroys the unnamed statement, as in PostgreSQL.
    assert_eq!(parse_named(&mut a, "", "SELECT 'unnamed'").await, "1Z");
    raw::send(&mut a, &raw::query("SELECT 1")).await;
    assert_eq!(raw::until_ready(&mut a).await.0, "TDCZ");
    let mut bytes = bind_execute("");
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &bytes).await;
    assert_eq!(row_until_ready(&mut a).await, Err("26000".into()));
    // A Close of it that the server skips (behind a failure in its batch) closes nothing.
    assert_eq!(parse_named(&mut a, "", "SELECT 'kept'").await, "1Z");
    let mut bytes = bind_execute("no_such_statement");
    bytes.extend(raw::message(b'C', b"S\0"));
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut a, &bytes).await;
    assert_eq!(
        raw::until_ready(&mut a).await,
        ("EZ".to_owned(), vec!["26000".to_owned()])
    );
    assert_eq!(run_named(&mut a, "").await.as_deref(), Ok("kept"));
}

/// Sends a simple Query of raw bytes; the first column of its last row, as sent, or the
/// error's SQLSTATE.
async fn query_bytes(s: &mut tokio::net::TcpStream, sql: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = sql.to_vec();
    body.push(0);
    raw::send(s, &raw::message(b'Q', &body)).await;
    first_value_until_ready(s).await
}

async fn first_value_until_ready(s: &mut tokio::net::TcpStream) -> Result<Vec<u8>, String> {
    let mut value = Err("no row".to_owned());
    loop {
        let (tag, body) = raw::read_message(s).await.expect("reply");
        match tag {
            b'D' => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]) as usize;
                value = Ok(body[6..6 + len].to_vec());
            }
            b'E' => value = Err(raw::error_code(&body)),
            b'Z' => return value,
            _ => {}
        }
    }
}

/// PostgreSQL takes SQL text in the client's `client_encoding`, which need not be UTF-8:
/// LATIN1 text passes through, in simple and extended queries, on either backend; a
/// setting whose value is not UTF-8 pins the client (pgshield carries settings as text)
/// rather than follow it changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_in_a_client_encoding_other_than_utf8_passes_through() {
    use pgshield::client::sql::PinReason;
    let proxy = trusted_proxy("tx_latin1", "max_size = 2").await;
    let mut s = raw::connect(proxy.addr).await;
    let params = [
        ("user", "tx_latin1"),
        ("database", "app"),
        ("client_encoding", "LATIN1"),
    ];
    raw::send(&mut s, &raw::startup(&params)).await;
    let (tags, codes) = raw::until_ready(&mut s).await;
    assert!(
        codes.is_empty() && tags.ends_with('Z'),
        "login: {tags} {codes:?}"
    );
    let other = proxy.connect("tx_latin1", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };

    // Simple queries, and a named statement prepared on one backend and again on the other.
    let parse = b"latin\0SELECT 'caf\xe9' || pg_backend_pid()\0\0\0";
    let mut bytes = raw::message(b'P', parse);
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bytes).await;
    assert_eq!(raw::until_ready(&mut s).await, ("1Z".to_owned(), vec![]));
    let mut pids = HashSet::new();
    for _ in 0..4 {
        hopper.hop().await;
        let simple = query_bytes(&mut s, b"SELECT 'caf\xe9', length('caf\xe9')").await;
        assert_eq!(simple.as_deref(), Ok(&b"caf\xe9"[..]));
        let mut bind = b"\0latin\0".to_vec();
        bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        let mut bytes = raw::message(b'B', &bind);
        bytes.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
        bytes.extend_from_slice(&raw::SYNC);
        raw::send(&mut s, &bytes).await;
        let named = first_value_until_ready(&mut s).await.expect("named");
        let pid = named.strip_prefix(b"caf\xe9").expect("LATIN1 text as sent");
        pids.insert(pid.to_vec());
    }
    assert_eq!(pids.len(), 2, "the statement ran on both backends");

    // A setting that is not UTF-8 cannot follow the client: it keeps its backend.
    let before = proxy.shared.pins.get(PinReason::SettingNotUtf8);
    let set = query_bytes(&mut s, b"SET search_path = 'sch\xe9ma'").await;
    assert_eq!(set, Err("no row".to_owned()), "SET succeeds");
    let pinned = query_bytes(&mut s, b"SELECT pg_backend_pid()").await;
    for _ in 0..4 {
        hopper.hop().await;
        assert_eq!(
            query_bytes(&mut s, b"SELECT pg_backend_pid()").await,
            pinned
        );
        let path = query_bytes(&mut s, b"SHOW search_path").await;
        assert_eq!(path.as_deref(), Ok(&b"\"sch\xe9ma\""[..]));
    }
    assert_eq!(proxy.shared.pins.get(PinReason::SettingNotUtf8), before + 1);
}

/// PostgreSQL reads a statement's literals as it prepares it, under the session's
/// TimeZone, DateStyle and client encoding: two clients preparing the same text under
/// other settings get a statement each, as each would on a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_text_prepared_under_another_time_zone_is_another_statement() {
    let proxy = proxy("tx_parse_env", "max_size = 1").await;
    let sql = "SELECT extract(epoch FROM '2024-01-01 00:00'::timestamptz)::bigint";
    let (mut epochs, mut conns, mut statements) = (Vec::new(), Vec::new(), Vec::new());
    for zone in ["UTC", "Asia/Tokyo", "UTC"] {
        let mut config = proxy.config("tx_parse_env", "pw");
        config.options(format!("-c TimeZone={zone}"));
        // (Each stays connected and keeps its statement, which the next would share.)
        conns.push(common::connect(&config).await.expect("login"));
        let conn = conns.last().expect("just pushed");
        let statement = conn.client.prepare(sql).await.unwrap();
        let first: i64 = conn.client.query_one(&statement, &[]).await.unwrap().get(0);
        statements.push(statement);
        // (Prepared again under a name of its own.)
        let again: i64 = conn
            .client
            .query_one(sql, &[])
            .await
            .map(|row| row.get(0))
            .unwrap();
        assert_eq!(first, again);
        epochs.push(first);
    }
    assert_eq!(epochs, [1_704_067_200, 1_704_034_800, 1_704_067_200]);
}

/// A setting with characters beyond ASCII is applied as its client means it, even on a
/// backend the previous client left in another `client_encoding` (the statement applying
/// it is read in that encoding when it arrives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_beyond_ascii_reads_the_same_on_a_backend_left_in_another_encoding() {
    let proxy = trusted_proxy("tx_enc_mix", "max_size = 1").await;
    let mut latin = raw::connect(proxy.addr).await;
    let params = [
        ("user", "tx_enc_mix"),
        ("database", "app"),
        ("client_encoding", "LATIN1"),
    ];
    raw::send(&mut latin, &raw::startup(&params)).await;
    raw::until_ready(&mut latin).await;
    let mut config = proxy.config("tx_enc_mix", "pw");
    config.options("-c search_path=sché,public");
    let utf8 = common::connect(&config).await.expect("login");
    for _ in 0..3 {
        // The one backend, left in LATIN1 by the other client each time.
        let encoding = query_bytes(&mut latin, b"SHOW client_encoding").await;
        assert_eq!(encoding.as_deref(), Ok(&b"LATIN1"[..]));
        let path = setting(&utf8.client, "search_path").await;
        assert_eq!(path, "sché,public");
    }
    // A value given at startup is read in the server's encoding, whatever the client's
    // (psql with PGCLIENTENCODING=LATIN1 and PGOPTIONS='-c search_path=sché' shows
    // 'sché' in LATIN1 straight against PostgreSQL). Another value than the other
    // client's, so that the backend has to be given it.
    let mut given = raw::connect(proxy.addr).await;
    let params = [
        ("user", "tx_enc_mix"),
        ("database", "app"),
        ("client_encoding", "LATIN1"),
        ("options", "-c search_path=schö,public"),
    ];
    raw::send(&mut given, &raw::startup(&params)).await;
    raw::until_ready(&mut given).await;
    for _ in 0..2 {
        setting(&utf8.client, "search_path").await;
        let path = query_bytes(&mut given, b"SHOW search_path").await;
        assert_eq!(path.as_deref(), Ok(&b"sch\xf6,public"[..]));
    }
}

/// Makes `role` (no login) a role `login` may SET ROLE to.
async fn member_role(role: &str, login: &str) {
    common::admin()
        .await
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(4242); \
             DROP ROLE IF EXISTS {role}; CREATE ROLE {role} NOLOGIN; \
             GRANT {role} TO {login}; COMMIT"
        ))
        .await
        .unwrap();
}

async fn user(c: &tokio_postgres::Client) -> String {
    let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
    row.get(0)
}

/// A role given at startup (`options=-c role=…`) is the session's default role, as in
/// PostgreSQL: `RESET ROLE`, `SET ROLE NONE` and `SET SESSION AUTHORIZATION DEFAULT`
/// return to it, and no other client with that startup role ever runs as the login role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_role_is_what_reset_role_returns_to_for_this_client_and_others() {
    // (Three: the client pins one once it goes to the login's role, the hopper holds one.)
    let proxy = proxy("tx_role_login", "max_size = 3").await;
    member_role("tx_role_reader", "tx_role_login").await;
    let mut direct_config = common::direct_config("tx_role_login", "pw");
    direct_config.options("-c role=tx_role_reader");
    let mut config = proxy.config("tx_role_login", "pw");
    config.options("-c role=tx_role_reader");
    let other = common::connect(&config).await.expect("login");
    let plain = proxy.connect("tx_role_login", "pw").await.expect("login");
    let hopper = proxy.connect("tx_role_login", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: hopper.client,
        holding: false,
    };
    for reset in [
        "RESET ROLE",
        "SET ROLE NONE",
        "SET SESSION AUTHORIZATION DEFAULT",
        "RESET SESSION AUTHORIZATION",
        "RESET ALL",
        "DISCARD ALL",
        "BEGIN; RESET ROLE; ROLLBACK",
        "SELECT set_config('role', NULL, false)",
        "SELECT set_config('session_authorization', NULL, false)",
    ] {
        // (A client each: one that SET ROLE NONE stays pinned.)
        let direct = common::connect(&direct_config).await.expect("direct");
        let conn = common::connect(&config).await.expect("login");
        let both = [&direct.client, &conn.client];
        for c in both {
            c.batch_execute(reset).await.unwrap();
        }
        for _ in 0..2 {
            hopper.hop().await;
            let expected = user(&direct.client).await;
            assert_eq!(user(&conn.client).await, expected, "after {reset}");
            assert_eq!(user(&other.client).await, "tx_role_reader", "after {reset}");
            assert_eq!(user(&plain.client).await, "tx_role_login", "after {reset}");
        }
    }
}

/// In SJIS (and BIG5, GBK, UHC, GB18030, JOHAB) a character's second byte may be ASCII,
/// a backslash say: text with such characters is not read by its ASCII bytes but pins,
/// and runs as PostgreSQL reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_in_an_encoding_that_hides_ascii_in_characters_pins_and_runs() {
    use pgshield::client::sql::PinReason;
    let proxy = trusted_proxy("tx_sjis", "max_size = 2").await;
    let mut s = raw::connect(proxy.addr).await;
    let params = [
        ("user", "tx_sjis"),
        ("database", "app"),
        ("client_encoding", "SJIS"),
    ];
    raw::send(&mut s, &raw::startup(&params)).await;
    raw::until_ready(&mut s).await;
    let before = proxy.shared.pins.get(PinReason::Unclassified);
    let ascii = query_bytes(&mut s, b"SELECT 'plain'").await;
    assert_eq!(ascii.as_deref(), Ok(&b"plain"[..]));
    assert_eq!(proxy.shared.pins.get(PinReason::Unclassified), before);
    // 表 is 0x95 0x5C in SJIS: PostgreSQL reads one character, not a backslash.
    let hidden = query_bytes(&mut s, b"SELECT length(E'\x95\x5c')").await;
    assert_eq!(hidden.as_deref(), Ok(&b"1"[..]));
    assert_eq!(proxy.shared.pins.get(PinReason::Unclassified), before + 1);
    // A UTF-8 client's text beyond ASCII behind a SET of another parse setting is read
    // as usual (no pin); behind a SET of its encoding not yet reported, it pins.
    let utf8 = proxy.connect("tx_sjis", "pw").await.expect("login");
    utf8.client
        .batch_execute("BEGIN; SET TimeZone = 'UTC'; SELECT 'café'; COMMIT")
        .await
        .unwrap();
    utf8.client
        .batch_execute("BEGIN; SET TimeZone = 'UTC'")
        .await
        .unwrap();
    utf8.client.batch_execute("SELECT 'café'").await.unwrap();
    utf8.client.batch_execute("COMMIT").await.unwrap();
    assert_eq!(proxy.shared.pins.get(PinReason::Unclassified), before + 1);
    let mut raw = raw::login_trusted(proxy.addr, "tx_sjis").await;
    let mut pipelined = raw::query("SET client_encoding = 'SJIS'");
    pipelined.extend(raw::query_bytes(b"SELECT length(E'\x95\x5c')"));
    raw::send(&mut raw, &pipelined).await;
    raw::until_ready(&mut raw).await;
    assert_eq!(
        first_value_until_ready(&mut raw).await.as_deref(),
        Ok(&b"1"[..])
    );
    assert_eq!(proxy.shared.pins.get(PinReason::Unclassified), before + 2);
}

/// PostgreSQL reads a prepared statement's text again, under the session's settings of
/// the moment, when its plan is invalidated (by any schema change in the database): a
/// shared statement that a client bound after a TimeZone change may read as that
/// client's from then on. A client of the settings it was prepared under never gets
/// that copy: it is prepared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_statement_read_again_under_another_time_zone_is_not_reused() {
    let proxy = proxy("tx_env_reread", "max_size = 1").await;
    let sql = "SELECT extract(epoch FROM '2024-01-01 00:00'::timestamptz)::bigint";
    let (utc, tokyo) = (1_704_067_200_i64, 1_704_034_800_i64);
    let mut config = proxy.config("tx_env_reread", "pw");
    config.options("-c TimeZone=UTC");
    let mover = common::connect(&config).await.expect("login");
    let stayer = common::connect(&config).await.expect("login");
    async fn epoch(c: &tokio_postgres::Client, s: &tokio_postgres::Statement) -> i64 {
        c.query_one(s, &[]).await.unwrap().get(0)
    }
    // One statement, prepared under UTC, shared by both on the one backend.
    let moving = mover.client.prepare(sql).await.unwrap();
    let staying = stayer.client.prepare(sql).await.unwrap();
    assert_eq!(epoch(&stayer.client, &staying).await, utc);
    mover
        .client
        .batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    // Every plan in the database is invalidated: the mover's next Bind reads the shared
    // statement again, in Tokyo.
    common::admin()
        .await
        .batch_execute("CREATE SCHEMA tx_env_reread; DROP SCHEMA tx_env_reread")
        .await
        .unwrap();
    assert_eq!(
        epoch(&mover.client, &moving).await,
        tokyo,
        "PostgreSQL read it again, in Tokyo"
    );
    // (The mover's, UTC's or Tokyo's as PostgreSQL reads it, may be the stayer's copy
    // again: bound in Tokyo, that copy too is then the mover's alone.)
    for _ in 0..2 {
        assert_eq!(epoch(&stayer.client, &staying).await, utc);
        epoch(&mover.client, &moving).await;
    }
}

/// A client that changes its TimeZone after preparing a statement never leaves a copy of
/// that statement read under its new zone where a client of the old zone would use it, nor
/// does a Parse pipelined right behind the SET count as read under the old zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_again_after_a_time_zone_change_is_nobody_elses() {
    let proxy = proxy("tx_env_move", "max_size = 2").await;
    let sql = "SELECT extract(epoch FROM '2024-01-01 00:00'::timestamptz)::bigint, \
               pg_backend_pid()";
    let (utc, tokyo_epoch) = (1_704_067_200_i64, 1_704_034_800_i64);
    let mut config = proxy.config("tx_env_move", "pw");
    config.options("-c TimeZone=UTC");
    let mover = common::connect(&config).await.expect("login");
    let stayer = common::connect(&config).await.expect("login");
    let other = proxy.connect("tx_env_move", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    async fn run(c: &tokio_postgres::Client, s: &tokio_postgres::Statement) -> (i64, i32) {
        let row = c.query_one(s, &[]).await.unwrap();
        (row.get(0), row.get(1))
    }
    // Prepared (under UTC) on one backend only: the other is held meanwhile.
    hopper.hop().await;
    let moving = mover.client.prepare(sql).await.unwrap();
    let staying = stayer.client.prepare(sql).await.unwrap();
    let (_, prepared_on) = run(&stayer.client, &staying).await;
    hopper.hop().await;
    // The SET and a Parse of the same text, pipelined: the Parse is read in Tokyo.
    let (set, tokyo) = tokio::join!(
        mover.client.batch_execute("SET TimeZone = 'Asia/Tokyo'"),
        mover.client.prepare(sql)
    );
    set.unwrap();
    let tokyo = tokyo.unwrap();
    assert_eq!(
        run(&mover.client, &tokyo).await.0,
        tokyo_epoch,
        "read in Tokyo"
    );
    // The mover's UTC statement, bound on the backend that lacks it, is read there in
    // Tokyo now; the stayer's (the same text, prepared under UTC) must not find that copy.
    let mut elsewhere = None;
    for _ in 0..8 {
        hopper.hop().await;
        let (epoch, pid) = run(&mover.client, &moving).await;
        if pid != prepared_on {
            elsewhere = Some(pid);
            assert_eq!(epoch, tokyo_epoch, "prepared again, in Tokyo");
        }
    }
    let elsewhere = elsewhere.expect("the mover ran on the other backend");
    let mut seen = false;
    for _ in 0..8 {
        hopper.hop().await;
        let (epoch, pid) = run(&stayer.client, &staying).await;
        assert_eq!(
            epoch, utc,
            "a UTC client's statement reads in UTC on every backend (ran on {pid}; \
             prepared on {prepared_on}, the mover's elsewhere {elsewhere})"
        );
        seen |= pid == elsewhere;
    }
    assert!(seen, "the stayer ran where the mover prepared it again");
    // Two changes before the backend goes back: each Parse is read under its own.
    let c = &mover.client;
    c.batch_execute("BEGIN; SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let in_tokyo = c.prepare(sql).await.unwrap();
    c.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
    let in_utc = c.prepare(sql).await.unwrap();
    assert_eq!(run(c, &in_tokyo).await.0, tokyo_epoch);
    assert_eq!(run(c, &in_utc).await.0, utc);
    c.batch_execute("COMMIT").await.unwrap();
    // SET LOCAL too, the Parse pipelined behind it: a statement read under it is the
    // mover's own.
    let local_sql = format!("{sql} /* local */");
    let (begun, local) = tokio::join!(
        c.batch_execute("BEGIN; SET LOCAL TimeZone = 'Asia/Tokyo'"),
        c.prepare(&local_sql)
    );
    begun.unwrap();
    let local = local.unwrap();
    let (epoch, local_pid) = run(c, &local).await;
    assert_eq!(epoch, tokyo_epoch);
    c.batch_execute("COMMIT").await.unwrap();
    let mut seen = false;
    for _ in 0..8 {
        hopper.hop().await;
        let fresh = stayer.client.prepare(&local_sql).await.unwrap();
        let (epoch, pid) = run(&stayer.client, &fresh).await;
        assert_eq!(epoch, utc, "not the statement read under SET LOCAL");
        seen |= pid == local_pid;
    }
    assert!(
        seen,
        "the stayer ran where the mover read it under SET LOCAL"
    );
}

/// What a backend is recorded to carry of a client's startup role stays true when the
/// role survives a statement that only looked like it might change it (RESET ALL, a
/// rolled-back RESET ROLE): the next client, which asked for no role, never runs as it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_role_that_survives_a_reset_is_never_another_clients() {
    let proxy = proxy("tx_role_keep", "max_size = 1").await;
    member_role("tx_role_keeper", "tx_role_keep").await;
    let mut config = proxy.config("tx_role_keep", "pw");
    config.options("-c role=tx_role_keeper");
    let keeper = common::connect(&config).await.expect("login");
    let plain = proxy.connect("tx_role_keep", "pw").await.expect("login");
    for statement in ["RESET ALL", "BEGIN; RESET ROLE; ROLLBACK", "RESET ROLE"] {
        assert_eq!(user(&keeper.client).await, "tx_role_keeper");
        keeper.client.batch_execute(statement).await.unwrap();
        // The one backend, next.
        assert_eq!(
            user(&plain.client).await,
            "tx_role_keep",
            "after {statement}"
        );
        assert_eq!(
            user(&keeper.client).await,
            "tx_role_keeper",
            "after {statement}"
        );
    }
}

/// A custom setting (`SET myapp.tenant = …`, how row-level security is often keyed) is
/// not in `pg_settings`: it follows its client across backends all the same, a RESET of
/// it too, and never reaches another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_setting_follows_its_client_and_no_other() {
    let proxy = proxy("tx_custom", "max_size = 2").await;
    let conn = proxy.connect("tx_custom", "pw").await.expect("login");
    let other = proxy.connect("tx_custom", "pw").await.expect("login");
    let observer = proxy.connect("tx_custom", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    conn.client
        .batch_execute("SET myapp.tenant = '42'")
        .await
        .unwrap();
    let mut pids = HashSet::new();
    for _ in 0..6 {
        hopper.hop().await;
        pids.insert(pid(&conn.client).await);
        assert_eq!(tenant(&conn.client).await.as_deref(), Some("42"));
        for _ in 0..2 {
            let seen = tenant(&observer.client).await;
            assert!(seen.as_deref().unwrap_or("").is_empty(), "leaked: {seen:?}");
        }
    }
    assert_eq!(pids.len(), 2, "transactions ran on both backends");
    conn.client
        .batch_execute("RESET myapp.tenant")
        .await
        .unwrap();
    for _ in 0..4 {
        hopper.hop().await;
        let seen = tenant(&conn.client).await;
        assert!(
            seen.as_deref().unwrap_or("").is_empty(),
            "after RESET: {seen:?}"
        );
        let seen = tenant(&observer.client).await;
        assert!(seen.as_deref().unwrap_or("").is_empty(), "leaked: {seen:?}");
    }
}

async fn tenant(client: &tokio_postgres::Client) -> Option<String> {
    client
        .query_one("SELECT current_setting('myapp.tenant', true)", &[])
        .await
        .expect("read")
        .get(0)
}

/// A read-back that includes who the session runs as (a client started with a `role`
/// that runs `RESET ALL`) reads the other settings too: the reset follows the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_by_a_client_started_with_a_role_follows_it() {
    let proxy = proxy("tx_role_rb", "max_size = 2").await;
    member_role("tx_role_rb_reader", "tx_role_rb").await;
    let mut direct_config = common::direct_config("tx_role_rb", "pw");
    direct_config.options("-c role=tx_role_rb_reader");
    let mut config = proxy.config("tx_role_rb", "pw");
    config.options("-c role=tx_role_rb_reader");
    let direct = common::connect(&direct_config).await.expect("direct");
    let conn = common::connect(&config).await.expect("login");
    let other = proxy.connect("tx_role_rb", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    for c in [&direct.client, &conn.client] {
        c.batch_execute("SET search_path = elsewhere")
            .await
            .unwrap();
        c.batch_execute("RESET ALL").await.unwrap();
    }
    let expected = setting(&direct.client, "search_path").await;
    for _ in 0..4 {
        hopper.hop().await;
        assert_eq!(setting(&conn.client, "search_path").await, expected);
        assert_eq!(user(&conn.client).await, "tx_role_rb_reader");
    }
}

/// What `search_path`, `statement_timeout` and `application_name` read after `sql` (with
/// `extended`, run through the extended protocol), for a client that gave other values at
/// startup; `in_transaction`: set and reset inside one, read after it commits.
async fn after_reset(
    client: &tokio_postgres::Client,
    sql: &str,
    in_transaction: bool,
    extended: bool,
) -> [String; 3] {
    if in_transaction {
        client.batch_execute("BEGIN").await.unwrap();
    }
    client
        .batch_execute("SET search_path = elsewhere; SET statement_timeout = 99")
        .await
        .unwrap();
    client
        .batch_execute("SET application_name = 'renamed'")
        .await
        .unwrap();
    if extended {
        client.execute(sql, &[]).await.unwrap();
    } else {
        client.batch_execute(sql).await.unwrap();
    }
    if in_transaction {
        client.batch_execute("COMMIT").await.unwrap();
    }
    let mut got = Vec::new();
    for name in ["search_path", "statement_timeout", "application_name"] {
        got.push(setting(client, name).await);
    }
    got.try_into().expect("three")
}

/// A client that keeps its backend (pinned) and resets its settings returns to those it
/// gave at startup, as in PostgreSQL, not to the server's defaults; a reset rolled back,
/// or followed by a SET, leaves the session value. (So does one that lets go of its
/// backend, by the read-back at release.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeping_its_backend_resets_to_its_startup_settings() {
    use pgshield::client::sql::PinReason;
    let proxy = proxy("tx_keep_reset", "max_size = 2").await;
    let options = "-c statement_timeout=4321 -c search_path=startup_path";
    let mut direct_config = common::direct_config("tx_keep_reset", "pw");
    direct_config
        .application_name("startup-app")
        .options(options);
    let mut config = proxy.config("tx_keep_reset", "pw");
    config.application_name("startup-app").options(options);
    let unpinned = common::connect(&config).await.expect("login");
    let pinned = common::connect(&config).await.expect("login");
    let listens = proxy.shared.pins.get(PinReason::Listen);
    pinned
        .client
        .batch_execute("LISTEN tx_keep_reset")
        .await
        .unwrap();
    assert_eq!(proxy.shared.pins.get(PinReason::Listen), listens + 1);
    let pid_before = pid(&pinned.client).await;
    let statements = [
        "RESET ALL",
        "RESET search_path; RESET statement_timeout; RESET application_name",
        "SET search_path TO DEFAULT; SET statement_timeout TO DEFAULT",
        "BEGIN; RESET ALL; ROLLBACK",
        "RESET ALL; SET search_path = later",
        "DISCARD ALL",
        "SELECT set_config('search_path', NULL, false), \
         set_config('statement_timeout', NULL::text, false)",
        "SELECT set_config('search_path', CAST(NULL AS text), false), \
         set_config('statement_timeout', (NULL), false), \
         set_config('application_name', (NULL)::text, false)",
    ];
    // Each beside a client of its own straight to PostgreSQL, given the same statements.
    for (who, c) in [("pinned", &pinned.client), ("unpinned", &unpinned.client)] {
        let direct = common::connect(&direct_config).await.expect("direct");
        for sql in statements {
            let expected = after_reset(&direct.client, sql, false, false).await;
            assert_eq!(
                after_reset(c, sql, false, false).await,
                expected,
                "{who}: {sql}"
            );
            if sql.contains(';') || sql == "DISCARD ALL" {
                continue; // (one statement; DISCARD ALL not inside a transaction)
            }
            let expected = after_reset(&direct.client, sql, true, false).await;
            let got = after_reset(c, sql, true, false).await;
            assert_eq!(got, expected, "{who}, in a transaction: {sql}");
            let expected = after_reset(&direct.client, sql, false, true).await;
            let got = after_reset(c, sql, false, true).await;
            assert_eq!(got, expected, "{who}, extended protocol: {sql}");
        }
    }
    assert_eq!(pid(&pinned.client).await, pid_before, "kept its backend");
}

/// What pgshield answers itself (a DEALLOCATE of the client's own statement) right after
/// a reset by a pinned client still is: the startup settings given back wait for the next
/// message that reaches the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deallocate_right_after_a_pinned_clients_reset_is_answered() {
    let proxy = trusted_proxy("tx_reset_dealloc", "max_size = 2").await;
    let mut s = raw::connect(proxy.addr).await;
    let params = [
        ("user", "tx_reset_dealloc"),
        ("database", "app"),
        ("options", "-c search_path=startup_path"),
    ];
    raw::send(&mut s, &raw::startup(&params)).await;
    raw::until_ready(&mut s).await;
    raw::send(&mut s, &raw::query("LISTEN tx_reset_dealloc")).await;
    assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
    for _ in 0..20 {
        let mut parse = raw::message(b'P', b"s1\0SELECT 1\0\0\0");
        parse.extend(raw::SYNC);
        raw::send(&mut s, &parse).await;
        assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
        raw::send(&mut s, &raw::query("RESET ALL")).await;
        assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
        raw::send(&mut s, &raw::query("DEALLOCATE s1")).await;
        let (tags, codes) = raw::until_ready(&mut s).await;
        assert_eq!((tags.as_str(), codes), ("CZ", Vec::new()));
    }
    raw::send(&mut s, &raw::query("SELECT current_setting('search_path')")).await;
    let (tags, codes) = raw::until_ready(&mut s).await;
    assert_eq!((tags.as_str(), codes), ("TDCZ", Vec::new()));
}

/// Npgsql's pool resets a connection by sending `DISCARD ALL` in one write with the next
/// command: that command runs under the client's startup settings, as in PostgreSQL, not
/// the server's defaults (pinned or not; a multi-statement reset too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_pipelined_behind_a_reset_runs_under_the_startup_settings() {
    let proxy = trusted_proxy("tx_reset_pipe", "max_size = 2").await;
    for pinned in [false, true] {
        let mut s = raw::connect(proxy.addr).await;
        let params = [
            ("user", "tx_reset_pipe"),
            ("database", "app"),
            ("options", "-c search_path=startup_path"),
        ];
        raw::send(&mut s, &raw::startup(&params)).await;
        raw::until_ready(&mut s).await;
        if pinned {
            raw::send(&mut s, &raw::query("LISTEN tx_reset_pipe")).await;
            assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
        }
        for reset in [
            "DISCARD ALL",
            "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
             SELECT pg_advisory_unlock_all(); DISCARD SEQUENCES; DISCARD TEMP",
            "RESET search_path",
        ] {
            let set = query_bytes(&mut s, b"SET search_path = elsewhere").await;
            assert!(set.is_err(), "{set:?}"); // (no row)
            let mut write = raw::query(reset);
            write.extend(raw::parse_bind_execute(
                "SELECT current_setting('search_path')",
            ));
            write.extend(raw::SYNC);
            raw::send(&mut s, &write).await;
            assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
            let value = first_value_until_ready(&mut s).await;
            assert_eq!(
                value.as_deref(),
                Ok(&b"startup_path"[..]),
                "pinned {pinned}: {reset}"
            );
        }
    }
}

/// A reset gives back the startup values of what it reset, and nothing else: a setting
/// the client changed to the server's own value (applied nowhere, then) stays so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_gives_back_only_what_it_reset() {
    let proxy = proxy("tx_reset_only", "max_size = 2").await;
    let plain = proxy.connect("tx_reset_only", "pw").await.expect("login");
    let server_zone = setting(&plain.client, "TimeZone").await;
    let startup_zone = if server_zone == "Asia/Tokyo" {
        "Europe/Paris"
    } else {
        "Asia/Tokyo"
    };
    let mut config = proxy.config("tx_reset_only", "pw");
    config.options(format!(
        "-c TimeZone={startup_zone} -c search_path=startup_path"
    ));
    let conn = common::connect(&config).await.expect("login");
    let mut hopper = Hopper {
        other: plain.client,
        holding: false,
    };
    assert_eq!(setting(&conn.client, "TimeZone").await, startup_zone);
    conn.client
        .batch_execute(&format!("SET TimeZone = '{server_zone}'"))
        .await
        .unwrap();
    for _ in 0..4 {
        hopper.hop().await;
        conn.client
            .batch_execute("SET search_path = elsewhere")
            .await
            .unwrap();
        conn.client
            .batch_execute("RESET search_path")
            .await
            .unwrap();
        assert_eq!(setting(&conn.client, "search_path").await, "startup_path");
        assert_eq!(setting(&conn.client, "TimeZone").await, server_zone);
    }
}

/// A client that leaves while the read-back of its settings is still running leaves no
/// setting to the next client on that backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_during_its_read_back_leaves_nothing_behind() {
    let proxy = proxy("tx_leave_rb", "max_size = 1").await;
    let admin = common::admin().await;
    // The read-back reads pg_settings: held up there while the client leaves.
    admin
        .batch_execute("BEGIN; LOCK TABLE pg_catalog.pg_settings IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let leaving = proxy.connect("tx_leave_rb", "pw").await.expect("login");
    leaving
        .client
        .batch_execute("SET myapp.tenant = 'left'")
        .await
        .unwrap();
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin.batch_execute("COMMIT").await.unwrap();
    let next = proxy.connect("tx_leave_rb", "pw").await.expect("login");
    let seen = tenant(&next.client).await;
    assert!(seen.as_deref().unwrap_or("").is_empty(), "leaked: {seen:?}");
}

/// A `DEALLOCATE` of the client's own statement sent through the extended protocol (as
/// psycopg does in pipeline mode with a libpq older than 17) answers as in PostgreSQL:
/// the name is gone, and may be prepared again, on any backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extended_protocol_deallocate_of_the_clients_own_statement_works() {
    let proxy = trusted_proxy("tx_ext_dealloc", "max_size = 2").await;
    let other = proxy.connect("tx_ext_dealloc", "pw").await.expect("login");
    let mut hopper = Hopper {
        other: other.client,
        holding: false,
    };
    let mut s = raw::login_trusted(proxy.addr, "tx_ext_dealloc").await;
    for round in 0..6 {
        let sql = format!("SELECT {round}");
        let mut parse = raw::message(b'P', format!("s1\0{sql}\0\0\0").as_bytes());
        parse.extend(raw::message(b'B', b"\0s1\0\0\0\0\0\0\0"));
        parse.extend(raw::message(b'E', b"\0\0\0\0\0"));
        parse.extend(raw::SYNC);
        raw::send(&mut s, &parse).await;
        let value = first_value_until_ready(&mut s).await;
        assert_eq!(value.as_deref(), Ok(round.to_string().as_bytes()));
        hopper.hop().await;
        // (libpq's PQsendQueryParams: Parse, Bind, Describe of the portal, Execute, Sync.)
        let mut deallocate = raw::message(b'P', b"\0DEALLOCATE s1\0\0\0");
        deallocate.extend(raw::message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
        deallocate.extend(raw::message(b'D', b"P\0"));
        deallocate.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
        deallocate.extend(raw::SYNC);
        raw::send(&mut s, &deallocate).await;
        let (tags, codes) = raw::until_ready(&mut s).await;
        assert_eq!(
            (tags.as_str(), codes),
            ("12nCZ", Vec::<String>::new()),
            "round {round}"
        );
    }
    // Parsed in one batch, run in another (on whichever backend): as in PostgreSQL.
    let mut parse = raw::message(b'P', b"s2\0SELECT 2\0\0\0");
    parse.extend(raw::message(b'P', b"\0DEALLOCATE s2\0\0\0"));
    parse.extend(raw::SYNC);
    raw::send(&mut s, &parse).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("11Z".to_owned(), Vec::new())
    );
    hopper.hop().await;
    let mut run = raw::message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
    run.extend(raw::message(b'E', &[0, 0, 0, 0, 0]));
    run.extend(raw::SYNC);
    raw::send(&mut s, &run).await;
    assert_eq!(
        raw::until_ready(&mut s).await,
        ("2CZ".to_owned(), Vec::new())
    );
    // In a failed transaction, it fails (25P02) and drops nothing.
    let mut parse = raw::message(b'P', b"s3\0SELECT 3\0\0\0");
    parse.extend(raw::SYNC);
    raw::send(&mut s, &parse).await;
    raw::until_ready(&mut s).await;
    raw::send(&mut s, &raw::query("BEGIN; SELECT 1/0")).await;
    assert_eq!(raw::until_ready(&mut s).await.1, ["22012"]);
    let mut deallocate = raw::parse_bind_execute("DEALLOCATE s3");
    deallocate.extend(raw::SYNC);
    raw::send(&mut s, &deallocate).await;
    assert_eq!(raw::until_ready(&mut s).await.1, ["25P02"]);
    raw::send(&mut s, &raw::query("ROLLBACK")).await;
    raw::until_ready(&mut s).await;
    let mut run = raw::message(b'B', b"\0s3\0\0\0\0\0\0\0");
    run.extend(raw::message(b'E', b"\0\0\0\0\0"));
    run.extend(raw::SYNC);
    raw::send(&mut s, &run).await;
    assert_eq!(
        first_value_until_ready(&mut s).await.as_deref(),
        Ok(&b"3"[..])
    );
    // Pipelined behind a statement still running (tokio-postgres runs calls side by
    // side): answered after it, in order.
    assert_eq!(parse_named(&mut s, "s4", "SELECT 4").await, "1Z");
    let mut both = raw::query("SELECT pg_sleep(0.2)");
    both.extend(raw::query("DEALLOCATE s4"));
    raw::send(&mut s, &both).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "TDCZ");
    assert_eq!(raw::until_ready(&mut s).await, ("CZ".to_owned(), vec![]));
    assert_eq!(run_named(&mut s, "s4").await, Err("26000".into()));
    // A name the client does not have fails as in PostgreSQL.
    let mut deallocate = raw::parse_bind_execute("DEALLOCATE nope");
    deallocate.extend(raw::SYNC);
    raw::send(&mut s, &deallocate).await;
    assert_eq!(raw::until_ready(&mut s).await.1, ["26000"]);
}

/// A client started with a role that resets it (`DISCARD ALL`, `RESET ROLE`, `SET
/// SESSION AUTHORIZATION DEFAULT`) runs the statement it sent right behind as that role,
/// as in PostgreSQL, never as the login role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_right_behind_a_role_reset_runs_as_the_startup_role() {
    let proxy = trusted_proxy("tx_role_behind", "max_size = 2").await;
    member_role("tx_role_behind_reader", "tx_role_behind").await;
    let mut s = raw::connect(proxy.addr).await;
    let params = [
        ("user", "tx_role_behind"),
        ("database", "app"),
        ("options", "-c role=tx_role_behind_reader"),
    ];
    raw::send(&mut s, &raw::startup(&params)).await;
    raw::until_ready(&mut s).await;
    for reset in [
        "DISCARD ALL",
        "RESET ROLE",
        "SET SESSION AUTHORIZATION DEFAULT",
        "RESET ALL",
    ] {
        for _ in 0..5 {
            let mut write = raw::query(reset);
            write.extend(raw::query("SELECT current_user"));
            raw::send(&mut s, &write).await;
            assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
            let user = first_value_until_ready(&mut s).await;
            assert_eq!(
                user.as_deref(),
                Ok(&b"tx_role_behind_reader"[..]),
                "{reset}"
            );
        }
    }
    // A reset the same text then undoes leaves the role as the client chose it (as in
    // PostgreSQL: the login's own).
    let mut write = raw::query("RESET ROLE; SET ROLE NONE");
    write.extend(raw::query("SELECT current_user"));
    raw::send(&mut s, &write).await;
    assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
    let user = first_value_until_ready(&mut s).await;
    assert_eq!(user.as_deref(), Ok(&b"tx_role_behind"[..]));
    // A startup role that can no longer be set after a reset ends the client, rather
    // than leave it running as the login's role.
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &raw::startup(&params)).await;
    raw::until_ready(&mut s).await;
    let user = query_bytes(&mut s, b"SELECT current_user").await;
    assert_eq!(user.as_deref(), Ok(&b"tx_role_behind_reader"[..]));
    let admin = common::admin().await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS tx_role_behind_log; \
             CREATE TABLE tx_role_behind_log (who text DEFAULT current_user); \
             GRANT INSERT ON tx_role_behind_log TO PUBLIC; \
             REVOKE tx_role_behind_reader FROM tx_role_behind",
        )
        .await
        .unwrap();
    // (What the client sent right behind it never runs as the login's role either.)
    let mut write = raw::query("DISCARD ALL");
    write.extend(raw::query("INSERT INTO tx_role_behind_log DEFAULT VALUES"));
    raw::send(&mut s, &write).await;
    assert_eq!(raw::until_ready(&mut s).await.1, Vec::<String>::new());
    let (tag, body) = raw::read_message(&mut s).await.expect("an error");
    assert_eq!((tag, raw::error_code(&body).as_str()), (b'E', "42501"));
    assert!(raw::read_message(&mut s).await.is_none(), "closed");
    let rows = admin
        .query_one("SELECT count(*) FROM tx_role_behind_log", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(rows, 0, "the INSERT behind the reset did not run");
}

/// A reset sent through the extended protocol returns to the client's startup value, as
/// in PostgreSQL, for what the client sends right after it, while pgshield still reads
/// back what the batch set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_in_an_extended_batch_returns_to_the_startup_value_at_once() {
    let proxy = trusted_proxy("tx_ext_reset", "max_size = 1").await;
    let mut s = raw::connect(proxy.addr).await;
    let options = "-c statement_timeout=5s";
    let startup = [
        ("user", "tx_ext_reset"),
        ("database", "app"),
        ("options", options),
    ];
    raw::send(&mut s, &raw::startup(&startup)).await;
    raw::until_ready(&mut s).await;
    for round in 0..5 {
        let mut reset = raw::parse_bind_execute("RESET statement_timeout");
        reset.extend_from_slice(&raw::SYNC);
        // (The next Query in the same write: it arrives before the read-back's reply.)
        reset.extend(raw::query("SHOW statement_timeout"));
        raw::send(&mut s, &reset).await;
        assert_eq!(raw::until_ready(&mut s).await.0, "12CZ");
        let shown = row_until_ready(&mut s).await;
        assert_eq!(shown.as_deref(), Ok("5s"), "round {round}");
        raw::send(&mut s, &raw::query("SET statement_timeout = '1min'")).await;
        raw::until_ready(&mut s).await;
    }
}

/// A DateStyle given in part (`ISO`, as pgjdbc sends it) is merged by PostgreSQL with the
/// session's: on a backend another client left in `SQL, DMY`, the client gets the date
/// order it would get at a login to the server, not that client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_datestyle_does_not_take_another_clients_date_order() {
    let proxy = trusted_proxy("tx_datestyle", "max_size = 1").await;
    let mut a = raw::login_trusted(proxy.addr, "tx_datestyle").await;
    raw::send(&mut a, &raw::query("SET DateStyle = 'SQL, DMY'")).await;
    raw::until_ready(&mut a).await;
    raw::send(&mut a, &raw::query("SHOW DateStyle")).await;
    assert_eq!(row_until_ready(&mut a).await.as_deref(), Ok("SQL, DMY"));
    let mut b = raw::connect(proxy.addr).await;
    let startup = [
        ("user", "tx_datestyle"),
        ("database", "app"),
        ("DateStyle", "ISO"),
    ];
    raw::send(&mut b, &raw::startup(&startup)).await;
    raw::until_ready(&mut b).await;
    raw::send(&mut b, &raw::query("SHOW DateStyle")).await;
    assert_eq!(row_until_ready(&mut b).await.as_deref(), Ok("ISO, MDY"));
    raw::send(&mut a, &raw::query("SHOW DateStyle")).await;
    assert_eq!(row_until_ready(&mut a).await.as_deref(), Ok("SQL, DMY"));
}

/// The next notification on `conn`, if one comes within half a second.
async fn notification(conn: &mut common::Conn) -> Option<tokio_postgres::Notification> {
    let wait = async {
        loop {
            match conn.messages.recv().await {
                Some(tokio_postgres::AsyncMessage::Notification(n)) => return n,
                Some(_) => continue,
                None => std::future::pending().await,
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_millis(500), wait)
        .await
        .ok()
}

/// A notification on the backend of a client not seen to LISTEN (another's LISTEN ran
/// inside a function, which no statement shows) is another client's, or may be: it is
/// not passed on, whether the client is pinned (for something else) or not, and that
/// backend is not lent again unreset. Before, the next client of the backend got the
/// first client's notifications. A client that ran LISTEN itself gets its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_on_a_backend_no_client_listens_on_reaches_nobody() {
    let role = "tx_notify_fn";
    let proxy = proxy(role, "max_size = 1").await;
    let admin = common::admin().await;
    admin
        .batch_execute(
            "CREATE OR REPLACE FUNCTION tx_notify_subscribe() RETURNS void LANGUAGE plpgsql \
             AS $$ BEGIN EXECUTE 'LISTEN tx_notify_jobs'; END $$",
        )
        .await
        .expect("the function");
    for pinned in [false, true] {
        let a = proxy.connect(role, "pw").await.expect("login a");
        let listening = pid(&a.client).await;
        a.client
            .batch_execute("SELECT tx_notify_subscribe()")
            .await
            .expect("a listens, through a function");
        drop(a);
        let mut b = proxy.connect(role, "pw").await.expect("login b");
        if pinned {
            b.client
                .batch_execute("CREATE TEMP TABLE tx_notify_t (x int)")
                .await
                .expect("b pinned, for a temp table");
        }
        b.client.batch_execute("BEGIN").await.expect("begin");
        assert_eq!(pid(&b.client).await, listening, "b holds a's backend");
        admin
            .batch_execute("NOTIFY tx_notify_jobs, 'a secret of a'")
            .await
            .expect("notify");
        b.client.batch_execute("COMMIT").await.expect("commit");
        // (The server delivers it as the transaction ends, before its ReadyForQuery.)
        b.client.batch_execute("SELECT 1").await.expect("a query");
        let got = notification(&mut b).await;
        assert!(
            got.is_none(),
            "pinned {pinned}: b got a's notification: {got:?}"
        );
        if !pinned {
            // That backend is not lent again.
            assert_ne!(pid(&b.client).await, listening);
        }
    }
    // A client that runs LISTEN gets its notifications.
    let mut c = proxy.connect(role, "pw").await.expect("login c");
    c.client
        .batch_execute("LISTEN tx_notify_own")
        .await
        .expect("listen");
    admin
        .batch_execute("NOTIFY tx_notify_own, 'for c'")
        .await
        .expect("notify");
    c.client.batch_execute("SELECT 1").await.expect("a query");
    let got = notification(&mut c).await.expect("c's own notification");
    assert_eq!(got.payload(), "for c");
}

/// A LOAD by a client pinned already for another reason (or behind another reason in the
/// same Query) still closes its backend when it leaves: DISCARD ALL leaves a library's
/// hooks in the server process. Before, the first reason was kept, and the backend was
/// reset and lent to the next client with the library loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_after_another_pin_still_closes_the_backend() {
    let role = "tx_load_pinned";
    let proxy = proxy(role, "max_size = 1").await;
    for statements in [
        &["CREATE TEMP TABLE tx_load_t (x int)", "LOAD 'auto_explain'"][..],
        &["CREATE TEMP TABLE tx_load_u (x int); LOAD 'auto_explain'"][..],
    ] {
        let a = proxy.connect(role, "pw").await.expect("login a");
        let loaded = pid(&a.client).await;
        for sql in statements {
            // (Refused to a non-superuser for a library outside plugins/: closed all the
            // same, as pgshield goes by what a statement may do.)
            let _ = a.client.batch_execute(sql).await;
        }
        drop(a);
        let b = proxy.connect(role, "pw").await.expect("login b");
        assert_ne!(pid(&b.client).await, loaded, "{statements:?}");
    }
}
