"""Mailbox password hashes as mailcow stores them and dovecot checks them.

``mailbox.password`` and ``app_passwd.password`` hold ``{SCHEME}data`` (mailcow.md section 6). This
module answers one question, "does this password match this stored value?", the way dovecot's
password schemes (and mailcow's PHP ``verify_hash``) answer it, so that the port-25 path accepts
exactly the passwords that port 587/465 would accept.

Pure core: stdlib, attrs and the hashing libraries (bcrypt, argon2-cffi, passlib); no Twisted, no I/O.
Hashing is slow on purpose; callers run ``verify_password`` off the reactor thread.

Decisions that differ from "whatever the stored value looks like":

- A value without a ``{SCHEME}`` prefix is read as dovecot reads it with mailcow's SQL passdb
  (``default_pass_scheme = SSHA256``), except that a value starting with ``$1$`` is MD5-CRYPT, a
  special case dovecot makes for prefix-less values. mailcow itself always writes a prefix (its PHP
  ``verify_hash`` refuses a value without one), so this only matters for rows written by hand.
- The crypt family (CRYPT, DES-CRYPT, MD5-CRYPT/MD5, SHA256-CRYPT, SHA512-CRYPT, BLF-CRYPT) is
  checked by the crypt string's own ``$id$``, as libc ``crypt()`` (dovecot's CRYPT/SHA*-CRYPT) and
  PHP's ``password_verify`` (mailcow's ``verify_hash``) do; the label only says "a crypt string".
- An empty password, one containing NUL (SASL PLAIN uses NUL as its separator, so dovecot never sees
  one), one that is not valid UTF-8 text, or one longer than ``MAX_PASSWORD_BYTES`` never matches.
  The stored value is still checked in full, so a malformed value is reported the same way whatever
  the password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable

import argon2.exceptions
import attrs
import bcrypt
from argon2 import low_level as argon2_low_level
from passlib.crypto.digest import lookup_hash  # type: ignore[import-untyped]
from passlib.hash import des_crypt, md5_crypt, sha256_crypt, sha512_crypt  # type: ignore[import-untyped]

# mailcow's dovecot SQL passdb configuration sets "default_pass_scheme = SSHA256".
DEFAULT_SCHEME = "SSHA256"
# crypt_blowfish (dovecot, PHP) reads at most 72 bytes of the password; the bcrypt package refuses
# longer input instead of ignoring the rest, so the verifier cuts it the same way.
BCRYPT_MAX_BYTES = 72
# Far longer than any mailbox password; bounds the work one request can cause.
MAX_PASSWORD_BYTES = 4096
# PBKDF2 rounds beyond this are refused as malformed rather than spending minutes on one request.
PBKDF2_MAX_ROUNDS = 10_000_000
BLF_DEFAULT_COST = 10


@attrs.define(auto_exc=True, eq=False)
class UnsupportedScheme(Exception):
    """The stored value cannot be checked here: unknown scheme or encoding, or malformed data.

    ``scheme`` is the label as stored (upper-cased); ``reason`` says which case it is. Neither ever
    contains the stored hash or the password.
    """

    scheme: str
    reason: str = "unknown scheme"


# --------------------------------------------------------------------------- parsing the stored value

_ENCODINGS = {"HEX": "hex", "B64": "b64", "BASE64": "b64"}


@attrs.frozen
class StoredPassword:
    """A stored value split into dovecot's parts: ``{SCHEME.ENCODING}data``.

    ``encoding`` is ``None`` when the label has no ``.HEX``/``.B64`` suffix (the scheme's default).
    """

    scheme: str
    encoding: str | None
    data: str


def parse_stored(stored: str) -> StoredPassword:
    """Split ``{SCHEME[.ENCODING]}data``; scheme names are case-insensitive as in dovecot."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end <= 1:
            raise UnsupportedScheme("", "malformed scheme prefix")
        label, data = stored[1:end].upper(), stored[end + 1 :]
    elif stored.startswith("$1$"):
        label, data = "MD5-CRYPT", stored
    else:
        label, data = DEFAULT_SCHEME, stored
    scheme, dot, suffix = label.partition(".")
    if not dot:
        return StoredPassword(scheme, None, data)
    if suffix not in _ENCODINGS:
        raise UnsupportedScheme(label, "unknown encoding")
    return StoredPassword(scheme, _ENCODINGS[suffix], data)


def _malformed(scheme: str) -> UnsupportedScheme:
    return UnsupportedScheme(scheme, "malformed stored value")


def _decode(data: str, encoding: str, scheme: str) -> bytes:
    """Decode ``data`` as hex, base64 (white space ignored, as dovecot does) or raw UTF-8."""
    try:
        if encoding == "hex":
            return binascii.unhexlify(data)
        if encoding == "b64":
            return base64.b64decode(re.sub(r"[ \t\r\n]", "", data), validate=True)
        return data.encode("utf-8")
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        raise _malformed(scheme) from None


def _decode_text(entry: StoredPassword) -> str:
    """The data of a string-valued scheme (crypt, argon2, PBKDF2) as ASCII text."""
    if entry.encoding is None:
        text = entry.data
    else:
        try:
            text = _decode(entry.data, entry.encoding, entry.scheme).decode("ascii")
        except UnicodeDecodeError:
            raise _malformed(entry.scheme) from None
    if not text.isascii():
        raise _malformed(entry.scheme)
    return text


# --------------------------------------------------------------------------- digest schemes


@attrs.frozen
class _Digest:
    """A dovecot digest scheme: ``hash(password || salt)``, stored as ``digest || salt``."""

    algorithm: str
    size: int
    salted: bool
    default_encoding: str


_DIGESTS: dict[str, _Digest] = {
    "SHA": _Digest("sha1", 20, False, "b64"),
    "SHA1": _Digest("sha1", 20, False, "b64"),
    "SHA256": _Digest("sha256", 32, False, "b64"),
    "SHA512": _Digest("sha512", 64, False, "b64"),
    "PLAIN-MD5": _Digest("md5", 16, False, "hex"),
    "LDAP-MD5": _Digest("md5", 16, False, "b64"),
    "PLAIN-MD4": _Digest("md4", 16, False, "hex"),
    "SMD5": _Digest("md5", 16, True, "b64"),
    "SSHA": _Digest("sha1", 20, True, "b64"),
    "SSHA256": _Digest("sha256", 32, True, "b64"),
    "SSHA512": _Digest("sha512", 64, True, "b64"),
}


def _digest(algorithm: str, data: bytes) -> bytes:
    if algorithm == "md4":
        # OpenSSL 3 drops MD4 from hashlib; passlib carries its own implementation.
        return bytes(lookup_hash("md4").const(data).digest())
    return hashlib.new(algorithm, data).digest()


def _digest_encoding(spec: _Digest, entry: StoredPassword) -> str:
    """dovecot guesses hex vs base64 for fixed-size digests when the label names no encoding."""
    if entry.encoding is not None:
        return entry.encoding
    if not spec.salted:
        return "hex" if len(entry.data) == 2 * spec.size else "b64"
    return spec.default_encoding


def _verify_digest(spec: _Digest, entry: StoredPassword, password: bytes) -> bool:
    raw = _decode(entry.data, _digest_encoding(spec, entry), entry.scheme)
    if spec.salted:
        # dovecot refuses a salted value with no salt ("password is too short").
        if len(raw) <= spec.size:
            raise _malformed(entry.scheme)
        expected, salt = raw[: spec.size], raw[spec.size :]
    else:
        if len(raw) != spec.size:
            raise _malformed(entry.scheme)
        expected, salt = raw, b""
    return hmac.compare_digest(_digest(spec.algorithm, password + salt), expected)


# --------------------------------------------------------------------------- string schemes

_DES_CRYPT = re.compile(r"[./0-9A-Za-z]{13}")
_BCRYPT_IDS = ("$2y$", "$2b$", "$2a$")
_PASSLIB_CRYPTS = {"$1$": md5_crypt, "$5$": sha256_crypt, "$6$": sha512_crypt}


def _verify_clear(entry: StoredPassword, password: bytes) -> bool:
    stored = _decode(entry.data, entry.encoding or "raw", entry.scheme)
    return hmac.compare_digest(stored, password)


def _verify_bcrypt(text: str, password: bytes, scheme: str) -> bool:
    # PHP and dovecot write "$2y$"; it is the same algorithm as "$2b$" and the bcrypt package takes both.
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], text.encode("ascii"))
    except ValueError:
        raise _malformed(scheme) from None


