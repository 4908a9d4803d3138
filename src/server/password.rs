//! `server_password_command`: the backend password comes from a command (an RDS IAM token
//! generator, a Vault lease…), run with `sh -c` when a backend connection is opened. Its
//! answer is reused for `server_password_ttl`; when the server refuses it, it is asked
//! again at once. Concurrent connections wait for one run instead of each starting one.
//! Neither the output nor the command's stderr is ever logged.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::config::Secret;

/// The longest a command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// One run of the command, awaited by every connection that needs its answer.
type Run = Shared<BoxFuture<'static, Result<Secret, String>>>;

pub struct PasswordCommand {
    command: Arc<str>,
    ttl: Duration,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    cached: Option<(Secret, Instant)>,
    /// The run under way: a task of its own, which caches its answer itself, so that a
    /// caller that gives up (a client hanging up, a health check's timeout) neither kills
    /// it nor loses its answer for the others.
    running: Option<Run>,
}

impl std::fmt::Debug for PasswordCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The command itself may carry a token: not shown.
        f.debug_struct("PasswordCommand")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl PasswordCommand {
    pub fn new(command: String, ttl: Duration) -> PasswordCommand {
        PasswordCommand {
            command: command.into(),
            ttl,
            state: Arc::default(),
        }
    }

    /// The password: the cached answer while it is fresh, else the command's output
    /// (without its trailing newline), from the run under way if there is one.
    pub async fn password(&self) -> Result<Secret, String> {
        let run = {
            let mut state = lock(&self.state);
            if let Some((secret, at)) = state.cached.as_ref() {
                if at.elapsed() < self.ttl {
                    return Ok(secret.clone());
                }
            }
            match &state.running {
                Some(run) => run.clone(),
                None => {
                    let run = self.start();
                    state.running = Some(run.clone());
                    run
                }
            }
        };
        run.await
    }

    /// Starts a run in a task of its own.
    fn start(&self) -> Run {
        let (command, state) = (Arc::clone(&self.command), Arc::clone(&self.state));
        let task = tokio::spawn(async move {
            let result = run(&command).await;
            let mut state = lock(&state);
            state.running = None;
            if let Ok(secret) = &result {
                state.cached = Some((secret.clone(), Instant::now()));
            }
            result
        });
        let state = Arc::clone(&self.state);
        async move {
            task.await.unwrap_or_else(|e| {
                // (It panicked or was aborted: the next caller starts another.)
                lock(&state).running = None;
                Err(format!("it did not finish: {e}"))
            })
        }
        .boxed()
        .shared()
    }

    /// The server refused `stale`: the next connection runs the command again.
    pub async fn forget(&self, stale: &Secret) {
        let mut state = lock(&self.state);
        if state.cached.as_ref().is_some_and(|(s, _)| s == stale) {
            state.cached = None;
        }
    }
}

async fn run(command: &str) -> Result<Secret, String> {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        // Its own process group, so that a command that does not answer in time is
        // killed with what it started (a pipeline's other commands), not only `sh`.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let group = child.id();
    let out = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(format!("cannot run it: {e}")),
        Err(_) => {
            if let Some(group) = group.and_then(|g| i32::try_from(g).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(group),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(format!("no answer within {COMMAND_TIMEOUT:?}"));
        }
    };
    if !out.status.success() {
        return Err(format!("it failed ({})", out.status));
    }
    let text = String::from_utf8(out.stdout).map_err(|_| "its output is not UTF-8")?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err("it printed nothing".into());
    }
    Ok(Secret::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_cached_for_the_ttl_and_forgotten_when_refused() {
        let dir = std::env::temp_dir().join(format!("pgshield-pwcmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "first\n").unwrap();
        let cmd =
            PasswordCommand::new(format!("cat {}", file.display()), Duration::from_secs(3600));
        let first = cmd.password().await.unwrap();
        assert_eq!(first.expose(), "first");
        std::fs::write(&file, "second\n").unwrap();
        assert_eq!(cmd.password().await.unwrap().expose(), "first", "cached");
        cmd.forget(&first).await;
        assert_eq!(cmd.password().await.unwrap().expose(), "second");

        let failing = PasswordCommand::new("exit 3".into(), Duration::ZERO);
        assert!(failing
            .password()
            .await
            .unwrap_err()
            .contains("exit status: 3"));
        let silent = PasswordCommand::new("true".into(), Duration::ZERO);
        assert!(silent.password().await.unwrap_err().contains("nothing"));

        // A caller that gives up leaves the run going: the next one gets its answer, from
        // the same run.
        let runs = dir.join("runs");
        let slow = PasswordCommand::new(
            format!("echo run >> {}; sleep 0.5; echo slow", runs.display()),
            Duration::from_secs(3600),
        );
        let gave_up = tokio::time::timeout(Duration::from_millis(100), slow.password()).await;
        assert!(gave_up.is_err());
        assert_eq!(slow.password().await.unwrap().expose(), "slow");
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
