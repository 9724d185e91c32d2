"""Where a deploy's seconds go: a no-change re-run of `runbook deploy`, cut into the machinery's parts
from the timestamps the run folder already holds (papermill's per-notebook and per-cell times,
nbclient's busy/idle times per cell, the journal's operation durations).

    .venv/bin/python bench/profile_deploy.py [--runs N] [--label TEXT]

Runs on the bench host (bench/_common.py: BENCH_HOST/BENCH_ADDR, BENCH_UID/BENCH_CONTAINER); one
deploy first (untimed) so that the timed ones change nothing.  Appends a table to bench/results.md."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import pathlib
import statistics
import tempfile
import time

import _common as C

PARTS = [
    ("cli", "CLI start and imports, and both kernels' boot (started together), until papermill starts deploy.ipynb"),
    ("deploy_kernel", "deploy.ipynb's kernel: from papermill's start to its first cell"),
    ("deploy_begin", "deploy: validation, host check (SSH logins, sudo), until section 1 starts"),
    ("section_start", "per section: from papermill's start to the first cell (kernel/client start and ready)"),
    ("cells", "per section: cells executing in the kernel (the operations and the Python around them)"),
    ("cell_overhead", "per section: papermill/nbclient around the cells (saves of the notebook, messages)"),
    ("between", "between sections: the previous section's records, the next one's papermill load"),
    ("after_sections", "after the last section: its records, kernel shut-down, the verdict cell"),
    ("cli_tail", "CLI after deploy.ipynb: its HTML, run.json (tool versions), index"),
]


def _ts(s: str) -> float:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _nb(path: pathlib.Path):
    nb = json.loads(path.read_text())
    md = nb["metadata"]["papermill"]
    cells = []
    for c in nb["cells"]:
        pm, ex = c["metadata"].get("papermill", {}), c["metadata"].get("execution", {})
        if pm.get("start_time") and pm.get("end_time"):
            busy = _ts(ex["iopub.status.idle"]) - _ts(ex["iopub.status.busy"]) if ex.get("iopub.status.idle") else 0.0
            cells.append((_ts(pm["start_time"]), _ts(pm["end_time"]), busy))
    return _ts(md["start_time"]), _ts(md["end_time"]), cells


def profile(run: pathlib.Path, t0: float, t1: float) -> dict:
    """The parts of one run (seconds), from its run folder and the CLI's start/end (wall clock)."""
    d_start, d_end, d_cells = _nb(run / "deploy.ipynb")
    out = dict.fromkeys([k for k, _ in PARTS], 0.0)
    out["cli"] = d_start - t0
    out["deploy_kernel"] = d_cells[0][0] - d_start
    prev = None
    first_section = None
    for p in sorted(run.glob("0[1-5]-*.ipynb")):
        s, e, cells = _nb(p)
        first_section = first_section or s
        out["section_start"] += cells[0][0] - s
        busy = sum(c[2] for c in cells)
        out["cells"] += busy
        out["cell_overhead"] += (e - cells[0][0]) - busy
        if prev is not None:
            out["between"] += s - prev
        prev = e
    # the deploy notebook's cells before the sections (imports, begin) count as its begin
    out["deploy_begin"] = (first_section or d_end) - d_cells[0][0]
    out["after_sections"] = d_end - (prev or d_end)
    out["cli_tail"] = t1 - d_end
    out["total"] = t1 - t0
    entries = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines() if line.strip()]
    out["operations"] = len(entries)
    out["operations_s"] = sum(e.get("duration") or 0 for e in entries)
    return out


def main(runs: int = 3, label: str = "") -> dict:
    work = pathlib.Path(tempfile.mkdtemp(prefix="profile-deploy-"))
    state, rdir = str(work / "state"), str(work / "runs")
    cmd = (f"{C.ROOT}/.venv/bin/runbook deploy -f {C.ROOT}/params/lab.yaml -p registry_host {C.ADDR} -p uid {C.UID} "
           f"-p state_dir {state} -p image_name {C.IMAGE} -p container {C.CONTAINER}")
    env = {"RUNBOOK_RUNS_DIR": rdir, "RUNBOOK_STATE_DIR": state}
    C.ensure_rgw()
    C.ensure_host()
    C.fresh([state])
    C.sh(cmd, timeout=900, env=env)
    rows = []
    try:
        for _ in range(runs):
            t0 = time.time()
            C.sh(cmd, timeout=900, env=env)
            t1 = time.time()
            rows.append(profile((pathlib.Path(rdir) / "latest").resolve(), t0, t1))
            print({k: round(v, 2) for k, v in rows[-1].items()}, flush=True)
    finally:
        C.fresh([state])
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    body = [f"{label + ': ' if label else ''}a no-change re-run of `runbook deploy` on the bench host {C.ADDR}, "
            f"median of {runs}; {med['operations']:.0f} operations (commands, file checks, HTTP calls) whose own "
            f"durations add up to {med['operations_s']:.1f} s (some run in parallel across hosts).", "",
            "| part | seconds |", "|---|---|"]
    body += [f"| {text} | {med[k]:.2f} |" for k, text in PARTS]
    body += [f"| **total (wall)** | **{med['total']:.2f}** |"]
    C.append_results("Deploy profile: where a re-run's seconds go", "\n".join(body))
    return med


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    main(a.runs, a.label)
