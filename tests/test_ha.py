"""Availability (issue 17), on the lab: a load balancer (haproxy on halb, 198.18.0.140) in front of
two registry replicas (ha1 198.18.0.141, ha2 198.18.0.142, own dockerd each) that share one Swift
container (`ha-registry`) of their own RGW user (`hauser`), deployed by 02/03/04's notebooks with
lb_host.  Clients pull in a loop through the LB (a new connection per pull, every blob's sha256
checked, no retry: one failed request = one failed pull) while:

- GC runs in gc_mode=readonly on both replicas: zero failed pulls; a push meanwhile is refused
  with 405 UNSUPPORTED, which 05-push explains as "read-only for GC"; the deleted image's blobs
  are gone, every other image pulls by digest, and a push works again after;
- a rolling restart (drained from haproxy first): zero failed pulls;
- one replica killed (kill -9) and then its host rebooted (lab.reboot) mid-rollout: what the
  clients see is measured (printed), nothing stored is lost, every image pulls by digest after.

Never `lab up`: the lab must be up; the test's own hosts are (re)added (add_host is idempotent).
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import LAB_PARAMS, ROOT, execute, outputs_text
from helpers import lab_ssh

sys.path.insert(0, str(ROOT / "bench"))
import _registry as R  # noqa: E402  (blob upload, manifests over the API)

pytestmark = pytest.mark.lab

LB, R1, R2 = "198.18.0.140", "198.18.0.141", "198.18.0.142"
HOSTS = {"halb": (LB, False), "ha1": (R1, True), "ha2": (R2, True)}
PORT = 8000
UID, CONTAINER = "hauser", "ha-registry"
MT = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = ", ".join([MT, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"])
KiB = 1 << 10


def notebook(name: str, out_dir, timeout: float = 300, **params) -> dict:
    return execute(name, out_dir, timeout=timeout, **params)[0]


def purge():
    lab_ssh(LAB_PARAMS["rgw_host"], f"radosgw-admin bucket rm --bucket={CONTAINER} --purge-objects >/dev/null 2>&1; "
            "true", timeout=120, check=False)


@pytest.fixture(scope="module")
def ha(tmp_path_factory):
    from runbook_lib import lab as L
    t0 = time.monotonic()
    for name, (addr, docker) in HOSTS.items():
        L.add_host(name, addr, docker=docker)
    for a in (R1, R2):
        lab_ssh(a, "docker rm -f registry >/dev/null 2>&1; rm -rf /opt/k8s/registry; true")
    state = tmp_path_factory.mktemp("ha-state")
    state.chmod(0o700)
    out = tmp_path_factory.mktemp("ha-nb")
    base = dict(registry_host=f"{R1},{R2}", lb_host=LB, state_dir=str(state), uid=UID)
    purge()
    nb = notebook("02-accounts", out, **{k: v for k, v in base.items() if k != "lb_host"})
    assert "VERDICT 02-accounts: PASS" in outputs_text(nb)
    nb = notebook("03-certs", out, **base)
    assert "VERDICT 03-certs: PASS" in outputs_text(nb), outputs_text(nb)[-1500:]
    nb = notebook("04-registry", out, **base, container=CONTAINER)
    text = outputs_text(nb)
    assert "VERDICT 04-registry: PASS" in text and "through the load balancer" in text, text[-2500:]
    from runbook_lib.context import Context
    ctx = Context("06-operations", dict(LAB_PARAMS, **base, dry_run=False, gc_mode="readonly"))
    from runbook_lib import certs
    pw = ctx.secret("registry_password", generate=False, user=ctx.registry_user)
    info = Info(ctx=ctx, ca=certs.ca_path(ctx), auth=(ctx.registry_user, pw), out=out, base=base, images={})
    s = session(info)
    for i in range(4):
        info["images"][(f"ha/app{i}", "v1")] = push_image(s, f"https://{LB}:{PORT}", f"ha/app{i}", i)
    print(f"\nha fixture: {time.monotonic() - t0:.1f} s")
    yield info
    ctx.close()
    for a in (R1, R2):
        lab_ssh(a, "docker rm -f registry >/dev/null 2>&1; true", check=False)
    purge()


class Info(dict):
    """The fixture's facts; its repr never shows the password (pytest prints fixtures on failure)."""

    def __repr__(self):
        return f"<ha fixture: {len(self['images'])} images>"


