"""A large attachment's way through parsing, MIME building and DATA: how many copies exist at once.

The goal is a peak under 4x the attachment's size (the body's base64 text is already 1.33x). The
peak of Python's own allocations is deterministic, so it is checked here; the process's resident
memory is reported by ``bench/memory.py`` against a real postfix.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
import tracemalloc
from datetime import datetime, timezone

import pytest

from mailcow_smtp_api.core import idempotency
from mailcow_smtp_api.core.mime import build_message_parts
from mailcow_smtp_api.smtp.client import message_pieces, stuffed_chunks
from mailcow_smtp_api.core.validate import ParsePolicy
from mailcow_smtp_api.web.api import RequestBody, parse_body

MB = 1024 * 1024
POLICY = ParsePolicy(max_recipients=10, max_attachments=10, password_optional=lambda port: False)


def body_with(content: bytes) -> bytes:
    return json.dumps(
        {
            "from": "sender@example.com",
            "to": ["recipient@example.com"],
            "subject": "large",
            "body": "see attached\n",
            "password": "pw",
            "attachments": [{"filename": "blob.bin", "content": base64.b64encode(content).decode("ascii")}],
        }
    ).encode("ascii")


def test_request_body_reads_memory_and_files_whole_and_in_chunks() -> None:
    """Size, whole reads (repeatable) and chunks agree for an in-memory and a file buffer."""
    data = os.urandom(3 * RequestBody.CHUNK + 17)
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        for content in (io.BytesIO(data), handle):
            body = RequestBody(content)
            assert body.size() == len(data)
            assert body.read() == data and body.read() == data
            chunks = list(body.chunks())
            assert [len(c) for c in chunks] == [RequestBody.CHUNK] * 3 + [17]
            assert b"".join(chunks) == data
    empty = RequestBody(None)
    assert (empty.size(), empty.read(), list(empty.chunks())) == (0, b"", [])


def test_fingerprint_over_chunks_equals_fingerprint_over_the_whole_body() -> None:
    """An Idempotency-Key repeat is recognised whether the body was hashed whole or streamed."""
    data = os.urandom(2 * RequestBody.CHUNK + 5)
    streamed = idempotency.fingerprint(RequestBody(io.BytesIO(data)).chunks(), "KEY")
    assert streamed == idempotency.fingerprint(data, "KEY")
    assert streamed != idempotency.fingerprint(data + b" ", "KEY")


def test_a_large_attachment_is_parsed_built_and_streamed_under_three_times_its_size() -> None:
    """Peak of traced allocations from the buffered body to the last DATA chunk, as a multiple of the attachment."""
    size = 8 * MB
    content = os.urandom(size)
    with tempfile.TemporaryFile() as handle:
        handle.write(body_with(content))
        expected = base64.b64encode(content)
        del content
        tracemalloc.start()
        try:
            request = parse_body(RequestBody(handle), POLICY)
            pieces = build_message_parts(request, message_id="<m@example.com>", date=datetime.now(timezone.utc))
            sent = sum(len(chunk) for chunk in stuffed_chunks(message_pieces(pieces)))
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert request.attachments[0].content == base64.b64decode(expected)
    assert sent > len(expected)  # the whole attachment went out, with its line ends
    assert peak < 3 * size, f"peak {peak / MB:.1f} MiB for a {size / MB:.0f} MiB attachment"


@pytest.mark.parametrize("content", ["QQ", "QQ=", "=QQ==", "QQ==QQ==", "QQ==\n", "QQ== ", "Q\u00e9=="])
def test_attachment_content_must_be_strict_base64(content: str) -> None:
    """Missing or misplaced padding, data after padding, white space and non-ASCII are refused."""
    from mailcow_smtp_api.core.errors import ApiError

    raw = json.dumps(
        {"from": "sender@example.com", "to": ["r@example.com"], "subject": "s", "body": "b", "password": "pw",
         "attachments": [{"filename": "a.bin", "content": content}]}
    ).encode()  # fmt: skip
    with pytest.raises(ApiError) as caught:
        parse_body(RequestBody(io.BytesIO(raw)), POLICY)
    assert caught.value.code == "smtp_invalid_attachment"


def test_bodies_up_to_a_mebibyte_are_buffered_in_memory_larger_and_chunked_ones_on_disk() -> None:
    """Twisted's own switch to a temporary file is at 100,000 bytes; ours is at MEMORY_BODY."""
    from twisted.web.test.requesthelper import DummyChannel

    from mailcow_smtp_api.web.api import MEMORY_BODY, request_factory

    kinds = {}
    for length in (10, 200_000, MEMORY_BODY, MEMORY_BODY + 1, None):
        request = request_factory(30 * MB)(DummyChannel())
        request.gotLength(length)
        kinds[length] = isinstance(request.content, io.BytesIO)
        request.content.close()
    assert kinds == {10: True, 200_000: True, MEMORY_BODY: True, MEMORY_BODY + 1: False, None: False}

