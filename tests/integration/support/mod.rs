//! What the integration tests share: the test PKI, a way to run the real
//! binary, and small filesystem helpers.

#![allow(dead_code)]

pub mod daemon;
pub mod hang;
pub mod kubelet;
pub mod pki;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The real `anchorage` binary, with no `ANCHORAGE_*` variable inherited.
pub fn anchorage() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_anchorage"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ANCHORAGE_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

/// Runs `anchorage ARGS` to completion.
pub fn run(args: &[&str]) -> Outcome {
    Outcome::of(anchorage().args(args).output().expect("run anchorage"))
}

pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn of(output: Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Writes `bytes` at `dir/name`, creating `dir`.
pub fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write");
    path
}

pub fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The certificates of a PEM bundle, as DER, in order.
pub fn pem_certs(bytes: &[u8]) -> Vec<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(bytes)
        .map(|c| c.expect("pem").to_vec())
        .collect()
}

/// Runs a shell command, panicking with its output if it fails.
#[track_caller]
pub fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lowercase hex SHA-256 of a file's bytes, as the stand-in app logs it.
pub fn file_sha256(path: &Path) -> String {
    pki::sha256_hex(&std::fs::read(path).expect("read"))
}

/// Runs `script` with `sh` in a new mount namespace (root only), so a test
/// can mount without touching the machine. `None` when this machine cannot
/// (no privilege): the caller skips, saying so. A script exits 77 when its
/// own `mount` is refused.
pub fn in_mount_namespace(script: &str) -> Option<Output> {
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", script])
        .output()
        .expect("unshare");
    let refused = out.status.code() == Some(77)
        || (!out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("unshare failed"));
    if refused {
        eprintln!(
            "skipped: cannot mount here: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(out)
}

/// The PEM blocks of these CAs, concatenated: a Secret's `ca.crt`.
pub fn pems(cas: &[&pki::Ca]) -> Vec<u8> {
    cas.iter().map(|c| c.pem()).collect::<String>().into_bytes()
}

/// A port nobody listened on a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A server binary: Debian puts daemons in /usr/sbin, which a non-root PATH
/// often lacks; elsewhere, the first on PATH.
pub fn system_binary(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/local/sbin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is missing: run scripts/install-test-deps"))
}

/// Prints every file of a directory of logs when the test fails (dropped
/// while panicking).
pub struct DumpLogsOnFailure(pub PathBuf);

impl DumpLogsOnFailure {
    /// `dir/logs`, made, with the guard that prints it if the test fails:
    /// the end-to-end tests' preamble.
    pub fn logs_in(dir: &Path) -> (PathBuf, Self) {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).expect("mkdir logs");
        (logs.clone(), Self(logs))
    }
}

impl Drop for DumpLogsOnFailure {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            eprintln!("--- {}\n{text}", entry.path().display());
        }
    }
}

/// A SPIFFE trust bundle (a JWK Set, as SPIRE publishes it) holding these
/// CAs as X.509 authorities, and `jwt_keys` JWT authorities (which carry no
/// certificate and must be ignored).
pub fn spiffe_bundle(cas: &[&pki::Ca], jwt_keys: usize, sequence: u64) -> String {
    use base64::Engine as _;
    let mut keys: Vec<serde_json::Value> = cas
        .iter()
        .map(|ca| {
            serde_json::json!({
                "use": "x509-svid",
                "kty": "EC",
                "crv": "P-256",
                "x": "fK-wKTnKL7KFLM27lqq5DC-bxrVaH6rDV-IcCSEOeL4",
                "y": "wq-g3TQWxYlV51TCPH030yXsRxvujD4hUUaIQrXk4KI",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(ca.der())],
            })
        })
        .collect();
    for i in 0..jwt_keys {
        keys.insert(
            i.min(keys.len()),
            serde_json::json!({
                "use": "jwt-svid",
                "kty": "EC",
                "kid": format!("jwt-key-{i}"),
                "crv": "P-256",
                "x": "fK-wKTnKL7KFLM27lqq5DC-bxrVaH6rDV-IcCSEOeL4",
                "y": "wq-g3TQWxYlV51TCPH030yXsRxvujD4hUUaIQrXk4KI",
            }),
        );
    }
    serde_json::to_string_pretty(&serde_json::json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": 300,
    }))
    .expect("json")
}

/// Waits until the PEM bundle at `path` holds `want` certificates.
#[track_caller]
pub fn wait_certs(path: &Path, want: usize) {
    daemon::eventually(std::time::Duration::from_secs(20), || {
        let got = std::fs::read(path)
            .map(|b| pem_certs(&b).len())
            .unwrap_or(0);
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "{}: {got} certificates, want {want}",
                path.display()
            ))
        }
    });
}
