//! Reload actions as an app's endpoint sees them: HTTP credentials (Basic
//! from the URL, a Bearer token read afresh from its file), never printed;
//! and `touch`, which pokes a file's modification time and never creates it.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::support::daemon::{Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::Ca;
use crate::support::{pems, s};

/// A reload endpoint that answers 200 only to `want` as its
/// `Authorization`, 401 otherwise; it records every header it got.
fn protected_endpoint(want: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let auth = head
                .lines()
                .find_map(|l| {
                    l.split_once(':')
                        .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                })
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_default();
            let status = if auth == want {
                "200 OK"
            } else {
                "401 Unauthorized"
            };
            record.lock().expect("lock").push(auth);
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (format!("127.0.0.1:{port}"), seen)
}

#[test]
fn url_credentials_go_out_as_basic_authorization_and_are_never_logged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Auth A"), Ca::new("Auth B"));
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&a]))]);
    // "alice:pw" in base64.
    let (addr, seen) = protected_endpoint("Basic YWxpY2U6cHc=");
    let url = format!("http://alice:pw@{addr}/-/reload");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&volume.dir),
            "--output",
            s(&dir.path().join("ca.pem")),
            "--http",
            &url,
            "--debounce",
            "0",
        ],
    );
    daemon.wait_log("outcome=\"success\"", 1);
    volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    daemon.wait_log("outcome=\"success\"", 2);
    assert!(
        seen.lock()
            .expect("lock")
            .iter()
            .all(|h| h == "Basic YWxpY2U6cHc="),
        "{:?}",
        seen.lock().expect("lock")
    );
    let log = daemon.log();
    assert!(!log.contains("alice:pw") && !log.contains(":pw@"), "{log}");
}

#[test]
fn a_bearer_token_is_read_afresh_for_each_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Bearer A"), Ca::new("Bearer B"));
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&a]))]);
    let token = dir.path().join("token");
    fs::write(&token, "old-token\n").expect("token");
    let (addr, seen) = protected_endpoint("Bearer new-token");
    let config = dir.path().join("anchorage.toml");
    fs::write(
        &config,
        format!(
            "[daemon]\ndebounce = \"0s\"\n[[bundle]]\nsources = [{:?}]\n[[bundle.output]]\npath = {:?}\n\
             [[bundle.reload]]\nhttp = \"http://{addr}/-/reload\"\nbearer_token_file = {:?}\n",
            s(&volume.dir),
            s(&dir.path().join("ca.pem")),
            s(&token)
        ),
    )
    .expect("config");
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    // The old token is refused: the reload is retried...
    daemon.wait_log("will retry", 1);
    // ...and succeeds once the file holds the new one, with no restart.
    fs::write(&token, "new-token\n").expect("token");
    daemon.wait_log("outcome=\"success\"", 1);
    volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    daemon.wait_log("outcome=\"success\"", 2);
    let seen = seen.lock().expect("lock").clone();
    assert!(seen.contains(&"Bearer old-token".to_owned()), "{seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("Bearer new-token"));
    let log = daemon.log();
    assert!(
        !log.contains("old-token") && !log.contains("new-token"),
        "{log}"
    );
}

fn mtime(path: &std::path::Path) -> SystemTime {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("mtime")
}

#[test]
fn touch_pokes_the_file_on_a_change_and_never_creates_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Touch A"), Ca::new("Touch B"));
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&a]))]);
    let dynamic = dir.path().join("dynamic.yml");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&volume.dir),
            "--output",
            s(&dir.path().join("ca.pem")),
            "--touch",
            s(&dynamic),
            "--debounce",
            "0",
        ],
    );
    // Missing at start: skipped like a missing pid file, and not created.
    daemon.wait_log("does not exist yet; skipped", 1);
    assert!(!dynamic.exists());

    fs::write(&dynamic, "http: {}\n").expect("write");
    let old = SystemTime::now() - Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&dynamic)
        .and_then(|f| f.set_modified(old))
        .expect("set mtime");
    volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    daemon.wait_log("action=touch", 1);
    eventually(Duration::from_secs(15), || {
        if mtime(&dynamic) > old + Duration::from_secs(1800) {
            Ok(())
        } else {
            Err("modification time not updated".into())
        }
    });
    assert_eq!(fs::read_to_string(&dynamic).expect("read"), "http: {}\n");
}
