"""The start page (notebooks/00-start.ipynb), the topology picture, the offline HTML
record and the JupyterLab launcher.  Unit tests, plus the start page run on the lab."""
from __future__ import annotations

import json
import subprocess
import urllib.request
import xml.etree.ElementTree as ET

import nbformat
import pytest

from conftest import LAB_PARAMS, NOTEBOOKS, ROOT, outputs_text
from runbook_lib import diagram, htmlreport, ui

COMMON = {"rgw_host", "rgw_port", "registry_host", "registry_port", "registry_user", "uid", "ssh_user", "become", "ssh_port",
          "ssh_key", "known_hosts", "dry_run", "state_dir"}


# -- the picture ---------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["swift", "s3", "filesystem"])
def test_svg_is_well_formed_and_names_hosts_ports_and_protocols(storage):
    text = diagram.svg(**LAB_PARAMS, storage=storage)
    root = ET.fromstring(text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    words = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    for want in ("198.18.0.2", "198.18.0.3", "SSH :22", "HTTPS :8000", "radosgw  :7480", "control node",
                 "clients", "Ceph cluster", "mon (3300/6789) + OSDs"):
        assert want in words, want
    if storage == "filesystem":
        assert "not used by the registry" in words
    else:
        assert ("Swift auth v1" if storage == "swift" else "S3 API") in words


def test_svg_draws_every_registry_host_and_escapes_text():
    text = diagram.svg(registry_host="a.example,b.example", rgw_host="r.example", ssh_port=2222,
                       title="<b>&'x'</b>")
    root = ET.fromstring(text)  # would fail on unescaped < or &
    words = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "a.example" in words and "b.example" in words and "SSH :2222" in words
    assert "<b>&'x'</b>" in words


@pytest.mark.parametrize("runtime, client, runs, tools, ca", [
    ("docker", "docker", "registry:2", "docker / skopeo", "/etc/docker/"),
    ("podman", "podman", "registry:2 in podman", "podman / skopeo", "/etc/containers/"),
    ("systemd", "skopeo", "registry (systemd unit)", "skopeo", "/etc/containers/"),
])
def test_picture_names_the_runtime_and_the_clients_the_parameters_choose(runtime, client, runs, tools, ca):
    words = " ".join(t.text or "" for t in ET.fromstring(diagram.svg(**LAB_PARAMS, runtime=runtime, client=client))
                     .iter("{http://www.w3.org/2000/svg}text"))
    assert f"{runs}  :8000" in words and tools in words and f"trust the CA in {ca}" in words, words
    text = diagram.describe(**LAB_PARAMS, runtime=runtime, client=client)
    assert f"({tools}; CA in {ca}certs.d)" in text and f"({runs})" in text, text


def test_topology_object_shows_svg_in_jupyter_and_text_elsewhere():
    t = diagram.Topology(**LAB_PARAMS, storage="s3", dry_run=False, state_dir="")
    assert t._repr_svg_().startswith("<svg")
    assert "S3 over HTTP :7480" in repr(t) and "registry 198.18.0.3" in repr(t)


# -- the notebook ----------------------------------------------------------------------------------
def test_start_page_is_what_its_generator_writes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # tools/ is not installed
    from tools import make_start
    fresh = make_start.build(tmp_path / "00-start.ipynb")
    assert json.loads(fresh.read_text()) == json.loads((NOTEBOOKS / "00-start.ipynb").read_text()), \
        "notebooks/00-start.ipynb is stale: run `.venv/bin/python -m tools.make_start`"


def test_start_page_parameters_are_the_common_set_with_the_lab_defaults():
    import papermill as pm
    declared = pm.inspect_notebook(str(NOTEBOOKS / "00-start.ipynb"))
    assert COMMON <= set(declared)
    for k, v in LAB_PARAMS.items():
        assert declared[k]["default"].strip('"') == str(v), k
    for k in declared:  # papermill --help-notebook skips a line with a second '=' (e.g. in its comment)
        assert declared[k]["help"], f"{k} has no help comment"


def test_start_page_links_every_section_and_shows_its_picture_before_running():
    nb = nbformat.read(str(NOTEBOOKS / "00-start.ipynb"), as_version=4)
    md = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for name in ("01-rgw", "02-accounts", "03-certs", "04-registry", "05-push", "06-operations", "07-faq", "deploy"):
        assert f"]({name}.ipynb)" in md, name
    for word in ("params/lab.yaml", "params/example.yaml", "REGISTRY_PASSWORD", "dry_run"):
        assert word in md, word
    assert 'src="data:image/svg+xml;base64,' in md  # a markdown <img>: shown in JupyterLab without running
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")


# -- offline HTML ------------------------------------------------------------------------------------
def test_strip_remote_removes_what_a_browser_would_fetch():
    html = ('<head><script src="https://cdn.example/require.js"></script>'
            '<script type="text/javascript" src="//cdn.example/x.js"></script>'
            '<link rel="stylesheet" href="https://cdn.example/a.css"/>'
            '<script type="module">const m = await import("https://cdn.example/mermaid.mjs");</script>'
            '<script>var local = 1;</script></head><body><a href="https://example.org/doc">doc</a>'
            '<img src="data:image/png;base64,AAAA"></body>')
    assert len(htmlreport.remote_references(html)) == 4
    out = htmlreport.strip_remote(html)
    assert htmlreport.remote_references(out) == []
    assert "var local = 1" in out and 'href="https://example.org/doc"' in out


# -- the launcher ------------------------------------------------------------------------------------
def test_launcher_serves_the_settings_and_stops_cleanly(tmp_path):
    with ui.launch(timeout=60) as jl:
        for plugin, want in ui.SETTINGS.items():
            pkg, _, name = plugin.rpartition("/")
            url = f"{jl.base_url}lab/api/settings/{pkg}:{name}?token={jl.token}"
            with urllib.request.urlopen(url, timeout=10) as r:
                got = json.load(r)["settings"]
            for k, v in want.items():
                assert got[k] == v, (plugin, k)
        with urllib.request.urlopen(f"{jl.base_url}api/contents/00-start.ipynb?token={jl.token}&content=0",
                                    timeout=10) as r:
            assert json.load(r)["type"] == "notebook"  # rooted at notebooks/
        pid = jl.proc.pid
    assert jl.proc.returncode is not None
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
    assert not jl.workdir.exists()


def test_settings_dir_layout(tmp_path):
    d = ui.write_settings(tmp_path)
    f = d / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    assert json.loads(f.read_text())["fetchNews"] == "false"
    assert json.loads((d / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings").read_text()) == \
        {"autosave": False}


# -- on the lab ---------------------------------------------------------------------------------------
@pytest.mark.lab
def test_start_page_passes_on_the_lab(lab, run_notebook):
    nb, _, _ = run_notebook("00-start")
    text = outputs_text(nb)
    assert "VERDICT 00-start: PASS" in text
    assert "ceph1 (rgw_host)" in text and "registry1 (registry_host)" in text
    svgs = [o["data"]["image/svg+xml"] for c in nb["cells"] for o in c.get("outputs", [])
            if "image/svg+xml" in o.get("data", {})]
    assert len(svgs) == 1 and "198.18.0.3" in "".join(svgs[0])


@pytest.mark.lab
def test_start_page_says_what_to_do_when_a_host_does_not_answer(run_notebook):
    # loopback, a port where nothing listens: refused at once
    nb, _, err = run_notebook("00-start", expect_error=True, rgw_host="127.0.0.1", registry_host="127.0.0.1",
                              ssh_port=9)
    text = outputs_text(nb)
    assert "VERDICT 00-start: FAIL" in text
    assert "rgw_host 127.0.0.1: TCP port 9 does not answer" in text
    assert "CheckFailed" in text and "sshd listens on ssh_port" in text


@pytest.mark.lab
def test_start_page_names_a_bad_parameter_before_anything_runs(run_notebook):
    nb, _, err = run_notebook("00-start", expect_error=True, rgw_port=70000, storage="nfs")
    text = outputs_text(nb)
    assert "rgw_port: 70000 is out of range" in text and "storage: 'nfs' is not one of" in text
    assert "VERDICT" not in text
