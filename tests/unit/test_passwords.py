"""Tests for passwords: mailcow's stored password hashes, checked as dovecot checks them."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import unicodedata

import bcrypt
import pytest

from mailcow_smtp_api.core.passwords import (
    MAX_PASSWORD_BYTES,
    UnsupportedScheme,
    hash_password_blf,
    parse_stored,
    verify_password,
)

ASCII = "correct horse battery staple"
UNICODE = "Pässwörd €ß 日本"

# Written by `doveadm pw -s SCHEME -p PASSWORD` (dovecot 2.3.19.1); BLF-CRYPT and CRYPT with `-r 4`,
# PBKDF2 with `-r 1000`, one SHA512-CRYPT with `-r 1000`. Kept fixed so the suite needs no dovecot.
DOVEADM_VECTORS = [
    (ASCII, '{BLF-CRYPT}$2y$04$ib0CSDvWfjTIE.8fu4Cjcu3ef3W62rDAoCYIS5/4X2p8UYGVCn1vm'),
    (ASCII, '{SSHA256}7MPG8kahNcViTBxPuM5p7lvHrcVJClNIsUFEoP8/Bed3LoQm'),
    (ASCII, '{SSHA512}eV2NUHLV07a3eABCphwWh7jQ+dH71qNf4A2HLl4uMyNKwNwtc2LRxCBA3yqYaJt25r5HJ8euwBCqux4QmRmN2Llb70Q='),
    (ASCII, '{SSHA}QV9YID1YTJ9WrtrlVXEZJejpgkYg024Z'),
    (ASCII, '{SMD5}PEbOxdgkUWs3cR+/rdyEP/R7jaM='),
    (ASCII, '{SHA512-CRYPT}$6$mug7riEXK0iDDkG.$cW..AET9rewf3fm/e5ZuF5GgiHiQfB0fnRfwarXcCkCrquxKeTZ3WSGDEs6Nzk3N4ZZ70BmTWO/7DFJyC3V7I0'),
    (ASCII, '{SHA512-CRYPT}$6$rounds=1000$4WVqCzYNX3HC5Jts$xHxLKBW27CLXBiUc.3raIK9H7IBLKHvP0QfKEd32gn6tI.yn3hZWqlzAsAwrM0W1ELXkuJyVaOuhzbBvWdjvY/'),
    (ASCII, '{SHA256-CRYPT}$5$T8FxhFryE0EejU2h$XgoVN5W8tPwrkKslnQNLw2gw/c9rlLpJogCKF2X9niB'),
    (ASCII, '{MD5-CRYPT}$1$3COCYsNX$FyvQt4Nc1.AOTHAzw8WWS/'),
    (ASCII, '{MD5}$1$w7z1EKln$zDTXyd3440y78rC6tfJgW1'),
    (ASCII, '{CRYPT}$2y$04$Mu928LxGcA6HxSnTXLPipu7dbO/FQArYIy0LEWK/JHU7ZlUaVay.G'),
    (ASCII, '{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$1phyXuTj9gFmQ0ARZfRRXg$m+iZDeCbJbgnJd2O0TizHsrzZp/zYwDDzSenLGSkxVI'),
    (ASCII, '{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$bq6o5b6ZfnxaC4bWKlz6GQ$zz2A9HFyWCYbNxktwT4uc6suXdveQmVLYlze4lQeoKw'),
    (ASCII, '{PLAIN-MD5}9cc2ae8a1ba7a93da39b46fc1019c481'),
    (ASCII, '{LDAP-MD5}nMKuihunqT2jm0b8EBnEgQ=='),
    (ASCII, '{PLAIN-MD4}131adffe1d8712c1b624ba62b5bcf3fd'),
    (ASCII, '{SHA}q/eq1kOINtvlJqojGr3i0O73TUI='),
    (ASCII, '{SHA1}q/eq1kOINtvlJqojGr3i0O73TUI='),
    (ASCII, '{SHA256}xLvLH77JnWW/WdhcjLYu4tuWPw/hBvSD2a+nO9Tjmoo='),
    (ASCII, '{SHA512}vl73Z52Iq5qQRfYmflX15XhLS4zXZLXNhVpSRPkcYmlTzUbEPXZohz/W7707IhJJMVWAAxljRyoHh4H+BG5irg=='),
    (ASCII, '{CLEAR}correct horse battery staple'),
    (ASCII, '{CLEARTEXT}correct horse battery staple'),
    (ASCII, '{PLAIN}correct horse battery staple'),
    (ASCII, '{PBKDF2}$1$Mu.Dp//U6oDvl0Ho$1000$a629a03f806d6cad1b65d7ee5c82312ba9891951'),
    (ASCII, '{SHA256.HEX}c4bbcb1fbec99d65bf59d85c8cb62ee2db963f0fe106f483d9afa73bd4e39a8a'),
    (ASCII, '{SSHA512.HEX}606e00b9546095e87ffa2575eadb143836874f52e215887077dd0f7ea3e898a469a7e99baeebcd9904208faaa4bf49685c6120a90659f472ace0c170f53fc3da5d597225'),
    (ASCII, '{PLAIN-MD5.B64}nMKuihunqT2jm0b8EBnEgQ=='),
    (ASCII, '{SHA512.B64}vl73Z52Iq5qQRfYmflX15XhLS4zXZLXNhVpSRPkcYmlTzUbEPXZohz/W7707IhJJMVWAAxljRyoHh4H+BG5irg=='),
    (ASCII, '{CLEAR.B64}Y29ycmVjdCBob3JzZSBiYXR0ZXJ5IHN0YXBsZQ=='),
    (ASCII, '{SSHA256.BASE64}Gi4ySaV1YDPs3aIrCui5G1w2Sezf9v7OkhyeWymgCuo8nYKq'),
    (ASCII, '{BLF-CRYPT.HEX}24327924303424757430536b666664447a5249727159617835784b714f676e5758383145776b796a4c66733671354f36305a736b3755513167364136'),
    (UNICODE, '{BLF-CRYPT}$2y$04$wweqVfHpb4r5U9p/aIj7me46h0T1Rp0ROCmQ41aiPmDCXdAJ7xLhi'),
    (UNICODE, '{SSHA256}a1EFhBq3QjoIkck0xka84Ca7Etb2S9xemPMkcqYv63EKd+0q'),
    (UNICODE, '{SSHA512}vNfJE/nDbbJqaD3HAcZuLDJAw4wvh+N9XLoKFAkAdgrsxE2AV3Lw8L8lTTT96UfcmeLaVxfH1aD5b2BWF/Fk6I3F0k4='),
    (UNICODE, '{SSHA}J0SgNT5vALGyHTt8/NFnZojWhKwZzx0B'),
    (UNICODE, '{SMD5}C9gtbRz7CP1XxF3sOTc5T2omQRE='),
    (UNICODE, '{SHA512-CRYPT}$6$z6RMcHNvNHq7ZVCh$0t9mGLJAlGKo38tkw7f9zy7ILn6AzrIWqJSVF1MokPoYF6cQijCotk4C16unxnPvm939lvEvTfC5ERY0SZOLX0'),
    (UNICODE, '{SHA512-CRYPT}$6$rounds=1000$NUV39V5EgZjk0Wjn$lpxVeIt4nh9DlCjrFRq9WkcOCcaR9WEeqvIjkzxZP/ZqlKfhNBmSrkGc6JtOgOHLdprG6CJcWqEt.xdWKq.GA1'),
    (UNICODE, '{SHA256-CRYPT}$5$UXy9rsLLg8G/endu$ohpw2.Lt4TNhQPi6zD0XnSEAnGqiSKxiBhhGQcecs0A'),
    (UNICODE, '{MD5-CRYPT}$1$.U7SyJqC$b7.gkJIgejeHClv1haZ0v.'),
    (UNICODE, '{MD5}$1$6y4QDGHE$3UFIwWFqZCOE1sVJornuB.'),
    (UNICODE, '{CRYPT}$2y$04$fi10mXwZR4JjXe615FYuhOiU0Yq1xaqsp85SrH6kROUI8fXF/lmrm'),
    (UNICODE, '{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$eX9wdjsYVPVJrL6rJ3czaQ$/lW70rGvRPkmKKNQmHRYDYb3mYeSJzU0e6BmrYR/EG8'),
    (UNICODE, '{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$P1ngMaqpL80KWyJKvVzpDA$xNE19XZxPnA5uF0ogoW0MLcQpfdgZnZRoj+TM8LAkJQ'),
    (UNICODE, '{PLAIN-MD5}5463941adf3d494916b2d9cc96918606'),
    (UNICODE, '{LDAP-MD5}VGOUGt89SUkWstnMlpGGBg=='),
    (UNICODE, '{PLAIN-MD4}d3423e0714535efa1acc690041fe94d5'),
    (UNICODE, '{SHA}m+ujY6rp/40Nhjm/QOVpho0ciTk='),
    (UNICODE, '{SHA1}m+ujY6rp/40Nhjm/QOVpho0ciTk='),
    (UNICODE, '{SHA256}c6c42OEuamaxnj+veaZ04IiX6BwhRx7+57yfh404Nw0='),
    (UNICODE, '{SHA512}9NDJ6N8VPBNRlgMFrqlItMfUyEAwkV3PJEDko/wcg3JSgsTFPh31OyJRL1gV7isBSVvEs8B5vhmalBa63UAIpw=='),
    (UNICODE, '{CLEAR}Pässwörd €ß 日本'),
    (UNICODE, '{CLEARTEXT}Pässwörd €ß 日本'),
    (UNICODE, '{PLAIN}Pässwörd €ß 日本'),
    (UNICODE, '{PBKDF2}$1$oDDZhAYgYh9cw1Xs$1000$97c74507981a1f271d8f87134f0dc58fb451dc70'),
    (UNICODE, '{SHA256.HEX}73a738d8e12e6a66b19e3faf79a674e08897e81c21471efee7bc9f878d38370d'),
    (UNICODE, '{SSHA512.HEX}7948461c58468e755e35a391072c9149eaf95647621015251d8ebdcd47e232b64cbcde7ff1cbfe4c2eb166db8b784c78d656f94a524834caef947a8d003ef46de4223bc2'),
    (UNICODE, '{PLAIN-MD5.B64}VGOUGt89SUkWstnMlpGGBg=='),
    (UNICODE, '{SHA512.B64}9NDJ6N8VPBNRlgMFrqlItMfUyEAwkV3PJEDko/wcg3JSgsTFPh31OyJRL1gV7isBSVvEs8B5vhmalBa63UAIpw=='),
    (UNICODE, '{CLEAR.B64}UMOkc3N3w7ZyZCDigqzDnyDml6XmnKw='),
    (UNICODE, '{SSHA256.BASE64}yQMD7kXFDc0bgtcwOm2b/U12+3QPnAwZqiOoihdrag2z6dqT'),
    (UNICODE, '{BLF-CRYPT.HEX}2432792430342478705744473633654f4a6241526b72745962636c78757a516167412f7855674270423876663458344f4f6276736d794738744e396d'),
]


def _label(stored: str) -> str:
    return stored[1 : stored.index("}")]


def _vector_id(vector: tuple[str, str]) -> str:
    password, stored = vector
    return f"{_label(stored)}-{'ascii' if password == ASCII else 'utf8'}-{DOVEADM_VECTORS.index(vector)}"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _other(password: str) -> str:
    """The same password with its last character changed by one bit."""
    return password[:-1] + chr(ord(password[-1]) ^ 1)


def _vector(label: str, password: str = ASCII) -> str:
    return next(s for p, s in DOVEADM_VECTORS if p == password and _label(s) == label)


# --------------------------------------------------------------------------- doveadm's own hashes


@pytest.mark.parametrize("password, stored", DOVEADM_VECTORS, ids=[_vector_id(v) for v in DOVEADM_VECTORS])
def test_doveadm_hash_matches_its_password(password: str, stored: str) -> None:
    """A hash written by doveadm matches the password it was made from."""
    assert verify_password(stored, password) is True


@pytest.mark.parametrize("password, stored", DOVEADM_VECTORS, ids=[_vector_id(v) for v in DOVEADM_VECTORS])
def test_doveadm_hash_refuses_a_wrong_password(password: str, stored: str) -> None:
    """A hash written by doveadm does not match a password that differs in one bit of one character."""
    assert verify_password(stored, _other(password)) is False


def test_des_crypt_reads_eight_characters_like_libc() -> None:
    """DES-CRYPT looks at the first eight characters only, as libc crypt() does for dovecot."""
    stored = "{DES-CRYPT}NNyyvZQZy6X3c"  # doveadm pw -s DES-CRYPT -p 'correct horse battery staple'
    assert verify_password(stored, ASCII)
    assert verify_password(stored, "correct staple")
    assert not verify_password(stored, "correcT horse battery staple")


# --------------------------------------------------------------------------- from the definitions

# (scheme, hashlib name, salted): dovecot stores digest || salt, base64 unless the label says .HEX.
DIGEST_SCHEMES = [
    ("SHA", "sha1", False),
    ("SHA1", "sha1", False),
    ("SHA256", "sha256", False),
    ("SHA512", "sha512", False),
    ("PLAIN-MD5", "md5", False),
    ("LDAP-MD5", "md5", False),
    ("SMD5", "md5", True),
    ("SSHA", "sha1", True),
    ("SSHA256", "sha256", True),
    ("SSHA512", "sha512", True),
]


@pytest.mark.parametrize("password", [ASCII, UNICODE], ids=["ascii", "utf8"])
@pytest.mark.parametrize("scheme, algorithm, salted", DIGEST_SCHEMES, ids=[s[0] for s in DIGEST_SCHEMES])
def test_digest_scheme_computed_from_its_definition(scheme: str, algorithm: str, salted: bool, password: str) -> None:
    """hash(UTF-8 password || salt) || salt matches in base64 and in hex (.HEX, .B64, .BASE64 labels)."""
    salt = secrets.token_bytes(secrets.choice([4, 8, 16])) if salted else b""
    raw = hashlib.new(algorithm, password.encode("utf-8") + salt).digest() + salt
    for label, data in [
        (scheme, _b64(raw)),
        (f"{scheme}.B64", _b64(raw)),
        (f"{scheme}.BASE64", _b64(raw)),
        (f"{scheme}.HEX", raw.hex()),
        (f"{scheme}.hex", raw.hex().upper()),
    ]:
        stored = f"{{{label}}}{data}"
        assert verify_password(stored, password), stored
        assert not verify_password(stored, _other(password)), stored


@pytest.mark.parametrize("scheme, algorithm", [("SHA256", "sha256"), ("PLAIN-MD5", "md5"), ("LDAP-MD5", "md5"), ("SHA", "sha1")])
def test_unsalted_digest_encoding_is_guessed_by_length(scheme: str, algorithm: str) -> None:
    """Without an encoding suffix, a fixed-size digest is read as hex when twice its size, else base64."""
    raw = hashlib.new(algorithm, ASCII.encode()).digest()
    assert verify_password(f"{{{scheme}}}{raw.hex()}", ASCII)
    assert verify_password(f"{{{scheme}}}{_b64(raw)}", ASCII)
    assert not verify_password(f"{{{scheme}}}{raw.hex()}", _other(ASCII))


def test_ssha256_as_mailcow_php_writes_it() -> None:
    """mailcow's PHP hash_password salts SSHA256 with 16 hex characters; such a hash matches."""
    salt = secrets.token_hex(8).encode("ascii")
    stored = "{SSHA256}" + _b64(hashlib.sha256(ASCII.encode() + salt).digest() + salt)
    assert verify_password(stored, ASCII)
    assert not verify_password(stored, _other(ASCII))


