//! systemd's notify protocol (sd_notify(3)), when `NOTIFY_SOCKET` is set:
//! `READY=1` once every bundle has rendered once, `STATUS=` after each render
//! cycle, `WATCHDOG=1` every half `WATCHDOG_USEC` while the event loop
//! answers, and `STOPPING=1` at shutdown.
//!
//! It runs on a thread of its own, never on the event loop's: the watchdog
//! pings must stop when the event loop is stuck, so that systemd restarts a
//! daemon that no longer keeps its bundle fresh, and they can only stop for
//! that reason if something other than the loop sends them.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to a unix socket, a path
//! or (`@name`) a Linux abstract socket; std speaks it without a crate.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info, warn};

use super::status::{Report, Status};

/// A running notifier. [`Notifier::stopping`] tells systemd the daemon is
/// stopping; dropping it only stops the thread.
pub struct Notifier {
    socket: Arc<Socket>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts notifying systemd if `NOTIFY_SOCKET` is set (and usable: a bad
/// value is logged, not fatal). `None` when there is nobody to tell.
pub fn start(status: Arc<Status>) -> Option<Notifier> {
    let value = std::env::var_os("NOTIFY_SOCKET")?;
    let socket = match Socket::open(&value) {
        Ok(socket) => Arc::new(socket),
        Err(e) => {
            warn!(NOTIFY_SOCKET = %value.to_string_lossy(), error = %e,
                "cannot notify systemd; going on without it");
            return None;
        }
    };
    let watchdog = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            warn!(error = %e, "cannot notify systemd; going on without it");
            return None;
        }
    };
    let (stop, stopped) = oneshot::channel();
    let worker = Worker {
        socket: socket.clone(),
        status,
        watchdog,
    };
    let thread = match std::thread::Builder::new()
        .name("anchorage-notify".into())
        .spawn(move || runtime.block_on(worker.run(stopped)))
    {
        Ok(thread) => thread,
        Err(e) => {
            warn!(error = %e, "cannot notify systemd; going on without it");
            return None;
        }
    };
    info!(
        NOTIFY_SOCKET = %value.to_string_lossy(),
        watchdog = ?watchdog.map(|d| humantime::format_duration(d).to_string()),
        "notifying systemd"
    );
    Some(Notifier {
        socket,
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl Notifier {
    /// Stops the pings, then sends `STOPPING=1`: nothing follows it.
    pub fn stopping(mut self) {
        self.shutdown();
        self.socket.send("STOPPING=1\nSTATUS=stopping\n");
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The watchdog period: half `WATCHDOG_USEC`, as sd_watchdog_enabled(3)
/// advises; none when unset, zero, or meant for another process
/// (`WATCHDOG_PID`).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec) / 2)
}

/// `NOTIFY_SOCKET`'s address: an absolute path, or `@name` for an abstract
/// socket.
fn socket_addr(value: &OsStr) -> io::Result<SocketAddr> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(value),
        Some(b'@') => abstract_addr(&bytes[1..]),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path or an @abstract socket name",
        )),
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

/// An unbound datagram socket and systemd's address: each message is sent
/// afresh, so a restarted systemd (daemon-reexec) is still reached.
struct Socket {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// Whether the last send failed, so a failure is logged once, not at
    /// every watchdog tick.
    failing: AtomicBool,
}

impl Socket {
    fn open(value: &OsStr) -> io::Result<Self> {
        let addr = socket_addr(value)?;
        let socket = UnixDatagram::unbound()?;
        // A full receive queue must never block a sender: a lost STATUS is
        // better than a stuck notifier.
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            addr,
            failing: AtomicBool::new(false),
        })
    }

    fn send(&self, message: &str) {
        match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!("systemd notifications are delivered again");
                }
            }
            Err(e) => {
                if self.failing.swap(true, Ordering::Relaxed) {
                    debug!(error = %e, "cannot notify systemd");
                } else {
                    warn!(error = %e, "cannot notify systemd");
                }
            }
        }
    }
}

struct Worker {
    socket: Arc<Socket>,
    status: Arc<Status>,
    watchdog: Option<Duration>,
}

impl Worker {
    async fn run(self, mut stopped: oneshot::Receiver<()>) {
        let mut reports = self.status.subscribe();
        let mut ready_sent = false;
        // The first render may have come before this thread subscribed.
        let first = reports.borrow_and_update().clone();
        if first.cycles > 0 {
            self.report(&first, &mut ready_sent);
        }
        let mut ticks = self.watchdog.map(|period| {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticks
        });
        // Waiting longer than most of a period would make the next ping late.
        let patience = self.watchdog.map_or(Duration::ZERO, |p| p * 3 / 4);
        let mut stuck = false;
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                Ok(()) = reports.changed() => {
                    let report = reports.borrow_and_update().clone();
                    self.report(&report, &mut ready_sent);
                }
                () = tick(&mut ticks) => {
                    let alive = tokio::select! {
                        _ = &mut stopped => return,
                        alive = self.status.alive(patience) => alive,
                    };
                    if alive {
                        self.socket.send("WATCHDOG=1\n");
                        if std::mem::take(&mut stuck) {
                            info!("the event loop answers again; systemd watchdog pings resume");
                        }
                    } else if !std::mem::replace(&mut stuck, true) {
                        warn!("the event loop is not answering; withholding systemd watchdog pings");
                    }
                }
            }
        }
    }

    fn report(&self, report: &Report, ready_sent: &mut bool) {
        // A newline would start another KEY=VALUE line.
        let summary = report.summary.replace('\n', " ");
        // Started, not ready: once every bundle and key pair has been
        // through its first render, refused ones too. A bad file at boot
        // must not have systemd time the start out and kill the daemon
        // that would render it once fixed; STATUS names what was refused
        // (and /readyz stays 503 for it).
        if report.started && !*ready_sent {
            *ready_sent = true;
            self.socket.send(&format!("READY=1\nSTATUS={summary}\n"));
        } else {
            self.socket.send(&format!("STATUS={summary}\n"));
        }
    }
}

async fn tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_is_half_the_period_and_for_this_pid_only() {
        let half = Some(Duration::from_millis(200));
        assert_eq!(watchdog_interval(Some("400000"), None, 7), half);
        assert_eq!(watchdog_interval(Some("400000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval(Some("400000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("400000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn socket_is_a_path_or_abstract() {
        let path = socket_addr(OsStr::new("/run/systemd/notify")).expect("path");
        assert_eq!(
            path.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let named = socket_addr(OsStr::new("@sd/notify")).expect("abstract");
            assert_eq!(named.as_abstract_name(), Some(&b"sd/notify"[..]));
        }
        assert!(socket_addr(OsStr::new("relative/notify")).is_err());
        assert!(socket_addr(OsStr::new("")).is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_receives() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("anchorage-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let receiver = UnixDatagram::bind_addr(&addr).expect("bind");
        let socket = Socket::open(OsStr::new(&format!("@{name}"))).expect("open");
        socket.send("READY=1\n");
        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
