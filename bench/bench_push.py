"""Push throughput: skopeo (OCI layout -> registry with Swift storage in RGW) vs raw writes of the same
bytes straight to RGW from the same host (Swift PUT and S3 PUT, one object per layer).  Target: the
registry path reaches >= 70% of raw.

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
import time

import requests

import _common as C
import _registry as R
from runbook_lib.accounts import sigv4_headers

TARGET = 0.70
RAW_CONTAINER = "bench-raw"
SKOPEO_CACHE = "/var/lib/containers/cache/blob-info-cache-v1.boltdb"


def make_layout(d: pathlib.Path, mb: int, layers: int) -> list[pathlib.Path]:
    """An OCI layout with `layers` gzip layers of random data (gzip of random bytes: incompressible, and
    skopeo sees real gzip so it sends the blobs as they are)."""
    blobs = d / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    files, descs = [], []
    per = mb * 1024 * 1024 // layers
    for i in range(layers):
        tmp = d / f"layer{i}.gz"
        subprocess.run(f"head -c {per} /dev/urandom | gzip -1 -n > {tmp}", shell=True, check=True)
        dig = hashlib.sha256(tmp.read_bytes()).hexdigest()
        dst = blobs / dig
        tmp.rename(dst)
        files.append(dst)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": f"sha256:{dig}",
                      "size": dst.stat().st_size})
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": [d_["digest"] for d_ in descs]}}).encode()
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


def main(mb: int = 64, layers: int = 4, rounds: int = 3, keep_host: bool = False) -> dict:
    C.ensure_rgw()
    C.ensure_host()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-push-"))
    cache_existed = os.path.exists(SKOPEO_CACHE)
    rgw = C.LAB["rgw_host"]
    t_reg, t_swift, t_s3, sizes = [], [], [], []
    try:
        reg = R.start(C.ADDR, work / "reg", storage="swift", uid=C.UID, container=C.CONTAINER)
        key, (access, secret) = R.swift_creds(rgw, C.UID)
        certd = work / "certs.d"
        certd.mkdir()
        shutil.copy(reg.ca, certd / "ca.crt")
        auth = work / "auth.json"
        auth.write_text(json.dumps({"auths": {f"{C.ADDR}:{C.PORT}": {
            "auth": base64.b64encode(f"{reg.user}:{reg.password}".encode()).decode()}}}))
        os.chmod(auth, 0o600)
        sw, swurl = swift_session(rgw, C.UID, key)
        s3 = requests.Session()
        s3.trust_env = False
        b3 = f"http://{rgw}:7480/{RAW_CONTAINER}-s3"
        s3.put(b3, headers=sigv4_headers("PUT", b3, access, secret))
        for i in range(rounds):
            lay = work / f"oci{i}"
            files = make_layout(lay, mb, layers)  # fresh random layers: nothing "already exists"
            total = sum(f.stat().st_size for f in files)
            sizes.append(total)
            dst = f"docker://{C.ADDR}:{C.PORT}/bench/big:r{i}"
            t, r = C.timed(subprocess.run, ["skopeo", "copy", "--quiet", "--dest-cert-dir", str(certd),
                                            "--authfile", str(auth), f"oci:{lay}:v1", dst],
                           capture_output=True, text=True, env={**os.environ, "TMPDIR": str(work)})
            if r.returncode != 0:
                raise RuntimeError(f"skopeo push failed: {r.stderr[-1500:]}")
            t_reg.append(t)

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
            print(f"round {i + 1}: {total / 1e6:.0f} MB: registry {t_reg[-1]:.2f} s, swift {t_swift[-1]:.2f} s, "
                  f"s3 {t_s3[-1]:.2f} s", flush=True)
            shutil.rmtree(lay)
    finally:
        R.stop(C.ADDR)
        C.remove_rgw_user()  # its buckets (registry data and raw objects) go with --purge-data
        if not cache_existed:
            subprocess.run(["rm", "-f", SKOPEO_CACHE])
        shutil.rmtree(work, ignore_errors=True)
        if not keep_host:
            C.remove_host()
    mbps = lambda t: C.med(sizes) / 1e6 / C.med(t)  # noqa: E731
    reg_, sw_, s3_ = mbps(t_reg), mbps(t_swift), mbps(t_s3)
    body = "\n".join([
        f"{C.med(sizes) / 1e6:.0f} MB of random data as {layers} gzip layers, control node -> RGW "
        f"({rgw}, memstore OSD), median of {rounds} rounds, fresh layers each round.", "",
        "| path | median time | throughput | vs raw Swift | vs raw S3 |", "|---|---|---|---|---|",
        f"| skopeo copy oci: -> registry (swift driver) -> RGW | {C.med(t_reg):.2f} s | {reg_:.0f} MB/s | "
        f"**{reg_ / sw_:.0%}** | **{reg_ / s3_:.0%}** |",
        f"| raw Swift PUT (one object per layer) | {C.med(t_swift):.2f} s | {sw_:.0f} MB/s | 100% | |",
        f"| raw S3 PUT (SigV4, payload hashed) | {C.med(t_s3):.2f} s | {s3_:.0f} MB/s | | 100% |",
        "", f"Target ≥ {TARGET:.0%} of raw: {'met' if reg_ / max(sw_, s3_) >= TARGET else 'missed'} "
        f"(against the faster raw path).",
    ])
    C.append_results("Push throughput: registry vs raw RGW writes", body)
    return {"registry_MBps": reg_, "swift_MBps": sw_, "s3_MBps": s3_}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep-host", action="store_true")
    a = ap.parse_args()
    main(a.mb, a.layers, a.rounds, a.keep_host)
