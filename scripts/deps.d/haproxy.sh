# tests/integration/e2e/haproxy.rs: a real HAProxy (Debian installs it in
# /usr/sbin, often not on a non-root PATH) in master-worker mode, reloaded
# by SIGUSR2 to its master.
[ -x /usr/sbin/haproxy ] || command -v haproxy >/dev/null 2>&1 || apt_pkgs+=(haproxy)
