# tests/integration/e2e/caddy.rs: a real Caddy, reloaded through its admin
# API by `caddy reload --force`. (Where systemd runs, Debian's package also
# starts a caddy.service on :80; the tests use ports of their own.)
apt_needs caddy caddy
