//! `anchorage render`: the policy, the formats, and last-known-good.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::support::pki::{Ca, non_ca, sha256_hex};
use crate::support::{Outcome, anchorage, pem_certs, run, s, sh, write};

fn render_pem(source: &Path, output: &Path) -> Outcome {
    run(&["render", "--source", s(source), "--output", s(output)])
}

fn fingerprints(pem: &[u8]) -> Vec<String> {
    pem_certs(pem).iter().map(|d| sha256_hex(d)).collect()
}

#[test]
fn keeps_cas_drops_expired_and_non_ca_keeps_not_yet_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let good = Ca::new("Good");
    let now = time::OffsetDateTime::now_utc();
    let early = Ca::valid(
        "Early",
        now + time::Duration::minutes(1),
        now + time::Duration::days(9),
    );
    write(&src, "good.pem", good.pem());
    write(&src, "early.pem", early.pem());
    write(&src, "expired.pem", Ca::expired("Expired").pem());
    write(&src, "leaf.pem", non_ca("Leaf"));
    let out_file = dir.path().join("out/bundle.pem");
    let out = render_pem(&src, &out_file);
    out.expect_code(0);
    assert!(out.stderr.contains("not valid yet"), "{}", out.stderr);
    assert!(out.stderr.contains("expired"), "{}", out.stderr);
    let mut want = vec![good.sha256(), early.sha256()];
    want.sort();
    assert_eq!(fingerprints(&fs::read(&out_file).expect("output")), want);
}

#[test]
fn allow_flags_keep_expired_and_non_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    write(&src, "expired.pem", Ca::expired("Expired").pem());
    write(&src, "leaf.pem", non_ca("Leaf"));
    let out_file = dir.path().join("bundle.pem");
    run(&[
        "render",
        "--source",
        s(&src),
        "--output",
        s(&out_file),
        "--allow-expired",
        "--allow-non-ca",
    ])
    .expect_code(0);
    assert_eq!(pem_certs(&fs::read(&out_file).expect("output")).len(), 2);
}

#[test]
fn ten_thousand_copies_of_one_ca_render_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Copied");
    let copies = ca.pem().repeat(10_000);
    let src = write(dir.path(), "copies.pem", copies);
    let out_file = dir.path().join("bundle.pem");
    render_pem(&src, &out_file).expect_code(0);
    assert_eq!(
        fingerprints(&fs::read(&out_file).expect("output")),
        vec![ca.sha256()]
    );
}

#[test]
fn crlf_text_around_blocks_der_and_trusted_blocks_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let (a, b, c, d) = (Ca::new("A"), Ca::new("B"), Ca::new("C"), Ca::new("D"));
    let crlf = format!("Bag Attributes\r\n{}junk between\r\n", a.pem()).replace('\n', "\r\n");
    write(&src, "a.pem", crlf);
    write(&src, "b.der", b.der());
    write(
        &src,
        "c.pem",
        format!("subject=CN = C\n{}\ntrailing text\n", c.pem()),
    );
    let plain = write(dir.path(), "d.pem", d.pem());
    let trusted = sh(&format!(
        "openssl x509 -in {} -addtrust serverAuth",
        s(&plain)
    ));
    assert!(trusted.contains("BEGIN TRUSTED CERTIFICATE"), "{trusted}");
    write(&src, "d.pem", trusted);
    let out_file = dir.path().join("bundle.pem");
    render_pem(&src, &out_file).expect_code(0);
    let mut want = vec![a.sha256(), b.sha256(), c.sha256(), d.sha256()];
    want.sort();
    assert_eq!(fingerprints(&fs::read(&out_file).expect("output")), want);
}

#[test]
fn private_keys_are_never_copied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let ca = Ca::new("With Key");
    let leaf = ca.leaf("svc");
    write(&src, "ca.crt", ca.pem());
    write(&src, "tls.crt", leaf.cert.pem());
    write(&src, "tls.key", leaf.key.serialize_pem());
    // The same key as DER, and an RSA one as PKCS#1 DER.
    write(&src, "tls.der", leaf.key.serialize_der());
    let rsa = dir.path().join("rsa.der");
    crate::support::sh(&format!(
        "openssl genrsa -traditional 2048 2>/dev/null | openssl rsa -traditional -outform DER -out {} 2>/dev/null",
        s(&rsa)
    ));
    fs::copy(&rsa, src.join("rsa.key")).expect("copy");
    let out_file = dir.path().join("bundle.pem");
    let out = render_pem(&src, &out_file);
    out.expect_code(0);
    let bytes = fs::read_to_string(&out_file).expect("output");
    assert!(!bytes.contains("PRIVATE KEY"));
    let key_body: String = leaf
        .key
        .serialize_pem()
        .lines()
        .nth(1)
        .expect("key line")
        .into();
    assert!(!out.stderr.contains(&key_body), "key material was logged");
    assert_eq!(fingerprints(bytes.as_bytes()), vec![ca.sha256()]);
}

