//! Rotation without a schism: retained CAs, verify before trust, key pairs,
//! proven reloads, child supervision, subPath warnings.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::daemon::{App, Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::{Ca, Leaf, sha256_hex};
use crate::support::tls::{self, Connection, Identity, Server};
use crate::support::{file_sha256, pem_certs, pems, s, sh, write};

fn fingerprints(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = pem_certs(&fs::read(path).unwrap_or_default())
        .iter()
        .map(|d| sha256_hex(d))
        .collect();
    v.sort();
    v
}

fn sorted(cas: &[&Ca]) -> Vec<String> {
    let mut v: Vec<String> = cas.iter().map(|c| c.sha256()).collect();
    v.sort();
    v
}

#[track_caller]
fn wait_set(path: &Path, want: &[&Ca]) {
    let want = sorted(want);
    eventually(Duration::from_secs(20), || {
        let got = fingerprints(path);
        if got == want {
            Ok(())
        } else {
            Err(format!("{} certificates, not the expected set", got.len()))
        }
    });
}

#[test]
fn a_removed_ca_is_retained_for_the_grace_period_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (Ca::new("Retained Old"), Ca::new("Retained New"));
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&old, &new]))]);
    let output = dir.path().join("ca.pem");
    let state = dir.path().join("state");
    let volume_dir = volume.dir.clone();
    let args = [
        "--source",
        s(&volume_dir),
        "--output",
        s(&output),
        "--retain-removed",
        "4s",
        "--state-dir",
        s(&state),
        "--debounce",
        "0",
    ];
    let first = Daemon::start(dir.path(), &args);
    wait_set(&output, &[&old, &new]);

    // The old CA leaves the Secret: it stays, retained.
    volume.write(&[("ca.crt", &pems(&[&new]))]);
    first.wait_log("retaining a CA removed from the sources", 1);
    assert_eq!(fingerprints(&output), sorted(&[&old, &new]));

    // A restart in between does not restart the clock.
    assert_eq!(first.stop(), 0);
    let second = Daemon::start(dir.path(), &args);
    second.wait_log("retaining a CA removed from the sources", 1);
    assert_eq!(fingerprints(&output), sorted(&[&old, &new]));
    // It leaves when the grace is over, with no file event.
    wait_set(&output, &[&new]);
    second.wait_log("retention is over", 1);
}

#[test]
fn a_corrupt_state_file_is_reported_and_treated_as_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Ca::new("State A");
    let src = write(&dir.path().join("src"), "a.pem", a.pem());
    let state = dir.path().join("state");
    write(&state, "default.json", "{ not json");
    let output = dir.path().join("ca.pem");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&output),
            "--retain-removed",
            "1h",
            "--state-dir",
            s(&state),
        ],
    );
    wait_set(&output, &[&a]);
    daemon.wait_log("state file is unreadable", 1);
    // And it is rewritten as valid state.
    eventually(Duration::from_secs(10), || {
        let text = fs::read_to_string(state.join("default.json")).map_err(|e| e.to_string())?;
        serde_json::from_str::<serde_json::Value>(&text)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
}

/// The NATS supercluster story: one cluster's Secret starts carrying a new
/// intermediate as its CA. Without `verify` the peers' bundle would lose the
/// CA the other cluster's certificates chain to; with it, the bundle is
/// refused and the peers keep talking.
#[test]
fn verify_refuses_a_bundle_that_would_orphan_a_peer_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cluster_ca, new_intermediate) = (Ca::new("Cluster CA"), Ca::new("New Intermediate R11"));
    // serverAuth alone: it fails as a client certificate for that reason
    // only, and the refusal must say why it fails as a server's.
    let peer = cluster_ca.server_leaf("nats.cluster-b.svc");
    let peer_cert = write(dir.path(), "peer.crt", peer.cert.pem());
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.pem", &pems(&[&cluster_ca]))]);
    let output = dir.path().join("peers.pem");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&volume.dir),
            "--output",
            s(&output),
            "--verify",
            s(&peer_cert),
            "--debounce",
            "0",
        ],
    );
    wait_set(&output, &[&cluster_ca]);

    // cert-manager now writes the new intermediate as ca.pem.
    volume.write(&[("ca.pem", &pems(&[&new_intermediate]))]);
    daemon.wait_log("bundle refused", 1);
    let log = daemon.log();
    assert!(
        log.contains("peer.crt")
            && log.contains("its issuer CN=Cluster CA")
            && log.contains("is not in the new bundle"),
        "{log}"
    );
    assert_eq!(
        fingerprints(&output),
        sorted(&[&cluster_ca]),
        "the bundle was replaced"
    );

    // A deliberate bundle that keeps the peers' CA is accepted.
    volume.write(&[("ca.pem", &pems(&[&cluster_ca, &new_intermediate]))]);
    wait_set(&output, &[&cluster_ca, &new_intermediate]);
}

