"""Session fixtures over the real servers; the logic lives in mmproxy.testing."""
from gevent import monkey

monkey.patch_all()  # first, before any other import (STYLE §3.1)

import pytest  # noqa: E402

from mmproxy.testing import MailStack  # noqa: E402


@pytest.fixture(scope="session")
def mail_stack():
    """slapd + Dovecot stores on 127.0.0.2 and 127.0.0.3 + a Postfix relay, with the default
    data model (see mmproxy/testing/__init__.py), shared by the whole session."""
    stack = MailStack(postfix=True)
    stack.start()
    yield stack
    stack.stop()
