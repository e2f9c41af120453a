#!/usr/bin/env bash
# Install and run the service on its embedded default database (SQLite).
# Any option of `twistd smtpapi` may follow, e.g. scripts/run.sh --listen tcp:8080 --smtp-host 127.0.0.1
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$ROOT/scripts/bootstrap.sh"
ensure_venv ""
mkdir -p "$ROOT/var"
export SMTPAPI_DB=${SMTPAPI_DB:-sqlite:$ROOT/var/smtpapi.sqlite}
export SMTPAPI_STATE_DB=${SMTPAPI_STATE_DB:-sqlite:$ROOT/var/smtpapi-state.sqlite}
"$VENV/bin/smtpapi-admin" --db "$SMTPAPI_DB" init >/dev/null
echo "database: $SMTPAPI_DB   (add domains, mailboxes and an API key with: $VENV/bin/smtpapi-admin --db $SMTPAPI_DB --help)" >&2
exec "$VENV/bin/twistd" -n --pidfile= smtpapi "$@"
