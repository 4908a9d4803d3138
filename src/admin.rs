//! The admin console: clients of the virtual database `pgshield` (users in `admin.users`)
//! send PgBouncer's console commands as simple queries and get PgBouncer's column layout,
//! so existing PgBouncer exporters and dashboards read pgshield unchanged. Plus what
//! PgBouncer lacks: SHOW PINS and SHOW PREPARED. Commands not built yet say so.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, BytesMut};
use tokio_util::sync::CancellationToken;

use crate::net::{Peer, Stream};
use crate::pool::Pool;
use crate::protocol::frame::{read_message, take_cstr};
use crate::protocol::messages::{self, put_message};
use crate::protocol::{sqlstate, ErrorResponse};
use crate::proxy::Shared;
use crate::reload::ReloadError;

/// Largest message an admin client may send.
const MAX_ADMIN_MESSAGE: usize = 64 * 1024;

const INT8: u32 = 20;
const TEXT: u32 = 25;

/// Serves one admin client until it leaves (or pgshield is forced to stop).
pub async fn run(shared: Arc<Shared>, mut stream: Stream, mut buf: BytesMut, user: String) {
    let mut skip_until_sync = false;
    loop {
        // An idle console must not hold up a drain.
        let message = tokio::select! {
            m = read_message(&mut stream, &mut buf, MAX_ADMIN_MESSAGE) => m,
            _ = shared.shutdown.draining() => return,
        };
        let Ok((tag, body)) = message else { return };
        let mut out = BytesMut::new();
        match tag {
            b'Q' => {
                let mut text = &body[..];
                let sql = take_cstr(&mut text).unwrap_or_default();
                tracing::info!(user, command = sql, "admin console");
                if let Err(e) = execute(&shared, &user, sql, &mut out).await {
                    e.encode(&mut out);
                }
                messages::ready_for_query(&mut out, b'I');
            }
            b'X' => return,
            b'S' => {
                skip_until_sync = false;
                messages::ready_for_query(&mut out, b'I');
            }
            _ if skip_until_sync => continue,
            _ => {
                skip_until_sync = true;
                ErrorResponse::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "the pgshield admin console takes simple queries only",
                )
                .encode(&mut out);
            }
        }
        if stream.send(&out).await.is_err() {
            return;
        }
    }
}

/// A result set: named columns (int8 or text) and rows of text values.
struct Table {
    columns: Vec<(&'static str, u32)>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn new(columns: &[(&'static str, u32)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, values: Vec<Option<String>>) {
        self.rows.push(values);
    }

    fn write(&self, out: &mut BytesMut, tag: &str) {
        put_message(out, b'T', |b| {
            b.put_i16(self.columns.len() as i16);
            for (name, oid) in &self.columns {
                b.put_slice(name.as_bytes());
                b.put_u8(0);
                b.put_i32(0);
                b.put_i16(0);
                b.put_u32(*oid);
                b.put_i16(if *oid == INT8 { 8 } else { -1 });
                b.put_i32(-1);
                b.put_i16(0);
            }
        });
        for row in &self.rows {
            put_message(out, b'D', |b| {
                b.put_i16(row.len() as i16);
                for value in row {
                    match value {
                        Some(v) => {
                            b.put_i32(v.len() as i32);
                            b.put_slice(v.as_bytes());
                        }
                        None => b.put_i32(-1),
                    }
                }
            });
        }
        messages::command_complete(out, tag);
    }
}

fn v(x: impl ToString) -> Option<String> {
    Some(x.to_string())
}

fn not_supported(command: &str, why: &str) -> ErrorResponse {
    ErrorResponse::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        format!("{command} is not supported by pgshield yet: {why}"),
    )
}

