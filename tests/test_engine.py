"""The `runbook` papermill engine scrubs every known secret before every save and
in the notebook it returns: run for real with papermill's CLI, as users do."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pytest

from runbook_lib import engine, masking

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
PAPERMILL = [sys.executable, "-m", "papermill"]
SECRET = "S3cr3t-passw0rd!/\"x"  # '/' and '"' also appear JSON-escaped on disk


def papermill(*args, env=None, cwd=None):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(PAPERMILL + ["--engine", "runbook", "--no-progress-bar", *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


def all_files_text(folder: pathlib.Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())


def leaks(text: str, *secrets) -> list[str]:
    forms = set()
    for s in secrets:
        forms |= {s, json.dumps(s)[1:-1]}
    return [s for s in forms if s in text]


@pytest.fixture
def env(tmp_path):
    runs = tmp_path / "runs"
    state = tmp_path / "state"
    return {"RUNBOOK_RUNS_DIR": str(runs), "RUNBOOK_STATE_DIR": str(state)}


def only_run(env) -> pathlib.Path:
    runs = [p for p in pathlib.Path(env["RUNBOOK_RUNS_DIR"]).iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(runs) == 1, runs
    return runs[0]


def test_success_output_has_no_secret(tmp_path, env):
    out, leak = tmp_path / "out.ipynb", tmp_path / "generated"
    r = papermill(DATA / "secret_print.ipynb", out, "-p", "password", SECRET, "-p", "leak_file", leak,
                  "--log-output", env=env)
    assert r.returncode == 0, r.stderr
    generated = leak.read_text()
    text = out.read_text()
    assert not leaks(text, SECRET, generated)
    assert not leaks(r.stdout + r.stderr, SECRET, generated)  # --log-output streams are scrubbed too
    nb = nbformat.reads(text, as_version=4)
    # the injected-parameters cell and papermill's metadata
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'password = "****"' in injected[0].source
    assert nb.metadata.papermill.parameters.password == "****"
    outputs = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "the password is ****" in outputs and "<b>****</b>" in outputs
    # the run folder the engine made (RUNBOOK_RUN_DIR was unset)
    run = only_run(env)
    assert {"secret_print.ipynb", "secret_print.html", "run.json"} <= {p.name for p in run.iterdir()}
    assert not leaks(all_files_text(run), SECRET, generated)
    # the mask file held the secrets only while the run lasted
    assert not list(pathlib.Path(env["RUNBOOK_STATE_DIR"]).glob(".mask-*"))


def test_failure_output_has_no_secret(tmp_path, env):
    out, leak = tmp_path / "out.ipynb", tmp_path / "generated"
    r = papermill(DATA / "secret_fail.ipynb", out, "-p", "password", SECRET, "-p", "leak_file", leak, env=env)
    assert r.returncode != 0
    generated = leak.read_text()
    assert "RuntimeError" in r.stderr and "could not log in with ****" in r.stderr
    assert not leaks(r.stdout + r.stderr, SECRET, generated)
    text = out.read_text()
    assert not leaks(text, SECRET, generated)
    nb = nbformat.reads(text, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors and "****" in errors[0].evalue and any("****" in line for line in errors[0].traceback)
    run = only_run(env)
    data = json.loads((run / "run.json").read_text())
    assert data["outcome"] == "FAIL" and "could not log in with ****" in data["notebooks"][0]["error"]
    assert not leaks(all_files_text(run), SECRET, generated)
    # the run folder's copy carries papermill's error markers, as the output does
    assert "papermill-error-cell" in (run / "secret_fail.ipynb").read_text()


def test_secrets_from_state_dir_and_environment(tmp_path, env):
    """Secrets nobody registered in the kernel: the state dir's 0600 files and $REGISTRY_PASSWORD."""
    state = pathlib.Path(env["RUNBOOK_STATE_DIR"])
    (state / "secrets").mkdir(parents=True)
    stored = "stored-swift-key-9f8e7d6c5b4a"
    (state / "secrets" / "swift_key").write_text(stored + "\n")
    pem_line = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
    pem = "PRIVATE KEY"  # the armour is assembled here so no key-shaped text is committed
    (state / "secrets" / "ca-key.pem").write_text(f"-----BEGIN {pem}-----\n{pem_line}\n-----END {pem}-----\n")
    envpw = "env-registry-password-77"
    out = tmp_path / "out.ipynb"
    r = papermill(DATA / "echo.ipynb", out, "-p", "text", f"{stored} and {pem_line}",
                  env={**env, "REGISTRY_PASSWORD": envpw})
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert not leaks(text, stored, pem_line, envpw)
    assert "text: **** and ****" in text and "env: ****" in text
    # the kernel was given a mask file in the state dir and the run folder
    assert f"mask file: {state}" in text and "run dir: " in text
    assert not leaks(all_files_text(only_run(env)), stored, pem_line, envpw)


def test_python_api_returns_scrubbed_notebook(tmp_path, env, monkeypatch):
    import papermill as pm
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out.ipynb"
    nb = pm.execute_notebook(str(DATA / "secret_print.ipynb"), str(out), parameters={"password": SECRET},
                             engine_name="runbook", progress_bar=False)
    assert not leaks(json.dumps(nb), SECRET)
    assert not leaks(out.read_text(), SECRET)


# -- unit tests of the scrubbing itself ---------------------------------------------------------------
def _nb_with(secret):
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": {"password": secret}, "exception": None}
    c = nbformat.v4.new_code_cell(f'password = "{secret}"', metadata={"tags": ["injected-parameters"]})
    c.outputs = [nbformat.v4.new_output("stream", name="stdout", text=secret[:5]),
                 nbformat.v4.new_output("stream", name="stdout", text=secret[5:] + "\n"),
                 nbformat.v4.new_output("error", ename="E", evalue=f"x {secret}", traceback=[f"tb {secret}"]),
                 nbformat.v4.new_output("display_data", data={"text/html": f"<i>{secret}</i>"})]
    nb.cells.append(c)
    return nb


