"""Availability and the pull path (issue 17), side by side, on the bench's own hosts: halb (198.18.0.140,
haproxy), ha1..ha3 (198.18.0.141-143, own dockerd), RGW user `hauser`, buckets `ha-bench-*`.  Deployed
by the notebooks (02, 03, 04 with lb_host) into a private state dir.

    .venv/bin/python bench/bench_ha.py [--mb 64] [--layers 4] [--rounds 3] [--only pull,rollout,gc,deploy]

- pull: a multi-layer image (mb MB of random gzip layers) pulled through the LB (manifest + every blob,
  sha256 checked) vs raw GETs of the same objects from RGW, for swift, s3, s3 with s3_redirect;
- rollout: 20 concurrent pullers of the image through the LB vs 20 concurrent raw GETs;
- gc: pulls/s and failed pulls of 2 looping clients during 06's GC, gc_mode readonly vs stop;
- deploy: 04-registry to 1 vs 3 registry hosts (fresh each time)."""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import sys
import tempfile
import threading
import time

import requests

import _common as C
import _registry as R
from runbook_lib.accounts import sigv4_headers

LB, HOSTS = "198.18.0.140", {"ha1": "198.18.0.141", "ha2": "198.18.0.142", "ha3": "198.18.0.143"}
UID, PORT, RGW = "hauser", 8000, C.LAB["rgw_host"]
MT = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = MT + ", application/vnd.docker.distribution.manifest.v2+json"
MB = 1_000_000


def notebook(name: str, out: str, **params) -> str:
    """A section notebook headless (the runbook papermill engine); -> its outputs' text."""
    import papermill as pm
    path = os.path.join(out, f"{name}-{time.monotonic_ns()}.ipynb")
    pm.execute_notebook(str(C.ROOT / "notebooks" / f"{name}.ipynb"), path, parameters=params, engine_name="runbook",
                        cwd=str(C.ROOT / "notebooks"), progress_bar=False, kernel_name="python3",
                        execution_timeout=600)
    nb = json.load(open(path))
    text = "\n".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    if f"VERDICT {name}: PASS" not in text:
        raise RuntimeError(f"{name} did not pass:\n{text[-2000:]}")
    return text


class Env:
    def __init__(self, state: str, out: str):
        self.state, self.out = state, out
        from runbook_lib.context import Context
        self.ctx = Context("bench", dict(C.LAB, ssh_user="k8s", become=True, ssh_port=22, registry_port=PORT,
                                         registry_user="foo", uid=UID, state_dir=state, dry_run=False,
                                         registry_host=f"{HOSTS['ha1']},{HOSTS['ha2']}", lb_host=LB))
        from runbook_lib import accounts, certs
        self.ca = certs.ca_path(self.ctx)
        self.auth = ("foo", self.ctx.secret("registry_password", generate=False, user="foo"))
        self.swift = accounts.swift_credentials(self.ctx)
        self.s3 = accounts.s3_credentials(self.ctx)

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env, s.verify, s.auth = False, self.ca, self.auth
        return s


def base(state: str, hosts: list[str]) -> dict:
    return dict(registry_host=",".join(hosts), lb_host=LB, state_dir=state, uid=UID)


def deploy(state, out, storage: str, hosts: list[str], redirect: bool = False) -> float:
    t0 = time.monotonic()
    notebook("04-registry", out, **base(state, hosts), storage=storage, container=f"ha-bench-{storage}",
             s3_redirect=redirect)
    return time.monotonic() - t0


