#!/usr/bin/env bash
# Shared setup for scripts/run.sh and scripts/test.sh: Debian packages for Python, and the
# project's virtual environment in .venv with the package installed (editable, so twistd finds
# the smtpapi plugin under src/twisted/plugins). Needs root for apt-get on a fresh machine.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SMTPAPI_VENV:-$ROOT/.venv}

apt_install() {  # apt_install PKG...: install only what is missing
  local missing=() p
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || { echo "need root to install: ${missing[*]}" >&2; exit 1; }
  echo "installing Debian packages: ${missing[*]}" >&2
  # Keep package scripts from starting system-wide daemons (postfix, dovecot, mariadb).
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1; fi
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  local rc=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >&2 || rc=$?
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return $rc
}

python_ok() { command -v python3 >/dev/null && python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

ensure_python() {
  python_ok || apt_install python3 python3-venv python3-dev ca-certificates
  python_ok || { echo "python3 >= 3.11 with venv is required" >&2; exit 1; }
}

ensure_venv() {  # ensure_venv EXTRAS ("" or "[test]")
  ensure_python
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local stamp="$VENV/.installed$1" 
  # constraints.txt pins the tested version of every package (README.md, "Pinned versions").
  local pins="$ROOT/constraints.txt"
  if [ ! -e "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ] || [ "$pins" -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --constraint "$pins" --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --constraint "$pins" -e "$ROOT$1" >&2
    touch "$stamp"
  fi
  # The package is installed in place (-e), so pip compiled none of it: without bytecode on disk,
  # every start of the service (and of each one the tests start) compiles its modules again,
  # about 0.2 s, where PYTHONDONTWRITEBYTECODE keeps Python from caching them itself.
  "$VENV/bin/python" -m compileall -q "$ROOT/src" >&2
}
