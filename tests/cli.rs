//! The `pgshield` command line: `check-config` (masked output, errors that name the key,
//! environment overrides) and `dev` (a throwaway PostgreSQL, fronted, cleaned up on Ctrl-C).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_pgshield");

/// A config with everything `check-config` needs; tests append to it.
const MINIMAL: &str = "[databases.app]\nhost = \"127.0.0.1\"\n\n[users.app]\npassword = \"pw\"\n";

/// A temp directory holding one config file, removed on drop.
struct ConfigFile {
    dir: PathBuf,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = common::unique_temp_dir("cli");
        let path = dir.join("pgshield.toml");
        std::fs::write(&path, text).expect("write the config file");
        ConfigFile { dir, path }
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The binary with none of the caller's `PGSHIELD*` variables; killed if dropped early.
fn pgshield() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PGSHIELD") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null()).kill_on_drop(true);
    command
}

/// Runs `pgshield check-config FILE` (with extra environment) and collects its output.
async fn check_config(file: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = pgshield();
    command.arg("check-config").arg(file);
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("check-config finishes within 30 s")
        .expect("run pgshield check-config")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_masked() {
    let file = ConfigFile::new(&format!(
        "{MINIMAL}\n[users.ops]\npassword = \"hunter2-secret\"\nserver_password = \"backend-secret-pw\"\n"
    ));
    let out = check_config(&file.path, &[]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(stdout.contains("********"), "{stdout}");
    assert!(stdout.contains("max_size"), "{stdout}");
    assert!(stdout.contains("[users.ops]"), "{stdout}");
    for secret in ["hunter2-secret", "backend-secret-pw"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} shown:\n{stdout}\n{stderr}"
        );
    }
}

/// `-c FILE` before the subcommand counts too (it used to be read only after `run`, and
/// `pgshield -c FILE check-config` said no database was configured).
#[tokio::test]
async fn the_config_flag_may_come_before_the_subcommand() {
    let file = ConfigFile::new(MINIMAL);
    for args in [
        vec!["-c", "FILE", "check-config"],
        vec!["check-config", "-c", "FILE"],
        vec!["--config", "FILE", "check-config"],
    ] {
        let mut command = pgshield();
        for arg in &args {
            if *arg == "FILE" {
                command.arg(&file.path);
            } else {
                command.arg(arg);
            }
        }
        let out = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .expect("check-config finishes within 30 s")
            .expect("run pgshield check-config");
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("[databases.app]"),
            "{args:?}: {}",
            text(&out.stdout)
        );
    }
    // `run` reads the file given before it too: this one stops it at its bad key.
    let bad = ConfigFile::new(&format!("{MINIMAL}[listen]\naddr = \"nowhere\"\n"));
    for run_first in [false, true] {
        let mut command = pgshield();
        if run_first {
            command.arg("run").arg("-c").arg(&bad.path);
        } else {
            command.arg("-c").arg(&bad.path).arg("run");
        }
        let out = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .expect("run refuses within 30 s")
            .expect("run pgshield");
        assert!(!out.status.success(), "run first: {run_first}");
        assert!(
            text(&out.stderr).contains("listen.addr"),
            "run first: {run_first}: {}",
            text(&out.stderr)
        );
    }
}

#[tokio::test]
async fn check_config_names_the_bad_key() {
    for (extra, key) in [
        ("[pool]\nmax_size = 0\n", "pool.max_size"),
        ("[pool]\nmax_sise = 3\n", "max_sise"),
    ] {
        let file = ConfigFile::new(&format!("{extra}\n{MINIMAL}"));
        let out = check_config(&file.path, &[]).await;
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{extra}: status {:?}\nstderr:\n{stderr}",
            out.status
        );
        assert!(
            stderr.contains(key),
            "{extra}: stderr does not name {key}:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn env_overrides_apply() {
    let file = ConfigFile::new(MINIMAL);
    let out = check_config(&file.path, &[("PGSHIELD__POOL__MAX_SIZE", "77")]).await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "status {:?}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    assert!(
        stdout.lines().any(|l| l.trim() == "max_size = 77"),
        "no `max_size = 77` in:\n{stdout}"
    );
}

/// A running `pgshield dev`: killed by PID (and reaped) on drop unless it has exited.
struct Dev {
    child: Child,
    exited: bool,
}

impl Drop for Dev {
    fn drop(&mut self) {
        if !self.exited {
            // kill_on_drop is set as well; this makes it explicit and immediate.
            let _ = self.child.start_kill();
        }
    }
}

