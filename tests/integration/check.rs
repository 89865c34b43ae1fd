//! `anchorage check`: the fields, their formats, and the exit codes.

use crate::support::pki::{Ca, non_ca};
use crate::support::{run, s, sh, write};

#[test]
fn json_fields_match_openssl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Check Root");
    let leaf = ca.leaf("svc.example");
    let bundle = format!("{}{}", ca.pem(), leaf.cert.pem());
    let path = write(dir.path(), "bundle.pem", &bundle);
    let out = run(&["check", "--json", s(&path)]);
    out.expect_code(0);
    let reports: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let reports = reports.as_array().expect("array");
    assert_eq!(reports.len(), 2);

    let root = &reports[0];
    assert_eq!(root["path"], s(&path));
    assert_eq!(root["index"], 0);
    assert_eq!(root["is_ca"], true);
    assert_eq!(root["expired"], false);
    assert_eq!(root["sha256"], ca.sha256());
    assert!(
        root["subject"]
            .as_str()
            .expect("subject")
            .contains("CN=Check Root")
    );
    let ca_file = write(dir.path(), "ca.pem", ca.pem());
    let hash = sh(&format!(
        "openssl x509 -noout -subject_hash -in {}",
        s(&ca_file)
    ));
    assert_eq!(root["subject_hash"], hash.trim());
    let serial = sh(&format!("openssl x509 -noout -serial -in {}", s(&ca_file)));
    assert_eq!(
        root["serial"].as_str().expect("serial"),
        serial
            .trim()
            .trim_start_matches("serial=")
            .to_ascii_lowercase()
    );
    let not_after = root["not_after"].as_str().expect("not_after");
    assert!(not_after.ends_with('Z'), "{not_after}");
    time::OffsetDateTime::parse(not_after, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");

    let leaf_report = &reports[1];
    assert_eq!(leaf_report["index"], 1);
    assert_eq!(leaf_report["is_ca"], false);
    assert!(
        leaf_report["issuer"]
            .as_str()
            .expect("issuer")
            .contains("CN=Check Root")
    );
}

#[test]
fn at_decides_expiry_and_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "ca.pem", Ca::new("Soon").pem());
    run(&["check", s(&path)]).expect_code(0);
    run(&["check", "--at", "2020-01-01T00:00:00Z", s(&path)]).expect_code(0);
    let out = run(&["check", "--json", "--at", "2100-01-01T00:00:00Z", s(&path)]);
    out.expect_code(1);
    let reports: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("json even on exit 1");
    assert_eq!(reports[0]["expired"], true);

    // Without --at, an expired certificate is reported but does not fail.
    let expired = write(dir.path(), "old.pem", Ca::expired("Old").pem());
    let out = run(&["check", "--json", s(&expired)]);
    out.expect_code(0);
    assert!(out.stdout.contains("\"expired\": true"), "{}", out.stdout);
}

#[test]
fn unreadable_or_empty_files_exit_1_and_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(dir.path(), "good.pem", Ca::new("Good").pem());
    let junk = write(
        dir.path(),
        "junk.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let out = run(&["check", "--json", s(&good), s(&junk)]);
    out.expect_code(1);
    assert!(out.stderr.contains("junk.pem"), "{}", out.stderr);
    let reports: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(reports.as_array().expect("array").len(), 1);

    let missing = dir.path().join("missing.pem");
    let out = run(&["check", s(&missing)]);
    out.expect_code(1);
    assert!(out.stderr.contains("missing.pem"), "{}", out.stderr);

    let key_only = write(
        dir.path(),
        "tls.key",
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
    );
    let out = run(&["check", s(&key_only)]);
    out.expect_code(1);
    assert!(
        !out.stderr.contains("c2VjcmV0"),
        "a key body was printed: {}",
        out.stderr
    );
}

#[test]
fn directory_lists_every_certificate_and_skips_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.pem", Ca::new("A").pem());
    write(dir.path(), "b.crt", Ca::new("B").der());
    write(dir.path(), "c.pem", non_ca("C"));
    write(
        dir.path(),
        "tls.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let out = run(&["check", "--json", s(dir.path())]);
    out.expect_code(0);
    let reports: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    let reports = reports.as_array().expect("array");
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[2]["is_ca"], false);
    let text = run(&["check", s(dir.path())]);
    text.expect_code(0);
    assert!(text.stdout.contains("CN=B"), "{}", text.stdout);
}

#[test]
fn v1_self_issued_root_is_a_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("k.pem");
    let csr = dir.path().join("r.csr");
    let cert = dir.path().join("v1.pem");
    sh(&format!(
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {k} -subj /CN=V1Root -out {csr} 2>/dev/null && \
         openssl x509 -req -in {csr} -signkey {k} -days 30 -out {c} 2>/dev/null",
        k = s(&key),
        csr = s(&csr),
        c = s(&cert)
    ));
    let text = sh(&format!("openssl x509 -noout -text -in {}", s(&cert)));
    assert!(
        text.contains("Version: 1"),
        "openssl made a v3 certificate: {text}"
    );
    let out = run(&["check", "--json", s(&cert)]);
    out.expect_code(0);
    assert!(out.stdout.contains("\"is_ca\": true"), "{}", out.stdout);
}

