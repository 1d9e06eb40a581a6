"""The operator commands as an operator runs them: check-config, start, status, stop, SIGTERM."""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from mmproxy.testing.base import free_port, port_open
from mmproxy.testing.proxy import write_cfg

from helpers import RawClient, proxy_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mmproxy(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "mmproxy", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_check_config_on_the_shipped_templates(tmp_path):
    for name in ("AService", "ImapProxyAService", "PopProxyAService"):
        shutil.copy(os.path.join(ROOT, "cfg", name + "-def.cfg"), tmp_path / (name + ".cfg"))
    r = mmproxy("check-config", "--config-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 errors" in r.stdout and "Traceback" not in r.stdout + r.stderr


def test_check_config_reports_file_line_and_exits_nonzero(tmp_path):
    write_cfg(str(tmp_path / "AService.cfg"), {"ServiceList": "/opt/lib/ImapProxyAService@%d" % free_port()})
    (tmp_path / "ImapProxyAService.cfg").write_text(
        "# legacy\ndefault:PreAuht yes\ndefault:Timeout 60\ndefault:BacksidePort notaport\n")
    r = mmproxy("check-config", "--config-dir", str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 1
    f = str(tmp_path / "ImapProxyAService.cfg")
    assert '%s:2: ' % f in out and "PreAuth" in out           # did you mean
    assert '%s:3: warning: ' % f in out                         # Timeout below the RFC's advice
    assert '%s:4: ' % f in out
    assert "Traceback" not in out


def test_unknown_service_stops_start_with_a_clear_message(tmp_path):
    write_cfg(str(tmp_path / "AService.cfg"), {"ServiceList": "/opt/lib/HttpProxyAService@%d" % free_port()})
    r = mmproxy("start", "--foreground", "--config-dir", str(tmp_path))
    assert r.returncode != 0
    assert "HttpProxyAService" in r.stderr and "Traceback" not in r.stderr


def test_start_creates_missing_files_and_sigterm_stops(tmp_path):
    port = free_port("127.0.0.1")
    write_cfg(str(tmp_path / "AService.cfg"), {
        "ServiceList": "/opt/SUNWmsgsr/lib/ImapProxyAService@127.0.0.1:%d" % port, "LogDir": str(tmp_path)})
    p = subprocess.Popen([sys.executable, "-m", "mmproxy", "start", "--foreground", "--config-dir", str(tmp_path)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 20
        while not port_open("127.0.0.1", port):
            assert p.poll() is None and time.time() < deadline, p.stdout.read() if p.poll() is not None else "slow"
            time.sleep(0.05)
        assert (tmp_path / "ImapProxyAService.cfg").exists() and (tmp_path / "ImapProxyAService-def.cfg").exists()
        assert (tmp_path / "mmproxy.pid").read_text().strip() == str(p.pid)
        c = RawClient("127.0.0.1", port)
        assert c.readline().startswith(b"* OK [CAPABILITY IMAP4rev1")
        again = mmproxy("start", "--foreground", "--config-dir", str(tmp_path))
        assert again.returncode != 0 and "already running" in again.stderr
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert b"* BYE" in c.read_all()                        # a session still logging in is told
        assert not (tmp_path / "mmproxy.pid").exists()
    finally:
        if p.poll() is None:
            p.kill()
        p.stdout.close()


def test_daemon_start_status_stop(tmp_path):
    port = free_port("127.0.0.1")
    write_cfg(str(tmp_path / "AService.cfg"), {
        "ServiceList": "/opt/SUNWmsgsr/lib/ImapProxyAService@127.0.0.1:%d" % port, "LogDir": str(tmp_path)})
    write_cfg(str(tmp_path / "ImapProxyAService.cfg"), {
        "Capability": "IMAP4 IMAP4rev1 ACL QUOTA NAMESPACE X-NETSCAPE", "Banner": "legacy banner"})
    check = mmproxy("check-config", "--config-dir", str(tmp_path))
    assert check.returncode == 0 and "X-NETSCAPE" in check.stdout     # honoured, with a warning
    r = mmproxy("start", "--config-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    try:
        c = RawClient("127.0.0.1", port)
        greeting = c.readline()
        assert greeting.startswith(b"* OK [CAPABILITY IMAP4 IMAP4rev1 ACL QUOTA NAMESPACE X-NETSCAPE ")
        assert greeting.endswith(b"] legacy banner\r\n")
        st = mmproxy("status", "--json", "--config-dir", str(tmp_path))
        info = json.loads(st.stdout)
        assert info["running"] and info["services"][0]["listeners"] == ["127.0.0.1:%d" % port]
    finally:
        s = mmproxy("stop", "--config-dir", str(tmp_path))
    assert s.returncode == 0 and "stopped" in s.stdout
    assert mmproxy("status", "--config-dir", str(tmp_path)).returncode == 3


@pytest.mark.parametrize("cmd", [["--help"], ["start", "--help"], ["params"]])
def test_help_and_params(cmd):
    r = mmproxy(*cmd)
    assert r.returncode == 0 and r.stdout
    if cmd == ["params"]:
        assert "ServerDownAlert" in r.stdout and "LdapURL" in r.stdout


def test_out_of_descriptors_pauses_accepts_without_spinning(mail_stack):
    """EMFILE on accept: no busy loop, no crash, and service resumes when descriptors free up."""
    from mmproxy.testing.proxy import Proxy
    p = Proxy(mail_stack.info(), imap={"ConnLimits": "0.0.0.0|0.0.0.0:1000"})
    p.wrapper = ["prlimit", "--nofile=48"]
    with p:
        conns = []
        for _ in range(80):                     # more than the proxy can hold
            try:
                conns.append(socket.create_connection((p.host, p.imap_port), timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        cpu0 = _cpu_seconds(p.proc.pid)
        time.sleep(2)
        assert _cpu_seconds(p.proc.pid) - cpu0 < 0.5, "the proxy spins while out of descriptors"
        for c in conns:
            c.close()
        time.sleep(1.5)                         # the paused listener resumes within its backoff
        c = RawClient(p.host, p.imap_port)
        assert c.readline().startswith(b"* OK")
        assert p.proc.poll() is None
        assert "pausing accepts" in p.output() and "Traceback" not in p.output()


def _cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_be_the_user_after_binding(mail_stack, tmp_path):
    """BeTheUser/BeTheGroup: the ports are bound as root, the sessions run as the named user."""
    import pwd

    from mmproxy.testing.proxy import Proxy
    nobody = pwd.getpwnam("nobody")
    p = Proxy(mail_stack.info(), aservice={"BeTheUser": "nobody", "BeTheGroup": "nogroup"})
    os.chmod(p.log_dir, 0o777)
    with p:
        with open("/proc/%d/status" % p.proc.pid) as f:
            ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid", "Gid"))}
        assert ids["Uid"][0] == str(nobody.pw_uid) and ids["Gid"][0] == str(nobody.pw_gid)
        c = RawClient(p.host, p.imap_port)
        c.expect(b"* OK")
        c.send(b'a LOGIN alice "alice-pw"\r\n')
        assert c.expect(b"a ").startswith(b"a OK")
    # NumThreads 2: the master (root) makes the AService log; the workers (nobody) write to it too
    p = Proxy(mail_stack.info(), aservice={"BeTheUser": "nobody", "BeTheGroup": "nogroup", "NumThreads": 2})
    os.chmod(p.log_dir, 0o777)
    with p:
        deadline = time.monotonic() + 10
        # the master says it started once its workers listen (it told systemd READY=1 then)
        while "started (pid %d) with 2 worker processes" % p.proc.pid not in proxy_log(p):
            assert time.monotonic() < deadline, p.output()
            time.sleep(0.1)
        assert "worker 1 started" in proxy_log(p)
        assert "Permission denied" not in p.output()
        assert {os.stat(f).st_uid for f in glob.glob(os.path.join(p.log_dir, "*.log"))} == {nobody.pw_uid}
    write_cfg(str(tmp_path / "AService.cfg"), {"ServiceList": "/opt/lib/ImapProxyAService@%d" % free_port(),
                                               "BeTheUser": "no-such-user-here"})
    write_cfg(str(tmp_path / "ImapProxyAService.cfg"), {})
    r = mmproxy("check-config", "--config-dir", str(tmp_path))
    assert r.returncode == 1 and "AService.cfg:3: BeTheUser no-such-user-here: no such user" in r.stdout
