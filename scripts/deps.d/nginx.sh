# tests/integration/e2e/nginx.rs: a real nginx (Debian installs it in
# /usr/sbin, often not on a non-root PATH) reloaded by SIGHUP to its master.
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || apt_pkgs+=(nginx-light)
