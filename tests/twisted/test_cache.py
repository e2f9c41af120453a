"""The database read cache: hits within the TTL, misses after it, one fetch per key at a time, failures never cached."""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.apikeys import ApiKey
from mailcow_smtp_api.mailcow.cache import CachedDatabase, TtlCache
from mailcow_smtp_api.core.errors import ApiError
from mailcow_smtp_api.core.model import LoginCredentials

KEY = "AAAAAA-BBBBBB-CCCCCC-DDDDDD-EEEEEE"


@attrs.define
class CountingDb:
    calls: list[str] = attrs.Factory(list)
    keys: list[ApiKey] = attrs.Factory(lambda: [ApiKey(api_key=KEY, allow_from="", skip_ip_check=True, access="rw", active=True)])
    down: bool = False
    password_hash: str = "{CLEAR}x"

    def api_keys(self) -> Deferred[list[ApiKey]]:
        self.calls.append("keys")
        return fail(ApiError.of("smtp_db_unavailable")) if self.down else succeed(list(self.keys))

    def authorize_sender(self, login: str, sender: str) -> Deferred[Any]:
        self.calls.append(f"decide {login} {sender}")
        return fail(ApiError.of("smtp_db_unavailable")) if self.down else succeed(("allowed", login, sender))

    def sender_has_owner(self, sender: str) -> Deferred[bool]:
        self.calls.append(f"owner {sender}")
        return succeed(True)

    def login_credentials(self, login: str) -> Deferred[LoginCredentials]:
        self.calls.append(f"creds {login}")
        return fail(ApiError.of("smtp_db_unavailable")) if self.down else succeed(LoginCredentials(login, None, self.password_hash))

    def ping(self) -> Deferred[None]:
        return succeed(None)


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.db = CountingDb()
        self.cache = CachedDatabase(self.db, self.clock, ttl=5)

    def test_key_rows_are_read_once_per_ttl(self) -> None:
        """Two authentications within the TTL read the api table once; after it, again."""
        self.successResultOf(self.cache.authenticate_key(KEY, "192.0.2.1", True))
        self.successResultOf(self.cache.authenticate_key(KEY.lower(), "192.0.2.1", True))
        self.assertEqual(self.db.calls, ["keys"])
        self.clock.advance(5)
        self.successResultOf(self.cache.authenticate_key(KEY, "192.0.2.1", True))
        self.assertEqual(self.db.calls, ["keys", "keys"])

    def test_revoked_key_stops_working_after_the_ttl(self) -> None:
        """A key removed from the database is refused once the cached rows expire."""
        self.successResultOf(self.cache.authenticate_key(KEY, "192.0.2.1", True))
        self.db.keys = []
        self.successResultOf(self.cache.authenticate_key(KEY, "192.0.2.1", True))
        self.clock.advance(5.01)
        self.failureResultOf(self.cache.authenticate_key(KEY, "192.0.2.1", True), ApiError)

    def test_sender_decisions_are_cached_case_insensitively(self) -> None:
        """The same login and sender in any case hit the cache within the TTL."""
        self.successResultOf(self.cache.authorize_sender("U@example.org", "S@example.org"))
        self.successResultOf(self.cache.authorize_sender("u@example.org", "s@example.org"))
        self.assertEqual(len([c for c in self.db.calls if c.startswith("decide")]), 1)

    def test_failures_are_not_cached(self) -> None:
        """A database outage is answered as such and asked again next time."""
        self.db.down = True
        self.failureResultOf(self.cache.authorize_sender("u@example.org", "s@example.org"), ApiError)
        self.db.down = False
        self.successResultOf(self.cache.authorize_sender("u@example.org", "s@example.org"))
        self.assertEqual(len([c for c in self.db.calls if c.startswith("decide")]), 2)

    def test_credential_rows_are_read_once_per_ttl(self) -> None:
        """The port-25 credential row is read once within the TTL, and again once it expired."""
        first = self.successResultOf(self.cache.login_credentials("u@example.org"))
        second = self.successResultOf(self.cache.login_credentials("u@example.org"))
        self.assertEqual(first, second)
        self.assertEqual(self.db.calls, ["creds u@example.org"])
        self.clock.advance(5)
        self.successResultOf(self.cache.login_credentials("u@example.org"))
        self.assertEqual(self.db.calls, ["creds u@example.org", "creds u@example.org"])

    def test_a_changed_password_hash_is_used_after_the_ttl(self) -> None:
        """A hash changed in the database is served from the cache until the TTL ends, then read anew."""
        self.db.password_hash = "{CLEAR}old"
        self.assertEqual(self.successResultOf(self.cache.login_credentials("u@example.org")).password_hash, "{CLEAR}old")
        self.db.password_hash = "{CLEAR}new"
        self.clock.advance(4.9)
        self.assertEqual(self.successResultOf(self.cache.login_credentials("u@example.org")).password_hash, "{CLEAR}old")
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(self.cache.login_credentials("u@example.org")).password_hash, "{CLEAR}new")

    def test_credential_rows_are_kept_per_login(self) -> None:
        """Two logins (even differing only in case) never share a cached row."""
        self.successResultOf(self.cache.login_credentials("u@example.org"))
        other = self.successResultOf(self.cache.login_credentials("U@example.org"))
        self.assertEqual(other.login, "U@example.org")
        self.assertEqual(self.db.calls, ["creds u@example.org", "creds U@example.org"])

    def test_credential_failures_are_not_cached(self) -> None:
        """A database failure while reading the credential row is asked again next time."""
        self.db.down = True
        self.failureResultOf(self.cache.login_credentials("u@example.org"), ApiError)
        self.db.down = False
        self.assertEqual(self.successResultOf(self.cache.login_credentials("u@example.org")).password_hash, "{CLEAR}x")

    def test_ttl_zero_disables_caching(self) -> None:
        """With ttl 0 every call reads the database."""
        cache = CachedDatabase(self.db, self.clock, ttl=0)
        for _ in range(2):
            self.successResultOf(cache.authenticate_key(KEY, "192.0.2.1", True))
            self.successResultOf(cache.authorize_sender("u@example.org", "s@example.org"))
            self.successResultOf(cache.login_credentials("u@example.org"))
        self.assertEqual(len(self.db.calls), 6)


