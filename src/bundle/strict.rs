//! Why a strict verifier would refuse a CA: OpenSSL's `X509_V_FLAG_X509_STRICT`
//! (`openssl verify -x509_strict`), which Python 3.13 turns on by default, so
//! that `check` can say so before an app upgrade breaks on an old cluster CA.
//!
//! The checks follow OpenSSL 3.x (`check_extensions` in crypto/x509/x509_vfy.c,
//! `check_ca` and the extension cache in crypto/x509/v3_purp.c) for a CA used
//! as the trust anchor of a chain, or above a leaf inside one, each reason
//! standing for one OpenSSL verify error:
//!
//! - the CA test itself (error 79, `X509_V_ERR_INVALID_CA`): strict mode wants
//!   basicConstraints with cA set; a v1 root or a CA known only by its
//!   keyUsage is refused, and a keyUsage without keyCertSign is refused in any
//!   mode;
//! - basicConstraints not critical (89), no keyUsage (92), a pathLenConstraint
//!   without keyCertSign (81), an empty issuer (83) or subject (84, 88), an
//!   empty subjectAltName (87), an outer signature algorithm that differs from
//!   the signed one (78), no subjectKeyIdentifier (86), extensions in a v1 or
//!   v2 certificate (93);
//! - no authorityKeyIdentifier with a keyIdentifier (85): OpenSSL asks it of
//!   every certificate of the chain but the last, so a CA that is not
//!   self-issued is refused when its issuer is in the same trust store (a
//!   bundle holding an intermediate and its root). As the last certificate
//!   (a trust anchor on its own, `-partial_chain`) it is not checked;
//! - a critical extension OpenSSL does not handle (34): refused in any mode,
//!   and critical subjectKeyIdentifier or authorityKeyIdentifier are such
//!   extensions for OpenSSL 3.
//!
//! Serial numbers (zero, negative) are not checked by OpenSSL, so not here.
//! This module judges one parsed certificate; it never builds chains and
//! never refuses anything itself: a bundle keeps such CAs (plain verifiers
//! accept them), `check` and the metrics report them.

use std::fmt;

use x509_parser::der_parser::oid::Oid;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_KEY_USAGE,
    OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
};
use x509_parser::prelude::{X509Certificate, X509Version};

use super::subject_hash::canonical_name;

/// One reason a strict verifier refuses a CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No basicConstraints: a v1 root, or a CA known only by its keyUsage.
    NoBasicConstraints,
    /// A keyUsage without keyCertSign on a certificate that says it is a CA.
    NoKeyCertSign,
    /// A critical extension OpenSSL does not handle (its dotted OID).
    UnhandledCritical(String),
    PathLenWithoutKeyCertSign,
    BasicConstraintsNotCritical,
    NoKeyUsage,
    EmptyIssuer,
    EmptySubject,
    EmptySubjectSanNotCritical,
    EmptySubjectAltName,
    SignatureAlgorithmMismatch,
    NoAuthorityKeyIdentifier,
    /// An authorityKeyIdentifier with no keyIdentifier (only issuer and serial).
    NoAuthorityKeyId,
    NoSubjectKeyIdentifier,
    /// Extensions in a certificate of this version (1 or 2).
    ExtensionsBeforeV3(u32),
    /// An EC key whose curve is spelled out instead of named.
    ExplicitEcParameters,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoBasicConstraints => f.write_str("no basicConstraints"),
            Self::NoKeyCertSign => f.write_str("keyUsage without keyCertSign"),
            Self::UnhandledCritical(oid) => write!(f, "unhandled critical extension {oid}"),
            Self::PathLenWithoutKeyCertSign => f.write_str("pathLenConstraint without keyCertSign"),
            Self::BasicConstraintsNotCritical => f.write_str("basicConstraints not critical"),
            Self::NoKeyUsage => f.write_str("no keyUsage"),
            Self::EmptyIssuer => f.write_str("empty issuer"),
            Self::EmptySubject => f.write_str("empty subject"),
            Self::EmptySubjectSanNotCritical => {
                f.write_str("empty subject and subjectAltName not critical")
            }
            Self::EmptySubjectAltName => f.write_str("empty subjectAltName"),
            Self::SignatureAlgorithmMismatch => {
                f.write_str("signatureAlgorithm differs from the signed one")
            }
            Self::NoAuthorityKeyIdentifier => {
                f.write_str("no authorityKeyIdentifier (not self-issued)")
            }
            Self::NoAuthorityKeyId => f.write_str("authorityKeyIdentifier without keyIdentifier"),
            Self::NoSubjectKeyIdentifier => f.write_str("no subjectKeyIdentifier"),
            Self::ExtensionsBeforeV3(v) => write!(f, "extensions in a v{v} certificate"),
            Self::ExplicitEcParameters => f.write_str("EC key with explicit curve parameters"),
        }
    }
}

