"""BadGuys: client addresses that failed to authenticate wait before their next answers.

The legacy rules (mmp-configuration-reference, "BadGuys configuration parameters"): each failure
adds ``BGPenalty`` seconds to the address's sentence, at most ``BGMaxBadness``; later
authentication replies to that address are delayed by the sentence; a success after failures is
delayed once and then the address is forgiven; the sentence is forgiven ``BGDecay`` seconds after
the last failure, all at once, or falling linearly to zero over that time with ``BGLinear yes``;
addresses in ``BGExcluded`` are never penalised; at most ``BGMax`` addresses are remembered (those
whose last failure is oldest are forgotten first).  IMAP and POP count, with PreAuth on or off (a
store's NO counts); SMTP only with ``SmtpBadGuys yes`` (an mmproxy extension: the legacy feature does
not apply to the SMTP proxy).

Pure rules; the sentences themselves live in :mod:`mmproxy.state`, shared by every worker.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

from mmproxy.addresses import in_network, unmapped
from mmproxy.state import Penalty

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class BadGuys:
    """One service's rules: seconds per failure, the longest sentence, seconds until forgiven,
    linear or step decay, never-penalised networks, addresses remembered."""

    penalty: float = 2
    max_badness: float = 60
    decay: float = 900
    linear: bool = False
    excluded: Tuple[Network, ...] = ()
    keep: int = 10000

    @classmethod
    def from_cfg(cls, cfg: Any) -> "BadGuys":
        """The rules of a service's settings (BGPenalty, BGMaxBadness, BGDecay, BGLinear, BGExcluded, BGMax)."""
        return cls(float(cfg.BGPenalty), float(cfg.BGMaxBadness), float(cfg.BGDecay), bool(cfg.BGLinear),
                   tuple(cfg.BGExcluded or ()), int(cfg.BGMax))

    @property
    def active(self) -> bool:
        """Whether a failure can ever make anybody wait."""
        return self.penalty > 0 and self.max_badness > 0 and self.decay > 0 and self.keep > 0

    def exempt(self, ip: str) -> bool:
        """``ip`` is in a BGExcluded network (``0.0.0.0/0.0.0.0``: every client, IPv6 ones too), or
        is no address at all."""
        try:
            a = unmapped(ip)
        except ValueError:
            return True
        return any(in_network(a, net) for net in self.excluded)

    def sentence(self, p: Optional[Penalty], now: float) -> float:
        """Seconds an address with the stored sentence ``p`` waits at ``now`` (``time.time()``), at
        most BGMaxBadness (a sentence stored before a refresh lowered it waits no longer)."""
        if p is None:
            return 0.0
        elapsed = max(0.0, now - p.last)
        if elapsed >= self.decay:
            return 0.0
        badness = min(p.badness, self.max_badness)
        if self.linear:
            return badness * (1.0 - elapsed / self.decay)
        return badness

    def after_failure(self, p: Optional[Penalty], now: float) -> float:
        """The sentence after one more failure at ``now``: what is left of the old one plus
        BGPenalty, at most BGMaxBadness."""
        return min(self.sentence(p, now) + self.penalty, self.max_badness)