def session(info) -> requests.Session:
    s = requests.Session()
    s.trust_env, s.verify, s.auth = False, info["ca"], info["auth"]
    return s


def push_image(s, url: str, repo: str, seed: int) -> str:
    """Two layers (one shared by every image, one of its own, 256 KiB random) and a config."""
    shared = R.blob_upload(s, url, repo, b"shared layer " * 1000)
    own_data = os.urandom(256 * KiB)
    own = R.blob_upload(s, url, repo, own_data)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed, "rootfs": {"type": "layers",
                                                                                     "diff_ids": []}}).encode()
    c = R.blob_upload(s, url, repo, cfg)
    man = json.dumps({"schemaVersion": 2, "mediaType": MT,
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": len(cfg)},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}
                                 for d, n in ((shared, 13000), (own, len(own_data)))]}).encode()
    return R.put_manifest(s, url, repo, "v1", man, MT)


def pull(info, repo: str, ref: str, want: str | None = None) -> str:
    """One pull through the LB on fresh connections: manifest, then every blob, each sha256 checked."""
    s = session(info)
    try:
        u = f"https://{LB}:{PORT}/v2/{repo}"
        r = s.get(f"{u}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=10)
        r.raise_for_status()
        d = "sha256:" + hashlib.sha256(r.content).hexdigest()
        assert not want or d == want, f"{repo}:{ref} is {d}, want {want}"
        m = r.json()
        for b in [m["config"]] + m["layers"]:
            rb = s.get(f"{u}/blobs/{b['digest']}", timeout=10)
            rb.raise_for_status()
            assert "sha256:" + hashlib.sha256(rb.content).hexdigest() == b["digest"], "blob digest mismatch"
        return d
    finally:
        s.close()


class Pullers:
    """n threads pulling the images in a loop (bounded: max_s seconds), counting failures."""

    def __init__(self, info, n: int = 2, max_s: float = 240):
        self.info, self.n, self.max_s = info, n, max_s
        self.ok, self.fail, self.errors, self.stop = 0, 0, [], threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i):
        imgs = sorted(self.info["images"].items())
        t_end, k = time.monotonic() + self.max_s, i
        while not self.stop.is_set() and time.monotonic() < t_end:
            (repo, tag), d = imgs[k % len(imgs)]
            k += 1
            t = time.monotonic()
            try:
                pull(self.info, repo, d)
                with self.lock:
                    self.ok += 1
            except Exception as e:  # noqa: BLE001 - every failure counts
                with self.lock:
                    self.fail += 1
                    self.errors.append((round(t - self.t0, 2), f"{type(e).__name__}: {str(e)[:160]}"))
            time.sleep(0.02)

    def __enter__(self):
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.seconds = time.monotonic() - self.t0

    def summary(self) -> str:
        return (f"{self.ok} pulls ok, {self.fail} failed in {self.seconds:.1f} s "
                f"({self.ok / self.seconds:.1f} pulls/s)" + (f"; failures: {self.errors[:6]}" if self.errors else ""))


def all_pull(info):
    for (repo, tag), d in info["images"].items():
        assert pull(info, repo, d, want=d) == d
        assert pull(info, repo, tag, want=d) == d


# ----------------------------------------------------------------------------------- tests
def test_lb_up_and_idempotent(ha):
    from runbook_lib import lb, steps
    ctx = ha["ctx"]
    st = lb.states(ctx)
    assert all(v["status"].startswith("UP") for v in st.values()), st
    rep = lb.configure(ctx)
    assert rep.status == "ok", rep
    anon = requests.Session()
    anon.trust_env, anon.verify = False, ha["ca"]
    assert anon.get(f"https://{LB}:{PORT}/v2/", timeout=5).status_code == 401
    all_pull(ha)
    del steps


