//! `[auth]`: users that exist only in the database log in through pgshield, which finds
//! their verifier with auth.query and logs in to the server in their name with the SCRAM
//! keys their own login revealed (or their md5 hash): no password in pgshield's config.

mod common;

use std::time::Duration;

use common::{sqlstate, TestProxy};

/// A proxy with no `[users]` at all: every user is looked up as the superuser.
async fn proxy(extra: &str) -> TestProxy {
    let db = common::cluster();
    TestProxy::start(&format!(
        "[auth]\nenabled = true\nuser = \"{}\"\npassword = \"{}\"\ncache_ttl = \"1s\"\n{extra}",
        db.superuser(),
        db.password()
    ))
    .await
}

async fn current_user(conn: &common::Conn) -> String {
    conn.client
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0)
}

#[tokio::test]
async fn a_scram_user_only_in_the_database_logs_in_and_wrong_passwords_do_not() {
    common::create_role("aq_scram", "pw-aq").await;
    let proxy = proxy("").await;
    let conn = proxy.connect("aq_scram", "pw-aq").await.expect("login");
    assert_eq!(current_user(&conn).await, "aq_scram");
    // Several transactions, so backends are opened and reused with the recovered keys.
    for i in 0..5 {
        let n: i32 = conn
            .client
            .query_one("SELECT $1::int", &[&i])
            .await
            .expect("query")
            .get(0);
        assert_eq!(n, i);
    }
    let err = proxy
        .connect("aq_scram", "wrong")
        .await
        .err()
        .expect("wrong password");
    assert_eq!(sqlstate(&err), Some("28P01"));
    let err = proxy
        .connect("aq_nobody", "pw")
        .await
        .err()
        .expect("unknown user");
    assert_eq!(sqlstate(&err), Some("28P01"));
}

#[tokio::test]
async fn expired_and_nologin_roles_are_refused() {
    common::create_role("aq_expired", "pw").await;
    common::create_role("aq_nologin", "pw").await;
    let admin = common::admin().await;
    admin
        .batch_execute(
            "ALTER ROLE aq_expired VALID UNTIL '2001-01-01'; ALTER ROLE aq_nologin NOLOGIN",
        )
        .await
        .expect("alter roles");
    let proxy = proxy("").await;
    for role in ["aq_expired", "aq_nologin"] {
        let err = proxy.connect(role, "pw").await.err().expect(role);
        assert_eq!(sqlstate(&err), Some("28P01"), "{role}");
    }
}

#[tokio::test]
async fn an_md5_user_logs_in_with_its_hash() {
    // The harness's pg_hba.conf checks be_md5 with md5.
    common::create_md5_role("be_md5", "pw-md5").await;
    let proxy = proxy("").await;
    let conn = proxy.connect("be_md5", "pw-md5").await.expect("md5 login");
    assert_eq!(current_user(&conn).await, "be_md5");
    assert!(proxy.connect("be_md5", "nope").await.is_err());
}

#[tokio::test]
async fn a_changed_password_is_noticed_after_the_cache_ttl() {
    common::create_role("aq_change", "old-pw").await;
    let proxy = proxy("").await;
    proxy
        .connect("aq_change", "old-pw")
        .await
        .expect("old password");
    change_password("aq_change", "new-pw", false).await;
    let conn = proxy
        .connect("aq_change", "new-pw")
        .await
        .expect("the new password, and new backends with its keys");
    assert_eq!(current_user(&conn).await, "aq_change");
    assert!(proxy.connect("aq_change", "old-pw").await.is_err());
}

