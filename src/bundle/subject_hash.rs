//! OpenSSL's subject-name hash: the `XXXXXXXX` in the `XXXXXXXX.N` names of a
//! hashed certificate directory (`openssl rehash`, `-CApath`).
//!
//! OpenSSL (1.0 and later) looks a CA up in such a directory by hashing the
//! issuer name it wants with `X509_NAME_hash_ex` and opening `<hash>.0`,
//! `<hash>.1`, ... That hash is SHA-1 over a *canonical* re-encoding of the name
//! (`x509_name_canon` in OpenSSL's `crypto/x509/x_name.c`), so this module has
//! to reproduce that encoding bit for bit: a link whose name is off by one bit
//! points at a CA that OpenSSL never finds, and nothing reports it.
//!
//! This module owns the canonical encoding and the hash over it, nothing else.
//! It follows what OpenSSL does when it decodes a certificate, because that is
//! when OpenSSL computes the canonical form (`d2i_X509_NAME`). That includes
//! the names OpenSSL refuses: where its decoder would reject the name, and with
//! it the whole certificate, [`canonical_name`] returns a [`NameError`].

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use ring::digest;
use x509_parser::asn1_rs::{Class, FromDer, Header, Length};

/// OpenSSL decodes at most this much of a Name (`X509_NAME_MAX`, 1 MiB).
const MAX_NAME_LEN: usize = 1024 * 1024;

/// How deeply OpenSSL follows nested BER constructed strings
/// (`ASN1_MAX_STRING_NEST`).
const MAX_STRING_NEST: usize = 5;

// Universal tag numbers this module looks at.
pub(crate) const TAG_BIT_STRING: u32 = 3;
pub(crate) const TAG_OCTET_STRING: u32 = 4;
const TAG_OID: u32 = 6;
const TAG_UTF8_STRING: u32 = 12;
pub(crate) const TAG_SEQUENCE: u32 = 16;
const TAG_SET: u32 = 17;
const TAG_NUMERIC_STRING: u32 = 18;
const TAG_PRINTABLE_STRING: u32 = 19;
const TAG_T61_STRING: u32 = 20;
const TAG_IA5_STRING: u32 = 22;
const TAG_UNIVERSAL_STRING: u32 = 28;
const TAG_BMP_STRING: u32 = 30;

// The identifier octets this module writes: all universal, and the SEQUENCE
// and SET ones constructed.
const DER_BIT_STRING: u8 = 0x03;
const DER_OID: u8 = 0x06;
const DER_UTF8_STRING: u8 = 0x0c;
const DER_SEQUENCE: u8 = 0x30;
const DER_SET: u8 = 0x31;

/// Why a Name has no OpenSSL subject hash: it is not DER that OpenSSL (or this
/// module) can decode, or OpenSSL's decoder would refuse it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    reason: &'static str,
}

impl NameError {
    const fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot compute the OpenSSL subject hash: {}",
            self.reason
        )
    }
}

impl std::error::Error for NameError {}

/// The canonical encoding OpenSSL hashes (`x509_name_canon`), for a DER-encoded
/// X.501 `Name` (the full SEQUENCE TLV).
///
/// It is the DER of each non-empty RelativeDistinguishedName in turn, as a
/// `SET OF AttributeTypeAndValue` with its elements in DER order, concatenated
/// without the outer SEQUENCE header; a name without attributes encodes as
/// nothing at all. Each attribute keeps its OID. A value of one of the string
/// types OpenSSL canonicalises (UTF8String, PrintableString, T61String,
/// IA5String, BMPString, UniversalString) becomes a UTF8String, with leading
/// and trailing ASCII whitespace removed, each inner run of ASCII whitespace
/// replaced by one space and ASCII letters lower-cased; any other value type
/// OpenSSL accepts is kept as it is.
///
/// # Errors
///
/// A [`NameError`] when the bytes are not a Name this module can decode
/// (including indefinite lengths, which DER forbids), or when OpenSSL's decoder
/// would reject the name: a value of a type that OpenSSL's `ASN1_PRINTABLE`
/// does not allow (VisibleString, OCTET STRING, INTEGER, a tagged value, ...),
/// text that is not valid in its declared encoding, a malformed OID.
pub fn canonical_name(name_der: &[u8]) -> Result<Vec<u8>, NameError> {
    if name_der.len() > MAX_NAME_LEN {
        return Err(NameError::new("name longer than OpenSSL's 1 MiB limit"));
    }
    let (name, rest) = read_tlv(name_der)?;
    if !rest.is_empty() {
        return Err(NameError::new("trailing bytes after the name"));
    }
    // OpenSSL decodes the Name and its RDNs with SEQUENCE OF / SET OF
    // templates, which check tag and class but not the constructed bit.
    if name.class != Class::Universal || name.tag != TAG_SEQUENCE {
        return Err(NameError::new("name is not a SEQUENCE"));
    }

    // Canonical forms are usually shorter than the DER (no outer header,
    // lower-cased text in the same number of bytes).
    let mut out = Vec::with_capacity(name_der.len());
    let mut rdns = name.content;
    while !rdns.is_empty() {
        let (rdn, rest) = read_tlv(rdns)?;
        rdns = rest;
        if rdn.class != Class::Universal || rdn.tag != TAG_SET {
            return Err(NameError::new("relative distinguished name is not a SET"));
        }
        let set_start = out.len();
        let mut attributes = 0_usize;
        let mut atvs = rdn.content;
        while !atvs.is_empty() {
            let (atv, rest) = read_tlv(atvs)?;
            atvs = rest;
            push_canonical_attribute(&atv, &mut out)?;
            attributes += 1;
        }
        match attributes {
            // OpenSSL keeps a flat list of attributes, each tagged with the
            // index of its RDN, and regroups them for the canonical form, so
            // an empty RDN leaves no trace, not even an empty SET.
            0 => continue,
            1 => {}
            _ => sort_set_of(&mut out, set_start)?,
        }
        wrap(&mut out, set_start, DER_SET);
    }
    Ok(out)
}

/// The OpenSSL subject hash of a DER-encoded X.501 Name (the full SEQUENCE TLV,
/// as x509-parser's `X509Name::as_raw()` returns it): what
/// `openssl x509 -noout -subject_hash` prints, as a number.
///
/// It is the first four bytes of the SHA-1 of [`canonical_name`], read
/// little-endian.
///
/// A name [`canonical_name`] rejects hashes to 0, which is also what
/// `X509_NAME_hash_ex` returns when it cannot encode a name. OpenSSL itself
/// never gets that far: it refuses to load a certificate with such a name, so
/// no certificate that OpenSSL can use hashes to 0 here by mistake. Call
/// [`canonical_name`] to tell the two apart.
pub fn subject_hash(name_der: &[u8]) -> u32 {
    canonical_name(name_der).map_or(0, |canonical| {
        let digest = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, &canonical);
        let md = digest.as_ref();
        u32::from_le_bytes([md[0], md[1], md[2], md[3]])
    })
}

/// The `%08x` form of a hash, as used in hashed directory names.
pub fn hash_hex(hash: u32) -> String {
    format!("{hash:08x}")
}

/// One BER/DER element, with a definite length (also what a key pair's
/// check reads a private key with, `keypair.rs`).
pub(crate) struct Tlv<'a> {
    pub class: Class,
    pub constructed: bool,
    pub tag: u32,
    pub content: &'a [u8],
    /// The whole element, identifier and length octets included.
    pub raw: &'a [u8],
}

impl Tlv<'_> {
    /// A universal element with this tag number.
    pub fn is_universal(&self, tag: u32) -> bool {
        self.class == Class::Universal && self.tag == tag
    }
}

