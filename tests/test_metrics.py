"""Prometheus metrics (MetricsAddress): scraped with a real HTTP client after real IMAP and POP
logins, parsed with prometheus_client's own parser; one process, NumThreads 2, and off."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from mmproxy.testing.base import free_port
from mmproxy.testing.proxy import Proxy

from helpers import RawClient, imap_login, pop_login, until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def who(p):
    r = subprocess.run([sys.executable, "-m", "mmproxy", "who", "--json", "--config-dir", p.config_dir],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    return json.loads(r.stdout)


def scrape(port):
    """{(sample name, frozenset of labels): value} of one scrape of http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset((k, v) for k, v in s.labels.items() if k != "instance_name")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0)


def bad_imap(p, user="alice", source="127.0.0.1"):
    c = RawClient(p.host, p.imap_port, source=source)
    c.expect(b"* OK")
    c.send(b'b LOGIN %s "wrong"\r\n' % user.encode())
    assert c.expect(b"b ").startswith(b"b NO [AUTHENTICATIONFAILED]")
    return c


def bad_pop(p):
    c = RawClient(p.host, p.pop_port)
    c.expect(b"+OK")
    c.send(b"USER alice\r\nPASS wrong\r\n")
    c.expect(b"+OK")
    assert c.expect(b"-ERR").startswith(b"-ERR [AUTH]")
    return c


