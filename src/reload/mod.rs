//! Reload actions: making the application take the new trust.
//!
//! Each distinct [`ReloadSpec`] has one worker task. A request marks it
//! pending (naming the bundles that changed) and wakes it; requests that
//! arrive while it runs coalesce into exactly one more run afterwards, and
//! bundles that changed in the same cycle and share an action run it once
//! (guarantee 4). A failed attempt is logged, counted, and retried with
//! exponential backoff capped at a minute (or `retries` times), and a newer
//! request supersedes the retries. `min_interval` holds a run back until
//! that long after the previous one, a retry's too (an urgent request, an
//! expiry, is never held). A worker that panics is restarted with its request re-queued.
//!
//! Workers never block the event loop: anything that can block (a signal's
//! `/proc` scan, a pid file) runs on the blocking pool. [`Reloader::close`]
//! drains them: what is pending runs once more, retries stop.
//!
//! A render may run its bundle's action itself, on the render's own thread
//! ([`Direct`]): a signal then leaves the moment the outputs are in place,
//! without crossing to the loop and back to the blocking pool. Only a
//! signal with no probe and no `min_interval`, named by that one bundle
//! alone, does, never at start, and only while nothing else holds the
//! action (`Claim`: the worker running, a request pending, a retry
//! waiting); otherwise the worker gets the request as usual. A direct
//! failure is counted as the first attempt and its retry handed to the
//! worker; at shutdown the worker waits for a direct run in flight.

