//! Session settings that follow the client: what it asked for at startup (including
//! `options=-c name=value`), and the statement that applies them to a backend.
//!
//! Settings are applied with `set_config(name, value, false)`, which parses the value the
//! way a startup parameter is parsed (so `search_path=a,b` means two schemas), and every
//! name and value is quoted with `postgres_protocol::escape`.

use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::protocol::startup::StartupMessage;
use crate::protocol::{sqlstate, ErrorResponse};
use crate::server::Server;

/// Startup keys that are not settings.
const NOT_SETTINGS: [&str; 3] = ["user", "database", "options"];

/// The settings a client asked for, in order (a later value for a name wins). Kept as
/// `name NUL value NUL …` in one string (protocol strings cannot hold NUL): every client
/// keeps its settings for its whole connection, and one allocation beats a few per name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSettings {
    now: String,
    /// What the client gave at connection start, kept (in the same form) once its settings
    /// first change: PostgreSQL makes startup settings the session's defaults, which
    /// `RESET` and `DISCARD ALL` return to ([`ClientSettings::reset`]).
    // (Boxed twice: an idle client holds a thin pointer, not a string's three words.)
    #[allow(clippy::box_collection)]
    startup: Option<Box<String>>,
}

/// Settings a client may give at startup (`options` switches and parameters together);
/// real drivers send a handful.
const MAX_STARTUP_SETTINGS: usize = 256;

