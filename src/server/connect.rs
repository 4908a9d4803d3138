//! Opening a backend connection: TCP with a timeout, the startup message, authentication
//! (SCRAM-SHA-256 via postgres-protocol's client, md5, cleartext, trust), then the
//! ParameterStatus and BackendKeyData the server sends until its first ReadyForQuery.

use std::time::Duration;

use bytes::BytesMut;
use md5::{Digest, Md5};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{parse_parameter_status, Server, ServerError as Error};
use crate::config::Secret;
use crate::net::Stream;
use crate::protocol::frame::read_message;
use crate::protocol::sqlstate;
use crate::protocol::ErrorResponse;

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
}

impl ServerTarget {
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What pgshield can prove to a backend with.
#[derive(Debug, Clone)]
pub enum BackendPassword {
    Plain(Secret),
    /// md5(password || user), as `md5` + 32 hex digits: enough for md5 servers only.
    Md5Hash(Secret),
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
    #[error("protocol error from the server: {0}")]
    Protocol(String),
    #[error("the server reported an error: {0}")]
    Query(ErrorResponse),
    #[error("the server closed the connection")]
    Closed,
    #[error("i/o error on the server connection: {0}")]
    Io(#[source] std::io::Error),
}

impl ServerError {
    /// The error a client sees when its pool could not give it this backend.
    pub fn to_client_error(&self, pool: &str) -> ErrorResponse {
        match self {
            Error::Refused(e) => ErrorResponse::error(
                &e.code,
                format!(
                    "pgshield could not log in to the server for pool {pool}: {}",
                    e.message
                ),
            ),
            _ => ErrorResponse::error(
                sqlstate::CONNECTION_FAILURE,
                format!("pgshield could not connect to the server for pool {pool}: {self}"),
            ),
        }
    }
}

/// Opens, authenticates and readies one backend connection within `timeout`.
pub async fn connect(target: &ServerTarget, timeout: Duration) -> Result<Server, Error> {
    match tokio::time::timeout(timeout, connect_inner(target)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            addr: target.addr(),
            timeout,
        }),
    }
}

async fn connect_inner(target: &ServerTarget) -> Result<Server, Error> {
    let tcp = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| Error::Connect {
            addr: target.addr(),
            source,
        })?;
    let mut server = Server::new(Stream::from_tcp(tcp), &target.host, target.port);
    let mut out = BytesMut::new();
    frontend::startup_message(
        [
            ("user", target.user.as_str()),
            ("database", target.database.as_str()),
        ],
        &mut out,
    )
    .map_err(Error::Io)?;
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
                &target.host,
                target.port,
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
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (tag, body) = next_message(server).await?;
        match tag {
            b'R' if body.len() >= 4 => {}
            b'E' => return Err(refused(&body)),
            other => return Err(unexpected(other, "during authentication")),
        }
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let data = &body[4..];
        match code {
            0 => return Ok(()),
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
                    None => return Err(no_password("md5", "password", target)),
                };
                frontend::password_message(response.as_bytes(), &mut out).map_err(Error::Io)?;
            }
            10 => {
                let offers_scram = data
                    .split(|&b| b == 0)
                    .any(|m| m == crate::protocol::scram::MECHANISM.as_bytes());
                if !offers_scram {
                    return Err(Error::UnsupportedAuth(
                        "SASL without SCRAM-SHA-256 (channel binding needs TLS)".into(),
                    ));
                }
                let Some(BackendPassword::Plain(pw)) = &target.password else {
                    return Err(no_password("SCRAM-SHA-256", "plaintext password", target));
                };
                let client =
                    ScramSha256::new(pw.expose().as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(
                    crate::protocol::scram::MECHANISM,
                    client.message(),
                    &mut out,
                )
                .map_err(Error::Io)?;
                scram = Some(client);
            }
            11 => {
                let client = scram
                    .as_mut()
                    .ok_or_else(|| Error::Protocol("SASL continue without SASL start".into()))?;
                client
                    .update(data)
                    .map_err(|e| Error::Protocol(format!("SCRAM: {e}")))?;
                frontend::sasl_response(client.message(), &mut out).map_err(Error::Io)?;
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
    server.stream.write_all(out).await.map_err(Error::Io)?;
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
