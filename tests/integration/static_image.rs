//! The container image without a container engine: the static binary that
//! docker/Dockerfile builds (glibc, crt-static), run in a root that holds
//! exactly what the image and the container runtime give it, as the image's
//! user, 65532.
//!
//! The root holds distroless static's files that anchorage can touch
//! (/etc/passwd, /etc/group, /etc/nsswitch.conf, the public roots in
//! /etc/ssl/certs, /tmp), the /etc/hosts a runtime writes, /proc mounted as
//! a runtime mounts it, and the binary. No dynamic loader, no libc: a binary
//! that is not static cannot even start there. Inside it: `check`, `render`
//! of every format, and `run` with a signal reload (pid file) and an HTTP
//! reload to `http://localhost` (a name resolved through nsswitch and
//! /etc/hosts by the static glibc), and `health`, the image's HEALTHCHECK.
//!
//! The binary is built with the `static-test` profile (dev, no debug info)
//! into its own target directory: the image's release build (LTO) takes
//! minutes on two cores, and what this test proves is the linking and the
//! runtime environment, not the optimiser. Root is needed (chroot, mount);
//! elsewhere the tests say so and skip.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::daemon::eventually;
use crate::support::pki::{Ca, sha256_hex};
use crate::support::{Outcome, free_port, pem_certs, s, sh, write};

/// The image's user (distroless `nonroot`).
const UID: u32 = 65532;

/// distroless static-debian12's /etc/passwd, /etc/group and
/// /etc/nsswitch.conf.
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n\
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n";
const NSSWITCH: &str = "passwd:         files\ngroup:          files\nshadow:         files\n\
hosts:          files dns\nnetworks:       files\nprotocols:      db files\n\
services:       db files\nethers:         db files\nrpc:            db files\n";
/// What Docker writes into a container's /etc/hosts.
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// The static binary, built once for all the tests of this file.
fn static_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        // Beside the target dir of this test run (a CARGO_TARGET_DIR too),
        // in a directory of its own: its own lock, its own RUSTFLAGS.
        let target_dir = Path::new(env!("CARGO_BIN_EXE_anchorage"))
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("static-test");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let started = Instant::now();
        // At the lowest priority: the other tests, running meanwhile, wait
        // on deadlines.
        let mut build = Command::new("nice");
        // What cargo sets for this test (CARGO_PKG_NAME, CARGO_MANIFEST_DIR,
        // ...) is unset where scripts/test builds the same binary first:
        // ring's build script reruns when one changes, and would rebuild
        // ring and rustls here.
        for (name, _) in std::env::vars_os() {
            if name
                .to_str()
                .is_some_and(|n| n.starts_with("CARGO_") && n != "CARGO_HOME")
            {
                build.env_remove(name);
            }
        }
        let out = build
            .args(["-n", "19"])
            .arg(cargo)
            .args([
                "build",
                "--locked",
                "--profile",
                "static-test",
                "--bin",
                "anchorage",
            ])
            .args(["--target", &triple])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "the static build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = target_dir
            .join(&triple)
            .join("static-test")
            .join("anchorage");
        eprintln!(
            "static binary: {} bytes, built in {:.0?}",
            fs::metadata(&binary).expect("binary").len(),
            started.elapsed()
        );
        binary
    })
}

/// `None` (and a note) where this machine cannot chroot and mount.
fn privileged() -> Option<()> {
    if nix::unistd::geteuid().is_root() {
        Some(())
    } else {
        eprintln!("skipped: the image root needs root (chroot, mount /proc)");
        None
    }
}

/// A root with the image's files, a `/data` for the test's sources and
/// outputs, and the binary at the image's path.
struct ImageRoot {
    _dir: tempfile::TempDir,
    /// Outside the root: logs, the stand-in app's files.
    host: PathBuf,
    root: PathBuf,
}

