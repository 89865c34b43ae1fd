//! Reload actions: making the application take the new trust.
//!
//! Each distinct [`ReloadSpec`] has one worker task. A request marks it
//! pending (naming the bundles that changed) and wakes it; requests that
//! arrive while it runs coalesce into exactly one more run afterwards, and
//! bundles that changed in the same cycle and share an action run it once
//! (guarantee 4). A failed attempt is logged, counted, and retried with
//! exponential backoff capped at a minute (or `retries` times), and a newer
//! request supersedes the retries. `min_interval` holds a run back until
//! that long after the previous one (an urgent request, an expiry, is never
//! held). A worker that panics is restarted with its request re-queued.
//!
//! Workers never block the event loop: anything that can block (a signal's
//! `/proc` scan, a pid file) runs on the blocking pool. [`Reloader::close`]
//! drains them: what is pending runs once more, retries stop.

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
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::telemetry::metrics::{ActionLabel, Metrics};
use child::ChildHandle;
pub use spec::{Probe, ReloadAction, ReloadSpec, SignalTarget};

const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why a reload attempt did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The target does not exist (yet): at start, the app will read the
    /// fresh output when it starts, so the reload is skipped.
    Absent(Absent),
    /// The attempt failed: what was being done, and why.
    Failed(String),
}

/// Which target is not there, with what names it (a URL is kept redacted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Absent {
    NoPidFile {
        path: PathBuf,
    },
    /// No process has this pid (any more).
    NoProcess {
        pid: u32,
        pid_file: Option<PathBuf>,
    },
    NoProcessNamed {
        name: String,
    },
    /// The supervised child is not running (not yet, or not any more).
    NoChild,
    /// A file to touch does not exist; it is never created.
    NoFile {
        path: PathBuf,
    },
    /// Nothing listens at the address.
    Refused {
        address: String,
    },
    /// The command cannot be found.
    NoProgram {
        program: String,
        reason: String,
    },
    /// The command exited 75 (EX_TEMPFAIL): the app is not there yet.
    NotThereYet {
        program: String,
        said: Option<String>,
    },
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Absent(absent) => absent.fmt(f),
            Self::Failed(m) => f.write_str(m),
        }
    }
}

impl std::fmt::Display for Absent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoPidFile { path } => write!(f, "{}: no pid file", path.display()),
            Self::NoProcess { pid, pid_file } => {
                write!(f, "no process {pid}")?;
                if let Some(path) = pid_file {
                    write!(f, " (from {})", path.display())?;
                }
                Ok(())
            }
            Self::NoProcessNamed { name } => write!(f, "no process is named {name:?}"),
            Self::NoChild => f.write_str("the child is not running"),
            Self::NoFile { path } => {
                write!(f, "{}: no such file (it is never created)", path.display())
            }
            Self::Refused { address } => write!(f, "{address}: connection refused"),
            Self::NoProgram { program, reason } => write!(f, "cannot start {program:?}: {reason}"),
            Self::NotThereYet { program, said } => {
                write!(
                    f,
                    "{program:?} says the app is not there yet (exit 75, EX_TEMPFAIL)"
                )?;
                if let Some(said) = said {
                    write!(f, ": {said}")?;
                }
                Ok(())
            }
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
    /// An expiry: never held back by `min_interval`.
    pub urgent: bool,
}

impl Request {
    fn merge(&mut self, other: Request) {
        let was_empty = self.names.is_empty();
        self.names.extend(other.names);
        self.outputs.extend(other.outputs);
        if other.expect.is_some() {
            self.expect = other.expect;
        }
        self.urgent |= other.urgent;
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
    /// The request being run, put back if the worker panics.
    running: Mutex<Request>,
}

impl Slot {
    fn take(&self) -> Request {
        let request = std::mem::take(&mut *lock(&self.pending));
        *lock(&self.running) = request.clone();
        request
    }

    fn done(&self) {
        *lock(&self.running) = Request::default();
    }

