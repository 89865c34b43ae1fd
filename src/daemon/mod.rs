//! The daemon's event loop: sources -> bundle -> outputs -> reload, on every
//! real change, until shutdown.
//!
//! The loop itself never blocks (guarantee 10). It keeps one [`Entry`] per
//! bundle and key pair and hands their work (reading, parsing, writing,
//! fsync, state saving) to the blocking pool, one run per target at a time:
//! a target whose run is in flight stalls only itself, and a change that
//! arrives meanwhile makes exactly one more run when it returns. Watch
//! refreshes and SIGHUP's config read go to the blocking pool the same way.
//!
//! It wakes on a watch event (debounced: `debounce` after the last event, at
//! least every `debounce_max` under churn), on the next expiry or not-before
//! instant (guarantee 7, on the wall clock of [`crate::clock`]), on a failed
//! write's retry (guarantee 12), on the resync or poll timer, on SIGHUP, on
//! a finished run, and on shutdown. With nothing to do it sleeps.
//!
//! Reload actions are handed to [`crate::reload::Reloader`] workers once
//! every output of the bundle holds the new content. On shutdown the loop
//! stops watching and gives in-flight reloads a grace period.

mod agenda;
mod runs;
mod tally;
mod target;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::bundle::Bundle;
use crate::clock::Clock;
use crate::config::{Config, ConfigError};
use crate::keypair::{self, KeyPairState};
use crate::reload::child::ChildHandle;
use crate::reload::{Probe, ReloadSpec, Reloader, Request};
use crate::render::BundleState;
use crate::source::Source;
use crate::telemetry::http::Listener;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::status::{Pings, Status};
use crate::watch::{Change, Events, Routes, Watch, WatchError, WatchPoint, watch_points};
use agenda::Agenda;
use runs::{Job, Runs};
use tally::{Standing, State, Tally};
pub use target::{Kind, Target};
use target::{Outcome, Work};

/// How the daemon gets a fresh configuration on SIGHUP (it reads a file:
/// it runs on the blocking pool).
pub type Reconfigure = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// How long in-flight reloads get to finish on shutdown: SIGTERM ends the
/// daemon within 5 s (guarantee 10).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long renders wait for the watches of a configuration just taken (at
/// start, after a SIGHUP) to be set: what changes after the watch is set is
/// seen, so reading first would read twice. A watch set-up that hangs (a
/// stuck filesystem) does not hold renders back.
const WATCH_FIRST: Duration = Duration::from_secs(1);

/// A failed write is retried after this, doubling up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Past this many bundles, the status line counts them instead of listing.
const SUMMARY_BUNDLES: usize = 8;

/// Which sources of a target must be read again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Dirty {
    #[default]
    Clean,
    /// These sources (an empty set: none, only render again).
    Sources(HashSet<usize>),
    All,
}

impl Dirty {
    fn add(&mut self, other: Dirty) {
        *self = match (std::mem::take(self), other) {
            (Dirty::All, _) | (_, Dirty::All) => Dirty::All,
            (Dirty::Clean, d) | (d, Dirty::Clean) => d,
            (Dirty::Sources(mut a), Dirty::Sources(b)) => {
                a.extend(b);
                Dirty::Sources(a)
            }
        };
    }

    fn source(index: usize) -> Self {
        Dirty::Sources([index].into())
    }
}

/// Per bundle or key pair: its state (away while its run is in flight)
/// and the loop's bookkeeping.
#[derive(Debug)]
struct Entry {
    kind: Kind,
    name: String,
    /// `None` while its run is queued or in flight on the blocking pool.
    target: Option<Target>,
    dirty: Dirty,
    /// Compare outputs with the disk at the next render (resync).
    recheck_disk: bool,
    /// Its first run has not finished: a reload target that does not exist
    /// yet is skipped, not retried.
    initial: bool,
    /// The next run is caused by an expiry: it goes ahead of the queue,
    /// and its reload is not held back by `min_interval`.
    urgent: bool,
    /// The next instant (unix seconds) it changes by itself.
    next_change: Option<i64>,
    /// A bundle: rendered once; its last accepted bundle (for `chain_to`).
    rendered: bool,
    last: Option<Arc<Bundle>>,
    refusal: Option<&'static str>,
    /// A failed write's retry: when, and how many so far.
    retry: Option<(Instant, u32)>,
    /// A new configuration that arrived while the run was in flight.
    reconfigured: Option<Target>,
    /// Gone from the configuration while its run was in flight.
    removed: bool,
    /// Files its last render read through a symlink out of their source's
    /// directory, by source: their directories are watched for it too.
    links: Vec<(usize, Box<std::path::Path>)>,
}

impl Entry {
    fn new(target: Target) -> Self {
        Self {
            kind: target.kind(),
            name: target.name().to_owned(),
            target: Some(target),
            dirty: Dirty::All,
            recheck_disk: false,
            initial: true,
            urgent: false,
            next_change: None,
            rendered: false,
            last: None,
            refusal: None,
            retry: None,
            reconfigured: None,
            removed: false,
            links: Vec::new(),
        }
    }

