//! Java truststores: PKCS#12 and JKS, written deterministically.
//!
//! The contract wants every format's bytes to depend only on the certificate
//! set and the password (no timestamp, no random salt, no "now" entry date),
//! so that an unchanged set never rewrites or reloads anything. The usual
//! writers (p12-keystore, the jks crate) draw random salts and stamp entries
//! with the current time, so the two encoders live here, small and exact:
//!
//! - PKCS#12 (RFC 7292): one unencrypted SafeContents of certificate bags,
//!   each with a friendlyName (the alias) and Oracle's trusted-key-usage
//!   attribute, which Java needs to load an entry as a trusted certificate.
//!   Certificates are public, so nothing is encrypted: OpenSSL 3 reads it
//!   without `-legacy`. With a password, an HMAC-SHA-256 MAC whose salt is
//!   derived from the content; with the empty password, no MAC (a
//!   password-less truststore, which Java and OpenSSL both read).
//! - JKS: trusted-certificate entries dated at each certificate's notBefore,
//!   sealed with Java's keyed SHA-1 integrity digest.

use super::format::alias;
use crate::bundle::Bundle;

/// Java's default truststore password.
pub const JKS_DEFAULT_PASSWORD: &str = "changeit";
const MAC_ITERATIONS: u32 = 10_000;

// Object identifiers, DER-encoded contents (without tag and length).
const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
const OID_CERT_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x03,
];
const OID_X509_CERT: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x16, 0x01];
const OID_FRIENDLY_NAME: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x14];
/// 2.16.840.1.113894.746875.1.1: Oracle's "trusted key usage".
const OID_ORACLE_TRUSTED: &[u8] = &[
    0x60, 0x86, 0x48, 0x01, 0x86, 0xf9, 0x66, 0xad, 0xca, 0x7b, 0x01, 0x01,
];
/// 2.5.29.37.0: anyExtendedKeyUsage.
const OID_ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0x00];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];

/// A DER TLV.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

/// A DER SET OF: elements sorted by their encodings.
fn set_of(mut elements: Vec<Vec<u8>>) -> Vec<u8> {
    elements.sort();
    tlv(0x31, &elements.concat())
}

fn oid(content: &[u8]) -> Vec<u8> {
    tlv(0x06, content)
}

fn explicit0(content: &[u8]) -> Vec<u8> {
    tlv(0xa0, content)
}

fn octets(content: &[u8]) -> Vec<u8> {
    tlv(0x04, content)
}

fn integer(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let mut start = bytes.iter().take_while(|b| **b == 0).count().min(3);
    // A leading 1 bit would make it negative.
    if bytes[start] & 0x80 != 0 {
        start -= 1;
    }
    let mut content = vec![0u8; usize::from(start == 0 && bytes[0] & 0x80 != 0)];
    content.extend_from_slice(&bytes[start..]);
    tlv(0x02, &content)
}

/// The password as PKCS#12 wants it: BMPString, NUL-terminated.
fn bmp_password(password: &str) -> Vec<u8> {
    let mut out: Vec<u8> = password.encode_utf16().flat_map(u16::to_be_bytes).collect();
    out.extend_from_slice(&[0, 0]);
    out
}

/// RFC 7292 appendix B.2 with SHA-256, for one 32-byte key (ID 3: MAC).
fn pkcs12_mac_key(password: &str, salt: &[u8], iterations: u32) -> Vec<u8> {
    const V: usize = 64;
    let stretch = |input: &[u8]| -> Vec<u8> {
        if input.is_empty() {
            return Vec::new();
        }
        let len = V * input.len().div_ceil(V);
        input.iter().copied().cycle().take(len).collect()
    };
    let mut data = vec![3u8; V];
    data.extend(stretch(salt));
    data.extend(stretch(&bmp_password(password)));
    let mut digest = ring::digest::digest(&ring::digest::SHA256, &data)
        .as_ref()
        .to_vec();
    for _ in 1..iterations {
        digest = ring::digest::digest(&ring::digest::SHA256, &digest)
            .as_ref()
            .to_vec();
    }
    digest
}

