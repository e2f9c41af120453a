"""The OpenAPI 3.1 document of the HTTP API, built from the same tables the code uses.

Error codes come from ``errors.CODES`` so the document cannot name a code the code lacks, or miss
one it has. Pure core.
"""

from __future__ import annotations

from typing import Any

from .errors import API_AUTH_FAILED, API_RW_DENIED, CODES
from .idempotency import HEADER as IDEMPOTENCY_HEADER
from .idempotency import REPLAYED_HEADER
from .validate import (
    MAX_CUSTOM_HEADERS,
    MAX_HEADER_VALUE_CHARS,
    MAX_REFERENCES,
    MAX_UNSUBSCRIBE_URL,
)

VERSION = "0.1.0"

_ADDRESS = {"type": "string", "maxLength": 512, "examples": ["sender@example.com", '"Doe, Jane" <jane@example.org>']}
_ADDRESS_LIST = {"type": ["array", "null"], "items": _ADDRESS}
_MESSAGE_ID = {
    "type": "string",
    "maxLength": 250,
    "pattern": "^<[^<>@\\s]+@[^<>@\\s]+>$",
    "examples": ["<order-1234@shop.example.com>"],
}


def _send_request_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["from", "to", "subject"],
        "properties": {
            "from": {**_ADDRESS, "description": "Sender; envelope sender and From header. The mailbox must own it."},
            "to": {**_ADDRESS_LIST, "minItems": 1, "description": "Recipients (To header)."},
            "cc": {**_ADDRESS_LIST, "description": "Cc recipients."},
            "bcc": {**_ADDRESS_LIST, "description": "Bcc recipients: envelope only, never in a header."},
            "reply_to": {**_ADDRESS, "type": ["string", "null"]},
            "subject": {"type": "string", "minLength": 1, "maxLength": 998},
            "body": {"type": ["string", "null"], "description": "Plain text; body or html_body must have content."},
            "html_body": {"type": ["string", "null"]},
            "attachments": {
                "type": ["array", "null"],
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["filename", "content"],
                    "properties": {
                        "filename": {"type": "string", "minLength": 1, "maxLength": 255},
                        "content": {"type": "string", "contentEncoding": "base64"},
                        "content_type": {"type": ["string", "null"], "examples": ["application/pdf"]},
                        "content_id": {
                            "type": ["string", "null"],
                            "pattern": "^<?[A-Za-z0-9._+-]{1,100}(@[A-Za-z0-9._+-]{1,100})?>?$",
                            "examples": ["logo@example.com"],
                            "description": "Makes this an inline part of the HTML, shown where html_body has "
                            "cid:<content_id>. Every cid: in html_body needs such a part "
                            "(smtp_missing_inline_part) and every such part a cid: (smtp_unused_inline_part).",
                        },
                        "disposition": {
                            "enum": ["inline", "attachment", None],
                            "description": "inline (the default, and required, with content_id) or attachment.",
                        },
                    },
                },
            },
            "headers": {
                "type": ["object", "null"],
                "maxProperties": MAX_CUSTOM_HEADERS,
                "propertyNames": {"pattern": "^[!-9;-~]{1,76}$"},
                "additionalProperties": {"type": "string", "minLength": 1, "maxLength": MAX_HEADER_VALUE_CHARS},
                "examples": [{"X-Campaign": "spring-2026", "Auto-Submitted": "auto-generated"}],
                "description": "Extra header fields: one line each, non-ASCII sent as RFC 2047 encoded words. Names "
                "the service writes are refused with smtp_header_not_allowed: From, Sender, To, Cc, Bcc, Reply-To, "
                "Subject, Date, Message-ID, In-Reply-To, References, MIME-Version, Content-*, Received, Return-Path, "
                "Delivered-To, X-Original-To, DKIM-Signature, DomainKey-Signature, ARC-*, Authentication-Results, "
                "Received-SPF, Resent-*, X-Spam*, X-Rspamd*, X-Request-Id; List-Unsubscribe and "
                "List-Unsubscribe-Post when list_unsubscribe is given.",
            },
            "message_id": {
                **_MESSAGE_ID,
                "type": ["string", "null"],
                "description": "The Message-ID to use (ASCII dot-atoms around one @, in angle brackets); "
                "by default one is generated on the sender's domain.",
            },
            "in_reply_to": {**_MESSAGE_ID, "type": ["string", "null"], "description": "In-Reply-To: the parent's Message-ID."},
            "references": {
                "type": ["array", "string", "null"],
                "items": _MESSAGE_ID,
                "maxItems": MAX_REFERENCES,
                "description": "References: message ids oldest first (an array, or one string separated by spaces). "
                "Without it, in_reply_to alone is also written as References.",
            },
            "send_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "Only with Prefer: respond-async: hand the message to postfix at this RFC 3339 time "
                "(with its zone), at most --max-schedule ahead.",
            },
            "list_unsubscribe": {
                "type": ["object", "null"],
                "additionalProperties": False,
                "minProperties": 1,
                "properties": {
                    "url": {
                        "type": "string",
                        "format": "uri",
                        "pattern": "^https://",
                        "maxLength": MAX_UNSUBSCRIBE_URL,
                        "description": "One-click unsubscribe endpoint; adds List-Unsubscribe-Post: "
                        "List-Unsubscribe=One-Click (RFC 8058), to which receivers POST.",
                    },
                    "mailto": {**_ADDRESS, "description": "Address that unsubscribes on receipt of any mail."},
                },
                "description": "Writes List-Unsubscribe (RFC 2369) from url and/or mailto.",
            },
            "smtp_host": {"type": ["string", "null"], "description": "Only hosts in the server's --smtp-allow."},
            "smtp_port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
            "smtp_user": {**_ADDRESS, "type": ["string", "null"], "description": "Mailbox login; defaults to from."},
            "password": {"type": ["string", "null"], "writeOnly": True, "description": "Mailbox password."},
            "app_password": {"type": ["string", "null"], "writeOnly": True, "description": "mailcow app password."},
            "dry_run": {
                "type": "boolean",
                "description": "true: every check runs (key, sender rule, limits judged but not charged) and the "
                "answer is smtp_dry_run with the envelope and the exact message bytes; nothing is sent.",
            },
        },
    }


