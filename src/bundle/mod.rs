//! Certificates: parse the blocks the sources found, apply the trust policy
//! (CAs only, expiry, minimum count), dedupe and order them.
//!
//! The result is a [`Bundle`] (a deterministic set: the same certificates
//! always give the same order, whatever the files) or a [`Refusal`] that names
//! the file and the reason. This module never touches the filesystem; "now"
//! is always passed in, so expiry is testable without sleeping.

mod anchor;
pub mod retain;
pub mod strict;
pub mod subject_hash;
pub mod verify;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

pub(crate) use anchor::hex;
pub use anchor::{Anchor, ParseError, sha256};
pub use verify::VerifyError;

use crate::source::{CertBlock, SourceError, SourceFile};

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
        // Kept as long as it is the last bundle: no room to spare.
        anchors.shrink_to_fit();
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

    /// The same certificates as `other`, in the same order: every output
    /// renders both to the same bytes.
    pub fn same_certificates(&self, other: &Bundle) -> bool {
        self.len() == other.len()
            && self
                .anchors
                .iter()
                .zip(&other.anchors)
                .all(|(a, b)| a.sha256 == b.sha256)
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
        /// The configured sources that held no file at all (a mistyped
        /// path, a dangling link, an empty directory), as written: the
        /// likeliest reason, named.
        empty: Vec<String>,
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
            Self::TooFew { found, min, empty } => {
                write!(
                    f,
                    "{found} usable certificate(s), fewer than min_certs = {min}"
                )?;
                if !empty.is_empty() {
                    write!(f, "; no file at {}", empty.join(", "))?;
                }
                Ok(())
            }
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
            empty: Vec::new(),
        });
    }
    Ok(())
}

/// Hashes SHA-256 digests for a map or set keyed by them: the digest is
/// already uniform, so folding its words is enough. SipHash over the
/// thousand keys a render of a thousand sources looks up and inserts was
/// a twentieth of a swap's CPU.
#[derive(Debug, Default, Clone, Copy)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(23) ^ u64::from_le_bytes(word);
        }
    }
}

/// A set of SHA-256 digests.
pub type DigestSet = HashSet<[u8; 32], BuildHasherDefault<DigestHasher>>;
/// A map keyed by SHA-256 digests.
pub type DigestMap<V> = HashMap<[u8; 32], V, BuildHasherDefault<DigestHasher>>;

/// Certificates already parsed, by the SHA-256 of their block: a render
/// that reads the same bytes again does not parse them again.
///
/// Sorted by digest and searched by halves: kept by every bundle between
/// renders, a hash table holds room for four certificates where most
/// bundles have one (276 bytes instead of 64).
#[derive(Debug, Default)]
pub struct ParseCache(Box<[([u8; 32], Anchor)]>);

impl ParseCache {
    fn get(&self, key: &[u8; 32]) -> Option<&Anchor> {
        let at = self.0.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
        Some(&self.0[at].1)
    }

    /// The cache of `parsed`, whose digests are distinct.
    fn of(mut parsed: Vec<([u8; 32], Anchor)>) -> Self {
        parsed.sort_unstable_by_key(|(key, _)| *key);
        Self(parsed.into_boxed_slice())
    }
}

/// [`assemble`] without the `min_certs` check, for callers that add
/// retained CAs first.
pub fn collect(files: &[SourceFile], policy: &Policy, now: i64) -> Result<Assembly, Refusal> {
    collect_cached(files, policy, now, None)
}

// Each block's parse is kept under the SHA-256 its read took
// (`CertBlock::sha256`), so a render of a thousand sources of which one
// changed hashes and parses one block, and shares the others' facts.

