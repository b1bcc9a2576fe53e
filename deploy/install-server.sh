#!/usr/bin/env bash
# Install broker, cache and side server on a Debian/Ubuntu host (as root).
set -euo pipefail
SRC=${1:?usage: install-server.sh PATH_TO_SIDETUNE_SOURCE}
apt-get update -qq && apt-get install -y -qq mosquitto redis-server openssl
id sidetune >/dev/null 2>&1 || useradd --system --home /var/lib/sidetune --shell /usr/sbin/nologin sidetune
mkdir -p /opt/sidetune /etc/sidetune /var/lib/sidetune/mosquitto
python3 -m venv /opt/sidetune/.venv
/opt/sidetune/.venv/bin/pip install "torch==2.13.0"
/opt/sidetune/.venv/bin/pip install "$SRC[server]"
# Broker: render broker_config/mosquitto.conf (same file the tests use).
sed -e "s|{{USER}}|mosquitto|; s|{{STATE_DIR}}|/var/lib/sidetune/mosquitto|g; s|{{PASSWORD_FILE}}|/etc/sidetune/passwd|; \
        s|{{ACL_FILE}}|/etc/sidetune/acl|; s|{{PORT}}|1883|; s|{{BIND}}|0.0.0.0|; s|{{TLS_LISTENER}}||" \
    "$SRC/broker_config/mosquitto.conf" > /etc/mosquitto/conf.d/sidetune.conf
install -m 0644 "$SRC/broker_config/acl" /etc/sidetune/acl
touch /etc/sidetune/passwd && chmod 0640 /etc/sidetune/passwd && chgrp mosquitto /etc/sidetune/passwd
chown mosquitto /var/lib/sidetune/mosquitto
# Redis: the cache settings as an include.
install -m 0644 "$SRC/broker_config/redis.conf" /etc/redis/sidetune.conf
grep -q "include /etc/redis/sidetune.conf" /etc/redis/redis.conf || echo "include /etc/redis/sidetune.conf" >> /etc/redis/redis.conf
[ -f /etc/sidetune/server.toml ] || install -m 0640 -g sidetune "$SRC/deploy/server.example.toml" /etc/sidetune/server.toml
install -m 0644 "$SRC/deploy/sidetune-server@.service" /etc/systemd/system/
systemctl daemon-reload && systemctl restart redis-server mosquitto
cat <<'MSG'
Accounts: mosquitto_passwd -b /etc/sidetune/passwd sidetune-server PASSWORD   (then one per board: its device id)
Then:     systemctl enable --now sidetune-server@1 sidetune-server@2
MSG