def _raw_request_schema() -> dict[str, Any]:
    common = _send_request_schema()["properties"]
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["message", "envelope"],
        "properties": {
            "message": {
                "type": "string",
                "contentEncoding": "base64",
                "contentMediaType": "message/rfc822",
                "description": "The whole RFC 5322 message: exactly one From (the login must be allowed to send as "
                "it), header fields in ASCII, lines of at most 998 octets. Line ends become CRLF, Bcc fields are "
                "removed, and Message-ID and Date are added when missing; nothing else changes.",
            },
            "envelope": {
                "type": "object",
                "additionalProperties": False,
                "required": ["to"],
                "properties": {
                    "from": {**_ADDRESS, "description": "MAIL FROM; the header From when left out."},
                    "to": {**_ADDRESS_LIST, "minItems": 1, "description": "RCPT TO: every recipient, Bcc included."},
                },
            },
            **{name: common[name] for name in ("smtp_host", "smtp_port", "smtp_user", "password", "app_password", "send_at", "dry_run")},
        },
    }


def _batch_request_schema() -> dict[str, Any]:
    item = _send_request_schema()
    item["properties"]["idempotency_key"] = {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "description": "This message's own Idempotency-Key; without it, the request's Idempotency-Key header "
        "with ':<index>' appended, when given.",
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["messages"],
        "properties": {"messages": {"type": "array", "minItems": 1, "maxItems": 1000, "items": item,
                                    "description": "At most --max-batch messages."}},
    }


def _error_list(codes: list[str]) -> dict[str, Any]:
    return {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["type", "msg"],
            "properties": {
                "type": {"const": "error"},
                "log": {"type": "array"},
                "msg": {"enum": codes},
                "message": {"type": "string"},
                "field": {"type": "string"},
                "detail": {
                    "type": "object",
                    "description": "For SMTP errors: phase, kind, reason, smtp_code and smtp_text, and target "
                    "(the host:port tried).",
                },
            },
        },
    }