    /// Its part in the status line.
    fn standing(&self) -> Standing {
        let state = match (&self.last, &self.refusal) {
            (_, Some(_)) => State::Refused,
            (Some(_), None) => State::Rendered,
            (None, None) => State::Pending,
        };
        Standing {
            first_run: self.initial,
            bundle: (self.kind == Kind::Bundle).then_some((state, self.rendered)),
        }
    }

    /// What to watch for it; `bundles` indexes the configuration's bundles
    /// by name.
    fn watch_points(&self, config: &Config, bundles: &HashMap<&str, usize>) -> Vec<WatchPoint> {
        match self.kind {
            Kind::Bundle => bundles
                .get(self.name.as_str())
                .and_then(|i| config.bundles.get(*i))
                .map(|b| {
                    // The target's directory, for that file alone.
                    let links = self
                        .links
                        .iter()
                        .filter_map(|(i, target)| WatchPoint::entry(*i, target));
                    b.sources
                        .iter()
                        .enumerate()
                        .flat_map(|(i, source)| watch_points(i, source))
                        .chain(links)
                        .collect()
                })
                .unwrap_or_default(),
            Kind::KeyPair => config
                .keypairs
                .iter()
                .find(|k| k.name == self.name)
                .map(|k| {
                    k.paths()
                        .into_iter()
                        .flat_map(|p| watch_points(0, &Source::Path(p.to_path_buf())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Where the watcher is.
enum WatchSlot {
    /// Polling: nothing is watched.
    Off,
    Idle(Box<Watch>),
    /// Its refresh runs on the blocking pool.
    Busy,
}

/// A run that came back from the blocking pool.
struct Finished {
    id: u64,
    target: Target,
    outcome: Outcome,
    /// The reload action the run already claimed or queued itself.
    reloaded: Option<ReloadSpec>,
    /// The run was caused by an expiry.
    urgent: bool,
}

/// What a watch refresh sends back: the routes (in `Done`, with the
/// watcher itself), the entry ids its bundle indices stand for, the
/// configuration it watched for (`Daemon::generation` when it started),
/// and the targets that gained a watch.
enum Refreshed {
    /// Every directory that cannot hang is watched; those on a filesystem
    /// whose calls can hang (NFS, FUSE) are being watched now, and may
    /// never be (guarantee 10): the routes so far, to use meanwhile.
    Partly {
        routes: Routes,
        directories: usize,
        ids: Vec<u64>,
        generation: u64,
        result: Result<HashSet<usize>, WatchError>,
    },
    Done {
        watch: Box<Watch>,
        ids: Vec<u64>,
        generation: u64,
        result: Result<HashSet<usize>, WatchError>,
    },
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
    entries: BTreeMap<u64, Entry>,
    /// The status line's counts, kept with `entries`.
    tally: Tally,
    /// What a wake-up must look at, kept with `entries`.
    agenda: Agenda,
    next_id: u64,
    clock: Clock,
    watch: WatchSlot,
    /// Who each watched directory's events concern, and the entry ids the
    /// routes' indices stand for (a snapshot kept while a refresh runs).
    routes: Routes,
    route_ids: Vec<u64>,
    /// A refresh was asked for while one ran, or the watch set changed.
    rewatch: bool,
    /// inotify's queue, read on the loop (`None` when polling).
    events: Option<Events>,
    /// Events seen but not debounced yet.
    pending: HashMap<u64, Dirty>,
    reloader: Reloader,
    runs: Runs,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    pings: Pings,
    /// `[daemon] listen`'s server, moved when a SIGHUP changes the address.
    listener: Option<Arc<std::sync::Mutex<Listener>>>,
    reconfigure: Reconfigure,
    done: (
        mpsc::UnboundedSender<Finished>,
        mpsc::UnboundedReceiver<Finished>,
    ),
    refreshed: (
        mpsc::UnboundedSender<Refreshed>,
        mpsc::UnboundedReceiver<Refreshed>,
    ),
    /// Renders are held until the watches of the configuration just taken
    /// are set, at most until this instant ([`WATCH_FIRST`] after it was
    /// taken): at start, and after a SIGHUP.
    hold: Option<Instant>,
    /// Counts the configurations taken: a refresh that comes back names
    /// the one it watched for, and only that one's lets renders go.
    generation: u64,
    /// Free heap pages go back to the kernel once every entry's first run
    /// has finished: set by each configuration taken, the first at start.
    trim_pending: bool,
    /// Once more, [`TRIM_AFTER_RELOADS`] after the start's reloads were let
    /// go: a thousand bundles' merged request is freed when its run ends.
    trim_at: Option<Instant>,
    /// How many directories the last refresh watched (logged at INFO when
    /// it moves; a kubelet swap refreshes the watches and moves nothing).
    watching: Option<usize>,
    /// The reloads the start asked for, merged per action and held until
    /// every target's first run came back (or [`STARTUP_HOLD`] after the
    /// first was held): the start is one cycle, and a thousand bundles
    /// that share an action reload the app once, not once per batch of
    /// outcomes. `None` once released.
    startup_reloads: Option<StartupReloads>,
}

/// See [`Daemon::startup_reloads`].
#[derive(Default)]
struct StartupReloads {
    requests: HashMap<ReloadSpec, Request>,
    /// When they go whatever is still running (a hung source at start).
    until: Option<Instant>,
}

/// Asks `reloader` for `spec` to run for `request`, or holds it with the
/// start's (see [`Daemon::startup_reloads`]); an expiry's is never held.
fn request_reload(
    startup: &mut Option<StartupReloads>,
    reloader: &mut Reloader,
    spec: &ReloadSpec,
    request: Request,
) {
    match startup {
        Some(held) if request.startup && !request.urgent => {
            held.until
                .get_or_insert_with(|| Instant::now() + STARTUP_HOLD);
            held.requests
                .entry(spec.clone())
                .or_default()
                .merge(request);
        }
        _ => reloader.request(spec, request),
    }
}

/// How long after the start's reloads go the heap is trimmed again: a
/// signal's run is over by then (a slower action's request is freed at its
/// end, and its pages stay mapped: a few hundred KiB at 1,000 bundles).
const TRIM_AFTER_RELOADS: Duration = Duration::from_millis(250);

/// How long the start's reloads wait for its slowest first runs: a run
/// this long no longer holds the others back (as a stuck run does not
/// hold back the queue, [`runs::STUCK_RUN`]).
const STARTUP_HOLD: Duration = runs::STUCK_RUN;

impl Daemon {
    /// Starts the watcher (nothing is watched, read or rendered until
    /// [`Daemon::run`]).
    pub fn new(
        config: Config,
        reconfigure: Reconfigure,
        metrics: Arc<Metrics>,
        (status, pings): (Arc<Status>, Pings),
        child: ChildHandle,
        clock: Clock,
    ) -> Result<Self, StartError> {
        let (watch, events) = match config.daemon.poll {
            Some(_) => (WatchSlot::Off, None),
            None => {
                let (watch, events) = Watch::new().map_err(StartError::Watch)?;
                (WatchSlot::Idle(Box::new(watch)), Some(events))
            }
        };
        let done = mpsc::unbounded_channel();
        let runs = Runs::new(
            clock.clone(),
            metrics.clone(),
            status.clone(),
            done.0.clone(),
        );
        let mut daemon = Self {
            config: config.clone(),
            entries: BTreeMap::new(),
            tally: Tally::default(),
            agenda: Agenda::default(),
            next_id: 0,
            clock,
            watch,
            routes: Routes::default(),
            route_ids: Vec::new(),
            rewatch: true,
            events,
            pending: HashMap::new(),
            reloader: Reloader::new(metrics.clone(), child),
            runs,
            metrics,
            status,
            pings,
            listener: None,
            reconfigure,
            done,
            refreshed: mpsc::unbounded_channel(),
            hold: None,
            generation: 0,
            trim_pending: false,
            trim_at: None,
            watching: None,
            startup_reloads: Some(StartupReloads::default()),
        };
        daemon.apply(config);
        Ok(daemon)
    }

    /// The listener of `[daemon] listen`, for a SIGHUP to move.
    pub fn serving(mut self, listener: Arc<std::sync::Mutex<Listener>>) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Renders once, then renders and reloads on every change until
    /// `shutdown` resolves.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let (reread_tx, mut reread_rx) = mpsc::unbounded_channel();

        // Counted from here: the configuration was taken before the runtime
        // started.
        self.hold_for_watches();
        self.start_rewatch();
        self.dispatch();

        let mut wall = self.clock.timer();
        let mut burst: Option<(Instant, Instant)> = None; // (first, last) event
        let mut resync_at = self.config.daemon.resync.map(|d| Instant::now() + d);
        let mut poll_at = self.config.daemon.poll.map(|d| Instant::now() + d);
        loop {
            let debounce_at = burst.map(|(first, last)| {
                (last + self.config.daemon.debounce).min(first + self.config.daemon.debounce_max)
            });
            let expiry_at = self.agenda.expiry_at(&self.entries);
            let retry_at = self.agenda.retry_at(&self.entries);
            let admit_at = self.runs.admit_at();
            let held = self.runs.held();
            let startup_until = self.startup_reloads.as_ref().and_then(|s| s.until);
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    info!("shutting down");
                    break;
                }
                Some(finished) = self.done.1.recv() => {
                    self.finished(finished);
                    // Runs that came back meanwhile: one status for all
                    // (a thousand bundles at start are a thousand runs).
                    while let Ok(finished) = self.done.1.try_recv() {
                        self.finished(finished);
                    }
                    self.report_status();
                    if self.tally.started() {
                        self.release_startup_reloads();
                    }
                    // Refused bundles count: one bad source must not
                    // keep the start's peak mapped for good.
                    if self.trim_pending && self.tally.started() {
                        self.trim_pending = false;
                        crate::memory::release_free();
                    }
                }
                Some(refreshed) = self.refreshed.1.recv() => match refreshed {
                    Refreshed::Partly { routes, directories, ids, generation, result } => {
                        self.took_routes(routes, directories, ids, generation, result);
                    }
                    Refreshed::Done { watch, ids, generation, result } => {
                        let (routes, directories) = (watch.routes(), watch.len());
                        self.watch = WatchSlot::Idle(watch);
                        self.took_routes(routes, directories, ids, generation, result);
                    }
                },
                change = recv_events(&mut self.events) => {
                    // Everything already queued came with it: one burst.
                    self.note(change);
                    if self.pending.is_empty() {
                        continue;
                    }
                    let now = Instant::now();
                    burst = Some((burst.map_or(now, |(first, _)| first), now));
                    if self.config.daemon.debounce.is_zero() {
                        burst = None;
                        self.settle();
                    }
                }
                () = sleep_until(debounce_at) => {
                    burst = None;
                    self.settle();
                }
                () = wall.wait(expiry_at) => {
                    let now = self.clock.now();
                    let mut queued = HashSet::new();
                    for (id, entry) in &mut self.entries {
                        if entry.next_change.is_some_and(|t| t <= now) {
                            self.agenda.set_next_change(&mut entry.next_change, None);
                            entry.urgent = true;
                            entry.dirty.add(Dirty::Sources(HashSet::new()));
                            self.agenda.mark(*id);
                            if entry.target.is_none() {
                                queued.insert(*id);
                            }
                        }
                    }
                    // A run already queued goes ahead too, and carries the
                    // urgency; one in flight leaves it to the next run.
                    for id in self.runs.hurry(|id| queued.contains(&id)) {
                        if let Some(entry) = self.entries.get_mut(&id) {
                            entry.urgent = false;
                        }
                    }
                }
                () = sleep_until(retry_at) => {
                    let now = Instant::now();
                    for (id, entry) in &mut self.entries {
                        if entry.retry.is_some_and(|(at, _)| at <= now) {
                            entry.dirty.add(Dirty::Sources(HashSet::new()));
                            self.agenda.mark(*id);
                        }
                    }
                }
                () = sleep_until(self.hold) => self.hold = None,
                // A run in flight became stuck: another thread takes the
                // queue on.
                () = sleep_until(admit_at) => self.runs.admit(),
                () = sleep_until(startup_until) => self.release_startup_reloads(),
                () = sleep_until(self.trim_at) => {
                    self.trim_at = None;
                    crate::memory::release_free();
                }
                // Outcomes held for a run still in flight: `admit_at` knows
                // when to take them if that run hangs.
                () = held.notified() => {}
                () = sleep_until(resync_at) => {
                    // Compare with the disk again: repairs an output changed
                    // behind our back.
                    for entry in self.entries.values_mut() {
                        entry.recheck_disk = true;
                    }
                    self.mark_all();
                    resync_at = self.config.daemon.resync.map(|d| Instant::now() + d);
                }
                () = sleep_until(poll_at) => {
                    self.mark_all();
                    poll_at = self.config.daemon.poll.map(|d| Instant::now() + d);
                }
                Some(reply) = self.pings.recv() => {
                    let _ = reply.send(());
                    continue;
                }
                Some(()) = recv_signal(&mut hangup) => {
                    let reconfigure = self.reconfigure.clone();
                    let tx = reread_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.send(reconfigure());
                    });
                }
                Some(result) = reread_rx.recv() => {
                    match result {
                        Ok(mut config) => {
                            // From this line on, in the format it asks for.
                            crate::telemetry::set_log_format(config.daemon.log_format);
                            info!("SIGHUP: configuration re-read");
                            self.move_listener(&mut config.daemon);
                            warn_kept_settings(&self.config.daemon, &config.daemon);
                            self.apply(config);
                            resync_at = self.config.daemon.resync.map(|d| Instant::now() + d);
                            poll_at = self.config.daemon.poll.map(|d| Instant::now() + d);
                        }
                        Err(e) => error!(error = %e,
                            "SIGHUP: the new configuration is invalid; keeping the running one"),
                    }
                }
            }
            self.start_rewatch();
            self.dispatch();
        }
        // Stop watching and rendering; what came back (the outcomes held
        // too) still asks for its reloads, and they get the grace period.
        self.runs.close();
        while let Ok(finished) = self.done.1.try_recv() {
            self.finished(finished);
        }
        self.release_startup_reloads();
        self.watch = WatchSlot::Off;
        self.events = None;
        self.reloader.close(Some(SHUTDOWN_GRACE)).await;
    }

    /// Takes a configuration: new bundles and key pairs get an entry, those
    /// still configured keep their state (same bytes at the same path: no
    /// rewrite, no reload), those gone are dropped.
    fn apply(&mut self, config: Config) {
        self.trim_pending = true;
        let state_dir = config.daemon.state_dir.clone();
        let mut wanted: Vec<Target> = config
            .bundles
            .iter()
            .cloned()
            .map(|c| Target::Bundle(Box::new(BundleState::new(c, state_dir.as_deref()))))
            .chain(
                config
                    .keypairs
                    .iter()
                    .cloned()
                    .map(|c| Target::KeyPair(Box::new(KeyPairState::new(c)))),
            )
            .collect();
        let keep: HashSet<(Kind, String)> = wanted
            .iter()
            .map(|t| (t.kind(), t.name().to_owned()))
            .collect();
        let tally = &mut self.tally;
        self.entries.retain(|id, entry| {
            if keep.contains(&(entry.kind, entry.name.clone())) {
                return true;
            }
            // In flight: dropped when it comes back.
            entry.removed = true;
            let in_flight = entry.target.is_none();
            if !in_flight {
                tally.change(*id, Some(entry.standing()), None);
            }
            in_flight
        });
        // Queued but not started: a removed target is dropped now, the
        // others go back to their entry and take the new configuration
        // below (a queued run would render under the old one).
        for job in self.runs.take_queued() {
            match self.entries.get_mut(&job.id) {
                Some(entry) if !entry.removed => {
                    entry.urgent |= job.urgent;
                    entry.recheck_disk |= matches!(
                        job.work,
                        Work::Render {
                            recheck_disk: true,
                            ..
                        }
                    );
                    entry.target = Some(job.target);
                }
                _ => {
                    if let Some(entry) = self.entries.remove(&job.id) {
                        self.tally.change(job.id, Some(entry.standing()), None);
                    }
                }
            }
        }
        let by_name: HashMap<(Kind, String), u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.removed)
            .map(|(id, e)| ((e.kind, e.name.clone()), *id))
            .collect();
        for fresh in wanted.drain(..) {
            let existing = by_name
                .get(&(fresh.kind(), fresh.name().to_owned()))
                .and_then(|id| self.entries.get_mut(id));
            match existing {
                Some(entry) => {
                    match &mut entry.target {
                        Some(target) => reconfigure_target(target, fresh),
                        None => entry.reconfigured = Some(fresh),
                    }
                    entry.dirty = Dirty::All;
                }
                None => {
                    let entry = Entry::new(fresh);
                    self.tally
                        .change(self.next_id, None, Some(entry.standing()));
                    self.entries.insert(self.next_id, entry);
                    self.next_id += 1;
                }
            }
        }
        let specs: Vec<_> = config
            .bundles
            .iter()
            .flat_map(|b| &b.reloads)
            .chain(config.keypairs.iter().flat_map(|k| &k.reloads))
            .collect();
        self.reloader.retain(&specs);
        self.config = config;
        self.rewatch = true;
        self.generation += 1;
        self.hold_for_watches();
        self.agenda.mark_everyone();
        self.keep_configured_metrics();
    }

    /// Holds renders until the refresh of the configuration taken sets its
    /// watches (or [`WATCH_FIRST`] passed): what changes once a watch is
    /// set is seen, so a target read before its watch would be read twice.
    fn hold_for_watches(&mut self) {
        if !matches!(self.watch, WatchSlot::Off) {
            self.hold = Some(Instant::now() + WATCH_FIRST);
        }
    }

    /// Keeps the metrics of the entries configured now alone: a bundle
    /// gone from the configuration takes its series with it (its gauges,
    /// an expiry counting down among them, would go on describing bundles
    /// nothing keeps any more), except those an entry still configured
    /// bears (a bundle and a key pair may share a name).
    fn keep_configured_metrics(&self) {
        self.metrics.keep_only(
            self.entries
                .values()
                .filter(|e| !e.removed)
                .map(|e| e.name.as_str()),
        );
    }

    /// A watch event: the sources it concerns wait for the debounce.
    fn note(&mut self, change: Change) {
        match change {
            Change::Events(events) => {
                self.metrics.watch_events.inc_by(events.len() as u64);
                let mut hit = HashSet::new();
                for event in &events {
                    self.rewatch |= self.routes.route(event, &mut hit);
                }
                for (index, source) in hit {
                    if let Some(id) = self.route_ids.get(index) {
                        self.pending
                            .entry(*id)
                            .or_default()
                            .add(Dirty::source(source));
                    }
                }
            }
            Change::Rescan => {
                self.metrics.watch_events.inc();
                self.rewatch = true;
                for id in self.entries.keys() {
                    self.pending.insert(*id, Dirty::All);
                }
            }
        }
    }

    /// The debounce is over: what the events concerned is to be read.
    fn settle(&mut self) {
        for (id, dirty) in self.pending.drain() {
            if let Some(entry) = self.entries.get_mut(&id) {
                entry.dirty.add(dirty);
                self.agenda.mark(id);
            }
        }
    }

    /// Marks everything to be read again; the watches are checked too.
    fn mark_all(&mut self) {
        self.rewatch = true;
        for entry in self.entries.values_mut() {
            entry.dirty = Dirty::All;
        }
        self.agenda.mark_everyone();
    }

    /// Queues the run of every dirty target that is not already queued or
    /// running. Bundles first: a key pair may chain to one that is about to
    /// change.
    fn dispatch(&mut self) {
        if self.hold.is_some() {
            return;
        }
        let due = self.agenda.due(&self.entries);
        if due.is_empty() {
            return;
        }
        let jobs: Vec<Job> = due.into_iter().filter_map(|id| self.job(id)).collect();
        self.runs.push(jobs);
    }

    /// The run of entry `id`, its target taken out of the entry; `None`
    /// when it has nothing to run.
    fn job(&mut self, id: u64) -> Option<Job> {
        let work = {
            let entry = self.entries.get(&id)?;
            match entry.kind {
                Kind::Bundle => Work::Render {
                    only: match &entry.dirty {
                        Dirty::All | Dirty::Clean => None,
                        Dirty::Sources(s) => Some(s.clone()),
                    },
                    recheck_disk: entry.recheck_disk,
                },
                Kind::KeyPair => {
                    let chain = match &entry.target {
                        Some(Target::KeyPair(k)) => k.config.chain_to.clone(),
                        _ => None,
                    };
                    let bundle = chain.as_ref().and_then(|name| {
                        self.entries
                            .values()
                            .find(|e| e.kind == Kind::Bundle && &e.name == name)
                    });
                    let chain_to = bundle.and_then(|e| e.last.clone());
                    if chain.is_some() && chain_to.is_none() {
                        // At start the bundle's first render is on its way:
                        // the pair is checked when it comes back.
                        if bundle.is_some_and(|b| b.initial) {
                            debug!(keypair = %entry.name,
                                "waits for the first render of the bundle it must chain to");
                        } else {
                            warn!(keypair = %entry.name,
                                "held: the bundle it must chain to has not rendered yet");
                        }
                        if let Some(entry) = self.entries.get_mut(&id) {
                            entry.dirty = Dirty::Clean;
                        }
                        return None;
                    }
                    Work::Check { chain_to }
                }
            }
        };
        let entry = self.entries.get_mut(&id)?;
        let target = entry.target.take()?;
        entry.dirty = Dirty::Clean;
        entry.recheck_disk = false;
        let urgent = std::mem::take(&mut entry.urgent);
        // A bundle's one reload, a signal only it names, leaves from the
        // run's own thread once the outputs are in place, when nothing else
        // holds the action (ARCHITECTURE.md, "The event loop").
        let direct = match &target {
            Target::Bundle(state) => match state.config.reloads.as_slice() {
                [spec] => self.reloader.direct(spec),
                _ => None,
            },
            Target::KeyPair(_) => None,
        }
        .map(|direct| {
            let request = Request {
                names: [entry.name.clone()].into(),
                startup: entry.initial,
                urgent,
                ..Request::default()
            };
            (direct, request)
        });
        Some(Job {
            id,
            target,
            work,
            urgent,
            next_change: entry.next_change,
            direct,
        })
    }

    /// A run came back: its outcome is recorded and its reloads requested.
    fn finished(
        &mut self,
        Finished {
            id,
            target,
            outcome,
            reloaded,
            urgent,
        }: Finished,
    ) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        if entry.removed {
            self.tally.change(id, Some(entry.standing()), None);
            self.agenda.set_next_change(&mut entry.next_change, None);
            // What its run recorded on its way back started no series: its
            // name is no longer configured.
            self.entries.remove(&id);
            return;
        }
        let before = entry.standing();
        let initial = std::mem::replace(&mut entry.initial, false);
        let mut target = target;
        let mut chained_changed = None;
        match outcome {
            Outcome::Rendered(Ok(report)) => {
                entry.refusal = None;
                self.agenda
                    .set_next_change(&mut entry.next_change, report.next_change);
                // A symlink to another directory came or went: watched
                // from the next refresh.
                if entry.links != report.links {
                    entry.links = report.links.clone();
                    self.rewatch = true;
                }
                if report.failed.is_empty() {
                    entry.retry = None;
                    let first = !entry.rendered;
                    entry.rendered = true;
                    let changed = report
                        .previous
                        .as_ref()
                        .is_none_or(|p| **p != *report.bundle);
                    entry.last = Some(report.bundle.clone());
                    if changed || first {
                        chained_changed = Some(entry.name.clone());
                    }
                } else {
                    entry.refusal = Some("output");
                    let attempt = entry.retry.map_or(1, |(_, n)| n + 1);
                    let wait = FIRST_RETRY
                        .saturating_mul(1 << (attempt - 1).min(8))
                        .min(MAX_RETRY);
                    entry.retry = Some((Instant::now() + wait, attempt));
                    self.agenda.retry_set();
                }
                if let (Some(outputs), Target::Bundle(state)) = (&report.reload, &target) {
                    for spec in &state.config.reloads {
                        if reloaded.as_ref() == Some(spec) {
                            continue;
                        }
                        request_reload(
                            &mut self.startup_reloads,
                            &mut self.reloader,
                            spec,
                            Request {
                                names: [entry.name.clone()].into(),
                                outputs: outputs.clone(),
                                startup: initial,
                                urgent,
                                ..Request::default()
                            },
                        );
                    }
                }
            }
            Outcome::Rendered(Err(refusal)) => {
                self.agenda.set_next_change(&mut entry.next_change, None);
                entry.refusal = Some(refusal.reason());
                // Nothing to write until the sources change.
                entry.retry = None;
            }
            Outcome::Checked(result) => {
                if let Target::KeyPair(pair) = &target {
                    self.agenda
                        .set_next_change(&mut entry.next_change, pair.next_change);
                    if matches!(result, keypair::Outcome::Held(_)) {
                        self.metrics.refused(&entry.name, "keypair");
                    }
                    request_keypair_reloads(
                        &mut |spec, request| {
                            request_reload(
                                &mut self.startup_reloads,
                                &mut self.reloader,
                                spec,
                                request,
                            );
                        },
                        pair,
                        result,
                        urgent,
                    );
                }
            }
        }
        if let Some(fresh) = entry.reconfigured.take() {
            reconfigure_target(&mut target, fresh);
            entry.dirty = Dirty::All;
        }
        entry.target = Some(target);
        self.agenda.mark(id);
        self.tally.change(id, Some(before), Some(entry.standing()));
        // Key pairs that chain to a bundle that changed are checked again
        // (the configuration says whether any does: a thousand bundles at
        // start need not each look through every entry).
        if let Some(bundle) = chained_changed.filter(|bundle| {
            self.config
                .keypairs
                .iter()
                .any(|k| k.chain_to.as_deref() == Some(bundle.as_str()))
        }) {
            for (id, e) in &mut self.entries {
                let chains = matches!(&e.target, Some(Target::KeyPair(k))
                    if k.config.chain_to.as_deref() == Some(bundle.as_str()))
                    || matches!(&e.reconfigured, Some(Target::KeyPair(k))
                    if k.config.chain_to.as_deref() == Some(bundle.as_str()));
                if e.kind == Kind::KeyPair && (chains || e.target.is_none()) {
                    e.dirty.add(Dirty::All);
                    self.agenda.mark(*id);
                }
            }
        }
    }

