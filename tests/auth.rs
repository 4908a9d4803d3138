//! Client login: each auth method, wrong passwords, unknown users and databases, and
//! startup packets a driver would never send.

mod common;

use common::{raw, sqlstate, TestProxy};

/// Users for these tests. Each test uses its own role names, so the roles never clash.
async fn proxy_with_users(roles: &[(&str, &str)], users_toml: &str) -> TestProxy {
    for (role, password) in roles {
        common::create_role(role, password).await;
    }
    TestProxy::start(&format!("[pool]\nmax_size = 2\n\n{users_toml}")).await
}

#[tokio::test]
async fn scram_user_with_the_right_password_logs_in() {
    let proxy = proxy_with_users(
        &[("auth_scram", "pw-scram")],
        "[users.auth_scram]\npassword = \"pw-scram\"\n",
    )
    .await;
    let conn = proxy
        .connect("auth_scram", "pw-scram")
        .await
        .expect("login");
    let user: String = conn
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "auth_scram");
}

/// A SCRAM exchange by hand, as a driver runs it: the server's signature
/// (AuthenticationSASLFinal) comes first, then the welcome (AuthenticationOk, …,
/// ReadyForQuery), or a refusal after it (a database pgshield does not serve).
#[tokio::test]
async fn a_scram_login_ends_with_the_servers_signature_then_its_welcome_or_refusal() {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let proxy = proxy_with_users(
        &[("auth_scram_raw", "pw-raw")],
        "[users.auth_scram_raw]\npassword = \"pw-raw\"\n",
    )
    .await;
    let auth_code = |body: &[u8]| i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    for (database, welcomed) in [("app", true), ("auth_no_such_db", false)] {
        let mut tcp = raw::connect(proxy.addr).await;
        let startup = raw::startup(&[("user", "auth_scram_raw"), ("database", database)]);
        raw::send(&mut tcp, &startup).await;
        let (tag, body) = raw::read_message(&mut tcp)
            .await
            .expect("AuthenticationSASL");
        assert_eq!((tag, auth_code(&body)), (b'R', 10));
        let mut scram = ScramSha256::new(b"pw-raw", ChannelBinding::unsupported());
        let mut initial = b"SCRAM-SHA-256\0".to_vec();
        initial.extend_from_slice(&(scram.message().len() as i32).to_be_bytes());
        initial.extend_from_slice(scram.message());
        raw::send(&mut tcp, &raw::message(b'p', &initial)).await;
        let (tag, body) = raw::read_message(&mut tcp).await.expect("SASLContinue");
        assert_eq!((tag, auth_code(&body)), (b'R', 11));
        scram.update(&body[4..]).expect("server-first");
        raw::send(&mut tcp, &raw::message(b'p', scram.message())).await;
        let (tag, body) = raw::read_message(&mut tcp).await.expect("SASLFinal");
        assert_eq!((tag, auth_code(&body)), (b'R', 12), "{database}");
        scram.finish(&body[4..]).expect("the server's signature");
        let (tag, body) = raw::read_message(&mut tcp).await.expect("what follows");
        if welcomed {
            assert_eq!((tag, auth_code(&body)), (b'R', 0));
            let (tags, errors) = raw::until_ready(&mut tcp).await;
            assert!(
                tags.ends_with('Z') && errors.is_empty(),
                "{tags} {errors:?}"
            );
        } else {
            assert_eq!((tag, raw::error_code(&body).as_str()), (b'E', "3D000"));
            assert!(raw::closed(&mut tcp).await);
        }
    }
}

#[tokio::test]
async fn md5_user_with_the_right_password_logs_in() {
    let proxy = proxy_with_users(
        &[("auth_md5", "pw-md5")],
        "[users.auth_md5]\nauth = \"md5\"\npassword = \"pw-md5\"\n",
    )
    .await;
    let conn = proxy.connect("auth_md5", "pw-md5").await.expect("login");
    conn.client.simple_query("SELECT 1").await.expect("query");
}

