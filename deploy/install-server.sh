#!/usr/bin/env bash
# Install, or upgrade, the broker (mosquitto with TLS), the cache (Redis with a password) and the
# side server on a Debian/Ubuntu host. As root:
#
#   deploy/install-server.sh [--hostname NAME]... [options] SRC
#
# SRC is the sidetune source folder (this repository). A first run makes the broker folder
# /etc/sidetune/broker with `sidetune broker init` (CA, server certificate for every --hostname,
# accounts, configuration), puts its conf.d fragment into Debian's mosquitto and its redis.conf
# into Debian's Redis, installs /etc/sidetune/server.toml and the units sidetune-server@.service
# and sidetune-dashboard.service.
# A later run is an upgrade: the package is reinstalled, the broker's configuration re-rendered
# (certificates and passwords kept) and the services restarted.
#
# Options:
#   --hostname NAME   a name or address boards use for the broker (repeatable; first install only)
#   --tls-port N, --plain-port N, --redis-port N, --bind ADDR   passed to `sidetune broker init`
#                     (defaults 8883, 1883 on 127.0.0.1 only, 6379, TLS on 0.0.0.0; first install only)
#   --broker-user U   the user mosquitto runs as (default mosquitto; under --root, the caller)
#   --root DIR        install under DIR (for tests): no apt-get, no systemctl, no users or chown;
#                     the broker's files are the caller's
#   --venv PATH       use this existing virtualenv (sidetune[server] installed in it) instead of
#                     creating /opt/sidetune/.venv; it is linked there
# Environment: SIDETUNE_TORCH_INDEX=URL installs torch from that index (e.g. PyTorch's CPU-only
# wheel index, where it is reachable); by default torch==2.13.0 comes from the configured index.
set -euo pipefail
umask 022   # folders others must traverse (mosquitto's user, the agent's); secrets get explicit modes

PROG=install-server.sh
# shellcheck source=deploy/host-checks.sh
. "$(dirname "$0")/host-checks.sh"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

ROOT="" VENV="" SRC="" BROKER_USER="" HOSTS=() PORTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
    --venv) VENV=${2:?--venv needs a folder}; shift 2 ;;
    --hostname) HOSTS+=(--hostname "${2:?--hostname needs a name}"); shift 2 ;;
    --broker-user) BROKER_USER=${2:?--broker-user needs a user}; shift 2 ;;
    --tls-port|--plain-port|--redis-port|--bind) PORTS+=("$1" "${2:?$1 needs a port}"); shift 2 ;;
    -h|--help) usage ;;
    -*) echo "install-server.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$SRC" ] || usage; SRC=$1; shift ;;
  esac
done
resolve_paths broker_config

# --- what this host is -----------------------------------------------------------------------
check_os
check_arch "the server (torch's CPU wheels)" x86_64 aarch64

