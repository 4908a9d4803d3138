//! Session mode relays everything a driver does, unmodified: simple and extended queries,
//! COPY both ways, large results, errors inside transactions, notices, LISTEN/NOTIFY,
//! pipelining, and the client's startup settings.

mod common;

use std::time::Duration;

use common::{raw, sqlstate, Conn, TestProxy};
use futures_util::{SinkExt, TryStreamExt};
use tokio_postgres::AsyncMessage;

async fn proxy(role: &str) -> TestProxy {
    common::create_role(role, "pw").await;
    TestProxy::start(&format!(
        "[pool]\nmode = \"session\"\nmax_size = 3\n\n[users.{role}]\npassword = \"pw\"\n"
    ))
    .await
}

#[tokio::test]
async fn copy_in_and_out_of_10_mb_passes_through_intact() {
    let proxy = proxy("sess_copy").await;
    let conn = proxy.connect("sess_copy", "pw").await.expect("login");
    let c = &conn.client;
    c.batch_execute("CREATE TABLE copy_data (id int, payload text)")
        .await
        .unwrap();

    let line = "x".repeat(1000);
    let mut data = String::with_capacity(10 * 1024 * 1024 + 20_000);
    let mut id = 0;
    while data.len() < 10 * 1024 * 1024 {
        data.push_str(&format!("{id}\t{line}\n"));
        id += 1;
    }
    let sink = c
        .copy_in("COPY copy_data FROM STDIN")
        .await
        .expect("COPY IN starts");
    futures_util::pin_mut!(sink);
    // Send it in 64 KiB pieces, as drivers stream files.
    for chunk in data.as_bytes().chunks(64 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .expect("chunk");
    }
    let rows = sink.finish().await.expect("COPY IN completes");
    assert_eq!(rows, id as u64);

    let out = c
        .copy_out("COPY copy_data TO STDOUT")
        .await
        .expect("COPY OUT starts");
    let received: Vec<bytes::Bytes> = out.try_collect().await.expect("COPY OUT completes");
    let received: Vec<u8> = received.concat();
    assert_eq!(received.len(), data.len());
    assert!(
        received == data.as_bytes(),
        "COPY OUT returns what COPY IN sent"
    );
}

#[tokio::test]
async fn a_100k_row_result_arrives_whole_and_in_order() {
    let proxy = proxy("sess_rows").await;
    let conn = proxy.connect("sess_rows", "pw").await.expect("login");
    let rows = conn
        .client
        .query(
            "SELECT g, repeat('y', 50) FROM generate_series(1, 100000) g",
            &[],
        )
        .await
        .expect("query");
    assert_eq!(rows.len(), 100_000);
    for (i, row) in rows.iter().enumerate().step_by(9_999) {
        assert_eq!(row.get::<_, i32>(0), i as i32 + 1);
    }
    assert_eq!(rows[99_999].get::<_, i32>(0), 100_000);
}

#[tokio::test]
async fn a_single_20_mb_value_streams_through() {
    let proxy = proxy("sess_big").await;
    let conn = proxy.connect("sess_big", "pw").await.expect("login");
    let row = conn
        .client
        .query_one("SELECT repeat('z', 20000000) AS v", &[])
        .await
        .expect("query");
    let v: &str = row.get(0);
    assert_eq!(v.len(), 20_000_000);
    assert!(v.bytes().all(|b| b == b'z'));
}

#[tokio::test]
async fn an_error_mid_transaction_then_rollback_leaves_the_session_usable() {
    let proxy = proxy("sess_err").await;
    let conn = proxy.connect("sess_err", "pw").await.expect("login");
    let c = &conn.client;
    c.batch_execute("BEGIN").await.unwrap();
    let err = c
        .query_one("SELECT 1/0", &[])
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&err), Some("22012"));
    let err = c
        .query_one("SELECT 1", &[])
        .await
        .expect_err("transaction is aborted");
    assert_eq!(sqlstate(&err), Some("25P02"));
    c.batch_execute("ROLLBACK").await.unwrap();
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test]
async fn notices_reach_the_client() {
    let proxy = proxy("sess_notice").await;
    let mut conn = proxy.connect("sess_notice", "pw").await.expect("login");
    conn.client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        .await
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), conn.messages.recv())
        .await
        .expect("a notice within 5 s")
        .expect("connection alive");
    let AsyncMessage::Notice(notice) = message else {
        panic!("expected a notice, got {message:?}");
    };
    assert_eq!(notice.message(), "hello from the server");
}

