//! End-to-end: Java reads anchorage's `pkcs12` and `jks` truststores,
//! through a whole CA rotation.
//!
//! A JVM reads `javax.net.ssl.trustStore` once, when its default SSLContext
//! is first built, so a Java app takes new trust by starting again: every
//! check here is a fresh JVM running `fixtures/Client.java` (compiled once
//! per test) with the standard `javax.net.ssl.trustStore*` properties, as
//! a restarted app would. `keytool -list` shows what Java finds in each
//! store.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::daemon::{Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::Ca;
use crate::support::tls::{self, Identity, Server};
use crate::support::{pems, s, sh, write};

const CLIENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/integration/e2e/fixtures/Client.java"
);
/// Generous: a check is a JVM start, on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(60);

/// One way a Java app is pointed at one of anchorage's outputs.
struct Store {
    label: &'static str,
    path: PathBuf,
    kind: &'static str,
    /// `None`: no `javax.net.ssl.trustStorePassword` property at all.
    password: Option<&'static str>,
}

impl Store {
    fn java(&self, classes: &Path, ports: &[u16]) -> Command {
        let mut cmd = Command::new("java");
        cmd.args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp"])
            .arg(classes)
            .arg(format!("-Djavax.net.ssl.trustStore={}", s(&self.path)))
            .arg(format!("-Djavax.net.ssl.trustStoreType={}", self.kind));
        if let Some(password) = self.password {
            cmd.arg(format!("-Djavax.net.ssl.trustStorePassword={password}"));
        }
        cmd.arg("Client")
            .args(ports.iter().map(u16::to_string))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// The SHA-256 fingerprints of the `trustedCertEntry`s keytool lists
    /// (uppercase, colon-separated, as keytool prints them), sorted.
    fn keytool_list(&self) -> Vec<String> {
        let text = sh(&format!(
            "keytool -list -keystore '{}' -storetype {} -storepass '{}' </dev/null",
            s(&self.path),
            self.kind,
            self.password.unwrap_or_default()
        ));
        let entries = text.matches("trustedCertEntry").count();
        let mut prints: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("Certificate fingerprint (SHA-256): "))
            .map(str::to_owned)
            .collect();
        assert_eq!(entries, prints.len(), "only trustedCertEntry:\n{text}");
        prints.sort();
        prints
    }
}

/// keytool's rendering of `ca`'s fingerprint.
fn keytool_print(ca: &Ca) -> String {
    ca.sha256()
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn prints(cas: &[&Ca]) -> Vec<String> {
    let mut v: Vec<String> = cas.iter().map(|c| keytool_print(c)).collect();
    v.sort();
    v
}

/// Kills a JVM still running when dropped (a test that failed mid-way).
struct Jvm(Option<Child>);

impl Drop for Jvm {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a fresh JVM per store, all at once; per store, per port, the
/// client's verdict: `ok` or `refused <exception>`.
fn verdicts(stores: &[&Store], classes: &Path, ports: &[u16]) -> Vec<BTreeMap<u16, String>> {
    let jvms: Vec<Jvm> = stores
        .iter()
        .map(|st| Jvm(Some(st.java(classes, ports).spawn().expect("start java"))))
        .collect();
    jvms.into_iter()
        .zip(stores)
        .map(|(mut jvm, store)| {
            let out = jvm
                .0
                .take()
                .expect("spawned")
                .wait_with_output()
                .expect("wait java");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{}: java failed:\n{text}{}",
                store.label,
                String::from_utf8_lossy(&out.stderr)
            );
            let map: BTreeMap<u16, String> = text
                .lines()
                .filter_map(|l| l.split_once(' '))
                .filter_map(|(port, rest)| Some((port.parse().ok()?, rest.to_owned())))
                .collect();
            assert_eq!(map.len(), ports.len(), "{}: {text}", store.label);
            map
        })
        .collect()
}

/// Asserts each store's JVM accepts `good` and refuses `bad` with a PKIX
/// path building failure.
#[track_caller]
fn expect(stores: &[&Store], classes: &Path, good: &Server, bad: &Server, when: &str) {
    let all = verdicts(stores, classes, &[good.port, bad.port]);
    for (store, got) in stores.iter().zip(all) {
        assert_eq!(got[&good.port], "ok", "{when}: {} {got:?}", store.label);
        let refused = &got[&bad.port];
        assert!(
            refused.starts_with("refused ") && refused.contains("PKIX path building failed"),
            "{when}: {} should refuse: {refused}",
            store.label
        );
    }
}

/// A TLS server on a leaf for `localhost` issued by `ca`.
fn server(dir: &Path, ca: &Ca) -> Server {
    let leaf = ca.leaf("localhost");
    let tag = ca.sha256();
    let id = Identity {
        cert: write(dir, &format!("{tag}.crt"), leaf.cert.pem()),
        key: write(dir, &format!("{tag}.key"), leaf.key.serialize_pem()),
        trust: dir.join("unused"),
    };
    Server::start(tls::server_config(&id, false))
}

#[test]
fn java_takes_the_rotated_trust_from_pkcs12_and_jks_outputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (Ca::new("Java Old CA"), Ca::new("Java New CA"));
    let certs = dir.path().join("certs");
    let old_server = server(&certs, &old);
    let new_server = server(&certs, &new);

    // The client, compiled once (a JVM start per check is cost enough).
    let classes = dir.path().join("classes");
    sh(&format!("javac -d '{}' '{CLIENT}'", s(&classes)));

    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&old]))]);
    let out = dir.path().join("out");
    let p12 = out.join("trust.p12");
    let p12_secret = out.join("trust-secret.p12");
    let jks = out.join("trust.jks");
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            r#"
[[bundle]]
name = "java"
sources = ["{source}"]

  [[bundle.output]]
  path = "{p12}"
  format = "pkcs12"

  [[bundle.output]]
  path = "{p12_secret}"
  format = "pkcs12"
  password = "s3cret"

  [[bundle.output]]
  path = "{jks}"
  format = "jks"
