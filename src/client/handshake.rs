//! A client's login: startup packet (SSL/GSS requests answered `N`), protocol version,
//! client limit, authentication, database, then the welcome (AuthenticationOk,
//! ParameterStatus, BackendKeyData, ReadyForQuery).
//!
//! Everything here runs under `listen.client_login_timeout`, enforced by the caller.
//! Refusals are ErrorResponses with the SQLSTATE PostgreSQL would use.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::auth::{self, AuthError};
use super::cancel::Registration;
use super::params::ClientSettings;
use crate::net::Stream;
use crate::pool::Pool;
use crate::protocol::startup::{self, StartupMessage, StartupPacket, StartupReadError};
use crate::protocol::{messages, sqlstate, ErrorResponse};
use crate::proxy::Shared;
use crate::server::ServerParams;

/// A logged-in client, ready for its session.
pub struct Login {
    pub pool: Arc<Pool>,
    /// The client's cancel key, and where its cancels go.
    pub cancel: Registration,
    pub settings: ClientSettings,
    /// The ParameterStatus values the client was told.
    pub client_view: ServerParams,
}

/// Why a login did not complete; `error` (if any) is sent to the client before closing.
pub struct Refusal {
    pub error: Option<ErrorResponse>,
}

impl From<ErrorResponse> for Refusal {
    fn from(e: ErrorResponse) -> Self {
        Refusal { error: Some(e) }
    }
}

/// Runs the login. `admitted` is false when `max_client_connections` is reached: the
/// client then gets PostgreSQL's "too many clients" error after its startup packet.
pub async fn login(
    shared: &Shared,
    stream: &mut Stream,
    buf: &mut BytesMut,
    peer: SocketAddr,
    admitted: bool,
) -> Result<Login, Refusal> {
    let startup = read_startup(shared, stream, buf).await?;
    let user = startup.get("user").unwrap_or_default().to_owned();
    if user.is_empty() {
        return Err(ErrorResponse::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        )
        .into());
    }
    let database = match startup.get("database") {
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
            shared.config.listen.max_client_connections
        ))
        .into());
    }
    let settings = ClientSettings::from_startup(&startup)?;
    negotiate_version(stream, &startup).await?;

    if let Err(e) = auth::authenticate(stream, buf, &user, &shared.users).await {
        match &e {
            AuthError::Failed(_) => tracing::info!(%peer, user, database, "authentication failed"),
            AuthError::Closed => tracing::debug!(%peer, user, "client left during authentication"),
            other => tracing::info!(%peer, user, error = %other, "authentication aborted"),
        }
        return Err(Refusal {
            error: e.to_client_error(),
        });
    }
    let Some(pool) = shared.pools.get(&database, &user).cloned() else {
        return Err(ErrorResponse::fatal(
            sqlstate::INVALID_CATALOG_NAME,
            format!("database \"{database}\" does not exist"),
        )
        .with_hint("pgshield serves only the databases in its [databases] configuration")
        .into());
    };
    let welcome = pool
        .welcome_params()
        .await
        .map_err(|e| e.to_client_error().into_fatal())?;

    let mut out = BytesMut::with_capacity(512);
    messages::authentication_ok(&mut out);
    let mut client_view = ServerParams::default();
    for (name, server_value) in welcome.iter() {
        let value = settings.get(name).unwrap_or(server_value);
        client_view.set(name, value);
        messages::parameter_status(&mut out, name, value);
    }
    let cancel = shared.cancels.register();
    messages::backend_key_data(&mut out, cancel.key().process_id, cancel.key().secret_key);
    messages::ready_for_query(&mut out, b'I');
    stream
        .write_all(&out)
        .await
        .map_err(|_| Refusal { error: None })?;
    tracing::debug!(%peer, user, database, "client logged in");
    Ok(Login {
        pool,
        cancel,
        settings,
        client_view,
    })
}

/// Reads startup packets until a StartupMessage, answering SSL and GSS requests with `N`.
async fn read_startup(
    shared: &Shared,
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<StartupMessage, Refusal> {
    let mut answered_ssl = false;
    let mut answered_gss = false;
    loop {
        let packet = match startup::read(stream, buf).await {
            Ok(p) => p,
            Err(StartupReadError::Invalid(e)) => {
                return Err(
                    ErrorResponse::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()).into(),
                )
            }
            Err(StartupReadError::Read(_)) => return Err(Refusal { error: None }),
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
                shared.cancels.cancel(process_id, &secret_key).await;
                return Err(Refusal { error: None });
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
            StartupPacket::Startup(msg) => return Ok(msg),
        }
        // Not encrypting (yet): say so and wait for the real startup packet.
        if !buf.is_empty() {
            return Err(ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "received unencrypted data after SSL or GSS request",
            )
            .into());
        }
        stream
            .write_all(b"N")
            .await
            .map_err(|_| Refusal { error: None })?;
    }
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
    stream
        .write_all(&out)
        .await
        .map_err(|_| Refusal { error: None })
}
