"""rotate-logs: gzip the daily log files older than N days and delete those older than M days.

Run from cron (``15 0 * * * mmproxy rotate-logs --config-dir ...``) while the daemon runs.  Only
files named as the daemon names them are touched (``ImapProxy_20261125.log``, ``PopProxy_...``,
``SmtpProxy_...``, ``AService_...``, and their ``.gz``), in the ``LogDir`` of AService.cfg and of
each service file, and they are dated by their name, never by mtime (a copied or touched file keeps
its day).  The legacy product left rotation to the operator (its LogDir files are one a day,
Messaging Server Administration Reference, "Multiplexor Configuration Parameters": LogDir).

Safe while the daemon writes and against a crash or a second run at the same moment:

* a file is compressed only when its date is at least one day past (``compress_after`` >= 1): the
  daemon names each line's file by that line's own date, so it never writes a past day's file again
  (it may still hold yesterday's file open until its next line: it writes nothing more to it);
* the ``.gz`` is written under a private temporary name in the same directory, fsynced, and renamed
  over ``<file>.gz``; only then is the original removed.  A crash leaves the original (and at worst a
  stale ``.<file>.*.gz-partial``, removed by the next run); two runs at once write the same ``.gz``
  twice; a file that grew while it was read is left for the next run.
"""
from __future__ import annotations

import datetime
import errno
import gzip
import os
import re
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional

from mmproxy import safeopen
from mmproxy.config import kinds

NAME = re.compile(r"(%s)_(\d{8})\.log(\.gz)?" % "|".join(re.escape(k.log_prefix) for k in kinds.BY_NAME.values()))
PARTIAL = re.compile(r"\.(%s)\.[^/]*\.gz-partial" % NAME.pattern)
PARTIAL_AGE = 3600          # a partial .gz this old (seconds) is a crashed run's, not a running one's
CHUNK = 1 << 20


@dataclass(frozen=True)
class LogFile:
    path: str
    day: datetime.date
    gz: bool


def log_dirs(config_dir: str) -> List[str]:
    """The distinct LogDir values of AService.cfg and of each ServiceList service's file (as
    mmproxy.config.load_config reads them), in that order; directories that do not exist included
    (the caller says so)."""
    from mmproxy.config import load_config
    config = load_config(config_dir)
    out: List[str] = []
    for cfg in [config.aservice] + [e.cfg for e in config.services]:
        d = cfg.LogDir
        if d and os.path.realpath(d) not in {os.path.realpath(x) for x in out}:
            out.append(d)
    return out


def log_files(directory: str) -> List[LogFile]:
    """The legacy-named daily files in ``directory``, sorted by name; names with an impossible
    date (``_20261399``) are not log files, nor is what is not a plain file (a symbolic link, a
    FIFO, a directory: the daemon makes none of them, and root must not follow a link or hang on
    a FIFO that the account owning LogDir put there)."""
    out = []
    for name in sorted(os.listdir(directory)):
        m = NAME.fullmatch(name)
        if not m:
            continue
        try:
            if not stat.S_ISREG(os.lstat(os.path.join(directory, name)).st_mode):
                continue
        except OSError:
            continue
        try:
            day = datetime.datetime.strptime(m.group(2), "%Y%m%d").date()
        except ValueError:
            continue
        out.append(LogFile(os.path.join(directory, name), day, bool(m.group(3))))
    return out


def rotate(directories: Iterable[str], compress_after: int, delete_after: int, dry_run: bool = False,
           today: Optional[datetime.date] = None, say: Callable[[str], None] = print) -> int:
    """Compress (gzip) the files dated ``compress_after`` or more days before ``today`` (local
    date), delete the files (``.log`` or ``.gz``) dated ``delete_after`` or more days before.  Each
    action is one line through ``say``: ``compressed PATH``, ``deleted PATH`` (``would compress`` /
    ``would delete`` with ``dry_run``), ``left PATH: why``.  Both ages are at least 1 (ValueError):
    today's file is never touched.  Returns the number of files that could not be handled (an
    OSError, said as ``error PATH: why``)."""
    if compress_after < 1 or delete_after < 1:
        raise ValueError("compress_after and delete_after are at least 1 day")
    today = today or datetime.date.today()
    failed = 0
    for directory in directories:
        _remove_stale_partials(directory, dry_run)
        for f in log_files(directory):
            age = (today - f.day).days
            try:
                if age >= delete_after:
                    if dry_run:
                        say("would delete %s" % f.path)
                    elif _unlink(f.path):
                        say("deleted %s" % f.path)
                elif age >= compress_after and not f.gz:
                    if dry_run:
                        say("would compress %s" % f.path)
                    else:
                        why = compress(f.path)
                        say("compressed %s" % f.path if why is None else "left %s: %s" % (f.path, why))
            except OSError as e:
                failed += 1
                say("error %s: %s" % (f.path, e.strerror or e))
    return failed


def compress(path: str) -> Optional[str]:
    """``path`` -> ``path.gz`` (same owner, mode and mtime), then ``path`` removed; None when done,
    else why the file was left as it is.  The .gz is complete on disk (fsync) before it gets its
    name and before the original goes; OSError on a failure (the original then stays)."""
    directory, name = os.path.split(path)
    try:            # no link followed, no FIFO waited on (mmproxy/safeopen.py): it may have changed since listed
        src = os.fdopen(safeopen.open_fd(path, os.O_RDONLY, replace=False), "rb")
    except FileNotFoundError:
        return "gone (another run compressed it)"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return safeopen.NOT_PLAIN
        raise
    with src:
        st = os.fstat(src.fileno())
        fd, tmp = tempfile.mkstemp(prefix="." + name + ".", suffix=".gz-partial", dir=directory)
        try:
            with os.fdopen(fd, "wb") as out:
                with gzip.GzipFile(filename=name, mode="wb", fileobj=out, mtime=int(st.st_mtime)) as gz:
                    shutil.copyfileobj(src, gz, CHUNK)
                copied = src.tell()
                out.flush()
                os.fchmod(out.fileno(), st.st_mode & 0o7777)
                if os.geteuid() == 0:
                    os.fchown(out.fileno(), st.st_uid, st.st_gid)
                os.fsync(out.fileno())
            now = os.fstat(src.fileno())
            if now.st_size != copied or now.st_size != st.st_size:
                os.unlink(tmp)
                return "it grew while it was compressed (still written?): left for the next run"
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.rename(tmp, path + ".gz")
        except BaseException:
            _unlink(tmp)
            raise
    _fsync_dir(directory)
    _unlink(path)
    _fsync_dir(directory)
    return None


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_partials(directory: str, dry_run: bool) -> None:
    """A crashed run's partial .gz (over an hour old) goes; a running run's stays."""
    if dry_run:
        return
    for name in os.listdir(directory):
        if PARTIAL.fullmatch(name):
            path = os.path.join(directory, name)
            try:
                if time.time() - os.stat(path).st_mtime > PARTIAL_AGE:
                    os.unlink(path)
            except OSError:
                pass

