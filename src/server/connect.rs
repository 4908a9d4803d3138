//! Opening a backend connection: TCP with a timeout, the startup message, authentication
//! (SCRAM-SHA-256 via postgres-protocol's client, md5, cleartext, trust), then the
//! ParameterStatus and BackendKeyData the server sends until its first ReadyForQuery.

use std::time::Duration;

use bytes::BytesMut;
use md5::{Digest, Md5};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use std::sync::Arc;

use tokio::io::AsyncReadExt;

use super::password::PasswordCommand;
use super::{parse_parameter_status, Server, ServerError as Error};
use crate::config::{ChannelBindingMode, Secret, ServerTlsMode};
use crate::net::Stream;
use crate::protocol::frame::read_message;
use crate::protocol::scram::{ScramKeyClient, MECHANISM, MECHANISM_PLUS};
use crate::protocol::sqlstate;
use crate::protocol::ErrorResponse;
use crate::tls::ServerTls;

/// Largest message accepted while logging in to a backend.
const MAX_LOGIN_MESSAGE: usize = 64 * 1024;

/// Where and as whom pgshield logs in for one pool.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
    pub password: Option<BackendPassword>,
    pub tls: Arc<ServerTls>,
    /// Sent at startup when set (pgshield's own connections say what they are).
    pub application_name: Option<&'static str>,
}

impl ServerTarget {
    /// Whether `other` reaches the same server, database and role the same way (the
    /// password aside): a backend opened for one is as good as one opened for the other.
    pub fn same_server(&self, other: &ServerTarget) -> bool {
        self.host == other.host
            && self.port == other.port
            && self.database == other.database
            && self.user == other.user
            && self.tls.same_settings(&other.tls)
    }

    pub fn addr(&self) -> String {
        crate::net::server_addr(&self.host, self.port)
    }
}

/// What pgshield can prove to a backend with. Its Debug shows no secret.
#[derive(Clone)]
pub enum BackendPassword {
    Plain(Secret),
    /// md5(password || user), as `md5` + 32 hex digits: enough for md5 servers only.
    Md5Hash(Secret),
    /// The output of `server_password_command`.
    Command(Arc<PasswordCommand>),
    /// SCRAM keys recovered from the user's own login (passthrough: no password at all).
    ScramKeys {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
}

impl std::fmt::Debug for BackendPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendPassword::Plain(_) => "Plain(********)",
            BackendPassword::Md5Hash(_) => "Md5Hash(********)",
            BackendPassword::Command(_) => "Command",
            BackendPassword::ScramKeys { .. } => "ScramKeys(********)",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {addr} within server_connect_timeout ({})", humantime::format_duration(*.timeout))]
    Timeout { addr: String, timeout: Duration },
    #[error("the server refused the login: {0}")]
    Refused(ErrorResponse),
    /// Refused once pgshield had answered its authentication request: the password (or
    /// keys) pgshield gave, whatever code and language the server says it in (PAM's
    /// 28000, which checks RDS IAM tokens, as much as 28P01).
    #[error("the server refused the login: {0}")]
    CredentialRefused(ErrorResponse),
    #[error(
        "the server asks for {method} authentication, but pgshield has no {need} for backend user \"{user}\" \
         (set server_password for that user)"
    )]
    NoPassword {
        method: &'static str,
        need: &'static str,
        user: String,
    },
    #[error("the server asks for an authentication method pgshield does not support ({0})")]
    UnsupportedAuth(String),
    #[error(
        "tls.server.channel_binding = require, but {0}: pgshield logs in to servers only with \
         SCRAM-SHA-256-PLUS over TLS, and sent nothing"
    )]
    Unbound(String),
    #[error("protocol error from the server: {0}")]
    Protocol(String),
    /// A borrow that may only lend an idle backend would have opened one (see
    /// `pool::lend_idle_only`); never reaches a client.
    #[error("no idle backend to lend without opening one")]
    NotOpened,
    /// An open waiting for a place under `max_db_connections` stepped back: a backend of
    /// its pool was given back, to be lent instead (see `pool::DbLimit::acquire`); never
    /// reaches a client.
    #[error("a backend of the pool was given back while one waited to open")]
    GivenBack,
    #[error("the server reported an error: {0}")]
    Query(ErrorResponse),
    #[error("the server closed the connection")]
    Closed,
    #[error("TLS to {addr} failed (tls.server.mode = {mode}): {reason}")]
    Tls {
        addr: String,
        mode: &'static str,
        reason: String,
    },
    #[error(
        "the server refused the SCRAM keys of the user's own login (passthrough): the verifier \
         pgshield checks the client against must be the server's own (pg_authid.rolpassword), \
         or set server_password"
    )]
    PassthroughRefused,
    #[error(
        "database {database} already has max_db_connections ({max}) backends open, all in use"
    )]
    DbLimit { database: String, max: usize },
    #[error(
        "no {want} of database {database} could be reached within borrow_timeout ({}): a failover may be under way",
        humantime::format_duration(*.waited)
    )]
    NoHost {
        database: String,
        want: &'static str,
        waited: Duration,
    },
    #[error("server_password_command: {0}")]
    PasswordCommand(String),
    #[error("i/o error on the server connection: {0}")]
    Io(#[source] std::io::Error),
}

