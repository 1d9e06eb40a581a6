"""The operator commands: start, stop, refresh, status, who, kick, flush, check-config, params, rotate-logs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Optional, Tuple

import click

from mmproxy import __version__

if TYPE_CHECKING:
    from mmproxy.config import Config

DEFAULT_DIR = "/etc/mmproxy"

config_dir_option = click.option(
    "--config-dir", type=click.Path(file_okay=False), envvar="MMPROXY_CONFIG_DIR", default=DEFAULT_DIR,
    show_default=True, show_envvar=True,
    help="Directory holding AService.cfg and the service files (the legacy msg_svr_base/config).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmproxy")
def main() -> None:
    """mmproxy: an IMAP4/POP3/SMTP proxy that routes each user to their mail store by LDAP.

    It reads Messaging Multiplexor configuration files (AService.cfg, ImapProxyAService.cfg,
    PopProxyAService.cfg, SmtpProxyAService.cfg) unchanged.
    """


def _check(config_dir: str, create_missing: bool, err: bool = False) -> Tuple[Config, str]:
    """Load the configuration and print its problems; the config, or exit 1 on errors."""
    from mmproxy.aservice import runtime_problems
    from mmproxy.config import load_config, summary
    config = load_config(config_dir, create_missing=create_missing)
    problems = list(config.problems)
    if not config.errors:
        problems += runtime_problems(config)
    for p in problems:
        click.echo(str(p), err=err)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        click.echo("%s: %d error(s); fix them and run `mmproxy check-config --config-dir %s` again"
                   % (config_dir, len(errors), config_dir), err=True)
        sys.exit(1)
    return config, summary(config, problems[len(config.problems):])


@main.command("check-config")
@config_dir_option
def check_config(config_dir: str) -> None:
    """Report every configuration problem as file:line: message (exit 1 on errors)."""
    _, line = _check(config_dir, create_missing=False)
    click.echo(line)


@main.command()
@config_dir_option
@click.option("--foreground", is_flag=True,
              help="Stay in the foreground (as systemd's Type=notify wants) and write warnings and errors "
                   "to stderr too (everything when there is no LogDir).")
@click.option("--daemonized", is_flag=True, hidden=True,
              help="Run by `start` without --foreground: the output goes to mmproxy.out, bounded.")
def start(config_dir: str, foreground: bool, daemonized: bool) -> None:
    """Start the proxy (legacy: start-msg mmp). Refuses to start on configuration errors, and while
    another mmproxy runs on the same configuration directory (its pid file is locked)."""
    from mmproxy import pidfile
    pid = pidfile.running_pid(config_dir)
    if pid:
        raise click.ClickException(str(pidfile.AlreadyRunning(pid, pidfile.path_for(config_dir))))
    if not os.path.isdir(config_dir):
        raise click.ClickException("%s: no such configuration directory" % config_dir)
    if not foreground:
        _daemonize(config_dir)
        return
    config, line = _check(config_dir, create_missing=True, err=True)
    from mmproxy import logs
    from mmproxy.aservice import daemon as make_daemon
    from mmproxy.errors import ConfigError
    if daemonized:                  # from here on Python's output goes to the AService log
        logs.capture_output(os.path.join(config_dir, OUT_FILE))
    daemon = make_daemon(config, foreground=not daemonized)
    try:
        daemon.start()
    except (ConfigError, pidfile.PidfileError) as e:
        logs.release_output()       # why it cannot start: in mmproxy.out, where `start` looks
        raise click.ClickException(str(e))
    click.echo(line, file=sys.__stderr__ if daemonized else sys.stderr)
    daemon.serve_forever()


OUT_FILE = "mmproxy.out"       # in the configuration directory; the previous start's is mmproxy.out.1


def _daemonize(config_dir: str) -> None:
    from mmproxy import logs, safeopen
    argv = [sys.executable, "-m", "mmproxy", "start", "--foreground", "--daemonized", "--config-dir", config_dir]
    path = os.path.join(config_dir, OUT_FILE)
    logs.keep_previous(path)
    try:            # as root, in a directory BeTheUser may own: no link is followed
        out = open(path, "ab", opener=safeopen.opener)
    except OSError as e:
        raise click.ClickException("%s: %s" % (path, e.strerror)) from None
    offset = out.seek(0, os.SEEK_END)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    from mmproxy import pidfile
    path = pidfile.path_for(config_dir)
    for _ in range(300):
        if proc.poll() is not None:
            other = pidfile.holder(path)
            if other:                   # another start won the race for the pid file
                raise click.ClickException(str(pidfile.AlreadyRunning(other, path)))
            click.echo(_output_since(out.name, offset), err=True, nl=False)     # what to fix, on the terminal
            raise click.ClickException("mmproxy exited with status %d; see %s" % (proc.returncode, out.name))
        if pidfile.holder(path) == proc.pid and pidfile.read_pid(path) == proc.pid:
            click.echo("mmproxy started, pid %d (output in %s)" % (proc.pid, out.name))
            return
        time.sleep(0.1)
    raise click.ClickException("mmproxy did not start within 30 s; see %s" % out.name)


def _output_since(path: str, offset: int, limit: int = 8192) -> str:
    """What the daemon wrote to ``path`` after ``offset`` (its last ``limit`` bytes), as text."""
    try:
        with open(path, "rb") as f:
            f.seek(max(offset, os.path.getsize(path) - limit))
            return f.read(limit).decode("utf-8", "backslashreplace")
    except OSError:
        return ""


def _signal(config_dir: str, sig: int) -> int:
    """Send ``sig`` to the daemon holding the pid file's lock (not whatever pid the file says)."""
    from mmproxy import pidfile
    pid = pidfile.running_pid(config_dir)
    if not pid:
        raise click.ClickException("not running (no process holds %s)" % pidfile.path_for(config_dir))
    os.kill(pid, sig)
    return pid


