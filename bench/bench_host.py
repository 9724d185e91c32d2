"""Per-command cost of the host layer: `SSHHost.run(true)` on one connection vs OpenSSH with a
ControlMaster (`ssh -S sock host true`), N each, interleaved; and the same with privilege
(become: `sudo -n` in the host layer vs `ssh -S sock host sudo -n true`).  Target: <= 2x.

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
    user = C.lab.SSH_USER
    kw = dict(user=user, key_filename=str(C.lab.SSH_KEY), known_hosts=str(C.lab.KNOWN_HOSTS))
    h, hb = SSHHost(addr, **kw), SSHHost(addr, become=True, **kw)
    try:
        for _ in range(50):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        for x in (h, hb):  # connect (and check sudo) outside the timing: both sides are warm
            x.run(Command("true"), read=True)
        subprocess.run([*base, "-S", sock, f"{user}@{addr}", "true"], check=True)
        t = {k: [] for k in ("layer", "ssh", "layer_become", "ssh_sudo")}
        for _ in range(n):
            for key, fn in (("layer", lambda: h.run(Command("true"), read=True)),
                            ("ssh", lambda: subprocess.run([*base, "-S", sock, f"{user}@{addr}", "true"], check=True)),
                            ("layer_become", lambda: hb.run(Command("true"), read=True)),
                            ("ssh_sudo", lambda: subprocess.run([*base, "-S", sock, f"{user}@{addr}", "sudo -n true"],
                                                                check=True))):
                t0 = time.perf_counter()
                fn()
                t[key].append(time.perf_counter() - t0)
    finally:
        h.close()
        hb.close()
        master.terminate()
        master.wait(10)
        if own and not keep_host:
            C.remove_host()
    m = {k: C.med(v) for k, v in t.items()}
    p95 = lambda xs: sorted(xs)[int(len(xs) * 0.95) - 1]  # noqa: E731
    ratio, ratio_b = m["layer"] / m["ssh"], m["layer_become"] / m["ssh_sudo"]

    def verdict(r):
        return f"**{r:.2f}×** (target ≤ {TARGET}×: {'met' if r <= TARGET else 'missed'})"
    body = "\n".join([
        f"N={n} each, interleaved, `true` on {addr} as {user} (warm connections).",
        "",
        "| | median | p95 |",
        "|---|---|---|",
        f"| `SSHHost.run` (fabric/paramiko, one connection, TCP_NODELAY) | {m['layer'] * 1000:.1f} ms | {p95(t['layer']) * 1000:.1f} ms |",
        f"| `ssh -S ControlMaster` (OpenSSH, a new client process per command) | {m['ssh'] * 1000:.1f} ms | {p95(t['ssh']) * 1000:.1f} ms |",
        f"| **ratio** | {verdict(ratio)} | |",
        f"| `SSHHost.run`, become (`sudo -n` in the host layer) | {m['layer_become'] * 1000:.1f} ms | {p95(t['layer_become']) * 1000:.1f} ms |",
        f"| `ssh -S ... sudo -n true` | {m['ssh_sudo'] * 1000:.1f} ms | {p95(t['ssh_sudo']) * 1000:.1f} ms |",
        f"| **ratio with privilege** | {verdict(ratio_b)} | |",
    ])
    C.append_results("Host layer: per-command cost", body)
    return {"layer_ms": m["layer"] * 1000, "ssh_ms": m["ssh"] * 1000, "ratio": ratio,
            "become_ms": m["layer_become"] * 1000, "sudo_ms": m["ssh_sudo"] * 1000, "ratio_become": ratio_b}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--addr", default=None, help="an existing lab host (default: add the bench host)")
    a = ap.parse_args()
    main(a.n, a.addr)