def test_pbkdf2_computed_from_its_definition() -> None:
    """dovecot's PBKDF2 is "$1$salt$rounds$hex(PBKDF2-HMAC-SHA1(password, salt, rounds, 20))"."""
    salt = secrets.token_urlsafe(12)
    derived = hashlib.pbkdf2_hmac("sha1", UNICODE.encode(), salt.encode(), 1200, 20)
    stored = f"{{PBKDF2}}$1${salt}$1200${derived.hex()}"
    assert verify_password(stored, UNICODE)
    assert not verify_password(stored, _other(UNICODE))


def test_clear_schemes_compare_the_whole_text() -> None:
    """CLEAR, CLEARTEXT and PLAIN match the exact text only; .B64 and .HEX hold its UTF-8 bytes."""
    for label in ("CLEAR", "CLEARTEXT", "PLAIN", "plain"):
        stored = f"{{{label}}}{UNICODE}"
        assert verify_password(stored, UNICODE)
        assert not verify_password(stored, UNICODE[:-1])
        assert not verify_password(stored, UNICODE + "e")
        assert not verify_password(stored, UNICODE.upper())
    assert verify_password("{CLEAR.B64}" + _b64(UNICODE.encode()), UNICODE)
    assert verify_password("{CLEAR.HEX}" + UNICODE.encode().hex(), UNICODE)
    assert not verify_password("{CLEAR.HEX}" + UNICODE.encode().hex(), ASCII)


