#!/usr/bin/env bash
# testbed.sh - a mailcow-like postfix + dovecot on loopback, reading mailcow's MariaDB schema.
#
# Usage: testbed.sh install | start | stop | status | restart-postfix | stop-postfix |
#                   start-postfix | clear-messages | route-defer closed|sink | reconnect
#
# The bed mirrors postfix-mailcow and dovecot-mailcow closely enough that the send API and the
# real postfix can be compared on the same data:
#   127.0.0.1:10587  like mailcow's 587: STARTTLS required, AUTH PLAIN/LOGIN only after TLS,
#                    reject_sender_login_mismatch with mailcow's SQL sender login map
#   127.0.0.1:10465  like mailcow's 465: implicit TLS, same AUTH and sender policy
#   127.0.0.1:10025  like mailcow's 25 for internal clients: no AUTH, relays for 127.0.0.0/8
#   127.0.0.1:10026  postfix's smtp-sink: every message postfix delivers is written to a file
# Two recipient domains show postfix's other fates (every other domain goes to the sink):
#   defer.test   deferred: its transport is a closed loopback port (127.0.0.1:9), retried every
#                few seconds; "route-defer sink" routes it to the sink (and flushes the queue),
#                "route-defer closed" back; every start or restart of the bed resets it to closed
#   bounce.test  bounced at once (error:5.1.1), with a non-delivery report to the sender
# On 10587 and 10465 the sender ratelimited@example.com gets rspamd's verdict for a mailbox over
# mailcow's rate limit: 451 4.7.1 ... Ratelimit "mailcow" exceeded, after DATA.
# postfix's smtpd_sender_login_maps and dovecot's passdbs both read the MariaDB database
# $SMTPAPI_TESTBED_DB_NAME on 127.0.0.1:3306 as a SELECT-only user. The database, its tables and
# that user are created by the test suite (tests/integration/conftest.py), not by this script.
#
# Everything (configuration, queue, logs, pid files, captured mail) lives under one folder:
#   SMTPAPI_TESTBED_DIR      [/tmp/smtpapi-testbed]
#   SMTPAPI_TESTBED_DB_NAME  [smtpapi_testbed]
#   SMTPAPI_TESTBED_DB_USER  [smtpapi_testbed_ro]
#   SMTPAPI_TESTBED_DB_PASS  [testbed-readonly]
# Needs root (postfix's and dovecot's masters drop privileges themselves). Works without systemd
# and without syslog; nothing is configured or started system-wide, and no mail leaves the host.

set -euo pipefail

DIR=${SMTPAPI_TESTBED_DIR:-/tmp/smtpapi-testbed}
DB_NAME=${SMTPAPI_TESTBED_DB_NAME:-smtpapi_testbed}
DB_USER=${SMTPAPI_TESTBED_DB_USER:-smtpapi_testbed_ro}
DB_PASS=${SMTPAPI_TESTBED_DB_PASS:-testbed-readonly}
DB_HOST=127.0.0.1
DB_PORT=3306

SUBMISSION_PORT=10587
SMTPS_PORT=10465
PLAIN_PORT=10025
SINK_PORT=10026
# mailcow's rspamd soft-rejects mail of a mailbox over its rate limit (mailcow.md section 7).
RATELIMITED_SENDER=ratelimited@example.com
# Each app password of a mailbox is tried by its own passdb (see write_dovecot_config).
APP_PASSWORD_SLOTS=4
# defer.test's closed route: nothing listens on the discard port, so each attempt is refused.
CLOSED_PORT=9

PF_ETC=$DIR/postfix          # postfix config_directory (always `postfix -c $PF_ETC`)
PF_QUEUE=$DIR/queue          # queue_directory
PF_DATA=$DIR/data            # data_directory
DOV=$DIR/dovecot             # dovecot.conf and the SQL passdb files
DOV_RUN=$DOV/run             # base_dir: master.pid and the auth socket
AUTH_SOCKET=$DOV_RUN/auth-postfix
LOG=$DIR/log
SINK=$DIR/sink
MAIL=$SINK/mail              # smtp-sink writes one file per delivered message here
TLS=$DIR/tls

