//! The daemon's timing on tokio's paused clock: expiry, retention and
//! not-before holds are tested in virtual hours, not real seconds. Files and
//! inotify are real; only time is not.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tokio::sync::oneshot;

use super::*;
use crate::cli::Flags;
use crate::config::Child;

/// A self-signed CA valid from `from` to `until` (unix seconds), as PEM.
fn ca(name: &str, from: i64, until: i64) -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    params.not_before = time::OffsetDateTime::from_unix_timestamp(from).expect("time");
    params.not_after = time::OffsetDateTime::from_unix_timestamp(until).expect("time");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key = KeyPair::generate().expect("key");
    params.self_signed(&key).expect("sign").pem()
}

fn certificates(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.matches("BEGIN CERTIFICATE").count())
        .unwrap_or(0)
}

/// A daemon on `flags`, on a virtual clock that reads `start` now.
struct Running {
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(flags: Flags, start: i64) -> Self {
        let config = Config::load(&flags, Child::Absent).expect("config");
        let (status, pings) = Status::new();
        let metrics = Arc::new(Metrics::new());
        let daemon = Daemon::new(
            config,
            Arc::new(|| {
                Err(ConfigError {
                    file: None,
                    line: None,
                    key: "test".into(),
                    message: "no reload in tests".into(),
                })
            }),
            metrics.clone(),
            (status, pings),
            ChildHandle::default(),
            Clock::starting_at(start),
        )
        .expect("daemon");
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(daemon.run(async {
            let _ = stopped.await;
        }));
        Self {
            metrics,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

/// Waits (on tokio's clock) until `check` holds; the virtual seconds it took.
async fn until(what: &str, check: impl Fn() -> bool) -> Duration {
    let started = tokio::time::Instant::now();
    for _ in 0..20_000 {
        if check() {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

/// Waits in real time (on the blocking pool, which holds tokio's paused
/// clock still) until `check` holds: for what comes from outside tokio, an
/// inotify event, which paused time would otherwise jump past.
async fn real_until(what: &str, check: impl Fn() -> bool) {
    for _ in 0..1_000 {
        if check() {
            return;
        }
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(10)))
            .await
            .expect("sleep");
    }
    panic!("never: {what}");
}

fn real_now() -> i64 {
    Clock::System.now()
}

#[tokio::test(start_paused = true)]
async fn an_expiring_ca_leaves_within_a_second_of_its_expiry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = real_now();
    let expires = now + 3 * 3600;
    std::fs::write(
        dir.path().join("ca.pem"),
        ca("Lasting", now - 60, now + 86_400 * 365) + &ca("Expiring", now - 60, expires),
    )
    .expect("write");
    let output = dir.path().join("out.pem");
    let flags = Flags {
        sources: vec![dir.path().join("ca.pem").display().to_string()],
        outputs: vec![output.clone()],
        debounce: Some(Duration::ZERO),
        ..Flags::default()
    };
    let clock = Clock::starting_at(now);
    let daemon = Running::start(flags, now);
    until("both CAs rendered", || certificates(&output) == 2).await;
    // Hours pass with no file event; just before the instant it is there...
    tokio::time::sleep(Duration::from_secs((expires - clock.now() - 1) as u64)).await;
    assert_eq!(certificates(&output), 2);
    // ...and from the first second after its notAfter it is gone.
    let took = until("the expired CA dropped", || certificates(&output) == 1).await;
    assert!(
        took <= Duration::from_secs(3),
        "dropped {took:?} after the second before"
    );
    assert!(clock.now() > expires);
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_removed_ca_is_retained_until_its_grace_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = real_now();
    let year = now + 86_400 * 365;
    let (old, new) = (
        ca("Old Root", now - 60, year),
        ca("New Root", now - 60, year),
    );
    let source = dir.path().join("src");
    std::fs::create_dir_all(&source).expect("mkdir");
    std::fs::write(source.join("old.pem"), &old).expect("write");
    std::fs::write(source.join("new.pem"), &new).expect("write");
    let output = dir.path().join("out.pem");
    let flags = Flags {
        sources: vec![source.display().to_string()],
        outputs: vec![output.clone()],
        debounce: Some(Duration::ZERO),
        retain_removed: Some(Duration::from_secs(72 * 3600)),
        ..Flags::default()
    };
    let clock = Clock::starting_at(now);
    let daemon = Running::start(flags, now);
    until("both rendered", || certificates(&output) == 2).await;
    let events = daemon.metrics.watch_events.get();
    std::fs::remove_file(source.join("old.pem")).expect("rm");
    let removed_at = clock.now();
    real_until("the removal seen", || {
        daemon.metrics.watch_events.get() > events
    })
    .await;
    // Removed from the sources, still trusted for 72 hours.
    tokio::time::sleep(Duration::from_secs(72 * 3600 - 10)).await;
    assert_eq!(certificates(&output), 2, "dropped before its grace ended");
    until("the grace ended", || certificates(&output) == 1).await;
    let gone_after = clock.now() - removed_at;
    assert!(
        (72 * 3600..=72 * 3600 + 2).contains(&gone_after),
        "dropped {gone_after} s after its removal"
    );
    daemon.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_key_pair_not_valid_yet_is_reloaded_at_its_not_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = real_now();
    let valid_from = now + 6 * 3600;
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["app.test".to_owned()]).expect("params");
    params.not_before = time::OffsetDateTime::from_unix_timestamp(valid_from).expect("time");
    params.not_after = time::OffsetDateTime::from_unix_timestamp(now + 86_400 * 30).expect("time");
    let cert = params.self_signed(&key).expect("sign");
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("write");
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("write");
    let poke = dir.path().join("dynamic.yml");
    std::fs::write(&poke, "").expect("write");
    let flags = Flags {
        cert: Some(dir.path().join("tls.crt")),
        key: Some(dir.path().join("tls.key")),
        touches: vec![poke],
        debounce: Some(Duration::ZERO),
        ..Flags::default()
    };
    let clock = Clock::starting_at(now);
    let daemon = Running::start(flags, now);
    let reloads = || daemon.metrics.reloads("default", "touch", true);
    // Held, with no file event to come: nothing until its notBefore...
    tokio::time::sleep(Duration::from_secs((valid_from - now - 2) as u64)).await;
    assert_eq!(reloads(), 0, "reloaded before its notBefore");
    // ...then the timer alone accepts it and reloads, once.
    until("reloaded at its notBefore", || reloads() == 1).await;
    assert!(
        clock.now() >= valid_from && clock.now() <= valid_from + 2,
        "{}",
        clock.now() - valid_from
    );
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(reloads(), 1, "one real change, one reload");
    daemon.stop().await;
}

fn signals(metrics: &Metrics, bundle: &str) -> u64 {
    ["success", "failure"]
        .into_iter()
        .map(|result| metrics.reloads(bundle, "signal", result == "success"))
        .sum()
}

/// A daemon on the system clock that no SIGHUP reaches, not yet running:
/// the test drives its dispatch and its runs' return.
fn quiet_daemon(config: Config, metrics: Arc<Metrics>) -> Daemon {
    Daemon::new(
        config,
        Arc::new(|| unreachable!("no SIGHUP here")),
        metrics,
        Status::new(),
        ChildHandle::default(),
        Clock::System,
    )
    .expect("daemon")
}

/// Waits for the runs in flight to come back, and records them.
async fn settle_runs(daemon: &mut Daemon) {
    while daemon.entries.values().any(|e| e.target.is_none()) {
        let finished = daemon.done.1.recv().await.expect("a run came back");
        daemon.finished(finished);
        daemon.dispatch();
    }
}

/// Whether the render asks for its reload before or after the new
/// configuration lands, the change is reloaded: by the signal of the
/// configuration the render ran under (sent by the run itself, or left to
/// the loop when a SIGHUP came meanwhile).
#[tokio::test]
async fn a_sighup_during_a_render_still_reloads_its_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut app = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("spawn sleep");
    let pid_file = dir.path().join("app.pid");
    std::fs::write(&pid_file, format!("{}\n", app.id())).expect("pid file");
    let now = real_now();
    let source = dir.path().join("ca.pem");
    let output = dir.path().join("out.pem");
    std::fs::write(&source, ca("One", now - 60, now + 86_400)).expect("write");
    let flags = Flags {
        sources: vec![source.display().to_string()],
        outputs: vec![output.clone()],
        signal: Some("CONT".into()),
        pid_file: Some(pid_file),
        debounce: Some(Duration::ZERO),
        ..Flags::default()
    };
    let config = Config::load(&flags, Child::Absent).expect("config");
    let metrics = Arc::new(Metrics::new());
    let mut daemon = quiet_daemon(config.clone(), metrics.clone());
    daemon.hold = None;
    daemon.dispatch();
    settle_runs(&mut daemon).await;
    wait_until(|| signals(&metrics, "default") == 1).await;

    std::fs::write(
        &source,
        ca("One", now - 60, now + 86_400) + &ca("Two", now - 60, now + 86_400),
    )
    .expect("write");
    daemon.mark_all();
    daemon.dispatch();
    // SIGHUP while the render runs: the bundle now reloads with WINCH.
    let mut fresh = config;
    if let crate::reload::ReloadAction::Signal { signal, .. } =
        &mut Arc::make_mut(&mut fresh.bundles[0]).reloads[0].action
    {
        *signal = nix::sys::signal::Signal::SIGWINCH;
    }
    daemon.apply(fresh);
    // No loop here to set the new configuration's watches.
    daemon.hold = None;
    // As the loop does after every event: a run still queued went back to
    // its entry with the new configuration, and starts again.
    daemon.dispatch();
    settle_runs(&mut daemon).await;
    assert_eq!(certificates(&output), 2);
    wait_until(|| signals(&metrics, "default") == 2).await;
    let _ = app.kill();
    let _ = app.wait();
}

/// Polls `check` for up to 10 s of real time.
async fn wait_until(check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_status_line_counts_many_bundles_instead_of_listing_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = real_now();
    let mut text = String::from("[daemon]\ndebounce = \"0s\"\n");
    for i in 0..10 {
        let source = dir.path().join(format!("s{i}.pem"));
        // The last one is damaged: refused.
        let pem = if i == 9 {
            "-----BEGIN CERTIFICATE-----\nAAAA\n".to_owned()
        } else {
            ca("Many", now - 60, now + 86_400)
        };
        std::fs::write(&source, pem).expect("write");
        text.push_str(&format!(
            "[[bundle]]\nname = \"b{i}\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\n",
            source.display(),
            dir.path().join(format!("out{i}.pem")).display()
        ));
    }
    let config = Config::from_text(
        &Flags::default(),
        Path::new("many.toml"),
        &text,
        Child::Absent,
    )
    .expect("config");
    let mut daemon = quiet_daemon(config, Arc::new(Metrics::new()));
    let before = daemon.summary();
    assert!(
        before.starts_with("0 bundles rendered, 0 refused, 10 not rendered; b0: not rendered; "),
        "{before}"
    );
    assert!(before.ends_with("; ..."), "{before}");
    daemon.hold = None;
    daemon.dispatch();
    settle_runs(&mut daemon).await;
    let after = daemon.summary();
    assert!(
        after.starts_with("9 bundles rendered, 1 refused, 0 not rendered; b9: refused ("),
        "{after}"
    );
}

/// A bundle gone from the configuration takes its series with it: its
/// gauges (an expiry counting down among them) would describe a bundle
/// nothing keeps. A bundle still configured keeps its own.
#[tokio::test]
async fn a_bundle_removed_by_a_new_configuration_leaves_the_metrics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = real_now();
    let text = |names: &[&str]| {
        let mut text = String::from("[daemon]\ndebounce = \"0s\"\n");
        for name in names {
            let source = dir.path().join(format!("{name}.pem"));
            std::fs::write(&source, ca(name, now - 60, now + 86_400)).expect("write");
            text.push_str(&format!(
                "[[bundle]]\nname = \"{name}\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\n",
                source.display(),
                dir.path().join(format!("{name}.out.pem")).display()
            ));
        }
        Config::from_text(
            &Flags::default(),
            Path::new("two.toml"),
            &text,
            Child::Absent,
        )
        .expect("config")
    };
    let metrics = Arc::new(Metrics::new());
    let mut daemon = quiet_daemon(text(&["kept", "dropped"]), metrics.clone());
    daemon.hold = None;
    daemon.dispatch();
    settle_runs(&mut daemon).await;
    let series = |bundle: &str| {
        let label = format!("{{bundle=\"{bundle}\"}}");
        metrics
            .encode()
            .lines()
            .filter(|l| l.contains(&label) || l.contains(&format!("bundle=\"{bundle}\",")))
            .count()
    };
    assert!(series("dropped") > 0, "{}", metrics.encode());
    let kept = series("kept");

    daemon.apply(text(&["kept"]));
    daemon.dispatch();
    settle_runs(&mut daemon).await;
    assert_eq!(series("dropped"), 0, "{}", metrics.encode());
    assert!(series("kept") >= kept, "{}", metrics.encode());
    // A reload of the removed bundle that ends now, on its worker, counts
    // into no series: it would bring the bundle back for good.
    metrics.reload("dropped", "signal", true);
    assert_eq!(series("dropped"), 0, "{}", metrics.encode());
    metrics.reload("kept", "signal", true);
    assert_eq!(metrics.reloads("kept", "signal", true), 1);
}
