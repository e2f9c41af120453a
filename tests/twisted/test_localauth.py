"""Tests for localauth: bounded, cached mailbox password checks that keep hashing off the reactor."""

from __future__ import annotations

import base64
import gc
import hashlib
import queue
import secrets
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.mailcow.localauth import LocalPasswordVerifier, SuccessCache, check_any
from mailcow_smtp_api.core.passwords import UnsupportedScheme, verify_password

LOGIN = "user@example.org"


def ssha256(password: str) -> str:
    """{SSHA256} of ``password`` with a fresh salt, built from the scheme's definition."""
    salt = secrets.token_bytes(8)
    raw = hashlib.sha256(password.encode("utf-8") + salt).digest() + salt
    return "{SSHA256}" + base64.b64encode(raw).decode("ascii")


def fresh_password() -> str:
    """A password made at run time, so no other object in the process shares it."""
    return "pw-" + secrets.token_hex(12)


class CountingCheck:
    """verify_password that counts its calls and records the thread each one ran on."""

    def __init__(self, inner: Callable[[str, str], bool] = verify_password) -> None:
        self.calls = 0
        self.threads: list[int] = []
        self._inner = inner

    def __call__(self, stored: str, password: str) -> bool:
        self.calls += 1
        self.threads.append(threading.get_ident())
        return self._inner(stored, password)


class ControlledRunner:
    """Stands in for the thread pool: jobs wait until the test runs them, in arrival order."""

    def __init__(self) -> None:
        self._waiting: list[tuple[Callable[[], int], Deferred[int]]] = []

    def __call__(self, job: Callable[[], int]) -> Deferred[int]:
        done: Deferred[int] = Deferred()
        self._waiting.append((job, done))
        return done

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def run_next(self) -> None:
        job, done = self._waiting.pop(0)
        try:
            result = job()
        except Exception as exc:
            done.errback(exc)
        else:
            done.callback(result)

    def run_all(self) -> None:
        for _ in range(len(self._waiting)):
            self.run_next()


def make_verifier(**options: Any) -> tuple[LocalPasswordVerifier, ControlledRunner, CountingCheck, Clock]:
    clock = Clock()
    runner = ControlledRunner()
    check = options.pop("check", CountingCheck())
    verifier = LocalPasswordVerifier(clock, 2, clock, run=runner, check=check, **options)  # type: ignore[arg-type]
    return verifier, runner, check, clock


class VerifyTests(SynchronousTestCase):
    """Answers, and where the hashing happens."""

    def test_correct_password_is_true_once_the_hash_has_run(self) -> None:
        """verify waits for the off-thread hash, then fires True for the right password."""
        verifier, runner, check, _ = make_verifier()
        password = fresh_password()
        result = verifier.verify(LOGIN, ssha256(password), password)
        self.assertNoResult(result)
        self.assertEqual(check.calls, 0)
        runner.run_next()
        self.assertIs(self.successResultOf(result), True)
        self.assertEqual(check.calls, 1)

    def test_wrong_password_is_false(self) -> None:
        """A wrong password fires False (not an error)."""
        verifier, runner, _, _ = make_verifier()
        result = verifier.verify(LOGIN, ssha256("right"), "wrong")
        runner.run_all()
        self.assertIs(self.successResultOf(result), False)

    def test_unsupported_scheme_is_a_coded_error(self) -> None:
        """A hash that cannot be checked here errbacks with smtp_local_auth_unsupported (403)."""
        verifier, runner, _, _ = make_verifier()
        result = verifier.verify(LOGIN, "{SCRAM-SHA-256}4096,c2FsdA==,a2V5,a2V5", "secret")
        runner.run_all()
        error = self.failureResultOf(result, ApiError).value
        self.assertEqual((error.code, error.status), ("smtp_local_auth_unsupported", 403))
        self.assertIn("587", error.message)

    def test_unsupported_scheme_log_names_scheme_not_secrets(self) -> None:
        """The log line for an unsupported hash names the login and scheme, never the password or hash data."""
        verifier, runner, _, _ = make_verifier()
        password = fresh_password()
        with capturedLogs() as events:
            result = verifier.verify(LOGIN, "{PLAIN-TRUNC}99-HASHDATA", password)
            runner.run_all()
        self.failureResultOf(result, ApiError)
        text = "\n".join(formatEvent(event) for event in events)
        self.assertIn("PLAIN-TRUNC", text)
        self.assertIn(LOGIN, text)
        self.assertNotIn(password, text)
        self.assertNotIn("HASHDATA", text)

    def test_malformed_hash_is_not_a_wrong_password(self) -> None:
        """A malformed stored value is reported as unsupported, never as a plain False."""
        verifier, runner, _, _ = make_verifier()
        result = verifier.verify(LOGIN, "{SSHA256}!!!", "secret")
        runner.run_all()
        self.assertEqual(self.failureResultOf(result, ApiError).value.code, "smtp_local_auth_unsupported")

    def test_unexpected_error_passes_through(self) -> None:
        """A bug in the check is not disguised as a password answer: its exception reaches the caller."""

        def broken(stored: str, password: str) -> bool:
            raise RuntimeError("bug")

        verifier, runner, _, _ = make_verifier(check=broken)
        result = verifier.verify(LOGIN, "{PLAIN}x", "x")
        runner.run_all()
        self.failureResultOf(result, RuntimeError)
        self.assertEqual(verifier.pending, 0)


