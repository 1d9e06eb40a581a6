"""Server TLS contexts from the legacy SSL parameters.

The legacy MMP kept its certificate in an NSS database, which Python cannot read.  mmproxy takes PEM
or PKCS#12 files where the legacy layout would have them: ``SSLCacheDir/<SSLCertPrefix><nickname>.pem``
(or ``.p12``) for each of ``SSLCertNicknames``, or the file ``SSLCertFile`` names; the key is in the
same file unless ``SSLKeyFile`` names one; its password comes from ``SSLKeyPasswdFile`` in the
legacy ``Internal (Software) Token:secret`` format.  Wire I/O uses stdlib ``ssl`` (gevent cooperates
with it); cryptography is only used to read PKCS#12 and to inspect certificates for ``check-config``.

Contexts are built when a service is (start and every ``refresh``): a refresh picks up renewed
certificate files for new connections, while established sessions keep the context they shook
hands with.  ``SSLMinVersion`` (TLS 1.2 unless lowered) and ``SSLCipherSpecs`` apply to every
context: the listeners', and the client side towards stores (``SSLBacksidePort``).
"""
from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

import gevent

from mmproxy.config.types import NSS_FILES
from mmproxy.errors import ConfigError

if TYPE_CHECKING:
    from mmproxy.config import ServiceConfig

NSS_HINT = ("export it to PKCS#12 with `pk12util -o Server-Cert.p12 -n Server-Cert -d <dir>` and put the file "
            "in SSLCacheDir as <SSLCertPrefix><nickname>.p12 (or name it with SSLCertFile)")
