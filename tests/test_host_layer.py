"""The host layer's pure parts and its local backend: quoting, masking, dry-run, journal."""
import json
import os
import shlex

import pytest

from runbook_lib import errors, journal, masking
from runbook_lib.host import Command, LocalHost, argv, cmd, parse_hash_modes, parse_unit_states
from runbook_lib.steps import step

HOSTILE = ["a b", "it's", 'say "hi"', "x; rm -rf /tmp/nothing", "$(id)", "`id`", "a\nb", "*", "--flag", ""]


@pytest.mark.parametrize("value", HOSTILE)
def test_cmd_quotes_hostile_arguments_into_one_word(value):
    c = cmd("printf %s {v}", v=value)
    assert shlex.split(c) == ["printf", "%s", value]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_argument_reaches_the_command_verbatim(value, tmp_path):
    h = LocalHost()
    r = h.run(cmd("printf %s {v}", v=value), read=True)
    assert r.stdout == value


def test_lists_become_several_quoted_words():
    assert shlex.split(cmd("ls {files}", files=["a b", "c;d"])) == ["ls", "a b", "c;d"]
    assert shlex.split(argv("echo", "$(x)", "y z")) == ["echo", "$(x)", "y z"]


def test_plain_strings_are_refused():
    with pytest.raises(TypeError):
        LocalHost().run("echo pasted " + "string")


@pytest.fixture
def secret():
    masking.forget_all()
    value = "S3cr3t-Value-For-Test-91"
    masking.register(value)
    yield value
    masking.forget_all()


def test_mask_recurses_and_masks_derived_forms():
    masking.forget_all()
    masking.register("hunter2-long", derived_for_user="foo")
    import base64
    b64 = base64.b64encode(b"foo:hunter2-long").decode()
    got = masking.mask({"k": ["x hunter2-long y", b"hunter2-long", {"auth": b64}]})
    assert "hunter2-long" not in json.dumps(got, default=str) and b64 not in json.dumps(got, default=str)
    assert got["k"][0] == "x **** y"
    masking.forget_all()


def test_secret_never_in_result_record_journal_or_exception(secret, tmp_path, monkeypatch):
    jpath = tmp_path / "journal.jsonl"
    monkeypatch.setenv("RUNBOOK_JOURNAL", str(jpath))
    h = LocalHost()
    r = h.run(cmd("echo {s}; echo {s} >&2", s=secret), read=True)
    assert r.stdout.strip() == secret  # the caller can still parse it
    assert secret not in json.dumps(r.record()) and secret not in repr(r)
    with pytest.raises(errors.CommandFailed) as ei:
        h.run(cmd("echo {s} >&2; exit 3", s=secret))
    e = ei.value
    assert e.exit_code == 3 and "****" in str(e)
    for text in (str(e), e.command, e.stderr, repr(e.args)):
        assert secret not in text
    assert secret not in jpath.read_text() and "****" in jpath.read_text()


def test_no_log_keeps_output_out_of_the_journal(secret):
    h = LocalHost()
    r = h.run(cmd("echo not-secret-but-private"), read=True, no_log=True)
    assert r.record()["stdout"] == "<no_log>"


def test_step_report_is_masked(secret):
    @step("show {x}")
    def show(x):
        return LocalHost().run(cmd("echo {x}", x=x), read=True).stdout

    rep = show(f"value={secret}")
    assert secret not in str(rep) and secret not in rep._repr_html_()
    assert rep.status == "ok"


def test_dry_run_runs_nothing_but_reads(tmp_path):
    target = tmp_path / "touched"
    h = LocalHost(dry_run=True)

    @step("touch")
    def touch():
        assert h.run(cmd("test -d {d}", d=str(tmp_path)), read=True).exit_code == 0  # reads do run
        h.run(cmd("touch {f}", f=str(target)))
        h.put_file(str(tmp_path / "file"), "content")

    rep = touch()
    assert not target.exists() and not (tmp_path / "file").exists()
    assert rep.status == "would change"
    assert [r.skipped for r in rep.results] == [False, True, False, True]


