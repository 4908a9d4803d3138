//! A client's login: startup packet (SSLRequest or direct TLS start TLS when client TLS
//! is on, except over the Unix-domain socket; GSS requests are answered `N`), protocol
//! version, client limit, authentication, database, then the welcome (AuthenticationOk,
//! ParameterStatus, BackendKeyData, ReadyForQuery).
//!
//! Everything here runs under `listen.client_login_timeout`, enforced by the caller.
//! Refusals are ErrorResponses with the SQLSTATE PostgreSQL would use.

use std::sync::Arc;

use bytes::BytesMut;

use super::access::Admission;
use super::auth::{self, AuthError, ClientAuth, Proof};
use super::cancel::Registration;
use super::params::ClientSettings;
use crate::config::{Secret, ADMIN_DATABASE};
use crate::net::{Peer, Stream};
use crate::pool::{Pool, PoolClient};
use crate::protocol::startup::{self, StartupMessage, StartupPacket, StartupReadError};
use crate::protocol::{messages, sqlstate, ErrorResponse};
use crate::proxy::Shared;
use crate::server::{BackendPassword, ClientView};
use crate::tls::{ClientTls, Material, ALPN_POSTGRESQL};

/// A logged-in client, ready for its session.
pub struct Login {
    pub pool: Arc<Pool>,
    /// Counted among the pool's clients from the moment it was found (a pool a reload
    /// removed closes only when it has none).
    pub in_pool: PoolClient,
    /// The client's cancel key, and where its cancels go.
    pub cancel: Registration,
    pub settings: ClientSettings,
    /// The ParameterStatus values the client was told.
    pub client_view: ClientView,
    /// Its places under per-user and per-database client limits.
    pub admission: Admission,
    pub user: String,
    pub database: String,
}

/// Where a logged-in client goes.
pub enum Outcome {
    /// A session relayed to the pool's backends.
    Session(Login),
    /// The admin console (database `pgshield`), as this admin user.
    /// The admin console's user, and its cancel key (a cancel resumes every pool).
    Admin(String, crate::client::cancel::Registration),
}

/// Why a login did not complete; `error` (if any) is sent to the client before closing,
/// after `unsent`: what the login had written but not sent yet (the SASL exchange's last
/// message, when the refusal comes after it).
pub struct Refusal {
    pub error: Option<ErrorResponse>,
    pub unsent: BytesMut,
}

impl Refusal {
    /// Nothing to tell the client (it left, or cannot be written to).
    pub fn silent() -> Refusal {
        Refusal {
            error: None,
            unsent: BytesMut::new(),
        }
    }
}

impl From<ErrorResponse> for Refusal {
    fn from(e: ErrorResponse) -> Self {
        Refusal {
            error: Some(e),
            unsent: BytesMut::new(),
        }
    }
}