/// Splits the first element off `input`.
pub(crate) fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), NameError> {
    // asn1-rs's DER header parser accepts non-minimal definite lengths, as
    // OpenSSL's decoder does; it rejects indefinite ones, as x509-parser does.
    let (after_header, header) =
        Header::from_der(input).map_err(|_| NameError::new("malformed ASN.1 header"))?;
    let Length::Definite(len) = header.length() else {
        return Err(NameError::new("indefinite length"));
    };
    if len > after_header.len() {
        return Err(NameError::new("element longer than the data holding it"));
    }
    let header_len = input.len() - after_header.len();
    let (raw, rest) = input.split_at(header_len + len);
    let tlv = Tlv {
        class: header.class(),
        constructed: header.is_constructed(),
        tag: header.tag().0,
        content: &raw[header_len..],
        raw,
    };
    Ok((tlv, rest))
}

/// Appends the canonical DER of one AttributeTypeAndValue.
fn push_canonical_attribute(atv: &Tlv<'_>, out: &mut Vec<u8>) -> Result<(), NameError> {
    // X509_NAME_ENTRY is a plain SEQUENCE to OpenSSL, whose decoder does
    // require the constructed bit there.
    if atv.class != Class::Universal || atv.tag != TAG_SEQUENCE || !atv.constructed {
        return Err(NameError::new("attribute is not a SEQUENCE"));
    }
    if atv.content.is_empty() {
        return Err(NameError::new("attribute without a type"));
    }
    let (oid, rest) = read_tlv(atv.content)?;
    if oid.class != Class::Universal || oid.tag != TAG_OID || oid.constructed {
        return Err(NameError::new("attribute type is not an OBJECT IDENTIFIER"));
    }
    check_oid(oid.content)?;
    if rest.is_empty() {
        return Err(NameError::new("attribute without a value"));
    }
    let (value, rest) = read_tlv(rest)?;
    if !rest.is_empty() {
        return Err(NameError::new("attribute has more than a type and a value"));
    }

    let start = out.len();
    // OpenSSL re-encodes the OID from its decoded form, so the length is
    // written the DER way even if the input used a longer form.
    push_header(out, DER_OID, oid.content.len());
    out.extend_from_slice(oid.content);
    push_canonical_value(&value, out)?;
    wrap(out, start, DER_SEQUENCE);
    Ok(())
}

/// Rejects what `c2i_ASN1_OBJECT` rejects: an empty OID, a last octet that
/// promises more, and a sub-identifier padded with a leading 0x80 octet.
fn check_oid(content: &[u8]) -> Result<(), NameError> {
    match content.last() {
        None => return Err(NameError::new("empty OBJECT IDENTIFIER")),
        Some(last) if last & 0x80 != 0 => {
            return Err(NameError::new("truncated OBJECT IDENTIFIER"));
        }
        Some(_) => {}
    }
    let mut starts_subidentifier = true;
    for &octet in content {
        if starts_subidentifier && octet == 0x80 {
            return Err(NameError::new("padded OBJECT IDENTIFIER sub-identifier"));
        }
        starts_subidentifier = octet & 0x80 == 0;
    }
    Ok(())
}

/// What OpenSSL does with an attribute value, by its universal tag.
enum ValueKind {
    /// Converted to a canonical UTF8String (`asn1_string_canon`).
    Text(Charset),
    /// Stored as a bit string, so re-encoded with its unused bits cleared.
    BitString,
    /// Stored as its whole original encoding and written back unchanged.
    Sequence,
    /// Stored as its content octets and written back as a primitive with the
    /// same tag.
    Opaque(u8),
}

/// How the content octets of a text value map to characters.
enum Charset {
    /// One octet per character, its code point (`ASN1_STRING_to_UTF8` treats
    /// PrintableString, T61String and IA5String this way, whatever their
    /// nominal character sets say).
    Latin1,
    /// BMPString: UCS-2, big-endian.
    Ucs2,
    /// UniversalString: UCS-4, big-endian.
    Ucs4,
    Utf8,
}

/// The value types OpenSSL accepts in a Name, and what it does with each.
///
/// An X509_NAME_ENTRY value is an `ASN1_PRINTABLE`, which takes the universal
/// tags whose `ASN1_tag2bit()` bit is in `B_ASN1_PRINTABLE`; everything else
/// fails to decode. Notably that leaves out VisibleString, although
/// `asn1_string_canon` would canonicalise one, and OCTET STRING.
fn value_kind(tag: u32) -> Option<ValueKind> {
    let kind = match tag {
        TAG_UTF8_STRING => ValueKind::Text(Charset::Utf8),
        TAG_PRINTABLE_STRING | TAG_T61_STRING | TAG_IA5_STRING => ValueKind::Text(Charset::Latin1),
        TAG_BMP_STRING => ValueKind::Text(Charset::Ucs2),
        TAG_UNIVERSAL_STRING => ValueKind::Text(Charset::Ucs4),
        TAG_BIT_STRING => ValueKind::BitString,
        TAG_SEQUENCE => ValueKind::Sequence,
        // NumericString is allowed but not canonicalised; the rest are the
        // tags `ASN1_tag2bit()` maps to B_ASN1_UNKNOWN, kept as opaque strings.
        // (ENUMERATED, 10, was one of those up to OpenSSL 1.1.1; OpenSSL 3
        // rejects it, and so does this module.)
        TAG_NUMERIC_STRING | 7 | 8 | 9 | 11 | 13 | 14 | 15 | 29 => {
            ValueKind::Opaque(u8::try_from(tag).ok()?)
        }
        _ => return None,
    };
    Some(kind)
}

/// Appends the canonical DER of an attribute value.
fn push_canonical_value(value: &Tlv<'_>, out: &mut Vec<u8>) -> Result<(), NameError> {
    if value.class != Class::Universal {
        return Err(NameError::new("attribute value is not of a universal type"));
    }
    let Some(kind) = value_kind(value.tag) else {
        return Err(NameError::new(
            "attribute value of a type OpenSSL does not accept in a name",
        ));
    };
    match kind {
        ValueKind::Sequence => {
            if !value.constructed {
                return Err(NameError::new("primitive SEQUENCE as attribute value"));
            }
            out.extend_from_slice(value.raw);
            Ok(())
        }
        ValueKind::Text(charset) => push_canonical_text(&charset, &string_content(value)?, out),
        ValueKind::BitString => push_bit_string(&string_content(value)?, out),
        ValueKind::Opaque(tag) => {
            let content = string_content(value)?;
            push_header(out, tag, content.len());
            out.extend_from_slice(&content);
            Ok(())
        }
    }
}

/// The content octets of a string value. A constructed string (BER, not DER)
/// is decoded by OpenSSL as the concatenation of its segments, then treated
/// like the primitive form.
fn string_content<'a>(value: &Tlv<'a>) -> Result<Cow<'a, [u8]>, NameError> {
    if !value.constructed {
        return Ok(Cow::Borrowed(value.content));
    }
    let mut collected = Vec::new();
    collect_segments(value.content, 0, &mut collected)?;
    Ok(Cow::Owned(collected))
}

/// Concatenates the primitive segments of a constructed string, like
/// OpenSSL's `asn1_collect`, which accepts segments of any tag.
fn collect_segments(mut content: &[u8], depth: usize, out: &mut Vec<u8>) -> Result<(), NameError> {
    while !content.is_empty() {
        if content.starts_with(&[0, 0]) {
            return Err(NameError::new(
                "end-of-contents inside a definite-length string",
            ));
        }
        let (segment, rest) = read_tlv(content)?;
        content = rest;
        if segment.constructed {
            if depth >= MAX_STRING_NEST {
                return Err(NameError::new("constructed string nested too deeply"));
            }
            collect_segments(segment.content, depth + 1, out)?;
        } else {
            out.extend_from_slice(segment.content);
        }
    }
    Ok(())
}

