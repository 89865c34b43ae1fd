//! `anchorage run`: the daemon's guarantees, against the real binary, a
//! kubelet-style volume and a real process that reloads on SIGHUP.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::daemon::{App, Daemon, eventually};
use crate::support::kubelet::Volume;
use crate::support::pki::{Ca, non_ca, sha256_hex};
use crate::support::{file_sha256, pem_certs, pems, s, write};

/// The bundle anchorage renders for these CAs: PEM blocks ordered by SHA-256.
fn expected_pem(cas: &[&Ca]) -> Vec<u8> {
    let mut sorted: Vec<&&Ca> = cas.iter().collect();
    sorted.sort_by_key(|c| c.sha256());
    let mut out = String::new();
    for ca in sorted {
        let der = ca.der();
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("ascii"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

#[track_caller]
fn wait_output(path: &Path, want: &[u8]) {
    eventually(Duration::from_secs(15), || match fs::read(path) {
        Ok(got) if got == want => Ok(()),
        Ok(got) => Err(format!("output has {} certificates", pem_certs(&got).len())),
        Err(e) => Err(e.to_string()),
    });
}

/// A daemon on a kubelet volume, reloading the stand-in app by pid file.
struct Setup {
    dir: tempfile::TempDir,
    volume: Volume,
    output: std::path::PathBuf,
    app: App,
}

impl Setup {
    fn new(initial: &[&Ca]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut volume = Volume::new(&dir.path().join("secret"));
        volume.write(&[("ca.crt", &pems(initial))]);
        let output = dir.path().join("out/ca.pem");
        let app = App::start(dir.path(), &output);
        Self {
            dir,
            volume,
            output,
            app,
        }
    }

    fn start(&self, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "--source",
            s(&self.volume.dir),
            "--output",
            s(&self.output),
            "--pid-file",
            s(&self.app.pid_file),
        ];
        args.extend_from_slice(extra);
        Daemon::start(self.dir.path(), &args)
    }
}

#[test]
fn renders_at_start_and_reloads_on_a_kubelet_swap() {
    let (a, b) = (Ca::new("Swap A"), Ca::new("Swap B"));
    let mut setup = Setup::new(&[&a]);
    let daemon = setup.start(&["--debounce", "0"]);
    wait_output(&setup.output, &expected_pem(&[&a]));
    assert_eq!(setup.app.wait_reloads(1), vec![file_sha256(&setup.output)]);

    setup.volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    wait_output(&setup.output, &expected_pem(&[&a, &b]));
    let reloads = setup.app.wait_reloads(2);
    // The app read the new bundle when it was signalled: no premature signal.
    assert_eq!(reloads[1], sha256_hex(&expected_pem(&[&a, &b])));
    assert_eq!(daemon.stop(), 0);
}

#[test]
fn identical_swap_touch_and_resync_send_no_reload() {
    let (a, b) = (Ca::new("Same A"), Ca::new("Same B"));
    let mut setup = Setup::new(&[&a]);
    let daemon = setup.start(&["--debounce", "0", "--resync", "1s"]);
    setup.app.wait_reloads(1);
    let renders = |d: &Daemon| d.log().matches("rendered").count();
    let before = renders(&daemon);

    // Same content, new generation; a touch; a resync: renders, no reload.
    setup.volume.write(&[("ca.crt", &pems(&[&a]))]);
    let real = setup.volume.dir.join("..data/ca.crt");
    fs::File::options()
        .append(true)
        .open(&real)
        .expect("open")
        .set_modified(std::time::SystemTime::now())
        .expect("touch");
    daemon.wait_log("outcome=\"unchanged\"", 2);
    eventually(Duration::from_secs(10), || {
        if renders(&daemon) >= before + 3 {
            Ok(())
        } else {
            Err("no resync render yet".into())
        }
    });
    assert_eq!(setup.app.reloads().len(), 1, "a reload without a change");

    // A real change after them: exactly one more reload, and it is the change.
    setup.volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    let reloads = setup.app.wait_reloads(2);
    assert_eq!(reloads.len(), 2);
    assert_eq!(reloads[1], sha256_hex(&expected_pem(&[&a, &b])));
}

#[test]
fn restart_with_the_same_output_sends_no_reload() {
    let a = Ca::new("Restart A");
    let setup = Setup::new(&[&a]);
    let first = setup.start(&["--debounce", "0"]);
    setup.app.wait_reloads(1);
    first.wait_log("outcome=\"changed\"", 1);
    assert_eq!(first.stop(), 0);
    let second = setup.start(&["--debounce", "0"]);
    second.wait_log("outcome=\"unchanged\"", 1);
    assert_eq!(setup.app.reloads().len(), 1);
}

/// An output whose mode alone changed while anchorage was down gets its
/// mode back, and no reload: its bytes did not change (guarantee 3).
#[test]
fn restart_with_only_the_mode_changed_sends_no_reload() {
    use std::os::unix::fs::PermissionsExt;
    let a = Ca::new("Mode A");
    let setup = Setup::new(&[&a]);
    let first = setup.start(&["--debounce", "0"]);
    setup.app.wait_reloads(1);
    assert_eq!(first.stop(), 0);
    fs::set_permissions(&setup.output, fs::Permissions::from_mode(0o600)).expect("chmod");
    let second = setup.start(&["--debounce", "0"]);
    second.wait_log("outcome=\"unchanged\"", 1);
    let mode = fs::metadata(&setup.output)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o644);
    assert_eq!(second.stop(), 0);
    assert_eq!(setup.app.reloads().len(), 1, "a reload for a mode");
}

/// `--source ca.pem`, a bare name in the working directory, is watched
/// there: a change is rendered at once, not at the next resync. So is
/// `sub/c.pem` while `sub` does not exist (its creation is seen from the
/// working directory), and after `sub` is removed and made again.
#[test]
fn a_bare_relative_source_is_watched() {
    let (a, b, c, d) = (
        Ca::new("Bare A"),
        Ca::new("Bare B"),
        Ca::new("Bare C"),
        Ca::new("Bare D"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "ca.pem", pems(&[&a]));
    let daemon = Daemon::start_with(
        dir.path(),
        &[
            "--source",
            "ca.pem",
            "--source",
            "sub/c.pem",
            "--output",
            "out.pem",
            "--debounce",
            "0",
        ],
        |command| {
            command.current_dir(dir.path());
        },
    );
    let output = dir.path().join("out.pem");
    wait_output(&output, &expected_pem(&[&a]));
    write(dir.path(), "ca.pem", pems(&[&a, &b]));
    wait_output(&output, &expected_pem(&[&a, &b]));

    let sub = dir.path().join("sub");
    fs::create_dir(&sub).expect("mkdir sub");
    write(&sub, "c.pem", pems(&[&c]));
    wait_output(&output, &expected_pem(&[&a, &b, &c]));
    fs::remove_dir_all(&sub).expect("rm sub");
    wait_output(&output, &expected_pem(&[&a, &b]));
    fs::create_dir(&sub).expect("mkdir sub again");
    write(&sub, "c.pem", pems(&[&d]));
    wait_output(&output, &expected_pem(&[&a, &b, &d]));
    assert_eq!(daemon.stop(), 0);
}

/// A restart's first render names what changed against what the output
/// held, not against nothing: the CA dropped while anchorage was down is
/// removed, the one kept is not added again.
#[test]
fn restart_names_what_the_output_lost_and_kept() {
    let (kept, dropped) = (Ca::new("Restart Kept"), Ca::new("Restart Dropped"));
    let mut setup = Setup::new(&[&kept, &dropped]);
    let first = setup.start(&["--debounce", "0"]);
    setup.app.wait_reloads(1);
    assert_eq!(first.stop(), 0);
    setup.volume.write(&[("ca.crt", &pems(&[&kept]))]);
    let second = setup.start(&["--debounce", "0"]);
    second.wait_log("outcome=\"changed\"", 1);
    let log = second.log();
    let line = log
        .lines()
        .find(|l| l.contains("outcome=\"changed\""))
        .expect("the render's line");
    assert!(
        line.contains("added=[]") && line.contains("removed=[\"CN=Restart Dropped,"),
        "{line}"
    );
    assert_eq!(second.stop(), 0);
}

#[test]
fn a_thousand_rapid_swaps_end_in_the_final_state_and_never_tear() {
    let pool: Vec<Ca> = (0..6).map(|i| Ca::new(&format!("Rapid {i}"))).collect();
    let mut setup = Setup::new(&[&pool[0]]);
    let daemon = setup.start(&["--debounce", "0"]);
    setup.app.wait_reloads(1);

    let valid: Vec<Vec<u8>> = pool.iter().map(Ca::der).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (stop, reads, output) = (stop.clone(), reads.clone(), setup.output.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let bytes = fs::read(&output).expect("the output never disappears");
                let certs = pem_certs(&bytes);
                assert!(!certs.is_empty(), "an empty bundle was visible");
                for der in &certs {
                    assert!(
                        valid.contains(der),
                        "a torn or foreign certificate was visible"
                    );
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut last = vec![];
    for i in 0..1000usize {
        // Rotating subsets of the pool, so consecutive sets differ.
        last = (0..pool.len())
            .filter(|j| (i >> j) & 1 == 1 || *j == i % pool.len())
            .collect();
        let cas: Vec<&Ca> = last.iter().map(|j| &pool[*j]).collect();
        setup.volume.write(&[("ca.crt", &pems(&cas))]);
    }
    let final_cas: Vec<&Ca> = last.iter().map(|j| &pool[*j]).collect();
    wait_output(&setup.output, &expected_pem(&final_cas));
    // The last reload shows the final state.
    let want = sha256_hex(&expected_pem(&final_cas));
    eventually(Duration::from_secs(15), || {
        let reloads = setup.app.reloads();
        if reloads.last() == Some(&want) {
            Ok(())
        } else {
            Err(format!("{} reloads, last is not final", reloads.len()))
        }
    });
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader saw a torn output");
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert!(setup.app.reloads().len() <= 1001);
    drop(daemon);
}

#[test]
fn bad_inputs_keep_the_output_and_send_nothing_then_recover() {
    let (a, b) = (Ca::new("Good A"), Ca::new("Good B"));
    let mut setup = Setup::new(&[&a]);
    let daemon = setup.start(&["--debounce", "0"]);
    wait_output(&setup.output, &expected_pem(&[&a]));
    setup.app.wait_reloads(1);
    let good = fs::read(&setup.output).expect("output");

    let pem = a.pem();
    let classes: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", pem.as_bytes()[..pem.len() / 2].to_vec()),
        ("bad base64", pem.replacen("MII", "M!I", 1).into_bytes()),
        (
            "junk",
            b"-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n".to_vec(),
        ),
        (
            "random",
            (0..999u32).map(|i| (i * 7919 % 251) as u8 + 1).collect(),
        ),
        ("empty", Vec::new()),
        (
            "key only",
            b"-----BEGIN PRIVATE KEY-----\nMC4CAQA=\n-----END PRIVATE KEY-----\n".to_vec(),
        ),
        ("non-CA only", non_ca("Leaf Only").into_bytes()),
        (
            "expired only",
            Ca::expired("Expired Only").pem().into_bytes(),
        ),
    ];
    for (n, (class, bytes)) in classes.iter().enumerate() {
        setup.volume.write(&[("ca.crt", bytes)]);
        daemon.wait_log("bundle refused", n + 1);
        assert_eq!(
            fs::read(&setup.output).expect("output"),
            good,
            "{class}: output changed"
        );
        assert_eq!(setup.app.reloads().len(), 1, "{class}: a reload was sent");
    }
    assert!(
        daemon.log().contains("ca.crt"),
        "refusals do not name the file"
    );

    setup.volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    wait_output(&setup.output, &expected_pem(&[&a, &b]));
    assert_eq!(setup.app.wait_reloads(2).len(), 2);
}

#[test]
fn an_expiring_ca_leaves_without_a_file_event() {
    let now = time::OffsetDateTime::now_utc();
    let lasting = Ca::new("Lasting");
    let expiring = Ca::valid(
        "Expiring",
        now - time::Duration::days(1),
        now + time::Duration::seconds(3),
    );
    let setup = Setup::new(&[&lasting, &expiring]);
    let daemon = setup.start(&["--debounce", "0", "--resync", "0"]);
    wait_output(&setup.output, &expected_pem(&[&lasting, &expiring]));
    setup.app.wait_reloads(1);
    // No file changes: the expiry alone re-renders and reloads.
    wait_output(&setup.output, &expected_pem(&[&lasting]));
    let reloads = setup.app.wait_reloads(2);
    assert_eq!(reloads[1], sha256_hex(&expected_pem(&[&lasting])));
    assert!(daemon.log().contains("dropped an expired certificate"));
}

/// A reload endpoint that fails its first `failures` calls.
fn flaky_endpoint(failures: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/-/reload", listener.local_addr().expect("addr"));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let status = if n < failures {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, calls)
}

#[test]
fn a_failing_http_reload_is_retried_while_a_later_change_still_renders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (Ca::new("Http A"), Ca::new("Http B"), Ca::new("Http C"));
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&a]))]);
    let output = dir.path().join("ca.pem");
    let (url, calls) = flaky_endpoint(3);
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&volume.dir),
            "--output",
            s(&output),
            "--http",
            &url,
            "--debounce",
            "0",
        ],
    );
    daemon.wait_log("will retry", 1);
    volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    wait_output(&output, &expected_pem(&[&a, &b]));
    volume.write(&[("ca.crt", &pems(&[&a, &b, &c]))]);
    wait_output(&output, &expected_pem(&[&a, &b, &c]));
    daemon.wait_log("outcome=\"success\"", 1);
    assert!(calls.load(Ordering::SeqCst) >= 4);
}

