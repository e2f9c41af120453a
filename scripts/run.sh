#!/usr/bin/env bash
# Install and run the service on its embedded default database (SQLite).
# Any option of `twistd smtpapi` may follow, e.g. scripts/run.sh --listen tcp:8080 --smtp-host 127.0.0.1
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$ROOT/scripts/bootstrap.sh"
ensure_venv ""
# The service and smtpapi-admin share one default: SMTPAPI_DB (and SMTPAPI_STATE_DB) when set, else
# smtpapi.sqlite (and smtpapi-state.sqlite) in the folder both are run from. No default of its own
# here, so the admin command, run from the same folder, fills the database the service reads.
case "${SMTPAPI_DB:-sqlite:}" in
  sqlite:*)
    "$VENV/bin/smtpapi-admin" init >&2  # says "ready: sqlite:PATH"
    echo "add domains, mailboxes and an API key from this folder ($PWD), or with the same SMTPAPI_DB: $VENV/bin/smtpapi-admin --help" >&2 ;;
esac
exec "$VENV/bin/twistd" -n --pidfile= smtpapi "$@"