class VerifyAnyTests(SynchronousTestCase):
    """A mailbox password together with its app passwords."""

    def test_app_password_matches_after_mailbox_password_does_not(self) -> None:
        """True when any stored hash matches; only the matching one is remembered."""
        verifier, runner, check, _ = make_verifier()
        app = fresh_password()
        hashes = [ssha256("mailbox password"), ssha256("other app"), ssha256(app)]
        result = verifier.verify_any(LOGIN, hashes, app)
        self.assertEqual(runner.waiting, 1)
        runner.run_all()
        self.assertIs(self.successResultOf(result), True)
        self.assertEqual(check.calls, 3)
        self.assertEqual(verifier.cache.entries(), (verifier.cache.fingerprint(LOGIN, hashes[2], app),))

    def test_no_hashes_is_false_without_hashing(self) -> None:
        """A login with no usable stored hash is refused without a pool job."""
        verifier, runner, check, _ = make_verifier()
        self.assertIs(self.successResultOf(verifier.verify_any(LOGIN, [], "x")), False)
        self.assertEqual((runner.waiting, check.calls), (0, 0))

    def test_one_unsupported_hash_does_not_hide_a_match(self) -> None:
        """An app password that matches is enough even when another stored hash cannot be checked."""
        verifier, runner, _, _ = make_verifier()
        result = verifier.verify_any(LOGIN, ["{FOO}x", ssha256("app")], "app")
        runner.run_all()
        self.assertIs(self.successResultOf(result), True)

    def test_unsupported_hash_without_match_is_an_error(self) -> None:
        """With no match and a hash that could not be checked, the answer is the coded error, not False."""
        verifier, runner, _, _ = make_verifier()
        result = verifier.verify_any(LOGIN, [ssha256("a"), "{FOO}x"], "b")
        runner.run_all()
        self.assertEqual(self.failureResultOf(result, ApiError).value.code, "smtp_local_auth_unsupported")

    def test_check_any_reports_first_match_index(self) -> None:
        """check_any returns the index of the first matching hash, or -1 when none matches."""
        hashes = [ssha256("a"), ssha256("b"), ssha256("b")]
        self.assertEqual(check_any(verify_password, hashes, "b"), 1)
        self.assertEqual(check_any(verify_password, hashes, "c"), -1)
        self.assertRaises(UnsupportedScheme, check_any, verify_password, ["{FOO}"], "c")


