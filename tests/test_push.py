"""Section 5 (05-push): push with docker and skopeo to the lab's registry, prove it landed in RGW.

Unit tests of the pure helpers run anywhere; the rest (`lab`) run 01..04 first (idempotent) and
then the notebook through papermill, as users do.
"""
from __future__ import annotations

import base64
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from conftest import LAB_PARAMS, NOTEBOOKS, ROOT, execute, outputs_text
from runbook_lib import push as P

TARGET = f"{LAB_PARAMS['registry_host']}:{LAB_PARAMS['registry_port']}"
DOCKER_CA = pathlib.Path(P.DOCKER_CERTS) / TARGET / "ca.crt"


# -- unit: pure helpers -----------------------------------------------------------------------

def test_parse_inspects_one_line_per_image_missing_ones_empty():
    text = ('sha256:aaa ["198.18.0.3:8000/demo/hello@sha256:bbb"]\n'
            '-\n')
    assert P.parse_inspects(text, 3) == [("sha256:aaa", ["198.18.0.3:8000/demo/hello@sha256:bbb"]),
                                            ("", []), ("", [])]
    assert P.parse_inspects("sha256:aaa null\nsha256:ccc []\n", 2) == [("sha256:aaa", []), ("sha256:ccc", [])]


def test_split_image():
    assert P.split_image("prom/node-exporter:v0.16.0") == ("prom/node-exporter", "v0.16.0")
    assert P.split_image("busybox") == ("busybox", "latest")
    assert P.split_image("a/b/c") == ("a/b/c", "latest")


@pytest.mark.parametrize("text, reason", [
    ('Error response from daemon: Get "https://198.18.0.3:8000/v2/": x509: certificate signed by unknown authority',
     "tls-untrusted"),
    ('x509: certificate signed by unknown authority (possibly because of "crypto/rsa: verification error" while '
     'trying to verify candidate authority certificate "runbook registry CA")', "tls-untrusted"),
    ('Get "https://198.18.0.9:8000/v2/": x509: certificate is valid for 127.0.0.1, 198.18.0.3, not 198.18.0.9',
     "tls-name"),
    ("Error response from daemon: login attempt to https://198.18.0.3:8000/v2/ failed with status: 401 Unauthorized",
     "auth"),
    ("unauthorized: authentication required", "auth"),
    ("failed with status: 503 Service Unavailable", "503"),
    ("dial tcp 198.18.0.3:8000: connect: connection refused", "unreachable"),
    ("http: server gave HTTP response to HTTPS client", "http"),
])
def test_explain(text, reason):
    got = P.explain(text, TARGET, "docker")
    assert got and got[0] == reason, got
    assert got[2]  # always a hint


def test_explain_names_the_certs_path():
    _, msg, hint = P.explain("x509: certificate signed by unknown authority", TARGET, "docker")
    assert "unknown authority" in msg and f"/etc/docker/certs.d/{TARGET}/ca.crt" in hint
    _, _, hint = P.explain("x509: certificate signed by unknown authority", TARGET, "skopeo")
    assert f"/etc/containers/certs.d/{TARGET}/ca.crt" in hint
    assert P.explain("something else", TARGET, "docker") is None


# what podman 4.3 printed on the lab (pc1 pushing to a registry on pc2)
PODMAN_X509 = ('Error: initializing source docker://198.18.0.171:8000/exp/test:v1: pinging container registry '
               '198.18.0.171:8000: Get "https://198.18.0.171:8000/v2/": x509: certificate signed by unknown authority')
PODMAN_401 = 'Error: logging into "198.18.0.171:8000": invalid username/password'


def test_explain_podman_texts():
    reason, msg, hint = P.explain(PODMAN_X509, TARGET, "podman")
    assert reason == "tls-untrusted" and "podman does not trust" in msg
    assert f"/etc/containers/certs.d/{TARGET}/ca.crt" in hint
    assert P.explain(PODMAN_401, TARGET, "podman")[0] == "auth"


def test_client_problem_names_what_the_host_has():
    # a RHEL-style host: podman, no docker -> install docker.io or use client=podman
    why, hint = P.client_problem("docker", {"docker": False, "podman": True, "skopeo": False}, 127, "not found")
    assert why == "docker is not installed" and "client=podman" in hint and "docker.io" in hint
    why, hint = P.client_problem("podman", {"docker": True, "podman": False, "skopeo": True}, 127, "")
    assert "podman is not installed" in why and "apt-get install podman" in hint and "client=docker" in hint
    why, hint = P.client_problem("docker", {"docker": True}, 1, "Cannot connect to the Docker daemon")
    assert "daemon" in why and "systemctl start docker" in hint


@pytest.mark.parametrize("env, want", [
    ({}, f"/run/containers/{os.getuid()}/auth.json"),
    ({"XDG_RUNTIME_DIR": "/run/user/1000"}, "/run/user/1000/containers/auth.json"),
    ({"XDG_RUNTIME_DIR": "/run/user/1000", "REGISTRY_AUTH_FILE": "/etc/auth.json"}, "/etc/auth.json"),
])
def test_podman_auth_path_as_containers_image_picks_it(env, want):
    base = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "REGISTRY_AUTH_FILE")}
    out = subprocess.run(["sh", "-c", P.podman_auth_path_script()], env={**base, **env}, capture_output=True,
                         text=True).stdout
    assert out == want


