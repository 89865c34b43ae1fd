//! The runs in flight: a queue of targets to render or check, and the
//! blocking-pool threads that take them one after the other (ARCHITECTURE.md,
//! "The event loop").
//!
//! The loop queues every target that is due at once; at most
//! [`runs_at_once`] threads take from the queue, each until it is empty.
//! A thousand bundles at start are a handful of threads working through
//! the queue, not a thousand hand-offs between the loop and the pool (and
//! not a thread, a stack and an allocator arena per bundle). A thread whose
//! run has lasted [`STUCK_RUN`] no longer counts: another one is started
//! for the rest of the queue, so a hung filesystem holds only the target
//! that reads it (guarantee 10).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::debug;

use super::Finished;
use super::target::{self, Target, Work};
use crate::clock::Clock;
use crate::reload::{Direct, DirectClaim, Request};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::status::Status;

/// A run in flight longer than this no longer holds back others (see
/// [`runs_at_once`]): a hung filesystem delays the other targets that long
/// at most, and only when it holds every thread.
pub const STUCK_RUN: Duration = Duration::from_secs(1);

/// How many threads may take from the queue at once (not counting stuck
/// ones): two cores do a thousand renders one after the other anyway.
/// The cores are counted once, when the queue is made (the count reads
/// files; the loop does not).
fn runs_at_once() -> usize {
    crate::parallel::cores().saturating_mul(2).max(4)
}

/// The queue's room kept once it is empty.
const KEPT_ROOM: usize = 16;

/// While jobs wait, the outcomes of this many runs go back to the loop
/// together (see [`Shared::report`]).
const REPORTED_TOGETHER: usize = 16;

/// An outcome held this long goes back with the next run that ends, however
/// few are held: runs that are slow, not stuck, do not hold it back longer.
const REPORTED_WITHIN: Duration = Duration::from_millis(50);

/// One target's run: the target, moved out of its entry, and its work.
pub struct Job {
    pub id: u64,
    pub target: Target,
    pub work: Work,
    /// Caused by an expiry: it goes ahead of the queue.
    pub urgent: bool,
    /// The target's next change (unix seconds) when it was queued: a run
    /// that starts at or after it renders the expiry, and is urgent even if
    /// the loop has not seen the instant pass yet.
    pub next_change: Option<i64>,
    /// The target's lone signal, sent from the run's thread once the
    /// outputs are in place, and the request it stands for.
    pub direct: Option<(Direct, Request)>,
}

/// The queue and its threads. Dropping it empties the queue: threads end
/// after the run in their hands.
pub struct Runs {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Validity is judged when a run starts, not when it was queued.
    clock: Clock,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    done: mpsc::UnboundedSender<Finished>,
    /// Told when outcomes start to be held (see [`Runs::held`]).
    held: Arc<Notify>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Runs done, their outcomes not yet sent to the loop, and since when
    /// the first of them waits.
    finished: Vec<Finished>,
    held_since: Option<Instant>,
    /// The threads taking from the queue.
    threads: Vec<Thread>,
    next_thread: u64,
    closed: bool,
}

/// A thread taking from the queue.
struct Thread {
    key: u64,
    /// Running a job (else started, or between two jobs: about to take
    /// the next).
    running: bool,
    /// When it last started, took a job or finished one.
    since: Instant,
}

impl Thread {
    fn stuck(&self, now: Instant) -> bool {
        self.running && now.saturating_duration_since(self.since) >= STUCK_RUN
    }
}

impl State {
    /// How many threads count against [`runs_at_once`] (not the stuck
    /// ones), and how many are about to take a job.
    fn counts(&self, now: Instant) -> (usize, usize) {
        let counted = self.threads.iter().filter(|t| !t.stuck(now)).count();
        let idle = self.threads.iter().filter(|t| !t.running).count();
        (counted, idle)
    }

    /// Thread `key` took a job (`running`) or finished one, now.
    fn mark(&mut self, key: u64, running: bool) {
        if let Some(thread) = self.threads.iter_mut().find(|t| t.key == key) {
            thread.running = running;
            thread.since = Instant::now();
        }
    }

    /// Whether one of `queued` jobs waits that no thread will take
    /// without another one.
    fn wants_thread(&self, now: Instant, queued: usize) -> bool {
        let (counted, idle) = self.counts(now);
        counted < runs_at_once() && idle < queued
    }