say() { printf 'testbed: %s\n' "$*" >&2; }
die() {
  say "ERROR: $*"
  local f
  for f in "$LOG/postfix.log" "$LOG/dovecot.log" "$LOG/postfix-start.log" "$LOG/smtp-sink.log"; do
    [ -s "$f" ] && { printf -- '--- last lines of %s\n' "$f" >&2; tail -n 15 "$f" >&2; }
  done
  exit 1
}
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

# ------------------------------------------------------------------------------- install

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

installed() {
  local p
  for p in postfix postfix-mysql dovecot-core dovecot-mysql; do pkg_installed "$p" || return 1; done
  command -v openssl >/dev/null
}

cmd_install() {
  need_root
  if installed; then say "packages already installed"; return 0; fi
  # "No configuration" leaves /etc/postfix/main.cf absent, so the system's own postfix can never
  # start; only the binaries are used, always with -c pointing into $DIR.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  # A policy-rc.d that exits 101 keeps package scripts from starting system-wide daemons.
  local own_policy=0 rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  local pkgs=(postfix postfix-mysql dovecot-core dovecot-mysql)
  # Naming an installed package makes apt upgrade it; openssl only when it is missing.
  command -v openssl >/dev/null || pkgs+=(openssl)
  say "installing ${pkgs[*]}"
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
  } >&2 || rc=$?
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt-get failed with status $rc"
  installed || die "packages still missing after apt-get"
}

# ------------------------------------------------------------------------------- files

# put_file TARGET MODE OWNER < content: replace TARGET only when its content changes (so an
# unchanged bed restarts nothing), and date it 10 s back: postfix programs wait until a
# configuration file they read is at least a second old, which would slow every start.
# Prints "changed" when the file was written.
put_file() {
  local target=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp "$target.XXXXXX")
  cat > "$tmp"
  if [ -e "$target" ] && cmp -s "$tmp" "$target"; then
    rm -f "$tmp"
    return 0
  fi
  chmod "$mode" "$tmp"
  chown "$owner" "$tmp"
  touch -d "@$(( $(date +%s) - 10 ))" "$tmp"
  mv -f "$tmp" "$target"
  echo changed
}

write_tls() {
  mkdir -p "$TLS"
  [ -s "$TLS/cert.pem" ] && [ -s "$TLS/key.pem" ] && return 0
  say "creating a self-signed certificate for localhost / 127.0.0.1"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$TLS/key.pem.new" -out "$TLS/cert.pem.new" 2>"$LOG/openssl.log" ||
    die "openssl could not create the certificate"
  chmod 600 "$TLS/key.pem.new"
  chmod 644 "$TLS/cert.pem.new"
  mv -f "$TLS/key.pem.new" "$TLS/key.pem"
  mv -f "$TLS/cert.pem.new" "$TLS/cert.pem"
}