    /// Lets the start's reloads go, each action once for every target that
    /// asked; from now on every request goes at once.
    fn release_startup_reloads(&mut self) {
        if let Some(held) = self.startup_reloads.take() {
            if !held.requests.is_empty() {
                self.trim_at = Some(Instant::now() + TRIM_AFTER_RELOADS);
            }
            for (spec, request) in held.requests {
                self.reloader.request(&spec, request);
            }
        }
    }

    /// After runs came back: the status (started, ready, the summary line).
    fn report_status(&self) {
        debug_assert_eq!(self.tally, self.tally_from_scratch());
        self.status
            .rendered(self.tally.started(), self.tally.ready(), self.summary());
    }

    /// The tally counted from every entry: what the kept one must equal
    /// (checked in debug builds, so every daemon test checks it).
    fn tally_from_scratch(&self) -> Tally {
        let mut tally = Tally::default();
        for (id, entry) in &self.entries {
            tally.change(*id, None, Some(entry.standing()));
        }
        tally
    }

    /// One line for systemd's STATUS= and `/readyz`: each bundle and its
    /// state, or, past [`SUMMARY_BUNDLES`] bundles, how many are in each
    /// state and the first few that are not rendered (the line is built
    /// after every batch of runs: from the tally, not from every entry).
    fn summary(&self) -> String {
        use std::fmt::Write as _;
        let state = |e: &Entry| match (&e.last, &e.refusal) {
            (_, Some(reason)) => format!("{}: refused ({reason})", e.name),
            (Some(bundle), None) => format!("{}: {} certificates", e.name, bundle.len()),
            (None, None) => format!("{}: not rendered", e.name),
        };
        if self.tally.bundles() <= SUMMARY_BUNDLES {
            return self
                .entries
                .values()
                .filter(|e| e.kind == Kind::Bundle)
                .map(state)
                .collect::<Vec<_>>()
                .join("; ");
        }
        let (rendered, refused, pending) = self.tally.counts();
        let named: Vec<String> = self
            .tally
            .unsettled()
            .take(SUMMARY_BUNDLES)
            .filter_map(|id| self.entries.get(&id))
            .map(state)
            .collect();
        let mut line =
            format!("{rendered} bundles rendered, {refused} refused, {pending} not rendered");
        if !named.is_empty() {
            let _ = write!(line, "; {}", named.join("; "));
            if refused + pending > named.len() {
                line.push_str("; ...");
            }
        }
        line
    }

