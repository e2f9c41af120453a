"""The webhook queue on the real reactor, on SQLite and on MariaDB: enqueue in the caller's transaction,
claims shared by several sidecars, retries, giving up and the purge.

The same tests run on both databases. Concurrent claims go through separate pools, as separate
sidecar processes would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from mailcow_smtp_api.core.webhooks import WebhookEvent, new_event, payload
from mailcow_smtp_api.mailcow.db import DatabaseFailure, Dialect
from mailcow_smtp_api.state import store as state
from mailcow_smtp_api.state import webhooks as queue
from mailcow_smtp_api.state.webhooks import Retry, WebhookStore
from tests.db.dbtesting import ScratchMariaDb

NOW = 1_800_000_000.0
LIFETIME = 24 * 3600.0
LEASE = 30.0


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def event(n: int, at: float = NOW, kind: str = "delivered", message: dict[str, Any] | None = None) -> WebhookEvent:
    return new_event(kind, message or {"id": f"msg_{n}", "state": kind}, at, f"token-{n:06d}")


@pytest.fixture(params=["sqlite", "mariadb"])
def state_url(request: Any, tmp_path: Any) -> str:
    """A --state-db URL whose webhook table does not exist yet."""
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'state.sqlite'}"
    scratch: ScratchMariaDb = request.getfixturevalue("mariadb")
    scratch.execute(f"DROP TABLE IF EXISTS {queue.TABLE}")
    return scratch.url


@pytest.fixture
def stores(state_url: str) -> Iterator[list[WebhookStore]]:
    """Three stores (three pools) on one database, like three sidecar instances."""
    opened = [WebhookStore(state.open_state_runner(state_url, _reactor())) for _ in range(3)]
    yield opened
    for store in opened:
        store.close()


@pytest.fixture
def blocking(state_url: str) -> Iterator[tuple[Any, Dialect]]:
    """A plain autocommit connection to the same database, as the outbox's own transaction uses."""
    conn, dialect = state.connect_state_blocking(state_url)
    yield conn, dialect
    conn.close()


def _sql(conn: Any, dialect: Dialect, sql: str) -> None:
    cursor = conn.cursor()
    cursor.execute(sql)
    cursor.close()


def _begin(conn: Any, dialect: Dialect) -> None:
    _sql(conn, dialect, "BEGIN" if dialect.name == "sqlite" else "START TRANSACTION")


@pytest_twisted.ensureDeferred
async def test_the_table_appears_on_first_use_and_an_event_round_trips(stores: list[WebhookStore]) -> None:
    """The first call creates the table; a queued event is due at once, with its exact body and no attempts."""
    store = stores[0]
    assert await store.enqueue(event(1), NOW + LIFETIME) is True
    claimed = await store.claim_due(NOW, LEASE, "claim-a", 10)
    assert claimed == [("evt_token-000001", payload(event(1)), 0)]
    row = await store.event("evt_token-000001")
    assert row is not None
    assert (row.event_type, row.attempts, row.lease_token, row.lease_until) == ("delivered", 0, "claim-a", NOW + LEASE)
    assert (row.created_at, row.next_at, row.give_up_at, row.delivered_at, row.gave_up_at) == (NOW, NOW, NOW + LIFETIME, None, None)


def test_enqueue_joins_the_callers_transaction_and_never_commits(blocking: tuple[Any, Dialect]) -> None:
    """Rolled back with the caller's transaction, the event is gone; committed, it is there. enqueue
    itself begins, commits and creates nothing."""
    conn, dialect = blocking
    with pytest.raises(DatabaseFailure):  # no table yet: enqueue does not create one
        queue.enqueue(conn, dialect, event(1), NOW + LIFETIME)
    queue.create_tables(conn, dialect)
    queue.create_tables(conn, dialect)  # again: nothing happens

    _begin(conn, dialect)
    assert queue.enqueue(conn, dialect, event(1), NOW + LIFETIME) is None
    assert queue.fetch_event(conn, dialect, "evt_token-000001") is not None  # visible inside
    _sql(conn, dialect, "ROLLBACK")
    assert queue.fetch_event(conn, dialect, "evt_token-000001") is None

    _begin(conn, dialect)
    queue.enqueue(conn, dialect, event(2), NOW + LIFETIME)
    _sql(conn, dialect, "COMMIT")
    assert queue.fetch_event(conn, dialect, "evt_token-000002") is not None


