//! `pgshield bench`: load that shows what a pooler saves, against any target and, in the
//! same run, a comparison target (typically the same database directly).
//!
//! Three scenarios, each a tokio-postgres workload:
//! - **lambda-burst**: N invocations, C at a time, each a fresh connection → one short
//!   query → close (a serverless cold start). Connect, query and end-to-end latency,
//!   throughput, errors by SQLSTATE (`53300` when a server runs out of connections).
//! - **steady**: C persistent clients run a query for a duration over the simple,
//!   extended (unnamed statement) or prepared protocol, or a mix.
//! - **idle-swarm**: N idle connections held open; the proxy's resident memory per client
//!   (from /proc of its PID).
//!
//! `embedded.rs` starts a throwaway PostgreSQL and a pgshield in front of it, so that a
//! newcomer sees the difference with no setup; `plot.rs` draws the result as SVG. The
//! library runs it; `main.rs` parses the command line and `benches/` reuses it.

pub mod embedded;
pub mod plot;
pub mod stats;
pub mod tls;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_postgres::{Client, NoTls};

pub use stats::{Errors, IdleMemory, Latency, Samples};

/// What is run against each target.
#[derive(Debug, Clone)]
pub enum Scenario {
    LambdaBurst {
        invocations: usize,
        concurrency: usize,
        query: String,
    },
    Steady {
        clients: usize,
        duration: Duration,
        protocol: Protocol,
        query: String,
    },
    IdleSwarm {
        clients: usize,
        /// How long the clients stay connected once all are open.
        hold: Duration,
    },
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::LambdaBurst { .. } => "lambda-burst",
            Scenario::Steady { .. } => "steady",
            Scenario::IdleSwarm { .. } => "idle-swarm",
        }
    }

    /// Its settings in a few words, for the report's heading.
    pub fn describe(&self) -> String {
        match self {
            Scenario::LambdaBurst {
                invocations,
                concurrency,
                query,
            } => format!(
                "{invocations} invocations, {concurrency} at a time; each connects, runs `{query}`, disconnects"
            ),
            Scenario::Steady {
                clients,
                duration,
                protocol,
                query,
            } => format!(
                "{clients} clients for {}, `{query}` over the {} protocol",
                humantime::format_duration(*duration),
                protocol.name()
            ),
            Scenario::IdleSwarm { clients, hold } => format!(
                "{clients} idle connections held for {}",
                humantime::format_duration(*hold)
            ),
        }
    }
}

/// How `steady` clients send their query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Query messages.
    Simple,
    /// Parse/Bind/Execute of an unnamed statement, one round trip.
    Extended,
    /// A statement prepared once per client, then Bind/Execute.
    Prepared,
    /// The three in turn.
    Mix,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::Extended => "extended",
            Protocol::Prepared => "prepared",
            Protocol::Mix => "mixed",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Protocol, String> {
        match s {
            "simple" => Ok(Protocol::Simple),
            "extended" => Ok(Protocol::Extended),
            "prepared" => Ok(Protocol::Prepared),
            "mix" | "mixed" => Ok(Protocol::Mix),
            other => Err(format!(
                "unknown protocol `{other}`: simple, extended, prepared or mix"
            )),
        }
    }
}

/// One place to send load to.
#[derive(Clone)]
pub struct Target {
    /// What the report calls it ("pgshield", "direct", …).
    pub label: String,
    pub config: tokio_postgres::Config,
    /// The process whose memory idle-swarm measures (a proxy), if known.
    pub pid: Option<u32>,
}

impl Target {
    /// `host:port/dbname` (no password), for the report.
    pub fn address(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{host}:{port}/{}",
            self.config.get_dbname().unwrap_or_default()
        )
    }
}

/// How to run: TLS, and whether to draw progress.
#[derive(Clone, Default)]
pub struct Options {
    /// Connect with TLS (certificates not checked).
    pub tls: Option<tls::RequireTls>,
    pub progress: bool,
    /// A superuser connection to the server behind every target (`--embedded`): before
    /// each run, [`settle`] waits for the backends an earlier run left (a pooler's idle
    /// ones) to close, so that every run has the server's `max_connections` to itself.
    pub settle: Option<tokio_postgres::Config>,
    /// How long a connect or a query may go unanswered before it counts as an error
    /// (None: [`NO_ANSWER`]).
    pub no_answer: Option<Duration>,
}