impl ImageRoot {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // The app runs outside the root as 65532 and must reach its files.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let root = dir.path().join("root");
        let etc = root.join("etc");
        write(&etc, "passwd", PASSWD);
        write(&etc, "group", GROUP);
        write(&etc, "nsswitch.conf", NSSWITCH);
        write(&etc, "hosts", HOSTS);
        write(
            &etc.join("ssl/certs"),
            "ca-certificates.crt",
            fs::read("/etc/ssl/certs/ca-certificates.crt").expect("Debian's public roots"),
        );
        for (path, mode) in [("tmp", 0o1777), ("proc", 0o555), ("home/nonroot", 0o700)] {
            fs::create_dir_all(root.join(path)).expect("mkdir");
            fs::set_permissions(root.join(path), fs::Permissions::from_mode(mode)).expect("chmod");
        }
        chown(&root.join("home/nonroot"));
        let bin = root.join("usr/local/bin");
        fs::create_dir_all(&bin).expect("mkdir");
        fs::copy(static_binary(), bin.join("anchorage")).expect("copy the binary");
        for path in ["data/certs", "data/out", "data/run"] {
            fs::create_dir_all(root.join(path)).expect("mkdir");
        }
        chown(&root.join("data/out"));
        chown(&root.join("data/run"));
        for path in [&root, &root.join("data")] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let host = dir.path().join("host");
        fs::create_dir_all(&host).expect("mkdir");
        chown(&host);
        Self {
            _dir: dir,
            host,
            root,
        }
    }

    /// A path inside the root, as the host sees it.
    fn at(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// `anchorage ARGS` in the root, as 65532, with /proc mounted in a
    /// mount namespace of its own.
    fn anchorage(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount -t proc proc \"$0/proc\" && exec chroot --userspec={UID}:{UID} \"$0\" /usr/local/bin/anchorage \"$@\""
            ))
            .arg(&self.root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", "debug");
        cmd
    }

    fn run(&self, args: &[&str]) -> Outcome {
        Outcome::of(
            self.anchorage(args)
                .output()
                .expect("run in the image root"),
        )
    }
}

fn chown(path: &Path) {
    std::os::unix::fs::chown(path, Some(UID), Some(UID)).expect("chown");
}

#[test]
fn the_static_binary_checks_and_renders_every_format_in_the_image_root() {
    if privileged().is_none() {
        return;
    }
    let image = ImageRoot::new();
    let (a, b) = (Ca::new("Image A"), Ca::new("Image B"));
    write(&image.at("/data/certs"), "a.pem", a.pem());
    write(&image.at("/data/certs"), "b.pem", b.pem());

    let out = image.run(&["check", "/etc/ssl/certs/ca-certificates.crt"]);
    out.expect_code(0);
    assert!(out.stdout.contains("ISRG Root X1"), "{}", out.stdout);
    let out = image.run(&["check", "--strict", "--json", "/data/certs"]);
    out.expect_code(0);
    let reports: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(reports.as_array().expect("array").len(), 2);

    write(
        &image.at("/data"),
        "anchorage.toml",
        "[[bundle]]\nname = \"image\"\nsources = [\"/data/certs\"]\n\
         [[bundle.output]]\npath = \"/data/out/ca.pem\"\n\
         [[bundle.output]]\npath = \"/data/out/certs\"\nformat = \"openssl-dir\"\n\
         [[bundle.output]]\npath = \"/data/out/der\"\nformat = \"der-dir\"\n\
         [[bundle.output]]\npath = \"/data/out/trust.p12\"\nformat = \"pkcs12\"\n\
         [[bundle.output]]\npath = \"/data/out/trust.jks\"\nformat = \"jks\"\n",
    );
    let render = || {
        image
            .run(&["render", "--config", "/data/anchorage.toml"])
            .expect_code(0);
    };
    render();
    let assert_outputs = |cas: &[&Ca]| {
        let pem = fs::read(image.at("/data/out/ca.pem")).expect("ca.pem");
        let mut got = pem_certs(&pem);
        let mut want: Vec<Vec<u8>> = cas.iter().map(|c| c.der()).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "ca.pem");
        // OpenSSL finds each CA in the hashed directory by subject hash.
        let dir = tempfile::tempdir().expect("tempdir");
        for (i, ca) in cas.iter().enumerate() {
            let leaf = write(
                dir.path(),
                &format!("leaf{i}.pem"),
                ca.leaf("image.test").cert.pem(),
            );
            sh(&format!(
                "openssl verify -CApath {} {}",
                s(&image.at("/data/out/certs")),
                s(&leaf)
            ));
        }
        let ders = fs::read_dir(image.at("/data/out/der"))
            .expect("der-dir")
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count();
        assert_eq!(ders, cas.len(), "der-dir");
        let p12 = sh(&format!(
            "openssl pkcs12 -in {} -nokeys -passin pass: | grep -c 'BEGIN CERTIFICATE'",
            s(&image.at("/data/out/trust.p12"))
        ));
        assert_eq!(p12.trim(), cas.len().to_string(), "pkcs12");
        let jks = fs::read(image.at("/data/out/trust.jks")).expect("jks");
        assert_eq!(&jks[..4], &[0xfe, 0xed, 0xfe, 0xed], "a JKS magic number");
    };
    assert_outputs(&[&a, &b]);

    // A second render replaces each directory output whole.
    let c = Ca::new("Image C");
    write(&image.at("/data/certs"), "c.pem", c.pem());
    render();
    assert_outputs(&[&a, &b, &c]);
    // Written by 65532, as the image's user.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        fs::metadata(image.at("/data/out/ca.pem"))
            .expect("meta")
            .uid(),
        UID
    );
}