/// Runs the login. `admitted` is false when `max_client_connections` is reached: the
/// client then gets PostgreSQL's "too many clients" error after its startup packet.
pub async fn login(
    shared: &Shared,
    stream: &mut Stream,
    buf: &mut BytesMut,
    peer: Peer,
    admitted: bool,
    read_only: bool,
) -> Result<Outcome, Refusal> {
    let (startup, tls) = read_startup(shared, stream, buf).await?;
    // The configuration in force when the client asked: a reload meanwhile does not
    // change the rules of a login under way.
    let live = shared.live();
    if tls.is_some() {
        shared.metrics.clients.received_tls.increment(1);
    }
    let user = startup.get("user").unwrap_or_default().to_owned();
    if user.is_empty() {
        return Err(ErrorResponse::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .into());
    }
    let mut database = match startup.get("database") {
        Some(db) if !db.is_empty() => db.to_owned(),
        _ => user.clone(),
    };
    if !admitted {
        return Err(ErrorResponse::fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        )
        .with_hint(format!(
            "pgshield's listen.max_client_connections ({}) is reached",
            live.config.listen.max_client_connections
        ))
        .into());
    }
    let settings = ClientSettings::from_startup(&startup)?;
    negotiate_version(stream, &startup).await?;

    if database == ADMIN_DATABASE {
        // (A user's address and TLS rules hold for the console too.)
        live.access
            .check_peer(&user, &database, peer, stream.is_tls())?;
        return admin_login(shared, stream, buf, peer, user, tls).await;
    }
    // Through listen.read_only_addr, every database is its read-only alias. One without
    // replicas is refused, after authentication (as an unknown database is).
    let mut no_replicas = false;
    if read_only {
        match live.config.resolve_database(&database) {
            Some((base, false)) if live.config.databases[base].has_replicas() => {
                database = format!("{base}{}", crate::config::READ_ONLY_SUFFIX);
            }
            Some((_, false)) => no_replicas = true,
            _ => {}
        }
    }
    // `<db>_ro` is the read-only alias of `db`: the same rules and limits, its own pools.
    let rules_db = live
        .config
        .resolve_database(&database)
        .map_or_else(|| database.clone(), |(base, _)| base.to_owned());
    live.access
        .check_peer(&user, &rules_db, peer, stream.is_tls())?;
    // An address that has failed repeatedly waits before every attempt, right or wrong
    // (before an auth.query lookup too, which costs the server a login and a query).
    let delay = shared.login_throttle.delay(peer);
    if !delay.is_zero() {
        tracing::info!(%peer, user, delay_ms = delay.as_millis() as u64, "slowing down logins from an address that failed repeatedly");
        tokio::time::sleep(delay).await;
    }
    // Configured users first; then, with [auth], the database's own roles.
    let configured = live.users.lookup(&user).cloned();
    let found = match (&configured, &live.auth_query) {
        (None, Some(query)) => match query.lookup(&rules_db, &user).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(%peer, user, database, error = %e, "auth.query lookup failed");
                return Err(ErrorResponse::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "pgshield cannot check passwords right now (its auth.query lookup failed)",
                )
                .into());
            }
        },
        _ => None,
    };
    let auth = configured
        .clone()
        .or_else(|| found.clone())
        .unwrap_or_else(|| live.users.mock(&user));
    let end_point = tls.as_ref().and_then(|m| m.end_point.as_deref());
    let mut out = BytesMut::with_capacity(512);
    let proof = match auth::authenticate(stream, buf, &user, &auth, end_point, &mut out).await {
        Ok(proof) => proof,
        Err(e) => {
            match &e {
                AuthError::Failed(_) => {
                    shared.login_throttle.failed(peer);
                    tracing::info!(%peer, user, database, "authentication failed");
                }
                AuthError::Closed => {
                    // Not counted, whatever the name (nothing to tell names apart by):
                    // many clients behind one address (serverless functions behind a
                    // NAT gateway) are cut off mid-login, and must not slow the others.
                    tracing::debug!(%peer, user, "client left during authentication")
                }
                other => tracing::info!(%peer, user, error = %other, "authentication aborted"),
            }
            return Err(Refusal {
                error: e.to_client_error(),
                unsent: BytesMut::new(),
            });
        }
    };
    // (A refusal from here on goes after what `out` holds.)
    let admitted = async {
        if no_replicas {
            return Err(ErrorResponse::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{database}\" has no replicas to read from"),
            )
            .with_hint(
                "listen.read_only_addr serves databases with replicas only; connect to listen.addr",
            )
            .into());
        }
        let admission = live.access.admit(&user, &rules_db)?;
        let listed = live.config.auth.listed.get(&user);
        let pool = match (configured, found) {
            // Listed in auth.file: its pools are made at its first login, as [auth]'s are,
            // logging in to the server with the file's password, or by passthrough with a
            // verifier.
            (Some(configured), _) if listed.is_some() => listed
                .and_then(|secret| listed_credential(secret, &configured, &proof))
                .and_then(|password| shared.pools.for_found_user(&database, &user, password)),
            (Some(configured), _) => {
                let pool = shared.pools.get(&database, &user);
                // A configured SCRAM verifier without server_password: passthrough too.
                if let (Some(pool), Some(password)) = (&pool, passthrough(&configured, &proof)) {
                    pool.use_login_credential(password);
                }
                pool
            }
            // Found by [auth]: the server is logged in to with what this login proved.
            (None, Some(found)) => passthrough(&found, &proof)
                .and_then(|password| shared.pools.for_found_user(&database, &user, password)),
            (None, None) => None,
        };
        let Some(pool) = pool else {
            return Err(ErrorResponse::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database \"{database}\" does not exist"),
            )
            .with_hint("pgshield serves only the databases in its [databases] configuration")
            .into());
        };
        if let Some(refused) = super::session::refuses_at_login(&pool, &settings) {
            return Err(refused.into());
        }
        let in_pool = pool.join();
        let welcome = pool
            .welcome_params()
            .await
            .map_err(|e| e.to_client_error().into_fatal())?;
        Ok((pool, in_pool, welcome, admission))
    };
    let (pool, in_pool, welcome, admission) = admitted.await.map_err(|mut refusal: Refusal| {
        refusal.unsent = out.split();
        refusal
    })?;
    messages::authentication_ok(&mut out);
    let mut client_view = ClientView::new(Arc::clone(&welcome));
    // (The client's settings split once, not once per parameter: a dozen lookups each.)
    let asked: Vec<(&str, &str)> = settings.iter().collect();
    for (name, server_value) in welcome.iter() {
        let value = asked
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map_or(server_value, |(_, v)| v);
        // The view starts as the welcome values: only what the client asked otherwise
        // is its own.
        if value != server_value {
            client_view.set(name, value);
        }
        messages::parameter_status(&mut out, name, value);
    }
    let cancel = shared.cancels.register();
    messages::backend_key_data(&mut out, cancel.key().process_id, cancel.key().secret_key);
    messages::ready_for_query(&mut out, b'I');
    stream.send(&out).await.map_err(|_| Refusal::silent())?;
    tracing::debug!(%peer, user, database, "client logged in");
    Ok(Outcome::Session(Login {
        pool,
        in_pool,
        cancel,
        settings,
        client_view,
        admission,
        user,
        database,
    }))
}