/// The server's directory `dev`'s banner names.
fn throwaway_dir(banner: &[String]) -> PathBuf {
    banner
        .iter()
        .find_map(|l| {
            let start = l.find("(throwaway, in ")? + "(throwaway, in ".len();
            let len = l[start..].find(')')?;
            Some(PathBuf::from(&l[start..start + len]))
        })
        .unwrap_or_else(|| panic!("no `(throwaway, in DIR)` in:\n{}", banner.join("\n")))
}

/// The directories process `pid` made for a throwaway server (`pgshield-pg-PID-…`, where
/// a bench's pgshield has its own).
fn dirs_of(pid: u32) -> Vec<PathBuf> {
    let prefixes = [format!("pgshield-pg-{pid}-")];
    std::fs::read_dir(std::env::temp_dir())
        .expect("read the temporary directory")
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            prefixes
                .iter()
                .any(|p| name.to_string_lossy().starts_with(p.as_str()))
        })
        .map(|e| e.path())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_ends_when_its_terminal_closes_or_when_interrupted_while_starting() {
    // A hang-up (the terminal closed) ends it as Ctrl-C does: there is no file to reload.
    let mut child = pgshield()
        .args(["dev", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgshield dev");
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut dev = Dev {
        child,
        exited: false,
    };
    let pid = dev.child.id().expect("running");
    let mut banner = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read dev's stdout") {
            let last = line.contains("Through pgshield:");
            banner.push(line);
            if last {
                break;
            }
        }
    })
    .await
    .expect("the banner within 60 s");
    let dir = throwaway_dir(&banner);
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    kill(Pid::from_raw(pid as i32), Signal::SIGHUP).expect("send SIGHUP");
    let status = tokio::time::timeout(Duration::from_secs(20), dev.child.wait())
        .await
        .expect("pgshield dev exits within 20 s of SIGHUP")
        .expect("wait");
    dev.exited = true;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!dir.exists(), "{} left behind", dir.display());

    // Ctrl-C while the server is being made (initdb takes a second or so), once its
    // directory is there (and so its handler): nothing left.
    for delay in [0, 300] {
        let child = pgshield()
            .args(["dev", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgshield dev");
        let mut dev = Dev {
            child,
            exited: false,
        };
        let pid = dev.child.id().expect("running");
        for _ in 0..200 {
            if !dirs_of(pid).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tokio::time::sleep(Duration::from_millis(delay)).await;
        kill(Pid::from_raw(pid as i32), Signal::SIGINT).expect("send SIGINT");
        let status = tokio::time::timeout(Duration::from_secs(30), dev.child.wait())
            .await
            .expect("pgshield dev exits within 30 s of SIGINT")
            .expect("wait");
        dev.exited = true;
        assert!(status.code().is_some(), "{delay} ms: killed, {status:?}");
        assert_eq!(
            dirs_of(pid),
            Vec::<PathBuf>::new(),
            "{delay} ms: left behind"
        );
    }
}

/// The text between the first pair of double quotes in `line`.
fn quoted(line: &str) -> Option<&str> {
    let start = line.find('"')? + 1;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_starts_postgres_fronts_it_and_cleans_up() {
    // Port 0: a port picked beforehand can be taken by another test's connection before
    // dev binds it (dev then exits: "cannot listen on …: Address already in use").
    // Its log goes to a file, shown if the banner never comes: why it stopped.
    let log_dir = common::unique_temp_dir("dev-log");
    let log_path = log_dir.join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("create dev's log file");
    let mut child = pgshield()
        .args(["dev", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start pgshield dev");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut dev = Dev {
        child,
        exited: false,
    };
    let pid = Pid::from_raw(i32::try_from(dev.child.id().expect("running")).expect("pid"));

    // Read the banner up to the line with the URL through pgshield.
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read dev's stdout") {
            let last = line.contains("Through pgshield:");
            banner.push(line);
            if last {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(read, Ok(true)),
        "no `Through pgshield:` line within 60 s (timed out: {}); stdout so far:\n{}\nstderr:\n{}",
        read.is_err(),
        banner.join("\n"),
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&log_dir);
    let banner_text = banner.join("\n");
    let url = banner
        .iter()
        .find(|l| l.contains("Through pgshield:"))
        .and_then(|l| quoted(l))
        .unwrap_or_else(|| panic!("no quoted URL in:\n{banner_text}"))
        .to_owned();
    assert!(url.starts_with("postgresql://"), "{url}");
    // The address asked for, with the port the system gave, in both lines of the banner.
    let port = url
        .split_once("@127.0.0.1:")
        .and_then(|(_, rest)| rest.split_once('/'))
        .and_then(|(port, _)| port.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no 127.0.0.1 port in {url}"));
    assert_ne!(port, 0, "{url}");
    assert!(
        banner_text.contains(&format!("listening on 127.0.0.1:{port}")),
        "{banner_text}"
    );
    let dir = throwaway_dir(&banner);
    assert!(
        dir.is_dir(),
        "{} should exist while dev runs",
        dir.display()
    );

    // Keep reading stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let mut config = url
        .parse::<tokio_postgres::Config>()
        .unwrap_or_else(|e| panic!("{url} is not a connection URL: {e}"));
    config.connect_timeout(Duration::from_secs(10));
    let conn = tokio::time::timeout(Duration::from_secs(20), common::connect(&config))
        .await
        .expect("login through pgshield dev within 20 s")
        .expect("login through pgshield dev");
    let one: i32 = conn
        .client
        .query_one("SELECT 1", &[])
        .await
        .expect("SELECT 1 through pgshield dev")
        .get(0);
    assert_eq!(one, 1);
    let max: String = conn
        .client
        .query_one("SELECT current_setting('max_connections')", &[])
        .await
        .expect("read max_connections")
        .get(0);
    assert_eq!(max, "20");

    // Ctrl-C: pgshield stops, then the server, and the directory goes.
    kill(pid, Signal::SIGINT).expect("send SIGINT to pgshield dev");
    let status = tokio::time::timeout(Duration::from_secs(20), dev.child.wait())
        .await
        .expect("pgshield dev exits within 20 s of SIGINT")
        .expect("wait for pgshield dev");
    dev.exited = true;
    assert_eq!(status.code(), Some(0), "exit status {status:?}");
    assert!(
        !dir.exists(),
        "{} still exists after pgshield dev exited",
        dir.display()
    );
}

#[tokio::test]
async fn dev_without_server_binaries_says_how_to_get_them() {
    let stderr = dev_failing_without_binaries("127.0.0.1:0").await;
    assert!(
        stderr.contains("server binaries") && stderr.contains("apt-get install -y postgresql"),
        "{stderr}"
    );
}

/// Runs `pgshield dev --listen ADDR` where it can find no server binaries; checks that it
/// fails (exit 1) within 30 s, and returns what it said.
async fn dev_failing_without_binaries(listen: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        pgshield()
            .args(["dev", "--listen", listen])
            .env("PGSHIELD_PG_BINDIR", "/nonexistent/pgshield-test")
            .output(),
    )
    .await
    .expect("dev gives up within 30 s")
    .expect("run pgshield dev");
    assert_eq!(out.status.code(), Some(1));
    text(&out.stderr)
}

/// Collects everything a child writes to one pipe.
fn collect(
    pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut text = String::new();
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            text.push_str(&line);
            text.push('\n');
        }
        text
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// Also the one test of the single-threaded runtime (`runtime.workers = 1`).
async fn run_logs_no_secret_and_answers_hup_usr1_usr2() {
    const CLIENT_SECRET: &str = "ClientSecret-8d2f";
    const SERVER_SECRET: &str = "ServerSecret-51ac";
    const WRONG_GUESS: &str = "WrongGuess-77f1";
    const NEW_SECRET: &str = "NewSecret-3b9e";
    common::create_role("cli_secret", SERVER_SECRET).await;
    common::create_role("cli_newcomer", NEW_SECRET).await;
    let port = common::free_port();
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\n[databases.app]\nhost = \"127.0.0.1\"\nport = {}\n\
         dbname = \"postgres\"\n[users.cli_secret]\npassword = \"{CLIENT_SECRET}\"\n\
         server_password = \"{SERVER_SECRET}\"\n[log]\nlevel = \"trace\"\nstats_period = \"300ms\"\n\
         [admin]\nhttp_listen = \"127.0.0.1:0\"\n\
         [runtime]\nworkers = 1\n",
        common::cluster().port()
    );
    let file = ConfigFile::new(&text);
    let mut child = pgshield()
        .args(["run", "--config"])
        .arg(&file.path)
        .env("RUST_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgshield run");
    let stdout = collect(child.stdout.take().expect("stdout"));
    let stderr = collect(child.stderr.take().expect("stderr"));
    let pid = Pid::from_raw(i32::try_from(child.id().expect("running")).expect("pid"));

    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("cli_secret")
        .dbname("app")
        .connect_timeout(Duration::from_secs(5));
    let mut logged_in = None;
    for _ in 0..100 {
        match common::connect(config.clone().password(CLIENT_SECRET)).await {
            Ok(conn) => {
                logged_in = Some(conn);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let conn = logged_in.expect("pgshield run accepts the right password");
    conn.client
        .simple_query("SELECT 1")
        .await
        .expect("a query runs");
    common::connect(config.clone().password(WRONG_GUESS))
        .await
        .err()
        .expect("a wrong password is refused");
    // SIGHUP reloads the file (here: a user is added), and is not the end of the process.
    let mut newcomer = config.clone();
    newcomer.user("cli_newcomer").password(NEW_SECRET);
    common::connect(&newcomer)
        .await
        .err()
        .expect("not a user before the reload");
    std::fs::write(
        &file.path,
        format!("{text}[users.cli_newcomer]\npassword = \"{NEW_SECRET}\"\n"),
    )
    .expect("rewrite the config");
    kill(pid, Signal::SIGHUP).expect("send SIGHUP");
    let mut reloaded = false;
    for _ in 0..50 {
        if common::connect(&newcomer).await.is_ok() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "SIGHUP reloaded the configuration");
    conn.client
        .simple_query("SELECT 2")
        .await
        .expect("still serving after SIGHUP");
    // SIGUSR1 pauses (no backend stays open, new work waits); SIGUSR2 resumes.
    kill(pid, Signal::SIGUSR1).expect("send SIGUSR1");
    let watcher = common::admin().await;
    while common::backends_of(&watcher, "cli_secret").await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = tokio::spawn(async move {
        conn.client
            .simple_query("SELECT 3")
            .await
            .expect("runs after SIGUSR2");
        conn
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a query ran while paused");
    kill(pid, Signal::SIGUSR2).expect("send SIGUSR2");
    let conn = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("served after SIGUSR2")
        .expect("no panic");
    drop(conn);
    kill(pid, Signal::SIGTERM).expect("send SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within 20 s of SIGTERM")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let logs = format!(
        "{}{}",
        stdout.await.expect("stdout"),
        stderr.await.expect("stderr")
    );
    assert!(
        logs.contains("authentication failed") && logs.contains("TRACE"),
        "the logs were captured at trace level:\n{logs}"
    );
    assert!(logs.contains("configuration reloaded"), "{logs}");
    // log.connections (on by default) and log.stats_period.
    for line in [
        "client logged in",
        "client disconnected",
        "transactions=",
        "login refused",
        "sqlstate=28P01",
        "xacts_per_s=",
    ] {
        assert!(logs.contains(line), "no {line:?} in the logs:\n{logs}");
    }
    for secret in [CLIENT_SECRET, SERVER_SECRET, WRONG_GUESS, NEW_SECRET] {
        assert!(
            !logs.contains(secret),
            "{secret} appears in the logs:\n{logs}"
        );
    }
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    common::create_role("cli_json", "pw").await;
    let port = common::free_port();
    let file = ConfigFile::new(&format!(
        "[listen]\naddr = \"127.0.0.1:{port}\"\n[databases.app]\nhost = \"127.0.0.1\"\nport = {}\n\
         dbname = \"postgres\"\n[users.cli_json]\npassword = \"pw\"\n[log]\nformat = \"json\"\n\
         [admin]\nhttp_listen = \"\"\n",
        common::cluster().port()
    ));
    let mut child = pgshield()
        .args(["run", "--config"])
        .arg(&file.path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgshield run");
    let stderr = collect(child.stderr.take().expect("stderr"));
    let pid = Pid::from_raw(i32::try_from(child.id().expect("running")).expect("pid"));
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("cli_json")
        .password("pw")
        .dbname("app")
        .connect_timeout(Duration::from_secs(5));
    let mut served = false;
    for _ in 0..100 {
        if let Ok(conn) = common::connect(&config).await {
            conn.client.simple_query("SELECT 1").await.expect("query");
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served);
    // The client's disconnection is logged before the process exits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill(pid, Signal::SIGTERM).expect("send SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let logs = stderr.await.expect("stderr");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let disconnected = lines
        .iter()
        .find(|l| l["message"] == "client disconnected")
        .unwrap_or_else(|| panic!("no disconnection line:\n{logs}"));
    assert_eq!(disconnected["user"], "cli_json");
    assert_eq!(disconnected["transactions"], 1, "{disconnected}");
    assert_eq!(disconnected["level"], "INFO");
    // Pool events too, at info with log.connections (the default).
    let opened = lines
        .iter()
        .find(|l| l["message"] == "opened backend")
        .unwrap_or_else(|| panic!("no backend line:\n{logs}"));
    assert_eq!(opened["pool"], "app/cli_json");
}

/// `KEY=value` lines of an env file (comments and blank lines skipped).
fn env_file(path: &str) -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{path}: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn the_examples_configure_pgshield_by_environment_alone() {
    for (path, listen, from_secret) in [
        ("examples/compose/pgshield.env", "0.0.0.0:6432", false),
        ("examples/kubernetes/pgshield.env", "127.0.0.1:6432", true),
    ] {
        let mut env = env_file(path);
        if from_secret {
            // What deployment.yaml adds from its Secret.
            env.insert(
                "PGSHIELD__USERS__APP__PASSWORD".into(),
                "from-a-secret".into(),
            );
        }
        let config = pgshield::config::Config::load_with_env(None, Some(env))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(config.listen.addr, listen, "{path}");
        assert_eq!(config.admin.http_listen, "0.0.0.0:9930", "{path}");
        assert!(config.databases.contains_key("app"), "{path}");
        assert!(config.users.contains_key("app"), "{path}");
    }
    let compose = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/compose/docker-compose.yml"),
    )
    .expect("compose file");
    assert!(compose.contains("env_file: pgshield.env"));
    let k8s = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/kubernetes/deployment.yaml"),
    )
    .expect("deployment");
    for probe in [
        "path: /ready",
        "path: /health",
        "port: 9930",
        "name: PGSHIELD__USERS__APP__PASSWORD",
    ] {
        assert!(k8s.contains(probe), "{probe}");
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // (After the name, which is in parentheses and may hold spaces.)
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // (A zombie has exited; it waits only for its parent to read its status.)
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rfind(')')
            .is_some_and(|at| !stat[at..].starts_with(") Z"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_embedded_leaves_nothing_running_when_stopped_or_killed() {
    for signal in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGKILL] {
        let mut bench = pgshield()
            .args([
                "bench",
                "--embedded",
                "--scenario",
                "steady",
                "--clients",
                "2",
            ])
            .args(["--duration", "120s", "--json"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgshield bench");
        let pid = bench.id().expect("running");
        // Its pgshield: the child that is not the server's supervisor (both run
        // pgshield's binary; the supervisor's parent is the bench too).
        let mut proxy = None;
        for _ in 0..300 {
            proxy = children_of(pid).into_iter().find(|c| {
                std::fs::read(format!("/proc/{c}/cmdline"))
                    .is_ok_and(|cmd| cmd.windows(5).any(|w| w == b"\0run\0"))
            });
            if proxy.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let proxy = proxy.unwrap_or_else(|| panic!("{signal}: no `pgshield run` child"));
        // Once it listens the run is under way (give it a moment to get there).
        tokio::time::sleep(Duration::from_secs(2)).await;
        kill(Pid::from_raw(pid as i32), signal).expect("signal the bench");
        tokio::time::timeout(Duration::from_secs(30), bench.wait())
            .await
            .unwrap_or_else(|_| panic!("{signal}: the bench did not end"))
            .expect("wait");
        let mut gone = false;
        for _ in 0..100 {
            if !alive(proxy) {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "{signal}: its pgshield ({proxy}) still runs");
        // (Killed, the bench leaves it to the server's supervisor.)
        for _ in 0..100 {
            if dirs_of(pid).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(dirs_of(pid), Vec::<PathBuf>::new(), "{signal}");
    }
}

/// A target that takes connections and never answers does not hold the bench: each
/// connect counts as an error after `--timeout`, and a run that completed nothing fails
/// the command. Connection strings it cannot use say why.
#[tokio::test]
async fn bench_gives_up_on_a_silent_target_and_says_what_is_wrong_with_a_url() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = silent.local_addr().expect("address").port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let target = format!("postgresql://u:p@127.0.0.1:{port}/x");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        pgshield()
            .args(["bench", "--json", "--target", &target])
            .args([
                "--invocations",
                "3",
                "--concurrency",
                "3",
                "--timeout",
                "1s",
            ])
            .output(),
    )
    .await
    .expect("the bench ends")
    .expect("run pgshield bench");
    holder.abort();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("nothing completed"),
        "{}",
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let run = &report["runs"][0];
    assert_eq!(run["failed"], 3, "{report}");
    assert!(
        report.to_string().contains("no answer to a connect"),
        "{report}"
    );

    for (url, says) in [
        ("postgresql://u@127.0.0.1:1/x?sslmode=require", "--tls"),
        ("postgresql://u@127.0.0.1:1/x?sslmode=bogus", "sslmode"),
    ] {
        let out = pgshield()
            .args(["bench", "--target", url])
            .output()
            .await
            .expect("run pgshield bench");
        assert_eq!(out.status.code(), Some(2), "{url}");
        assert!(
            text(&out.stderr).contains(says),
            "{url}: {}",
            text(&out.stderr)
        );
    }
}

#[tokio::test]
async fn dev_says_at_once_when_its_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    // (Told before any server would start: none can start here.)
    let stderr = dev_failing_without_binaries(&addr).await;
    assert!(
        stderr.contains("cannot listen on") && stderr.contains("--listen"),
        "{stderr}"
    );
}

/// Runs `pgshield bench --embedded --json` with `args`; returns the report.
async fn bench_embedded(args: &[&str]) -> serde_json::Value {
    let out = pgshield()
        .args(["bench", "--embedded", "--json"])
        .args(args)
        .output()
        .await
        .expect("run pgshield bench");
    assert!(
        out.status.success(),
        "{:?}\nstderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&out.stdout), text(&out.stderr)))
}

#[tokio::test]
async fn bench_embedded_runs_each_scenario_against_pgshield_and_direct() {
    let dir = common::unique_temp_dir("bench");
    let plot = dir.join("burst.svg");
    let burst = bench_embedded(&[
        "--invocations",
        "120",
        "--concurrency",
        "30",
        "--max-connections",
        "20",
        "--pool-size",
        "5",
        "--plot",
        plot.to_str().expect("utf-8 path"),
    ])
    .await;
    assert_eq!(burst["scenario"], "lambda-burst");
    let runs = burst["runs"].as_array().expect("runs");
    assert_eq!(runs[0]["label"], "pgshield");
    assert_eq!(runs[1]["label"], "direct");
    assert_eq!(runs[0]["completed"], 120, "{burst}");
    assert_eq!(runs[0]["failed"], 0, "{burst}");
    for run in runs {
        let done = run["completed"].as_u64().unwrap_or(0) + run["failed"].as_u64().unwrap_or(0);
        assert_eq!(done, 120, "every invocation is accounted for: {run}");
    }
    assert!(runs[0]["end_to_end"]["p99_us"].as_u64().unwrap_or(0) > 0);
    let svg = std::fs::read_to_string(&plot).expect("the plot was written");
    assert!(svg.starts_with("<svg") && svg.contains("pgshield"), "{svg}");

    // TLS on both targets (the throwaway server gets the certificate too).
    let tls = bench_embedded(&["--tls", "--invocations", "40", "--concurrency", "8"]).await;
    for run in tls["runs"].as_array().expect("runs") {
        assert_eq!(run["completed"], 40, "{run}");
    }

    // 30 clients, through a pool of 20 then straight to a server of 40 connections: the
    // direct run waits for the pool's idle backends to close, and has room for all.
    let steady = bench_embedded(&[
        "--scenario",
        "steady",
        "--clients",
        "30",
        "--duration",
        "1500ms",
        "--protocol",
        "mix",
    ])
    .await;
    for run in steady["runs"].as_array().expect("runs") {
        assert!(run["completed"].as_u64().unwrap_or(0) > 10, "{run}");
        // (The half second too: not cut to whole seconds.)
        assert!(run["elapsed_s"].as_f64().unwrap_or(0.0) >= 1.45, "{run}");
        assert_eq!(run["failed"], 0, "{run}");
    }

    let swarm = bench_embedded(&[
        "--scenario",
        "idle-swarm",
        "--clients",
        "200",
        "--hold",
        "1s",
        "--max-connections",
        "20",
    ])
    .await;
    let runs = swarm["runs"].as_array().expect("runs");
    assert_eq!(runs[0]["completed"], 200, "{swarm}");
    assert!(
        runs[0]["idle"]["bytes_per_client"].as_u64().is_some(),
        "{swarm}"
    );
    // The server alone cannot hold them: most are refused.
    assert!(runs[1]["failed"].as_u64().unwrap_or(0) > 100, "{swarm}");
    let _ = std::fs::remove_dir_all(&dir);
}
