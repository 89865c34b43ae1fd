//! Certificates: parse the blocks the sources found, apply the trust policy
//! (CAs only, expiry, minimum count), dedupe and order them.
//!
//! The result is a [`Bundle`] (a deterministic set: the same certificates
//! always give the same order, whatever the files) or a [`Refusal`] that names
//! the file and the reason. This module never touches the filesystem; "now"
//! is always passed in, so expiry is testable without sleeping.

mod anchor;
pub mod retain;
pub mod subject_hash;
pub mod verify;

use std::collections::HashSet;

pub use anchor::{Anchor, ParseError};
pub use verify::VerifyError;

use crate::source::{SourceError, SourceFile};

/// What a bundle keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub allow_expired: bool,
    pub allow_non_ca: bool,
    pub min_certs: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_expired: false,
            allow_non_ca: false,
            min_certs: 1,
        }
    }
}

/// A validated, deduplicated, ordered set of trust anchors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    anchors: Vec<Anchor>,
}

impl Bundle {
    /// Orders by SHA-256: a total order that depends only on the certificates.
    pub fn new(mut anchors: Vec<Anchor>) -> Self {
        anchors.sort_by_key(|a| a.sha256);
        anchors.dedup_by(|a, b| a.sha256 == b.sha256);
        Self { anchors }
    }

    pub fn anchors(&self) -> &[Anchor] {
        &self.anchors
    }

    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    /// The earliest `not_after` of the bundle: the moment it must be
    /// rendered again without that CA (guarantee 7).
    pub fn earliest_expiry(&self) -> Option<i64> {
        self.anchors.iter().map(|a| a.not_after).min()
    }
}

/// A certificate left out of a bundle, and why; logged, not refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dropped {
    Expired(Anchor),
    NotCa(Anchor),
}

/// A bundle and what the policy noticed on the way.
#[derive(Debug, Clone, Default)]
pub struct Assembly {
    pub bundle: Bundle,
    pub dropped: Vec<Dropped>,
    /// CAs kept although not valid yet (a rotation's new CA issued early).
    pub pending: Vec<Anchor>,
    /// Copies of a certificate already seen.
    pub duplicates: usize,
}

impl Assembly {
    /// The next instant at which this assembly changes by itself: a CA in the
    /// bundle expires, or a dropped/pending one becomes valid.
    pub fn next_change(&self, allow_expired: bool) -> Option<i64> {
        let expiry = if allow_expired {
            None
        } else {
            self.bundle.earliest_expiry().map(|t| t.saturating_add(1))
        };
        let valid = self.pending.iter().map(|a| a.not_before).min();
        expiry.into_iter().chain(valid).min()
    }
}

/// Why a bundle was refused; its outputs keep their previous content.
#[derive(Debug)]
pub enum Refusal {
    Source(SourceError),
    Parse(ParseError),
    TooFew {
        found: usize,
        min: usize,
    },
    /// A `verify` certificate would no longer chain.
    Verify(VerifyError),
}

impl Refusal {
    /// A short stable label, used as the metrics `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Source(e) => e.reason(),
            Self::Parse(_) => "damaged",
            Self::TooFew { .. } => "min_certs",
            Self::Verify(_) => "verify",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Source(e) => e.fmt(f),
            Self::Parse(e) => e.fmt(f),
            Self::TooFew { found, min } => write!(
                f,
                "{found} usable certificate(s), fewer than min_certs = {min}"
            ),
            Self::Verify(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Refusal {}

impl From<SourceError> for Refusal {
    fn from(e: SourceError) -> Self {
        Self::Source(e)
    }
}

/// Parses every block of `files` and applies `policy` at `now` (unix
/// seconds), `min_certs` included.
///
/// Any block that is not a certificate refuses the whole bundle: a
/// half-copied file must never shrink the trust set silently.
pub fn assemble(files: &[SourceFile], policy: &Policy, now: i64) -> Result<Assembly, Refusal> {
    let assembly = collect(files, policy, now)?;
    check_min(&assembly, policy)?;
    Ok(assembly)
}

/// Refuses a bundle with fewer than `min_certs` certificates.
pub fn check_min(assembly: &Assembly, policy: &Policy) -> Result<(), Refusal> {
    if assembly.bundle.len() < policy.min_certs {
        return Err(Refusal::TooFew {
            found: assembly.bundle.len(),
            min: policy.min_certs,
        });
    }
    Ok(())
}

/// [`assemble`] without the `min_certs` check, for callers that add
/// retained CAs first.
pub fn collect(files: &[SourceFile], policy: &Policy, now: i64) -> Result<Assembly, Refusal> {
    let mut seen: HashSet<[u8; 32]> = HashSet::new();
    let mut assembly = Assembly::default();
    // Identical bytes parse identically: copies are skipped before parsing.
    // A trusted block carries aux data, so its key is the parsed DER.
    let mut todo = Vec::new();
    for file in files {
        for (index, block) in file.blocks.iter().enumerate() {
            if !block.trusted && !seen.insert(anchor::sha256(&block.der)) {
                assembly.duplicates += 1;
                continue;
            }
            todo.push((file, index, block));
        }
    }
    let parsed = crate::parallel::map(&todo, |(file, index, block)| {
        Anchor::parse(block, file.path.clone(), *index)
    });
    let mut kept = Vec::new();
    // In file order, so the first damaged block is the one reported.
    for (anchor, (_, _, block)) in parsed.into_iter().zip(&todo) {
        let anchor = anchor.map_err(Refusal::Parse)?;
        if block.trusted && !seen.insert(anchor.sha256) {
            assembly.duplicates += 1;
            continue;
        }
        if !anchor.is_ca && !policy.allow_non_ca {
            assembly.dropped.push(Dropped::NotCa(anchor));
        } else if anchor.expired_at(now) && !policy.allow_expired {
            assembly.dropped.push(Dropped::Expired(anchor));
        } else {
            if anchor.pending_at(now) {
                assembly.pending.push(anchor.clone());
            }
            kept.push(anchor);
        }
    }
    assembly.bundle = Bundle::new(kept);
    Ok(assembly)
}

/// Lowercase hex SHA-256 of DER, as logs and metrics show certificates.
pub fn fingerprint(der: &[u8]) -> String {
    anchor::hex(&anchor::sha256(der))
}