async fn execute(
    shared: &Arc<Shared>,
    user: &str,
    sql: &str,
    out: &mut BytesMut,
) -> Result<(), ErrorResponse> {
    let words: Vec<String> = sql
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    // A user of admin.stats_users (and not admin.users) may look, not act: as PgBouncer's
    // stats_users. (Read at each command: a reload may have changed the lists.)
    let acts = words.first().is_some_and(|w| w != "SHOW");
    if acts && !shared.live().config.admin.users.iter().any(|u| u == user) {
        return Err(ErrorResponse::error(
            sqlstate::INSUFFICIENT_PRIVILEGE,
            format!("user \"{user}\" may run SHOW commands only (admin.stats_users)"),
        ));
    }
    let arg = |i: usize| {
        sql.trim()
            .trim_end_matches(';')
            .split_whitespace()
            .nth(i)
            .map(str::to_owned)
    };
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["SHOW", what] => show(shared, what, out),
        ["PAUSE"] | ["PAUSE", _] => {
            pools_of(shared, arg(1).as_deref())?;
            // (Noted first: a pool made from now on starts paused.)
            shared.pools.note_paused(arg(1).as_deref());
            let pools = pools_of(shared, arg(1).as_deref())?;
            // All held at once, then waited on.
            for pool in &pools {
                pool.hold();
            }
            for pool in &pools {
                pool.until_paused().await;
            }
            messages::command_complete(out, "PAUSE");
            Ok(())
        }
        ["RESUME"] | ["RESUME", _] => {
            // A known database. Noted first, then the pools taken: a pool made in between
            // (a found user's first login) would otherwise be held, as the pause still
            // covered it, and never resumed.
            pools_of(shared, arg(1).as_deref())?;
            shared.pools.note_resumed(arg(1).as_deref());
            for pool in pools_of(shared, arg(1).as_deref())? {
                pool.resume();
            }
            messages::command_complete(out, "RESUME");
            Ok(())
        }
        ["RECONNECT"] | ["RECONNECT", _] => {
            for pool in pools_of(shared, arg(1).as_deref())? {
                pool.reconnect();
            }
            messages::command_complete(out, "RECONNECT");
            Ok(())
        }
        ["SHUTDOWN"] => {
            tracing::warn!("SHUTDOWN from the admin console: closing every client now");
            shared.shutdown.force();
            messages::command_complete(out, "SHUTDOWN");
            Ok(())
        }
        ["SHUTDOWN", "WAIT_FOR_CLIENTS"] => {
            tracing::info!("SHUTDOWN WAIT_FOR_CLIENTS from the admin console: no new clients; exiting when the last one leaves");
            shared.shutdown.close_listener();
            messages::command_complete(out, "SHUTDOWN");
            Ok(())
        }
        ["RELOAD"] => {
            let owner = Arc::clone(shared);
            // Reading files and deriving verifiers is blocking work.
            let reloaded = tokio::task::spawn_blocking(move || owner.reload())
                .await
                .unwrap_or_else(|e| Err(ReloadError::Failed(e.to_string())))
                .map_err(|e| {
                    ErrorResponse::error(
                        sqlstate::CONFIG_FILE_ERROR,
                        format!("RELOAD rejected the new configuration: {e}"),
                    )
                    .with_hint("the running configuration stays in force")
                })?;
            for key in reloaded.needs_restart {
                messages::notice(
                    out,
                    sqlstate::SUCCESSFUL_COMPLETION,
                    &format!(
                        "{key} changed but applies only at the next start; the running value stays"
                    ),
                );
            }
            messages::command_complete(out, "RELOAD");
            Ok(())
        }
        ["KILL", _] => {
            let Some(db) = arg(1) else {
                return Err(ErrorResponse::error(
                    sqlstate::SYNTAX_ERROR,
                    "KILL needs a database",
                ));
            };
            pools_of(shared, Some(&db))?;
            // As PgBouncer: the database is also paused; new work waits for RESUME.
            shared.pools.note_paused(Some(&db));
            let pools = pools_of(shared, Some(&db))?;
            for pool in &pools {
                pool.hold();
            }
            for client in shared.registry.list() {
                if client.database() == db {
                    client.kill();
                }
            }
            for pool in pools {
                pool.reconnect();
            }
            tracing::warn!(database = db, "KILL from the admin console");
            messages::command_complete(out, "KILL");
            Ok(())
        }
        ["KILL_CLIENT", _] => {
            let id = arg(1).unwrap_or_default();
            let client = id
                .trim_start_matches('c')
                .parse::<u64>()
                .ok()
                .and_then(|n| shared.registry.get(n))
                .ok_or_else(|| {
                    ErrorResponse::error(
                        sqlstate::SYNTAX_ERROR,
                        format!("no such client: {id} (SHOW CLIENTS lists them in ptr)"),
                    )
                })?;
            tracing::warn!(client = id, "KILL_CLIENT from the admin console");
            client.kill();
            messages::command_complete(out, "KILL_CLIENT");
            Ok(())
        }
        ["SUSPEND"] | ["ENABLE", _] | ["DISABLE", _] | ["WAIT_CLOSE"] | ["WAIT_CLOSE", _] => Err(
            not_supported(words[0], "use PAUSE/RESUME, RECONNECT or SHUTDOWN"),
        ),
        ["SET", ..] => Err(not_supported(
            "SET",
            "settings are changed in the configuration file",
        )),
        _ => Err(invalid_command(sql.trim())),
    }
}

