"""Why a TLS connection to a directory host fails, in words an operator can act on.

libldap (built with GnuTLS, as Debian's is) reports a refused certificate as "Can't contact LDAP
server: (unknown error code)" (ldaps://) or "Connect error: (unknown error code)" (StartTLS): an
expired certificate, one for another host name and one from an unknown CA read like a dead server.
When such a host fails, the directory asks ``reason`` once (when the host goes down): a handshake of
its own with the standard library's ssl, over gevent's sockets (the hub is never blocked), with the
same CA file and host name, names what is wrong as OpenSSL words it.
"""
from __future__ import annotations

import ssl
from typing import Optional

import gevent
from gevent import socket as gsocket
from gevent import ssl as gssl

# RFC 4511 section 4.14.1: LDAPMessage { messageID 1, ExtendedRequest { requestName StartTLS OID } }
STARTTLS_REQUEST = bytes.fromhex("301d02010177188016") + b"1.3.6.1.4.1.1466.20037"


def _extended_result(answer: bytes) -> Optional[int]:
    """The resultCode of an ExtendedResponse ([APPLICATION 24]) in ``answer``; None when it is not one."""
    i = answer.find(b"\x78", 2)
    if i < 0 or i + 2 >= len(answer):
        return None
    j = i + 2 + (answer[i + 1] & 0x7F if answer[i + 1] & 0x80 else 0)     # skip a long-form length
    if answer[j:j + 2] != b"\x0a\x01" or j + 2 >= len(answer):
        return None
    return answer[j + 2]


def reason(host: str, port: int, starttls: bool, ca_file: Optional[str], timeout: float) -> Optional[str]:
    """What is wrong with TLS to ``host``:``port`` (after an LDAP StartTLS when ``starttls``), its
    certificate checked against ``ca_file`` (else the system's CAs) and for ``host``, as libldap
    does; None when the handshake succeeds or nothing can be said (no connection, no answer
    within ``timeout`` seconds)."""
    try:
        ctx = gssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as e:
        return "LdapCAFile %s cannot be read: %s" % (ca_file, getattr(e, "strerror", None) or e)
    timer = gevent.Timeout.start_new(timeout)
    try:
        with gsocket.create_connection((host, port), timeout=timeout) as sock:
            if starttls:
                sock.sendall(STARTTLS_REQUEST)
                code = _extended_result(sock.recv(4096))
                if code != 0:
                    return None if code is None else "StartTLS refused (LDAP result %d)" % code
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
    except gevent.Timeout as e:
        if e is not timer:
            raise
        return None
    except ssl.SSLCertVerificationError as e:
        return "certificate not accepted: %s" % (e.verify_message or e.reason)
    except ssl.SSLError as e:
        return "TLS handshake failed: %s" % (e.reason or e)
    except OSError:
        return None
    finally:
        timer.close()