class CacheTests(SynchronousTestCase):
    """Successful checks are remembered for the TTL, and only for the exact same inputs."""

    def _verified(self, **options: Any) -> tuple[LocalPasswordVerifier, ControlledRunner, CountingCheck, Clock, str, str]:
        verifier, runner, check, clock = make_verifier(**options)
        password = fresh_password()
        stored = ssha256(password)
        first = verifier.verify(LOGIN, stored, password)
        runner.run_all()
        self.assertIs(self.successResultOf(first), True)
        return verifier, runner, check, clock, stored, password

    def test_cache_hit_does_not_hash_again(self) -> None:
        """The same login, hash and password within the TTL fire True at once, without a pool job."""
        verifier, runner, check, _, stored, password = self._verified()
        self.assertIs(self.successResultOf(verifier.verify(LOGIN, stored, password)), True)
        self.assertEqual((runner.waiting, check.calls), (0, 1))

    def test_changed_stored_hash_misses(self) -> None:
        """After a password change in the database, the old password is checked against the new hash."""
        verifier, runner, check, _, _, password = self._verified()
        changed = ssha256("the new password")
        result = verifier.verify(LOGIN, changed, password)
        self.assertNoResult(result)
        runner.run_all()
        self.assertIs(self.successResultOf(result), False)
        self.assertEqual(check.calls, 2)

    def test_rehashed_same_password_misses_then_hits(self) -> None:
        """A new hash of the same password (new salt) is a different key: checked once, then cached."""
        verifier, runner, check, _, _, password = self._verified()
        rehashed = ssha256(password)
        result = verifier.verify(LOGIN, rehashed, password)
        runner.run_all()
        self.assertIs(self.successResultOf(result), True)
        self.assertIs(self.successResultOf(verifier.verify(LOGIN, rehashed, password)), True)
        self.assertEqual(check.calls, 2)

    def test_different_password_misses(self) -> None:
        """A different password never hits the entry of the right one."""
        verifier, runner, check, _, stored, password = self._verified()
        result = verifier.verify(LOGIN, stored, password + "x")
        self.assertNoResult(result)
        runner.run_all()
        self.assertIs(self.successResultOf(result), False)
        self.assertEqual(check.calls, 2)

    def test_different_login_misses(self) -> None:
        """The same hash and password for another login are checked again."""
        verifier, runner, check, _, stored, password = self._verified()
        result = verifier.verify("other@example.org", stored, password)
        self.assertNoResult(result)
        runner.run_all()
        self.assertIs(self.successResultOf(result), True)
        self.assertEqual(check.calls, 2)

    def test_failures_are_not_cached(self) -> None:
        """A wrong password is checked every time it is tried."""
        verifier, runner, check, _ = make_verifier()
        stored = ssha256("right")
        for attempt in range(1, 4):
            result = verifier.verify(LOGIN, stored, "wrong")
            runner.run_all()
            self.assertIs(self.successResultOf(result), False)
            self.assertEqual(check.calls, attempt)
        self.assertEqual(len(verifier.cache), 0)

    def test_entry_expires_after_ttl(self) -> None:
        """An entry answers until cache_ttl seconds have passed on the clock, then the hash runs again."""
        verifier, runner, check, clock, stored, password = self._verified(cache_ttl=300)
        clock.advance(299.5)
        self.assertIs(self.successResultOf(verifier.verify(LOGIN, stored, password)), True)
        clock.advance(0.5)
        result = verifier.verify(LOGIN, stored, password)
        self.assertNoResult(result)
        self.assertEqual(len(verifier.cache), 0)
        runner.run_all()
        self.assertIs(self.successResultOf(result), True)
        self.assertEqual(check.calls, 2)

    def test_hit_does_not_extend_ttl(self) -> None:
        """Using an entry does not make it live longer than cache_ttl from its check."""
        verifier, runner, _, clock, stored, password = self._verified(cache_ttl=10)
        clock.advance(9)
        self.successResultOf(verifier.verify(LOGIN, stored, password))
        clock.advance(1)
        self.assertNoResult(verifier.verify(LOGIN, stored, password))
        self.assertEqual(runner.waiting, 1)

    def test_zero_ttl_disables_the_cache(self) -> None:
        """With cache_ttl=0 every check hashes."""
        verifier, runner, check, _, stored, password = self._verified(cache_ttl=0)
        self.assertNoResult(verifier.verify(LOGIN, stored, password))
        self.assertEqual((runner.waiting, len(verifier.cache)), (1, 0))

    def test_cache_size_is_bounded_least_recently_used_first(self) -> None:
        """Past cache_size entries, the least recently used one is dropped."""
        verifier, runner, check, _ = make_verifier(cache_size=2)
        logins = ["a@example.org", "b@example.org", "c@example.org"]
        stored = {login: ssha256(login) for login in logins}
        for login in logins[:2]:
            verifier.verify(login, stored[login], login)
            runner.run_all()
        self.successResultOf(verifier.verify(logins[0], stored[logins[0]], logins[0]))  # a is now recent
        verifier.verify(logins[2], stored[logins[2]], logins[2])
        runner.run_all()
        self.assertEqual(len(verifier.cache), 2)
        self.successResultOf(verifier.verify(logins[0], stored[logins[0]], logins[0]))
        self.assertNoResult(verifier.verify(logins[1], stored[logins[1]], logins[1]))
        self.assertEqual(check.calls, 3)

    def test_cache_holds_only_keyed_fingerprints(self) -> None:
        """Entries are 32-byte HMACs under a per-process random key: no password, no plain digest of it."""
        verifier, _, _, _, stored, password = self._verified()
        (entry,) = verifier.cache.entries()
        self.assertEqual(len(entry), 32)
        self.assertEqual(entry, verifier.cache.fingerprint(LOGIN, stored, password))
        self.assertNotIn(password.encode(), entry)
        unkeyed = hashlib.sha256((LOGIN + stored + password).encode()).digest()
        self.assertNotEqual(entry, unkeyed)
        other = SuccessCache(Clock(), 300, 10)
        self.assertNotEqual(other.fingerprint(LOGIN, stored, password), entry)

    def test_fingerprint_frames_its_parts(self) -> None:
        """Moving characters between login, hash and password changes the fingerprint."""
        cache = SuccessCache(Clock(), 300, 10)
        self.assertNotEqual(cache.fingerprint("ab", "c", "d"), cache.fingerprint("a", "bc", "d"))
        self.assertNotEqual(cache.fingerprint("a", "bc", "d"), cache.fingerprint("a", "b", "cd"))

    def test_fingerprint_of_unencodable_password_does_not_raise(self) -> None:
        """A password with a lone surrogate still gets a fingerprint and is refused by the check."""
        verifier, runner, _, _ = make_verifier()
        result = verifier.verify(LOGIN, ssha256("x"), "x\udc80")
        runner.run_all()
        self.assertIs(self.successResultOf(result), False)