impl ServerError {
    /// The error a client sees when its pool could not give it this backend.
    pub fn to_client_error(&self, pool: &str) -> ErrorResponse {
        match self {
            Error::Refused(e) | Error::CredentialRefused(e) => ErrorResponse::error(
                &e.code,
                format!(
                    "pgshield could not log in to the server for pool {pool}: {}",
                    e.message
                ),
            ),
            Error::DbLimit { .. } => ErrorResponse::error(
                sqlstate::TOO_MANY_CONNECTIONS,
                format!("pgshield could not open a backend for pool {pool}: {self}"),
            )
            .with_hint("raise max_db_connections, or shorten transactions"),
            _ => ErrorResponse::error(
                sqlstate::CONNECTION_FAILURE,
                format!("pgshield could not connect to the server for pool {pool}: {self}"),
            ),
        }
    }
}

/// Asks the server for TLS (SSLRequest) unless `tls.server.mode` is `disable`, and runs
/// the handshake and the certificate checks the mode asks for.
async fn negotiate_tls(target: &ServerTarget, stream: Stream) -> Result<Stream, Error> {
    let mode = target.tls.mode();
    // (Over a Unix-domain socket no TLS is asked for, as libpq asks for none.)
    if mode == ServerTlsMode::Disable || stream.is_unix() {
        return Ok(stream);
    }
    let failed = |reason: String| Error::Tls {
        addr: target.addr(),
        mode: mode_name(mode),
        reason,
    };
    match start_tls(stream, &target.tls, &target.host).await {
        Ok(tls) => Ok(tls),
        Err(StartTls::Declined(stream)) if mode == ServerTlsMode::Prefer => Ok(stream),
        Err(StartTls::Declined(_)) => {
            Err(failed("the server does not accept TLS connections".into()))
        }
        Err(StartTls::Io(e)) => Err(Error::Io(e)),
        // An old server may answer with an ErrorResponse.
        Err(StartTls::Answer(other)) => Err(Error::Protocol(format!(
            "unexpected answer '{}' to SSLRequest",
            char::from(other)
        ))),
        Err(StartTls::NotTcp) => Err(Error::Protocol("TLS requested twice".into())),
        Err(StartTls::Handshake(e)) => Err(failed(e.to_string())),
    }
}

/// Why [`start_tls`] gave no TLS stream.
pub(crate) enum StartTls {
    /// The server answered `N`: here is the connection, plaintext.
    Declined(Stream),
    Io(std::io::Error),
    /// Neither `S` nor `N`.
    Answer(u8),
    /// The connection is not plain TCP (TLS already, or a Unix-domain socket).
    NotTcp,
    Handshake(std::io::Error),
}

impl From<StartTls> for std::io::Error {
    fn from(e: StartTls) -> std::io::Error {
        match e {
            StartTls::Io(e) | StartTls::Handshake(e) => e,
            StartTls::Declined(_) => std::io::Error::other("the server declined TLS"),
            StartTls::Answer(a) => std::io::Error::other(format!(
                "unexpected answer '{}' to SSLRequest",
                char::from(a)
            )),
            StartTls::NotTcp => std::io::Error::other("not a plain TCP connection"),
        }
    }
}

/// SSLRequest on `stream`, then, if the server accepts, the handshake with `tls`'s
/// checks for `host` (logins, and the cancels of a backend logged in over TLS).
pub(crate) async fn start_tls(
    mut stream: Stream,
    tls: &ServerTls,
    host: &str,
) -> Result<Stream, StartTls> {
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    stream.send(&request).await.map_err(StartTls::Io)?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.map_err(StartTls::Io)?;
    match answer[0] {
        b'S' => {}
        b'N' => return Err(StartTls::Declined(stream)),
        other => return Err(StartTls::Answer(other)),
    }
    let tcp = stream.take_tcp().ok_or(StartTls::NotTcp)?;
    match tls.handshake(tcp, host).await {
        Ok(tls) => Ok(Stream::Tls(Box::new(tls.into()))),
        Err(e) => Err(StartTls::Handshake(e)),
    }
}

