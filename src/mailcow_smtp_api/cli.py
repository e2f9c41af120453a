"""``smtpapi-admin``: manage the embedded database, and ask any database who may send as whom.

Writes (init, add, delete) work on the embedded SQLite database only: the sidecar never writes to
mailcow's MariaDB, which mailcow's own UI manages. ``check-sender`` and ``check-schema`` work on
both. Exit status: 0 success (``allow``), 1 failure (``deny``, missing row, database trouble),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

import bcrypt
import idna

from .mailcow import db
from .core.apikeys import ApiKey, normalise_key, parse_allow_from, split_allow_from
from .core.config import OPTION_DEFAULTS, default_db_url, env_name
from .core.senders import smtp_access_granted, split_owners

PROG = "smtpapi-admin"
DEFAULT_STATE_DB = OPTION_DEFAULTS["state-db"]

# What mailcow writes into mailbox.attributes for a new mailbox (the keys the sidecar and postfix
# read, plus mailcow's usual defaults).
MAILBOX_ATTRIBUTES: dict[str, str] = {
    "force_pw_update": "0",
    "tls_enforce_in": "0",
    "tls_enforce_out": "0",
    "sogo_access": "1",
    "imap_access": "1",
    "pop3_access": "1",
    "smtp_access": "1",
    "sieve_access": "1",
    "relayhost": "0",
    "passwd_update": "",
    "mailbox_format": "maildir:",
    "quarantine_notification": "hourly",
    "quarantine_category": "reject",
}
BCRYPT_ROUNDS = 10  # PHP's password_hash() default, which mailcow uses
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")


class UsageError(Exception):
    """Bad arguments: exit 2 with a message."""


class Failed(Exception):
    """The command could not be done: exit 1 with a message."""


# --------------------------------------------------------------------------- argument values


def domain_name(text: str) -> str:
    """A domain as mailcow stores it: IDNA A-labels, lower case."""
    text = text.strip().rstrip(".")
    try:
        ascii_name = idna.encode(text, uts46=True).decode("ascii")
    except idna.IDNAError:
        raise UsageError(f"not a domain name: {text!r}") from None
    if "." not in ascii_name:
        raise UsageError(f"not a domain name: {text!r} (needs a dot)")
    return ascii_name.lower()


def mailbox_address(text: str) -> str:
    """``local@domain`` with a plain local part, lower-cased as mailcow stores it."""
    local, at, domain = text.strip().rpartition("@")
    if not at or not local or not _LOCAL_PART.fullmatch(local):
        raise UsageError(f"not a mailbox address: {text!r}")
    return f"{local.lower()}@{domain_name(domain)}"


def alias_address(text: str) -> str:
    """An alias address: ``local@domain``, or ``@domain`` for a catch-all."""
    text = text.strip()
    if text.startswith("@"):
        return "@" + domain_name(text[1:])
    return mailbox_address(text)


def send_as_value(text: str) -> str:
    """A sender_acl ``send_as``: an address, ``@domain`` or ``*``."""
    return "*" if text.strip() == "*" else alias_address(text)


def goto_list(text: str) -> str:
    """A comma-separated goto list; each entry must be an address."""
    targets = split_owners(text)
    if not targets:
        raise UsageError("goto needs at least one address")
    return ",".join(mailbox_address(t) for t in targets)


def new_api_key() -> str:
    """A key in mailcow's format: five groups of six upper-case hex digits."""
    return "-".join(secrets.token_hex(3).upper() for _ in range(5))


def blf_crypt(password: str, rounds: int = BCRYPT_ROUNDS) -> str:
    """``{BLF-CRYPT}`` + a bcrypt hash with the ``$2y$`` prefix that mailcow and dovecot write."""
    hashed = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")
    return "{BLF-CRYPT}$2y$" + hashed[4:]


def allow_from_argument(text: str | None) -> str:
    """An ``--allow-from`` list, checked and joined with commas; empty when not given."""
    if text is None:
        return ""
    entries = split_allow_from(text)
    if not entries or len(parse_allow_from(text)) != len(entries):
        raise UsageError("--allow-from takes IP addresses and CIDR networks separated by commas")
    return ",".join(entries)


