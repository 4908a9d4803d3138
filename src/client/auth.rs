//! Client authentication: who may log in, and the server side of each method.
//!
//! Verifiers are derived once, when the directory is built from the configuration; a
//! login costs a few HMACs. Unknown users are walked through a SCRAM exchange against a
//! mock verifier and refused exactly like a wrong password, so user names cannot be probed.

use std::collections::HashMap;

use bytes::{Buf, BytesMut};
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::config::{AuthMethod, Config, Secret, StoredPassword};
use crate::net::Stream;
use crate::protocol::frame::{read_message, take_cstr, ReadError};
use crate::protocol::scram::{Channel, ScramExchange, ScramVerifier, MECHANISM, MECHANISM_PLUS};
use crate::protocol::{messages, sqlstate, ErrorResponse};

/// Largest password or SASL message a client may send.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

/// How one user proves who they are.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientAuth {
    Scram(ScramVerifier),
    /// md5(password || user) as 32 hex digits.
    Md5(String),
    Trust,
}

/// Every user allowed to log in, with a ready-to-use verifier.
pub struct UserDirectory {
    users: HashMap<String, ClientAuth>,
    /// What each user's verifier was derived from, so that a reload keeps the verifiers
    /// (and their salts) of users whose password did not change.
    derived_from: HashMap<String, (AuthMethod, Option<Secret>)>,
    /// Keys the salt of each name that has no stored verifier: an unknown user's, and a
    /// user's whose plaintext password pgshield derives a verifier from (so that both
    /// change, or stay, together). From `auth.salt_secret`, so that a restart gives every
    /// name the salt it had, as a stored verifier keeps its own (salts that changed for
    /// some names and not others would tell which names exist); random without it.
    salt_key: [u8; 32],
    /// The iteration count most of the SCRAM verifiers have, which an unknown user's is
    /// given too (PostgreSQL gives its own: `scram_iterations`).
    mock_iterations: u32,
}

impl UserDirectory {
    /// The users `config` has, configured or listed in `auth.file`. After a reload,
    /// `previous` (the directory replaced) hands on its salt key and the verifiers of
    /// unchanged users: salts that changed for some names and not others would tell which
    /// names exist.
    pub fn from_config(config: &Config, previous: Option<&UserDirectory>) -> UserDirectory {
        let salt_key = match previous {
            Some(p) => p.salt_key,
            None => salt_key(config),
        };
        let derived_from: HashMap<String, (AuthMethod, Option<Secret>)> = config
            .users
            .iter()
            .map(|(name, user)| (name.clone(), (user.auth, user.password.clone())))
            .chain(config.auth.listed.iter().map(|(name, password)| {
                let auth = crate::config::AuthConfig::listed_auth(password);
                (name.clone(), (auth, Some(password.clone())))
            }))
            .collect();
        let users: HashMap<String, ClientAuth> = derived_from
            .iter()
            .map(|(name, (auth, password))| {
                let unchanged = previous.and_then(|p| {
                    (p.derived_from.get(name) == derived_from.get(name))
                        .then(|| p.users.get(name).cloned())
                        .flatten()
                });
                if let Some(auth) = unchanged {
                    return (name.clone(), auth);
                }
                let stored = password
                    .as_ref()
                    .and_then(|p| StoredPassword::classify(p).ok());
                let auth = match (*auth, stored) {
                    (AuthMethod::Trust, _) | (_, None) => ClientAuth::Trust,
                    // Like PostgreSQL: an md5 user whose stored secret is a SCRAM verifier
                    // logs in with SCRAM.
                    (_, Some(StoredPassword::Scram(v))) => ClientAuth::Scram(v),
                    (AuthMethod::ScramSha256, Some(StoredPassword::Plain(p))) => {
                        ClientAuth::Scram(ScramVerifier::from_password_salted(
                            p.expose(),
                            &salt_for(&salt_key, name),
                            DEFAULT_ITERATIONS,
                        ))
                    }
                    (AuthMethod::Md5, Some(StoredPassword::Plain(p))) => ClientAuth::Md5(
                        postgres_protocol::password::md5(p.expose().as_bytes(), name)[3..]
                            .to_owned(),
                    ),
                    (_, Some(StoredPassword::Md5Hash(h))) => {
                        ClientAuth::Md5(h.expose()[3..].to_owned())
                    }
                };
                (name.clone(), auth)
            })
            .collect();
        let mock_iterations = most_common_iterations(users.values());
        UserDirectory {
            users,
            derived_from,
            salt_key,
            mock_iterations,
        }
    }

    pub fn lookup(&self, user: &str) -> Option<&ClientAuth> {
        self.users.get(user)
    }

