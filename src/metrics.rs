//! Every number pgshield publishes, in one place: names (all `pgshield_…`), labels, and
//! the handles the hot path increments (an atomic add each; no registry lookup per event).
//!
//! Each proxy has its own Prometheus recorder (not the process-global one), so several
//! proxies in one process (tests) keep their numbers apart. Gauges that describe state
//! (clients open, backends idle or lent, clients waiting) are read from the source of
//! truth when `/metrics` is scraped rather than kept up to date on every event; a gauge
//! no scrape has set for [`GAUGE_IDLE`] (a host or pool a reload removed) is dropped from
//! the output rather than shown at its last value for good.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::client::sql::PinReason;

/// Histogram buckets for durations, in seconds: 50 µs to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

static METADATA: Metadata<'static> = Metadata::new("pgshield", metrics::Level::INFO, None);

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// The per-pool histograms, by (name, pool): rendered here, not by the exporter.
    histograms: Mutex<BTreeMap<(&'static str, String), Arc<Histogram>>>,
    pub clients: ClientMetrics,
    /// Cancel requests received, forwarded or not.
    pub cancel_requests: Counter,
    pins: Vec<(PinReason, Counter)>,
}

/// Client connections, as RDS Proxy's ClientConnections* metrics.
pub struct ClientMetrics {
    pub received: Counter,
    pub received_tls: Counter,
    pub closed: Counter,
    pub setup_succeeded: Counter,
    pub setup_failed_auth: Counter,
    /// Refused for any other reason (limits, access rules, unknown database, bad input).
    pub setup_refused: Counter,
    pub open: Gauge,
}

/// One pool's numbers, labelled `pool="database/user"`.
pub struct PoolMetrics {
    /// Time a client waited for a backend (0 when one was idle).
    pub borrow_wait: Arc<Histogram>,
    pub borrow_timeouts: Counter,
    /// Time from a client's request reaching the backend to its ReadyForQuery.
    pub query_duration: Arc<Histogram>,
    /// Time from a client's request reaching pgshield to its ReadyForQuery (borrow wait
    /// and settings included): what the client sees.
    pub client_query_duration: Arc<Histogram>,
    /// Set at scrape time from the pool's own totals (`PoolStats`), which the sessions
    /// keep: one count per event, not two.
    pub queries: Counter,
    pub transactions: Counter,
    pub bytes_from_clients: Counter,
    pub bytes_to_clients: Counter,
    pub backends_opened: Counter,
    pub backend_open_failures: Counter,
    pub prepared_hits: Counter,
    pub prepared_misses: Counter,
    pub prepared_evictions: Counter,
    pub prepared_refused: Counter,
    pub backends_open: Gauge,
    pub backends_idle: Gauge,
    pub backends_lent: Gauge,
    pub clients_waiting: Gauge,
    pub max_backends: Gauge,
    /// What `publish` added to `transactions`, `queries` and the byte counters so far.
    published: [AtomicU64; 4],
}