#[test]
fn same_set_renders_same_bytes_whatever_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cas: Vec<Ca> = (0..6).map(|i| Ca::new(&format!("Set {i}"))).collect();
    let one = dir.path().join("one");
    let two = dir.path().join("two");
    for (i, ca) in cas.iter().enumerate() {
        write(&one, &format!("{i}.pem"), ca.pem());
    }
    // Other names, other grouping, duplicates.
    let all: String = cas.iter().rev().map(Ca::pem).collect();
    write(&two, "z-all.pem", &all);
    write(&two, "a-dup.pem", cas[3].pem());
    let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
    render_pem(&one, &a).expect_code(0);
    render_pem(&two, &b).expect_code(0);
    assert_eq!(fs::read(&a).expect("a"), fs::read(&b).expect("b"));
    for hashed in ["ha", "hb"] {
        let src = if hashed == "ha" { &one } else { &two };
        run(&[
            "render",
            "--source",
            s(src),
            "--hashed-dir",
            s(&dir.path().join(hashed)),
        ])
        .expect_code(0);
    }
    let list = |d: &str| {
        let mut v: Vec<_> = fs::read_dir(dir.path().join(d))
            .expect("list")
            .map(|e| {
                let e = e.expect("entry");
                (e.file_name(), fs::read(e.path()).expect("read"))
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(list("ha"), list("hb"));
}

#[test]
fn unchanged_set_is_not_rewritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Stable").pem());
    let out_file = dir.path().join("bundle.pem");
    render_pem(&src, &out_file).expect_code(0);
    let before = fs::metadata(&out_file).expect("stat");
    let out = render_pem(&src, &out_file);
    out.expect_code(0);
    // An unchanged render is no news: not at the default level.
    assert!(
        !out.stderr.contains("outcome=\"changed\""),
        "{}",
        out.stderr
    );
    let after = fs::metadata(&out_file).expect("stat");
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec())
    );
}

#[test]
fn openssl_dir_verifies_and_matches_openssl_rehash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let root = Ca::new("Hashed Root");
    let others: Vec<Ca> = (0..5).map(|i| Ca::new(&format!("Other {i}"))).collect();
    write(&src, "root.pem", root.pem());
    for (i, ca) in others.iter().enumerate() {
        write(&src, &format!("o{i}.pem"), ca.pem());
    }
    // Two CAs with the same subject: .0 and .1.
    write(&src, "twin.pem", Ca::new("Hashed Root").pem());
    let hashed = dir.path().join("hashed");
    run(&["render", "--source", s(&src), "--hashed-dir", s(&hashed)]).expect_code(0);

    let leaf = root.leaf("svc.example");
    let leaf_file = write(dir.path(), "leaf.pem", leaf.cert.pem());
    let verified = sh(&format!(
        "openssl verify -CApath {} {}",
        s(&hashed),
        s(&leaf_file)
    ));
    assert!(verified.contains(": OK"), "{verified}");
    let bundle = hashed.join("ca-certificates.crt");
    assert_eq!(pem_certs(&fs::read(&bundle).expect("bundle")).len(), 7);

    // `openssl rehash` on a copy of the individual files gives the same names.
    let copy = dir.path().join("copy");
    fs::create_dir(&copy).expect("mkdir");
    let mut ours = Vec::new();
    for entry in fs::read_dir(&hashed).expect("list") {
        let name = entry
            .expect("entry")
            .file_name()
            .into_string()
            .expect("utf-8");
        // Hidden names (anchorage's marker) are not certificates.
        if name != "ca-certificates.crt" && !name.starts_with('.') {
            fs::copy(hashed.join(&name), copy.join(format!("{name}.pem"))).expect("copy");
            ours.push(name);
        }
    }
    sh(&format!("openssl rehash {}", s(&copy)));
    let mut theirs: Vec<String> = fs::read_dir(&copy)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .filter(|n| !n.ends_with(".pem"))
        .collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    assert!(ours.iter().any(|n| n.ends_with(".1")), "{ours:?}");
}

