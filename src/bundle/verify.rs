//! `verify`: before a bundle replaces the old one, every certificate the
//! config names must still chain to a CA in it (rustls-webpki path building,
//! at the current time). This is the check that keeps one side of a
//! supercluster from dropping the CA the other side's certificates need.

use std::path::{Path, PathBuf};

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Bundle;
use crate::check::rfc3339;
use crate::source;
use tracing::warn;

/// Why a bundle would orphan a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verify {}: {}", self.path.display(), self.reason)
    }
}

/// A leaf to verify, optionally followed by its intermediates, as DER.
pub struct Chain {
    pub path: PathBuf,
    pub certs: Vec<Vec<u8>>,
}

/// Reads a `verify` file afresh; `None` if it does not exist (nothing to
/// protect yet: a certificate not issued yet cannot be orphaned).
pub fn read_chain(path: &Path) -> Result<Option<Chain>, VerifyError> {
    let fail = |reason: String| VerifyError {
        path: path.to_path_buf(),
        reason,
    };
    let file = match source::read_file(path, path) {
        Ok(Some(file)) => file,
        Ok(None) => return Ok(None),
        Err(e) => return Err(fail(e.to_string())),
    };
    if file.blocks.is_empty() {
        return Err(fail("holds no certificate".into()));
    }
    let certs = file.blocks.into_iter().map(|b| b.der.to_vec()).collect();
    Ok(Some(Chain {
        path: path.to_path_buf(),
        certs,
    }))
}

/// Checks that `chain` chains to a CA of `bundle` at `now` (unix seconds),
/// as a server or as a client certificate.
pub fn check(chain: &Chain, bundle: &Bundle, now: i64) -> Result<(), VerifyError> {
    let fail = |reason: String| VerifyError {
        path: chain.path.clone(),
        reason,
    };
    let leaf_der = CertificateDer::from(chain.certs[0].as_slice());
    let leaf = EndEntityCert::try_from(&leaf_der)
        .map_err(|e| fail(format!("not a usable certificate: {e}")))?;
    let ders: Vec<CertificateDer<'_>> = bundle
        .anchors()
        .iter()
        .map(|a| CertificateDer::from(&a.der[..]))
        .collect();
    let anchors: Vec<_> = ders
        .iter()
        .filter_map(|d| webpki::anchor_from_trusted_cert(d).ok())
        .collect();
    let intermediates: Vec<CertificateDer<'_>> = chain.certs[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    // A leaf that expired (or is not valid yet) cannot chain now whatever
    // the bundle: it is checked at its nearest valid second instead, so the
    // guard still keeps the CA it chains to, and a rotation is not stuck
    // behind a certificate nobody renewed.
    let at = match leaf_validity(&chain.certs[0]) {
        Some((not_before, not_after)) if now > not_after || now < not_before => {
            warn!(file = %chain.path.display(), not_before = %rfc3339(not_before),
                not_after = %rfc3339(not_after),
                "verify certificate is not valid now; checked at its nearest valid second");
            now.clamp(not_before, not_after)
        }
        _ => now,
    };
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(at.max(0) as u64));
    let attempt = |usage| {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            time,
            usage,
            None,
            None,
        )
        .map(|_| ())
    };
    let Err(server) = attempt(KeyUsage::server_auth()) else {
        return Ok(());
    };
    let Err(client) = attempt(KeyUsage::client_auth()) else {
        return Ok(());
    };
    // A usage the leaf is not for fails at its extended key usage, which
    // says only that: the other attempt's failure says why it does not
    // chain (a server certificate whose issuer is gone fails as a client
    // certificate for its usage alone).
    let error = if wrong_usage(&server) && !wrong_usage(&client) {
        client
    } else {
        server
    };
    Err(fail(describe_failure(chain, error)))
}

/// Whether `error` is the leaf's extended key usage not allowing the usage
/// asked for.
#[allow(deprecated)]
fn wrong_usage(error: &webpki::Error) -> bool {
    matches!(
        error,
        webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_)
    )
}

/// A certificate's notBefore and notAfter (unix seconds).
fn leaf_validity(der: &[u8]) -> Option<(i64, i64)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let validity = cert.validity();
    Some((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// Names the certificate and the issuer it needs.
fn describe_failure(chain: &Chain, error: webpki::Error) -> String {
    let leaf = X509Certificate::from_der(&chain.certs[0])
        .ok()
        .map(|(_, c)| c);
    let top = chain
        .certs
        .last()
        .and_then(|d| X509Certificate::from_der(d).ok())
        .map(|(_, c)| c);
    let subject = leaf
        .as_ref()
        .map(|c| c.subject().to_string())
        .unwrap_or_default();
    let fingerprint = super::fingerprint(&chain.certs[0]);
    let issuer = top
        .as_ref()
        .map(|c| c.issuer().to_string())
        .unwrap_or_default();
    match error {
        webpki::Error::UnknownIssuer => format!(
            "{subject} (sha256 {fingerprint}) would no longer chain: its issuer {issuer} is not in the new bundle"
        ),
        // P-521 and RSA-PSS keys: the chain may be sound, but it cannot be
        // checked here, and an unchecked bundle is not handed out.
        webpki::Error::UnsupportedSignatureAlgorithmContext(_)
        | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => format!(
            "{subject} (sha256 {fingerprint}) cannot be checked against the new bundle: its chain \
             (issuer {issuer}) is signed with an algorithm or key anchorage cannot verify (it \
             verifies P-256, P-384, Ed25519, and RSA keys signing with PKCS#1 or PSS)"
        ),
        other => format!(
            "{subject} (sha256 {fingerprint}) does not chain to the new bundle: {other:?} (issuer {issuer})"
        ),
    }
}