    /// Makes the made-up verifier unknown users are walked through.
    pub fn mock(&self, user: &str) -> ClientAuth {
        ClientAuth::Scram(ScramVerifier::mock(
            salt_for(&self.salt_key, user),
            self.mock_iterations,
        ))
    }
}

/// PostgreSQL's `scram_iterations` default, and the count of the verifiers pgshield derives.
const DEFAULT_ITERATIONS: u32 = 4096;

/// The salt of `name` when no stored verifier gives it one.
fn salt_for(key: &[u8; 32], name: &str) -> [u8; 16] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(name.as_bytes());
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&mac.finalize().into_bytes()[..16]);
    salt
}

/// The key of the salts pgshield makes up (`auth.salt_secret`'s, or a random one). Never
/// derived from the passwords: the salts are shown to anyone who starts a login, and a
/// key made from a password would let them test guesses of it offline, cheaply.
fn salt_key(config: &Config) -> [u8; 32] {
    match &config.auth.salt_secret {
        Some(secret) => {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(b"pgshield SCRAM salts").expect("any key length");
            mac.update(secret.expose().as_bytes());
            mac.finalize().into_bytes().into()
        }
        None => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            key
        }
    }
}

/// The iteration count of most SCRAM verifiers among `users` (the smaller on a tie), or
/// PostgreSQL's default when there are none.
fn most_common_iterations<'a>(users: impl Iterator<Item = &'a ClientAuth>) -> u32 {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for user in users {
        if let ClientAuth::Scram(v) = user {
            *counts.entry(v.iterations).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(iterations, n)| (n, std::cmp::Reverse(iterations)))
        .map_or(DEFAULT_ITERATIONS, |(iterations, _)| iterations)
}

/// What a successful login proved.
#[derive(Debug, Default)]
pub struct Proof {
    /// The client key a SCRAM login revealed (for logging in to the server in its name).
    pub client_key: Option<[u8; 32]>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Wrong password or unknown user: the client is told the same either way.
    #[error("password authentication failed for user \"{0}\"")]
    Failed(String),
    #[error("{0}")]
    Protocol(String),
    #[error("client closed the connection during authentication")]
    Closed,
    #[error("i/o error during authentication: {0}")]
    Io(#[from] std::io::Error),
}

impl AuthError {
    /// What the client is sent before its connection closes (nothing if it is gone).
    pub fn to_client_error(&self) -> Option<ErrorResponse> {
        match self {
            AuthError::Failed(_) => Some(ErrorResponse::fatal(
                sqlstate::INVALID_PASSWORD,
                self.to_string(),
            )),
            AuthError::Protocol(_) => Some(ErrorResponse::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                self.to_string(),
            )),
            AuthError::Closed | AuthError::Io(_) => None,
        }
    }
}

impl From<ReadError> for AuthError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => AuthError::Io(e),
            ReadError::Closed => AuthError::Closed,
            ReadError::Frame(f) => AuthError::Protocol(f.to_string()),
        }
    }
}

/// Runs the authentication exchange for `user`. On success nothing has been sent yet for
/// the login's outcome: the exchange's last message, if it has one (SCRAM's
/// AuthenticationSASLFinal), is left in `out` for the caller to send with AuthenticationOk
/// and the rest of the welcome, in one write (a system call fewer per login), or before
/// its refusal. `end_point`: the TLS connection's channel binding data, which makes SCRAM-SHA-256-PLUS
/// available.
/// `auth` is how `user` proves who they are (a mock verifier for unknown users, so they
/// fail like a wrong password).
pub async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    auth: &ClientAuth,
    end_point: Option<&[u8]>,
    out: &mut BytesMut,
) -> Result<Proof, AuthError> {
    match auth {
        ClientAuth::Trust => Ok(Proof::default()),
        ClientAuth::Scram(verifier) => Ok(Proof {
            client_key: Some(scram((stream, buf, out), user, verifier, end_point).await?),
        }),
        ClientAuth::Md5(hash) => {
            md5((stream, buf, out), user, hash).await?;
            Ok(Proof::default())
        }
    }
}

/// The client's stream, the buffer its messages are read into, and the one pgshield's
/// are written into.
type Io<'a> = (&'a mut Stream, &'a mut BytesMut, &'a mut BytesMut);