/// A PKCS#12 truststore of `bundle`'s certificates.
pub fn pkcs12(bundle: &Bundle, password: &str) -> Vec<u8> {
    let bags: Vec<Vec<u8>> = alias(bundle)
        .map(|(alias, anchor)| {
            let cert_bag = seq(&[&oid(OID_X509_CERT), &explicit0(&octets(&anchor.der))]);
            let name: Vec<u8> = alias.encode_utf16().flat_map(u16::to_be_bytes).collect();
            let attributes = set_of(vec![
                seq(&[&oid(OID_FRIENDLY_NAME), &set_of(vec![tlv(0x1e, &name)])]),
                seq(&[&oid(OID_ORACLE_TRUSTED), &set_of(vec![oid(OID_ANY_EKU)])]),
            ]);
            seq(&[&oid(OID_CERT_BAG), &explicit0(&cert_bag), &attributes])
        })
        .collect();
    let safe_contents = tlv(0x30, &bags.concat());
    let auth_safe = seq(&[&seq(&[&oid(OID_DATA), &explicit0(&octets(&safe_contents))])]);
    let content_info = seq(&[&oid(OID_DATA), &explicit0(&octets(&auth_safe))]);
    let version = integer(3);
    if password.is_empty() {
        return seq(&[&version, &content_info]);
    }
    // A salt that depends only on the content and the password.
    let mut seed = auth_safe.clone();
    seed.extend_from_slice(password.as_bytes());
    let seed_digest = ring::digest::digest(&ring::digest::SHA256, &seed);
    let salt = &seed_digest.as_ref()[..16];
    let key = pkcs12_mac_key(password, salt, MAC_ITERATIONS);
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key),
        &auth_safe,
    );
    let digest_info = seq(&[
        &seq(&[&oid(OID_SHA256), &[0x05, 0x00]]),
        &octets(tag.as_ref()),
    ]);
    let mac_data = seq(&[&digest_info, &octets(salt), &integer(MAC_ITERATIONS)]);
    seq(&[&version, &content_info, &mac_data])
}

/// Java's "modified UTF-8" with a u16 length (aliases are ASCII here).
fn java_utf(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u16).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// A JKS truststore of `bundle`'s certificates.
pub fn jks(bundle: &Bundle, password: &str) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xfeed_feed_u32.to_be_bytes());
    out.extend_from_slice(&2u32.to_be_bytes());
    out.extend_from_slice(&(bundle.len() as u32).to_be_bytes());
    for (alias, anchor) in alias(bundle) {
        out.extend_from_slice(&2u32.to_be_bytes()); // a trusted certificate entry
        java_utf(&mut out, &alias);
        // Dated at notBefore: stable for the certificate, never "now".
        let date_ms = anchor.not_before.max(0) as u64 * 1000;
        out.extend_from_slice(&date_ms.to_be_bytes());
        java_utf(&mut out, "X.509");
        out.extend_from_slice(&(anchor.der.len() as u32).to_be_bytes());
        out.extend_from_slice(&anchor.der);
    }
    // Integrity: SHA-1(password as UTF-16BE || "Mighty Aphrodite" || body).
    let mut keyed: Vec<u8> = password.encode_utf16().flat_map(u16::to_be_bytes).collect();
    keyed.extend_from_slice(b"Mighty Aphrodite");
    keyed.extend_from_slice(&out);
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &keyed);
    out.extend_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_and_integers() {
        assert_eq!(tlv(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        assert_eq!(&tlv(0x04, &[0u8; 200])[..3], &[0x04, 0x81, 200]);
        assert_eq!(&tlv(0x04, &[0u8; 300])[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(integer(3), vec![0x02, 1, 3]);
        assert_eq!(integer(10_000), vec![0x02, 2, 0x27, 0x10]);
        assert_eq!(integer(200), vec![0x02, 2, 0x00, 0xc8]);
    }

    #[test]
    fn empty_password_is_a_bare_terminator() {
        assert_eq!(bmp_password(""), vec![0, 0]);
        assert_eq!(bmp_password("ab"), vec![0, b'a', 0, b'b', 0, 0]);
    }
}
