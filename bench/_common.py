"""Shared by the bench scripts: the extra lab host, a fresh slate, machine facts, results.md."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results.md"
PY = sys.executable
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # operations.pmap progress bars: noise in a log

from runbook_lib import lab  # noqa: E402

LAB = {"rgw_host": "198.18.0.2", "rgw_port": 7480, "ssh_key": str(lab.SSH_KEY), "known_hosts": str(lab.KNOWN_HOSTS)}
HOST, ADDR = os.environ.get("BENCH_HOST", "benchreg"), os.environ.get("BENCH_ADDR", "198.18.0.70")
# RGW bucket names are global: "registry" belongs to the shared demo user; BENCH_UID / BENCH_CONTAINER keep
# two engineers' bench runs on one lab apart
UID = os.environ.get("BENCH_UID", "bench")
CONTAINER = os.environ.get("BENCH_CONTAINER", "bench-registry")
IMAGE = "bench/hello:v1"
PORT = 8000


def machine() -> str:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    return f"nproc {os.cpu_count()}, memory {mem} MiB, kernel {platform.release()}, python {platform.python_version()}"


def append_results(title: str, body: str) -> None:
    """One section per measurement run: date, machine, then the body (markdown)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = f"\n## {title} — {stamp}\n\n_{machine()}_\n\n{body.rstrip()}\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in bench/ (`make bench`). Newest last.\n")
    with open(RESULTS, "a") as f:
        f.write(text)
    print(text)


def ssh_opts(control_dir: str | None = None) -> list[str]:
    o = ["-F", "/dev/null", "-i", str(lab.SSH_KEY), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={lab.KNOWN_HOSTS}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
    if control_dir:
        o += ["-o", "ControlMaster=auto", "-o", f"ControlPath={control_dir}/cm-%h", "-o", "ControlPersist=120"]
    return o


def ssh(addr: str, command: str, check: bool = True, timeout: float = 300, input=None) -> subprocess.CompletedProcess:
    r = subprocess.run(["ssh", *ssh_opts(), f"{lab.SSH_USER}@{addr}", "sudo -n sh -c " + shlex.quote(command)],
                       capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"ssh {addr} {command!r}: exit {r.returncode}: {r.stderr[-500:]}")
    return r


def sh(command: str, check: bool = True, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise RuntimeError(f"{command!r}: exit {r.returncode}: {(r.stderr or r.stdout)[-800:]}")
    return r


def ensure_host(name: str = HOST, addr: str = ADDR) -> str:
    """The bench's own registry host (own dockerd + registry:2), never the shared registry1."""
    return lab.add_host(name, addr, docker=True)


def remove_host(name: str = HOST) -> None:
    with contextlib.suppress(Exception):
        lab.remove_host(name)


def reset_registry_host(addr: str = ADDR) -> None:
    ssh(addr, "docker rm -f registry >/dev/null 2>&1; rm -rf /opt/k8s /run/docker-registry.*; true")


def remove_rgw_user(uid: str = UID) -> None:
    """`radosgw-admin user rm --purge-data` (its buckets and objects go too); fine when absent."""
    ssh(LAB["rgw_host"], f"radosgw-admin user rm --uid={uid} --purge-data >/dev/null 2>&1; true", timeout=300)


def reset_control(addr: str = ADDR, image: str = IMAGE, dirs=()) -> None:
    t = f"{addr}:{PORT}"
    sh(f"docker rmi -f {image} {t}/{image} >/dev/null 2>&1; docker logout {t} >/dev/null 2>&1; "
       f"rm -rf /etc/docker/certs.d/{t} /etc/containers/certs.d/{t}; true")
    for d in dirs:
        sh(f"rm -rf {d}")


def fresh(state_dirs=()) -> None:
    """Nothing the deploy makes is left: registry container + files, RGW user + data, local image/CA/login."""
    reset_registry_host()
    remove_rgw_user()
    reset_control(dirs=state_dirs)


def timed(fn, *a, **kw) -> tuple[float, object]:
    t0 = time.monotonic()
    out = fn(*a, **kw)
    return time.monotonic() - t0, out


def cpu_seconds(comm: str) -> float:
    """CPU time (user+system) used so far by every process named comm (lab hosts share one PID namespace)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for p in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            st = (p / "stat").read_text()
        except OSError:
            continue
        if st[st.index("(") + 1:st.rindex(")")] == comm:
            f = st[st.rindex(")") + 2:].split()
            total += (int(f[11]) + int(f[12])) / tick
    return total


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt(x: float, unit: str = "s") -> str:
    if unit == "ms":
        return f"{x * 1000:.1f} ms"
    return f"{x:.2f} s"


def ensure_rgw() -> None:
    """RGW answering on ceph1 (after a lab restart it is not): 01-rgw, idempotent, before any timing."""
    import requests
    try:
        s = requests.Session()
        s.trust_env = False
        if s.get(f"http://{LAB['rgw_host']}:{LAB['rgw_port']}/", timeout=3).status_code == 200:
            return
    except requests.RequestException:
        pass
    import tempfile
    sh(f"{ROOT}/.venv/bin/runbook run {ROOT}/notebooks/01-rgw.ipynb -f {ROOT}/params/lab.yaml",
       timeout=600, env={"RUNBOOK_RUNS_DIR": tempfile.mkdtemp(prefix="bench-rgw-")})
