#!/usr/bin/env bash
# Install everything the tests need (postfix, dovecot, MariaDB, Redis, Python and Node packages) and run
# the whole suite: unit, in-memory Twisted, and integration tests against a real postfix + dovecot
# + MariaDB + Redis that the tests start on loopback. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$ROOT/scripts/bootstrap.sh"
apt_install postfix postfix-mysql dovecot-core dovecot-mysql openssl curl iproute2 coreutils
# rspamd scores the messages the service builds as mailcow's filter would (tests/rspamd.py);
# nginx runs the send route's snippet in mailcow's server layout (tests/integration/test_nginx.py).
apt_install rspamd nginx
bash "$ROOT/scripts/mariadb.sh" ensure
bash "$ROOT/scripts/redis.sh" ensure
ensure_venv "[test]"
# Real provider clients from the npm registry (tests/integration/test_clients.py): mailgun.js and
# postmark.js at the versions of tests/clients/node/package-lock.json. Debian's Node.js and npm
# only when npm is missing.
command -v npm >/dev/null || apt_install nodejs npm
NODE_CLIENTS="$ROOT/tests/clients/node"
if [ ! "$NODE_CLIENTS/node_modules/.package-lock.json" -nt "$NODE_CLIENTS/package-lock.json" ]; then
  (cd "$NODE_CLIENTS" && npm ci --no-audit --no-fund --loglevel=error) >&2
fi
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
