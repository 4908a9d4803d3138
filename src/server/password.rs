//! `server_password_command`: the backend password comes from a command (an RDS IAM token
//! generator, a Vault lease…), run with `sh -c` when a backend connection is opened. Its
//! answer is reused for `server_password_ttl`; when the server refuses it, it is asked
//! again at once. Concurrent connections wait for one run instead of each starting one.
//! Neither the output nor the command's stderr is ever logged.

use std::time::{Duration, Instant};

use crate::config::Secret;

/// The longest a command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PasswordCommand {
    command: String,
    ttl: Duration,
    cached: tokio::sync::Mutex<Option<(Secret, Instant)>>,
}

impl std::fmt::Debug for PasswordCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The command itself may carry a token: not shown.
        f.debug_struct("PasswordCommand")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl PasswordCommand {
    pub fn new(command: String, ttl: Duration) -> PasswordCommand {
        PasswordCommand {
            command,
            ttl,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The password: the cached answer while it is fresh, else the command's output
    /// (without its trailing newline).
    pub async fn password(&self) -> Result<Secret, String> {
        let mut cached = self.cached.lock().await;
        if let Some((secret, at)) = cached.as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(secret.clone());
            }
        }
        let secret = self.run().await?;
        *cached = Some((secret.clone(), Instant::now()));
        Ok(secret)
    }

    /// The server refused `stale`: the next connection runs the command again.
    pub async fn forget(&self, stale: &Secret) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|(s, _)| s == stale) {
            *cached = None;
        }
    }

    async fn run(&self) -> Result<Secret, String> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(format!("cannot run it: {e}")),
            Err(_) => return Err(format!("no answer within {COMMAND_TIMEOUT:?}")),
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
