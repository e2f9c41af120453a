#!/usr/bin/env bash
# Install everything the tests need (postfix, dovecot, MariaDB, Redis, Python packages) and run
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
cd "$ROOT"
exec "$VENV/bin/python" -m pytest "$@"
