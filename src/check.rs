//! `anchorage check`: what is in these files, for people and for scripts.
//!
//! It reports every certificate it can read and every file it cannot, and
//! never applies the bundle policy: an expired or non-CA certificate is
//! shown, flagged, not dropped.

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
        if fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            inspect_file(&path, &dir.join(&name), false, at, findings);
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
        match Anchor::parse(block, shown.to_path_buf(), index) {
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
    Report {
        path: anchor.origin.clone(),
        index: anchor.index,
        subject: anchor.subject.clone(),
        issuer: anchor.issuer.clone(),
        serial: anchor.serial.clone(),
        not_before: rfc3339(anchor.not_before),
        not_after: rfc3339(anchor.not_after),
        sha256: anchor.fingerprint(),
        is_ca: anchor.is_ca,
        subject_hash: hash_hex(anchor.subject_hash),
        expired: anchor.expired_at(at),
    }
}

/// Runs `check`: prints the findings and returns the exit code.
pub fn run(
    paths: &[PathBuf],
    json: bool,
    at: Option<i64>,
    now: i64,
    out: &mut dyn Write,
) -> io::Result<i32> {
    let findings = inspect(paths, at.unwrap_or(now));
    if json {
        serde_json::to_writer_pretty(&mut *out, &findings.reports).map_err(io::Error::other)?;
        writeln!(out)?;
    } else {
        print_text(&findings.reports, out)?;
    }
    for error in &findings.errors {
        eprintln!("anchorage: {error}");
    }
    let expired = at.is_some() && findings.reports.iter().any(|r| r.expired);
    let empty = findings.reports.is_empty() && findings.errors.is_empty();
    if empty {
        eprintln!("anchorage: no certificate found");
    }
    Ok(if findings.errors.is_empty() && !expired && !empty {
        0
    } else {
        1
    })
}

fn print_text(reports: &[Report], out: &mut dyn Write) -> io::Result<()> {
    for (i, r) in reports.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        let state = if r.expired { "  EXPIRED" } else { "" };
        writeln!(out, "{} [{}]{state}", r.path.display(), r.index)?;
        writeln!(out, "  subject:      {}", r.subject)?;
        writeln!(out, "  issuer:       {}", r.issuer)?;
        writeln!(out, "  serial:       {}", r.serial)?;
        writeln!(out, "  not before:   {}", r.not_before)?;
        writeln!(out, "  not after:    {}", r.not_after)?;
        writeln!(out, "  sha256:       {}", r.sha256)?;
        writeln!(
            out,
            "  CA:           {}",
            if r.is_ca { "yes" } else { "no" }
        )?;
        writeln!(out, "  subject hash: {}", r.subject_hash)?;
    }
    Ok(())
}
