//! Reloading by running a command: argv without a shell, in its own process
//! group, bounded by a timeout at which the whole group is killed.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::Failure;

/// Runs `argv` with `env` added; success is exit code 0 within `timeout`.
pub async fn run(
    argv: &[String],
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<(), Failure> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Failure::Failed("an empty command".into()));
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        // systemd's notify channel is anchorage's, not its children's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .process_group(0)
        .kill_on_drop(true);
    let mut child = super::child::spawn_tracked(&mut command)
        .map_err(|e| Failure::Failed(format!("cannot start {program:?}: {e}")))?;
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(Failure::Failed(format!("{program:?} failed: {status}"))),
        Ok(Err(e)) => Err(Failure::Failed(format!("{program:?}: wait: {e}"))),
        Err(_) => {
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            Err(Failure::Failed(format!(
                "{program:?} did not finish within {}; its process group was killed",
                humantime::format_duration(timeout)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[tokio::test]
    async fn exit_code_decides() {
        run(&argv(&["true"]), &[], Duration::from_secs(5))
            .await
            .expect("true succeeds");
        assert!(
            run(&argv(&["false"]), &[], Duration::from_secs(5))
                .await
                .is_err()
        );
        assert!(
            run(&argv(&["/nonexistent/cmd"]), &[], Duration::from_secs(5))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn environment_is_passed() {
        let env = [("ANCHORAGE_BUNDLE", "peers".to_owned())];
        run(
            &argv(&["sh", "-c", "test \"$ANCHORAGE_BUNDLE\" = peers"]),
            &env,
            Duration::from_secs(5),
        )
        .await
        .expect("env seen");
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("grandchild-ran");
        // A grandchild that would write the marker after the timeout.
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let started = std::time::Instant::now();
        let err = run(
            &argv(&["sh", "-c", &script]),
            &[],
            Duration::from_millis(300),
        )
        .await;
        assert!(matches!(err, Err(Failure::Failed(m)) if m.contains("killed")));
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "the process group outlived the timeout");
    }
}
