"""The committed templates and reference are what the registry renders, and the templates load cleanly."""
import os
import shutil

import pytest

from mmproxy.config import cfgfile, load_config
from mmproxy.config.generate import outputs, render_template, shipped_template
from mmproxy.config.params import FILE_CODES, FILE_NAMES, PARAMS, lookup
from mmproxy.config.types import Ctx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("rel", sorted(outputs()))
def test_committed_file_matches_the_registry(rel):
    path = os.path.join(ROOT, rel)
    committed = open(path, encoding="utf-8").read() if os.path.exists(path) else None
    assert committed == outputs()[rel], "%s is stale: run python -m mmproxy.config.generate" % rel


def test_templates_load_with_zero_errors(tmp_path):
    for code in FILE_CODES:
        shutil.copy(os.path.join(ROOT, "cfg", FILE_NAMES[code] + "-def.cfg"), tmp_path / (FILE_NAMES[code] + ".cfg"))
    config = load_config(str(tmp_path))
    assert config.errors == []
    assert [s.spec.kind for s in config.services] == ["imap", "pop"]


@pytest.mark.parametrize("code", FILE_CODES)
def test_every_template_line_is_a_valid_setting_of_that_file(tmp_path, code):
    cfgdir = tmp_path / "config"          # ../config/sslpassword.conf from itself, as in msg_svr_base
    cfgdir.mkdir()
    (cfgdir / "sslpassword.conf").write_text("Internal (Software) Token:x\n")
    text = render_template(code)
    lines = [line[1:] for line in text.splitlines() if line.startswith("#default:")]
    entries, problems = cfgfile.parse("\n".join(lines), "t")
    assert problems == []
    assert {e.key for e in entries} == {p.name for p in PARAMS.values() if code in p.files}
    for e in entries:
        if e.value:
            lookup(e.key).type.convert(e.value, Ctx(str(cfgdir)))


@pytest.mark.parametrize("code", FILE_CODES)
def test_a_source_checkout_ships_the_committed_templates(code):
    """An installed mmproxy finds them in mmproxy/templates/ (tests/test_packaging.py checks that)."""
    assert shipped_template(code) == os.path.join(ROOT, "cfg", FILE_NAMES[code] + "-def.cfg")
