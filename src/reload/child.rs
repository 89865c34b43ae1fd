//! Supervising the application as a child (`anchorage run ... -- CHILD`):
//! start it after the first render, forward SIGTERM, SIGINT and SIGQUIT to
//! it, reload it by a signal or a graceful restart, and exit with its exit
//! code (128 + signal if a signal killed it). As PID 1 in a container,
//! anchorage also reaps the orphans that get reparented to it.

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::{Absent, Failure};

/// A restart request: the grace before SIGKILL, and where to say how it went.
type Restart = (Duration, oneshot::Sender<Result<u32, String>>);

/// How the rest of anchorage reaches the child.
#[derive(Clone, Default)]
pub struct ChildHandle {
    pid: Arc<Mutex<Option<u32>>>,
    restart: Option<mpsc::Sender<Restart>>,
}

impl ChildHandle {
    /// The child's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        *self.pid.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGTERM, up to `grace` to exit, SIGKILL, and a new start.
    pub async fn restart(&self, grace: Duration) -> Result<u32, Failure> {
        let Some(tx) = &self.restart else {
            return Err(Failure::Failed("there is no supervised child".into()));
        };
        let (reply, answer) = oneshot::channel();
        tx.send((grace, reply))
            .await
            .map_err(|_| Failure::Absent(Absent::NoChild))?;
        match answer.await {
            Ok(Ok(pid)) => Ok(pid),
            Ok(Err(e)) => Err(Failure::Failed(e)),
            Err(_) => Err(Failure::Absent(Absent::NoChild)),
        }
    }
}

/// Pids whose exit a tokio task waits for: the orphan reaper leaves them be.
static TRACKED: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

/// Spawns `command` and records its pid as tracked, atomically with respect
/// to the reaper.
pub fn spawn_tracked(
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let mut tracked = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
    let child = command.spawn()?;
    if let Some(pid) = child.id() {
        tracked.get_or_insert_with(HashSet::new).insert(pid);
    }
    Ok(child)
}

fn untrack(pid: Option<u32>) {
    if let Some(pid) = pid {
        let mut tracked = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = tracked.as_mut() {
            set.remove(&pid);
        }
    }
}

/// The child's argv and the handle that reaches it.
pub struct Supervisor {
    argv: Vec<String>,
    handle: ChildHandle,
    restarts: mpsc::Receiver<Restart>,
}

impl Supervisor {
    pub fn new(argv: Vec<String>) -> Self {
        let (tx, rx) = mpsc::channel(4);
        Self {
            argv,
            handle: ChildHandle {
                pid: Arc::new(Mutex::new(None)),
                restart: Some(tx),
            },
            restarts: rx,
        }
    }

    pub fn handle(&self) -> ChildHandle {
        self.handle.clone()
    }

    fn start(&self) -> std::io::Result<tokio::process::Child> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| std::io::Error::other("no child"))?;
        let mut command = tokio::process::Command::new(program);
        // systemd's notify channel is anchorage's, not the child's.
        command
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID");
        let child = spawn_tracked(&mut command)?;
        *self.handle.pid.lock().unwrap_or_else(|e| e.into_inner()) = child.id();
        info!(pid = child.id(), argv = ?self.argv, "child started");
        Ok(child)
    }

    /// Runs the child until it exits for good; returns anchorage's exit code.
    pub async fn run(mut self) -> i32 {
        let mut child = match self.start() {
            Ok(child) => child,
            Err(e) => {
                error!(argv = ?self.argv, error = %e, "cannot start the child");
                return 127;
            }
        };
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            error!("cannot install signal handlers for the child");
            let _ = child.kill().await;
            return 1;
        };
        if std::process::id() == 1 {
            tokio::spawn(reap_orphans());
        }
        let mut stopping = false;
        loop {
            tokio::select! {
                status = child.wait() => {
                    untrack(child.id());
                    *self.handle.pid.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    let code = match status {
                        Ok(status) => exit_code(status),
                        Err(e) => {
                            error!(error = %e, "cannot wait for the child");
                            1
                        }
                    };
                    info!(code, "child exited");
                    return code;
                }
                _ = term.recv() => { stopping = true; self.forward(&child, Signal::SIGTERM) }
                _ = int.recv() => { stopping = true; self.forward(&child, Signal::SIGINT) }
                _ = quit.recv() => { stopping = true; self.forward(&child, Signal::SIGQUIT) }
                Some((grace, reply)) = self.restarts.recv(), if !stopping => {
                    match self.restart(&mut child, grace).await {
                        Ok(new) => {
                            let pid = new.id().unwrap_or_default();
                            child = new;
                            let _ = reply.send(Ok(pid));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.clone()));
                            error!(error = %e, "the child could not be restarted");
                            return 1;
                        }
                    }
                }
            }
        }
    }

    fn forward(&self, child: &tokio::process::Child, signal: Signal) {
        if let Some(pid) = child.id() {
            info!(pid, %signal, "forwarding to the child");
            if let Err(e) = kill(Pid::from_raw(pid as i32), signal) {
                warn!(pid, %signal, error = %e, "cannot forward the signal");
            }
        }
    }

    /// SIGTERM, wait up to `grace`, SIGKILL, start again.
    async fn restart(
        &self,
        child: &mut tokio::process::Child,
        grace: Duration,
    ) -> Result<tokio::process::Child, String> {
        let old = child.id();
        if let Some(pid) = old {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                warn!(pid = old, grace = %humantime::format_duration(grace), "child ignored SIGTERM; killing it");
                let _ = child.kill().await;
            }
        }
        untrack(old);
        let new = self
            .start()
            .map_err(|e| format!("cannot start the child again: {e}"))?;
        info!(old = old, new = new.id(), "child restarted");
        Ok(new)
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// As PID 1, reaps every zombie reparented to us that no task waits for.
async fn reap_orphans() {
    let Ok(mut chld) = signal(SignalKind::child()) else {
        warn!("cannot watch SIGCHLD; orphans will not be reaped");
        return;
    };
    while chld.recv().await.is_some() {
        let tracked = TRACKED.lock().unwrap_or_else(|e| e.into_inner());
        for pid in zombie_children() {
            if tracked.as_ref().is_some_and(|t| t.contains(&pid)) {
                continue;
            }
            let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// Our children that are zombies, from `/proc`.
fn zombie_children() -> Vec<u32> {
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
                return false;
            };
            let mut fields = after.split_whitespace();
            let state = fields.next();
            let ppid = fields.next().and_then(|p| p.parse::<u32>().ok());
            state == Some("Z") && ppid == Some(own)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }
}
