"""The SMTP submission client against scripted server replies and an in-memory TLS server.

Every timeout runs on a MemoryReactorClock; nothing touches the network.
"""

from __future__ import annotations

import base64
import socket
from typing import Any

from twisted.internet._resolver import HostResolution
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer  # type: ignore[import-untyped]

from mailcow_smtp_api.core.errors import SmtpFailure, smtp_failure_to_api_error
from mailcow_smtp_api.core.model import Credentials, Envelope, Security, SmtpTarget
from mailcow_smtp_api.smtp.client import (
    Reply,
    SmtpSubmitter,
    TlsSettings,
    data_payload,
    load_ca_bundle,
    parse_ehlo,
    queue_id_of,
)

from .smtp_kit import (
    CREDENTIALS,
    EHLO_PIPELINING,
    ENVELOPE,
    HELO,
    LOGIN_SECRET,
    LOGIN_USER,
    MESSAGE,
    PLAIN_BLOB,
    SECRETS,
    TIMEOUT,
    Conversation,
    FakePostfix,
    connect_pipe,
    pki,
    pump,
)

PASSWORD_BYTES = CREDENTIALS.password.encode("utf-8")
ONE_RCPT = Envelope(sender="user1@example.org", recipients=("a@example.net",))


def transaction_until_data(c: Conversation, envelope: Envelope = ENVELOPE) -> None:
    """MAIL and every RCPT accepted, DATA answered with 354."""
    c.dialogue(
        (b"MAIL FROM:<%s>" % envelope.sender.encode(), b"250 2.1.0 Ok"),
        *((b"RCPT TO:<%s>" % rcpt.encode(), b"250 2.1.5 Ok") for rcpt in envelope.recipients),
        (b"DATA", b"354 End data with <CR><LF>.<CR><LF>"),
    )


def until_starttls() -> Conversation:
    """A port-587 send with credentials that has just sent STARTTLS (offered in EHLO)."""
    c = Conversation(port=587, credentials=CREDENTIALS)
    c.greet_and_ehlo(b"250-mail.test", b"250 STARTTLS")
    c.expect(b"STARTTLS")
    return c


def starttls_until_auth(c: Conversation, after_tls: tuple[bytes, ...]) -> None:
    """Greeting, EHLO offering STARTTLS, STARTTLS, handshake, EHLO answered with ``after_tls``."""
    c.greet_and_ehlo(b"250-mail.test", b"250-STARTTLS", b"250 AUTH PLAIN LOGIN")
    c.expect(b"STARTTLS")
    c.server(b"220 2.0.0 Ready to start TLS")
    c.handshake()
    c.expect(b"EHLO " + HELO)
    c.server(*after_tls)