impl Options {
    fn no_answer(&self) -> Duration {
        self.no_answer.unwrap_or(NO_ANSWER)
    }
}

/// What one scenario did against one target.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub label: String,
    pub address: String,
    pub scenario: &'static str,
    /// Invocations (lambda-burst), queries (steady) or connections (idle-swarm) that
    /// succeeded.
    pub completed: u64,
    pub failed: u64,
    pub errors: Errors,
    pub elapsed_s: f64,
    /// `completed` per second of `elapsed_s`.
    pub throughput_per_s: f64,
    pub connect: Option<Latency>,
    pub query: Option<Latency>,
    /// Connect + query (lambda-burst; the close that follows is not waited for).
    pub end_to_end: Option<Latency>,
    pub idle: Option<IdleMemory>,
}

/// The runs of one scenario, target then comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub settings: String,
    pub runs: Vec<Run>,
}

/// Runs `scenario` against each target in turn.
pub async fn run(scenario: &Scenario, targets: &[Target], options: &Options) -> Report {
    let mut runs = Vec::new();
    for target in targets {
        if let Some(admin) = &options.settle {
            settle(admin).await;
        }
        runs.push(run_one(scenario, target, options).await);
    }
    Report {
        scenario: scenario.name(),
        settings: scenario.describe(),
        runs,
    }
}

/// How long [`settle`] waits at most.
const SETTLE_WITHIN: Duration = Duration::from_secs(15);