#[test]
fn der_dir_holds_one_der_certificate_per_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let cas: Vec<Ca> = (0..3).map(|i| Ca::new(&format!("Der {i}"))).collect();
    for (i, ca) in cas.iter().enumerate() {
        write(&src, &format!("{i}.pem"), ca.pem());
    }
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            "[[bundle]]\nname = \"der\"\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\nformat = \"der-dir\"\nmode = \"0600\"\n",
            s(&src),
            s(&dir.path().join("der"))
        ),
    );
    run(&["render", "--config", s(&config)]).expect_code(0);
    let mut found = Vec::new();
    for entry in fs::read_dir(dir.path().join("der")).expect("list") {
        let path = entry.expect("entry").path();
        // Anchorage's marker is hidden, as a reader of a der-dir expects.
        if path
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
        {
            continue;
        }
        assert_eq!(
            fs::metadata(&path).expect("stat").permissions().mode() & 0o7777,
            0o600
        );
        let der = fs::read(&path).expect("read");
        sh(&format!("openssl x509 -inform DER -noout -in {}", s(&path)));
        found.push(sha256_hex(&der));
    }
    found.sort();
    let mut want: Vec<String> = cas.iter().map(Ca::sha256).collect();
    want.sort();
    assert_eq!(found, want);
}

#[test]
fn mode_is_applied_exactly_whatever_the_umask() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Mode").pem());
    let out_file = dir.path().join("bundle.pem");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 077 && exec {} render --source {} --output {}",
            env!("CARGO_BIN_EXE_anchorage"),
            s(&src),
            s(&out_file)
        ))
        .status()
        .expect("sh");
    assert!(status.success());
    assert_eq!(
        fs::metadata(&out_file).expect("stat").permissions().mode() & 0o7777,
        0o644
    );
}

/// Under a directory with a default ACL the kernel ignores the umask and
/// masks a new file's mode with the ACL: the mode is still exactly the
/// configured one, and a second render finds nothing to change.
#[test]
fn mode_is_applied_exactly_under_a_default_acl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Acl").pem());
    let out = dir.path().join("out");
    fs::create_dir(&out).expect("mkdir");
    // user::rw-, group::r--, other::---: a new 0644 file would get 0640.
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm) in [(0x01u16, 6u16), (0x04, 4), (0x20, 0)] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(u32::MAX.to_le_bytes());
    }
    rustix::fs::setxattr(
        &out,
        "system.posix_acl_default",
        &acl,
        rustix::fs::XattrFlags::empty(),
    )
    .expect("this test needs a filesystem with POSIX ACLs (ext4, xfs, tmpfs)");
    let file = out.join("bundle.pem");
    let hashed = out.join("hashed");
    let render = || {
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask 022 && exec {} render --source {} --output {} --hashed-dir {}",
                env!("CARGO_BIN_EXE_anchorage"),
                s(&src),
                s(&file),
                s(&hashed)
            ))
            .output()
            .expect("sh");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    render();
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(&file), 0o644);
    let mut names = 0;
    for entry in fs::read_dir(&hashed).expect("list") {
        let path = entry.expect("entry").path();
        assert_eq!(mode(&path), 0o644, "{}", path.display());
        names += 1;
    }
    assert!(names >= 2, "the hash link and the bundle file");
    let inodes = || [&file, &hashed].map(|p| fs::metadata(p).expect("stat").ino());
    let before = inodes();
    let second = render();
    assert!(!second.contains("outcome=\"changed\""), "{second}");
    assert_eq!(inodes(), before, "rewritten");
}

/// Each class of bad input refuses the bundle (exit 1), names the file, and
/// leaves the previous output byte for byte.
#[test]
fn bad_inputs_keep_the_last_good_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = Ca::new("Last Good");
    let pem = good.pem();
    let truncated = pem[..pem.len() / 2].to_owned();
    let bad_base64 = pem.replacen("MII", "M*I", 1);
    let junk_body = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
    );
    let random: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    let key_only =
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"
            .to_owned();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", truncated.into_bytes()),
        ("bad-base64", bad_base64.into_bytes()),
        ("junk-in-block", junk_body.into_bytes()),
        ("random", random),
        ("empty", Vec::new()),
        ("key-only", key_only.into_bytes()),
        ("non-ca-only", non_ca("Only Leaf").into_bytes()),
        (
            "expired-only",
            Ca::expired("Only Expired").pem().into_bytes(),
        ),
        (
            "truncated-beside-good",
            format!("{}{}", &pem[..pem.len() - 40], Ca::new("Other").pem()).into_bytes(),
        ),
        // A copy that lost its start: the first block has no BEGIN line.
        (
            "start-lost-before-good",
            format!("{}{}", &pem[40..], Ca::new("Other").pem()).into_bytes(),
        ),
    ];
    for (class, bytes) in cases {
        let src = dir.path().join(class);
        let source = write(&src, "ca.pem", &pem);
        let out_file = dir.path().join(format!("{class}.pem"));
        render_pem(&src, &out_file).expect_code(0);
        let before = fs::read(&out_file).expect("output");
        let inode = fs::metadata(&out_file).expect("stat").ino();

        fs::write(&source, &bytes).expect("write bad input");
        let out = render_pem(&src, &out_file);
        assert_eq!(out.code, 1, "{class}: {}", out.stderr);
        let names_file = out.stderr.contains("ca.pem") || out.stderr.contains("min_certs");
        assert!(
            names_file,
            "{class}: the error names neither file nor reason: {}",
            out.stderr
        );
        assert_eq!(
            fs::read(&out_file).expect("output"),
            before,
            "{class}: output changed"
        );
        assert_eq!(
            fs::metadata(&out_file).expect("stat").ino(),
            inode,
            "{class}: rewritten"
        );
    }
}

