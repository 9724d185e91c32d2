"""Per-command cost of the host layer: `SSHHost.run(true)` on one connection vs OpenSSH with a
ControlMaster (`ssh -S sock host true`), N each, interleaved.  Target: <= 2x.

    .venv/bin/python bench/bench_host.py [-n 200] [--addr 198.18.0.2]"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import _common as C
from runbook_lib.host import Command, SSHHost

TARGET = 2.0


def main(n: int = 200, addr: str | None = None, keep_host: bool = False) -> dict:
    own = addr is None
    if own:
        addr = C.ADDR
        C.ensure_host()
    d = tempfile.mkdtemp(prefix="bench-cm-")
    sock = os.path.join(d, "cm")
    base = ["ssh", *C.ssh_opts(), "-o", f"ControlPath={sock}"]
    master = subprocess.Popen([*base, "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-N", f"{C.lab.SSH_USER}@{addr}"])
    h = SSHHost(addr, user=C.lab.SSH_USER, key_filename=str(C.lab.SSH_KEY), known_hosts=str(C.lab.KNOWN_HOSTS))
    try:
        for _ in range(50):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        h.run(Command("true"), read=True)  # connect outside the timing (both sides are warm)
        subprocess.run([*base, "-S", sock, f"{C.lab.SSH_USER}@{addr}", "true"], check=True)
        t_layer, t_ssh = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            h.run(Command("true"), read=True)
            t_layer.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            subprocess.run([*base, "-S", sock, f"{C.lab.SSH_USER}@{addr}", "true"], check=True)
            t_ssh.append(time.perf_counter() - t0)
    finally:
        h.close()
        master.terminate()
        master.wait(10)
        if own and not keep_host:
            C.remove_host()
    ml, ms = C.med(t_layer), C.med(t_ssh)
    p95 = lambda xs: sorted(xs)[int(len(xs) * 0.95) - 1]  # noqa: E731
    ratio = ml / ms
    body = "\n".join([
        f"N={n} each, interleaved, `true` on {addr} (warm connections).",
        "",
        "| | median | p95 |",
        "|---|---|---|",
        f"| `SSHHost.run` (fabric/paramiko, one connection, TCP_NODELAY) | {ml * 1000:.1f} ms | {p95(t_layer) * 1000:.1f} ms |",
        f"| `ssh -S ControlMaster` (OpenSSH, a new client process per command) | {ms * 1000:.1f} ms | {p95(t_ssh) * 1000:.1f} ms |",
        f"| **ratio** | **{ratio:.2f}×** (target ≤ {TARGET}×: {'met' if ratio <= TARGET else 'missed'}) | |",
    ])
    C.append_results("Host layer: per-command cost", body)
    return {"layer_ms": ml * 1000, "ssh_ms": ms * 1000, "ratio": ratio}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--addr", default=None, help="an existing lab host (default: add the bench host)")
    a = ap.parse_args()
    main(a.n, a.addr)