class Case(SynchronousTestCase):
    def failure_of(self, d: Any) -> SmtpFailure:
        """The SmtpFailure a Deferred failed with (and nothing else)."""
        failure = self.failureResultOf(d, SmtpFailure)
        value = failure.value
        assert isinstance(value, SmtpFailure)
        return value

    def run_tls(
        self,
        port: int,
        certificate: Any,
        settings: TlsSettings | None = None,
        host: str = "localhost",
    ) -> tuple[Any, FakePostfix, Any]:
        """Submit to an in-memory server presenting ``certificate``; return (Deferred, server, client end)."""
        server = FakePostfix(pki().server_options(certificate), implicit=port == 465)
        d, client = self.serve(SmtpTarget(host, port), server, settings)
        return d, server, client

    def serve(
        self,
        target: SmtpTarget,
        server: FakePostfix,
        settings: TlsSettings | None = None,
        credentials: Credentials | None = CREDENTIALS,
    ) -> tuple[Any, Any]:
        """Submit one message to ``target``, answered by ``server`` in memory; return (Deferred, client end)."""
        settings = settings or TlsSettings(ca_file=self.write_ca(pki().pem(pki().ca)))
        self.reactor = MemoryReactorClock()
        submitter = SmtpSubmitter(self.reactor, settings, timeout=TIMEOUT, helo_name="client.test")
        d = submitter.submit(target, credentials, ONE_RCPT, MESSAGE)
        client, server_end = connect_pipe(self.reactor, server)
        pump(client, server_end)
        return d, client

    def write_ca(self, pem: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(pem)
        return path


# --------------------------------------------------------------------------- happy paths


class HappyPathTests(Case):
    def open_plain_session(self) -> tuple[MemoryReactorClock, FakePostfix, Any, Any, Any]:
        """An open session to a FakePostfix on port 25 over an in-memory pipe."""
        reactor = MemoryReactorClock()
        submitter = SmtpSubmitter(reactor, TlsSettings(verify=False), timeout=TIMEOUT, helo_name="client.test")
        opened = submitter.open_session(SmtpTarget("localhost", 25), None)
        server = FakePostfix(tls=None)
        client, server_end = connect_pipe(reactor, server)
        pump(client, server_end)
        return reactor, server, self.successResultOf(opened), client, server_end

    def test_plain_port_sends_the_exact_dialogue_and_returns_the_queue_id(self) -> None:
        """Port 25: EHLO, MAIL with SIZE, one RCPT each, DATA, the message, then QUIT; no STARTTLS, no AUTH."""
        c = Conversation(port=25)
        self.assertEqual(c.reactor.tcpClients[0][:2], ("127.0.0.1", 25))
        c.greet_and_ehlo(b"250-mail.test", b"250-SIZE 10240000", b"250 STARTTLS")
        c.dialogue(
            (b"MAIL FROM:<user1@example.org> SIZE=%d" % len(MESSAGE), b"250 2.1.0 Ok"),
            (b"RCPT TO:<a@example.net>", b"250 2.1.5 Ok"),
            (b"RCPT TO:<b@example.net>", b"250 2.1.5 Ok"),
            (b"DATA", b"354 End data with <CR><LF>.<CR><LF>"),
        )
        self.assertEqual(c.sent(), MESSAGE + b".\r\n")
        self.assertNoResult(c.result)
        c.server(b"250 2.0.0 Ok: queued as 4XyZ1")
        result = self.successResultOf(c.result)
        self.assertEqual((result.code, result.queue_id), (250, "4XyZ1"))
        self.assertEqual([(r.address, r.code) for r in result.recipients], [("a@example.net", 250), ("b@example.net", 250)])
        c.expect(b"QUIT")
        c.server(b"221 2.0.0 Bye")
        self.assertTrue(c.transport.disconnecting)
        self.assertFalse(c.transport.aborted)

    def test_starttls_then_auth_plain(self) -> None:
        """STARTTLS comes first, nothing is sent until the handshake ends, then EHLO and AUTH PLAIN."""
        c = Conversation(port=587, credentials=CREDENTIALS)
        c.greet_and_ehlo(b"250-mail.test", b"250-STARTTLS", b"250 AUTH PLAIN LOGIN")
        c.expect(b"STARTTLS")
        c.server(b"220 2.0.0 Ready to start TLS")
        self.assertIsNotNone(c.transport.tls_creator)
        self.assertEqual(c.sent(), b"")  # nothing before the handshake completes
        c.handshake()
        c.expect(b"EHLO " + HELO)
        c.server(b"250-mail.test", b"250 AUTH LOGIN PLAIN")  # PLAIN is preferred whatever the order
        c.expect(b"AUTH PLAIN " + PLAIN_BLOB)
        c.server(b"235 2.7.0 Authentication successful")
        transaction_until_data(c)
        self.assertEqual(c.sent(), MESSAGE + b".\r\n")
        c.server(b"250 2.0.0 Ok: queued as 9Q")
        self.assertEqual(self.successResultOf(c.result).queue_id, "9Q")

    def test_starttls_then_auth_login(self) -> None:
        """With only LOGIN offered the client answers the two 334 prompts with base64 login and password."""
        c = Conversation(port=588, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH LOGIN"))
        c.expect(b"AUTH LOGIN")
        c.server(b"334 VXNlcm5hbWU6")
        c.expect(LOGIN_USER)
        c.server(b"334 UGFzc3dvcmQ6")
        c.expect(LOGIN_SECRET)
        c.server(b"235 2.7.0 Authentication successful")
        transaction_until_data(c)
        c.sent()
        c.server(b"250 2.0.0 Ok: queued as 7L")
        self.assertEqual(self.successResultOf(c.result).queue_id, "7L")

    def test_plain_security_ignores_an_offered_starttls(self) -> None:
        """A target marked Security.PLAIN sends no STARTTLS even when the server offers it."""
        server = FakePostfix(tls=pki().server_options(pki().good))
        d, _ = self.serve(SmtpTarget("localhost", 10025, Security.PLAIN), server, TlsSettings(verify=False), None)
        self.assertEqual(self.successResultOf(d).queue_id, "4AbCdE1")
        self.assertNotIn(b"STARTTLS", server.lines)
        self.assertFalse(server.secured)

    def test_eight_bit_message_is_announced_when_offered(self) -> None:
        """A message with 8-bit bytes carries BODY=8BITMIME when the server offers it (RFC 6152)."""
        message = "Subject: x\r\n\r\nGr\u00fc\u00dfe\r\n".encode()
        c = Conversation(port=25, message=message, envelope=ONE_RCPT)
        c.greet_and_ehlo(b"250-mail.test", b"250 8BITMIME")
        c.expect(b"MAIL FROM:<user1@example.org> BODY=8BITMIME")

    def send_with_rcpt_replies(self, reply_a: bytes, reply_b: bytes) -> Any:
        """A plain-port send to a@ and b@ whose RCPTs get these replies; the message is then accepted."""
        c = Conversation(port=25)
        c.greet_and_ehlo()
        c.dialogue(
            (b"MAIL FROM:<user1@example.org>", b"250 2.1.0 Ok"),
            (b"RCPT TO:<a@example.net>", reply_a),
            (b"RCPT TO:<b@example.net>", reply_b),
            (b"DATA", b"354 go ahead"),
        )
        self.assertEqual(c.sent(), MESSAGE + b".\r\n")
        c.server(b"250 2.0.0 Ok: queued as AB12")
        return self.successResultOf(c.result)

    def test_partial_refusal_lists_the_refused_recipient_and_sends_to_the_rest(self) -> None:
        """One refused RCPT does not stop the message; the result says who was refused."""
        result = self.send_with_rcpt_replies(b"550 5.1.1 <a@example.net>: Recipient address rejected: unknown", b"250 2.1.5 Ok")
        self.assertEqual([(r.address, r.code) for r in result.refused], [("a@example.net", 550)])
        self.assertEqual([r.address for r in result.accepted], ["b@example.net"])

    def test_452_for_one_of_two_recipients_is_a_partial_refusal(self) -> None:
        """A temporary RCPT refusal (452) is listed as refused, never as sent."""
        result = self.send_with_rcpt_replies(b"250 2.1.5 Ok", b"452 4.5.3 Error: too many recipients")
        self.assertEqual([(r.address, r.code, r.accepted) for r in result.recipients], [("a@example.net", 250, True), ("b@example.net", 452, False)])

    def test_a_failed_quit_after_acceptance_does_not_fail_the_send(self) -> None:
        """The result is final once the final dot is accepted; a QUIT that times out only aborts."""
        c = Conversation(port=25, envelope=ONE_RCPT)
        c.greet_and_ehlo()
        transaction_until_data(c, ONE_RCPT)
        c.sent()
        c.server(b"250 2.0.0 Ok: queued as Q1")
        result = self.successResultOf(c.result)
        c.expect(b"QUIT")
        c.reactor.advance(TIMEOUT)
        self.assertTrue(c.transport.aborted)
        self.assertEqual(result.queue_id, "Q1")

    def test_a_session_sends_several_messages_in_sequence(self) -> None:
        """An open session runs one transaction after another, with RSET between them."""
        reactor, server, session, client, server_end = self.open_plain_session()
        first = Deferred.fromCoroutine(session.send(ONE_RCPT, b"Subject: 1\r\n\r\none\r\n"))
        pump(client, server_end)
        self.assertEqual(self.successResultOf(first).queue_id, "4AbCdE1")
        reset = Deferred.fromCoroutine(session.reset())
        pump(client, server_end)
        self.successResultOf(reset)
        second = Deferred.fromCoroutine(session.send(ONE_RCPT, b"Subject: 2\r\n\r\ntwo\r\n"))
        pump(client, server_end)
        self.assertEqual(self.successResultOf(second).queue_id, "4AbCdE2")
        self.assertEqual(server.messages, [b"Subject: 1\r\n\r\none\r\n", b"Subject: 2\r\n\r\ntwo\r\n"])
        self.assertEqual(len(reactor.tcpClients), 1)

    def test_an_idle_session_outlives_its_timer_and_each_step_gets_the_whole_timeout(self) -> None:
        """After a reply nothing times out, however long the session waits; the next step again has
        the full timeout from its own start, and one step past it still times out."""
        reactor, server, session, client, server_end = self.open_plain_session()
        reactor.advance(TIMEOUT - 1)  # most of the EHLO step's timeout has passed: the timer still runs
        reactor.advance(TIMEOUT * 3)  # idle for longer than any timeout
        self.assertTrue(session.usable)
        reactor.advance(TIMEOUT - 1)
        first = Deferred.fromCoroutine(session.send(ONE_RCPT, b"Subject: 1\r\n\r\none\r\n"))
        pump(client, server_end)
        self.assertEqual(self.successResultOf(first).queue_id, "4AbCdE1")
        server.silent = True  # from now on the server reads but never answers
        stuck = Deferred.fromCoroutine(session.reset())
        pump(client, server_end)
        reactor.advance(TIMEOUT - 0.01)
        self.assertNoResult(stuck)
        reactor.advance(0.01)
        f = self.failure_of(stuck)
        self.assertEqual(f.kind, "timeout")


# --------------------------------------------------------------------------- refusals


class RefusalTests(Case):
    def test_421_greeting(self) -> None:
        """A 421 greeting fails at "greeting" with the server's code and text; no EHLO is sent."""
        c = Conversation(port=25)
        c.connect()
        c.server(b"421 4.3.2 Service shutting down")
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase, f.code, f.text), ("reply", "greeting", 421, "4.3.2 Service shutting down"))
        self.assertNotIn(b"EHLO", c.transport.value())

    def test_starttls_not_offered_never_falls_back_to_plaintext(self) -> None:
        """Without STARTTLS in EHLO the send fails as tls/starttls and neither AUTH nor MAIL is sent."""
        c = Conversation(port=587, credentials=CREDENTIALS)
        c.greet_and_ehlo(b"250-mail.test", b"250 AUTH PLAIN LOGIN")
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("tls", "starttls"))
        self.assertEqual(c.sent(), b"")
        self.assertTrue(c.transport.aborted)

    def test_starttls_refused_by_the_server(self) -> None:
        """A 454 reply to STARTTLS is a reply failure at "starttls"; the client quits."""
        c = until_starttls()
        c.server(b"454 4.7.0 TLS not available due to local problem")
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase, f.code), ("reply", "starttls", 454))
        c.expect(b"QUIT")

    def test_535_is_an_auth_failure_with_a_single_attempt(self) -> None:
        """535 fails at "auth" and maps to smtp_auth_failed; no second AUTH, then QUIT."""
        c = Conversation(port=587, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH PLAIN LOGIN"))
        c.expect(b"AUTH PLAIN " + PLAIN_BLOB)
        c.server(b"535 5.7.8 Error: authentication failed: authentication failure")
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase, f.code), ("reply", "auth", 535))
        self.assertEqual(smtp_failure_to_api_error(f).code, "smtp_auth_failed")
        c.expect(b"QUIT")

    def test_no_common_auth_mechanism(self) -> None:
        """A server offering only CRAM-MD5 gets no AUTH at all and the send fails at "auth"."""
        c = Conversation(port=587, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH CRAM-MD5"))
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("protocol", "auth"))
        self.assertIn("CRAM-MD5", f.reason)
        self.assertEqual(c.sent(), b"")

    def test_553_on_every_rcpt_fails_with_every_recipient(self) -> None:
        """postfix's sender-login mismatch (553 at each RCPT) fails at "rcpt" listing all replies; no DATA."""
        c = Conversation(port=587, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH PLAIN"))
        c.expect(b"AUTH PLAIN " + PLAIN_BLOB)
        c.server(b"235 2.7.0 Authentication successful")
        c.expect(b"MAIL FROM:<user1@example.org>")
        c.server(b"250 2.1.0 Ok")
        refusal = b"553 5.7.1 <user1@example.org>: Sender address rejected: not owned by user user2@example.org"
        c.expect(b"RCPT TO:<a@example.net>")
        c.server(refusal)
        c.expect(b"RCPT TO:<b@example.net>")
        c.server(refusal)
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase, f.code), ("reply", "rcpt", 553))
        self.assertEqual(f.text, refusal[4:].decode())
        self.assertEqual([(r.address, r.code) for r in f.recipients], [("a@example.net", 553), ("b@example.net", 553)])
        self.assertEqual(smtp_failure_to_api_error(f).code, "smtp_unauthorized_sender")
        c.expect(b"QUIT")

    def test_452_for_the_only_recipient_fails(self) -> None:
        """When the only RCPT gets 452 nothing is sent: a rcpt failure with code 452."""
        c = Conversation(port=25, envelope=ONE_RCPT)
        c.greet_and_ehlo()
        c.dialogue(
            (b"MAIL FROM:<user1@example.org>", b"250 2.1.0 Ok"),
            (b"RCPT TO:<a@example.net>", b"452 4.3.1 Insufficient system storage"),
        )
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase, f.code), ("reply", "rcpt", 452))
        self.assertEqual(len(f.recipients), 1)
        self.assertEqual(smtp_failure_to_api_error(f).status, 503)
        c.expect(b"QUIT")

    def test_451_at_mail(self) -> None:
        """451 to MAIL FROM fails at "mail" before any RCPT."""
        c = Conversation(port=25)
        c.greet_and_ehlo()
        c.expect(b"MAIL FROM:<user1@example.org>")
        c.server(b"451 4.3.0 Error: queue file write error")
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase, f.code), ("reply", "mail", 451))
        c.expect(b"QUIT")

    def test_554_after_the_final_dot_is_a_known_refusal(self) -> None:
        """A 554 to the final dot means "not accepted": phase "message", outcome known."""
        c = Conversation(port=25)
        c.greet_and_ehlo()
        transaction_until_data(c)
        c.sent()
        c.server(b"554 5.7.1 Message rejected by content filter")
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase, f.code), ("reply", "message", 554))
        self.assertFalse(f.outcome_unknown)
        c.expect(b"QUIT")

    def test_an_unasked_421_on_an_idle_session_fails_the_next_command(self) -> None:
        """A reply nobody asked for (postfix's idle "421 timeout") fails the next command as dropped."""
        c = Conversation(port=25, open_only=True)
        c.greet_and_ehlo()
        session = self.successResultOf(c.result)
        c.server(b"421 4.4.2 mail.test Error: timeout exceeded")
        f = self.failure_of(Deferred.fromCoroutine(session.send(ONE_RCPT, MESSAGE)))
        self.assertEqual((f.kind, f.phase, f.code), ("dropped", "mail", 421))
        self.assertEqual(c.sent(), b"")
        self.assertFalse(session.usable)

    def test_a_line_that_is_not_smtp_is_a_protocol_failure(self) -> None:
        """A greeting that is not an SMTP reply fails as "protocol" and the connection is aborted."""
        c = Conversation(port=25)
        c.connect()
        c.server(b"HTTP/1.1 400 Bad Request")
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("protocol", "greeting"))
        self.assertTrue(c.transport.aborted)

    def test_an_endless_reply_line_is_a_protocol_failure(self) -> None:
        """A reply line longer than any SMTP line fails instead of buffering without bound."""
        c = Conversation(port=25)
        c.connect()
        c.protocol.dataReceived(b"220 " + b"x" * 5000)
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("protocol", "greeting"))


