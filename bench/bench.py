#!/usr/bin/env python3
"""mmproxy benchmark: slapd + two Dovecot stores + mmproxy on loopback, load from separate
processes, mmproxy and direct-to-store measured in the same run.

    .venv/bin/python bench/bench.py            # full run (< 15 min)  -> bench/RESULTS.md (+ .json)
    .venv/bin/python bench/bench.py --quick    # < 3 min              -> bench/RESULTS-quick.md (+ .json)
    bench/run [--quick]                        # the same after scripts/setup-system and setup-venv

The fixtures are the project's own (mmproxy.testing.MailStack and mmproxy.testing.proxy.Proxy);
the clients are bench/load.py processes (gevent). See bench/README.md for the method.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import queue
import random
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from mmproxy.testing import MailStack  # noqa: E402
from mmproxy.testing.base import find_binary, make_tempdir  # noqa: E402
from mmproxy.testing.proxy import Proxy, make_cert  # noqa: E402

LOAD = os.path.join(HERE, "load.py")
PEERS = os.path.join(HERE, "peers-lab.json")      # the lab run behind RESULTS.md (--peers)
CLK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

FULL = dict(users=1000, conc=[1, 16, 64], duration=10.0, hot=50, reps=8, large_mb=20, sessions=2000,
            tls_sessions=2000, max_sessions=10000, probes=30, procs=2, cold_limit=60.0, open_limit=150.0,
            quiet_limit=20.0, quiet_budget=240.0)
QUICK = dict(users=200, conc=[16], duration=3.0, hot=50, reps=4, large_mb=20, sessions=300,
             tls_sessions=300, max_sessions=1000, probes=20, procs=2, cold_limit=20.0, open_limit=40.0,
             quiet_limit=5.0, quiet_budget=40.0)
SESSIONS_PER_LOAD_PROC = 2500      # client descriptors per load process (limit 20,000 here)
TIMEOUT = 10.0                     # every client socket
BUSY_CORES = 2                     # spinning processes of the contention test (one per CPU here)

# The benchmark's configuration (never the defaults): everything from 127.0.0.1, so the
# per-address connection limit is lifted; caches as large as the user set.
PROXY_SERVICE = {
    "PreAuth": True, "HostedDomains": True, "DefaultDomain": "example.com",
    "LdapCacheSize": 10000, "LdapCacheTTL": 900, "AuthCacheSize": 10000, "AuthCacheTTL": 900,
    "ConnLimits": "0.0.0.0|0.0.0.0:1000000", "LogLevel": 1, "Timeout": 1800,
}

# Generic Dovecot limits so the stores are not the bottleneck and can hold the idle sessions:
# login and mail processes are reused (service_count = 0, as the peers' lab runs its stores), an
# imap process serves many idle sessions (all users are uid nobody), enough processes and
# client slots for 10,000 sessions over two stores.
STORE_CONF = """
# --- mmproxy bench: limits for thousands of sessions ---
default_client_limit = 6000
default_process_limit = 300
service imap-login {
  service_count = 0
  process_min_avail = 2
}
service pop3-login {
  service_count = 0
  process_min_avail = 2
}
service imap {
  service_count = 0
  client_limit = 250
  process_limit = 60
}
service pop3 {
  service_count = 0
  process_limit = 256
}
"""


# ------------------------------------------------------------------ /proc accounting
def proc_children():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    st = f.read()
            except OSError:
                continue
            ppid = int(st[st.rindex(")") + 2:].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(roots, kids=None):
    kids = proc_children() if kids is None else kids
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(kids.get(p, []))
    return out


def cpu_of(pids):
    """CPU seconds of a process tree: each live process's own CPU time, ns-precise and including
    its threads that have already exited (clock_gettime on the process CPU clock, as
    clock_getcpuclockid() makes it), plus cutime+cstime (ticks) of the children it has reaped."""
    total = 0.0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p) as f:
                st = f.read()
            fs = st[st.rindex(")") + 2:].split()
            reaped = (int(fs[13]) + int(fs[14])) / CLK
            try:
                own = time.clock_gettime_ns(((~p) << 3) | 2) / 1e9    # MAKE_PROCESS_CPUCLOCK(pid, SCHED)
            except OSError:
                own = (int(fs[11]) + int(fs[12])) / CLK
            total += own + reaped
        except OSError:
            continue
    return total


def machine_busy():
    """CPU seconds the whole machine has been busy in processes (user nice system) or stolen by
    the hypervisor (steal): the other side of "other load" (processes outside this benchmark,
    e.g. in other containers). irq/softirq time is left out: much of it is this benchmark's own
    loopback traffic, which no process is charged for."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[7]) / CLK


def calibrate():
    """Machine speed now: CPU microseconds for a fixed piece of pure-Python work (best of 5).
    The VM's speed drifts with its neighbours (shared cores, caches) without showing as steal
    time, and every CPU-per-login figure drifts with it; this makes the drift visible."""
    best = None
    for _ in range(5):
        t0 = time.process_time()
        d = {}
        for i in range(50000):
            d["k%d" % (i & 1023)] = d.get("k%d" % ((i * 7) & 1023), 0) + len(str(i))
        dt = time.process_time() - t0
        best = dt if best is None else min(best, dt)
    return round(best * 1e6)


def rsa_sign_ms():
    """OpenSSL's RSA-2048 signature time here: the floor of a full TLS handshake's server cost."""
    try:
        r = subprocess.run(["openssl", "speed", "-seconds", "1", "rsa2048"], capture_output=True, text=True,
                           timeout=20)
        for line in r.stdout.splitlines():
            if line.startswith("rsa 2048 bits"):
                return round(float(line.split()[3].rstrip("s")) * 1000, 3)
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        pass
    return None


def mem_of(pids):
    """RSS (statm) and PSS (smaps_rollup) in KB, summed over the processes."""
    rss = pss = 0
    for p in pids:
        try:
            with open("/proc/%d/statm" % p) as f:
                rss += int(f.read().split()[1]) * PAGE_KB
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                        break
        except OSError:
            continue
    return {"nproc": len(pids), "rss_kb": rss, "pss_kb": pss}


def fds_of(pids):
    n = 0
    for p in pids:
        try:
            n += len(os.listdir("/proc/%d/fd" % p))
        except OSError:
            pass
    return n


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def ms(x):
    return None if x is None else round(x * 1000, 2)


