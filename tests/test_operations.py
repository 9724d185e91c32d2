"""Section 6 (operations) against the real lab registry (198.18.0.3:8000, deployed by 01..04).

Images are pushed with skopeo under `opstest/` (never the push section's prom/node-exporter):
shared layers, several tags on one digest, a docker v2 and an OCI image, and a
multi-platform OCI index written by hand as an OCI layout.
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

from runbook_lib import journal, masking
from runbook_lib import operations as ops
from runbook_lib.context import Context
from runbook_lib.errors import ParameterError

from helpers import tar_gz as _tar_gz  # noqa: E402
from conftest import LAB_PARAMS, NOTEBOOKS, ROOT, execute, outputs_text

# Another lab host/bucket may be given (RUNBOOK_OPS_REGISTRY_HOST, RUNBOOK_OPS_CONTAINER) to test
# away from the shared registry; by default: the lab's registry1 and the document's bucket.
REG_HOST = os.environ.get("RUNBOOK_OPS_REGISTRY_HOST", LAB_PARAMS["registry_host"])
REG_CONTAINER = os.environ.get("RUNBOOK_OPS_CONTAINER", "registry")
REG_STORAGE = os.environ.get("RUNBOOK_OPS_STORAGE", "swift")
REGISTRY = f"{REG_HOST}:{LAB_PARAMS['registry_port']}"
HOST_PARAMS = {"registry_host": REG_HOST}
OPS_DEFAULTS = dict(repository="prom/node-exporter", tag="v0.16.0", page_size=100, delete_tag="", delete_layer="",
                    force=False, gc=False, delete_untagged=False, keep_last=0, tag_filter="")


# ---------------------------------------------------------------------------- pure functions
def test_parse_link():
    assert ops.parse_link('</v2/_catalog?last=b&n=2>; rel="next"') == "/v2/_catalog?last=b&n=2"
    assert ops.parse_link('<https://x/a>; rel="prev", </b>; rel=next') == "/b"
    assert ops.parse_link(None) is None and ops.parse_link('</a>; rel="prev"') is None


def test_reference_problem_and_params():
    assert ops.reference_problem("v0.16.0") is None
    assert ops.reference_problem("sha256:" + "a" * 64) is None
    assert "not a valid digest" in ops.reference_problem("sha256:abc")
    assert "not a valid tag" in ops.reference_problem("-bad")
    from runbook_lib import params as P
    assert "PAGINATION" in P._value_problem("page_size", 1001)
    assert P._value_problem("repository", "opstest/*") is None
    assert "regular expression" in P._value_problem("tag_filter", "v(")
    assert "layer digest" in P._value_problem("delete_layer", "sha256:xyz")
    assert P._value_problem("delete_tag", "") is None


def test_summarize_manifest_schema1_and_index():
    s1 = {"schemaVersion": 1, "fsLayers": [{"blobSum": "sha256:" + "1" * 64}]}
    assert ops.summarize_manifest(s1)["layers"][0]["digest"] == "sha256:" + "1" * 64
    idx = {"schemaVersion": 2, "mediaType": ops.OCI_INDEX, "manifests": [
        {"digest": "sha256:" + "2" * 64, "mediaType": ops.OCI_MANIFEST, "size": 1,
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}]}
    assert ops.summarize_manifest(idx)["platforms"][0]["platform"] == "linux/arm64/v8"


def test_choose_retention_never_deletes_a_shared_digest():
    import datetime as dt
    t = lambda d: dt.datetime(2024, 1, d, tzinfo=dt.timezone.utc)  # noqa: E731
    tags = [{"tag": "v1", "digest": "A", "created": t(1)}, {"tag": "old", "digest": "A", "created": t(1)},
            {"tag": "v2", "digest": "B", "created": t(2)}, {"tag": "v3", "digest": "C", "created": t(3)},
            {"tag": "keepme", "digest": "B", "created": t(2)}]
    r = ops.choose_retention(tags, 1, r"^v")
    assert r["keep"] == ["v3"]
    assert r["delete"] == {}  # A is also 'old', B also 'keepme': neither matches ^v
    assert set(r["spared"]) == {"A", "B"}
    r = ops.choose_retention(tags, 1)
    assert r["keep"] == ["v3"] and r["delete"] == {"A": ["old", "v1"], "B": ["keepme", "v2"]}


def test_parse_gc_output_and_bucket_stats():
    out = ("a: marking manifest sha256:1\nblob eligible for deletion: sha256:" + "f" * 64 +
           "\n3 blobs marked, 1 blobs and 2 manifests eligible for deletion\n")
    g = ops.parse_gc_output(out)
    assert (g["marked"], g["blobs_eligible"], g["manifests_eligible"]) == (3, 1, 2) and len(g["blobs"]) == 1
    g = ops.parse_gc_output("opstest/multi\nopstest/multi: marking manifest sha256:1 \n"
                            "manifest eligible for deletion: sha256:2\n")
    assert g["manifests"] == [{"repository": "opstest/multi", "digest": "sha256:2"}]
    st = json.dumps({"usage": {"rgw.main": {"size_actual": 4096, "num_objects": 2},
                               "rgw.multimeta": {"size_actual": 0, "num_objects": 1}}})
    assert ops.parse_bucket_stats(st) == {"bytes": 4096, "objects": 3}


def test_session_ignores_requests_ca_bundle(monkeypatch, tmp_path):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    c = ops.RegistryClient("https://198.18.0.3:8000", str(tmp_path / "ca.pem"), "u", "a-password-x")
    assert c.session.trust_env is False and c.session.verify == str(tmp_path / "ca.pem")
    assert c.session.adapters["https://"]._pool_maxsize >= 16
    assert masking.mask("x a-password-x") == "x ****"


# ---------------------------------------------------------------------------- OCI layouts by hand
class Layout:
    """An OCI image layout (oci-layout, index.json, blobs/sha256) that skopeo copies from."""

    def __init__(self, path):
        self.path = str(path)
        os.makedirs(os.path.join(self.path, "blobs", "sha256"), exist_ok=True)
        with open(os.path.join(self.path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        self.index = {"schemaVersion": 2, "mediaType": ops.OCI_INDEX, "manifests": []}

    def blob(self, data: bytes, media_type: str) -> dict:
        d = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.path, "blobs", "sha256", d[7:]), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    def image(self, layers: list, created: str, arch: str = "amd64") -> dict:
        descs, diff_ids = [], []
        for files in layers:
            gz = _tar_gz(files)
            diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(gz)).hexdigest())
            descs.append(self.blob(gz, "application/vnd.oci.image.layer.v1.tar+gzip"))
        cfg = {"created": created, "architecture": arch, "os": "linux", "config": {"Cmd": ["/hello"]},
               "rootfs": {"type": "layers", "diff_ids": diff_ids}}
        c = self.blob(json.dumps(cfg, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
        m = {"schemaVersion": 2, "mediaType": ops.OCI_MANIFEST, "config": c, "layers": descs}
        d = self.blob(json.dumps(m, sort_keys=True).encode(), ops.OCI_MANIFEST)
        d["platform"] = {"architecture": arch, "os": "linux"}
        return d

    def multi(self, *images) -> dict:
        idx = {"schemaVersion": 2, "mediaType": ops.OCI_INDEX, "manifests": list(images)}
        return self.blob(json.dumps(idx, sort_keys=True).encode(), ops.OCI_INDEX)

    def tag(self, desc: dict, ref: str):
        d = dict(desc)
        d["annotations"] = {"org.opencontainers.image.ref.name": ref}
        self.index["manifests"].append(d)
        with open(os.path.join(self.path, "index.json"), "w") as f:
            json.dump(self.index, f)


# ---------------------------------------------------------------------------- the lab fixture
def _papermill(name, out_dir, **params):
    execute(name, out_dir / f"{name}.ipynb", **params)


class Skopeo:
    """skopeo with the CA (--*-cert-dir) and an 0600 authfile: the password never on a command line."""

    def __init__(self, tmp, ca_pem: str, user: str, password: str, registry: str = REGISTRY):
        self.certs = tmp / "certs"
        self.certs.mkdir(exist_ok=True)
        shutil.copy(ca_pem, self.certs / "ca.crt")
        self.auth = tmp / "auth.json"
        fd = os.open(self.auth, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": {registry: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}, f)
        self.tmp, self.registry = tmp, registry

    def push(self, src: str, dest: str, fmt: str | None = None, all_: bool = False, registry: str | None = None) -> str:
        dfile = self.tmp / "digest"
        argv = ["skopeo", "copy", "-q", "--dest-cert-dir", str(self.certs), "--dest-authfile", str(self.auth),
                "--digestfile", str(dfile)]
        argv += ["--format", fmt] if fmt else []
        argv += ["--all"] if all_ else []
        p = subprocess.run(argv + [src, f"docker://{registry or self.registry}/{dest}"], timeout=120,
                           capture_output=True, text=True)
        assert p.returncode == 0, f"skopeo push {dest}: {p.stderr}"
        return dfile.read_text().strip()

    def pull(self, ref: str, dest_dir) -> subprocess.CompletedProcess:
        shutil.rmtree(dest_dir, ignore_errors=True)
        return subprocess.run(["skopeo", "copy", "-q", "--all", "--src-cert-dir", str(self.certs), "--src-authfile",
                               str(self.auth), f"docker://{self.registry}/{ref}", f"dir:{dest_dir}"],
                              timeout=120, capture_output=True, text=True)


@pytest.fixture(scope="module")
def ops_lab(lab, state_dir, tmp_path_factory):
    """01..04 deployed (idempotent), a 06 context, skopeo, and the opstest/ images pushed."""
    out = tmp_path_factory.mktemp("ops-notebooks")
    for name in ("01-rgw", "02-accounts", "03-certs", "04-registry"):
        _papermill(name, out, **HOST_PARAMS, **({"container": REG_CONTAINER, "storage": REG_STORAGE} if name == "04-registry" else {}))
    params = {k: v for k, v in LAB_PARAMS.items()}
    params.update(HOST_PARAMS)
    params.update(dry_run=False, state_dir=str(state_dir), **OPS_DEFAULTS)
    ctx = Context("06-operations", params)
    c = ops.client(ctx)
    c.ping()
    tmp = tmp_path_factory.mktemp("skopeo")
    sk = Skopeo(tmp, c.ca_path, c.user, ctx.secret("registry_password", generate=False))
    # the push section's image, for the notebook's default run (05-push if it is there)
    if c.resolve("prom/node-exporter", "v0.16.0") is None and (NOTEBOOKS / "05-push.ipynb").exists():
        _papermill("05-push", out, **HOST_PARAMS)
    run = f"{int(time.time())}"  # unique content per session: GC has something real to free
    lay = Layout(tmp / "layout")
    base = {"etc/base.txt": b"shared base layer\n"}
    big = {"data/big.bin": os.urandom(1 << 20)}  # 1 MiB, incompressible: visible in RGW usage
    a = lay.image([base, {"app/a.txt": f"image a {run}\n".encode()}], "2024-01-01T00:00:00Z")
    b = lay.image([base, {"app/b.txt": f"image b {run}\n".encode()}], "2024-02-01T00:00:00Z")
    g = lay.image([base, big], "2024-02-15T00:00:00Z")  # its big layer is in no other image: GC frees it
    m = lay.multi(lay.image([{"p/amd.txt": f"amd64 {run}\n".encode()}], "2024-03-01T00:00:00Z", "amd64"),
                  lay.image([{"p/arm.txt": f"arm64 {run}\n".encode()}], "2024-03-01T00:00:00Z", "arm64"))
    olds = [lay.image([base, {"r.txt": f"r{i} {run}\n".encode()}], f"2024-0{i}-01T00:00:00Z") for i in (1, 2, 3)]
    lay.tag(a, "a"), lay.tag(b, "b"), lay.tag(g, "g"), lay.tag(m, "multi")
    for i, o in enumerate(olds, 1):
        lay.tag(o, f"r{i}")
    src = f"oci:{lay.path}:"
    pushed = {
        "alpha:v1": sk.push(src + "a", "opstest/alpha:v1", "v2s2"),
        "alpha:v1-alias": sk.push(src + "a", "opstest/alpha:v1-alias", "v2s2"),
        "alpha:v2": sk.push(src + "b", "opstest/alpha:v2", "v2s2"),
        "beta:oci": sk.push(src + "a", "opstest/beta:oci", "oci"),
        "gamma:big": sk.push(src + "g", "opstest/gamma:big", "v2s2"),
        "multi:latest": sk.push(src + "multi", "opstest/multi:latest", all_=True),
    }
    for i in (1, 2, 3):
        pushed[f"ret:r{i}"] = sk.push(src + f"r{i}", f"opstest/ret:r{i}", "v2s2")
    yield {"ctx": ctx, "client": c, "skopeo": sk, "pushed": pushed, "layout": lay, "tmp": tmp, "src": src}
    # leave the lab registry running whatever happened
    ops.wait_ready(ctx, timeout=30)


def _curl(client, path: str, accept: str | None = None) -> tuple[dict, str]:
    """The document's curl, with the password in a -K config on stdin (not in argv/ps)."""
    conf = (f'user = "{client.user}:{client.session.auth[1]}"\ncacert = "{client.ca_path}"\n'
            f'url = "{client.base_url}{path}"\n' + (f'header = "Accept: {accept}"\n' if accept else ""))
    p = subprocess.run(["curl", "-sS", "-D", "-", "-K", "-"], input=conf, capture_output=True, text=True,
                       timeout=30, check=True)
    head, _, body = p.stdout.replace("\r\n", "\n").partition("\n\n")
    digest = re.search(r"(?im)^docker-content-digest:\s*(\S+)", head)
    return json.loads(body), digest.group(1) if digest else ""


