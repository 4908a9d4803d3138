//! Typed configuration: a TOML file plus `PGSHIELD__SECTION__KEY` environment overrides.
//!
//! Everything is validated once, at load, with errors that name the offending key, so the
//! rest of pgshield can trust what it is given. Secrets are wrapped in [`Secret`], which
//! never prints its value (not in `Debug`, not in `check-config`, not in logs).
//!
//! The key names are a contract with operators (their files and env overrides must keep
//! working): add keys, never rename them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::protocol::scram::ScramVerifier;

/// The keys whose values are lists: set from the environment as comma-separated items
/// (`PGSHIELD__DATABASES__APP__HOSTS=db1,db2:5433`).
const ENV_LIST_KEYS: &[&str] = &["hosts", "replicas", "allowed_cidrs", "users", "stats_users"];

/// Prefix of environment overrides: `PGSHIELD__POOL__MAX_SIZE=50` sets `pool.max_size`.
pub const ENV_PREFIX: &str = "PGSHIELD";
/// Separator between the prefix, sections and keys of an environment override.
pub const ENV_SEPARATOR: &str = "__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    Load {
        path: String,
        #[source]
        source: config::ConfigError,
    },
    #[error("configuration: {0}")]
    Parse(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The whole configuration. See `config/pgshield.toml` for every key, documented.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub databases: BTreeMap<String, DatabaseConfig>,
    #[serde(default)]
    pub users: BTreeMap<String, UserConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub read_only: ReadOnlyConfig,
}

/// Read-only clients: those of `<database>_ro`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadOnlyConfig {
    /// With no replica fit to serve (down, or lagging past `max_replica_lag`), lend
    /// backends of the primary instead of waiting for one.
    pub fallback_to_primary: bool,
}

/// The virtual database of the admin console.
pub const ADMIN_DATABASE: &str = "pgshield";

/// `<database>_ro`: the read-only alias of a database with replicas.
pub const READ_ONLY_SUFFIX: &str = "_ro";

/// What operators reach pgshield through.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `host:port` of the HTTP listener serving /metrics, /health and /ready; empty: none.
    pub http_listen: String,
    /// Users (from `[users]`) allowed into the admin console, database `pgshield`.
    pub users: Vec<String>,
    /// Users allowed into the admin console for its SHOW commands only (PgBouncer's
    /// stats_users): what a metrics exporter logs in as.
    pub stats_users: Vec<String>,
    /// Let admin users connect from other hosts than this one (loopback only by default).
    pub allow_remote: bool,
    /// The period SHOW STATS averages are computed over (PgBouncer's stats_period).
    #[serde(with = "humantime_serde")]
    pub stats_period: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            http_listen: "127.0.0.1:9930".into(),
            users: Vec::new(),
            stats_users: Vec::new(),
            allow_remote: false,
            stats_period: Duration::from_secs(60),
        }
    }
}

/// The query PgBouncer users know as auth_query: columns (name, secret[, expired]).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname, rolpassword, \
    rolvaliduntil IS NOT NULL AND rolvaliduntil < now() \
    FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin";

/// Users not in `[users]`: looked up in the database, as PgBouncer's auth_query, or
/// listed in a PgBouncer auth_file (`file`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Look users up with `query`, run as `user`.
    pub enabled: bool,
    /// Returns one row for a user who may log in: (name, SCRAM verifier or md5 hash
    /// [, expired boolean]). `$1` is the user name, as a quoted literal.
    pub query: String,
    /// The user pgshield runs the query as (it logs in with `password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The database the query runs in (on the client's database's server); default:
    /// the database the client asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbname: Option<String>,
    /// How long an answer (including "no such user") is reused.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// PgBouncer's `auth_file` (userlist.txt): each user it lists logs in as if
    /// configured in `[users.NAME]` with that `password` (plaintext, an md5 hash, or a
    /// SCRAM-SHA-256 verifier), its pools made at its first login; a `[users.NAME]` table
    /// of the same name wins. Read at load and on every reload. Independent of `enabled`
    /// (the query).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// The users `file` lists that no `[users.NAME]` table names, with their passwords
    /// (read at load). Unlike configured users they get pools at their first login, as
    /// PgBouncer makes them, not one per database at start.
    #[serde(skip)]
    pub listed: BTreeMap<String, Secret>,
    /// Keys the SCRAM salts pgshield makes up: an unknown user's (whose login fails as a
    /// wrong password does) and the verifier's it derives from a plaintext password. Set
    /// (32 random characters, say), every name keeps its salt across restarts, as a stored
    /// verifier keeps its own; unset, they are drawn afresh at each start, and the salts
    /// a name is given before and after a restart tell whether it is a user with a stored
    /// verifier. At least 16 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salt_secret: Option<Secret>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            query: DEFAULT_AUTH_QUERY.to_owned(),
            user: None,
            password: None,
            password_file: None,
            dbname: None,
            cache_ttl: Duration::from_secs(60),
            file: None,
            listed: BTreeMap::new(),
            salt_secret: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// TLS between clients and pgshield.
    pub client: ClientTlsConfig,
    /// TLS between pgshield and the servers.
    pub server: ServerTlsConfig,
}

/// Whether clients may or must use TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// SSLRequest is answered `N`.
    #[default]
    Disable,
    /// TLS when the client asks for it, plaintext otherwise (same as `prefer`).
    Allow,
    /// TLS when the client asks for it, plaintext otherwise.
    Prefer,
    /// Plaintext clients are refused with `28000`.
    Require,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTlsConfig {
    pub mode: ClientTlsMode,
    /// PEM certificate chain pgshield presents (reloaded when the file changes).
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS);
    /// needs `mode = "require"`.
    pub ca: Option<PathBuf>,
}

/// How pgshield secures and checks its connections to the servers, as libpq's sslmode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    /// Plaintext.
    Disable,
    /// TLS if the server offers it, plaintext if not; the certificate is not checked.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by a trusted CA (any host name).
    VerifyCa,
    /// TLS with a trusted certificate issued for the host pgshield connects to.
    VerifyFull,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    pub mode: ServerTlsMode,
    /// PEM CA bundle trusted for `verify-ca` / `verify-full` (an RDS bundle works);
    /// the system's roots when unset.
    pub ca: Option<PathBuf>,
    /// SCRAM channel binding with the servers, as libpq's `channel_binding`.
    pub channel_binding: ChannelBindingMode,
}

/// Whether pgshield binds its SCRAM logins to the server's TLS certificate, as libpq's
/// `channel_binding`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChannelBindingMode {
    /// Never (SCRAM-SHA-256 without `-PLUS`).
    Disable,
    /// When the connection is TLS and the server offers SCRAM-SHA-256-PLUS.
    #[default]
    Prefer,
    /// Always: a server that asks for anything else (a password in clear or md5, plain
    /// SCRAM-SHA-256, or no authentication at all) is refused before any secret is sent,
    /// so a man in the middle that `prefer` or `require` TLS would not notice cannot log
    /// in through pgshield's exchange nor read the password. It can still record that
    /// exchange and try guesses of a weak password offline: only `verify-full` stops it.
    Require,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads relaying clients: 0 means one per core; 1 runs everything on one thread.
    pub workers: usize,
}

impl RuntimeConfig {
    /// The number of threads `workers` means on this machine.
    pub fn threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Address clients connect to, `host:port` (an IP address; port 0 picks a free one).
    pub addr: String,
    /// Client connections accepted at once; the next one gets `53300` at startup.
    pub max_client_connections: usize,
    /// Time a new connection has to finish its startup and authentication.
    #[serde(with = "humantime_serde")]
    pub client_login_timeout: Duration,
    /// Largest message a client may send, in bytes (its length field is checked before
    /// anything is read); a longer one gets `08P01` and that client is closed.
    pub max_message_size: usize,
    /// Let another pgshield bind the same port (SO_REUSEPORT), for rolling restarts; the
    /// first SIGTERM/SIGINT then only stops listening (as `SHUTDOWN WAIT_FOR_CLIENTS`).
    pub reuse_port: bool,
    /// A second address whose clients are read-only: each database they name is served
    /// as its `<database>_ro` alias (backends on replicas). Empty: none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub read_only_addr: String,
    /// A directory in which pgshield also listens on a Unix-domain socket,
    /// `.s.PGSQL.<port of listen.addr>` (as PostgreSQL and PgBouncer name theirs), for
    /// clients on this machine (`psql -h DIR`). Empty: none.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub unix_socket_dir: String,
    /// The socket's permissions, in octal (as PgBouncer's `unix_socket_mode`).
    pub unix_socket_mode: String,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            read_only_addr: String::new(),
            addr: "127.0.0.1:6432".into(),
            max_client_connections: 10_000,
            client_login_timeout: Duration::from_secs(60),
            max_message_size: crate::protocol::frame::DEFAULT_MAX_MESSAGE_SIZE,
            reuse_port: false,
            unix_socket_dir: String::new(),
            unix_socket_mode: "0777".into(),
        }
    }
}

