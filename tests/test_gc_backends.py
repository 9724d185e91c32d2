"""Garbage collection on the other storage backends and runtimes (issue: "Works for the docker and
systemd runtimes and for swift, s3 and filesystem storage"; swift + docker is test_operations.py).

On an extra lab host, gcback (198.18.0.45, own dockerd), with its own state dir (CA, password),
each case deploys with 04-registry, pushes two images that share a layer and each hold a unique
1 MiB random layer, deletes one by tag (06-operations delete_tag=...), collects (06-operations
gc=True) and proves: bytes freed (the notebook's own measurement and ours: `du -sb` on the host,
or `radosgw-admin bucket stats` on ceph1), the other image pulls whole, the registry answers
again, and re-pushing the deleted image works (the restart flushed the blob-descriptor cache).
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import time

import pytest
import requests

from helpers import tar_gz as _tar_gz  # noqa: E402
from helpers import lab_ssh, rgw_answers  # noqa: E402
from conftest import LAB_PARAMS, execute, outputs_text

pytestmark = pytest.mark.lab

NAME, ADDR, PORT = "gcback", "198.18.0.45", 8000
REGISTRY = f"{ADDR}:{PORT}"
RGW = LAB_PARAMS["rgw_host"]
UID = LAB_PARAMS["uid"]
BUCKET = "gcback-s3"  # RGW bucket names are global: one nobody else uses
REPO = "gcback/app"
MiB = 1 << 20
# (storage, runtime, where the data is on gcback: du -sb; None = the RGW bucket)
CASES = [
    ("filesystem", "systemd", "/var/lib/docker-registry"),  # Debian's package and its unit
    ("s3", "docker", None),
    ("filesystem", "docker", "/opt/k8s/registry/data"),
]
# teardown of whatever registry a previous case left: the container, 04's daemon, their data
RESET = ("docker rm -f registry >/dev/null 2>&1; systemctl disable --now docker-registry >/dev/null 2>&1; "
         "pid=$(cat /run/docker-registry.pid 2>/dev/null) && kill \"$pid\" 2>/dev/null && "
         "for i in $(seq 50); do kill -0 \"$pid\" 2>/dev/null || break; sleep 0.1; done; "
         "rm -f /run/docker-registry.pid /run/docker-registry.config-sha256; "
         "rm -rf /var/lib/docker-registry/* /opt/k8s/registry/data; true")


# ---------------------------------------------------------------------------- helpers
ssh = lab_ssh  # root on a lab host, outside the runbook


def notebook(name: str, out_dir, timeout: float = 180, **params) -> dict:
    """A section notebook headless (papermill + runbook engine), for the module fixture
    (run_notebook is function-scoped)."""
    return execute(name, out_dir, timeout=timeout, **params)[0]


def has_s3_key() -> bool:
    r = ssh(RGW, f"radosgw-admin user info --uid={UID}", check=False)
    return r.returncode == 0 and bool(json.loads(r.stdout).get("keys"))


def purge_bucket():
    ssh(RGW, f"radosgw-admin bucket rm --bucket={BUCKET} --purge-objects >/dev/null 2>&1; true", timeout=120,
        check=False)


def stored_bytes(root: str | None) -> int:
    """What the registry's storage holds now, measured outside the runbook."""
    if root is None:
        r = ssh(RGW, f"radosgw-admin bucket stats --bucket={BUCKET}")
        usage = json.loads(r.stdout).get("usage") or {}
        return sum(int(u.get("size_actual", 0)) for u in usage.values())
    return int(ssh(ADDR, f"du -sb {root}").stdout.split()[0])


