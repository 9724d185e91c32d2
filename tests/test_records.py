"""Run folders: every run leaves executed notebooks, offline HTML, run.json, index.md and latest."""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from runbook_lib import records

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
RUNBOOK = [sys.executable, "-m", "runbook_lib.cli"]


def sh(argv, env, **kw):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=e, timeout=300, **kw)


@pytest.fixture
def env(tmp_path):
    return {"RUNBOOK_RUNS_DIR": str(tmp_path / "runs"), "RUNBOOK_STATE_DIR": str(tmp_path / "state")}


def test_engine_run_folder(tmp_path, env):
    """papermill --engine runbook with no $RUNBOOK_RUN_DIR: the engine makes the run folder."""
    r = sh([sys.executable, "-m", "papermill", "--engine", "runbook", "--no-progress-bar",
            DATA / "verdict.ipynb", tmp_path / "out.ipynb", "-p", "marker", "zebra-42"], env)
    assert r.returncode == 0, r.stderr
    runs = pathlib.Path(env["RUNBOOK_RUNS_DIR"])
    latest = runs / "latest"
    assert latest.is_symlink()
    run = latest.resolve()
    assert re.match(r"^\d{8}T\d{6}Z-verdict$", run.name)
    names = {p.name for p in run.iterdir()}
    assert {"verdict.ipynb", "verdict.html", "run.json", "journal.jsonl", "90-records.verdict.json"} <= names

    data = json.loads((run / "run.json").read_text())
    assert data["outcome"] == "PASS" and data["name"] == "verdict"
    assert data["user"] and data["hostname"] and data["started"] and data["ended"]
    # the parameters: the cell's defaults and the injected value
    assert data["parameters"]["marker"] == "zebra-42" and data["parameters"]["fail"] is False
    assert data["sections"][0]["section"] == "90-records" and data["sections"][0]["status"] == "PASS"
    assert "zebra-42" in data["sections"][0]["summary"]
    cmds = [c for c in data["commands"] if c["host"] == "local" and c["command"] in ("true", "echo zebra-42")]
    assert {c["command"] for c in cmds} == {"true", "echo zebra-42"}
    for c in cmds:
        assert {"host", "command", "exit_code", "duration", "changed", "ok"} <= set(c)
    assert data["changed"] is True
    assert data["tool_versions"]["runbook_lib"] and "papermill" in data["tool_versions"]

    html = (run / "verdict.html").read_text()
    assert "VERDICT 90-records: PASS" in html and "zebra-42" in html
    # renders offline: no script or stylesheet fetched from the network
    assert not re.findall(r'<(?:script|link)[^>]+(?:src|href)="https?://', html)

    index = (runs / "index.md").read_text()
    assert f"| verdict | PASS | yes | [{run.name}]({run.name}/) |" in index


def test_failed_verdict_and_index_order(tmp_path, env):
    r1 = sh([sys.executable, "-m", "papermill", "--engine", "runbook", DATA / "verdict.ipynb",
             tmp_path / "a.ipynb"], env)
    assert r1.returncode == 0, r1.stderr
    time.sleep(1.1)  # folder names are per second
    r2 = sh([sys.executable, "-m", "papermill", "--engine", "runbook", DATA / "verdict.ipynb",
             tmp_path / "b.ipynb", "-p", "fail", "True"], env)
    assert r2.returncode != 0 and "CheckFailed" in r2.stderr
    runs = pathlib.Path(env["RUNBOOK_RUNS_DIR"])
    rows = [line for line in (runs / "index.md").read_text().splitlines() if "| verdict |" in line]
    assert len(rows) == 2
    assert "| FAIL |" in rows[0] and "| PASS |" in rows[1]  # newest first
    latest = json.loads((runs / "latest" / "run.json").read_text())
    assert latest["outcome"] == "FAIL" and latest["sections"][0]["status"] == "FAIL"
    assert "VERDICT 90-records: FAIL" in (runs / "latest" / "verdict.html").read_text()


def test_cli_run_and_runs(env):
    r = sh(RUNBOOK + ["run", DATA / "verdict.ipynb", "-p", "marker", "cli-7", "--dry-run"], env)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"run folder: (\S+)", r.stdout)
    assert m, r.stdout
    run = pathlib.Path(m.group(1))
    data = json.loads((run / "run.json").read_text())
    assert data["outcome"] == "DRY-RUN" and data["parameters"]["dry_run"] is True
    assert data["would_change"] is True and data["changed"] is False
    assert (run / "verdict.ipynb").exists() and (run / "verdict.html").exists()
    r = sh(RUNBOOK + ["runs"], env)
    assert r.returncode == 0 and run.name in r.stdout and "DRY-RUN" in r.stdout


def test_run_unit(tmp_path):
    """Run.create/finish without a notebook: provisional RUNNING entry, merge, outcome."""
    run = records.Run.create("unit", tmp_path, params={"rgw_host": "local", "dry_run": False})
    assert json.loads(run.json_path.read_text())["outcome"] == "RUNNING"
    assert "| unit | RUNNING |" in (tmp_path / "index.md").read_text()
    (run.path / "01-x.verdict.json").write_text(json.dumps({"section": "01-x", "status": "PASS", "summary": "s"}))
    run.add_notebook("01-x", ipynb=run.path / "01-x.ipynb", status="completed", duration=1.234)
    data = run.finish(versions=False)
    assert data["outcome"] == "PASS" and data["notebooks"][0]["ipynb"] == "01-x.ipynb"
    run.add_notebook("02-y", status="failed", error="boom")
    assert run.finish(versions=False)["outcome"] == "FAIL"
    assert os.readlink(tmp_path / "latest") == run.path.name


def test_runs_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("RUNBOOK_RUNS_DIR", raising=False)
    monkeypatch.setenv("PWD", str(tmp_path))
    assert records.runs_dir() == tmp_path.resolve() / "runs"
    assert records.runs_dir(prefer_repo=True) == ROOT / "runs"
    monkeypatch.setenv("RUNBOOK_RUNS_DIR", str(tmp_path / "x"))
    assert records.runs_dir(prefer_repo=True) == tmp_path / "x"


@pytest.mark.lab
def test_tool_versions_on_lab(lab):
    import yaml
    params = yaml.safe_load((ROOT / "params" / "lab.yaml").read_text())
    v = records.tool_versions(params)
    assert v["ceph"].startswith("ceph version 16."), v
    assert "unknown" not in v["docker"], v
    assert v["registry"] != "unknown", v


def test_tool_versions_unreachable_is_unknown():
    v = records.tool_versions({"rgw_host": "198.18.0.250", "registry_host": "198.18.0.250", "ssh_port": 22,
                               "known_hosts": "/nonexistent"})
    assert v["ceph"].startswith("unknown") and v["docker"].startswith("unknown")


def test_cli_deploy_bad_parameter(env):
    """runbook deploy: validation first (nothing runs), the run folder printed and recorded as FAIL."""
    r = sh(RUNBOOK + ["deploy", "-f", ROOT / "params" / "lab.yaml", "-p", "bogus", "1", "--dry-run"], env)
    assert r.returncode == 1
    assert "unknown parameter 'bogus'" in r.stdout + r.stderr
    run = pathlib.Path(re.search(r"run folder: (\S+)", r.stdout).group(1))
    data = json.loads((run / "run.json").read_text())
    assert data["outcome"] == "FAIL" and data["parameters"]["bogus"] == 1 and data["parameters"]["dry_run"] is True
    assert (run / "deploy.ipynb").exists() and (run / "deploy.html").exists()
    assert not list(run.glob("0*.ipynb"))