/// A command the console does not know, refused as PgBouncer refuses it: 08P01 (tools
/// tell its console from a server by that, as pgcli does), its message naming SHOW HELP.
fn invalid_command(command: &str) -> ErrorResponse {
    ErrorResponse::error(
        sqlstate::PROTOCOL_VIOLATION,
        format!("invalid command '{command}', use SHOW HELP;"),
    )
}

/// The pools of `database` (all pools without one): a configured database, or the
/// read-only one of a database with replicas (`<db>_ro`, as SHOW POOLS lists it), or one
/// a reload removed whose pools still have clients (paused, they wait for a RESUME); an
/// unknown database is an error.
fn pools_of(shared: &Shared, database: Option<&str>) -> Result<Vec<Arc<Pool>>, ErrorResponse> {
    let all = shared.pools.all();
    match database {
        None => Ok(all),
        Some(db)
            if shared.live().config.resolve_database(db).is_some()
                || all.iter().any(|p| p.database() == db) =>
        {
            Ok(all.into_iter().filter(|p| p.database() == db).collect())
        }
        Some(db) => Err(ErrorResponse::error(
            sqlstate::INVALID_CATALOG_NAME,
            format!("no such database: {db}"),
        )),
    }
}

const HELP: &[&str] = &[
    "SHOW HELP|VERSION|CONFIG|DATABASES|USERS|POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|STATS_AVERAGES|LISTS|PINS|PREPARED",
    "PAUSE [<db>]",
    "RESUME [<db>]",
    "RECONNECT [<db>]",
    "KILL <db>  (also pauses it until RESUME)",
    "KILL_CLIENT <ptr>",
    "SHUTDOWN [WAIT_FOR_CLIENTS]",
    "RELOAD",
    "Not yet: SET",
];

fn show(shared: &Shared, what: &str, out: &mut BytesMut) -> Result<(), ErrorResponse> {
    let table = match what {
        "HELP" => {
            let mut t = Table::new(&[("command", TEXT)]);
            for line in HELP {
                t.row(vec![v(line)]);
            }
            t
        }
        "VERSION" => {
            let mut t = Table::new(&[("version", TEXT)]);
            t.row(vec![v(format!("pgshield {}", env!("CARGO_PKG_VERSION")))]);
            t
        }
        "POOLS" => show_pools(shared),
        "STATS" => show_stats(shared, Stats::Both),
        "STATS_TOTALS" => show_stats(shared, Stats::Totals),
        "STATS_AVERAGES" => show_stats(shared, Stats::Averages),
        "DATABASES" => show_databases(shared),
        "USERS" => {
            let mut t = Table::new(&[("name", TEXT), ("pool_mode", TEXT)]);
            // Configured, and listed in auth.file (as PgBouncer lists its auth_file's).
            let live = shared.live();
            let mut names: Vec<&String> = live.config.users.keys().collect();
            names.extend(live.config.auth.listed.keys());
            names.sort();
            for name in names {
                t.row(vec![v(name), v(live.config.pool.mode)]);
            }
            t
        }
        "CONFIG" => show_config(shared),
        "LISTS" => show_lists(shared),
        "HOSTS" => show_hosts(shared),
        "PINS" => {
            let mut t = Table::new(&[
                ("client", TEXT),
                ("pool", TEXT),
                ("reason", TEXT),
                ("pinned_seconds", INT8),
            ]);
            for (client, pool, reason, since) in shared.pinned.list() {
                let age = SystemTime::now()
                    .duration_since(since)
                    .unwrap_or_default()
                    .as_secs();
                t.row(vec![
                    v(format!("c{client}")),
                    v(pool),
                    v(reason.name()),
                    v(age),
                ]);
            }
            t
        }
        "PREPARED" => {
            let mut t = Table::new(&[
                ("pool", TEXT),
                ("name", TEXT),
                ("declared_types", INT8),
                ("accepted", TEXT),
                ("query", TEXT),
            ]);
            for pool in shared.pools.all() {
                for (name, query, params, valid) in pool.statements.list() {
                    t.row(vec![
                        v(pool.name()),
                        v(name),
                        v(params),
                        v(if valid { "yes" } else { "no" }),
                        v(query),
                    ]);
                }
            }
            t
        }
        "CLIENTS" => show_clients(shared),
        "SERVERS" => show_servers(shared),
        "SOCKETS" | "ACTIVE_SOCKETS" | "FDS" | "DNS_HOSTS" | "DNS_ZONES" | "STATE" | "MEM"
        | "TOTALS" => {
            return Err(not_supported(
                &format!("SHOW {what}"),
                "SHOW POOLS, SHOW STATS and /metrics cover the pools",
            ))
        }
        other => return Err(invalid_command(&format!("SHOW {other}"))),
    };
    table.write(out, "SHOW");
    Ok(())
}

