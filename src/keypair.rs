//! Key pairs: a server's own certificate and key (rotated by cert-manager or
//! ACME), watched like sources, never rendered, only checked. A pair is
//! accepted when the key matches the certificate (RSA, ECDSA, Ed25519: the
//! public keys compared as SubjectPublicKeyInfo), the certificate is within
//! its validity window and, with `chain_to`, chains to that bundle. A pair
//! caught half-written is held until it is consistent; one not valid yet is
//! held until its `notBefore`.
//!
//! The key's bytes are read into memory to check them and never logged,
//! copied or kept: only their SHA-256 is.

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::sign::CertifiedKey;

use crate::bundle::{self, Anchor, Bundle, verify};
use crate::config::KeyPairConfig;
use crate::source;

/// A pair that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub cert_sha256: [u8; 32],
    pub key_sha256: [u8; 32],
    /// The leaf's DER: what a probe must see served.
    pub leaf: Vec<u8>,
    pub subject: String,
    pub not_after: i64,
}

/// Why a pair is not accepted (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Not valid before this instant (unix seconds): check again then.
    Until(i64, String),
    /// Until the files change.
    Invalid(String),
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Until(_, reason) | Self::Invalid(reason) => f.write_str(reason),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Held> {
    match source::read_bounded(path, path) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(Held::Invalid(format!("{}: does not exist", path.display()))),
        Err(e) => Err(Held::Invalid(e.to_string())),
    }
}

/// Checks the pair on disk at `now`; `chain_to` is the bundle it must chain
/// to, when the config names one.
pub fn inspect(
    config: &KeyPairConfig,
    chain_to: Option<&Bundle>,
    now: i64,
) -> Result<Accepted, Held> {
    let cert_bytes = read(&config.cert)?;
    let key_bytes = read(&config.key)?;
    let blocks = source::decode(&cert_bytes).map_err(|kind| {
        Held::Invalid(
            source::SourceError {
                path: config.cert.clone(),
                kind,
            }
            .to_string(),
        )
    })?;
    let Some(first) = blocks.first() else {
        return Err(Held::Invalid(format!(
            "{}: holds no certificate",
            config.cert.display()
        )));
    };
    let leaf =
        Anchor::parse(first, config.cert.clone(), 0).map_err(|e| Held::Invalid(e.to_string()))?;
    // Never quote the key: the error names the file only.
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|_| {
        Held::Invalid(format!(
            "{}: holds no usable private key",
            config.key.display()
        ))
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        Held::Invalid(format!(
            "{}: unsupported private key: {e}",
            config.key.display()
        ))
    })?;
    let chain: Vec<CertificateDer<'static>> = blocks
        .iter()
        .map(|b| CertificateDer::from(b.der.clone()))
        .collect();
    CertifiedKey::new(chain, signing).keys_match().map_err(|_| {
        Held::Invalid(format!(
            "{} does not match the certificate {} ({}): a pair caught half-written is held until it is consistent",
            config.key.display(),
            config.cert.display(),
            leaf.subject
        ))
    })?;
    if leaf.pending_at(now) {
        return Err(Held::Until(
            leaf.not_before,
            format!(
                "{}: {} is not valid before {}",
                config.cert.display(),
                leaf.subject,
                crate::check::rfc3339(leaf.not_before)
            ),
        ));
    }
    if leaf.expired_at(now) {
        return Err(Held::Invalid(format!(
            "{}: {} expired at {}",
            config.cert.display(),
            leaf.subject,
            crate::check::rfc3339(leaf.not_after)
        )));
    }
    if let Some(bundle) = chain_to {
        let chain = verify::Chain {
            path: config.cert.clone(),
            certs: blocks.iter().map(|b| b.der.clone()).collect(),
        };
        verify::check(&chain, bundle, now).map_err(|e| Held::Invalid(e.to_string()))?;
    }
    Ok(Accepted {
        cert_sha256: bundle::sha256(&cert_bytes),
        key_sha256: bundle::sha256(&key_bytes),
        subject: leaf.subject.clone(),
        not_after: leaf.not_after,
        leaf: leaf.der.clone(),
    })
}

/// The state the daemon keeps per pair.
#[derive(Debug, Clone)]
pub struct KeyPairState {
    pub config: KeyPairConfig,
    pub accepted: Option<Accepted>,
    /// Checked once: the first acceptance after that is a change.
    pub initialized: bool,
    pub held: Option<String>,
    /// When to check again with no file event (a notBefore, an expiry).
    pub next_change: Option<i64>,
}

/// What one check of a pair concluded.
#[derive(Debug)]
pub enum Outcome {
    /// Same bytes as the pair last accepted (or held, still held).
    Unchanged,
    /// A new pair, accepted: reload (unless this is the first check).
    Changed { first: bool },
    /// Held back; the reason is logged.
    Held(String),
}

impl KeyPairState {
    pub fn new(config: KeyPairConfig) -> Self {
        Self {
            config,
            accepted: None,
            initialized: false,
            held: None,
            next_change: None,
        }
    }

    /// Checks the pair and records the result.
    pub fn check(&mut self, chain_to: Option<&Bundle>, now: i64) -> Outcome {
        let first = !self.initialized;
        self.initialized = true;
        match inspect(&self.config, chain_to, now) {
            Ok(accepted) => {
                self.held = None;
                self.next_change = Some(accepted.not_after.saturating_add(1));
                let same = self.accepted.as_ref().is_some_and(|a| {
                    a.cert_sha256 == accepted.cert_sha256 && a.key_sha256 == accepted.key_sha256
                });
                if same {
                    return Outcome::Unchanged;
                }
                self.accepted = Some(accepted);
                Outcome::Changed { first }
            }
            Err(held) => {
                self.next_change = match &held {
                    Held::Until(at, _) => Some(*at),
                    Held::Invalid(_) => None,
                };
                let reason = held.to_string();
                if self.held.as_deref() == Some(&reason) {
                    return Outcome::Unchanged;
                }
                self.held = Some(reason.clone());
                Outcome::Held(reason)
            }
        }
    }
}

/// For log lines: the pair's certificate.
pub fn describe(accepted: &Accepted) -> String {
    format!(
        "{} ({})",
        accepted.subject,
        bundle::fingerprint(&accepted.leaf)
    )
}