# mailcow's sender login map (mailcow.md section 1). postfix substitutes %s (the whole key),
# %u (local part) and %d (domain); it suppresses the query - no owners - when the key has no
# '@' (no %d) or an empty local part (%u), which also makes its '@domain' lookup return nothing.
# The +tag retry is postfix's own: with recipient_delimiter = +, a sender address that finds no
# owners is looked up again without its extension (mail_addr_find), i.e. only when the full
# address has no owners at all.
write_sender_map() {
  put_file "$PF_ETC/sender_acl.cf" 640 root:postfix <<EOF
# Generated by testbed.sh: mailcow's smtpd_sender_login_maps query, read from MariaDB.
hosts = inet:$DB_HOST:$DB_PORT
user = $DB_USER
password = $DB_PASS
dbname = $DB_NAME
query =
  SELECT goto FROM alias
   WHERE id = (
       # One alias row: the exact address, else the catch-all, among rows that are active
       # (1, or 2 = receive only) and allowed as a sender.
       SELECT COALESCE(
         (SELECT id FROM alias WHERE address = '%s' AND active IN (1, 2) AND sender_allowed = 1),
         (SELECT id FROM alias WHERE address = '@%d' AND active IN (1, 2) AND sender_allowed = 1)))
     # The picked row counts only when fully active (an active 2 exact row hides the catch-all
     # and grants nothing) and when it belongs to the sender's domain, which must be an active
     # domain or an active alias domain.
     AND active = 1
     AND sender_allowed = 1
     AND (domain IN (SELECT domain FROM domain WHERE domain = '%d' AND active = 1)
          OR domain IN (SELECT alias_domain FROM alias_domain WHERE alias_domain = '%d' AND active = 1))
  UNION
  SELECT logged_in_as FROM sender_acl
   WHERE send_as = '@%d'
      OR send_as = '%s'
      OR send_as = '*'
      OR send_as IN (SELECT CONCAT('@', target_domain) FROM alias_domain WHERE alias_domain = '%d')
      # mailcow writes the last two conditions without parentheses: AND binds tighter than OR,
      # so the goto exclusion limits only the user@target-domain grant. Kept as mailcow has it.
      OR send_as IN (SELECT CONCAT('%u', '@', target_domain) FROM alias_domain WHERE alias_domain = '%d')
         AND logged_in_as NOT IN (SELECT goto FROM alias WHERE address = '%s')
  UNION
  # The mailbox user@target owns user@alias-domain while that alias domain is active.
  SELECT mailbox.username FROM mailbox, alias_domain
   WHERE alias_domain.alias_domain = '%d'
     AND alias_domain.active = 1
     AND mailbox.username = CONCAT('%u', '@', alias_domain.target_domain)
     AND mailbox.active IN (1, 2)
EOF
}

# write_transport closed|sink: the routes of the two domains that do not simply go to the sink.
# A texthash table needs no postmap; postfix reads it again on reload.
write_transport() {
  local defer_route
  case $1 in
    closed) defer_route="smtp:[127.0.0.1]:$CLOSED_PORT" ;;
    sink) defer_route="smtp:[127.0.0.1]:$SINK_PORT" ;;
    *) die "route-defer: closed or sink, not '$1'" ;;
  esac
  put_file "$PF_ETC/transport" 644 root:root <<EOF
# Generated by testbed.sh: defer.test is $1.
defer.test $defer_route
bounce.test error:5.1.1 bounce.test bounces every message in the test bed
EOF
}