def _by_status() -> dict[int, list[str]]:
    table: dict[int, list[str]] = {}
    for code, (status, _) in CODES.items():
        if status < 300:  # success codes (smtp_partially_sent, smtp_dry_run) are no error answers
            continue
        table.setdefault(status, []).append(code)
    # smtp_error also answers 503 and 504 (unreachable / timeout); see errors.smtp_failure_to_api_error.
    for status in (503, 504):
        table.setdefault(status, []).append("smtp_error")
    return table


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    by_status = _by_status()
    error_responses = {
        str(status): {
            "description": ", ".join(sorted(codes)),
            "content": {"application/json": {"schema": _error_list(sorted(codes))}},
        }
        for status, codes in sorted(by_status.items())
        if status not in (401, 403)
    }
    bare = {
        "type": "object",
        "required": ["type", "msg"],
        "properties": {"type": {"const": "error"}, "msg": {"type": "string"}},
    }
    error_responses["401"] = {
        "description": f"mailcow API-key failure: '{API_AUTH_FAILED}' or 'api access denied for ip <ip>'",
        "content": {"application/json": {"schema": bare}},
    }
    error_responses["403"] = {
        "description": f"'{API_RW_DENIED}' (bare object) or one of: " + ", ".join(sorted(by_status[403])),
        "content": {"application/json": {"schema": {"oneOf": [bare, _error_list(sorted(by_status[403]))]}}},
    }
    success = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["type", "log", "msg", "message_id", "queue_id", "recipients"],
            "properties": {
                "type": {"enum": ["success", "danger"]},
                "log": {"type": "array"},
                "msg": {
                    "type": "array",
                    "prefixItems": [{"enum": ["smtp_mail_sent", "smtp_partially_sent"]}],
                    "description": "[smtp_mail_sent, from, to list]; or [smtp_partially_sent, from, accepted, refused]",
                },
                "message_id": {"type": "string", "description": "The Message-ID header of the message."},
                "id": {"type": "string", "description": "The id of the message's status record (GET /api/v1/send/status/{id})."},
                "queue_id": {"type": ["string", "null"], "description": "postfix's queue id ('queued as')."},
                "recipients": {
                    "type": "array",
                    "description": "postfix's reply to each RCPT TO (to, cc and bcc, each once).",
                    "items": {
                        "type": "object",
                        "required": ["address", "smtp_code", "smtp_text"],
                        "properties": {
                            "address": {"type": "string"},
                            "smtp_code": {"type": "integer"},
                            "smtp_text": {"type": "string"},
                        },
                    },
                },
                "refused": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Only with smtp_partially_sent: recipients postfix refused; the others got the message.",
                },
            },
        },
    }
    accepted = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["type", "log", "msg", "id", "status", "message_id"],
            "properties": {
                "type": {"const": "success"},
                "log": {"type": "array"},
                "msg": {"type": "array", "prefixItems": [{"const": "smtp_mail_accepted"}], "description": "[smtp_mail_accepted, from, to list]"},
                "id": {"type": "string"},
                "status": {"enum": ["queued", "scheduled"]},
                "message_id": {"type": "string"},
                "send_at": {"type": ["number", "null"], "description": "unix seconds"},
            },
        },
    }
    dry_run = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["type", "log", "msg", "message_id", "target", "envelope", "message"],
            "properties": {
                "type": {"const": "success"},
                "log": {"type": "array"},
                "msg": {"type": "array", "prefixItems": [{"const": "smtp_dry_run"}], "description": "[smtp_dry_run, from, to list]"},
                "message_id": {"type": "string"},
                "target": {"type": "string", "description": "host:port a send would submit to"},
                "envelope": {
                    "type": "object",
                    "properties": {"from": {"type": "string"}, "to": {"type": "array", "items": {"type": "string"}}},
                },
                "message": {
                    "type": "string",
                    "contentEncoding": "base64",
                    "description": "The exact bytes a send hands to postfix (CRLF line ends, before dot-stuffing).",
                },
            },
        },
    }
    batch_result = {
        "type": "object",
        "required": ["request_id", "ok", "failed", "results"],
        "properties": {
            "request_id": {"type": "string"},
            "key": {"type": "string"},
            "ok": {"type": "integer", "description": "messages sent, accepted into the outbox or built (dry run)"},
            "failed": {"type": "integer"},
            "results": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["index", "status", "code", "answer"],
                    "properties": {
                        "index": {"type": "integer"},
                        "status": {"type": "integer", "description": "the HTTP status this message alone would have had"},
                        "code": {"type": "string", "description": "smtp_mail_sent, smtp_mail_accepted, smtp_dry_run or an error code"},
                        "message_id": {"type": ["string", "null"]},
                        "id": {"type": ["string", "null"], "description": "its status record"},
                        "replayed": {"type": "boolean"},
                        "answer": {"description": "the answer POST /api/v1/send/email would have given for it"},
                    },
                },
            },
        },
    }
    fate = {
        "type": "object",
        "properties": {
            "address": {"type": "string"},
            "status": {"enum": ["pending", "sent", "deferred", "bounced", "expired", "undeliverable", "refused"]},
            "dsn": {"type": "string"},
            "relay": {"type": "string"},
            "text": {"type": "string", "description": "postfix's text, or the reply at submission"},
            "time": {"type": ["number", "null"], "description": "unix seconds of postfix's log line"},
        },
    }
    attempt = {
        "type": "object",
        "properties": {
            "at": {"type": "number"},
            "outcome": {"enum": ["submitted", "retry", "failed", "unknown", "proven_not_taken"]},
            "smtp_code": {"type": ["integer", "null"]},
            "smtp_text": {"type": "string"},
            "queue_id": {"type": ["string", "null"]},
        },
    }
    status_record = {
        "type": "object",
        "required": ["id", "status", "message_id", "recipients", "attempts"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["scheduled", "queued", "sending", "submitted", "delivered", "deferred", "bounced", "failed", "canceled", "unknown"]},
            "message_id": {"type": "string"},
            "from": {"type": "string"},
            "queue_id": {"type": ["string", "null"], "description": "postfix's queue id once it took the message"},
            "created_at": {"type": "number"},
            "send_at": {"type": ["number", "null"]},
            "updated_at": {"type": "number"},
            "recipients": {"type": "array", "items": fate},
            "attempts": {"type": "array", "items": attempt},
            "request_id": {"type": "string", "description": "this request's id"},
            "key": {"type": "string", "description": "the kind of key used: api_key or send_key:<id>"},
        },
    }
    send_headers = {
        "X-Request-Id": {"schema": {"type": "string"}, "description": "This request's id in the service's log."},
        REPLAYED_HEADER: {
            "schema": {"const": "true"},
            "description": f"Present when the answer is the stored one of an earlier request with the same "
            f"{IDEMPOTENCY_HEADER} and body: nothing was sent this time.",
        },
        "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait (409 in flight, 429, 503)."},
        "RateLimit-Policy": {
            "schema": {"type": "string"},
            "description": "draft-ietf-httpapi-ratelimit-headers: each limit the message was charged to, as "
            '"mailbox", "domain" (mailcow\'s limit) or "key" (the send key\'s own), with its quota q in '
            'envelope recipients per window w seconds, e.g. "mailbox";q=100;w=3600. Absent when no limit applies.',
        },
        "RateLimit": {
            "schema": {"type": "string"},
            "description": "For each policy: recipients r that still fit now, and seconds t until its bucket is "
            'empty again, e.g. "mailbox";r=57;t=1548.',
        },
    }
    for response in error_responses.values():
        response["headers"] = send_headers
    status_schema = {"type": "object", "properties": {"status": {"type": "string"}}}
    unready_schema = {
        "type": "object",
        "required": ["status", "failing", "reasons"],
        "properties": {
            "status": {"const": "unavailable"},
            "failing": {"type": "array", "items": {"enum": ["database", "postfix", "state"]}},
            "reasons": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Why each failing part fails (connection refused, TLS name mismatch, certificate "
                "not trusted, database access denied...), without secrets or addresses.",
            },
        },
    }
    id_header = {"X-Request-Id": send_headers["X-Request-Id"]}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mailcow-smtp-api",
            "version": VERSION,
            "description": "Send mail through mailcow's postfix with one HTTP call.",
        },
        "components": {
            "securitySchemes": {
                "apiKey": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-API-Key",
                    "description": "A send key (smtpapi-<id>-<secret>, from smtpapi-admin sendkey add): bound to one "
                    "mailbox, it needs no password and sends on the plain internal target after the sidecar's own "
                    "checks. Or a mailcow read-write API key (an admin key), with the mailbox password.",
                }
            },
        },
        "paths": {
            "/api/v1/send/email": {
                "post": {
                    "operationId": "sendEmail",
                    "security": [{"apiKey": []}],
                    "parameters": [
                        {
                            "name": "Prefer",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "respond-async (RFC 7240): answer 202 once the message is stored in the "
                            "outbox, after every check; it is delivered when postfix can. Without it, the send is "
                            "synchronous.",
                        },
                        {
                            "name": IDEMPOTENCY_HEADER,
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[\\x20-\\x7e]+$"},
                            "description": "Send at most once: a repeat with the same key and the same body "
                            f"(byte for byte) returns the stored answer with {REPLAYED_HEADER}: true and sends "
                            "nothing; another body answers 409 smtp_idempotency_mismatch; a repeat while the first "
                            "is running answers 409 smtp_idempotency_in_flight with Retry-After. Keys belong to the "
                            "API key and are kept for --idempotency-ttl (24 h). Stored: answers after an SMTP "
                            "connection (including outcome-unknown timeouts), except 503 retry-later answers. "
                            "Not stored: failures before SMTP (validation, API key, sender rule), so a corrected "
                            "retry may reuse the key.",
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _send_request_schema()}},
                    },
                    "responses": {
                        "200": {
                            "description": "smtp_mail_sent, or smtp_partially_sent when some recipients were refused; "
                            "smtp_dry_run for dry_run: true",
                            "headers": send_headers,
                            "content": {"application/json": {"schema": {"oneOf": [success, dry_run]}}},
                        },
                        "202": {
                            "description": "Prefer: respond-async: every check passed and the message is stored in the "
                            "outbox; it is handed to postfix when postfix can (or at send_at)",
                            "headers": {
                                **send_headers,
                                "Preference-Applied": {"schema": {"const": "respond-async"}, "description": "RFC 7240."},
                                "Location": {"schema": {"type": "string"}, "description": "/api/v1/send/status/{id}"},
                            },
                            "content": {"application/json": {"schema": accepted}},
                        },
                        **error_responses,
                    },
                }
            },
            "/api/v1/send/raw": {
                "post": {
                    "operationId": "sendRaw",
                    "security": [{"apiKey": []}],
                    "description": "Send the caller's own RFC 5322 message to an envelope. The sender rule applies to "
                    "the envelope sender and to the header From. Prefer and Idempotency-Key as for /api/v1/send/email.",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _raw_request_schema()}}},
                    "responses": {
                        "200": {
                            "description": "smtp_mail_sent / smtp_partially_sent, or smtp_dry_run",
                            "headers": send_headers,
                            "content": {"application/json": {"schema": {"oneOf": [success, dry_run]}}},
                        },
                        "202": {"description": "Prefer: respond-async: stored in the outbox", "headers": send_headers,
                                "content": {"application/json": {"schema": accepted}}},
                        **error_responses,
                    },
                }
            },
            "/api/v1/send/batch": {
                "post": {
                    "operationId": "sendBatch",
                    "security": [{"apiKey": []}],
                    "description": "Up to --max-batch messages of /api/v1/send/email's shape, each checked and sent on its "
                    "own over the pooled sessions (Prefer: respond-async queues each): one message's failure never "
                    "affects another. Each has its own result and its own idempotency_key.",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": _batch_request_schema()}}},
                    "responses": {
                        "200": {
                            "description": "one result per message, in order (some may have failed)",
                            "headers": {"X-Request-Id": send_headers["X-Request-Id"]},
                            "content": {"application/json": {"schema": batch_result}},
                        },
                        **error_responses,
                    },
                }
            },
            "/api/v1/send/status/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "get": {
                    "operationId": "messageStatus",
                    "security": [{"apiKey": []}],
                    "description": "What became of a message sent with this key (synchronously or not).",
                    "responses": {
                        "200": {"description": "the message's status", "content": {"application/json": {"schema": status_record}}},
                        "404": {"description": "smtp_status_not_found", "content": {"application/json": {"schema": _error_list(["smtp_status_not_found"])}}},
                    },
                },
                "delete": {
                    "operationId": "cancelMessage",
                    "security": [{"apiKey": []}],
                    "description": "Cancel a message that has not been handed to postfix yet (scheduled or queued).",
                    "responses": {
                        "200": {"description": "canceled; its status record", "content": {"application/json": {"schema": status_record}}},
                        "404": {"description": "smtp_status_not_found", "content": {"application/json": {"schema": _error_list(["smtp_status_not_found"])}}},
                        "409": {"description": "smtp_not_cancelable", "content": {"application/json": {"schema": _error_list(["smtp_not_cancelable"])}}},
                    },
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "responses": {
                        "200": {
                            "description": "alive",
                            "headers": id_header,
                            "content": {"application/json": {"schema": status_schema}},
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "responses": {
                        "200": {
                            "description": "ready",
                            "headers": id_header,
                            "content": {"application/json": {"schema": status_schema}},
                        },
                        "503": {
                            "description": "a dependency is down",
                            "headers": id_header,
                            "content": {"application/json": {"schema": unready_schema}},
                        },
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "responses": {
                        "200": {"description": "this document", "headers": id_header, "content": {"application/json": {}}}
                    },
                }
            },
        },
    }