def read_password(args: argparse.Namespace, stdin: IO[str]) -> str:
    """The new mailbox password: from stdin, from --password, or typed twice at a prompt."""
    if args.password_stdin:
        password = stdin.readline().rstrip("\r\n")
    elif args.password is not None:
        password = args.password
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password again: ") != password:
            raise UsageError("the passwords differ")
    if not password:
        raise UsageError("the password is empty")
    return password


# --------------------------------------------------------------------------- commands


class Admin:
    """The commands, over one open database."""

    def __init__(
        self,
        database: db.BlockingDatabase,
        out: IO[str],
        err: IO[str],
        stdin: IO[str],
        state_url: str = "",
        db_url: str = "",
    ) -> None:
        self.db = database
        self.out = out
        self.err = err
        self.stdin = stdin
        self.state_url = state_url
        self.db_url = db_url
        self._state: tuple[Any, db.Dialect] | None = None

    def state(self) -> tuple[Any, db.Dialect]:
        """The ``--state-db`` connection (send keys, embedded rate limits), opened on first use."""
        if self._state is None:
            from .state.keys import create_tables
            from .state.store import connect_state_blocking

            try:
                conn, dialect = connect_state_blocking(self.state_url, mailcow_db=self.db_url)
            except ValueError as exc:
                raise UsageError(f"--state-db: {exc}") from None
            self._state = (conn, dialect)
            create_tables(conn, dialect)
        return self._state

    def close(self) -> None:
        """Close both databases."""
        self.db.close()
        if self._state is not None:
            self._state[0].close()

    def say(self, *fields: Any) -> None:
        """One tab-separated line on stdout."""
        self.out.write("\t".join(str(f) for f in fields) + "\n")

    def need_writable(self) -> None:
        """Refuse writes outside the embedded database."""
        if not self.db.writable:
            raise UsageError(
                "this command changes the embedded database only (--db sqlite:PATH); "
                "mailcow's MariaDB is managed in mailcow"
            )

    def deleted(self, count: int, what: str) -> int:
        """Report a delete; exit 1 when nothing matched."""
        if count == 0:
            raise Failed(f"no such {what}")
        self.say(f"deleted {what}")
        return 0

    # init / schema -------------------------------------------------------

    def init(self, args: argparse.Namespace) -> int:
        """Create the embedded database's tables (done on opening; this reports it)."""
        self.need_writable()
        problems = self.db.check_schema()
        if problems:
            raise Failed("; ".join(problems))
        self.say(f"ready: {self.db.description}")
        return 0

    def check_schema(self, args: argparse.Namespace) -> int:
        """Say what the database lacks of the tables and columns the sidecar reads."""
        problems = self.db.check_schema()
        for problem in problems:
            self.say(problem)
        if not problems:
            self.say("schema ok")
        return 1 if problems else 0

    # domains ---------------------------------------------------------------

    def domain_add(self, args: argparse.Namespace) -> int:
        """Add a domain."""
        self.need_writable()
        name = domain_name(args.domain)
        if self.db.exists("alias_domain", "alias_domain", name):
            raise Failed(f"{name} is an alias domain")
        self.db.insert("domain", {"domain": name, "active": 0 if args.inactive else 1})
        self.say(f"added domain {name}")
        return 0

    def domain_list(self, args: argparse.Namespace) -> int:
        """List domains."""
        for row in self.db.rows("domain"):
            self.say(row["domain"], "active" if row["active"] == 1 else "inactive")
        return 0

    def domain_delete(self, args: argparse.Namespace) -> int:
        """Delete an empty domain with its aliases and the alias domains pointing to it."""
        self.need_writable()
        name = domain_name(args.domain)
        if not self.db.exists("domain", "domain", name):
            raise Failed(f"no such domain {name}")
        if any(row["username"].endswith("@" + name) for row in self.db.rows("mailbox")):
            raise Failed(f"{name} still has mailboxes; delete them first")
        counts = self.db.delete_many(
            [("domain", {"domain": name}), ("alias", {"domain": name}), ("alias_domain", {"target_domain": name})]
        )
        return self.deleted(counts[0], f"domain {name}")

    # mailboxes -----------------------------------------------------------

    def mailbox_add(self, args: argparse.Namespace) -> int:
        """Add a mailbox with a {BLF-CRYPT} password, its attributes, and its self-alias, as mailcow does."""
        self.need_writable()
        username = mailbox_address(args.address)
        local, _, domain = username.rpartition("@")
        if not self.db.exists("domain", "domain", domain):
            raise Failed(f"domain {domain} does not exist; add it with: {PROG} domain add {domain}")
        if self.db.exists("alias", "address", username):
            raise Failed(f"{username} exists already as an alias")
        password = read_password(args, self.stdin)
        attributes = dict(MAILBOX_ATTRIBUTES, smtp_access="0" if args.no_smtp_access else "1")
        mailbox = {
            "username": username,
            "password": blf_crypt(password, args.bcrypt_rounds),
            "name": args.name or local,
            "local_part": local,
            "domain": domain,
            "kind": args.kind,
            "attributes": json.dumps(attributes),
            "authsource": "mailcow",
            "active": args.active,
        }
        self_alias = {"address": username, "goto": username, "domain": domain, "active": 1, "sender_allowed": 1}
        self.db.insert_many([("mailbox", mailbox), ("alias", self_alias)])
        self.say(f"added mailbox {username}")
        return 0

    def mailbox_list(self, args: argparse.Namespace) -> int:
        """List mailboxes (never their password hashes)."""
        for row in self.db.rows("mailbox"):
            smtp = "smtp" if smtp_access_granted(row["attributes"]) else "no-smtp"
            self.say(row["username"], f"active={row['active']}", f"kind={row['kind'] or '-'}", smtp)
        return 0

    def mailbox_delete(self, args: argparse.Namespace) -> int:
        """Delete a mailbox, its self-alias and its sender_acl grants."""
        self.need_writable()
        username = mailbox_address(args.address)
        if not self.db.exists("mailbox", "username", username):
            raise Failed(f"no such mailbox {username}")
        counts = self.db.delete_many(
            [
                ("mailbox", {"username": username}),
                ("alias", {"address": username, "goto": username}),
                ("sender_acl", {"logged_in_as": username}),
            ]
        )
        return self.deleted(counts[0], f"mailbox {username}")

    # aliases ---------------------------------------------------------------

    def alias_add(self, args: argparse.Namespace) -> int:
        """Add an alias (or a catch-all ``@domain``)."""
        self.need_writable()
        address, goto = alias_address(args.address), goto_list(args.goto)
        domain = address.rpartition("@")[2]
        if not (self.db.exists("domain", "domain", domain) or self.db.exists("alias_domain", "alias_domain", domain)):
            raise Failed(f"{domain} is neither a domain nor an alias domain")
        if self.db.exists("mailbox", "username", address):
            raise Failed(f"{address} is a mailbox")
        row = {
            "address": address,
            "goto": goto,
            "domain": domain,
            "active": args.active,
            "sender_allowed": 0 if args.no_send else 1,
        }
        self.db.insert("alias", row)
        self.say(f"added alias {address} -> {row['goto']}")
        return 0

    def alias_list(self, args: argparse.Namespace) -> int:
        """List aliases, self-aliases included."""
        for row in self.db.rows("alias"):
            self.say(row["address"], row["goto"], f"active={row['active']}", f"sender_allowed={row['sender_allowed']}")
        return 0

    def alias_delete(self, args: argparse.Namespace) -> int:
        """Delete an alias."""
        self.need_writable()
        address = alias_address(args.address)
        return self.deleted(self.db.delete("alias", {"address": address}), f"alias {address}")

    # alias domains ---------------------------------------------------------

    def alias_domain_add(self, args: argparse.Namespace) -> int:
        """Add an alias domain for an existing domain."""
        self.need_writable()
        alias, target = domain_name(args.alias_domain), domain_name(args.target_domain)
        if not self.db.exists("domain", "domain", target):
            raise Failed(f"target domain {target} does not exist")
        if self.db.exists("domain", "domain", alias):
            raise Failed(f"{alias} is a domain")
        self.db.insert(
            "alias_domain", {"alias_domain": alias, "target_domain": target, "active": 0 if args.inactive else 1}
        )
        self.say(f"added alias domain {alias} -> {target}")
        return 0

    def alias_domain_list(self, args: argparse.Namespace) -> int:
        """List alias domains."""
        for row in self.db.rows("alias_domain"):
            self.say(row["alias_domain"], row["target_domain"], "active" if row["active"] == 1 else "inactive")
        return 0

    def alias_domain_delete(self, args: argparse.Namespace) -> int:
        """Delete an alias domain."""
        self.need_writable()
        alias = domain_name(args.alias_domain)
        return self.deleted(self.db.delete("alias_domain", {"alias_domain": alias}), f"alias domain {alias}")

    # sender_acl ------------------------------------------------------------

    def sender_acl_add(self, args: argparse.Namespace) -> int:
        """Let a mailbox send as an address, ``@domain`` or ``*`` (``--external`` marks a foreign address)."""
        self.need_writable()
        login, send_as = mailbox_address(args.login), send_as_value(args.send_as)
        if not self.db.exists("mailbox", "username", login):
            raise Failed(f"{login} is not a mailbox")
        self.db.insert("sender_acl", {"logged_in_as": login, "send_as": send_as, "external": int(args.external)})
        self.say(f"added sender_acl {login} may send as {send_as}")
        return 0

    def sender_acl_list(self, args: argparse.Namespace) -> int:
        """List sender_acl rows."""
        for row in self.db.rows("sender_acl"):
            self.say(row["logged_in_as"], row["send_as"], "external" if row["external"] == 1 else "internal")
        return 0

    def sender_acl_delete(self, args: argparse.Namespace) -> int:
        """Delete the sender_acl rows for one login and send_as."""
        self.need_writable()
        login, send_as = mailbox_address(args.login), send_as_value(args.send_as)
        count = self.db.delete("sender_acl", {"logged_in_as": login, "send_as": send_as})
        return self.deleted(count, f"sender_acl {login} -> {send_as}")

    # API keys --------------------------------------------------------------

    def apikey_add(self, args: argparse.Namespace) -> int:
        """Create an API key and print it once."""
        self.need_writable()
        allow_from = allow_from_argument(args.allow_from)
        key = new_api_key()
        row = {
            "api_key": key,
            "allow_from": allow_from,
            "skip_ip_check": int(args.skip_ip_check),
            "access": "ro" if args.ro else "rw",
            "active": 1,
        }
        self.db.insert("api", row)
        self.err.write("new API key (shown once; store it now):\n")
        self.say(key)
        return 0

    def apikey_list(self, args: argparse.Namespace) -> int:
        """List API keys by their first group only."""
        for key in self.db.api_keys():
            self.say(
                key.label,
                key.access,
                "active" if key.active else "inactive",
                "any ip" if key.skip_ip_check else (key.allow_from or "no ip allowed"),
            )
        return 0

    def apikey_delete(self, args: argparse.Namespace) -> int:
        """Delete an API key given in full or by a unique prefix of at least six characters."""
        self.need_writable()
        wanted = normalise_key(args.key).upper()
        if len(wanted) < 6:
            raise UsageError("give the key or at least its first six characters")
        matches = [k for k in self.db.api_keys() if _key_matches(k, wanted)]
        if len(matches) > 1:
            raise Failed(f"{len(matches)} keys start with {wanted}; give more of the key")
        if not matches:
            raise Failed("no such API key")
        self.db.delete("api", {"api_key": matches[0].api_key})
        self.say(f"deleted API key {matches[0].label}")
        return 0

    # check-sender ----------------------------------------------------------

    def check_sender(self, args: argparse.Namespace) -> int:
        """Print ``allow <rule>`` (exit 0) or ``deny <reason>`` (exit 1); ``-`` reads pairs from stdin."""
        if args.login == "-":
            if args.sender is not None:
                raise UsageError("check-sender - reads LOGIN SENDER pairs from stdin and takes no SENDER")
            return self._check_batch()
        if args.sender is None:
            raise UsageError("check-sender needs LOGIN SENDER (or - to read pairs from stdin)")
        return self._check_one(args.login, args.sender)

    def _check_one(self, login: str, sender: str) -> int:
        decision = self.db.authorize_sender(login, sender)
        self.say(("allow " if decision.allowed else "deny ") + decision.reason)
        return 0 if decision.allowed else 1

    def _check_batch(self) -> int:
        """One line per pair, in input order; exit 0 when every pair is allowed, else 1."""
        status = 0
        for number, line in enumerate(self.stdin, start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) != 2:
                self.say(f"deny line {number}: expected LOGIN SENDER")
                status = 1
                continue
            status = max(status, self._check_one(fields[0], fields[1]))
        return status


