//! Generates N distinct self-signed CA certificates for the benchmarks in
//! `bench/`, one PEM file per CA: `DIR/ca-00001.pem`, `DIR/ca-00002.pem`, ...
//!
//! ```text
//! cargo run --release --example gen_cas -- DIR N
//! ```
//!
//! To stay fast (10,000 certificates in a few seconds) one ECDSA P-256 key
//! signs every certificate; each has its own subject (`CN=Bench CA 00001,
//! O=anchorage bench`), serial number and subject key identifier, so every
//! certificate is distinct in content, SHA-256 fingerprint and OpenSSL subject
//! hash. All are CAs (`BasicConstraints: CA:TRUE`, keyCertSign + cRLSign),
//! valid from yesterday for ten years. Serials and key identifiers are
//! derived from the index, so only the key and the ECDSA signatures change
//! from one run to the next. No network is used.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use ring::digest::{SHA256, digest};
use time::{Duration, OffsetDateTime};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, count) = match args.as_slice() {
        [dir, n] => match n.parse::<u32>() {
            Ok(n) if (1..=99_999).contains(&n) => (PathBuf::from(dir), n),
            _ => return usage(&format!("N must be an integer from 1 to 99999, got {n:?}")),
        },
        _ => return usage("expected exactly two arguments"),
    };
    match generate(&dir, count) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen_cas: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(why: &str) -> ExitCode {
    eprintln!(
        "gen_cas: {why}\nusage: gen_cas DIR N   (writes DIR/ca-00001.pem .. DIR/ca-NNNNN.pem)"
    );
    ExitCode::from(2)
}

/// 20 bytes derived from `label` and `index`: a serial number or key id.
fn derived(label: &str, index: u32) -> Vec<u8> {
    let mut input = Vec::with_capacity(label.len() + 4);
    input.extend_from_slice(label.as_bytes());
    input.extend_from_slice(&index.to_be_bytes());
    digest(&SHA256, &input).as_ref()[..20].to_vec()
}

fn generate(dir: &Path, count: u32) -> Result<(), Box<dyn Error>> {
    fs::create_dir_all(dir)?;
    let key = KeyPair::generate()?;
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::days(1);
    let not_after = not_before + Duration::days(3652);

    for i in 1..=count {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Bench CA {i:05}"));
        dn.push(DnType::OrganizationName, "anchorage bench");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = not_before;
        params.not_after = not_after;
        // A positive 20-byte serial (RFC 5280 allows at most 20 octets).
        let mut serial = derived("anchorage bench serial", i);
        serial[0] = (serial[0] & 0x7f) | 0x01;
        params.serial_number = Some(SerialNumber::from(serial));
        // The shared key would otherwise give every CA the same subject key
        // identifier; real CAs have distinct ones.
        params.key_identifier_method = KeyIdMethod::PreSpecified(derived("anchorage bench ski", i));

        let cert = params.self_signed(&key)?;
        let path = dir.join(format!("ca-{i:05}.pem"));
        fs::write(&path, cert.pem()).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    eprintln!(
        "gen_cas: wrote {count} CA certificates to {}",
        dir.display()
    );
    Ok(())
}