#[test]
fn pid_file_naming_a_dead_pid_is_retried_until_the_app_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _dump = crate::support::DumpLogsOnFailure(dir.path().to_path_buf());
    let a = Ca::new("Dead A");
    let src = write(&dir.path().join("src"), "ca.pem", a.pem());
    let output = dir.path().join("ca.pem");
    // A pid that existed and is gone.
    let mut gone = std::process::Command::new("true").spawn().expect("spawn");
    gone.wait().expect("wait");
    let pid_file = write(dir.path(), "app.pid", gone.id().to_string());
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&output),
            "--pid-file",
            s(&pid_file),
            "--debounce",
            "0",
        ],
    );
    // At start a missing target is skipped: the app will read the output when it starts.
    daemon.wait_log("does not exist yet", 1);
    // Later, a change while the target is missing is an error, retried.
    write(&dir.path().join("src"), "b.pem", Ca::new("Dead B").pem());
    daemon.wait_log("will retry", 1);
    let app = App::start(dir.path(), &output);
    fs::write(&pid_file, app.pid().to_string()).expect("write pid");
    let reloads = app.wait_reloads(1);
    assert_eq!(reloads[0], file_sha256(&output));
}

/// The reload command's own word for "the app is not there yet": exit 75
/// (EX_TEMPFAIL). At start it is a missing target, skipped and not counted
/// (a sidecar started before its app costs no needless restart); later it
/// is a failure, counted and retried until the app is back.
#[test]
fn exec_exiting_75_is_skipped_at_start_and_retried_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(
        &dir.path().join("src"),
        "a.pem",
        Ca::new("Tempfail A").pem(),
    );
    let output = dir.path().join("ca.pem");
    let down = write(dir.path(), "app-down", "");
    let calls = dir.path().join("calls");
    let script = write(
        dir.path(),
        "reload.sh",
        format!(
            "echo call >> {calls}\nif [ -e {down} ]; then echo 'app is not up' >&2; exit 75; fi\n",
            calls = s(&calls),
            down = s(&down)
        ),
    );
    let port = crate::support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&output),
            "--exec",
            &format!("sh {}", s(&script)),
            "--debounce",
            "0",
            "--listen",
            &listen,
        ],
    );
    daemon.wait_log("does not exist yet; skipped", 1);
    let log = daemon.log();
    assert!(
        log.contains("EX_TEMPFAIL") && log.contains("app is not up"),
        "{log}"
    );
    assert!(
        !log.contains("will retry"),
        "a skipped target was retried:\n{log}"
    );
    let failures = |text: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with("anchorage_reloads_total") && l.contains("result=\"failure\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!(failures(&scrape(&listen)), 0, "the skip was counted");

    // Later the app is expected: the same answer is a failure, retried.
    write(
        &dir.path().join("src"),
        "b.pem",
        Ca::new("Tempfail B").pem(),
    );
    daemon.wait_log("will retry", 1);
    eventually(Duration::from_secs(10), || {
        let text = scrape(&listen);
        (failures(&text) >= 1)
            .then_some(())
            .ok_or_else(|| format!("no failure counted:\n{text}"))
    });
    fs::remove_file(&down).expect("app up");
    daemon.wait_log("outcome=\"success\"", 1);
    let calls = fs::read_to_string(&calls).expect("calls").lines().count();
    assert!(calls >= 3, "{calls} calls");
}