#[test]
fn oversize_file_is_refused_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    write(&src, "ca.pem", Ca::new("Small").pem());
    let big = src.join("big.pem");
    fs::File::create(&big)
        .expect("create")
        .set_len(16 * 1024 * 1024 + 1)
        .expect("grow");
    let out_file = dir.path().join("bundle.pem");
    let out = render_pem(&src, &out_file);
    out.expect_code(1);
    assert!(
        out.stderr.contains("big.pem") && out.stderr.contains("limit"),
        "{}",
        out.stderr
    );
    assert!(!out_file.exists());
}

#[test]
fn min_certs_refuses_a_small_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Alone").pem());
    let out_file = dir.path().join("bundle.pem");
    let out = run(&[
        "render",
        "--source",
        s(&src),
        "--output",
        s(&out_file),
        "--min-certs",
        "2",
    ]);
    out.expect_code(1);
    assert!(out.stderr.contains("min_certs"), "{}", out.stderr);
}

/// A source that holds no file at all (a mistyped path, an empty
/// directory) is named in the refusal it leads to; one that gave
/// certificates is not.
#[test]
fn a_source_with_no_file_is_named_when_too_few_remain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Alone").pem());
    let typo = dir.path().join("ca.pen");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let out_file = dir.path().join("bundle.pem");
    let out = run(&[
        "render",
        "--source",
        s(&src),
        "--source",
        s(&typo),
        "--source",
        s(&empty),
        "--output",
        s(&out_file),
        "--min-certs",
        "2",
    ]);
    out.expect_code(1);
    assert!(
        out.stderr
            .contains(&format!("no file at {}, {}", s(&typo), s(&empty))),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains(&format!("{},", s(&src))),
        "{}",
        out.stderr
    );
    assert!(!out_file.exists());
}

#[test]
fn sources_come_from_environment_lists_and_globs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = (Ca::new("Env A"), Ca::new("Env B"), Ca::new("Env C"));
    let fa = write(&dir.path().join("a"), "a.pem", a.pem());
    write(&dir.path().join("g"), "b.pem", b.pem());
    write(&dir.path().join("g"), "c.crt", c.pem());
    let glob = format!("{}/*.pem", s(&dir.path().join("g")));
    let out_file = dir.path().join("bundle.pem");
    let out = anchorage()
        .args(["render"])
        .env("ANCHORAGE_SOURCE", format!("{},{glob}", s(&fa)))
        .env("ANCHORAGE_OUTPUT", s(&out_file))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = vec![a.sha256(), b.sha256()];
    want.sort();
    assert_eq!(fingerprints(&fs::read(&out_file).expect("output")), want);
}

#[test]
fn kubelet_volume_is_read_as_one_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol");
    let ts = vol.join("..2026_11_22_10_00_00.123456789");
    let (a, stale) = (Ca::new("Live"), Ca::new("Stale"));
    write(&ts, "ca.crt", a.pem());
    std::os::unix::fs::symlink("..2026_11_22_10_00_00.123456789", vol.join("..data"))
        .expect("link");
    std::os::unix::fs::symlink("..data/ca.crt", vol.join("ca.crt")).expect("link");
    // A stray file beside the volume's visible links is not in the generation.
    write(&vol.join("..2026_11_22_09_00_00.1"), "old.crt", stale.pem());
    let out_file = dir.path().join("bundle.pem");
    render_pem(&vol, &out_file).expect_code(0);
    assert_eq!(
        fingerprints(&fs::read(&out_file).expect("output")),
        vec![a.sha256()]
    );
}

/// An output directory that is a mount point (an emptyDir) cannot be
/// renamed: it is published inside, through `..data`.
#[test]
fn hashed_dir_on_a_mount_point_is_published_through_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Mounted").pem());
    let src2 = write(
        dir.path(),
        "ca2.pem",
        format!("{}{}", Ca::new("Mounted").pem(), Ca::new("Second").pem()),
    );
    let bin = env!("CARGO_BIN_EXE_anchorage");
    let script = format!(
        "mount -t tmpfs none {m} || exit 77
         {bin} render --source {a} --hashed-dir {m} || exit 1
         test -L {m}/..data && test -L {m}/ca-certificates.crt || exit 2
         n1=$(ls {m} | wc -l)
         {bin} render --source {b} --hashed-dir {m} || exit 3
         n2=$(ls {m} | wc -l)
         test \"$n1\" = 2 && test \"$n2\" = 3 || exit 4
         test $(ls -d {m}/..anchorage_* | wc -l) = 1 || exit 5
         grep -c 'BEGIN CERTIFICATE' {m}/ca-certificates.crt",
        m = s(&mnt),
        a = s(&src),
        b = s(&src2)
    );
    let Some(out) = crate::support::in_mount_namespace(&script) else {
        return;
    };
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
}

