//! The bytes of each output format. Pure functions of the certificate set.

use super::{Format, Rendered, keystore};
use crate::bundle::subject_hash::hash_hex;
use crate::bundle::{Bundle, DigestMap};
use crate::source::pem;

/// The PEM label of a certificate.
const CERTIFICATE: &str = "CERTIFICATE";

/// The bundle file inside a hashed directory, as Debian names it.
pub const OPENSSL_DIR_BUNDLE: &str = "ca-certificates.crt";

/// [`render`], taking the PEM of each certificate that `before` (the
/// bundle `before`'s bytes were rendered from) already holds from those
/// bytes instead of encoding it again: a swap in one of a thousand sources
/// encodes one certificate, not a thousand.
pub fn render_after(
    bundle: &Bundle,
    format: &Format,
    before: Option<(&Bundle, &Rendered)>,
) -> Rendered {
    match (format, before) {
        (Format::Pem, Some((old, Rendered::File(bytes)))) => {
            Rendered::File(pem_bundle_after(bundle, old, bytes))
        }
        _ => render(bundle, format),
    }
}

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
            .map(|a| pem::encoded_len(CERTIFICATE, a.der.len()))
            .sum(),
    );
    for anchor in bundle.anchors() {
        pem::encode(CERTIFICATE, &anchor.der, &mut out);
    }
    out
}

/// [`pem_bundle`] of `bundle`, where `bytes` is [`pem_bundle`] of `old`.
fn pem_bundle_after(bundle: &Bundle, old: &Bundle, bytes: &[u8]) -> Vec<u8> {
    // Where each certificate of `old` sits in `bytes`: a block's length
    // follows from its DER's.
    let mut at = DigestMap::with_capacity_and_hasher(old.len(), Default::default());
    let mut start = 0;
    for anchor in old.anchors() {
        let end = start + pem::encoded_len(CERTIFICATE, anchor.der.len());
        at.insert(anchor.sha256, start..end);
        start = end;
    }
    if start != bytes.len() {
        // Not the bytes of `old`: encode everything.
        return pem_bundle(bundle);
    }
    let mut out = Vec::with_capacity(bytes.len());
    for anchor in bundle.anchors() {
        match at.get(&anchor.sha256) {
            // A block of `old`'s bytes begins where its certificate's does.
            Some(range) if bytes[range.clone()].starts_with(b"-----BEGIN CERTIFICATE-----\n") => {
                out.extend_from_slice(&bytes[range.clone()]);
            }
            Some(_) => return pem_bundle(bundle),
            None => pem::encode(CERTIFICATE, &anchor.der, &mut out),
        }
    }
    out
}

/// `<hash>.N` numbered contiguously from 0 per hash (OpenSSL's by_dir lookup
/// stops at the first gap), in the bundle's order, so the names are stable
/// for a given set.
fn openssl_dir(bundle: &Bundle) -> Vec<(String, Vec<u8>)> {
    // Each certificate's hash and PEM, on all cores in one pass (ten
    // thousand of them); each is encoded once, for its file and its part
    // of the bundle file. The numbering goes in order, on one thread.
    let encoded = crate::parallel::map(bundle.anchors(), |anchor| {
        let mut body = Vec::with_capacity(pem::encoded_len(CERTIFICATE, anchor.der.len()));
        pem::encode(CERTIFICATE, &anchor.der, &mut body);
        (anchor.subject_hash(), body)
    });
    let mut all = Vec::with_capacity(encoded.iter().map(|(_, body)| body.len()).sum());
    for (_, body) in &encoded {
        all.extend_from_slice(body);
    }
    let mut counts: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    let mut files: Vec<(String, Vec<u8>)> = Vec::with_capacity(encoded.len() + 1);
    for (hash, body) in encoded {
        let n = counts.entry(hash).or_insert(0);
        files.push((format!("{}.{}", hash_hex(hash), *n), body));
        *n += 1;
    }
    files.push((OPENSSL_DIR_BUNDLE.to_owned(), all));
    files.sort_unstable_by(|a, b| a.0.cmp(&b.0));
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
        .map(|a| (format!("{}.der", a.fingerprint()), a.der.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Anchor;
    use crate::bundle::tests::ca_block;

    /// An output's bytes are a function of its certificates, in the
    /// bundle's order, and its spec alone: `render.rs` writes nothing when
    /// an output's certificates are those it was last rendered from. Two
    /// bundles parsed apart from the same certificates, found in other
    /// files and in another order, two of them with one subject (a `.1` in
    /// the hashed directory), render to the same bytes in every format.
    #[test]
    fn every_format_is_a_function_of_the_certificates_alone() {
        let blocks = [
            ca_block("One subject"),
            ca_block("One subject"),
            ca_block("Other"),
        ];
        let parse = |order: [usize; 3], file: &str| {
            Bundle::new(
                order
                    .iter()
                    .enumerate()
                    .map(|(index, &b)| {
                        Anchor::parse(&blocks[b], std::path::Path::new(file).into(), index)
                            .expect("parse")
                    })
                    .collect(),
            )
        };
        let one = parse([0, 1, 2], "a.pem");
        let two = parse([2, 1, 0], "other/b.pem");
        assert!(one.same_certificates(&two));
        let formats = [
            Format::Pem,
            Format::OpensslDir,
            Format::DerDir,
            Format::Pkcs12 {
                password: String::new(),
            },
            Format::Pkcs12 {
                password: "secret".into(),
            },
            Format::Jks {
                password: "changeit".into(),
            },
        ];
        for format in &formats {
            assert!(render(&one, format) == render(&two, format), "{format:?}");
        }
        let Rendered::Dir(files) = render(&one, &Format::OpensslDir) else {
            panic!("a hashed directory is a directory");
        };
        assert!(
            files.iter().any(|(name, _)| name.ends_with(".1")),
            "{files:?}"
        );
    }

    fn anchors(names: &[&str]) -> Vec<Anchor> {
        names
            .iter()
            .map(|n| {
                Anchor::parse(&ca_block(n), std::path::Path::new("t.pem").into(), 0).expect("parse")
            })
            .collect()
    }

    #[test]
    fn a_render_after_another_takes_the_certificates_it_had_and_encodes_the_new() {
        let [a, b, c, d] = <[Anchor; 4]>::try_from(anchors(&["A", "B", "C", "D"])).expect("4");
        let old = Bundle::new(vec![a.clone(), b.clone(), c.clone()]);
        let old_bytes = render(&old, &Format::Pem);
        // One went, one came, the rest moved in the order.
        let new = Bundle::new(vec![d, c, a]);
        let after = render_after(&new, &Format::Pem, Some((&old, &old_bytes)));
        assert_eq!(after, render(&new, &Format::Pem));
        // Bytes that are not the old bundle's: everything is encoded.
        let other = render(&Bundle::new(vec![b]), &Format::Pem);
        let after = render_after(&new, &Format::Pem, Some((&old, &other)));
        assert_eq!(after, render(&new, &Format::Pem));
        // Not PEM at all, though of the same length: not copied either.
        let Rendered::File(pem) = &old_bytes else {
            panic!("a file")
        };
        let binary = Rendered::File(vec![0x30; pem.len()]);
        let after = render_after(&new, &Format::Pem, Some((&old, &binary)));
        assert_eq!(after, render(&new, &Format::Pem));
    }

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
