"""The kernels a run executes in (runbook_lib/kernels.py) and what the CLI reads before it starts
them: -p values typed as papermill types them, a notebook's parameter defaults without papermill."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from runbook_lib import cli, kernels, params as P

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


@pytest.mark.parametrize("text", ["True", "False", "None", "7480", "-3", "0x10", "1.5", "1e3", "nan", "inf",
                                  "198.18.0.2", "registry:2", "", " 12 ", "1_000", "true", "k8s"])
def test_p_values_are_typed_as_papermills_cli_types_them(text):
    from papermill.cli import _resolve_type
    assert cli._value(text) == _resolve_type(text) or (text == "nan" and cli._value(text) != cli._value(text))
    assert type(cli._value(text)) is type(_resolve_type(text))


@pytest.mark.parametrize("notebook", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_defaults_are_the_parameters_cells_defaults(notebook):
    """What the CLI prewarms the section kernel with (no kernel, no papermill yet) is what the
    notebook's kernel would have: papermill's own reading of the parameters cell."""
    import ast

    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node
    nb = load_notebook_node(str(NOTEBOOKS / notebook))
    if not any("parameters" in c.metadata.get("tags", []) for c in nb.cells):
        assert P.notebook_defaults(NOTEBOOKS / notebook) == {}
        return
    want = {}
    for p in _infer_parameters(nb):
        try:
            want[p.name] = ast.literal_eval(p.default)
        except (ValueError, SyntaxError):
            continue
    got = P.notebook_defaults(NOTEBOOKS / notebook)
    assert {k: got[k] for k in want if k in got} == want
    assert set(want) <= set(got), set(want) - set(got)


def test_attached_refuses_what_does_not_run(tmp_path):
    cf = tmp_path / "kernel.json"
    cf.write_text("{}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for spec in ("", "nonsense", f"{os.getpid()}:{tmp_path / 'missing.json'}", f"{dead.pid}:{cf}"):
        assert kernels.attached(spec) is None, spec


def test_an_attached_kernel_runs_code_and_is_left_to_its_owner(tmp_path):
    """The deploy notebook's kernel attaches to the section kernel the CLI started: it runs code
    there and gets values back, interrupts it by signal, and never shuts it down."""
    owner = kernels.SectionKernel(tmp_path, tmp_path / "kernel.log")
    try:
        km = kernels.attached(f"{owner.pid}:{owner.km.connection_file}")
        assert km is not None and km.has_kernel
        guest = kernels.SectionKernel(tmp_path, km=km)
        assert not guest.owner
        assert guest.call("_runbook_out = {'pid': __import__('os').getpid()}") == {"pid": owner.pid}
        assert kernels.pids(km)[1] == owner.pid
        guest.stop(wait=True)
        assert owner.km.is_alive()  # a guest's stop leaves the kernel running
        assert owner.call("_runbook_out = 1 + 1") == 2
        awkward = {"registry_host": ["a", "b"], "q": "it's \"x\"\n\\", "n": 7, "b": False, "none": None}
        assert owner.call(f"_runbook_out = {kernels._literal(awkward)}") == awkward  # parameters reach it whole
    finally:
        owner.stop(wait=True)
    assert not owner.km.is_alive()


def test_check_hosts_in_the_kernel_raises_the_refusal_it_met(tmp_path):
    """A host the section kernel cannot log in to comes back as the same error type, message and hint."""
    from runbook_lib import errors
    k = kernels.SectionKernel(tmp_path, tmp_path / "kernel.log")
    try:
        with pytest.raises(errors.HostKeyError) as ei:
            k.check_hosts({"registry_host": "198.18.0.254", "ssh_user": "k8s", "become": True,
                           "known_hosts": str(tmp_path / "no-known-hosts")})
        assert ei.value.host == "198.18.0.254" and "known_hosts" in str(ei.value) and ei.value.hint
        assert k.check_hosts({"dry_run": False}) == {}
    finally:
        k.stop(wait=True)


def test_wait_ready_returns_once_shell_and_iopub_answer_and_fails_fast_on_a_dead_kernel(tmp_path):
    """The CLI hands papermill a client it made ready itself (no 0.2 s iopub flush): the kernel
    answers on shell and its iopub reaches the client; a kernel that died is reported at once."""
    import time

    from jupyter_client import BlockingKernelClient
    km = kernels.start("python3", tmp_path)
    kc = BlockingKernelClient()
    kc.load_connection_info(km.get_connection_info())
    kc.start_channels()
    try:
        kernels.wait_ready(kc, km, timeout=60)
        msg_id = kc.execute("print('out')")
        texts = []
        while True:  # iopub is subscribed: the cell's output arrives
            m = kc.get_iopub_msg(timeout=10)
            if m["parent_header"].get("msg_id") == msg_id:
                if m["msg_type"] == "stream":
                    texts.append(m["content"]["text"])
                if m["msg_type"] == "status" and m["content"]["execution_state"] == "idle":
                    break
        assert "".join(texts) == "out\n"
        kernels.kill(km)
        assert not km.is_alive()
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="died"):
            kernels.wait_ready(kc, km, timeout=30)
        assert time.monotonic() - t0 < 5
    finally:
        kc.stop_channels()
        if km.is_alive():
            kernels.kill(km)
