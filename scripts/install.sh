#!/usr/bin/env bash
# Install what pacsvault needs on a Debian machine, as root: Debian packages when missing,
# then the Python package into ./.venv. Safe to run again: it only adds what is missing.
#   scripts/install.sh          runtime only
#   scripts/install.sh --test   also dcmtk (real DICOM peers) and the test/lint tools
#   scripts/install.sh --service  then 'pacsvault service install' (system user, /var/lib/
#                               pacsvault, /etc/pacsvault, hardened systemd unit, started)
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
with_service=0
[ "${1:-}" = "--test" ] && with_tests=1
[ "${1:-}" = "--service" ] && with_service=1

apt_wanted=()
command -v python3 >/dev/null 2>&1 || apt_wanted+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_wanted+=(python3-venv)
if [ "$with_tests" = 1 ]; then
  # dcmtk's own binaries (pynetdicom ships Python scripts with the same names).
  [ -x /usr/bin/storescu ] || apt_wanted+=(dcmtk)
  command -v openssl >/dev/null 2>&1 || apt_wanted+=(openssl)
  # a real TLS syslog collector (RFC 5425) for the audit export tests
  [ -x /usr/sbin/rsyslogd ] || apt_wanted+=(rsyslog)
  dpkg -s rsyslog-gnutls >/dev/null 2>&1 || apt_wanted+=(rsyslog-gnutls)
  # TLS scanner for the HTTPS listener's protocol/suite test
  command -v sslscan >/dev/null 2>&1 || apt_wanted+=(sslscan)
  # a real browser for the web tests (driven by Playwright; no browser download)
  [ -x /usr/lib/chromium/chromium ] || apt_wanted+=(chromium)
  # the peer of the side-by-side benchmark (bench --small runs in the suite)
  command -v Orthanc >/dev/null 2>&1 || apt_wanted+=(orthanc)
  dpkg -s orthanc-dicomweb >/dev/null 2>&1 || apt_wanted+=(orthanc-dicomweb)
  # the benchmark counts each server's fsync-like calls per stored image
  command -v strace >/dev/null 2>&1 || apt_wanted+=(strace)
  # certutil: the browser test trusting the vault CA in Chromium's NSS store
  command -v certutil >/dev/null 2>&1 || apt_wanted+=(libnss3-tools)
fi
if [ ${#apt_wanted[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${apt_wanted[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_wanted[@]}" >/dev/null
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"pacsvault needs Python >= 3.11, this is {sys.version.split()[0]}")
PY

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if [ "$with_tests" = 1 ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi

# The OHIF web viewer: a pinned release, checked against its integrity hash, trimmed and
# cached (nothing of it is in the repository). Kept as is when already there.
.venv/bin/pacsvault viewer install

if [ "$with_service" = 1 ]; then
  .venv/bin/pacsvault service install
fi