def test_the_same_event_queued_twice_is_kept_once(blocking: tuple[Any, Dialect]) -> None:
    """A second enqueue with the same event id changes nothing (insert_event says so); the first body stays."""
    conn, dialect = blocking
    queue.create_tables(conn, dialect)
    first = event(1, message={"id": "msg_1", "state": "delivered", "n": 1})
    again = event(1, at=NOW + 5, message={"id": "msg_1", "state": "delivered", "n": 2})
    queue.enqueue(conn, dialect, first, NOW + LIFETIME)
    queue.enqueue(conn, dialect, again, NOW + LIFETIME)  # no error: the same event reported again
    assert queue.insert_event(conn, dialect, again, NOW + LIFETIME) is False
    claimed = queue.claim_due(conn, dialect, NOW + 10, LEASE, "claim-a", 10)
    assert [json.loads(body)["message"]["n"] for _, body, _ in claimed] == [1]


def test_enqueuer_gives_up_a_lifetime_after_the_event(blocking: tuple[Any, Dialect]) -> None:
    """The outbox's hook takes (conn, dialect, event); give_up_at is the event's time plus the lifetime."""
    conn, dialect = blocking
    queue.create_tables(conn, dialect)
    queue.enqueuer(3600.0)(conn, dialect, event(1, at=NOW + 7))
    row = queue.fetch_event(conn, dialect, "evt_token-000001")
    assert row is not None and row.give_up_at == NOW + 7 + 3600.0


@pytest_twisted.ensureDeferred
async def test_only_due_events_are_claimed_oldest_first_up_to_the_limit(stores: list[WebhookStore]) -> None:
    """Events are claimed by next_at; later ones wait; the limit holds; a live lease keeps others out."""
    store = stores[0]
    for n, at in [(1, NOW - 30), (2, NOW - 10), (3, NOW - 20), (4, NOW + LEASE)]:
        await store.enqueue(event(n, at=at), NOW + LIFETIME)
    first = await store.claim_due(NOW, LEASE, "claim-a", 2)
    assert [event_id for event_id, _, _ in first] == ["evt_token-000001", "evt_token-000003"]
    second = await stores[1].claim_due(NOW, LEASE, "claim-b", 10)
    assert [event_id for event_id, _, _ in second] == ["evt_token-000002"]
    assert await stores[2].claim_due(NOW + LEASE - 1, LEASE, "claim-c", 10) == []
    # The leases end at NOW + LEASE; event 4 is due by then too.
    later = await stores[2].claim_due(NOW + LEASE, LEASE, "claim-d", 10)
    assert sorted(event_id for event_id, _, _ in later) == [f"evt_token-00000{n}" for n in (1, 2, 3, 4)]


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_from_several_sidecars_never_share_an_event(state_url: str) -> None:
    """Ninety events, sixty simultaneous claims of three through three pools of eight connections:
    each event goes to exactly one claim."""
    pools = [WebhookStore(state.open_state_runner(state_url, _reactor(), pool_size=8)) for _ in range(3)]
    try:
        for n in range(90):
            await pools[0].enqueue(event(n, at=NOW - n), NOW + LIFETIME)
        claims = [pools[i % 3].claim_due(NOW, LEASE, f"claim-{i:02d}", 3) for i in range(60)]
        results = await DeferredList(claims, consumeErrors=True)
        assert all(ok for ok, _ in results), results
        taken = [event_id for _, rows in results for event_id, _, _ in rows]
        assert len(taken) == len(set(taken)) == 90
        for i, (_, rows) in enumerate(results):
            for event_id, _, _ in rows:
                row = await pools[0].event(event_id)
                assert row is not None and row.lease_token == f"claim-{i:02d}"
    finally:
        for store in pools:
            store.close()


@pytest_twisted.ensureDeferred
async def test_a_delivery_is_recorded_once_and_only_by_the_claim_holder(stores: list[WebhookStore]) -> None:
    """mark_delivered needs the claim's token; a delivered event is never claimed again."""
    store = stores[0]
    await store.enqueue(event(1), NOW + LIFETIME)
    await store.claim_due(NOW, LEASE, "claim-a", 10)
    assert await store.mark_delivered("evt_token-000001", "claim-other", NOW + 1) is False
    assert await store.mark_delivered("evt_token-000001", "claim-a", NOW + 1) is True
    assert await store.mark_delivered("evt_token-000001", "claim-a", NOW + 2) is False
    row = await store.event("evt_token-000001")
    assert row is not None and (row.delivered_at, row.attempts, row.lease_token) == (NOW + 1, 1, None)
    assert await store.claim_due(NOW + 10 * LEASE, LEASE, "claim-b", 10) == []


