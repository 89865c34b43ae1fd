//! `anchorage check`: what is in these files, for people and for scripts.
//!
//! It reports every certificate it can read and every file it cannot, and
//! never applies the bundle policy: an expired or non-CA certificate is
//! shown, flagged, not dropped.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::bundle::Anchor;
use crate::bundle::subject_hash::hash_hex;
use crate::source::{self, KUBELET_DATA, SourceFile};

/// One certificate as `check --json` prints it (PRODUCT.md, `check`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub path: PathBuf,
    pub index: usize,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    pub sha256: String,
    pub is_ca: bool,
    pub subject_hash: String,
    pub expired: bool,
    /// Why a strict verifier (`openssl verify -x509_strict`, Python 3.13)
    /// would refuse it as a CA; empty when it would not, or when it is no CA.
    pub strict: Vec<String>,
    /// `not_before` and `not_after` in unix seconds, for the table.
    #[serde(skip)]
    pub not_before_unix: i64,
    #[serde(skip)]
    pub not_after_unix: i64,
}

/// What `check` found: the certificates, and the errors naming each file.
#[derive(Debug, Default)]
pub struct Findings {
    pub reports: Vec<Report>,
    pub errors: Vec<String>,
}

/// RFC 3339 in UTC, as `check` prints times.
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

/// Inspects `paths` (files, bundles, directories) with expiry judged at `at`.
pub fn inspect(paths: &[PathBuf], at: i64) -> Findings {
    let mut findings = Findings::default();
    for path in paths {
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => inspect_dir(path, at, &mut findings),
            Ok(_) => inspect_file(path, path, true, at, &mut findings),
            Err(e) => findings
                .errors
                .push(format!("{}: cannot read: {e}", path.display())),
        }
    }
    findings
}

fn inspect_dir(dir: &Path, at: i64, findings: &mut Findings) {
    // A kubelet volume is shown through its live generation.
    let content = match fs::read_link(dir.join(KUBELET_DATA)) {
        Ok(generation) => dir.join(generation),
        Err(_) => dir.to_path_buf(),
    };
    let entries = match fs::read_dir(&content) {
        Ok(entries) => entries,
        Err(e) => {
            findings
                .errors
                .push(format!("{}: cannot list: {e}", dir.display()));
            return;
        }
    };
    let mut names: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| !n.as_encoded_bytes().starts_with(b".."))
        .collect();
    names.sort();
    for name in names {
        let path = content.join(&name);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                inspect_file(&path, &dir.join(&name), false, at, findings);
            }
            // Subdirectories are not read, as a directory source does not
            // read them.
            Ok(meta) if meta.is_dir() => {}
            // A FIFO, a socket, a device: unreadable, as it fails a bundle
            // that reads this directory.
            Ok(_) => findings.errors.push(format!(
                "{}: cannot read: not a regular file",
                dir.join(&name).display()
            )),
            // Gone since the listing, or a dangling link: nothing to read.
            Err(_) => {}
        }
    }
}

/// `named`: the user named this file, so holding no certificate is an error;
/// inside a directory, a key-only file is simply not a certificate file.
fn inspect_file(path: &Path, shown: &Path, named: bool, at: i64, findings: &mut Findings) {
    let file: SourceFile = match source::read_file(path, shown) {
        Ok(Some(file)) => file,
        Ok(None) => {
            findings
                .errors
                .push(format!("{}: vanished while being read", shown.display()));
            return;
        }
        Err(e) => {
            findings.errors.push(e.to_string());
            return;
        }
    };
    if file.blocks.is_empty() {
        if named {
            findings
                .errors
                .push(format!("{}: holds no certificate", shown.display()));
        }
        return;
    }
    let mut reports = Vec::with_capacity(file.blocks.len());
    for (index, block) in file.blocks.iter().enumerate() {
        match Anchor::parse(block, shown.into(), index) {
            Ok(anchor) => reports.push(report(&anchor, at)),
            Err(e) => {
                // A damaged block makes the whole file unusable, as in a bundle.
                findings.errors.push(e.to_string());
                return;
            }
        }
    }
    findings.reports.extend(reports);
}

fn report(anchor: &Anchor, at: i64) -> Report {
    let (issuer, serial) = anchor.issuer_and_serial();
    Report {
        path: anchor.origin.to_path_buf(),
        index: anchor.index,
        subject: anchor.subject.clone(),
        issuer,
        serial,
        not_before: rfc3339(anchor.not_before),
        not_after: rfc3339(anchor.not_after),
        sha256: anchor.fingerprint(),
        is_ca: anchor.is_ca,
        subject_hash: hash_hex(anchor.subject_hash()),
        expired: anchor.expired_at(at),
        strict: anchor.strict.iter().map(ToString::to_string).collect(),
        not_before_unix: anchor.not_before,
        not_after_unix: anchor.not_after,
    }
}