# ---------------------------------------------------------------------------- reads
def test_catalog_follows_pages(ops_lab):
    c = ops_lab["client"]
    names, pages = c.catalog(2)
    assert pages >= 3 and len(names) == len(set(names))
    assert {"opstest/alpha", "opstest/beta", "opstest/multi"} <= set(names)
    all_, one = c.catalog(1000)
    assert one == 1 and all_ == names
    curl, _ = _curl(c, "/v2/_catalog?n=1000")
    assert curl["repositories"] == names
    rep = ops.catalog(ops_lab["ctx"], 2)
    assert rep.status == "ok" and rep.facts["repositories"] == len(names)
    with pytest.raises(ops.RegistryError, match="PAGINATION_NUMBER_INVALID"):
        c.request("GET", "/v2/_catalog?n=1001")


def test_tags_and_digests_match_what_skopeo_pushed(ops_lab):
    c, ctx, pushed = ops_lab["client"], ops_lab["ctx"], ops_lab["pushed"]
    assert set(c.tags("opstest/alpha")) >= {"v1", "v1-alias", "v2"}
    for ref, digest in pushed.items():
        repo, tag = ref.split(":")
        img = ops.image(ctx, f"opstest/{repo}", tag).value
        assert img.digest == digest, ref
        assert c.resolve(f"opstest/{repo}", tag) == digest
    a, b = c.image("opstest/alpha", "v1"), c.image("opstest/alpha", "v2")
    assert a.media_type == ops.DOCKER_V2 and a.config and a.layers[0]["digest"] == b.layers[0]["digest"]  # shared
    assert c.image("opstest/beta", "oci").media_type == ops.OCI_MANIFEST
    m = c.image("opstest/multi", "latest")
    assert m.media_type == ops.OCI_INDEX and sorted(p["platform"] for p in m.platforms) == ["linux/amd64",
                                                                                            "linux/arm64"]
    rows = ops.image(ctx, "opstest/multi", "latest").rows
    assert len([r for r in rows if r["kind"].startswith("platform")]) == 2


