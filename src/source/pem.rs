//! PEM framing: finds the certificate blocks in a file and decodes them.
//!
//! `rustls_pki_types::pem` is the usual reader, but it is built for reading
//! *a* certificate, not for refusing a damaged trust set: it skips
//! `TRUSTED CERTIFICATE` blocks as unknown, and a `-----BEGIN` line inside an
//! unterminated block silently restarts framing, so a truncated certificate
//! followed by a good one would vanish without an error. A trust bundle must
//! never shrink silently (guarantee 2, ARCHITECTURE.md), so the framing lives here;
//! base64 decoding is the `base64` crate's.
//!
//! Private-key blocks are recognised only by their labels and are never
//! decoded, copied or quoted in an error.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

/// A block that holds a certificate, in the order it appears in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertBlock {
    /// The decoded body. For `TRUSTED CERTIFICATE` this is the certificate
    /// followed by OpenSSL's auxiliary trust data, which the parser strips.
    /// Shared: a plain block's parsed certificate holds the same bytes.
    pub der: std::sync::Arc<[u8]>,
    /// `TRUSTED CERTIFICATE` (OpenSSL's X509_AUX form) rather than `CERTIFICATE`.
    pub trusted: bool,
    /// The SHA-256 of `der` for a plain certificate block, taken when the
    /// file is read: the key under which its parse is kept, so a render
    /// that did not read this file again neither hashes nor parses it.
    pub sha256: Option<[u8; 32]>,
}

impl CertBlock {
    pub fn new(der: Vec<u8>, trusted: bool) -> Self {
        let sha256 = (!trusted).then(|| crate::bundle::sha256(&der));
        Self {
            der: der.into(),
            trusted,
            sha256,
        }
    }
}

/// What a file holds, once framed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Framed {
    pub certificates: Vec<CertBlock>,
    /// Blocks of any other kind (private keys, CRLs, parameters): skipped.
    pub other_blocks: usize,
}

/// Why a file's PEM could not be framed. Never carries file content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// A certificate block has no `-----END` line (a truncated file).
    Unterminated { index: usize },
    /// A certificate block's body is not valid base64.
    BadBase64 { index: usize, reason: String },
    /// A certificate block's `-----END` label does not match its `-----BEGIN`.
    MismatchedEnd { index: usize },
    /// A certificate block's `-----END` line with no `-----BEGIN` before
    /// it: the start of the file (or of the block) is missing.
    Unstarted { index: usize },
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unterminated { index } => {
                write!(f, "certificate block {index} is truncated (no END line)")
            }
            Self::BadBase64 { index, reason } => {
                write!(f, "certificate block {index} is not valid base64: {reason}")
            }
            Self::MismatchedEnd { index } => {
                write!(f, "certificate block {index} ends with a different label")
            }
            Self::Unstarted { index } => write!(
                f,
                "certificate block {index} has an END line but no BEGIN line (its start is missing)"
            ),
        }
    }
}

const BEGIN: &[u8] = b"-----BEGIN ";
const END: &[u8] = b"-----END ";

/// Labels whose body is a certificate. `X509 CERTIFICATE` is the old
/// SSLeay spelling OpenSSL still reads.
fn certificate_label(label: &[u8]) -> Option<bool> {
    match label {
        b"CERTIFICATE" | b"X509 CERTIFICATE" => Some(false),
        b"TRUSTED CERTIFICATE" => Some(true),
        _ => None,
    }
}

/// Whether these bytes contain any PEM block start, i.e. should be read as PEM
/// rather than DER.
pub fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(BEGIN.len()).any(|w| w == BEGIN)
}