fn mode_name(mode: ServerTlsMode) -> &'static str {
    match mode {
        ServerTlsMode::Disable => "disable",
        ServerTlsMode::Prefer => "prefer",
        ServerTlsMode::Require => "require",
        ServerTlsMode::VerifyCa => "verify-ca",
        ServerTlsMode::VerifyFull => "verify-full",
    }
}

/// Opens, authenticates and readies one backend connection within `timeout`.
pub async fn connect(target: &ServerTarget, timeout: Duration) -> Result<Server, Error> {
    let within = |target: ServerTarget| async move {
        match tokio::time::timeout(timeout, connect_inner(&target)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                addr: target.addr(),
                timeout,
            }),
        }
    };
    match &target.password {
        Some(BackendPassword::Command(command)) => {
            // The command runs outside server_connect_timeout (it has its own limit). Its
            // answer is asked again, once, if the server refuses it: it may have rotated
            // since it was cached.
            let with = |secret: &Secret| {
                let mut resolved = target.clone();
                resolved.password = Some(BackendPassword::Plain(secret.clone()));
                resolved
            };
            let secret = command.password().await.map_err(Error::PasswordCommand)?;
            match within(with(&secret)).await {
                Err(Error::CredentialRefused(_)) => {
                    tracing::info!(addr = %target.addr(), "the server refused the password from server_password_command; asking it again");
                    command.forget(&secret).await;
                    let secret = command.password().await.map_err(Error::PasswordCommand)?;
                    within(with(&secret)).await
                }
                other => other,
            }
        }
        Some(BackendPassword::ScramKeys { .. }) => match within(target.clone()).await {
            Err(Error::CredentialRefused(e)) if e.code == sqlstate::INVALID_PASSWORD => {
                Err(Error::PassthroughRefused)
            }
            other => other,
        },
        _ => within(target.clone()).await,
    }
}

async fn open_stream(target: &ServerTarget) -> Result<Stream, Error> {
    crate::net::connect_server(&target.host, target.port)
        .await
        .map_err(|source| Error::Connect {
            addr: target.addr(),
            source,
        })
}

async fn connect_inner(target: &ServerTarget) -> Result<Server, Error> {
    let stream = match negotiate_tls(target, open_stream(target).await?).await {
        // As libpq's prefer: a server whose TLS fails is tried again in plaintext.
        Err(e @ (Error::Tls { .. } | Error::Protocol(_)))
            if target.tls.mode() == ServerTlsMode::Prefer =>
        {
            tracing::warn!(addr = %target.addr(), error = %e, "TLS to the server failed; tls.server.mode = prefer: trying without TLS");
            open_stream(target).await?
        }
        other => other?,
    };
    let mut server = Server::new(stream, &target.host, target.port);
    let mut out = BytesMut::new();
    let mut params = vec![
        ("user", target.user.as_str()),
        ("database", target.database.as_str()),
    ];
    if let Some(name) = target.application_name {
        params.push(("application_name", name));
    }
    frontend::startup_message(params, &mut out).map_err(Error::Io)?;
    send(&mut server, &mut out).await?;
    authenticate(&mut server, target).await?;
    loop {
        let (tag, body) = next_message(&mut server).await?;
        match tag {
            b'S' => {
                if let Some((name, value)) = parse_parameter_status(&body) {
                    server.note_param(name, value);
                }
            }
            b'K' if body.len() >= 8 => server.set_key(
                target,
                i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
                i32::from_be_bytes([body[4], body[5], body[6], body[7]]),
            ),
            b'Z' => return Ok(server),
            b'N' => {}
            b'E' => return Err(refused(&body)),
            other => return Err(unexpected(other, "after authentication")),
        }
    }
}

