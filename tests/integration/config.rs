//! Configuration errors: exit 2, naming the file, the line and the key.

use crate::support::pki::Ca;
use crate::support::{Outcome, run, s, write};

fn config_error(toml: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "anchorage.toml", toml);
    let out = run(&["render", "--config", s(&path)]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("anchorage.toml"),
        "file not named: {}",
        out.stderr
    );
    out.stderr
}

#[test]
fn unknown_key_names_line_and_key() {
    let err = config_error("[[bundle]]\nname = \"x\"\nsources = [\"/tmp\"]\nsauces = 1\n");
    assert!(err.contains(":4:"), "{err}");
    assert!(err.contains("sauces"), "{err}");
}

#[test]
fn bad_duration_names_line_and_key() {
    let err = config_error("[daemon]\ndebounce = \"soon\"\n");
    assert!(err.contains(":2:") && err.contains("debounce"), "{err}");
}

#[test]
fn bundle_without_source_is_an_error() {
    let err = config_error("[daemon]\nresync = \"1m\"\n\n[[bundle]]\nname = \"empty\"\n");
    assert!(
        err.contains(":4:") && err.contains("bundle.sources"),
        "{err}"
    );
}

#[test]
fn reload_without_target_is_an_error() {
    let err = config_error(
        "[[bundle]]\nsources = [\"/tmp/x\"]\n\n  [[bundle.reload]]\n  timeout = \"5s\"\n",
    );
    assert!(err.contains(":4:") && err.contains("reload"), "{err}");
}

#[test]
fn bad_format_and_mode_are_errors() {
    let err = config_error(
        "[[bundle]]\nsources = [\"/x\"]\n[[bundle.output]]\npath = \"/o\"\nformat = \"p7b\"\n",
    );
    assert!(err.contains(":5:") && err.contains("format"), "{err}");
    let err = config_error(
        "[[bundle]]\nsources = [\"/x\"]\n[[bundle.output]]\npath = \"/o\"\nmode = \"rw-r--r--\"\n",
    );
    assert!(err.contains(":5:") && err.contains("mode"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    run(&["render"]).expect_code(2);
    run(&["render", "--source", "/x", "--debounce", "fast"]).expect_code(2);
    run(&["check"]).expect_code(2);
    run(&["frobnicate"]).expect_code(2);
    let out = run(&["render", "--config", "/nonexistent/anchorage.toml"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("/nonexistent/anchorage.toml"),
        "{}",
        out.stderr
    );
}

#[test]
fn full_contract_example_is_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(&dir.path().join("ca"), "ca.crt", Ca::new("Example").pem());
    let out_file = dir.path().join("peers.pem");
    let toml = format!(
        r#"
[daemon]
debounce = "200ms"
resync = "5m"
log_format = "json"

[[bundle]]
name = "peers"
sources = ["{src}", "{extra}/*.pem"]
retain_removed = "72h"
min_certs = 1
allow_expired = false
allow_non_ca = false

  [[bundle.output]]
  path = "{out}"
  format = "pem"
  mode = "0644"

  [[bundle.reload]]
  exec = ["true"]
  timeout = "30s"

  [[bundle.reload]]
  http = "http://127.0.0.1:1/-/reload"
  method = "POST"
  retries = 5
"#,
        src = s(src.parent().expect("dir")),
        extra = s(dir.path()),
        out = s(&out_file)
    );
    let config = write(dir.path(), "anchorage.toml", toml);
    let out = run(&["render", "--config", s(&config)]);
    out.expect_code(0);
    assert!(out_file.exists());
    // log_format = "json" from the file: log lines are JSON objects.
    let first = out.stderr.lines().next().expect("a log line");
    serde_json::from_str::<serde_json::Value>(first).expect("json log line");
}

/// A configuration error in a file that asks for JSON logs is one JSON
/// object too, naming the file, the line and the key; a flag still wins.
#[test]
fn a_configuration_error_is_logged_as_the_file_asks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "anchorage.toml",
        "[daemon]\nlog_format = \"json\"\n[[bundle]]\nname = \"x\"\nsources = []\n",
    );
    for command in ["render", "run"] {
        let out = run(&[command, "--config", s(&config)]);
        out.expect_code(2);
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}", out.stderr);
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
        let message = line["fields"]["message"].as_str().expect("message");
        assert!(
            message.contains("anchorage.toml:3") && message.contains("bundle.sources"),
            "{message}"
        );
    }
    let out = run(&["render", "--config", s(&config), "--log-format", "text"]);
    out.expect_code(2);
    assert!(
        serde_json::from_str::<serde_json::Value>(out.stderr.trim()).is_err(),
        "{}",
        out.stderr
    );
}

