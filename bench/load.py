#!/usr/bin/env python3
"""mmproxy benchmark: the load generator. One process of gevent clients, driven by bench.py.

bench.py starts several of these (``python bench/load.py``), so the load comes from processes
separate from the proxy and from each other. Protocol on stdin/stdout, one JSON object per line:

    bench -> load   the job            {"kind": "login"|"bulk"|"idle", ...}
    load  -> bench  {"ready": true}    (gevent imported, descriptors raised)
    bench -> load   {"t_start": T, "t_end": E}   wall-clock times: start at T, start no op after E
    load  -> bench  the result         (login, bulk)
  idle only, after the result ({"opened": K, ...}) the sessions stay open until:
    bench -> load   {"cmd": "release", "n": N}   close N held sessions  -> {"released": N}
    bench -> load   {"cmd": "check"}             DONE on every held IDLE, expect the tagged OK,
                                                 then LOGOUT and close  -> {"alive": A, "dead": D}

Jobs (every address must be in 127.0.0.0/8; every socket has a timeout; every loop stops at
t_end and at max_ops):
  login  users [[host, port, login, password], ...], proto imap|imaps|pop3, conc, all_once,
         max_ops, seed, timeout. IMAP: connect, greeting, LOGIN, SELECT INBOX, LOGOUT;
         POP3: connect, greeting, USER, PASS, STAT, QUIT; imaps: IMAP over implicit TLS, a full
         handshake each time (no session resumption). all_once: each user once, in order.
         -> lat (whole session, s), llat (connect to the LOGIN/PASS reply, s), errors, cpu_s
  bulk   users, seq, reps: LOGIN, SELECT, FETCH <seq> BODY.PEEK[] over one connection each
         -> runs [[bytes, seconds of FETCH]]
  idle   users, k, conc, tls, max_errors: k sessions LOGIN, SELECT, IDLE and stay open
"""
import ipaddress
import json
import random
import resource
import sys
import time

MAX_OPS = 2_000_000
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class ProtoError(Exception):
    pass


def check_loopback(host):
    if ipaddress.ip_address(host) not in LOOPBACK:
        raise SystemExit("load.py: refusing non-loopback address %s" % host)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_self():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


_TLS = []


def tls_context():
    """Client context for implicit TLS: the benchmark's certificate is self-signed; no session
    is ever offered for resumption (each wrap_socket gets no `session`), so every login pays a
    full handshake."""
    if not _TLS:
        from gevent import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _TLS.append(ctx)
    return _TLS[0]