async fn authenticate(server: &mut Server, target: &ServerTarget) -> Result<(), Error> {
    let mut out = BytesMut::new();
    let mut scram: Option<Sasl> = None;
    // Once SCRAM has started, the server must prove itself (SASLFinal) before AuthOk.
    let mut server_proved = false;
    let binding_mode = target.tls.channel_binding();
    let required = binding_mode == ChannelBindingMode::Require;
    // Whether the exchange under way is bound to the server's certificate.
    let mut bound = false;
    // Whether pgshield has answered an authentication request: a refusal is then of
    // what it gave (before, of the login itself: no pg_hba.conf entry, say).
    let mut answered = false;
    loop {
        let (tag, body) = next_message(server).await?;
        match tag {
            b'R' if body.len() >= 4 => {}
            b'E' if answered => {
                return Err(match refused(&body) {
                    Error::Refused(e) => Error::CredentialRefused(e),
                    other => other,
                })
            }
            b'E' => return Err(refused(&body)),
            other => return Err(unexpected(other, "during authentication")),
        }
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let data = &body[4..];
        match code {
            0 if scram.is_some() && !server_proved => {
                return Err(Error::Protocol(
                    "the server ended SCRAM authentication without proving it knows the verifier"
                        .into(),
                ))
            }
            0 if required && !(bound && server_proved) => {
                return Err(unbound(
                    "the server accepted the login without authenticating it",
                ))
            }
            0 => return Ok(()),
            3 | 5 if required => {
                let method = if code == 3 {
                    "a cleartext password"
                } else {
                    "md5"
                };
                return Err(unbound(&format!("the server asks for {method}")));
            }
            3 => {
                let Some(BackendPassword::Plain(pw)) = &target.password else {
                    return Err(no_password(
                        "cleartext password",
                        "plaintext password",
                        target,
                    ));
                };
                frontend::password_message(pw.expose().as_bytes(), &mut out).map_err(Error::Io)?;
            }
            5 => {
                let salt: [u8; 4] = data
                    .get(..4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| Error::Protocol("md5 request without salt".into()))?;
                let response = match &target.password {
                    Some(BackendPassword::Plain(pw)) => {
                        postgres_protocol::authentication::md5_hash(
                            target.user.as_bytes(),
                            pw.expose().as_bytes(),
                            salt,
                        )
                    }
                    Some(BackendPassword::Md5Hash(hash)) => md5_from_hash(hash.expose(), salt),
                    // `connect` resolves commands before logging in; SCRAM keys cannot
                    // answer md5.
                    None
                    | Some(BackendPassword::Command(_) | BackendPassword::ScramKeys { .. }) => {
                        return Err(no_password("md5", "password", target))
                    }
                };
                frontend::password_message(response.as_bytes(), &mut out).map_err(Error::Io)?;
            }
            10 => {
                let offers = |name: &str| data.split(|&b| b == 0).any(|m| m == name.as_bytes());
                // Over TLS, bind the exchange to the server's certificate when it can.
                let end_point = server
                    .stream
                    .peer_server_certificate()
                    .and_then(crate::tls::server_end_point)
                    .filter(|_| binding_mode != ChannelBindingMode::Disable);
                if required && !(end_point.is_some() && offers(MECHANISM_PLUS)) {
                    return Err(unbound(if end_point.is_none() {
                        "the connection is not TLS"
                    } else {
                        "the server does not offer SCRAM-SHA-256-PLUS"
                    }));
                }
                let (mechanism, binding) =
                    match end_point {
                        Some(data) if offers(MECHANISM_PLUS) => {
                            bound = true;
                            (MECHANISM_PLUS, Binding::Bound(data))
                        }
                        _ if !offers(MECHANISM) => return Err(Error::UnsupportedAuth(
                            "SASL without SCRAM-SHA-256, and no channel binding pgshield can use"
                                .into(),
                        )),
                        // "y": pgshield could bind, the server did not offer it.
                        Some(_) => (MECHANISM, Binding::Unrequested),
                        None => (MECHANISM, Binding::Unsupported),
                    };
                let client = match &target.password {
                    Some(BackendPassword::Plain(pw)) => Sasl::Password(ScramSha256::new(
                        pw.expose().as_bytes(),
                        binding.for_password(),
                    )),
                    Some(BackendPassword::ScramKeys {
                        client_key,
                        server_key,
                    }) => {
                        let (header, cb): (&str, &[u8]) = match &binding {
                            Binding::Bound(data) => ("p=tls-server-end-point,,", data),
                            Binding::Unrequested => ("y,,", &[]),
                            Binding::Unsupported => ("n,,", &[]),
                        };
                        Sasl::Keys(ScramKeyClient::new(*client_key, *server_key, header, cb))
                    }
                    _ => return Err(no_password("SCRAM-SHA-256", "plaintext password", target)),
                };
                frontend::sasl_initial_response(mechanism, &client.first(), &mut out)
                    .map_err(Error::Io)?;
                scram = Some(client);
            }
            11 => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| Error::Protocol("SASL continue without SASL start".into()))?;
                let response = client
                    .update(data)
                    .map_err(|e| Error::Protocol(format!("SCRAM: {e}")))?;
                frontend::sasl_response(&response, &mut out).map_err(Error::Io)?;
            }
            12 => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| Error::Protocol("SASL final without SASL start".into()))?;
                client.finish(data).map_err(|e| {
                    Error::Protocol(format!(
                        "SCRAM: the server's signature does not verify: {e}"
                    ))
                })?;
                server_proved = true;
                continue;
            }
            7 | 8 => return Err(Error::UnsupportedAuth("GSSAPI".into())),
            9 => return Err(Error::UnsupportedAuth("SSPI".into())),
            other => {
                return Err(Error::UnsupportedAuth(format!(
                    "authentication request {other}"
                )))
            }
        }
        send(server, &mut out).await?;
        answered = true;
    }
}

