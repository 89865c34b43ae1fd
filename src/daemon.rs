//! The daemon's event loop: sources -> bundle -> outputs -> reload, on every
//! real change, until shutdown.
//!
//! One task owns all bundle state, so renders never race. It wakes on a
//! watch event (debounced: `debounce` after the last event, at least every
//! `debounce_max` under churn), on the next expiry or not-before instant of a
//! bundle (guarantee 7), on the resync or poll timer, on SIGHUP (re-read the
//! config), and on shutdown. With nothing to do it sleeps: no timer runs
//! but the resync and the next expiry.
//!
//! Reload actions are handed to [`crate::reload::Reloader`] workers, after
//! every output of the bundle is in place, and never block this loop.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::bundle::Bundle;
use crate::config::{BundleConfig, Config, ConfigError};
use crate::output::{self, Rendered, atomic};
use crate::reload::{ChildPid, Reloader};
use crate::render;
use crate::telemetry::metrics::Metrics;
use crate::watch::{Change, Watch, WatchError, watch_points};

/// How the daemon gets a fresh configuration on SIGHUP.
pub type Reconfigure = Box<dyn Fn() -> Result<Config, ConfigError> + Send>;

/// Shared with the health endpoints and the systemd notifier.
#[derive(Default)]
pub struct Status {
    /// Every bundle has rendered once.
    pub ready: AtomicBool,
    /// Bumped by the event loop whenever it turns; a stuck loop stops it.
    pub heartbeat: std::sync::atomic::AtomicU64,
}

/// Per bundle: its config and what was last published.
struct BundleState {
    config: BundleConfig,
    /// The last bundle accepted (for the added/removed log).
    last: Option<Bundle>,
    /// The bytes last published at each output path.
    published: HashMap<PathBuf, Rendered>,
    /// The next instant (unix seconds) the bundle changes by itself.
    next_change: Option<i64>,
    rendered: bool,
}

impl BundleState {
    fn new(config: BundleConfig) -> Self {
        Self {
            config,
            last: None,
            published: HashMap::new(),
            next_change: None,
            rendered: false,
        }
    }
}

/// Why the daemon could not start.
#[derive(Debug)]
pub enum StartError {
    Watch(WatchError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Watch(e) => write!(f, "cannot watch the sources: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

pub struct Daemon {
    config: Config,
    bundles: Vec<BundleState>,
    watch: Option<Watch>,
    events: mpsc::Receiver<Change>,
    reloader: Reloader,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    reconfigure: Reconfigure,
    dirty: HashSet<usize>,
}

/// Unix time now, in seconds (the one clock the policy reads).
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The tokio instant at which wall-clock second `at` has begun.
fn instant_at(at: i64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let target = Duration::from_secs(at.max(0) as u64) + Duration::from_millis(5);
    Instant::now() + target.saturating_sub(now)
}

impl Daemon {
    /// Sets up watching; nothing is rendered until [`Daemon::run`].
    pub fn new(
        config: Config,
        reconfigure: Reconfigure,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
        child: ChildPid,
    ) -> Result<Self, StartError> {
        let (tx, events) = mpsc::channel(4096);
        let watch = match config.daemon.poll {
            Some(_) => None,
            None => Some(Watch::new(tx).map_err(StartError::Watch)?),
        };
        let bundles = config
            .bundles
            .iter()
            .cloned()
            .map(BundleState::new)
            .collect();
        let mut daemon = Self {
            config,
            bundles,
            watch,
            events,
            reloader: Reloader::new(metrics.clone(), child),
            metrics,
            status,
            reconfigure,
            dirty: HashSet::new(),
        };
        daemon.rewatch().map_err(StartError::Watch)?;
        Ok(daemon)
    }

    fn rewatch(&mut self) -> Result<(), WatchError> {
        let Some(watch) = &mut self.watch else {
            return Ok(());
        };
        let wanted = self
            .bundles
            .iter()
            .map(|b| b.config.sources.iter().flat_map(watch_points).collect())
            .collect();
        watch.set(wanted)?;
        info!(directories = watch.len(), "watching");
        Ok(())
    }

    /// Renders once, then renders and reloads on every change until
    /// `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();

        self.dirty.extend(0..self.bundles.len());
        self.cycle(true);

        let mut burst: Option<(Instant, Instant)> = None; // (first, last) event
        let mut resync_at = self.config.daemon.resync.map(|d| Instant::now() + d);
        let mut poll_at = self.config.daemon.poll.map(|d| Instant::now() + d);
        loop {
            self.status.heartbeat.fetch_add(1, Ordering::Relaxed);
            let debounce_at = burst.map(|(first, last)| {
                (last + self.config.daemon.debounce).min(first + self.config.daemon.debounce_max)
            });
            let expiry_at = self
                .bundles
                .iter()
                .filter_map(|b| b.next_change)
                .min()
                .map(instant_at);
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    info!("shutting down");
                    break;
                }
                Some(change) = self.events.recv() => {
                    self.note(change);
                    // Everything already queued belongs to the same burst.
                    while let Ok(change) = self.events.try_recv() {
                        self.note(change);
                    }
                    if self.dirty.is_empty() {
                        continue;
                    }
                    let now = Instant::now();
                    burst = Some((burst.map_or(now, |(first, _)| first), now));
                    if self.config.daemon.debounce.is_zero() {
                        burst = None;
                        self.cycle(false);
                    }
                }
                () = sleep_until(debounce_at) => {
                    burst = None;
                    self.cycle(false);
                }
                () = sleep_until(expiry_at) => {
                    let now = unix_now();
                    for (i, b) in self.bundles.iter_mut().enumerate() {
                        if b.next_change.is_some_and(|t| t <= now) {
                            b.next_change = None;
                            self.dirty.insert(i);
                        }
                    }
                    self.cycle(false);
                }
                () = sleep_until(resync_at) => {
                    // Compare with the disk again: repairs an output changed
                    // behind our back.
                    for b in &mut self.bundles {
                        b.published.clear();
                    }
                    self.dirty.extend(0..self.bundles.len());
                    self.cycle(false);
                    resync_at = self.config.daemon.resync.map(|d| Instant::now() + d);
                }
                () = sleep_until(poll_at) => {
                    self.dirty.extend(0..self.bundles.len());
                    self.cycle(false);
                    poll_at = self.config.daemon.poll.map(|d| Instant::now() + d);
                }
                Some(()) = recv_signal(&mut hangup) => {
                    self.reconfigure();
                    resync_at = self.config.daemon.resync.map(|d| Instant::now() + d);
                    poll_at = self.config.daemon.poll.map(|d| Instant::now() + d);
                }
            }
        }
    }

