"""A stand-in for an application that reloads its own key pair on SIGHUP,
as nginx does: it opens DIR/tls.crt and DIR/tls.key by their visible names.

Usage: pair_app.py PID_FILE DIR LOG
Writes its pid to PID_FILE; on every SIGHUP loads the pair with Python's
ssl module (which refuses a key that does not match the certificate) and
appends one line to LOG: "ok <sha256 of the leaf DER> <mode of tls.key>"
or "mismatch <reason>".
"""
import hashlib
import os
import signal
import ssl
import stat
import sys

pid_file, pair_dir, log = sys.argv[1:4]
crt = os.path.join(pair_dir, "tls.crt")
key = os.path.join(pair_dir, "tls.key")


def on_hup(_sig, _frame):
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        with open(crt) as f:
            text = f.read()
        end = "-----END CERTIFICATE-----"
        leaf = ssl.PEM_cert_to_DER_cert(text[: text.index(end) + len(end)] + "\n")
        mode = stat.S_IMODE(os.stat(key).st_mode)
        line = "ok %s %o\n" % (hashlib.sha256(leaf).hexdigest(), mode)
    except (OSError, ssl.SSLError, ValueError) as e:
        line = "mismatch %s\n" % str(e).replace("\n", " ")
    with open(log, "a") as f:
        f.write(line)


signal.signal(signal.SIGHUP, on_hup)
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(pid_file + ".tmp", pid_file)
while True:
    signal.pause()
