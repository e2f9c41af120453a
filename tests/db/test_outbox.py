"""The outbox on the real reactor, on SQLite and MariaDB: accept, deliver once, retry, schedule,
cancel, resolve cut-off handovers from postfix's log, fates from its delivery lines, and replicas.

The SMTP side is a recording fake (its answers scripted per call); the clock is the real reactor's
callLater with a time the test moves.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, fail, succeed

from mailcow_smtp_api.core.errors import ApiError, SmtpFailure
from mailcow_smtp_api.core.maillog import Delivery, Filed
from mailcow_smtp_api.core.model import RecipientResult, SubmitResult
from mailcow_smtp_api.core.outbox import Limits, NewMessage, Status
from mailcow_smtp_api.delivery import Outbox
from mailcow_smtp_api.state import outbox as outbox_sql
from mailcow_smtp_api.state.outbox import OutboxStore
from mailcow_smtp_api.mailcow.db import query_rows
from mailcow_smtp_api.state.store import open_state_runner
from tests.db.dbtesting import ScratchMariaDb

NOW = 1_800_000_000.0
SCOPE = "s" * 64


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@attrs.define
class FakeClock:
    """The reactor's callLater, with a time the test sets."""

    now: float = NOW

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:  # noqa: N802 - IReactorTime's name
        return _reactor().callLater(0, f, *args)


@attrs.define
class ScriptedSubmitter:
    """Answers each submission with the next scripted outcome (default: accepted, queue id Q<n>)."""

    script: list[Any] = attrs.Factory(list)
    sent: list[tuple[str, tuple[str, ...], bytes]] = attrs.Factory(list)

    def submit(self, target: Any, credentials: Any, envelope: Any, message: Any) -> Deferred[Any]:
        assert credentials is None and target.port == 25
        self.sent.append((envelope.sender, envelope.recipients, message))
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, SmtpFailure):
            return fail(outcome)
        rcpts = tuple(RecipientResult(r, 250, "2.1.5 Ok") for r in envelope.recipients)
        return succeed(SubmitResult(250, f"2.0.0 Ok: queued as Q{len(self.sent)}", rcpts, f"Q{len(self.sent)}"))


@attrs.define
class FakeLog:
    """postfix's log as the outbox sees it: traces per Message-ID, a covered window, subscribers."""

    traces: dict[str, Any] = attrs.Factory(dict)
    covered: tuple[float, float] | None = None
    caught_up_at: float | None = None
    callbacks: list[Any] = attrs.Factory(list)

    def trace(self, message_id: str) -> Any:
        return self.traces.get(message_id)

    def subscribe(self, callback: Any) -> None:
        self.callbacks.append(callback)


@attrs.define
class Trace:
    accepted_queue_id: str | None = None
    deliveries: list[Delivery] = attrs.Factory(list)