impl PoolMetrics {
    /// Brings `transactions`, `queries`, `bytes_from_clients` and `bytes_to_clients` to
    /// the pool's own totals, by what they grew since the last call. (Not set to the
    /// totals: another pool of the same name before this one, a user a reload removed and
    /// put back, left the counter higher, and it would stand still until passed.)
    pub fn publish(&self, totals: [u64; 4]) {
        let counters = [
            &self.transactions,
            &self.queries,
            &self.bytes_from_clients,
            &self.bytes_to_clients,
        ];
        for ((counter, published), total) in counters.into_iter().zip(&self.published).zip(totals) {
            let before = published.fetch_max(total, Ordering::Relaxed);
            if total > before {
                counter.increment(total - before);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How long a gauge no scrape has set stays in the output.
#[cfg(not(test))]
const GAUGE_IDLE: std::time::Duration = std::time::Duration::from_secs(120);
#[cfg(test)]
const GAUGE_IDLE: std::time::Duration = std::time::Duration::from_millis(300);

impl Metrics {
    pub fn new() -> Metrics {
        // (No histograms of its own: see `Histogram`. Counters are never dropped: one
        // that went away and came back would read as a reset.)
        let recorder = PrometheusBuilder::new()
            .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GAUGE_IDLE))
            .build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(KeyName::from_const_str(name), unit, help.into());
        };
        for (name, help) in DESCRIPTIONS {
            describe(name, None, help);
        }
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let clients = ClientMetrics {
            received: counter("pgshield_client_connections_received_total"),
            received_tls: counter("pgshield_client_connections_tls_total"),
            closed: counter("pgshield_client_connections_closed_total"),
            setup_succeeded: counter("pgshield_client_connections_setup_succeeded_total"),
            setup_failed_auth: counter("pgshield_client_connections_setup_failed_auth_total"),
            setup_refused: counter("pgshield_client_connections_setup_refused_total"),
            open: recorder.register_gauge(
                &Key::from_static_name("pgshield_client_connections"),
                &METADATA,
            ),
        };
        let pins = PinReason::ALL
            .iter()
            .map(|reason| {
                let key = Key::from_parts(
                    "pgshield_pins_total",
                    vec![Label::new("reason", reason.name())],
                );
                (*reason, recorder.register_counter(&key, &METADATA))
            })
            .collect();
        Metrics {
            cancel_requests: counter("pgshield_cancel_requests_total"),
            clients,
            pins,
            recorder,
            handle,
            histograms: Mutex::default(),
        }
    }

    /// The handles of one pool's numbers.
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        let labels = || vec![Label::new("pool", pool.to_owned())];
        let key = |name: &'static str| Key::from_parts(name, labels());
        let counter = |name: &'static str| self.recorder.register_counter(&key(name), &METADATA);
        let gauge = |name: &'static str| self.recorder.register_gauge(&key(name), &METADATA);
        let histogram = |name: &'static str| {
            let mut all = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(all.entry((name, pool.to_owned())).or_default())
        };
        PoolMetrics {
            borrow_wait: histogram("pgshield_borrow_wait_seconds"),
            borrow_timeouts: counter("pgshield_borrow_timeouts_total"),
            query_duration: histogram("pgshield_query_duration_seconds"),
            client_query_duration: histogram("pgshield_client_query_duration_seconds"),
            queries: counter("pgshield_queries_total"),
            transactions: counter("pgshield_transactions_total"),
            bytes_from_clients: counter("pgshield_client_bytes_received_total"),
            bytes_to_clients: counter("pgshield_client_bytes_sent_total"),
            backends_opened: counter("pgshield_database_connections_setup_succeeded_total"),
            backend_open_failures: counter("pgshield_database_connections_setup_failed_total"),
            prepared_hits: counter("pgshield_prepared_statement_cache_hits_total"),
            prepared_misses: counter("pgshield_prepared_statement_cache_misses_total"),
            prepared_evictions: counter("pgshield_prepared_statement_cache_evictions_total"),
            prepared_refused: counter("pgshield_prepared_statements_refused_total"),
            backends_open: gauge("pgshield_database_connections"),
            backends_idle: gauge("pgshield_database_connections_idle"),
            backends_lent: gauge("pgshield_database_connections_borrowed"),
            clients_waiting: gauge("pgshield_clients_waiting"),
            max_backends: gauge("pgshield_database_connections_max"),
            published: Default::default(),
        }
    }

    /// Drops the histograms no pool holds any more (its pool closed and gone): they
    /// would be rendered at every scrape for good. A pool of the same name made later
    /// starts them afresh (a reset, to Prometheus).
    pub fn forget_unused_histograms(&self) {
        let mut all = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|_, histogram| Arc::strong_count(histogram) > 1);
    }

    /// A client was pinned to its backend.
    pub fn pinned(&self, reason: PinReason) {
        if let Some((_, counter)) = self.pins.iter().find(|(r, _)| *r == reason) {
            counter.increment(1);
        }
    }

    /// Publishes what is known of one host of a database (at each scrape).
    pub fn set_host(&self, database: &str, host: &crate::pool::cluster::HostStatus) {
        let gauge = |name: &'static str, value: f64| {
            let key = Key::from_parts(
                name,
                vec![
                    Label::new("database", database.to_owned()),
                    Label::new("host", host.addr.clone()),
                ],
            );
            self.recorder.register_gauge(&key, &METADATA).set(value);
        };
        use crate::pool::cluster::Role;
        gauge("pgshield_host_up", f64::from(u8::from(host.up)));
        gauge(
            "pgshield_host_primary",
            f64::from(u8::from(host.role == Role::Primary)),
        );
        gauge(
            "pgshield_host_replica",
            f64::from(u8::from(host.role == Role::Replica)),
        );
        gauge("pgshield_host_backends", host.open as f64);
        // Always set, so that it never stands at an old value: a primary (a replica
        // promoted, say) lags by nothing; a replica whose lag is not known, or a host whose
        // role is not, by NaN (an alert on `> x` is then neither true nor stuck false).
        let known = host.lag.filter(|l| *l != crate::pool::cluster::UNKNOWN_LAG);
        let lag = match (host.role, known) {
            (Role::Primary, _) => 0.0,
            (Role::Replica, Some(lag)) => lag.as_secs_f64(),
            _ => f64::NAN,
        };
        gauge("pgshield_replica_lag_seconds", lag);
    }

    /// The exposition text for `/metrics`.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        let all = self.histograms.lock().unwrap_or_else(|p| p.into_inner());
        let mut named = None;
        for ((name, pool), histogram) in all.iter() {
            if named != Some(*name) {
                named = Some(*name);
                if let Some((_, help)) = DESCRIPTIONS.iter().find(|(n, _)| n == name) {
                    let _ = writeln!(text, "# HELP {name} {help}");
                }
                let _ = writeln!(text, "# TYPE {name} histogram");
            }
            histogram.render(name, pool, &mut text);
        }
        text
    }
}