    fn put_back(&self, pending: Request) {
        lock(&self.pending).merge(pending);
    }

    fn is_idle(&self) -> bool {
        lock(&self.pending).names.is_empty()
    }
}

/// A poisoned lock only means a worker panicked while holding it; the
/// request inside is still whole.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What every worker shares.
#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    child: ChildHandle,
    /// `true` once closing: run what is pending once, retry nothing.
    closing: watch::Receiver<bool>,
    /// Failed runs (for `render --reload`'s exit code).
    failures: Arc<std::sync::atomic::AtomicUsize>,
}

/// The running reload workers, one per distinct action.
pub struct Reloader {
    workers: HashMap<ReloadSpec, (Arc<Slot>, JoinHandle<()>)>,
    shared: Shared,
    close: watch::Sender<bool>,
}

impl Reloader {
    pub fn new(metrics: Arc<Metrics>, child: ChildHandle) -> Self {
        let (close, closing) = watch::channel(false);
        Self {
            workers: HashMap::new(),
            shared: Shared {
                metrics,
                child,
                closing,
                failures: Arc::default(),
            },
            close,
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
                    running: Mutex::new(Request::default()),
                });
                let task = tokio::spawn(supervise(spec.clone(), slot.clone(), self.shared.clone()));
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

    /// Drains the workers: what is pending runs once (with the retries its
    /// `retries` allows, none by default), then they end. Waits at most
    /// `grace` (logged if it runs over); returns how many runs failed.
    pub async fn close(mut self, grace: Option<Duration>) -> usize {
        let _ = self.close.send(true);
        let tasks: Vec<JoinHandle<()>> = self.workers.drain().map(|(_, (_, t))| t).collect();
        let all = async {
            for task in tasks {
                let _ = task.await;
            }
        };
        match grace {
            None => all.await,
            Some(grace) => {
                if tokio::time::timeout(grace, all).await.is_err() {
                    warn!(
                        grace = %humantime::format_duration(grace),
                        "reloads still running at the end of the shutdown grace period; leaving them"
                    );
                }
            }
        }
        self.shared
            .failures
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        for (_, task) in self.workers.values() {
            task.abort();
        }
    }
}

/// Runs the worker of `spec`, and again if it panics: the panic is logged
/// and counted, and the request it was running is queued again.
async fn supervise(spec: ReloadSpec, slot: Arc<Slot>, shared: Shared) {
    loop {
        let task = tokio::spawn(worker(spec.clone(), slot.clone(), shared.clone()));
        match task.await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                shared.metrics.reload_panics.inc();
                let running = std::mem::take(&mut *lock(&slot.running));
                error!(action = %spec.action, names = ?running.names,
                    "reload worker panicked; restarting it and queueing its reload again");
                if !running.names.is_empty() {
                    slot.put_back(running);
                    slot.wake.notify_one();
                }
            }
            // Aborted: the action is no longer configured.
            Err(_) => return,
        }
    }
}

