"""The legacy command names end to end: scripts/start-msg, scripts/refresh, scripts/stop-msg with
``mmp`` over a daemonised mmproxy, logins through it, and its pid file (mmproxy/pidfile.py)."""
import os
import signal
import subprocess
import time

import pytest

from mmproxy import pidfile
from mmproxy.testing.base import listening
from mmproxy.testing.proxy import Proxy

from helpers import RawClient, proxy_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def legacy(name, *args, env=None, timeout=40):
    """Run scripts/<name> as an operator would (no PYTHONPATH of ours: the script sets its own)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMPROXY_CONFIG_DIR")}
    environ.update(env or {})
    return subprocess.run([os.path.join(ROOT, "scripts", name), *args], capture_output=True, text=True,
                          timeout=timeout, env=environ, cwd="/")


@pytest.fixture
def daemon_dir(mail_stack):
    """A configuration tree for the stack (IMAP only); whatever a test starts on it is stopped by pid."""
    p = Proxy(mail_stack.info())
    p.write_config()
    started = []
    yield p, started
    for pid in started + [pidfile.running_pid(p.config_dir)]:
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    p.stop()


def login(p):
    c = RawClient(p.host, p.imap_port)
    c.expect(b"* OK [CAPABILITY ")
    c.send(b'a LOGIN alice "alice-pw"\r\n')
    assert c.expect(b"a ").startswith(b"a OK [CAPABILITY ")
    c.send(b"b LOGOUT\r\n")
    c.expect(b"* BYE ")
    c.expect(b"b OK Logout completed")


def started(r, d):
    """The pid a successful start-msg printed (checking the exact line)."""
    assert r.returncode == 0 and r.stderr == "", r.stderr
    pid = int(r.stdout.split("pid ")[1].split()[0])
    assert r.stdout == "mmproxy started, pid %d (output in %s)\n" % (pid, os.path.join(d, "mmproxy.out"))
    return pid


def test_start_refresh_stop_through_the_legacy_names(daemon_dir):
    p, pids = daemon_dir
    d = p.config_dir
    path = os.path.join(d, "mmproxy.pid")
    r = legacy("start-msg", "mmp", "--config-dir", d)
    pid = started(r, d)
    pids.append(pid)
    assert open(path).read() == "%d\n" % pid and listening(p.host, p.imap_port)
    login(p)

    again = legacy("start-msg", "mmp", "--config-dir", d)         # while it runs: refused, naming pid and file
    assert (again.returncode, again.stdout, again.stderr) == (1, "", "Error: already running with pid %d (%s)\n"
                                                              % (pid, path))
    other = legacy("start-msg", "imap", "--config-dir", d)
    assert (other.returncode, other.stdout, other.stderr) == (
        2, "", "start-msg: imap: not served by mmproxy, which runs only the Messaging Multiplexor (mmp)\n")

    r = legacy("refresh", "mmp", env={"MMPROXY_CONFIG_DIR": d})       # the directory from the environment
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == "asked mmproxy (pid %d) to refresh; problems, if any, are in its AService log\n" % pid
    deadline = time.monotonic() + 10
    while "configuration refreshed" not in proxy_log(p):
        assert time.monotonic() < deadline, proxy_log(p)[-3000:]
        time.sleep(0.05)
    login(p)

    r = legacy("stop-msg", "mmp", "--config-dir", d)
    assert (r.returncode, r.stdout, r.stderr) == (0, "mmproxy (pid %d) stopped\n" % pid, "")
    assert not os.path.exists(path) and not listening(p.host, p.imap_port)
    r = legacy("stop-msg", "--config-dir", d)                        # no component means mmp too
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "Error: not running (no process holds %s)\n" % path)
    assert "Traceback" not in proxy_log(p)


def test_two_starts_at_once_one_wins(daemon_dir):
    p, pids = daemon_dir
    d = p.config_dir
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = [subprocess.Popen([os.path.join(ROOT, "scripts", "start-msg"), "mmp", "--config-dir", d], env=environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(pr.wait(40), *pr.communicate()) for pr in procs]
    winner = pidfile.running_pid(d)
    assert winner
    pids.append(winner)
    path = os.path.join(d, "mmproxy.pid")
    assert sorted(results) == [
        (0, "mmproxy started, pid %d (output in %s)\n" % (winner, os.path.join(d, "mmproxy.out")), ""),
        (1, "", "Error: already running with pid %d (%s)\n" % (winner, path))]
    login(p)
    r = legacy("stop-msg", "mmp", "--config-dir", d)
    assert (r.returncode, r.stdout) == (0, "mmproxy (pid %d) stopped\n" % winner)


def test_stale_and_foreign_pid_files(daemon_dir):
    """A pid file naming a live process that holds no lock (a pid reused after a crash) does not
    block a start; a pid file someone rewrote is not the daemon's to remove, and stop still stops
    the daemon (the lock's holder), not the pid written there."""
    p, pids = daemon_dir
    d = p.config_dir
    path = os.path.join(d, "mmproxy.pid")
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        with open(path, "w") as f:
            f.write("%d\n" % bystander.pid)
        pid = started(legacy("start-msg", "mmp", "--config-dir", d), d)
        pids.append(pid)
        assert open(path).read() == "%d\n" % pid
        login(p)
        with open(path, "w") as f:                      # someone else's pid, written in place
            f.write("%d\n" % bystander.pid)
        r = legacy("stop-msg", "mmp", "--config-dir", d)
        assert (r.returncode, r.stdout) == (0, "mmproxy (pid %d) stopped\n" % pid)
        assert bystander.poll() is None                 # not signalled
        assert open(path).read() == "%d\n" % bystander.pid
    finally:
        bystander.kill()
        bystander.wait()


def test_be_the_user_leaves_the_pid_file_to_stop(mail_stack):
    """BeTheUser: the pid file is written as root in a root-owned directory, so the daemon (now
    nobody) cannot remove it at exit; `stop-msg` (root) does, and a daemon killed without it leaves
    a stale file that does not block the next start."""
    p = Proxy(mail_stack.info(), aservice={"BeTheUser": "nobody", "BeTheGroup": "nogroup"})
    os.chmod(p.log_dir, 0o777)
    p.write_config()
    d = p.config_dir
    path = os.path.join(d, "mmproxy.pid")
    pids = []
    try:
        pid = started(legacy("start-msg", "mmp", "--config-dir", d), d)
        pids.append(pid)
        assert os.stat(path).st_uid == 0 and os.stat(d).st_uid == 0
        login(p)
        r = legacy("stop-msg", "mmp", "--config-dir", d)
        assert (r.returncode, r.stdout) == (0, "mmproxy (pid %d) stopped\n" % pid)
        assert not os.path.exists(path)
        assert "pid file %s left in place" % path in proxy_log(p)

        pid = started(legacy("start-msg", "mmp", "--config-dir", d), d)
        pids.append(pid)
        os.kill(pid, signal.SIGTERM)                    # stopped without stop-msg: the file stays, stale
        deadline = time.monotonic() + 15
        while pidfile.holder(path) == pid:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert open(path).read() == "%d\n" % pid
        pid = started(legacy("start-msg", "mmp", "--config-dir", d), d)
        pids.append(pid)
        login(p)
        assert legacy("stop-msg", "mmp", "--config-dir", d).returncode == 0
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.stop()