    /// The next job.
    fn take(&mut self) -> Option<Job> {
        self.queue.pop_front()
    }

    /// Thread `key`'s run ended with `finished`; the outcomes to send to
    /// the loop now (see [`Shared::report`]).
    fn finish(&mut self, key: u64, finished: Finished, now: Instant) -> Vec<Finished> {
        // Its run has ended, under this lock: two runs that end at once
        // must not each wait for the other.
        self.mark(key, false);
        let urgent = finished.urgent;
        self.finished.push(finished);
        let since = *self.held_since.get_or_insert(now);
        let send = if self.queue.is_empty() {
            // The last runs of a cycle: held while another one runs that
            // is not stuck (it may end in a moment).
            !self
                .threads
                .iter()
                .any(|t| t.key != key && t.running && !t.stuck(now))
        } else {
            // Jobs wait (a start, a rescan): by the batch, or by the time.
            self.finished.len() >= REPORTED_TOGETHER
                || now.saturating_duration_since(since) >= REPORTED_WITHIN
        };
        if send || urgent || self.closed {
            self.held()
        } else {
            Vec::new()
        }
    }

    /// Every outcome held, to be sent.
    fn held(&mut self) -> Vec<Finished> {
        self.held_since = None;
        std::mem::take(&mut self.finished)
    }

    /// See [`Runs::admit_at`], with `queued` jobs waiting.
    fn next_admission(&self, now: Instant, queued: usize) -> Option<Instant> {
        if queued == 0 {
            // Outcomes held for the runs still in flight go when the first
            // of those becomes stuck, if it has not ended by then.
            if self.finished.is_empty() {
                return None;
            }
            return self
                .threads
                .iter()
                .filter(|t| t.running)
                .map(|t| t.since + STUCK_RUN)
                .min()
                .or(Some(now));
        }
        if self.wants_thread(now, queued) {
            return Some(now);
        }
        self.threads
            .iter()
            .map(|t| t.since + STUCK_RUN)
            .filter(|at| *at > now)
            .min()
    }
}

impl Runs {
    pub fn new(
        clock: Clock,
        metrics: Arc<Metrics>,
        status: Arc<Status>,
        done: mpsc::UnboundedSender<Finished>,
    ) -> Self {
        // Counted now, before the loop runs.
        runs_at_once();
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                clock,
                metrics,
                status,
                done,
                held: Arc::default(),
            }),
        }
    }

    /// Told when outcomes start to be held for runs still in flight: the
    /// loop then asks [`Runs::admit_at`] again, since one of those runs
    /// may hang.
    pub fn held(&self) -> Arc<Notify> {
        self.shared.held.clone()
    }

    /// Queues `jobs` (the urgent ones ahead of the ordinary ones already
    /// waiting, in order) and starts threads for them if needed.
    pub fn push(&self, jobs: Vec<Job>) {
        let mut state = self.shared.lock();
        if state.closed {
            return;
        }
        state.queue.extend(jobs);
        to_front(&mut state.queue, |job| job.urgent);
        self.top_up(&mut state);
    }

    /// Starts threads while jobs wait and fewer than [`runs_at_once`]
    /// count: after a run became stuck, another thread takes the queue on.
    pub fn admit(&self) {
        let mut state = self.shared.lock();
        self.top_up(&mut state);
        // The threads that would have sent them may all be stuck.
        self.shared.send(state.held());
    }

    fn top_up(&self, state: &mut MutexGuard<'_, State>) {
        let now = Instant::now();
        while state.wants_thread(now, state.queue.len()) {
            let key = state.next_thread;
            state.next_thread += 1;
            state.threads.push(Thread {
                key,
                running: false,
                since: now,
            });
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || shared.work(key));
        }
    }

    /// When to look again whether a waiting job needs a thread, or whether
    /// outcomes held wait for a run that became stuck (call
    /// [`Runs::admit`] then): at once if a job needs a thread now, else
    /// when the next thread could become stuck. The instants are the
    /// threads' own, so asking again does not move the answer; `None` when
    /// nothing waits. Ask again after [`Runs::held`] says outcomes are
    /// held.
    pub fn admit_at(&self) -> Option<Instant> {
        let state = self.shared.lock();
        state.next_admission(Instant::now(), state.queue.len())
    }

    /// Moves the queued jobs `urgent` selects ahead of the others (an
    /// expiry came while they waited); the ids of those it found queued.
    pub fn hurry(&self, urgent: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut state = self.shared.lock();
        let mut hurried = Vec::new();
        for job in &mut state.queue {
            if urgent(job.id) {
                job.urgent = true;
                hurried.push(job.id);
            }
        }
        to_front(&mut state.queue, |job| job.urgent);
        hurried
    }

    /// Takes back every queued (not started) job.
    pub fn take_queued(&self) -> Vec<Job> {
        let mut state = self.shared.lock();
        let jobs = state.queue.drain(..).collect();
        self.shared.send(state.held());
        jobs
    }

    /// Empties the queue and takes no more: threads end after the run in
    /// their hands. The outcomes held are sent: the loop takes what has
    /// come back before it lets the reloads finish.
    pub fn close(&self) {
        let mut state = self.shared.lock();
        state.closed = true;
        state.queue.clear();
        self.shared.send(state.held());
    }
}

