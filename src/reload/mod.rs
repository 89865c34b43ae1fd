//! Reload actions: making the application take the new trust.
//!
//! Each distinct [`ReloadSpec`] has one worker task. A request marks it
//! pending (naming the bundles that changed) and wakes it; requests that
//! arrive while it runs coalesce into exactly one more run afterwards, and
//! bundles that changed in the same cycle and share an action run it once
//! (guarantee 4). A failed attempt is logged, counted, and retried with
//! exponential backoff capped at a minute (or `retries` times), and a newer
//! request supersedes the retries. Workers never block the event loop.

pub mod exec;
pub mod http;
pub mod signal;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{ReloadAction, ReloadSpec};
use crate::telemetry::metrics::{ActionLabel, Metrics};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why a reload attempt did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The target does not exist (no pid file, no such process, connection
    /// refused): at start, the app will read the fresh output when it starts.
    Absent(String),
    Failed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Absent(m) | Self::Failed(m) => f.write_str(m),
        }
    }
}

/// What a pending run is for.
#[derive(Debug, Default, Clone)]
struct Pending {
    bundles: BTreeSet<String>,
    outputs: BTreeSet<PathBuf>,
    /// Every request merged in came from the first render.
    startup: bool,
}

impl Pending {
    fn merge(&mut self, other: Pending) {
        let was_empty = self.bundles.is_empty();
        self.bundles.extend(other.bundles);
        self.outputs.extend(other.outputs);
        self.startup = if was_empty {
            other.startup
        } else {
            self.startup && other.startup
        };
    }
}

struct Slot {
    wake: Notify,
    pending: Mutex<Pending>,
}

impl Slot {
    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn put_back(&self, pending: Pending) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(pending);
    }
}

/// Where the supervised child can be found (set by the supervisor).
pub type ChildPid = Arc<Mutex<Option<u32>>>;

/// The running reload workers, one per distinct action.
pub struct Reloader {
    workers: HashMap<ReloadSpec, (Arc<Slot>, JoinHandle<()>)>,
    metrics: Arc<Metrics>,
    child: ChildPid,
}

impl Reloader {
    pub fn new(metrics: Arc<Metrics>, child: ChildPid) -> Self {
        Self {
            workers: HashMap::new(),
            metrics,
            child,
        }
    }

    /// Asks for `spec` to run because `bundle` changed its `outputs`.
    pub fn request(&mut self, spec: &ReloadSpec, bundle: &str, outputs: &[PathBuf], startup: bool) {
        let slot = match self.workers.get(spec) {
            Some((slot, _)) => slot.clone(),
            None => {
                let slot = Arc::new(Slot {
                    wake: Notify::new(),
                    pending: Mutex::new(Pending::default()),
                });
                let task = tokio::spawn(worker(
                    spec.clone(),
                    slot.clone(),
                    self.metrics.clone(),
                    self.child.clone(),
                ));
                self.workers.insert(spec.clone(), (slot.clone(), task));
                slot
            }
        };
        slot.put_back(Pending {
            bundles: BTreeSet::from([bundle.to_owned()]),
            outputs: outputs.iter().cloned().collect(),
            startup,
        });
        // Stores a permit if the worker is busy: exactly one more run.
        slot.wake.notify_one();
    }

    /// Stops the workers of actions no longer configured.
    pub fn retain(&mut self, keep: &[&ReloadSpec]) {
        self.workers.retain(|spec, (_, task)| {
            let kept = keep.contains(&spec);
            if !kept {
                task.abort();
            }
            kept
        });
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        for (_, task) in self.workers.values() {
            task.abort();
        }
    }
}

