"""The send use case over recording fakes: order of checks, no SMTP before authorization."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from mailcow_smtp_api.core.config import from_options
from mailcow_smtp_api.core.errors import ApiError, SmtpFailure
from mailcow_smtp_api.service import OFFLOAD_BYTES, Caller, SendService
from mailcow_smtp_api.core.validate import ParsePolicy, parse_request

from .fakes import GOOD_KEY, FakeKeys, FakeLocalAuth, FakeSenders, FakeSubmitter, FakeThrottle


def make(**config: str) -> tuple[SendService, FakeKeys, FakeSenders, FakeSubmitter, FakeThrottle]:
    keys, senders, submitter, throttle = FakeKeys(), FakeSenders({("user1@example.org", "user1@example.org")}), FakeSubmitter(), FakeThrottle()
    options = {"smtp-host": "127.0.0.1", "smtp-port": "10587", "smtp-allow": "127.0.0.1:10587,127.0.0.1:10465,127.0.0.1:25,127.0.0.1:10025/plain"}
    options.update(config)
    service = SendService(
        config=from_options(options, environ={}),
        keys=keys,
        senders=senders,
        submitter=submitter,
        throttle=throttle,
        now=lambda: datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        new_token=lambda: "tok",
    )
    return service, keys, senders, submitter, throttle


_BASE: dict[str, Any] = {"from": "user1@example.org", "to": ["r@example.net"], "subject": "s", "body": "b", "password": "p"}


def request(**fields: Any) -> Any:
    obj: dict[str, Any] = {
        "from": "user1@example.org",
        "to": ["rcpt@example.net"],
        "bcc": ["hidden@example.net"],
        "subject": "s",
        "body": "b",
        "password": "pw1",
    }
    obj.update(fields)
    return parse_request(obj)


class SendServiceTests(SynchronousTestCase):
    def failure_of(self, coro: Any) -> ApiError:
        err = self.failureResultOf(ensureDeferred(coro), ApiError).value
        assert isinstance(err, ApiError)
        return err

    def test_authorized_send_submits_once_with_credentials_and_envelope(self) -> None:
        """An allowed request is submitted once to the default target with the mailbox login."""
        service, _, senders, submitter, _ = make()
        outcome = self.successResultOf(ensureDeferred(service.send(request(), "192.0.2.1", "rid")))
        self.assertEqual(len(submitter.sent), 1)
        target, creds, envelope, message = submitter.sent[0]
        self.assertEqual(str(target), "127.0.0.1:10587")
        self.assertEqual((creds.login, creds.password), ("user1@example.org", "pw1"))
        self.assertEqual(envelope.recipients, ("rcpt@example.net", "hidden@example.net"))
        self.assertNotIn(b"hidden@", message)
        self.assertIn(b"X-Request-Id: rid", message)
        self.assertIn(b"Message-ID: <tok@example.org>", message)
        self.assertEqual(outcome.result.queue_id, "QID1")
        self.assertEqual(senders.calls, [("user1@example.org", "user1@example.org")])

    def test_unauthorized_sender_never_reaches_smtp(self) -> None:
        """A login that does not own from is refused with 403 before any connection."""
        service, _, _, submitter, _ = make()
        err = self.failure_of(service.send(request(**{"from": "boss@example.org"}), "192.0.2.1"))
        self.assertEqual((err.code, err.status), ("smtp_unauthorized_sender", 403))
        self.assertEqual(submitter.sent, [])

    def test_target_outside_allow_list_is_refused_before_anything(self) -> None:
        """smtp_host/smtp_port not allowed: refused, no sender lookup, no SMTP."""
        service, _, senders, submitter, _ = make()
        for fields in ({"smtp_host": "127.0.0.2"}, {"smtp_port": 2525}, {"smtp_host": "127.0.0.1", "smtp_port": 588}):
            err = self.failure_of(service.send(request(**fields), "192.0.2.1"))
            self.assertEqual((err.code, err.status), ("smtp_host_not_allowed", 403))
        self.assertEqual((senders.calls, submitter.sent), ([], []))

    def test_port_25_is_refused_without_local_verification(self) -> None:
        """Without a local password verifier, port 25 refuses rather than sending unverified."""
        service, _, _, submitter, _ = make()
        err = self.failure_of(service.send(request(smtp_port=25), "192.0.2.1"))
        self.assertEqual(err.code, "smtp_port25_unavailable")
        self.assertEqual(submitter.sent, [])

    def test_allowed_other_port_is_used(self) -> None:
        """A request naming an allowed port goes there."""
        service, _, _, submitter, _ = make()
        self.successResultOf(ensureDeferred(service.send(request(smtp_port=10465), "192.0.2.1")))
        self.assertEqual(submitter.sent[0][0].port, 10465)

    def test_smtp_auth_failure_is_403_and_counts_toward_the_throttle(self) -> None:
        """535 from postfix is smtp_auth_failed and is counted as a failed login from the address."""
        service, _, _, submitter, throttle = make()
        submitter.failure = SmtpFailure("reply", "auth", 535, "5.7.8 Error: authentication failed")
        err = self.failure_of(service.send(request(), "192.0.2.9"))
        self.assertEqual((err.code, err.status), ("smtp_auth_failed", 403))
        self.assertEqual(throttle.failures, {"192.0.2.9": 1})

    def test_bad_key_is_mailcow_401_and_counts(self) -> None:
        """A wrong key answers mailcow's bare 401 and counts a failure."""
        service, keys, _, _, throttle = make()
        err = self.failure_of(service.authenticate("wrong", "192.0.2.7"))
        self.assertEqual((err.status, err.bare, err.message), (401, True, "authentication failed"))
        self.assertEqual(keys.calls, [("wrong", "192.0.2.7", True)])
        self.assertEqual(throttle.failures, {"192.0.2.7": 1})

    def test_blocked_address_is_refused_without_asking_the_database(self) -> None:
        """After too many failures the address gets 429 with Retry-After, even with a good key."""
        service, keys, _, _, throttle = make()
        throttle.failures["192.0.2.8"] = 3
        err = self.failure_of(service.authenticate(GOOD_KEY, "192.0.2.8"))
        self.assertEqual((err.code, err.status, err.retry_after), ("smtp_too_many_failures", 429, 600))
        self.assertEqual(keys.calls, [])

    def test_database_down_is_503_and_not_a_key_failure(self) -> None:
        """A database outage answers smtp_db_unavailable and does not count against the caller."""
        service, keys, _, _, throttle = make()
        keys.down = True
        err = self.failure_of(service.authenticate(GOOD_KEY, "192.0.2.1"))
        self.assertEqual((err.code, err.status), ("smtp_db_unavailable", 503))
        self.assertEqual(throttle.failures, {})

    def test_good_key_passes(self) -> None:
        """The right mailcow key authenticates, as an API key (not a send key)."""
        service, _, _, _, _ = make()
        caller = self.successResultOf(ensureDeferred(service.authenticate(GOOD_KEY, "192.0.2.1")))
        self.assertEqual((caller.send_key, caller.label), (None, "api_key"))


