"""Two replicas of the service sharing one Redis and one MariaDB state database.

Both ``twistd smtpapi`` processes read mailcow's limit from the same Redis and charge the same
bucket there, and read send keys from the same state database: hammered together they let no
more recipients through than the limit, and a key disabled with ``smtpapi-admin`` is refused by
both within ``--db-cache-ttl``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import pymysql  # type: ignore[import-untyped]
import pytest

from .conftest import DB_HOST, DB_PORT, SENDER, RedisClient, Sidecar, StateAdmin, Testbed
from .test_abuse import code, delivered_recipients, rcpts, send, settled
from .test_send_api import post

pytestmark = pytest.mark.integration

STATE_DB = "smtpapi_state_replicas"
LIMIT = 20
REQUESTS = 60
WORKERS = 8
CACHE_TTL = 1


@pytest.fixture
def shared_state(testbed: Testbed) -> Iterator[StateAdmin]:
    """A MariaDB state database of its own for both replicas, dropped after the test."""

    def run(*statements: str) -> None:
        connection = pymysql.connect(host=DB_HOST, port=DB_PORT, user="root", autocommit=True, connect_timeout=5)
        with connection, connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)

    run(f"DROP DATABASE IF EXISTS `{STATE_DB}`", f"CREATE DATABASE `{STATE_DB}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
    try:
        yield StateAdmin(testbed.db_url, f"mysql://root@{DB_HOST}:{DB_PORT}/{STATE_DB}")
    finally:
        run(f"DROP DATABASE IF EXISTS `{STATE_DB}`")


def replicas(sidecar: Callable[..., Sidecar], redis: RedisClient, state: StateAdmin) -> tuple[Sidecar, Sidecar]:
    """Two processes on the same Redis and state database, caching keys for CACHE_TTL s."""
    options = ("--redis", redis.url, "--state-db", state.state_url, "--db-cache-ttl", str(CACHE_TTL))
    return sidecar(*options), sidecar(*options)


def test_hammered_replicas_never_exceed_the_shared_limit(
    bed: Testbed, sidecar: Callable[..., Sidecar], redis_db: RedisClient, shared_state: StateAdmin
) -> None:
    """60 concurrent sends of 1-3 recipients, spread over both replicas, against a limit of 20
    recipients: at most 20 recipients reach postfix, exactly those of the 200 answers, and every
    other answer is 429 smtp_rate_limited."""
    redis_db.hset("RL_VALUE", {SENDER: f"{LIMIT} / 1h"})
    token, _ = shared_state.add_send_key(SENDER)
    first, second = replicas(sidecar, redis_db, shared_state)
    # Both take part in the one bucket: each admits a message before the hammering starts.
    for replica in (first, second):
        status, body, _ = send(replica, key=token, password=None, to=rcpts(1, f"warm{replica.port}-"))
        assert status == 200, body

    draw = random.Random(20)
    sizes = [draw.choice((1, 2, 3)) for _ in range(REQUESTS)]

    def one(index: int) -> tuple[int, int, str]:
        replica = (first, second)[index % 2]
        status, body, _ = send(replica, key=token, password=None, to=rcpts(sizes[index], f"h{index}-"), subject=f"hammer {index}")
        return index, status, code(body)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = [pool.submit(one, index) for index in range(REQUESTS)]
        done, pending = wait(futures, timeout=120)
        assert not pending, f"{len(pending)} requests did not finish within 120 s"
    results = sorted(future.result() for future in done)

    answers = {(status, answer) for _, status, answer in results}
    assert answers <= {(200, "smtp_mail_sent"), (429, "smtp_rate_limited")}, answers
    admitted = [index for index, status, _ in results if status == 200]
    refused = [index for index, status, _ in results if status == 429]
    assert len(admitted) + len(refused) == REQUESTS
    accepted = 2 + sum(sizes[index] for index in admitted)
    summary = (
        f"admitted {len(admitted)} ({accepted} recipients with the warm-up), refused {len(refused)}; "
        f"by the first {sum(1 for i in admitted if i % 2 == 0)}, by the second {sum(1 for i in admitted if i % 2)}"
    )
    # All or nothing: the bucket ends full to within one message smaller than the largest.
    assert LIMIT - 2 <= accepted <= LIMIT, summary
    messages = settled(bed, 2 + len(admitted))
    assert delivered_recipients(messages) == accepted, summary
    assert float(redis_db.hgetall(f"smtpapi:rl:mbox:{SENDER}")["level"]) == pytest.approx(accepted, abs=0.05)


def test_a_disabled_key_is_refused_by_both_replicas(
    bed: Testbed, sidecar: Callable[..., Sidecar], redis_db: RedisClient, shared_state: StateAdmin
) -> None:
    """A key disabled with smtpapi-admin on the shared state database is refused by both replicas
    within --db-cache-ttl, and accepted by both again once enabled."""
    token, key_id = shared_state.add_send_key(SENDER)
    both = replicas(sidecar, redis_db, shared_state)

    def accepted(replica: Sidecar) -> bool:
        # An empty body is refused after the key check (400) or at it (401): nothing is sent.
        status, body, _ = post(replica.url, {}, token)
        assert status in (400, 401), body
        return status == 400

    assert all(accepted(replica) for replica in both)
    for enable, expected in ((False, False), (True, True)):
        shared_state.ok("sendkey", "disable", *(["--enable"] if enable else []), key_id)
        changed = time.monotonic()
        waiting = list(both)
        while waiting:
            waiting = [replica for replica in waiting if accepted(replica) != expected]
            elapsed = time.monotonic() - changed
            assert elapsed < CACHE_TTL + 2, f"{len(waiting)} replica(s) still {'refuse' if expected else 'accept'} after {elapsed:.1f} s"
            time.sleep(0.05)
        assert all(accepted(replica) == expected for replica in both)
    assert bed.messages() == []