@pytest.fixture(params=["sqlite", "mariadb"])
def state_url(request: Any, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:{tmp_path / 'state.sqlite'}"
    scratch: ScratchMariaDb = request.getfixturevalue("mariadb")
    scratch.execute(f"DROP TABLE IF EXISTS {outbox_sql.TABLE}")
    return scratch.url


@pytest.fixture
def stores(state_url: str) -> Iterator[list[OutboxStore]]:
    """Two stores (two pools) on one database, like two sidecars."""
    opened = [OutboxStore(open_state_runner(state_url, _reactor())) for _ in range(2)]
    yield opened
    for store in opened:
        store.close()


def outbox(store: OutboxStore, submitter: ScriptedSubmitter, clock: FakeClock, **kwargs: Any) -> Outbox:
    events: list[tuple[str, dict[str, Any]]] = kwargs.pop("events", [])
    return Outbox(
        store=store,
        submitter=submitter,
        clock=clock,
        new_token=lambda: secrets.token_hex(16),
        limits=kwargs.pop("limits", Limits(lifetime=3600.0)),
        lease=kwargs.pop("lease", 60.0),
        make_event=lambda name, message, now: events.append((name, dict(message))) or (name, message),
        rng=lambda: 0.5,
        **kwargs,
    )


def mid(n: int) -> str:
    """The outbox id of test message ``n``."""
    return f"m{n:04d}".ljust(32, "0")


def message(clock: FakeClock, n: int = 1, send_at: float | None = None, rcpts: tuple[str, ...] = ("r@example.net",)) -> NewMessage:
    start = send_at if send_at is not None else clock.now
    return NewMessage(
        id=mid(n),
        scope=SCOPE,
        status=Status.SCHEDULED if send_at is not None else Status.QUEUED,
        message_id=f"<m{n}@example.org>",
        sender="user@example.org",
        recipients=rcpts,
        login="user@example.org",
        target="127.0.0.1:25",
        body=b"Subject: s\r\n\r\nbody\r\n",
        size=20,
        created_at=clock.now,
        send_at=send_at,
        not_before=start,
        expires_at=start + 3600.0,
        keep_until=start + 7200.0,
        request_id="r1",
    )


async def settle_rounds(box: Outbox, rounds: int = 3) -> None:
    for _ in range(rounds):
        await box.tick()


@pytest_twisted.ensureDeferred
async def test_accepted_message_is_handed_over_once(stores: list[OutboxStore]) -> None:
    """A queued message goes to postfix once; its status shows the queue id and the attempt, and the body is gone."""
    clock, smtp, events = FakeClock(), ScriptedSubmitter(), []
    box = outbox(stores[0], smtp, clock, events=events)
    await box.accept(message(clock))
    await settle_rounds(box)
    assert len(smtp.sent) == 1 and smtp.sent[0][2] == b"Subject: s\r\n\r\nbody\r\n"
    status = await box.status(mid(1), SCOPE)
    assert (status["status"], status["queue_id"], status["attempts"][0]["outcome"]) == ("submitted", "Q1", "submitted")
    assert status["recipients"] == [{"address": "r@example.net", "status": "pending"}]
    assert [name for name, _ in events] == ["submitted"]
    assert await stores[0]._run(lambda conn, d: outbox_sql.fetch_body(conn, d, mid(1), "x")) is None


@pytest_twisted.ensureDeferred
async def test_unreachable_postfix_is_retried_with_backoff(stores: list[OutboxStore]) -> None:
    """Connection refused and 4xx keep the message queued until its next try; then it goes."""
    clock = FakeClock()
    smtp = ScriptedSubmitter([SmtpFailure("connect", "connect", reason="connection refused"), SmtpFailure("reply", "rcpt", 451, "4.7.1 Ratelimit")])
    box = outbox(stores[0], smtp, clock)
    await box.accept(message(clock))
    await settle_rounds(box)
    status = await box.status(mid(1), SCOPE)
    assert status["status"] == "queued" and len(smtp.sent) == 1
    clock.now += 8  # backoff: 15 s * 0.5
    await settle_rounds(box)
    assert len(smtp.sent) == 2
    clock.now += 16
    await settle_rounds(box)
    status = await box.status(mid(1), SCOPE)
    assert (status["status"], len(smtp.sent), [a["outcome"] for a in status["attempts"]]) == (
        "submitted", 3, ["retry", "retry", "submitted"]
    )


@pytest_twisted.ensureDeferred
async def test_permanent_refusal_fails_and_names_the_recipients(stores: list[OutboxStore]) -> None:
    """A 5xx for every recipient fails the message at once, with each recipient's reply."""
    clock, events = FakeClock(), []
    refusal = SmtpFailure("reply", "rcpt", 550, "5.1.1 no", recipients=(RecipientResult("r@example.net", 550, "5.1.1 no such user"),))
    box = outbox(stores[0], ScriptedSubmitter([refusal]), clock, events=events)
    await box.accept(message(clock))
    await settle_rounds(box)
    status = await box.status(mid(1), SCOPE)
    assert status["status"] == "failed" and status["recipients"][0]["status"] == "refused"
    assert "5.1.1 no such user" in status["recipients"][0]["text"] and [n for n, _ in events] == ["failed"]


@pytest_twisted.ensureDeferred
async def test_lifetime_ends_in_failed(stores: list[OutboxStore]) -> None:
    """Retries stop at --outbox-lifetime: the message is failed with the last reply."""
    clock = FakeClock()
    smtp = ScriptedSubmitter([SmtpFailure("reply", "mail", 421, "4.3.2 shutting down")] * 3)
    box = outbox(stores[0], smtp, clock, limits=Limits(lifetime=20.0))
    await box.accept(attrs.evolve(message(clock), expires_at=clock.now + 20))
    await settle_rounds(box)
    clock.now += 30
    await settle_rounds(box)
    status = await box.status(mid(1), SCOPE)
    assert status["status"] == "failed" and status["attempts"][-1]["outcome"] == "failed"


@pytest_twisted.ensureDeferred
async def test_scheduled_message_waits_and_can_be_canceled(stores: list[OutboxStore]) -> None:
    """send_at holds a message back; DELETE cancels it while it waits, not after, and never for another key."""
    clock, smtp = FakeClock(), ScriptedSubmitter()
    box = outbox(stores[0], smtp, clock)
    await box.accept(message(clock, 1, send_at=clock.now + 100))
    await box.accept(message(clock, 2, send_at=clock.now + 100))
    await settle_rounds(box)
    assert smtp.sent == []
    with pytest.raises(ApiError) as other:
        await box.cancel(mid(1), "o" * 64)
    assert other.value.code == "smtp_status_not_found"
    assert (await box.cancel(mid(1), SCOPE))["status"] == "canceled"
    clock.now += 101
    await settle_rounds(box)
    assert [rcpts for _, rcpts, _ in smtp.sent] == [("r@example.net",)]
    with pytest.raises(ApiError) as late:
        await box.cancel(mid(2), SCOPE)
    assert late.value.code == "smtp_not_cancelable"


@pytest_twisted.ensureDeferred
async def test_a_full_outbox_refuses(stores: list[OutboxStore]) -> None:
    """Beyond --outbox-max-messages (or bytes), acceptance is 503 smtp_outbox_full and nothing is stored."""
    clock = FakeClock()
    box = outbox(stores[0], ScriptedSubmitter(), clock, limits=Limits(max_messages=2, max_bytes=1000))
    await box.accept(message(clock, 1, send_at=clock.now + 50))
    await box.accept(message(clock, 2, send_at=clock.now + 50))
    with pytest.raises(ApiError) as full:
        await box.accept(message(clock, 3, send_at=clock.now + 50))
    assert (full.value.code, full.value.status, full.value.retry_after) == ("smtp_outbox_full", 503, 60)
    with pytest.raises(ApiError):
        await box.status(mid(3), SCOPE)


@pytest_twisted.ensureDeferred
async def test_cut_off_handover_without_a_log_is_unknown_and_never_resent(stores: list[OutboxStore]) -> None:
    """No answer after the final dot, and no --postfix-log: the message is unknown, not sent again."""
    clock = FakeClock()
    smtp = ScriptedSubmitter([SmtpFailure("timeout", "message")])
    box = outbox(stores[0], smtp, clock)
    await box.accept(message(clock))
    await settle_rounds(box, 4)
    status = await box.status(mid(1), SCOPE)
    assert (status["status"], len(smtp.sent)) == ("unknown", 1)


@pytest_twisted.ensureDeferred
async def test_cut_off_handover_is_resolved_from_postfix_log(stores: list[OutboxStore]) -> None:
    """The log decides: found accepted means submitted (no resend); proven absent means sent again once."""
    clock = FakeClock()
    plog = FakeLog(covered=(NOW - 10, NOW - 5))
    smtp = ScriptedSubmitter([SmtpFailure("dropped", "message"), SmtpFailure("dropped", "message")])
    box = outbox(stores[0], smtp, clock, postfix_log=plog, lease=30.0)
    await box.accept(message(clock, 1))
    await box.accept(message(clock, 2))
    await settle_rounds(box)
    assert len(smtp.sent) == 2
    # The log has not reached the handover yet: both wait.
    await settle_rounds(box)
    assert {(await box.status(mid(n), SCOPE))["status"] for n in (1, 2)} == {"sending"}
    plog.traces["<m1@example.org>"] = Trace(accepted_queue_id="QX1")
    plog.covered = (NOW - 10, NOW + 40)
    clock.now += 6
    await settle_rounds(box)
    one = await box.status(mid(1), SCOPE)
    two = await box.status(mid(2), SCOPE)
    assert (one["status"], one["queue_id"]) == ("submitted", "QX1")
    assert two["status"] in ("queued", "submitted")
    await settle_rounds(box)
    two = await box.status(mid(2), SCOPE)
    assert two["status"] == "submitted" and [a["outcome"] for a in two["attempts"]][-2:] == ["proven_not_taken", "submitted"]
    assert len(smtp.sent) == 3  # m1 never again, m2 once more


@pytest_twisted.ensureDeferred
async def test_delivery_lines_move_the_status_on(stores: list[OutboxStore]) -> None:
    """postfix's delivery lines give each recipient its fate: deferred, then delivered, or bounced."""
    clock, events = FakeClock(), []
    plog = FakeLog(covered=(NOW - 10, NOW + 10))
    box = outbox(stores[0], ScriptedSubmitter(), clock, postfix_log=plog, events=events)
    await box.accept(message(clock, 1, rcpts=("a@example.net", "b@example.net")))
    await settle_rounds(box)

    async def line(rcpt: str, status: str, dsn: str) -> None:
        await box._apply([Delivery("Q1", rcpt, status, dsn, "127.0.0.1[127.0.0.1]:10026", f"{dsn} text", clock.now)], "<m1@example.org>")

    await line("a@example.net", "sent", "2.0.0")
    assert (await box.status(mid(1), SCOPE))["status"] == "submitted"
    await line("b@example.net", "deferred", "4.4.1")
    assert (await box.status(mid(1), SCOPE))["status"] == "deferred"
    await line("b@example.net", "bounced", "5.0.0")
    status = await box.status(mid(1), SCOPE)
    assert status["status"] == "bounced"
    assert [(r["address"], r["status"], r["dsn"]) for r in status["recipients"]] == [
        ("a@example.net", "sent", "2.0.0"), ("b@example.net", "bounced", "5.0.0")
    ]
    assert [name for name, _ in events] == ["submitted", "deferred", "bounced"]
    await line("a@example.net", "deferred", "4.0.0")  # a late line never undoes a final result
    assert (await box.status(mid(1), SCOPE))["recipients"][0]["status"] == "sent"
    assert plog.callbacks == [box.on_log_event]


@pytest_twisted.ensureDeferred
async def test_two_workers_never_send_a_message_twice(stores: list[OutboxStore]) -> None:
    """Two outboxes (two pools, as two sidecars) drain one table: every message goes exactly once."""
    clock = FakeClock()
    smtp = [ScriptedSubmitter(), ScriptedSubmitter()]
    boxes = [outbox(stores[i], smtp[i], clock) for i in range(2)]
    for n in range(40):
        await boxes[0].accept(message(clock, n))
    for _ in range(4):
        await DeferredList([boxes[0].tick(), boxes[1].tick()], consumeErrors=True)
    ids = sorted(rcpts for s in smtp for _, rcpts, _ in s.sent)
    assert len(ids) == 40
    for n in range(40):
        assert (await boxes[1].status(mid(n), SCOPE))["status"] == "submitted"


@pytest_twisted.ensureDeferred
async def test_expired_records_are_purged(stores: list[OutboxStore]) -> None:
    """Status records past keep_until are deleted; waiting messages are kept."""
    clock = FakeClock()
    box = outbox(stores[0], ScriptedSubmitter(), clock, limits=Limits(status_ttl=100.0))
    await box.accept(message(clock, 1))
    await box.accept(message(clock, 2, send_at=clock.now + 100000))
    await settle_rounds(box)
    clock.now += 8000
    assert await box.purge() == 1
    with pytest.raises(ApiError):
        await box.status(mid(1), SCOPE)
    assert (await box.status(mid(2), SCOPE))["status"] == "scheduled"


@pytest_twisted.ensureDeferred
async def test_a_quiet_log_read_to_its_end_proves_absence(stores: list[OutboxStore]) -> None:
    """With no new line since the handover, a follower that read to the end later still proves postfix did not take it."""
    clock = FakeClock()
    plog = FakeLog(covered=(NOW - 100, NOW - 50))
    smtp = ScriptedSubmitter([SmtpFailure("dropped", "message")])
    box = outbox(stores[0], smtp, clock, postfix_log=plog, lease=30.0)
    await box.accept(message(clock, 1))
    await settle_rounds(box)
    clock.now += 40
    plog.caught_up_at = clock.now
    await settle_rounds(box, 4)
    status = await box.status(mid(1), SCOPE)
    assert status["status"] == "submitted" and len(smtp.sent) == 2


@pytest_twisted.ensureDeferred
async def test_log_lines_of_other_mail_cost_no_database_work(stores: list[OutboxStore]) -> None:
    """postfix's log is mostly other mail: only lines of messages the outbox handed over are looked up,
    and a burst of them is recorded a few at a time."""
    from twisted.internet.task import deferLater

    clock = FakeClock()
    plog = FakeLog(covered=(NOW - 10, NOW + 10))
    lookups: list[str] = []
    real = stores[0].with_postfix

    def counting(message_id: str) -> Any:
        lookups.append(message_id)
        return real(message_id)

    stores[0].with_postfix = counting  # type: ignore[method-assign]
    box = outbox(stores[0], ScriptedSubmitter(), clock, postfix_log=plog)
    for n in range(200):
        box.on_log_event(Filed(f"<other{n}@example.net>", Delivery("QZ", "x@example.net", "sent", "2.0.0", "r", "ok")))
    await box.accept(message(clock, 1))
    await settle_rounds(box)
    box.on_log_event(Filed("<m1@example.org>", Delivery("Q1", "r@example.net", "sent", "2.0.0", "relay", "250 ok", NOW)))
    for _ in range(50):
        if (await box.status(mid(1), SCOPE))["status"] == "delivered":
            break
        await deferLater(_reactor(), 0.02, lambda: None)
    assert (await box.status(mid(1), SCOPE))["status"] == "delivered"
    assert set(lookups) == {"<m1@example.org>"}


def sent_record(clock: FakeClock, n: int) -> NewMessage:
    """The status record of synchronous send ``n`` (already handed to postfix)."""
    return attrs.evolve(message(clock, n), status=Status.SUBMITTED, body=None, size=0, queue_id=f"Q{n}")


@pytest_twisted.ensureDeferred
async def test_records_written_together_are_each_readable_once_their_write_fired(stores: list[OutboxStore]) -> None:
    """Records of many sends at once share writes, and each one is stored by the time its Deferred fires."""
    clock, store = FakeClock(), stores[0]
    readable: list[bool] = []
    writes: list[int] = []
    run = store._run
    store._run = lambda work: writes.append(1) or run(work)  # type: ignore[method-assign]

    async def record_then_read(n: int) -> None:
        await store.record(sent_record(clock, n))
        readable.append(await store.get(mid(n), SCOPE) is not None)

    await DeferredList([Deferred.fromCoroutine(record_then_read(n)) for n in range(1, 31)], fireOnOneErrback=True)
    assert readable == [True] * 30
    # The first record found the writer idle; the 29 that came meanwhile shared the next write.
    assert len(writes) == 2 + 30  # and each get() above is one read
    rows = [await store.get(mid(n), SCOPE) for n in range(1, 31)]
    assert [row.queue_id for row in rows if row is not None] == [f"Q{n}" for n in range(1, 31)]


@pytest_twisted.ensureDeferred
async def test_one_bad_record_does_not_cost_the_others_theirs(stores: list[OutboxStore]) -> None:
    """When a shared write fails (here one id is taken), the other records are still stored; only that one fails."""
    clock, store = FakeClock(), stores[0]
    await store.record(sent_record(clock, 1))
    first = store.record(sent_record(clock, 2))  # written alone: the writer was idle
    batch = [store.record(sent_record(clock, n)) for n in (3, 1, 4)]  # queued behind it: one write, id 1 taken
    await first
    outcomes = await DeferredList(batch, consumeErrors=True)
    assert [ok for ok, _ in outcomes] == [True, False, True]
    assert all([await store.get(mid(n), SCOPE) is not None for n in (2, 3, 4)])


@pytest_twisted.ensureDeferred
async def test_sqlite_state_uses_a_write_ahead_log_synced_on_every_commit(tmp_path: Any) -> None:
    """Every pooled SQLite connection runs in WAL mode with synchronous = FULL (2): records stay durable."""
    runner = open_state_runner(f"sqlite:{tmp_path / 'state.sqlite'}", _reactor())
    try:
        modes = await runner._run(lambda conn: (query_rows(conn, "PRAGMA journal_mode"), query_rows(conn, "PRAGMA synchronous")))
        assert modes == ([("wal",)], [(2,)])
        await OutboxStore(runner).record(sent_record(FakeClock(), 1))
    finally:
        runner.close()
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "state.sqlite")) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)  # the mode stays with the file
        assert other.execute(f"SELECT COUNT(*) FROM {outbox_sql.TABLE}").fetchone() == (1,)


