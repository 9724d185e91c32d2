"""deploy.ipynb: typed parameters, validation through papermill, and (with the lab)
sections 1-5 end to end, a clean re-run, and a dry run that changes nothing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import threading

import nbformat
import pytest
import yaml

from runbook_lib import deploy
from runbook_lib.host import connect

from conftest import TEST_REGISTRY, outputs_text

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
DEPLOY = NOTEBOOKS / "deploy.ipynb"
LAB = ROOT / "params" / "lab.yaml"
SECTIONS = [p.stem for p in deploy.sections()]


def papermill(*args, env=None, timeout=900):
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "papermill", "--no-progress-bar", *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=timeout)


def test_help_notebook_lists_typed_parameters():
    r = papermill("--help-notebook", DEPLOY)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name, typ in [("rgw_host", "str"), ("rgw_port", "int"), ("registry_host", "str"), ("registry_port", "int"),
                      ("registry_user", "str"), ("uid", "str"), ("ssh_user", "str"), ("become", "bool"), ("ssh_port", "int"),
                      ("ssh_key", "str"), ("known_hosts", "str"), ("dry_run", "bool"), ("state_dir", "str"),
                      ("storage", "str"), ("runtime", "str"), ("client", "str"), ("image_name", "str")]:
        assert re.search(rf"^\s+{name}: {typ} \(default ", out, re.M), (name, out)
    assert "Unknown type" not in out and "Unable to parse" not in r.stderr
    assert "RGW's HTTP port" in out and "comma separated" in out  # help texts


def test_defaults_are_the_lab():
    import papermill as pm
    declared = pm.inspect_notebook(str(DEPLOY))
    lab = yaml.safe_load(LAB.read_text())
    for k, v in lab.items():
        assert declared[k]["default"].strip('"') == str(v), k
    assert declared["image_name"]["default"] == '"prom/node-exporter:v0.16.0"'
    assert declared["storage"]["default"] == '"swift"' and declared["rgw_port"]["default"] == "7480"


@pytest.mark.parametrize("notebook", ["deploy"] + SECTIONS[:1])
@pytest.mark.parametrize("args, named", [
    (["-p", "bogus", "1"], "unknown parameter 'bogus'"),
    (["-p", "rgw_port", "abc"], "rgw_port: expected int"),
    (["-p", "registry_port", "70000"], "registry_port: 70000 is out of range"),
])
def test_bad_parameter_stops_at_validation(tmp_path, notebook, args, named):
    out = tmp_path / "out.ipynb"
    runs = tmp_path / "runs"
    r = papermill("--engine", "runbook", NOTEBOOKS / f"{notebook}.ipynb", out, "-f", LAB, *args,
                  env={"RUNBOOK_RUNS_DIR": str(runs)})
    assert r.returncode != 0
    assert "ParameterError" in r.stderr and named in r.stderr, r.stderr[-2000:]
    nb = nbformat.read(str(out), as_version=4)
    failed = [c for c in nb.cells if c.get("metadata", {}).get("papermill", {}).get("exception")]
    assert len(failed) == 1 and "rb.begin(" in failed[0].source  # the validation cell, nothing after it
    run = (runs / "latest").resolve()
    # nothing ran: no section notebook, no command on any host
    assert not [p for p in run.glob("0*.ipynb") if p.stem != notebook]
    assert json.loads((run / "run.json").read_text())["outcome"] == "FAIL"
    assert not [c for c in json.loads((run / "run.json").read_text())["commands"]
                if c["host"] != "local" and not c["read"]]


def test_section_params_only_declared():
    params = yaml.safe_load(LAB.read_text()) | {"dry_run": True, "state_dir": "", "storage": "swift",
                                                 "runtime": "docker", "client": "docker",
                                                 "image_name": "prom/node-exporter:v0.16.0",
                                                 "registry_host": ["198.18.0.3", "198.18.0.4"]}
    for nb in deploy.sections():
        declared = deploy.declared_params(nb)
        got = deploy.section_params(nb, params)
        assert set(got) <= set(declared), nb
        assert got["dry_run"] is True and got["registry_host"] == "198.18.0.3,198.18.0.4"
        for common in ("rgw_host", "ssh_key", "known_hosts", "state_dir"):
            assert common in got, (nb.name, common)  # every section declares the common set


def _kernels_in(cwd: pathlib.Path) -> list[int]:
    """Live ipykernel processes started in cwd."""
    out = []
    for p in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            if b"ipykernel" in (p / "cmdline").read_bytes() and pathlib.Path(os.readlink(p / "cwd")) == cwd:
                out.append(int(p.name))
        except OSError:
            continue
    return out


def test_a_failing_section_stops_the_deploy_and_leaves_no_kernel(tmp_path):
    """Sections run in kernels started ahead of their turn: when one fails, the next (already booted)
    must not run, and no kernel may be left behind."""
    import runbook_lib as rb
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for name, src in (("01-bad", "raise RuntimeError('boom in 01')"), ("02-next", "open('ran', 'w').write('x')")):
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
        nb.cells = [nbformat.v4.new_code_cell(src)]
        nbformat.write(nb, str(nbs / f"{name}.ipynb"))
    ns = {"dry_run": False, "__annotations__": {"dry_run": "bool"}}
    ctx = rb.begin("deploy", ns, reach=False)
    saved = dict(os.environ)  # deploy.run points the environment at its run folder (as in a kernel)
    try:
        with pytest.raises(deploy.SectionFailed) as e:
            deploy.run(ctx, notebooks_dir=nbs)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert e.value.section == "01-bad" and "boom in 01" in str(e.value)
    assert not (nbs / "ran").exists()
    assert _kernels_in(nbs) == []


# -- with the lab ------------------------------------------------------------------------------------
def _lab_params() -> dict:
    """params/lab.yaml with the registry host under test (RUNBOOK_TEST_REGISTRY_HOST, default registry1)."""
    return yaml.safe_load(LAB.read_text()) | {"registry_host": TEST_REGISTRY}


def _deploy(tmp_path, *args, name="out"):
    out = tmp_path / f"{name}.ipynb"
    r = papermill("--engine", "runbook", DEPLOY, out, "-f", LAB, "-p", "registry_host", TEST_REGISTRY, *args,
                  timeout=1800)
    runs = pathlib.Path(os.environ["RUNBOOK_RUNS_DIR"])
    m = re.search(r"run folder: (\S+)", outputs_text(json.loads(out.read_text()))) if out.exists() else None
    run = pathlib.Path(m.group(1)) if m else None
    return r, out, run, runs


@pytest.mark.lab
def test_deploy_end_to_end_then_no_change(lab, state_dir, tmp_path):
    ps_log = tmp_path / "ps.log"
    with _ps_sampler(ps_log):  # the process list, as anyone on the machine could see it during the run
        r, out, run, runs = _deploy(tmp_path, name="first")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ps_log.stat().st_size > 0
    assert run and run.is_dir()
    data = json.loads((run / "run.json").read_text())
    assert data["outcome"] == "PASS", data.get("error")
    for s in SECTIONS:
        assert (run / f"{s}.ipynb").exists() and (run / f"{s}.html").exists(), s
        assert f"VERDICT {s}: PASS" in (run / f"{s}.html").read_text()
    assert [v["section"] for v in data["sections"] if v["section"] != "deploy"] == SECTIONS
    assert data["tool_versions"]["ceph"].startswith("ceph version")
    # logged in as k8s (root logins are refused on the lab), privileged through become
    assert yaml.safe_load(LAB.read_text())["ssh_user"] == "k8s"
    remote = [c for c in data["commands"] if c["host"] != "local" and c["kind"] in ("cmd", "file")
              and not c["skipped"] and not c["command"].startswith("become check as k8s")]
    assert remote and all(c["become"] for c in remote), [c for c in remote if not c["become"]][:3]
    text = out.read_text()
    assert "VERDICT deploy: PASS" in text and str(run) in text
    rgw_keys = _rgw_secrets(yaml.safe_load(LAB.read_text()))
    assert rgw_keys  # 02-accounts made the Swift and S3 keys
    _assert_no_secrets([run, out, ps_log], rgw_keys)

    # a second run, through `runbook deploy` (its kernels started before papermill, the deploy
    # notebook's attached to the section kernel): every section reports no change
    r2, text2, run2 = _cli_deploy()
    assert r2.returncode == 0, text2[-3000:]
    d2 = json.loads((run2 / "run.json").read_text())
    assert d2["outcome"] == "PASS"
    changed = {s["section"]: s["counts"] for s in d2["sections"] if s["changed"]}
    assert not changed, changed
    assert d2["changed"] is False, [c for c in d2["commands"] if c["changed"] and not c["read"]]
    assert "no change" in (run2 / "deploy.html").read_text()
    assert data["tool_versions"]["ceph"] == d2["tool_versions"]["ceph"]  # from the section kernel
    # one login and one become check per host for the whole run: the hosts are checked in the
    # section kernel, whose logins the five sections and the tool versions reuse
    checks = [c["host"] for c in d2["commands"] if c["command"].startswith("become check as k8s")]
    assert sorted(checks) == sorted({c["host"] for c in d2["commands"] if c["host"] != "local"}), checks
    assert not _kernels_of(run2), "a kernel outlived `runbook deploy`"
    _assert_no_secrets([run2], rgw_keys)


def _cli_deploy(*args):
    """`runbook deploy` as a user runs it: (process, its output, the run folder)."""
    r = subprocess.run([sys.executable, "-m", "runbook_lib.cli", "deploy", "-f", str(LAB), "-p", "registry_host",
                        TEST_REGISTRY, *map(str, args)], capture_output=True, text=True, timeout=1800)
    text = r.stdout + r.stderr
    m = re.search(r"run folder: (\S+)", text)
    return r, text, pathlib.Path(m.group(1)) if m else None


def _kernels_of(run) -> list[str]:
    """Kernel processes still running with this run folder in their environment."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            env = pathlib.Path(f"/proc/{d}/environ").read_bytes()
            cmdline = pathlib.Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ipykernel" in cmdline and f"RUNBOOK_RUN_DIR={run}".encode() in env:
            out.append(d)
    return out