/// Moves the items `urgent` selects ahead of the others; each group keeps
/// its order.
fn to_front<T>(queue: &mut VecDeque<T>, urgent: impl Fn(&T) -> bool) {
    if queue.iter().any(&urgent) {
        let (ahead, behind): (VecDeque<T>, VecDeque<T>) = std::mem::take(queue)
            .into_iter()
            .partition(|item| urgent(item));
        *queue = ahead;
        queue.extend(behind);
    }
}

impl Drop for Runs {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A thread's life: the next job, until the queue is empty.
    fn work(&self, key: u64) {
        loop {
            let job = {
                let mut state = self.lock();
                let job = state.take();
                if job.is_some() {
                    state.mark(key, true);
                } else {
                    state.threads.retain(|t| t.key != key);
                    // A thousand jobs at start need not keep their room
                    // for the daemon's life.
                    state.queue.shrink_to(KEPT_ROOM);
                }
                job
            };
            let Some(job) = job else {
                return;
            };
            self.run(key, job);
            self.lock().mark(key, false);
        }
    }

    /// A run's outcome goes back to the loop (sent under the lock: the
    /// channel never blocks), with the others of its cycle: one wake-up of
    /// the loop, one status line, and one run of a reload action the
    /// bundles share for all of them (guarantee 4), not one each.
    ///
    /// - While jobs wait (a start, a rescan: a thousand runs), outcomes go
    ///   back [`REPORTED_TOGETHER`] at a time, or once the first held has
    ///   waited [`REPORTED_WITHIN`], with the next run that ends.
    /// - The last runs' outcomes (the queue empty: two bundles that read
    ///   one volume) wait for each other: the last of them to end sends
    ///   them all. A run that hangs holds them until it is stuck
    ///   ([`STUCK_RUN`]): the loop, told ([`Runs::held`]), takes them then
    ///   ([`Runs::admit_at`], [`Runs::admit`]).
    /// - An expiry's outcome goes at once, and so does every outcome once
    ///   the queue is closed.
    ///
    /// They are held in the shared state, not in a thread, so a thread
    /// that hangs holds none.
    fn report(&self, key: u64, finished: Finished) {
        let mut state = self.lock();
        let first_held = state.finished.is_empty();
        let ready = state.finish(key, finished, Instant::now());
        if first_held && ready.is_empty() {
            self.held.notify_one();
        }
        // Sent before the lock goes: `close` then finds every outcome
        // either held or already on its way to the loop.
        self.send(ready);
    }

    fn send(&self, finished: Vec<Finished>) {
        for f in finished {
            let _ = self.done.send(f);
        }
    }

