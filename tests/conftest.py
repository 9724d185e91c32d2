"""Shared fixtures: the real lab, and running a notebook with papermill the way users do."""
from __future__ import annotations

import json
import os
import pathlib
import time

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
LAB_PARAMS = yaml.safe_load((ROOT / "params" / "lab.yaml").read_text())
# The registry host sections 3-4 are tested on (another lab host via RUNBOOK_TEST_REGISTRY_HOST).
TEST_REGISTRY = os.environ.get("RUNBOOK_TEST_REGISTRY_HOST", LAB_PARAMS["registry_host"])


@pytest.fixture(scope="session")
def lab():
    """The local lab, up (idempotent: a running lab is left as it is)."""
    from runbook_lib import lab as _lab
    _lab.up()
    return _lab


@pytest.fixture(scope="session", autouse=True)
def runs_dir(tmp_path_factory):
    """Run folders made during tests go to a temp dir, not the repository's runs/."""
    if not os.environ.get("RUNBOOK_RUNS_DIR"):
        os.environ["RUNBOOK_RUNS_DIR"] = str(tmp_path_factory.mktemp("runs"))
    return pathlib.Path(os.environ["RUNBOOK_RUNS_DIR"])


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory):
    """One control-node state dir for the whole test session (secrets 0600, CA).

    `make test` sets RUNBOOK_STATE_DIR so that nbval, run after pytest, sees the same
    CA and registry password as the deployment the tests left on the lab."""
    if not os.environ.get("RUNBOOK_STATE_DIR"):
        os.environ["RUNBOOK_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    d = pathlib.Path(os.environ["RUNBOOK_STATE_DIR"])
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def pytest_collection_modifyitems(config, items):
    """Tests that restart the whole lab run last, so they don't wipe what others deployed."""
    items.sort(key=lambda item: 1 if item.get_closest_marker("lab_restart") else 0)
    # Anything that uses the lab is a lab test (so `-m "not lab"` really runs without it).
    for item in items:
        if "lab" in getattr(item, "fixturenames", ()) or "run_notebook" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.lab)


def execute(name: str, out: pathlib.Path, expect_error: bool | None = False, timeout: float | None = None,
            **params) -> tuple[dict, Exception | None]:
    """Run notebooks/NAME.ipynb headless as `make demo` does (papermill, the runbook engine) into
    `out` (a file, or a folder for a fresh file in it) -> (executed notebook, failure or None).
    The lab's parameters are the notebooks' defaults, so only differences are passed.
    expect_error: False, a failure fails the test with the notebook's last outputs; True, a success
    fails it; None, either is an answer."""
    import papermill as pm
    out = pathlib.Path(out)
    if out.is_dir():
        out = out / f"{name}-{time.monotonic_ns()}.ipynb"
    err = None
    try:
        pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=params, engine_name=_engine(),
                            cwd=str(NOTEBOOKS), progress_bar=False, kernel_name="python3",
                            execution_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - PapermillExecutionError on a failed cell, a dead kernel
        err = e
    nb = json.loads(out.read_text()) if out.exists() else {"cells": []}
    if err is not None and expect_error is False:
        raise AssertionError(f"{name} failed: {err!s:.500}\n{outputs_text(nb)[-4000:]}") from err
    if err is None and expect_error is True:
        pytest.fail(f"{name} was expected to fail but passed:\n{outputs_text(nb)[-2000:]}")
    return nb, err


@pytest.fixture
def run_notebook(tmp_path, state_dir):
    """run_notebook("01-rgw", **params) -> (notebook dict, output path, error or None)."""
    def run(name: str, expect_error: bool = False, **params):
        out = tmp_path / f"{name}.out.ipynb"
        nb, err = execute(name, out, expect_error=expect_error, **params)
        return nb, out, err
    return run


def _engine():
    try:
        from runbook_lib import engine  # noqa: F401
        return "runbook"
    except ImportError:
        return None


def outputs_text(nb: dict) -> str:
    """All text a reader of the executed notebook sees (outputs), joined."""
    parts = []
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            if "text" in o:
                parts.append("".join(o["text"]) if isinstance(o["text"], list) else o["text"])
            for v in (o.get("data") or {}).values():
                parts.append("".join(v) if isinstance(v, list) else str(v))
            if o.get("output_type") == "error":
                parts.append(o.get("ename", "") + ": " + o.get("evalue", ""))
    return "\n".join(parts)


@pytest.fixture
def nb_run(run_notebook):
    """run_notebook with registry_host = the host under test."""
    def run(name, expect_error=False, **params):
        params.setdefault("registry_host", TEST_REGISTRY)
        return run_notebook(name, expect_error=expect_error, **params)
    return run