def _verify_crypt(entry: StoredPassword, password: bytes) -> bool:
    text = _decode_text(entry)
    if text.startswith(_BCRYPT_IDS):
        return _verify_bcrypt(text, password, entry.scheme)
    handler = _PASSLIB_CRYPTS.get(text[:3])
    if handler is None and _DES_CRYPT.fullmatch(text):
        handler = des_crypt
    if handler is None:
        # yescrypt ($y$), $2x$ and other libc methods: mailcow never writes them.
        raise UnsupportedScheme(entry.scheme, "unsupported crypt method")
    try:
        return bool(handler.verify(password, text))
    except ValueError:
        raise _malformed(entry.scheme) from None


_ARGON2_TYPES = {"$argon2i$": argon2_low_level.Type.I, "$argon2id$": argon2_low_level.Type.ID}


def _verify_argon2(entry: StoredPassword, password: bytes) -> bool:
    # Like libsodium (dovecot) and PHP, the encoded string names its own variant.
    text = _decode_text(entry)
    kind = next((t for prefix, t in _ARGON2_TYPES.items() if text.startswith(prefix)), None)
    if kind is None:
        raise _malformed(entry.scheme)
    try:
        return argon2_low_level.verify_secret(text.encode("ascii"), password, kind)
    except argon2.exceptions.VerifyMismatchError:
        return False
    except argon2.exceptions.VerificationError:
        raise _malformed(entry.scheme) from None