#[test]
fn flag_overrides_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Override").pem());
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!("[[bundle]]\nsources = [\"{}\"]\nmin_certs = 5\n", s(&src)),
    );
    run(&["render", "--config", s(&config)]).expect_code(1);
    run(&["render", "--config", s(&config), "--min-certs", "1"]).expect_code(0);
}

/// A bundle flag over a config of several bundles is refused, naming the
/// flag given, and its variable (set in a container's environment, it is
/// as much a flag).
#[test]
fn a_bundle_flag_over_several_bundles_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write(
        dir.path(),
        "anchorage.toml",
        "[[bundle]]\nname = \"a\"\nsources = [\"/a\"]\n[[bundle]]\nname = \"b\"\nsources = [\"/b\"]\n",
    );
    let out = run(&["render", "--config", s(&config), "--min-certs", "2"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("--min-certs") && out.stderr.contains("ANCHORAGE_MIN_CERTS"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("--source"), "{}", out.stderr);
}

/// A bad value from a variable is reported with the variable's name: the
/// flag it stands for was never typed. A typed flag is reported as typed.
#[test]
fn a_bad_value_from_a_variable_names_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Variable").pem());
    let out_path = dir.path().join("out.pem");
    let args = ["render", "--source", s(&src), "--output", s(&out_path)];
    let out = crate::support::anchorage()
        .args(args)
        .env("ANCHORAGE_DEBOUNCE", "soon")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'soon'") && stderr.contains("(from ANCHORAGE_DEBOUNCE)"),
        "{stderr}"
    );
    assert!(!out_path.exists());

    let out = crate::support::anchorage()
        .args(args)
        .args(["--debounce", "later"])
        .env("ANCHORAGE_DEBOUNCE", "soon")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("'later'"), "{stderr}");
    assert!(!stderr.contains("ANCHORAGE_DEBOUNCE"), "{stderr}");
}

#[test]
fn exec_keeps_commas_on_the_command_line_and_splits_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Exec").pem());
    let marks = dir.path().join("marks");
    let out = run(&[
        "render",
        "--source",
        s(&src),
        "--output",
        s(&dir.path().join("a.pem")),
        "--reload",
        "--exec",
        &format!("sh -c 'echo one,two >> {}'", s(&marks)),
    ]);
    out.expect_code(0);
    assert_eq!(std::fs::read_to_string(&marks).expect("marks"), "one,two\n");

    let out = crate::support::anchorage()
        .args([
            "render",
            "--source",
            s(&src),
            "--output",
            s(&dir.path().join("b.pem")),
            "--reload",
        ])
        .env(
            "ANCHORAGE_EXEC",
            format!(
                "sh -c 'echo x >> {m}', sh -c 'echo y >> {m}'",
                m = s(&marks)
            ),
        )
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Distinct actions run side by side, each once: the order is free.
    let text = std::fs::read_to_string(&marks).expect("marks");
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["one,two", "x", "y"]);
}

#[test]
fn boolean_variables_accept_the_usual_spellings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(
        dir.path(),
        "leaf.pem",
        crate::support::pki::non_ca("Env Leaf"),
    );
    for (value, code) in [("true", 0), ("1", 0), ("yes", 0), ("false", 1), ("0", 1)] {
        let out = crate::support::anchorage()
            .args([
                "render",
                "--source",
                s(&src),
                "--output",
                s(&dir.path().join(format!("{value}.pem"))),
            ])
            .env("ANCHORAGE_ALLOW_NON_CA", value)
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(code),
            "ANCHORAGE_ALLOW_NON_CA={value}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Set to false, the flag or its variable overrides the file's true.
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            "[[bundle]]\nsources = [\"{}\"]\nallow_non_ca = true\n[[bundle.output]]\npath = \"{}\"\n",
            s(&src),
            s(&dir.path().join("file.pem"))
        ),
    );
    run(&["render", "--config", s(&config)]).expect_code(0);
    run(&["render", "--config", s(&config), "--allow-non-ca=false"]).expect_code(1);
    let out = crate::support::anchorage()
        .args(["render", "--config", s(&config)])
        .env("ANCHORAGE_ALLOW_NON_CA", "false")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The switch alone still says true.
    run(&[
        "render",
        "--source",
        s(&src),
        "--allow-non-ca",
        "--output",
        s(&dir.path().join("s.pem")),
    ])
    .expect_code(0);
}