/// The body of `GET /metrics` from a listener that is up.
fn scrape(listen: &str) -> String {
    eventually(Duration::from_secs(10), || {
        let mut stream = std::net::TcpStream::connect(listen).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        write!(stream, "GET /metrics HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .map_err(|e| e.to_string())?;
        Ok(text)
    })
}

#[test]
fn pid_file_naming_a_recycled_pid_never_signals_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(
        &dir.path().join("src"),
        "ca.pem",
        Ca::new("Recycled A").pem(),
    );
    let output = dir.path().join("ca.pem");
    // A process younger than the pid file: the file's writer is gone.
    let victim = App::start(dir.path(), &output);
    let pid_file = write(dir.path(), "stale.pid", victim.pid().to_string());
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&pid_file)
        .expect("open")
        .set_modified(hour_ago)
        .expect("mtime");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&output),
            "--pid-file",
            s(&pid_file),
            "--debounce",
            "0",
        ],
    );
    // At start the app the file names is not there: skipped, as a dead
    // pid is; after a change it is a failure, retried.
    daemon.wait_log("recycled pid", 1);
    let log = daemon.log();
    let start = log
        .lines()
        .find(|l| l.contains("recycled pid"))
        .expect("line");
    assert!(start.contains("does not exist yet; skipped"), "{start}");
    write(
        &dir.path().join("src"),
        "b.pem",
        Ca::new("Recycled B").pem(),
    );
    daemon.wait_log("recycled pid", 2);
    assert!(victim.reloads().is_empty(), "a recycled pid was signalled");
}

