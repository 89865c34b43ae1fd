//! `retain_removed`: a CA that vanished from the sources stays in the bundle
//! for a grace period counted from its first disappearance, so every node
//! trusts old and new together while a rotation runs.
//!
//! What was seen and when it went is kept in `--state-dir` (written
//! atomically, one file per bundle) so a restart does not forget it; an
//! unreadable state file is reported and treated as empty, never fatal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::anchor::hex;
use super::{Anchor, Assembly, Bundle};
use crate::check::rfc3339;
use crate::source::CertBlock;

/// One CA the bundle has held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    /// The certificate, base64 DER.
    der: String,
    /// When it was first missing from the sources (unix seconds).
    missing_since: Option<i64>,
}

/// The retention state of one bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// By lowercase hex SHA-256.
    seen: BTreeMap<String, Seen>,
    /// The last bundle accepted: its fingerprints and when.
    #[serde(default)]
    last_good: Option<LastGood>,
    #[serde(skip)]
    file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LastGood {
    at: i64,
    sha256: Vec<String>,
}

impl Retention {
    /// Loads the state of `bundle` from `state_dir` (or starts empty, in memory).
    pub fn load(state_dir: Option<&Path>, bundle: &str) -> Self {
        let Some(dir) = state_dir else {
            return Self::default();
        };
        let file = dir.join(format!("{}.json", sanitize(bundle)));
        let mut state = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice::<Self>(&bytes).unwrap_or_else(|e| {
                warn!(file = %file.display(), error = %e, "state file is unreadable; starting with no retained CA");
                Self::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Err(e) => {
                warn!(file = %file.display(), error = %e, "state file is unreadable; starting with no retained CA");
                Self::default()
            }
        };
        state.file = Some(file);
        state
    }

    /// Adds the CAs that vanished less than `grace` ago to `assembly`, and
    /// forgets those whose grace is over. Returns whether the state changed.
    pub fn apply(
        &mut self,
        bundle_name: &str,
        assembly: &mut Assembly,
        grace: Duration,
        now: i64,
        allow_expired: bool,
    ) -> bool {
        let before = self.seen.clone();
        let present: std::collections::HashSet<String> = assembly
            .bundle
            .anchors()
            .iter()
            .map(Anchor::fingerprint)
            .collect();
        for anchor in assembly.bundle.anchors() {
            self.seen.insert(
                anchor.fingerprint(),
                Seen {
                    der: base64::engine::general_purpose::STANDARD.encode(&anchor.der),
                    missing_since: None,
                },
            );
        }
        let grace = grace.as_secs() as i64;
        let mut retained = Vec::new();
        self.seen.retain(|sha, seen| {
            if present.contains(sha) {
                return true;
            }
            let since = *seen.missing_since.get_or_insert(now);
            let anchor = base64::engine::general_purpose::STANDARD
                .decode(&seen.der)
                .ok()
                .and_then(|der| Anchor::parse(&CertBlock::new(der, false), Path::new("(retained)").into(), 0).ok());
            let Some(anchor) = anchor else { return false };
            if now >= since.saturating_add(grace) {
                info!(bundle = bundle_name, subject = %anchor.subject, sha256 = %sha,
                    "a removed CA's retention is over; it leaves the bundle");
                return false;
            }
            if anchor.expired_at(now) && !allow_expired {
                return false;
            }
            info!(bundle = bundle_name, subject = %anchor.subject, sha256 = %sha,
                until = %rfc3339(since.saturating_add(grace)), "retaining a CA removed from the sources");
            retained.push(anchor);
            true
        });
        if !retained.is_empty() {
            let mut anchors = assembly.bundle.anchors().to_vec();
            anchors.extend(retained);
            assembly.bundle = Bundle::new(anchors);
        }
        self.seen != before
    }

    /// The next instant a retained CA leaves.
    pub fn next_change(&self, grace: Duration) -> Option<i64> {
        self.seen
            .values()
            .filter_map(|s| s.missing_since)
            .map(|since| since.saturating_add(grace.as_secs() as i64))
            .min()
    }

    /// The same state, not tied to its file: what it records is never
    /// saved (a dry run writes nothing).
    pub fn detached(&self) -> Self {
        Self {
            file: None,
            ..self.clone()
        }
    }

    /// Records the bundle accepted and saves the state, if it has a file
    /// (without one, the record would only take memory: nothing reads it).
    pub fn accepted(&mut self, bundle: &Bundle, now: i64, changed: bool) {
        if self.file.is_none() {
            return;
        }
        let sha256: Vec<String> = bundle.anchors().iter().map(|a| hex(&a.sha256)).collect();
        let same = self.last_good.as_ref().is_some_and(|l| l.sha256 == sha256);
        if same && !changed {
            return;
        }
        self.last_good = Some(LastGood { at: now, sha256 });
        self.save();
    }

    fn save(&self) {
        let Some(file) = &self.file else { return };
        let bytes = match serde_json::to_vec_pretty(self) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(file = %file.display(), error = %e, "cannot encode the state");
                return;
            }
        };
        if let Err(e) = crate::output::atomic::write_file(file, &bytes, 0o600) {
            warn!(file = %file.display(), error = %e, "cannot save the state; retention is kept in memory");
        }
    }
}

/// A bundle name as a file name, one name to one file: letters, digits,
/// `-`, `_` and `.` stay, any other byte is `%XX` (a `/` cannot reach a
/// path, and `a/b` and `a_b` keep their own retained CAs).
fn sanitize(name: &str) -> String {
    use std::fmt::Write as _;
    let mut file = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.') {
            file.push(char::from(byte));
        } else {
            let _ = write!(file, "%{byte:02X}");
        }
    }
    file
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_bundle_name_has_a_state_file_of_its_own() {
        use super::sanitize;
        assert_eq!(sanitize("peers"), "peers");
        assert_eq!(sanitize("nats.peers-2_a"), "nats.peers-2_a");
        // Nothing reaches out of the state directory.
        assert_eq!(sanitize("../x"), "..%2Fx");
        let names = ["a/b", "a_b", "a%2Fb", "a b", "a\u{e9}", "a\u{e8}"];
        let files: std::collections::HashSet<String> = names.iter().map(|n| sanitize(n)).collect();
        assert_eq!(files.len(), names.len(), "{files:?}");
        assert!(files.iter().all(|f| !f.contains('/')));
    }
}
