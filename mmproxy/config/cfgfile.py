"""The legacy ``.cfg`` reader: ``SECTION:Key value`` lines, ``#`` comments, double-quoted values
(several quoted words, ``"a" "b"``, are the words joined by a blank).

It knows syntax only (no parameter names), keeps file and line of every entry, and reports
problems instead of raising, so that ``check-config`` can list every one of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

_QUOTED_WORDS = re.compile(r'((?:"[^"]*"\s+)+"[^"]*")\s*(?:#.*)?')      # two or more quoted words
_LINE = re.compile(r"(?:(?P<section>[^\s:#\"]+)\s*:)?\s*(?P<key>[A-Za-z0-9_.-]+)(?:\s+(?P<value>.*))?")


@dataclass(frozen=True)
class Problem:
    """One finding about the configuration, printed as ``file:line: [warning: ]message``."""

    file: str
    line: Optional[int]
    severity: str          # "error" or "warning"
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else "%s:%d" % (self.file, self.line)
        return "%s: %s%s" % (where, "warning: " if self.severity == "warning" else "", self.message)


def error(file: str, line: Optional[int], message: str) -> Problem:
    return Problem(file, line, "error", message)


def warning(file: str, line: Optional[int], message: str) -> Problem:
    return Problem(file, line, "warning", message)


@dataclass(frozen=True)
class Entry:
    """One ``SECTION:Key value`` line; ``section`` is None for a line without a section prefix."""

    file: str
    line: int
    section: Optional[str]
    key: str
    value: str             # quotes removed; "" means unset
    column: int = 0        # of the value's first character in the line (1-based; 0: unknown)

    @property
    def where(self) -> str:
        return "%s:%d" % (self.file, self.line)


def _value(text: str) -> Tuple[str, int]:
    """The value without quotes or trailing comment, and the offset of its first character in
    ``text``; ValueError for a quote left open."""
    lead = len(text) - len(text.lstrip())
    text = text.strip()
    if text.startswith('"'):
        words = _QUOTED_WORDS.fullmatch(text)
        if words:                  # "attr1" "attr2": the tpauthsdk README's AuthenticationLdapAttributes
            return " ".join(re.findall(r'"([^"]*)"', words.group(1))), lead
        end = text.find('"', 1)
        if end < 0:
            raise ValueError("closing quote missing: a quoted value must end on its own line")
        rest = text[end + 1:].strip()
        if rest and not rest.startswith("#"):
            raise ValueError("unexpected text after the closing quote: %s" % rest)
        return text[1:end], lead + 1
    comment = re.search(r"\s#", text)
    return (text[:comment.start()] if comment else text).rstrip(), lead


def parse(text: str, file: str) -> Tuple[List[Entry], List[Problem]]:
    """Entries and syntax problems of a file's text; ``file`` is only used in messages."""
    entries: List[Entry] = []
    problems: List[Problem] = []
    for n, raw in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if not m:
            problems.append(error(file, n, "cannot read this line: expected `default:Key value`"))
            continue
        try:
            value, offset = _value(m.group("value") or "")
        except ValueError as e:
            problems.append(error(file, n, "%s: %s" % (m.group("key"), e)))
            continue
        column = len(raw) - len(raw.lstrip()) + (m.start("value") if m.group("value") else len(line)) + offset + 1
        entries.append(Entry(file, n, m.group("section"), m.group("key"), value, column))
    return entries, problems


def read(path: str) -> Tuple[Optional[List[Entry]], List[Problem]]:
    """Parse a file (entries None when it cannot be read); bytes that are not UTF-8 are read as
    Latin-1, as old files were written, with a warning."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, [error(path, None, "cannot read: %s" % (e.strerror or e))]
    try:
        text, problems = data.decode("utf-8"), []
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        text, problems = data.decode("latin-1"), [warning(path, line, "not UTF-8: the file is read as Latin-1")]
    entries, more = parse(text, path)
    return entries, problems + more


def select(entries: List[Entry], section: str = "default") -> Tuple[Dict[str, Entry], List[Problem]]:
    """The entries of one section keyed by lower-case key; the last of a repeated key wins.

    A line without a section prefix counts as ``default:`` (legacy files always carry one).
    """
    chosen: Dict[str, Entry] = {}
    problems: List[Problem] = []
    for e in entries:
        if e.section is None:
            if section.lower() != "default":
                continue
            problems.append(warning(e.file, e.line, "%s has no section prefix: read as default:%s" % (e.key, e.key)))
        elif e.section.lower() != section.lower():
            continue
        first = chosen.pop(e.key.lower(), None)
        if first is not None:
            problems.append(warning(e.file, e.line, "%s is set again (first at line %d): the last value wins"
                                    % (e.key, first.line)))
        chosen[e.key.lower()] = e
    return chosen, problems
