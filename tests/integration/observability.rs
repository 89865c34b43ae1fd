//! What operators see of `anchorage run`: `/metrics` (checked by a real
//! OpenMetrics parser, prometheus_client's), `/healthz` and `/readyz`, and
//! systemd's notify protocol, against the real binary, with a frozen event
//! loop made the way a hung network filesystem makes one: a read that
//! blocks.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::daemon::{Daemon, eventually};
use crate::support::pki::Ca;
use crate::support::{Outcome, anchorage, free_port, pem_certs, s, write};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A temporary directory, with a `logs/` beside the sources for the
/// daemon's log and the scrapes: never inside a watched directory, nor in
/// the parent of one, where every log line would be a change to look at.
fn workdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    fs::create_dir_all(&logs).expect("mkdir logs");
    (dir, logs)
}

pub(crate) struct Answer {
    pub(crate) status: u16,
    headers: String,
    pub(crate) body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then_some(value.trim())
        })
    }
}

/// A tiny HTTP/1.1 GET; `Err` when nothing answers (not started yet).
pub(crate) fn get(addr: SocketAddr, path: &str) -> Result<Answer, String> {
    get_with(addr, path, "")
}

/// [`get`] with more header lines (each ending in CRLF).
fn get_with(addr: SocketAddr, path: &str, headers: &str) -> Result<Answer, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read {path}: {e}"))?;
    let raw = String::from_utf8(raw).map_err(|e| e.to_string())?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end: {raw:?}"))?;
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    Ok(Answer {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    })
}

/// Python's prometheus_client OpenMetrics parser: strict (it rejects a
/// missing `# EOF`, a counter sample without `_total`, a bad escape...);
/// prints every sample as JSON.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
samples = []
with open(sys.argv[1], encoding="utf-8") as f:
    for family in text_string_to_metric_families(f.read()):
        for sample in family.samples:
            samples.append({"family": family.name, "type": family.type,
                            "name": sample.name, "labels": sample.labels,
                            "value": sample.value})
print(json.dumps(samples))
"#;

/// One scrape of `/metrics`, as the parser read it.
struct Scrape {
    samples: Vec<serde_json::Value>,
    text: String,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|sample| {
                sample["name"] == name
                    && labels
                        .iter()
                        .all(|(key, value)| sample["labels"][*key] == *value)
            })
            .and_then(|sample| sample["value"].as_f64())
    }

    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    fn family_type(&self, family: &str) -> Option<&str> {
        self.samples
            .iter()
            .find(|s| s["family"] == family)
            .and_then(|s| s["type"].as_str())
    }
}

/// What Prometheus asks for when it scrapes.
const PROMETHEUS_ACCEPT: &str = "Accept: application/openmetrics-text;version=1.0.0,\
     text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n";

/// GETs `/metrics` as Prometheus does and parses it; panics if the
/// exposition is invalid.
fn scrape(addr: SocketAddr, scratch: &Path) -> Result<Scrape, String> {
    let answer = get_with(addr, "/metrics", PROMETHEUS_ACCEPT)?;
    if answer.status != 200 {
        return Err(format!("/metrics: {} {}", answer.status, answer.body));
    }
    assert_eq!(answer.header("content-type"), Some(OPENMETRICS));
    let file = scratch.join("metrics.txt");
    fs::write(&file, &answer.body).expect("write scrape");
    let out = Command::new("python3")
        .args(["-c", PARSE, s(&file)])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "the OpenMetrics parser rejected /metrics (is prometheus-client installed? \
         scripts/install-test-deps):\n{}\n--- exposition\n{}",
        String::from_utf8_lossy(&out.stderr),
        answer.body
    );
    let samples = serde_json::from_slice(&out.stdout).expect("parser json");
    Ok(Scrape {
        samples,
        text: answer.body,
    })
}

/// Waits until a scrape satisfies `check`, and returns it.
#[track_caller]
fn scrape_until(
    addr: SocketAddr,
    scratch: &Path,
    mut check: impl FnMut(&Scrape) -> Result<(), String>,
) -> Scrape {
    eventually(Duration::from_secs(15), || {
        let scrape = scrape(addr, scratch)?;
        check(&scrape).map_err(|e| format!("{e}\n--- /metrics\n{}", scrape.text))?;
        Ok(scrape)
    })
}

