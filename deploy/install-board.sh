#!/usr/bin/env bash
# Install, or upgrade, the edge agent on a board (Debian, Ubuntu, Raspberry Pi OS, JetPack). As root:
#
#   deploy/install-board.sh --bundle BUNDLE [options] SRC
#
# SRC is the sidetune source folder; BUNDLE is the board's folder written on the server by
# `sidetune broker add-device ID --dir /etc/sidetune/broker` (edge.toml, ca.crt, edge.password),
# copied to the board. Installs the `edge` extra only (no torch) into /opt/sidetune/.venv, the
# bundle into /etc/sidetune (edge.password 0600), /etc/sidetune/task.toml from
# deploy/task.example.toml if there is none, and the unit sidetune-edge.service. A later run is an
# upgrade (--bundle optional then; give it to install a rotated password): the agent restarts.
# --backbone DIR installs an exported backbone (a folder `sidetune export` wrote, copied to the board)
# as /opt/sidetune/backbone; without it, a backbone already there is kept. Either way its files are
# made readable by the agent's user (root-owned, 0644 in 0755 folders: `scp -r` keeps the modes
# the export had, and older exports wrote backbone.onnx.data 0600).
#
# Options:
#   --backbone DIR  install the exported backbone in DIR (replaces the installed one)
#   --root DIR    install under DIR (for tests): no apt-get, no systemctl, no users or chown
#   --venv PATH   use this existing virtualenv (sidetune[edge] installed in it) instead of creating
#                 /opt/sidetune/.venv; it is linked there
set -euo pipefail
umask 022   # folders others must traverse (mosquitto's user, the agent's); secrets get explicit modes

PROG=install-board.sh
# shellcheck source=deploy/host-checks.sh
. "$(dirname "$0")/host-checks.sh"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

ROOT="" VENV="" SRC="" BUNDLE="" BACKBONE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
    --venv) VENV=${2:?--venv needs a folder}; shift 2 ;;
    --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
    --backbone) BACKBONE=${2:?--backbone needs a folder}; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "install-board.sh: unknown option $1" >&2; usage ;;
    *) [ -z "$SRC" ] || usage; SRC=$1; shift ;;
  esac
done
resolve_paths deploy/task.example.toml
# --- what this board is -----------------------------------------------------------------------
check_os
check_arch "a board" x86_64 aarch64 armv7l

ETC=$ROOT/etc/sidetune
UPGRADE=0
[ -f "$ETC/edge.toml" ] && UPGRADE=1
if [ -n "$BUNDLE" ]; then
  for f in edge.toml ca.crt edge.password; do
    [ -f "$BUNDLE/$f" ] || die "$BUNDLE/$f is missing: --bundle takes the folder \`sidetune broker add-device\` wrote"
  done
  # A cohort member's bundle names its cohort: its secret (made off the server) must come with it.
  if grep -q '^cohort = ' "$BUNDLE/edge.toml" && [ ! -f "$BUNDLE/cohort.json" ]; then
    die "$BUNDLE/edge.toml makes this board a cohort member but $BUNDLE/cohort.json is missing: put the cohort's secret there (\`sidetune cohort secret NAME --out FILE\`, made once, off the server)"
  fi
elif [ "$UPGRADE" = 0 ]; then
  die "--bundle is required on a first install (\`sidetune broker add-device ID --dir /etc/sidetune/broker\` writes it on the server)"
fi

if [ -n "$BACKBONE" ]; then
  BACKBONE=$(cd "$BACKBONE" && pwd) || die "no backbone folder $BACKBONE"
  [ -f "$BACKBONE/manifest.json" ] || die "$BACKBONE has no manifest.json: --backbone takes the folder \`sidetune export --out\` wrote"
fi

# --- system packages and the service user (not under --root) --------------------------------
if [ -z "$ROOT" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  id sidetune >/dev/null 2>&1 || useradd --system --home /var/lib/sidetune --shell /usr/sbin/nologin sidetune
fi

# --- the package: the edge extra only (no torch on a board) ----------------------------------
OPT=$ROOT/opt/sidetune
mkdir -p "$OPT" "$ETC"
if [ -n "$VENV" ]; then
  VENV=$(cd "$VENV" && pwd) || die "no virtualenv $VENV"
  [ -x "$VENV/bin/sidetune" ] || die "--venv $VENV has no bin/sidetune: pip install '$SRC[edge]' into it first"
  check_python "$VENV/bin/python"
  if [ "$VENV" != "$OPT/.venv" ]; then
    [ ! -e "$OPT/.venv" ] || [ -L "$OPT/.venv" ] || die "$OPT/.venv exists and is not a link: drop --venv"
    ln -sfn "$VENV" "$OPT/.venv"
  fi
else
  check_python python3
  [ -x "$OPT/.venv/bin/python" ] || python3 -m venv "$OPT/.venv"
  "$OPT/.venv/bin/python" -m pip install -q --upgrade pip
  "$OPT/.venv/bin/python" -m pip install -q "$SRC[edge]"
  "$OPT/.venv/bin/python" -m pip install -q --no-deps --force-reinstall "$SRC"   # an upgrade that kept the version
fi

# --- configuration ----------------------------------------------------------------------------
owner=()
[ -n "$ROOT" ] || owner=(-o sidetune -g sidetune)
if [ -n "$BUNDLE" ]; then
  install -m 0644 "$BUNDLE/edge.toml" "$ETC/edge.toml"
  install -m 0644 "$BUNDLE/ca.crt" "$ETC/ca.crt"
  install -m 0600 "${owner[@]}" "$BUNDLE/edge.password" "$ETC/edge.password"   # the agent's user reads it
  if [ -f "$BUNDLE/cohort.json" ]; then
    install -m 0600 "${owner[@]}" "$BUNDLE/cohort.json" "$ETC/cohort.json"   # the cohort's secret
  fi
fi
[ -f "$ETC/task.toml" ] || install -m 0644 "$SRC/deploy/task.example.toml" "$ETC/task.toml"
install -d -m 0700 "${owner[@]}" "$ROOT/var/lib/sidetune"
install -D -m 0644 "$SRC/deploy/sidetune-edge.service" "$ROOT/etc/systemd/system/sidetune-edge.service"
if [ -n "$BACKBONE" ]; then
  rm -rf "$OPT/backbone.new"
  cp -r "$BACKBONE" "$OPT/backbone.new"
  rm -rf "$OPT/backbone" && mv "$OPT/backbone.new" "$OPT/backbone"
fi
if [ -f "$OPT/backbone/manifest.json" ]; then
  [ -n "$ROOT" ] || chown -R root:root "$OPT/backbone"
  chmod -R u+rwX,go+rX,go-w "$OPT/backbone"   # the agent's user reads it, nobody else writes it
else
  echo "install-board.sh: no backbone in $OPT/backbone yet: export one (\`sidetune export\`, see the README's" \
       "Deploy section), copy it here and run install-board.sh --backbone DIR ." >&2
fi

if [ -n "$ROOT" ]; then
  echo "installed under $ROOT (no services started)"
  exit 0
fi
systemctl daemon-reload
if [ "$UPGRADE" = 1 ]; then
  systemctl try-restart sidetune-edge.service
  echo "upgraded: sidetune-edge restarted if it was running"
else
  echo "installed. Start the agent:  systemctl enable --now sidetune-edge"
fi