def reachable(root: object, limit: int = 200_000) -> list[object]:
    """Objects reachable from ``root`` through references (breadth-first, at most ``limit``)."""
    seen = {id(root)}
    found = [root]
    index = 0
    while index < len(found) and len(found) < limit:
        for child in gc.get_referents(found[index]):
            # Modules and classes lead to the whole process; the verifier's state is below them.
            if isinstance(child, type) or type(child).__name__ == "module":
                continue
            if id(child) not in seen:
                seen.add(id(child))
                found.append(child)
        index += 1
    return found


class PlaintextTests(SynchronousTestCase):
    """No password stays in the verifier once its check is over."""

    def test_password_is_not_reachable_after_checks(self) -> None:
        """After a success (cached), a failure and an error, no password is reachable from the verifier."""
        verifier, runner, _, _ = make_verifier()
        right, wrong, odd = fresh_password(), fresh_password(), fresh_password()
        stored = ssha256(right)
        answers = [
            verifier.verify(LOGIN, stored, right),
            verifier.verify(LOGIN, stored, wrong),
            verifier.verify(LOGIN, "{FOO}x", odd),
        ]
        runner.run_all()
        self.assertIs(self.successResultOf(answers[0]), True)
        self.assertIs(self.successResultOf(answers[1]), False)
        self.failureResultOf(answers[2], ApiError)
        self.successResultOf(verifier.verify(LOGIN, stored, right))
        objects = reachable(verifier)
        self.assertGreater(len(objects), 10)
        for secret in (right, wrong, odd):
            self.assertFalse(any(obj is secret for obj in objects))
            encoded = secret.encode()
            self.assertFalse(any(isinstance(obj, bytes | bytearray) and encoded in obj for obj in objects))
            self.assertFalse(any(isinstance(obj, str) and secret in obj for obj in objects))

    def test_reachability_walk_finds_a_pending_password(self) -> None:
        """While a check waits in the pool its password is held (the walk above can see it)."""
        verifier, runner, _, _ = make_verifier()
        secret = fresh_password()
        verifier.verify(LOGIN, ssha256(secret), secret)
        self.assertTrue(any(obj is secret for obj in reachable(runner)))
        runner.run_all()
        self.assertFalse(any(obj is secret for obj in reachable(runner)))


