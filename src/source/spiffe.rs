//! SPIFFE trust bundles: the JWK Set that SPIRE publishes to files,
//! ConfigMaps and bundle endpoints (`{"keys": [...], "spiffe_sequence": N}`).
//!
//! Each key whose `use` is `x509-svid` is an X.509 authority and contributes
//! the certificates of its `x5c` (standard base64 DER, RFC 7517 section
//! 4.7); keys of other uses (`jwt-svid`) are not trust anchors for TLS and
//! are ignored. A JSON file that is not such a bundle, or an authority whose
//! `x5c` does not hold certificates, is damaged: it fails the whole bundle,
//! as a damaged PEM block does (guarantee 2).
//!
//! This module never quotes the file's values in an error (a JSON file put
//! here by mistake may be a private JWK): errors name the key's place and
//! the reason only.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde_json::Value;

use super::CertBlock;

/// The `use` of a key that is an X.509 authority.
const X509_SVID: &str = "x509-svid";

/// Why a JSON file is not a usable SPIFFE bundle. Never carries file content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffeError {
    /// Not JSON at all (a file cut short, a stray byte).
    Syntax { line: usize, column: usize },
    /// JSON, but not an object with a `keys` array.
    NotBundle,
    /// A key that is not a JSON object.
    KeyNotObject { key: usize },
    /// An X.509 authority with no `x5c` array of strings, or an empty one.
    NoX5c { key: usize },
    /// An `x5c` entry that is not standard base64.
    BadBase64 { key: usize, entry: usize },
    /// An `x5c` entry that decodes to something other than one certificate.
    NotCertificate { key: usize, entry: usize },
}

impl std::fmt::Display for SpiffeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Syntax { line, column } => write!(
                f,
                "not valid JSON (line {line}, column {column}): a file whose content starts with '{{' is read as a SPIFFE bundle"
            ),
            Self::NotBundle => f.write_str(
                "a JSON file that is not a SPIFFE bundle (an object with a \"keys\" array)",
            ),
            Self::KeyNotObject { key } => {
                write!(f, "SPIFFE bundle key {key} is not a JSON object")
            }
            Self::NoX5c { key } => write!(
                f,
                "SPIFFE bundle key {key} (use x509-svid) has no certificate in \"x5c\""
            ),
            Self::BadBase64 { key, entry } => write!(
                f,
                "SPIFFE bundle key {key}: x5c entry {entry} is not standard base64"
            ),
            Self::NotCertificate { key, entry } => write!(
                f,
                "SPIFFE bundle key {key}: x5c entry {entry} is not a DER certificate"
            ),
        }
    }
}