#[track_caller]
pub(crate) fn wait_status(addr: SocketAddr, path: &str, want: u16) -> Answer {
    eventually(Duration::from_secs(15), || {
        let answer = get(addr, path)?;
        if answer.status == want {
            Ok(answer)
        } else {
            Err(format!("{path}: {} {}", answer.status, answer.body))
        }
    })
}

/// Writes `bytes` at `dir/name` by a rename, so that the daemon never reads
/// a half-written file (a name starting with `..` is not a source).
fn put(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) {
    let staged = write(dir, "..staged", bytes);
    fs::rename(staged, dir.join(name)).expect("rename");
}

const RENDERS: &str = "anchorage_renders_total";
const BUNDLE: (&str, &str) = ("bundle", "default");

/// A daemon rendering `sources` to `output`, reloading with `exec true`,
/// serving on a free port (and `extra` flags).
fn start_serving(
    logs: &Path,
    sources: &Path,
    output: &Path,
    extra: &[&str],
) -> (Daemon, SocketAddr) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let listen = addr.to_string();
    let mut args = vec!["--source", s(sources), "--output", s(output)];
    args.extend(["--exec", "true", "--listen", &listen]);
    args.extend_from_slice(extra);
    (Daemon::start(logs, &args), addr)
}

#[test]
fn metrics_count_renders_refusals_and_reloads() {
    let (dir, logs) = workdir();
    let sources = dir.path().join("src");
    let (a, b) = (Ca::new("Metrics A"), Ca::new("Metrics B"));
    put(&sources, "a.pem", a.pem());
    let output = dir.path().join("out/ca.pem");
    let (daemon, addr) = start_serving(&logs, &sources, &output, &["--debounce", "50ms"]);
    let exec_ok = [BUNDLE, ("action", "exec"), ("result", "success")];
    let changed = [BUNDLE, ("result", "changed")];

    let first = scrape_until(addr, &logs, |m| {
        if m.count(RENDERS, &changed) >= 1.0 && m.count("anchorage_reloads_total", &exec_ok) >= 1.0
        {
            Ok(())
        } else {
            Err("no changed render and exec reload yet".into())
        }
    });
    assert_eq!(first.family_type("anchorage_renders"), Some("counter"));
    assert_eq!(
        first.value("anchorage_bundle_certificates", &[BUNDLE]),
        Some(1.0)
    );
    let not_after = first
        .value(
            "anchorage_certificate_not_after_seconds",
            &[BUNDLE, ("sha256", &a.sha256())],
        )
        .expect("not_after of A");
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(
        (not_after - now - 365.0 * 86_400.0).abs() < 3_600.0,
        "{not_after}"
    );
    // Seconds until the earliest expiry, as of this scrape.
    let left = first
        .value("anchorage_bundle_earliest_expiry_seconds", &[BUNDLE])
        .expect("earliest expiry");
    assert!(
        (not_after - now - left).abs() < 60.0,
        "{left} vs {not_after}"
    );
    let last_success = first
        .value("anchorage_last_success_timestamp_seconds", &[BUNDLE])
        .expect("last success");
    assert!((now - last_success).abs() < 60.0, "{last_success}");
    let renders = first.count(RENDERS, &changed);
    let reloads = first.count("anchorage_reloads_total", &exec_ok);

    // A real change: one more changed render, one more reload, two CAs.
    put(&sources, "b.pem", b.pem());
    let second = scrape_until(addr, &logs, |m| {
        if m.count(RENDERS, &changed) > renders
            && m.count("anchorage_reloads_total", &exec_ok) > reloads
            && m.value("anchorage_bundle_certificates", &[BUNDLE]) == Some(2.0)
        {
            Ok(())
        } else {
            Err("the change is not counted yet".into())
        }
    });
    assert!(
        second
            .value(
                "anchorage_certificate_not_after_seconds",
                &[BUNDLE, ("sha256", &b.sha256())]
            )
            .is_some()
    );
    assert_eq!(pem_certs(&fs::read(&output).expect("output")).len(), 2);

    // Damaged input: refused, counted with its reason; nothing else moves.
    let damaged = [BUNDLE, ("reason", "damaged")];
    let refusals = second.count("anchorage_refusals_total", &damaged);
    put(
        &sources,
        "c.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    );
    let third = scrape_until(addr, &logs, |m| {
        if m.count("anchorage_refusals_total", &damaged) > refusals
            && m.count(RENDERS, &[BUNDLE, ("result", "refused")]) >= 1.0
        {
            Ok(())
        } else {
            Err("the refusal is not counted yet".into())
        }
    });
    assert_eq!(
        third.value("anchorage_bundle_certificates", &[BUNDLE]),
        Some(2.0),
        "a refused bundle leaves the published one"
    );
    assert_eq!(
        third.count("anchorage_reloads_total", &exec_ok),
        second.count("anchorage_reloads_total", &exec_ok)
    );

    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);
    let ready = get(addr, "/readyz").expect("readyz");
    assert_eq!((ready.status, ready.body.trim()), (200, "ok"));
    assert_eq!(get(addr, "/nothing").expect("404").status, 404);
    assert_eq!(daemon.stop(), 0);
}