/// Java truststores: deterministic bytes, read by OpenSSL 3 without
/// `-legacy` and by the JDK's keytool as trusted-certificate entries.
#[test]
fn pkcs12_and_jks_truststores_are_deterministic_and_read_by_java_and_openssl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let cas: Vec<Ca> = (0..3).map(|i| Ca::new(&format!("Java {i}"))).collect();
    for (i, ca) in cas.iter().enumerate() {
        write(&src, &format!("{i}.pem"), ca.pem());
    }
    let outputs = |suffix: &str| {
        format!(
            "[[bundle.output]]\npath = \"{d}/trust{suffix}.p12\"\nformat = \"pkcs12\"\n\
             [[bundle.output]]\npath = \"{d}/secret{suffix}.p12\"\nformat = \"pkcs12\"\npassword = \"s3cret\"\n\
             [[bundle.output]]\npath = \"{d}/trust{suffix}.jks\"\nformat = \"jks\"\n",
            d = s(dir.path())
        )
    };
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            "[[bundle]]\nsources = [\"{}\"]\n{}{}",
            s(&src),
            outputs("-a"),
            outputs("-b")
        ),
    );
    run(&["render", "--config", s(&config)]).expect_code(0);
    for name in ["trust", "secret"] {
        let a = fs::read(dir.path().join(format!("{name}-a.p12"))).expect("a");
        let b = fs::read(dir.path().join(format!("{name}-b.p12"))).expect("b");
        assert_eq!(a, b, "{name}.p12 is not deterministic");
    }
    assert_eq!(
        fs::read(dir.path().join("trust-a.jks")).expect("a"),
        fs::read(dir.path().join("trust-b.jks")).expect("b")
    );
    let text = sh(&format!(
        "openssl pkcs12 -in {} -nokeys -passin pass:s3cret -info 2>&1",
        s(&dir.path().join("secret-a.p12"))
    ));
    assert!(text.contains("MAC: sha256"), "{text}");
    assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 3, "{text}");
    for (file, kind, pass) in [
        ("trust-a.p12", "PKCS12", ""),
        ("secret-a.p12", "PKCS12", "s3cret"),
        ("trust-a.jks", "JKS", "changeit"),
    ] {
        if std::process::Command::new("keytool")
            .arg("-help")
            .output()
            .is_err()
        {
            panic!("keytool is missing: scripts/install-test-deps installs a JDK");
        }
        let listing = sh(&format!(
            "keytool -list -keystore {} -storetype {kind} -storepass '{pass}'",
            s(&dir.path().join(file))
        ));
        assert_eq!(
            listing.matches("trustedCertEntry").count(),
            3,
            "{file}: {listing}"
        );
        for ca in &cas {
            assert!(
                listing.to_lowercase().contains(&ca.sha256()[..16]),
                "{file}: alias missing"
            );
        }
    }
}

/// `render --dry-run`: everything validated, per output whether it would
/// change, nothing written, nothing reloaded; exit codes as `render`.
#[test]
fn dry_run_says_what_would_change_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Dry").pem());
    let pem = dir.path().join("out/ca.pem");
    let hashed = dir.path().join("out/hashed");
    let marker = dir.path().join("reloaded");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "render",
            "--source",
            s(&src),
            "--output",
            s(&pem),
            "--hashed-dir",
            s(&hashed),
            "--exec",
        ];
        let exec = format!("touch {}", s(&marker));
        let mut out: Vec<String> = v.drain(..).map(str::to_owned).collect();
        out.push(exec);
        out.extend(extra.iter().map(|a| (*a).to_owned()));
        out
    };
    let run_args = |extra: &[&str]| {
        let owned = args(extra);
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        run(&refs)
    };
    let out = run_args(&["--dry-run"]);
    out.expect_code(0);
    assert!(
        out.stdout.contains(&format!("would change: {}", s(&pem))),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&format!("would change: {}", s(&hashed))),
        "{}",
        out.stdout
    );
    assert!(!pem.exists() && !hashed.exists() && !marker.exists());

    run_args(&[]).expect_code(0);
    let before = fs::read(&pem).expect("pem");
    let out = run_args(&["--dry-run"]);
    out.expect_code(0);
    assert!(
        out.stdout.contains(&format!("unchanged: {}", s(&pem))),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("unchanged: {}", s(&hashed))),
        "{}",
        out.stdout
    );
    // Nothing would change: no news in the log (DEBUG).
    assert!(!out.stderr.contains("rendered"), "{}", out.stderr);

    // A bad source: exit 1, the output untouched.
    fs::write(&src, "-----BEGIN CERTIFICATE-----\nAAAA\n").expect("garbage");
    run_args(&["--dry-run"]).expect_code(1);
    assert_eq!(fs::read(&pem).expect("pem"), before);
    // --dry-run and --reload together make no sense: a usage error.
    run_args(&["--dry-run", "--reload"]).expect_code(2);
    assert!(!marker.exists(), "a dry run reloaded");
}

