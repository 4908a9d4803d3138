//! The `pgshield` command: `run` (the default), `check-config`, `dev`, `bench`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use pgshield::config::{
    AuthMethod, Config, DatabaseConfig, ListenConfig, LogConfig, LogFormat, PoolConfig, Secret,
    UserConfig,
};
use pgshield::devdb::{DevDb, DevDbOptions};
use pgshield::proxy::Shared;
use pgshield::shutdown::Shutdown;
use pgshield::Proxy;
use tokio::signal::unix::Signal;

#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Where `run` looks for a configuration file when none is given.
const DEFAULT_CONFIG: &str = "/etc/pgshield/pgshield.toml";

#[derive(Parser)]
#[command(
    name = "pgshield",
    version,
    about = "A PostgreSQL connection proxy: many clients, a bounded pool of backends, queueing instead of falling over."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default command).
    Run(RunArgs),
    /// Validate a configuration and print the effective settings, secrets masked.
    CheckConfig {
        /// The file to check (environment overrides apply, as at run time).
        file: Option<PathBuf>,
    },
    /// Start a throwaway PostgreSQL from this machine's server binaries and front it.
    Dev(DevArgs),
    /// Drive load at a target and, in the same run, at a comparison (e.g. the same
    /// database directly): a burst of serverless-style connections, steady clients, or a
    /// swarm of idle ones. `--embedded` needs no setup.
    Bench(Box<BenchArgs>),
}

#[derive(Args)]
struct BenchArgs {
    /// lambda-burst (fresh connection → query → close, N times, C at a time), steady
    /// (C clients querying for a duration) or idle-swarm (N idle connections held).
    #[arg(long, default_value = "lambda-burst")]
    scenario: String,
    /// Connection string of the target, e.g. postgresql://app:secret@127.0.0.1:6432/app
    #[arg(long)]
    target: Option<String>,
    /// Connection string to compare with in the same run (typically the database itself).
    #[arg(long)]
    compare: Option<String>,
    /// Start a throwaway PostgreSQL and a pgshield in front of it, and compare the two.
    #[arg(long, conflicts_with_all = ["target", "pid"])]
    embedded: bool,
    /// lambda-burst: invocations in all.
    #[arg(long, default_value_t = 2000)]
    invocations: usize,
    /// lambda-burst: invocations at a time.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// steady: clients; idle-swarm: connections to hold.
    #[arg(long)]
    clients: Option<usize>,
    /// steady: how long.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// steady: simple, extended, prepared or mix.
    #[arg(long, default_value = "mix")]
    protocol: pgshield::bench::Protocol,
    /// The statement each invocation or client runs.
    #[arg(long, default_value = "SELECT 1")]
    query: String,
    /// idle-swarm: how long to hold the connections once all are open.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    hold: std::time::Duration,
    /// idle-swarm: the PID of the target proxy, whose memory per client is measured
    /// (known by itself with --embedded).
    #[arg(long)]
    pid: Option<u32>,
    /// Connect with TLS (the certificate is not checked).
    #[arg(long)]
    tls: bool,
    /// How long a connect (with its login) or a query may go unanswered before it counts
    /// as an error.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Draw latency percentiles and failures per target into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// --embedded: the throwaway server's max_connections.
    #[arg(long, default_value_t = 40)]
    max_connections: u32,
    /// --embedded: pgshield's backends per pool.
    #[arg(long, default_value_t = 20)]
    pool_size: usize,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML). Default: $PGSHIELD_CONFIG, else /etc/pgshield/pgshield.toml
    /// if it exists, else the environment alone (PGSHIELD__SECTION__KEY=value).
    /// (Global: `pgshield -c FILE run` and `pgshield -c FILE check-config` read FILE.)
    #[arg(short, long, env = "PGSHIELD_CONFIG", global = true)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct DevArgs {
    /// Address pgshield listens on.
    #[arg(long, default_value = "127.0.0.1:6432")]
    listen: String,
    /// Backends per pool.
    #[arg(long, default_value_t = 10)]
    pool_size: usize,
    /// The throwaway server's max_connections.
    #[arg(long, default_value_t = 20)]
    max_connections: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(args),
        Some(Command::CheckConfig { file }) => check_config(file.or(cli.run.config).as_deref()),
        Some(Command::Dev(args)) => dev(args),
        Some(Command::Bench(args)) => bench(*args),
    }
}

fn config_path(given: Option<PathBuf>) -> Option<PathBuf> {
    given.or_else(|| {
        Path::new(DEFAULT_CONFIG)
            .exists()
            .then(|| PathBuf::from(DEFAULT_CONFIG))
    })
}