def test_curl_gives_the_same_answers(ops_lab):
    c = ops_lab["client"]
    tags, _ = _curl(c, "/v2/opstest/alpha/tags/list")
    assert sorted(tags["tags"]) == sorted(c.tags("opstest/alpha"))
    for repo, tag in (("opstest/alpha", "v2"), ("opstest/beta", "oci"), ("opstest/multi", "latest")):
        body, digest = _curl(c, f"/v2/{repo}/manifests/{tag}", ops.ACCEPT)
        img = c.image(repo, tag)
        assert digest == img.digest and body == img.manifest
    # the document's single Accept type: an OCI image is then unknown (404)
    p = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-K", "-"], text=True,
                       capture_output=True, input=(f'user = "{c.user}:{c.session.auth[1]}"\ncacert = "{c.ca_path}"\n'
                                                   f'url = "{c.base_url}/v2/opstest/beta/manifests/oci"\n'
                                                   f'header = "Accept: {ops.DOCKER_V2}"\n'))
    assert p.stdout == "404"


def test_bad_input_is_a_clear_message_and_deletes_nothing(ops_lab):
    c, ctx = ops_lab["client"], ops_lab["ctx"]
    before = {r: sorted(c.tags(r)) for r in ("opstest/alpha", "opstest/beta")}
    with pytest.raises(ops.RegistryError, match=r"opstest/nope.*NAME_UNKNOWN") as e:
        ops.tags(ctx, "opstest/nope")
    assert e.value.code == "NAME_UNKNOWN"
    with pytest.raises(ops.RegistryError, match=r"does not exist.*MANIFEST_UNKNOWN") as e:
        ops.image(ctx, "opstest/alpha", "no-such-tag")
    assert "v1-alias" in e.value.hint
    with pytest.raises(ParameterError, match="delete_tag: 'sha256:zz' is not a valid digest"):
        ops.plan_delete(ctx, "opstest/alpha", "sha256:zz")
    with pytest.raises(ParameterError, match="delete_layer"):
        ops.delete_layer(ctx, "opstest/alpha", "sha256:abc")
    with pytest.raises(ops.RegistryError, match="NAME_UNKNOWN"):
        ops.plan_delete(ctx, "opstest/nope", "v1")
    # an unknown tag to delete: nothing to do, said so (and a re-run after a delete stays ok)
    rep = ops.plan_delete(ctx, "opstest/alpha", "no-such-tag")
    assert rep.status == "ok" and not rep.value.items and "does not exist" in rep.message
    # 2.x: DELETE by tag name is 400 DIGEST_INVALID, explained
    with pytest.raises(ops.RegistryError, match="DIGEST_INVALID") as e:
        c.request("DELETE", "/v2/opstest/alpha/manifests/v1", ok=(202,))
    assert "resolve the tag" in e.value.hint
    assert {r: sorted(c.tags(r)) for r in before} == before