async fn worker(spec: ReloadSpec, slot: Arc<Slot>, metrics: Arc<Metrics>, child: ChildPid) {
    loop {
        slot.wake.notified().await;
        let mut attempt: u32 = 0;
        loop {
            let pending = slot.take();
            if pending.bundles.is_empty() {
                break;
            }
            attempt += 1;
            let started = Instant::now();
            let child_pid = *child.lock().unwrap_or_else(|e| e.into_inner());
            let result = attempt_once(&spec, &pending, child_pid).await;
            metrics
                .reload_duration
                .get_or_create(&ActionLabel {
                    action: spec.action.kind(),
                })
                .observe(started.elapsed().as_secs_f64());
            let bundles: Vec<&str> = pending.bundles.iter().map(String::as_str).collect();
            let action = describe(&spec.action);
            match result {
                Ok(detail) => {
                    for b in &bundles {
                        metrics.reload(b, spec.action.kind(), true);
                    }
                    info!(bundles = ?bundles, action = %action, attempt, outcome = "success", detail = %detail, "reloaded");
                    break;
                }
                Err(Failure::Absent(reason)) if pending.startup => {
                    info!(bundles = ?bundles, action = %action, reason = %reason,
                        "reload target does not exist yet; skipped (it reads the fresh output when it starts)");
                    break;
                }
                Err(failure) => {
                    for b in &bundles {
                        metrics.reload(b, spec.action.kind(), false);
                    }
                    let exhausted = spec.retries.is_some_and(|r| attempt > r);
                    if exhausted {
                        warn!(bundles = ?bundles, action = %action, attempt, outcome = "failure", error = %failure,
                            "reload failed; no retries left");
                        break;
                    }
                    let backoff = backoff(attempt);
                    warn!(bundles = ?bundles, action = %action, attempt, outcome = "failure", error = %failure,
                        retry_in = %humantime::format_duration(backoff), "reload failed; will retry");
                    slot.put_back(Pending {
                        startup: false,
                        ..pending
                    });
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        // A newer render supersedes the retries: start afresh.
                        () = slot.wake.notified() => attempt = 0,
                    }
                }
            }
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

fn describe(action: &ReloadAction) -> String {
    match action {
        ReloadAction::Signal { signal, target } => format!("signal {signal} to {target:?}"),
        ReloadAction::Exec(argv) => format!("exec {argv:?}"),
        ReloadAction::Http { url, method } => format!("http {method} {url}"),
        ReloadAction::RestartChild => "restart child".into(),
    }
}

async fn attempt_once(
    spec: &ReloadSpec,
    pending: &Pending,
    child: Option<u32>,
) -> Result<String, Failure> {
    match &spec.action {
        ReloadAction::Signal { signal, target } => {
            let pids = signal::send(*signal, target, child)?;
            Ok(format!("pids {pids:?}"))
        }
        ReloadAction::Exec(argv) => {
            let env = [
                (
                    "ANCHORAGE_BUNDLES",
                    join(pending.bundles.iter().map(String::as_str)),
                ),
                (
                    "ANCHORAGE_OUTPUTS",
                    join(
                        pending
                            .outputs
                            .iter()
                            .map(|p| p.to_str().unwrap_or_default()),
                    ),
                ),
            ];
            exec::run(argv, &env, spec.timeout)
                .await
                .map(|()| "exit 0".into())
        }
        ReloadAction::Http { url, method } => http::call(method, url, spec.timeout)
            .await
            .map(|status| format!("status {status}")),
        ReloadAction::RestartChild => Err(Failure::Failed(
            "child restarts are not supported here".into(),
        )),
    }
}

/// Runs `spec` once for a one-shot `render --reload`, retrying as its
/// `retries` allows (none by default: there is no later render to wait for).
pub async fn run_once(
    spec: &ReloadSpec,
    bundles: &[String],
    outputs: &[PathBuf],
) -> Result<String, Failure> {
    let pending = Pending {
        bundles: bundles.iter().cloned().collect(),
        outputs: outputs.iter().cloned().collect(),
        startup: false,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match attempt_once(spec, &pending, None).await {
            Ok(detail) => return Ok(detail),
            Err(e) if spec.retries.is_some_and(|r| attempt <= r) => {
                warn!(action = %describe(&spec.action), attempt, error = %e, "reload failed; will retry");
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// A comma-separated list for the environment.
fn join<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps_at_a_minute() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
