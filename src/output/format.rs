//! The bytes of each output format. Pure functions of the certificate set.

use super::{Format, Rendered, keystore};
use crate::bundle::Bundle;
use crate::bundle::subject_hash::hash_hex;
use crate::source::pem;

/// The bundle file inside a hashed directory, as Debian names it.
pub const OPENSSL_DIR_BUNDLE: &str = "ca-certificates.crt";

pub fn render(bundle: &Bundle, format: &Format) -> Rendered {
    match format {
        Format::Pem => Rendered::File(pem_bundle(bundle)),
        Format::OpensslDir => Rendered::Dir(openssl_dir(bundle)),
        Format::DerDir => Rendered::Dir(der_dir(bundle)),
        Format::Pkcs12 { password } => Rendered::File(keystore::pkcs12(bundle, password)),
        Format::Jks { password } => Rendered::File(keystore::jks(bundle, password)),
    }
}

/// Each certificate with a stable alias for keystores: the start of its
/// SHA-256 (Java lower-cases aliases; these are lower case already).
pub fn alias(bundle: &Bundle) -> impl Iterator<Item = (String, &crate::bundle::Anchor)> {
    bundle
        .anchors()
        .iter()
        .map(|a| (a.fingerprint()[..16].to_owned(), a))
}

fn pem_bundle(bundle: &Bundle) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        bundle
            .anchors()
            .iter()
            .map(|a| a.der.len() * 4 / 3 + 80)
            .sum(),
    );
    for anchor in bundle.anchors() {
        pem::encode("CERTIFICATE", &anchor.der, &mut out);
    }
    out
}

/// `<hash>.N` numbered contiguously from 0 per hash (OpenSSL's by_dir lookup
/// stops at the first gap), in the bundle's order, so the names are stable
/// for a given set.
fn openssl_dir(bundle: &Bundle) -> Vec<(String, Vec<u8>)> {
    let mut counts: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    let mut files = Vec::with_capacity(bundle.len() + 1);
    // Each certificate is encoded once: its file, and its part of the bundle.
    let mut all = Vec::new();
    for anchor in bundle.anchors() {
        let n = counts.entry(anchor.subject_hash).or_insert(0);
        let mut body = Vec::with_capacity(anchor.der.len() * 4 / 3 + 80);
        pem::encode("CERTIFICATE", &anchor.der, &mut body);
        all.extend_from_slice(&body);
        files.push((format!("{}.{}", hash_hex(anchor.subject_hash), n), body));
        *n += 1;
    }
    files.push((OPENSSL_DIR_BUNDLE.to_owned(), all));
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

/// Whether `name` is one a directory format produces: `<8 hex>.<N>` or
/// the bundle file of an openssl-dir, `<SHA-256 hex>.der` of a der-dir. A
/// directory holding only such names is an earlier output of anchorage.
pub fn is_dir_output_name(name: &str) -> bool {
    fn lower_hex(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
    if name == OPENSSL_DIR_BUNDLE {
        return true;
    }
    if let Some(hash) = name.strip_suffix(".der") {
        return lower_hex(hash, 64);
    }
    match name.split_once('.') {
        Some((hash, n)) => {
            lower_hex(hash, 8)
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && (n == "0" || !n.starts_with('0'))
        }
        None => false,
    }
}

fn der_dir(bundle: &Bundle) -> Vec<(String, Vec<u8>)> {
    // Named by fingerprint: unique, and stable while the certificate stays.
    bundle
        .anchors()
        .iter()
        .map(|a| (format!("{}.der", a.fingerprint()), a.der.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::is_dir_output_name;

    #[test]
    fn directory_output_names_are_recognised() {
        for ours in [
            "4042bcee.0",
            "4042bcee.12",
            "ca-certificates.crt",
            &format!("{}.der", "ab".repeat(32)),
        ] {
            assert!(is_dir_output_name(ours), "{ours}");
        }
        for theirs in [
            "ISRG_Root_X1.pem",
            "4042BCEE.0",
            "4042bcee.r0",
            "4042bcee.01",
            "4042bcee.",
            "4042bce.0",
            "java",
            ".hidden",
            &format!("{}.der", "ab".repeat(31)),
        ] {
            assert!(!is_dir_output_name(theirs), "{theirs}");
        }
    }
}