/// When a client holds a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// The client holds one backend for its whole connection.
    Session,
    /// The client holds a backend only for the length of a transaction.
    Transaction,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Backends per (database, user) pool, never exceeded.
    pub max_size: usize,
    /// Backends each pool keeps open even when no client needs them (opened at start).
    pub min_idle: usize,
    /// How long a client waits in the queue for a backend before it gets `53300`.
    /// `0s` waits without limit.
    #[serde(with = "humantime_serde")]
    pub borrow_timeout: Duration,
    /// A client queued this long gets one NOTICE naming the pool it waits for. `0s`: never.
    #[serde(with = "humantime_serde")]
    pub queue_notice_after: Duration,
    /// Limit for opening and authenticating one backend connection.
    #[serde(with = "humantime_serde")]
    pub server_connect_timeout: Duration,
    /// A backend older than this is closed when it is next idle. `0s`: no limit.
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// A backend idle in the pool longer than this is closed. `0s`: never.
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// A client with no bytes either way for this long, while no statement of its runs,
    /// is closed with 57P05. `0s`: never.
    #[serde(with = "humantime_serde")]
    pub idle_client_timeout: Duration,
    /// On SIGTERM/SIGINT, how long clients may finish the transaction they are in.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Statements each backend keeps prepared for clients in transaction mode (least
    /// recently used closed first).
    pub max_prepared_statements: usize,
    /// Transaction mode: named prepared statements one client may hold at once (each
    /// costs pgshield memory until closed); a Parse beyond it fails with 53400. `0`: no
    /// limit.
    pub max_client_prepared_statements: usize,
    /// Transaction mode: what happens when a client creates state that cannot follow it
    /// to another backend (LISTEN, temp tables, session advisory locks, …).
    pub on_session_state: OnSessionState,
    /// Transaction mode: a client idle inside a transaction this long is closed and its
    /// backend rolled back and returned. `0s`: never.
    #[serde(with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
    /// A statement running longer than this is cancelled (57014). `0s`: never.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// A backend idle in the pool longer than this is checked (an empty query) before it
    /// is lent. `0s`: never.
    #[serde(with = "humantime_serde")]
    pub health_check_after: Duration,
    /// How often each host of a database with several hosts (or `role = "auto"`) is
    /// probed: reachable, primary or replica, replica lag. A host that fails is probed
    /// again after a back-off that doubles up to a minute.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// Limit for one probe (connecting included).
    #[serde(with = "humantime_serde")]
    pub health_check_timeout: Duration,
}

/// What transaction mode does with session state that cannot follow a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSessionState {
    /// Keep the client on its backend until it disconnects (as RDS Proxy).
    Pin,
    /// Refuse the statement with 0A000, naming the feature.
    Reject,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            mode: PoolMode::Transaction,
            max_size: 20,
            min_idle: 0,
            borrow_timeout: Duration::from_secs(120),
            queue_notice_after: Duration::from_secs(5),
            server_connect_timeout: Duration::from_secs(15),
            server_lifetime: Duration::from_secs(3600),
            server_idle_timeout: Duration::from_secs(600),
            idle_client_timeout: Duration::from_secs(1800),
            shutdown_timeout: Duration::from_secs(30),
            max_prepared_statements: 1000,
            max_client_prepared_statements: 10_000,
            on_session_state: OnSessionState::Pin,
            idle_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            health_check_after: Duration::from_secs(30),
            health_check_interval: Duration::from_secs(2),
            health_check_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The server, for a database on one host: a host name, an IP address, or (starting
    /// with `/`) the directory of its Unix-domain socket (no TLS there, as with libpq).
    /// Several hosts: `hosts`, or `primary` and `replicas`, instead.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// The port of `host`, and of entries in `hosts`/`primary`/`replicas` that name none.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Several servers, as `host` or `host:port` (`[::1]:5432` for IPv6; a socket directory
    /// as `/dir` or `/dir:port`, so one whose name holds a `:` only as `host`), whose role is
    /// `role`: with `auto`, the one not in recovery is the primary (checked again every
    /// `pool.health_check_interval` and after a connection error).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// The role of `host` or of every entry in `hosts`: `auto` (detected), `primary`
    /// or `replica`. Default: `primary` for `host`, `auto` for `hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<HostRole>,
    /// Fixed roles: the primary…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// …and the replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// Read-only clients (`<database>_ro`) skip a replica whose replay lags more than this
    /// behind what it has received. `0s`: not checked.
    #[serde(default, with = "humantime_serde")]
    pub max_replica_lag: Duration,
    /// As RDS Proxy: backends to this database, across all its pools, are at most this
    /// share (1–100) of the server's `max_connections`, less `superuser_reserved_connections`
    /// and `reserved_connections` (read from the server when it is first reached). 0: off
    /// (`max_db_connections` and `pool.max_size` alone apply).
    #[serde(default)]
    pub max_connections_percent: u8,
    /// With `max_connections_percent`: idle backends kept, as a share (1–100) of the
    /// same number; more are closed by the janitor. 0: no limit but `server_idle_timeout`.
    #[serde(default)]
    pub max_idle_percent: u8,
    /// Connections of the server's `max_connections` left for others (migrations, a
    /// console, other poolers) when `max_connections_percent` sizes the pools.
    #[serde(default)]
    pub reserved_connections: usize,
    /// The user whose pool credentials the health checks log in with (default: the first
    /// configured user, by name, that has a server password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor_user: Option<String>,
    /// Name of the database on the server; defaults to the table's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dbname: Option<String>,
    /// Client addresses allowed to use this database; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_cidrs: Vec<Cidr>,
    /// Plaintext clients of this database are refused with `28000`.
    #[serde(default)]
    pub require_tls: bool,
    /// Clients of this database at once (0: no limit); the next gets `53300`.
    #[serde(default)]
    pub max_client_connections: usize,
    /// Backends open to this database across all its pools (0: no limit). A pool that
    /// needs one when the cap is reached closes an idle backend of another pool, or waits.
    #[serde(default)]
    pub max_db_connections: usize,
}

/// An address range such as `10.0.0.0/8` or `::1/128` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32u32.saturating_sub(u32::from(self.prefix)))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128u32.saturating_sub(u32::from(self.prefix)))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an address range such as 10.0.0.0/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        let canonical = addr.to_canonical();
        // An IPv4-mapped address (`::ffff:10.1.2.3`, as pgshield's own refusals print a
        // client seen through an IPv6 socket) stands for its IPv4 range, the first 96 bits
        // being the mapping's; a shorter prefix would also cover plain IPv6 addresses.
        let prefix = if canonical.is_ipv4() && addr.is_ipv6() {
            prefix.checked_sub(96).ok_or_else(|| {
                format!("`{s}`: an IPv4-mapped range needs a prefix length of 96 to 128")
            })?
        } else {
            prefix
        };
        Ok(Cidr {
            addr: canonical,
            prefix,
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn default_pg_port() -> u16 {
    5432
}

impl Default for DatabaseConfig {
    /// No server yet (`host` must be set): the defaults of every other key.
    fn default() -> Self {
        DatabaseConfig {
            host: String::new(),
            port: default_pg_port(),
            hosts: Vec::new(),
            role: None,
            primary: None,
            replicas: Vec::new(),
            max_replica_lag: Duration::ZERO,
            max_connections_percent: 0,
            max_idle_percent: 0,
            reserved_connections: 0,
            monitor_user: None,
            dbname: None,
            allowed_cidrs: Vec::new(),
            require_tls: false,
            max_client_connections: 0,
            max_db_connections: 0,
        }
    }
}

/// What a server is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostRole {
    /// Detected: `pg_is_in_recovery()` (and the server's `in_hot_standby`).
    Auto,
    Primary,
    Replica,
}

/// One server of a database, as the configuration gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub host: String,
    pub port: u16,
    pub role: HostRole,
}

