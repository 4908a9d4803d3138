//! TLS on both sides: psql (libpq) clients with sslmode require / verify-full, plaintext
//! refused in `require` mode, direct TLS with ALPN, client certificates, a certificate
//! replaced on disk, and backends checked with verify-ca / verify-full against the
//! harness cluster (which runs with ssl = on and a certificate from the test CA).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{pki, raw, TestPki, TestProxy};
use tokio::net::TcpStream;

/// A directory holding PEM files for one test.
struct Files(PathBuf);

impl Files {
    fn new(tag: &str) -> Files {
        Files(common::unique_temp_dir(tag))
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write PEM");
        // libpq refuses a private key others can read.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        path
    }

    /// A certificate and key from `ca` for 127.0.0.1, and `ca`'s own certificate.
    fn server_cert(&self, ca: &TestPki) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = ca.issue("127.0.0.1");
        (
            self.write("server.crt", &cert),
            self.write("server.key", &key),
            self.write("ca.crt", &ca.ca_pem),
        )
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The role `role` (password "pw"), a certificate for pgshield from the test CA, and a
/// proxy with client TLS in `mode`; `user` is the role's `[users.*]` body, `extra` more
/// `[tls.client]` keys. Returns the files (the test CA is `ca.crt`) and the proxy.
async fn client_tls_proxy(role: &str, mode: &str, extra: &str, user: &str) -> (Files, TestProxy) {
    common::create_role(role, "pw").await;
    let files = Files::new(role);
    let (cert, key, _) = files.server_cert(pki());
    let proxy = TestProxy::start(&format!(
        "{}{extra}[users.{role}]\n{user}\n",
        client_tls(mode, &cert, &key)
    ))
    .await;
    (files, proxy)
}

const PASSWORD: &str = "password = \"pw\"";
const TRUST: &str = "auth = \"trust\"\nserver_password = \"pw\"";

fn client_tls(mode: &str, cert: &Path, key: &Path) -> String {
    format!(
        "[tls.client]\nmode = \"{mode}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// Runs `psql` with a libpq connection string and `-c` commands: Ok(stdout) or Err(stderr).
async fn psql(conninfo: String, password: &str, commands: &[&str]) -> Result<String, String> {
    let bin = common::cluster().bindir().join("psql");
    let mut cmd = std::process::Command::new(bin);
    cmd.arg(conninfo)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("psql task")
        .expect("psql runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn conninfo(proxy: &TestProxy, user: &str, extra: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} dbname=app {extra}",
        proxy.addr.port()
    )
}

#[tokio::test]
async fn psql_connects_with_require_and_verify_full_and_plaintext_still_works_in_prefer() {
    let (files, proxy) = client_tls_proxy("tls_psql", "prefer", "", PASSWORD).await;
    let ca = files.0.join("ca.crt");
    for sslmode in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-full sslrootcert={}", ca.display()),
    ] {
        let out = psql(
            conninfo(&proxy, "tls_psql", &sslmode),
            "pw",
            &["\\conninfo", "SELECT 'ok'"],
        )
        .await
        .unwrap_or_else(|e| panic!("{sslmode}: {e}"));
        assert!(out.contains("SSL connection"), "{sslmode}: {out}");
        assert!(out.contains("TLSv1.3"), "{sslmode}: {out}");
        assert!(out.trim_end().ends_with("ok"), "{sslmode}: {out}");
    }
    let out = psql(
        conninfo(&proxy, "tls_psql", "sslmode=disable"),
        "pw",
        &["\\conninfo", "SELECT 'plain'"],
    )
    .await
    .expect("plaintext in prefer mode");
    assert!(!out.contains("SSL connection"), "{out}");
    // A client that trusts another CA does not accept pgshield's certificate.
    let other = TestPki::new("another CA");
    let other_ca = files.write("other-ca.crt", &other.ca_pem);
    let err = psql(
        conninfo(
            &proxy,
            "tls_psql",
            &format!("sslmode=verify-full sslrootcert={}", other_ca.display()),
        ),
        "pw",
        &["SELECT 1"],
    )
    .await
    .expect_err("an untrusted certificate");
    assert!(err.contains("certificate verify failed"), "{err}");
}

#[tokio::test]
async fn scram_channel_binding_works_through_pgshield_and_is_required_when_asked() {
    let (files, proxy) = client_tls_proxy("tls_cb", "prefer", "", PASSWORD).await;
    let ca = files.0.join("ca.crt");
    let verify = format!("sslmode=verify-full sslrootcert={}", ca.display());
    let out = psql(
        conninfo(
            &proxy,
            "tls_cb",
            &format!("{verify} channel_binding=require"),
        ),
        "pw",
        &["SELECT 'bound'"],
    )
    .await
    .expect("SCRAM-SHA-256-PLUS over TLS");
    assert_eq!(out.trim(), "bound");
    let err = psql(
        conninfo(
            &proxy,
            "tls_cb",
            &format!("{verify} channel_binding=require"),
        ),
        "wrong",
        &["SELECT 1"],
    )
    .await
    .expect_err("a wrong password still fails");
    assert!(err.contains("password authentication failed"), "{err}");
    // Without TLS there is nothing to bind to: libpq refuses to go on.
    let err = psql(
        conninfo(&proxy, "tls_cb", "sslmode=disable channel_binding=require"),
        "pw",
        &["SELECT 1"],
    )
    .await
    .expect_err("no binding without TLS");
    assert!(err.contains("channel binding"), "{err}");
}

#[tokio::test]
async fn require_mode_refuses_plaintext_with_28000_and_serves_tls() {
    let (_files, proxy) = client_tls_proxy("tls_require", "require", "", PASSWORD).await;
    let mut plain = raw::connect(proxy.addr).await;
    raw::send(
        &mut plain,
        &raw::startup(&[("user", "tls_require"), ("database", "app")]),
    )
    .await;
    let (tag, body) = raw::read_message(&mut plain).await.expect("an error");
    assert_eq!(tag, b'E');
    assert_eq!(raw::error_code(&body), "28000");
    assert!(String::from_utf8_lossy(&body).contains("only TLS"));
    assert!(raw::closed(&mut plain).await);

    let err = psql(
        conninfo(&proxy, "tls_require", "sslmode=disable"),
        "pw",
        &["SELECT 1"],
    )
    .await
    .expect_err("plaintext refused");
    assert!(err.contains("only TLS"), "{err}");
    let out = psql(
        conninfo(&proxy, "tls_require", "sslmode=require"),
        "pw",
        &["SELECT 40 + 2"],
    )
    .await
    .expect("TLS accepted");
    assert_eq!(out.trim(), "42");
}

/// A rustls client trusting `ca`, offering `alpn`.
fn tls_connector(ca: &TestPki, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = ca.ca_pem.as_bytes();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pem) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Direct TLS (PostgreSQL 17's sslnegotiation=direct): the ClientHello comes first.
async fn direct_tls(
    proxy: &TestProxy,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = raw::connect(proxy.addr).await;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    tls_connector(pki(), alpn).connect(name, tcp).await
}

#[tokio::test]
async fn direct_tls_works_with_alpn_postgresql_and_only_with_it() {
    let (_files, proxy) = client_tls_proxy("tls_direct", "require", "", TRUST).await;
    let mut tls = direct_tls(&proxy, &[b"postgresql"])
        .await
        .expect("handshake");
    raw::send(
        &mut tls,
        &raw::startup(&[("user", "tls_direct"), ("database", "app")]),
    )
    .await;
    let (tags, errors) = raw::until_ready(&mut tls).await;
    assert!(
        errors.is_empty() && tags.starts_with('R'),
        "{tags} {errors:?}"
    );
    raw::send(&mut tls, &raw::query("SELECT 1")).await;
    let (tags, errors) = raw::until_ready(&mut tls).await;
    assert_eq!((tags.as_str(), errors.len()), ("TDCZ", 0));

    // Without ALPN the handshake finishes (rustls cannot refuse it), then pgshield closes.
    let mut tls = direct_tls(&proxy, &[])
        .await
        .expect("a handshake without ALPN completes");
    raw::send(
        &mut tls,
        &raw::startup(&[("user", "tls_direct"), ("database", "app")]),
    )
    .await;
    assert!(raw::read_message(&mut tls).await.is_none(), "closed");
    // Another protocol is refused during the handshake.
    assert!(direct_tls(&proxy, &[b"http/1.1"]).await.is_err());
}

#[tokio::test]
async fn client_certificates_are_required_when_a_client_ca_is_set() {
    let clients = TestPki::new("client CA");
    let files = Files::new("tls_mtls_client");
    let client_ca = files.write("client-ca.crt", &clients.ca_pem);
    let (client_cert, client_key) = clients.issue("tls_mtls");
    let client_cert = files.write("client.crt", &client_cert);
    let client_key = files.write("client.key", &client_key);
    let ca_line = format!("ca = \"{}\"\n", client_ca.display());
    let (server_files, proxy) = client_tls_proxy("tls_mtls", "require", &ca_line, PASSWORD).await;
    let ca = server_files.0.join("ca.crt");
    let verify = format!("sslmode=verify-full sslrootcert={}", ca.display());
    let out = psql(
        conninfo(
            &proxy,
            "tls_mtls",
            &format!(
                "{verify} sslcert={} sslkey={}",
                client_cert.display(),
                client_key.display()
            ),
        ),
        "pw",
        &["SELECT 'with a certificate'"],
    )
    .await
    .expect("a client certificate from the client CA");
    assert_eq!(out.trim(), "with a certificate");
    // libpq reads ~/.postgresql/postgresql.crt when sslcert is not given: point it nowhere.
    let missing = files.0.join("none.crt");
    psql(
        conninfo(
            &proxy,
            "tls_mtls",
            &format!("{verify} sslcert={}", missing.display()),
        ),
        "pw",
        &["SELECT 1"],
    )
    .await
    .expect_err("no client certificate");
    // A certificate from another CA is refused too.
    let strangers = TestPki::new("a stranger's CA");
    let (cert, key) = strangers.issue("tls_mtls");
    let (cert, key) = (
        files.write("stranger.crt", &cert),
        files.write("stranger.key", &key),
    );
    let err = psql(
        conninfo(
            &proxy,
            "tls_mtls",
            &format!(
                "{verify} sslcert={} sslkey={}",
                cert.display(),
                key.display()
            ),
        ),
        "pw",
        &["SELECT 1"],
    )
    .await
    .expect_err("a certificate from another CA");
    assert!(
        err.contains("certificate") || err.contains("SSL"),
        "refused in the handshake: {err}"
    );
}

#[tokio::test]
async fn a_certificate_replaced_on_disk_is_served_to_the_next_client_without_a_restart() {
    let (files, proxy) = client_tls_proxy("tls_swap", "require", "", TRUST).await;
    let ca_a = files.0.join("ca.crt");
    let verify_with = |ca: &Path| format!("sslmode=verify-full sslrootcert={}", ca.display());
    psql(
        conninfo(&proxy, "tls_swap", &verify_with(&ca_a)),
        "",
        &["SELECT 1"],
    )
    .await
    .expect("the first certificate");
    // A client connected before the swap keeps its session.
    let mut before = direct_tls(&proxy, &[b"postgresql"]).await.expect("TLS");
    raw::send(
        &mut before,
        &raw::startup(&[("user", "tls_swap"), ("database", "app")]),
    )
    .await;
    raw::until_ready(&mut before).await;

    let other = TestPki::new("rotated CA");
    let (new_cert, new_key) = other.issue("127.0.0.1");
    files.write("server.key", &new_key);
    files.write("server.crt", &new_cert);
    let ca_b = files.write("ca-b.crt", &other.ca_pem);
    psql(
        conninfo(&proxy, "tls_swap", &verify_with(&ca_b)),
        "",
        &["SELECT 1"],
    )
    .await
    .expect("the new certificate is served");
    let err = psql(
        conninfo(&proxy, "tls_swap", &verify_with(&ca_a)),
        "",
        &["SELECT 1"],
    )
    .await
    .expect_err("the old certificate is gone");
    assert!(err.contains("certificate verify failed"), "{err}");

    raw::send(&mut before, &raw::query("SELECT 1")).await;
    let (tags, errors) = raw::until_ready(&mut before).await;
    assert_eq!((tags.as_str(), errors.len()), ("TDCZ", 0));
}

/// Whether the backend serving `conn` is connected over TLS, by the server's own account.
async fn backend_uses_tls(conn: &common::Conn) -> bool {
    conn.client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0)
}

fn server_tls(mode: &str, ca: Option<&Path>) -> String {
    let ca = ca
        .map(|p| format!("ca = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!("[tls.server]\nmode = \"{mode}\"\n{ca}")
}

#[tokio::test]
async fn backends_checked_against_the_right_ca_use_tls_and_disable_stays_plaintext() {
    common::create_role("tls_backend", "pw").await;
    let files = Files::new("tls-backend");
    let ca = files.write("ca.crt", &pki().ca_pem);
    for (mode, encrypted) in [
        ("verify-full", true),
        ("verify-ca", true),
        ("require", true),
        ("prefer", true),
        ("disable", false),
    ] {
        let proxy = TestProxy::start(&format!(
            "{}[users.tls_backend]\npassword = \"pw\"\n",
            server_tls(mode, Some(&ca))
        ))
        .await;
        let conn = proxy
            .connect("tls_backend", "pw")
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(backend_uses_tls(&conn).await, encrypted, "{mode}");
        drop(conn);
        proxy.stop().await;
    }
}

#[tokio::test]
async fn channel_binding_require_logs_in_to_servers_only_with_scram_plus() {
    common::create_role("tls_cb_srv", "pw").await;
    // The harness cluster checks these roles with md5 (for a password stored as md5; it
    // would use SCRAM for a SCRAM verifier), a cleartext password, and not at all.
    common::create_md5_role("be_md5", "pw").await;
    common::create_role("be_password", "pw").await;
    common::create_role("be_trust", "pw").await;
    let users = "[users.tls_cb_srv]\npassword = \"pw\"\n[users.be_md5]\npassword = \"pw\"\n\
                 [users.be_password]\npassword = \"pw\"\n[users.be_trust]\npassword = \"pw\"\n";
    let config = |mode: &str, binding: &str| {
        format!("[tls.server]\nmode = \"{mode}\"\nchannel_binding = \"{binding}\"\n{users}")
    };
    let message = |err: tokio_postgres::Error| {
        err.as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_else(|| err.to_string())
    };
    let proxy = TestProxy::start(&config("require", "require")).await;
    let conn = proxy.connect("tls_cb_srv", "pw").await.expect("SCRAM-PLUS");
    assert!(backend_uses_tls(&conn).await);
    drop(conn);
    for (role, asks) in [
        ("be_md5", "asks for md5"),
        ("be_password", "asks for a cleartext password"),
        ("be_trust", "accepted the login without authenticating it"),
    ] {
        // The login may need no backend (the pool knows the server's parameters); the
        // first statement does.
        let err = match proxy.connect(role, "pw").await {
            Ok(conn) => match conn.client.simple_query("SELECT 1").await {
                Ok(_) => panic!("{role}: logged in to the server without channel binding"),
                Err(e) => message(e),
            },
            Err(e) => message(e),
        };
        assert!(
            err.contains("tls.server.channel_binding = require") && err.contains(asks),
            "{role}: {err}"
        );
    }
    proxy.stop().await;
    // `prefer` (the default) and `disable` log in whichever way the server asks.
    for binding in ["prefer", "disable"] {
        let proxy = TestProxy::start(&config("require", binding)).await;
        for role in ["tls_cb_srv", "be_md5", "be_password", "be_trust"] {
            let conn = proxy
                .connect(role, "pw")
                .await
                .unwrap_or_else(|e| panic!("{binding}, {role}: {}", message(e)));
            conn.client
                .simple_query("SELECT 1")
                .await
                .unwrap_or_else(|e| panic!("{binding}, {role}: {}", message(e)));
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_backend_that_fails_verification_is_never_used_and_the_error_says_why() {
    common::create_role("tls_wrong_ca", "pw").await;
    let files = Files::new("tls-wrong-ca");
    let other = TestPki::new("not the server's CA");
    let wrong = files.write("wrong-ca.crt", &other.ca_pem);
    for mode in ["verify-full", "verify-ca"] {
        let proxy = TestProxy::start(&format!(
            "{}[users.tls_wrong_ca]\npassword = \"pw\"\n",
            server_tls(mode, Some(&wrong))
        ))
        .await;
        let err = match proxy.connect("tls_wrong_ca", "pw").await {
            Ok(_) => panic!("{mode}: served by an unverified backend"),
            Err(e) => e,
        };
        let message = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_else(|| err.to_string());
        assert!(
            message.contains(&format!("tls.server.mode = {mode}"))
                && message.contains("UnknownIssuer"),
            "{mode}: {message}"
        );
        // Checked while the proxy runs: no backend was left open for that role.
        let admin = common::admin().await;
        assert_eq!(
            common::backends_of(&admin, "tls_wrong_ca").await,
            0,
            "{mode}"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn verify_ca_accepts_any_host_name_and_verify_full_does_not() {
    common::create_role("tls_names", "pw").await;
    let files = Files::new("tls-names");
    let ca = files.write("ca.crt", &pki().ca_pem);
    // The cluster's certificate names 127.0.0.1, not localhost.
    let by_name = format!(
        "[databases.by_name]\nhost = \"localhost\"\nport = {}\ndbname = \"postgres\"\n",
        common::cluster().port()
    );
    let config = |mode: &str| {
        let mut c = proxy_config(&by_name, mode, &ca);
        c.push_str("[users.tls_names]\npassword = \"pw\"\n");
        c
    };
    let by_name_conf = |proxy: &TestProxy| {
        let mut c = proxy.config("tls_names", "pw");
        c.dbname("by_name");
        c
    };
    let proxy = TestProxy::start(&config("verify-ca")).await;
    let conn = common::connect(&by_name_conf(&proxy))
        .await
        .expect("verify-ca does not look at the name");
    assert!(backend_uses_tls(&conn).await);
    drop(conn);
    proxy.stop().await;

    let proxy = TestProxy::start(&config("verify-full")).await;
    let err = match common::connect(&by_name_conf(&proxy)).await {
        Ok(_) => panic!("verify-full accepted a certificate for another name"),
        Err(e) => e,
    };
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string());
    assert!(message.contains("not valid for name"), "{message}");
    // The same server by the name in its certificate passes.
    proxy
        .connect("tls_names", "pw")
        .await
        .expect("verify-full with the certificate's name");
    proxy.stop().await;
}

fn proxy_config(extra: &str, mode: &str, ca: &Path) -> String {
    format!("{extra}{}", server_tls(mode, Some(ca)))
}

#[tokio::test]
async fn prefer_falls_back_to_plaintext_when_the_tls_handshake_fails() {
    common::create_role("tls_fallback", "pw").await;
    // A server address whose first connection says `S` to SSLRequest and then hangs up
    // (a broken TLS setup); later connections reach the real cluster unchanged.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let fake_port = fake.local_addr().expect("addr").port();
    let cluster_port = common::cluster().port();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut conn, _)) = fake.accept().await {
            if std::mem::take(&mut first) {
                let mut request = [0u8; 8];
                let _ = tokio::io::AsyncReadExt::read_exact(&mut conn, &mut request).await;
                let _ = tokio::io::AsyncWriteExt::write_all(&mut conn, b"S").await;
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(("127.0.0.1", cluster_port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut server).await;
                }
            });
        }
    });
    let proxy = TestProxy::start(&format!(
        "[databases.flaky]\nhost = \"127.0.0.1\"\nport = {fake_port}\ndbname = \"postgres\"\n\
         [users.tls_fallback]\npassword = \"pw\"\n"
    ))
    .await;
    let mut config = proxy.config("tls_fallback", "pw");
    config.dbname("flaky");
    let conn = common::connect(&config)
        .await
        .expect("prefer retried without TLS");
    assert!(!backend_uses_tls(&conn).await);
}

/// A backend logged in over TLS gets its cancels over TLS too, as libpq 17 sends them (a
/// server behind a TLS-only front refuses plaintext ones, and the backend's key is not
/// sent in clear). A relay in front of the harness cluster notes how each connection
/// begins: SSLRequest (80877103) or a plaintext CancelRequest (80877102).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_of_a_tls_backend_go_over_tls() {
    common::create_role("tls_cancel", "pw").await;
    let relay = common::Relay::start(|_| true).await;
    let proxy = TestProxy::start_with_databases(
        &relay.database(),
        "[pool]\nmode = \"session\"\n[tls.server]\nmode = \"require\"\n[users.tls_cancel]\npassword = \"pw\"\n",
    )
    .await;
    let conn = proxy.connect("tls_cancel", "pw").await.expect("login");
    assert!(backend_uses_tls(&conn).await);
    let token = conn.client.cancel_token();
    let client = conn.client;
    let sleeping =
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(10)").await.map(|_| ()) });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("the cancel request is accepted");
    let result = tokio::time::timeout(std::time::Duration::from_secs(5), sleeping)
        .await
        .expect("the query ends")
        .expect("the task");
    let err = result.expect_err("cancelled");
    assert_eq!(common::sqlstate(&err), Some("57014"), "{err}");
    let openings = relay.openings();
    assert!(
        !openings.contains(&80877102),
        "a plaintext cancel: {openings:?}"
    );
    assert_eq!(
        openings,
        [80877103, 80877103],
        "the login, then the cancel, over TLS"
    );
}
