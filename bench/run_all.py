"""`make bench`: every benchmark in turn on the bench's own lab host (added once, removed at the end),
results appended to bench/results.md, and a summary table printed.

    .venv/bin/python bench/run_all.py [--quick] [--only deploy,host,ops,push,bcrypt]"""
from __future__ import annotations

import argparse
import traceback

import _common as C
import bench_bcrypt
import bench_deploy
import bench_host
import bench_ops
import bench_push


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds/requests (a smoke run)")
    ap.add_argument("--only", default="deploy,host,ops,push,bcrypt")
    a = ap.parse_args()
    q = a.quick
    jobs = {
        "deploy": lambda: bench_deploy.main(rounds=1 if q else 3, keep_host=True),
        "host": lambda: bench_host.main(n=50 if q else 200, keep_host=True),
        "ops": lambda: bench_ops.main(200 if q else 1000, 300 if q else 2000, keep_host=True),
        "push": lambda: bench_push.main(mb=32 if q else 64, rounds=1 if q else 3, keep_host=True),
        "bcrypt": lambda: bench_bcrypt.main(n=10 if q else 40, keep_host=True),
    }
    results, failed = {}, []
    C.ensure_rgw()
    C.ensure_host()
    try:
        for name in a.only.split(","):
            print(f"=== {name}", flush=True)
            try:
                results[name] = jobs[name]()
            except Exception:
                traceback.print_exc()
                failed.append(name)
    finally:
        C.remove_host()
    print("\nsummary:", {k: v for k, v in results.items() if k != "ops"})
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
