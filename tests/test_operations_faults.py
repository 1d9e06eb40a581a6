"""Operating faults found by trying to break issue 10 (refresh, stop, legacy commands, workers):
each test is the input that broke it and the exact lines the client or operator sees now.

Against real slapd and Dovecot (the session's MailStack), mmproxy daemons started as operators do.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mmproxy import pidfile
from mmproxy.testing.base import free_port
from mmproxy.testing.proxy import LIBDIR, Proxy

from helpers import RawClient, greeting, proxy_log, refresh, wait_for_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def aservice_log(p):
    """The AService log files only (proxy_log adds the terminal output, where errors show twice)."""
    return "".join(open(os.path.join(p.log_dir, f)).read() for f in sorted(os.listdir(p.log_dir))
                   if f.startswith("AService_"))


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except OSError:
                continue
    return out


@pytest.fixture
def held_port():
    """A port another program listens on (not ours), for as long as the test runs."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_two_servicelist_entries_of_one_service_file_both_listen(mail_stack, workers):
    """``ImapProxyAService@A ImapProxyAService@B`` (one .cfg file, two entries): check-config
    counts two services, and both ports answered before only at B, at start and after a refresh."""
    a, b = free_port("127.0.0.1"), free_port("127.0.0.1")
    entries = "%s/ImapProxyAService@127.0.0.1:%d %s/ImapProxyAService@127.0.0.1:%d" % (LIBDIR, a, LIBDIR, b)
    p = Proxy(mail_stack.info(), imap={"Banner": "one"}, aservice={"ServiceList": entries, "NumThreads": workers})
    p.ports["imap"] = b                              # what Proxy.start waits for
    with p:
        wait_for_log(p, "started")
        for port in (a, b):
            assert greeting(port).endswith("] one\r\n")
        p.settings["imap"]["Banner"] = "two"
        p.write_config()
        refresh(p, "configuration refreshed")
        time.sleep(0.3)
        for port in (a, b):
            assert greeting(port).endswith("] two\r\n")
        assert "closed 127.0.0.1" not in proxy_log(p)


def test_another_mmproxy_with_workers_on_the_port_is_refused(mail_stack):
    """Two daemons with NumThreads 2 on one port (a staging copy started on production's port):
    the second used to start, its SO_REUSEPORT sharing the port with the first's, and the kernel
    sent it part of the first one's connections.  Now it refuses, as NumThreads 1 does."""
    with Proxy(mail_stack.info(), imap={"Banner": "first"}, aservice={"NumThreads": 2}) as first:
        second = Proxy(mail_stack.info(), imap={"Banner": "second"}, aservice={"NumThreads": 2},
                       imap_port=first.imap_port)
        try:
            second.start()                  # returns at once: the port answers (the first's)
            assert second.proc.wait(20) == 1
            cfg = os.path.join(second.config_dir, "ImapProxyAService.cfg")
            assert ("Error: %s: cannot listen on 127.0.0.1:%d: Address already in use\n" % (cfg, first.imap_port)
                    in second.output())
        finally:
            second.stop()
        assert {greeting(first.imap_port).rsplit("] ", 1)[1] for _ in range(20)} == {"first\r\n"}
        # nor can a refresh of a daemon with workers take it
        with Proxy(mail_stack.info(), aservice={"NumThreads": 2}) as third:
            third.settings["pop"], third.ports["pop"] = {}, first.imap_port
            third.write_config()
            refresh(third, "refresh refused")
            cfg = os.path.join(third.config_dir, "PopProxyAService.cfg")
            assert ("ERROR [aservice] refresh refused: %s: cannot listen on 127.0.0.1:%d: Address already in use"
                    % (cfg, first.imap_port) in proxy_log(third))
            assert {greeting(first.imap_port).rsplit("] ", 1)[1] for _ in range(20)} == {"first\r\n"}


