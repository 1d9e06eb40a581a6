"""The legacy .cfg reader: syntax only, every entry and problem with its line."""
from mmproxy.config import cfgfile
from mmproxy.config.cfgfile import Problem


def parse(text):
    return cfgfile.parse(text, "/etc/mmproxy/X.cfg")


def test_sections_quotes_comments_and_whitespace():
    entries, problems = parse(
        "# a comment\n"
        "\n"
        "default:LdapURL \"ldap://ldap1 ldap2/o=internet\"\n"
        "   default: EhloKeywords TURN\n"
        "default :LogLevel\t5   # trailing comment\n"
        "default:Banner \"Mail # 1\"   # comment after quotes\n"
        "default:BindPass se#cret\n"
        "default:SSLCertPrefix \"\"\n"
        "default:Banner2\n"
        "east:LogLevel 7\r\n")
    assert problems == []
    got = [(e.line, e.section, e.key, e.value) for e in entries]
    assert got == [(3, "default", "LdapURL", "ldap://ldap1 ldap2/o=internet"),
                   (4, "default", "EhloKeywords", "TURN"),
                   (5, "default", "LogLevel", "5"),
                   (6, "default", "Banner", "Mail # 1"),
                   (7, "default", "BindPass", "se#cret"),
                   (8, "default", "SSLCertPrefix", ""),
                   (9, "default", "Banner2", ""),
                   (10, "east", "LogLevel", "7")]
    assert entries[0].where == "/etc/mmproxy/X.cfg:3"


def test_unclosed_quote_is_an_error_with_its_line():
    entries, problems = parse('default:LogLevel 1\ndefault:Banner "Welcome to\nmail"\ndefault:LogDir /x\n')
    assert [e.key for e in entries] == ["LogLevel", "LogDir"]
    assert [str(p) for p in problems] == [
        '/etc/mmproxy/X.cfg:2: Banner: closing quote missing: a quoted value must end on its own line',
        "/etc/mmproxy/X.cfg:3: cannot read this line: expected `default:Key value`"]


def test_text_after_closing_quote_is_an_error():
    _, problems = parse('default:Banner "a" b\n')
    assert problems[0].line == 1 and "after the closing quote" in problems[0].message


def test_several_quoted_words_are_one_list():
    # the legacy tpauthsdk README writes: default:AuthenticationLdapAttributes "attr1" "attr2" ...
    entries, problems = parse('default:AuthenticationLdapAttributes "mail" "employeeNumber"  # sent along\n')
    assert problems == [] and entries[0].value == "mail employeeNumber"


def test_line_without_section_is_read_as_default_with_a_warning():
    entries, problems = parse("LogLevel 3\ndefault:LogDir /x\nother:LogLevel 9\n")
    assert problems == []
    assert entries[0].section is None
    chosen, problems = cfgfile.select(entries)
    assert chosen["loglevel"].value == "3" and "other" not in chosen and set(chosen) == {"loglevel", "logdir"}
    assert [str(p) for p in problems] == [
        "/etc/mmproxy/X.cfg:1: warning: LogLevel has no section prefix: read as default:LogLevel"]
    chosen, problems = cfgfile.select(entries, "OTHER")
    assert chosen["loglevel"].value == "9" and problems == []


def test_duplicate_key_warns_and_the_last_wins_case_insensitively():
    entries, _ = parse("default:LogLevel 1\ndefault:loglevel 2\n")
    chosen, problems = cfgfile.select(entries)
    assert chosen["loglevel"].value == "2" and chosen["loglevel"].line == 2
    assert [str(p) for p in problems] == [
        "/etc/mmproxy/X.cfg:2: warning: loglevel is set again (first at line 1): the last value wins"]


def test_unparsable_lines():
    _, problems = parse("default:\n=x\ndefault:Key:more value\n")
    assert [p.line for p in problems] == [1, 2, 3] and all(p.severity == "error" for p in problems)


def test_read_latin1_and_bom(tmp_path):
    f = tmp_path / "AService.cfg"
    f.write_bytes(b"\xef\xbb\xbfdefault:LogLevel 1\ndefault:Banner \"Willkommen \xe0 bord\"\n")
    entries, problems = cfgfile.read(str(f))
    assert entries[0].key == "LogLevel" and entries[1].value == "Willkommen \u00e0 bord"
    assert [str(p) for p in problems] == ["%s:2: warning: not UTF-8: the file is read as Latin-1" % f]


def test_read_unreadable_file(tmp_path):
    entries, problems = cfgfile.read(str(tmp_path / "missing.cfg"))
    assert entries is None
    assert str(problems[0]) == "%s: cannot read: No such file or directory" % (tmp_path / "missing.cfg")


def test_problem_format():
    assert str(Problem("/etc/mmproxy/I.cfg", 12, "error", "bad")) == "/etc/mmproxy/I.cfg:12: bad"
    assert str(Problem("/etc/mmproxy/I.cfg", 12, "warning", "odd")) == "/etc/mmproxy/I.cfg:12: warning: odd"
    assert str(Problem("/etc/mmproxy/I.cfg", None, "error", "bad")) == "/etc/mmproxy/I.cfg: bad"