    /// One job on thread `key`: the run, its outcome to the loop, then its
    /// lone signal.
    fn run(&self, key: u64, job: Job) {
        let Job {
            id,
            mut target,
            work,
            urgent,
            next_change,
            direct,
        } = job;
        self.status.run_started(id, target.name());
        debug!(name = %target.name(), kind = ?target.kind(), ?work, "run started");
        let now = self.clock.now();
        let urgent = urgent || next_change.is_some_and(|at| at <= now);
        let outcome = target::run(&mut target, work, now, &self.metrics);
        let (reloaded, claimed) = match (direct, super::reload_outputs(&outcome)) {
            (Some((direct, request)), Some(outputs)) => {
                let spec = direct.spec().clone();
                match direct.claim(Request {
                    outputs: outputs.clone(),
                    ..request
                }) {
                    DirectClaim::Claimed(claimed) => (Some(spec), Some(claimed)),
                    DirectClaim::Queued => (Some(spec), None),
                    // SIGHUP since the run started: the loop decides.
                    DirectClaim::Declined => (None, None),
                }
            }
            _ => (None, None),
        };
        self.status.run_ended(id);
        // The outcome first: a signal that hangs holds only itself.
        self.report(
            key,
            Finished {
                id,
                target,
                outcome,
                reloaded,
                urgent,
            },
        );
        if let Some(claimed) = claimed {
            claimed.run();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Flags;
    use crate::config::Config;
    use crate::render::BundleState;

    /// A bundle target (never run here).
    fn target() -> Target {
        let flags = Flags {
            sources: vec!["/nonexistent/ca.pem".into()],
            outputs: vec!["/nonexistent/out.pem".into()],
            ..Flags::default()
        };
        let config = Config::load(&flags, crate::config::Child::Absent).expect("config");
        Target::Bundle(Box::new(BundleState::new(config.bundles[0].clone(), None)))
    }

    fn job(id: u64) -> Job {
        Job {
            id,
            target: target(),
            work: Work::Render {
                only: None,
                recheck_disk: false,
            },
            urgent: false,
            next_change: None,
            direct: None,
        }
    }

    fn done(id: u64) -> Finished {
        Finished {
            id,
            target: target(),
            outcome: target::Outcome::Checked(crate::keypair::Outcome::Unchanged),
            reloaded: None,
            urgent: false,
        }
    }

    fn ids(finished: &[Finished]) -> Vec<u64> {
        finished.iter().map(|f| f.id).collect()
    }

    /// The last runs of a cycle wait for each other: the last to end sends
    /// every outcome, one that hangs holds them only until it is stuck, and
    /// the loop knows when to look.
    #[test]
    fn the_last_runs_of_a_cycle_go_back_together() {
        let t0 = Instant::now();
        let mut state = threads(3, true, t0);
        assert!(ids(&state.finish(0, done(0), t0)).is_empty());
        assert!(ids(&state.finish(1, done(1), t0)).is_empty());
        // Thread 2 may hang: the loop looks when it would be stuck.
        assert_eq!(state.next_admission(t0, 0), Some(t0 + STUCK_RUN));
        assert_eq!(ids(&state.finish(2, done(2), t0)), [0, 1, 2]);
        assert_eq!(state.next_admission(t0, 0), None);
        // Two runs that end together: the second does not wait for the
        // first, which has not yet gone back to the queue.
        let mut state = threads(2, true, t0);
        assert!(ids(&state.finish(0, done(5), t0)).is_empty());
        assert_eq!(ids(&state.finish(1, done(6), t0)), [5, 6]);
        // A stuck run holds nothing back.
        let mut state = threads(2, true, t0);
        let late = t0 + STUCK_RUN;
        assert_eq!(ids(&state.finish(0, done(3), late)), [3]);
        // Nor does a thread between two jobs: the queue is empty, it ends.
        let mut state = threads(2, false, t0);
        state.threads[0].running = true;
        assert_eq!(ids(&state.finish(0, done(4), t0)), [4]);
    }

    /// An expiry the loop has not seen pass yet: the run that starts after
    /// it renders it, and is urgent.
    #[test]
    fn a_run_that_starts_past_its_next_change_is_urgent() {
        let (done, mut outcomes) = mpsc::unbounded_channel();
        let shared = Shared {
            state: Mutex::new(State::default()),
            clock: Clock::System,
            metrics: Arc::new(Metrics::new()),
            status: Status::new().0,
            done,
            held: Arc::default(),
        };
        let now = Clock::System.now();
        shared.run(
            0,
            Job {
                next_change: Some(now - 1),
                ..job(1)
            },
        );
        shared.run(
            0,
            Job {
                next_change: Some(now + 3_600),
                ..job(2)
            },
        );
        let first = outcomes.try_recv().expect("the first outcome");
        let second = outcomes.try_recv().expect("the second outcome");
        assert_eq!((first.id, first.urgent), (1, true));
        assert_eq!((second.id, second.urgent), (2, false));
    }

    #[test]
    fn outcomes_go_by_the_batch_and_an_expiry_at_once() {
        let t0 = Instant::now();
        let mut state = State::default();
        state.queue.extend((0..100).map(job));
        let mut sent = Vec::new();
        for id in 0..(REPORTED_TOGETHER as u64 * 2 + 1) {
            sent.extend(ids(&state.finish(0, done(id), t0)));
        }
        assert_eq!(sent.len(), REPORTED_TOGETHER * 2, "{sent:?}");
        // An expiry's outcome takes the one held with it.
        let expiry = Finished {
            urgent: true,
            ..done(1_000)
        };
        let urgent = ids(&state.finish(0, expiry, t0));
        assert_eq!(urgent, [REPORTED_TOGETHER as u64 * 2, 1_000]);
        // Slow runs: the next one to end after REPORTED_WITHIN takes the
        // ones held with it.
        assert!(state.finish(0, done(1_001), t0).is_empty());
        assert!(
            state
                .finish(0, done(1_002), t0 + REPORTED_WITHIN / 2)
                .is_empty()
        );
        let late = ids(&state.finish(0, done(1_003), t0 + REPORTED_WITHIN));
        assert_eq!(late, [1_001, 1_002, 1_003]);
        // Once closed, nothing is held.
        state.closed = true;
        assert_eq!(ids(&state.finish(0, done(2_000), t0)), [2_000]);
    }

    fn threads(n: usize, running: bool, since: Instant) -> State {
        State {
            threads: (0..n as u64)
                .map(|key| Thread {
                    key,
                    running,
                    since,
                })
                .collect(),
            ..State::default()
        }
    }

    /// The loop always has a time to look again while jobs wait: threads
    /// that have not taken their job yet may hang in it, and a thread
    /// whose run became stuck is replaced even if the loop looks late.
    #[test]
    fn waiting_jobs_always_have_a_time_to_look_again() {
        let t0 = Instant::now();
        let full = runs_at_once();
        // Just started, not running yet: look again when they could be stuck.
        let fresh = threads(full, false, t0);
        assert_eq!(fresh.next_admission(t0, 2), Some(t0 + STUCK_RUN));
        assert_eq!(fresh.next_admission(t0, 0), None);
        // All running: when the first could become stuck.
        let busy = threads(full, true, t0);
        let half = t0 + STUCK_RUN / 2;
        assert!(!busy.wants_thread(half, 1));
        assert_eq!(busy.next_admission(half, 1), Some(t0 + STUCK_RUN));
        // All stuck, whenever the loop looks: at once.
        let late = t0 + STUCK_RUN * 3;
        assert!(busy.wants_thread(late, 1));
        assert_eq!(busy.next_admission(late, 1), Some(late));
        // Fewer threads than the limit and more jobs than idle threads.
        assert_eq!(State::default().next_admission(t0, 1), Some(t0));
    }

    #[test]
    fn an_expiry_goes_ahead_of_the_queue_and_the_rest_keep_their_order() {
        // Negative numbers stand for urgent jobs.
        let urgent = |n: &i32| *n < 0;
        let mut queue: VecDeque<i32> = [1, 2, 3].into();
        queue.extend([4, -5, 6, -7]);
        to_front(&mut queue, urgent);
        assert_eq!(Vec::from(queue.clone()), [-5, -7, 1, 2, 3, 4, 6]);
        // Behind the urgent ones already waiting, ahead of the rest.
        queue.push_back(-8);
        to_front(&mut queue, urgent);
        assert_eq!(Vec::from(queue), [-5, -7, -8, 1, 2, 3, 4, 6]);
        // An expiry while 3 and 6 wait: they go ahead of the ordinary
        // ones, behind those already urgent.
        let mut queue: VecDeque<i32> = [-8, 1, 2, 3, 4, 6].into();
        to_front(&mut queue, |n| *n < 0 || *n == 3 || *n == 6);
        assert_eq!(Vec::from(queue), [-8, 3, 6, 1, 2, 4]);
    }
}
