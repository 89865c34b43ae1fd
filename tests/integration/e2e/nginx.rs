//! End-to-end: a real nginx, run unprivileged from a temporary prefix, reloaded
//! by anchorage with SIGHUP to its master (found by its pid file):
//!
//! - mutual TLS through a whole CA rotation written kubelet-style: the bundle
//!   anchorage renders is nginx's `ssl_client_certificate`;
//! - the server's own key pair rotated in a kubelet volume, the reload proven
//!   by anchorage's TLS probe;
//! - a pod certificate from a `podCertificate` projection (one credential
//!   bundle file), split by anchorage into the `tls.crt` and `tls.key` nginx
//!   reads, each daily rotation proven by the probe.
//!
//! nginx re-reads its certificates on SIGHUP (docs/control.html), starts new
//! workers and retires the old ones; the master keeps its pid.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rustls::ClientConfig;

use crate::support::daemon::{Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::{Ca, Leaf, sha256_hex};
use crate::support::tls;
use crate::support::{DumpLogsOnFailure, free_port, pem_certs, pems, s, system_binary, write};

const PATIENCE: Duration = Duration::from_secs(30);

/// Where nginx's files live, all under one temporary prefix.
struct NginxFiles {
    prefix: PathBuf,
    conf: PathBuf,
    pid_file: PathBuf,
    error_log: PathBuf,
}

impl NginxFiles {
    /// A config serving `return 200 "ok\n"` on 127.0.0.1:`port` with this
    /// key pair, asking every client for a certificate from `client_ca`.
    fn write(
        prefix: &Path,
        logs: &Path,
        port: u16,
        cert: &Path,
        key: &Path,
        client_ca: &Path,
    ) -> Self {
        let pid_file = prefix.join("nginx.pid");
        let error_log = logs.join("nginx-error.log");
        let temp = |name: &str| {
            let path = prefix.join("temp").join(name);
            fs::create_dir_all(&path).expect("mkdir temp");
            path
        };
        let conf = write(
            prefix,
            "nginx.conf",
            format!(
                "worker_processes 1;
pid {pid};
error_log {error_log} notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {body};
    proxy_temp_path {proxy};
    fastcgi_temp_path {fastcgi};
    uwsgi_temp_path {uwsgi};
    scgi_temp_path {scgi};
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_verify_client on;
        ssl_client_certificate {client_ca};
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
",
                pid = s(&pid_file),
                error_log = s(&error_log),
                body = s(&temp("body")),
                proxy = s(&temp("proxy")),
                fastcgi = s(&temp("fastcgi")),
                uwsgi = s(&temp("uwsgi")),
                scgi = s(&temp("scgi")),
                cert = s(cert),
                key = s(key),
                client_ca = s(client_ca),
            ),
        );
        Self {
            prefix: prefix.to_path_buf(),
            conf,
            pid_file,
            error_log,
        }
    }
}

/// A running nginx master (in the foreground, `daemon off`), stopped with
/// its workers when dropped.
struct Nginx {
    child: Child,
    error_log: PathBuf,
    pid_file: PathBuf,
}

impl Nginx {
    fn start(files: &NginxFiles, logs: &Path) -> Self {
        let out = fs::File::create(logs.join("nginx-stderr.log")).expect("nginx log");
        let child = Command::new(system_binary("nginx"))
            .arg("-p")
            .arg(&files.prefix)
            .arg("-c")
            .arg(&files.conf)
            .arg("-e")
            .arg(&files.error_log)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start nginx");
        let mut nginx = Self {
            child,
            error_log: files.error_log.clone(),
            pid_file: files.pid_file.clone(),
        };
        let pid = nginx.pid();
        eventually(PATIENCE, || {
            nginx.assert_alive();
            match nginx.pid_in_file() {
                Some(p) if p == pid => Ok(()),
                other => Err(format!("nginx pid file holds {other:?}, want {pid}")),
            }
        });
        nginx
    }

    /// The master's pid.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn pid_in_file(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    #[track_caller]
    fn assert_alive(&mut self) {
        let status = self.child.try_wait().expect("wait nginx");
        assert!(status.is_none(), "the nginx master exited: {status:?}");
    }

    #[track_caller]
    fn assert_running(&mut self) {
        self.assert_alive();
        assert_eq!(self.pid_in_file(), Some(self.pid()), "nginx pid file");
    }

    /// SIGHUPs the master received (its error log, level notice).
    fn reloads(&self) -> usize {
        fs::read_to_string(&self.error_log)
            .unwrap_or_default()
            .matches("(SIGHUP) received")
            .count()
    }

    /// The master's children (its workers), from /proc.
    fn workers(&self) -> Vec<i32> {
        let master = self.pid().to_string();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    // "pid (comm) state ppid ...": comm may hold spaces.
                    stat.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        == Some(master.as_str())
                })
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers, then exits.
        let master = Pid::from_raw(self.pid() as i32);
        let _ = kill(master, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for worker in self.workers() {
            let _ = kill(Pid::from_raw(worker), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `Ok` only for 200 "ok": everything else (a TLS alert, a 400 "The SSL
/// certificate error") is a refusal.
fn accepted(port: u16, config: &Arc<ClientConfig>) -> Result<tls::Response, String> {
    let response = tls::https_get(port, config)?;
    if response.status == 200 && response.body == "ok\n" {
        Ok(response)
    } else {
        let first = response.body.lines().find(|l| l.contains("<title>"));
        Err(format!(
            "HTTP {} {}",
            response.status,
            first.unwrap_or("").trim()
        ))
    }
}

#[track_caller]
fn wait_accepted(what: &str, port: u16, config: &Arc<ClientConfig>) -> tls::Response {
    eventually(PATIENCE, || {
        accepted(port, config).map_err(|e| format!("{what} refused: {e}"))
    })
}

#[track_caller]
fn wait_refused(what: &str, port: u16, config: &Arc<ClientConfig>) -> String {
    eventually(PATIENCE, || match accepted(port, config) {
        Ok(_) => Err(format!("{what} still accepted")),
        Err(e) => Ok(e),
    })
}

#[track_caller]
fn wait_bundle(path: &Path, want: &[&Ca]) {
    let mut want: Vec<String> = want.iter().map(|c| c.sha256()).collect();
    want.sort();
    eventually(PATIENCE, || {
        let mut got: Vec<String> = pem_certs(&fs::read(path).unwrap_or_default())
            .iter()
            .map(|d| sha256_hex(d))
            .collect();
        got.sort();
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

/// The reload count settles at `want` (a reload in flight is counted).
#[track_caller]
fn wait_reloads(nginx: &Nginx, want: usize) {
    eventually(PATIENCE, || match nginx.reloads() {
        n if n == want => Ok(()),
        n => Err(format!("nginx received {n} SIGHUPs, want {want}")),
    });
}

/// Waits until anchorage's log holds `needle` `count` times.
#[track_caller]
fn wait_log(daemon: &Daemon, needle: &str, count: usize, what: &str) {
    eventually(PATIENCE, || {
        let seen = daemon.log().matches(needle).count();
        if seen >= count {
            Ok(())
        } else {
            Err(format!(
                "{what} ({needle:?} logged {seen} times, want {count})"
            ))
        }
    });
}

#[test]
fn nginx_takes_a_client_ca_rotation_by_sighup_to_its_master() {
    system_binary("nginx");
    let dir = tempfile::tempdir().expect("tempdir");
    let (logs, _dump) = DumpLogsOnFailure::logs_in(dir.path());

    let (ca_old, ca_new) = (Ca::new("nginx Clients Old"), Ca::new("nginx Clients New"));
    let server_ca = Ca::new("nginx Server CA");
    let pki = dir.path().join("pki");
    let server_ca_file = write(&pki, "server-ca.pem", server_ca.pem());
    let (server_cert, server_key) = server_ca.leaf("localhost").write(&pki, "server");
    let old_client = tls::fresh_client(&pki, "client-old", &ca_old, &server_ca_file);
    let new_client = tls::fresh_client(&pki, "client-new", &ca_new, &server_ca_file);

    // The Secret holds CA-old; anchorage renders it before nginx starts.
    let mut secret = Volume::new(&dir.path().join("secret"));
    secret.write(&[("ca.crt", &pems(&[&ca_old]))]);
    let output = dir.path().join("out").join("clients-ca.pem");
    fs::create_dir_all(output.parent().expect("parent")).expect("mkdir out");
    let port = free_port();
    let files = NginxFiles::write(
        &dir.path().join("nginx"),
        &logs,
        port,
        &server_cert,
        &server_key,
        &output,
    );
    let secret_dir = secret.dir.clone();
    let daemon = Daemon::start(
        &logs,
        &[
            "--source",
            s(&secret_dir),
            "--output",
            s(&output),
            "--pid-file",
            s(&files.pid_file),
            "--signal",
            "HUP",
            "--debounce",
            "0",
        ],
    );
    wait_bundle(&output, &[&ca_old]);
    let mut nginx = Nginx::start(&files, &logs);
    let master = nginx.pid();

    // Before: CA-old clients are accepted, CA-new clients refused.
    wait_accepted("a CA-old client", port, &old_client);
    let refusal = accepted(port, &new_client)
        .err()
        .expect("a CA-new client is refused before the rotation");
    eprintln!("nginx: before the rotation a CA-new client is refused ({refusal})");

    // The Secret gains CA-new: nginx is reloaded and accepts CA-new clients.
    let swap = Instant::now();
    secret.write(&[("ca.crt", &pems(&[&ca_old, &ca_new]))]);
    wait_accepted("a CA-new client after CA-new was added", port, &new_client);
    let took = swap.elapsed();
    eprintln!(
        "nginx: swap -> first CA-new connection accepted: {} ms",
        took.as_millis()
    );
    wait_bundle(&output, &[&ca_old, &ca_new]);
    wait_reloads(&nginx, 1);
    wait_accepted("a CA-old client during the rotation", port, &old_client);
    nginx.assert_running();

    // The Secret drops CA-old: after the reload CA-old clients are refused.
    let swap = Instant::now();
    secret.write(&[("ca.crt", &pems(&[&ca_new]))]);
    let refusal = wait_refused(
        "a CA-old client after CA-old was dropped",
        port,
        &old_client,
    );
    eprintln!(
        "nginx: swap -> first CA-old connection refused: {} ms ({refusal})",
        swap.elapsed().as_millis()
    );
    wait_bundle(&output, &[&ca_new]);
    wait_accepted("a CA-new client after the rotation", port, &new_client);

    // One master all along, reloaded once per change of the bundle.
    wait_reloads(&nginx, 2);
    nginx.assert_running();
    assert_eq!(nginx.pid(), master, "the nginx master kept its pid");
    assert!(
        !daemon.log().contains("ERROR"),
        "anchorage logged an error:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.stop(), 0);
    assert_eq!(nginx.reloads(), 2, "no reload at anchorage's exit");
}

#[test]
fn nginx_serves_its_rotated_key_pair_and_the_probe_proves_it() {
    system_binary("nginx");
    let dir = tempfile::tempdir().expect("tempdir");
    let (logs, _dump) = DumpLogsOnFailure::logs_in(dir.path());

    let tls::MutualPki {
        server_ca,
        clients_ca_file,
        client,
    } = tls::MutualPki::new(&dir.path().join("pki"), "nginx");

    // The server's key pair is a kubelet volume (a cert-manager Secret);
    // nginx reads it through the visible names.
    let (first, second) = (server_ca.leaf("localhost"), server_ca.leaf("localhost"));
    let mut pair = Volume::new(&dir.path().join("tls"));
    let (cert, key) = pair.write_pair(&first);
    let port = free_port();
    let files = NginxFiles::write(
        &dir.path().join("nginx"),
        &logs,
        port,
        &cert,
        &key,
        &clients_ca_file,
    );
    let mut nginx = Nginx::start(&files, &logs);
    let master = nginx.pid();
    let before = wait_accepted("a client before the rotation", port, &client);
    assert_eq!(before.served, first.cert.der().to_vec(), "the first leaf");

    let config = write(
        &dir.path().join("etc"),
        "anchorage.toml",
        format!(
            "[daemon]
debounce = \"0s\"

[[keypair]]
name = \"nginx\"
cert = \"{cert}\"
key = \"{key}\"

  [[keypair.reload]]
  signal = \"HUP\"
  pid_file = \"{pid_file}\"
  probe = \"127.0.0.1:{port}\"
  probe_timeout = \"30s\"
",
            cert = s(&cert),
            key = s(&key),
            pid_file = s(&files.pid_file),
        ),
    );
    let daemon = Daemon::start(&logs, &["--config", s(&config)]);
    // nginx already serves this pair: no reload at start.
    wait_log(
        &daemon,
        "key pair checked",
        1,
        "anchorage has not read the key pair",
    );
    wait_log(
        &daemon,
        "the app already serves the current certificate",
        1,
        "anchorage's start-up probe has not seen nginx serve the pair",
    );
    assert_eq!(nginx.reloads(), 0, "a reload at start");

    // cert-manager reissues the pair: kubelet swaps the volume.
    let swap = Instant::now();
    pair.write_pair(&second);
    wait_log(
        &daemon,
        "key pair checked",
        2,
        "anchorage has not seen the kubelet swap of the key pair volume",
    );
    let after = eventually(PATIENCE, || {
        let response = accepted(port, &client)?;
        if response.served[..] == second.cert.der()[..] {
            Ok(response)
        } else if response.served[..] == first.cert.der()[..] {
            Err("nginx still serves the first leaf".into())
        } else {
            Err(format!(
                "nginx serves an unknown leaf (sha256 {})",
                sha256_hex(&response.served)
            ))
        }
    });
    eprintln!(
        "nginx: swap -> new server certificate served: {} ms",
        swap.elapsed().as_millis()
    );
    assert_eq!(after.status, 200);
    wait_log(
        &daemon,
        "probe: the app took the change",
        1,
        "anchorage's probe has not seen nginx serve the new leaf",
    );
    eprintln!(
        "nginx: swap -> anchorage's probe saw the new certificate: {} ms",
        swap.elapsed().as_millis()
    );

    // One master all along, reloaded exactly once for the one change.
    wait_reloads(&nginx, 1);
    nginx.assert_running();
    assert_eq!(nginx.pid(), master, "the nginx master kept its pid");
    // Old workers finish the connections they had accepted before they
    // exit: once they are gone, every new client gets the second leaf.
    eventually(PATIENCE, || {
        for _ in 0..5 {
            let served = accepted(port, &client)?;
            if served.served[..] != second.cert.der()[..] {
                return Err("an old worker still answers with the first leaf".to_string());
            }
        }
        Ok(())
    });
    assert!(
        !daemon.log().contains("ERROR") && !daemon.log().contains("did not take it"),
        "anchorage logged a failure:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.stop(), 0);
    assert_eq!(nginx.reloads(), 1, "no reload at anchorage's exit");
}

/// Waits until a new connection is served `want`; returns how long it took.
#[track_caller]
fn wait_served(port: u16, client: &Arc<ClientConfig>, want: &Leaf, what: &str) -> Duration {
    let start = Instant::now();
    eventually(PATIENCE, || {
        let response = accepted(port, client)?;
        if response.served[..] == want.cert.der()[..] {
            Ok(())
        } else {
            Err(format!(
                "{what}: nginx serves another leaf (sha256 {})",
                sha256_hex(&response.served)
            ))
        }
    });
    start.elapsed()
}

#[test]
fn nginx_serves_a_split_pod_certificate_and_the_probe_proves_each_rotation() {
    use crate::support::kubelet::credential_bundle;
    system_binary("nginx");
    let dir = tempfile::tempdir().expect("tempdir");
    let (logs, _dump) = DumpLogsOnFailure::logs_in(dir.path());

    // The pod's signer and the clients' CA; pod certificates for a day.
    let signer = Ca::new("nginx Pod Signer");
    let clients_ca = Ca::new("nginx Clients CA");
    let pki = dir.path().join("pki");
    let signer_file = write(&pki, "signer.pem", signer.pem());
    let clients_ca_file = write(&pki, "clients-ca.pem", clients_ca.pem());
    let client = tls::fresh_client(&pki, "client", &clients_ca, &signer_file);
    let daily = || {
        let now = time::OffsetDateTime::now_utc();
        signer.leaf_valid(
            "localhost",
            now - time::Duration::minutes(1),
            now + time::Duration::hours(24),
        )
    };

    // kubelet's podCertificate projection: one credential bundle file.
    let first = daily();
    let mut projected = Volume::new(&dir.path().join("pod-cert"));
    projected.write(&[("credentialbundle.pem", &credential_bundle(&first, &[]))]);
    let split = dir.path().join("shared/tls");
    let port = free_port();
    let files = NginxFiles::write(
        &dir.path().join("nginx"),
        &logs,
        port,
        &split.join("tls.crt"),
        &split.join("tls.key"),
        &clients_ca_file,
    );
    let config = write(
        &dir.path().join("etc"),
        "anchorage.toml",
        format!(
            "[daemon]
debounce = \"0s\"

[[keypair]]
name = \"pod\"
credential_bundle = \"{bundle}\"
split_dir = \"{split}\"

  [[keypair.reload]]
  signal = \"HUP\"
  pid_file = \"{pid_file}\"
  probe = \"127.0.0.1:{port}\"
  probe_timeout = \"30s\"
",
            bundle = s(&projected.dir.join("credentialbundle.pem")),
            split = s(&split),
            pid_file = s(&files.pid_file),
        ),
    );
    // The native sidecar starts first and splits the pair; then nginx.
    let daemon = Daemon::start(&logs, &["--config", s(&config)]);
    eventually(PATIENCE, || {
        fs::read_link(split.join("tls.key"))
            .map(|_| ())
            .map_err(|e| format!("no split pair yet: {e}"))
    });
    let mut nginx = Nginx::start(&files, &logs);
    let master = nginx.pid();
    wait_served(port, &client, &first, "the first pod certificate");

    // Daily rotations: kubelet swaps the credential bundle; nginx serves
    // each new leaf after one SIGHUP, and the probe says so.
    let mut took = Vec::new();
    let mut last = first;
    for day in 1..=3 {
        let leaf = daily();
        let swap = Instant::now();
        projected.write(&[("credentialbundle.pem", &credential_bundle(&leaf, &[]))]);
        wait_served(port, &client, &leaf, &format!("day {day}"));
        took.push(swap.elapsed());
        wait_log(
            &daemon,
            "probe: the app took the change",
            day,
            "anchorage's probe has not seen nginx serve the new pod certificate",
        );
        wait_reloads(&nginx, day);
        last = leaf;
    }
    let ms: Vec<u128> = took.iter().map(Duration::as_millis).collect();
    eprintln!("nginx: credential bundle swap -> new pod certificate served: {ms:?} ms");

    // A credential bundle whose key is not its leaf's: held, nginx keeps
    // serving the last good pair, no reload.
    let (a, b) = (daily(), daily());
    let mut mixed = b.key.serialize_pem();
    mixed.push_str(&a.cert.pem());
    projected.write(&[("credentialbundle.pem", mixed.as_bytes())]);
    wait_log(
        &daemon,
        "key pair held",
        1,
        "the mismatched bundle was not held",
    );
    wait_served(port, &client, &last, "after the mismatched bundle");
    assert_eq!(nginx.reloads(), 3, "a reload for a held pair");

    nginx.assert_running();
    assert_eq!(nginx.pid(), master, "the nginx master kept its pid");
    assert!(
        !daemon.log().contains("ERROR") && !daemon.log().contains("did not take it"),
        "anchorage logged a failure:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.stop(), 0);
    assert_eq!(nginx.reloads(), 3, "no reload at anchorage's exit");
}
