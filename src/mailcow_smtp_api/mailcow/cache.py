"""A short-lived read cache in front of mailcow's database: API-key rows and sender decisions.

Every request needs the API-key rows and a sender decision; asking MariaDB for them each time
costs several thread hops and queries per message. Both are cached for ``ttl`` seconds
(``--db-cache-ttl``, default 5 s, 0 turns caching off). That is also the longest a revoked key, a
removed alias or a withdrawn sender right keeps working. Port 25's credential row (the login's
validity and its stored password and app-password hashes, never a password) is cached the same
way, so a changed or removed password, a disabled mailbox or a new app password takes effect on
port 25 within ``ttl`` seconds rather than at once. Failures are never cached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from ..core.apikeys import ApiKey, authenticate, normalise_key
from ..core.errors import API_AUTH_FAILED, ApiError
from ..core.model import LoginCredentials

T = TypeVar("T")


class Database(Protocol):
    """The reads ``CachedDatabase`` wraps (db.MailcowDatabase)."""

    def api_keys(self) -> Deferred[list[ApiKey]]: ...
    def authorize_sender(self, login: str, sender: str) -> Deferred[Any]: ...
    def sender_has_owner(self, sender: str) -> Deferred[bool]: ...
    def login_credentials(self, login: str) -> Deferred[LoginCredentials]: ...
    def ping(self) -> Deferred[None]: ...


class CachedDatabase:
    """The service's database interface, with API keys and sender decisions cached for ``ttl`` seconds."""

    def __init__(self, database: Database, clock: Any, ttl: float = 5.0, max_entries: int = 50_000) -> None:
        self.database = database
        self.clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self._keys = TtlCache(clock, ttl, 1)
        self._decisions = TtlCache(clock, ttl, max_entries)

    def authenticate_key(self, raw_header: str | None, client_ip: str, need_write: bool) -> Deferred[ApiKey]:
        """Like db.MailcowDatabase.authenticate_key, over cached key rows."""
        if not normalise_key(raw_header):
            return fail(ApiError.mailcow(401, API_AUTH_FAILED))
        rows: Deferred[list[ApiKey]] = self._keys.get_or_fetch("keys", self.database.api_keys)
        return rows.addCallback(lambda keys: authenticate(raw_header, client_ip, need_write, keys))

    def authorize_sender(self, login: str, sender: str) -> Deferred[Any]:
        """mailcow's sender decision, from the cache while it is fresh."""
        return self._cached(("decide", f"{login.lower()}\n{sender.lower()}"), lambda: self.database.authorize_sender(login, sender))

    def sender_has_owner(self, sender: str) -> Deferred[bool]:
        """Whether some login owns ``sender``, from the cache while it is fresh."""
        return self._cached(("owner", sender.lower()), lambda: self.database.sender_has_owner(sender))

    def login_credentials(self, login: str) -> Deferred[LoginCredentials]:
        """The login's validity and stored hashes, from the cache while it is fresh.

        Keyed by the login exactly as given: the row carries it, and the password check that
        follows is the same whether the row came from here or from the database.
        """
        return self._cached(("credentials", login), lambda: self.database.login_credentials(login))

    def ping(self) -> Deferred[None]:
        """The database's own readiness check."""
        return self.database.ping()

    def _cached(self, key: tuple[str, str], fetch: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        return self._decisions.get_or_fetch(key, fetch)


class TtlCache:
    """Values fetched by Deferred-returning calls, kept ``ttl`` seconds (0: never), at most ``max_entries``.

    Failures are never kept; the least recently stored entry makes room first. While a key is
    being fetched, further requests for it wait for that fetch instead of starting their own:
    when an entry expires under load, the database is asked once, not once per request waiting.
    Each of them gets the fetch's value or its failure.
    """

    def __init__(self, clock: Any, ttl: float, max_entries: int) -> None:
        self.clock = clock
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._fetching: dict[Hashable, list[Deferred[Any]]] = {}

    def get_or_fetch(self, key: Hashable, fetch: Callable[[], Deferred[T]]) -> Deferred[T]:
        """The fresh cached value of ``key``, else ``fetch()``'s result (then kept)."""
        now = self.clock.seconds()
        hit = self._entries.get(key)
        if self.ttl > 0 and hit is not None and now - hit[0] < self.ttl:
            return succeed(hit[1])
        if self.ttl <= 0:
            return fetch()
        waiter: Deferred[T] = Deferred()
        waiting = self._fetching.get(key)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._fetching[key] = [waiter]
        try:
            started = fetch()
        except BaseException:
            del self._fetching[key]
            raise
        started.addBoth(self._fetched, key, now)
        return waiter

    def _fetched(self, result: Any, key: Hashable, fetched: float) -> None:
        waiters = self._fetching.pop(key, [])
        if not isinstance(result, Failure):
            self._entries[key] = (fetched, result)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