@pytest.mark.timeout(60)
def test_a_refresh_the_workers_cannot_apply_is_refused_by_the_master(mail_stack, held_port):
    """NumThreads 2, a refresh adding a port another program holds: the workers refused it, but the
    master took the configuration, so every worker that replaced a dead one failed to listen,
    with a traceback, again and again (1, 2, 4... s).  Now the master refuses the refresh once
    and a killed worker is replaced by one that serves."""
    with Proxy(mail_stack.info(), imap={"Banner": "kept"}, aservice={"NumThreads": 2}) as p:
        p.settings["pop"], p.ports["pop"] = {"Banner": "new"}, held_port
        p.write_config()
        refresh(p, "refresh refused")
        cfg = os.path.join(p.config_dir, "PopProxyAService.cfg")
        time.sleep(0.5)
        assert aservice_log(p).count("refresh refused") == 1      # the master's line; no worker heard of it
        assert ("ERROR [aservice] refresh refused: %s: cannot listen on 127.0.0.1:%d: Address already in use"
                % (cfg, held_port)) in proxy_log(p)
        workers = children(p.proc.pid)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not set(children(p.proc.pid)) - set(workers):
            assert time.monotonic() < deadline, proxy_log(p)[-3000:]
            time.sleep(0.1)
        wait_for_log(p, "started (pid %d)" % (set(children(p.proc.pid)) - set(workers)).pop())
        assert {greeting(p.imap_port).rsplit("] ", 1)[1] for _ in range(10)} == {"kept\r\n"}
        text = proxy_log(p)
        assert "Traceback" not in text and "failed" not in text


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_start_says_why_in_one_line(mail_stack, tmp_path):
    """A worker replaced while its certificate file is missing (a renewal half done): one line
    naming the file, no traceback, and the next replacement serves once the file is back."""
    from mmproxy.testing.proxy import make_cert
    cert, key = make_cert(str(tmp_path))
    with Proxy(mail_stack.info(), aservice={"NumThreads": 2}, tls=(cert, key)) as p:
        os.rename(key, key + ".moved")
        workers = children(p.proc.pid)
        os.kill(workers[0], signal.SIGKILL)
        text = wait_for_log(p, "cannot start")
        line = [x for x in text.splitlines() if "cannot start" in x][0]
        assert line.split(" ", 2)[2].startswith("ERROR [aservice] worker ")
        assert key in line and "Traceback" not in text
        os.rename(key + ".moved", key)
        deadline = time.monotonic() + 15
        while len(children(p.proc.pid)) < 2 or proxy_log(p).count("started (pid") < 4:
            assert time.monotonic() < deadline, proxy_log(p)[-3000:]
            time.sleep(0.1)
        assert "Traceback" not in proxy_log(p)


def test_workers_do_not_keep_the_masters_pid_file_open(mail_stack):
    """A worker inherited the master's descriptor of the pid file (the first, since-replaced
    inode: ``mmproxy.pid (deleted)``)."""
    with Proxy(mail_stack.info(), aservice={"NumThreads": 2}) as p:
        wait_for_log(p, "with 2 worker processes")
        for pid in children(p.proc.pid):
            fds = os.listdir("/proc/%d/fd" % pid)
            targets = []
            for fd in fds:
                try:
                    targets.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
                except OSError:
                    pass
            assert not [t for t in targets if "mmproxy.pid" in t], targets


# ---------------------------------------------------------------------- refresh: what it may not do
@pytest.mark.parametrize("workers,missing", [(1, "AService.cfg"), (2, "AService.cfg"), (1, "ImapProxyAService.cfg")])
def test_a_refresh_while_a_file_is_missing_changes_nothing(mail_stack, workers, missing):
    """AService.cfg moved away for a moment (an editor's save, a deployment that swaps files) when
    the refresh came: the refresh created a fresh one from the template and applied it, closing
    the configured ports and listening on 0.0.0.0:143, 993 and 110 instead.  A refresh writes
    nothing into the configuration directory: a missing file is an error like any other."""
    with Proxy(mail_stack.info(), imap={"Banner": "kept"}, aservice={"NumThreads": workers}) as p:
        wait_for_log(p, "started")
        before = sorted(os.listdir(p.config_dir))
        path = os.path.join(p.config_dir, missing)
        os.rename(path, os.path.join(p.dir, missing + ".editing"))
        refresh(p, "refresh refused")
        time.sleep(0.5)
        assert ("ERROR [aservice] refresh refused: %s: cannot read: No such file or directory" % path
                in aservice_log(p))
        assert sorted(os.listdir(p.config_dir)) == sorted(set(before) - {missing})
        assert {greeting(p.imap_port).rsplit("] ", 1)[1] for _ in range(6)} == {"kept\r\n"}
        assert "configuration refreshed" not in proxy_log(p)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_refresh_asked_while_the_daemon_starts_does_not_kill_it(mail_stack, workers):
    """``refresh mmp`` finds a daemon by its pid file's lock, which a starting daemon holds before
    it handles SIGHUP: the default action of SIGHUP ended it (and a worker the master had just
    forked).  Now the refresh runs once the daemon serves."""
    p = Proxy(mail_stack.info(), imap={"Banner": "up"}, aservice={"NumThreads": workers})
    p.write_config()
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = open(p.out_file, "ab")
    p.proc = subprocess.Popen(p.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              env=env, start_new_session=True)
    out.close()
    try:
        deadline = time.monotonic() + 20
        while True:                         # what `refresh mmp` does, the moment it can
            pid = pidfile.running_pid(p.config_dir)
            if pid:
                os.kill(pid, signal.SIGHUP)
                break
            assert p.proc.poll() is None and time.monotonic() < deadline, p.output()
        wait_for_log(p, "configuration refreshed", timeout=20)
        assert p.proc.poll() is None
        assert greeting(p.imap_port).endswith("] up\r\n")
        assert "worker 0 (pid" not in proxy_log(p) and "worker 1 (pid" not in proxy_log(p)
    finally:
        p.stop()


