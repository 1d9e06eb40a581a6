"""python -m mmproxy.testing up [--keep] [--users N] [--large-bytes B] [--info-file F]

Starts a MailStack (slapd + two Dovecot stores on loopback), prints how to reach it, and runs
until Ctrl-C or SIGTERM, then stops everything it started.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from types import FrameType
from typing import List, NoReturn, Optional

from .base import MissingBinary
from .directory import password_label
from .stack import MailStack


def describe(info: dict) -> str:
    """The stack's info() as text for a human."""
    ld = info["ldap"]
    out = [
        "mmproxy test stack (workdir %s)" % info["workdir"],
        "",
        "LDAP      %s   suffix %s" % (ld["url"], ld["suffix"]),
        "          proxy bind: %s / %s" % (ld["bind_dn"], ld["bind_pw"]),
        "          root:       %s / %s" % (ld["root_dn"], ld["root_pw"]),
        "          e.g. ldapsearch -x -H %s -D '%s' -w %s -b %s '(uid=alice)'"
        % (ld["url"], ld["bind_dn"], ld["bind_pw"], ld["suffix"]),
        "          log: %s" % ld["log"],
        "",
        "Stores    (same ports on every store: imap %d, pop3 %d, lmtp %s)"
        % (info["imap_port"], info["pop3_port"], info["lmtp_port"]),
    ]
    for ip, st in info["stores"].items():
        out.append("  %-10s imap %s:%d  pop3 %s:%d  log %s" % (ip, ip, st["imap"], ip, st["pop3"], st["log"]))
        out.append("             e.g. curl 'imap://%s:%d/INBOX;UID=1' -u '<store login>:<password>'"
                   % (ip, st["imap"]))
    if info.get("smtp"):
        sm = info["smtp"]
        out += ["", "SMTP      Postfix %s:%d (mynetworks %s; users' mail goes by LMTP to their store, the rest to %s)"
                % (sm["host"], sm["port"], sm["mynetworks"], sm["sink"])]
    out += ["", "Domains"]
    for name, d in info["domains"].items():
        extra = ", ".join("%s: %s" % (k, " ".join(v)) for k, v in d["attrs"].items())
        out.append("  %-12s %s  users under %s%s"
                   % (name, d["dn"], d["people_dn"], ("  (" + extra + ")") if extra else ""))
    out += ["", "Users     %-24s %-18s %-12s %s" % ("login", "store login", "mailHost", "password")]
    for u in info["users"].values():
        out.append("          %-24s %-18s %-12s %s"
                   % (u["login"], u["store_login"], u["mailhost"] or "-", password_label(u)))
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mmproxy.testing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the stack and run until Ctrl-C / SIGTERM")
    up.add_argument("--keep", action="store_true", help="keep the temp dir (logs, mailboxes) afterwards")
    up.add_argument("--users", type=int, default=10, help="numbered users user1..userN (default 10)")
    up.add_argument("--large-bytes", type=int, default=0, help="add a message of about this size to every INBOX")
    up.add_argument("--postfix", action="store_true", help="also start a Postfix relay (delivers to the stores)")
    up.add_argument("--info-file", help="also write info() as JSON to this file")
    args = ap.parse_args(argv)

    def on_term(signum: int, frame: Optional[FrameType]) -> NoReturn:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    stack = MailStack(users=args.users, keep=args.keep, large_bytes=args.large_bytes, postfix=args.postfix)
    try:
        stack.start()
    except MissingBinary as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    try:
        info = stack.info()
        print(describe(info), flush=True)
        if args.info_file:
            with open(args.info_file, "w") as f:
                json.dump(info, f, indent=1)
        print("\nrunning; Ctrl-C or SIGTERM stops everything", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        print("stopped%s" % ((" (kept %s)" % stack.dir) if args.keep else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
