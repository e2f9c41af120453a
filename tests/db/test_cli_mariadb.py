"""smtpapi-admin against MariaDB: check-sender and check-schema work, writes are refused."""

from __future__ import annotations

import io

from mailcow_smtp_api import cli
from tests.db.dbtesting import ScratchMariaDb
from tests.db.decision_cases import U1, U2, world


def _run(url: str, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(["--db", url, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_check_sender_on_mariadb(mariadb: ScratchMariaDb) -> None:
    """check-sender answers from mailcow's MariaDB, single and batch."""
    mariadb.load(world())
    assert _run(mariadb.url, "check-sender", U1, "User1@Example.org") == (0, "allow own mailbox\n", "")
    status, out, _ = _run(mariadb.url, "check-sender", "-", stdin=f"{U1} {U1}\n{U2} {U1}\n")
    assert status == 1
    assert out == f"allow own mailbox\ndeny {U1} is owned by {U1}, not by {U2}\n"
    assert _run(mariadb.url, "check-schema") == (0, "schema ok\n", "")


def test_writes_to_mariadb_are_refused(mariadb: ScratchMariaDb) -> None:
    """Commands that change the database exit 2 on MariaDB and change nothing."""
    status, _, err = _run(mariadb.url, "domain", "add", "new.example")
    assert status == 2 and "embedded database only" in err
    assert _run(mariadb.url, "init")[0] == 2
    assert mariadb.execute("SELECT COUNT(*) FROM domain WHERE domain = 'new.example'") == [(0,)]
