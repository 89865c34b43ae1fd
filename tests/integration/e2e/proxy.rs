//! The rotation every reverse proxy goes through in these tests (traefik,
//! HAProxy, Caddy), driven against the real proxy:
//!
//! 1. anchorage renders a client CA bundle (CA-old) from a kubelet-style
//!    Secret and watches the proxy's own key pair in another volume, with
//!    no reload action; the proxy starts on both;
//! 2. the Secret gains CA-new and the key pair is reissued: anchorage
//!    renders and checks both, yet for a bounded, generous window the proxy
//!    still refuses CA-new clients and serves the first certificate, and
//!    its log shows no reload: the reload is needed (that is the point, so
//!    here a wait that asserts "nothing happened" is the test);
//! 3. the Secret goes back to CA-old and anchorage is replaced by one with
//!    the proxy's reload action: at start its TLS probe sees the proxy
//!    serve a stale certificate and reloads it;
//! 4. the real rotation: CA-new added (a CA-new client accepted), CA-old
//!    dropped (a CA-old client refused), the key pair reissued again (the
//!    probe proves the new certificate is served); the proxy's process
//!    never changes.
//!
//! Each step's time (swap -> the proxy serving the new trust) is printed.

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
use crate::support::{DumpLogsOnFailure, pem_certs, pems, s, write};

pub const PATIENCE: Duration = Duration::from_secs(30);

/// How long the proxy must keep its old trust when nothing reloads it:
/// longer than anything that could make it notice by itself (traefik's
/// provider throttle is 2 s by default).
const UNRELOADED: Duration = Duration::from_secs(5);

/// A proxy under test.
pub trait Proxy {
    /// The process that must never be restarted (the master, for HAProxy).
    fn pid(&self) -> u32;
    /// Panics if that process exited.
    fn assert_alive(&mut self);
    /// How many new configurations it has taken, from its own log.
    fn reloads(&self) -> usize;
    /// One new connection as `client`: the certificate the proxy served if
    /// it let the client through to the app behind it, else why not.
    fn connect(&self, client: &Arc<ClientConfig>) -> Result<Vec<u8>, String>;
    /// Waits until the proxy can take another reload, for one that cannot
    /// while it is still taking the last one.
    fn settle(&self) {}
}