async fn worker(spec: ReloadSpec, slot: Arc<Slot>, shared: Shared) {
    let Shared {
        metrics,
        child,
        mut closing,
        failures,
    } = shared;
    let mut last_run: Option<Instant> = None;
    loop {
        if slot.is_idle() {
            if is_closing(&closing) {
                return;
            }
            tokio::select! {
                () = slot.wake.notified() => {}
                _ = closing.wait_for(|c| *c) => continue,
            }
        }
        let mut attempt: u32 = 0;
        loop {
            if slot.is_idle() {
                break;
            }
            // min_interval: hold the run to the interval's end; what
            // arrives meanwhile joins it. An expiry is never held.
            if let (Some(interval), Some(last)) = (spec.min_interval, last_run) {
                let due = last + interval;
                let urgent = lock(&slot.pending).urgent;
                if Instant::now() < due && !urgent && !is_closing(&closing) {
                    metrics
                        .reloads_deferred
                        .get_or_create(&ActionLabel {
                            action: spec.action.kind(),
                        })
                        .inc();
                    info!(action = %spec.action, min_interval = %humantime::format_duration(interval),
                        run_in = %humantime::format_duration(due - Instant::now()),
                        "reload held back by min_interval");
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        // An urgent request may arrive meanwhile.
                        () = slot.wake.notified() => {}
                        _ = closing.wait_for(|c| *c) => {}
                    }
                    continue;
                }
            }
            let pending = slot.take();
            attempt += 1;
            last_run = Some(Instant::now());
            if pending.only_if_stale && already_serving(&spec, &pending).await {
                info!(names = ?pending.names, action = %spec.action,
                    "the app already serves the current certificate; no reload");
                slot.done();
                break;
            }
            debug!(bundles = ?pending.names, action = %spec.action, attempt, "reloading");
            let started = Instant::now();
            let result = match attempt_once(&spec, &pending, &child).await {
                Ok(detail) => prove(&spec, &pending, &metrics).await.map(|()| detail),
                Err(e) => Err(e),
            };
            slot.done();
            metrics
                .reload_duration
                .get_or_create(&ActionLabel {
                    action: spec.action.kind(),
                })
                .observe(started.elapsed().as_secs_f64());
            let bundles: Vec<&str> = pending.names.iter().map(String::as_str).collect();
            let action = &spec.action;
            let min_interval = spec
                .min_interval
                .map(|d| humantime::format_duration(d).to_string());
            match result {
                Ok(detail) => {
                    for b in &bundles {
                        metrics.reload(b, spec.action.kind(), true);
                    }
                    info!(bundles = ?bundles, action = %action, attempt, outcome = "success",
                        detail = %detail, min_interval, "reloaded");
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
                    // Closing: no open-ended retries, only those configured.
                    let allowed = match (spec.retries, is_closing(&closing)) {
                        (Some(r), _) => Some(r),
                        (None, true) => Some(0),
                        (None, false) => None,
                    };
                    if allowed.is_some_and(|r| attempt > r) {
                        failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                    let was_closing = is_closing(&closing);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        // A newer render supersedes the retries: start afresh.
                        () = slot.wake.notified() => attempt = 0,
                        // Closing now: one more try at once, then no more.
                        _ = closing.wait_for(|c| *c), if !was_closing => {}
                    }
                    // The retry is not held back by min_interval.
                    last_run = None;
                }
            }
        }
    }
}

/// Closing, or the reloader is gone.
fn is_closing(closing: &watch::Receiver<bool>) -> bool {
    *closing.borrow() || closing.has_changed().is_err()
}

fn backoff(attempt: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
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
        // It starts after the first render and reads the fresh output.
        return Err(Failure::Absent(Absent::NoChild));
    }
    match &spec.action {
        ReloadAction::Signal { signal, target } => {
            // A pid file read and a `/proc` scan: off the async runtime.
            let (signal, target, child) = (*signal, target.clone(), child.pid());
            let pids = tokio::task::spawn_blocking(move || signal::send(signal, &target, child))
                .await
                .map_err(|e| Failure::Failed(format!("signal: {e}")))??;
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
        ReloadAction::Touch(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || touch::run(&path))
                .await
                .map_err(|e| Failure::Failed(format!("touch: {e}")))?
                .map(|()| "modification time updated".into())
        }
        ReloadAction::RestartChild => child
            .restart(spec.timeout)
            .await
            .map(|pid| format!("child restarted as pid {pid}")),
    }
}