@contextlib.contextmanager
def _ps_sampler(path, interval=0.1):
    """Every process's command line, sampled until the block ends (what `ps` shows)."""
    stop = threading.Event()

    def sample():
        with open(path, "w") as f:
            while not stop.is_set():
                for d in os.listdir("/proc"):
                    if d.isdigit():
                        try:
                            with open(f"/proc/{d}/cmdline", "rb") as c:
                                f.write(c.read().replace(b"\0", b" ").decode(errors="replace") + "\n")
                        except OSError:
                            pass
                stop.wait(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        t.join(10)


# The host's own long-running processes: the lab shares one PID namespace, so select those
# in this host's network namespace, without the probe's own shell.
PROCS = ("me=$(readlink /proc/self/ns/net); for p in /proc/[0-9]*; do "
         "[ \"$(readlink $p/ns/net 2>/dev/null)\" = \"$me\" ] && echo \"${p#/proc/} $(cat $p/comm 2>/dev/null)\"; "
         "done | grep -vwE 'sshd|sudo|bash|sh|readlink|cat|grep|sort' | sort -n")


BCRYPT = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:\\n|\s)+[A-Za-z0-9+/]{40}")


def _rgw_secrets(lab_params, uid="demo") -> set:
    """The user's Swift and S3 secret keys, read from RGW (they are not kept on the control node)."""
    from runbook_lib.host import cmd
    h = connect(lab_params["rgw_host"], lab_params)
    try:
        r = h.run(cmd("radosgw-admin user info --uid={u}", u=uid), read=True, check=False, no_log=True)
    finally:
        h.close()
    if r.exit_code != 0:
        return set()
    info = json.loads(r.stdout)
    return {k["secret_key"] for k in info.get("keys", []) + info.get("swift_keys", []) if k.get("secret_key")}


