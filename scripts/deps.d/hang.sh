# shellcheck shell=bash
# tests/integration/hang.rs: a FUSE filesystem whose reads never return,
# standing in for a hung network filesystem (guarantee 10). Debian's
# python3-fusepy runs under Debian's own /usr/bin/python3.
[ -e /usr/lib/python3/dist-packages/fusepy.py ] || apt_pkgs+=(python3-fusepy)
apt_needs fusermount3 fuse3
