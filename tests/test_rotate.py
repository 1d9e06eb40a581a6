"""mmproxy rotate-logs: which files it touches (legacy names, dated by name, in every LogDir), its
exact output, a dry run, and a rotation while a real daemon writes (a login loop through it, two
rotations at once, yesterday's file still held open by the daemon): no line lost."""
import datetime
import gzip
import os
import subprocess
import sys
import time

import gevent

from mmproxy import rotate
from mmproxy.testing.base import free_port
from mmproxy.testing.proxy import Proxy, write_cfg

from helpers import TZ, RawClient, libfaketime, open_logs, set_clock, wait_for_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mmproxy(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mmproxy", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env)


def day(n, fmt="%Y%m%d"):
    """The local date n days ago."""
    return (datetime.date.today() - datetime.timedelta(days=n)).strftime(fmt)


def tree(tmp_path):
    """AService and POP log to a/, IMAP to b/; files of several ages, and files not ours."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_cfg(str(tmp_path / "AService.cfg"), {
        "ServiceList": "/opt/lib/ImapProxyAService@127.0.0.1:%d /opt/lib/PopProxyAService@127.0.0.1:%d"
                       % (free_port(), free_port()), "LogDir": str(a)})
    write_cfg(str(tmp_path / "ImapProxyAService.cfg"), {"LogDir": str(b)})
    write_cfg(str(tmp_path / "PopProxyAService.cfg"), {"LogDir": str(a)})
    files = {
        a / ("AService_%s.log" % day(0)): "today\n",
        a / ("AService_%s.log" % day(1)): "yesterday\n" * 1000,
        a / ("PopProxy_%s.log" % day(2)): "two days\n",
        a / ("PopProxy_%s.log" % day(29)): "29 days\n",
        a / ("PopProxy_%s.log" % day(31)): "31 days\n",
        a / ("PopProxy_%s.log.gz" % day(40)): "",
        a / "other.log": "not ours\n",
        a / "ImapProxy_2026.log": "not ours\n",
        a / "ImapProxy_20261399.log": "no such day\n",
        a / ("imapproxy_%s.log" % day(50)): "not ours\n",
        b / ("ImapProxy_%s.log" % day(1)): "imap yesterday\n",
        b / ("ImapProxy_%s.log" % day(30)): "30 days\n",
    }
    for path, text in files.items():
        path.write_text(text)
        os.utime(path, (time.time() - 86400 * 400,) * 2)        # mtime says nothing: the name dates a file
    return a, b


def test_dry_run_then_rotation_exact_output(tmp_path):
    a, b = tree(tmp_path)
    before = {p: p.read_bytes() for p in list(a.iterdir()) + list(b.iterdir())}
    r = mmproxy("rotate-logs", "--config-dir", str(tmp_path), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "would compress %s/AService_%s.log" % (a, day(1)),
        "would delete %s/PopProxy_%s.log.gz" % (a, day(40)),
        "would delete %s/PopProxy_%s.log" % (a, day(31)),
        "would compress %s/PopProxy_%s.log" % (a, day(29)),
        "would compress %s/PopProxy_%s.log" % (a, day(2)),
        "would delete %s/ImapProxy_%s.log" % (b, day(30)),
        "would compress %s/ImapProxy_%s.log" % (b, day(1)),
    ]
    assert {p: p.read_bytes() for p in list(a.iterdir()) + list(b.iterdir())} == before     # nothing changed
    r = mmproxy("rotate-logs", "--config-dir", str(tmp_path), "--compress-after", "2", "--delete-after", "31")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "deleted %s/PopProxy_%s.log.gz" % (a, day(40)),
        "deleted %s/PopProxy_%s.log" % (a, day(31)),
        "compressed %s/PopProxy_%s.log" % (a, day(29)),
        "compressed %s/PopProxy_%s.log" % (a, day(2)),
        "compressed %s/ImapProxy_%s.log" % (b, day(30)),
    ]
    assert sorted(os.listdir(a)) == sorted([
        "AService_%s.log" % day(0), "AService_%s.log" % day(1), "PopProxy_%s.log.gz" % day(2),
        "PopProxy_%s.log.gz" % day(29), "other.log", "ImapProxy_2026.log", "ImapProxy_20261399.log",
        "imapproxy_%s.log" % day(50)])
    gz = a / ("PopProxy_%s.log.gz" % day(2))
    assert gzip.decompress(gz.read_bytes()) == b"two days\n"
    assert abs(gz.stat().st_mtime - (time.time() - 86400 * 400)) < 60       # the original's mtime
    r = mmproxy("rotate-logs", "--config-dir", str(tmp_path))               # the defaults: 1 and 30 days
    assert r.stdout.splitlines() == [
        "compressed %s/AService_%s.log" % (a, day(1)),
        "deleted %s/ImapProxy_%s.log.gz" % (b, day(30)),
        "compressed %s/ImapProxy_%s.log" % (b, day(1)),
    ]
    assert gzip.decompress((a / ("AService_%s.log.gz" % day(1))).read_bytes()) == b"yesterday\n" * 1000
    assert mmproxy("rotate-logs", "--config-dir", str(tmp_path)).stdout == ""                # nothing left to do
    r = mmproxy("rotate-logs", "--config-dir", str(tmp_path), "--compress-after", "0")
    assert r.returncode == 2 and "0 is not in the range x>=1" in r.stderr
    assert (a / ("AService_%s.log" % day(0))).read_text() == "today\n"


def test_a_crashed_run_loses_nothing(tmp_path):
    """A run killed after writing the .gz but before removing the original: the next run makes
    the .gz again from the original; a stale partial file goes."""
    d = tmp_path / "log"
    d.mkdir()
    old = d / ("SmtpProxy_%s.log" % day(3))
    old.write_text("line\n" * 10)
    (d / ("SmtpProxy_%s.log.gz" % day(3))).write_bytes(gzip.compress(b"line\n" * 4))     # half of it
    stale = d / (".SmtpProxy_%s.log.x1y2.gz-partial" % day(3))
    stale.write_bytes(b"\x1f\x8b")
    os.utime(stale, (time.time() - 7200,) * 2)
    lines = []
    assert rotate.rotate([str(d)], 1, 30, say=lines.append) == 0
    assert lines == ["compressed %s" % old]
    assert sorted(os.listdir(d)) == ["SmtpProxy_%s.log.gz" % day(3)]
    assert gzip.decompress((d / ("SmtpProxy_%s.log.gz" % day(3))).read_bytes()) == b"line\n" * 10


def test_rotation_while_the_daemon_writes(mail_stack, tmp_path, local_tz):
    """A daemon started on yesterday's date (libfaketime) keeps AService_<yesterday>.log open; its
    clock then comes to today and a login loop writes today's IMAP file while two rotate-logs run at
    once.  Yesterday's files are compressed (the open one too), the 40-day-old one is deleted,
    today's is untouched, and every line is found once, in a .log or a .gz."""
    info = mail_stack.info()
    clock = str(tmp_path / "faketime")
    set_clock(clock, "%s 12:00:00" % day(1, "%Y-%m-%d"))
    p = Proxy(info, imap={"LogLevel": 2}, aservice={"LogLevel": 1}, workdir=str(tmp_path / "proxy"))
    p.wrapper = ["env", "TZ=" + TZ, "LD_PRELOAD=" + libfaketime(), "FAKETIME_TIMESTAMP_FILE=" + clock,
                 "FAKETIME_NO_CACHE=1"]
    env = dict(os.environ)                              # TZ: local_tz
    ancient = os.path.join(p.log_dir, "ImapProxy_%s.log" % day(40))
    with open(ancient, "w") as f:
        f.write("ancient\n")
    password = info["users"]["alice"]["password"].encode()
    done = []

    def login():
        r = RawClient(p.host, p.imap_port)
        r.expect(b"* OK")
        r.send(b"a LOGIN alice {%d+}\r\n%s\r\nb LOGOUT\r\n" % (len(password), password))
        r.expect(b"a OK ")
        r.skip_to(b"b OK")
        done.append(1)

    with p:
        login()                                          # yesterday's IMAP file
        wait_for_log(p, "(state relaying, user alice@example.com")
        yesterday = {k: "%s_%s.log" % (k, day(1)) for k in ("AService", "ImapProxy")}
        texts = {k: open(os.path.join(p.log_dir, name)).read() for k, name in yesterday.items()}
        assert "mmproxy started" in texts["AService"] and "login user=alice@" in texts["ImapProxy"]
        set_clock(clock)                                 # today
        stop = []

        def loop():
            while not stop:
                login()

        g = gevent.spawn(loop)
        while len(done) < 5:
            gevent.sleep(0.05)
        assert yesterday["AService"] in open_logs(p.proc.pid)        # the daemon holds it open
        runs = [subprocess.Popen([sys.executable, "-m", "mmproxy", "rotate-logs", "--config-dir", p.config_dir],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        outs = [r.communicate(timeout=60) for r in runs]
        assert [r.returncode for r in runs] == [0, 0], outs
        n = len(done)
        while len(done) < n + 5:
            gevent.sleep(0.05)
        stop.append(1)
        g.get(timeout=30)
        total = len(done)
        text = wait_for_log(p, "(state relaying, user alice@example.com", timeout=10)
        deadline = time.monotonic() + 10
        while text.count("login user=alice@") < total:
            assert time.monotonic() < deadline, "%d logins, %d lines" % (total, text.count("login user=alice@"))
            time.sleep(0.1)
            text = _all_lines(p.log_dir)
        names = sorted(os.listdir(p.log_dir))
        assert names == sorted(["AService_%s.log.gz" % day(1), "ImapProxy_%s.log.gz" % day(1),
                                "ImapProxy_%s.log" % day(0)]), names
        for k, name in yesterday.items():
            with gzip.open(os.path.join(p.log_dir, name + ".gz"), "rt") as f:
                assert f.read() == texts[k]
        # every run said what it did; together they compressed both files and deleted the old one once
        said = sorted(line for out, _ in outs for line in out.splitlines())
        for what in ("compressed %s/%s" % (p.log_dir, yesterday["AService"]),
                     "compressed %s/%s" % (p.log_dir, yesterday["ImapProxy"]), "deleted %s" % ancient):
            assert what in said, said
        assert _all_lines(p.log_dir).count("login user=alice@") == total
        assert p.proc.poll() is None


def _all_lines(log_dir):
    text = ""
    for name in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt") as f:
            text += f.read()
    return text
