//! End-to-end: a real Caddy terminating mutual TLS with its own key pair
//! and a client CA bundle read from files, reloaded the way Caddy users
//! reload it: `caddy reload --config FILE --force`, which POSTs the whole
//! configuration to the admin API's `/load` (kept on loopback) with
//! `Cache-Control: must-revalidate`.
//!
//! Caddy reads the files a configuration names when it loads that
//! configuration. The file names do not change in a rotation, so a plain
//! `caddy reload` finds the configuration unchanged and does nothing:
//! `--force` is what makes it read the files again. The configuration is
//! Caddy's JSON: Debian's Caddy (2.6) reads only the first certificate of a
//! Caddyfile's `trusted_ca_cert_file`, and reads it when the Caddyfile is
//! adapted, whereas JSON's `trusted_ca_certs_pem_files` takes every
//! certificate of the bundle at each load.
//!
//! The admin API has no body-less reload: an `http` action (an empty POST)
//! to `/load` loads an empty configuration, and Caddy stops serving.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::ClientConfig;
use serde_json::json;

use super::proxy::{PATIENCE, Process, Proxy, Rotation};
use crate::support::daemon::{Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::Ca;
use crate::support::{DumpLogsOnFailure, free_port, pems, s, system_binary, tls, write};

struct Caddy {
    process: Process,
    port: u16,
}

impl Caddy {
    /// `caddy run --config CONFIG`, with its home, data and config
    /// directories under `home`.
    fn start(config: &Path, home: &Path, logs: &Path, port: u16) -> Self {
        let process = Process::spawn(
            Command::new(system_binary("caddy"))
                .args(["run", "--config"])
                .arg(config)
                .env("HOME", home)
                .env("XDG_CONFIG_HOME", home.join("config"))
                .env("XDG_DATA_HOME", home.join("data")),
            &logs.join("caddy.log"),
        );
        Self { process, port }
    }
}

impl Proxy for Caddy {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn assert_alive(&mut self) {
        self.process.assert_alive();
    }

    /// Every configuration loaded through the admin API.
    fn reloads(&self) -> usize {
        self.process.logged("\"load complete\"")
    }

    fn connect(&self, client: &Arc<ClientConfig>) -> Result<Vec<u8>, String> {
        let response = tls::https_get(self.port, client)?;
        if response.status == 200 && response.body == "ok\n" {
            Ok(response.served)
        } else {
            Err(format!("HTTP {} {:?}", response.status, response.body))
        }
    }
}

/// Caddy's JSON configuration: the admin API on 127.0.0.1:`admin`, a
/// server on 127.0.0.1:`port` answering "ok" to clients that present a
/// certificate from the bundle `client_ca`, serving the key pair (also to
/// clients that send no SNI, as anchorage's probe of an IP address).
fn config(
    home: &Path,
    admin: u16,
    port: u16,
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> PathBuf {
    let config = json!({
        "admin": {
            "listen": format!("127.0.0.1:{admin}"),
            "config": {"persist": false}
        },
        "storage": {"module": "file_system", "root": s(&home.join("data"))},
        "apps": {
            "tls": {"certificates": {"load_files": [
                {"certificate": s(cert), "key": s(key), "tags": ["anchorage"]}
            ]}},
            "http": {"servers": {"mtls": {
                "listen": [format!("127.0.0.1:{port}")],
                "automatic_https": {"disable": true},
                "tls_connection_policies": [{
                    "certificate_selection": {"any_tag": ["anchorage"]},
                    "client_authentication": {
                        "trusted_ca_certs_pem_files": [s(client_ca)],
                        "mode": "require_and_verify"
                    },
                    "default_sni": "localhost"
                }],
                "routes": [{"handle": [
                    {"handler": "static_response", "status_code": 200, "body": "ok\n"}
                ]}]
            }}}
        }
    });
    write(
        home,
        "caddy.json",
        serde_json::to_string_pretty(&config).expect("JSON"),
    )
}

#[test]
fn caddy_takes_a_client_ca_rotation_and_a_new_key_pair_by_a_forced_caddy_reload() {
    let caddy_bin = system_binary("caddy");
    let mut rotation = Rotation::new("caddy", "tls.key");
    let home = rotation.dir.path().join("caddy");
    let (admin, port) = (free_port(), free_port());
    let config = config(
        &home,
        admin,
        port,
        &rotation.cert,
        &rotation.key,
        &rotation.output,
    );
    let mut caddy = Caddy::start(&config, &home, &rotation.logs, port);

    rotation.run(
        &mut caddy,
        &format!(
            "exec = [\"{}\", \"reload\", \"--config\", \"{}\", \"--force\"]",
            s(&caddy_bin),
            s(&config)
        ),
        port,
    );
    // One load per change: the stale pair at start, CA-new added, CA-old
    // dropped, the pair reissued.
    assert_eq!(caddy.reloads(), 4, "caddy reloads");
}

/// Why the recipe needs the caddy binary: the only body-less call an `http`
/// action can make, an empty POST to `/load`, answers 200 and leaves Caddy
/// with an empty configuration, serving nothing.
#[test]
fn an_empty_post_to_caddys_load_endpoint_stops_it_serving() {
    system_binary("caddy");
    let dir = tempfile::tempdir().expect("tempdir");
    let (logs, _dump) = DumpLogsOnFailure::logs_in(dir.path());
    let home = dir.path().join("caddy");
    let server_ca = Ca::new("caddy Server CA");
    let (cert, key) = server_ca
        .leaf("localhost")
        .write(&dir.path().join("pki"), "server");
    let (ca_a, ca_b) = (Ca::new("caddy Clients A"), Ca::new("caddy Clients B"));
    let server_ca_file = write(&dir.path().join("pki"), "server-ca.pem", server_ca.pem());
    let client = tls::fresh_client(&dir.path().join("pki"), "client", &ca_a, &server_ca_file);

    let mut secret = Volume::new(&dir.path().join("secret"));
    secret.write(&[("ca.crt", &pems(&[&ca_a]))]);
    let output = dir.path().join("out").join("clients.pem");
    std::fs::create_dir_all(output.parent().expect("parent")).expect("mkdir");
    let (admin, port) = (free_port(), free_port());
    let config = config(&home, admin, port, &cert, &key, &output);
    let daemon = Daemon::start(
        &logs,
        &[
            "--source",
            s(&secret.dir),
            "--output",
            s(&output),
            "--http",
            &format!("http://127.0.0.1:{admin}/load"),
            "--debounce",
            "0",
        ],
    );
    eventually(PATIENCE, || {
        output
            .exists()
            .then_some(())
            .ok_or_else(|| "no bundle yet".to_owned())
    });
    let mut caddy = Caddy::start(&config, &home, &logs, port);
    eventually(PATIENCE, || caddy.connect(&client).map(|_| ()));

    secret.write(&[("ca.crt", &pems(&[&ca_a, &ca_b]))]);
    daemon.wait_log("outcome=\"success\"", 1);
    let refusal = eventually(PATIENCE, || match caddy.connect(&client) {
        Ok(_) => Err("caddy still serves".to_owned()),
        Err(e) => Ok(e),
    });
    eprintln!("caddy: after an empty POST /load, a client it served is not: {refusal}");
    // Caddy said yes and kept running: nothing tells anchorage it broke.
    caddy.assert_alive();
    assert_eq!(caddy.reloads(), 1, "one load, through the admin API");
    assert_eq!(daemon.stop(), 0);
}
