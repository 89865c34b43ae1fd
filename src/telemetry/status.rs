//! What the event loop tells the outside: ready (every bundle rendered once),
//! alive (it answers a ping), and a summary after each render for systemd's
//! `STATUS=`. The health endpoints and the systemd notifier read it; the
//! event loop writes it, and the threads that run renders say when each
//! starts and ends.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

/// After each render cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Renders and checks finished so far.
    pub cycles: u64,
    /// Every bundle and key pair has been through its first render or
    /// check (rendered or refused): a supervised child starts then.
    pub started: bool,
    pub ready: bool,
    /// One line for people, e.g. `peers: 3 certificates; web: refused (damaged)`.
    pub summary: String,
}

pub struct Status {
    ready: AtomicBool,
    /// The bundles and key pairs whose render or check is running (by the
    /// daemon's id), and since when: one that runs long is stuck (a hung
    /// filesystem).
    busy: Mutex<Vec<(u64, String, Instant)>>,
    pings: mpsc::Sender<oneshot::Sender<()>>,
    reports: watch::Sender<Report>,
}

/// The event loop's side: pings to answer.
pub type Pings = mpsc::Receiver<oneshot::Sender<()>>;

impl Status {
    pub fn new() -> (std::sync::Arc<Self>, Pings) {
        let (tx, rx) = mpsc::channel(16);
        let status = Self {
            ready: AtomicBool::new(false),
            busy: Mutex::new(Vec::new()),
            pings: tx,
            reports: watch::Sender::new(Report::default()),
        };
        (std::sync::Arc::new(status), rx)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Whether the event loop answers within `timeout`: a loop stuck in a
    /// render or a blocked call does not.
    pub async fn alive(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.pings.try_send(tx).is_err() {
            // A full queue of unanswered pings is a stuck loop too.
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// The renders or checks that have run for longer than `limit`, with
    /// how long: `/readyz` names them.
    pub fn stuck(&self, limit: Duration) -> Vec<(String, Duration)> {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, name, since)| (name.clone(), since.elapsed()))
            .filter(|(_, running)| *running > limit)
            .collect()
    }

    /// Called by the thread that runs a render or check, as it starts.
    pub fn run_started(&self, id: u64, name: &str) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.push((id, name.to_owned(), Instant::now()));
    }

    /// Called by that thread once the run is over.
    pub fn run_ended(&self, id: u64) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.retain(|(running, _, _)| *running != id);
    }

    pub fn subscribe(&self) -> watch::Receiver<Report> {
        self.reports.subscribe()
    }

    /// Called by the event loop after each render or check. `ready` is the
    /// state now: a bundle a SIGHUP added is not ready until it rendered
    /// once, and `/readyz` says so; the report's `ready` stays true once it
    /// was (systemd is told READY once).
    pub fn rendered(&self, started: bool, ready: bool, summary: String) {
        self.ready.store(ready, Ordering::Relaxed);
        self.reports.send_modify(|r| {
            r.cycles += 1;
            r.started |= started;
            r.ready |= ready;
            r.summary = summary;
        });
    }
}