/// A login to the admin console: admin users only (from loopback unless
/// `admin.allow_remote`), authenticated as configured, welcomed with parameters of
/// pgshield's own.
async fn admin_login(
    shared: &Shared,
    stream: &mut Stream,
    buf: &mut BytesMut,
    peer: Peer,
    user: String,
    tls: Option<Arc<Material>>,
) -> Result<Outcome, Refusal> {
    let live = shared.live();
    let admin = &live.config.admin;
    if !admin.users.contains(&user) && !admin.stats_users.contains(&user) {
        return Err(ErrorResponse::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            format!("user \"{user}\" may not use the pgshield admin console"),
        )
        .with_hint("admin users are listed in admin.users (admin.stats_users: SHOW only)")
        .into());
    }
    if !admin.allow_remote && !peer.is_local() {
        return Err(ErrorResponse::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "the pgshield admin console accepts connections from this host only",
        )
        .with_hint("set admin.allow_remote = true to allow others")
        .into());
    }
    let auth = live
        .users
        .lookup(&user)
        .cloned()
        .unwrap_or_else(|| live.users.mock(&user));
    // Guessing admin passwords is slowed like any other.
    tokio::time::sleep(shared.login_throttle.delay(peer)).await;
    let end_point = tls.as_ref().and_then(|m| m.end_point.as_deref());
    let mut out = BytesMut::with_capacity(256);
    if let Err(e) = auth::authenticate(stream, buf, &user, &auth, end_point, &mut out).await {
        if let AuthError::Failed(_) = e {
            shared.login_throttle.failed(peer);
            tracing::info!(%peer, user, "admin console authentication failed");
        }
        return Err(Refusal {
            error: e.to_client_error(),
            unsent: BytesMut::new(),
        });
    }
    messages::authentication_ok(&mut out);
    for (name, value) in [
        ("server_version", "15.0 (pgshield admin console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        messages::parameter_status(&mut out, name, value);
    }
    let registration = shared.cancels.register_console();
    let key = registration.key();
    messages::backend_key_data(&mut out, key.process_id, key.secret_key);
    messages::ready_for_query(&mut out, b'I');
    stream.send(&out).await.map_err(|_| Refusal::silent())?;
    tracing::info!(%peer, user, "admin console login");
    Ok(Outcome::Admin(user, registration))
}