/// A comma-separated list for the environment.
fn join<'a>(items: impl Iterator<Item = &'a str>) -> String {
    items.collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec(script: &str) -> ReloadSpec {
        ReloadSpec {
            action: ReloadAction::Exec(vec!["sh".into(), "-c".into(), script.into()]),
            timeout: Duration::from_secs(10),
            retries: None,
            probe: None,
            probe_timeout: Duration::from_secs(1),
            min_interval: None,
        }
    }

    fn named(name: &str) -> Request {
        Request {
            names: [name.to_owned()].into(),
            ..Request::default()
        }
    }

    #[tokio::test]
    async fn a_panicking_worker_is_restarted_and_its_reload_queued_again() {
        let metrics = Arc::new(Metrics::new());
        let slot = Arc::new(Slot {
            wake: Notify::new(),
            pending: Mutex::new(Request::default()),
            running: Mutex::new(Request::default()),
        });
        // As if the worker had taken this request and then panicked.
        slot.put_back(named("peers"));
        let _ = slot.take();
        let (_close, closing) = watch::channel(false);
        let shared = Shared {
            metrics: metrics.clone(),
            child: ChildHandle::default(),
            closing,
            failures: Arc::default(),
        };
        let spec = exec("exit 0");
        let panicking = tokio::spawn(async { panic!("worker bug") });
        assert!(panicking.await.expect_err("panicked").is_panic());
        // supervise's recovery path, on the slot the panic left behind.
        metrics.reload_panics.inc();
        let running = std::mem::take(&mut *lock(&slot.running));
        slot.put_back(running);
        assert!(!slot.is_idle(), "the request is queued again");
        let task = tokio::spawn(supervise(spec, slot.clone(), shared));
        slot.wake.notify_one();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !slot.is_idle() || !lock(&slot.running).names.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the re-queued reload ran");
        task.abort();
        assert_eq!(metrics.reload_panics.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn min_interval_runs_changes_inside_it_once_at_its_end() {
        // A touch runs on the blocking pool, which holds tokio's paused
        // clock still while it runs (an exec's wait would let it jump).
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("dynamic.yml");
        std::fs::write(&file, "").expect("write");
        let spec = ReloadSpec {
            action: ReloadAction::Touch(file),
            min_interval: Some(Duration::from_secs(60)),
            ..exec("true")
        };
        let metrics = Arc::new(Metrics::new());
        let mut reloader = Reloader::new(metrics.clone(), ChildHandle::default());
        let runs = || {
            ["a", "b", "c", "d", "e"]
                .iter()
                .map(|b| {
                    metrics
                        .reloads
                        .get_or_create(&crate::telemetry::metrics::ReloadLabels {
                            bundle: (*b).to_owned(),
                            action: "touch",
                            result: "success",
                        })
                        .get()
                })
                .max()
                .unwrap_or(0) as usize
        };
        reloader.request(&spec, named("a"));
        wait_for(|| runs() == 1).await;
        let counted = |name: &str| {
            metrics
                .reloads
                .get_or_create(&crate::telemetry::metrics::ReloadLabels {
                    bundle: name.to_owned(),
                    action: "touch",
                    result: "success",
                })
                .get()
        };
        let first = Instant::now();
        // Three changes inside the interval: held, then one run.
        for name in ["b", "c", "d"] {
            reloader.request(&spec, named(name));
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        wait_for(|| counted("d") == 1).await;
        assert!(
            first.elapsed() >= Duration::from_secs(60),
            "{:?}",
            first.elapsed()
        );
        // One run served the three: each counted once, none twice.
        assert_eq!((counted("b"), counted("c")), (1, 1));
        // An expiry is never held back.
        let before = Instant::now();
        reloader.request(
            &spec,
            Request {
                urgent: true,
                ..named("e")
            },
        );
        wait_for(|| counted("e") == 1).await;
        assert!(
            before.elapsed() < Duration::from_secs(60),
            "{:?}",
            before.elapsed()
        );
        assert!(
            metrics
                .reloads_deferred
                .get_or_create(&ActionLabel { action: "touch" })
                .get()
                >= 1
        );
        assert_eq!(reloader.close(Some(Duration::from_secs(5))).await, 0);
    }

    /// Polls `check` on tokio's clock (paused: it advances by itself while
    /// the exec runs).
    async fn wait_for(check: impl Fn() -> bool) {
        for _ in 0..100_000 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition never held");
    }

    #[test]
    fn backoff_doubles_and_caps_at_a_minute() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