/// A server process logging to a file, stopped with everything it started
/// when dropped.
pub struct Process {
    child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Self {
        let out = fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {:?}: {e}", cmd.get_program()));
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    #[track_caller]
    pub fn assert_alive(&mut self) {
        let status = self.child.try_wait().expect("wait");
        assert!(
            status.is_none(),
            "{} exited: {status:?}\n{}",
            self.log.display(),
            self.log()
        );
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How often `needle` appears in its log.
    pub fn logged(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGTERM: a master stops its workers, then exits.
        let pid = self.pid() as i32;
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Still running: its children are still its own, found by ppid.
        for p in descendants(pid) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process below `pid`, from /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| {
            let stat = fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            Some((p, ppid.parse().ok()?))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// The PKI, the two kubelet volumes and anchorage of one rotation.
pub struct Rotation {
    // Dropped in this order: the logs are printed (on failure) and
    // anchorage stopped before the directory goes.
    _dump: DumpLogsOnFailure,
    daemon: Option<Daemon>,
    name: &'static str,
    pub logs: PathBuf,
    secret: Volume,
    pair: Volume,
    /// The client CA bundle anchorage renders: the proxy trusts it.
    pub output: PathBuf,
    /// The proxy's key pair, through the volume's visible names.
    pub cert: PathBuf,
    pub key: PathBuf,
    ca_old: Ca,
    ca_new: Ca,
    leaves: [Leaf; 3],
    pub old_client: Arc<ClientConfig>,
    pub new_client: Arc<ClientConfig>,
    key_name: String,
    pub dir: tempfile::TempDir,
}

impl Rotation {
    /// Step 1 up to the proxy's start: the Secret holds CA-old, the key
    /// pair volume the first leaf (its key named `key_name`), and anchorage,
    /// with no reload action, has rendered the bundle.
    pub fn new(name: &'static str, key_name: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (logs, dump) = DumpLogsOnFailure::logs_in(dir.path());
        let (ca_old, ca_new) = (
            Ca::new(&format!("{name} Clients Old")),
            Ca::new(&format!("{name} Clients New")),
        );
        let server_ca = Ca::new(&format!("{name} Server CA"));
        let pki = dir.path().join("pki");
        let server_ca_file = write(&pki, "server-ca.pem", server_ca.pem());
        let old_client = tls::fresh_client(&pki, "client-old", &ca_old, &server_ca_file);
        let new_client = tls::fresh_client(&pki, "client-new", &ca_new, &server_ca_file);
        let leaves = [
            server_ca.leaf("localhost"),
            server_ca.leaf("localhost"),
            server_ca.leaf("localhost"),
        ];

        let mut secret = Volume::new(&dir.path().join("secret"));
        secret.write(&[("ca.crt", &pems(&[&ca_old]))]);
        let mut pair = Volume::new(&dir.path().join("tls"));
        write_pair(&mut pair, &leaves[0], key_name);
        let output = dir.path().join("out").join("clients.pem");
        fs::create_dir_all(output.parent().expect("parent")).expect("mkdir out");
        let mut rotation = Self {
            _dump: dump,
            daemon: None,
            name,
            logs,
            cert: pair.dir.join("tls.crt"),
            key: pair.dir.join(key_name),
            key_name: key_name.to_owned(),
            output,
            secret,
            pair,
            ca_old,
            ca_new,
            leaves,
            old_client,
            new_client,
            dir,
        };
        let config = rotation.config("without-reload.toml", None, 0);
        rotation.daemon = Some(Daemon::start(&rotation.logs, &["--config", s(&config)]));
        rotation.wait_bundle(&[&rotation.ca_old]);
        rotation
    }

    /// cert-manager reissues the key pair: kubelet swaps the volume.
    fn reissue(&mut self, leaf: usize) {
        write_pair(&mut self.pair, &self.leaves[leaf], &self.key_name);
    }

    /// anchorage's configuration: the bundle and the key pair, each with
    /// `reload` (TOML keys of one reload action), the key pair's proven by
    /// a TLS probe of `probe_port`.
    fn config(&self, file: &str, reload: Option<&str>, probe_port: u16) -> PathBuf {
        let bundle_reload = reload
            .map(|r| format!("\n  [[bundle.reload]]\n{}\n", indent(r)))
            .unwrap_or_default();
        let pair_reload = reload
            .map(|r| {
                format!(
                    "\n  [[keypair.reload]]\n{}\n  probe = \"127.0.0.1:{probe_port}\"\n  probe_timeout = \"30s\"\n",
                    indent(r)
                )
            })
            .unwrap_or_default();
        write(
            &self.dir.path().join("etc"),
            file,
            format!(
                "[daemon]
debounce = \"0s\"

[[bundle]]
name = \"clients\"
sources = [\"{secret}\"]

  [[bundle.output]]
  path = \"{output}\"
{bundle_reload}
[[keypair]]
name = \"server\"
cert = \"{cert}\"
key = \"{key}\"
{pair_reload}",
                secret = s(&self.secret.dir),
                output = s(&self.output),
                cert = s(&self.cert),
                key = s(&self.key),
            ),
        )
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("anchorage runs")
    }

    #[track_caller]
    fn wait_bundle(&self, want: &[&Ca]) {
        let mut want: Vec<String> = want.iter().map(|c| c.sha256()).collect();
        want.sort();
        let path = &self.output;
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

    #[track_caller]
    fn wait_log(&self, needle: &str, count: usize) {
        let daemon = self.daemon();
        eventually(PATIENCE, || {
            let seen = daemon.log().matches(needle).count();
            if seen >= count {
                Ok(())
            } else {
                Err(format!(
                    "anchorage logged {needle:?} {seen} times, want {count}"
                ))
            }
        });
    }

    fn leaf_name(&self, served: &[u8]) -> String {
        match self.leaves.iter().position(|l| l.cert.der()[..] == *served) {
            Some(i) => format!("leaf {}", i + 1),
            None => format!("an unknown certificate (sha256 {})", sha256_hex(served)),
        }
    }

    /// Waits until `client` gets through; returns the certificate served.
    #[track_caller]
    fn wait_accepted(&self, proxy: &dyn Proxy, what: &str, client: &Arc<ClientConfig>) -> Vec<u8> {
        eventually(PATIENCE, || {
            proxy
                .connect(client)
                .map_err(|e| format!("{}: {what} refused: {e}", self.name))
        })
    }

    #[track_caller]
    fn wait_refused(&self, proxy: &dyn Proxy, what: &str, client: &Arc<ClientConfig>) -> String {
        eventually(PATIENCE, || match proxy.connect(client) {
            Ok(_) => Err(format!("{}: {what} still accepted", self.name)),
            Err(e) => Ok(e),
        })
    }

    /// Waits until the proxy serves leaf `i` to a client it accepts.
    #[track_caller]
    fn wait_served(&self, proxy: &dyn Proxy, i: usize, client: &Arc<ClientConfig>) {
        let want = self.leaves[i].cert.der();
        eventually(PATIENCE, || {
            let served = proxy
                .connect(client)
                .map_err(|e| format!("{}: refused: {e}", self.name))?;
            if served[..] == want[..] {
                Ok(())
            } else {
                Err(format!(
                    "{} serves {}, want leaf {}",
                    self.name,
                    self.leaf_name(&served),
                    i + 1
                ))
            }
        });
    }

    /// Steps 2 to 4, once `proxy` serves the first leaf and trusts CA-old;
    /// `reload` is its reload action (TOML keys), `probe_port` where it
    /// serves TLS.
    pub fn run(&mut self, proxy: &mut dyn Proxy, reload: &str, probe_port: u16) {
        let name = self.name;
        let pid = proxy.pid();
        let (old, new) = (self.old_client.clone(), self.new_client.clone());

        // Before: CA-old clients get through, CA-new clients do not.
        let served = self.wait_accepted(proxy, "a CA-old client", &old);
        assert_eq!(served, self.leaves[0].cert.der().to_vec(), "the first leaf");
        let refusal = proxy
            .connect(&new)
            .expect_err("a CA-new client is refused before the rotation");
        eprintln!("{name}: before the rotation a CA-new client is refused ({refusal})");

        // Without a reload action: anchorage renders and checks, the proxy
        // keeps its old trust and its old certificate.
        let reloads = proxy.reloads();
        self.secret
            .write(&[("ca.crt", &pems(&[&self.ca_old, &self.ca_new]))]);
        self.reissue(1);
        self.wait_bundle(&[&self.ca_old, &self.ca_new]);
        self.wait_log("key pair checked", 2);
        let window = Instant::now();
        while window.elapsed() < UNRELOADED {
            proxy.assert_alive();
            if let Ok(served) = proxy.connect(&new) {
                panic!(
                    "{name}: a CA-new client got through with no reload action (served {})",
                    self.leaf_name(&served)
                );
            }
            let served = proxy
                .connect(&old)
                .unwrap_or_else(|e| panic!("{name}: a CA-old client refused: {e}"));
            assert_eq!(
                served,
                self.leaves[0].cert.der().to_vec(),
                "{name} serves the new leaf with no reload action"
            );
            assert_eq!(proxy.reloads(), reloads, "{name} reloaded by itself");
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!(
            "{name}: without a reload action, {} s after the swap it still refuses CA-new clients and serves the first leaf",
            UNRELOADED.as_secs()
        );

        // The Secret goes back; anchorage is replaced by one that reloads.
        self.secret.write(&[("ca.crt", &pems(&[&self.ca_old]))]);
        self.wait_bundle(&[&self.ca_old]);
        assert_eq!(self.daemon.take().expect("anchorage").stop(), 0);
        let config = self.config("with-reload.toml", Some(reload), probe_port);
        let started = Instant::now();
        self.daemon = Some(Daemon::start(&self.logs, &["--config", s(&config)]));
        self.wait_served(proxy, 1, &old);
        let took = started.elapsed();
        eprintln!(
            "{name}: anchorage started with a reload action -> the reissued leaf served: {} ms",
            took.as_millis()
        );
        self.wait_log("probe: the app took the change", 1);
        assert!(
            proxy.connect(&new).is_err(),
            "{name}: a CA-new client accepted before CA-new was added"
        );

        // CA-new added: CA-new clients get through.
        proxy.settle();
        let swap = Instant::now();
        self.secret
            .write(&[("ca.crt", &pems(&[&self.ca_old, &self.ca_new]))]);
        self.wait_accepted(proxy, "a CA-new client after CA-new was added", &new);
        let took = swap.elapsed();
        eprintln!(
            "{name}: CA-new added -> first CA-new client accepted: {} ms",
            took.as_millis()
        );
        self.wait_bundle(&[&self.ca_old, &self.ca_new]);
        self.wait_accepted(proxy, "a CA-old client during the rotation", &old);

        // CA-old dropped: CA-old clients are refused.
        proxy.settle();
        let swap = Instant::now();
        self.secret.write(&[("ca.crt", &pems(&[&self.ca_new]))]);
        let refusal = self.wait_refused(proxy, "a CA-old client after CA-old was dropped", &old);
        let took = swap.elapsed();
        eprintln!(
            "{name}: CA-old dropped -> first CA-old client refused: {} ms ({refusal})",
            took.as_millis()
        );
        self.wait_bundle(&[&self.ca_new]);
        self.wait_accepted(proxy, "a CA-new client after the rotation", &new);

        // The key pair reissued again: the probe proves it is served.
        proxy.settle();
        let swap = Instant::now();
        self.reissue(2);
        self.wait_served(proxy, 2, &new);
        let took = swap.elapsed();
        eprintln!(
            "{name}: key pair reissued -> new certificate served: {} ms",
            took.as_millis()
        );
        self.wait_log("probe: the app took the change", 2);

        // One process all along.
        proxy.assert_alive();
        assert_eq!(proxy.pid(), pid, "{name} kept its pid");
        assert!(proxy.reloads() > reloads, "{name} logged no reload");
        let log = self.daemon().log();
        assert!(
            !log.contains("ERROR") && !log.contains("did not take it"),
            "anchorage logged a failure:\n{log}"
        );
        assert_eq!(self.daemon.take().expect("anchorage").stop(), 0);
    }
}

fn write_pair(pair: &mut Volume, leaf: &Leaf, key_name: &str) {
    let (cert, key) = (leaf.cert.pem(), leaf.key.serialize_pem());
    pair.write(&[("tls.crt", cert.as_bytes()), (key_name, key.as_bytes())]);
}

fn indent(toml: &str) -> String {
    toml.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
