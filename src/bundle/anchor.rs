//! One parsed certificate: what the policy, the outputs, `check` and the logs
//! need to know about it, computed once.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use x509_parser::prelude::{FromDer, X509Certificate, X509Version};

use super::strict::{self, Reason};
use super::subject_hash::subject_hash;
use crate::source::CertBlock;

/// A certificate read from a source, with the facts derived from it and
/// where it was found. The facts are shared: a render that finds the same
/// bytes again takes them without parsing or copying them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    facts: Arc<Facts>,
    /// Where it was found, for logs and `check` (the path its file's
    /// certificates share).
    pub origin: Arc<Path>,
    /// Its 0-based place among the certificates of that file.
    pub index: usize,
}

impl std::ops::Deref for Anchor {
    type Target = Facts;

    fn deref(&self) -> &Facts {
        &self.facts
    }
}

/// What a certificate is, parsed once.
#[derive(Debug, PartialEq, Eq)]
pub struct Facts {
    /// The certificate's DER (for `TRUSTED CERTIFICATE`, without the aux
    /// data): a plain block's own bytes, not a copy.
    pub der: Arc<[u8]>,
    pub sha256: [u8; 32],
    /// RFC 4514-style, as x509-parser renders it. (The issuer and serial,
    /// which only `check` prints, are read from `der` when asked for.)
    pub subject: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds; the certificate is expired from `not_after + 1`.
    pub not_after: i64,
    /// CA by OpenSSL's rules (see [`is_ca`]).
    pub is_ca: bool,
    /// Why a strict verifier would refuse it as a CA; empty when it would not.
    pub strict: Vec<Reason>,
    /// Where the subject Name lies in `der`: its OpenSSL hash is taken
    /// when first asked for (a hashed directory, `check`), not for every
    /// certificate of every render.
    subject_at: std::ops::Range<usize>,
    subject_hash: LazyHash,
}

/// A value worked out from the DER on first use and kept. Equal whatever
/// it holds: it follows from `der`, which `Facts` compares.
#[derive(Debug, Default)]
struct LazyHash(std::sync::OnceLock<u32>);

impl PartialEq for LazyHash {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for LazyHash {}

impl Facts {
    /// OpenSSL's subject-name hash (`openssl x509 -hash`), the `<hash>` of
    /// a hashed directory's names.
    pub fn subject_hash(&self) -> u32 {
        *self
            .subject_hash
            .0
            .get_or_init(|| subject_hash(&self.der[self.subject_at.clone()]))
    }
}

/// Why a certificate block is not a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub path: PathBuf,
    pub index: usize,
    pub reason: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: certificate {} is not a valid X.509 certificate: {}",
            self.path.display(),
            self.index,
            self.reason
        )
    }
}

impl std::error::Error for ParseError {}

impl Anchor {
    /// Parses one framed block found at `origin`, place `index`.
    pub fn parse(block: &CertBlock, origin: Arc<Path>, index: usize) -> Result<Self, ParseError> {
        let fail = |reason: String| ParseError {
            path: origin.to_path_buf(),
            index,
            reason,
        };
        let (rest, cert) =
            X509Certificate::from_der(&block.der).map_err(|e| fail(e.to_string()))?;
        let der = if block.trusted {
            // X509_AUX: the certificate, then OpenSSL's trust settings.
            block.der[..block.der.len() - rest.len()].into()
        } else if rest.is_empty() {
            block.der.clone()
        } else {
            return Err(fail(format!("{} bytes after the certificate", rest.len())));
        };
        // A plain block's hash was taken when its file was read.
        let sha256 = match block.sha256 {
            Some(sha) if !block.trusted => sha,
            _ => sha256(&der),
        };
        let is_ca = is_ca(&cert).map_err(fail)?;
        let strict = strict::reasons(&cert, is_ca);
        // The parsed subject borrows from the block's bytes, which start
        // with `der`'s; were it ever elsewhere, the hash is taken now.
        let raw = cert.subject().as_raw();
        let start = (raw.as_ptr() as usize).wrapping_sub(block.der.as_ptr() as usize);
        let mut subject_at = start..start.wrapping_add(raw.len());
        let lazy = LazyHash::default();
        if der.get(subject_at.clone()) != Some(raw) {
            debug_assert!(false, "the subject is not within the DER");
            let _ = lazy.0.set(subject_hash(raw));
            subject_at = 0..0;
        }
        let facts = Facts {
            sha256,
            subject: cert.subject().to_string(),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            is_ca,
            strict,
            subject_at,
            subject_hash: lazy,
            der,
        };
        Ok(Self {
            facts: Arc::new(facts),
            origin,
            index,
        })
    }

