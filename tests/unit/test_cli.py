"""smtpapi-admin on a temporary embedded database: every command, check-sender, usage errors."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from typing import Any

import attrs
import bcrypt
import pytest
from passlib.hash import bcrypt as passlib_bcrypt

from mailcow_smtp_api import cli

KEY_FORMAT = re.compile(r"[0-9A-F]{6}(-[0-9A-F]{6}){4}")


@attrs.frozen
class Run:
    """What one command printed and returned."""

    status: int
    out: str
    err: str


@pytest.fixture
def admin(tmp_path: Any) -> Any:
    """Run smtpapi-admin against a fresh embedded database file."""
    url = f"sqlite:{tmp_path / 'admin.sqlite'}"

    def run(*argv: str, stdin: str = "") -> Run:
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--db", url, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
        return Run(status, out.getvalue(), err.getvalue())

    return run


@pytest.fixture
def rows(tmp_path: Any) -> Any:
    """Read rows of the embedded database directly."""

    def query(sql: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(tmp_path / "admin.sqlite") as conn:
            return conn.execute(sql).fetchall()

    return query


@pytest.fixture
def populated(admin: Any) -> Any:
    """example.org with user1 and user2, and an alias shared@ for both."""
    assert admin("domain", "add", "Example.ORG").status == 0
    assert (
        admin("mailbox", "add", "User1@example.org", "--password-stdin", "--bcrypt-rounds", "4", stdin="pw1\n").status
        == 0
    )
    assert (
        admin("mailbox", "add", "user2@example.org", "--password-stdin", "--bcrypt-rounds", "4", stdin="pw2\n").status
        == 0
    )
    assert admin("alias", "add", "shared@example.org", "user1@example.org, user2@example.org").status == 0
    return admin


def test_init_creates_the_schema(admin: Any, rows: Any) -> None:
    """init leaves a database with every table the sidecar reads."""
    result = admin("init")
    assert result.status == 0 and result.out.startswith("ready: sqlite:")
    tables = {name for (name,) in rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"domain", "mailbox", "alias", "alias_domain", "sender_acl", "api", "app_passwd"} <= tables
    assert admin("check-schema").out == "schema ok\n"


def test_domain_add_list_delete(admin: Any) -> None:
    """Domains are stored lower-case in IDNA form, listed, and deleted."""
    assert admin("domain", "add", "Bücher.Example").status == 0
    assert admin("domain", "add", "off.example", "--inactive").status == 0
    assert admin("domain", "list").out == "off.example\tinactive\nxn--bcher-kva.example\tactive\n"
    assert admin("domain", "add", "off.example").status == 1  # exists already
    assert admin("domain", "delete", "off.example").status == 0
    assert admin("domain", "delete", "off.example").status == 1
    assert admin("domain", "list").out == "xn--bcher-kva.example\tactive\n"


def test_mailbox_add_stores_a_mailcow_compatible_mailbox(populated: Any, rows: Any) -> None:
    """A {BLF-CRYPT} $2y$ hash of the password, smtp_access "1", and the self-alias, as mailcow writes them."""
    [(password, attributes, local, domain, active)] = rows(
        "SELECT password, attributes, local_part, domain, active FROM mailbox WHERE username = 'user1@example.org'"
    )
    assert password.startswith("{BLF-CRYPT}$2y$04$")
    crypt = password[len("{BLF-CRYPT}") :]
    assert passlib_bcrypt.verify("pw1", crypt) and not passlib_bcrypt.verify("pw2", crypt)
    assert bcrypt.checkpw(b"pw1", b"$2b$" + crypt[4:].encode())
    assert json.loads(attributes)["smtp_access"] == "1"
    assert (local, domain, active) == ("user1", "example.org", 1)
    assert rows(
        "SELECT address, goto, domain, active, sender_allowed FROM alias WHERE address = 'user1@example.org'"
    ) == [("user1@example.org", "user1@example.org", "example.org", 1, 1)]


def test_mailbox_list_and_delete(populated: Any, rows: Any) -> None:
    """Mailboxes are listed without hashes; deleting one removes its self-alias and grants."""
    assert populated("sender-acl", "add", "user2@example.org", "@example.org").status == 0
    listing = populated("mailbox", "list").out
    assert listing == "user1@example.org\tactive=1\tkind=-\tsmtp\nuser2@example.org\tactive=1\tkind=-\tsmtp\n"
    assert populated("mailbox", "delete", "user2@example.org").status == 0
    assert rows("SELECT COUNT(*) FROM alias WHERE address = 'user2@example.org'") == [(0,)]
    assert rows("SELECT COUNT(*) FROM sender_acl") == [(0,)]
    assert populated("mailbox", "delete", "user2@example.org").status == 1


def test_mailbox_add_checks_its_domain_and_password(admin: Any) -> None:
    """A mailbox needs an existing domain and a non-empty password."""
    missing = admin("mailbox", "add", "a@nowhere.example", "--password-stdin", stdin="x\n")
    assert missing.status == 1 and "domain nowhere.example does not exist" in missing.err
    admin("domain", "add", "example.org")
    empty = admin("mailbox", "add", "a@example.org", "--password-stdin", stdin="\n")
    assert empty.status == 2 and "the password is empty" in empty.err


def test_mailbox_password_prompt_must_match(admin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --password-stdin the password is typed twice; a mismatch is refused."""
    answers = iter(["one", "two"])
    monkeypatch.setattr(cli.getpass, "getpass", lambda prompt: next(answers))
    admin("domain", "add", "example.org")
    result = admin("mailbox", "add", "a@example.org")
    assert result.status == 2 and "the passwords differ" in result.err


