"""Mailbox password checks for the port-25 path, off the reactor thread, bounded and cached.

postfix's port 25 takes any sender from mailcow's network without AUTH (mailcow.md section 5), so on
that path the service checks the mailbox password itself. Hashing is slow on purpose (bcrypt cost 10
is tens of milliseconds, argon2 more), so every check runs in a small dedicated thread pool, and at
most ``max_pending`` checks may be queued or running: past that, callers get a 503 at once instead
of a growing queue that a flood of wrong passwords could fill.

Successful checks are remembered for ``cache_ttl`` seconds, as dovecot's auth cache does (300 s in
mailcow). The cache key is an HMAC, under a key drawn at start-up, over (login, stored hash,
password): a different password or a changed hash in the database never hits, and the cache holds
no password, nor anything from which one could be tested offline once the process is gone.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..core.errors import ApiError
from ..core.passwords import UnsupportedScheme, verify_password

DEFAULT_CACHE_TTL = 300.0  # dovecot's auth_cache_ttl in mailcow
DEFAULT_CACHE_SIZE = 10_000
DEFAULT_THREADS = 4
DEFAULT_MAX_PENDING = 32
BUSY_RETRY_AFTER = 5
NO_MATCH = -1

T = TypeVar("T")
Runner = Callable[[Callable[[], T]], "Deferred[T]"]
Checker = Callable[[str, str], bool]

log = Logger()


class Clock(Protocol):
    """What the cache needs of a clock: ``IReactorTime.seconds`` (a reactor or ``task.Clock``)."""

    def seconds(self) -> float:
        """The current time in seconds."""


def busy_error() -> ApiError:
    """The answer when too many password checks are already waiting (503, retry shortly)."""
    return ApiError.of("smtp_busy", retry_after=BUSY_RETRY_AFTER)


def _length_prefixed(*parts: str) -> bytes:
    # Unambiguous framing: ("ab", "c") and ("a", "bc") must give different fingerprints.
    # surrogatepass: a password that is not valid UTF-8 text must still get a fingerprint, not raise.
    out = bytearray()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        out += len(data).to_bytes(4, "big") + data
    return bytes(out)


class SuccessCache:
    """Fingerprints of successful checks, each valid for ``ttl`` seconds, at most ``size`` of them.

    Expiry is measured on ``clock``; an expired entry is dropped when it is next looked up, and the
    least recently used entry makes room when the cache is full.
    """

    def __init__(self, clock: Clock, ttl: float, size: int) -> None:
        self._clock = clock
        self._ttl = ttl
        self._size = size
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def fingerprint(self, login: str, stored_hash: str, password: str) -> bytes:
        """The HMAC-SHA256 under this cache's key of (login, stored hash, password)."""
        return hmac.new(self._key, _length_prefixed(login, stored_hash, password), hashlib.sha256).digest()

    def contains(self, fingerprint: bytes) -> bool:
        """Whether ``fingerprint`` was added less than ``ttl`` seconds ago."""
        expires = self._entries.get(fingerprint)
        if expires is None:
            return False
        if self._clock.seconds() >= expires:
            del self._entries[fingerprint]
            return False
        self._entries.move_to_end(fingerprint)
        return True

    def add(self, fingerprint: bytes) -> None:
        """Remember ``fingerprint`` for ``ttl`` seconds from now; a ttl or size of 0 disables the cache."""
        if self._ttl <= 0 or self._size <= 0:
            return
        self._entries[fingerprint] = self._clock.seconds() + self._ttl
        self._entries.move_to_end(fingerprint)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def entries(self) -> tuple[bytes, ...]:
        """The stored fingerprints, oldest use first (for inspection and metrics)."""
        return tuple(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def check_any(check: Checker, stored_hashes: Sequence[str], password: str) -> int:
    """Index of the first stored hash ``password`` matches, or ``NO_MATCH``.

    Runs in a pool thread. A hash that cannot be checked does not stop the others (mailcow's
    ``verify_hash`` just reports no match for it), but when nothing matched and one of them could not
    be checked, the answer is unknown, so ``UnsupportedScheme`` is raised rather than "wrong password".
    """
    unsupported: UnsupportedScheme | None = None
    for index, stored in enumerate(stored_hashes):
        try:
            if check(stored, password):
                return index
        except UnsupportedScheme as exc:
            unsupported = unsupported or exc
    if unsupported is not None:
        raise unsupported
    return NO_MATCH


class LocalPasswordVerifier(Service):
    """Checks mailbox and app passwords against their stored hashes without blocking the reactor.

    ``threads`` is either a ``ThreadPool`` that the caller starts and stops, or a size: then this
    service owns a pool of that many threads, started and stopped with the service (attach it to the
    application's ``MultiService``, or call ``startService``/``stopService``). ``run`` replaces the
    thread pool entirely (tests pass a controllable runner); ``check`` replaces ``verify_password``.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threads: ThreadPool | int,
        clock: Clock,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_pending: int = DEFAULT_MAX_PENDING,
        check: Checker = verify_password,
        run: Runner[int] | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._reactor = reactor
        self._owns_pool = not isinstance(threads, ThreadPool)
        if isinstance(threads, ThreadPool):
            self._pool = threads
        else:
            self._pool = ThreadPool(minthreads=0, maxthreads=max(1, threads), name="smtpapi-passwords")
        self._run: Runner[int] = run if run is not None else self._in_pool
        # Work handed to an owned pool before start (or after stop) would wait forever.
        self._needs_running_pool = self._owns_pool and run is None
        self._check = check
        self._max_pending = max_pending
        self._pending = 0
        self.cache = SuccessCache(clock, cache_ttl, cache_size)

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        """Start the owned thread pool."""
        super().startService()  # type: ignore[no-untyped-call]
        if self._owns_pool:
            self._pool.start()

    def stopService(self) -> None:
        """Stop the owned thread pool; checks already running finish first."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._owns_pool and self._pool.started:
            self._pool.stop()

    @property
    def pending(self) -> int:
        """How many checks are queued or running in the pool."""
        return self._pending

    # ------------------------------------------------------------------ checking

    def verify(self, login: str, stored_hash: str, password: str) -> Deferred[bool]:
        """Fire True if ``password`` matches ``stored_hash`` for ``login``, False if it does not.

        Errbacks with ``ApiError`` ``smtp_local_auth_unsupported`` when the hash cannot be checked
        here, and with the 503 ``busy_error()`` when too many checks are pending.
        """
        return self.verify_any(login, (stored_hash,), password)

    def verify_any(self, login: str, stored_hashes: Sequence[str], password: str) -> Deferred[bool]:
        """Like ``verify``, for a mailbox password plus its app passwords: True if any matches."""
        hashes = tuple(stored_hashes)
        fingerprints = [self.cache.fingerprint(login, stored, password) for stored in hashes]
        if any(self.cache.contains(fp) for fp in fingerprints):
            return succeed(True)
        if not hashes:
            return succeed(False)
        if self._pending >= self._max_pending or (self._needs_running_pool and not self.running):
            return fail(busy_error())
        return self._submit(login, partial(check_any, self._check, hashes, password), fingerprints)

    def _in_pool(self, job: Callable[[], int]) -> Deferred[int]:
        return deferToThreadPool(self._reactor, self._pool, job)

    def _submit(self, login: str, job: Callable[[], int], fingerprints: list[bytes]) -> Deferred[bool]:
        self._pending += 1
        try:
            done = self._run(job)
        except Exception:
            self._pending -= 1
            return fail()
        # The slot is freed when the thread's work ends, not when the caller stops waiting: a
        # cancelled request (Klein cancels on client disconnect) must not let more hashing start.
        done.addBoth(self._release)
        checked = done.addCallbacks(partial(self._matched, fingerprints), partial(self._refused, login))
        answer: Deferred[bool] = Deferred()
        checked.chainDeferred(answer)
        return answer

    def _release(self, result: T) -> T:
        self._pending -= 1
        return result

    def _matched(self, fingerprints: list[bytes], index: int) -> bool:
        if index == NO_MATCH:
            return False
        self.cache.add(fingerprints[index])
        return True

    def _refused(self, login: str, failure: Failure) -> Failure:
        exc = failure.value
        if not isinstance(exc, UnsupportedScheme):
            return failure
        log.warn(
            "password of {login} cannot be checked locally (scheme {scheme!r}: {reason})",
            login=login,
            scheme=exc.scheme,
            reason=exc.reason,
        )
        raise ApiError.of("smtp_local_auth_unsupported") from None