/// How many ways [`Sharded`] values are split.
const SHARDS: usize = 8;

/// A value kept once per thread that writes it (threads beyond [`SHARDS`] share), each
/// copy in cache lines of its own; readers add the copies up. For the counters every
/// transaction adds to: kept once, their lines moved between the cores of two workers at
/// each transaction, a cache miss each time. (128-byte aligned: a core may fetch lines in
/// pairs.)
#[derive(Debug)]
pub struct Sharded<T> {
    shards: [Padded<T>; SHARDS],
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded {
            shards: std::array::from_fn(|_| Padded::default()),
        }
    }
}

impl<T> Sharded<T> {
    /// This thread's copy, to add to.
    pub fn local(&self) -> &T {
        thread_local! {
            static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let index = INDEX.with(|index| {
            if index.get() >= SHARDS {
                index.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            index.get()
        });
        &self.shards[index % SHARDS].0
    }

    /// Every copy.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.shards.iter().map(|padded| &padded.0)
    }

    /// One counter's copies added up (wrapping, as the atomics do: a sum must not panic
    /// where they wrapped).
    pub fn sum(&self, counter: impl Fn(&T) -> &AtomicU64) -> u64 {
        self.all()
            .fold(0, |n, t| n.wrapping_add(counter(t).load(Ordering::Relaxed)))
    }
}

/// A histogram of durations on `SECONDS_BUCKETS`, recorded on the hot path with two
/// atomic adds to the recording thread's own copy (the exporter's own kept every sample
/// until an upkeep, at some 300 instructions each: three per transaction were 6 % of
/// pgshield's own work).
#[derive(Debug, Default)]
pub struct Histogram {
    shards: Sharded<HistogramShard>,
}

#[derive(Debug, Default)]
struct HistogramShard {
    /// Samples per bucket (not cumulative): `le` the bound of the same index; the last
    /// counts those above every bound.
    buckets: [AtomicU64; SECONDS_BUCKETS.len() + 1],
    /// In nanoseconds.
    sum: AtomicU64,
}

impl Histogram {
    /// Records a duration in seconds. (Not inlined: one copy of it serves every caller on
    /// the hot path, which is fewer code lines a transaction runs through.)
    #[inline(never)]
    pub fn record(&self, seconds: f64) {
        let index = SECONDS_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(SECONDS_BUCKETS.len());
        let shard = self.shards.local();
        shard.buckets[index].fetch_add(1, Ordering::Relaxed);
        // (Saturating, and 0 for NaN or a negative: `as` casts do both.)
        shard
            .sum
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, pool: &str, out: &mut String) {
        let pool = pool
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        let mut count = 0u64;
        for i in 0..=SECONDS_BUCKETS.len() {
            count = count.wrapping_add(self.shards.sum(|s| &s.buckets[i]));
            let le = SECONDS_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), f64::to_string);
            let _ = writeln!(out, "{name}_bucket{{pool=\"{pool}\",le=\"{le}\"}} {count}");
        }
        let sum = self.shards.sum(|s| &s.sum) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{pool=\"{pool}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{pool=\"{pool}\"}} {count}");
    }
}

