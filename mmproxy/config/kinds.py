"""The kinds of service a ServiceList names, and the legacy names each goes by.

One row per kind: the name mmproxy uses inside (``imap``), the registry's file code (``I``), the
ServiceList library basename that is also the ``.cfg``/``-def.cfg`` stem (``ImapProxyAService``),
and the prefix of its daily log file (``ImapProxy_yyyymmdd.log``).  ``AService`` is the daemon's own
row: its file and log, no listeners.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Kind:
    name: str          # "imap", "pop", "smtp"; "aservice" for the daemon itself
    code: str          # "I", "P", "S", "A": the files column of the parameter registry
    file: str          # "ImapProxyAService": ServiceList basename, <file>.cfg, <file>-def.cfg
    log_prefix: str    # "ImapProxy": LogDir/<log_prefix>_yyyymmdd.log
    label: str         # "IMAP4": for people


AService = Kind("aservice", "A", "AService", "AService", "AService")
SERVICES: Dict[str, Kind] = {k.name: k for k in (
    Kind("imap", "I", "ImapProxyAService", "ImapProxy", "IMAP4"),
    Kind("pop", "P", "PopProxyAService", "PopProxy", "POP3"),
    Kind("smtp", "S", "SmtpProxyAService", "SmtpProxy", "SMTP"),
)}
BY_NAME: Dict[str, Kind] = {AService.name: AService, **SERVICES}
BY_CODE: Dict[str, Kind] = {k.code: k for k in BY_NAME.values()}
BY_FILE: Dict[str, Kind] = {k.file.lower(): k for k in SERVICES.values()}