def test_manifest_type_of_an_oci_manifest_without_the_field():
    podman = {"schemaVersion": 2, "config": {"mediaType": "application/vnd.oci.image.config.v1+json"}, "layers": []}
    assert P.manifest_type(podman) == "application/vnd.oci.image.manifest.v1+json"
    assert P.manifest_type({"mediaType": P.MANIFEST_TYPES[0]}) == P.MANIFEST_TYPES[0]


def test_stored_auth_and_digests():
    cfg = json.dumps({"auths": {TARGET: {"auth": P.auth_b64("foo", "pw123456")}}})
    assert P.stored_auth(cfg, TARGET) == base64.b64encode(b"foo:pw123456").decode()
    assert P.stored_auth(cfg, "other:1") is None
    assert P.stored_auth(None, TARGET) is None and P.stored_auth("not json", TARGET) is None
    d = "sha256:" + "a" * 64
    assert P.parse_push_digest(f"eec2ed281fa1: Pushed\nv0.16.0: digest: {d} size: 527\n") == d
    assert P.parse_pull_digest(f"v0.16.0: Pulling from prom/node-exporter\nDigest: {d}\nStatus: ...") == d
    assert P.parse_push_digest("nothing") is None


def test_oci_docs_are_deterministic():
    a = P.oci_docs("sha256:" + "1" * 64, 123, "sha256:" + "2" * 64, "v1")
    b = P.oci_docs("sha256:" + "1" * 64, 123, "sha256:" + "2" * 64, "v1")
    assert a == b
    man = json.loads(a["manifest"])
    assert man["layers"][0]["digest"] == "sha256:" + "1" * 64
    assert json.loads(a["index"])["manifests"][0]["digest"] == a["manifest_digest"].decode()


def test_classify_keys_swift_and_s3():
    h = "ab" * 32
    keys = [
        f"m1.4123.1_files/docker/registry/v2/repositories/prom/node-exporter/_layers/sha256/{h}/link",
        f"m1.4123.1_files/docker/registry/v2/repositories/prom/node-exporter/_manifests/tags/v1/current/link",
        f"m1.4123.1_files/docker/registry/v2/blobs/sha256/ab/{h}/data",
        f"m1.4123.1_docker/registry/v2/blobs/sha256/ab/{h}/data",  # an s3-written object in the same bucket
        "m1.4123.1_files/docker/registry/v2/repositories/other/_layers/sha256/x/link",
        "unrelated",
    ]
    swift = P.storage_infix({"driver": "swift"})
    rows, found = P.classify_keys(keys, "prom/node-exporter", [f"sha256:{h}"], swift)
    assert found == [f"sha256:{h}"]
    assert sorted(r["kind"] for r in rows) == ["blob data", "layer link", "tag"]
    assert all("…" in r["object"] or "current" in r["object"] for r in rows)
    rows, found = P.classify_keys(keys, "prom/node-exporter", [f"sha256:{h}"], P.storage_infix({"driver": "s3"}))
    assert found == [f"sha256:{h}"] and [r["kind"] for r in rows] == ["blob data"]


# -- lab ---------------------------------------------------------------------------------------

def _execute(name: str, out: pathlib.Path, expect_error=False, **params):
    t0 = time.monotonic()
    nb, err = execute(name, out, expect_error=expect_error, **params)
    return nb, out, err, time.monotonic() - t0


@pytest.fixture(scope="module")
def deployed(lab, state_dir, tmp_path_factory):
    """01..04 with the lab's defaults (swift storage), in this session's state dir."""
    d = tmp_path_factory.mktemp("deploy05")
    for name in ("01-rgw", "02-accounts", "03-certs", "04-registry"):
        _execute(name, d / f"{name}.ipynb")
    return state_dir


@pytest.fixture
def run(deployed, tmp_path):
    def go(tag="run", expect_error=False, **params):
        # 04 again first (a no-op when nothing changed): the lab is shared, and another session may
        # have redeployed the registry with its own CA and password since.
        wrong = os.environ.pop("REGISTRY_PASSWORD", None)  # 04 would make a wrong one the real one
        try:
            _execute("04-registry", tmp_path / f"04.{tag}.ipynb")
        finally:
            if wrong is not None:
                os.environ["REGISTRY_PASSWORD"] = wrong
        nb, out, err, secs = _execute("05-push", tmp_path / f"05-push.{tag}.ipynb", expect_error, **params)
        return nb, out, err, secs
    return go


def _password(state_dir) -> str:
    return (pathlib.Path(state_dir) / "secrets" / "registry_password").read_text().strip()