@pytest_twisted.ensureDeferred
async def test_a_record_without_events_is_committed_unsynced_and_one_with_events_synced(tmp_path: Any) -> None:
    """A synchronous send's record with no webhook event commits at synchronous = NORMAL, and the
    connection is back at FULL afterwards; a record with an event is synced like every other write."""
    runner = open_state_runner(f"sqlite:{tmp_path / 'state.sqlite'}", _reactor(), pool_size=1)
    statements: list[str] = []
    queued: list[Any] = []
    store = OutboxStore(runner, enqueue=lambda conn, dialect, event: queued.append(event))
    try:
        await store.get(mid(0), SCOPE)  # the tables exist; the one pooled connection is open
        await runner._run(lambda conn: getattr(conn, "_connection", conn).set_trace_callback(statements.append))
        await store.record(sent_record(FakeClock(), 1))
        plain = [s for s in statements if s.startswith(("PRAGMA synchronous", "BEGIN", "COMMIT"))]
        assert plain == ["PRAGMA synchronous = NORMAL", "BEGIN IMMEDIATE", "COMMIT", "PRAGMA synchronous = FULL"]
        assert await runner._run(lambda conn: query_rows(conn, "PRAGMA synchronous")) == [(2,)]
        del statements[:]
        await store.record(sent_record(FakeClock(), 2), events=["submitted"])
        assert queued == ["submitted"]
        assert [s for s in statements if s.startswith("PRAGMA synchronous")] == []
        assert "COMMIT" in statements
        assert [(await store.get(mid(n), SCOPE)) is not None for n in (1, 2)] == [True, True]
    finally:
        runner.close()