/// A URL's password never reaches an error (guarantee 14), whether the URL
/// came from a flag or from the file.
#[test]
fn url_passwords_are_never_printed() {
    let out = run(&[
        "render",
        "--source",
        "/x",
        "--http",
        "https://alice:SECRETPW@127.0.0.1/x",
    ]);
    out.expect_code(2);
    assert!(out.stderr.contains("--http"), "{}", out.stderr);
    assert!(!out.stderr.contains("SECRETPW"), "{}", out.stderr);
    let err = config_error(
        "[[bundle]]\nsources = [\"/x\"]\n[[bundle.reload]]\nhttp = \"http://alice:SECRETPW@127.0.0.1:99999/x\"\n",
    );
    assert!(err.contains(":4:") && err.contains("http"), "{err}");
    assert!(!err.contains("SECRETPW"), "{err}");
}

/// Each is refused at start, not retried forever at reload time.
#[test]
fn reload_targets_that_can_never_work_are_configuration_errors() {
    for (flag, value) in [
        ("--process", ""),
        ("--process", "/usr/sbin/nginx"),
        ("--http", "http://127.0.0.1:99999/x"),
        ("--http", "http://127.0.0.1/a b"),
        ("--http", "http:///x"),
    ] {
        let out = run(&["render", "--source", "/x", flag, value]);
        out.expect_code(2);
        assert!(
            out.stderr.contains(flag),
            "{flag} {value:?}: {}",
            out.stderr
        );
    }
    let err = config_error(
        "[[bundle]]\nsources = [\"/x\"]\n[[bundle.output]]\npath = \"/o\"\nmode = \"0o644\"\n",
    );
    assert!(err.contains(":5:") && err.contains("mode"), "{err}");
    let err = config_error(
        "[[bundle]]\nsources = [\"/x\"]\n[[bundle.reload]]\nexec = \"true\"\nbearer_token_file = \"/t\"\n",
    );
    assert!(err.contains("bearer_token_file"), "{err}");
}

/// Two outputs at one path: the last render would silently win.
#[test]
fn two_outputs_at_one_path_are_a_configuration_error() {
    let err = config_error(
        "[[bundle]]\nname = \"a\"\nsources = [\"/x\"]\n[[bundle.output]]\npath = \"/shared/ca.pem\"\n\n\
         [[bundle]]\nname = \"b\"\nsources = [\"/y\"]\n[[bundle.output]]\npath = \"/shared/ca.pem\"\nformat = \"pem\"\n",
    );
    assert!(err.contains(":10:"), "{err}");
    assert!(
        err.contains("/shared/ca.pem") && err.contains("\"a\""),
        "{err}"
    );
    let out = run(&[
        "render",
        "--source",
        "/x",
        "--output",
        "/o/ca",
        "--hashed-dir",
        "/o/ca",
    ]);
    out.expect_code(2);
    assert!(out.stderr.contains("/o/ca"), "{}", out.stderr);
}

