"""A stand-in for an application that reloads its trust on SIGHUP.

Usage: hup_app.py PID_FILE BUNDLE LOG
Writes its pid to PID_FILE; on every SIGHUP reads BUNDLE and appends one
line "<sha256 of what it read> <bytes>" to LOG.
"""
import hashlib
import os
import signal
import sys

pid_file, bundle, log = sys.argv[1:4]


def on_hup(_sig, _frame):
    try:
        with open(bundle, "rb") as f:
            data = f.read()
        line = "%s %d\n" % (hashlib.sha256(data).hexdigest(), len(data))
    except OSError as e:
        line = "unreadable %s\n" % e.errno
    with open(log, "a") as f:
        f.write(line)


signal.signal(signal.SIGHUP, on_hup)
with open(pid_file + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(pid_file + ".tmp", pid_file)
while True:
    signal.pause()