@main.command()
@config_dir_option
def stop(config_dir: str) -> None:
    """Stop the proxy started with this configuration directory (legacy: stop-msg mmp): sessions
    before login are told at once, relayed ones get ShutdownGrace seconds (a second stop: none).
    Removes the pid file when the daemon could not (BeTheUser) and it still names the stopped pid."""
    from mmproxy import pidfile
    from mmproxy.config import load_config
    pid = _signal(config_dir, signal.SIGTERM)
    wait = int(load_config(config_dir).aservice.ShutdownGrace) + 15     # the grace, then the goodbyes
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if pidfile.running_pid(config_dir) != pid:
            pidfile.remove_stale(pidfile.path_for(config_dir), pid)
            click.echo("mmproxy (pid %d) stopped" % pid)
            return
        time.sleep(0.1)
    raise click.ClickException("pid %d did not stop within %d s" % (pid, wait))


@main.command()
@config_dir_option
def refresh(config_dir: str) -> None:
    """Re-read the configuration without dropping sessions (legacy: refresh mmp)."""
    pid = _signal(config_dir, signal.SIGHUP)
    click.echo("asked mmproxy (pid %d) to refresh; problems, if any, are in its AService log" % pid)


all_option = click.option("--all", "fleet_wide", is_flag=True,
                          help="Every proxy of the fleet, through the Redis of StateRedisURL.")


@main.command()
@config_dir_option
@all_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_dir: str, fleet_wide: bool, as_json: bool) -> None:
    """Whether the proxy is running (exit 3 when not), its listeners, sessions and logins.

    Sessions per service (before login, relaying) and logins (ok, failed) since start, per worker
    process and in total, as the running processes say over their control sockets (with --all:
    every process of every proxy sharing StateRedisURL, named INSTANCE/PROCESS; exit 1 when some
    process did not answer)."""
    from mmproxy import control
    from mmproxy.config import load_config
    from mmproxy.pidfile import running_pid
    if fleet_wide:
        answers, whole = _ask_fleet(config_dir, {"cmd": "status"})
        workers = [_worker_summary(name, a) for name, a in answers]
        info_all = {"config_dir": config_dir, "fleet": True, "workers": workers, "total": _total(workers),
                    "every_process_answered": whole}
        if as_json:
            click.echo(json.dumps(info_all, indent=1))
        else:
            _print_workers(info_all)
        sys.exit(0 if whole else 1)
    pid = running_pid(config_dir)
    config = load_config(config_dir)
    services = [{"service": e.spec.kind, "instance": e.spec.instance,
                 "listeners": ["%s:%d" % (ep.host or "*", ep.port) for ep in e.spec.listeners]}
                for e in config.services]
    info: dict = {"config_dir": config_dir, "running": bool(pid), "pid": pid, "services": services}
    if pid:
        info["uptime_s"] = _uptime(pid)
        workers, errors = _answers(control.ask(config_dir, {"cmd": "status"}))
        info["workers"] = [_worker_summary(name, a) for name, a in workers]
        info["total"] = _total(info["workers"])
        if errors:
            info["errors"] = errors
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        _print_status(info)
    if not pid:
        sys.exit(3)