def test_bad_parameters_stop_the_notebook_before_anything(run_notebook, ops_lab):
    nb, _, err = run_notebook("06-operations", expect_error=True, **HOST_PARAMS, repository="opstest/alpha", delete_tag="sha256:zz",
                              page_size=5000)
    text = outputs_text(nb)
    assert "delete_tag" in text and "page_size" in text and "nothing was changed" in text
    assert "v1" in ops_lab["client"].tags("opstest/alpha")


# ---------------------------------------------------------------------------- deletes
def test_layer_delete_refused_while_a_tagged_image_uses_it(ops_lab):
    c, ctx = ops_lab["client"], ops_lab["ctx"]
    layer = c.image("opstest/alpha", "v2").layers[0]["digest"]  # the base layer, shared with v1
    with pytest.raises(ops.RegistryError, match="refusing") as e:
        ops.delete_layer(ctx, "opstest/alpha", layer)
    assert "opstest/alpha:v1" in str(e.value) and "opstest/alpha:v2" in str(e.value)
    assert c.blob_exists("opstest/alpha", layer)
    # dry-run with force: journaled as skipped, not sent
    rep = ops.delete_layer(ctx, "opstest/alpha", layer, force=True, dry_run=True)
    assert rep.status == "would change" and c.blob_exists("opstest/alpha", layer)
    http = [r for r in rep.results if r.kind == "http"]
    assert http and http[0].skipped and http[0].command == f"DELETE /v2/opstest/alpha/blobs/{layer}"