# --------------------------------------------------------------------------- timeouts and drops


class TimeoutTests(Case):
    def test_connect_timeout(self) -> None:
        """No connection within the timeout: timeout at "connect", and the attempt is stopped."""
        c = Conversation(port=25)
        c.reactor.advance(TIMEOUT)
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("timeout", "connect"))
        self.assertEqual(len(c.reactor.connectors), 1)
        self.assertTrue(c.reactor.connectors[0].stoppedConnecting)

    def test_greeting_timeout(self) -> None:
        """A server that never greets times out at "greeting" after exactly the timeout."""
        c = Conversation(port=25)
        c.connect()
        c.reactor.advance(TIMEOUT - 0.01)
        self.assertNoResult(c.result)
        c.reactor.advance(0.01)
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("timeout", "greeting"))
        self.assertTrue(c.transport.aborted)

    def test_tls_handshake_timeout(self) -> None:
        """A handshake that never completes times out at "tls" and nothing more is sent."""
        c = until_starttls()
        c.server(b"220 2.0.0 Ready to start TLS")
        c.reactor.advance(TIMEOUT)
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("timeout", "tls"))
        self.assertEqual(c.sent(), b"")

    def test_auth_timeout(self) -> None:
        """No reply to AUTH times out at "auth"."""
        c = Conversation(port=587, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH PLAIN"))
        c.expect(b"AUTH PLAIN " + PLAIN_BLOB)
        c.reactor.advance(TIMEOUT)
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("timeout", "auth"))
        self.assertTrue(c.transport.aborted)

    def test_timeout_after_the_final_dot_is_unknown_and_never_resent(self) -> None:
        """No reply to the final dot: timeout at "message", outcome unknown, no reconnect, DATA once."""
        c = Conversation(port=25)
        c.greet_and_ehlo()
        transaction_until_data(c)
        self.assertEqual(c.sent(), MESSAGE + b".\r\n")
        c.reactor.advance(TIMEOUT)
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("timeout", "message"))
        self.assertTrue(f.outcome_unknown)
        self.assertTrue(smtp_failure_to_api_error(f).detail["outcome_unknown"])  # type: ignore[index]
        self.assertTrue(c.transport.aborted)
        c.reactor.advance(TIMEOUT * 10)
        self.assertEqual(len(c.reactor.tcpClients), 1)
        self.assertEqual(c.transport.value().count(b"\r\nDATA\r\n"), 1)
        self.assertEqual(c.transport.value().count(b"Hello."), 1)

    def test_drop_after_the_final_dot_is_unknown_and_never_resent(self) -> None:
        """The connection drops after the final dot: dropped at "message", outcome unknown, one attempt."""
        c = Conversation(port=25)
        c.greet_and_ehlo()
        transaction_until_data(c)
        c.sent()
        c.lose(ConnectionLost())
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("dropped", "message"))
        self.assertTrue(f.outcome_unknown)
        c.reactor.advance(TIMEOUT * 10)
        self.assertEqual(len(c.reactor.tcpClients), 1)

    def test_drop_mid_data(self) -> None:
        """The connection drops while the message is still being written: dropped at "data", outcome known."""
        message = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" + (b"y" * 998 + b"\r\n") * 200
        c = Conversation(port=25, envelope=ONE_RCPT, message=message)
        c.greet_and_ehlo()
        c.transport.pause_after_writes = c.transport.writes + 2  # the socket buffer fills after one chunk
        transaction_until_data(c, ONE_RCPT)
        written = c.sent()
        self.assertTrue(0 < len(written) < len(message))
        c.lose(ConnectionLost())
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("dropped", "data"))
        self.assertFalse(f.outcome_unknown)

    def test_stalled_data_transfer_times_out_but_progress_keeps_it_alive(self) -> None:
        """Each chunk the transport takes restarts the timer; a transfer stalled for the timeout fails at "data"."""
        message = (b"z" * 998 + b"\r\n") * 200  # about 200 KB: several 64 KiB chunks
        c = Conversation(port=25, envelope=ONE_RCPT, message=message)
        c.greet_and_ehlo()
        c.transport.pause_after_writes = c.transport.writes + 2
        transaction_until_data(c, ONE_RCPT)
        c.reactor.advance(TIMEOUT - 1)
        c.transport.pause_after_writes = c.transport.writes + 1
        producer: Any = c.transport.producer
        producer.resumeProducing()  # the buffer drained: one more chunk goes out
        c.reactor.advance(TIMEOUT - 1)
        self.assertNoResult(c.result)
        c.reactor.advance(1)
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("timeout", "data"))
        self.assertNotIn(b"\r\n.\r\n", c.transport.value())

    def test_drop_during_greeting(self) -> None:
        """A connection lost before the greeting fails as dropped at "greeting"."""
        c = Conversation(port=25)
        c.connect()
        c.lose(ConnectionLost())
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase), ("dropped", "greeting"))

    def test_connection_refused(self) -> None:
        """A refused connection fails as connect/connect."""
        c = Conversation(port=25)
        _host, _port, factory, _t, _b = c.reactor.tcpClients[0]
        factory.clientConnectionFailed(c.reactor.connectors[0], _failure(ConnectionRefusedError()))
        c.reactor.advance(1)  # HostnameEndpoint notices that no address is left to try
        f = self.failure_of(c.result)
        self.assertEqual((f.kind, f.phase, f.reason), ("connect", "connect", "connection refused"))

    def test_unknown_host(self) -> None:
        """A host name that does not resolve fails as connect/connect without a connection attempt."""
        reactor = MemoryReactorClock()
        reactor.nameResolver = _NoAddresses()  # type: ignore[assignment]
        submitter = SmtpSubmitter(reactor, TlsSettings(verify=False), timeout=TIMEOUT)
        d = submitter.submit(SmtpTarget("no-such-host.invalid", 25), None, ONE_RCPT, MESSAGE)
        f = self.failure_of(d)
        self.assertEqual((f.kind, f.phase, f.reason), ("connect", "connect", "host name not found"))
        self.assertEqual(reactor.tcpClients, [])

    def test_connect_timeout_while_resolving(self) -> None:
        """A name lookup that never answers is cut off by the same connect deadline."""
        reactor = MemoryReactorClock()
        reactor.nameResolver = _SilentResolver()  # type: ignore[assignment]
        submitter = SmtpSubmitter(reactor, TlsSettings(verify=False), timeout=TIMEOUT)
        d = submitter.submit(SmtpTarget("slow.example", 25), None, ONE_RCPT, MESSAGE)
        reactor.advance(TIMEOUT - 0.01)
        self.assertNoResult(d)
        reactor.advance(0.01)
        f = self.failure_of(d)
        self.assertEqual((f.kind, f.phase), ("timeout", "connect"))
        self.assertEqual(reactor.tcpClients, [])

    def test_cancel_aborts_the_connection(self) -> None:
        """Cancelling the send aborts the connection at once."""
        c = Conversation(port=25)
        c.greet_and_ehlo()
        c.result.cancel()
        self.failureResultOf(c.result, CancelledError)
        self.assertTrue(c.transport.aborted)


