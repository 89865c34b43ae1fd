//! Running `anchorage run` and a stand-in application as real processes,
//! and waiting on them with deadlines instead of bare sleeps.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::anchorage;

/// Retries `check` until it returns `Ok` or `timeout` passes; panics with
/// the last reason.
#[track_caller]
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(reason) if Instant::now() >= deadline => {
                panic!("not within {timeout:?}: {reason}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A running `anchorage run`, killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `anchorage run ARGS`, logging to a file in `dir`.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        Self::start_with(dir, args, |_| {})
    }

    pub fn start_with(dir: &Path, args: &[&str], setup: impl FnOnce(&mut Command)) -> Self {
        // One name per daemon, even for several in one directory.
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = dir.join(format!("anchorage-{n}.log"));
        let file = fs::File::create(&log).expect("log file");
        let mut cmd = anchorage();
        cmd.arg("run")
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup"))
            .stderr(file);
        setup(&mut cmd);
        let child = cmd.spawn().expect("start anchorage");
        Self {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Where its log is: readable after [`Daemon::stop`], when the log is
    /// final.
    pub fn log_file(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` `count` times.
    #[track_caller]
    pub fn wait_log(&self, needle: &str, count: usize) {
        eventually(Duration::from_secs(15), || {
            let log = self.log();
            let seen = log.matches(needle).count();
            if seen >= count {
                Ok(())
            } else {
                Err(format!("{needle:?} seen {seen} times, want {count}\n{log}"))
            }
        });
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).expect("signal anchorage");
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> i32 {
        self.signal(Signal::SIGTERM);
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "anchorage did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            // Not for ever: a thread stuck in a hung FUSE lookup keeps even a
            // killed process from ending until the filesystem goes, which a
            // failing test drops after this.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!(
                "anchorage (pid {}) did not end when killed; left behind",
                child.id()
            );
        }
    }
}

/// A stand-in application: on SIGHUP it reads the bundle and logs what it
/// read (tests/integration/support/hup_app.py).
pub struct App {
    child: Child,
    pub pid_file: PathBuf,
    log: PathBuf,
}

impl App {
    pub fn start(dir: &Path, bundle: &Path) -> Self {
        Self::start_script(dir, "hup_app.py", bundle)
    }

    /// An app that loads its key pair from `pair_dir`'s `tls.crt` and
    /// `tls.key` on SIGHUP and logs whether they matched
    /// (tests/integration/support/pair_app.py).
    pub fn start_pair(dir: &Path, pair_dir: &Path) -> Self {
        Self::start_script(dir, "pair_app.py", pair_dir)
    }

    fn start_script(dir: &Path, name: &str, bundle: &Path) -> Self {
        let pid_file = dir.join("app.pid");
        let log = dir.join("app.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/integration/support")
            .join(name);
        // The wait below is for the app's own pid file: one left from before
        // would end it at once, and a SIGHUP could then reach the app before
        // its handler is installed (Python's default for SIGHUP is to die).
        let _ = fs::remove_file(&pid_file);
        let child = Command::new("python3")
            .args([
                super::s(&script),
                super::s(&pid_file),
                super::s(bundle),
                super::s(&log),
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("start python3 app");
        // Its own pid in the file, not merely a file: a test may have put
        // another pid there first, and until the app writes it, it has no
        // SIGHUP handler (a SIGHUP would kill it).
        let pid = child.id().to_string();
        eventually(Duration::from_secs(10), || {
            match fs::read_to_string(&pid_file) {
                Ok(text) if text.trim() == pid => Ok(()),
                _ => Err("the app has not written its pid yet".into()),
            }
        });
        Self {
            child,
            pid_file,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One line per SIGHUP received, whole.
    pub fn lines(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// One line per SIGHUP received: the sha256 of the bundle it read.
    pub fn reloads(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until the app has reloaded `count` times; returns what it read.
    #[track_caller]
    pub fn wait_reloads(&self, count: usize) -> Vec<String> {
        // Generous: a retried reload may be in a backoff of several seconds.
        eventually(Duration::from_secs(30), || {
            let reloads = self.reloads();
            if reloads.len() >= count {
                Ok(reloads)
            } else {
                Err(format!("{} reloads, want {count}", reloads.len()))
            }
        })
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