/// PgBouncer's SHOW CLIENTS / SHOW SERVERS columns.
const CONNECTION_COLUMNS: &[(&str, u32)] = &[
    ("type", TEXT),
    ("user", TEXT),
    ("database", TEXT),
    ("state", TEXT),
    ("addr", TEXT),
    ("port", INT8),
    ("local_addr", TEXT),
    ("local_port", INT8),
    ("connect_time", TEXT),
    ("request_time", TEXT),
    ("wait", INT8),
    ("wait_us", INT8),
    ("close_needed", INT8),
    ("ptr", TEXT),
    ("link", TEXT),
    ("remote_pid", INT8),
    ("tls", TEXT),
    ("application_name", TEXT),
];

/// A time as PgBouncer prints it: `2026-11-27 04:40:00 UTC`.
fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

fn show_clients(shared: &Shared) -> Table {
    let mut t = Table::new(CONNECTION_COLUMNS);
    for c in shared.registry.list() {
        let waiting = c.state() == crate::client::registry::ClientState::Waiting;
        // A client over the Unix-domain socket: "unix" and the socket's port at both
        // ends, as PgBouncer shows it.
        let peer = match c.addr {
            Peer::Tcp(addr) => (addr.ip().to_string(), addr.port()),
            Peer::Unix { port } => ("unix".to_owned(), port),
        };
        // (Never NULL, as in PgBouncer: tools scan these columns into strings.)
        let local = match c.local {
            Some(local) => (local.ip().to_string(), local.port()),
            None if matches!(c.addr, Peer::Unix { .. }) => peer.clone(),
            None => (String::new(), 0),
        };
        let wait = c.waiting_for().unwrap_or_default();
        t.row(vec![
            v("C"),
            v(c.user()),
            v(c.database()),
            v(if waiting { "waiting" } else { "active" }),
            v(peer.0),
            v(peer.1),
            v(local.0),
            v(local.1),
            v(time(c.connected_at)),
            // (Before its first request: since it logged in.)
            v(time(c.request_at().unwrap_or(c.connected_at))),
            v(wait.as_secs()),
            v(wait.subsec_micros()),
            v(0),
            v(format!("c{}", c.id)),
            v(c.server()
                .map(|(id, _)| format!("s{id}"))
                .unwrap_or_default()),
            v(0),
            v(if c.tls { "TLS" } else { "" }),
            v(&c.application_name),
        ]);
    }
    t
}