#[test]
fn burst_gives_one_render_and_one_reload() {
    let pool: Vec<Ca> = (0..4).map(|i| Ca::new(&format!("Burst {i}"))).collect();
    let mut setup = Setup::new(&[&pool[0]]);
    let daemon = setup.start(&["--debounce", "500ms"]);
    setup.app.wait_reloads(1);
    for n in 1..=pool.len() {
        let cas: Vec<&Ca> = pool[..n].iter().collect();
        setup.volume.write(&[("ca.crt", &pems(&cas))]);
    }
    let all: Vec<&Ca> = pool.iter().collect();
    wait_output(&setup.output, &expected_pem(&all));
    let reloads = setup.app.wait_reloads(2);
    assert_eq!(reloads.len(), 2, "a burst gave more than one reload");
    assert_eq!(daemon.log().matches("outcome=\"changed\"").count(), 2);
}

#[test]
fn endless_churn_still_renders_at_debounce_max() {
    let pool: Vec<Ca> = (0..2).map(|i| Ca::new(&format!("Churn {i}"))).collect();
    let mut setup = Setup::new(&[&pool[0]]);
    let daemon = setup.start(&["--debounce", "300ms", "--debounce-max", "1s"]);
    setup.app.wait_reloads(1);
    // A change every 100 ms, never a 300 ms pause: the debounce alone would
    // never fire; debounce_max must force renders while the churn goes on.
    let start = std::time::Instant::now();
    let mut i = 0;
    while daemon.log().matches("rendered").count() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no render under churn: {}",
            daemon.log()
        );
        i += 1;
        let cas: Vec<&Ca> = pool.iter().take(1 + i % 2).collect();
        setup.volume.write(&[("ca.crt", &pems(&cas))]);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn directory_recreated_glob_match_and_editor_rename_are_seen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c, d) = (
        Ca::new("Dir A"),
        Ca::new("Glob B"),
        Ca::new("Edit C"),
        Ca::new("Edit D"),
    );
    let certs = dir.path().join("certs");
    write(&certs, "a.pem", a.pem());
    let extra = dir.path().join("extra");
    fs::create_dir(&extra).expect("mkdir");
    let output = dir.path().join("ca.pem");
    let glob = format!("{}/*.pem", s(&extra));
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&certs),
            "--source",
            &glob,
            "--output",
            s(&output),
            "--debounce",
            "0",
            "--resync",
            "0",
        ],
    );
    wait_output(&output, &expected_pem(&[&a]));

    // A glob that starts matching a new file.
    write(&extra, "b.pem", b.pem());
    wait_output(&output, &expected_pem(&[&a, &b]));

    // The source directory deleted and created again with new content.
    fs::remove_dir_all(&certs).expect("rm");
    wait_output(&output, &expected_pem(&[&b]));
    write(&certs, "c.pem", c.pem());
    wait_output(&output, &expected_pem(&[&b, &c]));

    // An editor's write to a temporary name and rename over the file.
    let tmp = write(&certs, ".c.pem.swp", d.pem());
    fs::rename(&tmp, certs.join("c.pem")).expect("rename");
    wait_output(&output, &expected_pem(&[&b, &d]));

    // An in-place rewrite.
    fs::write(certs.join("c.pem"), c.pem()).expect("rewrite");
    wait_output(&output, &expected_pem(&[&b, &c]));
    assert_eq!(daemon.stop(), 0);
}

/// Hundreds of bundles ready at once run a few at a time: each run in
/// flight is a thread, and hundreds of threads cost memory and time for
/// work the cores do one after the other anyway.
#[test]
fn hundreds_of_bundles_render_on_a_few_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Ca::new("Many A");
    let src = write(&dir.path().join("src"), "a.pem", a.pem());
    let out = dir.path().join("out");
    let mut toml = String::from("[daemon]\ndebounce = \"0s\"\n");
    for i in 0..300 {
        toml.push_str(&format!(
            "[[bundle]]\nname = \"b{i}\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}/b{i}.pem\"\n",
            s(&src),
            s(&out)
        ));
    }
    let config = write(dir.path(), "anchorage.toml", toml);
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    eventually(Duration::from_secs(30), || {
        let written = fs::read_dir(&out).map(|d| d.count()).unwrap_or(0);
        if written == 300 {
            Ok(())
        } else {
            Err(format!("{written} of 300 outputs written"))
        }
    });
    // The blocking pool keeps its threads for seconds after their last
    // run: the count now is the most that ran at once.
    let status = fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("status");
    let threads: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads:");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(
        threads <= 2 * cores.max(2) + 6,
        "{threads} threads for 300 bundles on {cores} cores"
    );
}

