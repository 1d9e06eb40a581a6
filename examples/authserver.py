#!/usr/bin/env python3
"""An example third-party authentication server for mmproxy (AuthenticationServer), speaking
MMPAUTH version 1 (docs/authentication-server.md).  Standard library only.

It checks each login against a users file and may rewrite the user id the proxy replays to the
store.  One line per user, blank-separated fields, each percent-encoded as in the protocol (so a
password may hold blanks or any octet), ``#`` starts a comment line:

    # user (as the proxy sends it: user@domain)   password       [user id for the store]
    alice@example.com                               alice-pw
    latin@example.com                               p%E4sswort     latin
    carol@example.org                               carol%20pw     carol-store@example.org

The file is read at every request, so edits take effect at once.  Run it on the proxy's machine on
a port only the proxy may reach (the protocol is not encrypted):

    python3 examples/authserver.py --listen 127.0.0.1:5600 --users /etc/mmproxy/tpauth-users
    # ImapProxyAService.cfg and PopProxyAService.cfg
    default:PreAuth yes
    default:AuthenticationServer 127.0.0.1:5600

One thread per connection (socketserver); a connection carries one request and is closed after
the answer.  The log (stderr) has one line per request, never a password.
"""
from __future__ import annotations

import argparse
import hmac
import socketserver
import sys
import time
from typing import Dict, Optional, Tuple
from urllib.parse import quote_from_bytes, unquote_to_bytes

MAX_REQUEST = 65536       # octets of a request line: the protocol's limit
READ_TIMEOUT = 10.0       # seconds a client may take to send its request


def decode(value: str) -> bytes:
    return unquote_to_bytes(value)


def encode(value: bytes) -> str:
    return quote_from_bytes(value, safe="-._~@:")


def load_users(path: str) -> Dict[bytes, Tuple[bytes, Optional[bytes]]]:
    """{user: (password, new user id or None)} from the users file (OSError when unreadable)."""
    users = {}
    with open(path, encoding="ascii", errors="strict") as f:
        for line in f:
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) not in (2, 3):
                raise OSError("%s: a line needs 2 or 3 fields: user password [new-id]" % path)
            new = decode(fields[2]) if len(fields) == 3 else None
            users[decode(fields[0])] = (decode(fields[1]), new)
    return users


def answer(request: bytes, users_file: str) -> Tuple[str, str]:
    """(answer line, what to log) for one request line (without its CR LF)."""
    words = request.decode("ascii", "replace").split(" ")
    if len(words) < 2 or words[0] != "MMPAUTH":
        return "TEMP not an MMPAUTH request", "garbage request"
    if words[1] != "1":
        return "TEMP unsupported version", "version %r" % words[1][:10]
    fields = dict(w.partition("=")[::2] for w in words[2:])      # fields it does not know are ignored
    user, password = decode(fields.get("user", "")), decode(fields.get("password", ""))
    attrs = ",".join(dict.fromkeys(w.partition("=")[0][5:] for w in words[2:] if w.startswith("attr.")))
    who = "user=%s service=%s client=%s attrs=%s" % (fields.get("user", "-"), fields.get("service", "-"),
                                                     fields.get("client", "-"), attrs or "-")
    try:
        users = load_users(users_file)
    except (OSError, UnicodeDecodeError) as e:
        return "TEMP users file unreadable", "%s: TEMP (%s)" % (who, e)
    known = users.get(user)
    # compare even for an unknown user, so the time taken does not tell who exists
    expected, new = known if known is not None else (b"\0unknown", None)
    if not hmac.compare_digest(password, expected) or known is None:
        return "NO wrong user or password", "%s: NO" % who
    if new is None:
        return "OK", "%s: OK" % who
    return "OK " + encode(new), "%s: OK as %s" % (who, encode(new))


class Handler(socketserver.StreamRequestHandler):
    server: "Server"

    def handle(self) -> None:
        self.connection.settimeout(READ_TIMEOUT)
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
        except OSError:
            return
        if not line.endswith(b"\n") or len(line) > MAX_REQUEST:
            return                                   # over-long, cut short or timed out: no answer
        reply, note = answer(line.rstrip(b"\r\n"), self.server.users_file)
        print("%s %s %s" % (time.strftime("%Y-%m-%d %H:%M:%S"), self.client_address[0], note),
              file=sys.stderr, flush=True)
        try:
            self.wfile.write(reply.encode("ascii") + b"\r\n")
        except OSError:
            pass


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: Tuple[str, int], users_file: str) -> None:
        self.users_file = users_file
        super().__init__(address, Handler)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:5600", help="host:port to listen on (default %(default)s)")
    ap.add_argument("--users", required=True, help="the users file")
    args = ap.parse_args()
    host, _, port = args.listen.rpartition(":")
    load_users(args.users)                           # a broken file stops it here, not at the first login
    with Server((host.strip("[]"), int(port)), args.users) as server:
        print("listening on %s" % args.listen, file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
