//! End-to-end: a Node app run by PM2, through a whole CA rotation.
//!
//! Node reads `NODE_EXTRA_CA_CERTS` once, when the process starts (nodejs
//! doc/api/cli.md), so the only way a Node 20 app takes new trust is a new
//! process: anchorage renders the PEM bundle the app names in
//! `NODE_EXTRA_CA_CERTS` and runs `pm2 reload NAME --update-env`.
//!
//! The app runs in PM2's fork mode (its default, one process). There an
//! app-level `NODE_EXTRA_CA_CERTS` is honoured, and `pm2 reload` is a restart
//! (lib/God/Reload.js reloads without downtime only in cluster mode), which
//! is exactly what Node needs. Cluster mode was not chosen: there PM2 ignores
//! an app-level `NODE_EXTRA_CA_CERTS` (pm2 #5919) and it must be set in the
//! PM2 daemon's own environment, which would make the test depend on how
//! the daemon was first spawned rather than on the app's declaration.
//! `--update-env` hands the app the environment of the `pm2` command, that is
//! anchorage's, so anchorage is given the same `NODE_EXTRA_CA_CERTS` (the
//! path never changes; only its content does).
//!
//! PM2 comes from npm (`scripts/deps.d/pm2.sh`, `scripts/install-test-deps`)
//! and runs with a private `PM2_HOME`, killed at the end.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rustls::ServerConfig;

use crate::support::daemon::{Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::Ca;
use crate::support::tls::{self, Identity};
use crate::support::{free_port, pems, run, s, write};

const PM2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.test-deps/npm/node_modules/.bin/pm2"
);
const APP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/integration/e2e/fixtures/trust_probe.js"
);
const NAME: &str = "trust-probe";
/// Generous: a restart is a new Node process, on a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(60);

/// A PM2 daemon of our own (private `PM2_HOME`), killed when dropped.
struct Pm2 {
    home: PathBuf,
}