/// However an output's path is spelled (`./x.pem`, `sub/../x.pem`, its
/// absolute path), it is one path; and an empty one is no path.
#[test]
fn two_outputs_at_one_path_spelled_differently_are_a_configuration_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let absolute = dir.path().join("x.pem");
    let in_dir = |args: &[&str]| {
        Outcome::of(
            crate::support::anchorage()
                .current_dir(dir.path())
                .args(args)
                .output()
                .expect("run"),
        )
    };
    for other in ["./x.pem", "sub/../x.pem", s(&absolute)] {
        let config = write(
            dir.path(),
            "anchorage.toml",
            format!(
                "[[bundle]]\nname = \"a\"\nsources = [\"/x\"]\n[[bundle.output]]\npath = \"x.pem\"\n\n\
                 [[bundle]]\nname = \"b\"\nsources = [\"/y\"]\n[[bundle.output]]\npath = \"{other}\"\n"
            ),
        );
        let out = in_dir(&["render", "--config", s(&config)]);
        out.expect_code(2);
        assert!(
            out.stderr.contains(":10:") && out.stderr.contains("already an output of bundle \"a\""),
            "{other}: {}",
            out.stderr
        );
    }
    let out = in_dir(&[
        "render", "--source", "/x", "--output", "z.pem", "--output", "./z.pem",
    ]);
    out.expect_code(2);
    assert!(out.stderr.contains("already an output"), "{}", out.stderr);

    let err = config_error(
        "[[bundle]]\nname = \"e\"\nsources = [\"/x\"]\n[[bundle.output]]\npath = \"\"\n",
    );
    assert!(
        err.contains(":4:") && err.contains("bundle.output.path") && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn duplicate_names_carry_their_line() {
    let err = config_error(
        "[[bundle]]\nname = \"x\"\nsources = [\"/a\"]\n\n[[bundle]]\nname = \"x\"\nsources = [\"/b\"]\n",
    );
    assert!(err.contains(":6:") && err.contains("bundle.name"), "{err}");
    let err = config_error(
        "[[keypair]]\nname = \"k\"\ncert = \"/c\"\nkey = \"/k\"\n[[keypair]]\nname = \"k\"\ncert = \"/c2\"\nkey = \"/k2\"\n",
    );
    assert!(err.contains(":6:") && err.contains("keypair.name"), "{err}");
}

/// A key pair comes from two files or from one credential bundle, never
/// both; key_mode belongs to a split directory.
#[test]
fn a_key_pair_names_its_files_one_way() {
    let err = config_error(
        "[[keypair]]\nname = \"pod\"\ncert = \"/c\"\nkey = \"/k\"\ncredential_bundle = \"/b.pem\"\n",
    );
    assert!(
        err.contains(":5:")
            && err.contains("keypair.credential_bundle")
            && err.contains("not both"),
        "{err}"
    );
    let err = config_error("[[keypair]]\nname = \"pod\"\nchain_to = \"x\"\n");
    assert!(
        err.contains(":1:") && err.contains("credential_bundle"),
        "{err}"
    );
    let err = config_error("[[keypair]]\nname = \"pod\"\n\ncert = \"/c\"\n");
    assert!(err.contains(":4:") && err.contains("no key"), "{err}");
    let err = config_error(
        "[[keypair]]\ncredential_bundle = \"/pod/credentialbundle.pem\"\nkey_mode = \"0640\"\n",
    );
    assert!(
        err.contains(":3:") && err.contains("keypair.key_mode"),
        "{err}"
    );
    let err = config_error(
        "[[keypair]]\ncredential_bundle = \"/pod/b.pem\"\nsplit_dir = \"/shared/tls\"\nkey_mode = \"rw\"\n",
    );
    assert!(err.contains(":4:") && err.contains("octal"), "{err}");

    let out = run(&[
        "render",
        "--credential-bundle",
        "/pod/b.pem",
        "--cert",
        "/c",
        "--key",
        "/k",
    ]);
    out.expect_code(2);
    assert!(out.stderr.contains("--credential-bundle"), "{}", out.stderr);
    let out = run(&["render", "--source", "/x", "--split-dir", "/shared/tls"]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("--split-dir") && out.stderr.contains("needs a key pair"),
        "{}",
        out.stderr
    );
    let out = run(&[
        "render",
        "--credential-bundle",
        "/pod/b.pem",
        "--key-mode",
        "0640",
    ]);
    out.expect_code(2);
}

/// A split directory is an output: no other output may sit at it or at
/// its two files, and it may not be where the pair is read from.
#[test]
fn a_split_dir_at_another_output_is_a_configuration_error() {
    let bundle = "[[bundle]]\nname = \"ca\"\nsources = [\"/x\"]\n[[bundle.output]]\npath = \"/shared/tls/tls.crt\"\n\n";
    let err = config_error(&format!(
        "{bundle}[[keypair]]\nname = \"pod\"\ncredential_bundle = \"/pod/b.pem\"\nsplit_dir = \"/shared/tls\"\n"
    ));
    assert!(
        err.contains(":10:") && err.contains("keypair.split_dir"),
        "{err}"
    );
    assert!(
        err.contains("/shared/tls/tls.crt") && err.contains("bundle \"ca\""),
        "{err}"
    );
    let err = config_error(
        "[[keypair]]\nname = \"a\"\ncredential_bundle = \"/a/b.pem\"\nsplit_dir = \"/shared/tls\"\n\
         [[keypair]]\nname = \"b\"\ncredential_bundle = \"/b/b.pem\"\nsplit_dir = \"/shared/tls\"\n",
    );
    assert!(
        err.contains(":8:") && err.contains("key pair \"a\""),
        "{err}"
    );
    let out = run(&[
        "render",
        "--source",
        "/x",
        "--hashed-dir",
        "/shared/tls",
        "--credential-bundle",
        "/pod/b.pem",
        "--split-dir",
        "/shared/tls",
    ]);
    out.expect_code(2);
    assert!(
        out.stderr.contains("--split-dir") && out.stderr.contains("two outputs"),
        "{}",
        out.stderr
    );
    let err = config_error(
        "[[keypair]]\ncredential_bundle = \"/var/run/pod-cert/b.pem\"\nsplit_dir = \"/var/run/pod-cert\"\n",
    );
    assert!(
        err.contains(":3:") && err.contains("where /var/run/pod-cert/b.pem is read from"),
        "{err}"
    );
}

/// Every flag reads `ANCHORAGE_<FLAG>`, the switches of `render`, `check`
/// and `health` too.
#[test]
fn the_command_switches_read_their_variables_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Switches");
    let src = write(dir.path(), "ca.pem", ca.pem());
    let output = dir.path().join("out.pem");
    let with = |vars: &[(&str, &str)], args: &[&str]| {
        let mut cmd = crate::support::anchorage();
        cmd.args(args);
        for (key, value) in vars {
            cmd.env(key, value);
        }
        crate::support::Outcome::of(cmd.output().expect("run"))
    };
    // ANCHORAGE_DRY_RUN: nothing is written.
    let out = with(
        &[("ANCHORAGE_DRY_RUN", "1")],
        &["render", "--source", s(&src), "--output", s(&output)],
    );
    out.expect_code(0);
    assert!(out.stdout.contains("would change"), "{}", out.stdout);
    assert!(!output.exists(), "a dry run wrote its output");
    // ANCHORAGE_JSON: one JSON array.
    let out = with(&[("ANCHORAGE_JSON", "true")], &["check", s(&src)]);
    out.expect_code(0);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(json[0]["sha256"], ca.sha256());
    // ANCHORAGE_AT: expired then.
    with(
        &[("ANCHORAGE_AT", "2999-01-01T00:00:00Z")],
        &["check", s(&src)],
    )
    .expect_code(1);
    // ANCHORAGE_STRICT: a CA without keyUsage fails.
    let weak = write(
        dir.path(),
        "weak.pem",
        crate::support::pki::ca_without_key_usage("No key usage"),
    );
    with(&[], &["check", s(&weak)]).expect_code(0);
    with(&[("ANCHORAGE_STRICT", "1")], &["check", s(&weak)]).expect_code(1);
    with(&[("ANCHORAGE_STRICT", "0")], &["check", s(&weak)]).expect_code(0);
}