/// Appends a text value as the canonical UTF8String of `asn1_string_canon`.
fn push_canonical_text(
    charset: &Charset,
    content: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), NameError> {
    let start = out.len();
    let mut canon = Canonicaliser::new(out);
    match charset {
        Charset::Latin1 => content
            .iter()
            .for_each(|&octet| canon.push_char(char::from(octet))),
        Charset::Ucs2 => {
            let units = content.chunks_exact(2);
            if !units.remainder().is_empty() {
                return Err(NameError::new("BMPString of odd length"));
            }
            for unit in units {
                let code = u32::from(u16::from_be_bytes([unit[0], unit[1]]));
                // OpenSSL refuses surrogates rather than pairing them.
                let c =
                    char::from_u32(code).ok_or(NameError::new("BMPString holds a surrogate"))?;
                canon.push_char(c);
            }
        }
        Charset::Ucs4 => {
            let units = content.chunks_exact(4);
            if !units.remainder().is_empty() {
                return Err(NameError::new("UniversalString length not a multiple of 4"));
            }
            for unit in units {
                let code = u32::from_be_bytes([unit[0], unit[1], unit[2], unit[3]]);
                let c = char::from_u32(code).ok_or(NameError::new(
                    "UniversalString holds an invalid code point",
                ))?;
                canon.push_char(c);
            }
        }
        Charset::Utf8 => {
            // OpenSSL's UTF8_getc and is_unicode_valid accept exactly what Rust
            // calls valid UTF-8 (no overlong forms, surrogates or code points
            // above U+10FFFF), then copy the octets unchanged.
            let text =
                std::str::from_utf8(content).map_err(|_| NameError::new("invalid UTF8String"))?;
            text.bytes().for_each(|octet| canon.push_octet(octet));
        }
    }
    wrap(out, start, DER_UTF8_STRING);
    Ok(())
}

/// The whitespace and case folding of `asn1_string_canon`, applied to UTF-8
/// octets as they are produced.
struct Canonicaliser<'a> {
    out: &'a mut Vec<u8>,
    /// A non-space octet has been written: whitespace is no longer leading.
    seen_text: bool,
    /// Whitespace came after text; it becomes one space if more text follows
    /// and is dropped if the value ends first.
    pending_space: bool,
}

impl<'a> Canonicaliser<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Self {
            out,
            seen_text: false,
            pending_space: false,
        }
    }

    fn push_char(&mut self, c: char) {
        let mut utf8 = [0; 4];
        c.encode_utf8(&mut utf8)
            .bytes()
            .for_each(|octet| self.push_octet(octet));
    }

    fn push_octet(&mut self, octet: u8) {
        if is_openssl_space(octet) {
            self.pending_space = self.seen_text;
            return;
        }
        if self.pending_space {
            self.out.push(b' ');
            self.pending_space = false;
        }
        // Only A-Z change; octets of multi-byte UTF-8 sequences are >= 0x80
        // and pass through, as in OpenSSL.
        self.out.push(octet.to_ascii_lowercase());
        self.seen_text = true;
    }
}

