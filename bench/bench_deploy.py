"""Deploy, side by side on the bench's own registry host and a fresh RGW user:
`runbook deploy` (deploy.ipynb: one papermill run per section, in one kernel) vs bench/plain_deploy.sh
(the same commands in bash over OpenSSH ControlMaster) vs bench/ansible/deploy.yml (the same deploy as
an Ansible playbook: community.crypto, community.general.htpasswd, community.docker; ansible-core 2.19,
pipelining, ControlPersist, host keys checked).

    .venv/bin/python bench/bench_deploy.py [--rounds N] [--keep-host] [--no-ansible]

Fresh before each timed fresh run: the registry container and /opt/k8s on the bench host, the RGW user
(`radosgw-admin user rm --purge-data`), the control node's image/CA/login and each tool's state dir.
Then, on each tool's own deployment: a no-change re-run, and `runbook deploy --dry-run` against
`ansible-playbook --check`.  Ansible lives in bench/.ansible-venv (made here with pip, gitignored);
what its modules need on the registry host (python3-docker, python3-passlib, python3-bcrypt) is
installed by the playbook's first play, in an untimed warm-up run."""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import tempfile

import _common as C

TARGET_RATIO, TARGET_RERUN = 2.0, 8.0
ANSIBLE_VENV = C.BENCH / ".ansible-venv"
ANSIBLE_REQ = "ansible>=12,<13"  # ansible-core 2.19, the peer the issue measured
PLAYBOOK = C.BENCH / "ansible" / "deploy.yml"


