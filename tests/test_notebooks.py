"""Every notebook's parameters are visible to papermill (--help-notebook) and typed."""
import ast
import json
import pathlib

import papermill as pm
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
COMMON = {"rgw_host", "rgw_port", "registry_host", "registry_port", "registry_user", "uid", "ssh_user", "become",
          "ssh_port", "ssh_key", "known_hosts", "dry_run", "state_dir"}


def _param_cell(nb):
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_parameter_is_typed_documented_and_seen_by_papermill(path):
    src = _param_cell(json.loads(path.read_text()))
    declared = {n.target.id for n in ast.parse(src).body if isinstance(n, ast.AnnAssign)}
    plain = [n for n in ast.parse(src).body if isinstance(n, ast.Assign)]
    assert not plain, "untyped parameter: write `name: type = default  # help`"
    seen = pm.inspect_notebook(str(path))
    assert set(seen) == declared, f"papermill does not see {declared - set(seen)} (an '=' in the help text?)"
    assert all(p["help"] for p in seen.values()), [n for n, p in seen.items() if not p["help"]]
    assert COMMON <= declared, f"missing common parameters {COMMON - declared}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_hold_no_error_output(path):
    nb = json.loads(path.read_text())
    assert not [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
