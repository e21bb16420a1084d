#!/usr/bin/env bash
# Install what pacsvault needs on a Debian machine, as root: Debian packages when missing,
# then the Python package into ./.venv. Safe to run again: it only adds what is missing.
#   scripts/install.sh          runtime only
#   scripts/install.sh --test   also dcmtk (real DICOM peers), PostgreSQL and SeaweedFS (the
#                               scale-out tests' real components) and the test/lint tools
#   scripts/install.sh --service  then 'pacsvault service install' (system user, /var/lib/
#                               pacsvault, /etc/pacsvault, hardened systemd unit, started)
#
# It says what it does as it goes (issue 12, defect 9: the first scripts/serve.sh used to
# print nothing for two minutes): one line per step with the elapsed time, the Debian
# packages downloaded and set up, the Python packages collected, then the viewer.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
step_no=0
steps=3
# One progress line on stderr: [n/3 +12s] what.
step() {
  step_no=$((step_no + 1))
  printf '[%d/%d +%ds] %s\n' "$step_no" "$steps" "$((SECONDS - started))" "$*" >&2
}
# Indented detail lines under a step (sed, not grep: it never fails the pipeline on
# "no match", so pipefail still reports the installer's own failure).
detail() { sed -u "s/^/      /" >&2; }

with_tests=0
with_service=0
[ "${1:-}" = "--test" ] && with_tests=1
[ "${1:-}" = "--service" ] && with_service=1

apt_wanted=()
command -v python3 >/dev/null 2>&1 || apt_wanted+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_wanted+=(python3-venv)
# the backup engine (pacsvault backup, restore drills; the backup tests use it too)
command -v restic >/dev/null 2>&1 || apt_wanted+=(restic)
# WeasyPrint's text layout and a font (the PDF documents of the breach register, art. 30)
# (grep reads all of ldconfig's output: with -q it stops early, ldconfig may then die of
# SIGPIPE and, under pipefail, the library reads as missing)
ldconfig -p 2>/dev/null | grep 'libpangoft2-1.0.so.0' >/dev/null || apt_wanted+=(libpango-1.0-0 libpangoft2-1.0-0)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || apt_wanted+=(fonts-dejavu-core)
if [ "$with_tests" = 1 ]; then
  # dcmtk's own binaries (pynetdicom ships Python scripts with the same names).
  [ -x /usr/bin/storescu ] || apt_wanted+=(dcmtk)
  # GDCM's gdcmscu: a third sender for the C-STORE receive path's conformance test
  [ -x /usr/bin/gdcmscu ] || apt_wanted+=(libgdcm-tools)
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
  # the real PostgreSQL of the scale-out tests (scripts/postgres.sh runs its own throwaway
  # cluster with these binaries; SeaweedFS, psycopg and boto3 come with the [test] extra)
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || apt_wanted+=(postgresql)
  # a real load balancer sending the PROXY protocol (tests/test_proxy_protocol.py)
  [ -x /usr/sbin/haproxy ] || apt_wanted+=(haproxy)
  # the outside host of the security check's network test lives in a network namespace
  # (tests/test_check_network.py: unshare -n, ip addr)
  command -v ip >/dev/null 2>&1 || apt_wanted+=(iproute2)
  command -v unshare >/dev/null 2>&1 || apt_wanted+=(util-linux)
fi
[ "$with_service" = 1 ] && steps=4
if [ ${#apt_wanted[@]} -gt 0 ]; then
  step "Debian packages: ${apt_wanted[*]} (apt-get update, then install; a minute or more)"
  apt-get update -qq
  # apt's own lines, reduced to one per package downloaded and per package set up
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${apt_wanted[@]}" \
    | sed -un -E 's/^Get:[0-9]+ [^ ]+ [^ ]+ [^ ]+ ([^ ]+) [^ ]+ ([^ ]+) .*/download \1 \2/p;
                  s/^Setting up ([^ ]+) .*/set up \1/p' | detail
else
  step "Debian packages: nothing missing"
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"pacsvault needs Python >= 3.11, this is {sys.version.split()[0]}")
PY

if [ -x .venv/bin/python ]; then
  step "Python environment: $(pwd)/.venv (exists), checking its packages"
else
  step "Python environment: creating $(pwd)/.venv and installing the Python packages"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
extra=""
[ "$with_tests" = 1 ] && extra="[test]"
# pip's stdout, one line per package collected and the final summary (errors: stderr, as is)
.venv/bin/python -m pip install --disable-pip-version-check --progress-bar off \
    -e ".${extra}" \
  | sed -un -E 's/^Collecting ([^ ]+).*/collect \1/p;
                s/^Installing collected packages: (.*)/installing: \1/p;
                s/^(Successfully installed .*)/\1/p' | detail

# The OHIF web viewer: a pinned release, checked against its integrity hash, trimmed and
# cached (nothing of it is in the repository). Kept as is when already there.
step "OHIF web viewer: download (about 200 MB the first time), check its pinned hash, trim"
.venv/bin/pacsvault viewer install

if [ "$with_service" = 1 ]; then
  step "System service: user, /var/lib/pacsvault, /etc/pacsvault, systemd unit"
  .venv/bin/pacsvault service install
fi
printf '[done +%ds] pacsvault is installed in %s/.venv\n' "$((SECONDS - started))" "$(pwd)" >&2