write_postfix_config() {
  mkdir -p "$PF_ETC" "$PF_QUEUE" "$PF_DATA" "$LOG"
  chown root:root "$PF_QUEUE"
  chmod 755 "$PF_QUEUE"
  chown postfix:postfix "$PF_DATA"
  chmod 700 "$PF_DATA"
  POSTFIX_CHANGED=$(write_sender_map)
  POSTFIX_CHANGED+=$(write_transport closed)
  # rspamd answers a submission over mailcow's rate limit at the end of DATA (it scans the whole
  # message as a milter); postfix relays it as 451 4.7.1. A texthash table needs no postmap.
  POSTFIX_CHANGED+=$(put_file "$PF_ETC/ratelimited" 644 root:root <<EOF
$RATELIMITED_SENDER 451 4.7.1 Ratelimit "mailcow" exceeded
EOF
)
  POSTFIX_CHANGED+=$(put_file "$PF_ETC/main.cf" 644 root:root <<EOF
# Generated by testbed.sh. Rerun "testbed.sh start" instead of editing.
compatibility_level = 3.6
queue_directory = $PF_QUEUE
data_directory = $PF_DATA
mail_owner = postfix
setgid_group = postdrop
myhostname = mail.testbed.invalid
mydomain = testbed.invalid
myorigin = \$myhostname
smtpd_banner = \$myhostname ESMTP
biff = no
append_dot_mydomain = no
maillog_file = $LOG/postfix.log
maillog_file_prefixes = $DIR

# Loopback only; every message goes to smtp-sink, nothing is delivered locally or by DNS.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_bind_address = 127.0.0.1
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
local_transport = error:5.1.1 no local delivery in the test bed
relayhost = [127.0.0.1]:$SINK_PORT
default_transport = smtp:[127.0.0.1]:$SINK_PORT
relay_transport = smtp:[127.0.0.1]:$SINK_PORT
smtp_dns_support_level = disabled
smtp_tls_security_level = none
# defer.test is deferred (a closed port) and bounce.test bounced; see write_transport.
transport_maps = texthash:$PF_ETC/transport
# smtpd refuses at RCPT any address that resolves to the error transport unless this is off;
# bounce.test must be accepted and then bounced, as a remote domain's bounce is on mailcow.
# The only other such addresses are the local class (user@[127.0.0.1]: local_transport above),
# which no one mails; every other domain resolves to the sink and is not checked either way.
smtpd_reject_unlisted_recipient = no
# Deferred mail is retried within seconds, not after postfix's 5 to 67 minutes, so that a test
# that fixes a route sees the delivery soon. Only deferred mail is affected.
queue_run_delay = 5s
minimal_backoff_time = 5s
maximal_backoff_time = 10s

# mailcow: 100 MB messages; user+tag addresses.
message_size_limit = 104857600
mailbox_size_limit = 0
recipient_delimiter = +

# Server TLS with the bed's self-signed certificate.
smtpd_tls_cert_file = $TLS/cert.pem
smtpd_tls_key_file = $TLS/key.pem
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_mandatory_protocols = >=TLSv1.2
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1

# SASL through dovecot's auth socket, enabled per port in master.cf.
smtpd_sasl_type = dovecot
smtpd_sasl_path = $AUTH_SOCKET
smtpd_sasl_auth_enable = no
smtpd_sasl_security_options = noanonymous
smtpd_sasl_authenticated_header = yes

# mailcow's sender login map, from the same database the send API reads.
smtpd_sender_login_maps = mysql:$PF_ETC/sender_acl.cf
# As on mailcow, rejections wait for RCPT TO (a sender mismatch arrives as 553 at RCPT).
smtpd_delay_reject = yes
smtpd_helo_required = yes
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
disable_vrfy_command = yes
# mailcow discards these keywords too.
smtpd_discard_ehlo_keywords = chunking, silent-discard, smtputf8
# Loopback clients would otherwise get a missing Date: or Message-ID: added, which postfix does
# not do for mailcow's remote clients; the tests must see what the client really sent.
local_header_rewrite_clients =
EOF
)
  # 10587 and 10465 share mailcow's submission policy: only authenticated clients, and only
  # with a sender their login owns.
  local AUTH_PORT_OPTIONS="  -o smtpd_sasl_auth_enable=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_sender_restrictions=reject_sender_login_mismatch,permit_sasl_authenticated,reject
  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
  -o smtpd_end_of_data_restrictions=check_sender_access,texthash:$PF_ETC/ratelimited"
  POSTFIX_CHANGED+=$(put_file "$PF_ETC/master.cf" 644 root:root <<EOF
# Generated by testbed.sh. No service runs chrooted.
# service       type  private unpriv chroot wakeup maxproc command + args
127.0.0.1:$PLAIN_PORT inet n - n - - smtpd
  -o syslog_name=postfix/plain
  -o smtpd_sasl_auth_enable=no
  -o smtpd_client_restrictions=permit_mynetworks,reject
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=permit_mynetworks,reject
127.0.0.1:$SUBMISSION_PORT inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
$AUTH_PORT_OPTIONS
127.0.0.1:$SMTPS_PORT inet n - n - - smtpd
  -o syslog_name=postfix/smtps
  -o smtpd_tls_wrappermode=yes
$AUTH_PORT_OPTIONS
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
tlsmgr     unix  -       -       n       1000?   1       tlsmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
EOF
)
}

