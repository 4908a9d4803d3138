//! Access rules per user and per database (`allowed_cidrs`, `require_tls`,
//! `max_client_connections`), checked as PostgreSQL checks pg_hba.conf and connection
//! limits: address and TLS before authentication (`28000`), client counts after it
//! (`53300`, "too many connections for role/database").

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::{ClientSlot, ClientSlots};
use crate::config::{Cidr, Config};
use crate::protocol::{sqlstate, ErrorResponse};

struct Rules {
    cidrs: Vec<Cidr>,
    require_tls: bool,
    slots: Option<Arc<ClientSlots>>,
}

impl Rules {
    fn new(cidrs: &[Cidr], require_tls: bool, max_clients: usize) -> Rules {
        Rules {
            cidrs: cidrs.to_vec(),
            require_tls,
            slots: (max_clients > 0).then(|| ClientSlots::new(max_clients)),
        }
    }
}

pub struct AccessRules {
    users: HashMap<String, Rules>,
    databases: HashMap<String, Rules>,
}

/// The per-user and per-database client slots a session holds; dropping frees them.
pub struct Admission {
    _slots: Vec<ClientSlot>,
}

impl AccessRules {
    pub fn from_config(config: &Config) -> AccessRules {
        AccessRules {
            users: config
                .users
                .iter()
                .map(|(name, u)| {
                    let rules =
                        Rules::new(&u.allowed_cidrs, u.require_tls, u.max_client_connections);
                    (name.clone(), rules)
                })
                .collect(),
            databases: config
                .databases
                .iter()
                .map(|(name, d)| {
                    let rules =
                        Rules::new(&d.allowed_cidrs, d.require_tls, d.max_client_connections);
                    (name.clone(), rules)
                })
                .collect(),
        }
    }

    /// The address and TLS rules, before authentication.
    pub fn check_peer(
        &self,
        user: &str,
        database: &str,
        peer: IpAddr,
        tls: bool,
    ) -> Result<(), ErrorResponse> {
        let encryption = if tls { "TLS" } else { "no encryption" };
        for (kind, name, rules) in [
            ("users", user, self.users.get(user)),
            ("databases", database, self.databases.get(database)),
        ] {
            let Some(rules) = rules else { continue };
            if !rules.cidrs.is_empty() && !rules.cidrs.iter().any(|c| c.contains(peer)) {
                return Err(refused(format!(
                    "pgshield has no rule allowing host \"{peer}\", user \"{user}\", database \"{database}\", {encryption} ({kind}.{name}.allowed_cidrs)"
                )));
            }
            if rules.require_tls && !tls {
                return Err(refused(format!(
                    "pgshield requires TLS for user \"{user}\", database \"{database}\" ({kind}.{name}.require_tls)"
                ))
                .with_hint("connect with sslmode=require (or stronger)"));
            }
        }
        Ok(())
    }

    /// Takes a slot under each client limit that applies, after authentication.
    pub fn admit(&self, user: &str, database: &str) -> Result<Admission, ErrorResponse> {
        let mut slots = Vec::new();
        for (what, name, rules) in [
            ("role", user, self.users.get(user)),
            ("database", database, self.databases.get(database)),
        ] {
            let Some(limit) = rules.and_then(|r| r.slots.as_ref()) else {
                continue;
            };
            match limit.try_take() {
                Some(slot) => slots.push(slot),
                None => {
                    return Err(ErrorResponse::fatal(
                        sqlstate::TOO_MANY_CONNECTIONS,
                        format!("too many connections for {what} \"{name}\""),
                    )
                    .with_hint("pgshield's max_client_connections for it is reached"))
                }
            }
        }
        Ok(Admission { _slots: slots })
    }
}

fn refused(message: String) -> ErrorResponse {
    ErrorResponse::fatal(sqlstate::INVALID_AUTHORIZATION, message)
}