/// A scraper that does not ask for OpenMetrics (curl, a script, an older
/// Prometheus) gets Prometheus's text format, as PRODUCT.md says, and
/// Prometheus's own text parser reads every family with its type.
#[test]
fn a_plain_scrape_gets_prometheus_text() {
    let (dir, logs) = workdir();
    let sources = dir.path().join("src");
    put(&sources, "a.pem", Ca::new("Plain").pem());
    let output = dir.path().join("out/ca.pem");
    let (_daemon, addr) = start_serving(&logs, &sources, &output, &[]);
    // Scraped as Prometheus does until the render and its reload counted.
    scrape_until(addr, &logs, |m| {
        let reloaded = [BUNDLE, ("action", "exec"), ("result", "success")];
        if m.count("anchorage_reloads_total", &reloaded) >= 1.0 {
            Ok(())
        } else {
            Err("no reload counted yet".into())
        }
    });
    let answer = get(addr, "/metrics").expect("/metrics");
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let file = logs.join("plain.txt");
    fs::write(&file, &answer.body).expect("write scrape");
    let parse = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
print(json.dumps({s.name: f.type for f in text_string_to_metric_families(open(sys.argv[1]).read())
                  for s in f.samples}))
"#;
    let out = Command::new("python3")
        .args(["-c", parse, s(&file)])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        answer.body
    );
    let types: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for (sample, kind) in [
        (RENDERS, "counter"),
        ("anchorage_reloads_total", "counter"),
        ("anchorage_watch_events_total", "counter"),
        ("anchorage_bundle_certificates", "gauge"),
        ("anchorage_certificate_not_after_seconds", "gauge"),
        ("anchorage_last_success_timestamp_seconds", "gauge"),
        ("anchorage_reload_duration_seconds_count", "histogram"),
    ] {
        assert_eq!(types[sample], kind, "{sample}: {types}\n{}", answer.body);
    }
    assert!(!answer.body.contains("# EOF"), "{}", answer.body);
}

#[test]
fn readyz_waits_for_every_bundle_to_render_once() {
    let (dir, logs) = workdir();
    let sources = dir.path().join("src");
    put(&sources, "old.pem", Ca::expired("Only Expired").pem());
    let output = dir.path().join("out/ca.pem");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let daemon = Daemon::start(
        &logs,
        &[
            "--source",
            s(&sources),
            "--output",
            s(&output),
            "--debounce",
            "50ms",
            "--listen",
            &addr.to_string(),
        ],
    );
    // Refused from the start (no usable CA): alive, never rendered.
    scrape_until(addr, &logs, |m| {
        if m.count(RENDERS, &[BUNDLE, ("result", "refused")]) >= 1.0 {
            Ok(())
        } else {
            Err("not refused yet".into())
        }
    });
    assert_eq!(get(addr, "/healthz").expect("healthz").status, 200);
    let ready = get(addr, "/readyz").expect("readyz");
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("default: refused"), "{}", ready.body);
    assert!(!output.exists());

    put(&sources, "new.pem", Ca::new("Fresh").pem());
    wait_status(addr, "/readyz", 200);
    assert!(output.exists());
    assert_eq!(daemon.stop(), 0);
}

