"""Client-side helpers for the end-to-end tests: real clients bound to chosen loopback addresses."""
import glob
import imaplib
import os
import poplib
import socket
import time

from mmproxy.testing.base import MissingBinary, free_port


class _FromAddress:
    """A stdlib client connecting from a chosen 127.x source address, so per-address behaviour is real."""

    def __init__(self, host, port, source="127.0.0.1", timeout=10):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


class ImapFrom(_FromAddress, imaplib.IMAP4):
    pass


class PopFrom(_FromAddress, poplib.POP3):
    pass


class RawClient:
    """A raw socket for the abuse tests: exact bytes in, lines out."""

    def __init__(self, host, port, source="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout, source_address=(source, 0))
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data)

    def readline(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def expect(self, prefix):
        """The next line, which must start with ``prefix`` (an AssertionError names what came instead)."""
        line = self.readline()
        if not line:
            raise AssertionError("connection closed while waiting for %r" % prefix)
        assert line.startswith(prefix), "expected a line starting with %r, got %r" % (prefix, line)
        return line

    def expect_lines(self, *lines):
        """The next lines, exactly (each given without its CR LF)."""
        for want in lines:
            want = want.encode() if isinstance(want, str) else want
            got = self.readline()
            assert got == want + b"\r\n", "expected %r, got %r" % (want, got)

    def skip_to(self, prefix):
        """The first line starting with ``prefix``; the lines before it (a greeting, capabilities) are skipped."""
        while True:
            line = self.readline()
            if not line:
                raise AssertionError("connection closed while waiting for %r" % prefix)
            if line.startswith(prefix):
                return line

    def expect_close(self, timeout=5):
        """The server closes the connection within ``timeout`` seconds, sending nothing more."""
        rest = self.read_all(timeout)
        assert rest == b"", "expected the connection to close, got %r" % rest[:300]

    def read_all(self, timeout=10):
        """Everything until the server closes; fails if it does not within ``timeout``."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        data = self.buf
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
            assert time.monotonic() < deadline, "server did not close"


def unused_port(*hosts):
    """A port nothing listens on (for 'server down' tests)."""
    return free_port(*hosts)


def proxy_log(p):
    """Every log file the proxy wrote, and its terminal output, as text (undecodable bytes escaped)."""
    import os
    text = ""
    for f in sorted(os.listdir(p.log_dir)):
        with open(os.path.join(p.log_dir, f), "rb") as fh:
            text += fh.read().decode("utf-8", "backslashreplace")
    return text + p.output()


def wait_for_log(p, needle, timeout=10):
    """Poll the proxy's logs until ``needle`` shows up; the whole text."""
    deadline = time.monotonic() + timeout
    while True:
        text = proxy_log(p)
        if needle in text:
            return text
        assert time.monotonic() < deadline, "%r not logged within %ss; log ends:\n%s" % (needle, timeout, text[-3000:])
        time.sleep(0.05)


def refresh(p, needle="configuration refreshed"):
    """SIGHUP, then the n-th ``needle`` in the proxy's logs for the n-th refresh."""
    import signal
    before = proxy_log(p).count(needle)
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while proxy_log(p).count(needle) <= before:
        assert time.monotonic() < deadline, "no %r after SIGHUP:\n%s" % (needle, proxy_log(p)[-3000:])
        time.sleep(0.05)


def greeting(port, host="127.0.0.1"):
    """The first thing a plain connection to ``host:port`` receives, as text."""
    with socket.create_connection((host, port), 5) as s:
        s.settimeout(5)
        return s.recv(4096).decode()


def tcp_pair():
    """Both ends of one loopback TCP connection: (client end, server end); gevent sockets where the
    socket module is patched (the tests' conftest patches it)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    outside = socket.create_connection(lst.getsockname())
    inside, _ = lst.accept()
    lst.close()
    return outside, inside


def until_close(sock, timeout=5):
    """Everything a socket receives until the peer's FIN (a reset fails the test: ConnectionResetError)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


# ---------------------------------------------------------------------- a clock to move (libfaketime)
TZ = "<+0530>-05:30"          # India's offset, written as a POSIX TZ (no tzdata needed): local midnight is 18:30 UTC


def libfaketime():
    """The LD_PRELOAD library of Debian's faketime package (MissingBinary with the install hint)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        raise MissingBinary("libfaketime is not installed; the date-change test needs it. Install with:\n"
                            "    sudo bash scripts/setup-system      (or: sudo apt-get install -y faketime)")
    return found[0]


def set_clock(path, when=None):
    """The clock of a process under libfaketime reading ``path`` (FAKETIME_TIMESTAMP_FILE), from
    now on: ``when`` ("YYYY-mm-dd HH:MM:SS", local time of this process: both run in the same TZ),
    running on from there; None: the real time.  Written as an offset from the real time, so the
    clock runs (libfaketime's "@" start time is taken again at every read with FAKETIME_NO_CACHE)."""
    offset = 0 if when is None else int(time.mktime(time.strptime(when, "%Y-%m-%d %H:%M:%S")) - time.time())
    with open(path + ".new", "w") as f:
        f.write("%+d\n" % offset)
    os.rename(path + ".new", path)          # libfaketime never reads half a line


def open_logs(pid):
    """The names of the .log files process ``pid`` holds open."""
    out = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            out.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
    return sorted(os.path.basename(f) for f in out if f.endswith(".log"))


def imap_login(p, user, password, source="127.0.0.1"):
    """A logged-in raw IMAP client (relayed by the proxy)."""
    c = RawClient(p.host, p.imap_port, source=source)
    c.expect(b"* OK")
    c.send(b'a LOGIN %s "%s"\r\n' % (user.encode(), password.encode()))
    assert c.expect(b"a ").startswith(b"a OK")
    return c


def pop_login(p, user, password, source="127.0.0.1"):
    c = RawClient(p.host, p.pop_port, source=source)
    c.expect(b"+OK")
    c.send(b"USER %s\r\n" % user.encode())
    c.expect(b"+OK")
    c.send(b"PASS %s\r\n" % password.encode())
    c.expect(b"+OK")
    return c


def ticker(every=0.02):
    """A greenlet that notes the time every ``every`` seconds while the hub runs (a stalled hub
    shows as a gap): ([monotonic times], the greenlet, to kill)."""
    import gevent
    ticks = []

    def tick():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(every)
    return ticks, gevent.spawn(tick)


def until(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not within %ss" % timeout
        time.sleep(0.1)