def test_mailbox_options(admin: Any, rows: Any) -> None:
    """--active, --kind and --no-smtp-access end up in the row."""
    admin("domain", "add", "example.org")
    result = admin(
        "mailbox",
        "add",
        "room@example.org",
        "--password",
        "x",
        "--kind",
        "location",
        "--active",
        "2",
        "--no-smtp-access",
        "--bcrypt-rounds",
        "4",
    )
    assert result.status == 0
    [(kind, active, attributes)] = rows("SELECT kind, active, attributes FROM mailbox")
    assert (kind, active, json.loads(attributes)["smtp_access"]) == ("location", 2, "0")


def test_alias_add_list_delete(populated: Any) -> None:
    """Aliases and catch-alls are stored with normalised goto lists; --no-send clears sender_allowed."""
    assert populated("alias", "add", "@example.org", "user1@example.org", "--no-send").status == 0
    listing = populated("alias", "list").out.splitlines()
    assert "@example.org\tuser1@example.org\tactive=1\tsender_allowed=0" in listing
    assert "shared@example.org\tuser1@example.org,user2@example.org\tactive=1\tsender_allowed=1" in listing
    assert populated("alias", "add", "x@elsewhere.example", "user1@example.org").status == 1
    assert populated("alias", "add", "user1@example.org", "user2@example.org").status == 1  # a mailbox
    assert populated("alias", "delete", "shared@example.org").status == 0
    assert (
        populated("check-sender", "user1@example.org", "shared@example.org").out
        == "deny no owner for shared@example.org\n"
    )


def test_alias_domain_add_list_delete(populated: Any) -> None:
    """An alias domain lets mailboxes send under it; deleting it takes that away."""
    assert populated("alias-domain", "add", "alias.example", "example.org").status == 0
    assert populated("alias-domain", "add", "other.example", "missing.example").status == 1
    assert populated("alias-domain", "list").out == "alias.example\texample.org\tactive\n"
    assert populated("check-sender", "user1@example.org", "user1@alias.example").out == (
        "allow alias domain alias.example -> user1@example.org\n"
    )
    assert populated("alias-domain", "delete", "alias.example").status == 0
    assert populated("check-sender", "user1@example.org", "user1@alias.example").status == 1


def test_sender_acl_add_list_delete(populated: Any) -> None:
    """sender_acl rows grant send-as rights, --external included, until deleted."""
    assert populated("sender-acl", "add", "user2@example.org", "boss@gmail.example", "--external").status == 0
    assert populated("sender-acl", "add", "ghost@example.org", "*").status == 1  # not a mailbox
    assert populated("sender-acl", "list").out == "user2@example.org\tboss@gmail.example\texternal\n"
    assert (
        populated("check-sender", "user2@example.org", "boss@gmail.example").out
        == "allow sender_acl boss@gmail.example\n"
    )
    assert populated("sender-acl", "delete", "user2@example.org", "boss@gmail.example").status == 0
    assert populated("check-sender", "user2@example.org", "boss@gmail.example").status == 1


