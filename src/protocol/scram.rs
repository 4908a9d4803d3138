//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: the server side, and a
//! client side that logs in from keys rather than a password (passthrough).
//!
//! A login costs two HMACs and a hash against a stored verifier: the expensive PBKDF2 ran
//! once, when the verifier was made (at config load for plaintext passwords), never per
//! login. Unknown users go through the same exchange against a made-up verifier, so a
//! client cannot tell "no such user" from "wrong password".

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// With `tls-server-end-point` channel binding (over TLS only).
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
const NONCE_RAW_LEN: usize = 18;

/// A `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` verifier, as in `pg_authid`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(********)")
    }
}

impl ScramVerifier {
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or("missing SCRAM-SHA-256$ prefix")?;
        let (params, keys) = rest.split_once('$').ok_or("missing '$' before the keys")?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or("missing ':' after the iteration count")?;
        let (stored, server) = keys.split_once(':').ok_or("missing ':' between the keys")?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| "iteration count is not a number")?;
        if iterations == 0 {
            return Err("iteration count must be positive");
        }
        let salt = B64.decode(salt).map_err(|_| "salt is not base64")?;
        let key = |k: &str| -> Result<[u8; 32], &'static str> {
            B64.decode(k)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or("keys must be 32 bytes of base64")
        };
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// Derives a verifier from a plaintext password (PBKDF2: run once, at load) with a
    /// random salt.
    pub fn from_password(password: &str) -> Self {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&text).expect("postgres-protocol produces valid verifiers")
    }

    /// The verifier PostgreSQL would store for `password` with this salt and iteration
    /// count: the password SASLprep'd (its bytes as they are when SASLprep refuses it, as
    /// PostgreSQL does), then PBKDF2-HMAC-SHA-256.
    pub fn from_password_salted(password: &str, salt: &[u8], iterations: u32) -> Self {
        let prepared = stringprep::saslprep(password)
            .map(|p| p.into_owned().into_bytes())
            .unwrap_or_else(|_| password.as_bytes().to_vec());
        let salted = pbkdf2_sha256(&prepared, salt, iterations.max(1));
        let client_key = hmac(&salted, b"Client Key");
        ScramVerifier {
            iterations: iterations.max(1),
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// A stand-in for a user that does not exist: `salt` (stable per name, as PostgreSQL's
    /// mock authentication's) and keys nobody can match.
    pub fn mock(salt: [u8; 16], iterations: u32) -> Self {
        let mut stored_key = [0u8; 32];
        rand::rng().fill_bytes(&mut stored_key);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key,
            server_key: [0u8; 32],
        }
    }
}

/// PBKDF2 with HMAC-SHA-256 and a 32-byte output: SCRAM's `Hi()`.
fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = Hmac::<Sha256>::new_from_slice(password).expect("any key length");
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut block: [u8; 32] = mac.finalize().into_bytes().into();
    let mut sum = block;
    for _ in 1..iterations {
        let mut mac = keyed.clone();
        mac.update(&block);
        block = mac.finalize().into_bytes().into();
        sum.iter_mut().zip(block).for_each(|(s, b)| *s ^= b);
    }
    sum
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("client uses an authorization identity, which is not supported")]
    AuthzidUnsupported,
    #[error("password does not match")]
    WrongProof,
}

/// The mechanism the client chose, with what the server knows of the channel.
#[derive(Debug, Clone, Copy)]
pub enum Channel<'a> {
    /// SCRAM-SHA-256; `could_bind`: the server offered SCRAM-SHA-256-PLUS too.
    Unbound { could_bind: bool },
    /// SCRAM-SHA-256-PLUS, with the `tls-server-end-point` data of this connection.
    Bound(&'a [u8]),
}

/// State between the server-first and client-final messages.
pub struct ScramExchange<'v> {
    verifier: &'v ScramVerifier,
    /// What the client-final-message's `c=` must carry, decoded.
    expected_binding: Vec<u8>,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// What a successful exchange yields.