@pytest_twisted.ensureDeferred
async def test_inline_records_skip_the_pool_and_fall_back_to_it_when_the_lock_is_taken(tmp_path: Any) -> None:
    """On SQLite a record without events is written on the calling thread (stored when record()
    returns, no pool call); a record with events, or one that meets the write lock taken by another
    connection, goes through the pool and is stored all the same; every third inline write asks the
    pool for a passive checkpoint."""
    import sqlite3

    path = tmp_path / "state.sqlite"
    runner = open_state_runner(f"sqlite:{path}", _reactor(), pool_size=1)
    inline = outbox_sql.InlineRecords(str(path), checkpoint_every=3)
    store = OutboxStore(runner, enqueue=lambda conn, dialect, event: None, inline=inline)
    pooled: list[str] = []
    run = store._run

    def counting(work: Any) -> Any:
        pooled.append(getattr(work, "__qualname__", "?"))
        return run(work)

    store._run = counting  # type: ignore[method-assign]
    clock = FakeClock()
    try:
        await store.get(mid(0), SCOPE)  # the tables exist now (first use, through the pool)
        del pooled[:]
        written = store.record(sent_record(clock, 1))
        assert written.called and pooled == []  # stored before record() returned
        with contextlib.closing(sqlite3.connect(path)) as other:
            assert other.execute(f"SELECT queue_id FROM {outbox_sql.TABLE} WHERE id = ?", (mid(1),)).fetchall() == [("Q1",)]
        await store.record(sent_record(clock, 2), events=["submitted"])
        assert len(pooled) == 1
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as holder:
            holder.execute("BEGIN IMMEDIATE")
            waiting = store.record(sent_record(clock, 3))  # the lock is taken: through the pool, which waits
            assert not waiting.called and len(pooled) == 2
            holder.execute("ROLLBACK")
        await waiting
        for n in (4, 5):
            await store.record(sent_record(clock, n))
        assert len(pooled) == 3 and "_checkpoint.<locals>.work" in pooled[-1]  # inline writes 1, 4, 5
        rows = [await store.get(mid(n), SCOPE) for n in range(1, 6)]
        assert [row.queue_id for row in rows if row is not None] == [f"Q{n}" for n in range(1, 6)]
    finally:
        inline.close()
        runner.close()


