"""The daemon's own output file (mmproxy.out in the configuration directory): the previous start's
kept as mmproxy.out.1, log lines only in the logs, stray Python output in the AService log, and
what still reaches the descriptors kept under logs.OUTPUT_LIMIT."""
import logging
import os
import subprocess
import sys
import time

from mmproxy import logs
from mmproxy.testing.proxy import Proxy

from helpers import RawClient, wait_for_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mmproxy(*args):
    return subprocess.run([sys.executable, "-m", "mmproxy", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def refused(p, n):
    """n connections from an address that already holds its one ConnLimits slot: a warning each."""
    for _ in range(n):
        r = RawClient(p.host, p.imap_port, source="127.0.0.12")
        r.expect(b"* BYE [UNAVAILABLE]")


def test_daemon_output_is_bounded_and_one_generation_kept(mail_stack, tmp_path):
    p = Proxy(mail_stack.info(), imap={"ConnLimits": "127.0.0.12|255.255.255.255:1", "LogLevel": 1},
              workdir=str(tmp_path))
    p.write_config()
    out = os.path.join(p.config_dir, "mmproxy.out")
    with open(out, "w") as f:
        f.write("the previous run\n")
    r = mmproxy("start", "--config-dir", p.config_dir)
    assert r.returncode == 0, r.stderr
    pid = int(open(os.path.join(p.config_dir, "mmproxy.pid")).read())
    try:
        assert open(out + ".1").read() == "the previous run\n"
        first = open(out).read()
        assert "Traceback" not in first and len(first) < 2000, first
        holder = RawClient(p.host, p.imap_port, source="127.0.0.12")
        holder.expect(b"* OK")
        refused(p, 100)
        text = wait_for_log(p, "refused: this address holds")
        deadline = time.monotonic() + 10
        while text.count("(ConnLimits)") < 100:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            text = wait_for_log(p, "refused: this address holds")
        assert open(out).read() == first                # warnings go to the log, not to mmproxy.out
        # what a C library would write to the descriptor: 2 MiB, then the next log line bounds it
        with open("/proc/%d/fd/2" % pid, "ab") as fd2:
            fd2.write((b"x" * 1023 + b"\n") * 2048)
        assert os.path.getsize(out) > logs.OUTPUT_LIMIT
        time.sleep(1.1)
        refused(p, 1)
        deadline = time.monotonic() + 10
        while os.path.getsize(out) > logs.OUTPUT_LIMIT:
            assert time.monotonic() < deadline, os.path.getsize(out)
            time.sleep(0.1)
        assert open(out).read().startswith("mmproxy: %s passed %d bytes at " % (out, logs.OUTPUT_LIMIT))
        holder.send(b"a LOGOUT\r\n")
    finally:
        s = mmproxy("stop", "--config-dir", p.config_dir)
    assert s.returncode == 0, s.stderr
    r = mmproxy("start", "--config-dir", p.config_dir)       # a second start: the first's output is kept
    try:
        assert r.returncode == 0, r.stderr
        assert open(out + ".1").read().startswith("mmproxy: %s passed" % out)
    finally:
        assert mmproxy("stop", "--config-dir", p.config_dir).returncode == 0


def test_stray_python_output_goes_to_the_aservice_log(tmp_path):
    """sys.stderr of a daemon: each line one ERROR line of the AService log, context ``stderr``; a
    line whose log cannot be written goes to the descriptor instead."""
    logs.configure("aservice", str(tmp_path), 0, foreground=False)
    target = tmp_path / "fd"
    fd = os.open(str(target), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        stray = logs._StrayOutput(fd)
        stray.write("Traceback (most recent call last):\n  File \"x.py\", line 1")
        stray.write(", in <module>\nKeyError: 'k'\n\n")
        stray.write("no end of line yet")
        (name,) = [f for f in os.listdir(tmp_path) if f.startswith("AService_")]
        lines = [ln.split(" ", 2)[2] for ln in (tmp_path / name).read_text().splitlines()]
        assert lines == ["ERROR [stderr] Traceback (most recent call last):",
                         "ERROR [stderr]   File \"x.py\", line 1, in <module>", "ERROR [stderr] KeyError: 'k'"]
        stray.busy = True                                # as while the log itself fails
        stray.write("straight through\n")
        assert target.read_text() == "straight through\n"
    finally:
        os.close(fd)
        for h in list(logging.getLogger("mmproxy").handlers):
            logging.getLogger("mmproxy").removeHandler(h)
            h.close()