async fn scram(
    (stream, buf, out): Io<'_>,
    user: &str,
    verifier: &ScramVerifier,
    end_point: Option<&[u8]>,
) -> Result<[u8; 32], AuthError> {
    match end_point {
        Some(_) => messages::authentication_sasl(out, &[MECHANISM_PLUS, MECHANISM]),
        None => messages::authentication_sasl(out, &[MECHANISM]),
    }
    send(stream, out).await?;

    let body = read_password_message(stream, buf).await?;
    let (mechanism, client_first) = parse_sasl_initial_response(&body)?;
    let channel = match (mechanism, end_point) {
        (MECHANISM, _) => Channel::Unbound {
            could_bind: end_point.is_some(),
        },
        (MECHANISM_PLUS, Some(data)) => Channel::Bound(data),
        _ => {
            return Err(AuthError::Protocol(
                "client selected an invalid SASL authentication mechanism".into(),
            ))
        }
    };
    let (exchange, server_first) = ScramExchange::start(verifier, client_first, channel)
        .map_err(|e| AuthError::Protocol(e.to_string()))?;
    messages::authentication_sasl_continue(out, &server_first);
    send(stream, out).await?;

    let client_final = read_password_message(stream, buf).await?;
    let success = exchange.finish(&client_final).map_err(|e| match e {
        crate::protocol::scram::ScramError::WrongProof => AuthError::Failed(user.to_owned()),
        other => AuthError::Protocol(other.to_string()),
    })?;
    // (Sent by the caller, with what follows.)
    messages::authentication_sasl_final(out, &success.server_final);
    Ok(success.client_key)
}