def _no_secret(out: pathlib.Path, state_dir, extra=()):
    text = out.read_text()
    pw = _password(state_dir)
    forms = [pw, P.auth_b64(LAB_PARAMS["registry_user"], pw), *extra]
    for f in forms:
        assert f not in text, "a secret is in the executed notebook"
    runs = os.environ.get("RUNBOOK_RUNS_DIR")  # the run folders: records, journal, HTML
    for p in (pathlib.Path(runs).rglob("*") if runs else ()):
        if p.is_file():
            data = p.read_bytes()
            assert not any(f.encode() in data for f in forms), f"a secret is in {p}"


def _counts(nb) -> str:
    return next(line for line in outputs_text(nb).splitlines() if line.startswith("steps:"))


@pytest.mark.lab
@pytest.mark.parametrize("client", ["docker", "skopeo"])
def test_push_pull_back_and_rgw_objects(run, deployed, client):
    cache_before = os.path.exists(P.SKOPEO_CACHE)
    nb, out, _, _ = run("first", client=client)
    text = outputs_text(nb)
    assert "VERDICT 05-push: PASS — pushed prom/node-exporter:v0.16.0 to 198.18.0.3:8000, 1 layer in RGW" in text
    # the digest the client reported = Docker-Content-Digest = the pulled-back one
    seen = {k: re.findall(rf"{k}: (sha256:[0-9a-f]{{64}})", text) for k in
            ("Docker-Content-Digest", "client reported", "pulled back")}
    assert all(seen.values()), seen
    assert len({v[0] for v in seen.values()}) == 1, seen
    assert "…/_manifests/tags/v0.16.0/current/link" in text and "blob data" in text
    assert "layers stored: 1 of 1" in text
    _no_secret(out, deployed)
    if client == "docker":
        cfg = json.loads((pathlib.Path.home() / ".docker" / "config.json").read_text())
        pw = _password(deployed)
        assert cfg["auths"][TARGET]["auth"] == P.auth_b64(LAB_PARAMS["registry_user"], pw)
    else:
        assert os.path.exists(P.SKOPEO_CACHE) == cache_before, "skopeo's blob-info cache was left behind"
    # a second run changes nothing
    nb2, out2, _, _ = run("second", client=client)
    assert "VERDICT 05-push: PASS" in outputs_text(nb2)
    changed = [line for line in outputs_text(nb2).splitlines() if "changed" in line and "✎" in line]
    assert ", 0 changed," in _counts(nb2), changed
    assert "not pushed again" in outputs_text(nb2)


@pytest.mark.lab
def test_untrusted_ca_fails_fast_and_is_explained(run, deployed):
    run("setup")  # pushed with docker, CA installed
    saved = DOCKER_CA.read_bytes()
    DOCKER_CA.unlink()
    try:
        nb, out, err, secs = run("noca", expect_error=True, trust_ca=False)
        text = outputs_text(nb)
        assert "TLSUntrusted" in text
        assert "x509: certificate signed by unknown authority" in text
        assert f"/etc/docker/certs.d/{TARGET}/ca.crt" in text and "trust step" in text
        assert secs < 60, f"took {secs:.0f}s"
    finally:
        if not DOCKER_CA.exists():
            DOCKER_CA.write_bytes(saved)
    nb, _, _, _ = run("restored")
    assert "VERDICT 05-push: PASS" in outputs_text(nb)


@pytest.mark.lab
def test_wrong_password_is_401_explained_and_masked(run, deployed, monkeypatch):
    wrong = "wrong-" + base64.b32encode(os.urandom(10)).decode().lower()
    monkeypatch.setenv("REGISTRY_PASSWORD", wrong)
    nb, out, err, secs = run("wrongpw", expect_error=True)
    text = outputs_text(nb)
    assert "AuthFailed" in text and "401" in text and "unauthorized: authentication required" in text
    assert "registry_user" in text  # the hint names what to check
    _no_secret(out, deployed, extra=[wrong, P.auth_b64(LAB_PARAMS["registry_user"], wrong)])
    assert secs < 60
    monkeypatch.delenv("REGISTRY_PASSWORD")
    nb, _, _, _ = run("rightpw")
    assert "VERDICT 05-push: PASS" in outputs_text(nb)


@pytest.mark.lab
def test_invalid_image_name_is_refused_before_anything(run):
    nb, out, err, secs = run("badname", expect_error=True, image_name="Prom/Node Exporter")
    text = outputs_text(nb)
    assert "ParameterError" in text and "image_name:" in text and "nothing was changed" in text
    assert "Trust the registry" not in text


@pytest.mark.lab
def test_nbval_lax(deployed, tmp_path):
    """The committed notebook's verdict output matches a fresh run (digests/counts sanitized)."""
    _execute("04-registry", tmp_path / "04.ipynb")  # see run()
    run_setup = _execute("05-push", tmp_path / "pre.ipynb")  # the registry holds the docker push
    assert run_setup[2] is None
    env = dict(os.environ, RUNBOOK_STATE_DIR=str(deployed))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                        "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"),
                        str(NOTEBOOKS / "05-push.ipynb")], cwd=str(ROOT), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