/// A name that labels nothing and a reload given no time at all are
/// configuration errors, with their line.
#[test]
fn empty_names_and_zero_timeouts_are_errors() {
    // A reload given no time fails every time.
    let err = config_error(
        "[[bundle]]\nsources = [\"/a\"]\n[[bundle.reload]]\nexec = [\"true\"]\ntimeout = \"0s\"\n",
    );
    assert!(
        err.contains("bundle.reload.timeout") && err.contains("0s"),
        "{err}"
    );
    // An empty name labels nothing and names no state file.
    let err = config_error("[[bundle]]\nname = \"\"\nsources = [\"/a\"]\n");
    assert!(
        err.contains(":2:") && err.contains("bundle.name") && err.contains("empty"),
        "{err}"
    );
    let err = config_error("[[keypair]]\nname = \" \"\ncert = \"/c\"\nkey = \"/k\"\n");
    assert!(err.contains(":2:") && err.contains("keypair.name"), "{err}");
}

/// Every configuration error names its line, those found after the file
/// was read too (a chain_to naming no bundle, a zero poll, a password on a
/// PEM output): each points at the key's own line.
#[test]
fn errors_found_after_reading_name_their_line() {
    let err = config_error(
        "[[bundle]]\nname = \"ca\"\nsources = [\"/a\"]\n[[keypair]]\ncert = \"/c\"\nkey = \"/k\"\nchain_to = \"nope\"\n",
    );
    assert!(
        err.contains(":7:") && err.contains("keypair.chain_to"),
        "{err}"
    );
    let err = config_error(
        "[daemon]\ndebounce = \"1s\"\npoll = \"0s\"\n[[bundle]]\nsources = [\"/a\"]\n",
    );
    assert!(err.contains(":3:") && err.contains("poll"), "{err}");
    let err = config_error(
        "[[bundle]]\nsources = [\"/a\"]\n[[bundle.output]]\npath = \"/o.pem\"\nformat = \"pem\"\npassword = \"x\"\n",
    );
    assert!(
        err.contains(":6:") && err.contains("bundle.output.password"),
        "{err}"
    );
}