/// Runs `check`: prints the findings and returns the exit code. With
/// `strict`, a CA that a strict verifier refuses makes it 1.
pub fn run(
    paths: &[PathBuf],
    json: bool,
    strict: bool,
    at: Option<i64>,
    now: i64,
    out: &mut dyn Write,
) -> io::Result<i32> {
    let findings = inspect(paths, at.unwrap_or(now));
    let printed = if json {
        serde_json::to_writer_pretty(&mut *out, &findings.reports)
            .map_err(io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        print_text(&findings.reports, at, now, out)
    };
    match printed {
        // The reader has gone (`check ... | head`): the exit code still
        // says what the files hold.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        other => other?,
    }
    for error in &findings.errors {
        crate::telemetry::say(&error.to_string());
    }
    let expired = at.is_some() && findings.reports.iter().any(|r| r.expired);
    let empty = findings.reports.is_empty() && findings.errors.is_empty();
    if empty {
        crate::telemetry::say("no certificate found");
    }
    // Only a CA counts: a certificate that is no CA (its keyUsage lacks
    // keyCertSign, as OpenSSL reads it too) is refused as one by any
    // verifier, strict or not; its reasons are shown, not counted.
    let refused = findings
        .reports
        .iter()
        .filter(|r| r.is_ca && !r.strict.is_empty())
        .count();
    if strict && refused > 0 {
        crate::telemetry::say(&format!(
            "{refused} CA{} would be refused by a strict verifier (openssl verify -x509_strict, Python 3.13)",
            if refused == 1 { "" } else { "s" }
        ));
    }
    let strict_failed = strict && refused > 0;
    Ok(
        if findings.errors.is_empty() && !expired && !empty && !strict_failed {
            0
        } else {
            1
        },
    )
}

/// A certificate that expires within this many seconds is marked `!`: a
/// CA must be rotated before it drops out of the bundle.
pub const EXPIRES_SOON: i64 = 30 * 86_400;

/// The longest subject the table shows whole; the details show all of it.
const SUBJECT_WIDTH: usize = 60;

/// For people: every field of every certificate, then (last, so that it is
/// what stays on screen) a table with one row per certificate and notes on
/// what needs attention. Times in the table are relative to `--at`, or now.
fn print_text(
    reports: &[Report],
    at: Option<i64>,
    now: i64,
    out: &mut dyn Write,
) -> io::Result<()> {
    if reports.is_empty() {
        return Ok(());
    }
    let when = at.unwrap_or(now);
    for (i, r) in reports.iter().enumerate() {
        writeln!(out, "#{} {}", i + 1, escape_controls(&r.subject))?;
        writeln!(
            out,
            "  file:         {} (certificate {})",
            escape_controls(&r.path.display().to_string()),
            r.index
        )?;
        writeln!(out, "  issuer:       {}", escape_controls(&r.issuer))?;
        writeln!(out, "  serial:       {}", r.serial)?;
        writeln!(out, "  not before:   {}", r.not_before)?;
        let state = if r.expired { "  EXPIRED" } else { "" };
        writeln!(out, "  not after:    {}{state}", r.not_after)?;
        writeln!(out, "  sha256:       {}", r.sha256)?;
        writeln!(out, "  CA:           {}", yes_no(r.is_ca))?;
        if !r.strict.is_empty() {
            writeln!(out, "  strict:       REFUSED: {}", r.strict.join("; "))?;
        } else if r.is_ca {
            writeln!(out, "  strict:       ok")?;
        }
        writeln!(out, "  subject hash: {}", r.subject_hash)?;
        writeln!(out)?;
    }

    // A file holding several certificates shows which one each row is.
    let mut per_path: std::collections::HashMap<&Path, usize> = Default::default();
    for r in reports {
        *per_path.entry(r.path.as_path()).or_default() += 1;
    }
    let header = ["#", "SUBJECT", "EXPIRES", "CA", "STRICT", "HASH", "FILE"];
    let rows: Vec<[String; 7]> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let path = escape_controls(&r.path.display().to_string()).into_owned();
            let file = if per_path.get(r.path.as_path()).is_some_and(|&n| n > 1) {
                format!("{path} [{}]", r.index)
            } else {
                path
            };
            let strict = if !r.strict.is_empty() {
                "REFUSED"
            } else if r.is_ca {
                "ok"
            } else {
                "-"
            };
            let mut expires = expires_in(r, when);
            if expires_soon(r, when) {
                expires.push_str(" !");
            }
            [
                (i + 1).to_string(),
                shorten(&escape_controls(&r.subject), SUBJECT_WIDTH),
                expires,
                yes_no(r.is_ca).to_owned(),
                strict.to_owned(),
                r.subject_hash.clone(),
                file,
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| -> String {
        let last = cells.len() - 1;
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == 0 {
                // Numbers align right.
                line.push_str(&format!("{cell:>w$}", w = widths[0]));
            } else if i == last {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}", w = widths[i]));
            }
            if i != last {
                line.push_str("  ");
            }
        }
        line
    };
    writeln!(out, "{}", line(&header))?;
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        writeln!(out, "{}", line(&cells))?;
    }

    let numbered = |keep: &dyn Fn(&Report) -> bool| -> String {
        reports
            .iter()
            .enumerate()
            .filter(|(_, r)| keep(r))
            .map(|(i, _)| format!("#{}", i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let soon = numbered(&|r| expires_soon(r, when));
    let expired = numbered(&|r| r.expired);
    let pending = numbered(&|r| when < r.not_before_unix);
    let refused = numbered(&|r| r.is_ca && !r.strict.is_empty());
    if !soon.is_empty()
        || !expired.is_empty()
        || !pending.is_empty()
        || !refused.is_empty()
        || at.is_some()
    {
        writeln!(out)?;
    }
    if !soon.is_empty() {
        writeln!(
            out,
            "! expires within {} days: {soon} (anchorage drops an expired CA from the bundle: rotate it in time)",
            EXPIRES_SOON / 86_400
        )?;
    }
    if !expired.is_empty() {
        writeln!(out, "expired: {expired}")?;
    }
    if !pending.is_empty() {
        writeln!(out, "not valid yet: {pending}")?;
    }
    if !refused.is_empty() {
        writeln!(
            out,
            "REFUSED by a strict verifier (openssl verify -x509_strict, Python 3.13): {refused} (the reasons are in the details above)"
        )?;
    }
    if let Some(at) = at {
        writeln!(out, "times are relative to --at {}", rfc3339(at))?;
    }
    Ok(())
}

/// `text` with its control characters escaped, so a subject cannot move
/// the cursor, recolour the terminal or forge a line: `\n`, `\r`, `\t`,
/// other C0 controls and DEL as `\x1b`, C1 controls as `\u{9b}`: what
/// `openssl x509 -nameopt esc_ctrl` escapes, in C notation (OpenSSL writes
/// `\1B`).
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Writing into a String cannot fail.
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Not expired, and expiring within [`EXPIRES_SOON`].
fn expires_soon(r: &Report, when: i64) -> bool {
    !r.expired && r.not_after_unix.saturating_sub(when) <= EXPIRES_SOON
}

/// `in 42 days`, `EXPIRED 3 days ago`.
fn expires_in(r: &Report, when: i64) -> String {
    let span = span(r.not_after_unix.saturating_sub(when).unsigned_abs());
    if r.expired {
        format!("EXPIRED {span} ago")
    } else {
        format!("in {span}")
    }
}

/// A rough duration for people: the largest unit that gives at least 2.
fn span(seconds: u64) -> String {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    const YEAR: u64 = 365 * DAY;
    let (n, unit) = match seconds {
        s if s >= 2 * YEAR => (s / YEAR, "years"),
        s if s >= 2 * DAY => (s / DAY, "days"),
        s if s >= 2 * HOUR => (s / HOUR, "hours"),
        s if s >= 2 * MINUTE => (s / MINUTE, "minutes"),
        1 => (1, "second"),
        s => (s, "seconds"),
    };
    format!("{n} {unit}")
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(max - 1).collect();
    short.push('…');
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_like_people_say_them() {
        assert_eq!(span(0), "0 seconds");
        assert_eq!(span(1), "1 second");
        assert_eq!(span(119), "119 seconds");
        assert_eq!(span(120), "2 minutes");
        assert_eq!(span(3 * 3600 + 5), "3 hours");
        assert_eq!(span(42 * 86_400 + 7), "42 days");
        assert_eq!(span(800 * 86_400), "2 years");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("CN=plain"), "CN=plain");
        assert_eq!(
            escape_controls("CN=\u{1b}[31mred\nforged\r\t\u{7f}\u{9b}é"),
            "CN=\\x1b[31mred\\nforged\\r\\t\\x7f\\u{9b}é"
        );
    }

    #[test]
    fn long_subjects_are_shortened() {
        assert_eq!(shorten("CN=abc", 10), "CN=abc");
        assert_eq!(shorten("CN=abcdefghij", 6), "CN=ab…");
    }
}
