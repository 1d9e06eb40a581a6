"""The README's first command: a working local stack with mmproxy in front, and how to use it.

slapd with two hosted domains, two Dovecot stores, and mmproxy started from a legacy configuration
tree, all on loopback.  ``--check`` logs in once through the proxy and exits (a smoke test).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from .base import port_open
from .directory import password_label
from .proxy import Proxy, make_cert
from .stack import MailStack


def _port(preferred: int) -> int:
    return 0 if port_open("127.0.0.1", preferred) else preferred


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo", description=__doc__)
    ap.add_argument("--check", action="store_true", help="log in once through the proxy, then stop")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    with MailStack(users=4, keep=args.keep, postfix=True) as stack:
        info = stack.info()
        cert = make_cert(os.path.join(stack.workdir, "tls"))
        with Proxy(info, tls=cert, workdir=os.path.join(stack.workdir, "mmproxy"),
                   imap={"BGPenalty": 2}, pop={"BGPenalty": 2},          # BadGuys as the legacy default
                   imap_port=_port(1143), imaps_port=_port(1993),
                   pop_port=_port(1110), pops_port=_port(1995),
                   smtp={"SmtpRelays": "%s:%d" % (info["smtp"]["host"], info["smtp"]["port"]),
                         "SmtpProxyPassword": "demo"}, smtp_port=_port(1025), smtps_port=_port(1465)) as proxy:
            alice, carol = info["users"]["alice"], info["users"]["carol"]
            print(f"""
mmproxy is running in front of a local directory and two mail stores.

  IMAP   127.0.0.1:{proxy.imap_port}  (STARTTLS)     IMAPS  127.0.0.1:{proxy.imaps_port}  (self-signed certificate)
  POP3   127.0.0.1:{proxy.pop_port}  (STLS)         POP3S  127.0.0.1:{proxy.pops_port}
  SMTP   127.0.0.1:{proxy.smtp_port}  (STARTTLS)     SMTPS  127.0.0.1:{proxy.smtps_port}  -> Postfix at {info['smtp']['host']}:{info['smtp']['port']} (XCLIENT)
  LDAP   {info['ldap']['url']}  (o=internet; hosted domains, aliases among them: README, Directory layouts)
  stores 127.0.0.2:{info['imap_port']} and 127.0.0.3:{info['imap_port']} (Dovecot)

  configuration  {proxy.config_dir}   (legacy AService.cfg and the three service files)
  logs           {proxy.log_dir}

Users (the proxy finds each one's store by mailHost):
""")  # noqa: E501 -- the listing's lines are as wide as they print
            for u in info["users"].values():
                if u["mailhost"] and not u["uid"].startswith("user"):
                    line = "  %-22s password %-12s store %s" % (u["uid"] + "@" + u["domain"], password_label(u),
                                                                     u["mailhost"])
                    print(line + ("   " + u["note"] if u["note"] else ""))
            print(f"""
Try:
  curl -u alice:{alice['password']} imap://127.0.0.1:{proxy.imap_port}/INBOX
  curl -u alice:{alice['password']} 'imap://127.0.0.1:{proxy.imap_port}/INBOX;UID=1'
  curl -k -u 'carol@example.org:{carol['password']}' 'imaps://127.0.0.1:{proxy.imaps_port}/INBOX;UID=1'
  curl -u alice:{alice['password']} pop3://127.0.0.1:{proxy.pop_port}/1
  printf 'Subject: hi\\r\\n\\r\\nhello\\r\\n' | curl -sS smtp://127.0.0.1:{proxy.smtp_port} --mail-from you@example.org --mail-rcpt bob@example.com -T -
  curl -u 'carol@example.info:{carol['password']}' imap://127.0.0.1:{proxy.imap_port}/INBOX     (an alias of example.org)
  openssl s_client -quiet -starttls imap -connect 127.0.0.1:{proxy.imap_port}
""" + ("" if args.check else f"""  .venv/bin/mmproxy check-config --config-dir {proxy.config_dir}
"""), flush=True)  # noqa: E501 -- whole commands, to copy
            if args.check:
                out = subprocess.run(["curl", "-sS", "--max-time", "10", "-u", "alice:" + alice["password"],
                                      "imap://127.0.0.1:%d/INBOX;UID=1" % proxy.imap_port],
                                     capture_output=True, text=True)
                ok = out.returncode == 0 and "Welcome alice on 127.0.0.2" in out.stdout
                sent = subprocess.run(["curl", "-sS", "--max-time", "10", "smtp://127.0.0.1:%d" % proxy.smtp_port,
                                       "--mail-from", "you@example.org", "--mail-rcpt", "bob@example.com", "-T", "-"],
                                      input="Subject: hi\r\n\r\nhello\r\n", capture_output=True, text=True)
                ok_smtp = sent.returncode == 0
                print("check: %s" % ("OK, alice's message came from 127.0.0.2 through mmproxy, and a message to "
                                     "bob went through mmproxy to Postfix" if ok and ok_smtp
                                     else "FAILED: %s%s%s" % (out.stderr, sent.stderr, proxy.output()[-2000:])))
                return 0 if ok and ok_smtp else 1
            print("Press Ctrl-C to stop everything.", flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            try:
                while not stop.wait(0.5):
                    if proxy.proc is None or proxy.proc.poll() is not None:
                        print("mmproxy exited:\n" + proxy.output()[-3000:], file=sys.stderr)
                        return 1
            except KeyboardInterrupt:
                pass
            print("\nstopping...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