/// The channel binding pgshield uses with a server.
enum Binding {
    Bound(Vec<u8>),
    /// pgshield could bind; the server did not offer it ("y").
    Unrequested,
    Unsupported,
}

impl Binding {
    fn for_password(&self) -> ChannelBinding {
        match self {
            Binding::Bound(data) => ChannelBinding::tls_server_end_point(data.clone()),
            Binding::Unrequested => ChannelBinding::unrequested(),
            Binding::Unsupported => ChannelBinding::unsupported(),
        }
    }
}

/// A SCRAM exchange with a server: from a password, or from keys (passthrough).
enum Sasl {
    Password(ScramSha256),
    Keys(ScramKeyClient),
}

impl Sasl {
    fn first(&self) -> Vec<u8> {
        match self {
            Sasl::Password(c) => c.message().to_vec(),
            Sasl::Keys(c) => c.first(),
        }
    }

    fn update(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Sasl::Password(c) => {
                c.update(server_first).map_err(|e| e.to_string())?;
                Ok(c.message().to_vec())
            }
            Sasl::Keys(c) => c.server_first(server_first).map_err(|e| e.to_string()),
        }
    }

    fn finish(&mut self, server_final: &[u8]) -> Result<(), String> {
        match self {
            Sasl::Password(c) => c.finish(server_final).map_err(|e| e.to_string()),
            Sasl::Keys(c) => c.server_final(server_final).map_err(|e| e.to_string()),
        }
    }
}

/// md5 response from a stored `md5…` hash: `md5` + md5(hex-hash-without-prefix || salt).
fn md5_from_hash(stored: &str, salt: [u8; 4]) -> String {
    let mut md5 = Md5::new();
    md5.update(&stored.as_bytes()[3..]);
    md5.update(salt);
    let digest = md5.finalize();
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

async fn send(server: &mut Server, out: &mut BytesMut) -> Result<(), Error> {
    server.stream.send(out).await.map_err(Error::Io)?;
    out.clear();
    Ok(())
}

async fn next_message(server: &mut Server) -> Result<(u8, BytesMut), Error> {
    read_message(&mut server.stream, &mut server.read_buf, MAX_LOGIN_MESSAGE)
        .await
        .map_err(Error::from_read)
}

fn refused(body: &[u8]) -> Error {
    Error::Refused(
        ErrorResponse::parse(body)
            .unwrap_or_else(|| ErrorResponse::fatal("XX000", "unparseable error from the server")),
    )
}

fn unexpected(tag: u8, when: &str) -> Error {
    Error::Protocol(format!(
        "unexpected message type '{}' {when}",
        char::from(tag)
    ))
}

/// A server that would have pgshield log in without channel binding, which
/// `tls.server.channel_binding = "require"` forbids.
fn unbound(what: &str) -> Error {
    Error::Unbound(what.to_owned())
}

fn no_password(method: &'static str, need: &'static str, target: &ServerTarget) -> Error {
    Error::NoPassword {
        method,
        need,
        user: target.user.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_from_a_stored_hash_matches_md5_from_the_password() {
        let salt = [1, 2, 3, 4];
        let stored = postgres_protocol::password::md5(b"pw", "bob");
        assert_eq!(
            md5_from_hash(&stored, salt),
            postgres_protocol::authentication::md5_hash(b"bob", b"pw", salt)
        );
    }
}
