//! `check`'s `strict` reasons against the strict verifier itself: CAs
//! crafted with one defect each (by the openssl CLI, and three by editing
//! the DER and signing it again), a leaf issued by each, and
//! `openssl verify -x509_strict` with that CA as the trust anchor. anchorage
//! must flag exactly the CAs OpenSSL refuses, for a reason that explains
//! OpenSSL's error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::support::daemon::{Daemon, eventually};
use crate::support::{free_port, run, s, sh, write};

/// Every extension set the crafted certificates use; `[leaf]` is written per
/// CA (its authorityKeyIdentifier names that CA's key).
const CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[good]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[pathlen0]
basicConstraints = critical,CA:true,pathlen:0
keyUsage = critical,keyCertSign
subjectKeyIdentifier = hash
[bc_not_critical]
basicConstraints = CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[no_key_usage]
basicConstraints = critical,CA:true
subjectKeyIdentifier = hash
[no_skid]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = none
authorityKeyIdentifier = none
[ku_only]
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[ku_no_cert_sign]
basicConstraints = critical,CA:true
keyUsage = critical,digitalSignature,cRLSign
subjectKeyIdentifier = hash
[pathlen_no_ku]
basicConstraints = critical,CA:true,pathlen:1
subjectKeyIdentifier = hash
[empty_san]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
subjectAltName = DER:30:00
[skid_critical]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = critical,hash
[intermediate]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[intermediate_no_akid]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = none
[intermediate_akid_issuer]
basicConstraints = critical,CA:true
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = issuer:always
";

/// How a crafted CA comes to be.
enum Make {
    /// `openssl req -x509` with this extension section and serial.
    Root(&'static str, &'static str),
    /// A v1 root: `openssl x509 -req -signkey`, no extensions at all.
    V1Root,
    /// Issued by the good root with this section: not self-issued.
    Intermediate(&'static str),
    /// The good root's TBS edited, then signed again with its key.
    Edited(Edit),
    /// A good root of its own P-256 key, written with explicit curve
    /// parameters (`ecparam -param_enc explicit`).
    ExplicitEc,
}

#[derive(Clone, Copy)]
enum Edit {
    /// Version 2, extensions kept.
    Version2,
    /// tbsCertificate.signature says ecdsa-with-SHA384; the outer one SHA256.
    InnerSignatureAlgorithm,
    /// Subject and issuer empty.
    EmptyNames,
}

/// Which OpenSSL verify errors each of anchorage's reasons stands for.
fn codes(reason: &str) -> &'static [u32] {
    const TABLE: &[(&str, &[u32])] = &[
        ("no basicConstraints", &[79, 82]),
        ("keyUsage without keyCertSign", &[79, 32]),
        ("unhandled critical extension", &[34]),
        ("pathLenConstraint without keyCertSign", &[81]),
        ("basicConstraints not critical", &[89]),
        ("no keyUsage", &[92]),
        ("empty issuer", &[83]),
        ("empty subject and subjectAltName not critical", &[88]),
        ("empty subjectAltName", &[87]),
        ("empty subject", &[84]),
        ("signatureAlgorithm differs", &[78]),
        ("no authorityKeyIdentifier", &[85]),
        ("authorityKeyIdentifier without keyIdentifier", &[85]),
        ("no subjectKeyIdentifier", &[86]),
        ("extensions in a v", &[93]),
        ("EC key with explicit curve parameters", &[94]),
    ];
    TABLE
        .iter()
        .find(|(prefix, _)| reason.starts_with(prefix))
        .map_or(&[], |(_, codes)| codes)
}