def push(env: Env, mb: int, layers: int, repo: str) -> tuple[str, list[dict]]:
    """mb MB in `layers` random layers, monolithic uploads through the LB; -> (manifest digest, layers)."""
    s, url = env.session(), f"https://{LB}:{PORT}"
    descs = []
    for i in range(layers):
        data = os.urandom(mb * MB // layers)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": R.blob_upload(s, url, repo, data), "size": len(data)})
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "t": time.time(),
                      "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    c = R.blob_upload(s, url, repo, cfg)
    man = json.dumps({"schemaVersion": 2, "mediaType": MT, "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                      "digest": c, "size": len(cfg)}, "layers": descs}).encode()
    return R.put_manifest(s, url, repo, "v1", man, MT), descs


def pull(env: Env, repo: str, ref: str, host: str = LB) -> int:
    """A client's pull through the LB (or straight from one replica): manifest, config, layers in turn,
    each sha256 checked; -> bytes."""
    s, u = env.session(), f"https://{host}:{PORT}/v2/{repo}"
    try:
        r = s.get(f"{u}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=30)
        r.raise_for_status()
        m, n = r.json(), 0
        for b in [m["config"]] + m["layers"]:
            rb = s.get(f"{u}/blobs/{b['digest']}", timeout=120)
            rb.raise_for_status()
            if "sha256:" + hashlib.sha256(rb.content).hexdigest() != b["digest"]:
                raise AssertionError("digest mismatch")
            n += len(rb.content)
        return n
    finally:
        s.close()


def raw_get(env: Env, storage: str, layers: list[dict]) -> int:
    """The same bytes straight from RGW: Swift GET (auth v1 token) or S3 GET (SigV4), plain HTTP."""
    s = requests.Session()
    s.trust_env = False
    n = 0
    try:
        if storage == "swift":
            a = s.get(f"http://{RGW}:7480/auth/v1", headers={"X-Auth-User": env.swift[0], "X-Auth-Key": env.swift[1]},
                      timeout=10)
            surl, tok = a.headers["X-Storage-Url"], a.headers["X-Auth-Token"]
        for b in layers:
            h = b["digest"][7:]
            if storage == "swift":
                r = s.get(f"{surl}/ha-bench-swift/files/docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data",
                          headers={"X-Auth-Token": tok}, timeout=120)
            else:
                url = f"http://{RGW}:7480/ha-bench-s3/docker/registry/v2/blobs/sha256/{h[:2]}/{h}/data"
                r = s.get(url, headers=sigv4_headers("GET", url, env.s3[0], env.s3[1]), timeout=120)
            r.raise_for_status()
            hashlib.sha256(r.content).hexdigest()  # the client's digest check, same work as above
            n += len(r.content)
        return n
    finally:
        s.close()


def best(fn, rounds: int) -> tuple[float, int]:
    ts, n = [], 0
    for _ in range(rounds):
        t0 = time.monotonic()
        n = fn()
        ts.append(time.monotonic() - t0)
    return C.med(ts), n


def bench_pull(state, out, env: Env, a) -> list[str]:
    rows = []
    for storage, redirect in (("swift", False), ("s3", False), ("s3", True)):
        deploy(state, out, storage, [HOSTS["ha1"], HOSTS["ha2"]], redirect)
        C.ssh(RGW, "true")
        d, layers = push(env, a.mb, a.layers, f"bench/pull-{storage}")
        t_reg, n = best(lambda: pull(env, f"bench/pull-{storage}", d), a.rounds)
        t_dir, _ = best(lambda: pull(env, f"bench/pull-{storage}", d, HOSTS["ha1"]), a.rounds)
        t_raw, n2 = best(lambda: raw_get(env, storage, layers), a.rounds)
        name = f"{storage}{' + s3_redirect' if redirect else ''}"
        rows.append(f"| {name} | {n / MB / t_reg:.0f} MB/s ({t_reg:.2f} s) | {n / MB / t_dir:.0f} MB/s ({t_dir:.2f} s) "
                    f"| {n2 / MB / t_raw:.0f} MB/s ({t_raw:.2f} s) | **{t_raw / t_reg:.0%}** | {t_raw / t_dir:.0%} |")
    return rows


def bench_rollout(env: Env, storage: str, d: str, layers: list[dict], n: int = 20) -> list[str]:
    out = []
    for what, fn in (("through the LB (2 replicas)", lambda _: pull(env, f"bench/pull-{storage}", d)),
                     ("raw GETs from RGW", lambda _: raw_get(env, storage, layers))):
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(n) as ex:
            res = list(ex.map(lambda i: _safe(fn, i), range(n)))
        t = time.monotonic() - t0
        ok = [r for r in res if isinstance(r, int)]
        out.append((what, t, sum(ok), n - len(ok)))
    (_, t1, b1, f1), (_, t2, b2, f2) = out
    return [f"| {n} concurrent pulls through the LB | {t1:.2f} s, {b1 / MB / t1:.0f} MB/s aggregate, {f1} failed |",
            f"| {n} concurrent raw GETs from RGW | {t2:.2f} s, {b2 / MB / t2:.0f} MB/s aggregate, {f2} failed |",
            f"| **ratio** (raw time / LB time) | **{t2 / t1:.0%}** |"]


def _safe(fn, i):
    try:
        return fn(i)
    except Exception as e:  # noqa: BLE001 - a failed pull is counted
        return f"{type(e).__name__}"


def bench_gc(env: Env) -> list[str]:
    from runbook_lib import operations as ops
    rows = []
    ctx = env.ctx
    s, url = env.session(), f"https://{LB}:{PORT}"
    small = {}
    for i in range(3):
        man, mt = R.tiny_image(s, url, f"bench/gc{i}", os.urandom(64 * 1024))
        small[f"bench/gc{i}"] = R.put_manifest(s, url, f"bench/gc{i}", "v1", man, mt)
    s.close()
    for mode in ("readonly", "stop"):
        s = env.session()
        man, mt = R.tiny_image(s, url, "bench/gone", os.urandom(256 * 1024))
        d = R.put_manifest(s, url, "bench/gone", "v1", man, mt)
        s.delete(f"{url}/v2/bench/gone/manifests/{d}", timeout=10)
        s.close()
        ok, fail, stop = [0], [0], threading.Event()

        def loop(k):
            items = sorted(small.items())
            while not stop.is_set():
                repo, dg = items[k % len(items)]
                k += 1
                try:
                    ps = env.session()
                    r = ps.get(f"{url}/v2/{repo}/manifests/{dg}", headers={"Accept": MT}, timeout=10)
                    r.raise_for_status()
                    for b in [r.json()["config"]] + r.json()["layers"]:
                        ps.get(f"{url}/v2/{repo}/blobs/{b['digest']}", timeout=10).raise_for_status()
                    ps.close()
                    ok[0] += 1
                except Exception:  # noqa: BLE001
                    fail[0] += 1
                    time.sleep(0.05)   # a refused connection returns at once: do not spin
        ts = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(2)]
        for t in ts:
            t.start()
        t0 = time.monotonic()
        ops.garbage_collect(ctx, gc_mode=mode)
        dt = time.monotonic() - t0
        stop.set()
        for t in ts:
            t.join(30)
        rows.append(f"| {mode} | {dt:.1f} s | {ok[0]} | {fail[0]} | {ok[0] / dt:.1f} |")
    return rows


def bench_deploy(state, out) -> list[str]:
    from runbook_lib import lab
    lab.add_host("ha3", HOSTS["ha3"], docker=True)
    three = list(HOSTS.values())
    notebook("03-certs", out, **base(state, three))
    times = {}
    for hosts in ([HOSTS["ha1"]], three):
        for a in three:
            C.ssh(a, "docker rm -f registry >/dev/null 2>&1; rm -rf /opt/k8s/registry; true")
        times[len(hosts)] = deploy(state, out, "swift", hosts)
    notebook("03-certs", out, **base(state, [HOSTS["ha1"], HOSTS["ha2"]]))
    for a in three:
        C.ssh(a, "docker rm -f registry >/dev/null 2>&1; rm -rf /opt/k8s/registry; true")
    lab.remove_host("ha3")
    return [f"| 04-registry (with lb_host) to 1 registry host | {times[1]:.1f} s |",
            f"| 04-registry (with lb_host) to 3 registry hosts | {times[3]:.1f} s |",
            f"| **ratio** 3 hosts / 1 host | **{times[3] / times[1]:.2f}×** (1.0× = fully parallel, 3.0× = serial) |"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="pull,rollout,gc,deploy")
    a = ap.parse_args()
    only = set(a.only.split(","))
    from runbook_lib import lab
    C.ensure_rgw()
    lab.add_host("halb", LB)
    for n in ("ha1", "ha2"):
        lab.add_host(n, HOSTS[n], docker=True)
    state = tempfile.mkdtemp(prefix="bench-ha-state-")
    out = tempfile.mkdtemp(prefix="bench-ha-nb-")
    body = [f"Hosts: haproxy on {LB} (TLS pass-through), registry:2 on {HOSTS['ha1']} and {HOSTS['ha2']}; RGW {RGW} "
            f"(one memstore OSD). Image: {a.mb} MB in {a.layers} random layers; median of {a.rounds} rounds; every "
            "blob's sha256 checked on both sides; plain RGW GETs are HTTP, registry pulls TLS + basic auth.", ""]
    try:
        notebook("02-accounts", out, state_dir=state, uid=UID)
        notebook("03-certs", out, **base(state, [HOSTS["ha1"], HOSTS["ha2"]]))
        deploy(state, out, "swift", [HOSTS["ha1"], HOSTS["ha2"]])
        env = Env(state, out)
        if "pull" in only:
            body += ["### Pull of one image: through the registry (via the LB) vs raw GETs from RGW", "",
                     "| storage | registry pull via the LB | same, straight to one replica | raw RGW GET | LB / raw | "
                     "replica / raw |", "|---|---|---|---|---|---|",
                     *bench_pull(state, out, env, a), ""]
        if "rollout" in only or "gc" in only:
            deploy(state, out, "swift", [HOSTS["ha1"], HOSTS["ha2"]])
        if "rollout" in only:
            d, layers = push(env, a.mb, a.layers, "bench/pull-swift")
            body += ["### A rollout: 20 concurrent pullers (swift storage)", "", "| | |", "|---|---|",
                     *bench_rollout(env, "swift", d, layers), ""]
        if "gc" in only:
            body += ["### Pulls during garbage collection (2 looping clients through the LB, swift)", "",
                     "| gc_mode | GC step | pulls ok | pulls failed | pulls/s |", "|---|---|---|---|---|",
                     *bench_gc(env), ""]
        if "deploy" in only:
            body += ["### Deploying to 1 vs 3 registry hosts", "", "| | |", "|---|---|", *bench_deploy(state, out), ""]
    finally:
        for a_ in set(HOSTS.values()) & set(lab.hosts().values()):
            C.ssh(a_, "docker rm -f registry >/dev/null 2>&1; true", check=False)
        for b in ("swift", "s3"):
            C.ssh(RGW, f"radosgw-admin bucket rm --bucket=ha-bench-{b} --purge-objects >/dev/null 2>&1; true",
                  check=False, timeout=300)
    C.append_results("Availability and the pull path (bench_ha.py)", "\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