# The conditions under which mailcow lets a mailbox log in for SMTP (mailcow.md section 1): the
# mailbox and its domain active, not a resource, smtp_access set in its attributes, and
# verified by mailcow itself rather than an external identity provider.
MAILBOX_OK="mailbox.active = 1 AND domain.active = 1
    AND mailbox.kind NOT IN ('location', 'thing', 'group')
    AND JSON_VALUE(mailbox.attributes, '\$.smtp_access') = '1'"

# add_passdb NAME QUERY: a passdb file for one SQL password query, and its passdb block in
# $PASSDBS (dovecot tries the passdbs in order until one accepts the password).
add_passdb() {
  local file=$DOV/passdb-$1.conf.ext
  DOVECOT_CHANGED+=$(put_file "$file" 640 root:dovecot <<EOF
# Generated by testbed.sh.
driver = mysql
connect = host=$DB_HOST port=$DB_PORT dbname=$DB_NAME user=$DB_USER password=$DB_PASS
# Rows without a {SCHEME} prefix are read as mailcow's dovecot reads them.
default_pass_scheme = SSHA256
password_query = $(printf '%s' "$2" | tr '\n' ' ' | tr -s ' ')
EOF
)
  PASSDBS+="passdb {
  driver = sql
  args = $file
}
"
}

write_dovecot_config() {
  mkdir -p "$DOV" "$DOV/state" "$LOG"
  DOVECOT_CHANGED=""
  PASSDBS=""
  local slot
  add_passdb mailbox "SELECT mailbox.password AS password FROM mailbox
    JOIN domain ON domain.domain = mailbox.domain
    WHERE mailbox.username = '%u' AND $MAILBOX_OK AND mailbox.authsource = 'mailcow'"
  # dovecot's SQL passdb takes one row per query, but a mailbox may have several app passwords:
  # each passdb below checks the next one (ordered by id), and dovecot moves on to the next
  # passdb after a mismatch, so every password up to APP_PASSWORD_SLOTS gets its turn.
  for slot in $(seq 0 $(( APP_PASSWORD_SLOTS - 1 ))); do
    add_passdb "app-$slot" "SELECT app_passwd.password AS password FROM app_passwd
      JOIN mailbox ON mailbox.username = app_passwd.mailbox
      JOIN domain ON domain.domain = mailbox.domain
      WHERE app_passwd.mailbox = '%u' AND app_passwd.active = 1 AND app_passwd.smtp_access = 1
        AND $MAILBOX_OK
      ORDER BY app_passwd.id LIMIT 1 OFFSET $slot"
  done
  DOVECOT_CHANGED+=$(put_file "$DOV/dovecot.conf" 644 root:root <<EOF
# Generated by testbed.sh: dovecot as the SASL server for postfix, nothing else.
protocols =
listen = 127.0.0.1
base_dir = $DOV_RUN
state_dir = $DOV/state
instance_name = smtpapi-testbed
log_path = $LOG/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
# Tests need fast and repeatable answers: no cache (a changed password counts at once), no
# delay after a failure and no per-IP penalty (mailcow keeps dovecot's defaults for both).
# dovecot 2.3.19 still answers a failed login on its next 500 ms failure-queue tick.
auth_cache_size = 0
auth_failure_delay = 0
service anvil {
  # Without its penalty socket anvil cannot slow down later logins from 127.0.0.1.
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
$PASSDBS
userdb {
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}
service auth {
  unix_listener auth-postfix {
    mode = 0660
    user = postfix
    group = postfix
  }
}
EOF
)
}

# ------------------------------------------------------------------------------- processes

# An exited daemon may linger as a zombie, which still answers kill -0: read its state instead.
alive() {  # alive PID COMM
  local state
  [ -n "$1" ] || return 1
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ] &&
    grep -q -- "$2" "/proc/$1/comm" 2>/dev/null
}
# child_pid PARENT COMM: a child of PARENT named COMM, if there is one (from /proc, no procps).
child_pid() {
  local stat pid line fields comm
  for stat in /proc/[0-9]*/stat; do
    { read -r line < "$stat"; } 2>/dev/null || continue
    # After the name in parentheses: state, then the parent's pid.
    read -r -a fields <<< "${line##*) }"
    [ "${fields[1]:-}" = "$1" ] || continue
    pid=${stat#/proc/}; pid=${pid%/stat}
    { read -r comm < "/proc/$pid/comm"; } 2>/dev/null || continue
    [ "$comm" = "$2" ] && { echo "$pid"; return 0; }
  done
  return 0
}
postfix_pid() { sed -n '1s/ //gp' "$PF_QUEUE/pid/master.pid" 2>/dev/null || true; }
dovecot_pid() { cat "$DOV_RUN/master.pid" 2>/dev/null || true; }
sink_pid() { cat "$SINK/smtp-sink.pid" 2>/dev/null || true; }

# wait_gone PID COMM: bounded wait (5 s) for a process to exit, then KILL it.
wait_gone() {
  local _
  for _ in $(seq 1 50); do alive "$1" "$2" || return 0; sleep 0.1; done
  say "$2 (pid $1) still running after 5 s; killing it"
  kill -KILL "$1" 2>/dev/null || true
  for _ in $(seq 1 20); do alive "$1" "$2" || return 0; sleep 0.1; done
  die "$2 (pid $1) does not exit"
}

stop_pid() {  # stop_pid PID COMM
  alive "$1" "$2" || return 0
  kill -TERM "$1" 2>/dev/null || true
  wait_gone "$1" "$2"
}

listening() {  # listening PORT: something accepts connections on 127.0.0.1:PORT
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Refuse to start over a listener that is not ours: tests would talk to the wrong server.
port_free() {  # port_free PORT WHAT
  listening "$1" || return 0
  local owner=""
  command -v ss >/dev/null && owner=$(ss -Hltnp "sport = :$1" 2>/dev/null | head -n 1)
  die "127.0.0.1:$1 ($2) is already taken by another process ${owner:+($owner)}"
}

# SMTP greeting on a plain port: "220 ...". QUIT politely so the server logs no error.
greets() {  # greets PORT
  (
    exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
    local line=""
    read -r -t 2 line <&3 || exit 1
    printf 'QUIT\r\n' >&3
    case $line in 220*) exit 0 ;; *) exit 1 ;; esac
  ) 2>/dev/null
}