async fn md5((stream, buf, out): Io<'_>, user: &str, hash_hex: &str) -> Result<(), AuthError> {
    let mut salt = [0u8; 4];
    rand::rng().fill_bytes(&mut salt);
    messages::authentication_md5(out, salt);
    send(stream, out).await?;

    let body = read_password_message(stream, buf).await?;
    let mut rest = &body[..];
    let given = take_cstr(&mut rest)
        .ok_or_else(|| AuthError::Protocol("malformed password message".into()))?;
    let mut md5 = Md5::new();
    md5.update(hash_hex.as_bytes());
    md5.update(salt);
    let expected = format!("md5{}", hex(&md5.finalize()));
    if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        Ok(())
    } else {
        Err(AuthError::Failed(user.to_owned()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn send(stream: &mut Stream, out: &mut BytesMut) -> Result<(), AuthError> {
    stream.send(out).await?;
    out.clear();
    Ok(())
}

/// Reads the client's next message, which must be a password/SASL response (`p`).
async fn read_password_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<BytesMut, AuthError> {
    let (tag, body) = read_message(stream, buf, MAX_AUTH_MESSAGE).await?;
    if tag != b'p' {
        return Err(AuthError::Protocol(format!(
            "expected password response, got message type '{}'",
            char::from(tag)
        )));
    }
    Ok(body)
}

fn parse_sasl_initial_response(body: &[u8]) -> Result<(&str, &[u8]), AuthError> {
    let malformed = || AuthError::Protocol("malformed SASLInitialResponse message".into());
    let mut rest = body;
    let mechanism = take_cstr(&mut rest).ok_or_else(malformed)?;
    if rest.len() < 4 {
        return Err(malformed());
    }
    let len = rest.get_i32();
    if len < 0 || len as usize != rest.len() {
        return Err(malformed());
    }
    Ok((mechanism, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;

    #[test]
    fn sasl_initial_response_layout() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&5i32.to_be_bytes());
        body.extend_from_slice(b"n,,ab");
        let (m, data) = parse_sasl_initial_response(&body).unwrap();
        assert_eq!((m, data), ("SCRAM-SHA-256", &b"n,,ab"[..]));
        body.push(b'x');
        assert!(parse_sasl_initial_response(&body).is_err());
        assert!(parse_sasl_initial_response(b"SCRAM").is_err());
    }

    #[test]
    fn directory_picks_the_method_postgres_would() {
        let config = Config::from_toml(&format!(
            r#"
            [databases.app]
            host = "127.0.0.1"
            [users.s]
            password = "pw"
            [users.m]
            auth = "md5"
            password = "pw"
            [users.mv]
            auth = "md5"
            password = "{}"
            [users.t]
            auth = "trust"
            "#,
            postgres_protocol::password::scram_sha_256(b"pw")
        ))
        .unwrap();
        let dir = UserDirectory::from_config(&config, None);
        assert!(matches!(dir.lookup("s"), Some(ClientAuth::Scram(_))));
        let Some(ClientAuth::Md5(h)) = dir.lookup("m") else {
            panic!()
        };
        assert_eq!(
            format!("md5{h}"),
            postgres_protocol::password::md5(b"pw", "m")
        );
        assert!(matches!(dir.lookup("mv"), Some(ClientAuth::Scram(_))));
        assert!(matches!(dir.lookup("t"), Some(ClientAuth::Trust)));
        assert!(dir.lookup("nobody").is_none());
    }

    #[test]
    fn a_reload_keeps_unchanged_verifiers_and_the_made_up_ones() {
        let config = |b: &str| {
            Config::from_toml(&format!(
                "[databases.app]\nhost = \"127.0.0.1\"\n[users.a]\npassword = \"pa\"\n\
                 [users.b]\npassword = \"{b}\"\n"
            ))
            .unwrap()
        };
        let first = UserDirectory::from_config(&config("pb"), None);
        let reloaded = UserDirectory::from_config(&config("changed"), Some(&first));
        assert_eq!(first.lookup("a"), reloaded.lookup("a"), "same salt");
        assert_ne!(first.lookup("b"), reloaded.lookup("b"));
        let salt = |auth: ClientAuth| match auth {
            ClientAuth::Scram(v) => v.salt,
            _ => panic!("a SCRAM verifier"),
        };
        assert_eq!(salt(first.mock("x")), salt(reloaded.mock("x")));
        assert_ne!(salt(first.mock("x")), salt(first.mock("y")));
        // Without auth.salt_secret, a restart salts afresh, made-up and derived alike.
        let restarted = UserDirectory::from_config(&config("pb"), None);
        assert_ne!(first.lookup("a"), restarted.lookup("a"));
        assert_ne!(salt(first.mock("x")), salt(restarted.mock("x")));
        // With it, a restart gives every name the salt it had (a stored verifier keeps
        // its own), so that the names whose salts stay cannot be told from the others;
        // and the salts owe nothing to the passwords (they are shown to anyone: a key
        // made from a password would let guesses of it be tested offline).
        let keyed = |b: &str, secret: &str| {
            Config::from_toml(&format!(
                "[databases.app]\nhost = \"127.0.0.1\"\n[users.a]\npassword = \"pa\"\n\
                 [users.b]\npassword = \"{b}\"\n[auth]\nsalt_secret = \"{secret}\"\n"
            ))
            .unwrap()
        };
        let secret = "0123456789abcdef0123456789abcdef";
        let one = UserDirectory::from_config(&keyed("pb", secret), None);
        let two = UserDirectory::from_config(&keyed("pb", secret), None);
        assert_eq!(one.lookup("a"), two.lookup("a"));
        assert_eq!(salt(one.mock("x")), salt(two.mock("x")));
        let other_password = UserDirectory::from_config(&keyed("other", secret), None);
        assert_eq!(salt(one.mock("x")), salt(other_password.mock("x")));
        assert_eq!(
            salt(one.lookup("b").cloned().unwrap()),
            salt(other_password.lookup("b").cloned().unwrap()),
            "b's salt does not follow its password"
        );
        let other_secret = UserDirectory::from_config(&keyed("pb", &"z".repeat(32)), None);
        assert_ne!(salt(one.mock("x")), salt(other_secret.mock("x")));
        let short = Config::from_toml(
            "[databases.app]\nhost = \"127.0.0.1\"\n[auth]\nsalt_secret = \"short\"\n",
        )
        .expect_err("too short");
        assert!(short.to_string().contains("auth.salt_secret"), "{short}");
    }

    #[test]
    fn an_unknown_user_is_given_the_iteration_count_most_verifiers_have() {
        let verifier = |pw: &str, salt: u8| {
            let v = ScramVerifier::from_password_salted(pw, &[salt; 16], 10_000);
            format!(
                "SCRAM-SHA-256${}:{}${}:{}",
                v.iterations,
                B64.encode(&v.salt),
                B64.encode(v.stored_key),
                B64.encode(v.server_key)
            )
        };
        let config = Config::from_toml(&format!(
            "[databases.app]\nhost = \"127.0.0.1\"\n[users.a]\npassword = \"{}\"\n\
             [users.b]\npassword = \"{}\"\n[users.c]\npassword = \"plain\"\n",
            verifier("pa", 1),
            verifier("pb", 2)
        ))
        .unwrap();
        let dir = UserDirectory::from_config(&config, None);
        let iterations = |auth: Option<ClientAuth>| match auth {
            Some(ClientAuth::Scram(v)) => v.iterations,
            _ => panic!("a SCRAM verifier"),
        };
        assert_eq!(iterations(dir.lookup("c").cloned()), 4096);
        assert_eq!(iterations(Some(dir.mock("nobody"))), 10_000);
        let plain = Config::from_toml(
            "[databases.app]\nhost = \"127.0.0.1\"\n[users.c]\npassword = \"plain\"\n",
        )
        .unwrap();
        let dir = UserDirectory::from_config(&plain, None);
        assert_eq!(iterations(Some(dir.mock("nobody"))), 4096);
    }
}
