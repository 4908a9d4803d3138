//! The configuration in force and its reload (SIGHUP, or the admin console's RELOAD).
//!
//! [`Live`] is the configuration with everything derived from it that sessions read at
//! login: users and their verifiers, access rules, `[auth]`, the TLS material of both
//! sides. A reload reads the configuration again and builds a whole new `Live` before it
//! changes anything, so a new configuration that does not parse, fails a check, or names a
//! certificate that cannot be read is rejected whole (the reason is logged and returned)
//! and the running one stays. Then the pools take the new settings (see
//! [`crate::pool::Pools::apply`]) and the new `Live` replaces the old one. No client is
//! dropped: a session keeps the pool it logged in to, and a pool whose database or user
//! was removed serves its clients until they leave.
//!
//! A few keys are read once, at start (the listener, the runtime, logging, the HTTP
//! listener): a reload that changes them keeps their running values and says so.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::client::access::AccessRules;
use crate::client::auth::UserDirectory;
use crate::client::auth_query::AuthQuery;
use crate::config::{Config, ConfigError};
use crate::proxy::Shared;
use crate::tls::{ClientTls, ServerTls, TlsError};

/// The configuration in force and what is derived from it.
pub struct Live {
    pub config: Config,
    pub users: UserDirectory,
    /// Per-user and per-database address, TLS and client-count rules.
    pub access: AccessRules,
    /// Users looked up in the database (`[auth]`), if enabled.
    pub auth_query: Option<AuthQuery>,
    /// Client-facing TLS, when `tls.client.mode` is not `disable`.
    pub client_tls: Option<Arc<ClientTls>>,
    /// How backends are secured and checked.
    pub server_tls: Arc<ServerTls>,
}

impl Live {
    /// Checks `config` and derives everything from it (reading the TLS files).
    /// `previous`: the `Live` a reload replaces, whose client counts carry over.
    pub fn new(config: Config, previous: Option<&Live>) -> Result<Live, ReloadError> {
        // Everything that can fail comes first: past this point nothing may, because
        // the access rules take over (and adjust) the running client counts.
        config.validate()?;
        warn_of_sockets_without_tls(&config);
        let client_tls = ClientTls::new(&config.tls.client)?.map(Arc::new);
        let server_tls = Arc::new(ServerTls::new(&config.tls.server)?);
        Ok(Live {
            users: UserDirectory::from_config(&config, previous.map(|p| &p.users)),
            access: AccessRules::from_config(&config, previous.map(|p| &p.access)),
            auth_query: AuthQuery::from_config(&config, &server_tls),
            client_tls,
            server_tls,
            config,
        })
    }
}

/// A server reached over its Unix-domain socket gets no TLS (as with libpq), whatever
/// `tls.server.mode` asks of the others: said once per load, for an operator who set a
/// strict mode as a policy.
fn warn_of_sockets_without_tls(config: &Config) {
    use crate::config::ServerTlsMode;
    let mode = config.tls.server.mode;
    if matches!(mode, ServerTlsMode::Disable | ServerTlsMode::Prefer) {
        return;
    }
    for (name, db) in &config.databases {
        for host in db.servers().unwrap_or_default() {
            if crate::net::is_socket_dir(&host.host) {
                tracing::warn!(database = %name, host = %host.addr(), ?mode, "a Unix-domain socket: tls.server.mode does not apply there (no TLS, as with libpq)");
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(Box<ConfigError>),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("this pgshield was not started from a configuration it can read again")]
    NoSource,
    #[error("{0}")]
    Failed(String),
}

impl From<ConfigError> for ReloadError {
    fn from(e: ConfigError) -> Self {
        ReloadError::Config(Box::new(e))
    }
}

/// What a reload changed.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub pools_added: usize,
    pub pools_removed: usize,
    /// Keys that changed but only apply at the next start.
    pub needs_restart: Vec<&'static str>,
}

/// Keys read once at start: if the new configuration changes them, it keeps the running
/// values instead (the names of those that differed are returned).
fn keep_start_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($name:literal => $($field:ident).+),+ $(,)?) => {$(
            if running.$($field).+ != new.$($field).+ {
                new.$($field).+ = running.$($field).+.clone();
                kept.push($name);
            }
        )+};
    }
    keep!(
        "listen.addr" => listen.addr,
        "listen.reuse_port" => listen.reuse_port,
        "listen.read_only_addr" => listen.read_only_addr,
        "listen.unix_socket_dir" => listen.unix_socket_dir,
        "listen.unix_socket_mode" => listen.unix_socket_mode,
        "runtime.workers" => runtime.workers,
        "log.level" => log.level,
        "log.format" => log.format,
        "admin.http_listen" => admin.http_listen,
        "admin.stats_period" => admin.stats_period,
    );
    kept
}

impl Shared {
    /// Reads the configuration again from where it was read at start, and applies it.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let result = match self.config_source.get() {
            Some(path) => Config::load(path.as_deref())
                .map_err(ReloadError::from)
                .and_then(|config| self.apply_config(config)),
            None => Err(ReloadError::NoSource),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "reload rejected: the running configuration stays in force");
        }
        result
    }

    /// Applies a new configuration (the second half of [`Shared::reload`]).
    pub fn apply_config(&self, mut config: Config) -> Result<Reloaded, ReloadError> {
        // One reload at a time: each builds on the configuration the previous one left.
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let running = self.live();
        let needs_restart = keep_start_only(&running.config, &mut config);
        let live = Live::new(config, Some(&running))?;
        self.clients
            .set_max(live.config.listen.max_client_connections);
        let (pools_added, pools_removed) = self.pools.apply(&live.config, &live.server_tls);
        self.live.store(Arc::new(live));
        self.reloads.fetch_add(1, Ordering::AcqRel);
        // Idle sessions too pick up new client limits now, not at their next message.
        for client in self.registry.list() {
            client.wake();
        }
        for key in &needs_restart {
            tracing::warn!(
                key,
                "reload: this setting changed but applies only at the next start; the running value stays"
            );
        }
        tracing::info!(pools_added, pools_removed, "configuration reloaded");
        Ok(Reloaded {
            pools_added,
            pools_removed,
            needs_restart,
        })
    }

    /// Where [`Shared::reload`] reads the configuration: a file, or (None) the
    /// environment alone. Set once, by whoever loaded the configuration at start.
    pub fn reload_from(&self, path: Option<PathBuf>) {
        let _ = self.config_source.set(path);
    }
}
