"""SASL and the other challenge-response logins, for IMAP, POP and SMTP.

Pure functions over bytes: decoding client responses (RFC 4422 section 3, base64 with ``=`` for an
empty initial response, RFC 4959), the PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login)
messages, CRAM-MD5 (RFC 2195) and APOP (RFC 1939 section 7) challenges and digests.  The exchange
itself (sending challenges, reading responses) is the session's; everything here raises only
``ClientSyntaxError`` for what a client sent, so one failure mapping answers it.

Credentials stay octet strings: a password is whatever bytes the client sent (an LDAP simple bind
takes an octet string, RFC 4511 section 4.2).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from typing import Tuple

from mmproxy.errors import ClientSyntaxError

# Mechanisms whose messages never carry the password or another reusable secret (a bearer token)
# itself: challenge-response, Kerberos, the TLS client certificate, no secret at all.  Before TLS,
# RestrictPlainPasswords allows these only; any other (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER, one
# nobody knows yet that an SMTP relay offers) is refused.
NO_SECRET_IN_CLEAR = frozenset({"CRAM-MD5", "DIGEST-MD5", "GSSAPI", "GS2-KRB5", "NTLM", "EXTERNAL", "ANONYMOUS"})


def secret_in_clear(mechanism: str) -> bool:
    """Whether a SASL mechanism (upper case, RFC 4422 name) may send the secret itself, so that
    RestrictPlainPasswords refuses it before TLS: every mechanism but NO_SECRET_IN_CLEAR and SCRAM
    (RFC 5802, RFC 7677)."""
    return mechanism not in NO_SECRET_IN_CLEAR and not mechanism.startswith("SCRAM-")
# The LOGIN mechanism's two challenges (what Outlook-era clients expect to be asked).
LOGIN_CHALLENGES = (b"Username:", b"Password:")


def is_cancel(line: bytes) -> bool:
    """A client response of ``*`` cancels the exchange (RFC 4422 section 3.5)."""
    return line.strip() == b"*"


def decode(response: bytes) -> bytes:
    """A base64 client response; ``=`` is an empty one.  ClientSyntaxError otherwise."""
    response = response.strip()
    if response == b"=":
        return b""
    try:
        return base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        raise ClientSyntaxError("Malformed SASL response (not base64)") from None


def encode(challenge: bytes) -> bytes:
    """A server challenge as it goes on the wire (without the protocol's ``+ `` or ``334 ``)."""
    return base64.b64encode(challenge)


def plain(message: bytes) -> Tuple[bytes, bytes, bytes]:
    """RFC 4616: ``authzid NUL authcid NUL passwd`` -> (authzid, authcid, password)."""
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise ClientSyntaxError("Malformed SASL PLAIN message")
    return parts[0], parts[1], parts[2]


def challenge() -> bytes:
    """A fresh RFC 2195 / RFC 1939 challenge: ``<random.microseconds@mmproxy>``."""
    return b"<%d.%d@mmproxy>" % (int.from_bytes(os.urandom(6), "big"), time.time_ns() // 1000)


def cram_md5_response(message: bytes) -> Tuple[bytes, str]:
    """RFC 2195: ``user SP hex-digest`` -> (user, digest in lower case)."""
    user, _, digest = message.rpartition(b" ")
    if not user or len(digest) != 32:
        raise ClientSyntaxError("Malformed CRAM-MD5 response")
    try:
        return user, digest.decode("ascii").lower()
    except UnicodeDecodeError:
        raise ClientSyntaxError("Malformed CRAM-MD5 response") from None


def cram_md5_digest(secret: bytes, challenge: bytes) -> str:
    """The digest a client knowing ``secret`` answers to ``challenge`` (HMAC-MD5, hex)."""
    return hmac.new(secret, challenge, hashlib.md5).hexdigest()


def apop_digest(timestamp: bytes, secret: bytes) -> str:
    """RFC 1939 APOP: MD5 of the greeting's timestamp followed by the secret, hex."""
    return hashlib.md5(timestamp + secret).hexdigest()


def digest_matches(expected: str, given: str) -> bool:
    """Constant-time comparison of two hex digests, any case."""
    return hmac.compare_digest(expected.lower().encode(), given.lower().encode())