# --------------------------------------------------------------------------- bcrypt


def test_bcrypt_2y_2b_and_2a_prefixes_are_all_accepted() -> None:
    """The $2y$ that PHP and dovecot write, and the $2b$/$2a$ spellings of the same algorithm, all match."""
    stored = _vector("BLF-CRYPT")
    assert "$2y$04$" in stored
    for prefix in ("$2y$", "$2b$", "$2a$"):
        assert verify_password(stored.replace("$2y$", prefix), ASCII), prefix
        assert not verify_password(stored.replace("$2y$", prefix), _other(ASCII)), prefix


def test_bcrypt_package_hash_is_accepted_under_both_labels() -> None:
    """A $2b$ hash made by the bcrypt package matches under {BLF-CRYPT} and {CRYPT}."""
    hashed = bcrypt.hashpw(UNICODE.encode(), bcrypt.gensalt(rounds=4)).decode()
    assert hashed.startswith("$2b$04$")
    assert verify_password("{BLF-CRYPT}" + hashed, UNICODE)
    assert verify_password("{CRYPT}" + hashed, UNICODE)
    assert not verify_password("{BLF-CRYPT}" + hashed, ASCII)


def test_bcrypt_reads_72_bytes_like_dovecot() -> None:
    """Like crypt_blowfish in dovecot and PHP, bcrypt compares the first 72 bytes of the password."""
    hashed = "{BLF-CRYPT}" + bcrypt.hashpw(b"a" * 72, bcrypt.gensalt(rounds=4)).decode()
    assert verify_password(hashed, "a" * 72 + "anything after byte 72")
    assert not verify_password(hashed, "a" * 71 + "b")
    assert not verify_password(hashed, "a" * 71)