/// A bundle a SIGHUP adds is one that has not rendered once: /readyz is
/// 503 naming it until it has.
#[test]
fn readyz_waits_for_a_bundle_a_sighup_added() {
    let (dir, logs) = workdir();
    let good = dir.path().join("good");
    put(&good, "ca.pem", Ca::new("Good").pem());
    let late = dir.path().join("late");
    put(&late, "ca.pem", "not a certificate\n");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let bundle = |name: &str, src: &Path| {
        format!(
            "[[bundle]]\nname = \"{name}\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\n",
            s(src),
            s(&dir.path().join(format!("out/{name}.pem")))
        )
    };
    let daemon_section = format!("[daemon]\nlisten = \"{addr}\"\ndebounce = \"0s\"\n");
    let config = dir.path().join("anchorage.toml");
    fs::write(
        &config,
        format!("{daemon_section}{}", bundle("good", &good)),
    )
    .expect("config");
    let daemon = Daemon::start(&logs, &["--config", s(&config)]);
    wait_status(addr, "/readyz", 200);

    let both = format!(
        "{daemon_section}{}{}",
        bundle("good", &good),
        bundle("late", &late)
    );
    fs::write(&config, both).expect("config");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_status(addr, "/readyz", 503);
    let ready = get(addr, "/readyz").expect("readyz");
    assert!(ready.body.contains("late: refused"), "{}", ready.body);
    daemon.wait_log("directories=3", 1);

    put(&late, "ca.pem", Ca::new("Late").pem());
    wait_status(addr, "/readyz", 200);

    // One SIGHUP, one first read of the bundle it added: its refusal is
    // logged and counted once (the watch set for it is no second change).
    // Its render of the fixed source came after every earlier run of it.
    let scrape = scrape(addr, &logs).expect("scrape");
    let late_bundle = ("bundle", "late");
    assert_eq!(
        scrape.count(RENDERS, &[late_bundle, ("result", "refused")]),
        1.0,
        "{}",
        scrape.text
    );
    assert_eq!(
        scrape.count(
            "anchorage_refusals_total",
            &[late_bundle, ("reason", "not_certificate")]
        ),
        1.0,
        "{}",
        scrape.text
    );
    let log = daemon.log();
    let refusals = log
        .lines()
        .filter(|l| l.contains("bundle refused") && l.contains("bundle=late"))
        .count();
    assert_eq!(refusals, 1, "{log}");
    assert_eq!(daemon.stop(), 0);
}

