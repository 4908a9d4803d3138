//! A throwaway PostgreSQL cluster from the machine's own server binaries, for `pgshield
//! dev`, the integration tests and the benchmarks.
//!
//! `initdb` runs into a fresh temporary directory; the server listens on 127.0.0.1 on a
//! free port with scram-sha-256 for TCP logins (the superuser `postgres` gets a random
//! password) and trust on its private unix socket. As root, everything runs as the
//! `postgres` OS user, since PostgreSQL refuses to run as root.
//!
//! The server is started by a tiny supervisor shell whose stdin is a pipe from this
//! process. When the pipe closes (on [`DevDb::stop`], on drop, or because this process
//! died, however it died), the supervisor stops the server with a fast shutdown and
//! removes the directory. So a test binary that keeps its cluster in a `static` (never
//! dropped) still leaves nothing behind.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use rand::distr::{Alphanumeric, SampleString};

/// How a cluster is set up.
#[derive(Debug, Clone)]
pub struct DevDbOptions {
    pub max_connections: u32,
    /// Extra `postgresql.conf` settings, as `name = value` pairs.
    pub settings: Vec<(String, String)>,
    /// `pg_hba.conf` lines placed before the defaults (local trust, host scram-sha-256),
    /// e.g. `host all legacy_user 127.0.0.1/32 md5`.
    pub hba: Vec<String>,
    /// Files written into the data directory, readable by the server's user alone, e.g.
    /// a TLS certificate and key named by `settings` (`ssl_cert_file = 'server.crt'`).
    pub files: Vec<(String, Vec<u8>)>,
}

