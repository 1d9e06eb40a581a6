"""The pid file ``<config dir>/mmproxy.pid``: written atomically, locked for the daemon's life.

As gunicorn's ``Pidfile`` (gunicorn/pidfile.py) does, the pid is written to a temporary file in the
same directory and renamed over the pid file, so a reader never sees half a pid, and the daemon
removes the file at exit only while it still holds its own pid.  gunicorn decides whether a daemon
runs by ``kill(pid, 0)`` on the pid read back, which a stale file whose pid was reused by another
process fools (its #3383 then compares command lines).  Here the daemon holds a POSIX record lock
(``fcntl(F_SETLK)``, POSIX.1 ``fcntl``) on the pid file from before it opens its listeners until it
exits, and a reader asks the kernel who holds it (``F_GETLK`` returns the holder's pid without
taking the lock, so a ``status`` never gets in a starting daemon's way):

* a second start on the same configuration directory is refused while the first runs, and of two
  starts at once only one gets the lock;
* a stale file (the process gone, or its pid reused by an unrelated process) holds no lock and
  blocks nothing;
* ``stop`` signals the process that holds the lock, whatever someone wrote into the file.

The lock moves with the file: the temporary file is locked before it is renamed over the pid file,
so the inode at the path is locked by the daemon at every moment.  A record lock is not inherited by
forked workers (NumThreads > 1: the master holds it) and goes when the holder closes *any*
descriptor of the file, so the holding process must not open the pid file otherwise:
:func:`holder` answers for a file this process holds without opening it.  Linux only (``struct
flock`` is packed for Linux's layout with a 64-bit ``off_t``).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import tempfile
import time
from typing import Dict, Optional

from mmproxy import safeopen

log = logging.getLogger("mmproxy.aservice")

NAME = "mmproxy.pid"

_FLOCK = "hhqqi"        # struct flock: l_type, l_whence, l_start, l_len, l_pid
_held: Dict[str, "Pidfile"] = {}      # real path -> the Pidfile this process holds there


class PidfileError(Exception):
    """The pid file cannot be created or locked (the message names the file)."""


class AlreadyRunning(PidfileError):
    """Another process holds the pid file's lock: a daemon runs (or starts) on this directory."""

    def __init__(self, pid: int, path: str) -> None:
        self.pid = pid
        self.path = path
        super().__init__("already running with pid %d (%s)" % (pid, path))


def path_for(config_dir: str) -> str:
    """The pid file of a configuration directory: ``<config_dir>/mmproxy.pid``."""
    return os.path.join(config_dir, NAME)


def running_pid(config_dir: str) -> Optional[int]:
    """The pid of the daemon running on ``config_dir`` (it holds the lock), or None."""
    return holder(path_for(config_dir))


def holder(path: str) -> Optional[int]:
    """The pid of the process holding the lock on the pid file ``path``, or None (no file, no lock)."""
    mine = _held.get(os.path.realpath(path))
    if mine is not None and mine.fd is not None:
        return os.getpid()          # opening it here would drop our own lock
    try:
        fd = safeopen.open_fd(path, os.O_RDONLY, replace=False)    # a FIFO planted there must not hang us
    except OSError:
        return None
    try:
        return _lock_holder(fd)
    finally:
        os.close(fd)


def read_pid(path: str) -> Optional[int]:
    """The pid written in the file (None when there is none, or not a number); says nothing about
    whether it runs: :func:`holder` does."""
    try:
        with open(path, "rb", opener=lambda p, fl: safeopen.open_fd(p, fl, replace=False)) as f:
            return _parse(f.read(64))
    except OSError:
        return None


