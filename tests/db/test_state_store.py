"""The idempotency store on the real reactor, on SQLite and on MariaDB: claims, races, expiry, outages.

The same tests run on both databases (the shared MariaDB database is what several sidecar instances
use). Concurrent claims go through separate pools, as separate processes would.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from mailcow_smtp_api.state import store as state
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.idempotency import Answer, Claim, State
from tests.db.dbtesting import ScratchMariaDb

NOW = 1_800_000_000.0
ANSWER = Answer(200, "smtp_mail_sent", [{"type": "success", "msg": ["smtp_mail_sent", "a@example.com", "b@example.com"]}])


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def claim(token: str, key: str = "order-1", print_: str = "f" * 64, at: float = NOW, scope: str = "s" * 64) -> Claim:
    return Claim(scope, key, print_, token.ljust(32, "0"), at, at + 600.0, at + 3600.0)


@pytest.fixture(params=["sqlite", "mariadb"])
def state_url(request: Any, tmp_path: Any) -> str:
    """A --state-db URL whose idempotency table does not exist yet."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'state.sqlite'}"
    scratch: ScratchMariaDb = request.getfixturevalue("mariadb")
    scratch.execute(f"DROP TABLE IF EXISTS {state.TABLE}")
    return scratch.url


@pytest.fixture
def stores(state_url: str) -> Iterator[list[state.IdempotencyStore]]:
    """Three stores (three pools) on one database, like three sidecar instances."""
    opened = [state.open_state_store(state_url, _reactor()) for _ in range(3)]
    yield opened
    for store in opened:
        store.close()


async def _error(d: Any) -> ApiError:
    try:
        result = await d
    except ApiError as err:
        return err
    raise AssertionError(f"expected an ApiError, got {result!r}")


@pytest_twisted.ensureDeferred
async def test_claim_settle_and_read_back(stores: list[state.IdempotencyStore]) -> None:
    """The table appears on first use; a claim wins, a second sees it in flight, then the stored answer."""
    store = stores[0]
    assert await store.claim(claim("a")) is None
    holder = await store.claim(claim("b"))
    assert holder is not None and (holder.state, holder.token) == (State.IN_FLIGHT, "a".ljust(32, "0"))
    assert await store.settle("s" * 64, "order-1", "a".ljust(32, "0"), State.DONE, ANSWER) is True
    holder = await stores[1].claim(claim("c"))
    assert holder is not None and holder.state is State.DONE
    stored = holder.answer()
    assert (stored.status, stored.code, stored.body) == (200, "smtp_mail_sent", ANSWER.body)


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_from_several_instances_have_one_winner(stores: list[state.IdempotencyStore]) -> None:
    """Thirty simultaneous claims through three pools: exactly one claims, all others see its record."""
    attempts = [stores[i % 3].claim(claim(f"t{i}")) for i in range(30)]
    results = await DeferredList(attempts, consumeErrors=True)
    assert all(ok for ok, _ in results), results
    winners = [i for i, (_, value) in enumerate(results) if value is None]
    assert len(winners) == 1
    token = f"t{winners[0]}".ljust(32, "0")
    assert {value.token for _, value in results if value is not None} == {token}


@pytest_twisted.ensureDeferred
async def test_settle_and_release_need_the_claim_token(stores: list[state.IdempotencyStore]) -> None:
    """Only the claim that holds the key may settle or release it."""
    store = stores[0]
    mine, other = claim("mine"), claim("other")
    assert await store.claim(mine) is None
    assert await store.settle(other.scope, other.key, other.token, State.DONE, ANSWER) is False
    assert await store.release(other) is False
    assert await store.release(mine) is True
    assert await store.claim(other) is None  # free again after the release


@pytest_twisted.ensureDeferred
async def test_a_settled_record_is_not_settled_twice(stores: list[state.IdempotencyStore]) -> None:
    """The first stored answer stays: settling again (a late finisher) changes nothing."""
    store, mine = stores[0], claim("mine")
    await store.claim(mine)
    assert await store.settle(mine.scope, mine.key, mine.token, State.OUTCOME_UNKNOWN, Answer(504, "smtp_error", [])) is True
    assert await store.settle(mine.scope, mine.key, mine.token, State.DONE, ANSWER) is False
    holder = await store.claim(claim("next"))
    assert holder is not None and (holder.state, holder.status) == (State.OUTCOME_UNKNOWN, 504)