# ------------------------------------------------------------------ load processes
class Worker:
    """One bench/load.py process; its stdout lines arrive on a queue (read by a thread)."""

    def __init__(self, job, registry):
        self.p = subprocess.Popen([sys.executable, LOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, bufsize=1, cwd=HERE)
        registry.append(self)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.send(job)

    def _read(self):
        for line in self.p.stdout:
            self.q.put(line)
        self.q.put(None)

    def send(self, obj):
        self.p.stdin.write(json.dumps(obj) + "\n")
        self.p.stdin.flush()

    def recv(self, timeout):
        try:
            line = self.q.get(timeout=max(0.1, timeout))
        except queue.Empty:
            raise RuntimeError("load process %d did not answer within %.0f s" % (self.p.pid, timeout)) from None
        if line is None:
            raise RuntimeError("load process %d exited (rc %s)" % (self.p.pid, self.p.wait(5)))
        return json.loads(line)

    def finish(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)


def split(n, parts):
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


# ------------------------------------------------------------------ the bench
class Bench:
    def __init__(self, cfg, args):
        self.cfg = cfg
        self.args = args
        self.workers = []
        self.runs = []
        self.notes = []
        self.stack = None
        self.proxy = None
        self.pop_ok = False
        self.pop_note = ""
        self.dir = None
        self.quiet_budget = cfg["quiet_budget"]     # seconds, over the whole run
        self.calibration = []                        # (when, microseconds) see calibrate()
        self.best_cal = None
        self.slowdown = None                         # at the start of the last run, see quiesce()
        self.lab = None                              # --peers: a lab run's JSON (nginx, Dovecot, mmproxy)
        self.fleet_pids = None                       # the fleet test: {"proxy": [a, b], "haproxy": ..., "redis": ...}
        self.balancer = None                         # ... its HAProxy
        if getattr(args, "peers", None):
            with open(args.peers) as f:
                self.lab = json.load(f)
            self.lab["_path"] = os.path.relpath(args.peers, ROOT)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self):
        self.dir = make_tempdir("mmproxy-bench-")
        t0 = time.time()
        self.stack = MailStack(users=self.cfg["users"], workdir=os.path.join(self.dir, "stack"),
                               store_conf=STORE_CONF, slapd_loglevel="none")
        self.stack.start()
        self.info = self.stack.info()
        self.uids = ["user%d" % k for k in range(1, self.cfg["users"] + 1)]
        self.add_large_messages()
        self.cert = make_cert(os.path.join(self.dir, "cert"))
        self.start_proxy()
        self.calibration.append(("start", calibrate()))
        log("stack up in %.1f s (%d users, stores %s, proxy pid %d, POP %s)" % (
            time.time() - t0, self.cfg["users"], ", ".join(self.info["stores"]), self.proxy.proc.pid,
            "on" if self.pop_ok else "n/a"))

    def start_proxy(self):
        """mmproxy over a legacy config tree; the POP service when mmproxy has one."""
        want_pop = importlib.util.find_spec("mmproxy.pop") is not None and not self.args.no_pop
        if not want_pop:
            self.pop_note = "POP service not available (no mmproxy/pop.py)" if not self.args.no_pop else "--no-pop"
        aservice = {"LogLevel": 1, "NumThreads": self.args.threads}
        for pop in ([True, False] if want_pop else [False]):
            self.proxy = Proxy(self.info, imap=dict(PROXY_SERVICE), pop=dict(PROXY_SERVICE) if pop else None,
                               aservice=aservice, tls=self.cert, workdir=os.path.join(self.dir, "proxy"))
            try:
                self.proxy.start(timeout=30)
            except RuntimeError as e:
                if not pop:
                    raise
                self.pop_note = "POP service failed to start: %s" % str(e).strip().splitlines()[-1][:200]
                log("mmproxy with POP did not start; retrying without POP (%s)" % self.pop_note)
                continue
            self.pop_ok = pop
            return

    def restart_proxy(self):
        """A fresh mmproxy process: empty caches for a cold pass."""
        self.proxy.stop()
        self.proxy.start(timeout=30)

    def stop(self):
        for w in self.workers:
            w.kill()
        if self.proxy is not None:
            try:
                self.proxy.stop()
            except Exception as e:  # noqa: BLE001
                log("stopping mmproxy: %r" % e)
        if self.stack is not None:
            self.stack.stop()
        if self.dir and not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif self.dir:
            log("kept %s" % self.dir)

    def add_large_messages(self):
        """The bulk test's message (large_mb MB) in the INBOX of the first `reps` users, as
        message 2. One file, hard-linked into each maildir (MailStack(large_bytes=...) would
        write a copy into every one of the users' mailboxes)."""
        import grp
        import pwd
        nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
        line = b"".join(b"%c" % (65 + (i * 7) % 26) for i in range(76)) + b"\r\n"
        hdr = (b"From: postmaster@example.com\r\nSubject: bench large message\r\n"
               b"Date: Tue, 14 Nov 2023 22:14:00 +0000\r\nMessage-ID: <bench.large@mmproxy.test>\r\n"
               b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
        size = int(self.cfg["large_mb"] * 2**20)
        body = line * max(1, (size - len(hdr)) // len(line))
        template = os.path.join(self.dir, "large.eml")
        with open(template, "wb") as f:
            f.write(hdr + body)
        n = len(hdr) + len(body)
        os.chown(template, nobody, nogroup)
        self.large_bytes = n
        self.large_users = self.uids[:max(2, self.cfg["reps"])]
        for uid in self.large_users:
            u = self.info["users"][uid]
            cur = os.path.join(self.stack.stores[u["mailhost"]].home(u["store_login"]), "Maildir", "cur")
            os.link(template, os.path.join(cur, "%d.M2P%d.mmproxy-bench,S=%d,W=%d:2," % (
                time.time(), os.getpid(), n, n)))

    # -- endpoints ---------------------------------------------------------------------------
    def addr(self, ep, proto, uid):
        u = self.info["users"][uid]
        if ep == "direct":
            port = self.info["imap_port" if proto.startswith("imap") else "pop3_port"]
            return [u["mailhost"], port, u["store_login"], u["password"]]
        if ep == "fleet":
            return ["127.0.0.1", self.balancer.port_of(proto), uid, u["password"]]
        port = {"imap": self.proxy.imap_port, "imaps": self.proxy.imaps_port, "pop3": self.proxy.pop_port}[proto]
        return ["127.0.0.1", port, uid, u["password"]]

    def groups(self):
        out = {"proxy": [self.proxy.proc.pid], "slapd": [self.stack.slapd.proc.pid],
               "stores": [s.proc.pid for s in self.stack.stores.values()]}
        if self.fleet_pids:                       # the fleet test: both instances are "proxy"
            out.update(self.fleet_pids)
        return out

    def snap(self):
        kids = proc_children()
        out = {g: cpu_of(tree(r, kids)) for g, r in self.groups().items()}
        out["harness"] = time.process_time()       # this process, its reader threads included
        out["machine"] = machine_busy()
        out["t"] = time.time()
        return out

    @staticmethod
    def cpu_delta(c0, c1, client):
        """CPU seconds per group between two snapshots, the load processes' own figure, and
        "other": what the machine spent beyond all of these (outside load)."""
        d = {g: round(c1[g] - c0[g], 4) for g in c0 if g not in ("machine", "t")}
        d["client"] = round(client, 4)
        # /proc/stat counts in 10 ms ticks: short windows may come out slightly negative; not
        # clipped here, so sums over many windows stay unbiased
        d["other"] = round((c1["machine"] - c0["machine"]) - sum(d.values()), 3)
        return d, round(max(0.0, d["other"]) / max(0.001, c1["t"] - c0["t"]), 2)

    def quiesce(self):
        """Wait (bounded) until the machine is quiet and at its usual speed: no outside load in
        /proc/stat, and the calibration workload within 25% of the fastest time seen in this run
        (neighbours on the host slow this VM down without showing as load or steal)."""
        t0 = time.time()
        while True:
            a = machine_busy()
            time.sleep(0.5)
            busy = (machine_busy() - a) / 0.5
            cal = calibrate()
            self.best_cal = min(self.best_cal or cal, cal)
            slow = cal / self.best_cal
            waited = time.time() - t0
            if (busy < 0.25 and slow < 1.25) or waited > min(self.cfg["quiet_limit"], self.quiet_budget):
                self.quiet_budget -= waited
                self.slowdown = round(slow, 2)
                if waited > 1:
                    log("  (waited %.0f s for a quiet machine: %.2f cores busy, %.2fx slower than its best)"
                        % (waited, busy, slow))
                return round(waited, 1)

    # -- tests -------------------------------------------------------------------------------
    def login(self, ep, proto, conc, users="random", duration=None, max_ops=None, label=None, quiet=False,
              settle=True, extra=None):
        """conc clients over min(procs, conc) load processes. users: "random" (all), "hotN"
        (first N) or "cold" (each user once, in a fresh proxy for mmproxy)."""
        duration = duration or self.cfg["duration"]
        if users == "cold" and ep == "mmproxy":
            self.restart_proxy()
        uids = self.uids[:self.cfg["hot"]] if users.startswith("hot") else list(self.uids)
        if users == "cold":
            random.Random(conc).shuffle(uids)
            duration = self.cfg["cold_limit"]
        nproc = max(1, min(self.cfg["procs"], conc))
        cs = split(conc, nproc)
        ws = []
        for i in range(nproc):
            us = uids[i::nproc] if users == "cold" else uids
            ws.append(Worker({"kind": "login", "proto": proto, "conc": cs[i], "all_once": users == "cold",
                              "users": [self.addr(ep, proto, u) for u in us], "seed": 1 + i,
                              "max_ops": (split(max_ops, nproc)[i] if max_ops else None), "timeout": TIMEOUT},
                             self.workers))
        for w in ws:
            w.recv(30)
        waited = self.quiesce() if not quiet and settle else 0
        t_start = time.time() + 0.2
        t_end = t_start + duration
        for w in ws:
            w.send({"t_start": t_start, "t_end": t_end})
        time.sleep(max(0.0, t_start - time.time() - 0.01))
        spy = self.profile_start(label or "%s %s C=%d %s" % (ep, proto, conc, users), duration) \
            if ep == "mmproxy" and not quiet else None
        c0 = self.snap()
        res = [w.recv(t_end - time.time() + TIMEOUT + 30) for w in ws]
        c1 = self.snap()
        for w in ws:
            w.finish()
        profile = self.profile_end(spy) if spy is not None else None
        lat = [x for r in res for x in r["lat"]]
        llat = [x for r in res for x in r["llat"]]
        n = len(lat)
        t_last = max([r["t_last"] or 0 for r in res] + [0])
        elapsed = (t_last - t_start) if (users == "cold" and n) else duration
        cpu, other = self.cpu_delta(c0, c1, sum(r["cpu_s"] for r in res))
        r = {"test": "%s_login" % proto, "endpoint": ep, "concurrency": conc, "users": users,
             "label": label or "%s %s C=%d %s" % (ep, proto, conc, users),
             "ops": n, "errors": sum(x["errors"] for x in res),
             "err_samples": [e for x in res for e in x["err_samples"]][:5],
             "duration_s": round(elapsed, 3), "rate": round(n / elapsed, 1) if elapsed > 0 and n else 0,
             "lat_ms": {"p50": ms(pct(lat, .5)), "p99": ms(pct(lat, .99)), "max": ms(max(lat) if lat else None)},
             "login_ms": {"p50": ms(pct(llat, .5)), "p99": ms(pct(llat, .99))},
             "cpu_s": cpu, "cpu_s_per_1000": {k: round(v * 1000 / n, 4) for k, v in cpu.items()} if n else None,
             "other_load_cores": other, "waited_for_quiet_s": waited, "slowdown": self.slowdown if not quiet else None}
        if profile is not None:
            r["profile"] = profile
        if extra:
            r.update(extra)
        if users == "cold" and n + r["errors"] < len(uids):
            r["note"] = "stopped at the %ds limit after %d of %d users" % (duration, n + r["errors"], len(uids))
        return self.record(r, quiet)

    def profile_start(self, label, duration):
        """--profile DIR: py-spy samples the proxy (every process of it) during one run, into
        DIR/<label>.txt as collapsed stacks; None without --profile.  Only samples that hold the
        GIL count: the CPU of the Python side (a thread in a system call, or waiting for the CPU
        after it woke a peer, is not sampled; ``strace -c`` counts the system calls)."""
        if not self.args.profile:
            return None
        os.makedirs(self.args.profile, exist_ok=True)
        out = os.path.join(self.args.profile, re.sub(r"[^A-Za-z0-9.=-]+", "_", label) + ".txt")
        exe = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
        if exe is None:
            raise SystemExit("--profile needs py-spy (pip install py-spy)")
        p = subprocess.Popen([exe, "record", "--pid", str(self.proxy.proc.pid), "--subprocesses", "--gil",
                              "--rate", "250", "--format", "raw", "--nonblocking", "--threads",
                              "--duration", str(int(math.ceil(duration))), "--output", out],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        return p, out

    @staticmethod
    def profile_end(spy):
        """Wait for py-spy; the profile's summary (profile_summary)."""
        p, out = spy
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        return profile_summary(out) if os.path.exists(out) else None

    def fetch(self, ep, users, reps, quiesce=True):
        """One load process FETCHes the large message reps times; (its result, CPU, other load, wait)."""
        w = Worker({"kind": "bulk", "users": [self.addr(ep, "imap", u) for u in users], "seq": 2,
                    "reps": reps, "timeout": 60.0}, self.workers)
        w.recv(30)
        waited = self.quiesce() if quiesce else 0
        t_start = time.time() + 0.2
        w.send({"t_start": t_start, "t_end": t_start + 120})
        time.sleep(max(0.0, t_start - time.time() - 0.01))
        c0 = self.snap()
        res = w.recv(200)
        c1 = self.snap()
        w.finish()
        cpu, other = self.cpu_delta(c0, c1, res["cpu_s"])
        return res, cpu, c1["t"] - c0["t"], waited

    def bulk(self, reps):
        """reps FETCHes per endpoint, one connection each, direct and mmproxy taking turns (so a
        change in machine speed hits both alike)."""
        eps = ("direct", "mmproxy")
        acc = {ep: {"runs": [], "errors": [], "cpu": {}, "wall": 0.0, "waited": 0.0, "slow": []} for ep in eps}
        for i in range(reps):
            for ep in (eps if i % 2 else eps[::-1]):
                res, cpu, wall, waited = self.fetch(ep, [self.large_users[i % len(self.large_users)]], 1)
                a = acc[ep]
                a["runs"] += res["runs"]
                a["errors"] += res["errors"]
                for k, v in cpu.items():
                    a["cpu"][k] = a["cpu"].get(k, 0.0) + v
                a["wall"] += wall
                a["waited"] += waited
                a["slow"].append(self.slowdown or 1.0)
        for ep in eps:
            a = acc[ep]
            total = sum(x[0] for x in a["runs"])
            rates = sorted(x[0] / x[1] / 1e6 for x in a["runs"] if x[1] > 0)
            cpu = {k: round(v, 4) for k, v in a["cpu"].items()}
            gb = total / 1e9
            self.record({
                "test": "bulk", "endpoint": ep, "label": "%s bulk x%d" % (ep, reps), "reps": reps,
                "bytes_each": a["runs"][0][0] if a["runs"] else None, "errors": len(a["errors"]),
                "err_samples": a["errors"][:3],
                "mb_s": {"median": round(rates[len(rates) // 2], 1) if rates else None,
                         "all": [round(x, 1) for x in rates]},
                "cpu_s": cpu, "cpu_s_per_gb": {k: round(v / gb, 3) for k, v in cpu.items()} if gb else None,
                "other_load_cores": round(max(0.0, cpu.get("other", 0.0)) / max(0.001, a["wall"]), 2),
                "waited_for_quiet_s": round(a["waited"], 1), "slowdown": max(a["slow"]) if a["slow"] else None})

    def idle(self, ep, k, tls=False, label=None):
        """k sessions LOGIN, SELECT, IDLE from several load processes; the proxy's memory before
        and after; fresh logins while they are held; then every held session must answer DONE."""
        proto = "imaps" if tls else "imap"
        roots = [self.proxy.proc.pid] if ep == "mmproxy" else []
        nproc = max(2, math.ceil(k / SESSIONS_PER_LOAD_PROC))
        ks = split(k, nproc)
        ws, start = [], 0
        for i in range(nproc):
            us = [self.uids[(start + j) % len(self.uids)] for j in range(ks[i])]
            start += ks[i]
            ws.append(Worker({"kind": "idle", "k": ks[i], "tls": tls, "conc": 16, "max_errors": 16,
                              "users": [self.addr(ep, proto, u) for u in us], "timeout": TIMEOUT}, self.workers))
        for w in ws:
            w.recv(30)
        waited = self.quiesce()
        # "before" with the load processes already running: they share pages (python's text)
        # with the proxy, which lowers its PSS; so both measurements see the same set
        pids0 = tree(roots)
        m0, f0 = mem_of(pids0), fds_of(pids0)
        c0 = self.snap()
        t_start = time.time() + 0.2
        t_end = t_start + self.cfg["open_limit"]
        for w in ws:
            w.send({"t_start": t_start, "t_end": t_end})
        opened = [w.recv(t_end - time.time() + TIMEOUT + 30) for w in ws]
        time.sleep(1.0)
        c1 = self.snap()
        pids1 = tree(roots)
        m1, f1 = mem_of(pids1), fds_of(pids1)
        n = sum(o["opened"] for o in opened)
        errors = sum(o["errors"] for o in opened)
        released = 0
        if errors:
            # a limit was hit (descriptors, most likely): free a few slots so the probes can log in
            for w in ws:
                w.send({"cmd": "release", "n": 5})
                released += w.recv(30)["released"]
        probe = self.login(ep, proto, 1, duration=self.cfg["probes"] * 2.0 + 20, max_ops=self.cfg["probes"],
                           label="%s %s probes with %d held" % (ep, proto, n - released), quiet=True)
        self.runs.remove(probe)
        alive = dead = 0
        samples = []
        for w in ws:
            w.send({"cmd": "check"})
            a = w.recv(TIMEOUT + 90)
            alive += a["alive"]
            dead += a["dead"]
            samples += a["samples"]
        for w in ws:
            w.finish()
        cpu, other = self.cpu_delta(c0, c1, sum(o["cpu_s"] for o in opened))
        threads = self.proxy.aservice_settings.get("NumThreads", 1) if ep == "mmproxy" else None
        r = {"test": "idle", "endpoint": ep, "tls": tls, "threads": threads,
             "label": label or "%s idle %s K=%d" % (ep, proto, k),
             "requested": k, "opened": n, "open_errors": errors,
             "err_samples": [e for o in opened for e in o["err_samples"]][:5],
             "open_s": max(o["open_s"] for o in opened), "load_procs": nproc,
             "proxy_mem_before": m0, "proxy_mem_after": m1, "proxy_fds_before": f0, "proxy_fds_after": f1,
             "kb_per_session_rss": round((m1["rss_kb"] - m0["rss_kb"]) / n, 2) if n and roots else None,
             "kb_per_session_pss": round((m1["pss_kb"] - m0["pss_kb"]) / n, 2) if n and roots else None,
             "released_for_probes": released, "held_during_probes": n - released,
             "probe": {k2: probe[k2] for k2 in ("ops", "errors", "err_samples", "lat_ms", "login_ms")},
             "alive_after": alive, "dead_after": dead, "dead_samples": samples[:5],
             "cpu_s_open": cpu, "other_load_cores": other, "waited_for_quiet_s": waited,
             "slowdown": self.slowdown}
        time.sleep(2.0)        # let the stores close the sessions
        return self.record(r)

    def idle_more_processes(self, k, threads):
        """When one process could not hold k sessions: the same with NumThreads = threads."""
        prev = [r for r in self.runs if r["test"] == "idle" and r["requested"] == k and not r["tls"]]
        if not prev or prev[-1]["opened"] >= k:
            return
        log("  one process held %d of %d: again with NumThreads %d" % (prev[-1]["opened"], k, threads))
        self.proxy.aservice_settings["NumThreads"] = threads
        self.login("mmproxy", "imap", 16, "cold", label="warm-up NumThreads %d" % threads)   # restarts it
        self.idle("mmproxy", k, label="mmproxy idle imap K=%d (max, NumThreads %d)" % (k, threads))

    def contention(self):
        """CPU contention: IMAP logins at C=16 (random and hot users) with 0 and then BUSY_CORES
        processes spinning on the CPUs beside everything else, with NumThreads 1 and then 2.  The
        spinners are the controlled stand-in for other work on the machine."""
        hot = "hot%d" % self.cfg["hot"]
        for threads in (1, 2):
            self.proxy.aservice_settings["NumThreads"] = threads
            self.login("mmproxy", "imap", 16, "cold", label="warm-up NumThreads %d" % threads)   # restarts it
            for busy in (0, BUSY_CORES):
                spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
                try:
                    for users in ("random", hot):
                        self.login("mmproxy", "imap", 16, users, settle=not busy,
                                   label="contention: NumThreads %d, %d spinning, %s" % (threads, busy, users),
                                   extra={"test": "contention", "threads": threads, "spinning": busy})
                finally:
                    for p in spinners:
                        p.kill()
                        p.wait()
        self.proxy.aservice_settings["NumThreads"] = self.args.threads
        self.login("mmproxy", "imap", 16, "cold", label="warm-up NumThreads %d" % self.args.threads)   # restarts it

    def fleet(self):
        """Two mmproxy instances behind HAProxy (send-proxy-v2, round robin), their per-client state
        first each its own, then shared through Redis: logins at C=16 (CPU per 1000 of both
        instances, HAProxy and Redis; Redis commands per login, by command), then relayed FETCHes of
        the large message (Redis commands while relaying)."""
        from mmproxy.testing.haproxy import Frontend, HAProxy
        from mmproxy.testing.redis import RedisServer
        d = os.path.join(self.dir, "fleet")
        redis = RedisServer(workdir=os.path.join(d, "redis"))
        redis.start()
        pair = []
        try:
            for name in ("a", "b"):
                svc = dict(PROXY_SERVICE, ProxyProtocolFrom="127.0.0.1", BGPenalty=2)    # BadGuys on: read per login
                p = Proxy(self.info, imap=dict(svc), pop=dict(svc) if self.pop_ok else None,
                          aservice={"LogLevel": 1, "InstanceName": name}, workdir=os.path.join(d, name))
                for kind in p.settings:
                    p.settings[kind]["ProxyProtocolPorts"] = "%s:%d" % (p.host, p.ports[kind])
                pair.append(p)
            self.balancer = HAProxy([Frontend(proto, [(p.host, p.ports[kind]) for p in pair], send_proxy="v2")
                                     for proto, kind in (("imap", "imap"), ("pop3", "pop"))
                                     if kind in pair[0].settings], workdir=os.path.join(d, "haproxy"))
            self.balancer.start()
            for proto in ("imap", "pop3") if self.pop_ok else ("imap",):
                for mode in ("local", "redis"):      # in turn, so a change in machine speed hits both alike
                    for p in pair:
                        p.stop()
                        p.aservice_settings.pop("StateRedisURL", None)
                        if mode == "redis":
                            p.aservice_settings.update(StateRedisURL=redis.url, StateRedisPrefix="bench:")
                        p.start(timeout=30)
                    self.fleet_pids = {"proxy": [p.proc.pid for p in pair], "haproxy": [self.balancer.proc.pid],
                                       "redis": [redis.proc.pid]}
                    self.login("fleet", proto, 16, "cold", label="warm-up fleet %s" % mode)
                    before, trips = _redis_commands(redis), _round_trips(pair)
                    r = self.login("fleet", proto, 16, "random", label="fleet %s %s C=16 random" % (mode, proto),
                                   extra={"test": "fleet", "state": mode, "proto": proto})
                    spent, trips = _diff(_redis_commands(redis), before), _diff(_round_trips(pair), trips)
                    n = max(1, r["ops"])
                    r["redis_commands"], r["redis_round_trips"] = spent, trips
                    r["redis_commands_per_login"] = round(sum(spent.values()) / n, 3)
                    r["redis_round_trips_per_login"] = {op: round(k / n, 3) for op, k in sorted(trips.items())}
                    r["redis_round_trips_waited_per_login"] = round(
                        sum(k for op, k in trips.items() if op in WAITED_FOR) / n, 3)
                    log("    Redis per login: %s round trips waited for, %s in all (%s); %s commands on the server"
                        % (r["redis_round_trips_waited_per_login"], round(sum(trips.values()) / n, 3),
                           ", ".join("%s %.2f" % kv for kv in r["redis_round_trips_per_login"].items()),
                           r["redis_commands_per_login"]))
            before, trips = _redis_commands(redis), _round_trips(pair)
            res, cpu, wall, _ = self.fetch("fleet", self.large_users, len(self.large_users) * 2)
            spent, trips = _diff(_redis_commands(redis), before), _diff(_round_trips(pair), trips)
            moved = sum(x[0] for x in res["runs"])
            logins = res.get("logins") or len(self.large_users)
            self.record({"test": "fleet_relay", "endpoint": "fleet", "label": "fleet redis relay",
                         "errors": res["errors"], "bytes": moved, "fetches": len(res["runs"]), "logins": logins,
                         "redis_commands": spent, "redis_round_trips": trips, "seconds": round(wall, 2)},
                        quiet=True)
            log("  fleet relay: %d FETCHes, %.0f MB: Redis round trips %s"
                % (len(res["runs"]), moved / 1e6, trips or "none"))
        finally:
            self.fleet_pids = None
            if self.balancer is not None:
                self.balancer.close()
            for p in pair:
                p.stop()
            redis.close()

    def record(self, r, quiet=False):
        self.runs.append(r)
        if not quiet:
            log(line_of(r))
        return r

    # -- the plan ----------------------------------------------------------------------------
    def plan(self):
        c = self.cfg
        tests = self.args.tests
        hot = "hot%d" % c["hot"]
        steps = []
        # the stores' indexes: every user once, directly, over IMAP and POP3 (not reported)
        steps.append(lambda: self.login("direct", "imap", 16, "cold", label="warm-up direct imap"))
        steps.append(lambda: self.login("direct", "pop3", 16, "cold", label="warm-up direct pop3"))
        eps = ["direct", "mmproxy"]

        def both(fn):
            # alternate which endpoint goes first from step to step (drift hits both alike)
            def step(i=len(steps)):
                for ep in (eps if i % 2 else eps[::-1]):
                    fn(ep)
            steps.append(step)

        for proto in ("pop3", "imap"):
            if proto[:3] not in tests and proto not in tests:
                continue
            for mode in ("cold", "random", hot):
                for cc in c["conc"]:
                    both(lambda ep, p=proto, m=mode, cc=cc: (ep == "direct" or p != "pop3" or self.pop_ok)
                         and self.login(ep, p, cc, m))
        if "tls" in tests:
            for cc in c["conc"]:
                steps.append(lambda cc=cc: self.login("mmproxy", "imaps", cc, "random"))
        if "contention" in tests:
            steps.append(self.contention)
        if "fleet" in tests:
            steps.append(self.fleet)
        if "bulk" in tests:
            steps.append(lambda: self.fetch("direct", self.large_users, len(self.large_users), quiesce=False))
            steps.append(lambda: self.bulk(c["reps"]))    # after one untimed pass: page cache, indexes
        if "idle" in tests:
            steps.append(lambda: self.idle("direct", c["sessions"]))
            steps.append(lambda: self.idle("mmproxy", c["sessions"]))
            if "tls" in tests:
                steps.append(lambda: self.idle("mmproxy", c["tls_sessions"], tls=True))
            steps.append(lambda: self.idle("mmproxy", c["max_sessions"],
                                           label="mmproxy idle imap K=%d (max)" % c["max_sessions"]))
            if self.args.max_threads > self.args.threads:
                steps.append(lambda: self.idle_more_processes(c["max_sessions"], self.args.max_threads))
        for i, s in enumerate(steps):
            s()
            time.sleep(0.3)
            if i and i % 12 == 0:
                self.calibration.append(("step %d" % i, calibrate()))
        self.calibration.append(("end", calibrate()))
        self.runs = [r for r in self.runs if not r["label"].startswith("warm-up")]


def _redis_commands(redis):
    """{command: calls} since the Redis server started (INFO commandstats; INFO itself left out)."""
    out = {}
    for line in redis.cli("INFO", "commandstats").splitlines():
        m = re.match(r"cmdstat_([a-z|]+):calls=(\d+)", line)
        if m and m.group(1) != "info":
            out[m.group(1)] = int(m.group(2))
    return out


WAITED_FOR = ("admit", "penalty", "add_penalty", "login_record")   # round trips a login waits for


def _round_trips(proxies):
    """{op: round trips to Redis} the proxies have counted (their status over the control socket)."""
    from mmproxy import control, stats
    snaps = [a["stats"] for p in proxies for _, a in control.ask(p.config_dir, {"cmd": "status"}) if a.get("ok")]
    return stats.combine(snaps).get("redis_requests", {})


def _diff(after, before):
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def profile_summary(path, top=12):
    """A py-spy collapsed-stack file in a few figures: samples, the functions with most samples of
    their own (self) and in their subtree (inclusive), and the share of each phase of a login
    (PHASES); one pass over the file."""
    self_n, incl, phases, total = {}, {}, {}, 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            n = int(n)
            total += n
            frames = [fr for fr in stack.split(";") if not fr.startswith(("process ", "thread "))]
            if not frames:
                continue
            leaf = frames[-1]
            self_n[leaf] = self_n.get(leaf, 0) + n
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + n
            phase = phase_of(frames)
            phases[phase] = phases.get(phase, 0) + n
    if not total:
        return None

    def rows(d):
        return [[k, round(100.0 * v / total, 1)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"file": os.path.basename(path), "samples": total, "self": rows(self_n), "inclusive": rows(incl),
            "phases": rows(phases)}


# What a login's samples are spent on: the phase of the innermost frame that names one.
PHASES = (("LDAP (search, bind, thread pool)", ("mmproxy/directory.py:_attempts", "mmproxy/directory.py:_run",
                                                "threadpool.py", "ldap/")),
          ("client state (ConnLimits, BadGuys)", ("mmproxy/state.py", "mmproxy/connlimits.py")),
          ("logging", ("logging/", "mmproxy/logs.py")),
          ("store: connect", ("mmproxy/backend.py:_connect", "mmproxy/backend.py:_open")),
          ("store: login dialogue", ("mmproxy/backend.py", "replay", "_greeting")),
          ("relay after login (pump)", ("mmproxy/pump.py",)),
          ("client: reads and replies", ("mmproxy/linereader.py", "Session.flush", "read_request", "send_now")),
          ("login logic (caches, checks)", ("mmproxy/login.py", "mmproxy/directory.py", "mmproxy/loginid.py")),
          ("accept, session set-up and close", ("mmproxy/aservice.py", "mmproxy/session.py", "baseserver.py",
                                                "server.py")),
          ("event loop (wake-ups, timers)", ("hub.py",)))


def phase_of(frames):
    """The PHASES name of one stack (py-spy frames "func (file.py:line)", outermost first)."""
    for fr in reversed(frames):
        # "Class.func (path/file.py:12)" is matched as "path/file.py:func Class.func (path/file.py:12)"
        key = "%s:%s %s" % (fr.rpartition(" (")[2].split(":")[0], fr.partition(" (")[0].rpartition(".")[2], fr)
        for name, marks in PHASES:
            if any(mk in key for mk in marks):
                return name
    return "other"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def line_of(r):
    if r["test"].endswith("_login") or r["test"] in ("contention", "fleet"):
        return "  %-34s %8s/s  p50/p99 %s/%s ms  err %s  proxy CPU-s/1000 %s" % (
            r["label"], r["rate"], r["lat_ms"]["p50"], r["lat_ms"]["p99"], r["errors"],
            (r["cpu_s_per_1000"] or {}).get("proxy"))
    if r["test"] == "bulk":
        return "  %-34s %8s MB/s  err %s  proxy CPU-s/GB %s" % (
            r["label"], r["mb_s"]["median"], r["errors"], (r["cpu_s_per_gb"] or {}).get("proxy"))
    return "  %-34s opened %s/%s (err %s) KB/sess %s (PSS %s)  probe p50/p99 %s/%s ms  alive %s/%s" % (
        r["label"], r["opened"], r["requested"], r["open_errors"], r["kb_per_session_rss"],
        r["kb_per_session_pss"], r["probe"]["login_ms"]["p50"], r["probe"]["login_ms"]["p99"],
        r["alive_after"], r["held_during_probes"])


# ------------------------------------------------------------------ report
def versions():
    def cmd(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    def pkg(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    r = subprocess.run([find_binary("slapd"), "-VV"], capture_output=True, text=True)
    slapd = ((r.stdout + r.stderr).strip().splitlines() or ["?"])[0]
    commit = cmd(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "mmproxy"], capture_output=True,
                           text=True).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)), "cpu": model, "kernel": platform.release(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "nofile_hard": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[1],
        "python": platform.python_version(), "gevent": pkg("gevent"), "greenlet": pkg("greenlet"),
        "python-ldap": pkg("python-ldap"), "openssl": ssl.OPENSSL_VERSION,
        "dovecot": cmd([find_binary("dovecot"), "--version"]),
        "slapd": slapd.replace("@(#) $OpenLDAP: slapd ", "").strip(" $"),
        "mmproxy": commit + (" (+ uncommitted changes in mmproxy/)" if dirty else ""),
    }


def find(runs, **kw):
    for r in runs:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def g(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def fmt(x, nd=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        return ("%." + str(nd) + "f") % x
    return str(x)


DISTURBED = 0.2     # cores of outside load above which a run is marked


def other_load(r):
    """The "outside load" cell: cores busy outside the benchmark / machine slowdown (1.00 = the
    fastest seen in this run); marked when either disturbs the run."""
    x, sl = r.get("other_load_cores"), r.get("slowdown")
    if x is None:
        return "–"
    cell = "%.2f / ×%.2f" % (x, sl) if sl else "%.2f" % x
    return "**%s** ⚠" % cell if (x > DISTURBED or (sl or 1) >= 1.25) else cell


PEER_NAMES = {"nginx": "nginx (+ its auth service)", "dovecot": "Dovecot proxy", "mmproxy": "mmproxy"}


def peers_of(lab):
    """The lab run's summary per endpoint ({} without --peers)."""
    return (lab or {}).get("summary", {})


def targets(b, runs, lab=None):
    """[(target, measured, verdict)] for RESULTS.md; verdicts PASS / MISS / n/a.

    Issue 11's targets.  Login CPU is judged against the peers in one lab run (``lab``: the lab's
    JSON, --peers), where mmproxy ran beside them: ratios count, absolute times vary by machine.
    Memory and the 10,000-session probe are judged on this run."""
    out = []
    peers = peers_of(lab)
    m, ng, dv = peers.get("mmproxy", {}), peers.get("nginx", {}), peers.get("dovecot", {})

    def verdict(x, ok):
        return "–" if x is None else ("PASS" if ok else "MISS")

    def beside(key, limit, rule):
        x = m.get(key)
        if not peers:
            return ("n/a (no lab run: --peers)", "n/a")
        if x is None or limit is None:
            return ("n/a (not in the lab run)", "n/a")
        return ("%s vs %s (%s)" % (fmt(x, 3), fmt(limit, 3), rule), verdict(x, x <= limit))

    for key, what, pick, rule in (
            ("imap_warm_cpu_s_per_1000", "warm IMAP logins", lambda: dv.get("imap_warm_cpu_s_per_1000"), "Dovecot"),
            ("pop3_cpu_s_per_1000", "warm POP3 logins", lambda: dv.get("pop3_cpu_s_per_1000"), "Dovecot"),
            ("imap_cold_cpu_s_per_1000", "cold IMAP logins (PreAuth, a search and a bind each)",
             lambda: _mid(dv.get("imap_cold_cpu_s_per_1000"), ng.get("imap_cold_cpu_s_per_1000")),
             "midway between Dovecot and nginx"),
            ("pop3_cold_cpu_s_per_1000", "cold POP3 logins",
             lambda: _mid(dv.get("pop3_cold_cpu_s_per_1000"), ng.get("pop3_cold_cpu_s_per_1000")),
             "midway between Dovecot and nginx"),
            ("imaps_cpu_s_per_1000", "implicit-TLS IMAP logins (full handshake)",
             lambda: ng.get("imaps_cpu_s_per_1000"), "nginx"),
            ("bulk_cpu_s_per_gb", "relay CPU-s per GB", lambda: ng.get("bulk_cpu_s_per_gb"), "nginx")):
        out.append(("%s: CPU-s per 1000 ≤ %s's, in the same lab run" % (what, rule) if "GB" not in what
                    else "%s ≤ %s's, in the same lab run" % (what, rule), *beside(key, pick(), rule)))
    bd, bm = find(runs, test="bulk", endpoint="direct"), find(runs, test="bulk", endpoint="mmproxy")
    ratio = None
    if g(bd, "mb_s", "median") and g(bm, "mb_s", "median"):
        ratio = bm["mb_s"]["median"] / bd["mb_s"]["median"]
    out.append(("bulk through mmproxy ≥ 0.9× direct throughput (this run)", "%s× (%s vs %s MB/s)" % (
        fmt(ratio), g(bm, "mb_s", "median"), g(bd, "mb_s", "median")) if ratio is not None else "–",
                verdict(ratio, ratio is not None and ratio >= 0.9)))
    for tls, limit in ((False, 2.5), (True, 8.0)):
        i = find(runs, test="idle", endpoint="mmproxy", tls=tls, requested=b.cfg["tls_sessions" if tls else "sessions"])
        x = g(i, "kb_per_session_rss")
        out.append(("≤ %g KB per idle %s session (K=%d, RSS; PSS %s; this run)"
                    % (limit, "TLS" if tls else "plaintext", b.cfg["tls_sessions" if tls else "sessions"],
                       fmt(g(i, "kb_per_session_pss"))), fmt(x), verdict(x, x is not None and x <= limit)))
    for m in [r for r in runs if r["test"] == "idle" and r["endpoint"] == "mmproxy" and not r["tls"]
              and r["requested"] == b.cfg["max_sessions"]]:
        p99 = g(m, "probe", "login_ms", "p99")
        ok = (m["held_during_probes"] >= 10000 and m["dead_after"] == 0 and p99 is not None and p99 < 50
              and not g(m, "probe", "errors"))
        verdict_n = ("PASS" if ok else "MISS") if m["requested"] >= 10000 else "n/a (K=%d < 10,000)" % m["requested"]
        out.append(("10,000 idle sessions held, new logins p99 < 50 ms (NumThreads %s)" % m.get("threads", 1),
                    "%d of %d held (%d proxy process(es))%s; login p99 %s ms (p50 %s, %d probes, %d errors); "
                    "%d/%d alive after" % (
                        m["opened"], m["requested"], m["proxy_mem_after"]["nproc"],
                        " (%d released for the probes)" % m["released_for_probes"] if m["released_for_probes"] else "",
                        fmt(p99), fmt(g(m, "probe", "login_ms", "p50")), g(m, "probe", "ops") or 0,
                        g(m, "probe", "errors") or 0, m["alive_after"], m["held_during_probes"]),
                    verdict_n))
    for r in [r for r in runs if r["test"] == "fleet" and r["state"] == "redis"]:
        x = r.get("redis_round_trips_waited_per_login")
        out.append(("Redis round trips a %s login waits for ≤ 1 (two instances behind HAProxy)" % r["proto"].upper(),
                    "%s (all: %s)" % (fmt(x, 2), ", ".join("%s %.2f" % kv
                                                          for kv in r["redis_round_trips_per_login"].items())),
                    verdict(x, x is not None and x <= 1.0)))
    return out


def _mid(a, b):
    return None if a is None or b is None else (a + b) / 2


def render_peers(lab):
    """The lab run's figures, mmproxy beside nginx and the Dovecot proxy (--peers)."""
    peers = peers_of(lab)
    meta = lab.get("meta", {})
    rows = (("IMAP warm (random users), CPU-s/1000", "imap_warm_cpu_s_per_1000", 3),
            ("IMAP cold (a search and a bind each), CPU-s/1000", "imap_cold_cpu_s_per_1000", 3),
            ("POP3 warm, CPU-s/1000", "pop3_cpu_s_per_1000", 3),
            ("POP3 cold, CPU-s/1000", "pop3_cold_cpu_s_per_1000", 3),
            ("IMAP hot50, CPU-s/1000", "imap_hot_cpu_s_per_1000", 3),
            ("implicit-TLS IMAP (full handshake), CPU-s/1000", "imaps_cpu_s_per_1000", 3),
            ("relay CPU-s per GB", "bulk_cpu_s_per_gb", 3),
            ("bulk MB/s", "bulk_mb_s", 1),
            ("KB per idle session, RSS", "kb_per_session_rss", 1),
            ("IMAP logins/s (C=16), random / hot50", None, 0))
    eps = [e for e in ("nginx", "dovecot", "mmproxy", "direct") if e in peers]
    L = ["", "## Beside the peers (one lab run)", "",
         "The peers' lab (a separate benchmark, not part of this project) ran nginx, the Dovecot proxy and mmproxy "
         "(through its plugin, this tree) in one run on this machine, %s, %s mode, %s users: the same clients, "
         "directory and stores for all, so its figures compare directly (its method: the lab's README). Its JSON is "
         "`%s`." % (meta.get("date", "?"), meta.get("mode", "?"), meta.get("users", "?"), lab.get("_path", "?")),
         "", "| | " + " | ".join(PEER_NAMES.get(e, e) for e in eps) + " |", "|---|" + "---|" * len(eps)]
    for name, key, nd in rows:
        if key is None:
            cells = ["%s / %s" % (fmt(g(peers[e], "imap_rate", "16")), fmt(peers[e].get("imap_hot_rate"))) for e in eps]
        else:
            cells = [fmt(peers[e].get(key), nd) for e in eps]
        L.append("| %s | %s |" % (name, " | ".join(cells)))
    return L


def render(b, runs, meta):
    c = b.cfg
    L = []
    w = L.append
    w("# mmproxy benchmark results (%s run)" % meta["mode"])
    w("")
    w("Generated by `%s` on %s in %s s. Method: bench/README.md." % (meta["command"], meta["date"], meta["wall_s"]))
    w("")
    v = meta["versions"]
    w("Machine: %s CPUs (%s), %s GiB, kernel %s, `ulimit -Hn` %s. Python %s, gevent %s, greenlet %s, "
      "python-ldap %s, %s; Dovecot %s; slapd %s. mmproxy %s, NumThreads %s." % (
          v["nproc"], v["cpu"], v["mem_gib"], v["kernel"], v["nofile_hard"], v["python"], v["gevent"], v["greenlet"],
          v["python-ldap"], v["openssl"], v["dovecot"], v["slapd"], v["mmproxy"], b.args.threads))
    w("")
    w("Machine speed during the run (CPU µs for a fixed pure-Python workload, lower is faster; the VM's "
      "speed drifts with its neighbours, and every CPU figure below with it): %s. OpenSSL RSA-2048 sign: %s ms "
      "(the floor of a full handshake's server-side cost)." % (
          ", ".join("%s %s" % kv for kv in meta["calibration_us"]), meta["rsa2048_sign_ms"]))
    w("")
    w("Setup: %d LDAP users; runs of %g s; clients from %d load processes (gevent), on the same CPUs as "
      "everything else; 127.0.0.1 -> mmproxy -> stores on 127.0.0.2/127.0.0.3. CPU is the proxy's process tree "
      "(every thread, exited ones too, + reaped children). \"outside load\" = cores the machine spent outside "
      "this benchmark during a run (e.g. other containers on the same VM); \"slowdown\" = the calibration "
      "workload's time just before the run over its best time in this run (neighbours on the host slow the VM "
      "without showing as load). Before each run the benchmark waits (bounded) for < 0.25 cores of outside load "
      "and < ×1.25; runs above %.1f cores or at ×1.25 and more are marked ⚠: their rates, latencies and CPU "
      "figures are disturbed." % (c["users"], c["duration"], c["procs"], DISTURBED))
    if not b.pop_ok:
        w("")
        w("**POP3 through mmproxy: n/a (%s).** Direct POP3 is measured; re-run when the POP service lands."
          % (b.pop_note or "POP service not available"))
    w("")
    w("## Targets")
    w("")
    w("| target | measured | verdict |")
    w("|---|---|---|")
    for t in targets(b, runs, b.lab):
        w("| %s | %s | %s |" % t)
    if b.lab:
        L.extend(render_peers(b.lab))
    for proto, name in (("imap", "IMAP"), ("pop3", "POP3"), ("imaps", "IMAPS (implicit TLS, full handshake each)")):
        rows = [r for r in runs if r["test"] == proto + "_login"]
        w("")
        w("## %s logins" % name)
        w("")
        if proto == "imap":
            w("connect, greeting, LOGIN, SELECT INBOX, LOGOUT. cold = every user once, in a freshly started "
              "mmproxy (empty caches); random = users drawn from all %d after the cold passes (warm caches); "
              "%s = the first %d users. Latency: whole session / connect to LOGIN OK."
              % (c["users"], "hot%d" % c["hot"], c["hot"]))
        elif proto == "pop3":
            w("connect, greeting, USER, PASS, STAT, QUIT.")
            if not b.pop_ok:
                w("")
                w("mmproxy: n/a (%s)." % (b.pop_note or "POP service not available"))
        w("")
        if not rows:
            w("(not run)")
            continue
        w("| endpoint | users | C | logins/s | session p50 / p99 ms | login p50 / p99 ms | errors | "
          "CPU-s per 1000: proxy | slapd | stores | client | outside load: cores / slowdown |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            k = r["cpu_s_per_1000"] or {}
            w("| %s | %s | %d | %s | %s / %s | %s / %s | %s | %s | %s | %s | %s | %s |" % (
                r["endpoint"], r["users"], r["concurrency"], r["rate"],
                fmt(r["lat_ms"]["p50"]), fmt(r["lat_ms"]["p99"]),
                fmt(r["login_ms"]["p50"]), fmt(r["login_ms"]["p99"]), r["errors"],
                "**%s**" % fmt(k.get("proxy"), 3) if r["endpoint"] == "mmproxy" else "–",
                fmt(k.get("slapd"), 3), fmt(k.get("stores"), 3), fmt(k.get("client"), 3), other_load(r)))
        if proto == "imaps":
            w("")
            w("TLS handshake cost per login (mmproxy, IMAPS minus plain IMAP, random users):")
            w("")
            for cc in c["conc"]:
                t = g(find(runs, test="imaps_login", concurrency=cc, users="random"), "cpu_s_per_1000", "proxy")
                p = g(find(runs, test="imap_login", endpoint="mmproxy", concurrency=cc, users="random"),
                      "cpu_s_per_1000", "proxy")
                if t is not None and p is not None:
                    w("- C=%d: %s − %s = **%s ms CPU** per login" % (cc, fmt(t, 3), fmt(p, 3), fmt(t - p, 3)))
    frows = [r for r in runs if r["test"] == "fleet"]
    if frows:
        w("")
        w("## A fleet: two instances behind HAProxy, state local or shared through Redis")
        w("")
        w("Two mmproxy processes (NumThreads 1 each) behind HAProxy (TCP mode, `send-proxy-v2`, round robin), "
          "logins at C=16 through HAProxy, random users after a cold pass; first each instance keeps its "
          "per-client state to itself, then both share it through one redis-server (`StateRedisURL`). CPU per "
          "1000 logins: both instances together, HAProxy, Redis. Redis commands are counted by the server "
          "(INFO commandstats, commands run by scripts included); the configuration has ConnLimits and BadGuys on.")
        w("")
        w("| state | protocol | logins/s | login p50 / p99 ms | errors | CPU-s per 1000: proxies | HAProxy | "
          "Redis | round trips per login waited for (all, by operation) | Redis commands per login |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for r in frows:
            k = r["cpu_s_per_1000"] or {}
            trips = r.get("redis_round_trips_per_login") or {}
            w("| %s | %s | %s | %s / %s | %s | **%s** | %s | %s | **%s** (%s) | %s |" % (
                r["state"], r["proto"], r["rate"], fmt(r["login_ms"]["p50"]), fmt(r["login_ms"]["p99"]),
                r["errors"], fmt(k.get("proxy"), 3), fmt(k.get("haproxy"), 3), fmt(k.get("redis"), 3),
                r.get("redis_round_trips_waited_per_login", 0),
                ", ".join("%s %.2f" % kv for kv in trips.items()) or "none", r["redis_commands_per_login"]))
        for r in runs:
            if r["test"] == "fleet_relay":
                w("")
                w("Relaying: %d FETCHes of the large message (%.0f MB) through HAProxy with Redis, in %s s: the "
                  "proxies' round trips %s, all of them their logins' and lease renewals (every 10 s); none per "
                  "relayed byte." % (r["fetches"], r["bytes"] / 1e6, r["seconds"], r["redis_round_trips"] or "none"))
    crows = [r for r in runs if r["test"] == "contention"]
    if crows:
        w("")
        w("## CPU contention")
        w("")
        w("IMAP logins at C=16 with nothing else running and then with %d processes spinning on the CPUs (one "
          "per CPU here: other work on the machine), with NumThreads 1 and 2. \"hot/random\" is the hot50 "
          "rate over the random-user rate in the same conditions." % BUSY_CORES)
        w("")
        w("| NumThreads | spinning | random: logins/s | hot50: logins/s | hot/random | login p99 ms random / hot "
          "| CPU-s per 1000 random / hot |")
        w("|---|---|---|---|---|---|---|")
        for threads in sorted({r["threads"] for r in crows}):
            for busy in sorted({r["spinning"] for r in crows}):
                rr = find(crows, threads=threads, spinning=busy, users="random")
                rh = find(crows, threads=threads, spinning=busy, users="hot%d" % c["hot"])
                if rr is None or rh is None:
                    continue
                w("| %d | %d | %s | %s | %s | %s / %s | %s / %s |" % (
                    threads, busy, rr["rate"], rh["rate"], fmt(rh["rate"] / rr["rate"] if rr["rate"] else None),
                    fmt(rr["login_ms"]["p99"]), fmt(rh["login_ms"]["p99"]),
                    fmt(g(rr, "cpu_s_per_1000", "proxy"), 3), fmt(g(rh, "cpu_s_per_1000", "proxy"), 3)))
    w("")
    w("## Bulk FETCH")
    w("")
    w("`FETCH 2 BODY.PEEK[]` of a %g MiB (%.1f MB) message, %d times, one connection each (MB/s = 10^6 bytes "
      "per second of FETCH time, median)." % (c["large_mb"], b.large_bytes / 1e6, c["reps"]))
    w("")
    w("| endpoint | MB/s median | all runs | errors | CPU-s per GB: proxy | stores | client "
      "| outside load: cores / slowdown |")
    w("|---|---|---|---|---|---|---|---|")
    for r in [r for r in runs if r["test"] == "bulk"]:
        k = r["cpu_s_per_gb"] or {}
        w("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["endpoint"], r["mb_s"]["median"], ", ".join(map(str, r["mb_s"]["all"])), r["errors"],
            "**%s**" % fmt(k.get("proxy"), 3) if r["endpoint"] == "mmproxy" else "–", fmt(k.get("stores"), 3),
            fmt(k.get("client"), 3), other_load(r)))
    w("")
    w("## Idle sessions")
    w("")
    w("K sessions LOGIN, SELECT INBOX, IDLE from several load processes and stay open. Memory: the proxy's "
      "processes before and after opening (RSS from statm, PSS from smaps_rollup). Then %d fresh logins, one "
      "at a time, while the sessions are held; then every held session must answer DONE with its tagged OK."
      % c["probes"])
    w("")
    w("| endpoint | K requested | opened (errors) | open s | KB/session RSS | KB/session PSS "
      "| proxy RSS before → after MB | proxy fds after | login p50 / p99 ms while held | session p99 ms "
      "| probe errors | alive after | outside load: cores / slowdown |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in [r for r in runs if r["test"] == "idle"]:
        w("| %s%s | %d | %d (%d) | %s | %s | %s | %s | %s | %s / %s | %s | %s | %d / %d | %s |" % (
            r["endpoint"],
            (" TLS" if r["tls"] else "") + (" NumThreads %s" % r["threads"] if r["threads"] not in (1, None) else ""),
            r["requested"], r["opened"], r["open_errors"], r["open_s"],
            fmt(r["kb_per_session_rss"]), fmt(r["kb_per_session_pss"]),
            "%.1f → %.1f" % (r["proxy_mem_before"]["rss_kb"] / 1024, r["proxy_mem_after"]["rss_kb"] / 1024)
            if r["endpoint"] == "mmproxy" else "–", r["proxy_fds_after"] if r["endpoint"] == "mmproxy" else "–",
            fmt(g(r, "probe", "login_ms", "p50")), fmt(g(r, "probe", "login_ms", "p99")),
            fmt(g(r, "probe", "lat_ms", "p99")), g(r, "probe", "errors"), r["alive_after"], r["held_during_probes"],
            other_load(r)))
    obs = []
    for proto, name in (("imap", "IMAP"), ("pop3", "POP3")):
        for users in ("random", "cold"):
            d = find(runs, test=proto + "_login", endpoint="direct", concurrency=1, users=users)
            m = find(runs, test=proto + "_login", endpoint="mmproxy", concurrency=1, users=users)
            if g(d, "lat_ms", "p50") is not None and g(m, "lat_ms", "p50") is not None:
                obs.append("%s, %s users, C=1: mmproxy adds %.2f ms to a session (p50 %.2f vs %.2f ms direct); "
                           "%s logins/s vs %s." % (name, users, m["lat_ms"]["p50"] - d["lat_ms"]["p50"],
                                                    m["lat_ms"]["p50"], d["lat_ms"]["p50"], m["rate"], d["rate"]))
    t = find(runs, test="imaps_login", concurrency=1)
    if g(t, "lat_ms", "p50") is not None:
        obs.append("IMAPS C=1: session p50 %.2f ms, %s logins/s." % (t["lat_ms"]["p50"], t["rate"]))
    if obs:
        w("")
        w("## Added latency")
        w("")
        for o in obs:
            w("- " + o)
    profiles = os.path.join(HERE, "profiles.md")
    if os.path.exists(profiles):
        w("")
        with open(profiles) as f:
            w(f.read().rstrip("\n"))
    notes = [(r["label"], r["err_samples"]) for r in runs if r.get("err_samples")]
    notes += [(r["label"], [r["note"]]) for r in runs if r.get("note")]
    notes += [(r["label"] + " (dead after)", r["dead_samples"]) for r in runs if r.get("dead_samples")]
    if notes or b.notes:
        w("")
        w("## Notes and error samples")
        w("")
        for n in b.notes:
            w("- %s" % n)
        for label, samples in notes:
            w("- %s: %s" % (label, "; ".join(str(s)[:200] for s in samples[:3])))
    w("")
    w("Configuration: mmproxy %s; AService NumThreads %s. Stores: MailStack(store_conf=...) with %s" % (
        ", ".join("%s %s" % (k, v) for k, v in PROXY_SERVICE.items()), b.args.threads,
        " ".join(ln.strip() for ln in STORE_CONF.strip().splitlines()[1:])))
    w("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 users, 3 s runs, C=16 only, K=300 (< 3 min)")
    ap.add_argument("--threads", type=int, default=1, help="AService.cfg NumThreads for mmproxy (default 1)")
    ap.add_argument("--max-threads", type=int, default=2,
                    help="when --threads processes cannot hold --max-sessions, repeat that test with this "
                         "NumThreads (default 2; 0: never)")
    ap.add_argument("--users", type=int, help="LDAP users (full 1000, quick 200)")
    ap.add_argument("--duration", type=float, help="seconds per timed run (full 10, quick 3)")
    ap.add_argument("--conc", help="concurrencies, e.g. 1,16,64")
    ap.add_argument("--sessions", type=int, help="idle sessions for the memory figure (full 2000, quick 300)")
    ap.add_argument("--tls-sessions", type=int, help="idle TLS sessions (default = --sessions)")
    ap.add_argument("--max-sessions", type=int, help="the largest idle test (full 10000, quick 1000)")
    ap.add_argument("--reps", type=int, help="bulk FETCHes per endpoint (full 8, quick 4)")
    ap.add_argument("--large-mb", type=float, help="size of the bulk message in MB (20)")
    ap.add_argument("--tests", default="pop,imap,tls,contention,fleet,bulk,idle",
                    help="subset of pop,imap,tls,contention,fleet,bulk,idle")
    ap.add_argument("--no-pop", action="store_true", help="run mmproxy without its POP service")
    ap.add_argument("--out", help="report file (default bench/RESULTS.md, quick: bench/RESULTS-quick.md); "
                                  "the raw runs go next to it as .json")
    ap.add_argument("--peers", metavar="JSON", default=PEERS if os.path.exists(PEERS) else None,
                    help="a peers' lab run's JSON (nginx, Dovecot and mmproxy in one run): its figures beside "
                         "this run's, and the login targets judged against the peers in it (default "
                         "bench/peers-lab.json; '' for none)")
    ap.add_argument("--profile", metavar="DIR",
                    help="sample mmproxy with py-spy during its login runs: collapsed stacks in DIR, summaries "
                         "in the .json (the sampling costs the proxy CPU: not for the figures)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs of slapd, Dovecot, mmproxy)")
    a = ap.parse_args()
    cfg = dict(QUICK if a.quick else FULL)
    for key in ("users", "duration", "sessions", "tls_sessions", "max_sessions", "reps", "large_mb"):
        if getattr(a, key) is not None:
            cfg[key] = getattr(a, key)
    if a.sessions is not None and a.tls_sessions is None:
        cfg["tls_sessions"] = a.sessions
    if a.conc:
        cfg["conc"] = [int(x) for x in a.conc.split(",")]
    a.tests = set(a.tests.split(","))
    out = a.out or os.path.join(HERE, "RESULTS-quick.md" if a.quick else "RESULTS.md")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):   # SIGINT too: a background job ignores it
        signal.signal(sig, on_term)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))    # the stores and mmproxy inherit it

    t0 = time.time()
    b = Bench(cfg, a)
    try:
        b.start()
        b.plan()
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "mode": "quick" if a.quick else "full",
                "command": " ".join(["bench/bench.py"] + sys.argv[1:]), "config": cfg, "versions": versions(),
                "pop": b.pop_ok, "pop_note": b.pop_note, "threads": a.threads, "store_conf": STORE_CONF,
                "proxy_service": PROXY_SERVICE, "calibration_us": b.calibration, "rsa2048_sign_ms": rsa_sign_ms(),
                "wall_s": round(time.time() - t0)}
        md = render(b, b.runs, meta)
        with open(out, "w") as f:
            f.write(md)
        with open(os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({"meta": meta, "targets": targets(b, b.runs), "runs": b.runs}, f, indent=1)
        print(md)
        log("wrote %s (+ .json) in %d s" % (os.path.relpath(out), time.time() - t0))
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        b.stop()


if __name__ == "__main__":
    sys.exit(main())