#[test]
fn sighup_rereads_the_config_and_keeps_it_when_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Ca::new("Hup A");
    let src = write(&dir.path().join("src"), "a.pem", a.pem());
    let (one, two) = (dir.path().join("one.pem"), dir.path().join("two.pem"));
    let config_for = |outputs: &[&Path]| {
        let mut toml = format!(
            "[[bundle]]\nname = \"b\"\nsources = [\"{}\"]\n",
            s(src.parent().expect("dir"))
        );
        for o in outputs {
            toml.push_str(&format!("[[bundle.output]]\npath = \"{}\"\n", s(o)));
        }
        toml
    };
    let config = write(dir.path(), "anchorage.toml", config_for(&[&one]));
    let daemon = Daemon::start(dir.path(), &["--config", s(&config), "--debounce", "0"]);
    wait_output(&one, &expected_pem(&[&a]));

    fs::write(&config, "[[bundle]]\nname = \"b\"\nsauce = 1\n").expect("write");
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("keeping the running one", 1);
    assert!(
        daemon.log().contains("anchorage.toml:3"),
        "{}",
        daemon.log()
    );

    fs::write(&config, config_for(&[&one, &two])).expect("write");
    daemon.signal(Signal::SIGHUP);
    wait_output(&two, &expected_pem(&[&a]));
    assert!(!daemon.log().contains("keeps its own"), "{}", daemon.log());

    // log_format is taken: from the re-read on, every line is JSON.
    let three = dir.path().join("three.pem");
    let json = format!(
        "[daemon]\nlog_format = \"json\"\n{}",
        config_for(&[&one, &two, &three])
    );
    fs::write(&config, json).expect("write");
    daemon.signal(Signal::SIGHUP);
    wait_output(&three, &expected_pem(&[&a]));
    daemon.wait_log("\"message\":\"SIGHUP: configuration re-read\"", 1);
    let log = daemon.log();
    assert!(!log.contains("daemon.log_format"), "{log}");
    let from = log.find("{\"timestamp\"").expect("a JSON line");
    for line in log[from..].lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
    }

    // A [daemon] setting the running daemon keeps: taken with a warning
    // that names it, the rest of the file applied.
    let four = dir.path().join("four.pem");
    let state = format!(
        "[daemon]\nlog_format = \"json\"\nstate_dir = \"{}\"\n{}",
        s(&dir.path().join("state")),
        config_for(&[&one, &two, &three, &four])
    );
    fs::write(&config, state).expect("write");
    daemon.signal(Signal::SIGHUP);
    wait_output(&four, &expected_pem(&[&a]));
    daemon.wait_log("keeps its own until it restarts", 1);
    assert!(
        daemon.log().contains("daemon.state_dir"),
        "{}",
        daemon.log()
    );
    assert_eq!(daemon.stop(), 0);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(&dir.path().join("src"), "a.pem", Ca::new("Json").pem());
    let output = dir.path().join("ca.pem");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(src.parent().expect("dir")),
            "--output",
            s(&output),
            "--log-format",
            "json",
        ],
    );
    daemon.wait_log("rendered", 1);
    for line in daemon.log().lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert!(value.get("level").is_some());
    }
}

#[test]
fn poll_mode_sees_changes_without_inotify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Poll A"), Ca::new("Poll B"));
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&a]))]);
    let output = dir.path().join("ca.pem");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&volume.dir),
            "--output",
            s(&output),
            "--poll",
            "200ms",
        ],
    );
    wait_output(&output, &expected_pem(&[&a]));
    assert!(
        !daemon.log().contains("watching"),
        "inotify was used in poll mode"
    );
    volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    wait_output(&output, &expected_pem(&[&a, &b]));
}

/// Only the source's own entry counts in its parent directory: the app's
/// log or pid file next to the Secret mount triggers nothing.
#[test]
fn writes_beside_a_source_directory_do_not_render() {
    let (a, b) = (Ca::new("Beside A"), Ca::new("Beside B"));
    let mut setup = Setup::new(&[&a]);
    let daemon = setup.start(&["--debounce", "0"]);
    setup.app.wait_reloads(1);
    daemon.wait_log("rendered", 1);
    let beside = setup.volume.dir.parent().expect("parent").join("app.log");
    for i in 0..20 {
        fs::write(&beside, format!("line {i}\n")).expect("write beside");
    }
    setup.volume.write(&[("ca.crt", &pems(&[&a, &b]))]);
    setup.app.wait_reloads(2);
    let renders = daemon.log().matches("rendered").count();
    assert!(
        renders <= 4,
        "{renders} renders: writes beside the source triggered renders"
    );
}

