//! Guarantee 10, nothing blocks the loop: a source that hangs (a FIFO, a
//! read stuck on a hung network filesystem) stalls only its own bundle.
//! Other bundles keep rendering, `/healthz` keeps answering, `/readyz`
//! names the stuck bundle, a supervised child still gets its SIGTERM, and
//! SIGTERM ends the daemon within 5 s.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use crate::observability::{get, wait_status};
use crate::support::daemon::{Daemon, eventually};
use crate::support::hang::HangingFs;
use crate::support::kubelet::Volume;
use crate::support::pki::Ca;
use crate::support::{anchorage, free_port, pems, s, wait_certs, write};

/// Two bundles: `a` reads `a_source`, `healthy` reads a kubelet volume.
fn two_bundles(dir: &Path, a_source: &Path, volume: &Volume) -> std::path::PathBuf {
    write(
        dir,
        "anchorage.toml",
        format!(
            "[daemon]\ndebounce = \"0s\"\n\
             [[bundle]]\nname = \"a\"\nsources = [{:?}]\n[[bundle.output]]\npath = {:?}\n\
             [[bundle]]\nname = \"healthy\"\nsources = [{:?}]\n[[bundle.output]]\npath = {:?}\n",
            s(a_source),
            s(&dir.join("out/a.pem")),
            s(&volume.dir),
            s(&dir.join("out/healthy.pem")),
        ),
    )
}

/// SIGTERM, then the time until the daemon exited.
fn stop_timed(daemon: Daemon) -> (i32, Duration) {
    let started = Instant::now();
    let code = daemon.stop();
    (code, started.elapsed())
}

/// SIGTERM ends the daemon within 5 s, exit code 0 (guarantee 10).
fn stops_within_5s(daemon: Daemon) {
    let (code, took) = stop_timed(daemon);
    assert_eq!(code, 0);
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
}

/// A mounted hanging filesystem (`None` where FUSE cannot be mounted), and
/// a kubelet volume beside it holding one CA named `ca`.
fn hung_and_volume(dir: &Path, ca: &str) -> Option<(HangingFs, Volume)> {
    let hung = HangingFs::mount(dir)?;
    let mut volume = Volume::new(&dir.join("secret"));
    volume.write(&[("ca.crt", &pems(&[&Ca::new(ca)]))]);
    Some((hung, volume))
}

/// `anchorage run --config CONFIG` with its health endpoints on a free port.
fn start_listening(dir: &Path, config: &Path) -> (Daemon, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let daemon = Daemon::start(dir, &["--config", s(config), "--listen", &addr.to_string()]);
    (daemon, addr)
}

#[test]
fn a_fifo_source_stalls_only_its_own_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a_source = write(&dir.path().join("a"), "ca.pem", Ca::new("A One").pem());
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&Ca::new("Healthy One")]))]);
    let config = two_bundles(dir.path(), &a_source, &volume);
    let (daemon, addr) = start_listening(dir.path(), &config);
    wait_certs(&dir.path().join("out/a.pem"), 1);
    wait_certs(&dir.path().join("out/healthy.pem"), 1);
    let last_good = fs::read(dir.path().join("out/a.pem")).expect("a.pem");

    // The source becomes a FIFO with no writer: a blocking open would hang.
    fs::remove_file(&a_source).expect("rm");
    nix::unistd::mkfifo(&a_source, nix::sys::stat::Mode::from_bits_truncate(0o644))
        .expect("mkfifo");
    daemon.wait_log("not a regular file", 1);
    assert!(daemon.log().contains(s(&a_source)), "{}", daemon.log());
    wait_status(addr, "/healthz", 200);
    // The other bundle keeps rendering.
    volume.write(&[(
        "ca.crt",
        &pems(&[&Ca::new("Healthy One"), &Ca::new("Healthy Two")]),
    )]);
    wait_certs(&dir.path().join("out/healthy.pem"), 2);
    assert_eq!(
        fs::read(dir.path().join("out/a.pem")).expect("a"),
        last_good
    );

    // SIGHUP with the config turned into a FIFO: logged, the running one kept.
    fs::remove_file(&config).expect("rm config");
    nix::unistd::mkfifo(&config, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_log("the new configuration is invalid", 1);
    wait_status(addr, "/healthz", 200);

    // A regular file takes the FIFO's place: the bundle recovers.
    fs::remove_file(&a_source).expect("rm fifo");
    write(
        &dir.path().join("a"),
        "ca.pem",
        pems(&[&Ca::new("A One"), &Ca::new("A Two")]),
    );
    wait_certs(&dir.path().join("out/a.pem"), 2);

    stops_within_5s(daemon);
}