impl ClientSettings {
    /// Collects settings from a StartupMessage. Refuses what pgshield cannot honour.
    /// As PostgreSQL (`process_startup_options`): the switches in `options` first, then
    /// the other parameters, which win over them.
    pub fn from_startup(msg: &StartupMessage) -> Result<ClientSettings, ErrorResponse> {
        let mut settings = ClientSettings::default();
        let mut count = 0usize;
        // (Each is looked for among those before it: bounded, a packet of short names
        // costs no more than a real login's.)
        let mut counted = || {
            count += 1;
            if count > MAX_STARTUP_SETTINGS {
                return Err(ErrorResponse::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    format!("more than {MAX_STARTUP_SETTINGS} settings in the startup packet"),
                ));
            }
            Ok(())
        };
        if let Some(options) = msg.get("options") {
            for (name, value) in parse_options(options).map_err(|reason| {
                ErrorResponse::fatal(
                    sqlstate::INVALID_PARAMETER_VALUE,
                    format!("invalid command-line argument in options: {reason}"),
                )
                .with_hint("pgshield accepts options of the form -c name=value or --name=value")
            })? {
                counted()?;
                settings.set_at_startup(&name, &value)?;
            }
        }
        for (name, value) in &msg.params {
            if name.starts_with("_pq_.") || NOT_SETTINGS.contains(&name.as_str()) {
                continue;
            }
            if name == "replication" {
                if crate::server::pg_bool(value) == Some(false) {
                    continue;
                }
                return Err(ErrorResponse::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "pgshield does not support replication connections; connect to the server directly",
                ));
            }
            counted()?;
            settings.set_at_startup(name, value)?;
        }
        // Kept for the connection's life: no spare room.
        settings.now.shrink_to_fit();
        Ok(settings)
    }

    /// A startup setting. A transaction's own means nothing there: PostgreSQL refuses
    /// `transaction_deferrable` at login, and `transaction_isolation` but `read
    /// committed` (the isolation of the login's own transaction), as pgshield does, naming
    /// what to use; it starts every transaction from the default `transaction_read_only`,
    /// which pgshield ignores.
    fn set_at_startup(&mut self, name: &str, value: &str) -> Result<(), ErrorResponse> {
        let ignored = name.eq_ignore_ascii_case("transaction_read_only")
            || (name.eq_ignore_ascii_case("transaction_isolation")
                && value.eq_ignore_ascii_case("read committed"));
        if !transaction_only(name) {
            self.set(name, value);
        } else if !ignored {
            return Err(ErrorResponse::fatal(
                sqlstate::ACTIVE_SQL_TRANSACTION,
                format!(
                    "{} cannot be set at login; it is a setting of one transaction",
                    name.to_ascii_lowercase()
                ),
            )
            .with_hint(format!(
                "set default_{0} (in options, -c default_{0}=…) for every transaction",
                name.to_ascii_lowercase()
            )));
        }
        Ok(())
    }

    fn set(&mut self, name: &str, value: &str) {
        self.forget(name);
        for part in [name, value] {
            self.now.push_str(part);
            self.now.push('\0');
        }
    }

    /// All of them, as kept (equal strings: equal settings in the same order).
    pub fn as_str(&self) -> &str {
        &self.now
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        find(&self.now, name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        pairs(&self.now)
    }

    /// The settings that `server` does not have yet: not applied by pgshield, and (for
    /// reported parameters) not already the value the server reported.
    pub fn missing_on<'a>(
        &'a self,
        server: &'a Server,
    ) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.iter().filter(move |(name, value)| {
            let applied = server
                .applied()
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            applied != Some(value) && server.params().get(name) != Some(value)
        })
    }

    /// Settings `server` carries for someone else (pgshield applied them, or another
    /// client set them) that this client does not want.
    pub fn extra_on<'a>(&'a self, server: &'a Server) -> impl Iterator<Item = &'a str> + 'a {
        server
            .applied()
            .iter()
            .filter(|(name, _)| self.get(name).is_none())
            .map(|(name, _)| name.as_str())
    }

    fn forget(&mut self, name: &str) {
        if self.get(name).is_none() {
            return;
        }
        let mut kept = String::with_capacity(self.now.len());
        for (k, v) in self.iter().filter(|(k, _)| !k.eq_ignore_ascii_case(name)) {
            for part in [k, v] {
                kept.push_str(part);
                kept.push('\0');
            }
        }
        self.now = kept;
    }

    /// Before the first change: what the client started with is kept.
    fn changing(&mut self) {
        if self.startup.is_none() {
            self.startup = Some(Box::new(self.now.clone()));
        }
    }

    /// The server has no session value for `name` (RESET, DISCARD ALL): the client's is
    /// the one it gave at connection start, if any, as in PostgreSQL. Returns that value
    /// (which the backend then lacks).
    pub fn reset(&mut self, name: &str) -> Option<String> {
        self.changing();
        let startup = self.startup.as_deref().and_then(|s| find(s, name));
        match startup.map(str::to_owned) {
            Some(value) => {
                self.set(name, &value);
                Some(value)
            }
            None => {
                self.forget(name);
                None
            }
        }
    }

    /// What the client gave at connection start: its session's defaults.
    pub fn startup(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        pairs(self.startup.as_deref().unwrap_or(&self.now))
    }

    /// Whether `value` is `name`'s as the client gave it at startup: PostgreSQL reads such
    /// a value in the server's encoding (it converts nothing before `client_encoding` is
    /// set), one read back since in the client's.
    pub fn as_given(&self, name: &str, value: &str) -> bool {
        self.given(name) == Some(value)
    }

    /// `name`'s value as the client gave it at startup, if it did.
    pub fn given(&self, name: &str) -> Option<&str> {
        find(self.startup.as_deref().unwrap_or(&self.now), name)
    }

    /// Records a setting the client changed during its session.
    pub fn record(&mut self, name: &str, value: &str) {
        if self.get(name) != Some(value) {
            self.changing();
            self.set(name, value);
        }
    }
}

fn pairs(kept: &str) -> impl Iterator<Item = (&str, &str)> + Clone {
    let mut parts = kept.split('\0');
    std::iter::from_fn(move || Some((parts.next()?, parts.next()?)))
}

fn find<'a>(kept: &'a str, name: &str) -> Option<&'a str> {
    // (By the NULs' positions, not `pairs`: str's split by a char costs about a hundred
    // instructions a part, and this runs for every statement of a client with settings.)
    let b = kept.as_bytes();
    let mut at = 0;
    while at < b.len() {
        let name_end = at + memchr::memchr(0, &b[at..])?;
        let value_end = name_end + 1 + memchr::memchr(0, &b[name_end + 1..])?;
        if b[at..name_end].eq_ignore_ascii_case(name.as_bytes()) {
            // (NUL is ASCII: both ends are character boundaries.)
            return Some(&kept[name_end + 1..value_end]);
        }
        at = value_end + 1;
    }
    None
}

/// A setting's value as SQL: a literal, or, with bytes beyond ASCII, those bytes converted
/// from the client's encoding by the server (the statement's own text stays ASCII).
fn value_sql(value: &str, encoding: &str) -> String {
    if value.is_ascii() {
        return escape_literal(value);
    }
    let hex: String = value.bytes().map(|b| format!("{b:02x}")).collect();
    format!(
        "pg_catalog.convert_from(pg_catalog.decode('{hex}', 'hex'), {})",
        escape_literal(encoding)
    )
}