/// kubelet's swap is one rename that counts: its new generation, the
/// `..data_tmp` link and the removal of the old generation are entries
/// that are never read, so they start no run, even seen one by one.
#[test]
fn a_kubelet_swap_seen_step_by_step_starts_one_run() {
    let (a, b, c) = (Ca::new("Step A"), Ca::new("Step B"), Ca::new("Step C"));
    let mut setup = Setup::new(&[&a]);
    let extra = setup.dir.path().join("extra");
    fs::create_dir(&extra).expect("mkdir");
    let daemon = setup.start(&["--source", s(&extra), "--debounce", "0"]);
    setup.app.wait_reloads(1);
    let runs = || daemon.log().matches("run started").count();
    let before = runs();
    setup
        .volume
        .write_pausing(&[("ca.crt", &pems(&[&a, &b]))], Duration::from_millis(40));
    // The decisive event after the swap's last step: one rename into a
    // plain source directory, one more run.
    let staged = write(setup.dir.path(), "c.pem", c.pem());
    fs::rename(&staged, extra.join("c.pem")).expect("rename");
    wait_output(&setup.output, &expected_pem(&[&a, &b, &c]));
    let started = runs() - before;
    assert!(
        (1..=2).contains(&started),
        "{started} runs for one swap and one rename:\n{}",
        daemon.log()
    );
}

/// A glob with a wildcard in a directory: a directory created later is
/// watched too, so a rewrite in place inside it is seen.
#[test]
fn a_glob_over_directories_sees_new_directories_and_rewrites_in_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (Ca::new("Tree A"), Ca::new("Tree B"), Ca::new("Tree C"));
    let tree = dir.path().join("tree");
    write(&tree.join("one"), "ca.pem", a.pem());
    let output = dir.path().join("ca.pem");
    let glob = format!("{}/*/ca.pem", s(&tree));
    let daemon = Daemon::start(
        dir.path(),
        &["--source", &glob, "--output", s(&output), "--debounce", "0"],
    );
    wait_output(&output, &expected_pem(&[&a]));
    fs::create_dir(tree.join("two")).expect("mkdir");
    write(&tree.join("two"), "ca.pem", b.pem());
    wait_output(&output, &expected_pem(&[&a, &b]));
    // In place: the only events are inside the new directory.
    fs::write(tree.join("two/ca.pem"), c.pem()).expect("rewrite");
    wait_output(&output, &expected_pem(&[&a, &c]));
    assert_eq!(daemon.stop(), 0);
}

/// A file replaced by a directory is unreadable, not absent: the bundle is
/// refused even though another source still holds a CA.
#[test]
fn a_directory_where_a_file_was_refuses_the_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("File A"), Ca::new("File B"));
    let src = dir.path().join("src");
    write(&src, "a.pem", a.pem());
    let b_file = write(&src, "b.pem", b.pem());
    let output = dir.path().join("out/ca.pem");
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).expect("mkdir");
    // One debounced burst: the removal and the mkdir are seen together.
    let daemon = Daemon::start(
        &logs,
        &[
            "--source",
            s(&src),
            "--output",
            s(&output),
            "--debounce",
            "500ms",
        ],
    );
    wait_output(&output, &expected_pem(&[&a, &b]));
    fs::remove_file(&b_file).expect("rm");
    fs::create_dir(&b_file).expect("mkdir");
    daemon.wait_log("a directory where a file was", 1);
    assert_eq!(fs::read(&output).expect("output"), expected_pem(&[&a, &b]));
}

/// A source that is one file of a kubelet volume (its visible symlink) sees
/// the swap, although kubelet never touches that link.
#[test]
fn a_file_inside_a_kubelet_volume_sees_the_swap() {
    let (a, b) = (Ca::new("Visible A"), Ca::new("Visible B"));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[
        ("ca.crt", &pems(&[&a])),
        (
            "tls.key",
            b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        ),
    ]);
    let output = dir.path().join("out/ca.pem");
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).expect("mkdir");
    let visible = volume.dir.join("ca.crt");
    let _daemon = Daemon::start(
        &logs,
        &[
            "--source",
            s(&visible),
            "--output",
            s(&output),
            "--debounce",
            "0",
            "--resync",
            "0",
        ],
    );
    wait_output(&output, &expected_pem(&[&a]));
    volume.write(&[
        ("ca.crt", &pems(&[&a, &b])),
        (
            "tls.key",
            b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        ),
    ]);
    wait_output(&output, &expected_pem(&[&a, &b]));
}

/// Many bundles at start are rendered by a few threads taking from one
/// queue, not by a thread each: the daemon's threads stay within the loop,
/// its timer, the runs at once (2 x cores, at least 4) and the watch
/// refresh's thread, and every bundle is rendered. (Handing each run to the
/// pool on its own left 8 to 17 threads here on 2 cores.)
#[test]
fn many_bundles_start_on_a_few_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = Ca::new("Many").pem();
    let n = 1000;
    let mut config = String::from("[daemon]\ndebounce = \"0s\"\n");
    for i in 0..n {
        let source = write(dir.path(), &format!("s{i}.pem"), &pem);
        config.push_str(&format!(
            "[[bundle]]\nname = \"b{i}\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\n",
            s(&source),
            s(&dir.path().join(format!("out{i}.pem")))
        ));
    }
    let config = write(dir.path(), "anchorage.toml", config);
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    daemon.wait_log("anchorage::render: rendered", n);
    // Idle threads of the pool linger for seconds: what ran the start is
    // still there to count.
    let threads = fs::read_dir(format!("/proc/{}/task", daemon.pid()))
        .expect("the daemon's threads")
        .count();
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let most = 1 + 1 + (2 * cores).max(4) + 1;
    assert!(
        threads <= most,
        "{threads} threads after starting {n} bundles, want at most {most}"
    );
    for i in 0..n {
        assert_eq!(
            fs::read(dir.path().join(format!("out{i}.pem"))).expect("output"),
            pem.as_bytes(),
            "bundle b{i}"
        );
    }
    daemon.stop();
}

