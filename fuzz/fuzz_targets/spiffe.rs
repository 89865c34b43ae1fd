//! The SPIFFE bundle reader (a JWK Set's `x509-svid` keys), on arbitrary
//! bytes as a source file's content. Nothing may panic; the certificates
//! it reads, written back as a bundle, read again as the same
//! certificates.

#![no_main]

use anchorage::source::spiffe::{frame, looks_like_json};
use libfuzzer_sys::fuzz_target;

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard, padded base64, as `x5c` holds it.
fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let _ = looks_like_json(data);
    let Ok(blocks) = frame(data) else {
        return;
    };
    let x5c: Vec<String> = blocks
        .iter()
        .map(|b| format!("\"{}\"", base64(&b.der)))
        .collect();
    let again = format!(
        "{{\"keys\": [{{\"use\": \"x509-svid\", \"x5c\": [{}]}}]}}",
        x5c.join(", ")
    );
    match frame(again.as_bytes()) {
        Ok(read) => assert_eq!(read, blocks),
        // An empty x5c is damaged; only a bundle with no authority reads
        // as no certificate.
        Err(e) => assert!(blocks.is_empty(), "{e}"),
    }
});