def test_crypt_string_decides_the_method_not_the_label() -> None:
    """As libc crypt() and PHP password_verify do, the crypt string's $id$ picks the method."""
    sha256_crypt = _vector("SHA256-CRYPT").split("}", 1)[1]
    md5_crypt = _vector("MD5-CRYPT").split("}", 1)[1]
    assert verify_password("{SHA512-CRYPT}" + sha256_crypt, ASCII)
    assert verify_password("{CRYPT}" + sha256_crypt, ASCII)
    assert verify_password("{MD5}" + md5_crypt, ASCII)
    assert not verify_password("{SHA512-CRYPT}" + sha256_crypt, _other(ASCII))


# --------------------------------------------------------------------------- passwords that never match


@pytest.mark.parametrize(
    "stored",
    [
        "{PLAIN}",
        "{CLEAR}",
        "{SHA256}" + _b64(hashlib.sha256(b"").digest()),
        "{SSHA256}" + _b64(hashlib.sha256(b"salt").digest() + b"salt"),
        "{BLF-CRYPT}" + bcrypt.hashpw(b"", bcrypt.gensalt(rounds=4)).decode(),
    ],
    ids=["plain", "clear", "sha256", "ssha256", "blf-crypt"],
)
def test_empty_password_never_matches(stored: str) -> None:
    """An empty password is refused even when the stored hash is the hash of the empty string."""
    assert verify_password(stored, "") is False


