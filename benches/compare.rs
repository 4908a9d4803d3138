//! `cargo bench`: direct PostgreSQL, pgshield and PgBouncer (when `pgbouncer` is
//! installed) side by side, on a throwaway cluster this run starts and removes.
//!
//! The scenarios are those of `../shared/bench/bench.sh` (pgbench: select1, select1-ext,
//! prepared, connect, tpcb, burst), `single` (select1 with one client: the latency a
//! pooler adds) and pgshield's own lambda burst; runs are interleaved
//! (every target once per scenario per round), and each figure is the median of the
//! rounds. The poolers' CPU time per transaction (from /proc) is printed beside tps,
//! since tps on a shared 2-core machine moves by ±30 % between runs while CPU per
//! transaction barely does. Results go to stdout as a markdown table with ratios.
//!
//! Environment: `BENCH_DURATION` (seconds per pgbench run, default 10), `BENCH_ROUNDS`
//! (3), `BENCH_SCENARIOS` (space-separated subset), `BENCH_SCALE` (pgbench -s, 10).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgshield::bench::embedded::{wait_for_port, Embedded, EmbeddedOptions, PrivateDir};
use pgshield::bench::{self, Options, Scenario, Target};
use pgshield::devdb::DevDb;

const CLIENTS: usize = 32;
const BURST_CLIENTS: usize = 500;
const POOL: usize = 20;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One place pgbench connects to.
struct Endpoint {
    label: &'static str,
    port: u16,
    /// The pooler's PID, for its CPU time.
    pid: Option<u32>,
}

/// What one pgbench (or lambda burst) run gave.
#[derive(Debug, Clone, Default)]
struct Figures {
    tps: f64,
    /// Transactions that failed and clients pgbench gave up on.
    failed: u64,
    /// The pooler's CPU time per transaction, microseconds.
    cpu_us_per_txn: Option<f64>,
    /// The run did not complete (pgbench exited with an error): its first error line.
    error: Option<String>,
}

