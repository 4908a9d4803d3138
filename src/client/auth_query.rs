//! `[auth]`: users that are not in `[users]` are looked up in the database, as PgBouncer's
//! auth_query does. pgshield logs in as `auth.user`, runs `auth.query` with the user name,
//! and reads the row: (name, SCRAM verifier or md5 hash [, expired]). No row, a NULL
//! secret or `expired = true` means the user cannot log in (the client gets the same
//! 28P01 as for a wrong password). Answers, "no such user" included, are reused for
//! `auth.cache_ttl`; concurrent logins of one user wait for one lookup, and at most
//! [`MAX_LOOKUPS`] run at once, on connections kept for the next lookups (a lookup is
//! then one query, not a login and a server process forked for it).
//!
//! After a SCRAM login against a verifier found here, pgshield logs in to the server as
//! that user with the client key the login revealed (see `ScramKeyClient`): no password
//! is stored anywhere. An md5 hash found here logs in to md5 servers the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres_protocol::escape::escape_literal;

use super::auth::ClientAuth;
use crate::config::{AuthConfig, Config, StoredPassword};
use crate::server::{connect, BackendPassword, Server, ServerTarget};
use crate::tls::ServerTls;

/// Lookups running at once, whatever the number of clients logging in.
const MAX_LOOKUPS: usize = 4;
/// Users remembered at most (probing for names cannot grow memory without bound).
const MAX_CACHED: usize = 100_000;
/// PostgreSQL's longest role name (NAMEDATALEN - 1).
const MAX_ROLE_NAME: usize = 63;
/// The longest one lookup query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection of `auth.user` is kept for the next lookup, and how long at most
/// it is used at all.
const IDLE_KEEP: Duration = Duration::from_secs(60);
const MAX_AGE: Duration = Duration::from_secs(600);

type Slot = Arc<tokio::sync::Mutex<Option<(Option<ClientAuth>, Instant)>>>;

pub struct AuthQuery {
    query: String,
    ttl: Duration,
    connect_timeout: Duration,
    /// Where the query runs for each configured database.
    targets: HashMap<String, Arc<Target>>,
    cache: Mutex<HashMap<(String, String), Slot>>,
}

struct Target {
    server: ServerTarget,
    /// The lookups it allows at once (per database, so a database that is down does not
    /// hold up the others).
    running: tokio::sync::Semaphore,
    /// Connections a lookup finished with, and since when (at most [`MAX_LOOKUPS`]).
    idle: Mutex<Vec<(Server, Instant)>>,
    /// A task closes those kept too long (while there are any).
    pruning: std::sync::atomic::AtomicBool,
}