def _key_matches(key: ApiKey, wanted: str) -> bool:
    return key.api_key.upper().startswith(wanted)


# --------------------------------------------------------------------------- argument parsing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the embedded database of mailcow-smtp-api, and check who may send as whom.",
        epilog="Exit status: 0 done (check-sender: allow), 1 failed (check-sender: deny), 2 bad arguments. "
        "Commands that change data work on the embedded SQLite database only.",
    )
    parser.add_argument(
        "--db",
        metavar="URL",
        help="sqlite:PATH (embedded) or mysql://USER:PASS@HOST:PORT/NAME; default: $SMTPAPI_DB, "
        "then mailcow's DBNAME/DBUSER/DBPASS/DBHOST, then sqlite:smtpapi.sqlite",
    )
    parser.add_argument(
        "--state-db",
        metavar="URL",
        help="the sidecar's own database (send keys, rate limits without Redis): sqlite:PATH or mysql://...; "
        f"default: ${env_name('state-db')}, then {DEFAULT_STATE_DB}",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("init", help="create the embedded database's tables").set_defaults(run=Admin.init)
    commands.add_parser("check-schema", help="say what the database lacks").set_defaults(run=Admin.check_schema)

    check = commands.add_parser("check-sender", help="may LOGIN send as SENDER? (- reads pairs from stdin)")
    check.add_argument("login", metavar="LOGIN")
    check.add_argument("sender", metavar="SENDER", nargs="?")
    check.set_defaults(run=Admin.check_sender)

    _domain_commands(commands)
    _mailbox_commands(commands)
    _alias_commands(commands)
    _acl_commands(commands)
    _apikey_commands(commands)
    from . import keyadmin  # it imports this module's Admin and errors

    keyadmin.add_commands(commands, _group)
    return parser


def _group(commands: Any, name: str, help_text: str) -> Any:
    parser = commands.add_parser(name, help=help_text)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def _simple(sub: Any, name: str, run: Callable[..., int], *positional: str, help_text: str = "") -> Any:
    parser = sub.add_parser(name, help=help_text)
    for arg in positional:
        parser.add_argument(arg.lower(), metavar=arg)
    parser.set_defaults(run=run)
    return parser


def _domain_commands(commands: Any) -> None:
    sub = _group(commands, "domain", "domains")
    add = _simple(sub, "add", Admin.domain_add, "DOMAIN", help_text="add a domain")
    add.add_argument("--inactive", action="store_true", help="add it with active = 0")
    _simple(sub, "list", Admin.domain_list, help_text="list domains")
    _simple(sub, "delete", Admin.domain_delete, "DOMAIN", help_text="delete a domain without mailboxes")


def _mailbox_commands(commands: Any) -> None:
    sub = _group(commands, "mailbox", "mailboxes")
    add = sub.add_parser("add", help="add a mailbox (and its self-alias)")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--name", help="display name (default: the local part)")
    source = add.add_mutually_exclusive_group()
    source.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    source.add_argument(
        "--password",
        help="the password on the command line: INSECURE, other users can read it in the process list",
    )
    add.add_argument("--active", type=int, choices=(0, 1, 2), default=1, help="1 on, 0 off, 2 receive-only")
    add.add_argument("--kind", default="", choices=("", "location", "thing", "group"), help="a resource kind")
    add.add_argument("--no-smtp-access", action="store_true", help="store smtp_access = 0")
    add.add_argument(
        "--bcrypt-rounds", type=int, default=BCRYPT_ROUNDS, choices=range(4, 32), metavar="N", help=argparse.SUPPRESS
    )
    add.set_defaults(run=Admin.mailbox_add)
    _simple(sub, "list", Admin.mailbox_list, help_text="list mailboxes")
    _simple(sub, "delete", Admin.mailbox_delete, "ADDRESS", help_text="delete a mailbox")


def _alias_commands(commands: Any) -> None:
    sub = _group(commands, "alias", "aliases")
    add = _simple(
        sub, "add", Admin.alias_add, "ADDRESS", "GOTO", help_text="add ADDRESS (or @DOMAIN) -> GOTO[,GOTO...]"
    )
    add.add_argument("--active", type=int, choices=(0, 1, 2), default=1, help="1 on, 0 off, 2 receive-only")
    add.add_argument("--no-send", action="store_true", help="sender_allowed = 0: its targets may not send as it")
    _simple(sub, "list", Admin.alias_list, help_text="list aliases")
    _simple(sub, "delete", Admin.alias_delete, "ADDRESS", help_text="delete an alias")

    sub = _group(commands, "alias-domain", "alias domains")
    add = _simple(sub, "add", Admin.alias_domain_add, "ALIAS_DOMAIN", "TARGET_DOMAIN", help_text="add an alias domain")
    add.add_argument("--inactive", action="store_true", help="add it with active = 0")
    _simple(sub, "list", Admin.alias_domain_list, help_text="list alias domains")
    _simple(sub, "delete", Admin.alias_domain_delete, "ALIAS_DOMAIN", help_text="delete an alias domain")


def _acl_commands(commands: Any) -> None:
    sub = _group(commands, "sender-acl", "extra send-as rights (sender_acl)")
    add = _simple(sub, "add", Admin.sender_acl_add, "LOGIN", "SEND_AS", help_text="LOGIN may send as SEND_AS")
    add.add_argument("--external", action="store_true", help="SEND_AS is an address outside mailcow")
    _simple(sub, "list", Admin.sender_acl_list, help_text="list sender_acl rows")
    _simple(sub, "delete", Admin.sender_acl_delete, "LOGIN", "SEND_AS", help_text="delete sender_acl rows")


def _apikey_commands(commands: Any) -> None:
    sub = _group(commands, "apikey", "API keys (X-API-Key)")
    add = sub.add_parser("add", help="create a key and print it once")
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument("--allow-from", metavar="LIST", help="IPs and CIDR networks allowed to use the key")
    where.add_argument("--skip-ip-check", action="store_true", help="allow the key from any address")
    add.add_argument("--ro", action="store_true", help="read-only key (cannot send)")
    add.set_defaults(run=Admin.apikey_add)
    _simple(sub, "list", Admin.apikey_list, help_text="list keys (first group only)")
    _simple(sub, "delete", Admin.apikey_delete, "KEY", help_text="delete a key (full, or a unique prefix)")


# --------------------------------------------------------------------------- entry point


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run one admin command; return the exit status (0 ok/allow, 1 failed/deny, 2 bad arguments)."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    parser = _parser()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage message (or --help)
        return int(exit_.code or 0)
    db_url = args.db or default_db_url(os.environ)
    state_url = args.state_db or os.environ.get(env_name("state-db")) or str(DEFAULT_STATE_DB)
    try:
        database = db.connect_blocking(db_url)
    except ValueError as exc:
        stderr.write(f"{PROG}: error: --db: {exc}\n")
        return 2
    except db.DatabaseFailure as exc:
        stderr.write(f"{PROG}: cannot open the database: {exc}\n")
        return 1
    admin = Admin(database, stdout, stderr, stdin, state_url, db_url)
    try:
        return int(args.run(admin, args))
    except UsageError as exc:
        parser.print_usage(stderr)
        stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except db.ReadOnlyDatabase as exc:
        stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except db.Conflict:
        stderr.write(f"{PROG}: that entry exists already\n")
        return 1
    except (Failed, db.DatabaseFailure) as exc:
        stderr.write(f"{PROG}: {exc}\n")
        return 1
    finally:
        admin.close()