/// A key pair's real changes ("changed SHA256" of the accepted certificate)
/// and the successful reloads ("reloaded"), in the order the daemon logged
/// them.
fn pair_events(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            if l.contains(" key pair checked ") && l.contains("outcome=\"changed\"") {
                let fp = l.split_once(" (")?.1.split_once(')')?.0;
                Some(format!("changed {fp}"))
            } else if l.contains(" reloaded ") && l.contains("outcome=\"success\"") {
                Some("reloaded".to_owned())
            } else {
                None
            }
        })
        .collect()
}

fn write_pair(dir: &Path, leaf: &Leaf) -> (PathBuf, PathBuf) {
    (
        write(dir, "tls.crt", leaf.cert.pem()),
        write(dir, "tls.key", leaf.key.serialize_pem()),
    )
}

#[test]
fn a_key_pair_written_in_two_steps_reloads_once_after_the_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Pair CA");
    let pair_dir = dir.path().join("tls");
    let first = ca.leaf("web.example");
    let (cert, key) = write_pair(&pair_dir, &first);
    let app = App::start(dir.path(), &cert);
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--cert",
            s(&cert),
            "--key",
            s(&key),
            "--pid-file",
            s(&app.pid_file),
            "--debounce",
            "0",
        ],
    );
    daemon.wait_log("key pair checked", 1);

    // cert-manager-like writer: the certificate first, the key a moment later.
    let second = ca.leaf("web.example");
    write(&pair_dir, "tls.crt", second.cert.pem());
    daemon.wait_log("key pair held", 1);
    assert!(app.reloads().is_empty(), "a half-written pair was reloaded");
    write(&pair_dir, "tls.key", second.key.serialize_pem());
    let reloads = app.wait_reloads(1);
    assert_eq!(reloads[0], file_sha256(&cert));

    // A mismatched pair never reloads, even when its certificate is
    // written again; the key's bytes never reach the log.
    let third = ca.leaf("web.example");
    write(&pair_dir, "tls.crt", third.cert.pem());
    daemon.wait_log("key pair held", 2);
    write(&pair_dir, "tls.crt", third.cert.pem());
    // Then its key: the one reload since the second pair's is this pair's,
    // after the daemon accepted it (the worker runs one request after the
    // other, so a reload of the mismatched pair would come before it).
    write(&pair_dir, "tls.key", third.key.serialize_pem());
    let (second_fp, third_fp) = (sha256_hex(second.cert.der()), sha256_hex(third.cert.der()));
    let events = eventually(Duration::from_secs(15), || {
        let events = pair_events(&daemon.log());
        let accepted = events
            .iter()
            .position(|e| *e == format!("changed {third_fp}"));
        match accepted {
            Some(i) if events[i..].iter().any(|e| e == "reloaded") => Ok(events),
            _ => Err(format!("the third pair is not reloaded yet: {events:?}")),
        }
    });
    assert_eq!(
        events,
        [
            format!("changed {second_fp}"),
            "reloaded".to_owned(),
            format!("changed {third_fp}"),
            "reloaded".to_owned(),
        ],
        "{}",
        daemon.log()
    );
    assert_eq!(app.wait_reloads(2)[1], file_sha256(&cert));
    let key_line = second
        .key
        .serialize_pem()
        .lines()
        .nth(1)
        .expect("key body")
        .to_owned();
    assert!(!daemon.log().contains(&key_line), "key material was logged");
}

#[test]
fn rsa_ecdsa_and_ed25519_keys_are_matched_to_their_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (alg, newkey) in [
        ("rsa", "rsa:2048"),
        ("ec", "ec -pkeyopt ec_paramgen_curve:P-256"),
        ("ed25519", "ed25519"),
    ] {
        let d = dir.path().join(alg);
        fs::create_dir_all(&d).expect("mkdir");
        sh(&format!(
            "cd {} && openssl req -x509 -newkey {newkey} -nodes -keyout tls.key -out tls.crt -subj /CN={alg}.example -days 2 2>/dev/null",
            s(&d)
        ));
    }
    for alg in ["rsa", "ec", "ed25519"] {
        let d = dir.path().join(alg);
        let daemon = Daemon::start(
            &d,
            &[
                "--cert",
                s(&d.join("tls.crt")),
                "--key",
                s(&d.join("tls.key")),
                "--exec",
                "true",
            ],
        );
        daemon.wait_log("key pair checked", 1);
        assert!(!daemon.log().contains("held"), "{alg}: {}", daemon.log());
    }
    // An RSA certificate with an Ed25519 key: held.
    let d = dir.path().join("mixed");
    fs::create_dir_all(&d).expect("mkdir");
    fs::copy(dir.path().join("rsa/tls.crt"), d.join("tls.crt")).expect("copy");
    fs::copy(dir.path().join("ed25519/tls.key"), d.join("tls.key")).expect("copy");
    let daemon = Daemon::start(
        &d,
        &[
            "--cert",
            s(&d.join("tls.crt")),
            "--key",
            s(&d.join("tls.key")),
            "--exec",
            "true",
        ],
    );
    daemon.wait_log("does not match the certificate", 1);
}