    /// Starts a watch refresh on the blocking pool if one is due and none
    /// runs; the routes in use stay until it comes back.
    fn start_rewatch(&mut self) {
        if !self.rewatch {
            return;
        }
        let WatchSlot::Idle(_) = &self.watch else {
            if matches!(self.watch, WatchSlot::Off) {
                self.rewatch = false;
            }
            return;
        };
        let WatchSlot::Idle(mut watch) = std::mem::replace(&mut self.watch, WatchSlot::Busy) else {
            return;
        };
        self.rewatch = false;
        let ids: Vec<u64> = self.entries.keys().copied().collect();
        let bundles: HashMap<&str, usize> = self
            .config
            .bundles
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.as_str(), i))
            .collect();
        let wanted: Vec<Vec<WatchPoint>> = self
            .entries
            .values()
            .map(|e| e.watch_points(&self.config, &bundles))
            .collect();
        let tx = self.refreshed.0.clone();
        let generation = self.generation;
        tokio::task::spawn_blocking(move || {
            // A directory on NFS or FUSE can block its lookup for good: the
            // others are watched first, and their routes sent at once.
            let hanging = std::fs::read_to_string("/proc/self/mountinfo")
                .map(|m| crate::source::mounts::hanging_mounts(&m))
                .unwrap_or_default();
            let under = |p: &WatchPoint| hanging.iter().any(|m| p.dir.starts_with(m));
            if wanted.iter().flatten().any(under) {
                let safe: Vec<Vec<WatchPoint>> = wanted
                    .iter()
                    .map(|points| points.iter().filter(|p| !under(p)).cloned().collect())
                    .collect();
                let result = watch.set(&safe);
                let _ = tx.send(Refreshed::Partly {
                    routes: watch.routes(),
                    directories: watch.len(),
                    ids: ids.clone(),
                    generation,
                    result,
                });
            }
            let result = watch.set(&wanted);
            let _ = tx.send(Refreshed::Done {
                watch,
                ids,
                generation,
                result,
            });
        });
    }

    /// A refresh came back (or its part that cannot hang): its routes
    /// replace the old ones, and targets that gained a watch are read again
    /// (what changed before the watch existed was not seen), unless it is
    /// the refresh the configuration's held renders wait for: it lets them
    /// go, and none was read before.
    fn took_routes(
        &mut self,
        routes: Routes,
        directories: usize,
        ids: Vec<u64>,
        generation: u64,
        result: Result<HashSet<usize>, WatchError>,
    ) {
        // The configuration's renders were held for these watches: nothing
        // of it was read before them, so nothing needs reading again.
        let first = self.hold.is_some() && generation == self.generation;
        self.routes = routes;
        self.route_ids = ids;
        if self.watching.replace(directories) == Some(directories) {
            debug!(directories, "watching");
        } else {
            info!(directories, "watching");
        }
        match result {
            Ok(gained) if !first => {
                for index in gained {
                    let id = self.route_ids.get(index).copied();
                    if let Some((id, entry)) =
                        id.and_then(|id| Some((id, self.entries.get_mut(&id)?)))
                    {
                        entry.dirty.add(Dirty::All);
                        self.agenda.mark(id);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                error!(error = %e,
                    "watching is incomplete; changes may be seen only at the next resync");
                // Some watches were added all the same: what changed before
                // them was not seen.
                for entry in self.entries.values_mut() {
                    entry.dirty.add(Dirty::All);
                }
                self.agenda.mark_everyone();
            }
        }
        if first {
            self.hold = None;
        }
    }
}

impl Daemon {
    /// A new `[daemon] listen`: the listener moves there (bound before the
    /// old one goes). Where it cannot, the old one keeps serving, and the
    /// running configuration keeps its address, so that the next SIGHUP
    /// tries again.
    fn move_listener(&self, new: &mut crate::config::Daemon) {
        let running = self.config.daemon.listen;
        let Some(listener) = &self.listener else {
            return;
        };
        if new.listen == running {
            return;
        }
        let mut listener = listener.lock().unwrap_or_else(|e| e.into_inner());
        match listener.move_to(new.listen) {
            Ok(()) => match listener.local_addr() {
                Some(addr) => info!(addr = %addr, "SIGHUP: the listener moved"),
                None => info!(
                    "SIGHUP: no listen address any more; /metrics, /healthz and /readyz are no longer served"
                ),
            },
            Err(e) => {
                warn!(error = %e, "SIGHUP: the listener stays where it was");
                new.listen = running;
            }
        }
    }
}

/// Names, in a warning, the `[daemon]` settings a new configuration changes
/// that the running daemon keeps until it restarts: the log format, polling
/// or inotify, and (for the bundles it already runs) the state directory.
/// The rest of the new configuration is taken; the listener moves
/// ([`Daemon::move_listener`]).
fn warn_kept_settings(running: &crate::config::Daemon, new: &crate::config::Daemon) {
    let kept = [
        ("poll", running.poll.is_some() != new.poll.is_some()),
        ("state_dir", running.state_dir != new.state_dir),
    ];
    for (key, changed) in kept {
        if changed {
            warn!(
                key = %format!("daemon.{key}"),
                "SIGHUP: this setting changed; the running daemon keeps its own until it restarts"
            );
        }
    }
}

/// A new configuration for a target of the same name: a bundle keeps what
/// it published and retained; a key pair keeps the pair it accepted.
fn reconfigure_target(target: &mut Target, fresh: Target) {
    match (target, fresh) {
        (Target::Bundle(state), Target::Bundle(fresh)) => state.reconfigure(fresh.config),
        (Target::KeyPair(pair), Target::KeyPair(fresh)) => pair.config = fresh.config,
        (target, fresh) => *target = fresh,
    }
}

/// The outputs a bundle's run asks to reload, if it asks.
fn reload_outputs(outcome: &Outcome) -> Option<&std::collections::BTreeSet<std::path::PathBuf>> {
    match outcome {
        Outcome::Rendered(Ok(report)) => report.reload.as_ref(),
        _ => None,
    }
}

/// A key pair's check: a real change reloads (at start, only where a
/// probe shows the app serving another certificate).
fn request_keypair_reloads(
    request_reload: &mut dyn FnMut(&ReloadSpec, Request),
    pair: &KeyPairState,
    outcome: keypair::Outcome,
    urgent: bool,
) {
    let name = &pair.config.name;
    match outcome {
        keypair::Outcome::Unchanged => {
            debug!(keypair = %name, held = ?pair.held, "key pair checked; nothing new");
        }
        keypair::Outcome::Held(reason) => {
            warn!(keypair = %name, reason = %reason, "key pair held; no reload");
        }
        keypair::Outcome::Changed { first } => {
            let Some(accepted) = &pair.accepted else {
                return;
            };
            info!(keypair = %name, certificate = %keypair::describe(accepted), first,
                outcome = if first { "loaded" } else { "changed" }, "key pair checked");
            for spec in &pair.config.reloads {
                if first && !matches!(spec.probe, Some(Probe::Tls(_))) {
                    continue;
                }
                request_reload(
                    spec,
                    Request {
                        names: [name.clone()].into(),
                        outputs: pair.config.outputs().into_iter().collect(),
                        startup: first,
                        expect: Some(accepted.leaf.clone()),
                        only_if_stale: first,
                        urgent,
                    },
                );
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn recv_events(events: &mut Option<Events>) -> Change {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv_signal(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
