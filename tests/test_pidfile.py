"""The pid file (mmproxy/pidfile.py) with real processes holding it: locked, atomic, stale-proof."""
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from mmproxy import pidfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOLD = textwrap.dedent("""
    import os, sys, time
    from mmproxy import pidfile
    go = sys.argv[2]
    while not os.path.exists(go):           # all contenders start together
        time.sleep(0.001)
    p = pidfile.Pidfile(sys.argv[1])
    try:
        p.acquire()
    except pidfile.AlreadyRunning as e:
        print("refused", e.pid, flush=True)
        sys.exit(1)
    p.write()
    print("holding", os.getpid(), flush=True)
    sys.stdin.read()                        # until the test closes our stdin
    print("released" if p.release() else "left", flush=True)
""")


class Holder:
    """A process that acquires and writes the pid file once ``go`` exists, holds it until stop()."""

    def __init__(self, path, go):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, path, go], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def first_line(self):
        return self.proc.stdout.readline().split()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
        out = self.proc.stdout.read()
        self.proc.wait(10)
        return out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def holders():
    made = []
    yield lambda path, go: made.append(Holder(path, go)) or made[-1]
    for h in made:
        h.kill()
        h.proc.stdout.close()


def test_write_is_locked_readable_and_released(tmp_path):
    path = str(tmp_path / "mmproxy.pid")
    p = pidfile.Pidfile(path)
    p.acquire()
    assert os.path.exists(path) and open(path).read() == ""          # nothing to mistake for a pid yet
    p.write()
    assert open(path).read() == "%d\n" % os.getpid()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert pidfile.holder(path) == os.getpid()                        # without dropping our own lock
    assert [n for n in os.listdir(tmp_path)] == ["mmproxy.pid"]       # no temporary file left
    assert p.release() is True
    assert not os.path.exists(path) and pidfile.holder(path) is None


def test_a_second_holder_is_refused_with_the_pid_and_file(tmp_path, holders):
    path, go = str(tmp_path / "mmproxy.pid"), str(tmp_path / "go")
    open(go, "w").close()
    first = holders(path, go)
    assert first.first_line() == ["holding", str(first.proc.pid)]
    assert pidfile.holder(path) == first.proc.pid
    p = pidfile.Pidfile(path)
    with pytest.raises(pidfile.AlreadyRunning) as e:
        p.acquire()
    assert e.value.pid == first.proc.pid
    assert str(e.value) == "already running with pid %d (%s)" % (first.proc.pid, path)
    assert first.stop() == "released\n"
    assert not os.path.exists(path)


def test_of_starts_at_once_exactly_one_wins(tmp_path, holders):
    path, go = str(tmp_path / "mmproxy.pid"), str(tmp_path / "go")
    contenders = [holders(path, go) for _ in range(6)]
    time.sleep(0.5)                                     # all of them waiting for the start signal
    open(go, "w").close()
    lines = [c.first_line() for c in contenders]
    winners = [c for c, line in zip(contenders, lines) if line[0] == "holding"]
    assert len(winners) == 1, lines
    winner = winners[0].proc.pid
    assert sorted(lines) == sorted([["holding", str(winner)]] + [["refused", str(winner)]] * 5)
    assert open(path).read() == "%d\n" % winner and pidfile.holder(path) == winner


def test_a_stale_file_does_not_block(tmp_path):
    path = str(tmp_path / "mmproxy.pid")
    dead = subprocess.Popen(["true"])
    dead.wait()
    sleeper = subprocess.Popen(["sleep", "30"])       # a live process that holds no lock: a reused pid
    try:
        for stale in (dead.pid, sleeper.pid, "garbage"):
            with open(path, "w") as f:
                f.write("%s\n" % stale)
            assert pidfile.holder(path) is None
            p = pidfile.Pidfile(path)
            p.acquire()
            p.write()
            assert pidfile.read_pid(path) == os.getpid()
            p.release()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("how", ["in place", "replaced"])
def test_release_leaves_a_file_someone_else_rewrote(tmp_path, how):
    path = str(tmp_path / "mmproxy.pid")
    p = pidfile.Pidfile(path)
    p.acquire()
    p.write()
    if how == "in place":
        with open(path, "w") as f:                      # same inode, new content (echo 4242 > mmproxy.pid)
            f.write("4242\n")
    else:
        with open(path + ".new", "w") as f:             # another file renamed over it
            f.write("%d\n" % os.getpid())
        os.rename(path + ".new", path)
    assert p.release() is False
    assert os.path.exists(path)


def test_remove_stale_only_removes_an_unheld_file_naming_the_pid(tmp_path, holders):
    path, go = str(tmp_path / "mmproxy.pid"), str(tmp_path / "go")
    open(go, "w").close()
    h = holders(path, go)
    assert h.first_line()[0] == "holding"
    assert pidfile.remove_stale(path, h.proc.pid) is False            # held: never
    os.kill(h.proc.pid, signal.SIGKILL)
    h.proc.wait(10)
    assert pidfile.read_pid(path) == h.proc.pid and pidfile.holder(path) is None
    assert pidfile.remove_stale(path, h.proc.pid + 1) is False         # names another pid
    assert pidfile.remove_stale(path, h.proc.pid) is True
    assert not os.path.exists(path)


def test_an_unwritable_directory_is_a_clear_error(tmp_path):
    path = str(tmp_path / "missing" / "mmproxy.pid")
    with pytest.raises(pidfile.PidfileError, match=r"cannot create the pid file .*/missing/mmproxy.pid: No such file"):
        pidfile.Pidfile(path).acquire()