struct Pki {
    dir: PathBuf,
    config: PathBuf,
    root_key: PathBuf,
    intermediate_key: PathBuf,
    leaf_csr: PathBuf,
    root: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let config = write(dir, "openssl.cnf", CONFIG);
        let key = |name: &str| {
            let path = dir.join(name);
            sh(&format!(
                "openssl ecparam -name prime256v1 -genkey -noout -out {}",
                s(&path)
            ));
            path
        };
        let root_key = key("root.key");
        let intermediate_key = key("intermediate.key");
        let leaf_key = key("leaf.key");
        let leaf_csr = dir.join("leaf.csr");
        sh(&format!(
            "openssl req -new -key {} -subj /CN=leaf.example -config {} -out {}",
            s(&leaf_key),
            s(&config),
            s(&leaf_csr)
        ));
        let mut pki = Self {
            dir: dir.to_owned(),
            config,
            root_key,
            intermediate_key,
            leaf_csr,
            root: PathBuf::new(),
        };
        pki.root = pki.make("root", &Make::Root("good", "1"));
        pki
    }

    /// The key of [`Make::ExplicitEc`]'s root.
    fn explicit_key(&self) -> PathBuf {
        self.dir.join("explicit.key")
    }

    /// Writes the CA whose common name is `cn` and returns its PEM file.
    fn make(&self, cn: &str, how: &Make) -> PathBuf {
        let name = cn.replace(' ', "-");
        let out = self.dir.join(format!("{name}.pem"));
        let (config, root_key) = (s(&self.config), s(&self.root_key));
        match how {
            Make::Root(section, serial) => sh(&format!(
                "openssl req -x509 -new -key {root_key} -subj '/CN={cn}' -days 30 -config {config} \
                 -extensions {section} -set_serial {serial} -out {}",
                s(&out)
            )),
            Make::V1Root => {
                let csr = self.dir.join(format!("{name}.csr"));
                sh(&format!(
                    "openssl req -new -key {root_key} -subj '/CN={cn}' -config {config} -out {csr} && \
                     openssl x509 -req -in {csr} -signkey {root_key} -days 30 -out {out} 2>&1",
                    csr = s(&csr),
                    out = s(&out)
                ))
            }
            Make::Intermediate(section) => {
                let csr = self.dir.join(format!("{name}.csr"));
                sh(&format!(
                    "openssl req -new -key {} -subj '/CN={cn}' -config {config} -out {csr} && \
                     openssl x509 -req -in {csr} -CA {} -CAkey {root_key} -set_serial 9 -days 20 \
                     -extfile {config} -extensions {section} -out {out} 2>&1",
                    s(&self.intermediate_key),
                    s(&self.root),
                    csr = s(&csr),
                    out = s(&out)
                ))
            }
            Make::ExplicitEc => sh(&format!(
                "openssl ecparam -name prime256v1 -param_enc explicit -genkey -noout -out {key} && \
                 openssl req -x509 -new -key {key} -subj '/CN={cn}' -days 30 -config {config} \
                 -extensions good -set_serial 12 -out {}",
                s(&out),
                key = s(&self.explicit_key()),
            )),
            Make::Edited(edit) => {
                let der = std::fs::read(&self.root).expect("root");
                let der = pem_to_der(&der);
                let edited = resign(&edit_tbs(&der, *edit), &self.root_key, &self.dir);
                write(&self.dir, &format!("{name}.der"), &edited);
                sh(&format!(
                    "openssl x509 -inform DER -in {}/{name}.der -out {}",
                    s(&self.dir),
                    s(&out)
                ))
            }
        };
        out
    }

    /// A leaf issued by `ca` (whose key is `key`), with what a strict
    /// verifier asks of a leaf, so that only the CA can fail.
    fn leaf(&self, name: &str, ca: &Path, key: &Path) -> PathBuf {
        let ca_der = pem_to_der(&std::fs::read(ca).expect("ca"));
        let (_, cert) = X509Certificate::from_der(&ca_der).expect("parse CA");
        // Without a subjectKeyIdentifier to match, any keyIdentifier will do.
        let key_id = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .unwrap_or_else(|| vec![1, 2, 3, 4]);
        let mut akid = vec![0x30, key_id.len() as u8 + 2, 0x80, key_id.len() as u8];
        akid.extend(&key_id);
        let hex: Vec<String> = akid.iter().map(|b| format!("{b:02X}")).collect();
        let extfile = write(
            &self.dir,
            &format!("{name}-leaf.cnf"),
            format!(
                "[leaf]\nbasicConstraints = critical,CA:false\nkeyUsage = critical,digitalSignature\n\
                 subjectAltName = DNS:leaf.example\nauthorityKeyIdentifier = DER:{}\n",
                hex.join(":")
            ),
        );
        let out = self.dir.join(format!("{name}-leaf.pem"));
        sh(&format!(
            "openssl x509 -req -in {} -CA {} -CAkey {} -set_serial 7 -days 10 -extfile {} \
             -extensions leaf -out {} 2>&1",
            s(&self.leaf_csr),
            s(ca),
            s(key),
            s(&extfile),
            s(&out)
        ));
        out
    }
}

