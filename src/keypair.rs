//! Key pairs: a server's own certificate and key (rotated by cert-manager or
//! ACME, or issued to the pod by kubelet's `podCertificate` projection),
//! watched like sources, never rendered, only checked. A pair is read from
//! two files or from one credential bundle (the key and the chain, leaf
//! first), and accepted when the key matches the certificate (RSA, ECDSA,
//! Ed25519: the public keys compared as SubjectPublicKeyInfo), the
//! certificate is within its validity window and, with `chain_to`, chains
//! to that bundle. A pair caught half-written is held until it is
//! consistent; one not valid yet is held until its `notBefore`.
//!
//! The key's bytes are read into memory to check them and are never logged.
//! They are copied to one place only: the pair's `split_dir`, written here
//! for a pair that passed every check, before the daemon asks for its
//! reload (guarantee 8).

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls::sign::CertifiedKey;

use crate::bundle::subject_hash::{TAG_BIT_STRING, TAG_OCTET_STRING, TAG_SEQUENCE, Tlv, read_tlv};
use crate::bundle::{self, Anchor, Bundle, verify};
use crate::config::{KeyMaterial, KeyPairConfig, SPLIT_CERT, SPLIT_CERT_MODE, SPLIT_KEY, SplitDir};
use crate::output::atomic;
use crate::source::{self, CertBlock};
use x509_parser::asn1_rs::Class;

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

/// Why a pair is not accepted (yet). Each names the file at fault; none
/// ever quotes a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// A file of the pair does not exist (yet).
    Missing {
        path: PathBuf,
    },
    /// A file cannot be read or framed: the reader's own error.
    Unreadable {
        path: PathBuf,
        reason: String,
    },
    NoCertificate {
        path: PathBuf,
    },
    /// No private key, or one that cannot be used.
    NoKey {
        path: PathBuf,
        reason: Option<String>,
    },
    /// More than one private key: which goes with the certificate?
    Keys {
        path: PathBuf,
        count: usize,
    },
    /// The key is not the certificate's; `half_written`: two files, one
    /// caught before the other.
    Mismatch {
        key: PathBuf,
        cert: PathBuf,
        subject: String,
        half_written: bool,
    },
    /// Not valid before `not_before` (unix seconds): check again then.
    NotYetValid {
        path: PathBuf,
        subject: String,
        not_before: i64,
    },
    Expired {
        path: PathBuf,
        subject: String,
        not_after: i64,
    },
    /// It does not chain to the bundle named by `chain_to`.
    Unchained {
        path: PathBuf,
        reason: String,
    },
}

impl Held {
    /// When to check again with no file event, if the wait has an end.
    pub fn until(&self) -> Option<i64> {
        match self {
            Self::NotYetValid { not_before, .. } => Some(*not_before),
            _ => None,
        }
    }
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { path } => write!(f, "{}: does not exist", path.display()),
            Self::Unreadable { reason, .. } => f.write_str(reason),
            Self::NoCertificate { path } => write!(f, "{}: holds no certificate", path.display()),
            Self::NoKey { path, reason: None } => {
                write!(f, "{}: holds no usable private key", path.display())
            }
            Self::NoKey {
                path,
                reason: Some(reason),
            } => write!(f, "{}: unsupported private key: {reason}", path.display()),
            Self::Keys { path, count } => write!(
                f,
                "{}: holds {count} private keys; which one goes with the certificate is ambiguous",
                path.display()
            ),
            Self::Mismatch {
                key,
                cert,
                subject,
                half_written: true,
            } => write!(
                f,
                "{} does not match the certificate {} ({subject}): a pair caught half-written is held until it is consistent",
                key.display(),
                cert.display()
            ),
            Self::Mismatch { cert, subject, .. } => write!(
                f,
                "{}: the private key does not match the leaf certificate ({subject}); held until the bundle changes",
                cert.display()
            ),
            Self::NotYetValid {
                path,
                subject,
                not_before,
            } => write!(
                f,
                "{}: {subject} is not valid before {}",
                path.display(),
                crate::check::rfc3339(*not_before)
            ),
            Self::Expired {
                path,
                subject,
                not_after,
            } => write!(
                f,
                "{}: {subject} expired at {}",
                path.display(),
                crate::check::rfc3339(*not_after)
            ),
            Self::Unchained { reason, .. } => f.write_str(reason),
        }
    }
}

