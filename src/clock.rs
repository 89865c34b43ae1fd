//! The daemon's one clock: what time it is (unix seconds, for expiry,
//! not-before holds and retention) and a timer that fires at a wall-clock
//! instant (guarantee 7).
//!
//! The system clock's timer is a `timerfd` on `CLOCK_REALTIME` armed at an
//! absolute time: the kernel fires it at that wall-clock instant even if the
//! clock is stepped or the machine was suspended in between, which a sleep
//! on the monotonic clock would not. One thread blocks in its `read`, so
//! waiting costs no wakeup.
//! The virtual clock follows tokio's clock, so tests pause and advance time
//! instead of waiting real seconds.
//!
//! Debounce, backoff and `min_interval` are durations, not instants: they
//! run on tokio's clock (paused in tests) and need nothing from here.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::sync::Notify;
use tracing::warn;

/// A margin after the second begins, so that "now" reads that second.
const MARGIN: Duration = Duration::from_millis(5);

#[derive(Debug, Clone)]
pub enum Clock {
    /// The machine's wall clock.
    System,
    /// Tokio's clock, from `unix` seconds at `base` (tests pause it).
    Virtual {
        unix: i64,
        base: tokio::time::Instant,
    },
}

impl Clock {
    /// A virtual clock reading `unix` now.
    pub fn starting_at(unix: i64) -> Self {
        Self::Virtual {
            unix,
            base: tokio::time::Instant::now(),
        }
    }

    /// Unix time now, in seconds.
    pub fn now(&self) -> i64 {
        match self {
            Self::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            Self::Virtual { unix, base } => unix + base.elapsed().as_secs() as i64,
        }
    }

    /// A timer on this clock, disarmed.
    pub fn timer(&self) -> WallTimer {
        WallTimer {
            clock: self.clone(),
            system: None,
            armed: None,
        }
    }
}

/// Fires when the clock reaches a unix second.
pub struct WallTimer {
    clock: Clock,
    system: Option<SystemTimer>,
    armed: Option<i64>,
}

/// A `timerfd` and the thread that waits on it: a blocked `read` costs no
/// wakeup, and the event loop hears of it through `fired`.
struct SystemTimer {
    fd: Arc<TimerFd>,
    fired: Arc<Notify>,
}

impl SystemTimer {
    fn start() -> std::io::Result<Self> {
        let fd = Arc::new(TimerFd::new(
            ClockId::CLOCK_REALTIME,
            TimerFlags::TFD_CLOEXEC,
        )?);
        let fired = Arc::new(Notify::new());
        let (waiting, notify) = (fd.clone(), fired.clone());
        std::thread::Builder::new()
            .name("anchorage-timer".into())
            .spawn(move || {
                // Ends with the process; a wait error ends it early, and
                // the loop falls back to a monotonic sleep.
                while waiting.wait().is_ok() {
                    notify.notify_one();
                }
            })?;
        Ok(Self { fd, fired })
    }
}

impl WallTimer {
    /// Resolves once the clock reads `at` or later; never with `None`. The
    /// timer is re-armed only when `at` changes.
    pub async fn wait(&mut self, at: Option<i64>) {
        let Some(at) = at else {
            return std::future::pending().await;
        };
        if let Clock::Virtual { unix, base } = &self.clock {
            let offset = Duration::from_secs(at.saturating_sub(*unix).max(0) as u64);
            return tokio::time::sleep_until(*base + offset + MARGIN).await;
        }
        loop {
            if self.clock.now() >= at {
                self.armed = None;
                return;
            }
            if self.armed != Some(at) {
                if let Err(e) = self.arm(at) {
                    warn!(error = %e, "cannot arm a wall-clock timer; using a monotonic sleep");
                    let left = (at - self.clock.now()).max(0) as u64;
                    return tokio::time::sleep(Duration::from_secs(left) + MARGIN).await;
                }
            }
            match &self.system {
                Some(timer) => timer.fired.notified().await,
                None => return std::future::pending().await,
            }
        }
    }

    fn arm(&mut self, at: i64) -> std::io::Result<()> {
        if self.system.is_none() {
            self.system = Some(SystemTimer::start()?);
        }
        if let Some(timer) = &self.system {
            let when = TimeSpec::new(at.max(1), MARGIN.as_nanos() as i64);
            timer.fd.set(
                Expiration::OneShot(when),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME,
            )?;
        }
        self.armed = Some(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn virtual_clock_follows_tokio_time() {
        let clock = Clock::starting_at(1_000);
        assert_eq!(clock.now(), 1_000);
        let mut timer = clock.timer();
        timer.wait(Some(1_090)).await;
        assert_eq!(clock.now(), 1_090);
    }

    #[tokio::test]
    async fn system_timer_fires_at_the_wall_clock_second() {
        let clock = Clock::System;
        let mut timer = clock.timer();
        let at = clock.now() + 1;
        tokio::time::timeout(Duration::from_secs(5), timer.wait(Some(at)))
            .await
            .expect("fired");
        assert!(clock.now() >= at);
    }
}