class Port25Tests(SynchronousTestCase):
    """The plain path: the sidecar verifies the password itself and sends without AUTH."""

    def setUp(self) -> None:
        self.service, _, self.senders, self.submitter, self.throttle = make(**{"port25-no-password-from": "10.9.0.0/16"})
        self.local = FakeLocalAuth()
        self.service.local_auth = self.local

    def test_verified_login_sends_without_auth(self) -> None:
        """A right password on port 25 is checked locally, then submitted with no credentials."""
        self.successResultOf(ensureDeferred(self.service.send(request(smtp_port=10025), "192.0.2.1")))
        self.assertEqual(self.local.calls, [("user1@example.org", "pw1")])
        target, creds, _, _ = self.submitter.sent[0]
        self.assertEqual((target.port, creds), (10025, None))

    def test_wrong_password_is_refused_and_counted(self) -> None:
        """A wrong password on port 25 never reaches SMTP and counts toward the throttle."""
        err = self.failureResultOf(ensureDeferred(self.service.send(request(smtp_port=10025, password="bad"), "192.0.2.5")), ApiError).value
        self.assertEqual(err.code, "smtp_auth_failed")
        self.assertEqual(self.submitter.sent, [])
        self.assertEqual(self.throttle.failures, {"192.0.2.5": 1})

    def test_verified_login_still_needs_the_sender_rule(self) -> None:
        """Port 25 applies mailcow's sender rule itself: postfix will not."""
        err = self.failureResultOf(
            ensureDeferred(self.service.send(request(smtp_port=10025, smtp_user="user1@example.org", **{"from": "boss@example.org"}), "192.0.2.1")), ApiError
        ).value
        self.assertEqual(err.code, "smtp_unauthorized_sender")
        self.assertEqual(self.submitter.sent, [])

    def test_no_password_only_from_listed_networks_and_local_senders(self) -> None:
        """Without password: allowed from --port25-no-password-from for a local from; refused otherwise."""
        self.assertTrue(self.service.password_optional(10025, "10.9.1.2"))
        self.assertFalse(self.service.password_optional(10025, "192.0.2.1"))
        self.assertFalse(self.service.password_optional(10587, "10.9.1.2"))
        ok = parse_request({"from": "user1@example.org", "to": ["r@example.net"], "subject": "s", "body": "b", "smtp_port": 10025},
                           ParsePolicy(password_optional=lambda port: True))
        self.successResultOf(ensureDeferred(self.service.send(ok, "10.9.1.2")))
        self.assertEqual(self.submitter.sent[-1][1], None)
        self.assertEqual(self.local.calls, [])
        foreign = attrs.evolve(ok, sender=parse_request({**_BASE, "from": "x@elsewhere.example"}).sender)
        err = self.failureResultOf(ensureDeferred(self.service.send(foreign, "10.9.1.2")), ApiError).value
        self.assertEqual(err.code, "smtp_unauthorized_sender")
        err = self.failureResultOf(ensureDeferred(self.service.send(ok, "192.0.2.1")), ApiError).value
        self.assertEqual(err.code, "smtp_auth_required")
        self.assertEqual(len(self.submitter.sent), 1)


class OffloadTests(SynchronousTestCase):
    """Large messages are built by the offload function (a worker thread in the real process)."""

    def test_large_messages_are_built_off_the_calling_thread(self) -> None:
        """A message over OFFLOAD_BYTES goes through offload; one of 100 KB does not."""
        from twisted.internet.defer import maybeDeferred

        service, _, _, submitter, _ = make()
        calls: list[str] = []

        def offload(work: Any) -> Any:
            calls.append("offloaded")
            return maybeDeferred(work)

        service.offload = offload
        self.successResultOf(ensureDeferred(service.send(request(body="x" * 100_000), "192.0.2.1")))
        self.assertEqual(calls, [])
        self.successResultOf(ensureDeferred(service.send(request(body="x" * (OFFLOAD_BYTES + 1)), "192.0.2.1")))
        self.assertEqual(calls, ["offloaded"])
        self.assertIn(b"xxxx", submitter.sent[-1][3])