class SharedFetchTests(SynchronousTestCase):
    """Requests that miss the cache while its value is being fetched wait for that one fetch."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pending: list[Deferred[Any]] = []
        self.cache = TtlCache(self.clock, 5, 100)

    def fetch(self) -> Deferred[Any]:
        self.pending.append(Deferred())
        return self.pending[-1]

    def test_concurrent_misses_share_one_fetch_and_its_value(self) -> None:
        """Ten misses at once cause one fetch; all ten get its value, which is then kept."""
        waiting = [self.cache.get_or_fetch("k", self.fetch) for _ in range(10)]
        self.assertEqual(len(self.pending), 1)
        self.pending[0].callback("v")
        self.assertEqual([self.successResultOf(d) for d in waiting], ["v"] * 10)
        self.assertEqual(self.successResultOf(self.cache.get_or_fetch("k", self.fetch)), "v")
        self.assertEqual(len(self.pending), 1)

    def test_a_failed_fetch_fails_every_waiter_and_is_not_kept(self) -> None:
        """Every request waiting for a failed fetch gets the failure; the next one fetches again."""
        waiting = [self.cache.get_or_fetch("k", self.fetch) for _ in range(3)]
        self.pending[0].errback(ApiError.of("smtp_db_unavailable"))
        for d in waiting:
            self.failureResultOf(d, ApiError)
        self.cache.get_or_fetch("k", self.fetch)
        self.assertEqual(len(self.pending), 2)

    def test_different_keys_are_fetched_apart(self) -> None:
        """Only requests for the same key share a fetch."""
        self.cache.get_or_fetch("a", self.fetch)
        self.cache.get_or_fetch("b", self.fetch)
        self.assertEqual(len(self.pending), 2)

    def test_a_fetch_that_raises_leaves_nothing_waiting(self) -> None:
        """A fetch function that raises at once raises to its caller; the key is fetched anew next time."""

        def broken() -> Deferred[Any]:
            raise RuntimeError("no connection")

        self.assertRaises(RuntimeError, self.cache.get_or_fetch, "k", broken)
        self.cache.get_or_fetch("k", self.fetch)
        self.assertEqual(len(self.pending), 1)
