#!/usr/bin/env bash
# Install the edge agent on a board (Raspberry Pi OS / Debian / Ubuntu, as root).
# No torch on the board: only the `edge` extra. Copy an exported backbone folder
# (from `sidetune export` on a bigger machine) to /opt/sidetune/backbone first.
set -euo pipefail
SRC=${1:?usage: install-board.sh PATH_TO_SIDETUNE_SOURCE}
id sidetune >/dev/null 2>&1 || useradd --system --home /var/lib/sidetune --shell /usr/sbin/nologin sidetune
mkdir -p /opt/sidetune /etc/sidetune /var/lib/sidetune
python3 -m venv /opt/sidetune/.venv
/opt/sidetune/.venv/bin/pip install "$SRC[edge]"
[ -f /etc/sidetune/edge.toml ] || install -m 0640 -g sidetune "$SRC/deploy/edge.example.toml" /etc/sidetune/edge.toml
[ -f /etc/sidetune/task.toml ] || install -m 0644 "$SRC/deploy/task.example.toml" /etc/sidetune/task.toml
chown -R sidetune:sidetune /var/lib/sidetune
install -m 0644 "$SRC/deploy/sidetune-edge.service" /etc/systemd/system/
systemctl daemon-reload
echo "edit /etc/sidetune/edge.toml, then: systemctl enable --now sidetune-edge"