pub struct ScramSuccess {
    /// `v=…`, sent to the client in AuthenticationSASLFinal.
    pub server_final: Vec<u8>,
    /// The client key recovered from the proof (for passing authentication through).
    pub client_key: [u8; 32],
}

impl<'v> ScramExchange<'v> {
    /// Takes the client-first-message, returns the exchange and the server-first-message.
    pub fn start(
        verifier: &'v ScramVerifier,
        client_first: &[u8],
        channel: Channel<'_>,
    ) -> Result<(Self, Vec<u8>), ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (gs2_header, bare) = split_gs2_header(msg)?;
        let flag = &gs2_header[..gs2_header.find(',').unwrap_or(0)];
        let mut expected_binding = gs2_header.as_bytes().to_vec();
        // PostgreSQL's rules: the flag must agree with the mechanism, and "y" (client could
        // bind but thinks the server cannot) is a downgrade when the server offered binding.
        match (channel, flag) {
            (Channel::Bound(data), "p=tls-server-end-point") => {
                expected_binding.extend_from_slice(data)
            }
            (Channel::Bound(_), f) if f.starts_with("p=") => {
                return Err(ScramError::Malformed(
                    "unsupported channel binding type (only tls-server-end-point)",
                ))
            }
            (Channel::Bound(_), _) => {
                return Err(ScramError::Malformed(
                    "SCRAM-SHA-256-PLUS selected without channel binding data",
                ))
            }
            (Channel::Unbound { .. }, f) if f.starts_with("p=") => {
                return Err(ScramError::Malformed(
                    "channel binding data sent with SCRAM-SHA-256 (select SCRAM-SHA-256-PLUS)",
                ))
            }
            (Channel::Unbound { could_bind: true }, "y") => {
                return Err(ScramError::Malformed(
                    "channel binding negotiation error: the client thinks the server cannot bind, but it can",
                ))
            }
            (Channel::Unbound { .. }, _) => {}
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no client nonce"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("client nonce is not printable"));
        }
        if !bare.starts_with("n=") {
            return Err(ScramError::Malformed("expected n= attribute"));
        }
        let mut raw = [0u8; NONCE_RAW_LEN];
        rand::rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = ScramExchange {
            verifier,
            expected_binding,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first.into_bytes()))
    }

    /// Checks the client-final-message's proof; on success returns the server-final-message.
    pub fn finish(self, client_final: &[u8]) -> Result<ScramSuccess, ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("expected c= attribute"))?;
        if B64.decode(binding).ok().as_deref() != Some(self.expected_binding.as_slice()) {
            return Err(ScramError::Malformed(
                "channel binding data does not match the header",
            ));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected r= attribute"))?;
        if nonce != self.nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;

        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(proof.iter().zip(client_signature.iter()))
        {
            *k = p ^ s;
        }
        let stored: [u8; 32] = Sha256::digest(client_key).into();
        if !bool::from(stored.ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(ScramSuccess {
            server_final: format!("v={}", B64.encode(server_signature)).into_bytes(),
            client_key,
        })
    }
}

