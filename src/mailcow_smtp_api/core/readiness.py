"""Why a readiness check failed, in words an operator can act on and nobody can abuse.

``/readyz`` answers without authentication, so a reason names the kind of trouble (connection
refused, TLS name mismatch, certificate not trusted, database access denied) and the option to
look at, never a password, a user name, a host or a driver's message. Pure core.
"""

from __future__ import annotations

from .errors import ApiError, SmtpFailure


class SafeReason(Exception):
    """A failure's cause worded for anyone to read; attached as ``__cause__`` of an ``ApiError``."""


def smtp_reason(failure: SmtpFailure) -> str:
    """What went wrong with postfix, and where to look."""
    if failure.kind == "tls":
        if "not valid for" in failure.reason or "subjectAltName" in failure.reason:
            return "TLS name mismatch: postfix's certificate does not name the expected host (see --smtp-tls-name)"
        if "certificate verify failed" in failure.reason:
            return "certificate not trusted: postfix's certificate is not signed by a trusted CA (see --smtp-ca)"
        if "STARTTLS" in failure.reason:
            return "postfix does not offer STARTTLS on this port (see the /mode of --smtp-allow)"
        return "TLS with postfix failed"
    if failure.kind == "connect":
        return failure.reason or "cannot connect"  # "connection refused", "host name not found"
    if failure.kind == "timeout":
        return f"no answer from postfix ({failure.phase})"
    if failure.kind == "reply" and failure.code is not None:
        return f"postfix answered {failure.code} to {failure.phase.upper()}"
    if failure.kind == "dropped":
        return f"postfix closed the connection ({failure.phase})"
    return "postfix's answer is not SMTP"


def reason(exc: BaseException) -> str:
    """The reason a readiness check gives for ``exc``."""
    if isinstance(exc, SmtpFailure):
        return smtp_reason(exc)
    if isinstance(exc.__cause__, SafeReason):
        return str(exc.__cause__)
    if isinstance(exc, ApiError):
        return exc.message
    return f"unexpected error ({type(exc).__name__})"