def test_inline_records_need_the_write_ahead_log(tmp_path: Any) -> None:
    """A file in rollback-journal mode gets no inline writes (its unsynced commits could corrupt it)."""
    import sqlite3

    path = tmp_path / "state.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x)")
    inline = outbox_sql.InlineRecords(str(path))
    assert inline.write([sent_record(FakeClock(), 1)]) is False
    assert inline.write([sent_record(FakeClock(), 2)]) is False
    assert outbox_sql.inline_records("mysql://u:p@127.0.0.1:3306/state") is None
    assert isinstance(outbox_sql.inline_records(f"sqlite:{path}"), outbox_sql.InlineRecords)


def test_a_refused_switch_to_the_log_leaves_the_connection_usable(tmp_path: Any) -> None:
    """While another connection holds the write lock the switch is refused: this one goes on, and a
    later connection switches the file."""
    import sqlite3

    from mailcow_smtp_api.state.store import write_ahead_log

    path = tmp_path / "state.sqlite"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN IMMEDIATE")
        with contextlib.closing(sqlite3.connect(path, timeout=0.01, isolation_level=None)) as other:
            write_ahead_log(other)
            assert other.execute("PRAGMA journal_mode").fetchone() == ("delete",)
            assert other.execute("SELECT COUNT(*) FROM t").fetchone() == (0,)
        holder.execute("COMMIT")
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as later:
        write_ahead_log(later)
        assert later.execute("PRAGMA journal_mode").fetchone() == ("wal",)
