//! End-to-end: a real `nats-server` (client TLS with `verify: true`) through
//! a whole CA rotation written kubelet-style. anchorage renders the bundle
//! NATS reads as `ca_file` and reloads NATS by SIGHUP through its pid file;
//! NATS re-reads `ca_file` on reload (server/reload.go) and keeps running.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use crate::support::daemon::{Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::{Ca, sha256_hex};
use crate::support::tls;
use crate::support::{DumpLogsOnFailure, free_port, pem_certs, pems, s, system_binary, write};

const PATIENCE: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The running `nats-server`, killed when dropped.
struct NatsServer {
    child: Child,
    log: PathBuf,
    pid_file: PathBuf,
}

impl NatsServer {
    /// Starts `nats-server -c CONFIG` and waits until its pid file names it.
    fn start(config: &Path, pid_file: &Path, log: &Path) -> Self {
        let out = fs::File::create(log).expect("nats log");
        let child = Command::new(system_binary("nats-server"))
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start nats-server");
        let mut nats = Self {
            child,
            log: log.to_path_buf(),
            pid_file: pid_file.to_path_buf(),
        };
        let pid = nats.pid();
        eventually(PATIENCE, || {
            nats.assert_running();
            match nats.pid_in_file() {
                Some(p) if p == pid => Ok(()),
                other => Err(format!("nats pid file holds {other:?}, want {pid}")),
            }
        });
        nats
    }

    fn pid_in_file(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    #[track_caller]
    fn assert_running(&mut self) {
        let status = self.child.try_wait().expect("wait nats-server");
        assert!(status.is_none(), "nats-server exited: {status:?}");
    }

    fn reloads(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("Reloaded server configuration")
            .count()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A NATS client session: plain-text INFO, the TLS upgrade, CONNECT and
/// PING. `Ok` once the server answers PONG; any other outcome is a refusal.
fn nats_session(port: u16, config: &Arc<ClientConfig>) -> Result<(), String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT)).ok();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).ok();
    let mut info = Vec::new();
    let mut byte = [0u8; 1];
    while info.last() != Some(&b'\n') {
        tcp.read_exact(&mut byte)
            .map_err(|e| format!("reading INFO: {e}"))?;
        info.push(byte[0]);
        if info.len() > 64 * 1024 {
            return Err("INFO line too long".into());
        }
    }
    let info = String::from_utf8_lossy(&info);
    if !info.starts_with("INFO ") || !info.contains("\"tls_required\":true") {
        return Err(format!("unexpected greeting: {info}"));
    }
    let name = ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream
        .write_all(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":true}\r\nPING\r\n",
        )
        .and_then(|()| stream.flush())
        .map_err(|e| format!("TLS: {e}"))?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).map_err(|e| format!("TLS: {e}"))?;
        if n == 0 {
            return Err(format!(
                "closed before PONG: {:?}",
                String::from_utf8_lossy(&seen)
            ));
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if text.contains("-ERR") {
            return Err(format!("server said {}", text.trim()));
        }
        if text.contains("PONG\r\n") {
            return Ok(());
        }
    }
}

/// `nats.conf` in `dir`: client TLS on `port` with its key pair, trusting
/// the clients of `ca` only (`verify: true`).
fn nats_config(
    dir: &Path,
    port: u16,
    pid_file: &Path,
    (cert, key): (&Path, &Path),
    ca: &Path,
) -> PathBuf {
    write(
        dir,
        "nats.conf",
        format!(
            "listen: \"127.0.0.1:{port}\"
pid_file: \"{pid_file}\"
tls {{
  cert_file: \"{cert}\"
  key_file: \"{key}\"
  ca_file: \"{ca}\"
  verify: true
  timeout: 5
}}
",
            pid_file = s(pid_file),
            cert = s(cert),
            key = s(key),
            ca = s(ca),
        ),
    )
}

#[track_caller]
fn wait_accepted(what: &str, port: u16, config: &Arc<ClientConfig>) {
    eventually(PATIENCE, || {
        nats_session(port, config).map_err(|e| format!("{what} refused: {e}"))
    });
}