/// Waits (up to [`SETTLE_WITHIN`]) until the server `admin` (a superuser) reaches has no
/// client connection but its own: a pooler's idle backends from an earlier run take
/// slots under `max_connections` that the next run (direct PostgreSQL above all) would
/// otherwise be refused (`53300`), a failure the earlier run made. (The poolers the
/// benchmarks start close idle backends after a second.)
pub async fn settle(admin: &tokio_postgres::Config) {
    let deadline = Instant::now() + SETTLE_WITHIN;
    // (Perhaps refused at first: the idle backends it waits for may hold every slot.)
    let (client, connection) = loop {
        match bounded(NO_ANSWER, "connect", admin.connect(NoTls)).await {
            Ok(connected) => break connected,
            Err(e) if Instant::now() >= deadline || e.timed_out => {
                eprintln!(
                    "pgshield bench: cannot see the server's other connections ({}); running anyway",
                    e.text
                );
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let connection = tokio::spawn(connection);
    let others = "SELECT count(*) FROM pg_catalog.pg_stat_activity \
                  WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()";
    loop {
        let left = match bounded(NO_ANSWER, "query", client.query_one(others, &[])).await {
            Ok(row) => row.get::<_, i64>(0),
            Err(_) => break,
        };
        if left == 0 {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "pgshield bench: {left} other connections to the server still open after {} s; running anyway",
                SETTLE_WITHIN.as_secs()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    // (Its Terminate sent and its backend gone before the run, unless the server stopped
    // answering.)
    let abort = connection.abort_handle();
    if tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// Runs `scenario` against one target.
pub async fn run_one(scenario: &Scenario, target: &Target, options: &Options) -> Run {
    match scenario {
        Scenario::LambdaBurst {
            invocations,
            concurrency,
            query,
        } => lambda_burst(target, options, *invocations, *concurrency, query).await,
        Scenario::Steady {
            clients,
            duration,
            protocol,
            query,
        } => steady(target, options, *clients, *duration, *protocol, query).await,
        Scenario::IdleSwarm { clients, hold } => idle_swarm(target, options, *clients, *hold).await,
    }
}

/// How long a connect (through its login) or a query may take, by default, before it
/// counts as an error (`--timeout`): a target that takes connections and never answers
/// (a load balancer whose far side is gone) would otherwise hold the run for good.
/// (tokio-postgres's `connect_timeout` bounds the TCP connect only.)
const NO_ANSWER: Duration = Duration::from_secs(30);

/// A connect or query that failed, as the error table shows it.
struct Failed {
    text: String,
    /// No answer within the time allowed: the connection is of no further use.
    timed_out: bool,
}

/// `work` (a connect or a query, `what`) within `limit`.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Failed> {
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Failed {
            text: stats::describe(&e),
            timed_out: false,
        }),
        Err(_) => Err(Failed {
            text: format!(
                "no answer to a {what} within {}",
                humantime::format_duration(limit)
            ),
            timed_out: true,
        }),
    }
}

/// Connects a client (its connection runs in its own task, ending when it is dropped),
/// within `--timeout`.
async fn connect(target: &Target, options: &Options) -> Result<Client, Failed> {
    bounded(
        options.no_answer(),
        "connect",
        connect_unbounded(target, options),
    )
    .await
}

async fn connect_unbounded(
    target: &Target,
    options: &Options,
) -> Result<Client, tokio_postgres::Error> {
    match &options.tls {
        None => {
            let (client, connection) = target.config.connect(NoTls).await?;
            tokio::spawn(connection);
            Ok(client)
        }
        Some(tls) => {
            // TLS or nothing: a server that answers SSLRequest with N is an error, not a
            // plaintext run reported as TLS.
            let mut config = target.config.clone();
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, connection) = config.connect(tls.clone()).await?;
            tokio::spawn(connection);
            Ok(client)
        }
    }
}

fn progress(options: &Options, len: u64, label: &str, unit: &str) -> ProgressBar {
    if !options.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "{{prefix:>12}} [{{bar:40}}] {{pos}}/{{len}} {unit} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(label.to_owned());
    bar
}

/// What each worker of a scenario measured.
#[derive(Default)]
struct Tally {
    completed: u64,
    errors: Errors,
    connect: Samples,
    query: Samples,
    end_to_end: Samples,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.completed += other.completed;
        self.errors.merge(other.errors);
        self.connect.merge(other.connect);
        self.query.merge(other.query);
        self.end_to_end.merge(other.end_to_end);
    }

    fn into_run(self, target: &Target, scenario: &'static str, elapsed: Duration) -> Run {
        let elapsed_s = elapsed.as_secs_f64();
        Run {
            label: target.label.clone(),
            address: target.address(),
            scenario,
            completed: self.completed,
            failed: self.errors.total(),
            throughput_per_s: if elapsed_s > 0.0 {
                self.completed as f64 / elapsed_s
            } else {
                0.0
            },
            elapsed_s,
            errors: self.errors,
            connect: self.connect.summary(),
            query: self.query.summary(),
            end_to_end: self.end_to_end.summary(),
            idle: None,
        }
    }
}

/// Runs `workers` copies of `work` and merges what they measured.
async fn in_parallel<F, Fut>(workers: usize, work: F) -> Tally
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Tally> + Send + 'static,
{
    collect(spawn_workers(workers, work)).await
}

fn spawn_workers<F, Fut>(workers: usize, work: F) -> Vec<tokio::task::JoinHandle<Tally>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Tally> + Send + 'static,
{
    (0..workers.max(1)).map(|_| tokio::spawn(work())).collect()
}

/// Waits for every worker and merges what they measured.
async fn collect(handles: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut total = Tally::default();
    for handle in handles {
        match handle.await {
            Ok(tally) => total.merge(tally),
            Err(e) => total
                .errors
                .record_other(&format!("benchmark task failed: {e}")),
        }
    }
    total
}

async fn lambda_burst(
    target: &Target,
    options: &Options,
    invocations: usize,
    concurrency: usize,
    query: &str,
) -> Run {
    let bar = progress(options, invocations as u64, &target.label, "invocations");
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tally = in_parallel(concurrency, || {
        let (next, target, options, bar, query) = (
            Arc::clone(&next),
            target.clone(),
            options.clone(),
            bar.clone(),
            query.to_owned(),
        );
        async move {
            let mut tally = Tally::default();
            while next.fetch_add(1, Ordering::Relaxed) < invocations {
                let t0 = Instant::now();
                let outcome = match connect(&target, &options).await {
                    Ok(client) => {
                        let t1 = Instant::now();
                        tally.connect.record(t1 - t0);
                        let result =
                            bounded(options.no_answer(), "query", client.simple_query(&query))
                                .await;
                        if result.is_ok() {
                            tally.query.record(t1.elapsed());
                        }
                        // Dropping the client sends Terminate and closes the socket (in
                        // its connection task: the close is not waited for).
                        drop(client);
                        result.map(|_| ())
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(()) => {
                        tally.completed += 1;
                        tally.end_to_end.record(t0.elapsed());
                    }
                    Err(e) => tally.errors.record_other(&e.text),
                }
                bar.inc(1);
            }
            tally
        }
    })
    .await;
    bar.finish_and_clear();
    tally.into_run(target, "lambda-burst", started.elapsed())
}

async fn steady(
    target: &Target,
    options: &Options,
    clients: usize,
    duration: Duration,
    protocol: Protocol,
    query: &str,
) -> Run {
    // (Whole seconds on the bar, then what is left of `duration`.)
    let secs = duration.as_secs();
    let bar = progress(options, secs.max(1), &target.label, "s");
    // All clients connect first; the clock starts when the last is in.
    let connected = Arc::new(tokio::sync::Barrier::new(clients.max(1) + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let work = {
        let connected = Arc::clone(&connected);
        let stop = Arc::clone(&stop);
        let (target, options, query) = (target.clone(), options.clone(), query.to_owned());
        move || {
            let (connected, stop, target, options, query) = (
                Arc::clone(&connected),
                Arc::clone(&stop),
                target.clone(),
                options.clone(),
                query.clone(),
            );
            async move {
                let mut tally = Tally::default();
                let t0 = Instant::now();
                let client = connect(&target, &options).await;
                let client = match client {
                    Ok(client) => {
                        tally.connect.record(t0.elapsed());
                        Some(client)
                    }
                    Err(e) => {
                        tally.errors.record_other(&e.text);
                        None
                    }
                };
                // Every client waits here, connected or not, so the clock starts once.
                connected.wait().await;
                let Some(client) = client else {
                    return tally;
                };
                let prepared = match protocol {
                    Protocol::Prepared | Protocol::Mix => {
                        match bounded(options.no_answer(), "prepare", client.prepare(&query)).await
                        {
                            Ok(statement) => Some(statement),
                            Err(e) => {
                                tally.errors.record_other(&e.text);
                                return tally;
                            }
                        }
                    }
                    _ => None,
                };
                let mut turn = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let this = match protocol {
                        Protocol::Mix => {
                            [Protocol::Simple, Protocol::Extended, Protocol::Prepared][turn % 3]
                        }
                        other => other,
                    };
                    turn += 1;
                    let t = Instant::now();
                    let result = match (this, &prepared) {
                        (Protocol::Simple, _) => {
                            bounded(options.no_answer(), "query", client.simple_query(&query))
                                .await
                                .map(|_| ())
                        }
                        (Protocol::Prepared, Some(statement)) => {
                            bounded(options.no_answer(), "query", client.query(statement, &[]))
                                .await
                                .map(|_| ())
                        }
                        _ => bounded(
                            options.no_answer(),
                            "query",
                            client.query_typed(&query, &[]),
                        )
                        .await
                        .map(|_| ()),
                    };
                    // A query that ends after the stop is not counted: throughput is over
                    // the measured interval only.
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match result {
                        Ok(()) => {
                            tally.query.record(t.elapsed());
                            tally.completed += 1;
                        }
                        Err(e) => {
                            tally.errors.record_other(&e.text);
                            if e.timed_out || client.is_closed() {
                                return tally;
                            }
                        }
                    }
                }
                tally
            }
        }
    };
    let handles = spawn_workers(clients, work);
    connected.wait().await;
    let started = Instant::now();
    let rest = duration.saturating_sub(Duration::from_secs(secs));
    for tick in (0..secs)
        .map(|_| Duration::from_secs(1))
        .chain((!rest.is_zero()).then_some(rest))
    {
        tokio::time::sleep(tick).await;
        bar.inc(1);
        // (Every client gone: none connected, or each connection failed.)
        if handles.iter().all(tokio::task::JoinHandle::is_finished) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let tally = collect(handles).await;
    bar.finish_and_clear();
    tally.into_run(target, "steady", elapsed)
}

/// How many idle connections are opened at once.
const SWARM_CONNECTS_AT_ONCE: usize = 64;

async fn idle_swarm(target: &Target, options: &Options, clients: usize, hold: Duration) -> Run {
    crate::net::raise_fd_limit();
    let bar = progress(options, clients as u64, &target.label, "connections");
    let before = target.pid.and_then(stats::rss_kib);
    let next = Arc::new(AtomicUsize::new(0));
    let held = Arc::new(std::sync::Mutex::new(Vec::with_capacity(clients)));
    let started = Instant::now();
    let tally = in_parallel(SWARM_CONNECTS_AT_ONCE.min(clients.max(1)), || {
        let (next, held, target, options, bar) = (
            Arc::clone(&next),
            Arc::clone(&held),
            target.clone(),
            options.clone(),
            bar.clone(),
        );
        async move {
            let mut tally = Tally::default();
            while next.fetch_add(1, Ordering::Relaxed) < clients {
                let t0 = Instant::now();
                match connect(&target, &options).await {
                    Ok(client) => {
                        tally.connect.record(t0.elapsed());
                        tally.completed += 1;
                        held.lock().unwrap_or_else(|p| p.into_inner()).push(client);
                    }
                    Err(e) => tally.errors.record_other(&e.text),
                }
                bar.inc(1);
            }
            tally
        }
    })
    .await;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    // Let the proxy settle (sessions finish their logins) before looking at its memory.
    tokio::time::sleep(Duration::from_secs(1).max(hold)).await;
    let after = target.pid.and_then(stats::rss_kib);
    let mut run = tally.into_run(target, "idle-swarm", elapsed);
    if let (Some(pid), Some(before), Some(after)) = (target.pid, before, after) {
        let n = run.completed.max(1);
        run.idle = Some(IdleMemory {
            pid,
            clients_held: run.completed as usize,
            rss_before_kib: before,
            rss_after_kib: after,
            bytes_per_client: after.saturating_sub(before) * 1024 / n,
        });
    }
    drop(held);
    run
}

/// The report as a table, for people.
pub fn table(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}: {}", report.scenario, report.settings);
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    let latency = |l: &Option<Latency>| match l {
        Some(l) => format!(
            "{} / {} / {} / {}",
            ms(l.p50_us),
            ms(l.p95_us),
            ms(l.p99_us),
            ms(l.max_us)
        ),
        None => "–".into(),
    };
    let _ = writeln!(
        out,
        "{:<12} {:>9} {:>7} {:>10}  {:<28} {:<28} {:<28}",
        "target",
        "ok",
        "failed",
        "per s",
        "connect ms p50/95/99/max",
        "query ms p50/95/99/max",
        "end-to-end ms p50/95/99/max"
    );
    for run in &report.runs {
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>7} {:>10.1}  {:<28} {:<28} {:<28}",
            run.label,
            run.completed,
            run.failed,
            run.throughput_per_s,
            latency(&run.connect),
            latency(&run.query),
            latency(&run.end_to_end)
        );
    }
    for run in &report.runs {
        if let Some(idle) = &run.idle {
            let _ = writeln!(
                out,
                "{}: {} idle clients held; RSS of pid {} {} → {} KiB: {} bytes per client",
                run.label,
                idle.clients_held,
                idle.pid,
                idle.rss_before_kib,
                idle.rss_after_kib,
                idle.bytes_per_client
            );
        }
        for (error, n) in &run.errors.0 {
            let _ = writeln!(out, "{}: {n} × {error}", run.label);
        }
    }
    // (Of idle connections held, throughput means nothing: memory per client compares.)
    let compared = (report.scenario != "idle-swarm").then_some(report.runs.as_slice());
    if let Some([first, second]) = compared {
        if second.throughput_per_s > 0.0 && first.throughput_per_s > 0.0 {
            let _ = writeln!(
                out,
                "{} / {}: {:.2}× the throughput",
                first.label,
                second.label,
                first.throughput_per_s / second.throughput_per_s
            );
        }
    }
    out
}
