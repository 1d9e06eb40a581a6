"""Entry point: gevent must patch the stdlib before anything imports ssl, socket or threading."""
from gevent import monkey

monkey.patch_all()

from mmproxy.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