    fn note(&mut self, change: Change) {
        self.metrics.watch_events.inc();
        match (change, &self.watch) {
            (Change::Paths(paths), Some(watch)) => {
                for path in &paths {
                    watch.bundles_for(path, &mut self.dirty);
                }
            }
            _ => self.dirty.extend(0..self.bundles.len()),
        }
    }

    /// Renders every dirty bundle and requests the reloads of those whose
    /// outputs changed.
    fn cycle(&mut self, startup: bool) {
        if self.watch.as_ref().is_some_and(Watch::take_overflow) {
            warn!("watch events were dropped; re-reading every source");
            self.dirty.extend(0..self.bundles.len());
        }
        let mut dirty: Vec<usize> = self.dirty.drain().collect();
        dirty.sort_unstable();
        for i in dirty {
            self.render_bundle(i, startup);
        }
        if let Some(watch) = &mut self.watch
            && let Err(e) = watch.refresh()
        {
            error!(error = %e, "watching is incomplete; changes may be seen only at the next resync");
        }
        if !self.status.ready.load(Ordering::Relaxed) && self.bundles.iter().all(|b| b.rendered) {
            self.status.ready.store(true, Ordering::Relaxed);
        }
    }

    fn render_bundle(&mut self, i: usize, startup: bool) {
        let now = unix_now();
        let state = &mut self.bundles[i];
        let name = state.config.name.clone();
        let assembly = match render::assemble(&state.config, now) {
            Ok(assembly) => assembly,
            Err(refusal) => {
                warn!(bundle = %name, reason = refusal.reason(), error = %refusal,
                    "bundle refused; outputs keep their previous content, no reload");
                self.metrics.refused(&name, refusal.reason());
                state.next_change = None;
                return;
            }
        };
        let mut changed = Vec::new();
        for spec in &state.config.outputs {
            let rendered = output::render(&assembly.bundle, spec.format);
            let result = match state.published.get(&spec.path) {
                Some(previous) if *previous == rendered => Ok(false),
                // Known to differ: write without comparing with the disk.
                Some(_) => write(&spec.path, &rendered, spec.mode).map(|()| true),
                None => atomic::publish(&spec.path, &rendered, spec.mode),
            };
            match result {
                Ok(did_change) => {
                    if did_change {
                        changed.push(spec.path.clone());
                    }
                    state.published.insert(spec.path.clone(), rendered);
                }
                Err(e) => {
                    error!(bundle = %name, output = %spec.path.display(), error = %e,
                        "cannot write output; no reload until it is written");
                    self.metrics.refused(&name, "output");
                    state.published.remove(&spec.path);
                    return;
                }
            }
        }
        log_render(&name, state.last.as_ref(), &assembly.bundle, &changed);
        self.metrics.rendered(
            &name,
            if changed.is_empty() {
                "unchanged"
            } else {
                "changed"
            },
        );
        self.metrics
            .bundle_state(&name, &assembly.bundle, state.last.as_ref(), now);
        state.next_change = assembly
            .next_change(state.config.policy.allow_expired)
            .filter(|t| *t > now);
        state.rendered = true;
        state.last = Some(assembly.bundle);
        if !changed.is_empty() {
            for spec in &state.config.reloads {
                self.reloader.request(spec, &name, &changed, startup);
            }
        }
    }

