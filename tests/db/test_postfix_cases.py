"""tests/sender_cases.py (checked against the real postfix on the test bed) against the pure rule and the SQL.

Those cases say whether postfix's sender login map lists the login among the sender's owners; the
pure rule and db.py's SQL on SQLite and MariaDB must list it exactly then. (Login validity is not
part of that map, so it is not compared here; decision_cases.py covers it.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from mailcow_smtp_api.mailcow import db
from mailcow_smtp_api.core.senders import (
    Alias,
    AliasDomain,
    DbState,
    Domain,
    Mailbox,
    OwnerLookup,
    SenderAcl,
    fold,
    resolve_owners,
    sender_owners,
)
from tests.db.dbtesting import ScratchMariaDb, load_state, sqlite_memory_db
from tests.sender_cases import CASES

IDS = [case["name"] for case in CASES]


def _pick(row: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: row[name] for name in names if name in row}


def state_of(rows: dict[str, list[dict[str, Any]]]) -> DbState:
    """The case's rows as a DbState (only the columns the rule reads)."""
    return DbState(
        domains=tuple(Domain(**_pick(r, "domain", "active")) for r in rows["domain"]),
        mailboxes=tuple(
            Mailbox(**_pick(r, "username", "active", "kind", "attributes", "domain", "local_part"))
            for r in rows["mailbox"]
        ),
        aliases=tuple(
            Alias(**_pick(r, "address", "goto", "active", "sender_allowed", "domain")) for r in rows["alias"]
        ),
        alias_domains=tuple(
            AliasDomain(**_pick(r, "alias_domain", "target_domain", "active")) for r in rows["alias_domain"]
        ),
        sender_acl=tuple(SenderAcl(**_pick(r, "logged_in_as", "send_as", "external")) for r in rows["sender_acl"]),
    )


def owned(lookup: OwnerLookup, login: str) -> bool:
    """Whether postfix would find ``login`` among the owners."""
    return any(fold(owner) == fold(login) for owner in lookup.owners)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_pure_rule_agrees_with_postfix(case: dict[str, Any]) -> None:
    """The pure rule lists the login as an owner exactly when postfix does."""
    assert owned(sender_owners(state_of(case["rows"]), case["sender"]), case["login"]) is case["expected"], case["why"]


@pytest.fixture(scope="module")
def sqlite_conn() -> Iterator[sqlite3.Connection]:
    """One in-memory embedded database for the module."""
    conn = sqlite_memory_db()
    yield conn
    conn.close()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sqlite_agrees_with_postfix(case: dict[str, Any], sqlite_conn: sqlite3.Connection) -> None:
    """db.py's SQL on SQLite lists the login as an owner exactly when postfix does."""
    load_state(sqlite_conn, state_of(case["rows"]), "?")
    lookup = resolve_owners(case["sender"], lambda key: db.fetch_grants(sqlite_conn, db.SQLITE, key))
    assert owned(lookup, case["login"]) is case["expected"], case["why"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mariadb_agrees_with_postfix(case: dict[str, Any], mariadb: ScratchMariaDb) -> None:
    """db.py's SQL on MariaDB lists the login as an owner exactly when postfix does."""
    mariadb.load(state_of(case["rows"]))
    lookup = resolve_owners(case["sender"], lambda key: db.fetch_grants(mariadb.admin, db.MARIADB, key))
    assert owned(lookup, case["login"]) is case["expected"], case["why"]