#[test]
fn the_child_is_reloaded_by_signal_and_its_exit_code_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Child A"), Ca::new("Child B"));
    let src = write(&dir.path().join("src"), "a.pem", a.pem());
    let output = dir.path().join("ca.pem");
    let (pid_file, log) = (dir.path().join("child.pid"), dir.path().join("child.log"));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/integration/support/hup_app.py"
    );
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&output),
            "--debounce",
            "0",
            "--",
            "python3",
            script,
            s(&pid_file),
            s(&output),
            s(&log),
        ],
    );
    eventually(Duration::from_secs(10), || {
        if pid_file.exists() {
            Ok(())
        } else {
            Err("child not started".into())
        }
    });
    // Started after the first render: the output was there before it.
    write(&dir.path().join("src"), "b.pem", b.pem());
    eventually(Duration::from_secs(15), || {
        let lines = fs::read_to_string(&log).unwrap_or_default();
        if lines.lines().count() >= 1 {
            Ok(())
        } else {
            Err("no SIGHUP reached the child".into())
        }
    });
    let child_pid: i32 = fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    // SIGTERM goes to the child; its death by SIGTERM comes back as 143.
    assert_eq!(daemon.stop(), 143);
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child_pid), None).is_err(),
        "the child survived"
    );

    let out = crate::support::run(&[
        "run",
        "--source",
        s(src.parent().expect("dir")),
        "--",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(out.code, 7, "{}", out.stderr);
}

#[test]
fn restart_child_gives_a_new_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Restart A"), Ca::new("Restart B"));
    let src = write(&dir.path().join("src"), "a.pem", a.pem());
    let output = dir.path().join("ca.pem");
    let pids = dir.path().join("pids");
    let script = format!("echo $$ >> {} && exec sleep 300", s(&pids));
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&output),
            "--restart-child",
            "--debounce",
            "0",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let started = |n: usize| {
        eventually(Duration::from_secs(20), || {
            let text = fs::read_to_string(&pids).unwrap_or_default();
            let list: Vec<String> = text.lines().map(str::to_owned).collect();
            if list.len() >= n {
                Ok(list)
            } else {
                Err(format!("{} starts", list.len()))
            }
        })
    };
    started(1);
    write(&dir.path().join("src"), "b.pem", b.pem());
    let list = started(2);
    assert_ne!(list[0], list[1]);
    daemon.wait_log("child restarted", 1);
    // SIGTERM reaches the new child (sleep dies of it): 143.
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.stop(), 143);
}

/// A TLS "app" whose reload endpoint either re-reads its key pair or
/// ignores the reload, as a buggy app would.
fn reload_endpoint(server: std::sync::Arc<Server>, id: Identity, honest: bool) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/-/reload", listener.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 2048];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            if honest {
                server.reload(tls::server_config(&id, false));
            }
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            );
        }
    });
    url
}

fn probe_config(dir: &Path, cert: &Path, key: &Path, url: &str, addr: &str) -> PathBuf {
    write(
        dir,
        "anchorage.toml",
        format!(
            "[[keypair]]\nname = \"web\"\ncert = \"{}\"\nkey = \"{}\"\n\n  [[keypair.reload]]\n  http = \"{url}\"\n  probe = \"{addr}\"\n  probe_timeout = \"1s\"\n  retries = 1\n",
            s(cert),
            s(key)
        ),
    )
}

/// A TLS app on its first pair, anchorage watching the pair with a probe,
/// then a new pair written: returns the daemon to read what it concluded.
/// `honest`: the app re-reads its pair when told to reload.
fn rotate_pair_under_probe(honest: bool) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Probe CA");
    let pair = dir.path().join("tls");
    let (cert, key) = write_pair(&pair, &ca.leaf("localhost"));
    let id = Identity {
        cert: cert.clone(),
        key: key.clone(),
        trust: cert.clone(),
    };
    let server = std::sync::Arc::new(Server::start(tls::server_config(&id, false)));
    let url = reload_endpoint(server.clone(), id, honest);
    let config = probe_config(dir.path(), &cert, &key, &url, &server.addr());
    let daemon = Daemon::start(dir.path(), &["--config", s(&config), "--debounce", "0"]);
    daemon.wait_log("key pair checked", 1);
    write_pair(&pair, &ca.leaf("localhost"));
    (dir, daemon)
}

