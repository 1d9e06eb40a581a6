"""Opening the files mmproxy writes in directories that another account may write to.

The configuration directory and the LogDir may belong to the BeTheUser account (the legacy layout:
``msg_svr_base/config`` and the log directory are the Messaging Server user's), which runs the code
that faces the network, while mmproxy writes there as root: its pid file, ``mmproxy.out``, and
the log lines of a daemon that has not dropped privileges yet or of the master of NumThreads
workers.  Root must not follow a symbolic link planted there (or open a second hard link, or a FIFO
that never opens) into a file of that account's choosing: the pid file's truncation would empty
``/etc/shadow``, a log line would be appended to ``/root/.bashrc`` (CWE-59, "Improper Link
Resolution Before File Access").  Linux's ``fs.protected_symlinks`` covers only sticky
world-writable directories such as /tmp.  Each such name is mmproxy's own, so what is found there
that is not a plain file is removed and the file made anew.
"""
from __future__ import annotations

import errno
import os
import stat

NOT_PLAIN = "not a plain file (a symbolic or hard link, a FIFO, a device)"


def open_fd(path: str, flags: int, mode: int = 0o644, replace: bool = True) -> int:
    """``os.open(path, flags, mode)`` that never follows a symbolic link and opens only a regular
    file with one name (O_NOFOLLOW, O_NONBLOCK so that a FIFO cannot hang it, O_CLOEXEC).

    With ``replace`` (and O_CREAT in ``flags``), anything else found at ``path`` is unlinked and a
    new file created in its place (O_EXCL); without, it is refused.  OSError on failure (ELOOP
    with a message naming the path for what is not a plain file)."""
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for attempt in (1, 2):
        try:
            fd = os.open(path, flags if attempt == 1 else flags | os.O_EXCL, mode)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
        else:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                return fd
            os.close(fd)
        if not (replace and flags & os.O_CREAT) or attempt == 2:
            break
        os.unlink(path)             # our name, not our file: the link goes, not what it points to
    raise OSError(errno.ELOOP, NOT_PLAIN, path)


def opener(path: str, flags: int) -> int:
    """For ``open(path, mode, opener=opener)``: :func:`open_fd` with replacement."""
    return open_fd(path, flags)
