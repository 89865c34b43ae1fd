//! Signalling the application: to the pid in a pid file, to every process
//! with a name, or to the supervised child, resolved afresh at every reload.
//!
//! Each signal goes through a pidfd opened on the process that was checked,
//! so a pid recycled after the check gets nothing (it fails with ESRCH). A
//! pid file whose process started after the file was written names a
//! recycled pid and is refused. anchorage never signals itself.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::signal::Signal;
use rustix::process::{Pid, PidfdFlags, pidfd_open, pidfd_send_signal};

use super::{Absent, Failure};
use crate::config::SignalTarget;

/// Slack between a pid file's mtime and its writer's start time: the boot
/// time the kernel reports has a one-second resolution.
const START_SLACK_SECS: i64 = 2;

/// Sends `signal` to what `target` names now; returns the pids signalled.
pub fn send(
    signal: Signal,
    target: &SignalTarget,
    child: Option<u32>,
) -> Result<Vec<u32>, Failure> {
    match target {
        SignalTarget::PidFile(path) => {
            let pid = read_pid_file(path)?;
            signal_pid(pid, signal, Some(path))?;
            Ok(vec![pid])
        }
        SignalTarget::Process(name) => {
            let pids = find_by_name(name);
            if pids.is_empty() {
                return Err(Failure::Absent(Absent::NoProcessNamed {
                    name: name.clone(),
                }));
            }
            let mut sent = Vec::new();
            let mut errors = Vec::new();
            for pid in pids {
                match signal_pid(pid, signal, None) {
                    Ok(()) => sent.push(pid),
                    // It exited between the scan and the signal.
                    Err(Failure::Absent(_)) => {}
                    Err(Failure::Failed(e)) => errors.push(e),
                }
            }
            if sent.is_empty() {
                return Err(if errors.is_empty() {
                    Failure::Absent(Absent::NoProcessNamed { name: name.clone() })
                } else {
                    Failure::Failed(errors.join("; "))
                });
            }
            // An nginx master is reloaded even when its workers (same name,
            // another uid) cannot be signalled: retrying would only send
            // the master the signal again.
            if !errors.is_empty() {
                tracing::warn!(process = name, errors = %errors.join("; "),
                    "some processes with this name could not be signalled");
            }
            Ok(sent)
        }
        SignalTarget::Child => match child {
            Some(pid) => {
                signal_pid(pid, signal, None)?;
                Ok(vec![pid])
            }
            None => Err(Failure::Absent(Absent::NoChild)),
        },
    }
}

fn read_pid_file(path: &Path) -> Result<u32, Failure> {
    // Bounded and never blocking: a pid file is a few bytes of a regular file.
    let text = match crate::source::read_bounded(path, path) {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
        Ok(None) => {
            return Err(Failure::Absent(Absent::NoPidFile {
                path: path.to_path_buf(),
            }));
        }
        Err(e) => return Err(Failure::Failed(e.to_string())),
    };
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| {
            Failure::Failed(format!(
                "{}: {:?} is not a pid",
                path.display(),
                text.trim()
            ))
        })
}