/// Guarantee 4: bundles that changed in the same cycle and name the same
/// reload action run it once, for all of them. Two bundles read one kubelet
/// volume and signal one app: their renders end on two threads, one a
/// moment after the other, and the app still gets one SIGHUP per change,
/// which names both bundles.
#[test]
fn bundles_changed_together_share_one_reload() {
    let (a, b) = (Ca::new("Shared A"), Ca::new("Shared B"));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut volume = Volume::new(&dir.path().join("secret"));
    volume.write(&[("ca.crt", &pems(&[&a]))]);
    let out = dir.path().join("out");
    let app = App::start(dir.path(), &out.join("one.pem"));
    let mut toml = String::from("[daemon]\ndebounce = \"0s\"\n");
    for name in ["one", "two"] {
        toml.push_str(&format!(
            "[[bundle]]\nname = \"{name}\"\nsources = [\"{}\"]\n\
             [[bundle.output]]\npath = \"{}/{name}.pem\"\n\
             [[bundle.reload]]\nsignal = \"HUP\"\npid_file = \"{}\"\n",
            s(&volume.dir),
            s(&out),
            s(&app.pid_file)
        ));
    }
    let config = write(dir.path(), "anchorage.toml", toml);
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    // At start too: one reload for both.
    daemon.wait_log("reloaded", 1);
    assert_eq!(app.wait_reloads(1).len(), 1);
    for change in 1..=5 {
        let cas: Vec<&Ca> = if change % 2 == 1 {
            vec![&a, &b]
        } else {
            vec![&a]
        };
        volume.write(&[("ca.crt", &pems(&cas))]);
        daemon.wait_log("reloaded", change + 1);
        let log = daemon.log();
        let reloaded: Vec<&str> = log.lines().filter(|l| l.contains("reloaded")).collect();
        assert!(
            reloaded.iter().all(|l| l.contains(r#"["one", "two"]"#)),
            "change {change}: a reload for one bundle only:\n{log}"
        );
        assert_eq!(app.wait_reloads(change + 1).len(), change + 1);
        for name in ["one", "two"] {
            wait_output(&out.join(format!("{name}.pem")), &expected_pem(&cas));
        }
    }
    assert_eq!(daemon.stop(), 0);
    assert_eq!(app.reloads().len(), 6, "one SIGHUP per change");
}

/// Guarantee 4, a bundle and a key pair: cert-manager rotates a Secret's
/// `ca.crt` with its `tls.crt` and `tls.key`; the bundle that reads the CA
/// and the key pair that reads the pair signal one app, which gets one
/// SIGHUP for both.
#[test]
fn a_bundle_and_a_key_pair_changed_together_share_one_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut volume = Volume::new(&dir.path().join("secret"));
    let secret = |ca: &Ca| {
        let leaf = ca.leaf("app.example");
        (
            ca.pem().into_bytes(),
            leaf.cert.pem().into_bytes(),
            leaf.key.serialize_pem().into_bytes(),
        )
    };
    let write = |volume: &mut Volume, ca: &Ca| {
        let (ca, crt, key) = secret(ca);
        volume.write(&[("ca.crt", &ca), ("tls.crt", &crt), ("tls.key", &key)]);
    };
    write(&mut volume, &Ca::new("Rotated 0"));
    let output = dir.path().join("ca.pem");
    let app = App::start(dir.path(), &output);
    let toml = format!(
        "[daemon]\ndebounce = \"0s\"\n\
         [[bundle]]\nname = \"ca\"\nsources = [\"{secret}/ca.crt\"]\n\
         [[bundle.output]]\npath = \"{output}\"\n\
         [[bundle.reload]]\nsignal = \"HUP\"\npid_file = \"{pid}\"\n\
         [[keypair]]\nname = \"server\"\ncert = \"{secret}/tls.crt\"\nkey = \"{secret}/tls.key\"\n\
         [[keypair.reload]]\nsignal = \"HUP\"\npid_file = \"{pid}\"\n",
        secret = s(&volume.dir),
        output = s(&output),
        pid = s(&app.pid_file),
    );
    let config = crate::support::write(dir.path(), "anchorage.toml", toml);
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    daemon.wait_log("reloaded", 1);
    let started = app.wait_reloads(1).len();
    for change in 1..=3 {
        write(&mut volume, &Ca::new(&format!("Rotated {change}")));
        daemon.wait_log("reloaded", change + 1);
        let log = daemon.log();
        // The first, at start, is the bundle's alone: a key pair loaded at
        // start owes no reload.
        assert!(
            log.lines()
                .filter(|l| l.contains("reloaded"))
                .skip(1)
                .all(|l| l.contains(r#"["ca", "server"]"#)),
            "change {change}: not one reload for both:\n{log}"
        );
        assert_eq!(app.wait_reloads(started + change).len(), started + change);
    }
    assert_eq!(daemon.stop(), 0);
    assert_eq!(
        app.reloads().len(),
        started + 3,
        "one SIGHUP per rotation:\n{:?}",
        app.lines()
    );
}

/// A file source replaced again and again refreshes the watches each time
/// (its entry is watched by name): the count of directories watched is
/// said at INFO once, and again only when it moves.
#[test]
fn watches_refreshed_without_change_are_not_news() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cas: Vec<Ca> = (0..4).map(|i| Ca::new(&format!("Refresh {i}"))).collect();
    let source = write(&dir.path().join("src"), "ca.pem", cas[0].pem());
    let output = dir.path().join("ca.pem");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&source),
            "--output",
            s(&output),
            "--debounce",
            "0",
        ],
    );
    wait_output(&output, &expected_pem(&[&cas[0]]));
    for (i, ca) in cas.iter().enumerate().skip(1) {
        // Replaced by a rename, as editors and `install` do.
        let next = write(&dir.path().join("src"), ".next", ca.pem());
        fs::rename(&next, &source).expect("rename");
        wait_output(&output, &expected_pem(&[ca]));
        daemon.wait_log("DEBUG anchorage::daemon: watching", i);
    }
    let log = daemon.log();
    assert_eq!(
        log.matches("INFO anchorage::daemon: watching").count(),
        1,
        "{log}"
    );
    assert_eq!(daemon.stop(), 0);
}

