"""The legacy command names ``start-msg``, ``stop-msg`` and ``refresh``, for operators' runbooks.

Messaging Server's ``msg_svr_base/sbin`` commands take component names; the Multiplexor's is
``mmp`` ("Starting the Multiplexor", Sun Java System Messaging Server 6.3 Administration Guide,
https://docs.oracle.com/cd/E19566-01/819-4428/bgafo/index.html: ``start-msg mmp``, ``stop-msg
mmp``, ``refresh mmp``).  Without a component, ``start-msg`` starts every enabled service and
``refresh`` refreshes every enabled service (Administration Reference, "start-msg" and "refresh",
https://docs.oracle.com/cd/E19566-01/819-4429/acmem/index.html and .../acmef/index.html), and
``stop-msg`` stops everything ``start-msg`` started (6 2005Q4 Administration Reference, "stop-msg",
https://docs.oracle.com/cd/E19796-01/819-2651/acmep/index.html).  mmproxy is only the Multiplexor,
so no component means ``mmp``, and any other component (imap, pop, smtp, store, http, ens, sched,
dispatcher, ...) is refused with exit status 2.

One difference on purpose: the legacy ``start-msg mmp`` "Starts the MMP (even if one is already
running)"; mmproxy refuses a second daemon on the same configuration directory (its pid file is
locked, mmproxy/pidfile.py), so ``stop-msg`` always means the one that runs.

The commands are the same as ``mmproxy start`` (always daemonised), ``mmproxy stop`` and
``mmproxy refresh``, with the same ``--config-dir`` (default ``$MMPROXY_CONFIG_DIR``, else
``/etc/mmproxy``).  Installed as console scripts; ``scripts/start-msg`` and friends run them from a
checkout.  No gevent here: these commands only signal the daemon, or start it as a new process.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Tuple

import click

from mmproxy import cli

COMPONENT = "mmp"
USAGE_ERROR = 2


def _only_mmp(command: str, components: Tuple[str, ...]) -> None:
    """Exit 2 with one line per component that is not ``mmp``."""
    others = [c for c in components if c != COMPONENT]
    for c in others:
        click.echo("%s: %s: not served by mmproxy, which runs only the Messaging Multiplexor (%s)"
                   % (command, c, COMPONENT), err=True)
    if others:
        sys.exit(USAGE_ERROR)


def _legacy(name: str, target: click.Command, doc: str, **fixed: object) -> click.Command:
    """A click command ``name [--config-dir D] [mmp]`` running ``target`` with ``fixed`` arguments."""

    @click.command(name=name, help=doc, context_settings={"help_option_names": ["-h", "--help"]})
    @cli.config_dir_option
    @click.argument("components", nargs=-1, metavar="[mmp]")
    @click.pass_context
    def command(ctx: click.Context, config_dir: str, components: Tuple[str, ...]) -> None:
        _only_mmp(name, components)
        ctx.invoke(target, config_dir=config_dir, **fixed)

    return command


start_msg = _legacy("start-msg", cli.start, """Start mmproxy in the background (mmproxy start): the Messaging
Multiplexor's `start-msg mmp`; no component also means mmp.""", foreground=False)
stop_msg = _legacy("stop-msg", cli.stop, """Stop the mmproxy of this configuration directory (mmproxy stop): the
Messaging Multiplexor's `stop-msg mmp`; no component also means mmp.""")
refresh = _legacy("refresh", cli.refresh, """Re-read the configuration, keeping the sessions (mmproxy refresh): the
Messaging Multiplexor's `refresh mmp`; no component also means mmp.""")

COMMANDS = {"start-msg": start_msg, "stop-msg": stop_msg, "refresh": refresh}


def run(argv: List[str]) -> None:
    """``python -m mmproxy.legacycmd NAME ARGS...`` (what the scripts/ wrappers run)."""
    if not argv or argv[0] not in COMMANDS:
        click.echo("usage: python -m mmproxy.legacycmd {%s} [--config-dir DIR] [mmp]" % ",".join(COMMANDS), err=True)
        sys.exit(USAGE_ERROR)
    command: Callable[..., None] = COMMANDS[argv[0]]
    command(args=argv[1:], prog_name=argv[0])


if __name__ == "__main__":
    run(sys.argv[1:])
