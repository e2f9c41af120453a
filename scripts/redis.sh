#!/usr/bin/env bash
# Make sure a Redis server answers PING on 127.0.0.1:6379 (the abuse-control tests need one).
# Uses the one that is running; otherwise installs Debian's redis-server (if missing) and starts a
# private server on loopback: daemonized, no persistence (no RDB, no AOF), its files under
# /tmp/smtpapi-redis. `stop` stops that private server only, never the machine's own.
#   SMTPAPI_REDIS_PORT  [6379]
#   SMTPAPI_REDIS_DIR   [/tmp/smtpapi-redis]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$ROOT/scripts/bootstrap.sh"
PORT=${SMTPAPI_REDIS_PORT:-6379}
DATA=${SMTPAPI_REDIS_DIR:-/tmp/smtpapi-redis}

answers() { [ "$(timeout 3 redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null)" = PONG ]; }

case "${1:-ensure}" in
  ensure)
    apt_install redis-tools
    answers && exit 0
    apt_install redis-server
    answers && exit 0
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
      echo "127.0.0.1:$PORT accepts connections but does not answer PING as Redis without a password" >&2
      exit 1
    fi
    echo "no Redis on 127.0.0.1:$PORT: starting a private one in $DATA" >&2
    mkdir -p "$DATA"
    redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes --dir "$DATA" \
      --pidfile "$DATA/redis.pid" --logfile "$DATA/redis.log" --save '' --appendonly no \
      </dev/null >/dev/null 2>&1 || { tail -20 "$DATA/redis.log" >&2 2>/dev/null; exit 1; }
    for _ in $(seq 1 100); do answers && exit 0; sleep 0.1; done
    echo "private Redis did not answer PING within 10 s:" >&2; tail -20 "$DATA/redis.log" >&2 2>/dev/null; exit 1 ;;
  stop)
    [ -s "$DATA/redis.pid" ] && kill "$(cat "$DATA/redis.pid")" 2>/dev/null || true ;;
  *) echo "usage: $0 ensure|stop" >&2; exit 2 ;;
esac