def _assert_no_secrets(paths, extra=()):
    """No secret the run knows (state dir's secrets, $REGISTRY_PASSWORD, RGW keys), no bcrypt hash
    and no private key anywhere in the records."""
    sd = pathlib.Path(os.environ["RUNBOOK_STATE_DIR"])
    secrets = {p.read_text().strip() for p in (sd / "secrets").rglob("*") if p.is_file()} \
        if (sd / "secrets").is_dir() else set()
    if os.environ.get("REGISTRY_PASSWORD"):
        secrets.add(os.environ["REGISTRY_PASSWORD"])
    secrets = {s for s in secrets | set(extra) if len(s) >= 4}
    files = [f for p in paths for f in (pathlib.Path(p).rglob("*") if pathlib.Path(p).is_dir() else [pathlib.Path(p)])
             if f.is_file()]
    for f in files:
        text = f.read_text(errors="replace")
        found = [s[:4] + "..." for s in secrets if s in text or json.dumps(s)[1:-1] in text]
        assert not found, (str(f), found)
        assert not BCRYPT.search(text), str(f)
        assert not PEM_KEY.search(text), str(f)


def _host_state(lab_params) -> dict:
    """What a dry run must leave as it is, on every host."""
    from runbook_lib.host import Command
    state = {}
    ceph = connect(lab_params["rgw_host"], lab_params)
    reg = connect(lab_params["registry_host"], lab_params)
    try:
        for label, h, c in [
            ("ceph auth ls", ceph, "ceph auth ls 2>/dev/null | sha256sum"),
            ("rgw users", ceph, "radosgw-admin user list 2>/dev/null"),
            ("rgw user demo", ceph, "radosgw-admin user info --uid=demo 2>/dev/null | sha256sum"),
            ("ceph.conf", ceph, "sha256sum /etc/ceph/ceph.conf"),
            ("ceph processes", ceph, PROCS),
            ("registry containers", reg, "docker ps -a --no-trunc --format '{{.ID}} {{.Names}} {{.State}} {{.Image}}'"),
            ("registry files", reg,
             "find /opt/k8s/registry /etc/docker -type f -exec sha256sum {} + 2>/dev/null | sort; true"),
            ("registry processes", reg, PROCS),
        ]:
            state[label] = h.run(Command(c), read=True, check=False).stdout
    finally:
        ceph.close()
        reg.close()
    sd = pathlib.Path(os.environ["RUNBOOK_STATE_DIR"])
    state["control state dir"] = sorted(
        (str(p.relative_to(sd)), hashlib.sha256(p.read_bytes()).hexdigest(), oct(p.stat().st_mode))
        for p in sd.rglob("*") if p.is_file() and not p.name.startswith(".mask-"))
    certs_d = pathlib.Path("/etc/docker/certs.d")
    state["control certs.d"] = sorted(str(p) for p in certs_d.rglob("*")) if certs_d.exists() else []
    return state