/// Parameters the server reports with ParameterStatus that a client may also set: when
/// one changes during a session, the change follows the client to other backends.
pub const SETTABLE_REPORTED: [&str; 8] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "default_transaction_read_only",
    "search_path",
];

/// One statement that resets `resets` and applies `settings` (none if both are empty).
/// Each value comes with the encoding it is in (see [`ClientSettings::as_given`]); the
/// statement is ASCII, so that it reads the same whatever encoding the backend is in when
/// it arrives (the previous client's, perhaps). The resets go first: the previous
/// client's role, reset, is not the one a setting the client applies is checked against.
/// `DateStyle` is reset before it is applied: PostgreSQL merges a value that names only
/// the style or only the order (`ISO`, as pgjdbc sends it) with the session's, which
/// would be the previous client's; at a login it is merged with the server's default.
pub fn apply_statement<'a>(
    settings: impl Iterator<Item = (&'a str, &'a str, &'a str)>,
    resets: impl Iterator<Item = &'a str>,
) -> Option<String> {
    let mut merged = Vec::new();
    let calls: Vec<String> = settings
        .map(|(name, value, encoding)| {
            if name.eq_ignore_ascii_case("DateStyle") {
                merged.push(name);
            }
            format!(
                "pg_catalog.set_config({}, {}, false)",
                escape_literal(name),
                value_sql(value, encoding)
            )
        })
        .collect();
    let mut sql = String::new();
    for name in resets.chain(merged) {
        sql.push_str("RESET ");
        sql.push_str(&escape_identifier(name));
        sql.push_str("; ");
    }
    if calls.is_empty() {
        sql.truncate(sql.len().saturating_sub(2));
    } else {
        sql.push_str("SELECT ");
        sql.push_str(&calls.join(", "));
    }
    (!sql.is_empty()).then_some(sql)
}

/// Settings of the transaction under way only (`SET transaction_read_only = on` is `SET
/// TRANSACTION READ ONLY`): each transaction starts from the `default_transaction_…`
/// ones, so there is nothing of the session to follow, and a value applied to a backend
/// fails (`transaction_isolation` once a query has run) or, on PostgreSQL 16 and later,
/// cannot be reset. Never tracked: not from the startup packet, a statement or a read-back.
pub fn transaction_only(name: &str) -> bool {
    [
        "transaction_isolation",
        "transaction_read_only",
        "transaction_deferrable",
    ]
    .iter()
    .any(|n| n.eq_ignore_ascii_case(name))
}

/// Startup settings a reset never gives back with the others: the session's authorization
/// and the role (see [`restore_role_statement`]).
const NOT_RESTORED: [&str; 2] = ["role", "session_authorization"];

/// One statement that gives back `startup` values (`name`, `value`, in `encoding`: the
/// server's, see [`ClientSettings::as_given`]; those of the settings a reset touched) that
/// the backend holds no session value for now: after a `RESET`, `RESET ALL`, `DISCARD
/// ALL` or `SET … TO DEFAULT`, PostgreSQL returns to the value given at startup, but a
/// backend pgshield applied it to (as a session setting) returns to its own default. A session value (set after the reset,
/// or the reset rolled back) is left as it is; so is a custom setting (`myapp.tenant`,
/// which `pg_settings` does not show) with a value. It runs outside any transaction; it
/// touches only what the session may change now (`user` settings; `superuser` ones as
/// a superuser), so that one it may not does not fail the rest. `None`: nothing to give
/// back.
pub fn restore_statement<'a>(
    startup: impl Iterator<Item = (&'a str, &'a str)>,
    encoding: &str,
) -> Option<String> {
    let rows: Vec<String> = startup
        .filter(|(name, _)| {
            !NOT_RESTORED.iter().any(|n| n.eq_ignore_ascii_case(name)) && !transaction_only(name)
        })
        .map(|(name, value)| {
            format!(
                "({}, {})",
                escape_literal(&name.to_ascii_lowercase()),
                value_sql(value, encoding)
            )
        })
        .collect();
    if rows.is_empty() {
        return None;
    }
    Some(format!(
        "SELECT pg_catalog.set_config(v.name, v.value, false) \
         FROM (VALUES {}) AS v(name, value) \
         LEFT JOIN pg_catalog.pg_settings s ON pg_catalog.lower(s.name) = v.name \
         WHERE CASE WHEN s.name IS NULL THEN COALESCE(pg_catalog.current_setting(v.name, true), '') = '' \
         ELSE s.source <> 'session' AND (s.context = 'user' OR (s.context = 'superuser' \
         AND pg_catalog.current_setting('is_superuser') = 'on')) END",
        rows.join(", ")
    ))
}

