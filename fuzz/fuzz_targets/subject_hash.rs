//! The OpenSSL subject-name canonicaliser, on arbitrary bytes as a Name's
//! DER. Nothing may panic; the canonical form of a name, read again as a
//! name, is its own canonical form (canonicalising twice changes nothing),
//! and the hash is the hash of that form.

#![no_main]

use anchorage::bundle::subject_hash::{canonical_name, subject_hash};
use libfuzzer_sys::fuzz_target;

/// `content` as the content of a DER SEQUENCE.
fn sequence(content: &[u8]) -> Vec<u8> {
    let mut out = vec![0x30];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let be = len.to_be_bytes();
        let skip = be.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (be.len() - skip) as u8);
        out.extend_from_slice(&be[skip..]);
    }
    out.extend_from_slice(content);
    out
}

fuzz_target!(|data: &[u8]| {
    let hash = subject_hash(data);
    match canonical_name(data) {
        Ok(canonical) => {
            let again =
                canonical_name(&sequence(&canonical)).expect("a canonical form is a valid name");
            assert_eq!(again, canonical, "canonicalising twice changed the name");
            assert_eq!(subject_hash(&sequence(&canonical)), hash);
        }
        Err(_) => assert_eq!(hash, 0),
    }
});
