"""Fault tolerance under real failures, on the lab (no mocks): RGW killed during a push, the
registry killed, sshd's session dying mid-run, GC with concurrent pushes, a nearly full disk.

Each test ends by pulling every image stored so far (manifest by tag + every blob, sha256
checked) and comparing digests: nothing already stored may be lost.  Destructive work happens
on an extra lab host (faultreg, 198.18.0.71, own dockerd) with its own RGW user; ceph1's shared
RGW is killed only in the first test, briefly, and always restarted (01-rgw) in a finalizer.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _registry as R  # noqa: E402  (the bench's registry helpers: blob upload, tiny images)

from helpers import lab_host, lab_ssh, rgw_answers  # noqa: E402
from conftest import execute, outputs_text  # noqa: E402

pytestmark = pytest.mark.lab

NAME, ADDR, PORT = "faultreg", "198.18.0.71", 8000
UID, CONTAINER = "faulty", "fault-registry"
RGW = "198.18.0.2"
HEALTH_WAIT = 60  # registry health check: every 10 s, 3 failures -> 503


# --------------------------------------------------------------------------- helpers
def notebook(name: str, out_dir: pathlib.Path, expect_error: bool = False, timeout: float = 300, **params):
    """Run a section notebook headless -> (nb dict, error or None)."""
    return execute(name, out_dir, expect_error=expect_error, timeout=timeout, **params)


ssh = lab_ssh  # root on a lab host, outside the runbook


class Store:
    """The images pushed so far ({(repo, tag): digest}) and how to prove they all still pull."""

    def __init__(self, reg: R.Reg):
        self.reg, self.images = reg, {}

    def push(self, repo: str, tag: str, payload: bytes, shared: bytes = b"shared base layer") -> str:
        s = self.reg.session()
        url = self.reg.url
        layers = [(R.blob_upload(s, url, repo, p), len(p)) for p in (shared, payload)]
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                          "config": {"Labels": {"t": f"{repo}:{tag}"}}}).encode()
        cd = R.blob_upload(s, url, repo, cfg)
        mt = "application/vnd.oci.image.manifest.v1+json"
        man = json.dumps({"schemaVersion": 2, "mediaType": mt, "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n}
                       for d, n in layers]}).encode()
        d = R.put_manifest(s, url, repo, tag, man, mt)
        self.images[(repo, tag)] = d
        return d

    def push_index(self, repo: str, tag: str) -> str:
        """A multi-platform OCI index over two single-platform images."""
        s = self.reg.session()
        kids = []
        for arch in ("amd64", "arm64"):
            d = self.push(repo, f"{tag}-{arch}", f"{repo} {arch} layer".encode())
            r = s.get(f"{self.reg.url}/v2/{repo}/manifests/{d}",
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
            kids.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d,
                         "size": len(r.content), "platform": {"os": "linux", "architecture": arch}})
        mt = "application/vnd.oci.image.index.v1+json"
        idx = json.dumps({"schemaVersion": 2, "mediaType": mt, "manifests": kids}).encode()
        d = R.put_manifest(s, self.reg.url, repo, tag, idx, mt)
        self.images[(repo, tag)] = d
        return d

    def pull(self, repo: str, ref: str) -> str:
        """GET the manifest (all types accepted), then every blob (sha256 checked); children of an index too."""
        from runbook_lib.operations import ACCEPT
        s = self.reg.session()
        r = s.get(f"{self.reg.url}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=30)
        assert r.status_code == 200, f"{repo}:{ref}: manifest {r.status_code} {r.text[:200]}"
        digest = "sha256:" + hashlib.sha256(r.content).hexdigest()
        assert r.headers.get("Docker-Content-Digest") == digest
        m = r.json()
        for child in m.get("manifests") or []:
            self.pull(repo, child["digest"])
        for b in [m.get("config")] + (m.get("layers") or []):
            if not b:
                continue
            br = s.get(f"{self.reg.url}/v2/{repo}/blobs/{b['digest']}", timeout=60)
            assert br.status_code == 200, f"{repo}:{ref}: blob {b['digest'][:19]} {br.status_code}"
            assert "sha256:" + hashlib.sha256(br.content).hexdigest() == b["digest"], f"{repo}:{ref}: corrupt blob"
        return digest

    def assert_all_pull(self):
        lost = {}
        for (repo, tag), want in self.images.items():
            try:
                got = self.pull(repo, tag)
            except AssertionError as e:
                got = str(e)
            if got != want:
                lost[f"{repo}:{tag}"] = got
        assert not lost, f"images lost or changed: {lost}"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(lab, tmp_path_factory):
    """faultreg + a registry deployed on it by the runbook's own notebooks (02, 03, 04; 01 if RGW is down),
    swift storage in RGW as the fresh user `faulty`; two images with a shared layer and a multi-arch index."""
    from runbook_lib import lab as L
    state = tmp_path_factory.mktemp("fault-state")
    out = tmp_path_factory.mktemp("fault-nb")
    L.add_host(NAME, ADDR, docker=True)
    ssh(RGW, f"radosgw-admin user rm --uid={UID} --purge-data >/dev/null 2>&1; true")
    params = dict(registry_host=ADDR, uid=UID, swift_subuser=f"{UID}:swift", container=CONTAINER,
                  state_dir=str(state))
    try:
        if not rgw_answers():
            notebook("01-rgw", out)
        notebook("02-accounts", out, uid=UID, swift_subuser=f"{UID}:swift", state_dir=str(state))
        notebook("03-certs", out, registry_host=ADDR, state_dir=str(state))
        notebook("04-registry", out, **params)
        pw = (state / "secrets" / "registry_password").read_text().strip()
        reg = R.Reg(ADDR, PORT, f"https://{ADDR}:{PORT}", str(state / "ca" / "ca.pem"), "foo", pw,
                    "/opt/k8s/registry", None)
        store = Store(reg)
        store.push("fault/base", "v1", b"first image layer")
        store.push("fault/base", "v2", b"second image layer")
        store.push_index("fault/multi", "v1")
        yield {"reg": reg, "store": store, "state": state, "out": out, "params": params}
    finally:
        subprocess.run(["rm", "-rf", f"/etc/containers/certs.d/{ADDR}:{PORT}",
                        f"/etc/docker/certs.d/{ADDR}:{PORT}"], check=False)
        L.remove_host(NAME)
        ssh(RGW, f"radosgw-admin user rm --uid={UID} --purge-data >/dev/null 2>&1; true", timeout=120, check=False)


def _push_nb(env, expect_error=False, **kw):
    p = dict(env["params"], client="skopeo", **kw)
    p.pop("swift_subuser"), p.pop("container")
    return notebook("05-push", env["out"], expect_error=expect_error, **p)


def _v2(reg) -> int | str:
    try:
        return reg.session().get(reg.url + "/v2/", timeout=5).status_code
    except requests.RequestException as e:
        return type(e).__name__


def _wait(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last is True:
            return
        time.sleep(interval)
    pytest.fail(f"{what} within {timeout:.0f}s (last: {last})")


# --------------------------------------------------------------------------- 1. RGW killed during a push
def test_rgw_killed_during_push(env):
    reg, store, out = env["reg"], env["store"], env["out"]
    pushed = {}

    def slow_push():
        # a 24 MB layer sent in pieces: RGW dies while it is in flight
        def body():
            for _ in range(24):
                yield os.urandom(1 << 20)
                time.sleep(0.1)
        s = reg.session()
        try:
            r = s.post(f"{reg.url}/v2/fault/during/blobs/uploads/", timeout=30)
            loc = r.headers["Location"]
            r = s.patch(loc if loc.startswith("http") else reg.url + loc, data=body(), timeout=60,
                        headers={"Content-Type": "application/octet-stream"})
            pushed["status"] = r.status_code
        except requests.RequestException as e:
            pushed["status"] = type(e).__name__

    from runbook_lib import lab as L
    route = ["ip", "route", "add", "prohibit", f"{RGW}/32"]
    try:
        t = threading.Thread(target=slow_push)
        t.start()
        time.sleep(0.8)
        ssh(RGW, "kill -9 $(systemctl show -p MainPID --value ceph-radosgw@rgw.ceph1)")
        # RGW is shared (other suites restart it): from here on the bench host alone loses its route to RGW,
        # so the registry keeps seeing its storage gone while ceph1's RGW comes back for everyone else.
        L.host_exec(NAME, route)
        t.join(90)
        assert pushed.get("status") != 202, "the registry accepted an upload while its storage was gone"
        # a push through the runbook fails with an error that names the cause
        nb, err = _push_nb(env, expect_error=True, image_name="fault/after:v1")
        text = outputs_text(nb) + str(err)
        assert "storage driver failed" in text or "503" in text, text[-1500:]
    finally:
        if not rgw_answers():
            notebook("01-rgw", out)  # RGW down for a few seconds only
    assert rgw_answers()
    try:
        # the registry reports unhealthy: 503 after the health threshold (3 checks, 10 s apart; bounded wait)
        _wait(lambda: _v2(reg) == 503 or _v2(reg), HEALTH_WAIT, "the registry answers 503 while RGW is unreachable", 1)
        # the FAQ names the cause
        faq, _ = notebook("07-faq", out, expect_error="any", **env["params"])
        ftext = outputs_text(faq)
        # RGW is blocked from the registry host only (the control node still reaches it): the FAQ names that
        assert "rgw-unreachable-from-registry" in ftext, ftext[-2000:]
    finally:
        L.host_exec(NAME, ["ip", "route", "del", "prohibit", f"{RGW}/32"], check=False)
    # the health check recovers (next check, <= 10 s) and the push now succeeds
    _wait(lambda: _v2(reg) == 200 or _v2(reg), HEALTH_WAIT, "the registry healthy again after RGW restarted", 1)
    nb, _ = _push_nb(env, image_name="fault/after:v1")
    assert "VERDICT 05-push: PASS" in outputs_text(nb)
    store.assert_all_pull()


# --------------------------------------------------------------------------- 2. the registry killed
def _deploy_changes(env) -> dict:
    """deploy.ipynb on faultreg (skopeo pushes) -> {section: "changed" | "no change"}; it must pass."""
    import re
    p = {k: v for k, v in env["params"].items() if k != "swift_subuser"}  # deploy derives it from uid
    nb, _ = notebook("deploy", env["out"], client="skopeo", image_name="fault/deployed:v1", **p)
    text = outputs_text(nb)
    assert "VERDICT deploy: PASS" in text, text[-2000:]
    return dict(re.findall(r"▶ (\S+) \.\.\.\n\s+PASS in [\d.]+s, (changed|no change)", text))


def test_registry_killed_comes_back(env):
    reg, store = env["reg"], env["store"]
    # the process dies (kill -9 of the container's main process): --restart always brings it back
    pid = ssh(ADDR, "docker inspect --format '{{.State.Pid}}' registry").stdout.strip()
    ssh(ADDR, f"kill -9 {pid}")
    _wait(lambda: _v2(reg) == 200 or _v2(reg), 30, "the registry back after its process was killed", 0.3)
    store.assert_all_pull()
    # docker kill (a manual stop: the restart policy does not apply): re-running the deploy notebook brings
    # it back, and changes nothing else
    _deploy_changes(env)  # everything deployed (05 pushes its image the first time)
    ssh(ADDR, "docker kill registry >/dev/null")
    _wait(lambda: _v2(reg) != 200, 10, "the registry down after docker kill", 0.2)
    changes = _deploy_changes(env)
    assert changes == {"01-rgw": "no change", "02-accounts": "no change", "03-certs": "no change",
                       "04-registry": "changed", "05-push": "no change"}, changes
    assert _v2(reg) == 200
    store.assert_all_pull()
    # the host reboots (dockerd stopped as a shutdown does, started as at boot): the registry comes back by
    # its restart policy with its data (in RGW), and a deploy re-run finds nothing to do
    from runbook_lib import lab as L
    started = "docker inspect --format '{{.State.StartedAt}}' registry"
    before = ssh(ADDR, started).stdout.strip()
    L.restart_docker(NAME)
    _wait(lambda: _v2(reg) == 200 or _v2(reg), 60, "the registry back after the host's docker restarted", 0.3)
    assert ssh(ADDR, started).stdout.strip() != before  # a new start, not the old process
    store.assert_all_pull()
    assert set(_deploy_changes(env).values()) == {"no change"}


# --------------------------------------------------------------------------- 2b. the hosts reboot
def test_hosts_reboot_and_services_come_back_by_their_units(env):
    """lab.reboot: the registry host, then the RGW host, power off through systemd and boot the same
    root filesystem.  docker.service starts the registry container again (--restart always) and
    ceph-radosgw@rgw.ceph1 starts RGW: nothing is re-run, and every stored image pulls by digest."""
    from runbook_lib import lab as L
    reg, store = env["reg"], env["store"]
    for host in (NAME, "ceph1"):
        init = L.host_pid(host)
        L.reboot(host)
        assert L.host_pid(host) != init  # a new systemd: really booted again
    assert L.hosts()["ceph1"] == RGW
    for unit in ("ceph-mon@a", "ceph-osd@0", "ceph-radosgw@rgw.ceph1"):
        _wait(lambda: ssh(RGW, f"systemctl is-active {unit}", check=False).stdout.strip() == "active", 60,
              f"{unit} active after the reboot", 0.5)
    assert ssh(ADDR, "systemctl is-active docker").stdout.strip() == "active"
    _wait(rgw_answers, 90, "RGW answering after the reboot", 0.5)
    _wait(lambda: _v2(reg) == 200 or _v2(reg), HEALTH_WAIT, "the registry healthy after both reboots", 1)
    store.assert_all_pull()


# --------------------------------------------------------------------------- 3. sshd dies mid-run
def _session_sshds() -> set[int]:
    """The per-connection sshd processes of faultreg (children of its listener, which systemd started),
    not the listener."""
    from runbook_lib import lab as L
    init = L.host_pid(NAME)
    sshd = {}
    for p in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            st = (p / "stat").read_text()
            comm, ppid = st[st.index("(") + 1:st.rindex(")")], int(st[st.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if comm == "sshd":
            sshd[int(p.name)] = ppid
    listeners = {pid for pid, ppid in sshd.items() if ppid == init}
    sessions = {pid for pid, ppid in sshd.items() if ppid in listeners}  # the privileged monitor
    return sessions | {pid for pid, ppid in sshd.items() if ppid in sessions}  # and the user's half


def test_sshd_session_dies_mid_run(env, tmp_path):
    """The SSH session to faultreg dies (its per-connection sshd killed; the listener stays, as when sshd
    restarts).  Mid-command: HostUnreachable naming the host.  Between commands: the host layer reconnects,
    so a notebook run whose session is cut still completes; a re-run resumes with nothing left to do."""
    from runbook_lib import lab as L
    from runbook_lib.errors import HostUnreachable
    from runbook_lib.host import Command
    h = lab_host(ADDR)
    try:
        before = _session_sshds()
        h.run(Command("true"), read=True)
        mine = _session_sshds() - before
        assert mine
        box = {}
        t = threading.Thread(target=lambda: box.update(r=_try(lambda: h.run(Command("sleep 5"), read=True))))
        t.start()
        time.sleep(0.5)
        for pid in mine:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        t.join(20)
        assert isinstance(box.get("r"), HostUnreachable), box
        assert ADDR in str(box["r"]) and "connection lost" in str(box["r"])
        assert h.run(Command("hostname"), read=True).stdout.strip() == NAME  # the next command reconnects
    finally:
        h.close()
    # a notebook run whose session is cut while it runs
    before = _session_sshds()
    killed, stop = [], threading.Event()

    def killer():
        while not stop.is_set():
            new = _session_sshds() - before
            if new:
                time.sleep(0.05)
                for pid in new:
                    subprocess.run(["kill", "-9", str(pid)], check=False)
                killed.extend(new)
                return
            time.sleep(0.01)

    t = threading.Thread(target=killer)
    t.start()
    try:
        nb, err = notebook("04-registry", env["out"], expect_error="any", **env["params"])
    finally:
        stop.set()
        t.join(5)
    assert killed, "no SSH session to faultreg was seen"
    text = outputs_text(nb)
    if err is not None:  # cut mid-command: the error names the host and the failed step is shown
        assert "HostUnreachable" in text and ADDR in text and "✘ failed" in text, text[-2000:]
    else:
        assert "VERDICT 04-registry: PASS" in text
    nb, _ = notebook("04-registry", env["out"], **env["params"])  # the re-run resumes
    assert "VERDICT 04-registry: PASS" in outputs_text(nb)
    env["store"].assert_all_pull()


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


# --------------------------------------------------------------------------- 4. GC with concurrent pushes
def test_gc_with_concurrent_pushes(env):
    reg, store = env["reg"], env["store"]
    # something for GC to collect: an image with its own layer, deleted (its shared layer stays in use)
    d = store.push("fault/gone", "v1", b"layer only the deleted image has")
    del store.images[("fault/gone", "v1")]
    assert reg.session().delete(f"{reg.url}/v2/fault/gone/manifests/{d}").status_code == 202
    results, stop = [], threading.Event()

    def pusher():
        i = 0
        while not stop.is_set():
            tag = f"c{i}"
            try:
                dg = Store(reg).push("fault/concurrent", tag, f"concurrent {i} {time.time()}".encode())
                results.append((tag, dg))
            except (requests.RequestException, KeyError, AssertionError) as e:
                results.append((tag, f"refused: {type(e).__name__}"))
            i += 1
            time.sleep(0.05)

    t = threading.Thread(target=pusher)
    t.start()
    try:
        nb, _ = notebook("06-operations", env["out"], gc=True, repository="fault/base", tag="v1",
                         **{k: v for k, v in env["params"].items() if k not in ("container", "swift_subuser")})
    finally:
        stop.set()
        t.join(30)
    text = outputs_text(nb)
    assert "VERDICT 06-operations: PASS" in text, text[-2000:]
    assert "registry restarted" in text or "nothing to collect" in text
    ok = [(tag, dg) for tag, dg in results if dg.startswith("sha256:")]
    assert ok, results[:5]
    for tag, dg in ok:  # every push the registry acknowledged is still whole after GC
        store.images[("fault/concurrent", tag)] = dg
    store.assert_all_pull()
    gone = reg.session().get(f"{reg.url}/v2/fault/gone/manifests/v1")
    assert gone.status_code == 404


# --------------------------------------------------------------------------- 5. disk nearly full
FS_NAME, FS_ADDR = "faultfs", "198.18.0.72"


def test_disk_nearly_full_filesystem(env, tmp_path):
    """A filesystem-storage registry deployed by 03/04 on its own host, its data directory a 20 MB tmpfs:
    once the disk is nearly full, 05-push fails and says the storage is full (df on the registry host),
    and what was stored before still pulls."""
    from runbook_lib import lab as L
    state, out = tmp_path / "state", env["out"]
    L.add_host(FS_NAME, FS_ADDR, docker=True)
    data = "/opt/k8s/registry/data"  # 04's remote_dir/data: the volume behind rootdirectory
    try:
        ssh(FS_ADDR, f"mkdir -p {data} && mount -t tmpfs -o size=20m tmpfs {data}")
        p = dict(registry_host=FS_ADDR, state_dir=str(state), client="skopeo")
        notebook("03-certs", out, registry_host=FS_ADDR, state_dir=str(state))
        notebook("04-registry", out, storage="filesystem", registry_host=FS_ADDR, state_dir=str(state))
        notebook("05-push", out, image_name="fault/small:v1", **p)
        pw = (state / "secrets" / "registry_password").read_text().strip()
        fs = R.Reg(FS_ADDR, PORT, f"https://{FS_ADDR}:{PORT}", str(state / "ca" / "ca.pem"), "foo", pw,
                   "/opt/k8s/registry", data)
        small = Store(fs)
        small.images[("fault/small", "v1")] = small.pull("fault/small", "v1")
        small.push("fault/small", "v2", b"small layer")
        # nearly full: ~200 KiB left, then the runbook pushes an image with a new ~1 MB layer
        ssh(FS_ADDR, f"avail=$(df -k --output=avail {data} | tail -1); "
                     f"dd if=/dev/zero of={data}/filler bs=1k count=$((avail - 200)) status=none")
        nb, err = notebook("05-push", out, expect_error=True, image_name="fault/big:v1", **p)
        text = outputs_text(nb)
        assert err is not None and "skopeo copy" in text, text[-2000:]
        assert "the registry's storage is full" in text and f"{data} on {FS_ADDR}" in text, text[-2000:]
        assert "free space there or grow the volume" in text
        small.assert_all_pull()  # nothing stored before is lost or corrupt
        ssh(FS_ADDR, f"rm -f {data}/filler")  # space again: the same push now works
        nb, _ = notebook("05-push", out, image_name="fault/big:v1", **p)
        assert "VERDICT 05-push: PASS" in outputs_text(nb)
        small.assert_all_pull()
        env["store"].assert_all_pull()
    finally:
        ssh(FS_ADDR, f"docker rm -f registry >/dev/null 2>&1; umount {data}; true", check=False)
        L.remove_host(FS_NAME)
        subprocess.run(["rm", "-rf", f"/etc/containers/certs.d/{FS_ADDR}:{PORT}",
                        f"/etc/docker/certs.d/{FS_ADDR}:{PORT}"], check=False)