class Conn:
    __slots__ = ("s", "buf")

    def __init__(self, host, port, timeout, tls=False):
        from gevent import socket
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s = tls_context().wrap_socket(s) if tls else s
        self.buf = bytearray()

    def readline(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            data = self.s.recv(65536)
            if not data:
                raise ProtoError("EOF")
            self.buf += data
            if len(self.buf) > 1 << 20:
                raise ProtoError("line too long")

    def skip(self, n):
        """Read and drop an n-byte literal."""
        take = min(n, len(self.buf))
        del self.buf[:take]
        left = n - take
        if left:
            view = memoryview(bytearray(1 << 20))
            while left:
                r = self.s.recv_into(view, min(left, len(view)))
                if not r:
                    raise ProtoError("EOF in literal")
                left -= r
        return n

    def send(self, data):
        self.s.sendall(data)

    def close(self):
        try:
            self.s.close()
        except Exception:
            pass

    def imap(self, tag, cmd):
        self.send(tag + b" " + cmd + b"\r\n")
        return self.imap_reply(tag)

    def imap_reply(self, tag):
        t = tag + b" "
        while True:
            line = self.readline()
            if line.startswith(t):
                if not line.startswith(t + b"OK"):
                    raise ProtoError(line[:120].decode("latin-1"))
                return line

    def pop(self, cmd):
        self.send(cmd + b"\r\n")
        line = self.readline()
        if not line.startswith(b"+OK"):
            raise ProtoError("%s -> %s" % (cmd.split()[0].decode(), line[:100].decode("latin-1")))
        return line


def quote(s):
    return b'"' + s.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def imap_login(u, timeout, tls=False):
    """Connect, greeting, LOGIN, SELECT INBOX; returns (conn, seconds to the LOGIN reply)."""
    host, port, login, password = u
    t0 = time.perf_counter()
    c = Conn(host, port, timeout, tls)
    try:
        g = c.readline()
        if not g.startswith(b"* OK"):
            raise ProtoError("greeting " + g[:80].decode("latin-1"))
        c.imap(b"a1", b"LOGIN " + quote(login) + b" " + quote(password))
        tl = time.perf_counter() - t0
        c.imap(b"a2", b"SELECT INBOX")
        return c, tl
    except BaseException:
        c.close()
        raise


def imap_session(u, timeout, tls=False):
    c, tl = imap_login(u, timeout, tls)
    try:
        c.imap(b"a3", b"LOGOUT")
    finally:
        c.close()
    return tl


def pop3_session(u, timeout, tls=False):
    host, port, login, password = u
    t0 = time.perf_counter()
    c = Conn(host, port, timeout, tls)
    try:
        g = c.readline()
        if not g.startswith(b"+OK"):
            raise ProtoError("greeting " + g[:80].decode("latin-1"))
        c.pop(b"USER " + login.encode())
        c.pop(b"PASS " + password.encode())
        tl = time.perf_counter() - t0
        c.pop(b"STAT")
        c.pop(b"QUIT")
        return tl
    finally:
        c.close()


SESSIONS = {"imap": (imap_session, False), "imaps": (imap_session, True), "pop3": (pop3_session, False)}


# ------------------------------------------------------------------ jobs
def run_login(job, go):
    import gevent
    fn, tls = SESSIONS[job["proto"]]
    users = job["users"]
    timeout = job.get("timeout", 10.0)
    max_ops = min(job.get("max_ops") or MAX_OPS, MAX_OPS)
    t_end = go["t_end"]
    lat, llat, errs = [], [], []
    state = {"errors": 0, "started": 0, "t_first": None, "t_last": None}
    order = iter(users)

    def loop(i):
        rnd = random.Random(job.get("seed", 1) * 7919 + i)
        while time.time() < t_end and state["started"] < max_ops:
            if job.get("all_once"):
                u = next(order, None)
                if u is None:
                    return
            else:
                u = users[rnd.randrange(len(users))]
            state["started"] += 1
            t0 = time.perf_counter()
            try:
                tl = fn(u, timeout, tls)
            except Exception as e:  # noqa: BLE001 - every failure is counted, a few are shown
                state["errors"] += 1
                if len(errs) < 5:
                    errs.append("%s: %r" % (u[2], e))
                gevent.sleep(0.01)
                continue
            lat.append(round(time.perf_counter() - t0, 6))
            llat.append(round(tl, 6))
            state["t_last"] = time.time()

    wait_until(go["t_start"])
    c0 = cpu_self()
    greenlets = [gevent.spawn(loop, i) for i in range(job["conc"])]
    gevent.joinall(greenlets, timeout=max(0.0, t_end - time.time()) + timeout + 5)
    gevent.killall(greenlets, timeout=2)
    return {"lat": lat, "llat": llat, "errors": state["errors"], "err_samples": errs,
            "t_last": state["t_last"], "cpu_s": round(cpu_self() - c0, 4)}


def run_bulk(job, go):
    timeout = job.get("timeout", 60.0)
    users = job["users"]
    runs, errs = [], []
    wait_until(go["t_start"])
    c0 = cpu_self()
    for i in range(job["reps"]):
        if time.time() > go["t_end"]:
            break
        u = users[i % len(users)]
        try:
            runs.append(fetch_large(u, job["seq"], timeout))
        except Exception as e:  # noqa: BLE001
            errs.append("%s: %r" % (u[2], e))
    return {"runs": runs, "errors": errs, "cpu_s": round(cpu_self() - c0, 4)}


def fetch_large(u, seq, timeout):
    c, _ = imap_login(u, timeout)
    try:
        t0 = time.perf_counter()
        c.send(b"f1 FETCH %d BODY.PEEK[]\r\n" % seq)
        nbytes = 0
        while True:
            line = c.readline()
            if line.endswith(b"}") and b"{" in line:
                nbytes += c.skip(int(line[line.rindex(b"{") + 1:-1]))
                continue
            if line.startswith(b"f1 "):
                if not line.startswith(b"f1 OK"):
                    raise ProtoError(line[:100].decode("latin-1"))
                break
        dt = time.perf_counter() - t0
        c.imap(b"a9", b"LOGOUT")
        return [nbytes, round(dt, 6)]
    finally:
        c.close()


def run_idle(job, go, out, inp):
    """Open k IDLE sessions; report; then obey release/check commands."""
    import gevent
    users, k, timeout, tls = job["users"], job["k"], job.get("timeout", 10.0), job.get("tls", False)
    max_errors = job.get("max_errors", 20)
    held, errs = [], []
    state = {"errors": 0}
    todo = iter(range(k))
    wait_until(go["t_start"])
    c0 = cpu_self()

    def opener():
        for i in todo:
            if time.time() > go["t_end"] or state["errors"] >= max_errors:
                return
            u = users[i % len(users)]
            try:
                c, _ = imap_login(u, timeout, tls)
                try:
                    c.send(b"i1 IDLE\r\n")
                    line = c.readline()
                    if not line.startswith(b"+"):
                        raise ProtoError("IDLE -> %r" % line[:80])
                except BaseException:
                    c.close()
                    raise
                held.append(c)
            except Exception as e:  # noqa: BLE001
                state["errors"] += 1
                if len(errs) < 5:
                    errs.append("%s: %r" % (u[2], e))

    t0 = time.time()
    greenlets = [gevent.spawn(opener) for _ in range(job.get("conc", 16))]
    gevent.joinall(greenlets, timeout=max(0.0, go["t_end"] - time.time()) + timeout + 5)
    gevent.killall(greenlets, timeout=2)
    reply(out, {"opened": len(held), "errors": state["errors"], "err_samples": errs,
                "open_s": round(time.time() - t0, 2), "cpu_s": round(cpu_self() - c0, 4)})
    while True:
        line = inp.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "release":
            n = min(cmd["n"], len(held))
            for c in held[-n:] if n else []:
                c.close()
            del held[len(held) - n:]
            reply(out, {"released": n})
        elif cmd["cmd"] == "check":
            reply(out, check_alive(held, timeout))
            break


def check_alive(held, timeout):
    """Each held session ends its IDLE (DONE, tagged OK expected), then LOGOUT; counts the answers."""
    from gevent.pool import Pool
    ok, samples = [0], []

    def one(c):
        try:
            c.s.settimeout(timeout)
            c.send(b"DONE\r\n")
            c.imap_reply(b"i1")
            ok[0] += 1
            c.send(b"z LOGOUT\r\n")
        except Exception as e:  # noqa: BLE001
            if len(samples) < 5:
                samples.append(repr(e))
        finally:
            c.close()

    pool = Pool(200)
    for c in held:
        pool.spawn(one, c)
    pool.join(timeout=timeout + 60)
    pool.kill(timeout=2)
    return {"alive": ok[0], "dead": len(held) - ok[0], "samples": samples}


def wait_until(t):
    import gevent
    d = t - time.time()
    if d > 0:
        gevent.sleep(d)


def reply(out, obj):
    out.write(json.dumps(obj) + "\n")
    out.flush()


def main():
    inp, out = sys.stdin, sys.stdout
    job = json.loads(inp.readline())
    for u in job["users"]:
        check_loopback(u[0])
    raise_nofile()
    import gevent  # noqa: F401 - import before "ready" so it is not timed
    reply(out, {"ready": True})
    go = json.loads(inp.readline())
    if job["kind"] == "login":
        reply(out, run_login(job, go))
    elif job["kind"] == "bulk":
        reply(out, run_bulk(job, go))
    elif job["kind"] == "idle":
        run_idle(job, go, out, inp)
    else:
        raise SystemExit("unknown job kind %r" % job["kind"])


if __name__ == "__main__":
    main()