#[test]
fn a_taken_listen_address_is_a_configuration_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = write(dir.path(), "ca.pem", Ca::new("Taken").pem());
    let output = dir.path().join("out/ca.pem");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut child = anchorage()
        .args(["run", "--source", s(&source), "--output", s(&output)])
        .args(["--listen", &addr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start anchorage");
    // It must exit by itself; a daemon that went on is killed, not waited for.
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("anchorage went on running with its --listen address taken");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Outcome::of(child.wait_with_output().expect("wait"));
    out.expect_code(2);
    assert!(
        out.stderr
            .contains(&format!("{addr}: address already in use")),
        "{}",
        out.stderr
    );
    assert!(!output.exists(), "rendered before binding");
}

/// One datagram received on the notify socket.
struct Note {
    at: Instant,
    message: String,
    /// Whether the output existed when it arrived.
    output_existed: bool,
}

/// A stand-in for systemd's notify socket, collecting what arrives.
struct NotifySocket {
    path: PathBuf,
    notes: Arc<Mutex<Vec<Note>>>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NotifySocket {
    fn bind(path: PathBuf, output: PathBuf) -> Self {
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let notes = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (notes, done) = (notes.clone(), done.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                while !done.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf) {
                        let note = Note {
                            at: Instant::now(),
                            message: String::from_utf8_lossy(&buf[..n]).into_owned(),
                            output_existed: output.exists(),
                        };
                        notes.lock().expect("notes").push(note);
                    }
                }
            })
        };
        Self {
            path,
            notes,
            done,
            thread: Some(thread),
        }
    }

    /// The messages holding `line` (a whole `KEY=VALUE` line).
    fn with_line(&self, line: &str) -> Vec<(Instant, String, bool)> {
        self.notes
            .lock()
            .expect("notes")
            .iter()
            .filter(|n| n.message.lines().any(|l| l == line))
            .map(|n| (n.at, n.message.clone(), n.output_existed))
            .collect()
    }

    fn statuses(&self) -> Vec<String> {
        self.notes
            .lock()
            .expect("notes")
            .iter()
            .flat_map(|n| n.message.lines().map(str::to_owned).collect::<Vec<_>>())
            .filter(|l| l.starts_with("STATUS="))
            .collect()
    }

    #[track_caller]
    fn wait_line(&self, line: &str, count: usize) -> Vec<(Instant, String, bool)> {
        eventually(Duration::from_secs(15), || {
            let seen = self.with_line(line);
            if seen.len() >= count {
                Ok(seen)
            } else {
                Err(format!("{line} seen {} times, want {count}", seen.len()))
            }
        })
    }

    fn setup(&self, command: &mut Command) {
        command
            .env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "400000")
            .env_remove("WATCHDOG_PID");
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn systemd_hears_ready_status_watchdog_and_stopping() {
    let (dir, logs) = workdir();
    let source = write(&dir.path().join("src"), "ca.pem", Ca::new("Notify").pem());
    let output = dir.path().join("out/ca.pem");
    let notify = NotifySocket::bind(logs.join("notify.sock"), output.clone());
    let daemon = Daemon::start_with(
        &logs,
        &["--source", s(&source), "--output", s(&output)],
        |c| notify.setup(c),
    );

    let ready = notify.wait_line("READY=1", 1);
    assert!(ready[0].2, "READY=1 came before the output existed");
    assert_eq!(notify.with_line("READY=1").len(), 1);
    assert!(
        notify
            .statuses()
            .iter()
            .any(|l| l == "STATUS=default: 1 certificates"),
        "{:?}",
        notify.statuses()
    );

    // WATCHDOG_USEC=400ms: a ping about every 200 ms.
    let pings = notify.wait_line("WATCHDOG=1", 8);
    let span = pings[7].0 - pings[0].0;
    assert!(
        span >= Duration::from_millis(700) && span <= Duration::from_secs(3),
        "7 watchdog periods took {span:?}"
    );

    assert_eq!(daemon.stop(), 0);
    let stopping = notify.wait_line("STOPPING=1", 1);
    let later = notify
        .with_line("WATCHDOG=1")
        .into_iter()
        .filter(|n| n.0 > stopping[0].0)
        .count();
    assert_eq!(later, 0, "a watchdog ping after STOPPING=1");
}

/// A bundle refused at start still completes the start: READY=1 comes
/// once it was tried, its STATUS says it was refused (a Type=notify unit
/// is not killed for a bad file at boot), and /readyz names it.
#[test]
fn systemd_hears_ready_when_a_bundle_is_refused_at_start() {
    let (dir, logs) = workdir();
    let source = write(&dir.path().join("src"), "ca.pem", "not a certificate\n");
    let output = dir.path().join("out/ca.pem");
    let notify = NotifySocket::bind(logs.join("notify.sock"), output.clone());
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let daemon = Daemon::start_with(
        &logs,
        &[
            "--source",
            s(&source),
            "--output",
            s(&output),
            "--listen",
            &addr.to_string(),
        ],
        |c| notify.setup(c),
    );
    let ready = notify.wait_line("READY=1", 1);
    assert!(!output.exists());
    assert!(
        ready[0].1.contains("STATUS=default: refused"),
        "{:?}",
        ready[0]
    );
    let answer = wait_status(addr, "/readyz", 503);
    assert!(answer.body.contains("default: refused"), "{}", answer.body);
    assert_eq!(daemon.stop(), 0);
}