def test_scrub_notebook_everywhere():
    s = "unit-secret-abcdef"
    clean = engine.scrub_notebook(_nb_with(s), [s])
    text = json.dumps(clean)
    assert s not in text and s[5:] not in text  # the chunked print is merged, then masked
    assert clean.metadata.papermill.parameters.password == "****"
    assert clean.cells[0].source == 'password = "****"'


def test_every_save_is_scrubbed(tmp_path):
    """NotebookExecutionManager.save (cell start/complete, autosave, failure) writes scrubbed copies
    and leaves the live notebook (still executing) untouched."""
    s = "unit-secret-save-123456"
    nb = _nb_with(s)
    out = tmp_path / "o.ipynb"
    mask_file = tmp_path / "mask.jsonl"
    mask_file.write_text(json.dumps(s) + "\n")
    man = engine.ScrubbingExecutionManager(nb, mask_file=str(mask_file), output_path=str(out), progress_bar=False)
    man.save()
    assert s not in out.read_text() and "****" in out.read_text()
    assert s in nb.cells[0].source  # the kernel still gets the real value
    nb.cells[0].metadata["papermill"] = {"status": "pending", "start_time": None, "exception": None}
    man.cell_start(nb.cells[0], 0)
    assert s not in out.read_text()
    man.cell_exception(nb.cells[0], 0)  # the failure path, then the save that follows it
    man.cell_complete(nb.cells[0], 0)
    assert s not in out.read_text() and nb.cells[0].metadata.papermill["status"] == "failed"


def test_known_secrets_sources(tmp_path, monkeypatch):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "a").write_text("file-secret-1234\n")
    (tmp_path / "secrets" / "short").write_text("ab")  # too short to mask safely: ignored
    mf = tmp_path / "m.jsonl"
    mf.write_text(json.dumps("kernel-secret-5678") + "\n")
    monkeypatch.setenv("REGISTRY_PASSWORD", "env-secret-9012")
    vals = engine.known_secrets(str(tmp_path), str(mf))
    assert {"file-secret-1234", "kernel-secret-5678", "env-secret-9012"} <= set(vals)
    assert "ab" not in vals
    assert vals == sorted(vals, key=len, reverse=True)


def test_mask_session_fresh_file_0600(tmp_path, monkeypatch):
    monkeypatch.delenv(engine.MASK_ENV, raising=False)
    with engine.mask_session(str(tmp_path)) as path:
        assert os.environ[engine.MASK_ENV] == path
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert pathlib.Path(path).parent == tmp_path
        with open(path, "a") as f:
            f.write(json.dumps("learned-in-kernel-42") + "\n")
        with engine.mask_session(str(tmp_path)) as inner:  # nested: shared
            assert inner == path
    assert engine.MASK_ENV not in os.environ and not os.path.exists(path)
    assert "learned-in-kernel-42" in masking.secrets()  # the parent process learned it


def test_parameter_named_like_a_secret_is_scrubbed(tmp_path, env):
    """-p registry_password X: refused by validation in a section, and never saved in clear."""
    out = tmp_path / "out.ipynb"
    r = papermill(DATA / "echo.ipynb", out, "-p", "registry_password", "passed-as-param-31337", env=env)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "passed-as-param-31337" not in text and '"registry_password": "****"' in text


def test_scrub_keeps_traceback_items_and_catches_straddling_secrets():
    s = "straddle-secret-777"
    assert engine._scrub(["Traceback", f"ValueError: {s}"], [s]) == ["Traceback", "ValueError: ****"]
    assert engine._scrub(["x = 'straddle-", "secret-777'\n"], [s]) == ["x = '****'\n"]


def test_interrupted_run_keeps_records_up_to_the_running_cell(tmp_path, env):
    """SIGTERM to `runbook run` while a cell runs (a CI timeout, a kill): the kernel is interrupted,
    and the saved notebook, its HTML and run.json are complete up to that cell: every earlier
    output, the running cell's output and its KeyboardInterrupt, nothing after it, no secret."""
    import signal
    e = dict(os.environ, **env, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "runbook_lib.cli", "run", str(DATA / "interrupt.ipynb"),
                          "-p", "password", SECRET], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=e)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if "sleeping" in line:  # the third cell is running (its output reached the CLI)
            p.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + p.communicate(timeout=60)[0]
    assert p.returncode == 1, out[-3000:]
    run = only_run(env)
    nb = nbformat.read(str(run / "interrupt.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]
    printed, sleeping, after = code[1], code[2], code[3]
    assert "the password is ****" in "".join(o.get("text", "") for o in printed.outputs)
    assert "sleeping" in "".join(o.get("text", "") for o in sleeping.outputs)
    assert [o.ename for o in sleeping.outputs if o.output_type == "error"] == ["KeyboardInterrupt"]
    assert sleeping.metadata.papermill.status == "failed" and sleeping.metadata.papermill.exception
    assert after.outputs == [] and after.metadata.papermill.status == "pending"
    html = (run / "interrupt.html").read_text()
    assert "sleeping" in html and "KeyboardInterrupt" in html
    data = json.loads((run / "run.json").read_text())
    assert data["outcome"] == "FAIL" and "KeyboardInterrupt" in data["error"] and data["ended"]
    assert not leaks(all_files_text(run), SECRET) and not leaks(out, SECRET)