/// `render --reload` in an init container: the app is not running yet. A
/// target that does not exist (a pid file, a file to touch, an exec that
/// says 75) is skipped with an info line, as at a daemon's start, and the
/// render succeeds; a target that exists and fails still fails it, and so
/// does an exec whose program is not there.
#[test]
fn render_reload_skips_a_target_that_does_not_exist_yet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Init").pem());
    let absent = dir.path().join("absent");
    let tempfail = write(dir.path(), "tempfail.sh", "#!/bin/sh\nexit 75\n");
    fs::set_permissions(&tempfail, fs::Permissions::from_mode(0o755)).expect("chmod");
    let render_reload = |name: &str, target: &[&str]| {
        let output = dir.path().join(name);
        let mut args = vec!["render", "--source", s(&src), "--output", s(&output)];
        args.push("--reload");
        args.extend_from_slice(target);
        run(&args)
    };
    for (i, target) in [
        ["--pid-file", s(&absent)],
        ["--touch", s(&absent)],
        ["--exec", s(&tempfail)],
    ]
    .into_iter()
    .enumerate()
    {
        let out = render_reload(&format!("out{i}.pem"), &target);
        out.expect_code(0);
        assert!(
            out.stderr.contains("does not exist yet"),
            "{target:?}: {}",
            out.stderr
        );
        assert!(!absent.exists(), "a touch created its file");
    }
    let failing = write(dir.path(), "fail.sh", "#!/bin/sh\nexit 3\n");
    fs::set_permissions(&failing, fs::Permissions::from_mode(0o755)).expect("chmod");
    render_reload("failing.pem", &["--exec", s(&failing)]).expect_code(1);
    // A program that cannot be found is no app not there yet (only its exit
    // 75 says that): a typo fails the render.
    let missing = dir.path().join("no-such-program");
    let out = render_reload("missing.pem", &["--exec", s(&missing)]);
    out.expect_code(1);
    assert!(out.stderr.contains("cannot start"), "{}", out.stderr);
}

/// A P-521 key pair (a podCertificate `keyType`), which the signing library
/// does not load: checked by the public point the key carries, as PKCS#8
/// and as SEC1, whole or from a credential bundle; another P-521 key is a
/// mismatch, held.
#[test]
fn a_p521_key_pair_is_checked_by_its_public_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = s(dir.path());
    let p521 = "-newkey ec -pkeyopt ec_paramgen_curve:P-521 -nodes";
    sh(&format!(
        "cd {d} && openssl req -x509 {p521} -keyout ca.key -out ca.pem -subj /CN=CA521 -days 10 \
         && openssl req -new {p521} -keyout pod.key -out pod.csr -subj /CN=pod \
         && openssl x509 -req -in pod.csr -CA ca.pem -CAkey ca.key -days 1 -out pod.pem \
         && openssl ec -in pod.key -out pod.sec1 \
         && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-521 -out other.key \
         && cat pod.key pod.pem > bundle.pem"
    ));
    let at = |name: &str| dir.path().join(name);
    for key in ["pod.key", "pod.sec1"] {
        let out = run(&["render", "--cert", s(&at("pod.pem")), "--key", s(&at(key))]);
        out.expect_code(0);
        assert!(
            out.stderr.contains("key pair checked"),
            "{key}: {}",
            out.stderr
        );
    }
    let out = run(&[
        "render",
        "--cert",
        s(&at("pod.pem")),
        "--key",
        s(&at("other.key")),
    ]);
    out.expect_code(1);
    assert!(out.stderr.contains("does not match"), "{}", out.stderr);
    let split = at("split");
    run(&[
        "render",
        "--credential-bundle",
        s(&at("bundle.pem")),
        "--split-dir",
        s(&split),
    ])
    .expect_code(0);
    assert_eq!(
        fs::read(split.join("tls.crt")).expect("chain"),
        fs::read(at("pod.pem")).expect("pem")
    );
}