/// A plain HTTP server on loopback that answers 200 and counts requests.
struct ReloadEndpoint {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl ReloadEndpoint {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // The rest of the head.
                loop {
                    let mut header = String::new();
                    match reader.read_line(&mut header) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if header == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                seen.lock().expect("lock").push(line.trim().to_owned());
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                );
            }
        });
        Self { port, requests }
    }

    fn count(&self) -> usize {
        self.requests.lock().expect("lock").len()
    }
}

/// The stand-in app (tests/integration/support/hup_app.py), run as 65532
/// outside the root, as an app in another container of the pod would.
struct App {
    child: Child,
    log: PathBuf,
}

impl App {
    fn start(pid_file: &Path, bundle: &Path, log: &Path) -> Self {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/integration/support/hup_app.py"
        );
        let child = Command::new("python3")
            .args([script, s(pid_file), s(bundle), s(log)])
            .uid(UID)
            .gid(UID)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the app");
        eventually(Duration::from_secs(10), || {
            pid_file
                .exists()
                .then_some(())
                .ok_or_else(|| "no pid file yet".to_owned())
        });
        Self {
            child,
            log: log.to_owned(),
        }
    }

    fn reloads(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
            .collect()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_static_binary_runs_and_reloads_by_signal_and_http_in_the_image_root() {
    if privileged().is_none() {
        return;
    }
    let image = ImageRoot::new();
    let a = Ca::new("Run A");
    write(&image.at("/data/certs"), "a.pem", a.pem());
    let endpoint = ReloadEndpoint::start();
    let app = App::start(
        &image.at("/data/run/app.pid"),
        &image.at("/data/out/ca.pem"),
        &image.host.join("app.log"),
    );
    let listen_port = free_port();
    write(
        &image.at("/data"),
        "anchorage.toml",
        format!(
            "[daemon]\nlisten = \"127.0.0.1:{listen_port}\"\ndebounce = \"50ms\"\n\n\
             [[bundle]]\nname = \"image\"\nsources = [\"/data/certs\"]\n\
             [[bundle.output]]\npath = \"/data/out/ca.pem\"\n\
             [[bundle.output]]\npath = \"/data/out/certs\"\nformat = \"openssl-dir\"\n\
             [[bundle.reload]]\nsignal = \"HUP\"\npid_file = \"/data/run/app.pid\"\n\
             [[bundle.reload]]\nhttp = \"http://localhost:{}/reload\"\nretries = 3\n",
            endpoint.port
        ),
    );
    let log = image.host.join("anchorage.log");
    let file = fs::File::create(&log).expect("log");
    let mut daemon = image.anchorage(&["run", "--config", "/data/anchorage.toml"]);
    daemon
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup"))
        .stderr(file);
    let daemon = Running(daemon.spawn().expect("start anchorage in the image root"));
    let dump = || fs::read_to_string(&log).unwrap_or_default();

    // The first render writes the missing outputs: both reloads run.
    let first = eventually(Duration::from_secs(20), || {
        let reloads = app.reloads();
        (reloads.len() == 1 && endpoint.count() == 1)
            .then_some(reloads)
            .ok_or_else(|| {
                format!(
                    "app {:?}, http {:?}\n{}",
                    app.reloads(),
                    endpoint.requests.lock().expect("lock"),
                    dump()
                )
            })
    });
    let bundle = fs::read(image.at("/data/out/ca.pem")).expect("ca.pem");
    assert_eq!(first[0], sha256_hex(&bundle));
    assert_eq!(
        endpoint.requests.lock().expect("lock")[0],
        "POST /reload HTTP/1.1"
    );

    // The image's HEALTHCHECK, in the image, as its user.
    let out = image.run(&["health", "--listen", &format!("0.0.0.0:{listen_port}")]);
    out.expect_code(0);

    // A change: one more reload of each kind, after the new bundle.
    write(&image.at("/data/certs"), "b.pem", Ca::new("Run B").pem());
    let second = eventually(Duration::from_secs(20), || {
        let reloads = app.reloads();
        (reloads.len() == 2 && endpoint.count() == 2)
            .then_some(reloads)
            .ok_or_else(|| {
                format!(
                    "app {:?}, http {}\n{}",
                    app.reloads(),
                    endpoint.count(),
                    dump()
                )
            })
    });
    let bundle = fs::read(image.at("/data/out/ca.pem")).expect("ca.pem");
    assert_eq!(pem_certs(&bundle).len(), 2);
    assert_eq!(second[1], sha256_hex(&bundle));
    assert_eq!(daemon.stop(), 0, "{}", dump());
}

/// A process killed when dropped.
struct Running(Child);

impl Running {
    /// SIGTERM, then the exit code.
    fn stop(mut self) -> i32 {
        let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "anchorage did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
