"""The sender-rule table (decision_cases.py) against the pure rule, SQLite and MariaDB, with one expectation.

The SQL backends run through ``MailcowDatabase`` (adbapi threads on the real reactor); the owners
with their provenance are also compared with the pure rule's, case by case.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted

from mailcow_smtp_api.mailcow import db
from mailcow_smtp_api.core.senders import (
    SenderDecision,
    authorize,
    resolve_owners,
    sender_owners,
)
from tests.db.dbtesting import ScratchMariaDb, load_sqlite_file
from tests.db.decision_cases import CASES, Case


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory: Any) -> Iterator[tuple[str, db.MailcowDatabase]]:
    """One embedded database file for the module, opened through the service's interface."""
    from twisted.internet import reactor

    path = str(tmp_path_factory.mktemp("table") / "smtpapi.sqlite")
    database = db.open_database(f"sqlite:{path}", reactor)
    yield path, database
    database.close()


@pytest.fixture(scope="module")
def maria_db(mariadb: ScratchMariaDb) -> Iterator[tuple[ScratchMariaDb, db.MailcowDatabase]]:
    """The module's scratch MariaDB database, opened through the service's interface."""
    from twisted.internet import reactor

    database = db.open_database(mariadb.url, reactor)
    yield mariadb, database
    database.close()


def _ids(case: Case) -> str:
    return case.id


def test_the_table_is_large_and_has_unique_ids() -> None:
    """The table covers at least 30 cases, each with a distinct id."""
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_pure_rule(case: Case) -> None:
    """The pure rule reaches the expected decision and reason."""
    assert authorize(case.state, case.login, case.sender) == SenderDecision(case.allowed, case.reason)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest_twisted.ensureDeferred
async def test_sqlite(case: Case, sqlite_db: tuple[str, db.MailcowDatabase]) -> None:
    """The embedded SQLite database reaches the expected decision and reason."""
    path, database = sqlite_db
    load_sqlite_file(path, case.state)
    decision = await database.authorize_sender(case.login, case.sender)
    assert decision == SenderDecision(case.allowed, case.reason)


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest_twisted.ensureDeferred
async def test_mariadb(case: Case, maria_db: tuple[ScratchMariaDb, db.MailcowDatabase]) -> None:
    """MariaDB with mailcow's types and collation reaches the expected decision and reason."""
    scratch, database = maria_db
    scratch.load(case.state)
    decision = await database.authorize_sender(case.login, case.sender)
    assert decision == SenderDecision(case.allowed, case.reason)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_mariadb_owners_match_pure_rule(case: Case, mariadb: ScratchMariaDb) -> None:
    """The SQL returns exactly the pure rule's owners, with the same provenance."""
    mariadb.load(case.state)
    sql = resolve_owners(case.sender, lambda key: db.fetch_grants(mariadb.admin, db.MARIADB, key))
    pure = sender_owners(case.state, case.sender)
    assert (sql.key, sql.stripped, sorted(sql.grants)) == (pure.key, pure.stripped, sorted(pure.grants))