def _answers(answers: list) -> Tuple[list, list]:
    """The control sockets' good answers and the errors ("w1: permission denied")."""
    good = [(name, a) for name, a in answers if a.get("ok")]
    return good, ["%s: %s" % (name, a.get("error")) for name, a in answers if not a.get("ok")]


def _worker_summary(name: str, a: dict) -> dict:
    """One process's status answer as ``status`` shows it: sessions and logins per service."""
    logins = a["stats"].get("logins", {})
    per_service = {}
    for kind in sorted(set(a["sessions"]) | set(logins)):
        outcomes = logins.get(kind, {})
        per_service[kind] = dict(a["sessions"].get(kind, {"pre_login": 0, "relaying": 0}),
                                 logins=outcomes.get("ok", 0),
                                 failures=sum(n for o, n in outcomes.items() if o != "ok"))
    return {"worker": name, "instance_name": a.get("instance_name"), "pid": a["pid"],
            "uptime_s": int(time.time() - a["started"]),
            "listeners": a["listeners"], "services": per_service, "logins_by_outcome": logins}


def _total(workers: list) -> dict:
    out: dict = {}
    for w in workers:
        for kind, row in w["services"].items():
            t = out.setdefault(kind, {})
            for k, v in row.items():
                t[k] = t.get(k, 0) + v
    return out


def _print_status(info: dict) -> None:
    pid = info["pid"]
    names = sorted({w["instance_name"] for w in info.get("workers", []) if w.get("instance_name")})
    click.echo("mmproxy %s%s" % ("running, pid %d, up %ss" % (pid, info["uptime_s"]) if pid else "not running",
                                 " (instance %s)" % ", ".join(names) if names else ""))
    for s in info["services"]:
        click.echo("  %-5s %-22s %s" % (s["service"], s["instance"], " ".join(s["listeners"])))
    if not pid:
        return
    for e in info.get("errors", []):
        click.echo("  control socket %s" % e)
    if not info["workers"]:
        click.echo("  no process answers on %s" % info["config_dir"].rstrip("/") + "/mmproxy.control")
        return
    _print_workers(info)


def _print_workers(info: dict) -> None:
    click.echo("  %-8s %-7s %-8s %-6s %9s %8s %7s %8s" % ("process", "pid", "up", "service", "pre-login",
                                                      "relaying", "logins", "failures"))
    rows = [(w["worker"], str(w["pid"]), "%ss" % w["uptime_s"], w["services"]) for w in info["workers"]]
    if len(info["workers"]) > 1:
        rows.append(("total", "", "", info["total"]))
    for name, wpid, up, per_service in rows:
        for kind, r in sorted(per_service.items()):
            click.echo("  %-8s %-7s %-8s %-6s %9d %8d %7d %8d" % (name, wpid, up, kind, r["pre_login"],
                                                              r["relaying"], r["logins"], r["failures"]))
            name, wpid, up = "", "", ""


def _fleet_settings(config_dir: str) -> Optional[Tuple[str, str, Optional[str]]]:
    """(StateRedisURL, StateRedisPrefix, StateRedisCAFile) of the configuration, None when unset."""
    from mmproxy.config import load_config
    a = load_config(config_dir).aservice
    return (a.StateRedisURL, a.StateRedisPrefix, a.StateRedisCAFile) if a.StateRedisURL else None


class RedisUnreachable(click.ClickException):
    """The fleet's Redis does not answer (as opposed to processes answering with an error)."""