def test_delete_by_tag_takes_its_siblings(ops_lab):
    c, ctx, pushed = ops_lab["client"], ops_lab["ctx"], ops_lab["pushed"]
    plan = ops.plan_delete(ctx, "opstest/alpha", "v1")
    item = plan.value.items[0]
    assert item["digest"] == pushed["alpha:v1"] and item["tags"] == ["v1", "v1-alias"]
    assert "v1-alias" in plan.message and "deleted too" in plan.message
    dry = ops.delete_images(ctx, plan, dry_run=True)
    assert dry.status == "would change" and "v1" in c.tags("opstest/alpha")
    n = len(journal.entries())
    rep = ops.delete_images(ctx, plan)
    assert rep.status == "changed" and rep.value[0]["status"] == 202
    rec = [e for e in journal.entries()[n:] if e["kind"] == "http"]
    assert rec and rec[0]["command"] == f"DELETE /v2/opstest/alpha/manifests/{item['digest']}"
    assert rec[0]["exit_code"] == 202 and rec[0]["changed"] and rec[0]["host"] == c.base_url
    assert sorted(c.tags("opstest/alpha")) == ["v2"]
    # idempotent: the same request again reports ok, nothing to delete
    again = ops.plan_delete(ctx, "opstest/alpha", "v1")
    assert again.status == "ok" and not again.value.items
    assert ops.delete_images(ctx, again).status == "ok"


