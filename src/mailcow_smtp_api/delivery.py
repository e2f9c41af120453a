"""The outbox use case: accept now, deliver when postfix can, and tell the caller what became of it.

``Outbox.accept`` stores a message that passed every check (``SendService.prepare``); the worker
(``Outbox.tick``, run every second and right after an acceptance) claims due messages, hands them to
postfix's plain internal target, retries what postfix could not take yet with exponential backoff
until ``--outbox-lifetime``, and fails what it refuses for good. A handover whose outcome is unknown
(no answer after the final dot, or the process died) is never simply repeated: postfix's log decides
(``Outbox._resolve``), and without a log it stays ``unknown``. Delivery lines of the log then move
submitted messages on to delivered, deferred or bounced. Each change can raise a webhook event.
Everything with an effect comes in through a Protocol.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.logger import Logger

from .core.errors import ApiError, SmtpFailure
from .core.maillog import Delivery, Filed
from .core.model import Envelope, Security, SmtpTarget
from .service import Prepared, SendOutcome
from .core.outbox import (
    Attempt,
    Limits,
    NewMessage,
    Outcome,
    RecipientFate,
    Row,
    Status,
    backoff,
    fates_of,
    merged_fate,
    status_from_recipients,
)

log = Logger(namespace="smtpapi.outbox")

# A status change that raises a webhook event.
EVENT_OF = {
    Status.SUBMITTED: "submitted",
    Status.DELIVERED: "delivered",
    Status.DEFERRED: "deferred",
    Status.BOUNCED: "bounced",
    Status.FAILED: "failed",
}
RESOLVE_RETRY_SECONDS = 5.0
WATCH_REFRESH_SECONDS = 10.0


class OutboxStorage(Protocol):
    """The outbox table (state/outbox.py's OutboxStore)."""

    def accept(self, message: NewMessage, max_messages: int, max_bytes: int) -> Deferred[bool]: ...
    def record(self, message: NewMessage, events: Sequence[Any] = ()) -> Deferred[None]: ...
    def get(self, message: str, scope: str) -> Deferred[Row | None]: ...
    def cancel(self, message: str, scope: str, now: float, keep_until: float) -> Deferred[Row | None]: ...
    def claim(self, now: float, lease: float, token: str, limit: int) -> Deferred[list[Row]]: ...
    def body(self, message: str, token: str) -> Deferred[bytes | None]: ...
    def begin_handover(self, message: str, token: str, now: float) -> Deferred[bool]: ...
    def settle(self, row: Row, token: str, outcome: Outcome, events: Sequence[Any] = ()) -> Deferred[bool]: ...
    def release(self, message: str, token: str, retry_at: float) -> Deferred[None]: ...
    def with_postfix(self, message_id: str) -> Deferred[list[Row]]: ...
    def update_fates(
        self, row: Row, fates: Mapping[str, RecipientFate], status: Status, now: float, keep: float, events: Sequence[Any] = ()
    ) -> Deferred[bool]: ...
    def purge(self, now: float) -> Deferred[int]: ...
    def watched(self) -> Deferred[list[str]]: ...


class Trace(Protocol):
    """What postfix's log says of one Message-ID."""

    accepted_queue_id: str | None
    deliveries: list[Delivery]


class DeliveryLog(Protocol):
    """postfix's log, followed (mailcow/postfixlog.py). ``covered``: the times of the first and last
    line read without a gap; ``caught_up_at`` (optional): when the end of the log was last reached."""

    covered: tuple[float, float] | None

    def trace(self, message_id: str) -> Any: ...
    def subscribe(self, callback: Callable[[Filed], None]) -> None: ...


class Plain(Protocol):
    """Hands one message to postfix (the session pool)."""

    def submit(self, target: SmtpTarget, credentials: Any, envelope: Envelope, message: Any) -> Deferred[Any]: ...


def target_of(text: str) -> SmtpTarget:
    """``host:port`` (IPv6 in brackets) of a stored row, always the plain path."""
    host, _, port = text.rpartition(":")
    return SmtpTarget(host.strip("[]"), int(port), Security.PLAIN)


@attrs.define
class Outbox:
    """Accepts messages into the outbox, delivers them, and reads their fate back from postfix's log."""

    store: OutboxStorage
    submitter: Plain
    clock: Any  # IReactorTime: seconds() and callLater()
    new_token: Callable[[], str]
    limits: Limits = attrs.Factory(Limits)
    lease: float = 600.0
    postfix_log: DeliveryLog | None = None
    make_event: Callable[[str, Mapping[str, Any], float], Any] | None = None
    on_events: Callable[[], None] | None = None
    rng: Callable[[], float] = random.random
    batch: int = 20
    _running: bool = False
    _waiters: list[Deferred[int]] = attrs.Factory(list)
    # Message-IDs postfix holds for the outbox, whose log lines are recorded.
    _watched: set[str] = attrs.Factory(set)
    _watched_at: float = float("-inf")
    _log_writes: DeferredSemaphore = attrs.Factory(lambda: DeferredSemaphore(4))

    def __attrs_post_init__(self) -> None:
        if self.postfix_log is not None:
            self.postfix_log.subscribe(self.on_log_event)

    # ------------------------------------------------------------------ acceptance and records

    def now(self) -> float:
        """The current time."""
        return float(self.clock.seconds())

    async def accept(self, message: NewMessage) -> None:
        """Store an accepted message; 503 smtp_outbox_full when there is no room."""
        if not await self.store.accept(message, self.limits.max_messages, self.limits.max_bytes):
            raise ApiError.of("smtp_outbox_full", retry_after=60)
        if message.status is Status.QUEUED:
            self.wake()

    def check_send_at(self, send_at: float | None) -> None:
        """400 smtp_invalid_send_at when ``send_at`` lies in the past (a minute of clock skew is allowed)
        or more than --max-schedule ahead."""
        if send_at is None:
            return
        now = self.now()
        if send_at < now - 60:
            raise ApiError.of("smtp_invalid_send_at", "send_at lies in the past", field="send_at")
        if send_at > now + self.limits.max_schedule:
            raise ApiError.of(
                "smtp_invalid_send_at",
                f"send_at lies more than {self.limits.max_schedule:g} s ahead (--max-schedule)",
                field="send_at",
            )

    async def accept_prepared(self, prepared: Prepared, scope: str, request_id: str) -> NewMessage:
        """Store a message that passed every check; it is handed to postfix at ``send_at`` or at once."""
        now = self.now()
        send_at = prepared.request.send_at
        later = send_at is not None and send_at > now
        start = send_at if later and send_at is not None else now
        body = prepared.message if isinstance(prepared.message, bytes) else b"".join(prepared.message)
        message = NewMessage(
            id=self.new_token(),
            scope=scope,
            status=Status.SCHEDULED if later else Status.QUEUED,
            message_id=prepared.message_id,
            sender=prepared.envelope.sender,
            recipients=prepared.envelope.recipients,
            login=prepared.request.login,
            target=prepared.target.address,
            body=body,
            size=len(body),
            created_at=now,
            send_at=send_at,
            not_before=start,
            expires_at=start + self.limits.lifetime,
            keep_until=start + self.limits.lifetime + self.limits.status_ttl,
            request_id=request_id,
        )
        await self.accept(message)
        return message

    async def record_sent(self, outcome: SendOutcome, scope: str, request_id: str) -> str | None:
        """Keep the status record of a message sent at once; None when the state database failed
        (the send itself succeeded: its answer is given all the same)."""
        now = self.now()
        result = outcome.result
        refused = [(r.address, r.code, r.text) for r in result.recipients if not 200 <= r.code < 300]
        message = NewMessage(
            id=self.new_token(),
            scope=scope,
            status=Status.SUBMITTED,
            message_id=outcome.message_id,
            sender=outcome.envelope.sender,
            recipients=outcome.envelope.recipients,
            login=outcome.request.login,
            target=outcome.target.address,
            body=None,
            size=0,
            created_at=now,
            send_at=None,
            not_before=now,
            expires_at=now,
            keep_until=now + self.limits.status_ttl,
            request_id=request_id,
            queue_id=result.queue_id,
            attempts=(Attempt(now, "submitted", result.code, result.text, result.queue_id),),
            fates=fates_of(refused),
        )
        try:
            await self.record(message)
        except Exception as exc:
            log.warn("outbox: the status record of a sent message was not stored ({kind})", kind=type(exc).__name__)
            return None
        return message.id

    async def record(self, message: NewMessage) -> None:
        """Keep the status record of a message already handed to postfix (a synchronous send)."""
        await self.store.record(message, self._events(Status.SUBMITTED, lambda: message.as_row().as_json()))
        self._catch_up(message.message_id)

    async def status(self, message: str, scope: str) -> dict[str, Any]:
        """The status answer of one message sent with this key."""
        row = await self.store.get(message, scope)
        if row is None:
            raise ApiError.of("smtp_status_not_found", field="id")
        return row.as_json()

    async def cancel(self, message: str, scope: str) -> dict[str, Any]:
        """Cancel a message not yet handed to postfix."""
        now = self.now()
        row = await self.store.cancel(message, scope, now, now + self.limits.status_ttl)
        if row is not None:
            return row.as_json()
        if await self.store.get(message, scope) is None:
            raise ApiError.of("smtp_status_not_found", field="id")
        raise ApiError.of("smtp_not_cancelable")

    # ------------------------------------------------------------------ the worker

    def wake(self) -> None:
        """Run a round soon (right after an acceptance) instead of waiting for the next tick."""
        self.clock.callLater(0, self.tick)

    def tick(self) -> Deferred[int]:
        """One round: claim due messages and work on each; fire with how many were claimed.

        While a round runs, another is not started: the caller waits for the running one.
        """
        waiter: Deferred[int] = Deferred()
        self._waiters.append(waiter)
        if not self._running:
            self._running = True
            ensureDeferred(self._round()).addErrback(_round_failed).addBoth(self._round_done)
        return waiter

    def _round_done(self, claimed: Any) -> None:
        self._running = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(claimed)

    async def _round(self) -> int:
        await self._refresh_watched()
        token = self.new_token()
        rows = await self.store.claim(self.now(), self.lease, token, self.batch)
        if rows:
            await DeferredList([ensureDeferred(self._work(row, token)) for row in rows], consumeErrors=True)
        return len(rows)

    async def _work(self, row: Row, token: str) -> None:
        try:
            if row.status is Status.SENDING:
                await self._resolve(row, token)
            else:
                await self._deliver(row, token)
        except Exception:
            log.failure("outbox: message {id} could not be worked on", id=row.id)
            await self.store.release(row.id, token, self.now() + RESOLVE_RETRY_SECONDS)

    async def _deliver(self, row: Row, token: str) -> None:
        now = self.now()
        if now >= row.expires_at:
            await self._fail(row, token, Attempt(now, "failed", None, "the outbox lifetime ended before postfix took it"))
            return
        body = await self.store.body(row.id, token)
        if body is None:
            await self._fail(row, token, Attempt(now, "failed", None, "the stored message is missing"))
            return
        if not await self.store.begin_handover(row.id, token, now):
            return  # the claim was lost meanwhile: another worker has it
        try:
            result = await self.submitter.submit(target_of(row.target), None, Envelope(row.sender, row.recipients), body)
        except SmtpFailure as failure:
            await self._failed_handover(row, token, failure)
            return
        accepted = [r for r in result.recipients if 200 <= r.code < 300]
        refused = [(r.address, r.code, r.text) for r in result.recipients if not 200 <= r.code < 300]
        attempt = Attempt(self.now(), "submitted", result.code, result.text, result.queue_id)
        status = Status.SUBMITTED if accepted else Status.FAILED
        await self._settle(row, token, Outcome(
            status, self.now(), self.now() + self.limits.status_ttl, attempt,
            queue_id=result.queue_id, fates=fates_of(refused), drop_body=True,
        ))
        self._catch_up(row.message_id)

    async def _failed_handover(self, row: Row, token: str, failure: SmtpFailure) -> None:
        now = self.now()
        attempt = Attempt(now, "retry", failure.code, failure.text or failure.reason or failure.kind)
        if failure.outcome_unknown:
            # Maybe accepted: never sent again blindly. The next round resolves it from the log.
            log.warn("outbox: no answer after the data of {id}; postfix's log will tell", id=row.id)
            await self.store.release(row.id, token, now)
            return
        codes = [r.code for r in failure.recipients] or ([failure.code] if failure.code is not None else [])
        permanent = failure.kind == "reply" and bool(codes) and any(c >= 500 for c in codes)
        if permanent:
            fates = fates_of([(r.address, r.code, r.text) for r in failure.recipients])
            await self._fail(row, token, attrs.evolve(attempt, outcome="failed"), fates)
            return
        retry_at = now + backoff(len(row.attempts) + 1, self.rng, cap=max(1.0, min(1800.0, self.limits.lifetime / 4)))
        if retry_at >= row.expires_at:
            await self._fail(row, token, attrs.evolve(attempt, outcome="failed"))
            return
        await self._settle(row, token, Outcome(Status.QUEUED, now, now + self.limits.status_ttl, attempt, not_before=retry_at))

    async def _resolve(self, row: Row, token: str) -> None:
        """A handover that was cut off: postfix's log says whether postfix took it."""
        now = self.now()
        handover = row.handover_at if row.handover_at is not None else row.updated_at
        if self.postfix_log is None:
            attempt = Attempt(now, "unknown", None, "the handover was cut off and no --postfix-log can tell its outcome")
            await self._settle(row, token, Outcome(Status.UNKNOWN, now, now + self.limits.status_ttl, attempt, drop_body=True))
            return
        trace = self.postfix_log.trace(row.message_id)
        if trace is not None and trace.accepted_queue_id is not None:
            attempt = Attempt(now, "submitted", None, "found in postfix's log after a cut-off handover", trace.accepted_queue_id)
            await self._settle(row, token, Outcome(
                Status.SUBMITTED, now, now + self.limits.status_ttl, attempt, queue_id=trace.accepted_queue_id, drop_body=True
            ))
            self._catch_up(row.message_id)
            return
        covered = self.postfix_log.covered
        # How far the log is known to be complete: its last line, or, when the follower has read to
        # the end of a quiet log, the time it did so.
        complete_to = max(covered[1] if covered else 0.0, getattr(self.postfix_log, "caught_up_at", None) or 0.0)
        # postfix logs its acceptance at once; a lease's time after the handover is ample.
        if covered is not None and covered[0] <= handover and complete_to >= handover + self.lease:
            attempt = Attempt(now, "proven_not_taken", None, "postfix's log shows postfix did not take it")
            await self._settle(row, token, Outcome(Status.QUEUED, now, now + self.limits.status_ttl, attempt, not_before=now))
            return
        if (covered is not None and covered[0] > handover) or now > handover + 2 * self.lease + 600:
            attempt = Attempt(now, "unknown", None, "postfix's log no longer covers the handover")
            await self._settle(row, token, Outcome(Status.UNKNOWN, now, now + self.limits.status_ttl, attempt, drop_body=True))
            return
        await self.store.release(row.id, token, now + RESOLVE_RETRY_SECONDS)  # the log has not got that far yet

    async def _fail(
        self, row: Row, token: str, attempt: Attempt, fates: Mapping[str, RecipientFate] | None = None
    ) -> None:
        now = self.now()
        await self._settle(row, token, Outcome(Status.FAILED, now, now + self.limits.status_ttl, attempt, fates=fates, drop_body=True))

    async def _settle(self, row: Row, token: str, outcome: Outcome) -> None:
        events = self._events(outcome.status, lambda: row.settled(outcome).as_json()) if outcome.status is not row.status else []
        if await self.store.settle(row, token, outcome, events) and events and self.on_events is not None:
            self.on_events()

    # ------------------------------------------------------------------ postfix's log

    def on_log_event(self, filed: Filed) -> None:
        """A delivery line of postfix's log: record the recipient's fate (errors are logged).

        Only messages of the outbox that postfix holds are looked up: postfix's log is mostly other
        mail, and at start-up a follower replays the whole log.
        """
        if isinstance(filed.event, Delivery) and filed.message_id in self._watched:
            self._applying(self._apply([filed.event], filed.message_id))

    def _catch_up(self, message_id: str) -> None:
        """Lines postfix logged before the record said 'submitted' (a fast delivery) are applied now;
        later lines of this message are followed."""
        if self.postfix_log is None:
            return
        self._watched.add(message_id)
        trace = self.postfix_log.trace(message_id)
        if trace is not None and trace.deliveries:
            self._applying(self._apply(list(trace.deliveries), message_id))

    def _applying(self, work: Any) -> None:
        """Record fates a few at a time, so that a burst of log lines never floods the database."""
        d = self._log_writes.run(lambda: ensureDeferred(work))
        d.addErrback(lambda f: log.warn("outbox: a delivery line could not be recorded ({e})", e=type(f.value).__name__))

    async def _refresh_watched(self) -> None:
        """Follow the messages postfix holds that another replica (or an earlier process) handed over."""
        now = self.now()
        if self.postfix_log is None or now - self._watched_at < WATCH_REFRESH_SECONDS:
            return
        self._watched_at = now
        for message_id in await self.store.watched():
            if message_id not in self._watched:
                self._catch_up(message_id)

    async def _apply(self, deliveries: Sequence[Delivery], message_id: str) -> None:
        for _ in range(3):  # a row changed meanwhile is read again
            rows = await self.store.with_postfix(message_id)
            pending = False
            for row in rows:
                mine = [d for d in deliveries if d.queue_id == row.queue_id]
                if not mine:
                    continue
                fates = dict(row.fates)
                for delivery in mine:
                    key = delivery.recipient.lower()
                    fates[key] = merged_fate(
                        fates.get(key), RecipientFate(delivery.status, delivery.dsn, delivery.relay, delivery.text, delivery.time)
                    )
                if fates == dict(row.fates):
                    continue
                status = status_from_recipients({k: v for k, v in fates.items() if v.status != "refused"}, _accepted(row, fates))
                now = self.now()
                after = attrs.evolve(row, fates=fates, status=status, updated_at=now)
                events = self._events(status, after.as_json) if status is not row.status else []
                if await self.store.update_fates(row, fates, status, now, now + self.limits.status_ttl, events):
                    if events and self.on_events is not None:
                        self.on_events()
                    if status in (Status.DELIVERED, Status.BOUNCED):
                        self._watched.discard(message_id)
                else:
                    pending = True
            if not pending:
                return

    def _events(self, status: Status, message_json: Callable[[], Mapping[str, Any]]) -> list[Any]:
        """The webhook events of a change to ``status``; the message's JSON is made only when there are any."""
        name = EVENT_OF.get(status)
        if name is None or self.make_event is None:
            return []
        return [self.make_event(name, message_json(), self.now())]

    # ------------------------------------------------------------------ retention

    async def purge(self) -> int:
        """Delete status records past --status-ttl."""
        return await self.store.purge(self.now())


def _accepted(row: Row, fates: Mapping[str, RecipientFate]) -> list[str]:
    """The recipients postfix took (those it refused at RCPT have their own fate already)."""
    return [r for r in row.recipients if fates.get(r.lower(), RecipientFate("pending")).status != "refused"]


def _round_failed(failure: Any) -> int:
    log.failure("outbox round failed", failure)
    return 0

