//! Access rules: client address ranges, TLS required, client limits per user and per
//! database, and max_db_connections across a database's pools.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{pki, raw, sqlstate, TestProxy};

fn message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

fn role_config(role: &str, extra: &str) -> String {
    format!("[users.{role}]\npassword = \"pw\"\n{extra}")
}

#[tokio::test]
async fn a_user_outside_its_allowed_cidrs_is_refused_with_28000() {
    common::create_role("acc_cidr_no", "pw").await;
    common::create_role("acc_cidr_yes", "pw").await;
    let proxy = TestProxy::start(&format!(
        "{}{}[admin]\nusers = [\"acc_cidr_no\", \"acc_cidr_yes\"]\n",
        role_config(
            "acc_cidr_no",
            "allowed_cidrs = [\"10.0.0.0/8\", \"::1/128\"]\n"
        ),
        role_config("acc_cidr_yes", "allowed_cidrs = [\"127.0.0.0/8\"]\n"),
    ))
    .await;
    // The admin console too.
    let mut console = proxy.config("acc_cidr_no", "pw");
    console.dbname("pgshield");
    let err = common::connect(&console).await.err().expect("refused");
    assert_eq!(sqlstate(&err), Some("28000"), "{err}");
    let mut console = proxy.config("acc_cidr_yes", "pw");
    console.dbname("pgshield");
    common::connect(&console).await.expect("allowed");
    let err = proxy
        .connect("acc_cidr_no", "pw")
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), Some("28000"), "{err}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("allowed_cidrs"), "{message}");
    proxy.connect("acc_cidr_yes", "pw").await.expect("allowed");
}

#[tokio::test]
async fn a_database_can_be_limited_to_addresses_too() {
    common::create_role("acc_db_cidr", "pw").await;
    let db = common::cluster();
    let proxy = TestProxy::start(&format!(
        "[databases.fenced]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\
         allowed_cidrs = [\"192.0.2.0/24\"]\n{}",
        db.port(),
        role_config("acc_db_cidr", "")
    ))
    .await;
    proxy
        .connect("acc_db_cidr", "pw")
        .await
        .expect("app is open");
    let mut fenced = proxy.config("acc_db_cidr", "pw");
    fenced.dbname("fenced");
    let err = common::connect(&fenced).await.err().expect("fenced off");
    assert_eq!(sqlstate(&err), Some("28000"), "{err}");
}

/// A new directory holding pgshield's certificate for 127.0.0.1 (`c.crt`) and its key
/// (`c.key`).
fn with_server_certificate(tag: &str) -> std::path::PathBuf {
    let dir = common::unique_temp_dir(tag);
    let (cert, key) = pki().issue("127.0.0.1");
    std::fs::write(dir.join("c.crt"), cert).expect("write");
    std::fs::write(dir.join("c.key"), key).expect("write");
    dir
}

