//! The source reader: PEM framing or DER, then every certificate block
//! parsed and assembled into a bundle and rendered as the directory
//! formats, as a render does with a file's bytes. Nothing may panic,
//! whatever the bytes; a certificate that is read must survive a PEM
//! round trip unchanged.

#![no_main]

use std::path::PathBuf;

use anchorage::bundle::{Policy, assemble};
use anchorage::output::{Format, render};
use anchorage::source::{SourceFile, decode, pem};
use libfuzzer_sys::fuzz_target;

/// A fixed "now" (2026-01-01), so a run is reproducible.
const NOW: i64 = 1_767_225_600;

fuzz_target!(|data: &[u8]| {
    let Ok(blocks) = decode(data) else {
        return;
    };
    let file = SourceFile {
        path: PathBuf::from("fuzz.pem").into(),
        blocks,
        link: None,
    };
    let policy = Policy {
        allow_expired: true,
        allow_non_ca: true,
        ..Policy::default()
    };
    let Ok(assembly) = assemble(std::slice::from_ref(&file), &policy, NOW) else {
        return;
    };
    for anchor in assembly.bundle.anchors() {
        let mut text = Vec::new();
        pem::encode("CERTIFICATE", &anchor.der, &mut text);
        let again = decode(&text).expect("an encoded certificate decodes");
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].der, anchor.der);
    }
    for format in [Format::Pem, Format::OpensslDir, Format::DerDir] {
        render(&assembly.bundle, &format);
    }
});