/// [`collect`], taking what `cache` already parsed and leaving in it what
/// this read holds.
pub fn collect_cached<'a>(
    files: impl IntoIterator<Item = &'a SourceFile>,
    policy: &Policy,
    now: i64,
    mut cache: Option<&mut ParseCache>,
) -> Result<Assembly, Refusal> {
    /// A block in file order: parsed before, or to parse now.
    enum Slot<'a> {
        Known([u8; 32], Anchor),
        Parse(Option<[u8; 32]>, &'a SourceFile, usize, &'a CertBlock),
    }
    let known = cache.as_ref().map_or(0, |c| c.0.len());
    let mut seen = DigestSet::with_capacity_and_hasher(known, Default::default());
    let mut assembly = Assembly::default();
    // Identical bytes parse identically: copies are skipped before parsing.
    // A trusted block carries aux data, so its key is the parsed DER.
    let mut slots = Vec::with_capacity(known);
    for file in files {
        for (index, block) in file.blocks.iter().enumerate() {
            let key = if block.trusted {
                None
            } else {
                Some(block.sha256.unwrap_or_else(|| anchor::sha256(&block.der)))
            };
            if let Some(key) = key {
                if !seen.insert(key) {
                    assembly.duplicates += 1;
                    continue;
                }
                if let Some(known) = cache.as_ref().and_then(|c| c.get(&key)) {
                    slots.push(Slot::Known(key, known.found_at(file.path.clone(), index)));
                    continue;
                }
            }
            slots.push(Slot::Parse(key, file, index, block));
        }
    }
    let todo: Vec<_> = slots
        .iter()
        .filter_map(|slot| match slot {
            Slot::Parse(_, file, index, block) => Some((*file, *index, *block)),
            Slot::Known(..) => None,
        })
        .collect();
    let mut parsed = crate::parallel::map(&todo, |(file, index, block)| {
        Anchor::parse(block, file.path.clone(), *index)
    })
    .into_iter();
    let mut kept = Vec::new();
    let mut next = Vec::with_capacity(if cache.is_some() { slots.len() } else { 0 });
    // In file order, so the first damaged block is the one reported.
    for slot in slots {
        let (key, anchor, trusted) = match slot {
            Slot::Known(key, anchor) => (Some(key), anchor, false),
            Slot::Parse(key, _, _, block) => {
                // One result per slot to parse, in the same order.
                let Some(result) = parsed.next() else { break };
                (key, result.map_err(Refusal::Parse)?, block.trusted)
            }
        };
        if trusted && !seen.insert(anchor.sha256) {
            assembly.duplicates += 1;
            continue;
        }
        if let Some(key) = key
            && cache.is_some()
        {
            next.push((key, anchor.clone()));
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
    if let Some(cache) = cache.as_mut() {
        **cache = ParseCache::of(next);
    }
    assembly.bundle = Bundle::new(kept);
    Ok(assembly)
}

/// Lowercase hex SHA-256 of DER, as logs and metrics show certificates.
pub fn fingerprint(der: &[u8]) -> String {
    anchor::hex(&sha256(der))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn digests_hash_apart_by_every_word() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<DigestHasher>::default();
        let digests: Vec<[u8; 32]> = (0..1000u32).map(|i| sha256(&i.to_le_bytes())).collect();
        let hashes: HashSet<u64> = digests.iter().map(|d| build.hash_one(d)).collect();
        assert_eq!(hashes.len(), digests.len());
        // Digests that differ only in their last word still hash apart.
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        a[31] = 1;
        b[31] = 2;
        assert_ne!(build.hash_one(a), build.hash_one(b));
        let map: DigestMap<usize> = digests.iter().copied().zip(0..).collect();
        assert!(digests.iter().zip(0..).all(|(d, i)| map.get(d) == Some(&i)));
    }

    /// A self-signed CA named `name`, as a source's block.
    pub(crate) fn ca_block(name: &str) -> CertBlock {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        CertBlock::new(
            params.self_signed(&key).expect("cert").der().to_vec(),
            false,
        )
    }

    fn file(path: &str, blocks: Vec<CertBlock>) -> SourceFile {
        SourceFile {
            path: std::path::Path::new(path).into(),
            blocks,
            link: None,
        }
    }

    #[test]
    fn cached_parses_give_the_same_bundle_with_current_origins() {
        let (a, b) = (ca_block("A"), ca_block("B"));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut cache = ParseCache::default();
        let first = vec![
            file("/x/a.pem", vec![a.clone()]),
            file("/x/b.pem", vec![b.clone()]),
        ];
        let fresh =
            collect_cached(&first, &Policy::default(), now, Some(&mut cache)).expect("valid");
        assert_eq!(cache.0.len(), 2);
        // The same certificates under other names: taken from the cache.
        let second = vec![file("/y/both.pem", vec![b, a])];
        let cached =
            collect_cached(&second, &Policy::default(), now, Some(&mut cache)).expect("valid");
        let shas = |x: &Assembly| {
            x.bundle
                .anchors()
                .iter()
                .map(|a| a.sha256)
                .collect::<Vec<_>>()
        };
        assert_eq!(shas(&fresh), shas(&cached));
        assert!(
            cached
                .bundle
                .anchors()
                .iter()
                .all(|a| *a.origin == *std::path::Path::new("/y/both.pem"))
        );
        let indexes: Vec<usize> = cached.bundle.anchors().iter().map(|a| a.index).collect();
        assert!(indexes.contains(&0) && indexes.contains(&1));
    }

    /// The cache finds every certificate it was given, in whatever order
    /// they came, and nothing else.
    #[test]
    fn the_cache_finds_what_it_holds() {
        let blocks: Vec<CertBlock> = (0..9).map(|i| ca_block(&format!("CA {i}"))).collect();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut cache = ParseCache::default();
        let files: Vec<SourceFile> = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| file(&format!("/x/{i}.pem"), vec![b.clone()]))
            .collect();
        collect_cached(&files, &Policy::default(), now, Some(&mut cache)).expect("valid");
        for block in &blocks {
            let key = block.sha256.expect("a plain block's digest");
            let found = cache.get(&key).expect("cached");
            assert_eq!(found.sha256, anchor::sha256(&block.der));
        }
        assert!(cache.get(&[0; 32]).is_none());
        assert!(cache.get(&[0xff; 32]).is_none());
    }

    #[test]
    fn a_damaged_block_is_refused_even_beside_cached_ones() {
        let a = ca_block("A");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut cache = ParseCache::default();
        collect_cached(
            &[file("/x/a.pem", vec![a.clone()])],
            &Policy::default(),
            now,
            Some(&mut cache),
        )
        .expect("valid");
        let junk = CertBlock::new(vec![0x30, 0x03, 1, 2, 3], false);
        let err = collect_cached(
            &[file("/x/a.pem", vec![a, junk])],
            &Policy::default(),
            now,
            Some(&mut cache),
        );
        assert!(matches!(
            err,
            Err(Refusal::Parse(ParseError { index: 1, .. }))
        ));
    }
}