# The greeting behind implicit TLS, which also proves the certificate and key load.
greets_tls() {  # greets_tls PORT
  printf 'QUIT\n' |
    timeout 5 openssl s_client -quiet -crlf -connect "127.0.0.1:$1" -servername localhost \
      -CAfile "$TLS/cert.pem" -verify_return_error 2>/dev/null | grep -q '^220 '
}

wait_greeting() {  # wait_greeting PORT WHAT [tls]: bounded at 10 s
  local _
  for _ in $(seq 1 100); do
    if [ "${3:-}" = tls ]; then greets_tls "$1" && return 0; else greets "$1" && return 0; fi
    sleep 0.1
  done
  die "$2 does not answer on 127.0.0.1:$1"
}

start_sink() {
  mkdir -p "$MAIL" "$LOG"
  chown postfix:postfix "$MAIL"
  if alive "$(sink_pid)" smtp-sink; then
    wait_greeting "$SINK_PORT" smtp-sink
    return 0
  fi
  # -u: smtp-sink refuses to run as root; -d: one file per message, named by time plus a
  # random suffix; stdio to a file so that a caller capturing our output sees EOF.
  setsid smtp-sink -4 -u postfix -h sink.testbed.invalid -d "$MAIL/%Y%m%d%H%M%S." \
    "127.0.0.1:$SINK_PORT" 256 < /dev/null >> "$LOG/smtp-sink.log" 2>&1 &
  echo $! > "$SINK/smtp-sink.pid"
  wait_greeting "$SINK_PORT" smtp-sink
}

