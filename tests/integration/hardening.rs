//! What an adversarial user found and what must hold from now on: writes
//! that fail converge without a source event (guarantee 12), logs that
//! stay readable and quiet, and JSON logs that are JSON to the last line.

use std::fs;

use crate::support::daemon::{App, Daemon};
use crate::support::pki::Ca;
use crate::support::{file_sha256, pems, run, s, wait_certs, write};

/// One of two outputs cannot be written (its directory's place is taken by
/// a file): the other is written, nothing reloads, and once the way is
/// clear the write is retried with no source event and the reload runs.
#[test]
fn a_failed_write_is_retried_and_the_reload_waits_for_every_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Converge A"), Ca::new("Converge B"));
    let src = write(&dir.path().join("src"), "ca.pem", a.pem());
    let fine = dir.path().join("fine/ca.pem");
    let blocked = dir.path().join("blocked/ca.pem");
    let app = App::start(dir.path(), &blocked);
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&src),
            "--output",
            s(&fine),
            "--output",
            s(&blocked),
            "--pid-file",
            s(&app.pid_file),
            "--debounce",
            "0",
            "--resync",
            "0",
        ],
    );
    wait_certs(&blocked, 1);
    app.wait_reloads(1);

    // The output's directory becomes a file: its writes fail.
    fs::remove_dir_all(dir.path().join("blocked")).expect("rm");
    fs::write(dir.path().join("blocked"), "in the way").expect("file");
    fs::write(&src, pems(&[&a, &b])).expect("write");
    daemon.wait_log("cannot write output", 1);
    wait_certs(&fine, 2);
    // Truthful: the line says which output changed, and no reload ran.
    assert!(daemon.log().contains("fine/ca.pem"), "{}", daemon.log());
    daemon.wait_log("cannot write output", 2);
    assert_eq!(
        app.reloads().len(),
        1,
        "a reload before every output was written"
    );

    // The way clears: with no source event (resync off) the write is
    // retried, and only then does the app reload, reading the new set.
    fs::remove_file(dir.path().join("blocked")).expect("rm");
    wait_certs(&blocked, 2);
    let reloads = app.wait_reloads(2);
    assert_eq!(reloads[1], file_sha256(&blocked));
    assert_eq!(reloads.len(), 2);
}

#[test]
fn poll_ticks_are_no_news_and_long_lists_are_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cas: Vec<Ca> = (0..60).map(|i| Ca::new(&format!("Many {i}"))).collect();
    let refs: Vec<&Ca> = cas.iter().collect();
    let src = write(&dir.path().join("src"), "ca.pem", pems(&refs));
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&src),
            "--output",
            s(&dir.path().join("ca.pem")),
            "--poll",
            "100ms",
        ],
    );
    // Five poll ticks after the first render.
    daemon.wait_log("run started", 6);
    let log = daemon.log();
    let info: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("rendered"))
        .collect();
    assert_eq!(info.len(), 1, "one INFO render line, the first:\n{log}");
    assert!(info[0].contains("55 more (60 in all)"), "{}", info[0]);
    assert!(info[0].len() < 2000, "a {}-byte line", info[0].len());
    assert!(
        log.contains("DEBUG") && log.contains("outcome=\"unchanged\""),
        "{log}"
    );
}

/// Every stderr line is a JSON object in JSON mode, the last word of a
/// failed `render` or `check` and a configuration error included.
#[test]
fn json_mode_is_json_to_the_last_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = write(dir.path(), "bad.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
    let out = dir.path().join("out.pem");
    // A CA a strict verifier refuses: no keyUsage.
    let weak = write(
        dir.path(),
        "weak.pem",
        crate::support::pki::ca_without_key_usage("Weak"),
    );
    let cases: Vec<(Vec<&str>, i32)> = vec![
        (
            vec!["check", "--log-format", "json", "--strict", s(&weak)],
            1,
        ),
        (
            vec![
                "render",
                "--log-format",
                "json",
                "--source",
                s(&garbage),
                "--output",
                s(&out),
            ],
            1,
        ),
        (
            vec![
                "render",
                "--log-format",
                "json",
                "--source",
                "/x",
                "--debounce",
                "soon",
            ],
            2,
        ),
        (
            vec![
                "render",
                "--log-format",
                "json",
                "--config",
                "/nonexistent.toml",
            ],
            2,
        ),
        (vec!["check", "--log-format", "json", "/nonexistent.pem"], 1),
    ];
    for (args, code) in cases {
        let outcome = run(&args);
        outcome.expect_code(code);
        assert!(!outcome.stderr.trim().is_empty(), "{args:?}: nothing said");
        for line in outcome.stderr.lines() {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}"));
            assert!(value.is_object(), "{line}");
        }
    }
}
