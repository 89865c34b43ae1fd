//! `anchorage health`: the exit code a container HEALTHCHECK gets from a
//! running daemon's `/readyz` (`/healthz` with `--live`), within 2 s.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::daemon::{Daemon, eventually};
use crate::support::pki::Ca;
use crate::support::{Outcome, anchorage, free_port, run, s, write};

/// `anchorage health ARGS`, and how long it took.
fn health(args: &[&str]) -> (Outcome, Duration) {
    let started = Instant::now();
    let out = run(&[&["health"], args].concat());
    (out, started.elapsed())
}

#[test]
fn a_ready_daemon_is_healthy_and_an_absent_one_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(&dir.path().join("src"), "ca.pem", Ca::new("Health").pem());
    let listen = format!("127.0.0.1:{}", free_port());

    // Nothing listens yet: refused at once.
    let (out, took) = health(&["--listen", &listen]);
    out.expect_code(1);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    assert!(took < Duration::from_secs(2), "{took:?}");

    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&dir.path().join("out.pem")),
            "--listen",
            &listen,
        ],
    );
    eventually(Duration::from_secs(15), || {
        let (out, _) = health(&["--listen", &listen]);
        (out.code == 0)
            .then_some(())
            .ok_or_else(|| format!("not healthy yet: {}", out.stderr))
    });
    let (out, took) = health(&["--listen", &listen, "--live"]);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains(&format!("http://{listen}/healthz: 200")),
        "{}",
        out.stdout
    );
    assert!(took < Duration::from_secs(2), "{took:?}");

    // An unspecified host is the daemon listening everywhere: ask loopback.
    let port = listen.rsplit(':').next().expect("port");
    let (out, _) = health(&["--listen", &format!("0.0.0.0:{port}")]);
    out.expect_code(0);
    assert!(
        out.stdout
            .contains(&format!("http://127.0.0.1:{port}/readyz: 200")),
        "{}",
        out.stdout
    );

    // The variable the daemon itself reads.
    let out = Outcome::of(
        anchorage()
            .args(["health"])
            .env("ANCHORAGE_LISTEN", &listen)
            .output()
            .expect("run"),
    );
    out.expect_code(0);
    daemon.stop();
}

#[test]
fn a_daemon_that_has_not_rendered_is_alive_but_not_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A damaged source: the bundle is refused, so it never renders once.
    let src = write(
        &dir.path().join("src"),
        "ca.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&dir.path().join("out.pem")),
            "--listen",
            &listen,
        ],
    );
    daemon.wait_log("serving /metrics", 1);
    daemon.wait_log("refused", 1);
    let (out, took) = health(&["--listen", &listen]);
    out.expect_code(1);
    assert!(out.stderr.contains("/readyz: 503"), "{}", out.stderr);
    assert!(out.stderr.contains("not ready"), "{}", out.stderr);
    assert!(took < Duration::from_secs(2), "{took:?}");
    let (out, _) = health(&["--listen", &listen, "--live"]);
    out.expect_code(0);
    daemon.stop();
}

#[test]
fn the_address_comes_from_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(&dir.path().join("src"), "ca.pem", Ca::new("Config").pem());
    let listen = format!("127.0.0.1:{}", free_port());
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            "[daemon]\nlisten = \"{listen}\"\n\n[[bundle]]\nname = \"peers\"\nsources = [\"{}\"]\n\n  [[bundle.output]]\n  path = \"{}\"\n",
            s(src.parent().expect("dir")),
            s(&dir.path().join("out.pem"))
        ),
    );
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    eventually(Duration::from_secs(15), || {
        let (out, _) = health(&["--config", s(&config)]);
        (out.code == 0)
            .then_some(())
            .ok_or_else(|| format!("not healthy yet: {}", out.stderr))
    });
    // The variable the daemon itself reads.
    let out = Outcome::of(
        anchorage()
            .args(["health", "--live"])
            .env("ANCHORAGE_CONFIG", &config)
            .output()
            .expect("run"),
    );
    out.expect_code(0);

    // A config without [daemon] listen: nothing to ask, said plainly.
    let bare = write(dir.path(), "bare.toml", "[[bundle]]\nname = \"x\"\n");
    let (out, _) = health(&["--config", s(&bare)]);
    out.expect_code(1);
    assert!(out.stderr.contains("no [daemon] listen"), "{}", out.stderr);
    daemon.stop();
}