/// A v1 leaf (`openssl x509 -req` without extensions) and its key are a
/// pair; another key is not.
#[test]
fn a_v1_leaf_and_its_key_are_a_pair() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = s(dir.path());
    let p256 = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh(&format!(
        "cd {d} && openssl req -x509 {p256} -keyout ca.key -out ca.pem -subj /CN=CA -days 10 \
         && openssl req -new {p256} -keyout leaf.key -out leaf.csr -subj /CN=v1 \
         && openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -days 1 -out leaf.pem"
    ));
    let at = |name: &str| dir.path().join(name);
    let pair = |key: &str| run(&["render", "--cert", s(&at("leaf.pem")), "--key", s(&at(key))]);
    pair("leaf.key").expect_code(0);
    let out = pair("ca.key");
    out.expect_code(1);
    assert!(out.stderr.contains("does not match"), "{}", out.stderr);
}

/// A `verify` certificate issued by a P-521 CA: the chain cannot be
/// checked here, and the refusal says so (not "does not chain").
#[test]
fn verify_under_a_ca_it_cannot_check_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = s(dir.path());
    sh(&format!(
        "cd {d} && mkdir src && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-521 \
         -nodes -keyout ca.key -out src/ca.pem -subj /CN=CA521 -days 10 \
         && openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key \
         -out leaf.csr -subj /CN=leaf \
         && printf 'basicConstraints=CA:FALSE\\nsubjectAltName=DNS:leaf\\n' > ext.cnf \
         && openssl x509 -req -in leaf.csr -CA src/ca.pem -CAkey ca.key -days 1 -out leaf.pem \
         -extfile ext.cnf"
    ));
    let at = |name: &str| dir.path().join(name);
    let out = run(&[
        "render",
        "--source",
        s(&at("src")),
        "--output",
        s(&at("out.pem")),
        "--verify",
        s(&at("leaf.pem")),
    ]);
    out.expect_code(1);
    assert!(
        out.stderr
            .contains("cannot be checked against the new bundle"),
        "{}",
        out.stderr
    );
    assert!(!at("out.pem").exists());
}

/// `render` checks a key pair it has no split_dir for, as `--dry-run` and
/// `run` do: one `run` would hold fails it (exit 1), with or without
/// `--dry-run`.
#[test]
fn render_checks_every_key_pair_and_dry_run_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Pair CA");
    let src = write(dir.path(), "ca.pem", ca.pem());
    let (crt, key) = ca.leaf("pair.example").write(dir.path(), "good");
    let (_, other_key) = ca.leaf("other.example").write(dir.path(), "other");
    let missing = dir.path().join("missing.key");
    let output = dir.path().join("out.pem");
    let render = |key: &Path, dry: bool| {
        let mut args = vec!["render", "--source", s(&src), "--output", s(&output)];
        args.extend(["--cert", s(&crt), "--key", s(key)]);
        if dry {
            args.push("--dry-run");
        }
        run(&args)
    };
    for dry in [false, true] {
        render(&key, dry).expect_code(0);
        for bad in [&other_key, &missing] {
            let out = render(bad, dry);
            out.expect_code(1);
            assert!(
                out.stderr.contains("key pair") && out.stderr.contains("held"),
                "dry {dry}, {}: {}",
                bad.display(),
                out.stderr
            );
        }
    }
}

