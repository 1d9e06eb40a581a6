"""systemd's Type=notify (mmproxy/sdnotify.py, contrib/mmproxy.service): a real daemon tells a real
datagram socket named by NOTIFY_SOCKET that it is ready, reloading and stopping."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

from mmproxy import sdnotify
from mmproxy.testing.base import listening
from mmproxy.testing.proxy import Proxy

from helpers import RawClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_addresses():
    assert sdnotify.address("/run/systemd/notify") == b"/run/systemd/notify"
    assert sdnotify.address("@/org/freedesktop/systemd1/notify/42") == b"\0/org/freedesktop/systemd1/notify/42"
    assert sdnotify.address("vsock:2:1234") is None and sdnotify.address("") is None
    assert sdnotify.address(None) is None


def test_nothing_is_sent_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False


class Manager:
    """The service manager's end: a datagram socket bound at a path or an abstract name."""

    def __init__(self, tmp_path, abstract):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "mmproxy-test-notify-%s" % uuid.uuid4().hex
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = str(tmp_path / "notify")
            self.sock.bind(path)
            self.env = path
        self.sock.settimeout(20)

    def next(self):
        return self.sock.recv(4096).decode()

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("threads,abstract", [(1, False), (2, True)], ids=["one process, path", "master, abstract"])
def test_ready_reloading_stopping_from_a_real_daemon(mail_stack, tmp_path, monkeypatch, threads, abstract):
    manager = Manager(tmp_path, abstract)
    monkeypatch.setenv("NOTIFY_SOCKET", manager.env)
    p = Proxy(mail_stack.info(), aservice={"NumThreads": threads})
    p.write_config()
    try:
        p.start()
        status = "accepting connections" + (" (2 workers)" if threads > 1 else "")
        assert manager.next() == "READY=1\nSTATUS=%s\n" % status
        assert listening(p.host, p.imap_port)           # READY came once the port accepts
        c = RawClient(p.host, p.imap_port)
        c.expect(b"* OK [CAPABILITY ")
        c.send(b'a LOGIN alice "alice-pw"\r\n')
        assert c.expect(b"a ").startswith(b"a OK ")
        p.proc.send_signal(signal.SIGHUP)
        reloading = manager.next().splitlines()
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert int(reloading[1].split("=")[1]) > 0 and len(reloading) == 2
        assert manager.next() == "READY=1\nSTATUS=%s\n" % status
        p.proc.send_signal(signal.SIGTERM)
        assert manager.next() == "STOPPING=1\n"
        assert p.proc.wait(15) == 0
        manager.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):             # one of each, from the main process only
            manager.next()
    finally:
        p.stop()
        manager.close()


def test_the_unit_verifies():
    """systemd-analyze verify on contrib/mmproxy.service, its mmproxy the one of this venv."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    mmproxy = os.path.join(os.path.dirname(sys.executable), "mmproxy")
    assert os.access(mmproxy, os.X_OK), mmproxy
    with open(os.path.join(ROOT, "contrib", "mmproxy.service")) as f:
        unit = f.read()
    assert "/usr/local/bin/mmproxy start --foreground" in unit and "Type=notify" in unit
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mmproxy.service")
        with open(path, "w") as f:
            f.write(unit.replace("/usr/local/bin/mmproxy", mmproxy))
        r = subprocess.run([analyze, "verify", path], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