def _verify_pbkdf2(entry: StoredPassword, password: bytes) -> bool:
    # dovecot's PBKDF2: "$1$<salt>$<rounds>$<hex of PBKDF2-HMAC-SHA1, 20 bytes>"; the salt is used as text.
    parts = _decode_text(entry).split("$")
    if len(parts) != 5 or parts[:2] != ["", "1"] or not parts[3].isdigit():
        raise _malformed(entry.scheme)
    salt, rounds = parts[2].encode("ascii"), int(parts[3])
    try:
        expected = binascii.unhexlify(parts[4])
    except (binascii.Error, ValueError):
        raise _malformed(entry.scheme) from None
    if not 0 < rounds <= PBKDF2_MAX_ROUNDS or len(expected) != 20:
        raise _malformed(entry.scheme)
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha1", password, salt, rounds, 20), expected)


_STRING_SCHEMES: dict[str, Callable[[StoredPassword, bytes], bool]] = {
    "CLEAR": _verify_clear,
    "CLEARTEXT": _verify_clear,
    "PLAIN": _verify_clear,
    "CRYPT": _verify_crypt,
    "DES-CRYPT": _verify_crypt,
    "MD5": _verify_crypt,
    "MD5-CRYPT": _verify_crypt,
    "SHA256-CRYPT": _verify_crypt,
    "SHA512-CRYPT": _verify_crypt,
    "BLF-CRYPT": _verify_crypt,
    "ARGON2I": _verify_argon2,
    "ARGON2ID": _verify_argon2,
    "PBKDF2": _verify_pbkdf2,
}

SUPPORTED_SCHEMES = frozenset(_DIGESTS) | frozenset(_STRING_SCHEMES)


# --------------------------------------------------------------------------- public functions


def _candidate(password: str) -> bytes | None:
    """The UTF-8 bytes dovecot would receive, or None for a password that can never match."""
    if not password or "\x00" in password:
        return None
    try:
        encoded = password.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return encoded if len(encoded) <= MAX_PASSWORD_BYTES else None


def verify_password(stored: str, password: str) -> bool:
    """Return whether ``password`` matches ``stored`` (``{SCHEME}data``), as dovecot decides.

    Raises ``UnsupportedScheme`` for an unknown scheme or encoding and for a stored value that is
    malformed for its scheme; never falls back to accepting.
    """
    entry = parse_stored(stored)
    candidate = _candidate(password)
    # A refused password is still run against the stored value so that a malformed value is
    # reported consistently; the result is then ignored.
    checked = candidate if candidate is not None else b""
    digest = _DIGESTS.get(entry.scheme)
    if digest is not None:
        matched = _verify_digest(digest, entry, checked)
    elif entry.scheme in _STRING_SCHEMES:
        matched = _STRING_SCHEMES[entry.scheme](entry, checked)
    else:
        raise UnsupportedScheme(entry.scheme)
    return matched and candidate is not None


def hash_password_blf(password: str, cost: int = BLF_DEFAULT_COST) -> str:
    """Hash ``password`` as mailcow does by default: ``{BLF-CRYPT}$2y$<cost>$...``.

    Raises ``ValueError`` for a password that bcrypt would silently cut (over 72 UTF-8 bytes) or
    that contains NUL, rather than storing a hash of something else.
    """
    encoded = password.encode("utf-8")
    if not encoded or b"\x00" in encoded or len(encoded) > BCRYPT_MAX_BYTES:
        raise ValueError("the password must be 1 to 72 UTF-8 bytes without NUL")
    hashed = bcrypt.hashpw(encoded, bcrypt.gensalt(rounds=cost, prefix=b"2b")).decode("ascii")
    # PHP's password_hash writes "$2y$"; dovecot and mailcow expect that spelling.
    return "{BLF-CRYPT}$2y$" + hashed[len("$2b$") :]