#[tokio::test]
async fn listen_and_notify_work_in_session_mode() {
    let proxy = proxy("sess_listen").await;
    let mut listener = proxy.connect("sess_listen", "pw").await.expect("login");
    let notifier = proxy.connect("sess_listen", "pw").await.expect("login");
    listener
        .client
        .batch_execute("LISTEN pgshield_test")
        .await
        .unwrap();
    notifier
        .client
        .batch_execute("NOTIFY pgshield_test, 'the payload'")
        .await
        .unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match listener.messages.recv().await {
                Some(AsyncMessage::Notification(n)) => return n,
                Some(_) => continue,
                None => panic!("listener connection ended"),
            }
        }
    })
    .await
    .expect("notification within 5 s");
    assert_eq!(message.channel(), "pgshield_test");
    assert_eq!(message.payload(), "the payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_queries_return_in_order() {
    let proxy = proxy("sess_pipe").await;
    let conn = proxy.connect("sess_pipe", "pw").await.expect("login");
    let statement = conn
        .client
        .prepare("SELECT $1::int * 2")
        .await
        .expect("prepare");
    // tokio-postgres sends every query before awaiting any reply: one long pipeline.
    let queries = (0..1000i32).map(|i| {
        let client = &conn.client;
        let statement = &statement;
        async move { (i, client.query_one(statement, &[&i]).await) }
    });
    let results = futures_util::future::join_all(queries).await;
    for (i, row) in results {
        let doubled: i32 = row.expect("query").get(0);
        assert_eq!(doubled, i * 2);
    }
}

#[tokio::test]
async fn startup_settings_and_options_reach_the_backend() {
    let proxy = proxy("sess_params").await;
    let mut config = proxy.config("sess_params", "pw");
    config
        .application_name("pgshield-test-app")
        .options("-c statement_timeout=4321 -c search_path=custom,public");
    let conn = common::connect(&config).await.expect("login");
    let show = |name: &'static str| {
        let client = &conn.client;
        async move {
            let row = client
                .query_one("SELECT current_setting($1)", &[&name])
                .await
                .expect("setting");
            row.get::<_, String>(0)
        }
    };
    assert_eq!(show("application_name").await, "pgshield-test-app");
    assert_eq!(show("statement_timeout").await, "4321ms");
    assert_eq!(show("search_path").await.replace(' ', ""), "custom,public");
}

#[tokio::test]
async fn an_invalid_startup_setting_is_refused_like_postgres_refuses_it() {
    let proxy = proxy("sess_badparam").await;
    let mut config = proxy.config("sess_badparam", "pw");
    config.options("-c statement_timeout=not-a-number");
    let conn = common::connect(&config)
        .await
        .expect("login (checked at first query)");
    let err = conn
        .client
        .simple_query("SELECT 1")
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err), Some("22023"), "{err}");
}

