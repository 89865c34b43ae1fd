//! SPIFFE trust bundles (JWK Sets, as SPIRE publishes them) as sources:
//! read beside PEM, in kubelet volumes, listed by `check`, and refused whole
//! when damaged, keeping the last good output.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::support::daemon::{App, Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::{Ca, sha256_hex};
use crate::support::{file_sha256, pem_certs, run, s, spiffe_bundle, write};

fn fingerprints(path: &Path) -> Vec<String> {
    let mut found: Vec<String> = pem_certs(&fs::read(path).unwrap_or_default())
        .iter()
        .map(|d| sha256_hex(d))
        .collect();
    found.sort();
    found
}

fn sorted(cas: &[&Ca]) -> Vec<String> {
    let mut want: Vec<String> = cas.iter().map(|c| c.sha256()).collect();
    want.sort();
    want
}

#[test]
fn a_spiffe_bundle_renders_beside_pem_and_its_jwt_keys_are_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, corp) = (Ca::new("SPIFFE A"), Ca::new("SPIFFE B"), Ca::new("Corp"));
    let bundle = write(dir.path(), "bundle.json", spiffe_bundle(&[&a, &b], 2, 1));
    let pem = write(dir.path(), "corp.pem", corp.pem());
    let out = dir.path().join("out/ca.pem");
    run(&[
        "render",
        "--source",
        s(&bundle),
        "--source",
        s(&pem),
        "--output",
        s(&out),
    ])
    .expect_code(0);
    assert_eq!(fingerprints(&out), sorted(&[&a, &b, &corp]));

    // `check` reads it the same way: one report per X.509 authority.
    let checked = run(&["check", "--json", s(&bundle)]);
    checked.expect_code(0);
    let reports: serde_json::Value = serde_json::from_str(&checked.stdout).expect("json");
    let reports = reports.as_array().expect("array");
    assert_eq!(reports.len(), 2, "{}", checked.stdout);
    for (i, (report, ca)) in reports.iter().zip([&a, &b]).enumerate() {
        assert_eq!(report["path"], s(&bundle));
        assert_eq!(report["index"], i);
        assert_eq!(report["sha256"], ca.sha256());
        assert_eq!(report["is_ca"], true);
    }
    // The table too, and a directory holding it.
    let table = run(&["check", s(dir.path())]);
    table.expect_code(0);
    assert!(table.stdout.contains("SPIFFE A"), "{}", table.stdout);
    assert!(table.stdout.contains("SPIFFE B"), "{}", table.stdout);
}

#[test]
fn a_damaged_spiffe_bundle_fails_render_and_check_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Ca::new("Damaged A");
    let whole = spiffe_bundle(&[&a], 1, 1);
    let cases = [
        // Cut short mid-copy.
        (whole[..whole.len() / 2].to_owned(), "not valid JSON"),
        // JSON, but no key set.
        ("{\"spiffe_sequence\": 1}".to_owned(), "not a SPIFFE bundle"),
        // An X.509 authority whose x5c is not a certificate.
        (
            "{\"keys\": [{\"use\": \"x509-svid\", \"kty\": \"EC\", \"x5c\": [\"AAAA\"]}]}"
                .to_owned(),
            "x5c entry 0 is not a DER certificate",
        ),
    ];
    let good = write(dir.path(), "good.pem", a.pem());
    for (i, (text, reason)) in cases.iter().enumerate() {
        let bad = write(dir.path(), &format!("bad{i}.json"), text);
        let out = dir.path().join(format!("out{i}.pem"));
        let render = run(&[
            "render",
            "--source",
            s(&good),
            "--source",
            s(&bad),
            "--output",
            s(&out),
        ]);
        render.expect_code(1);
        assert!(
            render.stderr.contains(s(&bad)) && render.stderr.contains(reason),
            "{reason}: {}",
            render.stderr
        );
        assert!(!out.exists(), "a refused bundle wrote {}", out.display());
        let check = run(&["check", "--json", s(&bad)]);
        check.expect_code(1);
        assert!(check.stderr.contains(reason), "{}", check.stderr);
    }
}

#[test]
fn a_spiffe_bundle_in_a_kubelet_volume_rotates_and_a_damaged_one_keeps_the_last_good() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (Ca::new("Trust Domain Old"), Ca::new("Trust Domain New"));
    // A ConfigMap written by SPIRE's k8s_configmap publisher, format spiffe.
    let mut volume = Volume::new(&dir.path().join("spire-bundle"));
    volume.write(&[("bundle", spiffe_bundle(&[&old], 1, 1).as_bytes())]);
    let output = dir.path().join("out/ca.pem");
    let app = App::start(dir.path(), &output);
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&volume.dir),
            "--output",
            s(&output),
            "--pid-file",
            s(&app.pid_file),
            "--debounce",
            "0",
        ],
    );
    eventually(Duration::from_secs(15), || {
        (fingerprints(&output) == sorted(&[&old]))
            .then_some(())
            .ok_or("first render".to_owned())
    });
    app.wait_reloads(1);

    // SPIRE prepares the new authority: both are published.
    volume.write(&[("bundle", spiffe_bundle(&[&old, &new], 1, 2).as_bytes())]);
    let reloads = app.wait_reloads(2);
    assert_eq!(fingerprints(&output), sorted(&[&old, &new]));
    assert_eq!(reloads[1], file_sha256(&output));

    // A damaged publication: refused, the output and the app keep both CAs.
    let good = fs::read(&output).expect("output");
    volume.write(&[(
        "bundle",
        b"{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"MIIB".as_slice(),
    )]);
    daemon.wait_log("bundle refused", 1);
    let log = daemon.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("bundle refused"))
        .expect("refusal line");
    assert!(
        refusal.contains(s(&volume.dir.join("bundle"))) && refusal.contains("not valid JSON"),
        "{refusal}"
    );
    assert_eq!(fs::read(&output).expect("output"), good);

    // The old authority retired: one more render, one more reload.
    volume.write(&[("bundle", spiffe_bundle(&[&new], 1, 3).as_bytes())]);
    let reloads = app.wait_reloads(3);
    assert_eq!(fingerprints(&output), sorted(&[&new]));
    assert_eq!(reloads[2], file_sha256(&output));
    assert_eq!(app.reloads().len(), 3, "one reload per real change");
    assert_eq!(daemon.stop(), 0);
}