/// Runs `anchorage ARGS` and fails if it has not exited within 10 s (a
/// blocking open of a FIFO never would).
fn run_bounded(args: &[&str]) -> (i32, String) {
    let mut child = anchorage()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start anchorage");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().expect("wait").is_some() {
            let out = child.wait_with_output().expect("output");
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            return (out.status.code().unwrap_or(-1), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("anchorage {args:?} hangs on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn check_render_and_config_on_a_fifo_exit_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("ca.pem");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let out = dir.path().join("out.pem");

    let (code, text) = run_bounded(&["check", s(&fifo)]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(s(&fifo)) && text.contains("not a regular file"),
        "{text}"
    );

    let (code, text) = run_bounded(&["render", "--source", s(&fifo), "--output", s(&out)]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(s(&fifo)) && text.contains("not a regular file"),
        "{text}"
    );
    assert!(!out.exists());

    let (code, text) = run_bounded(&["render", "--config", s(&fifo)]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains(s(&fifo)) && text.contains("not a regular file"),
        "{text}"
    );

    // Over 1 MiB is a configuration error, never read whole.
    let (code, text) = run_bounded(&["render", "--config", "/dev/zero"]);
    assert_eq!(code, 2, "{text}");
    let big = write(dir.path(), "big.toml", vec![b'#'; 2 * 1024 * 1024]);
    let (code, text) = run_bounded(&["render", "--config", s(&big)]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("limit"), "{text}");
}

#[test]
fn a_hung_read_stalls_only_its_bundle_and_the_daemon_still_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((hung, mut volume)) = hung_and_volume(dir.path(), "Beside One") else {
        return;
    };
    // The healthy bundle reloads by appending a line to `reloads`.
    let reloads = dir.path().join("reloads");
    let config = two_bundles(dir.path(), &hung.file(), &volume);
    let mut text = fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        "[[bundle.reload]]\nexec = [\"sh\", \"-c\", \"echo x >> {}\"]\n",
        s(&reloads)
    ));
    fs::write(&config, text).expect("config");
    let (daemon, addr) = start_listening(dir.path(), &config);
    wait_certs(&dir.path().join("out/healthy.pem"), 1);
    // Its start's reload does not wait for the hung bundle's first run.
    let reloaded = |count: usize| {
        eventually(Duration::from_secs(20), || {
            let lines = fs::read_to_string(&reloads)
                .unwrap_or_default()
                .lines()
                .count();
            if lines >= count {
                Ok(())
            } else {
                Err(format!(
                    "{lines} reloads of the healthy bundle, want {count}"
                ))
            }
        });
    };
    reloaded(1);
    // /readyz names the stuck bundle and how long it has run.
    let body = eventually(Duration::from_secs(20), || {
        let answer = get(addr, "/readyz")?;
        if answer.status == 503 && answer.body.contains("a: its render has run for") {
            Ok(answer.body)
        } else {
            Err(format!("{} {}", answer.status, answer.body))
        }
    });
    assert!(!body.contains("healthy: its render"), "{body}");
    wait_status(addr, "/healthz", 200);
    // Other bundles keep rendering while the read hangs.
    volume.write(&[(
        "ca.crt",
        &pems(&[&Ca::new("Beside One"), &Ca::new("Beside Two")]),
    )]);
    wait_certs(&dir.path().join("out/healthy.pem"), 2);
    reloaded(2);
    wait_status(addr, "/healthz", 200);

    stops_within_5s(daemon);
}

/// A source whose very lookup hangs from the start (a stat, a watch): the
/// other bundles' directories are watched all the same, and their changes
/// seen at once (not at a resync minutes later).
#[test]
fn a_source_whose_lookup_hangs_at_start_leaves_the_others_watched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((hung, mut volume)) = hung_and_volume(dir.path(), "Watched One") else {
        return;
    };
    let config = two_bundles(dir.path(), &hung.stuck("ca.pem"), &volume);
    let (daemon, addr) = start_listening(dir.path(), &config);
    wait_certs(&dir.path().join("out/healthy.pem"), 1);
    daemon.wait_log("watching", 1);
    volume.write(&[(
        "ca.crt",
        &pems(&[&Ca::new("Watched One"), &Ca::new("Watched Two")]),
    )]);
    wait_certs(&dir.path().join("out/healthy.pem"), 2);
    wait_status(addr, "/healthz", 200);
    // Its threads stuck in the lookup leave only when the filesystem
    // answers or goes: the kernel waits for a FUSE lookup
    // uninterruptibly, even under SIGKILL.
    assert_eq!(stop_beside(daemon, hung), 0);
}

#[test]
fn a_supervised_child_gets_sigterm_while_a_read_hangs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(hung) = HangingFs::mount(dir.path()) else {
        return;
    };
    // The source is a symlink, first to a real file, then into the hung
    // filesystem: the child starts after the first render, then the read
    // hangs.
    let real = write(
        &dir.path().join("real"),
        "ca.pem",
        Ca::new("Child One").pem(),
    );
    let src = dir.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    std::os::unix::fs::symlink(&real, src.join("ca.pem")).expect("symlink");
    let marker = dir.path().join("child-got-term");
    let started = dir.path().join("child-started");
    let script = format!(
        "trap 'touch {m}; exit 0' TERM; touch {st}; while :; do sleep 0.05; done",
        m = s(&marker),
        st = s(&started)
    );
    let output = dir.path().join("out.pem");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&src),
            "--output",
            s(&output),
            "--debounce",
            "0",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    eventually(Duration::from_secs(20), || {
        if started.exists() {
            Ok(())
        } else {
            Err("the child has not started".to_owned())
        }
    });
    // Swing the link into the hung filesystem; the render's read hangs.
    let next = src.join("..next");
    std::os::unix::fs::symlink(hung.file(), &next).expect("symlink");
    fs::rename(&next, src.join("ca.pem")).expect("rename");
    // The second run of the bundle starts, and its read hangs.
    daemon.wait_log("run started", 2);
    let sent = SystemTime::now();
    let (code, took) = stop_timed(daemon);
    let got = fs::metadata(&marker)
        .and_then(|m| m.modified())
        .expect("the child got SIGTERM");
    let forwarded = got.duration_since(sent).unwrap_or_default();
    assert!(
        forwarded < Duration::from_secs(1),
        "forwarded after {forwarded:?}"
    );
    assert_eq!(code, 0, "the child's exit code");
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
}

