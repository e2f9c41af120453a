"""``smtpapi-admin sendkey ...`` and ``smtpapi-admin ratelimit ...``: the sidecar's own state database.

Send keys and embedded rate limits live in ``--state-db`` (never mailcow's database), so these
commands work beside a mailcow MariaDB too. With ``--redis`` the service reads mailcow's limits
from Redis instead (set them in mailcow's UI); the limits here are for setups without it.
"""

from __future__ import annotations

import argparse
from datetime import datetime, time, timezone
from typing import Any

from .state import keys as keystore
from .cli import Admin, Failed, UsageError, allow_from_argument, domain_name, mailbox_address
from .core.ratelimit import parse_limit
from .core.sendkeys import SendKey, new_key, normalise_senders, valid_id


def parse_expiry(text: str) -> float:
    """``YYYY-MM-DD`` (the key stops working when that day begins, UTC) or an RFC 3339 time."""
    try:
        if len(text) == 10:
            day = datetime.strptime(text, "%Y-%m-%d").date()
            return datetime.combine(day, time(0, 0), tzinfo=timezone.utc).timestamp()
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError("--expires takes a date YYYY-MM-DD or a time such as 2027-01-31T12:00:00Z") from None
    if moment.tzinfo is None:
        raise UsageError("--expires: give the time zone, e.g. 2027-01-31T12:00:00Z")
    return moment.timestamp()


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "never"
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_id(text: str) -> str:
    key_id = text.strip().lower()
    if not valid_id(key_id):
        raise UsageError("give the key's id: the 12 hex digits after 'smtpapi-' (see 'sendkey list')")
    return key_id


def sendkey_add(admin: Admin, args: argparse.Namespace) -> int:
    """Create a send key bound to a mailbox login and print it once."""
    login = mailbox_address(args.login)
    if not admin.db.exists("mailbox", "username", login):
        raise Failed(f"{login} is not a mailbox in --db ({admin.db.description})")
    senders = normalise_senders(args.senders.split(",")) if args.senders else ()
    for sender in senders:
        decision = admin.db.authorize_sender(login, sender)
        if not decision.allowed:
            raise Failed(f"{login} may not send as {sender}: {decision.reason}")
    if args.rate is not None and parse_limit(args.rate) is None:
        raise UsageError('--rate takes a limit such as "100 / 1h" (s, m, h or d)')
    allow_from = allow_from_argument(args.allow_from)
    expires = parse_expiry(args.expires) if args.expires else None
    fresh = new_key()
    limit = parse_limit(args.rate)
    key = SendKey(
        key_id=fresh.key_id,
        login=login,
        salt=fresh.salt,
        digest=fresh.digest,
        senders=senders,
        rate=limit.text if limit is not None else None,
        allow_from=allow_from,
        expires_at=expires,
        created_at=datetime.now(timezone.utc).timestamp(),
    )
    conn, dialect = admin.state()
    keystore.insert_key(conn, dialect, key)
    admin.err.write(f"new send key {key.key_id} for {login} (shown once; store it now):\n")
    admin.say(fresh.token)
    return 0


def sendkey_list(admin: Admin, args: argparse.Namespace) -> int:
    """List send keys by id (never the secret)."""
    conn, dialect = admin.state()
    now = datetime.now(timezone.utc).timestamp()
    for key in keystore.list_keys(conn, dialect):
        if key.disabled:
            state = "disabled"
        elif key.expires_at is not None and key.expires_at <= now:
            state = "expired"
        else:
            state = "active"
        admin.say(
            key.key_id,
            key.login,
            state,
            ",".join(key.senders) or "any owned sender",
            key.rate or "no own rate",
            key.allow_from or "any ip",
            f"expires {_when(key.expires_at)}",
        )
    return 0


def sendkey_disable(admin: Admin, args: argparse.Namespace) -> int:
    """Disable a key (or enable it again with --enable); takes effect within --db-cache-ttl."""
    key_id = _key_id(args.key_id)
    conn, dialect = admin.state()
    if not keystore.set_disabled(conn, dialect, key_id, not args.enable):
        raise Failed(f"no send key {key_id}")
    admin.say(f"{'enabled' if args.enable else 'disabled'} send key {key_id}")
    return 0