#[tokio::test]
async fn require_tls_per_user_refuses_plaintext_and_serves_tls() {
    common::create_role("acc_tls", "pw").await;
    let dir = with_server_certificate("acc-tls");
    let proxy = TestProxy::start(&format!(
        "[tls.client]\nmode = \"prefer\"\ncert = \"{}\"\nkey = \"{}\"\n{}",
        dir.join("c.crt").display(),
        dir.join("c.key").display(),
        "[users.acc_tls]\nauth = \"trust\"\nserver_password = \"pw\"\nrequire_tls = true\n"
    ))
    .await;
    let mut plain = raw::connect(proxy.addr).await;
    raw::send(
        &mut plain,
        &raw::startup(&[("user", "acc_tls"), ("database", "app")]),
    )
    .await;
    let (tag, body) = raw::read_message(&mut plain).await.expect("an error");
    assert_eq!((tag, raw::error_code(&body).as_str()), (b'E', "28000"));
    assert!(String::from_utf8_lossy(&body).contains("require_tls"));

    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(pki().ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut tcp = raw::connect(proxy.addr).await;
    raw::send(&mut tcp, &raw::request(80_877_103, b"")).await;
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut answer)
        .await
        .expect("S");
    assert_eq!(&answer, b"S");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("handshake");
    raw::send(
        &mut tls,
        &raw::startup(&[("user", "acc_tls"), ("database", "app")]),
    )
    .await;
    let (_, errors) = raw::until_ready(&mut tls).await;
    assert!(errors.is_empty(), "{errors:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn client_limits_per_user_and_per_database_give_53300_and_free_up() {
    common::create_role("acc_lim_user", "pw").await;
    common::create_role("acc_lim_db", "pw").await;
    let db = common::cluster();
    let proxy = TestProxy::start(&format!(
        "[databases.small]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\
         max_client_connections = 1\n{}{}",
        db.port(),
        role_config("acc_lim_user", "max_client_connections = 2\n"),
        role_config("acc_lim_db", ""),
    ))
    .await;
    let a = proxy.connect("acc_lim_user", "pw").await.expect("first");
    let _b = proxy.connect("acc_lim_user", "pw").await.expect("second");
    let err = proxy
        .connect("acc_lim_user", "pw")
        .await
        .err()
        .expect("third");
    assert_eq!(sqlstate(&err), Some("53300"), "{err}");
    assert!(message(&err).contains("role \"acc_lim_user\""), "{err}");
    drop(a);
    // The slot frees when the session ends.
    let mut again = None;
    for _ in 0..100 {
        if let Ok(c) = proxy.connect("acc_lim_user", "pw").await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a place came free");

    let mut small = proxy.config("acc_lim_db", "pw");
    small.dbname("small");
    let _first = common::connect(&small).await.expect("first on small");
    let err = common::connect(&small)
        .await
        .err()
        .expect("second on small");
    assert_eq!(sqlstate(&err), Some("53300"), "{err}");
    assert!(message(&err).contains("database \"small\""), "{err}");
    // Other databases are not limited by it.
    proxy
        .connect("acc_lim_db", "pw")
        .await
        .expect("app is not small");
}

#[tokio::test]
async fn max_db_connections_caps_backends_across_pools_and_idle_ones_make_way() {
    common::create_role("acc_dbmax_a", "pw").await;
    common::create_role("acc_dbmax_b", "pw").await;
    let proxy = TestProxy::start(&format!(
        "[pool]\nmax_size = 5\nborrow_timeout = \"10s\"\n\
         [databases.capped]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\
         max_db_connections = 2\n{}{}",
        common::cluster().port(),
        role_config("acc_dbmax_a", ""),
        role_config("acc_dbmax_b", ""),
    ))
    .await;
    let capped = |role: &str| {
        let mut c = proxy.config(role, "pw");
        c.dbname("capped");
        c
    };
    let admin = common::admin().await;
    // B logs in first (its pool's first login opens a backend to learn the server's
    // parameters), then A holds both places, each in a transaction.
    let b = common::connect(&capped("acc_dbmax_b"))
        .await
        .expect("b logs in");
    let a1 = common::connect(&capped("acc_dbmax_a")).await.expect("a1");
    let a2 = common::connect(&capped("acc_dbmax_a")).await.expect("a2");
    a1.client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("a1 begins");
    a2.client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("a2 begins");
    // B must wait: no third backend may open.
    let waiting = tokio::spawn(async move {
        let n: i32 = b
            .client
            .query_one("SELECT 42", &[])
            .await
            .expect("b's query runs once a place frees")
            .get(0);
        n
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "b did not wait");
    assert!(backends(&admin).await <= 2);
    // A's transactions end: its backends sit idle in its pool; one is closed for B.
    a1.client.batch_execute("COMMIT").await.expect("a1 commits");
    a2.client.batch_execute("COMMIT").await.expect("a2 commits");
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("b is served within 10 s")
        .expect("no panic");
    assert_eq!(answer, 42);
    assert!(backends(&admin).await <= 2);
}

/// Pools waiting for a place under `max_db_connections` are served in the order they
/// came (each used to step out of line and back in every 100 ms, so a later one could
/// go first, and an unlucky one wait out its borrow_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_waiting_under_max_db_connections_are_served_in_turn() {
    let roles = ["acc_fifo_a", "acc_fifo_b", "acc_fifo_c"];
    for role in roles {
        common::create_role(role, "pw").await;
    }
    let proxy = TestProxy::start(&format!(
        "[pool]\nborrow_timeout = \"20s\"\n\
         [databases.capped]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\
         max_db_connections = 1\n{}{}{}",
        common::cluster().port(),
        role_config(roles[0], ""),
        role_config(roles[1], ""),
        role_config(roles[2], ""),
    ))
    .await;
    let connect = |role: &str| {
        let mut c = proxy.config(role, "pw");
        c.dbname("capped");
        async move { common::connect(&c).await.expect("login") }
    };
    let holder = connect(roles[0]).await;
    let b = Arc::new(connect(roles[1]).await);
    let c = Arc::new(connect(roles[2]).await);
    for round in 0..4 {
        holder
            .client
            .batch_execute("BEGIN; SELECT 1")
            .await
            .expect("the holder takes the one place");
        // Alternately b then c, and c then b, join the line.
        let (first, second) = if round % 2 == 0 { (&b, &c) } else { (&c, &b) };
        let done = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (who, conn) in [(0, first), (1, second)] {
            let (conn, done) = (Arc::clone(conn), Arc::clone(&done));
            tasks.push(tokio::spawn(async move {
                conn.client.batch_execute("SELECT 1").await.expect("served");
                done.lock().unwrap().push(who);
            }));
            // (Time for the first to join the line on a loaded machine.)
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        holder.client.batch_execute("COMMIT").await.expect("commit");
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("served in time")
                .expect("no panic");
        }
        assert_eq!(
            *done.lock().unwrap(),
            [0, 1],
            "round {round}: served out of turn"
        );
    }
}

/// A client whose pool must open a backend under `max_db_connections` is not passed
/// over by the pool's busy clients: a backend of its pool given back is lent to it (it
/// used to go to the pool's next transaction, over and over, while the open waited out
/// its borrow_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_waiting_under_max_db_connections_takes_a_backend_its_pool_gives_back() {
    let (a, b) = ("acc_given_a", "acc_given_b");
    common::create_role(a, "pw").await;
    common::create_role(b, "pw").await;
    let proxy = TestProxy::start(&format!(
        "[pool]\nmax_size = 2\nborrow_timeout = \"20s\"\n\
         [databases.capped]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\
         max_db_connections = 2\n{}{}",
        common::cluster().port(),
        role_config(a, ""),
        role_config(b, ""),
    ))
    .await;
    let connect = |role: &str| {
        let mut c = proxy.config(role, "pw");
        c.dbname("capped");
        async move { common::connect(&c).await.expect("login") }
    };
    // B holds one of the two places; A's one backend is busy with a client that runs
    // transaction after transaction.
    let holder = connect(b).await;
    holder
        .client
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("b holds a place");
    // A's one backend is busy with a client running transaction after transaction;
    // `waiting` then needs a second backend and waits for a place under the database's
    // limit; then two more clients of A join the first, so that one of them always
    // waits for A's backend: it is never idle.
    let mut waiting = Some(connect(a).await);
    let busy: Vec<_> = futures_util::future::join_all((0..3).map(|_| connect(a))).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    let mut served = None;
    for (i, busy) in busy.into_iter().enumerate() {
        let stop = Arc::clone(&stop);
        loops.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // (Two at a time, pipelined: the next is there as the backend is given
                // back, ahead of the waiting open.)
                let (a, b) = futures_util::future::join(
                    busy.client.simple_query("SELECT 1"),
                    busy.client.simple_query("SELECT 1"),
                )
                .await;
                a.and(b).expect("busy");
                n += 2;
            }
            n
        }));
        if let Some(waiting) = waiting.take().filter(|_| i == 0) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            served = Some(tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(5),
                    waiting.client.batch_execute("SELECT 2"),
                )
                .await
            }));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let served = served.expect("spawned").await.expect("no panic");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut transactions = 0;
    for l in loops {
        transactions += l.await.expect("no panic");
    }
    assert!(transactions > 10, "the busy clients ran ({transactions})");
    served
        .expect("served while its pool's backend kept being given back")
        .expect("SELECT 2");
}