#[tokio::test]
async fn a_scram_verifier_in_config_needs_no_plaintext_for_clients() {
    let verifier = postgres_protocol::password::scram_sha_256(b"pw-verifier");
    let proxy = proxy_with_users(
        &[("auth_verifier", "pw-verifier")],
        &format!(
            "[users.auth_verifier]\npassword = \"{verifier}\"\nserver_password = \"pw-verifier\"\n"
        ),
    )
    .await;
    proxy
        .connect("auth_verifier", "pw-verifier")
        .await
        .expect("login");
    let err = proxy
        .connect("auth_verifier", "wrong")
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), Some("28P01"));
}

#[tokio::test]
async fn wrong_passwords_get_28p01_for_every_method() {
    let proxy = proxy_with_users(
        &[("auth_wrong_s", "right"), ("auth_wrong_m", "right")],
        "[users.auth_wrong_s]\npassword = \"right\"\n[users.auth_wrong_m]\nauth = \"md5\"\npassword = \"right\"\n",
    )
    .await;
    for user in ["auth_wrong_s", "auth_wrong_m"] {
        let err = proxy.connect(user, "wrong").await.err().expect("refused");
        assert_eq!(sqlstate(&err), Some("28P01"), "{user}: {err}");
    }
}

#[tokio::test]
async fn an_unknown_user_is_refused_exactly_like_a_wrong_password() {
    let proxy = proxy_with_users(
        &[("auth_known", "pw")],
        "[users.auth_known]\npassword = \"pw\"\n",
    )
    .await;
    let unknown = proxy
        .connect("auth_nobody", "pw")
        .await
        .err()
        .expect("refused");
    let wrong = proxy
        .connect("auth_known", "nope")
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&unknown), Some("28P01"));
    let (unknown, wrong) = (unknown.as_db_error().unwrap(), wrong.as_db_error().unwrap());
    assert_eq!(
        unknown.message().replace("auth_nobody", "X"),
        wrong.message().replace("auth_known", "X")
    );
}

#[tokio::test]
async fn an_unknown_database_gets_3d000() {
    let proxy =
        proxy_with_users(&[("auth_db", "pw")], "[users.auth_db]\npassword = \"pw\"\n").await;
    let mut config = proxy.config("auth_db", "pw");
    config.dbname("no_such_db");
    let err = common::connect(&config).await.err().expect("refused");
    assert_eq!(sqlstate(&err), Some("3D000"), "{err}");
}

#[tokio::test]
async fn a_trust_user_needs_no_password() {
    let proxy = proxy_with_users(
        &[("auth_trust", "backend-pw")],
        "[users.auth_trust]\nauth = \"trust\"\nserver_password = \"backend-pw\"\n",
    )
    .await;
    let conn = proxy
        .connect("auth_trust", "anything")
        .await
        .expect("login");
    conn.client.simple_query("SELECT 1").await.expect("query");
}

