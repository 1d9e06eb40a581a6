"""Session fixtures over the real servers; the logic lives in mmproxy.testing."""
from gevent import monkey

monkey.patch_all()  # first, before any other import (STYLE §3.1)

import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from mmproxy.testing import MailStack  # noqa: E402
from mmproxy.testing.slapd import Slapd  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def mail_stack():
    """slapd + Dovecot stores on 127.0.0.2 and 127.0.0.3 + a Postfix relay, with the default
    data model (see mmproxy/testing/__init__.py), shared by the whole session."""
    stack = MailStack(postfix=True)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def two_slapds(mail_stack, tmp_path):
    """Two slapd instances seeded with the stack's directory (users route to its stores), for
    failover tests; one left stopped by SIGSTOP is continued before it is stopped."""
    servers = [Slapd(mail_stack.directory, workdir=str(tmp_path / name)) for name in ("a", "b")]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:                                          # whatever failed, nothing is left running
        for s in servers:
            if s.running:
                os.kill(s.proc.pid, signal.SIGCONT)  # a test may leave one stopped (SIGSTOP: a hung server)
            s.close()


@pytest.fixture
def local_tz():
    """The test process in helpers.TZ (a zone other than UTC); the previous zone back afterwards."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = helpers.TZ
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()