def sendkey_delete(admin: Admin, args: argparse.Namespace) -> int:
    """Delete a key; takes effect within --db-cache-ttl."""
    key_id = _key_id(args.key_id)
    conn, dialect = admin.state()
    if not keystore.delete_key(conn, dialect, key_id):
        raise Failed(f"no send key {key_id}")
    admin.say(f"deleted send key {key_id}")
    return 0


def _subject(text: str) -> str:
    return mailbox_address(text) if "@" in text else domain_name(text)


def ratelimit_set(admin: Admin, args: argparse.Namespace) -> int:
    """Set the limit of a mailbox or domain, mailcow's way ("100 / 1h")."""
    limit = parse_limit(args.limit)
    if limit is None:
        raise UsageError('the limit looks like "100 / 1h": recipients per second, minute, hour or day (s, m, h, d)')
    subject = _subject(args.subject)
    conn, dialect = admin.state()
    keystore.set_limit(conn, dialect, subject, limit)
    admin.say(subject, limit.text)
    return 0


def ratelimit_list(admin: Admin, args: argparse.Namespace) -> int:
    """List the embedded limits."""
    conn, dialect = admin.state()
    for subject, value in keystore.list_limits(conn, dialect):
        admin.say(subject, value)
    return 0


def ratelimit_delete(admin: Admin, args: argparse.Namespace) -> int:
    """Remove the limit of a mailbox or domain."""
    subject = _subject(args.subject)
    conn, dialect = admin.state()
    return admin.deleted(int(keystore.delete_limit(conn, dialect, subject)), f"limit of {subject}")


def add_commands(commands: Any, group: Any) -> None:
    """The ``sendkey`` and ``ratelimit`` command groups (``group`` makes a group's sub-parsers)."""
    sub = group(commands, "sendkey", "send keys: least-privilege keys bound to one mailbox (state database)")
    add = sub.add_parser("add", help="create a send key for a mailbox and print it once")
    add.add_argument("--login", required=True, metavar="MAILBOX", help="the mailbox the key sends as")
    add.add_argument(
        "--from", dest="senders", metavar="ADDR,...", help="only these senders (each owned by the login); default: all"
    )
    add.add_argument("--rate", metavar='"N / 1h"', help="the key's own limit in recipients per s, m, h or d")
    add.add_argument("--allow-from", metavar="CIDRS", help="IPs and CIDR networks allowed to use the key; default: any")
    add.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD (UTC) or an RFC 3339 time; default: never")
    add.set_defaults(run=sendkey_add)
    sub.add_parser("list", help="list send keys (ids only)").set_defaults(run=sendkey_list)
    disable = sub.add_parser("disable", help="disable a send key (--enable turns it back on)")
    disable.add_argument("key_id", metavar="KEY_ID")
    disable.add_argument("--enable", action="store_true", help="enable the key again")
    disable.set_defaults(run=sendkey_disable)
    delete = sub.add_parser("delete", help="delete a send key")
    delete.add_argument("key_id", metavar="KEY_ID")
    delete.set_defaults(run=sendkey_delete)

    sub = group(commands, "ratelimit", "rate limits per mailbox or domain, used without --redis (state database)")
    setter = sub.add_parser("set", help='LOGIN-OR-DOMAIN "N / 1h": at most N recipients per frame')
    setter.add_argument("subject", metavar="LOGIN-OR-DOMAIN")
    setter.add_argument("limit", metavar='"N / 1h"')
    setter.set_defaults(run=ratelimit_set)
    sub.add_parser("list", help="list limits").set_defaults(run=ratelimit_list)
    delete = sub.add_parser("delete", help="remove the limit of a mailbox or domain")
    delete.add_argument("subject", metavar="LOGIN-OR-DOMAIN")
    delete.set_defaults(run=ratelimit_delete)