class BoundTests(SynchronousTestCase):
    """At most max_pending checks are queued or running; more are refused at once."""

    def test_overflow_is_refused_with_503(self) -> None:
        """Past max_pending waiting checks, verify errbacks with the busy error and queues nothing."""
        verifier, runner, check, _ = make_verifier(max_pending=2)
        stored = ssha256("right")
        waiting = [verifier.verify(LOGIN, stored, f"guess-{n}") for n in range(2)]
        overflow = verifier.verify(LOGIN, stored, "guess-2")
        error = self.failureResultOf(overflow, ApiError).value
        self.assertEqual((error.code, error.status), ("smtp_busy", 503))
        self.assertIsNotNone(error.retry_after)
        self.assertEqual((runner.waiting, verifier.pending), (2, 2))
        runner.run_all()
        self.assertEqual([self.successResultOf(d) for d in waiting], [False, False])
        self.assertEqual(check.calls, 2)
        self.assertEqual(verifier.pending, 0)

    def test_slot_is_freed_when_a_check_ends(self) -> None:
        """Once a queued check finishes, a new one is accepted."""
        verifier, runner, _, _ = make_verifier(max_pending=1)
        verifier.verify(LOGIN, ssha256("a"), "a")
        self.failureResultOf(verifier.verify(LOGIN, ssha256("b"), "b"), ApiError)
        runner.run_next()
        accepted = verifier.verify(LOGIN, ssha256("b"), "b")
        self.assertNoResult(accepted)
        runner.run_next()
        self.assertIs(self.successResultOf(accepted), True)

    def test_cache_hits_bypass_the_bound(self) -> None:
        """A cached success answers even while the queue is full."""
        verifier, runner, _, _ = make_verifier(max_pending=1)
        stored = ssha256("known")
        verifier.verify(LOGIN, stored, "known")
        runner.run_all()
        verifier.verify(LOGIN, ssha256("x"), "y")
        self.assertIs(self.successResultOf(verifier.verify(LOGIN, stored, "known")), True)

    def test_cancelled_check_keeps_its_slot_until_the_hash_ends(self) -> None:
        """Cancelling the caller's Deferred (client gone) does not let another hash start early."""
        verifier, runner, _, _ = make_verifier(max_pending=1)
        password = fresh_password()
        stored = ssha256(password)
        first = verifier.verify(LOGIN, stored, password)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(self.failureResultOf(verifier.verify(LOGIN, stored, "x"), ApiError).value.code, "smtp_busy")
        runner.run_all()
        self.assertEqual(verifier.pending, 0)
        self.assertIs(self.successResultOf(verifier.verify(LOGIN, stored, password)), True)

    def test_runner_that_raises_frees_its_slot(self) -> None:
        """If handing the job to the pool fails, the error reaches the caller and the slot is free again."""

        def refuse(job: Callable[[], int]) -> Deferred[int]:
            raise RuntimeError("pool is gone")

        clock = Clock()
        verifier = LocalPasswordVerifier(clock, 1, clock, run=refuse, max_pending=1)  # type: ignore[arg-type]
        self.failureResultOf(verifier.verify(LOGIN, "{PLAIN}a", "a"), RuntimeError)
        self.assertEqual(verifier.pending, 0)

    def test_max_pending_must_be_positive(self) -> None:
        """A bound below 1 is a configuration error."""
        clock = Clock()
        self.assertRaises(ValueError, LocalPasswordVerifier, clock, 1, clock, max_pending=0)