/// The client side of SCRAM-SHA-256 from keys instead of a password: how pgshield logs in
/// to a server as a user whose password it never saw (passthrough). The client key was
/// recovered from that user's own successful login to pgshield; the server key comes
/// from the same verifier and proves the server knows it too.
pub struct ScramKeyClient {
    client_key: [u8; 32],
    server_key: [u8; 32],
    /// The GS2 header followed by the channel binding data (what `c=` carries).
    binding: Vec<u8>,
    header_len: usize,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl ScramKeyClient {
    /// `binding`: the GS2 header to send (`n,,`, `y,,`, `p=tls-server-end-point,,`) and
    /// the channel binding data that goes with it (empty unless `p=`).
    pub fn new(
        client_key: [u8; 32],
        server_key: [u8; 32],
        gs2_header: &str,
        cb_data: &[u8],
    ) -> ScramKeyClient {
        let mut raw = [0u8; NONCE_RAW_LEN];
        rand::rng().fill_bytes(&mut raw);
        let nonce = B64.encode(raw);
        let mut binding = gs2_header.as_bytes().to_vec();
        binding.extend_from_slice(cb_data);
        ScramKeyClient {
            client_key,
            server_key,
            header_len: gs2_header.len(),
            binding,
            // PostgreSQL takes the user from the startup packet, not from n=.
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            auth_message: None,
        }
    }

    /// The client-first-message.
    pub fn first(&self) -> Vec<u8> {
        let mut msg = self.binding[..self.header_len].to_vec();
        msg.extend_from_slice(self.client_first_bare.as_bytes());
        msg
    }

    /// Takes the server-first-message, returns the client-final-message.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = msg
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no server nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Malformed(
                "the server's nonce does not extend ours",
            ));
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(&self.binding));
        let auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(self.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self
            .client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message: the server proves it holds the same verifier.
    pub fn server_final(&self, msg: &[u8]) -> Result<(), ScramError> {
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or(ScramError::Malformed("server-final before server-first"))?;
        let msg = std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let signature = msg
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::Malformed("expected v= attribute"))?;
        let expected = hmac(&self.server_key, auth_message.as_bytes());
        if bool::from(expected.as_slice().ct_eq(&signature)) {
            Ok(())
        } else {
            Err(ScramError::Malformed(
                "the server's signature does not verify",
            ))
        }
    }
}

