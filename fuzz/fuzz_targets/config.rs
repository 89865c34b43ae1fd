//! The TOML config loader: parsing and the whole validation, as
//! `--config FILE` runs them. Nothing may panic, whatever the text; an
//! error always names the file.

#![no_main]

use std::path::Path;

use anchorage::cli::Flags;
use anchorage::config::{Child, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `--config` reads the file as UTF-8; other bytes never get this far.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/fuzz/anchorage.toml");
    let flags = Flags {
        config: Some(path.to_path_buf()),
        ..Flags::default()
    };
    for child in [Child::Absent, Child::NotYet, Child::Supervised] {
        if let Err(e) = Config::from_text(&flags, path, text, child) {
            assert!(e.to_string().contains("/fuzz/anchorage.toml"), "{e}");
        }
    }
});
