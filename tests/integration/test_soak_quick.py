"""The soak's bounded version in the test suite: bench/soak.py with ``--quick``'s plan.

300 asynchronous messages through two replicas on one MariaDB state database, postfix restarted
every 8 s while they are sent, the second replica killed with SIGKILL and started again after
30 % of them: not one accepted message may be lost, and none may arrive twice.
"""

from __future__ import annotations

from collections.abc import Callable

import pymysql  # type: ignore[import-untyped]
import pytest

from bench import soak

from .conftest import API_KEY, DB_HOST, DB_PORT, PASSWORD, SENDER, Sidecar, StateDatabase, Testbed

pytestmark = pytest.mark.integration


def test_quick_soak_loses_nothing_and_sends_nothing_twice(
    bed: Testbed, sidecar: Callable[..., Sidecar], mariadb_state: Callable[[str], StateDatabase]
) -> None:
    """``bench.soak.run_soak`` with ``make_plan(quick=True)``: lost == 0 and duplicated == 0, the
    outbox drained, every send accepted, and postfix was really restarted meanwhile."""
    state = mariadb_state("soak_quick")
    plan = soak.make_plan(quick=True)

    def connect() -> object:
        return pymysql.connect(host=DB_HOST, port=DB_PORT, user="root", database=state.name, autocommit=True, connect_timeout=5)

    setup = soak.Setup(
        bed=bed, start_sidecar=sidecar, state_url=state.url, state_connect=connect,
        api_key=API_KEY, sender=SENDER, password=PASSWORD,
    )  # fmt: skip
    report = soak.run_soak(setup, plan)
    print("\n" + soak.render_report(report))
    assert report.drained, soak.render_report(report)
    assert report.tally.lost == [] and report.tally.duplicated == {}, soak.render_report(report)
    assert report.tally.accepted == plan.messages and not report.refused, soak.render_report(report)
    assert report.tally.strangers == 0
    assert report.restarts >= 1