/// Splits `n,,n=user,r=nonce` into the GS2 header (`n,,`) and the bare message.
fn split_gs2_header(msg: &str) -> Result<(&str, &str), ScramError> {
    let (flag, rest) = msg
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    match flag {
        "n" | "y" => {}
        f if f.starts_with("p=") => {}
        _ => return Err(ScramError::Malformed("unknown channel binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("no GS2 header"))?;
    if !authzid.is_empty() {
        return Err(ScramError::AuthzidUnsupported);
    }
    let header_len = flag.len() + authzid.len() + 2;
    Ok((&msg[..header_len], bare))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a full exchange with postgres-protocol's client (what tokio-postgres uses).
    fn login(verifier: &ScramVerifier, password: &str) -> Result<(), ScramError> {
        login_with(
            verifier,
            password,
            ChannelBinding::unrequested(),
            Channel::Unbound { could_bind: false },
        )
    }

    fn login_with(
        verifier: &ScramVerifier,
        password: &str,
        binding: ChannelBinding,
        channel: Channel<'_>,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let (exchange, server_first) = ScramExchange::start(verifier, client.message(), channel)?;
        client
            .update(&server_first)
            .expect("client accepts server-first");
        let success = exchange.finish(client.message())?;
        client
            .finish(&success.server_final)
            .expect("client verifies the server signature");
        Ok(())
    }

    #[test]
    fn the_right_password_logs_in_and_the_server_proves_itself() {
        let v = ScramVerifier::from_password("s3cret");
        assert_eq!(login(&v, "s3cret"), Ok(()));
    }

    #[test]
    fn a_wrong_password_is_refused() {
        let v = ScramVerifier::from_password("s3cret");
        assert_eq!(login(&v, "guess"), Err(ScramError::WrongProof));
    }

    #[test]
    fn a_mock_verifier_refuses_every_password() {
        let a = ScramVerifier::mock([7u8; 16], 4096);
        assert_eq!(a.salt, [7u8; 16]);
        assert_eq!(login(&a, ""), Err(ScramError::WrongProof));
    }

    #[test]
    fn a_salted_verifier_is_the_one_postgres_makes() {
        // SASLprep maps the non-breaking space to a space and drops the soft hyphen; a
        // prohibited character leaves the bytes as they are.
        for password in ["pw", "p\u{a0}w\u{ad}ord", "bad\u{7}char", ""] {
            let theirs = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(
                password.as_bytes(),
            ))
            .unwrap();
            let ours = ScramVerifier::from_password_salted(password, &theirs.salt, 4096);
            assert!(ours == theirs, "{password:?}");
            assert_eq!(login(&ours, password), Ok(()));
        }
    }

    #[test]
    fn verifiers_parse_as_postgres_stores_them() {
        let text = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&text).unwrap();
        assert_eq!(v.iterations, 4096);
        assert_eq!(login(&v, "pw"), Ok(()));
        for bad in [
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$0:AAAA$AAAA:AAAA",
            "md5abc",
            "SCRAM-SHA-256$4096:%%$a:b",
        ] {
            assert!(ScramVerifier::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_recovered_client_key_logs_in_without_the_password() {
        let v = ScramVerifier::from_password("pw");
        // The key a real client's login reveals.
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let unbound = Channel::Unbound { could_bind: false };
        let (exchange, server_first) = ScramExchange::start(&v, client.message(), unbound).unwrap();
        client.update(&server_first).unwrap();
        let key = exchange.finish(client.message()).unwrap().client_key;
        // pgshield logs in with it, with and without channel binding.
        let data = [b','; 32];
        for (header, cb, channel) in [
            ("n,,", &[][..], Channel::Unbound { could_bind: false }),
            ("p=tls-server-end-point,,", &data[..], Channel::Bound(&data)),
        ] {
            let mut keys = ScramKeyClient::new(key, v.server_key, header, cb);
            let (exchange, server_first) =
                ScramExchange::start(&v, &keys.first(), channel).unwrap();
            let last = keys.server_first(&server_first).unwrap();
            let success = exchange.finish(&last).expect("the key proves the user");
            keys.server_final(&success.server_final)
                .expect("the server proves itself");
            assert!(keys.server_final(b"v=AAAA").is_err());
        }
        // A wrong key does not.
        let mut keys = ScramKeyClient::new([1; 32], v.server_key, "n,,", &[]);
        let unbound = Channel::Unbound { could_bind: false };
        let (exchange, server_first) = ScramExchange::start(&v, &keys.first(), unbound).unwrap();
        let last = keys.server_first(&server_first).unwrap();
        assert_eq!(exchange.finish(&last).err(), Some(ScramError::WrongProof));
    }

    #[test]
    fn channel_binding_follows_postgres_rules() {
        let v = ScramVerifier::from_password("pw");
        let data = [9u8; 32];
        let bound = Channel::Bound(&data);
        let cb = |d: &[u8]| ChannelBinding::tls_server_end_point(d.to_vec());
        assert_eq!(login_with(&v, "pw", cb(&data), bound), Ok(()));
        // Data from another certificate (a man in the middle) does not match.
        assert!(matches!(
            login_with(&v, "pw", cb(&[8u8; 32]), bound),
            Err(ScramError::Malformed(_))
        ));
        // PLUS chosen without binding, and binding sent without PLUS, are refused.
        assert!(login_with(&v, "pw", ChannelBinding::unsupported(), bound).is_err());
        let could_bind = Channel::Unbound { could_bind: true };
        assert!(login_with(&v, "pw", cb(&data), could_bind).is_err());
        // "y" when the server offered binding: a downgrade.
        assert!(login_with(&v, "pw", ChannelBinding::unrequested(), could_bind).is_err());
        assert_eq!(
            login_with(&v, "pw", ChannelBinding::unsupported(), could_bind),
            Ok(())
        );
    }

    #[test]
    fn malformed_client_messages_are_refused() {
        let v = ScramVerifier::from_password("pw");
        for first in [
            &b""[..],
            b"n,,",
            b"x,,n=,r=abc",
            b"n,a=admin,n=,r=abc",
            b"n,,n=,r=",
            b"\xff",
        ] {
            let unbound = Channel::Unbound { could_bind: false };
            assert!(
                ScramExchange::start(&v, first, unbound).is_err(),
                "{first:?}"
            );
        }
        let unbound = Channel::Unbound { could_bind: false };
        assert!(ScramExchange::start(&v, b"p=tls-server-end-point,,n=,r=abc", unbound).is_err());
        let (ex, _) = ScramExchange::start(&v, b"n,,n=,r=abc", unbound).unwrap();
        assert!(ex.finish(b"c=biws,r=wrongnonce,p=AAAA").is_err());
    }
}