@pytest_twisted.ensureDeferred
async def test_keys_and_scopes_compare_exactly(stores: list[state.IdempotencyStore]) -> None:
    """Keys differing in case, and one key in two scopes, are separate records (also on MariaDB's collation)."""
    store = stores[0]
    assert await store.claim(claim("a", key="Order-1")) is None
    assert await store.claim(claim("b", key="order-1")) is None
    assert await store.claim(claim("c", key="order-1", scope="S" * 64)) is None
    assert await store.claim(claim("d", key="order-1 ")) is None


@pytest_twisted.ensureDeferred
async def test_long_keys_and_bodies_are_kept_whole(stores: list[state.IdempotencyStore]) -> None:
    """A 255-character key and a large stored body round-trip unchanged."""
    store = stores[0]
    key = "~" * 255
    body = [{"type": "success", "recipients": [{"address": f"r{i}@example.com", "smtp_text": "2.1.5 Ok ✓"} for i in range(2000)]}]
    mine = claim("a", key=key)
    await store.claim(mine)
    await store.settle(mine.scope, key, mine.token, State.DONE, Answer(200, "smtp_mail_sent", body))
    holder = await store.claim(claim("b", key=key))
    assert holder is not None and holder.key == key and holder.answer().body == body
    assert len(json.dumps(body)) > 65535  # more than a BLOB would hold on MariaDB


@pytest_twisted.ensureDeferred
async def test_expired_records_are_replaced_and_purged(stores: list[state.IdempotencyStore]) -> None:
    """A claim finding an expired record takes the key; purge deletes expired rows only."""
    store = stores[0]
    old = claim("old", at=NOW - 4000.0)
    await store.claim(old)
    await store.settle(old.scope, old.key, old.token, State.DONE, ANSWER)
    assert await store.claim(claim("new")) is None  # the old one expired at NOW - 400
    await store.claim(claim("stale", key="order-2", at=NOW - 3600.0))
    await store.claim(claim("live", key="order-3", at=NOW - 3599.0))
    assert await store.purge(NOW) == 1
    assert (await store.claim(claim("x", key="order-2"))) is None
    holder = await store.claim(claim("y", key="order-3"))
    assert holder is not None and holder.token == "live".ljust(32, "0")


@pytest_twisted.ensureDeferred
async def test_unreachable_state_database_is_a_coded_503(tmp_path: Any) -> None:
    """A state database that cannot be opened answers smtp_idempotency_unavailable."""
    store = state.open_state_store(f"sqlite:{tmp_path / 'missing-dir' / 'state.sqlite'}", _reactor(), timeout=2.0)
    try:
        err = await _error(store.claim(claim("a")))
        assert (err.code, err.status, err.retry_after) == ("smtp_idempotency_unavailable", 503, 5)
        err = await _error(store.ping())
        assert err.code == "smtp_idempotency_unavailable"
    finally:
        store.close()


@pytest_twisted.ensureDeferred
async def test_mariadb_state_database_down_is_a_coded_503() -> None:
    """A MariaDB state database nobody listens on answers smtp_idempotency_unavailable within the timeout."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    store = state.open_state_store(f"mysql://root@127.0.0.1:{closed_port}/nothing", _reactor(), timeout=2.0)
    try:
        assert (await _error(store.claim(claim("a")))).code == "smtp_idempotency_unavailable"
    finally:
        store.close()


def test_mailcows_database_is_refused_as_state_database(tmp_path: Any) -> None:
    """--state-db naming mailcow's database (any spelling of the same URL) is refused."""
    cases = [
        ("mysql://u:p@Mysql-Mailcow:3306/mailcow", "mysql://other:x@mysql-mailcow/MAILCOW"),
        ("mysql://u:p@/mailcow?unix_socket=/run/mysqld.sock", "mysql://u:p@/mailcow?unix_socket=/run/mysqld.sock"),
        (f"sqlite:{tmp_path}/x.sqlite", f"sqlite:{tmp_path}/./x.sqlite"),
    ]
    for mailcow, state_db in cases:
        with pytest.raises(ValueError, match="mailcow's database"):
            state.open_state_store(state_db, _reactor(), mailcow_db=mailcow)
    for mailcow, state_db in [
        ("mysql://u:p@mysql-mailcow:3306/mailcow", "mysql://u:p@mysql-mailcow:3306/smtpapi_state"),
        ("mysql://u:p@mysql-mailcow:3306/mailcow", "mysql://u:p@other-host:3306/mailcow"),
        (f"sqlite:{tmp_path}/x.sqlite", f"sqlite:{tmp_path}/y.sqlite"),
    ]:
        state.open_state_store(state_db, _reactor(), mailcow_db=mailcow).close()