def test_apikey_add_prints_the_key_once(admin: Any, rows: Any) -> None:
    """A new key has mailcow's format, is printed once, and listings show only its first group."""
    result = admin("apikey", "add", "--allow-from", "192.0.2.0/24, 2001:db8::1", "--ro")
    assert result.status == 0
    key = result.out.strip()
    assert KEY_FORMAT.fullmatch(key)
    assert rows("SELECT api_key, allow_from, skip_ip_check, access, active FROM api") == [
        (key, "192.0.2.0/24,2001:db8::1", 0, "ro", 1)
    ]
    listing = admin("apikey", "list").out
    assert key not in listing and listing == f"{key[:6]}-...\tro\tactive\t192.0.2.0/24,2001:db8::1\n"


def test_apikey_needs_a_valid_ip_rule(admin: Any) -> None:
    """A key needs --allow-from with valid entries or --skip-ip-check, not both."""
    assert admin("apikey", "add").status == 2
    assert admin("apikey", "add", "--allow-from", "10.0.0.0/8,junk").status == 2
    assert admin("apikey", "add", "--allow-from", "10.0.0.1", "--skip-ip-check").status == 2
    skip = admin("apikey", "add", "--skip-ip-check")
    assert skip.status == 0 and admin("apikey", "list").out.endswith("\trw\tactive\tany ip\n")


def test_apikey_delete_by_prefix(admin: Any) -> None:
    """A key is deleted by its full value or a unique prefix of six or more characters."""
    key = admin("apikey", "add", "--skip-ip-check").out.strip()
    assert admin("apikey", "delete", key[:3]).status == 2
    assert admin("apikey", "delete", "000000-nope").status == 1
    assert admin("apikey", "delete", key[:6].lower()).status == 0
    assert admin("apikey", "list").out == ""


def test_check_sender_single(populated: Any) -> None:
    """check-sender prints allow with the rule and exits 0, or deny with the reason and exits 1."""
    allowed = populated("check-sender", "user2@example.org", "shared@example.org")
    assert (allowed.status, allowed.out) == (
        0,
        "allow alias shared@example.org -> user1@example.org,user2@example.org\n",
    )
    denied = populated("check-sender", "user2@example.org", "user1@example.org")
    assert (denied.status, denied.out) == (
        1,
        "deny user1@example.org is owned by user1@example.org, not by user2@example.org\n",
    )


def test_check_sender_batch_answers_each_pair_in_order(populated: Any) -> None:
    """check-sender - prints one line per LOGIN SENDER pair, in input order."""
    pairs = (
        "user1@example.org user1+news@example.org\n"
        "\n"
        "user2@example.org user1@example.org\n"
        "only-one-field\n"
        "user2@example.org shared@example.org\n"
    )
    result = populated("check-sender", "-", stdin=pairs)
    assert result.out.splitlines() == [
        "allow own mailbox (as user1@example.org, without the +tag)",
        "deny user1@example.org is owned by user1@example.org, not by user2@example.org",
        "deny line 4: expected LOGIN SENDER",
        "allow alias shared@example.org -> user1@example.org,user2@example.org",
    ]
    assert result.status == 1
    assert populated("check-sender", "-", stdin="user1@example.org user1@example.org\n").status == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["domain"],
        ["domain", "add"],
        ["check-sender"],
        ["check-sender", "user1@example.org"],
        ["check-sender", "-", "extra"],
        ["mailbox", "add", "no-at-sign", "--password", "x"],
        ["mailbox", "add", "a@example.org", "--active", "7"],
        ["alias", "add", "a@example.org", ""],
    ],
)
def test_bad_arguments_print_usage_and_exit_2(admin: Any, argv: list[str]) -> None:
    """Bad arguments print a usage message and exit 2."""
    result = admin(*argv)
    assert result.status == 2
    assert "usage:" in result.err


def test_bad_db_url_exits_2(tmp_path: Any) -> None:
    """An unusable --db value is a usage error."""
    err = io.StringIO()
    assert cli.main(["--db", "postgres://x", "check-schema"], stderr=err, stdout=io.StringIO()) == 2
    assert "--db" in err.getvalue()


def test_unreachable_database_exits_1() -> None:
    """A database that cannot be opened is a failure, not a usage error."""
    err = io.StringIO()
    status = cli.main(["--db", "mysql://u:secret@127.0.0.1:1/x", "check-sender", "a@b.c", "a@b.c"], stderr=err)
    assert status == 1
    assert "cannot open the database" in err.getvalue() and "secret" not in err.getvalue()