def test_put_file_is_idempotent_and_sets_mode(tmp_path):
    h = LocalHost()
    p = str(tmp_path / "d" / "f.conf")
    assert h.put_file(p, "a=1\n", mode=0o600).changed
    assert oct(os.stat(p).st_mode & 0o777) == "0o600"
    assert not h.put_file(p, "a=1\n", mode=0o600).changed
    assert h.put_file(p, "a=1\n", mode=0o644).changed  # mode alone
    assert h.put_file(p, "a=2\n", mode=0o644).changed
    assert open(p).read() == "a=2\n"


def test_put_files_reads_every_file_once_and_writes_only_what_differs(tmp_path):
    h = LocalHost()
    a, b = str(tmp_path / "a b.pem"), str(tmp_path / "sub" / "c.yml")
    files = [(a, "A\n", 0o644, False), (b, "B\n", 0o600, True)]
    assert [r.changed for r in h.put_files(files)] == [True, True]
    assert oct(os.stat(b).st_mode & 0o777) == "0o600"
    with journal_capture() as seen:
        assert [r.changed for r in h.put_files(files)] == [False, False]
    assert sum(1 for e in seen if e["kind"] == "cmd") == 1  # one read for both
    assert [r.changed for r in h.put_files([(a, "A\n", 0o600, False), (b, "C\n", 0o600, True)])] == [True, True]
    assert oct(os.stat(a).st_mode & 0o777) == "0o600" and open(b).read() == "C\n"


def test_parse_hash_modes_marks_missing_files_unknown():
    assert parse_hash_modes("abc 644\n- -\n", 3) == [("abc", "644"), ("", ""), ("", "")]


def journal_capture():
    import contextlib

    @contextlib.contextmanager
    def cm():
        n = len(journal._entries)
        out = []
        yield out
        out.extend(journal._entries[n:])
    return cm()


def test_short_secrets_are_refused():
    with pytest.raises(ValueError):
        masking.register("abc")


# ---------------------------------------------------------------- become: the pure parts

def test_become_problem_names_each_sudo_failure_with_its_fix():
    from runbook_lib.host import become_problem
    assert become_problem("root\n", "k8s") is None and become_problem("sudo\n", "k8s") is None
    msg, hint = become_problem("sudo: a password is required\n", "k8s")
    assert "password" in msg and "k8s ALL=(ALL) NOPASSWD: ALL" in hint and "become: false" in hint
    msg, hint = become_problem("sh: 1: sudo: not found\n", "ops")
    assert "not installed" in msg and "apt-get install sudo" in hint
    msg, hint = become_problem("k8s is not in the sudoers file.  This incident will be reported.\n", "k8s")
    assert "may not use sudo" in msg and "/etc/sudoers.d/k8s" in hint


def test_become_wrap_keeps_the_command_one_quoted_word():
    from runbook_lib.host import become_wrap
    c = cmd("printf %s {v}", v="it's $(id) `x`; y")
    words = shlex.split(become_wrap(c))
    assert words[:5] == ["sudo", "-n", "-H", "--", "/bin/sh"] and words[5] == "-c" and words[6] == c
    assert shlex.split(words[6]) == ["printf", "%s", "it's $(id) `x`; y"]


def test_local_host_as_root_never_wraps_in_sudo():
    import os
    h = LocalHost(become=True)
    if os.geteuid() == 0:
        assert h.check_become() == "root" and not h.uses_sudo
        assert h.run(cmd("id -u"), read=True).stdout.strip() == "0"


def test_unit_states_answer_as_is_enabled_and_is_active_would():
    out = ("MainPID=1026\nActiveState=active\nUnitFileState=enabled\n\n"
           "MainPID=0\nActiveState=inactive\nUnitFileState=disabled\n\n"
           "MainPID=0\nActiveState=reloading\nUnitFileState=static\n\n"
           "MainPID=0\nActiveState=failed\nUnitFileState=masked\n")
    assert parse_unit_states(out, ["a", "b", "c", "d"]) == {
        "a": {"enabled": True, "active": True, "pid": 1026},
        "b": {"enabled": False, "active": False, "pid": 0},
        "c": {"enabled": True, "active": True, "pid": 0},
        "d": {"enabled": False, "active": False, "pid": 0}}
    # systemctl missing or failing: nothing enabled, nothing active
    assert parse_unit_states("", ["x"]) == {"x": {"enabled": False, "active": False, "pid": 0}}