/// Changes a role's password, closes its backends (so the next login needs new ones,
/// opened with what that login proves) and waits out the cache.
async fn change_password(role: &str, password: &str, md5: bool) {
    let admin = common::admin().await;
    let encryption = if md5 { "md5" } else { "scram-sha-256" };
    admin
        .batch_execute(&format!(
            "BEGIN; SET LOCAL password_encryption = '{encryption}'; \
             ALTER ROLE {role} PASSWORD '{password}'; COMMIT; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
        ))
        .await
        .expect("change the password");
    while common::backends_of(&admin, role).await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[tokio::test]
async fn an_md5_users_new_password_reaches_its_pool() {
    common::create_md5_role("be_md5hash", "old-md5").await;
    let proxy = proxy("").await;
    proxy
        .connect("be_md5hash", "old-md5")
        .await
        .expect("old password");
    change_password("be_md5hash", "new-md5", true).await;
    let conn = proxy
        .connect("be_md5hash", "new-md5")
        .await
        .expect("the new hash logs in to the server");
    assert_eq!(current_user(&conn).await, "be_md5hash");
}

#[tokio::test]
async fn a_failing_lookup_is_a_clear_error_not_a_wrong_password() {
    common::create_role("aq_lookup", "pw").await;
    let db = common::cluster();
    let proxy = TestProxy::start(&format!(
        "[auth]\nenabled = true\nuser = \"{}\"\npassword = \"not-the-password\"\n",
        db.superuser()
    ))
    .await;
    let err = proxy
        .connect("aq_lookup", "pw")
        .await
        .err()
        .expect("refused");
    assert_eq!(sqlstate(&err), Some("08006"), "{err}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("auth.query"), "{message}");
    assert!(!message.contains("not-the-password"));
}

/// A client hanging up during authentication is not counted as failing, whether its
/// name exists or not: the throttle's wait tells nothing of which names do, and many
/// clients behind one address (functions behind a NAT gateway) cut off mid-login do not
/// slow the others down. A wrong password is counted, for a name found or not.
#[tokio::test]
async fn hang_ups_during_authentication_are_not_counted_but_wrong_passwords_are() {
    common::create_role("aq_known", "pw-known").await;
    let peer = pgshield::net::Peer::Tcp("127.0.0.1:1".parse().expect("addr"));
    for known in [false, true] {
        let proxy = proxy("").await;
        for i in 0..5 {
            let mut s = common::raw::connect(proxy.addr).await;
            let user = if known {
                "aq_known".to_owned()
            } else {
                format!("aq_guess_{i}")
            };
            let startup = common::raw::startup(&[("user", &user), ("database", "app")]);
            common::raw::send(&mut s, &startup).await;
            // (Its password is asked for once the lookup is done.)
            let asked = common::raw::read_message(&mut s).await;
            assert_eq!(asked.map(|(tag, _)| tag), Some(b'R'));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            proxy.shared.login_throttle.delay(peer),
            Duration::ZERO,
            "known: {known}"
        );
        for _ in 0..5 {
            let user = if known { "aq_known" } else { "aq_guess" };
            assert!(proxy.connect(user, "wrong").await.is_err());
        }
        assert!(
            proxy.shared.login_throttle.delay(peer) > Duration::ZERO,
            "known: {known}"
        );
    }
}

/// Lookups reuse a connection of auth.user: each name probed is one query, not a login
/// and a server process forked for it (a client sending startup packets with made-up
/// names could make the server fork one per packet).
#[tokio::test]
async fn lookups_reuse_a_connection() {
    let admin = common::admin().await;
    if let Err(e) = admin.batch_execute("CREATE DATABASE aq_reuse").await {
        assert_eq!(sqlstate(&e), Some("42P04"), "{e}");
    }
    let proxy = proxy("dbname = \"aq_reuse\"\n").await;
    let lookup_backends = || async {
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = 'aq_reuse'",
                &[],
            )
            .await
            .expect("pg_stat_activity");
        rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>()
    };
    let probe = |i: usize| {
        let proxy = &proxy;
        async move {
            let err = proxy
                .connect(&format!("aq_probe_{i}"), "pw")
                .await
                .err()
                .expect("no such user");
            assert_eq!(sqlstate(&err), Some("28P01"));
        }
    };
    probe(0).await;
    let first = lookup_backends().await;
    assert_eq!(first.len(), 1, "one connection kept: {first:?}");
    // (Few: each failed login slows the next from the same address.)
    for i in 1..4 {
        probe(i).await;
    }
    assert_eq!(
        lookup_backends().await,
        first,
        "the same connection, reused"
    );
}