#[tokio::test]
async fn malformed_and_oversized_startup_packets_are_refused_and_others_carry_on() {
    let proxy = proxy_with_users(
        &[("auth_fuzz", "pw")],
        "[users.auth_fuzz]\npassword = \"pw\"\n",
    )
    .await;
    let good = proxy.connect("auth_fuzz", "pw").await.expect("login");

    // A length far over PostgreSQL's 10,000-byte limit: refused before anything is read.
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &[0x00, 0x10, 0x00, 0x00, 0, 3, 0, 0]).await;
    let (tag, body) = raw::read_message(&mut s)
        .await
        .expect("an error, not a dropped socket");
    assert_eq!((tag, raw::error_code(&body).as_str()), (b'E', "08P01"));
    assert!(raw::closed(&mut s).await);

    // A length below the minimum.
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &[0, 0, 0, 2]).await;
    let (tag, body) = raw::read_message(&mut s).await.expect("an error");
    assert_eq!((tag, raw::error_code(&body).as_str()), (b'E', "08P01"));

    // A parameter list without its terminator.
    let mut packet = raw::startup(&[("user", "auth_fuzz")]);
    packet.pop();
    let len = (packet.len() as i32).to_be_bytes();
    packet[..4].copy_from_slice(&len);
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &packet).await;
    let (tag, body) = raw::read_message(&mut s).await.expect("an error");
    assert_eq!((tag, raw::error_code(&body).as_str()), (b'E', "08P01"));

    // No user name.
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &raw::startup(&[("database", "app")])).await;
    let (_, body) = raw::read_message(&mut s).await.expect("an error");
    assert_eq!(raw::error_code(&body), "28000");

    // A protocol version from another era.
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &raw::request(2 << 16, b"user\0x\0\0")).await;
    let (_, body) = raw::read_message(&mut s).await.expect("an error");
    assert_eq!(raw::error_code(&body), "0A000");

    // Garbage after connecting, then a hang-up.
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, b"GET / HTTP/1.1\r\n\r\n").await;
    drop(s);

    // The client that logged in before is unaffected, and new ones still get in.
    let one: i32 = good.client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    proxy
        .connect("auth_fuzz", "pw")
        .await
        .expect("new login after the garbage");
}

#[tokio::test]
async fn ssl_and_gss_requests_are_declined_and_the_login_continues() {
    let proxy = proxy_with_users(
        &[("auth_ssl", "pw")],
        "[users.auth_ssl]\nauth = \"trust\"\nserver_password = \"pw\"\n",
    )
    .await;
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &raw::request(80_877_104, b"")).await;
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut answer)
        .await
        .unwrap();
    assert_eq!(&answer, b"N");
    raw::send(&mut s, &raw::request(80_877_103, b"")).await;
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut answer)
        .await
        .unwrap();
    assert_eq!(&answer, b"N");
    raw::send(
        &mut s,
        &raw::startup(&[("user", "auth_ssl"), ("database", "app")]),
    )
    .await;
    let (tag, body) = raw::read_message(&mut s).await.expect("AuthenticationOk");
    assert_eq!((tag, &body[..]), (b'R', &[0u8, 0, 0, 0][..]));
    let mut saw = Vec::new();
    while let Some((tag, _)) = raw::read_message(&mut s).await {
        saw.push(tag);
        if tag == b'Z' {
            break;
        }
    }
    assert!(saw.contains(&b'S') && saw.contains(&b'K'), "{saw:?}");
}

#[tokio::test]
async fn a_newer_minor_protocol_version_is_negotiated_down_to_3_0() {
    let proxy = proxy_with_users(
        &[("auth_v32", "pw")],
        "[users.auth_v32]\nauth = \"trust\"\nserver_password = \"pw\"\n",
    )
    .await;
    let mut s = raw::connect(proxy.addr).await;
    raw::send(
        &mut s,
        &raw::request(
            (3 << 16) | 2,
            b"user\0auth_v32\0database\0app\0_pq_.compression\0on\0\0",
        ),
    )
    .await;
    let (tag, body) = raw::read_message(&mut s)
        .await
        .expect("NegotiateProtocolVersion");
    assert_eq!(tag, b'v');
    assert_eq!(&body[..8], &[0, 3, 0, 0, 0, 0, 0, 1]);
    assert_eq!(&body[8..], b"_pq_.compression\0");
    let (tag, _) = raw::read_message(&mut s).await.expect("AuthenticationOk");
    assert_eq!(tag, b'R');
}

#[tokio::test]
async fn a_cancel_request_is_accepted_and_closed_cleanly() {
    let proxy = proxy_with_users(
        &[("auth_cancel", "pw")],
        "[users.auth_cancel]\npassword = \"pw\"\n",
    )
    .await;
    let mut s = raw::connect(proxy.addr).await;
    raw::send(&mut s, &raw::request(80_877_102, &[0, 0, 0, 1, 0, 0, 0, 2])).await;
    assert!(raw::closed(&mut s).await);
}