fn main() {
    let duration: u64 = env_or("BENCH_DURATION", 10);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let scale: u32 = env_or("BENCH_SCALE", 10);
    let scenarios: Vec<String> = std::env::var("BENCH_SCENARIOS")
        .unwrap_or_else(|_| {
            "select1 single select1-ext prepared connect tpcb burst lambda-burst".into()
        })
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    // `cargo bench` passes `--bench`; a filter argument is not supported.
    let Ok(bindir) = DevDb::find_bindir() else {
        println!("skipped: no PostgreSQL server binaries (apt-get install postgresql)");
        return;
    };
    let pgbench = bindir.join("pgbench");
    if !pgbench.exists() {
        println!("skipped: no pgbench in {}", bindir.display());
        return;
    }
    pgshield::net::raise_fd_limit();
    let embedded = match Embedded::start(&EmbeddedOptions {
        pgshield: PathBuf::from(env!("CARGO_BIN_EXE_pgshield")),
        max_connections: 100,
        pool_size: POOL,
        mode: pgshield::config::PoolMode::Transaction,
        tls: false,
    }) {
        Ok(e) => e,
        Err(e) => {
            println!("skipped: cannot start the embedded setup: {e}");
            return;
        }
    };
    let db = embedded.db();
    eprintln!("pgbench -i -s {scale} …");
    let init = Command::new(&pgbench)
        .args(["-i", "-q", "-s", &scale.to_string()])
        .args(pg_args(db.port()))
        .env("PGPASSWORD", db.password())
        .output();
    match init {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("pgbench -i: {e}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let bouncer = runtime
        .block_on(stored_verifier(db))
        .and_then(|verifier| PgBouncer::start(db, &verifier));
    if let Err(why) = &bouncer {
        eprintln!("PgBouncer left out: {why}");
    }
    let mut endpoints = vec![
        Endpoint {
            label: "direct",
            port: db.port(),
            pid: None,
        },
        Endpoint {
            label: "pgshield",
            port: embedded.proxy_port(),
            pid: Some(embedded.proxy_pid()),
        },
    ];
    if let Ok(b) = &bouncer {
        endpoints.push(Endpoint {
            label: "pgbouncer",
            port: b.port,
            pid: Some(b.child.id()),
        });
    }
    let mut results: BTreeMap<(String, String), Vec<Figures>> = BTreeMap::new();
    let started = Instant::now();
    for round in 1..=rounds {
        for scenario in &scenarios {
            for endpoint in &endpoints {
                eprintln!("round {round}/{rounds}: {scenario} → {}", endpoint.label);
                // Each run has the server's max_connections to itself: the poolers' idle
                // backends from the run before (closed after a second idle) are gone.
                runtime.block_on(bench::settle(&embedded.direct().config));
                let figures = if scenario == "lambda-burst" {
                    lambda(&runtime, db, endpoint)
                } else {
                    match pgbench_args(scenario, duration) {
                        Some(args) => run_pgbench(&pgbench, db, endpoint, &args),
                        None => {
                            eprintln!("unknown scenario {scenario}");
                            continue;
                        }
                    }
                };
                results
                    .entry((scenario.clone(), endpoint.label.to_owned()))
                    .or_default()
                    .push(figures);
            }
        }
    }
    println!(
        "\n## cargo bench: {rounds} interleaved rounds of {duration} s, {} on {} cores, {}\n",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "this machine".into()),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
    );
    println!(
        "PostgreSQL {} (max_connections 100), pool {POOL} per pooler, transaction mode, \
         {CLIENTS} clients ({BURST_CLIENTS} for burst, 1 for single); medians [min–max]; took {}.\n",
        db.version(),
        humantime::format_duration(Duration::from_secs(started.elapsed().as_secs()))
    );
    print_table(&scenarios, &endpoints, &results);
    drop(bouncer);
    drop(embedded);
}

fn pg_args(port: u16) -> Vec<String> {
    [
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        "postgres",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// bench.sh's scenarios, as pgbench arguments.
fn pgbench_args(scenario: &str, duration: u64) -> Option<Vec<String>> {
    let (c, t) = (CLIENTS.to_string(), duration.to_string());
    let burst = BURST_CLIENTS.to_string();
    let args: Vec<&str> = match scenario {
        "select1" => vec!["-n", "-S", "-c", &c, "-j", "2", "-T", &t],
        // One client: its tps against direct's is the inverse of the latency pgshield adds.
        "single" => vec!["-n", "-S", "-c", "1", "-T", &t],
        "select1-ext" => vec!["-n", "-S", "-M", "extended", "-c", &c, "-j", "2", "-T", &t],
        "prepared" => vec!["-n", "-S", "-M", "prepared", "-c", &c, "-j", "2", "-T", &t],
        "connect" => vec!["-n", "-C", "-S", "-c", &c, "-j", "2", "-T", &t],
        "tpcb" => vec!["-c", &c, "-j", "2", "-T", &t],
        "burst" => vec!["-n", "-S", "-c", &burst, "-j", "2", "-T", &t],
        _ => return None,
    };
    Some(args.into_iter().map(str::to_owned).collect())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Microseconds of the pooler's CPU per transaction, from its ticks before and after.
fn cpu_per_transaction(before: Option<u64>, after: Option<u64>, transactions: f64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if transactions > 0.0 => {
            Some(a.saturating_sub(b) as f64 / ticks_per_second() * 1e6 / transactions)
        }
        _ => None,
    }
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

fn run_pgbench(pgbench: &Path, db: &DevDb, endpoint: &Endpoint, args: &[String]) -> Figures {
    let before = endpoint.pid.and_then(cpu_ticks);
    let out = Command::new(pgbench)
        .args(args)
        .args(pg_args(endpoint.port))
        .env("PGPASSWORD", db.password())
        .stdin(Stdio::null())
        .output();
    let after = endpoint.pid.and_then(cpu_ticks);
    let out = match out {
        Ok(out) => out,
        Err(e) => {
            return Figures {
                error: Some(format!("cannot run pgbench: {e}")),
                ..Figures::default()
            }
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let tps = field("tps = ").unwrap_or(0.0);
    let processed = field("number of transactions actually processed: ").unwrap_or(0.0);
    let failed = field("number of failed transactions: ").unwrap_or(0.0) as u64;
    // Clients pgbench gave up on count as failed too (PgBouncer's prepared statements);
    // not its closing "Run was aborted" line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let aborted = stderr
        .lines()
        .filter(|l| l.starts_with("client ") && l.contains("aborted"))
        .count() as u64;
    let error = (!out.status.success()).then(|| {
        stderr
            .lines()
            .find(|l| l.contains("error") || l.contains("FATAL") || l.contains("fatal"))
            .unwrap_or("pgbench failed")
            .chars()
            .take(100)
            .collect::<String>()
    });
    let cpu_us_per_txn = cpu_per_transaction(before, after, processed);
    Figures {
        tps,
        failed: failed + aborted,
        cpu_us_per_txn,
        error,
    }
}

/// pgshield's own lambda burst: 2,000 fresh connections, 100 at a time.
fn lambda(runtime: &tokio::runtime::Runtime, db: &DevDb, endpoint: &Endpoint) -> Figures {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(endpoint.port)
        .user("postgres")
        .password(db.password())
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(30));
    let target = Target {
        label: endpoint.label.to_owned(),
        config,
        pid: endpoint.pid,
    };
    let scenario = Scenario::LambdaBurst {
        invocations: 2000,
        concurrency: 100,
        query: "SELECT 1".into(),
    };
    let before = endpoint.pid.and_then(cpu_ticks);
    let run = runtime.block_on(bench::run_one(&scenario, &target, &Options::default()));
    let after = endpoint.pid.and_then(cpu_ticks);
    let cpu_us_per_txn = cpu_per_transaction(before, after, run.completed as f64);
    Figures {
        tps: run.throughput_per_s,
        failed: run.failed,
        cpu_us_per_txn,
        error: None,
    }
}

fn median(mut values: Vec<f64>) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some((
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    ))
}

fn print_table(
    scenarios: &[String],
    endpoints: &[Endpoint],
    results: &BTreeMap<(String, String), Vec<Figures>>,
) {
    print!("| scenario |");
    for e in endpoints {
        print!(" {} tps |", e.label);
        if e.pid.is_some() {
            print!(" {} CPU µs/txn |", e.label);
        }
    }
    println!(" pgshield / direct | pgshield / pgbouncer |");
    print!("|---|");
    for e in endpoints {
        print!("---|");
        if e.pid.is_some() {
            print!("---|");
        }
    }
    println!("---|---|");
    for scenario in scenarios {
        // Medians over the runs that completed.
        let completed = |label: &str| -> Vec<Figures> {
            results
                .get(&(scenario.clone(), label.to_owned()))
                .map(|f| f.iter().filter(|f| f.error.is_none()).cloned().collect())
                .unwrap_or_default()
        };
        let tps = |label: &str| median(completed(label).iter().map(|f| f.tps).collect());
        print!("| {scenario} |");
        for e in endpoints {
            let all = results
                .get(&(scenario.clone(), e.label.to_owned()))
                .cloned()
                .unwrap_or_default();
            let figures = completed(e.label);
            let failed: u64 = figures.iter().map(|f| f.failed).sum();
            let broken = all.len() - figures.len();
            match median(figures.iter().map(|f| f.tps).collect()) {
                Some((m, lo, hi)) => {
                    print!(" {m:.0} [{lo:.0}–{hi:.0}]");
                    if failed > 0 {
                        print!(" ({failed} failed)");
                    }
                    if broken > 0 {
                        print!(" ({broken} of {} runs did not complete)", all.len());
                    }
                    print!(" |");
                }
                None => {
                    let why = all.iter().find_map(|f| f.error.clone()).unwrap_or_default();
                    print!(" fails: {} |", why.replace('|', "/"));
                }
            }
            if e.pid.is_some() {
                match median(figures.iter().filter_map(|f| f.cpu_us_per_txn).collect()) {
                    Some((m, _, _)) => print!(" {m:.1} |"),
                    None => print!(" – |"),
                }
            }
        }
        let ratio = |a: Option<(f64, f64, f64)>, b: Option<(f64, f64, f64)>| match (a, b) {
            (Some((a, _, _)), Some((b, _, _))) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "–".into(),
        };
        println!(
            " {} | {} |",
            ratio(tps("pgshield"), tps("direct")),
            ratio(tps("pgshield"), tps("pgbouncer"))
        );
    }
}

/// The superuser's SCRAM verifier as PostgreSQL stores it: what PgBouncer's userlist
/// holds so that it, like pgshield, checks logins without a plaintext password.
async fn stored_verifier(db: &DevDb) -> Result<String, String> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(db.port())
        .user("postgres")
        .password(db.password())
        .dbname("postgres");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    row.try_get(0).map_err(|e| e.to_string())
}

/// A PgBouncer in transaction mode with the same pool size, run as the `postgres` OS
/// user when this runs as root (PgBouncer refuses root), stopped by PID on drop.
struct PgBouncer {
    child: Child,
    port: u16,
    dir: PrivateDir,
}

impl PgBouncer {
    fn start(db: &DevDb, verifier: &str) -> Result<PgBouncer, String> {
        let binary = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("pgbouncer is not installed (apt-get install -y pgbouncer)")?;
        let port = pgshield::devdb::free_port().map_err(|e| e.to_string())?;
        // Removed on every way out, the error returns below included; inside the server's
        // directory, which its supervisor removes even when the bench is killed.
        let guard = PrivateDir::new(db.subdir("pgbouncer").map_err(|e| e.to_string())?)?;
        let dir = guard.path();
        let ini = format!(
            "[databases]\npostgres = host=127.0.0.1 port={}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nauth_type = scram-sha-256\nauth_file = {}/userlist.txt\n\
             pool_mode = transaction\ndefault_pool_size = {POOL}\nmax_client_conn = 2000\n\
             server_idle_timeout = 1\n\
             unix_socket_dir =\nlogfile = {}/pgbouncer.log\n",
            db.port(),
            dir.display(),
            dir.display()
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("userlist.txt"),
            format!("\"postgres\" \"{verifier}\"\n"),
        )
        .map_err(|e| e.to_string())?;
        let mut command = Command::new(binary);
        pgshield::bench::embedded::ends_with_this_process(&mut command);
        command
            .arg(dir.join("pgbouncer.ini"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or("running as root needs a postgres OS user for PgBouncer")?;
            std::os::unix::process::CommandExt::uid(&mut command, user.uid.as_raw());
            std::os::unix::process::CommandExt::gid(&mut command, user.gid.as_raw());
            nix::unistd::chown(dir, Some(user.uid), Some(user.gid)).map_err(|e| e.to_string())?;
            for file in ["pgbouncer.ini", "userlist.txt"] {
                nix::unistd::chown(&dir.join(file), Some(user.uid), Some(user.gid))
                    .map_err(|e| e.to_string())?;
            }
        }
        let child = command.spawn().map_err(|e| e.to_string())?;
        let mut bouncer = PgBouncer {
            child,
            port,
            dir: guard,
        };
        let child = &mut bouncer.child;
        if wait_for_port(port, Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(Some(_)))
        }) {
            return Ok(bouncer);
        }
        Err(format!(
            "PgBouncer did not listen: {}",
            std::fs::read_to_string(bouncer.dir.join("pgbouncer.log")).unwrap_or_default()
        ))
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