/// Reads startup packets until a StartupMessage: SSLRequest starts TLS when client TLS
/// is on (`N` otherwise), as does a TLS ClientHello sent straight away (PostgreSQL 17's
/// direct TLS, which must name ALPN `postgresql`); GSSENCRequest is answered `N`.
/// Returns the TLS material the connection was secured with, if it was.
async fn read_startup(
    shared: &Shared,
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<(StartupMessage, Option<Arc<Material>>), Refusal> {
    let live = shared.live();
    let tls = live.client_tls.as_deref();
    let mut answered_ssl = false;
    let mut answered_gss = false;
    let mut secured = None;
    if let Some(tls) = tls {
        if starts_with_tls_record(stream).await {
            secured = Some(accept_tls(tls, stream, true).await?);
            answered_ssl = true;
        }
    }
    loop {
        let packet = match startup::read(stream, buf).await {
            Ok(p) => p,
            Err(StartupReadError::Invalid(e)) => {
                return Err(
                    ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()).into(),
                )
            }
            Err(StartupReadError::Read(_)) => return Err(Refusal::silent()),
        };
        match packet {
            StartupPacket::SslRequest if !answered_ssl => answered_ssl = true,
            StartupPacket::GssEncRequest if !answered_gss => answered_gss = true,
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                return Err(ErrorResponse::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "encryption requested twice in one startup",
                )
                .into())
            }
            StartupPacket::Cancel {
                process_id,
                secret_key,
            } => {
                shared.metrics.cancel_requests.increment(1);
                if shared.cancels.is_console(process_id, &secret_key) {
                    // As PgBouncer: Ctrl-C in the console ends a PAUSE (or KILL) that
                    // holds every database, by resuming every pool.
                    tracing::warn!("cancel request from the admin console: resuming every pool");
                    shared.pools.note_resumed(None);
                    for pool in shared.pools.all() {
                        pool.resume();
                    }
                } else {
                    shared.cancels.cancel(process_id, &secret_key).await;
                }
                return Err(Refusal::silent());
            }
            StartupPacket::UnsupportedVersion { major, minor } => {
                return Err(ErrorResponse::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                    ),
                )
                .into())
            }
            StartupPacket::Startup(msg) => {
                // (The Unix-domain socket is local: no TLS there, none required, as with
                // PgBouncer.)
                if tls.is_some_and(ClientTls::required) && !stream.is_tls() && !stream.is_unix() {
                    return Err(ErrorResponse::fatal(
                        sqlstate::INVALID_AUTHORIZATION,
                        "pgshield accepts only TLS connections (tls.client.mode = require)",
                    )
                    .with_hint("connect with sslmode=require (or stronger)")
                    .into());
                }
                return Ok((msg, secured));
            }
        }
        // Bytes sent before the answer would be read as if they had come encrypted.
        if !buf.is_empty() {
            return Err(ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "received unencrypted data after SSL or GSS request",
            )
            .into());
        }
        match tls {
            // Not over the Unix-domain socket, as PostgreSQL does not.
            Some(tls) if answered_ssl && !stream.is_tls() && !stream.is_unix() => {
                stream.send(b"S").await.map_err(|_| Refusal::silent())?;
                secured = Some(accept_tls(tls, stream, false).await?);
            }
            // Not encrypting: say so and wait for the real startup packet.
            _ => stream.send(b"N").await.map_err(|_| Refusal::silent())?,
        }
    }
}

/// Whether the client's first byte opens a TLS handshake record (direct TLS).
async fn starts_with_tls_record(stream: &Stream) -> bool {
    const HANDSHAKE_RECORD: u8 = 0x16;
    let Stream::Tcp(tcp) = stream else {
        return false;
    };
    let mut first = [0u8; 1];
    matches!(tcp.peek(&mut first).await, Ok(1) if first[0] == HANDSHAKE_RECORD)
}

/// Runs the TLS handshake with the client; `direct`: without SSLRequest, so ALPN
/// `postgresql` is required (as PostgreSQL requires it).
async fn accept_tls(
    tls: &ClientTls,
    stream: &mut Stream,
    direct: bool,
) -> Result<Arc<Material>, Refusal> {
    let Some(tcp) = stream.take_tcp() else {
        return Err(Refusal::silent());
    };
    let material = tls.current();
    let accepted = tokio_rustls::TlsAcceptor::from(Arc::clone(&material.config))
        .accept(tcp)
        .await;
    match accepted {
        Ok(tls_stream) => {
            if direct && tls_stream.get_ref().1.alpn_protocol() != Some(ALPN_POSTGRESQL) {
                tracing::info!("direct TLS without ALPN \"postgresql\" refused");
                return Err(Refusal::silent());
            }
            *stream = Stream::Tls(Box::new(tls_stream.into()));
            Ok(material)
        }
        Err(e) => {
            tracing::info!(error = %e, "client TLS handshake failed");
            Err(Refusal::silent())
        }
    }
}

/// The credential for the server that a login proved: the SCRAM keys it revealed, or
/// the user's md5 hash.
fn passthrough(found: &ClientAuth, proof: &Proof) -> Option<BackendPassword> {
    match found {
        ClientAuth::Scram(verifier) => Some(BackendPassword::ScramKeys {
            client_key: proof.client_key?,
            server_key: verifier.server_key,
        }),
        ClientAuth::Md5(hash) => Some(BackendPassword::Md5Hash(Secret::new(format!("md5{hash}")))),
        ClientAuth::Trust => None,
    }
}

/// The credential for the server of a user `auth.file` lists: its password, or its md5
/// hash (enough for md5 servers), or with a SCRAM verifier the keys its login revealed.
fn listed_credential(secret: &Secret, auth: &ClientAuth, proof: &Proof) -> Option<BackendPassword> {
    crate::pool::server_password_in(secret).or_else(|| passthrough(auth, proof))
}

/// Protocol 3.x with x > 0, or `_pq_.` extensions: tell the client we speak 3.0 only.
async fn negotiate_version(stream: &mut Stream, startup: &StartupMessage) -> Result<(), Refusal> {
    let unrecognized: Vec<&str> = startup
        .params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if startup.minor_version == 0 && unrecognized.is_empty() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    messages::negotiate_protocol_version(&mut out, 0, &unrecognized);
    stream.send(&out).await.map_err(|_| Refusal::silent())
}
