//! Guarantee 11: a directory output replaces only a missing or empty
//! directory, or one anchorage wrote; over anything else it is refused and
//! nothing is deleted.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::daemon::{Daemon, eventually};
use crate::support::pki::{Ca, sha256_hex};
use crate::support::{Outcome, free_port, in_mount_namespace, pem_certs, run, s, write};

/// Every path under `root` (not following symlinks) with its bytes (a
/// symlink's target), or `None` for a directory: a snapshot to compare
/// before and after.
fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("list") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                stack.push(path.clone());
                out.insert(path, None);
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("read link");
                out.insert(path, Some(format!("-> {}", target.display()).into_bytes()));
            } else {
                out.insert(path.clone(), Some(fs::read(&path).expect("read")));
            }
        }
    }
    out
}

/// What a system trust directory looks like: names anchorage never writes
/// beside names it does, a subdirectory, a symlink.
fn foreign_trust_dir(dir: &Path) {
    write(dir, "ISRG_Root_X1.pem", Ca::new("Foreign").pem());
    write(dir, "4042bcee.0", Ca::new("Foreign").pem());
    write(dir, "ca-certificates.crt", "someone else's bundle\n");
    write(&dir.join("java"), "cacerts", "not ours either");
    std::os::unix::fs::symlink("ISRG_Root_X1.pem", dir.join("4a6481c9.0")).expect("symlink");
}

fn render_hashed(source: &Path, out: &Path) -> Outcome {
    run(&["render", "--source", s(source), "--hashed-dir", s(out)])
}

fn dry_run_hashed(source: &Path, out: &Path) -> Outcome {
    run(&[
        "render",
        "--dry-run",
        "--source",
        s(source),
        "--hashed-dir",
        s(out),
    ])
}

fn render_der(dir: &Path, source: &Path, out: &Path) -> Outcome {
    let config = write(
        dir,
        "der.toml",
        format!(
            "[[bundle]]\nname = \"der\"\nsources = [\"{}\"]\n\
             [[bundle.output]]\npath = \"{}\"\nformat = \"der-dir\"\n",
            s(source),
            s(out)
        ),
    );
    run(&["render", "--config", s(&config)])
}

/// Names in `dir` that do not start with `.`: what a reader of the output
/// sees.
fn visible(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[track_caller]
fn assert_refused(out: &Outcome, path: &Path) {
    out.expect_code(1);
    assert!(
        out.stderr.contains(s(path)) && out.stderr.contains("refusing to replace"),
        "the error must name the path and the reason:\n{}",
        out.stderr
    );
}

/// Nothing beside the output: no half-built directory left behind.
#[track_caller]
fn assert_no_litter(parent: &Path, expected: &[&str]) {
    let mut names: Vec<String> = fs::read_dir(parent)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    assert_eq!(names, expected, "left beside the output");
}

#[test]
fn hashed_dir_over_a_foreign_directory_is_refused_and_nothing_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Ours").pem());
    let certs = dir.path().join("certs");
    foreign_trust_dir(&certs);
    let before = tree(&certs);

    let out = render_hashed(&src, &certs);
    assert_refused(&out, &certs);
    assert_eq!(tree(&certs), before, "the foreign directory was changed");
    assert_no_litter(dir.path(), &["ca.pem", "certs"]);
}

#[test]
fn der_dir_over_a_foreign_directory_is_refused_and_nothing_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Ours").pem());
    let der = dir.path().join("der");
    write(&der, "notes.txt", "keep me");
    write(&der.join("sub"), "deep.der", Ca::new("Deep").der());
    let before = tree(&der);

    let out = render_der(dir.path(), &src, &der);
    assert_refused(&out, &der);
    assert_eq!(tree(&der), before);
}

#[test]
fn directory_output_over_a_regular_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Ours").pem());
    let file = write(dir.path(), "certs", "a file, not a directory");

    let out = render_hashed(&src, &file);
    assert_refused(&out, &file);
    assert!(out.stderr.contains("regular file"), "{}", out.stderr);
    assert_eq!(fs::read(&file).expect("read"), b"a file, not a directory");
    assert_no_litter(dir.path(), &["ca.pem", "certs"]);

    let out = render_der(dir.path(), &src, &file);
    assert_refused(&out, &file);
    assert_eq!(fs::read(&file).expect("read"), b"a file, not a directory");
}