fn show_servers(shared: &Shared) -> Table {
    let mut t = Table::new(CONNECTION_COLUMNS);
    // Lent backends, as the clients holding them report them.
    for c in shared.registry.list() {
        let Some((id, pid)) = c.server() else {
            continue;
        };
        let host = backend_host(shared, c.database(), c.server_host()).unwrap_or_default();
        let (opened_at, tls) = c.server_opened();
        t.row(vec![
            v("S"),
            v(c.user()),
            v(c.database()),
            v("active"),
            v(host.0),
            v(host.1),
            // (Its own end of the connection is not kept for a lent backend.)
            v(""),
            v(0),
            v(time(opened_at)),
            v(time(c.request_at().unwrap_or(opened_at))),
            v(0),
            v(0),
            v(0),
            v(format!("s{id}")),
            v(format!("c{}", c.id)),
            v(pid),
            v(if tls { "TLS" } else { "" }),
            v(&c.application_name),
        ]);
    }
    let mut pools = shared.pools.all();
    pools.sort_by(|a, b| a.name().cmp(b.name()));
    for pool in pools {
        let (db, user) = (pool.database(), pool.user());
        for s in pool.idle_servers() {
            t.row(vec![
                v("S"),
                v(user),
                v(db),
                v("idle"),
                v(&s.peer.0),
                v(s.peer.1),
                v(s.local.map(|l| l.ip().to_string()).unwrap_or_default()),
                v(s.local.map_or(0, |l| l.port())),
                v(time(s.opened_at)),
                // (Its last request ended when it was given back.)
                v(time(s.idle_since)),
                v(0),
                v(0),
                v(0),
                v(format!("s{}", s.id)),
                v(""),
                v(s.pid),
                v(if s.tls { "TLS" } else { "" }),
                v(""),
            ]);
        }
    }
    t
}

fn show_pools(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", TEXT),
        ("user", TEXT),
        ("cl_active", INT8),
        ("cl_waiting", INT8),
        ("cl_active_cancel_req", INT8),
        ("cl_waiting_cancel_req", INT8),
        ("sv_active", INT8),
        ("sv_active_cancel", INT8),
        ("sv_being_canceled", INT8),
        ("sv_idle", INT8),
        ("sv_used", INT8),
        ("sv_tested", INT8),
        ("sv_login", INT8),
        ("maxwait", INT8),
        ("maxwait_us", INT8),
        ("pool_mode", TEXT),
    ]);
    // maxwait: the longest a pool's queued client has waited, as SHOW CLIENTS counts it.
    let mut longest: crate::FastMap<*const crate::pool::Pool, Duration> = Default::default();
    for c in shared.registry.list() {
        if let Some(waited) = c.waiting_for() {
            let pool = longest.entry(Arc::as_ptr(&c.pool)).or_default();
            *pool = (*pool).max(waited);
        }
    }
    let mut pools = shared.pools.all();
    pools.sort_by(|a, b| a.name().cmp(b.name()));
    for pool in pools {
        let (db, user) = (pool.database(), pool.user());
        let s = pool.status();
        let waiting = pool.waiting();
        let active = pool.clients().saturating_sub(waiting);
        let wait = longest
            .get(&Arc::as_ptr(&pool))
            .copied()
            .unwrap_or_default();
        t.row(vec![
            v(db),
            v(user),
            v(active),
            v(waiting),
            v(0),
            v(0),
            v(s.open.saturating_sub(s.idle)),
            v(0),
            v(0),
            v(s.idle),
            v(0),
            v(0),
            v(0),
            v(wait.as_secs()),
            v(wait.subsec_micros()),
            v(pool.mode()),
        ]);
    }
    t
}

enum Stats {
    Both,
    Totals,
    Averages,
}

/// Per database: its pools' totals, summed.
fn totals_by_database(shared: &Shared) -> BTreeMap<String, [u64; 7]> {
    let mut by_db: BTreeMap<String, [u64; 7]> = shared
        .live()
        .config
        .databases
        .keys()
        .map(|db| (db.clone(), [0; 7]))
        .collect();
    for pool in shared.pools.all() {
        let entry = by_db.entry(pool.database().to_owned()).or_default();
        for (sum, x) in entry.iter_mut().zip(pool.stats.totals()) {
            *sum += x;
        }
    }
    by_db
}

const STAT_NAMES: [&str; 7] = [
    "xact_count",
    "query_count",
    "received",
    "sent",
    "xact_time",
    "query_time",
    "wait_time",
];

