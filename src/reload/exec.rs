//! Reloading by running a command: argv without a shell, in its own process
//! group, bounded by a timeout at which the whole group is killed. Its
//! output is captured and logged as anchorage's own lines (so JSON logs stay
//! one object per line), and the last line of its stderr explains a failure.
//!
//! Exit code 75 (`EX_TEMPFAIL`, sysexits.h) says "the app is not there yet":
//! an absent target, skipped at start like a missing pid file, a failure
//! that is retried later.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::info;

use super::{Absent, Failure};

/// sysexits.h: a temporary failure; the command asks to be retried later.
pub const EX_TEMPFAIL: i32 = 75;

/// How much of a command's output is kept (the end of it).
const OUTPUT_CAP: usize = 16 * 1024;
/// How long to wait for the output after the command exited: a daemon it
/// started (PM2's) may hold the pipe open for ever.
const OUTPUT_GRACE: Duration = Duration::from_millis(200);

/// Runs `argv` with `env` added; success is exit code 0 within `timeout`,
/// and exit code [`EX_TEMPFAIL`] is an absent target.
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
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // systemd's notify channel is anchorage's, not its children's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .process_group(0)
        .kill_on_drop(true);
    // A program that cannot be found is a failure, at start too: only its
    // exit 75 says the app is not there yet (a typo must not pass as that).
    let mut child = super::child::spawn_tracked(&mut command)
        .map_err(|e| Failure::Failed(format!("cannot start {program:?}: {e}")))?;
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let stdout = Capture::start(child.stdout.take());
    let stderr = Capture::start(child.stderr.take());
    let result = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) if status.code() == Some(EX_TEMPFAIL) => {
            Err(Failure::Absent(Absent::NotThereYet {
                program: program.clone(),
                said: None,
            }))
        }
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
    };
    let out = stdout.finish().await;
    let err = stderr.finish().await;
    for (stream, text) in [("stdout", &out), ("stderr", &err)] {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            info!(command = %program, stream, "{}", line.trim_end());
        }
    }
    let last = err.lines().rev().find(|l| !l.trim().is_empty());
    result.map_err(|failure| match (failure, last) {
        (Failure::Failed(message), Some(last)) => {
            Failure::Failed(format!("{message}: {}", last.trim()))
        }
        (Failure::Absent(Absent::NotThereYet { program, .. }), Some(last)) => {
            Failure::Absent(Absent::NotThereYet {
                program,
                said: Some(last.trim().to_owned()),
            })
        }
        (failure, _) => failure,
    })
}

/// The end of one output stream, read as it comes.
struct Capture {
    buffer: Arc<Mutex<Vec<u8>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Capture {
    fn start(stream: Option<impl AsyncRead + Unpin + Send + 'static>) -> Self {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let task = stream.map(|mut stream| {
            let buffer = buffer.clone();
            tokio::spawn(async move {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    let mut kept = buffer.lock().unwrap_or_else(|e| e.into_inner());
                    kept.extend_from_slice(&chunk[..n]);
                    let excess = kept.len().saturating_sub(OUTPUT_CAP);
                    kept.drain(..excess);
                }
            })
        });
        Self { buffer, task }
    }

    /// What was read, once the stream ended or the grace ran out.
    async fn finish(mut self) -> String {
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(OUTPUT_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        let bytes = std::mem::take(&mut *self.buffer.lock().unwrap_or_else(|e| e.into_inner()));
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[tokio::test]
    async fn a_failure_quotes_the_last_line_of_stderr() {
        let err = run(
            &argv(&["sh", "-c", "echo working; echo 'no such app' >&2; exit 1"]),
            &[],
            Duration::from_secs(5),
        )
        .await;
        assert!(matches!(err, Err(Failure::Failed(m)) if m.ends_with("no such app")));
    }

    #[tokio::test]
    async fn ex_tempfail_is_an_absent_target() {
        let err = run(
            &argv(&["sh", "-c", "echo 'node app is down' >&2; exit 75"]),
            &[],
            Duration::from_secs(5),
        )
        .await;
        assert!(
            matches!(&err, Err(Failure::Absent(Absent::NotThereYet { said: Some(m), .. })) if m.ends_with("node app is down")),
            "{err:?}"
        );
        let err = run(&argv(&["sh", "-c", "exit 74"]), &[], Duration::from_secs(5)).await;
        assert!(matches!(err, Err(Failure::Failed(_))), "{err:?}");
    }

    #[tokio::test]
    async fn a_daemon_holding_the_pipe_does_not_hang_the_reload() {
        let started = std::time::Instant::now();
        run(
            &argv(&["sh", "-c", "sleep 5 & exit 0"]),
            &[],
            Duration::from_secs(10),
        )
        .await
        .expect("exits 0");
        assert!(started.elapsed() < Duration::from_secs(3));
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
        let pid_file = dir.path().join("grandchild.pid");
        // A grandchild that would outlive the timeout by far; its pid is
        // published once it runs.
        let script = format!(
            "sleep 60 & echo $! > {0}.tmp && mv {0}.tmp {0}; wait",
            pid_file.display()
        );
        // The shell must have started the grandchild before the timeout
        // for the test to prove anything: on a loaded machine that can take
        // longer, so the timeout grows until it did.
        let mut timeout = Duration::from_millis(300);
        let grandchild: i32 = loop {
            let started = std::time::Instant::now();
            let err = run(&argv(&["sh", "-c", &script]), &[], timeout).await;
            assert!(matches!(err, Err(Failure::Failed(m)) if m.contains("killed")));
            assert!(started.elapsed() < timeout + Duration::from_secs(10));
            if let Ok(pid) = std::fs::read_to_string(&pid_file) {
                break pid.trim().parse().expect("a pid");
            }
            assert!(
                timeout < Duration::from_secs(20),
                "the shell never started its grandchild"
            );
            timeout *= 4;
        };
        // It dies with the group: gone, or a zombie until whoever inherited
        // it reaps it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().next().map(str::to_owned)
                });
            match state.as_deref() {
                None | Some("Z" | "X") => break,
                Some(state) => assert!(
                    std::time::Instant::now() < deadline,
                    "the process group outlived the timeout: pid {grandchild} is in state {state}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