/// An idle backend closed to make way gives its place back only once its server process
/// has gone: PostgreSQL counts it against max_connections until then. Here it cannot go
/// (stopped), so the other pool waits for the place, up to the bound on that wait (2 s),
/// and closes no second backend meanwhile for the one place it needs.
#[tokio::test]
async fn a_backend_making_way_gives_its_place_back_once_its_server_has_exited() {
    common::create_role("acc_exit_a", "pw").await;
    common::create_role("acc_exit_b", "pw").await;
    let proxy = TestProxy::start(&format!(
        "[pool]\nborrow_timeout = \"10s\"\n\
         [databases.capped]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\
         max_db_connections = 2\n{}{}",
        common::cluster().port(),
        role_config("acc_exit_a", ""),
        role_config("acc_exit_b", ""),
    ))
    .await;
    let capped = |role: &str| {
        let mut c = proxy.config(role, "pw");
        c.dbname("capped");
        c
    };
    // A's pool opens two backends (two transactions at once), then both sit idle in it,
    // holding both places; their servers cannot exit.
    let (a1, a2) = (
        common::connect(&capped("acc_exit_a")).await.expect("a1"),
        common::connect(&capped("acc_exit_a")).await.expect("a2"),
    );
    let mut frozen = Vec::new();
    for a in [&a1, &a2] {
        a.client.batch_execute("BEGIN").await.expect("begin");
        let pid: i32 = a
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("a's backend")
            .get(0);
        frozen.push(pid);
    }
    for a in [&a1, &a2] {
        a.client.batch_execute("COMMIT").await.expect("commit");
    }
    let pool_a = proxy
        .shared
        .pools
        .all()
        .into_iter()
        .find(|p| p.name() == "capped/acc_exit_a")
        .expect("a's pool");
    assert_eq!(pool_a.status().open, 2);
    let frozen: Vec<_> = frozen.into_iter().map(common::Frozen::new).collect();
    let b_config = capped("acc_exit_b");
    let b = tokio::spawn(async move {
        let b = common::connect(&b_config).await.expect("b logs in");
        let n: i32 = b.client.query_one("SELECT 7", &[]).await.expect("b").get(0);
        n
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !b.is_finished(),
        "b got a backend while the one closed for it was still running"
    );
    let admin = common::admin().await;
    assert_eq!(common::backends_of(&admin, "acc_exit_b").await, 0);
    assert_eq!(
        pool_a.status().open,
        1,
        "one place is needed: one backend closed"
    );
    let answer = tokio::time::timeout(Duration::from_secs(10), b)
        .await
        .expect("b is served once the wait for the exit gives up")
        .expect("no panic");
    assert_eq!(answer, 7);
    drop(frozen);
}

/// Keeping `min_idle` open never closes another pool's backend for a place under
/// `max_db_connections` (as PgBouncer fills `min_pool_size`): only a client's borrow
/// makes way so. Otherwise two pools would take the places from each other every second.
#[tokio::test]
async fn min_idle_takes_only_a_free_place_under_max_db_connections() {
    common::create_role("acc_fill_a", "pw").await;
    common::create_role("acc_fill_b", "pw").await;
    let proxy = TestProxy::start(&format!(
        "[pool]\nmin_idle = 1\nborrow_timeout = \"10s\"\n\
         [databases.capped]\nhost = \"127.0.0.1\"\nport = {}\ndbname = \"postgres\"\n\
         max_db_connections = 2\n{}{}",
        common::cluster().port(),
        role_config("acc_fill_a", ""),
        role_config("acc_fill_b", ""),
    ))
    .await;
    let pool = |name: &str| {
        proxy
            .shared
            .pools
            .all()
            .into_iter()
            .find(|p| p.name() == format!("capped/{name}"))
            .expect("a pool")
    };
    let (pool_a, pool_b) = (pool("acc_fill_a"), pool("acc_fill_b"));
    // A's clients take both places (two transactions at once: B's min_idle backend, if
    // it has opened one, makes way), then leave them idle in A's pool.
    let capped = |role: &str| {
        let mut c = proxy.config(role, "pw");
        c.dbname("capped");
        c
    };
    let (a1, a2) = (
        common::connect(&capped("acc_fill_a")).await.expect("a1"),
        common::connect(&capped("acc_fill_a")).await.expect("a2"),
    );
    for a in [&a1, &a2] {
        a.client
            .batch_execute("BEGIN; SELECT 1")
            .await
            .expect("begin");
    }
    for a in [&a1, &a2] {
        a.client.batch_execute("COMMIT").await.expect("commit");
    }
    assert_eq!(pool_a.status().open, 2);
    // B's janitor wants one open and finds no free place: it leaves A's alone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (pool_a.status().open, pool_b.status().open),
        (2, 0),
        "B's min_idle took a place from A's idle backends"
    );
    // A client of B still gets a backend (an idle one of A's makes way for it).
    let b = common::connect(&capped("acc_fill_b")).await.expect("b");
    b.client
        .batch_execute("SELECT 1")
        .await
        .expect("b is served");
}