@pytest_twisted.ensureDeferred
async def test_a_claim_whose_lease_ran_out_and_was_taken_over_changes_nothing(stores: list[WebhookStore]) -> None:
    """After another sidecar took the event over, the first one's delivery or retry is refused (lost)."""
    await stores[0].enqueue(event(1), NOW + LIFETIME)
    await stores[0].claim_due(NOW, LEASE, "claim-slow", 10)
    assert len(await stores[1].claim_due(NOW + LEASE, LEASE, "claim-new", 10)) == 1
    assert await stores[0].mark_delivered("evt_token-000001", "claim-slow", NOW + LEASE + 1) is False
    assert await stores[0].schedule_retry("evt_token-000001", "claim-slow", NOW + 99, "HTTP 500", NOW + LEASE) is Retry.LOST
    assert await stores[1].mark_delivered("evt_token-000001", "claim-new", NOW + LEASE + 2) is True


@pytest_twisted.ensureDeferred
async def test_a_failed_attempt_is_retried_at_next_at_with_its_error_kept(stores: list[WebhookStore]) -> None:
    """schedule_retry counts the attempt, keeps the error and frees the event until next_at; attempts grow."""
    store = stores[0]
    await store.enqueue(event(1), NOW + LIFETIME)
    await store.claim_due(NOW, LEASE, "claim-a", 10)
    assert await store.schedule_retry("evt_token-000001", "claim-a", NOW + 10, "HTTP 500", NOW) is Retry.SCHEDULED
    row = await store.event("evt_token-000001")
    assert row is not None and (row.attempts, row.last_error, row.next_at, row.lease_token) == (1, "HTTP 500", NOW + 10, None)
    assert await store.claim_due(NOW + 9, LEASE, "claim-b", 10) == []
    assert [attempts for _, _, attempts in await store.claim_due(NOW + 10, LEASE, "claim-c", 10)] == [1]
    assert await store.schedule_retry("evt_token-000001", "claim-c", NOW + 30, "x" * 1000, NOW + 10) is Retry.SCHEDULED
    row = await store.event("evt_token-000001")
    assert row is not None and row.attempts == 2 and row.last_error == "x" * queue.MAX_ERROR


@pytest_twisted.ensureDeferred
async def test_a_retry_past_give_up_at_gives_the_event_up_for_good(stores: list[WebhookStore]) -> None:
    """When the next attempt would come after give_up_at the event is given up: never claimed again."""
    store = stores[0]
    await store.enqueue(event(1), NOW + 100)
    await store.claim_due(NOW, LEASE, "claim-a", 10)
    assert await store.schedule_retry("evt_token-000001", "claim-a", NOW + 100, "HTTP 503", NOW) is Retry.SCHEDULED
    await store.claim_due(NOW + 100, LEASE, "claim-b", 10)
    assert await store.schedule_retry("evt_token-000001", "claim-b", NOW + 120, "timeout", NOW + 101) is Retry.GAVE_UP
    row = await store.event("evt_token-000001")
    assert row is not None and (row.gave_up_at, row.attempts, row.last_error, row.delivered_at) == (NOW + 101, 2, "timeout", None)
    assert await store.claim_due(NOW + 10**6, LEASE, "claim-c", 10) == []
    assert await store.schedule_retry("evt_token-000001", "claim-b", NOW + 120, "again", NOW + 102) is Retry.LOST


@pytest_twisted.ensureDeferred
async def test_purge_deletes_finished_events_past_the_retention_only(stores: list[WebhookStore]) -> None:
    """Delivered and given-up events go once older than the retention; pending ones stay, however old."""
    store = stores[0]
    for n in range(1, 5):
        await store.enqueue(event(n, at=NOW - 5000), NOW + 10)
    await store.claim_due(NOW, LEASE, "claim-a", 10)
    await store.mark_delivered("evt_token-000001", "claim-a", NOW)  # finished at NOW
    await store.mark_delivered("evt_token-000002", "claim-a", NOW + 500)  # finished later
    await store.schedule_retry("evt_token-000003", "claim-a", NOW + 60, "HTTP 500", NOW)  # given up at NOW
    # event 4 stays claimed, then pending
    assert await store.purge(NOW + 999, retention=1000) == 0
    assert await store.purge(NOW + 1000, retention=1000) == 2
    assert await store.event("evt_token-000001") is None and await store.event("evt_token-000003") is None
    assert await store.event("evt_token-000002") is not None and await store.event("evt_token-000004") is not None


@pytest_twisted.ensureDeferred
async def test_large_bodies_are_kept_whole(stores: list[WebhookStore]) -> None:
    """A status JSON over 64 KiB (two thousand recipients) is stored and claimed byte for byte."""
    message = {"id": "msg_1", "recipients": [{"address": f"r{i}@example.com", "text": "2.0.0 Ok ✓"} for i in range(2000)]}
    big = event(1, message=message)
    await stores[0].enqueue(big, NOW + LIFETIME)
    [(_, body, _)] = await stores[0].claim_due(NOW, LEASE, "claim-a", 1)
    assert body == payload(big) and len(body) > 65535