/// Idle connections held open (and reopened when the server drops them,
/// as an attacker would) and clients sending a byte a second, while
/// probes and scrapes come: every one is answered.
struct Crowd {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<usize>>,
}

impl Crowd {
    const IDLE: usize = 300;
    const SLOW: usize = 5;
    /// However the test goes, the crowd leaves after this.
    const LIFETIME: Duration = Duration::from_secs(90);
    const MAX_RECONNECTS: usize = 50_000;

    /// Connects the crowd; returns once every idle client is connected.
    fn gather(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, gathered) = std::sync::mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || Self::run(addr, &stop, &ready))
        };
        gathered
            .recv_timeout(Duration::from_secs(60))
            .expect("the crowd could not connect");
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn connect(addr: SocketAddr) -> Option<TcpStream> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        stream.set_nonblocking(true).ok()?;
        Some(stream)
    }

    /// Whether the server closed `stream` (a nonblocking peek sees EOF or
    /// an error, not "nothing yet").
    fn closed(stream: &TcpStream) -> bool {
        let mut byte = [0u8; 1];
        !matches!(stream.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Returns how many times a client reconnected.
    fn run(addr: SocketAddr, stop: &AtomicBool, ready: &std::sync::mpsc::Sender<()>) -> usize {
        let started = Instant::now();
        let mut idle: Vec<Option<TcpStream>> =
            (0..Self::IDLE).map(|_| Self::connect(addr)).collect();
        let mut slow: Vec<Option<TcpStream>> =
            (0..Self::SLOW).map(|_| Self::connect(addr)).collect();
        let _ = ready.send(());
        let mut reconnects = 0;
        let mut last_byte = Instant::now() - Duration::from_secs(1);
        while !stop.load(Ordering::Relaxed)
            && started.elapsed() < Self::LIFETIME
            && reconnects < Self::MAX_RECONNECTS
        {
            for client in idle.iter_mut() {
                if client.as_ref().is_none_or(Self::closed) {
                    *client = Self::connect(addr);
                    reconnects += 1;
                }
            }
            if last_byte.elapsed() >= Duration::from_secs(1) {
                last_byte = Instant::now();
                for client in slow.iter_mut() {
                    // A request head that never ends, a byte a second.
                    let sent = client
                        .as_mut()
                        .is_some_and(|c| !Self::closed(c) && c.write_all(b"G").is_ok());
                    if !sent {
                        *client = Self::connect(addr);
                        reconnects += 1;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        reconnects
    }

    fn disperse(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("crowd thread")
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn idle_and_slow_clients_do_not_starve_health() {
    const ROUNDS: usize = 20;
    let (dir, logs) = workdir();
    let sources = dir.path().join("src");
    put(&sources, "ca.pem", Ca::new("Crowded").pem());
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let daemon = Daemon::start(
        &logs,
        &[
            "--source",
            s(&sources),
            "--output",
            s(&dir.path().join("out/ca.pem")),
            "--listen",
            &addr.to_string(),
        ],
    );
    wait_status(addr, "/readyz", 200);

    let crowd = Crowd::gather(addr);
    let mut slowest = Duration::ZERO;
    for round in 0..ROUNDS {
        for path in ["/healthz", "/readyz", "/metrics"] {
            let asked = Instant::now();
            // One attempt each, no retry: a dropped probe is a failed one.
            let answer = get(addr, path)
                .unwrap_or_else(|e| panic!("round {round}: {path} not answered: {e}"));
            assert_eq!(answer.status, 200, "round {round}: {path}: {}", answer.body);
            slowest = slowest.max(asked.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let reconnects = crowd.disperse();
    eprintln!(
        "{ROUNDS} rounds of probes beside {} idle and {} slow clients \
         ({reconnects} reconnects): slowest answer {slowest:?}",
        Crowd::IDLE,
        Crowd::SLOW
    );
    // Generous for a loaded machine; an answer is normally a millisecond.
    assert!(slowest < Duration::from_secs(3), "slowest {slowest:?}");
    assert_eq!(daemon.stop(), 0);
}