@pytest.mark.lab
def test_deploy_dry_run_changes_nothing(lab, state_dir, tmp_path):
    """Dry run with the lab's parameters: every section runs, reports DRY-RUN, changes nothing."""
    params = _lab_params()
    before = _host_state(params)
    r, out, run, runs = _deploy(tmp_path, "-p", "dry_run", "True", name="dry")
    after = _host_state(params)
    diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not diff, diff
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((run / "run.json").read_text())
    assert data["outcome"] == "DRY-RUN" and data["changed"] is False
    assert [v["status"] for v in data["sections"] if v["section"] != "deploy"] == ["DRY-RUN"] * len(SECTIONS)
    for s in SECTIONS:
        nb = json.loads((run / f"{s}.ipynb").read_text())
        assert nb["metadata"]["papermill"]["parameters"]["dry_run"] is True


@pytest.mark.lab
def test_deploy_dry_run_shows_what_a_real_run_would_do(lab, state_dir, tmp_path):
    """Dry run for a uid that does not exist: the commands a real run would execute are shown
    (and skipped), and no host changes."""
    params = _lab_params()
    before = _host_state(params)
    r, out, run, runs = _deploy(tmp_path, "-p", "dry_run", "True", "-p", "uid", "dryrunprobe", name="dry2")
    after = _host_state(params)
    diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not diff, diff
    text = outputs_text(json.loads((run / "02-accounts.ipynb").read_text()))
    assert "would run" in text and "radosgw-admin user create" in text
    data = json.loads((run / "run.json").read_text())
    assert data["changed"] is False
    skipped = [c["command"] for c in data["commands"] if c["skipped"]]
    assert any("radosgw-admin user create" in c and "dryrunprobe" in c for c in skipped), skipped
    # every section previews its part, even when an earlier one only said what it would do
    assert r.returncode == 0, data.get("error")
    assert data["outcome"] == "DRY-RUN"