fn show_stats(shared: &Shared, which: Stats) -> Table {
    let totals = totals_by_database(shared);
    let averages = shared.stats_averages.get();
    let total_names = [
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
    ];
    let avg_names = [
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ];
    let plain: Vec<&'static str> = STAT_NAMES
        .iter()
        .map(|n| match *n {
            "received" => "bytes_received",
            "sent" => "bytes_sent",
            other => other,
        })
        .collect();
    let mut columns = vec![("database", TEXT)];
    match which {
        Stats::Both => {
            columns.extend(total_names.iter().map(|n| (*n, INT8)));
            columns.extend(avg_names.iter().map(|n| (*n, INT8)));
        }
        Stats::Totals | Stats::Averages => columns.extend(plain.iter().map(|n| (*n, INT8))),
    }
    let mut t = Table::new(&columns);
    for (db, total) in totals {
        let avg = averages.get(&db).copied().unwrap_or_default();
        let mut row = vec![v(&db)];
        match which {
            Stats::Both => {
                row.extend(total.iter().map(v));
                row.extend(avg.iter().map(v));
            }
            Stats::Totals => row.extend(total.iter().map(v)),
            Stats::Averages => row.extend(avg.iter().map(v)),
        }
        t.row(row);
    }
    t
}

/// Each database's hosts: role (configured and as found), health, lag, backends.
fn show_hosts(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", TEXT),
        ("host", TEXT),
        ("port", INT8),
        ("configured_role", TEXT),
        ("role", TEXT),
        ("state", TEXT),
        ("lag_ms", INT8),
        ("backends", INT8),
        ("last_error", TEXT),
    ]);
    let mut clusters = shared.pools.clusters();
    clusters.sort_by(|a, b| a.database.cmp(&b.database));
    for cluster in clusters {
        for h in cluster.status() {
            t.row(vec![
                v(&cluster.database),
                v(&h.host),
                v(h.port),
                v(match h.configured {
                    crate::config::HostRole::Auto => "auto",
                    crate::config::HostRole::Primary => "primary",
                    crate::config::HostRole::Replica => "replica",
                }),
                v(h.role.as_str()),
                v(if h.up { "up" } else { "down" }),
                h.lag
                    .filter(|l| *l != crate::pool::cluster::UNKNOWN_LAG)
                    .map(|l| l.as_millis().to_string()),
                v(h.open),
                h.last_error.clone(),
            ]);
        }
    }
    t
}

/// The host writers of `database` use now (its first while none is known), as
/// (host, port); None for a read-only alias (its backends are on any replica: SHOW HOSTS).
fn writer_host(shared: &Shared, database: &str) -> Option<(String, u16)> {
    let clusters = shared.pools.clusters();
    let cluster = clusters.into_iter().find(|c| c.database == database)?;
    let host = &cluster.hosts[cluster.primary().unwrap_or(0)].spec;
    Some((host.host.clone(), host.port))
}

/// The host a client's lent backend is on: host `index` of its database (the base
/// database for a `<db>_ro` client), or else the writers' host.
fn backend_host(shared: &Shared, database: &str, index: Option<usize>) -> Option<(String, u16)> {
    let live = shared.live();
    let base = live
        .config
        .resolve_database(database)
        .map_or(database, |(base, _)| base);
    let on_index = index.and_then(|i| {
        let cluster = shared
            .pools
            .clusters()
            .into_iter()
            .find(|c| c.database == base)?;
        let spec = &cluster.hosts.get(i)?.spec;
        Some((spec.host.clone(), spec.port))
    });
    on_index.or_else(|| writer_host(shared, database))
}

