//! What the event loop tells the outside: ready (every bundle rendered once),
//! alive (it answers a ping), and a summary after each render for systemd's
//! `STATUS=`. The health endpoints and the systemd notifier read it; only the
//! event loop writes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

/// After each render cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Render cycles so far.
    pub cycles: u64,
    pub ready: bool,
    /// One line for people, e.g. `peers: 3 certificates; web: refused (damaged)`.
    pub summary: String,
}

pub struct Status {
    ready: AtomicBool,
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

    pub fn subscribe(&self) -> watch::Receiver<Report> {
        self.reports.subscribe()
    }

    /// Called by the event loop after each render cycle.
    pub fn rendered(&self, ready: bool, summary: String) {
        if ready {
            self.ready.store(true, Ordering::Relaxed);
        }
        self.reports.send_modify(|r| {
            r.cycles += 1;
            r.ready |= ready;
            r.summary = summary;
        });
    }
}