# -- the runbook ------------------------------------------------------------------------------------
def run_runbook(state: str, runs: str, *extra) -> dict:
    cmd = (f"{C.ROOT}/.venv/bin/runbook deploy -f {C.ROOT}/params/lab.yaml -p registry_host {C.ADDR} "
           f"-p uid {C.UID} -p state_dir {state} -p image_name {C.IMAGE} -p container {C.CONTAINER} "
           + " ".join(extra))
    t, r = C.timed(C.sh, cmd, check=False, timeout=900, env={"RUNBOOK_RUNS_DIR": runs, "RUNBOOK_STATE_DIR": state})
    if r.returncode != 0:
        raise RuntimeError(f"runbook deploy failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    run = (pathlib.Path(runs) / "latest").resolve()
    data = json.loads((run / "run.json").read_text())
    sections = {}
    for p in sorted(run.glob("0*.ipynb")):
        md = json.loads(p.read_text())["metadata"].get("papermill", {})
        sections[p.stem] = md.get("duration")
    ops = [c for c in data.get("commands", [])]
    return {"wall": t, "sections": sections, "changed": data.get("changed"), "would_change": data.get("would_change"),
            "run": str(run), "ops": len(ops), "work": sum(c.get("duration") or 0 for c in ops)}


# -- bash -------------------------------------------------------------------------------------------
def run_plain(work: str) -> float:
    t, r = C.timed(C.sh, f"bash {C.BENCH}/plain_deploy.sh", check=False, timeout=600,
                   env={"WORK": work, "REG_HOST": C.ADDR, "RGW_UID": C.UID, "CONTAINER": C.CONTAINER,
                        "IMAGE": C.IMAGE})
    if r.returncode != 0 or "plain deploy: OK" not in r.stdout:
        raise RuntimeError(f"plain_deploy.sh failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return t


# -- Ansible ----------------------------------------------------------------------------------------
def ensure_ansible() -> pathlib.Path:
    """bench/.ansible-venv with ansible (not a dependency of the package)."""
    ap = ANSIBLE_VENV / "bin" / "ansible-playbook"
    if not ap.exists():
        subprocess.run([C.PY, "-m", "venv", str(ANSIBLE_VENV)], check=True)
        # cryptography: community.crypto; docker: community.docker on the control node
        subprocess.run([str(ANSIBLE_VENV / "bin" / "pip"), "install", "-q", ANSIBLE_REQ, "cryptography", "docker",
                        "requests"], check=True)
    return ap


def ansible_setup(work: pathlib.Path, state: str) -> dict:
    """ansible.cfg (pipelining, ControlPersist, host keys checked against the lab's known_hosts),
    inventory and extra vars in work/; returns the environment for ansible-playbook."""
    from runbook_lib import lab
    work.mkdir(parents=True, exist_ok=True)
    ssh = (f"-F /dev/null -o ControlMaster=auto -o ControlPersist=120s -o IdentitiesOnly=yes "
           f"-o UserKnownHostsFile={lab.KNOWN_HOSTS} -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes")
    (work / "ansible.cfg").write_text(
        "[defaults]\n"
        f"inventory = {work}/inventory.ini\n"
        "host_key_checking = True\ninterpreter_python = /usr/bin/python3\n"
        "gathering = explicit\n"  # the playbook needs no facts (favours Ansible: fact gathering is ~1 s a host)
        "retry_files_enabled = False\nforks = 5\n"
        "[ssh_connection]\npipelining = True\n"
        f"ssh_args = {ssh}\ncontrol_path_dir = {work}/cp\n")
    login = f"ansible_user={lab.SSH_USER} ansible_ssh_private_key_file={lab.SSH_KEY}"
    (work / "inventory.ini").write_text(
        f"[rgw]\nceph1 ansible_host={C.LAB['rgw_host']} {login}\n"
        f"[registry]\nreg ansible_host={C.ADDR} {login}\n"
        f"[local]\nlocalhost ansible_connection=local ansible_python_interpreter={ANSIBLE_VENV}/bin/python\n")
    (work / "vars.json").write_text(json.dumps({
        "rgw_host": C.LAB["rgw_host"], "rgw_port": C.LAB["rgw_port"], "reg_host": C.ADDR, "reg_port": C.PORT,
        "reg_user": "foo", "uid": C.UID, "container": C.CONTAINER, "image": C.IMAGE, "state": state}))
    return {"ANSIBLE_CONFIG": str(work / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}


def run_ansible(work: pathlib.Path, env: dict, *extra) -> dict:
    cmd = f"{ANSIBLE_VENV}/bin/ansible-playbook {PLAYBOOK} -e @{work}/vars.json " + " ".join(extra)
    t, r = C.timed(C.sh, cmd, check=False, timeout=900, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"ansible-playbook failed (exit {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}")
    changed = sum(int(n) for n in re.findall(r"changed=(\d+)", r.stdout))
    tasks = len(re.findall(r"^TASK \[", r.stdout, re.M)) + len(re.findall(r"^RUNNING HANDLER \[", r.stdout, re.M))
    return {"wall": t, "changed": changed, "tasks": tasks}


# -- the benchmark ---------------------------------------------------------------------------------
def runs_of(xs) -> str:
    return ", ".join(f"{x:.1f}" for x in xs)


def main(rounds: int = 3, keep_host: bool = False, ansible: bool = True) -> dict:
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    state, runs, plain = str(work / "state"), str(work / "runs"), str(work / "plain")
    a_state, a_work = str(work / "ansible-state"), work / "ansible"
    C.ensure_rgw()
    C.ensure_host()
    tools = ["runbook", "plain"] + (["ansible"] if ansible else [])
    slate = [state, plain, a_state]
    times: dict[str, list] = {k: [] for k in tools}
    rb_runs, out = [], {}
    try:
        if ansible:
            ensure_ansible()
            a_env = ansible_setup(a_work, a_state)
            C.fresh(slate)
            run_ansible(a_work, a_env)  # warm-up, untimed: the registry host's apt packages for the modules
        for i in range(rounds):
            order = tools[i % len(tools):] + tools[:i % len(tools)]  # each tool first once
            for which in order:
                C.fresh(slate)
                if which == "runbook":
                    r = run_runbook(state, runs)
                    rb_runs.append(r)
                    times["runbook"].append(r["wall"])
                    print(f"round {i + 1}: runbook deploy {r['wall']:.2f} s "
                          f"(sections {', '.join(f'{k} {v:.1f}' for k, v in r['sections'].items())})", flush=True)
                elif which == "plain":
                    times["plain"].append(run_plain(plain))
                    print(f"round {i + 1}: plain_deploy.sh {times['plain'][-1]:.2f} s", flush=True)
                else:
                    a = run_ansible(a_work, a_env)
                    times["ansible"].append(a["wall"])
                    print(f"round {i + 1}: ansible-playbook {a['wall']:.2f} s ({a['tasks']} tasks, "
                          f"{a['changed']} changed)", flush=True)
        # no-change re-runs and dry runs, each tool on its own deployment
        C.fresh(slate)
        run_runbook(state, runs)
        again = [run_runbook(state, runs) for _ in range(rounds)]
        dry = [run_runbook(state, runs, "--dry-run") for _ in range(rounds)]
        print(f"runbook re-run: {runs_of([r['wall'] for r in again])} s, changed={[r['changed'] for r in again]}; "
              f"dry run: {runs_of([r['wall'] for r in dry])} s", flush=True)
        if ansible:
            C.fresh(slate)
            run_ansible(a_work, a_env)
            a_again = [run_ansible(a_work, a_env) for _ in range(rounds)]
            a_check = [run_ansible(a_work, a_env, "--check") for _ in range(rounds)]
            print(f"ansible re-run: {runs_of([r['wall'] for r in a_again])} s, changed="
                  f"{[r['changed'] for r in a_again]}; --check: {runs_of([r['wall'] for r in a_check])} s", flush=True)
    finally:
        C.fresh(slate)
        if not keep_host:
            C.remove_host()
    m = {k: C.med(v) for k, v in times.items()}
    rr, dr = C.med([r["wall"] for r in again]), C.med([r["wall"] for r in dry])
    sect = {k: C.med([r["sections"].get(k) or 0 for r in rb_runs]) for k in rb_runs[-1]["sections"]}
    work_s = C.med([r["work"] for r in again])

    def verdict(ok):
        return "met" if ok else "missed"
    body = [f"Median of {rounds} runs each, interleaved (each tool first once); bench host {C.ADDR}, RGW user "
            f"`{C.UID}`, bucket `{C.CONTAINER}`.", "",
            "| | runbook (`runbook deploy`) | plain_deploy.sh (bash + ssh ControlMaster) |"
            + (" Ansible playbook (ansible-core 2.19) |" if ansible else ""),
            "|---|---|---|" + ("---|" if ansible else ""),
            f"| fresh deploy | {m['runbook']:.2f} s ({runs_of(times['runbook'])}) | {m['plain']:.2f} s "
            f"({runs_of(times['plain'])}) |" + (f" {m['ansible']:.2f} s ({runs_of(times['ansible'])}) |" if ansible else ""),
            f"| no-change re-run | {rr:.2f} s ({runs_of([r['wall'] for r in again])}), changed: "
            f"{any(r['changed'] for r in again)} | — (not re-runnable: `user create` exits 17) |"
            + (f" {C.med([r['wall'] for r in a_again]):.2f} s ({runs_of([r['wall'] for r in a_again])}), changed "
               f"tasks: {max(r['changed'] for r in a_again)} |" if ansible else ""),
            f"| dry run / check mode on that deployment | {dr:.2f} s (`--dry-run`; would change: "
            f"{any(r['would_change'] for r in dry)}) | — |"
            + (f" {C.med([r['wall'] for r in a_check]):.2f} s (`--check`; tasks reported changed: "
               f"{max(r['changed'] for r in a_check)}) |" if ansible else ""),
            "", "| ratio | result | target |", "|---|---|---|",
            f"| runbook fresh / bash fresh | **{m['runbook'] / m['plain']:.2f}×** | ≤ {TARGET_RATIO}×: "
            f"{verdict(m['runbook'] / m['plain'] <= TARGET_RATIO)} |",
            f"| runbook re-run | **{rr:.2f} s** (its {again[-1]['ops']} operations take "
            f"{work_s:.1f} s) | ≤ {TARGET_RERUN:.0f} s: {verdict(rr <= TARGET_RERUN)} |"]
    if ansible:
        ma, mar, mac = m["ansible"], C.med([r["wall"] for r in a_again]), C.med([r["wall"] for r in a_check])
        body += [f"| runbook / Ansible, fresh | **{m['runbook'] / ma:.2f}×** | < 1: {verdict(m['runbook'] < ma)} |",
                 f"| runbook / Ansible, re-run | **{rr / mar:.2f}×** | < 1: {verdict(rr < mar)} |",
                 f"| runbook dry run / Ansible check mode | **{dr / mac:.2f}×** | < 1: {verdict(dr < mac)} |",
                 f"| Ansible per task (re-run) | {mar / max(1, a_again[-1]['tasks']):.2f} s "
                 f"({a_again[-1]['tasks']} tasks) | |"]
    body += ["", "Per section inside the runbook's fresh run (papermill's notebook duration, median): "
             + ", ".join(f"{k} {v:.1f} s" for k, v in sect.items())
             + f"; the rest ({m['runbook'] - sum(sect.values()):.1f} s) is the CLI, the deploy notebook's kernel, "
             "the section kernel's start and the records."]
    C.append_results("Deploy: runbook vs plain bash vs Ansible", "\n".join(body))
    out = {"fresh": m, "rerun": rr, "dry": dr, "sections": sect}
    if ansible:
        out.update(ansible_rerun=mar, ansible_check=mac)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep-host", action="store_true")
    ap.add_argument("--no-ansible", action="store_true")
    a = ap.parse_args()
    main(a.rounds, a.keep_host, not a.no_ansible)