/// The critical extensions OpenSSL 3 handles (`X509_supported_extension`);
/// any other critical one fails verification. Their DER content octets:
/// compared with each critical extension's as they are, without making a
/// dotted string of every one (a CA has two or three).
const HANDLED_CRITICAL: &[&[u8]] = &[
    // 2.16.840.1.113730.1.1 Netscape certificate type
    &[0x60, 0x86, 0x48, 0x01, 0x86, 0xf8, 0x42, 0x01, 0x01],
    // 2.5.29.15 keyUsage
    &[0x55, 0x1d, 0x0f],
    // 2.5.29.17 subjectAltName
    &[0x55, 0x1d, 0x11],
    // 2.5.29.19 basicConstraints
    &[0x55, 0x1d, 0x13],
    // 2.5.29.32 certificatePolicies
    &[0x55, 0x1d, 0x20],
    // 2.5.29.31 cRLDistributionPoints
    &[0x55, 0x1d, 0x1f],
    // 2.5.29.37 extKeyUsage
    &[0x55, 0x1d, 0x25],
    // 1.3.6.1.5.5.7.1.7 sbgp-ipAddrBlock
    &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x07],
    // 1.3.6.1.5.5.7.1.8 sbgp-autonomousSysNum
    &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x08],
    // 1.3.6.1.5.5.7.48.1.5 OCSP noCheck
    &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x05],
    // 2.5.29.36 policyConstraints
    &[0x55, 0x1d, 0x24],
    // 1.3.6.1.5.5.7.1.14 proxyCertInfo
    &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x0e],
    // 2.5.29.30 nameConstraints
    &[0x55, 0x1d, 0x1e],
    // 2.5.29.33 policyMappings
    &[0x55, 0x1d, 0x21],
    // 2.5.29.54 inhibitAnyPolicy
    &[0x55, 0x1d, 0x36],
];

/// The reasons a strict verifier refuses `cert` as a CA, in the order OpenSSL
/// checks them; empty when it accepts it. `is_ca` is the certificate's CA
/// status by OpenSSL's plain rules. A certificate that neither is a CA nor
/// says it is one (basicConstraints cA) gets no reasons: it is a leaf, not a
/// CA that fails.
pub fn reasons(cert: &X509Certificate<'_>, is_ca: bool) -> Vec<Reason> {
    // Compared as OIDs: a dotted string per extension and look-up was
    // 59% of the allocations of a 10,000-CA render.
    let find = |oid: &Oid<'_>| cert.extensions().iter().find(|e| e.oid == *oid);
    let constraints =
        find(&OID_X509_EXT_BASIC_CONSTRAINTS).and_then(|e| match e.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => Some((bc, e.critical)),
            _ => None,
        });
    let says_ca = constraints.is_some_and(|(bc, _)| bc.ca);
    if !is_ca && !says_ca {
        return Vec::new();
    }
    let key_usage = find(&OID_X509_EXT_KEY_USAGE).and_then(|e| match e.parsed_extension() {
        ParsedExtension::KeyUsage(ku) => Some(ku),
        _ => None,
    });
    // OpenSSL keeps the keyUsage bits as 0 when the extension is absent.
    let key_cert_sign = key_usage.is_some_and(|ku| ku.key_cert_sign());
    let mut out = Vec::new();

    // X509_check_ca must return 1: basicConstraints with cA, and a keyUsage,
    // if any, with keyCertSign.
    if key_usage.is_some() && !key_cert_sign {
        out.push(Reason::NoKeyCertSign);
    }
    if constraints.is_none() {
        out.push(Reason::NoBasicConstraints);
    }
    for ext in cert.extensions().iter().filter(|e| e.critical) {
        if !HANDLED_CRITICAL.contains(&ext.oid.as_bytes()) {
            out.push(Reason::UnhandledCritical(ext.oid.to_id_string()));
        }
    }
    if let Some((bc, critical)) = constraints {
        if bc.path_len_constraint.is_some() && !key_cert_sign {
            out.push(Reason::PathLenWithoutKeyCertSign);
        }
        if bc.ca && !critical {
            out.push(Reason::BasicConstraintsNotCritical);
        }
    }
    if says_ca && key_usage.is_none() {
        out.push(Reason::NoKeyUsage);
    }
    if cert.issuer().iter_attributes().next().is_none() {
        out.push(Reason::EmptyIssuer);
    }
    let san = find(&OID_X509_EXT_SUBJECT_ALT_NAME);
    if cert.subject().iter_attributes().next().is_none() {
        // A CA's subject must never be empty, whatever its subjectAltName.
        out.push(Reason::EmptySubject);
        if san.is_some_and(|e| !e.critical) {
            out.push(Reason::EmptySubjectSanNotCritical);
        }
    }
    if san.is_some_and(|e| empty_san(e.value)) {
        out.push(Reason::EmptySubjectAltName);
    }
    // OpenSSL's check_curve: a curve given by its parameters, not its name.
    let key = cert.public_key();
    if key.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && key
            .algorithm
            .parameters
            .as_ref()
            .is_some_and(|p| p.tag() == x509_parser::der_parser::asn1_rs::Tag::Sequence)
    {
        out.push(Reason::ExplicitEcParameters);
    }
    if cert.signature_algorithm != cert.tbs_certificate.signature {
        out.push(Reason::SignatureAlgorithmMismatch);
    }
    match cert.version() {
        X509Version::V3 => {
            if !self_issued(cert) {
                match find(&OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER).map(|e| e.parsed_extension()) {
                    None => out.push(Reason::NoAuthorityKeyIdentifier),
                    Some(ParsedExtension::AuthorityKeyIdentifier(akid))
                        if akid.key_identifier.is_some() => {}
                    Some(_) => out.push(Reason::NoAuthorityKeyId),
                }
            }
            if says_ca && find(&OID_X509_EXT_SUBJECT_KEY_IDENTIFIER).is_none() {
                out.push(Reason::NoSubjectKeyIdentifier);
            }
        }
        version if !cert.extensions().is_empty() => {
            out.push(Reason::ExtensionsBeforeV3(version.0 + 1));
        }
        _ => {}
    }
    out
}