/// The two files of a `split_dir`, as PEM. Deliberately not `Debug`: it
/// holds the private key.
pub struct SplitFiles {
    chain: Vec<u8>,
    key: Vec<u8>,
}

/// What one read of the pair found, checked.
pub struct Checked {
    pub accepted: Accepted,
    /// The PEM of the split files, when the pair has a `split_dir`.
    pub split: Option<SplitFiles>,
}

fn read(path: &Path) -> Result<Vec<u8>, Held> {
    match source::read_bounded(path, path) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(Held::Missing {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(Held::Unreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// The pair as read from disk, before any check.
struct Material<'a> {
    cert_path: &'a Path,
    key_path: &'a Path,
    cert_bytes: Vec<u8>,
    /// For a credential bundle, the same file as `cert_bytes`.
    key_bytes: Option<Vec<u8>>,
}

impl Material<'_> {
    fn key_bytes(&self) -> &[u8] {
        self.key_bytes.as_deref().unwrap_or(&self.cert_bytes)
    }
}

fn read_material(material: &KeyMaterial) -> Result<Material<'_>, Held> {
    match material {
        KeyMaterial::Files { cert, key } => Ok(Material {
            cert_path: cert,
            key_path: key,
            cert_bytes: read(cert)?,
            key_bytes: Some(read(key)?),
        }),
        // One read of one file: key and chain from the same generation.
        KeyMaterial::CredentialBundle(bundle) => Ok(Material {
            cert_path: bundle,
            key_path: bundle,
            cert_bytes: read(bundle)?,
            key_bytes: None,
        }),
    }
}

/// The one private key in `bytes`. Never quotes the key: errors name the
/// file only.
fn private_key(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, Held> {
    let mut keys = PrivateKeyDer::pem_slice_iter(bytes);
    let key = match keys.next() {
        Some(Ok(key)) => key,
        _ => {
            return Err(Held::NoKey {
                path: path.to_path_buf(),
                reason: None,
            });
        }
    };
    let more = keys.count();
    if more > 0 {
        return Err(Held::Keys {
            path: path.to_path_buf(),
            count: more + 1,
        });
    }
    Ok(key)
}

/// The elements of a constructed element's contents, in order.
fn elements(mut contents: &[u8]) -> Option<Vec<Tlv<'_>>> {
    let mut out = Vec::new();
    while !contents.is_empty() {
        let (element, rest) = read_tlv(contents).ok()?;
        out.push(element);
        contents = rest;
    }
    Some(out)
}

/// The public point an EC private key carries (RFC 5915's `publicKey`,
/// which OpenSSL and Go always write), as its BIT STRING's contents; from a
/// PKCS#8 key or a SEC1 one. `None` for any other key.
fn ec_public_key(der: &[u8]) -> Option<&[u8]> {
    let (key, _) = read_tlv(der).ok()?;
    if !key.is_universal(TAG_SEQUENCE) {
        return None;
    }
    let fields = elements(key.content)?;
    // PKCS#8: version, algorithm, the ECPrivateKey in an OCTET STRING.
    let ec = match fields.as_slice() {
        [_, algorithm, inner, ..]
            if algorithm.is_universal(TAG_SEQUENCE) && inner.is_universal(TAG_OCTET_STRING) =>
        {
            let (ec, _) = read_tlv(inner.content).ok()?;
            ec.is_universal(TAG_SEQUENCE).then_some(ec.content)?
        }
        _ => key.content,
    };
    // `[1]`, explicit: the publicKey BIT STRING.
    let public = elements(ec)?
        .into_iter()
        .find(|t| t.class == Class::ContextSpecific && t.tag == 1)?;
    let (bits, _) = read_tlv(public.content).ok()?;
    bits.is_universal(TAG_BIT_STRING).then_some(bits.content)
}

/// A SubjectPublicKeyInfo's subjectPublicKey, as its BIT STRING's contents.
fn spki_public_key(spki: &[u8]) -> Option<&[u8]> {
    let (info, _) = read_tlv(spki).ok()?;
    match elements(info.content)?.as_slice() {
        [_, bits] if bits.is_universal(TAG_BIT_STRING) => Some(bits.content),
        _ => None,
    }
}

/// The certificate's SubjectPublicKeyInfo, DER.
fn certificate_spki(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(cert.public_key().raw.to_vec())
}

/// Checks the pair on disk at `now`; `chain_to` is the bundle it must chain
/// to, when the config names one.
pub fn inspect(
    config: &KeyPairConfig,
    chain_to: Option<&Bundle>,
    now: i64,
) -> Result<Checked, Held> {
    let material = read_material(&config.material)?;
    let (cert_path, key_path) = (material.cert_path, material.key_path);
    let blocks = source::decode(&material.cert_bytes).map_err(|kind| Held::Unreadable {
        path: cert_path.to_path_buf(),
        reason: source::SourceError {
            path: cert_path.to_path_buf(),
            kind,
        }
        .to_string(),
    })?;
    let Some(first) = blocks.first() else {
        return Err(Held::NoCertificate {
            path: cert_path.to_path_buf(),
        });
    };
    let leaf = Anchor::parse(first, cert_path.into(), 0).map_err(|e| Held::Unreadable {
        path: cert_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let key = private_key(material.key_bytes(), key_path)?;
    let mismatch = || Held::Mismatch {
        key: key_path.to_path_buf(),
        cert: cert_path.to_path_buf(),
        subject: leaf.subject.clone(),
        half_written: matches!(config.material, KeyMaterial::Files { .. }),
    };
    // The key's public half against the certificate's, as read by the same
    // parser as every certificate here (a v1 leaf included, which the TLS
    // stack's own check cannot read).
    let spki = certificate_spki(&leaf.der);
    match rustls::crypto::ring::sign::any_supported_type(&key) {
        Ok(signing) => match signing.public_key() {
            Some(public) if Some(public.as_ref()) == spki.as_deref() => {}
            Some(_) => return Err(mismatch()),
            None => {
                let chain: Vec<CertificateDer<'static>> = blocks
                    .iter()
                    .map(|b| CertificateDer::from(b.der.to_vec()))
                    .collect();
                CertifiedKey::new(chain, signing)
                    .keys_match()
                    .map_err(|_| mismatch())?;
            }
        },
        // A curve the signing library does not load (P-521, which
        // podCertificate may issue): the key carries its public point, and
        // the certificate must hold the same.
        Err(e) => match ec_public_key(key.secret_der()) {
            Some(public) if spki.as_deref().and_then(spki_public_key) == Some(public) => {}
            Some(_) => return Err(mismatch()),
            None => {
                return Err(Held::NoKey {
                    path: key_path.to_path_buf(),
                    reason: Some(e.to_string()),
                });
            }
        },
    }
    if leaf.pending_at(now) {
        return Err(Held::NotYetValid {
            path: cert_path.to_path_buf(),
            subject: leaf.subject.clone(),
            not_before: leaf.not_before,
        });
    }
    if leaf.expired_at(now) {
        return Err(Held::Expired {
            path: cert_path.to_path_buf(),
            subject: leaf.subject.clone(),
            not_after: leaf.not_after,
        });
    }
    if let Some(bundle) = chain_to {
        let chain = verify::Chain {
            path: cert_path.to_path_buf(),
            certs: blocks.iter().map(|b| b.der.to_vec()).collect(),
        };
        verify::check(&chain, bundle, now).map_err(|e| Held::Unchained {
            path: cert_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let split = config.split.as_ref().map(|_| split_files(&blocks, &key));
    Ok(Checked {
        accepted: Accepted {
            cert_sha256: bundle::sha256(&material.cert_bytes),
            key_sha256: bundle::sha256(material.key_bytes()),
            subject: leaf.subject.clone(),
            not_after: leaf.not_after,
            leaf: leaf.der.to_vec(),
        },
        split,
    })
}

/// `tls.crt` (the chain, leaf first, as it was read) and `tls.key` (the
/// key in the PEM form its encoding calls for).
fn split_files(blocks: &[CertBlock], key: &PrivateKeyDer<'_>) -> SplitFiles {
    let mut chain = Vec::new();
    for block in blocks {
        let label = if block.trusted {
            "TRUSTED CERTIFICATE"
        } else {
            "CERTIFICATE"
        };
        source::pem::encode(label, &block.der, &mut chain);
    }
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let mut pem = Vec::new();
    source::pem::encode(label, key.secret_der(), &mut pem);
    SplitFiles { chain, key: pem }
}

/// What a dry run says of the pair's `split_dir` with `files`: whether
/// they would change what is live there, or why they would be refused.
pub fn check_split(split: &SplitDir, files: &SplitFiles) -> std::io::Result<bool> {
    atomic::check_generation(&split.dir, &split_entries(split, files))
}

/// The two files of a split directory: the chain, and the key at its mode.
fn split_entries<'a>(
    split: &SplitDir,
    files: &'a SplitFiles,
) -> [(&'static str, &'a [u8], u32); 2] {
    [
        (SPLIT_CERT, &files.chain, SPLIT_CERT_MODE),
        (SPLIT_KEY, &files.key, split.key_mode),
    ]
}

/// Writes the split pair unless it is already live there; returns whether
/// it wrote.
fn publish_split(split: &SplitDir, files: &SplitFiles) -> std::io::Result<bool> {
    atomic::publish_generation(&split.dir, &split_entries(split, files))
        // Failed after the swap or not, the pair is held and written again:
        // the retry finds it live and accepts it then.
        .map_err(std::io::Error::from)
}

/// How long to wait before writing a split directory again after the
/// `failures`-th failure in a row: 1 s, doubling, at most a minute.
fn write_backoff(failures: u32) -> i64 {
    (1i64 << failures.saturating_sub(1).min(6)).min(60)
}

/// The state the daemon keeps per pair.
#[derive(Debug, Clone)]
pub struct KeyPairState {
    pub config: KeyPairConfig,
    pub accepted: Option<Accepted>,
    /// Checked once: the first acceptance after that is a change.
    pub initialized: bool,
    pub held: Option<String>,
    /// When to check again with no file event (a notBefore, an expiry, a
    /// split directory write to retry).
    pub next_change: Option<i64>,
    /// Failed writes of the split directory in a row.
    pub write_failures: u32,
    /// The last check wrote the split directory (it did not hold the pair).
    pub split_written: bool,
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
            write_failures: 0,
            split_written: false,
        }
    }

    /// Checks the pair and records the result.
    pub fn check(&mut self, chain_to: Option<&Bundle>, now: i64) -> Outcome {
        let first = !self.initialized;
        self.initialized = true;
        self.split_written = false;
        match inspect(&self.config, chain_to, now) {
            Ok(Checked { accepted, split }) => {
                let same = self.accepted.as_ref().is_some_and(|a| {
                    a.cert_sha256 == accepted.cert_sha256 && a.key_sha256 == accepted.key_sha256
                });
                // The split pair is in place before the change is reported,
                // so before any reload runs (guarantee 5). An unchanged pair
                // is compared with the disk too: a split directory changed
                // behind our back is repaired.
                let mut replaced = false;
                if let (Some(dir), Some(files)) = (&self.config.split, &split) {
                    let had_pair = std::fs::symlink_metadata(dir.dir.join("..data")).is_ok();
                    match publish_split(dir, files) {
                        Ok(wrote) => {
                            self.write_failures = 0;
                            self.split_written = wrote;
                            replaced = wrote && had_pair;
                            if wrote && same {
                                tracing::info!(keypair = %self.config.name, split_dir = %dir.dir.display(),
                                    "split directory repaired; the pair is unchanged, no reload");
                            }
                        }
                        Err(e) => {
                            // Retried on a timer, with no file event needed
                            // (guarantee 12); the app keeps the pair it has.
                            self.write_failures = self.write_failures.saturating_add(1);
                            self.next_change =
                                Some(now.saturating_add(write_backoff(self.write_failures)));
                            let reason = format!("cannot write the split directory: {e}");
                            if self.held.as_deref() == Some(&reason) {
                                return Outcome::Unchanged;
                            }
                            self.held = Some(reason.clone());
                            return Outcome::Held(reason);
                        }
                    }
                }
                self.held = None;
                self.next_change = Some(accepted.not_after.saturating_add(1));
                if same {
                    return Outcome::Unchanged;
                }
                self.accepted = Some(accepted);
                // At start, a split directory that held another pair was
                // read by the app: it must reload, as after any change.
                Outcome::Changed {
                    first: first && !replaced,
                }
            }
            Err(held) => {
                self.next_change = held.until();
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

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::*;
    use crate::config::DEFAULT_KEY_MODE;

    struct Issued {
        chain: Vec<String>,
        key: String,
    }

    /// A CA, an intermediate and a leaf it issues, valid now: the chain is
    /// leaf first.
    fn issue(cn: &str) -> Issued {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().expect("key");
        let mut mid = CertificateParams::new(Vec::<String>::new()).expect("params");
        mid.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mid_key = KeyPair::generate().expect("key");
        let mid_cert = mid
            .signed_by(&mid_key, &Issuer::from_params(&ca, &ca_key))
            .expect("intermediate");
        let leaf_key = KeyPair::generate().expect("key");
        let mut leaf = CertificateParams::new(vec![cn.to_owned()]).expect("params");
        leaf.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let leaf_cert = leaf
            .signed_by(&leaf_key, &Issuer::from_params(&mid, &mid_key))
            .expect("leaf");
        Issued {
            chain: vec![leaf_cert.pem(), mid_cert.pem()],
            key: leaf_key.serialize_pem(),
        }
    }

    /// kubelet's credential bundle: the key, then the chain, leaf first.
    fn credential_bundle(issued: &Issued) -> String {
        format!("{}{}", issued.key, issued.chain.concat())
    }

    fn config(bundle: &Path, split: Option<&Path>) -> KeyPairConfig {
        KeyPairConfig {
            name: "pod".into(),
            material: KeyMaterial::CredentialBundle(bundle.to_path_buf()),
            split: split.map(|dir| SplitDir {
                dir: dir.to_path_buf(),
                key_mode: DEFAULT_KEY_MODE,
            }),
            chain_to: None,
            reloads: Vec::new(),
        }
    }

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn held(outcome: Outcome) -> String {
        match outcome {
            Outcome::Held(reason) => reason,
            Outcome::Unchanged => panic!("unchanged, not held"),
            Outcome::Changed { .. } => panic!("changed, not held"),
        }
    }

    #[test]
    fn a_credential_bundle_is_read_with_its_key_first_or_last() {
        let dir = tempfile::tempdir().expect("tempdir");
        let issued = issue("pod.example");
        let path = dir.path().join("credentialbundle.pem");
        fs::write(&path, credential_bundle(&issued)).expect("write");
        let split = dir.path().join("split");
        let checked = inspect(&config(&path, Some(&split)), None, now()).expect("accepted");
        assert!(checked.accepted.subject.contains("pod.example"));
        let files = checked.split.expect("split files");
        assert_eq!(
            String::from_utf8(files.chain).expect("pem"),
            issued.chain.concat().replace("\r\n", "\n")
        );
        assert!(files.key.starts_with(b"-----BEGIN PRIVATE KEY-----\n"));

        // The key after the chain is found too.
        fs::write(&path, format!("{}{}", issued.chain.concat(), issued.key)).expect("write");
        inspect(&config(&path, None), None, now()).expect("accepted");
    }

    #[test]
    fn a_mismatched_or_ambiguous_bundle_is_held_without_quoting_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (issue("a.example"), issue("b.example"));
        let path = dir.path().join("credentialbundle.pem");
        fs::write(&path, format!("{}{}", b.key, a.chain.concat())).expect("write");
        let Err(held) = inspect(&config(&path, None), None, now()) else {
            panic!("a mismatched bundle was accepted");
        };
        assert!(matches!(&held, Held::Mismatch { cert, half_written: false, .. } if *cert == path));
        let reason = held.to_string();
        assert!(reason.contains("does not match"), "{reason}");
        assert!(reason.contains(path.to_str().expect("utf-8")), "{reason}");
        let body: String = b.key.lines().nth(1).expect("a key line").to_owned();
        assert!(!reason.contains(&body), "the key is quoted: {reason}");

        fs::write(&path, format!("{}{}{}", a.key, b.key, a.chain.concat())).expect("write");
        let Err(held) = inspect(&config(&path, None), None, now()) else {
            panic!("two keys were accepted");
        };
        assert_eq!(
            held,
            Held::Keys {
                path: path.clone(),
                count: 2
            }
        );
        let reason = held.to_string();
        assert!(reason.contains("2 private keys"), "{reason}");

        fs::write(&path, a.chain.concat()).expect("write");
        let Err(held) = inspect(&config(&path, None), None, now()) else {
            panic!("no key was accepted");
        };
        let reason = held.to_string();
        assert!(reason.contains("no usable private key"), "{reason}");
    }

    #[test]
    fn the_split_pair_is_written_only_for_an_accepted_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentialbundle.pem");
        let split = dir.path().join("shared/tls");
        let mut state = KeyPairState::new(config(&path, Some(&split)));
        let read_split = || {
            (
                fs::read_to_string(split.join("tls.crt")).unwrap_or_default(),
                fs::read_to_string(split.join("tls.key")).unwrap_or_default(),
            )
        };

        // A mismatched bundle first: held, nothing written.
        let (a, b) = (issue("a.example"), issue("b.example"));
        fs::write(&path, format!("{}{}", b.key, a.chain.concat())).expect("write");
        held(state.check(None, now()));
        assert!(!split.exists(), "a held pair was written");

        // A good one: written (key at 0600) before the change is reported.
        fs::write(&path, credential_bundle(&a)).expect("write");
        assert!(matches!(
            state.check(None, now()),
            Outcome::Changed { first: false }
        ));
        assert_eq!(read_split(), (a.chain.concat(), a.key.clone()));
        let mode = fs::metadata(split.join("tls.key"))
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o600);
        assert!(matches!(state.check(None, now()), Outcome::Unchanged));

        // A mismatched rotation: held, the split pair stays the last good.
        fs::write(&path, format!("{}{}", a.key, b.chain.concat())).expect("write");
        held(state.check(None, now()));
        assert_eq!(read_split(), (a.chain.concat(), a.key.clone()));

        // Removed behind our back: repaired, and no change reported.
        fs::write(&path, credential_bundle(&a)).expect("write");
        assert!(matches!(state.check(None, now()), Outcome::Unchanged));
        fs::remove_file(split.join("tls.key")).expect("rm");
        assert!(matches!(state.check(None, now()), Outcome::Unchanged));
        assert_eq!(read_split(), (a.chain.concat(), a.key.clone()));
    }

    #[test]
    fn at_start_a_split_dir_holding_another_pair_counts_as_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentialbundle.pem");
        let split = dir.path().join("tls");
        let (a, b) = (issue("a.example"), issue("b.example"));

        // A fresh split directory at start: the app reads it when it starts.
        fs::write(&path, credential_bundle(&a)).expect("write");
        let mut state = KeyPairState::new(config(&path, Some(&split)));
        assert!(matches!(
            state.check(None, now()),
            Outcome::Changed { first: true }
        ));
        // The same pair after a restart: nothing written, no reload.
        let mut state = KeyPairState::new(config(&path, Some(&split)));
        assert!(matches!(
            state.check(None, now()),
            Outcome::Changed { first: true }
        ));
        // Rotated while anchorage was down: the app holds the old pair.
        fs::write(&path, credential_bundle(&b)).expect("write");
        let mut state = KeyPairState::new(config(&path, Some(&split)));
        assert!(matches!(
            state.check(None, now()),
            Outcome::Changed { first: false }
        ));
    }

    #[test]
    fn a_failed_split_write_is_held_and_retried_on_a_timer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentialbundle.pem");
        fs::write(&path, credential_bundle(&issue("a.example"))).expect("write");
        // A regular file where the split directory's key goes.
        let split: PathBuf = dir.path().join("tls");
        fs::create_dir(&split).expect("mkdir");
        fs::write(split.join("tls.key"), "not ours").expect("write");
        let mut state = KeyPairState::new(config(&path, Some(&split)));
        let t = now();
        let reason = held(state.check(None, t));
        assert!(reason.contains("not written by anchorage"), "{reason}");
        assert_eq!(state.next_change, Some(t + 1));
        assert!(matches!(state.check(None, t), Outcome::Unchanged));
        assert_eq!(state.next_change, Some(t + 2));
        assert!(state.accepted.is_none());

        fs::remove_file(split.join("tls.key")).expect("rm");
        assert!(matches!(
            state.check(None, t),
            Outcome::Changed { first: false }
        ));
        assert_eq!(state.write_failures, 0);
    }
}
