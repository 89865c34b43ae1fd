# shellcheck shell=bash
# tests/integration/e2e/erlang.rs and scripts/erlang-reload: Erlang/OTP nodes
# (erl, erlc, epmd) that speak TLS, over the ssl application and the
# applications it needs. Those are library packages with no command of their
# own: look for their directories in the OTP tree instead.
apt_needs erl erlang-base
apt_needs erlc erlang-base
apt_needs epmd erlang-base
for app in ssl crypto public_key asn1; do
    compgen -G "/usr/lib/erlang/lib/${app}-*" >/dev/null || apt_pkgs+=("erlang-${app//_/-}")
done
