//! `--embedded`: a throwaway PostgreSQL (from the machine's server binaries, with a small
//! `max_connections`) and a pgshield process in front of it, both stopped (by PID) and
//! removed when dropped. pgshield runs as its own process so that its CPU and memory are
//! its own, not the benchmark's.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Target;
use crate::devdb::{DevDb, DevDbOptions};

#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// The `pgshield` executable to start.
    pub pgshield: PathBuf,
    /// The server's `max_connections`.
    pub max_connections: u32,
    /// pgshield's `pool.max_size`.
    pub pool_size: usize,
    /// pgshield's `pool.mode`.
    pub mode: crate::config::PoolMode,
    /// Clients may use TLS (a self-signed certificate is made for the run).
    pub tls: bool,
}

pub struct Embedded {
    db: DevDb,
    proxy: Child,
    port: u16,
    dir: PrivateDir,
}

/// A directory only this user can read (it holds the throwaway superuser's password),
/// removed when dropped, whatever happens after it is made.
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    pub fn new(path: PathBuf) -> Result<PrivateDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(PrivateDir(path))
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes the process `command` starts get SIGKILL when this one ends, however it ends
/// (killed, or a signal its run does not handle): a child left running would hold its
/// port and a directory with the server's password. (The signal comes when the thread
/// that forked exits: spawn from the thread that lives as long as the process.)
pub fn ends_with_this_process(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: between fork and exec only system calls run, no allocation.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// How long pgshield has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

impl Embedded {
    pub fn start(options: &EmbeddedOptions) -> Result<Embedded, String> {
        // With TLS, the server gets the same certificate as pgshield: the comparison is
        // TLS against TLS.
        let certificate = options.tls.then(self_signed).transpose()?;
        let mut db_options = DevDbOptions {
            max_connections: options.max_connections,
            ..DevDbOptions::default()
        };
        if let Some((cert, key)) = &certificate {
            db_options.files = vec![
                ("server.crt".into(), cert.clone().into_bytes()),
                ("server.key".into(), key.clone().into_bytes()),
            ];
            db_options.settings = vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), "server.crt".into()),
                ("ssl_key_file".into(), "server.key".into()),
            ];
        }
        let db = DevDb::start(&db_options).map_err(|e| e.to_string())?;
        // Inside the server's directory, which its supervisor removes even when the
        // bench is killed: the configuration holds the server's password.
        let dir = PrivateDir(db.subdir("bench").map_err(|e| e.to_string())?);
        let port = crate::devdb::free_port().map_err(|e| format!("find a free port: {e}"))?;
        let mut config = format!(
            "[listen]\naddr = \"127.0.0.1:{port}\"\nmax_client_connections = 100000\n\
             [pool]\nmax_size = {}\nmode = \"{}\"\nserver_idle_timeout = \"1s\"\n\
             [databases.postgres]\nhost = \"{}\"\nport = {}\n\
             [users.{}]\npassword = \"{}\"\n\
             [admin]\nhttp_listen = \"\"\n\
             [log]\nlevel = \"warn\"\nconnections = false\nstats_period = \"0s\"\n",
            options.pool_size,
            options.mode,
            db.host(),
            db.port(),
            db.superuser(),
            db.password(),
        );
        if let Some((cert, key)) = &certificate {
            let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&cert_path, cert).map_err(|e| format!("write cert: {e}"))?;
            std::fs::write(&key_path, key).map_err(|e| format!("write key: {e}"))?;
            config.push_str(&format!(
                "[tls.client]\nmode = \"prefer\"\ncert = \"{}\"\nkey = \"{}\"\n",
                cert_path.display(),
                key_path.display()
            ));
        }
        let config_path = dir.join("pgshield.toml");
        std::fs::write(&config_path, config).map_err(|e| format!("write config: {e}"))?;
        let log = std::fs::File::create(dir.join("pgshield.log"))
            .map_err(|e| format!("create log: {e}"))?;
        let mut command = Command::new(&options.pgshield);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PGSHIELD") {
                command.env_remove(name);
            }
        }
        // Ends with the bench, however the bench ends (killed, or a signal its run did
        // not handle): a pgshield left running would hold the port and the directory
        // with the server's password. (Spawned from the thread that lives as long as the
        // process: the signal comes when the thread that forked exits.)
        ends_with_this_process(&mut command);
        let proxy = command
            .args(["run", "--config"])
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start {}: {e}", options.pgshield.display()))?;
        let mut embedded = Embedded {
            db,
            proxy,
            port,
            dir,
        };
        embedded.wait_until_listening()?;
        Ok(embedded)
    }

    fn wait_until_listening(&mut self) -> Result<(), String> {
        let proxy = &mut self.proxy;
        if wait_for_port(self.port, START_TIMEOUT, || {
            matches!(proxy.try_wait(), Ok(Some(_)))
        }) {
            return Ok(());
        }
        match self.proxy.try_wait() {
            Ok(Some(status)) => Err(format!(
                "pgshield exited ({status}) before listening:\n{}",
                self.proxy_log()
            )),
            _ => Err(format!(
                "pgshield did not listen within {}s:\n{}",
                START_TIMEOUT.as_secs(),
                self.proxy_log()
            )),
        }
    }

    /// What pgshield logged (warnings and errors).
    pub fn proxy_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgshield.log")).unwrap_or_default()
    }

    fn target(&self, label: &str, port: u16, pid: Option<u32>) -> Target {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.db.host())
            .port(port)
            .user(self.db.superuser())
            .password(self.db.password())
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(30));
        Target {
            label: label.to_owned(),
            config,
            pid,
        }
    }

    /// pgshield, fronting the throwaway server.
    pub fn pgshield(&self) -> Target {
        self.target("pgshield", self.port, Some(self.proxy.id()))
    }

    /// The throwaway server itself.
    pub fn direct(&self) -> Target {
        self.target("direct", self.db.port(), None)
    }

    pub fn db(&self) -> &DevDb {
        &self.db
    }

    pub fn proxy_pid(&self) -> u32 {
        self.proxy.id()
    }

    pub fn proxy_port(&self) -> u16 {
        self.port
    }
}

impl Embedded {
    /// Waits up to `limit` for pgshield to exit; true if it did.
    fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.proxy.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        // SIGTERM drains; a second one, once the first has been seen, forces.
        if let Ok(pid) = i32::try_from(self.proxy.id()) {
            let pid = Pid::from_raw(pid);
            let _ = kill(pid, Signal::SIGTERM);
            if !self.exits_within(Duration::from_secs(3)) {
                let _ = kill(pid, Signal::SIGTERM);
                self.exits_within(Duration::from_secs(5));
            }
        }
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
    }
}

/// Waits until something accepts connections on 127.0.0.1:`port`: false after
/// `within`, or as soon as `exited()` says the process meant to listen is gone.
pub fn wait_for_port(port: u16, within: Duration, mut exited: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < within && !exited() {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A self-signed certificate for 127.0.0.1 and localhost: (certificate, key), PEM.
fn self_signed() -> Result<(String, String), String> {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .map_err(|e| format!("make a certificate: {e}"))?;
    Ok((made.cert.pem(), made.key_pair.serialize_pem()))
}