/// A subjectAltName holding no name: an empty SEQUENCE.
fn empty_san(value: &[u8]) -> bool {
    value == [0x30, 0x00]
}

/// Issuer and subject are the same name, compared as OpenSSL compares names
/// (canonical forms); names it cannot canonicalise are the same only as
/// bytes.
fn self_issued(cert: &X509Certificate<'_>) -> bool {
    let subject = cert.subject().as_raw();
    let issuer = cert.issuer().as_raw();
    // The same bytes have the same canonical form (every root's case):
    // neither is canonicalised.
    if subject == issuer {
        return true;
    }
    match (canonical_name(subject), canonical_name(issuer)) {
        (Ok(s), Ok(i)) => s == i,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use x509_parser::prelude::FromDer;

    fn ca_params(cn: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    fn judge(params: &CertificateParams) -> Vec<String> {
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        let (_, parsed) = X509Certificate::from_der(cert.der()).expect("parse");
        reasons(&parsed, true)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_well_formed_root_has_no_reason() {
        assert_eq!(judge(&ca_params("Good")), Vec::<String>::new());
    }

    #[test]
    fn a_ca_without_key_usage_is_named() {
        let mut params = ca_params("No KU");
        params.key_usages.clear();
        assert_eq!(judge(&params), ["no keyUsage"]);
    }

    #[test]
    fn an_unknown_critical_extension_is_named_by_oid() {
        let mut params = ca_params("Odd");
        let mut ext = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![5, 0]);
        ext.set_criticality(true);
        params.custom_extensions.push(ext);
        assert_eq!(
            judge(&params),
            ["unhandled critical extension 1.3.6.1.4.1.99999.1"]
        );
    }

    #[test]
    fn a_handled_critical_extension_is_no_reason() {
        // OCSP noCheck: an OID of nine octets, not parsed by x509-parser.
        let mut params = ca_params("No check");
        let mut ext =
            CustomExtension::from_oid_content(&[1, 3, 6, 1, 5, 5, 7, 48, 1, 5], vec![5, 0]);
        ext.set_criticality(true);
        params.custom_extensions.push(ext);
        assert_eq!(judge(&params), Vec::<String>::new());
    }

    #[test]
    fn the_handled_critical_extensions_are_openssls() {
        use std::str::FromStr;
        // X509_supported_extension's list, as OpenSSL 3 names it.
        let dotted = [
            "2.16.840.1.113730.1.1",
            "2.5.29.15",
            "2.5.29.17",
            "2.5.29.19",
            "2.5.29.32",
            "2.5.29.31",
            "2.5.29.37",
            "1.3.6.1.5.5.7.1.7",
            "1.3.6.1.5.5.7.1.8",
            "1.3.6.1.5.5.7.48.1.5",
            "2.5.29.36",
            "1.3.6.1.5.5.7.1.14",
            "2.5.29.30",
            "2.5.29.33",
            "2.5.29.54",
        ];
        let encoded: Vec<Vec<u8>> = dotted
            .iter()
            .map(|d| Oid::from_str(d).expect("an OID").as_bytes().to_vec())
            .collect();
        let handled: Vec<Vec<u8>> = HANDLED_CRITICAL.iter().map(|o| o.to_vec()).collect();
        assert_eq!(handled, encoded);
    }

    #[test]
    fn a_leaf_gets_no_reason() {
        let mut params = CertificateParams::new(vec!["leaf.example".into()]).expect("params");
        params.is_ca = IsCa::ExplicitNoCa;
        let key = KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("self-signed");
        let (_, parsed) = X509Certificate::from_der(cert.der()).expect("parse");
        assert!(reasons(&parsed, false).is_empty());
    }
}
