//! End-to-end: a real HAProxy in master-worker mode (`-W`, `-p PIDFILE`)
//! terminating mutual TLS (`crt`, `ca-file`, `verify required`) in front
//! of a TCP service, reloaded by anchorage with SIGUSR2 to the master found
//! by its pid file.
//!
//! On SIGUSR2 the master re-executes itself (same pid), starts a worker on
//! the configuration and certificates read afresh, and lets the old worker
//! finish its connections: a TLS connection opened before the reloads is
//! still served after all of them.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustls::ClientConfig;

use super::proxy::{PATIENCE, Process, Proxy, Rotation};
use crate::support::daemon::eventually;
use crate::support::tls::Connection;
use crate::support::{free_port, s, system_binary, write};

/// The service behind HAProxy: answers "ok\n" to every message.
struct Backend {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Backend {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if halt.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 256];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(b"ok\n").is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self { port, stop }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

struct Haproxy {
    master: Process,
    pid_file: PathBuf,
    port: u16,
}

impl Haproxy {
    fn start(config: &Path, pid_file: &Path, logs: &Path, port: u16) -> Self {
        let master = Process::spawn(
            Command::new(system_binary("haproxy"))
                .arg("-W")
                .arg("-f")
                .arg(config)
                .arg("-p")
                .arg(pid_file),
            &logs.join("haproxy.log"),
        );
        let mut haproxy = Self {
            master,
            pid_file: pid_file.to_path_buf(),
            port,
        };
        let pid = haproxy.pid();
        eventually(PATIENCE, || {
            haproxy.assert_alive();
            match haproxy.pid_in_file() {
                Some(p) if p == pid => Ok(()),
                other => Err(format!("haproxy pid file holds {other:?}, want {pid}")),
            }
        });
        haproxy
    }

    fn pid_in_file(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }
}

impl Proxy for Haproxy {
    fn pid(&self) -> u32 {
        self.master.pid()
    }

    fn assert_alive(&mut self) {
        self.master.assert_alive();
    }

    /// The master logs "Loading success." at start and after each reload.
    fn reloads(&self) -> usize {
        self.master.logged("Loading success.").saturating_sub(1)
    }

    fn connect(&self, client: &Arc<ClientConfig>) -> Result<Vec<u8>, String> {
        Connection::open(self.port, "localhost", client.clone()).map(|c| c.served())
    }

    /// On SIGUSR2 the master re-executes itself to load the new
    /// configuration and fork a worker, then again to wait for the next
    /// signal; until that last image catches SIGUSR2, a SIGUSR2 is lost (the
    /// loading image sets it to SIG_IGN, which discards a pending one), even
    /// though the new worker already serves. Measured on 2.6: half a second
    /// and more. A real rotation's steps are minutes apart; this test's
    /// follow each other at once, so each waits for the master to catch
    /// SIGUSR2 again (/proc/PID/status, SigCgt).
    fn settle(&self) {
        const SIGUSR2_BIT: u64 = 1 << (12 - 1);
        let status = format!("/proc/{}/status", self.pid());
        eventually(PATIENCE, || {
            let caught = fs::read_to_string(&status)
                .ok()
                .and_then(|s| {
                    let mask = s.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
                    u64::from_str_radix(mask.trim(), 16).ok()
                })
                .is_some_and(|mask| mask & SIGUSR2_BIT != 0);
            if caught {
                Ok(())
            } else {
                Err("the haproxy master does not catch SIGUSR2 yet".to_owned())
            }
        });
    }
}

#[test]
fn haproxy_takes_a_client_ca_rotation_and_a_new_key_pair_by_sigusr2_to_its_master() {
    system_binary("haproxy");
    // HAProxy 2.6 finds the key of `crt FILE` in FILE.key (a Secret volume
    // can name it so with `items`).
    let mut rotation = Rotation::new("haproxy", "tls.crt.key");
    let backend = Backend::start();
    let port = free_port();
    let home = rotation.dir.path().join("haproxy");
    let config = write(
        &home,
        "haproxy.cfg",
        format!(
            "defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend mtls
    bind 127.0.0.1:{port} ssl crt {cert} ca-file {client_ca} verify required
    default_backend app

backend app
    server app 127.0.0.1:{backend}
",
            cert = s(&rotation.cert),
            client_ca = s(&rotation.output),
            backend = backend.port,
        ),
    );
    let pid_file = home.join("haproxy.pid");
    let mut haproxy = Haproxy::start(&config, &pid_file, &rotation.logs, port);

    // A long-lived connection, opened before any reload.
    let old_client = rotation.old_client.clone();
    let mut long = eventually(PATIENCE, || {
        Connection::open(port, "localhost", old_client.clone())
            .map_err(|e| format!("the long-lived connection: {e}"))
    });

    rotation.run(
        &mut haproxy,
        &format!("signal = \"USR2\"\npid_file = \"{}\"", s(&pid_file)),
        port,
    );

    // Reloaded once per change (the stale pair at start, CA-new added,
    // CA-old dropped, the pair reissued), by the one master in the pid file.
    assert_eq!(haproxy.reloads(), 4, "haproxy reloads");
    assert_eq!(
        haproxy.pid_in_file(),
        Some(haproxy.pid()),
        "haproxy pid file"
    );
    // The connection opened before the four reloads is still served, by the
    // old worker, on the trust it was opened with.
    long.ping()
        .expect("the long-lived connection is still served after the reloads");
    eprintln!("haproxy: a TLS connection opened before 4 reloads is still served after them");
}