"#,
            source = s(&volume.dir),
            p12 = s(&p12),
            p12_secret = s(&p12_secret),
            jks = s(&jks),
        ),
    );
    // The default pkcs12 has the empty password and no MAC: Java 17 reads
    // it with no password property at all, and with an empty one.
    let p12_bare = Store {
        label: "pkcs12, no password property",
        path: p12.clone(),
        kind: "PKCS12",
        password: None,
    };
    let p12_empty = Store {
        label: "pkcs12, empty password",
        path: p12.clone(),
        kind: "PKCS12",
        password: Some(""),
    };
    let p12_pass = Store {
        label: "pkcs12, password s3cret",
        path: p12_secret.clone(),
        kind: "PKCS12",
        password: Some("s3cret"),
    };
    let jks_store = Store {
        label: "jks, password changeit",
        path: jks.clone(),
        kind: "JKS",
        password: Some("changeit"),
    };
    let all = [&p12_bare, &p12_empty, &p12_pass, &jks_store];
    let listed = [&p12_bare, &p12_pass, &jks_store];

    let logs = dir.path().join("logs");
    fs::create_dir_all(&logs).expect("mkdir logs");
    let daemon = Daemon::start(&logs, &["--config", s(&config), "--debounce", "0"]);
    eventually(WAIT, || {
        if [&p12, &p12_secret, &jks].iter().all(|p| p.exists()) {
            Ok(())
        } else {
            Err(format!("outputs not written yet\n{}", daemon.log()))
        }
    });

    // Before: CA-old is trusted, CA-new is not.
    for store in listed {
        assert_eq!(store.keytool_list(), prints(&[&old]), "{}", store.label);
    }
    expect(
        &all,
        &classes,
        &old_server,
        &new_server,
        "before the rotation",
    );

    // The Secret carries both CAs: a fresh JVM accepts CA-new.
    let before = fs::read(&p12).expect("read p12");
    volume.write(&[("ca.crt", &pems(&[&old, &new]))]);
    let swap = Instant::now();
    let mut last_jvm = Duration::ZERO;
    eventually(WAIT, || {
        let started = Instant::now();
        let got = verdicts(&[&p12_bare], &classes, &[new_server.port]).remove(0);
        last_jvm = started.elapsed();
        match &got[&new_server.port] {
            v if v == "ok" => Ok(()),
            v => Err(v.clone()),
        }
    });
    let took = swap.elapsed();
    eprintln!(
        "java: swap -> first CA-new connection accepted: {} ms (includes starting a JVM for each check; the accepting one took {} ms)",
        took.as_millis(),
        last_jvm.as_millis()
    );
    assert_ne!(fs::read(&p12).expect("read p12"), before);
    // The jks is the last output written.
    eventually(WAIT, || {
        if jks_store.keytool_list() == prints(&[&old, &new]) {
            Ok(())
        } else {
            Err("the jks output does not hold both CAs yet".into())
        }
    });
    for store in listed {
        assert_eq!(
            store.keytool_list(),
            prints(&[&old, &new]),
            "{}",
            store.label
        );
    }
    let both = verdicts(&all, &classes, &[old_server.port, new_server.port]);
    for (store, got) in all.iter().zip(both) {
        assert!(got.values().all(|v| v == "ok"), "{}: {got:?}", store.label);
    }

    // The Secret drops CA-old: a fresh JVM refuses a CA-old server.
    volume.write(&[("ca.crt", &pems(&[&new]))]);
    // The jks is the last output written.
    eventually(WAIT, || {
        if jks_store.keytool_list() == prints(&[&new]) {
            Ok(())
        } else {
            Err("the jks output still holds CA-old".into())
        }
    });
    for store in listed {
        assert_eq!(store.keytool_list(), prints(&[&new]), "{}", store.label);
    }
    expect(
        &all,
        &classes,
        &new_server,
        &old_server,
        "after CA-old was dropped",
    );

    let log = daemon.log();
    assert!(!log.contains("refused"), "{log}");
    assert!(!log.contains("cannot write output"), "{log}");
}