class ThreadTestReactor:
    """The reactor's side of callFromThread: calls from pool threads wait until the test thread runs them."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., object], tuple[object, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        self.calls.put((f, args))

    def run_one(self) -> None:
        f, args = self.calls.get(timeout=10)
        f(*args)


class ThreadPoolTests(SynchronousTestCase):
    """With the real thread pool the hash never runs on the reactor thread."""

    def _started(self, threads: int, **options: Any) -> tuple[LocalPasswordVerifier, ThreadTestReactor]:
        reactor = ThreadTestReactor()
        verifier = LocalPasswordVerifier(reactor, threads, Clock(), **options)  # type: ignore[arg-type]
        verifier.startService()
        self.addCleanup(verifier.stopService)
        return verifier, reactor

    def test_hash_runs_on_a_pool_thread_and_answer_on_the_reactor_thread(self) -> None:
        """The check function runs on a pool thread; the Deferred fires on the reactor's thread."""
        check = CountingCheck()
        verifier, reactor = self._started(2, check=check)
        password = fresh_password()
        fired_on: list[int] = []

        def note_thread(ok: bool) -> bool:
            fired_on.append(threading.get_ident())
            return ok

        result = verifier.verify(LOGIN, ssha256(password), password).addCallback(note_thread)
        self.assertNoResult(result)
        reactor.run_one()
        self.assertIs(self.successResultOf(result), True)
        self.assertEqual(check.calls, 1)
        self.assertNotIn(threading.get_ident(), check.threads)
        self.assertEqual(fired_on, [threading.get_ident()])

    def test_pool_runs_at_most_its_size_and_refuses_past_the_bound(self) -> None:
        """A flood fills at most max_pending slots; at most `threads` hashes run at once; the rest is refused."""
        gate = threading.Event()
        lock = threading.Condition()
        running = {"now": 0, "most": 0}

        def slow_check(stored: str, password: str) -> bool:
            with lock:
                running["now"] += 1
                running["most"] = max(running["most"], running["now"])
                lock.notify_all()
            gate.wait(timeout=10)
            with lock:
                running["now"] -= 1
            return False

        verifier, reactor = self._started(2, check=slow_check, max_pending=5)
        flood = [verifier.verify(LOGIN, "{PLAIN}right", f"guess-{n}") for n in range(8)]
        with lock:
            self.assertTrue(lock.wait_for(lambda: running["now"] == 2, timeout=10))
        refused = [d for d in flood[5:]]
        for d in refused:
            self.assertEqual(self.failureResultOf(d, ApiError).value.code, "smtp_busy")
        self.assertEqual(verifier.pending, 5)
        gate.set()
        for _ in range(5):
            reactor.run_one()
        self.assertEqual([self.successResultOf(d) for d in flood[:5]], [False] * 5)
        self.assertEqual(running["most"], 2)
        self.assertEqual(verifier.pending, 0)

    def test_stop_joins_the_pool_threads(self) -> None:
        """stopService stops the pool it owns; its threads are gone afterwards."""
        verifier, reactor = self._started(2)
        result = verifier.verify(LOGIN, "{PLAIN}a", "a")
        reactor.run_one()
        self.assertIs(self.successResultOf(result), True)
        threads = list(verifier._pool.threads)
        self.assertGreater(len(threads), 0)
        verifier.stopService()
        self.assertFalse(any(t.is_alive() for t in threads))

    def test_not_started_is_busy_not_hanging(self) -> None:
        """Before startService (or after stopService) an owned pool answers busy instead of queueing forever."""
        verifier = LocalPasswordVerifier(ThreadTestReactor(), 2, Clock())  # type: ignore[arg-type]
        self.assertEqual(self.failureResultOf(verifier.verify(LOGIN, "{PLAIN}a", "a"), ApiError).value.code, "smtp_busy")

    def test_given_pool_is_used_and_left_to_its_owner(self) -> None:
        """A pool passed in runs the checks, and the service neither starts nor stops it."""
        pool = ThreadPool(minthreads=0, maxthreads=1, name="test-passwords")
        pool.start()
        self.addCleanup(pool.stop)
        reactor = ThreadTestReactor()
        check = CountingCheck()
        verifier = LocalPasswordVerifier(reactor, pool, Clock(), check=check)  # type: ignore[arg-type]
        result = verifier.verify(LOGIN, "{PLAIN}a", "a")
        reactor.run_one()
        self.assertIs(self.successResultOf(result), True)
        self.assertIn(check.threads[0], [t.ident for t in pool.threads])
        verifier.startService()
        verifier.stopService()
        self.assertTrue(pool.started)
