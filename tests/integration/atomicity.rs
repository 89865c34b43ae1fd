//! Guarantee 1: a reader looping on an output while it is rewritten
//! thousands of times never sees a partial, empty or mixed bundle.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anchorage::bundle::{Bundle, Policy, assemble};
use anchorage::output::{Format, OutputSpec, Rendered, publish, render};
use anchorage::source::Source;

use crate::support::pki::Ca;
use crate::support::write;

const REWRITES: usize = 2000;

fn bundle_of(dir: &Path, cas: &[Ca]) -> Bundle {
    for (i, ca) in cas.iter().enumerate() {
        write(dir, &format!("{i}.pem"), ca.pem());
    }
    let files = Source::Path(dir.to_path_buf()).read().expect("read");
    assemble(
        &files,
        &Policy::default(),
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )
    .expect("valid")
    .bundle
}

/// What a reader got: a complete output, or the part of a retired
/// directory generation that was left when it looked.
enum Seen {
    Complete(Rendered),
    Retired(Vec<(String, Vec<u8>)>),
}

/// Whether `part` holds only files of `whole`, byte for byte.
fn part_of(part: &[(String, Vec<u8>)], whole: &Rendered) -> bool {
    let Rendered::Dir(files) = whole else {
        return false;
    };
    part.iter().all(|f| files.contains(f))
}

/// Rewrites `spec` alternating between two bundles while `read` loops;
/// returns how many complete reads the reader made.
fn hammer(
    spec: OutputSpec,
    a: Bundle,
    b: Bundle,
    read: impl Fn(&Path) -> Option<Seen> + Send + 'static,
) -> usize {
    let allowed = [render(&a, &spec.format), render(&b, &spec.format)];
    publish(&spec, &a).expect("first publish");
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let path: PathBuf = spec.path.clone();
        std::thread::spawn(move || {
            let mut complete = 0usize;
            while !stop.load(Ordering::Relaxed) {
                match read(&path) {
                    Some(Seen::Complete(seen)) => {
                        assert!(
                            allowed.contains(&seen),
                            "a reader saw a partial or mixed output: {seen:?}"
                        );
                        complete += 1;
                    }
                    // A generation being removed after the swap: what is
                    // left of it is still all of one generation.
                    Some(Seen::Retired(part)) => assert!(
                        allowed.iter().any(|whole| part_of(&part, whole)),
                        "a retired generation held a mix: {part:?}"
                    ),
                    None => {}
                }
            }
            complete
        })
    };
    for i in 0..REWRITES {
        let next = if i % 2 == 0 { &b } else { &a };
        assert!(
            publish(&spec, next).expect("publish"),
            "rewrite {i} changed nothing"
        );
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader")
}

#[test]
fn pem_file_is_never_torn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = bundle_of(&dir.path().join("a"), &[Ca::new("A1"), Ca::new("A2")]);
    let b = bundle_of(
        &dir.path().join("b"),
        &[Ca::new("B1"), Ca::new("B2"), Ca::new("B3")],
    );
    let spec = OutputSpec {
        path: dir.path().join("out/bundle.pem"),
        format: Format::Pem,
        mode: 0o644,
    };
    let reads = hammer(spec, a, b, |path| {
        fs::read(path)
            .ok()
            .map(|b| Seen::Complete(Rendered::File(b)))
    });
    assert!(reads > 0);
    eprintln!("{reads} complete reads during {REWRITES} rewrites");
}

/// Reads a whole directory through one open handle on it, as a reader that
/// opened the directory sees it. If the directory is still the live output
/// when the read ends, the read must be one complete generation; if it was
/// swapped out meanwhile (and is being removed), what was left of it.
fn read_dir_snapshot(path: &Path) -> Option<Seen> {
    use std::os::unix::fs::MetadataExt;
    let handle = fs::File::open(path).ok()?;
    let base = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&handle)
    ));
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(&base).ok()? {
        let name = entry.ok()?.file_name().into_string().ok()?;
        // Hidden names (anchorage's marker) are not part of the output.
        if name.starts_with('.') {
            continue;
        }
        match fs::read(base.join(&name)) {
            Ok(bytes) => {
                files.insert(name, bytes);
            }
            // Removed after the listing: the generation was retired.
            Err(_) => continue,
        }
    }
    let files: Vec<_> = files.into_iter().collect();
    let live = fs::metadata(path).ok()?.ino() == handle.metadata().ok()?.ino();
    Some(if live {
        Seen::Complete(Rendered::Dir(files))
    } else {
        Seen::Retired(files)
    })
}

#[test]
fn hashed_directory_is_never_mixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Same subjects in both sets, so names collide and a mix would show.
    let a = bundle_of(&dir.path().join("a"), &[Ca::new("S1"), Ca::new("S2")]);
    let b = bundle_of(
        &dir.path().join("b"),
        &[Ca::new("S1"), Ca::new("S2"), Ca::new("S3")],
    );
    let spec = OutputSpec {
        path: dir.path().join("certs"),
        format: Format::OpensslDir,
        mode: 0o644,
    };
    let reads = hammer(spec, a, b, read_dir_snapshot);
    assert!(reads > 0);
    eprintln!("{reads} complete directory reads during {REWRITES} rewrites");
}