/// Backends of the two roles of the max_db_connections test.
async fn backends(admin: &tokio_postgres::Client) -> i64 {
    common::backends_of(admin, "acc_dbmax_a").await
        + common::backends_of(admin, "acc_dbmax_b").await
}

/// Clients on this machine over `listen.unix_socket_dir`: local, so they need no TLS (an
/// SSLRequest is answered `N`) and pass `allowed_cidrs` that admit a loopback address only;
/// cancel requests and the admin console work there; the socket file goes with pgshield.
#[tokio::test]
async fn clients_on_this_machine_can_use_the_unix_domain_socket() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    common::create_role("acc_unix", "pw").await;
    common::create_role("acc_unix_far", "pw").await;
    common::create_role("acc_unix_ops", "pw").await;
    let dir = with_server_certificate("acc-unix");
    let proxy = TestProxy::start(&format!(
        "[listen]\nunix_socket_dir = \"{dir}\"\nunix_socket_mode = \"0770\"\n\
         [tls.client]\nmode = \"require\"\ncert = \"{dir}/c.crt\"\nkey = \"{dir}/c.key\"\n{}{}{}\
         [admin]\nhttp_listen = \"\"\nusers = [\"acc_unix_ops\"]\n",
        role_config(
            "acc_unix",
            "allowed_cidrs = [\"127.0.0.1/32\"]\nrequire_tls = true\n"
        ),
        role_config("acc_unix_far", "allowed_cidrs = [\"10.0.0.0/8\"]\n"),
        role_config("acc_unix_ops", ""),
        dir = dir.display(),
    ))
    .await;
    let port = proxy.addr.port();
    let path = dir.join(format!(".s.PGSQL.{port}"));
    let meta = std::fs::symlink_metadata(&path).expect("the socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o770);
    let over_unix = |user: &str| {
        let mut c = tokio_postgres::Config::new();
        c.host_path(&dir)
            .port(port)
            .user(user)
            .password("pw")
            .dbname("app");
        c.connect_timeout(Duration::from_secs(30));
        c
    };

    // Over TCP, plaintext is refused (tls.client.mode = require); over the socket it is
    // what there is.
    let err = proxy
        .connect("acc_unix", "pw")
        .await
        .err()
        .expect("TLS required");
    assert_eq!(sqlstate(&err), Some("28000"), "{err}");
    let client = common::connect(&over_unix("acc_unix"))
        .await
        .expect("over the Unix-domain socket");
    let row = client
        .client
        .query_one("SELECT current_user::text, 1 + 1", &[])
        .await
        .expect("query");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("acc_unix".to_owned(), 2)
    );

    // A cancel request over the socket reaches the query.
    let token = client.client.cancel_token();
    let sleeper = tokio::spawn({
        let client = client.client;
        async move {
            let result = client.simple_query("SELECT pg_sleep(10)").await.map(drop);
            (client, result)
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let (client, result) = tokio::time::timeout(Duration::from_secs(5), sleeper)
        .await
        .expect("cancelled within 5 s")
        .expect("task");
    let err = result.expect_err("cancelled");
    assert_eq!(sqlstate(&err), Some("57014"), "{err}");
    client.simple_query("SELECT 1").await.expect("still usable");

    // The console is open to local clients; the socket's clients show as "unix".
    let mut console = over_unix("acc_unix_ops");
    console.dbname("pgshield");
    let console = common::connect(&console).await.expect("admin login");
    let rows = console
        .client
        .simple_query("SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS");
    let ours: Vec<_> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("user") == Some("acc_unix") => {
                Some(["addr", "port", "local_addr", "local_port"].map(|c| r.get(c)))
            }
            _ => None,
        })
        .collect();
    let port_text = port.to_string();
    let expected = [Some("unix"), Some(port_text.as_str())];
    assert_eq!(
        ours,
        vec![[expected[0], expected[1], expected[0], expected[1]]]
    );

    // A user limited to addresses elsewhere is not let in over the socket.
    let err = common::connect(&over_unix("acc_unix_far"))
        .await
        .err()
        .expect("not local to 10.0.0.0/8");
    assert_eq!(sqlstate(&err), Some("28000"), "{err}");
    assert!(message(&err).contains("host \"[local]\""), "{err}");

    // An SSLRequest over the socket gets N, and the startup goes on in the clear.
    let mut raw = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect");
    raw::send(&mut raw, &raw::request(80_877_103, b"")).await;
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut raw, &mut answer)
        .await
        .expect("an answer");
    assert_eq!(&answer, b"N");
    raw::send(
        &mut raw,
        &raw::startup(&[("user", "acc_unix"), ("database", "app")]),
    )
    .await;
    let (tag, _) = raw::read_message(&mut raw).await.expect("a message");
    assert_eq!(tag, b'R', "authentication begins");

    drop((raw, console, client));
    proxy.stop().await;
    assert!(!path.exists(), "the socket file is removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}