#[track_caller]
fn wait_refused(what: &str, port: u16, config: &Arc<ClientConfig>) -> String {
    eventually(PATIENCE, || match nats_session(port, config) {
        Ok(()) => Err(format!("{what} still accepted")),
        Err(e) => Ok(e),
    })
}

fn bundle_fingerprints(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = pem_certs(&fs::read(path).unwrap_or_default())
        .iter()
        .map(|d| sha256_hex(d))
        .collect();
    v.sort();
    v
}

#[track_caller]
fn wait_bundle(path: &Path, want: &[&Ca]) {
    let mut want: Vec<String> = want.iter().map(|c| c.sha256()).collect();
    want.sort();
    eventually(PATIENCE, || {
        let got = bundle_fingerprints(path);
        if got == want {
            Ok(())
        } else {
            Err(format!(
                "{} has {} certificates, not the expected set",
                path.display(),
                got.len()
            ))
        }
    });
}

#[test]
fn nats_takes_a_ca_rotation_by_sighup_without_restarting() {
    system_binary("nats-server");
    let dir = tempfile::tempdir().expect("tempdir");
    let (logs, _dump) = DumpLogsOnFailure::logs_in(dir.path());

    let (ca_old, ca_new) = (Ca::new("NATS Clients Old"), Ca::new("NATS Clients New"));
    let server_ca = Ca::new("NATS Server CA");
    let pki = dir.path().join("pki");
    let server_ca_file = write(&pki, "server-ca.pem", server_ca.pem());
    let (server_cert, server_key) = server_ca.leaf("localhost").write(&pki, "server");
    let old_client = tls::fresh_client(&pki, "client-old", &ca_old, &server_ca_file);
    let new_client = tls::fresh_client(&pki, "client-new", &ca_new, &server_ca_file);

    // The Secret holds CA-old; anchorage renders it before NATS starts.
    let mut secret = Volume::new(&dir.path().join("secret"));
    secret.write(&[("ca.crt", &pems(&[&ca_old]))]);
    let output = dir.path().join("out").join("clients-ca.pem");
    fs::create_dir_all(output.parent().expect("parent")).expect("mkdir out");
    let nats_dir = dir.path().join("nats");
    let pid_file = nats_dir.join("nats.pid");
    let secret_dir = secret.dir.clone();
    let daemon = Daemon::start(
        &logs,
        &[
            "--source",
            s(&secret_dir),
            "--output",
            s(&output),
            "--pid-file",
            s(&pid_file),
            "--signal",
            "HUP",
            "--debounce",
            "0",
        ],
    );
    wait_bundle(&output, &[&ca_old]);

    let port = free_port();
    let config = nats_config(
        &nats_dir,
        port,
        &pid_file,
        (&server_cert, &server_key),
        &output,
    );
    let mut nats = NatsServer::start(&config, &pid_file, &logs.join("nats-server.log"));
    let pid = nats.pid();

    // Before: CA-old clients are accepted, CA-new clients refused.
    wait_accepted("a CA-old client", port, &old_client);
    let refusal = nats_session(port, &new_client).expect_err("a CA-new client before the rotation");
    eprintln!("nats: before the rotation a CA-new client is refused ({refusal})");

    // The Secret gains CA-new: NATS is reloaded and accepts CA-new clients.
    let swap = Instant::now();
    secret.write(&[("ca.crt", &pems(&[&ca_old, &ca_new]))]);
    wait_accepted("a CA-new client after CA-new was added", port, &new_client);
    let took = swap.elapsed();
    eprintln!(
        "nats: swap -> first CA-new connection accepted: {} ms",
        took.as_millis()
    );
    wait_bundle(&output, &[&ca_old, &ca_new]);
    nats_session(port, &old_client).expect("a CA-old client during the rotation");
    nats.assert_running();

    // The Secret drops CA-old: after the reload CA-old clients are refused.
    let swap = Instant::now();
    secret.write(&[("ca.crt", &pems(&[&ca_new]))]);
    let refusal = wait_refused(
        "a CA-old client after CA-old was dropped",
        port,
        &old_client,
    );
    eprintln!(
        "nats: swap -> first CA-old connection refused: {} ms ({refusal})",
        swap.elapsed().as_millis()
    );
    wait_bundle(&output, &[&ca_new]);
    nats_session(port, &new_client).expect("a CA-new client after the rotation");

    // One process all along, reloaded once per change of the bundle.
    nats.assert_running();
    assert_eq!(nats.pid(), pid);
    assert_eq!(nats.pid_in_file(), Some(pid), "nats-server kept its pid");
    eventually(PATIENCE, || match nats.reloads() {
        2 => Ok(()),
        n => Err(format!("nats-server reloaded {n} times, want 2")),
    });
    assert!(
        !daemon.log().contains("ERROR"),
        "anchorage logged an error:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.stop(), 0);
    assert_eq!(nats.reloads(), 2, "no reload at anchorage's exit");
    eprintln!(
        "nats: pid {pid} kept through 2 reloads; CA-new accepted {} ms after the swap",
        took.as_millis()
    );
}

/// NATS's own key pair, rotated in its Secret: anchorage checks the pair,
/// signals NATS, and its TLS probe reads the client port (INFO in plain
/// text, then TLS; `verify: true` refuses the probe's missing client
/// certificate) to see the new certificate served. At start the probe
/// finds the current one and no reload is sent.
#[test]
fn nats_serves_a_rotated_key_pair_and_the_probe_sees_it() {
    system_binary("nats-server");
    let dir = tempfile::tempdir().expect("tempdir");
    let (logs, _dump) = DumpLogsOnFailure::logs_in(dir.path());

    let tls::MutualPki {
        server_ca,
        clients_ca_file,
        client,
    } = tls::MutualPki::new(&dir.path().join("pki"), "NATS");
    let (first, second) = (server_ca.leaf("localhost"), server_ca.leaf("localhost"));
    let mut secret = Volume::new(&dir.path().join("secret"));
    let (cert, key) = secret.write_pair(&first);

    let nats_dir = dir.path().join("nats");
    let pid_file = nats_dir.join("nats.pid");
    let port = free_port();
    let nats_config = nats_config(&nats_dir, port, &pid_file, (&cert, &key), &clients_ca_file);
    let mut nats = NatsServer::start(&nats_config, &pid_file, &logs.join("nats-server.log"));
    let pid = nats.pid();
    wait_accepted("a client before the rotation", port, &client);

    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            "[[keypair]]
name = \"nats\"
cert = \"{cert}\"
key = \"{key}\"

  [[keypair.reload]]
  signal = \"HUP\"
  pid_file = \"{pid_file}\"
  probe = \"127.0.0.1:{port}\"
  probe_timeout = \"20s\"
",
            cert = s(&cert),
            key = s(&key),
            pid_file = s(&pid_file),
        ),
    );
    let daemon = Daemon::start(&logs, &["--config", s(&config), "--debounce", "0"]);
    // The probe read NATS's port at start: it serves the pair already.
    daemon.wait_log(
        "the app already serves the current certificate; no reload",
        1,
    );
    assert_eq!(nats.reloads(), 0, "no reload at start");

    secret.write_pair(&second);
    daemon.wait_log("probe: the app took the change", 1);
    eventually(PATIENCE, || match nats.reloads() {
        1 => Ok(()),
        n => Err(format!("nats-server reloaded {n} times, want 1")),
    });
    wait_accepted("a client after the rotation", port, &client);
    nats.assert_running();
    assert_eq!(nats.pid(), pid);
    let log = daemon.log();
    assert!(
        !log.contains("ERROR") && !log.contains("WARN"),
        "anchorage warned:\n{log}"
    );
    assert_eq!(daemon.stop(), 0);
    assert_eq!(nats.reloads(), 1, "one reload for one rotation");
}