/// Signals `pid` through a pidfd. With `pid_file`, first checks that the
/// process is not younger than the file (a recycled pid).
fn signal_pid(pid: u32, signal: Signal, pid_file: Option<&Path>) -> Result<(), Failure> {
    if pid == std::process::id() {
        return Err(Failure::Failed(format!(
            "pid {pid} is anchorage itself; refusing to signal it"
        )));
    }
    let raw =
        Pid::from_raw(pid as i32).ok_or_else(|| Failure::Failed(format!("{pid} is not a pid")))?;
    let fd = pidfd_open(raw, PidfdFlags::empty()).map_err(|e| {
        if e == rustix::io::Errno::SRCH {
            Failure::Absent(Absent::NoProcess {
                pid,
                pid_file: pid_file.map(Path::to_path_buf),
            })
        } else {
            Failure::Failed(format!("pid {pid}: cannot open: {e}"))
        }
    })?;
    // The pidfd pins the process: what /proc says now stays true of it.
    let stat = process_stat(pid);
    if stat.is_some_and(|stat| stat.exited) {
        // A zombie (exited, not yet reaped) takes a signal and does nothing
        // with it: the app is not running, and it was not reloaded.
        return Err(Failure::Absent(Absent::NoProcess {
            pid,
            pid_file: pid_file.map(Path::to_path_buf),
        }));
    }
    if let Some(path) = pid_file {
        check_not_recycled(pid, stat.and_then(|stat| stat.started), path)?;
    }
    let sig = rustix::process::Signal::from_named_raw(signal as i32)
        .ok_or_else(|| Failure::Failed(format!("{signal} cannot be sent")))?;
    pidfd_send_signal(&fd, sig).map_err(|e| match e {
        rustix::io::Errno::SRCH => Failure::Absent(Absent::NoProcess {
            pid,
            pid_file: pid_file.map(Path::to_path_buf),
        }),
        rustix::io::Errno::PERM => Failure::Failed(permission_hint(pid, signal)),
        e => Failure::Failed(format!("pid {pid}: {signal}: {e}")),
    })
}

fn permission_hint(pid: u32, signal: Signal) -> String {
    let theirs = fs::metadata(format!("/proc/{pid}"))
        .map(|m| m.uid().to_string())
        .unwrap_or_else(|_| "?".into());
    format!(
        "permission denied sending {signal} to pid {pid} (owned by uid {theirs}; anchorage runs as uid {}): \
         run anchorage as uid {theirs}, or grant it CAP_KILL",
        nix::unistd::geteuid()
    )
}

/// Refuses a pid whose process started after the pid file was written: the
/// file's writer is gone and the pid now belongs to someone else.
fn check_not_recycled(pid: u32, started: Option<i64>, pid_file: &Path) -> Result<(), Failure> {
    let (Some(started), Ok(meta)) = (started, fs::metadata(pid_file)) else {
        // Without /proc we cannot tell; the pidfd still pins the process.
        return Ok(());
    };
    if started > meta.mtime() + START_SLACK_SECS {
        // The app the file names is gone, as much as for a dead pid: at
        // start a target not there yet, later a failure.
        return Err(Failure::Absent(Absent::StalePid {
            pid,
            pid_file: pid_file.to_path_buf(),
        }));
    }
    Ok(())
}

/// What `/proc/PID/stat` says of a process.
#[derive(Clone, Copy, Debug)]
struct ProcessStat {
    /// A zombie or dead (state `Z` or `X`).
    exited: bool,
    /// Its start time, unix seconds (`None` without the boot time).
    started: Option<i64>,
}

/// A process's state and start time, from `/proc`.
fn process_stat(pid: u32) -> Option<ProcessStat> {
    // One read: `/proc` files report no size, and a growing buffer would
    // take five system calls for a line of 300 bytes.
    let mut stat = String::with_capacity(1024);
    fs::File::open(format!("/proc/{pid}/stat"))
        .and_then(|mut f| f.read_to_string(&mut stat))
        .ok()?;
    // The name (field 2) may hold spaces and parentheses: count from the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split_whitespace();
    let state = fields.next()?;
    let started = fields
        .nth(18)
        .and_then(|ticks| ticks.parse::<i64>().ok())
        .zip(*CLOCK)
        .map(|(ticks, (boot, hz))| boot + ticks / hz);
    Some(ProcessStat {
        exited: matches!(state, "Z" | "X"),
        started,
    })
}

/// The boot time (unix seconds) and the clock ticks per second, which do
/// not change while the system runs: read once, not before every signal
/// (`/proc/stat` is long and costly to generate).
static CLOCK: std::sync::LazyLock<Option<(i64, i64)>> = std::sync::LazyLock::new(|| {
    let boot: i64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some((boot, hz))
});

