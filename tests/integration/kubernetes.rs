//! Kubernetes 1.37 projections, as kubelet writes them: one projected
//! volume holding a `clusterTrustBundle` file (every matching bundle
//! merged, in an order that changes) and a `podCertificate` credential
//! bundle (the key, then the chain), swapped by the AtomicWriter. The pod's
//! certificate rotates daily (here, every few hundred milliseconds).
//!
//! The app is a stand-in that loads `split_dir/tls.crt` and `tls.key` on
//! SIGHUP, as nginx does, and refuses a key that does not match; a reader
//! hammers the split directory through `..data` all along.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::support::daemon::{App, Daemon, eventually};
use crate::support::kubelet::{Volume, cluster_trust_bundle, credential_bundle};
use crate::support::pki::{Ca, Leaf, sha256_hex};
use crate::support::{pem_certs, s, write};

const PATIENCE: Duration = Duration::from_secs(30);

/// A pod certificate as an in-tree signer issues it: valid for a day.
fn daily(ca: &Ca) -> Leaf {
    let now = time::OffsetDateTime::now_utc();
    ca.leaf_valid(
        "pod.ns.svc",
        now - time::Duration::minutes(1),
        now + time::Duration::hours(24),
    )
}

fn leaf_sha(leaf: &Leaf) -> String {
    sha256_hex(leaf.cert.der())
}

/// Whether a key (PEM) belongs to a certificate chain (PEM).
fn pair_matches(chain: &[u8], key: &[u8]) -> Result<(), String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("chain: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("key: {e}"))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
    rustls::sign::CertifiedKey::new(certs, signing)
        .keys_match()
        .map_err(|e| e.to_string())
}

/// Reads the split directory as a careful app would, through `..data`
/// resolved once, until stopped: every generation it sees must hold a
/// matching pair. Returns (pairs checked, distinct leaves seen).
fn hammer(dir: PathBuf, stop: Arc<AtomicBool>, mismatches: Arc<AtomicUsize>) -> (usize, usize) {
    let mut checked = 0;
    let mut leaves = std::collections::HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(generation) = fs::read_link(dir.join("..data")) else {
            std::thread::yield_now();
            continue;
        };
        let generation = dir.join(generation);
        let (Ok(chain), Ok(key)) = (
            fs::read(generation.join("tls.crt")),
            fs::read(generation.join("tls.key")),
        ) else {
            // Removed after a newer swap: read the live one.
            continue;
        };
        if let Err(e) = pair_matches(&chain, &key) {
            eprintln!("hammer: {}: {e}", generation.display());
            mismatches.fetch_add(1, Ordering::Relaxed);
        }
        leaves.insert(pem_certs(&chain).first().cloned().unwrap_or_default());
        checked += 1;
    }
    (checked, leaves.len())
}

/// The projected volume of the pod: `ca-bundle.pem` from a
/// clusterTrustBundle source, `credentialbundle.pem` from a podCertificate
/// source.
struct Projection {
    volume: Volume,
    trust: Vec<u8>,
    credentials: Vec<u8>,
}

impl Projection {
    fn new(dir: &Path, trust: &[&Ca], leaf: &Leaf) -> Self {
        let mut projection = Self {
            volume: Volume::new(dir),
            trust: cluster_trust_bundle(trust, 0),
            credentials: credential_bundle(leaf, &[]),
        };
        projection.write();
        projection
    }

    fn write(&mut self) {
        self.volume.write(&[
            ("ca-bundle.pem", &self.trust),
            ("credentialbundle.pem", &self.credentials),
        ]);
    }

    fn trust(&mut self, cas: &[&Ca], order: usize) {
        self.trust = cluster_trust_bundle(cas, order);
        self.write();
    }

    fn credentials(&mut self, bytes: Vec<u8>) {
        self.credentials = bytes;
        self.write();
    }

    fn path(&self, key: &str) -> PathBuf {
        self.volume.dir.join(key)
    }
}

/// Lines of the stand-in app's log, waited for until there are `count`.
#[track_caller]
fn wait_app(app: &App, count: usize) -> Vec<String> {
    eventually(PATIENCE, || {
        let lines = app.lines();
        if lines.len() >= count {
            Ok(lines)
        } else {
            Err(format!("{} reloads, want {count}", lines.len()))
        }
    })
}