fn show_databases(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("name", TEXT),
        ("host", TEXT),
        ("port", INT8),
        ("database", TEXT),
        ("force_user", TEXT),
        ("pool_size", INT8),
        ("min_pool_size", INT8),
        ("reserve_pool", INT8),
        ("pool_mode", TEXT),
        ("max_connections", INT8),
        ("current_connections", INT8),
        ("paused", INT8),
        ("disabled", INT8),
    ]);
    let pools = shared.pools.all();
    for (name, db) in &shared.live().config.databases {
        let mine: Vec<&Arc<Pool>> = pools.iter().filter(|p| p.database() == name).collect();
        let open: usize = mine.iter().map(|p| p.status().open).sum();
        let paused = mine.iter().any(|p| p.is_paused());
        let (host, port) = writer_host(shared, name).unwrap_or((db.host.clone(), db.port));
        t.row(vec![
            v(name),
            v(host),
            v(port),
            v(db.dbname.clone().unwrap_or_else(|| name.clone())),
            None,
            // (max_connections_percent sizes the pools from the server.)
            v(mine
                .first()
                .map_or(shared.live().config.pool.max_size, |p| p.status().max_size)),
            v(shared.live().config.pool.min_idle),
            v(0),
            v(shared.live().config.pool.mode),
            v(shared.pools.database_limit(name).unwrap_or(0)),
            v(open),
            v(u8::from(paused)),
            v(0),
        ]);
    }
    t
}

fn show_config(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("key", TEXT),
        ("value", TEXT),
        ("default", TEXT),
        ("changeable", TEXT),
    ]);
    let live = shared.live();
    let config = &live.config;
    let sections: [(&str, Option<toml::Value>, Option<toml::Value>); 7] = [
        (
            "listen",
            to_value(&config.listen),
            to_value(&crate::config::ListenConfig::default()),
        ),
        (
            "pool",
            to_value(&config.pool),
            to_value(&crate::config::PoolConfig::default()),
        ),
        (
            "tls",
            to_value(&config.tls),
            to_value(&crate::config::TlsConfig::default()),
        ),
        (
            "auth",
            to_value(&config.auth),
            to_value(&crate::config::AuthConfig::default()),
        ),
        (
            "admin",
            to_value(&config.admin),
            to_value(&crate::config::AdminConfig::default()),
        ),
        (
            "runtime",
            to_value(&config.runtime),
            to_value(&crate::config::RuntimeConfig::default()),
        ),
        (
            "log",
            to_value(&config.log),
            to_value(&crate::config::LogConfig::default()),
        ),
    ];
    for (section, value, default) in sections {
        let mut rows = Vec::new();
        flatten(section, value.as_ref(), &mut rows);
        let mut defaults = Vec::new();
        flatten(section, default.as_ref(), &mut defaults);
        let defaults: HashMap<String, String> = defaults.into_iter().collect();
        for (key, value) in rows {
            let default = defaults.get(&key).cloned().unwrap_or_default();
            t.row(vec![v(&key), v(value), v(default), v("no")]);
        }
    }
    // The same under PgBouncer's names, which its exporter and dashboards look for.
    let pool = &config.pool;
    let defaults = crate::config::PoolConfig::default();
    for (key, value, default) in [
        (
            "max_client_conn",
            config.listen.max_client_connections.to_string(),
            crate::config::ListenConfig::default()
                .max_client_connections
                .to_string(),
        ),
        (
            "default_pool_size",
            pool.max_size.to_string(),
            defaults.max_size.to_string(),
        ),
        (
            "min_pool_size",
            pool.min_idle.to_string(),
            defaults.min_idle.to_string(),
        ),
        (
            "pool_mode",
            pool.mode.to_string(),
            defaults.mode.to_string(),
        ),
        ("max_db_connections", "0".into(), "0".into()),
        ("max_user_connections", "0".into(), "0".into()),
    ] {
        t.row(vec![v(key), v(value), v(default), v("no")]);
    }
    t
}

fn to_value(section: &impl serde::Serialize) -> Option<toml::Value> {
    toml::Value::try_from(section).ok()
}

/// `section.key = value` rows of a TOML table (nested tables joined with dots).
fn flatten(prefix: &str, value: Option<&toml::Value>, rows: &mut Vec<(String, String)>) {
    match value {
        Some(toml::Value::Table(table)) => {
            for (key, value) in table {
                flatten(&format!("{prefix}.{key}"), Some(value), rows);
            }
        }
        Some(toml::Value::String(s)) => rows.push((prefix.to_owned(), s.clone())),
        Some(other) => rows.push((prefix.to_owned(), other.to_string())),
        None => {}
    }
}

