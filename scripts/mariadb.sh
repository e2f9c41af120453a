#!/usr/bin/env bash
# Make sure a MariaDB server answers on 127.0.0.1:3306 as root without a password.
# Uses the one that is running; otherwise installs mariadb-server (if missing) and starts the
# system's server when its data exists, else a private server whose data lives under
# /tmp/smtpapi-mariadb (it is stopped by `stop`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$ROOT/scripts/bootstrap.sh"
DATA=${SMTPAPI_MARIADB_DIR:-/tmp/smtpapi-mariadb}

answers() { mariadb-admin --protocol=tcp -h127.0.0.1 -P3306 -uroot --connect-timeout=2 ping >/dev/null 2>&1; }

case "${1:-ensure}" in
  ensure)
    apt_install mariadb-client
    answers && exit 0
    apt_install mariadb-server
    answers && exit 0
    if [ -d /var/lib/mysql/mysql ] && [ -x /usr/sbin/mariadbd ]; then
      # The system's server is installed with its data but not running (never started here, or
      # it died): start it on its own configuration and data, as the machine would.
      echo "MariaDB on 127.0.0.1:3306 does not answer: starting the system's server" >&2
      start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
      for _ in $(seq 1 150); do answers && exit 0; sleep 0.2; done
    fi
    echo "no MariaDB on 127.0.0.1:3306: starting a private one in $DATA" >&2
    mkdir -p "$DATA"
    if [ ! -d "$DATA/db/mysql" ]; then
      mariadb-install-db --user=mysql --datadir="$DATA/db" --auth-root-authentication-method=normal \
        --skip-test-db >"$DATA/install.log" 2>&1 || { tail -20 "$DATA/install.log" >&2; exit 1; }
    fi
    chown -R mysql:mysql "$DATA"
    setsid mariadbd --user=mysql --datadir="$DATA/db" --socket="$DATA/mysqld.sock" --pid-file="$DATA/mysqld.pid" \
      --bind-address=127.0.0.1 --port=3306 --skip-name-resolve --log-error="$DATA/error.log" \
      </dev/null >/dev/null 2>&1 &
    for _ in $(seq 1 150); do answers && exit 0; sleep 0.2; done
    echo "private MariaDB did not start:" >&2; tail -20 "$DATA/error.log" >&2; exit 1 ;;
  stop)
    [ -s "$DATA/mysqld.pid" ] && kill "$(cat "$DATA/mysqld.pid")" 2>/dev/null || true ;;
  *) echo "usage: $0 ensure|stop" >&2; exit 2 ;;
esac