fn bundle_reloads(path: &Path) -> usize {
    fs::read_to_string(path).unwrap_or_default().lines().count()
}

#[test]
fn a_pod_certificate_rotates_daily_and_every_reload_finds_a_matching_pair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (logs, _dump) = crate::support::DumpLogsOnFailure::logs_in(dir.path());
    let (ca1, ca2, rogue) = (
        Ca::new("Cluster Signer 2026"),
        Ca::new("Cluster Signer 2027"),
        Ca::new("Rogue Signer"),
    );
    let first = daily(&ca1);
    let mut projection = Projection::new(&dir.path().join("projected"), &[&ca1], &first);
    let split = dir.path().join("shared/tls");
    let app = App::start_pair(&logs, &split);
    let bundle_log = logs.join("bundle-reloads");
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            r#"[daemon]
debounce = "0s"

[[bundle]]
name = "cluster-trust"
sources = ["{trust}"]

  [[bundle.output]]
  path = "{output}"

  [[bundle.reload]]
  exec = ["sh", "-c", "echo reloaded >> {bundle_log}"]

[[keypair]]
name = "pod"
credential_bundle = "{credentials}"
split_dir = "{split}"
chain_to = "cluster-trust"

  [[keypair.reload]]
  signal = "HUP"
  pid_file = "{pid_file}"
"#,
            trust = s(&projection.path("ca-bundle.pem")),
            output = s(&dir.path().join("shared/ca.pem")),
            bundle_log = s(&bundle_log),
            credentials = s(&projection.path("credentialbundle.pem")),
            split = s(&split),
            pid_file = s(&app.pid_file),
        ),
    );
    let daemon = Daemon::start(&logs, &["--config", s(&config)]);

    // At start the split pair is written, and the app, which reads it when
    // it starts, is not reloaded.
    daemon.wait_log("key pair checked", 1);
    eventually(PATIENCE, || {
        pair_matches(
            &fs::read(split.join("tls.crt")).map_err(|e| e.to_string())?,
            &fs::read(split.join("tls.key")).map_err(|e| e.to_string())?,
        )
    });
    assert_eq!(
        pem_certs(&fs::read(split.join("tls.crt")).expect("tls.crt"))[0],
        first.cert.der().to_vec()
    );
    assert!(
        fs::symlink_metadata(split.join("tls.key"))
            .expect("tls.key")
            .file_type()
            .is_symlink(),
        "tls.key is a link through ..data"
    );
    eventually(PATIENCE, || {
        (bundle_reloads(&bundle_log) == 1)
            .then_some(())
            .ok_or("the bundle's first render".to_owned())
    });
    assert!(
        app.lines().is_empty(),
        "a reload at start: {:?}",
        app.lines()
    );
    // Waiting at start for the bundle's first render is no warning.
    assert!(
        !daemon.log().contains("has not rendered yet"),
        "{}",
        daemon.log()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mismatches = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (split, stop, mismatches) = (split.clone(), stop.clone(), mismatches.clone());
        std::thread::spawn(move || hammer(split, stop, mismatches))
    };

    // A week of daily rotations: one reload each, each a matching pair.
    let mut expected = Vec::new();
    for day in 1..=7 {
        let leaf = daily(&ca1);
        projection.credentials(credential_bundle(&leaf, &[]));
        let lines = wait_app(&app, day);
        assert_eq!(
            lines[day - 1],
            format!("ok {} 600", leaf_sha(&leaf)),
            "day {day}"
        );
        expected.push(leaf_sha(&leaf));
    }

    // The signer previews its next CA: the merged bundle gains it (a
    // bundle reload), the pod's pair does not change (no app reload).
    projection.trust(&[&ca1, &ca2], 0);
    eventually(PATIENCE, || {
        (bundle_reloads(&bundle_log) == 2)
            .then_some(())
            .ok_or("the bundle reload for the new CA".to_owned())
    });
    // kubelet writes the same set in another order: no change at all.
    let unchanged = daemon.log().matches("outcome=\"unchanged\"").count();
    projection.trust(&[&ca1, &ca2], 1);
    daemon.wait_log("outcome=\"unchanged\"", unchanged + 1);

    // A leaf from the new CA chains to the updated bundle: accepted.
    let leaf = daily(&ca2);
    projection.credentials(credential_bundle(&leaf, &[]));
    assert_eq!(wait_app(&app, 8)[7], format!("ok {} 600", leaf_sha(&leaf)));
    let last_good = leaf;

    // A bundle whose key is not its leaf's: held, nothing written, no reload.
    let held = daemon.log().matches("key pair held").count();
    let (a, b) = (daily(&ca2), daily(&ca2));
    let mut mixed = b.key.serialize_pem();
    mixed.push_str(&a.cert.pem());
    projection.credentials(mixed.into_bytes());
    daemon.wait_log("key pair held", held + 1);
    assert!(
        daemon.log().contains("does not match the leaf certificate"),
        "{}",
        daemon.log()
    );
    // A leaf from a signer the bundle does not trust: held by chain_to.
    projection.credentials(credential_bundle(&daily(&rogue), &[]));
    daemon.wait_log("key pair held", held + 2);
    assert_eq!(
        pem_certs(&fs::read(split.join("tls.crt")).expect("tls.crt"))[0],
        last_good.cert.der().to_vec(),
        "a held pair reached the split directory"
    );

    // The old CA leaves the bundle; a leaf not valid for two more seconds
    // is held until its notBefore, then reloaded with no file event.
    projection.trust(&[&ca2], 0);
    eventually(PATIENCE, || {
        (bundle_reloads(&bundle_log) == 3)
            .then_some(())
            .ok_or("the bundle reload for the retired CA".to_owned())
    });
    let now = time::OffsetDateTime::now_utc();
    let early = ca2.leaf_valid(
        "pod.ns.svc",
        now + time::Duration::seconds(2),
        now + time::Duration::hours(24),
    );
    projection.credentials(credential_bundle(&early, &[]));
    daemon.wait_log("is not valid before", 1);
    let lines = wait_app(&app, 9);
    assert_eq!(lines[8], format!("ok {} 600", leaf_sha(&early)));

    stop.store(true, Ordering::Relaxed);
    let (checked, leaves) = reader.join().expect("reader");
    assert_eq!(
        mismatches.load(Ordering::Relaxed),
        0,
        "a reader through ..data saw a mismatched pair"
    );
    eprintln!(
        "pod certificate: 9 rotations, {checked} reads of the split pair through ..data, {leaves} distinct leaves, 0 mismatched"
    );
    assert!(leaves >= 5, "the reader saw only {leaves} leaves");

    // One reload per real change, each a matching pair.
    let lines = app.lines();
    assert_eq!(lines.len(), 9, "{lines:?}");
    assert!(lines.iter().all(|l| l.starts_with("ok ")), "{lines:?}");
    assert_eq!(bundle_reloads(&bundle_log), 3);
    // The key reached no log line.
    let key_line = early
        .key
        .serialize_pem()
        .lines()
        .nth(1)
        .expect("key body")
        .to_owned();
    assert!(!daemon.log().contains(&key_line), "the key was logged");
    assert_eq!(daemon.stop(), 0);
}