pub mod child;
pub mod exec;
pub mod http;
pub mod probe;
pub mod signal;
pub mod spec;
pub mod touch;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
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
    /// The pid file names a process that started after it was written:
    /// its writer is gone and the pid is someone else's now.
    StalePid {
        pid: u32,
        pid_file: PathBuf,
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
            Self::StalePid { pid, pid_file } => write!(
                f,
                "{}: pid {pid} is stale: that process started after the pid file was written (recycled pid)",
                pid_file.display()
            ),
            Self::NoChild => f.write_str("the child is not running"),
            Self::NoFile { path } => {
                write!(f, "{}: no such file (it is never created)", path.display())
            }
            Self::Refused { address } => write!(f, "{address}: connection refused"),
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
    /// The same request, queued again after a failed attempt: no longer
    /// the first render's, and no longer probed first.
    fn retry(self) -> Self {
        Self {
            startup: false,
            only_if_stale: false,
            ..self
        }
    }

    /// Takes `other` in too: one run for both.
    pub fn merge(&mut self, other: Request) {
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
    /// Who runs the action now. Locked before `pending` where both are.
    claim: Mutex<Claim>,
}

/// One run of an action at a time: the worker's or a render's own.
#[derive(Default)]
struct Claim {
    /// The worker runs this request (put back if the worker panics).
    worker: Option<Request>,
    /// A render's thread runs the action (its `Claimed` holds the request).
    direct: bool,
    /// A direct run failed: the worker retries at this instant, as its
    /// second attempt.
    retry_at: Option<Instant>,
    /// A request came since the worker last took one: it supersedes a
    /// retry's wait (a wake alone may be a permit left from before).
    fresh: bool,
}

impl Slot {
    fn new() -> Self {
        Self {
            wake: Notify::new(),
            pending: Mutex::new(Request::default()),
            claim: Mutex::new(Claim::default()),
        }
    }

    /// The worker takes what is pending, unless a direct run holds the
    /// action (it wakes the worker when it is done).
    fn take(&self) -> Option<Request> {
        let mut claim = lock(&self.claim);
        if claim.direct {
            return None;
        }
        claim.fresh = false;
        // What it takes supersedes a direct run's retry.
        claim.retry_at = None;
        let request = std::mem::take(&mut *lock(&self.pending));
        claim.worker = Some(request.clone());
        Some(request)
    }

    /// The worker's run is over; `retry` goes back in the same step, so
    /// no direct run slips in between.
    fn done(&self, retry: Option<Request>) {
        let mut claim = lock(&self.claim);
        claim.worker = None;
        if let Some(retry) = retry {
            lock(&self.pending).merge(retry);
        }
    }

    /// The run that panicked: queued again in the same step as the action
    /// is freed; returns what it was running.
    fn requeue_abandoned(&self) -> Request {
        let mut claim = lock(&self.claim);
        let running = claim.worker.take().unwrap_or_default();
        if !running.names.is_empty() {
            lock(&self.pending).merge(running.clone());
        }
        running
    }

    /// A render's thread claims the action: for a run whose configuration
    /// is still in force (`valid`, checked under the lock so that a closing
    /// worker sees the claim), with nothing running, pending or waiting for
    /// a retry. Otherwise (`Busy`) the request is queued for the worker,
    /// which the caller wakes.
    /// `plain`: a request a direct run may serve (not the first render's).
    fn claim_direct(&self, request: &Request, plain: bool, valid: impl Fn() -> bool) -> Claiming {
        let mut claim = lock(&self.claim);
        if !valid() {
            return Claiming::Stale;
        }
        if !plain
            || claim.worker.is_some()
            || claim.direct
            || claim.retry_at.is_some()
            || !self.is_idle()
        {
            // Queued in the same step: a closing worker that finds nothing
            // pending after this cannot have missed it.
            claim.fresh = true;
            lock(&self.pending).merge(request.clone());
            return Claiming::Busy;
        }
        claim.direct = true;
        Claiming::Claimed
    }

    /// The direct run is over; a failure leaves its retry to the worker,
    /// which is woken either way (at shutdown it waits for this).
    fn release_direct(&self, retry: Option<(Request, Instant)>) {
        let mut claim = lock(&self.claim);
        claim.direct = false;
        if let Some((retry, at)) = retry {
            claim.retry_at = Some(at);
            lock(&self.pending).merge(retry);
        }
        drop(claim);
        self.wake.notify_one();
    }

    fn direct_running(&self) -> bool {
        lock(&self.claim).direct
    }

    /// The retry a failed direct run left, if any.
    fn take_retry(&self) -> Option<Instant> {
        lock(&self.claim).retry_at.take()
    }

    /// Queues `request` for the worker; a permit is stored if it is busy:
    /// exactly one more run.
    fn queue(&self, request: Request) {
        let mut claim = lock(&self.claim);
        claim.fresh = true;
        lock(&self.pending).merge(request);
        drop(claim);
        self.wake.notify_one();
    }

    /// Whether a request came since the worker last took one.
    fn take_fresh(&self) -> bool {
        std::mem::take(&mut lock(&self.claim).fresh)
    }

    fn is_idle(&self) -> bool {
        lock(&self.pending).names.is_empty()
    }
}

/// What a direct claim found.
#[derive(Debug, PartialEq, Eq)]
enum Claiming {
    Claimed,
    /// The worker holds the action: it gets the request.
    Busy,
    /// The configuration changed since the run started, or closing: the
    /// run's outcome goes to the loop, which decides.
    Stale,
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
    /// The actions only one bundle or key pair names (see [`Direct`]).
    lone: HashSet<ReloadSpec>,
    /// Counts [`Reloader::retain`] calls: a direct run made under an
    /// earlier configuration leaves its reloads to the loop.
    epoch: Arc<AtomicU64>,
    shared: Shared,
    close: watch::Sender<bool>,
}

impl Reloader {
    pub fn new(metrics: Arc<Metrics>, child: ChildHandle) -> Self {
        let (close, closing) = watch::channel(false);
        Self {
            workers: HashMap::new(),
            lone: HashSet::new(),
            epoch: Arc::default(),
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
        self.slot(spec).queue(request);
    }

    /// A handle that runs `spec` on a render's own thread when its worker
    /// is idle (see [`Direct`]); `None` for an action that must go through
    /// its worker (not a signal, a probe, `min_interval`, named by more
    /// than one bundle or key pair, closing).
    pub fn direct(&mut self, spec: &ReloadSpec) -> Option<Direct> {
        let ReloadAction::Signal { signal, target } = &spec.action else {
            return None;
        };
        let eligible = spec.probe.is_none()
            && spec.min_interval.is_none()
            && self.lone.contains(spec)
            && !is_closing(&self.shared.closing);
        eligible.then(|| Direct {
            spec: spec.clone(),
            signal: (*signal, target.clone()),
            slot: self.slot(spec),
            shared: self.shared.clone(),
            epoch: (self.epoch.clone(), self.epoch.load(Ordering::SeqCst)),
        })
    }

    /// The slot of `spec`'s worker, started on first use.
    fn slot(&mut self, spec: &ReloadSpec) -> Arc<Slot> {
        if let Some((slot, _)) = self.workers.get(spec) {
            return slot.clone();
        }
        let slot = Arc::new(Slot::new());
        let task = tokio::spawn(supervise(spec.clone(), slot.clone(), self.shared.clone()));
        self.workers.insert(spec.clone(), (slot.clone(), task));
        slot
    }

    /// Takes the actions now configured, one entry per bundle or key pair
    /// naming it: the workers of those gone stop, which are lone is known
    /// afresh, and a render in flight no longer runs its reload directly.
    pub fn retain(&mut self, keep: &[&ReloadSpec]) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let mut users: HashMap<&ReloadSpec, usize> = HashMap::new();
        for spec in keep {
            *users.entry(spec).or_default() += 1;
        }
        self.lone = users
            .iter()
            .filter(|(_, n)| **n == 1)
            .map(|(spec, _)| (*spec).clone())
            .collect();
        self.workers.retain(|spec, (_, task)| {
            let kept = users.contains_key(spec);
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
        // Aborting this task (the action is gone) aborts the worker too.
        let mut task = AbortOnDrop(tokio::spawn(worker(
            spec.clone(),
            slot.clone(),
            shared.clone(),
        )));
        match (&mut task.0).await {
            Ok(()) => return,
            Err(e) if e.is_panic() => {
                shared.metrics.reload_panics.inc();
                let running = slot.requeue_abandoned();
                error!(action = %spec.action, names = ?running.names,
                    "reload worker panicked; restarting it and queueing its reload again");
                slot.wake.notify_one();
            }
            // Aborted: the action is no longer configured.
            Err(_) => return,
        }
    }
}

/// A task that is aborted when this is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn worker(spec: ReloadSpec, slot: Arc<Slot>, shared: Shared) {
    let mut closing = shared.closing.clone();
    let mut last_run: Option<Instant> = None;
    loop {
        if slot.is_idle() {
            if is_closing(&closing) {
                // A render's thread still runs the action: its failure
                // comes back here, within the shutdown grace.
                if slot.direct_running() {
                    slot.wake.notified().await;
                    continue;
                }
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
            // A direct run failed: its retry is this worker's second attempt.
            if let Some(at) = slot.take_retry() {
                attempt = 1;
                if retry_wait(&slot, &mut closing, at).await {
                    attempt = 0;
                }
                continue;
            }
            // min_interval: hold the run to the interval's end; what
            // arrives meanwhile joins it. An expiry is never held.
            if let (Some(interval), Some(last)) = (spec.min_interval, last_run) {
                let due = last + interval;
                let urgent = lock(&slot.pending).urgent;
                if Instant::now() < due && !urgent && !is_closing(&closing) {
                    shared
                        .metrics
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
            let Some(pending) = slot.take() else {
                // A render's thread runs the action; it wakes us when done.
                slot.wake.notified().await;
                continue;
            };
            attempt += 1;
            last_run = Some(Instant::now());
            if pending.only_if_stale
                && let Some(why) = no_reload_needed(&spec, &pending).await
            {
                info!(names = ?pending.names, action = %spec.action, "{why}; no reload");
                slot.done(None);
                break;
            }
            debug!(bundles = ?pending.names, action = %spec.action, attempt, "reloading");
            let started = Instant::now();
            let result = match attempt_once(&spec, &pending, &shared.child).await {
                Ok(detail) => prove(&spec, &pending, &shared.metrics)
                    .await
                    .map(|()| detail),
                Err(e) => Err(e),
            };
            match record(&spec, &shared, &pending, attempt, started, result) {
                Next::Done => {
                    slot.done(None);
                    break;
                }
                Next::Retry(backoff) => {
                    slot.done(Some(pending.retry()));
                    if retry_wait(&slot, &mut closing, Instant::now() + backoff).await {
                        attempt = 0;
                    }
                }
            }
        }
    }
}

/// Waits for a retry's instant; returns whether a newer request came
/// first (it supersedes the retries: they start afresh).
async fn retry_wait(slot: &Slot, closing: &mut watch::Receiver<bool>, at: Instant) -> bool {
    let was_closing = is_closing(closing);
    // One that came while the attempt ran (its wake may be spent).
    if slot.take_fresh() {
        return true;
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(at) => return false,
            () = slot.wake.notified() => if slot.take_fresh() {
                return true;
            },
            // Closing now: one more try at once, then no more.
            _ = closing.wait_for(|c| *c), if !was_closing => return false,
        }
    }
}

/// What follows an attempt.
enum Next {
    Done,
    /// Retry after this backoff.
    Retry(Duration),
}

/// Logs and counts the result of attempt number `attempt` (from 1) of
/// `spec` for `pending`, started at `started`; says whether to retry.
fn record(
    spec: &ReloadSpec,
    shared: &Shared,
    pending: &Request,
    attempt: u32,
    started: Instant,
    result: Result<String, Failure>,
) -> Next {
    let metrics = &shared.metrics;
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
            Next::Done
        }
        Err(Failure::Absent(reason)) if pending.startup => {
            info!(bundles = ?bundles, action = %action, reason = %reason,
                "reload target does not exist yet; skipped (it reads the fresh output when it starts)");
            Next::Done
        }
        Err(failure) => {
            for b in &bundles {
                metrics.reload(b, spec.action.kind(), false);
            }
            // Closing: no open-ended retries, only those configured.
            let allowed = match (spec.retries, is_closing(&shared.closing)) {
                (Some(r), _) => Some(r),
                (None, true) => Some(0),
                (None, false) => None,
            };
            if allowed.is_some_and(|r| attempt > r) {
                shared
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                warn!(bundles = ?bundles, action = %action, attempt, outcome = "failure", error = %failure,
                    "reload failed; no retries left");
                return Next::Done;
            }
            // A retry is a run too: min_interval keeps it that far from the
            // attempt that failed.
            let backoff = backoff(attempt).max(spec.min_interval.unwrap_or_default());
            warn!(bundles = ?bundles, action = %action, attempt, outcome = "failure", error = %failure,
                retry_in = %humantime::format_duration(backoff), "reload failed; will retry");
            Next::Retry(backoff)
        }
    }
}

/// A reload run on the thread of the render that asked for it, when the
/// action's worker is idle (see the module's documentation).
#[derive(Clone)]
pub struct Direct {
    spec: ReloadSpec,
    /// The spec's action.
    signal: (Signal, SignalTarget),
    slot: Arc<Slot>,
    shared: Shared,
    /// The reloader's configuration count, and its value when this was made.
    epoch: (Arc<AtomicU64>, u64),
}

/// What [`Direct::claim`] did with a request.
pub enum DirectClaim {
    /// This thread runs it: [`Claimed::run`].
    Claimed(Box<Claimed>),
    /// The worker holds the action and got the request.
    Queued,
    /// The configuration changed since the run started (SIGHUP), or the
    /// daemon is closing: nothing was done; the loop decides.
    Declined,
}

/// The action, claimed for a direct run. Dropped without [`Claimed::run`]
/// (a panic), it frees the action and leaves the request to the worker.
pub struct Claimed {
    direct: Direct,
    request: Option<Request>,
}

impl Direct {
    pub fn spec(&self) -> &ReloadSpec {
        &self.spec
    }

    /// Claims the action for `request` if nothing else holds it; a busy
    /// worker (or the first render's request, which the worker decides)
    /// gets the request, as from [`Reloader::request`]. Never blocks.
    pub fn claim(self, request: Request) -> DirectClaim {
        let (count, made) = (&self.epoch.0, self.epoch.1);
        let valid = || count.load(Ordering::SeqCst) == made && !is_closing(&self.shared.closing);
        let plain = !request.startup && !request.only_if_stale;
        match self.slot.claim_direct(&request, plain, valid) {
            Claiming::Claimed => DirectClaim::Claimed(Box::new(Claimed {
                direct: self,
                request: Some(request),
            })),
            Claiming::Busy => {
                self.slot.wake.notify_one();
                DirectClaim::Queued
            }
            Claiming::Stale => DirectClaim::Declined,
        }
    }
}

impl Claimed {
    /// Runs the action on this thread, records it like the worker does,
    /// and releases the action (a failure's retry goes to the worker).
    /// Blocking: call it from the blocking pool.
    pub fn run(mut self) {
        let Some(request) = self.request.clone() else {
            return;
        };
        let direct = &self.direct;
        debug!(bundles = ?request.names, action = %direct.spec.action, attempt = 1, "reloading");
        let started = Instant::now();
        let (signal, target) = &direct.signal;
        let result = send_signal(*signal, target, direct.shared.child.pid());
        let retry = match record(&direct.spec, &direct.shared, &request, 1, started, result) {
            Next::Done => None,
            Next::Retry(backoff) => Some((request.retry(), Instant::now() + backoff)),
        };
        self.request = None;
        self.direct.slot.release_direct(retry);
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            self.direct
                .slot
                .release_direct(Some((request, Instant::now())));
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

/// Why a key pair's reload at start is not needed (`None`: it is), for
/// its log line: the probe sees the app serve the current certificate, or
/// nothing answers it yet (the app loads the current pair when it starts),
/// or there is no probe to say otherwise.
async fn no_reload_needed(spec: &ReloadSpec, request: &Request) -> Option<String> {
    let (Some(Probe::Tls(addr)), Some(expect)) = (&spec.probe, &request.expect) else {
        return Some("no probe shows the app serving another certificate".into());
    };
    let (addr, expect) = (addr.clone(), expect.clone());
    tokio::task::spawn_blocking(move || match probe::served_certificate(&addr) {
        Ok(served) if served == expect => {
            Some("the app already serves the current certificate".into())
        }
        Ok(_) => None,
        Err(Failure::Absent(why)) => Some(format!(
            "nothing answers the probe yet ({why}): the app loads the current pair when it starts"
        )),
        Err(Failure::Failed(_)) => None,
    })
    .await
    .unwrap_or(None)
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
            tokio::task::spawn_blocking(move || send_signal(signal, &target, child))
                .await
                .map_err(|e| Failure::Failed(format!("signal: {e}")))?
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

/// Sends `signal` to what `target` names now; the detail for the log line.
/// Blocking: a pid file read, a `/proc` scan.
fn send_signal(
    signal: Signal,
    target: &SignalTarget,
    child: Option<u32>,
) -> Result<String, Failure> {
    signal::send(signal, target, child).map(|pids| format!("pids {pids:?}"))
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
        let slot = Arc::new(Slot::new());
        // As if the worker had taken this request and then panicked.
        slot.queue(named("peers"));
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
        slot.requeue_abandoned();
        assert!(!slot.is_idle(), "the request is queued again");
        let task = tokio::spawn(supervise(spec, slot.clone(), shared));
        slot.wake.notify_one();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !slot.is_idle() || lock(&slot.claim).worker.is_some() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the re-queued reload ran");
        task.abort();
        assert_eq!(metrics.reload_panics.get(), 1);
    }

    /// A retry is a run: it too comes `min_interval` after the run that
    /// failed, not at the backoff's half second.
    #[tokio::test(start_paused = true)]
    async fn min_interval_keeps_a_retry_that_far_from_the_run_that_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Missing: the first run fails.
        let file = dir.path().join("dynamic.yml");
        let spec = ReloadSpec {
            action: ReloadAction::Touch(file.clone()),
            min_interval: Some(Duration::from_secs(60)),
            ..exec("true")
        };
        let metrics = Arc::new(Metrics::new());
        let mut reloader = Reloader::new(metrics.clone(), ChildHandle::default());
        reloader.request(&spec, named("a"));
        wait_for(|| metrics.reloads("a", "touch", false) == 1).await;
        let failed = Instant::now();
        std::fs::write(&file, "").expect("write");
        wait_for(|| metrics.reloads("a", "touch", true) == 1).await;
        assert!(
            failed.elapsed() >= Duration::from_secs(59),
            "retried after {:?}",
            failed.elapsed()
        );
        assert_eq!(metrics.reloads("a", "touch", false), 1);
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
                .map(|b| metrics.reloads(b, "touch", true))
                .max()
                .unwrap_or(0) as usize
        };
        reloader.request(&spec, named("a"));
        wait_for(|| runs() == 1).await;
        let counted = |name: &str| metrics.reloads(name, "touch", true);
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

    /// A SIGCONT to a `sleep` whose pid file is written after it started:
    /// the process, the spec, and the directory holding the pid file.
    fn sleeper() -> (std::process::Child, ReloadSpec, tempfile::TempDir) {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("app.pid");
        std::fs::write(&pid_file, format!("{}\n", child.id())).expect("pid file");
        let spec = ReloadSpec {
            action: ReloadAction::Signal {
                signal: nix::sys::signal::Signal::SIGCONT,
                target: SignalTarget::PidFile(pid_file),
            },
            ..exec("true")
        };
        (child, spec, dir)
    }

    fn signals(metrics: &Metrics, name: &str, result: &'static str) -> u64 {
        metrics.reloads(name, "signal", result == "success")
    }

    /// The runtime is only entered, never driven, while a direct run is
    /// made: the worker cannot run, so whatever ran, ran on the caller's
    /// thread.
    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    }

    /// A reloader where `spec` is named once (a lone action).
    fn lone(metrics: &Arc<Metrics>, spec: &ReloadSpec) -> Reloader {
        let mut reloader = Reloader::new(metrics.clone(), ChildHandle::default());
        reloader.retain(&[spec]);
        reloader
    }

    /// A lone SIGCONT to a live `sleep` (killed when this drops): its
    /// reloader and a direct handle, made on a paused runtime that the test
    /// then only enters while it makes direct runs.
    struct LoneSignal {
        reloader: Reloader,
        direct: Direct,
        spec: ReloadSpec,
        metrics: Arc<Metrics>,
        rt: tokio::runtime::Runtime,
        app: std::process::Child,
        dir: tempfile::TempDir,
    }

    impl LoneSignal {
        fn new() -> Self {
            let (app, spec, dir) = sleeper();
            let rt = paused_runtime();
            let metrics = Arc::new(Metrics::new());
            let (reloader, direct) = {
                let _entered = rt.enter();
                let mut reloader = lone(&metrics, &spec);
                let direct = reloader.direct(&spec).expect("a lone signal may go direct");
                (reloader, direct)
            };
            Self {
                reloader,
                direct,
                spec,
                metrics,
                rt,
                app,
                dir,
            }
        }

        fn signals(&self, name: &str, result: &'static str) -> u64 {
            signals(&self.metrics, name, result)
        }

        /// The reloader, to close it (an idle one stays behind).
        fn take_reloader(&mut self) -> Reloader {
            let idle = Reloader::new(Arc::default(), ChildHandle::default());
            std::mem::replace(&mut self.reloader, idle)
        }
    }

    impl Drop for LoneSignal {
        fn drop(&mut self) {
            let _ = self.app.kill();
            let _ = self.app.wait();
        }
    }

    /// What a render's thread does: claim, then run if claimed; whether it
    /// ran here.
    fn direct_run(direct: &Direct, request: Request) -> bool {
        match direct.clone().claim(request) {
            DirectClaim::Claimed(claimed) => {
                claimed.run();
                true
            }
            DirectClaim::Queued | DirectClaim::Declined => false,
        }
    }

    #[test]
    fn a_signal_leaves_from_the_renders_thread_when_its_worker_is_idle() {
        let mut f = LoneSignal::new();
        let _entered = f.rt.enter();
        assert!(direct_run(&f.direct, named("a")));
        assert_eq!(f.signals("a", "success"), 1, "sent before run returned");
        // At start, the worker decides (an absent target is skipped there).
        let startup = Request {
            startup: true,
            ..named("b")
        };
        assert!(!direct_run(&f.direct, startup));
        assert_eq!(f.signals("b", "success"), 0, "queued for the worker");
        let reloader = f.take_reloader();
        f.rt.block_on(async {
            wait_for(|| f.signals("b", "success") == 1).await;
            assert_eq!(reloader.close(Some(Duration::from_secs(5))).await, 0);
        });
    }

    #[test]
    fn a_busy_worker_gets_the_request_and_runs_it_once_more() {
        let mut f = LoneSignal::new();
        let _entered = f.rt.enter();
        // Queued and not run yet: the worker owns the action.
        f.reloader.request(&f.spec, named("a"));
        assert!(!direct_run(&f.direct, named("b")));
        assert_eq!(f.signals("b", "success"), 0, "not sent beside the worker");
        let reloader = f.take_reloader();
        f.rt.block_on(async {
            wait_for(|| f.signals("b", "success") == 1).await;
            assert_eq!(reloader.close(Some(Duration::from_secs(5))).await, 0);
        });
        // One run served both.
        assert_eq!(f.signals("a", "success"), 1);
    }

    #[test]
    fn no_direct_run_between_a_failed_worker_attempt_and_its_retry() {
        let slot = Slot::new();
        let claim = |name| slot.claim_direct(&named(name), true, || true);
        slot.queue(named("a"));
        let a = slot.take().expect("the worker takes a");
        assert_eq!(claim("b"), Claiming::Busy, "the worker runs it");
        // Queued in the same step: a closing worker cannot miss it.
        assert!(!slot.is_idle() && slot.take_fresh());
        // The attempt failed: the retry goes back as the action is freed.
        slot.done(Some(a));
        assert_eq!(claim("b"), Claiming::Busy, "the retry holds the action");
        // A panicking worker's request is queued again as the action is
        // freed, in the same way.
        let _ = slot.take();
        let _ = slot.requeue_abandoned();
        assert_eq!(claim("b"), Claiming::Busy);
        let _ = slot.take();
        slot.done(None);
        assert_eq!(claim("b"), Claiming::Claimed);
    }

    #[test]
    fn a_direct_failure_is_counted_and_retried_by_the_worker_after_its_backoff() {
        let mut f = LoneSignal::new();
        let _ = f.app.kill();
        let _ = f.app.wait();
        std::fs::remove_file(f.dir.path().join("app.pid")).expect("remove pid file");
        let _entered = f.rt.enter();
        let failed_at = Instant::now();
        assert!(direct_run(&f.direct, named("a")));
        assert_eq!(f.signals("a", "failure"), 1, "the first attempt");
        let reloader = f.take_reloader();
        f.rt.block_on(async {
            // The second attempt is the worker's, after the first backoff.
            wait_for(|| f.signals("a", "failure") == 2).await;
            let second = failed_at.elapsed();
            assert!(second >= FIRST_BACKOFF, "{second:?}");
            // Meanwhile a render finds the retry pending: the worker keeps
            // the action, and the newer request starts the retries afresh.
            assert!(!direct_run(&f.direct, named("b")));
            assert_eq!(f.signals("b", "failure"), 0, "not sent beside the worker");
            wait_for(|| f.signals("b", "failure") == 1).await;
            assert!(
                failed_at.elapsed() < second + backoff(2),
                "{:?}",
                failed_at.elapsed()
            );
            assert_eq!(reloader.close(Some(Duration::from_secs(5))).await, 1);
        });
    }

    #[test]
    fn close_waits_for_a_direct_run_in_flight_and_counts_its_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ReloadSpec {
            action: ReloadAction::Signal {
                signal: nix::sys::signal::Signal::SIGCONT,
                target: SignalTarget::PidFile(dir.path().join("none.pid")),
            },
            retries: Some(0),
            ..exec("true")
        };
        // Real time: paused time would jump to the end of the grace while
        // the worker waits for the other thread.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = rt.enter();
        let metrics = Arc::new(Metrics::new());
        let mut reloader = lone(&metrics, &spec);
        let direct = reloader.direct(&spec).expect("direct");
        rt.block_on(tokio::task::yield_now());
        let DirectClaim::Claimed(claimed) = direct.claim(named("a")) else {
            panic!("not claimed");
        };
        // The render's thread sends while the daemon shuts down.
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            claimed.run();
        });
        let failed = rt.block_on(reloader.close(Some(Duration::from_secs(5))));
        sender.join().expect("sender");
        assert_eq!(failed, 1, "close waited for it");
        assert_eq!(signals(&metrics, "a", "failure"), 1);
    }

    #[test]
    fn a_run_from_before_a_new_configuration_leaves_its_reload_to_the_loop() {
        let mut f = LoneSignal::new();
        let _entered = f.rt.enter();
        let spec = f.spec.clone();
        // SIGHUP while a render runs: whatever changed, the run neither
        // sends nor queues; the loop requests what the bundle still names.
        f.reloader.retain(&[&spec, &spec]);
        assert!(matches!(
            f.direct.clone().claim(named("a")),
            DirectClaim::Declined
        ));
        assert!(f.reloader.direct(&spec).is_none(), "now named twice");
        f.reloader.retain(&[&spec]);
        assert!(matches!(
            f.direct.clone().claim(named("a")),
            DirectClaim::Declined
        ));
        f.rt.block_on(tokio::time::sleep(Duration::from_secs(600)));
        assert_eq!(f.signals("a", "success"), 0);
        // A run that starts now may.
        let fresh = f.reloader.direct(&spec).expect("lone again");
        assert!(direct_run(&fresh, named("b")));
        assert_eq!(f.signals("b", "success"), 1);
    }

    #[test]
    fn a_claim_dropped_unrun_frees_the_action_for_the_worker() {
        let f = LoneSignal::new();
        let _entered = f.rt.enter();
        // As a panic between the claim and the run would.
        drop(f.direct.clone().claim(named("a")));
        f.rt.block_on(async {
            wait_for(|| f.signals("a", "success") == 1).await;
        });
        assert!(direct_run(&f.direct, named("b")), "free again");
    }

    #[test]
    fn a_removed_actions_worker_stops_retrying() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = ReloadSpec {
            action: ReloadAction::Signal {
                signal: nix::sys::signal::Signal::SIGCONT,
                target: SignalTarget::PidFile(dir.path().join("none.pid")),
            },
            ..exec("true")
        };
        let rt = paused_runtime();
        let _entered = rt.enter();
        let metrics = Arc::new(Metrics::new());
        let mut reloader = lone(&metrics, &spec);
        reloader.request(&spec, named("a"));
        rt.block_on(async {
            wait_for(|| signals(&metrics, "a", "failure") == 1).await;
            reloader.retain(&[]);
            tokio::time::sleep(Duration::from_secs(600)).await;
        });
        assert_eq!(
            signals(&metrics, "a", "failure"),
            1,
            "no retries after removal"
        );
    }

    #[tokio::test]
    async fn only_a_lone_plain_signal_goes_direct() {
        let (mut app, spec, _dir) = sleeper();
        let others = [
            ReloadSpec {
                min_interval: Some(Duration::from_secs(1)),
                ..spec.clone()
            },
            ReloadSpec {
                probe: Some(Probe::Tls("127.0.0.1:1".into())),
                ..spec.clone()
            },
            exec("true"),
        ];
        let mut reloader = Reloader::new(Arc::new(Metrics::new()), ChildHandle::default());
        assert!(reloader.direct(&spec).is_none(), "not known to be lone");
        let mut all: Vec<&ReloadSpec> = others.iter().collect();
        all.push(&spec);
        reloader.retain(&all);
        assert!(reloader.direct(&spec).is_some());
        for other in &others {
            assert!(reloader.direct(other).is_none(), "{other:?}");
        }
        let _ = app.kill();
        let _ = app.wait();
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