impl HostSpec {
    /// `host:port` as it is connected to (`[v6]:port` for IPv6), or a Unix-domain
    /// socket's path.
    pub fn addr(&self) -> String {
        crate::net::server_addr(&self.host, self.port)
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; a bare IPv6 address is a host.
fn parse_host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{s}`: no closing `]`"))?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("`{s}`: expected `:port` after `]`")),
        }
    } else if s.matches(':').count() == 1 {
        let (host, port) = s.split_once(':').unwrap_or((s, ""));
        (host, Some(port))
    } else {
        (s, None)
    };
    if host.is_empty() {
        return Err(format!("`{s}`: no host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("`{s}`: the port must be 1 to 65535"))?,
        None => default_port,
    };
    Ok((host.to_owned(), port))
}

impl DatabaseConfig {
    /// The database's servers with their roles, in the order given (the primary first
    /// with fixed roles). Checked by [`Config::validate`].
    pub fn servers(&self) -> Result<Vec<HostSpec>, ConfigError> {
        let spec = |key: &str, s: &str, role| {
            parse_host_port(s, self.port)
                .map(|(host, port)| HostSpec { host, port, role })
                .map_err(|reason| invalid(key, reason))
        };
        let forms = [
            !self.host.is_empty(),
            !self.hosts.is_empty(),
            self.primary.is_some() || !self.replicas.is_empty(),
        ];
        if forms.iter().filter(|f| **f).count() != 1 {
            return Err(invalid(
                "host",
                "give exactly one of `host`, `hosts`, or `primary` (with `replicas`)",
            ));
        }
        let mut out = Vec::new();
        if !self.host.is_empty() {
            if self.host.trim().is_empty() {
                return Err(invalid("host", "must not be empty"));
            }
            out.push(HostSpec {
                host: self.host.clone(),
                port: self.port,
                role: self.role.unwrap_or(HostRole::Primary),
            });
        } else if !self.hosts.is_empty() {
            let role = self.role.unwrap_or(HostRole::Auto);
            for h in &self.hosts {
                out.push(spec("hosts", h, role)?);
            }
        } else {
            if self.role.is_some() {
                return Err(invalid(
                    "role",
                    "not with `primary`/`replicas`: their roles are given",
                ));
            }
            let primary = self
                .primary
                .as_deref()
                .ok_or_else(|| invalid("primary", "needed with `replicas`"))?;
            out.push(spec("primary", primary, HostRole::Primary)?);
            for r in &self.replicas {
                out.push(spec("replicas", r, HostRole::Replica)?);
            }
        }
        if let Some(abstract_socket) = out.iter().find(|h| h.host.starts_with('@')) {
            return Err(invalid(
                "host",
                format!(
                    "`{}`: abstract Unix-domain sockets are not supported; give the \
                     directory of the server's socket (such as /var/run/postgresql) or \
                     its TCP address",
                    abstract_socket.host
                ),
            ));
        }
        for (i, a) in out.iter().enumerate() {
            if out[..i]
                .iter()
                .any(|b| (&b.host, b.port) == (&a.host, a.port))
            {
                return Err(invalid("hosts", format!("{} is listed twice", a.addr())));
            }
        }
        Ok(out)
    }

    /// Whether read-only clients (`<database>_ro`) have their own pools: the database may
    /// have replicas.
    /// (From the keys alone, without building the host list: asked at each such login.
    /// Meaningful once `servers` accepted the shape.)
    pub fn has_replicas(&self) -> bool {
        self.hosts.len() > 1 || !self.replicas.is_empty() || self.role == Some(HostRole::Replica)
    }
}

/// How a client proves who it is to pgshield.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    /// No password asked: for local development only.
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    #[serde(default = "default_auth")]
    pub auth: AuthMethod,
    /// Plaintext password, a `SCRAM-SHA-256$…` verifier, or an `md5…` hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// User pgshield logs in to the backend as; defaults to the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_user: Option<String>,
    /// Password for the backend; defaults to `password` when that is plaintext or md5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_password: Option<Secret>,
    /// A file holding `password` (read at load; one trailing newline is dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// A file holding `server_password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_password_file: Option<PathBuf>,
    /// A shell command whose output is the backend password (an RDS IAM token, a Vault
    /// lease…), run when a backend connection is opened; its answer is reused for
    /// `server_password_ttl`, and asked again at once if the server refuses it.
    /// (Masked in `check-config`: such commands may carry tokens.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_password_command: Option<Secret>,
    #[serde(default = "default_password_ttl", with = "humantime_serde")]
    pub server_password_ttl: Duration,
    /// Client addresses this user may connect from; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_cidrs: Vec<Cidr>,
    /// This user's plaintext connections are refused with `28000`.
    #[serde(default)]
    pub require_tls: bool,
    /// This user's clients at once (0: no limit); the next gets `53300`.
    #[serde(default)]
    pub max_client_connections: usize,
}

/// The users of a PgBouncer `auth_file`: one a line, `"name" "password"` (a `"` inside
/// either written `""`), anything after them ignored; lines that do not start with `"`
/// (blank, or comments such as `;` and `#`) skipped. As in PgBouncer, a user listed again
/// takes the later password. A user with an empty password is left out (PgBouncer loads
/// one, who then cannot log in with a password), with a warning. Errors name the line,
/// never its text (which may hold a password).
pub fn parse_auth_file(text: &str) -> Result<Vec<(String, String)>, String> {
    // A quoted field at the start of `s`: its text, and what follows it.
    fn field(s: &str) -> Option<(String, &str)> {
        let mut chars = s.strip_prefix('"')?.char_indices();
        let mut out = String::new();
        while let Some((i, c)) = chars.next() {
            if c != '"' {
                out.push(c);
                continue;
            }
            let rest = &s[1 + i + 1..];
            match rest.strip_prefix('"') {
                Some(_) => {
                    out.push('"');
                    chars.next();
                }
                None => return Some((out, rest)),
            }
        }
        None
    }
    let mut users: Vec<(String, String)> = Vec::new();
    // (A byte-order mark some editors write would hide the first line's quote.)
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if !line.starts_with('"') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}", n + 1);
        let (name, rest) = field(line).ok_or_else(|| bad("the user name's quote is not closed"))?;
        let rest = rest.trim_start();
        if !rest.starts_with('"') {
            return Err(bad("no quoted password after the user name"));
        }
        let (password, _) = field(rest).ok_or_else(|| bad("the password's quote is not closed"))?;
        if name.is_empty() || name.len() > 63 {
            return Err(bad("a user name must be 1 to 63 bytes"));
        }
        if password.is_empty() {
            tracing::warn!(
                line = n + 1,
                "auth.file: a user with an empty password is left out (it could not log in)"
            );
            users.retain(|(listed, _)| *listed != name);
            continue;
        }
        if let Err(e) = StoredPassword::classify(&Secret::new(password.clone())) {
            return Err(bad(&e));
        }
        users.retain(|(listed, _)| *listed != name);
        users.push((name, password));
    }
    Ok(users)
}

/// A secret kept in a file: its text without one trailing newline.
fn read_secret_file(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(Secret::new(text))
}

fn default_password_ttl() -> Duration {
    Duration::from_secs(600)
}

fn default_auth() -> AuthMethod {
    AuthMethod::ScramSha256
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `pgshield=debug`, …); `RUST_LOG` overrides it.
    pub level: String,
    /// `text` for people, `json` for log pipelines (one object per line).
    pub format: LogFormat,
    /// One line per client login and logout (with its duration, transactions, queries
    /// and bytes) and per refused login (with its SQLSTATE).
    pub connections: bool,
    /// Every this long, one line of totals: transactions, queries and bytes per second,
    /// average times, clients and backends. `0s`: never.
    #[serde(with = "humantime_serde")]
    pub stats_period: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            connections: true,
            stats_period: Duration::from_secs(60),
        }
    }
}

/// A secret string: readable by pgshield, never printed.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("********")
    }
}

/// What a configured `password` string turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredPassword {
    Plain(Secret),
    /// `md5` followed by 32 hex digits: md5(password || user).
    Md5Hash(Secret),
    Scram(ScramVerifier),
}

impl StoredPassword {
    /// Classifies a password string as PostgreSQL does for `rolpassword`.
    pub fn classify(value: &Secret) -> Result<Self, String> {
        let s = value.expose();
        if s.starts_with("SCRAM-SHA-256$") {
            return ScramVerifier::parse(s)
                .map(StoredPassword::Scram)
                .map_err(|e| format!("not a valid SCRAM-SHA-256 verifier: {e}"));
        }
        if s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(StoredPassword::Md5Hash(value.clone()));
        }
        Ok(StoredPassword::Plain(value.clone()))
    }
}

impl AuthConfig {
    /// How a user `file` lists logs in: md5 with an md5 hash, SCRAM otherwise.
    pub fn listed_auth(password: &Secret) -> AuthMethod {
        match StoredPassword::classify(password) {
            Ok(StoredPassword::Md5Hash(_)) => AuthMethod::Md5,
            _ => AuthMethod::ScramSha256,
        }
    }
}