#[test]
fn directory_output_replaces_an_empty_directory_and_its_own_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Own A"), Ca::new("Own B"));
    let src = write(dir.path(), "ca.pem", a.pem());
    let certs = dir.path().join("certs");
    fs::create_dir(&certs).expect("mkdir");
    render_hashed(&src, &certs).expect_code(0);
    assert_eq!(visible(&certs).len(), 2, "{:?}", visible(&certs));

    // Its own earlier output, with a set that changed.
    write(dir.path(), "ca.pem", format!("{}{}", a.pem(), b.pem()));
    render_hashed(&src, &certs).expect_code(0);
    let bundle = fs::read(certs.join("ca-certificates.crt")).expect("bundle");
    assert_eq!(pem_certs(&bundle).len(), 2);
    assert_eq!(visible(&certs).len(), 3, "{:?}", visible(&certs));

    // The same for der-dir, from empty to changed.
    let der = dir.path().join("der");
    fs::create_dir(&der).expect("mkdir");
    write(dir.path(), "ca.pem", a.pem());
    render_der(dir.path(), &src, &der).expect_code(0);
    assert_eq!(visible(&der), [format!("{}.der", a.sha256())]);
    write(dir.path(), "ca.pem", b.pem());
    render_der(dir.path(), &src, &der).expect_code(0);
    assert_eq!(visible(&der), [format!("{}.der", b.sha256())]);
}

/// A directory anchorage wrote is still refused once someone puts a file
/// of their own in it: the marker says who wrote the directory, not that
/// everything in it now is anchorage's.
#[test]
fn its_own_directory_with_a_file_added_since_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Added A"), Ca::new("Added B"));
    let src = write(dir.path(), "ca.pem", a.pem());
    let certs = dir.path().join("certs");
    render_hashed(&src, &certs).expect_code(0);
    write(&certs, "notes.txt", "mine\n");
    write(&certs.join("mine"), "f", "also mine\n");
    let before = tree(&certs);

    write(dir.path(), "ca.pem", format!("{}{}", a.pem(), b.pem()));
    let out = render_hashed(&src, &certs);
    assert_refused(&out, &certs);
    assert!(
        out.stderr.contains("\"mine\" and 1 other name"),
        "{}",
        out.stderr
    );
    assert_eq!(tree(&certs), before, "the directory was changed");
}

/// A bundle with a directory output that would be refused is refused
/// whole: its other outputs keep their previous content too.
#[test]
fn a_refused_directory_output_refuses_the_whole_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("Whole A"), Ca::new("Whole B"));
    let src = write(dir.path(), "ca.pem", a.pem());
    let (pem, certs) = (dir.path().join("bundle.pem"), dir.path().join("certs"));
    let render_both = |dry: bool| {
        let mut args = vec!["render", "--source", s(&src), "--output", s(&pem)];
        args.extend(["--hashed-dir", s(&certs)]);
        if dry {
            args.push("--dry-run");
        }
        run(&args)
    };
    render_both(false).expect_code(0);
    let before = fs::read(&pem).expect("pem");
    write(&certs, "notes.txt", "mine\n");

    write(dir.path(), "ca.pem", format!("{}{}", a.pem(), b.pem()));
    let dry = render_both(true);
    dry.expect_code(1);
    assert!(
        dry.stdout.contains(&format!("unchanged: {}", s(&pem)))
            && dry
                .stdout
                .contains(&format!("would be refused: {}", s(&certs))),
        "{}",
        dry.stdout
    );
    assert_refused(&render_both(false), &certs);
    assert_eq!(
        fs::read(&pem).expect("pem"),
        before,
        "the PEM output was written"
    );

    // The directory given back: both outputs take the new set.
    fs::remove_file(certs.join("notes.txt")).expect("rm");
    render_both(false).expect_code(0);
    assert_eq!(pem_certs(&fs::read(&pem).expect("pem")).len(), 2);
}