start_dovecot() {
  if alive "$(dovecot_pid)" dovecot; then
    [ -n "$DOVECOT_CHANGED" ] || return 0
    # A full restart: reloads that change listeners have made dovecot 2.3's master exit.
    stop_pid "$(dovecot_pid)" dovecot
    # Running smtpd processes keep their connection to the old auth socket and would answer
    # the next AUTH with 454 after a 10 s wait: postfix must start fresh ones.
    POSTFIX_CHANGED+=dovecot
  fi
  rm -rf "$DOV_RUN"
  mkdir -p "$DOV_RUN"
  # dovecot keeps the caller's stderr open; send it to a file.
  dovecot -c "$DOV/dovecot.conf" < /dev/null >> "$LOG/dovecot-start.log" 2>&1 ||
    die "dovecot did not start: $(tail -n 5 "$LOG/dovecot-start.log")"
  local _
  for _ in $(seq 1 100); do [ -S "$AUTH_SOCKET" ] && return 0; sleep 0.1; done
  die "dovecot's auth socket $AUTH_SOCKET did not appear"
}

wait_postfix_listeners() {
  wait_greeting "$PLAIN_PORT" "postfix (plain)"
  wait_greeting "$SUBMISSION_PORT" "postfix (submission)"
  wait_greeting "$SMTPS_PORT" "postfix (implicit TLS)" tls
}

start_postfix() {
  if alive "$(postfix_pid)" master; then
    if [ -n "$POSTFIX_CHANGED" ]; then
      postfix -c "$PF_ETC" reload >> "$LOG/postfix-start.log" 2>&1 || die "postfix reload failed"
    fi
  else
    postfix -c "$PF_ETC" start < /dev/null >> "$LOG/postfix-start.log" 2>&1 ||
      die "postfix did not start"
  fi
  wait_postfix_listeners
}

purge_stale_queue() {
  # A session's start (not a restart within it): mail a stopped postfix left behind belongs to an
  # earlier session, and a half-written file (postfix stopped mid-submission leaves one in
  # incoming/) makes postsuper abort "postfix start".
  alive "$(postfix_pid)" master && return 0
  local sub
  for sub in incoming active deferred defer bounce maildrop hold corrupt; do
    if [ -d "$PF_QUEUE/$sub" ]; then find "$PF_QUEUE/$sub" -type f -delete; fi
  done
}

stop_postfix() {
  local pid
  pid=$(postfix_pid)
  alive "$pid" master || return 0
  postfix -c "$PF_ETC" stop < /dev/null >> "$LOG/postfix-start.log" 2>&1 || true
  wait_gone "$pid" master
  # The master's children inherited its listening sockets and exit only once they notice it is
  # gone: until then a port may still accept. Bounded at 10 s.
  local _ port open
  for _ in $(seq 1 100); do
    open=""
    for port in "$PLAIN_PORT" "$SUBMISSION_PORT" "$SMTPS_PORT"; do
      listening "$port" && open="$port"
    done
    [ -z "$open" ] && return 0
    sleep 0.1
  done
  die "postfix stopped, but 127.0.0.1:$open still accepts connections after 10 s"
}

# ------------------------------------------------------------------------------- commands

prepare() {
  need_root
  installed || cmd_install
  mkdir -p "$DIR" "$LOG"
  # postfix's log belongs to the postfix user: "postfix start" runs postsuper, which writes its
  # warnings (such as the half-written file a stop mid-submission leaves in incoming/) itself
  # while postlogd is down, as postfix; a log it cannot open turns the warning into a failed start.
  touch "$LOG/postfix.log"
  chown postfix "$LOG/postfix.log"
  write_tls
  write_postfix_config
  write_dovecot_config
}

# Before anything starts: every port whose daemon is not running must be free, so that a start
# that cannot succeed leaves nothing half-started.
check_ports() {
  alive "$(sink_pid)" smtp-sink || port_free "$SINK_PORT" smtp-sink
  if ! alive "$(postfix_pid)" master; then
    port_free "$PLAIN_PORT" "postfix plain"
    port_free "$SUBMISSION_PORT" "postfix submission"
    port_free "$SMTPS_PORT" "postfix implicit TLS"
  fi
}

