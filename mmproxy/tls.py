"""Server TLS contexts from the legacy SSL parameters.

The legacy MMP kept its certificate in an NSS database, which Python cannot read.  mmproxy takes PEM
or PKCS#12 files where the legacy layout would have them: ``SSLCacheDir/<SSLCertPrefix><nickname>.pem``
(or ``.p12``) for each of ``SSLCertNicknames``, or the file ``SSLCertFile`` names; the key is in the
same file unless ``SSLKeyFile`` names one; its password comes from ``SSLKeyPasswdFile`` in the
legacy ``Internal (Software) Token:secret`` format.  Wire I/O uses stdlib ``ssl`` (gevent cooperates
with it); cryptography is only used to read PKCS#12.
"""
from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from typing import TYPE_CHECKING, List, Optional, Tuple

from mmproxy.config.types import NSS_FILES
from mmproxy.errors import ConfigError

if TYPE_CHECKING:
    from mmproxy.config import ServiceConfig

NSS_HINT = ("export it to PKCS#12 with `pk12util -o Server-Cert.p12 -n Server-Cert -d <dir>` and put the file "
            "in SSLCacheDir as <SSLCertPrefix><nickname>.p12 (or name it with SSLCertFile)")
HANDSHAKE_TIMEOUT = 30.0


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


def server_context(cfg: ServiceConfig) -> ssl.SSLContext:
    """An SSLContext for STARTTLS and implicit-TLS listeners; ConfigError with the file at fault."""
    cert, keyfile = find_certificate(cfg)
    password = key_password(cfg.SSLKeyPasswdFile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    spec = (cfg.SSLCipherSpecs or "all").strip()
    if spec.lower() != "all":
        try:
            ctx.set_ciphers(spec)
        except ssl.SSLError:
            raise ConfigError("SSLCipherSpecs %r names no cipher OpenSSL knows" % spec) from None
    try:
        if cert.lower().endswith((".p12", ".pfx")):
            _load_pkcs12(ctx, cert, password)
        else:
            ctx.load_cert_chain(cert, keyfile, password=password)
    except (ssl.SSLError, ValueError) as e:
        hint = "" if password else "; is the key encrypted and SSLKeyPasswdFile missing?"
        raise ConfigError("%s: cannot load certificate/key (%s)%s"
                          % (cert, getattr(e, "reason", None) or e, hint)) from None
    except OSError as e:
        raise ConfigError("%s: %s" % (e.filename or cert, e.strerror)) from None
    return ctx
