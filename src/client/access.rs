//! Access rules per user and per database (`allowed_cidrs`, `require_tls`,
//! `max_client_connections`), checked as PostgreSQL checks pg_hba.conf and connection
//! limits: address and TLS before authentication (`28000`), client counts after it
//! (`53300`, "too many connections for role/database").

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::{ClientSlot, ClientSlots};
use crate::config::{Cidr, Config};
use crate::net::Peer;
use crate::protocol::{sqlstate, ErrorResponse};

struct Rules {
    cidrs: Vec<Cidr>,
    require_tls: bool,
    /// Kept even without a limit, so that a reload that sets one counts the clients
    /// already connected.
    slots: Arc<ClientSlots>,
}

impl Rules {
    /// `previous`: the same user's or database's rules before a reload, whose client
    /// count carries over.
    fn new(
        cidrs: &[Cidr],
        require_tls: bool,
        max_clients: usize,
        previous: Option<Arc<ClientSlots>>,
    ) -> Rules {
        let max = if max_clients == 0 {
            usize::MAX
        } else {
            max_clients
        };
        let slots = match previous {
            Some(slots) => {
                slots.set_max(max);
                slots
            }
            None => ClientSlots::new(max),
        };
        Rules {
            cidrs: cidrs.to_vec(),
            require_tls,
            slots,
        }
    }
}

pub struct AccessRules {
    // (Looked up at every login by the names a client gives, among names the configuration
    // holds: a quick hash, as `FastMap` allows.)
    users: crate::FastMap<String, Rules>,
    databases: crate::FastMap<String, Rules>,
    /// Counts of users and databases a reload removed while they had clients, kept in
    /// case a later reload puts them back.
    removed: HashMap<(Kind, String), Arc<ClientSlots>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    User,
    Database,
}

/// The per-user and per-database client slots a session holds; dropping frees them.
pub struct Admission {
    /// The user's and the database's (no heap: every client holds one).
    _slots: [Option<ClientSlot>; 2],
}

impl AccessRules {
    /// The rules `config` gives; after a reload, `previous` (the rules replaced) hands
    /// on the counts of clients connected.
    pub fn from_config(config: &Config, previous: Option<&AccessRules>) -> AccessRules {
        let mut counts: HashMap<(Kind, String), Arc<ClientSlots>> = HashMap::new();
        if let Some(p) = previous {
            counts.extend(p.removed.iter().map(|(k, s)| (k.clone(), Arc::clone(s))));
            for (kind, rules) in [(Kind::User, &p.users), (Kind::Database, &p.databases)] {
                counts.extend(
                    rules
                        .iter()
                        .map(|(name, r)| ((kind, name.clone()), Arc::clone(&r.slots))),
                );
            }
        }
        let mut rules = |kind: Kind, name: &String, cidrs: &[Cidr], tls: bool, max: usize| {
            let before = counts.remove(&(kind, name.clone()));
            (name.clone(), Rules::new(cidrs, tls, max, before))
        };
        let users = config
            .users
            .iter()
            .map(|(n, u)| {
                let limit = u.max_client_connections;
                rules(Kind::User, n, &u.allowed_cidrs, u.require_tls, limit)
            })
            .collect();
        let databases = config
            .databases
            .iter()
            .map(|(n, d)| {
                let limit = d.max_client_connections;
                rules(Kind::Database, n, &d.allowed_cidrs, d.require_tls, limit)
            })
            .collect();
        // What is left was removed; remember those still counting clients.
        counts.retain(|_, slots| slots.open() > 0);
        AccessRules {
            users,
            databases,
            removed: counts,
        }
    }

    /// The address and TLS rules, before authentication. A client over the Unix-domain
    /// socket matches the `allowed_cidrs` that admit a loopback address, and needs no
    /// TLS (it is local, and cannot have it: PgBouncer does the same).
    pub fn check_peer(
        &self,
        user: &str,
        database: &str,
        peer: Peer,
        tls: bool,
    ) -> Result<(), ErrorResponse> {
        let encryption = if tls { "TLS" } else { "no encryption" };
        let allows = |cidr: &Cidr| match peer.ip() {
            Some(ip) => cidr.contains(ip),
            None => [Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
                .into_iter()
                .any(|loopback| cidr.contains(loopback)),
        };
        // (For the refusal only: written out at every login, it cost some 1,500
        // instructions, about 4 % of one.)
        let host = || match peer.ip() {
            Some(ip) => ip.to_string(),
            None => peer.to_string(),
        };
        for (kind, name, rules) in [
            ("users", user, self.users.get(user)),
            ("databases", database, self.databases.get(database)),
        ] {
            let Some(rules) = rules else { continue };
            if !rules.cidrs.is_empty() && !rules.cidrs.iter().any(allows) {
                let host = host();
                return Err(refused(format!(
                    "pgshield has no rule allowing host \"{host}\", user \"{user}\", database \"{database}\", {encryption} ({kind}.{name}.allowed_cidrs)"
                )));
            }
            if rules.require_tls && !tls && peer.ip().is_some() {
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
        let mut slots = [None, None];
        for (i, (what, name, rules)) in [
            ("role", user, self.users.get(user)),
            ("database", database, self.databases.get(database)),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(limit) = rules.map(|r| &r.slots) else {
                continue;
            };
            match limit.try_take() {
                Some(slot) => slots[i] = Some(slot),
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