# ---------------------------------------------------------------------- stop
def test_stop_does_not_wait_for_a_hung_directory(mail_stack, two_slapds):
    """A login waits on a directory server that accepts and never answers (SIGSTOP) when the
    daemon is told to stop: the client got its goodbye at once, but the daemon waited for the LDAP
    thread until the operation timed out (10 s), more with lookups queued behind it."""
    slapd = two_slapds[0]
    with Proxy(mail_stack.info(), imap={"LdapURL": "%s/o=internet" % slapd.url}) as p:
        c = RawClient("127.0.0.1", p.imap_port)
        c.expect(b"* OK ")
        os.kill(slapd.proc.pid, signal.SIGSTOP)
        c.send(b"a LOGIN alice alice-pw\r\n")
        time.sleep(1)
        t = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        c.expect_lines("* BYE [UNAVAILABLE] Server shutting down")
        c.expect_close()
        assert p.proc.wait(10) == 0
        assert time.monotonic() - t < 3
        assert "Traceback" not in proxy_log(p)


# ---------------------------------------------------------------------- legacy commands
def test_start_msg_with_a_bad_configuration_says_what_is_wrong(mail_stack):
    """``start-msg mmp`` on a directory with an error said only "mmproxy exited with status 1; see
    .../mmproxy.out": the operator saw nothing of what to fix.  The daemon's own words come first."""
    p = Proxy(mail_stack.info())
    p.write_config()
    try:
        cfg = os.path.join(p.config_dir, "ImapProxyAService.cfg")
        with open(cfg, "a") as f:
            f.write("default:LdapCacheTTL banana\n")
        line = sum(1 for _ in open(cfg))
        r = subprocess.run([os.path.join(ROOT, "scripts", "start-msg"), "mmp", "--config-dir", p.config_dir],
                           capture_output=True, text=True, timeout=60, cwd="/",
                           env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMPROXY_CONFIG_DIR")})
        d = p.config_dir
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == ("%s:%d: LdapCacheTTL: not a whole number\n"
                            "%s: 1 error(s); fix them and run `mmproxy check-config --config-dir %s` again\n"
                            "Error: mmproxy exited with status 1; see %s\n"
                            % (cfg, line, d, d, os.path.join(d, "mmproxy.out")))
    finally:
        p.stop()


# ---------------------------------------------------------------------- files root writes
@pytest.mark.parametrize("workers", [1, 2])
def test_root_follows_no_link_planted_where_it_writes(mail_stack, tmp_path, workers):
    """The configuration directory and LogDir may be the BeTheUser account's (the legacy layout),
    and mmproxy writes there as root.  A symbolic link planted as mmproxy.pid made the starting
    daemon empty its target (any file: /etc/shadow), one planted as mmproxy.out or as a log file
    of the day got the daemon's lines appended to its target.  Now each name is made anew as a
    plain file and the targets are untouched."""
    p = Proxy(mail_stack.info(), aservice={"NumThreads": workers})
    p.write_config()
    targets = {}
    day = time.strftime("%Y%m%d")
    names = [os.path.join(p.config_dir, "mmproxy.pid"), os.path.join(p.config_dir, "mmproxy.out"),
             os.path.join(p.log_dir, "AService_%s.log" % day), os.path.join(p.log_dir, "ImapProxy_%s.log" % day)]
    for i, name in enumerate(names):
        target = str(tmp_path / ("precious%d" % i))
        with open(target, "w") as f:
            f.write("precious\n")
        os.symlink(target, name)
        targets[name] = target
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMPROXY_CONFIG_DIR")}
    try:
        r = subprocess.run([os.path.join(ROOT, "scripts", "start-msg"), "mmp", "--config-dir", p.config_dir],
                           capture_output=True, text=True, timeout=60, cwd="/", env=environ)
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
        assert greeting(p.imap_port).startswith("* OK ")
        pid = pidfile.running_pid(p.config_dir)
        deadline = time.monotonic() + 10            # the IMAP log's first line: the session's end
        while os.path.islink(names[3]) and time.monotonic() < deadline:
            time.sleep(0.1)
        for name in names:
            assert not os.path.islink(name) and os.path.isfile(name), name
        assert open(names[0]).read() == "%d\n" % pid
        assert "started" in open(names[2]).read()
        r = subprocess.run([os.path.join(ROOT, "scripts", "stop-msg"), "mmp", "--config-dir", p.config_dir],
                           capture_output=True, text=True, timeout=60, cwd="/", env=environ)
        assert r.returncode == 0, r.stderr
        for target in targets.values():
            assert open(target).read() == "precious\n", target
    finally:
        pid = pidfile.running_pid(p.config_dir)
        if pid:
            os.kill(pid, signal.SIGKILL)
        p.stop()


def test_a_fifo_at_the_pid_file_hangs_no_command(mail_stack):
    """A FIFO planted as mmproxy.pid: ``mmproxy status`` (and stop, refresh, start, which all ask
    who holds the pid file) blocked for ever opening it."""
    p = Proxy(mail_stack.info())
    p.write_config()
    try:
        os.mkfifo(os.path.join(p.config_dir, "mmproxy.pid"))
        environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMPROXY_CONFIG_DIR")}
        r = subprocess.run([os.path.join(ROOT, "scripts", "stop-msg"), "mmp", "--config-dir", p.config_dir],
                           capture_output=True, text=True, timeout=30, cwd="/", env=environ)
        assert (r.returncode, r.stdout, r.stderr) == (
            1, "", "Error: not running (no process holds %s)\n" % os.path.join(p.config_dir, "mmproxy.pid"))
    finally:
        p.stop()


# ---------------------------------------------------------------------- rotate-logs
def test_rotate_logs_leaves_what_is_not_a_log_file(tmp_path):
    """Named like old log files in LogDir (which may be the BeTheUser account's), but not files
    the daemon made: a FIFO hung rotate-logs for ever (cron runs piled up), a symbolic link was
    followed and its target (any file root can read) compressed into LogDir, a directory was an
    error.  Now none of them is touched, and the run says nothing."""
    config, logs = tmp_path / "config", tmp_path / "log"
    config.mkdir()
    logs.mkdir()
    (config / "AService.cfg").write_text("default:ServiceList %s/ImapProxyAService@127.0.0.1:%d\n"
                                         "default:LogDir %s\n" % (LIBDIR, free_port("127.0.0.1"), logs))
    (config / "ImapProxyAService.cfg").write_text("default:LogDir %s\n" % logs)
    secret = tmp_path / "secret"
    secret.write_text("secret\n")
    os.mkfifo(str(logs / "ImapProxy_20200102.log"))
    os.symlink(str(secret), str(logs / "ImapProxy_20260101.log"))
    os.symlink(str(secret), str(logs / "AService_20200101.log.gz"))
    (logs / "PopProxy_20260103.log").mkdir()
    before = sorted(os.listdir(str(logs)))
    r = subprocess.run([os.path.join(ROOT, "scripts", "rotate-logs"), "--config-dir", str(config)],
                       capture_output=True, text=True, timeout=30, cwd="/",
                       env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMPROXY_CONFIG_DIR")})
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert sorted(os.listdir(str(logs))) == before
    assert secret.read_text() == "secret\n" and os.path.islink(str(logs / "ImapProxy_20260101.log"))


# ---------------------------------------------------------------------- files root creates at start
def test_start_creates_no_file_through_a_link(mail_stack, tmp_path):
    """A missing service file is created at start from ``<name>-def.cfg``, by root, in a directory
    the BeTheUser account may own: a dangling link planted as ImapProxyAService.cfg, with a
    -def.cfg of that account's, made root write that text where the link pointed (/etc/cron.d/x:
    root runs it).  Now a link counts as the file being there (and it does not read)."""
    p = Proxy(mail_stack.info())
    p.write_config()
    try:
        cfg = os.path.join(p.config_dir, "ImapProxyAService.cfg")
        os.unlink(cfg)
        with open(os.path.join(p.config_dir, "ImapProxyAService-def.cfg"), "w") as f:
            f.write("* * * * * root echo pwned\n")
        victim = str(tmp_path / "cron-pwn")
        os.symlink(victim, cfg)
        r = subprocess.run([os.path.join(ROOT, "scripts", "start-msg"), "mmp", "--config-dir", p.config_dir],
                           capture_output=True, text=True, timeout=60, cwd="/",
                           env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMPROXY_CONFIG_DIR")})
        assert not os.path.lexists(victim)
        assert r.returncode == 1
        assert r.stderr.startswith("%s: cannot read: No such file or directory\n" % cfg), r.stderr
    finally:
        pid = pidfile.running_pid(p.config_dir)
        if pid:
            os.kill(pid, signal.SIGKILL)
        p.stop()


def test_check_config_says_when_bethuser_cannot_write_logdir(mail_stack):
    """BeTheUser nobody, LogDir root's (0755): the start's files are made by root and given to
    nobody, but from the next day on the daemon (nobody by then) cannot make its new files and
    logs nothing, saying so only in mmproxy.out.  check-config (and start) warn now."""
    p = Proxy(mail_stack.info(), aservice={"BeTheUser": "nobody", "BeTheGroup": "nogroup"})
    p.write_config()
    try:
        os.chmod(p.log_dir, 0o755)
        r = subprocess.run([sys.executable, "-m", "mmproxy", "check-config",
                            "--config-dir", p.config_dir], capture_output=True, text=True, timeout=60, cwd=ROOT)
        lines = [x for x in r.stdout.splitlines() if "cannot create files there" in x]
        for name in ("AService.cfg", "ImapProxyAService.cfg"):
            path = os.path.join(p.config_dir, name)
            line = next(i for i, x in enumerate(open(path), 1) if x.startswith("default:LogDir "))
            assert ("%s:%d: warning: LogDir %s: BeTheUser nobody BeTheGroup nogroup cannot create files there: "
                    "each day's file after the start's is made by that account, so none would be written"
                    % (path, line, p.log_dir)) in lines, r.stdout
        os.chown(p.log_dir, 65534, 65534)
        r = subprocess.run([sys.executable, "-m", "mmproxy", "check-config",
                            "--config-dir", p.config_dir], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert "cannot create files there" not in r.stdout
    finally:
        p.stop()


def test_a_refresh_during_a_stop_tells_systemd_nothing(mail_stack, tmp_path, monkeypatch):
    """``refresh`` (SIGHUP, systemctl reload) while the daemon stops: it did not refresh, but told
    systemd RELOADING=1 and then READY=1 "accepting connections" after STOPPING=1."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    with Proxy(mail_stack.info(), aservice={"ShutdownGrace": 10}) as p:
        assert manager.recv(4096) == b"READY=1\nSTATUS=accepting connections\n"
        c = RawClient("127.0.0.1", p.imap_port)
        c.expect(b"* OK ")
        c.send(b"a LOGIN alice alice-pw\r\n")
        c.skip_to(b"a OK")
        p.proc.send_signal(signal.SIGTERM)              # the relayed session gets its grace
        assert manager.recv(4096) == b"STOPPING=1\n"
        p.proc.send_signal(signal.SIGHUP)
        c.expect_lines("* BYE [UNAVAILABLE] Server shutting down")
        assert p.proc.wait(15) == 0
        manager.settimeout(0.5)
        with pytest.raises(socket.timeout):
            manager.recv(4096)
    manager.close()