/// Frames every PEM block in `bytes` (LF or CRLF line ends, text between
/// blocks ignored, a leading UTF-8 byte order mark too, as Windows editors
/// write one) and decodes the certificate blocks.
pub fn frame(bytes: &[u8]) -> Result<Framed, FrameError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut framed = Framed::default();
    // The open block: its label, whether it is a certificate, and its base64.
    let mut open: Option<(&[u8], Option<bool>)> = None;
    let mut body: Vec<u8> = Vec::with_capacity(2048);
    let mut cert_index = 0usize;

    for raw_line in bytes.split(|b| *b == b'\n') {
        let line = raw_line.trim_ascii();
        if let Some(label) = marker(line, BEGIN) {
            if let Some((_, Some(_))) = open {
                // A new block starts inside an open certificate block.
                return Err(FrameError::Unterminated { index: cert_index });
            }
            open = Some((label, certificate_label(label)));
            body.clear();
            continue;
        }
        let Some((label, kind)) = open else {
            // A certificate's END with no BEGIN: the text before it is not
            // a block's start, so the certificate it ends is lost.
            if marker(line, END).and_then(certificate_label).is_some() {
                return Err(FrameError::Unstarted { index: cert_index });
            }
            continue;
        };
        if let Some(end_label) = marker(line, END) {
            if let Some(trusted) = kind {
                if end_label != label {
                    return Err(FrameError::MismatchedEnd { index: cert_index });
                }
                let der = BASE64.decode(&body).map_err(|e| FrameError::BadBase64 {
                    index: cert_index,
                    reason: e.to_string(),
                })?;
                framed.certificates.push(CertBlock::new(der, trusted));
                cert_index += 1;
            } else {
                framed.other_blocks += 1;
            }
            open = None;
            body.clear();
            continue;
        }
        if kind.is_some() {
            // Whitespace inside a line is tolerated, as OpenSSL does; a
            // line without any (every writer's) is copied whole, not byte
            // by byte, which was the largest user-space cost of reading
            // 10,000 one-CA files.
            if line.iter().any(u8::is_ascii_whitespace) {
                body.extend(line.iter().filter(|b| !b.is_ascii_whitespace()));
            } else {
                body.extend_from_slice(line);
            }
        }
    }
    match open {
        Some((_, Some(_))) => Err(FrameError::Unterminated { index: cert_index }),
        // An unterminated key block holds nothing we would use.
        Some((_, None)) => {
            framed.other_blocks += 1;
            Ok(framed)
        }
        None => Ok(framed),
    }
}

/// The label of a `-----BEGIN LABEL-----` / `-----END LABEL-----` line.
fn marker<'a>(line: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    line.strip_prefix(prefix)?.strip_suffix(b"-----")
}

/// Standard alphabet; padding optional, as some writers drop it.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Encodes DER as a PEM block with 64-character lines and LF line ends.
/// How many bytes [`encode`] writes for `der_len` bytes under `label`.
pub fn encoded_len(label: &str, der_len: usize) -> usize {
    let base64 = der_len.div_ceil(3) * 4;
    let lines = base64.div_ceil(64);
    "-----BEGIN -----\n".len() + "-----END -----\n".len() + 2 * label.len() + base64 + lines
}

