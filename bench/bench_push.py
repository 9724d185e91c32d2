"""Push throughput: skopeo (OCI layout -> registry with Swift storage in RGW) vs raw writes of the same
bytes straight to RGW from the same host (Swift PUT and S3 PUT, one object per layer); and `docker push`
of the same image (as users push: layers uploaded concurrently, but recompressed from the engine's
store).  Target: the registry path reaches >= 70% of raw.

    .venv/bin/python bench/bench_push.py [--mb 64] [--layers 4] [--rounds 3]"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import requests

import _common as C
import _registry as R
from runbook_lib.accounts import sigv4_headers

TARGET = 0.70
RAW_CONTAINER = "bench-raw"
SKOPEO_CACHE = "/var/lib/containers/cache/blob-info-cache-v1.boltdb"


def make_layout(d: pathlib.Path, mb: int, layers: int) -> list[pathlib.Path]:
    """An OCI layout with `layers` gzip tar layers of random data (incompressible; skopeo sees real gzip
    so it sends the blobs as they are, and docker can load the image)."""
    blobs = d / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    files, descs = [], []
    per = mb * 1024 * 1024 // layers
    diff_ids = []
    for i in range(layers):
        tmp = d / f"layer{i}.gz"
        # a real tar layer (docker load checks it and its diff_id), of random data: incompressible
        subprocess.run(f"mkdir -p {d}/src{i} && head -c {per} /dev/urandom > {d}/src{i}/data{i} && "
                       f"tar -C {d}/src{i} -cf {d}/layer{i}.tar data{i} && rm -r {d}/src{i}", shell=True, check=True)
        diff_ids.append("sha256:" + hashlib.sha256((d / f"layer{i}.tar").read_bytes()).hexdigest())
        subprocess.run(f"gzip -1 -n -c {d}/layer{i}.tar > {tmp} && rm {d}/layer{i}.tar", shell=True, check=True)
        dig = hashlib.sha256(tmp.read_bytes()).hexdigest()
        dst = blobs / dig
        tmp.rename(dst)
        files.append(dst)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": f"sha256:{dig}",
                      "size": dst.stat().st_size})
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    cd = hashlib.sha256(cfg).hexdigest()
    (blobs / cd).write_bytes(cfg)
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{cd}",
                                 "size": len(cfg)}, "layers": descs}).encode()
    md = hashlib.sha256(man).hexdigest()
    (blobs / md).write_bytes(man)
    (d / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{md}", "size": len(man),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    return files


def swift_session(rgw: str, uid: str, key: str) -> tuple[requests.Session, str]:
    s = requests.Session()
    s.trust_env = False
    r = s.get(f"http://{rgw}:7480/auth/v1", headers={"X-Auth-User": f"{uid}:swift", "X-Auth-Key": key})
    r.raise_for_status()
    s.headers["X-Auth-Token"] = r.headers["X-Auth-Token"]
    url = r.headers["X-Storage-Url"]
    s.put(f"{url}/{RAW_CONTAINER}").raise_for_status()
    return s, url


DRIVERS = (("swift", 8000), ("s3", 8001), ("filesystem", 8002))  # registry:2 per storage driver, side by side


def main(mb: int = 64, layers: int = 4, rounds: int = 3, keep_host: bool = False) -> dict:
    C.ensure_rgw()
    C.ensure_host()
    C.reset_registry_host()  # a kept host may still run another bench's registry on 8000
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-push-"))
    cache_existed = os.path.exists(SKOPEO_CACHE)
    rgw = C.LAB["rgw_host"]
    t_reg = {d: [] for d, _ in DRIVERS}
    t_swift, t_s3, sizes, t_docker = [], [], [], []
    try:
        key, (access, secret) = R.swift_creds(rgw, C.UID)
        s3 = requests.Session()
        s3.trust_env = False
        b3 = f"http://{rgw}:7480/{RAW_CONTAINER}-s3"
        s3.put(b3, headers=sigv4_headers("PUT", b3, access, secret))
        breg = f"http://{rgw}:7480/{C.CONTAINER}-s3"  # the s3 driver does not create its bucket
        s3.put(breg, headers=sigv4_headers("PUT", breg, access, secret))
        auths, certds = {}, {}
        for drv, port in DRIVERS:
            reg = R.start(C.ADDR, work / f"reg-{drv}", storage=drv, port=port, uid=C.UID, name=f"registry-{drv}",
                          remote_dir=f"/opt/bench/registry-{drv}",
                          container=C.CONTAINER + ("-s3" if drv == "s3" else ""))
            certds[drv] = work / f"certs.d-{drv}"
            certds[drv].mkdir()
            shutil.copy(reg.ca, certds[drv] / "ca.crt")
            auths[f"{C.ADDR}:{port}"] = {"auth": base64.b64encode(f"{reg.user}:{reg.password}".encode()).decode()}
        auth = work / "auth.json"
        auth.write_text(json.dumps({"auths": auths}))
        os.chmod(auth, 0o600)
        # docker push to the swift registry: the engine trusts its CA through certs.d and logs in from stdin
        dport = dict(DRIVERS)["swift"]
        dtarget = f"{C.ADDR}:{dport}"
        dcerts = pathlib.Path("/etc/docker/certs.d") / dtarget
        dcerts.mkdir(parents=True, exist_ok=True)
        shutil.copy(certds["swift"] / "ca.crt", dcerts / "ca.crt")
        user, pw = base64.b64decode(auths[dtarget]["auth"]).decode().split(":", 1)
        subprocess.run(["docker", "login", dtarget, "-u", user, "--password-stdin"], input=pw, text=True,
                       check=True, capture_output=True)
        sw, swurl = swift_session(rgw, C.UID, key)
        for i in range(rounds):
            lay = work / f"oci{i}"
            files = make_layout(lay, mb, layers)  # fresh random layers: nothing "already exists"
            total = sum(f.stat().st_size for f in files)
            sizes.append(total)
            order = DRIVERS if i % 2 == 0 else DRIVERS[::-1]
            for drv, port in order:
                dst = f"docker://{C.ADDR}:{port}/bench/big:r{i}"
                t, r = C.timed(subprocess.run, ["skopeo", "copy", "--quiet", "--dest-cert-dir", str(certds[drv]),
                                                "--authfile", str(auth), f"oci:{lay}:v1", dst],
                               capture_output=True, text=True, env={**os.environ, "TMPDIR": str(work)})
                if r.returncode != 0:
                    raise RuntimeError(f"skopeo push ({drv}) failed: {r.stderr[-1500:]}")
                t_reg[drv].append(t)

            dimg = f"{dtarget}/bench/dock:r{i}"
            r = subprocess.run(["skopeo", "copy", "--quiet", f"oci:{lay}:v1", f"docker-daemon:{dimg}"],
                               capture_output=True, text=True, env={**os.environ, "TMPDIR": str(work)})
            if r.returncode != 0:
                raise RuntimeError(f"skopeo copy to the engine failed: {r.stderr[-1500:]}")
            t, r = C.timed(subprocess.run, ["docker", "push", "-q", dimg], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"docker push failed: {r.stderr[-1500:]}")
            t_docker.append(t)
            subprocess.run(["docker", "rmi", "-f", dimg], capture_output=True)

            def swift_put():
                for f in files:
                    with open(f, "rb") as fh:
                        sw.put(f"{swurl}/{RAW_CONTAINER}/r{i}/{f.name}", data=fh).raise_for_status()

            def s3_put():
                for f in files:
                    data = f.read_bytes()
                    u = f"{b3}/r{i}/{f.name}"
                    s3.put(u, data=data, headers=sigv4_headers("PUT", u, access, secret, payload=data)).raise_for_status()
            t_swift.append(C.timed(swift_put)[0])
            t_s3.append(C.timed(s3_put)[0])
            print(f"round {i + 1}: {total / 1e6:.0f} MB: " + ", ".join(f"registry/{d} {t_reg[d][-1]:.2f} s"
                  for d, _ in DRIVERS) + f", docker push/swift {t_docker[-1]:.2f} s, raw swift {t_swift[-1]:.2f} s, "
                  f"raw s3 {t_s3[-1]:.2f} s", flush=True)
            shutil.rmtree(lay)
    finally:
        subprocess.run(["docker", "logout", f"{C.ADDR}:{dict(DRIVERS)['swift']}"], capture_output=True)
        shutil.rmtree(pathlib.Path("/etc/docker/certs.d") / f"{C.ADDR}:{dict(DRIVERS)['swift']}", ignore_errors=True)
        for drv, _ in DRIVERS:
            R.stop(C.ADDR, name=f"registry-{drv}", remote_dir=f"/opt/bench/registry-{drv}")
        C.remove_rgw_user()  # its buckets (registry data and raw objects) go with --purge-data
        if not cache_existed:
            subprocess.run(["rm", "-f", SKOPEO_CACHE])
        shutil.rmtree(work, ignore_errors=True)
        if not keep_host:
            C.remove_host()
    mbps = lambda t: C.med(sizes) / 1e6 / C.med(t)  # noqa: E731
    sw_, s3_ = mbps(t_swift), mbps(t_s3)
    rows = []
    for drv, _ in DRIVERS:
        m = mbps(t_reg[drv])
        where = "RGW" if drv != "filesystem" else "the registry host's disk (no RGW: the registry's own ceiling)"
        rows.append(f"| skopeo copy -> registry ({drv} driver) -> {where} | {C.med(t_reg[drv]):.2f} s | {m:.0f} MB/s | "
                    f"**{m / sw_:.0%}** | **{m / s3_:.0%}** |")
    if t_docker:
        m = mbps(t_docker)
        rows.append(f"| docker push (engine -> registry, swift driver) -> RGW: layers in parallel, recompressed | "
                    f"{C.med(t_docker):.2f} s | {m:.0f} MB/s | **{m / sw_:.0%}** | **{m / s3_:.0%}** |")
    best = max(mbps(t_reg["swift"]), mbps(t_reg["s3"]))
    body = "\n".join([
        f"{C.med(sizes) / 1e6:.0f} MB of random data as {layers} gzip layers, control node -> bench host registry "
        f"-> RGW ({rgw}, memstore OSD, beast tcp_nodelay=1 as 01-rgw sets it), median of {rounds} rounds, fresh "
        "layers each round, the three registries pushed to in alternating order.", "",
        "| path | median time | throughput | vs raw Swift | vs raw S3 |", "|---|---|---|---|---|", *rows,
        f"| raw Swift PUT (one object per layer, python requests) | {C.med(t_swift):.2f} s | {sw_:.0f} MB/s | 100% | |",
        f"| raw S3 PUT (SigV4, payload hashed) | {C.med(t_s3):.2f} s | {s3_:.0f} MB/s | | 100% |",
        "", f"Target ≥ {TARGET:.0%} of raw: {'met' if best / max(sw_, s3_) >= TARGET else 'missed'} "
        f"(best RGW driver against the faster raw path: {best / max(sw_, s3_):.0%}).",
    ])
    C.append_results("Push throughput: registry vs raw RGW writes", body)
    return {"registry_MBps": {d: mbps(t_reg[d]) for d, _ in DRIVERS}, "swift_MBps": sw_, "s3_MBps": s3_,
            "docker_push_MBps": mbps(t_docker) if t_docker else None}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep-host", action="store_true")
    a = ap.parse_args()
    main(a.mb, a.layers, a.rounds, a.keep_host)
