"""Templates (``cfg/*-def.cfg``) and the reference page (``docs/parameters.md``), written from the registry.

Run ``python -m mmproxy.config.generate [REPO_ROOT]`` after changing ``params.py``; a test fails
while the committed files differ from what the registry renders.  The templates ship with mmproxy:
setup.py installs ``cfg/`` as the package directory ``mmproxy/templates/`` (see ``shipped_template``).
"""
from __future__ import annotations

import os
import sys
import textwrap
from itertools import groupby
from typing import Dict, List, Optional

from mmproxy.config.params import FILE_CODES, FILE_NAMES, PARAMS, Param
from mmproxy.config.types import Deferred

PURPOSE = {
    "A": "which services mmproxy starts (ServiceList), and settings of the daemon itself",
    "I": "settings of the IMAP proxy service",
    "P": "settings of the POP3 proxy service",
    "S": "settings of the SMTP proxy service (read only when ServiceList names it)",
}


def default_text(p: Param, code: Optional[str] = None) -> str:
    """The default as legacy text, for file ``code`` (or in general when None)."""
    if isinstance(p.default, Deferred):
        return p.default.render(code)
    if p.default is None:
        return ""
    return p.type.render(p.default)


def _quoted(value: str) -> str:
    return '"%s"' % value if value == "" or any(c in value for c in ' \t#"') else value


PER_DOMAIN = "may also be set per virtual domain (vdmap.cfg)"


def _notes(p: Param) -> List[str]:
    notes = []
    if not p.supported:
        notes.append("not supported yet: mmproxy refuses to start when it is set" if p.security
                     else "not supported yet: ignored")
    if p.obsolete:
        notes.append("obsolete, superseded by %s" % p.obsolete)
    if p.per_domain:
        notes.append(PER_DOMAIN)
    if not p.reload:
        notes.append("a change needs a restart")
    return notes


def render_template(code: str) -> str:
    """The ``<file>-def.cfg`` template of file ``code``: every parameter commented out at its default."""
    name = FILE_NAMES[code] + ".cfg"
    header = (
        "%s: %s.\n\n"
        "mmproxy copies %s-def.cfg to %s when that file is missing, as the Messaging Multiplexor did. "
        "This template is generated from mmproxy's parameter registry (python -m mmproxy.config.generate): "
        "edit %s, not the template.\n\n"
        "One setting per line: `default:Key value`. `default` is the section; another section is only read "
        "when ServiceList selects it (INSTANCE:SECTION). Keys are case-insensitive. Double-quote a value that "
        'contains blanks or #; "" leaves a key unset. Lines starting with # are comments. Each setting below '
        "is commented out and shows its default: remove the leading # to change it. Relative paths are "
        "relative to this directory (../data/log is the legacy msg_svr_base/data/log)."
        % (name, PURPOSE[code], FILE_NAMES[code], name, name))
    out: List[str] = []
    for para in header.split("\n\n"):
        out += (["#"] if out else []) + textwrap.wrap(para, 98, initial_indent="# ", subsequent_indent="# ")
    params = [p for p in PARAMS.values() if code in p.files]
    for group, members in groupby(params, key=lambda p: p.group):
        out += ["", "", "# ==== %s ====" % group]
        for p in members:
            doc = "%s: %s%s." % (p.name, p.doc, "".join(" [%s]" % n for n in _notes(p)))
            out.append("")
            out += textwrap.wrap(doc, 98, initial_indent="# ", subsequent_indent="#   ")
            out.append("#default:%s %s" % (p.name, _quoted(default_text(p, code))))
    return "\n".join(out) + "\n"


def shipped_template(code: str) -> Optional[str]:
    """The path of the ``<file>-def.cfg`` template that came with this mmproxy, or None.

    An installed mmproxy has them in ``mmproxy/templates/`` (setup.py maps the top-level ``cfg/``
    there); a source checkout has ``cfg/`` beside the package.
    """
    name = FILE_NAMES[code] + "-def.cfg"
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # .../mmproxy
    for folder in (os.path.join(package, "templates"), os.path.join(os.path.dirname(package), "cfg")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_reference() -> str:
    """``docs/parameters.md``: every parameter with its files, type, default and status."""
    out = [
        "# Configuration parameters",
        "",
        "Generated from `mmproxy/config/params.py` by `python -m mmproxy.config.generate`; do not edit.",
        "",
        "mmproxy reads the Messaging Multiplexor's files unchanged. Files: "
        + ", ".join("%s = %s.cfg" % (c, FILE_NAMES[c]) for c in FILE_CODES)
        + "; *also* names files where a legacy tree often carries the key and mmproxy still honours it.",
        "A key in a file not listed for it is a warning; an unknown key or a bad value is an error.",
        "Status: *yes* = implemented; *not yet* = recognised and ignored (warning); *not yet, refuses* = an",
        "access control that mmproxy does not implement yet: setting it is an error, so that a migrated",
        "security setting never silently stops working.",
        "vdmap: *yes* = may also be set per virtual domain in vdmap.cfg (VirtualDomainFile), as the Messaging",
        "Server manual lists (its CertMap is CertMapDN, its DomainDelim VirtualDomainDelim); that value then",
        "applies to the sessions accepted on the virtual domain's server address.",
    ]
    for group, members in groupby(PARAMS.values(), key=lambda p: p.group):
        out += ["", "## %s" % group, "",
                "| Parameter | Files | vdmap | Type | Default | Status | Description |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in members:
            files = " ".join(p.files) + (" (also %s)" % " ".join(p.honoured_in) if p.honoured_in else "")
            default = default_text(p)
            default = "unset" if p.default is None else "`%s`" % default if default else '`""`'
            status = "yes" if p.supported else "not yet, refuses" if p.security else "not yet"
            notes = [n for n in _notes(p) if not n.startswith("not supported") and n != PER_DOMAIN]
            doc = p.doc + "".join(" *%s.*" % (n[0].upper() + n[1:]) for n in notes)
            vdmap = "yes" if p.per_domain else ""
            out.append("| %s |" % " | ".join(_cell(c) for c in (p.name, files, vdmap, p.type.name, default, status,
                                                                 doc)))
    return "\n".join(out) + "\n"


def outputs() -> Dict[str, str]:
    """Repository-relative path -> content of every generated file."""
    files = {os.path.join("cfg", FILE_NAMES[c] + "-def.cfg"): render_template(c) for c in FILE_CODES}
    files[os.path.join("docs", "parameters.md")] = render_reference()
    return files


def main(argv: List[str]) -> int:
    root = argv[0] if argv else "."
    for rel, text in outputs().items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