# --- system packages and the service user (not under --root) --------------------------------
if [ -z "$ROOT" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto redis-server openssl python3-venv >/dev/null
  id sidetune >/dev/null 2>&1 || useradd --system --home /var/lib/sidetune --shell /usr/sbin/nologin sidetune
fi

# --- the package ------------------------------------------------------------------------------
OPT=$ROOT/opt/sidetune
mkdir -p "$OPT" "$ROOT/etc/sidetune" "$ROOT/var/lib/sidetune"
if [ -n "$VENV" ]; then
  VENV=$(cd "$VENV" && pwd) || die "no virtualenv $VENV"
  [ -x "$VENV/bin/sidetune" ] || die "--venv $VENV has no bin/sidetune: pip install '$SRC[server]' into it first"
  check_python "$VENV/bin/python"
  if [ "$VENV" != "$OPT/.venv" ]; then
    [ ! -e "$OPT/.venv" ] || [ -L "$OPT/.venv" ] || die "$OPT/.venv exists and is not a link: drop --venv"
    ln -sfn "$VENV" "$OPT/.venv"
  fi
else
  check_python python3
  [ -x "$OPT/.venv/bin/python" ] || python3 -m venv "$OPT/.venv"
  pip=("$OPT/.venv/bin/python" -m pip install -q)
  "${pip[@]}" --upgrade pip
  # torch first, pinned: the server trains on the CPU.
  "${pip[@]}" ${SIDETUNE_TORCH_INDEX:+--index-url "$SIDETUNE_TORCH_INDEX"} "torch==2.13.0"
  "${pip[@]}" "$SRC[server]"
  "${pip[@]}" --no-deps --force-reinstall "$SRC"   # an upgrade that kept the version number
fi
SIDETUNE=$OPT/.venv/bin/sidetune

# --- the broker folder ------------------------------------------------------------------------
BROKER=$ROOT/etc/sidetune/broker
# the templates (a pip install does not carry them): beside the virtualenv, where `sidetune broker` finds them
rm -rf "$OPT/broker_config" && cp -r "$SRC/broker_config" "$OPT/broker_config"
export SIDETUNE_BROKER_CONFIG=$OPT/broker_config
UPGRADE=0
if [ -f "$BROKER/broker.json" ]; then
  UPGRADE=1
  [ ${#HOSTS[@]} -eq 0 ] && [ ${#PORTS[@]} -eq 0 ] || echo "install-server.sh: $BROKER exists: --hostname and ports ignored (sidetune broker init --force replaces the broker)" >&2
  # its "restart ... to apply" is this script's own job (below), not the operator's
  "$SIDETUNE" broker refresh --dir "$BROKER" | sed '/^certificates and passwords unchanged; restart/d'
  echo "certificates and passwords unchanged"
else
  if [ -z "$BROKER_USER" ]; then
    BROKER_USER=mosquitto
    [ -z "$ROOT" ] || BROKER_USER=$(id -un)
  fi
  # its "next steps" (the fragment, Redis's include, the restarts) are what this script does next
  "$SIDETUNE" broker init "$BROKER" --user "$BROKER_USER" "${HOSTS[@]}" "${PORTS[@]}" | sed '/^next steps:/,$d'
fi

# mosquitto: the fragment under Debian's stock /etc/mosquitto/mosquitto.conf
install -D -m 0644 "$BROKER/conf.d/sidetune.conf" "$ROOT/etc/mosquitto/conf.d/sidetune.conf"
# Redis: redis.conf (cache settings, port, requirepass) included by Debian's redis.conf
install -D -m 0640 "$BROKER/redis.conf" "$ROOT/etc/redis/sidetune.conf"
if [ -f "$ROOT/etc/redis/redis.conf" ]; then
  grep -qx "include /etc/redis/sidetune.conf" "$ROOT/etc/redis/redis.conf" \
    || echo "include /etc/redis/sidetune.conf" >> "$ROOT/etc/redis/redis.conf"
fi
# the side server
SERVER_TOML=$ROOT/etc/sidetune/server.toml
[ -f "$SERVER_TOML" ] || install -m 0644 "$BROKER/server.toml" "$SERVER_TOML"
# An installed server.toml from before the secret share group: mosquitto lets any account join a
# $share group it can name, so the workers' group must be the broker folder's generated one.
if ! grep -q '^[[:space:]]*share_group[[:space:]]*=' "$SERVER_TOML"; then
  { echo "# added by install-server.sh: the workers' secret share group (from $BROKER/server.toml)"
    grep '^share_group = ' "$BROKER/server.toml"
    cat "$SERVER_TOML"; } > "$SERVER_TOML.new" && mv "$SERVER_TOML.new" "$SERVER_TOML"
  echo "install-server.sh: $SERVER_TOML: added the secret share_group of $BROKER/server.toml"
elif grep -q '^[[:space:]]*share_group[[:space:]]*=[[:space:]]*"workers"' "$SERVER_TOML"; then
  echo "install-server.sh: warning: $SERVER_TOML uses the share group \"workers\": any board can join it and take" \
       "a share of every board's uplinks; use the secret one of $BROKER/server.toml" >&2
fi
install -D -m 0644 "$SRC/deploy/sidetune-server@.service" "$ROOT/etc/systemd/system/sidetune-server@.service"
install -D -m 0644 "$SRC/deploy/sidetune-dashboard.service" "$ROOT/etc/systemd/system/sidetune-dashboard.service"

if [ -n "$ROOT" ]; then
  echo "installed under $ROOT (no services started)"
  exit 0
fi

# --- ownership and services (a real install) -------------------------------------------------
chgrp redis /etc/redis/sidetune.conf
chown sidetune:sidetune "$BROKER/server.password" "$BROKER/redis.password"   # the workers read them (0600)
chown sidetune:sidetune /var/lib/sidetune && chmod 0700 /var/lib/sidetune
systemctl daemon-reload
systemctl enable -q mosquitto redis-server
systemctl restart mosquitto redis-server
if [ "$UPGRADE" = 1 ]; then
  systemctl try-restart 'sidetune-server@*.service' sidetune-dashboard.service
  echo "upgraded: mosquitto, redis-server, the running sidetune-server@ workers and the dashboard restarted"
else
  cat <<MSG
installed. Start two workers:   systemctl enable --now sidetune-server@1 sidetune-server@2
The dashboard (127.0.0.1:8470): systemctl enable --now sidetune-dashboard
Add a board:                    $SIDETUNE broker add-device BOARD_ID --dir $BROKER
MSG
fi