/// The start is one cycle (guarantee 4): hundreds of bundles that share a
/// reload action come back in batches, and the app is still reloaded once,
/// for all of them, not once per batch.
#[test]
fn hundreds_of_bundles_sharing_an_action_reload_once_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n = 200;
    let pem = Ca::new("Start once").pem();
    let out = dir.path().join("out");
    let app = App::start(dir.path(), &out.join("b0.pem"));
    let mut toml = String::from("[daemon]\ndebounce = \"0s\"\n");
    for i in 0..n {
        let source = write(&dir.path().join("src"), &format!("s{i}.pem"), &pem);
        toml.push_str(&format!(
            "[[bundle]]\nname = \"b{i}\"\nsources = [\"{}\"]\n\
             [[bundle.output]]\npath = \"{}/b{i}.pem\"\n\
             [[bundle.reload]]\nsignal = \"HUP\"\npid_file = \"{}\"\n",
            s(&source),
            s(&out),
            s(&app.pid_file)
        ));
    }
    let config = write(dir.path(), "anchorage.toml", toml);
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    daemon.wait_log("reloaded", 1);
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("reloaded"))
        .expect("a reload line");
    let named = (0..n)
        .filter(|i| line.contains(&format!("\"b{i}\"")))
        .count();
    assert_eq!(
        named, n,
        "the first reload names {named} of {n} bundles:\n{line}"
    );
    assert_eq!(app.wait_reloads(1).len(), 1);
    assert_eq!(daemon.stop(), 0);
    assert_eq!(app.reloads().len(), 1, "{:?}", app.lines());
}

/// A source file that is a symlink into another directory (`/etc/ssl/certs`
/// into `/usr/share/ca-certificates`, an agent writing elsewhere) changes
/// with no event in the source's directory: the target's directory is
/// watched too, for a directory source and for a file source, with no
/// resync to fall back on.
#[test]
fn a_symlink_out_of_the_source_directory_is_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cas: Vec<Ca> = (0..4).map(|i| Ca::new(&format!("Linked {i}"))).collect();
    let ext = dir.path().join("ext");
    let target = write(&ext, "x.pem", cas[0].pem());
    let src = dir.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    std::os::unix::fs::symlink(&target, src.join("x.pem")).expect("symlink");
    let (by_dir, by_file) = (dir.path().join("dir.pem"), dir.path().join("file.pem"));
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            "[daemon]\ndebounce = \"0s\"\nresync = \"0s\"\n\
             [[bundle]]\nname = \"dir\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\n\
             [[bundle]]\nname = \"file\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\n",
            s(&src),
            s(&by_dir),
            s(&src.join("x.pem")),
            s(&by_file)
        ),
    );
    let daemon = Daemon::start(dir.path(), &["--config", s(&config)]);
    let both = |ca: &Ca| {
        for output in [&by_dir, &by_file] {
            wait_output(output, &expected_pem(&[ca]));
        }
    };
    both(&cas[0]);
    // Replaced by a rename in its own directory, as an agent writes it.
    let next = write(&ext, ".x.pem.new", cas[1].pem());
    fs::rename(&next, &target).expect("rename");
    both(&cas[1]);
    // Rewritten in place.
    fs::write(&target, cas[2].pem()).expect("rewrite");
    both(&cas[2]);
    // The link itself moved to another file elsewhere: that one is followed.
    let other = write(&dir.path().join("elsewhere"), "y.pem", cas[3].pem());
    let link = src.join(".x.link");
    std::os::unix::fs::symlink(&other, &link).expect("symlink");
    fs::rename(&link, src.join("x.pem")).expect("rename link");
    both(&cas[3]);
    fs::write(&other, cas[0].pem()).expect("rewrite");
    both(&cas[0]);
    assert_eq!(daemon.stop(), 0);
}

/// A configuration's one bundle keeps its own reload actions under
/// `run --config ... -- CHILD` and `render --reload`: the child signal a
/// bare `run -- CHILD` implies is for a bundle that names none.
#[test]
fn a_single_bundle_keeps_its_reloads_beside_a_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Own reload A"), Ca::new("Own reload B"));
    let src = write(&dir.path().join("src"), "ca.pem", a.pem());
    let output = dir.path().join("ca.pem");
    let marks = dir.path().join("marks");
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            "[daemon]\ndebounce = \"0s\"\n[[bundle]]\nsources = [\"{}\"]\n\
             [[bundle.output]]\npath = \"{}\"\n\
             [[bundle.reload]]\nexec = [\"sh\", \"-c\", \"echo x >> {}\"]\n",
            s(src.parent().expect("dir")),
            s(&output),
            s(&marks)
        ),
    );
    let marked = || {
        fs::read_to_string(&marks)
            .unwrap_or_default()
            .lines()
            .count()
    };
    crate::support::run(&["render", "--config", s(&config), "--reload"]).expect_code(0);
    assert_eq!(marked(), 1, "render --reload ran the bundle's own exec");

    // sleep dies of a SIGHUP: the daemon would end with it.
    let daemon = Daemon::start(dir.path(), &["--config", s(&config), "--", "sleep", "300"]);
    daemon.wait_log("child started", 1);
    fs::write(&src, pems(&[&a, &b])).expect("write");
    wait_output(&output, &expected_pem(&[&a, &b]));
    eventually(Duration::from_secs(15), || {
        (marked() == 2)
            .then_some(())
            .ok_or(format!("{} exec runs", marked()))
    });
    assert!(!daemon.log().contains("to the child"), "{}", daemon.log());
    // Still running until now: the child ends of the SIGTERM passed on.
    assert_eq!(daemon.stop(), 128 + 15);
}