pub fn encode(label: &str, der: &[u8], out: &mut Vec<u8>) {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    out.extend_from_slice(b"-----BEGIN ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.extend_from_slice(chunk);
        out.push(b'\n');
    }
    out.extend_from_slice(b"-----END ");
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"-----\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_len_is_what_encode_writes() {
        for n in 0..300 {
            let der: Vec<u8> = (0..n).map(|i| i as u8).collect();
            assert_eq!(
                block("CERTIFICATE", &der).len(),
                encoded_len("CERTIFICATE", n),
                "{n} bytes"
            );
        }
    }

    fn block(label: &str, der: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(label, der, &mut out);
        out
    }

    #[test]
    fn round_trips_a_block() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let framed = frame(&block("CERTIFICATE", &der)).expect("frames");
        assert_eq!(framed.certificates, vec![CertBlock::new(der, false)]);
    }

    #[test]
    fn tolerates_crlf_and_text_around_blocks() {
        let der = b"0123456789abcdef".to_vec();
        let mut text = b"subject=CN=x\r\nsome text\r\n".to_vec();
        let pem = String::from_utf8(block("CERTIFICATE", &der)).expect("ascii");
        text.extend(pem.replace('\n', "\r\n").as_bytes());
        text.extend(b"trailing words\r\n");
        text.extend(block("CERTIFICATE", b"second"));
        let framed = frame(&text).expect("frames");
        assert_eq!(framed.certificates.len(), 2);
        assert_eq!(*framed.certificates[0].der, *der);
    }

    #[test]
    fn tolerates_whitespace_inside_lines() {
        let der: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let pem = String::from_utf8(block("CERTIFICATE", &der)).expect("ascii");
        // Spaces and a tab inside base64 lines, lines without any between.
        let spaced: String = pem
            .lines()
            .enumerate()
            .map(|(i, line)| match i {
                1 => format!("{} {}\n", &line[..10], &line[10..]),
                3 => format!("{}\t \t{}\n", &line[..1], &line[1..]),
                _ => format!("{line}\n"),
            })
            .collect();
        assert_ne!(spaced, pem);
        let framed = frame(spaced.as_bytes()).expect("frames");
        assert_eq!(framed.certificates, vec![CertBlock::new(der, false)]);
    }

    #[test]
    fn skips_keys_without_decoding_them() {
        // A key body that is not even base64 must not matter.
        let text = b"-----BEGIN PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n!!!\n-----END PRIVATE KEY-----\n";
        let framed = frame(text).expect("frames");
        assert_eq!(framed.certificates.len(), 0);
        assert_eq!(framed.other_blocks, 1);
    }

    #[test]
    fn reads_trusted_certificate_blocks() {
        let framed = frame(&block("TRUSTED CERTIFICATE", b"abc")).expect("frames");
        assert!(framed.certificates[0].trusted);
    }

    #[test]
    fn truncated_block_is_an_error() {
        let full = block("CERTIFICATE", &[7u8; 300]);
        let cut = &full[..full.len() / 2];
        assert_eq!(frame(cut), Err(FrameError::Unterminated { index: 0 }));
    }

    #[test]
    fn truncated_block_before_a_good_one_is_an_error() {
        let full = block("CERTIFICATE", &[7u8; 300]);
        let mut text = full[..full.len() / 2].to_vec();
        text.push(b'\n');
        text.extend(block("CERTIFICATE", &[8u8; 300]));
        assert_eq!(frame(&text), Err(FrameError::Unterminated { index: 0 }));
    }

    #[test]
    fn a_byte_order_mark_before_the_first_block_is_text() {
        let mut text = b"\xEF\xBB\xBF".to_vec();
        text.extend(block("CERTIFICATE", b"with a BOM"));
        let framed = frame(&text).expect("frames");
        assert_eq!(framed.certificates.len(), 1);
        assert!(looks_like_pem(&text));
    }

    #[test]
    fn an_end_line_without_its_begin_is_an_error() {
        let first = block("CERTIFICATE", &[7u8; 300]);
        // The first line gone (a copy that lost its start), or more.
        for cut in [
            first.iter().position(|b| *b == b'\n').expect("line") + 1,
            200,
        ] {
            let mut text = first[cut..].to_vec();
            text.extend(block("CERTIFICATE", &[8u8; 300]));
            assert_eq!(
                frame(&text),
                Err(FrameError::Unstarted { index: 0 }),
                "cut at {cut}"
            );
        }
        // After a good block, the second one's start is missing.
        let mut text = block("CERTIFICATE", &[8u8; 300]);
        text.extend(&first[first.len() / 2..]);
        assert_eq!(frame(&text), Err(FrameError::Unstarted { index: 1 }));
        // A key's END alone is no certificate lost.
        let framed = frame(b"junk\n-----END PRIVATE KEY-----\n").expect("frames");
        assert_eq!(framed.certificates.len(), 0);
    }

    #[test]
    fn bad_base64_is_an_error() {
        let text = b"-----BEGIN CERTIFICATE-----\nMIIB*not base64*\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            frame(text),
            Err(FrameError::BadBase64 { index: 0, .. })
        ));
    }

    #[test]
    fn mismatched_end_is_an_error() {
        let text = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert_eq!(frame(text), Err(FrameError::MismatchedEnd { index: 0 }));
    }

    #[test]
    fn detects_pem() {
        assert!(looks_like_pem(b"x\n-----BEGIN CERTIFICATE-----\n"));
        assert!(!looks_like_pem(&[0x30, 0x82, 0x01, 0x00]));
    }
}