def remove_stale(path: str, pid: int) -> bool:
    """Remove the pid file when it still names ``pid`` and nobody holds it (``mmproxy stop``, as
    root, after the daemon ended: a daemon that dropped privileges with BeTheUser may not be
    allowed to remove it).  True when removed."""
    try:
        fd = safeopen.open_fd(path, os.O_RDWR, replace=False)
    except OSError:
        return False
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False            # a new daemon has it
        if _same_file(fd, path) and _parse(os.pread(fd, 64, 0)) == pid:
            os.unlink(path)
            return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


class Pidfile:
    """The pid file of one daemon: :meth:`acquire` (lock), :meth:`write` (once serving),
    :meth:`release` (at exit)."""

    ATTEMPTS_FOR = 1.0          # seconds to retry a lock held for a moment (remove_stale)

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None
        self.pid: Optional[int] = None

    def acquire(self) -> None:
        """Create (or take over a stale) pid file and lock it, emptied until :meth:`write`.

        Raises AlreadyRunning when another process holds it, PidfileError when it cannot be
        created (a directory not writable: the message names the file and the reason).
        """
        deadline = time.monotonic() + self.ATTEMPTS_FOR
        while True:
            try:
                # as root, in a directory BeTheUser may own: no link is followed (mmproxy/safeopen.py)
                fd = safeopen.open_fd(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise PidfileError("cannot create the pid file %s: %s" % (self.path, e.strerror)) from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                busy = e.errno in (errno.EACCES, errno.EAGAIN)
                other = _lock_holder(fd) if busy else None
                os.close(fd)
                if busy and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                if other is not None:
                    raise AlreadyRunning(other, self.path) from None
                raise PidfileError("cannot lock the pid file %s: %s" % (self.path, e.strerror)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)            # removed or replaced since we opened it: take what is there now
        os.ftruncate(fd, 0)         # a stale pid must not be read as ours before write()
        self.fd = fd
        _held[os.path.realpath(self.path)] = self

    def write(self) -> None:
        """Put this process's pid in the file, atomically (a locked temporary file renamed over it)."""
        assert self.fd is not None, "acquire() first"
        pid = os.getpid()
        fd, tmp = tempfile.mkstemp(prefix=".%s." % NAME, dir=os.path.dirname(self.path) or ".")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # ours before anyone can see it
            os.write(fd, b"%d\n" % pid)
            os.fchmod(fd, 0o644)
            os.rename(tmp, self.path)
        except OSError as e:
            os.close(fd)
            _unlink(tmp)
            raise PidfileError("cannot write the pid file %s: %s" % (self.path, e.strerror)) from None
        old, self.fd, self.pid = self.fd, fd, pid
        os.close(old)               # the old inode's lock goes with it; the new one is held

    def release(self) -> bool:
        """At exit: remove the file if it is still ours (our inode, our pid or empty), then unlock.

        A file someone replaced or rewrote is left alone.  True when removed; a file this process
        may not remove any more (BeTheUser dropped root and the directory is root's) is left for
        ``mmproxy stop`` (:func:`remove_stale`), logged once.
        """
        fd, self.fd = self.fd, None
        if fd is None:
            return False
        _held.pop(os.path.realpath(self.path), None)
        try:
            content = os.pread(fd, 64, 0)
            if _same_file(fd, self.path) and (not content or _parse(content) == self.pid):
                os.unlink(self.path)
                return True
        except PermissionError:
            log.info("pid file %s left in place (no permission to remove it after BeTheUser); "
                     "`mmproxy stop` removes it, and a stale pid file does not block a start", self.path)
        except OSError:
            pass
        finally:
            os.close(fd)
        return False


def _lock_holder(fd: int) -> Optional[int]:
    """F_GETLK: the pid holding a lock that would conflict with a write lock on the whole file."""
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _, _, _, l_pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return None if l_type == fcntl.F_UNLCK else l_pid


def _same_file(fd: int, path: str) -> bool:
    try:
        st, cur = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (cur.st_dev, cur.st_ino)


def _parse(content: bytes) -> Optional[int]:
    try:
        return int(content.strip() or b"x")
    except ValueError:
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