cmd_start() {
  prepare
  check_ports
  purge_stale_queue
  start_sink
  start_dovecot
  start_postfix
  cmd_status
}

cmd_start_postfix() {
  prepare
  check_ports
  start_postfix
}

cmd_stop() {
  need_root
  stop_postfix
  stop_pid "$(dovecot_pid)" dovecot
  stop_pid "$(sink_pid)" smtp-sink
  rm -f "$SINK/smtp-sink.pid"
  say "stopped"
}

cmd_status() {
  local rc=0 pid
  pid=$(sink_pid)
  if alive "$pid" smtp-sink; then echo "smtp-sink running (pid $pid) on 127.0.0.1:$SINK_PORT"
  else echo "smtp-sink stopped"; rc=3; fi
  pid=$(dovecot_pid)
  if alive "$pid" dovecot; then echo "dovecot   running (pid $pid), auth socket $AUTH_SOCKET"
  else echo "dovecot   stopped"; rc=3; fi
  pid=$(postfix_pid)
  if alive "$pid" master; then
    echo "postfix   running (pid $pid) on 127.0.0.1:$SUBMISSION_PORT (STARTTLS), $SMTPS_PORT (TLS), $PLAIN_PORT (plain)"
  else echo "postfix   stopped"; rc=3; fi
  echo "folder    $DIR (certificate $TLS/cert.pem, messages $MAIL, logs $LOG)"
  return $rc
}

# Messages still queued from earlier tests would land in the sink later; let them drain first
# (bounded), and drop what is still queued after that (e.g. deferred while postfix was down).
cmd_clear_messages() {
  need_root
  if alive "$(postfix_pid)" master; then
    local _
    for _ in $(seq 1 30); do
      postqueue -c "$PF_ETC" -j 2>/dev/null | grep -q . || break
      sleep 0.1
    done
    postsuper -c "$PF_ETC" -d ALL >/dev/null 2>&1 || true
  fi
  mkdir -p "$MAIL"
  chown postfix:postfix "$MAIL"
  find "$MAIL" -mindepth 1 -delete
}

# route-defer closed|sink: where defer.test's mail goes from now on; with sink, what is deferred
# is flushed at once. The next start or restart of the bed resets the route to closed.
# The flush waits (bounded, 10 s) for the queue manager of before the reload to exit: a flush that
# reaches that one moves the deferred mail to the active queue just before it exits, and the new
# queue manager is not started until something wakes it, so the mail would sit there for minutes.
cmd_route_defer() {
  local master old _
  need_root
  master=$(postfix_pid)
  alive "$master" master || die "postfix is not running"
  write_transport "${1:-}" >/dev/null
  old=$(child_pid "$master" qmgr)
  postfix -c "$PF_ETC" reload >> "$LOG/postfix-start.log" 2>&1 || die "postfix reload failed"
  if [ -n "$old" ]; then
    for _ in $(seq 1 100); do alive "$old" qmgr || break; sleep 0.1; done
  fi
  postqueue -c "$PF_ETC" -f >> "$LOG/postfix-start.log" 2>&1 || die "postqueue -f failed"
}

# After the shared MariaDB was restarted (it can crash under load): dovecot's auth workers wait
# out a growing back-off before they connect again, and postfix's lookups may hold a dead
# connection; dovecot starts afresh and postfix reloads, so both connect to the new server.
cmd_reconnect() {
  prepare
  alive "$(dovecot_pid)" dovecot || die "dovecot is not running"
  DOVECOT_CHANGED+=reconnect
  start_dovecot
  start_postfix
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  restart-postfix) need_root; stop_postfix; cmd_start_postfix ;;
  stop-postfix) need_root; stop_postfix ;;
  start-postfix) cmd_start_postfix ;;
  clear-messages) cmd_clear_messages ;;
  route-defer) cmd_route_defer "${2:-}" ;;
  reconnect) cmd_reconnect ;;
  *) sed -n '4,5p' "$0" >&2; exit 2 ;;
esac