fn show_lists(shared: &Shared) -> Table {
    let mut t = Table::new(&[("list", TEXT), ("items", INT8)]);
    let pools = shared.pools.all();
    let used_servers: usize = pools.iter().map(|p| p.status().open).sum();
    for (list, items) in [
        ("databases", shared.live().config.databases.len()),
        (
            "users",
            shared.live().config.users.len() + shared.live().config.auth.listed.len(),
        ),
        ("pools", pools.len()),
        ("free_clients", 0),
        ("used_clients", shared.clients.open()),
        ("login_clients", 0),
        ("free_servers", 0),
        ("used_servers", used_servers),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        t.row(vec![v(list), v(items)]);
    }
    t
}

/// SHOW STATS averages per database over the last `admin.stats_period`, as PgBouncer
/// computes them: counts and bytes per second; times per transaction or query, in µs.
#[derive(Default)]
pub struct Averages(Mutex<AveragesState>);

/// Per database: the totals at the start of the last period, and that period's averages.
type ByDatabase = HashMap<String, [u64; 7]>;
type AveragesState = (ByDatabase, ByDatabase);

impl Averages {
    fn get(&self) -> HashMap<String, [u64; 7]> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    fn update(&self, totals: BTreeMap<String, [u64; 7]>, period: Duration) {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut averages = HashMap::new();
        for (db, now) in &totals {
            let before = state.0.get(db).copied().unwrap_or_default();
            averages.insert(db.clone(), averages_over(before, *now, period));
        }
        *state = (totals.into_iter().collect(), averages);
    }
}

/// PgBouncer's averages between two sets of totals `period` apart: transactions,
/// queries and bytes in and out per second; microseconds per transaction, per query,
/// and of waiting per transaction.
fn averages_over(before: [u64; 7], now: [u64; 7], period: Duration) -> [u64; 7] {
    let secs = period.as_secs_f64().max(0.001);
    let d: Vec<u64> = now
        .iter()
        .zip(before)
        .map(|(n, b)| n.saturating_sub(b))
        .collect();
    let per = |x: u64, n: u64| x.checked_div(n).unwrap_or(0);
    [
        (d[0] as f64 / secs) as u64,
        (d[1] as f64 / secs) as u64,
        (d[2] as f64 / secs) as u64,
        (d[3] as f64 / secs) as u64,
        per(d[4], d[0]),
        per(d[5], d[1]),
        per(d[6], d[0]),
    ]
}

/// `log.stats_period`: one line of totals over each period (PgBouncer's stats line).
pub async fn log_stats(shared: Arc<Shared>, stop: CancellationToken) {
    // Over every pool, those a reload removed that still serve clients included.
    let all_totals = |shared: &Shared| {
        shared.pools.all().iter().fold([0u64; 7], |mut sum, p| {
            sum.iter_mut()
                .zip(p.stats.totals())
                .for_each(|(s, x)| *s += x);
            sum
        })
    };
    let mut before = (all_totals(&shared), std::time::Instant::now());
    loop {
        let period = shared.live().config.log.stats_period;
        // Off: look again in a while (a reload may turn it on).
        let wait = if period.is_zero() {
            Duration::from_secs(1)
        } else {
            period
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let now = (all_totals(&shared), std::time::Instant::now());
        if !period.is_zero() {
            let [xacts, queries, bytes_in, bytes_out, xact_us, query_us, wait_us] =
                averages_over(before.0, now.0, now.1.duration_since(before.1));
            let pools = shared.pools.all();
            let backends: usize = pools.iter().map(|p| p.status().open).sum();
            let waiting: usize = pools.iter().map(|p| p.waiting()).sum();
            tracing::info!(
                xacts_per_s = xacts,
                queries_per_s = queries,
                bytes_in_per_s = bytes_in,
                bytes_out_per_s = bytes_out,
                xact_us,
                query_us,
                wait_us,
                clients = shared.clients.open(),
                waiting,
                backends,
                "stats"
            );
        }
        before = now;
    }
}

/// Computes SHOW STATS averages every `admin.stats_period` until `stop`.
pub async fn average_stats(shared: Arc<Shared>, stop: CancellationToken) {
    let period = shared.live().config.admin.stats_period;
    shared
        .stats_averages
        .update(totals_by_database(&shared), period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {
                shared.stats_averages.update(totals_by_database(&shared), period);
            }
        }
    }
}