def test_delete_by_digest_in_a_notebook_dry_run(run_notebook, ops_lab):
    c, pushed = ops_lab["client"], ops_lab["pushed"]
    nb, _, _ = run_notebook("06-operations", **HOST_PARAMS, repository="opstest/beta", tag="oci", delete_tag=pushed["beta:oci"],
                            dry_run=True)
    text = outputs_text(nb)
    assert "would run" in text or "would change" in text
    assert "DRY-RUN" in text and c.tags("opstest/beta") == ["oci"]


@pytest.fixture
def nodelete_registry(ops_lab):
    """A second registry on registry1:8001 with deletes disabled (filesystem), removed after."""
    ctx = ops_lab["ctx"]
    h = ctx.host(REG_HOST)
    d = "/opt/opstest-nodelete"
    cfg = {"version": 0.1, "storage": {"filesystem": {"rootdirectory": "/var/lib/registry"},
                                       "delete": {"enabled": False}},
           "auth": {"htpasswd": {"realm": "basic-realm", "path": "/auth/htpasswd"}},
           "http": {"addr": "0.0.0.0:8001", "secret": "opstest-not-a-secret",
                    "tls": {"certificate": "/certs/registry.pem", "key": "/certs/registry-key.pem"}}}
    from runbook_lib.host import argv, cmd
    h.run(cmd("docker rm -f opstest-nodelete >/dev/null 2>&1; true"))
    h.put_file(f"{d}/config.yml", json.dumps(cfg), mode=0o600)
    h.run(argv("docker", "run", "-d", "--name", "opstest-nodelete", "--network", "host",
               "-v", "/opt/k8s/registry/auth:/auth", "-v", "/opt/k8s/registry/certs:/certs",
               "-v", f"{d}/config.yml:/etc/docker/registry/config.yml", "registry:2"))
    c2 = ops.RegistryClient(f"https://{REG_HOST}:8001", ops_lab["client"].ca_path,
                            ops_lab["client"].user, ops_lab["client"].session.auth[1])
    for _ in range(50):
        try:
            c2.ping()
            break
        except ops.RegistryError:
            time.sleep(0.2)
    yield c2
    h.run(cmd("docker rm -f opstest-nodelete && rm -rf {d}", d=d))


def test_delete_disabled_is_explained(ops_lab, nodelete_registry):
    c2 = nodelete_registry
    other = f"{REG_HOST}:8001"
    (ops_lab["tmp"] / "nodelete").mkdir(exist_ok=True)
    sk2 = Skopeo(ops_lab["tmp"] / "nodelete", c2.ca_path, c2.user, c2.session.auth[1], other)
    digest = sk2.push(ops_lab["src"] + "a", "opstest/keep:v1", "v2s2")
    with pytest.raises(ops.RegistryError, match="405") as e:
        c2.delete_manifest("opstest/keep", digest)
    assert e.value.code == "UNSUPPORTED" and "delete.enabled" in e.value.hint
    assert c2.tags("opstest/keep") == ["v1"]