def _ask_fleet(config_dir: str, request: dict, settings: Optional[Tuple[str, str, Optional[str]]] = None,
               ) -> Tuple[list, bool]:
    """``request`` to every serving process of the fleet through Redis: ([(INSTANCE/PROCESS,
    answer)], whether every process holding a lease answered).  RedisUnreachable when Redis does
    not answer; ClickException when StateRedisURL is unset or no process answers well."""
    import redis

    from mmproxy import fleet
    from mmproxy.redisstate import redacted
    settings = settings or _fleet_settings(config_dir)
    if settings is None:
        raise click.ClickException("--all needs a valid StateRedisURL in %s (mmproxy check-config says what is "
                                   "wrong with it)" % os.path.join(config_dir, "AService.cfg"))
    url, prefix, ca_file = settings
    try:
        answers, receivers, leases = fleet.ask(url, prefix, ca_file, request)
    except redis.RedisError as e:
        raise RedisUnreachable("Redis at %s does not answer: %s" % (redacted(url), e)) from None
    good, errors = _answers(answers)
    for problem in errors:
        click.echo("process %s" % problem, err=True)
    whole = len(answers) >= receivers >= leases
    if len(answers) < receivers:
        click.echo("%d of %d process(es) did not answer within %gs" % (receivers - len(answers), receivers,
                                                                      fleet.ANSWER_WAIT), err=True)
    if receivers < leases:
        click.echo("%d process(es) hold a lease in Redis but did not receive the request (their subscription "
                   "is being restored): run the command again" % (leases - receivers), err=True)
    if not good:
        raise click.ClickException("no mmproxy process answered through Redis at %s" % redacted(url))
    return good, whole


def _ask_everywhere(config_dir: str, request: dict, local: bool) -> Tuple[list, bool]:
    """``request`` to the whole fleet when StateRedisURL is set (unless ``local``), else to this box:
    (answers, whether everybody meant answered).  When Redis does not answer: this box only, said
    on stderr, and not everybody."""
    settings = None if local else _fleet_settings(config_dir)
    if settings is not None:
        try:
            return _ask_fleet(config_dir, request, settings)
        except RedisUnreachable as e:
            click.echo("%s; asking this box only: the other proxies are not reached" % e.format_message(),
                       err=True)
            return _ask_running(config_dir, request), False
    return _ask_running(config_dir, request), True


local_option = click.option("--local", is_flag=True,
                            help="This box only, even when StateRedisURL names the fleet's Redis.")


def _ask_running(config_dir: str, request: dict) -> list:
    """``request`` to every serving process; ClickException when none runs or none answers."""
    from mmproxy import control
    from mmproxy.pidfile import running_pid
    if not running_pid(config_dir):
        raise click.ClickException("not running (no live pid in %s)" % os.path.join(config_dir, "mmproxy.pid"))
    good, errors = _answers(control.ask(config_dir, request))
    for e in errors:
        click.echo("control socket %s" % e, err=True)
    if not good:
        raise click.ClickException("no mmproxy process answered on %s" % control.directory(config_dir))
    return good


@main.command()
@config_dir_option
@click.option("--user", help="Only this login id (or, without @domain, its part before the @).")
@click.option("--ip", help="Only clients from this address or network (10.0.0.0/8).")
@all_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def who(config_dir: str, user: Optional[str], ip: Optional[str], fleet_wide: bool, as_json: bool) -> None:
    """List logged-in (relayed) IMAP and POP sessions: user, client, store, service, since, bytes
    (with --all: of every proxy sharing StateRedisURL; the WORKER column names INSTANCE/PROCESS;
    exit 1 when some process did not answer)."""
    request = {"cmd": "who", "user": user, "ip": ip}
    answers, whole = _ask_fleet(config_dir, request) if fleet_wide else (_ask_running(config_dir, request), True)
    rows = [s for _, a in answers for s in a["sessions"]]
    if fleet_wide:
        for r in rows:
            r["worker"] = "%s/%s" % (r.get("instance_name"), "main" if r["worker"] is None else "w%s" % r["worker"])
    rows.sort(key=lambda r: (r["user"], r["since"]))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        sys.exit(0 if whole else 1)
    click.echo("%-24s %-22s %-22s %-5s %-20s %9s %9s %s" % ("USER", "CLIENT", "STORE", "SERV", "SINCE (UTC)",
                                                         "IN", "OUT", "WORKER"))
    for r in rows:
        click.echo("%-24s %-22s %-22s %-5s %-20s %9d %9d %s" % (
            r["user"], r["client"], r["store"], r["service"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["since"])), r["bytes_in"], r["bytes_out"],
            "-" if r["worker"] is None else r["worker"]))
    click.echo("%d session(s)" % len(rows))
    if not whole:
        sys.exit(1)