impl Config {
    /// Loads a configuration: the file at `path` (if given), then environment overrides.
    /// With no file, the environment alone must describe databases and users.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<BTreeMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Load {
                    path: path.display().to_string(),
                    source: config::ConfigError::Message("file not found".into()),
                });
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        // Values are taken as the strings they are (a password `0123` stays `0123`;
        // numbers and booleans are read from them by the keys that want them), except
        // the keys that take lists, whose values are split at commas.
        let vars: Vec<(String, String)> = match env {
            Some(env) => env.into_iter().collect(),
            // (Only pgshield's: another variable not in UTF-8 is none of its business.)
            None => std::env::vars_os()
                .filter_map(|(name, value)| {
                    let name = name.into_string().ok()?;
                    name.to_ascii_uppercase().starts_with(ENV_PREFIX).then(|| {
                        match value.into_string() {
                            Ok(value) => Ok((name.clone(), value)),
                            Err(_) => Err(invalid(name.clone(), "is not valid UTF-8")),
                        }
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let env_source = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
            .source(Some(vars.iter().cloned().collect()));
        let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
        for (name, value) in &vars {
            // (The prefix in any case, as the environment source takes it.)
            let Some(key) = name
                .get(..prefix.len())
                .filter(|p| p.eq_ignore_ascii_case(&prefix))
                .map(|_| &name[prefix.len()..])
            else {
                continue;
            };
            let key = key.to_lowercase().replace(ENV_SEPARATOR, ".");
            if key
                .rsplit('.')
                .next()
                .is_some_and(|leaf| ENV_LIST_KEYS.contains(&leaf))
            {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(str::to_owned)
                    .collect();
                builder = builder.set_override(key, items)?;
            }
        }
        let raw = builder
            .add_source(env_source)
            .build()
            .map_err(|e| match path {
                Some(p) => ConfigError::Load {
                    path: p.display().to_string(),
                    source: e,
                },
                None => ConfigError::Parse(e),
            })?;
        let mut config: Config = raw.try_deserialize()?;
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document (no environment), for tests and `pgshield dev`.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        let mut config: Config = raw.try_deserialize()?;
        config.read_secret_files()?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `password_file` and `server_password_file` into the secrets they hold, and
    /// `auth.file`'s users into `auth.listed` (or into the `[users]` tables that give
    /// them rules only).
    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.auth.file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid("auth.file", format!("cannot read {}: {e}", path.display()))
            })?;
            let listed = parse_auth_file(&text)
                .map_err(|e| invalid("auth.file", format!("{}: {e}", path.display())))?;
            self.auth.listed.clear();
            // A table with rules but no password for a user the file lists.
            let rules_only = |user: &UserConfig| {
                user.password.is_none()
                    && user.password_file.is_none()
                    && user.auth != AuthMethod::Trust
            };
            // One for a user the file dropped goes with the user: a reload of a
            // regenerated file is not refused for it.
            self.users.retain(|name, user| {
                let keep = !rules_only(user) || listed.iter().any(|(listed, _)| listed == name);
                if !keep {
                    tracing::warn!(
                        user = %name,
                        "[users.NAME] gives rules but no password, and auth.file does not list \
                         the user: left out"
                    );
                }
                keep
            });
            for (name, password) in listed {
                let password = Secret::new(password);
                // A table that gives the user rules but no password takes the file's.
                if let Some(user) = self.users.get_mut(&name) {
                    if rules_only(user) {
                        if AuthConfig::listed_auth(&password) == AuthMethod::Md5 {
                            user.auth = AuthMethod::Md5;
                        }
                        user.password = Some(password);
                    }
                    continue;
                }
                self.auth.listed.insert(name, password);
            }
        }
        if let Some(path) = &self.auth.password_file {
            if self.auth.password.is_some() {
                return Err(invalid(
                    "auth.password_file",
                    "give password or password_file, not both",
                ));
            }
            self.auth.password = Some(read_secret_file("auth.password_file", path)?);
        }
        for (name, user) in &mut self.users {
            for (file_key, file, secret_key, secret) in [
                (
                    "password_file",
                    &user.password_file,
                    "password",
                    &mut user.password,
                ),
                (
                    "server_password_file",
                    &user.server_password_file,
                    "server_password",
                    &mut user.server_password,
                ),
            ] {
                let Some(path) = file else { continue };
                let key = format!("users.{name}.{file_key}");
                if secret.is_some() {
                    return Err(invalid(
                        key,
                        format!("give {secret_key} or {file_key}, not both"),
                    ));
                }
                *secret = Some(read_secret_file(&key, path)?);
            }
        }
        Ok(())
    }

    /// The configured database a client's database name stands for, and whether it is
    /// its read-only alias (`<database>_ro`, for a database with replicas).
    pub fn resolve_database<'a>(&'a self, name: &'a str) -> Option<(&'a str, bool)> {
        if self.databases.contains_key(name) {
            return Some((name, false));
        }
        let base = name.strip_suffix(READ_ONLY_SUFFIX)?;
        let db = self.databases.get(base)?;
        db.has_replicas().then_some((base, true))
    }

    /// Checks everything a running proxy relies on; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let main = self.listen_addr()?;
        if self
            .read_only_addr()?
            .is_some_and(|ro| ro == main && ro.port() != 0)
        {
            return Err(invalid(
                "listen.read_only_addr",
                "must differ from listen.addr (its clients are served from replicas)",
            ));
        }
        self.unix_socket_mode()?;
        // The longest name the port can give, and the temporary name it is bound under
        // first (`.<process id>` added), must fit a socket address (108 bytes on Linux,
        // the last one a NUL).
        if let Some(path) = self.unix_socket_path(u16::MAX) {
            if path.as_os_str().len() + ".4194304".len() > 107 {
                return Err(invalid(
                    "listen.unix_socket_dir",
                    format!(
                        "`{}` is too long for a Unix-domain socket path (at most 107 bytes \
                         with `/.s.PGSQL.<port>.<process id>`)",
                        self.listen.unix_socket_dir
                    ),
                ));
            }
        }
        // pgshield's socket must not be a server's it connects to: it would serve itself.
        let own = self
            .unix_socket_path(main.port())
            .filter(|_| main.port() != 0);
        for (name, db) in &self.databases {
            for server in db.servers().unwrap_or_default() {
                let theirs = crate::net::is_socket_dir(&server.host)
                    .then(|| Path::new(&server.host).join(format!(".s.PGSQL.{}", server.port)));
                if own.is_some() && theirs == own {
                    return Err(invalid(
                        format!("databases.{name}.host"),
                        format!(
                            "`{}` port {} is pgshield's own socket (listen.unix_socket_dir)",
                            server.host, server.port
                        ),
                    ));
                }
            }
        }
        if self
            .auth
            .salt_secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < 16)
        {
            return Err(invalid(
                "auth.salt_secret",
                "must be at least 16 bytes (32 random characters, say)",
            ));
        }
        if self.tls.server.channel_binding == ChannelBindingMode::Require
            && self.tls.server.mode == ServerTlsMode::Disable
        {
            return Err(invalid(
                "tls.server.channel_binding",
                "`require` binds logins to the server's TLS certificate: it needs \
                 tls.server.mode other than `disable`",
            ));
        }
        self.admin_http_addr()?;
        if self.admin.stats_period.is_zero() {
            return Err(invalid("admin.stats_period", "must be more than 0s"));
        }
        let console_users = self.admin.users.iter().map(|u| ("admin.users", u));
        let stats_users = self
            .admin
            .stats_users
            .iter()
            .map(|u| ("admin.stats_users", u));
        for (key, user) in console_users.chain(stats_users) {
            if !self.users.contains_key(user) && !self.auth.listed.contains_key(user) {
                return Err(invalid(
                    key,
                    format!(
                        "`{user}` is not in [users] nor listed in auth.file (admin users log \
                         in like any other)"
                    ),
                ));
            }
        }
        if self.databases.contains_key(ADMIN_DATABASE) {
            return Err(invalid(
                format!("databases.{ADMIN_DATABASE}"),
                "that name is the admin console's",
            ));
        }
        if !(1024..=1 << 30).contains(&self.listen.max_message_size) {
            return Err(invalid(
                "listen.max_message_size",
                "must be between 1024 bytes and 1 GiB (PostgreSQL's own limit)",
            ));
        }
        if self.runtime.workers > 1024 {
            return Err(invalid("runtime.workers", "must be at most 1024"));
        }
        let tls = &self.tls.client;
        if tls.mode != ClientTlsMode::Disable && (tls.cert.is_none() || tls.key.is_none()) {
            return Err(invalid(
                "tls.client",
                "cert and key are needed unless mode = \"disable\"",
            ));
        }
        if tls.ca.is_some() && tls.mode != ClientTlsMode::Require {
            // With prefer, a client without a certificate fails the handshake, and libpq
            // (sslmode=prefer, its default) then logs in in plaintext, unchecked.
            return Err(invalid(
                "tls.client.ca",
                "client certificates need mode = \"require\" (otherwise a client without one connects in plaintext)",
            ));
        }
        if self.listen.max_client_connections == 0 {
            return Err(invalid(
                "listen.max_client_connections",
                "must be at least 1",
            ));
        }
        if self.listen.client_login_timeout.is_zero() {
            return Err(invalid(
                "listen.client_login_timeout",
                "must be more than 0s",
            ));
        }
        let pool = &self.pool;
        if pool.max_size == 0 {
            return Err(invalid("pool.max_size", "must be at least 1"));
        }
        if pool.min_idle > pool.max_size {
            return Err(invalid(
                "pool.min_idle",
                format!(
                    "{} is more than pool.max_size ({})",
                    pool.min_idle, pool.max_size
                ),
            ));
        }
        if pool.max_prepared_statements == 0 {
            return Err(invalid(
                "pool.max_prepared_statements",
                "must be at least 1",
            ));
        }
        if pool.health_check_interval.is_zero() || pool.health_check_timeout.is_zero() {
            return Err(invalid(
                "pool.health_check_interval",
                "health_check_interval and health_check_timeout must be more than 0s",
            ));
        }
        if pool.server_connect_timeout.is_zero() {
            return Err(invalid(
                "pool.server_connect_timeout",
                "must be more than 0s",
            ));
        }
        if self.databases.is_empty() {
            return Err(invalid(
                "databases",
                "no database configured: add a [databases.NAME] table with at least `host`",
            ));
        }
        for (name, db) in &self.databases {
            let key = |k: &str| format!("databases.{name}.{k}");
            if name.is_empty() || name.len() > 63 {
                return Err(invalid(
                    format!("databases.{name}"),
                    "name must be 1 to 63 bytes",
                ));
            }
            if let Err(ConfigError::Invalid { key: k, reason }) = db.servers() {
                return Err(invalid(key(&k), reason));
            }
            if db.max_connections_percent > 100 {
                return Err(invalid(key("max_connections_percent"), "must be 0 to 100"));
            }
            if db.max_idle_percent > 100 {
                return Err(invalid(key("max_idle_percent"), "must be 0 to 100"));
            }
            if db.max_idle_percent > 0 && db.max_connections_percent == 0 {
                return Err(invalid(
                    key("max_idle_percent"),
                    "needs max_connections_percent",
                ));
            }
            if let Some(user) = &db.monitor_user {
                // (A user auth.file lists needs a password or md5 hash there: with only a
                // verifier, there is nothing to log in to the server with.)
                let listed = self.auth.listed.get(user).is_some_and(|secret| {
                    !matches!(
                        StoredPassword::classify(secret),
                        Ok(StoredPassword::Scram(_))
                    )
                });
                if !self.users.contains_key(user) && !listed {
                    return Err(invalid(
                        key("monitor_user"),
                        format!(
                            "`{user}` is not in [users], nor listed in auth.file with a \
                             password or md5 hash"
                        ),
                    ));
                }
            }
            if db.has_replicas() {
                let ro = format!("{name}{READ_ONLY_SUFFIX}");
                if self.databases.contains_key(&ro) {
                    return Err(invalid(
                        format!("databases.{ro}"),
                        format!("that name is the read-only alias of database {name}"),
                    ));
                }
            }
            if db.port == 0 {
                return Err(invalid(key("port"), "must not be 0"));
            }
            if db.dbname.as_deref() == Some("") {
                return Err(invalid(key("dbname"), "must not be empty"));
            }
        }
        if self.users.is_empty() && !self.auth.enabled && self.auth.listed.is_empty() {
            return Err(invalid(
                "users",
                "no user configured: add a [users.NAME] table with `auth` and `password`, \
                 list users in auth.file, or enable [auth]",
            ));
        }
        if self.auth.enabled {
            if self.auth.user.as_deref().is_none_or(str::is_empty) {
                return Err(invalid("auth.user", "needed when auth.enabled = true"));
            }
            if !self.auth.query.contains("$1") {
                return Err(invalid("auth.query", "must use $1 (the user name)"));
            }
            if self.auth.cache_ttl.is_zero() {
                return Err(invalid("auth.cache_ttl", "must be more than 0s"));
            }
        }
        for (name, user) in &self.users {
            self.validate_user(name, user)?;
        }
        Ok(())
    }

    fn validate_user(&self, name: &str, user: &UserConfig) -> Result<(), ConfigError> {
        let key = |k: &str| format!("users.{name}.{k}");
        if name.is_empty() || name.len() > 63 {
            return Err(invalid(
                format!("users.{name}"),
                "name must be 1 to 63 bytes",
            ));
        }
        let stored = match &user.password {
            Some(p) if p.expose().is_empty() => {
                return Err(invalid(key("password"), "must not be empty"))
            }
            Some(p) => Some(StoredPassword::classify(p).map_err(|e| invalid(key("password"), e))?),
            None => None,
        };
        match (user.auth, &stored) {
            (AuthMethod::Trust, _) => {}
            (_, None) => {
                return Err(invalid(
                    key("password"),
                    format!("required for auth = \"{}\"", auth_name(user.auth)),
                ))
            }
            (AuthMethod::ScramSha256, Some(StoredPassword::Md5Hash(_))) => {
                return Err(invalid(
                    key("password"),
                    "an md5 hash cannot verify scram-sha-256 logins: give the plaintext or a SCRAM-SHA-256 verifier",
                ))
            }
            _ => {}
        }
        if let Some(p) = &user.server_password {
            if p.expose().is_empty() {
                return Err(invalid(key("server_password"), "must not be empty"));
            }
            if let StoredPassword::Scram(_) =
                StoredPassword::classify(p).map_err(|e| invalid(key("server_password"), e))?
            {
                return Err(invalid(
                    key("server_password"),
                    "must be the plaintext password (or an md5 hash for md5 servers), not a SCRAM verifier",
                ));
            }
        }
        if user.server_user.as_deref() == Some("") {
            return Err(invalid(key("server_user"), "must not be empty"));
        }
        match &user.server_password_command {
            Some(_) if user.server_password.is_some() => {
                return Err(invalid(
                    key("server_password_command"),
                    "give server_password or server_password_command, not both",
                ))
            }
            Some(c) if c.expose().trim().is_empty() => {
                return Err(invalid(key("server_password_command"), "must not be empty"))
            }
            _ => {}
        }
        Ok(())
    }

    /// The admin HTTP listener's address, if there is one (validated at load).
    pub fn admin_http_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.admin.http_listen.trim().is_empty() {
            return Ok(None);
        }
        self.admin.http_listen.parse().map(Some).map_err(|_| {
            invalid(
                "admin.http_listen",
                format!(
                    "`{}` is not an IP address and port such as 127.0.0.1:9930 (empty: no listener)",
                    self.admin.http_listen
                ),
            )
        })
    }

    /// The parsed listen address (validated at load).
    /// `listen.read_only_addr`, if set.
    pub fn read_only_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.read_only_addr.is_empty() {
            return Ok(None);
        }
        self.listen
            .read_only_addr
            .parse()
            .map(Some)
            .map_err(|e| invalid("listen.read_only_addr", format!("{e}: expected ip:port")))
    }

    /// The path of the Unix-domain socket clients may connect to, if there is one: in
    /// `listen.unix_socket_dir`, named for `port` (listen.addr's, once bound).
    pub fn unix_socket_path(&self, port: u16) -> Option<std::path::PathBuf> {
        let dir = self.listen.unix_socket_dir.trim();
        (!dir.is_empty()).then(|| std::path::Path::new(dir).join(format!(".s.PGSQL.{port}")))
    }

    /// `listen.unix_socket_mode` as permission bits (validated at load).
    pub fn unix_socket_mode(&self) -> Result<u32, ConfigError> {
        let text = self.listen.unix_socket_mode.trim();
        u32::from_str_radix(text.strip_prefix("0o").unwrap_or(text), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "listen.unix_socket_mode",
                    format!("`{text}` is not permission bits in octal, such as 0777 or 0770"),
                )
            })
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.addr.parse().map_err(|_| {
            invalid(
                "listen.addr",
                format!(
                    "`{}` is not an IP address and port such as 127.0.0.1:6432 or [::1]:6432",
                    self.listen.addr
                ),
            )
        })
    }

    /// The effective configuration as TOML, secrets masked (for `check-config`), and the
    /// users `auth.file` lists (names only), as a comment.
    pub fn to_masked_toml(&self) -> String {
        let mut text =
            toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        if !self.auth.listed.is_empty() {
            const SHOWN: usize = 20;
            let mut names: Vec<String> = self
                .auth
                .listed
                .keys()
                .take(SHOWN)
                .map(|n| format!("{n:?}"))
                .collect();
            if self.auth.listed.len() > SHOWN {
                names.push("…".into());
            }
            let n = self.auth.listed.len();
            text.push_str(&format!(
                "\n# auth.file lists {n} user{} besides [users] (pools made at each one's \
                 first login): {}\n",
                if n == 1 { "" } else { "s" },
                names.join(", ")
            ));
        }
        text
    }
}