#[tokio::test]
async fn prepared_statements_and_the_extended_protocol_work() {
    let proxy = proxy("sess_ext").await;
    let conn = proxy.connect("sess_ext", "pw").await.expect("login");
    let c = &conn.client;
    let statement = c
        .prepare("SELECT $1::text || $2::text")
        .await
        .expect("prepare");
    for i in 0..50 {
        let row = c
            .query_one(&statement, &[&format!("a{i}"), &"b"])
            .await
            .expect("execute");
        assert_eq!(row.get::<_, String>(0), format!("a{i}b"));
    }
    // A portal fetched in pieces (Execute with a row limit, then more Executes).
    let tx_conn = proxy.connect("sess_ext", "pw").await.expect("login");
    let mut client = tx_conn.client;
    let tx = client.transaction().await.unwrap();
    let portal = tx
        .bind("SELECT g FROM generate_series(1, 25) g", &[])
        .await
        .unwrap();
    let mut seen = 0;
    loop {
        let rows = tx.query_portal(&portal, 10).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen += rows.len();
    }
    assert_eq!(seen, 25);
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_session_keeps_its_backend_and_state_for_its_whole_life() {
    let proxy = proxy("sess_sticky").await;
    let conn = proxy.connect("sess_sticky", "pw").await.expect("login");
    let c = &conn.client;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    c.batch_execute(
        "CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (42); SET work_mem = '7MB'",
    )
    .await
    .unwrap();
    for _ in 0..5 {
        let again: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(again, pid);
    }
    let x: i32 = c.query_one("SELECT x FROM mine", &[]).await.unwrap().get(0);
    assert_eq!(x, 42);
    let mem: String = c
        .query_one("SELECT current_setting('work_mem')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mem, "7MB");
}

#[tokio::test]
async fn the_next_client_gets_a_clean_backend() {
    common::create_role("sess_reset", "pw").await;
    let proxy =
        TestProxy::start("[pool]\nmax_size = 1\n\n[users.sess_reset]\npassword = \"pw\"\n").await;
    let first = proxy.connect("sess_reset", "pw").await.expect("login");
    let pid: i32 = first
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    first
        .client
        .batch_execute("CREATE TEMP TABLE leftover (x int); SET work_mem = '9MB'; BEGIN; SELECT 1")
        .await
        .unwrap();
    drop(first); // leaves mid-transaction
    let second: Conn = proxy.connect("sess_reset", "pw").await.expect("login");
    let row = second
        .client
        .query_one(
            "SELECT pg_backend_pid(), current_setting('work_mem'), to_regclass('pg_temp.leftover') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), pid, "the only backend was reused");
    assert_eq!(row.get::<_, String>(1), "4MB", "SET was discarded");
    assert!(row.get::<_, bool>(2), "temp table was discarded");
}

#[tokio::test]
async fn a_terminated_backend_errors_its_client_and_the_pool_refills() {
    let proxy = proxy("sess_kill").await;
    let admin = common::admin().await;
    let victim = proxy.connect("sess_kill", "pw").await.expect("login");
    let pid: i32 = victim
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate");
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        victim.client.simple_query("SELECT 1"),
    )
    .await
    .expect("an answer within 5 s")
    .expect_err("the session is gone");
    assert!(
        victim.client.is_closed() || sqlstate(&err).is_some(),
        "the client sees an error: {err}"
    );
    let next = proxy.connect("sess_kill", "pw").await.expect("login");
    let new_pid: i32 = next
        .client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(new_pid, pid);
}

#[tokio::test]
async fn a_statement_sent_just_before_the_client_leaves_is_still_executed() {
    common::create_role("sess_last", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmax_size = 1\n[users.sess_last]\nauth = \"trust\"\nserver_password = \"pw\"\n",
    )
    .await;
    let admin = common::admin().await;
    admin
        .batch_execute("CREATE TABLE last_words (x int); GRANT INSERT ON last_words TO sess_last")
        .await
        .unwrap();
    for (i, goodbye) in [&raw::TERMINATE[..], &[][..]].into_iter().enumerate() {
        let mut s = raw::login_trusted(proxy.addr, "sess_last").await;
        // Hold the backend first (a client that hangs up while still queued gave up on its
        // statement, and pgshield does not run it behind its back).
        raw::send(&mut s, &raw::query("SELECT 1")).await;
        while raw::read_message(&mut s).await.expect("reply").0 != b'Z' {}
        // The statement and the goodbye (Terminate, or just a hang-up) in one write,
        // without waiting for the reply: PostgreSQL would run it, so must pgshield.
        let mut bytes = raw::query(&format!("INSERT INTO last_words VALUES ({i})"));
        bytes.extend_from_slice(goodbye);
        raw::send(&mut s, &bytes).await;
        drop(s);
    }
    let mut rows = 0;
    for _ in 0..100 {
        rows = admin
            .query_one("SELECT count(*) FROM last_words", &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
        if rows == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows, 2, "both statements ran");
}

/// The only backend's PID as seen by a new client of a one-backend pool.
async fn next_clients_pid(proxy: &TestProxy, role: &str) -> i32 {
    let conn = proxy.connect(role, "pw").await.expect("login");
    conn.client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("query")
        .get(0)
}

#[tokio::test]
async fn an_extended_protocol_copy_in_leaves_the_backend_clean_for_the_next_client() {
    // tokio-postgres sends Bind, Execute, Sync, the data, CopyDone, Sync: PostgreSQL
    // ignores the first Sync, so only one ReadyForQuery comes for two Syncs.
    common::create_role("sess_copyext", "pw").await;
    let proxy =
        TestProxy::start("[pool]\nmax_size = 1\n[users.sess_copyext]\npassword = \"pw\"\n").await;
    let pid = next_clients_pid(&proxy, "sess_copyext").await;
    {
        let conn = proxy.connect("sess_copyext", "pw").await.expect("login");
        conn.client
            .batch_execute("CREATE TABLE copy_ext (x int)")
            .await
            .unwrap();
        let sink = conn
            .client
            .copy_in("COPY copy_ext FROM STDIN")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
            .await
            .unwrap();
        assert_eq!(sink.finish().await.unwrap(), 3);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        next_clients_pid(&proxy, "sess_copyext").await,
        pid,
        "the backend was reset and returned, not closed as if it still owed a reply"
    );
}

#[tokio::test]
async fn messages_skipped_after_an_extended_error_are_not_waited_for() {
    // Parse fails; PostgreSQL discards the Query sent before the Sync and answers only
    // the Sync.
    common::create_role("sess_skip", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmax_size = 1\n[users.sess_skip]\nauth = \"trust\"\nserver_password = \"pw\"\n",
    )
    .await;
    let pid = next_clients_pid(&proxy, "sess_skip").await;
    let mut s = raw::login_trusted(proxy.addr, "sess_skip").await;
    let mut bytes = vec![b'P'];
    let body = b"\0SELEKT nonsense\0\0\0";
    bytes.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes.extend_from_slice(&raw::query("SELECT 1"));
    bytes.extend_from_slice(&[b'S', 0, 0, 0, 4]);
    raw::send(&mut s, &bytes).await;
    let mut tags = Vec::new();
    while let Some((tag, _)) = raw::read_message(&mut s).await {
        tags.push(tag);
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(tags, vec![b'E', b'Z']);
    raw::send(&mut s, &raw::TERMINATE).await;
    assert!(raw::closed(&mut s).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        next_clients_pid(&proxy, "sess_skip").await,
        pid,
        "the backend was returned"
    );
}

#[tokio::test]
async fn a_value_larger_than_256_mib_streams_through() {
    let proxy = proxy("sess_huge").await;
    let conn = proxy.connect("sess_huge", "pw").await.expect("login");
    let len: i64 = 270_000_000;
    let row = conn
        .client
        .query_one("SELECT repeat('h', $1::int)", &[&(len as i32)])
        .await
        .expect("a 270 MB row");
    assert_eq!(row.get::<_, &str>(0).len() as i64, len);
}

/// A table `table` (one int column) and a view `{table}_v` of it, for `role`: a COPY
/// into the view fails before reading its data, one into the table on a bad row.
async fn copy_table_and_view(table: &str, role: &str) {
    common::admin()
        .await
        .batch_execute(&format!(
            "CREATE TABLE {table} (x int); CREATE VIEW {table}_v AS SELECT * FROM {table}; \
             GRANT ALL ON {table}, {table}_v TO {role}"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_copy_that_fails_before_or_while_reading_its_data_leaves_the_session_usable() {
    // libpq and tokio-postgres send Parse, Bind, Execute, Sync before the COPY data. If the
    // COPY fails before reading anything (COPY into a view), PostgreSQL answers that Sync
    // as well as the one after the data; if it fails on the data, that first Sync was
    // consumed. pgshield cannot tell these apart, and must pass both through unharmed.
    common::create_role("sess_copyfail", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmax_size = 1\n[users.sess_copyfail]\nauth = \"trust\"\nserver_password = \"pw\"\n",
    )
    .await;
    copy_table_and_view("copy_fail", "sess_copyfail").await;
    let mut s = raw::login_trusted(proxy.addr, "sess_copyfail").await;
    let data = raw::message(b'd', b"not-a-number\n");
    let cases = [
        ("COPY copy_fail_v FROM STDIN", "12GEZ", "42809", "Z"),
        ("COPY copy_fail FROM STDIN", "12G", "22P02", "EZ"),
    ];
    for (sql, first, code, second) in cases {
        let mut bytes = raw::parse_bind_execute(sql);
        bytes.extend_from_slice(&raw::SYNC);
        raw::send(&mut s, &bytes).await;
        let mut tags = String::new();
        while !tags.ends_with(if first.ends_with('Z') { 'Z' } else { 'G' }) {
            let (tag, body) = raw::read_message(&mut s).await.expect("reply");
            tags.push(char::from(tag));
            if tag == b'E' {
                assert_eq!(raw::error_code(&body), code, "{sql}");
            }
        }
        assert_eq!(tags, first, "{sql}");
        let mut rest = data.clone();
        rest.extend_from_slice(&raw::COPY_DONE);
        rest.extend_from_slice(&raw::SYNC);
        raw::send(&mut s, &rest).await;
        let (tags, codes) = raw::until_ready(&mut s).await;
        assert_eq!(tags, second, "{sql}");
        if second.starts_with('E') {
            assert_eq!(codes, vec![code.to_owned()], "{sql}");
        }
        raw::send(&mut s, &raw::query("SELECT 1")).await;
        let (tags, codes) = raw::until_ready(&mut s).await;
        assert_eq!(
            (tags.as_str(), codes.len()),
            ("TDCZ", 0),
            "{sql}: the session goes on"
        );
    }
    raw::send(&mut s, &raw::TERMINATE).await;
    drop(s);
    // That backend could not be judged any more, so it is closed; the pool makes another.
    let next = proxy.connect("sess_copyfail", "pw").await.expect("login");
    next.client
        .simple_query("SELECT 1")
        .await
        .expect("a fresh backend serves");
}

/// PostgreSQL makes the startup settings the session's defaults: `RESET`, `RESET ALL`,
/// `DISCARD ALL` and `SET … TO DEFAULT` (asyncpg's and Npgsql's pools reset so at every
/// release) return to them, not to the server's; a reset rolled back changes nothing.
#[tokio::test]
async fn resets_return_to_the_startup_settings_as_in_postgres() {
    let proxy = proxy("sess_startup_reset").await;
    let options = "-c statement_timeout=4321 -c search_path=startup_path -c myapp.tenant=7";
    let mut direct_config = common::direct_config("sess_startup_reset", "pw");
    direct_config
        .application_name("startup-app")
        .options(options);
    let mut config = proxy.config("sess_startup_reset", "pw");
    config.application_name("startup-app").options(options);
    let direct = common::connect(&direct_config).await.expect("direct");
    let conn = common::connect(&config).await.expect("login");
    for sql in [
        "RESET ALL",
        "RESET search_path; RESET statement_timeout; RESET application_name",
        "SET search_path TO DEFAULT; SET statement_timeout TO DEFAULT",
        "BEGIN; RESET ALL; ROLLBACK",
        "DISCARD ALL",
        "RESET ALL; SET search_path = later",
    ] {
        for c in [&direct.client, &conn.client] {
            c.batch_execute("SET search_path = elsewhere; SET statement_timeout = 99")
                .await
                .unwrap();
            c.batch_execute("SET application_name = 'renamed'; SET myapp.tenant = 8")
                .await
                .unwrap();
            c.batch_execute(sql).await.unwrap();
        }
        assert_eq!(
            read(&conn.client).await,
            read(&direct.client).await,
            "{sql}"
        );
    }
    // A reset inside a transaction takes no snapshot of pgshield's before the transaction
    // says how it runs; its startup values are back once it ends.
    for c in [&direct.client, &conn.client] {
        c.batch_execute("SET search_path = elsewhere")
            .await
            .unwrap();
        c.batch_execute("BEGIN").await.unwrap();
        c.batch_execute("RESET ALL").await.unwrap();
        c.batch_execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
            .await
            .unwrap();
        c.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(read(&conn.client).await, read(&direct.client).await);
    // A COPY right behind a reset.
    conn.client
        .batch_execute("CREATE TEMP TABLE reset_copy (x int)")
        .await
        .unwrap();
    conn.client.batch_execute("RESET ALL").await.unwrap();
    let sink = conn
        .client
        .copy_in::<_, bytes::Bytes>("COPY reset_copy FROM STDIN")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"7\n")).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1);
    assert_eq!(read(&conn.client).await, read(&direct.client).await);
}

async fn read(client: &tokio_postgres::Client) -> Vec<String> {
    let row = client
        .query_one(
            "SELECT current_setting('search_path'), current_setting('statement_timeout'), \
             current_setting('application_name'), current_setting('myapp.tenant', true)",
            &[],
        )
        .await
        .expect("settings");
    (0..4)
        .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
        .collect()
}

/// A client that leaves right after a reset (its startup settings being given back in a
/// hidden statement) leaves its backend to the next client, not closed.
#[tokio::test]
async fn a_backend_is_reused_after_a_client_resets_and_leaves() {
    common::create_role("sess_reset_leave", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmode = \"session\"\nmax_size = 1\n\n[users.sess_reset_leave]\npassword = \"pw\"\n",
    )
    .await;
    let mut config = proxy.config("sess_reset_leave", "pw");
    config.options("-c search_path=startup_path -c statement_timeout=4321");
    let pid = |conn: Conn| async move {
        let row = conn.client.query_one("SELECT pg_backend_pid()", &[]).await;
        row.expect("pid").get::<_, i32>(0)
    };
    let first = common::connect(&config).await.expect("login");
    first.client.batch_execute("RESET ALL").await.unwrap();
    let first_pid = pid(first).await;
    // The statement giving the settings back reads pg_settings: held up there while the
    // client leaves.
    let admin = common::admin().await;
    admin
        .batch_execute("BEGIN; LOCK TABLE pg_catalog.pg_settings IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let leaving = common::connect(&config).await.expect("login");
    leaving.client.batch_execute("RESET ALL").await.unwrap();
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin.batch_execute("COMMIT").await.unwrap();
    let next = common::connect(&config).await.expect("login");
    assert_eq!(pid(next).await, first_pid, "the one backend was reused");
}

/// In session mode the client keeps a backend whose replies a failed COPY FROM STDIN left
/// unsure how to count (one ReadyForQuery more may come): pgshield finds its place among
/// them again, and the session's limits go on as for any other (a statement running
/// past query_timeout is cancelled).
#[tokio::test]
async fn a_session_kept_after_a_failed_copy_is_timed_again() {
    common::create_role("sess_copyresync", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmode = \"session\"\nmax_size = 1\nquery_timeout = \"2s\"\n\
         [users.sess_copyresync]\nauth = \"trust\"\nserver_password = \"pw\"\n",
    )
    .await;
    copy_table_and_view("copy_resync", "sess_copyresync").await;
    let mut s = raw::login_trusted(proxy.addr, "sess_copyresync").await;
    // A COPY into a view fails before reading its data: PostgreSQL answers the Sync sent
    // ahead of the data and the one after it.
    let mut bytes = raw::parse_bind_execute("COPY copy_resync_v FROM STDIN");
    bytes.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &bytes).await;
    let (tags, codes) = raw::until_ready(&mut s).await;
    assert_eq!((tags.as_str(), codes), ("12GEZ", vec!["42809".to_owned()]));
    let mut rest = raw::message(b'd', b"1\n");
    rest.extend_from_slice(&raw::COPY_DONE);
    rest.extend_from_slice(&raw::SYNC);
    raw::send(&mut s, &rest).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "Z");
    raw::send(&mut s, &raw::query("SELECT 1")).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "TDCZ");
    let started = std::time::Instant::now();
    raw::send(&mut s, &raw::query("SELECT pg_sleep(10)")).await;
    let (_, codes) = raw::until_ready(&mut s).await;
    assert_eq!(codes, vec!["57014".to_owned()]);
    assert!(started.elapsed() < std::time::Duration::from_secs(7));
    raw::send(&mut s, &raw::query("SELECT 2")).await;
    assert_eq!(raw::until_ready(&mut s).await.0, "TDCZ");
}

/// What LOAD brings into a server process (a library's hooks) outlives DISCARD ALL: a
/// session-mode client that ran it leaves its backend closed, not lent to the next, as in
/// transaction mode.
#[tokio::test]
async fn a_backend_that_loaded_a_library_is_closed_when_its_client_leaves() {
    common::create_role("sess_load", "pw").await;
    let proxy = TestProxy::start(
        "[pool]\nmode = \"session\"\nmax_size = 1\n\n[users.sess_load]\npassword = \"pw\"\n",
    )
    .await;
    async fn pid(conn: &Conn) -> i32 {
        let row = conn.client.query_one("SELECT pg_backend_pid()", &[]).await;
        row.expect("pid").get::<_, i32>(0)
    }
    let first = proxy.connect("sess_load", "pw").await.expect("login");
    let first_pid = pid(&first).await;
    drop(first);
    let second = proxy.connect("sess_load", "pw").await.expect("login");
    assert_eq!(
        pid(&second).await,
        first_pid,
        "reused after a plain session"
    );
    // (Refused to a non-superuser for a library outside plugins/: closed all the same, as
    // pgshield goes by what a statement may do.)
    let _ = second.client.batch_execute("LOAD 'auto_explain'").await;
    drop(second);
    let third = proxy.connect("sess_load", "pw").await.expect("login");
    let third_pid = pid(&third).await;
    assert_ne!(third_pid, first_pid, "closed after LOAD");
    // Through the extended protocol (pgjdbc runs every statement so) as well.
    let _ = third.client.execute("LOAD 'auto_explain'", &[]).await;
    drop(third);
    let fourth = proxy.connect("sess_load", "pw").await.expect("login");
    assert_ne!(
        pid(&fourth).await,
        third_pid,
        "closed after an extended LOAD"
    );
}