@main.command()
@config_dir_option
@click.argument("target")
@local_option
def kick(config_dir: str, target: str, local: bool) -> None:
    """Close the logged-in sessions of a user (login id) or of a client address or network:
    IMAP clients get "* BYE", POP clients "-ERR" (between responses, never inside one).  With
    StateRedisURL, on every proxy of the fleet (--local: this box only); exit 1 when some proxy may
    not have been reached."""
    import ipaddress
    if not target.strip() or any(ord(c) < 32 or ord(c) == 127 for c in target):
        raise click.BadParameter("an empty target, or one with control characters, names nobody",
                                 param_hint="TARGET")
    try:
        ipaddress.ip_network(target, strict=False)
        request = {"cmd": "kick", "ip": target}
    except ValueError:
        request = {"cmd": "kick", "user": target}
    answers, whole = _ask_everywhere(config_dir, request, local)
    for name, a in answers:
        click.echo("%s: %d session(s) closed" % (name, a["kicked"]))
    if len(answers) > 1:
        click.echo("total: %d session(s) closed" % sum(a["kicked"] for _, a in answers))
    if not whole:
        sys.exit(1)


@main.command()
@config_dir_option
@click.argument("user")
@local_option
def flush(config_dir: str, user: str, local: bool) -> None:
    """Forget the cached directory entries of USER (login id, uid@domain or mail address) so that
    the next login reads the directory again: after changing the user's mailHost, flush, then
    kick USER (the clients reconnect to the new store).  With StateRedisURL, on every proxy of the
    fleet (--local: this box only); exit 1 when some proxy may not have been reached."""
    if not user.strip() or any(ord(c) < 32 or ord(c) == 127 for c in user):
        raise click.BadParameter("an empty user, or one with control characters, names nobody", param_hint="USER")
    answers, whole = _ask_everywhere(config_dir, {"cmd": "flush", "user": user}, local)
    for name, a in answers:
        click.echo("%s: %d cached entr%s dropped" % (name, a["dropped"], "y" if a["dropped"] == 1 else "ies"))
    click.echo("flushed %s on %d process(es)" % (user, len(answers)))
    if not whole:
        sys.exit(1)


def _uptime(pid: int) -> Optional[int]:
    try:
        with open("/proc/%d/stat" % pid) as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return int(up - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@main.command()
@click.option("--markdown", is_flag=True, help="The reference as Markdown (docs/parameters.md).")
def params(markdown: bool) -> None:
    """Print every configuration parameter with its files, default and meaning."""
    from mmproxy.config.params import PARAMS
    if markdown:
        from mmproxy.config.generate import render_reference
        click.echo(render_reference())
        return
    from mmproxy.config.generate import default_text
    click.echo("%-28s %-7s %-9s %-24s %s" % ("PARAMETER", "FILES", "STATUS", "DEFAULT", "MEANING"))
    for p in PARAMS.values():
        status = "yes" if p.supported else "refuses" if p.security else "not yet"
        d = default_text(p)
        d = "unset" if p.default is None else '""' if not d else (d[:21] + "...") if len(d) > 24 else d
        click.echo("%-28s %-7s %-9s %-24s %s" % (p.name, "".join(p.files), status, d, p.doc))


@main.command("rotate-logs")
@config_dir_option
@click.option("--compress-after", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="gzip the files dated N or more days ago (today's file never).")
@click.option("--delete-after", type=click.IntRange(min=1), default=30, show_default=True, metavar="M",
              help="Delete the files (.log or .gz) dated M or more days ago.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def rotate_logs(config_dir: str, compress_after: int, delete_after: int, dry_run: bool) -> None:
    """Compress and delete old daily log files in every LogDir; safe while mmproxy runs (for cron:
    15 0 * * * mmproxy rotate-logs --config-dir ...)."""
    from mmproxy import rotate
    dirs = []
    for d in rotate.log_dirs(config_dir):
        if os.path.isdir(d):
            dirs.append(d)
        else:
            click.echo("LogDir %s does not exist: skipped" % d, err=True)
    if rotate.rotate(dirs, compress_after, delete_after, dry_run, say=click.echo):
        sys.exit(1)