def test_password_with_nul_never_matches() -> None:
    """A password containing NUL (impossible in SASL PLAIN) is refused even against its own hash."""
    secret = "before\x00after"
    assert verify_password("{PLAIN}" + secret, secret) is False
    stored = "{SSHA256}" + _b64(hashlib.sha256(secret.encode() + b"salt").digest() + b"salt")
    assert verify_password(stored, secret) is False
    assert verify_password(stored, "before") is False


def test_password_that_is_not_utf8_text_never_matches() -> None:
    """A password with a lone surrogate has no UTF-8 form; it is refused without an exception."""
    assert verify_password(_vector("SSHA256"), ASCII + "\udc80") is False
    assert verify_password("{PLAIN}abc", "abc\udc80") is False


def test_overlong_password_never_matches() -> None:
    """A password longer than MAX_PASSWORD_BYTES is refused; one exactly that long is checked."""
    at_limit = "é" * (MAX_PASSWORD_BYTES // 2)
    assert verify_password("{PLAIN}" + at_limit, at_limit) is True
    over = at_limit + "x"
    assert verify_password("{PLAIN}" + over, over) is False


def test_password_is_compared_as_its_utf8_bytes_without_normalising() -> None:
    """dovecot hashes the bytes it receives: the NFD spelling of a password does not match its NFC hash."""
    decomposed = unicodedata.normalize("NFD", UNICODE)
    assert decomposed != UNICODE
    stored = _vector("SSHA256", UNICODE)
    assert verify_password(stored, UNICODE)
    assert not verify_password(stored, decomposed)


# --------------------------------------------------------------------------- labels and prefixes


def test_scheme_names_are_case_insensitive() -> None:
    """{ssha256}, {Blf-Crypt} and {sha512.b64} are read as dovecot reads them."""
    assert verify_password("{ssha256}" + _vector("SSHA256").split("}", 1)[1], ASCII)
    assert verify_password("{Blf-Crypt}" + _vector("BLF-CRYPT").split("}", 1)[1], ASCII)
    assert verify_password("{sha512.b64}" + _vector("SHA512.B64").split("}", 1)[1], ASCII)
    assert parse_stored("{sha512.b64}abc").scheme == "SHA512"
    assert parse_stored("{sha512.b64}abc").encoding == "b64"


def test_value_without_prefix_is_mailcows_default_ssha256() -> None:
    """A value with no {SCHEME} is SSHA256 (mailcow's dovecot default_pass_scheme)."""
    bare = _vector("SSHA256").split("}", 1)[1]
    assert parse_stored(bare).scheme == "SSHA256"
    assert verify_password(bare, ASCII)
    assert not verify_password(bare, _other(ASCII))
    # An unsalted SHA256 digest without a prefix is not silently accepted as SHA256.
    with pytest.raises(UnsupportedScheme):
        verify_password(_vector("SHA256").split("}", 1)[1], ASCII)


def test_value_without_prefix_starting_with_md5_crypt_id_is_md5_crypt() -> None:
    """dovecot reads a prefix-less "$1$..." value as MD5-CRYPT."""
    bare = _vector("MD5-CRYPT").split("}", 1)[1]
    assert bare.startswith("$1$")
    assert parse_stored(bare).scheme == "MD5-CRYPT"
    assert verify_password(bare, ASCII)
    assert not verify_password(bare, _other(ASCII))


@pytest.mark.parametrize(
    "stored, scheme",
    [
        ("{FOO}bar", "FOO"),
        ("{SCRAM-SHA-256}4096,c2FsdA==,a2V5,a2V5", "SCRAM-SHA-256"),
        ("{PLAIN-TRUNC}10-correct ho", "PLAIN-TRUNC"),
        ("{CRAM-MD5}" + "0" * 64, "CRAM-MD5"),
        ("{SHA256.ZZ}abc", "SHA256.ZZ"),
        ("{CRYPT}$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7", "CRYPT"),
    ],
)
@pytest.mark.parametrize("password", [ASCII, ""], ids=["password", "empty"])
def test_unknown_scheme_is_refused(stored: str, scheme: str, password: str) -> None:
    """An unknown scheme, encoding or crypt method raises UnsupportedScheme naming it, whatever the password."""
    with pytest.raises(UnsupportedScheme) as caught:
        verify_password(stored, password)
    assert caught.value.scheme == scheme


MALFORMED = [
    "",
    "{}abc",
    "{SSHA256",
    "{SSHA256}!!!!",
    "{SSHA256}YQ==",
    "{SSHA256}" + _b64(hashlib.sha256(b"x").digest()),
    "{SHA256}QQTTb42iwlQ0n4WDZ5Pr4CngyVcGOjTJHC6SAxh7VjE",
    "{PLAIN-MD5}0123456789abcdef",
    "{SHA256.HEX}zz",
    "{SHA1.HEX}abc",
    "{BLF-CRYPT}$2y$04$short",
    "{BLF-CRYPT}plainly-not-a-hash",
    "{SHA512-CRYPT}$6$",
    "{MD5-CRYPT}$1$",
    "{ARGON2I}$argon2i$v=19$m=x",
    "{ARGON2ID}$argon2d$v=19$m=65536,t=3,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
    "{PBKDF2}$1$salt$0$" + "0" * 40,
    "{PBKDF2}$1$salt$1000$zz",
    "{PBKDF2}nonsense",
    "{CLEAR.HEX}not hex",
    "{SHA512-CRYPT}$6$salt$h\u00e4sh",
    "{PLAIN}abc\udc80",
]


@pytest.mark.parametrize("stored", MALFORMED)
@pytest.mark.parametrize("password", [ASCII, ""], ids=["password", "empty"])
def test_malformed_stored_value_is_refused(stored: str, password: str) -> None:
    """A stored value that is malformed for its scheme raises UnsupportedScheme, whatever the password."""
    with pytest.raises(UnsupportedScheme):
        verify_password(stored, password)


def test_refusal_does_not_carry_the_stored_value() -> None:
    """UnsupportedScheme names the scheme and the reason, never the stored data."""
    with pytest.raises(UnsupportedScheme) as caught:
        verify_password("{SSHA256}SECRETDATA!", ASCII)
    assert "SECRETDATA" not in str(caught.value)
    assert "SECRETDATA" not in repr(caught.value)
    assert caught.value.scheme == "SSHA256"


# --------------------------------------------------------------------------- hash_password_blf


def test_hash_password_blf_writes_2y_and_verifies() -> None:
    """hash_password_blf writes {BLF-CRYPT}$2y$<cost>$ with a fresh salt; the hash matches only its password."""
    first = hash_password_blf(UNICODE, cost=4)
    second = hash_password_blf(UNICODE, cost=4)
    assert first.startswith("{BLF-CRYPT}$2y$04$")
    assert first != second
    assert verify_password(first, UNICODE)
    assert not verify_password(first, _other(UNICODE))


def test_hash_password_blf_uses_cost_10_by_default() -> None:
    """Without a cost, hash_password_blf uses mailcow's bcrypt cost of 10."""
    assert hash_password_blf("x").startswith("{BLF-CRYPT}$2y$10$")


@pytest.mark.parametrize("password", ["", "a\x00b", "a" * 73, "é" * 37], ids=["empty", "nul", "73-ascii", "74-bytes"])
def test_hash_password_blf_refuses_what_bcrypt_would_cut(password: str) -> None:
    """Empty passwords, NUL, and passwords over 72 UTF-8 bytes are refused instead of hashed in part."""
    with pytest.raises(ValueError):
        hash_password_blf(password, cost=4)


# --------------------------------------------------------------------------- doveadm at test time

FRESH_SCHEMES = [
    ["BLF-CRYPT", "-r", "4"],
    ["SSHA256"],
    ["SSHA512"],
    ["SSHA"],
    ["SMD5"],
    ["SHA512-CRYPT"],
    ["SHA256-CRYPT"],
    ["MD5-CRYPT"],
    ["ARGON2I"],
    ["ARGON2ID"],
    ["PLAIN-MD5"],
    ["LDAP-MD5"],
    ["PLAIN-MD4"],
    ["SHA"],
    ["SHA256"],
    ["SHA512"],
    ["SHA512.HEX"],
    ["CLEAR"],
    ["PLAIN"],
    ["PBKDF2", "-r", "1000"],
]


def _doveadm() -> str:
    """doveadm's path; missing, the test skips, except in CI where dovecot-core must be installed."""
    path = shutil.which("doveadm")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("doveadm is not on PATH but CI is set: install dovecot-core")
        pytest.skip("doveadm is not installed")
    return path


def _doveadm_hash(doveadm: str, args: list[str], password: str) -> str:
    argv: list[str | bytes] = [doveadm, "pw", "-s", *args, "-p", password.encode("utf-8")]
    out = subprocess.run(
        argv,
        capture_output=True,
        check=True,
        timeout=30,
    )
    return out.stdout.decode("utf-8").strip()


@pytest.mark.parametrize("args", FRESH_SCHEMES, ids=[a[0] for a in FRESH_SCHEMES])
def test_fresh_doveadm_hash_matches(args: list[str]) -> None:
    """A hash doveadm writes now, for a random non-ASCII password, matches it and not a near miss."""
    doveadm = _doveadm()
    password = "ünï " + secrets.token_urlsafe(12)
    stored = _doveadm_hash(doveadm, args, password)
    assert stored.upper().startswith("{" + args[0].upper() + "}")
    assert verify_password(stored, password)
    assert not verify_password(stored, _other(password))


def test_doveadm_accepts_hash_password_blf() -> None:
    """doveadm pw -t verifies the hash hash_password_blf writes, and rejects it for another password."""
    doveadm = _doveadm()
    password = "ünï " + secrets.token_urlsafe(12)
    stored = hash_password_blf(password, cost=4)

    def check(candidate: str) -> int:
        argv: list[str | bytes] = [doveadm, "pw", "-t", stored, "-p", candidate.encode("utf-8")]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    assert check(password) == 0
    assert check(_other(password)) != 0


# --------------------------------------------------------------------------- purity


def test_passwords_module_does_not_import_twisted() -> None:
    """The password core is pure: importing it loads no Twisted module."""
    code = "import sys, mailcow_smtp_api.core.passwords; print([m for m in sys.modules if m.split('.')[0] == 'twisted'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