# ---------------------------------------------------------------------------- retention and GC
def test_retention_keeps_the_newest(ops_lab):
    c, ctx, pushed = ops_lab["client"], ops_lab["ctx"], ops_lab["pushed"]
    plan = ops.plan_retention(ctx, "opstest/ret", 1, r"^r\d$")
    assert {i["digest"] for i in plan.value.items} == {pushed["ret:r1"], pushed["ret:r2"]}
    assert plan.value.kept == ["opstest/ret:r3"]
    assert sorted(c.tags("opstest/ret")) == ["r1", "r2", "r3"]  # a plan deletes nothing
    ops.delete_images(ctx, plan)
    assert c.tags("opstest/ret") == ["r3"]


def test_gc_frees_rgw_space_and_keeps_tagged_images_whole(ops_lab, tmp_path):
    c, ctx, sk, pushed = ops_lab["client"], ops_lab["ctx"], ops_lab["skopeo"], ops_lab["pushed"]
    # gamma:big holds a 1 MiB layer no other image of gamma uses
    ops.delete_images(ctx, ops.plan_delete(ctx, "opstest/gamma", "big"))
    report = ops.gc_report(ctx).value
    assert report["blobs_eligible"] >= 1
    # registry 2.8's --delete-untagged would break the tagged index (#3178: its platform manifests look
    # untagged) or, on swift/s3, aborts on the emptied opstest/gamma (#4331): refused, nothing stopped
    with pytest.raises(ops.RunbookError, match="3178|4331") as e:
        ops.garbage_collect(ctx, delete_untagged=True)
    assert "Nothing was stopped" in str(e.value)
    dry = ops.garbage_collect(ctx, dry_run=True)  # shows stop / GC / start, runs none
    assert dry.status == "would change" and any("garbage-collect" in r.command for r in dry.results if r.skipped)
    dep = ops.detect(ctx)
    assert dep.running
    before = ops.usage(ctx, dep)
    assert before and before["bytes"] > 0
    rep = ops.garbage_collect(ctx, delete_untagged=False)
    assert rep.status == "changed", str(rep)
    gc = rep.value
    assert gc["ran"] and gc["freed_bytes"] >= 1 << 20, gc  # the 1 MiB layer at least
    assert c.ping()  # running again
    # every still-tagged opstest image pulls whole
    for repo in [r for r in c.catalog(1000)[0] if r.startswith("opstest/")]:
        for tag in c.tags(repo, listed=True):
            digest = c.resolve(repo, tag)
            p = sk.pull(f"{repo}:{tag}", tmp_path / "pull")
            assert p.returncode == 0, (repo, tag, p.stderr)
            raw = (tmp_path / "pull" / "manifest.json").read_bytes()
            assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    # nothing left to collect: a second run is ok and does not stop the registry
    assert ops.garbage_collect(ctx).status == "ok"
    # a re-push of the collected image works (the restart flushed the blob-descriptor cache)
    d = sk.push(ops_lab["src"] + "g", "opstest/gamma:big", "v2s2")
    assert d == pushed["gamma:big"]
    p = sk.pull("opstest/gamma:big", tmp_path / "repull")
    assert p.returncode == 0, p.stderr


# ---------------------------------------------------------------------------- the notebook
def test_notebook_default_run(run_notebook, ops_lab):
    nb, _, _ = run_notebook("06-operations", **HOST_PARAMS)
    text = outputs_text(nb)
    assert "VERDICT 06-operations: PASS" in text
    assert masking.mask(text) == text or "****" not in text
    assert ops_lab["client"].session.auth[1] not in json.dumps(nb)


@pytest.mark.skipif(REG_HOST != LAB_PARAMS["registry_host"], reason="nbval runs the notebook's defaults (registry1)")
def test_nbval(ops_lab, state_dir):
    env = dict(os.environ, RUNBOOK_STATE_DIR=str(state_dir))
    p = subprocess.run([str(ROOT / ".venv/bin/pytest"), "-q", "-p", "no:cacheprovider", "--nbval-lax",
                        "--nbval-sanitize-with", str(ROOT / "tests/nbval_sanitize.cfg"),
                        str(NOTEBOOKS / "06-operations.ipynb")], cwd=str(ROOT), env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]
