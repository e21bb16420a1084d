#!/usr/bin/env bash
# Install if needed, then run pacsvault. Extra arguments go to 'pacsvault serve'.
#
# As root (a fresh Debian machine): the server never runs as root. This installs the
# service layout ('pacsvault service install': system user 'pacsvault', data in
# /var/lib/pacsvault, settings and key in /etc/pacsvault) and starts it with systemd when
# systemd runs; otherwise (a container) it runs the server in the foreground as that user.
# The first run writes the recovery code and the first administrator's password to a file
# readable by root only (its path is printed), never to the screen log.
#
# As another user (development): the vault is $PACSVAULT_DATA, else ./pacsvault-data,
# passed explicitly with --data (pacsvault itself never picks the working directory).
set -euo pipefail
cd "$(dirname "$0")/.."
here="$(pwd -P)"

if [ "$(id -u)" != 0 ]; then
  scripts/install.sh
  data="${PACSVAULT_DATA:-$here/pacsvault-data}"
  echo "pacsvault: data directory $data" >&2
  exec .venv/bin/pacsvault serve --data "$data" "$@"
fi

service_user="${PACSVAULT_USER:-pacsvault}"

# A vault made by an earlier version of this script (in ./pacsvault-data): never create a
# second one beside it.
if [ -f "$here/pacsvault-data/vault.json" ] && [ ! -f /etc/pacsvault/pacsvault.toml ]; then
  echo "pacsvault: a vault from an earlier version is in $here/pacsvault-data, so no new" \
    "one is created. Keep serving it with: .venv/bin/pacsvault serve --data" \
    "$here/pacsvault-data --allow-root (as root: development only), or move it to the" \
    "service layout (see README, 'Production: a system service')." >&2
  exit 1
fi

scripts/install.sh
# The service user must be able to run the program: not the case under /root or a home
# directory (mode 0700). Then install a copy in /opt/pacsvault and continue from there.
if ! runuser -u nobody -- "$here/.venv/bin/python" -c 'import pacsvault' 2>/dev/null; then
  target=/opt/pacsvault
  if [ "$here" = "$target" ]; then
    echo "pacsvault: $here is not readable by other users; fix its permissions" >&2
    exit 1
  fi
  echo "pacsvault: $here cannot be read by the service user; installing a copy in $target" >&2
  mkdir -p "$target"
  tar -C "$here" --exclude=./.venv --exclude=./pacsvault-data --exclude=./test-output \
    -cf - . | tar -C "$target" -xf -
  chmod 755 "$target"
  # Debian's python3 first: an interpreter under /root (pyenv) is unreadable as well.
  exec env PATH="/usr/bin:/bin:$PATH" "$target/scripts/serve.sh" "$@"
fi

echo "pacsvault: setting up the service (user $service_user)" >&2
.venv/bin/pacsvault service install --user "$service_user"

if [ -d /run/systemd/system ]; then
  [ $# -gt 0 ] && echo "pacsvault: arguments ignored under systemd: $*" \
    "(edit /var/lib/pacsvault/pacsvault.toml, then systemctl restart pacsvault)" >&2
  echo "pacsvault runs as a system service: 'systemctl status pacsvault'," \
    "logs: 'journalctl -u pacsvault -f'." >&2
  exit 0
fi
# No systemd (a container): the server in the foreground, as the service user.
echo "pacsvault: systemd is not running; serving in the foreground as $service_user" \
  "(Ctrl-C stops it)" >&2
exec runuser -u "$service_user" -- env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
  PACSVAULT_CONFIG=/etc/pacsvault/pacsvault.toml XDG_CACHE_HOME="/var/cache/$service_user" \
  "$here/.venv/bin/python" -m pacsvault serve "$@"