#[test]
fn the_flags_and_their_variables_split_a_credential_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Flags Signer");
    let leaf = daily(&ca);
    let projection = Projection::new(&dir.path().join("projected"), &[&ca], &leaf);
    let split = dir.path().join("tls");
    let app = App::start_pair(dir.path(), &split);
    let credentials = projection.path("credentialbundle.pem");
    let daemon = Daemon::start_with(dir.path(), &["--pid-file", s(&app.pid_file)], |cmd| {
        cmd.env("ANCHORAGE_CREDENTIAL_BUNDLE", &credentials)
            .env("ANCHORAGE_SPLIT_DIR", &split)
            .env("ANCHORAGE_KEY_MODE", "0640")
            .env("ANCHORAGE_DEBOUNCE", "0");
    });
    let mut projection = projection;
    daemon.wait_log("key pair checked", 1);
    let next = daily(&ca);
    projection.credentials(credential_bundle(&next, &[&ca]));
    let lines = wait_app(&app, 1);
    assert_eq!(lines[0], format!("ok {} 640", leaf_sha(&next)));
    // The whole chain, leaf first, reaches tls.crt.
    assert_eq!(
        pem_certs(&fs::read(split.join("tls.crt")).expect("tls.crt")),
        vec![next.cert.der().to_vec(), ca.der()]
    );
    assert_eq!(daemon.stop(), 0);
}