impl Pm2 {
    fn new(home: &Path) -> Self {
        assert!(
            Path::new(PM2).exists(),
            "{PM2} is missing: run scripts/install-test-deps"
        );
        fs::create_dir_all(home).expect("mkdir PM2_HOME");
        Self {
            home: home.to_path_buf(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(PM2);
        cmd.env("PM2_HOME", &self.home).stdin(Stdio::null());
        cmd
    }

    /// Runs `pm2 ARGS` with extra environment; panics if it fails.
    #[track_caller]
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self
            .command()
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run pm2");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "pm2 {args:?} failed:\n{text}");
        text
    }

    /// What `pm2 jlist` says of the app: (status, pid, restarts, exec mode).
    fn app(&self) -> Result<(String, u64, u64, String), String> {
        let out = self
            .command()
            .arg("jlist")
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json = &text[text.find('[').ok_or_else(|| format!("jlist: {text}"))?..];
        let list: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
        let app = list
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == NAME))
            .ok_or_else(|| format!("{NAME} not in jlist: {json}"))?;
        let env = &app["pm2_env"];
        Ok((
            env["status"].as_str().unwrap_or_default().to_owned(),
            app["pid"].as_u64().unwrap_or_default(),
            env["restart_time"].as_u64().unwrap_or_default(),
            env["exec_mode"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    /// Waits until the app is online; returns its pid and restart count.
    #[track_caller]
    fn wait_online(&self) -> (u64, u64) {
        eventually(WAIT, || match self.app()? {
            (status, pid, restarts, _) if status == "online" && pid != 0 => Ok((pid, restarts)),
            other => Err(format!("not online: {other:?}")),
        })
    }
}

impl Drop for Pm2 {
    fn drop(&mut self) {
        let _ = self
            .command()
            .arg("kill")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // If `pm2 kill` could not do it: the daemon and the apps it started,
        // by the pids it recorded in our PM2_HOME.
        let mut pid_files = vec![self.home.join("pm2.pid")];
        if let Ok(dir) = fs::read_dir(self.home.join("pids")) {
            pid_files.extend(dir.flatten().map(|e| e.path()));
        }
        for file in pid_files {
            let pid = fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok());
            if let Some(pid) = pid.filter(|p| *p > 1) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// A minimal HTTPS server on 127.0.0.1: each connection gets the TLS
/// handshake, then `HTTP/1.1 200 OK` to its first request, and is closed.
struct HttpsServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl HttpsServer {
    fn start(config: Arc<ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let config = config.clone();
                // A client that refuses the certificate is an error here: fine.
                std::thread::spawn(move || {
                    let _ = serve_https(stream, config);
                });
            }
        });
        Self { port, stop }
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_https(stream: TcpStream, config: Arc<ServerConfig>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    tls.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
    )?;
    tls.conn.send_close_notify();
    tls.flush()
}

/// An HTTPS server on a leaf for `localhost` issued by `ca`.
fn https_server(dir: &Path, ca: &Ca) -> HttpsServer {
    let leaf = ca.leaf("localhost");
    let tag = ca.sha256();
    let id = Identity {
        cert: write(dir, &format!("{tag}.crt"), leaf.cert.pem()),
        key: write(dir, &format!("{tag}.key"), leaf.key.serialize_pem()),
        trust: dir.join("unused"),
    };
    HttpsServer::start(tls::server_config(&id, false))
}

/// `GET path` on the app's own HTTP port; the body.
fn get(port: u16, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {reply:?}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("status: {head}"));
    }
    Ok(body.trim().to_owned())
}

/// The app's verdict on an HTTPS call to `server`: `ok 200` or `error ...`.
fn check(app_port: u16, server: &HttpsServer) -> Result<String, String> {
    get(app_port, &format!("/check?port={}", server.port))
}

#[track_caller]
fn assert_refused(verdict: &str, what: &str) {
    assert!(
        verdict.starts_with("error ") && verdict.contains("UNABLE_TO_VERIFY_LEAF_SIGNATURE"),
        "{what}: want a certificate verification error, got {verdict:?}"
    );
}

#[test]
fn a_node_app_under_pm2_is_restarted_into_the_rotated_trust() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (Ca::new("PM2 Old CA"), Ca::new("PM2 New CA"));
    let certs = dir.path().join("certs");
    let old_server = https_server(&certs, &old);
    let new_server = https_server(&certs, &new);

    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&old]))]);
    let output = dir.path().join("out").join("ca.pem");
    fs::create_dir_all(output.parent().expect("out dir")).expect("mkdir out");
    let source = volume.dir.clone();

    // As an init container would: the bundle exists before the app starts.
    run(&["render", "--source", s(&source), "--output", s(&output)]).expect_code(0);

    let pm2 = Pm2::new(&dir.path().join("pm2"));
    let app_port = free_port();
    pm2.run(
        &["start", APP, "--name", NAME, "--", &app_port.to_string()],
        &[("NODE_EXTRA_CA_CERTS", s(&output))],
    );
    let (first_pid, restarts) = pm2.wait_online();
    assert_eq!(pm2.app().expect("jlist").3, "fork_mode");
    let whoami = eventually(WAIT, || get(app_port, "/whoami"));
    assert_eq!(whoami, format!("{first_pid} {}", s(&output)));

    let reload = format!(
        "{} reload {NAME} --update-env",
        shlex::try_quote(PM2).expect("quote")
    );
    let logs = dir.path().join("logs");
    fs::create_dir_all(&logs).expect("mkdir logs");
    let daemon = Daemon::start_with(
        &logs,
        &[
            "--source",
            s(&source),
            "--output",
            s(&output),
            "--exec",
            &reload,
            "--debounce",
            "0",
        ],
        |cmd| {
            cmd.env("PM2_HOME", &pm2.home)
                .env("NODE_EXTRA_CA_CERTS", &output);
        },
    );
    // The output already holds these bytes: no reload at start.
    daemon.wait_log("watching", 1);
    daemon.wait_log("rendered", 1);

    // Before: CA-old is trusted, CA-new is not.
    assert_eq!(check(app_port, &old_server).expect("check old"), "ok 200");
    assert_refused(
        &check(app_port, &new_server).expect("check new"),
        "CA-new before",
    );
    assert_eq!(
        pm2.wait_online(),
        (first_pid, restarts),
        "restarted at start"
    );
    assert!(!daemon.log().contains("reloaded"), "{}", daemon.log());

    // The Secret carries both CAs.
    volume.write(&[("ca.crt", &pems(&[&old, &new]))]);
    let swap = Instant::now();
    eventually(WAIT, || match check(app_port, &new_server)? {
        v if v == "ok 200" => Ok(()),
        v => Err(v),
    });
    let took = swap.elapsed();
    eprintln!(
        "pm2: swap -> first CA-new connection accepted: {} ms (render, `pm2 reload`, a new Node process)",
        took.as_millis()
    );
    daemon.wait_log("reloaded", 1);
    let (second_pid, second_restarts) = pm2.wait_online();
    assert_ne!(second_pid, first_pid, "the app was not restarted");
    assert_eq!(second_restarts, restarts + 1);
    // `--update-env` kept the app pointed at anchorage's output.
    let whoami = eventually(WAIT, || get(app_port, "/whoami"));
    assert_eq!(whoami, format!("{second_pid} {}", s(&output)));
    assert_eq!(check(app_port, &old_server).expect("check old"), "ok 200");

    // The Secret drops CA-old: after the next restart, CA-old is refused.
    volume.write(&[("ca.crt", &pems(&[&new]))]);
    let verdict = eventually(WAIT, || match check(app_port, &old_server)? {
        v if v.starts_with("error ") => Ok(v),
        v => Err(v),
    });
    assert_refused(&verdict, "CA-old after it was dropped");
    daemon.wait_log("reloaded", 2);
    let (third_pid, third_restarts) = pm2.wait_online();
    assert_ne!(third_pid, second_pid, "the app was not restarted");
    let whoami = eventually(WAIT, || get(app_port, "/whoami"));
    assert_eq!(whoami, format!("{third_pid} {}", s(&output)));
    assert_eq!(check(app_port, &new_server).expect("check new"), "ok 200");

    // One restart per change, none piled up. The first change's count was
    // settled when the second change's restart arrived (one worker runs one
    // request after the other); for the second, the daemon is stopped:
    // once it has exited no reload can start, so its log and PM2's count
    // are final.
    let log_file = daemon.log_file().to_owned();
    assert_eq!(daemon.stop(), 0, "anchorage did not exit cleanly");
    let log = fs::read_to_string(&log_file).expect("anchorage log");
    assert_eq!(log.matches("reloaded").count(), 2, "{log}");
    assert!(!log.contains("reload failed"), "{log}");
    assert_eq!(pm2.wait_online(), (third_pid, third_restarts));
    assert_eq!(third_restarts, restarts + 2, "one restart per change");
}