/// An earlier version wrote no marker: a directory holding only the names
/// a directory format produces is its output, and an upgrade refuses
/// nothing.
#[test]
fn directory_output_replaces_an_earlier_versions_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (Ca::new("Old"), Ca::new("New"));
    let src = write(dir.path(), "ca.pem", new.pem());

    let certs = dir.path().join("certs");
    write(&certs, "0a1b2c3d.0", old.pem());
    write(&certs, "0a1b2c3d.1", old.pem());
    write(&certs, "ca-certificates.crt", old.pem());
    render_hashed(&src, &certs).expect_code(0);
    let bundle = fs::read(certs.join("ca-certificates.crt")).expect("bundle");
    assert_eq!(
        pem_certs(&bundle)
            .iter()
            .map(|d| sha256_hex(d))
            .collect::<Vec<_>>(),
        [new.sha256()]
    );
    assert!(!certs.join("0a1b2c3d.1").exists());

    let der = dir.path().join("der");
    write(&der, &format!("{}.der", old.sha256()), old.der());
    render_der(dir.path(), &src, &der).expect_code(0);
    assert_eq!(visible(&der), [format!("{}.der", new.sha256())]);
}

/// A mount point cannot be swapped: anchorage publishes inside it through
/// `..data` and keeps what else is there, but never replaces a file of
/// someone else's with one of its names.
#[test]
fn mount_point_keeps_foreign_files_and_refuses_to_replace_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Mounted").pem());
    let bin = env!("CARGO_BIN_EXE_anchorage");
    let script = format!(
        "mount -t tmpfs none {m} || exit 77
         echo keep > {m}/keep.txt
         ln -s ..data/theirs.txt {m}/theirs.txt
         {bin} render --source {a} --hashed-dir {m} || exit 1
         test -L {m}/..data && test -L {m}/ca-certificates.crt || exit 2
         test \"$(cat {m}/keep.txt)\" = keep || exit 3
         test -L {m}/theirs.txt || exit 10
         umount {m} && mount -t tmpfs none {m} || exit 4
         echo theirs > {m}/ca-certificates.crt
         {bin} render --dry-run --source {a} --hashed-dir {m} >/dev/null 2>&1
         test $? = 1 || exit 9
         {bin} render --source {a} --hashed-dir {m} 2>{m}/../err && exit 5
         grep -q 'not written by anchorage' {m}/../err || exit 6
         test \"$(cat {m}/ca-certificates.crt)\" = theirs || exit 7
         test ! -e {m}/..data || exit 8
         echo done",
        m = s(&mnt),
        a = s(&src),
    );
    let Some(out) = in_mount_namespace(&script) else {
        return;
    };
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(dir.path().join("err")).unwrap_or_default()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
}

fn metrics(addr: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok(text)
}

/// The daemon logs and counts the refusal, deletes nothing, and renders
/// once the directory is emptied and the sources change.
#[test]
fn daemon_refuses_a_foreign_directory_and_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).expect("mkdir");
    let src_dir = dir.path().join("src");
    write(&src_dir, "ca.pem", Ca::new("Daemon A").pem());
    let certs = dir.path().join("certs");
    foreign_trust_dir(&certs);
    let before = tree(&certs);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let daemon = Daemon::start(
        &logs,
        &[
            "--source",
            s(&src_dir),
            "--hashed-dir",
            s(&certs),
            "--debounce",
            "50ms",
            "--listen",
            &addr.to_string(),
        ],
    );
    daemon.wait_log("refusing to replace", 1);
    assert!(daemon.log().contains(s(&certs)), "{}", daemon.log());
    // Its render line says it was not written, not that nothing changed.
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains(" rendered ") && l.contains("Daemon A"))
        .unwrap_or_else(|| panic!("no render line:\n{log}"));
    assert!(line.contains("outcome=\"not written\""), "{line}");
    eventually(Duration::from_secs(15), || {
        let text = metrics(addr)?;
        text.lines()
            .any(|l| l.starts_with("anchorage_refusals_total") && l.contains("reason=\"output\""))
            .then_some(())
            .ok_or(text)
    });
    assert_eq!(
        tree(&certs),
        before,
        "the daemon changed a foreign directory"
    );

    fs::remove_dir_all(&certs).expect("rm");
    fs::create_dir(&certs).expect("mkdir");
    write(&src_dir, "ca.pem", Ca::new("Daemon B").pem());
    eventually(Duration::from_secs(15), || {
        fs::read(certs.join("ca-certificates.crt"))
            .map_err(|e| e.to_string())
            .map(|_| ())
    });
    assert_eq!(daemon.stop(), 0);
}