@pytest.mark.lab
def test_deploy_stops_before_any_change_when_a_hosts_sudo_wants_a_password(lab, state_dir, tmp_path):
    """The registry host's sudo wants a password: the deploy names the host and the fix, and no
    section runs (RGW's host, checked first in the plan, is left as it was)."""
    name, addr = "labtest-deploypw", "198.18.0.43"
    params = _lab_params()
    lab.add_host(name, addr, docker=True, sudo="password")
    try:
        before = _host_state(params)
        r, out, run, runs = _deploy(tmp_path, "-p", "registry_host", addr, name="sudopw")
        assert r.returncode != 0
        text = outputs_text(json.loads(out.read_text()))
        assert f"{addr}: become: sudo wants a password for k8s" in text, text[-2000:]
        assert "NOPASSWD" in text and "▶ 01-rgw" not in text  # no section started
        assert _host_state(params) == before
        data = json.loads((run / "run.json").read_text())
        assert "become: sudo wants a password" in data["error"]
        assert [v["section"] for v in data["sections"]] in ([], ["deploy"])  # no section ran
        assert not [c for c in data["commands"] if c["changed"]]
    finally:
        lab.remove_host(name)


@pytest.mark.lab
def test_deploy_killed_mid_section_leaves_complete_records(lab, state_dir, tmp_path):
    """SIGTERM to `runbook deploy` while 04-registry runs (a CI timeout, a kill): the deploy stops
    there, and the run folder is complete up to the interrupted cell: the earlier sections'
    notebooks, HTML and verdicts; 04-registry's notebook with every output before that cell and the
    KeyboardInterrupt in it, and its HTML; deploy.ipynb/.html and a finished run.json.  No kernel is
    left, no secret is written, nothing after that cell ran, and a re-run passes."""
    import signal
    import time
    params = _lab_params()
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "runbook_lib.cli", "deploy", "-f", str(LAB), "-p", "registry_host",
                          TEST_REGISTRY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=e)
    seen, run, killed = [], None, False
    try:
        for line in p.stdout:
            seen.append(line)
            m = re.search(r"run folder: (\S+)", line)
            run = run or (pathlib.Path(m.group(1)) if m else None)
            if "▶ 04-registry" in line:
                # kill once 04-registry has run a command of its own: inside one of its cells
                n = _lines(run / "journal.jsonl")
                deadline = time.monotonic() + 60
                while _lines(run / "journal.jsonl") <= n and time.monotonic() < deadline:
                    time.sleep(0.01)
                p.send_signal(signal.SIGTERM)
                killed = True
                break
        out = "".join(seen) + p.communicate(timeout=120)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert killed and p.returncode == 1, out[-3000:]
    data = json.loads((run / "run.json").read_text())
    assert data["outcome"] == "FAIL" and "interrupted" in data["error"] and data["ended"], data.get("error")
    assert data["tool_versions"]["ceph"].startswith("ceph version")
    done = SECTIONS[:SECTIONS.index("04-registry")]
    for s in done:
        assert f"VERDICT {s}: PASS" in (run / f"{s}.html").read_text(), s
        assert f"VERDICT {s}: PASS" in outputs_text(json.loads((run / f"{s}.ipynb").read_text())), s
    entries = {n["name"]: n for n in data["notebooks"]}
    assert [entries[s]["status"] for s in done] == ["completed"] * len(done)
    assert entries["04-registry"]["status"] == "failed" and "interrupted" in entries["04-registry"]["error"]
    assert not [p for p in run.glob("0*.ipynb") if p.stem > "04-registry"]  # no section after it started

    nb = json.loads((run / "04-registry.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    failed = [i for i, c in enumerate(code) if c["metadata"]["papermill"].get("exception")]
    assert len(failed) == 1, [c["metadata"]["papermill"] for c in code]
    i = failed[0]
    assert [o["ename"] for o in code[i]["outputs"] if o["output_type"] == "error"] == ["KeyboardInterrupt"]
    assert all(c["metadata"]["papermill"]["status"] == "completed" for c in code[:i])
    assert any("rb.begin(" in "".join(c["source"]) for c in code[:i])  # interrupted after validation
    assert all(c["metadata"]["papermill"]["status"] == "pending" and not c["outputs"] for c in code[i + 1:])
    assert "KeyboardInterrupt" in (run / "04-registry.html").read_text()
    assert (run / "deploy.html").exists() and "interrupted" in outputs_text(json.loads((run / "deploy.ipynb").read_text()))
    deadline = time.monotonic() + 15
    while _kernels_in(NOTEBOOKS) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _kernels_in(NOTEBOOKS) == []
    _assert_no_secrets([run], _rgw_secrets(params))

    # the deploy resumes: what 04-registry had not done yet is done now
    r, _, run2, _ = _deploy(tmp_path, name="after-kill")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run2 / "run.json").read_text())["outcome"] == "PASS"


def _lines(path) -> int:
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0
