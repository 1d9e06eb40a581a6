"""The sdist and the wheel build without network, and the installed wheel works outside the checkout.

One build per module: ``python -m build --no-isolation`` on a copy of the tree makes the sdist and
then the wheel from that sdist (so the sdist is proven to build). The wheel goes into a fresh venv
with ``--no-deps``; the venv sees the dependencies through a ``.pth`` line naming the test venv's
site-packages (plain path lines do not run the test venv's own ``.pth`` files, so the editable
mmproxy stays invisible). Everything lives in one temp dir, removed at the end.
"""
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
import zipfile

import pytest

from mmproxy.testing.base import free_port, listening
from mmproxy.testing.proxy import write_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = sorted(n for n in os.listdir(os.path.join(ROOT, "cfg")) if n.endswith("-def.cfg"))
# not part of a source tree: the copy that gets built leaves them out
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
                                    ".hypothesis", "RESULTS-quick.*")

pytestmark = pytest.mark.timeout(180)


def run(argv, timeout=60, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    return r


def ok(argv, timeout=60, **kw):
    r = run(argv, timeout, **kw)
    assert r.returncode == 0, "%s exited %d:\n%s%s" % (" ".join(argv), r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    return r


@pytest.fixture(scope="module")
def work():
    d = tempfile.mkdtemp(prefix="mmproxy-packaging-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def dists(work):
    """(sdist, wheel): built from a copy of the tree, the wheel from the sdist."""
    src = os.path.join(work, "src")
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE, symlinks=True)
    out = os.path.join(work, "dist")
    ok([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], timeout=120, cwd=work)
    names = sorted(os.listdir(out))
    sdist = [n for n in names if n.endswith(".tar.gz")]
    wheel = [n for n in names if n.endswith(".whl")]
    assert len(sdist) == 1 and len(wheel) == 1, names
    return os.path.join(out, sdist[0]), os.path.join(out, wheel[0])


@pytest.fixture(scope="module")
def venv(work, dists):
    """A fresh venv with the wheel installed; its bin/ directory."""
    env_dir = os.path.join(work, "venv")
    ok([sys.executable, "-m", "venv", "--without-pip", env_dir])
    python = os.path.join(env_dir, "bin", "python")
    purelib = ok([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    parent = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    with open(os.path.join(purelib, "mmproxy-test-deps.pth"), "w") as f:
        f.write("".join(p + "\n" for p in parent))
    ok([sys.executable, "-m", "pip", "--python", python, "install", "--disable-pip-version-check", "--no-deps",
        "--no-index", dists[1]], timeout=120)
    return os.path.join(env_dir, "bin")


def test_sdist_carries_what_building_and_running_need(dists):
    with tarfile.open(dists[0]) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n[len(top) + 1:] for n in tar.getnames()}
        for name in ("setup.py", "pyproject.toml", "requirements.txt", "constraints.txt", "README.md",
                     "mmproxy/testing/sunms.schema", "docs/parameters.md",
                     "contrib/mmproxy.service", "scripts/start-msg"):
            assert name in names, name
        for name in TEMPLATES:
            committed = open(os.path.join(ROOT, "cfg", name), "rb").read()
            assert tar.extractfile("%s/cfg/%s" % (top, name)).read() == committed, name


def test_wheel_carries_the_templates_as_package_data(dists):
    with zipfile.ZipFile(dists[1]) as whl:
        for name in TEMPLATES:
            assert whl.read("mmproxy/templates/" + name) == open(os.path.join(ROOT, "cfg", name), "rb").read()
        assert "mmproxy/testing/sunms.schema" in whl.namelist()
        meta = whl.read([n for n in whl.namelist() if n.endswith(".dist-info/METADATA")][0]).decode()
    requires = sorted(line.split(": ", 1)[1].split("<")[0].split(">")[0].strip()
                      for line in meta.splitlines() if line.startswith("Requires-Dist: "))
    assert requires == ["cachetools", "click", "cryptography", "gevent", "prometheus_client", "python-ldap", "redis"]


def test_installed_console_script_runs_from_the_venv(venv, work):
    where = ok([os.path.join(venv, "python"), "-c",
                "import mmproxy; from mmproxy.config.generate import shipped_template as t; "
                "print(mmproxy.__file__); print(t('I'))"], cwd=work).stdout.split()
    assert where[0].startswith(os.path.dirname(venv) + os.sep), where      # not the checkout's mmproxy
    assert where[1].endswith(os.path.join("site-packages", "mmproxy", "templates", "ImapProxyAService-def.cfg"))
    r = ok([os.path.join(venv, "mmproxy"), "--help"], cwd=work)
    assert "check-config" in r.stdout and "start" in r.stdout
    r = ok([os.path.join(venv, "mmproxy"), "params"], cwd=work)
    assert "ServiceList" in r.stdout and "LdapURL" in r.stdout
    for legacy in ("start-msg", "stop-msg", "refresh"):       # the Messaging Multiplexor's command names
        r = ok([os.path.join(venv, legacy), "--help"], cwd=work)
        assert r.stdout.startswith("Usage: %s [OPTIONS] [mmp]" % legacy), r.stdout
        r = run([os.path.join(venv, legacy), "store"], cwd=work)
        assert (r.returncode, r.stderr) == (2, "%s: store: not served by mmproxy, which runs only the Messaging "
                                               "Multiplexor (mmp)\n" % legacy)


def test_installed_start_creates_a_missing_service_file_from_the_shipped_template(venv, work):
    conf = os.path.join(work, "config")
    os.makedirs(conf)
    port = free_port("127.0.0.1")
    write_cfg(os.path.join(conf, "AService.cfg"), {
        "ServiceList": "/opt/SUNWmsgsr/lib/ImapProxyAService@127.0.0.1:%d" % port, "LogDir": conf})
    mmproxy = os.path.join(venv, "mmproxy")
    # check-config only reads: the missing file is an error until start creates it
    r = run([mmproxy, "check-config", "--config-dir", conf], cwd=work)
    assert r.returncode == 1 and "ImapProxyAService.cfg: cannot read" in r.stdout + r.stderr, r.stdout + r.stderr
    p = subprocess.Popen([mmproxy, "start", "--foreground", "--config-dir", conf], cwd=work,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not listening("127.0.0.1", port):
            assert p.poll() is None, p.stdout.read()
            assert time.monotonic() < deadline, "mmproxy did not listen within 30 s"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=15)[0]
        assert p.returncode == 0, out
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert "ImapProxyAService.cfg: warning: created from ImapProxyAService-def.cfg" in out, out
    shipped = open(os.path.join(ROOT, "cfg", "ImapProxyAService-def.cfg")).read()
    assert open(os.path.join(conf, "ImapProxyAService-def.cfg")).read() == shipped
    assert open(os.path.join(conf, "ImapProxyAService.cfg")).read() == shipped
    r = ok([mmproxy, "check-config", "--config-dir", conf], cwd=work)
    assert "0 errors" in r.stdout, r.stdout