pub fn auth_name(method: AuthMethod) -> &'static str {
    match method {
        AuthMethod::ScramSha256 => "scram-sha-256",
        AuthMethod::Md5 => "md5",
        AuthMethod::Trust => "trust",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [databases.app]
        host = "127.0.0.1"
        [users.app]
        password = "secret"
    "#;

    #[test]
    fn defaults_fill_everything_not_given() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.listen.addr, "127.0.0.1:6432");
        assert_eq!(c.pool.max_size, 20);
        assert_eq!(c.pool.borrow_timeout, Duration::from_secs(120));
        assert_eq!(c.pool.idle_client_timeout, Duration::from_secs(1800));
        assert_eq!(c.databases["app"].port, 5432);
        assert_eq!(c.users["app"].auth, AuthMethod::ScramSha256);
    }

    #[test]
    fn durations_are_written_like_120s() {
        let c = Config::from_toml(&format!("[pool]\nborrow_timeout = \"1m 30s\"\n{MINIMAL}"))
            .expect("valid");
        assert_eq!(c.pool.borrow_timeout, Duration::from_secs(90));
        let err = Config::from_toml(&format!("[pool]\nborrow_timeout = 5\n{MINIMAL}"))
            .expect_err("a bare number is not a duration");
        assert!(err.to_string().contains("pool.borrow_timeout"), "{err}");
    }

    #[test]
    fn the_unix_socket_is_named_for_the_port_and_its_mode_is_octal() {
        let c = Config::from_toml(MINIMAL).expect("valid");
        assert_eq!(c.unix_socket_path(6432), None);
        assert_eq!(c.unix_socket_mode().expect("default"), 0o777);
        let with = |listen: &str| Config::from_toml(&format!("[listen]\n{listen}\n{MINIMAL}"));
        let c = with("unix_socket_dir = \"/run/pgshield/\"\nunix_socket_mode = \"770\"")
            .expect("valid");
        assert_eq!(
            c.unix_socket_path(6433),
            Some(std::path::PathBuf::from("/run/pgshield/.s.PGSQL.6433"))
        );
        assert_eq!(c.unix_socket_mode().expect("octal"), 0o770);
        for (mode, bits) in [("0o600", 0o600), ("0660", 0o660), ("0", 0)] {
            let c = with(&format!("unix_socket_mode = \"{mode}\"")).expect(mode);
            assert_eq!(c.unix_socket_mode().expect(mode), bits, "{mode}");
        }
        for mode in ["0778", "1777", "rwx", "", "-1"] {
            let err = with(&format!("unix_socket_mode = \"{mode}\"")).expect_err(mode);
            assert!(err.to_string().contains("listen.unix_socket_mode"), "{err}");
        }
        // Linux's socket addresses hold 107 bytes and a NUL: the name must fit whatever
        // port listen.addr gets, and the temporary name (a process id added) too.
        let dir = |len: usize| format!("/{}", "d".repeat(len - 1));
        let longest = dir(107 - ".s.PGSQL.65535.4194304".len() - 1);
        with(&format!("unix_socket_dir = \"{longest}\"")).expect("fits");
        let err = with(&format!("unix_socket_dir = \"{longest}d\"")).expect_err("too long");
        assert!(err.to_string().contains("listen.unix_socket_dir"), "{err}");
        // Not a server's own socket: pgshield would connect to itself.
        let fronting = |dir: &str, port: u16| {
            Config::from_toml(&format!(
                "[listen]\naddr = \"127.0.0.1:6432\"\nunix_socket_dir = \"/run/pg\"\n\
                 [databases.app]\nhost = \"{dir}\"\nport = {port}\n\
                 [users.app]\npassword = \"secret\"\n"
            ))
        };
        let err = fronting("/run/pg/", 6432).expect_err("itself");
        assert!(err.to_string().contains("databases.app.host"), "{err}");
        fronting("/run/pg", 5432).expect("another port");
        fronting("/run/postgresql", 6432).expect("another directory");
    }

    #[test]
    fn a_pgbouncer_auth_file_is_read_as_pgbouncer_reads_it() {
        let verifier = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$\
                        c3RvcmVkIGtleSBvZiB0aGlydHktdHdvIGJ5dGVzISE=:\
                        c2VydmVyIGtleSBvZiB0aGlydHktdHdvIGJ5dGVzISE=";
        let text = format!(
            "\u{feff}; PgBouncer's comment\r\n# another\n\n\
             \"alice\" \"md5d5b7d9a8c1a6e0b46e1f6a5a3e0f4b2c\"\n\
             \"bob\" \"{verifier}\" \"ignored\" column\n\
             \"o\"\"quote\"  \"plain pass\"\n\
             \"alice\" \"second\"\n"
        );
        let users = parse_auth_file(&text).expect("valid");
        let names: Vec<&str> = users.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bob", "o\"quote", "alice"]);
        assert_eq!(
            users[2].1, "second",
            "a user listed again: the later password"
        );
        assert_eq!(users[0].1, verifier);
        assert_eq!(users[1].1, "plain pass");
        assert_eq!(
            parse_auth_file("\u{feff}\"a\"\t\"pw\"\r\n\"b\" \"ü\"\"\"\r\n"),
            Ok(vec![("a".into(), "pw".into()), ("b".into(), "ü\"".into())]),
            "a byte-order mark, tabs, CRLF, a character beyond ASCII"
        );
        // As PgBouncer's mkauth writes a role without a password: left out.
        assert_eq!(
            parse_auth_file("\"nopw\" \"\" \"\"\n\"a\" \"pw\"\n\"a\" \"\"\n\"b\" \"pw\"\n"),
            Ok(vec![("b".into(), "pw".into())])
        );
        for (text, line, why) in [
            ("\"a\" \"pw\"\n\"b \"pw\"\n", "line 2", "password"),
            ("\"a\"\n", "line 1", "no quoted password"),
            ("\"a\" pw\n", "line 1", "no quoted password"),
            ("\"a\" \"pw\n", "line 1", "not closed"),
            ("\"\" \"pw\"\n", "line 1", "1 to 63 bytes"),
            (
                "\"a\" \"SCRAM-SHA-256$broken\"\n",
                "line 1",
                "SCRAM-SHA-256 verifier",
            ),
            // A name that swallowed a password by a misplaced quote is not repeated.
            (
                "\"alice \"\"hunter2\" \"SCRAM-SHA-256$x\"\n",
                "line 1",
                "verifier",
            ),
        ] {
            let err = parse_auth_file(text).expect_err(text);
            assert!(err.contains(line) && err.contains(why), "{text:?}: {err}");
            assert!(!err.contains("hunter2") && !err.contains("alice"), "{err}");
        }

        // Its users are users, each logging in by what its secret allows; [users.NAME]
        // wins over the file, and one with rules but no password takes the file's.
        let dir = std::env::temp_dir().join(format!("pgshield-authfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("userlist.txt"), &text).expect("write");
        let c = Config::from_toml(&format!(
            "[databases.app]\nhost = \"127.0.0.1\"\n[auth]\nfile = \"{}\"\n\
             [users.bob]\npassword = \"configured\"\n\
             [users.alice]\nrequire_tls = true\n",
            dir.join("userlist.txt").display()
        ))
        .expect("valid");
        // (Listed users are kept apart: their pools are made at their first login.)
        let listed: Vec<&str> = c.auth.listed.keys().map(String::as_str).collect();
        assert_eq!(listed, ["o\"quote"]);
        assert_eq!(
            AuthConfig::listed_auth(&c.auth.listed["o\"quote"]),
            AuthMethod::ScramSha256
        );
        assert_eq!(
            c.users["bob"].password.as_ref().map(|p| p.expose()),
            Some("configured")
        );
        let alice = &c.users["alice"];
        assert!(alice.require_tls);
        assert_eq!(alice.password.as_ref().map(|p| p.expose()), Some("second"));
        std::fs::write(
            dir.join("userlist.txt"),
            "\"carol\" \"md5d5b7d9a8c1a6e0b46e1f6a5a3e0f4b2c\"\n\"dave\" \"\"\n",
        )
        .expect("write");
        let c = Config::from_toml(&format!(
            "[databases.app]\nhost = \"127.0.0.1\"\n[auth]\nfile = \"{}\"\n",
            dir.join("userlist.txt").display()
        ))
        .expect("a user without a password is left out, not an error");
        assert_eq!(
            AuthConfig::listed_auth(&c.auth.listed["carol"]),
            AuthMethod::Md5
        );
        assert!(!c.auth.listed.contains_key("dave"));
        // A table of rules for a user the file no longer lists goes with the user (a
        // reload of a regenerated file is not refused for it); a listed user with a
        // password or md5 hash may run the health checks, one with only a verifier not.
        let with = |extra: &str| {
            Config::from_toml(&format!(
                "[databases.app]\nhost = \"127.0.0.1\"\n{extra}[auth]\nfile = \"{}\"\n\
                 [users.gone]\nrequire_tls = true\n",
                dir.join("userlist.txt").display()
            ))
        };
        let c = with("").expect("valid");
        assert!(!c.users.contains_key("gone"));
        with("monitor_user = \"carol\"\n").expect("carol has an md5 hash");
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"erin\" \"{verifier}\"\n"),
        )
        .expect("write");
        let err = with("monitor_user = \"erin\"\n").expect_err("only a verifier");
        assert!(err.to_string().contains("monitor_user"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = BTreeMap::from([
            ("PGSHIELD__POOL__MAX_SIZE".to_string(), "50".to_string()),
            (
                "PGSHIELD__USERS__APP__PASSWORD".to_string(),
                "12345".to_string(),
            ),
            (
                "PGSHIELD__DATABASES__OTHER__HOST".to_string(),
                "db.internal".to_string(),
            ),
        ]);
        let dir = std::env::temp_dir().join(format!("pgshield-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pgshield.toml");
        std::fs::write(&file, MINIMAL).unwrap();
        let c = Config::load_with_env(Some(&file), Some(env)).expect("valid");
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(c.pool.max_size, 50);
        assert_eq!(c.users["app"].password.as_ref().unwrap().expose(), "12345");
        assert_eq!(c.databases["other"].host, "db.internal");
    }

    #[test]
    fn environment_values_are_the_strings_given_and_lists_split_at_commas() {
        let env = BTreeMap::from(
            [
                ("PGSHIELD__USERS__APP__PASSWORD", "0123"),
                ("PGSHIELD__USERS__APP__SERVER_USER", "007"),
                ("PGSHIELD__USERS__APP__SERVER_PASSWORD", "True"),
                (
                    "PGSHIELD__USERS__APP__ALLOWED_CIDRS",
                    "10.0.0.0/8, 192.168.1.0/24",
                ),
                ("PGSHIELD__DATABASES__APP__DBNAME", "1e3"),
                ("pgshield__databases__app__hosts", "db1,db2:5433"),
                ("PGSHIELD__POOL__MAX_SIZE", "7"),
                ("PGSHIELD__POOL__BORROW_TIMEOUT", "3s"),
                ("PGSHIELD__LISTEN__REUSE_PORT", "true"),
                ("PGSHIELD__ADMIN__USERS", "app"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        let c = Config::load_with_env(None, Some(env)).expect("valid");
        let app = &c.users["app"];
        assert_eq!(app.password.as_ref().unwrap().expose(), "0123");
        assert_eq!(app.server_user.as_deref(), Some("007"));
        assert_eq!(app.server_password.as_ref().unwrap().expose(), "True");
        assert_eq!(app.allowed_cidrs.len(), 2);
        assert_eq!(c.databases["app"].dbname.as_deref(), Some("1e3"));
        assert_eq!(c.databases["app"].hosts, ["db1", "db2:5433"]);
        assert_eq!(c.pool.max_size, 7);
        assert_eq!(c.pool.borrow_timeout, Duration::from_secs(3));
        assert!(c.listen.reuse_port);
        assert_eq!(c.admin.users, ["app"]);
    }

    #[test]
    fn env_alone_can_configure_a_sidecar() {
        let env = BTreeMap::from([
            (
                "PGSHIELD__LISTEN__ADDR".to_string(),
                "0.0.0.0:6432".to_string(),
            ),
            (
                "PGSHIELD__DATABASES__APP__HOST".to_string(),
                "postgres".to_string(),
            ),
            (
                "PGSHIELD__USERS__APP__PASSWORD".to_string(),
                "pw".to_string(),
            ),
        ]);
        let c = Config::load_with_env(None, Some(env)).expect("valid");
        assert_eq!(c.listen.addr, "0.0.0.0:6432");
    }

    #[test]
    fn several_hosts_parse_with_their_roles_and_read_only_aliases_resolve() {
        let users = "[users.u]\npassword = \"x\"\n";
        let c = Config::from_toml(&format!(
            "[databases.a]\nhosts = [\"db1\", \"db2:5433\", \"[::1]:6000\", \"::2\"]\n\
             [databases.b]\nprimary = \"p:1\"\nreplicas = [\"r\"]\nport = 7\n\
             [databases.c]\nhost = \"h\"\n{users}"
        ))
        .expect("valid");
        let a = c.databases["a"].servers().unwrap();
        let got: Vec<(&str, u16, HostRole)> = a
            .iter()
            .map(|h| (h.host.as_str(), h.port, h.role))
            .collect();
        assert_eq!(
            got,
            [
                ("db1", 5432, HostRole::Auto),
                ("db2", 5433, HostRole::Auto),
                ("::1", 6000, HostRole::Auto),
                ("::2", 5432, HostRole::Auto),
            ]
        );
        assert_eq!(a[2].addr(), "[::1]:6000");
        let b = c.databases["b"].servers().unwrap();
        assert_eq!(
            b.iter().map(|h| (h.addr(), h.role)).collect::<Vec<_>>(),
            [
                ("p:1".into(), HostRole::Primary),
                ("r:7".into(), HostRole::Replica)
            ]
        );
        // Unix-domain sockets: a directory, with a port in a list entry.
        let sockets = Config::from_toml(
            "[databases.s]\nhosts = [\"/tmp/a:5433\", \"/var/run/postgresql\"]\n\
             [databases.t]\nhost = \"/var/run/postgresql\"\nport = 5434\n\
             [users.u]\npassword = \"p\"\n",
        )
        .unwrap();
        let s = sockets.databases["s"].servers().unwrap();
        let t = sockets.databases["t"].servers().unwrap();
        assert_eq!(
            s.iter().chain(&t).map(|h| h.addr()).collect::<Vec<_>>(),
            [
                "/tmp/a/.s.PGSQL.5433",
                "/var/run/postgresql/.s.PGSQL.5432",
                "/var/run/postgresql/.s.PGSQL.5434"
            ]
        );
        assert_eq!(c.resolve_database("a_ro"), Some(("a", true)));
        assert_eq!(c.resolve_database("b_ro"), Some(("b", true)));
        assert_eq!(c.resolve_database("a"), Some(("a", false)));
        // One host, a primary: no replicas, no alias.
        assert_eq!(c.resolve_database("c_ro"), None);
        for (bad, key) in [
            (
                "[databases.x]\nhost = \"h\"\nhosts = [\"h2\"]\n",
                "databases.x.host",
            ),
            ("[databases.x]\nreplicas = [\"r\"]\n", "databases.x.primary"),
            ("[databases.x]\nhosts = [\"h:0\"]\n", "databases.x.hosts"),
            (
                "[databases.x]\nhosts = [\"h\", \"h:5432\"]\n",
                "databases.x.hosts",
            ),
            (
                "[databases.x]\nhost = \"h\"\nmax_connections_percent = 101\n",
                "databases.x.max_connections_percent",
            ),
            (
                "[databases.x]\nhost = \"h\"\nmax_idle_percent = 10\n",
                "databases.x.max_idle_percent",
            ),
            (
                "[databases.x]\nhost = \"h\"\nmonitor_user = \"nobody\"\n",
                "databases.x.monitor_user",
            ),
            (
                "[databases.x]\nhosts = [\"a\", \"b\"]\n[databases.x_ro]\nhost = \"h\"\n",
                "databases.x_ro",
            ),
            ("[databases.x]\nhost = \"@pg\"\n", "databases.x.host"),
            (
                "[databases.x]\nhosts = [\"h\", \"@pg\"]\n",
                "databases.x.host",
            ),
        ] {
            match Config::from_toml(&format!("{bad}{users}")) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[pool]\nmax_size = 0\n", "pool.max_size"),
            ("[pool]\nmin_idle = 30\n", "pool.min_idle"),
            ("[listen]\naddr = \"localhost\"\n", "listen.addr"),
            ("[databases.x]\nhost = \"\"\n", "databases.x.host"),
            ("[users.bob]\nauth = \"md5\"\n", "users.bob.password"),
            (
                "[users.bob]\npassword = \"SCRAM-SHA-256$x\"\n",
                "users.bob.password",
            ),
            (
                "[users.bob]\npassword = \"md5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n",
                "users.bob.password",
            ),
            (
                "[users.bob]\npassword = \"x\"\npassword_file = \"/etc/hostname\"\n",
                "users.bob.password_file",
            ),
            (
                "[users.bob]\npassword_file = \"/nonexistent/pw\"\n",
                "users.bob.password_file",
            ),
            (
                "[users.bob]\npassword = \"x\"\nserver_password = \"y\"\nserver_password_command = \"echo y\"\n",
                "users.bob.server_password_command",
            ),
            ("[listen]\nmax_message_size = 10\n", "listen.max_message_size"),
            ("[tls.client]\nmode = \"require\"\n", "tls.client"),
            (
                "[tls.client]\nmode = \"prefer\"\ncert = \"c\"\nkey = \"k\"\nca = \"ca\"\n",
                "tls.client.ca",
            ),
            (
                "[tls.server]\nmode = \"disable\"\nchannel_binding = \"require\"\n",
                "tls.server.channel_binding",
            ),
        ];
        for (extra, key) in cases {
            let err = Config::from_toml(&format!("{extra}{MINIMAL}")).expect_err(extra);
            assert!(err.to_string().contains(key), "{extra}: {err}");
        }
        let err = Config::from_toml(&format!("[pool]\nmax_sise = 3\n{MINIMAL}")).expect_err("typo");
        assert!(err.to_string().contains("max_sise"), "{err}");
    }

    #[test]
    fn transaction_mode_is_the_default_and_statement_mode_does_not_exist() {
        assert_eq!(
            Config::from_toml(MINIMAL).unwrap().pool.mode,
            PoolMode::Transaction
        );
        let err = Config::from_toml(&format!("[pool]\nmode = \"statement\"\n{MINIMAL}"))
            .expect_err("not a mode");
        assert!(err.to_string().contains("statement"), "{err}");
    }

    #[test]
    fn cidrs_parse_and_match_as_pg_hba_would() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.200.3.4")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!c("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(c("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(c("::1").contains(ip("::1")));
        assert!(c("fd00::/8").contains(ip("fd12::1")));
        assert!(!c("fd00::/8").contains(ip("127.0.0.1")));
        // An IPv4 client seen through an IPv6 socket is still that IPv4 address.
        assert!(c("127.0.0.0/8").contains(ip("::ffff:127.0.0.1")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::1/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(c("10.1.2.3/8").to_string(), "10.1.2.3/8");
        // IPv4-mapped: the IPv4 range it maps, never every IPv4 address.
        assert!(c("::ffff:10.1.2.3").contains(ip("10.1.2.3")));
        assert!(c("::ffff:10.1.2.3").contains(ip("::ffff:10.1.2.3")));
        assert!(!c("::ffff:10.1.2.3").contains(ip("192.0.2.1")));
        assert!(c("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
        assert!(!c("::ffff:10.0.0.0/104").contains(ip("11.0.0.1")));
        assert_eq!(c("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert!("::ffff:10.0.0.0/95".parse::<Cidr>().is_err());
    }

    #[test]
    fn the_documented_example_is_valid_and_states_the_defaults() {
        let c = Config::from_toml(include_str!("../config/pgshield.toml"))
            .expect("config/pgshield.toml is valid");
        let (doc, default) = (&c.pool, PoolConfig::default());
        assert_eq!(doc.mode, default.mode);
        assert_eq!(doc.max_size, default.max_size);
        assert_eq!(doc.min_idle, default.min_idle);
        assert_eq!(doc.borrow_timeout, default.borrow_timeout);
        assert_eq!(doc.server_connect_timeout, default.server_connect_timeout);
        assert_eq!(doc.server_lifetime, default.server_lifetime);
        assert_eq!(doc.server_idle_timeout, default.server_idle_timeout);
        assert_eq!(doc.idle_client_timeout, default.idle_client_timeout);
        assert_eq!(doc.shutdown_timeout, default.shutdown_timeout);
        assert_eq!(doc.max_prepared_statements, default.max_prepared_statements);
        assert_eq!(
            doc.max_client_prepared_statements,
            default.max_client_prepared_statements
        );
        assert_eq!(doc.on_session_state, default.on_session_state);
        assert_eq!(
            doc.idle_transaction_timeout,
            default.idle_transaction_timeout
        );
        assert_eq!(doc.query_timeout, default.query_timeout);
        assert_eq!(doc.health_check_after, default.health_check_after);
        assert_eq!(doc.health_check_interval, default.health_check_interval);
        assert_eq!(doc.health_check_timeout, default.health_check_timeout);
        assert_eq!(c.read_only, ReadOnlyConfig::default());
        assert_eq!(
            (
                c.databases["app"].max_connections_percent,
                c.databases["app"].max_replica_lag
            ),
            (0, Duration::ZERO)
        );
        assert_eq!(
            c.users["app"].server_password_ttl,
            default_password_ttl(),
            "users.app.server_password_ttl"
        );
        let (doc, default) = (&c.listen, ListenConfig::default());
        assert_eq!(doc.addr, default.addr);
        assert_eq!(doc.max_client_connections, default.max_client_connections);
        assert_eq!(doc.client_login_timeout, default.client_login_timeout);
        assert_eq!(doc.max_message_size, default.max_message_size);
        assert_eq!(doc.reuse_port, default.reuse_port);
        assert_eq!(doc.read_only_addr, default.read_only_addr);
        assert_eq!(c.runtime.workers, RuntimeConfig::default().workers);
        assert_eq!(c.admin.http_listen, AdminConfig::default().http_listen);
        assert_eq!(c.tls.client.mode, ClientTlsMode::default());
        let (doc, default) = (&c.auth, AuthConfig::default());
        assert_eq!(
            (doc.enabled, &doc.query, doc.cache_ttl),
            (default.enabled, &default.query, default.cache_ttl)
        );
        assert_eq!(c.tls.server.mode, ServerTlsMode::default());
    }

    #[test]
    fn masked_output_never_contains_secrets() {
        let c = Config::from_toml(&format!(
            "{MINIMAL}\n[users.ops]\npassword = \"hunter2\"\nserver_password = \"backend-pw\"\n"
        ))
        .expect("valid");
        let shown = c.to_masked_toml();
        assert!(
            !shown.contains("secret")
                && !shown.contains("hunter2")
                && !shown.contains("backend-pw")
        );
        assert!(shown.contains("********"));
        assert!(!format!("{c:?}").contains("hunter2"));
        // auth.file's users by name only.
        let dir = std::env::temp_dir().join(format!("pgshield-masked-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("users.txt"), "\"amy\" \"hunter3\"\n").expect("write");
        let c = Config::from_toml(&format!(
            "{MINIMAL}\n[auth]\nfile = \"{}\"\n",
            dir.join("users.txt").display()
        ))
        .expect("valid");
        let shown = c.to_masked_toml();
        assert!(
            shown.contains("auth.file lists 1 user besides") && shown.contains("\"amy\""),
            "{shown}"
        );
        assert!(!shown.contains("hunter3") && !format!("{c:?}").contains("hunter3"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn stored_passwords_are_classified_like_rolpassword() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        assert!(matches!(
            StoredPassword::classify(&Secret::new(v)),
            Ok(StoredPassword::Scram(_))
        ));
        let m = postgres_protocol::password::md5(b"pw", "bob");
        assert!(matches!(
            StoredPassword::classify(&Secret::new(m)),
            Ok(StoredPassword::Md5Hash(_))
        ));
        assert!(matches!(
            StoredPassword::classify(&Secret::new("md5 is a fine password")),
            Ok(StoredPassword::Plain(_))
        ));
    }
}
