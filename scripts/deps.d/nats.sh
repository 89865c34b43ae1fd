# tests/integration/e2e/nats.rs: a real nats-server (Debian installs it in
# /usr/sbin, often not on a non-root PATH) reloaded by SIGHUP.
[ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null 2>&1 || apt_pkgs+=(nats-server)