impl Default for DevDbOptions {
    fn default() -> Self {
        DevDbOptions {
            max_connections: 20,
            settings: Vec::new(),
            hba: Vec::new(),
            files: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevDbError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found: looked at `pg_config --bindir`, PATH \
         and /usr/lib/postgresql/*/bin.\n  On Debian or Ubuntu: sudo apt-get install -y postgresql\n  \
         Or point PGSHIELD_PG_BINDIR at a directory holding initdb and postgres."
    )]
    NoBinaries,
    #[error("running as root needs a `postgres` OS user to run the server as (apt-get install postgresql creates one)")]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed:\n{output}")]
    Command { what: String, output: String },
    #[error("PostgreSQL did not become ready within {0:?}; its log ends with:\n{1}")]
    NotReady(Duration, String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevDbError {
    let what = what.into();
    move |source| DevDbError::Io { what, source }
}

/// A running throwaway cluster. Dropping it stops the server and removes its files.
#[derive(Debug)]
pub struct DevDb {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    password: String,
    version: String,
    supervisor: Option<Child>,
    lifeline: Option<ChildStdin>,
    /// How it was set up (a restart launches it the same way).
    options: DevDbOptions,
    owner: Option<(u32, u32)>,
}

impl DevDb {
    /// Finds the server binaries: `$PGSHIELD_PG_BINDIR`, `pg_config --bindir`, `PATH`,
    /// then the newest `/usr/lib/postgresql/*/bin`.
    pub fn find_bindir() -> Result<PathBuf, DevDbError> {
        let has_server =
            |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
        if let Some(dir) = std::env::var_os("PGSHIELD_PG_BINDIR").map(PathBuf::from) {
            return if has_server(&dir) {
                Ok(dir)
            } else {
                Err(DevDbError::NoBinaries)
            };
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return Ok(dir);
            }
        }
        if let Some(path) = std::env::var_os("PATH") {
            if let Some(dir) = std::env::split_paths(&path).find(|d| has_server(d)) {
                return Ok(dir);
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                let dir = e.path().join("bin");
                has_server(&dir).then_some((version, dir))
            })
            .collect();
        versions.sort();
        versions
            .pop()
            .map(|(_, dir)| dir)
            .ok_or(DevDbError::NoBinaries)
    }

    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start(options: &DevDbOptions) -> Result<DevDb, DevDbError> {
        let bindir = Self::find_bindir()?;
        let owner = server_owner()?;
        let mut db = DevDb {
            dir: private_dir()?,
            bindir,
            port: 0,
            password: Alphanumeric.sample_string(&mut rand::rng(), 20),
            version: String::new(),
            supervisor: None,
            lifeline: None,
            options: options.clone(),
            owner,
        };
        if let Err(e) = db.init(owner, options) {
            db.stop();
            let _ = std::fs::remove_dir_all(&db.dir);
            return Err(e);
        }
        Ok(db)
    }

    fn init(
        &mut self,
        owner: Option<(u32, u32)>,
        options: &DevDbOptions,
    ) -> Result<(), DevDbError> {
        let pwfile = self.dir.join("pwfile");
        std::fs::write(&pwfile, &self.password).map_err(io_err("write pwfile"))?;
        std::fs::create_dir(self.dir.join("sock")).map_err(io_err("create socket dir"))?;
        if let Some((uid, gid)) = owner {
            for path in [&self.dir, &pwfile, &self.dir.join("sock")] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(io_err("chown to postgres"))?;
            }
        }
        let mut initdb = self.command("initdb", owner);
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .args(["--auth-host=scram-sha-256", "--auth-local=trust"])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(&mut initdb, "initdb")?;
        let _ = std::fs::remove_file(&pwfile);
        if !options.hba.is_empty() {
            let hba = self.data_dir().join("pg_hba.conf");
            let defaults = std::fs::read_to_string(&hba).map_err(io_err("read pg_hba.conf"))?;
            let mut text = options.hba.join("\n");
            text.push('\n');
            text.push_str(&defaults);
            std::fs::write(&hba, text).map_err(io_err("write pg_hba.conf"))?;
        }
        for (name, contents) in &options.files {
            let path = self.data_dir().join(name);
            std::fs::write(&path, contents).map_err(io_err(format!("write {name}")))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .map_err(io_err(format!("restrict {name}")))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(io_err(format!("chown {name} to postgres")))?;
            }
        }
        self.version = std::fs::read_to_string(self.data_dir().join("PG_VERSION"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default();

        // A free port can be taken by someone else before the server binds it: retry, with
        // a `keep` file telling the supervisor of a failed attempt to leave the cluster be.
        let keep = self.dir.join("keep");
        std::fs::write(&keep, b"").map_err(io_err("write keep marker"))?;
        let mut last_error = None;
        for _ in 0..3 {
            self.port = free_port().map_err(io_err("find a free port"))?;
            match self.launch(owner, options) {
                Ok(()) => {
                    std::fs::remove_file(&keep).map_err(io_err("remove keep marker"))?;
                    return Ok(());
                }
                Err(e) => {
                    self.stop_server();
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.expect("three attempts were made"))
    }

    fn launch(
        &mut self,
        owner: Option<(u32, u32)>,
        options: &DevDbOptions,
    ) -> Result<(), DevDbError> {
        let mut settings: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "127.0.0.1".into()),
            ("port".into(), self.port.to_string()),
            (
                "unix_socket_directories".into(),
                self.dir.join("sock").display().to_string(),
            ),
            (
                "max_connections".into(),
                options.max_connections.to_string(),
            ),
            ("password_encryption".into(), "scram-sha-256".into()),
            ("shared_buffers".into(), "32MB".into()),
            ("fsync".into(), "off".into()),
            ("synchronous_commit".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("logging_collector".into(), "off".into()),
        ];
        settings.extend(options.settings.iter().cloned());
        let mut postgres_args = Vec::new();
        for (name, value) in settings {
            postgres_args.push("-c".to_owned());
            postgres_args.push(format!("{name}={value}"));
        }
        // The supervisor: start the server, wait for our pipe to close, stop it, clean up.
        // It ends when the server ends (so a server that dies at startup is seen at once),
        // and removes the directory unless a `keep` file says a retry will reuse it.
        let script = r#"
            dir="$1"; shift
            exec 3<&0
            "$@" </dev/null 3<&- >>"$dir/postgres.log" 2>&1 &
            server=$!
            ( read -r _ignored <&3 || true; kill -INT "$server" 2>/dev/null ) &
            watcher=$!
            wait "$server"
            kill "$watcher" 2>/dev/null
            [ -e "$dir/keep" ] || rm -rf "$dir"
        "#;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .arg("pgshield-devdb")
            .arg(&self.dir)
            .arg(self.bindir.join("postgres"))
            .arg("-D")
            .arg(self.data_dir())
            .args(&postgres_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: a Ctrl-C meant for us must not kill the server behind our
        // back; we stop it ourselves, in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        drop_privileges(&mut cmd, owner);
        let mut child = cmd
            .spawn()
            .map_err(io_err("start the postgres supervisor"))?;
        self.lifeline = child.stdin.take();
        self.supervisor = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), DevDbError> {
        let started = Instant::now();
        let isready = self.bindir.join("pg_isready");
        while started.elapsed() < limit {
            if let Some(child) = self.supervisor.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
            }
            let ready = if isready.is_file() {
                Command::new(&isready)
                    .args([
                        "-q",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &self.port.to_string(),
                        "-U",
                        "postgres",
                    ])
                    .status()
                    .is_ok_and(|s| s.success())
            } else {
                std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                    && self.log_tail().contains("ready to accept connections")
            };
            if ready {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(DevDbError::NotReady(limit, self.log_tail()))
    }

    fn command(&self, program: &str, owner: Option<(u32, u32)>) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        drop_privileges(&mut cmd, owner);
        cmd
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("postgres.log")) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The directory of the server binaries (pgbench and psql usually live there too).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A private directory inside the server's (`name` in it), removed with it: by the
    /// supervisor too, when this process is killed (so it belongs to the server's owner,
    /// who may then remove what is in it, whoever wrote it).
    pub fn subdir(&self, name: &str) -> Result<PathBuf, DevDbError> {
        use std::os::unix::fs::DirBuilderExt;
        let path = self.dir.join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(io_err(format!("create {}", path.display())))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {} to postgres", path.display())))?;
        }
        Ok(path)
    }

    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's name.
    pub fn superuser(&self) -> &str {
        "postgres"
    }

    /// The superuser's password (random per cluster).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The server's major version, e.g. "15".
    pub fn version(&self) -> &str {
        &self.version
    }

    /// A streaming replica of this cluster, started from `pg_basebackup` (over the
    /// primary's unix socket) on a port of its own, with the same options.
    pub fn replica(&self) -> Result<DevDb, DevDbError> {
        let mut db = DevDb {
            dir: private_dir()?,
            bindir: self.bindir.clone(),
            port: 0,
            password: self.password.clone(),
            version: self.version.clone(),
            supervisor: None,
            lifeline: None,
            options: self.options.clone(),
            owner: self.owner,
        };
        let made = (|| {
            std::fs::create_dir(db.dir.join("sock")).map_err(io_err("create socket dir"))?;
            if let Some((uid, gid)) = db.owner {
                for path in [&db.dir, &db.dir.join("sock")] {
                    std::os::unix::fs::chown(path, Some(uid), Some(gid))
                        .map_err(io_err("chown to postgres"))?;
                }
            }
            let mut backup = db.command("pg_basebackup", db.owner);
            backup
                .arg("-D")
                .arg(db.data_dir())
                .arg("-h")
                .arg(self.dir.join("sock"))
                .args(["-p", &self.port.to_string(), "-U", "postgres"])
                .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"]);
            run(&mut backup, "pg_basebackup")?;
            let keep = db.dir.join("keep");
            std::fs::write(&keep, b"").map_err(io_err("write keep marker"))?;
            db.port = free_port().map_err(io_err("find a free port"))?;
            let options = db.options.clone();
            db.launch(db.owner, &options)?;
            std::fs::remove_file(&keep).map_err(io_err("remove keep marker"))
        })();
        if let Err(e) = made {
            db.stop();
            return Err(e);
        }
        Ok(db)
    }

    /// Promotes a replica to primary (`pg_ctl promote`, waiting until it is done).
    pub fn promote(&self) -> Result<(), DevDbError> {
        let mut promote = self.command("pg_ctl", self.owner);
        promote
            .args(["promote", "-w", "-t", "30", "-D"])
            .arg(self.data_dir());
        run(&mut promote, "pg_ctl promote")
    }

    /// Stops the server at once, as a crash would (an immediate shutdown: no checkpoint,
    /// every connection cut); its files stay, for [`DevDb::start_again`].
    pub fn stop_immediately(&mut self) -> Result<(), DevDbError> {
        std::fs::write(self.dir.join("keep"), b"").map_err(io_err("write keep marker"))?;
        let pidfile = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .map_err(io_err("read postmaster.pid"))?;
        let pid = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .ok_or_else(|| DevDbError::Command {
                what: "read postmaster.pid".into(),
                output: pidfile.clone(),
            })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGQUIT,
        )
        .map_err(|e| io_err("signal the server")(e.into()))?;
        drop(self.lifeline.take());
        if let Some(mut child) = self.supervisor.take() {
            let _ = child.wait();
        }
        Ok(())
    }

    /// Starts a server stopped by [`DevDb::stop_immediately`] again, on the same port.
    pub fn start_again(&mut self) -> Result<(), DevDbError> {
        let options = self.options.clone();
        let started = self.launch(self.owner, &options);
        let _ = std::fs::remove_file(self.dir.join("keep"));
        started
    }

    /// Stops the server and starts it again on the same port and data: what a database
    /// restart (or a failover to the same address) looks like to clients.
    pub fn restart(&mut self) -> Result<(), DevDbError> {
        let keep = self.dir.join("keep");
        std::fs::write(&keep, b"").map_err(io_err("write keep marker"))?;
        self.stop_server();
        let options = self.options.clone();
        let started = self.launch(self.owner, &options);
        let _ = std::fs::remove_file(&keep);
        started
    }

    /// Stops the server and removes its directory. Idempotent.
    pub fn stop(&mut self) {
        self.stop_server();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn stop_server(&mut self) {
        drop(self.lifeline.take());
        if let Some(mut child) = self.supervisor.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for DevDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A new directory for a cluster, under the temporary directory, that only we may enter
/// (the superuser's password passes through it).
fn private_dir() -> Result<PathBuf, DevDbError> {
    let dir = std::env::temp_dir().join(format!(
        "pgshield-pg-{}-{}",
        std::process::id(),
        Alphanumeric
            .sample_string(&mut rand::rng(), 8)
            .to_lowercase()
    ));
    std::fs::create_dir(&dir).map_err(io_err(format!("create {}", dir.display())))?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io_err(format!("restrict {}", dir.display())))?;
    Ok(dir)
}

/// `(uid, gid)` of the `postgres` OS user when we are root; `None` otherwise.
fn server_owner() -> Result<Option<(u32, u32)>, DevDbError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some((user.uid.as_raw(), user.gid.as_raw()))),
        _ => Err(DevDbError::NoPostgresUser),
    }
}

fn drop_privileges(cmd: &mut Command, owner: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        cmd.gid(gid).uid(uid);
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), DevDbError> {
    let out = cmd.output().map_err(io_err(format!("run {what}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(DevDbError::Command {
        what: what.to_owned(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

/// A port free on 127.0.0.1 right now (for servers a test or benchmark starts).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