/// `render --dry-run` refuses (exit 1, "would be refused") what `render`
/// would fail to write: a file output under a regular file or at a
/// directory, a split_dir that is a regular file or holds files anchorage
/// did not write. It says per split_dir whether it would change, and per
/// output of a refused bundle that it stays unchanged.
#[test]
fn dry_run_finds_what_render_could_not_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Dry paths");
    let src = write(dir.path(), "ca.pem", ca.pem());
    let plain = write(dir.path(), "plain", "a regular file");
    let taken = dir.path().join("taken");
    fs::create_dir(&taken).expect("mkdir");
    for output in [plain.join("out.pem"), taken.clone()] {
        for dry in [true, false] {
            let mut args = vec!["render", "--source", s(&src), "--output", s(&output)];
            if dry {
                args.push("--dry-run");
            }
            let out = run(&args);
            out.expect_code(1);
            if dry {
                assert!(out.stdout.contains("would be refused"), "{}", out.stdout);
            }
        }
    }
    // Key pairs with a split_dir.
    let (crt, key) = ca.leaf("split.example").write(dir.path(), "leaf");
    let foreign = dir.path().join("foreign");
    fs::create_dir(&foreign).expect("mkdir");
    write(&foreign, "tls.crt", "someone else's");
    let fresh = dir.path().join("fresh");
    let split_render = |split: &Path, dry: bool| {
        let mut args = vec!["render", "--cert", s(&crt), "--key", s(&key)];
        args.extend(["--split-dir", s(split)]);
        if dry {
            args.push("--dry-run");
        }
        run(&args)
    };
    for (split, code) in [(&plain, 1), (&foreign, 1), (&fresh, 0)] {
        let out = split_render(split, true);
        out.expect_code(code);
        let verdict = if code == 0 {
            "would change"
        } else {
            "would be refused"
        };
        assert!(
            out.stdout.contains(&format!("{verdict}: {}", s(split))),
            "{}: {}",
            split.display(),
            out.stdout
        );
        split_render(split, false).expect_code(code);
    }
    assert_eq!(
        fs::read_to_string(foreign.join("tls.crt")).expect("kept"),
        "someone else's"
    );
    // Written now: unchanged.
    let out = split_render(&fresh, true);
    out.expect_code(0);
    assert!(
        out.stdout.contains(&format!("unchanged: {}", s(&fresh))),
        "{}",
        out.stdout
    );
    // A render that leaves it as it was is no news at INFO.
    let again = split_render(&fresh, false);
    again.expect_code(0);
    assert!(!again.stderr.contains("key pair split"), "{}", again.stderr);
    // A refused bundle: each output unchanged, and said so.
    let bad = write(dir.path(), "bad.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n");
    let output = dir.path().join("kept.pem");
    let out = run(&[
        "render",
        "--source",
        s(&bad),
        "--output",
        s(&output),
        "--dry-run",
    ]);
    out.expect_code(1);
    assert!(
        out.stdout.contains(&format!("unchanged: {}", s(&output)))
            && out.stdout.contains("refused"),
        "{}",
        out.stdout
    );
}

/// A PEM file saved with a UTF-8 byte order mark (Windows editors write
/// one) is read as OpenSSL reads it, not skipped.
#[test]
fn a_byte_order_mark_does_not_hide_a_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (Ca::new("BOM A"), Ca::new("BOM B"));
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(a.pem().replace('\n', "\r\n").into_bytes());
    let with_bom = write(dir.path(), "bom.pem", bytes);
    let plain = write(dir.path(), "b.pem", b.pem());
    let out_file = dir.path().join("out.pem");
    run(&[
        "render",
        "--source",
        s(&with_bom),
        "--source",
        s(&plain),
        "--output",
        s(&out_file),
    ])
    .expect_code(0);
    let mut want = vec![a.sha256(), b.sha256()];
    want.sort();
    assert_eq!(fingerprints(&fs::read(&out_file).expect("output")), want);
    run(&["check", s(&with_bom)]).expect_code(0);
}

/// `--state-dir` holds each bundle's last-good record, retention or not,
/// and is made if missing (nested too); a dry run writes none of it.
#[test]
fn the_state_dir_is_made_and_holds_the_last_good_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("Last good record");
    let src = write(dir.path(), "ca.pem", ca.pem());
    let state = dir.path().join("var/lib/anchorage");
    let output = dir.path().join("out.pem");
    let args = |dry: bool| {
        let mut v = vec!["render", "--source", s(&src), "--output", s(&output)];
        v.extend(["--state-dir", s(&state)]);
        if dry {
            v.push("--dry-run");
        }
        v
    };
    run(&args(true)).expect_code(0);
    assert!(!state.exists(), "a dry run made the state directory");
    run(&args(false)).expect_code(0);
    let record: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(state.join("default.json")).expect("the bundle's state file"),
    )
    .expect("json");
    assert_eq!(record["last_good"]["sha256"][0], ca.sha256(), "{record}");
}

/// The configuration of a daemon that supervises a child (`run -- CHILD`)
/// is one `render` reads too: an init container renders with it, CI checks
/// it with `--dry-run`, and with `--reload` the child, not started yet, is
/// a target that does not exist.
#[test]
fn a_config_that_reloads_a_child_renders_and_dry_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = write(dir.path(), "ca.pem", Ca::new("Child config").pem());
    let output = dir.path().join("out.pem");
    let config = write(
        dir.path(),
        "anchorage.toml",
        format!(
            "[[bundle]]\nsources = [\"{}\"]\n[[bundle.output]]\npath = \"{}\"\n\
             [[bundle.reload]]\nrestart_child = true\n\
             [[bundle.reload]]\nsignal = \"HUP\"\nchild = true\n",
            s(&src),
            s(&output)
        ),
    );
    let out = run(&["render", "--config", s(&config), "--dry-run"]);
    out.expect_code(0);
    assert!(out.stdout.contains("would change"), "{}", out.stdout);
    let out = run(&["render", "--config", s(&config), "--reload"]);
    out.expect_code(0);
    assert!(out.stderr.contains("does not exist yet"), "{}", out.stderr);
    assert!(output.exists());
}