def _failure(exc: BaseException) -> Failure:
    return Failure(exc)


@implementer(IHostnameResolver)
class _NoAddresses:
    """A resolver for which no name exists."""

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        resolution = HostResolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.resolutionComplete()
        return resolution


@implementer(IHostnameResolver)
class _SilentResolver:
    """A resolver that starts a lookup and never finishes it."""

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        resolution = HostResolution(hostName)
        receiver.resolutionBegan(resolution)
        return resolution


# --------------------------------------------------------------------------- DATA bytes on the wire


def expected_wire(lines: list[bytes]) -> bytes:
    """DATA bytes built line by line: each line ending CRLF, a leading dot doubled, then the terminator."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


class DataTests(Case):
    def send_and_capture(self, message: bytes) -> bytes:
        """Run a plain-port send of ``message`` and return exactly what followed the 354."""
        c = Conversation(port=25, envelope=ONE_RCPT, message=message)
        c.greet_and_ehlo()
        c.dialogue(
            (b"MAIL FROM:<user1@example.org>", b"250 2.1.0 Ok"),
            (b"RCPT TO:<a@example.net>", b"250 2.1.5 Ok"),
        )
        c.expect(b"DATA")
        writes_before = c.transport.writes
        c.server(b"354 End data with <CR><LF>.<CR><LF>")
        self.chunks = c.transport.writes - writes_before
        wire = c.sent()
        c.server(b"250 2.0.0 Ok: queued as D1")
        self.successResultOf(c.result)
        return wire

    def test_dot_lines_at_16k_and_32k_boundaries_and_a_lone_dot_are_stuffed(self) -> None:
        """Lines starting with "." at 16 KiB and 32 KiB offsets and a lone "." line are each doubled."""
        lines = [b"Subject: dots", b""]
        offset = sum(len(line) + 2 for line in lines)
        for boundary, dotted in ((16384, b".at-16k"), (32768, b".")):
            filler = boundary - offset - 2
            lines.append(b"f" * filler)
            lines.append(dotted)
            offset = boundary + len(dotted) + 2
        lines += [b"..two dots", b"end"]
        message = b"".join(line + b"\r\n" for line in lines)
        self.assertEqual(message.index(b"\r\n.at-16k") + 2, 16384)
        self.assertEqual(message.index(b"\r\n.\r\n") + 2, 32768)
        wire = self.send_and_capture(message)
        self.assertEqual(wire, expected_wire(lines))
        self.assertEqual(wire.count(b"\r\n.\r\n"), 1)  # only the real terminator
        self.assertTrue(wire.endswith(b"\r\nend\r\n.\r\n"))

    def test_large_message_goes_out_in_several_chunks_stuffed_as_a_whole(self) -> None:
        """A message larger than one write chunk is stuffed correctly across chunk boundaries."""
        lines = [b"Subject: big", b""] + [b".%05d" % i + b"q" * 90 for i in range(3000)]
        message = b"".join(line + b"\r\n" for line in lines)
        wire = self.send_and_capture(message)
        self.assertGreater(self.chunks, 2)
        self.assertEqual(wire, expected_wire(lines))

    def test_bare_lf_and_bare_cr_become_crlf_and_crlf_is_not_doubled(self) -> None:
        """LF, CR and CRLF each end one line on the wire; a final line without a line end gets one."""
        wire = self.send_and_capture(b"Subject: x\nA: 1\rB: 2\r\n\r\nbody\n.hidden\nlast")
        self.assertEqual(wire, b"Subject: x\r\nA: 1\r\nB: 2\r\n\r\nbody\r\n..hidden\r\nlast\r\n.\r\n")

    def test_data_payload_of_a_message_starting_with_a_dot(self) -> None:
        """The first line is stuffed too, and an empty message is just the terminator."""
        self.assertEqual(data_payload(b".x\r\ny\r\n"), b"..x\r\ny\r\n.\r\n")
        self.assertEqual(data_payload(b""), b".\r\n")
        self.assertEqual(data_payload(b"a\r\r\nb"), b"a\r\n\r\nb\r\n.\r\n")


class _RecordingSocket(socket.socket):
    """A real (unconnected) socket object that records setsockopt calls instead of making them."""

    calls: list[tuple[int, int, int]]

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:  # type: ignore[override]
        self.calls.append((level, option, value))


class QuickAckTests(Case):
    def test_after_the_handshake_the_socket_leaves_delayed_ack_mode_later_not_at_once(self) -> None:
        """TCP_QUICKACK is set by a later call, not during the handshake callback (the Finished is unwritten then).

        The real reactor runs a call scheduled by a call in its next turn, so the nested zero-delay
        call lands after the write; Clock.advance runs both at once.
        """
        c = until_starttls()
        sock = _RecordingSocket()
        sock.calls = []
        self.addCleanup(sock.close)
        c.transport.socket = sock  # type: ignore[attr-defined]
        c.server(b"220 2.0.0 Ready to start TLS")
        c.handshake()
        self.assertEqual(sock.calls, [])
        c.reactor.advance(0)
        quick = getattr(socket, "TCP_QUICKACK", None)
        self.assertEqual(sock.calls, [] if quick is None else [(socket.IPPROTO_TCP, quick, 1)])
        self.assertEqual(c.sent(), b"EHLO client.test\r\n")  # the session goes on as before

    def test_without_a_socket_nothing_is_scheduled(self) -> None:
        """An in-memory transport has no socket: the handshake schedules no call."""
        c = until_starttls()
        pending = len(c.reactor.getDelayedCalls())
        c.server(b"220 2.0.0 Ready to start TLS")
        c.handshake()
        self.assertEqual(len(c.reactor.getDelayedCalls()), pending)


# --------------------------------------------------------------------------- STARTTLS injection


class InjectionTests(Case):
    def test_lines_sent_with_the_starttls_reply_are_discarded(self) -> None:
        """Plaintext that arrives with "220 Ready" is dropped; the post-TLS EHLO reply is what counts."""
        c = until_starttls()
        c.server(b"220 2.0.0 Ready", b"250-mail.test", b"250 AUTH LOGIN")  # injected after the 220
        c.handshake()
        c.expect(b"EHLO " + HELO)
        c.server(b"250-mail.test", b"250 AUTH PLAIN")
        c.expect(b"AUTH PLAIN " + PLAIN_BLOB)

    def test_plaintext_arriving_before_the_handshake_ends_the_session(self) -> None:
        """A reply that arrives between the 220 and the handshake is out of turn: protocol failure, no AUTH."""
        c = until_starttls()
        c.server(b"220 2.0.0 Ready")
        c.server(b"250 AUTH LOGIN")
        c.handshake()
        f = self.failure_of(c.result)
        self.assertEqual(f.kind, "protocol")
        self.assertNotIn(b"AUTH", c.sent())

    def test_injection_over_real_tls_is_ignored(self) -> None:
        """With a real TLS handshake in memory, injected plaintext after the 220 changes nothing."""
        server = FakePostfix(pki().server_options(pki().good), inject=b"250-mail.test\r\n250 AUTH LOGIN\r\n")
        d, _ = self.serve(SmtpTarget("localhost", 587), server)
        self.assertEqual(self.successResultOf(d).queue_id, "4AbCdE1")
        self.assertTrue(any(line.startswith(b"AUTH PLAIN ") for line in server.lines))


# --------------------------------------------------------------------------- real TLS in memory


class TlsTests(Case):
    def test_implicit_tls_submission(self) -> None:
        """Port 465: TLS from the first byte, then EHLO, AUTH PLAIN and the message."""
        d, server, _ = self.run_tls(465, pki().good)
        result = self.successResultOf(d)
        self.assertEqual(result.queue_id, "4AbCdE1")
        self.assertEqual(server.lines[0], b"EHLO client.test")
        self.assertEqual(server.authenticated, CREDENTIALS.login)
        self.assertEqual(server.messages, [MESSAGE])

    def test_starttls_submission_with_auth_login_only(self) -> None:
        """Port 587 over real TLS with a server offering only LOGIN."""
        server = FakePostfix(pki().server_options(pki().good), mechanisms=b"LOGIN")
        d, _ = self.serve(SmtpTarget("localhost", 587), server)
        self.assertEqual(self.successResultOf(d).queue_id, "4AbCdE1")
        self.assertEqual(server.authenticated, CREDENTIALS.login)
        self.assertIn(b"AUTH LOGIN", server.lines)

    def test_target_security_overrides_the_port(self) -> None:
        """A target on port 10465 marked Security.TLS speaks implicit TLS (the test bed's layout)."""
        server = FakePostfix(pki().server_options(pki().good), implicit=True)
        d, _ = self.serve(SmtpTarget("localhost", 10465, Security.TLS), server)
        self.assertEqual(self.successResultOf(d).queue_id, "4AbCdE1")
        self.assertEqual(self.reactor.tcpClients[0][1], 10465)

    def test_ip_address_target_is_checked_against_ip_san(self) -> None:
        """Connecting to 127.0.0.1 verifies the certificate's IP subjectAltName."""
        d, server, _ = self.run_tls(587, pki().good, host="127.0.0.1")
        self.assertEqual(self.successResultOf(d).queue_id, "4AbCdE1")

    def test_wrong_name_certificate_fails_before_auth(self) -> None:
        """A CA-signed certificate for another name fails as tls/tls; the server never sees AUTH."""
        for port in (587, 465):
            d, server, client = self.run_tls(port, pki().wrong_name)
            f = self.failure_of(d)
            self.assertEqual((f.kind, f.phase), ("tls", "tls"), port)
            self.assertIn("not valid for localhost", f.reason)
            self.assertFalse(any(line.startswith(b"AUTH") for line in server.lines))
            self.assertTrue(client.lost)

    def test_certificate_without_subject_alt_name_fails(self) -> None:
        """A CA-signed certificate with CN=localhost but no subjectAltName is refused (no fail-open)."""
        for port in (587, 465):
            d, server, _ = self.run_tls(port, pki().no_san)
            f = self.failure_of(d)
            self.assertEqual((f.kind, f.phase), ("tls", "tls"), port)
            self.assertIn("subjectAltName", f.reason)
            self.assertFalse(any(line.startswith(b"AUTH") for line in server.lines))

    def test_untrusted_issuer_fails_in_the_handshake(self) -> None:
        """A certificate from a CA not in the bundle fails the handshake (OpenSSL's chain check)."""
        d, server, _ = self.run_tls(465, pki().untrusted)
        f = self.failure_of(d)
        self.assertEqual(f.kind, "tls")
        self.assertIn("certificate verify failed", f.reason)
        self.assertEqual(server.lines, [])

    def test_bundle_with_the_right_ca_second_is_loaded_whole(self) -> None:
        """Every certificate of a PEM bundle is trusted, not only the first."""
        p = pki()
        path = self.write_ca(p.pem(p.other_ca, p.ca))
        self.assertEqual(len(load_ca_bundle(path)), 2)
        d, _, _ = self.run_tls(465, p.good, TlsSettings(ca_file=path))
        self.assertEqual(self.successResultOf(d).queue_id, "4AbCdE1")

    def test_a_file_without_certificates_is_refused(self) -> None:
        """A CA file with no PEM certificate raises ValueError when the submitter is built."""
        path = self.write_ca(b"not a certificate\n")
        self.assertRaises(ValueError, SmtpSubmitter, MemoryReactorClock(), TlsSettings(ca_file=path))

    def test_server_name_overrides_the_host(self) -> None:
        """With server_name set, the certificate must carry that name, not the host connected to."""
        p = pki()
        ca = self.write_ca(p.pem(p.ca))
        d, _, _ = self.run_tls(587, p.good, TlsSettings(ca_file=ca, server_name="localhost"), host="postfix-mailcow")
        self.assertEqual(self.successResultOf(d).queue_id, "4AbCdE1")
        d, _, _ = self.run_tls(587, p.good, TlsSettings(ca_file=ca), host="postfix-mailcow")
        self.assertEqual(self.failure_of(d).kind, "tls")

    def test_verification_off_accepts_any_certificate_but_still_uses_tls(self) -> None:
        """verify=False (an explicit operator choice) accepts a wrong name and an unknown issuer over TLS."""
        d, server, client = self.run_tls(465, pki().untrusted, TlsSettings(verify=False), host="postfix-mailcow")
        self.assertEqual(self.successResultOf(d).queue_id, "4AbCdE1")
        self.assertTrue(server.secured)
        self.assertIsNotNone(client.tls)  # the client side started TLS on its connection too


# --------------------------------------------------------------------------- secrets


class SecretTests(Case):
    def assert_no_secret(self, *texts: str) -> None:
        for text in texts:
            for secret in SECRETS:
                self.assertNotIn(secret, text)

    def capture_logs(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        observer: Any = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return events

    def check(self, f: SmtpFailure, events: list[dict[str, Any]]) -> None:
        api = smtp_failure_to_api_error(f)
        self.assert_no_secret(str(f), repr(f), f.text, f.reason, repr(api), str(api.detail))
        self.assert_no_secret(*(formatEvent(e) + repr(e) for e in events))

    def test_echoed_plain_blob_is_redacted_from_the_failure(self) -> None:
        """A server that echoes the AUTH PLAIN blob in its 535 does not get it into the failure."""
        events = self.capture_logs()
        c = Conversation(port=587, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH PLAIN"))
        c.expect(b"AUTH PLAIN " + PLAIN_BLOB)
        c.server(b"535 5.7.8 Error: authentication failed: " + PLAIN_BLOB + b" / " + PASSWORD_BYTES)
        f = self.failure_of(c.result)
        self.assertIn("[redacted]", f.text)
        self.check(f, events)

    def test_echoed_login_password_is_redacted_from_the_failure(self) -> None:
        """A server that echoes the LOGIN password (base64 or raw) does not get it into the failure."""
        events = self.capture_logs()
        c = Conversation(port=587, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH LOGIN"))
        c.expect(b"AUTH LOGIN")
        c.server(b"334 VXNlcm5hbWU6")
        c.expect(LOGIN_USER)
        c.server(b"334 UGFzc3dvcmQ6")
        c.expect(LOGIN_SECRET)
        c.server(b"535-5.7.8 got " + LOGIN_SECRET, b"535 5.7.8 which is " + PASSWORD_BYTES)
        f = self.failure_of(c.result)
        self.assertEqual(f.code, 535)
        self.check(f, events)

    def test_no_secret_in_timeouts_drops_or_tls_failures(self) -> None:
        """Timeouts and drops during AUTH, and TLS failures, carry no secret in text, str, repr or logs."""
        events = self.capture_logs()
        failures = []
        c = Conversation(port=587, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH PLAIN"))
        c.reactor.advance(TIMEOUT)
        failures.append(self.failure_of(c.result))
        c = Conversation(port=587, credentials=CREDENTIALS)
        starttls_until_auth(c, (b"250-mail.test", b"250 AUTH LOGIN"))
        c.server(b"334 VXNlcm5hbWU6")
        c.server(b"334 UGFzc3dvcmQ6")
        c.lose(ConnectionLost())
        failures.append(self.failure_of(c.result))
        d, _, _ = self.run_tls(465, pki().wrong_name)
        failures.append(self.failure_of(d))
        self.assertEqual([(f.kind, f.phase) for f in failures], [("timeout", "auth"), ("dropped", "auth"), ("tls", "tls")])
        for f in failures:
            self.check(f, events)

    def test_credentials_are_refused_for_the_plain_port(self) -> None:
        """Credentials with a port-25 target raise ValueError before any connection."""
        reactor = MemoryReactorClock()
        submitter = SmtpSubmitter(reactor, TlsSettings(verify=False))
        self.assertRaises(ValueError, submitter.submit, SmtpTarget("localhost", 25), CREDENTIALS, ONE_RCPT, MESSAGE)
        self.assertEqual(reactor.tcpClients, [])




# --------------------------------------------------------------------------- caller bugs and pure helpers


class EnvelopeTests(Case):
    def test_non_ascii_or_bracketed_addresses_are_refused_before_connecting(self) -> None:
        """Addresses that cannot go on the wire raise ValueError and open no connection."""
        reactor = MemoryReactorClock()
        submitter = SmtpSubmitter(reactor, TlsSettings(verify=False))
        bad = [
            Envelope("us\u00e9r@example.org", ("a@example.net",)),
            Envelope("user1@example.org", ("a@b\u00fccher.example",)),
            Envelope("user1@example.org", ("a@example.net>\r\nRSET",)),
            Envelope("user1@example.org", ("a b@example.net",)),
            Envelope("user1@example.org", ()),
        ]
        for envelope in bad:
            self.assertRaises(ValueError, submitter.submit, SmtpTarget("localhost", 25), None, envelope, MESSAGE)
        self.assertEqual(reactor.tcpClients, [])

    def test_null_sender_is_sent_as_empty_path(self) -> None:
        """An empty envelope sender is the null reverse-path MAIL FROM:<>."""
        c = Conversation(port=25, envelope=Envelope("", ("a@example.net",)))
        c.greet_and_ehlo()
        c.expect(b"MAIL FROM:<>")

    def test_nul_in_credentials_is_refused(self) -> None:
        """A NUL in the password cannot be carried by AUTH PLAIN: ValueError before connecting."""
        submitter = SmtpSubmitter(MemoryReactorClock(), TlsSettings(verify=False))
        creds = Credentials("user1@example.org", "a\0b")
        self.assertRaises(ValueError, submitter.submit, SmtpTarget("localhost", 587), creds, ONE_RCPT, MESSAGE)


class HelperTests(SynchronousTestCase):
    def test_parse_ehlo_reads_keywords_and_legacy_auth(self) -> None:
        """EHLO keywords are upper-cased with their parameters; "AUTH=LOGIN PLAIN" counts as AUTH."""
        reply = Reply(250, ("mail.test greets you", "size 1000", "AUTH=LOGIN PLAIN", "STARTTLS"))
        self.assertEqual(parse_ehlo(reply), {"SIZE": "1000", "AUTH": "LOGIN PLAIN", "STARTTLS": ""})

    def test_queue_id_of_postfix_replies(self) -> None:
        """The queue id is read from "queued as"; other texts have none."""
        self.assertEqual(queue_id_of("2.0.0 Ok: queued as 4dXyZ12abcz"), "4dXyZ12abcz")
        self.assertIsNone(queue_id_of("2.0.0 Ok"))

    def test_reply_text_joins_lines(self) -> None:
        """A multi-line reply's text keeps one line per reply line."""
        self.assertEqual(Reply(550, ("one", "two")).text, "one\ntwo")

    def test_base64_constants_match_the_credentials(self) -> None:
        """The kit's expected AUTH blobs decode to the test credentials (guards the other tests)."""
        self.assertEqual(base64.b64decode(PLAIN_BLOB).split(b"\0"), [b"", b"user1@example.org", PASSWORD_BYTES])


# --------------------------------------------------------------------------- pipelining (RFC 2920)


class PipeliningTests(Case):
    def pipelined(self, envelope: Envelope = ENVELOPE) -> Conversation:
        """A plain-port send to a server offering PIPELINING, up to the client's one envelope write."""
        c = Conversation(port=25, envelope=envelope)
        c.connect()
        c.server(b"220 mail.test ESMTP")
        c.expect(b"EHLO " + HELO)
        writes = c.transport.writes
        c.server(*EHLO_PIPELINING)
        rcpts = [b"RCPT TO:<" + r.encode() + b">" for r in envelope.recipients]
        c.expect(b"MAIL FROM:<user1@example.org>", *rcpts, b"DATA")
        self.assertEqual(c.transport.writes, writes + 1)  # one write for the whole envelope
        return c

    def test_the_envelope_goes_in_one_write_and_replies_may_come_together(self) -> None:
        """MAIL, both RCPTs and DATA in one write; four replies in one segment; then the message."""
        c = self.pipelined()
        c.server(b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"550 5.1.1 <b@example.net>: unknown", b"354 go ahead")
        self.assertEqual(c.sent(), MESSAGE + b".\r\n")
        c.server(b"250 2.0.0 Ok: queued as PQ1")
        result = self.successResultOf(c.result)
        self.assertEqual(result.queue_id, "PQ1")
        self.assertEqual([(r.address, r.code) for r in result.recipients], [("a@example.net", 250), ("b@example.net", 550)])

    def test_replies_may_also_come_one_by_one(self) -> None:
        """The same exchange with every reply in its own segment."""
        c = self.pipelined(ONE_RCPT)
        for reply in (b"250 2.1.0 Ok", b"250 2.1.5 Ok"):
            c.server(reply)
            self.assertEqual(c.sent(), b"")  # nothing until DATA's 354
        c.server(b"354 go ahead")
        self.assertEqual(c.sent(), MESSAGE + b".\r\n")
        c.server(b"250 2.0.0 Ok: queued as PQ2")
        self.assertEqual(self.successResultOf(c.result).queue_id, "PQ2")

    def test_a_refused_sender_is_reported_after_every_reply_is_read_and_the_session_stays_in_step(self) -> None:
        """553 to MAIL: the 503s to RCPT and DATA are read too; the connection stays open for RSET."""
        c = Conversation(port=25, envelope=ONE_RCPT, open_only=True)
        c.greet_and_ehlo(*EHLO_PIPELINING)
        session = self.successResultOf(c.result)
        sent = Deferred.fromCoroutine(session.send(ONE_RCPT, MESSAGE))
        c.expect(b"MAIL FROM:<user1@example.org>", b"RCPT TO:<a@example.net>", b"DATA")
        c.server(b"553 5.7.1 <user1@example.org>: Sender address rejected: not owned by user", b"503 5.5.1 need MAIL")
        self.assertNoResult(sent)
        c.server(b"503 5.5.1 need RCPT")
        failure = self.failure_of(sent)
        self.assertEqual((failure.kind, failure.phase, failure.code), ("reply", "mail", 553))
        self.assertTrue(session.usable)
        reset = Deferred.fromCoroutine(session.reset())
        c.expect(b"RSET")
        c.server(b"250 2.0.0 Ok")
        self.successResultOf(reset)

    def test_every_recipient_refused_and_data_refused_is_a_rcpt_failure(self) -> None:
        """Postfix answers DATA with 554 when no recipient was taken: a rcpt failure, nothing sent."""
        c = self.pipelined()
        c.server(b"250 2.1.0 Ok", b"550 5.1.1 unknown a", b"550 5.1.1 unknown b", b"554 5.5.1 Error: no valid recipients")
        failure = self.failure_of(c.result)
        self.assertEqual((failure.kind, failure.phase, failure.code), ("reply", "rcpt", 550))
        self.assertEqual([r.code for r in failure.recipients], [550, 550])
        self.assertFalse(c.transport.aborted)
        self.assertNotIn(MESSAGE, c.transport.value())

    def test_a_354_after_every_recipient_was_refused_drops_the_connection_without_sending(self) -> None:
        """A server that opens DATA anyway gets no message and no final dot: the connection is dropped."""
        c = self.pipelined(ONE_RCPT)
        c.server(b"250 2.1.0 Ok", b"550 5.1.1 unknown", b"354 go ahead")
        failure = self.failure_of(c.result)
        self.assertEqual((failure.phase, failure.code), ("rcpt", 550))
        self.assertTrue(c.transport.aborted)
        self.assertEqual(c.sent(), b"")

    def test_421_stops_reading_and_fails_with_the_server_closing(self) -> None:
        """421 to MAIL: the failure is the 421 at once (the server closes; no more replies come)."""
        c = self.pipelined(ONE_RCPT)
        c.server(b"421 4.4.2 mail.test Error: timeout exceeded")
        failure = self.failure_of(c.result)
        self.assertEqual((failure.kind, failure.phase, failure.code), ("reply", "mail", 421))
        self.assertTrue(c.transport.aborted)  # two replies were still due: never reusable

    def test_a_session_with_replies_still_due_is_not_usable(self) -> None:
        """While pipelined replies are outstanding the session is out of step; once read, usable again."""
        c = Conversation(port=25, envelope=ONE_RCPT, open_only=True)
        c.greet_and_ehlo(*EHLO_PIPELINING)
        session = self.successResultOf(c.result)
        self.assertTrue(session.usable)
        sent = Deferred.fromCoroutine(session.send(ONE_RCPT, MESSAGE))
        c.server(b"250 2.1.0 Ok")
        self.assertFalse(session.usable)
        c.server(b"250 2.1.5 Ok", b"354 go ahead")
        c.server(b"250 2.0.0 Ok: queued as PQ3")
        self.successResultOf(sent)
        self.assertTrue(session.usable)