/// A daemon supervising a child (`sh` touching `started`, then sleeping),
/// with a bundle whose first read hangs beside a healthy one.
fn child_beside_a_hung_read(dir: &Path) -> Option<(HangingFs, Daemon, std::path::PathBuf)> {
    let (hung, volume) = hung_and_volume(dir, "Child Start")?;
    let config = two_bundles(dir, &hung.file(), &volume);
    let started = dir.join("child-started");
    let script = format!("touch {}; exec sleep 1000", s(&started));
    let daemon = Daemon::start(dir, &["--config", s(&config), "--", "sh", "-c", &script]);
    wait_certs(&dir.join("out/healthy.pem"), 1);
    Some((hung, daemon, started))
}

/// SIGTERM, the daemon's own shutdown within 5 s; then the hung filesystem
/// goes (a thread in a hung FUSE read or lookup can hold a process's exit
/// for seconds more, or for good, whatever it does), and the exit code.
fn stop_beside(daemon: Daemon, hung: HangingFs) -> i32 {
    let stopping = Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait_log("shutting down", 1);
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(5), "SIGTERM took {took:?}");
    drop(hung);
    daemon.stop()
}

/// A SIGTERM while the start still waits for a hung first read, before the
/// child started: anchorage ends as it would without a child (exit 0), it
/// is not killed.
#[test]
fn sigterm_before_the_child_started_ends_anchorage_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((hung, daemon, started)) = child_beside_a_hung_read(dir.path()) else {
        return;
    };
    daemon.wait_log("run started", 2);
    assert_eq!(stop_beside(daemon, hung), 0);
    assert!(!started.exists(), "the child started at once");
}

/// A first read that hangs does not keep the supervised child from starting
/// for good: it starts a few seconds on, with a warning.
#[test]
fn a_first_read_that_hangs_does_not_keep_the_child_from_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((hung, daemon, started)) = child_beside_a_hung_read(dir.path()) else {
        return;
    };
    eventually(Duration::from_secs(30), || {
        if started.exists() {
            Ok(())
        } else {
            Err("the child has not started".to_owned())
        }
    });
    daemon.wait_log("starting the child before every first render came back", 1);
    // sh exec'd sleep, which the forwarded SIGTERM ends: 128 + 15.
    assert_eq!(stop_beside(daemon, hung), 143);
}

/// More hung reads than runs at once (2 x cores, at least 4): each holds
/// its own thread, and once they count as stuck the bundle queued behind
/// them gets a thread of its own and renders; every hung bundle is named
/// by `/readyz`, and SIGTERM still ends the daemon within 5 s.
#[test]
fn more_hung_reads_than_threads_still_let_the_queue_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((hung, volume)) = hung_and_volume(dir.path(), "Behind One") else {
        return;
    };
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let stuck = (2 * cores).max(4) + 1;
    let mut config = String::from("[daemon]\ndebounce = \"0s\"\n");
    for i in 0..stuck {
        config.push_str(&format!(
            "[[bundle]]\nname = \"hung{i}\"\nsources = [{:?}]\n[[bundle.output]]\npath = {:?}\n",
            s(&hung.file_named(&format!("hung{i}"))),
            s(&dir.path().join(format!("out/hung{i}.pem"))),
        ));
    }
    // Last in the configuration: queued behind every hung read.
    config.push_str(&format!(
        "[[bundle]]\nname = \"healthy\"\nsources = [{:?}]\n[[bundle.output]]\npath = {:?}\n",
        s(&volume.dir),
        s(&dir.path().join("out/healthy.pem")),
    ));
    let config = write(dir.path(), "anchorage.toml", config);
    let (daemon, addr) = start_listening(dir.path(), &config);
    wait_certs(&dir.path().join("out/healthy.pem"), 1);
    let body = eventually(Duration::from_secs(20), || {
        let answer = get(addr, "/readyz")?;
        let named = (0..stuck)
            .filter(|i| {
                answer
                    .body
                    .contains(&format!("hung{i}: its render has run for"))
            })
            .count();
        if answer.status == 503 && named == stuck {
            Ok(answer.body)
        } else {
            Err(format!("{} {}", answer.status, answer.body))
        }
    });
    assert!(!body.contains("healthy: its render"), "{body}");
    wait_status(addr, "/healthz", 200);
    stops_within_5s(daemon);
}