impl AuthQuery {
    /// `None` unless `[auth] enabled = true`.
    pub fn from_config(config: &Config, tls: &Arc<ServerTls>) -> Option<AuthQuery> {
        let auth: &AuthConfig = &config.auth;
        if !auth.enabled {
            return None;
        }
        let password =
            auth.password
                .as_ref()
                .and_then(|p| match StoredPassword::classify(p).ok()? {
                    StoredPassword::Plain(s) => Some(BackendPassword::Plain(s)),
                    StoredPassword::Md5Hash(s) => Some(BackendPassword::Md5Hash(s)),
                    StoredPassword::Scram(_) => None,
                });
        let targets = config
            .databases
            .iter()
            .map(|(name, db)| {
                let target = ServerTarget {
                    host: db.host.clone(),
                    port: db.port,
                    database: auth
                        .dbname
                        .clone()
                        .or_else(|| db.dbname.clone())
                        .unwrap_or_else(|| name.clone()),
                    user: auth.user.clone().unwrap_or_default(),
                    password: password.clone(),
                    tls: Arc::clone(tls),
                    application_name: Some("pgshield auth_query"),
                };
                let target = Arc::new(Target {
                    server: target,
                    running: tokio::sync::Semaphore::new(MAX_LOOKUPS),
                    idle: Mutex::new(Vec::new()),
                    pruning: Default::default(),
                });
                (name.clone(), target)
            })
            .collect();
        Some(AuthQuery {
            query: auth.query.clone(),
            ttl: auth.cache_ttl,
            connect_timeout: config.pool.server_connect_timeout,
            targets,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// How `user` proves who they are when connecting to `database`: `Ok(None)` if they
    /// cannot log in; `Err` if the lookup itself failed (the server is down, say).
    pub async fn lookup(&self, database: &str, user: &str) -> Result<Option<ClientAuth>, String> {
        let Some(target) = self.targets.get(database) else {
            return Ok(None);
        };
        // PostgreSQL role names are at most 63 bytes: a longer one names nobody.
        if user.len() > MAX_ROLE_NAME {
            return Ok(None);
        }
        let slot = self.slot(database, user);
        let mut slot = slot.lock().await;
        if let Some((auth, at)) = slot.as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(auth.clone());
            }
        }
        let _turn = target
            .running
            .acquire()
            .await
            .map_err(|_| "pgshield is shutting down".to_owned())?;
        let auth = self.fetch(target, user).await?;
        *slot = Some((auth.clone(), Instant::now()));
        Ok(auth)
    }

    fn slot(&self, database: &str, user: &str) -> Slot {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let key = (database.to_owned(), user.to_owned());
        if cache.len() >= MAX_CACHED && !cache.contains_key(&key) {
            // Full (names being probed, say): forget "no such user" answers and expired
            // ones nobody is waiting on; real users' answers stay.
            cache.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot.try_lock().is_ok_and(|cached| {
                        cached
                            .as_ref()
                            .is_some_and(|(auth, at)| auth.is_some() && at.elapsed() < self.ttl)
                    })
            });
            if cache.len() >= MAX_CACHED {
                // Still full: this lookup goes uncached.
                return Slot::default();
            }
        }
        Arc::clone(cache.entry(key).or_default())
    }

    async fn fetch(&self, target: &Arc<Target>, user: &str) -> Result<Option<ClientAuth>, String> {
        let sql = self.query.replace("$1", &escape_literal(user));
        // A kept connection, if one is still good; else (or if it fails: the server may
        // have restarted since) a new one.
        let (mut server, kept) = match target.take_idle() {
            Some(server) => (server, true),
            None => (self.connect(target).await?, false),
        };
        let mut ran = tokio::time::timeout(QUERY_TIMEOUT, server.run_internal(&sql)).await;
        if kept && matches!(ran, Ok(Err(_))) {
            server = self.connect(target).await?;
            ran = tokio::time::timeout(QUERY_TIMEOUT, server.run_internal(&sql)).await;
        }
        let reply = match ran {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("auth.query took more than {QUERY_TIMEOUT:?}")),
        };
        if let Some(e) = reply.error {
            return Err(format!("auth.query failed: {} ({})", e.message, e.code));
        }
        target.keep(server);
        Ok(reply.rows.first().and_then(|row| read_row(row, user)))
    }

    async fn connect(&self, target: &Target) -> Result<Server, String> {
        connect(&target.server, self.connect_timeout)
            .await
            .map_err(|e| format!("as auth.user \"{}\": {e}", target.server.user))
    }
}

impl Target {
    /// A kept connection still fit for a query.
    fn take_idle(&self) -> Option<Server> {
        let mut idle = crate::lock(&self.idle);
        idle.retain(fit);
        idle.pop().map(|(server, _)| server)
    }

    /// Keeps a connection whose query went well for the next lookup (and has those kept
    /// too long closed, even if no lookup comes).
    fn keep(self: &Arc<Self>, server: Server) {
        let mut idle = crate::lock(&self.idle);
        if !server.is_broken()
            && server.replies.is_idle()
            && !server.outlived(MAX_AGE)
            && idle.len() < MAX_LOOKUPS
        {
            idle.push((server, Instant::now()));
            if !self.pruning.swap(true, std::sync::atomic::Ordering::AcqRel) {
                tokio::spawn(prune(Arc::downgrade(self)));
            }
        }
    }
}