/// What each metric means, as `# HELP` lines.
const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "pgshield_host_up",
        "1 if the host is reachable (0: marked down)",
    ),
    (
        "pgshield_host_primary",
        "1 if the host is the primary (out of recovery)",
    ),
    (
        "pgshield_host_replica",
        "1 if the host is a replica (in recovery)",
    ),
    (
        "pgshield_host_backends",
        "Backends open to the host from pgshield's pools",
    ),
    (
        "pgshield_replica_lag_seconds",
        "Replay lag of a replica, as its health check saw it (0 for a primary, NaN when not known)",
    ),
    ("pgshield_client_connections", "Client connections open"),
    (
        "pgshield_client_connections_received_total",
        "Client connections accepted",
    ),
    (
        "pgshield_client_connections_tls_total",
        "Client connections that negotiated TLS",
    ),
    (
        "pgshield_client_connections_closed_total",
        "Client connections closed",
    ),
    (
        "pgshield_client_connections_setup_succeeded_total",
        "Client logins that succeeded",
    ),
    (
        "pgshield_client_connections_setup_failed_auth_total",
        "Client logins refused for a wrong password or unknown user",
    ),
    (
        "pgshield_client_connections_setup_refused_total",
        "Client logins refused for any other reason",
    ),
    ("pgshield_cancel_requests_total", "Cancel requests received"),
    (
        "pgshield_pins_total",
        "Clients pinned to their backend, by reason",
    ),
    (
        "pgshield_borrow_wait_seconds",
        "Time clients waited for a backend",
    ),
    (
        "pgshield_borrow_timeouts_total",
        "Clients that got 53300 after borrow_timeout",
    ),
    (
        "pgshield_query_duration_seconds",
        "Time from a request reaching the backend to its ReadyForQuery",
    ),
    (
        "pgshield_client_query_duration_seconds",
        "Time from a request reaching pgshield to its ReadyForQuery, as the client sees it",
    ),
    (
        "pgshield_queries_total",
        "Requests answered by a ReadyForQuery",
    ),
    (
        "pgshield_transactions_total",
        "Transactions ended (ReadyForQuery back to idle)",
    ),
    (
        "pgshield_client_bytes_received_total",
        "Bytes received from clients",
    ),
    ("pgshield_client_bytes_sent_total", "Bytes sent to clients"),
    (
        "pgshield_database_connections_setup_succeeded_total",
        "Backend connections opened",
    ),
    (
        "pgshield_database_connections_setup_failed_total",
        "Backend connections that failed to open",
    ),
    (
        "pgshield_prepared_statement_cache_hits_total",
        "Client statements already prepared on the backend",
    ),
    (
        "pgshield_prepared_statement_cache_misses_total",
        "Client statements prepared on a backend that lacked them",
    ),
    (
        "pgshield_prepared_statement_cache_evictions_total",
        "Statements closed on a full backend",
    ),
    (
        "pgshield_prepared_statements_refused_total",
        "Parses refused: the client held pool.max_client_prepared_statements already",
    ),
    ("pgshield_database_connections", "Backend connections open"),
    (
        "pgshield_database_connections_idle",
        "Backend connections idle in the pool",
    ),
    (
        "pgshield_database_connections_borrowed",
        "Backend connections lent to clients",
    ),
    ("pgshield_clients_waiting", "Clients queued for a backend"),
    (
        "pgshield_database_connections_max",
        "Backend connections the pool may open",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_values_are_one_copy_per_thread_and_add_up() {
        let counter: Sharded<AtomicU64> = Sharded::default();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        counter.local().fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let copies: Vec<u64> = counter.all().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(copies.iter().sum::<u64>(), 3000);
        // (Three new threads take three consecutive copies of the eight.)
        assert_eq!(
            copies.iter().filter(|&&c| c == 1000).count(),
            3,
            "{copies:?}"
        );
    }

    /// The lag gauge never stands at an old value: a replica promoted reads 0, one whose
    /// lag is no longer known NaN.
    #[test]
    fn replica_lag_follows_the_host() {
        use crate::pool::cluster::{HostStatus, Role};
        let metrics = Metrics::new();
        let host = |role, lag| HostStatus {
            addr: "10.0.0.2:5432".into(),
            host: "10.0.0.2".into(),
            port: 5432,
            configured: crate::config::HostRole::Auto,
            role,
            up: true,
            lag,
            open: 0,
            last_error: None,
        };
        let lag = |metrics: &Metrics| {
            let text = metrics.render();
            let line = text
                .lines()
                .find(|l| l.starts_with("pgshield_replica_lag_seconds{"))
                .map(str::to_owned);
            line.and_then(|l| l.rsplit(' ').next().map(str::to_owned))
        };
        metrics.set_host(
            "db",
            &host(Role::Replica, Some(std::time::Duration::from_secs(3))),
        );
        assert_eq!(lag(&metrics).as_deref(), Some("3"));
        metrics.set_host("db", &host(Role::Replica, None));
        assert_eq!(lag(&metrics).as_deref(), Some("NaN"));
        metrics.set_host("db", &host(Role::Primary, None));
        assert_eq!(lag(&metrics).as_deref(), Some("0"));
        // A host no scrape sets any more (a reload removed it) leaves the output.
        std::thread::sleep(GAUGE_IDLE * 2);
        assert_eq!(lag(&metrics), None);
        assert!(!metrics.render().contains("pgshield_host_up{"));
        // (Counters stay.)
        metrics.clients.received.increment(1);
        std::thread::sleep(GAUGE_IDLE * 2);
        assert!(metrics
            .render()
            .contains("pgshield_client_connections_received_total "));
    }

    /// A pool made again under the same name (a user a reload removed and put back, a
    /// found user's pool closed unused and made again) adds to its counters from where
    /// they were; the closed one's histograms go once no pool holds them.
    #[test]
    fn a_pool_made_again_continues_its_counters() {
        let metrics = Metrics::new();
        let value = |metrics: &Metrics| {
            let text = metrics.render();
            text.lines()
                .find_map(|l| l.strip_prefix("pgshield_transactions_total{pool=\"app/u\"} "))
                .map(str::to_owned)
        };
        let first = metrics.pool("app/u");
        first.publish([10, 0, 0, 0]);
        first.publish([12, 0, 0, 0]);
        assert_eq!(value(&metrics).as_deref(), Some("12"));
        first.borrow_wait.record(0.1);
        drop(first);
        let second = metrics.pool("app/u");
        second.publish([3, 0, 0, 0]);
        assert_eq!(value(&metrics).as_deref(), Some("15"));
        metrics.forget_unused_histograms();
        assert!(metrics
            .render()
            .contains("pgshield_borrow_wait_seconds_count{pool=\"app/u\"} 1"));
        drop(second);
        metrics.forget_unused_histograms();
        assert!(!metrics
            .render()
            .contains("pgshield_borrow_wait_seconds_count{pool=\"app/u\"}"));
    }

    #[test]
    fn histograms_render_cumulative_buckets_sum_and_count() {
        let metrics = Metrics::new();
        metrics.pool("two\nlines").borrow_wait.record(0.0);
        let pool = metrics.pool("app/\"quoted\"");
        pool.borrow_wait.record(0.0);
        // (Recorded by another thread: in another copy, added up when rendered.)
        std::thread::scope(|s| {
            s.spawn(|| pool.borrow_wait.record(0.3));
        });
        pool.borrow_wait.record(100.0);
        pool.query_duration.record(0.001);
        // The same pool's handles are the same histogram.
        metrics.pool("app/\"quoted\"").borrow_wait.record(0.00007);
        let text = metrics.render();
        let label = "pool=\"app/\\\"quoted\\\"\"";
        for line in [
            "# HELP pgshield_borrow_wait_seconds Time clients waited for a backend".to_owned(),
            "# TYPE pgshield_borrow_wait_seconds histogram".to_owned(),
            format!("pgshield_borrow_wait_seconds_bucket{{{label},le=\"0.00005\"}} 1"),
            format!("pgshield_borrow_wait_seconds_bucket{{{label},le=\"0.0001\"}} 2"),
            format!("pgshield_borrow_wait_seconds_bucket{{{label},le=\"0.25\"}} 2"),
            format!("pgshield_borrow_wait_seconds_bucket{{{label},le=\"0.5\"}} 3"),
            format!("pgshield_borrow_wait_seconds_bucket{{{label},le=\"30\"}} 3"),
            format!("pgshield_borrow_wait_seconds_bucket{{{label},le=\"+Inf\"}} 4"),
            format!("pgshield_borrow_wait_seconds_count{{{label}}} 4"),
            format!("pgshield_query_duration_seconds_bucket{{{label},le=\"0.001\"}} 1"),
            format!("pgshield_query_duration_seconds_count{{{label}}} 1"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        let sum = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("pgshield_borrow_wait_seconds_sum{{{label}}} ")))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("a sum");
        assert!((sum - 100.30007).abs() < 1e-6, "{sum}");
        assert_eq!(
            text.matches("# TYPE pgshield_borrow_wait_seconds").count(),
            1
        );
        assert!(text.contains("pgshield_borrow_wait_seconds_count{pool=\"two\\nlines\"} 1"));
    }
}