#[test]
fn a_listener_that_never_answers_fails_within_the_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accepts (the kernel's backlog does) and never answers.
    let (out, took) = health(&["--listen", &addr.to_string()]);
    out.expect_code(1);
    assert!(out.stderr.contains("no answer within 2s"), "{}", out.stderr);
    // The process gives up 50 ms before the 2 s, its start and exit
    // included; how long a loaded machine takes to reap it is not its own.
    assert!(
        took >= Duration::from_millis(1850) && took < Duration::from_secs(4),
        "{took:?}"
    );
    drop(listener);
}

/// SIGHUP with another `[daemon] listen`: the listener moves there. An
/// address that cannot be bound leaves the old one serving, and a later
/// SIGHUP tries again; no address any more stops serving.
#[test]
fn a_sighup_moves_the_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(&dir.path().join("src"), "ca.pem", Ca::new("Moving").pem());
    let output = dir.path().join("out.pem");
    let config_at = |listen: Option<&str>| {
        let daemon = listen.map_or(String::new(), |l| format!("[daemon]\nlisten = \"{l}\"\n"));
        write(
            dir.path(),
            "anchorage.toml",
            format!(
                "{daemon}[[bundle]]\nname = \"b\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\n",
                s(src.parent().expect("dir")),
                s(&output)
            ),
        )
    };
    let healthy = |listen: &str| {
        eventually(Duration::from_secs(15), || {
            let (out, _) = health(&["--listen", listen]);
            (out.code == 0)
                .then_some(())
                .ok_or_else(|| format!("{listen} not healthy: {}", out.stderr))
        });
    };
    let refused = |listen: &str| {
        let (out, _) = health(&["--listen", listen]);
        out.expect_code(1);
        assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    };
    let first = format!("127.0.0.1:{}", free_port());
    let config = config_at(Some(&first));
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    healthy(&first);

    let second = format!("127.0.0.1:{}", free_port());
    config_at(Some(&second));
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("the listener moved", 1);
    healthy(&second);
    refused(&first);

    // Taken by someone else: the listener stays, said in a warning.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    config_at(Some(&taken.local_addr().expect("addr").to_string()));
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("the listener stays where it was", 1);
    healthy(&second);
    // Free again: the next SIGHUP moves it there.
    let third = taken.local_addr().expect("addr").to_string();
    drop(taken);
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("the listener moved", 2);
    healthy(&third);
    refused(&second);

    // No address: nothing served any more.
    config_at(None);
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("no longer served", 1);
    refused(&third);
    assert!(!daemon.log().contains("keeps its own"), "{}", daemon.log());
    assert_eq!(daemon.stop(), 0);
}

/// `--log-format json` (or its variable): health's own error is one JSON
/// object, as every line anchorage writes to stderr is then.
#[test]
fn health_errors_are_json_in_json_mode() {
    let listen = format!("127.0.0.1:{}", free_port());
    let json = |out: &Outcome| {
        let line = out.stderr.lines().last().unwrap_or_default().to_owned();
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            value["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot connect"))
        );
    };
    let (out, _) = health(&["--listen", &listen, "--log-format", "json"]);
    out.expect_code(1);
    json(&out);
    let out = Outcome::of(
        anchorage()
            .args(["health", "--listen", &listen])
            .env("ANCHORAGE_LOG_FORMAT", "json")
            .output()
            .expect("run"),
    );
    out.expect_code(1);
    json(&out);
}