/// Whether a kept connection may serve another lookup: not kept past [`IDLE_KEEP`], not
/// older than [`MAX_AGE`], not closed by the server (or spoken on) meanwhile.
fn fit((server, since): &(Server, Instant)) -> bool {
    since.elapsed() < IDLE_KEEP
        && !server.outlived(MAX_AGE)
        && !server.is_broken()
        && !server.peer_closed_or_spoke()
}

/// Closes kept connections once unfit, until none is kept (or the lookups are replaced,
/// by a reload).
async fn prune(target: std::sync::Weak<Target>) {
    loop {
        tokio::time::sleep(IDLE_KEEP / 4).await;
        let Some(target) = target.upgrade() else {
            return;
        };
        let mut idle = crate::lock(&target.idle);
        idle.retain(fit);
        if idle.is_empty() {
            target
                .pruning
                .store(false, std::sync::atomic::Ordering::Release);
            return;
        }
    }
}

/// The verifier in a row of (name, secret [, expired]), or (secret).
fn read_row(row: &[Option<String>], user: &str) -> Option<ClientAuth> {
    let (secret, expired) = match row {
        [secret] => (secret.as_deref(), false),
        [_, secret, rest @ ..] => {
            let expired = match rest.first().map(Option::as_deref) {
                // (NULL: `rolvaliduntil < now()` of a role with no expiry.)
                None | Some(Some("f") | None) => false,
                Some(Some("t")) => true,
                // Not a boolean (a `valuntil` timestamp, say): which logins it meant to
                // refuse is not known, so all are. (Its value is not logged: with columns
                // in another order, it could be a verifier.)
                Some(Some(_)) => {
                    tracing::warn!(
                        user,
                        "auth.query's third column must be a boolean (true: expired); the login is refused"
                    );
                    true
                }
            };
            (secret.as_deref(), expired)
        }
        [] => return None,
    };
    if expired {
        tracing::info!(user, "the password found by auth.query has expired");
        return None;
    }
    match StoredPassword::classify(&crate::config::Secret::new(secret?)) {
        Ok(StoredPassword::Scram(v)) => Some(ClientAuth::Scram(v)),
        Ok(StoredPassword::Md5Hash(h)) => Some(ClientAuth::Md5(h.expose()[3..].to_owned())),
        _ => {
            tracing::warn!(
                user,
                "auth.query returned a secret that is neither a SCRAM verifier nor an md5 hash"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_read_as_pgbouncer_and_pgshield_lay_them_out() {
        let verifier = postgres_protocol::password::scram_sha_256(b"pw");
        let s = |v: &str| Some(v.to_owned());
        assert!(matches!(
            read_row(&[s("u"), s(&verifier)], "u"),
            Some(ClientAuth::Scram(_))
        ));
        assert!(matches!(
            read_row(&[s(&verifier)], "u"),
            Some(ClientAuth::Scram(_))
        ));
        assert!(
            read_row(&[s("u"), s(&verifier), s("t")], "u").is_none(),
            "expired"
        );
        assert!(read_row(&[s("u"), s(&verifier), s("f")], "u").is_some());
        // Not a boolean: refused rather than taken for "not expired".
        assert!(read_row(&[s("u"), s(&verifier), s("2030-01-01 00:00:00+00")], "u").is_none());
        assert!(
            read_row(&[s("u"), s(&verifier), None], "u").is_some(),
            "NULL: no expiry"
        );
        assert!(read_row(&[s("u"), None], "u").is_none(), "no password");
        assert!(read_row(&[s("u"), s("plaintext")], "u").is_none());
        let md5 = postgres_protocol::password::md5(b"pw", "u");
        match read_row(&[s("u"), s(&md5)], "u") {
            Some(ClientAuth::Md5(h)) => assert_eq!(format!("md5{h}"), md5),
            other => panic!("{other:?}"),
        }
    }
}