/// The statement that gives back the role a client started as (`role`, in `encoding`),
/// once a statement of its alone reset it (DISCARD ALL, RESET ROLE, SET ROLE DEFAULT, SET
/// SESSION AUTHORIZATION DEFAULT) outside a transaction: the backend then runs as none,
/// as pgshield applied the role as a session setting. Apart from the other settings, so
/// that a role that can no longer be set fails alone (and the client with it: it is not
/// to run as the login's role).
pub fn restore_role_statement(role: &str, encoding: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config('role', {}, false) \
         WHERE pg_catalog.current_setting('role') = 'none'",
        value_sql(role, encoding)
    )
}

/// Splits an `options` string as PostgreSQL does (whitespace separates, backslash escapes)
/// and reads `-c name=value`, `-cname=value` and `--name=value` switches.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let words = split_words(options);
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words.next().ok_or("-c needs name=value")?
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_owned()
        } else {
            return Err(format!("\"{word}\" is not supported"));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("\"{assignment}\" lacks a value (use name=value)"))?;
        if name.is_empty() {
            return Err(format!("\"{assignment}\" has no name"));
        }
        // PostgreSQL accepts dashes for underscores in long option names.
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(out)
}

fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_restore_gives_back_startup_values_but_not_who_the_session_is() {
        let mut s = ClientSettings::default();
        s.set("TimeZone", "Asia/Tokyo");
        s.set("role", "reader");
        s.set("search_path", "caf\u{e9}");
        s.record("TimeZone", "UTC");
        assert_eq!(s.get("TimeZone"), Some("UTC"));
        let sql = restore_statement(s.startup(), "LATIN1").expect("some");
        assert!(sql.contains("('timezone', 'Asia/Tokyo')"), "{sql}");
        assert!(!sql.contains("reader"), "{sql}");
        assert!(sql.is_ascii(), "{sql}");
        assert!(sql.contains("'LATIN1'"), "{sql}");
        assert!(sql.contains("s.source <> 'session'"), "{sql}");
        let role_only = [
            ("role", "reader"),
            ("Session_Authorization", "x"),
            ("transaction_isolation", "serializable"),
        ];
        assert_eq!(restore_statement(role_only.into_iter(), "UTF8"), None);
    }

    #[test]
    fn settings_keep_order_overwrite_by_name_and_allow_empty_values() {
        let mut s = ClientSettings::default();
        s.set("a", "1");
        s.set("b", "");
        s.set("C", "3");
        s.set("A", "4");
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            [("b", ""), ("C", "3"), ("A", "4")]
        );
        assert_eq!(
            (s.get("a"), s.get("B"), s.get("c")),
            (Some("4"), Some(""), Some("3"))
        );
        s.forget("b");
        s.record("d", "x");
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            [("C", "3"), ("A", "4"), ("d", "x")]
        );
        assert!(ClientSettings::default().iter().next().is_none());
    }

    #[test]
    fn a_reset_setting_returns_to_what_the_client_gave_at_connection_start() {
        let params = [
            ("user", "u"),
            ("search_path", "app"),
            ("options", "-c statement_timeout=5s"),
        ];
        let mut s = ClientSettings::from_startup(&startup(&params)).unwrap();
        assert!(s.startup.is_none(), "nothing kept twice until a change");
        s.record("search_path", "other");
        s.record("work_mem", "64MB");
        assert_eq!(s.get("search_path"), Some("other"));
        assert_eq!(s.reset("search_path").as_deref(), Some("app"));
        assert_eq!(s.reset("work_mem"), None);
        assert_eq!(s.reset("statement_timeout").as_deref(), Some("5s"));
        assert!(s.as_given("search_path", "app") && !s.as_given("search_path", "other"));
        assert_eq!(
            (s.get("search_path"), s.get("work_mem")),
            (Some("app"), None)
        );
        // A value recorded again as it is changes nothing.
        let mut unchanged = ClientSettings::from_startup(&startup(&params)).unwrap();
        unchanged.record("search_path", "app");
        assert!(unchanged.startup.is_none());
    }

    use super::*;

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            minor_version: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// A startup packet of hundreds of short settings is refused: each costs a look
    /// among those before it, and no driver sends more than a handful.
    #[test]
    fn too_many_startup_settings_are_refused() {
        let names: Vec<String> = (0..=MAX_STARTUP_SETTINGS)
            .map(|i| format!("x.s{i}"))
            .collect();
        let params: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
        let err = ClientSettings::from_startup(&startup(&params)).expect_err("too many");
        assert_eq!(err.code, sqlstate::PROTOCOL_VIOLATION);
        assert!(ClientSettings::from_startup(&startup(&params[1..])).is_ok());
    }

    #[test]
    fn options_are_split_like_postgres() {
        assert_eq!(
            parse_options(
                r"-c statement_timeout=5s --search-path=a,b -cwork_mem=64MB -c x=with\ space"
            )
            .unwrap(),
            vec![
                ("statement_timeout".into(), "5s".into()),
                ("search_path".into(), "a,b".into()),
                ("work_mem".into(), "64MB".into()),
                ("x".into(), "with space".into()),
            ]
        );
        assert!(parse_options("-B 100").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c novalue").is_err());
        assert_eq!(parse_options("   ").unwrap(), vec![]);
    }

    #[test]
    fn settings_come_from_options_and_startup_with_startup_parameters_winning() {
        let s = ClientSettings::from_startup(&startup(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "app"),
            ("search_path", "x"),
            ("options", "-c search_path=y"),
            ("_pq_.something", "1"),
            ("replication", "false"),
        ]))
        .unwrap();
        // As PostgreSQL: `options` first, then the other parameters over them.
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![("application_name", "app"), ("search_path", "x")]
        );
    }

    #[test]
    fn replication_connections_are_refused() {
        let err =
            ClientSettings::from_startup(&startup(&[("user", "u"), ("replication", "database")]))
                .unwrap_err();
        assert_eq!(err.code, sqlstate::FEATURE_NOT_SUPPORTED);
    }

    #[test]
    fn apply_statement_quotes_names_and_values() {
        let sql = apply_statement(
            [
                ("application_name", "it's", "UTF8"),
                ("search_path", "a,b", "UTF8"),
                ("search_path", "sché", "LATIN1"),
            ]
            .into_iter(),
            std::iter::empty(),
        )
        .unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config('application_name', 'it''s', false), \
             pg_catalog.set_config('search_path', 'a,b', false), \
             pg_catalog.set_config('search_path', \
             pg_catalog.convert_from(pg_catalog.decode('736368c3a9', 'hex'), 'LATIN1'), false)"
        );
        assert_eq!(
            apply_statement(std::iter::empty(), std::iter::empty()),
            None
        );
        assert_eq!(
            apply_statement(std::iter::empty(), ["work_mem", "my.\"odd"].into_iter()).unwrap(),
            "RESET \"work_mem\"; RESET \"my.\"\"odd\""
        );
        // Resets first; DateStyle reset before it is applied.
        assert_eq!(
            apply_statement(
                [("DateStyle", "ISO", "UTF8")].into_iter(),
                ["role"].into_iter()
            )
            .unwrap(),
            "RESET \"role\"; RESET \"DateStyle\"; \
             SELECT pg_catalog.set_config('DateStyle', 'ISO', false)"
        );
    }

    #[test]
    fn a_setting_is_found_by_its_name_in_any_case() {
        use super::find;
        assert_eq!(find("", "a"), None);
        let kept = "application_name\0psql\0Search_Path\0\"$user\", é\0empty\0\0";
        assert_eq!(find(kept, "application_name"), Some("psql"));
        assert_eq!(find(kept, "search_path"), Some("\"$user\", é"));
        assert_eq!(find(kept, "EMPTY"), Some(""));
        assert_eq!(find(kept, "psql"), None, "a value is no name");
        assert_eq!(find(kept, "search"), None);
        let mut s = super::ClientSettings::default();
        s.set("TimeZone", "UTC");
        s.set("timezone", "Asia/Tokyo");
        assert_eq!(s.get("TIMEZONE"), Some("Asia/Tokyo"));
    }
}