def test_metrics_after_real_logins(mail_stack):
    users = mail_stack.info()["users"]
    port = free_port("127.0.0.1")
    with Proxy(mail_stack.info(), pop={}, imap={"ConnLimits": "127.0.0.77|255.255.255.255:1", "BGPenalty": 1},
               aservice={"MetricsAddress": "127.0.0.1:%d" % port, "InstanceName": "box-7"}) as p:
        i = imap_login(p, "alice", users["alice"]["password"])
        o = pop_login(p, "bob", users["bob"]["password"])
        held = [bad_imap(p, source="127.0.0.33"), bad_imap(p, source="127.0.0.33"), bad_pop(p)]   # BadGuys: the
        g = RawClient(p.host, p.imap_port, source="127.0.0.22")     # second waits; gina's filter refuses .22
        g.expect(b"* OK")
        g.send(b'g LOGIN gina "%s"\r\n' % users["gina"]["password"].encode())
        assert g.expect(b"g ").startswith(b"g NO")
        first = RawClient(p.host, p.imap_port, source="127.0.0.77")
        first.expect(b"* OK")
        over = RawClient(p.host, p.imap_port, source="127.0.0.77")   # ConnLimits: one from this address
        assert over.readline().startswith(b"* BYE")
        held += [g, first, over]
        i.send(b"x SELECT INBOX\r\n")
        i.skip_to(b"x OK")
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
            samples = [x for f in text_string_to_metric_families(r.read().decode()) for x in f.samples]
        assert samples and all(x.labels.get("instance_name") == "box-7" for x in samples)   # InstanceName
        s = scrape(port)
        assert value(s, "mmproxy_processes") == 1
        assert value(s, "mmproxy_logins_total", service="imap", outcome="ok") == 1
        assert value(s, "mmproxy_logins_total", service="imap", outcome="auth_failed") == 2
        assert value(s, "mmproxy_logins_total", service="imap", outcome="access_denied") == 1
        assert value(s, "mmproxy_logins_total", service="pop", outcome="ok") == 1
        assert value(s, "mmproxy_logins_total", service="pop", outcome="auth_failed") == 1
        assert value(s, "mmproxy_refusals_total", service="imap", reason="connlimits") == 1
        assert value(s, "mmproxy_refusals_total", service="imap", reason="access_filter") == 1
        assert value(s, "mmproxy_refusals_total", service="imap", reason="badguys") == 1
        assert value(s, "mmproxy_sessions", service="imap", state="relaying") == 1
        assert value(s, "mmproxy_sessions", service="pop", state="relaying") == 1
        assert value(s, "mmproxy_sessions", service="imap", state="pre_login") == 4     # 2 bad, gina, first
        assert value(s, "mmproxy_sessions", service="pop", state="pre_login") == 1
        assert value(s, "mmproxy_relay_bytes_total", service="imap", direction="client_to_store") == len(
            b"x SELECT INBOX\r\n")
        assert value(s, "mmproxy_relay_bytes_total", service="imap", direction="store_to_client") > 100
        # six logins: the domain (once per service) and four users looked up, then from the cache; a PreAuth
        # bind for each (none cached yet: failures are not)
        assert value(s, "mmproxy_directory_cache_misses_total", cache="ldap") >= 5
        assert value(s, "mmproxy_directory_cache_hits_total", cache="ldap") >= 5
        assert value(s, "mmproxy_directory_cache_misses_total", cache="auth") == 6
        assert value(s, "mmproxy_directory_request_seconds_count", op="bind") == 6
        assert value(s, "mmproxy_directory_request_seconds_bucket", op="bind", le="+Inf") == 6
        assert 5 <= value(s, "mmproxy_directory_request_seconds_count", op="search") <= value(
            s, "mmproxy_directory_cache_misses_total", cache="ldap")       # a miss may look up a node too
        assert 0 < value(s, "mmproxy_directory_request_seconds_sum", op="bind") < 5
        assert value(s, "mmproxy_store_login_seconds_count", service="imap") == 1
        assert value(s, "mmproxy_store_login_seconds_count", service="pop") == 1
        # the same counters as status
        st = subprocess.run([sys.executable, "-m", "mmproxy", "status", "--json", "--config-dir", p.config_dir],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert json.loads(st.stdout)["total"] == {
            "imap": {"pre_login": 4, "relaying": 1, "logins": 1, "failures": 3},
            "pop": {"pre_login": 1, "relaying": 1, "logins": 1, "failures": 1}}
        o.send(b"QUIT\r\n")
        o.expect(b"+OK")
        until(lambda: value(scrape(port), "mmproxy_sessions", service="pop", state="relaying") == 0)
        s = scrape(port)
        assert value(s, "mmproxy_relay_bytes_total", service="pop", direction="client_to_store") == len(b"QUIT\r\n")
        again = imap_login(p, "alice", users["alice"]["password"])      # now cached
        s2 = scrape(port)
        assert value(s2, "mmproxy_directory_cache_hits_total", cache="auth") == 1
        assert value(s2, "mmproxy_logins_total", service="imap", outcome="ok") == 2
        with urllib.request.urlopen("http://127.0.0.1:%d/anything" % port, timeout=10) as r:
            assert b"mmproxy_logins_total" in r.read()
        req = urllib.request.Request("http://127.0.0.1:%d/metrics" % port, method="POST", data=b"x")
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("POST accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 405
        again.send(b"z LOGOUT\r\n")
        assert p.proc.poll() is None and "Traceback" not in p.output()


def test_metrics_of_two_workers_added_up(mail_stack):
    users = mail_stack.info()["users"]
    port = free_port("127.0.0.1")
    with Proxy(mail_stack.info(), pop={}, aservice={"NumThreads": 2, "MetricsAddress": "127.0.0.1:%d" % port}) as p:
        until(lambda: _processes(port) == 2)
        clients, workers = [], set()
        while workers != {0, 1}:
            assert len(clients) < 40, "every session went to one worker"
            source = "127.0.0.%d" % (90 + len(clients) % 4)
            clients.append(imap_login(p, "alice", users["alice"]["password"], source=source))
            workers = {r["worker"] for r in who(p)}
        clients.append(pop_login(p, "alice", users["alice"]["password"]))
        clients.append(bad_imap(p))
        n = len(clients) - 2
        for _ in range(6):                     # whichever worker takes the scrape answers for both
            s = scrape(port)
            assert value(s, "mmproxy_processes") == 2
            assert value(s, "mmproxy_logins_total", service="imap", outcome="ok") == n
            assert value(s, "mmproxy_logins_total", service="imap", outcome="auth_failed") == 1
            assert value(s, "mmproxy_logins_total", service="pop", outcome="ok") == 1
            assert value(s, "mmproxy_sessions", service="imap", state="relaying") == n
            assert value(s, "mmproxy_store_login_seconds_count", service="imap") == n


def _processes(port):
    """How many processes a scrape heard from; 0 while the endpoint is not up yet."""
    try:
        return value(scrape(port), "mmproxy_processes")
    except urllib.error.URLError:
        return 0


def test_metrics_off_by_default(mail_stack):
    with Proxy(mail_stack.info()) as p:
        assert _listening_ports(p.proc.pid) == {p.imap_port}
        c = RawClient(p.host, p.imap_port)
        c.expect(b"* OK")


def _listening_ports(pid):
    """The TCP ports process ``pid`` listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open("/proc/%d/net/%s" % (pid, table)) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_address_checked(tmp_path):
    from mmproxy.testing.proxy import write_cfg
    write_cfg(str(tmp_path / "AService.cfg"), {
        "ServiceList": "/opt/lib/ImapProxyAService@127.0.0.1:%d" % free_port(), "MetricsAddress": "127.0.0.1"})
    write_cfg(str(tmp_path / "ImapProxyAService.cfg"), {})
    r = subprocess.run([sys.executable, "-m", "mmproxy", "check-config", "--config-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 1 and "%s:3: MetricsAddress: '127.0.0.1': a port is required" % (
        tmp_path / "AService.cfg") in r.stdout, r.stdout
    # a port that cannot be bound stops start with a clear message
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    write_cfg(str(tmp_path / "AService.cfg"), {
        "ServiceList": "/opt/lib/ImapProxyAService@127.0.0.1:%d" % free_port(),
        "MetricsAddress": "127.0.0.1:%d" % busy.getsockname()[1], "LogDir": str(tmp_path)})
    try:
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "mmproxy", "start", "--foreground", "--config-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert r.returncode != 0 and "MetricsAddress" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert time.monotonic() - start < 20
    finally:
        busy.close()