def test_readonly_gc_zero_failed_pulls_and_pushes_refused(ha):
    from runbook_lib import operations as ops, push
    ctx = ha["ctx"]
    # something to collect: an image of its own, deleted
    s = session(ha)
    url = f"https://{LB}:{PORT}"
    gone = push_image(s, url, "ha/gone", 99)
    man = s.get(f"{url}/v2/ha/gone/manifests/{gone}", headers={"Accept": ACCEPT}, timeout=10).json()
    own = man["layers"][1]["digest"]
    assert s.delete(f"{url}/v2/ha/gone/manifests/{gone}", timeout=10).status_code == 202
    refused, stop = [], threading.Event()

    def pusher():
        i = 0
        while not stop.is_set() and i < 400:
            ps = session(ha)
            try:
                r = ps.post(f"{url}/v2/ha/during-gc/blobs/uploads/", timeout=10)
                if r.status_code == 405:
                    refused.append(f"{r.status_code} {r.reason}: {r.text.strip()}")
            except requests.RequestException:
                pass
            finally:
                ps.close()
            i += 1
            time.sleep(0.5)

    t = threading.Thread(target=pusher, daemon=True)
    with Pullers(ha) as p:
        t.start()
        rep = ops.garbage_collect(ctx, gc_mode="readonly")
        stop.set()
    t.join(30)
    print(f"\nread-only GC: {p.summary()}; pushes refused with 405: {len(refused)}; result {rep.value}")
    assert rep.status == "changed", rep
    assert rep.value["ran"] and rep.value["mode"] == "readonly"
    assert p.fail == 0, p.summary()
    assert p.ok > 0
    assert refused, "no push was refused during GC"
    why = push.explain(refused[0], f"{LB}:{PORT}", "docker")
    assert why and "read-only for GC" in why[1]
    # GC really collected, replicas read-write again, every image whole
    assert s.head(f"{url}/v2/ha/gone/blobs/{own}", timeout=10).status_code == 404
    for a in (R1, R2):
        assert lab_ssh(a, "test -e /opt/k8s/registry/config.yml.runbook-rw", check=False).returncode != 0
    all_pull(ha)
    ha["images"][("ha/after-gc", "v1")] = push_image(s, url, "ha/after-gc", 7)
    all_pull(ha)
    # 04 re-run: the config (and its hash label) is back byte for byte
    nb = notebook("04-registry", ha["out"], **ha["base"], container=CONTAINER)
    assert "config unchanged" in outputs_text(nb), outputs_text(nb)[-2000:]


def test_rolling_restart_zero_failed_pulls(ha):
    from runbook_lib import operations as ops
    with Pullers(ha) as p:
        time.sleep(1)
        rep = ops.rolling_restart(ha["ctx"])
        time.sleep(1)
    print(f"\nrolling restart: {p.summary()}")
    assert rep.status in ("changed", "ok") and len(rep.value) == 2
    assert p.fail == 0, p.summary()
    all_pull(ha)


def test_replica_killed_then_rebooted_mid_rollout(ha):
    from runbook_lib import lab as L, lb
    ctx = ha["ctx"]
    windows = {}
    with Pullers(ha, n=4) as p:
        time.sleep(2)
        pid = lab_ssh(R2, "docker inspect -f '{{.State.Pid}}' registry").stdout.strip()
        t_kill = time.monotonic()
        lab_ssh(R2, f"kill -9 {int(pid)}")
        down_seen = back = None
        while time.monotonic() - t_kill < 30 and back is None:
            st = lb.states(ctx)[R2]["status"]
            if down_seen is None and not st.startswith("UP"):
                down_seen = time.monotonic() - t_kill
            if lab_ssh(R2, "docker inspect -f '{{.State.Pid}}' registry", check=False).stdout.strip() not in ("", pid, "0"):
                back = time.monotonic() - t_kill   # docker's --restart always started it again
            time.sleep(0.1)
        lb.wait_up(ctx, timeout=60)   # and haproxy sees it UP again
        windows["kill -9"] = {"lb_marked_down_s": down_seen and round(down_seen, 2),
                              "restarted_s": back and round(back, 2),
                              "up_in_lb_s": round(time.monotonic() - t_kill, 2), "failed": p.fail}
        f0 = p.fail
        t_boot = time.monotonic()
        L.reboot("ha2")
        lb.wait_up(ctx, timeout=120)
        windows["reboot"] = {"back_up_s": round(time.monotonic() - t_boot, 2), "failed": p.fail - f0}
        time.sleep(1)
    print(f"\nreplica killed / host rebooted mid-rollout: {p.summary()}; windows {windows}")
    assert p.ok > 0
    all_pull(ha)   # nothing stored is lost: every image by digest and by tag


