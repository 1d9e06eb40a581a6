"""The daily log files: a new file when the date changes in a running daemon, the old one closed.

The end-to-end test moves the clock of a real ``mmproxy start --foreground`` with libfaketime
(Debian's ``faketime`` package; scripts/setup-system installs it): ``FAKETIME_TIMESTAMP_FILE``
re-read on every call (``FAKETIME_NO_CACHE=1``), so the test sets the daemon's date while it runs.
The daemon runs in a time zone other than UTC, so the local date, not UTC's, is proven to decide.
"""
import logging
import os
import time

from mmproxy import logs
from mmproxy.testing.proxy import Proxy

from helpers import TZ, RawClient, libfaketime, open_logs, set_clock, wait_for_log


def _record(msg, when):
    r = logging.LogRecord("mmproxy.imap", logging.INFO, __file__, 1, msg, None, None)
    r.created, r.msecs, r.ctx = when, (when % 1) * 1000, "imap"
    return r


def test_records_on_both_sides_of_local_midnight(tmp_path, local_tz):
    """The record's own time in the local zone names the file: 23:59:59.75 and 00:00:00.25 local
    land in two files, although both are 2026-12-31 in UTC; the first file is closed."""
    midnight = time.mktime((2027, 1, 1, 0, 0, 0, 0, 0, -1))
    assert time.strftime("%Y-%m-%d %H:%M", time.gmtime(midnight)) == "2026-12-31 18:30"
    h = logs.DailyFile(str(tmp_path), "ImapProxy")
    h.setFormatter(logs._Formatter(logs.FORMAT))
    h.emit(_record("before", midnight - 0.25))
    first = h.stream
    h.emit(_record("after", midnight + 0.25))
    h.close()
    assert first.closed
    assert sorted(os.listdir(tmp_path)) == ["ImapProxy_20261231.log", "ImapProxy_20270101.log"]
    assert (tmp_path / "ImapProxy_20261231.log").read_text() == "2026-12-31 23:59:59,750 INFO [imap] before\n"
    assert (tmp_path / "ImapProxy_20270101.log").read_text() == "2027-01-01 00:00:00,250 INFO [imap] after\n"


def imap_session(p, user, password, payload):
    """LOGIN, a message of ``payload`` octets through APPEND and back through FETCH (bulk data both
    ways: the relay moves it by splice), LOGOUT."""
    r = RawClient(p.host, p.imap_port, timeout=30)
    r.expect(b"* OK")
    pw = password.encode()
    r.send(b"a LOGIN %s {%d+}\r\n%s\r\n" % (user.encode(), len(pw), pw))
    r.expect(b"a OK ")
    r.send(b"b CREATE faketime\r\n")
    r.skip_to(b"b ")
    body = b"Subject: bulk\r\n\r\n" + (b"x" * 70 + b"\r\n") * (payload // 72)
    r.send(b"c APPEND faketime {%d}\r\n" % len(body))
    r.expect(b"+ ")
    r.send(body + b"\r\n")
    assert r.skip_to(b"c ").startswith(b"c OK")
    r.send(b"d SELECT faketime\r\n")
    assert r.skip_to(b"d ").startswith(b"d OK")
    r.send(b"e FETCH 1 BODY.PEEK[]\r\n")
    assert r.expect(b"* 1 FETCH ").endswith(b"{%d}\r\n" % len(body))
    while len(r.buf) < len(body):
        r.buf += r.sock.recv(65536)
    got, r.buf = r.buf[:len(body)], r.buf[len(body):]
    assert got == body
    assert r.skip_to(b"e ").startswith(b"e OK")
    r.send(b"f CLOSE\r\ng DELETE faketime\r\nh LOGOUT\r\n")
    assert r.skip_to(b"g ").startswith(b"g OK")
    r.expect(b"* BYE")


def test_new_file_when_the_date_changes_in_a_running_daemon(mail_stack, tmp_path, local_tz):
    """A real daemon whose clock passes local midnight: lines just before it stay in the old day's
    file, lines just after go to a new one, and the old file's descriptor is closed."""
    info = mail_stack.info()
    clock = str(tmp_path / "faketime")
    set_clock(clock)
    p = Proxy(info, imap={"LogLevel": 2})
    p.wrapper = ["env", "TZ=" + TZ, "LD_PRELOAD=" + libfaketime(), "FAKETIME_TIMESTAMP_FILE=" + clock,
                 "FAKETIME_NO_CACHE=1"]
    alice, bob = info["users"]["alice"], info["users"]["bob"]
    with p:
        set_clock(clock, "2026-12-31 23:59:40")
        imap_session(p, "alice", alice["password"], 300000)
        wait_for_log(p, "(state relaying, user alice@example.com, store ")
        assert open_logs(p.proc.pid) == sorted(["ImapProxy_20261231.log", "AService_%s.log" % _started(p)])
        set_clock(clock, "2027-01-01 00:00:05")
        imap_session(p, "bob", bob["password"], 300000)
        wait_for_log(p, "(state relaying, user bob@example.com, store ")
        # the AService log had no line since the start: its file stays open until its next line
        assert open_logs(p.proc.pid) == sorted(["ImapProxy_20270101.log", "AService_%s.log" % _started(p)])
        assert p.proc.poll() is None
        before = open(os.path.join(p.log_dir, "ImapProxy_20261231.log")).read().splitlines()
        after = open(os.path.join(p.log_dir, "ImapProxy_20270101.log")).read().splitlines()
    assert before and all(line.startswith("2026-12-31 23:59:") for line in before), before
    assert after and all(line.startswith("2027-01-01 00:00:") for line in after), after
    assert any("login user=alice@example.com" in line for line in before)
    assert any("login user=bob@example.com" in line for line in after)
    assert not any("bob@" in line for line in before) and not any("alice@" in line for line in after)


def _started(p):
    """The date of the AService file the daemon made at its start (the real date then, in TZ)."""
    names = [f for f in os.listdir(p.log_dir) if f.startswith("AService_")]
    assert len(names) == 1, names
    return names[0][len("AService_"):-len(".log")]