def oci_layout(path) -> dict:
    """An OCI layout with images `keep` and `gone`: one shared small layer, and each a unique
    1 MiB random layer.  -> {"keep"/"gone": unique layer digest}."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs)

    def blob(data: bytes, mt: str) -> dict:
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(data)
        return {"mediaType": mt, "digest": "sha256:" + d, "size": len(data)}

    shared = _tar_gz({"etc/shared": b"the layer both images use\n"})
    index, unique = [], {}
    for tag in ("keep", "gone"):
        own = _tar_gz({f"data/{tag}": os.urandom(MiB)})
        layers = [blob(x, "application/vnd.oci.image.layer.v1.tar+gzip") for x in (shared, own)]
        unique[tag] = layers[1]["digest"]
        diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(x)).hexdigest() for x in (shared, own)]
        cfg = {"created": "2024-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
               "config": {"Cmd": ["/bin/true"], "Labels": {"tag": tag}},
               "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        c = blob(json.dumps(cfg, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
        m = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                             "config": c, "layers": layers}, sort_keys=True).encode(),
                 "application/vnd.oci.image.manifest.v1+json")
        m["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index.append(m)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": index}, f)
    return unique


class Skopeo:
    """skopeo with our CA (--*-cert-dir) and an 0600 authfile: the password never on a command line."""

    def __init__(self, tmp, ca_pem: str, user: str, password: str):
        self.certs = tmp / "certs"
        self.certs.mkdir()
        shutil.copy(ca_pem, self.certs / "ca.crt")
        self.auth = tmp / "auth.json"
        fd = os.open(self.auth, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": {REGISTRY: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}, f)
        self.tmp = tmp

    def push(self, src: str, dest: str) -> str:
        dfile = self.tmp / "digest"
        p = subprocess.run(["skopeo", "copy", "-q", "--format", "v2s2", "--dest-cert-dir", str(self.certs),
                            "--dest-authfile", str(self.auth), "--digestfile", str(dfile), src,
                            f"docker://{REGISTRY}/{dest}"], timeout=60, capture_output=True, text=True)
        assert p.returncode == 0, f"skopeo push {dest}: {p.stderr[-800:]}"
        return dfile.read_text().strip()

    def pull_digest(self, ref: str) -> str:
        """Copy to a dir (every blob's digest is checked by skopeo); the manifest's sha256."""
        d = self.tmp / "pull"
        shutil.rmtree(d, ignore_errors=True)
        p = subprocess.run(["skopeo", "copy", "-q", "--src-cert-dir", str(self.certs), "--src-authfile",
                            str(self.auth), f"docker://{REGISTRY}/{ref}", f"dir:{d}"],
                           timeout=60, capture_output=True, text=True)
        assert p.returncode == 0, f"skopeo pull {ref}: {p.stderr[-800:]}"
        return "sha256:" + hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- the host
@pytest.fixture(scope="module")
def gcback(lab, tmp_path_factory):
    """gcback with its own dockerd, certificates from 03-certs for it (own state dir: the shared
    one's server certificate is registry1's), RGW and the S3 key checked, the images built."""
    from runbook_lib import lab as L
    t0 = time.monotonic()
    state = tmp_path_factory.mktemp("gcback-state")
    state.chmod(0o700)
    out = tmp_path_factory.mktemp("gcback-nb")
    if NAME in L.hosts():
        L.remove_host(NAME)  # a leftover of an interrupted run: start clean
    L.add_host(NAME, ADDR, docker=True)
    try:
        if not rgw_answers():
            notebook("01-rgw", out)
        if not has_s3_key():
            notebook("02-accounts", out, state_dir=str(state))
        purge_bucket()
        notebook("03-certs", out, registry_host=ADDR, state_dir=str(state))
        layout = tmp_path_factory.mktemp("gcback-images") / "layout"
        unique = oci_layout(str(layout))
        print(f"\ngcback fixture: {time.monotonic() - t0:.1f} s")
        yield {"state": state, "src": f"oci:{layout}:", "unique": unique}
    finally:
        L.remove_host(NAME)
        purge_bucket()


def _context(state):
    from runbook_lib.context import Context
    params = dict(LAB_PARAMS, registry_host=ADDR, registry_port=PORT, dry_run=False, state_dir=str(state))
    return Context("06-operations", params)


def _v2(ca: str, auth=None) -> int:
    s = requests.Session()
    s.trust_env = False  # REQUESTS_CA_BUNDLE would win over verify=
    s.verify = ca
    return s.get(f"https://{REGISTRY}/v2/", auth=auth, timeout=5).status_code


@pytest.mark.parametrize("storage,runtime,root", CASES, ids=[f"{s}-{r}" for s, r, _ in CASES])
def test_gc_frees_space_and_keeps_the_rest(gcback, run_notebook, storage, runtime, root, tmp_path):
    t = {"start": time.monotonic()}
    state = gcback["state"]
    base = dict(registry_host=ADDR, registry_port=PORT, state_dir=str(state))
    ssh(ADDR, RESET)

    nb, _, _ = run_notebook("04-registry", **base, storage=storage, runtime=runtime,
                            **({"container": BUCKET} if storage == "s3" else {}))
    assert "VERDICT 04-registry: PASS" in outputs_text(nb)
    t["deploy"] = time.monotonic()

    from runbook_lib import certs
    ctx = _context(state)
    ca, user = certs.ca_path(ctx), ctx.registry_user
    password = ctx.secret("registry_password", generate=False, user=user)
    assert password, "04-registry left no registry password in the state dir"
    sk = Skopeo(tmp_path, ca, user, password)
    pushed = {tag: sk.push(gcback["src"] + tag, f"{REPO}:{tag}") for tag in ("keep", "gone")}
    assert pushed["keep"] != pushed["gone"]
    before = stored_bytes(root)
    assert before >= 2 * MiB, before
    t["push"] = time.monotonic()

    nb, _, _ = run_notebook("06-operations", **base, repository=REPO, tag="keep", delete_tag="gone")
    text = outputs_text(nb)
    assert "VERDICT 06-operations: PASS" in text, text[-2000:]
    assert pushed["gone"] in text  # the plan resolved the tag to the pushed digest
    s = requests.Session()
    s.trust_env, s.verify, s.auth = False, ca, (user, password)
    assert s.get(f"https://{REGISTRY}/v2/{REPO}/tags/list", timeout=5).json()["tags"] == ["keep"]
    assert stored_bytes(root) > before - MiB  # a delete frees nothing
    t["delete"] = time.monotonic()

    nb, _, _ = run_notebook("06-operations", **base, repository=REPO, tag="keep", gc=True)
    text = outputs_text(nb)
    assert "VERDICT 06-operations: PASS" in text, text[-2000:]
    where = {"systemd": "systemd unit docker-registry", "docker": "container registry"}[runtime]
    assert where in text, text[-3000:]  # GC found the runtime 04 deployed, not assumed
    assert "registry restarted" in text
    m = re.search(r"freed: [^\n]*?\((-?\d+) bytes\)", text)
    assert m, f"no 'freed' measurement in the GC step:\n{text[-3000:]}"
    freed_nb = int(m.group(1))
    after = stored_bytes(root)
    assert freed_nb >= MiB, freed_nb  # the 1 MiB layer at least
    assert before - after >= MiB, (before, after)
    t["gc"] = time.monotonic()

    # the registry is back (TLS, auth on), the collected layer is gone, the kept image whole
    assert _v2(ca) == 401 and _v2(ca, (user, password)) == 200
    head = s.head(f"https://{REGISTRY}/v2/{REPO}/blobs/{gcback['unique']['gone']}", timeout=5)
    assert head.status_code == 404, head.status_code
    assert s.head(f"https://{REGISTRY}/v2/{REPO}/blobs/{gcback['unique']['keep']}", timeout=5).status_code == 200
    assert sk.pull_digest(f"{REPO}:keep") == pushed["keep"]
    # re-push of the collected image: a stale blob-descriptor cache would skip its layer and
    # the pull would then fail (manifest/blob unknown)
    assert sk.push(gcback["src"] + "gone", f"{REPO}:gone") == pushed["gone"]
    assert sk.pull_digest(f"{REPO}:gone") == pushed["gone"]
    assert stored_bytes(root) - after >= MiB  # really stored again, not claimed from a cache
    t["verify"] = time.monotonic()

    # GC's restart kept 04's state (container label / daemon hash file): a re-run of 04 changes nothing
    nb, _, _ = run_notebook("04-registry", **base, storage=storage, runtime=runtime,
                            **({"container": BUCKET} if storage == "s3" else {}))
    assert "config unchanged" in outputs_text(nb), outputs_text(nb)[-2000:]
    t["redeploy"] = time.monotonic()

    keys = list(t)
    print(f"\n{storage}/{runtime}: " + ", ".join(f"{b} {t[b] - t[a]:.1f}s" for a, b in zip(keys, keys[1:]))
          + f"; total {t[keys[-1]] - t['start']:.1f}s; freed {freed_nb} bytes (notebook), {before - after} (ours)")