/// Every process (but anchorage) whose comm or argv[0] basename is `name`.
pub fn find_by_name(name: &str) -> Vec<u32> {
    let own = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own && process_named(*pid, name))
        .collect();
    pids.sort_unstable();
    pids
}

fn process_named(pid: u32, name: &str) -> bool {
    if let Ok(comm) = fs::read_to_string(format!("/proc/{pid}/comm"))
        && comm.trim_end_matches('\n') == name
    {
        return true;
    }
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let base = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
    !base.is_empty() && base == name.as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_signal_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("self.pid");
        fs::write(&pid_file, std::process::id().to_string()).expect("write");
        let err = send(Signal::SIGHUP, &SignalTarget::PidFile(pid_file), None).expect_err("self");
        assert!(matches!(err, Failure::Failed(m) if m.contains("itself")));
    }

    #[test]
    fn missing_pid_file_is_absent() {
        let err = send(
            Signal::SIGHUP,
            &SignalTarget::PidFile("/nonexistent.pid".into()),
            None,
        )
        .expect_err("absent");
        assert!(matches!(err, Failure::Absent(_)));
    }

    #[test]
    fn garbage_pid_file_is_a_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("bad.pid");
        fs::write(&pid_file, "twelve").expect("write");
        let err = send(Signal::SIGHUP, &SignalTarget::PidFile(pid_file), None).expect_err("bad");
        assert!(matches!(err, Failure::Failed(_)));
    }

    /// An app that exited and was not reaped yet (its parent is busy, or a
    /// shell in a container that does not reap): a signal to it "succeeds"
    /// and reloads nothing. By pid file and by name it is no process.
    #[test]
    fn a_zombie_is_no_process_to_reload() {
        // A name of its own (the comm is the name it was started by), so no
        // other process is signalled by name.
        let dir = tempfile::tempdir().expect("tempdir");
        let name = format!("zombie{}", std::process::id());
        let program = dir.path().join(&name);
        std::os::unix::fs::symlink("/bin/true", &program).expect("symlink");
        let mut child = std::process::Command::new(&program).spawn().expect("spawn");
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !process_stat(pid).expect("stat").exited {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} never exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let pid_file = dir.path().join("app.pid");
        fs::write(&pid_file, pid.to_string()).expect("write");
        let err = send(Signal::SIGHUP, &SignalTarget::PidFile(pid_file), None).expect_err("zombie");
        assert!(
            matches!(err, Failure::Absent(Absent::NoProcess { pid: p, .. }) if p == pid),
            "{err:?}"
        );
        // By name: the zombie keeps its comm, and is passed over.
        assert_eq!(find_by_name(&name), vec![pid], "the zombie is still named");
        let named = send(Signal::SIGHUP, &SignalTarget::Process(name.clone()), None);
        assert!(
            matches!(&named, Err(Failure::Absent(Absent::NoProcessNamed { .. }))),
            "{named:?}"
        );
        child.wait().expect("reap");
    }

    #[test]
    fn recycled_pid_is_refused() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("old.pid");
        fs::write(&pid_file, child.id().to_string()).expect("write");
        // The pid file is older than its process: a stale file, a recycled pid.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&pid_file)
            .expect("open")
            .set_modified(old)
            .expect("set mtime");
        let err =
            send(Signal::SIGHUP, &SignalTarget::PidFile(pid_file), None).expect_err("recycled");
        assert!(
            matches!(&err, Failure::Absent(Absent::StalePid { .. }))
                && err.to_string().contains("recycled pid"),
            "{err:?}"
        );
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    #[test]
    fn finds_processes_by_name_but_never_itself() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        // Until it has exec'd, the child still carries the test's name.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !find_by_name("sleep").contains(&child.id()) {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {} was not found by name",
                child.id()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let own_name = fs::read_to_string("/proc/self/comm").expect("comm");
        assert!(!find_by_name(own_name.trim()).contains(&std::process::id()));
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
}