/// OpenSSL's verdict: `None` when it accepts, else the error codes it
/// reported at each depth.
fn openssl_verify(strict: bool, ca_file: &Path, leaf: &Path) -> Option<Vec<(u32, u32)>> {
    let mut cmd = Command::new("openssl");
    cmd.arg("verify");
    if strict {
        cmd.arg("-x509_strict");
    }
    let out = cmd
        .args(["-CAfile", s(ca_file), s(leaf)])
        .output()
        .expect("openssl verify");
    if out.status.success() {
        return None;
    }
    // "error 89 at 1 depth lookup: Basic Constraints of CA cert not marked critical"
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let errors: Vec<(u32, u32)> = text
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find("error ")? + 6..];
            let mut words = rest.split(' ');
            let code = words.next()?.parse().ok()?;
            (words.next()? == "at").then_some(())?;
            let depth = words.next()?.parse().ok()?;
            Some((code, depth))
        })
        .collect();
    assert!(
        !errors.is_empty(),
        "openssl failed without an error line:\n{text}"
    );
    Some(errors)
}

#[test]
fn strict_reasons_agree_with_openssl_verify_x509_strict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    // (name, how, refused by plain verification too)
    let cases: &[(&str, Make, bool)] = &[
        ("good", Make::Root("good", "2"), false),
        ("pathlen-0", Make::Root("pathlen0", "3"), false),
        ("serial-zero", Make::Root("good", "0"), false),
        ("serial-negative", Make::Root("good", "-5"), false),
        ("bc-not-critical", Make::Root("bc_not_critical", "4"), false),
        ("no-key-usage", Make::Root("no_key_usage", "5"), false),
        ("no-skid", Make::Root("no_skid", "6"), false),
        ("ku-only", Make::Root("ku_only", "7"), false),
        ("v1-root", Make::V1Root, false),
        ("ku-no-cert-sign", Make::Root("ku_no_cert_sign", "8"), true),
        ("pathlen-no-ku", Make::Root("pathlen_no_ku", "9"), false),
        ("empty-san", Make::Root("empty_san", "10"), false),
        ("skid-critical", Make::Root("skid_critical", "11"), true),
        ("v2-extensions", Make::Edited(Edit::Version2), false),
        (
            "inner-sigalg",
            Make::Edited(Edit::InnerSignatureAlgorithm),
            false,
        ),
        ("empty-names", Make::Edited(Edit::EmptyNames), false),
        // OpenSSL 3.0 refuses it even without -x509_strict.
        ("explicit-ec", Make::ExplicitEc, true),
        ("intermediate", Make::Intermediate("intermediate"), false),
        (
            "intermediate-no-akid",
            Make::Intermediate("intermediate_no_akid"),
            false,
        ),
        (
            "intermediate-akid-issuer",
            Make::Intermediate("intermediate_akid_issuer"),
            false,
        ),
    ];
    let mut disagreements = Vec::new();
    let mut refused_count = 0;
    for (name, how, plain_refuses) in cases {
        let ca = pki.make(name, how);
        let intermediate = matches!(how, Make::Intermediate(_));
        let explicit = pki.explicit_key();
        let key = match how {
            Make::Intermediate(_) => &pki.intermediate_key,
            Make::ExplicitEc => &explicit,
            _ => &pki.root_key,
        };
        let leaf = pki.leaf(name, &ca, key);
        // A CA that is not self-issued sits in the bundle with its issuer,
        // as a bundle holding an intermediate and its root renders it.
        let mut bundle = std::fs::read_to_string(&ca).expect("ca");
        if intermediate {
            bundle += &std::fs::read_to_string(&pki.root).expect("root");
        }
        let ca_file = write(dir.path(), &format!("{name}-bundle.pem"), &bundle);

        let out = run(&["check", "--json", s(&ca_file)]);
        out.expect_code(0);
        let reports: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        let reasons: Vec<String> = reports[0]["strict"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no strict array: {}", out.stdout))
            .iter()
            .map(|r| r.as_str().expect("reason").to_owned())
            .collect();
        if intermediate {
            assert_eq!(reports[1]["strict"], serde_json::json!([]), "{name}: root");
        }

        let plain = openssl_verify(false, &ca_file, &leaf);
        // Whether plain verification refuses explicit curves depends on
        // OpenSSL's version (3.0 does); -x509_strict always does.
        if *name != "explicit-ec" {
            assert_eq!(
                plain.is_some(),
                *plain_refuses,
                "{name}: plain openssl verify: {plain:?}"
            );
        }
        let strict = openssl_verify(true, &ca_file, &leaf);
        match &strict {
            None if !reasons.is_empty() => disagreements.push(format!(
                "{name}: OpenSSL accepts it, anchorage says {reasons:?}"
            )),
            Some(errors) if reasons.is_empty() => disagreements.push(format!(
                "{name}: OpenSSL refuses it ({errors:?}), anchorage says nothing"
            )),
            Some(errors) => {
                refused_count += 1;
                // The CA is at depth 1, under the leaf.
                let at_ca: Vec<u32> = errors
                    .iter()
                    .filter(|(_, depth)| *depth == 1)
                    .map(|(code, _)| *code)
                    .collect();
                let explained = |code: &u32| reasons.iter().any(|r| codes(r).contains(code));
                if at_ca.is_empty() || !at_ca.iter().all(explained) {
                    disagreements.push(format!(
                        "{name}: OpenSSL's errors {errors:?} are not explained by {reasons:?}"
                    ));
                }
            }
            None => {}
        }
    }
    assert!(
        disagreements.is_empty(),
        "anchorage and openssl verify -x509_strict disagree:\n{}",
        disagreements.join("\n")
    );
    assert_eq!(refused_count, 15, "the crafted defects no longer all fail");
}