/// The table row of the certificate whose subject holds `cn`.
fn row<'a>(text: &'a str, cn: &str) -> &'a str {
    text.lines()
        .find(|l| !l.starts_with('#') && l.contains(cn) && l.contains("  yes  "))
        .unwrap_or_else(|| panic!("no table row for {cn}:\n{text}"))
}

#[test]
fn text_is_a_table_marking_what_expires_within_30_days() {
    let dir = tempfile::tempdir().expect("tempdir");
    let now = time::OffsetDateTime::now_utc();
    let soon = Ca::valid(
        "Soon Gone",
        now - time::Duration::days(300),
        now + time::Duration::days(10),
    );
    let year = Ca::new("Year Left");
    write(dir.path(), "a-soon.pem", soon.pem());
    write(dir.path(), "b-year.pem", year.pem());
    write(dir.path(), "c-old.pem", Ca::expired("Long Gone").pem());
    let out = run(&["check", s(dir.path())]);
    out.expect_code(0);
    let text = &out.stdout;
    assert!(
        text.contains("SUBJECT") && text.contains("EXPIRES") && text.contains("HASH"),
        "{text}"
    );
    let soon_row = row(text, "CN=Soon Gone");
    assert!(
        soon_row.contains("in 9 days !") || soon_row.contains("in 10 days !"),
        "{soon_row}"
    );
    assert!(soon_row.ends_with("a-soon.pem"), "{soon_row}");
    let year_row = row(text, "CN=Year Left");
    assert!(
        year_row.contains("in 364 days") || year_row.contains("in 365 days"),
        "{year_row}"
    );
    assert!(!year_row.contains('!'), "{year_row}");
    let old_row = row(text, "CN=Long Gone");
    assert!(old_row.contains("EXPIRED 24 hours ago"), "{old_row}");
    assert!(!old_row.contains('!'), "{old_row}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("! expires within 30 days: #1 ")),
        "{text}"
    );
    assert!(text.contains("expired: #3"), "{text}");
    // Every field of the contract is there, not only the table's.
    for field in [
        year.sha256(),
        "issuer:".to_owned(),
        "serial:".to_owned(),
        "not before:".to_owned(),
        "not after:".to_owned(),
        "subject hash:".to_owned(),
    ] {
        assert!(text.contains(&field), "{field} missing:\n{text}");
    }

    // --at moves "now": the year-long CA is the one about to expire then.
    let at = (now + time::Duration::days(350))
        .replace_nanosecond(0)
        .expect("whole second")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    let out = run(&["check", "--at", &at, s(&dir.path().join("b-year.pem"))]);
    out.expect_code(0);
    let year_row = row(&out.stdout, "CN=Year Left");
    assert!(
        year_row.contains("in 14 days !") || year_row.contains("in 15 days !"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("times are relative to --at"),
        "{}",
        out.stdout
    );
}

/// A subject is attacker-chosen text: printed raw, `ESC[31m` recolours the
/// terminal and a newline forges a line of its own.
#[test]
fn text_output_escapes_control_characters_of_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Evil\u{1b}[31m\nanchorage: all CAs verified");
    let path = write(dir.path(), "evil.pem", ca.pem());
    let out = run(&["check", s(&path)]);
    out.expect_code(0);
    assert!(
        !out.stdout.contains('\u{1b}'),
        "a raw ESC was printed:\n{}",
        out.stdout
    );
    assert!(
        !out.stdout
            .lines()
            .any(|l| l.starts_with("anchorage: all CAs verified")),
        "the subject forged a line:\n{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("CN=Evil\\x1b[31m\\nanchorage: all CAs verified"),
        "not escaped as openssl -nameopt esc_ctrl would:\n{}",
        out.stdout
    );
    // JSON carries the name as it is: its encoding escapes it already.
    let json = run(&["check", "--json", s(&path)]);
    let reports: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert!(
        reports[0]["subject"]
            .as_str()
            .expect("subject")
            .contains("Evil\u{1b}[31m\nanchorage")
    );
}

/// A FIFO in a directory fails a bundle that reads it ("not a regular
/// file"); `check` of that directory says the same and exits 1, still
/// listing the certificates it could read. A subdirectory is skipped by
/// both.
#[test]
fn a_fifo_in_a_directory_is_unreadable_as_a_render_finds_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a.pem", Ca::new("Beside the FIFO").pem());
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    let fifo = dir.path().join("pipe");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let out = run(&["check", "--json", s(dir.path())]);
    out.expect_code(1);
    assert!(
        out.stderr
            .contains(&format!("{}: cannot read: not a regular file", s(&fifo))),
        "{}",
        out.stderr
    );
    let reports: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(reports.as_array().map(Vec::len), Some(1));
    let output = dir.path().join("out.pem");
    let render = run(&["render", "--source", s(dir.path()), "--output", s(&output)]);
    render.expect_code(1);
    assert!(
        render.stderr.contains("not a regular file"),
        "{}",
        render.stderr
    );
}

/// `check ... | head -1`: the reader goes before the table is written; the
/// exit code still says what the files hold, and no error is printed.
#[test]
fn a_reader_that_goes_away_is_no_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "ca.pem", Ca::new("Piped").pem());
    let mut child = crate::support::anchorage()
        .args(["check", s(&path)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Closed before anything can be read from it.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");
}