#[tokio::test]
async fn a_silent_client_is_closed_after_client_login_timeout() {
    common::create_role("auth_silent", "pw").await;
    let proxy = TestProxy::start(
        "[listen]\nclient_login_timeout = \"1s\"\n[users.auth_silent]\npassword = \"pw\"\n",
    )
    .await;
    let mut s = raw::connect(proxy.addr).await;
    let started = std::time::Instant::now();
    assert!(raw::closed(&mut s).await, "closed within 10 s");
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
}

/// Runs `SELECT current_user` through a fresh proxy for one user section.
async fn logs_in_to_the_server(
    users_toml: &str,
    user: &str,
    password: &str,
) -> Result<String, String> {
    let proxy = TestProxy::start(&format!("[pool]\nmax_size = 1\n\n{users_toml}")).await;
    let conn = proxy
        .connect(user, password)
        .await
        .map_err(|e| e.to_string())?;
    let row = conn
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn pgshield_logs_in_to_md5_servers() {
    common::create_md5_role("be_md5", "pw-md5").await;
    let users = "[users.be_md5]\nauth = \"md5\"\npassword = \"pw-md5\"\n";
    assert_eq!(
        logs_in_to_the_server(users, "be_md5", "pw-md5")
            .await
            .as_deref(),
        Ok("be_md5")
    );
}

#[tokio::test]
async fn an_md5_hash_in_config_serves_both_clients_and_an_md5_server() {
    common::create_md5_role("be_md5hash", "pw-hash").await;
    let hash = postgres_protocol::password::md5(b"pw-hash", "be_md5hash");
    let users = format!("[users.be_md5hash]\nauth = \"md5\"\npassword = \"{hash}\"\n");
    assert_eq!(
        logs_in_to_the_server(&users, "be_md5hash", "pw-hash")
            .await
            .as_deref(),
        Ok("be_md5hash")
    );
}

#[tokio::test]
async fn pgshield_logs_in_to_servers_that_ask_for_a_cleartext_password() {
    common::create_role("be_password", "pw-clear").await;
    let users = "[users.be_password]\npassword = \"pw-clear\"\n";
    assert_eq!(
        logs_in_to_the_server(users, "be_password", "pw-clear")
            .await
            .as_deref(),
        Ok("be_password")
    );
}

#[tokio::test]
async fn pgshield_logs_in_to_trusting_servers_without_any_password() {
    common::create_role("be_trust", "unused").await;
    let users = "[users.be_trust]\nauth = \"trust\"\n";
    assert_eq!(
        logs_in_to_the_server(users, "be_trust", "")
            .await
            .as_deref(),
        Ok("be_trust")
    );
}

#[tokio::test]
async fn a_wrong_server_password_is_reported_with_the_servers_code() {
    common::create_role("be_wrong", "right").await;
    let proxy =
        TestProxy::start("[users.be_wrong]\npassword = \"right\"\nserver_password = \"wrong\"\n")
            .await;
    // The first login needs a backend (to learn the server's parameters): it is refused
    // with the server's own 28P01, and the message says it was pgshield's login.
    let err = proxy
        .connect("be_wrong", "right")
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    let message = err.as_db_error().unwrap().message();
    assert!(
        message.contains("pgshield could not log in to the server for pool app/be_wrong"),
        "{message}"
    );
}

#[tokio::test]
async fn a_verifier_the_server_does_not_hold_gets_a_clear_error_not_a_wrong_password() {
    common::create_role("be_verifier_only", "pw").await;
    // The same password, but another salt: the keys of the client's login do not fit
    // the server's verifier.
    let verifier = postgres_protocol::password::scram_sha_256(b"pw");
    let proxy = TestProxy::start(&format!(
        "[users.be_verifier_only]\npassword = \"{verifier}\"\n"
    ))
    .await;
    let err = proxy
        .connect("be_verifier_only", "pw")
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    let message = err.as_db_error().unwrap().message();
    assert!(message.contains("server_password"), "{message}");
}

#[tokio::test]
async fn passwords_can_come_from_files() {
    common::create_role("auth_files", "from-a-file").await;
    let dir = common::unique_temp_dir("auth-files");
    std::fs::write(dir.join("client"), "from-a-file\n").expect("write");
    std::fs::write(dir.join("server"), "from-a-file").expect("write");
    let proxy = TestProxy::start(&format!(
        "[users.auth_files]\npassword_file = \"{}\"\nserver_password_file = \"{}\"\n",
        dir.join("client").display(),
        dir.join("server").display()
    ))
    .await;
    let conn = proxy
        .connect("auth_files", "from-a-file")
        .await
        .expect("the password from the file");
    conn.client.simple_query("SELECT 1").await.expect("query");
    assert!(proxy.connect("auth_files", "from-a-fil").await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_rotating_server_password_command_keeps_new_backends_working() {
    common::create_role("auth_rotate", "token-1").await;
    let dir = common::unique_temp_dir("auth-rotate");
    let token = dir.join("token");
    std::fs::write(&token, "token-1\n").expect("write");
    // The answer is cached for an hour: the rotation is noticed because the server
    // refuses the old token.
    let proxy = TestProxy::start(&format!(
        "[pool]\nmax_size = 1\n[users.auth_rotate]\nauth = \"trust\"\n\
         server_password_command = \"cat '{}'\"\nserver_password_ttl = \"1h\"\n",
        token.display()
    ))
    .await;
    let conn = proxy.connect("auth_rotate", "").await.expect("login");
    let pid_of = |row: tokio_postgres::Row| row.get::<_, i32>(0);
    let first = pid_of(
        conn.client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("first backend"),
    );
    let admin = common::admin().await;
    admin
        .batch_execute("ALTER ROLE auth_rotate PASSWORD 'token-2'")
        .await
        .expect("rotate");
    std::fs::write(&token, "token-2\n").expect("write");
    // The idle backend goes away; the next transaction needs a new one.
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .await
        .expect("terminate");
    while common::backends_of(&admin, "auth_rotate").await > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let second = pid_of(
        conn.client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("a new backend with the rotated token"),
    );
    assert_ne!(first, second);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A password command slower than a health check's limit (an `aws rds
/// generate-db-auth-token` on a small container) neither fails the check (the host would
/// be taken for down, and with it the database's primary) nor is killed by it: its run
/// serves every connection waiting for it, whoever gives up.
#[tokio::test]
async fn a_password_command_slower_than_a_health_check_is_not_a_host_down() {
    common::create_role("auth_slowcmd", "slow-token").await;
    let proxy = TestProxy::start(&format!(
        "[pool]\nhealth_check_timeout = \"1s\"\nhealth_check_interval = \"1s\"\n\
         borrow_timeout = \"20s\"\n\
         [databases.slowpw]\nhosts = [\"127.0.0.1:{}\"]\ndbname = \"postgres\"\n\
         [users.auth_slowcmd]\nauth = \"trust\"\n\
         server_password_command = \"sleep 2; echo slow-token\"\nserver_password_ttl = \"0s\"\n",
        common::cluster().port()
    ))
    .await;
    // (Never cached: each check's connection runs the command. Let a few checks run.)
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut config = proxy.config("auth_slowcmd", "");
    config.dbname("slowpw");
    let started = std::time::Instant::now();
    let conn = common::connect(&config).await.expect("login");
    conn.client
        .simple_query("SELECT 1")
        .await
        .expect("served: the host is up, the command's answer used");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let cluster = proxy
        .shared
        .pools
        .clusters()
        .into_iter()
        .find(|c| c.database == "slowpw")
        .expect("its hosts");
    assert!(
        cluster.status().iter().all(|h| h.up),
        "no host taken for down"
    );
}

/// The password PostgreSQL stores for `role` (its SCRAM verifier, or md5 hash).
async fn stored_verifier(role: &str) -> String {
    common::admin()
        .await
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role],
        )
        .await
        .expect("verifier")
        .get(0)
}

#[tokio::test]
async fn the_servers_own_verifier_in_config_is_enough_to_log_in_both_ways() {
    common::create_role("auth_passthrough", "pw-pass").await;
    let verifier = stored_verifier("auth_passthrough").await;
    // No server_password: pgshield logs in to the server with the keys of the client's
    // own SCRAM login.
    let proxy = TestProxy::start(&format!(
        "[users.auth_passthrough]\npassword = \"{verifier}\"\n"
    ))
    .await;
    let conn = proxy
        .connect("auth_passthrough", "pw-pass")
        .await
        .expect("login and passthrough to the server");
    let user: String = conn
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(user, "auth_passthrough");
}

/// PgBouncer's userlist.txt as `auth.file`: a SCRAM verifier copied from the server (no
/// password anywhere: the client's own login opens the backend), an md5 hash, a
/// plaintext password; a wrong password is refused as for any user; a user added to the
/// file logs in after a reload.
#[tokio::test]
async fn users_of_a_pgbouncer_auth_file_log_in_and_a_reload_reads_it_again() {
    common::create_role("af_scram", "pw-scram").await;
    common::create_md5_role("af_md5", "pw-md5").await;
    common::create_role("af_plain", "pw-plain").await;
    common::create_role("af_late", "pw-late").await;
    let verifier = stored_verifier("af_scram").await;
    let hash = postgres_protocol::password::md5(b"pw-md5", "af_md5");
    let dir = common::unique_temp_dir("auth-file");
    let file = dir.join("userlist.txt");
    let listed = format!(
        ";; as PgBouncer's mkauth writes it\n\"af_scram\" \"{verifier}\"\n\
         \"af_md5\" \"{hash}\"\n\"af_plain\" \"pw-plain\"\n"
    );
    std::fs::write(&file, &listed).expect("write");
    let proxy = TestProxy::start(&format!(
        "[pool]\nmax_size = 2\n[auth]\nfile = \"{}\"\n\
         [admin]\nhttp_listen = \"\"\nusers = [\"af_plain\"]\n",
        file.display()
    ))
    .await;
    // A listed user may be an admin, and the console lists the file's users.
    let mut console = proxy.config("af_plain", "pw-plain");
    console.dbname("pgshield");
    let console = common::connect(&console).await.expect("admin login");
    let users: Vec<String> = console
        .client
        .simple_query("SHOW USERS")
        .await
        .expect("SHOW USERS")
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("name").map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(users, ["af_md5", "af_plain", "af_scram"]);
    for (user, password) in [
        ("af_scram", "pw-scram"),
        ("af_md5", "pw-md5"),
        ("af_plain", "pw-plain"),
    ] {
        // As PgBouncer makes them: a listed user's pool at its first login.
        assert!(proxy.shared.pools.get("app", user).is_none(), "{user}");
        let conn = proxy
            .connect(user, password)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:?}"));
        let current: String = conn
            .client
            .query_one("SELECT current_user::text", &[])
            .await
            .expect("query")
            .get(0);
        assert_eq!(current, user);
        assert!(proxy.shared.pools.get("app", user).is_some(), "{user}");
        let err = proxy.connect(user, "wrong").await.err().expect("wrong");
        assert_eq!(sqlstate(&err), Some("28P01"), "{user}: {err}");
    }
    let err = proxy
        .connect("af_late", "pw-late")
        .await
        .err()
        .expect("not yet listed");
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    std::fs::write(&file, format!("{listed}\"af_late\" \"pw-late\"\n")).expect("write");
    proxy.shared.reload().expect("reload");
    let conn = proxy
        .connect("af_late", "pw-late")
        .await
        .expect("listed since the reload");
    conn.client.simple_query("SELECT 1").await.expect("query");

    // A password rotated in the file reaches the pool of a client logged in before: the
    // backends it opens from then on log in with the new one.
    let before = proxy.connect("af_plain", "pw-plain").await.expect("login");
    before.client.simple_query("SELECT 1").await.expect("query");
    common::admin()
        .await
        .batch_execute("ALTER ROLE af_plain PASSWORD 'pw-rotated'")
        .await
        .expect("rotate");
    let rotated = listed.replace("\"pw-plain\"", "\"pw-rotated\"");
    std::fs::write(&file, format!("{rotated}\"af_late\" \"pw-late\"\n")).expect("write");
    proxy.shared.reload().expect("reload");
    console
        .client
        .simple_query("RECONNECT")
        .await
        .expect("RECONNECT");
    let user: String = before
        .client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("a new backend, logged in with the rotated password")
        .get(0);
    assert_eq!(user, "af_plain");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With only `auth.file` users, a listed user with a password runs the health checks: a
/// host whose role is to be found out is probed before any client logs in.
#[tokio::test]
async fn a_listed_user_with_a_password_runs_the_health_checks() {
    common::create_role("af_monitor", "pw-monitor").await;
    let dir = common::unique_temp_dir("auth-file-monitor");
    let file = dir.join("userlist.txt");
    std::fs::write(&file, "\"af_monitor\" \"pw-monitor\"\n").expect("write");
    let proxy = TestProxy::start_with_databases(
        &format!(
            "[databases.app]\nhosts = [\"127.0.0.1:{}\"]\nrole = \"auto\"\ndbname = \"postgres\"\n",
            common::cluster().port()
        ),
        &format!(
            "[pool]\nhealth_check_interval = \"200ms\"\n[auth]\nfile = \"{}\"\n",
            file.display()
        ),
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let roles: Vec<_> = proxy
            .shared
            .pools
            .clusters()
            .into_iter()
            .flat_map(|c| c.status())
            .map(|h| h.role)
            .collect();
        if roles == [pgshield::pool::cluster::Role::Primary] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never probed: {roles:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The console's PAUSE holds pools made while it lasts too: a user of `auth.file` whose
/// first login comes during the PAUSE waits for the RESUME like everyone else, as in
/// PgBouncer (which pauses by database, not by pool): its login too, which needs a
/// backend to learn the server's parameters, and PAUSE keeps none open.
#[tokio::test]
async fn a_pool_made_during_a_pause_is_paused_until_resume() {
    common::create_role("ap_ops", "pw-ops").await;
    common::create_role("ap_late", "pw-late").await;
    let dir = common::unique_temp_dir("auth-pause");
    let file = dir.join("userlist.txt");
    std::fs::write(&file, "\"ap_ops\" \"pw-ops\"\n\"ap_late\" \"pw-late\"\n").expect("write");
    let proxy = TestProxy::start(&format!(
        "[pool]\nmax_size = 2\n[auth]\nfile = \"{}\"\n\
         [admin]\nhttp_listen = \"\"\nusers = [\"ap_ops\"]\n",
        file.display()
    ))
    .await;
    let mut console = proxy.config("ap_ops", "pw-ops");
    console.dbname("pgshield");
    let console = common::connect(&console).await.expect("admin login");
    console.client.simple_query("PAUSE").await.expect("PAUSE");
    assert!(proxy.shared.pools.get("app", "ap_late").is_none());
    let late = proxy.config("ap_late", "pw-late");
    let query = tokio::spawn(async move {
        let late = common::connect(&late).await.expect("login");
        late.client.simple_query("SELECT 1").await.map(|_| late)
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!query.is_finished(), "ran during the PAUSE");
    let admin = common::admin().await;
    assert_eq!(common::backends_of(&admin, "ap_late").await, 0);
    console.client.simple_query("RESUME").await.expect("RESUME");
    let late = tokio::time::timeout(std::time::Duration::from_secs(10), query)
        .await
        .expect("runs after the RESUME")
        .expect("task")
        .expect("query");
    late.client.simple_query("SELECT 2").await.expect("and on");
    std::fs::remove_dir_all(&dir).ok();
}