#[test]
fn strict_flag_fails_check_and_the_table_marks_the_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let loose = pki.make("Loose Root", &Make::Root("bc_not_critical", "4"));
    let good = pki.make("Good Root", &Make::Root("good", "5"));

    run(&["check", "--strict", s(&good)]).expect_code(0);
    let out = run(&["check", s(&loose)]);
    out.expect_code(0);
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("1  ") && l.contains("CN=Loose Root"))
        .unwrap_or_else(|| panic!("no row:\n{}", out.stdout));
    assert!(row.contains("  yes  REFUSED  "), "{row}");
    assert!(
        out.stdout
            .contains("strict:       REFUSED: basicConstraints not critical"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("REFUSED by a strict verifier") && l.contains("#1")),
        "{}",
        out.stdout
    );

    let out = run(&["check", "--strict", "--json", s(&good), s(&loose)]);
    out.expect_code(1);
    assert!(
        out.stderr.contains("1 CA would be refused"),
        "{}",
        out.stderr
    );
    let reports: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(reports[0]["strict"], serde_json::json!([]));
    assert_eq!(
        reports[1]["strict"],
        serde_json::json!(["basicConstraints not critical"])
    );

    // CA:TRUE whose keyUsage lacks keyCertSign is no CA (OpenSSL agrees):
    // its reasons are shown, and --strict, which counts CAs, passes.
    let signless = pki.make("Signless Root", &Make::Root("ku_no_cert_sign", "6"));
    let out = run(&["check", "--strict", "--json", s(&good), s(&signless)]);
    out.expect_code(0);
    let reports: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
    assert_eq!(reports[1]["is_ca"], serde_json::json!(false));
    assert_ne!(reports[1]["strict"], serde_json::json!([]));
}