# ----------------------------------------------------------------------------------- systemd runtime
R3 = "198.18.0.143"


def test_readonly_gc_systemd_runtime_keeps_owner_and_hash(tmp_path_factory):
    """gc_mode=readonly on one replica under Debian's docker-registry unit (runtime systemd,
    filesystem storage, no LB): the read-only config is written in place (group docker-registry and
    mode 0640 kept: the unit's user must still read it), pulls are served throughout, the collected
    blob is gone, and 04-registry re-run afterwards finds its config unchanged."""
    from runbook_lib import certs, lab as L, operations as ops
    from runbook_lib.context import Context
    L.add_host("ha3", R3, docker=True)
    try:
        state = tmp_path_factory.mktemp("ha3-state")
        state.chmod(0o700)
        out = tmp_path_factory.mktemp("ha3-nb")
        base = dict(registry_host=R3, state_dir=str(state), uid=UID)
        assert "VERDICT 03-certs: PASS" in outputs_text(notebook("03-certs", out, **base))
        nb = notebook("04-registry", out, **base, storage="filesystem", runtime="systemd")
        assert "VERDICT 04-registry: PASS" in outputs_text(nb)
        ctx = Context("06-operations", dict(LAB_PARAMS, **base, dry_run=False))
        pw = ctx.secret("registry_password", generate=False, user=ctx.registry_user)
        info = Info(ctx=ctx, ca=certs.ca_path(ctx), auth=(ctx.registry_user, pw), images={})
        s, url = session(info), f"https://{R3}:{PORT}"
        keep = push_image(s, url, "ha/keep", 1)
        gone = push_image(s, url, "ha/gone", 2)
        own = s.get(f"{url}/v2/ha/gone/manifests/{gone}", headers={"Accept": ACCEPT}, timeout=10).json()["layers"][1]
        assert s.delete(f"{url}/v2/ha/gone/manifests/{gone}", timeout=10).status_code == 202
        s.close()
        before = lab_ssh(R3, "stat -c '%U:%G %a' /etc/docker/registry/config.yml").stdout.strip()
        # the config's owner/mode while it is read-only, sampled every 10 ms on the host itself (the
        # read-only window is a fraction of a second: a probe over a new SSH login each time misses it)
        watch = ("echo ready; last=; end=$(( $(date +%s) + 120 )); while [ $(date +%s) -lt $end ]; do "
                 "if [ -e /etc/docker/registry/config.yml.runbook-rw ]; then "
                 "s=$(stat -c '%U:%G %a' /etc/docker/registry/config.yml 2>/dev/null) && [ \"$s\" != \"$last\" ] "
                 "&& echo \"$s\" && last=$s; fi; sleep 0.01; done")
        watcher = subprocess.Popen(L.ssh_argv(R3, "sudo -n sh -c " + shlex.quote(watch)), stdout=subprocess.PIPE,
                                   text=True)
        try:
            assert watcher.stdout.readline().strip() == "ready"
            rep = ops.garbage_collect(ctx, gc_mode="readonly")
            time.sleep(0.1)
        finally:
            watcher.terminate()
        seen = [line.strip() for line in watcher.communicate(timeout=30)[0].splitlines() if line.strip()]
        assert rep.status == "changed" and rep.value["ran"], rep
        assert "systemd unit docker-registry" in str(rep)
        assert seen and set(seen) == {before}, (before, seen)
        assert lab_ssh(R3, "stat -c '%U:%G %a' /etc/docker/registry/config.yml").stdout.strip() == before
        s = session(info)
        assert s.head(f"{url}/v2/ha/gone/blobs/{own['digest']}", timeout=10).status_code == 404
        r = s.get(f"{url}/v2/ha/keep/manifests/v1", headers={"Accept": ACCEPT}, timeout=10)
        assert r.status_code == 200 and "sha256:" + hashlib.sha256(r.content).hexdigest() == keep
        nb = notebook("04-registry", out, **base, storage="filesystem", runtime="systemd")
        assert "config unchanged" in outputs_text(nb), outputs_text(nb)[-1500:]
    finally:
        L.remove_host("ha3")
