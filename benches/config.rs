//! The configuration's part of a 1,000-bundle start (bench/scale.sh's (b)):
//! the same file parsed by the TOML crate alone (into a table: no spans, no
//! validation, the format's floor with the crate we use) and by
//! `Config::from_text` (the parse with spans, then every check). Prints
//! figures; asserts nothing.
//!
//!   cargo bench --bench config
//!   BUNDLES=10000 cargo bench --bench config

use std::path::Path;
use std::time::{Duration, Instant};

use anchorage::cli::Flags;
use anchorage::config::{Child, Config};

const RUNS: usize = 21;

/// The configuration bench/lib/scale.py writes for (b): one volume, one
/// output and a SIGHUP reload per bundle.
fn text(bundles: usize) -> String {
    let mut text = String::from("[daemon]\ndebounce = \"0s\"\n\n");
    for i in 1..=bundles {
        text.push_str(&format!(
            "[[bundle]]\nname = \"v{i:04}\"\nsources = [\"/dev/shm/sc/vols/v{i:04}\"]\n  \
             [[bundle.output]]\n  path = \"/dev/shm/sc/out/v{i:04}.pem\"\n  \
             [[bundle.reload]]\n  signal = \"HUP\"\n  pid_file = \"/dev/shm/sc/app.pid\"\n\n"
        ));
    }
    text
}

/// Median and least of `RUNS` timings of `f`; the first run (cold pages)
/// is reported apart.
fn time(mut f: impl FnMut()) -> (Duration, Duration, Duration) {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    let first = times[0];
    times.sort();
    (first, times[RUNS / 2], times[0])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let bundles = std::env::var("BUNDLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let text = text(bundles);
    let flags = Flags::default();
    let path = Path::new("bundles.toml");
    let (first_t, median_t, least_t) = time(|| {
        let table: toml::Table = toml::from_str(&text).expect("toml");
        std::hint::black_box(table);
    });
    let (first_c, median_c, least_c) = time(|| {
        let config = Config::from_text(&flags, path, &text, Child::Absent).expect("config");
        assert_eq!(config.bundles.len(), bundles);
        std::hint::black_box(config);
    });
    println!(
        "config of {bundles} bundles ({} bytes), {RUNS} runs: median / least / first (cold) ms",
        text.len()
    );
    println!(
        "  toml::Table (the crate alone)       {:6.2} {:6.2} {:6.2}",
        ms(median_t),
        ms(least_t),
        ms(first_t)
    );
    println!(
        "  Config::from_text (anchorage's)     {:6.2} {:6.2} {:6.2}",
        ms(median_c),
        ms(least_c),
        ms(first_c)
    );
}
