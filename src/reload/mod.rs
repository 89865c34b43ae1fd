//! Reload actions: making the application take the new trust.
//!
//! Each distinct [`ReloadSpec`] has one worker task. A request marks it
//! pending (naming the bundles that changed) and wakes it; requests that
//! arrive while it runs coalesce into exactly one more run afterwards, and
//! bundles that changed in the same cycle and share an action run it once
//! (guarantee 4). A failed attempt is logged, counted, and retried with
//! exponential backoff capped at a minute (or `retries` times), and a newer
//! request supersedes the retries. Workers never block the event loop.

pub mod child;
pub mod exec;
pub mod http;
pub mod probe;
pub mod signal;
pub mod spec;
pub mod touch;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::telemetry::metrics::{ActionLabel, Metrics};
use child::ChildHandle;
pub use spec::{Probe, ReloadAction, ReloadSpec, SignalTarget};

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

/// What a run is asked for.
#[derive(Debug, Default, Clone)]
pub struct Request {
    /// The bundles and key pairs that changed.
    pub names: BTreeSet<String>,
    /// Their outputs (or a key pair's certificate path).
    pub outputs: BTreeSet<PathBuf>,
    /// From the first render: a target that does not exist yet is skipped.
    pub startup: bool,
    /// The certificate the app must serve afterwards (a key pair's leaf).
    pub expect: Option<Vec<u8>>,
    /// Probe first and run the action only if the app serves another
    /// certificate (a key pair at start).
    pub only_if_stale: bool,
}

impl Request {
    fn merge(&mut self, other: Request) {
        let was_empty = self.names.is_empty();
        self.names.extend(other.names);
        self.outputs.extend(other.outputs);
        if other.expect.is_some() {
            self.expect = other.expect;
        }
        if was_empty {
            self.startup = other.startup;
            self.only_if_stale = other.only_if_stale;
        } else {
            self.startup &= other.startup;
            self.only_if_stale &= other.only_if_stale;
        }
    }
}

struct Slot {
    wake: Notify,
    pending: Mutex<Request>,
}

impl Slot {
    fn take(&self) -> Request {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn put_back(&self, pending: Request) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(pending);
    }
}

/// The running reload workers, one per distinct action.
pub struct Reloader {
    workers: HashMap<ReloadSpec, (Arc<Slot>, JoinHandle<()>)>,
    metrics: Arc<Metrics>,
    child: ChildHandle,
}

impl Reloader {
    pub fn new(metrics: Arc<Metrics>, child: ChildHandle) -> Self {
        Self {
            workers: HashMap::new(),
            metrics,
            child,
        }
    }

    /// Asks for `spec` to run for `request`.
    pub fn request(&mut self, spec: &ReloadSpec, request: Request) {
        let slot = match self.workers.get(spec) {
            Some((slot, _)) => slot.clone(),
            None => {
                let slot = Arc::new(Slot {
                    wake: Notify::new(),
                    pending: Mutex::new(Request::default()),
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
        slot.put_back(request);
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

async fn worker(spec: ReloadSpec, slot: Arc<Slot>, metrics: Arc<Metrics>, child: ChildHandle) {
    loop {
        slot.wake.notified().await;
        let mut attempt: u32 = 0;
        loop {
            let pending = slot.take();
            if pending.names.is_empty() {
                break;
            }
            attempt += 1;
            if pending.only_if_stale && already_serving(&spec, &pending).await {
                info!(names = ?pending.names, action = %describe(&spec.action),
                    "the app already serves the current certificate; no reload");
                break;
            }
            let started = Instant::now();
            let result = match attempt_once(&spec, &pending, &child).await {
                Ok(detail) => prove(&spec, &pending, &metrics).await.map(|()| detail),
                Err(e) => Err(e),
            };
            metrics
                .reload_duration
                .get_or_create(&ActionLabel {
                    action: spec.action.kind(),
                })
                .observe(started.elapsed().as_secs_f64());
            let bundles: Vec<&str> = pending.names.iter().map(String::as_str).collect();
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
                    slot.put_back(Request {
                        startup: false,
                        only_if_stale: false,
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
    action.to_string()
}

/// After the action: the probe, if any, must see the app take the change.
async fn prove(spec: &ReloadSpec, request: &Request, metrics: &Metrics) -> Result<(), Failure> {
    let Some(probe) = &spec.probe else {
        return Ok(());
    };
    let result = match probe {
        Probe::Tls(addr) => probe::tls(addr, request.expect.as_deref(), spec.probe_timeout).await,
        Probe::Http(url) => probe::http(url, spec.probe_timeout).await,
    };
    for name in &request.names {
        metrics.probed(name, result.is_ok());
    }
    match result {
        Ok(()) => {
            info!(names = ?request.names, probe = %probe, "probe: the app took the change");
            Ok(())
        }
        Err(e) => Err(Failure::Failed(format!(
            "the reload ran but the probe says the app did not take it: {e}"
        ))),
    }
}

/// Whether the app already serves the expected certificate (a key pair at
/// start): only a TLS probe can tell.
async fn already_serving(spec: &ReloadSpec, request: &Request) -> bool {
    let (Some(Probe::Tls(addr)), Some(expect)) = (&spec.probe, &request.expect) else {
        return true;
    };
    let (addr, expect) = (addr.clone(), expect.clone());
    tokio::task::spawn_blocking(move || match probe::served_certificate(&addr) {
        Ok(served) => served == expect,
        // Not up yet: it loads the current pair when it starts.
        Err(Failure::Absent(_)) => true,
        Err(Failure::Failed(_)) => false,
    })
    .await
    .unwrap_or(false)
}

async fn attempt_once(
    spec: &ReloadSpec,
    pending: &Request,
    child: &ChildHandle,
) -> Result<String, Failure> {
    if pending.startup && spec.action.targets_child() {
        return Err(Failure::Absent(
            "the child starts after the first render and reads the fresh output".into(),
        ));
    }
    match &spec.action {
        ReloadAction::Signal { signal, target } => {
            let pids = signal::send(*signal, target, child.pid())?;
            Ok(format!("pids {pids:?}"))
        }
        ReloadAction::Exec(argv) => {
            let env = [
                (
                    "ANCHORAGE_BUNDLES",
                    join(pending.names.iter().map(String::as_str)),
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
        ReloadAction::Http {
            url,
            method,
            bearer_token_file,
        } => http::call(method, url, bearer_token_file.as_deref(), spec.timeout)
            .await
            .map(|status| format!("status {status}")),
        ReloadAction::Touch(path) => touch::run(path).map(|()| "modification time updated".into()),
        ReloadAction::RestartChild => child
            .restart(spec.timeout)
            .await
            .map(|pid| format!("child restarted as pid {pid}")),
    }
}

/// Runs `spec` once for a one-shot `render --reload`, retrying as its
/// `retries` allows (none by default: there is no later render to wait for).
pub async fn run_once(
    spec: &ReloadSpec,
    bundles: &[String],
    outputs: &[PathBuf],
) -> Result<String, Failure> {
    let pending = Request {
        names: bundles.iter().cloned().collect(),
        outputs: outputs.iter().cloned().collect(),
        ..Request::default()
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match attempt_once(spec, &pending, &ChildHandle::default()).await {
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