/// The marker is hidden from everything that reads a directory: a
/// rendered directory is a valid source and `check` finds only
/// certificates in it.
#[test]
fn the_marker_is_not_read_as_a_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Marked");
    let src = write(dir.path(), "ca.pem", ca.pem());
    let certs = dir.path().join("certs");
    render_hashed(&src, &certs).expect_code(0);
    let der = dir.path().join("der");
    render_der(dir.path(), &src, &der).expect_code(0);
    for output in [&certs, &der] {
        assert!(
            fs::read_dir(output).expect("list").any(|e| e
                .expect("entry")
                .file_name()
                .as_encoded_bytes()[0]
                == b'.'),
            "no hidden marker in {}",
            output.display()
        );
        let out = run(&["check", "--json", s(output)]);
        out.expect_code(0);
        let pem = dir.path().join("again.pem");
        run(&["render", "--source", s(output), "--output", s(&pem)]).expect_code(0);
        assert_eq!(pem_certs(&fs::read(&pem).expect("read")), [ca.der()]);
    }
}

/// `render --dry-run` says what `render` would do: refused over a foreign
/// directory (exit 1), nothing written either way.
#[test]
fn dry_run_reports_the_refusal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Dry").pem());
    let certs = dir.path().join("certs");
    foreign_trust_dir(&certs);
    let before = tree(&certs);
    let out = dry_run_hashed(&src, &certs);
    assert_refused(&out, &certs);
    assert!(
        out.stdout
            .contains(&format!("would be refused: {}", s(&certs))),
        "{}",
        out.stdout
    );
    assert_eq!(tree(&certs), before);

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).expect("mkdir");
    let out = dry_run_hashed(&src, &empty);
    out.expect_code(0);
    assert!(
        out.stdout.contains(&format!("would change: {}", s(&empty))),
        "{}",
        out.stdout
    );
    assert_eq!(fs::read_dir(&empty).expect("list").count(), 0);
}

/// Someone else's directory in kubelet's layout (a Secret or ConfigMap
/// volume, a hand-made AtomicWriter directory): its `..data`, its
/// generation and the visible links through it.
fn foreign_published_dir(dir: &Path) {
    write(
        &dir.join("..2026_01_01_00_00_00.1"),
        "config.yaml",
        "theirs\n",
    );
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", dir.join("..data")).expect("symlink");
    std::os::unix::fs::symlink("..data/config.yaml", dir.join("config.yaml")).expect("symlink");
}

/// A `..data` anchorage did not write is no sign the directory is its own:
/// publishing through it would orphan the owner's generation and delete
/// their links. A directory output, a dry run and a key pair's split
/// directory all refuse it, and nothing there changes.
#[test]
fn a_directory_published_by_someone_else_through_data_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Ours").pem());
    let certs = dir.path().join("certs");
    foreign_published_dir(&certs);
    let before = tree(&certs);
    let link = || fs::read_link(certs.join("..data")).expect("..data");
    let theirs = link();

    let out = render_hashed(&src, &certs);
    assert_refused(&out, &certs);
    assert!(out.stderr.contains("..data"), "{}", out.stderr);
    assert_eq!(tree(&certs), before);
    assert_eq!(link(), theirs);

    let out = dry_run_hashed(&src, &certs);
    assert_refused(&out, &certs);
    assert_eq!(tree(&certs), before);

    // A `..data` that is a plain file is someone else's too.
    let plain = dir.path().join("plain");
    write(&plain, "..data", "not a link\n");
    let before_plain = tree(&plain);
    assert_refused(&render_hashed(&src, &plain), &plain);
    assert_eq!(tree(&plain), before_plain);

    let ca = Ca::new("Pod CA");
    let leaf = ca.leaf("pod.example");
    let bundle = write(
        dir.path(),
        "credentialbundle.pem",
        crate::support::kubelet::credential_bundle(&leaf, &[]),
    );
    let split = dir.path().join("tls");
    foreign_published_dir(&split);
    let before_split = tree(&split);
    let out = run(&[
        "render",
        "--credential-bundle",
        s(&bundle),
        "--split-dir",
        s(&split),
    ]);
    out.expect_code(1);
    assert!(
        out.stderr.contains(&format!("{}/..data", s(&split)))
            && out.stderr.contains("not written by anchorage"),
        "{}",
        out.stderr
    );
    assert_eq!(tree(&split), before_split);
}