    /// SIGHUP: a valid config replaces the running one; an invalid one is
    /// logged and the running one kept.
    fn reconfigure(&mut self) {
        let config = match (self.reconfigure)() {
            Ok(config) => config,
            Err(e) => {
                error!(error = %e, "SIGHUP: the new configuration is invalid; keeping the running one");
                return;
            }
        };
        info!("SIGHUP: configuration re-read");
        let mut old: HashMap<String, BundleState> = self
            .bundles
            .drain(..)
            .map(|b| (b.config.name.clone(), b))
            .collect();
        let mut published: HashMap<PathBuf, Rendered> = old
            .values_mut()
            .flat_map(|b| std::mem::take(&mut b.published))
            .collect();
        self.bundles = config
            .bundles
            .iter()
            .cloned()
            .map(|c| {
                let mut state = BundleState::new(c);
                if let Some(previous) = old.remove(&state.config.name) {
                    state.last = previous.last;
                    state.rendered = previous.rendered;
                }
                // Same bytes at the same path: no rewrite, no reload.
                for spec in &state.config.outputs {
                    if let Some(bytes) = published.remove(&spec.path) {
                        state.published.insert(spec.path.clone(), bytes);
                    }
                }
                state
            })
            .collect();
        self.config = config;
        let specs: Vec<_> = self
            .config
            .bundles
            .iter()
            .flat_map(|b| &b.reloads)
            .collect();
        self.reloader.retain(&specs);
        if let Err(e) = self.rewatch() {
            error!(error = %e, "watching is incomplete after SIGHUP");
        }
        self.dirty.extend(0..self.bundles.len());
        self.cycle(false);
    }
}

fn write(path: &std::path::Path, rendered: &Rendered, mode: u32) -> std::io::Result<()> {
    match rendered {
        Rendered::File(bytes) => atomic::write_file(path, bytes, mode),
        Rendered::Dir(files) => atomic::write_dir(path, files, mode),
    }
}

/// One line per render: the certificates added and removed.
fn log_render(name: &str, previous: Option<&Bundle>, bundle: &Bundle, changed: &[PathBuf]) {
    let before: HashSet<[u8; 32]> = previous
        .map(|b| b.anchors().iter().map(|a| a.sha256).collect())
        .unwrap_or_default();
    let after: HashSet<[u8; 32]> = bundle.anchors().iter().map(|a| a.sha256).collect();
    let describe = |b: &Bundle, keep: &dyn Fn(&[u8; 32]) -> bool| -> Vec<String> {
        b.anchors()
            .iter()
            .filter(|a| keep(&a.sha256))
            .map(|a| format!("{} ({})", a.subject, a.fingerprint()))
            .collect()
    };
    let added = describe(bundle, &|h| !before.contains(h));
    let removed = previous
        .map(|p| describe(p, &|h| !after.contains(h)))
        .unwrap_or_default();
    let outcome = if changed.is_empty() {
        "unchanged"
    } else {
        "changed"
    };
    info!(
        bundle = name,
        certificates = bundle.len(),
        added = ?added,
        removed = ?removed,
        outputs_changed = changed.len(),
        outcome,
        "rendered"
    );
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// A handle the supervisor fills in with the child's pid.
pub fn child_pid() -> ChildPid {
    Arc::new(Mutex::new(None))
}