#[test]
fn a_metric_counts_the_cas_a_strict_verifier_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let pki = Pki::new(&dir.path().join("pki"));
    for (name, section) in [
        ("Loose", "bc_not_critical"),
        ("No KU", "no_key_usage"),
        ("Fine", "good"),
    ] {
        let ca = pki.make(name, &Make::Root(section, "3"));
        std::fs::copy(&ca, certs.join(format!("{}.pem", name.replace(' ', "-")))).expect("copy");
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let out = dir.path().join("out.pem");
    let daemon = Daemon::start(
        dir.path(),
        &[
            "--source",
            s(&certs),
            "--output",
            s(&out),
            "--listen",
            &listen,
        ],
    );
    let addr: SocketAddr = listen.parse().expect("addr");
    let metric = "anchorage_bundle_strict_refusals{bundle=\"default\"}";
    let value = eventually(Duration::from_secs(15), || {
        let body = http_get(addr, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(metric))
            .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
            .ok_or_else(|| format!("no {metric}:\n{body}"))
    });
    assert_eq!(value, "2", "{}", daemon.log());
    daemon.stop();
}

/// The body of a plain HTTP/1.0 GET; `Err` while nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    Ok(raw
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

fn pem_to_der(pem: &[u8]) -> Vec<u8> {
    crate::support::pem_certs(pem)
        .into_iter()
        .next()
        .expect("a certificate")
}

/// One DER element at the start of `input`: (header + content, content range).
fn element(input: &[u8]) -> (usize, std::ops::Range<usize>) {
    let first = input[1] as usize;
    let (len, start) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        let len = input[2..2 + n]
            .iter()
            .fold(0_usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    (start + len, start..start + len)
}

fn encode(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend(content);
    out
}

/// The certificate's TBS with `edit` applied, and its outer signature
/// algorithm: (tbs, algorithm).
fn edit_tbs(cert: &[u8], edit: Edit) -> (Vec<u8>, Vec<u8>) {
    let (_, body) = element(cert);
    let body = &cert[body];
    let (tbs_len, tbs_content) = element(body);
    let (alg_len, _) = element(&body[tbs_len..]);
    let algorithm = body[tbs_len..tbs_len + alg_len].to_vec();
    let mut fields = Vec::new();
    let mut rest = &body[tbs_content];
    while !rest.is_empty() {
        let (len, _) = element(rest);
        fields.push(rest[..len].to_vec());
        rest = &rest[len..];
    }
    // version [0], serial, signature, issuer, validity, subject, ...
    match edit {
        Edit::Version2 => fields[0] = encode(0xa0, &encode(0x02, &[1])),
        Edit::InnerSignatureAlgorithm => {
            // ecdsa-with-SHA384, 1.2.840.10045.4.3.3
            let oid = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
            fields[2] = encode(0x30, &encode(0x06, &oid));
        }
        Edit::EmptyNames => {
            fields[3] = encode(0x30, &[]);
            fields[5] = encode(0x30, &[]);
        }
    }
    (encode(0x30, &fields.concat()), algorithm)
}

/// Signs `tbs` with `key` (ECDSA with SHA-256, as the outer algorithm
/// says) and assembles the certificate.
fn resign((tbs, algorithm): &(Vec<u8>, Vec<u8>), key: &Path, dir: &Path) -> Vec<u8> {
    let tbs_file = write(dir, "tbs.der", tbs);
    let sig_file = dir.join("tbs.sig");
    sh(&format!(
        "openssl dgst -sha256 -sign {} -out {} {}",
        s(key),
        s(&sig_file),
        s(&tbs_file)
    ));
    let mut bits = vec![0];
    bits.extend(std::fs::read(&sig_file).expect("signature"));
    encode(
        0x30,
        &[tbs.clone(), algorithm.clone(), encode(0x03, &bits)].concat(),
    )
}