/// `ossl_isspace`: the C locale's whitespace. Unlike
/// `u8::is_ascii_whitespace`, it includes vertical tab (0x0b).
const fn is_openssl_space(octet: u8) -> bool {
    matches!(octet, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// Appends a BIT STRING the way OpenSSL re-encodes one it has decoded: the bits
/// beyond the declared unused count are cleared, and an empty bit string loses
/// its unused-bit count.
fn push_bit_string(content: &[u8], out: &mut Vec<u8>) -> Result<(), NameError> {
    let Some((&unused, bits)) = content.split_first() else {
        return Err(NameError::new("empty BIT STRING"));
    };
    if unused > 7 {
        return Err(NameError::new("BIT STRING with more than 7 unused bits"));
    }
    match bits.split_last() {
        None => out.extend_from_slice(&[DER_BIT_STRING, 1, 0]),
        Some((&last, init)) => {
            push_header(out, DER_BIT_STRING, content.len());
            out.push(unused);
            out.extend_from_slice(init);
            out.push(last & (0xff << unused));
        }
    }
    Ok(())
}

/// Sorts the elements of the SET OF that starts at `start` and runs to the end
/// of `out` into DER order, as OpenSSL's encoder does (`der_cmp`: `memcmp` over
/// the shorter length, then the shorter first, which is how Rust orders byte
/// slices).
fn sort_set_of(out: &mut Vec<u8>, start: usize) -> Result<(), NameError> {
    // Only multi-valued RDNs get here, and they are rare: finding the elements
    // again in what was just written beats tracking them for every RDN.
    let mut elements: Vec<Range<usize>> = Vec::new();
    let mut pos = start;
    while pos < out.len() {
        let (element, _) = read_tlv(&out[pos..])?;
        elements.push(pos..pos + element.raw.len());
        pos += element.raw.len();
    }
    elements.sort_by(|a, b| out[a.clone()].cmp(&out[b.clone()]));
    if elements
        .windows(2)
        .all(|pair| pair[0].start < pair[1].start)
    {
        return Ok(());
    }
    let end = out.len();
    for element in elements {
        out.extend_from_within(element);
    }
    out.drain(start..end);
    Ok(())
}

/// Turns `out[start..]` into the content of a DER element with identifier
/// octet `tag` by inserting the header in front of it.
fn wrap(out: &mut Vec<u8>, start: usize, tag: u8) {
    let (header, header_len) = der_header(tag, out.len() - start);
    out.splice(start..start, header[..header_len].iter().copied());
}

fn push_header(out: &mut Vec<u8>, tag: u8, len: usize) {
    let (header, header_len) = der_header(tag, len);
    out.extend_from_slice(&header[..header_len]);
}

/// Identifier octet and DER length octets (short form below 128, else the
/// long form with as few octets as possible).
fn der_header(tag: u8, len: usize) -> ([u8; 2 + size_of::<usize>()], usize) {
    let mut header = [0; 2 + size_of::<usize>()];
    header[0] = tag;
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => {
            header[1] = short;
            (header, 2)
        }
        _ => {
            let be = len.to_be_bytes();
            let skip = be.iter().take_while(|&&octet| octet == 0).count();
            let len_octets = be.len() - skip;
            // At most size_of::<usize>(), so it fits in the low 7 bits.
            header[1] = 0x80 | len_octets as u8;
            header[2..2 + len_octets].copy_from_slice(&be[skip..]);
            (header, 2 + len_octets)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::X509Certificate;

    // ---- DER building blocks for hand-made names ----

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const OU: &[u8] = &[0x55, 0x04, 0x0b];
    const O: &[u8] = &[0x55, 0x04, 0x0a];

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        push_header(&mut out, tag, content.len());
        out.extend_from_slice(content);
        out
    }

    fn seq(tag: u8, parts: &[Vec<u8>]) -> Vec<u8> {
        tlv(tag, &parts.concat())
    }

    fn name(rdns: &[Vec<u8>]) -> Vec<u8> {
        seq(0x30, rdns)
    }

    fn rdn(atvs: &[Vec<u8>]) -> Vec<u8> {
        seq(0x31, atvs)
    }

    fn atv(oid: &[u8], value: Vec<u8>) -> Vec<u8> {
        seq(0x30, &[tlv(0x06, oid), value])
    }

    fn utf8(s: &str) -> Vec<u8> {
        tlv(0x0c, s.as_bytes())
    }

    /// A name with one single-valued RDN: CN = `value`.
    fn cn(value: Vec<u8>) -> Vec<u8> {
        name(&[rdn(&[atv(CN, value)])])
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    // ---- talking to the openssl binary ----

    /// The comparisons with OpenSSL are the point of these tests: openssl is
    /// a declared test dependency (scripts/install-test-deps), so a machine
    /// without it fails them instead of passing them unchecked.
    #[track_caller]
    fn require_openssl() {
        let found = Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|out| out.status.success());
        assert!(
            found,
            "no usable `openssl` on PATH: run scripts/install-test-deps"
        );
    }

    /// `openssl x509 -noout -subject_hash` for each certificate, run from one
    /// shell loop; `None` where openssl could not load the certificate. Each
    /// openssl process takes some 30 ms to start, so this is for small sets.
    fn openssl_x509_hashes(ders: &[Vec<u8>]) -> Vec<Option<u32>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let files: Vec<PathBuf> = ders
            .iter()
            .enumerate()
            .map(|(i, der)| {
                let path = dir.path().join(format!("{i:04}.der"));
                fs::write(&path, der).expect("write certificate");
                path
            })
            .collect();
        let script = r#"for f; do openssl x509 -noout -subject_hash -inform DER -in "$f" 2>/dev/null || echo FAILED; done"#;
        let out = Command::new("sh")
            .args(["-c", script, "sh"])
            .args(&files)
            .output()
            .expect("run sh");
        assert!(out.status.success(), "shell loop failed: {out:?}");
        let stdout = String::from_utf8(out.stdout).expect("openssl output is ASCII");
        let hashes: Vec<Option<u32>> = stdout
            .lines()
            .map(|line| u32::from_str_radix(line.trim(), 16).ok())
            .collect();
        assert_eq!(
            hashes.len(),
            ders.len(),
            "one line per certificate expected:\n{stdout}"
        );
        hashes
    }

    /// The subject hashes of many certificates from a single `openssl rehash`
    /// run (which calls the same `X509_subject_name_hash` as `openssl x509
    /// -subject_hash`): each certificate goes into its own PEM file and the
    /// `<hash>.N` link pointing to it names its hash. `None` where openssl could
    /// not load the certificate.
    fn openssl_rehash_hashes(ders: &[Vec<u8>]) -> Vec<Option<u32>> {
        use base64::Engine as _;

        let dir = tempfile::tempdir().expect("temp dir");
        for (i, der) in ders.iter().enumerate() {
            let base64 = base64::engine::general_purpose::STANDARD.encode(der);
            let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
            for line in base64.as_bytes().chunks(64) {
                pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                pem.push('\n');
            }
            pem.push_str("-----END CERTIFICATE-----\n");
            fs::write(dir.path().join(format!("{i:06}.pem")), pem).expect("write certificate");
        }
        let out = Command::new("openssl")
            .arg("rehash")
            .arg(dir.path())
            .output()
            .expect("run openssl rehash");
        assert!(out.status.success(), "openssl rehash failed: {out:?}");

        let mut hashes = vec![None; ders.len()];
        for entry in fs::read_dir(dir.path()).expect("read temp dir") {
            let path = entry.expect("directory entry").path();
            let Ok(target) = fs::read_link(&path) else {
                continue;
            };
            let link = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("link name");
            let hash = u32::from_str_radix(&link[..8], 16).expect("hash link name");
            let target = target.to_str().expect("link target");
            let i: usize = target
                .trim_end_matches(".pem")
                .parse()
                .expect("link target");
            hashes[i] = Some(hash);
        }
        // rehash links only the first of identical certificates.
        for i in 0..ders.len() {
            if hashes[i].is_none() {
                hashes[i] = (0..i).find(|&j| ders[j] == ders[i]).and_then(|j| hashes[j]);
            }
        }
        hashes
    }

    fn subject_of(cert_der: &[u8]) -> Vec<u8> {
        let (_, cert) =
            X509Certificate::from_der(cert_der).expect("x509-parser parses the certificate");
        cert.subject().as_raw().to_vec()
    }

    // ---- 1. the system bundle ----

    const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

    #[test]
    fn matches_openssl_on_system_bundle() {
        let bundle = Path::new(SYSTEM_BUNDLE);
        if !bundle.exists() {
            eprintln!("NOTE: {SYSTEM_BUNDLE} not found; skipping");
            return;
        }
        require_openssl();
        let ders: Vec<Vec<u8>> = CertificateDer::pem_file_iter(bundle)
            .expect("open bundle")
            .map(|cert| cert.expect("PEM block").to_vec())
            .collect();
        assert!(!ders.is_empty(), "no certificates in {SYSTEM_BUNDLE}");

        let theirs = openssl_rehash_hashes(&ders);
        let mut mismatches = Vec::new();
        for (i, (der, theirs)) in ders.iter().zip(&theirs).enumerate() {
            let subject = subject_of(der);
            let ours = canonical_name(&subject).map(|_| subject_hash(&subject));
            if ours.as_ref().ok() != theirs.as_ref() {
                mismatches.push(format!(
                    "#{i}: ours {ours:x?}, openssl {theirs:x?}, subject {}",
                    hex(&subject)
                ));
            }
        }
        assert!(
            mismatches.is_empty(),
            "mismatches:\n{}",
            mismatches.join("\n")
        );

        // `openssl x509 -subject_hash` itself, on a sample, agrees too.
        let sample: Vec<Vec<u8>> = ders.iter().step_by(12).cloned().collect();
        let sample_theirs: Vec<Option<u32>> = theirs.iter().step_by(12).copied().collect();
        assert_eq!(openssl_x509_hashes(&sample), sample_theirs);
        eprintln!(
            "compared {} certificates from {SYSTEM_BUNDLE} with openssl rehash, {} of them also with openssl x509",
            ders.len(),
            sample.len()
        );
    }

    /// The `XXXXXXXX.N` links that `openssl rehash` (run by update-ca-certificates)
    /// made in /etc/ssl/certs name the hash of the certificate they point to.
    #[test]
    fn matches_rehash_links_in_etc_ssl_certs() {
        let Ok(entries) = fs::read_dir("/etc/ssl/certs") else {
            eprintln!("NOTE: no /etc/ssl/certs; skipping");
            return;
        };
        let mut checked = 0;
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some((hash, n)) = file_name.split_once('.') else {
                continue;
            };
            if hash.len() != 8 || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(expected) = u32::from_str_radix(hash, 16) else {
                continue;
            };
            let der = CertificateDer::from_pem_file(&path).expect("certificate PEM");
            assert_eq!(
                hash_hex(subject_hash(&subject_of(&der))),
                hash_hex(expected),
                "{}",
                path.display()
            );
            checked += 1;
        }
        eprintln!("checked {checked} hash links in /etc/ssl/certs");
    }

    #[test]
    fn isrg_root_x1() {
        let path = Path::new("/etc/ssl/certs/4042bcee.0");
        if !path.exists() {
            eprintln!("NOTE: {} not found; skipping", path.display());
            return;
        }
        let der = CertificateDer::from_pem_file(path).expect("ISRG Root X1 PEM");
        let hash = subject_hash(&subject_of(&der));
        assert_eq!(hash, 0x4042_bcee);
        assert_eq!(hash_hex(hash), "4042bcee");
    }

    // ---- 2. certificates made by openssl and rcgen ----

    /// A subject for `openssl req -subj`, the string_mask to encode it with,
    /// extra flags, and the string tags the subject must end up containing
    /// (checked, so that the corpus really covers those types).
    struct ReqCase {
        subj: &'static str,
        mask: &'static str,
        flags: &'static [&'static str],
        must_contain: &'static [u32],
    }

    const REQ_CASES: &[ReqCase] = &[
        ReqCase {
            subj: "/CN=MiXeD CaSe/O=ACME Corp",
            mask: "utf8only",
            flags: &[],
            must_contain: &[TAG_UTF8_STRING],
        },
        ReqCase {
            subj: "/CN=MiXeD CaSe/O=ACME Corp",
            mask: "default",
            flags: &[],
            must_contain: &[TAG_PRINTABLE_STRING],
        },
        ReqCase {
            subj: "/CN=  many    spaces  /O=x",
            mask: "utf8only",
            flags: &[],
            must_contain: &[TAG_UTF8_STRING],
        },
        ReqCase {
            subj: "/CN=  many    spaces  /O=x",
            mask: "default",
            flags: &[],
            must_contain: &[TAG_PRINTABLE_STRING],
        },
        ReqCase {
            subj: "/CN=\ttab\t and\t\tTAB \t/O=line\nfeed\r\x0bvt\x0cff",
            mask: "utf8only",
            flags: &[],
            must_contain: &[TAG_UTF8_STRING],
        },
        ReqCase {
            subj: "/CN=\ttab\t and\t\tTAB \t/O=x",
            mask: "default",
            flags: &[],
            must_contain: &[TAG_T61_STRING],
        },
        ReqCase {
            subj: "/CN=a+OU=b/O=c",
            mask: "utf8only",
            flags: &["-multivalue-rdn"],
            must_contain: &[],
        },
        ReqCase {
            subj: "/OU=b+CN=a/O=c",
            mask: "utf8only",
            flags: &["-multivalue-rdn"],
            must_contain: &[],
        },
        ReqCase {
            subj: "/CN=Zz+CN=aa+CN=B/O=c",
            mask: "default",
            flags: &["-multivalue-rdn"],
            must_contain: &[],
        },
        ReqCase {
            subj: "/CN=Zürich Ünïcödé CA/O=株式会社",
            mask: "utf8only",
            flags: &["-utf8"],
            must_contain: &[TAG_UTF8_STRING],
        },
        ReqCase {
            subj: "/CN=Zürich Ünïcödé CA/O=株式会社",
            mask: "default",
            flags: &["-utf8"],
            must_contain: &[TAG_T61_STRING, TAG_BMP_STRING],
        },
        ReqCase {
            subj: "/CN=ZÜRICH/O=x",
            mask: "nombstr",
            flags: &["-utf8"],
            must_contain: &[TAG_T61_STRING],
        },
        ReqCase {
            subj: "/CN=株式会社 ＡＢＣ/O=Plain",
            mask: "pkix",
            flags: &["-utf8"],
            must_contain: &[TAG_BMP_STRING, TAG_PRINTABLE_STRING],
        },
        ReqCase {
            subj: "/CN=Plain Printable/O=under_score & at@",
            mask: "default",
            flags: &[],
            must_contain: &[TAG_PRINTABLE_STRING, TAG_T61_STRING],
        },
        ReqCase {
            subj: "/CN=Admin/emailAddress=Admin@Example.COM",
            mask: "utf8only",
            flags: &[],
            must_contain: &[TAG_IA5_STRING],
        },
        ReqCase {
            subj: "/DC=Example/DC=COM/CN=Host",
            mask: "utf8only",
            flags: &[],
            must_contain: &[TAG_IA5_STRING],
        },
        ReqCase {
            subj: "/CN=x/serialNumber=ABC 0123/C=DE",
            mask: "utf8only",
            flags: &[],
            must_contain: &[TAG_PRINTABLE_STRING],
        },
        ReqCase {
            subj: "/",
            mask: "utf8only",
            flags: &[],
            must_contain: &[],
        },
    ];

    fn string_tags(name_der: &[u8]) -> Vec<u32> {
        let (_, name) =
            x509_parser::x509::X509Name::from_der(name_der).expect("x509-parser parses the name");
        name.iter_rdn()
            .flat_map(|rdn| rdn.iter())
            .map(|atv| atv.attr_value().header.tag().0)
            .collect()
    }

    #[test]
    fn matches_openssl_on_openssl_req_certificates() {
        require_openssl();
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("key.pem");
        let status = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
            ])
            .arg(&key)
            .output()
            .expect("run openssl genpkey")
            .status;
        assert!(status.success());

        let mut ders = Vec::new();
        for (i, case) in REQ_CASES.iter().enumerate() {
            let config = dir.path().join(format!("{i}.cnf"));
            fs::write(
                &config,
                format!(
                    "[req]\ndistinguished_name = dn\nstring_mask = {}\n[dn]\n",
                    case.mask
                ),
            )
            .expect("write config");
            let pem = dir.path().join(format!("{i}.pem"));
            let out = Command::new("openssl")
                .args(["req", "-x509", "-new", "-days", "1", "-key"])
                .arg(&key)
                .arg("-config")
                .arg(&config)
                .args(["-subj", case.subj])
                .args(case.flags)
                .arg("-out")
                .arg(&pem)
                .output()
                .expect("run openssl req");
            assert!(
                out.status.success(),
                "openssl req -subj {:?}: {}",
                case.subj,
                String::from_utf8_lossy(&out.stderr)
            );
            let der = CertificateDer::from_pem_file(&pem)
                .expect("PEM from openssl req")
                .to_vec();
            let tags = string_tags(&subject_of(&der));
            for tag in case.must_contain {
                assert!(
                    tags.contains(tag),
                    "{:?} ({}): no tag {tag} in {tags:?}",
                    case.subj,
                    case.mask
                );
            }
            ders.push(der);
        }
        compare_with_openssl(&ders);
    }

    /// Checks that `subject_hash` agrees with openssl on each certificate.
    fn compare_with_openssl(ders: &[Vec<u8>]) {
        let theirs = openssl_x509_hashes(ders);
        for (der, theirs) in ders.iter().zip(theirs) {
            let subject = subject_of(der);
            let theirs = theirs.expect("openssl loads the certificate");
            assert_eq!(
                hash_hex(subject_hash(&subject)),
                hash_hex(theirs),
                "subject {} (canonical {:?})",
                hex(&subject),
                canonical_name(&subject).map(|c| hex(&c))
            );
        }
    }

    #[test]
    fn matches_openssl_on_rcgen_string_types() {
        use rcgen::string::{
            BmpString, Ia5String, PrintableString, TeletexString, UniversalString,
        };
        use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};

        require_openssl();
        let values: Vec<Vec<(DnType, DnValue)>> = vec![
            vec![
                (
                    DnType::CommonName,
                    DnValue::BmpString(BmpString::try_from("  BMP  Ärger  Ω ").expect("BMP")),
                ),
                (
                    DnType::OrganizationName,
                    DnValue::UniversalString(
                        UniversalString::try_from("Universal\tÜ 😀 X").expect("UCS-4"),
                    ),
                ),
            ],
            vec![
                (
                    DnType::CommonName,
                    DnValue::TeletexString(
                        TeletexString::try_from(" Teletex   T61 ").expect("T61"),
                    ),
                ),
                (
                    DnType::OrganizationName,
                    DnValue::PrintableString(
                        PrintableString::try_from("PRINTABLE (x) = y/z").expect("printable"),
                    ),
                ),
                (
                    DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
                    DnValue::Ia5String(Ia5String::try_from(" Mail@Example.ORG ").expect("IA5")),
                ),
            ],
            vec![(
                DnType::CommonName,
                DnValue::Utf8String("UTF8  Ça Va ".into()),
            )],
            vec![],
        ];
        let key = KeyPair::generate().expect("key");
        let mut ders = Vec::new();
        for attributes in values {
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            for (ty, value) in attributes {
                dn.push(ty, value);
            }
            params.distinguished_name = dn;
            let cert = params.self_signed(&key).expect("self-signed certificate");
            // Through PEM, as the files anchorage reads are PEM.
            let der = CertificateDer::from_pem_slice(cert.pem().as_bytes())
                .expect("PEM")
                .to_vec();
            ders.push(der);
        }
        let tags: Vec<u32> = ders
            .iter()
            .flat_map(|der| string_tags(&subject_of(der)))
            .collect();
        for tag in [
            TAG_BMP_STRING,
            TAG_UNIVERSAL_STRING,
            TAG_T61_STRING,
            TAG_PRINTABLE_STRING,
            TAG_IA5_STRING,
            TAG_UTF8_STRING,
        ] {
            assert!(tags.contains(&tag), "no tag {tag} in {tags:?}");
        }
        compare_with_openssl(&ders);
    }

    // ---- 2b. hand-made names, spliced into a real certificate ----

    /// `base` with its subject replaced by `name_der` (signature left stale:
    /// `openssl x509 -subject_hash` does not check it).
    fn with_subject(base: &[u8], name_der: &[u8]) -> Vec<u8> {
        let (_, cert) = X509Certificate::from_der(base).expect("base certificate");
        let offset = |part: &[u8]| part.as_ptr() as usize - base.as_ptr() as usize;
        let tbs = cert.tbs_certificate.as_ref();
        let subject = cert.subject().as_raw();
        let (tbs_content, _) = Header::from_der(tbs).expect("TBS header");
        let tbs_content_start = offset(tbs_content);
        let tbs_end = offset(tbs) + tbs.len();
        let subject_start = offset(subject);
        let subject_end = subject_start + subject.len();

        let new_tbs = tlv(
            0x30,
            &[
                &base[tbs_content_start..subject_start],
                name_der,
                &base[subject_end..tbs_end],
            ]
            .concat(),
        );
        tlv(0x30, &[new_tbs.as_slice(), &base[tbs_end..]].concat())
    }

    /// A one-attribute name whose DER is exactly `len` bytes long (`len` well
    /// above 64 KiB, so that all length fields take four octets).
    fn name_of_len(len: usize) -> Vec<u8> {
        let overhead = cn(utf8(&"x".repeat(70_000))).len() - 70_000;
        let name = cn(utf8(&"x".repeat(len - overhead)));
        assert_eq!(name.len(), len);
        name
    }

    fn crafted_names() -> Vec<(&'static str, Vec<u8>)> {
        let t = |tag: u8, content: &[u8]| cn(tlv(tag, content));
        vec![
            ("empty name", name(&[])),
            ("only empty RDNs", name(&[rdn(&[]), rdn(&[])])),
            (
                "empty RDN in between",
                name(&[
                    rdn(&[atv(CN, utf8("a"))]),
                    rdn(&[]),
                    rdn(&[atv(O, utf8("b"))]),
                ]),
            ),
            (
                "whitespace of all kinds",
                cn(utf8("\x0b\x0c A \t\n\r B\x0b\x0cC \r")),
            ),
            ("only whitespace", cn(utf8(" \t \x0b "))),
            ("empty UTF8String", cn(utf8(""))),
            ("NUL and controls", cn(utf8("a\0B\x1f\x7fC"))),
            (
                "non-ASCII kept, NBSP not space",
                cn(utf8("\u{a0}ÄÖ Straße\u{a0}ǅ")),
            ),
            ("upper ASCII only", cn(utf8("ABCXYZ[@`{ abcxyz"))),
            ("UTF8 overlong", t(0x0c, b"a\xc0\xafb")),
            ("UTF8 surrogate", t(0x0c, b"\xed\xa0\x80")),
            ("UTF8 above U+10FFFF", t(0x0c, b"\xf4\x90\x80\x80")),
            ("UTF8 max", t(0x0c, b"\xf4\x8f\xbf\xbf")),
            ("UTF8 truncated", t(0x0c, b"\xe2\x82")),
            ("UTF8 stray continuation", t(0x0c, b"\x80")),
            ("UTF8 U+FFFE", t(0x0c, "\u{fffe}".as_bytes())),
            (
                "PrintableString with high bytes",
                t(0x13, b"Caf\xe9 \xff\x80"),
            ),
            ("T61String Latin-1", t(0x14, b"  Z\xfcrich  \xa0X ")),
            ("IA5String", t(0x16, b"Mail@EXAMPLE.com\x80")),
            ("VisibleString", t(0x1a, b"Visible")),
            ("NumericString", t(0x12, b" 0123  456 ")),
            (
                "BMPString",
                t(
                    0x1e,
                    &[
                        0, b'A', 0, b' ', 0, b' ', 0, b'b', 0x00, 0xc4, 0x26, 0x3a, 0, 0x0b,
                    ],
                ),
            ),
            ("BMPString odd", t(0x1e, &[0, b'A', 0])),
            (
                "BMPString surrogate pair",
                t(0x1e, &[0xd8, 0x3d, 0xde, 0x00]),
            ),
            ("BMPString U+FFFF", t(0x1e, &[0xff, 0xff])),
            (
                "UniversalString",
                t(
                    0x1c,
                    &[0, 0, 0, b'X', 0, 1, 0xf6, 0, 0, 0, 0, b' ', 0, 0, 0, b'Y'],
                ),
            ),
            ("UniversalString bad length", t(0x1c, &[0, 0, b'X'])),
            ("UniversalString above U+10FFFF", t(0x1c, &[0, 0x11, 0, 0])),
            ("UniversalString surrogate", t(0x1c, &[0, 0, 0xdc, 0])),
            ("OCTET STRING", t(0x04, b"octets")),
            ("INTEGER", t(0x02, &[5])),
            ("BOOLEAN", t(0x01, &[0xff])),
            ("NULL", t(0x05, &[])),
            ("OID value", t(0x06, CN)),
            ("UTCTime", t(0x17, b"250101000000Z")),
            ("GeneralizedTime", t(0x18, b"20250101000000Z")),
            ("VideotexString", t(0x15, b"v")),
            ("GraphicString", t(0x19, b"g")),
            ("GeneralString", t(0x1b, b"g")),
            ("ObjectDescriptor", t(0x07, b"Desc  X")),
            ("EXTERNAL primitive", t(0x08, b"x")),
            ("REAL", t(0x09, &[0x40])),
            ("ENUMERATED", t(0x0a, &[0x05])),
            ("ENUMERATED negative", t(0x0a, &[0xfb])),
            ("ENUMERATED padded", t(0x0a, &[0x00, 0x05])),
            ("ENUMERATED empty", t(0x0a, &[])),
            ("EMBEDDED PDV primitive", t(0x0b, b"x")),
            ("RELATIVE-OID", t(0x0d, &[1, 2])),
            ("tag 14", t(0x0e, b"Fourteen")),
            ("tag 15", t(0x0f, b"x")),
            ("CHARACTER STRING (29)", t(0x1d, b"X y")),
            ("high tag 31", cn([&[0x1f, 0x1f, 0x01][..], b"x"].concat())),
            (
                "UTF8String in high-tag form",
                cn([&[0x1f, 0x0c, 0x02][..], b"Ab"].concat()),
            ),
            ("context-specific value", t(0x80, b"x")),
            ("application value", t(0x40, b"x")),
            ("BIT STRING", t(0x03, &[0x00, 0xA5, 0xFF])),
            ("BIT STRING unused bits set", t(0x03, &[0x03, 0xA5, 0xFF])),
            ("BIT STRING empty with unused count", t(0x03, &[0x05])),
            ("BIT STRING empty", t(0x03, &[0x00])),
            ("BIT STRING no octets", t(0x03, &[])),
            ("BIT STRING unused 8", t(0x03, &[0x08, 0x00])),
            (
                "SEQUENCE value",
                cn(seq(0x30, &[tlv(0x02, &[5]), utf8("MiXeD")])),
            ),
            (
                "SEQUENCE value non-minimal length",
                cn(vec![0x30, 0x81, 0x03, 0x02, 0x01, 0x05]),
            ),
            ("primitive SEQUENCE value", t(0x10, &[])),
            ("SET value", cn(seq(0x31, &[utf8("x")]))),
            (
                "constructed UTF8String",
                cn(seq(0x2c, &[tlv(0x04, b"Hello "), tlv(0x04, b" WORLD")])),
            ),
            (
                "constructed PrintableString, odd segment tags",
                cn(seq(
                    0x33,
                    &[tlv(0x0c, b"A"), tlv(0x80, b"B"), tlv(0x00, b"C")],
                )),
            ),
            (
                "constructed, nested",
                cn(seq(
                    0x33,
                    &[seq(
                        0x24,
                        &[tlv(0x04, b"Ne"), seq(0x24, &[tlv(0x04, b"STED")])],
                    )],
                )),
            ),
            (
                "constructed, nested 5 deep",
                cn(seq(
                    0x33,
                    &[seq(
                        0x24,
                        &[seq(
                            0x24,
                            &[seq(0x24, &[seq(0x24, &[seq(0x24, &[tlv(0x04, b"x")])])])],
                        )],
                    )],
                )),
            ),
            (
                "constructed, nested 6 deep",
                cn(seq(
                    0x33,
                    &[seq(
                        0x24,
                        &[seq(
                            0x24,
                            &[seq(
                                0x24,
                                &[seq(0x24, &[seq(0x24, &[seq(0x24, &[tlv(0x04, b"x")])])])],
                            )],
                        )],
                    )],
                )),
            ),
            (
                "constructed, EOC inside",
                cn(seq(0x33, &[tlv(0x04, b"a"), vec![0, 0]])),
            ),
            ("constructed, empty", cn(seq(0x33, &[]))),
            (
                "constructed BMPString",
                cn(seq(0x3e, &[tlv(0x04, &[0]), tlv(0x04, b"Q")])),
            ),
            (
                "constructed BIT STRING",
                cn(seq(0x23, &[tlv(0x03, &[0x00]), tlv(0x03, &[0xff])])),
            ),
            (
                "constructed NumericString",
                cn(seq(0x32, &[tlv(0x12, b"1 "), tlv(0x12, b" 2")])),
            ),
            ("constructed ENUMERATED", cn(seq(0x2a, &[tlv(0x04, &[1])]))),
            (
                "non-minimal value length",
                cn(vec![0x0c, 0x82, 0x00, 0x02, b'H', b'i']),
            ),
            (
                "non-minimal lengths everywhere",
                vec![
                    0x30, 0x81, 0x0c, 0x31, 0x81, 0x09, 0x30, 0x81, 0x06, 0x06, 0x81, 0x01, 0x55,
                    0x0c, 0x00,
                ],
            ),
            ("long value", cn(utf8(&"Long Value ".repeat(40)))),
            ("name of exactly 1 MiB", name_of_len(MAX_NAME_LEN)),
            ("name of 1 MiB + 1", name_of_len(MAX_NAME_LEN + 1)),
            (
                "long name",
                name(
                    &(0..300)
                        .map(|i| rdn(&[atv(OU, utf8(&format!("Unit {i}")))]))
                        .collect::<Vec<_>>(),
                ),
            ),
            (
                "unknown OID",
                name(&[rdn(&[atv(&[0x2a, 0x03, 0x04, 0x86, 0x48], utf8("X"))])]),
            ),
            (
                "OID with padding",
                name(&[rdn(&[atv(&[0x2a, 0x80, 0x03], utf8("X"))])]),
            ),
            (
                "OID truncated",
                name(&[rdn(&[atv(&[0x2a, 0x83], utf8("X"))])]),
            ),
            ("OID empty", name(&[rdn(&[atv(&[], utf8("X"))])])),
            (
                "OID constructed",
                name(&[rdn(&[seq(
                    0x30,
                    &[tlv(0x26, &[0x06, 0x01, 0x55]), utf8("x")],
                )])]),
            ),
            (
                "attribute without value",
                name(&[rdn(&[seq(0x30, &[tlv(0x06, CN)])])]),
            ),
            (
                "attribute with extra element",
                name(&[rdn(&[seq(0x30, &[tlv(0x06, CN), utf8("a"), utf8("b")])])]),
            ),
            ("empty attribute", name(&[rdn(&[seq(0x30, &[])])])),
            (
                "primitive attribute SEQUENCE",
                name(&[rdn(&[tlv(0x10, &[tlv(0x06, CN), utf8("a")].concat())])]),
            ),
            ("primitive RDN SET", name(&[tlv(0x11, &atv(CN, utf8("a")))])),
            (
                "primitive Name SEQUENCE",
                tlv(0x10, &rdn(&[atv(CN, utf8("a"))])),
            ),
            (
                "RDN is a SEQUENCE",
                name(&[seq(0x30, &[atv(CN, utf8("a"))])]),
            ),
            (
                "multi-valued, unsorted",
                name(&[
                    rdn(&[atv(OU, utf8("b")), atv(CN, utf8("a"))]),
                    rdn(&[atv(O, utf8("c"))]),
                ]),
            ),
            (
                "multi-valued, sorted",
                name(&[
                    rdn(&[atv(CN, utf8("a")), atv(OU, utf8("b"))]),
                    rdn(&[atv(O, utf8("c"))]),
                ]),
            ),
            (
                "multi-valued, order changes with canonicalisation",
                name(&[rdn(&[
                    atv(CN, tlv(0x13, b"B")),
                    atv(CN, utf8("a")),
                    atv(CN, tlv(0x1e, &[0, b'C'])),
                ])]),
            ),
            (
                "multi-valued, length decides",
                name(&[rdn(&[
                    atv(CN, utf8("b")),
                    atv(CN, utf8("aa")),
                    atv(CN, utf8(" A  A ")),
                ])]),
            ),
            (
                "multi-valued, duplicates",
                name(&[rdn(&[
                    atv(CN, utf8("x")),
                    atv(CN, utf8("X")),
                    atv(CN, utf8("x")),
                ])]),
            ),
            (
                "multi-valued, opaque and text",
                name(&[rdn(&[
                    atv(CN, tlv(0x12, b"9")),
                    atv(CN, utf8("z")),
                    atv(CN, seq(0x30, &[])),
                ])]),
            ),
        ]
    }

    #[test]
    fn matches_openssl_on_crafted_names() {
        use rcgen::{CertificateParams, KeyPair};

        require_openssl();
        let key = KeyPair::generate().expect("key");
        let base = CertificateParams::default()
            .self_signed(&key)
            .expect("base certificate");
        let cases = crafted_names();
        let ders: Vec<Vec<u8>> = cases
            .iter()
            .map(|(_, name)| with_subject(base.der(), name))
            .collect();
        let theirs = openssl_rehash_hashes(&ders);

        let mut failures = Vec::new();
        let mut rejected = 0;
        for ((what, name_der), theirs) in cases.iter().zip(theirs) {
            let ours = canonical_name(name_der);
            match (&ours, theirs) {
                (Ok(_), Some(theirs)) if subject_hash(name_der) == theirs => {}
                (Err(_), None) if subject_hash(name_der) == 0 => rejected += 1,
                _ => failures.push(format!(
                    "{what}: ours {:?} {:?}, openssl {:?}",
                    hash_hex(subject_hash(name_der)),
                    ours.map(|c| hex(&c)),
                    theirs.map(hash_hex)
                )),
            }
        }
        assert!(
            failures.is_empty(),
            "disagreements with openssl:\n{}",
            failures.join("\n")
        );
        eprintln!(
            "compared {} hand-made names with openssl, {rejected} rejected by both",
            cases.len()
        );
    }

    // ---- 3. the canonical encoding, byte by byte ----

    #[test]
    fn whitespace_is_trimmed_and_collapsed_and_ascii_lower_cased() {
        // PrintableString in, UTF8String out.
        let name = cn(tlv(0x13, b" \t Foo \t\x0b\x0c\r\n BAR  "));
        let expected = [
            &[
                0x31, 0x10, 0x30, 0x0e, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x07,
            ][..],
            b"foo bar",
        ]
        .concat();
        assert_eq!(canonical_name(&name), Ok(expected));
    }

    #[test]
    fn non_ascii_is_kept_and_not_whitespace() {
        // UTF8String: the no-break space U+00A0 and the capital U+00C4 stay.
        let name = cn(utf8(" \u{a0}\u{c4}B "));
        let expected = [
            &[
                0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05,
            ][..],
            &[0xc2, 0xa0, 0xc3, 0x84, b'b'],
        ]
        .concat();
        assert_eq!(canonical_name(&name), Ok(expected));
    }

    #[test]
    fn one_octet_strings_are_read_as_latin1() {
        // T61String 0xC9 0x41 ("ÉA") becomes UTF-8 "Éa".
        let name = cn(tlv(0x14, &[0xc9, 0x41]));
        let expected = [
            0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x03, 0xc3, 0x89, b'a',
        ];
        assert_eq!(canonical_name(&name), Ok(expected.to_vec()));
    }

    #[test]
    fn bmp_and_universal_strings_become_utf8() {
        // BMPString "A\u{410}" (Latin A, Cyrillic A).
        let bmp = cn(tlv(0x1e, &[0x00, 0x41, 0x04, 0x10]));
        let expected = [
            0x31, 0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x03, b'a', 0xd0, 0x90,
        ];
        assert_eq!(canonical_name(&bmp), Ok(expected.to_vec()));
        // UniversalString "Z\u{1F600}".
        let universal = cn(tlv(0x1c, &[0, 0, 0, b'Z', 0, 0x01, 0xf6, 0x00]));
        let expected = [
            0x31, 0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b'z', 0xf0, 0x9f,
            0x98, 0x80,
        ];
        assert_eq!(canonical_name(&universal), Ok(expected.to_vec()));
    }

    #[test]
    fn other_value_types_are_kept_as_they_are() {
        let name = cn(tlv(0x12, b" 1  2 "));
        let expected = [
            &[
                0x31, 0x0f, 0x30, 0x0d, 0x06, 0x03, 0x55, 0x04, 0x03, 0x12, 0x06,
            ][..],
            b" 1  2 ",
        ]
        .concat();
        assert_eq!(canonical_name(&name), Ok(expected));
    }

    #[test]
    fn multi_valued_rdn_is_sorted_by_encoding() {
        // OU=b+CN=a: CN's OID 55 04 03 sorts before OU's 55 04 0b.
        let name = name(&[rdn(&[atv(OU, utf8("b")), atv(CN, utf8("a"))])]);
        let expected = [
            0x31, 0x14, //
            0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, b'a', //
            0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x0b, 0x0c, 0x01, b'b',
        ];
        assert_eq!(canonical_name(&name), Ok(expected.to_vec()));
    }

    #[test]
    fn set_order_is_der_order_not_string_order() {
        // "b" before "aa": the shorter encoding has the smaller length octet.
        let name = name(&[rdn(&[atv(CN, utf8("AA")), atv(CN, utf8("b"))])]);
        let expected = [
            0x31, 0x15, //
            0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, b'b', //
            0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x02, b'a', b'a',
        ];
        assert_eq!(canonical_name(&name), Ok(expected.to_vec()));
    }

    #[test]
    fn rdns_keep_their_order_and_empty_ones_vanish() {
        let name = name(&[
            rdn(&[atv(O, utf8("Z"))]),
            rdn(&[]),
            rdn(&[atv(CN, utf8("A"))]),
        ]);
        let expected = [
            0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x01, b'z', //
            0x31, 0x0a, 0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x01, b'a',
        ];
        assert_eq!(canonical_name(&name), Ok(expected.to_vec()));
    }

    #[test]
    fn empty_name_is_the_empty_encoding() {
        assert_eq!(canonical_name(&[0x30, 0x00]), Ok(Vec::new()));
        // SHA-1 of nothing is da39a3ee...; its first four bytes little-endian.
        assert_eq!(subject_hash(&[0x30, 0x00]), 0xeea3_39da);
    }

    #[test]
    fn long_values_get_long_form_lengths() {
        let value = "x".repeat(200);
        let canonical = canonical_name(&cn(utf8(&value))).expect("valid name");
        assert_eq!(
            &canonical[..11],
            &[
                0x31, 0x81, 0xd3, 0x30, 0x81, 0xd0, 0x06, 0x03, 0x55, 0x04, 0x03
            ]
        );
        assert_eq!(&canonical[11..14], &[0x0c, 0x81, 0xc8]);
        assert_eq!(canonical.len(), 14 + 200);
    }

    #[test]
    fn der_headers() {
        let header = |len| {
            let (bytes, n) = der_header(0x04, len);
            bytes[..n].to_vec()
        };
        assert_eq!(header(0), [0x04, 0x00]);
        assert_eq!(header(0x7f), [0x04, 0x7f]);
        assert_eq!(header(0x80), [0x04, 0x81, 0x80]);
        assert_eq!(header(0xff), [0x04, 0x81, 0xff]);
        assert_eq!(header(0x100), [0x04, 0x82, 0x01, 0x00]);
        assert_eq!(header(0x0123_4567), [0x04, 0x84, 0x01, 0x23, 0x45, 0x67]);
    }

    #[test]
    fn malformed_names_are_errors_and_hash_to_zero() {
        let good = cn(utf8("a"));
        let truncated = &good[..good.len() - 1];
        let trailing = [good.as_slice(), &[0x00]].concat();
        let indefinite = [
            &[0x30, 0x80][..],
            &rdn(&[atv(CN, utf8("a"))]),
            &[0x00, 0x00],
        ]
        .concat();
        let not_a_sequence = rdn(&[atv(CN, utf8("a"))]);
        for bad in [
            &[][..],
            truncated,
            &trailing,
            &indefinite,
            &not_a_sequence,
            &[0x30, 0x02, 0x05, 0x00],
        ] {
            let error = canonical_name(bad).expect_err(&hex(bad));
            assert!(
                error
                    .to_string()
                    .starts_with("cannot compute the OpenSSL subject hash: ")
            );
            assert_eq!(subject_hash(bad), 0, "{}", hex(bad));
        }
    }

    #[test]
    fn hex_form() {
        assert_eq!(hash_hex(0x4042_bcee), "4042bcee");
        assert_eq!(hash_hex(0xab), "000000ab");
        assert_eq!(hash_hex(u32::MAX), "ffffffff");
    }
}
