"""bcrypt cost vs request latency: the htpasswd the runbook writes (registry.build_htpasswd, $2y$) at
cost 4..12; N authenticated `GET /v2/` per cost on one keep-alive session (the registry checks the
hash on EVERY request).

    .venv/bin/python bench/bench_bcrypt.py [-n 40] [--costs 4,5,6,8,10,12]"""
from __future__ import annotations

import argparse
import tempfile
import time

import _common as C
import _registry as R
from runbook_lib import registry


def main(n: int = 40, costs=(4, 5, 6, 8, 10, 12), keep_host: bool = False) -> dict:
    C.ensure_host()
    work = tempfile.mkdtemp(prefix="bench-bcrypt-")
    out = {}
    try:
        reg = R.start(C.ADDR, work, storage="filesystem", cost=costs[0])
        h = R.host(C.ADDR)
        s = reg.session()
        for cost in costs:
            ht, _ = registry.build_htpasswd(None, {reg.user: reg.password}, cost=cost)
            h.put_file(f"{reg.remote_dir}/auth/htpasswd", ht, mode=0o600, secret=True)
            deadline = time.monotonic() + 10
            while True:  # the registry re-reads the file when it changes: wait until this cost answers
                t0 = time.perf_counter()
                code = s.get(reg.url + "/v2/", timeout=30).status_code
                if code == 200 and (cost < 8 or time.perf_counter() - t0 > 0.004 * 2 ** (cost - 6)):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                r = s.get(reg.url + "/v2/", timeout=30)
                ts.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.status_code
            out[cost] = (C.med(ts), sorted(ts)[int(n * 0.95) - 1])
            print(f"cost {cost}: median {out[cost][0] * 1000:.1f} ms", flush=True)
        anon = reg.session(auth=False)
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            anon.get(reg.url + "/v2/", timeout=30)
            ts.append(time.perf_counter() - t0)
        out["401"] = (C.med(ts), sorted(ts)[int(n * 0.95) - 1])
        h.close()
    finally:
        R.stop(C.ADDR)
        if not keep_host:
            C.remove_host()
    rows = [f"N={n} authenticated `GET /v2/` per cost, one keep-alive TLS session, registry:2 on the bench host "
            "(2.8, filesystem storage).  Hashes made by `registry.build_htpasswd` ($2y$, as 04-registry writes them).",
            "", "| bcrypt cost | median latency | p95 | requests/s (one client) |", "|---|---|---|---|"]
    for k, (m, p) in out.items():
        label = "no credentials (401, no hash check)" if k == "401" else str(k)
        rows.append(f"| {label} | {m * 1000:.1f} ms | {p * 1000:.1f} ms | {1 / m:.0f} |")
    rows += ["", "04-registry's default is cost 5 (`bcrypt_cost`); every docker/skopeo request pays this."]
    C.append_results("bcrypt cost vs request latency", "\n".join(rows))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--costs", default="4,5,6,8,10,12")
    ap.add_argument("--keep-host", action="store_true")
    a = ap.parse_args()
    main(a.n, tuple(int(x) for x in a.costs.split(",")), a.keep_host)
