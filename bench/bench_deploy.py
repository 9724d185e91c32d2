"""Deploy: deploy.ipynb (papermill, one kernel per section) vs bench/plain_deploy.sh (the same commands
in bash over OpenSSH ControlMaster), against the bench's own registry host and a fresh RGW user.

    .venv/bin/python bench/bench_deploy.py [--rounds N]

Fresh before each timed run: the registry container and /opt/k8s on the bench host, the RGW user
(`radosgw-admin user rm --purge-data`), the control node's image/CA/login and state dirs.
Then one idempotent re-run of the runbook (target <= 10 s) on the last runbook deployment."""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import _common as C

TARGET_RATIO, TARGET_RERUN = 1.3, 10.0


def run_runbook(nb: str, state: str, runs: str) -> dict:
    cmd = (f"{C.ROOT}/.venv/bin/runbook run {nb} -f {C.ROOT}/params/lab.yaml -p registry_host {C.ADDR} "
           f"-p uid {C.UID} -p state_dir {state} -p image_name {C.IMAGE} -p container {C.CONTAINER}")
    t, r = C.timed(C.sh, cmd, check=False, timeout=900, env={"RUNBOOK_RUNS_DIR": runs, "RUNBOOK_STATE_DIR": state})
    if r.returncode != 0:
        raise RuntimeError(f"runbook deploy failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    run = sorted(p for p in pathlib.Path(runs).iterdir() if p.is_dir() and not p.is_symlink())[-1]
    data = json.loads((run / "run.json").read_text())
    sections = {}
    for p in sorted(run.glob("0*.ipynb")):
        md = json.loads(p.read_text())["metadata"].get("papermill", {})
        sections[p.stem] = md.get("duration")
    return {"wall": t, "sections": sections, "changed": data.get("changed"), "run": str(run)}


def run_plain(work: str) -> float:
    t, r = C.timed(C.sh, f"bash {C.BENCH}/plain_deploy.sh", check=False, timeout=600,
                   env={"WORK": work, "REG_HOST": C.ADDR, "RGW_UID": C.UID, "CONTAINER": C.CONTAINER,
                        "IMAGE": C.IMAGE})
    if r.returncode != 0 or "plain deploy: OK" not in r.stdout:
        raise RuntimeError(f"plain_deploy.sh failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return t


def main(rounds: int = 2, keep_host: bool = False) -> dict:
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    state, runs, plain = str(work / "state"), str(work / "runs"), str(work / "plain")
    nb = str(C.ROOT / "notebooks" / "deploy.ipynb")
    C.ensure_rgw()
    C.ensure_host()
    rb, pl, last = [], [], None
    try:
        for i in range(rounds):
            order = ("runbook", "plain") if i % 2 == 0 else ("plain", "runbook")
            for which in order:
                C.fresh([state, plain])
                if which == "runbook":
                    last = run_runbook(nb, state, runs)
                    rb.append(last)
                    print(f"round {i + 1}: runbook deploy {last['wall']:.2f} s "
                          f"(sections {', '.join(f'{k} {v:.1f}' for k, v in last['sections'].items())})", flush=True)
                else:
                    pl.append(run_plain(plain))
                    print(f"round {i + 1}: plain_deploy.sh {pl[-1]:.2f} s", flush=True)
        # idempotent re-run on the runbook's own deployment
        C.fresh([state, plain])
        run_runbook(nb, state, runs)
        again = run_runbook(nb, state, runs)
        print(f"re-run: {again['wall']:.2f} s, changed={again['changed']}", flush=True)
    finally:
        C.fresh([state, plain])
        if not keep_host:
            C.remove_host()
    t_rb, t_pl = C.med([r["wall"] for r in rb]), C.med(pl)
    sect = {k: C.med([r["sections"].get(k) or 0 for r in rb]) for k in rb[-1]["sections"]}
    ratio = t_rb / t_pl
    body = [
        f"| | median of {rounds} | runs |",
        "|---|---|---|",
        f"| runbook deploy (deploy.ipynb via `runbook run`, papermill) | {t_rb:.2f} s | "
        + ", ".join(f"{r['wall']:.1f}" for r in rb) + " |",
        f"| plain_deploy.sh (bash + OpenSSH ControlMaster) | {t_pl:.2f} s | " + ", ".join(f"{x:.1f}" for x in pl) + " |",
        f"| **ratio runbook / plain** | **{ratio:.2f}×** (target ≤ {TARGET_RATIO}×: "
        f"{'met' if ratio <= TARGET_RATIO else f'missed by {ratio / TARGET_RATIO:.1f}×'}) | |",
        f"| idempotent re-run (nothing changed: {not again['changed']}) | {again['wall']:.2f} s (target ≤ "
        f"{TARGET_RERUN:.0f} s: {'met' if again['wall'] <= TARGET_RERUN else 'missed'}) | |",
        "",
        "Per section inside the runbook run (papermill's notebook duration, median): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in sect.items())
        + f"; the rest ({t_rb - sum(sect.values()):.1f} s) is the CLI, the deploy notebook's own kernel and "
        "each section's HTML rendering.",
    ]
    C.append_results("Deploy: runbook vs plain bash", "\n".join(body))
    return {"runbook": t_rb, "plain": t_pl, "ratio": ratio, "rerun": again["wall"], "sections": sect}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep-host", action="store_true")
    a = ap.parse_args()
    main(a.rounds, a.keep_host)