fn run(args: RunArgs) -> ExitCode {
    let path = config_path(args.config);
    let config = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgshield: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log);
    serve(config, Some(path), |_, _| {})
}

fn check_config(file: Option<&Path>) -> ExitCode {
    let loaded = Config::load(file)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            // The TLS files are read as at start, so a bad path or PEM shows up here.
            pgshield::tls::ClientTls::new(&config.tls.client)
                .and_then(|_| pgshield::tls::ServerTls::new(&config.tls.server))
                .map_err(|e| format!("TLS: {e}"))?;
            Ok(config)
        });
    match loaded {
        Ok(config) => {
            let source = file.map_or("environment".to_owned(), |f| f.display().to_string());
            // (Not println!: `check-config | head` closes the pipe early, which is no panic.)
            let mut out = std::io::stdout().lock();
            let _ = write!(
                out,
                "# {source}: valid. Effective configuration (secrets masked):\n\n{}",
                config.to_masked_toml()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pgshield: {e}");
            ExitCode::from(2)
        }
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    use pgshield::bench::{self, embedded, Scenario, Target};
    let scenario = match args.scenario.as_str() {
        "lambda-burst" => Scenario::LambdaBurst {
            invocations: args.invocations,
            concurrency: args.concurrency,
            query: args.query.clone(),
        },
        "steady" => Scenario::Steady {
            clients: args.clients.unwrap_or(32),
            duration: args.duration,
            protocol: args.protocol,
            query: args.query.clone(),
        },
        "idle-swarm" => Scenario::IdleSwarm {
            clients: args.clients.unwrap_or(10_000),
            hold: args.hold,
        },
        other => {
            eprintln!(
                "pgshield bench: unknown scenario `{other}`: lambda-burst, steady or idle-swarm"
            );
            return ExitCode::from(2);
        }
    };
    let parse = |label: &str, url: &str, pid: Option<u32>| {
        let config = url.parse::<tokio_postgres::Config>().map_err(|e| {
            // (tokio-postgres says only "invalid connection string"; the cause, an
            // option it does not know or a value it does not take, is its source.)
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("--{label}: {e}{cause}")
        })?;
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require && !args.tls {
            return Err(format!(
                "--{label} asks for sslmode=require: add --tls (the bench connects with TLS \
                 only when told, and does not check certificates)"
            ));
        }
        Ok(Target {
            label: label.to_owned(),
            config,
            pid,
        })
    };
    let mut embedded = None;
    let mut targets = Vec::new();
    if args.embedded {
        let pgshield = match std::env::current_exe() {
            Ok(path) => path,
            Err(e) => {
                eprintln!("pgshield bench: cannot find this executable: {e}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!(
            "starting a throwaway PostgreSQL (max_connections {}) and pgshield (pool of {}) in front of it…",
            args.max_connections, args.pool_size
        );
        defer_interrupts();
        match embedded::Embedded::start(&embedded::EmbeddedOptions {
            pgshield,
            max_connections: args.max_connections,
            pool_size: args.pool_size,
            mode: pgshield::config::PoolMode::Transaction,
            tls: args.tls,
        }) {
            Ok(e) => {
                targets.push(e.pgshield());
                if args.compare.is_none() {
                    targets.push(e.direct());
                }
                embedded = Some(e);
            }
            Err(e) => {
                eprintln!("pgshield bench --embedded: {e}");
                return if interrupted() {
                    ExitCode::from(130)
                } else {
                    ExitCode::FAILURE
                };
            }
        }
        if interrupted() {
            eprintln!("pgshield bench: interrupted");
            drop(embedded);
            return ExitCode::from(130);
        }
    } else {
        match args.target.as_deref() {
            Some(url) => match parse("target", url, args.pid) {
                Ok(t) => targets.push(t),
                Err(e) => {
                    eprintln!("pgshield bench: {e}");
                    return ExitCode::from(2);
                }
            },
            None => {
                eprintln!("pgshield bench: give --target URL (and --compare URL), or --embedded");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(url) = args.compare.as_deref() {
        match parse("compare", url, None) {
            Ok(t) => targets.push(t),
            Err(e) => {
                eprintln!("pgshield bench: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let tls = match args.tls.then(bench::tls::RequireTls::new).transpose() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("pgshield bench: TLS: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = bench::Options {
        tls,
        progress: !args.json,
        settle: embedded.as_ref().map(|e| e.direct().config),
        no_answer: Some(args.timeout),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgshield bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Ctrl-C (or SIGTERM, or the terminal closing) stops the run and still cleans up
    // what --embedded started.
    let report = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return None;
        };
        if interrupted() {
            return None;
        }
        tokio::select! {
            report = bench::run(&scenario, &targets, &options) => Some(report),
            _ = tokio::signal::ctrl_c() => None,
            _ = term.recv() => None,
            _ = hup.recv() => None,
        }
    });
    let Some(report) = report else {
        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
        eprintln!("pgshield bench: interrupted");
        drop(embedded);
        return ExitCode::from(130);
    };
    // Connections still closing must not outlive the servers.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("pgshield bench: {e}"),
        }
    } else {
        print!("{}", bench::table(&report));
    }
    if let Some(path) = &args.plot {
        if let Err(e) = bench::plot::svg(&report, path) {
            eprintln!("pgshield bench: {e}");
            return ExitCode::FAILURE;
        }
        if !args.json {
            println!("plot: {}", path.display());
        }
    }
    drop(embedded);
    // A run that completed nothing (a wrong password, a target down) fails the command,
    // as a check in CI would want.
    let empty: Vec<&str> = report
        .runs
        .iter()
        .filter(|r| r.completed == 0)
        .map(|r| r.label.as_str())
        .collect();
    if !empty.is_empty() {
        eprintln!(
            "pgshield bench: nothing completed against {} (see the errors)",
            empty.join(", ")
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn dev(args: DevArgs) -> ExitCode {
    init_logging(&LogConfig::default());
    defer_interrupts();
    // Before the server starts (seconds of initdb): an address taken (a PgBouncer on its
    // default port 6432) is said at once.
    if let Err(e) = std::net::TcpListener::bind(args.listen.as_str()) {
        eprintln!(
            "pgshield dev: cannot listen on {}: {e} (another pooler there? give --listen 127.0.0.1:PORT)",
            args.listen
        );
        return ExitCode::FAILURE;
    }
    let db = match DevDb::start(&DevDbOptions {
        max_connections: args.max_connections,
        ..DevDbOptions::default()
    }) {
        Ok(db) => db,
        Err(e) if interrupted() => {
            eprintln!("pgshield dev: interrupted ({e})");
            return ExitCode::from(130);
        }
        Err(e) => {
            eprintln!("pgshield dev: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        listen: ListenConfig {
            addr: args.listen,
            ..ListenConfig::default()
        },
        pool: PoolConfig {
            max_size: args.pool_size,
            shutdown_timeout: std::time::Duration::from_secs(5),
            ..PoolConfig::default()
        },
        databases: BTreeMap::from([(
            "postgres".to_owned(),
            DatabaseConfig {
                host: db.host().to_owned(),
                port: db.port(),
                ..DatabaseConfig::default()
            },
        )]),
        read_only: Default::default(),
        users: BTreeMap::from([(
            "postgres".to_owned(),
            UserConfig {
                auth: AuthMethod::ScramSha256,
                password: Some(Secret::new(db.password())),
                server_user: None,
                server_password: None,
                password_file: None,
                server_password_file: None,
                server_password_command: None,
                server_password_ttl: std::time::Duration::from_secs(600),
                allowed_cidrs: Vec::new(),
                require_tls: false,
                max_client_connections: 0,
            },
        )]),
        log: LogConfig::default(),
        runtime: Default::default(),
        tls: Default::default(),
        auth: Default::default(),
        // Any free port: a second `dev` must not collide with the first.
        admin: pgshield::config::AdminConfig {
            http_listen: "127.0.0.1:0".into(),
            ..Default::default()
        },
    };
    let password = db.password().to_owned();
    let (direct_port, version, dir) = (
        db.port(),
        db.version().to_owned(),
        db.dir().display().to_string(),
    );
    // (The configuration is made here, not read from anywhere RELOAD could read again.)
    let code = serve(config, None, move |addr, http| {
        println!();
        println!(
            "  pgshield dev: PostgreSQL {version} (throwaway, in {dir}) on 127.0.0.1:{direct_port}"
        );
        println!(
            "  pgshield is listening on {addr}: transaction pooling, {} backends per pool",
            args.pool_size
        );
        println!();
        println!("  Through pgshield:  psql \"postgresql://postgres:{password}@{addr}/postgres\"");
        println!("  Directly:          psql \"postgresql://postgres:{password}@127.0.0.1:{direct_port}/postgres\"");
        if let Some(http) = http {
            println!("  Metrics:           curl http://{http}/metrics");
        }
        println!();
        println!("  Ctrl-C stops both and removes everything.");
        println!();
    });
    drop(db);
    code
}

/// Binds and serves until a signal, then drains; `on_ready` gets the bound addresses
/// (clients', and the admin HTTP listener's if there is one). `reload_from` is where
/// RELOAD and SIGHUP read the configuration again: a file, or `Some(None)` for the
/// environment alone; `None` when it cannot be read again.
fn serve(
    config: Config,
    reload_from: Option<Option<PathBuf>>,
    on_ready: impl FnOnce(std::net::SocketAddr, Option<std::net::SocketAddr>),
) -> ExitCode {
    pgshield::net::raise_fd_limit();
    let mut builder = match config.runtime.threads() {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgshield: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Handlers first: once the port is open, a SIGTERM must mean "drain", not "die".
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(term), Ok(int), Ok(hup), Ok(usr1), Ok(usr2)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
            signal(SignalKind::user_defined2()),
        ) else {
            eprintln!("pgshield: cannot install signal handlers");
            return ExitCode::FAILURE;
        };
        let reuse_port = config.listen.reuse_port;
        let proxy = match Proxy::bind(config).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("pgshield: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(source) = reload_from.clone() {
            proxy.shared().reload_from(source);
        }
        on_ready(proxy.local_addr(), proxy.http_addr());
        let reloads = reload_from.is_some();
        tokio::spawn(watch_signals(
            proxy.shutdown_handle(),
            term,
            int,
            reuse_port,
        ));
        if reloads {
            tokio::spawn(reload_on_hangup(Arc::clone(proxy.shared()), hup));
        } else {
            // `dev`: nothing to read again, and a hang-up is its terminal closing.
            tokio::spawn(stop_on_hangup(proxy.shutdown_handle(), hup));
        }
        if interrupted() {
            proxy.shutdown_handle().begin();
        }
        tokio::spawn(pause_on_signals(Arc::clone(proxy.shared()), usr1, usr2));
        // On a worker, not on this thread: `block_on`'s own future runs outside the
        // worker pool, so each connection it accepted had to be handed to a worker and
        // one woken for it (a futex and an eventfd write per connection). Accepted on a
        // worker, a client's task starts on that worker.
        match tokio::spawn(proxy.run()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pgshield: the accept loop failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGHUP reloads the configuration, as the admin console's RELOAD (clients keep their
/// sessions; an invalid configuration is rejected whole and logged).
async fn reload_on_hangup(shared: Arc<Shared>, mut hup: Signal) {
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        let shared = Arc::clone(&shared);
        // Reading files and deriving verifiers is blocking work.
        let _ = tokio::task::spawn_blocking(move || shared.reload()).await;
    }
}

/// SIGHUP, where there is no configuration to read again (`dev`), shuts down as SIGTERM.
async fn stop_on_hangup(shutdown: Shutdown, mut hup: Signal) {
    if hup.recv().await.is_some() {
        tracing::info!("SIGHUP: shutting down");
        shutdown.begin();
    }
}

/// SIGUSR1 pauses every pool (as the admin console's PAUSE), SIGUSR2 resumes them.
async fn pause_on_signals(shared: Arc<Shared>, mut usr1: Signal, mut usr2: Signal) {
    loop {
        tokio::select! {
            Some(()) = usr1.recv() => {
                tracing::info!("SIGUSR1: pausing every pool");
                // (Pools made until SIGUSR2 too.)
                shared.pools.note_paused(None);
                let pools = shared.pools.all();
                for pool in &pools {
                    pool.hold();
                }
                tokio::spawn(async move {
                    for pool in &pools {
                        pool.until_paused().await;
                    }
                    tracing::info!("paused: no backend is in use");
                });
            }
            Some(()) = usr2.recv() => {
                tracing::info!("SIGUSR2: resuming every pool");
                shared.pools.note_resumed(None);
                for pool in shared.pools.all() {
                    pool.resume();
                }
            }
            else => return,
        }
    }
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one forces it.
async fn watch_signals(shutdown: Shutdown, mut term: Signal, mut int: Signal, handover: bool) {
    if handover {
        // listen.reuse_port: a new process has the port too. Stop listening and serve the
        // connected clients until they leave; a second signal drains, a third forces.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal: no new clients; serving connected ones until they leave (signal again to drain)");
        shutdown.close_listener();
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down gracefully (signal again to force)"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down gracefully (signal again to force)"),
    }
    shutdown.begin();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: closing every client now");
    shutdown.force();
}

/// Set by a SIGINT, SIGTERM or SIGHUP that came while `dev` or `bench --embedded` started
/// its throwaway server (and before the handlers of the run were in place), so that what
/// was started is stopped and removed, not left behind by a process killed mid-way.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_interrupt(_: nix::libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP set [`INTERRUPTED`] rather than end the process.
fn defer_interrupts() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(note_interrupt),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(signal, &action) } {
            eprintln!("pgshield: cannot handle {signal}: {e}");
        }
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

fn init_logging(log: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Fields at the top level, as log pipelines expect.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