/// Whether these bytes are to be read as JSON: the first byte that is not
/// whitespace (after a UTF-8 byte order mark) opens an object. No PEM file
/// and no DER certificate (a SEQUENCE, 0x30) starts that way, so PEM and
/// DER detection is unchanged.
pub fn looks_like_json(bytes: &[u8]) -> bool {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// x5c is base64 (not base64url), padded; tolerate a writer that drops the
/// padding, as the PEM reader does.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The certificates of the X.509 authorities of a SPIFFE bundle, in the
/// order they appear.
pub fn frame(bytes: &[u8]) -> Result<Vec<CertBlock>, SpiffeError> {
    let text = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let doc: Value = serde_json::from_slice(text).map_err(|e| SpiffeError::Syntax {
        line: e.line(),
        column: e.column(),
    })?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(SpiffeError::NotBundle)?;
    let mut certificates = Vec::new();
    for (key, jwk) in keys.iter().enumerate() {
        let jwk = jwk.as_object().ok_or(SpiffeError::KeyNotObject { key })?;
        if jwk.get("use").and_then(Value::as_str) != Some(X509_SVID) {
            continue;
        }
        let entries = jwk
            .get("x5c")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
            .ok_or(SpiffeError::NoX5c { key })?;
        for (entry, value) in entries.iter().enumerate() {
            let text = value
                .as_str()
                .ok_or(SpiffeError::BadBase64 { key, entry })?;
            let der = BASE64
                .decode(text.trim())
                .map_err(|_| SpiffeError::BadBase64 { key, entry })?;
            if !is_one_certificate(&der) {
                return Err(SpiffeError::NotCertificate { key, entry });
            }
            certificates.push(CertBlock::new(der, false));
        }
    }
    Ok(certificates)
}

/// Exactly one X.509 certificate, nothing after it.
fn is_one_certificate(der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    matches!(X509Certificate::from_der(der), Ok((rest, _)) if rest.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real certificate's DER (rcgen, self-signed).
    fn cert_der(cn: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    fn b64(der: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(der)
    }

    #[test]
    fn reads_x509_authorities_and_ignores_jwt_keys() {
        let (a, b) = (cert_der("a"), cert_der("b"));
        let json = format!(
            r#"{{
  "keys": [
    {{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "x5c": ["{}"]}},
    {{"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA"}},
    {{"use": "x509-svid", "kty": "RSA", "n": "AQAB", "e": "AQAB", "x5c": ["{}"]}}
  ],
  "spiffe_sequence": 7,
  "spiffe_refresh_hint": 300
}}"#,
            b64(&a),
            b64(&b)
        );
        assert!(looks_like_json(json.as_bytes()));
        let blocks = frame(json.as_bytes()).expect("bundle");
        assert_eq!(
            blocks.iter().map(|b| b.der.to_vec()).collect::<Vec<_>>(),
            [a, b]
        );
    }

    #[test]
    fn json_detection_leaves_pem_and_der_alone() {
        assert!(looks_like_json(b"\xef\xbb\xbf \n\t{\"keys\": []}"));
        assert!(!looks_like_json(b"-----BEGIN CERTIFICATE-----\n"));
        assert!(!looks_like_json(
            b"subject={x}\n-----BEGIN CERTIFICATE-----\n"
        ));
        assert!(!looks_like_json(&[0x30, 0x82, 0x01, 0x00]));
        assert!(!looks_like_json(b"[1, 2]"));
    }

    #[test]
    fn an_empty_key_set_holds_no_certificate() {
        assert_eq!(frame(br#"{"keys": []}"#), Ok(Vec::new()));
    }

    #[test]
    fn damaged_bundles_are_refused_with_the_reason() {
        let der = cert_der("a");
        let good = b64(&der);
        // A truncated certificate, still valid base64.
        let half = b64(&der[..der.len() / 2]);
        let cases: Vec<(String, SpiffeError)> = vec![
            (
                r#"{"keys": [{"use": "x509-svid""#.into(),
                SpiffeError::Syntax {
                    line: 1,
                    column: 29,
                },
            ),
            (r#"{"kty": "EC"}"#.into(), SpiffeError::NotBundle),
            (
                r#"{"keys": {"use": "x509-svid"}}"#.into(),
                SpiffeError::NotBundle,
            ),
            (
                r#"{"keys": ["x"]}"#.into(),
                SpiffeError::KeyNotObject { key: 0 },
            ),
            (
                r#"{"keys": [{"use": "jwt-svid"}, {"use": "x509-svid"}]}"#.into(),
                SpiffeError::NoX5c { key: 1 },
            ),
            (
                r#"{"keys": [{"use": "x509-svid", "x5c": []}]}"#.into(),
                SpiffeError::NoX5c { key: 0 },
            ),
            (
                format!(r#"{{"keys": [{{"use": "x509-svid", "x5c": ["{good}", "%%%"]}}]}}"#),
                SpiffeError::BadBase64 { key: 0, entry: 1 },
            ),
            (
                // base64url is not what x5c holds.
                r#"{"keys": [{"use": "x509-svid", "x5c": ["MIIB-_8A"]}]}"#.into(),
                SpiffeError::BadBase64 { key: 0, entry: 0 },
            ),
            (
                format!(r#"{{"keys": [{{"use": "x509-svid", "x5c": ["{half}"]}}]}}"#),
                SpiffeError::NotCertificate { key: 0, entry: 0 },
            ),
            (
                r#"{"keys": [{"use": "x509-svid", "x5c": [42]}]}"#.into(),
                SpiffeError::BadBase64 { key: 0, entry: 0 },
            ),
        ];
        for (json, want) in cases {
            assert_eq!(frame(json.as_bytes()), Err(want), "{json}");
        }
    }

    #[test]
    fn errors_never_quote_the_file() {
        // A private JWK put where a bundle belongs: its secret stays unsaid.
        let secret = "c2VjcmV0LXByaXZhdGUtZXhwb25lbnQ";
        let json = format!(
            r#"{{"keys": [{{"use": "x509-svid", "d": "{secret}", "x5c": ["{secret}!"]}}]}}"#
        );
        let err = frame(json.as_bytes()).expect_err("damaged");
        assert!(!err.to_string().contains(secret), "{err}");
        let json = format!(r#"{{"keys": "{secret}"}}"#);
        let err = frame(json.as_bytes()).expect_err("damaged");
        assert!(!err.to_string().contains(secret), "{err}");
    }
}