HANDSHAKE_TIMEOUT = 30.0     # the default of HandshakeTimeout
EXPIRY_WARNING_DAYS = 30     # check-config warns when the server certificate expires sooner
_VERSIONS = {"TLSv1": ssl.TLSVersion.TLSv1, "TLSv1.1": ssl.TLSVersion.TLSv1_1,
             "TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


class HandshakeTimeout(Exception):
    """A TLS handshake was not over within its deadline (not an OSError: callers tell it apart
    from a handshake that failed)."""


def handshake(ctx: ssl.SSLContext, sock: socket.socket, seconds: float, **kwargs: Any) -> ssl.SSLSocket:
    """``ctx.wrap_socket(sock, **kwargs)`` with the whole handshake bounded by ``seconds``.

    The ssl module's socket timeout counts per wait, so a peer that trickles its ClientHello (or
    its server flight) a byte at a time would hold a handshake for ever; one gevent.Timeout bounds
    the whole.  HandshakeTimeout when it passes; OSError or ssl.SSLError when the handshake fails.
    """
    sock.settimeout(seconds)
    message = "TLS handshake took more than %g s" % seconds
    tls = ctx.wrap_socket(sock, do_handshake_on_connect=False, **kwargs)
    try:
        with gevent.Timeout(seconds, HandshakeTimeout(message)):
            tls.do_handshake()
    except socket.timeout:
        tls.close()
        raise HandshakeTimeout(message) from None
    except BaseException:
        tls.close()                  # the socket is the SSLSocket's now: nobody else would close it
        raise
    return tls


def key_password(path: Optional[str]) -> Optional[bytes]:
    """The first secret of a legacy sslpassword.conf (``token:secret`` lines); None when absent."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith(b"#"):
                    return line.split(b":", 1)[1] if b":" in line else line
    except OSError as e:
        raise ConfigError("%s: cannot read: %s" % (path, e.strerror)) from None
    return None


def _candidates(cfg: ServiceConfig) -> List[str]:
    if cfg.SSLCertFile:
        return [cfg.SSLCertFile]
    base = cfg.SSLCacheDir or ""
    names = list(cfg.SSLCertNicknames or []) or ["Server-Cert"]
    prefix = cfg.SSLCertPrefix or ""
    return [os.path.join(base, prefix + n + ext) for n in names for ext in (".pem", ".p12", ".pfx")]


def find_certificate(cfg: ServiceConfig) -> Tuple[str, Optional[str]]:
    """(certificate file, key file or None) as the configuration names them; ConfigError if none."""
    cands = _candidates(cfg)
    for path in cands:
        if os.path.basename(path) in NSS_FILES:
            raise ConfigError("%s is an NSS database, which mmproxy cannot read: %s" % (path, NSS_HINT))
        if os.path.isfile(path):
            return path, cfg.SSLKeyFile or None
    nss = [f for f in NSS_FILES if cfg.SSLCacheDir and os.path.exists(os.path.join(cfg.SSLCacheDir, f))]
    hint = ("; %s holds an NSS database (%s): %s" % (cfg.SSLCacheDir, ", ".join(nss), NSS_HINT)) if nss else ""
    raise ConfigError("no server certificate: looked for %s%s" % (", ".join(cands), hint))


def _load_pkcs12(ctx: ssl.SSLContext, path: str, password: Optional[bytes]) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12
    with open(path, "rb") as f:
        key, cert, extra = pkcs12.load_key_and_certificates(f.read(), password)
    if key is None or cert is None:
        raise ConfigError("%s: PKCS#12 file holds no key and certificate" % path)
    # ssl.SSLContext loads only from files: write PEM into a private directory and remove it at once.
    d = tempfile.mkdtemp(prefix="mmproxy-tls-")
    try:
        pem = os.path.join(d, "chain.pem")
        with open(os.open(pem, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
            for c in [cert, *(extra or [])]:
                f.write(c.public_bytes(Encoding.PEM))
        ctx.load_cert_chain(pem)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _policy(ctx: ssl.SSLContext, cfg: ServiceConfig) -> ssl.SSLContext:
    """SSLMinVersion and SSLCipherSpecs on a context.  A version below TLS 1.2 also needs OpenSSL's
    security level 0 (its default level refuses the SHA-1 signatures of TLS 1.0/1.1)."""
    version = cfg.SSLMinVersion or "TLSv1.2"
    ctx.options |= ssl.OP_NO_COMPRESSION
    spec = (cfg.SSLCipherSpecs or "all").strip()
    legacy = _VERSIONS[version] < ssl.TLSVersion.TLSv1_2
    if spec.lower() == "all":
        spec = "DEFAULT:@SECLEVEL=0" if legacy else ""
    elif legacy and "@SECLEVEL" not in spec.upper():
        spec += ":@SECLEVEL=0"
    if spec:
        try:
            ctx.set_ciphers(spec)
        except ssl.SSLError:
            raise ConfigError("SSLCipherSpecs %r names no cipher OpenSSL knows" % spec) from None
    ctx.minimum_version = _VERSIONS[version]
    return ctx


def server_context(cfg: ServiceConfig) -> ssl.SSLContext:
    """An SSLContext for STARTTLS and implicit-TLS listeners; ConfigError with the file at fault.

    With CertmapFile and SSLClientCAFile, a client certificate is requested, not required
    (CERT_OPTIONAL: a client without one still gets its session; one that fails verification
    fails the handshake, as OpenSSL does)."""
    cert, keyfile = find_certificate(cfg)
    password = key_password(cfg.SSLKeyPasswdFile)
    ctx = _policy(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cfg)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if cfg.CertmapFile and cfg.SSLClientCAFile:
        try:
            ctx.load_verify_locations(cafile=cfg.SSLClientCAFile)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError("SSLClientCAFile %s: cannot load CA certificates (%s)"
                              % (cfg.SSLClientCAFile, getattr(e, "reason", None) or e)) from None
        ctx.verify_mode = ssl.CERT_OPTIONAL
    try:
        if cert.lower().endswith((".p12", ".pfx")):
            _load_pkcs12(ctx, cert, password)
        else:
            # never let OpenSSL prompt on a terminal for the pass phrase of an encrypted key
            ctx.load_cert_chain(cert, keyfile, password=password if password is not None else b"")
    except (ssl.SSLError, ValueError) as e:
        reason = str(getattr(e, "reason", None) or e)
        if "KEY_VALUES_MISMATCH" in reason.upper():
            raise ConfigError("%s: the private key%s does not match the certificate"
                              % (cert, " in %s" % keyfile if keyfile else "")) from None
        hint = "" if password else "; is the key encrypted and SSLKeyPasswdFile missing?"
        raise ConfigError("%s: cannot load certificate/key (%s)%s"
                          % (cert, getattr(e, "reason", None) or e, hint)) from None
    except OSError as e:        # OpenSSL's error names no file: a missing SSLKeyFile was blamed on the certificate
        raise ConfigError("%s: %s" % (e.filename or _unreadable(cert, keyfile) or cert, e.strerror)) from None
    return ctx


def _unreadable(*paths: Optional[str]) -> Optional[str]:
    """The first of ``paths`` (None ones skipped) that cannot be opened for reading, or None."""
    for path in paths:
        if path:
            try:
                open(path, "rb").close()
            except OSError:
                return path
    return None


def store_context(cfg: ServiceConfig) -> Optional[ssl.SSLContext]:
    """The client context towards stores on SSLBacksidePort (None when that is unset or 0).

    Without SSLBacksideCAFile the store's certificate is not verified (the legacy product did not
    either); with it, the certificate must chain to those CAs and name the store as its mailHost
    does (an IP address or a host name; RFC 6125)."""
    if not cfg.SSLBacksidePort:
        return None
    return client_context(cfg, cfg.SSLBacksideCAFile)


def client_context(cfg: ServiceConfig, cafile: Optional[str] = None) -> ssl.SSLContext:
    """A client context with the SSLMinVersion/SSLCipherSpecs policy: verifying the peer's
    certificate and name against ``cafile`` when given, else encryption without verification."""
    ctx = _policy(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cfg)
    if cafile:
        try:
            ctx.load_verify_locations(cafile=cafile)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError("%s: cannot load CA certificates (%s)"
                              % (cafile, getattr(e, "reason", None) or e)) from None
        ctx.check_hostname, ctx.verify_mode = True, ssl.CERT_REQUIRED
    else:
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


def certificate_problems(cfg: ServiceConfig, now: Optional[float] = None) -> List[Tuple[str, str]]:
    """(severity, message) about the server certificate for check-config: it loads with its key
    (``server_context`` says which file is at fault), it has expired (error) or expires within
    EXPIRY_WARNING_DAYS (warning)."""
    import datetime
    import time as _time

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import pkcs12
    try:
        server_context(cfg)
        path, _ = find_certificate(cfg)
    except ConfigError as e:
        return [("error", str(e))]
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.lower().endswith((".p12", ".pfx")):
            cert = pkcs12.load_key_and_certificates(data, key_password(cfg.SSLKeyPasswdFile))[1]
        else:
            cert = x509.load_pem_x509_certificate(data)
    except (OSError, ValueError):
        return []                     # it loaded into OpenSSL: nothing more to say about it
    if cert is None:
        return []
    when = datetime.datetime.fromtimestamp(_time.time() if now is None else now, datetime.timezone.utc)
    ends = cert.not_valid_after_utc
    subject = cert.subject.rfc4514_string()
    if ends <= when:
        return [("error", "%s: the certificate (%s) expired on %s" % (path, subject, ends.strftime("%Y-%m-%d")))]
    if cert.not_valid_before_utc > when:
        return [("error", "%s: the certificate (%s) is not valid before %s"
                 % (path, subject, cert.not_valid_before_utc.strftime("%Y-%m-%d")))]
    days = (ends - when).total_seconds() / 86400
    if days < EXPIRY_WARNING_DAYS:
        return [("warning", "%s: the certificate (%s) expires on %s, in %d day(s)"
                 % (path, subject, ends.strftime("%Y-%m-%d"), int(days)))]
    return []
