"""The OpenAPI 3.1 document of the HTTP API, built from the same tables the code uses.

Error codes come from ``errors.CODES`` so the document cannot name a code the code lacks, or miss
one it has. Pure core.
"""

from __future__ import annotations

from typing import Any

from .errors import API_AUTH_FAILED, API_RW_DENIED, CODES

VERSION = "0.1.0"

_ADDRESS = {"type": "string", "maxLength": 512, "examples": ["sender@example.com", '"Doe, Jane" <jane@example.org>']}
_ADDRESS_LIST = {"type": ["array", "null"], "items": _ADDRESS}


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
                    },
                },
            },
            "smtp_host": {"type": ["string", "null"], "description": "Only hosts in the server's --smtp-allow."},
            "smtp_port": {"type": ["integer", "null"], "minimum": 1, "maximum": 65535},
            "smtp_user": {**_ADDRESS, "type": ["string", "null"], "description": "Mailbox login; defaults to from."},
            "password": {"type": ["string", "null"], "writeOnly": True, "description": "Mailbox password."},
            "app_password": {"type": ["string", "null"], "writeOnly": True, "description": "mailcow app password."},
        },
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
                "detail": {"type": "object"},
            },
        },
    }


def _by_status() -> dict[int, list[str]]:
    table: dict[int, list[str]] = {}
    for code, (status, _) in CODES.items():
        if code == "smtp_partially_sent":
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
            "required": ["type", "log", "msg"],
            "properties": {
                "type": {"enum": ["success", "danger"]},
                "log": {"type": "array"},
                "msg": {"type": "array", "prefixItems": [{"enum": ["smtp_mail_sent", "smtp_partially_sent"]}]},
                "message_id": {"type": "string"},
                "queue_id": {"type": ["string", "null"]},
                "recipients": {"type": "array"},
                "refused": {"type": "array", "items": {"type": "string"}},
            },
        },
    }
    status_schema = {"type": "object", "properties": {"status": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mailcow-smtp-api",
            "version": VERSION,
            "description": "Send mail through mailcow's postfix with one HTTP call.",
        },
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "paths": {
            "/api/v1/send/email": {
                "post": {
                    "operationId": "sendEmail",
                    "security": [{"apiKey": []}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _send_request_schema()}},
                    },
                    "responses": {
                        "200": {
                            "description": "smtp_mail_sent, or smtp_partially_sent when some recipients were refused",
                            "headers": {"X-Request-Id": {"schema": {"type": "string"}}},
                            "content": {"application/json": {"schema": success}},
                        },
                        **error_responses,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "responses": {"200": {"description": "alive", "content": {"application/json": {"schema": status_schema}}}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "responses": {
                        "200": {"description": "ready", "content": {"application/json": {"schema": status_schema}}},
                        "503": {"description": "a dependency is down", "content": {"application/json": {"schema": status_schema}}},
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "responses": {"200": {"description": "this document", "content": {"application/json": {}}}},
                }
            },
        },
    }
