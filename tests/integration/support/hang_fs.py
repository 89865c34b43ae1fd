"""A FUSE filesystem whose file reads never return: a hung NFS server.

Usage: hang_fs.py MOUNTPOINT READY_FILE
Serves ca.pem (and any other NAME.pem asked for by name), whose stat and
open answer at once but whose read blocks until the filesystem is
unmounted; any lookup of a name under /stuck blocks too (a server that
stopped answering even stat). Writes READY_FILE once mounted.
"""
import errno
import os
import stat
import sys
import threading

try:
    from fusepy import FUSE, FuseOSError, Operations
except ImportError:  # the PyPI package names its module `fuse`
    from fuse import FUSE, FuseOSError, Operations

mountpoint, ready = sys.argv[1:3]
forever = threading.Event()


class Hanging(Operations):
    def getattr(self, path, fh=None):
        if path == "/stuck" or path.startswith("/stuck/"):
            forever.wait()
        if path == "/":
            return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2)
        if path.endswith(".pem") and path.count("/") == 1:
            return dict(st_mode=stat.S_IFREG | 0o644, st_nlink=1, st_size=1200)
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "ca.pem"]

    def open(self, path, flags):
        return 0

    def read(self, path, size, offset, fh):
        forever.wait()
        return b""

    def init(self, path):
        with open(ready, "w") as f:
            f.write(str(os.getpid()))


FUSE(Hanging(), mountpoint, foreground=True, nothreads=False, allow_other=True)