    /// The same certificate, found at `origin`, place `index`.
    pub fn found_at(&self, origin: Arc<Path>, index: usize) -> Self {
        Self {
            facts: self.facts.clone(),
            origin,
            index,
        }
    }

    /// The issuer, RFC 4514-style as x509-parser renders it, and the
    /// serial: big-endian magnitude, lowercase hex, as `openssl x509
    /// -serial` prints it (lowercased). Read from the DER again (it parsed
    /// once, it parses the same): only `check` prints them.
    pub fn issuer_and_serial(&self) -> (String, String) {
        X509Certificate::from_der(&self.der).map_or_else(
            |_| (String::new(), String::new()),
            |(_, cert)| (cert.issuer().to_string(), serial_hex(cert.raw_serial())),
        )
    }

    /// Lowercase hex SHA-256 of the DER, no colons.
    pub fn fingerprint(&self) -> String {
        hex(&self.sha256)
    }

    /// Expired at `now` (unix seconds): from the first second after `notAfter`.
    pub fn expired_at(&self, now: i64) -> bool {
        now > self.not_after
    }

    /// Not valid yet at `now`.
    pub fn pending_at(&self, now: i64) -> bool {
        now < self.not_before
    }
}

/// Whether a certificate is a CA, as OpenSSL's `check_ca` decides: a key
/// usage without keyCertSign says no; basicConstraints decides when present;
/// else a v1 certificate whose issuer is its subject is a root, and a key
/// usage with keyCertSign is tolerated.
fn is_ca(cert: &X509Certificate<'_>) -> Result<bool, String> {
    let key_usage = cert.key_usage().map_err(|e| format!("keyUsage: {e}"))?;
    if let Some(ku) = &key_usage
        && !ku.value.key_cert_sign()
    {
        return Ok(false);
    }
    let constraints = cert
        .basic_constraints()
        .map_err(|e| format!("basicConstraints: {e}"))?;
    if let Some(bc) = constraints {
        return Ok(bc.value.ca);
    }
    if cert.version() == X509Version::V1 && cert.issuer().as_raw() == cert.subject().as_raw() {
        return Ok(true);
    }
    Ok(key_usage.is_some())
}

fn serial_hex(raw: &[u8]) -> String {
    // DER pads a positive serial with a leading zero byte; OpenSSL does not print it.
    let trimmed = match raw {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => raw,
    };
    hex(trimmed)
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    // A fingerprint per CA per render: no formatting machinery per byte.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    fn ca(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example  Org");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
    }

    /// The hash taken on demand is the one of the subject Name, for a root,
    /// an intermediate (issuer and subject differ) and a `TRUSTED
    /// CERTIFICATE` block (the certificate followed by aux data).
    #[test]
    fn subject_hash_is_taken_from_the_subject_when_asked() {
        let root_key = KeyPair::generate().expect("key");
        let root_params = ca("Root CA");
        let root = root_params.self_signed(&root_key).expect("root");
        let issuer = Issuer::new(root_params, root_key);
        let sub_key = KeyPair::generate().expect("key");
        let sub = ca("Sub CA").signed_by(&sub_key, &issuer).expect("sub");
        for der in [root.der().to_vec(), sub.der().to_vec()] {
            let (_, cert) = X509Certificate::from_der(&der).expect("parse");
            let want = subject_hash(cert.subject().as_raw());
            assert_ne!(want, 0);
            let mut with_aux = der.clone();
            with_aux.extend_from_slice(&[0x30, 0x03, 0x06, 0x01, 0x00]);
            for block in [
                CertBlock::new(der.clone(), false),
                CertBlock::new(with_aux, true),
            ] {
                let anchor = Anchor::parse(&block, Path::new("ca.pem").into(), 0).expect("parse");
                assert_eq!(anchor.subject_hash(), want, "{}", anchor.subject);
                assert_eq!(anchor.subject_hash(), want, "asked twice");
            }
        }
        let (_, sub_cert) = X509Certificate::from_der(sub.der()).expect("parse");
        assert_ne!(
            subject_hash(sub_cert.subject().as_raw()),
            subject_hash(sub_cert.issuer().as_raw())
        );
    }
}
