"""LogDir / LogLevel: one daily file per service, named as the legacy MMP named them.

``ImapProxy_20261125.log``, ``PopProxy_...``, ``SmtpProxy_...``, and ``AService_...`` for the daemon
itself.  A LogDir that does not exist means no file (as the legacy product did), said once on stderr.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import List, Optional, TextIO, Tuple

from mmproxy import safeopen
from mmproxy.config import kinds

FORMAT = "%(asctime)s %(levelname)s [%(ctx)s] %(message)s"

# A few log lines per login are a visible share of a login's CPU: skip what we never print
# (the caller's frame, thread and process names).
logging._srcfile = None
logging.logThreads = False
logging.logProcesses = False
logging.logMultiprocessing = False


class _Formatter(logging.Formatter):
    """Formats the time once per second, not once per line."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        sec = int(record.created)
        if sec != self._second:
            self._second, self._text = sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        return "%s,%03d" % (self._text, record.msecs)


class _NoLock(logging.Handler):
    """Handlers run on the hub thread only and never yield inside emit: no lock needed."""

    def createLock(self) -> None:
        self.lock = None


class _Stderr(_NoLock, logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        _check_output(int(record.created))


_owner: Optional[Tuple[int, int]] = None      # (uid, gid) of BeTheUser/BeTheGroup, for files root makes


def set_owner(owner: Optional[Tuple[int, int]]) -> None:
    """BeTheUser/BeTheGroup as (uid, gid), or None: a log file this process makes while it is
    still root (the master of NumThreads workers, a daemon before it drops privileges, a new
    day's file) is given to that user, who goes on writing it from the worker processes."""
    global _owner
    _owner = owner


DETAIL = 15          # between INFO and DEBUG: one line per session end, with its figures
logging.addLevelName(DETAIL, "DETAIL")


def level_for(log_level: int) -> int:
    """Legacy 0-10 verbosity to logging levels: 0 ERROR; 1 also WARNING and INFO (logins, failed
    logins, refusals); 2-4 also DETAIL (each session's end, idle timeouts, stale directory answers);
    5-10 also DEBUG.  The legacy manual says only "0 through 10, 10 the most verbose, default 1"
    (Messaging Server Administration Reference, Multiplexor Configuration Parameters); what each
    level adds is documented with the LogLevel parameter (mmproxy/config/params.py)."""
    if log_level <= 0:
        return logging.ERROR
    if log_level == 1:
        return logging.INFO
    if log_level < 5:
        return DETAIL
    return logging.DEBUG


class _Context(logging.Filter):
    """Records from plain loggers get the session-context field the format expects."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "ctx"):
            record.ctx = record.name.rsplit(".", 1)[-1]
        return True


class DailyFile(_NoLock):
    """Appends to <dir>/<prefix>_<yyyymmdd>.log, switching file when the date changes."""

    def __init__(self, directory: str, prefix: str) -> None:
        super().__init__()
        self.directory, self.prefix = directory, prefix
        self.day = ""
        self.stream: Optional[TextIO] = None
        self._second, self._date = -1, ""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sec = int(record.created)
            if sec != self._second:                       # the date, worked out once per second
                self._second, self._date = sec, time.strftime("%Y%m%d", time.localtime(sec))
            day = self._date
            if day != self.day or self.stream is None:
                self.close_stream()
                path = os.path.join(self.directory, "%s_%s.log" % (self.prefix, day))
                # root writes here too (the master, a daemon before BeTheUser): no link is followed
                self.stream = open(path, "a", buffering=1, opener=safeopen.opener)
                self.day = day
                if _owner is not None and os.geteuid() == 0:
                    try:
                        os.fchown(self.stream.fileno(), *_owner)
                    except OSError:
                        pass                      # a LogDir that keeps root's files: they still get written
            self.stream.write(self.format(record) + "\n")
            _check_output(int(record.created))
        except (OSError, ValueError):             # disk full, no descriptors, a closed stream
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A log that cannot be written (disk full, no descriptors) says so once a minute, briefly."""
        now = time.monotonic()
        if now - getattr(self, "_complained", -60.0) >= 60:
            self._complained = now
            e = sys.exc_info()[1]
            print("mmproxy: cannot write %s/%s_*.log: %s" % (self.directory, self.prefix, e), file=sys.stderr)

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def close(self) -> None:
        self.close_stream()
        super().close()


def configure(kind: str, log_dir: Optional[str], log_level: int, foreground: bool) -> None:
    """Attach the handlers for one service (kind: imap, pop, smtp or aservice)."""
    logger = logging.getLogger("mmproxy" if kind == "aservice" else "mmproxy." + kind)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.setLevel(level_for(log_level))
    fmt = _Formatter(FORMAT)
    handlers: List[logging.Handler] = []
    if log_dir and os.path.isdir(log_dir):
        handlers.append(DailyFile(log_dir, kinds.BY_NAME[kind].log_prefix))
    elif log_dir:
        print("mmproxy: LogDir %s does not exist: no %s log file" % (log_dir, kinds.BY_NAME[kind].log_prefix),
              file=sys.stderr)
    logger.propagate = kind == "aservice"      # a service's lines go to its own file only
    if foreground or (_output is not None and not handlers):
        # a daemon with no log file writes to its output file (mmproxy.out) as before: the
        # descriptor itself, not the sys.stderr that capture_output() sends to this very log
        err = _Stderr(sys.__stderr__ if _output is not None else sys.stderr)
        if handlers:
            err.setLevel(logging.WARNING)       # the file has everything; the terminal what needs a look
        handlers.append(err)
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(_Context())
        logger.addHandler(h)


OUTPUT_LIMIT = 1 << 20      # bytes: the daemon's own output file (mmproxy.out) is emptied beyond this


class _Output:
    """The daemon's own output file (``mmproxy.out``) on descriptors 1 and 2, kept under ``limit``
    bytes: checked at most once a second, on a log line or a stray write."""

    def __init__(self, path: str, limit: int) -> None:
        self.path, self.limit = path, limit
        self.checked = -1

    def bound(self, now: int) -> None:
        self.checked = now
        try:
            size = os.fstat(2).st_size
            if size > self.limit:
                os.ftruncate(2, 0)          # opened for appending: the next write lands at the new end
                os.write(2, b"mmproxy: %s passed %d bytes at %s: emptied\n"
                         % (self.path.encode(), self.limit, time.strftime("%Y-%m-%d %H:%M:%S").encode()))
        except OSError:
            pass


class _StrayOutput:
    """sys.stdout / sys.stderr of a daemon: what Python code writes there (a greenlet's traceback
    that gevent prints, a warning, a print) goes to the AService log, one ERROR line per line, with
    the context ``stderr``; a write while that very log fails goes to the descriptor."""

    encoding = "utf-8"
    errors = "backslashreplace"

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = ""
        self.busy = False
        self.log = logging.getLogger("mmproxy.stderr")

    def write(self, text: str) -> int:
        if self.busy:                       # the log itself is failing: straight to the file
            os.write(self.fd, text.encode("utf-8", "backslashreplace"))
            return len(text)
        self.busy = True
        try:
            lines = (self.pending + text).split("\n")
            self.pending = lines.pop()[-MAX_STRAY_LINE:]
            for line in lines:
                if line.strip():
                    self.log.error("%s", line[:MAX_STRAY_LINE])
            _check_output(int(time.time()))
        finally:
            self.busy = False
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fd


MAX_STRAY_LINE = 4000
_output: Optional[_Output] = None


def _check_output(now: int) -> None:
    """At most once a second (``now``: whole seconds): bound the daemon's output file."""
    if _output is not None and now != _output.checked:
        _output.bound(now)


def capture_output(path: str, limit: int = OUTPUT_LIMIT) -> None:
    """A daemon whose descriptors 1 and 2 are ``path`` (mmproxy.out): Python's sys.stdout and
    sys.stderr go to the AService log from now on, and the file is kept under ``limit`` bytes (what
    still reaches the descriptors: C libraries, a fatal error)."""
    global _output
    _output = _Output(path, limit)
    sys.stdout = _StrayOutput(1)
    sys.stderr = _StrayOutput(2)


def release_output() -> None:
    """Python's sys.stdout and sys.stderr back on the descriptors (a daemon that cannot start
    says why in its output file); nothing changes when capture_output() was not called."""
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def keep_previous(path: str) -> None:
    """At a start: the previous run's output file becomes ``<path>.1`` (one generation kept)."""
    try:
        if os.path.getsize(path) > 0:
            os.replace(path, path + ".1")
    except OSError:
        pass
