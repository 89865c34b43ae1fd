#!/usr/bin/env python3
"""Seed corpora for the fuzz targets, made from what the tests and the
machine already have, so the repository carries no binary seeds.

  source        certificates (the system's CAs and a few made with openssl)
                in every form a source file takes: PEM with text around and
                CRLF, TRUSTED CERTIFICATE, DER, beside a private key, and
                damaged the ways the tests damage them
  config        the TOML of the README, the examples and the config tests
  subject_hash  the subject and issuer Names (DER) of those certificates,
                and hand-made names with every string type OpenSSL maps
  spiffe        SPIFFE bundles (JWK Sets) of those certificates, with JWT
                keys beside them, and damaged the ways the tests damage them
                (also seeds for source, which reads them too)

Usage: seeds.py CORPUS_DIR   (writes CORPUS_DIR/<target>/<sha1>)
"""

import base64
import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Enough variety to start from; libFuzzer finds the rest.
MAX_SYSTEM_CAS = 40


def put(corpus, target, data):
    if isinstance(data, str):
        data = data.encode()
    directory = os.path.join(corpus, target)
    os.makedirs(directory, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def pem(label, der):
    body = base64.b64encode(der).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def pem_bodies(text):
    for m in re.finditer(
        r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S
    ):
        yield base64.b64decode("".join(m.group(1).split()))


# ---- a minimal DER walker: enough to find a certificate's names ----


def tlv(der, i):
    """(tag, content start, content length) of the element at i."""
    tag = der[i]
    i += 1
    length = der[i]
    i += 1
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(der[i : i + n], "big")
        i += n
    return tag, i, length


def names(cert):
    """The issuer and subject Names of a DER certificate."""
    _, tbs_outer, _ = tlv(cert, 0)
    _, k, _ = tlv(cert, tbs_outer)
    tag, c, n = tlv(cert, k)
    if tag == 0xA0:  # explicit version
        k = c + n
    found = {}
    # serial, signature algorithm, issuer, validity, subject
    for field in ("serial", "algorithm", "issuer", "validity", "subject"):
        tag, c, n = tlv(cert, k)
        found[field] = cert[k : c + n]
        k = c + n
    return found["issuer"], found["subject"]


# ---- certificates ----


def openssl(*args, **kw):
    return subprocess.run(
        ["openssl", *args], check=True, capture_output=True, **kw
    ).stdout


def made_with_openssl(tmp):
    """A few certificates whose names use the string types OpenSSL maps."""
    made = []
    key = os.path.join(tmp, "key.pem")
    try:
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    except (OSError, subprocess.CalledProcessError):
        return made, None
    subjects = [
        ("/CN=Fuzz Root/O=Anchorage  Tests/C=DE", ["-utf8"]),
        ("/CN=  Spaced   Out  CA /OU=a/OU=b", []),
        ("/CN=Multi+OU=Valued/O=RDN", ["-multivalue-rdn"]),
        ("/CN=Ünïcödé Wurzel/O=Zertifikate", ["-utf8"]),
        ("/CN=printable/emailAddress=ca@example.org", []),
    ]
    for i, (subject, extra) in enumerate(subjects):
        out = os.path.join(tmp, "c%d.pem" % i)
        try:
            openssl(
                "req", "-x509", "-new", "-key", key, "-days", "365", "-subj", subject,
                "-addext", "basicConstraints=critical,CA:TRUE", "-out", out, *extra,
            )
        except subprocess.CalledProcessError:
            continue
        with open(out) as f:
            made.extend(pem_bodies(f.read()))
    for mask in ("nombstr", "pkix", "default"):
        out = os.path.join(tmp, "m-%s.pem" % mask)
        try:
            config = os.path.join(tmp, "mask.cnf")
            with open(config, "w") as f:
                f.write("[req]\nstring_mask = %s\ndistinguished_name = dn\n[dn]\n" % mask)
            openssl(
                "req", "-x509", "-new", "-key", key, "-days", "30", "-config", config,
                "-subj", "/CN=Mask %s/O=T61 and BMP" % mask, "-out", out,
            )
            with open(out) as f:
                made.extend(pem_bodies(f.read()))
        except subprocess.CalledProcessError:
            pass
    trusted = None
    if made:
        first = os.path.join(tmp, "c0.pem")
        try:
            trusted = openssl(
                "x509", "-in", first, "-trustout", "-addtrust", "serverAuth"
            ).decode()
        except subprocess.CalledProcessError:
            pass
    return made, trusted


def system_cas():
    found = []
    for path in sorted(glob.glob("/etc/ssl/certs/*.pem"))[:MAX_SYSTEM_CAS]:
        try:
            with open(path) as f:
                found.extend(pem_bodies(f.read()))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
    return found


def source_seeds(corpus, certs, trusted):
    put(corpus, "source", "")
    put(corpus, "source", " \n\t\r\n")
    put(corpus, "source", b"\x30\x03\x02\x01\x01")
    key = pem("PRIVATE KEY", bytes(range(48)))
    for der in certs[:12]:
        text = pem("CERTIFICATE", der)
        put(corpus, "source", text)
        put(corpus, "source", der)
        put(corpus, "source", "subject=whoever\nissuer=whoever\n" + text + "trailing text\n")
        put(corpus, "source", text.replace("\n", "\r\n"))
        put(corpus, "source", key + text)
        put(corpus, "source", pem("X509 CERTIFICATE", der))
        # Damaged: truncated, bad base64, a mismatched END.
        put(corpus, "source", text[: len(text) // 2])
        put(corpus, "source", text.replace("A", "*", 1))
        put(corpus, "source", text.replace("END CERTIFICATE", "END X509 CRL"))
    if len(certs) >= 3:
        put(corpus, "source", "".join(pem("CERTIFICATE", d) for d in certs[:3]))
    if trusted:
        put(corpus, "source", trusted)


def subject_seeds(corpus, certs):
    seen = set()
    for der in certs:
        try:
            for name in names(der):
                if name not in seen:
                    seen.add(name)
                    put(corpus, "subject_hash", name)
        except (IndexError, ValueError):
            continue

    def el(tag, content):
        n = len(content)
        if n < 0x80:
            head = bytes([tag, n])
        else:
            raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
            head = bytes([tag, 0x80 | len(raw)]) + raw
        return head + content

    cn = el(0x06, b"\x55\x04\x03")
    ou = el(0x06, b"\x55\x04\x0b")

    def name(*rdns):
        return el(0x30, b"".join(el(0x31, b"".join(el(0x30, oid + v) for oid, v in rdn)) for rdn in rdns))

    put(corpus, "subject_hash", b"\x30\x00")
    for value in (
        el(0x0C, "  Mixed   CASE\tname ".encode()),
        el(0x13, b"Printable"),
        el(0x14, b"T61 \xe9t\xe9"),
        el(0x16, b"ia5@example.org"),
        el(0x1E, "BMP ü".encode("utf-16-be")),
        el(0x1C, "Universal ü".encode("utf-32-be")),
        el(0x12, b"12345"),
        el(0x1A, b"Visible"),
        el(0x03, b"\x03\xa8"),
        el(0x34, el(0x04, b"BER ") + el(0x04, b"segments")),
    ):
        put(corpus, "subject_hash", name([(cn, value)]))
    put(corpus, "subject_hash", name([(cn, el(0x0C, b"b")), (ou, el(0x0C, b"a"))], []))


def spiffe_seeds(corpus, certs):
    import json

    def bundle(ders, extra=None, **top):
        keys = [{"use": "x509-svid", "kty": "EC", "x5c": [base64.b64encode(d).decode()]} for d in ders]
        keys += extra or []
        doc = {"keys": keys, "spiffe_sequence": 7, "spiffe_refresh_hint": 300}
        doc.update(top)
        return json.dumps(doc, indent=2)

    jwt = {"use": "jwt-svid", "kty": "EC", "kid": "k1", "crv": "P-256", "x": "AAAA", "y": "BBBB"}
    seeds = ['{"keys": []}', "{}", '{"keys": {}}', '{"keys": [1]}', "{", '{"keys": [{"use": "x509-svid"}]}']
    for der in certs[:6]:
        seeds.append(bundle([der]))
        seeds.append(bundle([der], [jwt]))
        seeds.append("\ufeff" + bundle([der]))
        text = bundle([der])
        seeds.append(text.replace('"x5c": [\n        "', '"x5c": [\n        "*'))
        seeds.append(text[: len(text) // 2])
    if len(certs) >= 3:
        seeds.append(bundle(certs[:3], [jwt]))
        seeds.append(json.dumps({"keys": [{"use": "x509-svid", "x5c": [base64.b64encode(d).decode() for d in certs[:3]]}]}))
    for text in seeds:
        put(corpus, "spiffe", text)
        put(corpus, "source", text)


def config_seeds(corpus):
    texts = []
    with open(os.path.join(ROOT, "README.md")) as f:
        texts.extend(re.findall(r"```toml\n(.*?)```", f.read(), re.S))
    for path in glob.glob(os.path.join(ROOT, "**", "*.toml"), recursive=True):
        if "/target/" in path or "/fuzz/" in path or path.endswith("Cargo.toml"):
            continue
        with open(path) as f:
            texts.append(f.read())
    # The TOML the config tests write: Rust string literals holding a table.
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "*.rs"), recursive=True):
        with open(path) as f:
            for literal in re.findall(r'"((?:[^"\\]|\\.)*\[\[?(?:bundle|daemon|keypair)(?:[^"\\]|\\.)*)"', f.read()):
                try:
                    texts.append(literal.encode().decode("unicode_escape"))
                except UnicodeDecodeError:
                    continue
    texts.append(
        '[daemon]\ndebounce = "0"\ndebounce_max = "2s"\nresync = "0"\npoll = "1s"\n'
        'listen = "127.0.0.1:9102"\nlog_format = "json"\nstate_dir = "/var/lib/a"\n'
        '[[bundle]]\nname = "b"\nsources = ["/a", "/b/*.pem"]\nretain_removed = "72h"\n'
        'verify = ["/c.crt"]\nmin_certs = 2\nallow_expired = true\nallow_non_ca = false\n'
        '[[bundle.output]]\npath = "/o.p12"\nformat = "pkcs12"\npassword = "x"\nmode = "0600"\n'
        '[[bundle.reload]]\nhttp = "http://127.0.0.1:1/r"\nmethod = "PUT"\nretries = 3\n'
        'timeout = "1s"\nprobe = "http://127.0.0.1:1/p"\n'
        '[[keypair]]\nname = "k"\ncert = "/t.crt"\nkey = "/t.key"\nchain_to = "b"\n'
        '[[keypair.reload]]\nsignal = "USR1"\nprocess = "nginx"\nprobe = "127.0.0.1:8443"\n'
        'probe_timeout = "10s"\n'
    )
    for text in texts:
        put(corpus, "config", text)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    corpus = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        made, trusted = made_with_openssl(tmp)
    certs = made + system_cas()
    source_seeds(corpus, certs, trusted)
    subject_seeds(corpus, certs)
    spiffe_seeds(corpus, certs)
    config_seeds(corpus)
    for target in ("source", "config", "subject_hash", "spiffe"):
        count = len(os.listdir(os.path.join(corpus, target)))
        print("%s: %d seeds" % (target, count))


if __name__ == "__main__":
    main()