#[test]
fn a_probe_sees_the_app_serve_the_new_certificate() {
    let (_dir, daemon) = rotate_pair_under_probe(true);
    daemon.wait_log("probe: the app took the change", 1);
}

#[test]
fn a_probe_catches_an_app_that_ignored_the_reload() {
    let (_dir, daemon) = rotate_pair_under_probe(false);
    // The reload "succeeded", the probe says otherwise, and it is retried.
    daemon.wait_log("still serves another certificate", 1);
    daemon.wait_log("no retries left", 1);
}

#[test]
fn at_start_a_key_pair_reloads_only_if_the_app_serves_another_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Start CA");
    let pair = dir.path().join("tls");
    let (cert, key) = write_pair(&pair, &ca.leaf("localhost"));
    let old = dir.path().join("old");
    let (old_cert, old_key) = write_pair(&old, &ca.leaf("localhost"));
    // The app still serves an older pair.
    let served = Identity {
        cert: old_cert,
        key: old_key,
        trust: cert.clone(),
    };
    let server = std::sync::Arc::new(Server::start(tls::server_config(&served, false)));
    let current = Identity {
        cert: cert.clone(),
        key: key.clone(),
        trust: cert.clone(),
    };
    let url = reload_endpoint(server.clone(), current, true);
    let config = probe_config(dir.path(), &cert, &key, &url, &server.addr());
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    daemon.wait_log("probe: the app took the change", 1);
    drop(daemon);
    // Started again while the app serves the current pair: nothing to do.
    let again = Daemon::start(dir.path(), &["--config", s(&config)]);
    again.wait_log("already serves the current certificate", 1);
}

/// Nothing answers the probe at start: no reload (the app loads the
/// current pair when it starts), and the log says so, not that the app
/// serves the current certificate.
#[test]
fn at_start_a_probe_that_nothing_answers_is_named_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Start CA");
    let (cert, key) = write_pair(&dir.path().join("tls"), &ca.leaf("localhost"));
    let closed = format!("127.0.0.1:{}", crate::support::free_port());
    let config = probe_config(
        dir.path(),
        &cert,
        &key,
        "http://127.0.0.1:1/reload",
        &closed,
    );
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    daemon.wait_log("nothing answers the probe yet", 1);
    let log = daemon.log();
    assert!(log.contains("no reload"), "{log}");
    assert!(
        !log.contains("already serves the current certificate"),
        "{log}"
    );
    assert!(!log.contains("reload failed"), "{log}");
}

