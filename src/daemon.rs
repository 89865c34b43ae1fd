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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::bundle::retain::Retention;
use crate::bundle::{Bundle, Refusal};
use crate::config::{BundleConfig, Config, ConfigError, Probe};
use crate::keypair::{self, KeyPairState, Outcome};
use crate::output::{self, Rendered, atomic};
use crate::reload::child::ChildHandle;
use crate::reload::{Reloader, Request};
use crate::render;
use crate::source::Source;
use crate::source::{SourceError, SourceFile};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::status::{Pings, Status};
use crate::watch::{Change, Watch, WatchError, watch_points};

/// How the daemon gets a fresh configuration on SIGHUP.
pub type Reconfigure = Box<dyn Fn() -> Result<Config, ConfigError> + Send>;

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
    /// Why the last render was refused, while it is.
    refusal: Option<&'static str>,
    /// CAs removed from the sources but still within `retain_removed`.
    retention: Retention,
    /// Each source's last read (`None`: to be read).
    cache: Vec<Option<Vec<SourceFile>>>,
    /// The certificates of the last read, parsed.
    parsed: crate::bundle::ParseCache,
}

impl BundleState {
    fn new(config: BundleConfig, state_dir: Option<&Path>) -> Self {
        Self {
            retention: Retention::load(state_dir, &config.name),
            cache: Vec::new(),
            parsed: crate::bundle::ParseCache::default(),
            config,
            last: None,
            published: HashMap::new(),
            next_change: None,
            rendered: false,
            refusal: None,
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
    keypairs: Vec<KeyPairState>,
    watch: Option<Watch>,
    events: mpsc::Receiver<Change>,
    reloader: Reloader,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    pings: Pings,
    reconfigure: Reconfigure,
    dirty: HashSet<usize>,
    /// Sources (bundle, source index) an event concerned: only they are
    /// read again when their bundle is not dirty as a whole.
    dirty_sources: HashSet<(usize, usize)>,
    /// An event touched a watched directory or entry itself.
    rewatch_needed: bool,
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
        (status, pings): (Arc<Status>, Pings),
        child: ChildHandle,
    ) -> Result<Self, StartError> {
        let (tx, events) = mpsc::channel(4096);
        let watch = match config.daemon.poll {
            Some(_) => None,
            None => Some(Watch::new(tx).map_err(StartError::Watch)?),
        };
        let state_dir = config.daemon.state_dir.clone();
        let bundles = config
            .bundles
            .iter()
            .cloned()
            .map(|b| BundleState::new(b, state_dir.as_deref()))
            .collect();
        let keypairs = config
            .keypairs
            .iter()
            .cloned()
            .map(KeyPairState::new)
            .collect();
        let mut daemon = Self {
            config,
            bundles,
            keypairs,
            watch,
            events,
            reloader: Reloader::new(metrics.clone(), child),
            metrics,
            status,
            pings,
            reconfigure,
            dirty: HashSet::new(),
            dirty_sources: HashSet::new(),
            rewatch_needed: false,
        };
        daemon.rewatch().map_err(StartError::Watch)?;
        Ok(daemon)
    }

    fn rewatch(&mut self) -> Result<(), WatchError> {
        let Some(watch) = &mut self.watch else {
            return Ok(());
        };
        // Key pairs come after the bundles in the index space.
        let wanted = self
            .bundles
            .iter()
            .map(|b| {
                b.config
                    .sources
                    .iter()
                    .enumerate()
                    .flat_map(|(i, source)| watch_points(i, source))
                    .collect()
            })
            .chain(self.keypairs.iter().map(|k| {
                k.config
                    .paths()
                    .into_iter()
                    .flat_map(|p| watch_points(0, &Source::Path(p.to_path_buf())))
                    .collect()
            }))
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

        self.mark_all();
        self.cycle(true);

        let mut burst: Option<(Instant, Instant)> = None; // (first, last) event
        let mut resync_at = self.config.daemon.resync.map(|d| Instant::now() + d);
        let mut poll_at = self.config.daemon.poll.map(|d| Instant::now() + d);
        loop {
            let debounce_at = burst.map(|(first, last)| {
                (last + self.config.daemon.debounce).min(first + self.config.daemon.debounce_max)
            });
            let expiry_at = self
                .bundles
                .iter()
                .filter_map(|b| b.next_change)
                .chain(self.keypairs.iter().filter_map(|k| k.next_change))
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
                    if self.dirty.is_empty() && self.dirty_sources.is_empty() {
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
                    let offset = self.bundles.len();
                    for (k, pair) in self.keypairs.iter_mut().enumerate() {
                        if pair.next_change.is_some_and(|t| t <= now) {
                            pair.next_change = None;
                            self.dirty.insert(offset + k);
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
                    self.mark_all();
                    self.cycle(false);
                    resync_at = self.config.daemon.resync.map(|d| Instant::now() + d);
                }
                () = sleep_until(poll_at) => {
                    self.mark_all();
                    self.cycle(false);
                    poll_at = self.config.daemon.poll.map(|d| Instant::now() + d);
                }
                Some(reply) = self.pings.recv() => {
                    let _ = reply.send(());
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
                    self.rewatch_needed |= watch.bundles_for(path, &mut self.dirty_sources);
                }
            }
            _ => {
                self.rewatch_needed = true;
                self.mark_all();
            }
        }
    }

    /// Marks everything dirty; the watches are checked too.
    fn mark_all(&mut self) {
        self.rewatch_needed = true;
        self.dirty
            .extend(0..self.bundles.len() + self.keypairs.len());
    }

    /// Renders every dirty bundle and requests the reloads of those whose
    /// outputs changed.
    fn cycle(&mut self, startup: bool) {
        if self.watch.as_ref().is_some_and(Watch::take_overflow) {
            warn!("watch events were dropped; re-reading every source");
            self.mark_all();
        }
        let whole: HashSet<usize> = self.dirty.drain().collect();
        // Per bundle, the sources to read again (`None`: all of them).
        let mut reread: HashMap<usize, Option<HashSet<usize>>> =
            whole.iter().map(|i| (*i, None)).collect();
        for (target, source) in self.dirty_sources.drain() {
            if let Some(sources) = reread.entry(target).or_insert_with(|| Some(HashSet::new())) {
                sources.insert(source);
            }
        }
        let dirty: HashSet<usize> = reread.keys().copied().collect();
        let mut bundles: Vec<usize> = dirty
            .iter()
            .copied()
            .filter(|i| *i < self.bundles.len())
            .collect();
        bundles.sort_unstable();
        let offset = self.bundles.len();
        let mut changed_bundles = HashSet::new();
        for i in bundles {
            let only = reread.remove(&i).flatten();
            if self.render_bundle(i, only.as_ref(), startup) {
                changed_bundles.insert(self.bundles[i].config.name.clone());
            }
        }
        // Bundles first: a key pair may chain to one that just changed.
        for k in 0..self.keypairs.len() {
            let chained = self.keypairs[k]
                .config
                .chain_to
                .as_ref()
                .is_some_and(|b| changed_bundles.contains(b));
            if dirty.contains(&(offset + k)) || chained {
                self.check_keypair(k);
            }
        }
        // A directory that appeared (or came back) is watched from now on;
        // what was written in it before the watch existed is read now.
        // Only when an event touched what is watched: checking thousands
        // of directories on every swap would cost more than the render.
        let rounds = if std::mem::take(&mut self.rewatch_needed) {
            3
        } else {
            0
        };
        for _ in 0..rounds {
            let gained = match self.watch.as_mut().map(Watch::refresh) {
                Some(Ok(gained)) => gained,
                Some(Err(e)) => {
                    error!(error = %e, "watching is incomplete; changes may be seen only at the next resync");
                    break;
                }
                None => break,
            };
            if gained.is_empty() {
                break;
            }
            let mut again: Vec<usize> = gained.into_iter().collect();
            again.sort_unstable();
            for i in again {
                if i < offset {
                    self.render_bundle(i, None, startup);
                } else {
                    self.check_keypair(i - offset);
                }
            }
        }
        let ready = self.bundles.iter().all(|b| b.rendered);
        self.status.rendered(ready, self.summary());
    }

    /// One line for systemd's STATUS=: each bundle and its state.
    fn summary(&self) -> String {
        self.bundles
            .iter()
            .map(|b| match (&b.last, &b.refusal) {
                (_, Some(reason)) => format!("{}: refused ({reason})", b.config.name),
                (Some(bundle), None) => format!("{}: {} certificates", b.config.name, bundle.len()),
                (None, None) => format!("{}: not rendered", b.config.name),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Checks key pair `k`; reloads when it changed for real.
    fn check_keypair(&mut self, k: usize) {
        let now = unix_now();
        let pair = &self.keypairs[k];
        let chain_to = pair.config.chain_to.as_ref().and_then(|name| {
            self.bundles
                .iter()
                .find(|b| &b.config.name == name)
                .and_then(|b| b.last.as_ref())
        });
        if pair.config.chain_to.is_some() && chain_to.is_none() {
            warn!(keypair = %pair.config.name, "held: the bundle it must chain to has not rendered yet");
            return;
        }
        let chain_to = chain_to.cloned();
        let pair = &mut self.keypairs[k];
        let name = pair.config.name.clone();
        match pair.check(chain_to.as_ref(), now) {
            Outcome::Unchanged => {}
            Outcome::Held(reason) => {
                warn!(keypair = %name, reason = %reason, "key pair held; no reload");
                self.metrics.refused(&name, "keypair");
            }
            Outcome::Changed { first } => {
                let Some(accepted) = pair.accepted.clone() else {
                    return;
                };
                info!(keypair = %name, certificate = %keypair::describe(&accepted), first,
                    outcome = if first { "loaded" } else { "changed" }, "key pair checked");
                for spec in &pair.config.reloads {
                    // At start, reload only if a probe shows the app serving
                    // another certificate.
                    if first && !matches!(spec.probe, Some(Probe::Tls(_))) {
                        continue;
                    }
                    self.reloader.request(
                        spec,
                        Request {
                            names: [name.clone()].into(),
                            outputs: pair.config.outputs().into_iter().collect(),
                            startup: first,
                            expect: Some(accepted.leaf.clone()),
                            only_if_stale: first,
                        },
                    );
                }
            }
        }
    }

    /// Reads bundle `i`'s sources: those in `only` (or all) afresh, the
    /// others from their last read.
    fn read_bundle(
        &mut self,
        i: usize,
        only: Option<&HashSet<usize>>,
    ) -> Result<Vec<SourceFile>, Refusal> {
        let state = &mut self.bundles[i];
        state.cache.resize(state.config.sources.len(), None);
        let stale: Vec<usize> = (0..state.config.sources.len())
            .filter(|s| state.cache[*s].is_none() || only.is_none_or(|o| o.contains(s)))
            .collect();
        let sources = &state.config.sources;
        let read = crate::parallel::map(&stale, |s| sources[*s].read());
        let mut failure = None;
        for (s, result) in stale.into_iter().zip(read) {
            // A file of the last read that is a directory now is unreadable,
            // not absent: a half-done replacement must not shrink the trust
            // set. The last read stays, so the refusal holds until it is a
            // file again.
            let replaced = state.cache[s]
                .iter()
                .flatten()
                .find(|f| std::fs::metadata(&f.path).is_ok_and(|m| m.is_dir()));
            if let Some(file) = replaced {
                failure.get_or_insert(SourceError::directory_where_a_file_was(&file.path));
                continue;
            }
            match result {
                Ok(files) => state.cache[s] = Some(files),
                Err(e) => {
                    // Read again next time; the first failure is reported.
                    state.cache[s] = None;
                    failure.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failure {
            return Err(Refusal::Source(e));
        }
        Ok(state.cache.iter().flatten().flatten().cloned().collect())
    }

    /// Renders bundle `i`, reading again the sources in `only` (or all);
    /// returns whether its outputs changed.
    fn render_bundle(&mut self, i: usize, only: Option<&HashSet<usize>>, startup: bool) -> bool {
        let now = unix_now();
        let name = self.bundles[i].config.name.clone();
        let result = self.read_bundle(i, only).and_then(|files| {
            let state = &mut self.bundles[i];
            render::assemble_files(
                &state.config,
                &files,
                Some(&mut state.retention),
                Some(&mut state.parsed),
                now,
            )
        });
        let state = &mut self.bundles[i];
        let assembly = match result {
            Ok(assembly) => assembly,
            Err(refusal) => {
                warn!(bundle = %name, reason = refusal.reason(), error = %refusal,
                    "bundle refused; outputs keep their previous content, no reload");
                self.metrics.refused(&name, refusal.reason());
                state.next_change = None;
                state.refusal = Some(refusal.reason());
                return false;
            }
        };
        let mut changed = Vec::new();
        for spec in &state.config.outputs {
            let rendered = output::render(&assembly.bundle, &spec.format);
            let result = match state.published.get(&spec.path) {
                Some(previous) if *previous == rendered => Ok(false),
                // Known to differ: write without comparing with the disk.
                Some(_) => atomic::write(&spec.path, &rendered, spec.mode).map(|()| true),
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
                    state.refusal = Some("output");
                    return false;
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
        let retention_ends = state
            .config
            .retain_removed
            .and_then(|g| state.retention.next_change(g));
        state.next_change = assembly
            .next_change(state.config.policy.allow_expired)
            .into_iter()
            .chain(retention_ends)
            .filter(|t| *t > now)
            .min();
        state.rendered = true;
        state.refusal = None;
        state.last = Some(assembly.bundle);
        if changed.is_empty() {
            return false;
        }
        for spec in &state.config.reloads {
            self.reloader.request(
                spec,
                Request {
                    names: [name.clone()].into(),
                    outputs: changed.iter().cloned().collect(),
                    startup,
                    ..Request::default()
                },
            );
        }
        true
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
        let state_dir = config.daemon.state_dir.clone();
        self.bundles = config
            .bundles
            .iter()
            .cloned()
            .map(|c| {
                let mut state = BundleState::new(c, state_dir.as_deref());
                if let Some(previous) = old.remove(&state.config.name) {
                    state.last = previous.last;
                    state.rendered = previous.rendered;
                    state.retention = previous.retention;
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
        self.mark_all();
        self.cycle(false);
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
