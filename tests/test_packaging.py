"""The package's declared dependencies, in both places users install from."""
import pathlib
import re
import subprocess
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _names(reqs):
    return {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower() for r in reqs}


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    want = _names(py["dependencies"]) | _names(py["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    got = _names(p for p in pip if not p.startswith("-e"))
    assert got == want


def test_passlib_is_the_maintained_fork_and_works_with_bcrypt():
    # passlib 1.7.4 breaks on bcrypt 5; libpass is the fork with the same import name.
    from passlib.apache import HtpasswdFile
    ht = HtpasswdFile(default_scheme="bcrypt")
    ht.set_password("foo", "a-password-for-test")
    assert ht.check_password("foo", "a-password-for-test")
    assert not ht.check_password("foo", "wrong")


def test_papermill_under_runbook_lib_skips_the_slow_iri_grammar():
    """rfc3987_syntax compiles its grammars at import (4 s in a kernel, every deploy kernel paid it)."""
    code = ("import sys, runbook_lib, papermill, nbformat, jsonschema; "
            "print(sys.modules.get('rfc3987_syntax') is None, 'lark' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