/// An old-CA node and a new-CA node keep a mutual-TLS connection, and open
/// new ones, through a whole rotation driven by kubelet-style swaps: no
/// failed handshake, no lost message.
#[test]
fn mutual_tls_survives_a_whole_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (Ca::new("Mesh CA 2026"), Ca::new("Mesh CA 2027"));
    // Each node: a Secret volume with its CA bundle, anchorage rendering it.
    struct Node {
        volume: Volume,
        id: Identity,
        name: &'static str,
        _daemon: Daemon,
    }
    let mut nodes: Vec<Node> = ["node-a.mesh", "node-b.mesh"]
        .into_iter()
        .map(|name| {
            let home = dir.path().join(name);
            let mut volume = Volume::new(&home.join("secret"));
            volume.write(&[("ca.crt", &pems(&[&old]))]);
            let trust = home.join("trust.pem");
            let leaf = old.leaf(name);
            let (cert, key) = write_pair(&home.join("tls"), &leaf);
            let daemon = Daemon::start(
                &home,
                &[
                    "--source",
                    s(&volume.dir),
                    "--output",
                    s(&trust),
                    "--debounce",
                    "0",
                ],
            );
            wait_set(&trust, &[&old]);
            Node {
                volume,
                id: Identity { cert, key, trust },
                name,
                _daemon: daemon,
            }
        })
        .collect();
    let servers: Vec<Server> = nodes
        .iter()
        .map(|n| Server::start(tls::server_config(&n.id, true)))
        .collect();
    // A long-lived connection a -> b, opened at the start.
    let mut long_lived = Connection::open(
        servers[1].port,
        nodes[1].name,
        tls::client_config(&nodes[0].id),
    )
    .expect("first handshake");

    let mut phase = |label: &str, nodes: &[Node]| {
        // Each app reloads: new server configs, and fresh connections both ways.
        for (i, n) in nodes.iter().enumerate() {
            servers[i].reload(tls::server_config(&n.id, true));
        }
        for (from, to) in [(0, 1), (1, 0)] {
            Connection::open(
                servers[to].port,
                nodes[to].name,
                tls::client_config(&nodes[from].id),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{label}: {} -> {} handshake failed: {e}",
                    nodes[from].name, nodes[to].name
                )
            });
        }
        long_lived
            .ping()
            .unwrap_or_else(|e| panic!("{label}: the long-lived connection broke: {e}"));
    };
    phase("old CA only", &nodes);
    // 1. Both Secrets trust old and new.
    for n in &mut nodes {
        n.volume.write(&[("ca.crt", &pems(&[&old, &new]))]);
    }
    for n in &nodes {
        wait_set(&n.id.trust, &[&old, &new]);
    }
    phase("old + new trusted", &nodes);
    // 2. Leaves reissued by the new CA, one node at a time.
    for i in 0..nodes.len() {
        let home = dir.path().join(nodes[i].name);
        write_pair(&home.join("tls"), &new.leaf(nodes[i].name));
        phase(&format!("{} reissued", nodes[i].name), &nodes);
    }
    // 3. The old CA leaves both Secrets.
    for n in &mut nodes {
        n.volume.write(&[("ca.crt", &pems(&[&new]))]);
    }
    for n in &nodes {
        wait_set(&n.id.trust, &[&new]);
    }
    phase("new CA only", &nodes);
    for server in &servers {
        assert!(
            server.failures.lock().expect("failures").is_empty(),
            "a server-side handshake failed"
        );
    }
}

#[test]
fn a_subpath_bind_mount_is_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let real = write(dir.path(), "real.crt", Ca::new("SubPath").pem());
    let target = write(dir.path(), "ca.crt", "placeholder");
    let output = dir.path().join("out.pem");
    let script = format!(
        "mount --bind {} {} || exit 77; exec {} render --source {} --output {}",
        s(&real),
        s(&target),
        env!("CARGO_BIN_EXE_anchorage"),
        s(&target),
        s(&output)
    );
    let Some(out) = crate::support::in_mount_namespace(&script) else {
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("subPath-style bind mount") && stderr.contains("ca.crt"),
        "{stderr}"
    );
}

/// As PID 1 (a container without an init), anchorage reaps the orphans
/// reparented to it. The child makes an orphan that exits, then exits 3 if
/// a zombie is left in the pid namespace (python3 as PID 1 leaves one).
#[test]
fn as_pid_1_orphans_are_reaped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(&dir.path().join("src"), "a.pem", Ca::new("Pid One").pem());
    let check = write(
        dir.path(),
        "zombies.sh",
        "(sleep 0.2 &)\nsleep 1\nfor f in /proc/[0-9]*/status; do grep -q '^State:.Z' \"$f\" 2>/dev/null && exit 3; done\nexit 0\n",
    );
    let out = std::process::Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            env!("CARGO_BIN_EXE_anchorage"),
            "run",
            "--source",
        ])
        .arg(src.parent().expect("dir"))
        .args([
            "--output",
            s(&dir.path().join("out.pem")),
            "--",
            "sh",
            s(&check),
        ])
        .output()
        .expect("unshare");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("unshare failed") {
        eprintln!("skipped: cannot make a pid namespace here: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(0), "a zombie was left: {stderr}");
}

/// A `verify` certificate that expired still guards the CA it chains to
/// (checked at its last valid second, with a warning), and does not refuse
/// every bundle: a rotation is not stuck behind a leaf nobody renewed.
#[test]
fn an_expired_verify_certificate_still_guards_its_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, other) = (Ca::new("Guarded CA"), Ca::new("Other CA"));
    let now = time::OffsetDateTime::now_utc();
    let leaf = ca.leaf_valid(
        "old.peer",
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    );
    let peer = write(dir.path(), "peer.crt", leaf.cert.pem());
    let output = dir.path().join("out.pem");
    let render = |cas: &[&Ca]| {
        let src = write(dir.path(), "src.pem", pems(cas));
        crate::support::run(&[
            "render",
            "--source",
            s(&src),
            "--output",
            s(&output),
            "--verify",
            s(&peer),
        ])
    };
    let out = render(&[&ca, &other]);
    out.expect_code(0);
    assert!(out.stderr.contains("not valid now"), "{}", out.stderr);
    let out = render(&[&other]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("is not in the new bundle"),
        "{}",
        out.stderr
    );
}
