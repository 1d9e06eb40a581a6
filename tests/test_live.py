"""A live view: ``mmproxy status``, ``who`` and ``kick`` over the control socket, against real IMAP
and POP sessions through a real mmproxy (one process, and NumThreads 2)."""
import json
import os
import pwd
import socket
import stat
import subprocess
import sys
import time

from mmproxy import control
from mmproxy.testing.proxy import Proxy

from helpers import RawClient, imap_login, pop_login, until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mmproxy(p, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "mmproxy", *args, "--config-dir", p.config_dir],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def status(p):
    r = mmproxy(p, "status", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def who(p, *args):
    r = mmproxy(p, "who", "--json", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_status_who_kick_imap_and_pop(mail_stack):
    alice, erin = mail_stack.info()["users"]["alice"], mail_stack.info()["users"]["erin"]
    with Proxy(mail_stack.info(), pop={}) as p:
        bad = RawClient(p.host, p.imap_port)
        bad.expect(b"* OK")
        bad.send(b'b LOGIN alice "wrong"\r\n')
        assert bad.expect(b"b ").startswith(b"b NO [AUTHENTICATIONFAILED]")
        waiting = RawClient(p.host, p.pop_port)               # connected, not logged in
        waiting.expect(b"+OK")
        i = imap_login(p, "alice", alice["password"], source="127.0.0.51")
        i2 = imap_login(p, "erin", erin["password"], source="127.0.0.52")
        o = pop_login(p, "alice", alice["password"], source="127.0.0.53")

        info = status(p)
        assert info["running"] and info["pid"] == p.proc.pid
        [w] = info["workers"]
        assert w["worker"] == "main" and w["pid"] == p.proc.pid
        assert {(x["service"], x["address"], x["tls"]) for x in w["listeners"]} == {
            ("imap", "127.0.0.1:%d" % p.imap_port, False), ("pop", "127.0.0.1:%d" % p.pop_port, False)}
        assert w["services"]["imap"] == {"pre_login": 1, "relaying": 2, "logins": 2, "failures": 1}
        assert w["services"]["pop"] == {"pre_login": 1, "relaying": 1, "logins": 1, "failures": 0}
        assert w["logins_by_outcome"]["imap"] == {"ok": 2, "auth_failed": 1}
        assert info["total"] == w["services"]
        text = mmproxy(p, "status").stdout
        assert "running, pid %d" % p.proc.pid in text
        assert "  main     %-7d" % p.proc.pid in text

        rows = who(p)
        assert sorted((r["user"], r["client"].rsplit(":", 1)[0], r["service"]) for r in rows) == [
            ("alice@example.com", "127.0.0.51", "imap"), ("alice@example.com", "127.0.0.53", "pop"),
            ("erin@example.com", "127.0.0.52", "imap")]
        mine = next(r for r in rows if r["client"] == "%s:%d" % i.sock.getsockname())
        assert mine["store"] == "127.0.0.2:%d" % mail_stack.imap_port and mine["worker"] is None
        assert mine["bytes_in"] > 0 and mine["bytes_out"] > 0 and abs(mine["since"] - time.time()) < 30
        assert [r["client"] for r in who(p, "--user", "erin")] == ["%s:%d" % i2.sock.getsockname()]
        assert [r["user"] for r in who(p, "--user", "ERIN@example.com")] == ["erin@example.com"]
        assert [r["service"] for r in who(p, "--ip", "127.0.0.53")] == ["pop"]
        assert len(who(p, "--ip", "127.0.0.48/29")) == 3 and who(p, "--user", "nobody") == []
        table = mmproxy(p, "who").stdout
        assert "alice@example.com" in table and "3 session(s)" in table
        bad_ip = mmproxy(p, "who", "--ip", "not-an-address")
        assert bad_ip.returncode != 0 and "not an address or network" in bad_ip.stderr

        r = mmproxy(p, "kick", "alice")
        assert r.returncode == 0 and r.stdout == "main: 2 session(s) closed\n", r.stdout + r.stderr
        i.expect_lines("* BYE Disconnected by the administrator.")
        i.expect_close()
        o.expect_lines("-ERR Disconnected by the administrator.")
        o.expect_close()
        i2.send(b"c NOOP\r\n")                                # the others go on
        assert i2.skip_to(b"c ").startswith(b"c OK")
        r = mmproxy(p, "kick", "127.0.0.52")
        assert r.stdout == "main: 1 session(s) closed\n"
        i2.expect_lines("* BYE Disconnected by the administrator.")
        i2.expect_close()
        assert mmproxy(p, "kick", "127.0.0.52").stdout == "main: 0 session(s) closed\n"
        until(lambda: status(p)["total"]["imap"]["relaying"] == 0)
        waiting.send(b"QUIT\r\n")                             # not a logged-in session: not kicked
        waiting.expect_lines("+OK Bye")
    r = mmproxy(p, "status")
    assert r.returncode == 3 and "not running" in r.stdout
    assert not os.path.exists(control.directory(p.config_dir))
    assert mmproxy(p, "who").returncode == 1


def test_two_workers_listed_and_kicked(mail_stack):
    alice = mail_stack.info()["users"]["alice"]
    with Proxy(mail_stack.info(), pop={}, aservice={"NumThreads": 2}) as p:
        until(lambda: len(os.listdir(control.directory(p.config_dir))) == 2)
        clients, seen = [], set()
        for k in range(40):                                   # the kernel spreads them over both workers
            c = imap_login(p, "alice", alice["password"], source="127.0.0.%d" % (60 + k % 4))
            clients.append(c)
            seen = {r["worker"] for r in who(p)} if k >= 3 and k % 4 == 3 else seen
            if seen == {0, 1}:
                break
        assert seen == {0, 1}, "every session went to one worker"
        clients.append(pop_login(p, "alice", alice["password"], source="127.0.0.70"))
        rows = who(p)
        assert len(rows) == len(clients) and {r["user"] for r in rows} == {"alice@example.com"}
        info = status(p)
        assert [w["worker"] for w in info["workers"]] == ["w0", "w1"]
        n = len(clients) - 1
        assert info["total"]["imap"]["relaying"] == n and info["total"]["imap"]["logins"] == n
        assert sum(w["services"].get("imap", {}).get("relaying", 0) for w in info["workers"]) == n
        per_worker = {w: sum(1 for r in rows if r["worker"] == int(w[1:])) for w in ("w0", "w1")}
        text = mmproxy(p, "status").stdout
        assert "  total " in text
        r = mmproxy(p, "kick", "alice@example.com")
        assert r.stdout == "w0: %d session(s) closed\nw1: %d session(s) closed\ntotal: %d session(s) closed\n" % (
            per_worker["w0"], per_worker["w1"], len(clients)), r.stdout
        for c in clients[:-1]:
            c.expect_lines("* BYE Disconnected by the administrator.")
            c.expect_close()
        clients[-1].expect_lines("-ERR Disconnected by the administrator.")
        clients[-1].expect_close()
        assert who(p) == []
        # a worker that dies: its replacement takes its socket over
        victim = info["workers"][1]["pid"]
        os.kill(victim, 9)
        until(lambda: [w["worker"] for w in status(p)["workers"]] == ["w0", "w1"]
              and status(p)["workers"][1]["pid"] != victim)


def test_control_socket_only_for_root_and_the_run_as_user(mail_stack, tmp_path):
    nobody = pwd.getpwnam("nobody")
    p = Proxy(mail_stack.info(), aservice={"BeTheUser": "nobody", "BeTheGroup": "nogroup"})
    os.chmod(p.log_dir, 0o777)
    target = tmp_path / "not-yours"                # a link planted at the directory's name is not followed
    target.mkdir(mode=0o755)
    os.symlink(str(target), control.directory(p.config_dir))
    with p:
        assert os.stat(target).st_uid == 0 and stat.S_IMODE(os.stat(target).st_mode) == 0o755
        assert not os.path.islink(control.directory(p.config_dir)) and os.listdir(target) == []
        path = control.socket_path(p.config_dir, None)
        until(lambda: os.path.exists(path))
        d, s = os.stat(control.directory(p.config_dir)), os.stat(path)
        assert stat.S_IMODE(d.st_mode) == 0o700 and (d.st_uid, d.st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600 and s.st_uid == nobody.pw_uid
        assert status(p)["workers"][0]["pid"] == p.proc.pid          # root may
        assert _ask_as(nobody.pw_uid, nobody.pw_gid, path) == "ok"   # the BeTheUser account may
        other = _other_user()
        assert _ask_as(other.pw_uid, other.pw_gid, path) == "PermissionError"
        # requests that do not fit are answered, never raised
        assert _raw(path, b"garbage\n")["error"].startswith("request is not JSON")
        assert _raw(path, b'{"cmd": "reboot"}\n')["error"].startswith("unknown cmd 'reboot'")
        assert _raw(path, b"x" * 5000)["error"] == "request longer than 4096 octets"
        assert _raw(path, b'{"cmd": "kick"}\n')["error"] == "kick needs a user or an address"
        start = time.monotonic()
        assert _raw(path, b'{"cmd": ', timeout=15)["error"] == "no complete request within 5s"
        assert time.monotonic() - start < 10
        assert p.proc.poll() is None and "Traceback" not in p.output()


def _other_user():
    for name in ("daemon", "bin", "sys", "games", "man"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid not in (0, pwd.getpwnam("nobody").pw_uid):
            return pw
    raise AssertionError("no other account to test with")


_ASK = """
import json, socket, sys
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sys.argv[1])
    s.sendall(b'{"cmd": "status"}\\n')
    print("ok" if json.loads(s.makefile("rb").readline()).get("ok") else "refused")
except Exception as e:
    print(type(e).__name__)
"""


def _ask_as(uid, gid, path):
    """Connect to ``path`` from a process running as ``uid``: "ok", or the error's name."""
    r = subprocess.run([sys.executable, "-c", _ASK, path], user=uid, group=gid, extra_groups=[],
                       capture_output=True, text=True, timeout=20, cwd="/")
    return r.stdout.strip() or r.stderr


def _raw(path, data, timeout=5):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(data)
    answer = s.makefile("rb").readline()
    s.close()
    return json.loads(answer)
